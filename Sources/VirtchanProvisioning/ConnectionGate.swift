import Foundation

/// Lets a process set up only a few connections to one remote host at a time. Over ssh each
/// libvirt connection (and each session holder of a remote domain, which opens its own) is a
/// new ssh connection, and an ssh server turns away connections beyond its limit of those still
/// being set up (OpenSSH's MaxStartups, 10 by default): a fleet command on many domains of one
/// host would otherwise lose some of them. A thread that already holds a slot for a host
/// passes again without waiting.
package final class ConnectionGate: @unchecked Sendable {
    package static let shared = ConnectionGate(limit: 4)

    package let limit: Int
    private let condition = NSCondition()
    /// Per host: the threads setting up a connection to it now.
    private var inProgress: [String: Set<pthread_t>] = [:]

    package init(limit: Int) { self.limit = limit }

    /// Runs `body` once fewer than ``limit`` threads of this process set up a connection to
    /// the host of `uri`; at once for a URI of this host's own daemons.
    package func withSlot<T, E: Error>(for uri: String, _ body: () throws(E) -> T) throws(E) -> T {
        guard let host = Connection.remoteHost(of: uri) else { return try body() }
        let me = pthread_self()
        condition.lock()
        if inProgress[host]?.contains(me) == true {
            condition.unlock()
            return try body()
        }
        while inProgress[host, default: []].count >= limit { condition.wait() }
        inProgress[host, default: []].insert(me)
        condition.unlock()
        defer {
            condition.lock()
            inProgress[host]?.remove(me)
            if inProgress[host]?.isEmpty == true { inProgress[host] = nil }
            condition.broadcast()
            condition.unlock()
        }
        return try body()
    }
}
