import Glibc
import VirtchanProtocol

/// The host-side conversation with a session holder: the process that keeps a domain's
/// channels open and serves every virtchan process on this host that works on the domain.
///
/// A client connects to the holder's unix socket. On a control connection it speaks the
/// agent protocol as it would to the agent: the holder answers the hello itself (it has
/// already proven the domain's key to the agent) and relays every request under an id of its
/// own. A data connection asks for the data port with `dataPortRequest`; the holder answers
/// `dataPortQueued` while another transfer runs, then `dataPortGrant` with a descriptor of the
/// port attached (SCM_RIGHTS), so file bytes go straight between the client and the channel.
/// Closing the data connection hands the port back.
public enum HolderLink {
    /// Connects to a holder's socket and checks that the process behind it is this user's
    /// or root's: a socket left by anyone else is never trusted.
    public static func connect(_ path: String) throws(TransportError) -> Int32 {
        let fd = try UnixSocket.connect(path)
        guard let peer = UnixSocket.peerCredentials(fd), peer.uid == 0 || peer.uid == geteuid() else {
            close(fd)
            throw TransportError(.unauthenticated, "the session holder socket \(path) belongs to another user; remove it")
        }
        return fd
    }

    /// Waits for the data port and returns its descriptor together with the connection that
    /// holds the grant (close both when the transfers are done). `queued` is called with the
    /// number of transfers ahead while this one waits.
    public static func dataPort(_ path: String, domain: String, timeout: Double,
                                queued: ((Int) -> Void)?) throws(TransportError) -> (port: Int32, grant: Int32) {
        let fd = try connect(path)
        let frame = FrameEncoder.encode(Frame(.dataPortRequest, id: 1))
        guard frame.withUnsafeBytes({ writeFully(fd, $0) }) else {
            close(fd)
            throw TransportError.system("cannot ask the session holder of \(domain) for the data channel", code: .agentGone)
        }
        let decoder = FrameDecoder(maxPayload: 64)
        let deadline = monotonicDeadline(after: timeout)
        var buffer = [UInt8](repeating: 0, count: 256)
        do throws(TransportError) {
            while true {
                var fds = [pollfd(fd: fd, events: Int16(POLLIN), revents: 0)]
                try Poller.wait(&fds, milliseconds: Poller.milliseconds(until: deadline))
                if fds[0].revents == 0 {
                    if monotonicNanos() >= deadline {
                        throw TransportError(.timeout, "the data channel of \(domain) stayed busy for \(formatSeconds(timeout))")
                    }
                    continue
                }
                let (n, passed) = receive(fd, &buffer)
                if n <= 0 {
                    if let passed { close(passed) }
                    throw TransportError(.agentGone, "the session holder of \(domain) went away while this transfer waited")
                }
                decoder.feed(Array(buffer[0..<n]))
                while let reply = decoder.next() {
                    switch reply.type {
                    case .dataPortQueued:
                        var r = ByteReader(reply.payload)
                        queued?(Int((try? r.u32()) ?? 1))
                    case .dataPortGrant:
                        guard let passed else {
                            throw TransportError(.protocolViolation, "the session holder of \(domain) granted the data channel without passing it")
                        }
                        setNonBlocking(passed)
                        return (passed, fd)
                    case .error:
                        throw TransportError(remote: try decodeOrThrow(ErrorMessage.self, reply))
                    default:
                        break
                    }
                }
                if let passed { close(passed) }
            }
        } catch {
            close(fd)
            throw error
        }
    }

