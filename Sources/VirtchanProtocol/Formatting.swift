/// A duration for a message to a person: whole seconds, or to a tenth.
public func formatSeconds(_ s: Double) -> String {
    // To a tenth: a timeout that went through a deadline reads 10 s, not 9.99999988079071 s.
    let tenths = (s * 10).rounded()
    return tenths.truncatingRemainder(dividingBy: 10) == 0 ? "\(Int(tenths / 10)) s" : "\(tenths / 10) s"
}

/// `word` as a shell reads it back in a command that a message suggests: as it is when it
/// holds nothing a shell treats specially (`qemu:///system`, `vm1`), else in single quotes
/// (`'qemu+ssh://host/system?keyfile=k&no_tty=1'`).
public func shellWord(_ word: String) -> String {
    let plain = !word.isEmpty && word.utf8.allSatisfy { byte in
        switch byte {
        case UInt8(ascii: "a")...UInt8(ascii: "z"), UInt8(ascii: "A")...UInt8(ascii: "Z"), UInt8(ascii: "0")...UInt8(ascii: "9"):
            return true
        default:
            return "_@%+=:,./-".utf8.contains(byte)
        }
    }
    if plain { return word }
    var quoted = "'"
    for character in word { quoted += character == "'" ? "'\\''" : String(character) }
    return quoted + "'"
}
