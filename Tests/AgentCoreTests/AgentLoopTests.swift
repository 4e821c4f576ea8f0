import Foundation
import Synchronization
import Testing
import VirtchanAgentCore
import VirtchanProtocol
import VirtchanFileTransfer
import VirtchanTransport

/// A flag one thread sets and another reads.
final class Flag: Sendable {
    private let value = Atomic<Bool>(false)
    func set() { value.store(true, ordering: .sequentiallyConsistent) }
    var isSet: Bool { value.load(ordering: .sequentiallyConsistent) }
}

/// Stands where QEMU stands: a unix socket the host connects to, relayed to one end of a
/// socketpair whose other end the agent holds as its "port". Like a virtio-serial port, the
/// agent's end outlives each host connection.
final class PortRelay: Sendable {
    let path: String
    /// The agent's end; the opener hands out duplicates, which the agent closes when done.
    let agentEnd: Int32
    private let relayEnd: Int32
    private let listener: Int32
    private let stopping = Flag()
    private let finished = Flag()

    init(path: String) throws {
        self.path = path
        var pair: [Int32] = [0, 0]
        guard socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0, &pair) == 0 else { throw TransportError.system("socketpair") }
        agentEnd = pair[0]
        relayEnd = pair[1]
        listener = try UnixSocket.listen(path)
        Thread { [self] in serve() }.start()
    }

    private func serve() {
        defer { finished.set() }
        while !stopping.isSet {
            var l = pollfd(fd: listener, events: Int16(POLLIN), revents: 0)
            guard poll(&l, 1, 50) > 0 else { continue }
            let conn = accept(listener, nil, nil)
            guard conn >= 0 else { continue }
            pump(conn)
            close(conn)
        }
    }

    /// Copies bytes both ways until the host hangs up.
    private func pump(_ conn: Int32) {
        var buf = [UInt8](repeating: 0, count: 256 * 1024)
        while !stopping.isSet {
            var fds = [pollfd(fd: conn, events: Int16(POLLIN), revents: 0), pollfd(fd: relayEnd, events: Int16(POLLIN), revents: 0)]
            guard poll(&fds, 2, 50) > 0 else { continue }
            for (from, to) in [(0, 1), (1, 0)] where fds[from].revents != 0 {
                let n = buf.withUnsafeMutableBytes { read(fds[from].fd, $0.baseAddress!, $0.count) }
                if n <= 0 {
                    if from == 0 { return }
                    continue
                }
                let ok = buf.withUnsafeBytes { writeFully(fds[to].fd, UnsafeRawBufferPointer(rebasing: $0[0..<n])) }
                if !ok && from == 0 { return }
            }
        }
    }

    func shutdown() {
        stopping.set()
        while !finished.isSet { usleep(10_000) }
        close(listener)
        close(relayEnd)
        close(agentEnd)
        unlink(path)
    }
}

/// The agent's two ports, each behind a relay.
struct RelayedPorts: PortOpener {
    let control: PortRelay
    let data: PortRelay

    func available() -> [(name: String, location: String)] {
        [("org.virtchan.control", control.path), ("org.virtchan.data", data.path)]
    }

    func open(_ name: String) -> Result<Int32, PortFailure> {
        let relay = name == "org.virtchan.control" ? control : data
        let fd = dup(relay.agentEnd)
        guard fd >= 0 else { return .failure(.failed(location: relay.path, errno: errno)) }
        _ = fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK)
        return .success(fd)
    }
}

/// The whole agent loop in this process, driven by the real host client over relayed
/// socketpairs: the same requests the end-to-end tests send through QEMU, with no guest.
@Suite(.serialized) struct AgentLoopTests {
    /// Runs an agent with `key` while `body` talks to it as domain `name`.
    func withAgent(key: AgentKey?, _ body: (_ endpoint: AgentEndpoint, _ dir: String) throws -> Void) throws {
        try withAgent(key: key) { endpoint, dir, _ in try body(endpoint, dir) }
    }

    /// The same, handing `body` the agent too (to stop it); `stopped` says when it has.
    func withAgent(key: AgentKey?, _ body: (_ endpoint: AgentEndpoint, _ dir: String, _ agent: (stop: () -> Void, stopped: Flag)) throws -> Void) throws {
        let dir = NSTemporaryDirectory() + "vc-agentloop-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let control = try PortRelay(path: dir + "/control.sock"), data = try PortRelay(path: dir + "/data.sock")
        var options = AgentOptions()
        options.ports = RelayedPorts(control: control, data: data)
        options.key = key
        options.logPath = dir + "/agent.log"
        let agent = Agent(options: options)
        let stopped = Flag()
        Thread {
            _ = agent.run()
            stopped.set()
        }.start()
        defer {
            agent.stop()
            while !stopped.isSet { usleep(10_000) }
            control.shutdown()
            data.shutdown()
        }
        let name = "agentloop-\(getpid())"
        defer { ChannelLock.removeLocks(of: name) }
        try body(AgentEndpoint(domain: name, controlSocket: control.path, dataSocket: data.path, consoleLog: nil, key: key), dir,
                 (stop: { agent.stop() }, stopped: stopped))
    }

