# Main guest boot: most cases run here, in order, sharing one boot.
# Each case is a function run by `run_case NAME FUNCTION`; run.py finds the
# expected case names by scanning this file for `run_case` lines.
. /guest-lib.sh

# ------------------------------------------------------------------ discover
case_discover() {
    disconnect_all
    must "discover (default host)" sh -c "nvme discover -t tcp -a $TADDR -s $TPORT > /tmp/disc1.txt 2>&1"
    _r=$?; cat /tmp/disc1.txt; [ $_r = 0 ] || return 1
    awk '$1 == "subnqn:" {print $2}' /tmp/disc1.txt > /tmp/disc1.nqns
    grep -qxF "$NQN_A" /tmp/disc1.nqns || { fail "discovery log lacks $NQN_A"; return 1; }
    if grep -qxF "$NQN_B" /tmp/disc1.nqns; then
        fail "discovery log for a non-allowed host lists restricted $NQN_B"; return 1
    fi
    must "discover (allowed host)" sh -c "nvme discover -t tcp -a $TADDR -s $TPORT --hostnqn=$ALLOWED_HOSTNQN --hostid=$ALLOWED_HOSTID > /tmp/disc2.txt 2>&1"
    _r=$?; cat /tmp/disc2.txt; [ $_r = 0 ] || return 1
    awk '$1 == "subnqn:" {print $2}' /tmp/disc2.txt > /tmp/disc2.nqns
    grep -qxF "$NQN_B" /tmp/disc2.nqns || { fail "discovery log for allowed host lacks $NQN_B"; return 1; }
    grep -qxF "$NQN_A" /tmp/disc2.nqns || { fail "discovery log for allowed host lacks $NQN_A"; return 1; }
    grep -q 'trtype: *tcp' /tmp/disc1.txt || { fail "discovery entry trtype is not tcp"; return 1; }
    grep -q "trsvcid: *$TPORT" /tmp/disc1.txt || { fail "discovery entry trsvcid is not $TPORT"; return 1; }
}

# ------------------------------------------------------------- connect-plain
case_connect_plain() {
    disconnect_all
    connect "$NQN_A" || return 1
    d="$(wait_ns_dev "$NQN_A" 1 15)" || { fail "no block device for $NQN_A nsid 1 within 15s"; return 1; }
    c="$(ctrl_of "$NQN_A" | head -n1)"
    echo "controller $c state=$(cat /sys/class/nvme/$c/state) transport=$(cat /sys/class/nvme/$c/transport) address=$(cat /sys/class/nvme/$c/address)"
    echo "block device /dev/$d size=$(cat /sys/block/$d/size) sectors"
    [ "$(cat /sys/class/nvme/$c/transport)" = tcp ] || { fail "transport is not tcp"; return 1; }
    sz=$(( $(cat /sys/block/$d/size) / 2048 ))
    [ "$sz" = "$SIZE_A_MIB" ] || { fail "/dev/$d is $sz MiB, expected $SIZE_A_MIB"; return 1; }
}

case_nvme_list() {
    ensure_connected "$NQN_A" || return 1
    d="$(dev_a)"
    must "nvme list" sh -c "nvme list > /tmp/list.txt 2>&1"; _r=$?
    cat /tmp/list.txt; [ $_r = 0 ] || return 1
    grep -q "/dev/$d" /tmp/list.txt || { fail "nvme list does not show /dev/$d"; return 1; }
    grep -q "$SERIAL_A" /tmp/list.txt || { fail "nvme list does not show serial $SERIAL_A"; return 1; }
}

case_id_ctrl() {
    ensure_connected "$NQN_A" || return 1
    c="$(ctrl_of "$NQN_A" | head -n1)"
    must "nvme id-ctrl" sh -c "nvme id-ctrl /dev/$c > /tmp/idctrl.txt 2>&1"; _r=$?
    cat /tmp/idctrl.txt; [ $_r = 0 ] || return 1
    sn="$(awk -F: '$1 ~ /^sn *$/ {gsub(/^ +| +$/, "", $2); print $2}' /tmp/idctrl.txt)"
    mn="$(awk -F: '$1 ~ /^mn *$/ {sub(/^ +/, "", $2); sub(/ +$/, "", $2); print $2}' /tmp/idctrl.txt)"
    subnqn="$(awk '$1 == "subnqn" {print $3}' /tmp/idctrl.txt)"
    [ "$sn" = "$SERIAL_A" ] || { fail "id-ctrl sn='$sn', expected '$SERIAL_A'"; return 1; }
    [ "$mn" = "$MODEL_A" ] || { fail "id-ctrl mn='$mn', expected '$MODEL_A'"; return 1; }
    [ "$subnqn" = "$NQN_A" ] || { fail "id-ctrl subnqn='$subnqn', expected '$NQN_A'"; return 1; }
    # sysfs view the kernel derived from Identify
    [ "$(cat /sys/class/nvme/$c/serial | sed 's/ *$//')" = "$SERIAL_A" ] || { fail "sysfs serial mismatch"; return 1; }
}

