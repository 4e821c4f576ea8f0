import Foundation
import Testing

private struct Status: Decodable {
    let script: String
    let sha256: String
    let state: String
    let exitCode: Int?
    let reason: String?
}

private func status(_ domain: String) -> Status? {
    let r = VC.run(["bootstrap", "status", domain, "--json"])
    return try? JSONDecoder().decode(Status.self, from: r.stdout)
}

extension EndToEnd {
    /// Issue 4: first-boot scripts over the channels, exactly once, state in the domain.
    @Suite struct FirstBoot {
        let dir = "/tmp/vctest-bootstrap"

        init() throws {
            try? FileManager.default.removeItem(atPath: dir)
            try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
            try """
            #!/bin/sh
            echo "step 1: $GREETING"
            sleep ${PAUSE:-2}
            n=$(cat /root/count 2>/dev/null || echo 0); echo $((n + 1)) > /root/count
            cp /etc/payload /root/proof
            echo "step 2"
            """.write(toFile: "\(dir)/good.sh", atomically: true, encoding: .utf8)
            try "#!/bin/sh\necho failing on purpose >&2\nexit 5\n".write(toFile: "\(dir)/bad.sh", atomically: true, encoding: .utf8)
            // Fails; once /root/kill-agent exists, it kills the agent under its own runner first.
            try """
            #!/bin/sh
            if [ -e /root/kill-agent ]; then echo "killing the agent"; kill -9 $(pidof virtchan-agent); sleep 60; fi
            echo failing on purpose >&2
            exit 5
            """.write(toFile: "\(dir)/flaky.sh", atomically: true, encoding: .utf8)
            try "payload-\(getpid())\n".write(toFile: "\(dir)/payload", atomically: true, encoding: .utf8)
        }

        @Test func bootstrapRunsLiveOnceAndIsRecorded() throws {
            let name = "vctest-boot"
            removeAtExit(name)
            _ = VC.run(["destroy", name, "--force"])
            let start = Date()
            let bg = try Background(["create", name, "--accel", "tcg", "--bootstrap", "\(dir)/good.sh",
                                     "--bootstrap-file", "\(dir)/payload:/etc/payload", "--bootstrap-env", "GREETING=hi there"])
            #expect(bg.wait(240) == 0, "\(bg.seen.map(\.1))")
            let lines = bg.seen
            let step1 = try #require(lines.first { $0.1 == "step 1: hi there" })
            let step2 = try #require(lines.first { $0.1 == "step 2" })
            // Output is live: the first line arrived while the script still slept.
            #expect(step2.0.timeIntervalSince(step1.0) > 1.5, "started \(start)")

            #expect(VC.run(["exec", name, "-n", "--", "cat", "/root/proof"]).out == "payload-\(getpid())\n")
            let s = try #require(status(name))
            #expect(s.state == "succeeded")
            #expect(s.exitCode == 0)
            #expect(s.script == "good.sh")
            #expect(s.sha256.count == 64)
            // The state lives in the domain itself.
            let dump = VC.virsh(["dumpxml", name]).out
            #expect(dump.contains("https://virtchan.dev/xmlns/domain/1"))
            #expect(dump.contains("state=\"succeeded\""))
            #expect(VC.run(["bootstrap", "log", name]).out.contains("step 2"))

            // A second run does nothing and says so.
            let again = VC.run(["bootstrap", "run", name])
            #expect(again.code == 0)
            #expect(again.out.contains("already succeeded"))
            #expect(VC.run(["exec", name, "-n", "--", "cat", "/root/count"]).out == "1\n")

            // Forced, it runs again.
            let forced = VC.run(["bootstrap", "run", name, "--force"])
            #expect(forced.code == 0, "\(forced.stderr)")
            #expect(VC.run(["exec", name, "-n", "--", "cat", "/root/count"]).out == "2\n")

            // A second runner is refused while one runs; a killed runner is detected.
            let runner = try Background(["bootstrap", "run", name, "--force"])
            #expect(eventually(60) { status(name)?.state == "running" })
            let second = VC.run(["bootstrap", "run", name, "--force"])
            #expect(second.code == 1)
            #expect(second.stderr.contains("already running"))
            kill(runner.process.processIdentifier, SIGKILL)
            _ = runner.wait(5)
            let after = try #require(status(name))
            #expect(after.state == "failed")
            #expect(after.reason?.contains("stopped before it finished") == true)

            // A hanging script is stopped by the timeout and marked failed.
            let slow = VC.run(["bootstrap", "run", name, "--force", "--timeout", "1"])
            #expect(slow.code == 124)
            #expect(status(name)?.state == "failed")
            #expect(status(name)?.reason?.contains("timed out") == true)

            let stateDir = "/var/lib/virtchan/domains/\(name)"
            #expect(FileManager.default.fileExists(atPath: stateDir + "/bootstrap/script"))
            #expect(VC.run(["destroy", name]).code == 0)
            #expect(!FileManager.default.fileExists(atPath: stateDir))
        }

