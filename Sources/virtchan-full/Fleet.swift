import ArgumentParser
import Foundation
import VirtchanKit
import VirtchanProtocol

/// The options that turn a command on one domain into one on many.
struct FleetOptions: ParsableArguments {
    @Flag(help: "Every domain virtchan manages on the --connect URIs (a stopped one counts as failed).")
    var all = false
    @Option(help: ArgumentHelp("Domains virtchan manages whose names match this shell glob (repeatable).", valueName: "glob"))
    var match: [String] = []
    @Option(parsing: .unconditional, help: ArgumentHelp("Domains worked on at once (default: 8 per CPU, at least 8, at most 64).", valueName: "n"))
    var parallel: Int?
    @Flag(help: "Print the domains' lines without their names in front.")
    var noPrefix = false

    func validate() throws {
        if let parallel, parallel < 1 { throw ValidationError("--parallel takes 1 or more") }
    }

    func selection(_ names: [String], _ global: GlobalOptions) -> FleetSelection {
        var s = FleetSelection()
        s.names = names
        s.all = all
        s.patterns = match
        s.uris = global.connect.isEmpty ? [nil] : global.connect
        return s
    }

    /// Several domains (or --all, --match, several URIs) make it a fleet command.
    func isFleet(_ names: [String], _ global: GlobalOptions) -> Bool { !selection(names, global).isSingle }

    static let exitDiscussion = """
        Several names, --all, --match or more than one --connect run it on every domain named, \
        --parallel at a time: each line comes out with its domain's name in front, then a summary \
        on stderr. Exit code: 0 when it succeeded on every domain, 1 when it failed on any (the \
        summary says where and how), 64 for bad usage. --json prints one record per domain.
        """
}

/// A command on domains needs at least one name, --all or --match.
func requireDomains(_ names: [String], _ fleet: FleetOptions) throws {
    guard !names.isEmpty || fleet.all || !fleet.match.isEmpty else {
        throw ValidationError("name a domain (or several, or use --all or --match)")
    }
}

/// Runs `job` on the domains a fleet command names, prints their lines and a summary (or
/// JSON), and ends the command: exit 0 when every domain succeeded, else 1. Ctrl-C ends it at
/// once, or with `unwinding`, ends each job at its next step, which undoes what it began.
func runFleet(_ names: [String], _ global: GlobalOptions, _ fleet: FleetOptions, json: Bool, unwinding: Bool = false,
              job: @escaping @Sendable (FleetMember, FleetOutput, Target) throws -> Int32) throws -> Never {
    let picked = Fleet.members(fleet.selection(names, global), allowsUnkeyedAgents: global.insecureAgent)
    if picked.members.isEmpty && picked.unreachable.isEmpty {
        throw CLIError("no domain matches \(fleet.match.isEmpty ? "--all" : fleet.match.map { "'\($0)'" }.joined(separator: ", ")) on \(global.connect.isEmpty ? Connection.defaultURI : global.connect.joined(separator: ", ")) (see: virtchan list\(global.connect.map { " -c " + shellWord($0) }.joined()))")
    }
    // Ctrl-C (or SIGTERM, SIGHUP) ends the whole command at once, even where the parent started
    // it with them ignored or blocked; each holder then kills the guest processes it ran for it.
    // (The job threads inherit the mask.)
    if unwinding {
        Interruption.install()
    } else {
        var endingSignals = sigset_t()
        sigemptyset(&endingSignals)
        for sig in [SIGINT, SIGTERM, SIGHUP] {
            sigaddset(&endingSignals, sig)
            signal(sig) { _exit(128 + $0) }
        }
        pthread_sigmask(SIG_UNBLOCK, &endingSignals, nil)
    }
    let printer = FleetPrinter(picked.members, prefixed: !fleet.noPrefix, collecting: json)
    var outcomes = Fleet.run(picked.members, parallel: fleet.parallel ?? Fleet.defaultParallelism,
                             lines: { printer.line($0, $1, $2) }) { member, output in
        let target = Target(connect: member.uri, insecureAgent: global.insecureAgent, persist: global.persist)
        return try job(member, output, target)
    }
    for (uri, reason) in picked.unreachable {
        outcomes.append(FleetOutcome(name: "", uri: uri, exitCode: nil, seconds: 0, error: reason))
    }
    if json {
        try printJSON(outcomes.map { FleetRecord($0, printer.collected[FleetMember(name: $0.name, uri: $0.uri)]) })
    } else {
        printer.summary(outcomes)
    }
    // Stopped by a signal: the status of a command that the signal ended, as a shell expects.
    if unwinding, let sig = Interruption.pending { throw ExitCode(128 + sig) }
    throw ExitCode(outcomes.allSatisfy(\.succeeded) ? 0 : 1)
}

