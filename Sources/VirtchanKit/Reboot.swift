import Foundation

/// How ``Hypervisor/reboot(_:method:timeout:)`` asks a guest to reboot.
public enum RebootMethod: String, Sendable, CaseIterable {
    /// The agent runs the guest's `reboot`: an orderly reboot by its init system.
    case agent
    /// libvirt presses the virtual power button (ACPI), as `virsh reboot` does.
    case acpi
}

extension Hypervisor {
    /// Seconds after which ``reboot(_:method:timeout:)`` presses the power button again when the
    /// guest is still in its old boot.
    static let acpiRepressSeconds = 45.0

    /// The guest kernel's boot id: it changes with every boot.
    public func bootID(over session: AgentSession) throws -> String {
        let captured = try ExecClient.capture(session, ["cat", "/proc/sys/kernel/random/boot_id"], timeout: 30, limit: 256)
        let id = captured.stdoutText.trimmingCharacters(in: .whitespacesAndNewlines)
        guard captured.status == 0, !id.isEmpty else {
            throw VirtchanError(.io, "the guest did not tell its boot id (cat /proc/sys/kernel/random/boot_id exited \(captured.status))")
        }
        return id
    }

    /// Reboots the guest in `name` and returns a session with its agent once the agent answers
    /// from the new boot: an agent that still answers while the guest shuts down is not taken
    /// for the one that comes back.
    public func reboot(_ name: String, method: RebootMethod = .agent, timeout: Double = 300) throws -> AgentSession {
        let deadline = Date().addingTimeInterval(timeout)
        let before = try bootID(over: waitForAgent(name, timeout: min(timeout, 30)))
        switch method {
        case .agent:
            // The agent may go down before the reply arrives (and its holder then says that it
            // restarted): only a refusal counts as failure.
            do {
                let session = try self.session(with: name, timeout: 10)
                let result = try ExecClient.capture(session, ["reboot"], timeout: 30)
                if result.status != 0 && !result.result.timedOut {
                    throw VirtchanError(.io, "the guest's reboot exited \(result.status): \(displaySafe(result.stderrText, limit: 400))")
                }
            } catch let error as TransportError where error.remote != nil && error.remote?.remoteCode != .agentRestarted {
                throw VirtchanError(.io, "the guest refused to reboot: \(error.remote?.message ?? error.message)")
            } catch is TransportError {
            }
        case .acpi:
            try domain(name).reboot()
        }
        var pressed = Date()
        while true {
            let left = deadline.timeIntervalSinceNow
            guard left > 1 else {
                throw VirtchanError(.agentTimeout, "the agent in \(name) did not come back from the reboot within \(formatSeconds(timeout)); see the guest's console")
            }
            if let session = try? waitForAgent(name, timeout: left), let now = try? bootID(over: session) {
                if now != before { return session }
                // A guest still in its old boot a while after the button was pressed missed the
                // press (early in a boot nothing listens to it yet): press it again.
                if method == .acpi && Date().timeIntervalSince(pressed) > Self.acpiRepressSeconds {
                    try domain(name).reboot()
                    pressed = Date()
                }
            }
            Thread.sleep(forTimeInterval: 0.5)
        }
    }
}
