import Foundation
import VirtchanProtocol
import VirtchanProvisioning
import VirtchanTransport

/// How a ``Hypervisor`` reaches a domain's agent.
public enum SessionSharing: Sendable, Equatable {
    /// Through the domain's session holder, started on demand, which stays `persist`
    /// seconds after its last client (0: it ends with its last client). Any number of
    /// processes may work on one domain at once, and a remote domain's ssh or TLS
    /// connection is paid for once.
    case holder(persist: Double)
    /// Straight to the channel sockets on this host: one session per domain at a time (a
    /// second one fails as busy). Used by tools that must own the channel, such as a
    /// benchmark of the bare port.
    case direct

    public static let standard = SessionSharing.holder(persist: 60)
}

/// A running session holder, as `virtchan holder list` shows it.
public struct HolderRecord: Sendable, Codable, Equatable {
    public var domain: String
    public var uri: String
    public var pid: Int32
    public var socket: String
    public var persistSeconds: Double
}

extension Hypervisor {
    /// Where session holders keep their sockets, locks, records and logs.
    public static var holderDirectory: String { HolderFiles.directory }

    /// The socket of the holder that serves `name` on this hypervisor: one per URI and
    /// domain name, so domains of the same name on two hosts never share one.
    public func holderSocket(for name: String) -> String { HolderFiles.socket(uri: uri, name: name) }

    /// A file name for `name` on this hypervisor (see ``HolderFiles/stem(uri:name:)``).
    func fileStem(for name: String) -> String { HolderFiles.stem(uri: uri, name: name) }

    // MARK: the client's side

    /// A session through the holder of `name`, starting one when none runs.
    func heldSession(with name: String, persist: Double, timeout: Double) throws -> AgentSession {
        let socket = holderSocket(for: name)
        // Whether this command accepts an agent without a key, whoever started the holder.
        let endpoint = AgentEndpoint.throughHolder(of: name, on: uri, paths: paths, allowUnkeyed: allowsUnkeyedAgents)
        do {
            return try AgentSession.connect(endpoint, timeout: timeout)
        } catch {
            // No holder yet, or a stale socket left by one that died: start one.
            guard error.code == .unreachable else { throw error }
        }
        // A holder of a remote domain opens a connection of its own: started a few at a time
        // per host (see ConnectionGate), each with the whole timeout once its turn comes.
        return try ConnectionGate.shared.withSlot(for: uri) { () throws -> AgentSession in
            let deadline = Date().addingTimeInterval(timeout)
            // The holder another command is starting, while this one waits for it.
            var other: StartingHolder?
            defer { other?.close() }
            while true {
                // It could not serve: this command cannot either, for the same reason.
                if let failure = other?.failure() { throw failure }
                switch try launchHolder(for: name, persist: persist, timeout: max(1, deadline.timeIntervalSinceNow)) {
                case .ready(let link?):
                    return try AgentSession.connect(endpoint, holderLink: link, timeout: max(1, deadline.timeIntervalSinceNow))
                case .ready(nil):
                    return try AgentSession.connect(endpoint, timeout: max(1, deadline.timeIntervalSinceNow))
                case .alreadyHeld:
                    // Another process started one a moment ago, or one is ending: try its socket.
                    if other == nil { other = StartingHolder(log: socket + ".log") }
                    if let session = try? AgentSession.connect(endpoint, timeout: max(1, deadline.timeIntervalSinceNow)) {
                        return session
                    }
                    if let failure = other?.failure() { throw failure }
                    guard deadline.timeIntervalSinceNow > 0 else {
                        var message = "the session holder of \(name), which another command started, did not begin serving within \(formatSeconds(timeout))"
                        if let kept = channelKeptHint(name) {
                            message += "; " + kept
                        } else if access(socket + ".log", F_OK) == 0 {
                            message += " (see \(socket).log)"
                        }
                        throw TransportError(.busy, message)
                    }
                    try Interruption.check()
                    Thread.sleep(forTimeInterval: 0.05)
                }
            }
        }
    }

    /// Where a holder of another URI keeps the channels of a domain named `name` (this
    /// machine reached as qemu:///system and as qemu+tcp://localhost, say): what to stop.
    func channelKeptHint(_ name: String) -> String? {
        guard let other = Self.holders().first(where: { $0.domain == name && $0.uri != uri }) else { return nil }
        return "the session holder of \(name) on \(other.uri) (pid \(other.pid)) may hold its channel: stop it with: virtchan holder stop --connect \(shellWord(other.uri)) \(shellWord(name))"
    }

    /// `ready` carries this command's own connection to a forked holder, when it has one.
    private enum LaunchOutcome { case ready(Int32?), alreadyHeld }

