import Testing
@testable import VirtchanTransport

/// The plain `exec` command line that `virtchan` serves itself: what it reads, and every form it
/// must leave to the full parser (which reports mistakes and prints help).
@Suite struct ExecCommandLineTests {
    private func read(_ line: String) -> ExecCommandLine? {
        ExecCommandLine(quickForm: ArraySlice(line.split(separator: " ").map(String.init)))
    }

    @Test func readsEveryOptionItServes() throws {
        let c = try #require(read("exec vm1 -n -t -c qemu+tcp://h/system --persist 2.5 --insecure-agent -- ls -l /"))
        #expect(c.name == "vm1")
        #expect(c.connect == "qemu+tcp://h/system")
        #expect(c.persist == 2.5)
        #expect(c.insecureAgent)
        #expect(!c.options.forwardStdin)
        #expect(c.options.tty)
        #expect(c.options.argv == ["ls", "-l", "/"])
    }

    @Test func theDefaultsAreThoseOfTheFullCommand() throws {
        let c = try #require(read("exec vm1 -- true"))
        #expect(c.connect == nil)
        #expect(c.persist == 60)
        #expect(!c.insecureAgent)
        #expect(c.options.forwardStdin)
        #expect(!c.options.tty)
    }

    /// Words after `--` belong to the command, options among them.
    @Test func wordsAfterTheDashesAreTheCommands() throws {
        let c = try #require(read("exec vm1 -- sh -c -- --help -n"))
        #expect(c.options.argv == ["sh", "-c", "--", "--help", "-n"])
        #expect(c.options.forwardStdin)
    }

    @Test func leavesEverythingElseToTheFullParser() {
        for line in [
            "exec vm1 true",                         // no dashes
            "exec vm1 --",                           // no command
            "exec -- true",                          // no domain
            "exec vm1 vm2 -- true",                  // a fleet
            "exec vm1 -c a -c b -- true",            // a fleet by URI
            "exec vm1 -c -- true",                   // -c with no URI
            "exec vm1 --help -- true",
            "exec vm1 --timeout 5 -- true",          // an option only the full program knows
            "exec vm1 --persist -1 -- true",
            "exec vm1 --persist soon -- true",
            "exec vm1 --persist inf -- true",
            "ping vm1 -- true",
        ] {
            #expect(read(line) == nil, "\(line)")
        }
    }
}
