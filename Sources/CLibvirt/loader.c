#include "CLibvirt.h"

#include <dlfcn.h>
#include <pthread.h>
#include <stdio.h>

static struct {
#define VC_VIRT_POINTER(ret, fail, name, params, args) __typeof__(name) *name;
    VC_VIRT_FUNCTIONS(VC_VIRT_POINTER)
#undef VC_VIRT_POINTER
    __typeof__(virResetLastError) *virResetLastError;
    __typeof__(virSetErrorFunc) *virSetErrorFunc;
    __typeof__(virEventUpdateHandle) *virEventUpdateHandle;
} fn;

static pthread_once_t load_once = PTHREAD_ONCE_INIT;
static char load_error[512];

static void *find(void *virt, void *qemu, const char *symbol) {
    void *p = dlsym(virt, symbol);
    if (!p && qemu) p = dlsym(qemu, symbol);
    if (!p && !load_error[0])
        snprintf(load_error, sizeof load_error, "the libvirt client library has no %s; install libvirt 6.0 or newer", symbol);
    return p;
}

static void load(void) {
    void *virt = dlopen("libvirt.so.0", RTLD_NOW | RTLD_GLOBAL);
    if (!virt) {
        snprintf(load_error, sizeof load_error,
                 "cannot load the libvirt client library (%s); install it with: apt-get install libvirt0", dlerror());
        return;
    }
    void *qemu = dlopen("libvirt-qemu.so.0", RTLD_NOW | RTLD_GLOBAL);
#define VC_VIRT_FIND(ret, fail, name, params, args) fn.name = (__typeof__(name) *)find(virt, qemu, #name);
    VC_VIRT_FUNCTIONS(VC_VIRT_FIND)
#undef VC_VIRT_FIND
    fn.virResetLastError = (__typeof__(virResetLastError) *)find(virt, qemu, "virResetLastError");
    fn.virSetErrorFunc = (__typeof__(virSetErrorFunc) *)find(virt, qemu, "virSetErrorFunc");
    fn.virEventUpdateHandle = (__typeof__(virEventUpdateHandle) *)find(virt, qemu, "virEventUpdateHandle");
}

const char *vc_virt_load(void) {
    pthread_once(&load_once, load);
    return load_error[0] ? load_error : NULL;
}

#define VC_VIRT_DEFINE(ret, fail, name, params, args) \
    ret vc_##name params { \
        if (vc_virt_load() && !fn.name) return fail; \
        return fn.name args; \
    }
VC_VIRT_FUNCTIONS(VC_VIRT_DEFINE)
#undef VC_VIRT_DEFINE

void vc_virResetLastError(void) {
    if (vc_virt_load() && !fn.virResetLastError) return;
    fn.virResetLastError();
}

void vc_virEventUpdateHandle(int watch, int events) {
    if (vc_virt_load() && !fn.virEventUpdateHandle) return;
    fn.virEventUpdateHandle(watch, events);
}

static void silent(void *user_data, virErrorPtr error) {
    (void)user_data;
    (void)error;
}

void vc_virt_silence_errors(void) {
    if (vc_virt_load() && !fn.virSetErrorFunc) return;
    fn.virSetErrorFunc(NULL, silent);
}
