import Foundation
import Synchronization

/// One libvirt hypervisor, named by URI, and the virtchan domains on it: the entry point of
/// VirtchanKit.
///
/// Opening one costs nothing: libvirt is connected on first use, and a session with a domain
/// that is already known (``session(with:timeout:)``) may not need libvirt at all.
///
/// A `Hypervisor` may be shared between threads and tasks. Each `AgentSession` it opens
/// belongs to one thread at a time: its calls block until the agent answers, each within a
/// bounded time. Sessions share the domain's channel through its session holder (see
/// ``SessionSharing``), so any number may be open at once.
public final class Hypervisor: Sendable {
    /// The libvirt URI: the one given, else `LIBVIRT_DEFAULT_URI`, else `qemu:///system` for
    /// root and `qemu:///session` for anyone else.
    public let uri: String
    public let paths: HostPaths
    /// Accept an agent that holds no key (anything that reaches its channel can drive it).
    /// Off by default; a domain created with ``MachineRequest/allowUnkeyedAgent`` is accepted
    /// without it.
    public let allowsUnkeyedAgents: Bool
    /// How sessions reach agents: through a session holder shared by every process (the
    /// default), or straight to the channel sockets.
    public let sharing: SessionSharing
    private let openConnection = Mutex<Connection?>(nil)

    public init(uri: String? = nil, paths: HostPaths = .current, allowsUnkeyedAgents: Bool = false,
                sharing: SessionSharing = .standard) {
        self.uri = uri ?? Connection.defaultURI
        self.paths = paths
        self.allowsUnkeyedAgents = allowsUnkeyedAgents
        self.sharing = sharing
    }

    /// The libvirt connection, opened on first use.
    public func connection() throws(ProvisioningError) -> Connection {
        try openConnection.withLock { (c: inout Connection?) throws(ProvisioningError) -> Connection in
            if let c { return c }
            let opened = try Connection(uri: uri)
            c = opened
            return opened
        }
    }

    /// Whether ``connection()`` has been opened.
    var hasOpenConnection: Bool { openConnection.withLock { $0 != nil } }

    public func domain(_ name: String) throws(ProvisioningError) -> Domain {
        try connection().requireDomain(name)
    }

    /// A virtchan command for a message to suggest about domain `name`: `virtchan SUBCOMMAND`,
    /// this hypervisor's URI unless it is the default one (so that the command reaches this
    /// domain and not a namesake elsewhere), the name, then `rest` as written. URI and name
    /// read back in a shell as they are.
    public func suggested(_ subcommand: String, _ name: String, _ rest: String = "") -> String {
        ["virtchan", subcommand, connectOption, shellWord(name), rest].filter { !$0.isEmpty }.joined(separator: " ")
    }

    /// The same for virsh, which takes the URI before its subcommand.
    public func suggestedVirsh(_ subcommand: String, _ name: String) -> String {
        ["virsh", connectOption, subcommand, shellWord(name)].filter { !$0.isEmpty }.joined(separator: " ")
    }

    private var connectOption: String { uri == Connection.defaultURI ? "" : "-c " + shellWord(uri) }

    /// Endpoints are cached for the local system instance only, where libvirt's pid files
    /// tell whether an entry is still current.
    var endpointCache: EndpointCache? { uri == "qemu:///system" ? EndpointCache() : nil }

    // MARK: inspecting

    /// A domain as `list` shows it.
    public struct DomainSummary: Sendable, Codable, Equatable {
        public let name: String
        public let state: String
        public let managed: Bool
        public let channels: Int
    }

    /// The domains virtchan manages (with `includeUnmanaged`, every domain), by name.
    public func domains(includeUnmanaged: Bool = false) throws(ProvisioningError) -> [DomainSummary] {
        var rows: [DomainSummary] = []
        for d in try connection().allDomains() {
            let managed = d.metadata(namespace: VirtchanMetadata.namespace) != nil
            guard managed || includeUnmanaged else { continue }
            let channels = (try? ChannelResolver.channels(inDomainXML: d.xml()))?.count ?? 0
            rows.append(DomainSummary(name: d.name, state: d.state.rawValue, managed: managed, channels: channels))
        }
        return rows.sorted { $0.name < $1.name }
    }

