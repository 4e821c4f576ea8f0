import Glibc
import VirtchanProtocol

/// One forwarded port, as ssh writes it: `[BIND:]PORT:HOST:HOSTPORT`.
///
/// Local (`-L`): the host listens on BIND:PORT (default 127.0.0.1), and each connection
/// reaches HOST:HOSTPORT as the guest sees it. Remote (`-R`): the guest listens on BIND:PORT
/// (default 127.0.0.1), and each connection reaches HOST:HOSTPORT as this host sees it.
/// The guest's side takes IP literals (IPv6 in brackets) or `localhost`; this host's side may
/// also be a name (see ``resolved()``). PORT 0 picks a free one.
public struct ForwardSpec: Sendable, Equatable, CustomStringConvertible {
    public enum Direction: Sendable { case local, remote }
    public var direction: Direction
    public var bindHost: String
    public var bindPort: UInt16
    public var targetHost: String
    public var targetPort: UInt16

    public init(direction: Direction, bindHost: String = "127.0.0.1", bindPort: UInt16, targetHost: String, targetPort: UInt16) {
        self.direction = direction
        self.bindHost = bindHost
        self.bindPort = bindPort
        self.targetHost = targetHost
        self.targetPort = targetPort
    }

    /// Reads `[BIND:]PORT:HOST:HOSTPORT`; nil when it is not that.
    public init?(_ text: String, direction: Direction) {
        // Split at colons outside brackets, so that [::1] stays whole.
        var parts: [String] = []
        var current = ""
        var depth = 0
        for ch in text {
            if ch == "[" { depth += 1 } else if ch == "]" { depth -= 1 }
            if ch == ":" && depth == 0 { parts.append(current); current = "" } else { current.append(ch) }
        }
        parts.append(current)
        guard parts.count == 3 || parts.count == 4 else { return nil }
        let bind = parts.count == 4 ? parts[0] : "127.0.0.1"
        let rest = parts.suffix(3).map { $0 }
        guard let port = UInt16(rest[0]), let targetPort = UInt16(rest[2]), targetPort > 0,
              !rest[1].isEmpty, !bind.isEmpty else { return nil }
        self.init(direction: direction, bindHost: bind, bindPort: port, targetHost: rest[1], targetPort: targetPort)
    }

    public var description: String {
        "\(bindHost):\(bindPort):\(targetHost):\(targetPort)"
    }

    /// The address this host binds (`-L`) or connects to (`-R`).
    public var hostSide: String { direction == .local ? bindHost : targetHost }
    /// The address the guest connects to (`-L`) or binds (`-R`).
    public var guestSide: String { direction == .local ? targetHost : bindHost }

    /// This spec with a name on this host's side looked up once, now, in this host's name
    /// service (as ssh does), so that a name that does not resolve fails at start and not at
    /// each connection. A name on the guest's side is refused: the agent looks up no names,
    /// since a slow lookup would stall its one loop.
    public func resolved() throws(TransportError) -> ForwardSpec {
        try checkGuestSide()
        guard !TcpSocket.isAddress(hostSide) else { return self }
        var spec = self
        let address = try Self.lookUp(hostSide)
        if direction == .local { spec.bindHost = address } else { spec.targetHost = address }
        return spec
    }

    /// Throws unless the guest's side is an address or `localhost`.
    public func checkGuestSide() throws(TransportError) {
        guard TcpSocket.isAddress(guestSide) else {
            throw TransportError(.invalidArgument, "'\(guestSide)' is a name: in the guest give an IP address or localhost (the agent looks up no names)")
        }
    }

    /// The first address `name` has in this host's name service, as a literal (IPv6 in brackets).
    static func lookUp(_ name: String) throws(TransportError) -> String {
        var hints = addrinfo()
        hints.ai_family = AF_UNSPEC
        hints.ai_socktype = Int32(SOCK_STREAM.rawValue)
        var list: UnsafeMutablePointer<addrinfo>?
        let rc = getaddrinfo(name, nil, &hints, &list)
        defer { if let list { freeaddrinfo(list) } }
        guard rc == 0, let first = list?.pointee else {
            let why = rc == EAI_SYSTEM ? String(cString: strerror(errno)) : String(cString: gai_strerror(rc))
            throw TransportError(.invalidArgument, "cannot look up '\(name)' on this host: \(why)")
        }
        var text = [CChar](repeating: 0, count: Int(NI_MAXHOST))
        guard getnameinfo(first.ai_addr, first.ai_addrlen, &text, socklen_t(text.count), nil, 0, NI_NUMERICHOST) == 0 else {
            throw TransportError(.invalidArgument, "cannot look up '\(name)' on this host")
        }
        let address = string(fromCBuffer: text)
        return first.ai_family == AF_INET6 ? "[\(address)]" : address
    }
}

