//! One target: a shard of storage with its own data file, WAL and checkpoints.
//!
//! A target is driven by one thread (`worker.rs`) plus a sync thread. This file owns the
//! target's state, opening it and *staging* mutations ([`Target::stage`]): validated,
//! checksummed, given freshly allocated blocks (never live data) and their ops queued. The rest
//! lives beside it:
//! - `target/commit.rs`: group commit in two halves (write, then sync on the sync thread), so the
//!   target keeps staging while a commit syncs; only after it is applied may the caller
//!   acknowledge the batch;
//! - `target/read.rs`: fetches, verifying stored CRC64s;
//! - `target/scrub.rs`: bounded scrub steps and repair fences;
//! - `target/aggregate.rs`: folding old versions, freeing blocks;
//! - `target/destage.rs`: moving small updates' data from the WAL to the data file;
//! - `target/checkpoint_job.rs`: background checkpoints and retiring WAL segments;
//! - `target/recovery.rs`: loading the newest valid checkpoint and replaying the WAL after it
//!   ([`Target::open`] then rebuilds the allocator from the blocks the index references).

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap};
use std::fmt::Write as _;
use std::ops::Range;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tracing::{info, warn};

use crate::alloc::Allocator;
use crate::backend::{AlignedBuf, Storage, StorageFile};
use crate::checkpoint::{self, checkpoint_name, parse_checkpoint_name};
use crate::csum::{chunk_csums, crc64};
use crate::index::{subtract, Index, ItemKey, Retention, Source, Version};
use crate::op::{encode_ops, AkeyPath, Extent, Loc, Op, PunchLevel, Stored};
use crate::wal::{parse_segment_name, scan_segment, segment_name, WalWriter};
use crate::{EngineError, BLOCK};

mod aggregate;
mod checkpoint_job;
mod commit;
mod destage;
mod read;
mod recovery;
mod scrub;
mod snapshots;
mod stable;
mod usage;

use aggregate::freed_blocks;
use checkpoint_job::CheckpointJob;
pub use checkpoint_job::CHECKPOINT_SEGMENTS;
pub use commit::SyncJob;
pub use read::FetchedArray;
use recovery::{load_checkpoint, read_whole, replay_wal};
use scrub::decode_fences;
pub use scrub::{BadExtent, Fence, ScrubCursor, ScrubStep};
pub use snapshots::Snapshots;
pub use usage::{container_usage, ContainerUsage, USAGE_EVERY};

/// Name of the data file in a target's directory.
pub const DATA_FILE: &str = "data.blk";
/// Name of the file listing the dkeys being repaired by scrub ([`Target::set_fence`]).
pub const FENCE_FILE: &str = "repair-fences";
/// Most stored values one scrub step looks at, whatever their size (inline values cost no
/// read, but still CPU on the target thread).
pub const SCRUB_STEP_ITEMS: usize = 4096;
/// Largest value one update or fetch may carry.
pub const MAX_IO: u64 = 16 << 20;
/// Longest key.
pub const KEY_MAX: usize = 255;
/// Largest encoded ops of one discard (its WAL record): a discard that would delete more is
/// refused with [`EngineError::TooLarge`] (discard dkey by dkey then). 64 MiB is about 2.5
/// million extent versions, a quarter of the WAL's record limit.
pub const DISCARD_MAX_BYTES: usize = 64 << 20;

/// Per-target settings.
#[derive(Debug, Clone)]
pub struct TargetConfig {
    /// Size of the data file in bytes (rounded down to 4 KiB).
    pub capacity: u64,
    /// Values of at most this many bytes live in the metadata instead of the data file.
    pub inline_max: u64,
    /// Array updates of at most this many bytes (and more than `inline_max`) go into their WAL
    /// record first, so that committing them costs one device flush (the WAL's), and are
    /// written to the data file later, many per data sync ([`Target::destage_step`]). 0: never.
    pub wal_data_max: u64,
    /// Destage once this many bytes wait in the metadata for the data file.
    pub destage_bytes: u64,
    /// Start a checkpoint once this many bytes of WAL were written since the last one.
    pub checkpoint_wal_bytes: u64,
    /// WAL segments are preallocated to this many bytes (a record that does not fit in the open
    /// segment starts a new one).
    pub wal_segment_bytes: u64,
    /// When a container sets no aggregation epoch, aggregate versions older than "now" minus
    /// this many epoch units (epochs are HLC nanoseconds).
    pub aggregation_lag: u64,
    /// Akeys examined per aggregation step.
    pub aggregation_budget: usize,
    /// Host updates and punches whose epoch is more than this many epoch units (nanoseconds)
    /// older than the target's clock are refused (`target/stable.rs`). 0: none are.
    pub commit_window: u64,
    /// The engine follows a management service, which retains snapshots: aggregate nothing
    /// until [`Target::set_snapshots`] says which (`target/snapshots.rs`).
    pub follows_service: bool,
    /// The engine's EC aggregator settles torn stripes: aggregate nothing until it has said how
    /// far each EC volume is settled ([`Target::settle_ec`], `target/snapshots.rs`).
    pub ec_settled_by_engine: bool,
}

