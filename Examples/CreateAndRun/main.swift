// Creates a tiny guest, runs a command in it, copies a file in and back, and tears it down,
// through VirtchanKit's public API alone. As root, after Scripts/build-guest:
//
//     swift run virtchan-example [NAME]
//
// The code of docs article "Create a VM and run a command in it" is taken from this file.
import Foundation
import VirtchanKit

func createAndRun(_ name: String) throws {
    let hypervisor = Hypervisor()            // qemu:///system as root, as virsh does
    var request = MachineRequest(name: name) // the built-in tiny guest, channels wired
    request.memoryMiB = 512
    let machine = try hypervisor.create(request)
    print("started \(machine.name) (\(machine.domainType))")
    defer { try? hypervisor.destroy(name) } // stop, undefine, remove its files

    let session = try hypervisor.waitForAgent(name, timeout: 120)

    var options = ExecOptions(argv: ["uname", "-sr"])
    options.forwardStdin = false
    let result = try ExecClient.run(session, options) { stream, bytes in
        let out = stream == .stderr ? FileHandle.standardError : FileHandle.standardOutput
        out.write(Data(bytes))               // output arrives while the command runs
        return true
    }
    print("uname exited with \(result.status)")

    let local = NSTemporaryDirectory() + "virtchan-example.txt"
    try Data("hello from the host\n".utf8).write(to: URL(fileURLWithPath: local))
    let transfer = FileTransfer(session: session)
    let pushed = try transfer.push(file: local, to: "/tmp/hello.txt")
    let pulled = try transfer.pull("/tmp/hello.txt", toPath: local + ".back")
    print("copied \(pushed.bytes) bytes in and \(pulled.bytes) back, sha256 \(pulled.sha256)")
}

let name = CommandLine.arguments.dropFirst().first ?? "virtchan-example"
do {
    try createAndRun(name)
} catch {
    FileHandle.standardError.write(Data("virtchan-example: \(error)\n".utf8))
    exit(1)
}
