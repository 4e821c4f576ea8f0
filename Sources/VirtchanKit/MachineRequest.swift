import Crypto
import Foundation
import VirtchanProvisioning

/// What ``Hypervisor/create(_:progress:)`` defines and starts: a domain with virtchan's control and
/// data channels wired, its agent key, and optionally a first-boot script.
public struct MachineRequest: Sendable {
    /// What the domain boots.
    public enum Boot: Sendable, Equatable {
        /// The template's own boot when ``MachineRequest/templateXML`` has one (a kernel or a
        /// disk), else the built-in tiny guest (`Scripts/build-guest`).
        case automatic
        /// A kernel, with an optional initramfs and command line (default `console=ttyS0`).
        case kernel(String, initrd: String? = nil, cmdline: String? = nil)
        /// A disk image.
        case disk(String)
    }

    public var name: String
    public var boot: Boot = .automatic
    /// Memory in MiB; nil: 512, or the template's.
    public var memoryMiB: Int?
    /// Virtual CPUs; nil: 1, or the template's.
    public var vcpus: Int?
    public var accelerator: Accelerator = .auto
    /// A base domain XML; virtchan adds the controller, the channels and its metadata.
    public var templateXML: String?
    /// Ports on the virtio-serial controller (1-31).
    public var controllerPorts = 16
    /// Let libvirt choose the socket paths instead of the domain's state directory.
    public var libvirtChoosesSocketPaths = false
    /// Also add the `org.qemu.guest_agent.0` channel.
    public var qemuGuestAgent = false
    /// Create the domain even when its boot cannot hand the agent a key. Such an agent
    /// serves anything that reaches its channel.
    public var allowUnkeyedAgent = false
    /// A first-boot script, delivered by ``Hypervisor/runBootstrap(_:session:options:)``.
    public var bootstrap: BootstrapPlan?

    public init(name: String) { self.name = name }
}

/// A domain that ``Hypervisor/create(_:progress:)`` started.
public struct CreatedMachine: Sendable {
    public let name: String
    /// `kvm` or `qemu` (TCG), as the accelerator probe chose.
    public let domainType: String
    public let consoleLog: String?
    public let startedAt: Date
}

extension Hypervisor {
    /// The domain XML `create` would define, with the accelerator not yet probed; nothing is
    /// touched.
    public func domainXML(for request: MachineRequest) throws -> String {
        try DomainXML.build(prepare(request, remote: false).spec, domainType: request.accelerator == .kvm ? "kvm" : "qemu").serialize()
    }

    /// Defines and starts a domain. On any failure nothing is left behind: no definition, no
    /// state directory, no initramfs, no volume. It returns once libvirt has started the
    /// domain; wait for the agent with ``waitForAgent(_:timeout:)``.
    ///
    /// Over a remote URI the kernel and the domain's initramfs reach the other host as volumes
    /// of the storage pool ``storagePoolName`` there, uploaded through the connection; the
    /// agent's key stays in this host's state directory. `progress` hears what takes time.
    public func create(_ request: MachineRequest, progress: ((String) -> Void)? = nil) throws -> CreatedMachine {
        let remote = !Connection.isLocal(uri: uri)
        var prepared = try prepare(request, remote: remote)
        let name = request.name
        let conn = try connection()
        let domainType: String
        if remote {
            domainType = request.accelerator == .tcg ? "qemu" : request.accelerator == .kvm || conn.offersKVM ? "kvm" : "qemu"
        } else {
            domainType = AcceleratorProbe.domainType(for: request.accelerator, imageDirectory: paths.imageDirectory,
                                                     cacheDirectory: paths.cacheDirectory)
        }
        if conn.domain(named: name) != nil {
            throw VirtchanError(.alreadyExists, "a domain named \(name) already exists (remove it with: virtchan destroy \(name), or pick another name)")
        }
        let stateDir = paths.stateDirectory(for: name)
        let keyedInitrd = paths.keyedInitrd(for: name)
        var initrdVolume: StorageVolume?
        let fm = FileManager.default
        func removeFiles() {
            try? fm.removeItem(atPath: stateDir)
            unlink(keyedInitrd)
            try? initrdVolume?.delete()
        }
        try? fm.removeItem(atPath: stateDir)
        let domain: Domain
        do {
            try writeStateDirectory(stateDir, for: request, initrdBase: prepared.initrdBase, keyedInitrd: keyedInitrd)
            if remote, case let .kernel(kernel, initrd, cmdline) = prepared.spec.boot {
                let pool = try StoragePool.directory(Self.storagePoolName, path: Self.storagePoolPath, on: conn)
                let kernelPath = try sharedVolume(for: kernel, in: pool, progress: progress)
                var initrdPath: String?
                if initrd != nil {
                    try? pool.volume(name + ".initrd")?.delete()
                    progress?("uploading the initramfs of \(name) to the storage pool \(pool.name) on \(uri)")
                    initrdVolume = try pool.upload(keyedInitrd, as: name + ".initrd")
                    initrdPath = try initrdVolume?.path()
                    // The volume is the copy QEMU reads; this one held the key for nothing.
                    unlink(keyedInitrd)
                }
                prepared.spec.boot = .kernel(kernel: kernelPath, initrd: initrdPath, cmdline: cmdline)
            }
            let document = try DomainXML.build(prepared.spec, domainType: domainType)
            domain = try conn.define(xml: document.serialize())
        } catch {
            removeFiles()
            throw error
        }
        do {
            try domain.start()
        } catch {
            try? domain.undefine()
            removeFiles()
            throw error
        }
        // QEMU has read the initramfs into memory; nobody but its owner may read the key again.
        if prepared.initrdBase != nil && !remote { KeyedInitrd.reclaim(keyedInitrd) }
        return CreatedMachine(name: name, domainType: domainType, consoleLog: prepared.spec.consoleLog, startedAt: Date())
    }

