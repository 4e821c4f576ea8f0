/// Which commands the agent will run, read from a small config file:
///
///     # /etc/virtchan-agent.conf
///     exec = allow            # or deny: the default for commands not listed below
///     exec-allow = /bin/ls cat
///     exec-deny = rm reboot
///
/// A command matches an entry by its full argv[0] or by its base name. Deny wins over allow.
public struct ExecPolicy: Sendable, Equatable {
    public var defaultAllow = true
    public var allow: Set<String> = []
    public var deny: Set<String> = []

    public init() {}

    public init(parsing text: String) throws(PolicyError) {
        var lineNumber = 0
        for rawLine in text.split(separator: "\n", omittingEmptySubsequences: false) {
            lineNumber += 1
            let line = trimmed(String(rawLine.split(separator: "#", maxSplits: 1, omittingEmptySubsequences: false).first ?? ""))
            if line.isEmpty { continue }
            let parts = line.split(separator: "=", maxSplits: 1).map { trimmed(String($0)) }
            guard parts.count == 2 else { throw PolicyError(line: lineNumber, message: "expected key = value") }
            let values = parts[1].split(whereSeparator: { $0 == " " || $0 == "," }).map(String.init)
            switch parts[0] {
            case "exec":
                switch parts[1] {
                case "allow": defaultAllow = true
                case "deny": defaultAllow = false
                default: throw PolicyError(line: lineNumber, message: "exec must be allow or deny")
                }
            case "exec-allow": allow.formUnion(values)
            case "exec-deny": deny.formUnion(values)
            default: throw PolicyError(line: lineNumber, message: "unknown key '\(parts[0])'")
            }
        }
    }

    public func permits(_ command: String) -> Bool {
        let base = baseName(of: command)
        if deny.contains(command) || deny.contains(base) { return false }
        if allow.contains(command) || allow.contains(base) { return true }
        return defaultAllow
    }

    /// True when no command at all could run.
    public var deniesEverything: Bool { !defaultAllow && allow.isEmpty }
}

public struct PolicyError: Error, CustomStringConvertible, Sendable {
    public let line: Int
    public let message: String
    public var description: String { "line \(line): \(message)" }
}
