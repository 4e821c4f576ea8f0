import Glibc

/// The text in a buffer a C function filled, up to its first NUL (or the whole buffer).
public func string(fromCBuffer chars: [CChar]) -> String {
    String(decoding: chars.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
}

/// The whole content of a small file (sysfs, procfs, a config or state file), or nil when it
/// cannot be opened or read.
public func readSmallFile(_ path: String, limit: Int = 1 << 20) -> String? {
    let fd = open(path, O_RDONLY | O_CLOEXEC)
    guard fd >= 0 else { return nil }
    defer { close(fd) }
    var out: [UInt8] = []
    var buf = [UInt8](repeating: 0, count: 4096)
    while out.count < limit {
        let n = buf.withUnsafeMutableBytes { read(fd, $0.baseAddress!, $0.count) }
        if n < 0 && errno == EINTR { continue }
        guard n >= 0 else { return nil }
        if n == 0 { break }
        out.append(contentsOf: buf[0..<n])
    }
    return String(decoding: out, as: UTF8.self)
}

/// Bytes an unprivileged writer may still put on the file system that holds `fd`, or nil when
/// the file system does not say (statvfs fails, or it reports no blocks at all, as pseudo
/// file systems do).
public func freeBytes(onFileSystemOf fd: Int32) -> UInt64? {
    var fs = statvfs()
    guard fstatvfs(fd, &fs) == 0, fs.f_blocks > 0 else { return nil }
    return UInt64(fs.f_bavail) * UInt64(fs.f_frsize)
}
