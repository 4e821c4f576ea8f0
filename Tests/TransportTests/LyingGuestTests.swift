import Foundation
import Testing
import VirtchanProtocol
import VirtchanFileTransfer
@testable import VirtchanTransport

/// A flag shared with the scripted peer's thread.
final class Atomic<T: Sendable>: @unchecked Sendable {
    private var value: T
    private let lock = NSLock()
    init(_ value: T) { self.value = value }
    func get() -> T { lock.lock(); defer { lock.unlock() }; return value }
    func set(_ v: T) { lock.lock(); value = v; lock.unlock() }
}

private func eventually(_ timeout: Double, _ condition: () -> Bool) -> Bool {
    let deadline = Date().addingTimeInterval(timeout)
    while Date() < deadline {
        if condition() { return true }
        usleep(20_000)
    }
    return condition()
}

/// A guest that breaks the rules, played by a scripted peer on real unix sockets: the host
/// must refuse what it says rather than trust it.
@Suite(.serialized) struct LyingGuestTests {
    init() { signal(SIGPIPE, SIG_IGN) }

    /// Reads frames from a blocking socket until one of `type` arrives.
    private func awaitFrame(_ type: MessageType, on fd: Int32, _ decoder: FrameDecoder) -> Frame? {
        var buf = [UInt8](repeating: 0, count: 4096)
        while true {
            while let f = decoder.next() { if f.type == type { return f } }
            let n = buf.withUnsafeMutableBytes { read(fd, $0.baseAddress!, $0.count) }
            if n <= 0 { return nil }
            decoder.feed(Array(buf[0..<n]))
        }
    }

    private func send(_ frame: Frame, _ fd: Int32) {
        let bytes = FrameEncoder.encode(frame)
        _ = bytes.withUnsafeBytes { write(fd, $0.baseAddress!, $0.count) }
    }

    /// Plays a guest that answers a pull with `announced` bytes in its dataReady and then sends
    /// `sent` bytes; runs the host's pull into an empty file. Returns the host's error, the size
    /// the file ended with, and whether the guest was told to abort.
    private func scriptedPull(announced: UInt64, sent: Int) throws -> (error: TransportError?, fileSize: Int, aborted: Bool) {
        let dir = "/tmp/vc-liar-\(getpid())-\(announced)"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let controlListener = try UnixSocket.listen(dir + "/c.sock"), dataListener = try UnixSocket.listen(dir + "/d.sock")
        defer { close(controlListener); close(dataListener) }
        let aborted = Atomic(false)

        let liar = Thread {
            let c = accept(controlListener, nil, nil)
            let decoder = FrameDecoder()
            guard let helloFrame = self.awaitFrame(.hello, on: c, decoder), let hello = try? Hello.decode(helloFrame) else { return }
            self.send(HelloAck(nonce: hello.nonce, version: 1, agentVersion: "liar", capabilities: []).frame(id: helloFrame.id), c)
            let d = accept(dataListener, nil, nil)
            guard let req = self.awaitFrame(.pullRequest, on: c, decoder) else { return }
            self.send(DataReady(size: announced, mode: 0o644).frame(id: req.id), c)
            self.send(Frame(.data, id: req.id, payload: Array(repeating: 0x41, count: sent)), d)
            if self.awaitFrame(.abort, on: c, decoder) != nil { aborted.set(true) }
            close(d)
            close(c)
        }
        liar.start()
        defer { ChannelLock.removeLocks(of: "liar") }
        let session = try AgentSession.connect(AgentEndpoint(domain: "liar", controlSocket: dir + "/c.sock",
                                                             dataSocket: dir + "/d.sock", consoleLog: nil,
                                                             allowsUnkeyedAgent: true), timeout: 10)
        let sink = open(dir + "/out", O_WRONLY | O_CREAT | O_TRUNC, 0o600)
        defer { close(sink) }
        var failure: TransportError?
        do { _ = try FileTransfer(session: session).pull("/liar", into: sink) } catch { failure = error }
        var st = stat()
        fstat(sink, &st)
        return (failure, Int(st.st_size), eventually(5) { aborted.get() })
    }

    @Test func moreBytesThanAnnouncedAreRefused() throws {
        let (error, size, aborted) = try scriptedPull(announced: 10, sent: 20)
        let e = try #require(error, "a pull that overflowed its announced size was accepted")
        #expect(e.code == .integrity)
        #expect(e.message.contains("more than the 10 bytes it announced"))
        #expect(size == 0, "bytes beyond the announced size reached the file")
        #expect(aborted)
    }

