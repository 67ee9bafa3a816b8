//! The service's logic as a pure state machine: [`apply`] takes a [`State`] and a [`Command`]
//! and returns the next state and what to answer, or a [`CmdError`] that carries its HTTP
//! status. Queries ([`pool_info`], [`exports`], [`heartbeat_pools`], ...) turn a state into the
//! API's views.
//!
//! No I/O, no clock, no randomness: the caller passes them in [`Env`]. Every command validates
//! everything before it changes anything, and works on a copy, so a refused command leaves no
//! trace; the service commits the returned state as one store transaction.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::str::FromStr;

use tessera_engine_proto::ObjectId;
use tessera_mgmt_api::{
    CreateExport, CreatePool, CreateVhostExport, CreateVolume, EngineState, ExportInfo, PoolEngine, PoolInfo, PoolMapInfo, PoolTarget,
    PoolVersion, RegisterEngine, Reservation, ReservationCommand, TargetSelector, TargetStateName, VhostExportInfo, VolumeInfo,
};
use tessera_placement::layout::{default_chunk_size, VolumeLayout, DEFAULT_CELL_SIZE};
use tessera_placement::placement::{group_count, group_layout, ObjectClass, PoolMap, TargetEntry, TargetRef, TargetState};
use uuid::Uuid;

use crate::state::{to_api, to_placement, EngineRec, ExportRec, PoolRec, State, VolumeRec};

#[path = "machine_targets.rs"]
mod targets;
use targets::*;
#[path = "machine_snapshots.rs"]
mod snapshots;
use snapshots::{clone_parent, clone_volume, clones_of, create_snapshot, delete_snapshot, flatten, get_snapshot, rollback};
pub use snapshots::{retention, snapshot_info, snapshots, MAX_SNAPSHOTS};
#[path = "machine_exports.rs"]
mod exports;
use exports::{create_export, create_vhost_export, delete_export, delete_vhost_export, reservation, set_optimized};
pub use exports::{exports, vhost_exports};

/// Default object class of a pool.
pub const DEFAULT_CLASS: &str = "EC_2P1";
/// Default block size of a volume.
pub const DEFAULT_BLOCK_SIZE: u32 = 4096;
/// Default listen address of an export.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:4420";
/// Longest NQN (NVMe Base specification).
pub const MAX_NQN_LEN: usize = 223;
/// The discovery subsystem's NQN, which cannot be exported to.
pub const DISCOVERY_NQN: &str = "nqn.2014-08.org.nvmexpress.discovery";

/// What the caller supplies that the logic may not make up itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Env {
    /// A fresh identity for whatever the command creates.
    pub uuid: Uuid,
    /// Now, seconds since the Unix epoch.
    pub now: u64,
    /// The epoch floor of a target that goes DOWN now: the HLC epoch of 30 s ago (a write is
    /// retried for at most 25 s, so whatever a DOWN target missed is above it).
    pub epoch_floor: u64,
    /// The HLC epoch now: a pool map version that the command makes takes effect at it
    /// ([`PoolRec::map_epoch`]).
    pub epoch_now: u64,
}

/// How far back [`Env::epoch_floor`] lies.
pub const EPOCH_FLOOR_LAG: std::time::Duration = std::time::Duration::from_secs(30);

