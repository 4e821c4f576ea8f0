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

    /// The line a background process reports on its ready pipe (see
    /// `BackgroundProcess.readyLine(_:timeout:accepting:what:log:decode:)` in VirtchanTransport).
    static func readyLine(_ fd: Int32, timeout: Double, accepting accepted: Set<String> = ["ready"],
                          what: String, log: String) throws -> String {
        try BackgroundProcess.readyLine(fd, timeout: timeout, accepting: accepted, what: what, log: log, decode: decodeReadyError)
    }

    /// Errors cross from a background process as `error LAYER CODE MESSAGE`, so the command
    /// reports (and exits with) what it would have met itself.
    static func encodeReadyError(_ error: Error) -> String {
        switch error {
        case let e as TransportError: BackgroundProcess.errorLine(e)
        case let e as VirtchanError: BackgroundProcess.errorLine(layer: "virtchan", code: "\(e.code)", message: e.message)
        case let e as ProvisioningError: BackgroundProcess.errorLine(layer: "provisioning", code: "\(e.code)", message: e.message)
        default: BackgroundProcess.errorLine(layer: "other", code: "io", message: "\(error)")
        }
    }

    static func decodeReadyError(_ text: String) -> Error {
        guard let (layer, code, message) = BackgroundProcess.readErrorLine(text) else { return TransportError(.agentGone, text) }
        switch layer {
        case "transport": return BackgroundProcess.transportError(fromLine: text)
        case "virtchan": return VirtchanError(VirtchanError.Code(named: code) ?? .io, message)
        case "provisioning": return ProvisioningError(ProvisioningError.Code(named: code) ?? .libvirt, message)
        default: return VirtchanError(.io, message)
        }
    }

    /// Sends `pid` SIGTERM and waits for it to let go of the lock `path.lock` (its files then
    /// go, as `isLocked(_:files:)` does); whether it did within `timeout` seconds.
    static func terminate(_ pid: Int32, lockedAt path: String, files: [String], timeout: Double) -> Bool {
        kill(pid, SIGTERM)
        let deadline = Date().addingTimeInterval(timeout)
        while BackgroundProcess.isLocked(path, files: files) && Date() < deadline { Thread.sleep(forTimeInterval: 0.02) }
        return !BackgroundProcess.isLocked(path, files: files)
    }
}
