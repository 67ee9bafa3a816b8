//! One target: a shard of storage with its own data file, WAL and checkpoints.
//!
//! A target is driven by one thread. Mutations are *staged* ([`Target::stage`]): validated,
//! checksummed, given freshly allocated blocks (never live data) and their ops queued.
//! [`Target::commit`] then writes the batch's data (one `pwrite` per contiguous run) and makes
//! the whole batch durable with one data-file sync, one WAL record and one WAL sync (group commit), applies it to the index, and only then may the
//! caller acknowledge the batch. Fetches read the index and the data file, verify the stored
//! CRC64s, and return data with checksums for the returned bytes.
//!
//! Scrub ([`Target::scrub_step`]) verifies the stored CRC64s of every value in index order, in
//! steps bounded by bytes read; a dkey being repaired from redundancy is fenced
//! ([`Target::set_fence`], kept in [`FENCE_FILE`]): fetches of it fail until the repair is done.
//!
//! Recovery ([`Target::open`]): the newest valid checkpoint (falling back to the previous one if
//! it is corrupt), then the WAL from the record after it up to a torn tail, then the allocator
//! rebuilt from the blocks the index references.

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
use crate::wal::{parse_segment_name, retire_segment, scan_segment, segment_name, WalWriter};
use crate::{EngineError, BLOCK};

mod commit;
mod destage;

pub use commit::SyncJob;

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

/// The result of an array fetch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FetchedArray {
    pub data: Bytes,
    /// (offset in `data`, length) of each hole.
    pub holes: Vec<(u32, u32)>,
    /// CRC64 of each 4 KiB chunk of `data`.
    pub csums: Vec<u64>,
    /// (offset in `data`, length, epoch) of each run of data, ascending (filled only by
    /// [`Target::fetch_versions`]).
    pub runs: Vec<(u32, u32, u64)>,
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
}

/// Where a scrub resumes: chunk `chunk` of the stored value `item` of the akey at `path`, or the
/// first value after it in index order when it is gone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScrubCursor {
    pub path: AkeyPath,
    pub item: ItemKey,
    pub chunk: u64,
}

/// A stored value whose data failed its checksum or could not be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadExtent {
    pub cont: u128,
    pub obj: u128,
    pub dkey: Bytes,
    pub akey: Bytes,
    /// The extent's offset in the akey (0 for a single value).
    pub offset: u64,
    pub len: u64,
    pub epoch: u64,
}

/// What one scrub step verified ([`Target::scrub_step`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ScrubStep {
    /// Where the next step resumes; `None` when this one reached the end of the index.
    pub next: Option<ScrubCursor>,
    /// Stored values finished (their last chunk verified) in this step, bad ones included.
    pub extents: u64,
    /// Bytes verified (read from the data file, or inline).
    pub bytes: u64,
    /// The same per container, in index order: (container, values, bytes).
    pub by_cont: Vec<(u128, u64, u64)>,
    /// Values that failed.
    pub bad: Vec<BadExtent>,
}

impl ScrubStep {
    fn count(&mut self, cont: u128, extents: u64, bytes: u64) {
        self.extents += extents;
        self.bytes += bytes;
        match self.by_cont.last_mut() {
            Some((c, e, b)) if *c == cont => {
                *e += extents;
                *b += bytes;
            }
            _ => self.by_cont.push((cont, extents, bytes)),
        }
    }
}

/// A dkey of an object whose data on this target is being repaired: fetches of it fail with
/// [`EngineError::DataCorrupt`] (clients read it from redundancy) until the fence is lifted.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Fence {
    pub cont: u128,
    pub obj: u128,
    pub dkey: Bytes,
}

impl Fence {
    /// The fence covering `path`.
    pub fn of(path: &AkeyPath) -> Fence {
        Fence { cont: path.cont, obj: path.obj, dkey: path.dkey.clone() }
    }
}

/// The fence file: one line per fence, `<cont> <obj> <dkey>`, each in lower-case hexadecimal
/// (container and object 32 digits, the dkey two per byte, empty for an empty dkey).
fn encode_fences(fences: &BTreeSet<Fence>) -> String {
    let mut out = String::new();
    for f in fences {
        let _ = write!(out, "{:032x} {:032x} ", f.cont, f.obj);
        for b in f.dkey.iter() {
            let _ = write!(out, "{b:02x}");
        }
        out.push('\n');
    }
    out
}