impl Default for TargetConfig {
    fn default() -> Self {
        Self {
            capacity: 1 << 30,
            inline_max: 512,
            wal_data_max: 32 << 10,
            destage_bytes: 16 << 20,
            checkpoint_wal_bytes: 64 << 20,
            wal_segment_bytes: 16 << 20,
            aggregation_lag: Duration::from_secs(5).as_nanos() as u64,
            aggregation_budget: 256,
            commit_window: Duration::from_secs(2).as_nanos() as u64,
            follows_service: false,
            ec_settled_by_engine: false,
        }
    }
}

pub use tessera_engine_proto::{PunchTarget, UpdateValue};

/// A change requested by a client.
#[derive(Debug, Clone)]
pub enum Mutation {
    Update {
        path: AkeyPath,
        epoch: u64,
        value: UpdateValue,
    },
    Punch {
        cont: u128,
        obj: u128,
        epoch: u64,
        what: PunchTarget,
    },
    SetRetention {
        cont: u128,
        retention: Retention,
    },
    /// Delete every version of the object (or only of `dkey`) with an epoch above `above` and
    /// below `below` ([`Index::plan_discard`]). Planned from the committed index, so it must be
    /// staged when nothing else is.
    Discard {
        cont: u128,
        obj: u128,
        above: u64,
        below: u64,
        dkey: Option<Bytes>,
    },
}

/// What a staged mutation reports once its batch is committed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Staged {
    /// An update, punch or retention change.
    Done,
    /// A discard, and the number of versions it deletes.
    Discarded { versions: u64 },
}

/// Health of a target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    Healthy,
    /// An I/O failure: reads work, updates are refused until restart.
    Failed,
}

/// Counters and sizes reported by a target query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetInfo {
    pub capacity: u64,
    pub used: u64,
    pub health: Health,
    pub objects: u64,
    pub wal_seq: u64,
    pub checkpoint_seq: u64,
    /// [`Target::stable_epoch`] (not on the wire: the engine's heartbeat reports the lowest).
    pub stable_epoch: u64,
}

/// One target.
#[derive(Debug)]
pub struct Target {
    storage: Arc<dyn Storage>,
    data: Arc<dyn StorageFile>,
    wal: WalWriter,
    index: Index,
    alloc: Allocator,
    cfg: TargetConfig,
    staged: Vec<Op>,
    staged_paths: Vec<AkeyPath>,
    /// Data of staged updates, written at commit: (byte offset in the data file, bytes).
    pending_writes: Vec<(u64, Bytes)>,
    /// Where a commit assembles its data-file writes (aligned for `O_DIRECT`, kept between commits).
    write_buf: AlignedBuf,
    /// Data written ahead of its commit ([`Target::write_staged_data`]), not yet synced.
    data_unsynced: bool,
    /// The commit between [`Target::commit_start`] and [`Target::commit_finish`].
    in_flight: Option<commit::InFlight>,
    /// Akeys that may hold versions to aggregate.
    dirty: BTreeSet<AkeyPath>,
    /// Akeys holding versions above the boundary, by the oldest such epoch.
    deferred: BinaryHeap<Reverse<(u64, AkeyPath)>>,
    failed: Option<String>,
    /// Dkeys being repaired: fetches of them fail (see [`Fence`]). Kept in [`FENCE_FILE`].
    fences: BTreeSet<Fence>,
    checkpoint_job: Option<CheckpointJob>,
    /// Newest checkpoint known complete (the one before it is kept on disk as a fallback).
    checkpoint_seq: u64,
    /// Bytes of WAL records written since the last checkpoint started, across segments,
    /// including what the last start replayed: a checkpoint starts at `checkpoint_wal_bytes`.
    wal_backlog: u64,
    /// Segments holding records since the last checkpoint started, the open one included: a
    /// checkpoint starts at [`CHECKPOINT_SEGMENTS`].
    wal_segments: u64,
    /// Akeys whose array extents wait in the metadata for the data file, with the blocks kept
    /// free for them and their bytes (committed; see [`TargetConfig::wal_data_max`]).
    destage: BTreeMap<AkeyPath, (u64, u64)>,
    /// Blocks kept free for `destage`.
    destage_blocks: u64,
    /// Bytes waiting in `destage`.
    destage_pending_bytes: u64,
    /// The same for what is staged, not yet committed: (akey, blocks, bytes).
    destage_staged: Vec<(AkeyPath, u64, u64)>,
    /// The commit window's floor and the stable epoch.
    epochs: stable::StableEpoch,
    /// The service's snapshots, when the target follows a management service
    /// ([`TargetConfig::follows_service`]).
    snapshots: Option<Arc<Snapshots>>,
    /// How far the engine's EC aggregator has settled each EC volume's torn stripes
    /// ([`TargetConfig::ec_settled_by_engine`]).
    ec_settled: Option<snapshots::EcSettled>,
    /// Space per container ([`Target::usage`]).
    usage: usage::UsageCache,
    /// Longest pause a checkpoint imposed on the target thread.
    pub max_checkpoint_pause: Duration,
    /// Group commit counters since start.
    pub stats: CommitStats,
}

