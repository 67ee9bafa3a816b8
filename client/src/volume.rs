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

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use futures::future::join_all;
use tessera_engine_proto::{
    key_from_u64, ContainerId, DataRun, Epoch, Fetch, FetchReply, FetchValue, ObjectId, Punch, PunchTarget, Reply, Request, RpcStatus,
    Update, UpdateValue,
};
use tessera_mgmt_api::{MgmtClient, PoolMapInfo, TargetStateName, VolumeInfo};
use tracing::{debug, info, warn};

use crate::ec::Codec;
use crate::hlc;
use crate::layout::{Mapping, Piece, VolumeLayout};
use crate::placement::{layout_for_dkey, Group, ObjectClass, PoolMap, ShardPlacement, TargetEntry, TargetState};
use crate::rpc::{ConnectionOptions, EngineConnection, RpcError};

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
/// Shortest interval between two pool map fetches of one pool.
const MIN_REFRESH_INTERVAL: Duration = Duration::from_millis(100);

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
}

#[derive(Debug, Default)]
struct Counters {
    degraded_reads: AtomicU64,
    checksum_errors: AtomicU64,
    degraded_writes: AtomicU64,
}

/// A pool map as the client uses it: placement map plus engine addresses.
#[derive(Debug)]
struct PoolView {
    map: PoolMap,
    addrs: HashMap<u32, SocketAddr>,
}

impl PoolView {
    fn from_info(info: &PoolMapInfo) -> Result<PoolView, VolumeError> {
        let targets = info
            .targets
            .iter()
            .map(|t| TargetEntry {
                rank: t.rank,
                index: t.index,
                state: match t.state {
                    TargetStateName::Up => TargetState::Up,
                    TargetStateName::Down => TargetState::Down,
                    TargetStateName::DownOut => TargetState::DownOut,
                    TargetStateName::UpIn => TargetState::UpIn,
                },
                fseq: t.fseq,
            })
            .collect();
        // States and failure sequences come from the service, which keeps them with `PoolMap`.
        let map = PoolMap::new(info.version, targets).map_err(|e| VolumeError::Config(format!("pool map: {e}")))?;
        let mut addrs = HashMap::new();
        for e in &info.engines {
            let a: SocketAddr = e.address.parse().map_err(|_| VolumeError::Config(format!("engine {} address {:?}", e.rank, e.address)))?;
            addrs.insert(e.rank, a);
        }
        Ok(PoolView { map, addrs })
    }
}

/// One pool's cached map.
#[derive(Debug)]
struct PoolCache {
    name: String,
    pool_id: u32,
    view: RwLock<Arc<PoolView>>,
    refresh: tokio::sync::Mutex<Instant>,
}