    /// Starts the holder of `name`, detached (its own session, output to its log), and waits
    /// for it to say it serves, or why it cannot. This process forks one when it safely can
    /// (one thread, no libvirt connection of its own: a child must share neither), which saves
    /// starting a program, and is then its first client over a socket pair made before the
    /// fork, with no connect and no wait for a ping; otherwise it runs `virtchan holder serve`.
    private func launchHolder(for name: String, persist: Double, timeout: Double) throws -> LaunchOutcome {
        var pipeFDs: [Int32] = [-1, -1]
        guard pipe(&pipeFDs) == 0 else { throw VirtchanError(.io, "pipe: \(String(cString: strerror(errno)))") }
        for fd in pipeFDs { _ = fcntl(fd, F_SETFD, FD_CLOEXEC) }
        defer { close(pipeFDs[0]) }
        makePrivateDirectories(Self.holderDirectory)
        let log = holderSocket(for: name) + ".log"
        var link: Int32?
        if mayFork {
            link = try HolderProcess.fork(log: log, readyPipe: pipeFDs) { ready, starter in
                var options = SessionHolder.Options()
                options.persist = persist
                return serveHolder(name, options: options, timeout: timeout, ready: ready, starter: starter)
            }.link
        } else {
            try spawnHolder(for: name, persist: persist, timeout: timeout, ready: pipeFDs[1], log: log)
        }
        var served = false
        defer { if !served, let link { close(link) } }
        let line: String
        do {
            line = try Self.readyLine(pipeFDs[0], timeout: timeout + 5, accepting: ["ready", "held"],
                                      what: "the session holder of \(name)", log: log)
        } catch let error as TransportError where error.code == .busy {
            // Still starting: libvirtd may be stalled on a channel that another URI's holder of
            // this domain keeps (the holder itself names it when it gets as far as failing).
            guard let hint = channelKeptHint(name), !error.message.contains(hint) else { throw error }
            throw TransportError(.busy, error.message + "; " + hint)
        }
        guard line == "ready" else { return .alreadyHeld }
        served = true
        return .ready(link)
    }

    /// Runs `virtchan holder serve` for `name` in a session of its own, `ready` as its fd 3.
    private func spawnHolder(for name: String, persist: Double, timeout: Double, ready: Int32, log: String) throws {
        var args = ["holder", "serve", "--connect", uri, "--persist", String(persist),
                    "--timeout", String(timeout), "--ready-fd", "3"]
        if allowsUnkeyedAgents { args.append("--insecure-agent") }
        try Self.spawnDetached(args + ["--", name], ready: ready, log: log, what: "the session holder")
    }

    /// Whether a holder may be forked from this process: one thread, and no libvirt
    /// connection opened here.
    private var mayFork: Bool {
        guard !hasOpenConnection else { return false }
        let status = readSmallFile("/proc/self/status") ?? ""
        return status.split(separator: "\n").contains { $0.hasPrefix("Threads:") && $0.split(separator: "\t").last == "1" }
    }

    // MARK: the holder's side

    /// Runs the holder of `name` until it ends (the hidden `virtchan holder serve`). It
    /// reports on `ready` (a pipe from the process that started it) `ready`, `held` (another
    /// holder has the domain) or `error ...`, then serves; returns the process exit status.
    /// `starter`: this holder's first client, connected before the holder was (see
    /// `SessionHolder.init(agent:listener:socketPath:options:openData:starter:log:)` in
    /// VirtchanTransport).
    public func serveHolder(_ name: String, options: SessionHolder.Options, timeout: Double, ready: Int32?,
                            starter: Int32? = nil) -> Int32 {
        let status = HolderProcess.serve(name, uri: uri, options: options, ready: ready, starter: starter,
                                         open: { try openHeldChannels(name, timeout: timeout) }) { error in
            var error = error
            // A channel takes one client: another URI's holder of a domain of this name (this
            // machine reached as qemu:///system and as qemu+tcp://localhost, say) keeps it.
            // Over a remote URI the open of a kept channel fails at once rather than time out:
            // libvirtd has a stream of it already (which may be that other holder's).
            let kept: String? = switch error {
            case let e as TransportError where e.code == .timeout: e.message
            case let e as ProvisioningError where e.code == .conflict: e.message
            default: nil
            }
            if let kept, let hint = channelKeptHint(name) {
                error = TransportError(.busy, kept + "; " + hint)
            } else if let timeout = error as? TransportError, timeout.code == .timeout, !Connection.isLocal(uri: uri) {
                // The channel may be another client's on the domain's host, which this host
                // cannot see.
                error = TransportError(.timeout, timeout.message + "; if virtchan is in use on the domain's host, a session holder there keeps the channel ('virtchan holder list' there)")
            }
            return Self.encodeReadyError(error)
        }
        // After the holder's files are gone: a channel that libvirt has not opened yet must
        // still be closed by this process (see ChannelStream.settleAbandonedOpens).
        ChannelStream.settleAbandonedOpens()
        return status
    }

