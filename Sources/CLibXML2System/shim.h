/* libxml2's version header, found through pkg-config (libxml-2.0). It exists so that every
 * module that imports CLibXML2 gets libxml2's include directory from pkg-config; the
 * functions themselves are loaded on first use (CLibXML2/loader.c). */
#include <libxml/xmlversion.h>
