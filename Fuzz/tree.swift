import VirtchanProtocol

/// Tree listings as a pull checks them: decode a batch, then validate every path and bound.
@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzTree(_ data: UnsafePointer<UInt8>, _ size: Int) -> CInt {
    let bytes = Array(UnsafeBufferPointer(start: data, count: size))
    _ = isSafeRelativePath(String(decoding: bytes, as: UTF8.self))
    guard let batch = try? TreeEntries.decode(Frame(.treeEntries, id: 1, payload: bytes)) else { return 0 }
    var nameBytes = 0
    for e in batch.entries {
        let safe = isSafeRelativePath(e.path)
        nameBytes += e.path.utf8.count + e.linkTarget.utf8.count
        // A path that passes may never lead outside the tree.
        if safe {
            precondition(!e.path.hasPrefix("/") && !e.path.split(separator: "/", omittingEmptySubsequences: false).contains(".."))
        }
    }
    precondition(nameBytes >= 0 && batch.entries.count <= 65536)
    return 0
}
