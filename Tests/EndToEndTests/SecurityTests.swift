import Foundation
import Testing
import VirtchanKit

private func type(_ path: String) -> mode_t? {
    var st = stat()
    return lstat(path, &st) == 0 ? st.st_mode & S_IFMT : nil
}

private func contents(_ path: String) -> [String] {
    ((try? FileManager.default.contentsOfDirectory(atPath: path)) ?? []).sorted()
}

/// The endpoint of the shared guest as virtchan itself would build it, without the key.
private func sharedEndpoint() throws -> AgentEndpoint {
    releaseChannels()
    var endpoint = try Hypervisor().endpoint(of: SharedGuest.name)
    endpoint.key = nil
    return endpoint
}

extension EndToEnd {
    /// Issue 9: a guest that is hostile (its root runs what it likes) and local users who are
    /// not the administrator. Each test plays the attack against the real guest and agent.
    @Suite struct Security {
        let name = SharedGuest.name
        let work = "/tmp/vctest-security"

        init() throws {
            try? FileManager.default.removeItem(atPath: work)
            try FileManager.default.createDirectory(atPath: work, withIntermediateDirectories: true)
        }

        /// The guest turns a symlink it planted on an earlier pull into a set-id directory: the
        /// second pull must not chmod (or write through) the host path the link names.
        @Test func aSymlinkPlantedByAnEarlierPullIsNeverFollowed() throws {
            try SharedGuest.require()
            let victim = "\(work)/victim", victimDir = "\(work)/victim-dir", out = "\(work)/out"
            try "host secret\n".write(toFile: victim, atomically: true, encoding: .utf8)
            chmod(victim, 0o644)
            try FileManager.default.createDirectory(atPath: victimDir, withIntermediateDirectories: true)
            chmod(victimDir, 0o755)
            VC.guest("rm -rf /tmp/t && mkdir /tmp/t && ln -s \(victim) /tmp/t/y && ln -s \(victimDir) /tmp/t/z && echo a > /tmp/t/f")
            let first = VC.run(["pull", name, "-r", "/tmp/t", out])
            #expect(first.code == 0, "\(first.stderr)")
            #expect(try FileManager.default.destinationOfSymbolicLink(atPath: "\(out)/y") == victim)

            // The links become empty directories with wide modes: a chmod that followed the
            // links would land on the host's file and directory.
            VC.guest("rm /tmp/t/y /tmp/t/z && mkdir /tmp/t/y /tmp/t/z && chmod 4777 /tmp/t/y && chmod 777 /tmp/t/z")
            let second = VC.run(["pull", name, "-r", "/tmp/t", out])
            #expect(second.code == 1)
            #expect(second.stderr.contains("is not a plain directory"), "\(second.stderr)")
            #expect(mode(victim) == 0o644, "the host file behind the planted link changed mode")
            #expect(mode(victimDir) == 0o755, "the host directory behind the planted link changed mode")
            // And a file below one of them must not be written through it.
            VC.guest("echo evil > /tmp/t/z/evil")
            let third = VC.run(["pull", name, "-r", "/tmp/t", out])
            #expect(third.code == 1)
            #expect(try String(contentsOfFile: victim, encoding: .utf8) == "host secret\n")
            #expect(contents(victimDir).isEmpty, "a file was written through the planted link")
            VC.guest("rm -rf /tmp/t")
        }

