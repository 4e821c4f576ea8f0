import Glibc
import VirtchanProtocol

public struct AgentOptions: Sendable {
    public var controlPort = "org.virtchan.control"
    public var dataPort = "org.virtchan.data"
    /// How the ports are reached: the guest's virtio-serial ports, or anything else that
    /// gives a descriptor per name (a test's socketpairs).
    public var ports: any PortOpener = VirtioPortOpener()
    public var logPath: String?
    public var verbose = false
    public var policy = ExecPolicy()
    /// The domain's key; with one, only a host that proves it is served.
    public var key: AgentKey?
    public init() {}
}

public let agentVersion = "0.1.0"

/// The guest agent: one thread, one poll loop over the control port, the data port while a
/// transfer runs, the pipes of every running exec, and a signal self-pipe.
///
/// Where each request is handled: `RequestDispatch.swift` (every frame type, hello and
/// authentication, info), `ExecPumps.swift` (exec), `PushReceiver.swift` and
/// `PullSender.swift` (the two transfer state machines), `FileOperations.swift` (stat,
/// mkdir, symlink, tree listings). `run()` belongs to one thread; only `stop()` may be
/// called from another.
public final class Agent: @unchecked Sendable {
    let options: AgentOptions
    let log: AgentLog
    var control: FramedConnection?
    /// Whether the host end of the control port is closed.
    var controlHost = HostWatch(fd: -1)
    var sessionActive = false
    /// The hello's nonce and the challenge sent back, until the host proves the key.
    var pendingAuth: (nonce: [UInt8], challenge: [UInt8])?
    /// The answer to the current session's hello: a host resends its hello until answered,
    /// and a copy that arrives late gets the same answer (the same challenge).
    var lastHelloAck: HelloAck?
    /// The session's running processes by request id; each streams on its own.
    var execs: [UInt32: ExecProcess] = [:]
    /// Processes left to reap: those whose exit is recorded (reaped once it has gone to the
    /// host: under TCG a reap costs the guest about 0.15 ms) and those of an ended session,
    /// killed.
    var unreapedPIDs: [pid_t] = []
    var transfer: Transfer?
    /// Forwarded connections and guest listeners of the session, by id (TcpForwarding.swift).
    var tcpLinks: [UInt32: TcpLink] = [:]
    var tcpListeners: [UInt32: Int32] = [:]
    var nextTcpID: UInt32 = 0
    var signalFD: Int32 = -1
    var stopping = false
    /// /dev/null and output pipes made ahead for the next command (ExecProcess.swift).
    let stdio = StdioReserve()

    static let capabilities = [Capability.ping, Capability.info, Capability.exec, Capability.execStdin,
                               Capability.execSignal, Capability.execTTY, Capability.execOutputClosed, Capability.execResize,
                               Capability.execConcurrent, Capability.execFlow, Capability.execInputWindow, Capability.execNoInput,
                               Capability.filePush, Capability.filePull, Capability.tree, Capability.sha256, Capability.tcpForward]
    /// While this much control output is queued, the agent stops reading child output.
    let outputHighWater = 1 << 20
    /// While this much stdin of processes whose host sends it without a window waits, the
    /// agent stops reading the control port.
    let stdinHighWater = 4 << 20
    /// At most this many processes run for one session at a time: every command of every
    /// host process that shares the domain's session holder counts.
    let maxExecs = 1024

    public init(options: AgentOptions) {
        self.options = options
        log = AgentLog(path: options.logPath, verbose: options.verbose)
    }

    static let handledSignals = [SIGCHLD, SIGIO, SIGTERM, SIGINT, SIGHUP]

    /// Serves until SIGTERM, SIGINT or ``stop()``; returns the process's exit status.
    public func run() -> Int32 {
        signalFD = SignalPipe.install(Self.handledSignals)
        guard signalFD >= 0 else {
            log.info("cannot create the signal pipe: \(errnoText(errno))")
            return 1
        }
        defer {
            // Ports first: one still asking for SIGIO could raise it once its handler is gone.
            if let control { closePort(control.fd) }
            control = nil
            SignalPipe.uninstall(Self.handledSignals)
            close(signalFD)
        }
        if getenv("PATH") == nil { setenv("PATH", Spawner.defaultPath, 1) }
        log.info("version \(agentVersion), protocol \(ProtocolVersion.current), pid \(getpid())")
        openControlPort()
        while !stopping {
            iterate()
        }
        log.info("stopping")
        endSession(reason: "agent stopping")
        // A host still connected learns at once that nothing more will be answered, and waits
        // for the next agent instead of sending requests that nobody reads.
        if let control, !controlHost.away {
            control.send(Frame(.agentStopping, id: 0))
            flushControl(control)
        }
        return 0
    }

    /// Makes ``run()`` return, as SIGTERM does; callable from any thread.
    public func stop() { SignalPipe.post(SIGTERM) }

