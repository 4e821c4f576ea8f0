import Glibc
import VirtchanProtocol

extension Agent {
    func startPull(_ request: PullRequest, id: UInt32) {
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

    func servicePull(_ t: Transfer, revents: Int16) {
        if revents & Int16(POLLHUP | POLLERR) != 0 && revents & Int16(POLLOUT) == 0 && t.data.pendingOutput > 0 {
            return noteDataHup(t)
        }
        // The next frame is read only once the last one is written out whole: it then starts
        // at the front of the buffer, where a frame added behind a partly written one would
        // first have the rest moved down (half a frame's copy, on average, per frame).
        var rounds = 0
        while flushPull(t) && t.phase == .streaming && rounds < 8 {
            rounds += 1
            // The file is read straight into the output buffer, behind the frame header.
            var readErrno: Int32 = 0
            let (n, hash) = t.data.sendInPlace(.data, id: t.id, maxPayload: FrameLimits.dataChunk) { room in
                let want = Int(min(UInt64(room.count), t.expectedSize - min(t.bytes, t.expectedSize) + 1))
                let got = readRestarting(t.fileFD, room.baseAddress!, want)
                if got < 0 { readErrno = errno }
                if got > 0 { t.sha?.update(UnsafeRawBufferPointer(rebasing: room[0..<got])) }
                return got
            }
            if n < 0 { return abortTransfer(t, TransferFailure(errno: readErrno, "reading \(t.path)")) }
            if n == 0 {
                guard t.bytes == t.expectedSize else {
                    return abortTransfer(t, TransferFailure(.aborted, "\(t.path) shrank while it was being read"))
                }
                t.data.send(DataEnd(size: t.bytes, digest: t.digest.digest()), id: t.id)
                t.phase = .awaitingAck
                _ = flushPull(t)
                return
            }
            // One byte more than announced is read on purpose, to notice a file that grew.
            guard t.bytes + UInt64(n) <= t.expectedSize else {
                return abortTransfer(t, TransferFailure(.aborted, "\(t.path) grew while it was being read"))
            }
            t.digest.add(payloadHash: hash, length: n)
            t.bytes += UInt64(n)
        }
    }

    /// Writes what the pull has queued; true when all of it went out (the port takes more).
    private func flushPull(_ t: Transfer) -> Bool {
        do {
            let before = t.data.pendingOutput
            let empty = try t.data.flush()
            if t.data.pendingOutput < before { t.dataConnected = true }
            return empty
        } catch {
            if error.errno == EAGAIN { return false }
            if t.dataConnected {
                abortTransfer(t, TransferFailure(errno: error.errno, "writing the data port"))
                return false
            }
            // Not a POLLHUP: looking again at once could spin on a port that keeps failing.
            t.dataHost.hostLeft(looking: false)
            return false
        }
    }

    func completePull(_ t: Transfer) {
        // The host has checked everything it received; only now is the port closed, so no
        // byte still in flight can be dropped by the close.
        let done = TransferDone(size: t.bytes, digest: t.digest.digest(), sha256: t.sha?.hexDigest() ?? "")
        t.close(completed: true)
        transfer = nil
        reply(done, id: t.id)
    }
}
