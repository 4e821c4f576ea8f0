import Foundation
import Testing
import VirtchanKit

/// The distro stand-in (Scripts/build-cloud-image: Debian bookworm with cloud-init, booted by
/// extlinux from its own MBR, nothing of virtchan inside), booted once with `create --image`
/// and shared by the tests that can share it.
enum CloudGuest {
    static let name = "vctest-cloud"
    static let image = HostPaths.current.imageDirectory + "/debian-cloud.qcow2"
    static let work = "/var/tmp/vctest-cloud"
    static let hostname = "cloudy"

    /// The base image's SHA-256 before anything booted it.
    nonisolated(unsafe) static var baseDigest = ""
    /// Two public keys: one given with --ssh-key, one in the user's own cloud-config.
    nonisolated(unsafe) static var keys: [String] = []

    static let boot: Result<RunResult, SharedGuest.BootError> = {
        func fail(_ message: String) -> Result<RunResult, SharedGuest.BootError> { .failure(SharedGuest.BootError(message: message)) }
        guard FileManager.default.fileExists(atPath: image) else { return fail("no distro stand-in at \(image); Scripts/build-cloud-image builds it") }
        _ = VC.run(["destroy", name, "--force"], timeout: 60)
        removeAtExit(name)
        try? FileManager.default.removeItem(atPath: work)
        try? FileManager.default.createDirectory(atPath: work, withIntermediateDirectories: true)
        guard let base = FileManager.default.contents(atPath: image) else { return fail("cannot read \(image)") }
        baseDigest = sha256Hex(base)
        for n in 1...2 {
            let k = VC.runProgram("/usr/bin/ssh-keygen", ["-q", "-t", "ed25519", "-N", "", "-C", "vctest-key\(n)", "-f", "\(work)/key\(n)"])
            guard k.code == 0, let pub = try? String(contentsOfFile: "\(work)/key\(n).pub", encoding: .utf8) else { return fail("ssh-keygen: \(k.stderr)") }
            keys.append(pub.trimmingCharacters(in: .whitespacesAndNewlines))
        }
        // The user's own user-data: MIME multi-part with a script and a cloud-config of its own.
        let userData = """
        Content-Type: multipart/mixed; boundary="USERBOUNDARY"
        MIME-Version: 1.0

        --USERBOUNDARY
        Content-Type: text/x-shellscript; charset="us-ascii"

        #!/bin/sh
        echo "user script ran" > /var/tmp/user-script

        --USERBOUNDARY
        Content-Type: text/cloud-config; charset="us-ascii"

        #cloud-config
        runcmd:
          - [sh, -c, "echo user runcmd ran > /var/tmp/user-runcmd"]
        ssh_authorized_keys:
          - \(keys[1])

        --USERBOUNDARY--

        """
        guard FileManager.default.createFile(atPath: "\(work)/user-data", contents: Data(userData.utf8)),
              FileManager.default.createFile(atPath: "\(work)/bootstrap.sh",
                                             contents: Data("#!/bin/sh\necho \"bootstrap ran\" >> /var/lib/bootstrap-runs\n".utf8))
        else { return fail("cannot write the user-data and bootstrap files in \(work)") }
        let r = VC.run(["create", name, "--image", image, "--disk-size", "3G", "--accel", "tcg",
                        "--user-data", "\(work)/user-data", "--ssh-key", "\(work)/key1.pub", "--hostname", hostname,
                        "--bootstrap", "\(work)/bootstrap.sh", "--timeout", "500"], timeout: 600)
        guard r.code == 0 else { return fail("create --image failed (\(r.code)): \(r.stderr) \(r.out)") }
        return .success(r)
    }()

    static func require() throws -> RunResult {
        switch boot {
        case .failure(let e): throw e
        case .success(let r):
            let w = VC.run(["wait", name, "--timeout", "300"], timeout: 320)
            if w.code != 0 { throw SharedGuest.BootError(message: "agent not ready: \(w.stderr)") }
            return r
        }
    }

    static func guest(_ shell: String) -> RunResult { VC.guest(shell, in: name) }

    static func bootID() -> String { guest("cat /proc/sys/kernel/random/boot_id").out.trimmingCharacters(in: .whitespacesAndNewlines) }

    static func bootstrapRuns() -> Int {
        guest("cat /var/lib/bootstrap-runs").out.split(separator: "\n").count
    }

