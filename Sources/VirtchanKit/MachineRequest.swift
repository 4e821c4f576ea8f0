import Crypto
import Foundation
import VirtchanProvisioning

/// What ``Hypervisor/create(_:progress:uploaded:)`` defines and starts: a domain with virtchan's control and
/// data channels wired, its agent key, and optionally a first-boot script.
public struct MachineRequest: Sendable {
    /// What the domain boots.
    public enum Boot: Sendable, Equatable {
        /// The template's own boot when ``MachineRequest/templateXML`` has one (a kernel or a
        /// disk), else the built-in tiny guest (`Scripts/build-guest`).
        case automatic
        /// A kernel, with an optional initramfs and command line (default `console=ttyS0`).
        case kernel(String, initrd: String? = nil, cmdline: String? = nil)
        /// A disk image, booted as it is (it is written to).
        case disk(String)
        /// A cloud image (qcow2 or raw), never written: the domain boots a copy-on-write overlay
        /// of it, `diskSize` bytes large (nil: the image's own size), and cloud-init installs
        /// the agent from a NoCloud seed at first boot (see ``MachineRequest/cloudInit``).
        case image(String, diskSize: UInt64? = nil)
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
    /// For ``Boot/image(_:diskSize:)``: the user's own cloud-init input.
    public var cloudInit = CloudInit()
    /// The storage pool for the volumes a domain boots from (an image's overlay and seed, a
    /// remote domain's kernel and initramfs); nil: ``Hypervisor/storagePoolName``, defined on
    /// first use. Another pool must exist.
    public var storagePool: String?

    /// Memory in MiB for an image boot when none is given: a distro with cloud-init needs more
    /// than the tiny guest.
    public static let imageMemoryMiB = 1024

