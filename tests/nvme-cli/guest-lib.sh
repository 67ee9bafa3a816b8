# Helpers for guest test scripts (busybox ash).  Sourced by every boot script:
#     . /guest-lib.sh
# run.py also ships /etc/test-env.sh with the variables below.
#
# Protocol on the console (parsed by run.py):
#   @@BEGIN <case>                      a case starts
#   @@CASE <case> PASS [info]           a case passed
#   @@CASE <case> FAIL <reason>         a case failed
#   @@REQUEST <action> [args]           ask the host to do something; the host
#                                       answers "@@REPLY ok|err <text>" on the
#                                       console input (see request())
#   @@MARK <name>                       progress marker for host-side hooks
#
# Variables (from /etc/test-env.sh):
#   TADDR TPORT            target address/port as seen from the guest
#   NQN_A NQN_B            subsystem NQNs (A: any host, B: restricted)
#   ALLOWED_HOSTNQN ALLOWED_HOSTID   the host identity B allows
#   SERIAL_A MODEL_A       expected serial/model of A
#   SIZE_A_MIB SIZE_B_MIB  namespace sizes
#   EC_NQN EC_PORT EC_SIZE_MIB EC_BLOCK_SIZE   (tessera up boots) the exported volume
#   CASES                  space separated case filter (empty: all)

. /etc/test-env.sh
set -o pipefail 2>/dev/null

BIN_BLKDISCARD=/bin/blkdiscard      # util-linux one; a bare name would run busybox's applet
CONNECT_OPTS="${CONNECT_OPTS:--l 30 -c 2}"   # ctrl-loss-tmo 30 s, reconnect delay 2 s

say() { echo "$*"; }

# ------------------------------------------------------------- case runner --
want_case() {
    [ -z "$CASES" ] && return 0
    for c in $CASES; do [ "$c" = "$1" ] && return 0; done
    return 1
}

# fail REASON: record why the current case failed (first reason wins)
fail() {
    [ -s /tmp/case.reason ] || echo "$*" > /tmp/case.reason
    echo "!! FAIL: $*"
    return 1
}

# run_case NAME FUNCTION [ARGS...]: run FUNCTION in a subshell and report.
run_case() {
    _name="$1"; shift
    want_case "$_name" || return 0
    rm -f /tmp/case.reason
    echo "@@BEGIN $_name"
    _t0="$(date +%s)"
    _dm0="$(dmesg | wc -l)"
    ( "$@" )
    _rc=$?
    _dt=$(( $(date +%s) - _t0 ))
    if [ "$_rc" = 0 ] && [ ! -s /tmp/case.reason ]; then
        echo "@@CASE $_name PASS ${_dt}s"
    else
        [ -s /tmp/case.reason ] || echo "exit status $_rc" > /tmp/case.reason
        # kernel messages logged while the case ran (fall back to the tail)
        dmesg > /tmp/case.dmesg
        _new=$(( $(wc -l < /tmp/case.dmesg) - _dm0 ))
        [ "$_new" -gt 0 ] 2>/dev/null || _new=25
        echo "---- dmesg during $_name (last $(( _new > 40 ? 40 : _new )) of $_new new lines) ----"
        tail -n "$_new" /tmp/case.dmesg | tail -n 40
        echo "---- end dmesg ----"
        _k="$(tail -n "$_new" /tmp/case.dmesg | grep -E 'nvme|I/O error|blk_update' | grep -iE 'error|fail|timeout|invalid|reset|reconnect' | head -n1 | sed 's/^\[ *[0-9.]*\] *//')"
        echo "@@CASE $_name FAIL $(head -n1 /tmp/case.reason | tr -d '\r') (${_dt}s)${_k:+ [dmesg: $_k]}"
    fi
    return 0
}

