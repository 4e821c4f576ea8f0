import Glibc
import Crypto
import VirtchanProtocol
import VirtchanTransport

public struct TransferSummary: Sendable, Codable {
    public var bytes: UInt64
    public var seconds: Double
    /// SHA-256 of the bytes, computed on the host; empty when ``FileTransfer/hostSHA256`` was
    /// off and the guest's was not asked for.
    public var sha256: String
    /// SHA-256 computed in the guest, when asked for (`--sha256`).
    public var guestSHA256: String?
    /// The transfer digest both sides agreed on (XXH64 over each frame's XXH64 and length).
    public var digest: String
    public var mode: UInt32?

    public var mibPerSecond: Double { seconds > 0 ? Double(bytes) / 1_048_576 / seconds : 0 }
}

/// Called as bytes move: (bytes so far, total).
public typealias ProgressHandler = (UInt64, UInt64) -> Void

/// Moves files over the data channel. The host connects to the data socket first, asks on the
/// control channel, and writes only after the agent says the port is open (bytes sent to a
/// closed guest port are dropped). Every frame and the whole file carry XXH64; the receiving
/// side writes a temporary file and renames it only once everything checks out.
public final class FileTransfer {
    let session: AgentSession
    private var data: FramedConnection?
    private var dataLock: ChannelLock?
    /// Through a session holder: the connection that holds the data port for this object.
    private var dataGrant: Int32 = -1
    /// How long the agent may stay silent before the transfer is given up.
    public var silenceLimit: Double = 15
    /// How long a transfer waits for the data port while others use it (through a session
    /// holder, transfers take turns on it).
    public var queueTimeout: Double = 3600
    /// Called while this transfer waits for others, with the number ahead of it.
    public var onQueued: ((Int) -> Void)?
    /// Whether each file's SHA-256 is computed on the host for ``TransferSummary/sha256``. It
    /// costs about 75 ms of host CPU per 128 MiB (the XXH64 checks that verify every transfer
    /// do not need it); a transfer that asks for the guest's SHA-256 computes it regardless.
    public var hostSHA256 = true

    public init(session: AgentSession) { self.session = session }

    deinit {
        if let data { close(data.fd) }
        if dataGrant >= 0 { close(dataGrant) }
    }

    /// The data port: straight from its socket, or lent by the session holder for as long as
    /// this object lives (every transfer it makes runs under one turn).
    private func dataConnection() throws(TransportError) -> FramedConnection {
        if let data { return data }
        let endpoint = session.endpoint
        let fd: Int32
        if session.isHeld, let holder = endpoint.holderSocket {
            let lent = try HolderLink.dataPort(holder, domain: endpoint.domain, timeout: queueTimeout, queued: onQueued)
            fd = lent.port
            dataGrant = lent.grant
        } else {
            guard let path = endpoint.dataSocket else {
                throw TransportError(.unreachable, "domain \(endpoint.domain) has no data channel")
            }
            dataLock = try ChannelLock(domain: endpoint.domain, role: "data", label: "data channel of \(endpoint.domain)")
            fd = try UnixSocket.connect(path)
        }
        let c = FramedConnection(fd: fd, maxPayload: FrameLimits.dataChunk + 4096)
        data = c
        return c
    }

    /// Waits for the control frame answering `id`; errors become TransportError.
    private func controlReply(_ id: UInt32, timeout: Double) throws(TransportError) -> Frame {
        guard let f = try session.receive(id: id, deadline: monotonicDeadline(after: timeout)) else {
            throw TransportError(.timeout, "the agent in \(session.endpoint.domain) did not answer within \(formatSeconds(timeout))" + session.endpoint.silentLinkHint)
        }
        if f.type == .error { throw TransportError(remote: try decodeOrThrow(ErrorMessage.self, f)) }
        return f
    }

    /// The id of the transfer's frames on the data port: the request's, or through a session
    /// holder, the one the holder says the agent knows it by.
    private func dataPortID(_ ready: DataReady, request id: UInt32) -> UInt32 {
        session.isHeld ? ready.dataID ?? id : id
    }

    private func abort(_ id: UInt32) {
        session.send(Frame(.abort, id: id))
        try? session.flush(timeout: 2)
        // Take the agent's acknowledgement off the channel so the next request starts clean.
        _ = try? session.receive(id: id, deadline: monotonicNanos() + 2_000_000_000)
    }

    // MARK: push

