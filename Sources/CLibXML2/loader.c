#include "CLibXML2.h"

#include <dlfcn.h>
#include <pthread.h>
#include <stdio.h>

static struct {
#define VC_XML_POINTER(ret, fail, name, params, args) __typeof__(name) *name;
    VC_XML_FUNCTIONS(VC_XML_POINTER)
#undef VC_XML_POINTER
#define VC_XML_POINTER_VOID(name, params, args) __typeof__(name) *name;
    VC_XML_VOID_FUNCTIONS(VC_XML_POINTER_VOID)
#undef VC_XML_POINTER_VOID
    __typeof__(xmlSetGenericErrorFunc) *xmlSetGenericErrorFunc;
    xmlFreeFunc *xmlFree; /* the address of libxml2's global xmlFree */
} fn;

static pthread_once_t load_once = PTHREAD_ONCE_INIT;
static char load_error[512];

static void *find(void *lib, const char *symbol) {
    void *p = dlsym(lib, symbol);
    if (!p && !load_error[0])
        snprintf(load_error, sizeof load_error, "libxml2 has no %s; install libxml2 2.9 or newer", symbol);
    return p;
}

static void load(void) {
    void *lib = dlopen("libxml2.so.2", RTLD_NOW | RTLD_GLOBAL);
    if (!lib) {
        snprintf(load_error, sizeof load_error, "cannot load libxml2 (%s); install it with: apt-get install libxml2", dlerror());
        return;
    }
#define VC_XML_FIND(ret, fail, name, params, args) fn.name = (__typeof__(name) *)find(lib, #name);
    VC_XML_FUNCTIONS(VC_XML_FIND)
#undef VC_XML_FIND
#define VC_XML_FIND_VOID(name, params, args) fn.name = (__typeof__(name) *)find(lib, #name);
    VC_XML_VOID_FUNCTIONS(VC_XML_FIND_VOID)
#undef VC_XML_FIND_VOID
    fn.xmlSetGenericErrorFunc = (__typeof__(xmlSetGenericErrorFunc) *)find(lib, "xmlSetGenericErrorFunc");
    fn.xmlFree = (xmlFreeFunc *)find(lib, "xmlFree");
}

const char *vc_xml_load(void) {
    pthread_once(&load_once, load);
    return load_error[0] ? load_error : NULL;
}

#define VC_XML_DEFINE(ret, fail, name, params, args) \
    ret vc_##name params { \
        if (vc_xml_load() && !fn.name) return fail; \
        return fn.name args; \
    }
VC_XML_FUNCTIONS(VC_XML_DEFINE)
#undef VC_XML_DEFINE

#define VC_XML_DEFINE_VOID(name, params, args) \
    void vc_##name params { \
        if (vc_xml_load() && !fn.name) return; \
        fn.name args; \
    }
VC_XML_VOID_FUNCTIONS(VC_XML_DEFINE_VOID)
#undef VC_XML_DEFINE_VOID

void vc_xml_free(void *p) {
    if (vc_xml_load() && !fn.xmlFree) return;
    (*fn.xmlFree)(p);
}

static void silent(void *ctx, const char *msg, ...) {
    (void)ctx;
    (void)msg;
}

void vc_xml_silence_errors(void) {
    if (vc_xml_load() && !fn.xmlSetGenericErrorFunc) return;
    fn.xmlSetGenericErrorFunc(NULL, silent);
}