    /// A guest that announces far more than the host's file system holds (1 EiB) is refused
    /// before a byte is written, and told to stop.
    @Test func anAnnouncementBeyondFreeSpaceIsRefusedUpFront() throws {
        let (error, size, aborted) = try scriptedPull(announced: 1 << 60, sent: 4096)
        let e = try #require(error, "a pull larger than the free space was accepted")
        #expect(e.errno == ENOSPC)
        #expect(e.message.contains("not enough space for /liar"))
        #expect(size == 0)
        #expect(aborted, "the guest was not told to stop")
    }

    /// A guest that answers a tree listing with batch after batch, forever: the host stops at
    /// its bounds, tells the guest to stop, and holds no more than they allow.
    @Test(arguments: ["many entries", "long names"])
    func anEndlessTreeListingIsCutOff(kind: String) throws {
        let dir = "/tmp/vc-endless-\(getpid())-\(kind.count)"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let listener = try UnixSocket.listen(dir + "/c.sock")
        defer { close(listener) }
        let stop = Atomic(false)
        let liar = Thread {
            let c = accept(listener, nil, nil)
            defer { close(c) }
            let decoder = FrameDecoder()
            guard let helloFrame = self.awaitFrame(.hello, on: c, decoder), let hello = try? Hello.decode(helloFrame) else { return }
            self.send(HelloAck(nonce: hello.nonce, version: 1, agentVersion: "liar", capabilities: []).frame(id: helloFrame.id), c)
            guard let req = self.awaitFrame(.listTree, on: c, decoder) else { return }
            let name = kind == "many entries" ? "f" : String(repeating: "n", count: 4000)
            let batch = TreeEntries(entries: (0..<(kind == "many entries" ? 35_000 : 250)).map {
                TreeEntry(kind: .regular, path: "\(name)\($0)", mode: 0o644, size: 0, linkTarget: "")
            }).frame(id: req.id)
            let bytes = FrameEncoder.encode(batch)
            while !stop.get() {
                let n = bytes.withUnsafeBytes { write(c, $0.baseAddress!, $0.count) }
                if n <= 0 { break }
            }
        }
        liar.start()
        defer { stop.set(true) }
        // A name per case: the lock of one case's session may outlive it for a moment.
        let domain = "endless-\(kind.count)-\(getpid())"
        defer { ChannelLock.removeLocks(of: domain) }
        let session = try AgentSession.connect(AgentEndpoint(domain: domain, controlSocket: dir + "/c.sock", dataSocket: nil,
                                                             consoleLog: nil, allowsUnkeyedAgent: true), timeout: 10)
        let start = Date()
        do {
            let entries = try FileTransfer(session: session).listTree("/endless")
            Issue.record("an endless listing ended with \(entries.count) entries")
        } catch {
            #expect(error.code == .protocolViolation)
            #expect(error.message.contains("goes past what one listing may hold"), "\(error.message)")
        }
        // Stopping at the bounds takes decoding a million entries first: 25 s for both cases
        // in a debug build on a 2-core machine, 63-83 s under AddressSanitizer. Without the
        // bounds the listing would never end.
        #expect(Date().timeIntervalSince(start) < 180)
    }

    @Test func treePathsThatEscapeAreRejected() {
        for bad in ["../x", "a/../../x", "/etc/passwd", "a//b", "./a", "a/.", "", "a/\0b"] {
            #expect(!isSafeRelativePath(bad), "\(bad) was accepted")
        }
        for good in ["a", "a/b/c.txt", "..a", "a..", ".hidden/x"] {
            #expect(isSafeRelativePath(good), "\(good) was refused")
        }
    }
}

@Suite struct DisplaySafeTests {
    /// Guest text reaches the host's terminal escaped and bounded.
    @Test func controlCharactersAreEscapedAndLengthIsBounded() {
        #expect(displaySafe("ok\ttab") == "ok\ttab")
        #expect(displaySafe("\u{1b}]0;owned\u{7}\u{1b}[2J\rhidden") == "\\u{1b}]0;owned\\u{7}\\u{1b}[2J\\u{d}hidden")
        #expect(displaySafe("line\nnext") == "line\\u{a}next")
        #expect(displaySafe("\u{9b}31m") == "\\u{9b}31m")
        let long = displaySafe(String(repeating: "é", count: 10_000))
        #expect(long.utf8.count <= 4096 + 3)
        #expect(long.hasSuffix("…"))
        #expect(TransportError(remote: ErrorMessage(.failed, "\u{1b}[31mred")).message == "\\u{1b}[31mred")
    }
}
