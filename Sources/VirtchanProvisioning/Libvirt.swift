import CLibvirt
import Foundation
import Synchronization
import VirtchanProtocol

/// A connection to libvirt. The class owns the `virConnectPtr`.
public final class Connection: @unchecked Sendable {
    let pointer: virConnectPtr
    public let uri: String

    private static let setup: Void = {
        vc_virInitialize()
        vc_virt_silence_errors()
    }()

    /// The URI virsh would use (see ``LibvirtURI/standard``).
    public static var defaultURI: String { LibvirtURI.standard }

    /// Opens a connection. The corresponding C function is `virConnectOpen`.
    public init(uri: String? = nil) throws(ProvisioningError) {
        if let reason = vc_virt_load() {
            throw ProvisioningError(.connection, String(cString: reason))
        }
        _ = Self.setup
        // Keepalives need the event loop running before the connection opens. Without them, a
        // libvirtd that stops answering (stopped, hung, or behind a link that went down without
        // a word) keeps every call waiting for ever.
        let keepAlive = (try? Self.startEventLoop()) != nil
        let target = uri ?? Self.defaultURI
        switch ConnectionGate.shared.withSlot(for: target, { Self.openBounded(target) }) {
        case .success(let handle):
            pointer = handle.pointer
        case .failure(let err):
            var hint = ""
            if err.code == .timeout {
                // The message says it all: the daemon is there, and silent.
            } else if target.hasSuffix(":///system") && geteuid() != 0 {
                // As a plain user, any failure here is libvirt refusing: it does not mean
                // that the daemon is down.
                hint = "; permission denied: only root (or a user that libvirt's polkit or socket permissions admit) may use \(target). Run virtchan as root, or use domains of your own with --connect qemu:///session"
            } else if target.hasPrefix("qemu:///") || target.hasPrefix("qemu+unix") {
                hint = "; is libvirtd running? Start it with: sudo Scripts/setup-host"
            } else if err.message.contains("CA certificate") || err.message.contains("client certificate") {
                // qemu://host/system (no transport named) means TLS as well.
                hint = "; this URI reaches its host over TLS, which needs a certificate authority and a client certificate (in /etc/pki, or in the directory named by ?pkipath=DIR); without them, use qemu+ssh://HOST/system"
            } else if err.message.contains("Permission denied (publickey") {
                // No terminal to ask for a password on (holders and fleets run in the
                // background), and no key the server takes.
                hint = "; ssh could not log in: give it a key the server accepts, loaded into ssh-agent or named in the URI with ?keyfile=PATH"
            } else if err.message.contains("kex_exchange_identification") {
                hint = "; the ssh server turned the connection away before the key exchange, 5 times in a row: it may be at its limit of connections being set up (MaxStartups in its sshd_config), or refuse this client"
            }
            throw ProvisioningError(err.code, err.message + hint, libvirtCode: err.libvirtCode)
        }
        self.uri = target
        if keepAlive { setKeepAlive(interval: Self.keepAliveInterval, count: Self.keepAliveCount) }
    }

    /// A libvirtd that leaves this many probes, this many seconds apart, unanswered is taken
    /// for gone: what waits on it fails about 20 s after it fell silent.
    public static let keepAliveInterval: Int32 = 5
    public static let keepAliveCount: UInt32 = 3

    /// Installs libvirt's default event loop and runs it on a thread of its own, once per
    /// process. Keepalives and channel streams need it; it must run before the connection
    /// that uses them is opened (``init(uri:)`` sees to that).
    static func startEventLoop() throws(ProvisioningError) {
        try eventLoop.withLock { (started: inout Bool) throws(ProvisioningError) in
            if started { return }
            if let reason = vc_virt_load() { throw ProvisioningError(.connection, String(cString: reason)) }
            guard vc_virEventRegisterDefaultImpl() == 0 else {
                throw ProvisioningError.fromLibvirt("cannot start libvirt's event loop")
            }
            let thread = Thread { while vc_virEventRunDefaultImpl() == 0 {} }
            thread.name = "libvirt-events"
            thread.start()
            started = true
        }
    }
    private static let eventLoop = Mutex(false)