# must DESCRIPTION CMD...: echo and run CMD (with a timeout); fail on non-zero.
MUST_TIMEOUT=120
must() {
    _d="$1"; shift
    echo "\$ $*"
    timeout "$MUST_TIMEOUT" "$@"
    _r=$?
    if [ "$_r" != 0 ]; then
        [ "$_r" = 143 ] && fail "$_d: timed out after ${MUST_TIMEOUT}s ($*)" && return 1
        fail "$_d: exit $_r ($*)"
        return 1
    fi
    return 0
}

# request ACTION [ARGS]: ask run.py to do something and wait for its answer.
request() {
    echo "@@REQUEST $*"
    _reply=""
    if ! read -t "${REQUEST_TIMEOUT:-60}" -r _reply; then
        fail "no reply from host to request '$*'"
        return 1
    fi
    _reply="$(echo "$_reply" | tr -d '\r')"
    echo "host replied: $_reply"
    case "$_reply" in
        "@@REPLY ok"*) return 0 ;;
        *) fail "host could not do '$*': $_reply"; return 1 ;;
    esac
}

mark() { echo "@@MARK $*"; }

# ------------------------------------------------------------ nvme helpers --
# ctrl_of NQN: controller names (nvme0 ...) connected to subsystem NQN
ctrl_of() {
    for c in /sys/class/nvme/nvme*; do
        [ -e "$c/subsysnqn" ] || continue
        [ "$(cat "$c/subsysnqn")" = "$1" ] && basename "$c"
    done
}

# ns_dev NQN NSID: block device name (nvme0n1) of namespace NSID of NQN
ns_dev() {
    for b in /sys/block/nvme*; do
        [ -e "$b" ] || continue
        _n="$(basename "$b")"
        case "$_n" in nvme*c*n*) continue ;; esac       # multipath path devices
        [ "$(cat "$b/device/subsysnqn" 2>/dev/null)" = "$1" ] || continue
        _id="$(cat "$b/nsid" 2>/dev/null || echo "${_n##*n}")"
        [ "$_id" = "$2" ] && { echo "$_n"; return 0; }
    done
    return 1
}

# wait_ns_dev NQN NSID [SECONDS]: wait for the block device, print its name
wait_ns_dev() {
    _i=0; _lim=$(( ${3:-15} * 5 ))
    while [ $_i -lt $_lim ]; do
        _d="$(ns_dev "$1" "$2")" && [ -b "/dev/$_d" ] && { echo "$_d"; return 0; }
        sleep 0.2; _i=$((_i + 1))
    done
    return 1
}

# connect NQN [extra nvme connect args]: connect and wait for namespace 1
connect() {
    _nqn="$1"; shift
    echo "\$ nvme connect -t tcp -a $TADDR -s $TPORT -n $_nqn $CONNECT_OPTS $*"
    timeout 90 nvme connect -t tcp -a "$TADDR" -s "$TPORT" -n "$_nqn" $CONNECT_OPTS "$@"
    _r=$?
    [ "$_r" = 0 ] || { fail "nvme connect to $_nqn failed: exit $_r"; return 1; }
    return 0
}

# ensure_connected NQN: connect unless a live controller for NQN exists
ensure_connected() {
    for _c in $(ctrl_of "$1"); do
        [ "$(cat /sys/class/nvme/$_c/state 2>/dev/null)" = live ] && return 0
    done
    connect "$1" || return 1
    wait_ns_dev "$1" 1 15 >/dev/null || { fail "no block device for $1 nsid 1 after connect"; return 1; }
}

disconnect() {
    echo "\$ nvme disconnect -n $1"
    timeout 60 nvme disconnect -n "$1"
    _r=$?
    [ "$_r" = 0 ] || { fail "nvme disconnect -n $1 failed: exit $_r"; return 1; }
    _i=0
    while [ -n "$(ctrl_of "$1")" ] && [ $_i -lt 50 ]; do sleep 0.2; _i=$((_i + 1)); done
    [ -z "$(ctrl_of "$1")" ] || { fail "controller for $1 still present after disconnect"; return 1; }
}

