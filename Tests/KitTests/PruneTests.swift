import Testing
@testable import VirtchanKit

/// What `prune` picks from a pool's volumes and the domains' XML.
struct PruneTests {
    private let now = 1_800_000_000.0
    private let digest = "0123456789abcdef01234567"

    private func volume(_ name: String, age: Double = 7200, backing: String? = nil) -> PoolVolume {
        PoolVolume(name: name, path: "/pool/" + name, bytes: 4096, backingPath: backing, modified: now - age)
    }

    private func plan(_ volumes: [PoolVolume], domains: Set<String> = [], paths: Set<String> = [], minimumAge: Double = 600) -> PrunePlan {
        PrunePlan(volumes: volumes, usage: DomainUsage(domainNames: domains, paths: paths), now: now, minimumAge: minimumAge)
    }

    private func removed(_ p: PrunePlan) -> [String: String] {
        Dictionary(uniqueKeysWithValues: p.remove.flatMap(\.volumes).map { ($0.name, $0.reason) })
    }

    @Test func anUploadNoDomainBootsGoesWithItsMarker() {
        let p = plan([volume("boot-\(digest)"), volume("boot-\(digest).complete")])
        #expect(removed(p) == ["boot-\(digest)": "a kernel no domain boots", "boot-\(digest).complete": "a kernel no domain boots"])
        #expect(p.remove.count == 1, "the upload and its marker go together")
    }

    @Test func anUploadADomainBootsStays() {
        let p = plan([volume("boot-\(digest)"), volume("boot-\(digest).complete")], domains: ["vm"], paths: ["/pool/boot-\(digest)"])
        #expect(p.remove.isEmpty)
        #expect(p.recent.isEmpty)
    }

    @Test func aBaseAnOverlayReadsThroughStaysEvenWithNoDomain() {
        let base = volume("base-\(digest)")
        let p = plan([base, volume("base-\(digest).complete"), volume("someones.img", backing: base.path)])
        #expect(p.remove.isEmpty, "nothing goes: the overlay reads the base, and its own name is not virtchan's")
    }

    @Test func unfinishedUploadsAndStrayMarkersGo() {
        let p = plan([volume("base-\(digest)"), volume("boot-\(digest).complete")])
        #expect(removed(p) == ["base-\(digest)": "an upload that never finished", "boot-\(digest).complete": "the marker of an upload that is gone"])
    }

    @Test func aDomainsOwnVolumesGoOnlyOnceTheDomainIsGone() {
        let volumes = ["vm.qcow2", "vm.seed.iso", "vm.initrd", "gone.qcow2", "gone.initrd"].map { volume($0) }
        let p = plan(volumes, domains: ["vm"])
        #expect(removed(p) == ["gone.qcow2": "made for domain gone, which no longer exists",
                               "gone.initrd": "made for domain gone, which no longer exists"])
        // A volume named for a domain that is gone but booted by another stays.
        #expect(plan([volume("gone.qcow2")], domains: ["other"], paths: ["/pool/gone.qcow2"]).remove.isEmpty)
    }

    @Test func recentVolumesAreKeptAndSaidSo() {
        let p = plan([volume("base-\(digest)", age: 30), volume("base-\(digest).complete", age: 9000), volume("gone.qcow2", age: 599)])
        #expect(p.remove.isEmpty)
        #expect(Set(p.recent.map(\.name)) == ["base-\(digest)", "base-\(digest).complete", "gone.qcow2"])
        #expect(removed(plan([volume("gone.qcow2", age: 599)], minimumAge: 0)) == ["gone.qcow2": "made for domain gone, which no longer exists"])
        // A pool that gives no time is taken as written just now.
        let untimed = PoolVolume(name: "gone.qcow2", path: "/pool/gone.qcow2", bytes: 0, backingPath: nil, modified: nil)
        #expect(plan([untimed]).recent.map(\.name) == ["gone.qcow2"])
    }

    @Test func namesVirtchanDoesNotGiveAreNeverTouched() {
        let fullWidth = String(repeating: "\u{FF11}", count: 24)
        let names = ["boot-\(digest.uppercased())", "boot-1234", "kernel-\(digest)", "base-\(digest)x", "notes.txt", ".qcow2",
                     "base-\(digest).complete.bak", "base-\(fullWidth)"]
        #expect(plan(names.map { volume($0) }).remove.isEmpty)
    }
}