    deinit { vc_virConnectClose(pointer) }

    /// Seconds an open may take before it is given up on: a libvirtd that was stopped or hangs
    /// accepts the connection and never answers, and keepalives start only once it is open.
    /// `VIRTCHAN_CONNECT_TIMEOUT` sets it; else 30 s on this host, 90 s to another (an ssh
    /// transport may ask for a password or a host key first).
    static func openTimeout(for uri: String) -> Double {
        if let text = getenv("VIRTCHAN_CONNECT_TIMEOUT").map({ String(cString: $0) }),
           let seconds = Double(text), seconds > 0 { return seconds }
        return remoteHost(of: uri) == nil ? 30 : 90
    }

    /// A connection as a value that may cross threads.
    private struct Handle: @unchecked Sendable { let pointer: virConnectPtr }

    /// ``open(_:)`` on a thread of its own, waited for at most ``openTimeout(for:)``; an open
    /// given up on closes its connection if it ever gets one.
    private static func openBounded(_ target: String) -> Result<Handle, ProvisioningError> {
        let call = BoundedCall<Handle>(name: "libvirt-connect", {
            guard let p = Self.open(target) else {
                return .failure(ProvisioningError.fromLibvirt("cannot connect to \(target)", code: .connection))
            }
            return .success(Handle(pointer: p))
        }, discard: { vc_virConnectClose($0.pointer) })
        let timeout = openTimeout(for: target)
        switch call.wait(seconds: timeout) {
        case .finished(let result):
            return result
        case .gaveUp:
            return .failure(ProvisioningError(.timeout, "cannot connect to \(target): libvirtd did not answer within \(formatSeconds(timeout)); it may be stopped or hung (see: systemctl status libvirtd, on its host), or the link to its host down"))
        }
    }

    /// `virConnectOpen`, tried again (up to 5 times in about 3 s) while an ssh server turns the
    /// connection away before the key exchange, as one at its limit of connections being set
    /// up does until some of them are through. Nil with libvirt's error set when it fails.
    private static func open(_ target: String) -> virConnectPtr? {
        var delay = 0.2
        for attempt in 1...5 {
            if let p = vc_virConnectOpen(target) { return p }
            guard attempt < 5, let err = vc_virGetLastError(), let message = err.pointee.message,
                  strstr(message, "kex_exchange_identification") != nil else { return nil }
            vc_virResetLastError()
            // Spread out, so that those turned away together do not come back together.
            usleep(UInt32(delay * Double.random(in: 0.5...1.5) * 1e6))
            delay *= 2
        }
        return nil
    }

    /// Defines a persistent domain. The corresponding C function is `virDomainDefineXML`.
    public func define(xml: String) throws(ProvisioningError) -> Domain {
        guard let d = vc_virDomainDefineXML(pointer, xml) else {
            throw ProvisioningError.fromLibvirt("libvirt refused the domain definition")
        }
        return Domain(connection: self, pointer: d)
    }

    /// The domain called `name`, or nil. The corresponding C function is `virDomainLookupByName`.
    public func domain(named name: String) -> Domain? {
        guard let d = vc_virDomainLookupByName(pointer, name) else {
            vc_virResetLastError()
            return nil
        }
        return Domain(connection: self, pointer: d)
    }

    /// Like `domain(named:)` but throws a message that says what to do.
    public func requireDomain(_ name: String) throws(ProvisioningError) -> Domain {
        guard let d = domain(named: name) else {
            throw ProvisioningError(.notFound, "no domain named '\(name)' on \(uri) (see: virtchan list\(uri == Self.defaultURI ? "" : " -c " + shellWord(uri)))")
        }
        return d
    }