    /// Sends `size` bytes read from `fd` to `remote` in the guest. With `guestSHA256`, the guest
    /// computes the file's SHA-256 as well, and a different one fails the push.
    public func push(fd: Int32, size: UInt64, to remote: String, mode: UInt32, parents: Bool,
                     guestSHA256: Bool = false, progress: ProgressHandler? = nil) throws(TransportError) -> TransferSummary {
        let data = try dataConnection()
        let id = session.newID()
        let start = monotonicNanos()
        session.send(PushRequest(path: remote, mode: mode, size: size, parents: parents, wantSHA256: guestSHA256), id: id)
        let readyFrame = try controlReply(id, timeout: 30)
        guard readyFrame.type == .dataReady else {
            throw TransportError(.protocolViolation, "the agent answered a push with \(readyFrame.type)")
        }
        let dataID = try dataPortID(decodeOrThrow(DataReady.self, readyFrame), request: id)
        var digest = TransferDigest()
        var sha: Crypto.SHA256? = hostSHA256 || guestSHA256 ? Crypto.SHA256() : nil
        var sent: UInt64 = 0
        var lastHeard = monotonicNanos()
        var lastPing = lastHeard
        var finished = false
        do throws(TransportError) {
            while true {
                // Keep at most two chunks queued: memory stays flat whatever the file size.
                while !finished && data.pendingOutput < 2 * FrameLimits.dataChunk {
                    let want = Int(min(UInt64(FrameLimits.dataChunk), size - sent))
                    if want == 0 {
                        data.send(DataEnd(size: sent, digest: digest.digest()), id: dataID)
                        finished = true
                        break
                    }
                    // Read straight into the output buffer, behind the frame header.
                    var readErrno: Int32 = 0
                    let (got, hash) = data.sendInPlace(.data, id: dataID, maxPayload: want) { room in
                        let n = readFull(fd, room.baseAddress!, want)
                        if n < 0 { readErrno = errno }
                        if n > 0 { sha?.update(bufferPointer: UnsafeRawBufferPointer(rebasing: room[0..<n])) }
                        return n
                    }
                    if got < 0 { throw TransportError.system("reading the local file", errno: readErrno) }
                    if got == 0 {
                        throw TransportError(.io, "the local file shrank while it was being read (\(sent) of \(size) bytes); nothing was written in the guest")
                    }
                    digest.add(payloadHash: hash, length: got)
                    sent += UInt64(got)
                    progress?(sent, size)
                }
                if finished && data.pendingOutput == 0 { break }
                var fds = [pollfd(fd: data.fd, events: Int16(POLLOUT), revents: 0), Poller.interest(session.control)]
                try Poller.wait(&fds, milliseconds: 500)
                if fds[0].revents & Int16(POLLOUT) != 0 {
                    do { try data.flush() } catch {
                        throw TransportError(.agentGone, "the data channel closed mid-transfer: \(error)")
                    }
                } else if fds[0].revents & Int16(POLLERR | POLLHUP) != 0 {
                    throw TransportError(.agentGone, "the data channel closed mid-transfer")
                }
                if fds[1].revents != 0 {
                    try AgentSession.pump(session.control, until: 0)
                    lastHeard = monotonicNanos()
                    // An answer before the end is an error (disk full, permission, ...).
                    if let f = try session.receive(id: id, deadline: 0) {
                        if f.type == .error { throw TransportError(remote: try decodeOrThrow(ErrorMessage.self, f)) }
                        throw TransportError(.protocolViolation, "unexpected \(f.type) during a push")
                    }
                }
                let now = monotonicNanos()
                if fds[0].revents == 0 && now - lastPing > 2_000_000_000 {
                    session.send(Frame(.ping, id: 0))
                    lastPing = now
                }
                if fds[0].revents == 0 && Double(now - lastHeard) / 1e9 > silenceLimit {
                    throw TransportError(.agentGone, "the agent in \(session.endpoint.domain) stopped taking data" + session.endpoint.silentLinkHint)
                }
            }
        } catch {
            if error.code != .remote { abort(id) }
            throw error
        }
        let done = try controlReply(id, timeout: 120)
        let result = try decodeOrThrow(TransferDone.self, done)
        guard result.size == sent, result.digest == digest.digest() else {
            throw TransportError(.integrity, "the guest stored \(result.size) bytes with a different checksum than was sent")
        }
        let summary = TransferSummary(bytes: sent, seconds: Double(monotonicNanos() - start) / 1e9,
                                      sha256: sha.map { hex($0.finalize()) } ?? "", guestSHA256: result.sha256.isEmpty ? nil : result.sha256,
                                      digest: String(result.digest, radix: 16), mode: mode)
        if let guest = summary.guestSHA256, guest != summary.sha256 {
            throw TransportError(.integrity, "SHA-256 mismatch on \(remote): host \(summary.sha256), guest \(guest)")
        }
        return summary
    }

