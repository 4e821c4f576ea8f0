import CLibvirt
import Glibc
import VirtchanProtocol
import Foundation
import Synchronization

/// A domain's virtio channel reached through libvirt (`virDomainOpenChannel`) rather than
/// through its socket on this host: the way to a domain on another host, over libvirt's own
/// ssh or TLS transport.
///
/// The stream is handed over as one end of a socket pair; libvirt's event loop, on a thread
/// of its own, moves bytes between the other end and the stream. Everything above sees a
/// plain socket, as for a local channel. Each direction holds at most `bufferLimit` bytes
/// before it stops reading its source, so memory stays bounded whichever side is slow.
///
/// libvirt's remote driver holds a connection-wide lock while a blocking stream call waits,
/// so a blocking receive on one thread would stall a send on another: the bridge uses a
/// non-blocking stream and libvirt's event callbacks instead, all on the event-loop thread.
public final class ChannelStream: @unchecked Sendable {
    /// Opens the channel whose target name (or alias) is `channel` and returns the caller's
    /// end of the socket pair (close-on-exec, non-blocking). Closing it closes the stream.
    /// Needs libvirt's event loop, which every ``Connection`` starts before it opens.
    ///
    /// Gives up after `timeout` seconds. libvirtd opens the channel with a blocking connect to
    /// QEMU's socket, holding the domain's lock meanwhile; QEMU serves one client per channel
    /// and leaves the others in a short backlog, so while another client has the channel and
    /// that backlog is full, the call does not return until the other client lets go (and the
    /// domain is locked in libvirtd for as long). A call given up on goes on, on its own thread,
    /// and drops the stream if it ever gets one; see ``settleAbandonedOpens()``.
    public static func open(_ domain: Domain, channel: String, timeout: Double) throws(ProvisioningError) -> Int32 {
        let stream = try openStream(domain, channel: channel, timeout: timeout)
        var pair: [Int32] = [-1, -1]
        guard socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0, &pair) == 0 else {
            vc_virStreamAbort(stream)
            vc_virStreamFree(stream)
            throw ProvisioningError(.io, "socketpair: \(String(cString: strerror(errno)))")
        }
        var size: Int32 = 1 << 20
        for fd in pair {
            _ = fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK)
            // Room for a few data frames in flight each way.
            _ = setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &size, socklen_t(MemoryLayout<Int32>.size))
            _ = setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &size, socklen_t(MemoryLayout<Int32>.size))
        }
        let bridge = ChannelStream(domain: domain, stream: stream, fd: pair[1])
        guard bridge.arm() else {
            close(pair[0])
            bridge.tearDown()
            throw ProvisioningError.fromLibvirt("cannot watch channel \(channel) of \(domain.name)", code: .libvirt)
        }
        return pair[0]
    }

    /// virDomainOpenChannel on a thread of its own, waited for at most `timeout` seconds.
    private static func openStream(_ domain: Domain, channel: String, timeout: Double) throws(ProvisioningError) -> virStreamPtr {
        guard let pointer = vc_virStreamNew(domain.connection.pointer, UInt32(VIR_STREAM_NONBLOCK.rawValue)) else {
            throw ProvisioningError.fromLibvirt("cannot create a libvirt stream")
        }
        nonisolated(unsafe) let stream = pointer
        let call = BoundedCall<Void>(name: "libvirt-open", {
            guard vc_virDomainOpenChannel(domain.pointer, channel, stream, 0) == 0 else {
                let failure = ProvisioningError.fromLibvirt("cannot open channel \(channel) of \(domain.name) on \(domain.connection.uri)", code: .libvirt)
                vc_virStreamFree(stream)
                return .failure(failure)
            }
            return .success(())
        }, discard: {
            vc_virStreamAbort(stream)
            vc_virResetLastError()
            vc_virStreamFree(stream)
        })
        switch call.wait(seconds: timeout) {
        case .finished(.success):
            return pointer
        case .finished(.failure(let error)) where error.message.contains("Active channel stream exists"):
            throw ProvisioningError(.conflict, error.message + " (another libvirt client has this channel open: virtchan on another host, or virsh console; a stream whose client went away while it was being opened stays until libvirtd restarts)", libvirtCode: error.libvirtCode)
        case .finished(.failure(let error)):
            throw error
        case .gaveUp:
            abandoned.withLock { $0.append(call) }
            // A conflict, not a slow libvirtd: it answers all else, and opens the channel at
            // once when nobody has it.
            throw ProvisioningError(.conflict, "libvirt on \(domain.connection.uri) did not open channel \(channel) of \(domain.name) within \(formatSeconds(timeout)): another client has that channel (a virtchan command or session holder on the domain's host: 'virtchan holder list' there), and libvirtd waits for it to let go, doing nothing else with \(domain.name) meanwhile")
        }
    }

    /// Waits until every open given up on has returned and dropped its stream. A process that
    /// ends with one in flight leaves libvirtd holding the channel for good (it adds the stream
    /// to a client that has already gone, and answers every later open with "Active channel
    /// stream exists" until it restarts), so a process that gave up on one calls this before
    /// it exits. It returns once the channel's other client lets go, or libvirt's connection
    /// fails.
    public static func settleAbandonedOpens() {
        for call in abandoned.withLock({ $0 }) { call.waitUntilReturned() }
        abandoned.withLock { $0.removeAll() }
    }
    private static let abandoned = Mutex<[BoundedCall<Void>]>([])

    /// Bridges stay alive until the process ends: a callback that libvirt queued before a
    /// bridge was torn down may still run, and must find it.
    private static let live = Mutex<[ChannelStream]>([])

    static let bufferLimit = 1 << 20
    private static let chunk = 256 << 10

    private let domain: Domain
    private let stream: virStreamPtr
    private let fd: Int32
    private var watch: Int32 = -1
    private let toGuest = ByteBuffer(capacity: 256 << 10)
    private let toHost = ByteBuffer(capacity: 256 << 10)
    private var streamEvents: Int32 = 0
    private var socketEvents: Int32 = 0
    private var closed = false
    private let lock = Mutex(())

    private init(domain: Domain, stream: virStreamPtr, fd: Int32) {
        self.domain = domain
        self.stream = stream
        self.fd = fd
    }

    private func arm() -> Bool {
        Self.live.withLock { $0.append(self) }
        let opaque = Unmanaged.passUnretained(self).toOpaque()
        return lock.withLock { _ in
            streamEvents = Int32(VIR_STREAM_EVENT_READABLE.rawValue)
            socketEvents = Int32(VIR_EVENT_HANDLE_READABLE.rawValue)
            guard vc_virStreamEventAddCallback(stream, streamEvents, { _, events, opaque in
                Unmanaged<ChannelStream>.fromOpaque(opaque!).takeUnretainedValue().streamReady(events)
            }, opaque, nil) == 0 else { return false }
            watch = vc_virEventAddHandle(fd, socketEvents, { _, _, events, opaque in
                Unmanaged<ChannelStream>.fromOpaque(opaque!).takeUnretainedValue().socketReady(events)
            }, opaque, nil)
            return watch >= 0
        }
    }

    private func streamReady(_ events: Int32) {
        lock.withLock { _ in
            guard !closed else { return }
            if events & Int32(VIR_STREAM_EVENT_WRITABLE.rawValue) != 0 { sendToGuest() }
            if events & Int32(VIR_STREAM_EVENT_READABLE.rawValue) != 0 { receiveFromGuest() }
            if !closed, events & Int32(VIR_STREAM_EVENT_ERROR.rawValue | VIR_STREAM_EVENT_HANGUP.rawValue) != 0,
               events & Int32(VIR_STREAM_EVENT_READABLE.rawValue) == 0 {
                closeLocked(finished: false)
            }
            if !closed { updateEvents() }
        }
    }

    private func socketReady(_ events: Int32) {
        lock.withLock { _ in
            guard !closed else { return }
            if events & Int32(VIR_EVENT_HANDLE_WRITABLE.rawValue) != 0 { flushToHost() }
            if events & Int32(VIR_EVENT_HANDLE_READABLE.rawValue | VIR_EVENT_HANDLE_HANGUP.rawValue | VIR_EVENT_HANDLE_ERROR.rawValue) != 0 {
                readFromHost()
            }
            if !closed { updateEvents() }
        }
    }

    /// Guest to host: stream into `toHost`, then into the socket.
    private func receiveFromGuest() {
        while toHost.count < Self.bufferLimit {
            let room = toHost.reserve(Self.chunk)
            let n = vc_virStreamRecv(stream, room.baseAddress!.assumingMemoryBound(to: CChar.self), room.count)
            if n > 0 {
                toHost.commit(Int(n))
                flushToHost()
                continue
            }
            if n == -2 { return }
            // 0: the far end finished the stream; -1: it failed (domain stopped, link lost).
            flushToHost()
            closeLocked(finished: n == 0)
            return
        }
    }

    private func flushToHost() {
        while !toHost.isEmpty {
            let r = toHost.readable
            let n = Glibc.write(fd, r.baseAddress!, r.count)
            if n > 0 { toHost.consume(n); continue }
            if n < 0 && errno == EINTR { continue }
            if n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK) { return }
            closeLocked(finished: false)
            return
        }
    }

    /// Host to guest: socket into the stream; what the stream does not take waits in `toGuest`.
    private func readFromHost() {
        while toGuest.count < Self.bufferLimit {
            let room = toGuest.reserve(Self.chunk)
            let n = Glibc.read(fd, room.baseAddress!, room.count)
            if n > 0 {
                toGuest.commit(n)
                sendToGuest()
                if closed || !toGuest.isEmpty { return }
                continue
            }
            if n < 0 && errno == EINTR { continue }
            if n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK) { return }
            // The owner closed its end: the channel is no longer wanted.
            closeLocked(finished: false)
            return
        }
    }

    private func sendToGuest() {
        while !toGuest.isEmpty {
            let r = toGuest.readable
            let n = vc_virStreamSend(stream, r.baseAddress!.assumingMemoryBound(to: CChar.self), r.count)
            if n > 0 { toGuest.consume(Int(n)); continue }
            if n == -2 { return }
            closeLocked(finished: false)
            return
        }
    }

    private func updateEvents() {
        var s: Int32 = 0
        if toHost.count < Self.bufferLimit { s |= Int32(VIR_STREAM_EVENT_READABLE.rawValue) }
        if !toGuest.isEmpty { s |= Int32(VIR_STREAM_EVENT_WRITABLE.rawValue) }
        var h: Int32 = 0
        if toGuest.count < Self.bufferLimit { h |= Int32(VIR_EVENT_HANDLE_READABLE.rawValue) }
        if !toHost.isEmpty { h |= Int32(VIR_EVENT_HANDLE_WRITABLE.rawValue) }
        if s != streamEvents { streamEvents = s; vc_virStreamEventUpdateCallback(stream, s) }
        if h != socketEvents { socketEvents = h; vc_virEventUpdateHandle(watch, h) }
    }

    private func closeLocked(finished: Bool) {
        guard !closed else { return }
        closed = true
        vc_virStreamEventRemoveCallback(stream)
        if watch >= 0 { vc_virEventRemoveHandle(watch) }
        if finished { vc_virStreamFinish(stream) } else { vc_virStreamAbort(stream) }
        vc_virResetLastError()
        vc_virStreamFree(stream)
        // The owner's end reads EOF once what was already written is read.
        close(fd)
    }

    private func tearDown() { lock.withLock { _ in closeLocked(finished: false) } }
}
