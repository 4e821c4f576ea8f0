import Crypto
import Foundation

/// A first-boot script, the files pushed before it and its environment. It is kept in the
/// domain's state directory, so a later ``Hypervisor/runBootstrap(_:session:options:)`` (after
/// `create --no-wait`, or a retry) has everything it needs.
public struct BootstrapPlan: Codable, Sendable {
    public struct File: Codable, Sendable {
        public var local: String
        /// Absolute path in the guest.
        public var remote: String
        /// The mode the file had when it was given; the saved copy itself is private (0600).
        public var mode: UInt32?
    }
    public var scriptPath: String
    public var scriptName: String
    public var sha256: String
    public var files: [File]
    /// KEY=VALUE entries for the script's environment.
    public var env: [String]
    /// Seconds before the script is killed and the bootstrap marked failed.
    public var timeout: Double?

    /// Checks the script and files before anything is defined. `files` are LOCAL:REMOTE.
    public init(script: String, files: [String] = [], env: [String] = [], timeout: Double? = nil) throws(VirtchanError) {
        guard let data = FileManager.default.contents(atPath: script) else {
            throw VirtchanError(.io, "cannot read the bootstrap script \(script)")
        }
        var parsed: [File] = []
        for spec in files {
            guard let colon = spec.firstIndex(of: ":") else {
                throw VirtchanError(.invalidRequest, "--bootstrap-file takes LOCAL:REMOTE, not '\(spec)'")
            }
            let localPath = String(spec[..<colon]), remotePath = String(spec[spec.index(after: colon)...])
            guard remotePath.hasPrefix("/") else {
                throw VirtchanError(.invalidRequest, "the guest side of --bootstrap-file must be absolute: \(remotePath)")
            }
            var isDir: ObjCBool = false
            guard FileManager.default.fileExists(atPath: localPath, isDirectory: &isDir), !isDir.boolValue,
                  FileManager.default.isReadableFile(atPath: localPath) else {
                throw VirtchanError(.io, "the bootstrap file \(localPath) does not exist or cannot be read")
            }
            parsed.append(File(local: localPath, remote: remotePath))
        }
        for e in env where !e.contains("=") || e.hasPrefix("=") {
            throw VirtchanError(.invalidRequest, "--bootstrap-env takes KEY=VALUE, not '\(e)'")
        }
        if let timeout, !(timeout > 0 && timeout.isFinite) {
            throw VirtchanError(.invalidRequest, "--bootstrap-timeout takes a positive number of seconds, not \(timeout)")
        }
        scriptPath = script
        scriptName = (script as NSString).lastPathComponent
        sha256 = Crypto.SHA256.hash(data: data).map { String(format: "%02x", $0) }.joined()
        self.files = parsed
        self.env = env
        self.timeout = timeout
    }

    static func directory(_ stateDir: String) -> String { stateDir + "/bootstrap" }
    static func logPath(_ stateDir: String) -> String { directory(stateDir) + "/log" }

    /// Copies the script and files into the state directory and writes the manifest, all
    /// readable by the owner only (the environment may hold tokens, the files keys).
    func save(into stateDir: String) throws {
        let dir = Self.directory(stateDir)
        let fm = FileManager.default
        for d in [dir, dir + "/files"] {
            try fm.createDirectory(atPath: d, withIntermediateDirectories: true, attributes: [.posixPermissions: 0o700])
        }
        func privateCopy(_ from: String, _ to: String) throws -> UInt32 {
            guard let data = fm.contents(atPath: from) else { throw VirtchanError(.io, "cannot read \(from)") }
            try writePrivateFile(to, data)
            var st = stat()
            return stat(from, &st) == 0 ? UInt32(st.st_mode & 0o7777) : 0o644
        }
        var saved = self
        _ = try privateCopy(scriptPath, dir + "/script")
        saved.scriptPath = dir + "/script"
        for (i, f) in files.enumerated() {
            let copy = dir + "/files/\(i)"
            saved.files[i].mode = try privateCopy(f.local, copy)
            saved.files[i].local = copy
        }
        try writePrivateFile(dir + "/manifest.json", try JSONEncoder().encode(saved))
    }

