#!/usr/bin/env python3
"""vhost-user-blk against NVMe/TCP, one volume, one guest.

`tessera up` runs a whole Tessera system on the host (service, 3 engines x 2 targets, the target
in managed mode) with one EC_2P1 volume, exported both over NVMe/TCP and as a vhost-user-blk disk
(`--vhost-blk`). One QEMU guest (the harness's kernel and initramfs, TCG, 2 vCPUs) gets the disk
as /dev/vda and connects to the namespace with its own nvme-tcp host over QEMU's user network.
The repository's fio jobs (fio-jobs/*.fio) run on both, interleaved, ROUNDS times; around each
run the host samples the CPU time of tessera-nvmf and of QEMU (which, under TCG, is the guest's
CPU too) and the guest counts its own busy time and the I/Os its block layer completed. Writes
target/nvme-cli-logs/vhost-compare.md (included in docs/BENCHMARKS.md by scripts/bench.py).

    python3 tests/nvme-cli/vhost_compare.py [--rounds 3] [--runtime 5] [--no-build] [--no-setup]

Python 3 standard library only.
"""

import argparse
import datetime
import json
import os
import queue
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as harness  # noqa: E402  (the harness: Qemu, TesseraCluster, newc_archive, paths)
from kernel_compare import CompareError, guest_image  # noqa: E402

HERE = harness.HERE
REPO = harness.REPO
JOBS = ("randread-4k-qd1", "randwrite-4k-qd1", "randread-4k-qd32", "randwrite-4k-qd32", "seqread-128k", "seqwrite-128k")
OUT = REPO / "target" / "nvme-cli-logs" / "vhost-compare.md"
TICK_US = 1_000_000 // os.sysconf("SC_CLK_TCK")