/// A domain's record in a fleet command's --json output.
struct FleetRecord: Encodable {
    let name: String
    let uri: String
    let exitCode: Int32?
    let seconds: Double
    let error: String?
    let stdout: String
    let stderr: String

    init(_ o: FleetOutcome, _ lines: (stdout: [String], stderr: [String])?) {
        name = o.name
        uri = o.uri
        exitCode = o.exitCode
        seconds = (o.seconds * 1000).rounded() / 1000
        error = o.error
        stdout = lines.map { $0.stdout.map { $0 + "\n" }.joined() } ?? ""
        stderr = lines.map { $0.stderr.map { $0 + "\n" }.joined() } ?? ""
    }
}

/// Writes the domains' lines as they come, each whole and behind its domain's name (aligned,
/// in colour on a terminal), or keeps them for --json.
final class FleetPrinter: @unchecked Sendable {
    private let lock = NSLock()
    private let labels: [FleetMember: String]
    private let colours: [FleetMember: String]
    private let width: Int
    private let prefixed: Bool
    private let collecting: Bool
    private let colourOut = FleetPrinter.wantsColour(1)
    private let colourErr = FleetPrinter.wantsColour(2)
    private(set) var collected: [FleetMember: (stdout: [String], stderr: [String])] = [:]

    init(_ members: [FleetMember], prefixed: Bool, collecting: Bool) {
        // The URI goes into the label only where one name is on several URIs.
        let byName = Dictionary(grouping: members, by: \.name)
        var labels: [FleetMember: String] = [:]
        var colours: [FleetMember: String] = [:]
        let palette = ["36", "33", "35", "32", "34", "31", "96", "93", "95", "92", "94", "91"]
        for (i, m) in members.enumerated() {
            labels[m] = byName[m.name]!.count > 1 ? "\(m.name)@\(m.uri)" : m.name
            colours[m] = palette[i % palette.count]
        }
        self.labels = labels
        self.colours = colours
        width = labels.values.map(\.count).max() ?? 0
        self.prefixed = prefixed
        self.collecting = collecting
    }

    static func wantsColour(_ fd: Int32) -> Bool {
        isatty(fd) == 1 && getenv("NO_COLOR") == nil && getenv("TERM").map { String(cString: $0) } != "dumb"
    }

    func label(_ m: FleetMember) -> String { labels[m] ?? m.name }

    func line(_ m: FleetMember, _ stream: ExecStream, _ text: String) {
        lock.lock()
        defer { lock.unlock() }
        if collecting {
            var entry = collected[m] ?? ([], [])
            if stream == .stderr { entry.stderr.append(text) } else { entry.stdout.append(text) }
            collected[m] = entry
            return
        }
        let fd: Int32 = stream == .stderr ? 2 : 1
        var out = ""
        if prefixed {
            let name = label(m).padding(toLength: width, withPad: " ", startingAt: 0)
            let colour = fd == 1 ? colourOut : colourErr
            out = colour ? "\u{1B}[\(colours[m] ?? "0")m\(name)\u{1B}[0m | " : "\(name) | "
        }
        out += text + "\n"
        _ = out.utf8CString.withUnsafeBytes { writeFully(fd, UnsafeRawBufferPointer(rebasing: $0.dropLast())) }
    }

    /// One line per domain on stderr (how it ended, how long it took), then the counts.
    func summary(_ outcomes: [FleetOutcome]) {
        let rows = outcomes.map { o -> (String, String) in
            let who = o.name.isEmpty ? o.uri : label(FleetMember(name: o.name, uri: o.uri))
            let how: String
            if let error = o.error { how = "failed: \(error)" }
            else if o.exitCode == 0 { how = "ok" }
            else { how = "exit \(o.exitCode ?? -1)" }
            return (who, String(format: "%@ (%.2f s)", how, o.seconds))
        }
        let w = rows.map(\.0.count).max() ?? 0
        var text = ""
        for (who, how) in rows { text += "virtchan: " + who.padding(toLength: w, withPad: " ", startingAt: 0) + "  " + how + "\n" }
        let failed = outcomes.filter { !$0.succeeded }.count
        text += "virtchan: \(outcomes.count) domain\(outcomes.count == 1 ? "" : "s"): \(outcomes.count - failed) succeeded, \(failed) failed\n"
        FileHandle.standardError.write(Data(text.utf8))
    }
}
