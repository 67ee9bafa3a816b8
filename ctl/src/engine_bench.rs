//! `tessera bench-engine`: a load generator for one `tessera-engine` over its RPC. It keeps `--qd`
//! array updates or fetches in flight over `tessera_client`'s pipelined connection(s), spread over
//! targets `0..--targets`, and reports IOPS, bandwidth, latency percentiles (HDR histogram) and,
//! given the engine's pid, its CPU seconds per million operations — the same summary and JSON
//! fields as `tessera bench`.
//!
//! Layout: each target holds one object of container [`CONT`], id [`OBJ`], that looks like a
//! volume of `--range` bytes stored the way DAOS stores an array object: byte offset `o` is dkey
//! `o / chunk` (an 8-byte big-endian integer key), akey [`AKEY`], array offset `o % chunk`, where
//! the chunk is 1 MiB (or `--bs` when larger). Offsets are multiples of `--bs`, so an operation
//! never crosses a chunk.
//!
//! Updates: every update carries a new epoch from a hybrid logical clock (the wall clock in
//! nanoseconds, bumped by one when it has not moved), so epochs increase through a run and across
//! runs, and the engine's aggregation treats them like any client's. Fetches read at epoch
//! `u64::MAX` (the newest version). Before a fetch run the range is **prefilled**: written once with
//! chunk-sized updates (not timed), so every fetch reads stored data; `--no-prefill` skips that
//! and reads whatever earlier runs wrote, and bytes that read as holes are counted (`hole_bytes`)
//! so a run over unwritten space is visible.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use hdrhistogram::Histogram;
use tessera_client::hlc::Hlc;
use tessera_client::rpc::{ConnectionOptions, EngineConnection};
use tessera_engine_proto::{
    chunk_csums, key_from_u64, ContainerId, Fetch, FetchReply, FetchValue, ObjectId, Reply, Request, Update, UpdateValue, CSUM_CHUNK,
};
use tessera_nvmf_host::Rng;

use crate::report::{cpu_text, histogram, latency_text, parse_size, parse_size64, rate_text, summarize, Counts, CpuMeter, Report};

/// Container the benchmark writes.
pub const CONT: ContainerId = ContainerId(0x7e55_e7a0_0000_0000_0000_0000_0000_be9c);
/// Object (one per target) the benchmark writes.
pub const OBJ: ObjectId = ObjectId(0xbe9c);
/// The akey of every extent.
pub const AKEY: &[u8] = b"0";
/// Bytes per dkey unless `--bs` is larger.
pub const CHUNK: u64 = 1 << 20;

/// Operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Op {
    /// Array updates (writes), each at a new epoch.
    Update,
    /// Array fetches (reads) at the newest epoch.
    Fetch,
}

/// Order of offsets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Pattern {
    /// Uniformly random offsets (and targets).
    Rand,
    /// One sequential stream, round robin over the targets.
    Seq,
}

