import Foundation
import Testing
import VirtchanKit

private func sha256(file path: String) throws -> String {
    sha256Hex(try Data(contentsOf: URL(fileURLWithPath: path)))
}

extension EndToEnd {
    /// Issue 5: files over the data channel, opened on demand, in the real guest.
    @Suite struct Transfer {
        let name = SharedGuest.name
        let work = "/tmp/vctest-transfer"

        init() throws {
            try? FileManager.default.removeItem(atPath: work)
            try FileManager.default.createDirectory(atPath: work, withIntermediateDirectories: true)
        }

        /// Pushes `src` to `remote`, pulls it back beside `src`, and expects the same bytes.
        func expectRoundTrip(_ src: String, via remote: String, pushOptions: [String] = [],
                             sourceLocation: SourceLocation = #_sourceLocation) {
            let back = src + ".back"
            let push = VC.run(["push", name, src, remote] + pushOptions)
            #expect(push.code == 0, "\(push.stderr)", sourceLocation: sourceLocation)
            let pull = VC.run(["pull", name, remote, back])
            #expect(pull.code == 0, "\(pull.stderr)", sourceLocation: sourceLocation)
            #expect(sameBytes(src, back), sourceLocation: sourceLocation)
            VC.guest("rm -f \(remote)")
        }

        @Test(arguments: [0, 1, 32 * 1024 - 1, 32 * 1024, 32 * 1024 + 1, (1 << 20) + 7])
        func roundTripIsByteExact(size: Int) throws {
            try SharedGuest.require()
            let src = "\(work)/src-\(size)"
            try makeFile(src, size: size)
            expectRoundTrip(src, via: "/tmp/rt-\(size)", pushOptions: ["--json"])
        }

        @Test(arguments: ["ff", "magic"])
        func adversarialContentRoundTrips(kind: String) throws {
            try SharedGuest.require()
            let src = "\(work)/adv-\(kind)"
            let magic = FrameHeader.magic + [FrameHeader.version]
            try makeFile(src, size: 3 << 20) { i in kind == "ff" ? 0xFF : magic[i % magic.count] }
            expectRoundTrip(src, via: "/tmp/adv")
        }

        @Test func bigFileAndDataChannelStateDuringTransfer() throws {
            try SharedGuest.require()
            let src = "\(work)/big", back = "\(work)/big.back"
            try makeFile(src, size: 128 << 20)
            #expect(channels(name).first { $0.role == "data" }?.state == "disconnected")
            let bg = try Background(["push", name, src, "/tmp/big", "--json"])
            var sawConnected = false
            while bg.isRunning {
                if channels(name).first(where: { $0.role == "data" })?.state == "connected" { sawConnected = true }
                usleep(50_000)
            }
            #expect(bg.wait(120) == 0)
            #expect(sawConnected, "the data channel never showed connected during the push")
            #expect(eventually(5) { channels(name).first { $0.role == "data" }?.state == "disconnected" })
            let summary = bg.seen.map(\.1).joined()
            let expected = try sha256(file: src)
            #expect(summary.contains(expected))
            // --json alone: the host's SHA-256 of what landed, computed because it is printed.
            let plain = VC.run(["pull", name, "/tmp/big", back, "--json"], timeout: 60)
            #expect(plain.code == 0 && plain.out.contains("\"sha256\" : \"\(expected)\""), "\(plain.out) \(plain.stderr)")
            // Over the first copy, made durable before it replaces it.
            let pulled = VC.run(["pull", name, "/tmp/big", back, "--sha256", "--json", "--sync"], timeout: 180)
            #expect(pulled.code == 0, "\(pulled.stderr)")
            #expect(pulled.out.contains("\"guestSHA256\" : \"\(expected)\""))
            #expect(sameBytes(src, back))
            VC.guest("rm -f /tmp/big")
        }