    /// The names of the domains virtchan manages (with `includeUnmanaged`, of every domain),
    /// by name: ``domains(includeUnmanaged:)`` without reading each domain's XML.
    public func domainNames(includeUnmanaged: Bool = false) throws(ProvisioningError) -> [String] {
        try connection().allDomains()
            .filter { includeUnmanaged || $0.metadata(namespace: VirtchanMetadata.namespace) != nil }
            .map(\.name).sorted()
    }

    /// Every virtio channel of a domain, from its live XML.
    public func channels(of name: String) throws(ProvisioningError) -> [ChannelInfo] {
        try ChannelResolver.channels(inDomainXML: domain(name).xml())
    }

    /// virtchan's record in a domain's metadata; nil for a domain virtchan does not manage.
    public func metadata(of name: String) throws(ProvisioningError) -> VirtchanMetadata? {
        try domain(name).virtchanMetadata
    }

    // MARK: tearing down

    /// Stops a domain, undefines it (unless `keepDefinition`) and removes every file virtchan
    /// made for it. A domain virtchan does not manage is refused unless `force`.
    public func destroy(_ name: String, keepDefinition: Bool = false, force: Bool = false) throws {
        let domain = try domain(name)
        guard domain.virtchanMetadata != nil || force else {
            throw VirtchanError(.notManaged, "domain \(name) is not managed by virtchan; use --force to destroy it anyway")
        }
        if domain.isActive { try domain.destroy() }
        stopHolder(of: name, timeout: 2)
        endpointCache?.remove(name)
        ChannelLock.removeLocks(of: name)
        unlink(paths.keyedInitrd(for: name))
        if !keepDefinition {
            // What the domain boots from, as prune reads it.
            let booted = (try? domain.xml(inactive: true))
                .flatMap { try? LibXMLDocument(parsing: $0, name: "the domain XML") }
                .map { DomainUsage.files(in: $0, on: domain.connection) } ?? []
            try domain.undefine()
            // The volumes create made for this domain alone go, whichever URI destroys it: never
            // a shared kernel or a disk's backing file, which others may boot too.
            let own = Self.ownVolumeNames(of: name)
            for path in booted {
                if let volume = StorageVolume.lookup(path: path, on: domain.connection), own.contains(volume.name) {
                    try volume.delete()
                }
            }
        }
        // Only virtchan's own directory for this name goes, never a path read from the domain's
        // metadata (anyone who may edit the XML could point that anywhere), and only when its
        // marker names this domain.
        let stateDir = paths.stateDirectory(for: name)
        var st = stat()
        if lstat(stateDir, &st) == 0, st.st_mode & S_IFMT == S_IFDIR,
           let marker = FileManager.default.contents(atPath: stateDir + "/" + HostPaths.ownerMarker),
           String(decoding: marker, as: UTF8.self) == name {
            try FileManager.default.removeItem(atPath: stateDir)
        }
    }

    // MARK: reaching the agent

    /// A running domain and where its agent listens.
    public struct RunningDomain {
        public let domain: Domain
        public let metadata: VirtchanMetadata?
        public let channels: [ChannelInfo]
        public let endpoint: AgentEndpoint
    }

