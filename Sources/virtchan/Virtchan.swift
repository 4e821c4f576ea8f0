import ArgumentParser
import Foundation
import VirtchanProtocol
import VirtchanProvisioning
import VirtchanTransport

@main
struct Virtchan: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "virtchan",
        abstract: "Network-free host <-> guest messaging over virtio-serial channels of libvirt/QEMU domains.",
        discussion: """
        virtchan defines and starts domains with a control and a data channel already wired, \
        talks to virtchan-agent inside the guest through them, and runs commands, copies files \
        and runs first-boot scripts without any network.

        The libvirt URI is --connect, else LIBVIRT_DEFAULT_URI, else qemu:///system. \
        Exit codes: 0 success; 1 error; 64 bad usage; for exec, the guest command's own code \
        (128+N when killed by signal N, 124 on --timeout, 125 when virtchan itself failed, \
        126 not executable, 127 command not found).
        """,
        version: "0.1.0",
        subcommands: [Create.self, ListDomains.self, Channels.self, XMLCommand.self, Destroy.self,
                      Wait.self, Ping.self, InfoCommand.self, Exec.self, Push.self, Pull.self,
                      Bootstrap.self])

    static func main() {
        var command: ParsableCommand
        do {
            command = try parseAsRoot()
        } catch {
            exitForUsage(error)
        }
        do {
            try command.run()
        } catch let code as ExitCode {
            // exec passing the guest's code through: nothing to print.
            Foundation.exit(code.rawValue)
        } catch let error as CLIError {
            report(error.message)
            Foundation.exit(error.exitCode)
        } catch let error as ProvisioningError {
            report(error.message)
            Foundation.exit(1)
        } catch let error as TransportError {
            report(error.message)
            // Interrupted: the status of a process that the signal ended, as a shell expects.
            Foundation.exit(error.signal.map { 128 + $0 } ?? 1)
        } catch {
            exitForUsage(error)
        }
    }

    /// Bad usage is one line and exit 64, as for every other error; --help and --version
    /// print as ArgumentParser formats them.
    static func exitForUsage(_ error: Error) -> Never {
        let code = exitCode(for: error)
        guard code.rawValue == 64 else { exit(withError: error) }
        let hint = fullMessage(for: error).split(separator: "\n").first { $0.contains("See '") }
            .map { " (" + $0.trimmingCharacters(in: .whitespaces).replacingOccurrences(of: " for more information.", with: "").lowercased() + ")" } ?? ""
        report(message(for: error) + hint)
        Foundation.exit(64)
    }

    static func report(_ message: String) {
        FileHandle.standardError.write(Data("virtchan: error: \(message)\n".utf8))
    }
}

/// A failure to report in one line, with the exit code it calls for.
struct CLIError: Error, CustomStringConvertible {
    var description: String { message }
    let message: String
    let exitCode: Int32
    init(_ message: String, exitCode: Int32 = 1) {
        self.message = message
        self.exitCode = exitCode
    }
}

struct GlobalOptions: ParsableArguments {
    @Option(name: [.customShort("c"), .long], help: "libvirt URI (default: $LIBVIRT_DEFAULT_URI or qemu:///system).")
    var connect: String?
    @Flag(help: "Use an agent that holds no key (anything that reaches its channel can drive it).")
    var insecureAgent = false

    func open() throws -> Connection { try Connection(uri: connect) }

    /// Endpoints are cached for the local system instance only, where libvirt's pid files
    /// tell whether an entry is still current.
    var endpointCache: EndpointCache? {
        (connect ?? Connection.defaultURI) == "qemu:///system" ? EndpointCache() : nil
    }
}

/// Where virtchan keeps its files: the system's directories for root, the user's own
/// (XDG base directories) for anyone else, each overridable by its variable.
enum Paths {
    static var stateBase: String { env("VIRTCHAN_STATE_DIR") ?? userState("domains") ?? "/var/lib/virtchan/domains" }
    /// The built-in guest, built by root and readable by everyone.
    static var imageDirectory: String { env("VIRTCHAN_IMAGE_DIR") ?? "/var/lib/virtchan/images" }
    static var cacheDirectory: String {
        env("VIRTCHAN_CACHE_DIR") ?? (isRoot ? "/var/cache/virtchan" : (env("XDG_CACHE_HOME") ?? home + "/.cache") + "/virtchan")
    }
    /// Each domain's own initramfs, carrying its agent key (its owner's, 0600, in a 0711 directory).
    static var bootDirectory: String { env("VIRTCHAN_BOOT_DIR") ?? userState("boot") ?? "/var/lib/virtchan/boot" }
    static func stateDirectory(for domain: String) -> String { stateBase + "/" + domain }

    private static var isRoot: Bool { geteuid() == 0 }
    private static var home: String { env("HOME") ?? "/tmp" }
    private static func userState(_ name: String) -> String? {
        isRoot ? nil : (env("XDG_STATE_HOME") ?? home + "/.local/state") + "/virtchan/" + name
    }

