import Testing
import Foundation
import VirtchanProtocol

/// Durations in messages read as a person would write them.
@Test func secondsReadToATenth() {
    #expect(formatSeconds(10) == "10 s")
    // A timeout left over from a deadline comes out as the figure it stands for.
    #expect(formatSeconds(9.99999988079071) == "10 s")
    #expect(formatSeconds(0.5) == "0.5 s")
    #expect(formatSeconds(89.99999964237213) == "90 s")
    #expect(formatSeconds(2.04) == "2 s")
    #expect(formatSeconds(1.25) == "1.3 s")
}

/// Whatever number of seconds a library caller gives, a deadline is a plain number: none is
/// a trap (an overflowing or NaN conversion ends the process).
@Test func anyNumberOfSecondsMakesADeadline() {
    #expect(nanoseconds(1.5) == 1_500_000_000)
    #expect(nanoseconds(-3) == 0)
    #expect(nanoseconds(.nan) == 0)
    #expect(nanoseconds(.infinity) == 1_000_000_000_000_000_000)
    #expect(nanoseconds(1e300) == nanoseconds(.infinity))
    let now = monotonicNanos()
    #expect(monotonicDeadline(after: .infinity) > now)
    #expect(monotonicDeadline(after: -.infinity) >= now)
}

/// A URI or name inside a suggested command reads back as itself in a shell.
@Test func wordsInSuggestedCommandsSurviveTheShell() throws {
    #expect(shellWord("qemu:///system") == "qemu:///system")
    #expect(shellWord("qemu+tcp://10.0.0.5/system") == "qemu+tcp://10.0.0.5/system")
    let awkward = ["qemu+ssh://root@h:2222/system?keyfile=/k&no_tty=1", "it's", "a b", "$HOME", "", "x;rm -rf /", "`id`"]
    for word in awkward {
        let printed = shellWord(word)
        #expect(printed.hasPrefix("'"))
        // printf reads the word back from the shell, as a user's paste would.
        let p = Process()
        p.executableURL = URL(fileURLWithPath: "/bin/sh")
        p.arguments = ["-c", "printf %s " + printed]
        let out = Pipe()
        p.standardOutput = out
        try p.run()
        p.waitUntilExit()
        #expect(String(decoding: out.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self) == word)
    }
}
