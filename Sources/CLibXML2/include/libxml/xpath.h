/* Forwards to libxml2's own header (libxml2-dev installs it under /usr/include/libxml2); see ../CLibXML2.h. */
#include <libxml2/libxml/xpath.h>
