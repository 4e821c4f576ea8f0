import Foundation
import VirtchanProtocol

/// A domain's own initramfs: a shared one with a second cpio archive appended that carries
/// the domain's agent key at `/etc/virtchan/agent.key` (the kernel unpacks concatenated
/// archives in order). The file is root's, mode 0600, in a directory nobody else can list:
/// libvirt makes it readable to QEMU while the domain starts, QEMU keeps the contents in
/// memory (guest reboots reuse them), and `reclaim` takes it back right after the start.
public enum KeyedInitrd {
    /// Writes `base` followed by the key's archive to `path`.
    public static func write(base: String, key: AgentKey, to path: String) throws(ProvisioningError) {
        let fm = FileManager.default
        let dir = (path as NSString).deletingLastPathComponent
        do {
            try fm.createDirectory(atPath: dir, withIntermediateDirectories: true, attributes: [.posixPermissions: 0o711])
        } catch {
            throw ProvisioningError(.io, "cannot create \(dir): \(error.localizedDescription)")
        }
        let archive = try keyArchive(key)
        let temp = path + ".tmp"
        guard let input = FileHandle(forReadingAtPath: base) else {
            throw ProvisioningError(.io, "cannot read the initramfs \(base)")
        }
        defer { try? input.close() }
        unlink(temp)
        guard fm.createFile(atPath: temp, contents: nil, attributes: [.posixPermissions: 0o600]),
              let output = FileHandle(forWritingAtPath: temp) else {
            throw ProvisioningError(.io, "cannot write \(temp)")
        }
        do {
            defer { try? output.close() }
            while let chunk = try input.read(upToCount: 4 << 20), !chunk.isEmpty { try output.write(contentsOf: chunk) }
            // Each archive starts on a 4-byte boundary.
            let size = try output.offset()
            if size % 4 != 0 { try output.write(contentsOf: Data(count: Int(4 - size % 4))) }
            try output.write(contentsOf: archive)
            try output.synchronize()
        } catch {
            unlink(temp)
            throw ProvisioningError(.io, "cannot write \(path): \(error.localizedDescription)")
        }
        guard rename(temp, path) == 0 else {
            unlink(temp)
            throw ProvisioningError(.io, "cannot write \(path): \(String(cString: strerror(errno)))")
        }
    }

    /// Makes the file its owner's and private again once QEMU has read it (root's for the
    /// system instance; a session domain's file was never anyone else's).
    public static func reclaim(_ path: String) {
        if geteuid() == 0 { chown(path, 0, 0) }
        chmod(path, 0o600)
    }

    /// A newc cpio archive of etc/virtchan/agent.key (0600), made by cpio(1).
    static func keyArchive(_ key: AgentKey) throws(ProvisioningError) -> Data {
        let fm = FileManager.default
        let tree = NSTemporaryDirectory() + "virtchan-key-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        defer { try? fm.removeItem(atPath: tree) }
        do {
            try fm.createDirectory(atPath: tree + "/etc/virtchan", withIntermediateDirectories: true,
                                   attributes: [.posixPermissions: 0o700])
            chmod(tree, 0o700)
            chmod(tree + "/etc", 0o755)
            guard fm.createFile(atPath: tree + "/etc/virtchan/agent.key", contents: Data(key.fileText.utf8),
                                attributes: [.posixPermissions: 0o600]) else {
                throw ProvisioningError(.io, "cannot write the key archive in \(tree)")
            }
        } catch let e as ProvisioningError {
            throw e
        } catch {
            throw ProvisioningError(.io, "cannot write the key archive: \(error.localizedDescription)")
        }
        let cpio = Process()
        cpio.executableURL = URL(fileURLWithPath: "/usr/bin/cpio")
        cpio.arguments = ["--quiet", "-o", "-H", "newc", "-R", "0:0"]
        cpio.currentDirectoryURL = URL(fileURLWithPath: tree)
        let input = Pipe(), output = Pipe()
        cpio.standardInput = input
        cpio.standardOutput = output
        cpio.standardError = FileHandle.nullDevice
        do { try cpio.run() } catch {
            throw ProvisioningError(.io, "cannot run cpio (install it with: apt-get install cpio): \(error.localizedDescription)")
        }
        input.fileHandleForWriting.write(Data("etc\netc/virtchan\netc/virtchan/agent.key\n".utf8))
        try? input.fileHandleForWriting.close()
        let data = output.fileHandleForReading.readDataToEndOfFile()
        cpio.waitUntilExit()
        guard cpio.terminationStatus == 0, !data.isEmpty else {
            throw ProvisioningError(.io, "cpio failed (\(cpio.terminationStatus)) making the key archive")
        }
        return data
    }
}
