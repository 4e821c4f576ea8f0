import ArgumentParser
import Foundation
import VirtchanKit

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

        On several domains (virtchan exec vm1 vm2 -- uptime, --all, --match 'web-*'), stdin is \
        not forwarded, -t is refused, and Ctrl-C ends every command. \(FleetOptions.exitDiscussion)
        """)

    @OptionGroup var global: GlobalOptions
    @OptionGroup var fleet: FleetOptions
    @Flag(help: "On several domains: print one JSON record per domain (with its output) instead of lines.") var json = false
    @Option(parsing: .unconditional, help: "Kill the command after this many seconds and exit 124.") var timeout: Double?
    @Option(name: .customLong("env"), help: "Set KEY=VALUE in the command's environment (repeatable).") var env: [String] = []
    @Option(help: "Working directory in the guest.") var cwd: String?
    @Flag(name: [.customShort("t"), .long], help: "Run the command on a pseudo-terminal.") var tty = false
    @Flag(name: [.customShort("n"), .customLong("no-stdin")], help: "Do not forward stdin: the command's stdin is /dev/null (with -t, it gets EOF at once).") var noStdin = false
    // ArgumentParser takes no positional list before the one after --: both are one list here,
    // split at the first --.
    @Argument(parsing: .allUnrecognized,
              help: ArgumentHelp("The domain (several for a fleet command), then -- and the command with its arguments.",
                                 valueName: "name> ... -- <command"))
    var words: [String] = []

    var names: [String] { Array(words.prefix { $0 != "--" }) }
    var command: [String] { words.firstIndex(of: "--").map { Array(words[(words.index(after: $0))...]) } ?? [] }

    func validate() throws {
        if let unknown = names.first(where: { $0.hasPrefix("-") }) { throw ValidationError("Unknown option '\(unknown)'") }
        try requireDomains(names, fleet)
        guard !command.isEmpty else { throw ValidationError("give the command after --, e.g. virtchan exec \(names.first ?? "vm") -- uname -a") }
        if fleet.isFleet(names, global) && tty { throw ValidationError("-t runs one command on one terminal; it does not go with several domains") }
        if !fleet.isFleet(names, global) && json { throw ValidationError("--json goes with several domains; on one, the command's own output is the output") }
        try requireSeconds(timeout, "--timeout")
        for e in env where !e.contains("=") || e.hasPrefix("=") { throw ValidationError("--env takes KEY=VALUE, not '\(e)'") }
    }

    func run() throws {
        var options = ExecOptions(argv: command)
        options.env = env
        options.cwd = cwd ?? ""
        options.tty = tty
        options.timeout = timeout
        options.forwardStdin = !noStdin
        guard fleet.isFleet(names, global) else {
            return try Self.run(options, in: names[0], through: global.target)
        }
        options.forwardStdin = false
        options.forwardSignals = false
        let fleetOptions = options
        try runFleet(names, global, fleet, json: json) { member, output, target in
            let session = try target.session(member.name) { output.say($0, to: .stderr) }
            let result = try ExecClient.run(session, fleetOptions, stdin: -1, terminal: 1) { stream, bytes in
                output.write(stream, bytes)
                return true
            }
            if result.timedOut { output.say("\(fleetOptions.argv[0]) timed out and was killed", to: .stderr) }
            return result.status
        }
    }

    /// Runs the command; always ends by throwing, ExitCode with the guest's status or an error.
    static func run(_ options: ExecOptions, in name: String, through target: Target) throws {
        let session: AgentSession
        do {
            session = try target.session(name)
        } catch {
            throw CLIError("\(error)", exitCode: 125)
        }
        let ending = ExecCommandLine.run(session, options)
        if let message = ending.message { throw CLIError(message, exitCode: ending.status) }
        throw ExitCode(ending.status)
    }
}
