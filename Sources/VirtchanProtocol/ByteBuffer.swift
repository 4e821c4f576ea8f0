/// A growable byte queue over raw memory: bytes are appended at the tail (possibly written in
/// place before they are committed) and consumed from the head. Frames are encoded into it and
/// decoded out of it without intermediate arrays.
public final class ByteBuffer {
    private var storage: UnsafeMutableRawPointer
    public private(set) var capacity: Int
    private var head = 0
    private var tail = 0

    public init(capacity: Int = 64 * 1024) {
        self.capacity = max(capacity, 64)
        storage = UnsafeMutableRawPointer.allocate(byteCount: self.capacity, alignment: 16)
    }

    deinit { storage.deallocate() }

    public var count: Int { tail - head }
    public var isEmpty: Bool { head == tail }

    /// The bytes waiting to be consumed.
    public var readable: UnsafeRawBufferPointer { UnsafeRawBufferPointer(start: storage + head, count: tail - head) }

    public func consume(_ n: Int) {
        precondition(n <= count)
        head += n
        if head == tail { head = 0; tail = 0 }
    }

    public func removeAll() { head = 0; tail = 0 }

    /// Room for at least `n` more bytes at the tail, moving or growing the storage as needed.
    public func reserve(_ n: Int) -> UnsafeMutableRawBufferPointer {
        if capacity - tail < n {
            let live = count
            if head > 0 && capacity - live >= n && live <= capacity / 2 {
                storage.copyMemory(from: storage + head, byteCount: live)
                head = 0
                tail = live
            } else {
                var newCapacity = capacity
                while newCapacity - live < n { newCapacity *= 2 }
                relocate(capacity: newCapacity)
            }
        }
        return UnsafeMutableRawBufferPointer(start: storage + tail, count: capacity - tail)
    }

    /// Makes `n` bytes written into the last `reserve` part of the buffer.
    public func commit(_ n: Int) {
        precondition(tail + n <= capacity)
        tail += n
    }

    public func append(_ bytes: UnsafeRawBufferPointer) {
        guard bytes.count > 0 else { return }
        let room = reserve(bytes.count)
        room.baseAddress!.copyMemory(from: bytes.baseAddress!, byteCount: bytes.count)
        commit(bytes.count)
    }

    /// Gives memory back once a burst is over.
    public func shrink(to size: Int) {
        guard capacity > size, count <= size / 2 else { return }
        relocate(capacity: size)
    }

    /// Moves the live bytes to the start of new storage of `newCapacity` bytes.
    private func relocate(capacity newCapacity: Int) {
        let live = count
        let moved = UnsafeMutableRawPointer.allocate(byteCount: newCapacity, alignment: 16)
        moved.copyMemory(from: storage + head, byteCount: live)
        storage.deallocate()
        storage = moved
        capacity = newCapacity
        head = 0
        tail = live
    }
}
