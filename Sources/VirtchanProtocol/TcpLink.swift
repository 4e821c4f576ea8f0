import Glibc

/// One forwarded TCP connection as either side sees it: a socket of its own, and frames under
/// the connection's id on the control channel. Host and agent run the same state machine:
///
/// - bytes read from the socket go out as tcpData, never more than the peer's window allows
///   (``TcpLimits/window`` ahead of its tcpWindow acknowledgements), so one connection whose
///   reader stalls holds at most a window of bytes and stalls nothing else;
/// - tcpData from the peer is written to the socket, and acknowledged once written;
/// - EOF on the socket is sent as tcpShutdown; the peer's tcpShutdown becomes
///   `shutdown(SHUT_WR)` once everything before it is written (half-close);
/// - with both directions done, or on any error, tcpClose ends it on both sides.
///
/// The owner runs the poll loop: it polls ``fd`` for ``events(outputRoom:)`` and calls
/// ``service(_:over:)`` and ``receive(_:over:)``; a link that returns `.closed` has closed
/// its socket and is dropped.
public final class TcpLink {
    public enum State: Equatable { case open, closed }

    public let id: UInt32
    public let fd: Int32
    /// A non-blocking connect is under way: nothing is read or written until it completes.
    public private(set) var connecting: Bool
    /// Why the connect failed, when it did (errno).
    public private(set) var connectError: Int32 = 0
    private var credit = TcpLimits.window
    private let inbound = ByteBuffer(capacity: 16 * 1024)
    private var unacknowledged = 0
    private var readClosed = false
    private var peerShutdown = false
    private var writeClosed = false

    public init(id: UInt32, fd: Int32, connecting: Bool = false) {
        self.id = id
        self.fd = fd
        self.connecting = connecting
    }

    /// The poll events this link waits for. `outputRoom`: the control channel takes more now.
    public func events(outputRoom: Bool) -> Int16 {
        if connecting { return Int16(POLLOUT) }
        var e: Int16 = 0
        if !readClosed && credit > 0 && outputRoom { e |= Int16(POLLIN) }
        if !inbound.isEmpty { e |= Int16(POLLOUT) }
        return e
    }

    /// Bytes the peer sent that the socket has not taken yet.
    public var pendingInbound: Int { inbound.count }

