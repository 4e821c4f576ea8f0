/// Frame layout (all integers little-endian), 24 bytes of header then the payload:
///
///     0  magic     "VCHF"
///     4  version   u8   (FrameHeader.version)
///     5  type      u8   (MessageType)
///     6  flags     u16
///     8  id        u32  request id; replies and stream frames carry the request's id
///    12  length    u32  payload bytes, at most FrameLimits.maxPayload
///    16  pcheck    u32  low 32 bits of XXH64(payload)
///    20  hcheck    u32  low 32 bits of XXH64(header bytes 0..<20)
///
/// The header checksum lets a reader that lost sync tell a real header from payload bytes
/// that happen to contain the magic; the payload checksum catches damaged payloads.
public enum FrameLimits {
    public static let headerSize = 24
    /// Largest payload any frame may carry; a header that claims more is rejected unread.
    public static let maxPayload = 1 << 20
    /// Payload size of data frames on the data port: with its header a frame is 256 KiB, a
    /// multiple of what the guest's port takes in one write (32 KiB) and of its receive
    /// buffers (4 KiB). A frame of 256 KiB of payload left 24 bytes for a write of their own,
    /// one more port buffer and notification to QEMU per frame (512 per 128 MiB pulled).
    public static let dataChunk = 256 * 1024 - headerSize
    /// Largest output chunk the agent sends in one exec output frame.
    public static let execChunk = 64 * 1024
}

/// What a tree listing may hold. The agent stops at these, and the host refuses a listing
/// that goes past them, so a hostile guest cannot make the host hold more.
public enum TreeLimits {
    /// Entries in one listing.
    public static let maxEntries = 1_000_000
    /// Bytes in one entry's path, and in one symbolic link's target (Linux's PATH_MAX).
    public static let maxPathBytes = 4096
    /// Bytes of all paths and link targets of one listing together.
    public static let maxTotalBytes = 64 << 20
}

/// True when a path a guest listed may be joined under a local directory: relative, with no
/// empty, "." or ".." component and no NUL, so it cannot lead outside that directory.
public func isSafeRelativePath(_ path: String) -> Bool {
    guard !path.isEmpty, !path.hasPrefix("/"), !path.contains("\0") else { return false }
    return !path.split(separator: "/", omittingEmptySubsequences: false).contains { $0.isEmpty || $0 == "." || $0 == ".." }
}

public enum FrameHeader {
    public static let magic: [UInt8] = [0x56, 0x43, 0x48, 0x46] // "VCHF"
    public static let version: UInt8 = 1
}

public struct Frame: Sendable, Equatable {
    public var type: MessageType
    public var flags: UInt16
    public var id: UInt32
    public var payload: [UInt8]

    public init(_ type: MessageType, id: UInt32, flags: UInt16 = 0, payload: [UInt8] = []) {
        self.type = type
        self.flags = flags
        self.id = id
        self.payload = payload
    }
}

@inline(__always) func low32(_ v: UInt64) -> UInt32 { UInt32(truncatingIfNeeded: v) }

/// A decoded frame whose payload still sits in the decoder's buffer (valid only inside the
/// closure it is handed to).
public struct FrameView {
    public let type: MessageType
    public let flags: UInt16
    public let id: UInt32
    public let payload: UnsafeRawBufferPointer
    /// The payload's full XXH64 (the header carries its low 32 bits).
    public let payloadHash: UInt64
}

public enum FrameEncoder {
    @inline(__always)
    static func writeHeader(_ h: UnsafeMutableRawBufferPointer, _ type: MessageType, id: UInt32, flags: UInt16,
                            length: Int, payloadHash: UInt64) {
        h[0] = FrameHeader.magic[0]; h[1] = FrameHeader.magic[1]; h[2] = FrameHeader.magic[2]; h[3] = FrameHeader.magic[3]
        h[4] = FrameHeader.version
        h[5] = type.rawValue
        h.storeBytes(of: flags.littleEndian, toByteOffset: 6, as: UInt16.self)
        h.storeBytes(of: id.littleEndian, toByteOffset: 8, as: UInt32.self)
        h.storeBytes(of: UInt32(length).littleEndian, toByteOffset: 12, as: UInt32.self)
        h.storeBytes(of: low32(payloadHash).littleEndian, toByteOffset: 16, as: UInt32.self)
        let hc = low32(XXH64.hash(UnsafeRawBufferPointer(rebasing: h[0..<20])))
        h.storeBytes(of: hc.littleEndian, toByteOffset: 20, as: UInt32.self)
    }

