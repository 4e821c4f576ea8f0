import Glibc
import VirtchanProtocol

public struct ExecOptions: Sendable {
    public var argv: [String]
    public var env: [String] = []
    public var cwd = ""
    public var tty = false
    /// Kill the guest process after this many seconds (the result is then `timedOut`).
    public var timeout: Double?
    /// Forward the host's stdin until EOF; off, the guest process reads EOF at once (without a
    /// tty its stdin is /dev/null, from an agent that announces `exec-no-input`).
    public var forwardStdin = true
    /// Forward this process's SIGINT, SIGTERM, SIGHUP and SIGQUIT (and SIGWINCH with `tty`) to
    /// the guest process. Process-wide: off for commands that run side by side in one process.
    public var forwardSignals = true
    /// With no frame for this long the host pings the agent...
    public var keepalive: Double = 2
    /// ...and gives up when nothing at all has come back for this long.
    public var agentSilenceLimit: Double = 10

    public init(argv: [String]) { self.argv = argv }
}

public struct ExecResult: Sendable {
    public var exit: ExecExit?
    public var timedOut = false
    public var pid: Int32 = 0

    /// What the host process should exit with: the guest's code, 128+signal, or 124 on timeout.
    public var status: Int32 {
        if timedOut { return 124 }
        return exit?.shellStatus ?? 125
    }
}

nonisolated(unsafe) private var execSignalPipe: Int32 = -1

/// Runs one command in the guest: streams stdout and stderr as they come, forwards stdin and
/// Ctrl-C, enforces the timeout, and notices an agent that stops answering.
public enum ExecClient {
    /// Receives each piece of output as it arrives; returns false once that stream's reader is gone.
    public typealias OutputSink = (ExecStream, UnsafeRawBufferPointer) -> Bool

    public static func run(_ session: AgentSession, _ options: ExecOptions,
                           stdin: Int32 = 0, stdout: Int32 = 1, stderr: Int32 = 2) throws(TransportError) -> ExecResult {
        try run(session, options, stdin: stdin, terminal: stdout) { stream, bytes in
            writeFully(stream == .stderr ? stderr : stdout, bytes)
        }
    }

    public static func run(_ session: AgentSession, _ options: ExecOptions, stdin: Int32 = 0, terminal: Int32 = 1,
                           sink: OutputSink) throws(TransportError) -> ExecResult {
        let stdout = terminal
        let id = session.newID()
        var rows: UInt16 = 24, cols: UInt16 = 80
        if options.tty {
            var ws = winsize()
            if ioctl(stdout, UInt(TIOCGWINSZ), &ws) == 0 && ws.ws_row > 0 { rows = ws.ws_row; cols = ws.ws_col }
        }
        let start = ExecStart(argv: options.argv, env: options.env, cwd: options.cwd, tty: options.tty, rows: rows, cols: cols)
        // Stdin goes at most a window ahead of what the agent took, so that a process that does
        // not read it holds back only its own input, not the session's other requests.
        let windowed = options.forwardStdin && session.hello.capabilities.contains(Capability.execInputWindow)
        // No input: stdin is /dev/null from the start, and no EOF has to follow the request.
        let noInput = !options.forwardStdin && !options.tty && session.hello.capabilities.contains(Capability.execNoInput)
        let flags = (windowed ? execStartInputWindow : 0) | (noInput ? execStartNoInput : 0)
        let startReply = try session.request(start.frame(id: id, flags: flags), timeout: 30)
        var result = ExecResult()
        result.pid = try decodeOrThrow(ExecStarted.self, startReply).pid

        // Ctrl-C and friends go to the guest process instead of ending this one.
        var pipeFDs: [Int32] = [0, 0]
        guard pipe(&pipeFDs) == 0 else { throw TransportError.system("pipe") }
        setNonBlocking(pipeFDs[0]); setNonBlocking(pipeFDs[1])
        var saved: [(Int32, sigaction)] = []
        // A parent may have started us with these blocked; forwarding needs them delivered.
        var unblock = sigset_t()
        sigemptyset(&unblock)
        // SIGWINCH only matters with --tty: the new size goes to the guest's pseudo-terminal.
        let forwarded = !options.forwardSignals ? []
            : options.tty ? [SIGINT, SIGTERM, SIGHUP, SIGQUIT, SIGWINCH] : [SIGINT, SIGTERM, SIGHUP, SIGQUIT]
        if !forwarded.isEmpty { execSignalPipe = pipeFDs[1] }
        for sig in forwarded { sigaddset(&unblock, sig) }
        var previousMask = sigset_t()
        sigprocmask(SIG_UNBLOCK, &unblock, &previousMask)
        defer { sigprocmask(SIG_SETMASK, &previousMask, nil) }
        for sig in forwarded {
            var action = sigaction()
            action.__sigaction_handler.sa_handler = { sig in
                var b = UInt8(truncatingIfNeeded: sig)
                _ = write(execSignalPipe, &b, 1)
            }
            sigemptyset(&action.sa_mask)
            var old = sigaction()
            sigaction(sig, &action, &old)
            saved.append((sig, old))
        }
        var rawMode: termios?
        if options.tty && isatty(stdin) == 1 { rawMode = enterRawMode(stdin) }
        defer {
            for (sig, var old) in saved { sigaction(sig, &old, nil) }
            close(pipeFDs[0]); close(pipeFDs[1])
            if var t = rawMode { tcsetattr(stdin, TCSADRAIN, &t) }
        }

        var stdinOpen = options.forwardStdin
        var inputAhead = 0
        if !stdinOpen && !noInput { session.send(Frame(.execInput, id: id, flags: execInputEOF)) }
        var stdoutOK = true, stderrOK = true
        let timeoutAt = options.timeout.map { monotonicDeadline(after: $0) }
        var killSentAt: UInt64?
        var lastHeard = monotonicNanos()
        var lastPing: UInt64 = 0
        var interrupts = 0
        let control = session.control
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 64 * 1024, alignment: 16)
        defer { buffer.deallocate() }

