// Measures virtchan against qemu-guest-agent and against the bare virtio-serial port, in one
// tiny guest, and prints one key=value line per figure. Run it through Scripts/bench.
import Foundation
import VirtchanKit

signal(SIGPIPE, SIG_IGN)

/// The host copy of the test file and its pulled copy, which the data path writes: removed
/// however the run ends.
let scratchFile = "/tmp/virtchan-bench-\(getpid())"
let scratchBack = scratchFile + ".back"

func removeScratchFiles() {
    unlink(scratchFile)
    unlink(scratchBack)
}

func fail(_ message: String) -> Never {
    removeScratchFiles()
    FileHandle.standardError.write(Data("virtchan-bench: \(message)\n".utf8))
    exit(1)
}

let args = CommandLine.arguments
guard args.count >= 3 else { fail("usage: virtchan-bench DOMAIN VIRTCHAN_BINARY [FILE_MIB] [QGA_FILE_MIB] [REMOTE_URI]") }
let domainName = args[1]
let virtchanBinary = args[2]
let fileMiB = args.count > 3 ? Int(args[3]) ?? 128 : 128
let qgaMiB = args.count > 4 ? Int(args[4]) ?? 16 : 16
/// The same domain through libvirt's remote transport (qemu+tcp on loopback), for the remote figures.
let remoteURI = args.count > 5 ? args[5] : nil
let fileBytes = fileMiB << 20
let rounds = 15
/// Interleaved rounds of each transfer: a single 128 MiB transfer here varies by a fifth from
/// one to the next, and with five rounds a ratio's median moved by 0.1-0.2 between runs.
let transferRounds = 11

func median(_ xs: [Double]) -> Double { let s = xs.sorted(); return s[s.count / 2] }
func now() -> Double { Double(monotonicNanos()) / 1e9 }
func say(_ line: String) { FileHandle.standardOutput.write(Data((line + "\n").utf8)) }
func emit(_ key: String, _ value: Double, _ digits: Int = 2) { say("\(key)=\(String(format: "%.\(digits)f", value))") }

// In-process sessions and the bare port need the channel to themselves: no session holder.
let hypervisor = Hypervisor(sharing: .direct)
let domain: Domain
do { domain = try hypervisor.domain(domainName) } catch { fail("\(error)") }

/// The domain's endpoint, resolved as every virtchan command resolves it.
func endpoint() throws -> AgentEndpoint { try hypervisor.endpoint(of: domainName) }

/// Stops every session holder of the domain (local and remote) and waits until they are gone.
func releaseChannels() {
    for record in Hypervisor.holders() where record.domain == domainName { Hypervisor.stop(record) }
}

/// Runs `body` with a session that is closed again afterwards (the channel is exclusive).
func withSession<T>(_ body: (AgentSession) throws -> T) throws -> T {
    releaseChannels()
    // A session that a helper thread of the previous round still references lets go of the
    // channel a moment later.
    var attempts = 0
    while true {
        do {
            let session = try AgentSession.connect(endpoint(), timeout: 60)
            return try withExtendedLifetime(session) { try body(session) }
        } catch let error as TransportError where error.code == .busy && attempts < 100 {
            attempts += 1
            usleep(20_000)
        }
    }
}

/// Milliseconds of each of `rounds` runs of `true` over an open session, in process.
func execTimes(_ session: AgentSession) throws -> [Double] {
    var times: [Double] = []
    for _ in 0..<rounds {
        let t = now()
        var o = ExecOptions(argv: ["true"])
        o.forwardStdin = false
        _ = try ExecClient.run(session, o)
        times.append((now() - t) * 1000)
    }
    return times
}

/// A guest command's stdout, over an open session.
func guestRun(_ session: AgentSession, _ shell: String) throws -> String {
    let out = try ExecClient.capture(session, ["/bin/sh", "-c", shell], timeout: nil)
    guard out.status == 0 else { throw TransportError(.remote, "guest command failed (\(out.status)): \(shell)") }
    return out.stdoutText
}

func qga(_ json: String, timeout: Int32 = 60) throws -> Any? {
    let reply = try domain.qemuAgentCommand(json, timeoutSeconds: timeout)
    let obj = try JSONSerialization.jsonObject(with: Data(reply.utf8)) as? [String: Any]
    return obj?["return"]
}

final class StatusBox: @unchecked Sendable { var value: Int32 = -1 }