/// A state change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// An engine (re)registers: binds its rank to its uuid, updates address and targets, and
    /// makes it Up. A rank bound to another uuid is taken over only if that engine is Down (a
    /// replacement with an empty data directory: its targets' floors become 0).
    RegisterEngine {
        /// The registration.
        req: RegisterEngine,
        /// Reintegrate: its DOWN and DOWNOUT targets that were not drained become UP (one new
        /// map version per pool). Otherwise their states are left alone.
        reintegrate: bool,
    },
    /// These engines stopped heartbeating: each becomes Down and its placeable targets DOWN in
    /// every pool (one new map version per pool touched), with their epoch floors set.
    EnginesDown(Vec<u32>),
    /// The operator takes targets out: selected UPIN/UP targets become DOWN (rebuilt elsewhere).
    Exclude {
        /// Pool name.
        pool: String,
        /// The targets.
        sel: TargetSelector,
    },
    /// The operator empties healthy targets: selected UPIN targets become DOWN and drained
    /// (their engine deletes their data once rebuilt elsewhere; never reintegrated on their own).
    Drain {
        /// Pool name.
        pool: String,
        /// The targets.
        sel: TargetSelector,
    },
    /// The operator brings targets back: selected DOWN/DOWNOUT targets of an Up engine become UP
    /// (filled by reintegration).
    Reintegrate {
        /// Pool name.
        pool: String,
        /// The targets.
        sel: TargetSelector,
    },
    /// The operator adds engines to a pool: every target of each (registered, Up, not in the
    /// pool) joins it UP, to be filled with its share; the pool's group count stays. Only on a
    /// settled map.
    Extend {
        /// Pool name.
        pool: String,
        /// The engines' ranks.
        ranks: Vec<u32>,
    },
    /// Targets out for too long stop being reintegrated incrementally: every DOWNOUT target
    /// whose floor epoch is below `below` gets floor 0 (a return is a full rebuild), in one new
    /// map version per pool touched, so that engines stop holding aggregation for it.
    ExpireFloors {
        /// Floors below this epoch expire.
        below: u64,
    },
    /// Every engine finished rebuilding towards map `version`: if that is still the pool's
    /// version, DOWN targets become DOWNOUT and UP targets UPIN in one new version, which becomes
    /// the base map. Otherwise (stale, or nothing to finish) nothing happens.
    RebuildDone {
        /// Pool name.
        pool: String,
        /// The map version the engines rebuilt towards.
        version: u32,
    },
    /// Create a pool.
    CreatePool(CreatePool),
    /// Create a volume in a pool.
    CreateVolume {
        /// Pool name.
        pool: String,
        /// The request.
        req: CreateVolume,
    },
    /// Change a volume's size.
    ResizeVolume {
        /// Pool name.
        pool: String,
        /// Volume name.
        volume: String,
        /// New size, bytes.
        size: u64,
    },
    /// Delete a volume that is not exported.
    DeleteVolume {
        /// Pool name.
        pool: String,
        /// Volume name.
        volume: String,
    },
    /// Take a snapshot of a volume: retain its content at the current epoch.
    CreateSnapshot {
        /// Pool name.
        pool: String,
        /// Volume name.
        volume: String,
        /// Snapshot name.
        name: String,
    },
    /// Delete a snapshot that is not exported (engines then aggregate what only it held).
    DeleteSnapshot {
        /// Pool name.
        pool: String,
        /// Volume name.
        volume: String,
        /// Snapshot name.
        name: String,
    },
    /// A new volume `name` that reads as snapshot `snapshot` of `volume` where it has not
    /// written (no data copied).
    CloneVolume {
        /// Pool name (of both).
        pool: String,
        /// The parent volume.
        volume: String,
        /// The parent's snapshot.
        snapshot: String,
        /// The clone's name.
        name: String,
    },
    /// A clone's flatten starts (`done: false`: exports of it are refused until it ends) or has
    /// copied every chunk (`done: true`: the clone stops reading its parent).
    Flatten {
        /// Pool name.
        pool: String,
        /// The clone.
        volume: String,
        /// See above.
        done: bool,
    },
    /// Roll a volume back to one of its snapshots at the current epoch (no data copied).
    Rollback {
        /// Pool name.
        pool: String,
        /// Volume name.
        volume: String,
        /// The snapshot.
        snapshot: String,
        /// Even while the volume is exported.
        force: bool,
    },
    /// Export a volume or a snapshot of it.
    CreateExport(CreateExport),
    /// Make one path of a multipath subsystem the optimized one.
    SetOptimized {
        /// Subsystem NQN.
        nqn: String,
        /// The path's listen address.
        listen: String,
    },
    /// A host's reservation command on an exported namespace, forwarded by a target.
    Reservation {
        /// Subsystem NQN.
        nqn: String,
        /// Namespace id.
        nsid: u32,
        /// The command.
        cmd: ReservationCommand,
    },
    /// Remove an export.
    DeleteExport {
        /// Subsystem NQN.
        nqn: String,
        /// Namespace id.
        nsid: u32,
    },
    /// Serve a volume or a snapshot of it as a vhost-user-blk disk.
    CreateVhostExport(CreateVhostExport),
    /// Remove a vhost-user-blk export.
    DeleteVhostExport {
        /// Its socket path.
        socket: String,
    },
}

/// One target to punch a deleted volume's data on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PunchSite {
    /// Engine RPC address.
    pub address: String,
    /// Target index.
    pub target: u16,
}