        while true {
            // Frames first: output, exit, errors.
            while let frame = control.decoder.next() {
                lastHeard = monotonicNanos()
                guard frame.id == id else { continue }
                switch frame.type {
                case .execOutput:
                    let isErr = frame.flags == ExecStream.stderr.rawValue
                    if isErr ? stderrOK : stdoutOK {
                        let stream: ExecStream = isErr ? .stderr : .stdout
                        let ok = frame.payload.withUnsafeBytes { sink(stream, $0) }
                        if !ok {
                            if isErr { stderrOK = false } else { stdoutOK = false }
                            // The reader went away (`virtchan exec vm -- yes | head`): the guest
                            // process learns it as it would locally, by SIGPIPE on its next write.
                            if session.hello.capabilities.contains(Capability.execOutputClosed) {
                                session.send(Frame(.execOutputClosed, id: id, flags: stream.rawValue))
                            } else {
                                session.send(ExecSignal(signal: SIGPIPE), id: id)
                            }
                        }
                    }
                case .execInputWindow:
                    let taken = try decodeOrThrow(ExecInputWindow.self, frame)
                    inputAhead = max(0, inputAhead - Int(taken.bytes))
                case .execExit:
                    result.exit = try decodeOrThrow(ExecExit.self, frame)
                    return result
                case .error:
                    throw TransportError(remote: try decodeOrThrow(ErrorMessage.self, frame))
                default:
                    continue
                }
            }
            let now = monotonicNanos()
            if let t = timeoutAt, now >= t, killSentAt == nil {
                session.send(ExecSignal(signal: SIGKILL), id: id)
                killSentAt = now
                result.timedOut = true
            }
            if let k = killSentAt, now - k > 10_000_000_000 {
                throw TransportError(.timeout, "the guest process did not stop within 10 s of being killed")
            }
            let silence = Double(now - lastHeard) / 1e9
            if silence > options.agentSilenceLimit {
                throw TransportError(.agentGone,
                    "the agent in \(session.endpoint.domain) stopped answering (nothing for \(Int(silence)) s); the command's fate is unknown" + session.endpoint.silentLinkHint
                    + (session.endpoint.consoleLog.map { "; see \($0)" } ?? ""))
            }
            if silence > options.keepalive && Double(now - lastPing) / 1e9 > options.keepalive {
                session.send(Frame(.ping, id: 0))
                lastPing = now
            }

            var fds = [Poller.interest(control), pollfd(fd: pipeFDs[0], events: Int16(POLLIN), revents: 0)]
            let inputRoom = windowed ? ExecLimits.inputWindow - inputAhead : buffer.count
            if stdinOpen && control.pendingOutput < 1 << 20 && inputRoom > 0 {
                fds.append(pollfd(fd: stdin, events: Int16(POLLIN), revents: 0))
            }
            var wait: Int32 = 500
            if let t = timeoutAt, killSentAt == nil { wait = Int32(max(0, min(500, (Int64(t) - Int64(now)) / 1_000_000 + 1))) }
            // Ctrl-C is the guest's business here: the signal pipe forwards it.
            try Poller.wait(&fds, milliseconds: wait, interruptible: false)

            if fds[1].revents != 0 {
                var b = [UInt8](repeating: 0, count: 16)
                let n = b.withUnsafeMutableBytes { read(pipeFDs[0], $0.baseAddress!, $0.count) }
                for sig in b.prefix(max(0, n)) {
                    if Int32(sig) == SIGWINCH {
                        var ws = winsize()
                        if session.hello.capabilities.contains(Capability.execResize),
                           ioctl(stdout, UInt(TIOCGWINSZ), &ws) == 0, ws.ws_row > 0 {
                            session.send(ExecResize(rows: ws.ws_row, cols: ws.ws_col), id: id)
                        }
                        continue
                    }
                    interrupts += 1
                    // The third interrupt in a row insists.
                    let forward = interrupts >= 3 ? SIGKILL : Int32(sig)
                    session.send(ExecSignal(signal: forward), id: id)
                }
            }
            if fds.count > 2 && fds[2].revents != 0 {
                let n = read(stdin, buffer.baseAddress!, min(buffer.count, inputRoom))
                if n > 0 {
                    session.send(.execInput, id: id, flags: 0, payload: UnsafeRawBufferPointer(rebasing: buffer[0..<n]))
                    inputAhead += n
                } else if n == 0 || (errno != EINTR && errno != EAGAIN) {
                    session.send(Frame(.execInput, id: id, flags: execInputEOF))
                    stdinOpen = false
                }
            }
            if fds[0].revents & Int16(POLLOUT) != 0 || control.pendingOutput > 0 {
                do { try control.flush() } catch {
                    throw TransportError(.agentGone, "the control channel closed: \(error)")
                }
            }
            if fds[0].revents & Int16(POLLIN | POLLHUP | POLLERR) != 0 {
                let outcome: ReadOutcome
                do { outcome = try control.fill() } catch {
                    throw TransportError(.agentGone, "the control channel failed: \(error)")
                }
                if outcome == .eof {
                    throw TransportError(.agentGone, "the control channel closed while the command ran (the domain stopped?)")
                }
            }
        }
    }
}

