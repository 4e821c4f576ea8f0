import Foundation
import VirtchanTransport

/// Writes a file only its owner may read: 0600 from its creation on, under a temporary name
/// beside `path` and then renamed over it, so a reader finds the old file or the whole new one.
/// `durable`: on disk before the rename (a key must survive a crash; a holder's record, which
/// describes a running process, need not).
func writePrivateFile(_ path: String, _ data: Data, durable: Bool = true) throws {
    let temp = path + ".\(getpid()).tmp"
    unlink(temp)
    let fd = open(temp, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0o600)
    guard fd >= 0 else { throw VirtchanError(.io, "cannot write \(path): \(String(cString: strerror(errno)))") }
    let written = data.withUnsafeBytes { writeFully(fd, $0) } && (!durable || fsync(fd) == 0)
    let failure = errno
    close(fd)
    guard written, rename(temp, path) == 0 else {
        let e = written ? errno : failure
        unlink(temp)
        throw VirtchanError(.io, "cannot write \(path): \(String(cString: strerror(e)))")
    }
}
