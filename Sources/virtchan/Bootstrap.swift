import ArgumentParser
import Crypto
import Foundation
import VirtchanProtocol
import VirtchanProvisioning
import VirtchanTransport

/// The first-boot options of `create`.
struct BootstrapOptions: ParsableArguments {
    @Option(help: "Script to push and run in the guest once the agent says hello.") var bootstrap: String?
    @Option(name: .customLong("bootstrap-file"), help: "LOCAL:REMOTE file to push before the script (repeatable).")
    var bootstrapFiles: [String] = []
    @Option(name: .customLong("bootstrap-env"), help: "KEY=VALUE for the script's environment (repeatable).")
    var bootstrapEnv: [String] = []
    @Option(help: "Kill the script after this many seconds and mark the bootstrap failed.") var bootstrapTimeout: Double?
    @Flag(help: "Destroy the domain when the bootstrap fails.") var destroyOnFailure = false

    /// Checks the script and files before anything is defined.
    func plan() throws -> BootstrapPlan? {
        guard let bootstrap else {
            if !bootstrapFiles.isEmpty || !bootstrapEnv.isEmpty {
                throw ValidationError("--bootstrap-file and --bootstrap-env go with --bootstrap")
            }
            return nil
        }
        guard let script = FileManager.default.contents(atPath: bootstrap) else {
            throw CLIError("cannot read the bootstrap script \(bootstrap)")
        }
        var files: [BootstrapPlan.File] = []
        for spec in bootstrapFiles {
            guard let colon = spec.firstIndex(of: ":") else {
                throw ValidationError("--bootstrap-file takes LOCAL:REMOTE, not '\(spec)'")
            }
            let localPath = String(spec[..<colon]), remotePath = String(spec[spec.index(after: colon)...])
            guard remotePath.hasPrefix("/") else { throw ValidationError("the guest side of --bootstrap-file must be absolute: \(remotePath)") }
            var isDir: ObjCBool = false
            guard FileManager.default.fileExists(atPath: localPath, isDirectory: &isDir), !isDir.boolValue,
                  FileManager.default.isReadableFile(atPath: localPath) else {
                throw CLIError("the bootstrap file \(localPath) does not exist or cannot be read")
            }
            files.append(.init(local: localPath, remote: remotePath))
        }
        for e in bootstrapEnv where !e.contains("=") || e.hasPrefix("=") {
            throw ValidationError("--bootstrap-env takes KEY=VALUE, not '\(e)'")
        }
        if let t = bootstrapTimeout, !(t > 0) { throw ValidationError("--bootstrap-timeout must be positive") }
        return BootstrapPlan(scriptPath: bootstrap, scriptName: (bootstrap as NSString).lastPathComponent,
                             sha256: Crypto.SHA256.hash(data: script).map { String(format: "%02x", $0) }.joined(),
                             files: files, env: bootstrapEnv, timeout: bootstrapTimeout)
    }
}

/// What a bootstrap delivers, kept in the domain's state directory so a later
/// `bootstrap run` (from `create --no-wait`, or a retry) has everything it needs.
struct BootstrapPlan: Codable {
    struct File: Codable {
        var local: String
        var remote: String
        /// The mode the file had when it was given; the saved copy itself is private (0600).
        var mode: UInt32?
    }
    var scriptPath: String
    var scriptName: String
    var sha256: String
    var files: [File]
    var env: [String]
    var timeout: Double?

    static func directory(_ stateDir: String) -> String { stateDir + "/bootstrap" }