    static func load(_ stateDir: String) throws -> BootstrapPlan {
        guard let data = FileManager.default.contents(atPath: directory(stateDir) + "/manifest.json") else {
            throw VirtchanError(.bootstrapMissing, "the bootstrap files of this domain are gone from \(directory(stateDir))")
        }
        return try JSONDecoder().decode(BootstrapPlan.self, from: data)
    }
}

/// How ``Hypervisor/runBootstrap(_:session:options:)`` runs a bootstrap and reports on it.
public struct BootstrapRunOptions {
    /// Run it again although it already succeeded.
    public var force = false
    /// Seconds before the script is killed; nil: the plan's own timeout, if any.
    public var timeout: Double?
    /// Each step as a line for a person ("pushed /etc/app.conf", "running setup.sh").
    public var progress: (String) -> Void = { _ in }
    /// The script's output as it arrives; it also goes to the bootstrap log. Return false to
    /// stop reading that stream.
    public var output: ExecClient.OutputSink = { _, _ in true }

    public init() {}
}

extension Hypervisor {
    /// Where the guest keeps the scripts and the mark of a completed bootstrap.
    static let guestBootstrapDirectory = "/var/lib/virtchan/bootstrap"
    static let guestBootstrapMarker = "/var/lib/virtchan/bootstrap.done"

    /// The domain's bootstrap record, with a `running` record whose runner process is gone
    /// turned into `failed` (and stored so). nil when the domain has no bootstrap.
    public func bootstrapStatus(_ name: String) throws -> BootstrapRecord? {
        let domain = try domain(name)
        guard var meta = domain.virtchanMetadata, meta.bootstrap != nil else { return nil }
        try reconcile(&meta, domain)
        return meta.bootstrap
    }

    /// The saved output of the domain's last bootstrap run; nil before the first.
    public func bootstrapLog(_ name: String) throws -> Data? {
        _ = try domain(name)
        return FileManager.default.contents(atPath: BootstrapPlan.logPath(paths.stateDirectory(for: name)))
    }

    /// Fails with ``VirtchanError/Code/bootstrapRunning`` while another host process runs the
    /// domain's bootstrap; call it before waiting for the agent.
    public func refuseConcurrentBootstrap(_ name: String) throws {
        if let record = try bootstrapStatus(name) { try Self.refuseIfRunning(record, name) }
    }

    /// Runs the bootstrap when it is pending; nil when there is none to run.
    public func runPendingBootstrap(_ name: String, session: AgentSession, options: BootstrapRunOptions = BootstrapRunOptions()) throws -> Int32? {
        guard try bootstrapStatus(name)?.state == .pending else { return nil }
        return try runBootstrap(name, session: session, options: options)
    }

    /// Delivers the bootstrap's files and script over `session`, runs the script, records
    /// the outcome in the domain's metadata and returns the script's exit code (124 after its
    /// timeout). A bootstrap that already succeeded is not run again unless `options.force`.
    public func runBootstrap(_ name: String, session: AgentSession, options: BootstrapRunOptions = BootstrapRunOptions()) throws -> Int32 {
        let domain = try domain(name)
        guard var meta = domain.virtchanMetadata, var record = meta.bootstrap else {
            throw VirtchanError(.bootstrapMissing, "domain \(name) has no bootstrap (give one with: \(suggested("create", name, "--bootstrap SCRIPT")))")
        }
        try reconcile(&meta, domain)
        record = meta.bootstrap ?? record
        try Self.refuseIfRunning(record, name)
        if record.state == .succeeded && !options.force {
            options.progress("The bootstrap of \(name) already succeeded at \(record.endedAt ?? "?"); nothing to do (use --force to run it again)")
            return 0
        }
        let stateDir = paths.stateDirectory(for: name)
        let plan = try BootstrapPlan.load(stateDir)

        // Claim it: the record names this process, so a crash is detectable later.
        record.state = .running
        record.startedAt = Self.timestamp()
        record.endedAt = nil
        record.exitCode = nil
        record.reason = nil
        record.runnerPID = getpid()
        meta.bootstrap = record
        try domain.setVirtchanMetadata(meta)

        let logPath = BootstrapPlan.logPath(stateDir)
        _ = FileManager.default.createFile(atPath: logPath, contents: nil, attributes: [.posixPermissions: 0o600])
        let log = FileHandle(forWritingAtPath: logPath)
        defer { try? log?.close() }
        let outcome: (code: Int32, reason: String?)
        do {
            outcome = try deliver(plan, over: session, options: options, log: log)
        } catch {
            let reason = (error as? TransportError).map { $0.remote?.message ?? $0.message } ?? "\(error)"
            record.state = .failed
            record.endedAt = Self.timestamp()
            record.reason = reason
            record.runnerPID = nil
            meta.bootstrap = record
            try? domain.setVirtchanMetadata(meta)
            throw VirtchanError(.bootstrapFailed, "bootstrap of \(name) failed: \(reason)")
        }
        record.exitCode = outcome.code
        record.state = outcome.code == 0 ? .succeeded : .failed
        record.endedAt = Self.timestamp()
        record.reason = outcome.reason
        record.runnerPID = nil
        meta.bootstrap = record
        try domain.setVirtchanMetadata(meta)
        return outcome.code
    }