    /// Appends one encoded frame to `out`; returns the payload's XXH64.
    @discardableResult
    public static func append(_ type: MessageType, id: UInt32, flags: UInt16 = 0,
                              payload: UnsafeRawBufferPointer, to out: ByteBuffer) -> UInt64 {
        precondition(payload.count <= FrameLimits.maxPayload, "frame payload over the limit")
        let room = out.reserve(FrameLimits.headerSize + payload.count)
        if payload.count > 0 {
            (room.baseAddress! + FrameLimits.headerSize).copyMemory(from: payload.baseAddress!, byteCount: payload.count)
        }
        let hash = XXH64.hash(payload)
        writeHeader(UnsafeMutableRawBufferPointer(rebasing: room[0..<FrameLimits.headerSize]), type, id: id, flags: flags,
                    length: payload.count, payloadHash: hash)
        out.commit(FrameLimits.headerSize + payload.count)
        return hash
    }

    /// Appends a frame whose payload `fill` writes in place (no copy). `fill` returns how many
    /// bytes it wrote; zero or less appends nothing and is returned as is.
    public static func appendInPlace(_ type: MessageType, id: UInt32, flags: UInt16 = 0, maxPayload: Int,
                                     to out: ByteBuffer,
                                     fill: (UnsafeMutableRawBufferPointer) -> Int) -> (count: Int, hash: UInt64) {
        precondition(maxPayload <= FrameLimits.maxPayload, "frame payload over the limit")
        let room = out.reserve(FrameLimits.headerSize + maxPayload)
        let n = fill(UnsafeMutableRawBufferPointer(rebasing: room[FrameLimits.headerSize..<(FrameLimits.headerSize + maxPayload)]))
        guard n > 0 else { return (n, 0) }
        let hash = XXH64.hash(UnsafeRawBufferPointer(rebasing: room[FrameLimits.headerSize..<(FrameLimits.headerSize + n)]))
        writeHeader(UnsafeMutableRawBufferPointer(rebasing: room[0..<FrameLimits.headerSize]), type, id: id, flags: flags,
                    length: n, payloadHash: hash)
        out.commit(FrameLimits.headerSize + n)
        return (n, hash)
    }

    public static func encode(_ frame: Frame) -> [UInt8] {
        let buffer = ByteBuffer(capacity: FrameLimits.headerSize + frame.payload.count)
        _ = frame.payload.withUnsafeBytes { append(frame.type, id: frame.id, flags: frame.flags, payload: $0, to: buffer) }
        return Array(buffer.readable)
    }
}

/// Incremental frame decoder. Feed it bytes as they arrive; take frames out with `next()` or,
/// without copying the payload, `nextInPlace`. Garbage is skipped byte by byte until a header
/// whose checksum holds; a header that claims more than `maxPayload` is treated as garbage,
/// never waited for or allocated.
public final class FrameDecoder {
    let buffer: ByteBuffer
    public let maxPayload: Int
    /// Bytes thrown away while looking for a valid header.
    public private(set) var skippedBytes = 0
    /// Frames with a valid header whose payload failed its checksum.
    public private(set) var corruptFrames = 0
    /// Frames with a valid header but a type this side does not know.
    public private(set) var unknownFrames = 0

    public init(maxPayload: Int = FrameLimits.maxPayload) {
        self.maxPayload = maxPayload
        buffer = ByteBuffer(capacity: 64 * 1024)
    }

    public var bufferedBytes: Int { buffer.count }

    public func feed(_ bytes: UnsafeRawBufferPointer) { buffer.append(bytes) }

    public func feed(_ bytes: [UInt8]) { bytes.withUnsafeBytes { feed($0) } }

    /// Gives up on the partial frame at the head of the buffer: drops its first byte, so the
    /// next call looks for a header after it. For a reader whose channel went quiet mid-frame
    /// (the rest of a cut-off frame will never come, and a whole frame may wait behind it).
    public func skipStalledFrame() {
        guard buffer.count > 0 else { return }
        buffer.consume(1)
        skippedBytes += 1
    }