    /// Copies the script and files into the state directory and writes the manifest, all
    /// readable by the owner only (the environment may hold tokens, the files keys).
    func save(into stateDir: String) throws {
        let dir = Self.directory(stateDir)
        let fm = FileManager.default
        for d in [dir, dir + "/files"] {
            try fm.createDirectory(atPath: d, withIntermediateDirectories: true, attributes: [.posixPermissions: 0o700])
        }
        func privateCopy(_ from: String, _ to: String) throws -> UInt32 {
            guard let data = fm.contents(atPath: from) else { throw CLIError("cannot read \(from)") }
            guard fm.createFile(atPath: to, contents: data, attributes: [.posixPermissions: 0o600]) else {
                throw CLIError("cannot write \(to)")
            }
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
        let data = try JSONEncoder().encode(saved)
        guard fm.createFile(atPath: dir + "/manifest.json", contents: data, attributes: [.posixPermissions: 0o600]) else {
            throw CLIError("cannot write \(dir)/manifest.json")
        }
    }

    static func load(_ stateDir: String) throws -> BootstrapPlan {
        let path = directory(stateDir) + "/manifest.json"
        guard let data = FileManager.default.contents(atPath: path) else {
            throw CLIError("the bootstrap files of this domain are gone from \(directory(stateDir))")
        }
        return try JSONDecoder().decode(BootstrapPlan.self, from: data)
    }
}

enum BootstrapRunner {
    static let guestDirectory = "/var/lib/virtchan/bootstrap"
    static let guestMarker = "/var/lib/virtchan/bootstrap.done"

    private static func iso(_ d: Date = Date()) -> String { ISO8601DateFormatter().string(from: d) }

    static func metadata(_ domain: Domain) -> VirtchanMetadata? {
        domain.metadata(namespace: VirtchanMetadata.namespace).flatMap { VirtchanMetadata(elementXML: $0) }
    }

    static func store(_ meta: VirtchanMetadata, _ domain: Domain) throws {
        try domain.setMetadata(meta.elementXML(), key: VirtchanMetadata.key, namespace: VirtchanMetadata.namespace)
    }

    /// A `running` record whose runner process is gone was interrupted: it becomes `failed`.
    static func reconcile(_ meta: inout VirtchanMetadata, _ domain: Domain) throws {
        guard var b = meta.bootstrap, b.state == .running else { return }
        if let pid = b.runnerPID, pid > 0, kill(pid, 0) == 0 || errno == EPERM { return }
        b.state = .failed
        b.endedAt = b.endedAt ?? iso()
        b.reason = "the host process running it (pid \(b.runnerPID ?? 0)) stopped before it finished"
        meta.bootstrap = b
        try store(meta, domain)
    }

    /// Runs a pending bootstrap; nil when there is none to run.
    static func runIfPending(domainName: String, global: GlobalOptions, session: AgentSession) throws -> Int32? {
        let domain = try global.open().requireDomain(domainName)
        guard var meta = metadata(domain), meta.bootstrap != nil else { return nil }
        try reconcile(&meta, domain)
        guard meta.bootstrap?.state == .pending else { return nil }
        return try run(domainName: domainName, global: global, session: session, force: false, timeout: nil, quiet: false)
    }

    /// A second runner is refused while the record names a live one.
    static func refuseIfRunning(_ record: BootstrapRecord, _ domainName: String) throws {
        guard record.state == .running else { return }
        throw CLIError("the bootstrap of \(domainName) is already running (host pid \(record.runnerPID ?? 0)); wait for it or stop that process")
    }