/// Group commit counters: each commit is one data sync, one WAL record and one WAL sync.
#[derive(Debug, Clone, Copy, Default)]
pub struct CommitStats {
    /// WAL records written.
    pub commits: u64,
    /// Index ops they carried (an update split over several free runs counts once per run).
    pub ops: u64,
    /// Bytes moved from the metadata to the data file by destage steps.
    pub destaged: u64,
}

/// Reserves the file system's space for the whole data file, so that a full file system is an
/// error when the target is created, not a failed write (which fails the target) in the middle
/// of a host's workload. A new target that cannot have its space is refused; an existing one
/// (perhaps created sparse by an earlier version) is opened with a warning, its file extended
/// sparse where it is short.
fn reserve_data_file(data: &dyn StorageFile, bytes: u64, existed: bool) -> Result<(), EngineError> {
    match data.reserve(bytes) {
        Ok(()) => Ok(()),
        Err(e) if !existed => Err(EngineError::NoSpace(format!(
            "{DATA_FILE}: cannot reserve {} MiB for the target's capacity: {e} (free space, or a smaller target_capacity)",
            bytes >> 20
        ))),
        Err(e) => {
            warn!(error = %e, bytes, "cannot reserve the data file's space; it stays sparse and writes may fail when the file system fills");
            data.grow_to(bytes).map_err(|e| EngineError::io(DATA_FILE, e))
        }
    }
}

fn invalid(msg: impl Into<String>) -> EngineError {
    EngineError::Invalid(msg.into())
}

fn check_key(what: &str, key: &Bytes) -> Result<(), EngineError> {
    if key.len() > KEY_MAX {
        return Err(invalid(format!("{what} is {} bytes, at most {KEY_MAX}", key.len())));
    }
    Ok(())
}

impl Target {
    /// Opens (recovering) or creates the target stored in `storage`.
    pub fn open(storage: Arc<dyn Storage>, cfg: TargetConfig) -> Result<Self, EngineError> {
        let follows_service = cfg.follows_service;
        let cfg_ec_settled = cfg.ec_settled_by_engine;
        let names = storage.list().map_err(|e| EngineError::io(".", e))?;
        for tmp in names.iter().filter(|n| n.ends_with(".tmp")) {
            storage.remove(tmp).map_err(|e| EngineError::io(tmp, e))?;
        }
        let (mut index, ckpt_seq) = load_checkpoint(storage.as_ref(), &names)?;
        let replayed = replay_wal(storage.as_ref(), &names, &mut index, ckpt_seq)?;
        let last_seq = replayed.last;
        let total_blocks = cfg.capacity / BLOCK;
        let data_existed = names.iter().any(|n| n == DATA_FILE);
        let referenced = index.referenced_blocks();
        if !data_existed && !referenced.is_empty() {
            return Err(EngineError::Corrupt { file: DATA_FILE.into(), reason: "missing, but the index references data in it".into() });
        }
        let alloc =
            Allocator::rebuild(total_blocks, &referenced).map_err(|reason| EngineError::Corrupt { file: DATA_FILE.into(), reason })?;
        let data = storage.open(DATA_FILE, true).map_err(|e| EngineError::io(DATA_FILE, e))?;
        if let Err(e) = reserve_data_file(data.as_ref(), total_blocks * BLOCK, data_existed) {
            // Not left behind half made: the next start must try to reserve it again.
            if !data_existed {
                let _ = storage.remove(DATA_FILE);
            }
            return Err(e);
        }
        let wal = WalWriter::create(storage.clone(), last_seq + 1, cfg.wal_segment_bytes)?;
        let fences = if names.iter().any(|n| n == FENCE_FILE) {
            let text = read_whole(storage.as_ref(), FENCE_FILE)?;
            let text =
                std::str::from_utf8(&text).map_err(|_| EngineError::Corrupt { file: FENCE_FILE.into(), reason: "not UTF-8".into() })?;
            decode_fences(text).map_err(|reason| EngineError::Corrupt { file: FENCE_FILE.into(), reason })?
        } else {
            BTreeSet::new()
        };
        if !fences.is_empty() {
            warn!(dkeys = fences.len(), "target has repairs that did not finish; their dkeys are read from redundancy until repaired");
        }
        let dirty = index.akey_paths().into_iter().collect();
        if last_seq > 0 {
            info!(
                checkpoint = ckpt_seq,
                wal_seq = last_seq,
                wal_bytes = replayed.bytes,
                wal_segments = replayed.segments,
                objects = index.object_count(),
                "target recovered"
            );
        }
        let mut t = Self {
            storage,
            data,
            wal,
            index,
            alloc,
            cfg,
            staged: Vec::new(),
            staged_paths: Vec::new(),
            pending_writes: Vec::new(),
            write_buf: AlignedBuf::default(),
            data_unsynced: false,
            in_flight: None,
            dirty,
            deferred: BinaryHeap::new(),
            failed: None,
            fences,
            checkpoint_job: None,
            checkpoint_seq: ckpt_seq,
            wal_backlog: replayed.bytes,
            wal_segments: replayed.segments + 1,
            destage: BTreeMap::new(),
            destage_blocks: 0,
            destage_pending_bytes: 0,
            destage_staged: Vec::new(),
            epochs: stable::StableEpoch::default(),
            snapshots: follows_service.then(|| Arc::new(Snapshots::default())),
            usage: usage::UsageCache::default(),
            ec_settled: cfg_ec_settled.then(snapshots::EcSettled::default),
            max_checkpoint_pause: Duration::ZERO,
            stats: CommitStats::default(),
        };
        t.find_waiting_extents();
        for cont in t.index.containers.keys() {
            t.usage.touch(*cont);
        }
        Ok(t)
    }

