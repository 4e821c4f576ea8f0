import Foundation
import Testing
import VirtchanKit

extension EndToEnd {
    /// Issue 2: a real guest under libvirtd with its channels wired, inspected and torn down.
    @Suite struct Provisioning {
        @Test func sharedGuestBootsWithBothChannels() throws {
            try SharedGuest.require()
            // An exec leaves the domain's session holder on the control port, and the data port free.
            #expect(VC.run(["exec", SharedGuest.name, "-n", "--", "true"]).code == 0)
            let rows = channels(SharedGuest.name)
            let control = try #require(rows.first { $0.role == "control" })
            let data = try #require(rows.first { $0.role == "data" })
            #expect(control.name == "org.virtchan.control")
            #expect(control.port == 1)
            #expect(data.name == "org.virtchan.data")
            #expect(data.port == 2)
            // The sockets exist where `channels` says.
            for row in [control, data] {
                let path = try #require(row.path)
                var st = stat()
                #expect(lstat(path, &st) == 0, "no socket at \(path)")
                #expect((st.st_mode & S_IFMT) == S_IFSOCK)
            }
            #expect(control.state == "connected")
            #expect(data.state == "disconnected")
            // The JSON carries exactly the documented keys.
            let raw = VC.run(["channels", SharedGuest.name, "--json"]).stdout
            let objects = try #require(try JSONSerialization.jsonObject(with: raw) as? [[String: Any]])
            #expect(objects.allSatisfy { Set($0.keys) == ["name", "role", "port", "path", "state"] })
        }

        @Test func consoleListsThePortsByName() throws {
            try SharedGuest.require()
            let log = "/var/lib/virtchan/domains/\(SharedGuest.name)/console.log"
            let text = try String(contentsOfFile: log, encoding: .utf8)
            #expect(text.contains("org.virtchan.control /dev/vport"))
            #expect(text.contains("org.virtchan.data /dev/vport"))
        }

        @Test func listShowsManagedDomains() throws {
            try SharedGuest.require()
            let r = VC.run(["list", "--json"])
            #expect(r.code == 0)
            struct Row: Decodable { let name: String; let state: String; let channels: Int }
            let rows = try JSONDecoder().decode([Row].self, from: r.stdout)
            let row = try #require(rows.first { $0.name == SharedGuest.name })
            #expect(row.state == "running")
            #expect(row.channels == 3)
            #expect(VC.run(["xml", SharedGuest.name]).out.contains("<channel type='unix'>"))
        }

        /// Create to connected, destroy, and everything gone; plus libvirt-chosen socket paths.
        @Test func createConnectDestroyLeavesNothing() throws {
            let name = "vctest-life"
            removeAtExit(name)
            _ = VC.run(["destroy", name, "--force"])
            let r = VC.run(["create", name, "--accel", "tcg", "--libvirt-socket-paths", "--no-wait"], timeout: 120)
            #expect(r.code == 0, "\(r.stderr)")
            let start = Date()
            let connected = eventually(90, interval: 0.1) {
                channels(name).first { $0.role == "control" }?.state == "connected"
            }
            #expect(connected, "the control channel never turned connected")
            let rows = channels(name)
            let path = try #require(rows.first { $0.role == "control" }?.path)
            // libvirt chose the path; we read it back from the live XML.
            #expect(!path.hasPrefix("/var/lib/virtchan/"))
            #expect(FileManager.default.fileExists(atPath: path))
            print("create-to-connected: \(String(format: "%.1f", Date().timeIntervalSince(start))) s after create returned")
            // A ping remembers where the agent listens; destroy forgets it.
            #expect(VC.run(["ping", name, "--count", "1"], timeout: 60).code == 0)
            #expect(FileManager.default.fileExists(atPath: "/run/virtchan/endpoints/\(name)"))

            let d = VC.run(["destroy", name])
            #expect(d.code == 0, "\(d.stderr)")
            #expect(VC.virsh(["domstate", name]).code != 0)
            #expect(!FileManager.default.fileExists(atPath: "/var/lib/virtchan/domains/\(name)"))
            #expect(!FileManager.default.fileExists(atPath: path))
            #expect(!FileManager.default.fileExists(atPath: "/run/virtchan/endpoints/\(name)"))
        }