    /// The storage pool that holds what remote domains boot: the shared kernels and each
    /// domain's initramfs (`NAME.initrd`, deleted by ``destroy(_:keepDefinition:force:)``).
    public static let storagePoolName = "virtchan"
    private static let sharedVolumeLock = NSLock()

    /// Where ``storagePoolName`` keeps its files on its host, when virtchan defines it.
    public static let storagePoolPath = "/var/lib/virtchan/pool"

    /// The path on the pool's host of a volume with the bytes of the local file `path`, named
    /// by their SHA-256 so that every domain booting them shares one upload. An empty volume
    /// named `….complete` says the upload finished: a volume without one (an upload cut off,
    /// or one under way elsewhere) is never booted, but replaced.
    private func sharedVolume(for path: String, in pool: StoragePool, progress: ((String) -> Void)?) throws -> String {
        // Domains created side by side in this process share one upload.
        Self.sharedVolumeLock.lock()
        defer { Self.sharedVolumeLock.unlock() }
        guard let data = FileManager.default.contents(atPath: path) else {
            throw VirtchanError(.io, "cannot read \(path)")
        }
        let digest = SHA256.hash(data: data).map { String(format: "%02x", $0) }.joined()
        let volumeName = "boot-" + digest.prefix(24)
        let marker = volumeName + ".complete"
        if let existing = pool.volume(volumeName), pool.volume(marker) != nil,
           (try? existing.capacity()) == UInt64(data.count) {
            return try existing.path()
        }
        try? pool.volume(marker)?.delete()
        try? pool.volume(volumeName)?.delete()
        progress?("uploading \(path) (\(data.count >> 20) MiB) to the storage pool \(pool.name) on \(uri)")
        let volume = try pool.upload(path, as: volumeName, mode: 0o644)
        _ = try pool.makeVolume(marker, bytes: 0, mode: 0o644)
        return try volume.path()
    }

    private struct Prepared {
        var spec: DomainSpec
        /// The initramfs the agent key is added to; nil when the boot has none.
        let initrdBase: String?
    }

