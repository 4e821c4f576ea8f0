import Foundation
import Testing
import VirtchanTransport

/// The endpoint cache against a stand-in for libvirt's pid directory. This test process plays
/// the domain's QEMU process: its pid goes into NAME.pid, and /proc gives its start time.
@Suite struct EndpointCacheTests {
    let root: String
    let cache: EndpointCache
    let endpoint = AgentEndpoint(domain: "vm1", controlSocket: "/srv/vm1/control.sock",
                                 dataSocket: "/srv/vm1/data.sock", consoleLog: "/srv/vm1/console.log")

    init() throws {
        root = NSTemporaryDirectory() + "virtchan-cache-\(UUID().uuidString)"
        try FileManager.default.createDirectory(atPath: root + "/pids", withIntermediateDirectories: true)
        cache = EndpointCache(directory: root + "/endpoints", pidDirectory: root + "/pids")
    }

    func writePid(_ pid: Int32, for domain: String = "vm1") throws {
        try "\(pid)\n".write(toFile: root + "/pids/\(domain).pid", atomically: true, encoding: .utf8)
    }

    @Test func storedEndpointComesBackWhileTheSameProcessRunsTheDomain() throws {
        defer { try? FileManager.default.removeItem(atPath: root) }
        try writePid(getpid())
        cache.store(endpoint)
        let found = try #require(cache.lookup("vm1"))
        #expect(found.controlSocket == "/srv/vm1/control.sock")
        #expect(found.dataSocket == "/srv/vm1/data.sock")
        #expect(found.consoleLog == "/srv/vm1/console.log")
        #expect(cache.lookup("vm2") == nil)
    }

    @Test func anotherProcessOrNoneMeansTheEntryIsStale() throws {
        defer { try? FileManager.default.removeItem(atPath: root) }
        try writePid(getpid())
        cache.store(endpoint)
        // The domain restarted: libvirt's pid file names a different (live) process.
        try writePid(1)
        #expect(cache.lookup("vm1") == nil)
        // The domain stopped: no pid file.
        try FileManager.default.removeItem(atPath: root + "/pids/vm1.pid")
        #expect(cache.lookup("vm1") == nil)
        // A pid file that names no process.
        try writePid(Int32.max - 1)
        #expect(cache.lookup("vm1") == nil)
    }

    @Test func aReusedPidWithAnotherStartTimeDoesNotMatch() throws {
        defer { try? FileManager.default.removeItem(atPath: root) }
        try writePid(getpid())
        cache.store(endpoint)
        let entry = root + "/endpoints/vm1"
        let text = try String(contentsOfFile: entry, encoding: .utf8)
        let changed = text.split(separator: "\n").map { $0.hasPrefix("start=") ? "start=1" : String($0) }.joined(separator: "\n")
        try changed.write(toFile: entry, atomically: false, encoding: .utf8)
        #expect(cache.lookup("vm1") == nil)
    }

    @Test func anEntryOthersCanWriteIsIgnored() throws {
        defer { try? FileManager.default.removeItem(atPath: root) }
        try writePid(getpid())
        cache.store(endpoint)
        #expect(cache.lookup("vm1") != nil)
        chmod(root + "/endpoints/vm1", 0o666)
        #expect(cache.lookup("vm1") == nil)
    }

    @Test func removeForgetsAndOddNamesAreNeverCached() throws {
        defer { try? FileManager.default.removeItem(atPath: root) }
        try writePid(getpid())
        cache.store(endpoint)
        cache.remove("vm1")
        #expect(cache.lookup("vm1") == nil)
        for name in ["../vm1", ".hidden", "a/b"] {
            var odd = endpoint
            odd.domain = name
            cache.store(odd)
            #expect(cache.lookup(name) == nil)
        }
        let left = try FileManager.default.contentsOfDirectory(atPath: root + "/endpoints")
        #expect(left.isEmpty)
        // A socket path with a newline cannot be written down unambiguously: not cached.
        var odd = endpoint
        odd.controlSocket = "/srv/vm1/control\n.sock"
        cache.store(odd)
        #expect(cache.lookup("vm1") == nil)
    }
}