    private static func env(_ key: String) -> String? {
        guard let v = ProcessInfo.processInfo.environment[key], !v.isEmpty else { return nil }
        return v
    }
}

/// A running managed domain and where its agent listens.
struct ResolvedDomain {
    let domain: Domain
    let metadata: VirtchanMetadata?
    let channels: [ChannelInfo]
    let endpoint: AgentEndpoint
}

enum Resolve {
    static func running(_ name: String, _ global: GlobalOptions) throws -> ResolvedDomain {
        let conn = try global.open()
        let domain = try conn.requireDomain(name)
        // One RPC for everything: the live XML has the channels, the metadata and, while the
        // domain runs, its id.
        let doc = try XMLDocument(parsing: try domain.xml(), name: "the domain XML")
        guard doc.string("string(/domain/@id)") != nil else {
            throw CLIError("domain \(name) is not running (start it with: virsh start \(name))")
        }
        let channels = ChannelResolver.channels(in: doc)
        let meta = VirtchanMetadata(domainDocument: doc)
        let controlName = meta?.controlChannel ?? ChannelNames.control
        let dataName = meta?.dataChannel ?? ChannelNames.data
        guard let control = channels.first(where: { $0.name == controlName }) else {
            throw CLIError("domain \(name) has no \(controlName) channel; create it with virtchan create, or add the channel to its XML")
        }
        guard let controlPath = control.path else {
            throw CLIError("the \(controlName) channel of \(name) is not a unix socket channel")
        }
        guard global.connect == nil || conn.isLocal else {
            throw CLIError("\(conn.uri) is not on this host; run virtchan on the host that runs \(name)")
        }
        let console = doc.string("string(/domain/devices/serial[@type='file']/source/@path)")
        let endpoint = AgentEndpoint(domain: name, controlSocket: controlPath,
                                     dataSocket: channels.first(where: { $0.name == dataName })?.path,
                                     consoleLog: console)
        global.endpointCache?.store(endpoint)
        return ResolvedDomain(domain: domain, metadata: meta, channels: channels, endpoint: endpoint)
    }

    /// A session with the agent in `name`. The endpoint comes from the cache when the domain's
    /// QEMU process is the one it was recorded for (no libvirt involved), else from libvirt.
    static func session(_ name: String, _ global: GlobalOptions, timeout: Double = 10) throws -> AgentSession {
        if let cached = global.endpointCache?.lookup(name) {
            do {
                return try connect(cached, global, timeout: timeout)
            } catch let error as TransportError where error.code == .unreachable {
                // The socket moved or vanished (a channel was unplugged): ask libvirt.
                global.endpointCache?.remove(name)
            }
        }
        let resolved = try running(name, global)
        return try connect(resolved.endpoint, global, timeout: timeout)
    }

    /// Connects with the domain's key, from its private state directory; an agent without a
    /// key is accepted only for a domain created with --insecure-agent or with that flag now.
    private static func connect(_ endpoint: AgentEndpoint, _ global: GlobalOptions, timeout: Double) throws -> AgentSession {
        var endpoint = endpoint
        endpoint.loadCredentials(stateDirectory: Paths.stateDirectory(for: endpoint.domain), allowUnkeyed: global.insecureAgent)
        let session = try AgentSession.connect(endpoint, timeout: timeout)
        if session.hello.challenge.isEmpty {
            FileHandle.standardError.write(Data("virtchan: warning: the agent in \(endpoint.domain) holds no key; anything that reaches its channel can drive it\n".utf8))
        }
        return session
    }
}

func printJSON<T: Encodable>(_ value: T) throws {
    let encoder = JSONEncoder()
    encoder.outputFormatting = [.prettyPrinted, .sortedKeys, .withoutEscapingSlashes]
    let data = try encoder.encode(value)
    FileHandle.standardOutput.write(data)
    FileHandle.standardOutput.write(Data("\n".utf8))
}

/// A table with left-aligned columns, as virsh prints them.
func printTable(_ header: [String], _ rows: [[String]]) {
    var widths = header.map(\.count)
    for row in rows { for (i, cell) in row.enumerated() { widths[i] = max(widths[i], cell.count) } }
    func line(_ cells: [String]) -> String {
        cells.enumerated().map { i, c in i == cells.count - 1 ? c : c.padding(toLength: widths[i], withPad: " ", startingAt: 0) }
            .joined(separator: "  ")
    }
    print(line(header))
    for row in rows { print(line(row)) }
}

extension Accelerator: ExpressibleByArgument {}

/// A status line on stdout, written at once: streamed guest output goes out unbuffered too,
/// and the two must not change order when stdout is a pipe or a file.
func say(_ line: String) {
    FileHandle.standardOutput.write(Data((line + "\n").utf8))
}
