import Foundation

/// What virtchan records inside a managed domain's `<metadata>`, so that any later command on
/// any host that reaches the same libvirt knows the wiring without a local database.
public struct VirtchanMetadata: Sendable, Equatable, Codable {
    public static let namespace = "https://virtchan.dev/xmlns/domain/1"
    public static let key = "virtchan"
    public static let rootName = "domain"

    public var controlChannel: String
    public var dataChannel: String
    /// Host directory holding the domain's sockets, console log and bootstrap state.
    public var stateDirectory: String?
    public var version: String
    public var bootstrap: BootstrapRecord?

    public init(controlChannel: String = ChannelNames.control, dataChannel: String = ChannelNames.data,
                stateDirectory: String?, version: String, bootstrap: BootstrapRecord? = nil) {
        self.controlChannel = controlChannel
        self.dataChannel = dataChannel
        self.stateDirectory = stateDirectory
        self.version = version
        self.bootstrap = bootstrap
    }

    /// Reads the metadata element out of a whole domain document; nil when it has none.
    public init?(domainDocument doc: LibXMLDocument) {
        guard let node = doc.select("/domain/metadata/vc:domain", namespaces: ["vc": Self.namespace]).first else { return nil }
        self.init(node: node)
    }

    /// Parses the element alone, as `virDomainGetMetadata` returns it.
    public init?(elementXML: String) {
        guard let doc = try? LibXMLDocument(parsing: elementXML, name: "virtchan metadata") else { return nil }
        self.init(node: doc.root)
    }

    /// libvirt hands the element back without its namespace, the full domain XML with it:
    /// children are matched by local name so both read the same.
    init?(node: LibXMLNode) {
        let doc = node.document
        func child(_ name: String) -> String { "*[local-name()='\(name)']" }
        guard let control = doc.string("string(\(child("channel"))[@role='control']/@name)", from: node),
              let data = doc.string("string(\(child("channel"))[@role='data']/@name)", from: node) else { return nil }
        controlChannel = control
        dataChannel = data
        stateDirectory = doc.string("string(\(child("state-dir")))", from: node)
        version = node.attribute("version") ?? ""
        if let b = doc.select(child("bootstrap"), from: node).first {
            bootstrap = BootstrapRecord(
                script: b.attribute("script") ?? "",
                sha256: b.attribute("sha256") ?? "",
                state: BootstrapRecord.State(rawValue: b.attribute("state") ?? "") ?? .pending,
                exitCode: b.attribute("exit-code").flatMap { Int32($0) },
                startedAt: b.attribute("started"),
                endedAt: b.attribute("ended"),
                reason: b.attribute("reason"),
                runnerPID: b.attribute("runner-pid").flatMap { Int32($0) })
        }
    }

    /// Appends the element under `parent` (the domain's `<metadata>`).
    func write(into parent: LibXMLNode) {
        let el = parent.addChild(Self.rootName, namespace: Self.namespace, prefix: "virtchan")
        fill(el) { el.addNamespacedChild($0, text: $1) }
    }

    private func fill(_ el: LibXMLNode, child: (String, String?) -> LibXMLNode) {
        el.setAttribute("version", version)
        child("channel", nil).setAttribute("role", "control").setAttribute("name", controlChannel)
        child("channel", nil).setAttribute("role", "data").setAttribute("name", dataChannel)
        if let stateDirectory { _ = child("state-dir", stateDirectory) }
        if let b = bootstrap {
            let n = child("bootstrap", nil)
            n.setAttribute("script", b.script)
            n.setAttribute("sha256", b.sha256)
            n.setAttribute("state", b.state.rawValue)
            if let c = b.exitCode { n.setAttribute("exit-code", String(c)) }
            if let s = b.startedAt { n.setAttribute("started", s) }
            if let e = b.endedAt { n.setAttribute("ended", e) }
            if let r = b.reason { n.setAttribute("reason", r) }
            if let p = b.runnerPID { n.setAttribute("runner-pid", String(p)) }
        }
    }

    /// The element alone and without a namespace, for `virDomainSetMetadata`, which puts it
    /// in the namespace itself (and refuses an element that declares one).
    public func elementXML() throws(ProvisioningError) -> String {
        let doc = try LibXMLDocument(root: Self.rootName)
        let root = doc.root
        fill(root) { root.addChild($0, text: $1) }
        return root.serialize()
    }
}

/// The first-boot script of a domain and how far it got.
public struct BootstrapRecord: Sendable, Equatable, Codable {
    public enum State: String, Sendable, Codable { case pending, running, succeeded, failed }
    public var script: String
    public var sha256: String
    public var state: State
    public var exitCode: Int32?
    public var startedAt: String?
    public var endedAt: String?
    public var reason: String?
    /// The host process running it, so a dead runner can be told from a live one.
    public var runnerPID: Int32?

    public init(script: String, sha256: String, state: State, exitCode: Int32? = nil, startedAt: String? = nil,
                endedAt: String? = nil, reason: String? = nil, runnerPID: Int32? = nil) {
        self.script = script
        self.sha256 = sha256
        self.state = state
        self.exitCode = exitCode
        self.startedAt = startedAt
        self.endedAt = endedAt
        self.reason = reason
        self.runnerPID = runnerPID
    }
}

extension Domain {
    /// virtchan's record in this domain's metadata; nil for a domain virtchan does not manage.
    public var virtchanMetadata: VirtchanMetadata? {
        metadata(namespace: VirtchanMetadata.namespace).flatMap { VirtchanMetadata(elementXML: $0) }
    }

    /// Replaces virtchan's record in this domain's metadata.
    public func setVirtchanMetadata(_ meta: VirtchanMetadata) throws(ProvisioningError) {
        try setMetadata(try meta.elementXML(), key: VirtchanMetadata.key, namespace: VirtchanMetadata.namespace)
    }
}