    func iterate() {
        guard let control else { openControlPort(); return }
        var fds: [pollfd] = []
        fds.append(pollfd(fd: signalFD, events: Int16(POLLIN), revents: 0))
        let controlEvents = Int16(POLLIN) | (control.pendingOutput > 0 ? Int16(POLLOUT) : 0)
        let stdinQueued = execs.values.reduce(0) { $0 + ($1.inputWindowed ? 0 : $1.stdinBuffer.count) }
        let controlAway = controlHost.away
        let wantControlInput = !controlAway && stdinQueued < stdinHighWater
        fds.append(pollfd(fd: controlAway ? -1 : control.fd,
                          events: wantControlInput ? controlEvents : controlEvents & ~Int16(POLLIN), revents: 0))
        // Per exec: the poll slots of its stdin, stdout and stderr (-1: not polled).
        var execSlots: [(exec: ExecProcess, stdin: Int, stdout: Int, stderr: Int)] = []
        let outputRoom = control.pendingOutput < outputHighWater
        for exec in execs.values {
            var slots = (exec: exec, stdin: -1, stdout: -1, stderr: -1)
            if exec.stdoutFD >= 0 && outputRoom && !exec.outputPaused {
                slots.stdout = fds.count
                fds.append(pollfd(fd: exec.stdoutFD, events: Int16(POLLIN), revents: 0))
            }
            if exec.stderrFD >= 0 && outputRoom && !exec.outputPaused {
                slots.stderr = fds.count
                fds.append(pollfd(fd: exec.stderrFD, events: Int16(POLLIN), revents: 0))
            }
            if exec.stdinFD >= 0 && (!exec.stdinBuffer.isEmpty || exec.stdinEOF) {
                slots.stdin = fds.count
                fds.append(pollfd(fd: exec.stdinFD, events: Int16(POLLOUT), revents: 0))
            }
            execSlots.append(slots)
        }
        var tcpSlots: [(link: TcpLink, slot: Int)] = []
        for link in tcpLinks.values {
            let events = link.events(outputRoom: outputRoom)
            if events != 0 {
                tcpSlots.append((link, fds.count))
                fds.append(pollfd(fd: link.fd, events: events, revents: 0))
            }
        }
        var listenSlots: [(id: UInt32, fd: Int32, slot: Int)] = []
        // A listener is not polled while nothing could be accepted anyway.
        if outputRoom && tcpLinks.count < TcpLimits.maxConnections {
            for (id, fd) in tcpListeners {
                listenSlots.append((id, fd, fds.count))
                fds.append(pollfd(fd: fd, events: Int16(POLLIN), revents: 0))
            }
        }
        var dataSlot = -1
        if let t = transfer, !t.dataHost.away {
            dataSlot = fds.count
            var ev = Int16(0)
            if t.kind == .push { ev |= Int16(POLLIN) }
            if t.data.pendingOutput > 0 { ev |= Int16(POLLOUT) }
            fds.append(pollfd(fd: t.data.fd, events: ev, revents: 0))
        }

        var timeout: Int32 = -1
        if controlAway { timeout = 250 }
        if execs.values.contains(where: { $0.exit != nil }) { timeout = 50 }
        if let t = transfer, t.dataHost.away || t.phase == .awaitingAck { timeout = 100 }
        if let t = transfer, t.kind == .pull, t.phase == .streaming, t.data.pendingOutput == 0, !t.dataHost.away {
            timeout = 0
        }
        let rc = poll(&fds, nfds_t(fds.count), timeout)
        if rc < 0 && errno != EINTR {
            log.info("poll: \(errnoText(errno))")
            usleep(100_000)
            return
        }

        // A signal that interrupted the poll has its byte in the pipe already (the handler
        // wrote it before poll returned): serve it in this turn of the loop, not the next.
        if rc < 0 || fds[0].revents != 0 { handleSignals() }
        let now = monotonicNanos()
        if controlHost.awayLonger(than: 250_000_000, now: now) { controlHost.recheck() }

        let cre = fds[1].revents
        if cre & Int16(POLLIN) != 0 {
            readControl(control)
        } else if cre & Int16(POLLHUP | POLLERR) != 0 {
            hostGone(control)
        }
        if self.control != nil, !controlHost.away, control.pendingOutput > 0, fds[1].revents & Int16(POLLOUT) != 0 || cre == 0 {
            flushControl(control)
        }

        for slots in execSlots where execs[slots.exec.id] === slots.exec {
            let exec = slots.exec
            if slots.stdout >= 0 && fds[slots.stdout].revents != 0 { pumpOutput(exec, .stdout) }
            if slots.stderr >= 0 && fds[slots.stderr].revents != 0 { pumpOutput(exec, .stderr) }
            if slots.stdin >= 0 && fds[slots.stdin].revents != 0 { pumpStdin(exec) }
            finishExecIfDone(exec)
        }
        if let c = self.control {
            for (link, slot) in tcpSlots where tcpLinks[link.id] === link && fds[slot].revents != 0 {
                serviceTcp(link, fds[slot].revents, over: c)
            }
            for (id, fd, slot) in listenSlots where tcpListeners[id] == fd && fds[slot].revents != 0 {
                acceptTcp(on: id, fd, over: c)
            }
        }
        if let t = transfer {
            serviceTransfer(t, revents: dataSlot >= 0 ? fds[dataSlot].revents : 0)
        }
        if let c = self.control, c.pendingOutput > 0, !controlHost.away { flushControl(c) }
        // With the answers sent: the reaping, and with no command running, the next command's
        // pipes, cost nobody a wait.
        if !unreapedPIDs.isEmpty { reapRecorded() }
        if execs.isEmpty { stdio.refill() }
    }