    /// Checks everything that can be checked without libvirt and builds the domain's spec.
    /// A `remote` domain gets its socket paths from libvirt and its console on a pseudo-terminal
    /// (`virsh console`): this host's directories mean nothing on the other one.
    private func prepare(_ request: MachineRequest, remote: Bool) throws -> Prepared {
        let name = request.name
        do {
            try DomainSpec.validateName(name)
            try DomainSpec.validateSize(memoryMiB: request.memoryMiB, vcpus: request.vcpus)
        } catch {
            throw VirtchanError(.invalidRequest, error.message)
        }
        var spec = DomainSpec(name: name)
        spec.memoryMiB = request.memoryMiB
        spec.vcpus = request.vcpus
        spec.accelerator = request.accelerator
        spec.controllerPorts = request.controllerPorts
        spec.templateXML = request.templateXML
        let stateDir = paths.stateDirectory(for: name)
        spec.channels = DomainSpec.standardChannels(socketDirectory: request.libvirtChoosesSocketPaths || remote ? nil : stateDir,
                                                    qemuGuestAgent: request.qemuGuestAgent)
        spec.consoleLog = remote ? nil : paths.consoleLog(for: name)
        spec.metadata = VirtchanMetadata(stateDirectory: stateDir, version: virtchanVersion,
                                         bootstrap: request.bootstrap.map { BootstrapRecord(script: $0.scriptName, sha256: $0.sha256, state: .pending) })
        // The agent's key reaches the guest in the domain's own copy of the initramfs; a boot
        // without one (a disk, a template's own boot, a bare kernel) cannot carry it yet.
        let keyedInitrd = paths.keyedInitrd(for: name)
        var initrdBase: String?
        let unkeyable: String?
        switch request.boot {
        case let .kernel(kernel, initrd, cmdline):
            try requireFile(kernel, "kernel")
            if let initrd { try requireFile(initrd, "initrd") }
            initrdBase = initrd.map(absolute)
            spec.boot = .kernel(kernel: absolute(kernel), initrd: initrd == nil ? nil : keyedInitrd, cmdline: cmdline ?? "console=ttyS0")
            unkeyable = initrd == nil ? "--kernel without --initrd" : nil
        case let .disk(disk):
            if remote {
                throw VirtchanError(.invalidRequest, "--disk \(disk) would have to be a file on the host behind \(uri), and virtchan uploads only kernels and initramfs images there; boot the built-in guest or --kernel/--initrd instead, or run 'virtchan create --disk' on that host")
            }
            try requireFile(disk, "disk image")
            spec.boot = .disk(absolute(disk))
            unkeyable = "--disk"
        case .automatic:
            if let template = request.templateXML, try Self.templateBoots(template) {
                unkeyable = "the template's own"
            } else {
                // vmlinux is the same kernel uncompressed, which QEMU boots through its PVH entry
                // point seconds sooner under TCG; Scripts/build-guest writes it when it can.
                let uncompressed = paths.imageDirectory + "/vmlinux"
                let k = FileManager.default.fileExists(atPath: uncompressed) ? uncompressed : paths.imageDirectory + "/vmlinuz"
                let i = paths.imageDirectory + "/initrd.img"
                guard FileManager.default.fileExists(atPath: k), FileManager.default.fileExists(atPath: i) else {
                    throw VirtchanError(.io, "the built-in guest image is missing from \(paths.imageDirectory); build it with: Scripts/build-guest")
                }
                initrdBase = i
                spec.boot = .kernel(kernel: k, initrd: keyedInitrd, cmdline: "console=ttyS0 panic=-1 quiet")
                unkeyable = nil
            }
        }
        if let unkeyable, !request.allowUnkeyedAgent {
            throw VirtchanError(.invalidRequest, "this boot (\(unkeyable)) gives virtchan no way to hand the agent its key, and an agent without one serves anything that reaches its channel; pass --insecure-agent to create it anyway")
        }
        try spec.validate()
        // A template libvirt would refuse is refused here, before anything is written.
        _ = try DomainXML.build(spec, domainType: "qemu")
        return Prepared(spec: spec, initrdBase: initrdBase)
    }

    /// The domain's state directory, closed to everyone but its owner: the agent's sockets,
    /// the console log and the bootstrap's secrets are in it. (libvirt hands QEMU the sockets
    /// already bound.)
    private func writeStateDirectory(_ stateDir: String, for request: MachineRequest, initrdBase: String?,
                                     keyedInitrd: String) throws {
        let fm = FileManager.default
        do {
            try fm.createDirectory(atPath: stateDir, withIntermediateDirectories: true, attributes: [.posixPermissions: 0o700])
        } catch {
            throw VirtchanError(.io, "cannot create \(stateDir): \(error.localizedDescription)")
        }
        chmod(stateDir, 0o700)
        try writePrivateFile(stateDir + "/" + HostPaths.ownerMarker, Data(request.name.utf8))
        if let plan = request.bootstrap { try plan.save(into: stateDir) }
        if let initrdBase {
            let key = AgentKey.generate()
            try writePrivateFile(stateDir + "/" + AgentEndpoint.keyFileName, Data(key.fileText.utf8))
            try KeyedInitrd.write(base: initrdBase, key: key, to: keyedInitrd)
        } else {
            // The caller chose an agent without a key for this domain; later sessions accept it.
            try writePrivateFile(stateDir + "/" + AgentEndpoint.unkeyedMarkerName, Data())
        }
    }

    static func templateBoots(_ text: String) throws(ProvisioningError) -> Bool {
        let doc = try LibXMLDocument(parsing: text, name: "the template")
        return !doc.select("/domain/os/kernel").isEmpty || !doc.select("/domain/devices/disk").isEmpty
    }

    private func requireFile(_ path: String, _ what: String) throws {
        var isDir: ObjCBool = false
        guard FileManager.default.fileExists(atPath: path, isDirectory: &isDir), !isDir.boolValue else {
            throw VirtchanError(.io, "the \(what) \(path) does not exist")
        }
    }

    private func absolute(_ path: String) -> String {
        path.hasPrefix("/") ? path : FileManager.default.currentDirectoryPath + "/" + path
    }
}

/// virtchan's version, recorded in the metadata of the domains it creates.
public let virtchanVersion = "0.1.0"

/// Writes a file only its owner may read (0600).
func writePrivateFile(_ path: String, _ data: Data) throws {
    guard FileManager.default.createFile(atPath: path, contents: data, attributes: [.posixPermissions: 0o600]) else {
        throw VirtchanError(.io, "cannot write \(path)")
    }
}
