import ArgumentParser
import Foundation
import VirtchanKit

@main
struct Virtchan: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "virtchan",
        abstract: "Network-free host <-> guest messaging over virtio-serial channels of libvirt/QEMU domains.",
        discussion: """
        virtchan defines and starts domains with a control and a data channel already wired, \
        talks to virtchan-agent inside the guest through them, and runs commands, copies files \
        and runs first-boot scripts without any network.

        The libvirt URI is --connect, else LIBVIRT_DEFAULT_URI, else qemu:///system; a \
        libvirtd that does not answer is given up on after 30 s (90 s on another host; \
        VIRTCHAN_CONNECT_TIMEOUT=SECONDS sets it). \
        Exit codes: 0 success; 1 error; 64 bad usage; for exec, the guest command's own code \
        (128+N when killed by signal N, 124 on --timeout, 125 when virtchan itself failed, \
        126 not executable, 127 command not found).
        """,
        version: virtchanVersion,
        subcommands: [Create.self, ListDomains.self, Channels.self, XMLCommand.self, Destroy.self, Prune.self,
                      Wait.self, Ping.self, InfoCommand.self, Exec.self, Push.self, Pull.self,
                      Forward.self, Bootstrap.self, Reboot.self, UpdateAgent.self, Holder.self])

    static func main() {
        do {
            // The commonest short command skips building the parser, a reflection of every
            // subcommand that is about a third of a warm `exec vm -- true`.
            if let quick = ExecCommandLine(quickForm: CommandLine.arguments.dropFirst()) {
                let target = Target(connect: quick.connect, insecureAgent: quick.insecureAgent, persist: quick.persist)
                try Exec.run(quick.options, in: quick.name, through: target)
            }
            var command: ParsableCommand
            do {
                command = try parseAsRoot()
            } catch {
                exitForUsage(error)
            }
            try command.run()
        } catch let code as ExitCode {
            // exec passing the guest's code through: nothing to print.
            Foundation.exit(code.rawValue)
        } catch let error as CLIError {
            report(error.message)
            Foundation.exit(error.exitCode)
        } catch let error as VirtchanError {
            report(error.message)
            Foundation.exit(error.code == .invalidRequest ? 64 : 1)
        } catch let error as ProvisioningError {
            report(error.message)
            Foundation.exit(1)
        } catch let error as TransportError {
            report(error.message)
            // Interrupted: the status of a process that the signal ended, as a shell expects.
            Foundation.exit(error.signal.map { 128 + $0 } ?? 1)
        } catch {
            exitForUsage(error)
        }
    }

    /// Bad usage is one line and exit 64, as for every other error; --help and --version
    /// print as ArgumentParser formats them.
    static func exitForUsage(_ error: Error) -> Never {
        let code = exitCode(for: error)
        guard code.rawValue == 64 else { exit(withError: error) }
        let hint = fullMessage(for: error).split(separator: "\n").first { $0.contains("See '") }
            .map { " (" + $0.trimmingCharacters(in: .whitespaces).replacingOccurrences(of: " for more information.", with: "").lowercased() + ")" } ?? ""
        report(message(for: error) + hint)
        Foundation.exit(64)
    }

    static func report(_ message: String) {
        FileHandle.standardError.write(Data("virtchan: error: \(message)\n".utf8))
    }
}

/// A failure to report in one line, with the exit code it calls for.
struct CLIError: Error, CustomStringConvertible {
    var description: String { message }
    let message: String
    let exitCode: Int32
    init(_ message: String, exitCode: Int32 = 1) {
        self.message = message
        self.exitCode = exitCode
    }
}

struct GlobalOptions: ParsableArguments {
    @Option(name: [.customShort("c"), .long], help: "libvirt URI (default: $LIBVIRT_DEFAULT_URI or qemu:///system). Fleet commands take it more than once.")
    var connect: [String] = []
    @Flag(help: "Use an agent that holds no key (anything that reaches its channel can drive it).")
    var insecureAgent = false
    @Option(parsing: .unconditional, help: ArgumentHelp("Seconds the domain's session holder stays after the last command (0: it ends with the last one).",
                               discussion: "Commands on one domain share one holder process, started by the first; see 'virtchan holder --help'.",
                               valueName: "seconds"))
    var persist: Double = 60

