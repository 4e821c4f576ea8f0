import ArgumentParser
import Foundation
import VirtchanProtocol
import VirtchanProvisioning
import VirtchanTransport

struct Create: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "create",
        abstract: "Define and start a domain with its control and data channels wired.",
        discussion: """
        With no boot source the built-in tiny guest boots (build it with Scripts/build-guest). \
        Sockets and the console log live in $VIRTCHAN_STATE_DIR/NAME (default \
        /var/lib/virtchan/domains/NAME) unless --libvirt-socket-paths lets libvirt choose.
        """)

    @OptionGroup var global: GlobalOptions
    @Argument(help: "Name of the new domain.") var name: String
    @Option(help: "Memory in MiB (default 512, or the template's).") var memory: Int?
    @Option(help: "Virtual CPUs (default 1, or the template's).") var vcpus: Int?
    @Option(help: "auto, kvm or tcg. auto takes KVM only where a guest really boots under it.") var accel: Accelerator = .auto
    @Option(help: "Kernel to boot (with --initrd and --cmdline).") var kernel: String?
    @Option(help: "Initramfs for --kernel.") var initrd: String?
    @Option(help: "Kernel command line for --kernel.") var cmdline: String?
    @Option(help: "Disk image to boot instead of a kernel.") var disk: String?
    @Option(help: "Your own base domain XML; virtchan adds the controller and channels.") var template: String?
    @Option(help: "Ports on the virtio-serial controller (1-31).") var ports: Int = 16
    @Flag(help: "Let libvirt choose the socket paths (read back from the live XML).") var libvirtSocketPaths = false
    @Flag(name: .customLong("qemu-ga"), help: "Also add the org.qemu.guest_agent.0 channel for qemu-guest-agent.") var qemuGA = false
    @Flag(help: "Print the domain XML and change nothing.") var dryRun = false
    @Flag(help: "Return once the domain starts, without waiting for the agent.") var noWait = false
    @Option(help: "Seconds to wait for the agent's hello.") var waitTimeout: Double = 90
    @OptionGroup var bootstrap: BootstrapOptions

    func validate() throws {
        if kernel != nil && disk != nil { throw ValidationError("give --kernel or --disk, not both") }
        if (initrd != nil || cmdline != nil) && kernel == nil { throw ValidationError("--initrd and --cmdline go with --kernel") }
        if waitTimeout <= 0 { throw ValidationError("--wait-timeout must be positive") }
        do {
            try DomainSpec.validateName(name)
            try DomainSpec.validateSize(memoryMiB: memory, vcpus: vcpus)
        } catch {
            throw ValidationError(error.message)
        }
        for (option, path) in [("--disk", disk), ("--kernel", kernel), ("--initrd", initrd)] {
            var isDir: ObjCBool = false
            if let path, FileManager.default.fileExists(atPath: path, isDirectory: &isDir), isDir.boolValue {
                throw ValidationError("\(option) takes a file, and \(path) is a directory")
            }
        }
    }

    func run() throws {
        let plan = try bootstrap.plan()
        var spec = DomainSpec(name: name)
        spec.memoryMiB = memory
        spec.vcpus = vcpus
        spec.accelerator = accel
        spec.controllerPorts = ports
        let stateDir = Paths.stateDirectory(for: name)
        spec.channels = DomainSpec.standardChannels(socketDirectory: libvirtSocketPaths ? nil : stateDir, qemuGuestAgent: qemuGA)
        spec.consoleLog = stateDir + "/console.log"
        spec.metadata = VirtchanMetadata(stateDirectory: stateDir, version: Virtchan.configuration.version,
                                         bootstrap: plan.map { BootstrapRecord(script: $0.scriptName, sha256: $0.sha256, state: .pending) })
        // The agent's key reaches the guest in the domain's own copy of the initramfs; a boot
        // without one (a disk, a template's own boot, a bare kernel) cannot carry it yet.
        let keyedInitrd = Paths.bootDirectory + "/\(name).initrd"
        var initrdBase: String?
        if let kernel {
            try requireFile(kernel, "kernel")
            if let initrd { try requireFile(initrd, "initrd") }
            initrdBase = initrd.map(absolute)
            spec.boot = .kernel(kernel: absolute(kernel), initrd: initrd == nil ? nil : keyedInitrd, cmdline: cmdline ?? "console=ttyS0")
        } else if let disk {
            try requireFile(disk, "disk image")
            spec.boot = .disk(absolute(disk))
        } else if try !templateBoots() {
            // vmlinux is the same kernel uncompressed, which QEMU boots through its PVH entry point
            // seconds sooner under TCG; Scripts/build-guest writes it when the kernel has one.
            let uncompressed = Paths.imageDirectory + "/vmlinux"
            let k = FileManager.default.fileExists(atPath: uncompressed) ? uncompressed : Paths.imageDirectory + "/vmlinuz"
            let i = Paths.imageDirectory + "/initrd.img"
            guard FileManager.default.fileExists(atPath: k), FileManager.default.fileExists(atPath: i) else {
                throw CLIError("the built-in guest image is missing from \(Paths.imageDirectory); build it with: Scripts/build-guest")
            }
            initrdBase = i
            spec.boot = .kernel(kernel: k, initrd: keyedInitrd, cmdline: "console=ttyS0 panic=-1 quiet")
        }
        if let template {
            guard let text = try? String(contentsOfFile: template, encoding: .utf8) else {
                throw CLIError("cannot read the template \(template)")
            }
            spec.templateXML = text
        }
        if initrdBase == nil && !global.insecureAgent {
            throw CLIError("this boot (\(disk != nil ? "--disk" : kernel != nil ? "--kernel without --initrd" : "the template's own")) gives virtchan no way to hand the agent its key, and an agent without one serves anything that reaches its channel; pass --insecure-agent to create it anyway", exitCode: 64)
        }
        try spec.validate()
        // Everything is checked before the accelerator probe, which may take seconds.
        let doc = try DomainXML.build(spec, domainType: accel == .kvm ? "kvm" : "qemu")
        if dryRun {
            print(doc.serialize(), terminator: "")
            return
        }
        let domainType = AcceleratorProbe.domainType(for: accel, imageDirectory: Paths.imageDirectory,
                                                     cacheDirectory: Paths.cacheDirectory)
        doc.root.setAttribute("type", domainType)
        let xml = doc.serialize()

        let conn = try global.open()
        if conn.domain(named: name) != nil {
            throw CLIError("a domain named \(name) already exists (remove it with: virtchan destroy \(name), or pick another name)")
        }
        let fm = FileManager.default
        try? fm.removeItem(atPath: stateDir)
        do {
            // Closed to everyone but its owner: the agent's sockets, the console log and the
            // bootstrap's secrets are in it. (libvirt hands QEMU the sockets already bound.)
            try fm.createDirectory(atPath: stateDir, withIntermediateDirectories: true, attributes: [.posixPermissions: 0o700])
            chmod(stateDir, 0o700)
            try Data(name.utf8).write(to: URL(fileURLWithPath: stateDir + "/.virtchan-domain"))
            if let plan { try plan.save(into: stateDir) }
            if let initrdBase {
                let key = AgentKey.generate()
                guard fm.createFile(atPath: stateDir + "/" + AgentEndpoint.keyFileName, contents: Data(key.fileText.utf8),
                                    attributes: [.posixPermissions: 0o600]) else {
                    throw CLIError("cannot write the agent key in \(stateDir)")
                }
                try KeyedInitrd.write(base: initrdBase, key: key, to: keyedInitrd)
            } else {
                // The user chose an agent without a key for this domain; later commands accept it.
                _ = fm.createFile(atPath: stateDir + "/" + AgentEndpoint.unkeyedMarkerName, contents: nil, attributes: [.posixPermissions: 0o600])
            }
        } catch {
            try? fm.removeItem(atPath: stateDir)
            unlink(keyedInitrd)
            if let e = error as? ProvisioningError { throw e }
            throw CLIError("cannot prepare \(stateDir): \(error.localizedDescription)")
        }
        let domain: Domain
        do {
            domain = try conn.define(xml: xml)
        } catch {
            try? fm.removeItem(atPath: stateDir)
            unlink(keyedInitrd)
            throw error
        }
        do {
            try domain.start()
        } catch {
            try? domain.undefine()
            try? fm.removeItem(atPath: stateDir)
            unlink(keyedInitrd)
            throw error
        }
        // QEMU has read the initramfs into memory; nobody but its owner may read the key again.
        if initrdBase != nil { KeyedInitrd.reclaim(keyedInitrd) }
        let started = Date()
        say("Domain \(name) started (\(domainType == "kvm" ? "KVM" : "TCG"), console log \(spec.consoleLog ?? "-"))")
        if noWait {
            if plan != nil { say("Bootstrap is pending; deliver it with: virtchan bootstrap run \(name)") }
            return
        }
        let session = try waitForAgent(name, global, timeout: waitTimeout)
        say(String(format: "Agent %@ answered after %.1f s", displaySafe(session.hello.agentVersion, limit: 64), Date().timeIntervalSince(started)))
        if plan != nil {
            let code = try BootstrapRunner.run(domainName: name, global: global, session: session, force: false,
                                               timeout: bootstrap.bootstrapTimeout, quiet: false)
            if code != 0 {
                if bootstrap.destroyOnFailure {
                    try? DomainTeardown.destroy(name, global: global, keepDefinition: false, force: true)
                    FileHandle.standardError.write(Data("virtchan: bootstrap failed with exit code \(code); domain \(name) destroyed\n".utf8))
                } else {
                    FileHandle.standardError.write(Data("virtchan: bootstrap failed with exit code \(code); domain \(name) is left running (see: virtchan bootstrap log \(name))\n".utf8))
                }
                throw ExitCode(code)
            }
        }
    }

    private func templateBoots() throws -> Bool {
        guard let template else { return false }
        guard let text = try? String(contentsOfFile: template, encoding: .utf8) else {
            throw CLIError("cannot read the template \(template)")
        }
        let doc0 = try XMLDocument(parsing: text, name: "the template")
        return !doc0.select("/domain/os/kernel").isEmpty || !doc0.select("/domain/devices/disk").isEmpty
    }

    private func requireFile(_ path: String, _ what: String) throws {
        var isDir: ObjCBool = false
        guard FileManager.default.fileExists(atPath: path, isDirectory: &isDir), !isDir.boolValue else {
            throw CLIError("the \(what) \(path) does not exist")
        }
    }

    private func absolute(_ path: String) -> String {
        path.hasPrefix("/") ? path : FileManager.default.currentDirectoryPath + "/" + path
    }
}

/// Waits for the agent's hello, retrying the connection while QEMU is still coming up.
func waitForAgent(_ name: String, _ global: GlobalOptions, timeout: Double) throws -> AgentSession {
    let deadline = Date().addingTimeInterval(timeout)
    while true {
        let left = deadline.timeIntervalSinceNow
        do {
            return try Resolve.session(name, global, timeout: max(1, left))
        } catch let e as TransportError where e.code == .unreachable && left > 1 {
            Thread.sleep(forTimeInterval: 0.2)
        } catch let e as TransportError where e.code == .timeout {
            var msg = "the agent in \(name) did not say hello within \(formatSeconds(timeout))"
            let log = Paths.stateDirectory(for: name) + "/console.log"
            if FileManager.default.fileExists(atPath: log) { msg += "; see the guest console log \(log)" }
            throw CLIError(msg)
        }
    }
}
