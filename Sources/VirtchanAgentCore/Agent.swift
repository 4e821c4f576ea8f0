import Glibc
import VirtchanProtocol

public struct AgentOptions: Sendable {
    public var controlPort = "org.virtchan.control"
    public var dataPort = "org.virtchan.data"
    public var sysfsRoot = PortDiscovery.defaultSysfsRoot
    public var devRoot = "/dev"
    public var logPath: String?
    public var verbose = false
    public var policy = ExecPolicy()
    /// The domain's key; with one, only a host that proves it is served.
    public var key: AgentKey?
    public init() {}
}

public let agentVersion = "0.1.0"

/// The guest agent: one thread, one poll loop over the control port, the data port while a
/// transfer runs, a child's pipes while an exec runs, and a signal self-pipe.
public final class Agent {
    let options: AgentOptions
    let log: AgentLog
    private var control: FramedConnection?
    private var controlDevice = ""
    /// The host end of the control port is closed; stop polling it until SIGIO or a re-check.
    private var controlHup = false
    private var lastHupCheck: UInt64 = 0
    private var sessionActive = false
    /// The hello's nonce and the challenge sent back, until the host proves the key.
    private var pendingAuth: (nonce: [UInt8], challenge: [UInt8])?
    /// The answer to the current session's hello: a host resends its hello until answered,
    /// and a copy that arrives late gets the same answer (the same challenge).
    private var lastHelloAck: HelloAck?
    private var exec: ExecProcess?
    private var transfer: Transfer?
    private var signalFD: Int32 = -1
    private var stopping = false

    static let capabilities = [Capability.ping, Capability.info, Capability.exec, Capability.execStdin,
                               Capability.execSignal, Capability.execTTY, Capability.execOutputClosed, Capability.execResize,
                               Capability.filePush,
                               Capability.filePull, Capability.tree, Capability.sha256]
    /// While this much control output is queued, the agent stops reading child output.
    private let outputHighWater = 1 << 20
    private let stdinHighWater = 4 << 20

    public init(options: AgentOptions) {
        self.options = options
        log = AgentLog(path: options.logPath, verbose: options.verbose)
    }

    public func run() -> Int32 {
        signalFD = SignalPipe.install([SIGCHLD, SIGIO, SIGTERM, SIGINT, SIGHUP])
        guard signalFD >= 0 else {
            log.info("cannot create the signal pipe: \(errnoText(errno))")
            return 1
        }
        if getenv("PATH") == nil { setenv("PATH", Spawner.defaultPath, 1) }
        log.info("version \(agentVersion), protocol \(ProtocolVersion.current), pid \(getpid())")
        openControlPort()
        while !stopping {
            iterate()
        }
        log.info("stopping")
        endSession(reason: "agent stopping")
        return 0
    }

    // MARK: ports