        @Test func modesAreKept() throws {
            try SharedGuest.require()
            let src = "\(work)/script"
            try makeFile(src, size: 100)
            chmod(src, 0o750)
            #expect(VC.run(["push", name, src, "/tmp/m1"]).code == 0)
            #expect(VC.guest("stat -c %a /tmp/m1").out == "750\n")
            #expect(VC.run(["push", name, src, "/tmp/m2", "--mode", "0604"]).code == 0)
            #expect(VC.guest("stat -c %a /tmp/m2").out == "604\n")
            #expect(VC.run(["pull", name, "/tmp/m2", "\(work)/m2"]).code == 0)
            #expect(mode("\(work)/m2") == 0o604)
            VC.guest("rm -f /tmp/m1 /tmp/m2")
        }

        /// Garbage written into the data socket between transfers (a stray client) does not reach
        /// the next file: the push and the pull after it are byte-exact.
        @Test func garbageOnTheDataChannelDoesNotReachTheNextFile() throws {
            try SharedGuest.require()
            let path = try #require(channels(name).first { $0.role == "data" }?.path)
            var rng = SystemRandomNumberGenerator()
            let junk = (0..<100_000).map { _ in UInt8.random(in: 0...255, using: &rng) } + FrameHeader.magic + [UInt8](repeating: 0, count: 30)
            try writeRaw(junk, to: path)
            let src = "\(work)/after-junk"
            try makeFile(src, size: 3 << 20)
            expectRoundTrip(src, via: "/tmp/after-junk")
        }

        @Test func stdinAndStdoutForms() throws {
            try SharedGuest.require()
            let payload = Data((0..<200_000).map { UInt8(truncatingIfNeeded: $0 * 7) })
            #expect(VC.run(["push", name, "-", "/tmp/from-stdin"], stdin: payload).code == 0)
            let out = VC.run(["pull", name, "/tmp/from-stdin", "-"])
            #expect(out.code == 0)
            #expect(out.stdout == payload)
            VC.guest("rm -f /tmp/from-stdin")
            // A reader that stops early ends the pull quietly, as it would end cat.
            VC.guest("head -c 33554432 /dev/zero > /tmp/zeros")
            defer { VC.guest("rm -f /tmp/zeros") }
            let cut = VC.runProgram("/bin/bash", ["-c", "'\(VC.binary)' pull \(name) /tmp/zeros - | head -c 10 | wc -c; echo \"status ${PIPESTATUS[0]}\""],
                                    timeout: 60)
            #expect(cut.out == "10\nstatus 141\n")
            #expect(cut.stderr == "")
            #expect(VC.run(["pull", name, "/tmp/zeros", "\(work)/zeros"]).code == 0)
        }

        @Test func directoryTreesBothWays() throws {
            try SharedGuest.require()
            let tree = "\(work)/tree"
            let fm = FileManager.default
            try fm.createDirectory(atPath: "\(tree)/a/b", withIntermediateDirectories: true)
            try makeFile("\(tree)/top.bin", size: 70_000)
            try makeFile("\(tree)/a/b/deep.txt", size: 12)
            try makeFile("\(tree)/a/empty", size: 0)
            chmod("\(tree)/a/b/deep.txt", 0o600)
            chmod("\(tree)/a", 0o750)
            try fm.createSymbolicLink(atPath: "\(tree)/a/link", withDestinationPath: "b/deep.txt")
            // A FIFO is neither copied nor passed over in silence, either way.
            #expect(mkfifo("\(tree)/a/pipe", 0o600) == 0)
            VC.guest("rm -rf /tmp/tree")
            let push = VC.run(["push", name, "-r", tree, "/tmp/tree"])
            #expect(push.code == 0, "\(push.stderr)")
            #expect(push.out.contains("3 files, 2 directories, 1 symlinks (68.4 KiB), 1 skipped pushed"), "\(push.out)")
            #expect(push.stderr == "virtchan: skipping \(tree)/a/pipe: not a file, directory or symlink\n")
            #expect(VC.guest("readlink /tmp/tree/a/link; stat -c %a /tmp/tree/a /tmp/tree/a/b/deep.txt").out == "b/deep.txt\n750\n600\n")
            #expect(VC.guest("mkfifo /tmp/tree/a/guest-pipe && [ ! -e /tmp/tree/a/pipe ]").code == 0)
            let pull = VC.run(["pull", name, "-r", "/tmp/tree", "\(work)/tree.back"])
            #expect(pull.code == 0, "\(pull.stderr)")
            #expect(pull.out.contains("1 skipped pulled"), "\(pull.out)")
            #expect(pull.stderr == "virtchan: skipping \(name):/tmp/tree/a/guest-pipe: not a file, directory or symlink\n")
            #expect(!fm.fileExists(atPath: "\(work)/tree.back/a/guest-pipe"))
            for f in ["top.bin", "a/b/deep.txt", "a/empty"] {
                #expect(sameBytes("\(tree)/\(f)", "\(work)/tree.back/\(f)"), "\(f)")
            }
            #expect(try fm.destinationOfSymbolicLink(atPath: "\(work)/tree.back/a/link") == "b/deep.txt")
            #expect(mode("\(work)/tree.back/a/b/deep.txt") == 0o600)
            #expect(mode("\(work)/tree.back/a") == 0o750)
            VC.guest("rm -rf /tmp/tree")
        }