extension AgentSession {
    func send(_ type: MessageType, id: UInt32, flags: UInt16, payload: UnsafeRawBufferPointer) {
        control.send(type, id: id, flags: flags, payload: payload)
    }
}

/// Puts a terminal in raw mode; returns the settings to restore.
func enterRawMode(_ fd: Int32) -> termios? {
    var original = termios()
    guard tcgetattr(fd, &original) == 0 else { return nil }
    var raw = original
    raw.c_iflag &= ~tcflag_t(IGNBRK | BRKINT | PARMRK | ISTRIP | INLCR | IGNCR | ICRNL | IXON)
    raw.c_oflag &= ~tcflag_t(OPOST)
    raw.c_lflag &= ~tcflag_t(ECHO | ECHONL | ICANON | ISIG | IEXTEN)
    raw.c_cflag &= ~tcflag_t(CSIZE | PARENB)
    raw.c_cflag |= tcflag_t(CS8)
    tcsetattr(fd, TCSANOW, &raw)
    return original
}

/// What a command printed and how it ended, from ``ExecClient/capture(_:_:timeout:)``.
public struct CapturedOutput: Sendable {
    public var result: ExecResult
    public var stdout: [UInt8] = []
    public var stderr: [UInt8] = []
    /// A stream went past the limit: what is kept is its first `limit` bytes, and the
    /// command's further writes to it failed (SIGPIPE), as in `cmd | head -c`.
    public var truncated = false
    /// The exit status as a shell reports it (see ``ExecResult/status``).
    public var status: Int32 { result.status }
    public var stdoutText: String { String(decoding: stdout, as: UTF8.self) }
    public var stderrText: String { String(decoding: stderr, as: UTF8.self) }
}

extension ExecClient {
    /// Runs a command with no input and collects its output, for commands whose output is
    /// small: the host keeps at most `limit` bytes of each stream, whatever the guest sends.
    /// Stream larger output with ``run(_:_:stdin:terminal:sink:)``.
    public static func capture(_ session: AgentSession, _ argv: [String], env: [String] = [],
                               timeout: Double? = 30, limit: Int = 1 << 20) throws(TransportError) -> CapturedOutput {
        var options = ExecOptions(argv: argv)
        options.env = env
        options.forwardStdin = false
        options.timeout = timeout
        var out: [UInt8] = [], err: [UInt8] = []
        var truncated = false
        let result = try run(session, options, stdin: 0, terminal: 1) { stream, bytes in
            func keep(_ buffer: inout [UInt8]) -> Bool {
                let room = limit - buffer.count
                buffer.append(contentsOf: bytes.prefix(max(0, room)))
                if bytes.count > room { truncated = true }
                return bytes.count < room
            }
            return stream == .stderr ? keep(&err) : keep(&out)
        }
        return CapturedOutput(result: result, stdout: out, stderr: err, truncated: truncated)
    }
}