    /// Delivers and runs the bootstrap; returns the script's exit code.
    static func run(domainName: String, global: GlobalOptions, session: AgentSession, force: Bool,
                    timeout: Double?, quiet: Bool) throws -> Int32 {
        let domain = try global.open().requireDomain(domainName)
        guard var meta = metadata(domain), var record = meta.bootstrap else {
            throw CLIError("domain \(domainName) has no bootstrap (give one with: virtchan create \(domainName) --bootstrap SCRIPT)")
        }
        try reconcile(&meta, domain)
        record = meta.bootstrap ?? record
        try refuseIfRunning(record, domainName)
        if record.state == .succeeded && !force {
            say("The bootstrap of \(domainName) already succeeded at \(record.endedAt ?? "?"); nothing to do (use --force to run it again)")
            return 0
        }
        let stateDir = Paths.stateDirectory(for: domainName)
        let plan = try BootstrapPlan.load(stateDir)

        // Claim it: the record names this process, so a crash is detectable later.
        record.state = .running
        record.startedAt = iso()
        record.endedAt = nil
        record.exitCode = nil
        record.reason = nil
        record.runnerPID = getpid()
        meta.bootstrap = record
        try store(meta, domain)

        let logPath = BootstrapPlan.directory(stateDir) + "/log"
        _ = FileManager.default.createFile(atPath: logPath, contents: nil, attributes: [.posixPermissions: 0o600])
        let log = FileHandle(forWritingAtPath: logPath)
        var outcome: (code: Int32?, reason: String?) = (nil, nil)
        do {
            if !force, let marker = try? guestOutput(session, ["cat", guestMarker]), marker.trimmingCharacters(in: .whitespacesAndNewlines) == plan.sha256 {
                outcome = (0, "the guest had already completed this script")
                if !quiet { say("The guest reports this bootstrap already completed; not running it again") }
            } else {
                let transfer = FileTransfer(session: session)
                for f in plan.files {
                    let fd = open(f.local, O_RDONLY | O_CLOEXEC)
                    guard fd >= 0 else { throw CLIError("cannot read \(f.local)") }
                    defer { close(fd) }
                    var st = stat()
                    fstat(fd, &st)
                    _ = try transfer.push(fd: fd, size: UInt64(st.st_size), to: f.remote, mode: f.mode ?? UInt32(st.st_mode & 0o7777), parents: true)
                    if !quiet { say("bootstrap: pushed \(f.remote)") }
                }
                let remoteScript = guestDirectory + "/" + plan.scriptName
                let fd = open(plan.scriptPath, O_RDONLY | O_CLOEXEC)
                guard fd >= 0 else { throw CLIError("cannot read \(plan.scriptPath)") }
                var st = stat()
                fstat(fd, &st)
                _ = try transfer.push(fd: fd, size: UInt64(st.st_size), to: remoteScript, mode: 0o755, parents: true)
                close(fd)
                if !quiet { say("bootstrap: running \(plan.scriptName)") }
                var options = ExecOptions(argv: [remoteScript])
                options.env = plan.env
                options.forwardStdin = false
                options.timeout = timeout ?? plan.timeout
                let result = try ExecClient.run(session, options, stdin: 0, terminal: 1) { stream, bytes in
                    log?.write(Data(bytes))
                    return quiet ? true : writeFully(stream == .stderr ? 2 : 1, bytes)
                }
                if result.timedOut {
                    outcome = (124, "timed out after \(formatSeconds(options.timeout ?? 0))")
                } else {
                    outcome = (result.status, result.status == 0 ? nil : "exited with code \(result.status)")
                }
                if result.status == 0 {
                    _ = try? guestOutput(session, ["/bin/sh", "-c", "mkdir -p /var/lib/virtchan && echo \(plan.sha256) > \(guestMarker)"])
                }
            }
        } catch {
            let reason: String
            if let e = error as? TransportError {
                reason = e.remote.map { $0.message } ?? e.message
            } else {
                reason = "\(error)"
            }
            record.state = .failed
            record.endedAt = iso()
            record.reason = reason
            record.runnerPID = nil
            meta.bootstrap = record
            try? store(meta, domain)
            throw CLIError("bootstrap of \(domainName) failed: \(reason)")
        }
        try? log?.close()
        record.exitCode = outcome.code
        record.state = outcome.code == 0 ? .succeeded : .failed
        record.endedAt = iso()
        record.reason = outcome.reason
        record.runnerPID = nil
        meta.bootstrap = record
        try store(meta, domain)
        return outcome.code ?? 1
    }

