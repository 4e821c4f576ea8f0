import Glibc
import VirtchanProtocol

/// The host's one way of waiting on descriptors. Every loop in this module (a session's
/// requests, exec, push, pull) waits here, so EINTR, poll's own failures and a pending
/// Ctrl-C are handled in one place.
package enum Poller {
    /// Waits up to `milliseconds` (-1: no limit) for the events in `fds`. A signal that cuts
    /// the wait short counts as "nothing ready" (every caller loops); with `interruptible`, a
    /// pending SIGINT, SIGTERM or SIGHUP then ends the operation (see `Interruption`).
    package static func wait(_ fds: inout [pollfd], milliseconds: Int32, interruptible: Bool = true) throws(TransportError) {
        if poll(&fds, nfds_t(fds.count), milliseconds) < 0 {
            guard errno == EINTR else { throw TransportError.system("poll") }
            for i in fds.indices { fds[i].revents = 0 }
        }
        if interruptible { try Interruption.check() }
    }

    /// Milliseconds from now until `deadline` (monotonic nanoseconds), at least 0, at most a minute.
    package static func milliseconds(until deadline: UInt64) -> Int32 {
        let now = monotonicNanos()
        return deadline > now ? Int32(min((deadline - now) / 1_000_000 + 1, 60_000)) : 0
    }

    /// What to wait for on a framed connection: input, and output while some is queued.
    package static func interest(_ c: FramedConnection, reading: Bool = true) -> pollfd {
        pollfd(fd: c.fd, events: (reading ? Int16(POLLIN) : 0) | (c.pendingOutput > 0 ? Int16(POLLOUT) : 0), revents: 0)
    }
}

/// Writes all of `bytes`, waiting while a non-blocking descriptor is full; false on any
/// other failure (errno says which).
public func writeFully(_ fd: Int32, _ bytes: UnsafeRawBufferPointer) -> Bool {
    var done = 0
    while done < bytes.count {
        let n = write(fd, bytes.baseAddress! + done, bytes.count - done)
        if n > 0 { done += n; continue }
        if n < 0 && errno == EINTR { continue }
        if n < 0 && errno == EAGAIN {
            var p = [pollfd(fd: fd, events: Int16(POLLOUT), revents: 0)]
            guard (try? Poller.wait(&p, milliseconds: 1000, interruptible: false)) != nil else { return false }
            continue
        }
        return false
    }
    return true
}

/// Reads until `count` bytes or the end of the file; -1 when the first read fails.
package func readFull(_ fd: Int32, _ p: UnsafeMutableRawPointer, _ count: Int) -> Int {
    var done = 0
    while done < count {
        let n = read(fd, p + done, count - done)
        if n > 0 { done += n; continue }
        if n == 0 { break }
        if errno == EINTR { continue }
        return done > 0 ? done : -1
    }
    return done
}

/// Writes `line` and a newline to stderr, without Foundation.
public func writeStderrLine(_ line: String) {
    var bytes = Array(line.utf8)
    bytes.append(10)
    _ = bytes.withUnsafeBytes { writeFully(2, $0) }
}
