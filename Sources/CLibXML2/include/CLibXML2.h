#ifndef VIRTCHAN_CLIBXML2_H
#define VIRTCHAN_CLIBXML2_H
/*
 * libxml2, loaded on first use (see CLibvirt.h for why): its headers give the types and
 * constants, and its functions are called through the vc_-prefixed wrappers below.
 *
 * libxml2's headers live in /usr/include/libxml2 and include each other as <libxml/NAME.h>.
 * include/libxml/ holds one forwarding header per name, so they resolve from this target's
 * own include directory with no compiler flag and no link: pkg-config (libxml-2.0) would
 * give the flag, but SwiftPM then links libxml2 and ICU into every virtchan process, which
 * costs each one ~0.8 ms before main. A libxml2 whose headers include a name missing here
 * fails the build with "'libxml/NAME.h' file not found": add the same one-line header.
 */
#include <libxml/xmlversion.h>
/* Debian's libxml2 is built with ICU; its headers would pull ICU's C API into this module and
 * clash with the ICU copy Foundation carries. virtchan never touches the ICU-specific
 * encoding handler fields, so the ICU include is left out. */
#undef LIBXML_ICU_ENABLED
#include <libxml/parser.h>
#include <libxml/tree.h>
#include <libxml/xpath.h>
#include <libxml/xpathInternals.h>
#include <libxml/xmlerror.h>

/* Loads libxml2 once. Returns NULL when it is usable, else a message saying why not. */
const char *vc_xml_load(void);

/* ret, failure value, libxml2 function, parameters, arguments. */
#define VC_XML_FUNCTIONS(X) \
    X(xmlDocPtr, NULL, xmlNewDoc, (const xmlChar *version), (version)) \
    X(xmlNodePtr, NULL, xmlNewNode, (xmlNsPtr ns, const xmlChar *name), (ns, name)) \
    X(xmlNodePtr, NULL, xmlDocSetRootElement, (xmlDocPtr doc, xmlNodePtr root), (doc, root)) \
    X(xmlNodePtr, NULL, xmlDocGetRootElement, (const xmlDoc *doc), (doc)) \
    X(xmlDocPtr, NULL, xmlReadMemory, (const char *buffer, int size, const char *url, const char *encoding, int options), (buffer, size, url, encoding, options)) \
    X(xmlErrorPtr, NULL, xmlGetLastError, (void), ()) \
    X(xmlXPathContextPtr, NULL, xmlXPathNewContext, (xmlDocPtr doc), (doc)) \
    X(int, -1, xmlXPathRegisterNs, (xmlXPathContextPtr ctxt, const xmlChar *prefix, const xmlChar *ns_uri), (ctxt, prefix, ns_uri)) \
    X(xmlXPathObjectPtr, NULL, xmlXPathEvalExpression, (const xmlChar *str, xmlXPathContextPtr ctxt), (str, ctxt)) \
    X(xmlChar *, NULL, xmlXPathCastToString, (xmlXPathObjectPtr val), (val)) \
    X(xmlChar *, NULL, xmlNodeGetContent, (const xmlNode *cur), (cur)) \
    X(xmlChar *, NULL, xmlGetProp, (const xmlNode *node, const xmlChar *name), (node, name)) \
    X(xmlAttrPtr, NULL, xmlSetProp, (xmlNodePtr node, const xmlChar *name, const xmlChar *value), (node, name, value)) \
    X(xmlNodePtr, NULL, xmlNewTextChild, (xmlNodePtr parent, xmlNsPtr ns, const xmlChar *name, const xmlChar *content), (parent, ns, name, content)) \
    X(xmlNodePtr, NULL, xmlNewChild, (xmlNodePtr parent, xmlNsPtr ns, const xmlChar *name, const xmlChar *content), (parent, ns, name, content)) \
    X(xmlNsPtr, NULL, xmlNewNs, (xmlNodePtr node, const xmlChar *href, const xmlChar *prefix), (node, href, prefix)) \
    X(xmlBufferPtr, NULL, xmlBufferCreate, (void), ()) \
    X(int, -1, xmlNodeDump, (xmlBufferPtr buf, xmlDocPtr doc, xmlNodePtr cur, int level, int format), (buf, doc, cur, level, format)) \
    X(const xmlChar *, NULL, xmlBufferContent, (const xmlBuffer *buf), (buf))

#define VC_XML_VOID_FUNCTIONS(X) \
    X(xmlInitParser, (void), ()) \
    X(xmlFreeDoc, (xmlDocPtr doc), (doc)) \
    X(xmlXPathFreeContext, (xmlXPathContextPtr ctxt), (ctxt)) \
    X(xmlXPathFreeObject, (xmlXPathObjectPtr obj), (obj)) \
    X(xmlDocDumpFormatMemoryEnc, (xmlDocPtr doc, xmlChar **text, int *size, const char *encoding, int format), (doc, text, size, encoding, format)) \
    X(xmlSetNs, (xmlNodePtr node, xmlNsPtr ns), (node, ns)) \
    X(xmlUnlinkNode, (xmlNodePtr cur), (cur)) \
    X(xmlFreeNode, (xmlNodePtr cur), (cur)) \
    X(xmlBufferFree, (xmlBufferPtr buf), (buf))

#define VC_XML_DECLARE(ret, fail, name, params, args) ret vc_##name params;
VC_XML_FUNCTIONS(VC_XML_DECLARE)
#undef VC_XML_DECLARE
#define VC_XML_DECLARE_VOID(name, params, args) void vc_##name params;
VC_XML_VOID_FUNCTIONS(VC_XML_DECLARE_VOID)
#undef VC_XML_DECLARE_VOID

/* xmlFree: libxml2's deallocator for strings it hands out. */
void vc_xml_free(void *p);

/* Keeps libxml2 from printing parse errors on stderr; callers report them. */
void vc_xml_silence_errors(void);

static inline int vc_xpath_nodeset_count(xmlXPathObjectPtr obj) {
    if (obj == NULL || obj->nodesetval == NULL) return 0;
    return obj->nodesetval->nodeNr;
}

static inline xmlNodePtr vc_xpath_nodeset_item(xmlXPathObjectPtr obj, int i) {
    return obj->nodesetval->nodeTab[i];
}
#endif