    /// The index (tests and enumeration).
    pub fn index(&self) -> &Index {
        &self.index
    }

    fn check_healthy(&self) -> Result<(), EngineError> {
        match &self.failed {
            Some(reason) => Err(EngineError::Failed(reason.clone())),
            None => Ok(()),
        }
    }

    fn fail(&mut self, err: &EngineError) {
        if self.failed.is_none() {
            warn!(error = %err, "target failed: refusing updates until restart");
            self.failed = Some(err.to_string());
        }
    }

    /// Validates a mutation, writes its data and queues its ops for the next commit.
    pub fn stage(&mut self, m: Mutation) -> Result<Staged, EngineError> {
        self.check_healthy()?;
        match m {
            Mutation::Update { path, epoch, value } => self.stage_update(path, epoch, value).map(|()| Staged::Done),
            Mutation::Punch { cont, obj, epoch, what } => self.stage_punch(cont, obj, epoch, what).map(|()| Staged::Done),
            Mutation::SetRetention { cont, mut retention } => {
                retention.retained.sort_unstable();
                retention.retained.dedup();
                self.staged.push(Op::Retention { cont, retention });
                Ok(Staged::Done)
            }
            Mutation::Discard { cont, obj, above, below, dkey } => self.stage_discard(cont, obj, above..below, dkey),
        }
    }

    /// Plans a discard from the index and stages its ops (`Aggregate` and `Unpunch`, as
    /// aggregation writes them), quarantining the blocks it frees until its record is durable.
    /// The plan is only right if every earlier mutation is in the index, so nothing may be
    /// staged yet; mutations staged after it are applied after it.
    fn stage_discard(&mut self, cont: u128, obj: u128, epochs: Range<u64>, dkey: Option<Bytes>) -> Result<Staged, EngineError> {
        if let Some(d) = &dkey {
            check_key("dkey", d)?;
        }
        if !self.settled() {
            return Err(invalid("a discard is planned from the committed index: commit the staged mutations first"));
        }
        let (ops, versions) = self.index.plan_discard(cont, obj, epochs, dkey.as_ref());
        let bytes = encode_ops(&ops).len();
        if bytes > DISCARD_MAX_BYTES {
            return Err(EngineError::TooLarge(format!(
                "discarding {versions} versions takes {bytes} bytes of WAL, more than {DISCARD_MAX_BYTES}: discard dkey by dkey"
            )));
        }
        for op in &ops {
            for (start, n) in freed_blocks(&self.index, op) {
                self.alloc.quarantine(start, n);
            }
        }
        self.staged.extend(ops);
        Ok(Staged::Discarded { versions })
    }

    fn stage_update(&mut self, path: AkeyPath, epoch: u64, value: UpdateValue) -> Result<(), EngineError> {
        check_key("dkey", &path.dkey)?;
        check_key("akey", &path.akey)?;
        let data = match &value {
            UpdateValue::Array { data, .. } | UpdateValue::Single { data, .. } => data,
        };
        if data.is_empty() || data.len() as u64 > MAX_IO {
            return Err(invalid(format!("value of {} bytes: must be 1..={MAX_IO}", data.len())));
        }
        match value {
            UpdateValue::Array { offset, data, csums } => {
                offset.checked_add(data.len() as u64).ok_or_else(|| invalid("offset + length overflows"))?;
                if csums.len() != data.len().div_ceil(BLOCK as usize) {
                    return Err(invalid(format!("{} checksums for {} bytes: need one per 4 KiB", csums.len(), data.len())));
                }
                if let Some(chunk) = data.chunks(BLOCK as usize).zip(&csums).position(|(c, sum)| crc64(c) != *sum) {
                    return Err(EngineError::ChecksumMismatch { chunk });
                }
                let version = Version { epoch, id: self.index.allocate_id() };
                for (piece_off, stored) in self.store(&data, csums)? {
                    if matches!(stored.loc, Loc::Inline(_)) && stored.len > self.cfg.inline_max {
                        self.destage_staged.push((path.clone(), stored.len.div_ceil(BLOCK), stored.len));
                    }
                    let ext = Extent { offset: offset + piece_off, len: stored.len, version, data: Some(stored) };
                    self.staged.push(Op::Extent { path: path.clone(), ext });
                }
            }
            UpdateValue::Single { data, csum } => {
                if crc64(&data) != csum {
                    return Err(EngineError::ChecksumMismatch { chunk: 0 });
                }
                let csums = chunk_csums(&data);
                let version = Version { epoch, id: self.index.allocate_id() };
                let value = self.store_contiguous(&data, csums)?;
                self.staged.push(Op::Single { path: path.clone(), version, value });
            }
        }
        self.staged_paths.push(path);
        Ok(())
    }