impl PoolCache {
    fn current(&self) -> Arc<PoolView> {
        self.view.read().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// Shared client state: the management service, cached pool maps and one connection per
/// engine. One per process.
#[derive(Debug)]
pub struct Cluster {
    mgmt: MgmtClient,
    pools: Mutex<HashMap<String, Arc<PoolCache>>>,
    conns: Mutex<HashMap<SocketAddr, EngineConnection>>,
    opts: ConnectionOptions,
}

impl Cluster {
    /// A cluster handle using the management service at `mgmt`.
    pub fn new(mgmt: MgmtClient) -> Arc<Cluster> {
        let opts =
            ConnectionOptions { timeout: Duration::from_secs(5), connect_timeout: Duration::from_secs(2), ..ConnectionOptions::default() };
        Arc::new(Cluster { mgmt, pools: Mutex::new(HashMap::new()), conns: Mutex::new(HashMap::new()), opts })
    }

    /// The management client.
    pub fn mgmt(&self) -> &MgmtClient {
        &self.mgmt
    }

    /// Opens a volume (fetches its pool's map).
    pub async fn open_volume(self: &Arc<Self>, info: &VolumeInfo) -> Result<Volume, VolumeError> {
        let class: ObjectClass = info.class.parse().map_err(|e| VolumeError::Config(format!("volume {}: {e}", info.name)))?;
        let layout = VolumeLayout::new(info.size, info.block_size, info.chunk_size, info.cell_size, class)
            .map_err(|e| VolumeError::Config(format!("volume {}: {e}", info.name)))?;
        let codec = match class {
            ObjectClass::Ec { .. } => Some(Codec::for_class(class).map_err(|e| VolumeError::Config(e.to_string()))?),
            _ => None,
        };
        let pool = self.pool(&info.pool, info.pool_id).await?;
        let id = info.uuid.as_u128();
        Ok(Volume {
            inner: Arc::new(VolumeInner {
                cluster: self.clone(),
                pool,
                info: info.clone(),
                layout,
                class,
                codec,
                cont: ContainerId(id),
                oid: ObjectId(id),
                counters: Counters::default(),
            }),
        })
    }

    async fn pool(&self, name: &str, pool_id: u32) -> Result<Arc<PoolCache>, VolumeError> {
        if let Some(p) = self.pools.lock().unwrap_or_else(|e| e.into_inner()).get(name) {
            return Ok(p.clone());
        }
        let info = self.mgmt.pool_map(name).await.map_err(|e| VolumeError::Config(format!("pool {name}: {e}")))?;
        if info.pool_id != pool_id {
            return Err(VolumeError::Config(format!("pool {name} has id {} but the volume says {pool_id}", info.pool_id)));
        }
        let cache = Arc::new(PoolCache {
            name: name.to_string(),
            pool_id,
            view: RwLock::new(Arc::new(PoolView::from_info(&info)?)),
            refresh: tokio::sync::Mutex::new(Instant::now()),
        });
        let mut pools = self.pools.lock().unwrap_or_else(|e| e.into_inner());
        Ok(pools.entry(name.to_string()).or_insert(cache).clone())
    }

    /// Fetches the pool's map again (at most every [`MIN_REFRESH_INTERVAL`]; concurrent callers
    /// share one fetch). Keeps the old map if the service cannot be reached.
    async fn refresh(&self, pool: &PoolCache) {
        let before = pool.current().map.version();
        let mut last = pool.refresh.lock().await;
        if pool.current().map.version() != before || last.elapsed() < MIN_REFRESH_INTERVAL {
            return;
        }
        *last = Instant::now();
        match self.mgmt.pool_map(&pool.name).await {
            Ok(info) => match PoolView::from_info(&info) {
                // A newer map, or the same map with an engine at a new address (restarted).
                Ok(view) if view.map.version() > before || (view.map.version() == before && view.addrs != pool.current().addrs) => {
                    info!(pool = %pool.name, from = before, to = view.map.version(), "pool map updated");
                    *pool.view.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(view);
                }
                Ok(_) => {}
                Err(e) => warn!(pool = %pool.name, error = %e, "bad pool map from the management service"),
            },
            Err(e) => debug!(pool = %pool.name, error = %e, "cannot refresh the pool map"),
        }
    }

    async fn connection(&self, addr: SocketAddr) -> Result<EngineConnection, RpcError> {
        if let Some(c) = self.conns.lock().unwrap_or_else(|e| e.into_inner()).get(&addr) {
            if !c.is_closed() {
                return Ok(c.clone());
            }
        }
        let c = EngineConnection::connect(addr, self.opts).await?;
        let mut conns = self.conns.lock().unwrap_or_else(|e| e.into_inner());
        match conns.get(&addr) {
            Some(existing) if !existing.is_closed() => Ok(existing.clone()),
            _ => {
                conns.insert(addr, c.clone());
                Ok(c)
            }
        }
    }
}

/// How one shard request failed.
#[derive(Debug)]
enum ShardError {
    /// The engine could not be reached or did not answer: the shard may come back or be marked
    /// DOWN.
    Unreachable(String),
    /// Our pool map is older than the engine's.
    Stale,
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
    counters: Counters,
}

/// One update or punch for one shard.
#[derive(Debug, Clone)]
struct ShardOp {
    shard: ShardPlacement,
    req: Request,
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
        }
    }

    fn map_range(&self, offset: u64, len: u64) -> Result<Mapping, VolumeError> {
        let bs = u64::from(self.inner.layout.block_size());
        if !offset.is_multiple_of(bs) || !len.is_multiple_of(bs) {
            return Err(VolumeError::Range(format!("{offset}+{len} is not aligned to the block size {bs}")));
        }
        self.inner.layout.map(offset, len).map_err(|e| VolumeError::Range(e.to_string()))
    }

    /// Writes `data` at `offset` (multiples of the block size). When it returns `Ok` the data is
    /// durable on every writable shard.
    pub async fn write(&self, offset: u64, data: Bytes) -> Result<(), VolumeError> {
        let mapping = self.map_range(offset, data.len() as u64)?;
        let epoch = hlc::now();
        self.inner.mutate(&mapping, Some(&data), epoch).await
    }