        @Test func setIDAndStickyBitsFromTheGuestAreDropped() throws {
            try SharedGuest.require()
            VC.guest("cp /bin/busybox /tmp/suid && chmod 4755 /tmp/suid && echo a > /tmp/sg && chmod 2777 /tmp/sg && rm -rf /tmp/st && mkdir -p /tmp/st/d && chmod 5777 /tmp/st/d && cp /tmp/suid /tmp/st/d/s")
            defer { VC.guest("rm -rf /tmp/suid /tmp/sg /tmp/st") }
            #expect(VC.run(["pull", name, "/tmp/suid", "\(work)/suid"]).code == 0)
            #expect(VC.run(["pull", name, "/tmp/sg", "\(work)/sg"]).code == 0)
            #expect(mode("\(work)/suid") == 0o755)
            #expect(mode("\(work)/sg") == 0o777)
            #expect(VC.run(["pull", name, "-r", "/tmp/st", "\(work)/st"]).code == 0)
            #expect(mode("\(work)/st/d") == 0o777)
            #expect(mode("\(work)/st/d/s") == 0o755)
            // root may ask for them
            #expect(VC.run(["pull", name, "/tmp/suid", "\(work)/suid-kept", "--preserve-special-modes"]).code == 0)
            #expect(mode("\(work)/suid-kept") == 0o4755)
            // anyone else may not (refused as bad usage before anything is reached)
            let nobody = VC.runProgram("/usr/bin/setpriv", ["--reuid=nobody", "--regid=nogroup", "--clear-groups", VC.binary,
                                                          "pull", name, "/tmp/suid", "/tmp/x", "--preserve-special-modes"])
            #expect(nobody.code == 64)
            #expect(nobody.stderr.contains("root only"), "\(nobody.stderr)")
        }

        /// As with cp: a FIFO or a device at the destination is written into, never replaced.
        @Test func aPullIntoADeviceOrFIFOWritesIntoIt() throws {
            try SharedGuest.require()
            VC.guest("printf 'through the pipe' > /tmp/small")
            defer { VC.guest("rm -f /tmp/small") }
            let null = "\(work)/null"
            #expect(mknod(null, S_IFCHR | 0o666, dev_t(0x103)) == 0) // 1:3, as /dev/null
            let r = VC.run(["pull", name, "/tmp/small", null])
            #expect(r.code == 0, "\(r.stderr)")
            #expect(type(null) == S_IFCHR, "the device node was replaced")
            let fifo = "\(work)/fifo"
            #expect(mkfifo(fifo, 0o600) == 0)
            // The reader end, opened without waiting for a writer, so nothing here can block.
            let reader = open(fifo, O_RDONLY | O_NONBLOCK)
            try #require(reader >= 0)
            defer { close(reader) }
            let pulled = VC.run(["pull", name, "/tmp/small", fifo, "-q"], timeout: 60)
            #expect(pulled.code == 0, "\(pulled.stderr)")
            var buffer = [UInt8](repeating: 0, count: 4096)
            let n = buffer.withUnsafeMutableBytes { read(reader, $0.baseAddress!, $0.count) }
            #expect(n > 0 && String(decoding: buffer[0..<n], as: UTF8.self) == "through the pipe")
            #expect(type(fifo) == S_IFIFO)
        }

        /// SIGINT or SIGTERM mid-pull: the temporary file goes, and the exit status says which
        /// signal ended it.
        @Test(arguments: [SIGINT, SIGTERM])
        func anInterruptedPullLeavesNothing(signal: Int32) throws {
            try SharedGuest.require()
            VC.guest("rm -f /tmp/huge && dd if=/dev/zero of=/tmp/huge bs=1M count=0 seek=700 2>/dev/null") // sparse: instant to make
            defer { VC.guest("rm -f /tmp/huge") }
            let dest = "\(work)/huge-\(signal)"
            let bg = try Background(["pull", name, "/tmp/huge", dest, "-q"])
            let started = eventually(30, interval: 0.01) { contents(work).contains { $0.hasPrefix(".huge-\(signal).virtchan-") } }
            #expect(started, "no temporary file appeared")
            kill(bg.process.processIdentifier, signal)
            #expect(bg.wait(30) == 128 + signal)
            #expect(!contents(work).contains { $0.contains("huge") }, "left behind: \(contents(work))")
        }

