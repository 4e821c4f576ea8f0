import Crypto
import Foundation
import Testing
import VirtchanKit

/// Every end-to-end suite nests in here, so they run one at a time: they share one booted
/// guest, and a virtio channel takes one client at a time. Where there is no libvirtd, QEMU
/// or guest image to use, the whole suite is skipped and says why.
@Suite(.serialized, .enabled("needs root, libvirtd, QEMU and the built-in guest; theEndToEndSuiteRunsWhereItIsRequired says what is missing") {
    TestHost.missing == nil
})
enum EndToEnd {}

func sha256Hex(_ data: Data) -> String {
    Crypto.SHA256.hash(data: data).map { String(format: "%02x", $0) }.joined()
}

/// What the end-to-end suite needs from this machine.
enum TestHost {
    /// Why the end-to-end suite cannot run here, or nil when it can.
    static let missing: String? = {
        guard geteuid() == 0 else { return "end-to-end tests run as root (they drive qemu:///system); run Scripts/test" }
        guard FileManager.default.isExecutableFile(atPath: VC.binary) else { return "no virtchan binary at \(VC.binary); build it first" }
        guard ["/usr/bin/qemu-system-x86_64", "/usr/bin/virsh"].allSatisfy(FileManager.default.isExecutableFile) else {
            return "QEMU or libvirt's client is not installed; Scripts/setup-host installs them"
        }
        guard FileManager.default.fileExists(atPath: HostPaths.current.imageDirectory + "/initrd.img") else {
            return "the built-in guest image is missing; Scripts/build-guest builds it"
        }
        // A plain connect, not a libvirt connection: this runs while tests are being planned.
        do {
            close(try UnixSocket.connect("/var/run/libvirt/libvirt-sock"))
        } catch {
            return "libvirtd does not listen at /var/run/libvirt/libvirt-sock (\(error)); Scripts/setup-host starts it"
        }
        return nil
    }()
}

/// Scripts/test sets VIRTCHAN_REQUIRE_END_TO_END, so that a machine where the suite would be
/// skipped fails instead of passing with the real tests left out.
@Test func theEndToEndSuiteRunsWhereItIsRequired() {
    if let missing = TestHost.missing {
        let required = ProcessInfo.processInfo.environment["VIRTCHAN_REQUIRE_END_TO_END"] == "1"
        #expect(!required, "the end-to-end suite would be skipped: \(missing)")
        if !required { print("EndToEnd skipped: \(missing)") }
    }
}

struct RunResult {
    let code: Int32
    let stdout: Data
    let stderr: String
    let seconds: Double
    var out: String { String(decoding: stdout, as: UTF8.self) }
}

enum VC {
    static let packageRoot = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
        .deletingLastPathComponent().path
    static let binary = ProcessInfo.processInfo.environment["VIRTCHAN_BIN"] ?? packageRoot + "/.build/debug/virtchan"

    /// Runs the virtchan binary as a user would and collects everything it prints.
    @discardableResult
    static func run(_ args: [String], stdin: Data? = nil, timeout: Double = 240,
                    environment: [String: String] = [:]) -> RunResult {
        runProgram(binary, args, stdin: stdin, timeout: timeout, environment: environment)
    }

