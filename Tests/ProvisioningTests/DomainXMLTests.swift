import Foundation
import Testing
@testable import VirtchanProvisioning

private func standardSpec(_ name: String = "t1") -> DomainSpec {
    var spec = DomainSpec(name: name)
    spec.boot = .kernel(kernel: "/img/vmlinuz", initrd: "/img/initrd.img", cmdline: "console=ttyS0")
    spec.channels = DomainSpec.standardChannels(socketDirectory: "/var/lib/virtchan/domains/\(name)")
    spec.consoleLog = "/var/lib/virtchan/domains/\(name)/console.log"
    spec.metadata = VirtchanMetadata(stateDirectory: "/var/lib/virtchan/domains/\(name)", version: "0.1.0")
    return spec
}

@Suite struct DomainXMLTests {
    @Test func standardDomainCarriesControllerAndTwoChannels() throws {
        let doc = try DomainXML.build(standardSpec(), domainType: "qemu")
        #expect(doc.string("string(/domain/@type)") == "qemu")
        #expect(doc.string("string(/domain/name)") == "t1")
        #expect(doc.string("string(/domain/memory)") == "512")
        #expect(doc.string("string(/domain/memory/@unit)") == "MiB")
        #expect(doc.string("string(/domain/os/kernel)") == "/img/vmlinuz")
        #expect(doc.string("string(/domain/os/cmdline)") == "console=ttyS0")
        let ctrl = doc.select("/domain/devices/controller[@type='virtio-serial']")
        #expect(ctrl.count == 1)
        #expect(ctrl.first?.attribute("index") == "0")
        #expect(ctrl.first?.attribute("ports") == "16")
        let channels = doc.select("/domain/devices/channel[@type='unix']")
        #expect(channels.count == 2)
        #expect(doc.string("string(/domain/devices/channel[target/@name='org.virtchan.control']/source/@mode)") == "bind")
        #expect(doc.string("string(/domain/devices/channel[target/@name='org.virtchan.control']/source/@path)")
                == "/var/lib/virtchan/domains/t1/control.sock")
        #expect(doc.string("string(/domain/devices/channel[target/@name='org.virtchan.control']/target/@type)") == "virtio")
        #expect(doc.string("string(/domain/devices/channel[target/@name='org.virtchan.control']/address/@port)") == "1")
        #expect(doc.string("string(/domain/devices/channel[target/@name='org.virtchan.data']/address/@port)") == "2")
        #expect(doc.string("string(/domain/devices/channel[target/@name='org.virtchan.data']/address/@type)") == "virtio-serial")
        #expect(doc.string("string(/domain/devices/serial[@type='file']/source/@path)") == "/var/lib/virtchan/domains/t1/console.log")
        // Headless: no USB, no balloon, and a virtio RNG fed from the host's urandom.
        #expect(doc.string("string(/domain/devices/controller[@type='usb']/@model)") == "none")
        #expect(doc.string("string(/domain/devices/memballoon/@model)") == "none")
        #expect(doc.string("string(/domain/devices/rng[@model='virtio']/backend[@model='random'])") == "/dev/urandom")
    }

    @Test func specialCharactersAreEscapedByLibxml2() throws {
        var spec = standardSpec()
        spec.boot = .kernel(kernel: "/k", initrd: nil, cmdline: "a='1' b=\"2\" c=<3> & d")
        let doc = try DomainXML.build(spec, domainType: "kvm")
        let text = doc.serialize()
        let reparsed = try LibXMLDocument(parsing: text)
        #expect(reparsed.string("string(/domain/os/cmdline)") == "a='1' b=\"2\" c=<3> & d")
        #expect(reparsed.string("string(/domain/@type)") == "kvm")
    }

    @Test func libvirtChosenPathsLeaveThePathOut() throws {
        var spec = standardSpec()
        spec.channels = DomainSpec.standardChannels(socketDirectory: nil)
        let doc = try DomainXML.build(spec, domainType: "qemu")
        #expect(doc.select("/domain/devices/channel/source[@path]").isEmpty)
        #expect(doc.select("/domain/devices/channel/source[@mode='bind']").count == 2)
    }

    @Test func qemuGuestAgentChannelIsOptional() throws {
        var spec = standardSpec()
        spec.channels = DomainSpec.standardChannels(socketDirectory: "/s", qemuGuestAgent: true)
        let doc = try DomainXML.build(spec, domainType: "qemu")
        #expect(doc.string("string(/domain/devices/channel[target/@name='org.qemu.guest_agent.0']/address/@port)") == "3")
    }

    @Test func templateGetsControllerAndChannelsAdded() throws {
        var spec = standardSpec()
        spec.boot = nil
        spec.memoryMiB = nil
        spec.templateXML = """
        <domain type='kvm'><name>base</name><uuid>6f1e8a2e-0000-4000-8000-000000000001</uuid>
        <memory unit='KiB'>2097152</memory><os><type arch='x86_64'>hvm</type><kernel>/k</kernel></os>
        <devices><channel type='unix'><target type='virtio' name='other.port'/>
        <address type='virtio-serial' controller='0' bus='0' port='5'/></channel></devices></domain>
        """
        let doc = try DomainXML.build(spec, domainType: "qemu")
        #expect(doc.string("string(/domain/name)") == "t1")
        #expect(doc.select("/domain/uuid").isEmpty)
        #expect(doc.string("string(/domain/memory)") == "2097152")
        #expect(doc.string("string(/domain/memory/@unit)") == "KiB")
        #expect(doc.select("/domain/devices/channel").count == 3)
        #expect(doc.select("/domain/devices/controller[@type='virtio-serial']").count == 1)
        // The template's own choice of devices stands.
        #expect(doc.select("/domain/devices/controller[@type='usb']").isEmpty)
        #expect(doc.select("/domain/devices/rng").isEmpty)
    }

    @Test func templateThatHoldsOurNameOrPortIsRefused() {
        var spec = standardSpec()
        spec.templateXML = """
        <domain type='kvm'><name>x</name><devices><channel type='unix'>
        <target type='virtio' name='org.virtchan.control'/></channel></devices></domain>
        """
        #expect(throws: ProvisioningError.self) { try DomainXML.build(spec, domainType: "qemu") }
        spec.templateXML = """
        <domain type='kvm'><name>x</name><devices><channel type='pty'><target type='virtio' name='mine'/>
        <address type='virtio-serial' controller='0' bus='0' port='2'/></channel></devices></domain>
        """
        do {
            _ = try DomainXML.build(spec, domainType: "qemu")
            Issue.record("a clashing port was accepted")
        } catch {
            #expect(error.message.contains("port 2"))
            #expect(error.code == .conflict)
        }
    }

    @Test func templateThatIsNotXMLIsRefused() {
        var spec = standardSpec()
        spec.templateXML = "<domain><name>oops</domain"
        do {
            _ = try DomainXML.build(spec, domainType: "qemu")
            Issue.record("broken XML accepted")
        } catch {
            #expect(error.code == .invalidXML)
            #expect(error.message.contains("template"))
        }
        spec.templateXML = "<network/>"
        #expect(throws: ProvisioningError.self) { try DomainXML.build(spec, domainType: "qemu") }
    }

    @Test(arguments: [
        ("memory", "out of range"), ("vcpus", "out of range"), ("ports", "1 to 31"), ("port", "only 2 ports"),
        ("socket", "longer than a unix socket allows"), ("name", "not a usable domain name"), ("port0", "reserved"),
    ])
    func invalidSpecsSayWhatToFix(field: String, expected: String) {
        var spec = standardSpec()
        switch field {
        case "memory": spec.memoryMiB = 16
        case "vcpus": spec.vcpus = 0
        case "ports": spec.controllerPorts = 40
        case "port": spec.controllerPorts = 2
        case "socket": spec.channels = DomainSpec.standardChannels(socketDirectory: "/" + String(repeating: "d", count: 100))
        case "name": spec.name = "bad/name"
        default: spec.channels[0].port = 0
        }
        do {
            try spec.validate()
            Issue.record("\(field) accepted")
        } catch {
            #expect(error.message.contains(expected), "\(error.message)")
        }
    }
}

