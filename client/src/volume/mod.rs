//! Volume I/O: a volume's byte ranges read and written as erasure-coded or replicated objects
//! across engines (the client half of the DAOS bdev).
//!
//! A volume is one object (container id = object id = the volume's uuid) laid out by
//! [`VolumeLayout`]: chunk = dkey, stripe, cell = data shard. What each shard stores, per dkey:
//!
//! | class | shard | akey | holds, at which offset |
//! |---|---|---|---|
//! | `S1`, `RP_n` | every replica | `D` | the chunk's bytes at their chunk offset |
//! | `EC_kPp` | data shard `c` | `B` (base) | cells written by **full-stripe** writes, at shard offset (`stripe × cell + offset in cell`) |
//! | | | `D` (delta) | fragments of **partial-stripe** writes, at shard offset |
//! | | parity shard | `P` | parity cells of full-stripe writes, at shard offset |
//! | | | `C` (copies) | a copy of every partial-stripe fragment of every data cell, at its **chunk** offset |
//!
//! A full-stripe write encodes parity and writes `B` on the k data shards and `P` on the p parity
//! shards, all at one epoch. A partial-stripe write never reads: its fragment goes to `D` of its
//! data shard and to `C` of every parity shard, so it is as redundant as the class promises at
//! once. A normal read asks the data shard for the newest version per byte across `B` and `D`
//! (one "versions" fetch). Because `B` only ever receives whole cells from full-stripe writes,
//! the newest `B` of every data shard and the newest `P` share one epoch `E_p` — the parity stays
//! consistent with the base cells however the engines aggregate their versions. A degraded read
//! of cell `c` (its shard down, unreachable, or failing its checksum) takes from a parity shard
//! the copies in `C` (with their epochs) and the parity's epoch `E_p`; bytes whose newest copy is
//! newer than `E_p` come from the copy, the rest are reconstructed from any k of (`B` of the other
//! data shards, `P`) read at exactly `E_p`. Reads that find the base cells at another epoch than
//! the parity (a stripe torn by a client that died mid-write) fail with `Corrupt` instead of
//! returning wrong data.
//!
//! Write zeroes punches whole stripes in every akey and writes zeros into partial stripes (a
//! punch in `D` would not reliably hide `B` once the engine aggregates, see
//! `Index::fetch_versions`).
//!
//! Writes go to every *writable* shard of the current pool map and succeed only when all of them
//! acknowledge (the engines acknowledge only durable data). When an engine cannot be reached the
//! write refreshes the pool map and retries, at the same epoch, until the management service has
//! marked the target DOWN (the write then skips it: a degraded write) or [`WRITE_DEADLINE`]
//! passes. More than `p` unavailable shards in a group is [`VolumeError::Unavailable`].
//!
//! The module in files: this one owns the public API ([`Volume`], [`VolumeError`],
//! [`VolumeStats`], the akeys and the deadlines) and the one request to one shard that reads and
//! writes share; `cluster` the shared client state ([`Cluster`]: pool map cache and refresh, one
//! connection per engine); `write` the planning and running of writes and write-zeroes; `read`
//! normal and degraded reads.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures::future::join_all;
use tessera_engine_proto::{ContainerId, Epoch, ObjectId, Reply, Request, RpcStatus};
use tessera_mgmt_api::VolumeInfo;
use tracing::warn;

use crate::ec::Codec;
use crate::hlc;
use crate::layout::{Mapping, Piece, VolumeLayout};
use crate::placement::{layout_for_dkey, Group, ObjectClass, ShardPlacement, TargetRef};
use crate::rpc::RpcError;

mod cluster;
mod ec_aggregate;
mod ec_resolve;
mod read;
mod rebuild;
mod write;

pub use cluster::Cluster;
use cluster::{PoolCache, PoolView};
pub use ec_aggregate::EcAggregated;
pub use ec_resolve::TornResolved;
pub use rebuild::{RebuildOptions, ShardRebuilt};

/// Akey of EC base cells (full-stripe writes) on data shards.
pub const AKEY_BASE: &[u8] = b"B";
/// Akey of partial-stripe fragments on data shards, and of all data of replicated classes.
pub const AKEY_DELTA: &[u8] = b"D";
/// Akey of parity cells on EC parity shards.
pub const AKEY_PARITY: &[u8] = b"P";
/// Akey of copies of partial-stripe fragments on EC parity shards (at chunk offsets).
pub const AKEY_COPY: &[u8] = b"C";