        /// A tree pull to a new directory appears whole or not at all; into an existing one,
        /// the error says what was already written.
        @Test func aFailedTreePullIsAllOrNothingOrSaysWhatItWrote() throws {
            try SharedGuest.require()
            let small = "\(work)/small"
            let unmount = try smallFileSystem(at: small, size: "1m")
            defer { unmount() }
            VC.guest("rm -rf /tmp/aon && mkdir -p /tmp/aon/d1 && echo first > /tmp/aon/a.txt && echo deep > /tmp/aon/d1/x && head -c 3145728 /dev/zero > /tmp/aon/big")
            defer { VC.guest("rm -rf /tmp/aon") }

            // A tree that does not fit is refused before anything is written, new or not.
            let fresh = VC.run(["pull", name, "-r", "/tmp/aon", "\(small)/new"])
            #expect(fresh.code == 1)
            #expect(fresh.stderr.contains("not enough space for /tmp/aon: its files need 3145739 bytes at once"), "\(fresh.stderr)")
            #expect(contents(small).isEmpty, "a failed pull into a new directory left: \(contents(small))")
            try FileManager.default.createDirectory(atPath: "\(small)/existing/d1/x", withIntermediateDirectories: true)
            try "kept\n".write(toFile: "\(small)/existing/d1/x/kept", atomically: false, encoding: .utf8)
            let tooBig = VC.run(["pull", name, "-r", "/tmp/aon", "\(small)/existing"])
            #expect(tooBig.code == 1)
            #expect(tooBig.stderr.contains("not enough space") && !tooBig.stderr.contains("partly updated"), "\(tooBig.stderr)")
            #expect(contents("\(small)/existing") == ["d1"])

            // Here d1/x is a directory, in the guest a file: the pull stops at it, after a.txt
            // (the top of a tree is listed before what is below it).
            VC.guest("rm /tmp/aon/big")
            try "kept\n".write(toFile: "\(small)/existing/d1/x/kept", atomically: false, encoding: .utf8)
            let partial = VC.run(["pull", name, "-r", "/tmp/aon", "\(small)/existing"])
            #expect(partial.code == 1)
            #expect(partial.stderr.contains("cannot put \(small)/existing/d1/x in place: a directory is there"), "\(partial.stderr)")
            #expect(partial.stderr.contains("was already partly updated: 1 of 3 entries written (a.txt)"), "\(partial.stderr)")
            #expect(contents("\(small)/existing/d1/x") == ["kept"])
            #expect(!contents("\(small)/existing/d1").contains { $0.contains("virtchan") })
        }

        /// Only root reaches the agent's sockets: neither a plain user nor a QEMU process (all of
        /// them run as libvirt-qemu) can even look them up.
        @Test func theSocketsAreClosedToOtherUsersAndToQEMU() throws {
            try SharedGuest.require()
            let socket = try #require(channels(name).first { $0.role == "control" }?.path)
            for user in ["nobody", "libvirt-qemu"] {
                let r = VC.runProgram("/usr/bin/setpriv", ["--reuid=\(user)", "--regid=\(user == "nobody" ? "nogroup" : user)",
                                                         "--clear-groups", "/usr/bin/stat", "-c", "%n", socket])
                #expect(r.code != 0, "\(user) reached \(socket)")
                #expect(r.stderr.contains("Permission denied"), "\(r.stderr)")
            }
            #expect(mode((socket as NSString).deletingLastPathComponent) == 0o700)
        }

