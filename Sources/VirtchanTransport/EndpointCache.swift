import Glibc
import VirtchanProtocol

/// Where a running domain's agent listens, remembered between virtchan runs so that exec,
/// ping, info, push and pull need not load libvirt and ask libvirtd each time.
///
/// An entry is trusted only while the QEMU process that was running the domain when the
/// entry was written still runs it: libvirt's pid file for the domain must name the recorded
/// pid, and that process must have the recorded start time (so a reused pid does not match).
/// A domain that was stopped, restarted or redefined therefore misses, and the caller
/// resolves it through libvirt again. Entries are files in a root-owned directory under
/// /run, so they vanish at reboot.
public struct EndpointCache: Sendable {
    public var directory: String
    /// Where libvirt's QEMU driver keeps `NAME.pid` for each running domain.
    public var pidDirectory: String

    public init(directory: String = "/run/virtchan/endpoints", pidDirectory: String = "/run/libvirt/qemu") {
        self.directory = directory
        self.pidDirectory = pidDirectory
    }

    /// The remembered endpoint of `domain`, or nil when there is none or it may be stale.
    public func lookup(_ domain: String) -> AgentEndpoint? {
        guard Self.isPlainName(domain), let owner = currentProcess(of: domain) else { return nil }
        let path = entryPath(domain)
        // Only an entry this user wrote and nobody else can change points us at a socket.
        var st = stat()
        guard stat(path, &st) == 0, st.st_uid == geteuid(), st.st_mode & 0o022 == 0,
              let text = readSmallFile(path) else { return nil }
        var fields: [String: String] = [:]
        for line in text.split(separator: "\n") {
            guard let eq = line.firstIndex(of: "=") else { return nil }
            fields[String(line[..<eq])] = String(line[line.index(after: eq)...])
        }
        guard fields["domain"] == domain, fields["pid"] == String(owner.pid), fields["start"] == owner.start,
              let control = fields["control"], !control.isEmpty else { return nil }
        return AgentEndpoint(domain: domain, controlSocket: control, dataSocket: fields["data"], consoleLog: fields["console"])
    }

    /// Remembers `endpoint` for as long as the domain's current QEMU process runs. Does
    /// nothing when the domain has no pid file here (another driver, a remote host) or the
    /// paths cannot be written down safely.
    public func store(_ endpoint: AgentEndpoint) {
        let domain = endpoint.domain
        guard Self.isPlainName(domain), let owner = currentProcess(of: domain) else { return }
        let values = [endpoint.controlSocket, endpoint.dataSocket ?? "", endpoint.consoleLog ?? ""]
        guard !values.contains(where: { $0.contains("\n") }) else { return }
        var text = "domain=\(domain)\npid=\(owner.pid)\nstart=\(owner.start)\ncontrol=\(endpoint.controlSocket)\n"
        if let data = endpoint.dataSocket { text += "data=\(data)\n" }
        if let console = endpoint.consoleLog { text += "console=\(console)\n" }
        if let slash = directory.lastIndex(of: "/"), slash != directory.startIndex {
            mkdir(String(directory[..<slash]), 0o755)
        }
        mkdir(directory, 0o755)
        let path = entryPath(domain)
        let temp = path + ".\(getpid()).tmp"
        let fd = open(temp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
        guard fd >= 0 else { return }
        let bytes = Array(text.utf8)
        let written = bytes.withUnsafeBytes { write(fd, $0.baseAddress!, $0.count) }
        close(fd)
        if written != bytes.count || rename(temp, path) != 0 { unlink(temp) }
    }

    /// Forgets `domain` (after destroy, or when its remembered socket stopped answering).
    public func remove(_ domain: String) {
        guard Self.isPlainName(domain) else { return }
        unlink(entryPath(domain))
    }

    private func entryPath(_ domain: String) -> String { directory + "/" + domain }

    /// libvirt refuses '/' in domain names; anything else odd is simply not cached.
    static func isPlainName(_ name: String) -> Bool {
        !name.isEmpty && !name.hasPrefix(".") && !name.contains("/") && !name.contains("\n")
    }

    /// The QEMU process libvirt says runs `domain`: its pid and its start time in clock
    /// ticks since boot (field 22 of /proc/PID/stat).
    func currentProcess(of domain: String) -> (pid: Int32, start: String)? {
        guard let text = readSmallFile(pidDirectory + "/" + domain + ".pid"),
              let pid = Int32(text.filter { !$0.isWhitespace }), pid > 0,
              let statLine = readSmallFile("/proc/\(pid)/stat"),
              let commEnd = statLine.lastIndex(of: ")") else { return nil }
        // After "(comm)" come fields 3, 4, ...; the start time is field 22.
        let rest = statLine[statLine.index(after: commEnd)...].split(separator: " ")
        guard rest.count > 19 else { return nil }
        return (pid, String(rest[19]))
    }
}
