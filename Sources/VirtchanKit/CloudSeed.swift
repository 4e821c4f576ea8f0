import Foundation
import VirtchanProtocol
import Yams

/// What a domain booted from a cloud image hands cloud-init besides the agent: the user's own
/// user-data, keys for the image's default user, a host name.
public struct CloudInit: Sendable {
    /// The user's own user-data, in any format cloud-init takes (`#cloud-config`, a script,
    /// MIME multi-part, …). It is combined with virtchan's part, never replaced.
    public var userData: Data?
    /// Where ``userData`` came from, for messages.
    public var userDataSource = "the user-data"
    /// Public keys authorized for the image's default user (one `ssh-…` line each).
    public var sshAuthorizedKeys: [String] = []
    /// The guest's host name; nil: the domain's name.
    public var hostname: String?

    public init() {}
}

/// The NoCloud seed (an ISO 9660 volume labelled `cidata`) that gives a stock cloud image the
/// agent at first boot: `meta-data`, `user-data` and, under `virtchan/`, the agent, its
/// systemd unit, its udev rule, its policy and the domain's key. The user-data's first part is
/// a boothook (`templates/agent/seed-boothook.sh`) that installs them early in every boot when
/// they differ from what the guest has.
enum CloudSeed {
    /// Where the guest finds the agent's files on the seed.
    static let payloadDirectory = "virtchan"
    /// The agent's path in a guest that got it from a seed (the .deb puts it in /usr/sbin): the
    /// seed's unit starts it from there, and the boothook installs it where the unit says.
    static let guestAgentPath = "/usr/local/sbin/virtchan-agent"

    /// The MIME type cloud-init gives user-data by its first line, checked as far as it can be
    /// before anything is defined: a `#cloud-config` must be YAML, and a format cloud-init
    /// would ignore is refused.
    static func partType(of data: Data, source: String) throws -> String {
        if data.starts(with: [0x1f, 0x8b]) {
            throw VirtchanError(.invalidRequest, "\(source) is compressed; give it uncompressed")
        }
        let head = String(decoding: data.prefix(200), as: UTF8.self)
        let firstLine = head.split(separator: "\n", maxSplits: 1, omittingEmptySubsequences: false).first
            .map { $0.trimmingCharacters(in: .whitespaces) } ?? ""
        let lowered = firstLine.lowercased()
        if lowered.hasPrefix("content-type:") || lowered.hasPrefix("mime-version:") { return "mime" }
        let prefixes: [(String, String)] = [
            ("#cloud-config-archive", "text/cloud-config-archive"), ("#cloud-config", "text/cloud-config"),
            ("#cloud-boothook", "text/cloud-boothook"), ("#include", "text/x-include-url"),
            ("#part-handler", "text/part-handler"), ("## template: jinja", "text/jinja2"), ("#!", "text/x-shellscript"),
        ]
        guard let type = prefixes.first(where: { firstLine.hasPrefix($0.0) })?.1 else {
            throw VirtchanError(.invalidRequest, "cloud-init would ignore \(source): its first line must be #cloud-config, #! (a script), #cloud-boothook, #include, or a MIME header, not '\(firstLine.prefix(40))'")
        }
        if type == "text/cloud-config" || type == "text/cloud-config-archive" {
            do {
                let value = try Yams.load(yaml: String(decoding: data, as: UTF8.self))
                let isMapping = value == nil || value is [AnyHashable: Any]
                if type == "text/cloud-config" && !isMapping {
                    throw VirtchanError(.invalidRequest, "\(source) is YAML but not a mapping of cloud-config keys")
                }
            } catch let error as VirtchanError {
                throw error
            } catch {
                throw VirtchanError(.invalidRequest, "\(source) is not valid YAML: \(error)")
            }
        }
        return type
    }

    /// virtchan's boothook, the user's user-data and virtchan's own cloud-config as one MIME
    /// multi-part message, in that order. virtchan's cloud-config comes last and merges
    /// without replacing anything the user's sets (lists are appended to).
    static func userData(boothook: Data, user: CloudInit) throws -> Data {
        var parts: [(type: String, name: String, body: Data)] = [("text/cloud-boothook", "virtchan-agent.sh", boothook)]
        if let data = user.userData {
            parts.append((try partType(of: data, source: user.userDataSource), "user-data", data))
        }
        if !user.sshAuthorizedKeys.isEmpty {
            let config: [String: Any] = [
                "merge_how": [["name": "list", "settings": ["append"]],
                              ["name": "dict", "settings": ["no_replace", "recurse_list"]]],
                "ssh_authorized_keys": user.sshAuthorizedKeys,
            ]
            parts.append(("text/cloud-config", "virtchan.cfg", Data(("#cloud-config\n" + (try Yams.dump(object: config))).utf8)))
        }
        var boundary: String
        repeat {
            boundary = "virtchan-" + AgentKey.generate().fileText.prefix(24)
        } while parts.contains { $0.body.range(of: Data(boundary.utf8)) != nil }
        var out = Data("Content-Type: multipart/mixed; boundary=\"\(boundary)\"\nMIME-Version: 1.0\n".utf8)
        for part in parts {
            out.append(Data("\n--\(boundary)\n".utf8))
            if part.type == "mime" {
                // A MIME message of the user's own carries its headers: it nests as it is.
                out.append(part.body)
            } else {
                out.append(Data("Content-Type: \(part.type); charset=\"utf-8\"\nMIME-Version: 1.0\nContent-Transfer-Encoding: 8bit\nContent-Disposition: attachment; filename=\"\(part.name)\"\n\n".utf8))
                out.append(part.body)
            }
            if part.body.last != 0x0a { out.append(0x0a) }
        }
        out.append(Data("--\(boundary)--\n".utf8))
        return out
    }

