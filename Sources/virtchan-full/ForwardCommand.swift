import ArgumentParser
import Foundation
import VirtchanKit

struct Forward: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "forward",
        abstract: "Forward TCP ports between the host and the guest over the channel.",
        discussion: """
        Each LOCAL, [BIND:]PORT:GUEST_HOST:GUEST_PORT as with ssh -L, listens on the host at \
        BIND:PORT (default 127.0.0.1) and connects each client to GUEST_HOST:GUEST_PORT as the \
        guest sees it (127.0.0.1 is the guest's own loopback). -R [BIND:]GUEST_PORT:HOST:PORT \
        listens in the guest and connects each client to HOST:PORT as this host sees it: a \
        guest with no network reaches a package cache or proxy on the host. The guest's side \
        takes IP addresses or localhost; this host's side may also be a name, looked up once at \
        start. Port 0 picks a free port, printed at start.

        No network is involved: every connection is carried on the domain's control channel, \
        each with its own flow control, so a stalled one holds up no other, nor any exec or \
        transfer on the domain; the guest needs only the agent.

        The command serves in the foreground until Ctrl-C (or SIGTERM), then resets the \
        connections still open. With --background it returns once every port is bound and a \
        process of its own serves them, until 'virtchan forward --stop NAME' (or the domain \
        stops); 'virtchan forward --list' shows those running.

        Examples:
          virtchan forward vm1 8080:127.0.0.1:80 -R 3142:127.0.0.1:3142
          virtchan forward vm1 8080:127.0.0.1:80 --background
          virtchan forward --stop vm1
        """)

    @OptionGroup var global: GlobalOptions
    @Argument(help: "Domain name.") var name: String?
    @Argument(help: ArgumentHelp("Host port to a guest service: [BIND:]PORT:GUEST_HOST:GUEST_PORT.", valueName: "local"))
    var local: [String] = []
    @Option(name: .customShort("R"), help: ArgumentHelp("Guest port to a host service: [BIND:]GUEST_PORT:HOST:PORT (repeatable).", valueName: "remote"))
    var remote: [String] = []
    @Flag(help: "Serve from a background process, and return once the ports are bound.")
    var background = false
    @Flag(help: "List the forwards running in the background (every domain, every URI).")
    var list = false
    @Flag(help: "Stop the background forwards of the domain named (on --connect's URI), or with --all every one.")
    var stop = false
    @Flag(help: "With --stop: every background forward of this user.")
    var all = false
    @Flag(help: "With --list or --background: print JSON (with --background, the forward's record).")
    var json = false
    @Option(help: ArgumentHelp("Descriptor to report readiness on.", visibility: .private)) var readyFd: Int32?
    @Option(help: ArgumentHelp("Where a background forward keeps its files.", visibility: .private)) var record: String?

    func validate() throws {
        if list || stop {
            guard !(list && stop), local.isEmpty, remote.isEmpty, !background else {
                throw ValidationError("--list and --stop take no ports, and not each other or --background")
            }
            if list && (name != nil || all) { throw ValidationError("--list takes no domain: it lists them all") }
            if stop && all == (name != nil) { throw ValidationError("--stop takes a domain name, or --all") }
            return
        }
        if all { throw ValidationError("--all goes with --stop") }
        if json && !background { throw ValidationError("--json goes with --list or --background") }
        guard let name else { throw ValidationError("name a domain, e.g. virtchan forward vm1 8080:127.0.0.1:80") }
        guard !local.isEmpty || !remote.isEmpty else {
            throw ValidationError("give a port to forward, e.g. virtchan forward \(name) 8080:127.0.0.1:80")
        }
        for text in local where ForwardSpec(text, direction: .local) == nil {
            throw ValidationError("'\(text)' is not [BIND:]PORT:GUEST_HOST:GUEST_PORT")
        }
        for text in remote where ForwardSpec(text, direction: .remote) == nil {
            throw ValidationError("-R '\(text)' is not [BIND:]GUEST_PORT:HOST:PORT")
        }
        for spec in specs {
            do { try spec.checkGuestSide() } catch { throw ValidationError(error.message) }
        }
    }

    /// The forwards asked for (those that parse: validate() has refused the others).
    var specs: [ForwardSpec] {
        local.compactMap { ForwardSpec($0, direction: .local) } + remote.compactMap { ForwardSpec($0, direction: .remote) }
    }

    func run() throws {
        if list { return try listBackground() }
        if stop { return try stopBackground() }
        guard let name else { return }
        if let readyFd, let record {
            let status = global.hypervisor().serveForwards(name, specs: specs, path: record, ready: readyFd)
            throw ExitCode(status)
        }
        if background {
            let record: ForwardRecord
            do {
                record = try global.hypervisor().forwardInBackground(name, specs: specs)
            } catch {
                throw namingBackgroundForwards(error)
            }
            if json { return try printJSON(record) }
            for f in record.forwards { say("Forwarding \(f)") }
            say("Serving in the background (pid \(record.pid)); stop with: \(global.hypervisor().suggested("forward --stop", name))")
            return
        }
        Interruption.install()
        let session = try global.session(name)
        let forwarder = PortForwarder(session: session, specs: specs) { text in
            FileHandle.standardError.write(Data("virtchan: \(text)\n".utf8))
        }
        do {
            try forwarder.start()
        } catch {
            throw namingBackgroundForwards(error)
        }
        for b in forwarder.bound { say("Forwarding \(b)") }
        say("Serving until Ctrl-C")
        do {
            try forwarder.run()
        } catch {
            // Ctrl-C is how it is meant to end: no error, the status a shell expects.
            guard error.code == .interrupted else { throw error }
            throw ExitCode(128 + (error.signal ?? SIGINT))
        }
    }

    /// `error`, naming virtchan's own background forward when one already listens where a
    /// port of this command would (a forward started twice).
    private func namingBackgroundForwards(_ error: Error) -> Error {
        for spec in specs {
            guard let other = Hypervisor.backgroundForward(listeningAs: spec) else { continue }
            let stop = Hypervisor(uri: other.uri).suggested("forward --stop", other.domain)
            return CLIError("\(error); a background forward of \(other.domain) (pid \(other.pid)) listens there: stop it with: \(stop)")
        }
        return error
    }

    private func listBackground() throws {
        let records = Hypervisor.backgroundForwards()
        if json { return try printJSON(records) }
        printTable(["Domain", "URI", "PID", "Forwards"], records.map { [$0.domain, $0.uri, String($0.pid), $0.forwards.joined(separator: ", ")] })
    }

    private func stopBackground() throws {
        let uri = global.hypervisor().uri
        let picked = Hypervisor.backgroundForwards().filter { all || ($0.domain == name && $0.uri == uri) }
        if picked.isEmpty {
            say(all ? "No forward runs in the background" : "No forward runs in the background for \(name ?? "") on \(uri)")
            return
        }
        var stuck: [ForwardRecord] = []
        for record in picked {
            if Hypervisor.stop(record) {
                say("Stopped forwarding \(record.forwards.joined(separator: ", ")) for \(record.domain)")
            } else {
                stuck.append(record)
            }
        }
        guard stuck.isEmpty else {
            throw CLIError(stuck.map { "the forward of \($0.domain) (pid \($0.pid)) did not end within 5 s; kill -9 \($0.pid) ends it" }
                .joined(separator: "; "))
        }
    }
}
