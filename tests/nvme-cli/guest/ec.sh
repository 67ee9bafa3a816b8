# Erasure-coded volume boot: the kernel's nvme-tcp host against a whole Tessera system that
# run.py started on the host with `tessera up` (tessera-mgmt, 3 engines x 2 targets,
# tessera-nvmf in managed mode), exporting one EC_2P1 volume as $EC_NQN on $TADDR:$EC_PORT.
# One engine is SIGKILLed (by run.py, on request) while fio's write phase runs. Once the
# service marks it down, the two surviving engines rebuild its shards on their spare targets
# (each group then has two shards on one engine) while fio goes on writing; reads are degraded
# (reconstruction from the surviving cells) only until that rebuild is done, about a second.
# The later passes check every block against what the rebuild produced.
#
# Regions of the volume (all fio jobs are randwrite, 4k..128k blocks, crc32c verify headers,
# and replayable with --verify_only because fio's random sequence repeats by default):
#   ec-base      0 .. 32 MiB   written and verified with all engines up
#   ec-kill     64 .. 128 MiB  written while engine $EC_KILL_RANK is killed, then verified
#   ec-degraded 160 .. 184 MiB written and verified with the engine down (and its shards rebuilt)
#   ec-snapshot 200 .. 208 MiB pattern A, a snapshot exported read-only, then pattern B; a clone
#                              of the snapshot gets pattern C; a rollback brings A back
#   224 MiB .. 228 MiB         never written: a --verify_only there must fail (control)
#   vhost-kill 128 .. 160 MiB written through /dev/vda while engine $VHOST_KILL_RANK is killed (engine
#                              $EC_KILL_RANK restarted and reintegrated first), then verified
#   vhost-*     232 .. 248 MiB written and verified through /dev/vda (vhost-user-blk), then
#                              verified again over NVMe/TCP; 248 .. 250 MiB discard / write zeroes;
#                              252 .. 256 MiB written after the backend was killed and restarted (last)
. /guest-lib.sh      # also ec_connect, ec_fio, ec_reverify, stat_field (shared with guest/heal.sh)

EC_FIO="--ioengine=libaio --direct=1 --rw=randwrite --bsrange=4k-128k --iodepth=16 --numjobs=1 \
--verify=crc32c --verify_fatal=1 --group_reporting --eta=never"
BASE_ARGS="--offset=0 --size=32m"
KILL_ARGS="--offset=64m --size=64m"
DEGR_ARGS="--offset=160m --size=24m"
KILL_AFTER_MIB=8        # the kill is requested once this much of ec-kill has been written

VHOST_ARGS="--offset=232m --size=16m"
VKILL_ARGS="--offset=128m --size=32m"
VHOST_KILL_RANK=2

# ------------------------------------------------------------------ cases
case_ec_discover() {
    disconnect_all
    must "discover" sh -c "nvme discover -t tcp -a $TADDR -s $EC_PORT > /tmp/ecdisc.txt 2>&1"
    _r=$?; cat /tmp/ecdisc.txt; [ $_r = 0 ] || return 1
    awk '$1 == "subnqn:" {print $2}' /tmp/ecdisc.txt > /tmp/ecdisc.nqns
    grep -qxF "$EC_NQN" /tmp/ecdisc.nqns || { fail "discovery log lacks $EC_NQN"; return 1; }
    grep -q 'trtype: *tcp' /tmp/ecdisc.txt || { fail "discovery entry trtype is not tcp"; return 1; }
    grep -q "trsvcid: *$EC_PORT\$" /tmp/ecdisc.txt || { fail "discovery entry trsvcid is not $EC_PORT"; return 1; }
}

