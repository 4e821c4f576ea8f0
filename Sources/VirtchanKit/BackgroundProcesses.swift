import Foundation
import VirtchanProvisioning
import VirtchanTransport

// What the processes virtchan leaves running share, session holders and background forwards:
// how they are started, how they report that they serve, and the lock each holds while it
// runs, which tells a live one from the files a killed one left.
extension Hypervisor {
    /// Runs virtchan with `arguments` in a session of its own, which outlives the command's
    /// terminal: `ready` (closed here) as its fd 3, no stdin or stdout, stderr appended to `log`.
    static func spawnDetached(_ arguments: [String], ready: Int32, log: String, what: String) throws {
        defer { close(ready) }
        let executable = try virtchanExecutable()
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        posix_spawn_file_actions_adddup2(&actions, ready, 3)
        posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0)
        posix_spawn_file_actions_addopen(&actions, 1, "/dev/null", O_WRONLY, 0)
        posix_spawn_file_actions_addopen(&actions, 2, log, O_WRONLY | O_CREAT | O_APPEND, 0o600)
        var attr = posix_spawnattr_t()
        posix_spawnattr_init(&attr)
        defer { posix_spawnattr_destroy(&attr) }
        var none = sigset_t()
        sigemptyset(&none)
        var defaults = sigset_t()
        sigemptyset(&defaults)
        for sig in [SIGINT, SIGTERM, SIGHUP, SIGPIPE, SIGCHLD] { sigaddset(&defaults, sig) }
        posix_spawnattr_setsigmask(&attr, &none)
        posix_spawnattr_setsigdefault(&attr, &defaults)
        // POSIX_SPAWN_SETSID (0x80) is glibc's.
        posix_spawnattr_setflags(&attr, Int16(POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF | 0x80))
        var pid: pid_t = 0
        let cargs = ([executable] + arguments).map { strdup($0) } + [nil]
        defer { for a in cargs { free(a) } }
        let rc = posix_spawn(&pid, executable, &actions, &attr, cargs, environ)
        guard rc == 0 else {
            throw VirtchanError(.io, "cannot start \(what) \(executable): \(String(cString: strerror(rc)))")
        }
    }

    /// The virtchan executable that runs holders and background forwards:
    /// `VIRTCHAN_EXECUTABLE`, this program when it is virtchan, a virtchan-full (or virtchan)
    /// beside it, or a virtchan on PATH.
    static func virtchanExecutable() throws -> String {
        if let env = getenv("VIRTCHAN_EXECUTABLE").map({ String(cString: $0) }), !env.isEmpty { return env }
        let me = (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/exe")) ?? ""
        if ["virtchan", "virtchan-full"].contains((me as NSString).lastPathComponent) { return me }
        for program in ["virtchan-full", "virtchan"] where !me.isEmpty {
            let sibling = ((me as NSString).deletingLastPathComponent as NSString).appendingPathComponent(program)
            if access(sibling, X_OK) == 0 { return sibling }
        }
        for dir in (getenv("PATH").map { String(cString: $0) } ?? "").split(separator: ":") {
            let candidate = String(dir) + "/virtchan"
            if access(candidate, X_OK) == 0 { return candidate }
        }
        throw VirtchanError(.invalidRequest, "no virtchan executable to run in the background: install virtchan on PATH, set VIRTCHAN_EXECUTABLE, or open the Hypervisor with sharing: .direct")
    }

    /// The line a background process reports on its ready pipe, one of `accepted` (`ready`,
    /// `held`), waiting at most `timeout`; throws what it reported as `error ...`, or that it
    /// ended without one of those, or that it is still starting. `what` names it ("the session
    /// holder of vm1"), `log` is its log.
    static func readyLine(_ fd: Int32, timeout: Double, accepting accepted: Set<String> = ["ready"],
                          what: String, log: String) throws -> String {
        var bytes: [UInt8] = []
        let deadline = Date().addingTimeInterval(timeout)
        var chunk = [UInt8](repeating: 0, count: 512)
        while bytes.count < 8192 && !bytes.contains(10) {
            try Interruption.check()
            var p = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
            // At most an hour a poll: the loop polls again until the deadline.
            let left = Int32(min(max(0, deadline.timeIntervalSinceNow), 3600) * 1000)
            let rc = poll(&p, 1, left)
            if rc < 0 && errno == EINTR { continue }
            if rc == 0 && deadline.timeIntervalSinceNow > 0 { continue }
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
        if line.hasPrefix("error ") { throw decodeReadyError(String(line.dropFirst(6))) }
        guard accepted.contains(line) else { throw endedBeforeServing(what, log: log) }
        return line
    }

    static func endedBeforeServing(_ what: String, log: String) -> TransportError {
        TransportError(.agentGone, "\(what) ended before it served (see \(log))")
    }

    /// Errors cross from a background process as `error LAYER CODE MESSAGE`, so the command
    /// reports (and exits with) what it would have met itself.
    static func encodeReadyError(_ error: Error) -> String {
        let text: String
        switch error {
        case let e as TransportError: text = "transport \(e.code) \(e.message)"
        case let e as VirtchanError: text = "virtchan \(e.code) \(e.message)"
        case let e as ProvisioningError: text = "provisioning \(e.code) \(e.message)"
        default: text = "other io \(error)"
        }
        return "error " + text.replacingOccurrences(of: "\n", with: " ")
    }

    static func decodeReadyError(_ text: String) -> Error {
        let parts = text.split(separator: " ", maxSplits: 2, omittingEmptySubsequences: false).map(String.init)
        guard parts.count == 3 else { return TransportError(.agentGone, text) }
        switch parts[0] {
        case "transport": return TransportError(TransportError.Code(named: parts[1]) ?? .io, parts[2])
        case "virtchan": return VirtchanError(VirtchanError.Code(named: parts[1]) ?? .io, parts[2])
        case "provisioning": return ProvisioningError(ProvisioningError.Code(named: parts[1]) ?? .libvirt, parts[2])
        default: return VirtchanError(.io, parts[2])
        }
    }

    /// The lock `path.lock` (a holder's, a background forward's), or nil while another process
    /// has it. A lock file that its owner, ending at the same moment, or a listing that found it
    /// unlocked removed is not a lock: then try again.
    static func takeLock(_ path: String) -> Int32? {
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
    static func closeInheritedDescriptors(keeping kept: [Int32]) {
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
    static func isLocked(_ path: String, files: [String]) -> Bool {
        let fd = open(path + ".lock", O_RDWR | O_NOFOLLOW | O_CLOEXEC)
        guard fd >= 0 else { return false }
        defer { close(fd) }
        guard flock(fd, LOCK_EX | LOCK_NB) == 0 else { return true }
        for suffix in files { unlink(path + suffix) }
        flock(fd, LOCK_UN)
        return false
    }

    /// Sends `pid` SIGTERM and waits for it to let go of the lock `path.lock` (its files then
    /// go, as `isLocked(_:files:)` does); whether it did within `timeout` seconds.
    static func terminate(_ pid: Int32, lockedAt path: String, files: [String], timeout: Double) -> Bool {
        kill(pid, SIGTERM)
        let deadline = Date().addingTimeInterval(timeout)
        while isLocked(path, files: files) && Date() < deadline { Thread.sleep(forTimeInterval: 0.02) }
        return !isLocked(path, files: files)
    }
}
