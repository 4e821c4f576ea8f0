import Foundation
import Testing
import Yams
@testable import VirtchanKit

/// The user-data and meta-data a cloud image's seed carries, and what is refused before
/// anything is defined.
struct CloudSeedTests {
    let boothook = Data("#cloud-boothook\n#!/bin/sh\necho install\n".utf8)

    /// The parts of a MIME multi-part message: (content type, body), split by its boundary.
    func parts(_ message: Data) throws -> [(type: String, body: String)] {
        let text = String(decoding: message, as: UTF8.self)
        let header = try #require(text.split(separator: "\n").first)
        let boundary = try #require(header.components(separatedBy: "boundary=\"").last?.dropLast())
        #expect(text.hasSuffix("--\(boundary)--\n"))
        return text.components(separatedBy: "\n--\(boundary)\n").dropFirst().map { chunk in
            let part = chunk.components(separatedBy: "--\(boundary)--")[0]
            let type = part.split(separator: "\n").first { $0.hasPrefix("Content-Type:") }.map(String.init) ?? ""
            return (type, part)
        }
    }

    @Test func virtchansBoothookComesFirstThenTheUsersOwnThenTheKeys() throws {
        var user = CloudInit()
        user.userData = Data("#cloud-config\nruncmd:\n  - [touch, /x]\n".utf8)
        user.sshAuthorizedKeys = ["ssh-ed25519 AAAAkey1 one", "ssh-ed25519 AAAAkey2 two"]
        let p = try parts(CloudSeed.userData(boothook: boothook, user: user))
        #expect(p.count == 3)
        #expect(p[0].type.hasPrefix("Content-Type: text/cloud-boothook"))
        #expect(p[0].body.contains("#cloud-boothook\n#!/bin/sh\necho install\n"))
        #expect(p[1].type.hasPrefix("Content-Type: text/cloud-config"))
        #expect(p[1].body.contains("#cloud-config\nruncmd:\n  - [touch, /x]\n"))
        // virtchan's own cloud-config is YAML that merges into the user's without replacing it.
        let ours = try #require(p[2].body.components(separatedBy: "\n\n").dropFirst().first)
        let config = try #require(try Yams.load(yaml: ours) as? [String: Any])
        #expect(config["ssh_authorized_keys"] as? [String] == user.sshAuthorizedKeys)
        let merge = try #require(config["merge_how"] as? [[String: Any]])
        #expect(merge.contains { $0["name"] as? String == "list" && ($0["settings"] as? [String])?.contains("append") == true })
    }

    @Test func aUsersMimeMessageNestsWithItsOwnHeaders() throws {
        var user = CloudInit()
        let mime = "Content-Type: multipart/mixed; boundary=\"inner\"\nMIME-Version: 1.0\n\n--inner\nContent-Type: text/x-shellscript\n\n#!/bin/sh\necho hi\n--inner--\n"
        user.userData = Data(mime.utf8)
        let p = try parts(CloudSeed.userData(boothook: boothook, user: user))
        #expect(p.count == 2)
        #expect(p[1].body.hasPrefix(mime))
    }

    @Test func aBoundaryNeverOccursInAPart() throws {
        var user = CloudInit()
        // Whatever boundary is drawn, the message still splits into exactly its parts.
        user.userData = Data("#!/bin/sh\necho --virtchan-\n".utf8)
        let p = try parts(CloudSeed.userData(boothook: boothook, user: user))
        #expect(p.count == 2)
        #expect(p[1].body.contains("echo --virtchan-\n"))
    }

    @Test func userDataCloudInitWouldNotTakeIsRefused() throws {
        func type(_ text: String) throws -> String { try CloudSeed.partType(of: Data(text.utf8), source: "u") }
        #expect(try type("#!/bin/bash\ntrue\n") == "text/x-shellscript")
        #expect(try type("#cloud-config\n") == "text/cloud-config")
        #expect(try type("#cloud-boothook\n#!/bin/sh\n") == "text/cloud-boothook")
        #expect(try type("Content-Type: multipart/mixed; boundary=x\n") == "mime")
        #expect(throws: VirtchanError.self) { try type("#cloud-config\nruncmd: [a\n") }
        #expect(throws: VirtchanError.self) { try type("#cloud-config\n- a list\n- not a mapping\n") }
        #expect(throws: VirtchanError.self) { try type("just text\n") }
        #expect(throws: VirtchanError.self) { try CloudSeed.partType(of: Data([0x1f, 0x8b, 8, 0]), source: "u") }
    }

    @Test func metaDataNamesTheInstanceAndTheHost() throws {
        let meta = try #require(try Yams.load(yaml: String(decoding: CloudSeed.metaData(instanceID: "1234-ab", hostname: "web1"), as: UTF8.self)) as? [String: String])
        #expect(meta == ["instance-id": "1234-ab", "local-hostname": "web1"])
    }

    @Test func hostNamesAreCheckedAndDomainNamesMadeIntoOnes() throws {
        try CloudSeed.validateHostname("web-1.example.org")
        for bad in ["", "a_b", "-a", "a-", "a..b", String(repeating: "x", count: 64)] {
            #expect(throws: VirtchanError.self, "\(bad)") { try CloudSeed.validateHostname(bad) }
        }
        #expect(CloudSeed.defaultHostname(for: "db_primary.1") == "db-primary-1")
        try CloudSeed.validateHostname(CloudSeed.defaultHostname(for: "db_primary.1"))
    }
}
