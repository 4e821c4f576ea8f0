/// The per-domain secret that lets an agent tell its host from anything else that reaches
/// its port. The host keeps it in the domain's private state directory; the guest gets it at
/// provisioning (`/etc/virtchan/agent.key`). It never crosses the channel: the agent sends a
/// fresh challenge in its hello, and the host answers with an HMAC-SHA256 over both nonces.
public struct AgentKey: Sendable, Equatable {
    public static let byteCount = 32
    /// Where the agent looks for it in the guest.
    public static let guestPath = "/etc/virtchan/agent.key"

    public let bytes: [UInt8]

    public init?(bytes: [UInt8]) {
        guard bytes.count == Self.byteCount else { return nil }
        self.bytes = bytes
    }

    /// Parses the file form: 64 hex digits, optionally followed by a newline.
    public init?(fileText: String) {
        var text = Substring(fileText)
        while let last = text.last, last == "\n" || last == "\r" || last == " " { text = text.dropLast() }
        guard let b = VirtchanProtocol.bytes(fromHex: String(text)) else { return nil }
        self.init(bytes: b)
    }

    /// A new random key.
    public static func generate() -> AgentKey { AgentKey(bytes: randomBytes(byteCount))! }

    /// The file form.
    public var fileText: String { hexString(bytes) + "\n" }

    /// What the host sends to prove it holds the key: HMAC-SHA256 over a label, the host's
    /// hello nonce and the agent's challenge.
    public func proof(hostNonce: [UInt8], challenge: [UInt8]) -> [UInt8] {
        hmacSHA256(key: bytes, message: Array("virtchan-auth-1".utf8) + hostNonce + challenge)
    }

    /// Checks a proof in constant time.
    public func verify(_ proof: [UInt8], hostNonce: [UInt8], challenge: [UInt8]) -> Bool {
        let expected = self.proof(hostNonce: hostNonce, challenge: challenge)
        guard proof.count == expected.count else { return false }
        var diff: UInt8 = 0
        for i in 0..<expected.count { diff |= proof[i] ^ expected[i] }
        return diff == 0
    }
}

/// HMAC (RFC 2104) over SHA-256.
public func hmacSHA256(key: [UInt8], message: [UInt8]) -> [UInt8] {
    var k = key.count > 64 ? SHA256Digest.hash(key) : key
    k += [UInt8](repeating: 0, count: 64 - k.count)
    var inner = SHA256Digest()
    inner.update(k.map { $0 ^ 0x36 } + message)
    var outer = SHA256Digest()
    outer.update(k.map { $0 ^ 0x5c } + inner.digest())
    return outer.digest()
}

/// `count` bytes from the kernel's CSPRNG (SystemRandomNumberGenerator reads getrandom), eight
/// per read: a nonce costs two system calls, not one per byte.
public func randomBytes(_ count: Int) -> [UInt8] {
    var rng = SystemRandomNumberGenerator()
    var bytes: [UInt8] = []
    bytes.reserveCapacity(count + 7)
    while bytes.count < count { withUnsafeBytes(of: rng.next()) { bytes += $0 } }
    return Array(bytes.prefix(count))
}