/// Longest a write keeps retrying a shard that cannot be reached before failing.
pub const WRITE_DEADLINE: Duration = Duration::from_secs(25);
/// Longest a read keeps retrying when not enough shards answer.
pub const READ_DEADLINE: Duration = Duration::from_secs(10);
/// Pause between retries.
const RETRY_PAUSE: Duration = Duration::from_millis(250);
/// Most zeros a clone writes in one step of a Write Zeroes.
const CLONE_ZEROES_STEP: u64 = 1 << 20;

/// Why a volume operation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VolumeError {
    /// The range is empty, misaligned to blocks or beyond the volume.
    #[error("invalid range: {0}")]
    Range(String),
    /// Too many shards of a redundancy group are unreachable or down: the data cannot be read
    /// or written with the redundancy the class promises.
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// Every copy of the data failed its checksum or the stripe is inconsistent.
    #[error("data corrupt: {0}")]
    Corrupt(String),
    /// The volume's description is invalid (class, layout) or the pool map could not be had.
    #[error("{0}")]
    Config(String),
    /// A write to a snapshot, which is read-only.
    #[error("read-only: {0}")]
    ReadOnly(String),
}

/// Counters of one volume.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VolumeStats {
    /// Reads served without the data shard (from a copy or by reconstruction).
    pub degraded_reads: u64,
    /// Checksum mismatches detected (on the engine or by the client).
    pub checksum_errors: u64,
    /// Writes that skipped an unavailable shard.
    pub degraded_writes: u64,
    /// Writes sent again whole at a new epoch because an engine refused theirs as older than its
    /// commit window (docs/PLACEMENT.md, "The stable epoch").
    pub epoch_retries: u64,
}

#[derive(Debug, Default)]
struct Counters {
    degraded_reads: AtomicU64,
    checksum_errors: AtomicU64,
    degraded_writes: AtomicU64,
    epoch_retries: AtomicU64,
}

/// How one shard request failed.
#[derive(Debug)]
enum ShardError {
    /// The engine could not be reached or did not answer: the shard may come back or be marked
    /// DOWN.
    Unreachable(String),
    /// Our pool map is older than the engine's.
    Stale,
    /// The engine refused a host mutation whose epoch is older than its commit window: the
    /// whole mutation goes out again at a new epoch.
    EpochTooOld(String),
    /// The data failed a checksum (on the engine or here).
    Checksum(String),
    /// Any other error answer.
    Failed(String),
}

impl std::fmt::Display for ShardError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ShardError::Unreachable(m) => write!(f, "unreachable: {m}"),
            ShardError::Stale => f.write_str("stale pool map"),
            ShardError::EpochTooOld(m) => f.write_str(m),
            ShardError::Checksum(m) => write!(f, "checksum: {m}"),
            ShardError::Failed(m) => f.write_str(m),
        }
    }
}

/// An open volume. Cheap to clone; every method may run concurrently with any other.
#[derive(Debug, Clone)]
pub struct Volume {
    inner: Arc<VolumeInner>,
}

#[derive(Debug)]
struct VolumeInner {
    cluster: Arc<Cluster>,
    pool: Arc<PoolCache>,
    info: VolumeInfo,
    layout: VolumeLayout,
    class: ObjectClass,
    codec: Option<Codec>,
    cont: ContainerId,
    oid: ObjectId,
    /// A snapshot's name and epoch: the handle is read-only and reads at that epoch.
    snapshot: Option<(String, Epoch)>,
    /// A clone's parent: where the clone never wrote, it reads as this snapshot.
    parent: Option<Parent>,
    /// Rollbacks as (at, to) epochs, ascending: reading at an epoch above `at`, bytes written
    /// at or below `at` are read again at `to`.
    rollbacks: Vec<(Epoch, Epoch)>,
    counters: Counters,
}

/// The snapshot a clone reads through to, and its size (a clone may grow past it: beyond, the
/// clone reads zeros where it never wrote).
#[derive(Debug)]
struct Parent {
    snapshot: Volume,
    size: u64,
}

impl Parent {
    /// Fills the bytes of `read` that the clone never wrote (its holes) from the parent; the
    /// piece starts at volume offset `at`.
    async fn fill(&self, at: u64, read: read::Read) -> Result<Bytes, VolumeError> {
        let bs = u64::from(self.snapshot.layout().block_size());
        let mut out = BytesMut::from(&read.data[..]);
        let fills = read.holes.iter().filter_map(|h| {
            // Holes follow writes, which are whole blocks; read whole blocks regardless.
            let (start, end) = (at + h.start as u64, at + h.end as u64);
            let (a, b) = (start / bs * bs, end.div_ceil(bs) * bs);
            (a < self.size).then_some(async move { (h.clone(), start - a, self.snapshot.read(a, b.min(self.size) - a).await) })
        });
        for (h, skip, r) in join_all(fills).await {
            let data = r?;
            let n = (h.end - h.start).min(data.len().saturating_sub(skip as usize));
            out[h.start..h.start + n].copy_from_slice(&data[skip as usize..skip as usize + n]);
        }
        Ok(out.freeze())
    }
}