case_id_ns() {
    ensure_connected "$NQN_A" || return 1
    d="$(dev_a)"
    must "nvme id-ns" sh -c "nvme id-ns /dev/$d > /tmp/idns.txt 2>&1"; _r=$?
    cat /tmp/idns.txt; [ $_r = 0 ] || return 1
    nsze="$(awk -F: '$1 ~ /^nsze *$/ {gsub(/ /, "", $2); print $2}' /tmp/idns.txt)"
    exp=$(( SIZE_A_MIB * 2048 ))
    [ "$(printf '%d' "$nsze")" = "$exp" ] || { fail "id-ns nsze=$nsze, expected $exp blocks"; return 1; }
    grep -q 'lbads:9 .*(in use)' /tmp/idns.txt || { fail "id-ns: in-use LBA format is not 512-byte (lbads:9)"; return 1; }
    # by explicit nsid through the controller node as well
    c="$(ctrl_of "$NQN_A" | head -n1)"
    must "nvme id-ns -n 1 on controller" nvme id-ns "/dev/$c" -n 1 >/dev/null || return 1
}

case_list_ns() {
    ensure_connected "$NQN_A" || return 1
    c="$(ctrl_of "$NQN_A" | head -n1)"
    must "nvme list-ns" sh -c "nvme list-ns /dev/$c > /tmp/listns.txt 2>&1"; _r=$?
    cat /tmp/listns.txt; [ $_r = 0 ] || return 1
    grep -qE '\]: *0x1$' /tmp/listns.txt || { fail "list-ns does not show nsid 1"; return 1; }
    n="$(grep -cE '\]: *0x' /tmp/listns.txt)"
    [ "$n" = 1 ] || { fail "list-ns shows $n namespaces, expected 1"; return 1; }
}

case_get_log_smart() {
    ensure_connected "$NQN_A" || return 1
    c="$(ctrl_of "$NQN_A" | head -n1)"
    must "get-log smart (id 2)" nvme get-log "/dev/$c" --log-id=2 --log-len=512 || return 1
}

case_get_log_error() {
    ensure_connected "$NQN_A" || return 1
    c="$(ctrl_of "$NQN_A" | head -n1)"
    must "get-log error (id 1)" nvme get-log "/dev/$c" --log-id=1 --log-len=64 || return 1
    must "nvme error-log" nvme error-log "/dev/$c" -e 1 || return 1
}

case_smart_log() {
    ensure_connected "$NQN_A" || return 1
    c="$(ctrl_of "$NQN_A" | head -n1)"; d="$(dev_a)"
    must "nvme smart-log" nvme smart-log "/dev/$c" || return 1
    w0="$(smart_field "$c" data_units_written)"; hw0="$(smart_field "$c" host_write_commands)"
    r0="$(smart_field "$c" data_units_read)"; hr0="$(smart_field "$c" host_read_commands)"
    echo "before: data_units_written=$w0 host_write_commands=$hw0 data_units_read=$r0 host_read_commands=$hr0"
    [ -n "$w0" ] && [ -n "$hw0" ] || { fail "cannot parse smart-log json (data_units_written/host_write_commands)"; return 1; }
    # 8 MiB written and read with O_DIRECT: 16384 blocks = >= 16 data units each way
    make_pattern /tmp/smart.bin 8
    write_range "$d" 200 /tmp/smart.bin || { fail "dd write failed"; return 1; }
    read_range "$d" 200 8 /tmp/smart.rd || { fail "dd read failed"; return 1; }
    w1="$(smart_field "$c" data_units_written)"; hw1="$(smart_field "$c" host_write_commands)"
    r1="$(smart_field "$c" data_units_read)"; hr1="$(smart_field "$c" host_read_commands)"
    echo "after:  data_units_written=$w1 host_write_commands=$hw1 data_units_read=$r1 host_read_commands=$hr1"
    [ "$hw1" -gt "$hw0" ] || { fail "host_write_commands did not grow ($hw0 -> $hw1) after 8 MiB of writes"; return 1; }
    [ "$w1" -ge $((w0 + 16)) ] || { fail "data_units_written grew $w0 -> $w1 after 8 MiB written (expected +16 or more)"; return 1; }
    [ "$hr1" -gt "$hr0" ] || { fail "host_read_commands did not grow ($hr0 -> $hr1) after 8 MiB of reads"; return 1; }
    [ "$r1" -ge $((r0 + 16)) ] || { fail "data_units_read grew $r0 -> $r1 after 8 MiB read (expected +16 or more)"; return 1; }
}

