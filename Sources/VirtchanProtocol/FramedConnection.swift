import Glibc

/// A failed system call, with the errno it set.
public struct SystemError: Error, CustomStringConvertible, Sendable {
    public let operation: String
    public let errno: Int32

    public init(_ operation: String, errno: Int32 = Glibc.errno) {
        self.operation = operation
        self.errno = errno
    }

    public var description: String { "\(operation): \(String(cString: strerror(errno)))" }
}

public enum ReadOutcome: Equatable, Sendable {
    /// This many bytes were read and fed to the decoder.
    case data(Int)
    /// Nothing to read now.
    case wouldBlock
    /// The peer closed (a socket) or, on a virtio port, no host is connected.
    case eof
}

/// Frames over one non-blocking file descriptor: an output buffer drained by `flush()` and a
/// decoder fed by `fill()`. Both sides use it, the agent on its ports and the host on sockets;
/// the caller owns the poll loop and the descriptor's lifetime.
public final class FramedConnection {
    public let fd: Int32
    public let decoder: FrameDecoder
    private let out: ByteBuffer
    private let readChunk: Int

    public init(fd: Int32, maxPayload: Int = FrameLimits.maxPayload, readBufferSize: Int = 256 * 1024) {
        self.fd = fd
        decoder = FrameDecoder(maxPayload: maxPayload)
        out = ByteBuffer(capacity: 64 * 1024)
        readChunk = readBufferSize
    }

    /// Bytes queued but not yet written.
    public var pendingOutput: Int { out.count }

    public func send(_ frame: Frame) {
        _ = frame.payload.withUnsafeBytes { FrameEncoder.append(frame.type, id: frame.id, flags: frame.flags, payload: $0, to: out) }
    }

    public func send<M: WireMessage>(_ message: M, id: UInt32, flags: UInt16 = 0) {
        send(message.frame(id: id, flags: flags))
    }

    @discardableResult
    public func send(_ type: MessageType, id: UInt32, flags: UInt16 = 0, payload: UnsafeRawBufferPointer) -> UInt64 {
        FrameEncoder.append(type, id: id, flags: flags, payload: payload, to: out)
    }

    /// Queues a frame whose payload `fill` writes straight into the output buffer.
    public func sendInPlace(_ type: MessageType, id: UInt32, flags: UInt16 = 0, maxPayload: Int,
                            fill: (UnsafeMutableRawBufferPointer) -> Int) -> (count: Int, hash: UInt64) {
        FrameEncoder.appendInPlace(type, id: id, flags: flags, maxPayload: maxPayload, to: out, fill: fill)
    }

    /// Drops queued output (the session it belonged to is gone).
    public func discardOutput() {
        out.removeAll()
        out.shrink(to: 64 * 1024)
    }

    /// Writes as much queued output as the descriptor takes without blocking.
    /// Returns true when nothing is left queued.
    @discardableResult
    public func flush() throws(SystemError) -> Bool {
        while !out.isEmpty {
            let r = out.readable
            let n = write(fd, r.baseAddress!, r.count)
            if n > 0 {
                out.consume(n)
                continue
            }
            if n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK) { return false }
            if n < 0 && errno == EINTR { continue }
            throw SystemError("write")
        }
        return true
    }

    /// Reads whatever is available (up to `limit` bytes in all) straight into the decoder.
    public func fill(limit: Int = 4 << 20) throws(SystemError) -> ReadOutcome {
        var total = 0
        while total < limit {
            guard let n = try readIntoDecoder(readChunk) else { return total > 0 ? .data(total) : .wouldBlock }
            if n == 0 { return total > 0 ? .data(total) : .eof }
            total += n
        }
        return .data(total)
    }

    /// Reads until the frame at the head of the decoder is whole, never past its end (see
    /// ``FrameDecoder/bytesToFrameEnd``): for a stream of large frames taken out one by one,
    /// as file data is. `.data(0)` when a frame was whole already.
    public func fillFrame() throws(SystemError) -> ReadOutcome {
        var total = 0
        var want = decoder.bytesToFrameEnd
        while want > 0 {
            guard let n = try readIntoDecoder(want) else { return total > 0 ? .data(total) : .wouldBlock }
            if n == 0 { return total > 0 ? .data(total) : .eof }
            total += n
            want = decoder.bytesToFrameEnd
        }
        return .data(total)
    }

    /// One read of at most `count` bytes onto the decoder's buffer: how many (0 at the end of
    /// the stream), or nil when nothing is there now.
    private func readIntoDecoder(_ count: Int) throws(SystemError) -> Int? {
        while true {
            let n = read(fd, decoder.buffer.reserve(count).baseAddress!, count)
            if n >= 0 {
                decoder.buffer.commit(n)
                return n
            }
            if errno == EINTR { continue }
            if errno == EAGAIN || errno == EWOULDBLOCK { return nil }
            throw SystemError("read")
        }
    }
}

/// Monotonic clock in nanoseconds.
public func monotonicNanos() -> UInt64 {
    var ts = timespec()
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return UInt64(ts.tv_sec) * 1_000_000_000 + UInt64(ts.tv_nsec)
}

/// `seconds` in nanoseconds, for a span on the monotonic clock: 0 for a negative number or
/// NaN, and at most 10^9 s, so that whatever number a caller gives, a deadline cannot overflow.
public func nanoseconds(_ seconds: Double) -> UInt64 {
    guard seconds > 0 else { return 0 }
    return UInt64(min(seconds, 1e9) * 1e9)
}

/// The monotonic clock `seconds` from now (see ``nanoseconds(_:)``).
public func monotonicDeadline(after seconds: Double) -> UInt64 {
    monotonicNanos() + nanoseconds(seconds)
}

public func setNonBlocking(_ fd: Int32, _ on: Bool = true) {
    let flags = fcntl(fd, F_GETFL)
    _ = fcntl(fd, F_SETFL, on ? flags | O_NONBLOCK : flags & ~O_NONBLOCK)
}
