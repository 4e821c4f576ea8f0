import VirtchanProtocol

/// Each message decoder on a bare payload; the first byte picks the frame type.
@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzMessages(_ data: UnsafePointer<UInt8>, _ size: Int) -> CInt {
    guard size > 0 else { return 0 }
    let bytes = Array(UnsafeBufferPointer(start: data, count: size))
    let types = MessageType.allCases
    let type = types[Int(bytes[0]) % types.count]
    decodeEveryMessage(Frame(type, id: 1, payload: Array(bytes.dropFirst())))
    return 0
}
