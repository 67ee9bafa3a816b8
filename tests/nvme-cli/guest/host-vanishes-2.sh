# host-vanishes, boot 2: after the previous host was killed mid-I/O, a new
# host connects and verifies data: the target survived and still serves.
. /guest-lib.sh

case_next_host() {
    connect "$NQN_A" || return 1
    d="$(wait_ns_dev "$NQN_A" 1 15)" || { fail "no block device after connect"; return 1; }
    fio_verify next "$d" 4k --numjobs=2 --iodepth=16 --size=8m --offset_increment=16m || return 1
    fio_verify next128 "$d" 128k --numjobs=1 --iodepth=8 --size=8m --offset=64m || return 1
    disconnect "$NQN_A" || return 1
}
run_case host-vanishes-next-host case_next_host
