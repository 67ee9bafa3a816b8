#!/usr/bin/env python3
"""Produces docs/BENCHMARKS.md: the loopback TCP limit, the Tessera target with null and malloc
bdevs, the idle cost, the storage engine over its RPC next to raw fio on the same
filesystem, self-healing (rebuild, host I/O during it, reintegration), and the whole stack
(`tessera up` per object class, host I/O through the target next to raw fio), each figure the
median of several runs, with the commands used.

    python3 scripts/bench.py                 # full run (~35 minutes on 2 cores; --no-heal --no-stack: ~10)
    python3 scripts/bench.py --runs 1 --time 1 --idle 5 --out /tmp/b.md   # quick smoke run
    python3 scripts/bench.py --profile       # callgrind instructions per 4K read/write (QD32, null)
    python3 scripts/bench.py --engine-only   # only the storage engine section (~6 minutes), spliced
                                             # into the existing page
    python3 scripts/bench.py --heal          # only the self-healing section (~10 minutes): rebuild
                                             # bandwidth after kill -9 of an engine of `tessera up
                                             # --engines 4`, host I/O during the rebuild, reintegration
    python3 scripts/bench.py --stack-only    # only the whole-stack section (~12 minutes): a fresh `tessera up`
                                             # per class (EC_2P1, RP_3, RP_2), `tessera bench` through the
                                             # NVMe/TCP target paired run by run with raw fio on the same disk;
                                             # --stack-results target/bench-stack/results.json re-renders it
    python3 scripts/bench.py --kernel-only   # only the same-guest comparison with the kernel target, from
                                             # what `python3 tests/nvme-cli/run.py --kernel-compare` wrote
    python3 scripts/bench.py --vhost-only    # only the vhost-user-blk / NVMe/TCP comparison in one guest, from
                                             # what `python3 tests/nvme-cli/vhost_compare.py` wrote
    python3 scripts/bench.py --one-core SPDK_DIR   # only the one-core comparison with SPDK's nvmf_tgt, both
                                             # driven by spdk_nvme_perf (~2 minutes; SPDK built by hand)

The same-guest comparison with the Linux kernel target (nvmet-tcp) is appended from
target/nvme-cli-logs/kernel-compare.md, which `python3 tests/nvme-cli/run.py --kernel-compare`
writes (a QEMU guest, a few minutes); run that first.
"""
import argparse, json, os, platform, queue, re, resource, signal, socket, statistics, subprocess, sys, tempfile, threading, time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, "target", "release")
ONECORE_RESULTS = os.path.join(ROOT, "target", "bench-onecore", "results.json")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_onecore  # noqa: E402  (scripts/bench_onecore.py)


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def run_json(cmd):
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def median_of(cmd, runs, key):
    vals = [run_json(cmd) for _ in range(runs)]
    vals.sort(key=lambda r: r[key])
    return vals[len(vals) // 2], [v[key] for v in vals]


class Target:
    def __init__(self, bdev, wrapper=()):
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="tessera-bench-")
        cfg = os.path.join(self.dir, "t.toml")
        with open(cfg, "w") as f:
            f.write(f'listen = ["127.0.0.1:{self.port}"]\nio_queue_depth = 256\n\n[[subsystem]]\n'
                    f'nqn = "nqn.2026-11.io.tessera:bench"\nallow_any_host = true\n\n'
                    f'[[subsystem.namespace]]\nnsid = 1\nbdev = "{bdev}"\nsize_mib = 1024\nblock_size = 512\n')
        self.proc = subprocess.Popen(list(wrapper) + [os.path.join(BIN, "tessera-nvmf"), "--config", cfg],
                                     stderr=open(os.path.join(self.dir, "log"), "w"))
        for _ in range(600):
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.05)

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=10)


# The wire limit in two topologies: server in its own process (as target and load generator are)
# and server in the client's process (a round trip may never leave one worker thread).
WIRE_MODES = ("2 proc", "1 proc")

# Measured with `python3 scripts/bench.py --profile` at commit d1b6503, before the hot path lost
# its per-I/O allocations (a writer task per connection fed over a channel, FuturesUnordered,
# SipHash CID map): kept here so the page shows before and after side by side.
PROFILE_BEFORE = {
    "randread": (7459, 1484, [(579, "_int_free"), (457, "__memcpy_avx_unaligned_erms"), (361, "_int_malloc"),
                              (299, "<BytesMut as BufMut>::put_slice"), (287, "tessera_nvmf::server::serve::{{closure}}::{{closure}}"),
                              (264, "malloc"), (139, "<FuturesUnordered<Fut> as Stream>::poll_next"),
                              (128, "BytesMut::split_to"), (124, "free"), (91, "BuildHasher::hash_one (SipHash)")]),
    "randwrite": (6820, 1400, [(440, "_int_free"), (381, "_int_malloc"), (365, "__memcpy_avx_unaligned_erms"),
                               (291, "tessera_nvmf::server::serve::{{closure}}::{{closure}}"), (224, "malloc"),
                               (161, "<BytesMut as BufMut>::put_slice"), (151, "<FuturesUnordered<Fut> as Stream>::poll_next"),
                               (116, "tessera_nvme_proto::pdu::decode"), (104, "free"), (91, "BuildHasher::hash_one (SipHash)")]),
}

PROFILE_IOS = 100000
PROFILE_WARMUP = 5000


def profile_cmd(port, rw, ios):
    return [os.path.join(BIN, "tessera"), "bench", "--addr", f"127.0.0.1:{port}", "--nqn", "nqn.2026-11.io.tessera:bench",
            "--rw", rw, "--bs", "4k", "--qd", "32", "--ios", str(ios), "--json"]


def top_functions(outfile, n):
    """Total instructions and the n functions with the most exclusive ones: (Ir, file, name)."""
    text = subprocess.run(["callgrind_annotate", "--threshold=100", outfile], capture_output=True, text=True).stdout
    rows = []
    for line in text.splitlines():
        m = re.match(r"\s*([\d,]+) \([ \d.]+%\)\s+(.*?):(.*?)( \[.*\])?$", line)
        if m and "PROGRAM TOTALS" not in line:
            rows.append((int(m.group(1).replace(",", "")), m.group(2), m.group(3)))
    # Inclusive frames of the task harness come first with 100 %; keep exclusive leaf costs.
    total = max((r[0] for r in rows), default=0)
    leaf = [r for r in rows if r[0] < total]
    alloc = sum(r[0] for r in leaf if re.search(r"malloc|free|realloc|__rdl_|__rust_(de)?alloc", r[2]))
    return total, alloc, leaf[:n]


def profile(runs_dir):
    """Instructions per 4 KiB read and write (QD32, null bdev) of tessera-nvmf under callgrind:
    warm up, zero the counters, run PROFILE_IOS I/Os, dump. Returns Markdown lines."""
    os.makedirs(runs_dir, exist_ok=True)
    lines = []
    for rw in ("randread", "randwrite"):
        out = os.path.join(runs_dir, f"callgrind.{rw}.out")
        t = Target("null", ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}"])
        try:
            time.sleep(2)
            subprocess.run(profile_cmd(t.port, rw, PROFILE_WARMUP), check=True, capture_output=True)
            subprocess.run(["callgrind_control", "-z", str(t.proc.pid)], check=True, capture_output=True)
            subprocess.run(profile_cmd(t.port, rw, PROFILE_IOS), check=True, capture_output=True)
            subprocess.run(["callgrind_control", "-d", str(t.proc.pid)], check=True, capture_output=True)
        finally:
            t.stop()
        total, alloc, top = top_functions(out + ".1", 12)
        lines += [f"**4 KiB {rw}, QD32**: {total / PROFILE_IOS:,.0f} instructions per I/O "
                  f"({total:,} for {PROFILE_IOS} I/Os), of which {alloc / PROFILE_IOS:,.0f} in malloc/free. "
                  "Top functions (exclusive):", "",
                  "| instr/I/O | % | function |", "|---|---|---|"]
        for ir, _file, fn in top:
            lines.append(f"| {ir / PROFILE_IOS:,.0f} | {ir / total * 100:.1f} | `{fn.strip()[:110]}` |")
        lines.append("")
    return lines


# ---------------------------------------------------------------------------------------------
# The storage engine over its RPC, next to raw fio on a file in the same directory.

ENGINE_DIR = os.path.join(ROOT, "target", "bench-engine")
ENGINE_TARGETS = 2
ENGINE_RANGE_GIB = 1          # per target: what `tessera bench-engine --range` covers
ENGINE_CAPACITY = "6GiB"      # per target: room for every run's new versions before aggregation frees them (the data
                              # files fill to this as next-fit allocation sweeps them: 12 GiB of disk)
ENGINE_SECTION = "## Storage engine over RPC"
ENGINE_AGGREGATION_LAG = 5    # s: the engine's default aggregation_lag_secs
# (op, bs, pattern, qd); fio's rw for the same access
ENGINE_CASES = [(op, bs, pattern, qd) for op in ("update", "fetch")
                for bs, pattern in (("4k", "rand"), ("128k", "seq")) for qd in (1, 32)]
FIO_RW = {("update", "rand"): "randwrite", ("update", "seq"): "write", ("fetch", "rand"): "randread", ("fetch", "seq"): "read"}


class Engine:
    """A tessera-engine (release build) with a fresh data directory under target/bench-engine/."""

    def __init__(self, name, capacity=ENGINE_CAPACITY):
        self.dir = os.path.join(ENGINE_DIR, name)
        subprocess.run(["rm", "-rf", self.dir], check=True)
        os.makedirs(self.dir)
        cfg = os.path.join(self.dir, "engine.toml")
        with open(cfg, "w") as f:
            f.write(f'rank = 0\nlisten = "127.0.0.1:0"\ndata_dir = "{os.path.join(self.dir, "data")}"\n'
                    f'targets = {ENGINE_TARGETS}\ntarget_capacity = "{capacity}"\n')
        self.log_path = os.path.join(self.dir, "log")
        self.proc = subprocess.Popen([os.path.join(BIN, "tessera-engine"), "--config", cfg],
                                     stderr=open(self.log_path, "w"), env=dict(os.environ, RUST_LOG="info"))
        self.addr = None
        for _ in range(600):
            m = re.search(r"engine listening addr=(\S+)", open(self.log_path).read())
            if m:
                self.addr = m.group(1)
                break
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        if not self.addr:
            raise RuntimeError("tessera-engine did not start:\n" + open(self.log_path).read())

    def stop(self):
        """SIGTERM; returns the engine's log (with its group commit summary per target)."""
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=120)
        return open(self.log_path).read()


def bench_engine_cmd(e, op, bs, pattern, qd, secs, extra=()):
    return [os.path.join(BIN, "tessera"), "bench-engine", "--addr", e.addr, "--op", op, "--bs", bs,
            "--pattern", pattern, "--qd", str(qd), "--targets", str(ENGINE_TARGETS),
            "--range", f"{ENGINE_RANGE_GIB}g", "--engine-pid", str(e.proc.pid)] + \
        (["--time", f"{secs:g}"] if secs else []) + list(extra) + ["--json"]


def show_cmd(cmd):
    """A command as the page shows it: no paths, no address or pid."""
    out, skip = [], False
    for x in cmd:
        if skip:
            skip = False
            continue
        if x in ("--addr", "--engine-pid", "--filename", "--output-format"):
            skip = True
            continue
        if x == "--json":
            continue
        out.append(os.path.basename(x) if x.startswith("/") else x)
    return " ".join(out)


FIO_FILE = "fio.dat"


def fio_cmd(rw, bs, qd, secs, extra=(), path=None):
    return ["fio", "--name=raw", "--filename", path or os.path.join(ENGINE_DIR, FIO_FILE),
            f"--size={ENGINE_TARGETS * ENGINE_RANGE_GIB}g", "--direct=1", "--ioengine=io_uring", f"--rw={rw}",
            f"--bs={bs}", f"--iodepth={qd}"] + list(extra) + ["--time_based", f"--runtime={secs:g}",
                                                            "--output-format", "json"]


def run_fio(cmd):
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    job = json.loads(out[out.index("{"):])["jobs"][0]
    d = job["read"] if job["read"]["io_bytes"] > 0 else job["write"]
    pct = d["clat_ns"].get("percentile", {})
    return {"iops": d["iops"], "mib_per_s": d["bw_bytes"] / 2**20,
            "lat_p50_us": pct.get("50.000000", 0) / 1000, "lat_p99_us": pct.get("99.000000", 0) / 1000}


def strace_counts(pid, run):
    """Runs `run()` with `strace -c -f` attached to pid; {syscall: calls}."""
    out = os.path.join(ENGINE_DIR, "strace.txt")
    st = subprocess.Popen(["strace", "-c", "-f", "-p", str(pid), "-o", out], stderr=subprocess.DEVNULL)
    time.sleep(1)
    try:
        result = run()
    finally:
        st.send_signal(signal.SIGINT)
        st.wait(timeout=60)
    counts = {}
    for line in open(out):
        f = line.split()
        if len(f) >= 5 and f[0][0].isdigit() and f[-1] != "total":
            counts[f[-1]] = int(f[3])
    os.remove(out)
    return counts, result


