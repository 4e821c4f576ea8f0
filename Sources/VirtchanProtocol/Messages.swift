/// Every frame type of protocol version 1. See docs/PROTOCOL.md for the conversation each
/// belongs to. Numbers are wire values: never renumber, only add.
public enum MessageType: UInt8, Sendable, CaseIterable {
    case hello = 0x01
    case helloAck = 0x02
    case ping = 0x03
    case pong = 0x04
    case infoRequest = 0x05
    case info = 0x06
    case error = 0x07
    case authProof = 0x08
    case agentStarted = 0x09
    /// Sent by the agent, unasked and with no body, when it stops (SIGTERM: the guest shuts down or
    /// reboots, or its service is stopped). Hosts that predate it skip it as an unknown type.
    case agentStopping = 0x0A

    case execStart = 0x10
    case execStarted = 0x11
    case execInput = 0x12
    case execOutput = 0x13
    case execSignal = 0x14
    case execExit = 0x15
    case execOutputClosed = 0x16
    case execResize = 0x17
    case execFlow = 0x18
    case execInputWindow = 0x19

    case pushRequest = 0x20
    case pullRequest = 0x21
    case dataReady = 0x22
    case data = 0x23
    case dataEnd = 0x24
    case transferDone = 0x25
    case abort = 0x26
    case statRequest = 0x27
    case stat = 0x28
    case mkdir = 0x29
    case symlink = 0x2A
    case ok = 0x2B
    case listTree = 0x2C
    case treeEntries = 0x2D

    // Forwarded TCP connections (see TcpConnect).
    case tcpConnect = 0x30
    case tcpConnected = 0x31
    case tcpData = 0x32
    case tcpWindow = 0x33
    case tcpShutdown = 0x34
    case tcpClose = 0x35
    case tcpListen = 0x36
    case tcpListening = 0x37
    case tcpAccepted = 0x38

    // Between virtchan processes on one host and a session holder; never on a channel.
    case dataPortRequest = 0x40
    case dataPortQueued = 0x41
    case dataPortGrant = 0x42
}

public enum ProtocolVersion {
    public static let current: UInt16 = 1
    public static let minimum: UInt16 = 1
}

/// Names of optional features an agent announces in its hello.
public enum Capability {
    public static let ping = "ping"
    public static let info = "info"
    public static let exec = "exec"
    public static let execStdin = "exec-stdin"
    public static let execSignal = "exec-signal"
    public static let execTTY = "exec-tty"
    /// The agent understands execOutputClosed.
    public static let execOutputClosed = "exec-output-closed"
    /// The agent understands execResize.
    public static let execResize = "exec-resize"
    /// The agent runs several processes per session, each under its request's id.
    public static let execConcurrent = "exec-concurrent"
    /// The agent understands execFlow (pause and resume one process's output).
    public static let execFlow = "exec-flow"
    /// The agent takes a process's stdin within a window, for a host that asks for it
    /// (`execStartInputWindow`), and acknowledges what it took with execInputWindow.
    public static let execInputWindow = "exec-input-window"
    /// The agent starts the process of an execStart with `execStartNoInput` with its stdin
    /// on /dev/null, and the host sends it no input, not even an EOF.
    public static let execNoInput = "exec-no-input"
    public static let filePush = "file-push"
    public static let filePull = "file-pull"
    public static let tree = "tree"
    public static let sha256 = "sha256"
    /// The agent forwards TCP connections (tcpConnect, tcpListen and what follows them).
    public static let tcpForward = "tcp-forward"
    /// Announced by a session holder in its own hello answer: the session is shared, and
    /// the holder has already proven the domain's key to the agent.
    public static let heldSession = "held-session"
    /// The agent holds a key and serves only a host that proves it (AuthProof).
    public static let auth = "auth-hmac-sha256"
}

public protocol WireMessage: Sendable {
    static var type: MessageType { get }
    func encode(into w: inout ByteWriter)
    init(from r: inout ByteReader) throws(ProtocolError)
}

