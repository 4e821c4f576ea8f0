import ArgumentParser
import Foundation
import VirtchanKit

struct Create: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "create",
        abstract: "Define and start a domain with its control and data channels wired.",
        discussion: """
        With no boot source the built-in tiny guest boots (build it with Scripts/build-guest). \
        Sockets and the console log live in $VIRTCHAN_STATE_DIR/NAME (default \
        /var/lib/virtchan/domains/NAME) unless --libvirt-socket-paths lets libvirt choose.

        With --connect naming another host, the kernel and the domain's initramfs are uploaded \
        through the libvirt connection into the storage pool 'virtchan' there (defined on first \
        use, at /var/lib/virtchan/pool); the agent's key stays in this host's state directory. \
        The kernel (and a base image) is kept there for the next create; 'virtchan prune' \
        removes uploads no domain uses. --disk, a file QEMU would open on that host, is \
        refused there.

        With --image a stock cloud image boots (Debian genericcloud, Ubuntu cloudimg, Fedora \
        Cloud-Base, qcow2 or raw), never written: the domain boots a copy-on-write overlay of \
        it, and cloud-init installs virtchan-agent at first boot from a NoCloud seed that carries \
        it. Both are volumes of the storage pool 'virtchan' (or --pool), deleted by destroy; over \
        a remote --connect the image is uploaded there once. Your own --user-data runs as well.
        """)

    @OptionGroup var global: GlobalOptions
    @Argument(help: "Name of the new domain (several boot side by side).") var names: [String] = []
    @OptionGroup var fleet: FleetOptions
    @Option(parsing: .unconditional, help: "Memory in MiB (default 512, 1024 with --image, or the template's).") var memory: Int?
    @Option(parsing: .unconditional, help: "Virtual CPUs (default 1, or the template's).") var vcpus: Int?
    @Option(help: "auto, kvm or tcg. auto takes KVM only where a guest really boots under it.") var accel: Accelerator = .auto
    @Option(help: "Kernel to boot (with --initrd and --cmdline).") var kernel: String?
    @Option(help: "Initramfs for --kernel.") var initrd: String?
    @Option(help: "Kernel command line for --kernel.") var cmdline: String?
    @Option(help: "Disk image to boot instead of a kernel (written to; the agent must be in it).") var disk: String?
    @Option(help: ArgumentHelp("Cloud image to boot through an overlay, with the agent installed by cloud-init.", valueName: "base")) var image: String?
    @Option(help: ArgumentHelp("Size of the --image overlay, e.g. 20G (default: the image's size).", valueName: "size")) var diskSize: String?
    @Option(help: ArgumentHelp("Storage pool for the volumes (default: virtchan, defined on first use).", valueName: "name")) var pool: String?
    @Option(help: ArgumentHelp("Your own cloud-init user-data for --image: #cloud-config, a script or MIME multi-part.", valueName: "file")) var userData: String?
    @Option(help: ArgumentHelp("Public key authorized for the image's default user (repeatable).", valueName: "file")) var sshKey: [String] = []
    @Option(help: "Host name of an --image guest (default: the domain's name).") var hostname: String?
    @Option(help: "Your own base domain XML; virtchan adds the controller and channels.") var template: String?
    @Option(parsing: .unconditional, help: "Ports on the virtio-serial controller (3-31; 4-31 with --qemu-ga).") var ports: Int = 16
    @Flag(help: "Let libvirt choose the socket paths (read back from the live XML).") var libvirtSocketPaths = false
    @Flag(name: .customLong("qemu-ga"), help: "Also add the org.qemu.guest_agent.0 channel for qemu-guest-agent.") var qemuGA = false
    @Flag(help: "Print the domain XML and change nothing.") var dryRun = false
    @Flag(help: "Return once the domain starts, without waiting for the agent.") var noWait = false
    @Option(name: [.customLong("wait-timeout"), .customLong("timeout")], parsing: .unconditional,
            help: "Seconds to wait for the agent's hello (default 90, 600 with --image).") var waitTimeout: Double?
    @OptionGroup var bootstrap: BootstrapOptions

    func validate() throws {
        if [kernel, disk, image].compactMap({ $0 }).count > 1 { throw ValidationError("give one of --kernel, --disk and --image") }
        if image == nil {
            for (option, given) in [("--disk-size", diskSize != nil), ("--user-data", userData != nil), ("--ssh-key", !sshKey.isEmpty), ("--hostname", hostname != nil)] where given {
                throw ValidationError("\(option) goes with --image")
            }
        }
        if let diskSize, DiskImage.parseSize(diskSize) == nil {
            throw ValidationError("--disk-size takes a size such as 20G, 512M or a byte count, not '\(diskSize)'")
        }
        if (initrd != nil || cmdline != nil) && kernel == nil { throw ValidationError("--initrd and --cmdline go with --kernel") }
        try requireSeconds(waitTimeout, "--wait-timeout")
        let taken = DomainSpec.standardChannels(socketDirectory: nil, qemuGuestAgent: qemuGA).map(\.port).max() ?? 0
        guard (taken + 1...DomainSpec.maxControllerPorts).contains(ports) else {
            throw ValidationError("--ports takes \(taken + 1) to \(DomainSpec.maxControllerPorts), not \(ports): port 0 is the console's and virtchan's channels take 1 to \(taken)")
        }
        guard !names.isEmpty else { throw ValidationError("name the new domain, e.g. virtchan create vm1") }
        if fleet.all || !fleet.match.isEmpty { throw ValidationError("--all and --match pick existing domains; create takes the new names") }
        if global.connect.count > 1 { throw ValidationError("create makes its domains on one --connect URI") }
        if names.count > 1 && dryRun { throw ValidationError("--dry-run prints one domain's XML; name one") }
        if Set(names).count != names.count { throw ValidationError("a name is given twice") }
        do {
            for name in names { try DomainSpec.validateName(name) }
            try DomainSpec.validateSize(memoryMiB: memory, vcpus: vcpus)
        } catch {
            throw ValidationError(error.message)
        }
        for (option, path) in [("--disk", disk), ("--kernel", kernel), ("--initrd", initrd), ("--image", image), ("--user-data", userData)] + sshKey.map({ ("--ssh-key", $0) }) {
            var isDir: ObjCBool = false
            if let path, FileManager.default.fileExists(atPath: path, isDirectory: &isDir), isDir.boolValue {
                throw ValidationError("\(option) takes a file, and \(path) is a directory")
            }
        }
    }

    func run() throws {
        var template: String?
        if let path = self.template {
            guard let text = try? String(contentsOfFile: path, encoding: .utf8) else {
                throw CLIError("cannot read the template \(path)")
            }
            template = text
        }
        let plan = try bootstrap.plan()
        var cloudInit = CloudInit()
        cloudInit.hostname = hostname
        if let userData {
            guard let data = FileManager.default.contents(atPath: userData) else { throw CLIError("cannot read the user-data \(userData)", exitCode: 66) }
            cloudInit.userData = data
            cloudInit.userDataSource = userData
        }
        for file in sshKey {
            guard let text = try? String(contentsOfFile: file, encoding: .utf8) else { throw CLIError("cannot read the ssh key \(file)", exitCode: 66) }
            cloudInit.sshAuthorizedKeys += text.split(separator: "\n").map { $0.trimmingCharacters(in: .whitespaces) }
                .filter { !$0.isEmpty && !$0.hasPrefix("#") }
        }
        func request(_ name: String) -> MachineRequest {
            var request = MachineRequest(name: name)
            request.bootstrap = plan
            request.memoryMiB = memory
            request.vcpus = vcpus
            request.accelerator = accel
            request.controllerPorts = ports
            request.libvirtChoosesSocketPaths = libvirtSocketPaths
            request.qemuGuestAgent = qemuGA
            request.allowUnkeyedAgent = global.insecureAgent
            request.storagePool = pool
            request.cloudInit = cloudInit
            if let image {
                request.boot = .image(image, diskSize: diskSize.flatMap(DiskImage.parseSize))
            } else if let kernel {
                request.boot = .kernel(kernel, initrd: initrd, cmdline: cmdline)
            } else if let disk {
                request.boot = .disk(disk)
            }
            request.templateXML = template
            return request
        }
        if dryRun {
            print(try global.hypervisor().domainXML(for: request(names[0])), terminator: "")
            return
        }
        let waitTimeout = self.waitTimeout ?? (image == nil ? 90 : 600)
        // Ctrl-C undoes a create that has not started its domain; once it runs, the domain stays
        // and the error says how to remove it.
        Interruption.install()
        if names.count == 1 {
            // Uploads to another host draw a bar on a terminal, each under the line naming it.
            let uploads = UploadBars()
            let code = try Self.create(request(names[0]), through: global.target, waitTimeout: noWait ? nil : waitTimeout,
                                       bootstrap: bootstrap, say: say, note: { uploads.end(); Target.warnOnStderr($0) },
                                       uploaded: uploads.update,
                                       output: { stream, bytes in writeFully(stream == .stderr ? 2 : 1, bytes) })
            if code != 0 { throw ExitCode(code) }
            return
        }
        let requests = Dictionary(uniqueKeysWithValues: names.map { ($0, request($0)) })
        let (wait, bootstrap) = (noWait ? nil : waitTimeout, self.bootstrap)
        try runFleet(names, global, fleet, json: false, unwinding: true) { member, output, target in
            try Self.create(requests[member.name]!, through: target, waitTimeout: wait, bootstrap: bootstrap,
                            say: { output.say($0) }, note: { output.say($0, to: .stderr) },
                            output: { stream, bytes in output.write(stream, bytes); return true })
        }
    }

    /// A wait that failed after the domain started: the domain stays for a look at its console,
    /// and the error says so and how to remove it, and how to deliver its bootstrap if it has one.
    static func leftRunning(_ error: Error, _ name: String, on hypervisor: Hypervisor, bootstrapPending: Bool) -> Error {
        var detail = "; domain \(name) is left running (remove it with: \(hypervisor.suggested("destroy", name)))"
        if bootstrapPending { detail += "; its bootstrap is pending (deliver it with: \(hypervisor.suggested("bootstrap run", name)))" }
        switch error {
        case let e as VirtchanError: return e.appending(detail)
        case let e as TransportError: return e.appending(detail)
        default: return error
        }
    }

    /// Creates one domain, waits for its agent (unless `waitTimeout` is nil) and runs its
    /// bootstrap; returns the bootstrap's exit code (0 without one). Steps go to `say`, what
    /// takes long or went wrong to `note`, the script's output to `output`.
    static func create(_ request: MachineRequest, through target: Target, waitTimeout: Double?, bootstrap: BootstrapOptions,
                       say: @escaping (String) -> Void, note: @escaping (String) -> Void,
                       uploaded: ((UInt64, UInt64) -> Void)? = nil,
                       output: @escaping ExecClient.OutputSink) throws -> Int32 {
        let name = request.name
        let hypervisor = target.hypervisor()
        let machine = try hypervisor.create(request, progress: note, uploaded: uploaded)
        say("Domain \(name) started (\(machine.domainType == "kvm" ? "KVM" : "TCG"), console \(machine.consoleLog.map { "log \($0)" } ?? "on a pseudo-terminal: " + hypervisor.suggestedVirsh("console", name)))")
        guard let waitTimeout else {
            if request.bootstrap != nil { say("Bootstrap is pending; deliver it with: \(hypervisor.suggested("bootstrap run", name))") }
            return 0
        }
        let session: AgentSession
        do {
            session = try target.waitForAgent(name, timeout: waitTimeout)
        } catch let error as VirtchanError where error.code == .agentTimeout {
            guard case .image = request.boot else {
                throw Self.leftRunning(error, name, on: hypervisor, bootstrapPending: request.bootstrap != nil)
            }
            throw hypervisor.abandonImageBoot(name, waited: waitTimeout)
        } catch {
            throw Self.leftRunning(error, name, on: hypervisor, bootstrapPending: request.bootstrap != nil)
        }
        say(String(format: "Agent %@ answered after %.1f s", displaySafe(session.hello.agentVersion, limit: 64), Date().timeIntervalSince(machine.startedAt)))
        guard request.bootstrap != nil else { return 0 }
        var options = BootstrapRunOptions()
        options.timeout = bootstrap.bootstrapTimeout
        options.progress = say
        options.output = output
        let code = try hypervisor.runBootstrap(name, session: session, options: options)
        guard code != 0 else { return 0 }
        if bootstrap.destroyOnFailure {
            try? hypervisor.destroy(name, force: true)
            note("bootstrap failed with exit code \(code); domain \(name) destroyed")
        } else {
            note("bootstrap failed with exit code \(code); domain \(name) is left running (see: \(hypervisor.suggested("bootstrap log", name)))")
        }
        return code
    }
}

