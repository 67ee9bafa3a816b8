#!/bin/sh
# /init of the nvme-cli test guest (busybox ash, runs as PID 1).
# Mounts the pseudo filesystems, loads the kernel modules in dependency
# order, configures eth0 for QEMU user networking, runs /test.sh (delivered
# per boot in a second cpio archive) and powers off.  Everything goes to the
# console (ttyS0).
export PATH=/bin:/sbin
export HOME=/root
export LD_LIBRARY_PATH=/lib/x86_64-linux-gnu:/lib/x86_64-linux-gnu/ceph

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs -o size=64m tmpfs /dev/shm
mount -t tmpfs -o size=256m tmpfs /tmp
mount -t tmpfs tmpfs /run
echo /bin/modprobe > /proc/sys/kernel/modprobe 2>/dev/null

echo "@@INIT start $(cat /proc/uptime | cut -d' ' -f1)"

KVER="$(cat /etc/kver)"
load_list() {
    for m in $(cat "$1"); do
        out="$(insmod "/lib/modules/$KVER/$m" 2>&1)" || {
            case "$m" in
                # CPU-feature accelerated variants may legitimately refuse
                *-intel.ko|*-pclmul.ko|*aesni*) ;;
                *) echo "@@INIT insmod $m failed: $out" ;;
            esac
        }
    done
}
load_list /etc/modules.order
if grep -qw tessera.nvmet /proc/cmdline; then
    load_list /etc/modules-nvmet.order
    mount -t configfs none /sys/kernel/config
fi

# network: QEMU user networking (slirp), host reachable as 10.0.2.2
ip link set lo up
i=0
while [ ! -e /sys/class/net/eth0 ] && [ $i -lt 50 ]; do sleep 0.1; i=$((i+1)); done
if [ -e /sys/class/net/eth0 ]; then
    ip link set eth0 up
    ip addr add 10.0.2.15/24 dev eth0
    ip route add default via 10.0.2.2
else
    echo "@@INIT no eth0"
fi

# host identity: fresh uuid per boot unless the test overrides it
mkdir -p /etc/nvme
if [ ! -s /etc/nvme/hostnqn ]; then
    uuid="$(cat /proc/sys/kernel/random/uuid)"
    echo "$uuid" > /etc/nvme/hostid
    echo "nqn.2014-08.org.nvmexpress:uuid:$uuid" > /etc/nvme/hostnqn
fi

for m in nvme_tcp virtio_net; do
    [ -d /sys/module/$m ] || echo "@@INIT module $m not loaded"
done
echo "@@INIT ready $(cat /proc/uptime | cut -d' ' -f1) kernel=$(uname -r) hostnqn=$(cat /etc/nvme/hostnqn)"

# Kernel messages: the kernel's own console output can land in the middle of
# a line the test prints (it bypasses the tty), which would break "@@" markers.
# So the console gets only emergencies/alerts directly, and a relay prints
# every message of level <= warning as whole lines from /dev/kmsg.
dmesg -n 2
# (cat: /dev/kmsg returns one record per large read; the shell's byte-wise
#  read would get EINVAL)
( cat /dev/kmsg | while read -r rec; do
      pri="${rec%%,*}"
      [ "$pri" -le 4 ] 2>/dev/null || continue
      ts="$(echo "$rec" | cut -d, -f3)"
      echo "<kernel $((ts / 1000000)).$(printf '%06d' $((ts % 1000000)))> ${rec#*;}"
  done ) &

if [ -f /test.sh ]; then
    cd /tmp
    sh /test.sh
    rc=$?
    echo "@@TEST-EXIT $rc"
    echo "---- kernel nvme/block messages of this boot ----"
    dmesg | grep -E 'nvme|I/O error|blk_|BUG|WARNING|Oops' | tail -n 200
    echo "---- end kernel messages ----"
else
    echo "@@INIT no /test.sh, starting a shell"
    setsid cttyhack sh
fi
sync
poweroff -f
