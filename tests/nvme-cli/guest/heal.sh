# Self-healing boot: the kernel's nvme-tcp host against a whole Tessera system that run.py
# started on the host with `tessera up --engines 4` (tessera-mgmt, 4 engines x 2 targets,
# tessera-nvmf in managed mode), exporting one EC_2P1 volume as $EC_NQN on $TADDR:$EC_PORT.
#
#   1. engine $HEAL_KILL_FIRST is SIGKILLed (by run.py, on request) during fio's write phase;
#      the service marks it down and the three survivors rebuild its shards (each group on
#      three distinct engines again) while fio goes on: the guest asks the host to wait for
#      the rebuild (its targets DOWNOUT, rebuild idle) with fio still running;
#   2. engine $HEAL_KILL_SECOND is SIGKILLed: every block is verified at once (reads held until
#      it is marked down, then degraded, then from the rebuilt shards); once its shards are
#      rebuilt on the two survivors (two shards of a group on one engine) more is written;
#   3. run.py restarts the killed engines from the engine.toml tessera up wrote, the most
#      recent failure first, each reintegrated (its targets UPIN) before the next; then every
#      target is UPIN on distinct engines and every block is verified again;
#   4. multipath: `tessera up --path` started a second tessera-nvmf ($EC_PORT2) serving the
#      same subsystem; the guest connects to both, sees one namespace with two paths (ANA
#      optimized / non-optimized), the optimized target is SIGKILLed during fio's writes and
#      fio finishes on the other path without an error; restarted, the path comes back;
#      reservations made through one path's controller are reported through the other's.
#
# Regions of the volume (all fio jobs are randwrite, 4k..128k blocks, crc32c verify headers,
# and replayable with --verify_only because fio's random sequence repeats by default):
#   heal-base      0 .. 16 MiB   written with all four engines up
#   heal-kill     32 .. 96 MiB   written while engine $HEAL_KILL_FIRST is killed and rebuilt
#   heal-two-down 128 .. 144 MiB written with two engines down (both rebuilt)
#   mp-failover   160 .. 192 MiB written while the optimized path's target is killed
. /guest-lib.sh      # also ec_connect, ec_fio, ec_reverify, stat_field (shared with guest/ec.sh)

EC_FIO="--ioengine=libaio --direct=1 --rw=randwrite --bsrange=4k-128k --iodepth=16 --numjobs=1 \
--verify=crc32c --verify_fatal=1 --group_reporting --eta=never"
BASE_ARGS="--offset=0 --size=16m"
KILL_ARGS="--offset=32m --size=64m"
KILL_MIB=64
TWO_ARGS="--offset=128m --size=16m"
KILL_AFTER_MIB=8        # the first kill is requested once this much of heal-kill has been written
REQUEST_TIMEOUT=150     # the host waits up to 90 s for a reintegration
MP_ARGS="--offset=160m --size=32m"
MP_OPTS="-l 120 -c 1"   # a path's controller retries every second for 2 minutes

case_heal_connect() {
    disconnect_all
    ec_connect || return 1
    d="$(ec_dev)"
    sz=$(( $(cat /sys/block/$d/size) / 2048 ))
    lbs="$(cat /sys/block/$d/queue/logical_block_size)"
    echo "block device /dev/$d: $sz MiB, logical block $lbs"
    [ "$sz" = "$EC_SIZE_MIB" ] || { fail "/dev/$d is $sz MiB, expected $EC_SIZE_MIB"; return 1; }
    [ "$lbs" = "$EC_BLOCK_SIZE" ] || { fail "/dev/$d logical block size $lbs, expected $EC_BLOCK_SIZE"; return 1; }
}

case_heal_fio_verify() {
    ec_ensure_connected || return 1
    ec_fio heal-base $BASE_ARGS --do_verify=1 || return 1
}

