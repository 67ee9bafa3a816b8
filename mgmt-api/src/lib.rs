//! The management service's HTTP/JSON API: request and response types shared by the service
//! (`tessera-mgmt`), the engines, the NVMe/TCP target and the CLI, and [`MgmtClient`], the async
//! client they use. `docs/MGMT-API.md` documents every endpoint.
//!
//! Every endpoint lives under `/v1`. Errors are a 4xx/5xx status with an [`ApiError`] body
//! (`{"error": "one line"}`). Every state change is one versioned transaction of the service's
//! store; [`ClusterVersion`] fields carry that transaction number.
#![forbid(unsafe_code)]

use std::time::Duration;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

mod client;
mod heal;
mod resv;
pub use client::*;
pub use heal::*;
pub use resv::*;

/// Default address of the management service.
pub const DEFAULT_MGMT_ADDR: &str = "127.0.0.1:7400";

/// The store's transaction number: grows by one with every committed change.
pub type ClusterVersion = u64;

/// Error body of every non-2xx response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiError {
    /// One line saying what was wrong.
    pub error: String,
}

// ---------------------------------------------------------------------------------------------
// System map: engines.

/// State of an engine in the system map.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EngineState {
    /// Registered and heartbeating.
    Up,
    /// Missed heartbeats for longer than the service's timeout (its targets were set DOWN in
    /// every pool map), or never heard from since the service started and the timeout passed.
    Down,
}

/// `POST /v1/engines`: an engine registers (at every start).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegisterEngine {
    /// The engine's rank (from its config). A rank is bound to the engine's `uuid` the first
    /// time it registers; another uuid claiming it is refused (409).
    pub rank: u32,
    /// The engine's identity (stored in its data directory).
    pub uuid: Uuid,
    /// Address clients reach its RPC server at (`ip:port`).
    pub address: String,
    /// Fault domain (defaults to `rank-<rank>` when empty): no two shards of a redundancy
    /// group land in one fault domain.
    #[serde(default)]
    pub fault_domain: String,
    /// Number of targets.
    pub targets: u16,
    /// Capacity of each target, bytes.
    pub target_capacity: u64,
}

/// Pool map version of one pool, as engines need it to reject stale requests.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolVersion {
    /// The pool's numeric id (carried in every engine RPC's header).
    pub pool_id: u32,
    /// Its current pool map version.
    pub map_version: u32,
    /// The pool's name (engines fetch its map and volumes to rebuild and scrub).
    #[serde(default)]
    pub name: String,
}

/// Reply to a registration or a heartbeat.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeartbeatReply {
    /// How often the engine should heartbeat, milliseconds.
    pub heartbeat_interval_ms: u64,
    /// Current map versions of every pool that has targets on this engine.
    pub pools: Vec<PoolVersion>,
    /// The snapshot epochs every volume of those pools retains (volumes without snapshots are
    /// left out).
    #[serde(default)]
    pub retention: Vec<VolumeRetention>,
    /// The epoch `retention` is complete up to: every snapshot taken later has a larger epoch.
    /// Engines never aggregate above it (0: nothing is known yet).
    #[serde(default)]
    pub retention_as_of: u64,
}

/// The snapshot epochs of one volume (its container on the engines), in a heartbeat reply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeRetention {
    /// The volume's uuid: its container id on the engines.
    pub volume: Uuid,
    /// Its snapshots' epochs, ascending.
    pub epochs: Vec<u64>,
}

/// `POST /v1/engines/{rank}/heartbeat` body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Heartbeat {
    /// The engine's identity; a heartbeat from another uuid than the registered one is refused.
    pub uuid: Uuid,
    /// The lowest stable epoch of the engine's targets (docs/PLACEMENT.md, "The stable epoch");
    /// 0: not reported.
    #[serde(default)]
    pub stable_epoch: u64,
    /// Bytes in use on the engine's targets, by their own accounting (`None`: not reported).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub used_bytes: Option<u64>,
    /// The space each volume (container) takes on the engine's targets, by their own
    /// accounting (`None`: not reported).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volumes: Option<Vec<VolumeUsage>>,
}

/// The space one volume takes on one engine (heartbeat).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeUsage {
    /// The volume (its container).
    pub uuid: Uuid,
    /// Bytes its versions take: what its head reads, what its snapshots keep, and what waits
    /// for aggregation.
    pub bytes: u64,
    /// For each retained epoch (snapshot), the bytes only its view still reads: what deleting
    /// it frees. Ascending by epoch.
    #[serde(default)]
    pub retained: Vec<EpochBytes>,
}

