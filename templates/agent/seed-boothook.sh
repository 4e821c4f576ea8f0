#cloud-boothook
#!/bin/sh
# virtchan: installs virtchan-agent from this seed (label cidata, directory virtchan/) and
# starts it. cloud-init runs it early in every boot. It installs the seed's files when they
# differ from the last seed it installed from (a first boot, or a seed virtchan rewrote), so an
# agent updated since (virtchan update-agent) is left alone.
set -eu
log() { echo "virtchan-seed: $*" >&2; }
dev=$(blkid -l -o device -t LABEL=cidata 2>/dev/null || blkid -l -o device -t LABEL=CIDATA 2>/dev/null || true)
[ -n "$dev" ] || { log "no cidata volume; the agent is not (re)installed"; exit 0; }
mnt=$(mktemp -d)
trap 'umount "$mnt" 2>/dev/null || true; rmdir "$mnt"' EXIT
mount -o ro "$dev" "$mnt"
src="$mnt/virtchan"
# Where the agent goes is where the seed's unit starts it from.
agent=$(sed -n 's/^ExecStart=//p' "$src/virtchan-agent.service")
[ -n "$agent" ] || { log "the seed's unit names no ExecStart; the agent is not installed"; exit 1; }
record=/var/lib/virtchan/seed-payload.sha256
payload=$(cd "$src" && sha256sum virtchan-agent virtchan-agent.service 60-virtchan-agent.rules agent.key | sha256sum | cut -d' ' -f1)
if [ "$(cat "$record" 2>/dev/null || true)" != "$payload" ]; then
    install -D -m 0755 "$src/virtchan-agent" "$agent.virtchan-new"
    mv -f "$agent.virtchan-new" "$agent"
    install -D -m 0644 "$src/virtchan-agent.service" /etc/systemd/system/virtchan-agent.service
    install -D -m 0644 "$src/60-virtchan-agent.rules" /etc/udev/rules.d/60-virtchan-agent.rules
    install -D -m 0600 "$src/agent.key" /etc/virtchan/agent.key
    # The policy is the guest's own once written: a later seed never overwrites it.
    [ -e /etc/virtchan-agent.conf ] || install -m 0644 "$src/virtchan-agent.conf" /etc/virtchan-agent.conf
    mkdir -p /var/lib/virtchan
    echo "$payload" > "$record"
    log "installed the agent from $dev"
    systemctl daemon-reload
    udevadm control --reload
    systemctl try-restart virtchan-agent.service || true
fi
# The port appeared before the rule existed on a first boot: let udev see it again.
udevadm trigger --action=add --subsystem-match=virtio-ports
systemctl start --no-block virtchan-agent.service