# Where the engine's CPU goes: inclusive share of these functions in `perf record` samples.
PERF_SYMBOLS = [
    ("starting commits (`Target::commit_start`: `O_DIRECT` data write, record encoding)",
     "tessera_engine::target::commit::<impl tessera_engine::target::Target>::commit_start"),
    ("making commits durable (`SyncJob::run`, sync thread: data `fdatasync`, WAL write + `fdatasync`)",
     "tessera_engine::target::commit::SyncJob::run"),
    ("… of which `fdatasync` (both files)", "fdatasync"),
    ("applying commits to the index (`Target::commit_finish`)",
     "tessera_engine::target::commit::<impl tessera_engine::target::Target>::commit_finish"),
    ("aggregation (`Target::aggregate_step`)", "tessera_engine::target::Target::aggregate_step"),
    ("… of which planning (`Index::plan_aggregation`)", "tessera_engine::index::Index::plan_aggregation"),
    ("staging updates (`Target::stage`: checksum check, allocation)", "tessera_engine::target::Target::stage"),
    ("fetches (`Target::fetch_array`)", "tessera_engine::target::Target::fetch_array"),
    ("CRC64 (`crc64`, everywhere)", "tessera_engine_proto::types::crc64"),
    ("sending replies (`server::write_replies`: `writev` on the socket)", "tessera_engine::server::write_replies"),
]


def perf_profile(pid, run):
    """Runs `run()` under `perf record -e cpu-clock --call-graph dwarf -p pid`; returns
    ({label: % of the engine's samples}, run's result), or (None, result) without perf."""
    out = os.path.join(ENGINE_DIR, "perf.data")
    try:
        pr = subprocess.Popen(["perf", "record", "-q", "-e", "cpu-clock", "-F", "999", "--call-graph", "dwarf,16384",
                               "-p", str(pid), "-o", out], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    except FileNotFoundError:
        return None, run()
    time.sleep(1)
    try:
        result = run()
    finally:
        pr.send_signal(signal.SIGINT)
        pr.wait(timeout=120)
    text = subprocess.run(["perf", "report", "-i", out, "--children", "--sort", "symbol", "--stdio", "-g", "none"],
                          capture_output=True, text=True).stdout
    share = {}
    for line in text.splitlines():
        m = re.match(r"\s*([\d.]+)%\s+[\d.]+%\s+\[.\]\s+(\S+)", line)
        if m:
            for label, sym in PERF_SYMBOLS:
                if m.group(2).split("::{{closure}}")[0] in (sym, "__GI_" + sym, "__libc_" + sym):
                    share[label] = max(share.get(label, 0.0), float(m.group(1)))
    os.remove(out)
    return share, result


def commit_summary(log):
    """(WAL records, ops) summed over targets from the engine's shutdown log, or None."""
    recs = ops = 0
    found = False
    for m in re.finditer(r"group commit summary wal_records=(\d+) ops=(\d+)", log):
        recs += int(m.group(1))
        ops += int(m.group(2))
        found = True
    return (recs, ops) if found else None


def engine_measure(runs, secs):
    """Every engine case and its fio counterparts; returns what engine_section() prints.

    The disk of a shared virtual machine drifts by several times within minutes, so each engine run
    is paired with its fio runs right after it (same directory, same block size, depth and order;
    for updates also the durable fio variant) and ratios are taken per pair."""
    os.makedirs(ENGINE_DIR, exist_ok=True)
    res = {"runs": runs, "secs": secs}
    # fio's file is written in full first: reads of never-written blocks would not touch the disk.
    fio_path = os.path.join(ENGINE_DIR, FIO_FILE)
    subprocess.run(["fio", "--name=fill", "--filename", fio_path, f"--size={ENGINE_TARGETS * ENGINE_RANGE_GIB}g",
                    "--direct=1", "--ioengine=io_uring", "--rw=write", "--bs=1m", "--iodepth=8"],
                   check=True, capture_output=True)
    e = Engine("main")
    cases = {}
    try:
        for op, bs, pattern, qd in ENGINE_CASES:
            if op == "fetch" and "prefill_seconds" not in res:
                # Write the whole range once (1 MiB updates), so every fetch reads stored data.
                pre = run_json(bench_engine_cmd(e, "fetch", "4k", "rand", 32, None, ["--ios", "1"]))
                res["prefill_seconds"] = pre["prefill_seconds"]
            # Start every case with the engine idle: versions of earlier runs become aggregatable 5 s
            # after they were written, and that background work would land in whichever run is next.
            wait_idle(e.proc.pid)
            cmd = bench_engine_cmd(e, op, bs, pattern, qd, secs, ["--no-prefill"] if op == "fetch" else [])
            fcmd = fio_cmd(FIO_RW[(op, pattern)], bs, qd, secs)
            # Durable raw: an fdatasync after every write at QD1, after every 32 at QD32.
            dcmd = fio_cmd(FIO_RW[(op, pattern)], bs, qd, secs, [f"--fdatasync={qd}"]) if op == "update" else None
            pairs = []
            for _ in range(runs):
                r = run_json_on_machine(cmd)
                if r.get("hole_bytes"):
                    raise RuntimeError(f"{show_cmd(cmd)} read {r['hole_bytes']} bytes of holes")
                pairs.append((r, run_fio(fcmd), run_fio(dcmd) if dcmd else None))
            cases[(op, bs, qd)] = {"pairs": pairs, "cmd": show_cmd(cmd), "fio_cmd": show_cmd(fcmd),
                                   "durable_cmd": show_cmd(dcmd) if dcmd else None}
    finally:
        res["log_main"] = e.stop()
        os.remove(fio_path)
    res["cases"] = cases

    # Where a 4 KiB QD32 update goes: a fresh engine, one run alone for the group commit batch size
    # (from the engine's shutdown summary), then one under strace for system calls per update.
    e = Engine("commit")
    try:
        r = run_json(bench_engine_cmd(e, "update", "4k", "rand", 32, secs))
    finally:
        res["commit"] = (r, commit_summary(e.stop()))
    e = Engine("strace")
    try:
        counts, r = strace_counts(e.proc.pid, lambda: run_json(bench_engine_cmd(e, "update", "4k", "rand", 32, secs)))
    finally:
        e.stop()
    res["strace"] = (counts, r)
    e = Engine("profile")
    try:
        res["profile"] = {}
        for qd in (32, 1):
            wait_idle(e.proc.pid)
            res["profile"][qd] = perf_profile(e.proc.pid, lambda: run_json(bench_engine_cmd(e, "update", "4k", "rand", qd, secs)))
    finally:
        e.stop()
    subprocess.run(["rm", "-rf"] + [os.path.join(ENGINE_DIR, d) for d in ("main", "commit", "strace", "profile")], check=True)
    return res


def git_state():
    """The short commit, with ' + uncommitted engine changes' when engine/ differs from it."""
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--", "engine", "engine-proto", "engine-client", "client"], cwd=ROOT,
                           capture_output=True, text=True).stdout.strip()
    return (head or "?") + (" + uncommitted engine changes" if dirty else "")


def cpu_model():
    return subprocess.run(["sh", "-c", "grep -m1 'model name' /proc/cpuinfo | cut -d: -f2"], capture_output=True, text=True).stdout.strip()


def disk_model(dev):
    """'virtio block device vda' or the like."""
    name = os.path.basename(dev)
    base = name if os.path.exists(f"/sys/block/{name}") else re.sub(r"p?\d+$", "", name)
    return f"{'virtio block device' if base.startswith('vd') else 'block device'} {base or '?'}"


def wait_idle(pid, quiet=0.05, limit=90):
    """Waits until versions written so far are old enough to aggregate and the process then uses
    less than `quiet` CPU seconds per second (the engine's background aggregation has caught up),
    at most `limit` seconds more."""
    time.sleep(ENGINE_AGGREGATION_LAG + 1)
    last = cpu_seconds(pid)
    for _ in range(limit):
        time.sleep(1)
        now = cpu_seconds(pid)
        if now - last < quiet:
            return
        last = now


def cpu_seconds(pid):
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / 100


def verdict(ratio, goal):
    return f"**{ratio:.2f}** (goal ≥ {goal}: {'met' if ratio >= goal else 'not met'})"