/// Bytes held by one retained epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct EpochBytes {
    /// The epoch.
    pub epoch: u64,
    /// Bytes.
    pub bytes: u64,
}

/// An engine in the system map (`GET /v1/system`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EngineInfo {
    /// Rank.
    pub rank: u32,
    /// Identity.
    pub uuid: Uuid,
    /// RPC address.
    pub address: String,
    /// Fault domain.
    pub fault_domain: String,
    /// Number of targets.
    pub targets: u16,
    /// Capacity of each target, bytes.
    pub target_capacity: u64,
    /// State.
    pub state: EngineState,
    /// Milliseconds since its last heartbeat or registration (`None` if not heard from since
    /// the service started).
    pub last_heartbeat_ms: Option<u64>,
    /// The lowest stable epoch of its targets, from its last heartbeat (`None`: not reported
    /// since the service started).
    #[serde(default)]
    pub stable_epoch: Option<u64>,
    /// Bytes in use on its targets (every pool's volumes and snapshots, and what waits for
    /// aggregation), from its last heartbeat (`None`: not reported since the service started).
    #[serde(default)]
    pub used_bytes: Option<u64>,
}

/// `GET /v1/system`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SystemInfo {
    /// Store transaction number the answer was read at.
    pub version: ClusterVersion,
    /// Engines, by rank.
    pub engines: Vec<EngineInfo>,
    /// Heartbeat timeout, milliseconds: an engine silent this long is DOWN.
    pub heartbeat_timeout_ms: u64,
}

// ---------------------------------------------------------------------------------------------
// Pools.

/// `POST /v1/pools`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreatePool {
    /// Name (`[A-Za-z0-9._-]{1,64}`), unique.
    pub name: String,
    /// Ranks of the engines whose targets the pool spans; empty = every engine now UP.
    #[serde(default)]
    pub ranks: Vec<u32>,
    /// Default object class of its volumes (`S1`, `RP_<n>`, `EC_<k>P<p>`); default `EC_2P1`.
    #[serde(default)]
    pub default_class: Option<String>,
}

/// One target in a pool map.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolTarget {
    /// Engine rank.
    pub rank: u32,
    /// Target index in the engine.
    pub index: u16,
    /// `UP`, `DOWN`, `DOWNOUT` or `UPIN`.
    pub state: TargetStateName,
    /// Pool map version at which it last entered or left the placeable states (see
    /// `tessera_placement::placement::TargetEntry::fseq`).
    pub fseq: u32,
    /// While the target is out (DOWN, DOWNOUT) or being reintegrated (UP): reintegration copies
    /// only what changed above this epoch, and engines keep every version above it from
    /// aggregation so that punches stay visible. 0: a full rebuild onto it.
    #[serde(default)]
    pub since_epoch: u64,
    /// The operator drained it: once rebuilt elsewhere (DOWNOUT) its engine deletes its data.
    #[serde(default)]
    pub drained: bool,
    /// Pool map version at which it joined the pool: 0 for the pool's first targets, the
    /// extension's version for one added by `tessera pool extend` (see
    /// `tessera_placement::placement::TargetEntry::added`).
    #[serde(default)]
    pub added: u32,
}

/// A target state as named in the API (`tessera_placement::placement::TargetState`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum TargetStateName {
    /// Up, being integrated.
    #[serde(rename = "UP")]
    Up,
    /// Failed; never serves I/O.
    #[serde(rename = "DOWN")]
    Down,
    /// Failed and rebuilt elsewhere.
    #[serde(rename = "DOWNOUT")]
    DownOut,
    /// Up and in.
    #[serde(rename = "UPIN")]
    UpIn,
}

/// An engine of a pool map with its address, so that a client can reach every target from the
/// map alone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolEngine {
    /// Rank.
    pub rank: u32,
    /// RPC address (`ip:port`).
    pub address: String,
    /// Fault domain.
    pub fault_domain: String,
}