case_heal_rebuild_during_write() {
    ec_ensure_connected || return 1
    d="$(ec_dev)"
    w0="$(stat_field "$d" 7)"; r0="$(stat_field "$d" 3)"
    echo "\$ fio --name=heal-kill --filename=/dev/$d $EC_FIO $KILL_ARGS --do_verify=1 &"
    timeout 600 fio --name=heal-kill --filename="/dev/$d" $EC_FIO $KILL_ARGS --do_verify=1 \
        > /tmp/fio-heal-kill.out 2>&1 &
    pid=$!
    i=0
    while :; do
        w=$(( ($(stat_field "$d" 7) - w0) / 2048 ))
        [ "$w" -ge "$KILL_AFTER_MIB" ] && break
        kill -0 "$pid" 2>/dev/null || { cat /tmp/fio-heal-kill.out; fail "fio ended before ${KILL_AFTER_MIB} MiB were written"; return 1; }
        [ $i -lt 1200 ] || { kill "$pid"; fail "fio wrote only $w MiB in 120s"; return 1; }
        sleep 0.1; i=$((i + 1))
    done
    echo "heal-kill: $w MiB written, fio pid $pid running; asking the host to kill engine $HEAL_KILL_FIRST"
    request kill-engine "$HEAL_KILL_FIRST" || { kill "$pid"; return 1; }
    wk=$(( ($(stat_field "$d" 7) - w0) / 2048 )); rk=$(( $(stat_field "$d" 3) - r0 ))
    running=no; kill -0 "$pid" 2>/dev/null && running=yes
    echo "heal-kill: engine killed with $wk MiB of $KILL_MIB written, $rk sectors read so far, fio running: $running"
    # fio goes on; the host answers once the service shows the killed engine's shards rebuilt
    # (its targets DOWNOUT, no rebuild running)
    request expect-engine-rebuilt "$HEAL_KILL_FIRST" 60 || { kill "$pid"; wait "$pid"; return 1; }
    wr=$(( ($(stat_field "$d" 7) - w0) / 2048 )); rr=$(( ($(stat_field "$d" 3) - r0) / 2048 ))
    phase=ended
    if kill -0 "$pid" 2>/dev/null; then
        if [ "$rr" = 0 ]; then phase=writing; else phase=verifying; fi
    fi
    echo "heal-kill: rebuild seen done with $wr MiB of $KILL_MIB written and $rr MiB read: fio $phase"
    wait "$pid"; st=$?
    wf=$(( ($(stat_field "$d" 7) - w0) / 2048 )); rf=$(( ($(stat_field "$d" 3) - r0) / 2048 ))
    echo "heal-kill: fio exit $st; in all $wf MiB written, $rf MiB read (verify phase); $(( wf - wk )) MiB written after the kill, $(( wf - wr )) after the rebuild"
    echo "heal-kill: write completion latency (the writes held while the engine was not yet marked down):"
    awk '/ write: /{w=1} w && / clat \(/{print; exit}' /tmp/fio-heal-kill.out
    fio_check heal-kill "$st" /tmp/fio-heal-kill.out || return 1
    [ "$running" = yes ] && [ "$rk" = 0 ] || { fail "the kill did not land in fio's write phase (fio running: $running, $rk sectors read before)"; return 1; }
    [ "$phase" != ended ] || { fail "fio had ended before the rebuild was seen done ($wr MiB written): the rebuild did not overlap fio"; return 1; }
    [ $(( wf - wk )) -ge 8 ] || { fail "only $(( wf - wk )) MiB written after the kill"; return 1; }
    [ "$rf" -ge "$KILL_MIB" ] || { fail "verify phase read only $rf MiB of $KILL_MIB"; return 1; }
}

case_heal_second_kill_verify() {
    ec_ensure_connected || return 1
    request expect-engine-rebuilt "$HEAL_KILL_FIRST" 5 || return 1
    request kill-engine "$HEAL_KILL_SECOND" || return 1
    # at once, no waiting: reads of its cells are held until the service marks it down, then
    # reconstructed from the group's two other cells until its shards are rebuilt
    ec_reverify heal-kill "$KILL_MIB" $KILL_ARGS || return 1
    ec_reverify heal-base 16 $BASE_ARGS || return 1
    request expect-engine-down "$HEAL_KILL_SECOND" 30 || return 1
    request expect-engine-rebuilt "$HEAL_KILL_SECOND" 60 || return 1
}

