import CSpawn
import Glibc
import VirtchanProtocol

/// Entry names of a directory, without "." and "..".
func listDirectory(_ path: String) -> [String]? {
    guard let dir = opendir(path) else { return nil }
    defer { closedir(dir) }
    var names: [String] = []
    while let entry = readdir(dir) {
        let name = withUnsafeBytes(of: entry.pointee.d_name) { raw in
            String(decoding: raw.prefix(while: { $0 != 0 }), as: UTF8.self)
        }
        if name != "." && name != ".." { names.append(name) }
    }
    return names.sorted()
}

func trimmed(_ s: String) -> String {
    var scalars = Substring(s)
    while let f = scalars.first, f == " " || f == "\n" || f == "\t" || f == "\r" { scalars.removeFirst() }
    while let l = scalars.last, l == " " || l == "\n" || l == "\t" || l == "\r" { scalars.removeLast() }
    return String(scalars)
}

func errnoText(_ e: Int32) -> String { String(cString: strerror(e)) }

/// Maps an errno from a file operation to the wire's error code.
func remoteCode(forErrno e: Int32) -> RemoteErrorCode {
    switch e {
    case ENOENT: return .notFound
    case EEXIST: return .exists
    case EISDIR: return .isDirectory
    case ENOTDIR: return .notDirectory
    case EACCES, EPERM, EROFS: return .permission
    case ENOSPC, EDQUOT: return .noSpace
    case EBUSY: return .busy
    case EFBIG: return .tooLarge
    default: return .failed
    }
}

func parentDirectory(of path: String) -> String {
    guard let slash = path.lastIndex(of: "/") else { return "." }
    let parent = String(path[..<slash])
    return parent.isEmpty ? "/" : parent
}

func baseName(of path: String) -> String {
    guard let slash = path.lastIndex(of: "/") else { return path }
    return String(path[path.index(after: slash)...])
}

/// mkdir -p. Returns 0 or an errno.
func makeDirectories(_ path: String, mode: mode_t) -> Int32 {
    var st = stat()
    if stat(path, &st) == 0 { return (st.st_mode & S_IFMT) == S_IFDIR ? 0 : ENOTDIR }
    let parent = parentDirectory(of: path)
    if parent != path && parent != "/" && parent != "." {
        let e = makeDirectories(parent, mode: 0o755)
        if e != 0 { return e }
    }
    if mkdir(path, mode) != 0 && errno != EEXIST { return errno }
    return 0
}

/// read(2), made again when a signal interrupted it: the one place the agent retries EINTR
/// on a read. Returns the byte count, 0 at the end, or -1 with `errno` set.
func readRestarting(_ fd: Int32, _ p: UnsafeMutableRawPointer, _ count: Int) -> Int {
    while true {
        let n = read(fd, p, count)
        if n >= 0 || errno != EINTR { return n }
    }
}

/// Writes all of `count` bytes to a blocking descriptor. Returns 0 or an errno.
func writeAll(_ fd: Int32, _ p: UnsafeRawPointer, _ count: Int) -> Int32 {
    var done = 0
    while done < count {
        let n = write(fd, p + done, count - done)
        if n > 0 { done += n; continue }
        if n < 0 && errno == EINTR { continue }
        return n < 0 ? errno : EIO
    }
    return 0
}

/// pipe(2) with both ends close-on-exec, optionally non-blocking.
func makePipe(nonBlocking: Bool = false) -> (read: Int32, write: Int32)? {
    var fds: [Int32] = [0, 0]
    guard vc_pipe2(&fds, O_CLOEXEC | (nonBlocking ? O_NONBLOCK : 0)) == 0 else { return nil }
    return (fds[0], fds[1])
}

nonisolated(unsafe) private var signalPipeWriteEnd: Int32 = -1
/// The actions `SignalPipe.install` replaced, put back by `uninstall`.
nonisolated(unsafe) private var replacedActions: [Int32: sigaction] = [:]

/// The self-pipe the poll loop watches: each caught signal becomes one byte holding its number.
enum SignalPipe {
    static func install(_ signals: [Int32]) -> Int32 {
        guard let fds = makePipe(nonBlocking: true) else { return -1 }
        signalPipeWriteEnd = fds.write
        for sig in signals {
            var action = sigaction()
            action.__sigaction_handler.sa_handler = { sig in
                let saved = errno
                var byte = UInt8(truncatingIfNeeded: sig)
                _ = write(signalPipeWriteEnd, &byte, 1)
                errno = saved
            }
            action.sa_flags = SA_RESTART
            sigemptyset(&action.sa_mask)
            var replaced = sigaction()
            sigaction(sig, &action, &replaced)
            if replacedActions[sig] == nil { replacedActions[sig] = replaced }
        }
        signal(SIGPIPE, SIG_IGN)
        return fds.read
    }

    /// Puts back the actions `install` replaced (a process that runs the agent among other
    /// work keeps its own) and stops feeding the pipe.
    static func uninstall(_ signals: [Int32]) {
        for sig in signals {
            guard var replaced = replacedActions.removeValue(forKey: sig) else { continue }
            sigaction(sig, &replaced, nil)
        }
        let writeEnd = signalPipeWriteEnd
        signalPipeWriteEnd = -1
        if writeEnd >= 0 { close(writeEnd) }
    }

    /// Feeds `sig` to the loop as if it had been caught.
    static func post(_ sig: Int32) {
        var byte = UInt8(truncatingIfNeeded: sig)
        _ = write(signalPipeWriteEnd, &byte, 1)
    }

    /// The signal numbers that arrived since the last call.
    static func drain(_ fd: Int32) -> [Int32] {
        var out: [Int32] = []
        var buf = [UInt8](repeating: 0, count: 64)
        while true {
            let n = buf.withUnsafeMutableBytes { read(fd, $0.baseAddress!, $0.count) }
            if n <= 0 { break }
            out.append(contentsOf: buf[0..<n].map { Int32($0) })
        }
        return out
    }
}
