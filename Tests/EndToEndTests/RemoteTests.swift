import Foundation
import Testing
import VirtchanKit

/// This machine as a remote hypervisor: libvirtd listening on TCP at 127.0.0.1 (no
/// authentication: test-only settings), and Debian's sshd on 127.0.0.1:2222 letting root in with
/// a key made for the run. Both are set up for the Remote suite and undone after it.
enum RemoteHost {
    static let dir = "/run/vctest-remote"
    static let sshPort = 2222
    static let tcp = "qemu+tcp://127.0.0.1/system"
    static var ssh: String { "qemu+ssh://root@127.0.0.1:\(sshPort)/system?keyfile=\(dir)/id&no_verify=1&no_tty=1" }
    static let uris = [("tcp", tcp), ("ssh", ssh)]
    static let knownHosts = "/root/.ssh/known_hosts"

    struct SetupError: Error, CustomStringConvertible {
        let description: String
    }

    static func shell(_ script: String, timeout: Double = 60) -> RunResult {
        VC.runProgram("/bin/sh", ["-c", script], timeout: timeout)
    }

    /// Restarts libvirtd, listening on TCP or not; returns once it answers.
    static func restartLibvirtd(listening: Bool) throws {
        let start = listening ? "libvirtd -d --listen -f \(dir)/libvirtd.conf" : "libvirtd -d"
        let r = shell("pkill -x libvirtd; for i in $(seq 50); do pgrep -x libvirtd >/dev/null || break; sleep 0.1; done; \(start)")
        guard r.code == 0 else { throw SetupError(description: "cannot restart libvirtd: \(r.stderr)") }
        let probe = listening ? tcp : "qemu:///system"
        guard eventually(30, interval: 0.2, { VC.runProgram("/usr/bin/virsh", ["-c", probe, "version"], timeout: 10).code == 0 }) else {
            throw SetupError(description: "libvirtd did not answer on \(probe)")
        }
    }

