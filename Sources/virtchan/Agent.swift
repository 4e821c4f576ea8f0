import ArgumentParser
import Foundation
import VirtchanProtocol
import VirtchanProvisioning
import VirtchanTransport

struct Wait: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "wait",
        abstract: "Wait until the agent in a domain says hello (and deliver a pending bootstrap).")

    @OptionGroup var global: GlobalOptions
    @Argument(help: "Domain name.") var name: String
    @Option(help: "Give up after this many seconds.") var timeout: Double = 90

    func validate() throws {
        if !(timeout > 0) { throw ValidationError("--timeout must be a positive number of seconds") }
    }

    func run() throws {
        let start = Date()
        let session = try waitForAgent(name, global, timeout: timeout)
        say(String(format: "Agent %@ in %@ is ready (%.1f s)", displaySafe(session.hello.agentVersion, limit: 64), name, Date().timeIntervalSince(start)))
        if let code = try BootstrapRunner.runIfPending(domainName: name, global: global, session: session), code != 0 {
            throw ExitCode(code)
        }
    }
}

struct Ping: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "ping", abstract: "Measure round trips to the agent.")

    @OptionGroup var global: GlobalOptions
    @Argument(help: "Domain name.") var name: String
    @Option(name: [.customShort("n"), .long], help: "Number of pings.") var count: Int = 4
    @Option(help: "Seconds between pings.") var interval: Double = 0
    @Flag(help: "Print JSON.") var json = false

    struct Summary: Encodable {
        let count: Int
        let minMs: Double
        let medianMs: Double
        let maxMs: Double
        let timesMs: [Double]
    }

    func validate() throws {
        guard count >= 1 else { throw ValidationError("--count must be at least 1") }
        guard interval >= 0 else { throw ValidationError("--interval cannot be negative") }
    }

    func run() throws {
        let session = try Resolve.session(name, global)
        var times: [Double] = []
        for i in 0..<count {
            if i > 0 && interval > 0 { Thread.sleep(forTimeInterval: interval) }
            let t = try session.ping() * 1000
            times.append(t)
            if !json { print(String(format: "reply from %@: seq=%d time=%.3f ms", name, i + 1, t)) }
        }
        let sorted = times.sorted()
        let summary = Summary(count: count, minMs: sorted[0], medianMs: sorted[sorted.count / 2], maxMs: sorted[sorted.count - 1], timesMs: times)
        if json { return try printJSON(summary) }
        print(String(format: "%d pings: min %.3f ms, median %.3f ms, max %.3f ms", count, summary.minMs, summary.medianMs, summary.maxMs))
    }
}

struct InfoCommand: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "info", abstract: "Show what the agent reports about itself and the guest.")

    @OptionGroup var global: GlobalOptions
    @Argument(help: "Domain name.") var name: String
    @Flag(help: "Print JSON.") var json = false

    struct Output: Encodable {
        let domain: String
        let agentVersion: String
        let protocolVersion: Int
        let capabilities: [String]
        let kernelRelease: String
        let hostname: String
        let uptimeSeconds: UInt64
        let execAllowed: Bool
    }

    func run() throws {
        let session = try Resolve.session(name, global)
        let i = try session.info()
        let out = Output(domain: name, agentVersion: i.agentVersion, protocolVersion: Int(i.protocolVersion),
                         capabilities: i.capabilities, kernelRelease: i.kernelRelease, hostname: i.hostname,
                         uptimeSeconds: i.uptimeSeconds, execAllowed: i.execAllowed)
        if json { return try printJSON(out) }
        print("Domain:        \(name)")
        // Every field comes from the guest: shown escaped and bounded.
        print("Agent:         virtchan-agent \(displaySafe(i.agentVersion)) (protocol \(i.protocolVersion))")
        print("Capabilities:  \(displaySafe(i.capabilities.joined(separator: " ")))")
        print("Kernel:        \(displaySafe(i.kernelRelease))")
        print("Hostname:      \(displaySafe(i.hostname))")
        print("Uptime:        \(i.uptimeSeconds) s")
        print("Exec:          \(i.execAllowed ? "allowed" : "denied by policy")")
    }
}

struct Exec: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "exec",
        abstract: "Run a command in the guest, streaming its output; exits with the command's code.",
        discussion: """
        stdout and stderr arrive as the guest process writes them; stdin is forwarded until EOF \
        (use -n to give the command no input). Ctrl-C sends SIGINT to the guest process (a \
        third one sends SIGKILL). Exit code: the command's, 128+N if signal N ended it, 124 on \
        --timeout, 126 if it cannot be executed, 127 if not found, 125 if virtchan failed.

        When nothing reads the output any more (exec vm -- yes | head), the command gets \
        SIGPIPE on its next write, as in a local pipeline. With -t, the guest's terminal \
        follows this terminal's size.

        Example: printf 'a\\nb\\n' | virtchan exec vm -- sort -r
        """)

    @OptionGroup var global: GlobalOptions
    @Argument(help: "Domain name.") var name: String
    @Option(help: "Kill the command after this many seconds and exit 124.") var timeout: Double?
    @Option(name: .customLong("env"), help: "Set KEY=VALUE in the command's environment (repeatable).") var env: [String] = []
    @Option(help: "Working directory in the guest.") var cwd: String?
    @Flag(name: [.customShort("t"), .long], help: "Run the command on a pseudo-terminal.") var tty = false
    @Flag(name: [.customShort("n"), .customLong("no-stdin")], help: "Do not forward stdin.") var noStdin = false
    @Argument(parsing: .postTerminator, help: "The command and its arguments, after --.") var command: [String] = []

    func validate() throws {
        guard !command.isEmpty else { throw ValidationError("give the command after --, e.g. virtchan exec \(name) -- uname -a") }
        if let t = timeout, t <= 0 { throw ValidationError("--timeout must be positive") }
        for e in env where !e.contains("=") || e.hasPrefix("=") { throw ValidationError("--env takes KEY=VALUE, not '\(e)'") }
    }

    func run() throws {
        let session: AgentSession
        do {
            session = try Resolve.session(name, global)
        } catch {
            throw CLIError("\(error)", exitCode: 125)
        }
        var options = ExecOptions(argv: command)
        options.env = env
        options.cwd = cwd ?? ""
        options.tty = tty
        options.timeout = timeout
        options.forwardStdin = !noStdin
        do {
            let result = try ExecClient.run(session, options)
            if result.timedOut {
                FileHandle.standardError.write(Data("virtchan: \(command[0]) timed out after \(formatSeconds(timeout ?? 0)) and was killed\n".utf8))
            }
            throw ExitCode(result.status)
        } catch let e as TransportError {
            if let remote = e.remote {
                switch remote.remoteCode {
                case .commandNotFound: throw CLIError(remote.message, exitCode: 127)
                case .permission: throw CLIError(remote.message, exitCode: 126)
                case .denied: throw CLIError(remote.message, exitCode: 126)
                default: throw CLIError(remote.message, exitCode: 125)
                }
            }
            throw CLIError(e.message, exitCode: 125)
        }
    }
}
