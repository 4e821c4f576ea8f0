// VirtchanKit is the host side of virtchan as one library: domains (VirtchanProvisioning),
// sessions and exec (VirtchanTransport), file transfer (VirtchanFileTransfer) and the wire types (VirtchanProtocol),
// under one import.
@_exported import VirtchanProtocol
@_exported import VirtchanProvisioning
@_exported import VirtchanTransport
@_exported import VirtchanFileTransfer