extension WireMessage {
    public func payload() -> [UInt8] {
        var w = ByteWriter()
        encode(into: &w)
        return w.bytes
    }

    public func frame(id: UInt32, flags: UInt16 = 0) -> Frame {
        Frame(Self.type, id: id, flags: flags, payload: payload())
    }

    public static func decode(_ frame: Frame) throws(ProtocolError) -> Self {
        try decode(type: frame.type, payload: frame.payload)
    }

    /// The same for a frame still in the decoder's buffer (`FrameDecoder.nextInPlace`).
    public static func decode(_ frame: FrameView) throws(ProtocolError) -> Self {
        try decode(type: frame.type, payload: Array(frame.payload))
    }

    private static func decode(type: MessageType, payload: [UInt8]) throws(ProtocolError) -> Self {
        guard type == Self.type else {
            throw ProtocolError(.unexpected, "expected \(Self.type) but got \(type)")
        }
        var r = ByteReader(payload)
        return try Self(from: &r)
    }
}

public struct Hello: WireMessage, Equatable {
    public static let type = MessageType.hello
    public var nonce: [UInt8]
    public var minVersion: UInt16
    public var maxVersion: UInt16
    public var client: String

    public init(nonce: [UInt8], client: String,
                minVersion: UInt16 = ProtocolVersion.minimum, maxVersion: UInt16 = ProtocolVersion.current) {
        self.nonce = nonce
        self.client = client
        self.minVersion = minVersion
        self.maxVersion = maxVersion
    }

    public func encode(into w: inout ByteWriter) {
        w.blob(nonce); w.u16(minVersion); w.u16(maxVersion); w.string(client)
    }

    public init(from r: inout ByteReader) throws(ProtocolError) {
        nonce = try r.blob(); minVersion = try r.u16(); maxVersion = try r.u16(); client = try r.string()
    }
}

/// Sent by the agent, unasked, when it opens the control port: any session a host still
/// thinks it has is gone (the agent or the guest restarted).
public struct AgentStarted: WireMessage, Equatable {
    public static let type = MessageType.agentStarted
    public var agentVersion: String
    public init(agentVersion: String) { self.agentVersion = agentVersion }
    public func encode(into w: inout ByteWriter) { w.string(agentVersion) }
    public init(from r: inout ByteReader) throws(ProtocolError) { agentVersion = try r.string() }
}

public struct HelloAck: WireMessage, Equatable {
    public static let type = MessageType.helloAck
    public var nonce: [UInt8]
    public var version: UInt16
    public var agentVersion: String
    public var capabilities: [String]
    /// A fresh random challenge from an agent that holds a key (empty otherwise); the host
    /// must answer it with an AuthProof before anything else is served. Older agents end the
    /// message before this field.
    public var challenge: [UInt8]

    public init(nonce: [UInt8], version: UInt16, agentVersion: String, capabilities: [String], challenge: [UInt8] = []) {
        self.nonce = nonce
        self.version = version
        self.agentVersion = agentVersion
        self.capabilities = capabilities
        self.challenge = challenge
    }

    public func encode(into w: inout ByteWriter) {
        w.blob(nonce); w.u16(version); w.string(agentVersion); w.strings(capabilities)
        if !challenge.isEmpty { w.blob(challenge) }
    }

    public init(from r: inout ByteReader) throws(ProtocolError) {
        nonce = try r.blob(); version = try r.u16(); agentVersion = try r.string(); capabilities = try r.strings()
        challenge = r.remaining > 0 ? try r.blob() : []
    }
}

/// The host's answer to an agent's challenge: `AgentKey.proof` over the hello's nonce and
/// the challenge. The agent replies `ok`, or an error (`unauthenticated`) and ends the session.
public struct AuthProof: WireMessage, Equatable {
    public static let type = MessageType.authProof
    public var mac: [UInt8]
    public init(mac: [UInt8]) { self.mac = mac }
    public func encode(into w: inout ByteWriter) { w.blob(mac) }
    public init(from r: inout ByteReader) throws(ProtocolError) { mac = try r.blob() }
}

