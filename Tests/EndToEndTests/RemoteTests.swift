import Foundation
import Synchronization
import Testing
import VirtchanKit

/// This machine as a remote hypervisor of itself, on loopback: `Scripts/remote-host` makes
/// libvirtd listen on TCP and with TLS at 127.0.0.1 (with certificates made for the run) and
/// starts Debian's sshd on 127.0.0.1:2222 with a key made for the run, for the Remote suite
/// only, and undoes it after.
enum RemoteHost {
    static let script = VC.packageRoot + "/Scripts/remote-host"
    static let sshPort = 2222
    static let tcp = "qemu+tcp://127.0.0.1/system"
    static let ssh = "qemu+ssh://root@127.0.0.1:\(sshPort)/system?keyfile=/run/virtchan-remote-host/id&no_verify=1&no_tty=1"
    static let tls = "qemu+tls://127.0.0.1/system?pkipath=/run/virtchan-remote-host/pki"
    static let uris = [("tcp", tcp), ("tls", tls), ("ssh", ssh)]

    struct SetupError: Error, CustomStringConvertible {
        let description: String
    }

    static func shell(_ script: String, timeout: Double = 60) -> RunResult {
        VC.runProgram("/bin/sh", ["-c", script], timeout: timeout)
    }

    static func setUp() throws {
        _ = VC.run(["holder", "stop", "--all"])
        let r = VC.runProgram(script, ["up"], timeout: 120)
        guard r.code == 0, r.out.contains("ssh=\(ssh)"), r.out.contains("tls=\(tls)") else { throw SetupError(description: "Scripts/remote-host up failed: \(r.stderr) \(r.out)") }
    }

    /// Restarts the listening libvirtd.
    static func restartLibvirtd() throws {
        let r = VC.runProgram(script, ["restart"], timeout: 120)
        guard r.code == 0 else { throw SetupError(description: "Scripts/remote-host restart failed: \(r.stderr)") }
    }

    static func tearDown() {
        _ = VC.run(["holder", "stop", "--all"])
        _ = VC.runProgram(script, ["down"], timeout: 120)
    }
}

/// Runs the Remote suite between RemoteHost.setUp and tearDown.
struct RemoteHostScope: SuiteTrait, TestScoping {
    var isRecursive: Bool { false }

    func provideScope(for test: Test, testCase: Test.Case?,
                      performing function: @Sendable () async throws -> Void) async throws {
        try RemoteHost.setUp()
        defer { RemoteHost.tearDown() }
        try await function()
    }
}