def median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2] if len(xs) % 2 else (xs[len(xs) // 2 - 1] + xs[len(xs) // 2]) / 2


def case_summary(c):
    """Medians of a case's paired runs: the engine run and fio runs with median IOPS, and the
    median of the per-pair ratios."""
    pairs = c["pairs"]
    mid = lambda rs: sorted(rs, key=lambda r: r["iops"])[len(rs) // 2]
    out = {"engine": mid([p[0] for p in pairs]), "fio": mid([p[1] for p in pairs]),
           "engine_runs": [p[0]["iops"] for p in pairs], "fio_runs": [p[1]["iops"] for p in pairs],
           "ratio": median([p[0]["iops"] / p[1]["iops"] for p in pairs])}
    e = [p[0] for p in pairs if "machine_busy" in p[0]]
    if e:
        out["busy"] = median([x["machine_busy"] for x in e])
        # CPU µs per operation of the engine and the load generator together.
        out["cpu_whole"] = median([((x.get("engine_cpu_seconds") or 0.0) + x["loadgen_cpu"]) / max(x["ios"], 1) * 1e6 for x in e])
    if pairs[0][2]:
        out["durable"] = mid([p[2] for p in pairs])
        out["durable_ratio"] = median([p[0]["iops"] / p[2]["iops"] for p in pairs])
    return out


def engine_section(res):
    """The storage engine section of the page, from engine_measure()'s results."""
    runs, secs = res["runs"], res["secs"]
    S = {k: case_summary(c) for k, c in res["cases"].items()}
    fs = subprocess.run(["findmnt", "-n", "-o", "FSTYPE,SOURCE", "-T", ENGINE_DIR], capture_output=True, text=True).stdout.split()
    fs_text = f"{fs[0]} on {fs[1]}" if len(fs) == 2 else "the repository's filesystem"
    k_runs = lambda xs: "/".join(f"{x / 1000:.1f}k" for x in xs)
    lines = [ENGINE_SECTION, "",
             f"`tessera bench-engine` drives one `tessera-engine` (release build, {ENGINE_TARGETS} targets, capacity "
             f"{ENGINE_CAPACITY} each, data directory under `target/bench-engine/`: {fs_text}) over loopback RPC on "
             f"one connection, spreading the operations over both targets, {ENGINE_RANGE_GIB} GiB per target. Raw fio "
             f"works on a {ENGINE_TARGETS * ENGINE_RANGE_GIB} GiB file in the same directory (written in full first): "
             "`fio --direct=1 --ioengine=io_uring` with the same block size, depth and access order. The virtual "
             "disk's speed drifts by several times within minutes, so every engine run is **paired** with its fio "
             f"runs started right after it; each case is {runs} such pairs of {secs:g} s runs, and the table shows "
             "the median engine and fio runs and the **median of the per-pair ratios** (IOPS; the same as bandwidth, "
             "the block size being equal). Each case starts once the engine is idle (versions of earlier runs "
             f"aggregated). *CPU* is the engine's CPU seconds per million operations. Regenerate just this section with "
             "`python3 scripts/bench.py --engine-only` (about 8 minutes).", "",
             f"Machine: {os.cpu_count()} CPUs ({cpu_model()}) shared by the engine, the load generator and other jobs "
             f"(compilers), {round(os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30)} GiB RAM, "
             f"Linux {platform.release()}, {disk_model(fs[1] if len(fs) == 2 else '')}; run on {time.strftime('%Y-%m-%d')} "
             f"with the engine built from commit {git_state()}.", "",
             "What is compared: an engine **update is durable** when acknowledged — an update of at most 32 KiB "
             "(`[tuning] wal_data_max`) rides in its group commit's WAL record, written and `fdatasync`ed once for the "
             "whole batch, and is moved to the data file later, 16 MiB per data sync (destage); a larger one is "
             "written to the data file (`O_DIRECT`) and `fdatasync`ed first. Commits are pipelined: a sync thread per "
             "target makes one commit durable while the target thread stages the next (docs/ENGINE-FORMATS.md, "
             "\"Group commit\"). Raw fio with `--direct=1` and no sync only reaches the device's write cache. "
             "The *durable raw* columns are fio with `--fdatasync=QD` (a sync after every write at QD1, after every "
             "32 writes at QD32: about what one group commit of a full queue costs). Updates put each extent at a "
             "new epoch in fresh blocks (no overwrite in place). A **fetch** reads at the newest epoch after the "
             f"range was written once with 1 MiB updates ({res.get('prefill_seconds', 0):.1f} s); the engine reads "
             "its data file with buffered `pread`; the data was written with `O_DIRECT`, so the first fetch of a block "
             "reads the device and later ones (with this machine's RAM) the page cache, while all of fio's reads go to "
             "the device (`--direct=1`).", "",
             "| case | QD | engine IOPS (runs) | MiB/s | p50 µs | p99 µs | CPU s/M ops | raw fio IOPS (runs) | raw MiB/s | raw p50 µs | **engine / raw** | durable raw IOPS | engine / durable raw | CPUs busy | CPU µs/op with the load generator |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for op, bs, pattern, qd in ENGINE_CASES:
        m = S[(op, bs, qd)]
        r, f = m["engine"], m["fio"]
        cpu_m = r.get("engine_cpu_seconds_per_million_ops") or 0.0
        dur = (f"{m['durable']['iops']:.0f} | {m['durable_ratio']:.2f}" if "durable" in m else "— | —")
        lines.append(f"| {bs} {pattern} {op} / fio {FIO_RW[(op, pattern)]} | {qd} | {r['iops']:.0f} ({k_runs(m['engine_runs'])}) | "
                     f"{r['mib_per_s']:.0f} | {r['lat_p50_us']:.0f} | {r['lat_p99_us']:.0f} | {cpu_m:.0f} | "
                     f"{f['iops']:.0f} ({k_runs(m['fio_runs'])}) | {f['mib_per_s']:.0f} | {f['lat_p50_us']:.0f} | "
                     f"**{m['ratio']:.2f}** | {dur} | {pct_or_dash(m.get('busy'))} | {num_or_dash(m.get('cpu_whole'))} |")
    u4 = S[("update", "4k", 32)]["ratio"]
    busy = lambda key: (f" (CPUs {S[key]['busy'] * 100:.0f} % busy)" if S[key].get("busy") is not None else "")
    u128 = {qd: S[("update", "128k", qd)]["ratio"] for qd in (1, 32)}
    lines += ["", "The issue's targets:", "",
              f"- durable 4 KiB updates at QD32 against raw 4 KiB random writes at QD32: {verdict(u4, 0.5)}"
              f"{busy(('update', '4k', 32))};",
              f"- 128 KiB updates against raw sequential-write bandwidth: QD32 {verdict(u128[32], 0.7)}"
              f"{busy(('update', '128k', 32))}; QD1 {verdict(u128[1], 0.7)}.", "",
              "*CPUs busy* is the share of the machine's CPUs not idle (nor waiting for I/O) during the engine runs "
              "(`/proc/stat`); the last column adds the load generator's CPU (`tessera bench-engine`, same machine) "
              "to the engine's.", ""]
    lines += ["Commands (the engine's address and pid and fio's file and output format left out):", ""]
    for op, bs, pattern, qd in ENGINE_CASES:
        c = res["cases"][(op, bs, qd)]
        lines.append(f"- `{c['cmd']}`; `{c['fio_cmd']}`" + (f"; `{c['durable_cmd']}`" if c["durable_cmd"] else ""))
    lines.append("")

    # Where a 4 KiB QD32 update's time goes.
    r, summary = res["commit"]
    counts, rs = res["strace"]
    n = max(rs["ios"], 1)
    per = lambda name: counts.get(name, 0) / n
    lines += ["### Where a durable 4 KiB update goes", ""]
    if summary:
        recs, ops = summary
        lines.append(f"A fresh engine, one `tessera bench-engine --op update --bs 4k --qd 32 --targets {ENGINE_TARGETS} "
                     f"--time {secs:g}` run ({r['iops']:.0f} IOPS, p50 {r['lat_p50_us']:.0f} µs), then SIGTERM: the "
                     f"targets' group commit summary counts {ops} updates in {recs} WAL records, **{ops / max(recs, 1):.1f} "
                     f"updates per group commit** with {32 // ENGINE_TARGETS} in flight per target.")
    top = sorted(counts.items(), key=lambda kv: -kv[1])[:8]
    lines += ["", f"The same run on another fresh engine under `strace -c -f -p PID` ({rs['iops']:.0f} IOPS: tracing slows "
              f"every system call, so batches grow): {per('fdatasync'):.2f} `fdatasync` and {per('pwrite64'):.2f} "
              f"`pwrite64` per update, i.e. {1 / max(per('fdatasync') / 2, 1e-9):.1f} updates per commit of "
              "two syncs (data file, then WAL). System calls per update:", "",
              "| syscall | calls per update |", "|---|---|"]
    for name, c in top:
        lines.append(f"| `{name}` | {c / n:.2f} |")
    lines.append("")
    prof = res.get("profile", {})
    if prof and all(p[0] for p in prof.values()):
        lines += [f"Where the engine's CPU goes in 4 KiB random updates (a third fresh engine, QD32 then QD1, "
                  f"`perf record -e cpu-clock --call-graph dwarf -p PID` during each run; share of the engine's "
                  "samples spent in each function and what it calls, so nested rows overlap):", "",
                  "| | " + " | ".join(f"QD{qd}: {prof[qd][1]['iops']:.0f} IOPS, {prof[qd][1].get('engine_cpu_seconds_per_million_ops') or 0:.0f} CPU s/M ops"
                                      for qd in prof) + " |",
                  "|---|" + "---|" * len(prof)]
        for label, _ in PERF_SYMBOLS:
            if any(label in p[0] for p in prof.values()):
                lines.append(f"| {label} | " + " | ".join(f"{prof[qd][0].get(label, 0.0):.0f} %" for qd in prof) + " |")
        lines.append("")
    lines += engine_limits(res, S)
    return lines


def engine_limits(res, S):
    """What limits the engine, with this run's figures (the engine code is left as it is)."""
    batch = (lambda s: s[1] / max(s[0], 1))(res["commit"][1]) if res["commit"][1] else float("nan")
    u4 = S[("update", "4k", 32)]
    u128 = S[("update", "128k", 32)]
    f4 = S[("fetch", "4k", 32)]
    prof = res.get("profile", {})
    agg1 = prof.get(1, (None,))[0] or {}
    agg_qd1 = agg1.get(PERF_SYMBOLS[3][0], 0.0)
    cpu_qd1 = S[("update", "4k", 1)]["engine"].get("engine_cpu_seconds_per_million_ops") or 0.0
    return [
        "### What limits the engine now", "",
        f"- **Flushes per update.** A group commit of 4 KiB updates is one `fdatasync` (the WAL's; their data "
        "rides in the record and is destaged to the data file later, one data sync per 16 MiB). WAL segments are "
        "preallocated and reused and records are written with whole-block `O_DIRECT` writes, so that `fdatasync` "
        "changes no metadata: it is one flush of the device's write cache (measured with fio on this disk: 45 µs "
        "for a 4 KiB overwrite plus `fdatasync`, 172 µs for an appending write plus `fdatasync`). The two targets "
        f"share the device, so their flushes queue behind each other. At QD32 ({32 // ENGINE_TARGETS} in flight "
        f"per target) a commit carries {batch:.1f} updates. The engine reaches {u4['durable_ratio']:.2f} of fio "
        f"with one `fdatasync` per 32 writes ({u4['durable']['iops']:.0f} IOPS) and {u4['ratio']:.2f} of fio "
        "without syncs. The flushes are a quarter of it and the CPU the rest: a build that skipped the WAL's "
        "`fdatasync` altogether (unsafe, measured by hand, interleaved: 34.4k against 26.3k IOPS) still reached only "
        "about 0.4 of fio, CPU-bound on the two cores it shares with the load generator "
        f"({u4['engine'].get('engine_cpu_seconds_per_million_ops') or 0:.0f} CPU µs per update, much of it "
        "switching between the network, target and sync threads). Merging the two targets' flushes into one per "
        "device would win back part of the quarter; the goal of 0.5 needs fewer CPU µs per update than this.",
        "- **128 KiB updates** take two flushes per commit (data file, then WAL): carrying them in the WAL too "
        "(`[tuning] wal_data_max = \"256KiB\"`, measured by hand, interleaved) halved QD32 (544 and 574 MiB/s "
        "against 968 and 985) for 10 % at QD1 at best (2199 and 1940 IOPS against 2029 and 1910): the data is written "
        "twice and the records grow to megabytes. Their data is written "
        "with `O_DIRECT` from one aligned buffer per commit (the copy into the page cache was half the engine's CPU "
        "at 128 KiB). A data file preallocated with zeros but still synced made no difference (5.9k and 6.3k IOPS "
        "sparse against 5.6k and 6.5k written, interleaved). Zero-filled *and* with the data file's `fdatasync` "
        "left out — one flush per commit, which is safe only because no block of a zero-filled file needs metadata "
        "when overwritten, so the WAL's flush covers the data's direct writes — an experimental build reached "
        "1196 and 1158 MiB/s against 978 and 881 (+25–30 %, interleaved by hand; 4 KiB updates and the whole stack "
        "unchanged). It is not in the engine: writing zeros over every target's whole capacity at creation costs "
        "minutes of disk time, and preparing the file lazily, ahead of the allocator, needs a durable record of "
        "what is prepared and a crash model in which a device flush makes other files' direct writes durable. "
        "What bounds them otherwise is that each target has one commit at a time in flight on the "
        f"device: write the batch ({32 // ENGINE_TARGETS} × 128 KiB), flush, write the record, flush, reply, and "
        "only then does the next full batch arrive; fio keeps 32 writes in flight with no flush. Closing that "
        "needs several commits in flight per target (records may then complete out of order) or more targets "
        f"per device; {u128['engine'].get('engine_cpu_seconds_per_million_ops') or 0:.0f} CPU µs per update at "
        "QD32 (32 CRC64 checks, carry-less multiply: `cargo bench -p tessera-engine-proto --bench crc64`).",
        f"- **Aggregation.** At QD1 the engine uses {cpu_qd1:.0f} CPU µs per update, {agg_qd1:.0f} % of it in "
        "aggregation. An akey whose versions are younger than the aggregation boundary is parked, ordered by its "
        "oldest such epoch, and planned again only when the boundary reaches it (before, it was re-planned at every "
        "step: 82 % of engine CPU and 800 µs per update at QD1).",
        "- **Fetches** read the data file with buffered `pread`. Since updates are written with `O_DIRECT`, the "
        "page cache no longer holds what was just written, so a fetch's first read of a block goes to the device "
        "as fio's do (earlier versions of this page, with buffered writes, measured fetches from the page cache: "
        "1.02× raw at 4 KiB QD32). 128 KiB fetches at QD32 "
        f"reach {S[('fetch', '128k', 32)]['ratio']:.2f}× fio's direct reads; 4 KiB fetches at QD32 "
        f"({f4['ratio']:.2f}× raw) are CPU-bound on the two shared cores "
        f"({f4['engine'].get('engine_cpu_seconds_per_million_ops') or 0:.0f} CPU µs per fetch in the engine, most of "
        "it the loopback `writev` of replies, the `pread` and CRC64s; the load generator needs the rest). "
        "`O_DIRECT` reads were tried (interleaved, by hand): better at QD1 (5.7k against 5.3k IOPS) and 128 KiB "
        "(7.7k against 6.9k), worse at 4 KiB QD32 (25.3k against 30.3k), so reads stay buffered.", ""]


# ---------------------------------------------------------------------------------------------
# Self-healing: a whole `tessera up` system, an engine killed -9, its shards rebuilt.

HEAL_DIR = os.path.join(ROOT, "target", "bench-heal")
HEAL_SECTION = "## Self-healing: rebuild and reintegration"
HEAL_ENGINES = 4
HEAL_VICTIM = HEAL_ENGINES - 1    # the rank killed
HEAL_VOLUME = "2G"
HEAL_VOLUME_BYTES = 2 << 30
HEAL_FAST_RATE = "4G"             # `tessera up --rebuild-rate(-busy)`: far above what the disk takes
HEAL_DEFAULT_RATE = 64 << 20      # the engine's default `[heal] rebuild_rate` (hosts quiet)
HEAL_DEFAULT_BUSY = 8 << 20       # the engine's default `[heal] rebuild_rate_busy` (host I/O on the engine)
HEAL_THROTTLES = (("fast", ["--rebuild-rate", HEAL_FAST_RATE, "--rebuild-rate-busy", HEAL_FAST_RATE]), ("default", []))
HEAL_FLOOR_LAG = 30               # s: tessera-mgmt's default --reintegration-floor-lag
HEAL_OUTAGE_IOS = 512             # 128 KiB writes while the engine is out: 64 MiB
HEAL_NQN = "nqn.2026-11.io.tessera:vol0"
HEAL_POLL = 0.25                  # s between `tessera pool query` calls
HEAL_RWS = ("randwrite", "randread")
HEAL_RESULTS = os.path.join(HEAL_DIR, "results.json")   # every measurement, for --heal-results


def free_ports(n):
    """The first of n consecutive free ports."""
    for _ in range(100):
        base = free_port()
        if base + n > 65535:
            continue
        socks = []
        try:
            for p in range(base, base + n):
                s = socket.socket()
                s.bind(("127.0.0.1", p))
                socks.append(s)
            return base
        except OSError:
            pass
        finally:
            for s in socks:
                s.close()
    raise RuntimeError(f"no {n} consecutive free ports")


def cpu_jiffies():
    """(all, idle + iowait) jiffies of every CPU, from /proc/stat."""
    f = [int(x) for x in open("/proc/stat").readline().split()[1:]]
    return sum(f), f[3] + f[4]


def busy_between(a, b):
    """Share of all CPUs busy between two cpu_jiffies() samples."""
    return 1 - (b[1] - a[1]) / max(b[0] - a[0], 1)


def background_busy(secs=2.0):
    """Share of all CPUs busy (anything not idle or iowait) over `secs`."""
    a = cpu_jiffies()
    time.sleep(secs)
    return busy_between(a, cpu_jiffies())


def children_cpu_seconds():
    """User + system CPU seconds of this script's finished children (the load generator runs)."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def run_json_on_machine(cmd):
    """run_json(cmd), plus how busy the machine's CPUs were meanwhile (`machine_busy`) and the load
    generator's own CPU seconds (`loadgen_cpu`)."""
    jif0, gen0 = cpu_jiffies(), children_cpu_seconds()
    r = run_json(cmd)
    r["machine_busy"] = busy_between(jif0, cpu_jiffies())
    r["loadgen_cpu"] = children_cpu_seconds() - gen0
    return r


def cpu_of(pids):
    return sum(cpu_seconds(p) for p in pids if os.path.exists(f"/proc/{p}"))


class UpSystem:
    """`tessera up --engines 4 --volume-size 2G` on fresh free ports, in target/bench-heal/NAME
    (or `engines` engines in `base`/NAME)."""

    def __init__(self, name, rate_args, volume=HEAL_VOLUME, engines=HEAL_ENGINES, base=HEAL_DIR):
        self.dir = os.path.join(base, name)
        self.own_engine = None  # the victim restarted by this script (not a child of tessera up)
        subprocess.run(["rm", "-rf", self.dir], check=True)
        os.makedirs(self.dir)
        self.mgmt = f"127.0.0.1:{free_port()}"
        self.addr = f"127.0.0.1:{free_port()}"
        self.cmd = [os.path.join(BIN, "tessera"), "up", "--dir", "DIR", "--engines", str(engines),
                    "--volume-size", volume] + list(rate_args)
        cmd = [self.dir if x == "DIR" else x for x in self.cmd]
        self.proc = subprocess.Popen(cmd + ["--mgmt-listen", self.mgmt, "--listen", self.addr,
                                            "--engine-base-port", str(free_ports(engines))],
                                     stdout=subprocess.PIPE, stderr=open(os.path.join(self.dir, "up.err"), "w"), text=True)
        self.pids = {}
        lines = queue.Queue()
        threading.Thread(target=lambda: [lines.put(l) for l in self.proc.stdout], daemon=True).start()
        deadline = time.monotonic() + 180
        while True:
            try:
                l = lines.get(timeout=0.5)
            except queue.Empty:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError("tessera up did not start:\n" + open(os.path.join(self.dir, "up.err")).read()[-3000:])
                continue
            w = l.split()
            if len(w) >= 3 and w[1] == "pid":
                self.pids[w[0]] = int(w[2])
            if l.strip().startswith("nvme connect "):
                break

    def engine_config(self, rank):
        return os.path.join(self.dir, f"engine-{rank}", "engine.toml")

    def restart_engine(self, rank):
        """Starts engine `rank` again with the configuration tessera up wrote, as `tessera up` would."""
        self.own_engine = subprocess.Popen([os.path.join(BIN, "tessera-engine"), "--config", self.engine_config(rank)],
                                           stdout=open(os.path.join(self.dir, "logs", f"engine-{rank}.log"), "a"),
                                           stderr=subprocess.STDOUT, start_new_session=True)
        return self.own_engine

    def engine_pids(self):
        pids = [p for n, p in self.pids.items() if n.startswith("engine-") and n != f"engine-{HEAL_VICTIM}"]
        if self.own_engine and self.own_engine.poll() is None:
            pids.append(self.own_engine.pid)
        return pids

    def pool(self):
        out = subprocess.run([os.path.join(BIN, "tessera"), "--mgmt", self.mgmt, "pool", "query", "default", "--json"],
                             check=True, capture_output=True, text=True).stdout
        return json.loads(out)

    def bench_cmd(self, rw, bs, qd, secs=None, ios=None):
        return [os.path.join(BIN, "tessera"), "bench", "--addr", self.addr, "--nqn", HEAL_NQN, "--rw", rw, "--bs", bs,
                "--qd", str(qd)] + (["--time", f"{secs:g}"] if secs else ["--ios", str(ios)]) + ["--json"]

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=180)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        if self.own_engine and self.own_engine.poll() is None:
            self.own_engine.send_signal(signal.SIGTERM)
            self.own_engine.wait(timeout=120)


class PoolMonitor(threading.Thread):
    """Polls `tessera pool query default --json` every HEAL_POLL s: (monotonic time, states of the
    victim's targets, rebuild status)."""

    def __init__(self, up):
        super().__init__(daemon=True)
        self.up, self.samples, self.done, self.error = up, [], threading.Event(), None
        self.start()

    def run(self):
        while not self.done.is_set():
            try:
                p = self.up.pool()
                st = tuple(t["state"] for t in p["map"]["targets"] if t["rank"] == HEAL_VICTIM)
                self.samples.append((time.monotonic(), st, p["rebuild"]))
            except (subprocess.CalledProcessError, ValueError, KeyError) as e:
                self.error = str(e)
            self.done.wait(HEAL_POLL)

    def wait(self, pred, since, what, timeout=600):
        """The first sample taken after `since` for which pred(states, rebuild) holds: (t, rebuild)."""
        deadline = time.monotonic() + timeout
        seen = 0
        while time.monotonic() < deadline:
            for t, st, rb in self.samples[seen:]:
                if t >= since and pred(st, rb):
                    return t, rb
            seen = len(self.samples)
            time.sleep(HEAL_POLL / 2)
        last = self.samples[-1] if self.samples else None
        raise RuntimeError(f"not {what} within {timeout} s; last pool query: {last}; error: {self.error}")

    def stop(self):
        self.done.set()
        self.join(timeout=30)


def rebuilt(st, rb):
    return st and all(s == "DOWNOUT" for s in st) and rb["state"] == "idle"


def wait_quiet(pids, quiet=0.1, limit=20):
    """Until the processes together use less than `quiet` CPU seconds per second (background
    passes over), at most `limit` seconds."""
    last = cpu_of(pids)
    for _ in range(limit):
        time.sleep(1)
        now = cpu_of(pids)
        if now - last < quiet:
            return
        last = now


def heal_rep(name, rate_args, io_secs, fcmd, dcmd, order):
    """One system: fill, raw fio, full rebuild after kill -9, outage writes, reintegration after the
    restart, then host I/O before and during a second full rebuild. Returns its figures."""
    r = {"background_busy": background_busy()}
    up = UpSystem(name, rate_args)
    mon = PoolMonitor(up)
    try:
        r["up_cmd"] = show_cmd(up.cmd)
        fill_cmd = up.bench_cmd("write", "128k", 16, ios=HEAL_VOLUME_BYTES // (128 << 10))
        r["fill"], r["fill_cmd"] = run_json(fill_cmd), show_cmd(fill_cmd)
        r["engine_bytes"] = [int(subprocess.run(["du", "-s", "-B1", os.path.join(up.dir, f"engine-{e}", "data")],
                                                capture_output=True, text=True).stdout.split()[0]) for e in range(HEAL_ENGINES)]
        t_written = time.monotonic()
        # The disk's write bandwidth right now, while the engines idle (plain and durable).
        r["fio"], r["fio_durable"] = run_fio(fcmd), run_fio(dcmd)
        # Everything written so far must lie below the reintegration floor (the DOWN marking
        # minus HEAL_FLOOR_LAG s), or the reintegration copies it back too.
        time.sleep(max(0.0, t_written + HEAL_FLOOR_LAG - time.monotonic()))

        # 1. Full rebuild of the killed engine's shards.
        t_kill = time.monotonic()
        os.kill(up.pids[f"engine-{HEAL_VICTIM}"], signal.SIGKILL)
        t_down, _ = mon.wait(lambda st, rb: "DOWN" in st, t_kill, "DOWN", 120)
        survivors = up.engine_pids()
        cpu0, jif0 = cpu_of(survivors), cpu_jiffies()
        t_done, rb = mon.wait(rebuilt, t_down, "rebuilt")
        cpu1, jif1 = cpu_of(survivors), cpu_jiffies()
        r["rebuild"] = {"detect": t_down - t_kill, "secs": t_done - t_down, "bytes": rb["bytes_done"],
                        "dkeys": rb["dkeys_done"], "service_rate": rb["rate_bytes_per_sec"],
                        "service_secs": rb["elapsed_seconds"], "completed": rb["completed"],
                        "engine_cores": (cpu1 - cpu0) / max(t_done - t_down, 1e-9), "busy": busy_between(jif0, jif1)}

        # 2. A short outage with a little data written, then the engine back: reintegration.
        outage_cmd = up.bench_cmd("write", "128k", 16, ios=HEAL_OUTAGE_IOS)
        r["outage"], r["outage_cmd"] = run_json(outage_cmd), show_cmd(outage_cmd)
        t_restart = time.monotonic()
        r["outage_secs"] = t_restart - t_kill
        up.restart_engine(HEAL_VICTIM)
        t_up, _ = mon.wait(lambda st, rb: "UP" in st, t_restart, "UP", 120)
        t_in, rb = mon.wait(lambda st, rb: st and all(s == "UPIN" for s in st) and rb["state"] == "idle", t_up, "UPIN")
        r["reint"] = {"register": t_up - t_restart, "secs": t_in - t_up, "bytes": rb["bytes_done"], "dkeys": rb["dkeys_done"],
                      "service_secs": rb["elapsed_seconds"]}
        wait_quiet(up.engine_pids())  # the clean-up pass (chunks that moved back are discarded)

        # 3. Host I/O before and during a second full rebuild (same engine killed again).
        r["before"], r["during"], r["io_cmds"] = {}, {}, {}
        for rw in order:
            cmd = up.bench_cmd(rw, "4k", 16, secs=io_secs)
            r["before"][rw], r["io_cmds"][rw] = run_json(cmd), show_cmd(cmd)
        t_kill = time.monotonic()
        up.own_engine.kill()
        up.own_engine.wait()
        t_down, _ = mon.wait(lambda st, rb: "DOWN" in st, t_kill, "DOWN again", 120)
        for rw in order:
            try:
                r["during"][rw] = run_json(up.bench_cmd(rw, "4k", 16, secs=io_secs))
            except subprocess.CalledProcessError as e:
                r["during"][rw] = {"iops": 0.0, "error": (e.stderr or "").strip()[-300:]}
        t_io_end = time.monotonic()
        t_done, rb = mon.wait(rebuilt, t_down, "rebuilt again")
        # What the pool query showed rebuilt (this rebuild's map version) by the end of the host I/O.
        io_bytes = max([b["bytes_done"] for t, _, b in mon.samples
                        if t_down <= t <= t_io_end and b["map_version"] == rb["map_version"]] or [0])
        r["loaded"] = {"secs": t_done - t_down, "bytes": rb["bytes_done"], "io_within": t_io_end <= t_done,
                       "io_secs_left": t_done - t_io_end, "io_window": t_io_end - t_down, "io_bytes": io_bytes}
    finally:
        mon.stop()
        up.stop()
    subprocess.run(["rm", "-rf", up.dir], check=True)
    return r


HEAL_CHECK_RATE, HEAL_CHECK_VOLUME = "4M", "512M"   # the throttle check: a rate the disk and CPUs easily exceed


def heal_throttle_check():
    """One rebuild of a smaller volume at a low `--rebuild-rate`: is the throttle honoured?"""
    up = UpSystem("throttle", ["--rebuild-rate", HEAL_CHECK_RATE], HEAL_CHECK_VOLUME)
    mon = PoolMonitor(up)
    try:
        run_json(up.bench_cmd("write", "128k", 16, ios=parse_size_text(HEAL_CHECK_VOLUME) // (128 << 10)))
        t_kill = time.monotonic()
        os.kill(up.pids[f"engine-{HEAL_VICTIM}"], signal.SIGKILL)
        t_down, _ = mon.wait(lambda st, rb: "DOWN" in st, t_kill, "DOWN", 120)
        t_done, rb = mon.wait(rebuilt, t_down, "rebuilt")
        r = {"cmd": show_cmd(up.cmd), "secs": t_done - t_down, "bytes": rb["bytes_done"]}
    finally:
        mon.stop()
        up.stop()
    subprocess.run(["rm", "-rf", up.dir], check=True)
    return r


def parse_size_text(s):
    return int(s[:-1]) << {"K": 10, "M": 20, "G": 30}[s[-1]]


def heal_measure(runs, io_secs, fio_secs=5.0):
    """`runs` repetitions of heal_rep() for each throttle, interleaved (fast, default, fast, …)."""
    os.makedirs(HEAL_DIR, exist_ok=True)
    os.makedirs(ENGINE_DIR, exist_ok=True)
    fio_path = os.path.join(ENGINE_DIR, FIO_FILE)
    subprocess.run(["fio", "--name=fill", "--filename", fio_path, f"--size={ENGINE_TARGETS * ENGINE_RANGE_GIB}g",
                    "--direct=1", "--ioengine=io_uring", "--rw=write", "--bs=1m", "--iodepth=8"],
                   check=True, capture_output=True)
    fcmd = fio_cmd("write", "128k", 32, fio_secs)
    dcmd = fio_cmd("write", "128k", 32, fio_secs, ["--fdatasync=32"])
    res = {"runs": runs, "io_secs": io_secs, "fio_cmd": show_cmd(fcmd), "durable_cmd": show_cmd(dcmd),
           "reps": {"fast": [], "default": []}, "started": time.monotonic()}
    try:
        for i in range(runs):
            for label, rate_args in HEAL_THROTTLES:
                order = HEAL_RWS if i % 2 == 0 else HEAL_RWS[::-1]
                print(f"heal: run {i + 1}/{runs}, {label} rebuild rate", file=sys.stderr)
                res["reps"][label].append(heal_rep(f"{label}-{i}", rate_args, io_secs, fcmd, dcmd, order))
        print("heal: throttle check", file=sys.stderr)
        res["check"] = heal_throttle_check()
    finally:
        os.remove(fio_path)
        res["minutes"] = (time.monotonic() - res["started"]) / 60
        res["date"], res["commit"] = time.strftime("%Y-%m-%d"), git_state()
        with open(HEAL_RESULTS, "w") as f:
            json.dump(res, f, indent=1)
    return res


def heal_section(res):
    """The self-healing section of the page, from heal_measure()'s results."""
    runs, reps = res["runs"], res["reps"]
    mib = lambda b: b / 2**20
    k = lambda xs, f="{:.1f}": "/".join(f.format(x) for x in xs)
    fs = subprocess.run(["findmnt", "-n", "-o", "FSTYPE,SOURCE", "-T", HEAL_DIR], capture_output=True, text=True).stdout.split()
    fs_text = f"{fs[0]} on {fs[1]}" if len(fs) == 2 else "the repository's filesystem"
    one = reps["fast"][0]
    busy = [x["background_busy"] for rs in reps.values() for x in rs]
    rate_text = {"fast": f"`--rebuild-rate {HEAL_FAST_RATE} --rebuild-rate-busy {HEAL_FAST_RATE}` (unthrottled)",
                 "default": f"default ({mib(HEAL_DEFAULT_RATE):.0f} MiB/s per engine, {mib(HEAL_DEFAULT_BUSY):.0f} MiB/s "
                            "while hosts do I/O on it)"}
    outage_mib = mib(HEAL_OUTAGE_IOS * (128 << 10))
    pct = lambda xs: f"{min(xs) * 100:.0f}–{max(xs) * 100:.0f} %" if round(min(xs), 2) < round(max(xs), 2) else f"{xs[0] * 100:.0f} %"
    lines = [HEAL_SECTION, "",
             f"Regenerate this section alone with `python3 scripts/bench.py --heal` (also part of the full run; "
             f"{res['minutes']:.0f} minutes this time, {runs} runs per throttle). Each run is a fresh "
             f"`{one['up_cmd']}` (free ports; release build: {HEAL_ENGINES} engines × 2 targets, one EC_2P1 volume of "
             f"{HEAL_VOLUME}iB = 2048 chunks of 1 MiB; DIR under `target/bench-heal/`: {fs_text}, one disk shared "
             f"by every engine, and {os.cpu_count()} CPUs shared by the engines, the target and the load generator). "
             f"The volume is written whole through the NVMe/TCP target (`{one['fill_cmd']}`), then engine "
             f"{HEAL_VICTIM} is killed with SIGKILL, and `tessera pool query default --json` is polled every "
             f"{HEAL_POLL:g} s. **Rebuild time** runs from the first poll that shows the engine's targets DOWN (the "
             "service's heartbeat timeout marks them; *kill → DOWN* is that wait) to the first that shows them "
             "DOWNOUT with the rebuild idle. **Written** is the completed rebuild's `rebuild.bytes_done`, what the "
             "survivors wrote into rebuilt shards (and *shards* its `dkeys_done`); *lost engine held* is `du` of "
             "the killed engine's data directory just before the kill. Throttles alternate run by run "
             f"(unthrottled, default, unthrottled, …); figures are medians, each run's in parentheses. The **raw "
             f"disk** figures are the engine section's raw sequential-write commands, `{res['fio_cmd']}` and, "
             f"durable, the same with `--fdatasync=32`, run in every run right after the fill (the disk's speed "
             "drifts within minutes); the ratios are medians of the per-run ratios. *CPU* is what the three "
             "surviving engines used during the rebuild (cores) and how busy the whole machine was.", "",
             f"Machine: {os.cpu_count()} CPUs ({cpu_model()}), "
             f"{round(os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30)} GiB RAM, Linux {platform.release()}, "
             f"{disk_model(fs[1] if len(fs) == 2 else '')}; run on {res['date']} with binaries built "
             f"from commit {res['commit']}. Other jobs (builds and tests of other work) shared the machine: before each "
             f"run, with none of this benchmark's processes running, its CPUs were {pct(busy)} busy"
             + (f" (median {median(busy) * 100:.0f} %)." if len(set(round(b, 2) for b in busy)) > 1 else ".")
             + " Figures taken on a loaded machine are lower and noisier than on an idle one.", "",
             "### Rebuild after an engine is lost", "",
             "| rebuild throttle | kill → DOWN s | rebuild s (runs) | written MiB (shards) | lost engine held MiB | **written MiB/s** (runs) | CPU: survivors, machine | raw write MiB/s (runs) | **rebuild / raw** | durable raw MiB/s | rebuild / durable raw |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    S = {}
    for label in ("fast", "default"):
        rs = reps[label]
        rb = [x["rebuild"] for x in rs]
        bw = [mib(b["bytes"]) / b["secs"] for b in rb]
        raw = [x["fio"]["mib_per_s"] for x in rs]
        dur = [x["fio_durable"]["mib_per_s"] for x in rs]
        S[label] = {"secs": median([b["secs"] for b in rb]), "bytes": median([b["bytes"] for b in rb]),
                    "dkeys": median([b["dkeys"] for b in rb]), "bw": median(bw),
                    "ratio": median([b / f for b, f in zip(bw, raw)]), "dratio": median([b / f for b, f in zip(bw, dur)]),
                    "held": median([x["engine_bytes"][HEAL_VICTIM] for x in rs]),
                    "cores": median([b["engine_cores"] for b in rb]), "busy": median([b["busy"] for b in rb]),
                    "detect": median([b["detect"] for b in rb]), "service_rate": median([b["service_rate"] for b in rb])}
        m = S[label]
        lines.append(f"| {rate_text[label]} | {m['detect']:.1f} | {m['secs']:.1f} ({k([b['secs'] for b in rb])}) | "
                     f"{mib(m['bytes']):.0f} ({m['dkeys']:.0f}) | {mib(m['held']):.0f} | **{m['bw']:.0f}** ({k(bw, '{:.0f}')}) | "
                     f"{m['cores']:.2f}, {m['busy'] * 100:.0f} % | {median(raw):.0f} ({k(raw, '{:.0f}')}) | **{m['ratio']:.2f}** | "
                     f"{median(dur):.0f} | {m['dratio']:.2f} |")
    f, d = S["fast"], S["default"]
    fill = [x["fill"]["mib_per_s"] for rs in reps.values() for x in rs]
    chunks = HEAL_VOLUME_BYTES >> 20
    lines += ["",
              f"- **Written vs lost.** The killed engine held a shard of about 3/4 of the {chunks} chunks "
              f"(EC_2P1 over {HEAL_ENGINES} engines), {chunks * 3 // 4} shards of 512 KiB, yet a rebuild writes "
              f"about {f['dkeys']:.0f} shards: when a group's lost shard is its parity, no parity is left to lead and *both* "
              "data shards' engines rebuild it (`engine/src/heal.rs`, `leads`: harmless, the same versions twice, "
              f"but {f['dkeys'] / (chunks * 3 / 4) - 1:.0%} more writing than the data lost).",
              f"- **Throttle.** With no host I/O, as in this rebuild, the default allows {HEAL_ENGINES - 1} × "
              f"{mib(HEAL_DEFAULT_RATE):.0f} = {(HEAL_ENGINES - 1) * mib(HEAL_DEFAULT_RATE):.0f} MiB/s (`rebuild_rate`); the default runs wrote {d['bw']:.0f} MiB/s "
              f"against {f['bw']:.0f} MiB/s unthrottled ({d['bw'] / f['bw']:.2f}×), so "
              + ("the throttle is what limits the rebuild here." if d["bw"] < 0.8 * f["bw"] else
                 "the throttle is not what limits the rebuild here.")
              + f" Unthrottled it reaches {f['ratio']:.2f}× the raw and {f['dratio']:.2f}× the durable raw write "
              f"bandwidth of the disk while the survivors use {f['cores']:.2f} cores and the machine is "
              f"{f['busy'] * 100:.0f} % busy. Each engine rebuilds one chunk at a time (read the group's other "
              "shards over the engine RPC, decode, write the lost shard as a durable update, wait for it)"
              + (", so the rebuild is bound by that per-chunk round trip and by the shared CPUs, not by the disk; "
                 "several chunks in flight per engine would use more of it." if f["dratio"] < 0.5 else
                 "; with that it is close to what the disk takes."),
              f"- **The throttle is honoured** when it is what limits: one more run, `{res['check']['cmd']}` (the same "
              f"fill and kill), allows {HEAL_ENGINES - 1} × {HEAL_CHECK_RATE[:-1]} = "
              f"{(HEAL_ENGINES - 1) * int(HEAL_CHECK_RATE[:-1])} MiB/s and rebuilt {mib(res['check']['bytes']):.0f} MiB in "
              f"{res['check']['secs']:.1f} s: **{mib(res['check']['bytes']) / res['check']['secs']:.1f} MiB/s**.",
              f"- The service's own figure, the pool query's `rebuild.rate_bytes_per_sec` (bytes since the first "
              f"progress report, so without the scan), was {mib(f['service_rate']):.0f} MiB/s unthrottled and "
              f"{mib(d['service_rate']):.0f} MiB/s with the default throttle (medians). For scale: the fill writes the volume through the target at "
              f"{median(fill):.0f} MiB/s of host data ({median(fill) * 1.5:.0f} MiB/s of shards with parity).", "",
              "### Host I/O during a rebuild", "",
              "After the reintegration below, on the same system: 4 KiB random writes and reads at QD16 through the "
              f"target (`{one['io_cmds']['randwrite']}`, and `--rw randread`), {res['io_secs']:g} s each, right "
              f"before engine {HEAL_VICTIM} is killed again, and again as soon as its targets show DOWN, while the "
              "same shards are rebuilt (the order of the two workloads alternates between runs). *During / before* "
              "is the median of the per-run ratios. While a host does I/O on an engine, its rebuild runs at most at "
              f"`rebuild_rate_busy` (default {mib(HEAL_DEFAULT_BUSY):.0f} MiB/s; `docs/HEALING.md`): *rebuilt while "
              "host I/O ran* is the `rebuild.bytes_done` the pool query showed when the second workload ended, over "
              "the time since DOWN (the scan and up to a second of progress-report lag included, so a little low). "
              "*Rebuild s* is how long that rebuild took, host I/O in its first "
              f"{2 * res['io_secs']:g} s and none after, against the first rebuild of the same runs, with no host I/O. "
              "Reads of the lost engine's shards are degraded reads (the other two shards read and decoded) until "
              "the rebuild is complete; the engines serve reads from the page cache.", "",
              "| rebuild throttle | workload | IOPS before (runs) | IOPS during rebuild (runs) | **during / before** | rebuilt MiB/s while host I/O ran (runs) | rebuild s: with host I/O (runs), without |",
              "|---|---|---|---|---|---|---|"]
    host, notes = {}, []
    for label in ("fast", "default"):
        rs = reps[label]
        loaded = [x["loaded"]["secs"] for x in rs]
        io_bw = [mib(x["loaded"].get("io_bytes", 0)) / x["loaded"].get("io_window", 1) for x in rs]
        S[label]["io_bw"], S[label]["loaded"] = median(io_bw), median(loaded)
        for rw in HEAL_RWS:
            before = [x["before"][rw]["iops"] for x in rs]
            during = [x["during"][rw]["iops"] for x in rs]
            host[(label, rw)] = median([a / b for a, b in zip(during, before)])
            lines.append(f"| {rate_text[label]} | 4 KiB {rw} QD16 | {median(before):.0f} ({k([b / 1000 for b in before], '{:.1f}k')}) | "
                         f"{median(during):.0f} ({k([x / 1000 for x in during], '{:.1f}k')}) | **{host[(label, rw)]:.2f}** | "
                         f"{median(io_bw):.0f} ({k(io_bw, '{:.0f}')}) | {median(loaded):.1f} ({k(loaded)}), {S[label]['secs']:.1f} |")
            for i, x in enumerate(rs):
                if "error" in x["during"][rw]:
                    notes.append(f"run {i + 1} ({label}): {rw} during the rebuild failed: {x['during'][rw]['error']}")
        for i, x in enumerate(rs):
            if not x["loaded"]["io_within"]:
                notes.append(f"run {i + 1} ({label}): the rebuild was over {-x['loaded']['io_secs_left']:.1f} s before "
                             "the host I/O ended, so part of its *during* run saw no rebuild")
    lines += ["", "The issue's goal, host I/O keeps at least half its throughput during a rebuild at the default "
              f"throttle: 4 KiB random writes {verdict(host[('default', 'randwrite')], 0.5)}; 4 KiB random reads "
              f"{verdict(host[('default', 'randread')], 0.5)}."]
    busy_cap = (HEAL_ENGINES - 1) * mib(HEAL_DEFAULT_BUSY)
    lines += ["", "With the default settings the rebuild "
              + ("yields to host I/O" if d["io_bw"] < 0.8 * f["io_bw"] else "does not yield to host I/O")
              + f": it rebuilt {d['io_bw']:.0f} MiB/s while the host I/O ran (the busy rate allows {HEAL_ENGINES - 1} × "
              f"{mib(HEAL_DEFAULT_BUSY):.0f} = {busy_cap:.0f} MiB/s), against {f['io_bw']:.0f} MiB/s unthrottled under the "
              f"same load and {d['bw']:.0f} MiB/s ({f['bw']:.0f} unthrottled) with no host I/O; the whole rebuild took "
              f"{d['loaded']:.1f} s with host I/O in its first {2 * res['io_secs']:g} s and {d['secs']:.1f} s without "
              f"({d['loaded'] / d['secs']:.2f}×; unthrottled {f['loaded']:.1f} s and {f['secs']:.1f} s)"
              + (", so an idle system still rebuilds as fast as unthrottled." if d["bw"] >= 0.8 * f["bw"] else
                 ", so even an idle system rebuilds slower than unthrottled.")]
    if notes:
        lines += ["", "Odd runs: " + "; ".join(notes) + "."]
    lines += ["", "### Reintegration after a short outage", "",
              f"In the same runs, after the full rebuild: `{one['outage_cmd']}` writes {outage_mib:.0f} MiB (the "
              f"first {outage_mib:.0f} chunks) while the engine is out; then it is started again with the "
              f"configuration `tessera up` wrote (`tessera-engine --config DIR/engine-{HEAL_VICTIM}/engine.toml`; "
              f"kill to restart took {median([x['outage_secs'] for rs in reps.values() for x in rs]):.0f} s). It "
              "registers, its targets go UP, the survivors copy back the chunks changed above the floor (the DOWN "
              f"marking minus {HEAL_FLOOR_LAG} s; the fill ended at least {HEAL_FLOOR_LAG} s before the kill, so it "
              "lies below), and the targets become UPIN. *Restart → UP* is the engine's start and registration; "
              "**reintegration** runs from UP to UPIN with the pass idle, against the full rebuild of the same run.", "",
              "| rebuild throttle | restart → UP s | **reintegration s** (runs) | copied MiB (shards) | full rebuild s, MiB (shards) | **reintegration / full rebuild**: time, bytes |",
              "|---|---|---|---|---|---|"]
    for label in ("fast", "default"):
        rs = reps[label]
        ri = [x["reint"] for x in rs]
        rb = [x["rebuild"] for x in rs]
        lines.append(f"| {rate_text[label]} | {median([a['register'] for a in ri]):.1f} | **{median([a['secs'] for a in ri]):.1f}** "
                     f"({k([a['secs'] for a in ri])}) | {mib(median([a['bytes'] for a in ri])):.0f} ({median([a['dkeys'] for a in ri]):.0f}) | "
                     f"{S[label]['secs']:.1f}, {mib(S[label]['bytes']):.0f} ({S[label]['dkeys']:.0f}) | "
                     f"**{median([a['secs'] / b['secs'] for a, b in zip(ri, rb)]):.2f}**, "
                     f"**{median([a['bytes'] / b['bytes'] for a, b in zip(ri, rb)]):.3f}** |")
    lines += ["", f"Only chunks changed above the floor are copied (`docs/HEALING.md`, \"Reintegration is "
              f"incremental\"); the returning engine holds a shard of about 3/4 of the {outage_mib:.0f} chunks "
              "written meanwhile.", ""]
    return lines


# ---------------------------------------------------------------------------------------------
# The whole stack: `tessera up` (management service, engines, NVMe/TCP target) per object class,
# `tessera bench` through the target, each run paired with raw fio on the same filesystem.

STACK_DIR = os.path.join(ROOT, "target", "bench-stack")
STACK_SECTION = "## Whole stack: `tessera up` over NVMe/TCP"
STACK_CLASSES = ("EC_2P1", "RP_3", "RP_2")
STACK_ENGINES = 3                 # RP_3 needs 3
STACK_VOLUME = "2G"
STACK_VOLUME_BYTES = 2 << 30      # the same as fio_cmd()'s file
STACK_CASES = [("randwrite", "4k", 1), ("randwrite", "4k", 32), ("randread", "4k", 1), ("randread", "4k", 32),
               ("write", "128k", 16), ("read", "128k", 16)]
STACK_RESULTS = os.path.join(STACK_DIR, "results.json")   # every measurement, for --stack-results
STACK_DISK_COPIES = {"EC_2P1": 1.5, "RP_3": 3.0, "RP_2": 2.0}   # bytes on the engines per host byte
STACK_PROCS = ("nvmf", "engine-0", "engine-1", "engine-2", "mgmt")


def block_dev_written(dev):
    """Bytes written to block device `dev` (e.g. /dev/vda) since boot, or None."""
    try:
        return int(open(f"/sys/class/block/{os.path.basename(dev)}/stat").read().split()[6]) * 512
    except (OSError, IndexError, ValueError):
        return None


# Write cases profiled system-wide, one extra run each, for where the CPU time goes.
STACK_PROFILED = {("EC_2P1", "randwrite", "4k", 32), ("EC_2P1", "write", "128k", 16)}
STACK_PROFILE_NAMES = {"nvmf": "target (`tessera-nvmf`)", "engine-0": "engine 0", "engine-1": "engine 1",
                       "engine-2": "engine 2", "mgmt": "management service", "load": "load generator (`tessera bench`)",
                       "idle": "idle", "other": "anything else (kernel threads, other jobs)"}


def system_profile(cmd, pids):
    """Runs the load generator `cmd` (JSON output) under `perf record -a -e cpu-clock` (every
    CPU, no call graphs). Returns ({process: % of all CPUs' time}, {process: [(function, % of that
    process's samples)]}, cmd's result), or (None, None, result) without perf. Samples are charged
    by process id: the stack's processes (`pids`), the load generator, idle (the idle task),
    anything else."""
    names = {pid: name for name, pid in pids.items()}

    def run():
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        names[p.pid] = "load"
        out, _ = p.communicate()
        if p.returncode != 0:
            raise RuntimeError(f"{show_cmd(cmd)} failed")
        return json.loads(out.strip().splitlines()[-1])
    out = os.path.join(STACK_DIR, "perf-system.data")
    try:
        pr = subprocess.Popen(["perf", "record", "-q", "-a", "-e", "cpu-clock", "-F", "499", "-o", out],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    except FileNotFoundError:
        return None, None, run()
    time.sleep(1)
    try:
        result = run()
    finally:
        pr.send_signal(signal.SIGINT)
        pr.wait(timeout=120)
    text = subprocess.run(["perf", "script", "-i", out, "-F", "comm,pid,tid,ip,sym"], capture_output=True, text=True).stdout
    os.remove(out)
    samples = []   # (process id, thread name, function)
    for line in text.splitlines():
        m = re.match(r"\s*(.*?)\s+(\d+)/(\d+)\s+([0-9a-f]+)\s*(.*?)\s*$", line)
        if m:
            kernel = int(m.group(4), 16) >= 0xffff800000000000
            samples.append((int(m.group(2)), m.group(1), ("[k] " if kernel else "") + (m.group(5) or "?").replace("|", "/")))
    share, funcs = {}, {}
    for pid, _, sym in samples:
        name = names.get(pid) or ("idle" if pid == 0 else "other")
        share[name] = share.get(name, 0) + 1
        funcs.setdefault(name, {})
        funcs[name][sym] = funcs[name].get(sym, 0) + 1
    total = max(len(samples), 1)
    share = {n: c / total * 100 for n, c in share.items()}
    funcs = {n: {f: c / total * 100 for f, c in fs.items()} for n, fs in funcs.items()}
    top = {n: [(f, v / share[n] * 100) for f, v in sorted(fs.items(), key=lambda x: -x[1])[:4]] for n, fs in funcs.items()}
    return share, top, result


def stack_class(cls, runs, secs, fio_path, dev):
    """One fresh `tessera up` of class `cls`: fill the volume, then every case, each run paired
    with its fio run. Returns the class's figures."""
    r = {"class": cls, "background_busy": background_busy(), "cases": []}
    up = UpSystem(cls, ["--class", cls], STACK_VOLUME, STACK_ENGINES, STACK_DIR)
    try:
        r["up_cmd"] = show_cmd(up.cmd)
        r["pids"] = {n: p for n, p in up.pids.items()}
        pids = list(up.pids.values())
        fill_cmd = up.bench_cmd("write", "128k", 16, ios=STACK_VOLUME_BYTES // (128 << 10))
        r["fill"], r["fill_cmd"] = run_json(fill_cmd), show_cmd(fill_cmd)
        r["engine_bytes"] = {n: int(subprocess.run(["du", "-s", "-B1", os.path.join(up.dir, n, "data")], capture_output=True,
                                                   text=True).stdout.split()[0]) for n in up.pids if n.startswith("engine-")}
        wrote = True
        for rw, bs, qd in STACK_CASES:
            if wrote:   # versions written so far become aggregatable after the engine's lag: let that pass
                time.sleep(ENGINE_AGGREGATION_LAG + 1)
            wait_quiet(pids)
            cmd = up.bench_cmd(rw, bs, qd, secs=secs)
            fcmd = fio_cmd(rw, bs, qd, secs, path=fio_path)
            pairs = []
            for _ in range(runs):
                cpu0, disk0 = {n: cpu_seconds(p) for n, p in up.pids.items()}, block_dev_written(dev)
                t = run_json_on_machine(cmd)
                cpu1, disk1 = {n: cpu_seconds(p) for n, p in up.pids.items()}, block_dev_written(dev)
                t["cpu"] = {n: cpu1[n] - cpu0[n] for n in cpu0}
                t["disk_written"] = disk1 - disk0 if disk0 is not None and disk1 is not None else None
                if t.get("errors"):
                    raise RuntimeError(f"{show_cmd(cmd)}: {t['errors']} errors")
                pairs.append([t, run_fio(fcmd)])
            case = {"rw": rw, "bs": bs, "qd": qd, "pairs": pairs, "cmd": show_cmd(cmd), "fio_cmd": show_cmd(fcmd)}
            if (cls, rw, bs, qd) in STACK_PROFILED:
                wait_quiet(pids)
                share, top, t = system_profile(cmd, dict(up.pids))
                if share:
                    case["profile"] = {"share": share, "top": top, "iops": t["iops"]}
            r["cases"].append(case)
            wrote = "write" in rw
            print(f"stack: {cls} {bs} {rw} QD{qd}: " + ", ".join(f"{p[0]['iops']:.0f}/{p[1]['iops']:.0f}" for p in pairs),
                  file=sys.stderr)
    finally:
        up.stop()
    subprocess.run(["rm", "-rf", up.dir], check=True)
    return r


def stack_measure(runs, secs):
    """Every class of STACK_CLASSES, one after the other; saved to STACK_RESULTS after each."""
    os.makedirs(STACK_DIR, exist_ok=True)
    fio_path = os.path.join(STACK_DIR, FIO_FILE)
    # fio's file is written in full first: reads of never-written blocks would not touch the disk.
    subprocess.run(["fio", "--name=fill", "--filename", fio_path, f"--size={STACK_VOLUME_BYTES >> 30}g", "--direct=1",
                    "--ioengine=io_uring", "--rw=write", "--bs=1m", "--iodepth=8"], check=True, capture_output=True)
    fs = subprocess.run(["findmnt", "-n", "-o", "SOURCE", "-T", STACK_DIR], capture_output=True, text=True).stdout.strip()
    res = {"runs": runs, "secs": secs, "classes": [], "started": time.monotonic(), "date": time.strftime("%Y-%m-%d"),
           "commit": git_state(), "complete": False}

    def save():
        res["minutes"] = (time.monotonic() - res["started"]) / 60
        with open(STACK_RESULTS, "w") as f:
            json.dump(res, f, indent=1)
    try:
        for cls in STACK_CLASSES:
            print(f"stack: {cls}", file=sys.stderr)
            res["classes"].append(stack_class(cls, runs, secs, fio_path, fs))
            save()
        res["complete"] = True
    finally:
        os.remove(fio_path)
        save()
    return res


def stack_summary(c):
    """Medians of a case's paired runs, the median per-pair ratios (IOPS, and p50 latency), and the
    median CPU seconds per million I/Os of each process."""
    pairs = c["pairs"]
    mid = lambda rs: sorted(rs, key=lambda r: r["iops"])[len(rs) // 2]
    t = [p[0] for p in pairs]
    cpu = {n: median([x["cpu"][n] / max(x["ios"], 1) * 1e6 for x in t]) for n in t[0]["cpu"]}
    disk = [x["disk_written"] / max(x["bytes"], 1) for x in t if x.get("disk_written") is not None]
    # CPU µs per I/O of everything on the path: the stack's processes and the load generator.
    whole = [(sum(x["cpu"].values()) + x["loadgen_cpu"]) / max(x["ios"], 1) * 1e6 for x in t if "loadgen_cpu" in x]
    busy = [x["machine_busy"] for x in t if "machine_busy" in x]
    return {"busy": median(busy) if busy else None, "cpu_whole": median(whole) if whole else None,
            "t": mid(t), "fio": mid([p[1] for p in pairs]), "t_runs": [x["iops"] for x in t],
            "fio_runs": [p[1]["iops"] for p in pairs], "ratio": median([p[0]["iops"] / p[1]["iops"] for p in pairs]),
            "lat_ratio": median([p[0]["lat_p50_us"] / max(p[1]["lat_p50_us"], 1e-9) for p in pairs]),
            "cpu": cpu, "disk": median(disk) if disk else None}


def pct_or_dash(x):
    return "—" if x is None else f"{x * 100:.0f} %"


def num_or_dash(x):
    return "—" if x is None else f"{x:.0f}"


def cpu_ceiling(m, goal_iops):
    """For a case below its goal: how busy the CPUs were and what CPU per I/O the goal would need."""
    if m.get("cpu_whole") is None or m.get("busy") is None:
        return ""
    ncpu = os.cpu_count() or 1
    return (f"; the {ncpu} CPUs were {m['busy'] * 100:.0f} % busy at {m['cpu_whole']:.0f} µs of CPU per I/O across the "
            f"stack and the load generator (ceiling {ncpu / m['cpu_whole'] * 1e6:.0f} IOPS); the goal needs ≤ "
            f"{ncpu / goal_iops * 1e6:.0f} µs")


def stack_section(res):
    """The whole-stack section of the page, from stack_measure()'s results."""
    runs, secs = res["runs"], res["secs"]
    fs = subprocess.run(["findmnt", "-n", "-o", "FSTYPE,SOURCE", "-T", STACK_DIR], capture_output=True, text=True).stdout.split()
    fs_text = f"{fs[0]} on {fs[1]}" if len(fs) == 2 else "the repository's filesystem"
    k_runs = lambda xs: "/".join(f"{x / 1000:.1f}k" for x in xs)
    classes = res["classes"]
    one = classes[0] if classes else None
    busy = [c["background_busy"] for c in classes]
    done = [c["class"] for c in classes]
    lines = [STACK_SECTION, ""]
    if not res.get("complete"):
        lines += [f"**Partial**: the run stopped before every class was measured; shown: {', '.join(done) or 'none'} "
                  f"(of {', '.join(STACK_CLASSES)}).", ""]
    if not one:
        return lines
    lines += [
        "A host's I/O through everything: for each object class a fresh "
        f"`{one['up_cmd'].replace('--class ' + one['class'], '--class CLASS')}` (free ports; release build: the "
        f"management service, {STACK_ENGINES} engines × 2 targets and the NVMe/TCP target in managed mode, each its own "
        f"process; one volume of {STACK_VOLUME_BYTES >> 30} GiB of that class; DIR under `target/bench-stack/`: {fs_text}, one disk "
        f"shared by every engine). The volume is written whole first (`{one['fill_cmd']}`), so every read finds stored "
        f"data; then `tessera bench` runs each case through the target on 127.0.0.1. Every run is **paired** with raw "
        f"fio started right after it on a {STACK_VOLUME_BYTES >> 30} GiB file in the same directory (written in full "
        "first): `fio --direct=1 --ioengine=io_uring` with the same block size, depth and access order and no sync. "
        f"Each case is {runs} such pairs of {secs:g} s runs; the table shows the median Tessera and fio runs and the "
        "**median of the per-pair ratios** (IOPS; the same as bandwidth, the block size being equal). A case starts "
        f"once the stack is quiet (after writes, {ENGINE_AGGREGATION_LAG + 1} s for the engines' aggregation lag "
        f"first). Regenerate this section alone with `python3 scripts/bench.py --stack-only` (also part of the full "
        f"run; {res['minutes']:.0f} minutes this time).", "",
        "What is compared: a Tessera write is acknowledged once every shard is durable on its engine (group commit "
        "with `fdatasync`); fio's writes without sync only reach the device's write cache. **MiB/s and IOPS count "
        "host bytes**: on the disk, EC_2P1 writes 1.5× the host's bytes (2 data + 1 parity cell), RP_3 3× and RP_2 2×, "
        "all on the one disk fio has to itself. *Disk / host* is what the block device wrote during the run "
        "(`/sys/class/block/DEV/stat`, WAL and data files, anything else writing meanwhile included) per host byte. "
        "Engines read through the page cache (buffered `pread`, with the kernel's readahead) but write with "
        "`O_DIRECT`, so what the fill wrote is not cached: reads go to the disk as fio's do (`--direct=1`), plus "
        "whatever readahead brings in. Versions of this page before commit 1cc0bd4 wrote through the page cache, "
        "so their reads came from RAM (4 KiB random reads QD32 at 0.61–0.68 of raw). "
        "*CPU* is each process's CPU seconds (user + system, `/proc/PID/stat`) during the run per million I/Os: the "
        "target (`tessera-nvmf`), the engines of ranks 0, 1, 2 and the management service. *CPUs busy* is the share of "
        "the machine's CPUs not idle (nor waiting for I/O) during the Tessera runs (`/proc/stat`), and *CPU µs per I/O, "
        "all* adds everything on the path: those processes and the load generator (`tessera bench`, same machine). "
        "Where the CPUs are nearly all busy, the stack is CPU-bound on this machine: its ceiling is the CPUs divided "
        "by the CPU each I/O costs.", "",
        "| class | case | QD | Tessera IOPS (runs) | MiB/s | p50 µs | p99 µs | raw fio IOPS (runs) | raw p50 µs | **Tessera / raw** | disk / host bytes | CPU s/M I/O: target, engine 0, 1, 2, mgmt | CPUs busy | CPU µs per I/O, all |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    S = {}
    for c in classes:
        cls = c["class"]
        for case in c["cases"]:
            m = S[(cls, case["rw"], case["bs"], case["qd"])] = stack_summary(case)
            t, f = m["t"], m["fio"]
            cpu = ", ".join(f"{m['cpu'].get(n, 0):.0f}" for n in STACK_PROCS if n in m["cpu"])
            disk = f"{m['disk']:.2f}" if m["disk"] is not None and "write" in case["rw"] else "—"
            lines.append(f"| {cls} | {case['bs']} {case['rw']} | {case['qd']} | {t['iops']:.0f} ({k_runs(m['t_runs'])}) | "
                         f"{t['mib_per_s']:.0f} | {t['lat_p50_us']:.0f} | {t['lat_p99_us']:.0f} | "
                         f"{f['iops']:.0f} ({k_runs(m['fio_runs'])}) | {f['lat_p50_us']:.0f} | **{m['ratio']:.2f}** | {disk} | {cpu} | "
                         f"{pct_or_dash(m['busy'])} | {num_or_dash(m['cpu_whole'])} |")
    lines += ["", "The issue's goals (Tessera against raw fio on the same disk, medians of the per-pair ratios):", ""]
    for cls in done:
        g = lambda rw, bs, qd: S.get((cls, rw, bs, qd))
        parts = []
        for label, key, goal in (("4 KiB random writes QD32", ("randwrite", "4k", 32), 0.25),
                                 ("128 KiB sequential writes", ("write", "128k", 16), 0.4),
                                 ("4 KiB random reads QD32", ("randread", "4k", 32), 0.6),
                                 ("128 KiB sequential reads", ("read", "128k", 16), 0.6)):
            if g(*key):
                ratio = g(*key)["ratio"]
                v = verdict(ratio, goal)
                if "write" in key[0]:   # the same in the bytes the engines write for it
                    v = v[:-1] + f"; {ratio * STACK_DISK_COPIES.get(cls, 1):.2f} in disk bytes, ×{STACK_DISK_COPIES.get(cls, 1):g})"
                if ratio < goal:
                    v = v[:-1] + cpu_ceiling(g(*key), goal * g(*key)["fio"]["iops"]) + ")"
                parts.append(f"{label} {v}")
        lat = g("randread", "4k", 1)
        if lat:
            lr = lat["lat_ratio"]
            parts.append(f"4 KiB random read QD1 p50 latency **{lr:.2f}×** raw "
                         f"({lat['t']['lat_p50_us']:.0f} µs against {lat['fio']['lat_p50_us']:.0f} µs; goal ≤ 1.5×: "
                         f"{'met' if lr <= 1.5 else 'not met'})")
        lines.append(f"- **{cls}**: " + "; ".join(parts) + ".")
    for c in classes:
        for case in c["cases"]:
            prof = case.get("profile")
            if not prof:
                continue
            lines += ["", f"**Where the time goes: {c['class']} {case['bs']} {case['rw']} QD{case['qd']}** (one more run of the "
                      f"same command, {prof['iops']:.0f} IOPS, under `perf record -a -e cpu-clock -F 499`: every CPU sampled, "
                      "each sample charged to the process whose thread ran; shares of both CPUs' time, and the functions "
                      "(kernel ones marked [k]) taking most of each process's samples):", "",
                      "| process | % of the CPUs | its top functions (% of its samples) |", "|---|---|---|"]
            for name, pct in sorted(prof["share"].items(), key=lambda x: -x[1]):
                if pct < 0.5:
                    continue
                fns = "; ".join(f"`{f[:60]}` {v:.0f}" for f, v in prof["top"].get(name, []) if name != "idle")
                lines.append(f"| {STACK_PROFILE_NAMES.get(name, name)} | {pct:.1f} | {fns or '—'} |")
    fills = ", ".join(f"{c['class']} {c['fill']['mib_per_s']:.0f} MiB/s" for c in classes)
    lines += ["", f"The fills (128 KiB sequential writes at QD16 of the whole volume, host bytes) ran at {fills}.", "",
              "Commands (the target's address and fio's file and output format left out; DIR is the system's "
              "directory, CLASS the class):", "",
              f"- `{one['up_cmd'].replace('--class ' + one['class'], '--class CLASS')}`; `{one['fill_cmd']}`"]
    for case in one["cases"]:
        lines.append(f"- `{case['cmd']}`; `{case['fio_cmd']}`")
    pct = (f"{min(busy) * 100:.0f}–{max(busy) * 100:.0f} %" if round(min(busy), 2) < round(max(busy), 2)
           else f"{busy[0] * 100:.0f} %")
    lines += ["", f"Machine: {os.cpu_count()} CPUs ({cpu_model()}) shared by the target, the engines, the service, the load "
              f"generator and other jobs, {round(os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30)} GiB RAM, "
              f"Linux {platform.release()}, {disk_model(fs[1] if len(fs) == 2 else '')}; run on {res['date']} with binaries "
              f"built from commit {res['commit']}. Before each class, with none of this benchmark's processes running, the "
              f"CPUs were {pct} busy with other work.", ""]
    return lines


def section_span(lines, heading):
    """(start, end) of the section `heading` (up to the next `## ` heading) in the page's lines, or None."""
    start = next((i for i, l in enumerate(lines) if l.strip() == heading), None)
    if start is None:
        return None
    return start, next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))


def splice_section(page, section_lines, heading=ENGINE_SECTION, after=None):
    """Replaces the section `heading` of an existing page (or inserts it after the section `after`
    when given and present, else before the kernel comparison, else at the end)."""
    lines = page.split("\n")
    span = section_span(lines, heading)
    if span is None:
        prev = section_span(lines, after) if after else None
        at = prev[1] if prev else next((i for i, l in enumerate(lines) if l.startswith("## Same-guest comparison")), len(lines))
        span = (at, at)
    return "\n".join(lines[:span[0]] + section_lines + lines[span[1]:])


KERNEL_SECTION = "## Same-guest comparison with the Linux kernel target"


def kernel_section():
    """The same-guest comparison, from what `tests/nvme-cli/run.py --kernel-compare` wrote."""
    kernel = os.path.join(ROOT, "target", "nvme-cli-logs", "kernel-compare.md")
    lines = [KERNEL_SECTION, ""]
    if os.path.exists(kernel):
        return lines + [open(kernel).read().strip(), ""]
    return lines + ["Not measured in this run: `python3 tests/nvme-cli/run.py --kernel-compare` writes "
                    "target/nvme-cli-logs/kernel-compare.md, which is included here when it exists.", ""]


VHOST_SECTION = "## VM disk: vhost-user-blk against NVMe/TCP in one guest"


def vhost_section():
    """vhost-user-blk against NVMe/TCP, from what `tests/nvme-cli/vhost_compare.py` wrote."""
    path = os.path.join(ROOT, "target", "nvme-cli-logs", "vhost-compare.md")
    lines = [VHOST_SECTION, ""]
    if os.path.exists(path):
        return lines + [open(path).read().strip(), ""]
    return lines + ["Not measured in this run: `python3 tests/nvme-cli/vhost_compare.py` writes "
                    "target/nvme-cli-logs/vhost-compare.md, which is included here when it exists.", ""]


def write_section(path, section_lines, heading, after=None, what="a section"):
    """Splices one section into the page at `path` (a new page if there is none) and says so."""
    page = open(path).read() if os.path.exists(path) else "# Benchmarks\n"
    with open(path, "w") as f:
        f.write(splice_section(page, section_lines, heading, after=after))
    print(f"wrote {what} of {path}")


def existing_section(path, heading):
    """The lines of section `heading` of the page at `path`, or []."""
    if not os.path.exists(path):
        return []
    lines = open(path).read().split("\n")
    span = section_span(lines, heading)
    return lines[span[0]:span[1]] if span else []


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--time", type=float, default=3.0)
    ap.add_argument("--idle", type=float, default=60.0)
    ap.add_argument("--out", default=os.path.join(ROOT, "docs", "BENCHMARKS.md"))
    ap.add_argument("--profile", action="store_true", help="only the callgrind profile, printed as Markdown")
    ap.add_argument("--no-profile", dest="profile_too", action="store_false",
                    help="leave the callgrind profile out of the page")
    ap.add_argument("--engine-only", action="store_true",
                    help="only the storage engine section, replaced in the existing page")
    ap.add_argument("--engine-time", type=float, default=5.0, help="seconds per engine and fio run")
    ap.add_argument("--heal", action="store_true",
                    help="only the self-healing section (rebuild, host I/O during it, reintegration), replaced in the existing page")
    ap.add_argument("--no-heal", dest="heal_too", action="store_false",
                    help="full run without the self-healing measurement (the page keeps its existing heal section)")
    ap.add_argument("--heal-runs", type=int, default=3, help="runs per rebuild throttle (each a fresh tessera up, ~1.5 minutes)")
    ap.add_argument("--heal-io-time", type=float, default=4.0, help="seconds per host I/O run before and during a rebuild")
    ap.add_argument("--heal-results", metavar="JSON",
                    help=f"with --heal: write the section from a saved measurement (every one is saved to {os.path.relpath(HEAL_RESULTS, ROOT)}) instead of measuring")
    ap.add_argument("--snapshots", action="store_true",
                    help="only the snapshot section (creation latency, random writes with 0 and 10 snapshots, space freed), replaced in the existing page")
    ap.add_argument("--stack-only", action="store_true",
                    help="only the whole-stack section (tessera up per object class, tessera bench paired with raw fio), replaced in the existing page")
    ap.add_argument("--no-stack", dest="stack_too", action="store_false",
                    help="full run without the whole-stack measurement (the page keeps its existing whole-stack section)")
    ap.add_argument("--stack-runs", type=int, default=3, help="Tessera/fio pairs per whole-stack case")
    ap.add_argument("--stack-time", type=float, default=3.0, help="seconds per whole-stack Tessera and fio run")
    ap.add_argument("--stack-results", metavar="JSON",
                    help=f"with --stack-only: write the section from a saved measurement (every one is saved to {os.path.relpath(STACK_RESULTS, ROOT)}) instead of measuring")
    ap.add_argument("--one-core", metavar="SPDK_DIR",
                    help="only the one-core comparison with SPDK (~2 minutes): SPDK_DIR is an SPDK tree built by hand "
                         "(build/bin/nvmf_tgt, build/bin/spdk_nvme_perf, scripts/rpc.py)")
    ap.add_argument("--one-core-results", metavar="JSON",
                    help=f"with --one-core: write the section from a saved measurement ({os.path.relpath(ONECORE_RESULTS, ROOT)})")
    ap.add_argument("--kernel-only", action="store_true",
                    help="only the same-guest comparison with the kernel target, from target/nvme-cli-logs/kernel-compare.md "
                         "(which `python3 tests/nvme-cli/run.py --kernel-compare` writes)")
    ap.add_argument("--vhost-only", action="store_true",
                    help="only the vhost-user-blk comparison, from target/nvme-cli-logs/vhost-compare.md "
                         "(which `python3 tests/nvme-cli/vhost_compare.py` writes)")
    a = ap.parse_args()
    if a.vhost_only:
        write_section(a.out, vhost_section(), VHOST_SECTION, after=KERNEL_SECTION, what="the vhost-user-blk section")
        return 0
    if a.kernel_only:
        write_section(a.out, kernel_section(), KERNEL_SECTION, what="the kernel comparison section")
        return 0
    if a.one_core:
        if a.one_core_results:
            res = json.load(open(a.one_core_results))
        else:
            subprocess.run(["cargo", "build", "--release", "--bins"], cwd=ROOT, check=True)
            res = bench_onecore.measure(a.one_core, BIN, free_port, cpu_seconds, runs=a.runs, secs=5)
            os.makedirs(os.path.dirname(ONECORE_RESULTS), exist_ok=True)
            with open(ONECORE_RESULTS, "w") as f:
                json.dump(res, f, indent=1)
        write_section(a.out, bench_onecore.section(res), bench_onecore.SECTION, after="## Idle cost",
                      what="the one-core section")
        return 0
    if not a.heal_results and not a.stack_results:
        subprocess.run(["cargo", "build", "--release", "--bins"], cwd=ROOT, check=True)
    if a.profile:
        print("\n".join(profile(os.path.join(ROOT, "target", "profile"))))
        return 0
    if a.snapshots:
        import bench_snapshots
        res = bench_snapshots.measure(a.runs, a.time)
        write_section(a.out, bench_snapshots.section(res), bench_snapshots.SNAP_SECTION, after=HEAL_SECTION, what="the snapshot section")
        return 0
    if a.heal:
        res = json.load(open(a.heal_results)) if a.heal_results else heal_measure(a.heal_runs, a.heal_io_time)
        write_section(a.out, heal_section(res), HEAL_SECTION, after=ENGINE_SECTION, what="the self-healing section")
        return 0
    if a.stack_only:
        res = json.load(open(a.stack_results)) if a.stack_results else stack_measure(a.stack_runs, a.stack_time)
        write_section(a.out, stack_section(res), STACK_SECTION, after=HEAL_SECTION, what="the whole-stack section")
        return 0
    if a.engine_only:
        write_section(a.out, engine_section(engine_measure(a.runs, a.engine_time)), ENGINE_SECTION,
                      what="the engine section")
        return 0
    tessera = os.path.join(BIN, "tessera")
    T = str(a.time)

    wire = {}
    wire_cases = [(name, req, resp, qd) for qd in (1, 32, 128)
                  for name, req, resp in (("4k-read", 72, 4096 + 24), ("4k-write", 4096 + 72, 24))]
    wire_cases += [("128k-read", 72, 131072 + 24, 16), ("128k-write", 131072 + 72, 24, 16)]
    for name, req, resp, qd in wire_cases:
        for mode in WIRE_MODES:
            cmd = [tessera, "bench-wire", "--req", str(req), "--resp", str(resp), "--qd", str(qd), "--time", T] + \
                (["--in-process"] if mode == "1 proc" else []) + ["--json"]
            r, _ = median_of(cmd, a.runs, "ops_per_s")
            wire[(name, qd, mode)] = (r, " ".join(["tessera"] + cmd[1:-1]))

    cases = []
    for rw in ("randread", "randwrite"):
        for qd in (1, 32, 128):
            for queues in ((1, 2) if qd > 1 else (1,)):
                cases.append((rw, "4k", qd, queues))
    cases += [("read", "128k", 16, 1), ("write", "128k", 16, 1)]
    results = []
    for bdev in ("null", "malloc"):
        t = Target(bdev)
        try:
            for rw, bs, qd, queues in cases:
                cmd = [tessera, "bench", "--addr", f"127.0.0.1:{t.port}", "--nqn", "nqn.2026-11.io.tessera:bench",
                       "--rw", rw, "--bs", bs, "--qd", str(qd), "--queues", str(queues), "--time", T,
                       "--target-pid", str(t.proc.pid), "--json"]
                r, all_iops = median_of(cmd, a.runs, "iops")
                results.append((bdev, rw, bs, qd, queues, r, all_iops))
            if bdev == "null":
                idle_cmd = [tessera, "bench", "--addr", f"127.0.0.1:{t.port}", "--nqn", "nqn.2026-11.io.tessera:bench",
                            "--idle", "--queues", "2", "--time", str(a.idle), "--target-pid", str(t.proc.pid), "--json"]
                idle = run_json(idle_cmd)
        finally:
            t.stop()

    profile_lines = profile(os.path.join(ROOT, "target", "profile")) if a.profile_too else []

    cpu = subprocess.run(["sh", "-c", "grep -m1 'model name' /proc/cpuinfo | cut -d: -f2"], capture_output=True, text=True).stdout.strip()
    lines = [
        "# Benchmarks", "",
        "Produced by `python3 scripts/bench.py` (this whole page). Every figure is the median of "
        f"{a.runs} runs of {a.time:g} s. The load generator (`tessera bench`) and the target run on the same "
        f"{os.cpu_count()} cores, which other jobs (compilers) shared during the run, so figures are noisy and lower "
        "than with a separate host. Performance is measured here, never by timed tests.", "",
        "## Machine", "",
        f"{os.cpu_count()} CPUs ({cpu}), {round(os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30)} GiB RAM, "
        f"Linux {platform.release()}; run on {time.strftime('%Y-%m-%d')}. Target: `tessera-nvmf` release build, "
        "namespace of 1 GiB with 512-byte blocks, host and target on 127.0.0.1.", "",
        "## Wire limit: loopback TCP with NVMe/TCP-sized messages", "",
        "`tessera bench-wire`: a request/response pair with no storage protocol, the same message sizes and depth, "
        "answering every whole request that has arrived with one write. *2 proc*: the server is its own process, "
        "as `tessera-nvmf` is to `tessera bench`, so every round trip wakes the other process. *1 proc* "
        "(`--in-process`): both ends in one tokio runtime, where a round trip can complete without leaving a worker "
        "thread; no separate target process can reach it, but it is the floor the issue's goals were set against.", "",
        "| messages | QD | server | ops/s | MiB/s | p50 µs | p99 µs | command |", "|---|---|---|---|---|---|---|---|",
    ]
    for (name, qd, mode), (r, cmd) in wire.items():
        lines.append(f"| {name} ({r['req']} B → {r['resp']} B) | {qd} | {mode} | {r['ops_per_s']:.0f} | {r['mib_per_s']:.0f} | "
                     f"{r['lat_p50_us']:.1f} | {r['lat_p99_us']:.1f} | `{cmd}` |")
    lines += ["", "## Tessera target over NVMe/TCP", "",
              "`tessera bench --rw RW --bs BS --qd QD --queues N --time T --target-pid PID` against `tessera-nvmf`. "
              "*vs wire* is the ratio to the loopback TCP limit for the same message sizes and depth, against the "
              "2-process and the 1-process wire figures "
              "(IOPS for 4 KiB, bandwidth for 128 KiB; for QD1, the p50 round trip as a multiple of the wire's). "
              "*CPU* is the target's CPU seconds per million I/Os.", "",
              "| bdev | rw | bs | QD | queues | IOPS (runs) | MiB/s | avg µs | p50 µs | p99 µs | p99.9 µs | CPU s/M I/O | vs wire 2 proc / 1 proc |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for bdev, rw, bs, qd, queues, r, all_iops in results:
        key = ("4k-read" if "read" in rw else "4k-write") if bs == "4k" else ("128k-read" if "read" in rw else "128k-write")
        ratios = []
        for mode in WIRE_MODES:
            w = wire.get((key, qd, mode))
            if not w:
                continue
            wr = w[0]
            if qd == 1:
                ratios.append(f"{r['lat_p50_us'] / wr['lat_p50_us']:.2f}×")
            elif bs == "4k":
                ratios.append(f"{r['iops'] / wr['ops_per_s']:.2f}")
            else:
                ratios.append(f"{r['mib_per_s'] / wr['mib_per_s']:.2f}")
        ratio = (("latency " if qd == 1 else "") + " / ".join(ratios)) if ratios else ""
        runs = "/".join(f"{x / 1000:.0f}k" for x in all_iops)
        cpu_m = r.get("target_cpu_seconds_per_million_ios")
        lines.append(f"| {bdev} | {rw} | {bs} | {qd} | {queues} | {r['iops']:.0f} ({runs}) | {r['mib_per_s']:.0f} | "
                     f"{r['lat_avg_us']:.1f} | {r['lat_p50_us']:.1f} | {r['lat_p99_us']:.1f} | {r['lat_p999_us']:.1f} | "
                     f"{cpu_m:.2f} | {ratio} |")
    lines += ["", "## Profile: instructions per I/O", "",
              "User-space instructions the target executes per 4 KiB I/O (null bdev, QD32, one queue), counted by "
              "valgrind's callgrind (no hardware counters on this machine; kernel time is not included). Command: "
              "`python3 scripts/bench.py --profile`, which starts `tessera-nvmf` under "
              "`valgrind --tool=callgrind`, runs `tessera bench --rw RW --bs 4k --qd 32 --ios "
              f"{PROFILE_WARMUP}` to warm up, zeroes the counters (`callgrind_control -z`), runs "
              f"`tessera bench --rw RW --bs 4k --qd 32 --ios {PROFILE_IOS}`, dumps (`callgrind_control -d`) and "
              "divides by the I/O count. Output files: `target/profile/`.", "",
              "Before (commit d1b6503: writer task per connection fed over a channel with a byte semaphore, "
              "`FuturesUnordered` of command futures, SipHash CID map, a `Vec` per write, a fresh buffer per "
              "encoded PDU; about 6 allocations per I/O):", ""]
    for rw, (total, alloc, top) in PROFILE_BEFORE.items():
        lines.append(f"- **4 KiB {rw}**: {total:,} instructions per I/O, {alloc:,} of them in malloc/free; top: "
                     + ", ".join(f"`{fn}` {ir}" for ir, fn in top[:6]) + ".")
    lines += ["", "After (this build):", ""] + (profile_lines or ["(left out: `--no-profile`)", ""])
    qd1 = next((r for bdev, rw, bs, qd, queues, r, _ in results if (bdev, rw, qd) == ("null", "randread", 1)), {})
    qd1_t = qd1.get("lat_p50_us", 0.0)
    qd1_cpu = qd1.get("target_cpu_seconds_per_million_ios") or 0.0
    qd1_w2 = wire.get(("4k-read", 1, "2 proc"), ({"lat_p50_us": 0.0},))[0]["lat_p50_us"]
    qd1_w1 = wire.get(("4k-read", 1, "1 proc"), ({"lat_p50_us": 0.0},))[0]["lat_p50_us"]
    r2 = qd1_t / qd1_w2 if qd1_w2 else 0.0
    r1 = qd1_t / qd1_w1 if qd1_w1 else 0.0
    goal_text = (f"met against the 2-process wire ({r2:.2f}×) but not the in-process one ({r1:.2f}×)" if r2 <= 1.5
                 else f"not met in this run ({r2:.2f}× the 2-process and {r1:.2f}× the in-process round trip)")
    lines += ["", "## What limits the target now", "",
              f"- **QD1: two processes on two shared cores.** `tessera bench` and `tessera-nvmf` are separate "
              "processes. The target polls its socket for `poll_us` (50 µs) after each pass that did I/O "
              "(adaptive polling, `nvmf-target/src/poll.rs`), so a host that sends its next command within that "
              "window finds it awake; `tessera bench` does not poll, so every round trip still wakes the load "
              "generator (`epoll_wait`, `recvfrom`, `writev` per I/O on its side). The one-core section below "
              f"measures the target with SPDK's polling initiator instead. The null target's 4 KiB read p50 is {qd1_t:.1f} µs "
              f"against {qd1_w2:.1f} µs for the 2-process wire pair (same crossings, no protocol) and {qd1_w1:.1f} µs "
              "in-process, where client and server can run on one worker thread without any wake-up. User-space "
              "work is small (the profile below: ~2,800 instructions, about 1 µs, per I/O on each side); the "
              f"target's CPU per QD1 I/O is {qd1_cpu:.1f} µs, nearly all system time (socket calls and loopback TCP "
              f"delivery on a virtual machine, and the polling itself while the window is open). The issue's goal, 1.5× "
              f"the wire round trip, is {goal_text}; what remains is system calls per round trip (io_uring) and the "
              "load generator's own wake-up rather than protocol code.",
              "- **CPU at depth.** At QD32 the target spends about 2,800 user-space instructions per 4 KiB read and "
              "no allocation; one `recvfrom` and one `writev` serve a whole batch of commands, so kernel TCP "
              "processing (copying 4 KiB into the socket, loopback delivery) and the load generator's own work take "
              "most of the two cores. The load generator and the target compete for the same cores, and other "
              "jobs on the machine (compilers) take some of them during a run.",
              "- **Per-PDU encoding.** `nvme-proto`'s header encoder writes field by field through `BufMut` (the "
              "`put_slice`/`put_header` rows of the profile); a fixed-layout header written in one copy would save "
              "a few hundred instructions per I/O.",
              "- **malloc bdev.** Reads copy out of the RAM chunks into a fresh buffer (a RAM disk cannot lend its "
              "memory while a later write may change it), and writes copy the received data in; the null bdev "
              "shows the target without that copy.", ""]
    lines += ["", "## Idle cost", "",
              f"A host with an admin queue and 2 I/O queues connected and idle for {idle['idle_seconds']:g} s: the target used "
              f"**{idle['target_cpu_seconds']:.2f} CPU seconds** ({idle['target_cpu_seconds'] / idle['idle_seconds'] * 100:.3f} %). "
              "Adaptive polling ends `poll_us` (50 µs) after a queue's last I/O: idle connections wait in epoll.", "",
              f"Command: `tessera bench --idle --queues 2 --time {a.idle:g} --target-pid PID`.", ""]
    lines += existing_section(a.out, bench_onecore.SECTION)  # measured only with --one-core (needs SPDK)
    lines += engine_section(engine_measure(a.runs, a.engine_time))
    lines += heal_section(heal_measure(a.heal_runs, a.heal_io_time)) if a.heal_too else existing_section(a.out, HEAL_SECTION)
    lines += stack_section(stack_measure(a.stack_runs, a.stack_time)) if a.stack_too else existing_section(a.out, STACK_SECTION)
    lines += kernel_section()
    lines += vhost_section()
    with open(a.out, "w") as f:
        f.write("\n".join(lines))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    sys.exit(main())
