import CSpawn
import Glibc
import VirtchanProtocol

/// TIOCSPTLCK and TIOCGPTN (asm-generic ioctls), macros Swift cannot import.
private let tiocSPTLCK: UInt = 0x4004_5431
private let tiocGPTN: UInt = 0x8004_5430

/// A process started for the host, with its pipes (or pty) and what is left to forward.
final class ExecProcess {
    let id: UInt32
    let pid: pid_t
    let tty: Bool
    var stdinFD: Int32
    var stdoutFD: Int32
    var stderrFD: Int32
    var stdinBuffer: [UInt8] = []
    var stdinEOF = false
    /// The host sends stdin within `ExecLimits.inputWindow` (execStartInputWindow).
    var inputWindowed = false
    /// Stdin bytes the host sent, and of those, how many the agent has acknowledged as taken:
    /// what is neither still buffered nor acknowledged left the buffer since the last
    /// execInputWindow.
    var inputReceived = 0
    var inputAcknowledged = 0
    var exit: ExecExit?
    var exitedAt: UInt64 = 0
    /// The host asked to stop forwarding this process's output for now (execFlow): its
    /// reader is behind, and other requests on the session must not wait for it.
    var outputPaused = false

    init(id: UInt32, pid: pid_t, tty: Bool, stdin: Int32, stdout: Int32, stderr: Int32) {
        self.id = id
        self.pid = pid
        self.tty = tty
        stdinFD = stdin
        stdoutFD = stdout
        stderrFD = stderr
    }

    var outputOpen: Bool { stdoutFD >= 0 || stderrFD >= 0 }

    func closeStdin() {
        if stdinFD >= 0 && stdinFD != stdoutFD { close(stdinFD) }
        stdinFD = -1
        stdinBuffer = []
    }

    func closeOutput(_ stream: ExecStream) {
        switch stream {
        case .stdout:
            if stdoutFD >= 0 { if stdoutFD == stdinFD { stdinFD = -1; stdinBuffer = [] }; close(stdoutFD) }
            stdoutFD = -1
        case .stderr:
            if stderrFD >= 0 { close(stderrFD) }
            stderrFD = -1
        }
    }

    func closeAll() {
        closeStdin()
        closeOutput(.stdout)
        closeOutput(.stderr)
    }

    /// Sends a signal to the process group the child leads.
    func signal(_ sig: Int32) {
        if exit == nil { kill(-pid, sig) }
    }
}

struct SpawnFailure: Error {
    let code: RemoteErrorCode
    let errno: Int32
    let message: String
}

enum Spawner {
    static let defaultPath = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    /// Every command's environment before its terminal's TERM and its own entries.
    private static let baseEnvironment = ["PATH": defaultPath, "HOME": "/root"]
    /// The base environment as `envp`, for a command that brings none and has no terminal:
    /// made once, never freed, never written to.
    nonisolated(unsafe) private static let defaultEnvironment: [UnsafeMutablePointer<CChar>?] =
        baseEnvironment.map { strdup("\($0.key)=\($0.value)") } + [nil]

    /// Dispositions a child must not inherit: every signal with a handler here (the handler
    /// would be the agent's code, which the child cannot run), and those the agent ignores or
    /// handles that programs expect at their default. Taken at the first spawn: the agent's
    /// handlers (and the Swift runtime's) are in place before it serves anything.
    private static let resetSignals: sigset_t = {
        var set = sigset_t()
        sigemptyset(&set)
        vc_add_handled_signals(&set)
        for sig in [SIGPIPE, SIGCHLD, SIGIO, SIGTERM, SIGINT, SIGHUP, SIGQUIT] { sigaddset(&set, sig) }
        return set
    }()

    /// The base environment with the terminal's TERM and what `request` sets over it.
    private static func environment(of request: ExecStart) throws(SpawnFailure) -> [String: String] {
        var env = baseEnvironment
        if request.tty { env["TERM"] = "xterm-256color" }
        for item in request.env {
            guard let eq = item.firstIndex(of: "="), eq != item.startIndex else {
                throw SpawnFailure(code: .badRequest, errno: 0, message: "environment entry '\(item)' is not KEY=VALUE")
            }
            env[String(item[..<eq])] = String(item[item.index(after: eq)...])
        }
        return env
    }

