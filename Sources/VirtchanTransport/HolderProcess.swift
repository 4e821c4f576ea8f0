import Glibc
import VirtchanProtocol

/// A session holder's process, from the fork that starts it to its end: shared by every
/// program that starts one (virtchan-full, which may also reach the channel through libvirt,
/// and virtchan, which serves a domain of this host from the endpoint cache).
public enum HolderProcess {
    /// What a holder makes beside its socket's path (and the socket itself).
    public static let files = ["", ".json", ".log", ".lock"]

    /// What comes before the error line, less its `error `, in the log line of a holder that
    /// cannot serve: a command that waits for a holder another one started reads it there.
    public static let failureMark = "cannot serve: "

    /// The channels a holder serves: the agent's session, the opener of the data channel, and
    /// the locks kept while it runs.
    public struct Channels {
        public var agent: AgentSession
        public var openData: SessionHolder.DataOpener
        public var locks: [ChannelLock]

        public init(agent: AgentSession, openData: @escaping SessionHolder.DataOpener, locks: [ChannelLock]) {
            self.agent = agent
            self.openData = openData
            self.locks = locks
        }

        /// The channels of a domain of this host, through their sockets: both locks first, then
        /// the control channel and the agent's hello. A socket that is not there any more
        /// throws `.unreachable`, leaving no lock taken.
        public static func local(_ endpoint: AgentEndpoint, timeout: Double) throws(TransportError) -> Channels {
            let name = endpoint.domain
            let control = try ChannelLock(domain: name, role: "control", label: "control channel of \(name)")
            let data = try ChannelLock(domain: name, role: "data", label: "data channel of \(name)")
            let fd = try UnixSocket.connect(endpoint.controlSocket)
            let session = try AgentSession.connect(endpoint, over: fd, timeout: timeout)
            let dataPath = endpoint.dataSocket
            return Channels(agent: session, openData: {
                guard let dataPath else { throw TransportError(.unreachable, "domain \(name) has no data channel") }
                return try UnixSocket.connect(dataPath)
            }, locks: [control, data])
        }
    }

