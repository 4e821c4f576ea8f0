/// An error in the wire protocol: a malformed, truncated or out-of-bounds message, or a
/// peer that broke the session's rules.
public struct ProtocolError: Error, CustomStringConvertible, Sendable, Equatable {
    public struct Code: Hashable, Sendable, CustomStringConvertible {
        private enum Value: String, Sendable { case truncated, limit, badMagic, checksum, unexpected, version }
        private let value: Value
        private init(_ v: Value) { value = v }
        public static let truncated = Code(.truncated)
        public static let limit = Code(.limit)
        public static let badMagic = Code(.badMagic)
        public static let checksum = Code(.checksum)
        public static let unexpected = Code(.unexpected)
        public static let version = Code(.version)
        public var description: String { value.rawValue }
    }

    public let code: Code
    public let message: String

    public init(_ code: Code, _ message: String) {
        self.code = code
        self.message = message
    }

    public var description: String { "protocol error: \(message)" }
}
