import Foundation
import VirtchanFileTransfer
import VirtchanTransport

/// A one-line progress bar on stderr: bytes, rate, ETA. Silent unless stderr is a terminal.
final class ProgressBar {
    private let label: String
    private let enabled: Bool
    private let start = Date()
    private var lastDraw = Date.distantPast
    private var drawn = false

    init(label: String, enabled: Bool = isatty(2) == 1) {
        self.label = label
        self.enabled = enabled
    }

    func update(_ done: UInt64, _ total: UInt64) {
        guard enabled else { return }
        let now = Date()
        guard now.timeIntervalSince(lastDraw) >= 0.1 || done == total else { return }
        lastDraw = now
        let elapsed = max(now.timeIntervalSince(start), 0.001)
        let rate = Double(done) / elapsed
        let fraction = total > 0 ? Double(done) / Double(total) : 1
        let width = 24
        let filled = Int(fraction * Double(width))
        let bar = String(repeating: "=", count: filled) + String(repeating: " ", count: width - filled)
        let eta = rate > 0 && total > done ? Int(Double(total - done) / rate) : 0
        let line = String(format: "\r%@ [%@] %3d%% %@/%@ %@/s ETA %d:%02d", label, bar, Int(fraction * 100),
                          bytes(done), bytes(total), bytes(UInt64(rate)), eta / 60, eta % 60)
        FileHandle.standardError.write(Data(line.utf8))
        drawn = true
    }

    func finish() {
        if drawn { FileHandle.standardError.write(Data("\n".utf8)) }
    }
}

/// One bar per upload: drawn from its first chunk, ended by its last or by the next line.
final class UploadBars {
    private var bar: ProgressBar?

    func update(_ done: UInt64, _ total: UInt64) {
        let current = bar ?? ProgressBar(label: "upload")
        bar = current
        current.update(done, total)
        if done == total { end() }
    }

    func end() {
        bar?.finish()
        bar = nil
    }
}

func bytes(_ n: UInt64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"]
    var v = Double(n)
    var i = 0
    while v >= 1024 && i < units.count - 1 { v /= 1024; i += 1 }
    return i == 0 ? "\(n) B" : String(format: "%.1f %@", v, units[i])
}

/// What a tree copy moved, as its summary line starts.
func describe(_ tree: TreeSummary) -> String {
    "\(tree.files) files, \(tree.directories) directories, \(tree.symlinks) symlinks (\(bytes(tree.bytes)))"
        + (tree.skipped > 0 ? ", \(tree.skipped) skipped" : "")
}