    private func deliver(_ plan: BootstrapPlan, over session: AgentSession, options: BootstrapRunOptions,
                         log: FileHandle?) throws -> (code: Int32, reason: String?) {
        if !options.force, let marker = try? ExecClient.capture(session, ["cat", Self.guestBootstrapMarker]),
           marker.status == 0, marker.stdoutText.trimmingCharacters(in: .whitespacesAndNewlines) == plan.sha256 {
            options.progress("The guest reports this bootstrap already completed; not running it again")
            return (0, "the guest had already completed this script")
        }
        let transfer = FileTransfer(session: session)
        for f in plan.files {
            _ = try transfer.push(file: f.local, to: f.remote, mode: f.mode, parents: true)
            options.progress("bootstrap: pushed \(f.remote)")
        }
        let remoteScript = Self.guestBootstrapDirectory + "/" + plan.scriptName
        _ = try transfer.push(file: plan.scriptPath, to: remoteScript, mode: 0o755, parents: true)
        options.progress("bootstrap: running \(plan.scriptName)")
        var exec = ExecOptions(argv: [remoteScript])
        exec.env = plan.env
        exec.forwardStdin = false
        exec.timeout = options.timeout ?? plan.timeout
        let result = try ExecClient.run(session, exec, stdin: 0, terminal: 1) { stream, bytes in
            log?.write(Data(bytes))
            return options.output(stream, bytes)
        }
        if result.status == 0 {
            _ = try? ExecClient.capture(session, ["/bin/sh", "-c", "mkdir -p /var/lib/virtchan && echo \(plan.sha256) > \(Self.guestBootstrapMarker)"])
        }
        if result.timedOut { return (124, "timed out after \(formatSeconds(exec.timeout ?? 0))") }
        return (result.status, result.status == 0 ? nil : "exited with code \(result.status)")
    }

    /// A `running` record whose runner process is gone was interrupted: it becomes `failed`.
    private func reconcile(_ meta: inout VirtchanMetadata, _ domain: Domain) throws {
        guard var b = meta.bootstrap, b.state == .running else { return }
        if let pid = b.runnerPID, pid > 0, kill(pid, 0) == 0 || errno == EPERM { return }
        b.state = .failed
        b.endedAt = b.endedAt ?? Self.timestamp()
        b.reason = "the host process running it (pid \(b.runnerPID ?? 0)) stopped before it finished"
        meta.bootstrap = b
        try domain.setVirtchanMetadata(meta)
    }

    private static func refuseIfRunning(_ record: BootstrapRecord, _ name: String) throws {
        guard record.state == .running else { return }
        throw VirtchanError(.bootstrapRunning, "the bootstrap of \(name) is already running (host pid \(record.runnerPID ?? 0)); wait for it or stop that process")
    }

    private static func timestamp() -> String { ISO8601DateFormatter().string(from: Date()) }
}