/// Serves forwarded ports over an agent session until interrupted: any number of TCP
/// connections in both directions, each a ``TcpLink`` with its own flow control, side by side
/// with whatever else the session's holder runs on the domain.
public final class PortForwarder {
    /// A port being served, as it ended up bound (port 0 replaced by the one picked).
    public struct Bound: Sendable, CustomStringConvertible {
        public let spec: ForwardSpec
        public let port: UInt16
        public var description: String {
            spec.direction == .local
                ? "\(spec.bindHost):\(port) -> guest \(spec.targetHost):\(spec.targetPort)"
                : "guest \(spec.bindHost):\(port) -> \(spec.targetHost):\(spec.targetPort)"
        }
    }

    private let session: AgentSession
    private let specs: [ForwardSpec]
    private let note: (String) -> Void
    private var listeners: [(fd: Int32, spec: ForwardSpec)] = []
    /// Guest listeners by request id.
    private var guestListeners: [UInt32: ForwardSpec] = [:]
    private var links: [UInt32: TcpLink] = [:]
    public private(set) var bound: [Bound] = []
    /// ``stop()`` writes to it; ``run(agentSilenceLimit:keepalive:)`` polls it.
    private var stopPipe: [Int32] = [-1, -1]

    /// `note` hears about connections that fail (a guest service that refuses, say).
    public init(session: AgentSession, specs: [ForwardSpec], note: @escaping (String) -> Void = { _ in }) {
        self.session = session
        self.specs = specs
        self.note = note
        if pipe(&stopPipe) == 0 { for fd in stopPipe { _ = fcntl(fd, F_SETFD, FD_CLOEXEC) } }
    }

    deinit {
        for fd in stopPipe where fd >= 0 { close(fd) }
        for l in listeners { close(l.fd) }
        for link in links.values { link.abort(reset: true) }
    }

    /// Binds the host's ports and asks the agent for the guest's; throws when any of them
    /// cannot be had, leaving none bound.
    public func start() throws(TransportError) {
        guard session.hello.capabilities.contains(Capability.tcpForward) else {
            throw TransportError(.invalidArgument, "the agent in \(session.endpoint.domain) does not forward TCP connections (version \(session.hello.agentVersion)); update the agent")
        }
        var resolved: [ForwardSpec] = []
        for spec in specs { resolved.append(try spec.resolved()) }
        for spec in resolved {
            switch spec.direction {
            case .local:
                do {
                    let (fd, port) = try TcpSocket.listen(host: spec.bindHost, port: spec.bindPort)
                    listeners.append((fd, spec))
                    bound.append(Bound(spec: spec, port: port))
                } catch {
                    throw TransportError(.io, "cannot listen on \(spec.bindHost):\(spec.bindPort): \(String(cString: strerror(error.errno)))")
                }
            case .remote:
                let id = session.newID()
                let reply = try session.request(TcpListen(host: spec.bindHost, port: spec.bindPort).frame(id: id))
                let listening = try decodeOrThrow(TcpListening.self, reply)
                guestListeners[id] = spec
                bound.append(Bound(spec: spec, port: listening.port))
            }
        }
    }

    /// Makes ``run(agentSilenceLimit:keepalive:)`` return; callable from any thread.
    public func stop() {
        var b: UInt8 = 1
        _ = write(stopPipe[1], &b, 1)
    }

