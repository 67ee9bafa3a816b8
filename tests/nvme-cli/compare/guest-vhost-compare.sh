#!/bin/sh
# vhost-user-blk against NVMe/TCP in one guest (guest side, run as /test.sh by vhost_compare.py):
# one EC_2P1 volume of a Tessera system that `tessera up` runs on the host is this guest's
# /dev/vda (vhost-user-blk, 2 queues) and, through the guest's own nvme-tcp host over QEMU's user
# network, an NVMe namespace. The same fio jobs run on both, interleaved, ROUNDS times. Around
# each run the guest asks the host to sample the CPU time of tessera-nvmf and QEMU
# ("@@REQUEST cpu-begin|cpu-end DEVICE JOB ROUND"), and counts its own busy CPU time (/proc/stat)
# and the I/Os its block layer completed (/sys/block/DEV/stat, ramp included). Each run's fio
# JSON goes to the console between "@@VC-BEGIN DEVICE JOB ROUND" and "@@VC-END", followed by
# "@@VC-GUEST busy_ticks ios".
. /guest-lib.sh

die() { echo "@@VC-ERROR $*"; exit 1; }

busy_ticks() { awk '/^cpu /{print $2 + $3 + $4 + $7 + $8}' /proc/stat; }
# I/Os completed (reads + writes): for the NVMe namespace, summed over its path devices
# (nvmeXcYnZ; the multipath node does not count); for vda, its own.
EC_NQN="$NQN"
ios() { echo $(( $(stat_field "$1" 1) + $(stat_field "$1" 5) )); }

echo "kernel $(uname -r), $(nproc) CPUs, $(grep MemTotal /proc/meminfo)"
[ -b /dev/vda ] || die "no /dev/vda: the vhost-user-blk disk did not appear"
echo "\$ nvme connect -t tcp -a $TADDR -s $TPORT -n $NQN"
timeout 90 nvme connect -t tcp -a "$TADDR" -s "$TPORT" -n "$NQN" || die "nvme connect failed"
i=0; n=""
while [ -z "$n" ] && [ $i -lt 100 ]; do n="$(ns_dev "$NQN" 1)"; [ -n "$n" ] || sleep 0.1; i=$((i + 1)); done
[ -n "$n" ] || die "no namespace block device"
[ "$(cat /sys/block/vda/size)" = "$(cat /sys/block/$n/size)" ] || die "/dev/vda and /dev/$n differ in size"
echo "vhost: /dev/vda, nvme: /dev/$n, $(cat /sys/block/vda/size) sectors; filling the volume once"
dd if=/dev/zero of=/dev/vda bs=1M count="$SIZE_MIB" oflag=direct > /tmp/dd.log 2>&1 || { cat /tmp/dd.log; die "filling failed"; }
tail -n1 /tmp/dd.log

run() {  # run LABEL DEV JOB ROUND
    request cpu-begin "$1" "$3" "$4" || die "host did not sample"
    b0="$(busy_ticks)"; i0="$(ios "$2")"
    DEV="/dev/$2" RUNTIME="$RUNTIME" fio --output-format=json "/fio-jobs/$3.fio" > /tmp/fio.json 2> /tmp/fio.err \
        || { cat /tmp/fio.err; die "fio $3 on $1 failed"; }
    b1="$(busy_ticks)"; i1="$(ios "$2")"
    request cpu-end "$1" "$3" "$4" || die "host did not sample"
    echo "@@VC-BEGIN $1 $3 $4"
    cat /tmp/fio.json
    echo "@@VC-END"
    echo "@@VC-GUEST $((b1 - b0)) $((i1 - i0))"
}

r=1
while [ "$r" -le "$ROUNDS" ]; do
    for job in $JOBS; do
        # alternate which front end goes first
        if [ $((r % 2)) = 1 ]; then
            run vhost vda "$job" "$r"; run nvme "$n" "$job" "$r"
        else
            run nvme "$n" "$job" "$r"; run vhost vda "$job" "$r"
        fi
    done
    r=$((r + 1))
done
nvme disconnect -n "$NQN" > /dev/null
echo "@@VC-DONE"
