# host-vanishes, boot 1: connect, start a long random-write fio, announce it,
# then wait to be killed.  Mixed sizes up to 256 KiB keep R2T/H2CData
# transfers in flight when the host dies.  run.py SIGKILLs QEMU after "@@MARK fio-running":
# the target sees the TCP connections die mid-I/O.
. /guest-lib.sh

case_host_vanishes_start() {
    connect "$NQN_A" || return 1
    d="$(wait_ns_dev "$NQN_A" 1 15)" || { fail "no block device after connect"; return 1; }
    fio --name=vanish --filename="/dev/$d" --ioengine=libaio --direct=1 --rw=randwrite \
        --bsrange=4k-256k --iodepth=32 --numjobs=2 --size=64m --time_based --runtime=600 \
        > /tmp/vanish.out 2>&1 &
    pid=$!
    sleep 4
    kill -0 "$pid" 2>/dev/null || { cat /tmp/vanish.out; fail "fio exited early"; return 1; }
    c="$(ctrl_of "$NQN_A" | head -n1)"
    echo "fio running (pid $pid) on /dev/$d via $c; writes completed so far: $(awk -v d="$d" '$3 == d {print $8}' /proc/diskstats)"
}
run_case host-vanishes-start case_host_vanishes_start
mark fio-running
# run.py kills QEMU now; if it does not, stay here until its boot timeout.
sleep 600
