#ifndef VIRTCHAN_CLIBXML2_SHIM_H
#define VIRTCHAN_CLIBXML2_SHIM_H
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

/* xmlFree is a C global function pointer, which Swift 6 rejects as shared mutable state. */
static inline void vc_xml_free(void *p) { xmlFree(p); }

static void vc_xml_silent_error(void *ctx, const char *msg, ...) { (void)ctx; (void)msg; }

/* Keep libxml2 from printing parse errors on stderr; callers report them. */
static inline void vc_xml_silence_errors(void) {
    xmlSetGenericErrorFunc(NULL, vc_xml_silent_error);
}

static inline int vc_xpath_nodeset_count(xmlXPathObjectPtr obj) {
    if (obj == NULL || obj->nodesetval == NULL) return 0;
    return obj->nodesetval->nodeNr;
}

static inline xmlNodePtr vc_xpath_nodeset_item(xmlXPathObjectPtr obj, int i) {
    return obj->nodesetval->nodeTab[i];
}
#endif
