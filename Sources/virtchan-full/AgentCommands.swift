import ArgumentParser
import Foundation
import VirtchanKit

struct Wait: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "wait",
        abstract: "Wait until the agent in a domain says hello (and deliver a pending bootstrap).",
        discussion: """
        With --cloud-init it also waits until cloud-init in the guest has finished: exit 0 when it \
        succeeded, 1 with cloud-init's own report when it failed.

        """ + FleetOptions.exitDiscussion)

    @OptionGroup var global: GlobalOptions
    @Argument(help: "Domain name (several for a fleet command).") var names: [String] = []
    @Option(parsing: .unconditional, help: "Give up after this many seconds (default 90, 600 with --cloud-init).") var timeout: Double?
    @Flag(help: "Also wait until cloud-init has finished its work in the guest.") var cloudInit = false
    @OptionGroup var fleet: FleetOptions
    @Flag(help: "On several domains: one JSON record per domain.") var json = false

    func validate() throws {
        try requireSeconds(timeout, "--timeout")
        try requireDomains(names, fleet)
    }

    func run() throws {
        let timeout = self.timeout ?? (cloudInit ? 600 : 90)
        guard fleet.isFleet(names, global) else {
            let start = Date()
            let session = try global.waitForAgent(names[0], timeout: timeout)
            say(Self.ready(session, names[0], since: start))
            if let code = try global.hypervisor().runPendingBootstrap(names[0], session: session, options: .printing(timeout: nil)), code != 0 {
                throw ExitCode(code)
            }
            if cloudInit {
                let code = try Self.waitForCloudInit(names[0], global.hypervisor(), session, since: start, timeout: timeout,
                                                     say: say, warn: { FileHandle.standardError.write(Data(($0 + "\n").utf8)) })
                if code != 0 { throw ExitCode(code) }
            }
            return
        }
        let cloudInit = self.cloudInit
        try runFleet(names, global, fleet, json: json) { member, output, target in
            let start = Date()
            let session = try target.waitForAgent(member.name, timeout: timeout)
            output.say(Self.ready(session, member.name, since: start))
            var options = BootstrapRunOptions()
            options.progress = { output.say($0) }
            options.output = { stream, bytes in output.write(stream, bytes); return true }
            let code = try target.hypervisor().runPendingBootstrap(member.name, session: session, options: options) ?? 0
            guard code == 0, cloudInit else { return code }
            return try Self.waitForCloudInit(member.name, target.hypervisor(), session, since: start, timeout: timeout,
                                             say: { output.say($0) }, warn: { output.say($0, to: .stderr) })
        }
    }

    /// Waits for cloud-init within what is left of `timeout`; 0 when it succeeded, else 1 after
    /// its report went to `warn`.
    static func waitForCloudInit(_ name: String, _ hypervisor: Hypervisor, _ session: AgentSession, since start: Date, timeout: Double,
                                 say: (String) -> Void, warn: (String) -> Void) throws -> Int32 {
        let status = try hypervisor.waitForCloudInit(name, session: session, timeout: max(1, timeout - Date().timeIntervalSince(start)))
        if status.succeeded {
            say(String(format: "cloud-init in %@ finished: %@ (%.1f s)", name, status.status, Date().timeIntervalSince(start)))
            return 0
        }
        warn("cloud-init in \(name) failed (\(status.status), exit \(status.exitCode)):\n\(status.report)")
        return 1
    }

    static func ready(_ session: AgentSession, _ name: String, since start: Date) -> String {
        String(format: "Agent %@ in %@ is ready (%.1f s)", displaySafe(session.hello.agentVersion, limit: 64), name, Date().timeIntervalSince(start))
    }
}


struct Ping: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "ping", abstract: "Measure round trips to the agent.",
                                                    discussion: FleetOptions.exitDiscussion)

    @OptionGroup var global: GlobalOptions
    @Argument(help: "Domain name (several for a fleet command).") var names: [String] = []
    @OptionGroup var fleet: FleetOptions
    @Option(name: [.customShort("n"), .long], parsing: .unconditional, help: "Number of pings.") var count: Int = 4
    @Option(parsing: .unconditional, help: "Seconds between pings.") var interval: Double = 0
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
        try requireSeconds(interval, "--interval", orZero: true)
        try requireDomains(names, fleet)
    }

    func run() throws {
        guard !fleet.isFleet(names, global) else {
            let (count, interval) = (self.count, self.interval)
            try runFleet(names, global, fleet, json: json) { member, output, target in
                let session = try target.session(member.name) { output.say($0, to: .stderr) }
                for i in 0..<count {
                    if i > 0 && interval > 0 { Thread.sleep(forTimeInterval: interval) }
                    output.say(String(format: "seq=%d time=%.3f ms", i + 1, try session.ping() * 1000))
                }
                return 0
            }
        }
        let name = names[0]
        let session = try global.session(name)
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
        let os: String
        let interfaces: [GuestInterface]
    }

    func run() throws {
        let session = try global.session(name)
        let i = try session.info()
        let out = Output(domain: name, agentVersion: i.agentVersion, protocolVersion: Int(i.protocolVersion),
                         capabilities: i.capabilities, kernelRelease: i.kernelRelease, hostname: i.hostname,
                         uptimeSeconds: i.uptimeSeconds, execAllowed: i.execAllowed,
                         os: i.osName, interfaces: i.interfaces)
        if json { return try printJSON(out) }
        print("Domain:        \(name)")
        // Every field comes from the guest: shown escaped and bounded.
        print("Agent:         virtchan-agent \(displaySafe(i.agentVersion)) (protocol \(i.protocolVersion))")
        print("Capabilities:  \(displaySafe(i.capabilities.joined(separator: " ")))")
        print("OS:            \(i.osName.isEmpty ? "-" : displaySafe(i.osName))")
        print("Kernel:        \(displaySafe(i.kernelRelease))")
        print("Hostname:      \(displaySafe(i.hostname))")
        print("Uptime:        \(i.uptimeSeconds) s")
        print("Exec:          \(i.execAllowed ? "allowed" : "denied by policy")")
        for (n, interface) in i.interfaces.enumerated() {
            print("\(n == 0 ? "Addresses:" : "          ")    \(displaySafe(interface.name, limit: 64)): \(interface.addresses.map { displaySafe($0, limit: 64) }.joined(separator: " "))")
        }
    }
}

struct UpdateAgent: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "update-agent",
        abstract: "Replace the agent in a running guest with this host's and restart it.",
        discussion: """
        For guests whose agent runs as virtchan-agent.service (from a cloud image's seed, or the \
        .deb). The binary is pushed over the channel, verified, renamed into place, and the \
        service restarted; the command returns once the new agent answers. The seed's copy does \
        not undo it at the next boot.
        """)

    @OptionGroup var global: GlobalOptions
    @Argument(help: "Domain name.") var name: String
    @Option(help: ArgumentHelp("The agent binary (default: the one Scripts/build-guest built).", valueName: "file")) var agent: String?
    @Option(parsing: .unconditional, help: "Give up after this many seconds.") var timeout: Double = 120

    func validate() throws {
        try requireSeconds(timeout, "--timeout")
    }

    func run() throws {
        let session = try global.hypervisor().updateAgent(name, binary: agent, timeout: timeout)
        say("Agent \(displaySafe(session.hello.agentVersion, limit: 64)) in \(name) updated and answering")
    }
}
