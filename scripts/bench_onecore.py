"""The target on one core against SPDK: `tessera-nvmf` and SPDK's `nvmf_tgt`, each pinned to core 0
with a 1 GiB malloc namespace, driven by the same initiator, SPDK's `spdk_nvme_perf`, pinned to
core 1 (4 KiB random reads at QD32 and QD1). Used by `scripts/bench.py --one-core SPDK_DIR`.

SPDK is not part of this repository and nothing here builds it: SPDK_DIR is an SPDK source tree
built by hand (`build/bin/nvmf_tgt`, `build/bin/spdk_nvme_perf`, `scripts/rpc.py`). SPDK needs
hugepages; this module reserves 1024 × 2 MiB for the run (mounting hugetlbfs on /dev/hugepages
if nothing is mounted there) and gives them back afterwards.
"""
import os, re, socket, statistics, subprocess, time

SECTION = "## Target on one core against SPDK"
SPDK_NQN = "nqn.2016-06.io.spdk:cnode1"
TESSERA_NQN = "nqn.2026-11.io.tessera:default"
HUGEPAGES = 1024
QDS = (32, 1)


def _wait_port(port, proc, what):
    for _ in range(300):
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited at start")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{what} did not listen on {port}")


class _Hugepages:
    """Reserves hugepages for SPDK for the duration of a `with` block."""

    def __enter__(self):
        self.before = int(open("/proc/sys/vm/nr_hugepages").read())
        with open("/proc/sys/vm/nr_hugepages", "w") as f:
            f.write(str(max(self.before, HUGEPAGES)))
        self.mounted = subprocess.run(["mountpoint", "-q", "/dev/hugepages"]).returncode != 0
        if self.mounted:
            os.makedirs("/dev/hugepages", exist_ok=True)
            subprocess.run(["mount", "-t", "hugetlbfs", "nodev", "/dev/hugepages"], check=True)
        return self

    def __exit__(self, *exc):
        if self.mounted:
            subprocess.run(["umount", "/dev/hugepages"])
        with open("/proc/sys/vm/nr_hugepages", "w") as f:
            f.write(str(self.before))


def _perf(spdk, port, nqn, qd, secs):
    """One spdk_nvme_perf run: its 'Total' line as IOPS and average latency (µs)."""
    cmd = [os.path.join(spdk, "build/bin/spdk_nvme_perf"), "-c", "0x2", "-q", str(qd), "-o", "4096", "-w", "randread",
           "-t", str(secs), "-r", f"trtype:TCP adrfam:IPv4 traddr:127.0.0.1 trsvcid:{port} subnqn:{nqn}"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=secs + 60).stdout
    m = re.search(r"^Total\s*:\s*([\d.]+)\s+([\d.]+)\s+([\d.]+)", out, re.M)
    if not m:
        raise RuntimeError("spdk_nvme_perf printed no total:\n" + out[-2000:])
    return {"iops": float(m.group(1)), "avg_us": float(m.group(3))}