    /// Sends `frame` with `descriptor` attached.
    public static func send(_ frame: Frame, passing descriptor: Int32, over socket: Int32) -> Bool {
        let bytes = FrameEncoder.encode(frame)
        let space = cmsgSpace(MemoryLayout<Int32>.size)
        var control = [UInt8](repeating: 0, count: space)
        return bytes.withUnsafeBytes { raw -> Bool in
            var iov = iovec(iov_base: UnsafeMutableRawPointer(mutating: raw.baseAddress!), iov_len: raw.count)
            return control.withUnsafeMutableBytes { cbuf -> Bool in
                var msg = msghdr()
                msg.msg_control = cbuf.baseAddress
                msg.msg_controllen = space
                let header = cbuf.baseAddress!.assumingMemoryBound(to: cmsghdr.self)
                header.pointee.cmsg_len = cmsgLength(MemoryLayout<Int32>.size)
                header.pointee.cmsg_level = SOL_SOCKET
                header.pointee.cmsg_type = Int32(SCM_RIGHTS)
                cbuf.baseAddress!.advanced(by: cmsgLength(0)).storeBytes(of: descriptor, as: Int32.self)
                return withUnsafeMutablePointer(to: &iov) { iovp -> Bool in
                    msg.msg_iov = iovp
                    msg.msg_iovlen = 1
                    var sent = 0
                    while true {
                        let n = sendmsg(socket, &msg, Int32(MSG_NOSIGNAL))
                        if n < 0 && errno == EINTR { continue }
                        if n < 0 { return false }
                        sent = n
                        break
                    }
                    // The descriptor went with the first byte; the rest is plain data.
                    return sent == raw.count
                        || writeFully(socket, UnsafeRawBufferPointer(rebasing: raw[sent...]))
                }
            }
        }
    }

    /// Reads what is there, and a descriptor when one came with it (close-on-exec).
    static func receive(_ socket: Int32, _ buffer: inout [UInt8]) -> (Int, Int32?) {
        let space = cmsgSpace(MemoryLayout<Int32>.size)
        var control = [UInt8](repeating: 0, count: space)
        let count = buffer.count
        return buffer.withUnsafeMutableBytes { raw -> (Int, Int32?) in
            var iov = iovec(iov_base: raw.baseAddress, iov_len: count)
            return control.withUnsafeMutableBytes { cbuf -> (Int, Int32?) in
                withUnsafeMutablePointer(to: &iov) { iovp -> (Int, Int32?) in
                    var msg = msghdr()
                    msg.msg_iov = iovp
                    msg.msg_iovlen = 1
                    msg.msg_control = cbuf.baseAddress
                    msg.msg_controllen = space
                    var n: Int
                    repeat { n = recvmsg(socket, &msg, Int32(MSG_CMSG_CLOEXEC)) } while n < 0 && errno == EINTR
                    guard n >= 0 else { return (n, nil) }
                    var passed: Int32?
                    if msg.msg_controllen >= cmsgLength(MemoryLayout<Int32>.size) {
                        let header = cbuf.baseAddress!.assumingMemoryBound(to: cmsghdr.self)
                        if header.pointee.cmsg_level == SOL_SOCKET && header.pointee.cmsg_type == Int32(SCM_RIGHTS) {
                            passed = cbuf.baseAddress!.advanced(by: cmsgLength(0)).load(as: Int32.self)
                        }
                    }
                    return (n, passed)
                }
            }
        }
    }

    private static func cmsgAlign(_ n: Int) -> Int { (n + MemoryLayout<Int>.size - 1) & ~(MemoryLayout<Int>.size - 1) }
    private static func cmsgLength(_ n: Int) -> Int { cmsgAlign(MemoryLayout<cmsghdr>.size) + n }
    private static func cmsgSpace(_ n: Int) -> Int { cmsgAlign(MemoryLayout<cmsghdr>.size) + cmsgAlign(n) }
}

extension UnixSocket {
    /// Linux's `struct ucred`, which Glibc exports only under _GNU_SOURCE.
    public struct PeerCredentials: Sendable {
        public var pid: pid_t = 0
        public var uid: uid_t = 0
        public var gid: gid_t = 0
    }

    /// The process at the other end of a connected unix socket (SO_PEERCRED).
    public static func peerCredentials(_ fd: Int32) -> PeerCredentials? {
        var cred = PeerCredentials()
        var len = socklen_t(MemoryLayout<PeerCredentials>.size)
        guard getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) == 0, len == MemoryLayout<PeerCredentials>.size else { return nil }
        return cred
    }
}