impl Volume {
    /// Its description.
    pub fn info(&self) -> &VolumeInfo {
        &self.inner.info
    }

    /// Its layout.
    pub fn layout(&self) -> &VolumeLayout {
        &self.inner.layout
    }

    /// Its counters.
    pub fn stats(&self) -> VolumeStats {
        let c = &self.inner.counters;
        VolumeStats {
            degraded_reads: c.degraded_reads.load(Ordering::Relaxed),
            checksum_errors: c.checksum_errors.load(Ordering::Relaxed),
            degraded_writes: c.degraded_writes.load(Ordering::Relaxed),
            epoch_retries: c.epoch_retries.load(Ordering::Relaxed),
        }
    }

    fn map_range(&self, offset: u64, len: u64) -> Result<Mapping, VolumeError> {
        let bs = u64::from(self.inner.layout.block_size());
        if !offset.is_multiple_of(bs) || !len.is_multiple_of(bs) {
            return Err(VolumeError::Range(format!("{offset}+{len} is not aligned to the block size {bs}")));
        }
        self.inner.layout.map(offset, len).map_err(|e| VolumeError::Range(e.to_string()))
    }

    /// Whether this is a clone that still reads through to its parent.
    pub fn is_clone(&self) -> bool {
        self.inner.parent.is_some()
    }

    /// Flattening a clone, one range at a time: writes the parent's bytes wherever the clone
    /// never wrote in `offset..offset + len`, so that the range no longer needs the parent.
    /// Returns the bytes copied. Only safe while nothing else writes the clone (the management
    /// service refuses to export a clone being flattened).
    pub async fn copy_parent(&self, offset: u64, len: u64) -> Result<u64, VolumeError> {
        self.check_writable()?;
        let Some(parent) = &self.inner.parent else { return Ok(0) };
        let mapping = self.map_range(offset, len)?;
        let v = &*self.inner;
        let epoch = hlc::now();
        let reads = join_all(mapping.pieces.iter().map(|p| v.read_piece_at(p, epoch))).await;
        let bs = u64::from(v.layout.block_size());
        let mut copied = 0;
        for (p, r) in mapping.pieces.iter().zip(reads) {
            let read = r?;
            if read.holes.is_empty() {
                continue;
            }
            let at = offset + p.buf_offset;
            let holes = read.holes.clone();
            let filled = parent.fill(at, read).await?;
            for h in holes {
                // Whole blocks (holes follow whole-block writes).
                let (a, b) = (h.start as u64 / bs * bs, (h.end as u64).div_ceil(bs) * bs);
                let data = filled.slice(a as usize..(b as usize).min(filled.len()));
                if data.is_empty() {
                    continue;
                }
                let n = data.len() as u64;
                self.write(at + a, data).await?;
                copied += n;
            }
        }
        Ok(copied)
    }

    /// The snapshot this handle reads (name, epoch), if it is one: then it is read-only.
    pub fn snapshot(&self) -> Option<(&str, Epoch)> {
        self.inner.snapshot.as_ref().map(|(n, e)| (n.as_str(), *e))
    }

    fn check_writable(&self) -> Result<(), VolumeError> {
        match &self.inner.snapshot {
            Some((name, _)) => Err(VolumeError::ReadOnly(format!("{}@{name} is a snapshot", self.inner.info.name))),
            None => Ok(()),
        }
    }

    /// Writes `data` at `offset` (multiples of the block size). When it returns `Ok` the data is
    /// durable on every writable shard.
    pub async fn write(&self, offset: u64, data: Bytes) -> Result<(), VolumeError> {
        self.check_writable()?;
        let mapping = self.map_range(offset, data.len() as u64)?;
        let epoch = hlc::now();
        self.inner.mutate(&mapping, Some(&data), epoch).await
    }

    /// A write whose client took its epoch `epoch` earlier and was held up since (a stalled
    /// connection, a paused process): sent now exactly as [`Volume::write`] would have sent it
    /// then, and like any write sent again at a new epoch if an engine's commit window has
    /// passed. For fault-injection tests of what may and may not happen above the stable epoch.
    #[doc(hidden)]
    pub async fn write_held_up_since(&self, epoch: Epoch, offset: u64, data: Bytes) -> Result<(), VolumeError> {
        self.check_writable()?;
        let mapping = self.map_range(offset, data.len() as u64)?;
        self.inner.mutate(&mapping, Some(&data), epoch).await
    }

