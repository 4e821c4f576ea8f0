#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

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
    public var decoder: FrameDecoder
    private var out: [UInt8] = []
    private var outStart = 0
    private let readBuffer: UnsafeMutableRawBufferPointer

    public init(fd: Int32, maxPayload: Int = FrameLimits.maxPayload, readBufferSize: Int = 256 * 1024) {
        self.fd = fd
        decoder = FrameDecoder(maxPayload: maxPayload)
        readBuffer = UnsafeMutableRawBufferPointer.allocate(byteCount: readBufferSize, alignment: 16)
        out.reserveCapacity(FrameLimits.dataChunk + 64)
    }

    deinit { readBuffer.deallocate() }

    /// Bytes queued but not yet written.
    public var pendingOutput: Int { out.count - outStart }

    public func send(_ frame: Frame) {
        compact()
        FrameEncoder.append(frame, to: &out)
    }

    public func send<M: WireMessage>(_ message: M, id: UInt32, flags: UInt16 = 0) {
        send(message.frame(id: id, flags: flags))
    }

    public func send(_ type: MessageType, id: UInt32, flags: UInt16 = 0, payload: UnsafeRawBufferPointer) {
        compact()
        FrameEncoder.append(type, id: id, flags: flags, payload: payload, to: &out)
    }

    /// Drops queued output (the session it belonged to is gone).
    public func discardOutput() {
        out.removeAll(keepingCapacity: true)
        outStart = 0
    }

    private func compact() {
        if outStart > 0 && (outStart == out.count || outStart >= 1 << 20) {
            out.removeSubrange(0..<outStart)
            outStart = 0
        }
    }

    /// Writes as much queued output as the descriptor takes without blocking.
    /// Returns true when nothing is left queued.
    @discardableResult
    public func flush() throws(SystemError) -> Bool {
        while outStart < out.count {
            let n = out.withUnsafeBytes { raw in
                write(fd, raw.baseAddress! + outStart, out.count - outStart)
            }
            if n > 0 {
                outStart += n
                continue
            }
            if n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK) { return false }
            if n < 0 && errno == EINTR { continue }
            throw SystemError("write")
        }
        out.removeAll(keepingCapacity: true)
        outStart = 0
        return true
    }

    /// Reads whatever is available (up to `limit` bytes in all) into the decoder.
    public func fill(limit: Int = 4 << 20) throws(SystemError) -> ReadOutcome {
        var total = 0
        while total < limit {
            let n = read(fd, readBuffer.baseAddress!, readBuffer.count)
            if n > 0 {
                decoder.feed(UnsafeRawBufferPointer(rebasing: readBuffer[0..<n]))
                total += n
                continue
            }
            if n == 0 { return total > 0 ? .data(total) : .eof }
            if errno == EINTR { continue }
            if errno == EAGAIN || errno == EWOULDBLOCK { return total > 0 ? .data(total) : .wouldBlock }
            throw SystemError("read")
        }
        return .data(total)
    }
}

/// Monotonic clock in nanoseconds.
public func monotonicNanos() -> UInt64 {
    var ts = timespec()
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return UInt64(ts.tv_sec) * 1_000_000_000 + UInt64(ts.tv_nsec)
}

public func setNonBlocking(_ fd: Int32, _ on: Bool = true) {
    let flags = fcntl(fd, F_GETFL)
    _ = fcntl(fd, F_SETFL, on ? flags | O_NONBLOCK : flags & ~O_NONBLOCK)
}
