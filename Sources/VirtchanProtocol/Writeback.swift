import Glibc

/// Starts writing a file that a transfer fills back to disk in steps of `step` bytes while
/// the rest is still arriving (sync_file_range with SYNC_FILE_RANGE_WRITE, which does not
/// wait), so that the fsync ending the transfer waits for little. Used by the host for pulls
/// and by the agent for pushes; it does nothing for a pipe or a terminal.
public struct WritebackPacer {
    public static let step: UInt64 = 8 << 20
    private let fd: Int32
    private var started: UInt64 = 0

    /// nil unless `fd` is a regular file.
    public init?(fd: Int32) {
        var st = stat()
        guard fstat(fd, &st) == 0, st.st_mode & S_IFMT == S_IFREG else { return nil }
        self.fd = fd
    }

    /// The file now holds `end` bytes.
    public mutating func wrote(upTo end: UInt64) {
        guard end >= started + Self.step else { return }
        _ = syncFileRange?(fd, Int64(started), Int64(end - started), 2 /* SYNC_FILE_RANGE_WRITE */)
        started = end
    }
}

// Glibc's module map leaves sync_file_range out, hence the lookup; where it is missing the
// pacer does nothing and the closing fsync does all the work.
private typealias SyncFileRange = @convention(c) (Int32, Int64, Int64, UInt32) -> Int32
private let syncFileRange: SyncFileRange? = dlsym(nil, "sync_file_range").map { unsafeBitCast($0, to: SyncFileRange.self) }
