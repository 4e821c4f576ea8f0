import Foundation
import VirtchanProtocol
import VirtchanProvisioning
import VirtchanTransport

/// One domain of a fleet command: its name and the libvirt URI it is reached by.
public struct FleetMember: Sendable, Hashable, Encodable {
    public let name: String
    public let uri: String
    public init(name: String, uri: String) {
        self.name = name
        self.uri = uri
    }
}

/// Which domains a fleet command runs on: names, every managed domain, or those whose names
/// match shell globs, on one or more libvirt URIs.
public struct FleetSelection: Sendable {
    public var names: [String] = []
    /// Every domain virtchan manages, running or not (a stopped one fails, and says so).
    public var all = false
    /// `fnmatch` patterns matched against the names of the domains virtchan manages.
    public var patterns: [String] = []
    /// nil: the default URI.
    public var uris: [String?] = [nil]
    public init() {}

    /// Whether this picks one named domain on one URI: the plain, unprefixed form of a command.
    public var isSingle: Bool { names.count == 1 && !all && patterns.isEmpty && uris.count <= 1 }
}

/// How one domain of a fleet command ended.
public struct FleetOutcome: Sendable, Encodable {
    public let name: String
    public let uri: String
    /// The command's exit status; nil when it never ran (the domain or its agent could not be
    /// reached), and then ``error`` says why.
    public let exitCode: Int32?
    public let seconds: Double
    public let error: String?
    public var succeeded: Bool { exitCode == 0 && error == nil }

    public init(name: String, uri: String, exitCode: Int32?, seconds: Double, error: String?) {
        self.name = name
        self.uri = uri
        self.exitCode = exitCode
        self.seconds = seconds
        self.error = error
    }
}

/// Runs one job per domain, several at once, and hands their output on line by line.
public enum Fleet {
    /// A sensible number of domains to work on at once here: jobs mostly wait on guests.
    public static var defaultParallelism: Int {
        min(64, max(8, 8 * ProcessInfo.processInfo.activeProcessorCount))
    }

    /// The domains `selection` names. A name found on none of the URIs stays in the list
    /// (under the first URI), so that its job fails and says so; a URI that cannot be reached
    /// while listing is returned in `unreachable` with the reason.
    public static func members(_ selection: FleetSelection, allowsUnkeyedAgents: Bool = false) -> (members: [FleetMember], unreachable: [(uri: String, reason: String)]) {
        var members: [FleetMember] = []
        var unreachable: [(uri: String, reason: String)] = []
        let uris = selection.uris.isEmpty ? [nil] : selection.uris
        // Per URI: every domain's name, and which of them virtchan manages.
        var listed: [(uri: String, all: [String], managed: Set<String>)] = []
        let needsListing = selection.all || !selection.patterns.isEmpty || uris.count > 1
        for uri in uris {
            let hypervisor = Hypervisor(uri: uri, allowsUnkeyedAgents: allowsUnkeyedAgents)
            guard needsListing else {
                listed.append((hypervisor.uri, [], []))
                continue
            }
            do {
                let all = selection.names.isEmpty ? [] : try hypervisor.domainNames(includeUnmanaged: true)
                let managed = selection.all || !selection.patterns.isEmpty ? try hypervisor.domainNames() : []
                listed.append((hypervisor.uri, all, Set(managed)))
            } catch {
                unreachable.append((hypervisor.uri, "\(error)"))
            }
        }
        func add(_ member: FleetMember) { if !members.contains(member) { members.append(member) } }
        for name in selection.names {
            let holders = listed.filter { $0.all.contains(name) }
            if holders.isEmpty || !needsListing {
                add(FleetMember(name: name, uri: listed.first?.uri ?? unreachable.first?.uri ?? Connection.defaultURI))
            } else {
                for h in holders { add(FleetMember(name: name, uri: h.uri)) }
            }
        }
        for (uri, _, managed) in listed {
            for name in managed.sorted() where selection.all || selection.patterns.contains(where: { fnmatch($0, name, 0) == 0 }) {
                add(FleetMember(name: name, uri: uri))
            }
        }
        return (members, unreachable)
    }

