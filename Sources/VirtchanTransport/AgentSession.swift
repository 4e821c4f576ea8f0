import Glibc
import VirtchanProtocol

/// Where a domain's agent listens, as resolved from its live XML.
public struct AgentEndpoint: Sendable {
    public var domain: String
    public var controlSocket: String
    public var dataSocket: String?
    /// Where the guest console goes, named in errors when the agent does not answer.
    public var consoleLog: String?
    /// The domain's key, proven to an agent that asks for it.
    public var key: AgentKey?
    /// Whether an agent without a key may be used (anything that reaches its socket can
    /// drive it); off unless the user or the domain's settings say so.
    public var allowsUnkeyedAgent: Bool
    /// The socket of the session holder that serves this domain on this host; when set,
    /// sessions go through it instead of the channel sockets (see ``HolderLink``).
    public var holderSocket: String?
    /// The libvirt URI through which the holder reaches a domain on another host: a silent
    /// agent may then be a silent link, and errors say so.
    public var remoteURI: String?

    /// What an error about a silent agent adds for a domain on another host.
    public var silentLinkHint: String {
        guard let remoteURI else { return "" }
        return "; its session holder reaches it over \(remoteURI), and that link may be down or slow (a holder whose link stays silent ends by itself, and the next command opens a new one)"
    }

    public init(domain: String, controlSocket: String, dataSocket: String?, consoleLog: String?,
                key: AgentKey? = nil, allowsUnkeyedAgent: Bool = false) {
        self.domain = domain
        self.controlSocket = controlSocket
        self.dataSocket = dataSocket
        self.consoleLog = consoleLog
        self.key = key
        self.allowsUnkeyedAgent = allowsUnkeyedAgent
    }

    /// In a domain's state directory: its agent key, and the marker of a domain created to
    /// run an agent without one.
    public static let keyFileName = "agent.key"
    public static let unkeyedMarkerName = "insecure-agent"

    /// Takes the key from the domain's state directory, and allows an agent without one when
    /// the directory says the domain was made so or `allowUnkeyed` is set.
    public mutating func loadCredentials(stateDirectory: String, allowUnkeyed: Bool) {
        key = readSmallFile(stateDirectory + "/" + Self.keyFileName).flatMap { AgentKey(fileText: $0) }
        allowsUnkeyedAgent = allowUnkeyed || access(stateDirectory + "/" + Self.unkeyedMarkerName, F_OK) == 0
    }
}

/// One session with the agent over the control channel: connect, handshake with a fresh
/// nonce (stale bytes from any earlier session are dropped on both sides), then requests.
public final class AgentSession {
    public let endpoint: AgentEndpoint
    public let control: FramedConnection
    public private(set) var hello: HelloAck
    private let lock: ChannelLock?
    private var nextID: UInt32 = 1
    /// Frames that arrived for another request while waiting for one.
    private var stash: [Frame] = []

    /// Connects and completes the handshake, resending the hello until `timeout` passes
    /// (an agent still booting misses what arrives before it opens its port).
    ///
    /// The session goes through the endpoint's session holder when it names one, else
    /// straight to the control socket. With `channel`, the handshake runs over that already
    /// open descriptor instead (a holder's own session), which the session then owns.
    public static func connect(_ endpoint: AgentEndpoint, over channel: Int32? = nil,
                               timeout: Double = 10) throws(TransportError) -> AgentSession {
        signal(SIGPIPE, SIG_IGN)
        let held = channel == nil && endpoint.holderSocket != nil
        var lock: ChannelLock?
        let fd: Int32
        if let channel {
            fd = channel
        } else if let holder = endpoint.holderSocket {
            fd = try HolderLink.connect(holder)
        } else {
            lock = try ChannelLock(domain: endpoint.domain, role: "control", label: "control channel of \(endpoint.domain)")
            fd = try UnixSocket.connect(endpoint.controlSocket)
        }
        return try start(endpoint, on: fd, held: held, lock: lock, timeout: timeout)
    }

    /// A session through a session holder over `link`, a connection to it that is already
    /// open (the command that starts a holder is its first client, over a socket pair). The
    /// session owns `link`.
    public static func connect(_ endpoint: AgentEndpoint, holderLink link: Int32,
                               timeout: Double = 10) throws(TransportError) -> AgentSession {
        signal(SIGPIPE, SIG_IGN)
        setNonBlocking(link)
        return try start(endpoint, on: link, held: true, lock: nil, timeout: timeout)
    }