case_ec_connect() {
    disconnect_all
    ec_connect || return 1
    d="$(ec_dev)"; c="$(ctrl_of "$EC_NQN" | head -n1)"
    echo "controller $c state=$(cat /sys/class/nvme/$c/state) transport=$(cat /sys/class/nvme/$c/transport) model=$(cat /sys/class/nvme/$c/model)"
    echo "block device /dev/$d size=$(cat /sys/block/$d/size) sectors, logical block $(cat /sys/block/$d/queue/logical_block_size)"
    [ "$(cat /sys/class/nvme/$c/transport)" = tcp ] || { fail "transport is not tcp"; return 1; }
    sz=$(( $(cat /sys/block/$d/size) / 2048 ))
    [ "$sz" = "$EC_SIZE_MIB" ] || { fail "/dev/$d is $sz MiB, expected $EC_SIZE_MIB"; return 1; }
    lbs="$(cat /sys/block/$d/queue/logical_block_size)"
    [ "$lbs" = "$EC_BLOCK_SIZE" ] || { fail "/dev/$d logical block size $lbs, expected $EC_BLOCK_SIZE"; return 1; }
    must "nvme id-ns" sh -c "nvme id-ns /dev/$d > /tmp/ecidns.txt 2>&1"; _r=$?
    [ $_r = 0 ] || { cat /tmp/ecidns.txt; return 1; }
    nsze="$(awk -F: '$1 ~ /^nsze *$/ {gsub(/ /, "", $2); print $2}' /tmp/ecidns.txt)"
    exp=$(( EC_SIZE_MIB * 1048576 / EC_BLOCK_SIZE ))
    [ "$(printf '%d' "$nsze")" = "$exp" ] || { fail "id-ns nsze=$nsze, expected $exp blocks"; return 1; }
    grep "(in use)" /tmp/ecidns.txt
    must "nvme list" sh -c "nvme list | grep /dev/$d"
}

case_ec_fio_verify() {
    ec_ensure_connected || return 1
    ec_fio ec-base $BASE_ARGS --do_verify=1 || return 1
    ec_reverify ec-base 32 $BASE_ARGS || return 1
    # control: the same replay over a region nothing wrote must fail, or the later
    # verify-only passes would prove nothing
    _d="$(ec_dev)"
    echo "\$ fio --name=ec-control --verify_only --offset=224m --size=4m (must fail)"
    timeout 120 fio --name=ec-control --filename="/dev/$_d" $EC_FIO --verify_only --offset=224m --size=4m \
        > /tmp/fio-ec-control.out 2>&1
    _r=$?
    grep -m2 -E 'verify: bad|err=' /tmp/fio-ec-control.out
    [ "$_r" != 0 ] && grep -q 'verify: bad' /tmp/fio-ec-control.out \
        || { fail "control: fio --verify_only over unwritten blocks did not fail (exit $_r)"; return 1; }
}

case_ec_kill_during_write() {
    ec_ensure_connected || return 1
    d="$(ec_dev)"
    w0="$(stat_field "$d" 7)"; r0="$(stat_field "$d" 3)"
    echo "\$ fio --name=ec-kill --filename=/dev/$d $EC_FIO $KILL_ARGS --do_verify=1 &"
    timeout 600 fio --name=ec-kill --filename="/dev/$d" $EC_FIO $KILL_ARGS --do_verify=1 \
        > /tmp/fio-ec-kill.out 2>&1 &
    pid=$!
    # wait until KILL_AFTER_MIB of the write phase is done, then have the host kill an engine
    i=0
    while :; do
        w=$(( ($(stat_field "$d" 7) - w0) / 2048 ))
        [ "$w" -ge "$KILL_AFTER_MIB" ] && break
        kill -0 "$pid" 2>/dev/null || { cat /tmp/fio-ec-kill.out; fail "fio ended before ${KILL_AFTER_MIB} MiB were written"; return 1; }
        [ $i -lt 1200 ] || { kill "$pid"; fail "fio wrote only $w MiB in 120s"; return 1; }
        sleep 0.1; i=$((i + 1))
    done
    echo "ec-kill: $w MiB written, fio pid $pid running; asking the host to kill engine $EC_KILL_RANK"
    request kill-engine "$EC_KILL_RANK" || { kill "$pid"; return 1; }
    wk=$(( ($(stat_field "$d" 7) - w0) / 2048 )); rk=$(( $(stat_field "$d" 3) - r0 ))
    running=no; kill -0 "$pid" 2>/dev/null && running=yes
    echo "ec-kill: engine killed with $wk MiB of 64 written, $rk sectors read so far, fio running: $running"
    wait "$pid"; st=$?
    wf=$(( ($(stat_field "$d" 7) - w0) / 2048 )); rf=$(( ($(stat_field "$d" 3) - r0) / 2048 ))
    echo "ec-kill: fio exit $st; in all $wf MiB written, $rf MiB read (verify phase); $(( wf - wk )) MiB written after the kill"
    echo "ec-kill: write completion latency (the writes held while the engine was not yet marked down):"
    awk '/ write: /{w=1} w && / clat \(/{print; exit}' /tmp/fio-ec-kill.out
    fio_check ec-kill "$st" /tmp/fio-ec-kill.out || return 1
    # the kill really hit the write phase: fio was still writing (nothing read yet, more
    # written afterwards) when the host answered, and the verify phase read everything back
    [ "$running" = yes ] && [ "$rk" = 0 ] || { fail "the kill did not land in fio's write phase (fio running: $running, $rk sectors read before)"; return 1; }
    [ $(( wf - wk )) -ge 8 ] || { fail "only $(( wf - wk )) MiB written after the kill"; return 1; }
    [ "$rf" -ge 64 ] || { fail "verify phase read only $rf MiB of 64"; return 1; }
    request expect-engine-down "$EC_KILL_RANK" 30 || return 1
}