    /// Stores a value inline or in the data file, split at 4 KiB boundaries over several free
    /// runs if no single run is large enough. Returns (offset in the value, stored piece).
    fn store(&mut self, data: &Bytes, csums: Vec<u64>) -> Result<Vec<(u64, Stored)>, EngineError> {
        self.store_via(data, csums, true)
    }

    /// [`Target::store`]; `via_wal`: a value up to `wal_data_max` may wait in the metadata.
    fn store_via(&mut self, data: &Bytes, csums: Vec<u64>, via_wal: bool) -> Result<Vec<(u64, Stored)>, EngineError> {
        let len = data.len() as u64;
        // Kept in the metadata: copied out of the received frame, whose buffer it would pin.
        let inline = |data: &Bytes, csums| Ok(vec![(0, Stored { loc: Loc::Inline(Bytes::copy_from_slice(data)), len, csums })]);
        if len <= self.cfg.inline_max {
            return inline(data, csums);
        }
        let blocks = len.div_ceil(BLOCK);
        let free = self.free_blocks();
        if free < blocks {
            return Err(EngineError::NoSpace(format!("{blocks} blocks needed, {free} free")));
        }
        if via_wal && len <= self.cfg.wal_data_max {
            // Into the WAL record now, into the data file later (its blocks are kept free).
            return inline(data, csums);
        }
        let mut pieces = Vec::new();
        let mut done = 0u64;
        while done < blocks {
            let n = (blocks - done).min(self.alloc.largest_free());
            let start = match self.alloc.alloc(n) {
                Some(s) if n > 0 => s,
                _ => {
                    for (_, p) in &pieces {
                        self.release_stored(p);
                    }
                    return Err(EngineError::NoSpace("free space is fragmented".into()));
                }
            };
            let from = done * BLOCK;
            let to = ((done + n) * BLOCK).min(len);
            let piece_csums = csums.get(done as usize..(done + n) as usize).map(<[u64]>::to_vec).unwrap_or_default();
            let stored = Stored { loc: Loc::Blocks { start }, len: to - from, csums: piece_csums };
            self.pending_writes.push((start * BLOCK, data.slice(from as usize..to as usize)));
            pieces.push((from, stored));
            done += n;
        }
        Ok(pieces)
    }

    /// Blocks free for new data: not allocated and not kept for extents waiting to be destaged.
    fn free_blocks(&self) -> u64 {
        let in_flight = self.in_flight.iter().flat_map(|f| &f.destage);
        let kept = self.destage_blocks + self.destage_staged.iter().chain(in_flight).map(|d| d.1).sum::<u64>();
        (self.alloc.total() - self.alloc.used()).saturating_sub(kept)
    }

    /// Like [`Target::store`] but in one piece (single values are not split).
    fn store_contiguous(&mut self, data: &Bytes, csums: Vec<u64>) -> Result<Stored, EngineError> {
        let blocks = (data.len() as u64).div_ceil(BLOCK);
        if data.len() as u64 > self.cfg.inline_max && self.alloc.largest_free() < blocks {
            return Err(EngineError::NoSpace(format!("no free run of {blocks} blocks")));
        }
        let mut pieces = self.store_via(data, csums, false)?;
        pieces.pop().map(|(_, s)| s).ok_or_else(|| invalid("empty value"))
    }

    fn release_stored(&mut self, s: &Stored) {
        if let Some((start, n)) = s.blocks() {
            self.alloc.release(start, n);
        }
    }

    fn stage_punch(&mut self, cont: u128, obj: u128, epoch: u64, what: PunchTarget) -> Result<(), EngineError> {
        let version = Version { epoch, id: self.index.allocate_id() };
        let op = match what {
            PunchTarget::Object => Op::Punch { cont, obj, level: PunchLevel::Object, version },
            PunchTarget::Dkey(d) => {
                check_key("dkey", &d)?;
                Op::Punch { cont, obj, level: PunchLevel::Dkey(d), version }
            }
            PunchTarget::Akey { dkey, akey } => {
                check_key("dkey", &dkey)?;
                check_key("akey", &akey)?;
                self.staged_paths.push(AkeyPath { cont, obj, dkey: dkey.clone(), akey: akey.clone() });
                Op::Punch { cont, obj, level: PunchLevel::Akey(dkey, akey), version }
            }
            PunchTarget::Range { dkey, akey, offset, len } => {
                check_key("dkey", &dkey)?;
                check_key("akey", &akey)?;
                if len == 0 || offset.checked_add(len).is_none() {
                    return Err(invalid("punch range is empty or overflows"));
                }
                let path = AkeyPath { cont, obj, dkey, akey };
                self.staged_paths.push(path.clone());
                Op::Extent { path, ext: Extent { offset, len, version, data: None } }
            }
        };
        if let Op::Punch { level: PunchLevel::Object | PunchLevel::Dkey(_), .. } = &op {
            self.mark_object_dirty(cont, obj);
        }
        self.staged.push(op);
        Ok(())
    }

