import Dispatch
import Glibc
import Synchronization
import VirtchanProtocol

/// A file pulled with ``PullOptions/sync`` on its way to disk while it still arrives: the
/// pacer starts writing it back every 8 MiB, and every `flushStep` bytes a background queue
/// makes what is there durable (`fdatasync`), so the fsync that ends the pull finds only the
/// last stretch left. Where the disk keeps a write cache, that fsync otherwise waits for all
/// of it: 130-340 ms for 128 MiB on a virtual disk whose fsync of 4 KiB takes 1 ms.
final class DurableWriteback: Sendable {
    static let flushStep: UInt64 = 32 << 20
    private let fd: Int32
    private let queue = DispatchQueue(label: "virtchan.writeback")
    /// A flush is queued or running: the next step's is left out, the running one covers it.
    private let flushing = Atomic<Bool>(false)
    private let pacer: Mutex<WritebackPacer>
    private let flushedTo = Atomic<UInt64>(0)

    /// nil unless `fd` is a regular file.
    init?(fd: Int32) {
        guard let pacer = WritebackPacer(fd: fd) else { return nil }
        self.fd = fd
        self.pacer = Mutex(pacer)
    }

    /// The file now holds `end` bytes.
    func wrote(upTo end: UInt64) {
        pacer.withLock { $0.wrote(upTo: end) }
        guard end >= flushedTo.load(ordering: .relaxed) + Self.flushStep,
              flushing.compareExchange(expected: false, desired: true, ordering: .acquiringAndReleasing).exchanged
        else { return }
        flushedTo.store(end, ordering: .relaxed)
        let fd = fd
        queue.async { [self] in
            _ = fdatasync(fd)
            flushing.store(false, ordering: .releasing)
        }
    }

    /// Waits for a flush still running; the descriptor may be closed after this returns.
    func finish() {
        queue.sync {}
    }
}
