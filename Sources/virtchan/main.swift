import Glibc
import VirtchanProtocol
import VirtchanTransport

// `virtchan exec NAME -- COMMAND` on a domain whose session holder is running is served here,
// by a program with no Foundation, no argument parser and no libvirt, which starts in a third
// of the time the full program takes. Every other command line, and an exec that needs a
// holder started, goes unchanged to virtchan-full, the program beside this one.

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

guard let command = ExecCommandLine(quickForm: CommandLine.arguments.dropFirst()) else { handOver() }
let uri = command.connect ?? LibvirtURI.standard
// No holder: handed over before anything else is read.
guard access(HolderFiles.socket(uri: uri, name: command.name), F_OK) == 0 else { handOver() }
let endpoint = AgentEndpoint.throughHolder(of: command.name, on: uri, paths: .current, allowUnkeyed: command.insecureAgent)
let session: AgentSession
do {
    session = try AgentSession.connect(endpoint, timeout: 10)
} catch where error.code == .unreachable {
    // No holder, or the socket of one that died: starting one is the full program's work.
    handOver()
} catch {
    writeStderrLine("virtchan: error: \(error)")
    exit(125)
}
if let warning = session.unkeyedWarning { writeStderrLine("virtchan: " + warning) }
let ending = ExecCommandLine.run(session, command.options)
if let message = ending.message { writeStderrLine("virtchan: error: " + message) }
exit(ending.status)
