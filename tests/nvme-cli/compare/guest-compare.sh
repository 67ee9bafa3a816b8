#!/bin/sh
# Same-guest comparison (guest side, run as /test.sh by kernel_compare.py): the same fio jobs
# through the kernel's nvme-tcp host on 127.0.0.1 against
#   (a) the kernel's nvmet-tcp target over a brd RAM disk, configured through configfs, and
#   (b) tessera-nvmf (/bin/tessera-nvmf, shipped in the per-boot cpio) with a malloc namespace, and
#   (c) an EC_2P1 volume of a whole Tessera system started in the guest with `tessera up`
#       (management service, 3 engines x 2 targets with their files in the guest's RAM, the
#       target in managed mode).
# Every device is SIZE_MIB large and written once in full before the jobs. Each fio run's JSON
# goes to the console between "@@KC-BEGIN <target> <job>" and "@@KC-END" lines.
. /guest-lib.sh
TADDR=127.0.0.1
NQN_K=nqn.2026-11.io.tessera:kernel-compare
NQN_T=nqn.2026-11.io.tessera:tessera-compare
NQN_EC=nqn.2026-11.io.tessera:vol0
C=/sys/kernel/config/nvmet
KVER="$(cat /etc/kver)"

die() { echo "@@KC-ERROR $*"; exit 1; }

start_kernel_target() {
    # brd was loaded at boot with its defaults; reload it with one disk of the size we want.
    rmmod brd 2>/dev/null
    insmod "/lib/modules/$KVER/kernel/drivers/block/brd.ko" rd_nr=1 rd_size=$((SIZE_MIB * 1024)) || return 1
    [ -b /dev/ram0 ] || return 1
    mkdir "$C/subsystems/$NQN_K" && echo 1 > "$C/subsystems/$NQN_K/attr_allow_any_host" || return 1
    mkdir "$C/subsystems/$NQN_K/namespaces/1" || return 1
    echo -n /dev/ram0 > "$C/subsystems/$NQN_K/namespaces/1/device_path" || return 1
    echo 1 > "$C/subsystems/$NQN_K/namespaces/1/enable" || return 1
    mkdir "$C/ports/1" || return 1
    echo tcp > "$C/ports/1/addr_trtype"; echo ipv4 > "$C/ports/1/addr_adrfam"
    echo 127.0.0.1 > "$C/ports/1/addr_traddr"; echo "$KPORT" > "$C/ports/1/addr_trsvcid"
    ln -s "$C/subsystems/$NQN_K" "$C/ports/1/subsystems/$NQN_K"
}

start_tessera() {
    cat > /tmp/tessera.toml <<TOML
listen = ["127.0.0.1:$TESSERA_PORT"]

[[subsystem]]
nqn = "$NQN_T"
allow_any_host = true

[[subsystem.namespace]]
nsid = 1
bdev = "malloc"
size_mib = $SIZE_MIB
block_size = 512
TOML
    echo "\$ tessera-nvmf --config /tmp/tessera.toml $TESSERA_ARGS"
    /bin/tessera-nvmf --config /tmp/tessera.toml $TESSERA_ARGS > /tmp/tessera.log 2>&1 &
    TESSERA_PID=$!
    i=0
    while ! nvme discover -t tcp -a 127.0.0.1 -s "$TESSERA_PORT" >/dev/null 2>&1; do
        i=$((i + 1)); [ $i -lt 50 ] || { cat /tmp/tessera.log; return 1; }
        sleep 0.2
    done
}

start_tessera_ec() {
    # The engines' files need more room than /tmp's 256 MiB: a file system of their own in RAM.
    mkdir -p /tup && mount -t tmpfs -o size=1200m tmpfs /tup || return 1
    echo "\$ tessera up --dir /tup --engines 3 --class EC_2P1 --volume-size ${SIZE_MIB}M --listen 127.0.0.1:$EC_PORT"
    /bin/tessera up --dir /tup --engines 3 --class EC_2P1 --volume-size "${SIZE_MIB}M" --target-capacity 128M \
        --listen "127.0.0.1:$EC_PORT" --timeout 300 > /tmp/tup.log 2>&1 &
    i=0
    while ! nvme discover -t tcp -a 127.0.0.1 -s "$EC_PORT" 2>/dev/null | grep -q "$NQN_EC"; do
        i=$((i + 1)); [ $i -lt 600 ] || { cat /tmp/tup.log; return 1; }
        sleep 0.5
    done
}

# The EC system's daemon logs, on the console (after a failure, or at the end).
ec_logs() {
    echo "--- tessera up"; cat /tmp/tup.log
    for f in /tup/logs/*.log; do echo "--- $f"; tail -n 40 "$f"; done
    free -m; df -m /tup
}

# measure LABEL NQN PORT: connect, fill the device, run every job, disconnect
measure() {
    TPORT="$3"
    connect "$2" || die "connect to $1 failed"
    i=0; d=""
    while [ -z "$d" ] && [ $i -lt 50 ]; do d="$(ns_dev "$2" 1)"; [ -n "$d" ] || sleep 0.1; i=$((i + 1)); done
    [ -n "$d" ] || die "no block device for $1"
    echo "$1: /dev/$d, $(cat /sys/block/$d/size) sectors; filling it"
    dd if=/dev/zero of="/dev/$d" bs=1M count="$SIZE_MIB" oflag=direct > /tmp/dd.log 2>&1 \
        || { cat /tmp/dd.log; [ "$1" = tessera-ec ] && ec_logs; die "filling $1 failed"; }
    tail -n1 /tmp/dd.log
    for job in $JOBS; do
        DEV="/dev/$d" RUNTIME="$RUNTIME" fio --output-format=json "/fio-jobs/$job.fio" > /tmp/fio.json 2> /tmp/fio.err \
            || { cat /tmp/fio.err; [ "$1" = tessera-ec ] && ec_logs; die "fio $job against $1 failed"; }
        echo "@@KC-BEGIN $1 $job"
        cat /tmp/fio.json
        echo "@@KC-END"
    done
    nvme disconnect -n "$2" > /dev/null
}

echo "kernel $(uname -r), $(nproc) CPUs, $(grep MemTotal /proc/meminfo)"
start_kernel_target || die "configuring nvmet over brd failed"
measure kernel "$NQN_K" "$KPORT"
start_tessera || die "tessera-nvmf did not start"
measure tessera "$NQN_T" "$TESSERA_PORT"
kill "$TESSERA_PID" 2>/dev/null
start_tessera_ec || die "tessera up did not start"
measure tessera-ec "$NQN_EC" "$EC_PORT"
ec_logs
echo "@@KC-DONE"
