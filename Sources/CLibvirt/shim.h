#ifndef VIRTCHAN_CLIBVIRT_SHIM_H
#define VIRTCHAN_CLIBVIRT_SHIM_H
#include <stddef.h>
#include <stdlib.h>
#include <libvirt/libvirt.h>
#include <libvirt/libvirt-qemu.h>
#include <libvirt/virterror.h>

/* A do-nothing error handler: virtchan turns virGetLastError() into Swift errors itself. */
static void vc_virt_silent_error(void *userData, virErrorPtr error) {
    (void)userData; (void)error;
}

static inline void vc_virt_silence_errors(void) {
    virSetErrorFunc(NULL, vc_virt_silent_error);
}
#endif
