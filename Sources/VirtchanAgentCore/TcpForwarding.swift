import Glibc
import VirtchanProtocol

/// Forwarded TCP connections: the host asks for a connection from the guest (tcpConnect) or
/// for a guest port to listen on (tcpListen); each connection then runs as a ``TcpLink``.
extension Agent {
    func startTcpConnect(_ request: TcpConnect, id: UInt32) {
        guard tcpLinks[id] == nil, tcpListeners[id] == nil else { return fail(id, .badRequest, "request \(id) is already a connection") }
        guard tcpLinks.count < TcpLimits.maxConnections else {
            return fail(id, .busy, "\(TcpLimits.maxConnections) forwarded connections are already open in this session")
        }
        do {
            let (fd, inProgress) = try TcpSocket.connect(host: request.host, port: request.port)
            tcpLinks[id] = TcpLink(id: id, fd: fd, connecting: inProgress)
            if !inProgress { control?.send(Frame(.tcpConnected, id: id)) }
            log.debug("tcp \(id): to \(request.host):\(request.port)")
        } catch {
            fail(id, .failed, errno: error.errno, "cannot connect to \(request.host):\(request.port) in the guest: \(error)")
        }
    }

    func startTcpListen(_ request: TcpListen, id: UInt32) {
        guard tcpLinks[id] == nil, tcpListeners[id] == nil else { return fail(id, .badRequest, "request \(id) is already a listener") }
        guard tcpListeners.count < TcpLimits.maxListeners else {
            return fail(id, .busy, "\(TcpLimits.maxListeners) guest ports are already listened on in this session")
        }
        do {
            let (fd, port) = try TcpSocket.listen(host: request.host, port: request.port)
            tcpListeners[id] = fd
            reply(TcpListening(port: port), id: id)
            log.debug("tcp \(id): listening on \(request.host):\(port)")
        } catch {
            fail(id, .failed, errno: error.errno, "cannot listen on \(request.host):\(request.port) in the guest: \(error)")
        }
    }

    /// tcpData, tcpWindow, tcpShutdown or tcpClose from the host.
    func tcpFrame(_ frame: Frame, on control: FramedConnection) {
        if let link = tcpLinks[frame.id] {
            if link.receive(frame, over: control) == .closed { tcpLinks[frame.id] = nil }
        } else if frame.type == .tcpClose, let fd = tcpListeners.removeValue(forKey: frame.id) {
            close(fd)
            log.debug("tcp \(frame.id): no longer listening")
        }
        // Anything else is for a connection that has just ended: nothing to do.
    }

    func acceptTcp(on listenID: UInt32, _ fd: Int32, over control: FramedConnection) {
        while tcpLinks.count < TcpLimits.maxConnections, let (conn, peer) = TcpSocket.accept(fd) {
            // (All ones is the id a holder keeps for its own pings.)
            repeat { nextTcpID = (nextTcpID &+ 1) | TcpLimits.agentIDBit } while tcpLinks[nextTcpID] != nil || nextTcpID == .max
            tcpLinks[nextTcpID] = TcpLink(id: nextTcpID, fd: conn)
            control.send(TcpAccepted(connection: nextTcpID, peer: peer), id: listenID)
        }
    }

    func serviceTcp(_ link: TcpLink, _ revents: Int16, over control: FramedConnection) {
        let wasConnecting = link.connecting
        if link.service(revents, over: control) == .closed {
            tcpLinks[link.id] = nil
            if wasConnecting && link.connectError != 0 {
                fail(link.id, .failed, errno: link.connectError, "cannot connect in the guest: \(errnoText(link.connectError))")
            }
        } else if wasConnecting && !link.connecting {
            control.send(Frame(.tcpConnected, id: link.id))
        }
    }

    func closeAllTcp() {
        for link in tcpLinks.values { link.abort(reset: true) }
        tcpLinks = [:]
        for fd in tcpListeners.values { close(fd) }
        tcpListeners = [:]
    }
}
