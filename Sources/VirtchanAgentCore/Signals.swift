import Glibc
import VirtchanProtocol

nonisolated(unsafe) private var signalPipeWriteEnd: Int32 = -1

/// The self-pipe the poll loop watches: each caught signal becomes one byte holding its number.
enum SignalPipe {
    static func install(_ signals: [Int32]) -> Int32 {
        guard let fds = makePipe(nonBlocking: true) else { return -1 }
        signalPipeWriteEnd = fds.write
        for sig in signals {
            var action = sigaction()
            action.__sigaction_handler.sa_handler = { sig in
                let saved = errno
                var byte = UInt8(truncatingIfNeeded: sig)
                _ = write(signalPipeWriteEnd, &byte, 1)
                errno = saved
            }
            action.sa_flags = SA_RESTART
            sigemptyset(&action.sa_mask)
            sigaction(sig, &action, nil)
        }
        signal(SIGPIPE, SIG_IGN)
        return fds.read
    }

    /// The signal numbers that arrived since the last call.
    static func drain(_ fd: Int32) -> [Int32] {
        var out: [Int32] = []
        var buf = [UInt8](repeating: 0, count: 64)
        while true {
            let n = buf.withUnsafeMutableBytes { read(fd, $0.baseAddress!, $0.count) }
            if n <= 0 { break }
            out.append(contentsOf: buf[0..<n].map { Int32($0) })
        }
        return out
    }
}