        /// A peer that reaches the socket but holds no key, or the wrong one, gets nothing; a
        /// request sent without the proof is refused, not run.
        @Test func theAgentServesOnlyTheHolderOfTheDomainKey() throws {
            try SharedGuest.require()
            func expectRefused(_ endpoint: AgentEndpoint, _ fragment: String) {
                do {
                    _ = try AgentSession.connect(endpoint)
                    Issue.record("a session was accepted; expected: \(fragment)")
                } catch {
                    #expect(error.code == .unauthenticated)
                    #expect(error.message.contains(fragment), "\(error.message)")
                }
            }
            var noKey = try sharedEndpoint()
            noKey.allowsUnkeyedAgent = true
            expectRefused(noKey, "serves only the holder of the domain's key")
            var wrongKey = noKey
            wrongKey.key = AgentKey.generate()
            expectRefused(wrongKey, "refused this host's key")

            // Raw frames: a hello, then an exec without the proof.
            VC.guest("rm -f /tmp/pwned")
            releaseChannels()
            let fd = try UnixSocket.connect(noKey.controlSocket)
            defer { close(fd) }
            let conn = FramedConnection(fd: fd)
            conn.send(Hello(nonce: [1, 2, 3, 4], client: "intruder"), id: 1)
            conn.send(ExecStart(argv: ["/bin/touch", "/tmp/pwned"], env: [], cwd: "/", tty: false, rows: 0, cols: 0), id: 2)
            var replies: [Frame] = []
            let deadline = Date().addingTimeInterval(10)
            while Date() < deadline && !replies.contains(where: { $0.id == 2 }) {
                _ = try? conn.flush()
                _ = try? conn.fill()
                while let f = conn.decoder.next() { replies.append(f) }
                usleep(20_000)
            }
            let ack = try #require(replies.first { $0.type == .helloAck }.flatMap { try? HelloAck.decode($0) })
            #expect(ack.challenge.count == 16)
            #expect(ack.capabilities.contains(Capability.auth))
            let refusal = try #require(replies.first { $0.id == 2 })
            #expect(refusal.type == .error)
            #expect((try? ErrorMessage.decode(refusal))?.remoteCode == .unauthenticated)
            close(fd)
            #expect(VC.guest("test -e /tmp/pwned && echo ran || echo refused").out == "refused\n")
            // and virtchan itself, with the key, still gets in
            #expect(VC.run(["ping", name, "-n", "1"]).code == 0)
        }

