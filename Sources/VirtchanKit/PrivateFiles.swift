import Foundation
import VirtchanTransport

/// `data` written as VirtchanTransport's `writePrivateFile` does, failing with a VirtchanError.
func writePrivateFile(_ path: String, _ data: Data, durable: Bool = true) throws {
    do {
        try writePrivateFile(path, [UInt8](data), durable: durable)
    } catch {
        throw VirtchanError(.io, error.message)
    }
}
