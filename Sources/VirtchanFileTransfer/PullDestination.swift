import Glibc
import VirtchanProtocol
import VirtchanTransport

/// How a pull lands what the guest sends.
public struct PullOptions: Sendable {
    /// Keep setuid, setgid and sticky bits from the guest's modes (only root may ask).
    public var preserveSpecialModes = false
    /// Also compute SHA-256 in the guest.
    public var guestSHA256 = false
    /// Make each file durable before it replaces its destination: its data goes to disk while
    /// it arrives and an fsync ends it, so a crash of the host cannot leave it empty or partial.
    /// Without it a pull is as durable as `cp`: the rename is still atomic, the data reaches the
    /// disk when the kernel writes it back.
    public var sync = false

    public init(preserveSpecialModes: Bool = false, guestSHA256: Bool = false, sync: Bool = false) {
        self.preserveSpecialModes = preserveSpecialModes
        self.guestSHA256 = guestSHA256
        self.sync = sync
    }

    /// The mode a file or directory gets on the host: the guest's permission bits, without
    /// setuid, setgid and sticky unless they are asked for.
    public func hostMode(_ guestMode: UInt32) -> UInt32 {
        guestMode & (preserveSpecialModes ? 0o7777 : 0o777)
    }
}

/// What a tree copy moved.
public struct TreeSummary: Sendable, Codable {
    public var files = 0
    public var directories = 0
    public var symlinks = 0
    /// FIFOs, sockets and devices, which are not copied.
    public var skipped = 0
    public var bytes: UInt64 = 0
    public var seconds: Double = 0
    public init() {}
}

extension FileTransfer {
    /// Pulls `remote` to the host path `local`. An existing directory `local` receives the file
    /// under its own name; a FIFO or device there is written into, as `cp` does; anything
    /// else lands atomically (a temporary file beside it, renamed once it verifies) with the
    /// guest's mode, less the special bits.
    public func pull(_ remote: String, toPath local: String, options: PullOptions = PullOptions(),
                     progress: ProgressHandler? = nil) throws(TransportError) -> TransferSummary {
        var dest = local
        if fileType(local) == S_IFDIR {
            dest = (local.hasSuffix("/") ? local : local + "/") + lastComponent(remote)
        }
        if let type = fileType(dest), [S_IFIFO, S_IFCHR, S_IFBLK].contains(type) {
            let fd = open(dest, O_WRONLY | O_CLOEXEC | O_NOCTTY)
            guard fd >= 0 else {
                throw TransportError.system("cannot open \(dest)")
            }
            defer { close(fd) }
            return try pull(remote, into: fd, guestSHA256: options.guestSHA256, progress: progress)
        }
        let dir = try DirectoryHandle.open(parentPath(dest))
        return try land(remote, in: dir, name: lastComponent(dest), options: options, progress: progress)
    }

    /// Pulls `remote` into a new file `name` of `dir`: a temporary file first, its mode set on
    /// the open descriptor, then renamed over whatever `name` was (never through it).
    func land(_ remote: String, in dir: DirectoryHandle, name: String, options: PullOptions,
              progress: ProgressHandler? = nil) throws(TransportError) -> TransferSummary {
        let (fd, temp) = try dir.makeTemporaryFile(for: name)
        var committed = false
        defer {
            close(fd)
            if !committed { unlinkat(dir.fd, temp, 0) }
        }
        let summary = try pull(remote, into: fd, guestSHA256: options.guestSHA256, durable: options.sync, progress: progress)
        try DirectoryHandle.setMode(fd, options.hostMode(summary.mode ?? 0o644), of: dir.join(name))
        if options.sync && fsync(fd) != 0 && errno != EINVAL {
            throw TransportError.system("cannot write \(dir.join(name))")
        }
        try dir.rename(temp, to: name)
        committed = true
        return summary
    }

    /// Pulls the tree `remote` into `local`. A new `local` appears whole or not at all (it is
    /// built beside, under a temporary name, and renamed into place); into an existing
    /// directory, a failure says which entries were already written. Nothing the guest lists
    /// can lead outside `local`: every step below it is taken relative to an open directory
    /// and refuses symbolic links. A tree that would not fit is refused before anything is
    /// written. A FIFO, socket or device in the tree is not copied; its guest path goes to
    /// `skipped` (as the guest names it: make it safe to show).
    public func pullTree(_ remote: String, toPath local: String, options: PullOptions = PullOptions(),
                         skipped: (String) -> Void = { _ in }) throws(TransportError) -> TreeSummary {
        let start = monotonicNanos()
        let entries = try listTree(remote)
        var summary: TreeSummary
        if let type = fileType(local) {
            guard type == S_IFDIR else {
                throw TransportError(.invalidArgument, "\(local) exists and is not a directory")
            }
            let root = try DirectoryHandle.open(local)
            try checkSpace(for: entries, of: remote, in: root, replacing: local)
            var written: [String] = []
            do {
                summary = try fill(root, from: remote, entries, options: options, written: &written, skipped: skipped)
            } catch {
                guard !written.isEmpty else { throw error }
                let shown = written.prefix(5).joined(separator: ", ") + (written.count > 5 ? ", …" : "")
                throw error.appending("; \(local) was already partly updated: \(written.count) of \(entries.count) entries written (\(shown))")
            }
        } else {
            let parent = try DirectoryHandle.open(parentPath(local))
            try checkSpace(for: entries, of: remote, in: parent, replacing: nil)
            let base = lastComponent(local)
            let temp = try parent.makeTemporaryDirectory(for: base)
            var committed = false
            defer { if !committed { parent.removeTree(temp) } }
            let root = try parent.child(temp)
            var written: [String] = []
            summary = try fill(root, from: remote, entries, options: options, written: &written, skipped: skipped)
            let umask = Glibc.umask(0)
            Glibc.umask(umask)
            try DirectoryHandle.setMode(root.fd, 0o777 & ~UInt32(umask), of: local)
            try parent.rename(temp, to: base)
            committed = true
        }
        summary.seconds = Double(monotonicNanos() - start) / 1e9
        return summary
    }

