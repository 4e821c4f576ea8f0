import Glibc
import VirtchanProtocol
import VirtchanTransport

extension FileTransfer {
    /// Pushes the host file at `local` to `remote` in the guest, with `mode` (default: the
    /// file's own permission bits).
    public func push(file local: String, to remote: String, mode: UInt32? = nil, parents: Bool = false,
                     guestSHA256: Bool = false, progress: ProgressHandler? = nil) throws(TransportError) -> TransferSummary {
        let fd = open(local, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { throw TransportError.system("cannot open \(local)") }
        defer { close(fd) }
        var st = Glibc.stat()
        guard fstat(fd, &st) == 0 else { throw TransportError.system("cannot read \(local)") }
        guard st.st_mode & S_IFMT == S_IFREG else { throw TransportError(.invalidArgument, "\(local) is not a regular file") }
        return try push(fd: fd, size: UInt64(st.st_size), to: remote, mode: mode ?? UInt32(st.st_mode & 0o7777),
                        parents: parents, guestSHA256: guestSHA256, progress: progress)
    }

    /// Copies the host directory `local` into the guest directory `remote` (created with
    /// `mode`, default 0755): directories, regular files and symbolic links, with their
    /// permission bits. Anything else is passed to `skipped` and left out. With `guestSHA256`,
    /// each file's SHA-256 is computed in the guest too and a mismatch stops the copy.
    public func pushTree(_ local: String, to remote: String, mode: UInt32? = nil, parents: Bool = false,
                         guestSHA256: Bool = false, skipped: (String) -> Void = { _ in }) throws(TransportError) -> TreeSummary {
        let start = monotonicNanos()
        var summary = TreeSummary()
        try mkdir(remote, mode: mode ?? 0o755, parents: parents)
        // Links last, so that a link to a directory cannot redirect what follows into it.
        var links: [(target: String, at: String)] = []
        func walk(_ relative: String) throws(TransportError) {
            let dirPath = relative.isEmpty ? local : local + "/" + relative
            guard let dir = opendir(dirPath) else { throw TransportError.system("cannot read the directory \(dirPath)") }
            var names: [String] = []
            while let entry = readdir(dir) {
                let name = withUnsafeBytes(of: entry.pointee.d_name) { String(decoding: $0.prefix(while: { $0 != 0 }), as: UTF8.self) }
                if name != "." && name != ".." { names.append(name) }
            }
            closedir(dir)
            for name in names.sorted() {
                let rel = relative.isEmpty ? name : relative + "/" + name
                let path = local + "/" + rel
                let dest = remote + "/" + rel
                var st = Glibc.stat()
                guard lstat(path, &st) == 0 else { continue }
                let perm = UInt32(st.st_mode & 0o7777)
                switch st.st_mode & S_IFMT {
                case S_IFDIR:
                    try mkdir(dest, mode: perm, parents: false)
                    summary.directories += 1
                    try walk(rel)
                case S_IFREG:
                    let s = try push(file: path, to: dest, mode: perm, guestSHA256: guestSHA256)
                    summary.files += 1
                    summary.bytes += s.bytes
                case S_IFLNK:
                    var buf = [UInt8](repeating: 0, count: Int(PATH_MAX) + 1)
                    let n = buf.withUnsafeMutableBytes { readlink(path, $0.baseAddress!.assumingMemoryBound(to: CChar.self), $0.count - 1) }
                    guard n >= 0 else { throw TransportError.system("cannot read the link \(path)") }
                    links.append((String(decoding: buf[0..<n], as: UTF8.self), dest))
                default:
                    skipped(path)
                    summary.skipped += 1
                }
            }
        }
        try walk("")
        for link in links {
            try symlink(target: link.target, at: link.at)
            summary.symlinks += 1
        }
        summary.seconds = Double(monotonicNanos() - start) / 1e9
        return summary
    }
}
