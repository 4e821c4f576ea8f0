#cloud-boothook
#!/bin/sh
# virtchan: installs virtchan-agent from this seed (label cidata, directory virtchan/) and
# starts it. cloud-init runs it early in every boot; it installs only what differs from the
# files in place, so a seed with a newer agent updates the guest at its next boot.
set -eu
log() { echo "virtchan-seed: $*" >&2; }
dev=$(blkid -l -o device -t LABEL=cidata 2>/dev/null || blkid -l -o device -t LABEL=CIDATA 2>/dev/null || true)
[ -n "$dev" ] || { log "no cidata volume; the agent is not (re)installed"; exit 0; }
mnt=$(mktemp -d)
trap 'umount "$mnt" 2>/dev/null || true; rmdir "$mnt"' EXIT
mount -o ro "$dev" "$mnt"
src="$mnt/virtchan"
changed=0
put() { # source, destination, mode
    if ! cmp -s "$src/$1" "$2"; then
        install -D -m "$3" "$src/$1" "$2.virtchan-new" && mv -f "$2.virtchan-new" "$2"
        changed=1
    fi
}
put virtchan-agent /usr/local/sbin/virtchan-agent 0755
put virtchan-agent.service /etc/systemd/system/virtchan-agent.service 0644
put 60-virtchan-agent.rules /etc/udev/rules.d/60-virtchan-agent.rules 0644
put agent.key /etc/virtchan/agent.key 0600
# The policy is the guest's own once written: a later seed never overwrites it.
[ -e /etc/virtchan-agent.conf ] || install -m 0644 "$src/virtchan-agent.conf" /etc/virtchan-agent.conf
if [ $changed = 1 ]; then
    log "installed the agent from $dev"
    systemctl daemon-reload
    udevadm control --reload
    systemctl try-restart virtchan-agent.service || true
fi
# The port appeared before the rule existed on a first boot: let udev see it again.
udevadm trigger --action=add --subsystem-match=virtio-ports
systemctl start --no-block virtchan-agent.service
