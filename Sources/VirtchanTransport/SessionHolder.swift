import Glibc
import VirtchanProtocol

/// The process that holds one domain's channels and serves every virtchan process on this
/// host that works on the domain, in the manner of an ssh ControlMaster.
///
/// The channels take one client each (QEMU's socket, and libvirt's channel stream too), so one
/// process keeps them: it holds one agent session on the control channel and relays each
/// client's requests under ids of its own; the agent runs them side by side. Transfers take
/// turns on the data channel: the holder lends its descriptor to one client at a time, and a
/// client that waits is told how many are ahead. The holder ends when the agent's channel
/// closes, when the agent stops answering, or after `persist` seconds without clients.
///
/// Everything runs on one thread in one poll loop; no client can stall another: a client that
/// stops reading has its own commands' output paused in the agent (`execFlow`), and one that
/// lets 64 MiB pile up is dropped.
public final class SessionHolder {
    public struct Options: Sendable {
        /// Seconds to stay after the last client left; 0 ends with the last client.
        public var persist: Double = 60
        /// Seconds between keepalive pings while the agent is otherwise silent.
        public var keepalive: Double = 5
        /// After this long without an answer to a ping, the session is started anew (an agent
        /// that restarts says so at once; this catches one that hung or died).
        public var silenceLimit: Double = 30
        public init() {}
    }

    /// Opens the data channel (its local socket, or a libvirt stream): on first use, and after a
    /// transfer was cut off.
    public typealias DataOpener = () throws -> Int32

    private final class Client {
        let conn: FramedConnection
        var isData = false
        /// The client's request ids and the holder's id for each.
        var requests: [UInt32: UInt32] = [:]
        /// Holder ids of this client's commands whose output the agent was asked to pause.
        var paused: Set<UInt32> = []
        /// The command that started the holder: the agent answered its handshake while this
        /// client waited, so its first hello needs no ping of its own.
        var startedHolder = false
        init(fd: Int32) { conn = FramedConnection(fd: fd) }
    }

    private struct Route {
        let client: Client
        let clientID: UInt32
        let kind: MessageType
        var started = false
    }

    static let clientOutputLimit = 64 << 20
    /// Bytes queued for the agent beyond which no client's input is read.
    static let agentBacklogLimit = 4 << 20
    static let pauseAbove = 1 << 20
    static let resumeBelow = 256 << 10
    static let maxRequestsPerClient = 1024
    private static let keepaliveID: UInt32 = 0xFFFF_FFFF

    private let agent: AgentSession
    private let listener: Int32
    private let socketPath: String
    private let options: Options
    private let openData: DataOpener
    private var dataFD: Int32 = -1
    /// A transfer on the data channel ended before its end: reconnect before the next.
    private var dataDirty = false
    private var clients: [Client] = []
    private var routes: [UInt32: Route] = [:]
    private var nextID: UInt32 = 0
    private var dataQueue: [Client] = []
    private var dataHolder: Client?
    private var lastHeard: UInt64
    private var pingSent: UInt64 = 0
    /// The agent said it is stopping: until a new session, hellos wait for the next agent.
    private var agentStopping = false
    /// An agent heard from this recently vouches for itself: a client's hello is answered with
    /// no ping, so a script's commands one after another each save a round trip to the guest.
    private static let freshness: UInt64 = 500_000_000

    private var agentSpokeJustNow: Bool {
        !agentStopping && pingSent == 0 && monotonicNanos() - lastHeard < Self.freshness
    }
    private var idleSince: UInt64
    /// The socket is gone and no new client can come; serve those left, then end.
    private var draining = false
    /// Clients' hellos waiting for the agent to prove it is there (a pong, or a new session).
    private var pendingHellos: [(client: Client, id: UInt32, nonce: [UInt8])] = []
    private let canPause: Bool
    private let log: (String) -> Void

    /// Takes over `agent` (an authenticated session on the domain's control channel) and the
    /// bound, listening `listener`, and serves until the end (see the type's description).
    /// `starter`: a connection to the command that started this holder, open before the holder
    /// was (one end of a socket pair), served as its first client.
    public init(agent: AgentSession, listener: Int32, socketPath: String, options: Options,
                openData: @escaping DataOpener, starter: Int32? = nil, log: @escaping (String) -> Void) {
        self.agent = agent
        self.listener = listener
        self.socketPath = socketPath
        self.options = options
        self.openData = openData
        self.log = log
        lastHeard = monotonicNanos()
        idleSince = lastHeard
        canPause = agent.hello.capabilities.contains(Capability.execFlow)
        if let starter {
            setNonBlocking(starter)
            let c = Client(fd: starter)
            c.startedHolder = true
            clients.append(c)
        }
    }