disconnect_all() {
    timeout 60 nvme disconnect-all >/dev/null 2>&1
    _i=0
    while ls /sys/class/nvme/ 2>/dev/null | grep -q nvme && [ $_i -lt 50 ]; do sleep 0.2; _i=$((_i + 1)); done
    return 0
}

# dev_a: block device of subsystem A nsid 1 (connect first)
dev_a() { ns_dev "$NQN_A" 1; }

# ------------------------------------------------------------- data helpers --
# make_pattern FILE MIB: random data file in /tmp (tmpfs)
make_pattern() { dd if=/dev/urandom of="$1" bs=1M count="$2" 2>/dev/null; }

# read_range DEV OFFSET_MIB LEN_MIB OUTFILE: O_DIRECT read
read_range() {
    dd if="/dev/$1" of="$4" bs=1M skip="$2" count="$3" iflag=direct 2>/dev/null
}

# write_range DEV OFFSET_MIB FILE: O_DIRECT write of FILE
write_range() {
    dd if="$3" of="/dev/$1" bs=1M seek="$2" oflag=direct conv=notrunc 2>/dev/null
}

# is_zero FILE: all bytes zero?
is_zero() {
    _sz="$(stat -c %s "$1")"
    cmp -s -n "$_sz" "$1" /dev/zero
}

# fio_verify NAME DEV BS [extra fio args]: random write + crc32c verify
fio_verify() {
    _job="$1"; _dev="$2"; _bs="$3"; shift 3
    _out="/tmp/fio-$_job.out"
    echo "\$ fio --name=$_job --filename=/dev/$_dev --bs=$_bs $*"
    timeout "${FIO_TIMEOUT:-300}" fio --name="$_job" --filename="/dev/$_dev" \
        --ioengine=libaio --direct=1 --rw=randwrite --bs="$_bs" \
        --verify=crc32c --verify_fatal=1 --do_verify=1 \
        --group_reporting --eta=never "$@" > "$_out" 2>&1
    fio_check "$_job" $? "$_out"
}

# fio_job NAME DEV SIZE: runs the repository's job file /fio-jobs/NAME.fio (shipped in the
# per-boot cpio) against /dev/DEV with DEV and SIZE in its environment
fio_job() {
    _out="/tmp/fio-job-$1.out"
    echo "\$ DEV=/dev/$2 SIZE=$3 fio --eta=never /fio-jobs/$1.fio"
    [ -f "/fio-jobs/$1.fio" ] || { fail "/fio-jobs/$1.fio is not in the guest image"; return 1; }
    DEV="/dev/$2" SIZE="$3" timeout "${FIO_TIMEOUT:-300}" fio --eta=never "/fio-jobs/$1.fio" > "$_out" 2>&1
    fio_check "job-$1" $? "$_out"
}

# fio_check NAME STATUS OUTFILE: fails unless fio exited 0 and every job reported err=0
fio_check() {
    _job="$1"; _r="$2"; _out="$3"
    if [ "$_r" = 0 ] && ! grep -q 'err= *[1-9]' "$_out"; then
        grep -E 'err=|  (read|write): IOPS' "$_out"      # condensed on success
    else
        cat "$_out"
    fi
    [ "$_r" = 0 ] || { fail "fio $_job exit $_r: $(grep -m1 -E 'verify: bad|bad magic|io_u error|error=|err= *[1-9]|crc32c|fio: ' "$_out" | grep -v 'multiple writers')"; return 1; }
    _errs="$(grep -o 'err= *[0-9]*' "$_out" | grep -v 'err= *0$')"
    [ -z "$_errs" ] || { fail "fio $_job reported $_errs"; return 1; }
    grep -q 'err= *0' "$_out" || { fail "fio $_job printed no err= summary"; return 1; }
    return 0
}