# ---------------------------------------------------------------------- fio
case_fio_verify_4k() {
    ensure_connected "$NQN_A" || return 1
    fio_verify v4k "$(dev_a)" 4k --numjobs=2 --iodepth=16 --size=16m --offset_increment=32m || return 1
}

case_fio_verify_128k() {
    ensure_connected "$NQN_A" || return 1
    fio_verify v128k "$(dev_a)" 128k --numjobs=2 --iodepth=16 --size=32m --offset=64m --offset_increment=64m || return 1
}

case_fio_verify_mixed() {
    ensure_connected "$NQN_A" || return 1
    # 512 B .. 1 MiB random sizes: unaligned-to-4k small in-capsule writes,
    # multi-R2T writes and reads split at MDTS, mixed with reads
    fio_verify mixed "$(dev_a)" 4k --bsrange=512-1m --numjobs=2 --iodepth=8 --size=24m \
        --offset=128m --offset_increment=32m --rw=randwrite || return 1
}

case_fio_job_verify() {
    ensure_connected "$NQN_A" || return 1
    # fio-jobs/verify.fio as a user runs it: 2 jobs x 8 MiB of 4 KiB, then of 128 KiB, from LBA 0
    fio_job verify "$(dev_a)" 8m || return 1
}

case_io_out_of_range() {
    ensure_connected "$NQN_A" || return 1
    d="$(dev_a)"
    nsze=$(( SIZE_A_MIB * 2048 ))
    for range in "$nsze 0" "$((nsze - 1)) 1"; do
        set -- $range
        echo "\$ nvme read /dev/$d -s $1 -c $2 -z $((($2 + 1) * 512))"
        nvme read "/dev/$d" -s "$1" -c "$2" -z $((($2 + 1) * 512)) -d /tmp/oor.bin > /tmp/oor.txt 2>&1
        r=$?; cat /tmp/oor.txt
        [ "$r" != 0 ] || { fail "read of LBA $1 (+$2) beyond nsze $nsze succeeded"; return 1; }
        grep -qiE 'LBA.?(Out of )?Range|0x4080|\(0x80\)|status.*0x80' /tmp/oor.txt || \
            { fail "read beyond the end failed, but not with LBA Out of Range: $(head -n1 /tmp/oor.txt)"; return 1; }
        echo "\$ nvme write /dev/$d -s $1 -c $2"
        dd if=/dev/zero of=/tmp/oorw.bin bs=512 count=$(($2 + 1)) 2>/dev/null
        nvme write "/dev/$d" -s "$1" -c "$2" -z $((($2 + 1) * 512)) -d /tmp/oorw.bin > /tmp/oorw.txt 2>&1
        r=$?; cat /tmp/oorw.txt
        [ "$r" != 0 ] || { fail "write of LBA $1 (+$2) beyond nsze $nsze succeeded"; return 1; }
    done
    # the last block itself is fine, and the controller still works
    must "read of the last LBA" nvme read "/dev/$d" -s $((nsze - 1)) -c 0 -z 512 -d /tmp/last.bin || return 1
    c="$(ctrl_of "$NQN_A" | head -n1)"
    [ "$(cat /sys/class/nvme/$c/state)" = live ] || { fail "controller not live after out-of-range commands"; return 1; }
}

case_keep_alive_idle() {
    ensure_connected "$NQN_A" || return 1
    c="$(ctrl_of "$NQN_A" | head -n1)"
    echo "kato=$(cat /sys/class/nvme/$c/kato 2>/dev/null)s; idling 16s"
    n0="$(dmesg | wc -l)"
    sleep 16
    dmesg | tail -n +$((n0 + 1)) > /tmp/ka.txt
    cat /tmp/ka.txt
    # ("long keepalive RTT" is only a latency note from a busy host)
    pat="$c.*(keep.?alive.*(fail|timeout|error)|reset|reconnect|error recovery|failed|timeout)"
    if grep -iE "$pat" /tmp/ka.txt | grep -v 'long keepalive RTT'; then
        fail "controller trouble while idle: $(grep -iE "$pat" /tmp/ka.txt | grep -v 'long keepalive RTT' | head -n1)"; return 1
    fi
    [ "$(cat /sys/class/nvme/$c/state)" = live ] || { fail "controller state $(cat /sys/class/nvme/$c/state) after idling"; return 1; }
    read_range "$(dev_a)" 0 1 /tmp/ka.rd || { fail "read after idling failed"; return 1; }
}