    func validate() throws {
        try requireSeconds(persist, "--persist", orZero: true)
    }

    /// The options as a plain value, which commands pass on. A command on one domain takes
    /// the last --connect.
    var target: Target { Target(connect: connect.last, insecureAgent: insecureAgent, persist: persist) }

    func hypervisor() -> Hypervisor { target.hypervisor() }
    func session(_ name: String, timeout: Double = 10) throws -> AgentSession { try target.session(name, timeout: timeout) }
    func waitForAgent(_ name: String, timeout: Double) throws -> AgentSession { try target.waitForAgent(name, timeout: timeout) }
    func transfer(_ name: String) throws -> FileTransfer { try target.transfer(name) }
}

/// Where a command goes (the libvirt URI) and how it reaches agents there.
struct Target {
    var connect: String?
    var insecureAgent = false
    var persist: Double = 60

    func hypervisor() -> Hypervisor {
        Hypervisor(uri: connect, allowsUnkeyedAgents: insecureAgent, sharing: .holder(persist: persist))
    }

    /// A session with the agent in `name`; a warning about a keyless agent goes to `warn`.
    func session(_ name: String, timeout: Double = 10, warn: (String) -> Void = Target.warnOnStderr) throws -> AgentSession {
        warnIfUnkeyed(try hypervisor().session(with: name, timeout: timeout), warn: warn)
    }

    /// A session once the agent in `name` says hello, waiting up to `timeout` for it.
    func waitForAgent(_ name: String, timeout: Double) throws -> AgentSession {
        warnIfUnkeyed(try hypervisor().waitForAgent(name, timeout: timeout))
    }

    /// A file mover on a session with `name`; while other transfers on the domain go first,
    /// it says so on stderr.
    func transfer(_ name: String) throws -> FileTransfer {
        let transfer = FileTransfer(session: try session(name))
        transfer.onQueued = { ahead in
            FileHandle.standardError.write(Data("virtchan: waiting for the data channel of \(name): \(ahead) transfer\(ahead == 1 ? "" : "s") ahead\n".utf8))
        }
        return transfer
    }

    static func warnOnStderr(_ text: String) {
        FileHandle.standardError.write(Data("virtchan: \(text)\n".utf8))
    }

    private func warnIfUnkeyed(_ session: AgentSession, warn: (String) -> Void = Target.warnOnStderr) -> AgentSession {
        if let warning = session.unkeyedWarning { warn(warning) }
        return session
    }
}

/// Refuses a number of seconds that is none: NaN, infinite, negative, or 0 unless `orZero`.
func requireSeconds(_ value: Double?, _ option: String, orZero: Bool = false) throws {
    guard let value else { return }
    guard value.isFinite, orZero ? value >= 0 : value > 0 else {
        throw ValidationError("\(option) takes \(orZero ? "0 or more" : "a positive number of") seconds, not \(String(format: "%g", value))")
    }
}

func printJSON<T: Encodable>(_ value: T) throws {
    let encoder = JSONEncoder()
    encoder.outputFormatting = [.prettyPrinted, .sortedKeys, .withoutEscapingSlashes]
    let data = try encoder.encode(value)
    FileHandle.standardOutput.write(data)
    FileHandle.standardOutput.write(Data("\n".utf8))
}

/// A table with left-aligned columns, as virsh prints them.
func printTable(_ header: [String], _ rows: [[String]]) {
    var widths = header.map(\.count)
    for row in rows { for (i, cell) in row.enumerated() { widths[i] = max(widths[i], cell.count) } }
    func line(_ cells: [String]) -> String {
        cells.enumerated().map { i, c in i == cells.count - 1 ? c : c.padding(toLength: widths[i], withPad: " ", startingAt: 0) }
            .joined(separator: "  ")
    }
    print(line(header))
    for row in rows { print(line(row)) }
}

extension Accelerator: ExpressibleByArgument {}
extension RebootMethod: ExpressibleByArgument {}

/// A status line on stdout, written at once: streamed guest output goes out unbuffered too,
/// and the two must not change order when stdout is a pipe or a file.
func say(_ line: String) {
    FileHandle.standardOutput.write(Data((line + "\n").utf8))
}
