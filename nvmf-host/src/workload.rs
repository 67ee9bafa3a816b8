//! Pipelined I/O workloads over NVMe/TCP I/O queues, in the manner of `spdk_nvme_perf` or fio:
//! each queue keeps `qd` commands in flight, measures every completion's latency into an HDR
//! histogram, and in verify mode writes a self-describing pattern and reads it all back.
//!
//! Per queue, one task owns the socket and the protocol state (outstanding commands by CID, R2T
//! answers, C2H data checks) and never blocks on either direction: it writes what the socket
//! takes, keeps the rest, and goes on reading responses, so a large H2C transfer never blocks the
//! reading of responses. Commands are refilled in batches: all completions that arrived together
//! free their slots, then every free slot is reissued and sent in one write.

use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use hdrhistogram::Histogram;
use tessera_nvme_proto::opcode::nvm;
use tessera_nvme_proto::pdu::{self, DataPdu};
use tessera_nvme_proto::sqe::{SglDescriptor, SGL_ID_INCAPSULE, SGL_ID_TRANSPORT};
use tessera_nvme_proto::{Digests, Pdu, Sqe, Status};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::conn::{Connection, Controller, Geometry, HostError, HOST_LIMITS};

/// Access pattern.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Rw {
    /// Sequential reads.
    Read,
    /// Sequential writes.
    Write,
    /// Random reads.
    RandRead,
    /// Random writes.
    RandWrite,
    /// Random mix; the read share is [`Workload::mix_read_pct`].
    RandRw,
}

impl std::str::FromStr for Rw {
    type Err = String;
    fn from_str(s: &str) -> Result<Rw, String> {
        Ok(match s {
            "read" => Rw::Read,
            "write" => Rw::Write,
            "randread" => Rw::RandRead,
            "randwrite" => Rw::RandWrite,
            "randrw" => Rw::RandRw,
            _ => return Err(format!("unknown --rw {s:?}: expected read, write, randread, randwrite or randrw")),
        })
    }
}

/// A workload.
#[derive(Debug, Clone)]
pub struct Workload {
    pub rw: Rw,
    /// Percentage of reads for [`Rw::RandRw`].
    pub mix_read_pct: u8,
    /// I/O size in bytes (a multiple of the block size).
    pub bs: u32,
    /// Commands in flight per queue.
    pub qd: u16,
    /// I/O queues (one TCP connection each).
    pub queues: u16,
    /// Run this long...
    pub duration: Option<Duration>,
    /// ...or this many I/Os in total.
    pub ios: Option<u64>,
    /// Write a pattern and read it all back, comparing every block.
    pub verify: bool,
    /// Blocks of the namespace to use from LBA 0 (default: all).
    pub range_blocks: Option<u64>,
    /// Seed of the random offsets and the verify pattern.
    pub seed: u64,
}

/// Results of a run.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Report {
    pub ios: u64,
    pub reads: u64,
    pub writes: u64,
    pub bytes: u64,
    pub seconds: f64,
    pub iops: f64,
    pub mib_per_s: f64,
    pub lat_avg_us: f64,
    pub lat_p50_us: f64,
    pub lat_p99_us: f64,
    pub lat_p999_us: f64,
    pub lat_max_us: f64,
    pub errors: u64,
    /// Blocks compared in the verify read-back (0 when not verifying).
    pub verified_blocks: u64,
}

#[derive(Debug)]
struct QueueStats {
    hist: Histogram<u64>,
    reads: u64,
    writes: u64,
    bytes: u64,
    errors: u64,
    verified_blocks: u64,
    first_error: Option<String>,
}

/// xorshift64*: fast, deterministic, good enough for offsets and patterns (also used by the
/// engine load generator).
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator seeded from `seed` (any value, zero included).
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    /// The next 64 random bits.
    #[allow(clippy::should_implement_trait)] // not an iterator: it never ends
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