public struct Info: WireMessage, Equatable {
    public static let type = MessageType.info
    public var agentVersion: String
    public var protocolVersion: UInt16
    public var capabilities: [String]
    public var kernelRelease: String
    public var hostname: String
    public var uptimeSeconds: UInt64
    public var execAllowed: Bool
    /// The OS's `PRETTY_NAME` from os-release; empty when the guest has none.
    public var osName = ""
    /// The guest's network interfaces with their IP addresses.
    public var interfaces: [GuestInterface] = []

    /// At most this many interfaces, and addresses per interface, are read from a guest.
    public static let maxInterfaces = 256

    public init(agentVersion: String, protocolVersion: UInt16, capabilities: [String], kernelRelease: String,
                hostname: String, uptimeSeconds: UInt64, execAllowed: Bool) {
        self.agentVersion = agentVersion
        self.protocolVersion = protocolVersion
        self.capabilities = capabilities
        self.kernelRelease = kernelRelease
        self.hostname = hostname
        self.uptimeSeconds = uptimeSeconds
        self.execAllowed = execAllowed
    }

    public func encode(into w: inout ByteWriter) {
        w.string(agentVersion); w.u16(protocolVersion); w.strings(capabilities)
        w.string(kernelRelease); w.string(hostname); w.u64(uptimeSeconds); w.bool(execAllowed)
        w.string(osName)
        w.u32(UInt32(interfaces.count))
        for interface in interfaces { w.string(interface.name); w.strings(interface.addresses) }
    }

    public init(from r: inout ByteReader) throws(ProtocolError) {
        agentVersion = try r.string(); protocolVersion = try r.u16(); capabilities = try r.strings()
        kernelRelease = try r.string(); hostname = try r.string(); uptimeSeconds = try r.u64()
        execAllowed = try r.bool()
        // An older agent ends here.
        guard !r.isAtEnd else { return }
        osName = try r.string()
        let count = Int(try r.u32())
        guard count <= Self.maxInterfaces else { throw ProtocolError(.limit, "info lists \(count) interfaces") }
        for _ in 0..<count {
            interfaces.append(GuestInterface(name: try r.string(), addresses: try r.strings(max: Self.maxInterfaces)))
        }
    }
}

/// One network interface of the guest and its IP addresses (`10.0.0.2/24`, `fe80::1/64`).
public struct GuestInterface: Equatable, Sendable, Codable {
    public var name: String
    public var addresses: [String]
    public init(name: String, addresses: [String]) {
        self.name = name
        self.addresses = addresses
    }
}

/// A failed request. `code` is one of `RemoteErrorCode`; `errno` is the guest's errno or 0.
public struct ErrorMessage: WireMessage, Equatable {
    public static let type = MessageType.error
    public var code: UInt32
    public var errno: Int32
    public var message: String

    public init(_ code: RemoteErrorCode, errno: Int32 = 0, _ message: String) {
        self.code = code.rawValue
        self.errno = errno
        self.message = message
    }

    public var remoteCode: RemoteErrorCode { RemoteErrorCode(rawValue: code) ?? .failed }

    public func encode(into w: inout ByteWriter) { w.u32(code); w.i32(errno); w.string(message) }

    public init(from r: inout ByteReader) throws(ProtocolError) {
        code = try r.u32(); errno = try r.i32(); message = try r.string()
    }
}

public enum RemoteErrorCode: UInt32, Sendable {
    case failed = 1
    case badRequest = 2
    case denied = 3
    case commandNotFound = 4
    case notFound = 5
    case exists = 6
    case isDirectory = 7
    case notDirectory = 8
    case permission = 9
    case noSpace = 10
    case checksum = 11
    case aborted = 12
    case busy = 13
    case unsupported = 14
    case tooLarge = 15
    /// The peer has not proven the domain's key.
    case unauthenticated = 16
    /// From a session holder: the agent restarted, said it stops, or stopped answering while the
    /// request was in flight, so what it did is unknown.
    case agentRestarted = 17
}

