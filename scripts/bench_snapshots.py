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

    finally:
        up.stop()
        subprocess.run(["rm", "-rf", up.dir], check=False)
    res["ec"] = measure_ec()
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


def measure_ec():
    """A fresh system whose one volume is written once with 4 KiB sequential writes, folded by the
    engines' EC aggregation (which runs while the writes go on)."""
    up = bench.UpSystem("ec", ["--target-capacity", SNAP_TARGET], volume=f"{EC_VOLUME_MIB}M", engines=SNAP_ENGINES, base=SNAP_DIR)
    try:
        base = settled_used(up)
        cmd = up.bench_cmd("write", "4k", 16, ios=EC_VOLUME_MIB * 256)
        t0 = time.monotonic()
        bench.run_json(cmd)
        written_in = time.monotonic() - t0
        t_end = time.monotonic()
        at_end = used_bytes(up)
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            s = tessera(up, "pool", "query", "default")["scrub"]
            if s["ec_waiting"] == 0 and s["ec_stripes"] >= EC_VOLUME_MIB * (1 << 20) // (2 * 65536):
                break
            time.sleep(0.5)
        after = settled_used(up, timeout=60)
        settled_in = time.monotonic() - t_end
        s = tessera(up, "pool", "query", "default")["scrub"]
    finally:
        up.stop()
        subprocess.run(["rm", "-rf", up.dir], check=False)
    return {"mib": EC_VOLUME_MIB, "base": base, "at_end": at_end, "after": after, "written_in": written_in,
            "settled_in": settled_in, "folds": s["ec_stripes"], "stripes_total": EC_VOLUME_MIB * (1 << 20) // (2 * 65536)}


def runs_text(xs):
    return ", ".join(f"{x:,.0f}" for x in xs)


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
        f"| 4 KiB random write, QD16, no snapshots | {none:,.0f} IOPS (runs: {runs_text(res['iops']['none'])}) | `tessera bench --rw randwrite --bs 4k --qd 16 --time {res['secs']:g}` |",
        f"| the same with {SNAP_COUNT} snapshots | {ten:,.0f} IOPS ({ten / none:.2f} of no snapshots; runs: {runs_text(res['iops']['ten'])}) | same, on the volume with snapshots |",
        f"| engines' bytes in use, {SNAP_COUNT} snapshots → deleted | {mib(res['used_before'])} → {mib(res['used_after'])}"
        + (f" in {res['freed_in']:.1f} s" if res.get("freed_in") else "") + " | `tessera snapshot delete` ×10; `tessera system query` (the engines' heartbeats) |",
        "",
        "A snapshot is final when no write at or below its epoch can still commit: its creation waits for the "
        "engines' commit window (`[tuning] commit_window_ms`, default 2 s) plus one heartbeat, so the latency is that "
        "window, not work. A write to a volume with snapshots stores the same as without (a snapshot is a retained "
        "epoch; nothing is copied), so the two IOPS figures differ by the spread of short runs on two shared cores "
        "(compare the runs); what a snapshot costs is space, until aggregation may fold the versions it holds "
        "(docs/PLACEMENT.md, \"Snapshots\").",
        "",
    ]
    ec = res.get("ec")
    if ec:
        data = ec["mib"] << 20
        ratio = lambda u: "–" if u is None or ec["base"] is None else f"{(u - ec['base']) / (1 << 20):.0f} MiB, {(u - ec['base']) / data:.2f}x its data"
        lines += [
            "### EC aggregation",
            "",
            f"A fresh `tessera up` system of the same shape whose one {ec['mib']} MiB EC_2P1 volume is written once with "
            f"sequential 4 KiB writes (`tessera bench --rw write --bs 4k --qd 16 --ios {ec['mib'] * 256}`): each is a "
            f"partial-stripe write that stores its fragment and a copy (2x unfolded). The engines fold stripes while the "
            f"writes go on, at their default pace (`[heal] ec_aggregation_rate` = 16 MiB/s each), once they are below "
            f"the stable epoch (about 2 s old).",
            "",
            "| what | measured |",
            "|---|---|",
            f"| writing the volume | {ec['written_in']:.1f} s |",
            f"| bytes in use when the writes ended | {ratio(ec['at_end'])} |",
            f"| bytes in use once every stripe is folded and freed | {ratio(ec['after'])} (full stripes: 1.5x) |",
            f"| last write to folded and freed | {ec['settled_in']:.1f} s |",
            f"| folds | {ec['folds']} for {ec['stripes_total']} stripes (a stripe is folded again when more of it is written) |",
            "",
        ]
    return lines