    /// Every domain, running or not. The corresponding C function is `virConnectListAllDomains`.
    public func allDomains() throws(ProvisioningError) -> [Domain] {
        var list: UnsafeMutablePointer<virDomainPtr?>?
        let n = vc_virConnectListAllDomains(pointer, &list, 0)
        guard n >= 0, let list else { throw ProvisioningError.fromLibvirt("cannot list domains") }
        defer { free(list) }
        return (0..<Int(n)).compactMap { i in list[i].map { Domain(connection: self, pointer: $0) } }
    }

    /// True when the URI reaches libvirt on this machine through its own unix socket, so a
    /// domain's channel sockets are files here. A URI with a host or a network transport
    /// (`qemu+ssh`, `qemu+tcp`, `qemu+tls`) is remote even when it names this machine: its
    /// channels are reached through libvirt streams.
    public var isLocal: Bool { Self.isLocal(uri: uri) }

    public static func isLocal(uri: String) -> Bool { LibvirtURI.isLocal(uri) }

    /// See ``LibvirtURI/remoteHost(of:)``.
    public static func remoteHost(of uri: String) -> String? { LibvirtURI.remoteHost(of: uri) }

    /// Has libvirt probe the far end every `interval` seconds and drop the connection after
    /// `count` probes go unanswered, so a lost network link fails what waits on it instead of
    /// hanging. Needs libvirt's event loop (``startEventLoop()``); every connection starts
    /// with ``keepAliveInterval`` and ``keepAliveCount``. The corresponding C function is
    /// `virConnectSetKeepAlive`.
    public func setKeepAlive(interval: Int32, count: UInt32) {
        if vc_virConnectSetKeepAlive(pointer, interval, count) < 0 { vc_virResetLastError() }
    }
}

public enum DomainState: String, Sendable, Codable {
    case running, blocked, paused, shutdown, shutoff, crashed, suspended, unknown

    init(_ raw: Int32) {
        switch UInt32(raw) {
        case VIR_DOMAIN_RUNNING.rawValue: self = .running
        case VIR_DOMAIN_BLOCKED.rawValue: self = .blocked
        case VIR_DOMAIN_PAUSED.rawValue: self = .paused
        case VIR_DOMAIN_SHUTDOWN.rawValue: self = .shutdown
        case VIR_DOMAIN_SHUTOFF.rawValue: self = .shutoff
        case VIR_DOMAIN_CRASHED.rawValue: self = .crashed
        case VIR_DOMAIN_PMSUSPENDED.rawValue: self = .suspended
        default: self = .unknown
        }
    }
}

/// A libvirt domain. The class owns the `virDomainPtr` and keeps its connection alive.
public final class Domain: @unchecked Sendable {
    public let connection: Connection
    let pointer: virDomainPtr

    init(connection: Connection, pointer: virDomainPtr) {
        self.connection = connection
        self.pointer = pointer
    }

    deinit { vc_virDomainFree(pointer) }

    /// The corresponding C function is `virDomainGetName`.
    public var name: String { vc_virDomainGetName(pointer).map { String(cString: $0) } ?? "" }

    /// The corresponding C function is `virDomainGetState`.
    public var state: DomainState {
        var s: Int32 = 0
        var reason: Int32 = 0
        guard vc_virDomainGetState(pointer, &s, &reason, 0) == 0 else {
            vc_virResetLastError()
            return .unknown
        }
        return DomainState(s)
    }

    public var isActive: Bool { vc_virDomainIsActive(pointer) == 1 }

    /// The live XML (or the persistent one when stopped). The corresponding C function is
    /// `virDomainGetXMLDesc`.
    public func xml(inactive: Bool = false) throws(ProvisioningError) -> String {
        let flags = inactive ? UInt32(VIR_DOMAIN_XML_INACTIVE.rawValue) : 0
        guard let c = vc_virDomainGetXMLDesc(pointer, flags) else {
            throw ProvisioningError.fromLibvirt("cannot read the XML of \(name)")
        }
        defer { free(c) }
        return String(cString: c)
    }