    static func setUp() throws {
        _ = VC.run(["holder", "stop", "--all"])
        tearDown(restart: false)
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true, attributes: [.posixPermissions: 0o700])
        try """
        listen_tls = 0
        listen_tcp = 1
        listen_addr = "127.0.0.1"
        auth_tcp = "none"

        """.write(toFile: "\(dir)/libvirtd.conf", atomically: true, encoding: .utf8)
        try """
        Port \(sshPort)
        ListenAddress 127.0.0.1
        HostKey \(dir)/host
        AuthorizedKeysFile \(dir)/authorized_keys
        PermitRootLogin prohibit-password
        PasswordAuthentication no
        KbdInteractiveAuthentication no
        UsePAM no
        PidFile \(dir)/sshd.pid

        """.write(toFile: "\(dir)/sshd_config", atomically: true, encoding: .utf8)
        let keys = shell("""
        set -e
        ssh-keygen -q -t ed25519 -N '' -f \(dir)/id
        ssh-keygen -q -t ed25519 -N '' -f \(dir)/host
        cp \(dir)/id.pub \(dir)/authorized_keys
        chmod 600 \(dir)/authorized_keys
        [ -e \(knownHosts) ] && cp \(knownHosts) \(dir)/known_hosts.before || true
        mkdir -p /run/sshd
        /usr/sbin/sshd -f \(dir)/sshd_config -E \(dir)/sshd.log
        """)
        guard keys.code == 0 else { throw SetupError(description: "sshd setup failed: \(keys.stderr)") }
        try restartLibvirtd(listening: true)
        guard eventually(20, { VC.runProgram("/usr/bin/virsh", ["-c", ssh, "version"], timeout: 20).code == 0 }) else {
            let log = (try? String(contentsOfFile: "\(dir)/sshd.log", encoding: .utf8)) ?? ""
            throw SetupError(description: "libvirt over ssh does not answer: \(log)")
        }
    }

    /// Stops the holders, sshd and the listening libvirtd, and removes every file the setup
    /// wrote, the ssh client's known_hosts line included.
    static func tearDown(restart: Bool = true) {
        _ = VC.run(["holder", "stop", "--all"])
        if let pid = try? String(contentsOfFile: "\(dir)/sshd.pid", encoding: .utf8).trimmingCharacters(in: .whitespacesAndNewlines),
           let p = Int32(pid) {
            kill(p, SIGTERM)
        }
        if FileManager.default.fileExists(atPath: "\(dir)/known_hosts.before") {
            _ = shell("cp \(dir)/known_hosts.before \(knownHosts)")
        } else if FileManager.default.fileExists(atPath: dir) {
            _ = shell("ssh-keygen -R '[127.0.0.1]:\(sshPort)' -f \(knownHosts) >/dev/null 2>&1; rm -f \(knownHosts).old")
        }
        if restart { try? restartLibvirtd(listening: false) }
        try? FileManager.default.removeItem(atPath: dir)
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
    /// Issue 12: every command with --connect qemu+tcp:// and qemu+ssh://, through libvirt's own
    /// channel streams, with the session holder keeping the connection.
    @Suite(RemoteHostScope()) struct Remote {
        let name = SharedGuest.name
        let work = "/tmp/vctest-remote"

        init() throws {
            try? FileManager.default.removeItem(atPath: work)
            try FileManager.default.createDirectory(atPath: work, withIntermediateDirectories: true)
            // A local holder would keep the channel sockets that libvirt opens for the remote side.
            _ = VC.run(["holder", "stop", "--all"])
        }

        @Test(arguments: RemoteHost.uris)
        func execStreamsStdinAndExitCodes(transport: String, uri: String) throws {
            try SharedGuest.require()
            _ = VC.run(["holder", "stop", "--all"])
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
            try SharedGuest.require()
            let bg = try Background(["exec", "-c", uri, name, "-n", "--", "sh", "-c",
                                     "trap 'echo got-int; exit 7' INT; echo ready; while :; do sleep 0.2; done"])
            #expect(eventually(30) { bg.seen.contains { $0.1 == "ready" } })
            kill(bg.process.processIdentifier, SIGINT)
            #expect(bg.wait(20) == 7)
            #expect(bg.seen.contains { $0.1 == "got-int" })
        }

        @Test(arguments: RemoteHost.uris)
        func pushAndPullAreByteExactAtAwkwardSizes(transport: String, uri: String) throws {
            try SharedGuest.require()
            for size in [0, 1, 262_143, 262_145, (3 << 20) + 7] {
                let src = "\(work)/\(transport)-\(size)"
                try makeFile(src, size: size)
                let push = VC.run(["push", "-c", uri, name, src, "/tmp/remote-\(size)"], timeout: 60)
                #expect(push.code == 0, "\(push.stderr)")
                let pull = VC.run(["pull", "-c", uri, name, "/tmp/remote-\(size)", src + ".back"], timeout: 60)
                #expect(pull.code == 0, "\(pull.stderr)")
                #expect(sameBytes(src, src + ".back"), "\(size) bytes over \(transport)")
            }
            VC.guest("rm -f /tmp/remote-*")
        }

        @Test(arguments: RemoteHost.uris)
        func commandsRunSideBySide(transport: String, uri: String) throws {
            try SharedGuest.require()
            let src = "\(work)/side-\(transport)"
            try makeFile(src, size: 16 << 20)
            let slow = try Background(["exec", "-c", uri, name, "-n", "--", "sh", "-c", "for i in 1 2 3 4; do echo s$i; sleep 0.5; done"])
            #expect(eventually(30, interval: 0.05) { slow.seen.contains { $0.1 == "s1" } })
            let push1 = try Background(["push", "-c", uri, name, src, "/tmp/side-1"])
            let push2 = try Background(["push", "-c", uri, name, src, "/tmp/side-2"])
            let ping = VC.run(["ping", "-c", uri, name, "-n", "1"], timeout: 30)
            #expect(ping.code == 0, "\(ping.stderr)")
            #expect(slow.process.isRunning)
            #expect(slow.wait(30) == 0)
            #expect(push1.wait(60) == 0, "\(push1.seen.map(\.1))")
            #expect(push2.wait(60) == 0, "\(push2.seen.map(\.1))")
            #expect(slow.seen.map(\.1) == ["s1", "s2", "s3", "s4"])
            let want = sha256Hex(try Data(contentsOf: URL(fileURLWithPath: src)))
            let sums = VC.guest("sha256sum /tmp/side-1 /tmp/side-2").out.split(separator: "\n").map { String($0.prefix(64)) }
            #expect(sums == [want, want])
            VC.guest("rm -f /tmp/side-1 /tmp/side-2")
        }

        /// A remote command never uses the local endpoint cache, and never writes it.
        @Test func theLocalEndpointCacheIsLeftAlone() throws {
            try SharedGuest.require()
            let entry = "/run/virtchan/endpoints/\(name)"
            try? FileManager.default.removeItem(atPath: entry)
            _ = VC.run(["holder", "stop", "--all"])
            #expect(VC.run(["exec", "-c", RemoteHost.tcp, name, "--", "true"]).code == 0)
            #expect(!FileManager.default.fileExists(atPath: entry))
        }

        /// The ssh connection dies mid-transfer: the pull fails with a clear error within its
        /// bound and leaves no partial file; the next command opens a new connection.
        @Test func sshDyingMidPullLeavesNothing() throws {
            try SharedGuest.require()
            VC.guest("head -c 134217728 /dev/zero > /tmp/remote-big")
            let dest = "\(work)/big-pulled"
            _ = VC.run(["ping", "-c", RemoteHost.ssh, name, "-n", "1"])
            let bg = try Background(["pull", "-c", RemoteHost.ssh, name, "/tmp/remote-big", dest])
            #expect(eventually(30, interval: 0.02) {
                ((try? FileManager.default.contentsOfDirectory(atPath: work)) ?? []).contains { $0.contains("big-pulled") }
            })
            // The ssh client the holder runs for its libvirt connection.
            let killed = RemoteHost.shell("pkill -KILL -f 'ssh .*-p \(RemoteHost.sshPort)|ssh .*\(RemoteHost.sshPort).*127.0.0.1'")
            #expect(killed.code == 0, "no ssh client found to kill")
            let code = bg.wait(60)
            #expect(code == 1, "the pull should fail within its bound: \(bg.seen.map(\.1))")
            #expect(bg.seen.contains { $0.1.contains("virtchan: error:") })
            let leftovers = try FileManager.default.contentsOfDirectory(atPath: work).filter { $0.contains("big-pulled") }
            #expect(leftovers.isEmpty, "left behind: \(leftovers)")
            let again = VC.run(["exec", "-c", RemoteHost.ssh, name, "--", "echo", "back"], timeout: 60)
            #expect(again.code == 0, "\(again.stderr)")
            #expect(again.out == "back\n")
            VC.guest("rm -f /tmp/remote-big")
        }

        /// libvirtd restarts under a holder: its command ends with a clear error, and the next
        /// command works once libvirtd is back.
        @Test func libvirtdRestartingUnderAHolder() throws {
            try SharedGuest.require()
            let bg = try Background(["exec", "-c", RemoteHost.tcp, name, "-n", "--", "sh", "-c", "echo started; sleep 30"])
            #expect(eventually(30, interval: 0.05) { bg.seen.contains { $0.1 == "started" } })
            try RemoteHost.restartLibvirtd(listening: true)
            let code = bg.wait(30)
            #expect(code == 125, "\(bg.seen.map(\.1))")
            #expect(bg.seen.contains { $0.1.contains("virtchan: error:") })
            let again = VC.run(["exec", "-c", RemoteHost.tcp, name, "--", "echo", "back"], timeout: 60)
            #expect(again.code == 0, "\(again.stderr)")
            #expect(again.out == "back\n")
        }

        @Test func bootstrapRunsOverBothTransports() throws {
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

        @Test func createOverARemoteURIIsRefusedWithTheReason() throws {
            let domain = "vctest-remote-create"
            let r = VC.run(["create", "-c", RemoteHost.tcp, domain, "--accel", "tcg"])
            #expect(r.code == 64)
            #expect(r.stderr.contains("create over \(RemoteHost.tcp) is not supported"))
            #expect(VC.virsh(["dominfo", domain]).code != 0, "nothing is defined")
        }
    }
}