/// Where a deleted volume's data may live: every placeable target of its pool on an Up engine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PunchPlan {
    /// The volume's identity (container and object id).
    pub uuid: Uuid,
    /// Pool id.
    pub pool_id: u32,
    /// Pool map version.
    pub map_version: u32,
    /// The targets.
    pub sites: Vec<PunchSite>,
}

/// What a command produced, besides the new state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// An engine registered.
    Registered {
        /// Its rank.
        rank: u32,
        /// It took the rank over from this (Down) engine.
        replaced: Option<Uuid>,
        /// Pools in which its targets became UP, with the new map version.
        reintegrated: Vec<(String, u32)>,
    },
    /// Targets of a pool changed state (exclude, drain, reintegrate) or joined it (extend).
    TargetsChanged {
        /// Pool name.
        pool: String,
        /// The new map version.
        version: u32,
        /// The targets changed.
        targets: Vec<TargetRef>,
    },
    /// A rebuild finished: the new (settled) map version, or `None` if the command was stale.
    RebuildDone {
        /// Pool name.
        pool: String,
        /// The new map version, if the map changed.
        version: Option<u32>,
    },
    /// These engines were marked Down (those that were Up or had placeable targets).
    MarkedDown(Vec<u32>),
    /// Floors expired: per pool, the new map version and the targets.
    FloorsExpired(Vec<(String, u32, Vec<TargetRef>)>),
    /// A pool was created.
    Pool(Box<PoolInfo>),
    /// A volume was created or resized.
    Volume(VolumeInfo),
    /// A volume was deleted; its data should be punched.
    VolumeDeleted(VolumeInfo, PunchPlan),
    /// An export was created or deleted.
    Export(ExportInfo),
    /// The exports of one subsystem after a change to all of them.
    Exports(Vec<ExportInfo>),
    /// A vhost-user-blk export was created or deleted.
    VhostExport(VhostExportInfo),
    /// A reservation command was carried out (status 0) or refused with this NVMe status.
    Reservation {
        /// NVMe status field.
        status: u16,
        /// The reservation after it.
        reservation: Reservation,
    },
    /// A snapshot was created or deleted.
    Snapshot(tessera_mgmt_api::SnapshotInfo),
}

/// Why a command or query was refused. [`CmdError::status`] is its HTTP status.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CmdError {
    /// No engine with this rank (404).
    #[error("no engine with rank {0} is registered")]
    NoEngine(u32),
    /// The engine was marked Down and must register again (404).
    #[error("engine rank {0} is down: register again")]
    EngineDown(u32),
    /// No such pool (404).
    #[error("no pool named {0:?}")]
    NoPool(String),
    /// No such volume (404).
    #[error("no volume {volume:?} in pool {pool:?}")]
    NoVolume {
        /// Pool.
        pool: String,
        /// Volume.
        volume: String,
    },
    /// No such snapshot (404).
    #[error("volume {pool}/{volume} has no snapshot named {snapshot:?}")]
    NoSnapshot {
        /// Pool.
        pool: String,
        /// Volume.
        volume: String,
        /// Snapshot.
        snapshot: String,
    },
    /// No such target in a pool (404).
    #[error("{0}")]
    NoTarget(String),
    /// No such export (404).
    #[error("no namespace {nsid} is exported in subsystem {nqn}")]
    NoExport {
        /// Subsystem.
        nqn: String,
        /// Namespace id.
        nsid: u32,
    },
    /// No such vhost-user-blk export (404).
    #[error("no vhost-user-blk disk is exported on {0}")]
    NoVhostExport(String),
    /// The request is malformed (400).
    #[error("{0}")]
    Invalid(String),
    /// The request conflicts with the current state (409).
    #[error("{0}")]
    Conflict(String),
    /// Not enough capacity (507).
    #[error("{0}")]
    NoSpace(String),
    /// An invariant broke (500).
    #[error("{0}")]
    Internal(String),
}

impl CmdError {
    /// The HTTP status to answer with.
    pub fn status(&self) -> u16 {
        match self {
            CmdError::NoEngine(_)
            | CmdError::EngineDown(_)
            | CmdError::NoPool(_)
            | CmdError::NoVolume { .. }
            | CmdError::NoSnapshot { .. }
            | CmdError::NoTarget(_)
            | CmdError::NoExport { .. }
            | CmdError::NoVhostExport(_) => 404,
            CmdError::Invalid(_) => 400,
            CmdError::Conflict(_) => 409,
            CmdError::NoSpace(_) => 507,
            CmdError::Internal(_) => 500,
        }
    }
}

