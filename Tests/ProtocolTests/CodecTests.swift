import Crypto
import Foundation
import Testing
@testable import VirtchanProtocol

@Suite struct XXH64Tests {
    @Test func knownVectors() {
        #expect(XXH64.hash([]) == 0xEF46_DB37_51D8_E999)
        #expect(XXH64.hash(Array("abc".utf8)) == 0x44BC_2CF5_AD77_0999)
    }

    @Test func streamingMatchesOneShotForAnySplit() {
        var rng = SystemRandomNumberGenerator()
        for _ in 0..<200 {
            let n = Int.random(in: 0...300, using: &rng)
            let bytes = (0..<n).map { _ in UInt8.random(in: 0...255, using: &rng) }
            var h = XXH64(seed: 7)
            var i = 0
            while i < n {
                let step = Int.random(in: 1...40, using: &rng)
                h.update(Array(bytes[i..<min(n, i + step)]))
                i += step
            }
            #expect(h.digest() == XXH64.hash(bytes, seed: 7))
        }
    }
}

@Suite struct SHA256Tests {
    @Test func agreesWithSwiftCrypto() {
        var rng = SystemRandomNumberGenerator()
        for n in [0, 1, 55, 56, 63, 64, 65, 119, 120, 1000, 65_537] {
            let bytes = (0..<n).map { _ in UInt8.random(in: 0...255, using: &rng) }
            var ours = SHA256Digest()
            ours.update(Array(bytes.prefix(n / 3)))
            ours.update(Array(bytes.dropFirst(n / 3)))
            let theirs = Crypto.SHA256.hash(data: bytes).map { String(format: "%02x", $0) }.joined()
            #expect(ours.hexDigest() == theirs, "length \(n)")
        }
    }
}

@Suite struct FrameCodecTests {
    @Test func roundTripsEveryMessage() throws {
        let messages: [any WireMessage] = [
            Hello(nonce: [1, 2, 3], client: "test"),
            HelloAck(nonce: [9], version: 1, agentVersion: "0.1.0", capabilities: ["exec", "ping"]),
            Info(agentVersion: "1", protocolVersion: 1, capabilities: [], kernelRelease: "6.1", hostname: "h",
                 uptimeSeconds: 42, execAllowed: true),
            ErrorMessage(.noSpace, errno: 28, "full"),
            ExecStart(argv: ["sh", "-c", "echo ü"], env: ["A=B"], cwd: "/tmp", tty: true, rows: 50, cols: 132),
            ExecExit(code: -1, signal: 9),
            ExecResize(rows: 61, cols: 211),
            PushRequest(path: "/x", mode: 0o755, size: 1 << 40, parents: true, wantSHA256: false),
            TreeEntries(entries: [TreeEntry(kind: .symlink, path: "a/b", mode: 0o777, size: 0, linkTarget: "../c")]),
        ]
        for m in messages {
            let frame = m.frame(id: 77, flags: 3)
            let decoder = FrameDecoder()
            decoder.feed(FrameEncoder.encode(frame))
            let back = decoder.next()
            #expect(back == frame)
            #expect(decoder.next() == nil)
        }
        let exec = ExecStart(argv: ["ls"], env: [], cwd: "", tty: false)
        #expect(try ExecStart.decode(exec.frame(id: 1)) == exec)
        let resize = ExecResize(rows: 40, cols: 120)
        #expect(try ExecResize.decode(resize.frame(id: 1)) == resize)
        #expect(try AgentStarted.decode(AgentStarted(agentVersion: "0.1.0").frame(id: 0)).agentVersion == "0.1.0")
    }

    /// An agent adds the OS and its addresses after the fields an older agent ends with; both
    /// decode, and a guest cannot make the host hold an endless list.
    @Test func infoCarriesTheOSAndAddressesAfterTheOlderFields() throws {
        var info = Info(agentVersion: "1", protocolVersion: 1, capabilities: ["exec"], kernelRelease: "6.1", hostname: "h",
                        uptimeSeconds: 42, execAllowed: true)
        let older = info.frame(id: 1)
        info.osName = "Debian GNU/Linux 12 (bookworm)"
        info.interfaces = [GuestInterface(name: "lo", addresses: ["127.0.0.1/8", "::1/128"]), GuestInterface(name: "eth0", addresses: ["10.0.0.2/24"])]
        #expect(try Info.decode(info.frame(id: 1)) == info)
        // What an older agent sends: the same fields, nothing after them.
        let truncated = Frame(older.type, id: 1, payload: Array(older.payload.dropLast(8)))
        let decodedOld = try Info.decode(truncated)
        #expect(decodedOld.osName == "" && decodedOld.interfaces.isEmpty && decodedOld.execAllowed)
        var w = ByteWriter()
        w.string("1"); w.u16(1); w.strings([]); w.string("6.1"); w.string("h"); w.u64(1); w.bool(true)
        w.string("os"); w.u32(UInt32(Info.maxInterfaces + 1))
        #expect(throws: ProtocolError.self) { try Info.decode(Frame(.info, id: 1, payload: w.bytes)) }
    }