/// `GET /v1/pools/{pool}/map`: the pool map.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolMapInfo {
    /// Pool id (engine RPC header).
    pub pool_id: u32,
    /// Pool map version.
    pub version: u32,
    /// Engines of the pool.
    pub engines: Vec<PoolEngine>,
    /// Targets, sorted by (rank, index).
    pub targets: Vec<PoolTarget>,
    /// Version of the last *settled* map (every shard's data where its layout says: no target
    /// DOWN or UP). A shard whose target differs between the base layout and the current one,
    /// or whose target is UP, is being rebuilt: written, not read.
    #[serde(default)]
    pub base_version: u32,
    /// Targets of the base map (empty: the current map is the base).
    #[serde(default)]
    pub base_targets: Vec<PoolTarget>,
    /// How many targets the pool's redundancy groups are counted from: its size when it was
    /// created (`tessera_placement::placement::PoolMap::group_targets`). 0: all of `targets`.
    #[serde(default)]
    pub group_targets: u32,
    /// The HLC epoch at which this map version took effect (0: not recorded). A client merges it
    /// into its clock, so every write it plans with this map carries a later epoch; a rebuild
    /// discards stale versions on a shard's new home only below it.
    #[serde(default)]
    pub map_epoch: u64,
}

/// A pool (`GET /v1/pools`, `GET /v1/pools/{pool}`, reply of `POST /v1/pools`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolInfo {
    /// Name.
    pub name: String,
    /// Identity.
    pub uuid: Uuid,
    /// Numeric id (engine RPC header), unique, never reused.
    pub pool_id: u32,
    /// Default object class of new volumes.
    pub default_class: String,
    /// Total capacity of its targets, bytes.
    pub capacity: u64,
    /// Bytes promised to its volumes (sum of sizes × redundancy overhead).
    pub allocated: u64,
    /// Its map.
    pub map: PoolMapInfo,
    /// Number of volumes.
    pub volumes: u32,
    /// The rebuild (or reintegration) of the pool.
    #[serde(default)]
    pub rebuild: RebuildStatus,
    /// Scrub counters summed over the pool's engines.
    #[serde(default)]
    pub scrub: ScrubCounters,
    /// Some redundancy group has two shards in one fault domain (too few Up engines to keep
    /// them apart): the class's redundancy holds against target failures, but one engine
    /// failure may now cost two shards.
    #[serde(default)]
    pub fault_domains_reduced: bool,
    /// The pool's stable epoch: the lowest stable epoch reported by the engines holding its
    /// readable or writable targets (docs/PLACEMENT.md, "The stable epoch"). `None` until each
    /// of them has reported one.
    #[serde(default)]
    pub stable_epoch: Option<u64>,
}

// ---------------------------------------------------------------------------------------------
// Volumes.

/// `POST /v1/pools/{pool}/volumes`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreateVolume {
    /// Name, unique inside the pool (`[A-Za-z0-9._-]{1,64}`).
    pub name: String,
    /// Size in bytes: a positive multiple of the block size.
    pub size: u64,
    /// Block size: 512 or 4096 (default 4096).
    #[serde(default)]
    pub block_size: Option<u32>,
    /// Object class (default: the pool's).
    #[serde(default)]
    pub class: Option<String>,
    /// Cell size, bytes (default 64 KiB).
    #[serde(default)]
    pub cell_size: Option<u32>,
    /// Chunk (dkey) size, bytes (default 1 MiB, rounded to a multiple of k × cell).
    #[serde(default)]
    pub chunk_size: Option<u64>,
    /// End-to-end checksums (default on).
    #[serde(default)]
    pub checksum: Option<bool>,
}

/// A volume: a container whose blocks live in one object of its class.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeInfo {
    /// Pool name.
    pub pool: String,
    /// Pool id.
    pub pool_id: u32,
    /// Name.
    pub name: String,
    /// Identity: also the container id and the object id of its data on the engines.
    pub uuid: Uuid,
    /// Size, bytes.
    pub size: u64,
    /// Block size, bytes.
    pub block_size: u32,
    /// Object class.
    pub class: String,
    /// Cell size, bytes.
    pub cell_size: u32,
    /// Chunk size, bytes.
    pub chunk_size: u64,
    /// End-to-end checksums.
    pub checksum: bool,
    /// Creation time, seconds since the Unix epoch.
    pub created: u64,
    /// Its snapshots, oldest first.
    #[serde(default)]
    pub snapshots: Vec<SnapshotInfo>,
    /// For a clone: the snapshot it reads through to where it has not written (until it is
    /// flattened).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<Box<CloneParent>>,
    /// A flatten is copying the parent's data into this clone.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub flattening: bool,
    /// Rollbacks, oldest first: from each one's `at` epoch on, what was written at or below it
    /// reads as the volume did at its `to` epoch.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rollbacks: Vec<RollbackInfo>,
    /// Bytes the volume takes on the engines (its data with redundancy, what its snapshots
    /// keep, what waits for aggregation), summed over the engines' own accounting (`None`: not
    /// reported yet).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allocated_bytes: Option<u64>,
}