    fn mark_object_dirty(&mut self, cont: u128, obj: u128) {
        let paths = self.index.object_akey_paths(cont, obj);
        self.dirty.extend(paths);
    }

    /// Whether mutations are waiting for [`Target::commit`].
    pub fn has_staged(&self) -> bool {
        !self.staged.is_empty()
    }

    /// Capacity, usage and progress counters.
    pub fn info(&self) -> TargetInfo {
        TargetInfo {
            capacity: self.alloc.total() * BLOCK,
            used: self.alloc.used() * BLOCK,
            health: if self.failed.is_some() { Health::Failed } else { Health::Healthy },
            objects: self.index.object_count(),
            wal_seq: self.wal.next_seq() - 1,
            checkpoint_seq: self.checkpoint_seq,
            stable_epoch: self.stable_epoch(),
        }
    }

    /// Commits, finishes any checkpoint and writes a final one (graceful shutdown).
    pub fn shutdown(&mut self) -> Result<(), EngineError> {
        self.commit()?;
        // What waits in the metadata goes to the data file first: a smaller final checkpoint.
        self.destage_step(u64::MAX)?;
        let s = self.stats;
        info!(
            wal_records = s.commits,
            ops = s.ops,
            ops_per_record = format!("{:.1}", s.ops as f64 / s.commits.max(1) as f64),
            max_checkpoint_pause_us = self.max_checkpoint_pause.as_micros() as u64,
            "group commit summary"
        );
        self.reap_checkpoint(true)?;
        self.maybe_checkpoint(true)?;
        self.reap_checkpoint(true)
    }
}