/// Runs the CLI and waits for it with waitpid (Foundation's Process polls its exit in 50 ms
/// steps, which would swamp the figure being measured).
func runCLI(_ arguments: [String]) -> Int32 {
    var actions = posix_spawn_file_actions_t()
    posix_spawn_file_actions_init(&actions)
    defer { posix_spawn_file_actions_destroy(&actions) }
    posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0)
    posix_spawn_file_actions_addopen(&actions, 1, "/dev/null", O_WRONLY, 0)
    let argv = ([virtchanBinary] + arguments).map { strdup($0) } + [nil]
    defer { for p in argv { free(p) } }
    var pid: pid_t = 0
    guard posix_spawn(&pid, virtchanBinary, &actions, nil, argv, environ) == 0 else { return -1 }
    var status: Int32 = 0
    while waitpid(pid, &status, 0) < 0 && errno == EINTR {}
    return (status & 0x7f) == 0 ? (status >> 8) & 0xff : 128 + (status & 0x7f)
}

/// Writes `count` bytes of `buffer` (repeated) into a connected socket.
func writeAll(_ fd: Int32, _ buffer: UnsafeRawBufferPointer, total: Int) -> Bool {
    setNonBlocking(fd, false)
    var sent = 0
    while sent < total {
        let n = write(fd, buffer.baseAddress!, min(buffer.count, total - sent))
        if n <= 0 { return false }
        sent += n
    }
    return true
}