    /// The answer to a client's hello: the agent's own, marked as a shared session.
    private func helloAck(nonce: [UInt8]) -> HelloAck {
        let h = agent.hello
        var caps = h.capabilities
        caps.append(Capability.heldSession)
        return HelloAck(nonce: nonce, version: h.version, agentVersion: h.agentVersion, capabilities: caps, challenge: [])
    }

    /// Serves until the end; returns why it ended. `afterFirstPass` runs once the first events
    /// were served (the starting command's hello among them): work that nobody waits for.
    public func run(afterFirstPass: () -> Void = {}) -> String {
        let control = agent.control
        var firstPass = true
        while true {
            var fds = [pollfd(fd: listener, events: Int16(POLLIN), revents: 0),
                       pollfd(fd: control.fd, events: Int16(POLLIN) | (control.pendingOutput > 0 ? Int16(POLLOUT) : 0), revents: 0)]
            // While the agent is not taking what is queued for it, clients wait for it to.
            let takeInput = control.pendingOutput < Self.agentBacklogLimit
            for c in clients {
                fds.append(pollfd(fd: c.conn.fd, events: (takeInput ? Int16(POLLIN) : 0) | (c.conn.pendingOutput > 0 ? Int16(POLLOUT) : 0), revents: 0))
            }
            let rc = poll(&fds, nfds_t(fds.count), 1000)
            if rc < 0 && errno != EINTR { return "poll failed: \(String(cString: strerror(errno)))" }
            var now = monotonicNanos()

            if fds[1].revents & Int16(POLLIN | POLLHUP | POLLERR) != 0 {
                let outcome: ReadOutcome
                do { outcome = try control.fill() } catch { return "the control channel failed: \(error)" }
                if outcome == .eof { return "the control channel closed (the domain stopped, or its connection was lost)" }
                lastHeard = now
                pingSent = 0
                var restarted = false
                while let frame = control.decoder.next() {
                    if frame.type == .agentStarted { restarted = true; continue }
                    if frame.type == .agentStopping {
                        // Logged once per session: a guest that repeats it must not fill the log.
                        if !agentStopping { log("the agent is stopping (the guest shuts down or reboots?)") }
                        agentStopping = true
                        // It has ended its commands and transfers: nothing in flight will end.
                        failRequests(becauseTheAgent: "stopped (the guest shuts down or reboots?)")
                        continue
                    }
                    fromAgent(frame)
                }
                if restarted, let end = renewSession("restarted") { return end }
            }
            // Clients in the order they were polled; a client dropped on the way is skipped.
            let polled = clients
            for (i, c) in polled.enumerated() where clients.contains(where: { $0 === c }) {
                let re = fds[2 + i].revents
                if re & Int16(POLLIN | POLLHUP | POLLERR) != 0 { fromClient(c) }
            }
            if fds[0].revents & Int16(POLLIN) != 0 { accept() }

            for c in clients where c.conn.pendingOutput > 0 {
                do { try c.conn.flush() } catch { drop(c, "cannot write to it"); continue }
                if !c.paused.isEmpty && c.conn.pendingOutput < Self.resumeBelow {
                    for id in c.paused where routes[id] != nil { control.send(Frame(.execFlow, id: id)) }
                    c.paused = []
                }
            }
            if control.pendingOutput > 0 {
                do { try control.flush() } catch { return "the control channel failed: \(error)" }
            }
            if firstPass {
                firstPass = false
                afterFirstPass()
            }
            // A renewed session may have taken a while.
            now = max(now, monotonicNanos())

            // Keepalive: a guest that rebooted under us (QEMU's socket stays) answers nothing.
            // Stamps taken later in this pass (a ping just sent) count as no time at all.
            func since(_ t: UInt64) -> UInt64 { now > t ? now - t : 0 }
            if since(lastHeard) > nanoseconds(options.keepalive) { pingAgent() }
            if pingSent != 0 && since(pingSent) > nanoseconds(options.silenceLimit),
               let end = renewSession("stopped answering for \(formatSeconds(options.silenceLimit))") {
                return end
            }
            if let sig = Interruption.pending { return "stopped by signal \(sig)" }
            if clients.isEmpty {
                if draining { return "idle for \(formatSeconds(options.persist))" }
                if since(idleSince) >= nanoseconds(options.persist) {
                    // New clients find no socket (and start a holder of their own once this
                    // one lets go of its lock); one that connected just before is still served.
                    unlink(socketPath)
                    draining = true
                    accept()
                    if clients.isEmpty { return "idle for \(formatSeconds(options.persist))" }
                }
            } else {
                idleSince = now
            }
        }
    }

