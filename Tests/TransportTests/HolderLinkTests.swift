import Foundation
import Testing
import VirtchanProtocol
@testable import VirtchanTransport

/// The descriptor passing a session holder lends the data port with, over a real socket pair.
@Suite struct HolderLinkTests {
    @Test func aFramePassesADescriptorThatStillWorks() throws {
        var pair: [Int32] = [0, 0]
        #expect(socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0, &pair) == 0)
        var pipeFDs: [Int32] = [0, 0]
        #expect(pipe(&pipeFDs) == 0)
        defer { for fd in pair + pipeFDs { close(fd) } }

        #expect(HolderLink.send(Frame(.dataPortGrant, id: 1), passing: pipeFDs[1], over: pair[0]))
        var buffer = [UInt8](repeating: 0, count: 256)
        let (n, passed) = HolderLink.receive(pair[1], &buffer)
        let fd = try #require(passed)
        defer { close(fd) }
        #expect(fd != pipeFDs[1])
        let decoder = FrameDecoder()
        decoder.feed(Array(buffer[0..<n]))
        #expect(decoder.next()?.type == .dataPortGrant)
        // The received descriptor is the pipe's write end: what goes in comes out the other end.
        #expect(write(fd, "lent", 4) == 4)
        var got = [UInt8](repeating: 0, count: 4)
        #expect(read(pipeFDs[0], &got, 4) == 4)
        #expect(got == Array("lent".utf8))
        #expect(fcntl(fd, F_GETFD) & FD_CLOEXEC != 0)
    }

    /// What both sides of a holder check before they trust each other.
    @Test func peerCredentialsNameTheProcessAtTheOtherEnd() throws {
        var pair: [Int32] = [0, 0]
        #expect(socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0, &pair) == 0)
        defer { for fd in pair { close(fd) } }
        let peer = try #require(UnixSocket.peerCredentials(pair[0]))
        #expect(peer.uid == geteuid())
        #expect(peer.pid == getpid())
    }
}
