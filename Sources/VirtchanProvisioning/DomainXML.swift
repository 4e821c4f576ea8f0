import Foundation

/// Turns a DomainSpec into domain XML, through libxml2: from scratch, or by adding the
/// controller and channels to a user's template.
public enum DomainXML {
    /// `domainType` is libvirt's `<domain type=…>`: "kvm" or "qemu" (TCG).
    public static func build(_ spec: DomainSpec, domainType: String) throws(ProvisioningError) -> LibXMLDocument {
        try spec.validate()
        let doc: LibXMLDocument
        if let template = spec.templateXML {
            doc = try LibXMLDocument(parsing: template, name: "the template")
            guard doc.root.name == "domain" else {
                throw ProvisioningError(.invalidXML, "the template's root element is <\(doc.root.name)>, not <domain>")
            }
            try checkTemplate(doc, against: spec)
        } else {
            doc = try LibXMLDocument(root: "domain")
        }
        let root = doc.root
        root.setAttribute("type", domainType)
        setOnly(root, "name", spec.name)
        for old in doc.select("/domain/uuid") { old.remove() }
        if let uuid = spec.uuid { root.addChild("uuid", text: uuid) }
        if spec.templateXML == nil || spec.memoryMiB != nil {
            for old in doc.select("/domain/currentMemory") { old.remove() }
            setOnly(root, "memory", String(spec.memoryMiB ?? DomainSpec.defaultMemoryMiB)).setAttribute("unit", "MiB")
        }
        if spec.templateXML == nil || spec.vcpus != nil {
            setOnly(root, "vcpu", String(spec.vcpus ?? 1))
        }
        let os = root.child("os")
        if doc.select("/domain/os/type").isEmpty {
            os.addChild("type", text: "hvm", attributes: ["arch": "x86_64"])
        }
        switch spec.boot {
        case .kernel(let kernel, let initrd, let cmdline):
            for tag in ["kernel", "initrd", "cmdline", "boot"] { for n in doc.select("/domain/os/\(tag)") { n.remove() } }
            os.addChild("kernel", text: kernel)
            if let initrd { os.addChild("initrd", text: initrd) }
            os.addChild("cmdline", text: cmdline)
        case .disk:
            if doc.select("/domain/os/boot").isEmpty { os.addChild("boot", attributes: ["dev": "hd"]) }
        case nil:
            break
        }
        if spec.templateXML == nil {
            root.addChild("features").addChild("acpi")
            root.addChild("on_poweroff", text: "destroy")
            root.addChild("on_reboot", text: "restart")
            root.addChild("on_crash", text: "destroy")
        }
        let devices = root.child("devices")
        if case .disk(let image) = spec.boot {
            let disk = devices.addChild("disk", attributes: ["type": "file", "device": "disk"])
            disk.addChild("driver", attributes: ["name": "qemu", "type": image.hasSuffix(".qcow2") ? "qcow2" : "raw"])
            disk.addChild("source", attributes: ["file": image])
            disk.addChild("target", attributes: ["dev": "vda", "bus": "virtio"])
        }
        if let seed = spec.seedImage {
            let disk = devices.addChild("disk", attributes: ["type": "file", "device": "disk"])
            disk.addChild("driver", attributes: ["name": "qemu", "type": "raw"])
            disk.addChild("source", attributes: ["file": seed])
            disk.addChild("target", attributes: ["dev": "vdb", "bus": "virtio"])
            disk.addChild("readonly")
        }
        if doc.select("/domain/devices/controller[@type='virtio-serial'][@index='\(spec.controllerIndex)']").isEmpty {
            devices.addChild("controller", attributes: [
                "type": "virtio-serial", "index": String(spec.controllerIndex), "ports": String(spec.controllerPorts),
            ])
        }
        for ch in spec.channels {
            let channel = devices.addChild("channel", attributes: ["type": "unix"])
            let source = channel.addChild("source", attributes: ["mode": "bind"])
            if let path = ch.socketPath { source.setAttribute("path", path) }
            channel.addChild("target", attributes: ["type": "virtio", "name": ch.name])
            channel.addChild("address", attributes: [
                "type": "virtio-serial", "controller": String(spec.controllerIndex), "bus": "0", "port": String(ch.port),
            ])
        }
        if doc.select("/domain/devices/serial").isEmpty {
            // The console goes to the log file, or without one to a pseudo-terminal that
            // `virsh console` reaches from anywhere.
            let type = spec.consoleLog == nil ? "pty" : "file"
            let serial = devices.addChild("serial", attributes: ["type": type])
            if let log = spec.consoleLog { serial.addChild("source", attributes: ["path": log]) }
            serial.addChild("target", attributes: ["port": "0"])
            let console = devices.addChild("console", attributes: ["type": type])
            if let log = spec.consoleLog { console.addChild("source", attributes: ["path": log]) }
            console.addChild("target", attributes: ["type": "serial", "port": "0"])
        }
        if spec.templateXML == nil {
            // A headless guest needs no USB (its controller alone costs a TCG boot ~0.6 s of
            // handoff quirks) and no balloon; a virtio RNG seeds the guest's entropy at once,
            // so nothing in early userspace waits in getrandom().
            devices.addChild("controller", attributes: ["type": "usb", "model": "none"])
            devices.addChild("memballoon", attributes: ["model": "none"])
            devices.addChild("rng", attributes: ["model": "virtio"])
                .addChild("backend", text: "/dev/urandom", attributes: ["model": "random"])
        }
        if let metadata = spec.metadata {
            for old in doc.select("/domain/metadata/vc:domain", namespaces: ["vc": VirtchanMetadata.namespace]) { old.remove() }
            metadata.write(into: root.child("metadata"))
        }
        return doc
    }

    @discardableResult
    private static func setOnly(_ parent: LibXMLNode, _ name: String, _ value: String) -> LibXMLNode {
        for old in parent.document.select(name, from: parent) { old.remove() }
        return parent.addChild(name, text: value)
    }

    /// A template may bring its own devices, but not channels that clash with virtchan's.
    static func checkTemplate(_ doc: LibXMLDocument, against spec: DomainSpec) throws(ProvisioningError) {
        for existing in doc.select("/domain/devices/channel") {
            let name = doc.string("string(target/@name)", from: existing)
            if let name, spec.channels.contains(where: { $0.name == name }) {
                throw ProvisioningError(.conflict,
                    "the template already has a channel named \(name); remove it from the template or let virtchan add it")
            }
            let controller = doc.string("string(address[@type='virtio-serial']/@controller)", from: existing) ?? "0"
            if let portText = doc.string("string(address[@type='virtio-serial']/@port)", from: existing),
               let port = Int(portText), controller == String(spec.controllerIndex),
               let clash = spec.channels.first(where: { $0.port == port }) {
                throw ProvisioningError(.conflict,
                    "the template already uses virtio-serial port \(port), which channel \(clash.name) needs")
            }
        }
        if let ctrl = doc.select("/domain/devices/controller[@type='virtio-serial'][@index='\(spec.controllerIndex)']").first,
           let portsText = ctrl.attribute("ports"), let ports = Int(portsText),
           let beyond = spec.channels.first(where: { $0.port >= ports }) {
            throw ProvisioningError(.invalidArgument,
                "the template's virtio-serial controller has \(ports) ports, too few for channel \(beyond.name) on port \(beyond.port)")
        }
    }
}
