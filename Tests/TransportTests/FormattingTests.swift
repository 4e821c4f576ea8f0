import Testing
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
