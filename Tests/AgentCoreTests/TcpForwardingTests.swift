import Foundation
import Synchronization
import Testing
import VirtchanAgentCore
import VirtchanProtocol
import VirtchanTransport

/// A TCP server on 127.0.0.1 that runs `handle` on a thread per connection.
final class TestServer: @unchecked Sendable {
    let fd: Int32
    let port: UInt16

    init(_ handle: @escaping @Sendable (Int32) -> Void) throws {
        let (fd, port) = try TcpSocket.listen(host: "127.0.0.1", port: 0)
        self.fd = fd
        self.port = port
        _ = fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) & ~O_NONBLOCK)
        Thread {
            while true {
                let c = accept(fd, nil, nil)
                if c < 0 { return }
                Thread { handle(c); close(c) }.start()
            }
        }.start()
    }

    deinit { shutdown(fd, Int32(SHUT_RDWR)); close(fd) }
}

enum Sock {
    static func connect(_ port: UInt16) throws -> Int32 {
        let (fd, inProgress) = try TcpSocket.connect(host: "127.0.0.1", port: port)
        if inProgress {
            var p = pollfd(fd: fd, events: Int16(POLLOUT), revents: 0)
            _ = poll(&p, 1, 5000)
        }
        _ = fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) & ~O_NONBLOCK)
        var tv = timeval(tv_sec: 20, tv_usec: 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
        return fd
    }

    static func writeAll(_ fd: Int32, _ bytes: [UInt8]) -> Bool {
        bytes.withUnsafeBytes { writeFully(fd, $0) }
    }

    /// Everything until EOF; nil on an error (errno says which).
    static func readAll(_ fd: Int32) -> [UInt8]? {
        var out: [UInt8] = []
        var buf = [UInt8](repeating: 0, count: 65536)
        while true {
            let n = read(fd, &buf, buf.count)
            if n == 0 { return out }
            if n < 0 { return nil }
            out += buf[0..<n]
        }
    }

    static func pattern(_ n: Int, seed: Int) -> [UInt8] {
        (0..<n).map { UInt8(truncatingIfNeeded: ($0 &* 31) ^ seed ^ ($0 >> 9)) }
    }
}

extension AgentLoopTests {
    /// Runs a forwarder for `specs` over a session with the in-process agent while `body` runs.
    func withForwarder(_ specs: [ForwardSpec], _ body: ([PortForwarder.Bound]) throws -> Void) throws {
        try withAgent(key: AgentKey.generate()) { endpoint, _ in
            let session = try AgentSession.connect(endpoint, timeout: 10)
            let forwarder = PortForwarder(session: session, specs: specs)
            try forwarder.start()
            let done = Flag()
            nonisolated(unsafe) let f = forwarder
            Thread {
                try? f.run()
                done.set()
            }.start()
            defer {
                forwarder.stop()
                while !done.isSet { usleep(10_000) }
            }
            try body(forwarder.bound)
        }
    }

    @Test func forwardedConnectionsAreByteExactAndHalfClose() throws {
        // The "guest" service reads until its client shuts down its side, then answers with
        // what it got, reversed: only a working half-close gets the answer through.
        let server = try TestServer { c in
            guard let got = Sock.readAll(c) else { return }
            _ = Sock.writeAll(c, got.reversed())
        }
        try withForwarder([ForwardSpec(direction: .local, bindPort: 0, targetHost: "127.0.0.1", targetPort: server.port)]) { bound in
            let port = bound[0].port
            let exact = Atomic<Int>(0)
            let group = DispatchGroup()
            for i in 0..<20 {
                group.enter()
                Thread {
                    defer { group.leave() }
                    let payload = Sock.pattern(300_000 + i * 7_919, seed: i)
                    guard let fd = try? Sock.connect(port) else { return }
                    defer { close(fd) }
                    _ = Sock.writeAll(fd, payload)
                    shutdown(fd, Int32(SHUT_WR))
                    if Sock.readAll(fd) == payload.reversed() { exact.add(1, ordering: .sequentiallyConsistent) }
                }.start()
            }
            #expect(group.wait(timeout: .now() + 60) == .success)
            #expect(exact.load(ordering: .sequentiallyConsistent) == 20)
        }
    }

    @Test func aReaderThatStopsHoldsUpNoOtherConnection() throws {
        let size = 8 << 20
        let server = try TestServer { c in _ = Sock.writeAll(c, Sock.pattern(size, seed: 5)) }
        try withForwarder([ForwardSpec(direction: .local, bindPort: 0, targetHost: "127.0.0.1", targetPort: server.port)]) { bound in
            let stalled = try Sock.connect(bound[0].port)
            defer { close(stalled) }
            // It reads nothing; the others read everything.
            for _ in 0..<3 {
                let fd = try Sock.connect(bound[0].port)
                defer { close(fd) }
                #expect(Sock.readAll(fd) == Sock.pattern(size, seed: 5))
            }
        }
    }

