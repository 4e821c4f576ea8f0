import ArgumentParser
import Foundation
import VirtchanKit

/// The first-boot options of `create`.
struct BootstrapOptions: ParsableArguments {
    @Option(help: "Script to push and run in the guest once the agent says hello.") var bootstrap: String?
    @Option(name: .customLong("bootstrap-file"), help: "LOCAL:REMOTE file to push before the script (repeatable).")
    var bootstrapFiles: [String] = []
    @Option(name: .customLong("bootstrap-env"), help: "KEY=VALUE for the script's environment (repeatable).")
    var bootstrapEnv: [String] = []
    @Option(parsing: .unconditional, help: "Kill the script after this many seconds and mark the bootstrap failed.") var bootstrapTimeout: Double?
    @Flag(help: "Destroy the domain when the bootstrap fails.") var destroyOnFailure = false

    /// Checks the script and files before anything is defined.
    func plan() throws -> BootstrapPlan? {
        guard let bootstrap else {
            if !bootstrapFiles.isEmpty || !bootstrapEnv.isEmpty {
                throw ValidationError("--bootstrap-file and --bootstrap-env go with --bootstrap")
            }
            return nil
        }
        return try BootstrapPlan(script: bootstrap, files: bootstrapFiles, env: bootstrapEnv, timeout: bootstrapTimeout)
    }
}

extension BootstrapRunOptions {
    /// Steps on stdout and the script's output on this process's stdout and stderr.
    static func printing(force: Bool = false, timeout: Double?) -> BootstrapRunOptions {
        var options = BootstrapRunOptions()
        options.force = force
        options.timeout = timeout
        options.progress = say
        options.output = { stream, bytes in writeFully(stream == .stderr ? 2 : 1, bytes) }
        return options
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
        @Option(parsing: .unconditional, help: "Kill the script after this many seconds.") var timeout: Double?
        @Option(parsing: .unconditional, help: "Seconds to wait for the agent.") var waitTimeout: Double = 90

        func validate() throws {
            try requireSeconds(timeout, "--timeout")
            try requireSeconds(waitTimeout, "--wait-timeout")
        }

        func run() throws {
            let hypervisor = global.hypervisor()
            // Refuse a second runner before touching the (exclusive) channel.
            try hypervisor.refuseConcurrentBootstrap(name)
            let session = try global.waitForAgent(name, timeout: waitTimeout)
            let code = try hypervisor.runBootstrap(name, session: session, options: .printing(force: force, timeout: timeout))
            if code != 0 {
                FileHandle.standardError.write(Data("virtchan: bootstrap failed with exit code \(code) (see: \(hypervisor.suggested("bootstrap log", name)))\n".utf8))
            }
            throw ExitCode(code)
        }
    }

    struct BootstrapStatus: ParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "status", abstract: "Show the bootstrap's state.",
            discussion: "On several domains, one line each; a domain counts as succeeded when its bootstrap has. " + FleetOptions.exitDiscussion)
        @OptionGroup var global: GlobalOptions
        @Argument(help: "Domain name (several for a fleet command).") var names: [String] = []
        @OptionGroup var fleet: FleetOptions
        @Flag(help: "Print JSON.") var json = false

        func validate() throws { try requireDomains(names, fleet) }

        func run() throws {
            guard !fleet.isFleet(names, global) else {
                try runFleet(names, global, fleet, json: json) { member, output, target in
                    guard let b = try target.hypervisor().bootstrapStatus(member.name) else {
                        output.say("no bootstrap")
                        return 1
                    }
                    var line = "\(b.state.rawValue) \(b.script)"
                    if let c = b.exitCode { line += " (exit \(c))" }
                    if let r = b.reason { line += ": \(r)" }
                    output.say(line)
                    return b.state == .succeeded ? 0 : 1
                }
            }
            let name = names[0]
            guard let b = try global.hypervisor().bootstrapStatus(name) else {
                throw CLIError("domain \(name) has no bootstrap")
            }
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
            guard let data = try global.hypervisor().bootstrapLog(name) else {
                throw CLIError("no bootstrap log for \(name) yet (see: \(global.hypervisor().suggested("bootstrap status", name)))")
            }
            FileHandle.standardOutput.write(data)
        }
    }
}
