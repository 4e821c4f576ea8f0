import Foundation
import Testing
import VirtchanKit

/// VirtchanKit against libvirt's test driver (`test:///default`) and scratch directories:
/// what a program using the library sees before any guest boots.
// One at a time: every test's Hypervisor reaches the same in-process test driver, so a domain
// one test defines would show in another's listing.
@Suite(.serialized) struct HypervisorTests {
    /// Scratch directories, with a stand-in for the built-in guest's kernel and initramfs.
    private func scratchPaths() throws -> HostPaths {
        let base = NSTemporaryDirectory() + "vc-kit-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        let paths = HostPaths(stateBase: base + "/domains", imageDirectory: base + "/images",
                              cacheDirectory: base + "/cache", bootDirectory: base + "/boot")
        try FileManager.default.createDirectory(atPath: paths.imageDirectory, withIntermediateDirectories: true)
        for file in ["vmlinuz", "initrd.img"] {
            try Data("stand-in".utf8).write(to: URL(fileURLWithPath: paths.imageDirectory + "/" + file))
        }
        return paths
    }

    private func remove(_ paths: HostPaths) {
        try? FileManager.default.removeItem(atPath: (paths.stateBase as NSString).deletingLastPathComponent)
    }

    @Test func listsOnlyManagedDomainsUnlessAskedForAll() throws {
        let hypervisor = Hypervisor(uri: "test:///default")
        #expect(try hypervisor.domains().isEmpty)
        let all = try hypervisor.domains(includeUnmanaged: true)
        #expect(all.map(\.name) == ["test"])
        #expect(all.first?.managed == false)
        #expect(all.first?.state == "running")
    }

    @Test func destroyRefusesADomainVirtchanDoesNotManage() throws {
        let hypervisor = Hypervisor(uri: "test:///default")
        let error = #expect(throws: VirtchanError.self) { try hypervisor.destroy("test") }
        #expect(error?.code == .notManaged)
        #expect(try hypervisor.domain("test").isActive)
    }

    @Test func aMissingDomainIsAProvisioningErrorNamingIt() throws {
        let hypervisor = Hypervisor(uri: "test:///default")
        let error = #expect(throws: ProvisioningError.self) { _ = try hypervisor.channels(of: "no-such-vm") }
        #expect(error?.code == .notFound)
        #expect(error?.message.contains("no-such-vm") == true)
    }

    @Test func aSessionNeedsTheVirtchanControlChannel() throws {
        let hypervisor = Hypervisor(uri: "test:///default")
        let error = #expect(throws: VirtchanError.self) { _ = try hypervisor.session(with: "test") }
        #expect(error?.code == .noChannel)
    }

    @Test func theDomainXMLWiresBothChannelsAndTheKeyedInitramfsWithoutTouchingAnything() throws {
        let paths = try scratchPaths()
        defer { remove(paths) }
        let hypervisor = Hypervisor(uri: "test:///default", paths: paths)
        var request = MachineRequest(name: "vm1")
        request.vcpus = 2
        let xml = try hypervisor.domainXML(for: request)
        let doc = try LibXMLDocument(parsing: xml)
        let channels = ChannelResolver.channels(in: doc)
        #expect(channels.map(\.name).sorted() == [ChannelNames.control, ChannelNames.data])
        #expect(channels.allSatisfy { $0.path?.hasPrefix(paths.stateDirectory(for: "vm1") + "/") == true })
        #expect(doc.string("string(/domain/os/initrd)") == paths.keyedInitrd(for: "vm1"))
        #expect(doc.string("string(/domain/vcpu)") == "2")
        #expect(!FileManager.default.fileExists(atPath: paths.stateDirectory(for: "vm1")))
        #expect(!FileManager.default.fileExists(atPath: paths.keyedInitrd(for: "vm1")))
    }

    @Test func aBootThatCannotCarryTheKeyIsRefusedUnlessTheCallerAllowsIt() throws {
        let paths = try scratchPaths()
        defer { remove(paths) }
        let disk = paths.imageDirectory + "/initrd.img"
        var request = MachineRequest(name: "vm2")
        request.boot = .disk(disk)
        let error = #expect(throws: VirtchanError.self) {
            _ = try Hypervisor(uri: "test:///default", paths: paths).domainXML(for: request)
        }
        #expect(error?.code == .invalidRequest)
        request.allowUnkeyedAgent = true
        let xml = try Hypervisor(uri: "test:///default", paths: paths).domainXML(for: request)
        #expect(xml.contains(disk))
    }

    @Test func aBadRequestIsRefusedBeforeLibvirtIsAsked() throws {
        let paths = try scratchPaths()
        defer { remove(paths) }
        // An unreachable URI: nothing here may need it.
        let hypervisor = Hypervisor(uri: "qemu+tcp://192.0.2.1/system", paths: paths)
        for name in ["", "a/b", "two words", String(repeating: "x", count: 300)] {
            let error = #expect(throws: VirtchanError.self) { _ = try hypervisor.create(MachineRequest(name: name)) }
            #expect(error?.code == .invalidRequest)
        }
        var request = MachineRequest(name: "vm3")
        request.boot = .kernel(paths.imageDirectory + "/missing-kernel")
        let error = #expect(throws: VirtchanError.self) { _ = try hypervisor.create(request) }
        #expect(error?.message.contains("missing-kernel") == true)
    }

    @Test func aBootstrapPlanChecksItsScriptFilesAndEnvironment() throws {
        let paths = try scratchPaths()
        defer { remove(paths) }
        let script = paths.imageDirectory + "/setup.sh"
        try Data("#!/bin/sh\necho hi\n".utf8).write(to: URL(fileURLWithPath: script))
        let plan = try BootstrapPlan(script: script, files: [script + ":/etc/setup.sh"], env: ["ROLE=web"], timeout: 30)
        #expect(plan.scriptName == "setup.sh")
        #expect(plan.sha256 == "299001868fb8c02fd431c336c6d058f5558c5dff5b5af5e6fe04b870a6a9cbba")
        #expect(plan.files.map(\.remote) == ["/etc/setup.sh"])
        #expect((try? BootstrapPlan(script: paths.imageDirectory + "/none.sh")) == nil)
        for (files, env) in [([script], [String]()), ([script + ":relative"], []), ([], ["NOVALUE"])] {
            let error = #expect(throws: VirtchanError.self) { _ = try BootstrapPlan(script: script, files: files, env: env) }
            #expect(error?.code == .invalidRequest)
        }
    }

    /// Mode bits of a path, or nil when it does not exist.
    private func mode(_ path: String) -> Int? {
        (try? FileManager.default.attributesOfItem(atPath: path))?[.posixPermissions] as? Int
    }

    @Test func createWritesAPrivateStateDirectoryAndDestroyRemovesEverything() throws {
        let paths = try scratchPaths()
        defer { remove(paths) }
        let hypervisor = Hypervisor(uri: "test:///default", paths: paths)
        var request = MachineRequest(name: "vm4")
        request.accelerator = .tcg
        let machine = try hypervisor.create(request)
        #expect(machine.domainType == "qemu")
        let state = paths.stateDirectory(for: "vm4")
        #expect(mode(state) == 0o700)
        #expect(mode(state + "/agent.key") == 0o600)
        #expect(mode(paths.keyedInitrd(for: "vm4")) == 0o600)
        // Every private file is in place, with no temporary file left beside it.
        let files = try FileManager.default.contentsOfDirectory(atPath: state)
        #expect(files.contains("agent.key") && !files.contains { $0.hasSuffix(".tmp") }, "\(files)")
        #expect(try hypervisor.domains().map(\.name) == ["vm4"])
        #expect(try hypervisor.metadata(of: "vm4")?.stateDirectory == state)
        #expect(try hypervisor.domain("vm4").isActive)

        // A second create of the same name is refused and takes nothing of the first.
        let error = #expect(throws: VirtchanError.self) { _ = try hypervisor.create(request) }
        #expect(error?.code == .alreadyExists)
        #expect(FileManager.default.fileExists(atPath: state + "/agent.key"))

        try hypervisor.destroy("vm4")
        #expect(try hypervisor.domains().isEmpty)
        #expect(mode(state) == nil)
        #expect(mode(paths.keyedInitrd(for: "vm4")) == nil)
    }

    @Test func aDefinitionLibvirtRefusesLeavesNoFilesBehind() throws {
        let paths = try scratchPaths()
        defer { remove(paths) }
        let hypervisor = Hypervisor(uri: "test:///default", paths: paths)
        var request = MachineRequest(name: "vm5")
        request.accelerator = .tcg
        request.templateXML = "<domain><devices><interface type='no-such-type'/></devices></domain>"
        #expect(throws: ProvisioningError.self) { _ = try hypervisor.create(request) }
        #expect(try hypervisor.domains(includeUnmanaged: true).map(\.name) == ["test"])
        #expect(mode(paths.stateDirectory(for: "vm5")) == nil)
        #expect(mode(paths.keyedInitrd(for: "vm5")) == nil)
    }
}