    /// Ends the holder: every client sees its connection close, and the socket goes.
    public func shutDown(reason: String) {
        for c in clients {
            // Requests still open get a reason before the connection closes.
            for (clientID, _) in c.requests {
                c.conn.send(ErrorMessage(.failed, errno: 0, "the session holder ended: \(reason)"), id: clientID)
            }
            _ = try? c.conn.flush()
            close(c.conn.fd)
        }
        clients = []
        if !draining { unlink(socketPath) }
        close(listener)
        if dataFD >= 0 { close(dataFD) }
    }

    /// The agent restarted (or went silent): every request in flight ends with an error, and
    /// a new session begins as soon as the agent answers; clients wait meanwhile, and their
    /// connections stay. Returns why the holder must end instead, or nil.
    private func renewSession(_ what: String) -> String? {
        log("the agent \(what); starting a new session")
        failRequests(becauseTheAgent: "\(what) (did the guest reboot?)")
        let giveUp = monotonicNanos() + 300_000_000_000
        while true {
            do {
                try agent.renew(timeout: 5)
                log("new session (agent \(agent.hello.agentVersion))")
                lastHeard = monotonicNanos()
                pingSent = 0
                agentStopping = false
                answerHellos()
                return nil
            } catch {
                if error.code != .timeout { return "the control channel failed: \(error)" }
                if monotonicNanos() > giveUp { return "the agent did not come back within 300 s" }
            }
        }
    }

    /// Ends every request in flight with an error that says why: the agent that had them is gone.
    private func failRequests(becauseTheAgent what: String) {
        let domain = agent.endpoint.domain
        for (_, route) in routes {
            route.client.conn.send(ErrorMessage(.agentRestarted, errno: 0, "the agent in \(domain) \(what); what this request did is unknown"),
                                   id: route.clientID)
            route.client.requests[route.clientID] = nil
        }
        routes = [:]
        dataDirty = true
        for c in clients {
            c.paused = []
            _ = try? c.conn.flush()
        }
    }

    /// Asks the agent for a sign of life, unless a question is already out.
    private func pingAgent() {
        guard pingSent == 0 else { return }
        agent.control.send(Frame(.ping, id: Self.keepaliveID))
        pingSent = monotonicNanos()
    }

    private func answerHellos() {
        for (client, id, nonce) in pendingHellos where clients.contains(where: { $0 === client }) {
            client.conn.send(helloAck(nonce: nonce), id: id)
        }
        pendingHellos = []
    }

    // MARK: clients

    private func accept() {
        while true {
            let fd = Glibc.accept(listener, nil, nil)
            if fd < 0 { return }
            _ = fcntl(fd, F_SETFD, FD_CLOEXEC)
            setNonBlocking(fd)
            guard let peer = UnixSocket.peerCredentials(fd), peer.uid == 0 || peer.uid == geteuid() else {
                log("refused a client of another user")
                close(fd)
                continue
            }
            clients.append(Client(fd: fd))
        }
    }