do {
    let ep = try endpoint()
    guard let dataSocket = ep.dataSocket else { fail("no data channel") }
    var qgaUp = false
    for _ in 0..<150 where !qgaUp {
        qgaUp = (try? qga("{\"execute\":\"guest-ping\"}", timeout: 2)) != nil
        if !qgaUp { usleep(200_000) }
    }
    guard qgaUp else { fail("qemu-guest-agent does not answer in \(domainName) (create the domain with --qemu-ga)") }
    let dataPort = try withSession { s in
        try guestRun(s, "for p in /sys/class/virtio-ports/*; do [ \"$(cat $p/name)\" = org.virtchan.data ] && echo /dev/${p##*/}; done; true")
    }.trimmingCharacters(in: .whitespacesAndNewlines)
    guard dataPort.hasPrefix("/dev/vport") else { fail("cannot find the data port in the guest") }

    // VIRTCHAN_BENCH_ONLY=control stops after the control path, =transfer skips it and stops
    // after the local transfers (for quick rounds on one path).
    let only = ProcessInfo.processInfo.environment["VIRTCHAN_BENCH_ONLY"]

    // --- control path -------------------------------------------------------------------
    if only != "transfer" {
        try withSession { s in
            var pings: [Double] = []
            for _ in 0..<5 { _ = try s.ping() }
            for _ in 0..<200 { pings.append(try s.ping() * 1000) }
            emit("ping_ms", median(pings), 3)
            emit("exec_session_ms", median(try execTimes(s)))
        }
        var qgaPings: [Double] = []
        for _ in 0..<5 { _ = try qga("{\"execute\":\"guest-ping\"}") }
        for _ in 0..<200 {
            let t = now()
            _ = try qga("{\"execute\":\"guest-ping\"}")
            qgaPings.append((now() - t) * 1000)
        }
        emit("qga_ping_ms", median(qgaPings), 3)

        // The same through a session holder, in process: what the holder's hop adds.
        do {
            let held = try Hypervisor(sharing: .holder(persist: 30)).session(with: domainName, timeout: 60)
            emit("exec_held_session_ms", median(try execTimes(held)))
        }

        // qemu-guest-agent's exec: guest-exec with its output captured, then guest-exec-status
        // every 2 ms until it has exited, on the one connection.
        func qgaExecOnce() throws -> Double {
            let t = now()
            let started = try qga("{\"execute\":\"guest-exec\",\"arguments\":{\"path\":\"/bin/true\",\"capture-output\":true}}") as? [String: Any]
            guard let pid = started?["pid"] as? Int else { fail("guest-exec gave no pid") }
            while true {
                let st = try qga("{\"execute\":\"guest-exec-status\",\"arguments\":{\"pid\":\(pid)}}") as? [String: Any]
                if st?["exited"] as? Bool == true { break }
                usleep(2000)
            }
            return (now() - t) * 1000
        }

        // The whole CLI with a warm session holder, then with no holder (each command starts one
        // that ends with it, and the next command waits until it is gone, off the clock); each
        // round in turn with qemu-guest-agent's exec, so that whatever else the machine does falls
        // on both alike.
        var cli: [Double] = [], cold: [Double] = [], qgaExec: [Double] = []
        guard runCLI(["exec", domainName, "-n", "--", "true"]) == 0 else { fail("virtchan exec failed") }
        _ = try qgaExecOnce()
        for _ in 0..<(2 * rounds + 1) {
            let t = now()
            guard runCLI(["exec", domainName, "-n", "--", "true"]) == 0 else { fail("virtchan exec failed") }
            cli.append((now() - t) * 1000)
            qgaExec.append(try qgaExecOnce())
        }
        // As many rounds as warm: a single start without a holder varies by a third from one to
        // the next, and fifteen left the median moving by a tenth between runs.
        for _ in 0..<(2 * rounds + 1) {
            releaseChannels()
            let t = now()
            guard runCLI(["exec", domainName, "--persist", "0", "-n", "--", "true"]) == 0 else { fail("virtchan exec failed") }
            cold.append((now() - t) * 1000)
            qgaExec.append(try qgaExecOnce())
        }
        releaseChannels()
        emit("exec_ms", median(cli))
        emit("exec_cold_ms", median(cold))
        emit("qga_exec_ms", median(qgaExec))
    }
    if only == "control" { exit(0) }

    // --- data path ----------------------------------------------------------------------
    let local = scratchFile, back = scratchBack
    defer { removeScratchFiles() }
    do {
        var rng = SystemRandomNumberGenerator()
        var data = Data(count: fileBytes)
        data.withUnsafeMutableBytes { (raw: UnsafeMutableRawBufferPointer) in
            for i in stride(from: 0, to: raw.count, by: 8) { raw.storeBytes(of: rng.next(), toByteOffset: i, as: UInt64.self) }
        }
        try data.write(to: URL(fileURLWithPath: local))
    }
    let guestFile = "/tmp/bench.bin", guestRaw = "/tmp/bench.raw"
    func clearGuest() throws { _ = try withSession { try guestRun($0, "rm -f \(guestFile) \(guestRaw) /tmp/qga.bin") } }
    try clearGuest()

    /// Waits until libvirt's live XML shows the guest holding the data port open; a guest
    /// whose `dd` has not opened it within 30 s ends the bench.
    func waitUntilDataPortConnected() {
        let deadline = now() + 30
        while (try? ChannelResolver.channels(inDomainXML: domain.xml()))?.first(where: { $0.role == .data })?.state != "connected" {
            if now() > deadline { fail("the guest did not open its data port within 30 s for the bare-port transfer") }
            usleep(1000)
        }
    }

    var pushes: [Double] = [], pulls: [Double] = []
    /// One round of virtchan push and pull through a warm session holder.
    func cliRound(uri: String? = nil, into pushes: inout [Double], _ pulls: inout [Double]) throws {
        let connect = uri.map { ["--connect", $0] } ?? []
        guard runCLI(["ping", domainName, "-n", "1"] + connect) == 0 else { fail("virtchan ping failed") }
        let t = now()
        guard runCLI(["push", domainName, local, guestFile, "--quiet"] + connect) == 0 else { fail("virtchan push failed") }
        pushes.append(Double(fileMiB) / (now() - t))
        // Into a fresh file, as the bare port's pull: replacing the last round's copy would add
        // the freeing of its blocks to this clock.
        unlink(back)
        let u = now()
        guard runCLI(["pull", domainName, guestFile, back, "--quiet"] + connect) == 0 else { fail("virtchan pull failed") }
        pulls.append(Double(fileMiB) / (now() - u))
        try clearGuest()
    }

    // The bare port: the same bytes through the same socket, dd on the guest side, into the
    // same directory a push lands in.
    let chunk = UnsafeMutableRawBufferPointer.allocate(byteCount: 1 << 20, alignment: 16)
    defer { chunk.deallocate() }
    let src = open(local, O_RDONLY)
    _ = read(src, chunk.baseAddress!, chunk.count)
    close(src)
    var rawPush: [Double] = [], rawPull: [Double] = []
    // Warm-up: the first writes into a fresh guest's tmpfs pay for its page faults.
    try cliRound(into: &pushes, &pulls)
    pushes = []; pulls = []
    for _ in 0..<transferRounds {
        try cliRound(into: &pushes, &pulls)
        try withSession { s in
            let fd = try UnixSocket.connect(dataSocket)
            let status = StatusBox()
            var t = 0.0
            let ddDone = DispatchSemaphore(value: 0)
            nonisolated(unsafe) let session = s
            Thread.detachNewThread {
                var o = ExecOptions(argv: ["/bin/sh", "-c", "dd if=\(dataPort) of=\(guestRaw) bs=64k count=\(fileMiB * 16) iflag=fullblock 2>/dev/null"])
                o.forwardStdin = false
                status.value = (try? ExecClient.run(session, o, stdin: 0, terminal: 1) { _, _ in true })?.status ?? -1
                ddDone.signal()
            }
            // Bytes sent to a port the guest has not opened yet are dropped.
            waitUntilDataPortConnected()
            t = now()
            let f = open(local, O_RDONLY)
            var sent = 0
            setNonBlocking(fd, false)
            while sent < fileBytes {
                let n = read(f, chunk.baseAddress!, chunk.count)
                if n <= 0 { break }
                guard writeAll(fd, UnsafeRawBufferPointer(rebasing: chunk[0..<n]), total: n) else { break }
                sent += n
            }
            close(f)
            // dd stops after exactly the file's size; the host hangs up only then, because
            // bytes still queued when a side closes are lost.
            ddDone.wait()
            close(fd)
            rawPush.append(Double(fileMiB) / (now() - t))
            guard status.value == 0 else { throw TransportError(.remote, "guest dd failed") }
            let landed = try guestRun(s, "stat -c %s \(guestRaw)").trimmingCharacters(in: .whitespacesAndNewlines)
            guard landed == String(fileBytes) else { throw TransportError(.io, "raw push delivered \(landed) of \(fileBytes) bytes") }
        }
        // Raw pull: the guest writes the file into the port, the host reads it off the socket
        // into a fresh file; the clock runs from the first byte received to the last written.
        try withSession { s in
            unlink(back)
            let out = open(back, O_WRONLY | O_CREAT | O_TRUNC, 0o644)
            let fd = try UnixSocket.connect(dataSocket)
            setNonBlocking(fd, false)
            nonisolated(unsafe) let session = s
            let ddDone = DispatchSemaphore(value: 0)
            Thread.detachNewThread {
                // The port stays open (the shell holds it) until the host has read everything:
                // bytes still queued when the guest closes a port are lost.
                var o = ExecOptions(argv: ["/bin/sh", "-c", "exec 3>\(dataPort); dd if=\(guestRaw) bs=64k >&3 2>/dev/null; read -t 30 x <&3; true"])
                o.forwardStdin = false
                _ = try? ExecClient.run(session, o, stdin: 0, terminal: 1) { _, _ in true }
                ddDone.signal()
            }
            defer { ddDone.wait() }
            waitUntilDataPortConnected()
            var first: Double?
            var got = 0
            while got < fileBytes {
                let n = read(fd, chunk.baseAddress!, chunk.count)
                if n <= 0 { break }
                if first == nil { first = now() }
                _ = write(out, chunk.baseAddress!, n)
                got += n
            }
            close(out)
            rawPull.append(Double(fileMiB) / (now() - (first ?? now())))
            close(fd) // the guest's read sees the hang-up and the shell ends
            guard got == fileBytes else { throw TransportError(.io, "raw pull got \(got) of \(fileBytes) bytes") }
        }
        try clearGuest()
    }
    emit("push_mib_s", median(pushes), 1)
    emit("pull_mib_s", median(pulls), 1)
    emit("raw_push_mib_s", median(rawPush), 1)
    emit("raw_pull_mib_s", median(rawPull), 1)
    if only == "transfer" {
        removeScratchFiles()
        exit(0)
    }

    // --- forwarded TCP: a guest httpd reached through `virtchan forward` ------------------
    do {
        let part = fileBytes / 20
        _ = try withSession { try guestRun($0, "mkdir -p /tmp/www") }
        guard runCLI(["push", domainName, local, "/tmp/www/big", "--quiet"]) == 0 else { fail("virtchan push failed") }
        _ = try withSession { try guestRun($0, "head -c \(part) /tmp/www/big > /tmp/www/part; ln -sf /bin/busybox /tmp/httpd; /tmp/httpd -p 127.0.0.1:9100 -h /tmp/www") }
        let forward = Process()
        forward.executableURL = URL(fileURLWithPath: virtchanBinary)
        forward.arguments = ["forward", domainName, "0:127.0.0.1:9100"]
        let out = Pipe()
        forward.standardOutput = out
        try forward.run()
        var printed = ""
        while !printed.contains("Serving") {
            let d = out.fileHandleForReading.availableData
            if d.isEmpty { fail("virtchan forward ended: \(printed)") }
            printed += String(decoding: d, as: UTF8.self)
        }
        guard let port = printed.split(separator: " ").first(where: { $0.hasPrefix("127.0.0.1:") })
            .flatMap({ UInt16($0.split(separator: ":")[1]) }) else { fail("no forwarded port in: \(printed)") }
        var single: [Double] = [], many: [Double] = []
        _ = httpDownload(port: port, path: "part")
        for _ in 0..<3 {
            let one = httpDownload(port: port, path: "big")
            guard one.bytes >= fileBytes else { fail("a forwarded download got \(one.bytes) of \(fileBytes) bytes") }
            single.append(Double(one.bytes) / 1048576 / (one.last - one.first))
            let runs = httpDownloads(port: port, path: "part", count: 20)
            guard runs.allSatisfy({ $0.bytes >= part }) else { fail("a forwarded download came up short") }
            let total = runs.reduce(0) { $0 + $1.bytes }
            many.append(Double(total) / 1048576 / (runs.map(\.last).max()! - runs.map(\.first).min()!))
        }
        kill(forward.processIdentifier, SIGINT)
        forward.waitUntilExit()
        _ = try withSession { try guestRun($0, "killall httpd; rm -rf /tmp/www; true") }
        emit("forward_one_mib_s", median(single), 1)
        emit("forward_20_mib_s", median(many), 1)
    }

    // --- over libvirt's remote transport, beside the same jobs done locally -----------------
    if let remoteURI {
        var remoteExec: [Double] = [], localExec: [Double] = []
        var remotePush: [Double] = [], remotePull: [Double] = [], localPush: [Double] = [], localPull: [Double] = []
        for _ in 0..<transferRounds {
            for uri in [remoteURI, nil] as [String?] {
                releaseChannels()
                let connect = uri.map { ["--connect", $0] } ?? []
                guard runCLI(["exec", domainName, "-n"] + connect + ["--", "true"]) == 0 else { fail("virtchan exec failed on \(uri ?? "local")") }
                var times: [Double] = []
                for _ in 0..<rounds {
                    let t = now()
                    guard runCLI(["exec", domainName, "-n"] + connect + ["--", "true"]) == 0 else { fail("virtchan exec failed") }
                    times.append((now() - t) * 1000)
                }
                if uri != nil {
                    remoteExec.append(median(times))
                    try cliRound(uri: uri, into: &remotePush, &remotePull)
                } else {
                    localExec.append(median(times))
                    try cliRound(into: &localPush, &localPull)
                }
            }
        }
        releaseChannels()
        emit("tcp_exec_ms", median(remoteExec))
        emit("tcp_local_exec_ms", median(localExec))
        emit("tcp_push_mib_s", median(remotePush), 1)
        emit("tcp_pull_mib_s", median(remotePull), 1)
        emit("tcp_local_push_mib_s", median(localPush), 1)
        emit("tcp_local_pull_mib_s", median(localPull), 1)
    }

    // qemu-guest-agent: base64 in JSON, 48 KiB chunks, the largest that works reliably.
    let qgaBytes = qgaMiB << 20
    let qgaChunk = 48 * 1024
    let payload = try Data(contentsOf: URL(fileURLWithPath: local)).prefix(qgaBytes)
    var t = now()
    let h = try qga("{\"execute\":\"guest-file-open\",\"arguments\":{\"path\":\"/tmp/qga.bin\",\"mode\":\"w\"}}") as? Int ?? -1
    var off = 0
    while off < qgaBytes {
        let piece = payload[payload.startIndex + off ..< payload.startIndex + min(qgaBytes, off + qgaChunk)]
        _ = try qga("{\"execute\":\"guest-file-write\",\"arguments\":{\"handle\":\(h),\"buf-b64\":\"\(piece.base64EncodedString())\"}}")
        off += piece.count
    }
    _ = try qga("{\"execute\":\"guest-file-close\",\"arguments\":{\"handle\":\(h)}}")
    emit("qga_push_mib_s", Double(qgaMiB) / (now() - t), 2)
    t = now()
    let r = try qga("{\"execute\":\"guest-file-open\",\"arguments\":{\"path\":\"/tmp/qga.bin\",\"mode\":\"r\"}}") as? Int ?? -1
    var pulled = 0
    while true {
        let part = try qga("{\"execute\":\"guest-file-read\",\"arguments\":{\"handle\":\(r),\"count\":\(qgaChunk)}}") as? [String: Any]
        let n = part?["count"] as? Int ?? 0
        pulled += Data(base64Encoded: part?["buf-b64"] as? String ?? "")?.count ?? 0
        if n == 0 || part?["eof"] as? Bool == true { break }
    }
    _ = try qga("{\"execute\":\"guest-file-close\",\"arguments\":{\"handle\":\(r)}}")
    emit("qga_pull_mib_s", Double(pulled) / 1_048_576 / (now() - t), 2)
    say("file_mib=\(fileMiB)")
    say("qga_file_mib=\(qgaMiB)")
    try clearGuest()
} catch {
    fail("\(error)")
}
