import Glibc
import VirtchanProtocol

public enum UnixSocket {
    /// Connects a stream socket to `path`; the descriptor is close-on-exec and non-blocking.
    public static func connect(_ path: String) throws(TransportError) -> Int32 {
        var addr = try address(path)
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { throw TransportError.system("socket") }
        let rc = withUnsafePointer(to: &addr) { p in
            p.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                Glibc.connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size))
            }
        }
        guard rc == 0 else {
            let e = errno
            close(fd)
            switch e {
            case ENOENT:
                throw TransportError(.unreachable, "no socket at \(path): is the domain running?", errno: e)
            case ECONNREFUSED:
                throw TransportError(.unreachable, "nothing listens on \(path): the domain's QEMU process is gone", errno: e)
            case EACCES:
                throw TransportError(.unreachable, "permission denied on \(path): run as root", errno: e)
            default:
                throw TransportError.system("cannot connect to \(path)", code: .unreachable, errno: e)
            }
        }
        setNonBlocking(fd)
        return fd
    }

    /// A blocking stream socket listening at `path` (replacing whatever is there), as QEMU's
    /// side of a channel does; for tools and tests that stand in for a guest.
    public static func listen(_ path: String, backlog: Int32 = 4) throws(TransportError) -> Int32 {
        var addr = try address(path)
        unlink(path)
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { throw TransportError.system("socket") }
        let rc = withUnsafePointer(to: &addr) { p in
            p.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                bind(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size))
            }
        }
        guard rc == 0, Glibc.listen(fd, backlog) == 0 else {
            let e = errno
            close(fd)
            throw TransportError.system("cannot listen on \(path)", errno: e)
        }
        return fd
    }

    private static func address(_ path: String) throws(TransportError) -> sockaddr_un {
        var addr = sockaddr_un()
        addr.sun_family = sa_family_t(AF_UNIX)
        let bytes = Array(path.utf8)
        let capacity = MemoryLayout.size(ofValue: addr.sun_path)
        guard bytes.count < capacity else {
            throw TransportError(.invalidArgument, "socket path \(path) is longer than \(capacity - 1) bytes")
        }
        withUnsafeMutableBytes(of: &addr.sun_path) { raw in
            raw.copyBytes(from: bytes)
            raw[bytes.count] = 0
        }
        return addr
    }
}

/// virtchan's directory for files that last until reboot: /run/virtchan for root, the
/// user's runtime directory otherwise.
public var runtimeDirectory: String {
    if geteuid() == 0 { return "/run/virtchan" }
    if let dir = getenv("XDG_RUNTIME_DIR"), dir.pointee != 0 { return String(cString: dir) + "/virtchan" }
    let home = getenv("HOME").map { String(cString: $0) } ?? "/"
    return home + "/.local/state/virtchan/run"
}

/// Creates `path` and any missing parents, each new one private (0700).
public func makePrivateDirectories(_ path: String) {
    // Usually the parents are there: one call then.
    if mkdir(path, 0o700) == 0 || errno == EEXIST { return }
    var partial = ""
    for part in path.split(separator: "/") {
        partial += "/" + part
        mkdir(partial, 0o700)
    }
}

/// An exclusive advisory lock that keeps two virtchan processes on this host off one channel
/// (QEMU would queue the second client silently, which looks like a hang). Lock files are
/// named after the domain, in a directory only their owner reaches, and `destroy` removes them.
public final class ChannelLock {
    /// /run/virtchan/locks for root; for anyone else under $XDG_RUNTIME_DIR, which only they reach.
    static var directory: String { runtimeDirectory + "/locks" }
    let fd: Int32

    public init(domain: String, role: String, label: String) throws(TransportError) {
        makePrivateDirectories(Self.directory)
        let lockPath = Self.path(domain: domain, role: role)
        fd = open(lockPath, O_RDWR | O_CREAT | O_NOFOLLOW | O_CLOEXEC, 0o600)
        guard fd >= 0 else {
            throw TransportError.system("cannot open the lock file \(lockPath)")
        }
        guard flock(fd, LOCK_EX | LOCK_NB) == 0 else {
            var holder = ""
            var buf = [UInt8](repeating: 0, count: 32)
            let n = buf.withUnsafeMutableBytes { pread(fd, $0.baseAddress!, 31, 0) }
            if n > 0 { holder = " (pid \(String(decoding: buf[0..<n], as: UTF8.self)))" }
            close(fd)
            throw TransportError(.busy, "the \(label) is busy: another virtchan process holds it\(holder); wait for it to finish or stop it")
        }
        let pid = Array(String(getpid()).utf8)
        _ = ftruncate(fd, 0)
        _ = pid.withUnsafeBytes { pwrite(fd, $0.baseAddress!, $0.count, 0) }
    }

    deinit { close(fd) }

    /// The lock file of one channel; a name libvirt would not take is hashed instead.
    static func path(domain: String, role: String) -> String {
        let plain = EndpointCache.isPlainName(domain) && domain.utf8.count < 200
        let name = plain ? domain : String(XXH64.hash(Array(domain.utf8)), radix: 16)
        return directory + "/" + name + "." + role + ".lock"
    }

    /// Removes the lock files of `domain`, once it is gone.
    public static func removeLocks(of domain: String) {
        for role in ["control", "data"] { unlink(path(domain: domain, role: role)) }
    }
}
