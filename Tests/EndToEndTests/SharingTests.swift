import Foundation
import Testing
import VirtchanKit

/// The running session holders, as `virtchan holder list --json` reports them.
func holderRecords() -> [HolderRecord] {
    (try? JSONDecoder().decode([HolderRecord].self, from: VC.run(["holder", "list", "--json"]).stdout)) ?? []
}

extension EndToEnd {
    /// Issue 12: any number of virtchan processes on one domain at once, through the session
    /// holder that the first one starts.
    @Suite struct Sharing {
        let name = SharedGuest.name
        let work = "/tmp/vctest-sharing"

        init() throws {
            try? FileManager.default.removeItem(atPath: work)
            try FileManager.default.createDirectory(atPath: work, withIntermediateDirectories: true)
        }

        func holder() -> HolderRecord? {
            holderRecords().first { $0.domain == name && $0.uri == "qemu:///system" }
        }

        @Test func commandsRunSideBySide() throws {
            try SharedGuest.require()
            let src = "\(work)/push-src"
            try makeFile(src, size: (8 << 20) + 5)
            let guestFile = VC.guest("head -c 6291459 /dev/urandom > /tmp/sharing-pull && sha256sum /tmp/sharing-pull")
            let guestSum = String(guestFile.out.prefix(64))

            let slow = try Background(["exec", name, "-n", "--", "sh", "-c", "for i in 1 2 3 4 5 6; do echo a$i; sleep 0.5; done"])
            let tty = try Background(["exec", name, "-t", "-n", "--", "sh", "-c", "for i in 1 2 3; do echo b$i; sleep 0.5; done; tty"])
            #expect(eventually(20, interval: 0.05) { slow.seen.contains { $0.1 == "a1" } && tty.seen.contains { $0.1.hasPrefix("b1") } })
            let push = try Background(["push", name, src, "/tmp/sharing-push"])
            let pull = try Background(["pull", name, "/tmp/sharing-pull", "\(work)/pulled"])
            let ping = VC.run(["ping", name, "-n", "2"], timeout: 30)
            let info = VC.run(["info", name, "--json"], timeout: 30)
            // Both answered while the first command still ran: nobody waited for it.
            #expect(slow.isRunning)
            #expect(ping.code == 0, "\(ping.stderr)")
            #expect(info.code == 0, "\(info.stderr)")

            #expect(slow.wait(30) == 0)
            #expect(tty.wait(30) == 0)
            #expect(push.wait(60) == 0, "\(push.seen.map(\.1))")
            #expect(pull.wait(60) == 0, "\(pull.seen.map(\.1))")
            #expect(slow.seen.map(\.1) == ["a1", "a2", "a3", "a4", "a5", "a6"])
            // On a terminal, lines end in \r\n and may arrive in pieces: look at the text as a whole.
            let ttyText = tty.seen.map(\.1).joined(separator: "\n").replacingOccurrences(of: "\r", with: "")
            #expect(ttyText.contains("b3") && ttyText.contains("/dev/pts/"), "\(tty.seen.map(\.1))")
            for bg in [slow, tty, push, pull] { #expect(!bg.seen.contains { $0.1.contains("busy") }) }
            #expect(VC.guest("sha256sum /tmp/sharing-push").out.prefix(64) == sha256Hex(try Data(contentsOf: URL(fileURLWithPath: src))))
            #expect(sha256Hex(try Data(contentsOf: URL(fileURLWithPath: "\(work)/pulled"))) == guestSum)
            VC.guest("rm -f /tmp/sharing-push /tmp/sharing-pull")
        }

        /// A command whose process does not read its stdin holds back only its own input: with
        /// 32 MiB waiting to go in, other commands on the domain run meanwhile, and it ends as
        /// its process does.
        @Test func unreadStdinHoldsUpNoOtherCommand() throws {
            try SharedGuest.require()
            let input = "\(work)/unread-stdin"
            try makeFile(input, size: 32 << 20)
            let deaf = try Background(["exec", name, "--", "sh", "-c", "echo started; sleep 5; echo slept"], stdin: input)
            #expect(eventually(20, interval: 0.05) { deaf.seen.contains { $0.1 == "started" } })
            // Its input has been flowing since it started; give it time to pile up.
            usleep(500_000)
            let other = VC.run(["exec", name, "--", "echo", "other"], stdin: Data("ignored\n".utf8), timeout: 30)
            #expect(other.code == 0, "\(other.stderr)")
            #expect(other.out == "other\n")
            let ping = VC.run(["ping", name], timeout: 30)
            #expect(ping.code == 0, "\(ping.stderr)")
            // Both came back while the deaf command still slept: they did not wait behind it.
            #expect(deaf.isRunning)
            #expect(deaf.wait(30) == 0)
            #expect(deaf.seen.map(\.1) == ["started", "slept"])
        }

        /// Transfers take turns on the data channel, and the one that waits says so.
        @Test func transfersTakeTurnsAndTheWaitingOneSaysSo() throws {
            try SharedGuest.require()
            let src = "\(work)/big"
            try makeFile(src, size: 48 << 20)
            let pushes = try (1...3).map { try Background(["push", name, src, "/tmp/turn-\($0)"]) }
            for p in pushes { #expect(p.wait(120) == 0, "\(p.seen.map(\.1))") }
            let said = pushes.flatMap { $0.seen.map(\.1) }.filter { $0.contains("waiting for the data channel of \(name)") }
            #expect(!said.isEmpty)
            let sums = VC.guest("sha256sum /tmp/turn-1 /tmp/turn-2 /tmp/turn-3").out.split(separator: "\n").map { $0.prefix(64) }
            let want = sha256Hex(try Data(contentsOf: URL(fileURLWithPath: src)))
            #expect(sums.count == 3 && sums.allSatisfy { $0 == want })
            VC.guest("rm -f /tmp/turn-1 /tmp/turn-2 /tmp/turn-3")
        }

        /// A holder that dies costs its running commands a clear error, its stale socket is not
        /// taken for a live one, and the next command starts a new holder.
        @Test func aKilledHolderIsReplaced() throws {
            try SharedGuest.require()
            let bg = try Background(["exec", name, "-n", "--", "sh", "-c", "echo started $$; exec sleep 60"])
            #expect(eventually(20, interval: 0.05) { bg.seen.contains { $0.1.hasPrefix("started ") } })
            let pid = try #require(bg.seen.first { $0.1.hasPrefix("started ") }.map { String($0.1.dropFirst(8)) })
            let old = try #require(holder())
            kill(old.pid, SIGKILL)
            let code = bg.wait(20)
            #expect(code == 125)
            #expect(bg.seen.contains { $0.1.contains("virtchan: error:") && $0.1.contains("closed") }, "\(bg.seen.map(\.1))")
            #expect(FileManager.default.fileExists(atPath: old.socket), "the dead holder's socket is the stale one to skip")
            let next = VC.run(["exec", name, "-n", "--", "echo", "ok"], timeout: 30)
            #expect(next.code == 0, "\(next.stderr)")
            #expect(next.out == "ok\n")
            let replaced = try #require(holder())
            #expect(replaced.pid != old.pid)
            // The agent ended the command of the holder that died (by its pid: a sleep an
            // earlier test left behind when it killed the agent may still run).
            #expect(eventually(10) { VC.guest("kill -0 \(pid) 2>/dev/null && echo alive").out.isEmpty })
        }

        /// A command given just after the agent stopped (as at a shutdown or reboot: SIGTERM)
        /// runs on the next agent instead of failing: the agent says it stops, and the holder
        /// then holds new commands back until the next agent answers.
        @Test func aCommandRightAfterTheAgentStopsWaitsForTheNextOne() throws {
            try SharedGuest.require()
            #expect(VC.run(["ping", name, "-n", "1"]).code == 0)
            let log = try #require(holder()).socket + ".log"
            func stops() -> Int {
                ((try? String(contentsOfFile: log, encoding: .utf8)) ?? "").components(separatedBy: "the agent is stopping").count - 1
            }
            let before = stops()
            let r = VC.run(["exec", name, "-n", "--", "sh", "-c", "(sleep 0.3; kill $(pidof virtchan-agent)) >/dev/null 2>&1 &"])
            #expect(r.code == 0, "\(r.stderr)")
            #expect(eventually(10, interval: 0.01) { stops() > before }, "the holder never heard the agent stop")
            let next = VC.run(["exec", name, "-n", "--", "echo", "next"], timeout: 60)
            #expect(next.code == 0, "\(next.stderr)")
            #expect(next.out == "next\n")
        }

        @Test func persistZeroEndsTheHolderWithTheLastCommand() throws {
            try SharedGuest.require()
            _ = VC.run(["holder", "stop", name])
            let r = VC.run(["exec", name, "--persist", "0", "-n", "--", "true"])
            #expect(r.code == 0, "\(r.stderr)")
            #expect(eventually(5) { holder() == nil })
            let left = (try? FileManager.default.contentsOfDirectory(atPath: Hypervisor.holderDirectory)) ?? []
            #expect(!left.contains { $0.hasPrefix(name + "-") }, "left behind: \(left)")
        }

        @Test func stopEndsTheHolder() throws {
            try SharedGuest.require()
            #expect(VC.run(["ping", name, "-n", "1"]).code == 0)
            #expect(holder() != nil)
            let r = VC.run(["holder", "stop", name])
            #expect(r.code == 0)
            #expect(r.out.contains("Stopped the holder of \(name)"))
            #expect(holder() == nil)
            #expect(VC.run(["holder", "stop", name]).out.contains("No holder runs for \(name)"))
        }

        /// Even with the directory and socket opened to everyone, the holder serves no process
        /// of another user: it checks each client's credentials itself.
        @Test func anotherUsersProcessIsTurnedAway() throws {
            try SharedGuest.require()
            #expect(VC.run(["ping", name, "-n", "1"]).code == 0)
            let record = try #require(holder())
            let dir = Hypervisor.holderDirectory
            chmod(dir, 0o755)
            chmod(record.socket, 0o666)
            defer {
                chmod(dir, 0o700)
                chmod(record.socket, 0o600)
            }
            let hello = FrameEncoder.encode(Hello(nonce: Array(repeating: 7, count: 16), client: "intruder").frame(id: 0))
            let helloFile = "\(work)/hello"
            try Data(hello).write(to: URL(fileURLWithPath: helloFile))
            chmod(work, 0o755)
            chmod(helloFile, 0o644)
            let script = """
            import socket, sys
            s = socket.socket(socket.AF_UNIX); s.settimeout(3); s.connect(sys.argv[1])
            try:
                s.sendall(open(sys.argv[2], 'rb').read())
                got = s.recv(65536)
            except (BrokenPipeError, ConnectionResetError):
                got = b''
            except socket.timeout:
                got = b'timeout'
            print(len(got), got[:4])
            """
            let r = VC.runProgram("/usr/bin/setpriv", ["--reuid=65534", "--regid=65534", "--clear-groups",
                                                       "/usr/bin/python3", "-c", script, record.socket, helloFile], timeout: 20)
            #expect(r.code == 0, "\(r.stderr)")
            // Connected, then closed without a word: no helloAck ("VCHF") came back.
            #expect(r.out.hasPrefix("0 b''"), "\(r.out) \(r.stderr)")
            #expect(VC.run(["ping", name, "-n", "1"]).code == 0)
        }
    }
}
