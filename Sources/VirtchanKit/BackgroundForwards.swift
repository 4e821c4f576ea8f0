import Foundation
import VirtchanProtocol
import VirtchanTransport

/// A `virtchan forward --background` process, as `virtchan forward --list` shows it.
public struct ForwardRecord: Sendable, Codable, Equatable {
    public var domain: String
    public var uri: String
    public var pid: Int32
    /// What it serves, as bound ("127.0.0.1:8080 -> guest 127.0.0.1:80").
    public var forwards: [String]
    /// Its files are this path plus `.json` (the record), `.lock` (held while it runs) and
    /// `.log` (what went wrong with single connections).
    public var path: String
}

extension Hypervisor {
    /// Where background forwards keep their records, locks and logs.
    public static var forwardDirectory: String { runtimeDirectory + "/forwards" }

    /// Forwards `specs` for `name` in a process of its own, which outlives this one and serves
    /// until it is stopped (`stop(_:)` with its record, or SIGTERM) or the domain's session
    /// ends. Returns once every port is bound; throws, leaving nothing running, when one
    /// cannot be.
    public func forwardInBackground(_ name: String, specs: [ForwardSpec], timeout: Double = 30) throws -> ForwardRecord {
        makePrivateDirectories(Self.forwardDirectory)
        let path = Self.forwardDirectory + "/" + fileStem(for: name) + "-" + String(UInt32.random(in: 0...UInt32.max), radix: 16)
        var pipeFDs: [Int32] = [-1, -1]
        guard pipe(&pipeFDs) == 0 else { throw VirtchanError(.io, "pipe: \(String(cString: strerror(errno)))") }
        for fd in pipeFDs { _ = fcntl(fd, F_SETFD, FD_CLOEXEC) }
        defer { close(pipeFDs[0]) }
        var args = ["forward", "--connect", uri, "--ready-fd", "3", "--record", path]
        if case .holder(let persist) = sharing { args += ["--persist", String(persist)] }
        if allowsUnkeyedAgents { args.append("--insecure-agent") }
        for spec in specs where spec.direction == .remote { args += ["-R", spec.description] }
        args += ["--", name] + specs.filter { $0.direction == .local }.map(\.description)
        try Self.spawnDetached(args, ready: pipeFDs[1], log: path + ".log", what: "the background forward")
        let what = "the background forward of \(name)"
        _ = try Self.readyLine(pipeFDs[0], timeout: timeout + 5, what: what, log: path + ".log")
        guard let data = FileManager.default.contents(atPath: path + ".json"),
              let record = try? JSONDecoder().decode(ForwardRecord.self, from: data) else {
            throw BackgroundProcess.endedBeforeServing(what, log: path + ".log")
        }
        return record
    }

    /// Serves `specs` for `name` until SIGTERM, SIGINT or the end of the domain's session (the
    /// hidden side of ``forwardInBackground(_:specs:timeout:)``): reports `ready` or
    /// `error ...` on `ready`, keeps its record at `path` while it serves, and removes every
    /// file it made when it ends. Returns the process's exit status.
    public func serveForwards(_ name: String, specs: [ForwardSpec], path: String, ready: Int32) -> Int32 {
        func log(_ line: String) {
            _ = Array("virtchan forward \(name): \(displaySafe(line, limit: 8192))\n".utf8).withUnsafeBytes { writeFully(2, $0) }
        }
        Interruption.install()
        signal(SIGPIPE, SIG_IGN)
        BackgroundProcess.closeInheritedDescriptors(keeping: [ready])
        let lockFD = BackgroundProcess.takeLock(path)
        defer {
            for suffix in Self.forwardFiles { unlink(path + suffix) }
            if let lockFD { close(lockFD) }
        }
        func report(_ line: String) {
            _ = Array((line + "\n").utf8).withUnsafeBytes { writeFully(ready, $0) }
            close(ready)
        }
        let forwarder: PortForwarder
        do {
            guard lockFD != nil else { throw VirtchanError(.io, "cannot lock \(path).lock: \(String(cString: strerror(errno)))") }
            forwarder = PortForwarder(session: try session(with: name, timeout: 10), specs: specs, note: log)
            try forwarder.start()
            let record = ForwardRecord(domain: name, uri: uri, pid: getpid(), forwards: forwarder.bound.map(\.description), path: path)
            try writePrivateFile(path + ".json", JSONEncoder().encode(record), durable: false)
            log("serving (pid \(getpid())): " + record.forwards.joined(separator: ", "))
        } catch {
            log("cannot serve: \(error)")
            report(Self.encodeReadyError(error))
            return 1
        }
        report("ready")
        do {
            try forwarder.run()
        } catch where error.code == .interrupted {
            return 0
        } catch {
            log("ended: \(error)")
            return 1
        }
        return 0
    }

    /// The background forward, of any domain on any URI, that listens where `spec` would
    /// (its host address and port), if one does.
    public static func backgroundForward(listeningAs spec: ForwardSpec) -> ForwardRecord? {
        guard spec.direction == .local, spec.bindPort != 0 else { return nil }
        let bound = "\(spec.bindHost):\(spec.bindPort) "
        return backgroundForwards().first { $0.forwards.contains { $0.hasPrefix(bound) } }
    }

    /// The background forwards running for this user, on any URI. One whose process is gone
    /// (killed) leaves files that go here.
    public static func backgroundForwards() -> [ForwardRecord] {
        let dir = forwardDirectory
        let names = (try? FileManager.default.contentsOfDirectory(atPath: dir)) ?? []
        var records: [ForwardRecord] = []
        for file in names where file.hasSuffix(".lock") {
            let path = dir + "/" + file.dropLast(5)
            guard isLive(path) else { continue }
            guard let data = FileManager.default.contents(atPath: path + ".json"),
                  let record = try? JSONDecoder().decode(ForwardRecord.self, from: data) else { continue }
            records.append(record)
        }
        return records.sorted { ($0.uri, $0.domain, $0.pid) < ($1.uri, $1.domain, $1.pid) }
    }

    /// Whether the forward whose files start with `path` still runs; when it does not, its
    /// files go.
    private static func isLive(_ path: String) -> Bool {
        BackgroundProcess.isLocked(path, files: forwardFiles)
    }

    /// What a background forward makes beside the path in its record.
    static let forwardFiles = [".json", ".log", ".lock"]

    /// Sends SIGTERM and waits for the forward to let go of its lock; whether it did in time.
    @discardableResult
    public static func stop(_ record: ForwardRecord, timeout: Double = 5) -> Bool {
        terminate(record.pid, lockedAt: record.path, files: forwardFiles, timeout: timeout)
    }
}