    /// Resolves a running domain's channels from its live XML (one libvirt call) and records
    /// the endpoint for later sessions.
    public func running(_ name: String) throws -> RunningDomain {
        let conn = try connection()
        let domain = try conn.requireDomain(name)
        // The live XML has the channels, the metadata and, while the domain runs, its id.
        let doc = try LibXMLDocument(parsing: try domain.xml(), name: "the domain XML")
        guard doc.string("string(/domain/@id)") != nil else {
            throw VirtchanError(.notRunning, "domain \(name) is not running (start it with: \(suggestedVirsh("start", name)))")
        }
        let channels = ChannelResolver.channels(in: doc)
        let meta = VirtchanMetadata(domainDocument: doc)
        let controlName = meta?.controlChannel ?? ChannelNames.control
        let dataName = meta?.dataChannel ?? ChannelNames.data
        guard let control = channels.first(where: { $0.name == controlName }) else {
            throw VirtchanError(.noChannel, "domain \(name) has no \(controlName) channel; create it with virtchan create, or add the channel to its XML")
        }
        guard let controlPath = control.path else {
            throw VirtchanError(.noChannel, "the \(controlName) channel of \(name) is not a unix socket channel")
        }
        guard conn.isLocal else {
            throw VirtchanError(.invalidRequest, "the channels of \(name) on \(conn.uri) are not sockets on this host; reach them through a session (Hypervisor.session(with:))")
        }
        let console = doc.string("string(/domain/devices/serial[@type='file']/source/@path)")
        let endpoint = AgentEndpoint(domain: name, controlSocket: controlPath,
                                     dataSocket: channels.first(where: { $0.name == dataName })?.path,
                                     consoleLog: console)
        endpointCache?.store(endpoint)
        return RunningDomain(domain: domain, metadata: meta, channels: channels, endpoint: endpoint)
    }

    /// Where the agent in `name` listens, with the domain's key loaded: from the endpoint
    /// cache when the domain's QEMU process is the one it was recorded for (no libvirt
    /// involved), else from libvirt.
    public func endpoint(of name: String) throws -> AgentEndpoint {
        var endpoint = try endpointCache?.lookup(name) ?? running(name).endpoint
        loadCredentials(&endpoint)
        return endpoint
    }

    /// A session with the agent in `name`: through its session holder (started when none
    /// runs), which any number of sessions share, or with ``SessionSharing/direct`` straight
    /// to the channel, which takes one session at a time (a second fails as busy).
    public func session(with name: String, timeout: Double = 10) throws -> AgentSession {
        if case .holder(let persist) = sharing {
            return try heldSession(with: name, persist: persist, timeout: timeout)
        }
        guard Connection.isLocal(uri: uri) else {
            throw VirtchanError(.invalidRequest, "\(uri) is not reached through sockets on this host; its domains are reached through a session holder (sharing: .holder)")
        }
        if let cached = endpointCache?.lookup(name) {
            do {
                return try connect(cached, timeout: timeout)
            } catch let error as TransportError where error.code == .unreachable {
                // The socket moved or vanished (a channel was unplugged): ask libvirt.
                endpointCache?.remove(name)
            }
        }
        return try connect(running(name).endpoint, timeout: timeout)
    }

    /// Waits for the agent's hello, retrying while QEMU and the guest are still coming up.
    public func waitForAgent(_ name: String, timeout: Double = 90) throws -> AgentSession {
        let deadline = Date().addingTimeInterval(timeout)
        while true {
            try Interruption.check()
            let left = deadline.timeIntervalSinceNow
            do {
                return try session(with: name, timeout: max(1, left))
            } catch let e as TransportError where e.code == .unreachable && left > 1 {
                Thread.sleep(forTimeInterval: 0.2)
            } catch let e as TransportError where e.code == .timeout {
                var msg = "the agent in \(name) did not say hello within \(formatSeconds(timeout))"
                let log = paths.consoleLog(for: name)
                if FileManager.default.fileExists(atPath: log) { msg += "; see the guest console log \(log)" }
                throw VirtchanError(.agentTimeout, msg)
            }
        }
    }

    /// The key from the domain's private state directory; an agent without a key is accepted
    /// only for a domain created so, or when ``allowsUnkeyedAgents`` is set.
    func loadCredentials(_ endpoint: inout AgentEndpoint) {
        endpoint.loadCredentials(stateDirectory: paths.stateDirectory(for: endpoint.domain), allowUnkeyed: allowsUnkeyedAgents)
    }

    private func connect(_ endpoint: AgentEndpoint, timeout: Double) throws -> AgentSession {
        var endpoint = endpoint
        loadCredentials(&endpoint)
        return try AgentSession.connect(endpoint, timeout: timeout)
    }
}