    func handleSignals() {
        for sig in SignalPipe.drain(signalFD) {
            switch sig {
            case SIGCHLD: reapChildren()
            case SIGIO:
                controlHost.recheck()
                transfer?.dataHost.recheck()
            case SIGTERM, SIGINT: stopping = true
            default: break
            }
        }
    }

    func reapChildren() {
        guard getpid() == 1 else {
            // Only the processes started for the host: whatever else shares this process (a
            // test that runs the agent in process) reaps its own children. Each ended one is
            // looked at, not reaped: `reapRecorded()` does that after the answers are sent.
            for exec in execs.values where exec.exit == nil {
                var info = siginfo_t()
                guard waitid(P_PID, id_t(exec.pid), &info, WEXITED | WNOHANG | WNOWAIT) == 0,
                      info._sifields._sigchld.si_pid == exec.pid else { continue }
                let value = info._sifields._sigchld.si_status
                recordExit(exec, info.si_code == CLD_EXITED ? ExecExit(code: value, signal: 0) : ExecExit(code: -1, signal: value))
                unreapedPIDs.append(exec.pid)
            }
            return
        }
        // As init, every orphan in the guest is the agent's to reap.
        var status: Int32 = 0
        while true {
            let pid = waitpid(-1, &status, WNOHANG)
            if pid <= 0 { break }
            guard let exec = execs.values.first(where: { $0.pid == pid }) else { continue }
            let termSig = status & 0x7f
            recordExit(exec, termSig == 0 ? ExecExit(code: (status >> 8) & 0xff, signal: 0) : ExecExit(code: -1, signal: termSig))
        }
        unreapedPIDs = []
    }

    /// Reaps what ``reapChildren()`` recorded and what an ended session killed, once dead.
    func reapRecorded() {
        var status: Int32 = 0
        // A pid that is no longer a child (ECHILD) is forgotten too.
        unreapedPIDs.removeAll { waitpid($0, &status, WNOHANG) != 0 }
    }

    private func recordExit(_ exec: ExecProcess, _ exit: ExecExit) {
        exec.exit = exit
        exec.exitedAt = monotonicNanos()
        log.debug("exec \(exec.id) pid \(exec.pid) ended: code \(exit.code) signal \(exit.signal)")
    }

    func flushControl(_ control: FramedConnection) {
        do {
            try control.flush()
        } catch {
            if error.errno == EAGAIN { return }
            hostGone(control)
        }
    }

    func hostGone(_ control: FramedConnection) {
        // A host's first bytes can arrive before the guest kernel has taken in that the host
        // connected (the port's data is served at once, its connect event later from a work
        // queue), so a port whose hello was just read can read as closed for a moment. A
        // handshake that waits for the key proof is therefore kept, its answer still queued
        // for when the host end is back; it grants nothing until the proof comes, and the next
        // hello of any other host replaces it. (Ended, it cost that host a second, until it
        // sent its hello again.)
        if pendingAuth != nil && execs.isEmpty && transfer == nil && tcpLinks.isEmpty && tcpListeners.isEmpty {
            controlHost.hostLeft()
            return
        }
        // A host leaving is routine (every holder that ends); it is worth a line on the
        // console only when it cut work off. Under TCG each console line costs the guest a
        // millisecond or more, just when the next host arrives.
        if !execs.isEmpty || transfer != nil || !tcpLinks.isEmpty || !tcpListeners.isEmpty {
            log.info("host disconnected from the control port")
        } else if sessionActive {
            log.debug("host disconnected from the control port")
        }
        endSession(reason: "host disconnected")
        controlHost.hostLeft()
    }

    /// Forgets the session: kills its processes, abandons its transfer, drops queued bytes.
    func endSession(reason: String) {
        for exec in execs.values {
            if exec.exit == nil {
                log.info("killing exec \(exec.id) (pid \(exec.pid)): \(reason)")
                kill(-exec.pid, SIGKILL)
                kill(exec.pid, SIGKILL)
                unreapedPIDs.append(exec.pid)
            }
            exec.closeAll()
        }
        execs = [:]
        closeAllTcp()
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

    func readControl(_ control: FramedConnection) {
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
}