case_reset_controller() {
    ensure_connected "$NQN_A" || return 1
    c="$(ctrl_of "$NQN_A" | head -n1)"; d="$(dev_a)"
    make_pattern /tmp/rs.bin 2
    write_range "$d" 120 /tmp/rs.bin || { fail "dd write failed"; return 1; }
    must "nvme reset" nvme reset "/dev/$c" || return 1
    i=0
    while [ "$(cat /sys/class/nvme/$c/state)" != live ] && [ $i -lt 100 ]; do sleep 0.2; i=$((i + 1)); done
    [ "$(cat /sys/class/nvme/$c/state)" = live ] || { fail "controller $c not live 20s after reset (state $(cat /sys/class/nvme/$c/state))"; return 1; }
    read_range "$d" 120 2 /tmp/rs.rd && cmp -s /tmp/rs.bin /tmp/rs.rd || { fail "data not readable/intact after controller reset"; return 1; }
    fio_verify rs "$d" 4k --numjobs=1 --iodepth=16 --size=4m --offset=140m || return 1
}

# ---------------------------------------------------------- discard / zeroes
case_discard_zeroes() {
    ensure_connected "$NQN_A" || return 1
    d="$(dev_a)"
    echo "discard_max_bytes=$(cat /sys/block/$d/queue/discard_max_bytes) discard_granularity=$(cat /sys/block/$d/queue/discard_granularity)"
    make_pattern /tmp/pat4 4
    write_range "$d" 8 /tmp/pat4 || { fail "dd write failed"; return 1; }
    read_range "$d" 8 4 /tmp/rd4 && cmp -s /tmp/pat4 /tmp/rd4 || { fail "pattern did not read back before discard"; return 1; }
    # discard the middle 2 MiB of the 4 MiB pattern (offset 9 MiB)
    must "blkdiscard" "$BIN_BLKDISCARD" -v -o $((9 * 1048576)) -l $((2 * 1048576)) "/dev/$d" || return 1
    read_range "$d" 8 4 /tmp/rd4b || { fail "dd read after discard failed"; return 1; }
    dd if=/tmp/rd4b of=/tmp/mid bs=1M skip=1 count=2 2>/dev/null
    is_zero /tmp/mid || { fail "discarded range does not read back as zeroes: $(od -A d -t x1 /tmp/mid | head -n 2 | tr '\n' ' ')"; return 1; }
    dd if=/tmp/rd4b of=/tmp/e1 bs=1M count=1 2>/dev/null; dd if=/tmp/pat4 of=/tmp/p1 bs=1M count=1 2>/dev/null
    dd if=/tmp/rd4b of=/tmp/e2 bs=1M skip=3 count=1 2>/dev/null; dd if=/tmp/pat4 of=/tmp/p2 bs=1M skip=3 count=1 2>/dev/null
    cmp -s /tmp/e1 /tmp/p1 && cmp -s /tmp/e2 /tmp/p2 || { fail "discard clobbered data outside the discarded range"; return 1; }
}

case_write_zeroes() {
    ensure_connected "$NQN_A" || return 1
    d="$(dev_a)"
    make_pattern /tmp/pat2 2
    write_range "$d" 16 /tmp/pat2 || { fail "dd write failed"; return 1; }
    # zero 1 MiB at 16.5 MiB: SLBA = 16.5*2048, NLB 2048 (0-based: 2047)
    slba=$((33 * 1024)); nlb0=2047
    must "nvme write-zeroes" nvme write-zeroes "/dev/$d" -s "$slba" -c "$nlb0" || return 1
    read_range "$d" 16 2 /tmp/rd2 || { fail "dd read failed"; return 1; }
    dd if=/tmp/rd2 of=/tmp/z bs=512 skip=1024 count=2048 2>/dev/null
    is_zero /tmp/z || { fail "write-zeroes range (slba $slba, 2048 blocks) does not read back as zeroes: $(od -A d -t x1 /tmp/z | head -n 2 | tr '\n' ' ')"; return 1; }
    dd if=/tmp/rd2 of=/tmp/h1 bs=512 count=1024 2>/dev/null; dd if=/tmp/pat2 of=/tmp/q1 bs=512 count=1024 2>/dev/null
    dd if=/tmp/rd2 of=/tmp/h2 bs=512 skip=3072 count=1024 2>/dev/null; dd if=/tmp/pat2 of=/tmp/q2 bs=512 skip=3072 count=1024 2>/dev/null
    cmp -s /tmp/h1 /tmp/q1 || { fail "write-zeroes clobbered the blocks before slba"; return 1; }
    cmp -s /tmp/h2 /tmp/q2 || { fail "write-zeroes clobbered the blocks after the range (off by one NLB?)"; return 1; }
}