fn invalid<T>(msg: impl Into<String>) -> Result<T, CmdError> {
    Err(CmdError::Invalid(msg.into()))
}

fn conflict<T>(msg: impl Into<String>) -> Result<T, CmdError> {
    Err(CmdError::Conflict(msg.into()))
}

/// Applies `cmd` to `state`. On success returns the next state (equal to `state` if nothing
/// changed: the caller then commits nothing) and the outcome.
pub fn apply(state: &State, cmd: &Command, env: &Env) -> Result<(State, Outcome), CmdError> {
    let mut next = state.clone();
    let outcome = apply_to(&mut next, cmd, env)?;
    // Every new map version takes effect now: clients that learn it plan their writes at later
    // epochs, and a rebuild's discard on a shard's new home stays below it.
    for (name, p) in next.pools.iter_mut() {
        if state.pools.get(name).is_none_or(|old| old.map_version != p.map_version) {
            p.map_epoch = env.epoch_now;
        }
    }
    Ok((next, outcome))
}

fn apply_to(next: &mut State, cmd: &Command, env: &Env) -> Result<Outcome, CmdError> {
    let next = &mut *next;
    let outcome = match cmd {
        Command::RegisterEngine { req, reintegrate } => register_engine(next, req, *reintegrate)?,
        Command::EnginesDown(ranks) => engines_down(next, ranks, env)?,
        Command::Exclude { pool, sel } => exclude(next, pool, sel, env)?,
        Command::Drain { pool, sel } => drain(next, pool, sel)?,
        Command::Reintegrate { pool, sel } => reintegrate(next, pool, sel)?,
        Command::Extend { pool, ranks } => extend(next, pool, ranks)?,
        Command::ExpireFloors { below } => expire_floors(next, *below)?,
        Command::RebuildDone { pool, version } => rebuild_done(next, pool, *version)?,
        Command::CreatePool(req) => create_pool(next, req, env)?,
        Command::CreateVolume { pool, req } => create_volume(next, pool, req, env)?,
        Command::ResizeVolume { pool, volume, size } => resize_volume(next, pool, volume, *size)?,
        Command::DeleteVolume { pool, volume } => delete_volume(next, pool, volume)?,
        Command::CreateSnapshot { pool, volume, name } => create_snapshot(next, pool, volume, name, env)?,
        Command::DeleteSnapshot { pool, volume, name } => delete_snapshot(next, pool, volume, name)?,
        Command::CloneVolume { pool, volume, snapshot, name } => clone_volume(next, pool, volume, snapshot, name, env)?,
        Command::Flatten { pool, volume, done } => flatten(next, pool, volume, *done)?,
        Command::Rollback { pool, volume, snapshot, force } => rollback(next, pool, volume, snapshot, *force, env)?,
        Command::CreateExport(req) => create_export(next, req)?,
        Command::DeleteExport { nqn, nsid } => delete_export(next, nqn, *nsid)?,
        Command::SetOptimized { nqn, listen } => set_optimized(next, nqn, listen)?,
        Command::Reservation { nqn, nsid, cmd } => reservation(next, nqn, *nsid, cmd)?,
        Command::CreateVhostExport(req) => create_vhost_export(next, req)?,
        Command::DeleteVhostExport { socket } => delete_vhost_export(next, socket)?,
    };
    Ok(outcome)
}

// ---------------------------------------------------------------------------------------------
// Validation helpers.

/// Checks a pool or volume name: `[A-Za-z0-9._-]{1,64}`, not `.` or `..`.
pub fn check_name(what: &str, name: &str) -> Result<(), CmdError> {
    if name.is_empty() || name.len() > 64 || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b)) {
        return invalid(format!("{what} name {name:?} must be 1 to 64 characters of A-Z a-z 0-9 . _ -"));
    }
    if name == "." || name == ".." {
        return invalid(format!("{what} name {name:?} is reserved"));
    }
    Ok(())
}