/// A rollback of a volume to one of its snapshots.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RollbackInfo {
    /// The epoch of the rollback: writes above it are the volume's new history.
    pub at: u64,
    /// The snapshot's epoch: what was written at or below `at` reads as of this epoch.
    pub to: u64,
    /// The snapshot's name (it may have been deleted since; its epoch stays retained).
    pub snapshot: String,
}

/// `POST /v1/pools/{pool}/volumes/{volume}/rollback`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rollback {
    /// The snapshot to roll back to.
    pub snapshot: String,
    /// Roll back even while the volume is exported (hosts keep what they cached).
    #[serde(default)]
    pub force: bool,
}

/// The parent of a clone: a snapshot of another volume of the same pool.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CloneParent {
    /// The parent volume (itself possibly a clone).
    pub volume: VolumeInfo,
    /// The snapshot of it the clone was made from.
    pub snapshot: SnapshotInfo,
}

/// `POST /v1/pools/{pool}/volumes/{volume}/snapshots/{snapshot}/clone`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreateClone {
    /// The new volume's name.
    pub name: String,
}

/// `POST /v1/pools/{pool}/volumes/{volume}/flatten`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Flatten {
    /// false: a flatten starts (the clone is marked, exports of it are refused); true: every
    /// chunk has been copied, the clone stops reading its parent.
    pub done: bool,
}

/// A snapshot: the volume's content at one epoch, kept readable.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotInfo {
    /// Name, unique in its volume.
    pub name: String,
    /// The epoch: the snapshot holds every write with an epoch at or below it.
    pub epoch: u64,
    /// Creation time, seconds since the Unix epoch.
    pub created: u64,
    /// The volume's size when it was taken, bytes.
    pub size: u64,
    /// Whether its content is final: the pool's stable epoch has passed its epoch, so no write
    /// at or below it can still commit (docs/PLACEMENT.md, "The stable epoch").
    #[serde(default)]
    pub stable: bool,
    /// Bytes only this snapshot still reads, summed over the engines' own accounting: what
    /// deleting it frees (`None`: not reported yet).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub held_bytes: Option<u64>,
}

/// `POST /v1/pools/{pool}/volumes/{volume}/snapshots`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreateSnapshot {
    /// Name (`[A-Za-z0-9._-]{1,64}`), unique in the volume.
    pub name: String,
}

/// Longest the service waits for a new snapshot to become final before answering.
pub const SNAPSHOT_STABLE_WAIT: Duration = Duration::from_secs(30);

/// `PATCH /v1/pools/{pool}/volumes/{volume}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResizeVolume {
    /// New size in bytes (a multiple of the block size). Shrinking an exported volume is refused.
    pub size: u64,
}

// ---------------------------------------------------------------------------------------------
// Exports.

/// `POST /v1/exports`: export a volume as a namespace of an NVMe subsystem.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreateExport {
    /// Subsystem NQN (created with the first namespace).
    pub nqn: String,
    /// Namespace id; default the lowest free one.
    #[serde(default)]
    pub nsid: Option<u32>,
    /// Pool name.
    pub pool: String,
    /// Volume name.
    pub volume: String,
    /// Export this snapshot of the volume instead, read-only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<String>,
    /// Host NQNs allowed to connect to the subsystem; empty = any host.
    #[serde(default)]
    pub hosts: Vec<String>,
    /// Address hosts connect to (`ip:port`, default `127.0.0.1:4420`): the NVMe/TCP target
    /// listening there serves the export. With `paths`, the optimized path.
    #[serde(default)]
    pub listen: Option<String>,
    /// Further paths to the subsystem: listen addresses of other NVMe/TCP targets that serve it
    /// too, non-optimized (ANA multipath). At most [`MAX_PATHS`] − 1.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub paths: Vec<String>,
}

/// `POST /v1/exports/{nqn}/optimized`: which path of a multipath subsystem is the optimized one
/// (the targets tell their hosts with an ANA change event).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SetOptimized {
    /// The path's listen address: the subsystem's `listen` or one of its `paths`.
    pub listen: String,
}