    /// A write (`Some`) or write-zeroes (`None`) torn by its client's death: only the shards
    /// numbered in `shards` (EC: `0..k` data, `k..` parity) take their part, once. Returns its
    /// epoch. For fault-injection tests of how torn stripes are settled.
    #[doc(hidden)]
    pub async fn write_torn(&self, offset: u64, len: u64, data: Option<Bytes>, shards: &[u32]) -> Result<Epoch, VolumeError> {
        self.check_writable()?;
        let mapping = self.map_range(offset, len)?;
        self.inner.mutate_torn(&mapping, data.as_ref(), shards).await
    }

    /// Makes `len` bytes at `offset` read as zeros (whole stripes punched, the rest written as
    /// zeros; a clone or a rolled-back volume writes zeros everywhere: a hole there reads older
    /// data).
    /// Durable when it returns `Ok`.
    pub async fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), VolumeError> {
        self.check_writable()?;
        let mapping = self.map_range(offset, len)?;
        // A clone's or a rolled-back volume's holes mean "read older data" (the parent's, the
        // snapshot's): they write zeros instead of punching.
        if self.inner.parent.is_none() && self.inner.rollbacks.is_empty() {
            return self.inner.mutate(&mapping, None, hlc::now()).await;
        }
        let zeros = Bytes::from(vec![0u8; len.min(CLONE_ZEROES_STEP) as usize]);
        let mut at = offset;
        while at < offset + len {
            let n = (offset + len - at).min(CLONE_ZEROES_STEP);
            let step = self.map_range(at, n)?;
            self.inner.mutate(&step, Some(&zeros.slice(..n as usize)), hlc::now()).await?;
            at += n;
        }
        Ok(())
    }

    /// Reads `len` bytes at `offset` (both multiples of the block size): as of now, or as of its
    /// epoch for a snapshot.
    pub async fn read(&self, offset: u64, len: u64) -> Result<Bytes, VolumeError> {
        let mapping = self.map_range(offset, len)?;
        let epoch = self.inner.snapshot.as_ref().map_or_else(hlc::now, |(_, e)| *e);
        let v = &*self.inner;
        let reads = join_all(mapping.pieces.iter().map(|p| v.read_piece_at(p, epoch))).await;
        let mut results: Vec<Result<Bytes, VolumeError>> = match &v.parent {
            // Where a clone never wrote, its parent's bytes.
            Some(parent) => {
                join_all(mapping.pieces.iter().zip(reads).map(|(p, r)| async move {
                    match r {
                        Ok(read) if !read.holes.is_empty() => parent.fill(offset + p.buf_offset, read).await,
                        other => other.map(|read| read.data),
                    }
                }))
                .await
            }
            None => reads.into_iter().map(|r| r.map(|read| read.data)).collect(),
        };
        if results.len() == 1 {
            // One piece (a read inside one cell, the common small read): its bytes are the
            // whole answer, no copy.
            if let Some(r) = results.pop() {
                return r;
            }
        }
        let mut out = BytesMut::zeroed(len as usize);
        for (p, r) in mapping.pieces.iter().zip(results) {
            let bytes = r?;
            let at = p.buf_offset as usize;
            out[at..at + p.len as usize].copy_from_slice(&bytes);
        }
        Ok(out.freeze())
    }
}

impl VolumeInner {
    /// A piece as of `epoch`, rollbacks applied: if the newest rollback below `epoch` was at
    /// `at`, what the read finds written at or below `at`, and its holes (a punch before the
    /// rollback; after one, the volume writes zeros instead of punching), are read again at the
    /// rollback's snapshot epoch (which may itself be after an older rollback).
    async fn read_piece_at(&self, p: &Piece, epoch: Epoch) -> Result<read::Read, VolumeError> {
        let mut r = self.read_piece(p, epoch).await?;
        let mut at_epoch = epoch;
        // Each step reads at an older epoch: the loop ends (at most once per rollback).
        while let Some(&(at, to)) = self.rollbacks.iter().rev().find(|(at, _)| *at < at_epoch) {
            let mut stale = r.written_at_or_below(at);
            stale.extend(r.holes.iter().cloned());
            if stale.is_empty() {
                break;
            }
            let older = self.read_piece(p, to).await?;
            r = r.overlay(&stale, &older);
            // Only bytes just taken from `to` can be stale under an older rollback.
            at_epoch = to;
        }
        Ok(r)
    }

