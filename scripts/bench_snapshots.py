"""Snapshot benchmarks for docs/BENCHMARKS.md (`python3 scripts/bench.py --snapshots`).

One `tessera up` system (4 engines, EC_2P1): two volumes of the same size, each exported; one
gets 10 snapshots taken while it is written, the other none. Measured:

- snapshot creation latency: `tessera snapshot create` end to end (it returns once the snapshot is
  final, i.e. once the pool's stable epoch has passed it: the engines' commit window plus a
  heartbeat);
- 4 KiB random-write IOPS (QD16, `tessera bench` over NVMe/TCP) on the volume with 10 snapshots
  and on the one without, runs interleaved, medians;
- the engines' bytes in use before and after the snapshots are deleted (aggregation frees what
  only they held).
"""

import json
import os
import subprocess
import time

import bench

SNAP_SECTION = "## Snapshots"
SNAP_DIR = os.path.join(bench.ROOT, "target", "bench-snapshots")
SNAP_RESULTS = os.path.join(SNAP_DIR, "results.json")
SNAP_ENGINES = 4
SNAP_VOLUME = "1G"
SNAP_COUNT = 10
SNAP_TARGET = "2G"                # per target: 4 engines x 2 targets reserve 16 GiB on disk
SNAP_NQN2 = "nqn.2026-12.io.tessera:bench-snap"


def tessera(up, *args, timeout=120):
    out = subprocess.run([os.path.join(bench.BIN, "tessera"), "--mgmt", up.mgmt, *args, "--json"],
                         check=True, capture_output=True, text=True, timeout=timeout).stdout
    return json.loads(out)


def used_bytes(up):
    """Bytes in use on every engine's targets, by the engines' own accounting as their last
    heartbeats reported it (`tessera system query`); None until every engine has reported."""
    used = [e.get("used_bytes") for e in tessera(up, "system", "query")["engines"]]
    return None if any(u is None for u in used) else sum(used)


def measure(runs, secs):
    up = bench.UpSystem("snap", ["--target-capacity", SNAP_TARGET], volume=SNAP_VOLUME, engines=SNAP_ENGINES, base=SNAP_DIR)
    try:
        tessera(up, "volume", "create", "vol1", "--size", SNAP_VOLUME)
        tessera(up, "export", "add", "--nqn", SNAP_NQN2, "--volume", "vol1", "--listen", up.addr)
        plain = up.bench_cmd("randwrite", "4k", 16, secs=secs)
        snapped = [SNAP_NQN2 if x == bench.HEAL_NQN else x for x in plain]
        # Fill both a little so the snapshots hold something, then 10 snapshots under writes.
        for cmd in (plain, snapped):
            bench.run_json(cmd)
        latencies = []
        for i in range(SNAP_COUNT):
            t0 = time.monotonic()
            s = tessera(up, "snapshot", "create", "default/vol1", f"s{i}")
            latencies.append(time.monotonic() - t0)
            if not s["stable"]:
                raise RuntimeError(f"snapshot s{i} not final: {s}")
            bench.run_json([x if x != f"{secs:g}" else "1" for x in snapped])
        iops = {"none": [], "ten": []}
        for _ in range(runs):
            iops["none"].append(bench.run_json(plain)["iops"])
            iops["ten"].append(bench.run_json(snapped)["iops"])
        before = used_bytes(up)
        t0 = time.monotonic()
        for i in range(SNAP_COUNT):
            tessera(up, "snapshot", "delete", "default/vol1", f"s{i}")
        after, freed_in = before, None
        while before is not None and time.monotonic() - t0 < 60:
            after = used_bytes(up)
            if after is not None and after < before * 0.9:
                freed_in = time.monotonic() - t0
                break
            time.sleep(0.5)
        res = {"latencies": latencies, "iops": iops, "used_before": before, "used_after": after, "freed_in": freed_in,
               "runs": runs, "secs": secs, "git": bench.git_state(), "cpu": bench.cpu_model()}
    finally:
        up.stop()
        subprocess.run(["rm", "-rf", up.dir], check=False)
    os.makedirs(SNAP_DIR, exist_ok=True)
    with open(SNAP_RESULTS, "w") as f:
        json.dump(res, f, indent=1)
    return res


def section(res):
    lat = sorted(res["latencies"])
    none, ten = bench.median(res["iops"]["none"]), bench.median(res["iops"]["ten"])
    mib = lambda b: "–" if b is None else f"{b / (1 << 20):.0f} MiB"
    lines = [
        SNAP_SECTION,
        "",
        f"`python3 scripts/bench.py --snapshots` at {res['git']} on {res['cpu']}: one `tessera up` system "
        f"({SNAP_ENGINES} engines, EC_2P1), two {SNAP_VOLUME} volumes exported side by side, one with {SNAP_COUNT} "
        f"snapshots taken while it was written. Runs interleaved, {res['runs']} of {res['secs']:g} s each, medians.",
        "",
        "| what | measured | command |",
        "|---|---|---|",
        f"| snapshot creation, until final | median {bench.median(lat):.2f} s (min {lat[0]:.2f}, max {lat[-1]:.2f}) of {len(lat)} | "
        "`tessera snapshot create default/vol1 sN` |",
        f"| 4 KiB random write, QD16, no snapshots | {none:,.0f} IOPS | `tessera bench --rw randwrite --bs 4k --qd 16 --time {res['secs']:g}` |",
        f"| the same with {SNAP_COUNT} snapshots | {ten:,.0f} IOPS ({ten / none:.2f} of no snapshots) | same, on the volume with snapshots |",
        f"| engines' bytes in use, {SNAP_COUNT} snapshots → deleted | {mib(res['used_before'])} → {mib(res['used_after'])}"
        + (f" in {res['freed_in']:.1f} s" if res.get("freed_in") else "") + " | `tessera snapshot delete` ×10; `tessera system query` (the engines' heartbeats) |",
        "",
        "A snapshot is final when no write at or below its epoch can still commit: its creation waits for the "
        "engines' commit window (`[tuning] commit_window_ms`, default 2 s) plus one heartbeat, so the latency is that "
        "window, not work. Writes to a volume with snapshots cost the same as without: a snapshot is a retained epoch, "
        "nothing is copied; what it costs is space, until aggregation may fold the versions it holds "
        "(docs/PLACEMENT.md, \"Snapshots\").",
        "",
    ]
    return lines
