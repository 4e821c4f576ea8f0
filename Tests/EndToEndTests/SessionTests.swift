import Foundation
import Testing

/// A plain user of this host, made for the test, who runs virtchan against their own
/// qemu:///session: the per-user libvirtd that libvirt starts on demand.
private enum PlainUser {
    static let name = "vctest-user"

    /// Creates the user (once) and their runtime directory; returns the uid.
    static func prepare() throws -> uid_t {
        if getpwnam(name) == nil {
            let r = VC.runProgram("/usr/sbin/useradd", ["--create-home", "--shell", "/bin/sh", name])
            guard r.code == 0 else { throw SharedGuest.BootError(message: "useradd failed: \(r.stderr)") }
        }
        guard let pw = getpwnam(name) else { throw SharedGuest.BootError(message: "no user \(name)") }
        let uid = pw.pointee.pw_uid
        let runtime = "/run/user/\(uid)"
        try FileManager.default.createDirectory(atPath: runtime, withIntermediateDirectories: true)
        chown(runtime, uid, pw.pointee.pw_gid)
        chmod(runtime, 0o700)
        return uid
    }

    static var home: String { "/home/\(name)" }

    /// virtchan, and virtchan-full beside it, where the user can run them (the build tree may
    /// be closed to them).
    static let binary: String = {
        let dir = "/tmp/vctest-user-bin"
        try? FileManager.default.removeItem(atPath: dir)
        try? FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        chmod(dir, 0o755)
        let built = (VC.binary as NSString).deletingLastPathComponent
        for program in ["virtchan", "virtchan-full"] {
            try? FileManager.default.copyItem(atPath: built + "/" + program, toPath: dir + "/" + program)
            chmod(dir + "/" + program, 0o755)
        }
        return dir + "/virtchan"
    }()

    /// Runs a command as the user, with a login-like environment and nothing of root's.
    static func run(_ args: [String], uid: uid_t, timeout: Double = 240) -> RunResult {
        VC.runProgram("/usr/bin/setpriv", ["--reuid=\(name)", "--regid=\(name)", "--init-groups", "/usr/bin/env", "-i",
                                           "HOME=\(home)", "USER=\(name)", "PATH=/usr/bin:/bin:/usr/sbin:/sbin",
                                           "XDG_RUNTIME_DIR=/run/user/\(uid)"] + args, timeout: timeout)
    }

    /// Ends what the user's session left running (their libvirtd and virtlogd).
    static func stopProcesses() {
        _ = VC.runProgram("/usr/bin/pkill", ["-u", name])
    }
}

extension EndToEnd {
    @Suite struct UnprivilegedUser {
        /// Issue 9: a user who is not root drives their own domain end to end, with every file
        /// under their own directories.
        @Test func aPlainUserDrivesTheirOwnSessionDomain() throws {
            let uid = try PlainUser.prepare()
            defer { PlainUser.stopProcesses() }
            let vc = PlainUser.binary, home = PlainUser.home, vm = "vctest-session"
            _ = PlainUser.run([vc, "destroy", vm, "--force"], uid: uid)
            let script = "\(home)/setup.sh"
            try "#!/bin/sh\necho bootstrapped as $(id -u) > /tmp/boot-note\necho hello from the bootstrap\n"
                .write(toFile: script, atomically: true, encoding: .utf8)
            chmod(script, 0o755)
            chown(script, uid, uid_t(getpwnam(PlainUser.name).pointee.pw_gid))

            let created = PlainUser.run([vc, "create", vm, "--accel", "tcg", "--bootstrap", script], uid: uid, timeout: 300)
            #expect(created.code == 0, "\(created.stderr)")
            #expect(created.out.contains("hello from the bootstrap"))
            let state = "\(home)/.local/state/virtchan/domains/\(vm)"
            var st = stat()
            #expect(stat(state, &st) == 0 && st.st_uid == uid && st.st_mode & 0o777 == 0o700, "state is not the user's own")
            let socket = try #require(PlainUser.run([vc, "channels", vm, "--json"], uid: uid).out
                .split(separator: "\"").map(String.init).first { $0.hasSuffix("control.sock") })
            #expect(socket.hasPrefix(state), "\(socket)")
            #expect(FileManager.default.fileExists(atPath: "/run/user/\(uid)/virtchan/locks/\(vm).control.lock"))

            let exec = PlainUser.run([vc, "exec", vm, "--", "sh", "-c", "cat /tmp/boot-note; exit 3"], uid: uid)
            #expect(exec.code == 3)
            #expect(exec.out == "bootstrapped as 0\n")
            let status = PlainUser.run([vc, "bootstrap", "status", vm, "--json"], uid: uid)
            #expect(status.out.contains("\"state\" : \"succeeded\""), "\(status.out)")

            let file = "\(home)/payload"
            let payload = Data((0..<(1 << 20) + 7).map { UInt8(truncatingIfNeeded: $0 &* 31) })
            try payload.write(to: URL(fileURLWithPath: file))
            chown(file, uid, uid_t(getpwnam(PlainUser.name).pointee.pw_gid))
            #expect(PlainUser.run([vc, "push", vm, file, "/tmp/payload", "-q"], uid: uid).code == 0)
            #expect(PlainUser.run([vc, "pull", vm, "/tmp/payload", file + ".back", "-q"], uid: uid).code == 0)
            #expect(FileManager.default.contents(atPath: file + ".back") == payload)

            // root's domains are not theirs to reach, and the error says why
            let system = PlainUser.run([vc, "list", "--connect", "qemu:///system"], uid: uid)
            #expect(system.code == 1)
            #expect(system.stderr.contains("permission denied"), "\(system.stderr)")
            #expect(!system.stderr.contains("is libvirtd running"))

            #expect(PlainUser.run([vc, "destroy", vm], uid: uid).code == 0)
            #expect(!FileManager.default.fileExists(atPath: state))
            #expect(!FileManager.default.fileExists(atPath: "\(home)/.local/state/virtchan/boot/\(vm).initrd"))
            #expect(!FileManager.default.fileExists(atPath: "/run/user/\(uid)/virtchan/locks/\(vm).control.lock"))
        }
    }
}
