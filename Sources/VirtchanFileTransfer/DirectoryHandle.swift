import Glibc
import VirtchanTransport

/// An open directory on the host, and the file work a pull does inside it. Every operation is
/// relative to the directory's descriptor and never follows a symbolic link at the name it is
/// given, so a link that a guest planted on an earlier pull cannot redirect a later one.
public final class DirectoryHandle {
    public let fd: Int32
    /// The path it was opened at, for messages only: never used to reach the directory again.
    public let path: String

    private init(fd: Int32, path: String) {
        self.fd = fd
        self.path = path
    }

    deinit { close(fd) }

    /// Opens the directory at `path`, which the user named, so a link there is followed
    /// (as `cp` does with a destination the user typed).
    public static func open(_ path: String) throws(TransportError) -> DirectoryHandle {
        let fd = Glibc.open(path, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        guard fd >= 0 else { throw TransportError.system("cannot open the directory \(path)") }
        return DirectoryHandle(fd: fd, path: path)
    }

    /// The directory `name` inside this one; refuses a symbolic link or anything else that is
    /// not a plain directory. The corresponding C function is `openat` with `O_NOFOLLOW`.
    public func child(_ name: String) throws(TransportError) -> DirectoryHandle {
        let fd = openat(self.fd, name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC)
        guard fd >= 0 else {
            let e = errno
            if e == ELOOP || e == ENOTDIR {
                throw TransportError(.io, "refusing to write into \(join(name)): it is not a plain directory (a symbolic link or a file is there)", errno: e)
            }
            throw TransportError.system("cannot open \(join(name))", errno: e)
        }
        return DirectoryHandle(fd: fd, path: join(name))
    }

    /// Walks `components` down from here, one `child` at a time.
    public func descend(_ components: some Sequence<Substring>) throws(TransportError) -> DirectoryHandle {
        var dir = self
        for c in components { dir = try dir.child(String(c)) }
        return dir
    }

    /// Creates the directory `name` (mode 0700 until `setMode`), or opens it when a plain
    /// directory is already there. Returns it and whether it was made now.
    public func makeDirectory(_ name: String) throws(TransportError) -> (DirectoryHandle, created: Bool) {
        if mkdirat(fd, name, 0o700) == 0 { return (try child(name), true) }
        let e = errno
        guard e == EEXIST else { throw TransportError.system("cannot create the directory \(join(name))", errno: e) }
        return (try child(name), false)
    }

    /// Creates a new, empty file with a random name beginning `.base.virtchan-`, readable by
    /// the owner only. The corresponding C function is `openat` with `O_CREAT | O_EXCL`.
    public func makeTemporaryFile(for base: String) throws(TransportError) -> (fd: Int32, name: String) {
        for _ in 0..<16 {
            let name = temporaryName(for: base)
            let f = openat(fd, name, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0o600)
            if f >= 0 { return (f, name) }
            if errno != EEXIST { throw TransportError.system("cannot write in \(path)") }
        }
        throw TransportError(.io, "cannot find a free temporary name in \(path)")
    }

    /// Creates a new, empty directory with a random name beginning `.base.virtchan-`.
    public func makeTemporaryDirectory(for base: String) throws(TransportError) -> String {
        for _ in 0..<16 {
            let name = temporaryName(for: base)
            if mkdirat(fd, name, 0o700) == 0 { return name }
            if errno != EEXIST { throw TransportError.system("cannot write in \(path)") }
        }
        throw TransportError(.io, "cannot find a free temporary name in \(path)")
    }

    /// Renames `from` to `to` inside this directory; whatever `to` was (a file, a link) is
    /// replaced, never followed.
    public func rename(_ from: String, to: String) throws(TransportError) {
        guard renameat(fd, from, fd, to) == 0 else {
            let e = errno
            if e == EISDIR || e == ENOTEMPTY || e == EEXIST {
                throw TransportError(.io, "cannot put \(join(to)) in place: a directory is there", errno: e)
            }
            throw TransportError.system("cannot put \(join(to)) in place", errno: e)
        }
    }

    /// What is at `name`, without following a link there; nil when nothing is.
    public func kind(of name: String) -> mode_t? {
        var st = stat()
        guard fstatat(fd, name, &st, AT_SYMLINK_NOFOLLOW) == 0 else { return nil }
        return st.st_mode & S_IFMT
    }

    /// Makes `name` a symbolic link to `target`, replacing a file or link there (not a directory).
    public func makeSymlink(_ name: String, to target: String) throws(TransportError) {
        if let k = kind(of: name) {
            guard k != S_IFDIR else {
                throw TransportError(.io, "cannot make the symbolic link \(join(name)): a directory is there", errno: EEXIST)
            }
            guard unlinkat(fd, name, 0) == 0 else { throw TransportError.system("cannot replace \(join(name))") }
        }
        guard symlinkat(target, fd, name) == 0 else { throw TransportError.system("cannot make the symbolic link \(join(name))") }
    }

    /// Removes `name` and, when it is a directory, everything below it; links are removed,
    /// never followed. Errors are ignored: this cleans up after a failure.
    public func removeTree(_ name: String) {
        if kind(of: name) == S_IFDIR, let sub = try? child(name) {
            for entry in sub.entries() { sub.removeTree(entry) }
            unlinkat(fd, name, AT_REMOVEDIR)
        } else {
            unlinkat(fd, name, 0)
        }
    }

    /// The names in this directory, without "." and "..".
    func entries() -> [String] {
        let dup = dup(fd)
        guard dup >= 0, let dir = fdopendir(dup) else { return [] }
        defer { closedir(dir) }
        rewinddir(dir)
        var names: [String] = []
        while let e = readdir(dir) {
            let name = withUnsafeBytes(of: e.pointee.d_name) { raw in
                String(decoding: raw.prefix(while: { $0 != 0 }), as: UTF8.self)
            }
            if name != "." && name != ".." { names.append(name) }
        }
        return names
    }

    /// Sets the mode of the open file or directory `fd`. The corresponding C function is `fchmod`.
    public static func setMode(_ fd: Int32, _ mode: UInt32, of what: String) throws(TransportError) {
        guard fchmod(fd, mode_t(mode)) == 0 else { throw TransportError.system("cannot set the mode of \(what)") }
    }

    public func join(_ name: String) -> String { path.hasSuffix("/") ? path + name : path + "/" + name }

    private func temporaryName(for base: String) -> String {
        var rng = SystemRandomNumberGenerator()
        let suffix = String(rng.next() & 0xFF_FFFF_FFFF, radix: 36)
        return ".\(base).virtchan-\(suffix)"
    }
}
