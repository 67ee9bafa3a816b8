#!/usr/bin/env python3
"""Same-guest comparison of the Linux kernel NVMe/TCP target with Tessera's.

One QEMU guest (the harness's kernel and initramfs) runs the same fio jobs from fio-jobs/
through its own nvme-tcp host on 127.0.0.1 against (a) nvmet-tcp over a brd RAM disk,
configured through configfs, (b) tessera-nvmf started inside the guest with a malloc
namespace of the same size, and (c) an EC_2P1 volume of the same size of a whole system that
`tessera up` starts inside the guest (engines' files in the guest's RAM). All run under the
same emulation (TCG), so the ratios, not the absolute figures, are the point. Writes target/nvme-cli-logs/kernel-compare.md (included in
docs/BENCHMARKS.md by scripts/bench.py) and the guest console to the log directory.

    python3 tests/nvme-cli/run.py --kernel-compare           # or run this file directly
    python3 tests/nvme-cli/kernel_compare.py --runtime 5 --no-build

Python 3 standard library only.
"""

import argparse
import datetime
import json
import queue
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as harness  # noqa: E402  (the harness: Qemu, newc_archive, paths)

HERE = harness.HERE
REPO = harness.REPO
JOBS = ("randread-4k-qd1", "randwrite-4k-qd1", "randread-4k-qd32", "randwrite-4k-qd32", "seqwrite-128k", "seqread-128k")
SIZE_MIB = 128
KERNEL_PORT = 4420
TESSERA_PORT = 4421
EC_PORT = 4422
BINARIES = ("tessera", "tessera-nvmf", "tessera-engine", "tessera-mgmt")
OUT = REPO / "target" / "nvme-cli-logs" / "kernel-compare.md"


class CompareError(Exception):
    pass


def guest_image(no_setup):
    """(kernel, base initramfs) from setup.sh, as the harness gets them."""
    if no_setup:
        cache = REPO / "target" / "nvme-cli-guest"
        return cache / "vmlinuz", cache / "base.cpio"
    p = subprocess.run(["bash", str(HERE / "setup.sh")], stdout=subprocess.PIPE, text=True)
    if p.returncode != 0:
        raise CompareError(f"setup.sh failed with status {p.returncode}")
    kv = dict(l.split("=", 1) for l in p.stdout.splitlines() if "=" in l)
    return Path(kv["KERNEL"]), Path(kv["INITRD"])


