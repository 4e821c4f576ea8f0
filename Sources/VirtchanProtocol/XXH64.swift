// XXH64, the 64-bit xxHash, in a streaming form. It is the checksum of every frame
// payload and of every whole file: fast enough for a TCG guest (well over 1 GiB/s),
// unlike SHA-256 (about 40 MiB/s there).

private let p1: UInt64 = 0x9E37_79B1_85EB_CA87
private let p2: UInt64 = 0xC2B2_AE3D_27D4_EB4F
private let p3: UInt64 = 0x1656_67B1_9E37_79F9
private let p4: UInt64 = 0x85EB_CA77_C2B2_AE63
private let p5: UInt64 = 0x27D4_EB2F_1656_67C5

@inline(__always) private func rotl(_ x: UInt64, _ r: UInt64) -> UInt64 { (x << r) | (x >> (64 - r)) }

@inline(__always) private func round(_ acc: UInt64, _ input: UInt64) -> UInt64 {
    rotl(acc &+ input &* p2, 31) &* p1
}

@inline(__always) private func mergeRound(_ acc: UInt64, _ val: UInt64) -> UInt64 {
    (acc ^ round(0, val)) &* p1 &+ p4
}

public struct XXH64: Sendable {
    private var v1: UInt64, v2: UInt64, v3: UInt64, v4: UInt64
    private let seed: UInt64
    private var total: UInt64 = 0
    /// Up to 31 bytes that did not fill a 32-byte stripe yet.
    private var tail: (UInt64, UInt64, UInt64, UInt64) = (0, 0, 0, 0)
    private var tailCount = 0

    public init(seed: UInt64 = 0) {
        self.seed = seed
        v1 = seed &+ p1 &+ p2
        v2 = seed &+ p2
        v3 = seed
        v4 = seed &- p1
    }

    public static func hash(_ bytes: UnsafeRawBufferPointer, seed: UInt64 = 0) -> UInt64 {
        var h = XXH64(seed: seed)
        h.update(bytes)
        return h.digest()
    }

    public static func hash(_ bytes: [UInt8], seed: UInt64 = 0) -> UInt64 {
        bytes.withUnsafeBytes { hash($0, seed: seed) }
    }

    public mutating func update(_ bytes: [UInt8]) {
        bytes.withUnsafeBytes { update($0) }
    }

    public mutating func update(_ input: UnsafeRawBufferPointer) {
        guard let base = input.baseAddress, input.count > 0 else { return }
        var p = base
        var remaining = input.count
        total &+= UInt64(remaining)
        if tailCount > 0 {
            let take = min(32 - tailCount, remaining)
            withUnsafeMutableBytes(of: &tail) { t in
                (t.baseAddress! + tailCount).copyMemory(from: p, byteCount: take)
            }
            tailCount += take
            p += take
            remaining -= take
            if tailCount < 32 { return }
            withUnsafeBytes(of: &tail) { t in
                v1 = round(v1, UInt64(littleEndian: t.loadUnaligned(fromByteOffset: 0, as: UInt64.self)))
                v2 = round(v2, UInt64(littleEndian: t.loadUnaligned(fromByteOffset: 8, as: UInt64.self)))
                v3 = round(v3, UInt64(littleEndian: t.loadUnaligned(fromByteOffset: 16, as: UInt64.self)))
                v4 = round(v4, UInt64(littleEndian: t.loadUnaligned(fromByteOffset: 24, as: UInt64.self)))
            }
            tailCount = 0
        }
        var a = v1, b = v2, c = v3, d = v4
        while remaining >= 32 {
            a = round(a, UInt64(littleEndian: p.loadUnaligned(fromByteOffset: 0, as: UInt64.self)))
            b = round(b, UInt64(littleEndian: p.loadUnaligned(fromByteOffset: 8, as: UInt64.self)))
            c = round(c, UInt64(littleEndian: p.loadUnaligned(fromByteOffset: 16, as: UInt64.self)))
            d = round(d, UInt64(littleEndian: p.loadUnaligned(fromByteOffset: 24, as: UInt64.self)))
            p += 32
            remaining -= 32
        }
        v1 = a; v2 = b; v3 = c; v4 = d
        if remaining > 0 {
            withUnsafeMutableBytes(of: &tail) { t in
                t.baseAddress!.copyMemory(from: p, byteCount: remaining)
            }
            tailCount = remaining
        }
    }

    public func digest() -> UInt64 {
        var h: UInt64
        if total >= 32 {
            h = rotl(v1, 1) &+ rotl(v2, 7) &+ rotl(v3, 12) &+ rotl(v4, 18)
            h = mergeRound(h, v1)
            h = mergeRound(h, v2)
            h = mergeRound(h, v3)
            h = mergeRound(h, v4)
        } else {
            h = seed &+ p5
        }
        h &+= total
        var t = tail
        let count = tailCount
        withUnsafeBytes(of: &t) { buf in
            var i = 0
            while i + 8 <= count {
                let k = round(0, UInt64(littleEndian: buf.loadUnaligned(fromByteOffset: i, as: UInt64.self)))
                h = rotl(h ^ k, 27) &* p1 &+ p4
                i += 8
            }
            if i + 4 <= count {
                let k = UInt64(UInt32(littleEndian: buf.loadUnaligned(fromByteOffset: i, as: UInt32.self)))
                h = rotl(h ^ (k &* p1), 23) &* p2 &+ p3
                i += 4
            }
            while i < count {
                h = rotl(h ^ (UInt64(buf[i]) &* p5), 11) &* p1
                i += 1
            }
        }
        h ^= h >> 33
        h &*= p2
        h ^= h >> 29
        h &*= p3
        h ^= h >> 32
        return h
    }
}