/// Arguments of `tessera bench-engine`.
#[derive(clap::Args, Debug, Clone)]
pub struct EngineBenchArgs {
    /// Engine RPC address.
    #[arg(long, default_value = "127.0.0.1:10001")]
    addr: SocketAddr,
    /// Operation.
    #[arg(long, value_enum, default_value = "update")]
    op: Op,
    /// Bytes per operation: bytes, or with a k/m suffix (4k, 128k, 1m).
    #[arg(long, default_value = "4k", value_parser = parse_size)]
    bs: u32,
    /// Operations in flight in total (over all connections and targets).
    #[arg(long, default_value_t = 32)]
    qd: u32,
    /// Run time in seconds.
    #[arg(long, conflicts_with = "ios")]
    time: Option<f64>,
    /// Total number of operations.
    #[arg(long)]
    ios: Option<u64>,
    /// Spread operations over targets 0..N of the engine.
    #[arg(long, default_value_t = 1)]
    targets: u16,
    /// Offset order.
    #[arg(long, value_enum, default_value = "rand")]
    pattern: Pattern,
    /// Bytes used per target from offset 0 (k/m/g suffix); offsets are multiples of --bs.
    #[arg(long, default_value = "1g", value_parser = parse_size64)]
    range: u64,
    /// TCP connections to the engine (operations are spread over them).
    #[arg(long, default_value_t = 1)]
    conns: u16,
    /// Fetch: do not write the range first; read what earlier runs left (holes are counted).
    #[arg(long)]
    no_prefill: bool,
    /// Fetch: check every reply's CRC64s against its data (the client's end-to-end check).
    #[arg(long)]
    verify: bool,
    /// Report this process's (the engine's) CPU seconds per million operations.
    #[arg(long)]
    engine_pid: Option<u32>,
    /// Random seed.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

/// Where an operation goes.
#[derive(Debug, Clone, Copy)]
struct Io {
    target: u16,
    offset: u64,
    len: u32,
}

/// What the workers share: the connections, the fixed payload, and what is left to issue.
#[derive(Debug)]
struct Job {
    conns: Vec<EngineConnection>,
    op: Op,
    bs: u32,
    chunk: u64,
    /// `bs` units per target.
    units: u64,
    targets: u16,
    pattern: Pattern,
    verify: bool,
    data: Bytes,
    csums: Vec<u64>,
    clock: Hlc,
    next_seq: AtomicU64,
    remaining: Option<AtomicU64>,
    deadline: Option<Instant>,
    /// Prefill: exactly these operations, taken in order.
    list: Option<Vec<Io>>,
    /// Set by the first failed operation: the run is over (it will be reported as failed).
    failed: AtomicBool,
}

impl Job {
    /// The next operation of worker `rng`'s owner, or `None` when the run is over.
    fn next(&self, rng: &mut Rng) -> Option<Io> {
        if self.failed.load(Ordering::Relaxed) {
            return None;
        }
        if let Some(list) = &self.list {
            let i = self.next_seq.fetch_add(1, Ordering::Relaxed);
            return list.get(i as usize).copied();
        }
        if self.deadline.is_some_and(|d| Instant::now() >= d) {
            return None;
        }
        if let Some(r) = &self.remaining {
            r.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1)).ok()?;
        }
        let n = u64::from(self.targets);
        let (target, unit) = match self.pattern {
            Pattern::Seq => {
                let i = self.next_seq.fetch_add(1, Ordering::Relaxed);
                (i % n, (i / n) % self.units)
            }
            Pattern::Rand => (rng.next() % n, rng.next() % self.units),
        };
        Some(Io { target: target as u16, offset: unit * u64::from(self.bs), len: self.bs })
    }

    fn request(&self, io: Io) -> Request {
        let dkey = key_from_u64(io.offset / self.chunk);
        let offset = io.offset % self.chunk;
        let akey = Bytes::from_static(AKEY);
        match self.op {
            Op::Update => {
                let (data, csums) = if io.len == self.bs {
                    (self.data.clone(), self.csums.clone())
                } else {
                    let d = self.data.slice(..io.len as usize);
                    let c = chunk_csums(&d);
                    (d, c)
                };
                let value = UpdateValue::Array { offset, data, csums };
                Request::Update(Update { cont: CONT, obj: OBJ, epoch: self.clock.now(), dkey, akey, value })
            }
            Op::Fetch => {
                Request::Fetch(Fetch { cont: CONT, obj: OBJ, epoch: u64::MAX, dkey, akey, what: FetchValue::Array { offset, len: io.len } })
            }
        }
    }
}

/// What one worker saw.
#[derive(Debug)]
struct Stats {
    hist: Histogram<u64>,
    counts: Counts,
    hole_bytes: u64,
    verified_chunks: u64,
    first_error: Option<String>,
}

