import ArgumentParser
import Foundation
import VirtchanKit

struct Forward: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "forward",
        abstract: "Forward TCP ports between the host and the guest over the channel, until Ctrl-C.",
        discussion: """
        Each LOCAL, [BIND:]PORT:GUEST_HOST:GUEST_PORT as with ssh -L, listens on the host at \
        BIND:PORT (default 127.0.0.1) and connects each client to GUEST_HOST:GUEST_PORT as the \
        guest sees it (127.0.0.1 is the guest's own loopback). -R [BIND:]GUEST_PORT:HOST:PORT \
        listens in the guest and connects each client to HOST:PORT as this host sees it: a \
        guest with no network reaches a package cache or proxy on the host. Addresses are IP \
        addresses or localhost; port 0 picks a free port, printed at start.

        No network is involved: every connection is carried on the domain's control channel, \
        each with its own flow control, so a stalled one holds up no other, nor any exec or \
        transfer on the domain. The command stays in the foreground and serves until Ctrl-C \
        (or SIGTERM), then resets the connections still open; the guest needs only the agent.

        Example: virtchan forward vm1 8080:127.0.0.1:80 -R 3142:127.0.0.1:3142
        """)

    @OptionGroup var global: GlobalOptions
    @Argument(help: "Domain name.") var name: String
    @Argument(help: ArgumentHelp("Host port to a guest service: [BIND:]PORT:GUEST_HOST:GUEST_PORT.", valueName: "local"))
    var local: [String] = []
    @Option(name: .customShort("R"), help: ArgumentHelp("Guest port to a host service: [BIND:]GUEST_PORT:HOST:PORT (repeatable).", valueName: "remote"))
    var remote: [String] = []

    func validate() throws {
        guard !local.isEmpty || !remote.isEmpty else {
            throw ValidationError("give a port to forward, e.g. virtchan forward \(name) 8080:127.0.0.1:80")
        }
        for text in local where ForwardSpec(text, direction: .local) == nil {
            throw ValidationError("'\(text)' is not [BIND:]PORT:GUEST_HOST:GUEST_PORT")
        }
        for text in remote where ForwardSpec(text, direction: .remote) == nil {
            throw ValidationError("-R '\(text)' is not [BIND:]GUEST_PORT:HOST:PORT")
        }
    }

    func run() throws {
        let specs = local.compactMap { ForwardSpec($0, direction: .local) } + remote.compactMap { ForwardSpec($0, direction: .remote) }
        Interruption.install()
        let session = try global.session(name)
        let forwarder = PortForwarder(session: session, specs: specs) { text in
            FileHandle.standardError.write(Data("virtchan: \(text)\n".utf8))
        }
        try forwarder.start()
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
}