/// Checks an NQN: starts with `nqn.`, at most 223 bytes, printable ASCII, no `/` (it is a path
/// segment of the API).
pub fn check_nqn(what: &str, nqn: &str) -> Result<(), CmdError> {
    if !nqn.starts_with("nqn.") {
        return invalid(format!("{what} {nqn:?} must start with \"nqn.\""));
    }
    if nqn.len() > MAX_NQN_LEN {
        return invalid(format!("{what} is {} bytes long, at most {MAX_NQN_LEN} allowed", nqn.len()));
    }
    if let Some(c) = nqn.chars().find(|&c| !(' '..='~').contains(&c) || c == '/') {
        return invalid(format!(
            "{what} {:?} contains {c:?}: only printable ASCII other than '/' is allowed",
            nqn.escape_debug().to_string()
        ));
    }
    Ok(())
}

fn parse_class(s: &str) -> Result<ObjectClass, CmdError> {
    ObjectClass::from_str(s).map_err(|e| CmdError::Invalid(format!("{e} (expected S1, RP_<n> or EC_<k>P<p>)")))
}

fn parse_addr(what: &str, s: &str) -> Result<SocketAddr, CmdError> {
    s.parse().map_err(|_| CmdError::Invalid(format!("{what} {s:?} is not an ip:port address")))
}

fn get_pool<'a>(state: &'a State, pool: &str) -> Result<&'a PoolRec, CmdError> {
    state.pools.get(pool).ok_or_else(|| CmdError::NoPool(pool.to_string()))
}

fn get_volume<'a>(state: &'a State, pool: &str, volume: &str) -> Result<&'a VolumeRec, CmdError> {
    get_pool(state, pool)?;
    state
        .volumes
        .get(&(pool.to_string(), volume.to_string()))
        .ok_or_else(|| CmdError::NoVolume { pool: pool.to_string(), volume: volume.to_string() })
}

/// [`get_volume`] for a change.
fn get_volume_mut<'a>(state: &'a mut State, pool: &str, volume: &str) -> Result<&'a mut VolumeRec, CmdError> {
    state
        .volumes
        .get_mut(&(pool.to_string(), volume.to_string()))
        .ok_or_else(|| CmdError::NoVolume { pool: pool.to_string(), volume: volume.to_string() })
}

/// `rank:index` of targets, comma separated.
pub fn targets_text(ts: &[TargetRef]) -> String {
    ts.iter().map(|t| format!("{}:{}", t.rank, t.index)).collect::<Vec<_>>().join(",")
}

/// Total capacity of a pool's targets, bytes.
pub fn pool_capacity(state: &State, p: &PoolRec) -> u64 {
    let total: u128 = p.targets.iter().map(|t| state.engines.get(&t.rank).map_or(0, |e| u128::from(e.target_capacity))).sum();
    u64::try_from(total).unwrap_or(u64::MAX)
}

/// Bytes a volume of `size` takes in its pool: size × shards per group ÷ data shards, rounded up.
pub fn footprint(size: u64, class: ObjectClass) -> u128 {
    let (n, k) = (u128::from(class.shards_per_group()), u128::from(class.data_shards()));
    (u128::from(size) * n).div_ceil(k)
}

fn volume_footprint(v: &VolumeRec) -> u128 {
    // A stored class always parsed when it was stored; S1 is a safe floor otherwise.
    footprint(v.size, ObjectClass::from_str(&v.class).unwrap_or(ObjectClass::S1))
}

/// Bytes promised to a pool's volumes.
pub fn pool_allocated(state: &State, pool: &str) -> u128 {
    state.pool_volumes(pool).map(volume_footprint).sum()
}

fn fault_domains(state: &State, p: &PoolRec) -> usize {
    let ranks: BTreeSet<u32> = p.targets.iter().map(|t| t.rank).collect();
    ranks.iter().filter_map(|r| state.engines.get(r)).map(|e| e.fault_domain.as_str()).collect::<BTreeSet<_>>().len()
}

fn check_space(state: &State, p: &PoolRec, freed: u128, needed: u128) -> Result<(), CmdError> {
    let capacity = pool_capacity(state, p);
    let allocated = pool_allocated(state, &p.name) - freed;
    if allocated + needed > u128::from(capacity) {
        return Err(CmdError::NoSpace(format!(
            "pool {} has {} of {capacity} bytes free, {needed} needed",
            p.name,
            u128::from(capacity).saturating_sub(allocated)
        )));
    }
    Ok(())
}

