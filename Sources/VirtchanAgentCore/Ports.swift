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

    public static func find(_ name: String, sysfsRoot: String = defaultSysfsRoot) -> VirtioPort? {
        ports(sysfsRoot: sysfsRoot).first { $0.name == name }
    }
}
