import CLibXML2
import Foundation

/// A libxml2 document. The class owns the `xmlDocPtr` and frees it in `deinit`; nodes handed
/// out keep the document alive.
public final class LibXMLDocument: @unchecked Sendable {
    let doc: xmlDocPtr

    /// Why libxml2 cannot be used, or nil once it is loaded and set up.
    private static let loadFailure: String? = {
        if let reason = vc_xml_load() { return String(cString: reason) }
        vc_xmlInitParser()
        vc_xml_silence_errors()
        return nil
    }()

    private static func setUp() throws(ProvisioningError) {
        // libvirt itself needs libxml2, so this is a broken installation.
        if let reason = loadFailure { throw ProvisioningError(.libraryMissing, reason) }
    }

    /// A new document whose root element is `root`. The corresponding C function is `xmlNewDoc`.
    public init(root: String) throws(ProvisioningError) {
        try Self.setUp()
        doc = vc_xmlNewDoc("1.0")
        let node = vc_xmlNewNode(nil, root)
        vc_xmlDocSetRootElement(doc, node)
    }

    /// Parses XML text. The corresponding C function is `xmlReadMemory`.
    public init(parsing text: String, name: String = "document") throws(ProvisioningError) {
        try Self.setUp()
        let bytes = Array(text.utf8)
        let parsed = bytes.withUnsafeBufferPointer { buf in
            buf.baseAddress!.withMemoryRebound(to: CChar.self, capacity: buf.count) {
                vc_xmlReadMemory($0, Int32(buf.count), nil, "UTF-8", Int32(XML_PARSE_NONET.rawValue | XML_PARSE_NOBLANKS.rawValue))
            }
        }
        guard let parsed, vc_xmlDocGetRootElement(parsed) != nil else {
            var detail = "not well-formed XML"
            if let err = vc_xmlGetLastError(), let msg = err.pointee.message {
                detail = String(cString: msg).trimmingCharacters(in: .whitespacesAndNewlines) + " at line \(err.pointee.line)"
            }
            if let parsed { vc_xmlFreeDoc(parsed) }
            throw ProvisioningError(.invalidXML, "\(name) is not valid XML: \(detail)")
        }
        doc = parsed
    }

    deinit { vc_xmlFreeDoc(doc) }

    public var root: LibXMLNode { LibXMLNode(document: self, node: vc_xmlDocGetRootElement(doc)) }

    /// The document as text, indented. The corresponding C function is `xmlDocDumpFormatMemory`.
    public func serialize() -> String {
        var out: UnsafeMutablePointer<xmlChar>?
        var size: Int32 = 0
        vc_xmlDocDumpFormatMemoryEnc(doc, &out, &size, "UTF-8", 1)
        guard let out else { return "" }
        defer { vc_xml_free(out) }
        let text = String(cString: out)
        // Drop the XML declaration: libvirt and people read the element alone.
        if text.hasPrefix("<?xml"), let nl = text.firstIndex(of: "\n") {
            return String(text[text.index(after: nl)...])
        }
        return text
    }

    /// Evaluates an XPath expression and returns the matching element or attribute nodes.
    /// `namespaces` maps prefixes used in the expression to namespace URIs.
    public func select(_ xpath: String, namespaces: [String: String] = [:], from context: LibXMLNode? = nil) -> [LibXMLNode] {
        guard let ctx = vc_xmlXPathNewContext(doc) else { return [] }
        defer { vc_xmlXPathFreeContext(ctx) }
        for (prefix, uri) in namespaces { vc_xmlXPathRegisterNs(ctx, prefix, uri) }
        if let context { ctx.pointee.node = context.node }
        guard let result = vc_xmlXPathEvalExpression(xpath, ctx) else { return [] }
        defer { vc_xmlXPathFreeObject(result) }
        let count = vc_xpath_nodeset_count(result)
        return (0..<count).compactMap { i in
            vc_xpath_nodeset_item(result, Int32(i)).map { LibXMLNode(document: self, node: $0) }
        }
    }

    /// The string value of an XPath expression (e.g. "string(/domain/name)").
    public func string(_ xpath: String, namespaces: [String: String] = [:], from context: LibXMLNode? = nil) -> String? {
        guard let ctx = vc_xmlXPathNewContext(doc) else { return nil }
        defer { vc_xmlXPathFreeContext(ctx) }
        for (prefix, uri) in namespaces { vc_xmlXPathRegisterNs(ctx, prefix, uri) }
        if let context { ctx.pointee.node = context.node }
        guard let result = vc_xmlXPathEvalExpression(xpath, ctx) else { return nil }
        defer { vc_xmlXPathFreeObject(result) }
        guard let s = vc_xmlXPathCastToString(result) else { return nil }
        defer { vc_xml_free(s) }
        let value = String(cString: s)
        return value.isEmpty ? nil : value
    }
}

/// An element or attribute inside an `LibXMLDocument`.
public struct LibXMLNode: @unchecked Sendable {
    let document: LibXMLDocument
    let node: xmlNodePtr

    public var name: String { String(cString: node.pointee.name) }

    /// Text content. The corresponding C function is `xmlNodeGetContent`.
    public var text: String {
        guard let c = vc_xmlNodeGetContent(node) else { return "" }
        defer { vc_xml_free(c) }
        return String(cString: c)
    }

    public func attribute(_ name: String) -> String? {
        guard let v = vc_xmlGetProp(node, name) else { return nil }
        defer { vc_xml_free(v) }
        return String(cString: v)
    }

    @discardableResult
    public func setAttribute(_ name: String, _ value: String) -> LibXMLNode {
        vc_xmlSetProp(node, name, value)
        return self
    }

    /// Appends a child element (text content escaped by libxml2).
    /// The corresponding C function is `xmlNewTextChild`.
    @discardableResult
    public func addChild(_ name: String, text: String? = nil, attributes: KeyValuePairs<String, String> = [:]) -> LibXMLNode {
        let child = vc_xmlNewTextChild(node, nil, name, text)!
        let wrapped = LibXMLNode(document: document, node: child)
        for (k, v) in attributes { wrapped.setAttribute(k, v) }
        return wrapped
    }

    /// Appends a child element in a namespace, declaring it on that child.
    @discardableResult
    public func addChild(_ name: String, namespace uri: String, prefix: String) -> LibXMLNode {
        let child = vc_xmlNewChild(node, nil, name, nil)!
        let ns = vc_xmlNewNs(child, uri, prefix)
        vc_xmlSetNs(child, ns)
        return LibXMLNode(document: document, node: child)
    }

    /// Appends a child in the same namespace as this element.
    @discardableResult
    public func addNamespacedChild(_ name: String, text: String? = nil) -> LibXMLNode {
        let child = vc_xmlNewTextChild(node, node.pointee.ns, name, text)!
        return LibXMLNode(document: document, node: child)
    }

    /// The first child element called `name`, created when missing.
    public func child(_ name: String) -> LibXMLNode {
        var c = node.pointee.children
        while let cur = c {
            if cur.pointee.type == XML_ELEMENT_NODE, String(cString: cur.pointee.name) == name {
                return LibXMLNode(document: document, node: cur)
            }
            c = cur.pointee.next
        }
        return addChild(name)
    }

    public func remove() {
        vc_xmlUnlinkNode(node)
        vc_xmlFreeNode(node)
    }

    /// This element and its subtree as text.
    public func serialize() -> String {
        guard let buf = vc_xmlBufferCreate() else { return "" }
        defer { vc_xmlBufferFree(buf) }
        vc_xmlNodeDump(buf, document.doc, node, 0, 1)
        return String(cString: vc_xmlBufferContent(buf))
    }
}
