import Glibc
import VirtchanProtocol

/// What the agent does to the guest's files: prepare a push, list a tree, snapshot a file
/// that reports size 0, stat, make directories and links.
enum FileOps {
    static func makeDirectory(_ request: MkdirRequest) throws(TransferFailure) {
        let mode = mode_t(request.mode & 0o7777)
        let rc = request.parents ? makeDirectories(request.path, mode: mode) : (mkdir(request.path, mode) == 0 ? 0 : errno)
        guard rc == 0 || (rc == EEXIST && statReply(request.path).kind == .directory) else {
            throw TransferFailure(errno: rc, "mkdir \(request.path)")
        }
        _ = chmod(request.path, mode)
    }

    static func makeSymlink(_ request: SymlinkRequest) throws(TransferFailure) {
        _ = unlink(request.path)
        guard symlink(request.target, request.path) == 0 else {
            throw TransferFailure(errno: errno, "symlink \(request.path)")
        }
    }

    /// Creates the temporary file a push writes into, next to its destination.
    static func preparePush(_ request: PushRequest) throws(TransferFailure) -> (fd: Int32, temp: String) {
        let path = request.path
        guard path.hasPrefix("/"), !path.hasSuffix("/") else {
            throw TransferFailure(.badRequest, "remote path must be absolute and name a file: \(path)")
        }
        var st = stat()
        if stat(path, &st) == 0 && (st.st_mode & S_IFMT) == S_IFDIR {
            throw TransferFailure(.isDirectory, "\(path) is a directory (use -r to copy a directory tree)")
        }
        let parent = parentDirectory(of: path)
        if stat(parent, &st) != 0 {
            let e = errno
            guard e == ENOENT, request.parents else {
                if e == ENOENT {
                    throw TransferFailure(.notFound, errno: e, "parent directory \(parent) does not exist (use --parents to create it)")
                }
                throw TransferFailure(errno: e, parent)
            }
            let rc = makeDirectories(parent, mode: 0o755)
            if rc != 0 { throw TransferFailure(errno: rc, "cannot create \(parent)") }
        } else if (st.st_mode & S_IFMT) != S_IFDIR {
            throw TransferFailure(.notDirectory, "\(parent) is not a directory")
        }
        var template = Array((parent == "/" ? "" : parent).utf8) + Array("/.\(baseName(of: path)).virtchan-XXXXXX".utf8) + [0]
        let fd = template.withUnsafeMutableBufferPointer { buf in
            buf.baseAddress!.withMemoryRebound(to: CChar.self, capacity: buf.count) { mkstemp($0) }
        }
        guard fd >= 0 else { throw TransferFailure(errno: errno, "cannot create a file in \(parent)") }
        _ = fcntl(fd, F_SETFD, FD_CLOEXEC)
        let temp = String(decoding: template.dropLast(), as: UTF8.self)
        // A file that cannot fit fails at once, before any byte moves. (Reserving the space
        // with fallocate would zero every page of a tmpfs first, at a real cost under TCG.)
        if request.size > 0, let free = freeBytes(onFileSystemOf: fd), free < request.size {
            close(fd)
            unlink(temp)
            throw TransferFailure(.noSpace, errno: ENOSPC, "not enough space in the guest for \(path) (\(request.size) bytes)")
        }
        return (fd, temp)
    }

