import Glibc
import VirtchanProtocol

extension Interruption {
    /// Throws `.interrupted` when a signal arrived.
    public static func check() throws(TransportError) {
        guard let sig = pending else { return }
        throw TransportError(.interrupted, describe(sig), errno: EINTR, signal: sig)
    }
}

/// Every failure of the host's side of a conversation with the agent.
public struct TransportError: Error, CustomStringConvertible, Sendable {
    public struct Code: Hashable, Sendable, CustomStringConvertible {
        private enum Value: String, Sendable {
            case busy, unreachable, timeout, agentGone, protocolViolation, remote, io, invalidArgument, integrity, interrupted, unauthenticated
        }
        private let value: Value
        private init(_ v: Value) { value = v }
        /// Another client holds the channel.
        public static let busy = Code(.busy)
        /// The socket is missing or refuses connections.
        public static let unreachable = Code(.unreachable)
        /// No answer within the deadline.
        public static let timeout = Code(.timeout)
        /// The agent went away mid-conversation.
        public static let agentGone = Code(.agentGone)
        public static let protocolViolation = Code(.protocolViolation)
        /// The agent refused or failed the request; see `remote`.
        public static let remote = Code(.remote)
        public static let io = Code(.io)
        public static let invalidArgument = Code(.invalidArgument)
        /// Data did not verify (checksum or size).
        public static let integrity = Code(.integrity)
        /// A signal (see `signal`) stopped the operation; what it had begun was undone.
        public static let interrupted = Code(.interrupted)
        /// The agent and this host do not share the domain's key (or the agent has none).
        public static let unauthenticated = Code(.unauthenticated)
        public var description: String { value.rawValue }
        /// The code whose ``description`` is `name`, for errors that cross a process boundary.
        public init?(named name: String) {
            guard let v = Value(rawValue: name) else { return nil }
            value = v
        }
    }

    public let code: Code
    public let message: String
    public let remote: ErrorMessage?
    public let errno: Int32?
    /// The signal behind an `.interrupted` error.
    public let signal: Int32?

    public init(_ code: Code, _ message: String, remote: ErrorMessage? = nil, errno: Int32? = nil, signal: Int32? = nil) {
        self.code = code
        self.message = message
        self.remote = remote
        self.errno = errno
        self.signal = signal
    }

    /// A failed system call: `what` went wrong, followed by the system's words for `errno`.
    public static func system(_ what: String, code: Code = .io, errno e: Int32 = Glibc.errno) -> TransportError {
        TransportError(code, "\(what): \(String(cString: strerror(e)))", errno: e)
    }

    /// The same error with `detail` after its message.
    public func appending(_ detail: String) -> TransportError {
        TransportError(code, message + detail, remote: remote, errno: errno, signal: signal)
    }

    /// The agent's error; its text is made safe to print (see `displaySafe`).
    public init(remote: ErrorMessage) {
        self.init(.remote, displaySafe(remote.message), remote: remote)
    }

    public var description: String { message }
}

