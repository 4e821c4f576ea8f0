/// A string from the guest made fit for the host's terminal and logs: at most `limit` bytes,
/// with control characters (escape sequences, carriage returns) shown as `\u{..}` escapes, so
/// a guest cannot move the cursor, retitle the window or hide text on the host.
public func displaySafe(_ text: String, limit: Int = 4096) -> String {
    var out = ""
    var bytes = 0
    for scalar in text.unicodeScalars {
        let piece: String
        switch scalar.value {
        case 0x09: piece = "\t"
        case 0x00..<0x20, 0x7F..<0xA0: piece = "\\u{\(String(scalar.value, radix: 16))}"
        default: piece = String(scalar)
        }
        bytes += piece.utf8.count
        if bytes > limit { return out + "…" }
        out += piece
    }
    return out
}