    // MARK: pull

    /// Receives `remote` into `fd` (positioned at the start of an empty file or a stream).
    /// `announced` is asked before any byte is written, with the size and mode the guest
    /// announced. With `durable`, a regular file is flushed to disk while it arrives (see
    /// ``PullOptions/sync``; the caller's fsync then finds little left).
    public func pull(_ remote: String, into fd: Int32, guestSHA256: Bool = false, durable: Bool = false,
                     announced: ((UInt64, UInt32) throws(TransportError) -> Void)? = nil,
                     progress: ProgressHandler? = nil) throws(TransportError) -> TransferSummary {
        let data = try dataConnection()
        let id = session.newID()
        let start = monotonicNanos()
        session.send(PullRequest(path: remote, wantSHA256: guestSHA256), id: id)
        let readyFrame = try controlReply(id, timeout: 30)
        let ready = try decodeOrThrow(DataReady.self, readyFrame)
        let dataID = dataPortID(ready, request: id)
        var digest = TransferDigest()
        var sha: Crypto.SHA256? = hostSHA256 || guestSHA256 ? Crypto.SHA256() : nil
        var received: UInt64 = 0
        let writeback = durable ? DurableWriteback(fd: fd) : nil
        defer { writeback?.finish() }
        var lastHeard = monotonicNanos()
        var lastDataByte = lastHeard
        var lastPing = lastHeard
        do throws(TransportError) {
            try checkSpace(for: ready.size, in: fd, remote: remote)
            try announced?(ready.size, ready.mode)
            var ended = false
            while !ended {
                var failure: TransportError?
                while failure == nil && !ended && data.decoder.nextInPlace({ frame in
                    guard frame.id == dataID else { return }
                    switch frame.type {
                    case .data:
                        guard received + UInt64(frame.payload.count) <= ready.size else {
                            failure = TransportError(.integrity, "the guest sent more than the \(ready.size) bytes it announced for \(remote); refused")
                            return
                        }
                        digest.add(payloadHash: frame.payloadHash, length: frame.payload.count)
                        sha?.update(bufferPointer: frame.payload)
                        if !writeFully(fd, frame.payload) {
                            failure = TransportError.system("writing the local file")
                            return
                        }
                        received += UInt64(frame.payload.count)
                        writeback?.wrote(upTo: received)
                        progress?(received, ready.size)
                    case .dataEnd:
                        guard let end = try? DataEnd.decode(frame) else {
                            failure = TransportError(.protocolViolation, "malformed end of data from the agent")
                            return
                        }
                        guard end.size == received, received == ready.size else {
                            failure = TransportError(.integrity, "size mismatch on \(remote): announced \(ready.size), received \(received)")
                            return
                        }
                        guard end.digest == digest.digest() else {
                            failure = TransportError(.integrity, "checksum mismatch on \(remote): the data was damaged in transit")
                            return
                        }
                        ended = true
                    default:
                        return
                    }
                }) {}
                if let failure { throw failure }
                if ended { break }
                var fds = [pollfd(fd: data.fd, events: Int16(POLLIN), revents: 0), Poller.interest(session.control)]
                try Poller.wait(&fds, milliseconds: 500)
                if fds[0].revents != 0 {
                    let outcome: ReadOutcome
                    // One frame, then it is checked and written: QEMU stops taking the guest's
                    // bytes while the socket is full, and a few MiB read ahead meant the guest
                    // waited while they were hashed and written. Reads end at the frame's end,
                    // so the next frame is never moved down in the buffer.
                    do { outcome = try data.fillFrame() } catch {
                        throw TransportError(.agentGone, "the data channel failed: \(error)")
                    }
                    if outcome == .eof { throw TransportError(.agentGone, "the data channel closed mid-transfer") }
                    lastHeard = monotonicNanos()
                    lastDataByte = lastHeard
                } else if data.decoder.bufferedBytes > 0 && monotonicNanos() - lastDataByte > 1_000_000_000 {
                    // Quiet for a second in the middle of a frame: the head of a frame cut off
                    // in an earlier transfer, which waits for a payload that will never come.
                    data.decoder.skipStalledFrame()
                    lastDataByte = monotonicNanos()
                }
                if fds[1].revents != 0 {
                    try AgentSession.pump(session.control, until: 0)
                    lastHeard = monotonicNanos()
                    if let f = try session.receive(id: id, deadline: 0) {
                        if f.type == .error { throw TransportError(remote: try decodeOrThrow(ErrorMessage.self, f)) }
                    }
                }
                let now = monotonicNanos()
                if fds[0].revents == 0 && now - lastPing > 2_000_000_000 {
                    session.send(Frame(.ping, id: 0))
                    _ = try? session.control.flush()
                    lastPing = now
                }
                if Double(now - lastHeard) / 1e9 > silenceLimit {
                    throw TransportError(.agentGone, "the agent in \(session.endpoint.domain) stopped sending (\(received) of \(ready.size) bytes arrived)" + session.endpoint.silentLinkHint)
                }
            }
        } catch {
            if error.code != .remote && error.code != .agentGone { abort(id) }
            throw error
        }
        session.send(Frame(.ok, id: id))
        let done = try decodeOrThrow(TransferDone.self, try controlReply(id, timeout: 30))
        return TransferSummary(bytes: received, seconds: Double(monotonicNanos() - start) / 1e9,
                               sha256: sha.map { hex($0.finalize()) } ?? "", guestSHA256: done.sha256.isEmpty ? nil : done.sha256,
                               digest: String(done.digest, radix: 16), mode: ready.mode)
    }

