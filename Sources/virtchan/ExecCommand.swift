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
            session = try global.session(name)
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