    /// A session holder appends the agent's id for the transfer to dataReady; the agent's own
    /// dataReady has none, and both decode.
    @Test func dataReadyCarriesTheDataPortIDOnlyWhenAHolderAddsIt() throws {
        let plain = DataReady(size: 5, mode: 0o600)
        #expect(plain.payload().count == 12)
        #expect(try DataReady.decode(plain.frame(id: 3)).dataID == nil)
        let held = DataReady(size: 5, mode: 0o600, dataID: 77)
        #expect(try DataReady.decode(held.frame(id: 3)) == held)
    }

    @Test func shellStatusFollowsShellConventions() {
        #expect(ExecExit(code: 3, signal: 0).shellStatus == 3)
        #expect(ExecExit(code: -1, signal: 15).shellStatus == 143)
    }

    @Test func randomFramesSurviveRandomSplits() throws {
        var rng = SystemRandomNumberGenerator()
        var frames: [Frame] = []
        var stream: [UInt8] = []
        for i in 0..<300 {
            let n = Int.random(in: 0...2000, using: &rng)
            let type = MessageType.allCases.randomElement(using: &rng)!
            let f = Frame(type, id: UInt32(i), flags: UInt16.random(in: 0...5, using: &rng),
                          payload: (0..<n).map { _ in UInt8.random(in: 0...255, using: &rng) })
            frames.append(f)
            stream += FrameEncoder.encode(f)
        }
        let decoder = FrameDecoder()
        var out: [Frame] = []
        var i = 0
        while i < stream.count {
            let step = Int.random(in: 1...5000, using: &rng)
            decoder.feed(Array(stream[i..<min(stream.count, i + step)]))
            while let f = decoder.next() { out.append(f) }
            i += step
        }
        #expect(out == frames)
        #expect(decoder.skippedBytes == 0)
    }

    @Test func garbageBeforeAndBetweenFramesIsSkipped() throws {
        let a = Frame(.ping, id: 1, payload: [1, 2, 3])
        let b = Frame(.pong, id: 2, payload: Array(FrameHeader.magic) + [0xFF, 0xFF])
        let decoder = FrameDecoder()
        // Garbage that even contains the magic must not derail the decoder.
        decoder.feed([0xFF, 0x00] + FrameHeader.magic + [1, 2, 3, 4, 5] + FrameEncoder.encode(a)
                     + Array(repeating: 0xFF, count: 100) + FrameEncoder.encode(b))
        #expect(decoder.next() == a)
        #expect(decoder.next() == b)
        #expect(decoder.next() == nil)
        #expect(decoder.skippedBytes == 2 + 4 + 5 + 100)
    }

    @Test func oversizedLengthIsRejectedWithoutWaitingForIt() throws {
        // A header with a valid checksum whose length claims 2 GiB: the decoder must treat it as
        // garbage at once rather than wait for (or allocate) the payload.
        var header = FrameEncoder.encode(Frame(.data, id: 5, payload: []))
        header.withUnsafeMutableBytes { h in
            h.storeBytes(of: UInt32(0x8000_0000).littleEndian, toByteOffset: 12, as: UInt32.self)
            let hc = UInt32(truncatingIfNeeded: XXH64.hash(UnsafeRawBufferPointer(rebasing: h[0..<20])))
            h.storeBytes(of: hc.littleEndian, toByteOffset: 20, as: UInt32.self)
        }
        let good = Frame(.ping, id: 6, payload: [7])
        let decoder = FrameDecoder()
        decoder.feed(header + FrameEncoder.encode(good))
        #expect(decoder.next() == good)
        #expect(decoder.skippedBytes == FrameLimits.headerSize)
    }

    @Test func damagedPayloadDropsOnlyThatFrame() throws {
        var bad = FrameEncoder.encode(Frame(.ping, id: 1, payload: [1, 2, 3, 4]))
        bad[FrameLimits.headerSize + 1] ^= 0x40
        let good = Frame(.ping, id: 2, payload: [5])
        let decoder = FrameDecoder()
        decoder.feed(bad + FrameEncoder.encode(good))
        #expect(decoder.next() == good)
        #expect(decoder.corruptFrames == 1)
    }

    @Test func truncatedAndRandomInputNeverCrashes() {
        var rng = SystemRandomNumberGenerator()
        let valid = FrameEncoder.encode(ExecStart(argv: ["a", "b"]).frame(id: 3))
        for _ in 0..<2000 {
            let decoder = FrameDecoder()
            var bytes = Array(valid.prefix(Int.random(in: 0...valid.count, using: &rng)))
            if Bool.random(using: &rng) {
                bytes += (0..<Int.random(in: 0...200, using: &rng)).map { _ in UInt8.random(in: 0...255, using: &rng) }
            }
            decoder.feed(bytes)
            while let f = decoder.next() {
                // Whatever decodes must still be a bounds-checked message.
                _ = try? ExecStart.decode(f)
            }
        }
        for _ in 0..<2000 {
            let payload = (0..<Int.random(in: 0...64, using: &rng)).map { _ in UInt8.random(in: 0...255, using: &rng) }
            for type in MessageType.allCases {
                let f = Frame(type, id: 1, payload: payload)
                _ = try? Hello.decode(Frame(.hello, id: 1, payload: f.payload))
                _ = try? TreeEntries.decode(Frame(.treeEntries, id: 1, payload: f.payload))
                _ = try? ExecStart.decode(Frame(.execStart, id: 1, payload: f.payload))
                _ = try? Info.decode(Frame(.info, id: 1, payload: f.payload))
            }
        }
    }