case_ec_reverify_degraded() {
    ec_ensure_connected || return 1
    request expect-engine-down "$EC_KILL_RANK" 5 || return 1
    # the survivors rebuilt the lost engine's shards: these replays read what the rebuild wrote
    request expect-engine-rebuilt "$EC_KILL_RANK" 45 || return 1
    ec_reverify ec-kill 64 $KILL_ARGS || return 1
    ec_reverify ec-base 32 $BASE_ARGS || return 1
}

case_ec_degraded_write() {
    ec_ensure_connected || return 1
    ec_fio ec-degraded $DEGR_ARGS --do_verify=1 || return 1
}

case_ec_reconnect_reverify() {
    ec_ensure_connected || return 1
    disconnect "$EC_NQN" || return 1
    ec_connect || return 1
    ec_reverify ec-base 32 $BASE_ARGS || return 1
    ec_reverify ec-kill 64 $KILL_ARGS || return 1
    ec_reverify ec-degraded 24 $DEGR_ARGS || return 1
    disconnect "$EC_NQN" || return 1
}

# A snapshot taken between two writes, exported read-only beside the volume: the host reads the
# old data from it and the new from the volume; the kernel marks the disk read-only (NSATTR) and
# a passthrough write reaching the target fails with Namespace is Write Protected.
SNAP_NQN="$EC_NQN-snap1"

# connect_ns NQN: connects to namespace 1 of NQN on the cluster's listener, prints its device
connect_ns() {
    echo "\$ nvme connect -t tcp -a $TADDR -s $EC_PORT -n $1" >&2
    timeout 90 nvme connect -t tcp -a "$TADDR" -s "$EC_PORT" -n "$1" $CONNECT_OPTS >&2 \
        || { fail "nvme connect to $1 failed" >&2; return 1; }
    wait_ns_dev "$1" 1 20 || { fail "no block device for $1" >&2; return 1; }
}

case_ec_snapshot() {
    ec_ensure_connected || return 1
    d="$(ec_dev)"
    make_pattern /tmp/snapA 8; make_pattern /tmp/snapB 8
    write_range "$d" 200 /tmp/snapA || { fail "writing pattern A to /dev/$d failed"; return 1; }
    request snapshot-export snap1 "$SNAP_NQN" || return 1
    write_range "$d" 200 /tmp/snapB || { fail "writing pattern B to /dev/$d failed"; return 1; }
    s="$(connect_ns "$SNAP_NQN")" || return 1
    echo "snapshot device /dev/$s: ro=$(cat /sys/block/$s/ro) size=$(cat /sys/block/$s/size) sectors"
    [ "$(cat /sys/block/$s/ro)" = 1 ] || { fail "/dev/$s is not read-only: NSATTR write protection not seen"; return 1; }
    read_range "$s" 200 8 /tmp/snapA.got
    cmp -s /tmp/snapA /tmp/snapA.got || { fail "the snapshot does not read pattern A"; return 1; }
    read_range "$d" 200 8 /tmp/snapB.got
    cmp -s /tmp/snapB /tmp/snapB.got || { fail "the volume does not read pattern B"; return 1; }
    if dd if=/tmp/snapB of="/dev/$s" bs=4k count=1 oflag=direct 2>/tmp/snapdd.err; then
        fail "dd to the read-only snapshot device succeeded"; return 1
    fi
    echo "dd to /dev/$s refused: $(tail -n1 /tmp/snapdd.err)"
    head -c 4096 /tmp/snapB > /tmp/snapblk
    echo "\$ nvme write /dev/$s --start-block=0 --block-count=0 --data-size=4096 --data=/tmp/snapblk"
    nvme write "/dev/$s" --start-block=0 --block-count=0 --data-size=4096 --data=/tmp/snapblk > /tmp/snapnw.out 2>&1
    _r=$?
    cat /tmp/snapnw.out
    [ "$_r" != 0 ] && grep -qi "write protected" /tmp/snapnw.out \
        || { fail "nvme write to the snapshot: exit $_r, not Namespace is Write Protected"; return 1; }
    read_range "$s" 200 8 /tmp/snapA.got
    cmp -s /tmp/snapA /tmp/snapA.got || { fail "the snapshot changed after the refused writes"; return 1; }
    disconnect "$SNAP_NQN" || return 1
}