    static func volumes(pool: String = "virtchan") -> [String] {
        VC.virsh(["vol-list", pool]).out.split(separator: "\n").dropFirst(2)
            .compactMap { $0.split(separator: " ").first.map(String.init) }
    }
}

extension EndToEnd {
    @Suite(.serialized) struct CloudImage {
        @Test func firstBootInstallsTheAgentAndRunsTheBootstrapWithNoNetwork() throws {
            let created = try CloudGuest.require()
            #expect(created.out.contains("Agent 0.1.0 answered"), "\(created.out)")
            #expect(created.out.contains("bootstrap: running bootstrap.sh"), "\(created.out)")
            #expect(CloudGuest.bootstrapRuns() == 1)
            // Nothing but loopback: the agent came over the channel alone.
            #expect(CloudGuest.guest("ls /sys/class/net").out.split(separator: "\n") == ["lo"])
            #expect(CloudGuest.guest("systemctl is-active virtchan-agent; readlink -f /proc/$(pidof virtchan-agent)/exe").out
                    == "active\n/usr/local/sbin/virtchan-agent\n")
            // The domain's key came on the seed and is the guest's alone.
            #expect(CloudGuest.guest("stat -c %a:%U /etc/virtchan/agent.key").out == "600:root\n")
            let hostKey = try String(contentsOfFile: HostPaths.current.stateDirectory(for: CloudGuest.name) + "/agent.key", encoding: .utf8)
            #expect(CloudGuest.guest("cat /etc/virtchan/agent.key").out.trimmingCharacters(in: .whitespacesAndNewlines)
                    == hostKey.trimmingCharacters(in: .whitespacesAndNewlines))