fn decode_fences(text: &str) -> Result<BTreeSet<Fence>, String> {
    let mut out = BTreeSet::new();
    for (n, line) in text.lines().enumerate() {
        let bad = || format!("line {}: not `<cont> <obj> <dkey>` in hexadecimal: {line:?}", n + 1);
        let mut parts = line.split(' ');
        let (Some(c), Some(o), Some(d), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else { return Err(bad()) };
        let cont = u128::from_str_radix(c, 16).map_err(|_| bad())?;
        let obj = u128::from_str_radix(o, 16).map_err(|_| bad())?;
        if d.len() % 2 != 0 || d.len() > 2 * KEY_MAX {
            return Err(bad());
        }
        let dkey =
            (0..d.len()).step_by(2).map(|i| d.get(i..i + 2).and_then(|h| u8::from_str_radix(h, 16).ok())).collect::<Option<Vec<u8>>>();
        out.insert(Fence { cont, obj, dkey: Bytes::from(dkey.ok_or_else(bad)?) });
    }
    Ok(out)
}

/// A checkpoint being written by a background thread.
#[derive(Debug)]
struct CheckpointJob {
    seq: u64,
    started: Instant,
    pause: Duration,
    /// Yields the checkpoint's size once it is written.
    handle: JoinHandle<Result<usize, EngineError>>,
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

fn invalid(msg: impl Into<String>) -> EngineError {
    EngineError::Invalid(msg.into())
}

fn check_key(what: &str, key: &Bytes) -> Result<(), EngineError> {
    if key.len() > KEY_MAX {
        return Err(invalid(format!("{what} is {} bytes, at most {KEY_MAX}", key.len())));
    }
    Ok(())
}

fn read_whole(storage: &dyn Storage, name: &str) -> Result<Bytes, EngineError> {
    let f = storage.open(name, false).map_err(|e| EngineError::io(name, e))?;
    let len = f.len().map_err(|e| EngineError::io(name, e))?;
    let mut buf = vec![0u8; len as usize];
    f.read_at(&mut buf, 0).map_err(|e| EngineError::io(name, e))?;
    Ok(Bytes::from(buf))
}

/// Loads the newest valid checkpoint, falling back to older ones. Returns the index and the WAL
/// sequence number it covers (0 when starting from nothing).
fn load_checkpoint(storage: &dyn Storage, names: &[String]) -> Result<(Index, u64), EngineError> {
    let mut seqs: Vec<u64> = names.iter().filter_map(|n| parse_checkpoint_name(n)).collect();
    seqs.sort_unstable_by(|a, b| b.cmp(a));
    for &seq in &seqs {
        let name = checkpoint_name(seq);
        match checkpoint::decode(read_whole(storage, &name)?) {
            Ok((index, covered)) if covered == seq => return Ok((index, seq)),
            Ok((_, covered)) => warn!(file = %name, covered, "checkpoint covers a different sequence than its name; trying an older one"),
            Err(reason) => warn!(file = %name, %reason, "checkpoint is corrupt; trying an older one"),
        }
    }
    Ok((Index::new(), 0))
}

/// What [`replay_wal`] found after the checkpoint.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Replayed {
    /// The last sequence number applied.
    last: u64,
    /// Bytes of valid records in the segments it read.
    bytes: u64,
    /// Segments it read that held records after the checkpoint.
    segments: u64,
}

/// Segments holding records after the last checkpoint (the open one included) at which a
/// checkpoint starts whatever their size: every start of the engine opens a segment, so
/// repeated crashes under light load would otherwise pile up small segments, and replay with
/// them, without ever reaching `checkpoint_wal_bytes`.
pub const CHECKPOINT_SEGMENTS: u64 = 4;

/// Replays WAL records after `from` into `index`.
fn replay_wal(storage: &dyn Storage, names: &[String], index: &mut Index, from: u64) -> Result<Replayed, EngineError> {
    let mut starts: Vec<u64> = names.iter().filter_map(|n| parse_segment_name(n)).collect();
    starts.sort_unstable();
    let mut last = from;
    let (mut bytes, mut segments) = (0u64, 0u64);
    for (i, &start) in starts.iter().enumerate() {
        let next_start = starts.get(i + 1).copied();
        if next_start.is_some_and(|n| n <= from.saturating_add(1)) {
            continue; // every record of this segment is in the checkpoint
        }
        let name = segment_name(start);
        if start > last.saturating_add(1) {
            return Err(EngineError::Corrupt {
                file: name,
                reason: format!("WAL records {}..{} are missing (a checkpoint was lost and its WAL already removed)", last + 1, start - 1),
            });
        }
        let scan = scan_segment(read_whole(storage, &name)?, start);
        if !scan.records.is_empty() {
            // What was replayed may have come from the page cache of a process that died before
            // its fdatasync: make it durable before anything is appended after it.
            storage.open(&name, false).and_then(|f| f.sync()).map_err(|e| EngineError::io(&name, e))?;
        }
        if scan.records.iter().any(|(seq, _)| *seq > last) {
            bytes += scan.valid_end;
            segments += 1;
        }
        for (seq, ops) in scan.records {
            if seq > last {
                for op in &ops {
                    index.apply(op);
                }
                last = seq;
            }
        }
        if let Some(reason) = scan.stopped {
            let is_last = next_start.is_none();
            if scan.valid_after_stop || (!is_last && next_start != Some(last.saturating_add(1))) {
                return Err(EngineError::Corrupt {
                    file: name,
                    reason: format!("{reason}; later records exist, so this is not a torn write"),
                });
            }
            if is_last && !scan.clean_end {
                warn!(file = %name, %reason, "WAL ends in a torn record; it was never acknowledged and is discarded");
            }
        }
    }
    Ok(Replayed { last, bytes, segments })
}

impl Target {
    /// Opens (recovering) or creates the target stored in `storage`.
    pub fn open(storage: Arc<dyn Storage>, cfg: TargetConfig) -> Result<Self, EngineError> {
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
        if data.len().map_err(|e| EngineError::io(DATA_FILE, e))? < total_blocks * BLOCK {
            data.set_len(total_blocks * BLOCK).map_err(|e| EngineError::io(DATA_FILE, e))?;
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
            max_checkpoint_pause: Duration::ZERO,
            stats: CommitStats::default(),
        };
        t.find_waiting_extents();
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

    /// Reads `len` bytes at `offset` of an array akey as of `epoch`.
    pub fn fetch_array(&self, path: &AkeyPath, offset: u64, len: u64, epoch: u64) -> Result<FetchedArray, EngineError> {
        let mut f = self.fetch_versions(std::slice::from_ref(path), offset, len, epoch)?;
        f.runs.clear();
        Ok(f)
    }

    /// Reads `len` bytes at `offset` as of `epoch`, byte by byte from the newest version across
    /// the array akeys `paths` ([`Index::fetch_versions`]), and lists the epoch of every run.
    pub fn fetch_versions(&self, paths: &[AkeyPath], offset: u64, len: u64, epoch: u64) -> Result<FetchedArray, EngineError> {
        if len == 0 {
            return Err(invalid("fetch of 0 bytes"));
        }
        if len > MAX_IO {
            // The reply would exceed the data limit: `TooLarge`, as the RPC status table says.
            return Err(EngineError::TooLarge(format!("fetch of {len} bytes: at most {MAX_IO}")));
        }
        let end = offset.checked_add(len).ok_or_else(|| invalid("offset + length overflows"))?;
        for p in paths {
            self.check_fence(p)?;
        }
        let mut buf = vec![0u8; len as usize];
        let mut known: Vec<Option<u64>> = vec![None; len.div_ceil(BLOCK) as usize];
        let mut holes = Vec::new();
        let mut runs: Vec<(u32, u32, u64)> = Vec::new();
        for seg in self.index.fetch_versions(paths, offset..end, epoch) {
            if let (Source::Data { .. }, Some(v)) = (&seg.source, seg.version) {
                let (start, n) = ((seg.range.start - offset) as u32, (seg.range.end - seg.range.start) as u32);
                match runs.last_mut() {
                    Some((s, l, e)) if *s + *l == start && *e == v.epoch => *l += n,
                    _ => runs.push((start, n, v.epoch)),
                }
            }
            match seg.source {
                Source::Hole => {
                    let (start, len) = ((seg.range.start - offset) as u32, (seg.range.end - seg.range.start) as u32);
                    match holes.last_mut() {
                        Some((s, l)) if *s + *l == start => *l += len,
                        _ => holes.push((start, len)),
                    }
                }
                Source::Data { extent_start, stored, .. } => {
                    self.read_segment(&stored, extent_start, &seg.range, offset, &mut buf, &mut known)?;
                }
            }
        }
        let csums = buf.chunks(BLOCK as usize).zip(known).map(|(chunk, k)| k.unwrap_or_else(|| crc64(chunk))).collect();
        Ok(FetchedArray { data: Bytes::from(buf), holes, csums, runs })
    }

    /// Copies `range` (akey offsets) of a stored extent into `buf` (which starts at `base`),
    /// verifying every stored chunk it touches. Reply chunks that coincide with a whole stored
    /// chunk reuse its checksum.
    fn read_segment(
        &self,
        stored: &Stored,
        extent_start: u64,
        range: &Range<u64>,
        base: u64,
        buf: &mut [u8],
        known: &mut [Option<u64>],
    ) -> Result<(), EngineError> {
        let first = (range.start - extent_start) / BLOCK;
        let last = (range.end - extent_start).div_ceil(BLOCK);
        let from = first * BLOCK;
        let to = (last * BLOCK).min(stored.len);
        let bytes = self.stored_bytes(stored, from, to)?;
        for (i, chunk) in bytes.chunks(BLOCK as usize).enumerate() {
            let c = first as usize + i;
            let sum = crc64(chunk);
            if stored.csums.get(c) != Some(&sum) {
                return Err(EngineError::DataCorrupt(format!(
                    "chunk {c} of the extent at offset {extent_start} ({:?}) fails its checksum",
                    stored.loc_summary()
                )));
            }
            let abs = extent_start + c as u64 * BLOCK;
            let reply_rel = abs.checked_sub(base);
            if let Some(rel) = reply_rel.filter(|r| r % BLOCK == 0 && abs >= range.start && abs + chunk.len() as u64 <= range.end) {
                let j = (rel / BLOCK) as usize;
                let reply_chunk_len = BLOCK.min(buf.len() as u64 - rel);
                if chunk.len() as u64 == reply_chunk_len {
                    if let Some(k) = known.get_mut(j) {
                        *k = Some(sum);
                    }
                }
            }
        }
        let src_from = (range.start - extent_start - from) as usize;
        let n = (range.end - range.start) as usize;
        let dst_from = (range.start - base) as usize;
        buf[dst_from..dst_from + n].copy_from_slice(&bytes[src_from..src_from + n]);
        Ok(())
    }

    /// The single value visible at `epoch`: data, CRC64 of all of it, and its epoch.
    pub fn fetch_single(&self, path: &AkeyPath, epoch: u64) -> Result<Option<(Bytes, u64, u64)>, EngineError> {
        self.check_fence(path)?;
        let Some((version, stored)) = self.index.fetch_single(path, epoch) else { return Ok(None) };
        let mut buf = vec![0u8; stored.len as usize];
        let mut known = vec![None; stored.csums.len()];
        self.read_segment(&stored, 0, &(0..stored.len), 0, &mut buf, &mut known)?;
        let csum = crc64(&buf);
        Ok(Some((Bytes::from(buf), csum, version.epoch)))
    }

    /// Bytes `from..to` of a stored value (`from` on a chunk boundary).
    fn stored_bytes(&self, stored: &Stored, from: u64, to: u64) -> Result<Bytes, EngineError> {
        Ok(match &stored.loc {
            Loc::Inline(d) => d.slice(from as usize..to as usize),
            Loc::Blocks { start } => {
                let mut tmp = vec![0u8; (to - from) as usize];
                self.data.read_at(&mut tmp, start * BLOCK + from).map_err(|e| EngineError::io(DATA_FILE, e))?;
                Bytes::from(tmp)
            }
        })
    }

    /// Verifies chunks `first..end` of a stored value against its stored CRC64s (what a fetch
    /// checks); the error says which chunk failed or why it could not be read.
    fn verify_chunks(&self, stored: &Stored, first: u64, end: u64) -> Result<(), String> {
        if first >= end {
            return Ok(());
        }
        let bytes = self.stored_bytes(stored, first * BLOCK, (end * BLOCK).min(stored.len)).map_err(|e| e.to_string())?;
        for (i, chunk) in bytes.chunks(BLOCK as usize).enumerate() {
            let c = first as usize + i;
            if stored.csums.get(c) != Some(&crc64(chunk)) {
                return Err(format!("chunk {c} ({}) fails its checksum", stored.loc_summary()));
            }
        }
        Ok(())
    }

    /// Verifies the stored CRC64s of the values after `from` (from the start of the index with
    /// `None`), in index order, reading at most `max_bytes` (at least one chunk) and looking at
    /// most [`SCRUB_STEP_ITEMS`] values. A value larger than what is left of the budget is
    /// verified over several steps (the cursor names its next chunk). A value whose data fails
    /// its checksum, or cannot be read, is reported in `bad` and the rest of it skipped.
    /// Reads the committed index and the data file only: it may run between any two requests.
    pub fn scrub_step(&self, from: Option<&ScrubCursor>, max_bytes: u64) -> ScrubStep {
        let mut chunks_left = (max_bytes / BLOCK).max(1);
        let mut items = 0usize;
        let mut out = ScrubStep::default();
        let mut next = None;
        self.index.visit_stored(from.map(|c| (&c.path, c.item)), |path, item, stored| {
            let chunks = stored.len.div_ceil(BLOCK);
            let first = from.filter(|c| c.item == item && c.path == *path).map_or(0, |c| c.chunk).min(chunks);
            if items >= SCRUB_STEP_ITEMS || chunks_left == 0 {
                next = Some(ScrubCursor { path: path.clone(), item, chunk: first });
                return false;
            }
            let end = chunks.min(first + chunks_left);
            chunks_left -= end - first;
            let bytes = (end * BLOCK).min(stored.len) - first * BLOCK;
            match self.verify_chunks(stored, first, end) {
                Ok(()) if end < chunks => {
                    out.count(path.cont, 0, bytes);
                    next = Some(ScrubCursor { path: path.clone(), item, chunk: end });
                    return false;
                }
                Ok(()) => out.count(path.cont, 1, bytes),
                Err(reason) => {
                    out.count(path.cont, 1, bytes);
                    let (offset, epoch) = match item {
                        ItemKey::Extent { offset, version } => (offset, version.epoch),
                        ItemKey::Single(v) => (0, v.epoch),
                    };
                    warn!(cont = %format_args!("{:032x}", path.cont), dkey = ?path.dkey, akey = ?path.akey, offset, len = stored.len, epoch, %reason, "scrub: stored data is bad");
                    out.bad.push(BadExtent {
                        cont: path.cont,
                        obj: path.obj,
                        dkey: path.dkey.clone(),
                        akey: path.akey.clone(),
                        offset,
                        len: stored.len,
                        epoch,
                    });
                }
            }
            items += 1;
            true
        });
        out.next = next;
        out
    }

    fn check_fence(&self, path: &AkeyPath) -> Result<(), EngineError> {
        if !self.fences.is_empty() && self.fences.contains(&Fence::of(path)) {
            return Err(EngineError::DataCorrupt(format!("dkey {:?} is being repaired from redundancy", path.dkey)));
        }
        Ok(())
    }

    /// Whether fetches of `path`'s dkey are fenced off.
    pub fn is_fenced(&self, path: &AkeyPath) -> bool {
        !self.fences.is_empty() && self.fences.contains(&Fence::of(path))
    }

    /// The fences in place (also those of repairs a crash interrupted).
    pub fn fences(&self) -> Vec<Fence> {
        self.fences.iter().cloned().collect()
    }

    /// Puts up (`on`) or lifts a fence and makes the set durable in [`FENCE_FILE`] (written
    /// whole to a `.tmp` file, synced, renamed; removed when empty), so that a crash in the
    /// middle of a repair still reads that dkey from redundancy after the restart. A fence that
    /// cannot be made durable is not put up; a lifted one is lifted even if the file could not
    /// be rewritten (it comes back after a restart, which only repeats the repair).
    pub fn set_fence(&mut self, fence: Fence, on: bool) -> Result<(), EngineError> {
        let changed = if on { self.fences.insert(fence.clone()) } else { self.fences.remove(&fence) };
        if !changed {
            return Ok(());
        }
        let result = self.write_fences();
        if result.is_err() && on {
            self.fences.remove(&fence);
        }
        result
    }

    fn write_fences(&self) -> Result<(), EngineError> {
        if self.fences.is_empty() {
            return self.storage.remove(FENCE_FILE).map_err(|e| EngineError::io(FENCE_FILE, e));
        }
        let tmp = format!("{FENCE_FILE}.tmp");
        let f = self.storage.open(&tmp, true).map_err(|e| EngineError::io(&tmp, e))?;
        let text = encode_fences(&self.fences);
        f.set_len(0).map_err(|e| EngineError::io(&tmp, e))?;
        f.write_at(text.as_bytes(), 0).map_err(|e| EngineError::io(&tmp, e))?;
        f.sync().map_err(|e| EngineError::io(&tmp, e))?;
        self.storage.rename(&tmp, FENCE_FILE).map_err(|e| EngineError::io(FENCE_FILE, e))
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
        }
    }

    /// Whether more than half of the data file is in use.
    pub fn space_pressure(&self) -> bool {
        self.alloc.used() * 2 > self.alloc.total()
    }

    /// Whether aggregation has akeys left to look at, now or once the boundary moves.
    pub fn aggregation_pending(&self) -> bool {
        !self.dirty.is_empty() || !self.deferred.is_empty()
    }

    fn boundary(&self, cont: u128, now: u64) -> u64 {
        let below = self.index.retention(cont).aggregate_below;
        if below > 0 {
            below
        } else {
            now.saturating_sub(self.cfg.aggregation_lag)
        }
    }

    /// Moves parked akeys whose waiting epoch the boundary has reached back to the dirty set.
    fn wake_deferred(&mut self, now: u64) {
        while let Some(Reverse((epoch, path))) = self.deferred.peek() {
            if *epoch > self.boundary(path.cont, now) {
                break;
            }
            if let Some(Reverse((_, path))) = self.deferred.pop() {
                self.dirty.insert(path);
            }
        }
    }

    /// Aggregates up to the configured budget of akeys; `now` is the current epoch (HLC) used
    /// for containers without an explicit aggregation epoch. Commits what it changed. Returns
    /// the number of blocks freed.
    pub fn aggregate_step(&mut self, now: u64) -> Result<u64, EngineError> {
        self.check_healthy()?;
        if !self.settled() {
            return Ok(0);
        }
        self.wake_deferred(now);
        let batch: Vec<AkeyPath> = self.dirty.iter().take(self.cfg.aggregation_budget).cloned().collect();
        let mut freed = Vec::new();
        let mut objects = BTreeSet::new();
        for path in batch {
            self.dirty.remove(&path);
            let retention = self.index.retention(path.cont);
            let boundary = self.boundary(path.cont, now);
            let (op, pending) = self.index.plan_aggregation(&path, boundary, &retention.retained);
            if let Some(op) = op {
                freed.extend(freed_blocks(&self.index, &op));
                self.staged.push(op);
                objects.insert((path.cont, path.obj, boundary));
            }
            if let Some(epoch) = pending {
                // Newer versions become aggregatable once the boundary reaches them: park the
                // akey until then instead of planning it again at every step.
                self.deferred.push(Reverse((epoch, path)));
            }
        }
        let count: u64 = freed.iter().map(|(_, n)| n).sum();
        for (s, n) in freed {
            self.alloc.quarantine(s, n);
        }
        self.commit()?;
        // Object and dkey punches left with nothing older beneath them can go too.
        for (cont, obj, boundary) in objects {
            let ops = self.index.plan_unpunch(cont, obj, boundary);
            self.staged.extend(ops);
        }
        self.commit()?;
        Ok(count)
    }

    /// Whether [`Target::maybe_checkpoint`] has work: the WAL has grown enough for a new
    /// checkpoint, or a running one has finished.
    pub fn checkpoint_due(&self) -> bool {
        match &self.checkpoint_job {
            Some(job) => job.handle.is_finished(),
            None => {
                let grown = self.wal_backlog >= self.cfg.checkpoint_wal_bytes || self.wal_segments >= CHECKPOINT_SEGMENTS;
                grown && self.wal.next_seq() - 1 != self.checkpoint_seq
            }
        }
    }

    /// Starts a background checkpoint if the WAL has grown enough (or `force`), and reaps a
    /// finished one. Returns true when a new checkpoint was started.
    pub fn maybe_checkpoint(&mut self, force: bool) -> Result<bool, EngineError> {
        self.reap_checkpoint(false)?;
        if self.checkpoint_job.is_some() || !self.settled() || self.failed.is_some() {
            return Ok(false);
        }
        let seq = self.wal.next_seq() - 1;
        // The WAL since the last checkpoint, across segments (also what the last start replayed).
        let due = self.wal_backlog >= self.cfg.checkpoint_wal_bytes || self.wal_segments >= CHECKPOINT_SEGMENTS;
        if seq == self.checkpoint_seq || !(force || due) {
            return Ok(false);
        }
        let paused = Instant::now();
        self.wal.rotate()?;
        self.wal_backlog = 0;
        self.wal_segments = 1;
        // The snapshot shares every akey with the live index (copy-on-write): the pause is one
        // pointer copy per akey; serialising happens on the checkpoint thread.
        let snapshot = self.index.clone();
        let pause = paused.elapsed();
        self.max_checkpoint_pause = self.max_checkpoint_pause.max(pause);
        let storage = self.storage.clone();
        let keep_from = self.checkpoint_seq;
        let handle = std::thread::Builder::new()
            .name("checkpoint".into())
            .spawn(move || {
                let image = checkpoint::encode(&snapshot, seq);
                drop(snapshot);
                write_checkpoint(storage.as_ref(), seq, &image, keep_from).map(|()| image.len())
            })
            .map_err(|e| EngineError::io("checkpoint thread", e))?;
        self.checkpoint_job = Some(CheckpointJob { seq, started: paused, pause, handle });
        Ok(true)
    }

    /// Collects a finished checkpoint (or waits for it when `wait`).
    pub fn reap_checkpoint(&mut self, wait: bool) -> Result<(), EngineError> {
        let finished = self.checkpoint_job.as_ref().is_some_and(|j| wait || j.handle.is_finished());
        if !finished {
            return Ok(());
        }
        let Some(job) = self.checkpoint_job.take() else { return Ok(()) };
        match job.handle.join() {
            Ok(Ok(bytes)) => {
                info!(
                    seq = job.seq,
                    bytes,
                    pause_us = job.pause.as_micros() as u64,
                    total_ms = job.started.elapsed().as_millis() as u64,
                    "checkpoint written"
                );
                self.checkpoint_seq = job.seq;
                Ok(())
            }
            Ok(Err(e)) => {
                warn!(error = %e, "checkpoint failed; the WAL still holds everything");
                Err(e)
            }
            Err(_) => Err(EngineError::Failed("checkpoint thread panicked".into())),
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

/// Writes a checkpoint file atomically, then removes the files the previous checkpoint
/// (`keep_from`, kept as a fallback) no longer needs.
fn write_checkpoint(storage: &dyn Storage, seq: u64, image: &[u8], keep_from: u64) -> Result<(), EngineError> {
    let name = checkpoint_name(seq);
    let tmp = format!("{name}.tmp");
    let f = storage.open(&tmp, true).map_err(|e| EngineError::io(&tmp, e))?;
    f.set_len(0).map_err(|e| EngineError::io(&tmp, e))?;
    f.write_at(image, 0).map_err(|e| EngineError::io(&tmp, e))?;
    f.sync().map_err(|e| EngineError::io(&tmp, e))?;
    storage.rename(&tmp, &name).map_err(|e| EngineError::io(&name, e))?;
    let names = storage.list().map_err(|e| EngineError::io(".", e))?;
    for old in names.iter().filter(|n| parse_checkpoint_name(n).is_some_and(|s| s < keep_from)) {
        storage.remove(old).map_err(|e| EngineError::io(old, e))?;
    }
    let mut starts: Vec<u64> = names.iter().filter_map(|n| parse_segment_name(n)).collect();
    starts.sort_unstable();
    let mut names = names;
    for pair in starts.windows(2) {
        if let [start, next] = pair {
            if *next <= keep_from + 1 {
                retire_segment(storage, *start, &names)?;
                names = storage.list().map_err(|e| EngineError::io(".", e))?;
            }
        }
    }
    Ok(())
}

/// Data-file blocks an aggregation op stops referencing.
fn freed_blocks(index: &Index, op: &Op) -> Vec<(u64, u64)> {
    let Op::Aggregate { path, remove_extents, add_extents, remove_singles, .. } = op else { return Vec::new() };
    let Some(akey) = index.akey(path) else { return Vec::new() };
    let mut freed: Vec<Range<u64>> = remove_extents
        .iter()
        .filter_map(|k| akey.extents.get(k))
        .filter_map(|b| b.data.as_ref().and_then(Stored::blocks))
        .chain(remove_singles.iter().filter_map(|v| akey.singles.get(v)).filter_map(Stored::blocks))
        .map(|(s, n)| s..s + n)
        .collect();
    freed.sort_unstable_by_key(|r| r.start);
    for (ks, kn) in add_extents.iter().filter_map(|e| e.data.as_ref().and_then(Stored::blocks)) {
        subtract(&mut freed, &(ks..ks + kn));
    }
    freed.into_iter().map(|r| (r.start, r.end - r.start)).collect()
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
mod tests {
    use super::*;
    use crate::backend::MemStorage;

    fn small() -> TargetConfig {
        TargetConfig {
            capacity: 8 * BLOCK,
            inline_max: 512,
            wal_data_max: 0,
            destage_bytes: 16 << 20,
            checkpoint_wal_bytes: 1 << 40,
            wal_segment_bytes: 64 << 10,
            aggregation_lag: 0,
            aggregation_budget: 64,
        }
    }

    fn p(dkey: &'static [u8], akey: &'static [u8]) -> AkeyPath {
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

    /// A target of 1 MiB holding, in index order: container 1 (dkeys "a".."c": arrays of
    /// 10 KiB, 64 KiB and 100 bytes inline, a range punch, a 5000-byte single value) and
    /// container 2 (one 20 KiB array). Returns the target and (values, bytes) it stores.
    fn scrub_fixture(mem: &MemStorage) -> (Target, u64, u64) {
        let cfg = TargetConfig { capacity: 256 * BLOCK, ..small() };
        let mut t = Target::open(Arc::new(mem.clone()), cfg).unwrap();
        let arr = |cont, dkey: &'static [u8], off: u64, len: usize, fill: u8| Mutation::Update {
            path: AkeyPath { cont, obj: 7, dkey: Bytes::from_static(dkey), akey: Bytes::from_static(b"x") },
            epoch: 10,
            value: UpdateValue::array(off, Bytes::from((0..len).map(|i| fill.wrapping_add(i as u8)).collect::<Vec<u8>>())),
        };
        t.stage(arr(1, b"a", 0, 10 * 1024, 1)).unwrap();
        t.stage(arr(1, b"b", 4096, 64 * 1024, 2)).unwrap();
        t.stage(arr(1, b"b", 1 << 20, 100, 3)).unwrap();
        let punch = PunchTarget::Range { dkey: Bytes::from_static(b"b"), akey: Bytes::from_static(b"x"), offset: 0, len: 100 };
        t.stage(Mutation::Punch { cont: 1, obj: 7, epoch: 11, what: punch }).unwrap();
        t.stage(Mutation::Update { path: p(b"c", b"s"), epoch: 12, value: UpdateValue::single(Bytes::from(vec![9u8; 5000])) }).unwrap();
        t.stage(arr(2, b"a", 0, 20 * 1024, 4)).unwrap();
        t.commit().unwrap();
        (t, 5, (10 + 64 + 20) * 1024 + 100 + 5000)
    }

    /// Scrubs the whole target in steps of `max_bytes`: (values, bytes, bad, steps), checking
    /// that no step reads more than its budget.
    fn scrub_all(t: &Target, max_bytes: u64) -> (u64, u64, Vec<BadExtent>, usize) {
        let (mut values, mut bytes, mut bad, mut steps) = (0, 0, Vec::new(), 0);
        let mut from = None;
        loop {
            let step = t.scrub_step(from.as_ref(), max_bytes);
            assert!(step.bytes <= max_bytes.max(BLOCK), "a step read {} bytes, budget {max_bytes}", step.bytes);
            assert_eq!(step.by_cont.iter().map(|c| (c.1, c.2)).fold((0, 0), |a, c| (a.0 + c.0, a.1 + c.1)), (step.extents, step.bytes));
            values += step.extents;
            bytes += step.bytes;
            bad.extend(step.bad);
            steps += 1;
            match step.next {
                Some(c) => from = Some(c),
                None => return (values, bytes, bad, steps),
            }
        }
    }

    #[test]
    fn scrub_step_finds_exactly_the_corrupt_chunk_within_its_budget() {
        let mem = MemStorage::new();
        let (t, values, bytes) = scrub_fixture(&mem);
        let whole = t.scrub_step(None, 16 << 20);
        assert_eq!((whole.extents, whole.bytes, whole.bad.len(), whole.next.is_none()), (values, bytes, 0, true));
        assert_eq!(whole.by_cont, vec![(1, 4, (10 + 64) * 1024 + 100 + 5000), (2, 1, 20 * 1024)]);
        assert_eq!(scrub_all(&t, 8192), (values, bytes, Vec::new(), 14), "27 chunks, two per step");

        // Flip one byte in chunk 5 of the 64 KiB extent of dkey "b".
        let mut loc = None;
        t.index().visit_stored(None, |path, item, stored| {
            if path.dkey == Bytes::from_static(b"b") && stored.len == 64 * 1024 {
                loc = Some((item, stored.blocks().unwrap().0));
            }
            true
        });
        let (item, start) = loc.unwrap();
        assert_eq!(item, ItemKey::Extent { offset: 4096, version: Version { epoch: 10, id: 1 } });
        let data = mem.open(DATA_FILE, false).unwrap();
        let at = (start + 5) * BLOCK + 7;
        let mut b = [0u8; 1];
        data.read_at(&mut b, at).unwrap();
        data.write_at(&[b[0] ^ 0x5a], at).unwrap();

        let expect = BadExtent {
            cont: 1,
            obj: 7,
            dkey: Bytes::from_static(b"b"),
            akey: Bytes::from_static(b"x"),
            offset: 4096,
            len: 64 * 1024,
            epoch: 10,
        };
        let whole = t.scrub_step(None, 16 << 20);
        assert_eq!((whole.extents, whole.bad.clone()), (values, vec![expect.clone()]));
        // In small steps: the same one, found once, and the rest of it skipped.
        for budget in [0, 4096, 8192, 12 * 1024, 1 << 20] {
            let (v, by, bad, _) = scrub_all(&t, budget);
            assert_eq!((v, bad), (values, vec![expect.clone()]), "budget {budget}");
            // Chunk by chunk, the ten after the bad one are skipped.
            assert_eq!(by, if budget <= 4096 { bytes - 10 * BLOCK } else { by.min(bytes) }, "budget {budget}");
        }
        // A fetch sees the same corruption.
        assert!(matches!(t.fetch_array(&p(b"b", b"x"), 4096, 64 * 1024, 20), Err(EngineError::DataCorrupt(_))));
    }

    #[test]
    fn scrub_cursor_resumes_after_changes_to_the_index() {
        let mem = MemStorage::new();
        let (mut t, values, _) = scrub_fixture(&mem);
        // Stop inside the 64 KiB extent of "b".
        let first = t.scrub_step(None, 16 * 1024);
        let c = first.next.clone().unwrap();
        assert_eq!(
            (c.path.dkey.as_ref(), c.item, c.chunk),
            (&b"b"[..], ItemKey::Extent { offset: 4096, version: Version { epoch: 10, id: 1 } }, 1)
        );
        assert_eq!((first.extents, first.bytes), (1, 10 * 1024 + 4096));
        let second = t.scrub_step(Some(&c), 4 * 4096);
        assert_eq!((second.extents, second.bytes, second.next.as_ref().map(|n| n.chunk)), (0, 4 * 4096, Some(5)));
        // Meanwhile: a value before the cursor (not seen in this pass), one after it (seen), and
        // the value under the cursor is discarded (the scrub goes on with the next one).
        let new = |dkey: &'static [u8]| Mutation::Update {
            path: AkeyPath { cont: 1, obj: 7, dkey: Bytes::from_static(dkey), akey: Bytes::from_static(b"x") },
            epoch: 20,
            value: UpdateValue::array(0, Bytes::from(vec![5u8; 8192])),
        };
        t.stage(new(b"a")).unwrap();
        t.stage(new(b"bb")).unwrap();
        t.commit().unwrap();
        let (mut rest_values, mut rest_bytes) = (0, 0);
        let mut from = second.next.clone();
        while let Some(c) = from {
            let s = t.scrub_step(Some(&c), 16 << 20);
            rest_values += s.extents;
            rest_bytes += s.bytes;
            from = s.next;
        }
        // The rest of "b" (11 chunks), "b" inline, "bb", "c", container 2.
        assert_eq!((rest_values, rest_bytes), (values - 1 + 1, 11 * 4096 + 100 + 8192 + 5000 + 20 * 1024));

        let c = second.next.unwrap();
        t.stage(Mutation::Discard { cont: 1, obj: 7, above: 0, below: u64::MAX, dkey: Some(Bytes::from_static(b"b")) }).unwrap();
        t.commit().unwrap();
        let s = t.scrub_step(Some(&c), 16 << 20);
        assert_eq!((s.extents, s.bytes), (3, 8192 + 5000 + 20 * 1024), "resumes at \"bb\"");
    }

    #[test]
    fn fences_fail_fetches_of_their_dkey_and_survive_a_restart() {
        let mem = MemStorage::new();
        let (mut t, _, _) = scrub_fixture(&mem);
        let b = AkeyPath { cont: 1, obj: 7, dkey: Bytes::from_static(b"b"), akey: Bytes::from_static(b"x") };
        let a = AkeyPath { dkey: Bytes::from_static(b"a"), ..b.clone() };
        let fence = Fence::of(&b);
        t.set_fence(fence.clone(), true).unwrap();
        let weird = Fence { cont: u128::MAX, obj: 0, dkey: Bytes::new() };
        t.set_fence(weird.clone(), true).unwrap();
        assert!(matches!(t.fetch_array(&b, 4096, 4096, 20), Err(EngineError::DataCorrupt(_))));
        assert!(t.fetch_array(&a, 0, 4096, 20).is_ok(), "other dkeys are served");
        assert!(t.is_fenced(&b) && !t.is_fenced(&a));
        drop(t);
        // A crash in the middle of the repair: still fenced after the restart.
        let mut t = Target::open(Arc::new(mem.crash_image(false)), TargetConfig { capacity: 256 * BLOCK, ..small() }).unwrap();
        assert_eq!(t.fences(), vec![fence.clone(), weird.clone()]);
        assert!(matches!(t.fetch_array(&b, 4096, 4096, 20), Err(EngineError::DataCorrupt(_))));
        t.set_fence(fence, false).unwrap();
        t.set_fence(weird, false).unwrap();
        assert!(t.fetch_array(&b, 4096, 4096, 20).is_ok());
        assert!(!t.storage.list().unwrap().iter().any(|n| n.starts_with(FENCE_FILE)));
        // The file format: lines of hexadecimal.
        let set: BTreeSet<Fence> = [Fence { cont: 1, obj: 2, dkey: Bytes::from_static(&[0, 0xff, 7]) }].into();
        assert_eq!(encode_fences(&set), format!("{:032x} {:032x} 00ff07\n", 1, 2));
        assert_eq!(decode_fences(&encode_fences(&set)).unwrap(), set);
        for bad in ["1 2", "1 2 3", "x 2 00", "1 2 00 00", "1 2 0g"] {
            assert!(decode_fences(bad).is_err(), "{bad}");
        }
    }
}
