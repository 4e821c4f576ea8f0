import ArgumentParser
import Foundation
import VirtchanKit

struct Holder: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "holder",
        abstract: "List or stop the session holders that share each domain's channels.",
        discussion: """
        A domain's channels take one client at a time, so the first virtchan command on a \
        domain starts a session holder: a background process that keeps the channels open and \
        serves every later command on that domain (any number at once), as an ssh ControlMaster \
        does. It stays --persist seconds (default 60) after the last command, and ends at once \
        when the domain stops. Transfers take turns on the data channel; one that waits says so. \
        Only the holder's user (or root) can use it. While it runs, its log is its socket's path plus .log.
        """,
        subcommands: [HolderList.self, HolderStop.self, HolderServe.self])
}

struct HolderList: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "list", abstract: "List this user's running session holders.")
    @Flag(help: "Print JSON.") var json = false

    func run() throws {
        let records = Hypervisor.holders()
        if json { return try printJSON(records) }
        printTable(["Domain", "URI", "PID", "Persist"], records.map { [$0.domain, $0.uri, String($0.pid), "\(Int($0.persistSeconds)) s"] })
    }
}

struct HolderStop: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "stop",
        abstract: "Stop session holders; commands still using them end with an error.")
    @OptionGroup var global: GlobalOptions
    @Argument(help: "Domain names (on --connect's URI).") var names: [String] = []
    @Flag(help: "Stop every holder of this user, on any URI.") var all = false

    func validate() throws {
        if all == !names.isEmpty { throw ValidationError("name one or more domains, or pass --all") }
    }

    func run() throws {
        var stuck: [HolderRecord] = []
        if all {
            for record in Hypervisor.holders() {
                if Hypervisor.stop(record) { say("Stopped the holder of \(record.domain) on \(record.uri)") } else { stuck.append(record) }
            }
        } else {
            let hypervisor = global.hypervisor()
            for name in names {
                guard let (record, stopped) = hypervisor.stopHolder(of: name) else {
                    say("No holder runs for \(name) on \(hypervisor.uri)")
                    continue
                }
                if stopped { say("Stopped the holder of \(name)") } else { stuck.append(record) }
            }
        }
        guard stuck.isEmpty else {
            throw CLIError(stuck.map { "the holder of \($0.domain) on \($0.uri) (pid \($0.pid)) did not end within 5 s; kill -9 \($0.pid) ends it" }
                .joined(separator: "; "))
        }
    }
}

/// What a command runs in the background; not for people.
struct HolderServe: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "serve", abstract: "Run a session holder in the foreground.",
                                                    shouldDisplay: false)
    @OptionGroup var global: GlobalOptions
    @Option(parsing: .unconditional, help: "Seconds to wait for the agent.") var timeout: Double = 10
    @Option(help: "Descriptor to report readiness on.") var readyFd: Int32?
    @Argument(help: "Domain name.") var name: String

    func run() throws {
        var options = SessionHolder.Options()
        options.persist = global.persist
        let status = global.hypervisor().serveHolder(name, options: options, timeout: timeout, ready: readyFd)
        if status != 0 { throw ExitCode(status) }
    }
}