    /// Serves until ``stop()``, a signal (``Interruption``, thrown) or the end of the session
    /// (thrown, with the reason); connections still open are then reset.
    public func run(agentSilenceLimit: Double = 30, keepalive: Double = 5) throws(TransportError) {
        let control = session.control
        var lastHeard = monotonicNanos()
        var lastPing: UInt64 = 0
        while true {
            while let frame = control.decoder.next() {
                lastHeard = monotonicNanos()
                handle(frame, over: control)
            }
            let outputRoom = control.pendingOutput < 1 << 20
            var fds = [Poller.interest(control), pollfd(fd: stopPipe[0], events: Int16(POLLIN), revents: 0)]
            // A listener is not polled while nothing could be accepted anyway.
            let listenSlots = outputRoom && links.count < TcpLimits.maxConnections ? listeners : []
            for l in listenSlots { fds.append(pollfd(fd: l.fd, events: Int16(POLLIN), revents: 0)) }
            var linkSlots: [TcpLink] = []
            for link in links.values {
                let events = link.events(outputRoom: outputRoom)
                guard events != 0 else { continue }
                linkSlots.append(link)
                fds.append(pollfd(fd: link.fd, events: events, revents: 0))
            }
            try Poller.wait(&fds, milliseconds: 1000)
            if fds[1].revents != 0 {
                for link in links.values { link.reset(over: control) }
                links = [:]
                try? session.flush(timeout: 2)
                return
            }

            let now = monotonicNanos()
            let silence = Double(now - min(now, lastHeard)) / 1e9
            if silence > agentSilenceLimit {
                throw TransportError(.agentGone, "the agent in \(session.endpoint.domain) stopped answering (nothing for \(Int(silence)) s)" + session.endpoint.silentLinkHint)
            }
            if silence > keepalive && Double(now - lastPing) / 1e9 > keepalive {
                control.send(Frame(.ping, id: 0))
                lastPing = now
            }
            if fds[0].revents & Int16(POLLIN | POLLHUP | POLLERR) != 0 {
                let outcome: ReadOutcome
                do { outcome = try control.fill() } catch {
                    throw TransportError(.agentGone, "the control channel failed: \(error)")
                }
                if outcome == .eof {
                    throw TransportError(.agentGone, "the control channel closed (the domain stopped, or its holder ended)")
                }
            }
            for (i, l) in listenSlots.enumerated() where fds[2 + i].revents != 0 {
                accept(l.fd, l.spec, over: control)
            }
            for (i, link) in linkSlots.enumerated() {
                let revents = fds[2 + listenSlots.count + i].revents
                guard revents != 0, links[link.id] === link else { continue }
                service(link, revents, over: control)
            }
            do { try control.flush() } catch {
                throw TransportError(.agentGone, "the control channel closed: \(error)")
            }
        }
    }

    private func accept(_ fd: Int32, _ spec: ForwardSpec, over control: FramedConnection) {
        while links.count < TcpLimits.maxConnections, let (conn, _) = TcpSocket.accept(fd) {
            let id = session.newID() & ~TcpLimits.agentIDBit
            links[id] = TcpLink(id: id, fd: conn)
            control.send(TcpConnect(host: spec.targetHost, port: spec.targetPort), id: id)
        }
    }

    private func service(_ link: TcpLink, _ revents: Int16, over control: FramedConnection) {
        let wasConnecting = link.connecting
        guard link.service(revents, over: control) == .closed else { return }
        links[link.id] = nil
        if wasConnecting && link.connectError != 0 {
            // A guest connection whose host service is not there: the guest's client is reset.
            control.send(Frame(.tcpClose, id: link.id, flags: tcpCloseReset))
            note("cannot connect to the forwarded service: \(String(cString: strerror(link.connectError)))")
        }
    }

    private func handle(_ frame: Frame, over control: FramedConnection) {
        if let link = links[frame.id] {
            if frame.type == .error, let e = try? ErrorMessage.decode(frame) { note(displaySafe(e.message)) }
            if link.receive(frame, over: control) == .closed { links[frame.id] = nil }
            return
        }
        guard frame.type == .tcpAccepted, let spec = guestListeners[frame.id], let accepted = try? TcpAccepted.decode(frame) else {
            // A listener that failed later, or a frame for a connection that just ended.
            if frame.type == .error, guestListeners[frame.id] != nil, let e = try? ErrorMessage.decode(frame) { note(displaySafe(e.message)) }
            return
        }
        // The guest names the new connection: it must be one of the agent's ids, not in use, and
        // within the limit, or the guest's client is reset.
        guard accepted.connection & TcpLimits.agentIDBit != 0, links[accepted.connection] == nil,
              links.count < TcpLimits.maxConnections else {
            if links[accepted.connection] == nil { control.send(Frame(.tcpClose, id: accepted.connection, flags: tcpCloseReset)) }
            return
        }
        do {
            let (fd, inProgress) = try TcpSocket.connect(host: spec.targetHost, port: spec.targetPort)
            links[accepted.connection] = TcpLink(id: accepted.connection, fd: fd, connecting: inProgress)
        } catch {
            control.send(Frame(.tcpClose, id: accepted.connection, flags: tcpCloseReset))
            note("cannot connect to \(spec.targetHost):\(spec.targetPort) for \(displaySafe(accepted.peer, limit: 64)) in the guest: \(String(cString: strerror(error.errno)))")
        }
    }
}
