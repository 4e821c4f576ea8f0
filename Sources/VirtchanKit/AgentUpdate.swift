import Foundation

extension Hypervisor {
    /// The agent binary ``updateAgent(_:binary:timeout:)`` installs when given none: the one
    /// `Scripts/build-guest` leaves beside the built-in guest, which new seeds carry too.
    public var currentAgentBinary: String { paths.imageDirectory + "/agent/virtchan-agent" }

    /// Replaces the agent running in `name` with `binary` and restarts it through systemd
    /// (`virtchan-agent.service`, as a seed or the .deb installs it); returns a session with the
    /// new agent once it answers. The binary travels over the channel like any push, verified,
    /// and replaces the old one by a rename, so a cut-off transfer leaves the old agent working.
    public func updateAgent(_ name: String, binary: String? = nil, timeout: Double = 120) throws -> AgentSession {
        let binary = binary ?? currentAgentBinary
        guard FileManager.default.isReadableFile(atPath: binary) else {
            throw VirtchanError(.io, "there is no agent binary at \(binary); build it with: Scripts/build-guest")
        }
        let deadline = Date().addingTimeInterval(timeout)
        let session = try waitForAgent(name, timeout: min(timeout, 30))
        // The exec's shell is the agent's child: its parent's executable is the agent's path.
        let probe = try ExecClient.capture(session, ["/bin/sh", "-c",
            "readlink -f /proc/$PPID/exe; echo $PPID; s=$(systemctl is-active virtchan-agent.service 2>/dev/null); echo \"${s:-no-systemd}\""], limit: 4096)
        let lines = probe.stdoutText.split(separator: "\n").map(String.init)
        guard lines.count >= 3, lines[0].hasPrefix("/"), let oldPID = Int32(lines[1]) else {
            throw VirtchanError(.io, "cannot tell where the agent in \(name) runs from: \(displaySafe(probe.stdoutText + probe.stderrText, limit: 300))")
        }
        let agentPath = displaySafe(lines[0], limit: 200)
        guard lines[2] != "no-systemd" else {
            // The built-in guest: its agent comes with its initramfs.
            throw VirtchanError(.invalidRequest, "\(name) has no systemd to restart its agent (which runs from \(agentPath)); for the built-in guest, rebuild its initramfs with Scripts/build-guest and create the domain again; elsewhere, replace and restart the agent by hand")
        }
        guard lines[2] == "active" else {
            throw VirtchanError(.invalidRequest, "the agent in \(name) is not run by systemd's virtchan-agent.service (it runs from \(agentPath)); replace and restart it by hand")
        }
        let path = lines[0]
        _ = try FileTransfer(session: session).push(file: binary, to: path + ".virtchan-new", mode: 0o755, parents: false)
        let moved = try ExecClient.capture(session, ["mv", "-f", path + ".virtchan-new", path])
        guard moved.status == 0 else {
            throw VirtchanError(.io, "cannot put the new agent in place at \(displaySafe(path, limit: 200)): \(displaySafe(moved.stderrText, limit: 300))")
        }
        // The restart ends this agent, and with it this session: it is queued, not waited for.
        _ = try? ExecClient.capture(session, ["systemctl", "--no-block", "restart", "virtchan-agent.service"])
        while true {
            let left = deadline.timeIntervalSinceNow
            guard left > 1 else {
                throw VirtchanError(.agentTimeout, "the new agent in \(name) did not answer within \(formatSeconds(timeout)) (see: \(suggested("exec", name, "-- systemctl status virtchan-agent")))")
            }
            if let next = try? waitForAgent(name, timeout: left),
               let pid = try? ExecClient.capture(next, ["/bin/sh", "-c", "echo $PPID"]),
               let now = Int32(pid.stdoutText.trimmingCharacters(in: .whitespacesAndNewlines)), now != oldPID {
                return next
            }
            Thread.sleep(forTimeInterval: 0.3)
        }
    }
}