    /// Refuses a pull before any byte is written when the file it lands in is on a file
    /// system without room for what the guest announced (a huge or lying announcement must
    /// not fill the host's disk first). Pipes and terminals have no such limit.
    func checkSpace(for size: UInt64, in fd: Int32, remote: String) throws(TransportError) {
        var st = Glibc.stat()
        guard fstat(fd, &st) == 0, st.st_mode & S_IFMT == S_IFREG,
              let free = freeBytes(onFileSystemOf: fd), size > free else { return }
        throw TransportError(.io, "not enough space for \(remote): it is \(size) bytes and the local file system has \(free) free",
                             errno: ENOSPC)
    }

    // MARK: small requests used by tree copies

    public func stat(_ path: String) throws(TransportError) -> StatReply {
        let id = session.newID()
        let f = try session.request(StatRequest(path: path).frame(id: id))
        return try decodeOrThrow(StatReply.self, f)
    }

    public func mkdir(_ path: String, mode: UInt32, parents: Bool) throws(TransportError) {
        _ = try session.request(MkdirRequest(path: path, mode: mode, parents: parents).frame(id: session.newID()))
    }

    public func symlink(target: String, at path: String) throws(TransportError) {
        _ = try session.request(SymlinkRequest(target: target, path: path).frame(id: session.newID()))
    }

    /// The entries below `path` in the guest, each checked as it arrives: a relative path that
    /// stays inside the tree, and no more entries or name bytes than `TreeLimits` allows.
    public func listTree(_ path: String) throws(TransportError) -> [TreeEntry] {
        let id = session.newID()
        session.send(ListTree(path: path), id: id)
        var out: [TreeEntry] = []
        var nameBytes = 0
        do throws(TransportError) {
            while true {
                let f = try controlReply(id, timeout: 60)
                for e in try decodeOrThrow(TreeEntries.self, f).entries {
                    guard isSafeRelativePath(e.path) else {
                        throw TransportError(.protocolViolation, "the guest listed an unsafe path '\(e.path)' under \(path); refusing to write anything")
                    }
                    nameBytes += e.path.utf8.count + e.linkTarget.utf8.count
                    guard e.path.utf8.count <= TreeLimits.maxPathBytes, e.linkTarget.utf8.count <= TreeLimits.maxPathBytes,
                          nameBytes <= TreeLimits.maxTotalBytes, out.count < TreeLimits.maxEntries else {
                        throw TransportError(.protocolViolation, "the guest's listing of \(path) goes past what one listing may hold (\(TreeLimits.maxEntries) entries, \(TreeLimits.maxTotalBytes >> 20) MiB of names); refusing it")
                    }
                    out.append(e)
                }
                if f.flags & treeEntriesLast != 0 { return out }
            }
        } catch {
            if error.code != .remote { abort(id) }
            throw error
        }
    }
}

/// Reads up to `count` bytes, retrying short reads; 0 only at end of file, -1 on error.
func hex<D: Sequence>(_ digest: D) -> String where D.Element == UInt8 {
    digest.map { ($0 < 16 ? "0" : "") + String($0, radix: 16) }.joined()
}
