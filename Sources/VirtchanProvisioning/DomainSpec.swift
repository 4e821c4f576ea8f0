import Foundation

public enum Accelerator: String, Sendable, CaseIterable, Codable {
    case auto, kvm, tcg
}

public enum ChannelRole: String, Sendable, Codable {
    case control, data, other
}

public enum BootSource: Sendable, Equatable {
    case kernel(kernel: String, initrd: String?, cmdline: String)
    case disk(String)
}

/// One `<channel type='unix'>` on the virtio-serial controller.
public struct ChannelSpec: Sendable, Equatable {
    public var name: String
    public var role: ChannelRole
    /// virtio-serial port number; port 0 is reserved for a console.
    public var port: Int
    /// Host socket path, or nil to let libvirt choose one (read back from the live XML).
    public var socketPath: String?

    public init(name: String, role: ChannelRole, port: Int, socketPath: String?) {
        self.name = name
        self.role = role
        self.port = port
        self.socketPath = socketPath
    }
}

public enum ChannelNames {
    public static let control = "org.virtchan.control"
    public static let data = "org.virtchan.data"
    public static let qemuGuestAgent = "org.qemu.guest_agent.0"
}

/// Everything virtchan needs to write a domain's XML.
public struct DomainSpec: Sendable {
    public var name: String
    /// nil keeps a template's own memory size (512 MiB without a template).
    public var memoryMiB: Int?
    public var vcpus: Int?
    public var accelerator: Accelerator = .auto
    public var boot: BootSource?
    /// The file the serial console writes to; nil puts the console on a pseudo-terminal.
    public var consoleLog: String?
    public var controllerIndex = 0
    public var controllerPorts = 16
    public var channels: [ChannelSpec] = []
    /// A user's own base domain XML to add the controller and channels to.
    public var templateXML: String?
    /// The domain's UUID; nil lets libvirt pick one.
    public var uuid: String?
    /// A read-only raw image attached as the second virtio disk: a cloud-init seed.
    public var seedImage: String?
    public var metadata: VirtchanMetadata?

    public static let defaultMemoryMiB = 512
    /// sun_path holds 108 bytes including the terminating NUL.
    public static let maxSocketPathBytes = 107
    public static let maxControllerPorts = 31

    public init(name: String) { self.name = name }

    /// The two channels every managed domain carries, with sockets in `stateDir`
    /// (or libvirt-chosen paths when `stateDir` is nil).
    public static func standardChannels(socketDirectory: String?, qemuGuestAgent: Bool = false) -> [ChannelSpec] {
        var list = [
            ChannelSpec(name: ChannelNames.control, role: .control, port: 1,
                        socketPath: socketDirectory.map { $0 + "/control.sock" }),
            ChannelSpec(name: ChannelNames.data, role: .data, port: 2,
                        socketPath: socketDirectory.map { $0 + "/data.sock" }),
        ]
        if qemuGuestAgent {
            list.append(ChannelSpec(name: ChannelNames.qemuGuestAgent, role: .other, port: 3,
                                    socketPath: socketDirectory.map { $0 + "/qga.sock" }))
        }
        return list
    }

    /// Checks everything that can be checked before libvirt is asked to do anything.
    public func validate() throws(ProvisioningError) {
        try Self.validateName(name)
        try Self.validateSize(memoryMiB: memoryMiB, vcpus: vcpus)
        guard (1...Self.maxControllerPorts).contains(controllerPorts) else {
            throw ProvisioningError(.invalidArgument,
                "a virtio-serial controller has 1 to \(Self.maxControllerPorts) ports, not \(controllerPorts)")
        }
        var names = Set<String>()
        var ports = Set<Int>()
        for ch in channels {
            guard !ch.name.isEmpty, ch.name.utf8.count <= 255, !ch.name.contains("/") else {
                throw ProvisioningError(.invalidArgument, "channel name '\(ch.name)' is not usable as a virtio port name")
            }
            guard ch.port >= 1 else {
                throw ProvisioningError(.invalidArgument, "channel \(ch.name): port 0 is reserved for a console; use 1 or more")
            }
            guard ch.port < controllerPorts else {
                throw ProvisioningError(.invalidArgument,
                    "channel \(ch.name) uses port \(ch.port) but the controller has only \(controllerPorts) ports (0-\(controllerPorts - 1))")
            }
            guard names.insert(ch.name).inserted else {
                throw ProvisioningError(.conflict, "two channels are named \(ch.name)")
            }
            guard ports.insert(ch.port).inserted else {
                throw ProvisioningError(.conflict, "two channels use virtio-serial port \(ch.port)")
            }
            if let path = ch.socketPath {
                guard path.hasPrefix("/") else {
                    throw ProvisioningError(.invalidArgument, "socket path \(path) must be absolute")
                }
                guard path.utf8.count <= Self.maxSocketPathBytes else {
                    throw ProvisioningError(.invalidArgument,
                        "socket path \(path) is \(path.utf8.count) bytes, longer than a unix socket allows (\(Self.maxSocketPathBytes)); use a shorter state directory (VIRTCHAN_STATE_DIR)")
                }
            }
        }
    }

    /// Memory and vCPU counts a domain can have.
    public static func validateSize(memoryMiB: Int?, vcpus: Int?) throws(ProvisioningError) {
        if let m = memoryMiB, !(64...1_048_576).contains(m) {
            throw ProvisioningError(.invalidArgument, "memory \(m) MiB is out of range: give 64 to 1048576 MiB (--memory)")
        }
        if let v = vcpus, !(1...256).contains(v) {
            throw ProvisioningError(.invalidArgument, "vCPU count \(v) is out of range: give 1 to 256 (--vcpus)")
        }
    }

    public static func validateName(_ name: String) throws(ProvisioningError) {
        let allowed = Set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")
        guard !name.isEmpty, name.count <= 64, name.allSatisfy({ allowed.contains($0) }), !name.hasPrefix(".") else {
            throw ProvisioningError(.invalidArgument,
                "'\(name)' is not a usable domain name: use 1-64 letters, digits, '-', '_' or '.', not starting with '.'")
        }
    }
}