# A clone of the snapshot: it reads pattern A at once, takes pattern C, and the volume still
# reads B. Then the volume is rolled back to the snapshot (the host disconnects, the export is
# removed and added again around the rollback) and reads A again; the clone keeps C.
CLONE_NQN="$EC_NQN-clone1"
case_ec_clone_rollback() {
    [ -f /tmp/snapA ] && [ -f /tmp/snapB ] || { fail "ec-snapshot did not run first"; return 1; }
    ec_ensure_connected || return 1
    d="$(ec_dev)"
    request clone-export snap1 clone1 "$CLONE_NQN" || return 1
    c="$(connect_ns "$CLONE_NQN")" || return 1
    echo "clone device /dev/$c: ro=$(cat /sys/block/$c/ro) size=$(cat /sys/block/$c/size) sectors"
    [ "$(cat /sys/block/$c/ro)" = 0 ] || { fail "the clone is read-only"; return 1; }
    read_range "$c" 200 8 /tmp/cloneA.got
    cmp -s /tmp/snapA /tmp/cloneA.got || { fail "the new clone does not read pattern A"; return 1; }
    make_pattern /tmp/snapC 8
    write_range "$c" 200 /tmp/snapC || { fail "writing pattern C to the clone failed"; return 1; }
    read_range "$c" 200 8 /tmp/cloneC.got
    cmp -s /tmp/snapC /tmp/cloneC.got || { fail "the clone does not read pattern C"; return 1; }
    read_range "$d" 200 8 /tmp/liveB.got
    cmp -s /tmp/snapB /tmp/liveB.got || { fail "the clone's write reached the volume"; return 1; }
    disconnect "$CLONE_NQN" || return 1
    disconnect "$EC_NQN" || return 1
    request rollback snap1 || return 1
    ec_connect || return 1
    d="$(ec_dev)"
    read_range "$d" 200 8 /tmp/liveA.got
    cmp -s /tmp/snapA /tmp/liveA.got || { fail "after the rollback the volume does not read pattern A"; return 1; }
    # the vhost-user-blk disk's export was removed and added again around the rollback: QEMU
    # reconnected by itself and the guest's /dev/vda reads the rolled-back volume too
    if [ -b /dev/vda ]; then
        read_range vda 200 8 /tmp/vdaA.got
        cmp -s /tmp/snapA /tmp/vdaA.got || { fail "after the rollback /dev/vda does not read pattern A"; return 1; }
        echo "/dev/vda reads pattern A after its export came back"
    fi
    ec_reverify ec-base 32 $BASE_ARGS || return 1
    disconnect "$EC_NQN" || return 1
}