    /// Makes `len` bytes at `offset` read as zeros (whole stripes punched, the rest written as
    /// zeros). Durable when it returns `Ok`.
    pub async fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), VolumeError> {
        let mapping = self.map_range(offset, len)?;
        let epoch = hlc::now();
        self.inner.mutate(&mapping, None, epoch).await
    }

    /// Reads `len` bytes at `offset` (both multiples of the block size).
    pub async fn read(&self, offset: u64, len: u64) -> Result<Bytes, VolumeError> {
        let mapping = self.map_range(offset, len)?;
        let epoch = hlc::now();
        let v = &*self.inner;
        let mut results = join_all(mapping.pieces.iter().map(|p| v.read_piece(p, epoch))).await;
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

fn array_update(cont: ContainerId, oid: ObjectId, epoch: Epoch, dkey: &Bytes, akey: &'static [u8], offset: u64, data: Bytes) -> Request {
    Request::Update(Update {
        cont,
        obj: oid,
        epoch,
        dkey: dkey.clone(),
        akey: Bytes::from_static(akey),
        value: UpdateValue::array(offset, data),
    })
}

fn range_punch(cont: ContainerId, oid: ObjectId, epoch: Epoch, dkey: &Bytes, akey: &'static [u8], offset: u64, len: u64) -> Request {
    Request::Punch(Punch {
        cont,
        obj: oid,
        epoch,
        what: PunchTarget::Range { dkey: dkey.clone(), akey: Bytes::from_static(akey), offset, len },
    })
}

impl VolumeInner {
    fn group(&self, view: &PoolView, dkey: &Bytes) -> Result<Group, VolumeError> {
        layout_for_dkey(&view.map, self.oid, dkey, self.class).map_err(|e| VolumeError::Config(e.to_string()))
    }

    /// Sends one request to one shard.
    async fn call(&self, view: &PoolView, shard: &ShardPlacement, req: Request) -> Result<Reply, ShardError> {
        let addr = *view.addrs.get(&shard.rank).ok_or_else(|| ShardError::Failed(format!("no address for engine {}", shard.rank)))?;
        let conn =
            self.cluster.connection(addr).await.map_err(|e| ShardError::Unreachable(format!("engine {} at {addr}: {e}", shard.rank)))?;
        match conn.call_at(self.pool.pool_id, view.map.version(), shard.target_index, req).await {
            Ok(r) => Ok(r),
            Err(RpcError::Remote { status: RpcStatus::StaleMapVersion, .. }) => Err(ShardError::Stale),
            Err(RpcError::Remote { status: RpcStatus::ChecksumMismatch | RpcStatus::DataCorrupt, message }) => {
                self.counters.checksum_errors.fetch_add(1, Ordering::Relaxed);
                warn!(volume = %self.info.name, rank = shard.rank, target = shard.target_index, %message, "checksum error on an engine");
                Err(ShardError::Checksum(message))
            }
            Err(RpcError::Remote { status: RpcStatus::ShuttingDown, message }) => Err(ShardError::Unreachable(message)),
            Err(e @ RpcError::Remote { .. }) => {
                Err(ShardError::Failed(format!("engine {} target {}: {e}", shard.rank, shard.target_index)))
            }
            Err(e) => Err(ShardError::Unreachable(format!("engine {} at {addr}: {e}", shard.rank))),
        }
    }

    /// The updates and punches of one write (`data`) or write-zeroes (`None`) under `view`.
    /// Returns them and whether any shard had to be skipped.
    fn plan(&self, view: &PoolView, mapping: &Mapping, data: Option<&Bytes>, epoch: Epoch) -> Result<(Vec<ShardOp>, bool), VolumeError> {
        let (cont, oid) = (self.cont, self.oid);
        let mut ops = Vec::new();
        let mut skipped = false;
        let k = self.class.data_shards() as usize;
        let cell = u64::from(self.layout.cell_size());
        for span in &mapping.stripes {
            let dkey = key_from_u64(span.dkey);
            let group = self.group(view, &dkey)?;
            let lost = group.unavailable_count();
            if lost as u32 > self.class.parity_shards() {
                return Err(VolumeError::Unavailable(format!(
                    "{lost} of the {} shards of chunk {} are down: more than the {} the class {} survives",
                    group.shards.len(),
                    span.dkey,
                    self.class.parity_shards(),
                    self.class
                )));
            }
            let mut push = |shard: &ShardPlacement, req: Request| {
                if shard.writable() {
                    ops.push(ShardOp { shard: *shard, req });
                } else {
                    skipped = true;
                }
            };
            let pieces = mapping.pieces.get(span.first_piece..span.first_piece + span.piece_count).unwrap_or_default();
            let piece_data = |p: &Piece| -> Bytes {
                match data {
                    Some(d) => d.slice(p.buf_offset as usize..(p.buf_offset + u64::from(p.len)) as usize),
                    None => Bytes::from(vec![0u8; p.len as usize]),
                }
            };
            if !self.class.is_ec() {
                for p in pieces {
                    for s in &group.shards {
                        push(s, array_update(cont, oid, epoch, &dkey, AKEY_DELTA, p.chunk_offset, piece_data(p)));
                    }
                }
                continue;
            }
            let stripe_off = span.stripe * cell;
            match (span.full, data) {
                (true, Some(_)) => {
                    let cells: Vec<Bytes> = pieces.iter().map(piece_data).collect();
                    let codec = self.codec.as_ref().ok_or_else(|| VolumeError::Config("EC volume without a codec".into()))?;
                    let parity = codec.encode(&cells).map_err(|e| VolumeError::Config(e.to_string()))?;
                    for (c, bytes) in cells.into_iter().enumerate() {
                        push(&group.shards[c], array_update(cont, oid, epoch, &dkey, AKEY_BASE, stripe_off, bytes));
                    }
                    for (j, q) in parity.into_iter().enumerate() {
                        push(&group.shards[k + j], array_update(cont, oid, epoch, &dkey, AKEY_PARITY, stripe_off, Bytes::from(q)));
                    }
                }
                (true, None) => {
                    let stripe_chunk_off = span.stripe * cell * k as u64;
                    for s in &group.shards[..k] {
                        push(s, range_punch(cont, oid, epoch, &dkey, AKEY_BASE, stripe_off, cell));
                        push(s, range_punch(cont, oid, epoch, &dkey, AKEY_DELTA, stripe_off, cell));
                    }
                    for s in &group.shards[k..] {
                        push(s, range_punch(cont, oid, epoch, &dkey, AKEY_PARITY, stripe_off, cell));
                        push(s, range_punch(cont, oid, epoch, &dkey, AKEY_COPY, stripe_chunk_off, cell * k as u64));
                    }
                }
                (false, _) => {
                    for p in pieces {
                        let bytes = piece_data(p);
                        push(
                            &group.shards[p.cell as usize],
                            array_update(cont, oid, epoch, &dkey, AKEY_DELTA, p.shard_offset, bytes.clone()),
                        );
                        for s in &group.shards[k..] {
                            push(s, array_update(cont, oid, epoch, &dkey, AKEY_COPY, p.chunk_offset, bytes.clone()));
                        }
                    }
                }
            }
        }
        Ok((ops, skipped))
    }

    /// Runs a write or write-zeroes to completion: every writable shard of the current map
    /// acknowledges, retrying (same epoch) while shards are unreachable but not yet DOWN.
    async fn mutate(&self, mapping: &Mapping, data: Option<&Bytes>, epoch: Epoch) -> Result<(), VolumeError> {
        let start = Instant::now();
        let mut pending: Option<Vec<ShardOp>> = None;
        let mut planned_version = 0;
        loop {
            let view = self.pool.current();
            // A new map may move or drop shards: plan again; otherwise retry only what failed.
            let ops = match pending.take() {
                Some(ops) if planned_version == view.map.version() => ops,
                _ => {
                    let (ops, skipped) = self.plan(&view, mapping, data, epoch)?;
                    if skipped {
                        self.counters.degraded_writes.fetch_add(1, Ordering::Relaxed);
                    }
                    planned_version = view.map.version();
                    ops
                }
            };
            let results = join_all(ops.iter().map(|op| self.call(&view, &op.shard, op.req.clone()))).await;
            let mut failed = Vec::new();
            let mut last_error = String::new();
            let mut need_refresh = false;
            for (op, r) in ops.into_iter().zip(results) {
                match r {
                    Ok(_) => {}
                    Err(e) => {
                        need_refresh |= matches!(e, ShardError::Stale | ShardError::Unreachable(_));
                        if let ShardError::Failed(m) = &e {
                            // The engine refused (no space, failed target, invalid): retrying
                            // will not help.
                            return Err(VolumeError::Unavailable(m.clone()));
                        }
                        last_error = e.to_string();
                        failed.push(op);
                    }
                }
            }
            if failed.is_empty() {
                return Ok(());
            }
            if start.elapsed() > WRITE_DEADLINE {
                return Err(VolumeError::Unavailable(format!(
                    "write not acknowledged by every shard after {WRITE_DEADLINE:?}: {last_error}"
                )));
            }
            debug!(volume = %self.info.name, failed = failed.len(), error = %last_error, "write retry");
            if need_refresh {
                self.cluster.refresh(&self.pool).await;
            }
            if self.pool.current().map.version() == planned_version {
                tokio::time::sleep(RETRY_PAUSE).await;
                self.cluster.refresh(&self.pool).await;
            }
            pending = Some(failed);
        }
    }

    /// Reads one piece (inside one cell), degrading to copies or reconstruction as needed.
    async fn read_piece(&self, p: &Piece, epoch: Epoch) -> Result<Bytes, VolumeError> {
        let start = Instant::now();
        loop {
            let view = self.pool.current();
            let dkey = key_from_u64(p.dkey);
            let group = self.group(&view, &dkey)?;
            let r = if self.class.is_ec() {
                self.read_ec(&view, &group, &dkey, p, epoch).await
            } else {
                self.read_replica(&view, &group, &dkey, p, epoch).await
            };
            match r {
                Ok(b) => return Ok(b),
                Err(Retry::Fatal(e)) => return Err(e),
                Err(Retry::Again(e)) => {
                    if start.elapsed() > READ_DEADLINE {
                        return Err(e);
                    }
                    let before = view.map.version();
                    self.cluster.refresh(&self.pool).await;
                    let view = self.pool.current();
                    if !self.can_serve(&self.group(&view, &dkey)?, p) {
                        // The map itself says too few shards are left: no retry can help until
                        // a reintegration, so fail now rather than at the deadline.
                        return Err(e);
                    }
                    if view.map.version() == before {
                        tokio::time::sleep(RETRY_PAUSE).await;
                    }
                }
            }
        }
    }

    /// Whether the map leaves enough readable shards to serve piece `p` of this group.
    fn can_serve(&self, group: &Group, p: &Piece) -> bool {
        if !self.class.is_ec() {
            return group.readable_count() > 0;
        }
        group.shards.get(p.cell as usize).is_some_and(ShardPlacement::readable)
            || group.readable_count() >= self.class.data_shards() as usize
    }

    fn fetch(&self, dkey: &Bytes, akey: &'static [u8], offset: u64, len: u32, epoch: Epoch, also: &[&'static [u8]]) -> Request {
        Request::Fetch(Fetch {
            cont: self.cont,
            obj: self.oid,
            epoch,
            dkey: dkey.clone(),
            akey: Bytes::from_static(akey),
            what: FetchValue::Versions { offset, len, also: also.iter().map(|a| Bytes::from_static(a)).collect() },
        })
    }

    /// A versions fetch from one shard, verified end to end: data and runs.
    async fn fetch_runs(&self, view: &PoolView, shard: &ShardPlacement, req: Request) -> Result<(Bytes, Vec<DataRun>), ShardError> {
        let Reply::Fetched(f) = self.call(view, shard, req).await? else {
            return Err(ShardError::Failed(format!("engine {} answered a fetch with another reply", shard.rank)));
        };
        if let Err(chunk) = f.verify() {
            self.counters.checksum_errors.fetch_add(1, Ordering::Relaxed);
            warn!(volume = %self.info.name, rank = shard.rank, target = shard.target_index, chunk, "fetched data fails its checksum");
            return Err(ShardError::Checksum(format!("chunk {chunk} of a reply from engine {}", shard.rank)));
        }
        match f {
            FetchReply::Array { data, runs, .. } => Ok((data, runs)),
            FetchReply::Single { .. } => {
                Err(ShardError::Failed(format!("engine {} answered an array fetch with a single value", shard.rank)))
            }
        }
    }

    async fn read_replica(&self, view: &PoolView, group: &Group, dkey: &Bytes, p: &Piece, epoch: Epoch) -> Result<Bytes, Retry> {
        let n = group.shards.len();
        // Spread reads over the replicas by chunk.
        let first = (p.dkey as usize) % n;
        let mut last = String::from("no readable replica");
        let mut all_checksum = true;
        for i in 0..n {
            let s = &group.shards[(first + i) % n];
            if !s.readable() {
                continue;
            }
            let req = self.fetch(dkey, AKEY_DELTA, p.chunk_offset, p.len, epoch, &[]);
            match self.fetch_runs(view, s, req).await {
                Ok((data, _)) => {
                    if i > 0 {
                        self.counters.degraded_reads.fetch_add(1, Ordering::Relaxed);
                    }
                    return Ok(data);
                }
                Err(e) => {
                    all_checksum &= matches!(e, ShardError::Checksum(_));
                    last = e.to_string();
                }
            }
        }
        let what = format!("chunk {} offset {}: {last}", p.dkey, p.chunk_offset);
        if all_checksum && last.starts_with("checksum") {
            return Err(Retry::Fatal(VolumeError::Corrupt(what)));
        }
        Err(Retry::Again(VolumeError::Unavailable(what)))
    }

    async fn read_ec(&self, view: &PoolView, group: &Group, dkey: &Bytes, p: &Piece, epoch: Epoch) -> Result<Bytes, Retry> {
        let data_shard = &group.shards[p.cell as usize];
        if data_shard.readable() {
            let req = self.fetch(dkey, AKEY_BASE, p.shard_offset, p.len, epoch, &[AKEY_DELTA]);
            match self.fetch_runs(view, data_shard, req).await {
                Ok((data, _)) => return Ok(data),
                Err(e) => debug!(volume = %self.info.name, error = %e, "data shard read failed; degraded read"),
            }
        }
        self.counters.degraded_reads.fetch_add(1, Ordering::Relaxed);
        self.read_ec_degraded(view, group, dkey, p, epoch).await
    }

    /// Cell `p.cell` without its data shard: copies newer than the parity, the rest rebuilt
    /// from k other cells at the parity's epoch.
    async fn read_ec_degraded(&self, view: &PoolView, group: &Group, dkey: &Bytes, p: &Piece, epoch: Epoch) -> Result<Bytes, Retry> {
        let k = self.class.data_shards() as usize;
        let len = p.len as usize;
        let mut last = String::from("no readable parity shard");
        for q in k..group.shards.len() {
            let ps = &group.shards[q];
            if !ps.readable() {
                continue;
            }
            let copies = self.fetch_runs(view, ps, self.fetch(dkey, AKEY_COPY, p.chunk_offset, p.len, epoch, &[]));
            let parity = self.fetch_runs(view, ps, self.fetch(dkey, AKEY_PARITY, p.shard_offset, p.len, epoch, &[]));
            let (copies, parity) = futures::join!(copies, parity);
            let ((copy_data, copy_runs), (parity_data, parity_runs)) = match (copies, parity) {
                (Ok(c), Ok(pa)) => (c, pa),
                (Err(e), _) | (_, Err(e)) => {
                    last = e.to_string();
                    continue;
                }
            };
            let e_p = match single_epoch(&parity_runs, len) {
                Ok(e) => e,
                Err(m) => return Err(Retry::Fatal(VolumeError::Corrupt(format!("chunk {} parity cell: {m}", p.dkey)))),
            };
            // Bytes whose newest copy is newer than the parity come from the copy.
            let mut out = vec![0u8; len];
            let mut from_copy = vec![false; len];
            for r in &copy_runs {
                if e_p.is_none_or(|e| r.epoch > e) {
                    let (a, b) = (r.offset as usize, (r.offset + r.len) as usize);
                    out[a..b].copy_from_slice(&copy_data[a..b]);
                    from_copy[a..b].iter_mut().for_each(|f| *f = true);
                }
            }
            let Some(e_p) = e_p else {
                // No full-stripe write is visible: what no copy covers was never written.
                return Ok(Bytes::from(out));
            };
            if from_copy.iter().all(|&f| f) {
                return Ok(Bytes::from(out));
            }
            let base = self.reconstruct(view, group, dkey, p, e_p, q, parity_data).await?;
            for (i, b) in base.into_iter().enumerate() {
                if !from_copy[i] {
                    out[i] = b;
                }
            }
            return Ok(Bytes::from(out));
        }
        Err(Retry::Again(VolumeError::Unavailable(format!(
            "chunk {} cell {}: data shard unavailable and no parity shard could serve it ({last})",
            p.dkey, p.cell
        ))))
    }

    /// Cell `p.cell`'s bytes `p.shard_offset..+len` as of the full-stripe write at `e_p`, from
    /// the other data shards' base cells and the parity (`parity_data` from parity shard `q`).
    #[allow(clippy::too_many_arguments)]
    async fn reconstruct(
        &self,
        view: &PoolView,
        group: &Group,
        dkey: &Bytes,
        p: &Piece,
        e_p: Epoch,
        q: usize,
        parity_data: Bytes,
    ) -> Result<Vec<u8>, Retry> {
        let k = self.class.data_shards() as usize;
        let total = group.shards.len();
        let len = p.len as usize;
        let mut cells: Vec<Option<Vec<u8>>> = vec![None; total];
        cells[q] = Some(parity_data.to_vec());
        let mut have = 1;
        // Other data shards first (cheapest to combine), then further parity shards.
        let candidates: Vec<usize> = (0..k).filter(|&c| c != p.cell as usize).chain((k..total).filter(|&j| j != q)).collect();
        let reads = candidates.iter().filter(|&&i| group.shards[i].readable()).map(|&i| {
            let akey = if i < k { AKEY_BASE } else { AKEY_PARITY };
            let req = self.fetch(dkey, akey, p.shard_offset, p.len, e_p, &[]);
            async move { (i, self.fetch_runs(view, &group.shards[i], req).await) }
        });
        let mut problems = Vec::new();
        for (i, r) in join_all(reads).await {
            match r {
                Ok((data, runs)) => match single_epoch(&runs, len) {
                    Ok(Some(e)) if e == e_p => {
                        if have < k {
                            cells[i] = Some(data.to_vec());
                            have += 1;
                        }
                    }
                    Ok(other) => problems.push(format!("shard {i} holds epoch {other:?}, parity {e_p}")),
                    Err(m) => problems.push(format!("shard {i}: {m}")),
                },
                Err(e) => problems.push(format!("shard {i}: {e}")),
            }
        }
        if have < k {
            let msg = format!("chunk {} cell {}: cannot rebuild from {have} of {k} cells: {}", p.dkey, p.cell, problems.join("; "));
            // Cells at another epoch than the parity mean a torn or racing full-stripe write:
            // retry (a racing write settles), give up as corrupt at the deadline.
            return Err(Retry::Again(VolumeError::Unavailable(msg)));
        }
        let codec = self.codec.as_ref().ok_or_else(|| Retry::Fatal(VolumeError::Config("EC volume without a codec".into())))?;
        codec.reconstruct_data(&mut cells).map_err(|e| Retry::Fatal(VolumeError::Corrupt(e.to_string())))?;
        cells[p.cell as usize].take().ok_or_else(|| Retry::Fatal(VolumeError::Corrupt("reconstruction left the cell empty".into())))
    }
}

