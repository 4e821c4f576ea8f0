import Glibc
import VirtchanProtocol

/// One file moving over the data port. The agent opens the port when the transfer starts
/// and closes it when the transfer ends, whichever way it ends.
final class Transfer {
    enum Kind { case push, pull }
    enum Phase { case streaming, awaitingAck }

    let id: UInt32
    let kind: Kind
    let data: FramedConnection
    let path: String
    var fileFD: Int32
    /// Push: the temporary file that becomes `path` by rename once verified.
    let tempPath: String
    let mode: UInt32
    let expectedSize: UInt64
    var bytes: UInt64 = 0
    var digest = TransferDigest()
    var sha: SHA256Digest?
    /// Push: the file goes to disk while it arrives (see ``WritebackPacer``).
    var writeback: WritebackPacer?
    var phase = Phase.streaming
    /// Whether the host's end of the data port has been seen connected.
    var dataConnected = false
    /// Whether the host end of the data port is closed.
    var dataHost: HostWatch
    let startedAt = monotonicNanos()

    init(id: UInt32, kind: Kind, dataFD: Int32, path: String, fileFD: Int32, tempPath: String,
         mode: UInt32, expectedSize: UInt64, wantSHA256: Bool) {
        self.id = id
        self.kind = kind
        data = FramedConnection(fd: dataFD, maxPayload: FrameLimits.dataChunk + 4096, readBufferSize: 64 * 1024)
        dataHost = HostWatch(fd: dataFD)
        self.path = path
        self.fileFD = fileFD
        self.tempPath = tempPath
        self.mode = mode
        self.expectedSize = expectedSize
        sha = wantSHA256 ? SHA256Digest() : nil
        writeback = kind == .push ? WritebackPacer(fd: fileFD) : nil
    }

    /// Closes the data port and the file; a push that did not complete loses its temp file.
    func close(completed: Bool) {
        if fileFD >= 0 { Glibc.close(fileFD); fileFD = -1 }
        if kind == .push && !completed { unlink(tempPath) }
        closePort(data.fd)
    }
}

/// Why a transfer stopped early, as it goes back to the host.
struct TransferFailure: Error {
    let code: RemoteErrorCode
    let errno: Int32
    let message: String

    init(_ code: RemoteErrorCode, errno: Int32 = 0, _ message: String) {
        self.code = code
        self.errno = errno
        self.message = message
    }

    init(errno e: Int32, _ what: String) {
        self.init(remoteCode(forErrno: e), errno: e, "\(what): \(errnoText(e))")
    }
}

extension Agent {
    func abortTransfer(_ t: Transfer, _ failure: TransferFailure) {
        log.info("transfer of \(t.path) failed: \(failure.message)")
        t.close(completed: false)
        transfer = nil
        fail(t.id, failure.code, errno: failure.errno, failure.message)
    }

    func serviceTransfer(_ t: Transfer, revents: Int16) {
        let now = monotonicNanos()
        if t.dataHost.away {
            // Waiting for the host to (re)appear on the data socket; SIGIO or a re-check ends the wait.
            if t.dataHost.awayLonger(than: 100_000_000, now: now) { t.dataHost.recheck() }
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

    func noteDataHup(_ t: Transfer) {
        if t.dataConnected {
            abortTransfer(t, TransferFailure(.aborted, "the host closed the data channel mid-transfer"))
        } else {
            t.dataHost.hostLeft()
        }
    }
}