/// The map versions of every pool with targets on engine `rank`, for its heartbeat reply.
pub fn pool_versions(state: &State, rank: u32) -> Vec<PoolVersion> {
    state
        .pools
        .values()
        .filter(|p| p.targets.iter().any(|t| t.rank == rank))
        .map(|p| PoolVersion { pool_id: p.pool_id, map_version: p.map_version, name: p.name.clone() })
        .collect()
}

/// Checks a heartbeat: the rank must be registered to `uuid` and Up. Returns the pool versions
/// for the reply.
pub fn heartbeat_pools(state: &State, rank: u32, uuid: Uuid) -> Result<Vec<PoolVersion>, CmdError> {
    let e = state.engines.get(&rank).ok_or(CmdError::NoEngine(rank))?;
    if e.uuid != uuid {
        return conflict(format!("rank {rank} is bound to engine {}, not {uuid}", e.uuid));
    }
    if e.state == EngineState::Down {
        return Err(CmdError::EngineDown(rank));
    }
    Ok(pool_versions(state, rank))
}

// ---------------------------------------------------------------------------------------------
// Pools.

fn create_pool(s: &mut State, req: &CreatePool, env: &Env) -> Result<Outcome, CmdError> {
    check_name("pool", &req.name)?;
    if s.pools.contains_key(&req.name) {
        return conflict(format!("pool {:?} already exists", req.name));
    }
    let class = parse_class(req.default_class.as_deref().unwrap_or(DEFAULT_CLASS))?;
    let ranks: Vec<u32> = if req.ranks.is_empty() {
        let up: Vec<u32> = s.engines.values().filter(|e| e.state == EngineState::Up).map(|e| e.rank).collect();
        if up.is_empty() {
            return conflict("no engine is up: a pool needs at least one engine");
        }
        up
    } else {
        let mut seen = BTreeSet::new();
        for &r in &req.ranks {
            if !seen.insert(r) {
                return invalid(format!("rank {r} is listed twice"));
            }
            match s.engines.get(&r) {
                None => return invalid(format!("no engine with rank {r} is registered")),
                Some(e) if e.state == EngineState::Down => return conflict(format!("engine rank {r} is down")),
                Some(_) => {}
            }
        }
        seen.into_iter().collect()
    };
    let mut targets = Vec::new();
    for r in &ranks {
        let e = s.engines.get(r).ok_or(CmdError::NoEngine(*r))?;
        targets.extend((0..e.targets).map(|index| PoolTarget {
            rank: *r,
            index,
            state: TargetStateName::UpIn,
            fseq: 0,
            since_epoch: 0,
            drained: false,
            added: 0,
        }));
    }
    let pool_id = s.next_pool_id;
    let next_id = pool_id.checked_add(1).ok_or_else(|| CmdError::Conflict("pool ids are exhausted".into()))?;
    let rec = PoolRec {
        name: req.name.clone(),
        uuid: env.uuid,
        pool_id,
        default_class: class.to_string(),
        map_version: 1,
        base_version: 1,
        base_targets: targets.clone(),
        group_targets: u32::try_from(targets.len()).map_err(|_| CmdError::Invalid("too many targets".into()))?,
        map_epoch: env.epoch_now,
        targets,
    };
    if req.default_class.is_some() && class.shards_per_group() as usize > fault_domains(s, &rec) {
        return conflict(format!(
            "class {class} needs {} fault domains, the pool would span {}",
            class.shards_per_group(),
            fault_domains(s, &rec)
        ));
    }
    // The map must be one that placement accepts.
    placement_map(&rec)?;
    s.next_pool_id = next_id;
    s.pools.insert(rec.name.clone(), rec);
    Ok(Outcome::Pool(Box::new(pool_info(s, &req.name)?)))
}

/// The pool map of a pool.
pub fn pool_map(state: &State, pool: &str) -> Result<PoolMapInfo, CmdError> {
    let p = get_pool(state, pool)?;
    let ranks: BTreeSet<u32> = p.targets.iter().map(|t| t.rank).collect();
    let engines = ranks
        .into_iter()
        .map(|rank| {
            let e = state.engines.get(&rank);
            PoolEngine {
                rank,
                address: e.map(|e| e.address.clone()).unwrap_or_default(),
                fault_domain: e.map(|e| e.fault_domain.clone()).unwrap_or_default(),
            }
        })
        .collect();
    let (base_version, base_targets) = p.base();
    Ok(PoolMapInfo {
        pool_id: p.pool_id,
        version: p.map_version,
        engines,
        targets: p.targets.clone(),
        base_version,
        base_targets: base_targets.to_vec(),
        group_targets: p.group_targets,
        map_epoch: p.map_epoch,
    })
}

