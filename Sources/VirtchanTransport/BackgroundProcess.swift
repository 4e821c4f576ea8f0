import Glibc
import VirtchanProtocol

/// What the processes virtchan leaves running share, session holders and background
/// forwards: how they report that they serve, and the lock each holds while it runs, which
/// tells a live one from the files a killed one left.
public enum BackgroundProcess {
    /// The line a background process reports on its ready pipe, one of `accepted` (`ready`,
    /// `held`), waiting at most `timeout`; throws what it reported as `error ...` (read by
    /// `decode`), or that it ended without one of those, or that it is still starting. `what`
    /// names it ("the session holder of vm1"), `log` is its log.
    public static func readyLine(_ fd: Int32, timeout: Double, accepting accepted: Set<String> = ["ready"],
                                 what: String, log: String, decode: (String) -> any Error) throws -> String {
        var bytes: [UInt8] = []
        let deadline = monotonicDeadline(after: timeout)
        var chunk = [UInt8](repeating: 0, count: 512)
        while bytes.count < 8192 && !bytes.contains(10) {
            try Interruption.check()
            var p = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
            let rc = poll(&p, 1, Poller.milliseconds(until: deadline))
            if rc < 0 && errno == EINTR { continue }
            if rc == 0 && monotonicNanos() < deadline { continue }
            if rc == 0 {
                // Still starting: waiting on libvirt, which answers nothing about a domain while
                // its libvirtd waits to open one of the domain's channels (see ChannelStream).
                throw TransportError(.busy, "\(what) did not start serving within \(formatSeconds(timeout)) (see \(log)): libvirt has not answered it, as happens while libvirtd waits for another client to let go of one of the domain's channels; it ends by itself once libvirt answers")
            }
            let n = rc < 0 ? -1 : read(fd, &chunk, chunk.count)
            if n < 0 && errno == EINTR { continue }
            if n <= 0 { break }
            bytes += chunk[0..<n]
        }
        let line = String(decoding: bytes.prefix { $0 != 10 }, as: UTF8.self)
        if line.hasPrefix("error ") { throw decode(String(line.dropFirst(6))) }
        guard accepted.contains(line) else { throw endedBeforeServing(what, log: log) }
        return line
    }

    public static func endedBeforeServing(_ what: String, log: String) -> TransportError {
        TransportError(.agentGone, "\(what) ended before it served (see \(log))")
    }

    /// Errors cross from a background process as `error LAYER CODE MESSAGE`, so the command
    /// reports (and exits with) what it would have met itself.
    public static func errorLine(layer: String, code: String, message: String) -> String {
        "error \(layer) \(code) " + String(message.map { $0 == "\n" ? " " : $0 })
    }

    public static func errorLine(_ error: TransportError) -> String {
        errorLine(layer: "transport", code: "\(error.code)", message: error.message)
    }

    /// The layer, code and message of an error line (less its `error `), and the error itself
    /// when it is the transport's.
    public static func readErrorLine(_ text: String) -> (layer: String, code: String, message: String)? {
        let parts = text.split(separator: " ", maxSplits: 2, omittingEmptySubsequences: false).map(String.init)
        return parts.count == 3 ? (parts[0], parts[1], parts[2]) : nil
    }

    /// An error line from a process that can fail in the transport only.
    public static func transportError(fromLine text: String) -> TransportError {
        guard let (layer, code, message) = readErrorLine(text) else { return TransportError(.agentGone, text) }
        return TransportError(layer == "transport" ? TransportError.Code(named: code) ?? .io : .io, message)
    }

    /// The lock `path.lock` (a holder's, a background forward's), or nil while another process
    /// has it. A lock file that its owner, ending at the same moment, or a listing that found it
    /// unlocked removed is not a lock: then try again.
    public static func takeLock(_ path: String) -> Int32? {
        while true {
            let fd = open(path + ".lock", O_RDWR | O_CREAT | O_NOFOLLOW | O_CLOEXEC, 0o600)
            guard fd >= 0 else { return nil }
            guard flock(fd, LOCK_EX | LOCK_NB) == 0 else {
                close(fd)
                return nil
            }
            var held = stat()
            var named = stat()
            if fstat(fd, &held) == 0, stat(path + ".lock", &named) == 0, held.st_ino == named.st_ino, held.st_dev == named.st_dev {
                return fd
            }
            close(fd)
        }
    }

    /// A holder (or background forward) outlives the command that started it: a descriptor it
    /// inherited by accident (a pipe a test harness reads to its end) must not stay open with it.
    public static func closeInheritedDescriptors(keeping kept: [Int32]) {
        guard let dir = opendir("/proc/self/fd") else { return }
        let own = dirfd(dir)
        var found: [Int32] = []
        while let entry = readdir(dir) {
            let name = withUnsafeBytes(of: entry.pointee.d_name) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
            if let fd = Int32(name), fd > 2, !kept.contains(fd), fd != own { found.append(fd) }
        }
        closedir(dir)
        for fd in found { close(fd) }
    }

    /// Whether a process holds the lock `path.lock`; when none does, the files `path` plus
    /// each of `files` go (under the lock, so that one taking it at this moment starts anew).
    public static func isLocked(_ path: String, files: [String]) -> Bool {
        let fd = open(path + ".lock", O_RDWR | O_NOFOLLOW | O_CLOEXEC)
        guard fd >= 0 else { return false }
        defer { close(fd) }
        guard flock(fd, LOCK_EX | LOCK_NB) == 0 else { return true }
        for suffix in files { unlink(path + suffix) }
        flock(fd, LOCK_UN)
        return false
    }
}

/// Writes a file only its owner may read: 0600 from its creation on, under a temporary name
/// beside `path` and then renamed over it, so a reader finds the old file or the whole new one.
/// `durable`: on disk before the rename (a key must survive a crash; a holder's record, which
/// describes a running process, need not).
public func writePrivateFile(_ path: String, _ bytes: [UInt8], durable: Bool = true) throws(TransportError) {
    let temp = path + ".\(getpid()).tmp"
    unlink(temp)
    let fd = open(temp, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0o600)
    guard fd >= 0 else { throw TransportError(.io, "cannot write \(path): \(String(cString: strerror(errno)))") }
    let written = bytes.withUnsafeBytes { writeFully(fd, $0) } && (!durable || fsync(fd) == 0)
    let failure = errno
    close(fd)
    guard written, rename(temp, path) == 0 else {
        let e = written ? errno : failure
        unlink(temp)
        throw TransportError(.io, "cannot write \(path): \(String(cString: strerror(e)))")
    }
}