@Suite struct MetadataTests {
    @Test func roundTripsThroughItsElement() throws {
        var meta = VirtchanMetadata(stateDirectory: "/var/lib/virtchan/domains/x", version: "0.1.0")
        meta.bootstrap = BootstrapRecord(script: "setup.sh", sha256: "ab", state: .failed, exitCode: 3,
                                         startedAt: "2026-01-01T00:00:00Z", endedAt: "2026-01-01T00:00:01Z",
                                         reason: "exited with code 3", runnerPID: nil)
        let xml = try meta.elementXML()
        #expect(!xml.contains("xmlns"))
        #expect(xml.hasPrefix("<domain version=\"0.1.0\">"))
        #expect(VirtchanMetadata(elementXML: xml) == meta)
    }

    @Test func rolesComeFromMetadataInLiveXML() throws {
        let doc = try DomainXML.build(standardSpec(), domainType: "qemu")
        // Make it look like live XML: libvirt adds state and alias.
        let live = doc.serialize().replacingOccurrences(of: "name=\"org.virtchan.control\"/>",
                                                        with: "name=\"org.virtchan.control\" state=\"connected\"/><alias name=\"channel0\"/>")
        let channels = try ChannelResolver.channels(inDomainXML: live)
        #expect(channels.count == 2)
        #expect(channels[0] == ChannelInfo(name: "org.virtchan.control", role: .control, port: 1,
                                           path: "/var/lib/virtchan/domains/t1/control.sock", state: "connected", alias: "channel0"))
        #expect(channels[1].role == .data)
        #expect(channels[1].state == nil)
    }
}