    /// Forks the holder: the child, in a session of its own with its output in `log`, runs
    /// `serve` with the write end of `readyPipe` and its end of a socket pair, and exits with
    /// what it returns. Returns the child, and this process's end of the pair: its connection
    /// to the holder, made before the holder listens, which needs no connect and no ping.
    /// `readyPipe`'s write end is closed here.
    public static func fork(log: String, readyPipe: [Int32],
                            serve: (_ ready: Int32, _ starter: Int32) -> Int32) throws(TransportError) -> (pid: pid_t, link: Int32) {
        var pair: [Int32] = [-1, -1]
        guard socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0, &pair) == 0 else {
            close(readyPipe[1])
            throw TransportError(.io, "socketpair: \(String(cString: strerror(errno)))")
        }
        let pid = Glibc.fork()
        if pid == 0 {
            close(readyPipe[0])
            close(pair[0])
            setsid()
            let null = open("/dev/null", O_RDWR)
            dup2(null, 0)
            dup2(null, 1)
            let logFD = open(log, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0o600)
            if logFD >= 0 { dup2(logFD, 2) }
            var none = sigset_t()
            sigemptyset(&none)
            sigprocmask(SIG_SETMASK, &none, nil)
            for sig in [SIGINT, SIGTERM, SIGHUP, SIGCHLD] { signal(sig, SIG_DFL) }
            _exit(serve(readyPipe[1], pair[1]))
        }
        close(readyPipe[1])
        close(pair[1])
        guard pid > 0 else {
            close(pair[0])
            throw TransportError(.io, "cannot start the session holder: fork: \(String(cString: strerror(errno)))")
        }
        return (pid, pair[0])
    }

    /// Runs the holder of `name` on `uri` until it ends. It reports on `ready` (a pipe from the
    /// process that started it) `ready`, `held` (another holder has the domain) or the error
    /// line `failureLine` makes of why it cannot serve, then serves; returns the process exit
    /// status. `starter`: this holder's first client, connected before the holder was (see
    /// ``SessionHolder/init(agent:listener:socketPath:options:openData:starter:log:)``).
    public static func serve(_ name: String, uri: String, options: SessionHolder.Options, ready: Int32?, starter: Int32?,
                             open: () throws -> Channels, failureLine: (any Error) -> String) -> Int32 {
        /// Whether the line reached the command that started this holder (it stops waiting
        /// after its timeout).
        @discardableResult
        func report(_ line: String) -> Bool {
            guard let ready else { return true }
            let bytes = Array((line + "\n").utf8)
            let delivered = bytes.withUnsafeBytes { writeFully(ready, $0) }
            close(ready)
            return delivered
        }
        // One line each, whatever text from the guest a line carries (an agent's version, an
        // error): nothing it sends can start a line of its own, such as a "cannot serve".
        func log(_ line: String) {
            _ = Array("virtchan holder \(name): \(displaySafe(line, limit: 8192))\n".utf8).withUnsafeBytes { writeFully(2, $0) }
        }
        Interruption.install()
        signal(SIGPIPE, SIG_IGN)
        BackgroundProcess.closeInheritedDescriptors(keeping: [ready, starter].compactMap { $0 })
        let socket = HolderFiles.socket(uri: uri, name: name)
        makePrivateDirectories(HolderFiles.directory)
        guard let lockFD = BackgroundProcess.takeLock(socket) else {
            report("held")
            return 0
        }
        // Everything the holder made goes when it ends; the lock file last, while still held,
        // so a holder starting meanwhile sees the file is not the one it locked and retries.
        defer {
            for suffix in files { unlink(socket + suffix) }
            close(lockFD)
        }
        // Lines of an earlier holder of this domain are of no use any more.
        _ = ftruncate(2, 0)
        do {
            let channels = try open()
            let listener = try UnixSocket.listen(socket, backlog: 128)
            chmod(socket, 0o600)
            setNonBlocking(listener)
            // The command that started this holder waits for nothing but the socket, and its
            // hello is answered before the record for `holder list` is written.
            guard report("ready") else {
                // Nobody waits for this holder any more (it took longer than its starter's
                // timeout, waiting on libvirt): end rather than keep the channel from others.
                log("the command that started this holder stopped waiting for it; ending")
                return 0
            }
            let holder = SessionHolder(agent: channels.agent, listener: listener, socketPath: socket, options: options,
                                       openData: channels.openData, starter: starter, log: log)
            let why = holder.run {
                let record = recordJSON(domain: name, uri: uri, pid: getpid(), socket: socket, persist: options.persist)
                try? writePrivateFile(socket + ".json", record, durable: false)
                log("serving (pid \(getpid()), agent \(channels.agent.hello.agentVersion))")
            }
            holder.shutDown(reason: why)
            log("ended: \(why)")
            withExtendedLifetime(channels.locks) {}
            return 0
        } catch {
            let line = failureLine(error)
            // Commands that wait for this holder, which they did not start, read why here.
            log(failureMark + line.dropFirst("error ".count))
            report(line)
            return 1
        }
    }

    /// The record `holder list` reads beside the socket: a JSON object with the fields of
    /// HolderRecord (VirtchanKit).
    static func recordJSON(domain: String, uri: String, pid: Int32, socket: String, persist: Double) -> [UInt8] {
        Array("{\"domain\":\(jsonString(domain)),\"uri\":\(jsonString(uri)),\"pid\":\(pid),\"socket\":\(jsonString(socket)),\"persistSeconds\":\(persist)}".utf8)
    }

    /// `text` as a JSON string.
    static func jsonString(_ text: String) -> String {
        var out = "\""
        for scalar in text.unicodeScalars {
            switch scalar {
            case "\"": out += "\\\""
            case "\\": out += "\\\\"
            case _ where scalar.value < 0x20:
                let hex = String(scalar.value, radix: 16)
                out += "\\u" + String(repeating: "0", count: 4 - hex.count) + hex
            default: out.unicodeScalars.append(scalar)
            }
        }
        return out + "\""
    }
}