impl Stored {
    fn loc_summary(&self) -> String {
        match self.loc {
            Loc::Blocks { start } => format!("data file block {start}"),
            Loc::Inline(_) => "inline".into(),
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::backend::MemStorage;

    pub(crate) fn small() -> TargetConfig {
        TargetConfig {
            capacity: 8 * BLOCK,
            inline_max: 512,
            wal_data_max: 0,
            destage_bytes: 16 << 20,
            checkpoint_wal_bytes: 1 << 40,
            wal_segment_bytes: 64 << 10,
            aggregation_lag: 0,
            aggregation_budget: 64,
            commit_window: 0,
            follows_service: false,
            ec_settled_by_engine: false,
        }
    }

    /// A data file on a full file system: it cannot be reserved, nor extended.
    #[derive(Debug)]
    struct FullFs;

    impl StorageFile for FullFs {
        fn read_at(&self, _: &mut [u8], _: u64) -> std::io::Result<()> {
            Err(std::io::ErrorKind::UnexpectedEof.into())
        }
        fn write_at(&self, _: &[u8], _: u64) -> std::io::Result<()> {
            Err(std::io::ErrorKind::StorageFull.into())
        }
        fn sync(&self) -> std::io::Result<()> {
            Ok(())
        }
        fn len(&self) -> std::io::Result<u64> {
            Ok(0)
        }
        fn set_len(&self, _: u64) -> std::io::Result<()> {
            Ok(())
        }
        fn reserve(&self, _: u64) -> std::io::Result<()> {
            Err(std::io::ErrorKind::StorageFull.into())
        }
    }

    #[test]
    fn a_new_target_without_room_for_its_capacity_is_refused_clearly() {
        let e = reserve_data_file(&FullFs, 64 << 20, false).unwrap_err();
        assert!(matches!(&e, EngineError::NoSpace(m) if m.contains("cannot reserve 64 MiB")), "{e}");
        // An existing target still opens (sparse, with a warning): its data stays readable.
        reserve_data_file(&FullFs, 64 << 20, true).unwrap();
    }

    pub(crate) fn p(dkey: &'static [u8], akey: &'static [u8]) -> AkeyPath {
        AkeyPath { cont: 1, obj: 7, dkey: Bytes::from_static(dkey), akey: Bytes::from_static(akey) }
    }

    fn array(path: AkeyPath, epoch: u64, len: usize, fill: u8) -> Mutation {
        Mutation::Update { path, epoch, value: UpdateValue::array(0, Bytes::from(vec![fill; len])) }
    }

    fn discard(above: u64, dkey: Option<&'static [u8]>) -> Mutation {
        Mutation::Discard { cont: 1, obj: 7, above, below: u64::MAX, dkey: dkey.map(Bytes::from_static) }
    }

    /// (data byte 0 or 0 for a hole, hole count) of the first 8 KiB of an array akey at `epoch`.
    fn read(t: &Target, path: &AkeyPath, epoch: u64) -> (u8, usize) {
        let f = t.fetch_array(path, 0, 8192, epoch).unwrap();
        (f.data[0], f.holes.len())
    }

    /// What the tests below expect after the discard above 15: the epoch-10 data of "d"/"a"
    /// visible again, the single value and "e" gone, 2 blocks in use.
    fn check_discarded(t: &Target, what: &str) {
        assert_eq!(read(t, &p(b"d", b"a"), u64::MAX), (1, 0), "{what}");
        assert_eq!(t.fetch_single(&p(b"d", b"s"), u64::MAX).unwrap(), None, "{what}");
        assert_eq!(read(t, &p(b"e", b"a"), u64::MAX), (0, 1), "{what}");
        assert!(t.index().akey(&p(b"e", b"a")).is_none(), "{what}");
        assert_eq!(t.info().used, 2 * BLOCK, "{what}");
        assert_eq!(t.info().objects, 1, "{what}");
    }

    #[test]
    fn small_updates_commit_in_the_wal_and_are_destaged_to_the_data_file() {
        let mem = MemStorage::new();
        let cfg = TargetConfig { capacity: 16 * BLOCK, wal_data_max: 32 << 10, ..small() };
        let mut t = Target::open(Arc::new(mem.clone()), cfg.clone()).unwrap();
        let zeros = |m: &MemStorage| m.contents(DATA_FILE).unwrap().iter().all(|&b| b == 0);
        let loc = |t: &Target, path: &AkeyPath| {
            t.index().akey(path).unwrap().extents.values().map(|b| b.data.as_ref().unwrap().loc_summary()).collect::<Vec<_>>()
        };
        // 3 × 8 KiB in the WAL: nothing in the data file, but their 6 blocks are kept free.
        for (i, a) in [b"a", b"b", b"c"].into_iter().enumerate() {
            t.stage(array(p(b"d", a), 10, 8192, i as u8 + 1)).unwrap();
        }
        t.commit().unwrap();
        assert!(zeros(&mem));
        assert_eq!(loc(&t, &p(b"d", b"a")), ["inline"]);
        assert_eq!((t.destage_waiting_bytes(), t.free_blocks()), (3 * 8192, 10));
        let too_big = t.stage(array(p(b"e", b"a"), 10, 11 * BLOCK as usize, 9));
        assert!(matches!(too_big, Err(EngineError::NoSpace(_))), "{too_big:?}");
        // A power cut now keeps them (in the WAL), still waiting.
        let t2 = Target::open(Arc::new(mem.crash_image(false)), cfg.clone()).unwrap();
        assert_eq!((read(&t2, &p(b"d", b"b"), 10), t2.destage_waiting_bytes(), t2.free_blocks()), ((2, 0), 3 * 8192, 10));
        drop(t2);
        // One destage step moves whole akeys until it has moved at least what it was asked.
        assert_eq!(t.destage_step(1).unwrap(), 8192);
        assert_eq!(loc(&t, &p(b"d", b"a")), ["data file block 0"]);
        assert_eq!(t.destage_step(u64::MAX).unwrap(), 2 * 8192);
        assert!(!t.destage_pending() && !zeros(&mem));
        assert_eq!((t.info().used, t.free_blocks()), (6 * BLOCK, 10));
        // The moves are durable: after a power cut the data comes from the data file.
        let t3 = Target::open(Arc::new(mem.crash_image(false)), cfg).unwrap();
        assert_eq!(read(&t3, &p(b"d", b"c"), 10), (3, 0));
        assert_eq!(loc(&t3, &p(b"d", b"c")), ["data file block 4"]);
        assert!(!t3.destage_pending());
    }

    #[test]
    fn wal_and_replay_stay_bounded_over_repeated_crashes() {
        // Light load and a power cut after every few commits, never a graceful shutdown: the
        // WAL's size alone would never reach `checkpoint_wal_bytes`, but every start opens a
        // segment, and the segment count starts a checkpoint.
        let cfg = TargetConfig { capacity: 512 * BLOCK, ..small() };
        let mut mem = MemStorage::new();
        let mut most_segments = 0;
        for round in 0..40u64 {
            let mut t = Target::open(Arc::new(mem.clone()), cfg.clone()).unwrap();
            for i in 0..3 {
                t.stage(array(p(b"d", b"a"), 100 + round * 10 + i, 4096, round as u8)).unwrap();
                t.commit().unwrap();
                // What the target thread does between batches.
                t.maybe_checkpoint(false).unwrap();
            }
            t.reap_checkpoint(true).unwrap();
            let segments = mem.list().unwrap().iter().filter(|n| parse_segment_name(n).is_some()).count();
            most_segments = most_segments.max(segments);
            assert_eq!(read(&t, &p(b"d", b"a"), u64::MAX).0, round as u8);
            mem = mem.crash_image(false);
        }
        // The segments of the last checkpoint's window and the one before it, never one per start.
        // (40 starts: without the segment trigger there would be 40.)
        assert!(most_segments <= 8, "{most_segments} WAL segments");
        let t = Target::open(Arc::new(mem.clone()), cfg).unwrap();
        assert!(t.wal_segments <= 4, "replayed {} segments", t.wal_segments - 1);
        assert_eq!(read(&t, &p(b"d", b"a"), u64::MAX).0, 39);
    }

    #[test]
    fn an_empty_fetch_is_invalid_and_an_oversized_one_too_large() {
        let t = Target::open(Arc::new(MemStorage::new()), small()).unwrap();
        assert!(matches!(t.fetch_array(&p(b"d", b"a"), 0, 0, u64::MAX), Err(EngineError::Invalid(_))));
        let too_large = t.fetch_array(&p(b"d", b"a"), 0, MAX_IO + 1, u64::MAX).unwrap_err();
        assert!(matches!(too_large, EngineError::TooLarge(_)));
        // On the wire (docs/ENGINE-RPC.md, status 10).
        assert_eq!(crate::server::error_reply(&too_large).0, tessera_engine_proto::RpcStatus::TooLarge);
        assert!(matches!(t.fetch_versions(&[p(b"d", b"a")], 0, MAX_IO + 1, u64::MAX), Err(EngineError::TooLarge(_))));
        assert_eq!(t.fetch_array(&p(b"d", b"a"), 0, MAX_IO, u64::MAX).unwrap().data.len() as u64, MAX_IO);
    }

    #[test]
    fn discard_is_durable_frees_blocks_only_once_committed_and_replays() {
        let mem = MemStorage::new();
        let mut t = Target::open(Arc::new(mem.clone()), small()).unwrap();
        // 7 of 8 blocks: "d"/"a" at 10 and at 20 (2 each), a 5000-byte single value at 20 (2),
        // "e"/"a" at 20 (1); then an object punch at 25.
        for m in [
            array(p(b"d", b"a"), 10, 8192, 1),
            array(p(b"d", b"a"), 20, 8192, 2),
            Mutation::Update { path: p(b"d", b"s"), epoch: 20, value: UpdateValue::single(Bytes::from(vec![3u8; 5000])) },
            array(p(b"e", b"a"), 20, 4096, 4),
            Mutation::Punch { cont: 1, obj: 7, epoch: 25, what: PunchTarget::Object },
        ] {
            assert_eq!(t.stage(m).unwrap(), Staged::Done);
        }
        t.commit().unwrap();
        assert_eq!(read(&t, &p(b"d", b"a"), 24), (2, 0));
        assert_eq!(read(&t, &p(b"d", b"a"), u64::MAX), (0, 1));
        assert_eq!(t.info().used, 7 * BLOCK);

        // A discard must see every earlier mutation in the index: not staged behind another.
        t.stage(array(p(b"f", b"a"), 30, 10, 9)).unwrap();
        assert!(matches!(t.stage(discard(15, None)), Err(EngineError::Invalid(_))));
        t.commit().unwrap();

        // Above 15: the three updates at 20, the object punch at 25 and the update at 30.
        assert_eq!(t.stage(discard(15, None)).unwrap(), Staged::Discarded { versions: 5 });
        // Staged, not committed: nothing changed yet, and the freed blocks are quarantined.
        assert_eq!(read(&t, &p(b"d", b"a"), 24), (2, 0));
        assert_eq!(t.info().used, 7 * BLOCK);
        assert!(matches!(t.stage(array(p(b"g", b"a"), 40, 8192, 5)), Err(EngineError::NoSpace(_))));
        // A crash now loses the discard entirely.
        let before_commit = mem.crash_image(true);
        t.commit().unwrap();
        check_discarded(&t, "committed");
        // The freed blocks are reusable once the record is durable (and the update is not yet
        // in the index, so a discard cannot follow it into this commit).
        t.stage(array(p(b"g", b"a"), 40, 8192, 5)).unwrap();
        assert!(matches!(t.stage(discard(0, Some(b"g"))), Err(EngineError::Invalid(_))));
        t.commit().unwrap();
        assert_eq!(t.stage(discard(0, Some(b"g"))).unwrap(), Staged::Discarded { versions: 1 });
        t.commit().unwrap();
        assert_eq!(t.stage(discard(15, None)).unwrap(), Staged::Discarded { versions: 0 });
        assert!(!t.has_staged());
        check_discarded(&t, "after reuse");
        drop(t);

        let t = Target::open(Arc::new(before_commit), small()).unwrap();
        assert_eq!(read(&t, &p(b"d", b"a"), 24), (2, 0), "an uncommitted discard is not recovered");
        assert_eq!(t.info().used, 7 * BLOCK);
        drop(t);
        // WAL replay (of a crash image holding only what was synced) and a checkpoint bring the
        // discard back exactly, blocks included.
        let mut t = Target::open(Arc::new(mem.crash_image(false)), small()).unwrap();
        check_discarded(&t, "replayed");
        t.maybe_checkpoint(true).unwrap();
        t.reap_checkpoint(true).unwrap();
        drop(t);
        let mut t = Target::open(Arc::new(mem.clone()), small()).unwrap();
        check_discarded(&t, "reopened");
        t.maybe_checkpoint(true).unwrap();
        t.reap_checkpoint(true).unwrap();
        drop(t);
        let mut t = Target::open(Arc::new(mem.clone()), small()).unwrap();
        check_discarded(&t, "from the checkpoint");
        // Above 0 on one dkey, then on the rest: the object is gone, every block free.
        assert_eq!(t.stage(discard(0, Some(b"d"))).unwrap(), Staged::Discarded { versions: 1 });
        t.commit().unwrap();
        assert_eq!(t.info().objects, 0);
        assert_eq!(t.info().used, 0);
        assert_eq!(t.stage(discard(0, None)).unwrap(), Staged::Discarded { versions: 0 });
        drop(t);
        let t = Target::open(Arc::new(mem), small()).unwrap();
        assert_eq!((t.info().objects, t.info().used), (0, 0));
    }
}
