import Foundation
import Testing
import VirtchanKit

/// A virtchan process left running while the test does something else.
final class Background: @unchecked Sendable {
    let process = Process()
    let output = Pipe()
    private(set) var lines: [(Date, String)] = []
    private let lock = NSLock()

    /// Runs virtchan with `args`, its stdin read from the file at `stdin` (else empty).
    init(_ args: [String], stdin: String? = nil) throws {
        process.executableURL = URL(fileURLWithPath: VC.binary)
        process.arguments = args
        process.standardOutput = output
        process.standardError = output
        process.standardInput = try stdin.map { try FileHandle(forReadingFrom: URL(fileURLWithPath: $0)) } ?? FileHandle.nullDevice
        output.fileHandleForReading.readabilityHandler = { [weak self] h in
            let data = h.availableData
            guard let self, !data.isEmpty else { return }
            self.lock.lock()
            for line in String(decoding: data, as: UTF8.self).split(separator: "\n") { self.lines.append((Date(), String(line))) }
            self.lock.unlock()
        }
        try launch(process)
    }

    var seen: [(Date, String)] {
        lock.lock()
        defer { lock.unlock() }
        return lines
    }

    private var status: Int32?

    /// The exit code (128+N for signal N), or nil while it still runs after `timeout`.
    func wait(_ timeout: Double) -> Int32? {
        if let status { return status }
        guard let code = reap(process, until: Date().addingTimeInterval(timeout)) else { return nil }
        status = code
        // Whatever it printed last is still in the pipe: let the reader take it.
        usleep(100_000)
        output.fileHandleForReading.readabilityHandler = nil
        return code
    }

    var isRunning: Bool { status == nil && wait(0) == nil }

    deinit {
        if status == nil {
            kill(process.processIdentifier, SIGKILL)
            _ = reap(process, until: Date().addingTimeInterval(5))
        }
    }
}

/// Writes `bytes` straight into a channel socket of the shared guest, as a stray client would.
func writeRaw(_ bytes: [UInt8], to socketPath: String) throws {
    releaseChannels()
    let fd = try UnixSocket.connect(socketPath)
    defer { close(fd) }
    setNonBlocking(fd, false)
    _ = bytes.withUnsafeBytes { send(fd, $0.baseAddress!, $0.count, Int32(MSG_NOSIGNAL)) }
    usleep(300_000)
}

extension EndToEnd {
    /// Issue 3: the agent and the control channel, in the real guest.
    @Suite struct Control {
        let name = SharedGuest.name

        @Test func infoDescribesAgentAndGuest() throws {
            try SharedGuest.require()
            let r = VC.run(["info", name, "--json"])
            #expect(r.code == 0, "\(r.stderr)")
            let info = try #require(try JSONSerialization.jsonObject(with: r.stdout) as? [String: Any])
            #expect(info["agentVersion"] as? String == "0.1.0")
            #expect(info["protocolVersion"] as? Int == 1)
            #expect((info["capabilities"] as? [String])?.contains("exec") == true)
            #expect((info["kernelRelease"] as? String)?.hasSuffix("-amd64") == true)
            #expect(info["hostname"] as? String == "virtchan-guest")
            #expect((info["uptimeSeconds"] as? Int ?? -1) >= 0)
        }

        /// The built-in guest has no systemd to restart an agent: update-agent says so, says
        /// what to do instead, and leaves the running agent alone.
        @Test func updateAgentOnTheBuiltInGuestSaysWhatToDo() throws {
            try SharedGuest.require()
            let before = VC.guest("pidof virtchan-agent").out
            let r = VC.run(["update-agent", name], timeout: 60)
            #expect(r.code == 64, "\(r.stderr)")
            #expect(r.stderr.contains("has no systemd to restart its agent (which runs from /usr/bin/virtchan-agent)"), "\(r.stderr)")
            #expect(r.stderr.contains("Scripts/build-guest"), "\(r.stderr)")
            #expect(VC.guest("pidof virtchan-agent").out == before)
            #expect(VC.guest("ls /usr/bin/ | grep -c virtchan-new || true").out == "0\n", "no new binary was left beside the old one")
        }

        @Test func pingMeasuresRoundTrips() throws {
            try SharedGuest.require()
            let r = VC.run(["ping", name, "--count", "5", "--json"])
            #expect(r.code == 0, "\(r.stderr)")
            let s = try #require(try JSONSerialization.jsonObject(with: r.stdout) as? [String: Any])
            #expect(s["count"] as? Int == 5)
            #expect((s["timesMs"] as? [Double])?.count == 5)
            #expect((s["medianMs"] as? Double ?? 0) > 0)
        }

