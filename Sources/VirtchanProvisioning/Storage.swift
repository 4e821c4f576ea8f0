import CLibvirt
import Glibc
import VirtchanProtocol

/// A libvirt storage pool. The class owns the `virStoragePoolPtr` and keeps its connection
/// alive. Files that QEMU must open on the host that runs it (a kernel, an initramfs) reach
/// that host as volumes of a pool, uploaded through the libvirt connection itself.
public final class StoragePool: @unchecked Sendable {
    public let connection: Connection
    public let name: String
    let pointer: virStoragePoolPtr

    init(connection: Connection, name: String, pointer: virStoragePoolPtr) {
        self.connection = connection
        self.name = name
        self.pointer = pointer
    }

    deinit { vc_virStoragePoolFree(pointer) }

    /// The pool called `name`, or nil. The corresponding C function is
    /// `virStoragePoolLookupByName`.
    public static func lookup(_ name: String, on connection: Connection) -> StoragePool? {
        guard let p = vc_virStoragePoolLookupByName(connection.pointer, name) else {
            vc_virResetLastError()
            return nil
        }
        return StoragePool(connection: connection, name: name, pointer: p)
    }

    /// The `dir` pool `name` at `path` on the connection's host, running: defined (with its
    /// directory made, and set to start with libvirtd) when there is none, started when it
    /// is stopped. An existing pool of that name is used as it is, wherever it points.
    public static func directory(_ name: String, path: String, on connection: Connection) throws(ProvisioningError) -> StoragePool {
        let pool: StoragePool
        if let existing = lookup(name, on: connection) {
            pool = existing
        } else {
            let doc = try LibXMLDocument(root: "pool")
            doc.root.setAttribute("type", "dir")
            doc.root.addChild("name", text: name)
            let target = doc.root.addChild("target")
            target.addChild("path", text: path)
            // QEMU (another user) must reach the files in it; their own modes keep them private.
            target.addChild("permissions").addChild("mode", text: "0711")
            guard let p = vc_virStoragePoolDefineXML(connection.pointer, doc.serialize(), 0) else {
                throw ProvisioningError.fromLibvirt("cannot define the storage pool \(name) on \(connection.uri)")
            }
            pool = StoragePool(connection: connection, name: name, pointer: p)
            guard vc_virStoragePoolBuild(p, 0) == 0, vc_virStoragePoolCreate(p, 0) == 0 else {
                let error = ProvisioningError.fromLibvirt("cannot make and start the storage pool \(name) at \(path) on \(connection.uri)")
                // A pool virtchan could not set up is not left defined.
                _ = vc_virStoragePoolUndefine(p)
                throw error
            }
            _ = vc_virStoragePoolSetAutostart(p, 1)
            return pool
        }
        try pool.activate()
        return pool
    }

    /// Starts the pool when it is stopped.
    public func activate() throws(ProvisioningError) {
        if vc_virStoragePoolIsActive(pointer) != 1 {
            guard vc_virStoragePoolCreate(pointer, 0) == 0 else {
                throw ProvisioningError.fromLibvirt("cannot start the storage pool \(name) on \(connection.uri)")
            }
        }
    }

    /// The volume called `name` in this pool, or nil.
    public func volume(_ name: String) -> StorageVolume? {
        guard let v = vc_virStorageVolLookupByName(pointer, name) else {
            vc_virResetLastError()
            return nil
        }
        return StorageVolume(pool: self, name: name, pointer: v)
    }

    /// Every volume of the pool, after libvirt has read the pool's directory again. The
    /// corresponding C functions are `virStoragePoolRefresh` and `virStoragePoolListAllVolumes`.
    public func volumes() throws(ProvisioningError) -> [StorageVolume] {
        if vc_virStoragePoolRefresh(pointer, 0) != 0 { vc_virResetLastError() }
        var list: UnsafeMutablePointer<virStorageVolPtr?>?
        let n = vc_virStoragePoolListAllVolumes(pointer, &list, 0)
        guard n >= 0, let list else {
            throw ProvisioningError.fromLibvirt("cannot list the volumes of the storage pool \(name) on \(connection.uri)")
        }
        defer { free(list) }
        return (0..<Int(n)).compactMap { i in
            guard let v = list[i] else { return nil }
            guard let volumeName = vc_virStorageVolGetName(v) else {
                vc_virResetLastError()
                vc_virStorageVolFree(v)
                return nil
            }
            return StorageVolume(pool: self, name: String(cString: volumeName), pointer: v)
        }
    }

