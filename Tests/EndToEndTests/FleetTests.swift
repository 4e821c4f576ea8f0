import Foundation
import Testing

/// Four tiny guests booted by one `create`, shared by the fleet tests; each knows its own
/// number (in /tmp/n) and has its name as hostname.
enum FleetGuests {
    static let names = (1...4).map { "vctest-fleet-\($0)" }
    static let glob = "vctest-fleet-*"

    static let boot: Result<RunResult, SharedGuest.BootError> = {
        for n in names {
            _ = VC.run(["destroy", n, "--force"], timeout: 60)
            removeAtExit(n)
        }
        let r = VC.run(["create"] + names + ["--accel", "tcg", "--memory", "256"], timeout: 300)
        guard r.code == 0 else { return .failure(SharedGuest.BootError(message: "create failed (\(r.code)): \(r.stderr) \(r.out)")) }
        for (i, n) in names.enumerated() {
            let s = VC.run(["exec", n, "-n", "--", "sh", "-c", "hostname \(n); echo \(i) > /tmp/n"], timeout: 60)
            guard s.code == 0 else { return .failure(SharedGuest.BootError(message: "setting up \(n): \(s.stderr)")) }
        }
        return .success(r)
    }()

    static func require() throws -> RunResult {
        switch boot {
        case .failure(let e): throw e
        case .success(let r):
            // A test may have stopped one: start it again and wait for it.
            for n in names where !VC.virsh(["domstate", n]).out.contains("running") {
                _ = VC.virsh(["start", n])
                let w = VC.run(["wait", n, "--timeout", "120"], timeout: 150)
                if w.code != 0 { throw SharedGuest.BootError(message: "\(n) did not come back: \(w.stderr)") }
                _ = VC.run(["exec", n, "-n", "--", "sh", "-c", "hostname \(n); echo \(names.firstIndex(of: n)!) > /tmp/n"], timeout: 60)
            }
            return r
        }
    }
}

extension EndToEnd {
    /// Issue 13, item 1: one command on many domains.
    @Suite struct Fleet {
        let names = FleetGuests.names

        @Test func createBootsSeveralDomainsSideBySide() throws {
            let created = try FleetGuests.require()
            for n in names {
                #expect(created.out.contains("\(n) | Domain \(n) started"), "\(created.out)")
                #expect(created.out.contains("\(n) | Agent "), "\(created.out)")
                #expect(created.stderr.contains("virtchan: \(n)  ok ("), "\(created.stderr)")
            }
            #expect(created.stderr.contains("4 domains: 4 succeeded, 0 failed"))
        }

        @Test func execOnEveryDomainPrefixesLinesAndSumsUp() throws {
            _ = try FleetGuests.require()
            let r = VC.run(["exec", "--match", FleetGuests.glob, "--", "sh", "-c", "echo $(hostname); echo warn >&2; exit $(cat /tmp/n)"], timeout: 120)
            #expect(r.code == 1, "three of four exit non-zero: \(r.stderr)")
            for (i, n) in names.enumerated() {
                // Aligned: every name here is as long as the others.
                #expect(r.out.contains("\(n) | \(n)\n"), "\(r.out)")
                #expect(r.stderr.contains("\(n) | warn\n"))
                #expect(r.stderr.contains("virtchan: \(n)  " + (i == 0 ? "ok (" : "exit \(i) (")), "\(r.stderr)")
            }
            #expect(r.out.split(separator: "\n").count == 4, "nothing but the four lines on stdout")
            #expect(r.stderr.contains("4 domains: 1 succeeded, 3 failed"))

            let plain = VC.run(["exec", "--match", FleetGuests.glob, "--no-prefix", "--", "hostname"], timeout: 120)
            #expect(plain.code == 0)
            #expect(Set(plain.out.split(separator: "\n").map(String.init)) == Set(names))

            let json = VC.run(["exec", "--match", FleetGuests.glob, "--json", "--", "sh", "-c", "echo $(hostname); exit $(cat /tmp/n)"], timeout: 120)
            #expect(json.code == 1)
            let records = try #require(try JSONSerialization.jsonObject(with: Data(json.out.utf8)) as? [[String: Any]])
            #expect(records.map { $0["name"] as? String } == names)
            #expect(records.map { $0["exitCode"] as? Int } == [0, 1, 2, 3])
            #expect(records.map { $0["stdout"] as? String } == names.map { $0 + "\n" })
            #expect(records.allSatisfy { $0["uri"] as? String == "qemu:///system" && ($0["seconds"] as? Double ?? -1) >= 0 })
        }