    /// The handshake on `fd`, which the session owns from here on (closed when it fails).
    private static func start(_ endpoint: AgentEndpoint, on fd: Int32, held: Bool, lock: ChannelLock?,
                              timeout: Double) throws(TransportError) -> AgentSession {
        let control = FramedConnection(fd: fd)
        do throws(TransportError) {
            let ack = try handshake(endpoint, control, held: held, timeout: timeout)
            return AgentSession(endpoint: endpoint, control: control, hello: ack, lock: lock)
        } catch {
            close(fd)
            throw error
        }
    }

    /// Starts a new session on the same channel, as after the agent restarted (whatever ran
    /// in the old one is gone). The channel stays open when this fails.
    public func renew(timeout: Double) throws(TransportError) {
        stash = []
        hello = try Self.handshake(endpoint, control, held: false, timeout: timeout)
    }

    /// Hello (resent each second until answered), then the key proof when the agent asks.
    private static func handshake(_ endpoint: AgentEndpoint, _ control: FramedConnection, held: Bool,
                                  timeout: Double) throws(TransportError) -> HelloAck {
        let nonce = randomBytes(16)
        let hello = Hello(nonce: nonce, client: "virtchan")
        let deadline = monotonicDeadline(after: timeout)
        var lastSent: UInt64 = 0
        while true {
            let now = monotonicNanos()
            if now >= deadline {
                var msg = "the agent in \(endpoint.domain) did not answer within \(formatSeconds(timeout))"
                if let log = endpoint.consoleLog { msg += "; see the guest console log \(log)" }
                msg += endpoint.silentLinkHint
                if control.decoder.skippedBytes > 0 { msg += " (\(control.decoder.skippedBytes) bytes of noise on the channel)" }
                throw TransportError(.timeout, msg)
            }
            if now - lastSent >= 1_000_000_000 {
                control.send(hello, id: 0)
                lastSent = now
            }
            try pump(control, until: min(deadline, lastSent + 1_000_000_000))
            while let frame = control.decoder.next() {
                // Anything before our own ack is left over from an earlier session.
                if frame.type == .helloAck, let ack = try? HelloAck.decode(frame), ack.nonce == nonce {
                    // A holder proved the key when it opened its own session; only a
                    // holder's socket is believed when it says so.
                    if held && ack.capabilities.contains(Capability.heldSession) {
                        // The holder's agent may hold no key (a holder started with
                        // --insecure-agent): the same rule as for a direct session applies.
                        if !ack.capabilities.contains(Capability.auth) && !endpoint.allowsUnkeyedAgent {
                            throw unkeyedRefusal(endpoint.domain)
                        }
                    } else {
                        try authenticate(endpoint, control, ack: ack, nonce: nonce, deadline: deadline)
                    }
                    return ack
                }
                if frame.type == .error, let err = try? ErrorMessage.decode(frame), err.remoteCode == .unsupported {
                    throw TransportError(remote: err)
                }
            }
        }
    }

    /// Proves the domain's key when the agent asks for it; refuses an agent without a key
    /// unless the endpoint allows one.
    private static func authenticate(_ endpoint: AgentEndpoint, _ control: FramedConnection, ack: HelloAck,
                                     nonce: [UInt8], deadline: UInt64) throws(TransportError) {
        let domain = endpoint.domain
        guard !ack.challenge.isEmpty else {
            if endpoint.allowsUnkeyedAgent { return }
            throw unkeyedRefusal(domain)
        }
        guard let key = endpoint.key else {
            throw TransportError(.unauthenticated, "the agent in \(domain) serves only the holder of the domain's key, and this host has none for it (virtchan keeps it in the domain's state directory on the host that created it)")
        }
        let id: UInt32 = 1
        control.send(AuthProof(mac: key.proof(hostNonce: nonce, challenge: ack.challenge)), id: id)
        // A generous bound: the agent answers at once, but a TCG guest may be busy booting.
        let authDeadline = max(deadline, monotonicNanos() + 10_000_000_000)
        while true {
            while let frame = control.decoder.next() {
                guard frame.id == id else { continue }
                if frame.type == .ok { return }
                if frame.type == .error {
                    throw TransportError(.unauthenticated, "the agent in \(domain) refused this host's key: the guest holds a different one (was the domain created again, or its key file replaced?)")
                }
            }
            if monotonicNanos() >= authDeadline {
                throw TransportError(.timeout, "the agent in \(domain) did not answer the key proof")
            }
            try pump(control, until: authDeadline)
        }
    }

    private static func unkeyedRefusal(_ domain: String) -> TransportError {
        TransportError(.unauthenticated, "the agent in \(domain) has no key, so anything that reaches its channel can drive it; recreate the domain with virtchan create to give it one, or pass --insecure-agent to use it anyway")
    }

    private init(endpoint: AgentEndpoint, control: FramedConnection, hello: HelloAck, lock: ChannelLock?) {
        self.endpoint = endpoint
        self.control = control
        self.hello = hello
        self.lock = lock
    }