# BLKZEROOUT ioctl: the kernel's own zero-out path (Write Zeroes if ONCS says so)
case_zeroout_ioctl() {
    ensure_connected "$NQN_A" || return 1
    d="$(dev_a)"
    echo "write_zeroes_max_bytes=$(cat /sys/block/$d/queue/write_zeroes_max_bytes)"
    make_pattern /tmp/pat3 3
    write_range "$d" 24 /tmp/pat3 || { fail "dd write failed"; return 1; }
    must "blkdiscard -z" "$BIN_BLKDISCARD" -z -o $((25 * 1048576)) -l 1048576 "/dev/$d" || return 1
    read_range "$d" 24 3 /tmp/rd3 || { fail "dd read failed"; return 1; }
    dd if=/tmp/rd3 of=/tmp/z3 bs=1M skip=1 count=1 2>/dev/null
    is_zero /tmp/z3 || { fail "BLKZEROOUT range does not read back as zeroes"; return 1; }
    dd if=/tmp/rd3 of=/tmp/k3 bs=1M skip=2 count=1 2>/dev/null; dd if=/tmp/pat3 of=/tmp/l3 bs=1M skip=2 count=1 2>/dev/null
    cmp -s /tmp/k3 /tmp/l3 || { fail "BLKZEROOUT clobbered data after the range"; return 1; }
}

case_flush() {
    ensure_connected "$NQN_A" || return 1
    d="$(dev_a)"; c="$(ctrl_of "$NQN_A" | head -n1)"
    must "nvme flush (namespace)" nvme flush "/dev/$d" || return 1
    must "nvme flush -n 1 (controller)" nvme flush "/dev/$c" -n 1 || return 1
}

# ------------------------------------------------------------ reconnect etc.
case_reconnect_keeps_data() {
    ensure_connected "$NQN_A" || return 1
    d="$(dev_a)"
    make_pattern /tmp/rk.bin 8
    want="$(md5sum /tmp/rk.bin | cut -d' ' -f1)"
    write_range "$d" 100 /tmp/rk.bin || { fail "dd write failed"; return 1; }
    sync
    disconnect "$NQN_A" || return 1
    connect "$NQN_A" || return 1
    d="$(wait_ns_dev "$NQN_A" 1 15)" || { fail "no block device after reconnect"; return 1; }
    read_range "$d" 100 8 /tmp/rk.rd || { fail "dd read after reconnect failed"; return 1; }
    got="$(md5sum /tmp/rk.rd | cut -d' ' -f1)"
    echo "md5 written=$want read=$got"
    [ "$want" = "$got" ] || { fail "data changed across reconnect: md5 $want -> $got"; return 1; }
}

case_ns_add_aen() {
    ensure_connected "$NQN_A" || return 1
    c="$(ctrl_of "$NQN_A" | head -n1)"
    request add-ns 2 "$NS2_MIB" || return 1
    t0="$(date +%s)"
    i=0; found=""
    while [ $i -lt 100 ]; do
        if nvme list-ns "/dev/$c" 2>/dev/null | grep -qE '\]: *0x2$'; then found=1; break; fi
        sleep 0.2; i=$((i + 1))
    done
    nvme list-ns "/dev/$c"
    [ -n "$found" ] || { fail "nsid 2 not in list-ns 20s after the host added it (no AEN / rescan?)"; return 1; }
    echo "list-ns shows nsid 2 after $(( $(date +%s) - t0 ))s"
    d2="$(wait_ns_dev "$NQN_A" 2 20)" || { fail "no block device for nsid 2 within 20s (kernel did not rescan: no Namespace Attribute Changed AEN?)"; return 1; }
    sz=$(( $(cat /sys/block/$d2/size) / 2048 ))
    [ "$sz" = "$NS2_MIB" ] || { fail "/dev/$d2 is $sz MiB, expected $NS2_MIB"; return 1; }
    fio_verify ns2 "$d2" 4k --numjobs=1 --iodepth=8 --size=4m || return 1
}

case_ns_grow() {
    ensure_connected "$NQN_A" || return 1
    d2="$(wait_ns_dev "$NQN_A" 2 5)" || { fail "nsid 2 not present (ns-add-aen must run first)"; return 1; }
    make_pattern /tmp/g.bin 1
    write_range "$d2" 0 /tmp/g.bin || { fail "dd write failed"; return 1; }
    request grow-ns 2 "$NS2_GROW_MIB" || return 1
    i=0; sz=0
    while [ $i -lt 100 ]; do
        sz=$(( $(cat /sys/block/$d2/size) / 2048 ))
        [ "$sz" = "$NS2_GROW_MIB" ] && break
        sleep 0.2; i=$((i + 1))
    done
    [ "$sz" = "$NS2_GROW_MIB" ] || { fail "/dev/$d2 still $sz MiB 20s after growing to $NS2_GROW_MIB"; return 1; }
    read_range "$d2" 0 1 /tmp/g.rd && cmp -s /tmp/g.bin /tmp/g.rd || { fail "data changed after grow"; return 1; }
    # the new tail is usable
    dd if=/tmp/g.bin of="/dev/$d2" bs=1M seek=$((NS2_GROW_MIB - 1)) oflag=direct 2>/dev/null || { fail "write to the grown tail failed"; return 1; }
    read_range "$d2" $((NS2_GROW_MIB - 1)) 1 /tmp/g.rd2 && cmp -s /tmp/g.bin /tmp/g.rd2 || { fail "grown tail did not read back"; return 1; }
}