    /// Starts `request`'s command. With `noInput` (and no tty), its stdin is /dev/null and it
    /// has no stdin pipe.
    static func spawn(_ request: ExecStart, id: UInt32, noInput: Bool = false, stdio: StdioReserve) throws(SpawnFailure) -> ExecProcess {
        guard let command = request.argv.first, !command.isEmpty else {
            throw SpawnFailure(code: .badRequest, errno: 0, message: "no command given")
        }
        // A command that brings no environment of its own (the usual case) gets the base one,
        // made once.
        let env = request.tty || !request.env.isEmpty ? try environment(of: request) : nil

        // The agent's ends, and the child's ends (closed here once the child has them).
        var parentFDs: [Int32] = []
        var childFDs: [Int32] = []
        func cleanup() {
            for fd in parentFDs { close(fd) }
            for fd in childFDs { close(fd) }
        }
        var stdinParent: Int32 = -1, stdoutParent: Int32 = -1, stderrParent: Int32 = -1
        var childStdio: [Int32] = [-1, -1, -1]
        var slavePath: String?
        if request.tty {
            let master = open("/dev/ptmx", O_RDWR | O_NOCTTY | O_CLOEXEC)
            var unlock: Int32 = 0
            var number: UInt32 = 0
            guard master >= 0, ioctl(master, tiocSPTLCK, &unlock) == 0, ioctl(master, tiocGPTN, &number) == 0 else {
                let e = errno
                if master >= 0 { close(master) }
                throw SpawnFailure(code: .failed, errno: e, message: "cannot allocate a pseudo-terminal: \(errnoText(e))")
            }
            slavePath = "/dev/pts/\(number)"
            var size = winsize(ws_row: request.rows, ws_col: request.cols, ws_xpixel: 0, ws_ypixel: 0)
            _ = ioctl(master, UInt(TIOCSWINSZ), &size)
            parentFDs.append(master)
            stdinParent = master
            stdoutParent = master
        } else {
            var streams = [(0, false), (1, true), (2, true)]
            if noInput {
                let null = stdio.nullInput()
                if null >= 0 {
                    childStdio[0] = null
                    streams.removeFirst()
                }
                // Without /dev/null, a pipe whose write end goes at once reads as empty all the same.
            }
            for (childFD, parentReads) in streams {
                guard let p = parentReads ? stdio.outputPipe() : makePipe() else {
                    let e = errno
                    cleanup()
                    throw SpawnFailure(code: .failed, errno: e, message: "pipe: \(errnoText(e))")
                }
                let (parentEnd, childEnd) = parentReads ? (p.read, p.write) : (p.write, p.read)
                parentFDs.append(parentEnd)
                childFDs.append(childEnd)
                childStdio[childFD] = childEnd
                switch childFD {
                case 0: stdinParent = parentEnd
                case 1: stdoutParent = parentEnd
                default: stderrParent = parentEnd
                }
            }
        }

        let argv = request.argv.map { strdup($0) } + [nil]
        let envp = env.map { $0.map { strdup("\($0.key)=\($0.value)") } + [nil] } ?? Self.defaultEnvironment
        defer {
            for p in argv { free(p) }
            if env != nil { for p in envp { free(p) } }
        }
        var pid: pid_t = 0
        var stage: Int32 = 0
        let rc = command.withCString { file in
            (env.map { $0["PATH"] ?? "" } ?? defaultPath).withCString { searchPath in
                // An empty cwd is the root, as the protocol says, whatever the agent's own.
                (request.cwd.isEmpty ? "/" : request.cwd).withCString { cwd in
                    withOptionalCString(slavePath) { tty in
                        withUnsafePointer(to: Self.resetSignals) { reset in
                            argv.withUnsafeBufferPointer { av in
                                envp.withUnsafeBufferPointer { ev in
                                    var spawnRequest = vc_spawn_request(
                                        file: file, search_path: searchPath, argv: av.baseAddress, envp: ev.baseAddress,
                                        cwd: cwd, tty: tty, stdin_fd: childStdio[0], stdout_fd: childStdio[1],
                                        stderr_fd: childStdio[2], reset: reset)
                                    return vc_spawn(&spawnRequest, &pid, &stage)
                                }
                            }
                        }
                    }
                }
            }
        }
        for fd in childFDs { close(fd) }
        childFDs = []
        guard rc == 0 else {
            cleanup()
            switch (Int(stage), rc) {
            case (VC_SPAWN_CWD, _):
                throw SpawnFailure(code: remoteCode(forErrno: rc), errno: rc, message: "cannot change to \(request.cwd): \(errnoText(rc))")
            case (VC_SPAWN_STDIO, _):
                throw SpawnFailure(code: .failed, errno: rc, message: "cannot give \(command) its standard streams: \(errnoText(rc))")
            case (VC_SPAWN_FORK, _):
                throw SpawnFailure(code: .failed, errno: rc, message: "cannot start \(command): \(errnoText(rc))")
            case (_, ENOENT):
                throw SpawnFailure(code: .commandNotFound, errno: rc, message: "\(command): command not found")
            case (_, EACCES), (_, EPERM):
                throw SpawnFailure(code: .permission, errno: rc, message: "\(command): permission denied")
            default:
                throw SpawnFailure(code: .failed, errno: rc, message: "\(command): \(errnoText(rc))")
            }
        }
        if noInput && !request.tty && stdinParent >= 0 {
            parentFDs.removeAll { $0 == stdinParent }
            close(stdinParent)
            stdinParent = -1
        }
        // The output pipes' ends come non-blocking from the reserve; stdin's end (the pty's,
        // with a terminal) is set here.
        if stdinParent >= 0 { setNonBlocking(stdinParent) }
        return ExecProcess(id: id, pid: pid, tty: request.tty, stdin: stdinParent, stdout: stdoutParent, stderr: stderrParent)
    }
}