        @Test func exitCodesPassThrough() throws {
            try SharedGuest.require()
            #expect(VC.run(["exec", name, "-n", "--", "true"]).code == 0)
            #expect(VC.run(["exec", name, "-n", "--", "sh", "-c", "exit 3"]).code == 3)
            let missing = VC.run(["exec", name, "-n", "--", "no-such-command"])
            #expect(missing.code == 127)
            #expect(missing.stderr.contains("no-such-command: command not found"))
            let killed = VC.run(["exec", name, "-n", "--", "sh", "-c", "kill -TERM $$"])
            #expect(killed.code == 128 + 15)
            VC.guest("printf 'echo hi' > /tmp/not-exec; chmod 0644 /tmp/not-exec")
            #expect(VC.run(["exec", name, "-n", "--", "/tmp/not-exec"]).code == 126)
        }

        /// `virtchan exec` serves a command itself when the domain's holder runs, and hands it
        /// to virtchan-full when none does: the command ends the same either way (output,
        /// stdin, status, the error line).
        @Test func execEndsTheSameWithAndWithoutAHolder() throws {
            try SharedGuest.require()
            VC.guest("printf 'echo hi' > /tmp/not-exec; chmod 0644 /tmp/not-exec")
            let cases: [([String], Data?)] = [
                (["-n", "--", "sh", "-c", "echo out; echo err >&2; exit 3"], nil),
                (["--", "tr", "a-z", "A-Z"], Data("piped in\n".utf8)),
                (["-n", "--", "no-such-command"], nil),
                (["-n", "--", "/tmp/not-exec"], nil),
                (["-n", "--", "sh", "-c", "kill -TERM $$"], nil),
            ]
            for (args, input) in cases {
                releaseChannels()
                let cold = VC.run(["exec", name, "--persist", "0"] + args, stdin: input)
                #expect(eventually(5) { !VC.run(["holder", "list", "--json"]).out.contains("\"\(name)\"") }, "a holder stayed after --persist 0")
                #expect(VC.run(["exec", name, "-n", "--", "true"]).code == 0, "starts a holder")
                let warm = VC.run(["exec", name] + args, stdin: input)
                #expect(warm.code == cold.code && warm.out == cold.out && warm.stderr == cold.stderr,
                        "\(args): \(cold.code) \(cold.out.debugDescription) \(cold.stderr.debugDescription) against \(warm.code) \(warm.out.debugDescription) \(warm.stderr.debugDescription)")
            }
            releaseChannels()
        }

        /// `virtchan` alone, without virtchan-full beside it, says what is missing.
        @Test func virtchanWithoutTheFullProgramSaysWhatIsMissing() throws {
            let dir = NSTemporaryDirectory() + "vctest-lone-\(getpid())"
            try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
            defer { try? FileManager.default.removeItem(atPath: dir) }
            try FileManager.default.copyItem(atPath: VC.binary, toPath: dir + "/virtchan")
            let r = VC.runProgram(dir + "/virtchan", ["list"])
            #expect(r.code == 1)
            #expect(r.stderr == "virtchan: error: cannot run \(dir)/virtchan-full: No such file or directory (virtchan-full is installed beside virtchan)\n")
        }

        @Test func envCwdAndTTY() throws {
            try SharedGuest.require()
            let r = VC.run(["exec", name, "-n", "--env", "FOO=bar baz", "--cwd", "/tmp", "--", "sh", "-c", "echo \"$FOO\"; pwd"])
            #expect(r.out == "bar baz\n/tmp\n")
            let t = VC.run(["exec", name, "-t", "-n", "--", "tty"])
            #expect(t.code == 0)
            #expect(t.out.hasPrefix("/dev/pts/"))
            let noTTY = VC.run(["exec", name, "-n", "--", "tty"])
            #expect(noTTY.out.contains("not a tty"))
        }

