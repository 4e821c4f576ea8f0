import Foundation
import VirtchanProvisioning

/// A volume of virtchan's storage pool that no domain needs any more.
public struct UnusedVolume: Sendable, Codable, Equatable {
    public let name: String
    /// Where its file is on the pool's host.
    public let path: String
    /// The bytes it takes on disk.
    public let bytes: UInt64
    /// Why nothing needs it, for a person to read.
    public let reason: String
}

/// What ``Hypervisor/prune(pool:minimumAge:dryRun:)`` removed, or would remove.
public struct PruneReport: Sendable, Encodable, Equatable {
    public let uri: String
    public let pool: String
    /// Removed (or, on a dry run, to be removed).
    public var removed: [UnusedVolume]
    /// Unused, but written within the minimum age: a create elsewhere may be about to use them.
    public var recent: [UnusedVolume]
    public var dryRun: Bool
    public var removedBytes: UInt64 { removed.reduce(0) { $0 + $1.bytes } }

    private enum CodingKeys: String, CodingKey { case uri, pool, removed, recent, dryRun, removedBytes }

    public func encode(to encoder: Encoder) throws {
        var c = encoder.container(keyedBy: CodingKeys.self)
        try c.encode(uri, forKey: .uri)
        try c.encode(pool, forKey: .pool)
        try c.encode(removed, forKey: .removed)
        try c.encode(recent, forKey: .recent)
        try c.encode(dryRun, forKey: .dryRun)
        try c.encode(removedBytes, forKey: .removedBytes)
    }
}

extension Hypervisor {
    /// Removes the volumes of `pool` that no domain on this hypervisor needs:
    /// - shared uploads (a kernel, a base image: `boot-…`, `base-…` and their `.complete`
    ///   markers) that no domain boots from and no overlay reads through to, and uploads
    ///   that never finished;
    /// - a domain's own volumes (`NAME.qcow2`, `NAME.seed.iso`, `NAME.initrd`) once no domain
    ///   `NAME` exists (undefined with virsh, say) and nothing else uses them.
    ///
    /// ``destroy(_:keepDefinition:force:)`` keeps shared uploads so that the next create of
    /// the same image need not upload it again; this is how they go. Volumes written
    /// within `minimumAge` seconds (by this host's clock against the pool host's timestamps)
    /// are kept, since a create elsewhere may be about to boot them. Volumes whose names
    /// virtchan does not give are never touched. A pool that does not exist has nothing to
    /// remove; a stopped one is started first, as create starts it.
    public func prune(pool poolName: String = storagePoolName, minimumAge: Double = 600, dryRun: Bool = false) throws -> PruneReport {
        let conn = try connection()
        var report = PruneReport(uri: uri, pool: poolName, removed: [], recent: [], dryRun: dryRun)
        guard let pool = StoragePool.lookup(poolName, on: conn) else { return report }
        try pool.activate()
        let volumes = try pool.volumes()
        var facts: [PoolVolume] = []
        for volume in volumes {
            // One removed meanwhile (by another prune, say) has nothing to weigh; one that cannot
            // be read stays.
            guard let details = try? volume.details() else { continue }
            facts.append(PoolVolume(name: volume.name, path: details.path, bytes: details.allocation,
                                    backingPath: details.backingPath, modified: details.modified))
        }
        let usage = try DomainUsage(of: conn)
        let plan = PrunePlan(volumes: facts, usage: usage, now: Date().timeIntervalSince1970, minimumAge: minimumAge)
        report.recent = plan.recent
        guard !dryRun else {
            report.removed = plan.remove.flatMap(\.volumes).map(\.unused)
            return report
        }
        let byName = Dictionary(volumes.map { ($0.name, $0) }, uniquingKeysWith: { first, _ in first })
        // What is used is asked again just before anything goes: a create elsewhere may have
        // defined a domain on one of these volumes while the pool was read.
        let usageNow = try DomainUsage(of: conn)
        for group in plan.remove {
            if let owner = group.owner, usageNow.domainNames.contains(owner) { continue }
            if group.volumes.contains(where: usageNow.uses) { continue }
            // A marker goes before its upload, so that nothing boots a half-removed upload.
            let marker = Hypervisor.SharedUpload.markerSuffix
            for volume in group.volumes.sorted(by: { $0.name.hasSuffix(marker) && !$1.name.hasSuffix(marker) }) {
                do {
                    try byName[volume.name]?.delete()
                } catch {
                    throw VirtchanError(.io, "cannot remove the volume \(volume.name) from the storage pool \(poolName) on \(uri): \(error.message)"
                                        + (report.removed.isEmpty ? "" : " (\(report.removed.count) removed before it)"))
                }
                report.removed.append(volume.unused)
            }
        }
        return report
    }
}

/// A volume of the pool as `prune` weighs it.
struct PoolVolume: Sendable, Equatable {
    let name: String
    let path: String
    let bytes: UInt64
    let backingPath: String?
    /// When its file was last written, by the pool host's clock.
    let modified: Double?
    var reason = ""

    var unused: UnusedVolume { UnusedVolume(name: name, path: path, bytes: bytes, reason: reason) }
}

/// The domains of a connection and the files they boot from.
struct DomainUsage: Sendable {
    var domainNames: Set<String> = []
    /// Files named in domain XML: kernels, initramfs, disk sources (by file or by pool and
    /// volume) and their backing stores.
    var paths: Set<String> = []