    @Test func aServiceThatIsNotThereResetsTheClient() throws {
        // A port nobody listens on: bind one, note it, close it.
        let (probe, free) = try TcpSocket.listen(host: "127.0.0.1", port: 0)
        close(probe)
        try withForwarder([ForwardSpec(direction: .local, bindPort: 0, targetHost: "127.0.0.1", targetPort: free)]) { bound in
            let fd = try Sock.connect(bound[0].port)
            defer { close(fd) }
            var b: UInt8 = 0
            let n = read(fd, &b, 1)
            #expect(n == -1 && errno == ECONNRESET, "read gave \(n), errno \(errno)")
        }
    }

    @Test func aGuestPortReachesAHostServiceBackwards() throws {
        let server = try TestServer { c in _ = Sock.writeAll(c, Array("served from the host\n".utf8)) }
        try withForwarder([ForwardSpec(direction: .remote, bindPort: 0, targetHost: "127.0.0.1", targetPort: server.port)]) { bound in
            #expect(bound[0].port != 0)
            let fd = try Sock.connect(bound[0].port)
            defer { close(fd) }
            #expect(Sock.readAll(fd).map { String(decoding: $0, as: UTF8.self) } == "served from the host\n")
        }
    }

    @Test func forwardSpecsReadAsSSHWritesThem() {
        #expect(ForwardSpec("8080:127.0.0.1:80", direction: .local) == ForwardSpec(direction: .local, bindPort: 8080, targetHost: "127.0.0.1", targetPort: 80))
        #expect(ForwardSpec("0.0.0.0:8080:localhost:80", direction: .local)?.bindHost == "0.0.0.0")
        #expect(ForwardSpec("[::1]:8080:[::1]:80", direction: .remote)?.targetHost == "[::1]")
        #expect(ForwardSpec("8080:80", direction: .local) == nil)
        #expect(ForwardSpec("x:127.0.0.1:80", direction: .local) == nil)
        #expect(ForwardSpec("8080:127.0.0.1:0", direction: .local) == nil)
    }

    /// This host's side may be a name, looked up once when the forward starts; the guest's side
    /// may not (the agent looks up none), and a name that does not resolve fails at start.
    @Test func namesAreLookedUpOnThisHostsSideOnly() throws {
        var buffer = [CChar](repeating: 0, count: 256)
        gethostname(&buffer, buffer.count)
        let me = String(decoding: buffer.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
        // What this host's name service says of its own name, as `getent` reads it.
        let getent = Process()
        getent.executableURL = URL(fileURLWithPath: "/usr/bin/getent")
        getent.arguments = ["ahosts", me]
        let pipe = Pipe()
        getent.standardOutput = pipe
        try getent.run()
        let listed = String(decoding: pipe.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
            .split(separator: "\n").compactMap { $0.split(separator: " ").first.map(String.init) }
        getent.waitUntilExit()
        let local = try #require(ForwardSpec("\(me):0:127.0.0.1:80", direction: .local))
        let remote = try #require(ForwardSpec("8080:\(me):3128", direction: .remote))
        if listed.isEmpty {
            #expect(throws: TransportError.self) { try local.resolved() }
        } else {
            let bound = try local.resolved()
            #expect(listed.contains(bound.bindHost.trimmingCharacters(in: CharacterSet(charactersIn: "[]"))), "\(bound) vs \(listed)")
            #expect(bound.targetHost == "127.0.0.1" && bound.bindPort == 0 && bound.targetPort == 80)
            let reached = try remote.resolved()
            #expect(listed.contains(reached.targetHost.trimmingCharacters(in: CharacterSet(charactersIn: "[]"))))
            #expect(reached.bindHost == "127.0.0.1")
        }
        // Addresses and localhost are taken as they are.
        let plain = try #require(ForwardSpec("[::1]:0:localhost:80", direction: .local))
        #expect(try plain.resolved() == plain)
        // A name in the guest is refused, before anything is looked up.
        let guestName = try #require(ForwardSpec("8080:\(me):80", direction: .local))
        let refused = #expect(throws: TransportError.self) { try guestName.resolved() }
        #expect(refused?.message.contains("the agent looks up no names") == true)
        let unknown = try #require(ForwardSpec("3142:no-such-host.invalid:3142", direction: .remote))
        let failed = #expect(throws: TransportError.self) { try unknown.resolved() }
        #expect(failed?.message.contains("cannot look up 'no-such-host.invalid'") == true)
    }
}
