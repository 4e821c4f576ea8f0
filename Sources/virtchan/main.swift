import Glibc
import VirtchanProtocol
import VirtchanTransport

// `virtchan exec NAME -- COMMAND` is served here, by a program with no Foundation, no argument
// parser and no libvirt, which starts in a third of the time the full program takes: through
// the domain's session holder when it runs, and otherwise through one it starts, as
// virtchan-full would, when the domain is one of this host's that the endpoint cache knows.
// Every other command line, and an exec that needs libvirt, goes unchanged to virtchan-full,
// the program beside this one.

/// Runs virtchan-full with this command line in place of this process.
func handOver() -> Never {
    var path = [CChar](repeating: 0, count: Int(PATH_MAX) + 1)
    let n = readlink("/proc/self/exe", &path, Int(PATH_MAX))
    let me = n > 0 ? String(decoding: path[..<n].map { UInt8(bitPattern: $0) }, as: UTF8.self) : CommandLine.arguments[0]
    let full = (me.lastIndex(of: "/").map { String(me[..<$0]) } ?? ".") + "/virtchan-full"
    // The words as given, byte for byte; only the program's name changes.
    CommandLine.unsafeArgv[0] = strdup(full)
    execv(full, CommandLine.unsafeArgv)
    writeStderrLine("virtchan: error: cannot run \(full): \(String(cString: strerror(errno))) (virtchan-full is installed beside virtchan)")
    exit(1)
}

/// Whether a holder of a domain named like `name` runs for another URI (this machine reached
/// as qemu:///system and as qemu+tcp://localhost, say): virtchan-full then tells, when the
/// channel turns out to be kept, which one keeps it.
func anotherHolderMayKeep(_ name: String, besides socket: String) -> Bool {
    let prefix = HolderFiles.stemPrefix(name: name)
    guard let dir = opendir(HolderFiles.directory) else { return false }
    defer { closedir(dir) }
    while let entry = readdir(dir) {
        let file = withUnsafeBytes(of: entry.pointee.d_name) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
        guard file.hasPrefix(prefix), file.hasSuffix(".sock.lock") else { continue }
        let other = HolderFiles.directory + "/" + file.dropLast(".lock".count)
        if other != socket && BackgroundProcess.isLocked(other, files: HolderProcess.files) { return true }
    }
    return false
}

/// Starts the holder of `command`'s domain on qemu:///system from the endpoint cache, and
/// returns this command's session through it; nil when virtchan-full must do it (the cache
/// does not know the domain, its socket is gone, another command is starting a holder, or one
/// of another URI may keep the channel).
func startHolder(_ command: ExecCommandLine, uri: String, through endpoint: AgentEndpoint) throws(TransportError) -> AgentSession? {
    let name = command.name
    let socket = HolderFiles.socket(uri: uri, name: name)
    guard uri == "qemu:///system", var cached = EndpointCache().lookup(name),
          !anotherHolderMayKeep(name, besides: socket) else { return nil }
    cached.key = endpoint.key
    cached.allowsUnkeyedAgent = endpoint.allowsUnkeyedAgent
    var pipeFDs: [Int32] = [-1, -1]
    guard pipe(&pipeFDs) == 0 else { throw TransportError.system("pipe") }
    for fd in pipeFDs { _ = fcntl(fd, F_SETFD, FD_CLOEXEC) }
    defer { close(pipeFDs[0]) }
    makePrivateDirectories(HolderFiles.directory)
    let log = socket + ".log"
    let timeout = 10.0
    let holder = try HolderProcess.fork(log: log, readyPipe: pipeFDs) { ready, starter in
        var options = SessionHolder.Options()
        options.persist = command.persist
        return HolderProcess.serve(name, uri: uri, options: options, ready: ready, starter: starter,
                                   open: { try .local(cached, timeout: timeout) },
                                   failureLine: { BackgroundProcess.errorLine($0 as? TransportError ?? TransportError(.io, "\($0)")) })
    }
    do {
        let line = try BackgroundProcess.readyLine(pipeFDs[0], timeout: timeout + 5, accepting: ["ready", "held"],
                                                   what: "the session holder of \(name)", log: log,
                                                   decode: BackgroundProcess.transportError(fromLine:))
        // "held": another command started a holder meanwhile; virtchan-full uses that one.
        guard line == "ready" else {
            close(holder.link)
            reap(holder.pid)
            return nil
        }
    } catch {
        close(holder.link)
        let failure = error as? TransportError ?? TransportError(.io, "\(error)")
        guard failure.code == .unreachable else { throw failure }
        // The cached socket is gone (the domain restarted): virtchan-full asks libvirt, once
        // this holder has let go of everything it took.
        reap(holder.pid)
        return nil
    }
    return try AgentSession.connect(endpoint, holderLink: holder.link, timeout: timeout)
}

/// Waits for a holder that ended before serving, so that virtchan-full, which takes this
/// process's place, inherits no child.
func reap(_ pid: pid_t) {
    var status: Int32 = 0
    while waitpid(pid, &status, 0) < 0 && errno == EINTR {}
}

guard let command = ExecCommandLine(quickForm: CommandLine.arguments.dropFirst()) else { handOver() }
let uri = command.connect ?? LibvirtURI.standard
let endpoint = AgentEndpoint.throughHolder(of: command.name, on: uri, paths: .current, allowUnkeyed: command.insecureAgent)
var session: AgentSession?
do {
    do {
        session = try AgentSession.connect(endpoint, timeout: 10)
    } catch where error.code == .unreachable {
        // No holder, or the socket of one that died.
        session = try startHolder(command, uri: uri, through: endpoint)
    }
} catch {
    writeStderrLine("virtchan: error: \(error)")
    exit(125)
}
guard let session else { handOver() }
if let warning = session.unkeyedWarning { writeStderrLine("virtchan: " + warning) }
let ending = ExecCommandLine.run(session, command.options)
if let message = ending.message { writeStderrLine("virtchan: error: " + message) }
exit(ending.status)