    init(domainNames: Set<String>, paths: Set<String>) {
        self.domainNames = domainNames
        self.paths = paths
    }

    init(of connection: Connection) throws {
        for domain in try connection.allDomains() {
            let name = domain.name
            domainNames.insert(name)
            // The definition and, while it runs, the live XML (a transient domain has only that).
            var documents: [String] = []
            if let inactive = try? domain.xml(inactive: true) { documents.append(inactive) }
            if domain.isActive, let live = try? domain.xml() { documents.append(live) }
            guard !documents.isEmpty else {
                // It may have gone since the list; if not, what it uses is unknown.
                if connection.domain(named: name) == nil { domainNames.remove(name); continue }
                throw VirtchanError(.io, "cannot read the XML of domain \(name) on \(connection.uri), so nothing is removed")
            }
            for xml in documents {
                paths.formUnion(Self.files(in: try LibXMLDocument(parsing: xml, name: "the XML of domain \(name)"), on: connection))
            }
        }
    }

    /// The files a domain's XML has it boot from: its kernel and initramfs, and every disk's
    /// source and backing store, named by file or by pool and volume.
    static func files(in doc: LibXMLDocument, on connection: Connection) -> [String] {
        var files = doc.select("/domain/os/kernel | /domain/os/initrd").map(\.text)
        files += doc.select("/domain/devices/disk//source/@file").map(\.text)
        for source in doc.select("/domain/devices/disk[@type='volume']/source") {
            if let pool = source.attribute("pool"), let volume = source.attribute("volume"),
               let path = try? StoragePool.lookup(pool, on: connection)?.volume(volume)?.path() {
                files.append(path)
            }
        }
        return files
    }

    func uses(_ volume: PoolVolume) -> Bool { paths.contains(volume.path) }
}

/// Which volumes of a pool `prune` removes, from what the pool and the domains say.
struct PrunePlan: Sendable {
    /// Volumes that go together: an upload and its marker, or one volume of a domain.
    struct Group: Sendable {
        var volumes: [PoolVolume]
        /// The domain a domain's own volume was made for.
        var owner: String?
    }

    private(set) var remove: [Group] = []
    private(set) var recent: [UnusedVolume] = []

    private static let marker = Hypervisor.SharedUpload.markerSuffix

    init(volumes: [PoolVolume], usage: DomainUsage, now: Double, minimumAge: Double) {
        // An overlay in the pool keeps its backing file in use even with no domain on it.
        let readThrough = Set(volumes.compactMap(\.backingPath))
        func inUse(_ v: PoolVolume) -> Bool { usage.uses(v) || readThrough.contains(v.path) }
        func isRecent(_ group: [PoolVolume]) -> Bool {
            group.contains { v in v.modified.map { now - $0 < minimumAge } ?? true }
        }
        func consider(_ group: [PoolVolume], reason: String, owner: String? = nil) {
            let marked = group.map { var v = $0; v.reason = reason; return v }
            if isRecent(group) {
                recent += marked.map(\.unused)
            } else {
                remove.append(Group(volumes: marked, owner: owner))
            }
        }
        var uploads: [String: [PoolVolume]] = [:]
        for volume in volumes {
            if let stem = Self.sharedStem(of: volume.name) {
                uploads[stem, default: []].append(volume)
            } else if let owner = Self.owner(of: volume.name), !usage.domainNames.contains(owner), !inUse(volume) {
                consider([volume], reason: "made for domain \(owner), which no longer exists", owner: owner)
            }
        }
        for stem in uploads.keys.sorted() {
            let group = uploads[stem]!
            let upload = group.first { $0.name == stem }
            if let upload, inUse(upload) { continue }
            let reason: String
            if upload == nil {
                reason = "the marker of an upload that is gone"
            } else if !group.contains(where: { $0.name == stem + Self.marker }) {
                reason = "an upload that never finished"
            } else {
                reason = stem.hasPrefix(Hypervisor.SharedUpload.boot.rawValue + "-") ? "a kernel no domain boots" : "a base image no overlay reads"
            }
            consider(group.sorted { $0.name < $1.name }, reason: reason)
        }
    }

    /// The upload's name, for the name of a shared upload (`boot-` or `base-` and 24 hex
    /// digits) or of its marker; nil for any other name.
    static func sharedStem(of name: String) -> String? {
        let stem = name.hasSuffix(marker) ? String(name.dropLast(marker.count)) : name
        guard let dash = stem.firstIndex(of: "-"), Hypervisor.SharedUpload(rawValue: String(stem[..<dash])) != nil else { return nil }
        let digest = stem[stem.index(after: dash)...]
        // Exactly as SharedUpload names them: 24 of 0-9 and a-f, in ASCII.
        guard digest.utf8.count == 24, digest.utf8.allSatisfy({ (0x30...0x39).contains($0) || (0x61...0x66).contains($0) }) else { return nil }
        return stem
    }

    /// The domain a volume named `NAME.qcow2`, `NAME.seed.iso` or `NAME.initrd` was made for.
    static func owner(of name: String) -> String? {
        for suffix in Hypervisor.ownVolumeSuffixes where name.hasSuffix(suffix) && name.count > suffix.count {
            return String(name.dropLast(suffix.count))
        }
        return nil
    }
}