/// One in-flight slot: issues an operation, waits for its reply, records it, repeats; all slots
/// stop at the first failure.
async fn worker(job: Arc<Job>, index: usize, seed: u64) -> Result<Stats, String> {
    let conn = job.conns.get(index % job.conns.len()).cloned().ok_or("no connection")?;
    let mut rng = Rng::new(seed ^ (index as u64 + 1).wrapping_mul(0xA076_1D64_78BD_642F));
    let mut s = Stats { hist: histogram()?, counts: Counts::default(), hole_bytes: 0, verified_chunks: 0, first_error: None };
    while let Some(io) = job.next(&mut rng) {
        let req = job.request(io);
        let start = Instant::now();
        let reply = conn.call(io.target, req).await;
        let _ = s.hist.record((start.elapsed().as_nanos() as u64).max(1));
        let problem = match (job.op, reply) {
            (Op::Update, Ok(Reply::Updated)) => {
                s.counts.writes += 1;
                None
            }
            (Op::Fetch, Ok(Reply::Fetched(f))) => check_fetch(&job, io, &f, &mut s),
            (_, Ok(other)) => Some(format!("unexpected reply {other:?}")),
            (_, Err(e)) => Some(e.to_string()),
        };
        if let Some(p) = problem {
            job.failed.store(true, Ordering::Relaxed);
            s.counts.errors += 1;
            s.first_error
                .get_or_insert_with(|| format!("{:?} of {} bytes at target {} offset {}: {p}", job.op, io.len, io.target, io.offset));
        } else {
            s.counts.bytes += u64::from(io.len);
        }
    }
    Ok(s)
}

/// Counts a fetch reply (holes, checksums); `Some` says what is wrong with it.
fn check_fetch(job: &Job, io: Io, f: &FetchReply, s: &mut Stats) -> Option<String> {
    let FetchReply::Array { data, holes, .. } = f else {
        return Some("a single value instead of an array".into());
    };
    if data.len() != io.len as usize {
        return Some(format!("{} bytes returned", data.len()));
    }
    if job.verify {
        if let Err(chunk) = f.verify() {
            return Some(format!("checksum mismatch in 4 KiB chunk {chunk}"));
        }
        s.verified_chunks += data.len().div_ceil(CSUM_CHUNK) as u64;
    }
    s.hole_bytes += holes.iter().map(|&(_, len)| u64::from(len)).sum::<u64>();
    s.counts.reads += 1;
    None
}

/// Runs `qd` workers over `job` to its end; the merged stats and the elapsed time.
async fn drive(job: Arc<Job>, qd: u32, seed: u64) -> Result<(Stats, Duration), String> {
    let start = Instant::now();
    let tasks: Vec<_> = (0..qd as usize).map(|i| tokio::spawn(worker(job.clone(), i, seed))).collect();
    let mut all = Stats { hist: histogram()?, counts: Counts::default(), hole_bytes: 0, verified_chunks: 0, first_error: None };
    for t in tasks {
        let s = t.await.map_err(|e| format!("worker failed: {e}"))??;
        let _ = all.hist.add(&s.hist);
        all.counts.reads += s.counts.reads;
        all.counts.writes += s.counts.writes;
        all.counts.bytes += s.counts.bytes;
        all.counts.errors += s.counts.errors;
        all.hole_bytes += s.hole_bytes;
        all.verified_chunks += s.verified_chunks;
        all.first_error = all.first_error.or(s.first_error);
    }
    Ok((all, start.elapsed()))
}

/// A payload that is not all zeros, so no layer can treat it specially.
fn payload(len: usize, seed: u64) -> Bytes {
    let mut rng = Rng::new(seed);
    Bytes::from((0..len.div_ceil(8)).flat_map(|_| rng.next().to_le_bytes()).take(len).collect::<Vec<u8>>())
}