    fn group(&self, view: &PoolView, dkey: &Bytes) -> Result<Group, VolumeError> {
        layout_for_dkey(&view.map, self.oid, dkey, self.class).map_err(|e| VolumeError::Config(e.to_string()))
    }

    /// Sends one request to one shard.
    async fn call(&self, view: &PoolView, shard: &ShardPlacement, req: Request) -> Result<Reply, ShardError> {
        self.call_target(view, shard.target(), req).await
    }

    /// Sends one request to one target.
    async fn call_target(&self, view: &PoolView, target: TargetRef, req: Request) -> Result<Reply, ShardError> {
        let shard = target;
        let addr = *view.addrs.get(&shard.rank).ok_or_else(|| ShardError::Failed(format!("no address for engine {}", shard.rank)))?;
        let conn =
            self.cluster.connection(addr).await.map_err(|e| ShardError::Unreachable(format!("engine {} at {addr}: {e}", shard.rank)))?;
        match conn.call_at(self.pool.pool_id, view.map.version(), shard.index, req).await {
            Ok(r) => Ok(r),
            Err(RpcError::Remote { status: RpcStatus::StaleMapVersion, .. }) => Err(ShardError::Stale),
            Err(RpcError::Remote { status: RpcStatus::EpochTooOld, message }) => {
                Err(ShardError::EpochTooOld(format!("engine {} target {}: {message}", shard.rank, shard.index)))
            }
            Err(RpcError::Remote { status: RpcStatus::ChecksumMismatch | RpcStatus::DataCorrupt, message }) => {
                self.counters.checksum_errors.fetch_add(1, Ordering::Relaxed);
                warn!(volume = %self.info.name, rank = shard.rank, target = shard.index, %message, "checksum error on an engine");
                Err(ShardError::Checksum(message))
            }
            Err(RpcError::Remote { status: RpcStatus::ShuttingDown, message }) => Err(ShardError::Unreachable(message)),
            Err(e @ RpcError::Remote { .. }) => Err(ShardError::Failed(format!("engine {} target {}: {e}", shard.rank, shard.index))),
            Err(e) => Err(ShardError::Unreachable(format!("engine {} at {addr}: {e}", shard.rank))),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::sync::RwLock;
    use std::time::Instant;

    use tessera_mgmt_api::MgmtClient;

    use super::*;
    use crate::placement::PoolMap;

    /// A volume of 4 MiB (chunk 1 MiB, cell 16 KiB) of `class` on a pool with map `map`, whose
    /// engines are never reached (for planning).
    pub(super) fn volume(class: &str, map: PoolMap) -> VolumeInner {
        let class: ObjectClass = class.parse().unwrap();
        let layout = VolumeLayout::new(4 << 20, 4096, 1 << 20, 16 * 1024, class).unwrap();
        let addrs = map.engines().iter().map(|e| (e.rank, SocketAddr::from(([127, 0, 0, 1], 7410 + e.rank as u16)))).collect();
        let pool = Arc::new(PoolCache {
            name: "p".into(),
            pool_id: 1,
            view: RwLock::new(Arc::new(PoolView { map, addrs, map_epoch: 0 })),
            refresh: tokio::sync::Mutex::new(Instant::now()),
        });
        let info = VolumeInfo {
            pool: "p".into(),
            pool_id: 1,
            name: "v".into(),
            uuid: uuid::Uuid::from_u128(77),
            size: 4 << 20,
            block_size: 4096,
            class: class.to_string(),
            cell_size: 16 * 1024,
            chunk_size: 1 << 20,
            checksum: true,
            created: 0,
            snapshots: Vec::new(),
            parent: None,
            flattening: false,
            rollbacks: Vec::new(),
            allocated_bytes: None,
        };
        VolumeInner {
            cluster: Cluster::new(MgmtClient::new("127.0.0.1:9")),
            pool,
            info,
            layout,
            class,
            codec: if class.is_ec() { Some(Codec::for_class(class).unwrap()) } else { None },
            cont: ContainerId(77),
            oid: ObjectId(77),
            snapshot: None,
            parent: None,
            rollbacks: Vec::new(),
            counters: Counters::default(),
        }
    }

    fn assert_send<T: Send>(_: T) {}

    #[allow(dead_code)]
    fn volume_futures_are_send(v: &Volume) {
        assert_send(v.read(0, 4096));
        assert_send(v.write(0, Bytes::new()));
        assert_send(v.write_zeroes(0, 4096));
    }
}