    static func runProgram(_ path: String, _ args: [String], stdin: Data? = nil, timeout: Double = 240,
                           environment: [String: String] = [:]) -> RunResult {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: path)
        p.arguments = args
        var env = ProcessInfo.processInfo.environment
        for (k, v) in environment { env[k] = v }
        p.environment = env
        let tmp = FileManager.default.temporaryDirectory
        let outURL = tmp.appendingPathComponent("vc-out-\(UUID().uuidString)")
        let errURL = tmp.appendingPathComponent("vc-err-\(UUID().uuidString)")
        _ = FileManager.default.createFile(atPath: outURL.path, contents: nil)
        _ = FileManager.default.createFile(atPath: errURL.path, contents: nil)
        defer {
            try? FileManager.default.removeItem(at: outURL)
            try? FileManager.default.removeItem(at: errURL)
        }
        let outHandle = try! FileHandle(forWritingTo: outURL)
        let errHandle = try! FileHandle(forWritingTo: errURL)
        p.standardOutput = outHandle
        p.standardError = errHandle
        let inPipe = Pipe()
        p.standardInput = stdin == nil ? FileHandle.nullDevice : inPipe
        let start = Date()
        do { try launch(p) } catch { return RunResult(code: -1, stdout: Data(), stderr: "\(error)", seconds: 0) }
        if let stdin {
            let writer = inPipe.fileHandleForWriting
            DispatchQueue.global().async {
                writer.write(stdin)
                try? writer.close()
            }
        }
        let deadline = Date().addingTimeInterval(timeout)
        // The child is reaped here rather than through Process, whose SIGCHLD handling has been
        // seen to miss a child that exited while a daemon it started forked (libvirtd -d).
        guard let status = reap(p, until: deadline) else {
            kill(p.processIdentifier, SIGINT)
            if reap(p, until: Date().addingTimeInterval(0.5)) == nil {
                kill(p.processIdentifier, SIGKILL)
                _ = reap(p, until: Date().addingTimeInterval(5))
            }
            try? outHandle.close(); try? errHandle.close()
            let err = (try? String(contentsOf: errURL, encoding: .utf8)) ?? ""
            return RunResult(code: -999, stdout: (try? Data(contentsOf: outURL)) ?? Data(),
                             stderr: "TIMED OUT after \(timeout) s\n" + err, seconds: timeout)
        }
        try? outHandle.close(); try? errHandle.close()
        return RunResult(code: status, stdout: (try? Data(contentsOf: outURL)) ?? Data(),
                         stderr: (try? String(contentsOf: errURL, encoding: .utf8)) ?? "",
                         seconds: Date().timeIntervalSince(start))
    }

    static func virsh(_ args: [String]) -> RunResult {
        runProgram("/usr/bin/virsh", ["-c", "qemu:///system"] + args, timeout: 60)
    }

    /// A command in the shared guest; its stdout.
    @discardableResult
    static func guest(_ shell: String, in domain: String = SharedGuest.name) -> RunResult {
        run(["exec", domain, "-n", "--", "/bin/sh", "-c", shell], timeout: 120)
    }
}

/// Writes `size` random bytes (or `pattern`'s) to `path`.
func makeFile(_ path: String, size: Int, pattern: ((Int) -> UInt8)? = nil) throws {
    var data = Data(count: size)
    if let pattern {
        data.withUnsafeMutableBytes { (raw: UnsafeMutableRawBufferPointer) in for i in 0..<size { raw[i] = pattern(i) } }
    } else {
        var rng = SystemRandomNumberGenerator()
        data.withUnsafeMutableBytes { (raw: UnsafeMutableRawBufferPointer) in
            var i = 0
            while i + 8 <= size { raw.storeBytes(of: rng.next(), toByteOffset: i, as: UInt64.self); i += 8 }
            while i < size { raw[i] = UInt8.random(in: 0...255, using: &rng); i += 1 }
        }
    }
    try data.write(to: URL(fileURLWithPath: path))
}

func sameBytes(_ a: String, _ b: String) -> Bool {
    VC.runProgram("/usr/bin/cmp", ["-s", a, b]).code == 0
}

/// Starts `process` with no signal blocked. The test runner's threads block most signals and a
/// child starts with its parent thread's mask: a `libvirtd -d` that Scripts/remote-host started
/// from here ignored SIGTERM for as long as it ran (each restart then waited 15 s for it before
/// SIGKILL).
func launch(_ process: Process) throws {
    var none = sigset_t(), old = sigset_t()
    sigemptyset(&none)
    pthread_sigmask(SIG_SETMASK, &none, &old)
    defer { pthread_sigmask(SIG_SETMASK, &old, nil) }
    try process.run()
}

/// Waits for `process` until `deadline`; its exit code (128+N when signal N ended it), or nil.
/// Whichever reaps the child first, this or Process's own SIGCHLD handler, the code is the same;
/// reaping here as well covers a child that Process was seen to miss (one that exited while a
/// daemon it started forked, as `libvirtd -d` does), which left its waitUntilExit hanging.
func reap(_ process: Process, until deadline: Date) -> Int32? {
    let pid = process.processIdentifier
    var status: Int32 = 0
    while true {
        let r = waitpid(pid, &status, WNOHANG)
        if r == pid { return (status & 0x7f) == 0 ? (status >> 8) & 0xff : 128 + (status & 0x7f) }
        if r < 0 && errno == ECHILD {
            // Process reaped it: its status arrives there in a moment.
            let until = Date().addingTimeInterval(5)
            while process.isRunning && Date() < until { usleep(5_000) }
            if process.isRunning { return -1 }
            return process.terminationReason == .uncaughtSignal ? 128 + process.terminationStatus : process.terminationStatus
        }
        if Date() >= deadline { return nil }
        usleep(10_000)
    }
}