/// A read attempt's failure: try again (after a map refresh) or give up.
enum Retry {
    Again(VolumeError),
    Fatal(VolumeError),
}

/// The one epoch the runs of a whole cell range share: `None` if there is no data at all, an
/// error if the range is partly written or written at several epochs.
fn single_epoch(runs: &[DataRun], len: usize) -> Result<Option<Epoch>, String> {
    let Some(first) = runs.first() else { return Ok(None) };
    let covered: usize = runs.iter().map(|r| r.len as usize).sum();
    if covered != len || runs.iter().any(|r| r.epoch != first.epoch) {
        return Err(format!(
            "{covered} of {len} bytes written, at {} epochs",
            runs.iter().map(|r| r.epoch).collect::<std::collections::BTreeSet<_>>().len()
        ));
    }
    Ok(Some(first.epoch))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_epoch_rules() {
        let run = |offset, len, epoch| DataRun { offset, len, epoch };
        assert_eq!(single_epoch(&[], 100), Ok(None));
        assert_eq!(single_epoch(&[run(0, 100, 7)], 100), Ok(Some(7)));
        assert_eq!(single_epoch(&[run(0, 50, 7), run(50, 50, 7)], 100), Ok(Some(7)));
        assert!(single_epoch(&[run(0, 50, 7), run(50, 50, 8)], 100).is_err());
        assert!(single_epoch(&[run(0, 50, 7)], 100).is_err());
    }

    fn volume(class: &str, map: PoolMap) -> VolumeInner {
        let class: ObjectClass = class.parse().unwrap();
        let layout = VolumeLayout::new(4 << 20, 4096, 1 << 20, 16 * 1024, class).unwrap();
        let addrs = map.engines().iter().map(|e| (e.rank, SocketAddr::from(([127, 0, 0, 1], 7410 + e.rank as u16)))).collect();
        let pool = Arc::new(PoolCache {
            name: "p".into(),
            pool_id: 1,
            view: RwLock::new(Arc::new(PoolView { map, addrs })),
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
            counters: Counters::default(),
        }
    }

    /// (akey, offset, length, is a punch) of every planned op, sorted.
    fn summary(ops: &[ShardOp]) -> Vec<(Vec<u8>, u64, u64, bool)> {
        let mut v: Vec<_> = ops
            .iter()
            .map(|op| match &op.req {
                Request::Update(u) => match &u.value {
                    UpdateValue::Array { offset, data, .. } => (u.akey.to_vec(), *offset, data.len() as u64, false),
                    UpdateValue::Single { .. } => panic!("single value planned"),
                },
                Request::Punch(Punch { what: PunchTarget::Range { akey, offset, len, .. }, .. }) => (akey.to_vec(), *offset, *len, true),
                other => panic!("unexpected {other:?}"),
            })
            .collect();
        v.sort();
        v
    }

    #[test]
    fn ec_plans_full_stripes_as_base_and_parity_and_partial_ones_as_delta_and_copies() {
        let v = volume("EC_2P1", PoolMap::uniform(3, 2).unwrap());
        let view = v.pool.current();
        // Bytes 32 KiB .. 72 KiB: stripe 1 whole (32..64 KiB), stripe 2 partly (64..72 KiB).
        let data = Bytes::from(vec![7u8; 40 * 1024]);
        let (ops, skipped) = v.plan(&view, &v.layout.map(32 * 1024, 40 * 1024).unwrap(), Some(&data), 5).unwrap();
        assert!(!skipped);
        let b = |s: &str| s.as_bytes().to_vec();
        assert_eq!(
            summary(&ops),
            vec![
                (b("B"), 16384, 16384, false), // stripe 1, cell 0
                (b("B"), 16384, 16384, false), // stripe 1, cell 1
                (b("C"), 65536, 8192, false),  // copy of the fragment at its chunk offset
                (b("D"), 32768, 8192, false),  // stripe 2, cell 0, shard offset 2 × 16 KiB
                (b("P"), 16384, 16384, false), // stripe 1 parity
            ]
        );
        // Every shard of a group is on its own engine; the parity of a full stripe is the
        // code's parity of the two cells.
        let group = v.group(&view, &key_from_u64(0)).unwrap();
        let ranks: std::collections::BTreeSet<_> = group.shards.iter().map(|s| s.rank).collect();
        assert_eq!(ranks.len(), 3);
        let parity = ops.iter().find_map(|op| match &op.req {
            Request::Update(u) if &u.akey[..] == b"P" => Some(u.value.data().clone()),
            _ => None,
        });
        let expect = Codec::new(2, 1).unwrap().encode(&[vec![7u8; 16384], vec![7u8; 16384]]).unwrap();
        assert_eq!(parity.unwrap().to_vec(), expect[0]);
    }

    #[test]
    fn write_zeroes_punches_whole_stripes_in_every_akey_and_writes_zeros_elsewhere() {
        let v = volume("EC_2P1", PoolMap::uniform(3, 1).unwrap());
        let view = v.pool.current();
        let (ops, _) = v.plan(&view, &v.layout.map(28 * 1024, 36 * 1024).unwrap(), None, 5).unwrap();
        let b = |s: &str| s.as_bytes().to_vec();
        assert_eq!(
            summary(&ops),
            vec![
                (b("B"), 16384, 16384, true),
                (b("B"), 16384, 16384, true),
                (b("C"), 28672, 4096, false), // the partial piece of stripe 0, as zeros
                (b("C"), 32768, 32768, true),
                (b("D"), 12288, 4096, false),
                (b("D"), 16384, 16384, true),
                (b("D"), 16384, 16384, true),
                (b("P"), 16384, 16384, true),
            ]
        );
        assert!(ops.iter().all(|op| match &op.req {
            Request::Update(u) => u.value.data().iter().all(|&x| x == 0),
            _ => true,
        }));
    }

    #[test]
    fn plans_skip_down_shards_and_refuse_more_than_p() {
        let map = PoolMap::uniform(3, 1).unwrap().set_engine_state(1, TargetState::Down).unwrap();
        let v = volume("EC_2P1", map);
        let view = v.pool.current();
        let data = Bytes::from(vec![1u8; 4096]);
        let (ops, skipped) = v.plan(&view, &v.layout.map(0, 4096).unwrap(), Some(&data), 5).unwrap();
        assert!(ops.iter().all(|op| op.shard.rank != 1));
        let group = v.group(&view, &key_from_u64(0)).unwrap();
        assert_eq!(skipped, group.shards.iter().any(|s| s.rank == 1 && (s.shard == 0 || s.shard == 2)));
        let map =
            PoolMap::uniform(3, 1).unwrap().set_engine_state(1, TargetState::Down).unwrap().set_engine_state(2, TargetState::Down).unwrap();
        let v = volume("EC_2P1", map);
        let view = v.pool.current();
        let e = v.plan(&view, &v.layout.map(0, 4096).unwrap(), Some(&data), 5).unwrap_err();
        assert!(matches!(e, VolumeError::Unavailable(_)), "{e}");
        // Three replicas survive two losses.
        let map =
            PoolMap::uniform(3, 1).unwrap().set_engine_state(1, TargetState::Down).unwrap().set_engine_state(2, TargetState::Down).unwrap();
        let v = volume("RP_3", map);
        let view = v.pool.current();
        let (ops, skipped) = v.plan(&view, &v.layout.map(0, 4096).unwrap(), Some(&data), 5).unwrap();
        assert_eq!((ops.len(), skipped), (1, true));
    }

    fn assert_send<T: Send>(_: T) {}

    #[allow(dead_code)]
    fn volume_futures_are_send(v: &Volume) {
        assert_send(v.read(0, 4096));
        assert_send(v.write(0, Bytes::new()));
        assert_send(v.write_zeroes(0, 4096));
    }
}