public struct ExecStart: WireMessage, Equatable {
    public static let type = MessageType.execStart
    public var argv: [String]
    public var env: [String]
    public var cwd: String
    public var tty: Bool
    public var rows: UInt16
    public var cols: UInt16

    public init(argv: [String], env: [String] = [], cwd: String = "", tty: Bool = false,
                rows: UInt16 = 24, cols: UInt16 = 80) {
        self.argv = argv
        self.env = env
        self.cwd = cwd
        self.tty = tty
        self.rows = rows
        self.cols = cols
    }

    public func encode(into w: inout ByteWriter) {
        w.strings(argv); w.strings(env); w.string(cwd); w.bool(tty); w.u16(rows); w.u16(cols)
    }

    public init(from r: inout ByteReader) throws(ProtocolError) {
        argv = try r.strings(); env = try r.strings(); cwd = try r.string(); tty = try r.bool()
        rows = try r.u16(); cols = try r.u16()
    }
}

public struct ExecStarted: WireMessage, Equatable {
    public static let type = MessageType.execStarted
    public var pid: Int32
    public init(pid: Int32) { self.pid = pid }
    public func encode(into w: inout ByteWriter) { w.i32(pid) }
    public init(from r: inout ByteReader) throws(ProtocolError) { pid = try r.i32() }
}

/// Flags of execOutput frames: which stream the bytes came from. The payload is raw bytes.
public enum ExecStream: UInt16, Sendable { case stdout = 1, stderr = 2 }

/// Flag of an execInput frame: the host's stdin reached EOF (the payload may still hold bytes).
public let execInputEOF: UInt16 = 1
/// execFlow flag: stop forwarding the process's output until an execFlow without it.
public let execFlowPause: UInt16 = 1
/// execStart flag: the host sends this process's stdin at most `ExecLimits.inputWindow` bytes
/// ahead of what the agent has acknowledged with execInputWindow. Without it the agent reads
/// input as fast as it comes, and a process that does not read its stdin stalls the session
/// once enough piles up.
public let execStartInputWindow: UInt16 = 1
/// execStart flag: the process gets no input; its stdin is /dev/null (as `ssh -n` gives),
/// and no execInput follows. For an agent that announces `exec-no-input`; ignored with a tty.
public let execStartNoInput: UInt16 = 2

public enum ExecLimits {
    /// Bytes of a process's stdin the host may send before the agent acknowledges them.
    public static let inputWindow = 256 << 10
}

/// Bytes of a process's stdin the agent has taken (written to the process, or dropped after
/// the process closed its stdin): the host may send that many more.
public struct ExecInputWindow: WireMessage, Equatable {
    public static let type = MessageType.execInputWindow
    public var bytes: UInt32
    public init(bytes: UInt32) { self.bytes = bytes }
    public func encode(into w: inout ByteWriter) { w.u32(bytes) }
    public init(from r: inout ByteReader) throws(ProtocolError) { bytes = try r.u32() }
}

public struct ExecSignal: WireMessage, Equatable {
    public static let type = MessageType.execSignal
    public var signal: Int32
    public init(signal: Int32) { self.signal = signal }
    public func encode(into w: inout ByteWriter) { w.i32(signal) }
    public init(from r: inout ByteReader) throws(ProtocolError) { signal = try r.i32() }
}

/// The host's terminal changed size: the agent sets it on the process's pseudo-terminal.
public struct ExecResize: WireMessage, Equatable {
    public static let type = MessageType.execResize
    public var rows: UInt16
    public var cols: UInt16
    public init(rows: UInt16, cols: UInt16) { self.rows = rows; self.cols = cols }
    public func encode(into w: inout ByteWriter) { w.u16(rows); w.u16(cols) }
    public init(from r: inout ByteReader) throws(ProtocolError) { rows = try r.u16(); cols = try r.u16() }
}