        @Test func pathErrorsAreClear() throws {
            try SharedGuest.require()
            let src = "\(work)/small"
            try makeFile(src, size: 10)
            VC.guest("rm -rf /tmp/newdir")
            let noParent = VC.run(["push", name, src, "/tmp/newdir/sub/file"])
            #expect(noParent.code == 1)
            #expect(noParent.stderr.contains("does not exist (use --parents"))
            #expect(VC.run(["push", name, src, "/tmp/newdir/sub/file", "--parents"]).code == 0)
            // A file pushed onto a directory goes into it (as with cp); stdin has no name to use.
            let isDir = VC.run(["push", name, "-", "/tmp/newdir"], stdin: Data("x".utf8))
            #expect(isDir.code == 1)
            #expect(isDir.stderr.contains("/tmp/newdir is a directory in the guest"), "\(isDir.stderr)")
            let missing = VC.run(["pull", name, "/tmp/no-such-file", "\(work)/x"])
            #expect(missing.code == 1)
            #expect(missing.stderr.contains("No such file"))
            #expect(!FileManager.default.fileExists(atPath: "\(work)/x"))
            VC.guest("mkdir -p /mnt/ro && mount -t tmpfs -o ro tmpfs /mnt/ro")
            let ro = VC.run(["push", name, src, "/mnt/ro/file"])
            #expect(ro.code == 1)
            #expect(ro.stderr.contains("Read-only file system"))
            VC.guest("umount /mnt/ro; rm -rf /tmp/newdir")
        }

        @Test func fullDiskLeavesNothing() throws {
            try SharedGuest.require()
            VC.guest("mkdir -p /mnt/small && mount -t tmpfs -o size=1m tmpfs /mnt/small")
            defer { VC.guest("umount /mnt/small") }
            let src = "\(work)/four"
            try makeFile(src, size: 4 << 20)
            let r = VC.run(["push", name, src, "/mnt/small/four"])
            #expect(r.code == 1)
            #expect(r.stderr.contains("space"))
            #expect(VC.guest("ls -A /mnt/small").out == "")
            #expect(VC.run(["push", name, "\(work)/four", "/tmp/after-full"]).code == 0)
            VC.guest("rm -f /tmp/after-full")
        }