    private func openControlPort() {
        var announced = false
        while !stopping {
            let ports = PortDiscovery.ports(sysfsRoot: options.sysfsRoot, devRoot: options.devRoot)
            if !announced {
                for p in ports { log.info("port \(p.name) at \(p.device)") }
            }
            if let port = ports.first(where: { $0.name == options.controlPort }) {
                let fd = open(port.device, O_RDWR | O_NONBLOCK | O_CLOEXEC)
                if fd >= 0 {
                    // SIGIO on every host connect and disconnect wakes the loop while it ignores POLLHUP.
                    _ = fcntl(fd, F_SETOWN, getpid())
                    _ = fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_ASYNC)
                    control = FramedConnection(fd: fd)
                    controlDevice = port.device
                    controlHup = false
                    log.info("control port \(port.name) open at \(port.device)")
                    return
                }
                if !announced { log.info("cannot open \(port.device): \(errnoText(errno)); retrying") }
            } else if !announced {
                log.info("no port named \(options.controlPort) yet; waiting for it")
            }
            announced = true
            for sig in SignalPipe.drain(signalFD) where sig == SIGTERM || sig == SIGINT { stopping = true }
            usleep(250_000)
        }
    }

    private func reopenControlPort(after error: String) {
        log.info("control port error (\(error)); reopening")
        endSession(reason: error)
        if let c = control { close(c.fd) }
        control = nil
        openControlPort()
    }

    private func openDataPort() throws(TransferFailure) -> Int32 {
        guard let port = PortDiscovery.find(options.dataPort, sysfsRoot: options.sysfsRoot) else {
            throw TransferFailure(.unsupported, "this guest has no port named \(options.dataPort)")
        }
        let device = options.devRoot + "/" + baseName(of: port.device)
        let fd = open(device, O_RDWR | O_NONBLOCK | O_CLOEXEC)
        guard fd >= 0 else { throw TransferFailure(errno: errno, "cannot open the data port \(device)") }
        _ = fcntl(fd, F_SETOWN, getpid())
        _ = fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_ASYNC)
        return fd
    }

    // MARK: the loop

    private func iterate() {
        guard let control else { openControlPort(); return }
        var fds: [pollfd] = []
        fds.append(pollfd(fd: signalFD, events: Int16(POLLIN), revents: 0))
        let controlEvents = Int16(POLLIN) | (control.pendingOutput > 0 ? Int16(POLLOUT) : 0)
        let wantControlInput = !controlHup && (exec.map { $0.stdinBuffer.count < stdinHighWater } ?? true)
        fds.append(pollfd(fd: controlHup ? -1 : control.fd,
                          events: wantControlInput ? controlEvents : controlEvents & ~Int16(POLLIN), revents: 0))
        var execSlots: (stdin: Int, stdout: Int, stderr: Int) = (-1, -1, -1)
        if let exec {
            if exec.stdoutFD >= 0 && control.pendingOutput < outputHighWater {
                execSlots.stdout = fds.count
                fds.append(pollfd(fd: exec.stdoutFD, events: Int16(POLLIN), revents: 0))
            }
            if exec.stderrFD >= 0 && control.pendingOutput < outputHighWater {
                execSlots.stderr = fds.count
                fds.append(pollfd(fd: exec.stderrFD, events: Int16(POLLIN), revents: 0))
            }
            if exec.stdinFD >= 0 && !exec.tty && (!exec.stdinBuffer.isEmpty || exec.stdinEOF) {
                execSlots.stdin = fds.count
                fds.append(pollfd(fd: exec.stdinFD, events: Int16(POLLOUT), revents: 0))
            }
        }
        var dataSlot = -1
        if let t = transfer, !t.dataHup {
            dataSlot = fds.count
            var ev = Int16(0)
            if t.kind == .push { ev |= Int16(POLLIN) }
            if t.data.pendingOutput > 0 { ev |= Int16(POLLOUT) }
            fds.append(pollfd(fd: t.data.fd, events: ev, revents: 0))
        }

        var timeout: Int32 = -1
        if controlHup { timeout = 250 }
        if let exec, exec.exit != nil { timeout = 50 }
        if let t = transfer, t.dataHup || t.phase == .awaitingAck { timeout = 100 }
        if let t = transfer, t.kind == .pull, t.phase == .streaming, t.data.pendingOutput < FrameLimits.dataChunk, !t.dataHup {
            timeout = 0
        }
        let rc = poll(&fds, nfds_t(fds.count), timeout)
        if rc < 0 && errno != EINTR {
            log.info("poll: \(errnoText(errno))")
            usleep(100_000)
            return
        }

        if fds[0].revents != 0 { handleSignals() }
        let now = monotonicNanos()
        if controlHup && now - lastHupCheck >= 250_000_000 {
            controlHup = false
        }

        let cre = fds[1].revents
        if cre & Int16(POLLIN) != 0 {
            readControl(control)
        } else if cre & Int16(POLLHUP | POLLERR) != 0 {
            hostGone(control)
        }
        if self.control != nil, !controlHup, control.pendingOutput > 0, fds[1].revents & Int16(POLLOUT) != 0 || cre == 0 {
            flushControl(control)
        }

        if let exec = self.exec, exec.id != 0 {
            if execSlots.stdout >= 0 && fds[execSlots.stdout].revents != 0 { pumpOutput(exec, .stdout) }
            if execSlots.stderr >= 0 && fds[execSlots.stderr].revents != 0 { pumpOutput(exec, .stderr) }
            if execSlots.stdin >= 0 && fds[execSlots.stdin].revents != 0 { pumpStdin(exec) }
            finishExecIfDone(exec)
        }
        if let t = transfer {
            serviceTransfer(t, revents: dataSlot >= 0 ? fds[dataSlot].revents : 0)
        }
        if let c = self.control, c.pendingOutput > 0, !controlHup { flushControl(c) }
    }

    private func handleSignals() {
        for sig in SignalPipe.drain(signalFD) {
            switch sig {
            case SIGCHLD: reapChildren()
            case SIGIO:
                controlHup = false
                transfer?.dataHup = false
            case SIGTERM, SIGINT: stopping = true
            default: break
            }
        }
    }

    private func reapChildren() {
        while true {
            var status: Int32 = 0
            let pid = waitpid(-1, &status, WNOHANG)
            if pid <= 0 { break }
            guard let exec, exec.pid == pid else { continue }
            let termSig = status & 0x7f
            if termSig == 0 {
                exec.exit = ExecExit(code: (status >> 8) & 0xff, signal: 0)
            } else {
                exec.exit = ExecExit(code: -1, signal: termSig)
            }
            exec.exitedAt = monotonicNanos()
            log.debug("exec \(exec.id) pid \(pid) ended: code \(exec.exit?.code ?? 0) signal \(termSig)")
        }
    }

    private func flushControl(_ control: FramedConnection) {
        do {
            try control.flush()
        } catch {
            if error.errno == EAGAIN { return }
            hostGone(control)
        }
    }

    private func hostGone(_ control: FramedConnection) {
        if sessionActive || exec != nil || transfer != nil {
            log.info("host disconnected from the control port")
        }
        endSession(reason: "host disconnected")
        controlHup = true
        lastHupCheck = monotonicNanos()
    }

    /// Forgets the session: kills its process, abandons its transfer, drops queued bytes.
    private func endSession(reason: String) {
        if let exec {
            if exec.exit == nil {
                log.info("killing exec \(exec.id) (pid \(exec.pid)): \(reason)")
                kill(-exec.pid, SIGKILL)
                kill(exec.pid, SIGKILL)
            }
            exec.closeAll()
            self.exec = nil
        }
        if let t = transfer {
            log.info("abandoning transfer of \(t.path): \(reason)")
            t.close(completed: false)
            transfer = nil
        }
        sessionActive = false
        pendingAuth = nil
        lastHelloAck = nil
        control?.discardOutput()
        control?.decoder.reset()
    }

    private func readControl(_ control: FramedConnection) {
        let outcome: ReadOutcome
        do {
            outcome = try control.fill(limit: 1 << 20)
        } catch {
            reopenControlPort(after: error.description)
            return
        }
        if outcome == .eof {
            hostGone(control)
            return
        }
        let skippedBefore = control.decoder.skippedBytes
        while let frame = control.decoder.next() {
            handle(frame, on: control)
            if self.control !== control { return }
        }
        if control.decoder.skippedBytes > skippedBefore {
            log.info("skipped \(control.decoder.skippedBytes - skippedBefore) bytes of noise on the control port")
        }
    }

    // MARK: requests

    private func reply<M: WireMessage>(_ message: M, id: UInt32, flags: UInt16 = 0) {
        control?.send(message, id: id, flags: flags)
    }

    private func fail(_ id: UInt32, _ code: RemoteErrorCode, errno: Int32 = 0, _ message: String) {
        log.debug("request \(id) failed: \(message)")
        reply(ErrorMessage(code, errno: errno, message), id: id)
    }

    private func handle(_ frame: Frame, on control: FramedConnection) {
        if frame.type == .hello {
            handleHello(frame)
            return
        }
        guard sessionActive else {
            log.debug("ignoring \(frame.type) before hello")
            return
        }
        if let auth = pendingAuth {
            // Nothing is served to a peer that has not proven the domain's key.
            guard frame.type == .authProof, let key = options.key, let proof = try? AuthProof.decode(frame),
                  key.verify(proof.mac, hostNonce: auth.nonce, challenge: auth.challenge) else {
                log.info("refused \(frame.type) from a peer that did not prove the domain's key")
                // Nothing runs before the proof, so there is nothing to tear down: the peer
                // must start again with a hello (and gets a new challenge).
                sessionActive = false
                pendingAuth = nil
                lastHelloAck = nil
                fail(frame.id, .unauthenticated, "this agent serves only the host that holds the domain's key")
                return
            }
            pendingAuth = nil
            control.send(Frame(.ok, id: frame.id))
            return
        }
        do {
            switch frame.type {
            case .ping:
                control.send(Frame(.pong, id: frame.id, payload: frame.payload))
            case .infoRequest:
                reply(makeInfo(), id: frame.id)
            case .execStart:
                startExec(try ExecStart.decode(frame), id: frame.id)
            case .execInput:
                guard let exec, exec.id == frame.id else { return }
                if exec.stdinFD >= 0 { exec.stdinBuffer.append(contentsOf: frame.payload) }
                if frame.flags & execInputEOF != 0 { exec.stdinEOF = true }
                if exec.tty && exec.stdinFD >= 0 { pumpStdin(exec) }
            case .execSignal:
                let msg = try ExecSignal.decode(frame)
                guard let exec, exec.id == frame.id else { return }
                guard msg.signal > 0 && msg.signal < 65 else { return fail(frame.id, .badRequest, "no such signal \(msg.signal)") }
                log.debug("signal \(msg.signal) to exec \(exec.id)")
                exec.signal(msg.signal)
            case .execOutputClosed:
                // Nobody reads this stream on the host any more: close our end of the pipe, so the
                // process's next write fails (SIGPIPE) as it would in a local pipeline.
                guard let exec, exec.id == frame.id, let stream = ExecStream(rawValue: frame.flags) else { return }
                log.debug("host closed \(stream) of exec \(exec.id)")
                exec.closeOutput(stream)
            case .execResize:
                // The kernel tells the terminal's foreground process group (SIGWINCH).
                let size = try ExecResize.decode(frame)
                guard let exec, exec.id == frame.id, exec.tty, exec.stdoutFD >= 0 else { return }
                var ws = winsize(ws_row: size.rows, ws_col: size.cols, ws_xpixel: 0, ws_ypixel: 0)
                _ = ioctl(exec.stdoutFD, UInt(TIOCSWINSZ), &ws)
            case .pushRequest:
                startPush(try PushRequest.decode(frame), id: frame.id)
            case .pullRequest:
                startPull(try PullRequest.decode(frame), id: frame.id)
            case .ok:
                if let t = transfer, t.id == frame.id, t.phase == .awaitingAck { completePull(t) }
            case .abort:
                if let t = transfer, t.id == frame.id {
                    log.info("host aborted the transfer of \(t.path)")
                    t.close(completed: false)
                    transfer = nil
                    fail(frame.id, .aborted, "transfer aborted by the host")
                }
            case .statRequest:
                reply(FileOps.statReply(try StatRequest.decode(frame).path), id: frame.id)
            case .mkdir:
                let m = try MkdirRequest.decode(frame)
                let rc: Int32
                if m.parents {
                    rc = makeDirectories(m.path, mode: mode_t(m.mode & 0o7777))
                } else {
                    rc = mkdir(m.path, mode_t(m.mode & 0o7777)) == 0 ? 0 : errno
                }
                if rc == 0 || (rc == EEXIST && FileOps.statReply(m.path).kind == .directory) {
                    _ = chmod(m.path, mode_t(m.mode & 0o7777))
                    control.send(Frame(.ok, id: frame.id))
                } else {
                    fail(frame.id, remoteCode(forErrno: rc), errno: rc, "mkdir \(m.path): \(errnoText(rc))")
                }
            case .symlink:
                let s = try SymlinkRequest.decode(frame)
                _ = unlink(s.path)
                if symlink(s.target, s.path) == 0 {
                    control.send(Frame(.ok, id: frame.id))
                } else {
                    let e = errno
                    fail(frame.id, remoteCode(forErrno: e), errno: e, "symlink \(s.path): \(errnoText(e))")
                }
            case .listTree:
                let req = try ListTree.decode(frame)
                do {
                    let entries = try FileOps.listTree(req.path)
                    var start = 0
                    repeat {
                        let end = min(start + 512, entries.count)
                        reply(TreeEntries(entries: Array(entries[start..<end])), id: frame.id,
                              flags: end == entries.count ? treeEntriesLast : 0)
                        start = end
                    } while start < entries.count
                } catch {
                    fail(frame.id, error.code, errno: error.errno, error.message)
                }
            default:
                fail(frame.id, .badRequest, "unexpected \(frame.type) frame")
            }
        } catch {
            fail(frame.id, .badRequest, error.message)
        }
    }

    private func handleHello(_ frame: Frame) {
        guard let hello = try? Hello.decode(frame) else {
            log.info("malformed hello ignored")
            return
        }
        if sessionActive, exec == nil, transfer == nil, let ack = lastHelloAck, ack.nonce == hello.nonce {
            reply(ack, id: frame.id)
            return
        }
        if sessionActive || exec != nil || transfer != nil {
            endSession(reason: "new session from \(hello.client)")
        }
        guard hello.minVersion <= ProtocolVersion.current, hello.maxVersion >= ProtocolVersion.minimum else {
            fail(frame.id, .unsupported,
                 "host speaks protocol \(hello.minVersion)-\(hello.maxVersion), agent speaks \(ProtocolVersion.minimum)-\(ProtocolVersion.current)")
            return
        }
        sessionActive = true
        let version = min(hello.maxVersion, ProtocolVersion.current)
        var challenge: [UInt8] = []
        var capabilities = Self.capabilities
        if options.key != nil {
            var rng = SystemRandomNumberGenerator()
            challenge = (0..<16).map { _ in UInt8.random(in: 0...255, using: &rng) }
            pendingAuth = (hello.nonce, challenge)
            capabilities.append(Capability.auth)
        }
        let ack = HelloAck(nonce: hello.nonce, version: version, agentVersion: agentVersion,
                           capabilities: capabilities, challenge: challenge)
        lastHelloAck = ack
        reply(ack, id: frame.id)
        log.debug("session from \(hello.client), protocol \(version)")
    }

    private func makeInfo() -> Info {
        var uts = utsname()
        uname(&uts)
        func field<T>(_ value: T) -> String {
            withUnsafeBytes(of: value) { String(decoding: $0.prefix(while: { $0 != 0 }), as: UTF8.self) }
        }
        let uptime = readSmallFile("/proc/uptime").flatMap { text in
            text.split(separator: " ").first.flatMap { Double($0) }
        } ?? 0
        return Info(agentVersion: agentVersion, protocolVersion: ProtocolVersion.current,
                    capabilities: Self.capabilities, kernelRelease: field(uts.release),
                    hostname: field(uts.nodename), uptimeSeconds: UInt64(uptime),
                    execAllowed: !options.policy.deniesEverything)
    }

    // MARK: exec

    private func startExec(_ request: ExecStart, id: UInt32) {
        guard exec == nil else { return fail(id, .busy, "another command is still running in this session") }
        guard let command = request.argv.first else { return fail(id, .badRequest, "no command given") }
        guard options.policy.permits(command) else {
            log.info("exec of \(command) denied by policy")
            return fail(id, .denied, "running \(command) is denied by the agent's policy")
        }
        do {
            let process = try Spawner.spawn(request, id: id)
            exec = process
            log.debug("exec \(id): \(request.argv.joined(separator: " ")) as pid \(process.pid)")
            reply(ExecStarted(pid: process.pid), id: id)
        } catch {
            fail(id, error.code, errno: error.errno, error.message)
        }
    }

    private func pumpOutput(_ exec: ExecProcess, _ stream: ExecStream) {
        guard let control else { return }
        let fd = stream == .stdout ? exec.stdoutFD : exec.stderrFD
        var rounds = 0
        while rounds < 16 && control.pendingOutput < outputHighWater {
            rounds += 1
            var readErrno: Int32 = 0
            let (n, _) = control.sendInPlace(.execOutput, id: exec.id, flags: stream.rawValue, maxPayload: FrameLimits.execChunk) { room in
                while true {
                    let got = read(fd, room.baseAddress!, room.count)
                    if got < 0 && errno == EINTR { continue }
                    if got < 0 { readErrno = errno }
                    return got
                }
            }
            if n > 0 { continue }
            if n < 0 && (readErrno == EAGAIN || readErrno == EWOULDBLOCK) { return }
            // EOF, or EIO from a pty whose other side is gone.
            exec.closeOutput(stream)
            return
        }
    }

    private func pumpStdin(_ exec: ExecProcess) {
        while exec.stdinFD >= 0 && !exec.stdinBuffer.isEmpty {
            let n = exec.stdinBuffer.withUnsafeBytes { write(exec.stdinFD, $0.baseAddress!, $0.count) }
            if n > 0 {
                exec.stdinBuffer.removeFirst(n)
                continue
            }
            if n < 0 && errno == EINTR { continue }
            if n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK) { return }
            // The process closed its stdin; what it did not read is dropped, as with a pipe.
            exec.closeStdin()
            return
        }
        if exec.stdinEOF && exec.stdinBuffer.isEmpty && exec.stdinFD >= 0 {
            if exec.tty {
                var eot: UInt8 = 4 // ^D ends input on a terminal
                _ = write(exec.stdinFD, &eot, 1)
                exec.stdinEOF = false
            } else {
                exec.closeStdin()
            }
        }
    }

    private func finishExecIfDone(_ exec: ExecProcess) {
        guard let status = exec.exit else { return }
        // Output still open after the process ended belongs to something it left behind;
        // give it a moment, then stop waiting.
        if exec.outputOpen {
            if monotonicNanos() - exec.exitedAt < 200_000_000 { return }
            if exec.stdoutFD >= 0 { pumpOutput(exec, .stdout) }
            if exec.stderrFD >= 0 { pumpOutput(exec, .stderr) }
        }
        exec.closeAll()
        reply(status, id: exec.id)
        self.exec = nil
    }

    // MARK: transfers

    private func startPush(_ request: PushRequest, id: UInt32) {
        guard transfer == nil else { return fail(id, .busy, "another transfer is running in this session") }
        do throws(TransferFailure) {
            let (fileFD, temp) = try FileOps.preparePush(request)
            let dataFD: Int32
            do {
                dataFD = try openDataPort()
            } catch {
                close(fileFD)
                unlink(temp)
                throw error
            }
            let t = Transfer(id: id, kind: .push, dataFD: dataFD, path: request.path, fileFD: fileFD,
                             tempPath: temp, mode: request.mode & 0o7777, expectedSize: request.size,
                             wantSHA256: request.wantSHA256)
            transfer = t
            log.debug("push \(id) to \(request.path): \(request.size) bytes")
            reply(DataReady(size: request.size, mode: request.mode), id: id)
        } catch {
            fail(id, error.code, errno: error.errno, error.message)
        }
    }

    private func startPull(_ request: PullRequest, id: UInt32) {
        guard transfer == nil else { return fail(id, .busy, "another transfer is running in this session") }
        var fd = open(request.path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else {
            let e = errno
            return fail(id, remoteCode(forErrno: e), errno: e, "\(request.path): \(errnoText(e))")
        }
        var st = stat()
        fstat(fd, &st)
        guard (st.st_mode & S_IFMT) == S_IFREG else {
            close(fd)
            if (st.st_mode & S_IFMT) == S_IFDIR {
                return fail(id, .isDirectory, "\(request.path) is a directory (use -r to copy a directory tree)")
            }
            return fail(id, .badRequest, "\(request.path) is not a regular file")
        }
        if st.st_size == 0 {
            // procfs and sysfs report size 0 for files that have content: send a snapshot.
            do throws(TransferFailure) {
                if let snapshot = try FileOps.snapshot(fd, path: request.path) {
                    close(fd)
                    fd = snapshot
                    fstat(fd, &st)
                }
            } catch {
                close(fd)
                return fail(id, error.code, errno: error.errno, error.message)
            }
        }
        do throws(TransferFailure) {
            let dataFD = try openDataPort()
            let t = Transfer(id: id, kind: .pull, dataFD: dataFD, path: request.path, fileFD: fd, tempPath: "",
                             mode: UInt32(st.st_mode & 0o7777), expectedSize: UInt64(st.st_size),
                             wantSHA256: request.wantSHA256)
            transfer = t
            log.debug("pull \(id) of \(request.path): \(st.st_size) bytes")
            reply(DataReady(size: UInt64(st.st_size), mode: UInt32(st.st_mode & 0o7777)), id: id)
        } catch {
            close(fd)
            fail(id, error.code, errno: error.errno, error.message)
        }
    }

    private func abortTransfer(_ t: Transfer, _ failure: TransferFailure) {
        log.info("transfer of \(t.path) failed: \(failure.message)")
        t.close(completed: false)
        transfer = nil
        fail(t.id, failure.code, errno: failure.errno, failure.message)
    }

    private func serviceTransfer(_ t: Transfer, revents: Int16) {
        let now = monotonicNanos()
        if t.dataHup {
            // Waiting for the host to (re)appear on the data socket; SIGIO or a re-check ends the wait.
            if now - t.lastHupCheck > 100_000_000 { t.dataHup = false }
            if now - t.startedAt > 15_000_000_000 && !t.dataConnected {
                abortTransfer(t, TransferFailure(.aborted, "the host never connected to the data channel"))
            }
            return
        }
        if t.phase == .awaitingAck {
            if revents & Int16(POLLOUT) != 0 { _ = try? t.data.flush() }
            return
        }
        switch t.kind {
        case .push: servicePush(t, revents: revents)
        case .pull: servicePull(t, revents: revents)
        }
    }

    private func noteDataHup(_ t: Transfer) {
        if t.dataConnected {
            abortTransfer(t, TransferFailure(.aborted, "the host closed the data channel mid-transfer"))
        } else {
            t.dataHup = true
            t.lastHupCheck = monotonicNanos()
        }
    }

    private func servicePush(_ t: Transfer, revents: Int16) {
        guard revents & Int16(POLLIN) != 0 else {
            if revents & Int16(POLLHUP | POLLERR) != 0 { noteDataHup(t) }
            return
        }
        let outcome: ReadOutcome
        do {
            outcome = try t.data.fill(limit: 512 * 1024)
        } catch {
            return abortTransfer(t, TransferFailure(errno: error.errno, "reading the data port"))
        }
        if outcome == .eof { return noteDataHup(t) }
        if case .data = outcome { t.dataConnected = true }
        var failure: TransferFailure?
        var finished = false
        while failure == nil && !finished && t.data.decoder.nextInPlace({ frame in
            guard frame.id == t.id else { return } // stale bytes of an earlier transfer
            switch frame.type {
            case .data:
                guard t.bytes + UInt64(frame.payload.count) <= t.expectedSize else {
                    failure = TransferFailure(.tooLarge, "the host sent more than the \(t.expectedSize) bytes it announced")
                    return
                }
                t.digest.add(payloadHash: frame.payloadHash, length: frame.payload.count)
                t.sha?.update(frame.payload)
                if frame.payload.count > 0 {
                    let rc = writeAll(t.fileFD, frame.payload.baseAddress!, frame.payload.count)
                    if rc != 0 { failure = TransferFailure(errno: rc, "writing \(t.path)"); return }
                }
                t.bytes += UInt64(frame.payload.count)
            case .dataEnd:
                guard let end = try? DataEnd.decode(frame) else {
                    failure = TransferFailure(.badRequest, "malformed end of data")
                    return
                }
                guard end.size == t.bytes, end.size == t.expectedSize else {
                    failure = TransferFailure(.checksum, "size mismatch: got \(t.bytes) bytes, expected \(t.expectedSize)")
                    return
                }
                guard end.digest == t.digest.digest() else {
                    failure = TransferFailure(.checksum, "checksum mismatch on \(t.path): the data was damaged in transit")
                    return
                }
                finished = true
            default:
                return
            }
        }) {}
        if let failure { return abortTransfer(t, failure) }
        guard finished else { return }
        if fchmod(t.fileFD, mode_t(t.mode)) != 0 || fsync(t.fileFD) != 0 {
            let e = errno
            return abortTransfer(t, TransferFailure(errno: e, "finishing \(t.path)"))
        }
        if rename(t.tempPath, t.path) != 0 {
            let e = errno
            return abortTransfer(t, TransferFailure(errno: e, "renaming into \(t.path)"))
        }
        log.debug("push \(t.id) complete: \(t.bytes) bytes")
        t.close(completed: true)
        transfer = nil
        reply(TransferDone(size: t.bytes, digest: t.digest.digest(), sha256: t.sha?.hexDigest() ?? ""), id: t.id)
    }

    private func servicePull(_ t: Transfer, revents: Int16) {
        if revents & Int16(POLLHUP | POLLERR) != 0 && revents & Int16(POLLOUT) == 0 && t.data.pendingOutput > 0 {
            return noteDataHup(t)
        }
        var rounds = 0
        while t.data.pendingOutput < FrameLimits.dataChunk && t.phase == .streaming && rounds < 8 {
            rounds += 1
            // The file is read straight into the output buffer, behind the frame header.
            var readErrno: Int32 = 0
            let (n, hash) = t.data.sendInPlace(.data, id: t.id, maxPayload: FrameLimits.dataChunk) { room in
                let want = Int(min(UInt64(room.count), t.expectedSize - min(t.bytes, t.expectedSize) + 1))
                while true {
                    let got = read(t.fileFD, room.baseAddress!, want)
                    if got < 0 && errno == EINTR { continue }
                    if got < 0 { readErrno = errno }
                    if got > 0 { t.sha?.update(UnsafeRawBufferPointer(rebasing: room[0..<got])) }
                    return got
                }
            }
            if n < 0 { return abortTransfer(t, TransferFailure(errno: readErrno, "reading \(t.path)")) }
            if n == 0 {
                guard t.bytes == t.expectedSize else {
                    return abortTransfer(t, TransferFailure(.aborted, "\(t.path) shrank while it was being read"))
                }
                t.data.send(DataEnd(size: t.bytes, digest: t.digest.digest()), id: t.id)
                t.phase = .awaitingAck
                break
            }
            // One byte more than announced is read on purpose, to notice a file that grew.
            guard t.bytes + UInt64(n) <= t.expectedSize else {
                return abortTransfer(t, TransferFailure(.aborted, "\(t.path) grew while it was being read"))
            }
            t.digest.add(payloadHash: hash, length: n)
            t.bytes += UInt64(n)
        }
        do {
            let before = t.data.pendingOutput
            try t.data.flush()
            if t.data.pendingOutput < before { t.dataConnected = true }
        } catch {
            if error.errno == EAGAIN { return }
            if t.dataConnected {
                return abortTransfer(t, TransferFailure(errno: error.errno, "writing the data port"))
            }
            t.dataHup = true
            t.lastHupCheck = monotonicNanos()
        }
    }

    private func completePull(_ t: Transfer) {
        // The host has checked everything it received; only now is the port closed, so no
        // byte still in flight can be dropped by the close.
        let done = TransferDone(size: t.bytes, digest: t.digest.digest(), sha256: t.sha?.hexDigest() ?? "")
        t.close(completed: true)
        transfer = nil
        reply(done, id: t.id)
    }
}
