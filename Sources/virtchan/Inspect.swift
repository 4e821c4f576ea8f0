import ArgumentParser
import Foundation
import VirtchanProvisioning
import VirtchanTransport

struct ListDomains: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "list", abstract: "List the domains virtchan manages.")

    @OptionGroup var global: GlobalOptions
    @Flag(help: "Print JSON.") var json = false
    @Flag(help: "Include domains virtchan does not manage.") var all = false

    struct Row: Encodable {
        let name: String
        let state: String
        let managed: Bool
        let channels: Int
    }

    func run() throws {
        let conn = try global.open()
        var rows: [Row] = []
        for d in try conn.allDomains() {
            let managed = d.metadata(namespace: VirtchanMetadata.namespace) != nil
            guard managed || all else { continue }
            let channels = (try? ChannelResolver.channels(inDomainXML: d.xml()))?.count ?? 0
            rows.append(Row(name: d.name, state: d.state.rawValue, managed: managed, channels: channels))
        }
        rows.sort { $0.name < $1.name }
        if json { return try printJSON(rows) }
        printTable(["NAME", "STATE", "CHANNELS"] + (all ? ["MANAGED"] : []),
                   rows.map { [$0.name, $0.state, String($0.channels)] + (all ? [$0.managed ? "yes" : "no"] : []) })
    }
}

struct Channels: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "channels",
        abstract: "Show every virtio channel of a domain, live.",
        discussion: "STATE is libvirt's view of the guest side: connected while a guest process holds the port open.")

    @OptionGroup var global: GlobalOptions
    @Argument(help: "Domain name.") var name: String
    @Flag(help: "Print a JSON array of {name, role, port, path, state}.") var json = false

    func run() throws {
        let conn = try global.open()
        let domain = try conn.requireDomain(name)
        let channels = try ChannelResolver.channels(inDomainXML: domain.xml())
        if json { return try printJSON(channels) }
        printTable(["NAME", "ROLE", "PORT", "STATE", "PATH"], channels.map {
            [$0.name, $0.role.rawValue, $0.port.map(String.init) ?? "-", $0.state ?? "-", $0.path ?? "-"]
        })
    }
}

struct XMLCommand: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "xml", abstract: "Print a domain's live XML.")

    @OptionGroup var global: GlobalOptions
    @Argument(help: "Domain name.") var name: String
    @Flag(help: "The persistent definition instead of the live XML.") var inactive = false

    func run() throws {
        let domain = try global.open().requireDomain(name)
        print(try domain.xml(inactive: inactive), terminator: "")
    }
}

struct Destroy: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "destroy",
        abstract: "Stop a domain, undefine it and remove every file virtchan made for it.")

    @OptionGroup var global: GlobalOptions
    @Argument(help: "Domain name.") var name: String
    @Flag(help: "Stop it and remove its files but keep the libvirt definition.") var keepDefinition = false
    @Flag(help: "Also destroy a domain virtchan does not manage.") var force = false

    func run() throws {
        try DomainTeardown.destroy(name, global: global, keepDefinition: keepDefinition, force: force)
        print(keepDefinition ? "Domain \(name) stopped; definition kept" : "Domain \(name) destroyed")
    }
}

enum DomainTeardown {
    static func destroy(_ name: String, global: GlobalOptions, keepDefinition: Bool, force: Bool) throws {
        let conn = try global.open()
        let domain = try conn.requireDomain(name)
        let meta = domain.metadata(namespace: VirtchanMetadata.namespace).flatMap { VirtchanMetadata(elementXML: $0) }
        guard meta != nil || force else {
            throw CLIError("domain \(name) is not managed by virtchan; use --force to destroy it anyway")
        }
        if domain.isActive { try domain.destroy() }
        global.endpointCache?.remove(name)
        ChannelLock.removeLocks(of: name)
        unlink(Paths.bootDirectory + "/\(name).initrd")
        if !keepDefinition { try domain.undefine() }
        // Only virtchan's own directory for this name goes, never a path read from the domain's
        // metadata (anyone who may edit the XML could point that anywhere), and only when its
        // marker names this domain.
        let stateDir = Paths.stateDirectory(for: name)
        var st = stat()
        if lstat(stateDir, &st) == 0, st.st_mode & S_IFMT == S_IFDIR,
           let marker = FileManager.default.contents(atPath: stateDir + "/.virtchan-domain"),
           String(decoding: marker, as: UTF8.self) == name {
            try FileManager.default.removeItem(atPath: stateDir)
        }
    }
}