        /// A pull that does not fit on the host's disk is refused before it writes (one line that
        /// says so), the file that was there before is untouched, and nothing is left beside it.
        @Test func fullHostDiskKeepsTheOldFile() throws {
            try SharedGuest.require()
            let small = "\(work)/small"
            let unmount = try smallFileSystem(at: small, size: "1m")
            defer { unmount() }
            try "the old contents\n".write(toFile: "\(small)/four", atomically: false, encoding: .utf8)
            VC.guest("head -c 4194304 /dev/urandom > /tmp/four-random")
            defer { VC.guest("rm -f /tmp/four-random") }
            let r = VC.run(["pull", name, "/tmp/four-random", "\(small)/four"])
            #expect(r.code == 1)
            #expect(r.stderr.contains("not enough space for /tmp/four-random"), "\(r.stderr)")
            #expect(r.stderr.split(separator: "\n").count == 1)
            #expect(try FileManager.default.contentsOfDirectory(atPath: small) == ["four"])
            #expect(try String(contentsOfFile: "\(small)/four", encoding: .utf8) == "the old contents\n")
            // The session and the agent are fine afterwards.
            #expect(VC.run(["pull", name, "/tmp/four-random", "\(work)/four-random"]).code == 0)
            #expect(VC.guest("sha256sum /tmp/four-random").out.hasPrefix(try sha256(file: "\(work)/four-random")))
        }

        /// Killed, or stopped with Ctrl-C (then with its status and a word), a push leaves
        /// nothing in the guest.
        @Test(arguments: [SIGKILL, SIGINT])
        func hostStoppedMidPushLeavesNothing(signal: Int32) throws {
            try SharedGuest.require()
            let src = "\(work)/kill-push"
            try makeFile(src, size: 128 << 20)
            VC.guest("rm -rf /tmp/kp && mkdir /tmp/kp")
            let bg = try Background(["push", name, src, "/tmp/kp/file"])
            #expect(eventually(30, interval: 0.02) { channels(name).first { $0.role == "data" }?.state == "connected" })
            kill(bg.process.processIdentifier, signal)
            #expect(bg.wait(30) == 128 + signal)
            if signal == SIGINT {
                #expect(bg.seen.contains { $0.1 == "virtchan: error: interrupted by SIGINT" }, "\(bg.seen.map(\.1))")
            }
            #expect(eventually(10) { VC.guest("ls -A /tmp/kp").out == "" }, "a partial file was left in the guest")
            #expect(VC.run(["push", name, "\(work)/kill-push", "/tmp/kp/file"]).code == 0)
            VC.guest("rm -rf /tmp/kp")
        }

        /// A push from a stdin that never ends (it is spooled to learn its size) stops at
        /// Ctrl-C, and the guest gets nothing.
        @Test func aPushFromEndlessStdinStopsAtCtrlC() throws {
            try SharedGuest.require()
            let bg = try Background(["push", name, "-", "/tmp/endless"], stdin: "/dev/zero")
            #expect(eventually(30, interval: 0.001) { catches(SIGINT, pid: bg.process.processIdentifier) })
            usleep(300_000)
            kill(bg.process.processIdentifier, SIGINT)
            #expect(bg.wait(20) == 130)
            #expect(bg.seen.contains { $0.1 == "virtchan: error: interrupted by SIGINT" }, "\(bg.seen.map(\.1))")
            #expect(VC.guest("ls /tmp/endless").code != 0)
        }

        @Test func agentKilledMidPullLeavesNothing() throws {
            try SharedGuest.require()
            VC.guest("head -c 134217728 /dev/zero > /tmp/kill-pull")
            let dest = "\(work)/pulled"
            let bg = try Background(["pull", name, "/tmp/kill-pull", dest])
            #expect(eventually(30, interval: 0.02) { channels(name).first { $0.role == "data" }?.state == "connected" })
            // The channel is busy, so the kill goes through qemu-guest-agent.
            let cmd = #"{"execute":"guest-exec","arguments":{"path":"/bin/sh","arg":["-c","kill -9 $(pidof virtchan-agent)"]}}"#
            #expect(VC.virsh(["qemu-agent-command", name, cmd]).code == 0)
            let code = bg.wait(60)
            #expect(code == 1, "pull should fail within its bound")
            let leftovers = try FileManager.default.contentsOfDirectory(atPath: work).filter { $0.contains("pulled") }
            #expect(leftovers.isEmpty, "left behind: \(leftovers)")
            #expect(VC.run(["wait", name, "--timeout", "30"]).code == 0)
            #expect(VC.run(["pull", name, "/tmp/kill-pull", dest]).code == 0)
            VC.guest("rm -f /tmp/kill-pull")
        }