        @Test func aDomainStoppedMidRunIsReportedAndHoldsUpNobody() throws {
            _ = try FleetGuests.require()
            let victim = names[2]
            let stopper = Thread {
                Thread.sleep(forTimeInterval: 1.5)
                _ = VC.virsh(["destroy", victim])
            }
            stopper.start()
            let r = VC.run(["exec", "--match", FleetGuests.glob, "--", "sh", "-c", "sleep 4; echo done"], timeout: 120)
            #expect(r.code == 1)
            #expect(r.seconds < 40, "the stopped one does not hold up the others")
            for n in names where n != victim {
                #expect(r.out.contains("\(n) | done"), "\(r.out)")
                #expect(r.stderr.contains("virtchan: \(n)  ok ("))
            }
            #expect(!r.out.contains("\(victim) | done"))
            #expect(r.stderr.contains("virtchan: \(victim)  failed: "), "\(r.stderr)")
            #expect(r.stderr.contains("4 domains: 3 succeeded, 1 failed"))

            // Stopped from the start: the summary says so, the others run.
            let again = VC.run(["ping", "--match", FleetGuests.glob, "-n", "1"], timeout: 60)
            #expect(again.code == 1)
            #expect(again.stderr.contains("virtchan: \(victim)  failed: domain \(victim) is not running"), "\(again.stderr)")
            #expect(again.stderr.contains("4 domains: 3 succeeded, 1 failed"))
        }

        @Test func pushWaitAndBootstrapStatusTakeSeveralDomains() throws {
            _ = try FleetGuests.require()
            let file = "/tmp/vctest-fleet-payload"
            var bytes = [UInt8](repeating: 0, count: 3 << 20)
            for i in bytes.indices { bytes[i] = UInt8(truncatingIfNeeded: i &* 2654435761 >> 13) }
            try Data(bytes).write(to: URL(fileURLWithPath: file))
            defer { unlink(file) }
            let pushed = VC.run(["push", names[0], names[1], names[3], file, "/tmp/payload"], timeout: 120)
            #expect(pushed.code == 0, "\(pushed.stderr)")
            #expect(pushed.out.contains("\(names[1]) | \(file) -> /tmp/payload: 3.0 MiB"), "\(pushed.out)")
            let sums = VC.run(["exec", names[0], names[1], names[3], "--no-prefix", "--", "sha256sum", "/tmp/payload"], timeout: 120)
            let local = VC.runProgram("/usr/bin/sha256sum", [file]).out.split(separator: " ")[0]
            #expect(sums.out.split(separator: "\n").map { $0.split(separator: " ")[0] } == [local, local, local])

            let waited = VC.run(["wait", "--match", FleetGuests.glob, "--timeout", "30"], timeout: 60)
            #expect(waited.code == 0, "\(waited.stderr)")
            for n in names { #expect(waited.out.contains("\(n) | Agent 0.1.0 in \(n) is ready")) }

            // None of them has a bootstrap: each is reported, and the command fails.
            let status = VC.run(["bootstrap", "status", "--match", FleetGuests.glob], timeout: 60)
            #expect(status.code == 1)
            for n in names { #expect(status.out.contains("\(n) | no bootstrap")) }
        }

        @Test func ctrlCEndsTheFleetAndTheGuestCommands() throws {
            _ = try FleetGuests.require()
            let bg = try Background(["exec", "--match", FleetGuests.glob, "--", "sh", "-c", "echo up; sleep 300"])
            #expect(eventually(30) { bg.seen.filter { $0.1.hasSuffix("| up") }.count == 4 })
            kill(bg.process.processIdentifier, SIGINT)
            #expect(bg.wait(10) == 130)
            for n in names {
                #expect(eventually(10) { !VC.run(["exec", n, "-n", "--", "ps"]).out.contains("sleep 300") }, "\(n)")
            }
        }

        @Test func badFleetUsageIsRefused() {
            let none = VC.run(["exec", "--match", "vctest-no-such-*", "--", "true"])
            #expect(none.code == 1)
            #expect(none.stderr.contains("no domain matches 'vctest-no-such-*'"), "\(none.stderr)")
            let tty = VC.run(["exec", "--all", "-t", "--", "true"])
            #expect(tty.code == 64)
            let stdin = VC.run(["push", "--all", "-", "/tmp/x"])
            #expect(stdin.code == 64)
            let parallel = VC.run(["ping", "--all", "--parallel", "0"])
            #expect(parallel.code == 64)
        }
    }
}
