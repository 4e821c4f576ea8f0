import Foundation
import Testing
import VirtchanProtocol
@testable import VirtchanTransport

/// What a holder writes for others to read: its record for `holder list`, and the error line
/// a command that started it reads.
@Suite struct HolderProcessTests {
    /// The record is JSON that a JSON parser reads back field for field, whatever the domain's
    /// name and the URI hold.
    @Test func theRecordReadsBackWithAnyName() throws {
        for name in ["vm1", "a \"quoted\" \\ name", "tab\there\nand line", "ünïcode-✓"] {
            let bytes = HolderProcess.recordJSON(domain: name, uri: "qemu+ssh://root@host/system?k=\"v\"", pid: 4242,
                                                 socket: "/run/virtchan/holders/x.sock", persist: 2.5)
            let object = try #require(try JSONSerialization.jsonObject(with: Data(bytes)) as? [String: Any])
            #expect(object["domain"] as? String == name)
            #expect(object["uri"] as? String == "qemu+ssh://root@host/system?k=\"v\"")
            #expect(object["pid"] as? Int == 4242)
            #expect(object["socket"] as? String == "/run/virtchan/holders/x.sock")
            #expect(object["persistSeconds"] as? Double == 2.5)
        }
    }

    /// An error crosses the ready pipe as one line and comes back with its code and message.
    @Test func anErrorLineComesBackAsTheError() {
        let line = BackgroundProcess.errorLine(TransportError(.timeout, "the agent did not answer\nsee the log"))
        #expect(!line.contains("\n"))
        #expect(line.hasPrefix("error "))
        let back = BackgroundProcess.transportError(fromLine: String(line.dropFirst("error ".count)))
        #expect(back.code == .timeout)
        #expect(back.message == "the agent did not answer see the log")
        // Another layer's error is an I/O error here, with its message kept.
        let other = BackgroundProcess.transportError(fromLine: "provisioning notFound no domain named 'x'")
        #expect(other.code == .io && other.message == "no domain named 'x'")
    }

    /// The stems of one name on every URI begin alike, and only names that read the same.
    @Test func stemsOfOneNameShareTheirPrefix() {
        let a = HolderFiles.stem(uri: "qemu:///system", name: "web-1")
        let b = HolderFiles.stem(uri: "qemu+tcp://localhost/system", name: "web-1")
        #expect(a != b)
        #expect(a.hasPrefix(HolderFiles.stemPrefix(name: "web-1")) && b.hasPrefix(HolderFiles.stemPrefix(name: "web-1")))
        #expect(!HolderFiles.stem(uri: "qemu:///system", name: "web-2").hasPrefix(HolderFiles.stemPrefix(name: "web-1")))
    }
}