/// libvirt's in-process test driver: define, metadata and undefine without a daemon.
@Suite(.serialized) struct TestDriverTests {
    @Test func defineReadMetadataUndefine() throws {
        let conn = try Connection(uri: "test:///default")
        var spec = standardSpec("vc-unit-\(getpid())")
        spec.boot = nil
        let xml = try DomainXML.build(spec, domainType: "test").serialize()
        let domain = try conn.define(xml: xml)
        #expect(conn.domain(named: spec.name) != nil)
        let stored = try #require(domain.metadata(namespace: VirtchanMetadata.namespace))
        #expect(VirtchanMetadata(elementXML: stored)?.stateDirectory == "/var/lib/virtchan/domains/\(spec.name)")

        var meta = try #require(VirtchanMetadata(elementXML: stored))
        meta.bootstrap = BootstrapRecord(script: "s.sh", sha256: "00", state: .running, runnerPID: 1)
        try domain.setMetadata(try meta.elementXML(), key: VirtchanMetadata.key, namespace: VirtchanMetadata.namespace)
        let again = try #require(domain.metadata(namespace: VirtchanMetadata.namespace).flatMap { VirtchanMetadata(elementXML: $0) })
        #expect(again.bootstrap?.state == .running)
        // The whole document shows it too, as `virsh dumpxml` would.
        #expect(try domain.xml().contains("state=\"running\""))

        try domain.start()
        #expect(domain.state == .running)
        let channels = try ChannelResolver.channels(inDomainXML: domain.xml())
        #expect(channels.map(\.role) == [.control, .data])
        try domain.destroy()
        try domain.undefine()
        #expect(conn.domain(named: spec.name) == nil)
    }

    @Test func unknownDomainAndDuplicateDefinitionAreClearErrors() throws {
        let conn = try Connection(uri: "test:///default")
        do {
            _ = try conn.requireDomain("no-such-domain")
            Issue.record("found a domain that does not exist")
        } catch {
            #expect(error.code == .notFound)
            #expect(error.message.contains("no domain named 'no-such-domain'"))
        }
    }

    @Test func unreachableDaemonNamesTheSetupCommand() {
        do {
            _ = try Connection(uri: "qemu:///system?socket=/nonexistent/libvirt-sock")
            Issue.record("connected to nothing")
        } catch {
            #expect(error.code == .connection)
            #expect(error.message.contains("Scripts/setup-host"))
        }
    }
}

/// Which URIs reach a domain's channels as sockets on this machine, and which through libvirt
/// streams: any host or network transport is remote, even one naming this machine. A remote
/// URI's host is what its connections are counted by.
@Test(arguments: [
    ("qemu:///system", nil), ("qemu:///session", nil), ("qemu+unix:///system", nil), ("test:///default", nil),
    ("qemu+tcp://127.0.0.1/system", "127.0.0.1"), ("qemu+ssh://root@hv2:2222/system?keyfile=/k&no_verify=1", "hv2:2222"),
    ("qemu+tls://hv3/system", "hv3"), ("qemu://hv4/system", "hv4"), ("qemu+tcp:///system", ""),
] as [(String, String?)])
func urisAreLocalOnlyWithoutHostOrNetworkTransport(uri: String, host: String?) {
    #expect(Connection.remoteHost(of: uri) == host)
    #expect(Connection.isLocal(uri: uri) == (host == nil))
}

