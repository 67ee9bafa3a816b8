"""Snapshot and EC aggregation benchmarks for docs/BENCHMARKS.md (`python3 scripts/bench.py --snapshots`).

One `tessera up` system (4 engines, EC_2P1): two volumes of the same size, each exported; one
gets 10 snapshots taken while it is written, the other none. Measured:

- snapshot creation latency: `tessera snapshot create` end to end (it returns once the snapshot is
  final, i.e. once the pool's stable epoch has passed it: the engines' commit window plus a
  heartbeat);
- 4 KiB random-write IOPS (QD16, `tessera bench` over NVMe/TCP) on the volume with 10 snapshots
  and on the one without, runs interleaved, medians;
- the engines' bytes in use before and after the snapshots are deleted (aggregation frees what
  only they held);
- EC aggregation: a third volume written with sequential 4 KiB writes (every one a partial-stripe
  write: a fragment and a copy per parity shard), the bytes it takes before and after the
  engines fold it into full stripes, and how fast they do (at the engines' default pace).
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
EC_NQN3 = "nqn.2026-12.io.tessera:bench-ec-agg"
EC_VOLUME_MIB = 256


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
        res["ec"] = measure_ec(up)
    finally:
        up.stop()
        subprocess.run(["rm", "-rf", up.dir], check=False)
    os.makedirs(SNAP_DIR, exist_ok=True)
    with open(SNAP_RESULTS, "w") as f:
        json.dump(res, f, indent=1)
    return res


def settled_used(up, timeout=30):
    """The engines' bytes in use once two heartbeats apart report the same."""
    last, deadline = None, time.monotonic() + timeout
    while time.monotonic() < deadline:
        now = used_bytes(up)
        if now is not None and now == last:
            return now
        last = now
        time.sleep(1.5)
    return last


def measure_ec(up):
    """A volume written with 4 KiB sequential writes, folded by the engines' EC aggregation."""
    tessera(up, "volume", "create", "vol2", "--size", f"{EC_VOLUME_MIB}M")
    tessera(up, "export", "add", "--nqn", EC_NQN3, "--volume", "vol2", "--listen", up.addr)
    base = settled_used(up)
    pool = tessera(up, "pool", "query", "default")
    folded0 = pool["scrub"]["ec_stripes"]
    cmd = [os.path.join(bench.BIN, "tessera"), "bench", "--addr", up.addr, "--nqn", EC_NQN3, "--rw", "write", "--bs", "4k",
           "--qd", "16", "--ios", str(EC_VOLUME_MIB * 256), "--json"]
    t0 = time.monotonic()
    bench.run_json(cmd)
    written_in = time.monotonic() - t0
    stripes_total = EC_VOLUME_MIB * (1 << 20) // (2 * 65536)
    # Folded: every stripe of it (the others are folded already), nothing waiting.
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        s = tessera(up, "pool", "query", "default")["scrub"]
        if s["ec_stripes"] - folded0 >= stripes_total and s["ec_waiting"] == 0:
            break
        time.sleep(0.5)
    folded_in = time.monotonic() - t0
    after = settled_used(up, timeout=60)
    s = tessera(up, "pool", "query", "default")["scrub"]
    return {"mib": EC_VOLUME_MIB, "base": base, "after": after, "written_in": written_in, "folded_in": folded_in,
            "stripes": s["ec_stripes"] - folded0, "stripes_total": stripes_total}


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
    ec = res.get("ec")
    if ec:
        data = ec["mib"] << 20
        held = ec["after"] - ec["base"] if ec["after"] is not None and ec["base"] is not None else None
        rate = ec["stripes"] * 2 * 65536 / max(ec["folded_in"], 1e-9) / (1 << 20)
        lines += [
            "### EC aggregation",
            "",
            f"The same system: a {ec['mib']} MiB EC_2P1 volume written once with sequential 4 KiB writes (`tessera bench "
            f"--rw write --bs 4k --qd 16 --ios {ec['mib'] * 256}`), each a partial-stripe write that stores its fragment and a copy "
            f"(2x); the engines fold the stripes at their default pace (`[heal] ec_aggregation_rate` = 16 MiB/s each) once "
            f"they are below the stable epoch.",
            "",
            "| what | measured |",
            "|---|---|",
            f"| bytes the volume takes once folded | {'–' if held is None else f'{held / (1 << 20):.0f} MiB, {held / data:.2f}x its data'} "
            f"(EC_2P1 full stripes: 1.5x; unfolded: 2x) |",
            f"| stripes folded | {ec['stripes']} of {ec['stripes_total']} |",
            f"| from the first write to every stripe folded | {ec['folded_in']:.1f} s (writing took {ec['written_in']:.1f} s) |",
            f"| folding rate over that time | {rate:.1f} MiB/s of stripes, all engines together |",
            "",
        ]
    return lines