    /// Moves what the socket's readiness allows; `.closed` once the link has ended.
    public func service(_ revents: Int16, over conn: FramedConnection) -> State {
        if connecting {
            guard revents != 0 else { return .open }
            var err: Int32 = 0
            var len = socklen_t(MemoryLayout<Int32>.size)
            getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len)
            if err != 0 {
                connectError = err
                close(fd)
                return .closed
            }
            connecting = false
        }
        if revents & Int16(POLLOUT | POLLERR | POLLHUP) != 0 || !inbound.isEmpty {
            if writeInbound(over: conn) == .closed { return .closed }
        }
        if revents & Int16(POLLIN | POLLHUP | POLLERR) != 0 {
            if readSocket(over: conn) == .closed { return .closed }
        }
        return finishIfDone(over: conn)
    }

    /// A frame under this link's id from the peer.
    public func receive(_ frame: Frame, over conn: FramedConnection) -> State {
        switch frame.type {
        case .tcpData:
            // A peer that sends past its window or after its shutdown breaks the protocol.
            guard !peerShutdown, inbound.count + frame.payload.count <= TcpLimits.window else { return reset(over: conn) }
            frame.payload.withUnsafeBytes { inbound.append($0) }
            if !connecting, writeInbound(over: conn) == .closed { return .closed }
        case .tcpWindow:
            guard let w = try? TcpWindow.decode(frame) else { return reset(over: conn) }
            credit = min(TcpLimits.window, credit + Int(w.bytes))
        case .tcpShutdown:
            peerShutdown = true
            if !connecting, writeInbound(over: conn) == .closed { return .closed }
        case .tcpClose, .error:
            abort(reset: frame.type == .error || frame.flags & tcpCloseReset != 0)
            return .closed
        default:
            return .open
        }
        return finishIfDone(over: conn)
    }

    /// Ends the link at once: the peer hears tcpClose with the reset flag, the socket's peer
    /// a reset.
    @discardableResult
    public func reset(over conn: FramedConnection) -> State {
        conn.send(Frame(.tcpClose, id: id, flags: tcpCloseReset))
        abort(reset: true)
        return .closed
    }

    /// Closes the socket without a word to the peer (it ended the link, or is gone).
    public func abort(reset: Bool) {
        if reset {
            // An abortive close: the socket's peer sees a reset, not an orderly end.
            var l = linger(l_onoff: 1, l_linger: 0)
            setsockopt(fd, SOL_SOCKET, SO_LINGER, &l, socklen_t(MemoryLayout<linger>.size))
        }
        close(fd)
    }

    private func readSocket(over conn: FramedConnection) -> State {
        var rounds = 0
        while !readClosed && credit > 0 && rounds < 16 && conn.pendingOutput < 1 << 20 {
            rounds += 1
            var readErrno: Int32 = 0
            let (n, _) = conn.sendInPlace(.tcpData, id: id, maxPayload: min(credit, TcpLimits.chunk)) { room in
                let got = read(fd, room.baseAddress!, room.count)
                if got < 0 { readErrno = errno }
                return got
            }
            if n > 0 {
                credit -= n
                continue
            }
            if n < 0 && (readErrno == EAGAIN || readErrno == EWOULDBLOCK || readErrno == EINTR) { return .open }
            if n < 0 { return reset(over: conn) }
            readClosed = true
            conn.send(Frame(.tcpShutdown, id: id))
        }
        return .open
    }

    private func writeInbound(over conn: FramedConnection) -> State {
        while !inbound.isEmpty {
            let r = inbound.readable
            let n = send(fd, r.baseAddress!, r.count, Int32(MSG_NOSIGNAL))
            if n > 0 {
                inbound.consume(n)
                unacknowledged += n
                continue
            }
            if n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR) { break }
            return reset(over: conn)
        }
        // Acknowledged in batches, and at once when the socket has taken everything.
        if unacknowledged > 0 && (inbound.isEmpty || unacknowledged >= TcpLimits.window / 4) {
            conn.send(TcpWindow(bytes: UInt32(unacknowledged)), id: id)
            unacknowledged = 0
        }
        if inbound.isEmpty && peerShutdown && !writeClosed {
            shutdown(fd, Int32(SHUT_WR))
            writeClosed = true
        }
        return .open
    }

    private func finishIfDone(over conn: FramedConnection) -> State {
        guard readClosed && writeClosed else { return .open }
        conn.send(Frame(.tcpClose, id: id))
        close(fd)
        return .closed
    }
}

