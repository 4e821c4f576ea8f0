/// A failure of a VirtchanKit operation that is not a libvirt or channel error: a code a
/// program can match and a message a person can act on.
///
/// Operations also throw `ProvisioningError` (libvirt, domain XML) and `TransportError`
/// (sockets, the agent) unchanged, so a caller matches the layer that failed.
public struct VirtchanError: Error, CustomStringConvertible, Sendable {
    public struct Code: Hashable, Sendable, CustomStringConvertible {
        private enum Value: String, Sendable {
            case invalidRequest, notRunning, noChannel, notManaged, alreadyExists, agentTimeout,
                 bootstrapMissing, bootstrapRunning, bootstrapFailed, io
        }
        private let value: Value
        private init(_ v: Value) { value = v }
        /// The request itself is wrong (a missing file, options that do not go together);
        /// the command line reports it as bad usage.
        public static let invalidRequest = Code(.invalidRequest)
        /// The domain exists but is not running.
        public static let notRunning = Code(.notRunning)
        /// The domain has no usable virtchan control channel.
        public static let noChannel = Code(.noChannel)
        public static let notManaged = Code(.notManaged)
        public static let alreadyExists = Code(.alreadyExists)
        /// The agent did not say hello in time.
        public static let agentTimeout = Code(.agentTimeout)
        public static let bootstrapMissing = Code(.bootstrapMissing)
        /// Another host process is running this domain's bootstrap.
        public static let bootstrapRunning = Code(.bootstrapRunning)
        /// The bootstrap could not be delivered or run (not: the script exited non-zero).
        public static let bootstrapFailed = Code(.bootstrapFailed)
        /// A host file could not be read or written.
        public static let io = Code(.io)
        public var description: String { value.rawValue }
        /// The code whose ``description`` is `name`, for errors that cross a process boundary.
        public init?(named name: String) {
            guard let v = Value(rawValue: name) else { return nil }
            value = v
        }
    }

    public let code: Code
    public let message: String

    public init(_ code: Code, _ message: String) {
        self.code = code
        self.message = message
    }

    /// The same error with `detail` after its message.
    public func appending(_ detail: String) -> VirtchanError {
        VirtchanError(code, message + detail)
    }

    public var description: String { message }
}