/// Fills one block with the verify pattern of `lba`: its LBA, the seed, then pseudo-random bytes.
fn fill_block(block: &mut [u8], lba: u64, seed: u64) {
    let mut rng = Rng::new(lba ^ seed.rotate_left(17));
    for (i, chunk) in block.chunks_mut(8).enumerate() {
        let v = match i {
            0 => lba,
            1 => seed,
            _ => rng.next(),
        };
        let bytes = v.to_le_bytes();
        let n = chunk.len();
        chunk.copy_from_slice(bytes.get(..n).unwrap_or_default());
    }
}

fn pattern(lba: u64, blocks: u32, bs: u32, seed: u64) -> Bytes {
    let mut b = vec![0u8; blocks as usize * bs as usize];
    for (i, block) in b.chunks_mut(bs as usize).enumerate() {
        fill_block(block, lba + i as u64, seed);
    }
    Bytes::from(b)
}

/// What one queue issues next.
#[derive(Debug)]
struct OpGen {
    rw: Rw,
    mix_read_pct: u8,
    units: u64,
    next_seq: u64,
    stride: u64,
    rng: Rng,
    remaining: Option<u64>,
    deadline: Option<Instant>,
    /// Verify read-back: read exactly these units, in order.
    readback: Option<std::vec::IntoIter<u64>>,
}

impl OpGen {
    /// The next (is_read, unit), or `None` when this queue is done.
    fn next(&mut self) -> Option<(bool, u64)> {
        if let Some(it) = &mut self.readback {
            return it.next().map(|u| (true, u));
        }
        if self.deadline.is_some_and(|d| Instant::now() >= d) {
            return None;
        }
        if let Some(r) = &mut self.remaining {
            if *r == 0 {
                return None;
            }
            *r -= 1;
        }
        let unit = match self.rw {
            Rw::Read | Rw::Write => {
                let u = self.next_seq % self.units;
                self.next_seq += self.stride;
                u
            }
            _ => self.rng.next() % self.units,
        };
        let read = match self.rw {
            Rw::Read | Rw::RandRead => true,
            Rw::Write | Rw::RandWrite => false,
            Rw::RandRw => (self.rng.next() % 100) < u64::from(self.mix_read_pct),
        };
        Some((read, unit))
    }
}

#[derive(Debug)]
struct Slot {
    start: Instant,
    read: bool,
    lba: u64,
    data: Option<Bytes>,
}

struct QueueCtx {
    geo: Geometry,
    bs: u32,
    qd: u16,
    digests: Digests,
    verify_seed: Option<u64>,
    fixed_write: Bytes,
    /// Units this queue wrote (verify mode).
    written: Vec<u64>,
}