        /// A create whose agent does not answer in time keeps the domain for a look at its
        /// console, and its error says so and how to remove it.
        @Test func aCreateThatTimesOutSaysTheDomainIsLeftRunning() throws {
            let name = "vctest-slow"
            removeAtExit(name)
            _ = VC.run(["destroy", name, "--force"])
            // The built-in guest needs a few seconds to boot: one is not enough.
            let r = VC.run(["create", name, "--accel", "tcg", "--timeout", "1"], timeout: 60)
            #expect(r.code != 0)
            #expect(r.stderr.contains("did not say hello within 1 s"), "\(r.stderr)")
            #expect(r.stderr.contains("domain \(name) is left running (remove it with: virtchan destroy \(name))"), "\(r.stderr)")
            #expect(VC.virsh(["domstate", name]).out.contains("running"))
            #expect(VC.run(["wait", name, "--timeout", "90"], timeout: 100).code == 0)
            #expect(VC.run(["destroy", name]).code == 0)
            #expect(VC.virsh(["domstate", name]).code != 0)
        }

        /// Ctrl-C during create: before the domain starts, everything create made goes; once
        /// it runs, it stays, and the error says so and how to remove it. Either way, 130.
        @Test func ctrlCDuringCreateLeavesNothingHalfMade() throws {
            let name = "vctest-interrupted"
            removeAtExit(name)
            _ = VC.run(["destroy", name, "--force"])
            let early = try Background(["create", name, "--accel", "tcg"])
            #expect(eventually(30, interval: 0.001) { catches(SIGINT, pid: early.process.processIdentifier) })
            kill(early.process.processIdentifier, SIGINT)
            #expect(early.wait(60) == 130)
            let saidEarly = early.seen.map(\.1).joined(separator: "\n")
            #expect(saidEarly.contains("interrupted by SIGINT while \(name) was being created; nothing of it is left"), "\(saidEarly)")
            #expect(VC.virsh(["dominfo", name]).code != 0, "no definition is left")
            #expect(!FileManager.default.fileExists(atPath: "/var/lib/virtchan/domains/\(name)"), "no state directory is left")
            #expect(!FileManager.default.fileExists(atPath: "/var/lib/virtchan/boot/\(name).initrd"), "no initramfs is left")

            // Once the domain has started, create waits for its agent: Ctrl-C then keeps it, and
            // its bootstrap waits to be delivered.
            let script = "/tmp/vctest-interrupted.sh"
            try "#!/bin/sh\necho delivered\n".write(toFile: script, atomically: true, encoding: .utf8)
            defer { unlink(script) }
            let late = try Background(["create", name, "--accel", "tcg", "--bootstrap", script])
            #expect(eventually(60, interval: 0.01) { late.seen.contains { $0.1.hasPrefix("Domain \(name) started") } })
            kill(late.process.processIdentifier, SIGINT)
            #expect(late.wait(60) == 130)
            let saidLate = late.seen.map(\.1).joined(separator: "\n")
            #expect(saidLate.contains("interrupted by SIGINT; domain \(name) is left running (remove it with: virtchan destroy \(name)); its bootstrap is pending (deliver it with: virtchan bootstrap run \(name))"),
                    "\(saidLate)")
            #expect(VC.virsh(["domstate", name]).out.contains("running"))
            let delivered = VC.run(["bootstrap", "run", name], timeout: 120)
            #expect(delivered.code == 0 && delivered.out.contains("delivered"), "\(delivered.out) \(delivered.stderr)")
            #expect(VC.run(["destroy", name]).code == 0)
        }