    /// Walks `root` without following symlinks.
    static func listTree(_ root: String) throws(TransferFailure) -> [TreeEntry] {
        var st = stat()
        guard lstat(root, &st) == 0 else { throw TransferFailure(errno: errno, root) }
        guard (st.st_mode & S_IFMT) == S_IFDIR else { throw TransferFailure(.notDirectory, "\(root) is not a directory") }
        var out: [TreeEntry] = []
        var pending: [String] = [""]
        var nameBytes = 0
        while let rel = pending.popLast() {
            let dir = rel.isEmpty ? root : root + "/" + rel
            guard let names = listDirectory(dir) else { throw TransferFailure(errno: errno, dir) }
            for name in names {
                let relPath = rel.isEmpty ? name : rel + "/" + name
                let full = dir + "/" + name
                guard lstat(full, &st) == 0 else { continue }
                let perm = UInt32(st.st_mode & 0o7777)
                switch st.st_mode & S_IFMT {
                case S_IFDIR:
                    out.append(TreeEntry(kind: .directory, path: relPath, mode: perm, size: 0, linkTarget: ""))
                    pending.append(relPath)
                case S_IFREG:
                    out.append(TreeEntry(kind: .regular, path: relPath, mode: perm, size: UInt64(st.st_size), linkTarget: ""))
                case S_IFLNK:
                    var buf = [CChar](repeating: 0, count: 4097)
                    let n = readlink(full, &buf, 4096)
                    let target = n > 0 ? String(decoding: buf[0..<n].map { UInt8(bitPattern: $0) }, as: UTF8.self) : ""
                    out.append(TreeEntry(kind: .symlink, path: relPath, mode: perm, size: 0, linkTarget: target))
                default:
                    // A FIFO, socket or device: listed, so that the host can say it is left out.
                    out.append(TreeEntry(kind: .other, path: relPath, mode: perm, size: 0, linkTarget: ""))
                }
                if out.count > TreeLimits.maxEntries { throw TransferFailure(.tooLarge, "\(root) holds more than a million entries") }
                nameBytes += relPath.utf8.count + (out.last?.linkTarget.utf8.count ?? 0)
                if nameBytes > TreeLimits.maxTotalBytes || relPath.utf8.count > TreeLimits.maxPathBytes {
                    throw TransferFailure(.tooLarge, "the paths under \(root) are longer than one listing may carry")
                }
            }
        }
        return out
    }

    /// The largest file of unknown size (st_size 0) that a pull sends whole.
    static let maxSnapshot = 16 << 20

    /// Reads a file that reports size 0 (procfs, sysfs) into an unlinked file in /tmp and
    /// returns that, so a pull can announce its real size; nil when the file is truly empty.
    static func snapshot(_ fd: Int32, path: String) throws(TransferFailure) -> Int32? {
        var chunk = [UInt8](repeating: 0, count: 64 * 1024)
        var first = true
        var mem: Int32 = -1
        var total = 0
        while true {
            let n = chunk.withUnsafeMutableBytes { readRestarting(fd, $0.baseAddress!, $0.count) }
            if n < 0 {
                let e = errno
                if mem >= 0 { close(mem) }
                throw TransferFailure(errno: e, "reading \(path)")
            }
            if n == 0 { break }
            if first {
                first = false
                var template = Array("/tmp/.virtchan-snapshot-XXXXXX".utf8CString)
                mem = template.withUnsafeMutableBufferPointer { mkstemp($0.baseAddress!) }
                guard mem >= 0 else { throw TransferFailure(errno: errno, "cannot snapshot \(path)") }
                _ = fcntl(mem, F_SETFD, FD_CLOEXEC)
                template.withUnsafeBufferPointer { _ = unlink($0.baseAddress!) }
            }
            total += n
            let rc = chunk.withUnsafeBytes { writeAll(mem, $0.baseAddress!, n) }
            guard total <= maxSnapshot, rc == 0 else {
                close(mem)
                if rc != 0 { throw TransferFailure(errno: rc, "cannot snapshot \(path)") }
                throw TransferFailure(.tooLarge, "\(path) reports no size and holds more than \(maxSnapshot >> 20) MiB; copy it with exec (cat) instead")
            }
        }
        guard mem >= 0 else { return nil }
        lseek(mem, 0, SEEK_SET)
        return mem
    }

    static func statReply(_ path: String) -> StatReply {
        var st = stat()
        guard lstat(path, &st) == 0 else { return StatReply(kind: .missing, mode: 0, size: 0) }
        let kind: FileKind
        switch st.st_mode & S_IFMT {
        case S_IFREG: kind = .regular
        case S_IFDIR: kind = .directory
        case S_IFLNK: kind = .symlink
        default: kind = .other
        }
        return StatReply(kind: kind, mode: UInt32(st.st_mode & 0o7777), size: UInt64(st.st_size))
    }
}
