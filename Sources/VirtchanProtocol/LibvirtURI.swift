import Glibc

/// What virtchan reads from a libvirt URI without libvirt: which one a command uses when none
/// is given, and whether it reaches this host's own daemon. Plain byte work, no Foundation:
/// every command asks before anything else, the shortest ones included.
public enum LibvirtURI {
    /// The URI virsh would use: `LIBVIRT_DEFAULT_URI`, else `qemu:///system` for root and
    /// `qemu:///session` for anyone else.
    public static var standard: String {
        if let env = getenv("LIBVIRT_DEFAULT_URI"), env.pointee != 0 { return String(cString: env) }
        return geteuid() == 0 ? "qemu:///system" : "qemu:///session"
    }

    /// True when `uri` reaches libvirt on this machine through its own unix socket, so a
    /// domain's channel sockets are files here. A URI with a host or a network transport
    /// (`qemu+ssh`, `qemu+tcp`, `qemu+tls`) is remote even when it names this machine.
    public static func isLocal(_ uri: String) -> Bool { remoteHost(of: uri) == nil }

    /// The host (with its port, if the URI gives one) a remote URI reaches, "" for a network
    /// transport to this machine (`qemu+ssh:///system`); nil for this host's own daemons.
    public static func remoteHost(of uri: String) -> String? {
        // scheme[+transport]://[user@]host[:port]/path?query
        let bytes = Array(uri.utf8)
        guard let colon = bytes.firstIndex(of: UInt8(ascii: ":")),
              bytes.count >= colon + 3, bytes[colon + 1] == UInt8(ascii: "/"), bytes[colon + 2] == UInt8(ascii: "/") else {
            return nil
        }
        let scheme = bytes[..<colon]
        var authority = bytes[(colon + 3)...].prefix { $0 != UInt8(ascii: "/") && $0 != UInt8(ascii: "?") }
        if let at = authority.lastIndex(of: UInt8(ascii: "@")) { authority = authority[(at + 1)...] }
        let host = String(decoding: authority, as: UTF8.self)
        if let plus = scheme.firstIndex(of: UInt8(ascii: "+")), !scheme[(plus + 1)...].elementsEqual("unix".utf8) { return host }
        return host.isEmpty ? nil : host
    }
}
