import Glibc

/// A file being pulled, sent from a shared mapping of its page cache rather than read into a
/// buffer first: one copy of every byte fewer in the guest, where copies are slow.
///
/// A mapped page that a truncation took away raises SIGBUS when the agent touches it. So the
/// mapping is used only under a read lease: a process in the guest that truncates the file or
/// opens it to write first waits (up to `/proc/sys/fs/lease-break-time`) for the agent to let
/// go, and the kernel tells the agent with SIGIO. The lease is looked at again before each
/// piece is touched, and once it is breaking the caller drops the mapping and reads the rest.
/// (The port's `write` from a page gone all the same fails with EFAULT; only the agent's own
/// reads, the hashes, could fault.)
final class LeasedMapping {
    /// Smaller files are read: the lease and the mapping cost more than they save.
    static let minimumSize = 1 << 20
    /// Pages are faulted in this many bytes at a time, ahead of the hashing.
    static let window = 2 << 20

    private let fd: Int32
    private let base: UnsafeMutableRawPointer
    private let size: Int
    private var populatedTo = 0

    // Linux's fcntl commands for leases (F_LINUX_SPECIFIC_BASE + 0 and + 1), which Swift's
    // Glibc does not import.
    private static let setLease: Int32 = 1024
    private static let getLease: Int32 = 1025

    /// Maps `fd` (opened read-only, `size` bytes) under a read lease; nil when the file is
    /// small, open elsewhere for writing, or on a file system without leases.
    init?(fd: Int32, size: UInt64) {
        guard size >= UInt64(Self.minimumSize), size <= UInt64(Int.max) else { return nil }
        guard fcntl(fd, Self.setLease, F_RDLCK) == 0 else { return nil }
        let p = mmap(nil, Int(size), PROT_READ, MAP_SHARED, fd, 0)
        guard let p, p != MAP_FAILED else {
            _ = fcntl(fd, Self.setLease, F_UNLCK)
            return nil
        }
        self.fd = fd
        base = p
        self.size = Int(size)
    }

    /// Whether the lease still holds: false once a truncation or a writer waits for it.
    var held: Bool { fcntl(fd, Self.getLease) == F_RDLCK }

    /// `count` bytes at `offset`, faulted in and safe to read now; nil when the lease is
    /// breaking or the pages cannot be had (the caller reads the rest instead).
    func bytes(at offset: Int, count: Int) -> UnsafeRawBufferPointer? {
        precondition(offset >= 0 && count >= 0 && offset + count <= size)
        guard held else { return nil }
        let end = offset + count
        if end > populatedTo {
            let from = max(populatedTo, offset) & ~(Int(getpagesize()) - 1)
            let to = min(size, max(end, from + Self.window))
            guard madvise(base + from, to - from, MADV_POPULATE_READ) == 0 else { return nil }
            populatedTo = to
        }
        return UnsafeRawBufferPointer(start: base + offset, count: count)
    }

    /// Unmaps the file and gives the lease back (the descriptor stays open). Nothing may still
    /// point into the mapping.
    func release() {
        munmap(base, size)
        _ = fcntl(fd, Self.setLease, F_UNLCK)
    }
}