    deinit { close(control.fd) }

    /// Flushes output and reads input until something arrives or `deadline` passes.
    package static func pump(_ c: FramedConnection, until deadline: UInt64, extra: Int32 = -1) throws(TransportError) {
        var fds = [Poller.interest(c)]
        try Poller.wait(&fds, milliseconds: Poller.milliseconds(until: deadline))
        if fds[0].revents & Int16(POLLOUT) != 0 || c.pendingOutput > 0 {
            do { try c.flush() } catch {
                throw TransportError(.agentGone, "the control channel closed: \(error)", errno: error.errno)
            }
        }
        if fds[0].revents & Int16(POLLIN | POLLHUP | POLLERR) != 0 {
            let outcome: ReadOutcome
            do { outcome = try c.fill() } catch {
                throw TransportError(.agentGone, "the control channel failed: \(error)", errno: error.errno)
            }
            if outcome == .eof {
                throw TransportError(.agentGone, "the control channel closed (the domain stopped or QEMU went away)")
            }
        }
    }

    /// Whether the agent holds a key and this session proved it. Without one, anything that
    /// reaches the agent's channel can drive it.
    public var agentHoldsKey: Bool {
        // Through a holder, the holder vouches for the agent's capabilities; directly, only
        // the challenge the agent sent counts.
        isHeld ? hello.capabilities.contains(Capability.auth) : !hello.challenge.isEmpty
    }

    /// Whether the session goes through a session holder shared with other processes.
    public var isHeld: Bool { hello.capabilities.contains(Capability.heldSession) && endpoint.holderSocket != nil }

    public func newID() -> UInt32 {
        nextID &+= 1
        if nextID == 0 { nextID = 1 }
        return nextID
    }

    public func send(_ frame: Frame) { control.send(frame) }

    public func send<M: WireMessage>(_ message: M, id: UInt32, flags: UInt16 = 0) {
        control.send(message, id: id, flags: flags)
    }

    /// Writes everything queued, waiting for the socket as needed.
    public func flush(timeout: Double = 30) throws(TransportError) {
        let deadline = monotonicDeadline(after: timeout)
        while control.pendingOutput > 0 {
            if monotonicNanos() >= deadline { throw TransportError(.timeout, "the control channel stopped taking data") }
            try Self.pump(control, until: deadline)
        }
    }

    /// The next frame for request `id` (or any request when nil), or nil at `deadline`.
    public func receive(id: UInt32?, deadline: UInt64) throws(TransportError) -> Frame? {
        if let i = stash.firstIndex(where: { id == nil || $0.id == id }) { return stash.remove(at: i) }
        while true {
            while let frame = control.decoder.next() {
                if id == nil || frame.id == id { return frame }
                if frame.type != .helloAck && frame.type != .pong { stash.append(frame) }
                if stash.count > 64 { stash.removeFirst() }
            }
            if monotonicNanos() >= deadline { return nil }
            try Self.pump(control, until: deadline)
        }
    }

    /// Sends a request and returns the first frame answering it; an error frame is thrown.
    public func request(_ frame: Frame, timeout: Double = 30) throws(TransportError) -> Frame {
        send(frame)
        let deadline = monotonicDeadline(after: timeout)
        guard let reply = try receive(id: frame.id, deadline: deadline) else {
            throw TransportError(.timeout, "the agent in \(endpoint.domain) did not answer a \(frame.type) request within \(formatSeconds(timeout))" + endpoint.silentLinkHint)
        }
        if reply.type == .error { throw TransportError(remote: try decodeOrThrow(ErrorMessage.self, reply)) }
        return reply
    }

    /// One round trip; returns the time it took in seconds.
    public func ping(timeout: Double = 10) throws(TransportError) -> Double {
        let id = newID()
        var w = ByteWriter()
        let start = monotonicNanos()
        w.u64(start)
        let reply = try request(Frame(.ping, id: id, payload: w.bytes), timeout: timeout)
        guard reply.type == .pong, reply.payload == w.bytes else {
            throw TransportError(.protocolViolation, "the agent answered a ping with \(reply.type)")
        }
        return Double(monotonicNanos() - start) / 1e9
    }

    public func info(timeout: Double = 10) throws(TransportError) -> Info {
        let reply = try request(Frame(.infoRequest, id: newID()), timeout: timeout)
        return try decodeOrThrow(Info.self, reply)
    }
}

package func decodeOrThrow<M: WireMessage>(_ type: M.Type, _ frame: Frame) throws(TransportError) -> M {
    do {
        return try M.decode(frame)
    } catch {
        throw TransportError(.protocolViolation, "malformed \(frame.type) from the agent: \(error.message)")
    }
}