    /// Refuses a tree before anything is written when its files, as the guest lists them, do not
    /// fit on the file system of `dir`: each lands beside the file it replaces under `existing`
    /// (if any) before the old one goes, in the order of the listing. So a full disk does not
    /// leave an existing directory half updated.
    private func checkSpace(for entries: [TreeEntry], of remote: String, in dir: DirectoryHandle,
                            replacing existing: String?) throws(TransportError) {
        // What the files written so far add, and the most that is needed at any one time. The
        // sizes are the guest's: the sums stop at Int64.max rather than wrap round.
        func sum(_ a: Int64, _ b: Int64) -> Int64 {
            let (total, overflow) = a.addingReportingOverflow(b)
            return overflow ? .max : total
        }
        var added: Int64 = 0, peak: Int64 = 0
        for e in entries where e.kind == .regular {
            let size = Int64(clamping: e.size)
            var st = Glibc.stat()
            let old = existing.flatMap { lstat($0 + "/" + e.path, &st) == 0 && st.st_mode & S_IFMT == S_IFREG ? Int64(st.st_size) : nil } ?? 0
            peak = max(peak, sum(added, size))
            added = sum(added, size) - old
        }
        guard let free = freeBytes(onFileSystemOf: dir.fd), peak > 0, UInt64(peak) > free else { return }
        throw TransportError(.io, "not enough space for \(remote): its files need \(peak) bytes at once and the local file system has \(free) free")
    }

    /// Creates the listed directories, files and links under `root`; directory modes last, so
    /// a read-only directory does not block its own contents.
    private func fill(_ root: DirectoryHandle, from remote: String, _ entries: [TreeEntry], options: PullOptions,
                      written: inout [String], skipped: (String) -> Void) throws(TransportError) -> TreeSummary {
        var summary = TreeSummary()
        for e in entries where e.kind == .other {
            skipped(remote + "/" + e.path)
            summary.skipped += 1
        }
        func place(_ path: String) throws(TransportError) -> (DirectoryHandle, String) {
            let parts = path.split(separator: "/")
            return (try root.descend(parts.dropLast()), String(parts[parts.count - 1]))
        }
        for e in entries where e.kind == .directory {
            let (parent, name) = try place(e.path)
            let (_, created) = try parent.makeDirectory(name)
            if created { written.append(e.path) }
            summary.directories += 1
        }
        for e in entries where e.kind == .regular {
            let (parent, name) = try place(e.path)
            let s = try land(remote + "/" + e.path, in: parent, name: name, options: options)
            written.append(e.path)
            summary.files += 1
            summary.bytes += s.bytes
        }
        for e in entries where e.kind == .symlink {
            let (parent, name) = try place(e.path)
            try parent.makeSymlink(name, to: e.linkTarget)
            written.append(e.path)
            summary.symlinks += 1
        }
        for e in entries.reversed() where e.kind == .directory {
            let dir = try root.descend(e.path.split(separator: "/"))
            try DirectoryHandle.setMode(dir.fd, options.hostMode(e.mode), of: dir.path)
        }
        return summary
    }
}

/// The type bits of what `path` names, following links (the user typed it); nil when nothing is there.
func fileType(_ path: String) -> mode_t? {
    var st = stat()
    return stat(path, &st) == 0 ? st.st_mode & S_IFMT : nil
}

/// The last component of a path ("b" of "/a/b/").
func lastComponent(_ path: String) -> String {
    String(path.split(separator: "/").last ?? Substring(path))
}

/// The directory a path is in ("." for a bare name, "/" for "/x").
func parentPath(_ path: String) -> String {
    let trimmed = path.hasSuffix("/") && path.count > 1 ? String(path.dropLast()) : path
    guard let slash = trimmed.lastIndex(of: "/") else { return "." }
    return slash == trimmed.startIndex ? "/" : String(trimmed[..<slash])
}