/// A pool.
pub fn pool_info(state: &State, pool: &str) -> Result<PoolInfo, CmdError> {
    let p = get_pool(state, pool)?;
    Ok(PoolInfo {
        name: p.name.clone(),
        uuid: p.uuid,
        pool_id: p.pool_id,
        default_class: p.default_class.clone(),
        capacity: pool_capacity(state, p),
        allocated: u64::try_from(pool_allocated(state, pool)).unwrap_or(u64::MAX),
        map: pool_map(state, pool)?,
        volumes: state.pool_volumes(pool).count() as u32,
        rebuild: Default::default(),
        scrub: Default::default(),
        fault_domains_reduced: fault_domains_reduced(state, p),
        // Heartbeats, not the store: filled in by the service.
        stable_epoch: None,
    })
}

/// Whether some redundancy group of some volume of the pool has two writable shards on one
/// engine under the current map. Placement keeps a group's shards on distinct engines while it
/// can, so this is only computed when fewer engines serve the pool (Up, with an UPIN or UP
/// target) than some volume's class has shards per group.
pub fn fault_domains_reduced(state: &State, p: &PoolRec) -> bool {
    let serving: BTreeSet<u32> = p
        .targets
        .iter()
        .filter(|t| to_placement(t.state).is_placeable())
        .filter(|t| state.engines.get(&t.rank).is_some_and(|e| e.state == EngineState::Up))
        .map(|t| t.rank)
        .collect();
    let short: Vec<(ObjectId, ObjectClass)> = state
        .pool_volumes(&p.name)
        .filter_map(|v| Some((ObjectId(v.uuid.as_u128()), ObjectClass::from_str(&v.class).ok()?)))
        .filter(|(_, c)| c.shards_per_group() as usize > serving.len())
        .collect();
    if short.is_empty() {
        return false;
    }
    let Ok(m) = placement_map(p) else { return false };
    short.iter().any(|&(oid, class)| {
        (0..group_count(&m, class)).any(|g| {
            group_layout(&m, oid, g, class).is_ok_and(|grp| {
                let mut ranks = BTreeSet::new();
                grp.shards.iter().filter(|s| s.writable()).any(|s| !ranks.insert(s.rank))
            })
        })
    })
}

/// Every pool, by name.
pub fn pools(state: &State) -> Vec<PoolInfo> {
    state.pools.keys().filter_map(|name| pool_info(state, name).ok()).collect()
}

// ---------------------------------------------------------------------------------------------
// Volumes.

fn volume_info(state: &State, v: &VolumeRec) -> VolumeInfo {
    VolumeInfo {
        pool: v.pool.clone(),
        pool_id: state.pools.get(&v.pool).map_or(0, |p| p.pool_id),
        name: v.name.clone(),
        uuid: v.uuid,
        size: v.size,
        block_size: v.block_size,
        class: v.class.clone(),
        cell_size: v.cell_size,
        chunk_size: v.chunk_size,
        checksum: v.checksum,
        created: v.created,
        snapshots: v.snapshots.iter().map(|x| snapshot_info(x, 0)).collect(),
        parent: clone_parent(state, v),
        flattening: v.flattening,
        rollbacks: v
            .rollbacks
            .iter()
            .map(|r| tessera_mgmt_api::RollbackInfo { at: r.at, to: r.to, snapshot: r.snapshot.clone() })
            .collect(),
        allocated_bytes: None,
    }
}

/// A volume.
pub fn volume(state: &State, pool: &str, volume: &str) -> Result<VolumeInfo, CmdError> {
    Ok(volume_info(state, get_volume(state, pool, volume)?))
}

/// The volumes of a pool, by name.
pub fn volumes(state: &State, pool: &str) -> Result<Vec<VolumeInfo>, CmdError> {
    get_pool(state, pool)?;
    Ok(state.pool_volumes(pool).map(|v| volume_info(state, v)).collect())
}

fn check_size(size: u64, block_size: u32) -> Result<(), CmdError> {
    if size == 0 || !size.is_multiple_of(u64::from(block_size)) {
        return invalid(format!("volume size {size} must be a positive multiple of the block size {block_size}"));
    }
    Ok(())
}

