import Foundation
import Testing
import VirtchanKit

/// A `virtchan forward` running in the background, with the ports it printed.
final class RunningForward {
    let process: Background
    /// "HOST:PORT -> guest …" and "guest HOST:PORT -> …", in the order given.
    let ports: [UInt16]

    init(_ args: [String]) throws {
        let process = try Background(["forward", SharedGuest.name] + args)
        _ = eventually(30) { process.seen.contains { $0.1 == "Serving until Ctrl-C" } || !process.isRunning }
        // "Forwarding 127.0.0.1:PORT -> …" or "Forwarding guest 127.0.0.1:PORT -> …".
        ports = process.seen.compactMap { line -> UInt16? in
            guard line.1.hasPrefix("Forwarding ") else { return nil }
            let address = line.1.split(separator: " ").first { $0.contains(":") } ?? ""
            return address.split(separator: ":").last.flatMap { UInt16($0) }
        }
        self.process = process
    }

    func stop() -> Int32? {
        kill(process.process.processIdentifier, SIGINT)
        return process.wait(10)
    }
}

extension EndToEnd {
    /// Issue 13, item 2: TCP ports reached over the channel, with no network in the guest.
    @Suite struct Forward {
        let web = "/tmp/vctest-www"

        /// busybox httpd on the guest's loopback, serving a 5 MiB file; returns its SHA-256.
        func serveInGuest() throws -> String {
            try SharedGuest.require()
            let r = VC.guest("""
                mkdir -p \(web); [ -s \(web)/big ] || head -c 5242880 /dev/urandom > \(web)/big
                ln -sf /bin/busybox /tmp/httpd  # under its own name, for killall
                /tmp/httpd -p 127.0.0.1:8080 -h \(web) 2>/dev/null  # fails harmlessly while one serves the port
                sha256sum \(web)/big
                """)
            guard r.code == 0, let sum = r.out.split(separator: " ").first else {
                throw SharedGuest.BootError(message: "cannot start httpd in the guest: \(r.stderr)")
            }
            return String(sum)
        }

        func curl(_ port: UInt16, to file: String? = nil) -> RunResult {
            VC.runProgram("/usr/bin/curl", ["-sS", "--max-time", "60", "-o", file ?? "/dev/null", "http://127.0.0.1:\(port)/big"], timeout: 90)
        }

        @Test func twentyDownloadsAtOnceAreByteExact() throws {
            let sum = try serveInGuest()
            let forward = try RunningForward(["0:127.0.0.1:8080"])
            defer { _ = forward.stop() }
            let port = try #require(forward.ports.first)
            let results = Results()
            for i in 0..<20 {
                Thread {
                    let file = "/tmp/vctest-fwd-\(i)"
                    defer { unlink(file) }
                    let r = self.curl(port, to: file)
                    let local = VC.runProgram("/usr/bin/sha256sum", [file]).out.split(separator: " ").first.map(String.init)
                    results.add(r.code == 0 && local == sum)
                }.start()
            }
            #expect(results.wait(for: 20, seconds: 120))
            #expect(results.all { $0 })
            #expect(forward.stop() == 130)
        }