            let info = VC.run(["info", CloudGuest.name, "--json"])
            struct Info: Decodable { let os: String; let hostname: String; let interfaces: [GuestInterface] }
            let decoded = try JSONDecoder().decode(Info.self, from: info.stdout)
            #expect(decoded.os == "Debian GNU/Linux 12 (bookworm)")
            #expect(decoded.hostname == CloudGuest.hostname)
            #expect(decoded.interfaces.first { $0.name == "lo" }?.addresses.contains("127.0.0.1/8") == true, "\(decoded.interfaces)")
            let text = VC.run(["info", CloudGuest.name]).out
            #expect(text.contains("OS:            Debian GNU/Linux 12 (bookworm)"), "\(text)")
            #expect(text.contains("lo: 127.0.0.1/8"), "\(text)")
        }

        @Test func theUsersOwnUserDataRunsBesideVirtchans() throws {
            _ = try CloudGuest.require()
            let w = VC.run(["wait", CloudGuest.name, "--cloud-init", "--timeout", "400"], timeout: 420)
            #expect(w.code == 0, "\(w.stderr)")
            #expect(w.out.contains("cloud-init in \(CloudGuest.name) finished: done"), "\(w.out)")
            #expect(CloudGuest.guest("cat /var/tmp/user-script /var/tmp/user-runcmd").out == "user script ran\nuser runcmd ran\n")
            // Both keys: --ssh-key's merged into the user's list, not replacing it.
            let keys = CloudGuest.guest("cat /home/debian/.ssh/authorized_keys").out
            for key in CloudGuest.keys { #expect(keys.contains(key), "\(keys)") }
            #expect(CloudGuest.guest("hostname").out == CloudGuest.hostname + "\n")
            // cloud-init grew the root file system to the overlay's 3 GiB.
            let size = Int(CloudGuest.guest("df -B1 --output=size / | tail -n1").out.trimmingCharacters(in: .whitespacesAndNewlines)) ?? 0
            #expect(size > 2_700_000_000, "root file system is \(size) bytes")
        }

        @Test func theDomainBootsAnOverlayAndASeedFromThePool() throws {
            _ = try CloudGuest.require()
            let volumes = CloudGuest.volumes()
            #expect(volumes.contains(CloudGuest.name + ".qcow2") && volumes.contains(CloudGuest.name + ".seed.iso"), "\(volumes)")
            let overlay = VC.runProgram("/usr/bin/qemu-img", ["info", "-U", "--output=json", "/var/lib/virtchan/pool/\(CloudGuest.name).qcow2"])
            #expect(overlay.out.contains("\"backing-filename\": \"\(CloudGuest.image)\""), "\(overlay.out)")
            #expect(overlay.out.contains("\"virtual-size\": 3221225472"), "\(overlay.out)")
            let xml = VC.run(["xml", CloudGuest.name]).out
            #expect(xml.contains("<source file='/var/lib/virtchan/pool/\(CloudGuest.name).seed.iso'"), "\(xml)")
            #expect(xml.contains("<readonly/>"))
            // The seed is private to root on the host.
            #expect(mode("/var/lib/virtchan/pool/\(CloudGuest.name).seed.iso") & 0o077 == 0)
            let label = VC.runProgram("/usr/sbin/blkid", ["-o", "value", "-s", "LABEL", "/var/lib/virtchan/pool/\(CloudGuest.name).seed.iso"])
            #expect(label.out.lowercased() == "cidata\n")
        }

        @Test func theAgentComesBackAfterRebootsAndTheBootstrapRunsOnce() throws {
            _ = try CloudGuest.require()
            // A newer agent first (this one marked by bytes after its end, which it ignores):
            // the seed's older copy must not come back at the next boot.
            let marked = CloudGuest.work + "/virtchan-agent.marked"
            var binary = try #require(FileManager.default.contents(atPath: HostPaths.current.imageDirectory + "/agent/virtchan-agent"))
            binary.append(Data("virtchan-test-marker".utf8))
            try #require(FileManager.default.createFile(atPath: marked, contents: binary, attributes: [.posixPermissions: 0o755]))
            let update = VC.run(["update-agent", CloudGuest.name, "--agent", marked], timeout: 180)
            #expect(update.code == 0, "\(update.stderr)")
            #expect(update.out.contains("updated and answering"), "\(update.out)")
            let installedDigest = { CloudGuest.guest("sha256sum /usr/local/sbin/virtchan-agent").out.prefix(64) }
            #expect(installedDigest() == sha256Hex(binary).prefix(64))

            // Through the agent, the way `exec -- reboot` does it, then waiting for the new boot.
            var before = CloudGuest.bootID()
            let r = VC.run(["reboot", CloudGuest.name, "--timeout", "300"], timeout: 320)
            #expect(r.code == 0, "\(r.stderr)")
            #expect(r.out.contains("Domain \(CloudGuest.name) rebooted; agent back after"))
            let rebooted = CloudGuest.bootID()
            #expect(!rebooted.isEmpty && rebooted != before)
            #expect(installedDigest() == sha256Hex(binary).prefix(64), "the seed put its agent back")

            // virsh reboot (the ACPI button), and plain `wait` until the agent is back. The agent
            // answers before logind watches the button, and a press before that is lost (as on
            // any machine), so the boot is let finish first.
            _ = CloudGuest.guest("systemctl is-system-running --wait")
            before = CloudGuest.bootID()
            #expect(VC.virsh(["reboot", CloudGuest.name]).code == 0)
            let back = eventually(300, interval: 1) {
                // The old boot can still answer `wait` before the button takes effect, and an
                // agent gone mid-question gives an empty ID: only a new, readable ID counts.
                guard VC.run(["wait", CloudGuest.name, "--timeout", "30"], timeout: 40).code == 0 else { return false }
                let now = CloudGuest.bootID()
                return !now.isEmpty && now != before
            }
            #expect(back, "the agent did not come back after virsh reboot")

            // The bootstrap ran once; the guest's own marker, on its disk, says so too.
            #expect(CloudGuest.bootstrapRuns() == 1)
            #expect(CloudGuest.guest("test -s /var/lib/virtchan/bootstrap.done && echo marked").out == "marked\n")
            let status = VC.run(["bootstrap", "status", CloudGuest.name]).out
            #expect(status.contains("succeeded"), "\(status)")
            let forced = VC.run(["bootstrap", "run", CloudGuest.name, "--force"], timeout: 120)
            #expect(forced.code == 0, "\(forced.stderr)")
            #expect(CloudGuest.bootstrapRuns() == 2)
        }

        @Test func aFailedCloudInitIsReportedInItsOwnWords() throws {
            _ = try CloudGuest.require()
            // A per-boot script of the user's that fails: cloud-init reports it at the next boot.
            #expect(CloudGuest.guest("printf '#!/bin/sh\\nexit 3\\n' > /var/lib/cloud/scripts/per-boot/fail.sh && chmod +x /var/lib/cloud/scripts/per-boot/fail.sh").code == 0)
            defer { _ = CloudGuest.guest("rm -f /var/lib/cloud/scripts/per-boot/fail.sh") }
            #expect(VC.run(["reboot", CloudGuest.name, "--timeout", "300"], timeout: 320).code == 0)
            let w = VC.run(["wait", CloudGuest.name, "--cloud-init", "--timeout", "300"], timeout: 320)
            #expect(w.code == 1)
            #expect(w.stderr.contains("cloud-init in \(CloudGuest.name) failed (error"), "\(w.stderr)")
            #expect(w.stderr.contains("scripts_per_boot") || w.stderr.contains("scripts-per-boot"), "\(w.stderr)")
        }

        @Test func destroyDeletesTheOverlayAndTheSeedAndLeavesTheBaseUntouched() throws {
            _ = try CloudGuest.require()
            let d = VC.run(["destroy", CloudGuest.name], timeout: 120)
            #expect(d.code == 0, "\(d.stderr)")
            let volumes = CloudGuest.volumes()
            #expect(!volumes.contains(CloudGuest.name + ".qcow2") && !volumes.contains(CloudGuest.name + ".seed.iso"), "\(volumes)")
            #expect(!FileManager.default.fileExists(atPath: HostPaths.current.stateDirectory(for: CloudGuest.name)))
            let base = try #require(FileManager.default.contents(atPath: CloudGuest.image))
            #expect(sha256Hex(base) == CloudGuest.baseDigest, "the base image changed")
        }

        @Test func anImageWithTheDebianPackageNeedsNoSeed() throws {
            guard FileManager.default.fileExists(atPath: CloudGuest.image) else { throw SharedGuest.BootError(message: "no \(CloudGuest.image)") }
            let name = "vctest-deb"
            let work = CloudGuest.work + "/deb"
            try? FileManager.default.createDirectory(atPath: work, withIntermediateDirectories: true)
            // The agent Scripts/build-guest built: a build here would wait for the lock on the
            // build folder that `swift test` holds.
            let pkg = VC.runProgram(VC.packageRoot + "/Scripts/package-agent",
                                    ["--agent", HostPaths.current.imageDirectory + "/agent/virtchan-agent", work], timeout: 120)
            try #require(pkg.code == 0, "\(pkg.stderr)")
            let deb = work + "/virtchan-agent_0.1.0_amd64.deb"
            let listed = VC.runProgram("/usr/bin/dpkg-deb", ["-c", deb]).out
            let files = listed.split(separator: "\n").compactMap { line -> String? in
                guard line.hasPrefix("-") else { return nil }
                return line.split(separator: " ").last.map { String($0.dropFirst()) }
            }
            #expect(Set(files) == ["/etc/virtchan-agent.conf", "/lib/systemd/system/virtchan-agent.service",
                                   "/lib/udev/rules.d/60-virtchan-agent.rules", "/usr/sbin/virtchan-agent"], "\(listed)")
            #expect(VC.runProgram("/usr/bin/dpkg-deb", ["-f", deb, "Package", "Version"]).out == "Package: virtchan-agent\nVersion: 0.1.0\n")

            // A copy of the stand-in with the package installed into its root, offline.
            let disk = work + "/disk.raw"
            try #require(VC.runProgram("/usr/bin/qemu-img", ["convert", "-f", "qcow2", "-O", "raw", CloudGuest.image, disk], timeout: 300).code == 0)
            func inRoot(_ body: (String) -> Void) throws {
                let mnt = work + "/mnt"
                try? FileManager.default.createDirectory(atPath: mnt, withIntermediateDirectories: true)
                let loop = VC.runProgram("/usr/sbin/losetup", ["--find", "--show", "--offset", "1048576", disk])
                try #require(loop.code == 0, "\(loop.stderr)")
                let device = loop.out.trimmingCharacters(in: .whitespacesAndNewlines)
                defer { _ = VC.runProgram("/usr/sbin/losetup", ["-d", device]) }
                try #require(VC.runProgram("/usr/bin/mount", [device, mnt]).code == 0)
                defer { _ = VC.runProgram("/usr/bin/umount", [mnt]) }
                body(mnt)
            }
            try inRoot { root in
                let install = VC.runProgram("/usr/bin/dpkg", ["--root=\(root)", "-i", deb], timeout: 120)
                #expect(install.code == 0, "\(install.stderr)")
                for f in files { #expect(FileManager.default.fileExists(atPath: root + f), "\(f) not installed") }
            }

            _ = VC.run(["destroy", name, "--force"], timeout: 60)
            removeAtExit(name)
            let created = VC.run(["create", name, "--disk", disk, "--insecure-agent", "--accel", "tcg", "--memory", "1024", "--timeout", "300"], timeout: 330)
            #expect(created.code == 0, "\(created.stderr)")
            let status = VC.run(["exec", name, "--insecure-agent", "--", "sh", "-c", "dpkg-query -W -f '${Status}' virtchan-agent; echo; readlink -f /proc/$(pidof virtchan-agent)/exe"])
            #expect(status.out == "install ok installed\n/usr/sbin/virtchan-agent\n", "\(status.out) \(status.stderr)")
            #expect(VC.run(["destroy", name], timeout: 120).code == 0)
            #expect(FileManager.default.fileExists(atPath: disk), "destroy removed a --disk image it did not make")

            // Purging removes every file the package installed.
            try inRoot { root in
                let purge = VC.runProgram("/usr/bin/dpkg", ["--root=\(root)", "--purge", "virtchan-agent"], timeout: 120)
                #expect(purge.code == 0, "\(purge.stderr)")
                for f in files { #expect(!FileManager.default.fileExists(atPath: root + f), "\(f) left after purge") }
            }
            try? FileManager.default.removeItem(atPath: disk)
        }

        @Test func badImagesAndInputAreRefusedAndLeaveNothing() throws {
            let name = "vctest-cloud-bad"
            _ = VC.run(["destroy", name, "--force"], timeout: 60)
            removeAtExit(name)
            let work = CloudGuest.work + "/bad"
            try? FileManager.default.createDirectory(atPath: work, withIntermediateDirectories: true)
            func leftNothing() {
                #expect(VC.virsh(["dominfo", name]).code != 0, "a domain was left")
                #expect(!CloudGuest.volumes().contains { $0.hasPrefix(name + ".") }, "a volume was left")
                #expect(!FileManager.default.fileExists(atPath: HostPaths.current.stateDirectory(for: name)), "a state directory was left")
            }
            var r = VC.run(["create", name, "--image", "/etc/passwd"])
            #expect(r.code == 64 && r.stderr.contains("/etc/passwd is not a disk image"), "\(r.stderr)")
            leftNothing()
            r = VC.run(["create", name, "--image", work + "/missing.qcow2"])
            #expect(r.code != 0 && r.stderr.contains("missing.qcow2 does not exist"), "\(r.stderr)")
            leftNothing()
            try #require(FileManager.default.createFile(atPath: work + "/bad.yaml", contents: Data("#cloud-config\nruncmd: [echo hi\n  - broken: [\n".utf8)))
            r = VC.run(["create", name, "--image", CloudGuest.image, "--user-data", work + "/bad.yaml"])
            #expect(r.code == 64 && r.stderr.contains("bad.yaml is not valid YAML"), "\(r.stderr)")
            leftNothing()
            r = VC.run(["create", name, "--image", CloudGuest.image, "--disk-size", "1G"])
            #expect(r.code == 64 && r.stderr.contains("smaller than the image"), "\(r.stderr)")
            leftNothing()
            // No seed tool on the PATH.
            r = VC.run(["create", name, "--image", CloudGuest.image], environment: ["PATH": work])
            #expect(r.code != 0 && r.stderr.contains("needs xorriso or genisoimage"), "\(r.stderr)")
            leftNothing()

            // A disk with a partition table and nothing to boot: no cloud-init, no agent.
            let blank = work + "/blank.raw"
            try #require(FileManager.default.createFile(atPath: blank, contents: nil))
            #expect(truncate(blank, 64 << 20) == 0)
            let sfdisk = VC.runProgram("/usr/sbin/sfdisk", ["-q", blank], stdin: Data("label: dos\nstart=2048, type=83\n".utf8))
            try #require(sfdisk.code == 0, "\(sfdisk.stderr)")
            r = VC.run(["create", name, "--image", blank, "--accel", "tcg", "--timeout", "15"], timeout: 120)
            #expect(r.code != 0)
            #expect(r.stderr.contains("did not answer within 15 s"), "\(r.stderr)")
            #expect(r.stderr.contains("virtchan-agent_0.1.0_amd64.deb"), "\(r.stderr)")
            #expect(r.stderr.contains(HostPaths.current.abandonedConsoleLog(for: name)), "\(r.stderr)")
            leftNothing()
            unlink(HostPaths.current.abandonedConsoleLog(for: name))
        }
    }
}