struct ListDomains: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "list", abstract: "List the domains virtchan manages.")

    @OptionGroup var global: GlobalOptions
    @Flag(help: "Print JSON.") var json = false
    @Flag(help: "Include domains virtchan does not manage.") var all = false

    func run() throws {
        let rows = try global.hypervisor().domains(includeUnmanaged: all)
        if json { return try printJSON(rows) }
        printTable(["NAME", "STATE", "CHANNELS"] + (all ? ["MANAGED"] : []),
                   rows.map { [$0.name, $0.state, String($0.channels)] + (all ? [$0.managed ? "yes" : "no"] : []) })
    }
}

struct Channels: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "channels",
        abstract: "Show every virtio channel of a domain, live.",
        discussion: "STATE is libvirt's view of the guest side: connected while a guest process holds the port open.")

    @OptionGroup var global: GlobalOptions
    @Argument(help: "Domain name.") var name: String
    @Flag(help: "Print a JSON array of {name, role, port, path, state}.") var json = false

    func run() throws {
        let channels = try global.hypervisor().channels(of: name)
        if json { return try printJSON(channels) }
        printTable(["NAME", "ROLE", "PORT", "STATE", "PATH"], channels.map {
            [$0.name, $0.role.rawValue, $0.port.map(String.init) ?? "-", $0.state ?? "-", $0.path ?? "-"]
        })
    }
}

