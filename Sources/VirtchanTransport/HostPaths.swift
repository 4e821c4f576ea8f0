import Glibc

/// Where virtchan keeps its files on the host: the system's directories for root, the user's
/// own (XDG base directories) for anyone else, each overridable by its variable.
public struct HostPaths: Sendable {
    /// One directory per domain: its sockets, console log, agent key and bootstrap.
    public var stateBase: String
    /// The built-in guest, built by root and readable by everyone.
    public var imageDirectory: String
    public var cacheDirectory: String
    /// Each domain's own initramfs, carrying its agent key.
    public var bootDirectory: String

    public init(stateBase: String, imageDirectory: String, cacheDirectory: String, bootDirectory: String) {
        self.stateBase = stateBase
        self.imageDirectory = imageDirectory
        self.cacheDirectory = cacheDirectory
        self.bootDirectory = bootDirectory
    }

    /// The directories for this process: `VIRTCHAN_STATE_DIR`, `VIRTCHAN_IMAGE_DIR`,
    /// `VIRTCHAN_CACHE_DIR` and `VIRTCHAN_BOOT_DIR` when set, else the defaults for its user.
    public static var current: HostPaths {
        // getenv, not ProcessInfo's environment: that copies all of it into a dictionary, a
        // noticeable part of a short command's start.
        func value(_ key: String) -> String? { getenv(key).map { String(cString: $0) }.flatMap { $0.isEmpty ? nil : $0 } }
        let isRoot = geteuid() == 0
        let home = value("HOME") ?? "/tmp"
        func userState(_ name: String) -> String? {
            isRoot ? nil : (value("XDG_STATE_HOME") ?? home + "/.local/state") + "/virtchan/" + name
        }
        return HostPaths(
            stateBase: value("VIRTCHAN_STATE_DIR") ?? userState("domains") ?? "/var/lib/virtchan/domains",
            imageDirectory: value("VIRTCHAN_IMAGE_DIR") ?? "/var/lib/virtchan/images",
            cacheDirectory: value("VIRTCHAN_CACHE_DIR")
                ?? (isRoot ? "/var/cache/virtchan" : (value("XDG_CACHE_HOME") ?? home + "/.cache") + "/virtchan"),
            bootDirectory: value("VIRTCHAN_BOOT_DIR") ?? userState("boot") ?? "/var/lib/virtchan/boot")
    }

    public func stateDirectory(for domain: String) -> String { stateBase + "/" + domain }
    public func consoleLog(for domain: String) -> String { stateDirectory(for: domain) + "/console.log" }
    /// The console log of a domain whose first boot was given up, kept after the domain went.
    public func abandonedConsoleLog(for domain: String) -> String { stateBase + "/\(domain).console.log" }
    /// The domain's copy of the initramfs, with its agent key added.
    public func keyedInitrd(for domain: String) -> String { bootDirectory + "/\(domain).initrd" }
    /// The file in a state directory that names the domain it belongs to.
    public static let ownerMarker = ".virtchan-domain"
}