case_heal_two_down_write() {
    ec_ensure_connected || return 1
    ec_fio heal-two-down $TWO_ARGS --do_verify=1 || return 1
    # both engines' shards now sit on the two survivors: read everything from there
    ec_reverify heal-kill "$KILL_MIB" $KILL_ARGS || return 1
    ec_reverify heal-base 16 $BASE_ARGS || return 1
}

case_heal_reintegrate() {
    ec_ensure_connected || return 1
    # the most recent failure first: reintegrating an older failure while a newer one is still
    # out can stall on EC_2P1 (a known limitation)
    request restart-engine "$HEAL_KILL_SECOND" 60 || return 1
    request expect-engine-reintegrated "$HEAL_KILL_SECOND" 90 || return 1
    request restart-engine "$HEAL_KILL_FIRST" 60 || return 1
    request expect-engine-reintegrated "$HEAL_KILL_FIRST" 90 || return 1
    request expect-pool-healthy 30 || return 1
}

case_heal_reverify_reintegrated() {
    ec_ensure_connected || return 1
    ec_reverify heal-base 16 $BASE_ARGS || return 1
    ec_reverify heal-kill "$KILL_MIB" $KILL_ARGS || return 1
    ec_reverify heal-two-down 16 $TWO_ARGS || return 1
    disconnect "$EC_NQN" || return 1
}

# mp_path PORT: the path device (nvmeXcYnZ) of $EC_NQN whose controller is connected to PORT
mp_path() {
    for _p in /sys/block/nvme*c*n*; do
        [ -e "$_p/device/address" ] || continue
        [ "$(cat "$_p/device/subsysnqn" 2>/dev/null)" = "$EC_NQN" ] || continue
        grep -q "trsvcid=$1\b" "$_p/device/address" && { basename "$_p"; return 0; }
    done
    return 1
}

# mp_wait PORT STATE SECONDS: until the path through PORT is live in ANA state STATE
mp_wait() {
    _i=0
    while [ $_i -lt $(( $3 * 5 )) ]; do
        _p="$(mp_path "$1")"
        if [ -n "$_p" ] && [ "$(cat "/sys/block/$_p/device/state" 2>/dev/null)" = live ] \
            && [ "$(cat "/sys/block/$_p/ana_state" 2>/dev/null)" = "$2" ]; then
            echo "path $_p (port $1): live, $2"
            return 0
        fi
        sleep 0.2; _i=$((_i + 1))
    done
    fail "the path through port $1 is not live and $2 within $3 s (path ${_p:-none}, state $(cat "/sys/block/$_p/device/state" 2>/dev/null), ana $(cat "/sys/block/$_p/ana_state" 2>/dev/null))"
    return 1
}

case_mp_two_paths() {
    [ -n "$EC_PORT2" ] || { fail "no second path (EC_PORT2)"; return 1; }
    [ -z "$(ctrl_of "$EC_NQN")" ] || disconnect "$EC_NQN" || return 1
    for _port in "$EC_PORT" "$EC_PORT2"; do
        echo "\$ nvme connect -t tcp -a $TADDR -s $_port -n $EC_NQN $MP_OPTS"
        timeout 90 nvme connect -t tcp -a "$TADDR" -s "$_port" -n "$EC_NQN" $MP_OPTS || { fail "nvme connect to port $_port failed"; return 1; }
    done
    wait_ns_dev "$EC_NQN" 1 20 >/dev/null || { fail "no block device for $EC_NQN"; return 1; }
    nvme list-subsys 2>&1 | sed -n '1,20p'
    _heads=0
    for b in /sys/block/nvme*n1; do
        case "$(basename "$b")" in nvme*c*n*) continue ;; esac
        [ "$(cat "$b/device/subsysnqn" 2>/dev/null)" = "$EC_NQN" ] && _heads=$((_heads + 1))
    done
    [ "$_heads" = 1 ] || { fail "$_heads block devices for $EC_NQN, expected one namespace with two paths"; return 1; }
    [ "$(ctrl_of "$EC_NQN" | wc -l)" = 2 ] || { fail "controllers of $EC_NQN: $(ctrl_of "$EC_NQN" | tr '\n' ' ')"; return 1; }
    mp_wait "$EC_PORT" optimized 20 || return 1
    mp_wait "$EC_PORT2" non-optimized 20 || return 1
    for c in $(ctrl_of "$EC_NQN"); do echo "$c: cntlid $(cat /sys/class/nvme/$c/cntlid), $(cat /sys/class/nvme/$c/address)"; done
    # the namespace sends I/O down the optimized path
    _d="$(ec_dev)"
    echo "iopolicy $(cat /sys/class/nvme-subsystem/$(basename "$(readlink -f /sys/block/$_d/device)")/iopolicy 2>/dev/null)"
}

