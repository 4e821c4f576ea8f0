import Glibc
import VirtchanProtocol

extension Agent {
    func startPush(_ request: PushRequest, id: UInt32) {
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

    func servicePush(_ t: Transfer, revents: Int16) {
        guard revents & Int16(POLLIN) != 0 else {
            if revents & Int16(POLLHUP | POLLERR) != 0 { noteDataHup(t) }
            return
        }
        var failure: TransferFailure?
        var finished = false
        var taken = 0
        // A frame at a time, each read stopping at its end: taken out whole, it leaves the
        // buffer empty, and the next one lands at the front (moving the head of the next
        // frame down cost 112 of every 128 MiB pushed). Up to 512 KiB per turn of the loop.
        while failure == nil && !finished && taken < 512 * 1024 {
            let outcome: ReadOutcome
            do {
                outcome = try t.data.fillFrame()
            } catch {
                return abortTransfer(t, TransferFailure(errno: error.errno, "reading the data port"))
            }
            guard case .data(let n) = outcome else {
                if outcome == .eof { return noteDataHup(t) }
                break
            }
            if n > 0 { t.dataConnected = true }
            taken += n
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
                    t.writeback?.wrote(upTo: t.bytes)
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
        }
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
}
