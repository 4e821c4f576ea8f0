import Crypto
import Testing
import VirtchanProtocol

@Suite struct AgentKeyTests {
    /// RFC 4231 test cases 1 and 2, and a long key (hashed first) against swift-crypto.
    @Test func hmacMatchesTheStandardVectors() {
        #expect(hexString(hmacSHA256(key: [UInt8](repeating: 0x0b, count: 20), message: Array("Hi There".utf8)))
                == "b0344c61d8db38535ca8afceaf0bf12b881dc200c9833da726e9376c2e32cff7")
        #expect(hexString(hmacSHA256(key: Array("Jefe".utf8), message: Array("what do ya want for nothing?".utf8)))
                == "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843")
        let longKey = [UInt8](repeating: 0xaa, count: 131)
        let message = Array("Test Using Larger Than Block-Size Key - Hash Key First".utf8)
        let expected = Array(HMAC<Crypto.SHA256>.authenticationCode(for: message, using: SymmetricKey(data: longKey)))
        #expect(hmacSHA256(key: longKey, message: message) == expected)
    }

    @Test func keyFileFormRoundTripsAndRejectsJunk() throws {
        let key = AgentKey.generate()
        #expect(key.fileText.count == 65)
        #expect(AgentKey(fileText: key.fileText) == key)
        #expect(AgentKey(fileText: String(key.fileText.dropLast())) == key)
        for bad in ["", "abc", String(repeating: "g", count: 64), String(repeating: "a", count: 62), String(repeating: "a", count: 66)] {
            #expect(AgentKey(fileText: bad) == nil, "\(bad)")
        }
        #expect(AgentKey.generate() != AgentKey.generate())
    }

    /// Nonces and keys come whole at any length, and never twice the same.
    @Test func randomBytesHaveTheLengthAskedAndDiffer() {
        for count in [0, 1, 7, 8, 16, 33] { #expect(randomBytes(count).count == count) }
        #expect(randomBytes(16) != randomBytes(16))
        #expect(AgentKey.generate() != AgentKey.generate())
    }

    @Test func proofsBindTheKeyAndBothNonces() {
        let key = AgentKey.generate()
        let nonce: [UInt8] = Array(0..<16), challenge: [UInt8] = Array(16..<32)
        let proof = key.proof(hostNonce: nonce, challenge: challenge)
        #expect(key.verify(proof, hostNonce: nonce, challenge: challenge))
        #expect(!key.verify(proof, hostNonce: challenge, challenge: nonce))
        #expect(!key.verify(proof, hostNonce: nonce, challenge: Array(challenge.reversed())))
        #expect(!AgentKey.generate().verify(proof, hostNonce: nonce, challenge: challenge))
        #expect(!key.verify(Array(proof.dropLast()), hostNonce: nonce, challenge: challenge))
        #expect(!key.verify([], hostNonce: nonce, challenge: challenge))
    }

    /// An agent from before keys ends its hello after the capabilities; a host still reads it.
    @Test func aHelloAckWithoutAChallengeStillDecodes() throws {
        var w = ByteWriter()
        w.blob([9, 9]); w.u16(1); w.string("0.0.9"); w.strings(["ping"])
        let old = try HelloAck.decode(Frame(.helloAck, id: 0, payload: w.bytes))
        #expect(old.challenge.isEmpty)
        #expect(old.capabilities == ["ping"])
        let keyed = HelloAck(nonce: [1], version: 1, agentVersion: "x", capabilities: [Capability.auth], challenge: [7, 7, 7])
        #expect(try HelloAck.decode(keyed.frame(id: 0)) == keyed)
        #expect(try AuthProof.decode(AuthProof(mac: [1, 2, 3]).frame(id: 4)).mac == [1, 2, 3])
    }
}