def _spdk_target(spdk, port):
    proc = subprocess.Popen([os.path.join(spdk, "build/bin/nvmf_tgt"), "-m", "0x1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    rpc = os.path.join(spdk, "scripts/rpc.py")
    version = ""
    for _ in range(100):
        v = subprocess.run([rpc, "spdk_get_version"], capture_output=True, text=True)
        if v.returncode == 0:
            m = re.search(r'"version":\s*"([^"]*)"', v.stdout)
            version = m.group(1) if m else ""
            break
        time.sleep(0.1)
    for args in (["nvmf_create_transport", "-t", "TCP"], ["bdev_malloc_create", "-b", "Malloc0", "1024", "512"],
                 ["nvmf_create_subsystem", SPDK_NQN, "-a", "-s", "SPDK00000000000001"],
                 ["nvmf_subsystem_add_ns", SPDK_NQN, "Malloc0"],
                 ["nvmf_subsystem_add_listener", SPDK_NQN, "-t", "tcp", "-a", "127.0.0.1", "-s", str(port)]):
        subprocess.run([rpc] + args, check=True, capture_output=True)
    _wait_port(port, proc, "nvmf_tgt")
    return proc, version


def _tessera_target(bin_dir, port):
    proc = subprocess.Popen(["taskset", "-c", "0", os.path.join(bin_dir, "tessera-nvmf"), "--listen",
                             f"127.0.0.1:{port}", "--threads", "1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_port(port, proc, "tessera-nvmf")
    return proc


def measure(spdk, bin_dir, free_port, cpu_seconds, runs=3, secs=5):
    """Interleaved runs (`free_port()` and `cpu_seconds(pid)` are bench.py's): for each round and depth,
    SPDK's target then Tessera's, each started fresh
    (SPDK's target polls its core at 100 % even when idle, so the two never run together)."""
    res = {"spdk": {str(qd): [] for qd in QDS}, "tessera": {str(qd): [] for qd in QDS}, "secs": secs, "runs": runs,
           "spdk_version": ""}
    with _Hugepages():
        for _ in range(runs):
            for qd in QDS:
                for name in ("spdk", "tessera"):
                    port = free_port()
                    if name == "spdk":
                        proc, res["spdk_version"] = _spdk_target(spdk, port)
                    else:
                        proc = _tessera_target(bin_dir, port)
                    nqn = SPDK_NQN if name == "spdk" else TESSERA_NQN
                    try:
                        cpu0 = cpu_seconds(proc.pid)
                        r = _perf(spdk, port, nqn, qd, secs)
                        r["target_cpu_s"] = cpu_seconds(proc.pid) - cpu0
                        res[name][str(qd)].append(r)
                    finally:
                        proc.terminate()
                        proc.wait(timeout=30)
    return res


def _median(runs, key):
    return statistics.median(r[key] for r in runs)


def section(res):
    secs, runs = res["secs"], res["runs"]
    lines = [SECTION, "",
             "The issue's one-core goal, measured with one initiator for both targets: SPDK's own benchmark "
             "`spdk_nvme_perf` (a polling initiator) on core 1 reads 4 KiB at random from a 1 GiB malloc namespace "
             "served on 127.0.0.1 by either SPDK's `nvmf_tgt` ("
             f"{res['spdk_version'] or 'SPDK'}, `-m 0x1`: one reactor on core 0, polling) or `tessera-nvmf --threads 1` pinned "
             "with `taskset -c 0` (default configuration: adaptive polling for `poll_us` = 50 µs after each pass "
             "with I/O, epoll when quiet). Each target is started fresh for each run; the runs are interleaved "
             f"(SPDK, Tessera, per depth and round), {runs} rounds of {secs:g} s; the table shows the median runs and the "
             "**median of the per-round ratios** (this virtual machine's speed drifts between runs). *Target CPU* is the "
             "target process's CPU time during the run over the run's length (1.00 = its whole core). SPDK is "
             "built by hand outside this repository; `python3 scripts/bench.py --one-core SPDK_DIR` produces this "
             "section from such a build.", "",
             "| QD | SPDK IOPS (runs) | SPDK avg µs | Tessera IOPS (runs) | Tessera avg µs | **Tessera / SPDK** | target CPU: SPDK, Tessera |",
             "|---|---|---|---|---|---|---|"]
    goals = []
    for qd in QDS:
        s, t = res["spdk"][str(qd)], res["tessera"][str(qd)]
        si, ti = _median(s, "iops"), _median(t, "iops")
        sl, tl = _median(s, "avg_us"), _median(t, "avg_us")
        sc, tc = _median(s, "target_cpu_s") / secs, _median(t, "target_cpu_s") / secs
        runs_s = "/".join(f"{r['iops'] / 1000:.0f}k" for r in s)
        runs_t = "/".join(f"{r['iops'] / 1000:.0f}k" for r in t)
        # Per-round ratios: each Tessera run against the SPDK run just before it.
        ri = statistics.median(b["iops"] / a["iops"] for a, b in zip(s, t))
        rl = statistics.median(b["avg_us"] / a["avg_us"] for a, b in zip(s, t))
        ratio = f"{ri:.2f} (IOPS)" if qd > 1 else f"{rl:.2f}× (latency)"
        lines.append(f"| {qd} | {si:.0f} ({runs_s}) | {sl:.1f} | {ti:.0f} ({runs_t}) | {tl:.1f} | **{ratio}** | {sc:.2f}, {tc:.2f} |")
        if qd > 1:
            goals.append(f"QD{qd} IOPS **{ri:.2f}** of SPDK's (goal ≥ 1.0: {'met' if ri >= 1.0 else 'not met'})")
        else:
            goals.append(f"QD{qd} average latency **{rl:.2f}×** SPDK's (goal ≤ 1.5×: {'met' if rl <= 1.5 else 'not met'})")
    lines += ["", "The issue's goals: " + "; ".join(goals) + ".", "",
              "Commands: `nvmf_tgt -m 0x1` configured with `scripts/rpc.py nvmf_create_transport -t TCP`, "
              f"`bdev_malloc_create -b Malloc0 1024 512`, `nvmf_create_subsystem {SPDK_NQN} -a`, "
              "`nvmf_subsystem_add_ns`, `nvmf_subsystem_add_listener -t tcp -a 127.0.0.1 -s PORT`; "
              "`taskset -c 0 tessera-nvmf --listen 127.0.0.1:PORT --threads 1` (built-in default subsystem "
              f"`{TESSERA_NQN}`, 1 GiB malloc namespace, 512-byte blocks); the initiator "
              f"`spdk_nvme_perf -c 0x2 -q QD -o 4096 -w randread -t {secs:g} -r 'trtype:TCP adrfam:IPv4 "
              "traddr:127.0.0.1 trsvcid:PORT subnqn:NQN'`.", ""]
    return lines