    /// An agent told to stop (the guest shuts down or reboots) says so to the host still
    /// connected, so that its session holder waits for the next agent.
    @Test func aHostStillConnectedHearsTheAgentStop() throws {
        try withAgent(key: nil) { endpoint, _, agent in
            // The host's end, as a session holder has it: connected, between requests.
            let fd = try UnixSocket.connect(endpoint.controlSocket)
            defer { close(fd) }
            let conn = FramedConnection(fd: fd)
            var heard: [MessageType] = []
            func listen(until done: () -> Bool) {
                let deadline = Date().addingTimeInterval(10)
                while !done() && Date() < deadline {
                    var p = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
                    guard poll(&p, 1, 100) > 0 else { continue }
                    guard case .data = try? conn.fill() else { return }
                    while let frame = conn.decoder.next() { heard.append(frame.type) }
                }
            }
            conn.send(Hello(nonce: [1, 2, 3, 4], client: "test").frame(id: 1))
            conn.send(Frame(.ping, id: 7))
            try conn.flush()
            listen { heard.contains(.pong) }
            #expect(heard.contains(.helloAck) && heard.contains(.pong))
            agent.stop()
            listen { heard.contains(.agentStopping) }
            #expect(heard.last == .agentStopping, "frames heard: \(heard)")
            for _ in 0..<500 where !agent.stopped.isSet { usleep(10_000) }
            #expect(agent.stopped.isSet)
        }
    }