        /// An agent that runs without a key (an older guest) is refused unless the user says
        /// --insecure-agent, and then used with a warning.
        @Test func aKeylessAgentNeedsInsecureAgentAndIsWarnedAbout() throws {
            try SharedGuest.require()
            // Moves the key file and restarts the agent, in the background so that the exec
            // itself ends first; init starts the agent again at once.
            func restartAgent(movingKey from: String, to: String, _ flags: [String]) {
                let script = "(sleep 0.5; mv /etc/virtchan/\(from) /etc/virtchan/\(to); kill $(pidof virtchan-agent)) >/dev/null 2>&1 &"
                _ = VC.run(["exec", name, "-n"] + flags + ["--", "/bin/sh", "-c", script])
            }
            restartAgent(movingKey: "agent.key", to: "agent.key.off", [])
            defer {
                restartAgent(movingKey: "agent.key.off", to: "agent.key", ["--insecure-agent"])
                _ = eventually(30, interval: 0.5) { VC.run(["ping", name, "-n", "1"]).code == 0 }
            }
            var refused = RunResult(code: 0, stdout: Data(), stderr: "", seconds: 0)
            #expect(eventually(30, interval: 0.5) {
                refused = VC.run(["ping", name, "-n", "1"])
                return refused.stderr.contains("has no key")
            }, "\(refused.stderr)")
            #expect(refused.code == 1)
            #expect(refused.stderr.contains("--insecure-agent"))
            let allowed = VC.run(["exec", name, "--insecure-agent", "--", "echo", "ran"])
            #expect(allowed.code == 0)
            #expect(allowed.out == "ran\n")
            #expect(allowed.stderr.contains("warning: the agent in \(name) holds no key"))
        }

        /// One domain of its own: bootstrap secrets private, the key kept off every other user,
        /// destroy ignoring a state directory that the metadata points elsewhere, and no lock
        /// file or per-domain initramfs left after destroy.
        @Test func privateStateAndACleanDestroy() throws {
            let d = "vctest-secure"
            let state = "/var/lib/virtchan/domains/\(d)"
            _ = VC.run(["destroy", d, "--force"], timeout: 60)
            removeAtExit(d)
            let script = "\(work)/boot.sh"
            try "#!/bin/sh\necho token is $TOKEN\n".write(toFile: script, atomically: true, encoding: .utf8)
            chmod(script, 0o755)
            try "key material\n".write(toFile: "\(work)/id", atomically: true, encoding: .utf8)
            chmod("\(work)/id", 0o640)
            let created = VC.run(["create", d, "--accel", "tcg", "--bootstrap", script, "--bootstrap-env", "TOKEN=s3cret",
                                  "--bootstrap-file", "\(work)/id:/root/id"], timeout: 300)
            #expect(created.code == 0, "\(created.stderr)")
            #expect(created.out.contains("token is s3cret"))
            for dir in [state, "\(state)/bootstrap", "\(state)/bootstrap/files"] { #expect(mode(dir) == 0o700, "\(dir)") }
            for file in ["bootstrap/manifest.json", "bootstrap/script", "bootstrap/files/0", "bootstrap/log", "agent.key"] {
                #expect(mode("\(state)/\(file)") == 0o600, "\(file) is \(String(mode("\(state)/\(file)"), radix: 8))")
            }
            // the file reaches the guest with its own mode, not the private copy's
            #expect(VC.guest("stat -c %a /root/id", in: d).out == "640\n")
            let initrd = "/var/lib/virtchan/boot/\(d).initrd"
            var st = stat()
            #expect(stat(initrd, &st) == 0 && st.st_uid == 0 && st.st_mode & 0o077 == 0, "the domain's initramfs is readable by others")
            #expect(VC.run(["exec", d, "--", "true"]).code == 0)
            #expect(FileManager.default.fileExists(atPath: "/run/virtchan/locks/\(d).control.lock"))

            // Someone with write access to libvirt points the metadata at another directory.
            let decoy = "\(work)/decoy"
            try FileManager.default.createDirectory(atPath: decoy, withIntermediateDirectories: true)
            try d.write(toFile: "\(decoy)/.virtchan-domain", atomically: true, encoding: .utf8)
            let uri = "https://virtchan.dev/xmlns/domain/1"
            let meta = VC.virsh(["metadata", d, "--uri", uri]).out
            let forged = meta.replacingOccurrences(of: state, with: decoy)
            #expect(forged != meta)
            #expect(VC.virsh(["metadata", d, "--uri", uri, "--key", "virtchan", "--set", forged]).code == 0)

            #expect(VC.run(["destroy", d]).code == 0)
            #expect(FileManager.default.fileExists(atPath: "\(decoy)/.virtchan-domain"), "destroy removed the directory the metadata named")
            #expect(!FileManager.default.fileExists(atPath: state))
            #expect(!FileManager.default.fileExists(atPath: initrd))
            #expect(!contents("/run/virtchan/locks").contains { $0.hasPrefix("\(d).") })
        }

        @Test func badUsageExits64WithOneLine() throws {
            for (args, fragment) in [(["create", "vctest-bad", "--memory", "0"], "out of range"),
                                     (["create", "vctest-bad", "--vcpus", "10000"], "out of range"),
                                     (["create", "bad/name"], "not a usable domain name"),
                                     (["create", "vctest-bad", "--disk", "/tmp"], "/tmp is a directory"),
                                     (["create", "vctest-bad", "--disk", "/etc/hostname"], "--insecure-agent"),
                                     (["wait", "vctest-bad", "--timeout=-1"], "positive")] {
                let r = VC.run(args)
                #expect(r.code == 64, "\(args): \(r.code) \(r.stderr)")
                #expect(r.stderr.contains(fragment), "\(args): \(r.stderr)")
                #expect(r.stderr.split(separator: "\n").count == 1, "\(args): \(r.stderr)")
            }
            #expect(VC.virsh(["domstate", "vctest-bad"]).code != 0)
        }

        @Test func pushOntoADirectoryAndPullOfAProcFile() throws {
            try SharedGuest.require()
            let src = "\(work)/note.txt"
            try "into the directory\n".write(toFile: src, atomically: true, encoding: .utf8)
            VC.guest("rm -rf /tmp/into && mkdir /tmp/into")
            defer { VC.guest("rm -rf /tmp/into") }
            let push = VC.run(["push", name, src, "/tmp/into"])
            #expect(push.code == 0, "\(push.stderr)")
            #expect(VC.guest("cat /tmp/into/note.txt").out == "into the directory\n")
            let pull = VC.run(["pull", name, "/proc/cpuinfo", "\(work)/cpuinfo"])
            #expect(pull.code == 0, "\(pull.stderr)")
            #expect(((try? String(contentsOfFile: "\(work)/cpuinfo", encoding: .utf8)) ?? "").contains("processor"))
        }
    }
}