    /// Drops everything buffered (a new session starts).
    public func reset() {
        buffer.removeAll()
        buffer.shrink(to: 64 * 1024)
    }

    /// The next complete, valid frame, copied out, or nil when more bytes are needed.
    public func next() -> Frame? {
        var out: Frame?
        _ = nextInPlace { v in out = Frame(v.type, id: v.id, flags: v.flags, payload: Array(v.payload)) }
        return out
    }

    /// How many more bytes complete the frame at the head of the buffer; 0 when it is whole,
    /// or when the head cannot start a frame (``nextInPlace(_:)`` then skips it). A reader
    /// that never asks for more stops at each frame's end, and the buffer, emptied by taking
    /// the frame out, starts over at its front: no byte of a payload is ever moved.
    public var bytesToFrameEnd: Int {
        let r = buffer.readable
        guard r.count >= FrameLimits.headerSize else { return FrameLimits.headerSize - r.count }
        guard r[0] == FrameHeader.magic[0], r[1] == FrameHeader.magic[1], r[2] == FrameHeader.magic[2],
              r[3] == FrameHeader.magic[3] else { return 0 }
        let length = Self.payloadLength(claimedBy: r)
        guard length <= maxPayload else { return 0 }
        return max(0, FrameLimits.headerSize + length - r.count)
    }

    /// The payload length the header at the start of `header` claims (checked or not).
    @inline(__always)
    private static func payloadLength(claimedBy header: UnsafeRawBufferPointer) -> Int {
        Int(UInt32(littleEndian: header.loadUnaligned(fromByteOffset: 12, as: UInt32.self)))
    }

    /// Hands the next complete, valid frame to `body` without copying its payload.
    /// Returns false when more bytes are needed.
    public func nextInPlace(_ body: (FrameView) -> Void) -> Bool {
        let m0 = FrameHeader.magic[0], m1 = FrameHeader.magic[1], m2 = FrameHeader.magic[2], m3 = FrameHeader.magic[3]
        while true {
            let r = buffer.readable
            guard r.count >= FrameLimits.headerSize else {
                // Drop leading bytes that cannot start a frame.
                var drop = 0
                while drop < r.count && r[drop] != m0 { drop += 1 }
                if drop > 0 { buffer.consume(drop); skippedBytes += drop }
                return false
            }
            guard r[0] == m0, r[1] == m1, r[2] == m2, r[3] == m3, r[4] == FrameHeader.version,
                  UInt32(littleEndian: r.loadUnaligned(fromByteOffset: 20, as: UInt32.self))
                    == low32(XXH64.hash(UnsafeRawBufferPointer(rebasing: r[0..<20]))) else {
                // Not a header: skip to the next byte that could start one.
                var drop = 1
                while drop < r.count && r[drop] != m0 { drop += 1 }
                buffer.consume(drop)
                skippedBytes += drop
                continue
            }
            let length = Self.payloadLength(claimedBy: r)
            guard length <= maxPayload else {
                buffer.consume(1)
                skippedBytes += 1
                continue
            }
            let total = FrameLimits.headerSize + length
            if r.count < total { return false }
            let payload = UnsafeRawBufferPointer(rebasing: r[FrameLimits.headerSize..<total])
            let hash = XXH64.hash(payload)
            guard low32(hash) == UInt32(littleEndian: r.loadUnaligned(fromByteOffset: 16, as: UInt32.self)) else {
                // The header was sound but the payload is not: most likely the head of a frame
                // cut off mid-payload (what QEMU still held of an aborted transfer), and the
                // frames after it sit inside what was taken for its payload. Look again from
                // the next byte.
                corruptFrames += 1
                buffer.consume(1)
                skippedBytes += 1
                continue
            }
            guard let type = MessageType(rawValue: r[5]) else {
                unknownFrames += 1
                buffer.consume(total)
                continue
            }
            body(FrameView(type: type,
                           flags: UInt16(littleEndian: r.loadUnaligned(fromByteOffset: 6, as: UInt16.self)),
                           id: UInt32(littleEndian: r.loadUnaligned(fromByteOffset: 8, as: UInt32.self)),
                           payload: payload, payloadHash: hash))
            buffer.consume(total)
            return true
        }
    }
}
