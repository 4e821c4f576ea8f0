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
                let c = FramedConnection(fd: fd)
                control = c
                controlHost = HostWatch(fd: fd)
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
            return fd
        case .failure(.missing):
            throw TransferFailure(.unsupported, "this guest has no port named \(options.dataPort)")
        case .failure(.failed(let location, let e)):
            throw TransferFailure(errno: e, "cannot open the data port \(location)")
        }
    }
}

/// Whether the host end of a port is away, and how the loop learns that it is back.
///
/// While no host is connected a port polls POLLHUP at once, every time, so the loop leaves it
/// out of its poll set and waits for SIGIO or a timed re-check. The kernel raises SIGIO on a
/// port with O_ASYNC when the host connects, but also for every buffer of data that arrives;
/// so O_ASYNC is on only while the host is away. (On all the time, it cost the guest a signal
/// for every request.)
struct HostWatch {
    let fd: Int32
    /// Leave the port out of the poll set: its host end is closed.
    private(set) var away = false
    private(set) var awaySince: UInt64 = 0

    init(fd: Int32) {
        self.fd = fd
        if fd >= 0 { _ = fcntl(fd, F_SETOWN, getpid()) }
    }

    /// The host end closed (the port polled POLLHUP, or a write failed): stop polling the port
    /// until SIGIO says the host is back, or ``recheck()``. With `looking`, the port is polled
    /// once more after SIGIO is asked for, since a host that came back just before raised none.
    mutating func hostLeft(looking: Bool = true) {
        guard fd >= 0 else { return }
        asyncSignals(true)
        away = true
        awaySince = monotonicNanos()
        if looking {
            var p = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
            if poll(&p, 1, 0) == 1 && p.revents & Int16(POLLHUP) == 0 { recheck() }
        }
    }

    /// SIGIO came, or the wait is long enough: poll the port again.
    mutating func recheck() {
        guard away else { return }
        away = false
        asyncSignals(false)
    }

    func awayLonger(than nanos: UInt64, now: UInt64) -> Bool { away && now - awaySince >= nanos }

    private func asyncSignals(_ on: Bool) {
        let flags = fcntl(fd, F_GETFL)
        guard flags >= 0 else { return }
        let wanted = on ? flags | O_ASYNC : flags & ~O_ASYNC
        if wanted != flags { _ = fcntl(fd, F_SETFL, wanted) }
    }
}

/// Closes a port, asking for no more SIGIO first: a port opened through a shared open file
/// description would otherwise keep signalling after the agent let go of it.
func closePort(_ fd: Int32) {
    _ = fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) & ~O_ASYNC)
    close(fd)
}