struct XMLCommand: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "xml", abstract: "Print a domain's live XML.")

    @OptionGroup var global: GlobalOptions
    @Argument(help: "Domain name.") var name: String
    @Flag(help: "The persistent definition instead of the live XML.") var inactive = false

    func run() throws {
        print(try global.hypervisor().domain(name).xml(inactive: inactive), terminator: "")
    }
}

struct Destroy: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "destroy",
        abstract: "Stop a domain, undefine it and remove every file virtchan made for it.")

    @OptionGroup var global: GlobalOptions
    @Argument(help: "Domain name.") var name: String
    @Flag(help: "Stop it and remove its files but keep the libvirt definition.") var keepDefinition = false
    @Flag(help: "Also destroy a domain virtchan does not manage.") var force = false

    func run() throws {
        let hypervisor = global.hypervisor()
        try hypervisor.destroy(name, keepDefinition: keepDefinition, force: force)
        print(keepDefinition ? "Domain \(name) stopped; definition kept" : "Domain \(name) destroyed")
        if !keepDefinition && !Connection.isLocal(uri: hypervisor.uri) {
            print("Its shared kernel or base image stays on that host for the next create; remove uploads no domain uses with: virtchan prune -c \(shellWord(hypervisor.uri))")
        }
    }
}

struct Prune: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "prune",
        abstract: "Remove the volumes of virtchan's storage pool that no domain uses.",
        discussion: """
        A domain created on another host boots its kernel or base image from an upload that \
        every domain booting the same file shares, and destroy keeps it for the next create. \
        prune removes the uploads no domain boots any more, uploads that never finished, and \
        the volumes of domains that no longer exist (undefined with virsh, say). Volumes written \
        within --min-age seconds are kept, as a create elsewhere may be about to use \
        them; volumes whose names virtchan does not give are never touched. With --connect \
        given more than once, each host's pool is pruned in turn.
        """)

    @OptionGroup var global: GlobalOptions
    @Option(help: ArgumentHelp("Storage pool.", valueName: "name")) var pool: String = Hypervisor.storagePoolName
    @Option(parsing: .unconditional, help: ArgumentHelp("Keep unused volumes written within this many seconds.", valueName: "seconds")) var minAge: Double = 600
    @Flag(help: "List what would be removed, and remove nothing.") var dryRun = false
    @Flag(help: "Print a JSON array with one report per URI.") var json = false

    func validate() throws {
        try requireSeconds(minAge, "--min-age", orZero: true)
    }

    func run() throws {
        let uris: [String?] = global.connect.isEmpty ? [nil] : global.connect
        var reports: [PruneReport] = []
        for uri in uris {
            var target = global.target
            target.connect = uri
            let report = try target.hypervisor().prune(pool: pool, minimumAge: minAge, dryRun: dryRun)
            reports.append(report)
            if !json { show(report, alone: uris.count == 1) }
        }
        if json { try printJSON(reports) }
    }

    /// On stdout through `print`, as the table is: the lines keep their order in a pipe.
    private func show(_ report: PruneReport, alone: Bool) {
        let place = "the storage pool \(report.pool)" + (alone ? "" : " on \(report.uri)")
        if !report.removed.isEmpty {
            printTable(["VOLUME", "SIZE", "WHY"], report.removed.map { [$0.name, bytes($0.bytes), $0.reason] })
        }
        let count = "\(report.removed.count) volume\(report.removed.count == 1 ? "" : "s") (\(bytes(report.removedBytes)))"
        if report.removed.isEmpty {
            print("Nothing to remove from \(place)")
        } else {
            print(report.dryRun ? "Would remove \(count) from \(place); run without --dry-run to remove them"
                              : "Removed \(count) from \(place)")
        }
        if !report.recent.isEmpty {
            print("Kept \(report.recent.count) unused volume\(report.recent.count == 1 ? "" : "s") written within \(formatSeconds(minAge)) (--min-age): "
                + report.recent.map(\.name).joined(separator: ", "))
        }
    }
}

struct Reboot: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "reboot",
        abstract: "Reboot a guest and wait until its agent answers from the new boot.",
        discussion: """
        The guest's boot id tells the new boot from the old one, so an agent that still answers \
        while the guest shuts down is not mistaken for the one that comes back. A bootstrap \
        already run is not run again.
        """)

    @OptionGroup var global: GlobalOptions
    @Argument(help: "Domain name.") var name: String
    @Option(help: "agent: the guest's own reboot command; acpi: the virtual power button, as virsh reboot.") var method: RebootMethod = .agent
    @Option(parsing: .unconditional, help: "Give up after this many seconds.") var timeout: Double = 300

    func validate() throws {
        try requireSeconds(timeout, "--timeout")
    }

    func run() throws {
        let start = Date()
        _ = try global.hypervisor().reboot(name, method: method, timeout: timeout)
        say(String(format: "Domain %@ rebooted; agent back after %.1f s", name, Date().timeIntervalSince(start)))
    }
}