    private func fromClient(_ c: Client) {
        let outcome: ReadOutcome
        do { outcome = try c.conn.fill(limit: 1 << 20) } catch { return drop(c, "read failed") }
        if outcome == .eof { return drop(c, nil) }
        while clients.contains(where: { $0 === c }), let frame = c.conn.decoder.next() {
            switch frame.type {
            case .hello:
                // A client must not be told the agent is there while it restarts or hangs: the
                // hello is answered once the agent has answered a ping sent now, or at once when
                // the agent spoke a moment ago and has not said it is stopping. (A guest reset
                // within that moment fails the client's first request, saying so.)
                guard let hello = try? Hello.decode(frame) else { continue }
                if c.startedHolder || agentSpokeJustNow {
                    c.startedHolder = false
                    c.conn.send(helloAck(nonce: hello.nonce), id: frame.id)
                    continue
                }
                pendingHellos.append((c, frame.id, hello.nonce))
                pingAgent()
            case .dataPortRequest:
                guard !c.isData else { continue }
                c.isData = true
                dataQueue.append(c)
                grantData()
                if dataHolder !== c {
                    var w = ByteWriter()
                    w.u32(UInt32(dataQueue.firstIndex(where: { $0 === c }) ?? 0) + 1)
                    c.conn.send(Frame(.dataPortQueued, id: frame.id, payload: w.bytes))
                }
            case .authProof, .helloAck, .dataPortQueued, .dataPortGrant:
                continue
            default:
                relay(frame, from: c)
            }
        }
    }

    /// A client's frame goes to the agent under the holder's id for its request.
    private func relay(_ frame: Frame, from c: Client) {
        var out = frame
        if let id = c.requests[frame.id] {
            out.id = id
        } else {
            switch frame.type {
            case .ping, .infoRequest, .execStart, .pushRequest, .pullRequest, .statRequest, .mkdir, .symlink, .listTree,
                 .tcpConnect, .tcpListen:
                guard c.requests.count < Self.maxRequestsPerClient else {
                    c.conn.send(ErrorMessage(.busy, errno: 0, "too many requests at once on one connection"), id: frame.id)
                    return
                }
                // The holder's ids stay clear of those the agent gives accepted connections.
                repeat { nextID = (nextID &+ 1) & ~TcpLimits.agentIDBit } while nextID == 0 || routes[nextID] != nil
                c.requests[frame.id] = nextID
                routes[nextID] = Route(client: c, clientID: frame.id, kind: frame.type)
                out.id = nextID
            default:
                // A follow-up (input, signal, abort) for a request that has ended.
                return
            }
        }
        agent.control.send(out)
        // The agent does not answer a tcpClose: the connection (or listener) ends here.
        if frame.type == .tcpClose {
            routes[out.id] = nil
            c.requests[frame.id] = nil
        }
    }

    /// A client went away: its commands are killed and its transfers aborted, as the agent
    /// would do for a client of its own that hung up.
    private func drop(_ c: Client, _ why: String?) {
        if let why { log("dropped a client: \(why)") }
        for (_, id) in c.requests {
            guard let route = routes.removeValue(forKey: id) else { continue }
            switch route.kind {
            case .execStart:
                var w = ByteWriter()
                w.i32(SIGKILL)
                agent.control.send(Frame(.execSignal, id: id, payload: w.bytes))
                // Paused output would keep the finished command in the agent: let it drain.
                if c.paused.contains(id) { agent.control.send(Frame(.execFlow, id: id)) }
            case .pushRequest, .pullRequest:
                agent.control.send(Frame(.abort, id: id))
                dataDirty = true
            case .tcpConnect, .tcpListen, .tcpAccepted:
                agent.control.send(Frame(.tcpClose, id: id, flags: tcpCloseReset))
            default:
                break
            }
        }
        c.requests = [:]
        close(c.conn.fd)
        clients.removeAll { $0 === c }
        pendingHellos.removeAll { $0.client === c }
        dataQueue.removeAll { $0 === c }
        if dataHolder === c {
            dataHolder = nil
            if dataDirty {
                // A transfer was cut off: QEMU may still hold some of its bytes, and a port the
                // guest closed mid-stream is not reliably served again on that connection. The
                // next turn gets a fresh one, as a command of its own would make.
                close(dataFD)
                dataFD = -1
            }
            grantData()
        }
    }

    // MARK: the data channel

    /// Lends the data channel to the first client waiting for it; tells the others their place.
    private func grantData() {
        guard dataHolder == nil, !dataQueue.isEmpty else { return }
        let next = dataQueue.removeFirst()
        if dataFD < 0 {
            do {
                dataFD = try openData()
            } catch {
                next.conn.send(ErrorMessage(.failed, errno: 0, "cannot open the data channel: \(error)"), id: 1)
                return
            }
            if dataDirty {
                discardStaleBytes(dataFD)
                dataDirty = false
            }
        }
        // Ahead of the frame: anything still queued for this client must reach it first.
        _ = try? next.conn.flush()
        guard HolderLink.send(Frame(.dataPortGrant, id: 1), passing: dataFD, over: next.conn.fd) else {
            drop(next, "cannot pass the data channel")
            return
        }
        dataHolder = next
        for (i, waiting) in dataQueue.enumerated() {
            var w = ByteWriter()
            w.u32(UInt32(i + 2))
            waiting.conn.send(Frame(.dataPortQueued, id: 1, payload: w.bytes))
        }
    }