        /// The library's own failure paths against the real agent: a checksum that does not
        /// match and a local file that is shorter than announced (as when it shrinks mid-read).
        @Test func checksumMismatchAndShrinkingSource() throws {
            try SharedGuest.require()
            releaseChannels()
            let endpoint = try Hypervisor().endpoint(of: name)
            let session = try AgentSession.connect(endpoint)
            do {
                // A DataEnd whose checksum does not match what was sent.
                let id: UInt32 = 9_999
                session.send(PushRequest(path: "/tmp/bad-sum", mode: 0o644, size: 4, parents: false, wantSHA256: false), id: id)
                let ready = try #require(try session.receive(id: id, deadline: monotonicNanos() + 10_000_000_000))
                #expect(ready.type == .dataReady)
                let data = try UnixSocket.connect(try #require(endpoint.dataSocket))
                defer { close(data) }
                var bytes = FrameEncoder.encode(Frame(.data, id: id, payload: [1, 2, 3, 4]))
                bytes += FrameEncoder.encode(DataEnd(size: 4, digest: 12345).frame(id: id))
                _ = bytes.withUnsafeBytes { write(data, $0.baseAddress!, $0.count) }
                let answer = try #require(try session.receive(id: id, deadline: monotonicNanos() + 10_000_000_000))
                #expect(answer.type == .error)
                #expect(try ErrorMessage.decode(answer).message.contains("checksum mismatch"))
            }
            let transfer = FileTransfer(session: session)
            let src = "\(work)/short"
            try makeFile(src, size: 1000)
            let fd = open(src, O_RDONLY)
            defer { close(fd) }
            do {
                _ = try transfer.push(fd: fd, size: 5000, to: "/tmp/short", mode: 0o644, parents: false)
                Issue.record("a short source was accepted")
            } catch {
                #expect(error.message.contains("shrank"))
            }
            #expect(try transfer.stat("/tmp/bad-sum").kind == .missing)
            #expect(try transfer.stat("/tmp/short").kind == .missing)
        }

        @Test func memoryStaysFlatOnAGigabyte() throws {
            try SharedGuest.require()
            let src = "\(work)/gig"
            try makeFile(src, size: 1 << 30)
            defer { unlink(src) }
            VC.guest("mkdir -p /mnt/big && mount -t tmpfs -o size=1100m tmpfs /mnt/big")
            defer { VC.guest("umount /mnt/big") }
            // GNU time reports the peak RSS of exactly the virtchan process, in KiB.
            func peakKiB(_ args: [String]) -> Int {
                let report = "\(work)/rss"
                let r = VC.runProgram("/usr/bin/time", ["-f", "%M", "-o", report, VC.binary] + args, timeout: 600)
                #expect(r.code == 0, "\(args): \(r.stderr)")
                return Int((try? String(contentsOfFile: report, encoding: .utf8))?.trimmingCharacters(in: .whitespacesAndNewlines) ?? "") ?? -1
            }
            let pushPeak = peakKiB(["push", name, src, "/mnt/big/gig", "--quiet"])
            let pullPeak = peakKiB(["pull", name, "/mnt/big/gig", "\(work)/gig.back", "--quiet"])
            defer { unlink("\(work)/gig.back") }
            #expect(sameBytes(src, "\(work)/gig.back"))
            #expect(pushPeak > 0 && pushPeak < 64 * 1024, "push peak RSS \(pushPeak) KiB")
            #expect(pullPeak > 0 && pullPeak < 64 * 1024, "pull peak RSS \(pullPeak) KiB")
            let hwm = VC.guest("grep VmHWM /proc/$(pidof virtchan-agent)/status").out
            let kb = Int(hwm.split(whereSeparator: { !$0.isNumber }).first ?? "0") ?? 0
            #expect(kb > 0 && kb < 32 * 1024, "agent peak RSS \(kb) KiB")
            print("1 GiB: host peak RSS push \(pushPeak) KiB, pull \(pullPeak) KiB; agent peak RSS \(kb) KiB")
        }
    }
}
