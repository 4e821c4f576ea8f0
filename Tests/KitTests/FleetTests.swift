import Foundation
import Testing
import VirtchanKit
import VirtchanProtocol

/// Fleet.run on jobs that need no hypervisor: order of outcomes, the parallel bound, errors,
/// and how output is cut into lines.
@Suite struct FleetTests {
    final class Collected: @unchecked Sendable {
        let lock = NSLock()
        var lines: [(String, ExecStream, String)] = []
        var running = 0
        var mostRunning = 0
        func add(_ m: FleetMember, _ s: ExecStream, _ l: String) {
            lock.lock(); lines.append((m.name, s, l)); lock.unlock()
        }
        func enter() { lock.lock(); running += 1; mostRunning = max(mostRunning, running); lock.unlock() }
        func leave() { lock.lock(); running -= 1; lock.unlock() }
    }

    struct Boom: Error, CustomStringConvertible { var description: String { "the agent is not there" } }

    static func members(_ n: Int) -> [FleetMember] {
        (0..<n).map { FleetMember(name: "vm\($0)", uri: "test:///default") }
    }

    @Test func outcomesComeInTheMembersOrderWithCodesAndErrors() {
        let seen = Collected()
        let outcomes = Fleet.run(Self.members(6), parallel: 3, lines: seen.add) { member, output in
            seen.enter()
            defer { seen.leave() }
            // Later members finish first.
            usleep(useconds_t(20_000 * (6 - Int(member.name.dropFirst(2))!)))
            if member.name == "vm4" { throw Boom() }
            output.say("hello from \(member.name)")
            return Int32(member.name.dropFirst(2))!
        }
        #expect(outcomes.map(\.name) == ["vm0", "vm1", "vm2", "vm3", "vm4", "vm5"])
        #expect(outcomes.map(\.exitCode) == [0, 1, 2, 3, nil, 5])
        #expect(outcomes[4].error == "the agent is not there")
        #expect(outcomes.filter(\.succeeded).map(\.name) == ["vm0"])
        #expect(seen.mostRunning <= 3)
        #expect(seen.mostRunning >= 2, "jobs ran side by side")
        #expect(Set(seen.lines.map(\.2)) == Set(["vm0", "vm1", "vm2", "vm3", "vm5"].map { "hello from \($0)" }))
    }

    @Test func outputIsCutIntoWholeLinesPerStream() {
        let seen = Collected()
        _ = Fleet.run(Self.members(1), parallel: 1, lines: seen.add) { _, output in
            func write(_ s: String, _ stream: ExecStream = .stdout) {
                Array(s.utf8).withUnsafeBytes { output.write(stream, $0) }
            }
            write("par")
            write("tial\nsecond ")
            write("err line\n", .stderr)
            write("line\nno newline at the end")
            return 0
        }
        #expect(seen.lines.map(\.2) == ["partial", "err line", "second line", "no newline at the end"])
        #expect(seen.lines.map(\.1) == [.stdout, .stderr, .stdout, .stdout])
    }

    @Test func aLineWithoutEndIsHandedOnInBoundedPieces() {
        let seen = Collected()
        _ = Fleet.run(Self.members(1), parallel: 1, lines: seen.add) { _, output in
            let chunk = [UInt8](repeating: UInt8(ascii: "y"), count: 100_000)
            for _ in 0..<10 { chunk.withUnsafeBytes { output.write(.stdout, $0) } }
            return 0
        }
        #expect(seen.lines.reduce(0) { $0 + $1.2.utf8.count } == 1_000_000)
        #expect(seen.lines.allSatisfy { $0.2.utf8.count <= 64 << 10 })
    }

    @Test func aSelectionOfOneNameOnOneURIIsNoFleet() {
        var s = FleetSelection()
        s.names = ["vm1"]
        #expect(s.isSingle)
        s.uris = ["qemu:///system", "qemu+tcp://127.0.0.1/system"]
        #expect(!s.isSingle)
        s.uris = [nil]
        s.all = true
        #expect(!s.isSingle)
    }
}