/// Most paths (listen addresses) one subsystem is served on.
pub const MAX_PATHS: usize = 8;
/// Controller IDs each path of a multipath subsystem hands out: path `i` (0 = `listen`, then
/// `paths`) uses `i * CNTLID_SPAN + 1 ..= i * CNTLID_SPAN + CNTLID_SPAN - 1`.
pub const CNTLID_SPAN: u16 = 0x1000;

/// The controller IDs of path `index` of a multipath subsystem.
pub fn path_cntlids(index: usize) -> (u16, u16) {
    let base = u16::try_from(index.min(MAX_PATHS - 1)).unwrap_or(0) * CNTLID_SPAN;
    (base + 1, base + CNTLID_SPAN - 1)
}

/// An export, with what a target needs to serve it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExportInfo {
    /// Subsystem NQN.
    pub nqn: String,
    /// Namespace id.
    pub nsid: u32,
    /// Allowed host NQNs (empty = any).
    pub hosts: Vec<String>,
    /// Listen address (the optimized path when there are several).
    pub listen: String,
    /// Further paths.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub paths: Vec<String>,
    /// The optimized path when it is not `listen` (one of `paths`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub optimized: Option<String>,
    /// The volume.
    pub volume: VolumeInfo,
    /// The snapshot served instead of the live volume: a read-only namespace of its size.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<SnapshotInfo>,
    /// The namespace's NVMe reservation (registrants, holder, notifications).
    #[serde(default, skip_serializing_if = "Reservation::is_empty")]
    pub reservation: Reservation,
}

/// Request queues of a vhost-user-blk disk when the export leaves them out.
pub const VHOST_QUEUES_DEFAULT: u16 = 4;
/// Most request queues a vhost-user-blk export offers (each has a worker thread while connected).
pub const VHOST_QUEUES_MAX: u16 = 64;
/// Longest socket path (a UNIX socket address holds 108 bytes with the terminating NUL).
pub const VHOST_SOCKET_MAX: usize = 107;

/// `POST /v1/vhost-exports`: serve a volume, or a snapshot of it, to a VM as a vhost-user-blk
/// disk on a UNIX socket of the machine of a `tessera-nvmf`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreateVhostExport {
    /// Absolute path of the UNIX socket the hypervisor connects to (QEMU `-chardev socket,path=`).
    pub socket: String,
    /// Pool name.
    pub pool: String,
    /// Volume name.
    pub volume: String,
    /// Serve this snapshot of the volume instead (always read-only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<String>,
    /// Request queues offered (the guest uses up to one per vCPU); default
    /// [`VHOST_QUEUES_DEFAULT`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queues: Option<u16>,
    /// Offer the disk read-only (`VIRTIO_BLK_F_RO`).
    #[serde(default)]
    pub read_only: bool,
    /// The `tessera-nvmf` that serves it, named by its NVMe/TCP listen address (`ip:port`,
    /// default `127.0.0.1:4420`): the socket is created on that target's machine.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
}

/// A vhost-user-blk export, with what a target needs to serve it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VhostExportInfo {
    /// The UNIX socket.
    pub socket: String,
    /// Listen address of the `tessera-nvmf` serving it.
    pub target: String,
    /// Request queues offered.
    pub queues: u16,
    /// Offered read-only (always for a snapshot).
    pub read_only: bool,
    /// The volume.
    pub volume: VolumeInfo,
    /// The snapshot served instead of the live volume.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<SnapshotInfo>,
}

/// Operations one etcd transaction of the management service may hold (a commit's changed
/// records and its version): etcd members must allow it (`--max-txn-ops`).
pub const ETCD_MAX_TXN_OPS: usize = 1024;

/// `GET /v1/service`: this management service's role. With an embedded store it is always the
/// leader; with etcd, one of several services is (elected), the others follow and redirect
/// what they do not answer to it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceRole {
    /// This service is the leader.
    pub leader: bool,
    /// The leader's API address, when known (etcd mode).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub leader_addr: Option<String>,
    /// The store version this service has.
    pub version: ClusterVersion,
}

/// `GET /v1/exports[?after=V&wait_ms=T]`: every export. With `after`, the service answers as
/// soon as the store's version exceeds `after`, or after `wait_ms` (≤ 60000) with the current
/// state: targets long-poll it to follow changes without polling.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExportList {
    /// Store transaction number the list was read at.
    pub version: ClusterVersion,
    /// Exports, by (nqn, nsid).
    pub exports: Vec<ExportInfo>,
    /// vhost-user-blk exports, by socket.
    #[serde(default)]
    pub vhost: Vec<VhostExportInfo>,
}