        @Test func aClientThatStopsReadingHoldsUpNobody() throws {
            _ = try serveInGuest()
            let forward = try RunningForward(["0:127.0.0.1:8080"])
            defer { _ = forward.stop() }
            let port = try #require(forward.ports.first)
            // Asks for the file and never reads a byte of it.
            let stalled = try TcpClient(port: port)
            stalled.send("GET /big HTTP/1.0\r\n\r\n")
            Thread.sleep(forTimeInterval: 1)
            for _ in 0..<3 { #expect(curl(port).code == 0) }
            // exec and push on the same domain meanwhile.
            #expect(VC.guest("echo still here").out == "still here\n")
            let file = "/tmp/vctest-fwd-push"
            try makeFile(file, size: 1 << 20)
            defer { unlink(file) }
            #expect(VC.run(["push", SharedGuest.name, file, "/tmp/fwd-push"], timeout: 60).code == 0)
            stalled.close()
        }

        @Test func aHalfClosedClientGetsTheWholeReply() throws {
            try SharedGuest.require()
            // A guest service that answers only once its client has finished sending.
            #expect(VC.guest("""
                printf '#!/bin/sh\\nwc -c\\n' > /tmp/count.sh; chmod +x /tmp/count.sh
                ln -sf /bin/busybox /tmp/nc
                pidof nc >/dev/null || (/tmp/nc -ll -p 9001 -e /tmp/count.sh </dev/null >/dev/null 2>&1 &)
                """).code == 0)
            let forward = try RunningForward(["0:127.0.0.1:9001"])
            defer { _ = forward.stop() }
            let port = try #require(forward.ports.first)
            for size in [0, 1, 65_537, 3_000_000] {
                let c = try TcpClient(port: port)
                c.send(String(repeating: "x", count: size))
                c.shutdownWrite()
                #expect(c.readAll().trimmingCharacters(in: .whitespacesAndNewlines) == "\(size)")
                c.close()
            }
        }

        @Test func aGuestServiceThatGoesAwayResetsItsClients() throws {
            _ = try serveInGuest()
            let forward = try RunningForward(["0:127.0.0.1:8080"])
            defer { _ = forward.stop() }
            let port = try #require(forward.ports.first)
            #expect(curl(port).code == 0)
            #expect(VC.guest("killall httpd; sleep 0.2; ! pidof httpd").code == 0)
            let gone = curl(port)
            #expect(gone.code == 56 || gone.code == 52, "curl: \(gone.code) \(gone.stderr)")
            #expect(gone.seconds < 20)
            // The forward goes on: the service back, the next download works.
            _ = try serveInGuest()
            #expect(curl(port).code == 0)
        }

        @Test func aGuestReachesAHostServiceThroughAReverseForward() throws {
            try SharedGuest.require()
            let dir = "/tmp/vctest-host-www"
            try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
            try "from the host\n".write(toFile: dir + "/hello.txt", atomically: true, encoding: .utf8)
            let (probe, hostPort) = try TcpSocket.listen(host: "127.0.0.1", port: 0)
            close(probe)
            let httpd = Process()
            httpd.executableURL = URL(fileURLWithPath: "/bin/busybox")
            httpd.arguments = ["httpd", "-f", "-p", "127.0.0.1:\(hostPort)", "-h", dir]
            // Not this process's output: a server left behind must not hold the test runner's pipe.
            httpd.standardOutput = FileHandle.nullDevice
            httpd.standardError = FileHandle.nullDevice
            try launch(httpd)
            defer { kill(httpd.processIdentifier, SIGKILL); _ = reap(httpd, until: Date().addingTimeInterval(5)) }
            // The server listens a moment after it starts; the guest's request must not be first.
            let serving = eventually(10) {
                VC.runProgram("/usr/bin/curl", ["-s", "-o", "/dev/null", "http://127.0.0.1:\(hostPort)/hello.txt"], timeout: 5).code == 0
            }
            try #require(serving, "the host's httpd did not start")
            let forward = try RunningForward(["-R", "0:127.0.0.1:\(hostPort)"])
            defer { _ = forward.stop() }
            let guestPort = try #require(forward.ports.first)
            let r = VC.guest("wget -q -O - http://127.0.0.1:\(guestPort)/hello.txt")
            #expect(r.code == 0, "\(r.stderr)")
            #expect(r.out == "from the host\n")
        }

        /// --background returns once the port is bound; the forward serves after the command
        /// has ended, shows in --list, and --stop ends it and takes its files. One killed with
        /// SIGKILL leaves nothing that --list shows.
        @Test func aBackgroundForwardServesUntilStopped() throws {
            let sum = try serveInGuest()
            func running() throws -> [ForwardRecord] {
                let r = VC.run(["forward", "--list", "--json"])
                try #require(r.code == 0, "\(r.stderr)")
                return try JSONDecoder().decode([ForwardRecord].self, from: Data(r.out.utf8)).filter { $0.domain == SharedGuest.name }
            }
            func leftFiles(_ record: ForwardRecord) -> [String] {
                ((try? FileManager.default.contentsOfDirectory(atPath: Hypervisor.forwardDirectory)) ?? [])
                    .filter { $0.hasPrefix((record.path as NSString).lastPathComponent + ".") }
            }
            let started = VC.run(["forward", SharedGuest.name, "0:127.0.0.1:8080", "--background"], timeout: 60)
            try #require(started.code == 0, "\(started.stderr)")
            #expect(started.out.contains("Serving in the background"), "\(started.out)")
            let record = try #require(try running().first)
            #expect(isRunning(record.pid))
            let port = try #require(forwardedPort(started.out))
            #expect(record.forwards == ["127.0.0.1:\(port) -> guest 127.0.0.1:8080"])

            let file = "/tmp/vctest-fwd-background"
            defer { unlink(file) }
            #expect(curl(port, to: file).code == 0)
            #expect(VC.runProgram("/usr/bin/sha256sum", [file]).out.hasPrefix(sum))

            // The port is taken: a second forward on it fails, and leaves nothing running.
            let again = VC.run(["forward", SharedGuest.name, "\(port):127.0.0.1:8080", "--background"], timeout: 60)
            #expect(again.code == 1)
            #expect(again.stderr.contains("cannot listen on 127.0.0.1:\(port): Address already in use"), "\(again.stderr)")
            // It names the forward that has the port, and how to stop it.
            #expect(again.stderr.contains("a background forward of \(SharedGuest.name) (pid \(record.pid)) listens there: stop it with: virtchan forward --stop \(SharedGuest.name)"),
                    "\(again.stderr)")
            #expect(try running().count == 1)

            let stopped = VC.run(["forward", "--stop", SharedGuest.name])
            #expect(stopped.code == 0, "\(stopped.stderr)")
            #expect(stopped.out.contains("Stopped forwarding 127.0.0.1:\(port)"), "\(stopped.out)")
            #expect(try running().isEmpty)
            #expect(eventually(5) { !isRunning(record.pid) }, "pid \(record.pid) still runs")
            #expect(curl(port).code == 7) // curl: could not connect
            #expect(leftFiles(record).isEmpty, "\(leftFiles(record))")

            // Killed outright: --list no longer shows it, and its files go. (--json: its record.)
            let json = VC.run(["forward", SharedGuest.name, "0:127.0.0.1:8080", "--background", "--json"], timeout: 60)
            try #require(json.code == 0, "\(json.stderr)")
            let killed = try JSONDecoder().decode(ForwardRecord.self, from: Data(json.out.utf8))
            #expect(try running() == [killed])
            kill(killed.pid, SIGKILL)
            #expect(eventually(10) { (try? running().isEmpty) == true })
            #expect(leftFiles(killed).isEmpty, "\(leftFiles(killed))")
        }

        @Test func badForwardsAreRefused() {
            #expect(VC.run(["forward", SharedGuest.name]).code == 64)
            #expect(VC.run(["forward", SharedGuest.name, "8080:80"]).code == 64)
            #expect(VC.run(["forward", "--list", SharedGuest.name]).code == 64)
            #expect(VC.run(["forward", "--stop"]).code == 64)
            #expect(VC.run(["forward", SharedGuest.name, "0:127.0.0.1:80", "--background", "--stop"]).code == 64)
            // The guest's side takes no names; this host's side does, and one that does not
            // resolve fails at start, with nothing left running.
            let named = VC.run(["forward", SharedGuest.name, "0:db.internal:5432"])
            #expect(named.code == 64)
            #expect(named.stderr.contains("'db.internal' is a name"), "\(named.stderr)")
            let unknown = VC.run(["forward", SharedGuest.name, "-R", "0:no-such-host.invalid:3128", "--background"], timeout: 60)
            #expect(unknown.code == 1)
            #expect(unknown.stderr.contains("cannot look up 'no-such-host.invalid'"), "\(unknown.stderr)")
            #expect(!VC.run(["forward", "--list"]).out.contains(SharedGuest.name))
            let r = VC.run(["forward", "vctest-no-such-domain", "0:127.0.0.1:80"])
            #expect(r.code == 1)
            #expect(r.stderr.contains("no domain named 'vctest-no-such-domain'"), "\(r.stderr)")
        }
    }
}

/// The host port in a "Forwarding 127.0.0.1:PORT -> guest …" line of `output`.
func forwardedPort(_ output: String) -> UInt16? {
    output.split(separator: "\n").lazy.filter { $0.hasPrefix("Forwarding ") }
        .compactMap { $0.split(separator: " ")[1].split(separator: ":").last.flatMap { UInt16($0) } }.first
}

/// Whether `pid` is a process that has not ended (a zombie has).
func isRunning(_ pid: Int32) -> Bool {
    guard let stat = try? String(contentsOfFile: "/proc/\(pid)/stat", encoding: .utf8),
          let close = stat.lastIndex(of: ")") else { return false }
    return !stat[stat.index(close, offsetBy: 2)...].hasPrefix("Z")
}

/// A plain blocking TCP client.
final class TcpClient {
    let fd: Int32
    init(port: UInt16) throws {
        let (fd, inProgress) = try TcpSocket.connect(host: "127.0.0.1", port: port)
        if inProgress {
            var p = pollfd(fd: fd, events: Int16(POLLOUT), revents: 0)
            _ = poll(&p, 1, 5000)
        }
        _ = fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) & ~O_NONBLOCK)
        var tv = timeval(tv_sec: 30, tv_usec: 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
        self.fd = fd
    }
    func send(_ text: String) { _ = Array(text.utf8).withUnsafeBytes { writeFully(fd, $0) } }
    func shutdownWrite() { shutdown(fd, Int32(SHUT_WR)) }
    func readAll() -> String {
        var out: [UInt8] = []
        var buf = [UInt8](repeating: 0, count: 65536)
        while true {
            let n = read(fd, &buf, buf.count)
            if n <= 0 { break }
            out += buf[0..<n]
        }
        return String(decoding: out, as: UTF8.self)
    }
    func close() { Glibc.close(fd) }
}

/// Outcomes that threads report, and a wait for all of them.
final class Results: @unchecked Sendable {
    private let lock = NSCondition()
    private var values: [Bool] = []
    func add(_ v: Bool) { lock.lock(); values.append(v); lock.broadcast(); lock.unlock() }
    func wait(for n: Int, seconds: Double) -> Bool {
        let deadline = Date().addingTimeInterval(seconds)
        lock.lock()
        defer { lock.unlock() }
        while values.count < n { if !lock.wait(until: deadline) { return false } }
        return true
    }
    func all(_ p: (Bool) -> Bool) -> Bool { lock.lock(); defer { lock.unlock() }; return values.allSatisfy(p) }
}
