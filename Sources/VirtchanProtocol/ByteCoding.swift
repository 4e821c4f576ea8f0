/// Little-endian writer for message payloads. Fields are appended in a fixed order per
/// message; a newer sender may append fields an older reader ignores.
public struct ByteWriter: Sendable {
    public private(set) var bytes: [UInt8] = []

    public init(capacity: Int = 64) { bytes.reserveCapacity(capacity) }

    public mutating func u8(_ v: UInt8) { bytes.append(v) }
    public mutating func u16(_ v: UInt16) { withUnsafeBytes(of: v.littleEndian) { bytes.append(contentsOf: $0) } }
    public mutating func u32(_ v: UInt32) { withUnsafeBytes(of: v.littleEndian) { bytes.append(contentsOf: $0) } }
    public mutating func u64(_ v: UInt64) { withUnsafeBytes(of: v.littleEndian) { bytes.append(contentsOf: $0) } }
    public mutating func i32(_ v: Int32) { u32(UInt32(bitPattern: v)) }
    public mutating func i64(_ v: Int64) { u64(UInt64(bitPattern: v)) }
    public mutating func bool(_ v: Bool) { u8(v ? 1 : 0) }
    public mutating func blob(_ v: [UInt8]) { u32(UInt32(v.count)); bytes.append(contentsOf: v) }
    public mutating func string(_ v: String) { blob(Array(v.utf8)) }
    public mutating func strings(_ v: [String]) { u32(UInt32(v.count)); for s in v { string(s) } }
}

/// Bounds-checked reader. Every length read from the wire is checked against what is left
/// before anything is allocated, so a lying length cannot make the reader allocate.
public struct ByteReader: Sendable {
    private let bytes: [UInt8]
    private var offset: Int

    public init(_ bytes: [UInt8]) { self.bytes = bytes; offset = 0 }

    public var remaining: Int { bytes.count - offset }
    public var isAtEnd: Bool { offset >= bytes.count }

    private mutating func take(_ n: Int) throws(ProtocolError) -> ArraySlice<UInt8> {
        guard n >= 0, n <= remaining else { throw ProtocolError(.truncated, "message truncated") }
        defer { offset += n }
        return bytes[offset..<(offset + n)]
    }

    private mutating func fixed<T: FixedWidthInteger>(_: T.Type) throws(ProtocolError) -> T {
        let s = try take(MemoryLayout<T>.size)
        var v: T = 0
        for (i, b) in s.enumerated() { v |= T(b) << (8 * i) }
        return v
    }

    public mutating func u8() throws(ProtocolError) -> UInt8 { try fixed(UInt8.self) }
    public mutating func u16() throws(ProtocolError) -> UInt16 { try fixed(UInt16.self) }
    public mutating func u32() throws(ProtocolError) -> UInt32 { try fixed(UInt32.self) }
    public mutating func u64() throws(ProtocolError) -> UInt64 { try fixed(UInt64.self) }
    public mutating func i32() throws(ProtocolError) -> Int32 { Int32(bitPattern: try u32()) }
    public mutating func i64() throws(ProtocolError) -> Int64 { Int64(bitPattern: try u64()) }
    public mutating func bool() throws(ProtocolError) -> Bool { try u8() != 0 }
    public mutating func blob() throws(ProtocolError) -> [UInt8] { Array(try take(Int(try u32()))) }
    public mutating func string() throws(ProtocolError) -> String { String(decoding: try blob(), as: UTF8.self) }

    public mutating func strings(max: Int = 4096) throws(ProtocolError) -> [String] {
        let n = Int(try u32())
        // Each string needs at least its 4-byte length.
        guard n <= max, n * 4 <= remaining else { throw ProtocolError(.limit, "list of \(n) strings exceeds limits") }
        var out: [String] = []
        out.reserveCapacity(n)
        for _ in 0..<n { out.append(try string()) }
        return out
    }

}