    /// A new raw volume of `bytes` bytes (zeros), readable per `mode`.
    /// The corresponding C function is `virStorageVolCreateXML`.
    public func makeVolume(_ volumeName: String, bytes: Int, mode: Int = 0o600) throws(ProvisioningError) -> StorageVolume {
        let doc = try LibXMLDocument(root: "volume")
        doc.root.addChild("name", text: volumeName)
        doc.root.addChild("capacity", text: String(bytes), attributes: ["unit": "bytes"])
        doc.root.addChild("allocation", text: "0", attributes: ["unit": "bytes"])
        let target = doc.root.addChild("target")
        target.addChild("format", attributes: ["type": "raw"])
        target.addChild("permissions").addChild("mode", text: "0" + String(mode, radix: 8))
        guard let v = vc_virStorageVolCreateXML(pointer, doc.serialize(), 0) else {
            throw ProvisioningError.fromLibvirt("cannot create the volume \(volumeName) in the storage pool \(name) on \(connection.uri)")
        }
        return StorageVolume(pool: self, name: volumeName, pointer: v)
    }

    /// A new qcow2 volume of `bytes` virtual bytes that reads through to `backing` (a path on
    /// the pool's host) and keeps every write to itself: the backing file is only ever read.
    public func makeOverlay(_ volumeName: String, bytes: UInt64, backing: String, backingFormat: String,
                            mode: Int = 0o600) throws(ProvisioningError) -> StorageVolume {
        let doc = try LibXMLDocument(root: "volume")
        doc.root.addChild("name", text: volumeName)
        doc.root.addChild("capacity", text: String(bytes), attributes: ["unit": "bytes"])
        let target = doc.root.addChild("target")
        target.addChild("format", attributes: ["type": "qcow2"])
        target.addChild("permissions").addChild("mode", text: "0" + String(mode, radix: 8))
        let store = doc.root.addChild("backingStore")
        store.addChild("path", text: backing)
        store.addChild("format", attributes: ["type": backingFormat])
        guard let v = vc_virStorageVolCreateXML(pointer, doc.serialize(), 0) else {
            throw ProvisioningError.fromLibvirt("cannot create the overlay \(volumeName) of \(backing) in the storage pool \(name) on \(connection.uri)")
        }
        return StorageVolume(pool: self, name: volumeName, pointer: v)
    }

    /// A new raw volume holding the bytes of the local file `path`, readable by its owner
    /// only (`mode`). A volume left half-written by a failed upload is deleted again.
    /// `progress` hears the bytes sent and the total after each chunk (of 1 MiB).
    public func upload(_ path: String, as volumeName: String, mode: Int = 0o600,
                       progress: ((UInt64, UInt64) -> Void)? = nil) throws(ProvisioningError) -> StorageVolume {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else {
            throw ProvisioningError(.io, "cannot read \(path): \(String(cString: strerror(errno)))")
        }
        defer { close(fd) }
        var st = stat()
        guard fstat(fd, &st) == 0, st.st_mode & S_IFMT == S_IFREG else {
            throw ProvisioningError(.io, "\(path) is not a regular file")
        }
        let size = Int(st.st_size)
        let volume = try makeVolume(volumeName, bytes: size, mode: mode)
        do {
            try volume.write(from: fd, length: size, progress: progress)
        } catch {
            try? volume.delete()
            throw error
        }
        return volume
    }
}

/// A volume of a ``StoragePool``. The class owns the `virStorageVolPtr`.
public final class StorageVolume: @unchecked Sendable {
    public let pool: StoragePool
    public let name: String
    let pointer: virStorageVolPtr

    init(pool: StoragePool, name: String, pointer: virStorageVolPtr) {
        self.pool = pool
        self.name = name
        self.pointer = pointer
    }

    deinit { vc_virStorageVolFree(pointer) }

    /// The volume whose file is `path` on the connection's host, in whichever pool holds it;
    /// nil when no pool does. The corresponding C function is `virStorageVolLookupByPath`.
    public static func lookup(path: String, on connection: Connection) -> StorageVolume? {
        guard let v = vc_virStorageVolLookupByPath(connection.pointer, path) else {
            vc_virResetLastError()
            return nil
        }
        guard let p = vc_virStoragePoolLookupByVolume(v) else {
            vc_virResetLastError()
            vc_virStorageVolFree(v)
            return nil
        }
        guard let poolName = vc_virStoragePoolGetName(p), let volumeName = vc_virStorageVolGetName(v) else {
            vc_virResetLastError()
            vc_virStoragePoolFree(p)
            vc_virStorageVolFree(v)
            return nil
        }
        let pool = StoragePool(connection: connection, name: String(cString: poolName), pointer: p)
        return StorageVolume(pool: pool, name: String(cString: volumeName), pointer: v)
    }

    /// Where the volume is on its host. The corresponding C function is `virStorageVolGetPath`.
    public func path() throws(ProvisioningError) -> String {
        guard let c = vc_virStorageVolGetPath(pointer) else {
            throw ProvisioningError.fromLibvirt("cannot find the path of the volume \(name)")
        }
        defer { free(c) }
        return String(cString: c)
    }