public struct ExecExit: WireMessage, Equatable {
    public static let type = MessageType.execExit
    /// Exit status when the process exited; -1 when a signal ended it.
    public var code: Int32
    /// The signal that ended the process, or 0.
    public var signal: Int32

    public init(code: Int32, signal: Int32) { self.code = code; self.signal = signal }

    /// What a shell would report: the exit code, or 128 + the signal number.
    public var shellStatus: Int32 { signal != 0 ? 128 + signal : code }

    public func encode(into w: inout ByteWriter) { w.i32(code); w.i32(signal) }
    public init(from r: inout ByteReader) throws(ProtocolError) { code = try r.i32(); signal = try r.i32() }
}

public struct PushRequest: WireMessage, Equatable {
    public static let type = MessageType.pushRequest
    public var path: String
    public var mode: UInt32
    public var size: UInt64
    public var parents: Bool
    public var wantSHA256: Bool

    public init(path: String, mode: UInt32, size: UInt64, parents: Bool, wantSHA256: Bool) {
        self.path = path
        self.mode = mode
        self.size = size
        self.parents = parents
        self.wantSHA256 = wantSHA256
    }

    public func encode(into w: inout ByteWriter) {
        w.string(path); w.u32(mode); w.u64(size); w.bool(parents); w.bool(wantSHA256)
    }

    public init(from r: inout ByteReader) throws(ProtocolError) {
        path = try r.string(); mode = try r.u32(); size = try r.u64(); parents = try r.bool()
        wantSHA256 = try r.bool()
    }
}

public struct PullRequest: WireMessage, Equatable {
    public static let type = MessageType.pullRequest
    public var path: String
    public var wantSHA256: Bool
    public init(path: String, wantSHA256: Bool) { self.path = path; self.wantSHA256 = wantSHA256 }
    public func encode(into w: inout ByteWriter) { w.string(path); w.bool(wantSHA256) }
    public init(from r: inout ByteReader) throws(ProtocolError) { path = try r.string(); wantSHA256 = try r.bool() }
}

/// Sent on the control port once the agent has opened the data port: the host may now write.
/// For a pull it announces the size and mode of the file that will follow.
public struct DataReady: WireMessage, Equatable {
    public static let type = MessageType.dataReady
    public var size: UInt64
    public var mode: UInt32
    /// The id that the transfer's frames carry on the data port, when it is not the request's:
    /// a session holder renumbers requests on their way to the agent, and the data port
    /// carries the agent's number. Appended by the holder, never by the agent.
    public var dataID: UInt32?
    public init(size: UInt64, mode: UInt32, dataID: UInt32? = nil) { self.size = size; self.mode = mode; self.dataID = dataID }
    public func encode(into w: inout ByteWriter) {
        w.u64(size); w.u32(mode)
        if let dataID { w.u32(dataID) }
    }
    public init(from r: inout ByteReader) throws(ProtocolError) {
        size = try r.u64(); mode = try r.u32()
        dataID = r.remaining >= 4 ? try r.u32() : nil
    }
}

/// Last frame of a file on the data port: the total size and the TransferDigest of its frames.
public struct DataEnd: WireMessage, Equatable {
    public static let type = MessageType.dataEnd
    public var size: UInt64
    public var digest: UInt64
    public init(size: UInt64, digest: UInt64) { self.size = size; self.digest = digest }
    public func encode(into w: inout ByteWriter) { w.u64(size); w.u64(digest) }
    public init(from r: inout ByteReader) throws(ProtocolError) { size = try r.u64(); digest = try r.u64() }
}

/// The agent's word that a transfer is complete and verified (push: renamed into place).
public struct TransferDone: WireMessage, Equatable {
    public static let type = MessageType.transferDone
    public var size: UInt64
    public var digest: UInt64
    /// Hex SHA-256 computed in the guest, only when asked for; empty otherwise.
    public var sha256: String
    public init(size: UInt64, digest: UInt64, sha256: String) { self.size = size; self.digest = digest; self.sha256 = sha256 }
    public func encode(into w: inout ByteWriter) { w.u64(size); w.u64(digest); w.string(sha256) }
    public init(from r: inout ByteReader) throws(ProtocolError) {
        size = try r.u64(); digest = try r.u64(); sha256 = try r.string()
    }
}