/// TCP sockets for forwarded connections, non-blocking and close-on-exec. Addresses are IPv4
/// or IPv6 literals, or `localhost` (127.0.0.1): no name service is consulted.
public enum TcpSocket {
    /// A socket connecting to `host:port`; `inProgress` while the connect completes later.
    public static func connect(host: String, port: UInt16) throws(SystemError) -> (fd: Int32, inProgress: Bool) {
        let (family, address) = try resolve(host, port)
        let fd = socket(family, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_NONBLOCK.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { throw SystemError("socket") }
        var one: Int32 = 1
        setsockopt(fd, Int32(IPPROTO_TCP), TCP_NODELAY, &one, socklen_t(MemoryLayout<Int32>.size))
        let rc = address.withUnsafeBytes { Glibc.connect(fd, $0.baseAddress!.assumingMemoryBound(to: sockaddr.self), socklen_t($0.count)) }
        if rc == 0 { return (fd, false) }
        if errno == EINPROGRESS { return (fd, true) }
        let e = SystemError("connect to \(host):\(port)")
        close(fd)
        throw e
    }

    /// A socket listening on `host:port` (port 0: the kernel picks one), and its port.
    public static func listen(host: String, port: UInt16) throws(SystemError) -> (fd: Int32, port: UInt16) {
        let (family, address) = try resolve(host, port)
        let fd = socket(family, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_NONBLOCK.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { throw SystemError("socket") }
        var one: Int32 = 1
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, socklen_t(MemoryLayout<Int32>.size))
        let bound = address.withUnsafeBytes { bind(fd, $0.baseAddress!.assumingMemoryBound(to: sockaddr.self), socklen_t($0.count)) }
        guard bound == 0, Glibc.listen(fd, 128) == 0 else {
            let e = SystemError("listen on \(host):\(port)")
            close(fd)
            throw e
        }
        var storage = sockaddr_storage()
        var len = socklen_t(MemoryLayout<sockaddr_storage>.size)
        _ = withUnsafeMutablePointer(to: &storage) { getsockname(fd, UnsafeMutableRawPointer($0).assumingMemoryBound(to: sockaddr.self), &len) }
        let actual = withUnsafeBytes(of: storage) { raw -> UInt16 in
            // sin_port and sin6_port sit at the same offset, in network order.
            UInt16(raw[2]) << 8 | UInt16(raw[3])
        }
        return (fd, actual)
    }

    /// Accepts one connection: its socket (non-blocking) and the peer as text, or nil.
    public static func accept(_ listener: Int32) -> (fd: Int32, peer: String)? {
        var storage = sockaddr_storage()
        var len = socklen_t(MemoryLayout<sockaddr_storage>.size)
        let fd = withUnsafeMutablePointer(to: &storage) {
            Glibc.accept(listener, UnsafeMutableRawPointer($0).assumingMemoryBound(to: sockaddr.self), &len)
        }
        guard fd >= 0 else { return nil }
        _ = fcntl(fd, F_SETFD, FD_CLOEXEC)
        _ = fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK)
        var one: Int32 = 1
        setsockopt(fd, Int32(IPPROTO_TCP), TCP_NODELAY, &one, socklen_t(MemoryLayout<Int32>.size))
        return (fd, describe(storage))
    }

    /// Whether `host` is what these sockets take: an IP literal (IPv6 in brackets or not) or
    /// `localhost`.
    public static func isAddress(_ host: String) -> Bool { (try? resolve(host, 0)) != nil }

    static func resolve(_ host: String, _ port: UInt16) throws(SystemError) -> (Int32, [UInt8]) {
        let name = host == "localhost" ? "127.0.0.1" : host.hasPrefix("[") && host.hasSuffix("]") ? String(host.dropFirst().dropLast()) : host
        var v4 = sockaddr_in()
        if inet_pton(AF_INET, name, &v4.sin_addr) == 1 {
            v4.sin_family = sa_family_t(AF_INET)
            v4.sin_port = port.bigEndian
            return (AF_INET, withUnsafeBytes(of: v4) { Array($0) })
        }
        var v6 = sockaddr_in6()
        if inet_pton(AF_INET6, name, &v6.sin6_addr) == 1 {
            v6.sin6_family = sa_family_t(AF_INET6)
            v6.sin6_port = port.bigEndian
            return (AF_INET6, withUnsafeBytes(of: v6) { Array($0) })
        }
        throw SystemError("'\(host)' is not an IP address or localhost", errno: EINVAL)
    }

    static func describe(_ storage: sockaddr_storage) -> String {
        var text = [CChar](repeating: 0, count: 64)
        var s = storage
        return withUnsafeBytes(of: &s) { raw -> String in
            let port = UInt16(raw[2]) << 8 | UInt16(raw[3])
            if storage.ss_family == sa_family_t(AF_INET) {
                inet_ntop(AF_INET, raw.baseAddress! + 4, &text, socklen_t(text.count))
                return "\(string(fromCBuffer: text)):\(port)"
            }
            inet_ntop(AF_INET6, raw.baseAddress! + 8, &text, socklen_t(text.count))
            return "[\(string(fromCBuffer: text))]:\(port)"
        }
    }
}