def cpu_us(pid):
    """User + system CPU time of process `pid`, µs."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) * TICK_US


def boot(kernel, base_initrd, cluster, a, workdir, logdir):
    """Boots the comparison guest; returns [(label, job, round, fio JSON, guest busy µs, guest
    I/Os, nvmf µs, qemu µs)]."""
    env = (f"RUNTIME={a.runtime}\nROUNDS={a.rounds}\nSIZE_MIB={harness.EC_SIZE_MIB}\nTADDR={harness.GUEST_HOST_ADDR}\n"
           f"TPORT={cluster.port}\nNQN={cluster.nqn}\nJOBS='{' '.join(JOBS)}'\nCASES=''\n")
    initrd = harness.boot_initrd(base_initrd, Path(workdir) / "initrd-vhost-compare", env,
                                 (HERE / "compare" / "guest-vhost-compare.sh").read_bytes())
    console = Path(logdir) / "console-vhost-compare.log"
    harness.log(f"booting the comparison guest (console log {console})")
    vm = harness.Qemu("vhost-compare", kernel, initrd, "", console, vhost_blk=cluster.vhost_sock)
    nvmf = cluster.pids["nvmf"]
    runs, begun, current, body, last = [], {}, None, [], None
    deadline = time.time() + a.timeout
    try:
        while True:
            if time.time() > deadline:
                raise CompareError(f"guest did not finish within {a.timeout} s (see {console})")
            try:
                line = vm.lines.get(timeout=1)
            except queue.Empty:
                continue
            if line is None:
                raise CompareError(f"guest exited before finishing (see {console})")
            if "@@VC-ERROR" in line:
                raise CompareError(line.split("@@VC-ERROR", 1)[1].strip() + f" (see {console})")
            if "@@VC-DONE" in line:
                return runs
            if "@@REQUEST" in line:
                what, *key = line.split("@@REQUEST", 1)[1].split()
                sample = (cpu_us(nvmf), cpu_us(vm.proc.pid))
                if what == "cpu-begin":
                    begun[tuple(key)] = sample
                elif what == "cpu-end" and tuple(key) in begun:
                    b = begun.pop(tuple(key))
                    last = (sample[0] - b[0], sample[1] - b[1])
                vm.send("@@REPLY ok")
            elif line.startswith("@@VC-BEGIN"):
                current, body = tuple(line.split()[1:4]), []
            elif line.startswith("@@VC-END") and current:
                fio = json.loads("\n".join(body))
                pending = (current, fio)
                current = None
            elif line.startswith("@@VC-GUEST"):
                busy, ios = (int(x) for x in line.split()[1:3])
                (label, job, rnd), fio = pending
                runs.append((label, job, int(rnd), fio, busy * TICK_US, ios, last[0], last[1]))
                harness.log(f"  round {rnd} {job} {label}: {summary(fio)[0]:.0f} IOPS")
            elif current:
                body.append(line)
    finally:
        vm.close()


def summary(fio):
    """(IOPS, MiB/s, mean total latency µs) of one fio JSON result (one reporting group)."""
    job = fio["jobs"][0]
    side = job["read"] if job["read"]["iops"] > 0 else job["write"]
    return side["iops"], side["bw_bytes"] / (1 << 20), side.get("lat_ns", {}).get("mean", 0) / 1000


def report(runs, a, kver):
    med = statistics.median
    lines = [
        f"One EC_2P1 volume of a Tessera system that `tessera up` runs on the host (service, 3 engines × 2 "
        "targets, the target in managed mode) is, in one QEMU guest (TCG, 2 vCPUs, 1 GiB, Linux "
        f"{kver}), both **vhost-user-blk** `/dev/vda` (`tessera up --vhost-blk`, 2 queues, shared guest "
        "memory) and an **NVMe/TCP** namespace reached by the guest's own nvme-tcp host over QEMU's user "
        "network. The repository's fio jobs (`fio-jobs/*.fio`: libaio, direct; 4 KiB QD32 = 2 jobs × 32, "
        f"128 KiB = 1 job × 16) run on each, interleaved (the order alternates), {a.rounds} rounds of "
        f"{a.runtime} s after 2 s of ramp; medians of the rounds. CPU per I/O counts the whole run "
        "(ramp included) against every I/O the guest's block layer completed in it: **guest** is the "
        "guest's busy time (`/proc/stat`), **QEMU** the QEMU process's CPU time on the host (under TCG "
        "that is mostly the emulated guest), **target** the CPU time of `tessera-nvmf` on the host "
        "(the front end; the engines' work is the same for both). TCG makes every guest instruction "
        "expensive, so guest-side costs are inflated alike for both; the ratios are the point. Produced "
        f"by `python3 tests/nvme-cli/vhost_compare.py --rounds {a.rounds} --runtime {a.runtime}` on "
        f"{time.strftime('%Y-%m-%d')}.", "",
        "| job | vhost IOPS | NVMe/TCP IOPS | vhost / NVMe | mean latency µs (vhost, NVMe) "
        "| guest CPU µs/I/O (vhost, NVMe) | QEMU CPU µs/I/O (vhost, NVMe) | target CPU µs/I/O (vhost, NVMe) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    ratios = []
    for job in JOBS:
        cols = {}
        for label in ("vhost", "nvme"):
            rs = [r for r in runs if r[0] == label and r[1] == job]
            if not rs:
                break
            cols[label] = (
                med(summary(r[3])[0] for r in rs),
                med(summary(r[3])[1] for r in rs),
                med(summary(r[3])[2] for r in rs),
                med(r[4] / max(r[5], 1) for r in rs),
                med(r[7] / max(r[5], 1) for r in rs),
                med(r[6] / max(r[5], 1) for r in rs),
            )
        if len(cols) < 2:
            lines.append(f"| {job} | – | – | not measured | | | | |")
            continue
        v, n = cols["vhost"], cols["nvme"]
        big = job.startswith("seq")
        rate = (lambda c: f"{c[1]:.0f} MiB/s") if big else (lambda c: f"{c[0]:.0f}")
        ratios.append((job, n[3] / v[3] if v[3] else 0, n[4] / v[4] if v[4] else 0))
        lines.append(
            f"| {job} | {rate(v)} | {rate(n)} | {v[0] / n[0]:.2f} | {v[2]:.0f}, {n[2]:.0f} | {v[3]:.0f}, {n[3]:.0f} "
            f"| {v[4]:.0f}, {n[4]:.0f} | {v[5]:.1f}, {n[5]:.1f} |")
    if ratios:
        g = [r[1] for r in ratios]
        q = [r[2] for r in ratios]
        lines += ["", f"Per I/O, NVMe/TCP inside the guest costs the guest {min(g):.1f}–{max(g):.1f}× the CPU time "
                  f"vhost-user-blk does, and the QEMU process {min(q):.1f}–{max(q):.1f}× (over the jobs above)."]
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runtime", type=int, default=5, help="seconds per fio run (after 2 s ramp)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (medians are reported)")
    ap.add_argument("--no-build", action="store_true", help="do not run cargo build")
    ap.add_argument("--no-setup", action="store_true", help="do not run setup.sh (cache must exist)")
    ap.add_argument("--log-dir", help="default target/nvme-cli-logs/<timestamp>-vhost-compare")
    ap.add_argument("--timeout", type=int, default=2400, help="guest timeout in seconds")
    a = ap.parse_args(argv)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    logdir = Path(a.log_dir) if a.log_dir else REPO / "target" / "nvme-cli-logs" / f"{stamp}-vhost-compare"
    logdir.mkdir(parents=True, exist_ok=True)
    workdir = tempfile.mkdtemp(prefix="tessera-vhost-compare-")
    cluster = None
    try:
        if not a.no_build:
            harness.log("cargo build --release --bins")
            subprocess.run(["cargo", "build", "--release", "--bins"], cwd=REPO, check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        kernel, base = guest_image(a.no_setup)
        cluster = harness.TesseraCluster(REPO / "target" / "release" / "tessera", workdir, logdir, name="vc",
                                         nqn="nqn.2026-12.io.tessera:vhost-compare", vhost=True)
        cluster.start()
        runs = boot(kernel, base, cluster, a, workdir, logdir)
    except (CompareError, harness.TargetError, subprocess.CalledProcessError, OSError, ValueError, KeyError) as e:
        print(f"vhost-compare: {e}", file=sys.stderr)
        return 1
    finally:
        if cluster:
            cluster.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    kv = REPO / "target" / "nvme-cli-guest" / "kver"
    text = report(runs, a, kv.read_text().strip() if kv.exists() else "?")
    (logdir / "vhost-compare.md").write_text(text)
    OUT.write_text(text)
    print(text)
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
