import VirtchanProtocol

/// The frame reader on arbitrary bytes, fed in pieces whose sizes come from the input, and
/// every decoded frame through the decoder of every message type.
@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzFrames(_ data: UnsafePointer<UInt8>, _ size: Int) -> CInt {
    let bytes = Array(UnsafeBufferPointer(start: data, count: size))
    let decoder = FrameDecoder(maxPayload: FrameLimits.maxPayload)
    var offset = 0
    var step: UInt = 1
    while offset < bytes.count {
        let n = min(bytes.count - offset, 1 + Int(step % 97))
        decoder.feed(Array(bytes[offset..<offset + n]))
        offset += n
        step = step &* 31 &+ UInt(bytes[offset - 1])
        while let frame = decoder.next() { decodeEveryMessage(frame) }
    }
    return 0
}