    static func metaData(instanceID: String, hostname: String) throws -> Data {
        Data(try Yams.dump(object: ["instance-id": instanceID, "local-hostname": hostname]).utf8)
    }

    /// A host name cloud-init will set: letters, digits and '-' in dot-separated labels.
    static func validateHostname(_ name: String) throws {
        let labels = name.split(separator: ".", omittingEmptySubsequences: false)
        let allowed = Set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-")
        guard name.utf8.count <= 253, !labels.isEmpty,
              labels.allSatisfy({ !$0.isEmpty && $0.count <= 63 && $0.allSatisfy(allowed.contains) && !$0.hasPrefix("-") && !$0.hasSuffix("-") }) else {
            throw VirtchanError(.invalidRequest, "'\(name)' is not a usable host name: use letters, digits and '-' in labels of up to 63 characters, separated by dots (--hostname)")
        }
    }

    /// The host name a domain's guest gets when none is given: its name, with what a host
    /// name cannot hold replaced.
    static func defaultHostname(for domain: String) -> String {
        let mapped = String(domain.map { $0 == "_" || $0 == "." ? "-" : $0 })
        return mapped.trimmingCharacters(in: CharacterSet(charactersIn: "-")).isEmpty ? "virtchan" : mapped
    }

    /// The agent's files as `Scripts/build-guest` leaves them in the image directory.
    struct Payload {
        let directory: String
        static let files = ["virtchan-agent", "virtchan-agent.service", "60-virtchan-agent.rules",
                            "virtchan-agent.conf", "seed-boothook.sh"]

        init(imageDirectory: String) throws {
            directory = imageDirectory + "/agent"
            for file in Self.files where !FileManager.default.isReadableFile(atPath: directory + "/" + file) {
                throw VirtchanError(.io, "the agent's files for a cloud image are missing from \(directory) (\(file)); build them with: Scripts/build-guest")
            }
        }

        func contents(_ file: String) throws -> Data {
            guard let data = FileManager.default.contents(atPath: directory + "/" + file) else {
                throw VirtchanError(.io, "cannot read \(directory)/\(file)")
            }
            return data
        }
    }

    /// Writes the seed's files into `directory` (which must exist, private) and packs them as
    /// the ISO 9660 image `iso`, labelled `cidata`.
    static func write(iso: String, in directory: String, payload: Payload, key: AgentKey, instanceID: String,
                      hostname: String, user: CloudInit) throws {
        let fm = FileManager.default
        let tree = directory + "/tree"
        let agentDir = tree + "/" + payloadDirectory
        try? fm.removeItem(atPath: tree)
        try fm.createDirectory(atPath: agentDir, withIntermediateDirectories: true, attributes: [.posixPermissions: 0o700])
        func put(_ path: String, _ data: Data, _ mode: Int) throws {
            guard fm.createFile(atPath: path, contents: data, attributes: [.posixPermissions: mode]) else {
                throw VirtchanError(.io, "cannot write \(path)")
            }
        }
        try put(tree + "/meta-data", try metaData(instanceID: instanceID, hostname: hostname), 0o644)
        try put(tree + "/user-data", try userData(boothook: try payload.contents("seed-boothook.sh"), user: user), 0o600)
        let unit = String(decoding: try payload.contents("virtchan-agent.service"), as: UTF8.self)
            .replacingOccurrences(of: "@AGENT@", with: guestAgentPath)
        try put(agentDir + "/virtchan-agent.service", Data(unit.utf8), 0o644)
        for (file, mode) in [("virtchan-agent", 0o755), ("60-virtchan-agent.rules", 0o644), ("virtchan-agent.conf", 0o644)] {
            try put(agentDir + "/" + file, try payload.contents(file), mode)
        }
        try put(agentDir + "/agent.key", Data(key.fileText.utf8), 0o600)
        try runISOTool(output: iso, tree: tree)
        try? fm.removeItem(atPath: tree)
    }

    /// xorriso (as mkisofs), else genisoimage or mkisofs: the tools virt-install and
    /// cloud-localds use.
    private static func runISOTool(output: String, tree: String) throws {
        let path = (getenv("PATH").map { String(cString: $0) } ?? "/usr/bin:/bin").split(separator: ":").map(String.init)
        func find(_ tool: String) -> String? {
            path.map { $0 + "/" + tool }.first { FileManager.default.isExecutableFile(atPath: $0) }
        }
        let common = ["-quiet", "-output", output, "-volid", "cidata", "-joliet", "-rock", tree]
        let command: (String, [String])
        if let xorriso = find("xorriso") {
            command = (xorriso, ["-as", "mkisofs"] + common)
        } else if let tool = find("genisoimage") ?? find("mkisofs") {
            command = (tool, common)
        } else {
            throw VirtchanError(.io, "making the cloud-init seed needs xorriso or genisoimage, and neither is installed; install one with: Scripts/setup-host (or apt-get install xorriso)")
        }
        let process = Process()
        process.executableURL = URL(fileURLWithPath: command.0)
        process.arguments = command.1
        let errors = Pipe()
        process.standardError = errors
        process.standardOutput = FileHandle.nullDevice
        do {
            try process.run()
        } catch {
            throw VirtchanError(.io, "cannot run \(command.0): \(error.localizedDescription)")
        }
        let message = errors.fileHandleForReading.readDataToEndOfFile()
        process.waitUntilExit()
        guard process.terminationStatus == 0 else {
            let text = String(decoding: message.prefix(2000), as: UTF8.self).trimmingCharacters(in: .whitespacesAndNewlines)
            throw VirtchanError(.io, "\((command.0 as NSString).lastPathComponent) could not make the seed \(output): \(text)")
        }
    }
}