/// The permission bits of `path` itself (a link is not followed); -1 when nothing is there.
func mode(_ path: String) -> Int {
    var st = stat()
    return lstat(path, &st) == 0 ? Int(st.st_mode & 0o7777) : -1
}

/// Stops a domain's session holder, so that a test can reach the channel sockets itself.
func releaseChannels(of domain: String = SharedGuest.name) {
    _ = VC.run(["holder", "stop", domain])
}

/// Whether process `pid` has a handler for `signal` (its SigCgt line in /proc): a command that
/// reacts to Ctrl-C by undoing its work installs one as it starts, and a signal sent before then
/// ends the process as it would any program.
func catches(_ signal: Int32, pid: pid_t) -> Bool {
    guard let status = try? String(contentsOfFile: "/proc/\(pid)/status", encoding: .utf8),
          let line = status.split(separator: "\n").first(where: { $0.hasPrefix("SigCgt:") }),
          let mask = UInt64(line.dropFirst("SigCgt:".count).trimmingCharacters(in: .whitespaces), radix: 16) else { return false }
    return mask & (1 << UInt64(signal - 1)) != 0
}

/// Polls `condition` until it holds or `timeout` passes.
func eventually(_ timeout: Double, interval: Double = 0.2, _ condition: () -> Bool) -> Bool {
    let deadline = Date().addingTimeInterval(timeout)
    while Date() < deadline {
        if condition() { return true }
        Thread.sleep(forTimeInterval: interval)
    }
    return condition()
}

struct ChannelRow: Decodable, Equatable {
    let name: String
    let role: String
    let port: Int?
    let path: String?
    let state: String?
}

func channels(_ domain: String) -> [ChannelRow] {
    let r = VC.run(["channels", domain, "--json"])
    return (try? JSONDecoder().decode([ChannelRow].self, from: r.stdout)) ?? []
}

nonisolated(unsafe) private var domainsToRemove: Set<String> = []
private let cleanupLock = NSLock()

/// Destroys test domains when the test process ends, even after failures.
func removeAtExit(_ name: String) {
    cleanupLock.lock()
    defer { cleanupLock.unlock() }
    // VIRTCHAN_TEST_KEEP=1 leaves the domains for a post-mortem.
    if domainsToRemove.isEmpty && ProcessInfo.processInfo.environment["VIRTCHAN_TEST_KEEP"] != "1" {
        atexit {
            for d in domainsToRemove { _ = VC.run(["destroy", d, "--force"], timeout: 60) }
        }
    }
    domainsToRemove.insert(name)
}

/// One tiny guest booted once and shared by every suite that can share it.
enum SharedGuest {
    static let name = "vctest-shared"

    /// Boots it on first use; records how long create took until the agent answered.
    static let boot: Result<Double, BootError> = {
        _ = VC.run(["destroy", name, "--force"], timeout: 60)
        removeAtExit(name)
        let r = VC.run(["create", name, "--accel", "tcg", "--memory", "2048", "--qemu-ga"], timeout: 300)
        guard r.code == 0 else { return .failure(BootError(message: "create failed (\(r.code)): \(r.stderr) \(r.out)")) }
        return .success(r.seconds)
    }()

    struct BootError: Error, CustomStringConvertible {
        let message: String
        var description: String { message }
    }

    /// Fails the calling test when the shared guest could not boot.
    static func require() throws {
        if case .failure(let e) = boot { throw e }
        // A test that killed the agent leaves it restarting; wait for it.
        let w = VC.run(["wait", name, "--timeout", "60"], timeout: 90)
        if w.code != 0 { throw BootError(message: "agent not ready: \(w.stderr)") }
    }
}

/// A tmpfs of `size` ("1m") mounted at `path`, a disk that fills up; the function returned
/// unmounts it.
func smallFileSystem(at path: String, size: String) throws -> () -> Void {
    try FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true)
    let mounted = VC.runProgram("/bin/mount", ["-t", "tmpfs", "-o", "size=\(size)", "tmpfs", path])
    try #require(mounted.code == 0, "cannot mount a tmpfs at \(path): \(mounted.stderr)")
    return { _ = VC.runProgram("/bin/umount", [path]) }
}
