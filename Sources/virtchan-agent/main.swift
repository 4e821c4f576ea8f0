import Glibc
import VirtchanAgentCore
import VirtchanProtocol

let usage = """
USAGE: virtchan-agent [options]

The virtchan guest agent. It finds its virtio-serial ports by name through
/sys/class/virtio-ports, serves ping, info, exec and file transfers on the control
port, and opens the data port only while a file moves.

OPTIONS:
  --control NAME     name of the control port (default: org.virtchan.control)
  --data NAME        name of the data port (default: org.virtchan.data)
  --config FILE      exec policy file (default: /etc/virtchan-agent.conf, if present)
                     lines: exec = allow|deny, exec-allow = CMD..., exec-deny = CMD...
  --key FILE         the domain's key, 64 hex digits (default: /etc/virtchan/agent.key,
                     if present); with a key, only a host that proves it is served
  --log FILE         append the log to FILE instead of stderr
  --sysfs DIR        where to look for ports (default: /sys/class/virtio-ports)
  --list-ports       print the ports found, one "name device" per line, and exit
  --verbose          log every request
  --version          print the version and exit
  -h, --help         show this help
"""

func die(_ message: String, code: Int32 = 2) -> Never {
    var line = Array("virtchan-agent: \(message)\n".utf8)
    _ = line.withUnsafeMutableBytes { write(2, $0.baseAddress!, $0.count) }
    exit(code)
}

var options = AgentOptions()
var configPath = "/etc/virtchan-agent.conf"
var configRequired = false
var keyPath = AgentKey.guestPath
var keyRequired = false
var listPorts = false
var sysfsRoot = PortDiscovery.defaultSysfsRoot
var args = CommandLine.arguments.dropFirst()
while let arg = args.popFirst() {
    func value() -> String {
        guard let v = args.popFirst() else { die("\(arg) needs a value (see --help)") }
        return v
    }
    switch arg {
    case "--control": options.controlPort = value()
    case "--data": options.dataPort = value()
    case "--config": configPath = value(); configRequired = true
    case "--key": keyPath = value(); keyRequired = true
    case "--log": options.logPath = value()
    case "--sysfs": sysfsRoot = value()
    case "--list-ports": listPorts = true
    case "--verbose", "-v": options.verbose = true
    case "--version": print("virtchan-agent \(agentVersion)"); exit(0)
    case "-h", "--help": print(usage); exit(0)
    default: die("unknown option \(arg) (see --help)")
    }
}

options.ports = VirtioPortOpener(sysfsRoot: sysfsRoot)
if listPorts {
    for port in options.ports.available() { print("\(port.name) \(port.location)") }
    exit(0)
}

if access(configPath, F_OK) == 0 {
    guard let text = readSmallFile(configPath) else { die("cannot read \(configPath)") }
    do {
        options.policy = try ExecPolicy(parsing: text)
    } catch {
        die("\(configPath): \(error)")
    }
} else if configRequired {
    die("cannot read \(configPath)")
}

// A key file that is there but unusable stops the agent: serving without it would open the
// guest to anyone who reaches its port.
if access(keyPath, F_OK) == 0 {
    guard let text = readSmallFile(keyPath), let key = AgentKey(fileText: text) else {
        die("\(keyPath) does not hold a key (64 hex digits)")
    }
    options.key = key
} else if keyRequired {
    die("cannot read \(keyPath)")
}

// One session may run up to 1024 processes and forward up to 1024 connections, a few
// descriptors each: take what the system allows beyond the usual soft limit of 1024.
var files = rlimit()
if getrlimit(Int32(RLIMIT_NOFILE.rawValue), &files) == 0 && files.rlim_cur < files.rlim_max {
    files.rlim_cur = min(files.rlim_max, 65536)
    _ = setrlimit(Int32(RLIMIT_NOFILE.rawValue), &files)
}
exit(Agent(options: options).run())
