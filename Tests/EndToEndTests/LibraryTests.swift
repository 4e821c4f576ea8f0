import Foundation
import Testing

extension EndToEnd {
    /// VirtchanKit used as a library: the example program (Examples/CreateAndRun), built with
    /// the package, against the real libvirtd, QEMU and agent.
    @Suite struct Library {
        @Test func theExampleProgramCreatesRunsCopiesAndTearsDown() throws {
            let name = "vctest-example"
            VC.run(["destroy", name, "--force"])
            let example = (VC.binary as NSString).deletingLastPathComponent + "/virtchan-example"
            let r = VC.runProgram(example, [name], timeout: 300)
            #expect(r.code == 0, "\(r.stderr)")
            #expect(r.out.contains("started \(name) ("))
            #expect(r.out.contains("Linux 6."), "uname's output streams through: \(r.out)")
            #expect(r.out.contains("uname exited with 0"))
            #expect(r.out.contains("copied 20 bytes in and 20 back, sha256 \(sha256Hex(Data("hello from the host\n".utf8)))"))
            // Torn down: no domain, no state directory.
            #expect(VC.virsh(["dominfo", name]).code != 0)
            #expect(!FileManager.default.fileExists(atPath: "/var/lib/virtchan/domains/\(name)"))
        }
    }
}