    /// The agent session and the data channel's opener: the channel sockets on this host, or
    /// libvirt streams for a remote URI.
    private func openHeldChannels(_ name: String, timeout: Double) throws -> HolderProcess.Channels {
        if Connection.isLocal(uri: uri) {
            // The domain first: a name that is not there, or not running, leaves no lock file.
            do {
                return try .local(endpoint(of: name), timeout: timeout)
            } catch let error as TransportError where error.code == .unreachable {
                // The cached socket moved or vanished (a restarted domain): ask libvirt.
                endpointCache?.remove(name)
                var endpoint = try running(name).endpoint
                loadCredentials(&endpoint)
                return try .local(endpoint, timeout: timeout)
            }
        }
        // A remote domain: libvirt streams over the connection's own transport (ssh, TLS, TCP).
        let conn = try connection()
        let domain = try conn.requireDomain(name)
        guard domain.isActive else {
            throw VirtchanError(.notRunning, "domain \(name) is not running on \(uri) (start it with: \(suggestedVirsh("start", name)))")
        }
        let meta = domain.virtchanMetadata
        let controlName = meta?.controlChannel ?? ChannelNames.control
        let dataName = meta?.dataChannel ?? ChannelNames.data
        let channels = try ChannelResolver.channels(inDomainXML: domain.xml())
        guard channels.contains(where: { $0.name == controlName }) else {
            throw VirtchanError(.noChannel, "domain \(name) on \(uri) has no \(controlName) channel; create it with virtchan create, or add the channel to its XML")
        }
        // No socket path here: the channel is the descriptor below, and the endpoint serves for
        // the domain's name and key.
        var endpoint = AgentEndpoint(domain: name, controlSocket: "", dataSocket: nil, consoleLog: nil)
        loadCredentials(&endpoint)
        let fd = try ChannelStream.open(domain, channel: controlName, timeout: timeout)
        let session = try AgentSession.connect(endpoint, over: fd, timeout: timeout)
        return HolderProcess.Channels(agent: session, openData: { try ChannelStream.open(domain, channel: dataName, timeout: timeout) }, locks: [])
    }

    // MARK: listing and stopping

    /// The holders running for this user, on any URI.
    public static func holders() -> [HolderRecord] {
        let dir = holderDirectory
        let names = (try? FileManager.default.contentsOfDirectory(atPath: dir)) ?? []
        var records: [HolderRecord] = []
        for file in names where file.hasSuffix(".sock.json") {
            guard let data = FileManager.default.contents(atPath: dir + "/" + file),
                  let record = try? JSONDecoder().decode(HolderRecord.self, from: data),
                  isLive(record) else { continue }
            records.append(record)
        }
        return records.sorted { ($0.uri, $0.domain) < ($1.uri, $1.domain) }
    }

    /// A record counts only while its holder keeps its lock. A holder that was killed leaves
    /// a record and a socket behind: neither is ever taken for a live one, and both go here
    /// (under the lock, so a holder starting at this moment waits).
    private static func isLive(_ record: HolderRecord) -> Bool {
        BackgroundProcess.isLocked(record.socket, files: HolderProcess.files)
    }

    /// Stops the holder of `name` on this hypervisor, if one runs; its clients' commands end
    /// with an error. Returns the holder that was asked to stop, and whether it did in time.
    @discardableResult
    public func stopHolder(of name: String, timeout: Double = 5) -> (record: HolderRecord, stopped: Bool)? {
        let socket = holderSocket(for: name)
        guard let record = Self.holders().first(where: { $0.socket == socket }) else { return nil }
        return (record, Self.stop(record, timeout: timeout))
    }

    /// Sends SIGTERM and waits for the holder to let go of its lock; whether it did in time.
    @discardableResult
    public static func stop(_ record: HolderRecord, timeout: Double = 5) -> Bool {
        terminate(record.pid, lockedAt: record.socket, files: HolderProcess.files, timeout: timeout)
    }
}

/// The log of a holder that another command is starting, followed by a command that waits
/// for it: a holder that cannot serve writes why there before it removes its files, and the
/// descriptor opened here keeps that line readable after the file is gone.
private struct StartingHolder {
    let path: String
    private var fd: Int32 = -1

    init(log path: String) {
        self.path = path
        reopen()
    }

    /// Why the holder could not serve, once it has said so.
    mutating func failure() -> Error? {
        if let failure = readFailure() { return failure }
        // A holder started since writes a file of its own.
        var named = stat(), opened = stat()
        if fd < 0 || (stat(path, &named) == 0 && fstat(fd, &opened) == 0
                      && (named.st_ino != opened.st_ino || named.st_dev != opened.st_dev)) {
            reopen()
            return readFailure()
        }
        return nil
    }

    func close() { if fd >= 0 { _ = Glibc.close(fd) } }

    private mutating func reopen() {
        let newFD = open(path, O_RDONLY | O_CLOEXEC | O_NOFOLLOW)
        guard newFD >= 0 else { return }
        close()
        fd = newFD
    }

    private func readFailure() -> Error? {
        guard fd >= 0 else { return nil }
        var bytes = [UInt8](repeating: 0, count: 64 * 1024)
        let n = bytes.withUnsafeMutableBytes { pread(fd, $0.baseAddress!, $0.count, 0) }
        guard n > 0 else { return nil }
        for line in String(decoding: bytes[0..<n], as: UTF8.self).split(separator: "\n").reversed() {
            if let mark = line.range(of: HolderProcess.failureMark) {
                return Hypervisor.decodeReadyError(String(line[mark.upperBound...]))
            }
        }
        return nil
    }
}
