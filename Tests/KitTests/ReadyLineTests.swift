import Foundation
import Testing
@testable import VirtchanKit

/// What a command makes of its background process's ready pipe (a session holder's, a
/// background forward's): the line, the error reported, an end without a word, or silence.
@Suite struct ReadyLineTests {
    func pipeWith(_ text: String?, close writeEnd: Bool) -> (read: Int32, write: Int32) {
        var fds: [Int32] = [-1, -1]
        precondition(pipe(&fds) == 0)
        if let text { _ = Array(text.utf8).withUnsafeBytes { write(fds[1], $0.baseAddress, $0.count) } }
        if writeEnd { close(fds[1]) }
        return (fds[0], fds[1])
    }

    func read(_ text: String?, closing: Bool = true, timeout: Double = 5) -> Result<String, Error> {
        let p = pipeWith(text, close: closing)
        defer { close(p.read); if !closing { close(p.write) } }
        return Result { try Hypervisor.readyLine(p.read, timeout: timeout, accepting: ["ready", "held"], what: "the session holder of vm1", log: "/run/x.log") }
    }

    @Test func theLineIsReturned() throws {
        #expect(try read("ready\n").get() == "ready")
        #expect(try read("held\nmore").get() == "held")
    }

    @Test func aReportedErrorIsThrownAsTheProcessMetIt() {
        guard case .failure(let error as TransportError) = read("error transport unauthenticated the key does not match\n") else {
            Issue.record("no TransportError")
            return
        }
        #expect(error.code == .unauthenticated)
        #expect(error.message == "the key does not match")
    }

    @Test func anEndWithoutAWordSaysSoAndNamesTheLog() {
        guard case .failure(let error as TransportError) = read(nil) else {
            Issue.record("no TransportError")
            return
        }
        #expect(error.code == .agentGone)
        #expect(error.message == "the session holder of vm1 ended before it served (see /run/x.log)")
    }

    /// A process still starting when the command stops waiting (libvirt not answering it) is
    /// told apart from one that ended.
    @Test func silenceUntilTheTimeoutIsNotAnEnd() {
        let start = Date()
        guard case .failure(let error as TransportError) = read(nil, closing: false, timeout: 0.3) else {
            Issue.record("no TransportError")
            return
        }
        #expect(Date().timeIntervalSince(start) < 3)
        #expect(error.code == .busy)
        #expect(error.message.hasPrefix("the session holder of vm1 did not start serving within 0.3 s (see /run/x.log)"))
    }
}
