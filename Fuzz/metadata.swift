import VirtchanProvisioning

/// The domain metadata parser on arbitrary text (anyone who may edit a domain's XML writes it).
@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzMetadata(_ data: UnsafePointer<UInt8>, _ size: Int) -> CInt {
    let text = String(decoding: UnsafeBufferPointer(start: data, count: size), as: UTF8.self)
    if let meta = VirtchanMetadata(elementXML: text) {
        // What was read must survive a round trip through the element it writes.
        precondition((try? meta.elementXML()).flatMap { VirtchanMetadata(elementXML: $0) } == meta)
    }
    return 0
}