        @Test func destroyKeepDefinitionStopsButKeeps() throws {
            let name = "vctest-keep"
            removeAtExit(name)
            _ = VC.run(["destroy", name, "--force"])
            #expect(VC.run(["create", name, "--accel", "tcg", "--no-wait"]).code == 0)
            let r = VC.run(["destroy", name, "--keep-definition"])
            #expect(r.code == 0, "\(r.stderr)")
            #expect(VC.virsh(["domstate", name]).out.contains("shut off"))
            let stopped = VC.run(["exec", name, "-n", "--", "true"])
            #expect(stopped.code == 125)
            #expect(stopped.stderr.contains("domain \(name) is not running"))
            #expect(!FileManager.default.fileExists(atPath: "/var/lib/virtchan/domains/\(name)"))
            #expect(VC.run(["destroy", name]).code == 0)
            #expect(VC.virsh(["domstate", name]).code != 0)
        }

        @Test func unmanagedDomainNeedsForce() throws {
            let name = "vctest-foreign"
            let xml = "<domain type='qemu'><name>\(name)</name><memory unit='MiB'>64</memory><os><type arch='x86_64'>hvm</type></os></domain>"
            let file = "/tmp/\(name).xml"
            try xml.write(toFile: file, atomically: true, encoding: .utf8)
            #expect(VC.virsh(["define", file]).code == 0)
            removeAtExit(name)
            let refused = VC.run(["destroy", name])
            #expect(refused.code == 1)
            #expect(refused.stderr.contains("not managed by virtchan; use --force"))
            #expect(VC.virsh(["domstate", name]).code == 0)
            #expect(VC.run(["destroy", name, "--force"]).code == 0)
            #expect(VC.virsh(["domstate", name]).code != 0)
        }
    }

    /// Issue 2: every bad input exits non-zero with one line, and defines nothing.
    @Suite struct BadInput {
        func expectRefused(_ args: [String], _ fragment: String, env: [String: String] = [:],
                           sourceLocation: SourceLocation = #_sourceLocation) {
            let r = VC.run(args, environment: env)
            #expect(r.code != 0, sourceLocation: sourceLocation)
            #expect(r.stderr.contains(fragment), "stderr was: \(r.stderr)", sourceLocation: sourceLocation)
            #expect(r.stderr.split(separator: "\n").count == 1, "want one line, got: \(r.stderr)", sourceLocation: sourceLocation)
            #expect(!r.stderr.contains("Fatal error"), sourceLocation: sourceLocation)
        }

        @Test func createRefusals() throws {
            try SharedGuest.require()
            expectRefused(["create", SharedGuest.name, "--accel", "tcg"], "already exists")
            expectRefused(["create", "vctest-bad", "--memory", "1"], "out of range")
            expectRefused(["create", "vctest-bad", "--ports", "64"], "--ports takes 3 to 31, not 64")
            expectRefused(["create", "vctest-bad", "--ports", "2"], "--ports takes 3 to 31, not 2")
            expectRefused(["create", "vctest-bad", "--ports", "3", "--qemu-ga"], "--ports takes 4 to 31")
            expectRefused(["create", "vctest-bad", "--kernel", "/no/such/vmlinuz"], "does not exist")
            expectRefused(["create", "bad/name"], "not a usable domain name")
            expectRefused(["create", "vctest-bad"], "longer than a unix socket allows",
                          env: ["VIRTCHAN_STATE_DIR": "/tmp/" + String(repeating: "x", count: 100)])
            let notXML = "/tmp/vctest-notxml.xml"
            try "<domain><oops".write(toFile: notXML, atomically: true, encoding: .utf8)
            expectRefused(["create", "vctest-bad", "--template", notXML], "not valid XML")
            let clash = "/tmp/vctest-clash.xml"
            try """
            <domain type='qemu'><name>x</name><memory unit='MiB'>128</memory><os><type>hvm</type></os>
            <devices><channel type='pty'><target type='virtio' name='org.virtchan.data'/></channel></devices></domain>
            """.write(toFile: clash, atomically: true, encoding: .utf8)
            expectRefused(["create", "vctest-bad", "--template", clash], "already has a channel named org.virtchan.data")
            #expect(VC.virsh(["domstate", "vctest-bad"]).code != 0, "a refused create left a domain behind")
        }

        @Test func unknownDomainAndStoppedDomain() {
            let locks = ["control", "data"].map { "/run/virtchan/locks/vctest-nosuch.\($0).lock" }
            for lock in locks { unlink(lock) }
            expectRefused(["channels", "vctest-nosuch"], "no domain named 'vctest-nosuch'")
            expectRefused(["ping", "vctest-nosuch"], "no domain named")
            expectRefused(["exec", "vctest-nosuch", "--", "true"], "no domain named")
            expectRefused(["destroy", "vctest-nosuch"], "no domain named")
            for lock in locks { #expect(!FileManager.default.fileExists(atPath: lock), "a mistyped name left \(lock)") }
            let holderFiles = (try? FileManager.default.contentsOfDirectory(atPath: "/run/virtchan/holders")) ?? []
            #expect(!holderFiles.contains { $0.hasPrefix("vctest-nosuch-") }, "\(holderFiles)")
        }

        /// A number out of range (NaN, infinite, negative seconds; no pings) is a usage error, never a
        /// crash or a wait forever.
        @Test func numbersOutOfRangeAreUsageErrors() {
            for (args, fragment) in [
                (["exec", "vctest-any", "--timeout", "nan", "--", "true"], "--timeout takes a positive number of seconds, not nan"),
                (["exec", "vctest-any", "--timeout", "inf", "--", "true"], "--timeout takes a positive number of seconds, not inf"),
                (["exec", "vctest-any", "--persist", "inf", "--", "true"], "--persist takes 0 or more seconds, not inf"),
                (["ping", "vctest-any", "--interval", "inf"], "--interval takes 0 or more seconds, not inf"),
                (["wait", "vctest-any", "--timeout", "inf"], "--timeout takes a positive number of seconds, not inf"),
                (["prune", "--min-age", "nan"], "--min-age takes 0 or more seconds, not nan"),
                (["create", "vctest-bad", "--wait-timeout", "inf"], "--wait-timeout takes a positive number of seconds, not inf"),
                // A negative number is read as the option's value, not as another option.
                (["exec", "vctest-any", "--timeout", "-5", "--", "true"], "--timeout takes a positive number of seconds, not -5"),
                (["ping", "vctest-any", "-n", "-1"], "--count must be at least 1"),
            ] {
                let r = VC.run(args)
                #expect(r.code == 64, "\(args): \(r.stderr)")
                #expect(r.stderr.contains(fragment), "\(args): \(r.stderr)")
            }
        }

        @Test func daemonNotRunningNamesTheSetupScript() {
            expectRefused(["list", "--connect", "qemu:///system?socket=/nonexistent/sock"], "Scripts/setup-host")
        }

        /// prune against the real pool: volumes of domains that are gone, uploads nothing boots
        /// or reads through, and unfinished ones go; what a domain or an overlay uses, what was
        /// just written and what virtchan did not name stay. A dry run touches nothing.
        @Test func pruneRemovesOnlyWhatNothingUses() throws {
            let pool = Hypervisor.storagePoolName, dir = "/var/lib/virtchan/pool"
            // The pool as create makes it on first use.
            let hypervisor = Hypervisor(uri: "qemu:///system")
            #expect(hypervisor.storagePoolPath == dir)
            _ = try StoragePool.directory(pool, path: dir, on: hypervisor.connection())
            let hex = (0..<24).map { _ in String("0123456789abcdef".randomElement()!) }.joined()
            let hex2 = String(hex.reversed())
            let gone = ["vctest-gone.qcow2", "vctest-gone.seed.iso", "base-\(hex)", "boot-\(hex)", "boot-\(hex).complete"]
            let stay = ["\(SharedGuest.name).initrd", "vctest-notes.img", "base-\(hex2)", "base-\(hex2).complete", "vctest-reader.img",
                        "vctest-byvolume.qcow2"]
            let fresh = "vctest-fresh.qcow2"
            let user = "vctest-prune-user"
            defer {
                _ = VC.virsh(["undefine", user])
                unlink("/tmp/\(user).xml")
                for v in gone + stay + [fresh] { _ = VC.virsh(["vol-delete", "--pool", pool, v]) }
            }
            try SharedGuest.require()
            // A domain (defined, never started) whose disk names its volume by pool and name.
            let xml = "<domain type='qemu'><name>\(user)</name><memory unit='MiB'>64</memory><os><type arch='x86_64'>hvm</type></os>"
                + "<devices><disk type='volume' device='disk'><source pool='\(pool)' volume='vctest-byvolume.qcow2'/><target dev='vda' bus='virtio'/></disk></devices></domain>"
            try xml.write(toFile: "/tmp/\(user).xml", atomically: true, encoding: .utf8)
            #expect(VC.virsh(["define", "/tmp/\(user).xml"]).code == 0)
            for v in gone + stay where v != "vctest-reader.img" {
                #expect(VC.virsh(["vol-create-as", pool, v, "64K", "--format", "raw"]).code == 0, "\(v)")
            }
            #expect(VC.virsh(["vol-create-as", pool, "vctest-reader.img", "1M", "--format", "qcow2",
                              "--backing-vol", "\(dir)/base-\(hex2)", "--backing-vol-format", "raw"]).code == 0)
            // Written two hours ago, as far as the pool can tell, except the fresh one.
            for v in gone + stay {
                #expect(VC.runProgram("/usr/bin/touch", ["-d", "2 hours ago", "\(dir)/\(v)"]).code == 0)
            }
            #expect(VC.virsh(["vol-create-as", pool, fresh, "64K", "--format", "raw"]).code == 0)

            struct Report: Decodable {
                struct Volume: Decodable { let name: String; let reason: String }
                let removed: [Volume], recent: [Volume], dryRun: Bool
            }
            func mine(_ names: [String]) -> Set<String> { Set(names.filter { (gone + stay + [fresh]).contains($0) }) }
            let dry = VC.run(["prune", "--dry-run", "--json"])
            #expect(dry.code == 0, "\(dry.stderr)")
            let dryReport = try #require(try JSONDecoder().decode([Report].self, from: dry.stdout).first)
            #expect(dryReport.dryRun)
            #expect(mine(dryReport.removed.map(\.name)) == Set(gone))
            #expect(mine(dryReport.recent.map(\.name)) == [fresh])
            #expect(dryReport.removed.first { $0.name == "vctest-gone.qcow2" }?.reason == "made for domain vctest-gone, which no longer exists")
            #expect(dryReport.removed.first { $0.name == "base-\(hex)" }?.reason == "an upload that never finished")
            let listed = VC.virsh(["vol-list", pool]).out
            for v in gone { #expect(listed.contains(v), "a dry run removed \(v)") }

            let r = VC.run(["prune"])
            #expect(r.code == 0, "\(r.stderr)")
            #expect(r.out.contains("Removed "), "\(r.out)")
            #expect(r.out.contains("Kept ") && r.out.contains(fresh), "\(r.out)")
            let left = VC.virsh(["vol-list", pool]).out
            for v in gone { #expect(!left.contains(v), "\(v) is still there") }
            for v in stay + [fresh] { #expect(left.contains(v), "\(v) was removed") }
            #expect(!FileManager.default.fileExists(atPath: "\(dir)/vctest-gone.qcow2"))

            // With no minimum age the fresh one goes too, and the rest still stays.
            let all = VC.run(["prune", "--min-age", "0", "--json"])
            let allReport = try #require(try JSONDecoder().decode([Report].self, from: all.stdout).first)
            #expect(mine(allReport.removed.map(\.name)) == [fresh], "\(all.out)")
            #expect(VC.run(["prune", "--pool", "vctest-nosuch"]).out == "Nothing to remove from the storage pool vctest-nosuch\n")
        }

        @Test func dryRunPrintsXMLAndTouchesNothing() throws {
            let r = VC.run(["create", "vctest-dry", "--dry-run", "--accel", "tcg"])
            #expect(r.code == 0)
            #expect(r.out.contains("<controller type=\"virtio-serial\" index=\"0\" ports=\"16\"/>"))
            #expect(r.out.contains("org.virtchan.control"))
            #expect(VC.virsh(["domstate", "vctest-dry"]).code != 0)
            #expect(!FileManager.default.fileExists(atPath: "/var/lib/virtchan/domains/vctest-dry"))
        }
    }
}