/// Checks the engine: it answers, has the targets asked for, and each has room for the range.
async fn check_engine(conn: &EngineConnection, a: &EngineBenchArgs, range: u64) -> Result<(), String> {
    let engine_targets = match conn.call(0, Request::Ping).await.map_err(|e| format!("ping {}: {e}", a.addr))? {
        Reply::Pong { targets, .. } => targets,
        other => return Err(format!("unexpected reply to ping: {other:?}")),
    };
    if a.targets > engine_targets {
        return Err(format!("--targets {} but the engine at {} serves {engine_targets}", a.targets, a.addr));
    }
    for t in 0..a.targets {
        if let Reply::TargetInfo(info) = conn.call(t, Request::QueryTarget).await.map_err(|e| format!("query target {t}: {e}"))? {
            if range > info.capacity {
                return Err(format!("--range {range} is larger than target {t}'s capacity of {} bytes", info.capacity));
            }
        }
    }
    Ok(())
}

/// Runs the benchmark and returns the text to print.
pub fn run(a: EngineBenchArgs) -> Result<String, String> {
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().map_err(|e| e.to_string())?;
    rt.block_on(run_async(a))
}

async fn run_async(a: EngineBenchArgs) -> Result<String, String> {
    if a.time.is_none() && a.ios.is_none() {
        return Err("give --time SECONDS or --ios N".into());
    }
    if a.qd == 0 || a.targets == 0 || a.conns == 0 {
        return Err("--qd, --targets and --conns must be at least 1".into());
    }
    let bs = u64::from(a.bs);
    let chunk = CHUNK.max(bs);
    if chunk % bs != 0 {
        return Err(format!("--bs {} must divide {CHUNK} (the bytes per dkey) or be a multiple of it", a.bs));
    }
    let units = a.range / bs;
    if units == 0 {
        return Err(format!("--range {} is smaller than --bs {}", a.range, a.bs));
    }
    let range = units * bs;
    let mut conns = Vec::new();
    for _ in 0..a.conns {
        conns.push(EngineConnection::connect(a.addr, ConnectionOptions::default()).await.map_err(|e| format!("{}: {e}", a.addr))?);
    }
    let first = conns.first().ok_or("no connection")?;
    check_engine(first, &a, range).await?;
    let data = payload(chunk as usize, a.seed);
    let job = |op, bs: u32, list: Option<Vec<Io>>, timed: bool| Job {
        conns: conns.clone(),
        op,
        bs,
        chunk,
        units: range / u64::from(bs),
        targets: a.targets,
        pattern: a.pattern,
        verify: a.verify,
        data: data.slice(..bs as usize),
        csums: chunk_csums(&data.slice(..bs as usize)),
        clock: Hlc::new(),
        next_seq: AtomicU64::new(0),
        remaining: if timed { a.ios.map(AtomicU64::new) } else { None },
        deadline: if timed { a.time.map(|t| Instant::now() + Duration::from_secs_f64(t)) } else { None },
        list,
        failed: AtomicBool::new(false),
    };

    let mut prefill_seconds = None;
    if a.op == Op::Fetch && !a.no_prefill {
        // Every chunk of every target once, round robin over the targets.
        let list: Vec<Io> = (0..range.div_ceil(chunk))
            .flat_map(|c| (0..a.targets).map(move |t| Io { target: t, offset: c * chunk, len: (range - c * chunk).min(chunk) as u32 }))
            .collect();
        let (s, took) = drive(Arc::new(job(Op::Update, chunk as u32, Some(list), false)), a.qd.clamp(4, 32), a.seed).await?;
        if let Some(e) = s.first_error {
            return Err(format!("prefill failed: {e}"));
        }
        prefill_seconds = Some(took.as_secs_f64());
    }

    let meter = CpuMeter::start(a.engine_pid)?;
    let (s, elapsed) = drive(Arc::new(job(a.op, a.bs, None, true)), a.qd, a.seed).await?;
    let report = summarize(&s.hist, s.counts, elapsed, s.verified_chunks);
    let cpu = meter.map(|m| m.finish(report.ios)).transpose()?;
    if let Some(e) = s.first_error {
        return Err(format!("{} of {} operations failed; first: {e}", s.counts.errors, s.counts.errors + report.ios));
    }
    if a.json {
        #[derive(serde::Serialize)]
        struct Out<'a> {
            op: Op,
            bs: u32,
            qd: u32,
            targets: u16,
            pattern: Pattern,
            range: u64,
            conns: u16,
            #[serde(flatten)]
            report: &'a Report,
            hole_bytes: u64,
            prefill_seconds: Option<f64>,
            engine_cpu_seconds: Option<f64>,
            engine_cpu_seconds_per_million_ops: Option<f64>,
        }
        let o = Out {
            op: a.op,
            bs: a.bs,
            qd: a.qd,
            targets: a.targets,
            pattern: a.pattern,
            range,
            conns: a.conns,
            report: &report,
            hole_bytes: s.hole_bytes,
            prefill_seconds,
            engine_cpu_seconds: cpu.map(|c| c.0),
            engine_cpu_seconds_per_million_ops: cpu.map(|c| c.1),
        };
        return serde_json::to_string(&o).map(|s| s + "\n").map_err(|e| e.to_string());
    }
    let mut out = String::new();
    if let Some(p) = prefill_seconds {
        out.push_str(&format!("prefill: {} MiB per target written in {p:.2} s\n", range >> 20));
    }
    let op = if a.op == Op::Update { "update" } else { "fetch" };
    let pattern = if a.pattern == Pattern::Rand { "rand" } else { "seq" };
    out.push_str(&format!("{op} {pattern} bs={} qd={} targets={}: {})\n", a.bs, a.qd, a.targets, rate_text(&report)));
    out.push_str(&latency_text(&report));
    if s.hole_bytes > 0 {
        out.push_str(&format!("holes: {} bytes read were never written (see --no-prefill)\n", s.hole_bytes));
    }
    if a.verify {
        out.push_str(&format!("verify: {} checksummed 4 KiB chunks matched\n", report.verified_blocks));
    }
    out.push_str(&cpu_text("engine", cpu));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(pattern: Pattern, targets: u16, units: u64, ios: u64) -> Job {
        Job {
            conns: Vec::new(),
            op: Op::Update,
            bs: 4096,
            chunk: CHUNK,
            units,
            targets,
            pattern,
            verify: false,
            data: Bytes::from(vec![1u8; 4096]),
            csums: Vec::new(),
            clock: Hlc::new(),
            next_seq: AtomicU64::new(0),
            remaining: Some(AtomicU64::new(ios)),
            deadline: None,
            list: None,
            failed: AtomicBool::new(false),
        }
    }

    #[test]
    fn sequential_round_robins_targets_and_wraps() {
        let j = job(Pattern::Seq, 2, 3, 8);
        let mut rng = Rng::new(1);
        let ios: Vec<(u16, u64)> = std::iter::from_fn(|| j.next(&mut rng)).map(|io| (io.target, io.offset / 4096)).collect();
        assert_eq!(ios, vec![(0, 0), (1, 0), (0, 1), (1, 1), (0, 2), (1, 2), (0, 0), (1, 0)]);
    }

    #[test]
    fn random_stays_in_range_and_aligned() {
        let j = job(Pattern::Rand, 3, 100, 1000);
        let mut rng = Rng::new(7);
        let mut n = 0;
        while let Some(io) = j.next(&mut rng) {
            assert!(io.target < 3 && io.offset < 100 * 4096 && io.offset % 4096 == 0);
            n += 1;
        }
        assert_eq!(n, 1000);
    }

    #[test]
    fn layout_is_chunked_and_epochs_increase() {
        let j = job(Pattern::Seq, 1, 1000, 0);
        let Request::Update(u1) = j.request(Io { target: 0, offset: CHUNK + 8192, len: 4096 }) else { panic!() };
        assert_eq!(u1.dkey, key_from_u64(1));
        assert!(matches!(u1.value, UpdateValue::Array { offset: 8192, .. }));
        let Request::Update(u2) = j.request(Io { target: 0, offset: 0, len: 4096 }) else { panic!() };
        assert!(u2.epoch > u1.epoch);
        assert!(u1.epoch > 1_600_000_000_000_000_000, "epochs are wall-clock nanoseconds");
    }
}
