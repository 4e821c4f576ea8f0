import Glibc
import VirtchanProtocol

/// What `info` tells about the guest beyond the kernel: its OS and its IP addresses.
enum GuestSystem {
    /// `PRETTY_NAME` from os-release (`/etc/os-release`, else `/usr/lib/os-release`); empty
    /// when neither names one.
    static func prettyName() -> String {
        for path in ["/etc/os-release", "/usr/lib/os-release"] {
            guard let text = readSmallFile(path) else { continue }
            for line in text.split(separator: "\n") where line.hasPrefix("PRETTY_NAME=") {
                var value = line.dropFirst("PRETTY_NAME=".count)
                if let quote = value.first, quote == "\"" || quote == "'", value.count >= 2, value.last == quote {
                    value = value.dropFirst().dropLast()
                }
                return String(value)
            }
        }
        return ""
    }

    /// Every interface with an IPv4 or IPv6 address, in the order the kernel lists them, each
    /// address with its prefix length.
    static func interfaces() -> [GuestInterface] {
        var head: UnsafeMutablePointer<ifaddrs>?
        guard getifaddrs(&head) == 0, let first = head else { return [] }
        defer { freeifaddrs(head) }
        var result: [GuestInterface] = []
        var entry: UnsafeMutablePointer<ifaddrs>? = first
        while let e = entry {
            defer { entry = e.pointee.ifa_next }
            guard let addr = e.pointee.ifa_addr, let name = e.pointee.ifa_name else { continue }
            let family = Int32(addr.pointee.sa_family)
            guard family == AF_INET || family == AF_INET6 else { continue }
            var text = [CChar](repeating: 0, count: Int(INET6_ADDRSTRLEN) + 1)
            let source: UnsafeRawPointer = family == AF_INET
                ? UnsafeRawPointer(addr).advanced(by: MemoryLayout<sockaddr_in>.offset(of: \sockaddr_in.sin_addr)!)
                : UnsafeRawPointer(addr).advanced(by: MemoryLayout<sockaddr_in6>.offset(of: \sockaddr_in6.sin6_addr)!)
            guard inet_ntop(family, source, &text, socklen_t(text.count)) != nil else { continue }
            let address = string(fromCBuffer: text) + "/" + String(prefixLength(e.pointee.ifa_netmask, family: family))
            let interfaceName = String(cString: name)
            if let i = result.firstIndex(where: { $0.name == interfaceName }) {
                result[i].addresses.append(address)
            } else if result.count < Info.maxInterfaces {
                result.append(GuestInterface(name: interfaceName, addresses: [address]))
            }
        }
        return result
    }

    private static func prefixLength(_ mask: UnsafeMutablePointer<sockaddr>?, family: Int32) -> Int {
        guard let mask else { return family == AF_INET ? 32 : 128 }
        let count = family == AF_INET ? 4 : 16
        let offset = family == AF_INET ? MemoryLayout<sockaddr_in>.offset(of: \sockaddr_in.sin_addr)!
                                       : MemoryLayout<sockaddr_in6>.offset(of: \sockaddr_in6.sin6_addr)!
        let bytes = UnsafeRawPointer(mask).advanced(by: offset).assumingMemoryBound(to: UInt8.self)
        return (0..<count).reduce(0) { $0 + bytes[$1].nonzeroBitCount }
    }
}
