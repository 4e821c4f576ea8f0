/// A duration for a message to a person: whole seconds, or to a tenth.
public func formatSeconds(_ s: Double) -> String {
    // To a tenth: a timeout that went through a deadline reads 10 s, not 9.99999988079071 s.
    let tenths = (s * 10).rounded()
    return tenths.truncatingRemainder(dividingBy: 10) == 0 ? "\(Int(tenths / 10)) s" : "\(tenths / 10) s"
}