# The same volume as a virtio-blk disk: tessera-nvmf serves it over vhost-user-blk too, and
# QEMU attached it as /dev/vda (shared guest memory, 2 queues).
case_vhost_disk() {
    [ -b /dev/vda ] || { fail "no /dev/vda: the vhost-user-blk disk did not appear"; return 1; }
    _sz="$(cat /sys/block/vda/size)"
    echo "/dev/vda: $_sz sectors, logical block $(cat /sys/block/vda/queue/logical_block_size), $(ls /sys/block/vda/mq | wc -l) queues, serial '$(cat /sys/block/vda/serial 2>/dev/null)'"
    [ "$_sz" = "$((EC_SIZE_MIB * 2048))" ] || { fail "/dev/vda has $_sz sectors, the volume $((EC_SIZE_MIB * 2048))"; return 1; }
    [ "$(cat /sys/block/vda/queue/logical_block_size)" = "$EC_BLOCK_SIZE" ] || { fail "/dev/vda's block size is not the volume's $EC_BLOCK_SIZE"; return 1; }
    [ "$(ls /sys/block/vda/mq | wc -l)" -ge 2 ] || { fail "/dev/vda has one queue, not one per vCPU"; return 1; }
    [ -n "$(cat /sys/block/vda/serial 2>/dev/null)" ] || { fail "/dev/vda has no serial (GET_ID)"; return 1; }
    [ "$(cat /sys/block/vda/ro)" = 0 ] || { fail "/dev/vda is read-only"; return 1; }
}

case_vhost_fio_verify() {
    [ -b /dev/vda ] || { fail "no /dev/vda"; return 1; }
    must "fio over vhost-user-blk" sh -c "fio --name=vhost --filename=/dev/vda $EC_FIO $VHOST_ARGS --do_verify=1 > /tmp/fio-vhost.out 2>&1" \
        || { tail -20 /tmp/fio-vhost.out; return 1; }
    must "fio verify-only over vhost-user-blk" sh -c "fio --name=vhost --filename=/dev/vda $EC_FIO $VHOST_ARGS --verify_only > /tmp/fio-vhost-v.out 2>&1" \
        || { tail -20 /tmp/fio-vhost-v.out; return 1; }
    grep -E 'WRITE:|READ:' /tmp/fio-vhost.out /tmp/fio-vhost-v.out
}

case_vhost_engine_killed() {
    # Engine $EC_KILL_RANK (killed earlier) comes back first, so that the pool can lose another.
    [ -b /dev/vda ] || { fail "no /dev/vda"; return 1; }
    request restart-engine "$EC_KILL_RANK" 60 || return 1
    request expect-engine-reintegrated "$EC_KILL_RANK" 120 || return 1
    w0="$(stat_field vda 7)"; r0="$(stat_field vda 3)"
    echo "\$ fio --name=vhost-kill --filename=/dev/vda $EC_FIO $VKILL_ARGS --do_verify=1 &"
    timeout 600 fio --name=vhost-kill --filename=/dev/vda $EC_FIO $VKILL_ARGS --do_verify=1 > /tmp/fio-vhost-kill.out 2>&1 &
    pid=$!
    i=0
    while :; do
        w=$(( ($(stat_field vda 7) - w0) / 2048 ))
        [ "$w" -ge "$KILL_AFTER_MIB" ] && break
        kill -0 "$pid" 2>/dev/null || { cat /tmp/fio-vhost-kill.out; fail "fio ended before ${KILL_AFTER_MIB} MiB were written"; return 1; }
        [ $i -lt 1200 ] || { kill "$pid"; fail "fio wrote only $w MiB in 120s"; return 1; }
        sleep 0.1; i=$((i + 1))
    done
    request kill-engine "$VHOST_KILL_RANK" || { kill "$pid"; return 1; }
    wk=$(( ($(stat_field vda 7) - w0) / 2048 )); rk=$(( $(stat_field vda 3) - r0 ))
    running=no; kill -0 "$pid" 2>/dev/null && running=yes
    wait "$pid"; st=$?
    wf=$(( ($(stat_field vda 7) - w0) / 2048 )); rf=$(( ($(stat_field vda 3) - r0) / 2048 ))
    echo "vhost-kill: engine $VHOST_KILL_RANK killed with $wk MiB of 32 written (fio running: $running); fio exit $st, $wf MiB written, $rf MiB read back"
    fio_check vhost-kill "$st" /tmp/fio-vhost-kill.out || return 1
    [ "$running" = yes ] && [ "$rk" = 0 ] || { fail "the kill did not land in fio's write phase (fio running: $running, $rk sectors read before)"; return 1; }
    [ $(( wf - wk )) -ge 8 ] || { fail "only $(( wf - wk )) MiB written after the kill"; return 1; }
    [ "$rf" -ge 32 ] || { fail "verify phase read only $rf MiB of 32"; return 1; }
    request expect-engine-down "$VHOST_KILL_RANK" 30 || return 1
    request expect-engine-rebuilt "$VHOST_KILL_RANK" 45 || return 1
    # once more from what the rebuild wrote
    must "fio verify-only over vhost-user-blk after the rebuild" sh -c "fio --name=vhost-kill --filename=/dev/vda $EC_FIO $VKILL_ARGS --verify_only > /tmp/fio-vhost-kill-v.out 2>&1" \
        || { tail -20 /tmp/fio-vhost-kill-v.out; return 1; }
}

