import Glibc
import VirtchanProtocol

/// `virtchan exec` on one domain as a command line reads it, and how it ends: shared by the
/// full program and by `virtchan`'s short path, which serves this command alone.
public struct ExecCommandLine {
    public var name = ""
    /// The libvirt URI given with -c, if any.
    public var connect: String?
    public var insecureAgent = false
    /// Seconds the domain's session holder stays after the last command.
    public var persist: Double = 60
    public var options = ExecOptions(argv: [])

    public init() {}

    /// `exec NAME [-n] [-t] [-c URI] [--persist S] [--insecure-agent] -- COMMAND...` (the
    /// words after the program's name), read without an argument parser. Anything else,
    /// every mistake and --help among them, is nil: the full parser reads and reports it.
    public init?(quickForm arguments: ArraySlice<String>) {
        guard arguments.first == "exec", let dashes = arguments.firstIndex(of: "--") else { return nil }
        options.argv = Array(arguments[arguments.index(after: dashes)...])
        guard !options.argv.isEmpty else { return nil }
        var names: [String] = []
        var rest = arguments[arguments.index(after: arguments.startIndex)..<dashes].makeIterator()
        while let word = rest.next() {
            switch word {
            case "-n", "--no-stdin": options.forwardStdin = false
            case "-t", "--tty": options.tty = true
            case "--insecure-agent": insecureAgent = true
            case "-c", "--connect":
                // A second URI makes it a fleet command.
                guard connect == nil, let uri = rest.next() else { return nil }
                connect = uri
            case "--persist":
                guard let text = rest.next(), let seconds = Double(text), seconds >= 0, seconds.isFinite else { return nil }
                persist = seconds
            default:
                guard !word.hasPrefix("-") else { return nil }
                names.append(word)
            }
        }
        guard names.count == 1 else { return nil }
        name = names[0]
    }

    /// How `virtchan exec` ends: the exit status, and a line for stderr when it failed.
    public struct Ending {
        public var status: Int32
        public var message: String?
    }

    /// Runs the command on `session`, streaming as `virtchan exec` does. The status is the
    /// command's (128+N for signal N, 124 when --timeout killed it), 127 when it is not found,
    /// 126 when it cannot be run, 125 when virtchan failed.
    public static func run(_ session: AgentSession, _ options: ExecOptions) -> Ending {
        do {
            let result = try ExecClient.run(session, options)
            if result.timedOut {
                writeStderrLine("virtchan: \(options.argv[0]) timed out after \(formatSeconds(options.timeout ?? 0)) and was killed")
            }
            return Ending(status: result.status, message: nil)
        } catch {
            guard let remote = error.remote else { return Ending(status: 125, message: error.message) }
            switch remote.remoteCode {
            case .commandNotFound: return Ending(status: 127, message: remote.message)
            case .permission, .denied: return Ending(status: 126, message: remote.message)
            default: return Ending(status: 125, message: remote.message)
            }
        }
    }
}

extension AgentSession {
    /// The warning for an agent that proves nothing (none when it holds a key).
    public var unkeyedWarning: String? {
        agentHoldsKey ? nil : "warning: the agent in \(endpoint.domain) holds no key; anything that reaches its channel can drive it"
    }
}