    /// What a volume's XML says of it.
    public struct Details: Sendable {
        /// Where its file is on the pool's host.
        public let path: String
        /// The bytes it takes on disk.
        public let allocation: UInt64
        /// The file a qcow2 overlay reads through to, if any.
        public let backingPath: String?
        /// When its file was last written (its mtime), in seconds since 1970 by the clock of
        /// the pool's host; nil when the pool does not say.
        public let modified: Double?
    }

    /// The volume's path, size on disk, backing file and time of last write, from its XML. The
    /// corresponding C function is `virStorageVolGetXMLDesc`.
    public func details() throws(ProvisioningError) -> Details {
        guard let c = vc_virStorageVolGetXMLDesc(pointer, 0) else {
            throw ProvisioningError.fromLibvirt("cannot read the description of the volume \(name)")
        }
        let xml = String(cString: c)
        free(c)
        let doc = try LibXMLDocument(parsing: xml, name: "the XML of the volume \(name)")
        return Details(path: doc.string("string(/volume/target/path)") ?? "",
                       allocation: doc.string("string(/volume/allocation)").flatMap { UInt64($0) } ?? 0,
                       backingPath: doc.string("string(/volume/backingStore/path)"),
                       modified: doc.string("string(/volume/target/timestamps/mtime)").flatMap(Double.init))
    }

    /// The volume's size in bytes. The corresponding C function is `virStorageVolGetInfo`.
    public func capacity() throws(ProvisioningError) -> UInt64 {
        var info = virStorageVolInfo()
        guard vc_virStorageVolGetInfo(pointer, &info) == 0 else {
            throw ProvisioningError.fromLibvirt("cannot read the size of the volume \(name)")
        }
        return UInt64(info.capacity)
    }

    /// Deletes the volume and its file. The corresponding C function is `virStorageVolDelete`.
    public func delete() throws(ProvisioningError) {
        guard vc_virStorageVolDelete(pointer, 0) == 0 else {
            throw ProvisioningError.fromLibvirt("cannot delete the volume \(name)")
        }
    }

    /// Writes `length` bytes read from `fd` at the start of the volume, through a libvirt
    /// stream (`virStorageVolUpload`): the bytes travel over the connection, ssh or TLS
    /// included, so the file never needs to be on the volume's host.
    func write(from fd: Int32, length: Int, progress: ((UInt64, UInt64) -> Void)?) throws(ProvisioningError) {
        guard let stream = vc_virStreamNew(pool.connection.pointer, 0) else {
            throw ProvisioningError.fromLibvirt("cannot open a stream to \(pool.connection.uri)")
        }
        defer { vc_virStreamFree(stream) }
        guard vc_virStorageVolUpload(pointer, stream, 0, UInt64(length), 0) == 0 else {
            throw ProvisioningError.fromLibvirt("cannot upload into the volume \(name)")
        }
        let chunk = 1 << 20
        let buffer = UnsafeMutableRawPointer.allocate(byteCount: chunk, alignment: 16)
        defer { buffer.deallocate() }
        var sent = 0
        while sent < length {
            if let sig = Interruption.pending {
                _ = vc_virStreamAbort(stream)
                throw ProvisioningError(.io, "the upload into the volume \(name) stopped: \(Interruption.describe(sig))")
            }
            let n = read(fd, buffer, min(chunk, length - sent))
            if n < 0 && errno == EINTR { continue }
            guard n > 0 else {
                let reason = n == 0 ? "it ended early" : String(cString: strerror(errno))
                _ = vc_virStreamAbort(stream)
                throw ProvisioningError(.io, "cannot read the file for the volume \(name): \(reason)")
            }
            var offset = 0
            while offset < n {
                let w = vc_virStreamSend(stream, buffer.advanced(by: offset).assumingMemoryBound(to: CChar.self), n - offset)
                guard w > 0 else {
                    let error = ProvisioningError.fromLibvirt("the upload into the volume \(name) failed")
                    _ = vc_virStreamAbort(stream)
                    throw error
                }
                offset += Int(w)
            }
            sent += n
            progress?(UInt64(sent), UInt64(length))
        }
        guard vc_virStreamFinish(stream) == 0 else {
            throw ProvisioningError.fromLibvirt("the upload into the volume \(name) did not complete")
        }
    }
}

extension Connection {
    /// Whether the connection's host offers KVM to guests, as its domain capabilities say
    /// (`virConnectGetDomainCapabilities` for the `kvm` type).
    public var offersKVM: Bool {
        guard let c = vc_virConnectGetDomainCapabilities(pointer, nil, nil, nil, "kvm", 0) else {
            vc_virResetLastError()
            return false
        }
        free(c)
        return true
    }
}