# smart_field DEV FIELD: numeric value from nvme smart-log -o json
smart_field() {
    nvme smart-log "/dev/$1" -o json 2>/dev/null \
    | tr -d ' \t' | grep "^\"$2\":" | head -n1 | sed 's/^[^:]*://; s/"//g; s/[^0-9].*$//'
}

# ------------------------------------------------- tessera up cluster boots --
# For the boots against a whole system started with `tessera up` (guest/ec.sh, guest/heal.sh):
# the volume is namespace 1 of $EC_NQN on $TADDR:$EC_PORT.  Scripts set EC_FIO (the common fio
# options) before calling ec_fio / ec_reverify.

ec_dev() { ns_dev "$EC_NQN" 1; }

# stat_field DEV N: field N of the block statistics of DEV (3 = sectors read, 7 = sectors
# written; 512-byte sectors whatever the block size).  With native multipath the head device
# (nvme0n1) counts nothing, its path devices (nvme0c0n1, ...) do: their sum.
stat_field() {
    _sum=0; _found=
    for _p in /sys/block/nvme*c*n*; do
        [ -e "$_p/stat" ] || continue
        [ "$(cat "$_p/device/subsysnqn" 2>/dev/null)" = "$EC_NQN" ] || continue
        [ "${_p##*n}" = "${1##*n}" ] || continue
        _sum=$(( _sum + $(awk -v n="$2" '{print $n}' "$_p/stat") )); _found=1
    done
    [ -n "$_found" ] || _sum=$(awk -v n="$2" '{print $n}' "/sys/block/$1/stat")
    echo "$_sum"
}

ec_connect() {
    echo "\$ nvme connect -t tcp -a $TADDR -s $EC_PORT -n $EC_NQN $CONNECT_OPTS"
    timeout 90 nvme connect -t tcp -a "$TADDR" -s "$EC_PORT" -n "$EC_NQN" $CONNECT_OPTS
    _r=$?
    [ "$_r" = 0 ] || { fail "nvme connect to $EC_NQN failed: exit $_r"; return 1; }
    wait_ns_dev "$EC_NQN" 1 20 >/dev/null || { fail "no block device for $EC_NQN nsid 1 within 20s"; return 1; }
}

ec_ensure_connected() {
    for _c in $(ctrl_of "$EC_NQN"); do
        [ "$(cat /sys/class/nvme/$_c/state 2>/dev/null)" = live ] && return 0
    done
    ec_connect
}

# ec_fio NAME ARGS...: one fio run (write + verify, or --verify_only) with the common options
ec_fio() {
    _job="$1"; shift
    _out="/tmp/fio-$_job.out"
    _d="$(ec_dev)" || { fail "no block device for $EC_NQN"; return 1; }
    echo "\$ fio --name=$_job --filename=/dev/$_d $EC_FIO $*"
    timeout "${FIO_TIMEOUT:-400}" fio --name="$_job" --filename="/dev/$_d" $EC_FIO "$@" > "$_out" 2>&1
    fio_check "$_job" $? "$_out"
}

# ec_reverify NAME MIB ARGS...: --verify_only replay of a job over MIB MiB; fails unless it read
# the whole region (fio's read total and the block device's sector counter both grew by its size)
ec_reverify() {
    _job="$1"; _mib="$2"; shift 2
    _d="$(ec_dev)" || { fail "no block device for $EC_NQN"; return 1; }
    _r0="$(stat_field "$_d" 3)"
    ec_fio "$_job" --verify_only "$@" || return 1
    _rd=$(( ($(stat_field "$_d" 3) - _r0) / 2048 ))
    echo "verify-only $_job: $_rd MiB read from /dev/$_d"
    [ "$_rd" -ge "$_mib" ] || { fail "verify-only $_job read $_rd MiB, expected >= $_mib"; return 1; }
    grep -q "read: IOPS=.*(${_mib}\.0MiB/" "/tmp/fio-$_job.out" \
        || { fail "verify-only $_job: fio did not report ${_mib} MiB read"; return 1; }
}
