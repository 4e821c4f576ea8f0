import Foundation
import Testing

/// The article "Create a VM and run a command in it" shows code from the example program,
/// which the package builds and the end-to-end suite runs; here each snippet must still be
/// in that program, line for line, so the article cannot drift from code that compiles.
@Suite struct ArticleTests {
    private static let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent().path

    /// The lines of `text`, each without its indentation, blank lines dropped.
    private func lines(_ text: Substring) -> [String] {
        text.split(separator: "\n").map { $0.trimmingCharacters(in: .whitespaces) }.filter { !$0.isEmpty }
    }

    @Test func everySnippetOfTheArticleIsPartOfTheExampleProgram() throws {
        let article = try String(contentsOfFile: Self.root + "/Sources/VirtchanKit/VirtchanKit.docc/CreateAVMAndRunACommand.md", encoding: .utf8)
        let program = lines(Substring(try String(contentsOfFile: Self.root + "/Examples/CreateAndRun/main.swift", encoding: .utf8)))
        let snippets = article.components(separatedBy: "```swift\n").dropFirst().map { $0.components(separatedBy: "```")[0] }
        #expect(snippets.count >= 4)
        for snippet in snippets {
            let wanted = lines(Substring(snippet))
            let found = program.indices.contains { start in
                start + wanted.count <= program.count && Array(program[start..<start + wanted.count]) == wanted
            }
            #expect(found, "this snippet of the article is not in Examples/CreateAndRun/main.swift:\n\(snippet)")
        }
    }
}