    /// What QEMU still held of a cut-off transfer arrives as soon as a new connection opens:
    /// read it off until the channel has been quiet for 100 ms (1 s at most), so that no
    /// partial frame of it precedes the next transfer's frames.
    private func discardStaleBytes(_ fd: Int32) {
        var buffer = [UInt8](repeating: 0, count: 64 << 10)
        let giveUp = monotonicNanos() + 1_000_000_000
        var discarded = 0
        while monotonicNanos() < giveUp {
            var p = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
            guard poll(&p, 1, 100) > 0 else { break }
            let n = buffer.withUnsafeMutableBytes { read(fd, $0.baseAddress!, $0.count) }
            if n <= 0 && !(n < 0 && (errno == EINTR || errno == EAGAIN)) { break }
            discarded += max(n, 0)
        }
        if discarded > 0 { log("discarded \(discarded) bytes of a cut-off transfer") }
    }

    // MARK: the agent

    private func fromAgent(_ frame: Frame) {
        if frame.id == Self.keepaliveID {
            if frame.type == .pong { answerHellos() }
            return
        }
        guard var route = routes[frame.id] else { return }
        let c = route.client
        if frame.type == .tcpAccepted {
            // A connection a guest listener accepted joins the listener's client, under the id
            // the agent gave it, which must be one of the agent's own and new.
            guard route.kind == .tcpListen, let accepted = try? TcpAccepted.decode(frame),
                  accepted.connection & TcpLimits.agentIDBit != 0, routes[accepted.connection] == nil,
                  c.requests[accepted.connection] == nil, c.requests.count < Self.maxRequestsPerClient else {
                if let accepted = try? TcpAccepted.decode(frame), routes[accepted.connection] == nil {
                    agent.control.send(Frame(.tcpClose, id: accepted.connection, flags: tcpCloseReset))
                }
                return
            }
            routes[accepted.connection] = Route(client: c, clientID: accepted.connection, kind: .tcpAccepted)
            c.requests[accepted.connection] = accepted.connection
        }
        var out = frame
        out.id = route.clientID
        if frame.type == .dataReady, var ready = try? DataReady.decode(frame) {
            // The data port carries the agent's id for the transfer; the client must use it.
            ready.dataID = frame.id
            out = ready.frame(id: route.clientID)
        }
        c.conn.send(out)
        if frame.type == .execOutput && canPause && c.conn.pendingOutput > Self.pauseAbove && !c.paused.contains(frame.id) {
            c.paused.insert(frame.id)
            agent.control.send(Frame(.execFlow, id: frame.id, flags: execFlowPause))
        }
        if c.conn.pendingOutput > Self.clientOutputLimit {
            return drop(c, "it stopped reading (\(Self.clientOutputLimit >> 20) MiB waiting)")
        }
        if frame.type == .execStarted { route.started = true; routes[frame.id] = route }
        if ends(route, frame) {
            if frame.type == .error && (route.kind == .pushRequest || route.kind == .pullRequest) { dataDirty = true }
            routes[frame.id] = nil
            c.requests[route.clientID] = nil
            c.paused.remove(frame.id)
        }
    }

    /// Whether `frame` is the agent's last word on the request.
    private func ends(_ route: Route, _ frame: Frame) -> Bool {
        switch route.kind {
        case .execStart:
            return frame.type == .execExit || (frame.type == .error && !route.started)
        case .pushRequest, .pullRequest:
            return frame.type == .transferDone || frame.type == .error
        case .listTree:
            return frame.type == .error || (frame.type == .treeEntries && frame.flags & treeEntriesLast != 0)
        case .tcpConnect, .tcpAccepted, .tcpListen:
            return frame.type == .tcpClose || frame.type == .error
        default:
            return frame.type != .execOutput
        }
    }
}
