#!/bin/sh
# An example first-boot script for the built-in tiny guest: it sets the hostname, adds a
# user and writes a message of the day, printing what it does as it goes.
set -e
echo "bootstrap: setting the hostname"
hostname demo-vm
echo "bootstrap: adding user alice"
grep -q '^alice:' /etc/passwd || echo 'alice:x:1000:1000:Alice:/home/alice:/bin/sh' >> /etc/passwd
mkdir -p /home/alice
echo "bootstrap: writing /etc/motd"
echo "${GREETING:-hello}; provisioned by virtchan at $(date)" > /etc/motd
echo "bootstrap: done"
