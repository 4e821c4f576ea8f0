import CLibvirt

/// Every failure of the provisioning layer: a code a script can match, a message a person can
/// act on, and the libvirt error behind it when there is one.
public struct ProvisioningError: Error, CustomStringConvertible, Sendable {
    public struct Code: Hashable, Sendable, CustomStringConvertible {
        private enum Value: String, Sendable {
            case invalidArgument, invalidXML, conflict, notFound, notRunning, alreadyExists,
                 connection, libvirt, notManaged, io, libraryMissing, timeout
        }
        private let value: Value
        private init(_ v: Value) { value = v }
        public static let invalidArgument = Code(.invalidArgument)
        public static let invalidXML = Code(.invalidXML)
        public static let conflict = Code(.conflict)
        public static let notFound = Code(.notFound)
        public static let notRunning = Code(.notRunning)
        public static let alreadyExists = Code(.alreadyExists)
        public static let connection = Code(.connection)
        public static let libvirt = Code(.libvirt)
        public static let notManaged = Code(.notManaged)
        public static let io = Code(.io)
        /// libvirt or libxml2 cannot be loaded: the installation is broken.
        public static let libraryMissing = Code(.libraryMissing)
        /// libvirt did not finish a call in the time given for it.
        public static let timeout = Code(.timeout)
        public var description: String { value.rawValue }
        /// The code whose ``description`` is `name`, for errors that cross a process boundary.
        public init?(named name: String) {
            guard let v = Value(rawValue: name) else { return nil }
            value = v
        }
    }

    public let code: Code
    public let message: String
    /// libvirt's own error number (`virErrorNumber`), when libvirt reported the failure.
    public let libvirtCode: Int32?

    public init(_ code: Code, _ message: String, libvirtCode: Int32? = nil) {
        self.code = code
        self.message = message
        self.libvirtCode = libvirtCode
    }

    public var description: String { message }

    /// Turns libvirt's last error on this thread into a ProvisioningError right away.
    /// `what` is evaluated only after the error is captured: every libvirt call (even
    /// virDomainGetName) clears the thread's last error.
    static func fromLibvirt(_ what: @autoclosure () -> String, code: Code = .libvirt) -> ProvisioningError {
        guard let err = vc_virGetLastError() else {
            return ProvisioningError(code, "\(what()) failed")
        }
        let number = err.pointee.code
        let text = err.pointee.message.map { String(cString: $0) } ?? "unknown libvirt error"
        vc_virResetLastError()
        let what = what()
        var resolved = code
        if number == Int32(VIR_ERR_NO_DOMAIN.rawValue) { resolved = .notFound }
        if number == Int32(VIR_ERR_OPERATION_INVALID.rawValue) && text.contains("not running") { resolved = .notRunning }
        if text.contains("keepalive timeout") {
            let silence = Int(Connection.keepAliveInterval) * Int(Connection.keepAliveCount + 1)
            return ProvisioningError(.connection, "\(what): libvirtd stopped answering (no reply to its keepalive probes for about \(silence) s); it may be stopped or hung, or the link to its host down", libvirtCode: number)
        }
        return ProvisioningError(resolved, "\(what): \(text)", libvirtCode: number)
    }
}
