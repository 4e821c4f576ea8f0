import ArgumentParser
import Foundation
import VirtchanKit

struct TransferOptions: ParsableArguments {
    @Flag(name: .shortAndLong, help: "Copy a directory tree (regular files, directories, symlinks, modes).") var recursive = false
    @Flag(help: "Also compute SHA-256 in the guest and compare (slow under TCG).") var sha256 = false
    @Flag(help: "Print a JSON summary (bytes, seconds, sha256).") var json = false
    @Flag(name: .shortAndLong, help: "No progress bar or summary line.") var quiet = false

    /// The host computes a file's SHA-256 only to print it (--json) or to compare it (--sha256).
    func configure(_ transfer: FileTransfer) {
        transfer.hostSHA256 = json || sha256
    }
}

struct Push: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "push",
        abstract: "Copy a file (or, with -r, a tree) from the host into the guest.",
        discussion: """
        LOCAL '-' reads stdin. REMOTE is an absolute path in the guest (an existing directory \
        receives the file under its own name); the file lands there atomically (temporary file \
        + rename) after its checksum verifies. With -r, LOCAL's contents go into the directory \
        REMOTE, which is created if missing.

        With several domains (virtchan push vm1 vm2 ./f /opt/f, --all, --match) the file goes to \
        each, --parallel at a time; stdin cannot be LOCAL then. \(FleetOptions.exitDiscussion)
        """)

    @OptionGroup var global: GlobalOptions
    @Argument(help: ArgumentHelp("The domain (or several), the local file (- for stdin), and the absolute destination path in the guest.",
                                 valueName: "name> ... <local> <remote"))
    var items: [String] = []
    @OptionGroup var fleet: FleetOptions
    @Option(help: "File mode in octal (default: the local file's, 0644 for stdin).") var mode: String?
    @Flag(name: [.customShort("p"), .long], help: "Create missing parent directories in the guest.") var parents = false
    @OptionGroup var options: TransferOptions

    var names: [String] { Array(items.dropLast(2)) }
    var local: String { items[items.count - 2] }
    var remote: String { items[items.count - 1] }

    func validate() throws {
        guard items.count >= (fleet.all || !fleet.match.isEmpty ? 2 : 3) else {
            throw ValidationError("give the domain, the local file and the guest path, e.g. virtchan push vm ./app.tar /opt/app.tar")
        }
        guard remote.hasPrefix("/") else { throw ValidationError("REMOTE must be an absolute path in the guest, not '\(remote)'") }
        if fleet.isFleet(names, global) && local == "-" { throw ValidationError("stdin goes to one domain; push a file to several") }
        if let mode, UInt32(mode, radix: 8).map({ $0 <= 0o7777 }) != true {
            throw ValidationError("--mode takes an octal mode such as 0644, not '\(mode)'")
        }
        if options.recursive && local == "-" { throw ValidationError("-r cannot read a tree from stdin") }
    }

    func run() throws {
        let explicitMode = mode.flatMap { UInt32($0, radix: 8) }
        var st = stat()
        if local != "-" {
            guard lstat(local, &st) == 0 else { throw CLIError("cannot read \(local): \(String(cString: strerror(errno)))") }
            let isDir = (st.st_mode & S_IFMT) == S_IFDIR
            if isDir && !options.recursive { throw CLIError("\(local) is a directory (use -r to copy a tree)") }
            if !isDir && options.recursive { throw CLIError("\(local) is not a directory; drop -r to copy one file") }
        }
        if fleet.isFleet(names, global) { try pushToFleet(explicitMode) }
        let name = names[0]
        // Ctrl-C ends the push with its own status and a word; the agent drops what it had.
        Interruption.install()
        let transfer = try global.transfer(name)
        options.configure(transfer)
        if options.recursive {
            let summary = try transfer.pushTree(local, to: remote, mode: explicitMode, parents: parents,
                                                guestSHA256: options.sha256) { path in
                FileHandle.standardError.write(Data("virtchan: skipping \(path): not a file, directory or symlink\n".utf8))
            }
            if options.json { return try printJSON(summary) }
            print("\(describe(summary)) pushed to \(remote)")
            return
        }
        let dest = try Self.destination(of: local, at: remote, over: transfer)
        let bar = ProgressBar(label: "push", enabled: !options.quiet && isatty(2) == 1)
        let summary: TransferSummary
        if local == "-" {
            let (fd, size) = try spoolStdin()
            defer { close(fd) }
            summary = try transfer.push(fd: fd, size: size, to: dest, mode: explicitMode ?? 0o644, parents: parents,
                                        guestSHA256: options.sha256, progress: bar.update)
        } else {
            summary = try transfer.push(file: local, to: dest, mode: explicitMode, parents: parents,
                                        guestSHA256: options.sha256, progress: bar.update)
        }
        bar.finish()
        if options.json { return try printJSON(summary) }
        if !options.quiet {
            FileHandle.standardError.write(Data(String(format: "%@ -> %@:%@: %@ in %.2f s (%.1f MiB/s)\n", local, name, dest,
                                                       bytes(summary.bytes), summary.seconds, summary.mibPerSecond).utf8))
        }
    }

    /// Onto a directory, the file goes in under its own name, as with cp and scp.
    static func destination(of local: String, at remote: String, over transfer: FileTransfer) throws -> String {
        guard try transfer.stat(remote).kind == .directory else { return remote }
        guard local != "-" else { throw CLIError("\(remote) is a directory in the guest; name the file stdin should become") }
        return (remote.hasSuffix("/") ? remote : remote + "/") + (local as NSString).lastPathComponent
    }

    /// The same file (or tree) to every domain of the fleet, one line each.
    private func pushToFleet(_ explicitMode: UInt32?) throws -> Never {
        let (local, remote, recursive, parents, sha256) = (self.local, self.remote, options.recursive, self.parents, options.sha256)
        try runFleet(names, global, fleet, json: options.json) { member, output, target in
            let session = try target.session(member.name) { output.say($0, to: .stderr) }
            let transfer = FileTransfer(session: session)
            // A fleet's summary has no SHA-256 to print: only --sha256 needs the host's.
            transfer.hostSHA256 = sha256
            transfer.onQueued = { ahead in output.say("waiting for the data channel: \(ahead) transfer\(ahead == 1 ? "" : "s") ahead", to: .stderr) }
            if recursive {
                let s = try transfer.pushTree(local, to: remote, mode: explicitMode, parents: parents, guestSHA256: sha256) { path in
                    output.say("skipping \(path): not a file, directory or symlink", to: .stderr)
                }
                output.say("\(describe(s)) pushed to \(remote)")
            } else {
                let dest = try Self.destination(of: local, at: remote, over: transfer)
                let s = try transfer.push(file: local, to: dest, mode: explicitMode, parents: parents, guestSHA256: sha256, progress: nil)
                output.say(String(format: "%@ -> %@: %@ in %.2f s (%.1f MiB/s)", local, dest, bytes(s.bytes), s.seconds, s.mibPerSecond))
            }
            return 0
        }
    }

    /// Stdin, spooled to an unlinked temporary file so that its size is known before it is sent.
    private func spoolStdin() throws -> (fd: Int32, size: UInt64) {
        var template = Array((NSTemporaryDirectory() + "/virtchan-stdin-XXXXXX").utf8CString)
        let fd = template.withUnsafeMutableBufferPointer { mkstemp($0.baseAddress!) }
        guard fd >= 0 else { throw CLIError("cannot create a temporary file: \(String(cString: strerror(errno)))") }
        unlink(template)
        let buf = UnsafeMutableRawBufferPointer.allocate(byteCount: 1 << 20, alignment: 16)
        defer { buf.deallocate() }
        var total: UInt64 = 0
        do {
            while true {
                // Each time round: a stdin that never ends (cat /dev/zero) still stops at Ctrl-C.
                try Interruption.check()
                let n = read(0, buf.baseAddress!, buf.count)
                if n < 0 && errno == EINTR { continue }
                if n < 0 { throw CLIError("reading stdin: \(String(cString: strerror(errno)))") }
                if n == 0 { break }
                guard writeFully(fd, UnsafeRawBufferPointer(rebasing: buf[0..<n])) else {
                    throw CLIError("spooling stdin: \(String(cString: strerror(errno)))")
                }
                total += UInt64(n)
            }
        } catch {
            close(fd)
            throw error
        }
        lseek(fd, 0, SEEK_SET)
        return (fd, total)
    }
}