case_ns_remove_aen() {
    ensure_connected "$NQN_A" || return 1
    c="$(ctrl_of "$NQN_A" | head -n1)"
    d2="$(wait_ns_dev "$NQN_A" 2 5)" || { fail "nsid 2 not present (ns-add-aen must run first)"; return 1; }
    request remove-ns 2 || return 1
    i=0
    while [ $i -lt 100 ]; do
        [ -e "/sys/block/$d2" ] || break
        sleep 0.2; i=$((i + 1))
    done
    nvme list-ns "/dev/$c"
    [ ! -e "/sys/block/$d2" ] || { fail "/dev/$d2 still present 20s after nsid 2 was removed (no AEN / rescan?)"; return 1; }
    if nvme list-ns "/dev/$c" | grep -qE '\]: *0x2$'; then fail "list-ns still shows nsid 2"; return 1; fi
    read_range "$(dev_a)" 0 1 /tmp/rm.rd || { fail "nsid 1 unusable after removing nsid 2"; return 1; }
}

# SIGHUP with a changed host list: a host refused by B is let in.
case_allow_host_reload() {
    disconnect_all
    me="$(cat /etc/nvme/hostnqn)"
    timeout 90 nvme connect -t tcp -a "$TADDR" -s "$TPORT" -n "$NQN_B" $CONNECT_OPTS >/dev/null 2>&1 && \
        { fail "$me could connect to $NQN_B before being allowed"; return 1; }
    request allow-host-b "$me" || return 1
    sleep 1
    connect "$NQN_B" || return 1
    d="$(wait_ns_dev "$NQN_B" 1 15)" || { fail "no block device for $NQN_B after the host was allowed"; return 1; }
    read_range "$d" 0 1 /tmp/ah.rd || { fail "read from $NQN_B failed"; return 1; }
    disconnect "$NQN_B" || return 1
}

case_digest() {
    disconnect_all
    connect "$NQN_A" -g -G || return 1
    d="$(wait_ns_dev "$NQN_A" 1 15)" || { fail "no block device with digests on"; return 1; }
    FIO_TIMEOUT=240 fio_verify dg4k "$d" 4k --numjobs=2 --iodepth=16 --size=4m --offset_increment=8m || return 1
    FIO_TIMEOUT=240 fio_verify dg128k "$d" 128k --numjobs=1 --iodepth=8 --size=8m --offset=32m || return 1
    if dmesg | grep -iE 'digest (error|mismatch)|data digest'; then
        fail "kernel logged digest errors"; return 1
    fi
    disconnect "$NQN_A" || return 1
}

case_multi_queue() {
    disconnect_all
    connect "$NQN_A" -i 2 || return 1
    d="$(wait_ns_dev "$NQN_A" 1 15)" || { fail "no block device with -i 2"; return 1; }
    c="$(ctrl_of "$NQN_A" | head -n1)"
    dmesg | grep "$c"
    mapped="$(dmesg | grep "$c: mapped" | tail -n1 | sed 's/.*mapped \([0-9]*\)\/.*/\1/')"
    hctx="$(ls -d /sys/class/nvme/$c/nvme*c*n1/mq/[0-9]* /sys/block/${d}/mq/[0-9]* 2>/dev/null | wc -l)"
    echo "mapped default queues: ${mapped:-?}, hw contexts: $hctx"
    [ "$mapped" = 2 ] || [ "$hctx" = 2 ] || { fail "expected 2 I/O queues, kernel mapped '${mapped:-?}' (hctx $hctx)"; return 1; }
    fio_verify mq "$d" 4k --numjobs=2 --iodepth=16 --size=8m --offset_increment=16m || return 1
    disconnect "$NQN_A" || return 1
}

# One I/O queue, far more I/O outstanding than it has slots: the target must
# cope with a full submission queue (flow control via SQ head).
case_queue_full() {
    disconnect_all
    connect "$NQN_A" -i 1 || return 1
    d="$(wait_ns_dev "$NQN_A" 1 15)" || { fail "no block device with -i 1"; return 1; }
    c="$(ctrl_of "$NQN_A" | head -n1)"
    echo "sqsize=$(cat /sys/class/nvme/$c/sqsize) nr_requests=$(cat /sys/block/$d/queue/nr_requests 2>/dev/null)"
    fio_verify qfull "$d" 4k --numjobs=2 --iodepth=128 --iodepth_batch_submit=32 --size=8m \
        --offset=224m --offset_increment=12m || return 1
    fio_verify qfull2 "$d" 64k --numjobs=1 --iodepth=128 --size=8m --offset=200m || return 1
    disconnect "$NQN_A" || return 1
}

