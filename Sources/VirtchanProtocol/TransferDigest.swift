/// The end-to-end check of a whole transfer: XXH64 over the sequence of (XXH64 of each data
/// payload, payload length). Each side hashes every byte once (the per-frame hash doubles as
/// the frame check) and still catches a changed, missing, repeated or reordered frame.
public struct TransferDigest: Sendable {
    private var state = XXH64()
    public private(set) var bytes: UInt64 = 0

    public init() {}

    public mutating func add(payloadHash: UInt64, length: Int) {
        var record = (payloadHash.littleEndian, UInt64(length).littleEndian)
        withUnsafeBytes(of: &record) { state.update($0) }
        bytes += UInt64(length)
    }

    public func digest() -> UInt64 { state.digest() }
}