case_vhost_discard_zeroes() {
    [ -b /dev/vda ] || { fail "no /dev/vda"; return 1; }
    # 248..250 MiB: non-zero data, then a discard of the first MiB and write-zeroes of the second.
    must "fill" dd if=/dev/urandom of=/dev/vda bs=1M seek=248 count=2 oflag=direct status=none || return 1
    must "blkdiscard" "$BIN_BLKDISCARD" -o $((248 << 20)) -l $((1 << 20)) /dev/vda || return 1
    must "blkdiscard -z" "$BIN_BLKDISCARD" -z -o $((249 << 20)) -l $((1 << 20)) /dev/vda || return 1
    echo 3 > /proc/sys/vm/drop_caches
    dd if=/dev/vda of=/tmp/vz bs=1M skip=248 count=2 iflag=direct status=none || { fail "reading back"; return 1; }
    dd if=/dev/zero of=/tmp/zero bs=1M count=2 status=none
    cmp /tmp/vz /tmp/zero || { fail "discarded / zeroed blocks do not read as zeros"; return 1; }
}

case_vhost_idle() {
    # An idle disk costs the backend nothing: its queue workers sleep until the guest kicks.
    [ -b /dev/vda ] || { fail "no /dev/vda"; return 1; }
    sync
    request nvmf-idle-cpu 3 60 || return 1
}

case_vhost_same_over_nvme() {
    # One volume, two front ends: what fio wrote over vhost-user-blk verifies over NVMe/TCP.
    ec_ensure_connected || return 1
    ec_reverify vhost 16 $VHOST_ARGS || return 1
}

case_vhost_backend_restart() {
    # The backend (tessera-nvmf) is SIGKILLed and started again while /dev/vda is idle: QEMU
    # reconnects by itself and the disk goes on, with what it held.
    [ -b /dev/vda ] || { fail "no /dev/vda"; return 1; }
    sync
    request restart-nvmf 60 || return 1
    must "fio verify-only over vhost-user-blk after the restart" sh -c "fio --name=vhost --filename=/dev/vda $EC_FIO $VHOST_ARGS --verify_only > /tmp/fio-vhost-r.out 2>&1" \
        || { tail -20 /tmp/fio-vhost-r.out; return 1; }
    must "fio write and verify after the restart" sh -c "fio --name=vhost2 --filename=/dev/vda $EC_FIO --offset=252m --size=4m --do_verify=1 > /tmp/fio-vhost-r2.out 2>&1" \
        || { tail -20 /tmp/fio-vhost-r2.out; return 1; }
}

run_case ec-discover            case_ec_discover
run_case ec-connect             case_ec_connect
run_case ec-fio-verify          case_ec_fio_verify
run_case ec-kill-during-write   case_ec_kill_during_write
run_case ec-reverify-degraded   case_ec_reverify_degraded
run_case ec-degraded-write      case_ec_degraded_write
run_case ec-reconnect-reverify  case_ec_reconnect_reverify
run_case vhost-disk             case_vhost_disk
run_case vhost-fio-verify       case_vhost_fio_verify
run_case vhost-engine-killed    case_vhost_engine_killed
run_case vhost-discard-zeroes   case_vhost_discard_zeroes
run_case vhost-idle             case_vhost_idle
run_case vhost-same-over-nvme   case_vhost_same_over_nvme
run_case ec-snapshot            case_ec_snapshot
run_case ec-clone-rollback      case_ec_clone_rollback
run_case vhost-backend-restart  case_vhost_backend_restart
