import Foundation

/// What a disk image file is, read from its first bytes: enough to use it as the backing file
/// of an overlay without asking QEMU, and to refuse a file that is no disk at all.
public struct DiskImage: Sendable, Equatable {
    public enum Format: String, Sendable {
        case qcow2, raw
    }

    public let path: String
    public let format: Format
    /// The size the guest sees, in bytes.
    public let virtualSize: UInt64

    /// Reads the header of `path`. A qcow2 file is known by its magic; a raw image must carry a
    /// partition table (an MBR's boot signature, which a GPT disk's protective MBR has too),
    /// since raw bytes alone say nothing, and booting a file that is not a disk only shows as a
    /// guest that never comes up.
    public init(probing path: String) throws(ProvisioningError) {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else {
            let reason = errno == ENOENT ? "does not exist" : "cannot be read (\(String(cString: strerror(errno))))"
            throw ProvisioningError(.io, "the image \(path) \(reason)")
        }
        defer { close(fd) }
        var st = stat()
        guard fstat(fd, &st) == 0, st.st_mode & S_IFMT == S_IFREG else {
            throw ProvisioningError(.invalidArgument, "the image \(path) is not a regular file")
        }
        var header = [UInt8](repeating: 0, count: 512)
        let n = header.withUnsafeMutableBytes { pread(fd, $0.baseAddress, 512, 0) }
        guard n == 512 else {
            throw ProvisioningError(.invalidArgument, "\(path) is not a disk image: it has \(max(n, 0)) bytes")
        }
        self.path = path
        if header[0..<4] == [0x51, 0x46, 0x49, 0xfb] {  // "QFI\xfb"
            format = .qcow2
            virtualSize = header[24..<32].reduce(0) { $0 << 8 | UInt64($1) }
        } else if header[510] == 0x55 && header[511] == 0xaa {
            format = .raw
            virtualSize = UInt64(st.st_size)
        } else {
            throw ProvisioningError(.invalidArgument,
                "\(path) is not a disk image: neither qcow2 nor a raw disk with a partition table")
        }
    }

    /// A size for people: `2 GiB`, `512 MiB`, `1.5 KiB`.
    public static func formatSize(_ bytes: UInt64) -> String {
        let units = ["bytes", "KiB", "MiB", "GiB", "TiB"]
        var value = Double(bytes)
        var unit = 0
        while value >= 1024 && unit < units.count - 1 { value /= 1024; unit += 1 }
        return unit == 0 ? "\(bytes) bytes" : value == value.rounded() ? "\(Int(value)) \(units[unit])" : String(format: "%.1f %@", value, units[unit])
    }

    /// Parses a size such as `20G`, `512M`, `1.5T` or a byte count (suffixes are powers of 1024).
    public static func parseSize(_ text: String) -> UInt64? {
        let units: [Character: Double] = ["K": 0x1p10, "M": 0x1p20, "G": 0x1p30, "T": 0x1p40]
        var number = Substring(text.uppercased())
        if number.hasSuffix("IB") { number = number.dropLast(2) } else if number.hasSuffix("B") { number = number.dropLast() }
        var scale = 1.0
        if let last = number.last, let unit = units[last] {
            scale = unit
            number = number.dropLast()
        }
        guard let value = Double(number), value > 0, value * scale < 1.0e18 else { return nil }
        return UInt64(value * scale)
    }
}