public struct StatRequest: WireMessage, Equatable {
    public static let type = MessageType.statRequest
    public var path: String
    public init(path: String) { self.path = path }
    public func encode(into w: inout ByteWriter) { w.string(path) }
    public init(from r: inout ByteReader) throws(ProtocolError) { path = try r.string() }
}

public enum FileKind: UInt8, Sendable { case missing = 0, regular = 1, directory = 2, symlink = 3, other = 4 }

public struct StatReply: WireMessage, Equatable {
    public static let type = MessageType.stat
    public var kind: FileKind
    public var mode: UInt32
    public var size: UInt64
    public init(kind: FileKind, mode: UInt32, size: UInt64) { self.kind = kind; self.mode = mode; self.size = size }
    public func encode(into w: inout ByteWriter) { w.u8(kind.rawValue); w.u32(mode); w.u64(size) }
    public init(from r: inout ByteReader) throws(ProtocolError) {
        kind = FileKind(rawValue: try r.u8()) ?? .other; mode = try r.u32(); size = try r.u64()
    }
}

public struct MkdirRequest: WireMessage, Equatable {
    public static let type = MessageType.mkdir
    public var path: String
    public var mode: UInt32
    public var parents: Bool
    public init(path: String, mode: UInt32, parents: Bool) { self.path = path; self.mode = mode; self.parents = parents }
    public func encode(into w: inout ByteWriter) { w.string(path); w.u32(mode); w.bool(parents) }
    public init(from r: inout ByteReader) throws(ProtocolError) {
        path = try r.string(); mode = try r.u32(); parents = try r.bool()
    }
}

public struct SymlinkRequest: WireMessage, Equatable {
    public static let type = MessageType.symlink
    public var target: String
    public var path: String
    public init(target: String, path: String) { self.target = target; self.path = path }
    public func encode(into w: inout ByteWriter) { w.string(target); w.string(path) }
    public init(from r: inout ByteReader) throws(ProtocolError) { target = try r.string(); path = try r.string() }
}

public struct ListTree: WireMessage, Equatable {
    public static let type = MessageType.listTree
    public var path: String
    public init(path: String) { self.path = path }
    public func encode(into w: inout ByteWriter) { w.string(path) }
    public init(from r: inout ByteReader) throws(ProtocolError) { path = try r.string() }
}

public struct TreeEntry: Sendable, Equatable {
    public var kind: FileKind
    /// Path relative to the listed root, components joined with "/".
    public var path: String
    public var mode: UInt32
    public var size: UInt64
    public var linkTarget: String
    public init(kind: FileKind, path: String, mode: UInt32, size: UInt64, linkTarget: String) {
        self.kind = kind
        self.path = path
        self.mode = mode
        self.size = size
        self.linkTarget = linkTarget
    }
}

/// One batch of a tree listing; the last batch carries flag `treeEntriesLast`.
public struct TreeEntries: WireMessage, Equatable {
    public static let type = MessageType.treeEntries
    public var entries: [TreeEntry]
    public init(entries: [TreeEntry]) { self.entries = entries }
    public func encode(into w: inout ByteWriter) {
        w.u32(UInt32(entries.count))
        for e in entries {
            w.u8(e.kind.rawValue); w.string(e.path); w.u32(e.mode); w.u64(e.size); w.string(e.linkTarget)
        }
    }
    public init(from r: inout ByteReader) throws(ProtocolError) {
        let n = Int(try r.u32())
        guard n <= 65536, n * 21 <= r.remaining else { throw ProtocolError(.limit, "tree batch of \(n) entries exceeds limits") }
        entries = []
        entries.reserveCapacity(n)
        for _ in 0..<n {
            let kind = FileKind(rawValue: try r.u8()) ?? .other
            entries.append(TreeEntry(kind: kind, path: try r.string(), mode: try r.u32(), size: try r.u64(),
                                     linkTarget: try r.string()))
        }
    }
}