/// Connections to one remote host are set up a few at a time per process; other hosts, this
/// host's daemons, and a thread that already holds a slot do not wait.
@Test func connectionsToOneHostAreSetUpAFewAtATime() {
    /// Per host: how many threads are inside now, and the most ever at once.
    final class Tally: @unchecked Sendable {
        private let lock = NSLock()
        private var now: [String: Int] = [:]
        private(set) var most: [String: Int] = [:]
        func enter(_ host: String) {
            lock.lock()
            now[host, default: 0] += 1
            most[host] = max(most[host] ?? 0, now[host]!)
            lock.unlock()
        }
        func leave(_ host: String) {
            lock.lock()
            now[host]! -= 1
            lock.unlock()
        }
    }
    let gate = ConnectionGate(limit: 3)
    let tally = Tally()
    let done = DispatchGroup()
    for i in 0..<12 {
        let uri = i % 2 == 0 ? "qemu+ssh://root@hv1/system" : "qemu+tcp://hv2/system"
        let host = i % 2 == 0 ? "hv1" : "hv2"
        done.enter()
        Thread {
            gate.withSlot(for: uri) {
                tally.enter(host)
                // Again from the same thread: passes at once, or this would wait for itself.
                gate.withSlot(for: uri) { _ = usleep(50_000) }
                tally.leave(host)
            }
            done.leave()
        }.start()
    }
    #expect(done.wait(timeout: .now() + 20) == .success)
    #expect(tally.most == ["hv1": 3, "hv2": 3])
    // This host's own daemons never wait.
    var local = 0
    for _ in 0..<10 { gate.withSlot(for: "qemu:///system") { local += 1 } }
    #expect(local == 10)
}

/// What a disk image is, read from its header.
struct DiskImageTests {
    func file(_ bytes: [UInt8], size: Int = 4096) throws -> String {
        let path = NSTemporaryDirectory() + "vc-disk-\(UUID().uuidString)"
        var data = Data(bytes)
        data.append(Data(count: max(0, size - bytes.count)))
        try data.write(to: URL(fileURLWithPath: path))
        return path
    }

    @Test func qcow2GivesItsVirtualSize() throws {
        var header: [UInt8] = [0x51, 0x46, 0x49, 0xfb, 0, 0, 0, 3] + [UInt8](repeating: 0, count: 16)
        header += [0, 0, 0, 0, 0x80, 0, 0, 0]  // 2 GiB, big-endian
        let path = try file(header)
        defer { unlink(path) }
        let image = try DiskImage(probing: path)
        #expect(image.format == .qcow2 && image.virtualSize == 2 << 30)
    }

    @Test func aRawDiskNeedsAPartitionTable() throws {
        var mbr = [UInt8](repeating: 0, count: 512)
        mbr[510] = 0x55; mbr[511] = 0xaa
        let disk = try file(mbr, size: 1 << 20)
        defer { unlink(disk) }
        let image = try DiskImage(probing: disk)
        #expect(image.format == .raw && image.virtualSize == 1 << 20)
        let text = try file(Array("#!/bin/sh\necho not a disk\n".utf8))
        defer { unlink(text) }
        #expect(throws: ProvisioningError.self) { try DiskImage(probing: text) }
        #expect(throws: ProvisioningError.self) { try DiskImage(probing: "/nonexistent/image.qcow2") }
        #expect(throws: ProvisioningError.self) { try DiskImage(probing: NSTemporaryDirectory()) }
    }

    @Test func sizesReadAsPeopleWriteThem() {
        #expect(DiskImage.parseSize("20G") == 20 << 30)
        #expect(DiskImage.parseSize("512MiB") == 512 << 20)
        #expect(DiskImage.parseSize("1.5T") == 3 << 39)
        #expect(DiskImage.parseSize("4096") == 4096)
        for bad in ["", "G", "-1G", "12X", "0"] { #expect(DiskImage.parseSize(bad) == nil, "\(bad)") }
        #expect(DiskImage.formatSize(3 << 30) == "3 GiB")
        #expect(DiskImage.formatSize(1536) == "1.5 KiB")
    }

    @Test func aSeedIsAReadOnlySecondDiskAndTheUUIDIsKept() throws {
        var spec = DomainSpec(name: "img")
        spec.boot = .disk("/pool/img.qcow2")
        spec.seedImage = "/pool/img.seed.iso"
        spec.uuid = "0b6a4f5e-1c1d-4c1e-9d51-6f0e2c1a9b77"
        let doc = try DomainXML.build(spec, domainType: "qemu")
        #expect(doc.string("string(/domain/uuid)") == spec.uuid)
        #expect(doc.string("string(/domain/devices/disk[target/@dev='vda']/driver/@type)") == "qcow2")
        #expect(doc.string("string(/domain/devices/disk[target/@dev='vdb']/source/@file)") == "/pool/img.seed.iso")
        #expect(doc.select("/domain/devices/disk[target/@dev='vdb']/readonly").count == 1)
    }
}