    @Test func lyingListCountsAreRefused() {
        var w = ByteWriter()
        w.u32(1_000_000) // claims a million strings, carries none
        #expect(throws: ProtocolError.self) { try ExecStart.decode(Frame(.execStart, id: 1, payload: w.bytes)) }
        var w2 = ByteWriter()
        w2.u32(0xFFFF_FFFF) // a blob length far past the end
        #expect(throws: ProtocolError.self) { try StatRequest.decode(Frame(.statRequest, id: 1, payload: w2.bytes)) }
    }
}

@Suite struct SocketPairTests {
    init() { signal(SIGPIPE, SIG_IGN) }

    @Test func framesCrossASocketPairInBothDirections() throws {
        var fds: [Int32] = [0, 0]
        #expect(socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0, &fds) == 0)
        defer { close(fds[0]); close(fds[1]) }
        setNonBlocking(fds[0]); setNonBlocking(fds[1])
        let a = FramedConnection(fd: fds[0]), b = FramedConnection(fd: fds[1])
        let big = (0..<(FrameLimits.maxPayload)).map { UInt8(truncatingIfNeeded: $0 &* 31) }
        a.send(Frame(.execOutput, id: 9, flags: 1, payload: big))
        a.send(Hello(nonce: [1], client: "x"), id: 1)
        var got: [Frame] = []
        let deadline = Date().addingTimeInterval(10)
        while got.count < 2 && Date() < deadline {
            _ = try a.flush()
            _ = try b.fill()
            while let f = b.decoder.next() { got.append(f) }
        }
        #expect(got.count == 2)
        #expect(got.first?.payload == big)
        #expect(try Hello.decode(got[1]).client == "x")

        b.send(Frame(.pong, id: 4))
        _ = try b.flush()
        var back: Frame?
        while back == nil && Date() < deadline {
            _ = try a.fill()
            back = a.decoder.next()
        }
        #expect(back?.type == .pong)
        close(fds[1])
        fds[1] = -1
        #expect(try a.fill() == .eof)
    }

    @Test func fillFrameStopsAtEachFrameEndSoNothingIsMoved() throws {
        var fds: [Int32] = [0, 0]
        #expect(socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0, &fds) == 0)
        defer { close(fds[0]); close(fds[1]) }
        setNonBlocking(fds[1])
        // Data frames of the size a transfer sends, an empty one, and garbage between two of
        // them, all written before the reader starts: a read of everything available would
        // take several frames at once.
        let payloads: [[UInt8]] = [
            (0..<FrameLimits.dataChunk).map { UInt8(truncatingIfNeeded: $0 &* 7) },
            [],
            (0..<1000).map { UInt8(truncatingIfNeeded: $0) },
            (0..<FrameLimits.dataChunk).map { UInt8(truncatingIfNeeded: $0 &* 13) },
        ]
        var stream: [UInt8] = []
        for (i, p) in payloads.enumerated() {
            if i == 3 { stream += [0xFF, 0x01] + FrameHeader.magic + [9] }
            stream += FrameEncoder.encode(Frame(.data, id: UInt32(i), payload: p))
        }
        let bytes = stream, out = fds[0]
        let writer = Thread {
            bytes.withUnsafeBytes { b in
                var sent = 0
                while sent < b.count {
                    let n = write(out, b.baseAddress! + sent, b.count - sent)
                    if n <= 0 { return }
                    sent += n
                }
            }
        }
        writer.start()
        let reader = FramedConnection(fd: fds[1], maxPayload: FrameLimits.dataChunk + 4096)
        var got: [Frame] = []
        let deadline = Date().addingTimeInterval(10)
        while got.count < payloads.count && Date() < deadline {
            let outcome = try reader.fillFrame()
            if outcome == .wouldBlock { usleep(1000); continue }
            #expect(outcome != .eof)
            // No read runs past the end of a frame: a fill completes one frame at most, and
            // taking it out leaves the buffer empty.
            var taken = 0
            while let f = reader.decoder.next() { got.append(f); taken += 1 }
            #expect(taken <= 1, "one fill completed \(taken) frames")
            if taken == 1 { #expect(reader.decoder.bufferedBytes == 0, "a read ran \(reader.decoder.bufferedBytes) bytes past a frame") }
        }
        #expect(got.map(\.payload) == payloads)
        #expect(got.map(\.id) == [0, 1, 2, 3])
        #expect(reader.decoder.skippedBytes == 2 + 4 + 1)
    }
}