    /// Runs a short command and returns its stdout when it succeeds.
    static func guestOutput(_ session: AgentSession, _ argv: [String]) throws -> String? {
        var options = ExecOptions(argv: argv)
        options.forwardStdin = false
        options.timeout = 30
        var out = Data()
        let result = try ExecClient.run(session, options, stdin: 0, terminal: 1) { stream, bytes in
            if stream == .stdout { out.append(contentsOf: bytes) }
            return true
        }
        return result.status == 0 ? String(decoding: out, as: UTF8.self) : nil
    }
}

struct Bootstrap: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "bootstrap",
        abstract: "Run, inspect and read the log of a domain's first-boot script.",
        subcommands: [RunBootstrap.self, BootstrapStatus.self, BootstrapLog.self])

    struct RunBootstrap: ParsableCommand {
        static let configuration = CommandConfiguration(commandName: "run", abstract: "Run a pending or failed bootstrap (with --force, run it again).")
        @OptionGroup var global: GlobalOptions
        @Argument(help: "Domain name.") var name: String
        @Flag(help: "Run it even if it already succeeded.") var force = false
        @Option(help: "Kill the script after this many seconds.") var timeout: Double?
        @Option(help: "Seconds to wait for the agent.") var waitTimeout: Double = 90

        func validate() throws {
            if let timeout, !(timeout > 0) { throw ValidationError("--timeout must be a positive number of seconds") }
            if !(waitTimeout > 0) { throw ValidationError("--wait-timeout must be a positive number of seconds") }
        }

        func run() throws {
            // Refuse a second runner before touching the (exclusive) channel.
            let domain = try global.open().requireDomain(name)
            if var meta = BootstrapRunner.metadata(domain), meta.bootstrap != nil {
                try BootstrapRunner.reconcile(&meta, domain)
                if let b = meta.bootstrap { try BootstrapRunner.refuseIfRunning(b, name) }
            }
            let session = try waitForAgent(name, global, timeout: waitTimeout)
            let code = try BootstrapRunner.run(domainName: name, global: global, session: session, force: force,
                                               timeout: timeout, quiet: false)
            if code != 0 {
                FileHandle.standardError.write(Data("virtchan: bootstrap failed with exit code \(code) (see: virtchan bootstrap log \(name))\n".utf8))
            }
            throw ExitCode(code)
        }
    }

    struct BootstrapStatus: ParsableCommand {
        static let configuration = CommandConfiguration(commandName: "status", abstract: "Show the bootstrap's state.")
        @OptionGroup var global: GlobalOptions
        @Argument(help: "Domain name.") var name: String
        @Flag(help: "Print JSON.") var json = false

        func run() throws {
            let domain = try global.open().requireDomain(name)
            guard var meta = BootstrapRunner.metadata(domain), meta.bootstrap != nil else {
                throw CLIError("domain \(name) has no bootstrap")
            }
            try BootstrapRunner.reconcile(&meta, domain)
            guard let b = meta.bootstrap else { return }
            if json { return try printJSON(b) }
            print("Script:    \(b.script)")
            print("SHA-256:   \(b.sha256)")
            print("State:     \(b.state.rawValue)")
            if let c = b.exitCode { print("Exit code: \(c)") }
            if let s = b.startedAt { print("Started:   \(s)") }
            if let e = b.endedAt { print("Ended:     \(e)") }
            if let r = b.reason { print("Reason:    \(r)") }
        }
    }

    struct BootstrapLog: ParsableCommand {
        static let configuration = CommandConfiguration(commandName: "log", abstract: "Print the saved output of the last bootstrap run.")
        @OptionGroup var global: GlobalOptions
        @Argument(help: "Domain name.") var name: String

        func run() throws {
            _ = try global.open().requireDomain(name)
            let stateDir = Paths.stateDirectory(for: name)
            guard let data = FileManager.default.contents(atPath: BootstrapPlan.directory(stateDir) + "/log") else {
                throw CLIError("no bootstrap log for \(name) yet (see: virtchan bootstrap status \(name))")
            }
            FileHandle.standardOutput.write(data)
        }
    }
}