/// The descriptors commands' standard streams are made of, made ahead of need. Under TCG, two
/// pipes and an open of /dev/null cost the agent a third of a millisecond between a request
/// and its process start; so one /dev/null stays open for every command started with no input,
/// and the next command's output pipes are made while the agent has nothing else to do
/// (``refill()``). Every descriptor here is close-on-exec: no command inherits the reserve.
final class StdioReserve {
    /// Output pipes (stdout and stderr) kept ready: one command's worth.
    private static let depth = 2
    private var devNull: Int32 = -1
    private var pipes: [(read: Int32, write: Int32)] = []

    /// /dev/null for reading, opened once; -1 when it cannot be opened.
    func nullInput() -> Int32 {
        if devNull < 0 { devNull = open("/dev/null", O_RDONLY | O_CLOEXEC) }
        return devNull
    }

    /// A pipe for a command's output: the agent's read end non-blocking, the write end (the
    /// command's) blocking. From the reserve, or made now when it is empty.
    func outputPipe() -> (read: Int32, write: Int32)? {
        pipes.popLast() ?? Self.makeOutputPipe()
    }

    /// Tops the reserve up.
    func refill() {
        _ = nullInput()
        while pipes.count < Self.depth, let p = Self.makeOutputPipe() { pipes.append(p) }
    }

    private static func makeOutputPipe() -> (read: Int32, write: Int32)? {
        guard let p = makePipe() else { return nil }
        // F_SETFL ignores the access mode: O_NONBLOCK is then the only status flag set.
        _ = fcntl(p.read, F_SETFL, O_NONBLOCK)
        return p
    }
}

/// Runs `body` with a C string of `text`, or with nil.
private func withOptionalCString<R>(_ text: String?, _ body: (UnsafePointer<CChar>?) -> R) -> R {
    guard let text else { return body(nil) }
    return text.withCString { body($0) }
}