    /// Receives a job's output: whole lines (without their newline), in the order each job
    /// wrote them; a job's last line may lack its newline.
    public typealias LineHandler = @Sendable (FleetMember, ExecStream, String) -> Void

    /// Runs `job` for every member, at most `parallel` at once, each on its own thread, and
    /// returns every outcome in the members' order. A job returns its exit status or throws
    /// why it could not run; a slow or failing one never holds up the others beyond the
    /// `parallel` slots it takes.
    public static func run(_ members: [FleetMember], parallel: Int, lines: @escaping LineHandler,
                           job: @escaping @Sendable (FleetMember, FleetOutput) throws -> Int32) -> [FleetOutcome] {
        let state = RunState(count: members.count)
        let workers = max(1, min(parallel, members.count))
        var threads: [Thread] = []
        for _ in 0..<workers {
            let thread = Thread {
                while let index = state.next() {
                    let member = members[index]
                    let output = FleetOutput(member: member, lines: lines)
                    let start = monotonicNanos()
                    var code: Int32?
                    var failure: String?
                    do {
                        code = try job(member, output)
                    } catch {
                        failure = "\(error)"
                    }
                    output.finish()
                    let seconds = Double(monotonicNanos() - start) / 1e9
                    state.record(index, FleetOutcome(name: member.name, uri: member.uri, exitCode: code, seconds: seconds, error: failure))
                }
                state.workerDone()
            }
            thread.stackSize = 1 << 20
            threads.append(thread)
            thread.start()
        }
        state.waitForWorkers(workers)
        return state.outcomes.map { $0! }
    }

    private final class RunState: @unchecked Sendable {
        private let lock = NSCondition()
        private var nextIndex = 0
        private let count: Int
        private var finishedWorkers = 0
        var outcomes: [FleetOutcome?]

        init(count: Int) {
            self.count = count
            outcomes = Array(repeating: nil, count: count)
        }

        func next() -> Int? {
            lock.lock()
            defer { lock.unlock() }
            guard nextIndex < count else { return nil }
            nextIndex += 1
            return nextIndex - 1
        }

        func record(_ index: Int, _ outcome: FleetOutcome) {
            lock.lock()
            outcomes[index] = outcome
            lock.unlock()
        }

        func workerDone() {
            lock.lock()
            finishedWorkers += 1
            lock.broadcast()
            lock.unlock()
        }

        func waitForWorkers(_ n: Int) {
            lock.lock()
            while finishedWorkers < n { lock.wait() }
            lock.unlock()
        }
    }
}

/// One fleet job's output streams, cut into lines for ``Fleet/LineHandler``.
public final class FleetOutput: @unchecked Sendable {
    public let member: FleetMember
    private let lines: Fleet.LineHandler
    private var pending: [ExecStream: [UInt8]] = [:]
    /// A line longer than this is handed on in pieces: a guest that never writes a newline
    /// must not grow this process without bound.
    static let longestLine = 64 << 10

    init(member: FleetMember, lines: @escaping Fleet.LineHandler) {
        self.member = member
        self.lines = lines
    }

    /// Bytes the job's command wrote to `stream`.
    public func write(_ stream: ExecStream, _ bytes: UnsafeRawBufferPointer) {
        var buffer = pending[stream] ?? []
        buffer.append(contentsOf: bytes)
        var start = 0
        while let newline = buffer[start...].firstIndex(of: 10) {
            lines(member, stream, String(decoding: buffer[start..<newline], as: UTF8.self))
            start = newline + 1
        }
        while buffer.count - start > Self.longestLine {
            lines(member, stream, String(decoding: buffer[start..<(start + Self.longestLine)], as: UTF8.self))
            start += Self.longestLine
        }
        pending[stream] = Array(buffer[start...])
    }

    /// A line of the job's own, as from its command's `stream`.
    public func say(_ line: String, to stream: ExecStream = .stdout) {
        lines(member, stream, line)
    }

    func finish() {
        for stream in [ExecStream.stdout, .stderr] {
            if let rest = pending[stream], !rest.isEmpty { lines(member, stream, String(decoding: rest, as: UTF8.self)) }
        }
        pending = [:]
    }
}