        @Test func failingBootstrapAfterNoWait() throws {
            let name = "vctest-boot-fail"
            removeAtExit(name)
            _ = VC.run(["destroy", name, "--force"])
            let created = VC.run(["create", name, "--accel", "tcg", "--no-wait", "--bootstrap", "\(dir)/flaky.sh"])
            #expect(created.code == 0, "\(created.stderr)")
            #expect(created.out.contains("virtchan bootstrap run \(name)"))
            #expect(status(name)?.state == "pending")
            let run = VC.run(["bootstrap", "run", name])
            #expect(run.code == 5)
            #expect(run.stderr.contains("failing on purpose"))
            let s = try #require(status(name))
            #expect(s.state == "failed")
            #expect(s.exitCode == 5)
            #expect(VC.run(["bootstrap", "log", name]).out.contains("failing on purpose"))
            // The VM is left running for inspection.
            #expect(VC.run(["exec", name, "-n", "--", "touch", "/root/kill-agent"]).code == 0)

            // The agent vanishes mid-script: the runner gives up within its bound and says why.
            let vanished = VC.run(["bootstrap", "run", name, "--force"], timeout: 90)
            #expect(vanished.code == 1)
            #expect(vanished.out.contains("killing the agent"))
            #expect(vanished.stderr.contains("bootstrap of \(name) failed"))
            // The session holder hears the agent start again and says so at once.
            #expect(vanished.stderr.contains("the agent in \(name) restarted"), "\(vanished.stderr)")
            #expect(vanished.seconds < 45)
            let lost = try #require(status(name))
            #expect(lost.state == "failed")
            #expect(lost.reason?.contains("restarted") == true)
            // The guest's init restarts the agent, and the domain serves again.
            #expect(VC.run(["wait", name, "--timeout", "60"]).code == 0)
            #expect(VC.run(["exec", name, "-n", "--", "true"]).code == 0)
            #expect(VC.run(["destroy", name]).code == 0)
        }

        @Test func destroyOnFailureAndWaitDeliversAPendingBootstrap() throws {
            let failing = "vctest-boot-dof", pending = "vctest-boot-wait"
            removeAtExit(failing)
            removeAtExit(pending)
            _ = VC.run(["destroy", failing, "--force"])
            _ = VC.run(["destroy", pending, "--force"])
            let r = VC.run(["create", failing, "--accel", "tcg", "--bootstrap", "\(dir)/bad.sh", "--destroy-on-failure"])
            #expect(r.code == 5)
            #expect(r.stderr.contains("domain \(failing) destroyed"))
            #expect(VC.virsh(["domstate", failing]).code != 0)
            #expect(!FileManager.default.fileExists(atPath: "/var/lib/virtchan/domains/\(failing)"))

            #expect(VC.run(["create", pending, "--accel", "tcg", "--no-wait", "--bootstrap", "\(dir)/good.sh",
                            "--bootstrap-file", "\(dir)/payload:/etc/payload", "--bootstrap-env", "PAUSE=0"]).code == 0)
            #expect(status(pending)?.state == "pending")
            let w = VC.run(["wait", pending, "--timeout", "120"])
            #expect(w.code == 0, "\(w.stderr)")
            #expect(w.out.contains("step 2"))
            #expect(status(pending)?.state == "succeeded")
            #expect(VC.run(["destroy", pending]).code == 0)
        }

        @Test func badBootstrapInputIsRefusedBeforeDefining() {
            let missing = VC.run(["create", "vctest-boot-bad", "--bootstrap", "/no/such/script.sh"])
            #expect(missing.code == 1)
            #expect(missing.stderr.contains("cannot read the bootstrap script"))
            let badFile = VC.run(["create", "vctest-boot-bad", "--bootstrap", "\(dir)/good.sh", "--bootstrap-file", "/no/file:/etc/x"])
            #expect(badFile.code == 1)
            #expect(badFile.stderr.contains("does not exist"))
            #expect(VC.virsh(["domstate", "vctest-boot-bad"]).code != 0)
        }
    }
}