struct Pull: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "pull",
        abstract: "Copy a file (or, with -r, a tree) from the guest to the host.",
        discussion: """
        LOCAL '-' writes to stdout. An existing directory LOCAL receives the file under its own \
        name; a FIFO or device LOCAL is written into. Otherwise the file lands atomically after \
        its checksum verifies, and a failed or interrupted pull leaves nothing behind. Modes \
        come from the guest without setuid, setgid and sticky bits (root may keep them with \
        --preserve-special-modes). With -r, REMOTE's contents go into LOCAL: a new LOCAL \
        appears whole or not at all; a tree that would not fit is refused before anything is \
        written; into an existing directory, another failure names what was already written. No entry may lead outside LOCAL, and no symbolic link below LOCAL is \
        followed. As with cp, a pulled file reaches the disk when the kernel writes it back; \
        --sync makes each one durable (fsync) before it replaces LOCAL.
        """)

    @OptionGroup var global: GlobalOptions
    @Argument(help: "Domain name.") var name: String
    @Argument(help: "Absolute path in the guest.") var remote: String
    @Argument(help: "Local destination, or - for stdout.") var local: String
    @Flag(help: "Keep setuid, setgid and sticky bits from the guest (root only).") var preserveSpecialModes = false
    @Flag(help: "Flush each file to disk before it replaces LOCAL, so that a crash of the host cannot leave it partial.")
    var sync = false
    @OptionGroup var options: TransferOptions

    func validate() throws {
        guard remote.hasPrefix("/") else { throw ValidationError("REMOTE must be an absolute path in the guest, not '\(remote)'") }
        if options.recursive && local == "-" { throw ValidationError("-r cannot write a tree to stdout") }
        if preserveSpecialModes && geteuid() != 0 { throw ValidationError("--preserve-special-modes is for root only") }
    }

    func run() throws {
        let transfer = try global.transfer(name)
        options.configure(transfer)
        let pullOptions = PullOptions(preserveSpecialModes: preserveSpecialModes, guestSHA256: options.sha256, sync: sync)
        // A signal unwinds the pull, which removes its temporary files on the way out.
        Interruption.install()
        if options.recursive {
            let summary = try transfer.pullTree(remote, toPath: local, options: pullOptions) { path in
                FileHandle.standardError.write(Data("virtchan: skipping \(name):\(displaySafe(path, limit: 300)): not a file, directory or symlink\n".utf8))
            }
            if options.json { return try printJSON(summary) }
            print("\(describe(summary)) pulled into \(local)")
            return
        }
        let summary: TransferSummary
        if local == "-" {
            do {
                summary = try transfer.pull(remote, into: 1, guestSHA256: options.sha256)
            } catch {
                // The reader stopped early (| head, a pager that quit): end quietly, as cat
                // would, with the status of a process killed by SIGPIPE.
                if error.errno == EPIPE { throw ExitCode(128 + SIGPIPE) }
                throw error
            }
        } else {
            let bar = ProgressBar(label: "pull", enabled: !options.quiet && isatty(2) == 1)
            summary = try transfer.pull(remote, toPath: local, options: pullOptions, progress: bar.update)
            bar.finish()
        }
        if let g = summary.guestSHA256, g != summary.sha256 {
            throw CLIError("SHA-256 mismatch: host \(summary.sha256), guest \(g)")
        }
        if options.json { return try printJSON(summary) }
        if !options.quiet && local != "-" {
            FileHandle.standardError.write(Data(String(format: "%@:%@ -> %@: %@ in %.2f s (%.1f MiB/s)\n", name, remote, local,
                                                       bytes(summary.bytes), summary.seconds, summary.mibPerSecond).utf8))
        }
    }
}