fn create_volume(s: &mut State, pool: &str, req: &CreateVolume, env: &Env) -> Result<Outcome, CmdError> {
    let p = get_pool(s, pool)?;
    check_name("volume", &req.name)?;
    if s.volumes.contains_key(&(pool.to_string(), req.name.clone())) {
        return conflict(format!("volume {:?} already exists in pool {pool:?}", req.name));
    }
    let class = parse_class(req.class.as_deref().unwrap_or(&p.default_class))?;
    let block_size = req.block_size.unwrap_or(DEFAULT_BLOCK_SIZE);
    if block_size != 512 && block_size != 4096 {
        return invalid(format!("block size {block_size} must be 512 or 4096"));
    }
    check_size(req.size, block_size)?;
    let cell_size = req.cell_size.unwrap_or(DEFAULT_CELL_SIZE);
    let chunk_size = req.chunk_size.unwrap_or_else(|| default_chunk_size(class, cell_size));
    VolumeLayout::new(req.size, block_size, chunk_size, cell_size, class).map_err(|e| CmdError::Invalid(e.to_string()))?;
    let domains = fault_domains(s, p);
    if class.shards_per_group() as usize > domains {
        return conflict(format!("class {class} needs {} fault domains, pool {pool:?} has {domains}", class.shards_per_group()));
    }
    check_space(s, p, 0, footprint(req.size, class))?;
    let rec = VolumeRec {
        pool: pool.to_string(),
        name: req.name.clone(),
        uuid: env.uuid,
        size: req.size,
        block_size,
        class: class.to_string(),
        cell_size,
        chunk_size,
        checksum: req.checksum.unwrap_or(true),
        created: env.now,
        snapshots: Vec::new(),
        parent: None,
        flattening: false,
        rollbacks: Vec::new(),
    };
    let info = volume_info(s, &rec);
    s.volumes.insert((pool.to_string(), req.name.clone()), rec);
    Ok(Outcome::Volume(info))
}

fn resize_volume(s: &mut State, pool: &str, volume: &str, size: u64) -> Result<Outcome, CmdError> {
    let v = get_volume(s, pool, volume)?;
    check_size(size, v.block_size)?;
    if size < v.size {
        if let Some(how) = s.served_as(pool, volume, None) {
            return conflict(format!("volume {pool}/{volume} is exported ({how}): it can grow but not shrink"));
        }
    }
    if size > v.size {
        let class = parse_class(&v.class)?;
        let p = get_pool(s, pool)?;
        check_space(s, p, footprint(v.size, class), footprint(size, class))?;
    }
    let v = get_volume_mut(s, pool, volume)?;
    v.size = size;
    let v = v.clone();
    Ok(Outcome::Volume(volume_info(s, &v)))
}

fn delete_volume(s: &mut State, pool: &str, volume: &str) -> Result<Outcome, CmdError> {
    let v = get_volume(s, pool, volume)?;
    if let Some(how) = s.served_as(pool, volume, None) {
        return conflict(format!("volume {pool}/{volume} is exported ({how}): delete the export first"));
    }
    let clones = clones_of(s, v, None);
    if !clones.is_empty() {
        return conflict(format!("volume {pool}/{volume} has clones: {} (delete or flatten them first)", clones.join(", ")));
    }
    for snap in &v.snapshots {
        if let Some(how) = s.served_as(pool, volume, Some(&snap.name)) {
            return conflict(format!("snapshot {pool}/{volume}@{} is exported ({how}): delete the export first", snap.name));
        }
    }
    let info = volume_info(s, v);
    let p = get_pool(s, pool)?;
    let sites = p
        .targets
        .iter()
        .filter(|t| to_placement(t.state).is_placeable())
        .filter_map(|t| {
            let e = s.engines.get(&t.rank)?;
            (e.state == EngineState::Up).then(|| PunchSite { address: e.address.clone(), target: t.index })
        })
        .collect();
    let plan = PunchPlan { uuid: v.uuid, pool_id: p.pool_id, map_version: p.map_version, sites };
    s.volumes.remove(&(pool.to_string(), volume.to_string()));
    Ok(Outcome::VolumeDeleted(info, plan))
}

#[cfg(test)]
#[path = "machine_tests.rs"]
mod tests;
