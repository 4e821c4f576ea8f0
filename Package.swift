// swift-tools-version:6.0
import PackageDescription

// What every start of the two executables costs before `main`: libstdc++ and libgcc go into
// them rather than being loaded (the library path is searched in `Linking/` first, whose
// `libstdc++.so` is a linker script that names the static archive), and they export no symbols
// (the Swift runtime's `dladdr` at start walked all of them). `virtchan --version` went from
// 3.9 to 2.8 ms (README, "Speed").
let lightStart: [LinkerSetting] = [
    .unsafeFlags(["-L", Context.packageDirectory + "/Linking", "-Xclang-linker", "-static-libgcc", "-Xlinker", "--no-export-dynamic"]),
]

let package = Package(
    name: "virtchan",
    products: [
        .library(name: "VirtchanKit", targets: ["VirtchanKit"]),
        .executable(name: "virtchan", targets: ["virtchan"]),
        .executable(name: "virtchan-full", targets: ["virtchan-full"]),
        .executable(name: "virtchan-agent", targets: ["virtchan-agent"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.5.0"),
        .package(url: "https://github.com/apple/swift-crypto", from: "3.12.3"),
        // cloud-init's YAML: a user's #cloud-config is checked, virtchan's own is written.
        .package(url: "https://github.com/jpsim/Yams", from: "5.0.1"),
        // `swift package generate-documentation --target VirtchanKit`
        .package(url: "https://github.com/swiftlang/swift-docc-plugin", from: "1.5.0"),
    ],
    targets: [
        // libvirt's headers, and its functions loaded with dlopen on first use (see the header).
        .target(name: "CLibvirt"),
        // libxml2's headers, its functions likewise loaded on first use (see its header for how
        // the headers are found without linking libxml2).
        .target(name: "CLibXML2"),
        // Wire format shared by host and guest. No Foundation, no C libraries.
        .target(name: "VirtchanProtocol"),
        // libvirt connection, DomainSpec -> XML, live channel resolution, metadata.
        .target(name: "VirtchanProvisioning", dependencies: ["CLibvirt", "CLibXML2", "VirtchanProtocol"]),
        // Host side: sockets, sessions, the exec client. No Foundation, no crypto library.
        .target(name: "VirtchanTransport", dependencies: ["VirtchanProtocol"]),
        // Host side: the file transfer client, hashing with swift-crypto.
        .target(name: "VirtchanFileTransfer", dependencies: [
            "VirtchanTransport", "VirtchanProtocol",
            .product(name: "Crypto", package: "swift-crypto"),
        ]),
        // The agent's process start: vfork and execve, resetting only the signals it must.
        .target(name: "CSpawn"),
        // Guest side: port discovery, poll loop, handlers. Stays free of Foundation.
        .target(name: "VirtchanAgentCore", dependencies: ["CSpawn", "VirtchanProtocol"]),
        // The host side as one library: domains, sessions, exec, transfers, bootstrap.
        .target(name: "VirtchanKit", dependencies: [
            "VirtchanProvisioning", "VirtchanTransport", "VirtchanFileTransfer", "VirtchanProtocol",
            .product(name: "Crypto", package: "swift-crypto"),
            .product(name: "Yams", package: "Yams"),
        ]),
        // `virtchan`: `exec` on one domain, through its session holder (started here when the
        // endpoint cache knows the domain), in a program that starts in a third of the time;
        // anything else it hands to virtchan-full beside it. Linked static-PIE in release
        // builds: no dynamic loader, and still at a random address (see Linking/ld-static-pie).
        .executableTarget(name: "virtchan", dependencies: ["VirtchanTransport", "VirtchanProtocol"],
                          linkerSettings: [.unsafeFlags(["-static-executable", "-use-ld=" + Context.packageDirectory + "/Linking/ld-static-pie",
                                                          "-Xclang-linker", "-static-pie", "-Xlinker", "-z", "-Xlinker", "pack-relative-relocs"],
                                                        .when(configuration: .release))]),
        // Every command: argument parsing and printing over VirtchanKit.
        .executableTarget(name: "virtchan-full", dependencies: [
            "VirtchanKit",
            .product(name: "ArgumentParser", package: "swift-argument-parser"),
        ], linkerSettings: lightStart),
        .executableTarget(name: "virtchan-agent", dependencies: ["VirtchanAgentCore", "VirtchanProtocol"], linkerSettings: lightStart),
        // Scripts/bench: virtchan against qemu-guest-agent and the bare port, in process.
        .executableTarget(name: "virtchan-bench", dependencies: ["VirtchanKit"]),
        // A program that uses VirtchanKit's public API only; built with everything else.
        .executableTarget(name: "virtchan-example", dependencies: ["VirtchanKit"], path: "Examples/CreateAndRun"),
        // One test target per library target; none of them needs libvirtd or QEMU.
        .testTarget(name: "ProtocolTests", dependencies: [
            "VirtchanProtocol", .product(name: "Crypto", package: "swift-crypto"),
        ]),
        .testTarget(name: "ProvisioningTests", dependencies: ["VirtchanProvisioning"]),
        .testTarget(name: "TransportTests", dependencies: ["VirtchanTransport", "VirtchanFileTransfer", "VirtchanProtocol"]),
        // The agent loop in process, driven by the host client.
        .testTarget(name: "AgentCoreTests", dependencies: ["VirtchanAgentCore", "VirtchanTransport", "VirtchanFileTransfer", "VirtchanProtocol"]),
        .testTarget(name: "KitTests", dependencies: ["VirtchanKit"]),
        // Real libvirtd, QEMU and guests; skipped (and said so) where they are not reachable.
        .testTarget(name: "EndToEndTests", dependencies: [
            "VirtchanKit", .product(name: "Crypto", package: "swift-crypto"),
        ]),
    ],
    swiftLanguageModes: [.v6]
)