def target_binaries(no_build, workdir):
    """{name: stripped release binary} for the target and `tessera up` (the guest holds them in
    RAM)."""
    if not no_build:
        harness.log("cargo build --release --bins")
        subprocess.run(["cargo", "build", "--release", "--bins"], cwd=REPO, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    out = {}
    for name in BINARIES:
        dst = Path(workdir) / name
        subprocess.run(["strip", "-o", str(dst), str(REPO / "target" / "release" / name)], check=True)
        out[name] = dst.read_bytes()
    return out


def boot(kernel, base_initrd, binaries, a, workdir, logdir):
    """Boots the comparison guest; returns {(target, job): fio JSON}."""
    runtime, timeout = a.runtime, a.timeout
    env = (f"RUNTIME={runtime}\nSIZE_MIB={SIZE_MIB}\nKPORT={KERNEL_PORT}\nTESSERA_PORT={TESSERA_PORT}\n"
           f"EC_PORT={EC_PORT}\nJOBS='{' '.join(JOBS)}'\nTESSERA_ARGS='{a.tessera_args}'\nCASES=''\n")
    initrd = harness.boot_initrd(base_initrd, Path(workdir) / "initrd-kernel-compare", env,
                                 (HERE / "compare" / "guest-compare.sh").read_bytes(),
                                 [(f"bin/{name}", data, 0o100755) for name, data in binaries.items()])
    console = Path(logdir) / "console-kernel-compare.log"
    harness.log(f"booting the comparison guest (console log {console})")
    vm = harness.Qemu("kernel-compare", kernel, initrd, "tessera.nvmet", console, mem=2048)
    results, current, body = {}, None, []
    deadline = time.time() + timeout
    try:
        while True:
            if time.time() > deadline:
                raise CompareError(f"guest did not finish within {timeout} s (see {console})")
            try:
                line = vm.lines.get(timeout=1)
            except queue.Empty:
                continue
            if line is None:
                raise CompareError(f"guest exited before finishing (see {console})")
            if line.startswith("<kernel "):
                continue
            if "@@KC-ERROR" in line:
                raise CompareError(line.split("@@KC-ERROR", 1)[1].strip() + f" (see {console})")
            if "@@KC-DONE" in line:
                return results
            if line.startswith("@@KC-BEGIN"):
                current, body = tuple(line.split()[1:3]), []
                harness.log(f"  {current[0]} {current[1]} done")
            elif line.startswith("@@KC-END") and current:
                results[current] = json.loads("\n".join(body))
                current = None
            elif current:
                body.append(line)
    finally:
        vm.close()


def summary(fio):
    """(IOPS, mean total latency in µs) of one fio JSON result (one reporting group). Total
    (submission + completion) latency, because the kernel target often completes a command before
    io_submit returns, which leaves almost nothing in fio's completion latency."""
    job = fio["jobs"][0]
    side = job["read"] if job["read"]["iops"] > 0 else job["write"]
    return side["iops"], side.get("lat_ns", {}).get("mean", 0) / 1000


# What the EC column measures beyond the kernel target (design, not figures).
EC_NOTE = ("What the EC_2P1 column pays for that the kernel's target does not do: each host command goes "
    "from the target through the client library (placement, EC encoding, CRC64) to two or three engines "
    "over RPC, and a write completes only after each engine's group commit (WAL write and `fdatasync`) "
    "for its shard; the kernel target copies into its RAM disk. Five processes (service, three engines, "
    "target) share the two emulated CPUs with fio and the host driver, and under TCG every system call "
    "and thread switch costs many times what it does natively. The same stack measured natively is the "
    "*Whole stack* section above.")


def report(results, runtime):
    kver = (REPO / "target" / "nvme-cli-guest" / "kver").read_text().strip() \
        if (REPO / "target" / "nvme-cli-guest" / "kver").exists() else "?"
    lines = [
        f"Inside one QEMU guest (TCG, 2 vCPUs, 2 GiB, Linux {kver}), the kernel's nvme-tcp host runs the "
        "repository's fio jobs (`fio-jobs/*.fio`: libaio, direct; 4 KiB QD32 = 2 jobs × 32, 128 KiB = 1 job × 16) "
        f"on 127.0.0.1 against **kernel**: nvmet-tcp over a {SIZE_MIB} MiB `brd` RAM disk (configfs, bdev "
        f"backend); **malloc**: `tessera-nvmf` started in the same guest with a {SIZE_MIB} MiB malloc namespace; "
        f"and **EC_2P1**: a {SIZE_MIB} MiB EC_2P1 volume of a whole Tessera system started in the guest with "
        "`tessera up --engines 3 --class EC_2P1` (management service, 3 engines × 2 targets with their WAL and "
        "data files on a tmpfs in the guest's RAM, the target in managed mode; a write is acknowledged once "
        "its shards are durable on their engines, which here means in RAM; 1.5× the host's bytes are "
        "stored, more for partial-stripe writes). Each device is written in "
        f"full first; each job runs {runtime} s after 2 s of ramp. Targets, engines, host and fio share the "
        "guest's 2 emulated CPUs, so absolute figures are low; the ratios are the point. Produced by "
        f"`python3 tests/nvme-cli/run.py --kernel-compare` on {time.strftime('%Y-%m-%d')}.", "",
        "| job | kernel IOPS | malloc IOPS | malloc / kernel | EC_2P1 IOPS | EC_2P1 / kernel "
        "| mean latency µs: kernel, malloc, EC_2P1 |",
        "|---|---|---|---|---|---|---|",
    ]
    for job in JOBS:
        k = results.get(("kernel", job))
        if not k:
            lines.append(f"| {job} | – | | not measured | | | |")
            continue
        ki, kl = summary(k)
        cells, lats = [], [f"{kl:.0f}"]
        for label in ("tessera", "tessera-ec"):
            r = results.get((label, job))
            if r:
                ti, tl = summary(r)
                cells += [f"{ti:.0f}", f"{ti / ki:.2f}"]
                lats.append(f"{tl:.0f}")
            else:
                cells += ["–", "not measured"]
                lats.append("–")
        lines.append(f"| {job} | {ki:.0f} | {' | '.join(cells)} | {', '.join(lats)} |")
    lines += ["", EC_NOTE]
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runtime", type=int, default=10, help="seconds per fio job (after 2 s ramp)")
    ap.add_argument("--no-build", action="store_true", help="do not run cargo build")
    ap.add_argument("--no-setup", action="store_true", help="do not run setup.sh (cache must exist)")
    ap.add_argument("--log-dir", help="default target/nvme-cli-logs/<timestamp>-kernel-compare")
    ap.add_argument("--timeout", type=int, default=1200, help="guest timeout in seconds")
    ap.add_argument("--tessera-args", default="", help="extra arguments for tessera-nvmf in the guest")
    a = ap.parse_args(argv)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    logdir = Path(a.log_dir) if a.log_dir else REPO / "target" / "nvme-cli-logs" / f"{stamp}-kernel-compare"
    logdir.mkdir(parents=True, exist_ok=True)
    workdir = tempfile.mkdtemp(prefix="tessera-kernel-compare-")
    try:
        kernel, base = guest_image(a.no_setup)
        binaries = target_binaries(a.no_build, workdir)
        results = boot(kernel, base, binaries, a, workdir, logdir)
    except (CompareError, subprocess.CalledProcessError, OSError, ValueError, KeyError) as e:
        print(f"kernel-compare: {e}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    text = report(results, a.runtime)
    (logdir / "kernel-compare.md").write_text(text)
    OUT.write_text(text)
    print(text)
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
