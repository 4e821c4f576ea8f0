import Glibc

/// The agent's log: one line per event, to stderr (the guest console) or to a file.
public final class AgentLog {
    private let fd: Int32
    public let verbose: Bool

    public init(path: String?, verbose: Bool) {
        self.verbose = verbose
        if let path, case let fd = open(path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0o644), fd >= 0 {
            self.fd = fd
        } else {
            fd = 2
        }
    }

    public func info(_ message: String) { emit("virtchan-agent: " + message) }

    public func debug(_ message: @autoclosure () -> String) {
        if verbose { emit("virtchan-agent: debug: " + message()) }
    }

    private func emit(_ line: String) {
        var bytes = Array(line.utf8)
        bytes.append(0x0A)
        _ = bytes.withUnsafeBytes { write(fd, $0.baseAddress!, $0.count) }
    }
}