    @Test func aKeyedAgentServesPingInfoAndExecToTheHostThatHoldsItsKey() throws {
        let key = AgentKey.generate()
        try withAgent(key: key) { endpoint, _ in
            let session = try AgentSession.connect(endpoint, timeout: 10)
            #expect(session.agentHoldsKey)
            #expect(try session.ping() >= 0)
            let info = try session.info()
            #expect(info.agentVersion == agentVersion)
            #expect(info.capabilities.contains(Capability.exec))
            let out = try ExecClient.capture(session, ["/bin/sh", "-c", "echo out; echo err >&2; exit 3"])
            #expect(out.stdoutText == "out\n")
            #expect(out.stderrText == "err\n")
            #expect(out.status == 3)
            let missing = #expect(throws: TransportError.self) {
                _ = try ExecClient.capture(session, ["/no/such/command"])
            }
            #expect(missing?.remote?.remoteCode == .commandNotFound)
            // However much a command prints, the host keeps only what it asked for.
            let flood = try ExecClient.capture(session, ["/bin/sh", "-c", "while :; do echo flood; done"], limit: 1000)
            #expect(flood.stdout.count == 1000)
            #expect(flood.truncated)
        }
    }

    /// How a command starts: looked up in the PATH it is given, in the root unless told
    /// otherwise, in its own process group, with no signal blocked and SIGPIPE at its default
    /// (the agent blocks every signal around the start and ignores SIGPIPE); and each way it
    /// can fail to start.
    @Test func aCommandStartsAsAShellWouldStartIt() throws {
        try withAgent(key: AgentKey.generate()) { endpoint, dir in
            let session = try AgentSession.connect(endpoint, timeout: 10)
            let bin = dir + "/bin"
            try FileManager.default.createDirectory(atPath: bin, withIntermediateDirectories: true)
            #expect(FileManager.default.createFile(atPath: bin + "/greet", contents: Data("#!/bin/sh\necho hello from $0\n".utf8),
                                           attributes: [.posixPermissions: 0o755]))
            #expect(FileManager.default.createFile(atPath: bin + "/locked", contents: Data("#!/bin/sh\n".utf8),
                                           attributes: [.posixPermissions: 0o644]))

            let found = try ExecClient.capture(session, ["greet"], env: ["PATH=/no/such/dir:" + bin])
            #expect(found.stdoutText == "hello from \(bin)/greet\n")
            #expect(found.status == 0)
            // With no working folder asked for, a command runs in the root, whatever the agent's.
            #expect(FileManager.default.currentDirectoryPath != "/")
            #expect(try ExecClient.capture(session, ["pwd"]).stdoutText == "/\n")
            // An empty PATH entry is the command's working folder.
            var here = ExecOptions(argv: ["greet"])
            here.env = ["PATH="]
            here.cwd = bin
            here.forwardStdin = false
            var printed: [UInt8] = []
            let ran = try ExecClient.run(session, here, stdin: 0, terminal: 1) { stream, bytes in
                if stream == .stdout { printed += Array(bytes) }
                return true
            }
            #expect(String(decoding: printed, as: UTF8.self) == "hello from \(bin)/greet\n")
            #expect(ran.exit?.code == 0)

            // /proc/self/stat: pid is field 1 and the process group field 5; status has the masks.
            let stat = try ExecClient.capture(session, ["cat", "/proc/self/stat", "/proc/self/status"])
            let fields = stat.stdoutText.split(separator: " ")
            #expect(fields.count > 5 && fields[0] == fields[4], "\(stat.stdoutText.prefix(80))")
            func mask(_ name: String) -> UInt64? {
                stat.stdoutText.split(separator: "\n").first { $0.hasPrefix(name + ":") }
                    .flatMap { UInt64($0.dropFirst(name.count + 1).trimmingCharacters(in: .whitespaces), radix: 16) }
            }
            #expect(mask("SigBlk") == 0)
            let sigpipeBit = UInt64(1) << (UInt64(SIGPIPE) - 1)
            #expect(mask("SigIgn").map { $0 & sigpipeBit } == 0)

            for (argv, code, text) in [(["no-such-command"], RemoteErrorCode.commandNotFound, "no-such-command: command not found"),
                                       (["locked"], .permission, "locked: permission denied"),
                                       ([bin + "/locked"], .permission, "permission denied")] {
                let error = #expect(throws: TransportError.self) {
                    _ = try ExecClient.capture(session, argv, env: ["PATH=" + bin])
                }
                #expect(error?.remote?.remoteCode == code)
                #expect(error?.message.contains(text) == true, "\(String(describing: error))")
            }
            var elsewhere = ExecOptions(argv: ["true"])
            elsewhere.cwd = dir + "/missing"
            elsewhere.forwardStdin = false
            let error = #expect(throws: TransportError.self) {
                _ = try ExecClient.run(session, elsewhere, stdin: 0, terminal: 1) { _, _ in true }
            }
            #expect(error?.message.contains("cannot change to \(dir)/missing") == true, "\(String(describing: error))")
            // Nothing of the failed starts is left: the next command runs as usual.
            #expect(try ExecClient.capture(session, ["true"]).status == 0)
        }
    }

    @Test func aHostWithoutTheKeyIsServedNothing() throws {
        try withAgent(key: AgentKey.generate()) { endpoint, _ in
            var wrong = endpoint
            wrong.key = AgentKey.generate()
            let error = #expect(throws: TransportError.self) { _ = try AgentSession.connect(wrong, timeout: 5) }
            #expect(error?.code == .unauthenticated)
            // The right key still works afterwards.
            let session = try AgentSession.connect(endpoint, timeout: 10)
            #expect(try session.ping() >= 0)
        }
    }

    /// A process that runs the agent among other work gets its own signal actions back when
    /// the agent stops (SIGIO's default action would end it on the next stray signal).
    @Test func theAgentPutsBackTheSignalActionsItFound() throws {
        let before = signal(SIGIO, SIG_IGN)
        defer { signal(SIGIO, before) }
        try withAgent(key: AgentKey.generate()) { endpoint, _ in
            let session = try AgentSession.connect(endpoint, timeout: 10)
            #expect(try session.ping() >= 0)
        }
        let after = signal(SIGIO, SIG_IGN)
        #expect(unsafeBitCast(after, to: Int.self) == unsafeBitCast(SIG_IGN, to: Int.self))
    }

    @Test func aFilePushedAndPulledBackIsTheSameAndKeepsItsMode() throws {
        try withAgent(key: AgentKey.generate()) { endpoint, dir in
            let session = try AgentSession.connect(endpoint, timeout: 10)
            let transfer = FileTransfer(session: session)
            let bytes = (0..<700_000).map { UInt8(truncatingIfNeeded: $0 &* 31 &+ $0 >> 9) }
            try Data(bytes).write(to: URL(fileURLWithPath: dir + "/source"))
            let pushed = try transfer.push(file: dir + "/source", to: dir + "/in-guest/copy", mode: 0o640, parents: true)
            #expect(pushed.bytes == UInt64(bytes.count))
            #expect(try transfer.stat(dir + "/in-guest/copy").kind == .regular)
            let pulled = try transfer.pull(dir + "/in-guest/copy", toPath: dir + "/back")
            #expect(pulled.sha256 == pushed.sha256)
            #expect(FileManager.default.contents(atPath: dir + "/back") == Data(bytes))
            let attributes = try FileManager.default.attributesOfItem(atPath: dir + "/in-guest/copy")
            #expect((attributes[.posixPermissions] as? Int) == 0o640)
        }
    }
}

