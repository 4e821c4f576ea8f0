import Foundation

/// A virtio channel as the live domain XML shows it.
public struct ChannelInfo: Sendable, Codable, Equatable {
    /// The target name the guest sees.
    public var name: String
    public var role: ChannelRole
    /// virtio-serial port number.
    public var port: Int?
    /// Host socket path.
    public var path: String?
    /// `connected` or `disconnected` (the guest side), as libvirt reports it; nil when stopped.
    public var state: String?
    /// libvirt's device alias (e.g. channel0), which `virDomainOpenChannel` takes.
    public var alias: String?

    enum CodingKeys: String, CodingKey { case name, role, port, path, state }
}

public enum ChannelResolver {
    /// Every virtio channel in `xml`; roles come from virtchan's metadata when it has one.
    public static func channels(inDomainXML xml: String) throws(ProvisioningError) -> [ChannelInfo] {
        channels(in: try LibXMLDocument(parsing: xml, name: "the domain XML"))
    }

    public static func channels(in doc: LibXMLDocument) -> [ChannelInfo] {
        let meta = VirtchanMetadata(domainDocument: doc)
        return doc.select("/domain/devices/channel[target/@type='virtio']").map { node in
            let name = doc.string("string(target/@name)", from: node) ?? ""
            var role = ChannelRole.other
            if let meta {
                if name == meta.controlChannel { role = .control } else if name == meta.dataChannel { role = .data }
            }
            return ChannelInfo(
                name: name, role: role,
                port: doc.string("string(address[@type='virtio-serial']/@port)", from: node).flatMap { Int($0) },
                path: doc.string("string(source/@path)", from: node),
                state: doc.string("string(target/@state)", from: node),
                alias: doc.string("string(alias/@name)", from: node))
        }
    }
}
