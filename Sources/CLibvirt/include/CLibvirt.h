#ifndef VIRTCHAN_CLIBVIRT_H
#define VIRTCHAN_CLIBVIRT_H
/*
 * libvirt, loaded on first use.
 *
 * Linking libvirt.so costs every virtchan process ~25 ms before main (its ~55 shared
 * libraries and their constructors), including the commands that never talk to libvirtd.
 * virtchan therefore uses libvirt's headers for types and constants only, and calls its
 * functions through the vc_-prefixed wrappers below, which dlopen libvirt.so.0 (and
 * libvirt-qemu.so.0) the first time any of them runs.
 */
#include <stddef.h>
#include <stdlib.h>
#include <libvirt/libvirt.h>
#include <libvirt/libvirt-qemu.h>
#include <libvirt/virterror.h>

/* Loads libvirt once. Returns NULL when it is usable, else a message saying why not.
 * Every wrapper calls it; a wrapper whose library is missing returns its failure value
 * (NULL or -1) without touching libvirt. */
const char *vc_virt_load(void);

/* Routes libvirt's error reports to nowhere: virtchan turns virGetLastError() into its
 * own messages. */
void vc_virt_silence_errors(void);

/* ret, failure value, libvirt function, parameters, arguments. */
#define VC_VIRT_FUNCTIONS(X) \
    X(int, -1, virInitialize, (void), ()) \
    X(virErrorPtr, NULL, virGetLastError, (void), ()) \
    X(virConnectPtr, NULL, virConnectOpen, (const char *name), (name)) \
    X(int, -1, virConnectClose, (virConnectPtr conn), (conn)) \
    X(int, -1, virConnectListAllDomains, (virConnectPtr conn, virDomainPtr **domains, unsigned int flags), (conn, domains, flags)) \
    X(virDomainPtr, NULL, virDomainDefineXML, (virConnectPtr conn, const char *xml), (conn, xml)) \
    X(virDomainPtr, NULL, virDomainLookupByName, (virConnectPtr conn, const char *name), (conn, name)) \
    X(const char *, NULL, virDomainGetName, (virDomainPtr domain), (domain)) \
    X(char *, NULL, virDomainGetXMLDesc, (virDomainPtr domain, unsigned int flags), (domain, flags)) \
    X(int, -1, virDomainGetState, (virDomainPtr domain, int *state, int *reason, unsigned int flags), (domain, state, reason, flags)) \
    X(int, -1, virDomainIsActive, (virDomainPtr domain), (domain)) \
    X(int, -1, virDomainCreate, (virDomainPtr domain), (domain)) \
    X(int, -1, virDomainDestroy, (virDomainPtr domain), (domain)) \
    X(int, -1, virDomainReboot, (virDomainPtr domain, unsigned int flags), (domain, flags)) \
    X(int, -1, virDomainUndefine, (virDomainPtr domain), (domain)) \
    X(int, -1, virDomainUndefineFlags, (virDomainPtr domain, unsigned int flags), (domain, flags)) \
    X(int, -1, virDomainFree, (virDomainPtr domain), (domain)) \
    X(int, -1, virDomainSetMetadata, (virDomainPtr domain, int type, const char *metadata, const char *key, const char *uri, unsigned int flags), (domain, type, metadata, key, uri, flags)) \
    X(char *, NULL, virDomainGetMetadata, (virDomainPtr domain, int type, const char *uri, unsigned int flags), (domain, type, uri, flags)) \
    X(virStreamPtr, NULL, virStreamNew, (virConnectPtr conn, unsigned int flags), (conn, flags)) \
    X(int, -1, virDomainOpenChannel, (virDomainPtr domain, const char *name, virStreamPtr st, unsigned int flags), (domain, name, st, flags)) \
    X(int, -1, virStreamSend, (virStreamPtr st, const char *data, size_t nbytes), (st, data, nbytes)) \
    X(int, -1, virStreamRecv, (virStreamPtr st, char *data, size_t nbytes), (st, data, nbytes)) \
    X(int, -1, virStreamFinish, (virStreamPtr st), (st)) \
    X(int, -1, virStreamAbort, (virStreamPtr st), (st)) \
    X(int, -1, virStreamFree, (virStreamPtr st), (st)) \
    X(int, -1, virStreamEventAddCallback, (virStreamPtr st, int events, virStreamEventCallback cb, void *opaque, virFreeCallback ff), (st, events, cb, opaque, ff)) \
    X(int, -1, virStreamEventUpdateCallback, (virStreamPtr st, int events), (st, events)) \
    X(int, -1, virStreamEventRemoveCallback, (virStreamPtr st), (st)) \
    X(int, -1, virEventRegisterDefaultImpl, (void), ()) \
    X(int, -1, virEventRunDefaultImpl, (void), ()) \
    X(int, -1, virEventAddHandle, (int fd, int events, virEventHandleCallback cb, void *opaque, virFreeCallback ff), (fd, events, cb, opaque, ff)) \
    X(int, -1, virEventRemoveHandle, (int watch), (watch)) \
    X(int, -1, virConnectSetKeepAlive, (virConnectPtr conn, int interval, unsigned int count), (conn, interval, count)) \
    X(char *, NULL, virDomainQemuAgentCommand, (virDomainPtr domain, const char *cmd, int timeout, unsigned int flags), (domain, cmd, timeout, flags)) \
    X(char *, NULL, virConnectGetDomainCapabilities, (virConnectPtr conn, const char *emulatorbin, const char *arch, const char *machine, const char *virttype, unsigned int flags), (conn, emulatorbin, arch, machine, virttype, flags)) \
    X(virStoragePoolPtr, NULL, virStoragePoolLookupByName, (virConnectPtr conn, const char *name), (conn, name)) \
    X(virStoragePoolPtr, NULL, virStoragePoolDefineXML, (virConnectPtr conn, const char *xml, unsigned int flags), (conn, xml, flags)) \
    X(int, -1, virStoragePoolBuild, (virStoragePoolPtr pool, unsigned int flags), (pool, flags)) \
    X(int, -1, virStoragePoolUndefine, (virStoragePoolPtr pool), (pool)) \
    X(int, -1, virStoragePoolCreate, (virStoragePoolPtr pool, unsigned int flags), (pool, flags)) \
    X(int, -1, virStoragePoolIsActive, (virStoragePoolPtr pool), (pool)) \
    X(int, -1, virStoragePoolSetAutostart, (virStoragePoolPtr pool, int autostart), (pool, autostart)) \
    X(int, -1, virStoragePoolRefresh, (virStoragePoolPtr pool, unsigned int flags), (pool, flags)) \
    X(int, -1, virStoragePoolFree, (virStoragePoolPtr pool), (pool)) \
    X(virStorageVolPtr, NULL, virStorageVolLookupByName, (virStoragePoolPtr pool, const char *name), (pool, name)) \
    X(int, -1, virStoragePoolListAllVolumes, (virStoragePoolPtr pool, virStorageVolPtr **vols, unsigned int flags), (pool, vols, flags)) \
    X(char *, NULL, virStorageVolGetXMLDesc, (virStorageVolPtr vol, unsigned int flags), (vol, flags)) \
    X(virStorageVolPtr, NULL, virStorageVolCreateXML, (virStoragePoolPtr pool, const char *xml, unsigned int flags), (pool, xml, flags)) \
    X(int, -1, virStorageVolUpload, (virStorageVolPtr vol, virStreamPtr stream, unsigned long long offset, unsigned long long length, unsigned int flags), (vol, stream, offset, length, flags)) \
    X(char *, NULL, virStorageVolGetPath, (virStorageVolPtr vol), (vol)) \
    X(int, -1, virStorageVolGetInfo, (virStorageVolPtr vol, virStorageVolInfoPtr info), (vol, info)) \
    X(int, -1, virStorageVolDelete, (virStorageVolPtr vol, unsigned int flags), (vol, flags)) \
    X(virStorageVolPtr, NULL, virStorageVolLookupByPath, (virConnectPtr conn, const char *path), (conn, path)) \
    X(const char *, NULL, virStorageVolGetName, (virStorageVolPtr vol), (vol)) \
    X(virStoragePoolPtr, NULL, virStoragePoolLookupByVolume, (virStorageVolPtr vol), (vol)) \
    X(const char *, NULL, virStoragePoolGetName, (virStoragePoolPtr pool), (pool)) \
    X(int, -1, virStorageVolFree, (virStorageVolPtr vol), (vol))

#define VC_VIRT_DECLARE(ret, fail, name, params, args) ret vc_##name params;
VC_VIRT_FUNCTIONS(VC_VIRT_DECLARE)
#undef VC_VIRT_DECLARE

void vc_virResetLastError(void);
void vc_virEventUpdateHandle(int watch, int events);

#endif
