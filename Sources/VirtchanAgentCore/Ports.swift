import Glibc
import VirtchanProtocol

/// A virtio-serial port as the guest kernel shows it.
public struct VirtioPort: Sendable, Equatable {
    /// The name the host gave the channel (`<target name='…'/>`).
    public let name: String
    /// The character device, e.g. /dev/vport0p1.
    public let device: String
}

public enum PortDiscovery {
    public static let defaultSysfsRoot = "/sys/class/virtio-ports"

    /// Every named port, found through sysfs: a guest without udev has no
    /// /dev/virtio-ports links, but sysfs always knows each port's name.
    public static func ports(sysfsRoot: String = defaultSysfsRoot, devRoot: String = "/dev") -> [VirtioPort] {
        guard let entries = listDirectory(sysfsRoot) else { return [] }
        return entries.compactMap { entry in
            guard let raw = readSmallFile(sysfsRoot + "/" + entry + "/name") else { return nil }
            let name = trimmed(raw)
            guard !name.isEmpty else { return nil }
            return VirtioPort(name: name, device: devRoot + "/" + entry)
        }
    }

    public static func find(_ name: String, sysfsRoot: String = defaultSysfsRoot, devRoot: String = "/dev") -> VirtioPort? {
        ports(sysfsRoot: sysfsRoot, devRoot: devRoot).first { $0.name == name }
    }
}

/// How the agent reaches a port by name. The agent calls it for the control port at start
/// and after an error, and for the data port at the start of each transfer; it owns and
/// closes what it gets.
public protocol PortOpener: Sendable {
    /// Every port present, for the log, as (name, where).
    func available() -> [(name: String, location: String)]
    /// A read-write descriptor for the port called `name`, or why there is none.
    func open(_ name: String) -> Result<Int32, PortFailure>
}

public enum PortFailure: Error, Sendable {
    /// No port has this name (yet).
    case missing
    /// The port is there and could not be opened.
    case failed(location: String, errno: Int32)
}

/// The guest's virtio-serial ports, found by name in sysfs.
public struct VirtioPortOpener: PortOpener {
    public var sysfsRoot: String
    public var devRoot: String

    public init(sysfsRoot: String = PortDiscovery.defaultSysfsRoot, devRoot: String = "/dev") {
        self.sysfsRoot = sysfsRoot
        self.devRoot = devRoot
    }

    public func available() -> [(name: String, location: String)] {
        PortDiscovery.ports(sysfsRoot: sysfsRoot, devRoot: devRoot).map { ($0.name, $0.device) }
    }

    public func open(_ name: String) -> Result<Int32, PortFailure> {
        guard let port = PortDiscovery.find(name, sysfsRoot: sysfsRoot, devRoot: devRoot) else {
            return .failure(.missing)
        }
        let fd = Glibc.open(port.device, O_RDWR | O_NONBLOCK | O_CLOEXEC)
        return fd >= 0 ? .success(fd) : .failure(.failed(location: port.device, errno: errno))
    }
}