        /// With --tty, a change of the host terminal's size (SIGWINCH) reaches the guest's
        /// pseudo-terminal, as `stty size` in the guest shows.
        @Test func terminalResizeReachesTheGuest() throws {
            try SharedGuest.require()
            // A pseudo-terminal pair (TIOCSPTLCK and TIOCGPTN, which Swift cannot import).
            let master = open("/dev/ptmx", O_RDWR | O_NOCTTY)
            var unlock: Int32 = 0, number: UInt32 = 0
            guard master >= 0, ioctl(master, 0x4004_5431, &unlock) == 0, ioctl(master, 0x8004_5430, &number) == 0 else {
                Issue.record("cannot allocate a pseudo-terminal")
                return
            }
            defer { close(master) }
            var size = winsize(ws_row: 30, ws_col: 100, ws_xpixel: 0, ws_ypixel: 0)
            _ = ioctl(master, UInt(TIOCSWINSZ), &size)
            let slave = open("/dev/pts/\(number)", O_RDWR | O_NOCTTY)
            guard slave >= 0 else {
                Issue.record("cannot open /dev/pts/\(number)")
                return
            }
            let p = Process()
            p.executableURL = URL(fileURLWithPath: VC.binary)
            p.arguments = ["exec", name, "-t", "-n", "--", "sh", "-c", "stty size; sleep 4; stty size"]
            p.standardInput = FileHandle.nullDevice
            p.standardOutput = FileHandle(fileDescriptor: slave, closeOnDealloc: false)
            p.standardError = FileHandle(fileDescriptor: slave, closeOnDealloc: false)
            try launch(p)
            close(slave)
            defer { if p.isRunning { kill(p.processIdentifier, SIGKILL) } }

            var seen = ""
            func read(until text: String, within seconds: Double) -> Bool {
                let deadline = Date().addingTimeInterval(seconds)
                var buf = [UInt8](repeating: 0, count: 4096)
                while !seen.contains(text) && Date() < deadline {
                    var pfd = pollfd(fd: master, events: Int16(POLLIN), revents: 0)
                    guard poll(&pfd, 1, 100) > 0 else { continue }
                    let n = buf.withUnsafeMutableBytes { Glibc.read(master, $0.baseAddress!, $0.count) }
                    if n <= 0 { break }
                    seen += String(decoding: buf[0..<n], as: UTF8.self)
                }
                return seen.contains(text)
            }
            #expect(read(until: "30 100", within: 30), "output so far: \(seen.debugDescription)")
            size = winsize(ws_row: 40, ws_col: 120, ws_xpixel: 0, ws_ypixel: 0)
            _ = ioctl(master, UInt(TIOCSWINSZ), &size)
            // virtchan is not this terminal's foreground process, so tell it as a shell would.
            kill(p.processIdentifier, SIGWINCH)
            #expect(read(until: "40 120", within: 30), "output so far: \(seen.debugDescription)")
            p.waitUntilExit()
            #expect(p.terminationStatus == 0)
        }

        @Test func outputStreamsWhileTheProcessRuns() throws {
            try SharedGuest.require()
            let start = Date()
            let bg = try Background(["exec", name, "-n", "--", "sh", "-c", "echo first; sleep 3; echo second"])
            #expect(bg.wait(30) == 0)
            let lines = bg.seen
            #expect(lines.map(\.1) == ["first", "second"])
            if lines.count == 2 {
                let firstAt = lines[0].0.timeIntervalSince(start)
                let gap = lines[1].0.timeIntervalSince(lines[0].0)
                // The first line arrives long before the process ends, not at exit.
                #expect(gap > 2, "first at \(firstAt) s, second \(gap) s later")
            }
        }

        @Test func stdinIsForwardedUntilEOF() throws {
            try SharedGuest.require()
            let sorted = VC.run(["exec", name, "--", "sort", "-r"], stdin: Data("a\nb\n".utf8))
            #expect(sorted.code == 0)
            #expect(sorted.out == "b\na\n")
            var blob = Data(count: 3 << 20)
            blob.withUnsafeMutableBytes { raw in
                for i in 0..<raw.count { raw[i] = UInt8(truncatingIfNeeded: i &* 2_654_435_761 >> 7) }
            }
            let hashed = VC.run(["exec", name, "--", "sha256sum"], stdin: blob)
            #expect(hashed.out.hasPrefix(sha256Hex(blob)))
        }