    /// Starts the defined domain. The corresponding C function is `virDomainCreate`.
    public func start() throws(ProvisioningError) {
        guard vc_virDomainCreate(pointer) == 0 else {
            throw ProvisioningError.fromLibvirt("cannot start \(name)")
        }
    }

    /// Stops the domain at once. The corresponding C function is `virDomainDestroy`.
    public func destroy() throws(ProvisioningError) {
        guard vc_virDomainDestroy(pointer) == 0 else {
            throw ProvisioningError.fromLibvirt("cannot stop \(name)")
        }
    }

    /// Asks the guest to reboot (through ACPI, as `virsh reboot` does), returning at once. The
    /// corresponding C function is `virDomainReboot`.
    public func reboot() throws(ProvisioningError) {
        guard vc_virDomainReboot(pointer, 0) == 0 else {
            throw ProvisioningError.fromLibvirt("cannot reboot \(name)")
        }
    }

    /// Removes the definition. The corresponding C function is `virDomainUndefineFlags`.
    public func undefine() throws(ProvisioningError) {
        let flags = UInt32(VIR_DOMAIN_UNDEFINE_MANAGED_SAVE.rawValue | VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA.rawValue
                           | VIR_DOMAIN_UNDEFINE_NVRAM.rawValue)
        if vc_virDomainUndefineFlags(pointer, flags) == 0 { return }
        let first = ProvisioningError.fromLibvirt("cannot undefine \(name)")
        // Drivers without NVRAM or snapshot support refuse those flags; plain undefine is then right.
        guard first.libvirtCode == Int32(VIR_ERR_INVALID_ARG.rawValue) else { throw first }
        guard vc_virDomainUndefine(pointer) == 0 else {
            throw ProvisioningError.fromLibvirt("cannot undefine \(name)")
        }
    }

    /// The element virtchan keeps in the domain's `<metadata>`, or nil.
    /// The corresponding C function is `virDomainGetMetadata`.
    public func metadata(namespace uri: String, live: Bool = true) -> String? {
        let flags = live ? UInt32(VIR_DOMAIN_AFFECT_CURRENT.rawValue) : UInt32(VIR_DOMAIN_AFFECT_CONFIG.rawValue)
        guard let c = vc_virDomainGetMetadata(pointer, Int32(VIR_DOMAIN_METADATA_ELEMENT.rawValue), uri, flags) else {
            vc_virResetLastError()
            return nil
        }
        defer { free(c) }
        return String(cString: c)
    }

    /// Replaces virtchan's metadata element, in the live domain and its persistent definition.
    /// The corresponding C function is `virDomainSetMetadata`.
    public func setMetadata(_ xml: String, key: String, namespace uri: String) throws(ProvisioningError) {
        var flags = UInt32(VIR_DOMAIN_AFFECT_CONFIG.rawValue)
        if isActive { flags |= UInt32(VIR_DOMAIN_AFFECT_LIVE.rawValue) }
        guard vc_virDomainSetMetadata(pointer, Int32(VIR_DOMAIN_METADATA_ELEMENT.rawValue), xml, key, uri, flags) == 0 else {
            throw ProvisioningError.fromLibvirt("cannot update the metadata of \(name)")
        }
    }

    /// Sends a command to qemu-guest-agent through libvirt.
    /// The corresponding C function is `virDomainQemuAgentCommand`.
    public func qemuAgentCommand(_ json: String, timeoutSeconds: Int32 = 10) throws(ProvisioningError) -> String {
        guard let c = vc_virDomainQemuAgentCommand(pointer, json, timeoutSeconds, 0) else {
            throw ProvisioningError.fromLibvirt("qemu-guest-agent command failed")
        }
        defer { free(c) }
        return String(cString: c)
    }
}
