import Foundation

/// How cloud-init's run in a guest ended, in its own words (`cloud-init status --long`).
public struct CloudInitStatus: Sendable, Codable {
    /// `done`, `error`, `degraded done`, `disabled`, … as cloud-init says it.
    public let status: String
    /// cloud-init's own exit code: 0 finished, 1 failed, 2 finished with recoverable errors.
    public let exitCode: Int32
    /// Its `--long` report, errors included.
    public let report: String
    public var succeeded: Bool { exitCode == 0 }
}

extension Hypervisor {
    /// Waits until cloud-init in the guest has finished its boot stages, asking cloud-init itself
    /// (`cloud-init status --wait --long`) over `session`. Fails when the guest has no cloud-init
    /// or it has not finished within `timeout` seconds.
    public func waitForCloudInit(_ name: String, session: AgentSession, timeout: Double) throws -> CloudInitStatus {
        let captured: CapturedOutput
        do {
            captured = try ExecClient.capture(session, ["cloud-init", "status", "--wait", "--long"], timeout: timeout, limit: 256 << 10)
        } catch {
            if error.remote?.remoteCode == .commandNotFound {
                throw VirtchanError(.invalidRequest, "the guest in \(name) has no cloud-init to wait for")
            }
            throw error
        }
        if captured.result.timedOut {
            throw VirtchanError(.agentTimeout, "cloud-init in \(name) had not finished after \(formatSeconds(timeout)) (see: \(suggested("exec", name, "-- cloud-init status --long")))")
        }
        // `--wait` prints a dot per poll before the report.
        let report = captured.stdoutText.drop(while: { $0 == "." || $0 == "\n" })
            .trimmingCharacters(in: .whitespacesAndNewlines)
        let status = report.split(separator: "\n").first { $0.hasPrefix("status:") }
            .map { $0.dropFirst("status:".count).trimmingCharacters(in: .whitespaces) } ?? "unknown"
        let errors = captured.stderrText.trimmingCharacters(in: .whitespacesAndNewlines)
        // Guest text, shown on the host: line by line, without control characters.
        let lines = (errors.isEmpty ? report : report + "\n" + errors).split(separator: "\n", omittingEmptySubsequences: false)
        return CloudInitStatus(status: displaySafe(status, limit: 64), exitCode: captured.status,
                               report: lines.prefix(400).map { displaySafe(String($0), limit: 1024) }.joined(separator: "\n"))
    }
}
