import Glibc
import VirtchanProtocol

/// Where the session holder of a domain keeps its socket, lock, record and log: one set per
/// libvirt URI and domain name, so that domains of the same name on two hosts never share one.
public enum HolderFiles {
    public static var directory: String { runtimeDirectory + "/holders" }

    /// A file name for domain `name` on `uri`, the same for the same pair and different
    /// otherwise: its readable part, then a hash of both.
    public static func stem(uri: String, name: String) -> String {
        let digits = Array("0123456789abcdef".utf8)
        let hash = SHA256Digest.hash(Array((uri + "\n" + name).utf8)).prefix(8).flatMap { [digits[Int($0 >> 4)], digits[Int($0 & 15)]] }
        return stemPrefix(name: name) + String(decoding: hash, as: UTF8.self)
    }

    /// How the stems of domain `name` begin, on any URI (and those of a few other names).
    public static func stemPrefix(name: String) -> String {
        String(decoding: name.utf8.filter { byte in
            (byte >= 0x30 && byte <= 0x39) || (byte | 0x20 >= 0x61 && byte | 0x20 <= 0x7a) || byte == 0x2e || byte == 0x5f || byte == 0x2d
        }.prefix(40), as: UTF8.self) + "-"
    }

    public static func socket(uri: String, name: String) -> String {
        directory + "/" + stem(uri: uri, name: name) + ".sock"
    }
}

extension AgentEndpoint {
    /// The endpoint of domain `name` on `uri` through its session holder, with the domain's
    /// key from `paths` (and its console log, for a domain of this host).
    public static func throughHolder(of name: String, on uri: String, paths: HostPaths, allowUnkeyed: Bool) -> AgentEndpoint {
        let local = LibvirtURI.isLocal(uri)
        let console = paths.consoleLog(for: name)
        var endpoint = AgentEndpoint(domain: name, controlSocket: "", dataSocket: nil,
                                     consoleLog: local && access(console, F_OK) == 0 ? console : nil)
        endpoint.holderSocket = HolderFiles.socket(uri: uri, name: name)
        if !local { endpoint.remoteURI = uri }
        endpoint.loadCredentials(stateDirectory: paths.stateDirectory(for: name), allowUnkeyed: allowUnkeyed)
        return endpoint
    }
}
