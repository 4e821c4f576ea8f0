import Glibc
import VirtchanProtocol

extension Agent {
    /// Opens the control port, waiting (and answering SIGTERM) until it appears.
    func openControlPort() {
        var announced = false
        while !stopping {
            if !announced {
                for p in options.ports.available() { log.info("port \(p.name) at \(p.location)") }
            }
            switch options.ports.open(options.controlPort) {
            case .success(let fd):
                watchHostConnections(fd)
                let c = FramedConnection(fd: fd)
                control = c
                controlHup = false
                log.info("control port \(options.controlPort) open")
                // A host that stayed connected while this agent (re)started learns at once that
                // its session is gone; with no host connected, the frame is dropped unsent.
                c.send(AgentStarted(agentVersion: agentVersion), id: 0)
                flushControl(c)
                return
            case .failure(.failed(let location, let e)):
                if !announced { log.info("cannot open \(location): \(errnoText(e)); retrying") }
            case .failure(.missing):
                if !announced { log.info("no port named \(options.controlPort) yet; waiting for it") }
            }
            announced = true
            for sig in SignalPipe.drain(signalFD) where sig == SIGTERM || sig == SIGINT { stopping = true }
            usleep(250_000)
        }
    }

    func reopenControlPort(after error: String) {
        log.info("control port error (\(error)); reopening")
        endSession(reason: error)
        if let c = control { closePort(c.fd) }
        control = nil
        openControlPort()
    }

    func openDataPort() throws(TransferFailure) -> Int32 {
        switch options.ports.open(options.dataPort) {
        case .success(let fd):
            watchHostConnections(fd)
            return fd
        case .failure(.missing):
            throw TransferFailure(.unsupported, "this guest has no port named \(options.dataPort)")
        case .failure(.failed(let location, let e)):
            throw TransferFailure(errno: e, "cannot open the data port \(location)")
        }
    }

    /// SIGIO on every host connect and disconnect wakes the loop while it ignores POLLHUP.
    private func watchHostConnections(_ fd: Int32) {
        _ = fcntl(fd, F_SETOWN, getpid())
        _ = fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_ASYNC)
    }
}

/// Closes a port, asking for no more SIGIO first: a port opened through a shared open file
/// description would otherwise keep signalling after the agent let go of it.
func closePort(_ fd: Int32) {
    _ = fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) & ~O_ASYNC)
    close(fd)
}
