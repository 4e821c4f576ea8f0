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
    /// Payload size of data frames on the data port.
    public static let dataChunk = 256 * 1024
    /// Largest output chunk the agent sends in one exec output frame.
    public static let execChunk = 64 * 1024
}

public struct FrameHeader: Sendable, Equatable {
    public static let magic: [UInt8] = [0x56, 0x43, 0x48, 0x46] // "VCHF"
    public static let version: UInt8 = 1

    public var type: UInt8
    public var flags: UInt16
    public var id: UInt32
    public var length: UInt32
    public var payloadCheck: UInt32

    public init(type: UInt8, flags: UInt16, id: UInt32, length: UInt32, payloadCheck: UInt32) {
        self.type = type
        self.flags = flags
        self.id = id
        self.length = length
        self.payloadCheck = payloadCheck
    }
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

public enum FrameEncoder {
    /// Appends one encoded frame to `out`.
    public static func append(_ type: MessageType, id: UInt32, flags: UInt16 = 0,
                              payload: UnsafeRawBufferPointer, to out: inout [UInt8]) {
        precondition(payload.count <= FrameLimits.maxPayload, "frame payload over the limit")
        var header = [UInt8](repeating: 0, count: FrameLimits.headerSize)
        header.withUnsafeMutableBytes { h in
            h.copyBytes(from: FrameHeader.magic)
            h[4] = FrameHeader.version
            h[5] = type.rawValue
            h.storeBytes(of: flags.littleEndian, toByteOffset: 6, as: UInt16.self)
            h.storeBytes(of: id.littleEndian, toByteOffset: 8, as: UInt32.self)
            h.storeBytes(of: UInt32(payload.count).littleEndian, toByteOffset: 12, as: UInt32.self)
            h.storeBytes(of: low32(XXH64.hash(payload)).littleEndian, toByteOffset: 16, as: UInt32.self)
            let hc = low32(XXH64.hash(UnsafeRawBufferPointer(rebasing: h[0..<20])))
            h.storeBytes(of: hc.littleEndian, toByteOffset: 20, as: UInt32.self)
        }
        out.append(contentsOf: header)
        out.append(contentsOf: payload)
    }

    public static func append(_ frame: Frame, to out: inout [UInt8]) {
        frame.payload.withUnsafeBytes { append(frame.type, id: frame.id, flags: frame.flags, payload: $0, to: &out) }
    }

    public static func encode(_ frame: Frame) -> [UInt8] {
        var out: [UInt8] = []
        out.reserveCapacity(FrameLimits.headerSize + frame.payload.count)
        append(frame, to: &out)
        return out
    }
}

/// Incremental frame decoder. Feed it bytes as they arrive; take frames out with `next()`.
/// Garbage is skipped byte by byte until a header whose checksum holds; a header that claims
/// more than `maxPayload` is treated as garbage, never allocated.
public struct FrameDecoder: Sendable {
    private var buffer: [UInt8] = []
    private var start = 0
    public let maxPayload: Int
    /// Bytes thrown away while looking for a valid header.
    public private(set) var skippedBytes = 0
    /// Frames with a valid header whose payload failed its checksum.
    public private(set) var corruptFrames = 0
    /// Frames with a valid header but a type this side does not know.
    public private(set) var unknownFrames = 0

    public init(maxPayload: Int = FrameLimits.maxPayload) {
        self.maxPayload = maxPayload
        buffer.reserveCapacity(FrameLimits.headerSize + FrameLimits.dataChunk + 8192)
    }

    public var bufferedBytes: Int { buffer.count - start }

    public mutating func feed(_ bytes: UnsafeRawBufferPointer) {
        compactIfNeeded()
        buffer.append(contentsOf: bytes)
    }

    public mutating func feed(_ bytes: [UInt8]) {
        bytes.withUnsafeBytes { feed($0) }
    }

    /// Drops everything buffered (a new session starts).
    public mutating func reset() {
        buffer.removeAll(keepingCapacity: true)
        start = 0
    }

    private mutating func compactIfNeeded() {
        if start > 0 && (start == buffer.count || start >= 64 * 1024) {
            buffer.removeSubrange(0..<start)
            start = 0
        }
    }

    /// The next complete, valid frame, or nil when more bytes are needed.
    public mutating func next() -> Frame? {
        while true {
            let available = buffer.count - start
            if available < FrameLimits.headerSize {
                skipToMagicCandidate()
                return nil
            }
            let parsed: (FrameHeader, Bool)? = buffer.withUnsafeBytes { raw in
                let h = UnsafeRawBufferPointer(rebasing: raw[start..<(start + FrameLimits.headerSize)])
                guard h[0] == FrameHeader.magic[0], h[1] == FrameHeader.magic[1],
                      h[2] == FrameHeader.magic[2], h[3] == FrameHeader.magic[3] else { return nil }
                let hc = UInt32(littleEndian: h.loadUnaligned(fromByteOffset: 20, as: UInt32.self))
                guard hc == low32(XXH64.hash(UnsafeRawBufferPointer(rebasing: h[0..<20]))) else { return nil }
                let header = FrameHeader(
                    type: h[5],
                    flags: UInt16(littleEndian: h.loadUnaligned(fromByteOffset: 6, as: UInt16.self)),
                    id: UInt32(littleEndian: h.loadUnaligned(fromByteOffset: 8, as: UInt32.self)),
                    length: UInt32(littleEndian: h.loadUnaligned(fromByteOffset: 12, as: UInt32.self)),
                    payloadCheck: UInt32(littleEndian: h.loadUnaligned(fromByteOffset: 16, as: UInt32.self)))
                return (header, h[4] == FrameHeader.version)
            }
            guard let (header, versionOK) = parsed, versionOK, Int(header.length) <= maxPayload else {
                start += 1
                skippedBytes += 1
                continue
            }
            let total = FrameLimits.headerSize + Int(header.length)
            if available < total { return nil }
            let payloadStart = start + FrameLimits.headerSize
            let payload = Array(buffer[payloadStart..<(start + total)])
            let check = payload.withUnsafeBytes { low32(XXH64.hash($0)) }
            guard check == header.payloadCheck else {
                // The header was sound but the payload is damaged: drop the whole frame.
                corruptFrames += 1
                start += total
                continue
            }
            start += total
            guard let type = MessageType(rawValue: header.type) else {
                unknownFrames += 1
                continue
            }
            return Frame(type, id: header.id, flags: header.flags, payload: payload)
        }
    }

    /// With less than a header buffered, drop leading bytes that cannot start a frame.
    private mutating func skipToMagicCandidate() {
        let m0 = FrameHeader.magic[0]
        while start < buffer.count && buffer[start] != m0 {
            start += 1
            skippedBytes += 1
        }
    }
}