# Network partition: the host goes silent (eth0 down) without closing TCP.
# The target must enforce the Keep Alive Timeout (5 s here) and drop the
# controller's connections; once the link is back the kernel reconnects and
# the data is still there.
case_partition_kato() {
    disconnect_all
    CONNECT_OPTS="-l 120 -c 2 -k 5" connect "$NQN_A" || return 1
    d="$(wait_ns_dev "$NQN_A" 1 15)" || { fail "no block device after connect"; return 1; }
    c="$(ctrl_of "$NQN_A" | head -n1)"
    make_pattern /tmp/pk.bin 2
    write_range "$d" 160 /tmp/pk.bin || { fail "dd write failed"; return 1; }
    request expect-conns-min 2 || return 1
    echo "\$ ip link set eth0 down   (host silent, TCP left open)"
    ip link set eth0 down
    request wait-conns-closed 30
    r=$?
    ip link set eth0 up
    ip route replace default via 10.0.2.2 2>/dev/null
    [ $r = 0 ] || return 1
    i=0; seen_down=""
    while [ $i -lt 300 ]; do
        st="$(cat /sys/class/nvme/$c/state 2>/dev/null)"
        [ "$st" != live ] && seen_down=1
        [ "$st" = live ] && [ -n "$seen_down" ] && break
        [ "$st" = live ] && [ $i -gt 100 ] && break
        sleep 0.2; i=$((i + 1))
    done
    dmesg | grep "$c" | tail -n 8
    [ "$(cat /sys/class/nvme/$c/state 2>/dev/null)" = live ] || { fail "controller $c not live 60s after the link came back (state $(cat /sys/class/nvme/$c/state 2>/dev/null))"; return 1; }
    read_range "$d" 160 2 /tmp/pk.rd && cmp -s /tmp/pk.bin /tmp/pk.rd || { fail "data not readable/intact after the reconnect"; return 1; }
    disconnect "$NQN_A" || return 1
}

# Two controllers of the same host to subsystem A (nvme connect -D): the
# kernel's native multipath puts both paths under one namespace head, which
# needs unique controller IDs, CMIC multi-controller and NMIC shared.
case_multipath() {
    disconnect_all
    connect "$NQN_A" || return 1
    # nvme-cli 2.3 says "already connected" even with -D: talk to the
    # fabrics device directly for the second controller
    opts="transport=tcp,traddr=$TADDR,trsvcid=$TPORT,nqn=$NQN_A,hostnqn=$(cat /etc/nvme/hostnqn),hostid=$(cat /etc/nvme/hostid),duplicate_connect,ctrl_loss_tmo=30"
    echo "\$ echo $opts > /dev/nvme-fabrics"
    exec 3<>/dev/nvme-fabrics || { fail "cannot open /dev/nvme-fabrics"; return 1; }
    echo "$opts" >&3 || { exec 3>&-; fail "second (duplicate) connect to $NQN_A refused by the kernel/target"; return 1; }
    read -r res <&3; exec 3>&-
    echo "fabrics: $res"
    sleep 1
    ctrls="$(ctrl_of "$NQN_A" | tr '\n' ' ')"
    n="$(echo $ctrls | wc -w)"
    echo "controllers of $NQN_A: $ctrls"
    for c in $ctrls; do echo "$c cntlid=$(cat /sys/class/nvme/$c/cntlid) state=$(cat /sys/class/nvme/$c/state)"; done
    dmesg | grep -iE 'duplicate|unshared|cntlid|multipath' | tail -n 5
    [ "$n" = 2 ] || { fail "expected 2 controllers for $NQN_A after a duplicate connect, found $n"; return 1; }
    c1="$(echo $ctrls | cut -d' ' -f1)"; c2="$(echo $ctrls | cut -d' ' -f2)"
    [ "$(cat /sys/class/nvme/$c1/cntlid)" != "$(cat /sys/class/nvme/$c2/cntlid)" ] || { fail "both controllers have cntlid $(cat /sys/class/nvme/$c1/cntlid)"; return 1; }
    [ "$(readlink -f /sys/class/nvme/$c1/subsystem 2>/dev/null)" = "$(readlink -f /sys/class/nvme/$c2/subsystem 2>/dev/null)" ] || true
    paths="$(ls -d /sys/block/nvme*c*n1 2>/dev/null | wc -l)"
    d="$(wait_ns_dev "$NQN_A" 1 10)" || { fail "no namespace head block device"; return 1; }
    echo "head /dev/$d, path devices: $(ls -d /sys/block/nvme*c*n1 2>/dev/null | xargs -n1 basename | tr '\n' ' ')"
    [ "$paths" = 2 ] || { fail "namespace 1 has $paths path device(s), expected 2 (NMIC shared / CMIC multi-controller not set?)"; return 1; }
    sub="$(ls -d /sys/class/nvme-subsystem/nvme-subsys* | head -n1)"
    echo round-robin > "$sub/iopolicy" 2>/dev/null
    fio_verify mp "$d" 4k --numjobs=2 --iodepth=16 --size=8m --offset=176m --offset_increment=16m || return 1
    for p in /sys/block/nvme*c*n1; do echo "$(basename $p): $(awk '{print "reads=" $1 " writes=" $5}' $p/stat)"; done
    # drop one path: I/O continues on the other
    must "disconnect one controller" nvme disconnect -d "$c2" || return 1
    fio_verify mp1 "$d" 4k --numjobs=1 --iodepth=16 --size=4m --offset=208m || return 1
    disconnect_all
}

