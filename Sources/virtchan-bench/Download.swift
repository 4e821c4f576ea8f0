import Foundation
import VirtchanKit

/// One HTTP/1.0 download from 127.0.0.1:`port`: the bytes received (headers included), and
/// the monotonic times in seconds of the first and the last.
func httpDownload(port: UInt16, path: String) -> (bytes: Int, first: Double, last: Double) {
    func clock() -> Double { Double(monotonicNanos()) / 1e9 }
    guard let (fd, inProgress) = try? TcpSocket.connect(host: "127.0.0.1", port: port) else { return (0, 0, 0) }
    defer { close(fd) }
    if inProgress {
        var p = pollfd(fd: fd, events: Int16(POLLOUT), revents: 0)
        _ = poll(&p, 1, 5000)
    }
    _ = fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) & ~O_NONBLOCK)
    guard Array("GET /\(path) HTTP/1.0\r\n\r\n".utf8).withUnsafeBytes({ writeFully(fd, $0) }) else { return (0, 0, 0) }
    let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 1 << 20, alignment: 16)
    defer { buffer.deallocate() }
    var got = 0, first = 0.0
    while true {
        let n = read(fd, buffer.baseAddress!, buffer.count)
        if n <= 0 { break }
        if got == 0 { first = clock() }
        got += n
    }
    return (got, first, clock())
}

/// `count` downloads of `path` at once: every result.
func httpDownloads(port: UInt16, path: String, count: Int) -> [(bytes: Int, first: Double, last: Double)] {
    final class Box: @unchecked Sendable {
        var runs: [(bytes: Int, first: Double, last: Double)] = []
        let lock = NSLock()
    }
    let box = Box()
    let group = DispatchGroup()
    for _ in 0..<count {
        group.enter()
        Thread.detachNewThread {
            let r = httpDownload(port: port, path: path)
            box.lock.lock()
            box.runs.append(r)
            box.lock.unlock()
            group.leave()
        }
    }
    group.wait()
    return box.runs
}