        /// With -n the command reads nothing, whatever this side's stdin holds: its stdin is
        /// /dev/null, as under `ssh -n`; with -t as well, it reads EOF at once.
        /// The guest's console tells of a host that left only when that cut work off: a holder
        /// that ends after its commands did leaves no line; one stopped under a running command
        /// leaves the line and the kill.
        @Test func theConsoleTellsOnlyOfHostsThatLeftWorkBehind() throws {
            try SharedGuest.require()
            let console = "/var/lib/virtchan/domains/\(name)/console.log"
            func linesSince(_ offset: Int) -> [String] {
                guard let data = FileManager.default.contents(atPath: console), data.count > offset else { return [] }
                return String(decoding: data[offset...], as: UTF8.self).split(separator: "\n").map(String.init)
            }
            func size() -> Int { FileManager.default.contents(atPath: console)?.count ?? 0 }
            releaseChannels()
            var start = size()
            for _ in 0..<3 { #expect(VC.run(["exec", name, "--persist", "0", "-n", "--", "true"]).code == 0) }
            #expect(VC.run(["ping", name, "-n", "1"]).code == 0)
            releaseChannels()
            Thread.sleep(forTimeInterval: 1)
            #expect(!linesSince(start).contains { $0.contains("host disconnected") }, "\(linesSince(start))")

            start = size()
            let bg = try Background(["exec", name, "-n", "--", "sh", "-c", "echo started; exec sleep 60"])
            #expect(eventually(30, interval: 0.05) { bg.seen.contains { $0.1 == "started" } })
            releaseChannels()
            _ = bg.wait(30)
            #expect(eventually(10) { linesSince(start).contains { $0.contains("host disconnected from the control port") } })
            #expect(linesSince(start).contains { $0.contains("killing exec") }, "\(linesSince(start))")
        }

        @Test func noStdinGivesTheCommandDevNull() throws {
            try SharedGuest.require()
            let plain = VC.run(["exec", name, "-n", "--", "sh", "-c", "readlink /proc/self/fd/0; cat; echo end"],
                               stdin: Data("not for the guest\n".utf8), timeout: 60)
            #expect(plain.code == 0)
            #expect(plain.out == "/dev/null\nend\n", "\(plain.stderr)")
            let tty = VC.run(["exec", name, "-t", "-n", "--", "sh", "-c", "cat; echo end"],
                             stdin: Data("not for the guest\n".utf8), timeout: 60)
            #expect(tty.code == 0)
            #expect(tty.out.hasSuffix("end\r\n"), "\(tty.out) \(tty.stderr)")
            #expect(!tty.out.contains("not for the guest"))
        }

        /// A command holds its three streams and nothing else of the agent's (which keeps the
        /// next command's pipes and /dev/null open, made ahead), with input and without; and
        /// the commands that ended, their exits sent, leave no zombie behind in the guest.
        @Test func aCommandHoldsOnlyItsStreamsAndLeavesNoZombie() throws {
            try SharedGuest.require()
            for flags in [["-n"], []] {
                // `; true` keeps the shell from replacing itself with ls: $$ is the command.
                let r = VC.run(["exec", name] + flags + ["--", "sh", "-c", "ls /proc/$$/fd; true"], stdin: Data(), timeout: 60)
                #expect(r.code == 0)
                #expect(r.out == "0\n1\n2\n", "exec \(flags): \(r.out) \(r.stderr)")
            }
            for code in 0..<3 { #expect(VC.run(["exec", name, "-n", "--", "sh", "-c", "exit \(code)"], timeout: 60).code == Int32(code)) }
            let zombies = VC.guest("grep -l '^State:.*Z' /proc/[0-9]*/status; true")
            #expect(zombies.code == 0)
            #expect(zombies.out.isEmpty, "\(zombies.out)")
        }

        /// `virtchan exec vm -- yes | head -2` ends as the local pipeline would: the guest
        /// process gets SIGPIPE once nobody reads, and its 141 comes back.
        @Test func closedOutputPipeStopsTheGuestProcess() throws {
            try SharedGuest.require()
            let r = VC.runProgram("/bin/bash", ["-c", "'\(VC.binary)' exec \(name) -n -- yes | head -2; echo \"status ${PIPESTATUS[0]}\""],
                                  timeout: 60)
            #expect(r.out == "y\ny\nstatus 141\n", "\(r.stderr)")
            #expect(r.seconds < 20)
            #expect(VC.guest("pidof yes || echo none").out == "none\n")
            // The same for stderr.
            let e = VC.runProgram("/bin/bash", ["-c", "'\(VC.binary)' exec \(name) -n -- sh -c 'yes >&2' 2>&1 >/dev/null | head -1; echo \"status ${PIPESTATUS[0]}\""],
                                  timeout: 60)
            #expect(e.out == "y\nstatus 141\n", "\(e.stderr)")
            #expect(VC.guest("pidof yes || echo none").out == "none\n")
        }

        @Test func largeBinaryOutputArrivesByteExact() throws {
            try SharedGuest.require()
            let made = VC.guest("head -c 67108864 /dev/urandom > /tmp/out64 && sha256sum /tmp/out64")
            #expect(made.code == 0)
            let guestHash = String(made.out.prefix(64))
            let r = VC.run(["exec", name, "-n", "--", "cat", "/tmp/out64"], timeout: 300)
            #expect(r.code == 0)
            #expect(r.stdout.count == 64 << 20)
            #expect(sha256Hex(r.stdout) == guestHash)
            VC.guest("rm -f /tmp/out64")
        }

        @Test func timeoutKillsAndExits124() throws {
            try SharedGuest.require()
            let r = VC.run(["exec", name, "-n", "--timeout", "2", "--", "sleep", "30"])
            #expect(r.code == 124)
            #expect(r.seconds < 15)
            #expect(r.stderr.contains("timed out"))
            #expect(VC.run(["exec", name, "-n", "--", "true"]).code == 0)
        }

        @Test func ctrlCReachesTheGuestProcess() throws {
            try SharedGuest.require()
            let bg = try Background(["exec", name, "-n", "--", "sh", "-c",
                                     "trap 'echo got-int; exit 7' INT; echo ready; while :; do sleep 0.2; done"])
            #expect(eventually(20) { bg.seen.contains { $0.1 == "ready" } })
            kill(bg.process.processIdentifier, SIGINT)
            #expect(bg.wait(20) == 7)
            #expect(bg.seen.contains { $0.1 == "got-int" })
        }

        @Test func killedHostClientThenExecAgain() throws {
            try SharedGuest.require()
            let bg = try Background(["exec", name, "-n", "--", "sh", "-c", "echo started; sleep 300"])
            #expect(eventually(20) { bg.seen.contains { $0.1 == "started" } })
            kill(bg.process.processIdentifier, SIGKILL)
            _ = bg.wait(5)
            let again = VC.run(["exec", name, "-n", "--", "echo", "ok"], timeout: 30)
            #expect(again.code == 0)
            #expect(again.out == "ok\n")
            // The agent ended the orphaned command with its session.
            #expect(eventually(10) { !VC.guest("ps").out.contains("sleep 300") })
        }

        @Test func garbageAndTruncatedFramesThenPing() throws {
            try SharedGuest.require()
            let path = try #require(channels(name).first { $0.role == "control" }?.path)
            var rng = SystemRandomNumberGenerator()
            var junk = (0..<100_000).map { _ in UInt8.random(in: 0...255, using: &rng) }
            junk += FrameHeader.magic + [1, 2, 3]
            // A header with a sound checksum that claims a 2 GiB payload.
            var huge = FrameEncoder.encode(Frame(.execStart, id: 1, payload: []))
            huge.withUnsafeMutableBytes { h in
                h.storeBytes(of: UInt32(0x8000_0000).littleEndian, toByteOffset: 12, as: UInt32.self)
                let hc = UInt32(truncatingIfNeeded: XXH64.hash(UnsafeRawBufferPointer(rebasing: h[0..<20])))
                h.storeBytes(of: hc.littleEndian, toByteOffset: 20, as: UInt32.self)
            }
            let half = Array(FrameEncoder.encode(Hello(nonce: [1], client: "junk").frame(id: 1)).prefix(20))
            try writeRaw(junk + huge + half, to: path)
            let r = VC.run(["ping", name, "--count", "2"], timeout: 30)
            #expect(r.code == 0, "\(r.stderr)")
            // The agent noticed, resynchronised and kept its memory small.
            let log = try String(contentsOfFile: "/var/lib/virtchan/domains/\(name)/console.log", encoding: .utf8)
            #expect(log.contains("bytes of noise on the control port"))
            let rss = VC.guest("grep VmHWM /proc/$(pidof virtchan-agent)/status").out
            let kb = Int(rss.split(whereSeparator: { !$0.isNumber }).first ?? "0") ?? 0
            #expect(kb > 0 && kb < 32 * 1024, "agent peak RSS \(kb) kB")
        }

        /// exec, ping, push and pull find the socket without libvirt through a cache that is
        /// trusted only while the domain's QEMU process is the one it was written for.
        @Test func endpointCacheIsUsedOnlyWhileCurrent() throws {
            try SharedGuest.require()
            let entry = "/run/virtchan/endpoints/\(name)"
            releaseChannels()
            #expect(VC.run(["exec", name, "-n", "--", "true"]).code == 0)
            let qemuPid = try String(contentsOfFile: "/run/libvirt/qemu/\(name).pid", encoding: .utf8)
                .trimmingCharacters(in: .whitespacesAndNewlines)
            let control = try #require(channels(name).first { $0.role == "control" }?.path)
            let real = try String(contentsOfFile: entry, encoding: .utf8)
            #expect(real.contains("pid=\(qemuPid)\n"))
            #expect(real.contains("control=\(control)\n"))

            // An entry written for another QEMU process (the domain restarted since) points at a
            // socket that accepts and never answers: trusting it would time out.
            let decoy = NSTemporaryDirectory() + "vctest-decoy-\(getpid()).sock"
            // Listening, so connecting succeeds; it never accepts or answers.
            let listener = try UnixSocket.listen(decoy)
            defer { close(listener); unlink(decoy) }
            let stale = real.split(separator: "\n").map { line -> String in
                if line.hasPrefix("pid=") { return "pid=1" }
                if line.hasPrefix("control=") { return "control=\(decoy)" }
                return String(line)
            }.joined(separator: "\n") + "\n"
            try stale.write(toFile: entry, atomically: true, encoding: .utf8)
            // The entry is read by whatever opens the channel: the session holder that starts next.
            releaseChannels()
            let afterRestart = VC.run(["exec", name, "-n", "--", "echo", "fresh"], timeout: 30)
            #expect(afterRestart.code == 0, "\(afterRestart.stderr)")
            #expect(afterRestart.out == "fresh\n")
            #expect(afterRestart.seconds < 5)
            #expect(try String(contentsOfFile: entry, encoding: .utf8) == real)

            // A current entry whose socket is gone (a channel was unplugged): libvirt is asked again.
            let moved = real.replacingOccurrences(of: "control=\(control)\n", with: "control=/nonexistent/control.sock\n")
            try moved.write(toFile: entry, atomically: true, encoding: .utf8)
            releaseChannels()
            let afterMove = VC.run(["ping", name, "--count", "1"], timeout: 30)
            #expect(afterMove.code == 0, "\(afterMove.stderr)")
            #expect(try String(contentsOfFile: entry, encoding: .utf8) == real)
        }

        @Test func idleAgentCostsAlmostNothing() throws {
            try SharedGuest.require()
            func ticks() -> Int {
                // utime + stime of the agent, in clock ticks (100 per second).
                let stat = VC.guest("cat /proc/$(pidof virtchan-agent)/stat").out
                guard let close = stat.lastIndex(of: ")") else { return -1 }
                let fields = stat[stat.index(after: close)...].split(separator: " ")
                return (Int(fields[11]) ?? 0) + (Int(fields[12]) ?? 0)
            }
            let before = ticks()
            Thread.sleep(forTimeInterval: 10) // no host connected meanwhile
            let after = ticks()
            #expect(before >= 0 && after >= before)
            // 1% of 10 s is 10 ticks; the two reads themselves cost a little of that.
            #expect(after - before < 10, "the idle agent used \(after - before) ticks in 10 s")
        }

        @Test func qemuGuestAgentRunsBesideIt() throws {
            try SharedGuest.require()
            let ok = eventually(30) { VC.virsh(["qemu-agent-command", name, "{\"execute\":\"guest-ping\"}"]).code == 0 }
            #expect(ok)
        }

        @Test func policyCanDenyExec() throws {
            try SharedGuest.require()
            VC.guest("echo 'exec-deny = uname' > /etc/virtchan-agent.conf")
            restartAgent()
            let denied = VC.run(["exec", name, "-n", "--", "uname"])
            #expect(denied.code == 126)
            #expect(denied.stderr.contains("denied by the agent's policy"))
            VC.guest("rm -f /etc/virtchan-agent.conf")
            restartAgent()
            #expect(VC.run(["exec", name, "-n", "--", "uname"]).code == 0)
        }

        /// An agent that is there but silent (stopped with SIGSTOP through qemu-guest-agent):
        /// wait and exec each give up within their bound and point at the console log.
        @Test func silentAgentGivesABoundedErrorNamingTheConsole() throws {
            try SharedGuest.require()
            func signalAgent(_ sig: String) -> Int32 {
                let cmd = #"{"execute":"guest-exec","arguments":{"path":"/bin/sh","arg":["-c","kill -\#(sig) $(pidof virtchan-agent)"]}}"#
                return VC.virsh(["qemu-agent-command", name, cmd]).code
            }
            #expect(eventually(30) { VC.virsh(["qemu-agent-command", name, "{\"execute\":\"guest-ping\"}"]).code == 0 })
            #expect(signalAgent("STOP") == 0)
            defer { _ = signalAgent("CONT") }
            Thread.sleep(forTimeInterval: 1)
            let console = "/var/lib/virtchan/domains/\(name)/console.log"

            let w = VC.run(["wait", name, "--timeout", "3"], timeout: 30)
            #expect(w.code == 1)
            #expect(w.stderr.contains("did not say hello within 3"), "\(w.stderr)")
            #expect(w.stderr.contains(console))
            #expect(w.seconds < 8)

            let e = VC.run(["exec", name, "-n", "--", "true"], timeout: 60)
            #expect(e.code == 125)
            #expect(e.stderr.contains("did not answer within 10"), "\(e.stderr)")
            #expect(e.stderr.contains(console))
            #expect(e.seconds < 20)

            #expect(signalAgent("CONT") == 0)
            let back = VC.run(["wait", name, "--timeout", "30"])
            #expect(back.code == 0, "\(back.stderr)")
            #expect(VC.run(["exec", name, "-n", "--", "echo", "awake"]).out == "awake\n")
        }

        /// The built-in guest reboots and shuts down as asked: `virtchan reboot` by either method
        /// returns once the agent answers from a new boot, and `virsh shutdown` (the ACPI power
        /// button) powers it off.
        @Test func theBuiltInGuestRebootsAndShutsDown() throws {
            let domain = "vctest-reboot"
            removeAtExit(domain)
            _ = VC.run(["destroy", domain, "--force"], timeout: 60)
            let created = VC.run(["create", domain, "--accel", "tcg", "--memory", "256"], timeout: 300)
            try #require(created.code == 0, "\(created.stderr)")
            func bootID() -> String {
                VC.run(["exec", domain, "-n", "--", "cat", "/proc/sys/kernel/random/boot_id"], timeout: 60).out
            }
            var last = bootID()
            for method in ["agent", "acpi"] {
                let r = VC.run(["reboot", domain, "--method", method, "--timeout", "120"], timeout: 150)
                #expect(r.code == 0, "\(method): \(r.stderr)")
                #expect(r.out.contains("Domain \(domain) rebooted"), "\(r.out)")
                let now = bootID()
                #expect(!now.isEmpty && now != last, "a new boot after the \(method) reboot")
                last = now
            }
            #expect(VC.virsh(["shutdown", domain]).code == 0)
            #expect(eventually(60) { VC.virsh(["domstate", domain]).out.contains("shut off") })
            #expect(VC.run(["destroy", domain]).code == 0)
        }

        /// An agent that goes away mid-exec costs the command a bounded error that says how,
        /// and the next agent serves again. Killed (SIGKILL), it says nothing: the holder hears
        /// the next one start. Told to stop (SIGTERM, as at a shutdown or a reboot), it ends the
        /// commands it ran and says so, and the holder ends them at once.
        @Test(arguments: [("-KILL", "restarted (did the guest reboot?)"), ("-TERM", "stopped (the guest shuts down or reboots?)")])
        func anAgentThatGoesAwayEndsTheCommandSayingHow(signal: String, said: String) throws {
            try SharedGuest.require()
            let r = VC.run(["exec", name, "-n", "--", "sh", "-c", "echo bye; kill \(signal) $(pidof virtchan-agent); sleep 60"], timeout: 60)
            #expect(r.code == 125)
            #expect(r.stderr.contains("the agent in \(name) \(said)"), "\(r.stderr)")
            #expect(r.seconds < 30)
            let w = VC.run(["wait", name, "--timeout", "30"])
            #expect(w.code == 0, "\(w.stderr)")
            #expect(VC.run(["exec", name, "-n", "--", "true"]).code == 0)
        }

        private func restartAgent() {
            _ = VC.run(["exec", name, "-n", "--", "sh", "-c", "kill $(pidof virtchan-agent)"], timeout: 30)
            Thread.sleep(forTimeInterval: 0.5)
            _ = VC.run(["wait", name, "--timeout", "30"])
        }
    }
}