case_refused_host() {
    disconnect_all
    echo "\$ nvme connect ... -n $NQN_B (hostnqn $(cat /etc/nvme/hostnqn), not allowed)"
    timeout 90 nvme connect -t tcp -a "$TADDR" -s "$TPORT" -n "$NQN_B" $CONNECT_OPTS
    r=$?
    echo "exit status $r"
    [ "$r" != 0 ] || { fail "connect to $NQN_B with a non-allowed hostnqn succeeded"; return 1; }
    sleep 1
    [ -z "$(ctrl_of "$NQN_B")" ] || { fail "a controller for $NQN_B exists after a refused connect"; return 1; }
    connect "$NQN_B" --hostnqn="$ALLOWED_HOSTNQN" --hostid="$ALLOWED_HOSTID" || return 1
    d="$(wait_ns_dev "$NQN_B" 1 15)" || { fail "no block device for $NQN_B with the allowed hostnqn"; return 1; }
    sz=$(( $(cat /sys/block/$d/size) / 2048 ))
    [ "$sz" = "$SIZE_B_MIB" ] || { fail "/dev/$d is $sz MiB, expected $SIZE_B_MIB"; return 1; }
    fio_verify rb "$d" 4k --numjobs=1 --iodepth=8 --size=4m || return 1
    disconnect "$NQN_B" || return 1
}

case_connect_churn() {
    disconnect_all
    i=1
    while [ $i -le 10 ]; do
        connect "$NQN_A" >/dev/null || return 1
        d="$(wait_ns_dev "$NQN_A" 1 15)" || { fail "cycle $i: no block device"; return 1; }
        dd if="/dev/$d" of=/dev/null bs=4k count=1 iflag=direct 2>/dev/null || { fail "cycle $i: read failed"; return 1; }
        disconnect "$NQN_A" >/dev/null || return 1
        i=$((i + 1))
    done
    echo "10 connect/read/disconnect cycles done"
}

case_disconnect_all() {
    disconnect_all
    n="$(ls /sys/class/nvme/ 2>/dev/null | wc -l)"
    [ "$n" = 0 ] || { fail "$n controllers left after disconnect-all: $(ls /sys/class/nvme/)"; return 1; }
}

run_case discover             case_discover
run_case connect-plain        case_connect_plain
run_case nvme-list            case_nvme_list
run_case id-ctrl              case_id_ctrl
run_case id-ns                case_id_ns
run_case list-ns              case_list_ns
run_case get-log-smart        case_get_log_smart
run_case get-log-error        case_get_log_error
run_case smart-log            case_smart_log
run_case fio-verify-4k        case_fio_verify_4k
run_case fio-verify-128k      case_fio_verify_128k
run_case fio-verify-mixed     case_fio_verify_mixed
run_case fio-job-verify       case_fio_job_verify
run_case io-out-of-range      case_io_out_of_range
run_case keep-alive-idle      case_keep_alive_idle
run_case reset-controller     case_reset_controller
run_case discard-zeroes       case_discard_zeroes
run_case write-zeroes         case_write_zeroes
run_case zeroout-ioctl        case_zeroout_ioctl
run_case flush                case_flush
run_case reconnect-keeps-data case_reconnect_keeps_data
run_case ns-add-aen           case_ns_add_aen
run_case ns-grow              case_ns_grow
run_case ns-remove-aen        case_ns_remove_aen
run_case digest               case_digest
run_case multi-queue          case_multi_queue
run_case queue-full           case_queue_full
run_case partition-kato       case_partition_kato
run_case multipath            case_multipath
run_case refused-host         case_refused_host
run_case allow-host-reload    case_allow_host_reload
run_case connect-churn        case_connect_churn
run_case disconnect-all       case_disconnect_all