extension EndToEnd {
    /// Issue 12: every command with --connect qemu+tcp://, qemu+tls:// and qemu+ssh://, through libvirt's own
    /// channel streams, with the session holder keeping the connection.
    @Suite(RemoteHostScope()) struct Remote {
        let name = SharedGuest.name
        let work = "/tmp/vctest-remote"

        init() throws {
            try? FileManager.default.removeItem(atPath: work)
            try FileManager.default.createDirectory(atPath: work, withIntermediateDirectories: true)
        }

        /// The shared guest is up, and no holder (of this machine's other URIs) keeps its
        /// channel: a channel takes one client, and here every URI reaches the same QEMU.
        func ready() throws {
            _ = VC.run(["holder", "stop", "--all"])
            try SharedGuest.require()
            _ = VC.run(["holder", "stop", "--all"])
        }

        /// A shell command in the shared guest, over `uri`.
        @discardableResult
        func guest(_ shell: String, over uri: String) -> RunResult {
            VC.run(["exec", "-c", uri, name, "-n", "--", "/bin/sh", "-c", shell], timeout: 120)
        }

        @Test(arguments: RemoteHost.uris)
        func execStreamsStdinAndExitCodes(transport: String, uri: String) throws {
            try ready()
            let r = VC.run(["exec", "-c", uri, name, "--", "sh", "-c", "cat; echo to-stderr >&2; exit 5"],
                           stdin: Data("through \(transport)\n".utf8), timeout: 60)
            #expect(r.code == 5, "\(r.stderr)")
            #expect(r.out == "through \(transport)\n")
            #expect(r.stderr.contains("to-stderr"))
            // Output streams as it is made, not at the end.
            let bg = try Background(["exec", "-c", uri, name, "-n", "--", "sh", "-c", "echo one; sleep 2; echo two"])
            #expect(eventually(20, interval: 0.05) { bg.seen.contains { $0.1 == "one" } })
            #expect(!bg.seen.contains { $0.1 == "two" })
            #expect(bg.wait(20) == 0)
            // The holder keeps the connection: it is the remote URI's, and it stays for the next command.
            #expect(holderRecords().contains { $0.uri == uri && $0.domain == name })
        }

        @Test(arguments: RemoteHost.uris)
        func ctrlCReachesTheGuestProcess(transport: String, uri: String) throws {
            try ready()
            let bg = try Background(["exec", "-c", uri, name, "-n", "--", "sh", "-c",
                                     "trap 'echo got-int; exit 7' INT; echo ready; while :; do sleep 0.2; done"])
            #expect(eventually(30) { bg.seen.contains { $0.1 == "ready" } })
            kill(bg.process.processIdentifier, SIGINT)
            #expect(bg.wait(20) == 7)
            #expect(bg.seen.contains { $0.1 == "got-int" })
        }

        @Test(arguments: RemoteHost.uris)
        func pushAndPullAreByteExactAtAwkwardSizes(transport: String, uri: String) throws {
            try ready()
            for size in [0, 1, 262_143, 262_145, (3 << 20) + 7] {
                let src = "\(work)/\(transport)-\(size)"
                try makeFile(src, size: size)
                let push = VC.run(["push", "-c", uri, name, src, "/tmp/remote-\(size)"], timeout: 60)
                #expect(push.code == 0, "\(push.stderr)")
                let pull = VC.run(["pull", "-c", uri, name, "/tmp/remote-\(size)", src + ".back"], timeout: 60)
                #expect(pull.code == 0, "\(pull.stderr)")
                #expect(sameBytes(src, src + ".back"), "\(size) bytes over \(transport)")
            }
            guest("rm -f /tmp/remote-*", over: uri)
        }

        @Test(arguments: RemoteHost.uris)
        func commandsRunSideBySide(transport: String, uri: String) throws {
            try ready()
            let src = "\(work)/side-\(transport)"
            try makeFile(src, size: 16 << 20)
            let slow = try Background(["exec", "-c", uri, name, "-n", "--", "sh", "-c", "for i in 1 2 3 4; do echo s$i; sleep 0.5; done"])
            #expect(eventually(30, interval: 0.05) { slow.seen.contains { $0.1 == "s1" } })
            let push1 = try Background(["push", "-c", uri, name, src, "/tmp/side-1"])
            let push2 = try Background(["push", "-c", uri, name, src, "/tmp/side-2"])
            let ping = VC.run(["ping", "-c", uri, name, "-n", "1"], timeout: 30)
            #expect(ping.code == 0, "\(ping.stderr)")
            #expect(slow.isRunning)
            #expect(slow.wait(30) == 0)
            #expect(push1.wait(60) == 0, "\(push1.seen.map(\.1))")
            #expect(push2.wait(60) == 0, "\(push2.seen.map(\.1))")
            #expect(slow.seen.map(\.1) == ["s1", "s2", "s3", "s4"])
            let want = sha256Hex(try Data(contentsOf: URL(fileURLWithPath: src)))
            let sums = guest("sha256sum /tmp/side-1 /tmp/side-2", over: uri).out.split(separator: "\n").map { String($0.prefix(64)) }
            #expect(sums == [want, want])
            guest("rm -f /tmp/side-1 /tmp/side-2", over: uri)
        }

        /// A remote command never uses the local endpoint cache, and never writes it.
        /// A fleet command over ssh starts a holder, and so an ssh connection, per domain, all at
        /// once; this sshd sets up only 2 connections at a time and turns the others away (as a
        /// busy server does, see Scripts/remote-host). Every domain still answers, each under the
        /// ssh URI.
        @Test func aFleetOverSSHReachesEveryDomain() throws {
            _ = try FleetGuests.require()
            _ = VC.run(["holder", "stop", "--all"])
            let r = VC.run(["exec", "-c", RemoteHost.ssh, "--match", FleetGuests.glob, "--json", "--", "hostname"], timeout: 240)
            #expect(r.code == 0, "\(r.stderr) \(r.out)")
            let records = try #require(try JSONSerialization.jsonObject(with: Data(r.out.utf8)) as? [[String: Any]])
            #expect(records.map { $0["name"] as? String } == FleetGuests.names)
            #expect(records.map { $0["stdout"] as? String } == FleetGuests.names.map { $0 + "\n" })
            #expect(records.allSatisfy { $0["uri"] as? String == RemoteHost.ssh && $0["exitCode"] as? Int == 0 })
            _ = VC.run(["holder", "stop", "--all"])
        }

        @Test func theLocalEndpointCacheIsLeftAlone() throws {
            try ready()
            let entry = "/run/virtchan/endpoints/\(name)"
            try? FileManager.default.removeItem(atPath: entry)
            #expect(VC.run(["exec", "-c", RemoteHost.tcp, name, "--", "true"]).code == 0)
            #expect(!FileManager.default.fileExists(atPath: entry))
        }

        /// The ssh connection dies mid-transfer: the pull fails with a clear error within its
        /// bound and leaves no partial file; the next command opens a new connection.
        @Test func sshDyingMidPullLeavesNothing() throws {
            try ready()
            guest("head -c 134217728 /dev/zero > /tmp/remote-big", over: RemoteHost.ssh)
            let dest = "\(work)/big-pulled"
            let bg = try Background(["pull", "-c", RemoteHost.ssh, name, "/tmp/remote-big", dest])
            #expect(eventually(30, interval: 0.02) {
                ((try? FileManager.default.contentsOfDirectory(atPath: work)) ?? []).contains { $0.contains("big-pulled") }
            })
            // The ssh client the holder runs for its libvirt connection.
            let killed = RemoteHost.shell("n=0; for p in $(pgrep -x ssh); do if tr '\\0' ' ' < /proc/$p/cmdline | grep -q '\(RemoteHost.sshPort)'; then kill -9 $p && n=$((n + 1)); fi; done; [ $n -gt 0 ]")
            #expect(killed.code == 0, "no ssh client found to kill")
            let code = bg.wait(60)
            #expect(code == 1, "the pull should fail within its bound: \(bg.seen.map(\.1))")
            #expect(bg.seen.contains { $0.1.contains("virtchan: error:") })
            let leftovers = try FileManager.default.contentsOfDirectory(atPath: work).filter { $0.contains("big-pulled") }
            #expect(leftovers.isEmpty, "left behind: \(leftovers)")
            let again = VC.run(["exec", "-c", RemoteHost.ssh, name, "--", "echo", "back"], timeout: 60)
            #expect(again.code == 0, "\(again.stderr)")
            #expect(again.out == "back\n")
            guest("rm -f /tmp/remote-big", over: RemoteHost.ssh)
        }

        /// The ssh link goes silent mid-transfer (its packets dropped, as on a network that went
        /// away without a word): the pull fails within its bound, says the link may be down and
        /// leaves no partial file; once the link is back, commands work again.
        @Test func aSilentSSHLinkMidPullLeavesNothing() throws {
            try ready()
            guest("head -c 268435456 /dev/zero > /tmp/remote-big", over: RemoteHost.ssh)
            let dest = "\(work)/silent-pulled"
            let rules = ["--dport", "--sport"].map { ["INPUT", "-i", "lo", "-p", "tcp", $0, "\(RemoteHost.sshPort)", "-j", "DROP"] }
            defer { for rule in rules { _ = VC.runProgram("/usr/sbin/iptables", ["-D"] + rule) } }
            let bg = try Background(["pull", "-c", RemoteHost.ssh, name, "/tmp/remote-big", dest])
            #expect(eventually(30, interval: 0.02) {
                ((try? FileManager.default.contentsOfDirectory(atPath: work)) ?? []).contains { $0.contains("silent-pulled") }
            })
            for rule in rules {
                let r = VC.runProgram("/usr/sbin/iptables", ["-I"] + rule)
                #expect(r.code == 0, "iptables: \(r.stderr)")
            }
            let start = Date()
            let code = bg.wait(90)
            #expect(code == 1, "the pull should fail within its bound: \(bg.seen.map(\.1))")
            #expect(Date().timeIntervalSince(start) < 45)
            #expect(bg.seen.contains { $0.1.contains("over \(RemoteHost.ssh), and that link may be down") }, "\(bg.seen.map(\.1))")
            let leftovers = try FileManager.default.contentsOfDirectory(atPath: work).filter { $0.contains("silent-pulled") }
            #expect(leftovers.isEmpty, "left behind: \(leftovers)")
            for rule in rules { _ = VC.runProgram("/usr/sbin/iptables", ["-D"] + rule) }
            #expect(eventually(120, interval: 1) {
                VC.run(["exec", "-c", RemoteHost.ssh, name, "--", "echo", "back"], timeout: 60).out == "back\n"
            })
            guest("rm -f /tmp/remote-big", over: RemoteHost.ssh)
        }

        /// libvirtd restarts under a holder: its command ends with a clear error, and the next
        /// command works once libvirtd is back.
        @Test func libvirtdRestartingUnderAHolder() throws {
            try ready()
            let bg = try Background(["exec", "-c", RemoteHost.tcp, name, "-n", "--", "sh", "-c", "echo started; sleep 30"])
            #expect(eventually(30, interval: 0.05) { bg.seen.contains { $0.1 == "started" } })
            try RemoteHost.restartLibvirtd()
            let code = bg.wait(30)
            #expect(code == 125, "\(bg.seen.map(\.1))")
            #expect(bg.seen.contains { $0.1.contains("virtchan: error:") })
            let again = VC.run(["exec", "-c", RemoteHost.tcp, name, "--", "echo", "back"], timeout: 60)
            #expect(again.code == 0, "\(again.stderr)")
            #expect(again.out == "back\n")
        }

        /// A libvirtd that stops answering (stopped here with SIGSTOP; a hung daemon or a link
        /// that went down without a word looks the same) fails what waits on it within a bound,
        /// and says so: opening a connection, over this host's socket and over TCP, and a call
        /// on a connection opened before it fell silent. exec through a live holder of this
        /// host needs no libvirt and goes on; once libvirtd resumes, everything works again.
        @Test func aLibvirtdThatStopsAnsweringFailsWhatWaitsOnItInTime() throws {
            try ready()
            #expect(VC.run(["exec", name, "-n", "--", "true"]).code == 0)
            let pid = try #require(Int32(RemoteHost.shell("pgrep -x libvirtd").out.trimmingCharacters(in: .whitespacesAndNewlines)))
            let open = try Connection(uri: RemoteHost.tcp)
            #expect(kill(pid, SIGSTOP) == 0)
            var resumed = false
            defer { if !resumed { kill(pid, SIGCONT) } }
            for uri in ["qemu:///system", RemoteHost.tcp] {
                let r = VC.run(["list", "-c", uri], timeout: 60, environment: ["VIRTCHAN_CONNECT_TIMEOUT": "3"])
                #expect(r.code == 1, "\(uri): \(r.out)")
                #expect(r.stderr.contains("cannot connect to \(uri): libvirtd did not answer within 3 s"), "\(r.stderr)")
                #expect(r.seconds < 15)
            }
            let held = VC.run(["exec", name, "-n", "--", "echo", "still"], timeout: 30)
            #expect(held.out == "still\n", "\(held.stderr)")
            // On a thread, so that a call that never returns fails the test rather than hang it.
            let outcome = Mutex<String?>(nil)
            let returned = DispatchSemaphore(value: 0)
            Thread.detachNewThread {
                do {
                    _ = try open.allDomains()
                    outcome.withLock { $0 = "listed" }
                } catch {
                    outcome.withLock { $0 = "\(error)" }
                }
                returned.signal()
            }
            #expect(returned.wait(timeout: .now() + 40) == .success, "a call on the open connection still waits after 40 s")
            let message = outcome.withLock { $0 } ?? ""
            #expect(message.contains("libvirtd stopped answering"), "\(message)")
            kill(pid, SIGCONT)
            resumed = true
            #expect(eventually(30, interval: 0.5) { VC.run(["list", "-c", RemoteHost.tcp], timeout: 30).code == 0 })
            #expect(VC.run(["list"], timeout: 30).out.contains(name))
        }

        @Test func bootstrapRunsOverEveryTransport() throws {
            let domain = "vctest-remote-boot"
            removeAtExit(domain)
            _ = VC.run(["destroy", domain, "--force"])
            let script = "\(work)/boot.sh"
            try "#!/bin/sh\nn=$(cat /root/runs 2>/dev/null || echo 0); echo $((n + 1)) > /root/runs; echo \"run $((n + 1))\"\n"
                .write(toFile: script, atomically: true, encoding: .utf8)
            let created = VC.run(["create", domain, "--accel", "tcg", "--bootstrap", script], timeout: 240)
            #expect(created.code == 0, "\(created.stderr)")
            #expect(created.out.contains("run 1"))
            _ = VC.run(["holder", "stop", "--all"])
            for (i, (transport, uri)) in RemoteHost.uris.enumerated() {
                let r = VC.run(["bootstrap", "run", "-c", uri, domain, "--force"], timeout: 120)
                #expect(r.code == 0, "\(transport): \(r.stderr)")
                #expect(r.out.contains("run \(i + 2)"), "\(transport): \(r.out)")
                let status = VC.run(["bootstrap", "status", "-c", uri, domain])
                #expect(status.out.contains("succeeded"), "\(transport): \(status.out)")
                _ = VC.run(["holder", "stop", "--all"])
            }
            #expect(VC.run(["destroy", domain]).code == 0)
        }

        /// This machine as qemu:///system and as qemu+tcp://127.0.0.1 reaches one QEMU, whose
        /// channel takes one client: the second holder fails within its bound and names the first.
        @Test func aHolderOfAnotherURIIsNamedWhenItKeepsTheChannel() throws {
            try ready()
            #expect(VC.run(["ping", name, "-n", "1"]).code == 0)
            let r = VC.run(["ping", "-c", RemoteHost.tcp, name, "-n", "1"], timeout: 60)
            #expect(r.code == 1)
            #expect(r.stderr.contains("virtchan holder stop --connect qemu:///system \(name)"), "\(r.stderr)")
            #expect(r.seconds < 30)
            // Commands started together wait for the one holder the first of them starts; when
            // it cannot serve, each of them says why, as that one does.
            let together = Mutex<[RunResult]>([])
            DispatchQueue.concurrentPerform(iterations: 3) { _ in
                let attempt = VC.run(["ping", "-c", RemoteHost.tcp, name, "-n", "1"], timeout: 60)
                together.withLock { $0.append(attempt) }
            }
            for attempt in together.withLock({ $0 }) {
                #expect(attempt.code == 1)
                #expect(attempt.stderr.contains("virtchan holder stop --connect qemu:///system \(name)"), "\(attempt.stderr)")
                #expect(attempt.seconds < 30)
            }
            let holders = VC.run(["holder", "list", "--json"]).out
            #expect(!holders.contains(RemoteHost.tcp), "no holder of the other URI is left: \(holders)")
            _ = VC.run(["holder", "stop", "--all"])
            #expect(VC.run(["ping", "-c", RemoteHost.ssh, name, "-n", "1"]).code == 0)
            // Between two remote URIs libvirtd refuses the second stream at once; the holder
            // that keeps it is named all the same, in a command that runs as it is printed.
            let other = VC.run(["ping", "-c", RemoteHost.tcp, name, "-n", "1"], timeout: 60)
            #expect(other.code == 1)
            #expect(other.seconds < 30)
            let suggested = other.stderr.components(separatedBy: "stop it with: ").last?.split(separator: "\n").first.map(String.init) ?? ""
            #expect(suggested == "virtchan holder stop --connect '\(RemoteHost.ssh)' \(name)", "\(other.stderr)")
            let stopped = RemoteHost.shell("'\(VC.binary)'" + suggested.dropFirst("virtchan".count))
            #expect(stopped.code == 0 && stopped.out.contains("Stopped"), "\(suggested): \(stopped.out) \(stopped.stderr)")
            #expect(VC.run(["ping", "-c", RemoteHost.tcp, name, "-n", "1"]).code == 0)
            _ = VC.run(["holder", "stop", "--all"])
        }

        /// While this host keeps the channel, each remote attempt leaves a connection waiting in
        /// QEMU's short backlog; once that is full, libvirtd's open of the channel waits, holding
        /// the domain. Every attempt still ends within its bound and says why; and once the
        /// channel is let go, no process of those attempts is left, libvirt answers about the
        /// domain, and no stream of the channel is left in libvirtd ("Active channel stream
        /// exists"), so both URIs work again.
        @Test func attemptsWhileTheChannelIsKeptEndInTimeAndLeaveNothing() throws {
            try ready()
            #expect(VC.run(["ping", name, "-n", "1", "--persist", "300"]).code == 0)
            var messages: [String] = []
            for _ in 0..<5 {
                let r = VC.run(["wait", "-c", RemoteHost.tcp, name, "--timeout", "3"], timeout: 60)
                #expect(r.code == 1)
                #expect(r.seconds < 15, "\(r.stderr)")
                messages.append(r.stderr)
                if r.stderr.contains("did not open channel") { break }
            }
            #expect(messages.last?.contains("libvirt on \(RemoteHost.tcp) did not open channel org.virtchan.control of \(name) within 3 s") == true,
                    "\(messages)")
            #expect(messages.dropLast().allSatisfy { $0.contains("virtchan holder stop --connect qemu:///system \(name)") }, "\(messages)")
            let attempts = "pgrep -f -- 'wait -c \(RemoteHost.tcp.replacingOccurrences(of: "+", with: "\\+"))'"
            #expect(RemoteHost.shell(attempts).code == 0, "the attempt whose open libvirt still runs waits for it")
            _ = VC.run(["holder", "stop", "--all"])
            #expect(eventually(30) { RemoteHost.shell(attempts).code == 1 })
            #expect(RemoteHost.shell("virsh -c qemu:///system domstate \(name)", timeout: 10).out.contains("running"))
            let remote = VC.run(["ping", "-c", RemoteHost.tcp, name, "-n", "1", "--persist", "0"], timeout: 60)
            #expect(remote.code == 0, "\(remote.stderr)")
            let local = VC.run(["ping", name, "-n", "1", "--persist", "0"], timeout: 60)
            #expect(local.code == 0, "\(local.stderr)")
        }

        /// create over each transport: the kernel and the domain's initramfs go up as volumes of
        /// the pool 'virtchan', the key stays here, the first-boot script runs, and destroy takes
        /// the domain's volume and state away but leaves the shared kernel.
        @Test(arguments: RemoteHost.uris)
        func createUploadsWhatTheDomainBoots(transport: String, uri: String) throws {
            let domain = "vctest-remote-create-\(transport)"
            removeAtExit(domain)
            _ = VC.run(["destroy", domain, "--force"])
            let script = "\(work)/first-\(transport).sh"
            try "#!/bin/sh\necho \"first boot of $(hostname) over \(transport)\"\n".write(toFile: script, atomically: true, encoding: .utf8)
            let created = VC.run(["create", "-c", uri, domain, "--accel", "tcg", "--bootstrap", script], timeout: 240)
            #expect(created.code == 0, "\(created.stderr)")
            #expect(created.out.contains("first boot of virtchan-guest over \(transport)"), "\(created.out)")
            #expect(created.stderr.contains("uploading the initramfs of \(domain) to the storage pool virtchan"), "\(created.stderr)")
            let volumes = VC.virsh(["vol-list", "virtchan"]).out
            #expect(volumes.contains("/var/lib/virtchan/pool/\(domain).initrd"), "\(volumes)")
            let xml = VC.virsh(["dumpxml", domain]).out
            #expect(xml.contains("<initrd>/var/lib/virtchan/pool/\(domain).initrd</initrd>"))
            #expect(xml.contains("<serial type='pty'>"), "the console is reachable with virsh console")
            #expect(FileManager.default.fileExists(atPath: "/var/lib/virtchan/domains/\(domain)/agent.key"), "the key stays on this host")
            #expect(!FileManager.default.fileExists(atPath: "/var/lib/virtchan/boot/\(domain).initrd"), "no local copy of the keyed initramfs")

            let r = VC.run(["exec", "-c", uri, domain, "--", "sh", "-c", "cat; exit 5"], stdin: Data("through \(transport)\n".utf8), timeout: 60)
            #expect(r.code == 5, "\(r.stderr)")
            #expect(r.out == "through \(transport)\n")

            let destroyed = VC.run(["destroy", "-c", uri, domain], timeout: 60)
            #expect(destroyed.code == 0, "\(destroyed.stderr)")
            #expect(VC.virsh(["dominfo", domain]).code != 0, "the domain is gone")
            let left = VC.virsh(["vol-list", "virtchan"]).out
            #expect(!left.contains("\(domain).initrd"), "\(left)")
            #expect(left.contains("/var/lib/virtchan/pool/boot-"), "the shared kernel stays for the next create")
            // The command destroy suggests runs as it is printed, whatever the URI holds.
            let suggested = destroyed.out.components(separatedBy: "no domain uses with: ").dropFirst().first?.split(separator: "\n").first ?? ""
            #expect(suggested.hasPrefix("virtchan prune -c "), "destroy says how the upload goes: \(destroyed.out)")
            let dryRun = RemoteHost.shell("'\(VC.binary)'" + suggested.dropFirst("virtchan".count) + " --dry-run")
            #expect(dryRun.code == 0 && dryRun.out.contains("storage pool virtchan"), "\(suggested): \(dryRun.out) \(dryRun.stderr)")
            #expect(!FileManager.default.fileExists(atPath: "/var/lib/virtchan/domains/\(domain)"))
            #expect(VC.run(["holder", "list"]).out.contains(domain) == false)
        }

        /// A create on another host whose agent does not answer in time leaves the domain there
        /// for a look, and the command it suggests removes that domain, not a namesake here.
        @Test func aDomainLeftRunningElsewhereIsRemovedByTheCommandGiven() throws {
            let domain = "vctest-remote-left"
            removeAtExit(domain)
            _ = VC.run(["destroy", domain, "--force"])
            let created = VC.run(["create", "-c", RemoteHost.ssh, domain, "--accel", "tcg", "--timeout", "1"], timeout: 240)
            #expect(created.code == 1, "\(created.stderr)")
            let suggested = created.stderr.components(separatedBy: "remove it with: ").dropFirst().first?.split(separator: ")").first ?? ""
            #expect(suggested == "virtchan destroy -c '\(RemoteHost.ssh)' \(domain)", "\(created.stderr)")
            let removed = RemoteHost.shell("'\(VC.binary)'" + suggested.dropFirst("virtchan".count))
            #expect(removed.code == 0, "\(suggested): \(removed.stderr)")
            #expect(VC.virsh(["dominfo", domain]).code != 0, "the domain is gone")
        }

        @Test(arguments: RemoteHost.uris)
        func aForwardedPortWorksOverTheTransport(transport: String, uri: String) throws {
            try ready()
            #expect(guest("mkdir -p /tmp/rfw; echo 'over \(transport)' > /tmp/rfw/x; ln -sf /bin/busybox /tmp/httpd; /tmp/httpd -p 127.0.0.1:8081 -h /tmp/rfw 2>/dev/null; true", over: uri).code == 0)
            let forward = try RunningForward(["-c", uri, "0:127.0.0.1:8081"])
            defer { _ = forward.stop() }
            let port = try #require(forward.ports.first)
            let r = VC.runProgram("/usr/bin/curl", ["-sS", "--max-time", "30", "http://127.0.0.1:\(port)/x"], timeout: 60)
            #expect(r.code == 0, "\(r.stderr)")
            #expect(r.out == "over \(transport)\n")
            #expect(forward.stop() == 130)

            // In the background: serves after the command returned, until --stop on that URI.
            let background = VC.run(["forward", "-c", uri, SharedGuest.name, "0:127.0.0.1:8081", "--background"], timeout: 60)
            #expect(background.code == 0, "\(background.stderr)")
            let served = try #require(forwardedPort(background.out))
            let b = VC.runProgram("/usr/bin/curl", ["-sS", "--max-time", "30", "http://127.0.0.1:\(served)/x"], timeout: 60)
            #expect(b.out == "over \(transport)\n", "\(b.stderr)")
            let stopped = VC.run(["forward", "--stop", "-c", uri, SharedGuest.name])
            #expect(stopped.out.contains("Stopped forwarding 127.0.0.1:\(served)"), "\(stopped.out) \(stopped.stderr)")
            _ = VC.run(["holder", "stop", "--all"])
        }

        /// create --image over qemu+tcp: the base image goes up once, named by its digest, and the
        /// overlay and seed are made there; the agent answers from the distro stand-in, and
        /// destroy takes the domain's own volumes but leaves the shared base.
        @Test func aCloudImageIsUploadedAndBootsOnTheOtherHost() throws {
            let image = CloudGuest.image
            try #require(FileManager.default.fileExists(atPath: image), "no \(image); Scripts/build-cloud-image builds it")
            let domain = "vctest-remote-image"
            removeAtExit(domain)
            _ = VC.run(["destroy", domain, "--force"])
            let created = VC.run(["create", "-c", RemoteHost.tcp, domain, "--image", image, "--accel", "tcg", "--timeout", "400"], timeout: 500)
            #expect(created.code == 0, "\(created.stderr)")
            #expect(created.stderr.contains("uploading \(image)"), "\(created.stderr)")
            let volumes = VC.virsh(["vol-list", "virtchan"]).out
            for own in [".qcow2", ".seed.iso"] { #expect(volumes.contains("/var/lib/virtchan/pool/\(domain)\(own)"), "\(volumes)") }
            let base = try #require(volumes.split(separator: "\n").compactMap { line in
                line.split(separator: " ").first.map(String.init).flatMap { $0.hasPrefix("base-") && !$0.hasSuffix(".complete") ? $0 : nil }
            }.first, "\(volumes)")
            let os = VC.run(["exec", "-c", RemoteHost.tcp, domain, "--", "sh", "-c", ". /etc/os-release; echo $PRETTY_NAME"], timeout: 60)
            #expect(os.out == "Debian GNU/Linux 12 (bookworm)\n", "\(os.stderr)")
            // While the domain's overlay reads the base, prune leaves both, at any age.
            let inUse = VC.run(["prune", "-c", RemoteHost.tcp, "--min-age", "0", "--dry-run"], timeout: 60)
            #expect(inUse.code == 0, "\(inUse.stderr)")
            #expect(!inUse.out.contains(base) && !inUse.out.contains("\(domain)."), "\(inUse.out)")

            #expect(VC.run(["destroy", "-c", RemoteHost.tcp, domain], timeout: 60).code == 0)
            let left = VC.virsh(["vol-list", "virtchan"]).out
            #expect(!left.contains("\(domain)."), "\(left)")
            #expect(left.contains(base), "the shared base stays for the next create")
            // Just uploaded: kept unless asked; then it goes, with its marker, over the transport.
            let recent = VC.run(["prune", "-c", RemoteHost.tcp], timeout: 60)
            #expect(recent.out.contains("Kept ") && recent.out.contains(base), "\(recent.out)")
            let pruned = VC.run(["prune", "-c", RemoteHost.tcp, "--min-age", "0"], timeout: 60)
            #expect(pruned.code == 0, "\(pruned.stderr)")
            #expect(pruned.out.contains("\(base)  ") && pruned.out.contains("a base image no overlay reads"), "\(pruned.out)")
            let after = VC.virsh(["vol-list", "virtchan"]).out
            #expect(!after.contains(base), "\(after)")
        }

        /// `create --image --no-wait` of `domain` over TCP, started in the background after
        /// prune has taken every unused volume, so that the base image goes up again.
        func createUploadingTheBase(_ domain: String) throws -> Background {
            let image = CloudGuest.image
            try #require(FileManager.default.fileExists(atPath: image), "no \(image); Scripts/build-cloud-image builds it")
            removeAtExit(domain)
            _ = VC.run(["destroy", "-c", RemoteHost.tcp, domain, "--force"])
            _ = VC.run(["prune", "-c", RemoteHost.tcp, "--min-age", "0"], timeout: 60)
            return try Background(["create", "-c", RemoteHost.tcp, domain, "--image", image, "--accel", "tcg", "--no-wait"])
        }

        /// prune at its default minimum age, run over and over while a create on the same host
        /// uploads a base image and makes the domain's volumes, takes none of them: what is being
        /// written, or was just written, stays. Once the domain is gone they all go.
        @Test func pruneDuringACreateLeavesItAlone() throws {
            let domain = "vctest-remote-prune-race"
            let create = try createUploadingTheBase(domain)
            var prunes = 0
            while create.isRunning && prunes < 200 {
                let r = VC.run(["prune", "-c", RemoteHost.tcp], timeout: 60)
                #expect(r.code == 0, "\(r.stderr)")
                #expect(!r.out.contains("Removed"), "\(r.out)")
                prunes += 1
            }
            #expect(create.wait(60) == 0, "\(create.seen.map(\.1))")
            #expect(prunes >= 2, "the create ended before prune could run beside it")
            let volumes = VC.virsh(["vol-list", "virtchan"]).out
            for own in [".qcow2", ".seed.iso"] { #expect(volumes.contains("/var/lib/virtchan/pool/\(domain)\(own)"), "\(volumes)") }
            #expect(volumes.contains("/var/lib/virtchan/pool/base-"), "\(volumes)")
            #expect(VC.virsh(["domstate", domain]).out.hasPrefix("running"))

            #expect(VC.run(["destroy", "-c", RemoteHost.tcp, domain], timeout: 60).code == 0)
            let pruned = VC.run(["prune", "-c", RemoteHost.tcp, "--min-age", "0"], timeout: 60)
            #expect(pruned.code == 0, "\(pruned.stderr)")
            #expect(!VC.virsh(["vol-list", "virtchan"]).out.contains("/var/lib/virtchan/pool/base-"))
        }

        /// Ctrl-C while a create uploads a base image to the other host stops the upload within
        /// a chunk and takes back everything the create made there and here.
        @Test func ctrlCDuringAnUploadLeavesNothingThere() throws {
            let domain = "vctest-remote-interrupted"
            let create = try createUploadingTheBase(domain)
            #expect(eventually(60, interval: 0.01) { create.seen.contains { $0.1.contains("uploading \(CloudGuest.image)") } })
            kill(create.process.processIdentifier, SIGINT)
            #expect(create.wait(30) == 130)
            let said = create.seen.map(\.1).joined(separator: "\n")
            #expect(said.contains("interrupted by SIGINT while \(domain) was being created; nothing of it is left"), "\(said)")
            #expect(VC.virsh(["dominfo", domain]).code != 0)
            let volumes = VC.virsh(["vol-list", "virtchan"]).out
            #expect(!volumes.contains("/var/lib/virtchan/pool/base-"), "no part of the upload stays: \(volumes)")
            #expect(!volumes.contains(domain), "\(volumes)")
            #expect(!FileManager.default.fileExists(atPath: "/var/lib/virtchan/domains/\(domain)"))
        }

        /// Through the library, create over TCP reports each upload's bytes as they go: one
        /// rising count per upload, each ending at the size of the file it sends (the kernel,
        /// uploaded again once prune has removed it, and the domain's initramfs).
        @Test func uploadsReportTheirBytesAsTheyGo() throws {
            let domain = "vctest-remote-uploads"
            removeAtExit(domain)
            _ = VC.run(["destroy", "-c", RemoteHost.tcp, domain, "--force"])
            _ = VC.run(["prune", "-c", RemoteHost.tcp, "--min-age", "0"], timeout: 60)
            let hypervisor = Hypervisor(uri: RemoteHost.tcp)
            var request = MachineRequest(name: domain)
            request.accelerator = .tcg
            let calls = Mutex<[(UInt64, UInt64)]>([])
            let lines = Mutex<[String]>([])
            _ = try hypervisor.create(request, progress: { line in lines.withLock { $0.append(line) } },
                                      uploaded: { done, total in calls.withLock { $0.append((done, total)) } })
            defer {
                try? hypervisor.destroy(domain)
                // The kernel it uploaded goes too: the run leaves no volume behind.
                _ = try? hypervisor.prune(minimumAge: 0)
            }
            // Split where the total changes or the count starts again.
            var uploads: [[(UInt64, UInt64)]] = []
            for call in calls.withLock({ $0 }) {
                if let last = uploads.last?.last, last.1 == call.1, call.0 > last.0 { uploads[uploads.count - 1].append(call) } else { uploads.append([call]) }
            }
            let kernelSize = try #require(try FileManager.default.attributesOfItem(atPath: "/var/lib/virtchan/images/vmlinux")[.size] as? UInt64)
            #expect(uploads.count == 2, "\(lines.withLock { $0 })")
            for upload in uploads { #expect(upload.last.map { $0.0 == $0.1 } == true, "an upload's count ends at its size") }
            #expect(uploads.contains { $0.last?.1 == kernelSize }, "the kernel is one of them")
            #expect(uploads.first.map { $0.count > 1 } == true, "more than one report per upload")
            #expect(lines.withLock { $0 }.filter { $0.hasPrefix("uploading") }.count == 2)
        }

        /// ssh without a key the server takes fails at once and says what to give it.
        @Test func anSSHLoginWithoutAKeySaysWhatToGive() {
            let r = VC.run(["list", "-c", "qemu+ssh://root@127.0.0.1:\(RemoteHost.sshPort)/system?no_verify=1&no_tty=1"], timeout: 60)
            #expect(r.code == 1)
            #expect(r.stderr.contains("Permission denied (publickey"), "\(r.stderr)")
            #expect(r.stderr.contains("?keyfile=PATH"), "\(r.stderr)")
            #expect(r.seconds < 30)
        }

        @Test func aDiskCannotBeCreatedRemotelyAndNothingIsLeft() throws {
            let domain = "vctest-remote-disk"
            let disk = "\(work)/disk.img"
            try Data(count: 1 << 20).write(to: URL(fileURLWithPath: disk))
            let r = VC.run(["create", "-c", RemoteHost.tcp, domain, "--disk", disk, "--insecure-agent", "--accel", "tcg"])
            #expect(r.code == 64)
            #expect(r.stderr.contains("--disk \(disk) would have to be a file on the host behind \(RemoteHost.tcp)"), "\(r.stderr)")
            #expect(VC.virsh(["dominfo", domain]).code != 0, "nothing is defined")
            #expect(!VC.virsh(["vol-list", "virtchan"]).out.contains(domain))
            #expect(!FileManager.default.fileExists(atPath: "/var/lib/virtchan/domains/\(domain)"))
        }
    }
}
