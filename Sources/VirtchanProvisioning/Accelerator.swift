import Foundation

/// Picks `<domain type=…>` for an accelerator choice. `auto` takes KVM only where a guest
/// really boots under it: on some hosts /dev/kvm opens but guests hang in early boot, so the
/// probe boots the built-in kernel under KVM and waits for its first console line.
public enum AcceleratorProbe {
    public static func domainType(for accel: Accelerator, imageDirectory: String, cacheDirectory: String) -> String {
        switch accel {
        case .kvm: return "kvm"
        case .tcg: return "qemu"
        case .auto: return kvmBoots(imageDirectory: imageDirectory, cacheDirectory: cacheDirectory) ? "kvm" : "qemu"
        }
    }

    /// The cached answer, or a fresh probe (at most about 8 s) whose answer is cached.
    public static func kvmBoots(imageDirectory: String, cacheDirectory: String) -> Bool {
        let fm = FileManager.default
        guard access("/dev/kvm", R_OK | W_OK) == 0 else { return false }
        let kernel = imageDirectory + "/vmlinuz"
        guard fm.fileExists(atPath: kernel) else { return false }
        let qemu = ["/usr/bin/qemu-system-x86_64", "/usr/libexec/qemu-kvm"].first { fm.isExecutableFile(atPath: $0) }
        guard let qemu else { return false }
        var uts = utsname()
        uname(&uts)
        let hostKernel = withUnsafeBytes(of: uts.release) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
        let kernelStamp = ((try? fm.attributesOfItem(atPath: kernel)[.modificationDate]) as? Date)?.timeIntervalSince1970 ?? 0
        let key = "\(hostKernel) \(qemu) \(Int(kernelStamp))"
        let cache = cacheDirectory + "/kvm-probe"
        if let text = try? String(contentsOfFile: cache, encoding: .utf8) {
            let lines = text.split(separator: "\n")
            if lines.count == 2, lines[0] == key { return lines[1] == "kvm-ok" }
        }
        let ok = probe(qemu: qemu, kernel: kernel)
        try? fm.createDirectory(atPath: cacheDirectory, withIntermediateDirectories: true)
        try? "\(key)\n\(ok ? "kvm-ok" : "kvm-hangs")\n".write(toFile: cache, atomically: true, encoding: .utf8)
        return ok
    }

    static func probe(qemu: String, kernel: String) -> Bool {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: qemu)
        p.arguments = ["-accel", "kvm", "-m", "128", "-display", "none", "-serial", "stdio", "-monitor", "none",
                       "-no-reboot", "-nodefaults", "-kernel", kernel, "-append", "console=ttyS0 panic=-1"]
        let out = Pipe()
        p.standardOutput = out
        p.standardError = FileHandle.nullDevice
        p.standardInput = FileHandle.nullDevice
        guard (try? p.run()) != nil else { return false }
        let fd = out.fileHandleForReading.fileDescriptor
        var seen = ""
        let deadline = Date().addingTimeInterval(8)
        var ok = false
        while Date() < deadline {
            var pfd = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
            if poll(&pfd, 1, 200) > 0 {
                var buf = [UInt8](repeating: 0, count: 4096)
                let n = read(fd, &buf, buf.count)
                if n <= 0 { break }
                seen += String(decoding: buf[0..<n], as: UTF8.self)
                if seen.contains("Linux version") { ok = true; break }
            }
        }
        // A vCPU stuck in KVM ignores SIGTERM.
        kill(p.processIdentifier, SIGKILL)
        p.waitUntilExit()
        return ok
    }
}