/// Writes as much of `out` as the socket takes without waiting.
fn flush(stream: &TcpStream, out: &mut BytesMut) -> std::io::Result<()> {
    while !out.is_empty() {
        match stream.try_write(out) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => out.advance(n),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(()),
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn submit(ctx: &mut QueueCtx, cid: u16, read: bool, unit: u64, out: &mut BytesMut) -> Slot {
    let blocks = ctx.bs / ctx.geo.block_size;
    let lba = unit * u64::from(blocks);
    let mut sqe = Sqe::new(if read { nvm::READ } else { nvm::WRITE }, cid);
    sqe.set_nsid(ctx.geo.nsid).set_cdw(10, lba as u32).set_cdw(11, (lba >> 32) as u32).set_cdw(12, blocks - 1);
    let mut data = None;
    let mut capsule = Bytes::new();
    if read {
        sqe.set_sgl(SglDescriptor { address: 0, length: ctx.bs, id: SGL_ID_TRANSPORT });
    } else {
        let d = match ctx.verify_seed {
            Some(seed) => {
                ctx.written.push(unit);
                pattern(lba, blocks, ctx.geo.block_size, seed)
            }
            None => ctx.fixed_write.clone(),
        };
        if d.len() <= ctx.geo.incapsule {
            sqe.set_sgl(SglDescriptor { address: 0, length: ctx.bs, id: SGL_ID_INCAPSULE });
            capsule = d;
        } else {
            sqe.set_sgl(SglDescriptor { address: 0, length: ctx.bs, id: SGL_ID_TRANSPORT });
            data = Some(d);
        }
    }
    Pdu::CapsuleCmd { sqe, data: capsule }.encode(ctx.digests, out);
    Slot { start: Instant::now(), read, lba, data }
}

fn check_blocks(data: &[u8], first_lba: u64, bs: u32, seed: u64) -> Result<u64, String> {
    let mut want = vec![0u8; bs as usize];
    let mut n = 0;
    for (i, block) in data.chunks(bs as usize).enumerate() {
        let lba = first_lba + i as u64;
        fill_block(&mut want, lba, seed);
        if block != want.as_slice() {
            return Err(format!("verify failed at LBA {lba}: data differs from what was written"));
        }
        n += 1;
    }
    Ok(n)
}

/// The in-flight commands of one queue.
struct Pipeline {
    slots: Vec<Option<Slot>>,
    free: Vec<u16>,
    outstanding: usize,
    stats: QueueStats,
}

impl Pipeline {
    /// Issues commands into every free slot (until the generator is done); false once it is.
    fn submit_all(&mut self, gen: &mut OpGen, ctx: &mut QueueCtx, out: &mut BytesMut) -> bool {
        while let Some(cid) = self.free.pop() {
            let Some((read, unit)) = gen.next() else {
                self.free.push(cid);
                return false;
            };
            let slot = submit(ctx, cid, read, unit, out);
            if let Some(s) = self.slots.get_mut(usize::from(cid)) {
                *s = Some(slot);
            }
            self.outstanding += 1;
        }
        true
    }

    /// Acts on one PDU from the target: data checks, R2T answers (appended to `out`), and
    /// completions.
    fn on_pdu(&mut self, p: Pdu, ctx: &QueueCtx, maxh2cdata: u32, out: &mut BytesMut) -> Result<(), String> {
        let (cid, status) = match p {
            Pdu::CapsuleResp(c) => (c.cid, Some(c.status)),
            Pdu::C2hData(d) => {
                let slot = self
                    .slots
                    .get(usize::from(d.cccid))
                    .and_then(Option::as_ref)
                    .ok_or_else(|| format!("C2HData for unknown CID {}", d.cccid))?;
                if let Some(seed) = ctx.verify_seed {
                    let first = slot.lba + u64::from(d.datao / ctx.geo.block_size);
                    match check_blocks(&d.data, first, ctx.geo.block_size, seed) {
                        Ok(n) => self.stats.verified_blocks += n,
                        Err(e) => {
                            self.stats.errors += 1;
                            self.stats.first_error.get_or_insert(e);
                        }
                    }
                }
                (d.cccid, d.success.then_some(Status::SUCCESS))
            }
            Pdu::R2t(r) => {
                let slot = self.slots.get(usize::from(r.cccid)).and_then(Option::as_ref);
                let data = slot.and_then(|s| s.data.clone()).ok_or_else(|| format!("R2T for CID {} without data", r.cccid))?;
                let (mut off, end) = (r.r2to as usize, r.r2to as usize + r.r2tl as usize);
                if end > data.len() {
                    return Err("R2T beyond the command's data".into());
                }
                while off < end {
                    let n = (end - off).min(maxh2cdata as usize);
                    let p = DataPdu {
                        cccid: r.cccid,
                        ttag: r.ttag,
                        datao: off as u32,
                        data: data.slice(off..off + n),
                        last: off + n == end,
                        success: false,
                    };
                    Pdu::H2cData(p).encode(ctx.digests, out);
                    off += n;
                }
                (r.cccid, None)
            }
            Pdu::C2hTermReq(t) => return Err(format!("target terminated the connection (FES {:#x})", t.fes)),
            other => return Err(format!("unexpected PDU {other:?}")),
        };
        match status {
            Some(status) => self.complete(cid, status, ctx.bs),
            None => Ok(()),
        }
    }

    fn complete(&mut self, cid: u16, status: Status, bs: u32) -> Result<(), String> {
        let Some(slot) = self.slots.get_mut(usize::from(cid)).and_then(Option::take) else {
            return Err(format!("completion for unknown CID {cid}"));
        };
        let stats = &mut self.stats;
        let lat = slot.start.elapsed().as_nanos() as u64;
        let _ = stats.hist.record(lat.max(1));
        if status.is_success() {
            if slot.read {
                stats.reads += 1;
            } else {
                stats.writes += 1;
            }
            stats.bytes += u64::from(bs);
        } else {
            stats.errors += 1;
            stats.first_error.get_or_insert(format!("{} at LBA {} failed: {status}", if slot.read { "read" } else { "write" }, slot.lba));
        }
        self.free.push(cid);
        self.outstanding -= 1;
        Ok(())
    }
}

/// Runs one queue to the end of its generator. One task per queue reads and writes its socket
/// without blocking: every pass handles all PDUs that have arrived, refills every free slot and
/// sends all new commands with one write.
async fn run_queue(conn: Connection, mut gen: OpGen, mut ctx: QueueCtx) -> Result<(QueueStats, Vec<u64>), HostError> {
    let Connection { stream, addr, maxh2cdata, mut buf, .. } = conn;
    let protocol = |what: String| HostError::Protocol { addr, what };
    let io_err = |source| HostError::Io { addr, source };
    let stats = QueueStats {
        hist: Histogram::new_with_bounds(1, 60_000_000_000, 3).map_err(|e| HostError::Data(e.to_string()))?,
        reads: 0,
        writes: 0,
        bytes: 0,
        errors: 0,
        verified_blocks: 0,
        first_error: None,
    };
    let mut pipe = Pipeline { slots: (0..ctx.qd).map(|_| None).collect(), free: (0..ctx.qd).rev().collect(), outstanding: 0, stats };
    let mut out = BytesMut::with_capacity(1 << 16);
    let mut more = true;
    loop {
        if more {
            more = pipe.submit_all(&mut gen, &mut ctx, &mut out);
        }
        flush(&stream, &mut out).map_err(io_err)?;
        if pipe.outstanding == 0 && out.is_empty() {
            break;
        }
        tokio::select! {
            biased;
            r = stream.readable() => r.map_err(io_err)?,
            r = stream.writable(), if !out.is_empty() => {
                r.map_err(io_err)?;
                continue;
            }
        }
        if buf.capacity() - buf.len() < 64 * 1024 {
            buf.reserve(256 * 1024);
        }
        match stream.try_read_buf(&mut buf) {
            Ok(0) => return Err(protocol("target closed the connection".into())),
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(io_err(e)),
        }
        while let Some(p) = pdu::decode(&mut buf, ctx.digests, &HOST_LIMITS).map_err(|e| protocol(format!("bad PDU from target: {e}")))? {
            pipe.on_pdu(p, &ctx, maxh2cdata, &mut out).map_err(protocol)?;
        }
    }
    close_queue(stream).await;
    Ok((pipe.stats, std::mem::take(&mut ctx.written)))
}

/// How long a closing queue waits for the target to close its side.
const QUEUE_CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// Closes an I/O queue and waits (bounded) until the target has closed its side too: the target
/// frees the QID before it closes the socket, so a queue opened next with the same QID is not
/// refused as "already connected" by a target that has not yet seen this one go.
async fn close_queue(mut stream: TcpStream) {
    if stream.shutdown().await.is_err() {
        return;
    }
    let mut sink = [0u8; 4096];
    let _ = tokio::time::timeout(QUEUE_CLOSE_TIMEOUT, async { while matches!(stream.read(&mut sink).await, Ok(n) if n > 0) {} }).await;
}

impl Workload {
    fn check(&self, geo: &Geometry) -> Result<u64, HostError> {
        let bad = |m: String| Err(HostError::Data(m));
        if self.bs == 0 || !self.bs.is_multiple_of(geo.block_size) {
            return bad(format!("--bs {} must be a multiple of the block size {}", self.bs, geo.block_size));
        }
        if geo.mdts_bytes != 0 && u64::from(self.bs) > geo.mdts_bytes {
            return bad(format!("--bs {} exceeds the controller's maximum transfer size {}", self.bs, geo.mdts_bytes));
        }
        if self.qd == 0 || u32::from(self.qd) >= geo.max_queue_entries {
            return bad(format!("--qd {} must be 1 to {}", self.qd, geo.max_queue_entries - 1));
        }
        if self.queues == 0 {
            return bad("--queues must be at least 1".into());
        }
        if self.duration.is_none() && self.ios.is_none() {
            return bad("give --time or --ios".into());
        }
        let blocks = self.range_blocks.unwrap_or(geo.blocks).min(geo.blocks);
        let units = blocks / u64::from(self.bs / geo.block_size);
        if units == 0 {
            return bad("the namespace range is smaller than one I/O".into());
        }
        Ok(units)
    }

    fn gens(&self, units: u64, readback: Option<Vec<Vec<u64>>>) -> Vec<OpGen> {
        let deadline = self.duration.map(|d| Instant::now() + d);
        let n = u64::from(self.queues);
        let mut readback = readback.map(|v| v.into_iter());
        (0..n)
            .map(|q| OpGen {
                rw: if self.verify && readback.is_none() && matches!(self.rw, Rw::Read | Rw::RandRead | Rw::RandRw) {
                    if self.rw == Rw::Read {
                        Rw::Write
                    } else {
                        Rw::RandWrite
                    }
                } else {
                    self.rw
                },
                mix_read_pct: self.mix_read_pct,
                units,
                next_seq: q,
                stride: n,
                rng: Rng::new(self.seed ^ (q + 1).wrapping_mul(0xA076_1D64_78BD_642F)),
                remaining: self.ios.map(|t| t / n + u64::from(q < t % n)),
                deadline,
                readback: readback.as_mut().and_then(|it| it.next()).map(Vec::into_iter),
            })
            .collect()
    }

    async fn phase(
        &self,
        ctrl: &Controller,
        gens: Vec<OpGen>,
        verify_seed: Option<u64>,
    ) -> Result<(Vec<QueueStats>, Vec<Vec<u64>>, Duration), HostError> {
        let geo = ctrl.geometry;
        let mut conns = Vec::new();
        for qid in 1..=self.queues {
            conns.push(ctrl.io_queue(qid, (self.qd + 1).max(32).min(geo.max_queue_entries as u16)).await?);
        }
        let fixed_write = pattern(0, self.bs / geo.block_size, geo.block_size, self.seed);
        let start = Instant::now();
        let mut tasks = Vec::new();
        for (conn, gen) in conns.into_iter().zip(gens) {
            let ctx = QueueCtx {
                geo,
                bs: self.bs,
                qd: self.qd,
                digests: ctrl.opts.digests,
                verify_seed,
                fixed_write: fixed_write.clone(),
                written: Vec::new(),
            };
            tasks.push(tokio::spawn(run_queue(conn, gen, ctx)));
        }
        let mut stats = Vec::new();
        let mut written = Vec::new();
        for t in tasks {
            let (s, w) = t.await.map_err(|e| HostError::Data(format!("queue task failed: {e}")))??;
            stats.push(s);
            written.push(w);
        }
        Ok((stats, written, start.elapsed()))
    }

    /// Runs the workload on `ctrl`'s namespace. I/O queues are opened for the run and closed
    /// after it.
    pub async fn run(&self, ctrl: &mut Controller) -> Result<Report, HostError> {
        let units = self.check(&ctrl.geometry)?;
        let granted = ctrl.set_queue_count(self.queues).await?;
        if granted < self.queues {
            return Err(HostError::Data(format!("the controller granted {granted} I/O queues, {} asked", self.queues)));
        }
        let seed = self.verify.then_some(self.seed | 1);
        let (mut stats, written, elapsed) = self.phase(ctrl, self.gens(units, None), seed).await?;
        let mut verified = 0;
        if self.verify {
            // Read back every unit written, each queue reading what it wrote (sorted, deduplicated).
            let lists: Vec<Vec<u64>> = written
                .into_iter()
                .map(|mut w| {
                    w.sort_unstable();
                    w.dedup();
                    w
                })
                .collect();
            let (rs, _, _) = self.phase(ctrl, self.gens(units, Some(lists)), seed).await?;
            for s in rs {
                verified += s.verified_blocks;
                if s.errors > 0 {
                    return Err(HostError::Data(s.first_error.unwrap_or_else(|| "verify read-back failed".into())));
                }
            }
        }
        let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3).map_err(|e| HostError::Data(e.to_string()))?;
        let (mut reads, mut writes, mut bytes, mut errors) = (0, 0, 0, 0);
        let mut first_error = None;
        for s in stats.drain(..) {
            let _ = hist.add(&s.hist);
            reads += s.reads;
            writes += s.writes;
            bytes += s.bytes;
            errors += s.errors;
            first_error = first_error.or(s.first_error);
        }
        if let Some(e) = first_error.filter(|_| self.verify) {
            return Err(HostError::Data(e));
        }
        let secs = elapsed.as_secs_f64().max(1e-9);
        let us = |ns: u64| ns as f64 / 1000.0;
        let ios = reads + writes;
        Ok(Report {
            ios,
            reads,
            writes,
            bytes,
            seconds: secs,
            iops: ios as f64 / secs,
            mib_per_s: bytes as f64 / secs / (1 << 20) as f64,
            lat_avg_us: hist.mean() / 1000.0,
            lat_p50_us: us(hist.value_at_quantile(0.5)),
            lat_p99_us: us(hist.value_at_quantile(0.99)),
            lat_p999_us: us(hist.value_at_quantile(0.999)),
            lat_max_us: us(hist.max()),
            errors,
            verified_blocks: verified,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pattern_is_self_describing_and_checkable() {
        let p = pattern(100, 4, 512, 7);
        assert_eq!(check_blocks(&p, 100, 512, 7), Ok(4));
        assert!(check_blocks(&p, 101, 512, 7).is_err());
        assert!(check_blocks(&p, 100, 512, 8).is_err());
        let mut bad = p.to_vec();
        bad[1000] ^= 1;
        assert!(check_blocks(&bad, 100, 512, 7).unwrap_err().contains("LBA 101"));
    }

    #[test]
    fn generators_split_ios_and_cover_sequentially() {
        let w = Workload {
            rw: Rw::Write,
            mix_read_pct: 0,
            bs: 4096,
            qd: 4,
            queues: 3,
            duration: None,
            ios: Some(10),
            verify: false,
            range_blocks: None,
            seed: 1,
        };
        let mut gens = w.gens(100, None);
        let mut all: Vec<u64> = gens.iter_mut().flat_map(|g| std::iter::from_fn(move || g.next().map(|(_, u)| u))).collect();
        all.sort_unstable();
        assert_eq!(all, (0..10).collect::<Vec<_>>());
    }

    /// A closed queue returns only once the target has closed its side, by which time the
    /// target has freed the QID (here: set `freed`). The fake target holds the connection open
    /// after the host's close until the test releases it, so a `close_queue` that does not wait
    /// returns with `freed` still unset.
    #[tokio::test]
    async fn closing_a_queue_waits_for_the_target_to_let_it_go() {
        use std::sync::atomic::{AtomicBool, Ordering};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let freed = std::sync::Arc::new(AtomicBool::new(false));
        let target_freed = freed.clone();
        let (eof_tx, eof_rx) = tokio::sync::oneshot::channel();
        let (release_tx, release_rx) = tokio::sync::oneshot::channel::<()>();
        let target = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut b = [0u8; 64];
            while s.read(&mut b).await.unwrap() > 0 {}
            eof_tx.send(()).unwrap();
            release_rx.await.unwrap();
            target_freed.store(true, Ordering::SeqCst);
        });
        let stream = TcpStream::connect(addr).await.unwrap();
        let closing = tokio::spawn(close_queue(stream));
        eof_rx.await.unwrap();
        release_tx.send(()).unwrap();
        closing.await.unwrap();
        assert!(freed.load(Ordering::SeqCst), "close_queue returned before the target closed the connection");
        target.await.unwrap();
    }
}