case_mp_switch_optimized() {
    # the operator moves the optimized path: the targets send an ANA change event and the host
    # reads the new states; then back
    request set-optimized "$EC_PORT2" || return 1
    mp_wait "$EC_PORT2" optimized 20 || return 1
    mp_wait "$EC_PORT" non-optimized 5 || return 1
    request set-optimized "$EC_PORT" || return 1
    mp_wait "$EC_PORT" optimized 20 || return 1
    mp_wait "$EC_PORT2" non-optimized 5 || return 1
}

case_mp_failover() {
    _d="$(ec_dev)" || { fail "no block device"; return 1; }
    w0="$(stat_field "$_d" 7)"; r0="$(stat_field "$_d" 3)"
    echo "\$ fio --name=mp-failover --filename=/dev/$_d $EC_FIO $MP_ARGS --do_verify=1 &"
    timeout 600 fio --name=mp-failover --filename="/dev/$_d" $EC_FIO $MP_ARGS --do_verify=1 > /tmp/fio-mp.out 2>&1 &
    pid=$!
    i=0
    while :; do
        w=$(( ($(stat_field "$_d" 7) - w0) / 2048 ))
        [ "$w" -ge "$KILL_AFTER_MIB" ] && break
        kill -0 "$pid" 2>/dev/null || { cat /tmp/fio-mp.out; fail "fio ended before ${KILL_AFTER_MIB} MiB were written"; return 1; }
        [ $i -lt 1200 ] || { kill "$pid"; fail "fio wrote only $w MiB in 120s"; return 1; }
        sleep 0.1; i=$((i + 1))
    done
    request kill-nvmf nvmf || { kill "$pid"; return 1; }
    wk=$(( ($(stat_field "$_d" 7) - w0) / 2048 )); rk=$(( $(stat_field "$_d" 3) - r0 ))
    running=no; kill -0 "$pid" 2>/dev/null && running=yes
    wait "$pid"; st=$?
    wf=$(( ($(stat_field "$_d" 7) - w0) / 2048 )); rf=$(( ($(stat_field "$_d" 3) - r0) / 2048 ))
    echo "mp-failover: the optimized path's target killed with $wk MiB of 32 written (fio running: $running); fio exit $st, $wf MiB written, $rf MiB read back"
    nvme list-subsys 2>&1 | sed -n '1,20p'
    fio_check mp-failover "$st" /tmp/fio-mp.out || return 1
    [ "$running" = yes ] && [ "$rk" = 0 ] || { fail "the kill did not land in fio's write phase (fio running: $running, $rk sectors read before)"; return 1; }
    [ $(( wf - wk )) -ge 8 ] || { fail "only $(( wf - wk )) MiB written after the kill"; return 1; }
    [ "$rf" -ge 32 ] || { fail "verify phase read only $rf MiB of 32"; return 1; }
    _p="$(mp_path "$EC_PORT")"
    [ "$(cat "/sys/block/$_p/device/state" 2>/dev/null)" != live ] || { fail "the killed path $_p still says live"; return 1; }
}

case_mp_path_returns() {
    request start-nvmf nvmf 30 || return 1
    mp_wait "$EC_PORT" optimized 60 || return 1
    mp_wait "$EC_PORT2" non-optimized 5 || return 1
    ec_reverify mp-failover 32 $MP_ARGS || return 1
}

# mp_ctrl PORT: the controller (nvmeX) of $EC_NQN connected to PORT
mp_ctrl() {
    for c in $(ctrl_of "$EC_NQN"); do
        grep -q "trsvcid=$1\b" "/sys/class/nvme/$c/address" && { echo "$c"; return 0; }
    done
    return 1
}