public let treeEntriesLast: UInt16 = 1

// MARK: forwarded TCP connections
//
// A connection has an id: the request id of its tcpConnect (chosen by the host), or for one
// a guest listener accepted, the id the agent gives in tcpAccepted (high bit set, so it never
// meets a host's ids). Both sides then send tcpData, each at most `TcpLimits.window` bytes
// ahead of what the other side has acknowledged with tcpWindow; tcpShutdown says the sender
// will send no more (its socket read EOF), tcpClose ends the connection (flag: reset).

public enum TcpLimits {
    /// Bytes one side may send on one connection before the other acknowledges them.
    public static let window = 1 << 20
    /// Largest payload of one tcpData frame.
    public static let chunk = 64 * 1024
    /// Connections the agent keeps open for one session.
    public static let maxConnections = 1024
    /// Guest listeners for one session.
    public static let maxListeners = 64
    /// Ids the agent gives the connections its listeners accept.
    public static let agentIDBit: UInt32 = 0x8000_0000
}

/// tcpClose flag: the connection failed or was reset, rather than closed in order.
public let tcpCloseReset: UInt16 = 1

/// Open a TCP connection from the guest to `host:port` (an IPv4 or IPv6 address, or
/// `localhost`); answered by tcpConnected or an error.
public struct TcpConnect: WireMessage, Equatable {
    public static let type = MessageType.tcpConnect
    public var host: String
    public var port: UInt16
    public init(host: String, port: UInt16) { self.host = host; self.port = port }
    public func encode(into w: inout ByteWriter) { w.string(host); w.u16(port) }
    public init(from r: inout ByteReader) throws(ProtocolError) { host = try r.string(); port = try r.u16() }
}

/// Listen on a guest address and port (0: any free port); connections it accepts come as
/// tcpAccepted under this request's id. tcpClose under that id stops listening.
public struct TcpListen: WireMessage, Equatable {
    public static let type = MessageType.tcpListen
    public var host: String
    public var port: UInt16
    public init(host: String, port: UInt16) { self.host = host; self.port = port }
    public func encode(into w: inout ByteWriter) { w.string(host); w.u16(port) }
    public init(from r: inout ByteReader) throws(ProtocolError) { host = try r.string(); port = try r.u16() }
}

/// The agent's answer to tcpListen: the port it listens on (the one asked for, or the one the
/// kernel chose for port 0).
public struct TcpListening: WireMessage, Equatable {
    public static let type = MessageType.tcpListening
    public var port: UInt16
    public init(port: UInt16) { self.port = port }
    public func encode(into w: inout ByteWriter) { w.u16(port) }
    public init(from r: inout ByteReader) throws(ProtocolError) { port = try r.u16() }
}

/// A guest listener accepted a connection: sent under the listener's id, naming the new
/// connection's id and its peer.
public struct TcpAccepted: WireMessage, Equatable {
    public static let type = MessageType.tcpAccepted
    public var connection: UInt32
    public var peer: String
    public init(connection: UInt32, peer: String) { self.connection = connection; self.peer = peer }
    public func encode(into w: inout ByteWriter) { w.u32(connection); w.string(peer) }
    public init(from r: inout ByteReader) throws(ProtocolError) { connection = try r.u32(); peer = try r.string() }
}

/// Bytes of a connection the receiver has passed on to its socket: the sender may send that
/// many more.
public struct TcpWindow: WireMessage, Equatable {
    public static let type = MessageType.tcpWindow
    public var bytes: UInt32
    public init(bytes: UInt32) { self.bytes = bytes }
    public func encode(into w: inout ByteWriter) { w.u32(bytes) }
    public init(from r: inout ByteReader) throws(ProtocolError) { bytes = try r.u32() }
}