extension AgentLoopTests {
    /// Every frame that arrives until each request in `ids` has its execExit, in arrival
    /// order (frames of other requests included: an acknowledgement may come meanwhile).
    private func collectExecs(_ session: AgentSession, _ ids: Set<UInt32>, within seconds: Double) throws -> [Frame] {
        var frames: [Frame] = []
        var open = ids
        let deadline = monotonicNanos() + UInt64(seconds * 1e9)
        while !open.isEmpty, let f = try session.receive(id: nil, deadline: deadline) {
            frames.append(f)
            guard ids.contains(f.id) else { continue }
            if f.type == .execExit || f.type == .error { open.remove(f.id) }
        }
        return frames
    }

    private func output(_ frames: [Frame], _ id: UInt32) -> String {
        String(decoding: frames.filter { $0.id == id && $0.type == .execOutput }.flatMap(\.payload), as: UTF8.self)
    }

    /// One session runs several commands side by side, each under its own id: a short one
    /// started after a long one ends first, and each keeps its own output.
    @Test func oneSessionRunsSeveralCommandsAtOnce() throws {
        try withAgent(key: AgentKey.generate()) { endpoint, _ in
            let session = try AgentSession.connect(endpoint, timeout: 10)
            #expect(session.hello.capabilities.contains(Capability.execConcurrent))
            session.send(ExecStart(argv: ["/bin/sh", "-c", "sleep 0.5; echo slow"], env: [], cwd: "/", tty: false, rows: 0, cols: 0), id: 100)
            session.send(ExecStart(argv: ["/bin/sh", "-c", "echo fast; exit 4"], env: [], cwd: "/", tty: false, rows: 0, cols: 0), id: 101)
            let frames = try collectExecs(session, [100, 101], within: 10)
            let exits = frames.filter { $0.type == .execExit }.map(\.id)
            #expect(exits == [101, 100])
            #expect(output(frames, 100) == "slow\n")
            #expect(output(frames, 101) == "fast\n")
            let fastExit = try #require(frames.first { $0.id == 101 && $0.type == .execExit })
            #expect(try ExecExit.decode(fastExit).code == 4)
        }
    }

    /// Stdin sent within the window waits for its process without holding up anything else,
    /// and every byte of it is acknowledged once the process took it; input sent past the
    /// window closes that process's stdin, and the dropped bytes are acknowledged too.
    @Test func unreadStdinStaysWithinItsWindow() throws {
        try withAgent(key: AgentKey.generate()) { endpoint, _ in
            let session = try AgentSession.connect(endpoint, timeout: 10)
            #expect(session.hello.capabilities.contains(Capability.execInputWindow))
            let chunk = [UInt8](repeating: 0x61, count: 64 << 10)
            let windowChunks = ExecLimits.inputWindow / chunk.count
            func acknowledged(_ frames: [Frame], _ id: UInt32) throws -> Int {
                try frames.filter { $0.id == id && $0.type == .execInputWindow }.reduce(0) { $0 + Int(try ExecInputWindow.decode($1).bytes) }
            }
            let sleepThenCount = ExecStart(argv: ["/bin/sh", "-c", "sleep 1; wc -c"])

            // A whole window that the process reads only after a second.
            session.send(sleepThenCount.frame(id: 300, flags: execStartInputWindow))
            for _ in 0..<windowChunks { session.send(Frame(.execInput, id: 300, payload: chunk)) }
            session.send(ExecStart(argv: ["/bin/sh", "-c", "echo other"]), id: 301)
            let other = try collectExecs(session, [301], within: 10)
            #expect(output(other, 301) == "other\n")
            session.send(Frame(.execInput, id: 300, flags: execInputEOF))
            let windowed = try collectExecs(session, [300], within: 10)
            #expect(output(windowed, 300).trimmingCharacters(in: .whitespacesAndNewlines) == "\(ExecLimits.inputWindow)")
            #expect(try acknowledged(other + windowed, 300) == ExecLimits.inputWindow)

            // Past the window (the pipe takes a chunk, which may be acknowledged before the rest
            // arrives: two chunks past it are past it either way).
            session.send(sleepThenCount.frame(id: 302, flags: execStartInputWindow))
            for _ in 0..<(windowChunks + 2) { session.send(Frame(.execInput, id: 302, payload: chunk)) }
            session.send(Frame(.execInput, id: 302, flags: execInputEOF))
            let overrun = try collectExecs(session, [302], within: 10)
            let counted = Int(output(overrun, 302).trimmingCharacters(in: .whitespacesAndNewlines)) ?? -1
            #expect(counted >= 0 && counted < ExecLimits.inputWindow)
            #expect(try acknowledged(overrun, 302) == ExecLimits.inputWindow + 2 * chunk.count)
        }
    }

