import Glibc
import VirtchanProtocol

/// Requests and replies on the control port.
extension Agent {
    func reply<M: WireMessage>(_ message: M, id: UInt32, flags: UInt16 = 0) {
        control?.send(message, id: id, flags: flags)
    }

    func fail(_ id: UInt32, _ code: RemoteErrorCode, errno: Int32 = 0, _ message: String) {
        log.debug("request \(id) failed: \(message)")
        reply(ErrorMessage(code, errno: errno, message), id: id)
    }

    /// Every frame from the host lands here: hello and the key proof first, then one case per
    /// request type, each a line or a call into the file that owns it.
    func handle(_ frame: Frame, on control: FramedConnection) {
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
                startExec(try ExecStart.decode(frame), id: frame.id, inputWindowed: frame.flags & execStartInputWindow != 0,
                          noInput: frame.flags & execStartNoInput != 0)
            case .execInput:
                guard let exec = execs[frame.id] else { return }
                exec.inputReceived += frame.payload.count
                if exec.inputWindowed && exec.inputReceived - exec.inputAcknowledged > ExecLimits.inputWindow {
                    // Past the window the host asked for: this input is not taken.
                    log.info("exec \(exec.id): the host sent stdin beyond its window; closing the process's stdin")
                    exec.closeStdin()
                }
                if exec.stdinFD >= 0 { exec.stdinBuffer.append(contentsOf: frame.payload) }
                if frame.flags & execInputEOF != 0 { exec.stdinEOF = true }
                if exec.tty && exec.stdinFD >= 0 { pumpStdin(exec) }
                acknowledgeInput(exec)
            case .execSignal:
                let msg = try ExecSignal.decode(frame)
                guard let exec = execs[frame.id] else { return }
                guard msg.signal > 0 && msg.signal < 65 else { return fail(frame.id, .badRequest, "no such signal \(msg.signal)") }
                log.debug("signal \(msg.signal) to exec \(exec.id)")
                exec.signal(msg.signal)
            case .execOutputClosed:
                // Nobody reads this stream on the host any more: close our end of the pipe, so the
                // process's next write fails (SIGPIPE) as it would in a local pipeline.
                guard let exec = execs[frame.id], let stream = ExecStream(rawValue: frame.flags) else { return }
                log.debug("host closed \(stream) of exec \(exec.id)")
                exec.closeOutput(stream)
            case .execFlow:
                // The host's reader of this process is behind (or caught up again).
                guard let exec = execs[frame.id] else { return }
                exec.outputPaused = frame.flags & execFlowPause != 0
            case .execResize:
                // The kernel tells the terminal's foreground process group (SIGWINCH).
                let size = try ExecResize.decode(frame)
                guard let exec = execs[frame.id], exec.tty, exec.stdoutFD >= 0 else { return }
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
            case .tcpConnect:
                startTcpConnect(try TcpConnect.decode(frame), id: frame.id)
            case .tcpListen:
                startTcpListen(try TcpListen.decode(frame), id: frame.id)
            case .tcpData, .tcpWindow, .tcpShutdown, .tcpClose:
                tcpFrame(frame, on: control)
            case .statRequest:
                reply(FileOps.statReply(try StatRequest.decode(frame).path), id: frame.id)
            case .mkdir:
                let request = try MkdirRequest.decode(frame)
                answer(frame.id) { () throws(TransferFailure) in try FileOps.makeDirectory(request) }
            case .symlink:
                let request = try SymlinkRequest.decode(frame)
                answer(frame.id) { () throws(TransferFailure) in try FileOps.makeSymlink(request) }
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

    /// Replies ok when `body` succeeds, else with its failure.
    func answer(_ id: UInt32, _ body: () throws(TransferFailure) -> Void) {
        do {
            try body()
            control?.send(Frame(.ok, id: id))
        } catch {
            fail(id, error.code, errno: error.errno, error.message)
        }
    }

    func handleHello(_ frame: Frame) {
        guard let hello = try? Hello.decode(frame) else {
            log.info("malformed hello ignored")
            return
        }
        if sessionActive, execs.isEmpty, transfer == nil, let ack = lastHelloAck, ack.nonce == hello.nonce {
            reply(ack, id: frame.id)
            return
        }
        if sessionActive || !execs.isEmpty || transfer != nil {
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
            challenge = randomBytes(16)
            pendingAuth = (hello.nonce, challenge)
            capabilities.append(Capability.auth)
        }
        let ack = HelloAck(nonce: hello.nonce, version: version, agentVersion: agentVersion,
                           capabilities: capabilities, challenge: challenge)
        lastHelloAck = ack
        reply(ack, id: frame.id)
        log.debug("session from \(hello.client), protocol \(version)")
    }

    func makeInfo() -> Info {
        var uts = utsname()
        uname(&uts)
        func field<T>(_ value: T) -> String {
            withUnsafeBytes(of: value) { String(decoding: $0.prefix(while: { $0 != 0 }), as: UTF8.self) }
        }
        let uptime = readSmallFile("/proc/uptime").flatMap { text in
            text.split(separator: " ").first.flatMap { Double($0) }
        } ?? 0
        var info = Info(agentVersion: agentVersion, protocolVersion: ProtocolVersion.current,
                        capabilities: Self.capabilities, kernelRelease: field(uts.release),
                        hostname: field(uts.nodename), uptimeSeconds: UInt64(uptime),
                        execAllowed: !options.policy.deniesEverything)
        info.osName = GuestSystem.prettyName()
        info.interfaces = GuestSystem.interfaces()
        return info
    }
}