# resv_report CTRL PATTERN...: the extended Reservation Report through controller CTRL (one
# path) as JSON; each extended regular expression must match it
resv_report() {
    _c="$1"; shift
    echo "\$ nvme resv-report /dev/$_c -n 1 --eds -o json"
    _r="$(timeout 30 nvme resv-report "/dev/$_c" -n 1 --eds -o json 2>&1 | tr -d ' \n')" || { fail "resv-report through $_c failed: $_r"; return 1; }
    echo "$_r"
    for _pat in "$@"; do
        echo "$_r" | grep -Eq "$_pat" || { fail "the report through $_c does not match $_pat"; return 1; }
    done
}

case_mp_reservations() {
    # NVMe reservations are kept by the management service: what one path's controller does
    # is what the other path's reports (the per-controller character devices address one path
    # each; the host has one host identifier, so it is the same registrant on both)
    ca="$(mp_ctrl "$EC_PORT")" && cb="$(mp_ctrl "$EC_PORT2")" || { fail "no controller per path ($(ctrl_of "$EC_NQN" | tr '\n' ' '))"; return 1; }
    echo "path A: $ca (port $EC_PORT), path B: $cb (port $EC_PORT2)"
    must "register through path A" nvme resv-register "/dev/$ca" -n 1 --nrkey=0xA1 --rrega=0 || return 1
    resv_report "$cb" '"regctl":1' '"rkey":161' '"rtype":0' || return 1
    must "acquire Write Exclusive through path A" nvme resv-acquire "/dev/$ca" -n 1 --crkey=0xA1 --rtype=1 --racqa=0 || return 1
    resv_report "$cb" '"rtype":1' '"rcsts":1' || return 1
    # the holder writes and reads through the multipath device
    _dev="$(ec_dev)" || { fail "no block device"; return 1; }
    must "write as the holder" dd if=/dev/urandom of=/tmp/resv.bin bs=4k count=4 || return 1
    must "write as the holder" dd if=/tmp/resv.bin of="/dev/$_dev" bs=4k seek=$((200 * 256)) count=4 oflag=direct || return 1
    must "read back as the holder" dd if="/dev/$_dev" of=/tmp/resv.back bs=4k skip=$((200 * 256)) count=4 iflag=direct || return 1
    cmp /tmp/resv.bin /tmp/resv.back || { fail "read back differs"; return 1; }
    # a wrong key is refused with Reservation Conflict, through the other path
    echo "\$ nvme resv-release /dev/$cb -n 1 --crkey=0xBAD --rtype=1 --rrela=0"
    _o="$(timeout 30 nvme resv-release "/dev/$cb" -n 1 --crkey=0xBAD --rtype=1 --rrela=0 2>&1)" && { fail "a release with a wrong key succeeded: $_o"; return 1; }
    echo "$_o"
    echo "$_o" | grep -qi "conflict" || { fail "a wrong key was not answered with Reservation Conflict: $_o"; return 1; }
    must "release through path B" nvme resv-release "/dev/$cb" -n 1 --crkey=0xA1 --rtype=1 --rrela=0 || return 1
    resv_report "$ca" '"rtype":0' '"regctl":1' || return 1
    must "unregister through path B" nvme resv-register "/dev/$cb" -n 1 --crkey=0xA1 --rrega=1 || return 1
    resv_report "$ca" '"regctl":0' || return 1
    disconnect "$EC_NQN" || return 1
}

run_case heal-connect                case_heal_connect
run_case heal-fio-verify             case_heal_fio_verify
run_case heal-rebuild-during-write   case_heal_rebuild_during_write
run_case heal-second-kill-verify     case_heal_second_kill_verify
run_case heal-two-down-write         case_heal_two_down_write
run_case heal-reintegrate            case_heal_reintegrate
run_case heal-reverify-reintegrated  case_heal_reverify_reintegrated
run_case mp-two-paths                case_mp_two_paths
run_case mp-switch-optimized         case_mp_switch_optimized
run_case mp-failover                 case_mp_failover
run_case mp-path-returns             case_mp_path_returns
run_case mp-reservations             case_mp_reservations
