import Glibc
import VirtchanProtocol

extension Agent {
    func startExec(_ request: ExecStart, id: UInt32, inputWindowed: Bool, noInput: Bool = false) {
        guard execs[id] == nil else { return fail(id, .badRequest, "request \(id) already runs a command") }
        guard execs.count < maxExecs else {
            return fail(id, .busy, "\(maxExecs) commands are already running in this session")
        }
        guard let command = request.argv.first else { return fail(id, .badRequest, "no command given") }
        guard options.policy.permits(command) else {
            log.info("exec of \(command) denied by policy")
            return fail(id, .denied, "running \(command) is denied by the agent's policy")
        }
        do {
            let process = try Spawner.spawn(request, id: id, noInput: noInput, stdio: stdio)
            process.inputWindowed = inputWindowed
            execs[id] = process
            log.debug("exec \(id): \(request.argv.joined(separator: " ")) as pid \(process.pid)")
            reply(ExecStarted(pid: process.pid), id: id)
        } catch {
            fail(id, error.code, errno: error.errno, error.message)
        }
    }

    func pumpOutput(_ exec: ExecProcess, _ stream: ExecStream) {
        guard let control else { return }
        let fd = stream == .stdout ? exec.stdoutFD : exec.stderrFD
        var rounds = 0
        while rounds < 16 && control.pendingOutput < outputHighWater && !exec.outputPaused {
            rounds += 1
            var readErrno: Int32 = 0
            let (n, _) = control.sendInPlace(.execOutput, id: exec.id, flags: stream.rawValue, maxPayload: FrameLimits.execChunk) { room in
                let got = readRestarting(fd, room.baseAddress!, room.count)
                if got < 0 { readErrno = errno }
                return got
            }
            if n > 0 { continue }
            if n < 0 && (readErrno == EAGAIN || readErrno == EWOULDBLOCK) { return }
            // EOF, or EIO from a pty whose other side is gone.
            exec.closeOutput(stream)
            return
        }
    }

    func pumpStdin(_ exec: ExecProcess) {
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
        acknowledgeInput(exec)
    }

    /// Lets a host that sends stdin within the window send more: what left the process's buffer
    /// (written, or dropped) since the last acknowledgement, once the buffer is empty or a
    /// quarter of the window has gone.
    func acknowledgeInput(_ exec: ExecProcess) {
        guard exec.inputWindowed, let control else { return }
        let taken = exec.inputReceived - exec.stdinBuffer.count - exec.inputAcknowledged
        guard taken > 0, exec.stdinBuffer.isEmpty || taken >= ExecLimits.inputWindow / 4 else { return }
        control.send(ExecInputWindow(bytes: UInt32(taken)), id: exec.id)
        exec.inputAcknowledged += taken
    }

    func finishExecIfDone(_ exec: ExecProcess) {
        guard let status = exec.exit else { return }
        // Output the host paused is still wanted: it goes before the exit, once resumed.
        if exec.outputPaused && exec.outputOpen { return }
        // Output still open after the process ended belongs to something it left behind;
        // give it a moment, then stop waiting.
        if exec.outputOpen {
            if monotonicNanos() - exec.exitedAt < 200_000_000 { return }
            if exec.stdoutFD >= 0 { pumpOutput(exec, .stdout) }
            if exec.stderrFD >= 0 { pumpOutput(exec, .stderr) }
        }
        exec.closeAll()
        reply(status, id: exec.id)
        execs[exec.id] = nil
    }
}