    /// A command started with no input reads /dev/null as its stdin and ends without any
    /// input frame; input sent to it anyway is dropped, and a command in the same session that
    /// takes input still gets its own.
    @Test func aCommandGivenNoInputReadsDevNull() throws {
        try withAgent(key: AgentKey.generate()) { endpoint, _ in
            let session = try AgentSession.connect(endpoint, timeout: 10)
            #expect(session.hello.capabilities.contains(Capability.execNoInput))
            session.send(ExecStart(argv: ["/bin/sh", "-c", "readlink /proc/self/fd/0; cat; echo done"]).frame(id: 400, flags: execStartNoInput))
            session.send(ExecStart(argv: ["/bin/sh", "-c", "cat; echo done"]).frame(id: 401, flags: execStartInputWindow))
            session.send(Frame(.execInput, id: 400, payload: Array("dropped\n".utf8)))
            session.send(Frame(.execInput, id: 401, payload: Array("kept\n".utf8)))
            session.send(Frame(.execInput, id: 401, flags: execInputEOF))
            let frames = try collectExecs(session, [400, 401], within: 10)
            #expect(output(frames, 400) == "/dev/null\ndone\n")
            #expect(output(frames, 401) == "kept\ndone\n")
            for id: UInt32 in [400, 401] {
                let exit = try #require(frames.first { $0.id == id && $0.type == .execExit })
                #expect(try ExecExit.decode(exit).code == 0)
            }
        }
    }

    /// Well over a hundred commands run at once in one session (a session holder's session
    /// carries every command on the domain), each with its own exit status.
    @Test func manyCommandsRunAtOnceInOneSession() throws {
        try withAgent(key: AgentKey.generate()) { endpoint, _ in
            let session = try AgentSession.connect(endpoint, timeout: 10)
            let ids = Set((1...150).map { UInt32(1000 + $0) })
            for id in ids {
                session.send(ExecStart(argv: ["/bin/sh", "-c", "sleep 1; exit \(id % 7)"]), id: id)
            }
            let frames = try collectExecs(session, ids, within: 60)
            #expect(!frames.contains { $0.type == .error }, "\(frames.filter { $0.type == .error }.compactMap { try? ErrorMessage.decode($0).message }.prefix(3))")
            let exits = try frames.filter { $0.type == .execExit }.map { ($0.id, try ExecExit.decode($0).code) }
            #expect(exits.count == ids.count)
            #expect(exits.allSatisfy { $0.1 == Int32($0.0 % 7) })
        }
    }

    /// execFlow pauses one command's output and nothing else; on resume, all of it arrives
    /// before its exit, even when the command ended meanwhile.
    @Test func aPausedCommandKeepsItsOutputUntilResumed() throws {
        try withAgent(key: AgentKey.generate()) { endpoint, _ in
            let session = try AgentSession.connect(endpoint, timeout: 10)
            session.send(ExecStart(argv: ["/bin/sh", "-c", "sleep 0.3; echo one; echo two"], env: [], cwd: "/", tty: false, rows: 0, cols: 0), id: 200)
            session.send(Frame(.execFlow, id: 200, flags: execFlowPause))
            session.send(ExecStart(argv: ["/bin/sh", "-c", "echo other"], env: [], cwd: "/", tty: false, rows: 0, cols: 0), id: 201)
            let other = try collectExecs(session, [201], within: 10)
            #expect(output(other, 201) == "other\n")
            // Long after the paused command ended, nothing of it has come.
            usleep(800_000)
            var early = other.filter { $0.id == 200 }
            while let f = try session.receive(id: 200, deadline: monotonicNanos() + 100_000_000) { early.append(f) }
            #expect(!early.contains { $0.type == .execOutput || $0.type == .execExit }, "\(early.map(\.type))")
            session.send(Frame(.execFlow, id: 200))
            let rest = try collectExecs(session, [200], within: 10)
            #expect(output(rest, 200) == "one\ntwo\n")
            #expect(rest.last?.type == .execExit)
        }
    }
}
