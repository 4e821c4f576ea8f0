import Foundation
import Testing
@testable import VirtchanAgentCore

@Suite struct ExecPolicyTests {
    @Test func defaultAllowsEverything() {
        #expect(ExecPolicy().permits("/bin/ls"))
    }

    @Test func denyListWinsAndMatchesBaseName() throws {
        let p = try ExecPolicy(parsing: "# policy\nexec = allow\nexec-deny = rm, reboot\n")
        #expect(!p.permits("/bin/rm"))
        #expect(!p.permits("reboot"))
        #expect(p.permits("ls"))
    }

    @Test func denyByDefaultWithAllowList() throws {
        let p = try ExecPolicy(parsing: "exec = deny\nexec-allow = /bin/cat echo\n")
        #expect(p.permits("/bin/cat"))
        #expect(p.permits("echo"))
        #expect(!p.permits("sh"))
        #expect(!p.deniesEverything)
        #expect(try ExecPolicy(parsing: "exec = deny").deniesEverything)
    }

    @Test func badLinesAreReportedWithTheirNumber() {
        #expect(throws: PolicyError.self) { try ExecPolicy(parsing: "exec = allow\nexec = maybe\n") }
        do {
            _ = try ExecPolicy(parsing: "\nbogus = 1\n")
            Issue.record("no error")
        } catch {
            #expect(error.line == 2)
        }
    }
}

@Suite struct PortDiscoveryTests {
    @Test func findsPortsByNameInASysfsTree() throws {
        let root = "/tmp/virtchan-sysfs-\(getpid())"
        defer { _ = try? FileManager.default.removeItem(atPath: root) }
        for (dev, name) in [("vport0p1", "org.virtchan.control"), ("vport0p2", "org.virtchan.data"), ("vport1p0", "")] {
            try FileManager.default.createDirectory(atPath: "\(root)/\(dev)", withIntermediateDirectories: true)
            try (name + "\n").write(toFile: "\(root)/\(dev)/name", atomically: true, encoding: .utf8)
        }
        let ports = PortDiscovery.ports(sysfsRoot: root)
        #expect(ports == [VirtioPort(name: "org.virtchan.control", device: "/dev/vport0p1"),
                          VirtioPort(name: "org.virtchan.data", device: "/dev/vport0p2")])
        #expect(PortDiscovery.find("org.virtchan.data", sysfsRoot: root)?.device == "/dev/vport0p2")
    }
}