    public init(name: String) { self.name = name }
}

/// A domain that ``Hypervisor/create(_:progress:uploaded:)`` started.
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
    /// agent's key stays in this host's state directory. `progress` hears what takes time;
    /// during each upload it announces, `uploaded` hears the bytes sent and the file's size.
    public func create(_ request: MachineRequest, progress: ((String) -> Void)? = nil,
                       uploaded: ((UInt64, UInt64) -> Void)? = nil) throws -> CreatedMachine {
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
            throw VirtchanError(.alreadyExists, "a domain named \(name) already exists (remove it with: \(suggested("destroy", name)), or pick another name)")
        }
        let stateDir = paths.stateDirectory(for: name)
        let keyedInitrd = paths.keyedInitrd(for: name)
        // Volumes made for this domain alone, deleted again when the create fails.
        var volumes: [StorageVolume] = []
        let fm = FileManager.default
        func removeFiles() {
            try? fm.removeItem(atPath: stateDir)
            unlink(keyedInitrd)
            for volume in volumes { try? volume.delete() }
        }
        try? fm.removeItem(atPath: stateDir)
        unlink(paths.abandonedConsoleLog(for: name))
        // Ctrl-C (SIGINT, SIGTERM, SIGHUP, once the command installed `Interruption`) stops a
        // create between its steps and during uploads, and undoes it as any failure does.
        func undone(_ error: Error) -> Error {
            guard let sig = Interruption.pending else { return error }
            return TransportError(.interrupted, "\(Interruption.describe(sig)) while \(name) was being created; nothing of it is left",
                                  errno: EINTR, signal: sig)
        }
        let domain: Domain
        do {
            let key = try writeStateDirectory(stateDir, for: request, keyed: prepared.keyed, initrdBase: prepared.initrdBase,
                                              keyedInitrd: keyedInitrd)
            try Interruption.check()
            if remote, case let .kernel(kernel, initrd, cmdline) = prepared.spec.boot {
                let pool = try storagePool(for: request, on: conn)
                var initrdPath: String?
                if initrd != nil {
                    try? pool.volume(name + ".initrd")?.delete()
                    progress?("uploading the initramfs of \(name) to the storage pool \(pool.name) on \(uri)")
                    let volume = try pool.upload(keyedInitrd, as: name + ".initrd", progress: uploaded)
                    volumes.append(volume)
                    initrdPath = try volume.path()
                    // The volume is the copy QEMU reads; this one held the key for nothing.
                    unlink(keyedInitrd)
                }
                // The shared kernel last, just before the definition that uses it: until then
                // `prune` elsewhere sees no domain on it.
                let kernelPath = try sharedVolume(for: kernel, kind: .boot, in: pool, progress: progress, uploaded: uploaded)
                prepared.spec.boot = .kernel(kernel: kernelPath, initrd: initrdPath, cmdline: cmdline)
            }
            if let image = prepared.image, let key {
                let pool = try storagePool(for: request, on: conn)
                try attach(image, key: key, to: &prepared.spec, request: request, pool: pool, remote: remote,
                           volumes: &volumes, progress: progress, uploaded: uploaded)
            }
            try Interruption.check()
            let document = try DomainXML.build(prepared.spec, domainType: domainType)
            domain = try conn.define(xml: document.serialize())
        } catch {
            removeFiles()
            throw undone(error)
        }
        do {
            try Interruption.check()
            try domain.start()
            // A signal while QEMU started: the domain goes again, as if it had not started.
            try Interruption.check()
        } catch {
            if domain.isActive { try? domain.destroy() }
            try? domain.undefine()
            removeFiles()
            throw undone(error)
        }
        // QEMU has read the initramfs into memory; nobody but its owner may read the key again.
        if prepared.initrdBase != nil && !remote { KeyedInitrd.reclaim(keyedInitrd) }
        return CreatedMachine(name: name, domainType: domainType, consoleLog: prepared.spec.consoleLog, startedAt: Date())
    }

    /// Gives up on an image boot whose agent never answered (within `waited` seconds): the
    /// domain and its volumes are removed, its console log is kept at
    /// `HostPaths.abandonedConsoleLog(for:)`, and the error returned says what to do.
    public func abandonImageBoot(_ name: String, waited: Double) -> VirtchanError {
        let kept = paths.abandonedConsoleLog(for: name)
        unlink(kept)
        let haveLog = (try? FileManager.default.copyItem(atPath: paths.consoleLog(for: name), toPath: kept)) != nil
        try? destroy(name, force: true)
        var message = "the agent in \(name) did not answer within \(formatSeconds(waited)), so the domain and its volumes are removed. "
        if haveLog { message += "Its console is kept in \(kept). " }
        message += "An image without cloud-init cannot take the agent from the seed: install virtchan-agent_\(virtchanVersion)_amd64.deb (Scripts/package-agent) into it and boot it with --disk --insecure-agent"
        return VirtchanError(.agentTimeout, message)
    }

    /// The storage pool that holds what domains boot from volumes: each image boot's overlay
    /// (`NAME.qcow2`) and seed (`NAME.seed.iso`), and for remote domains the shared kernels and
    /// base images and each domain's initramfs (`NAME.initrd`). ``destroy(_:keepDefinition:force:)``
    /// deletes a domain's own volumes, never the shared ones; ``prune(pool:minimumAge:dryRun:)``
    /// removes those that no domain uses any more.
    public static let storagePoolName = "virtchan"
    private static let sharedVolumeLock = NSLock()

    /// What the volumes made for one domain alone end in, after the domain's name.
    static let ownVolumeSuffixes = [".initrd", ".qcow2", ".seed.iso"]

    /// The names of the volumes made for `domain` alone.
    static func ownVolumeNames(of domain: String) -> Set<String> {
        Set(ownVolumeSuffixes.map { domain + $0 })
    }

    /// What a shared upload holds: a kernel or a base image.
    enum SharedUpload: String {
        case boot, base

        /// The volume's name for a file whose SHA-256 is `digest` (hex): the kind, a dash and
        /// the digest's first 24 digits.
        func volumeName(digest: String) -> String { rawValue + "-" + digest.prefix(24) }

        /// The empty volume whose presence says that the upload of the same name finished.
        static let markerSuffix = ".complete"
    }

    /// The request's pool: virtchan's own, defined on first use, or the one named, which must
    /// exist (it is started when stopped).
    private func storagePool(for request: MachineRequest, on conn: Connection) throws -> StoragePool {
        guard let name = request.storagePool, name != Self.storagePoolName else {
            return try StoragePool.directory(Self.storagePoolName, path: storagePoolPath, on: conn)
        }
        guard let pool = StoragePool.lookup(name, on: conn) else {
            throw VirtchanError(.invalidRequest, "there is no storage pool \(name) on \(uri) (see: virsh -c \(shellWord(uri)) pool-list --all)")
        }
        try pool.activate()
        return pool
    }

    /// Makes an image boot's overlay and seed volumes in `pool` and points the spec at them.
    /// Over a remote URI the base image is uploaded first, once per content (like a kernel).
    private func attach(_ image: PreparedImage, key: AgentKey, to spec: inout DomainSpec, request: MachineRequest,
                        pool: StoragePool, remote: Bool, volumes: inout [StorageVolume], progress: ((String) -> Void)?,
                        uploaded: ((UInt64, UInt64) -> Void)?) throws {
        let name = request.name
        for volumeName in [name + ".qcow2", name + ".seed.iso"] where pool.volume(volumeName) != nil {
            throw VirtchanError(.alreadyExists, "the storage pool \(pool.name) on \(uri) already has a volume \(volumeName), and no domain \(name) uses it; remove it with: virsh -c \(shellWord(uri)) vol-delete --pool \(shellWord(pool.name)) \(shellWord(volumeName)) (or every such volume: virtchan prune -c \(shellWord(uri)) --pool \(shellWord(pool.name)))")
        }
        // The instance id cloud-init keys its once-per-instance work on: the domain's UUID.
        let uuid = UUID().uuidString.lowercased()
        let stateDir = paths.stateDirectory(for: name)
        let iso = stateDir + "/seed.iso"
        defer { unlink(iso) }
        try CloudSeed.write(iso: iso, in: stateDir, payload: image.payload, key: key, instanceID: uuid,
                            hostname: image.hostname, user: request.cloudInit)
        let backing = remote ? try sharedVolume(for: image.disk.path, kind: .base, in: pool, progress: progress, uploaded: uploaded) : image.disk.path
        let overlay = try pool.makeOverlay(name + ".qcow2", bytes: image.capacity, backing: backing,
                                           backingFormat: image.disk.format.rawValue)
        volumes.append(overlay)
        if remote { progress?("uploading the cloud-init seed of \(name) to the storage pool \(pool.name) on \(uri)") }
        let seed = try pool.upload(iso, as: name + ".seed.iso", progress: remote ? uploaded : nil)
        volumes.append(seed)
        spec.uuid = uuid
        spec.boot = .disk(try overlay.path())
        spec.seedImage = try seed.path()
    }

    /// Where ``storagePoolName`` keeps its files on its host, when virtchan defines it: beside
    /// the state directories here (`/var/lib/virtchan/pool` for root, under the user's own
    /// state directory otherwise), `/var/lib/virtchan/pool` on another host.
    public var storagePoolPath: String {
        Connection.isLocal(uri: uri) ? (paths.stateBase as NSString).deletingLastPathComponent + "/pool" : "/var/lib/virtchan/pool"
    }

    /// The path on the pool's host of a volume with the bytes of the local file `path`, named
    /// by their SHA-256 so that every domain booting them shares one upload. An empty volume
    /// named `….complete` says the upload finished: a volume without one (an upload cut off,
    /// or one under way elsewhere) is never booted, but replaced.
    private func sharedVolume(for path: String, kind: SharedUpload, in pool: StoragePool, progress: ((String) -> Void)?,
                              uploaded: ((UInt64, UInt64) -> Void)?) throws -> String {
        // Domains created side by side in this process share one upload.
        Self.sharedVolumeLock.lock()
        defer { Self.sharedVolumeLock.unlock() }
        guard let file = FileHandle(forReadingAtPath: path) else {
            throw VirtchanError(.io, "cannot read \(path)")
        }
        defer { try? file.close() }
        var hash = SHA256()
        var size = 0
        while let chunk = try file.read(upToCount: 4 << 20), !chunk.isEmpty {
            hash.update(data: chunk)
            size += chunk.count
        }
        let digest = hash.finalize().map { String(format: "%02x", $0) }.joined()
        let volumeName = kind.volumeName(digest: digest)
        let marker = volumeName + SharedUpload.markerSuffix
        if let existing = pool.volume(volumeName), pool.volume(marker) != nil,
           (try? existing.capacity()) == UInt64(size) {
            return try existing.path()
        }
        try? pool.volume(marker)?.delete()
        try? pool.volume(volumeName)?.delete()
        progress?("uploading \(path) (\(size >> 20) MiB) to the storage pool \(pool.name) on \(uri)")
        let volume = try pool.upload(path, as: volumeName, mode: 0o644, progress: uploaded)
        _ = try pool.makeVolume(marker, bytes: 0, mode: 0o644)
        guard let uploaded = try? volume.path() else {
            try? pool.volume(marker)?.delete()
            throw VirtchanError(.io, "the upload \(volumeName) of \(path) was removed from the storage pool \(pool.name) on \(uri) while it went up (by 'virtchan prune --min-age 0' or virsh vol-delete, elsewhere?); run create again")
        }
        return uploaded
    }

    private struct Prepared {
        var spec: DomainSpec
        /// The initramfs the agent key is added to; nil when the boot has none.
        let initrdBase: String?
        /// An image boot: what its overlay and seed are made from.
        let image: PreparedImage?
        /// Whether the domain gets an agent key (in its initramfs or on its seed).
        var keyed: Bool { initrdBase != nil || image != nil }
    }

    private struct PreparedImage {
        let disk: DiskImage
        /// The overlay's size in bytes.
        let capacity: UInt64
        let payload: CloudSeed.Payload
        let hostname: String
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
        var image: PreparedImage?
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
        case let .image(base, diskSize):
            let disk: DiskImage
            do {
                disk = try DiskImage(probing: absolute(base))
            } catch {
                throw VirtchanError(error.code == .io ? .io : .invalidRequest, error.message)
            }
            if let diskSize, diskSize < disk.virtualSize {
                throw VirtchanError(.invalidRequest, "--disk-size \(DiskImage.formatSize(diskSize)) is smaller than the image \(base) (\(DiskImage.formatSize(disk.virtualSize))); give at least that, or leave it out")
            }
            let cloud = request.cloudInit
            if let userData = cloud.userData { _ = try CloudSeed.partType(of: userData, source: cloud.userDataSource) }
            for key in cloud.sshAuthorizedKeys where key.isEmpty || key.contains("\n") || !key.contains(" ") {
                throw VirtchanError(.invalidRequest, "an ssh key is one line such as 'ssh-ed25519 AAAA… comment', not '\(key.prefix(40))'")
            }
            let hostname = cloud.hostname ?? CloudSeed.defaultHostname(for: name)
            try CloudSeed.validateHostname(hostname)
            image = PreparedImage(disk: disk, capacity: diskSize ?? disk.virtualSize,
                                  payload: try CloudSeed.Payload(imageDirectory: paths.imageDirectory), hostname: hostname)
            if request.memoryMiB == nil && request.templateXML == nil { spec.memoryMiB = MachineRequest.imageMemoryMiB }
            // Where the volumes will be, for --dry-run; create puts the real paths in.
            let poolPath = request.storagePool.map { "<pool \($0)>" } ?? storagePoolPath
            spec.boot = .disk(poolPath + "/" + name + ".qcow2")
            spec.seedImage = poolPath + "/" + name + ".seed.iso"
            unkeyable = nil
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
        return Prepared(spec: spec, initrdBase: initrdBase, image: image)
    }

    /// The domain's state directory, closed to everyone but its owner: the agent's sockets,
    /// the console log and the bootstrap's secrets are in it. (libvirt hands QEMU the sockets
    /// already bound.)
    @discardableResult
    private func writeStateDirectory(_ stateDir: String, for request: MachineRequest, keyed: Bool, initrdBase: String?,
                                     keyedInitrd: String) throws -> AgentKey? {
        let fm = FileManager.default
        do {
            try fm.createDirectory(atPath: stateDir, withIntermediateDirectories: true, attributes: [.posixPermissions: 0o700])
        } catch {
            throw VirtchanError(.io, "cannot create \(stateDir): \(error.localizedDescription)")
        }
        chmod(stateDir, 0o700)
        try writePrivateFile(stateDir + "/" + HostPaths.ownerMarker, Data(request.name.utf8))
        if let plan = request.bootstrap { try plan.save(into: stateDir) }
        guard keyed else {
            // The caller chose an agent without a key for this domain; later sessions accept it.
            try writePrivateFile(stateDir + "/" + AgentEndpoint.unkeyedMarkerName, Data())
            return nil
        }
        let key = AgentKey.generate()
        try writePrivateFile(stateDir + "/" + AgentEndpoint.keyFileName, Data(key.fileText.utf8))
        if let initrdBase { try KeyedInitrd.write(base: initrdBase, key: key, to: keyedInitrd) }
        return key
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
