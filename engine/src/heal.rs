//! Self-healing on an engine: rebuild, reintegration and clean-up passes over what this engine
//! holds, driven by the pool map versions its heartbeats learn.
//!
//! The management service never moves data. Every engine, for every pool with targets here, runs
//! one **pass** per pool map version:
//!
//! 1. **Scan.** For each volume of the pool and each of this engine's UPIN targets, list the
//!    chunks (dkeys) the target holds and compute each chunk's group under the current map. A
//!    shard that is `rebuilding` (its target differs from the base map's, or is UP) needs
//!    filling; this engine does it if one of its targets is the chunk's **leader**
//!    ([`leads`]): so the work is spread over the survivors and each chunk is rebuilt once.
//!    A reintegrating target (UP with a floor epoch) only needs the chunks changed above the floor
//!    (engine enumeration "dkeys changed since").
//! 2. **Rebuild**, paced by [`RebuildPace`]: `[heal] rebuild_rate` while the hosts are quiet,
//!    `rebuild_rate_busy` while this engine serves host I/O; [`Volume::rebuild_shard`] per
//!    task, retried; progress reported to the service every second.
//! 3. **Clean up** once the map is settled (nothing DOWN or UP): chunks a target holds but no
//!    longer has a shard of (they moved back after a reintegration) are discarded, and drained
//!    targets are emptied.
//!
//! While any target of the pool is out with a floor epoch, aggregation on this engine's targets
//! is held at that epoch, so punches stay visible to the incremental reintegration.
//!
//! When every engine has reported its pass done for the current version, the service marks the
//! DOWN targets DOWNOUT and the UP ones UPIN: a new version, whose pass cleans up.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tessera_client::placement::{Group, ObjectClass, ShardPlacement, TargetRef};
use tessera_client::volume::{Cluster, RebuildOptions, Volume, VolumeError};
use tessera_mgmt_api::{
    EngineRebuildState, EngineReport, MgmtClient, PoolMapInfo, PoolVersion, RebuildProgress, ScrubCounters, TargetStateName,
};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use uuid::Uuid;

use crate::config::HealSection;
use crate::pace::RebuildPace;
use crate::target::Snapshots;

/// Attempts of one chunk before the pass moves on (and reports it failed).
const CHUNK_ATTEMPTS: u32 = 3;
/// Pause before a failed pass runs again.
const PASS_RETRY: Duration = Duration::from_secs(3);
/// How often progress goes to the service.
const REPORT_EVERY: Duration = Duration::from_secs(1);
/// Passes after which a stripe that stays torn gets parity at its newest epoch.
const SETTLE_TORN_AFTER: u32 = 3;
/// Longest wait for a heartbeat reply whose snapshot list covers a rebuild's read epoch.
const SNAPSHOT_LIST_WAIT: Duration = Duration::from_secs(30);

/// Whether the shard on `me` leads the rebuild of `group`'s moved shards: the first readable
/// shard that holds every dkey of the object (any replica; an EC parity shard, which receives
/// every write), or, when no such shard is readable, every readable shard.
pub fn leads(group: &Group, class: ObjectClass, me: TargetRef) -> bool {
    let k = class.data_shards();
    let complete = |s: &&ShardPlacement| !class.is_ec() || s.shard >= k;
    // Shards where their data can be read now (a rebuilding shard at its base target).
    let sources: Vec<ShardPlacement> = group.shards.iter().filter(|s| s.read_from().is_some()).map(ShardPlacement::for_reads).collect();
    match sources.iter().find(complete) {
        Some(l) => l.target() == me,
        None => sources.iter().any(|s| s.target() == me),
    }
}

/// One shard to rebuild.
#[derive(Debug, Clone, Copy)]
struct Task {
    volume: usize,
    chunk: u64,
    shard: u32,
    since: u64,
}

/// Progress of the running pass, shared with the reporter.
#[derive(Debug, Default)]
struct Shared {
    progress: Mutex<RebuildProgress>,
}

impl Shared {
    fn update(&self, f: impl FnOnce(&mut RebuildProgress)) {
        f(&mut self.progress.lock().unwrap_or_else(|e| e.into_inner()));
    }

    fn get(&self) -> RebuildProgress {
        self.progress.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// The healing agent of one engine.
#[derive(Debug)]
pub struct Healer {
    mgmt: MgmtClient,
    cluster: Arc<Cluster>,
    rank: u32,
    uuid: Uuid,
    settings: HealSection,
    /// The engine's count of host requests served (`Engine::host_ops`), which paces rebuilds.
    host_ops: Arc<AtomicU64>,
    /// Aggregation holds set per (pool id, volume, target): the floor last sent.
    holds: Mutex<HashMap<(u32, u128, u16), u64>>,
    /// The snapshots the service retains, as the last heartbeat reply said.
    snapshots: watch::Receiver<Arc<Snapshots>>,
    /// Scrub counters per pool id (the scrubber adds to them).
    pub scrub: Mutex<HashMap<u32, ScrubCounters>>,
}

impl Healer {
    /// A healer for engine `rank`, whose RPC server counts host requests in `host_ops`
    /// ([`crate::server::Engine::host_ops`]).
    /// `snapshots` follows the snapshot epochs the heartbeat replies name.
    pub fn new(
        mgmt: MgmtClient,
        rank: u32,
        uuid: Uuid,
        settings: HealSection,
        host_ops: Arc<AtomicU64>,
        snapshots: watch::Receiver<Arc<Snapshots>>,
    ) -> Arc<Healer> {
        let cluster = Cluster::background(mgmt.clone());
        Arc::new(Healer {
            mgmt,
            cluster,
            rank,
            uuid,
            settings,
            host_ops,
            holds: Mutex::new(HashMap::new()),
            snapshots,
            scrub: Mutex::new(HashMap::new()),
        })
    }

    /// The epochs whose views a rebuilt shard of `v` must keep (snapshots, rollbacks): the
    /// service's latest list and the volume's description, ascending.
    pub fn retained(&self, v: &Volume) -> Vec<u64> {
        let info = v.info();
        let latest = self.snapshots.borrow().epochs.get(&info.uuid.as_u128()).cloned().unwrap_or_default();
        let mut all: Vec<u64> = latest
            .into_iter()
            .chain(info.snapshots.iter().map(|s| s.epoch))
            .chain(info.rollbacks.iter().flat_map(|r| [r.at, r.to]))
            .collect();
        all.sort_unstable();
        all.dedup();
        all
    }

    /// Snapshot epochs of `v` at or below `read_epoch` that a rebuild which kept only `used`
    /// missed: it waits (bounded) until the service's list is complete to `read_epoch`. A
    /// snapshot taken while a shard was being rebuilt is found here, and that shard is rebuilt
    /// again so that the snapshot keeps its view.
    pub async fn snapshots_missed(&self, v: &Volume, used: &[u64], read_epoch: u64) -> Result<Vec<u64>, String> {
        let mut rx = self.snapshots.clone();
        let wait = rx.wait_for(|s| s.as_of >= read_epoch);
        let latest = match tokio::time::timeout(SNAPSHOT_LIST_WAIT, wait).await {
            Ok(Ok(s)) => s.clone(),
            _ => return Err(format!("the service's snapshot list did not reach epoch {read_epoch} within {SNAPSHOT_LIST_WAIT:?}")),
        };
        let uuid = v.info().uuid.as_u128();
        let epochs = latest.epochs.get(&uuid).map(Vec::as_slice).unwrap_or_default();
        Ok(epochs.iter().copied().filter(|e| *e <= read_epoch && used.binary_search(e).is_err()).collect())
    }

    /// Runs passes until `stop`: whenever a pool's map version moves past the last completed
    /// pass, and again after a failed one.
    pub async fn run(self: Arc<Self>, mut pools: watch::Receiver<Vec<PoolVersion>>, stop: CancellationToken) {
        let mut done: HashMap<u32, u32> = HashMap::new();
        // Failed attempts per pool at a map version.
        let mut attempts: HashMap<u32, (u32, u32)> = HashMap::new();
        loop {
            let current = pools.borrow_and_update().clone();
            let mut failed = false;
            for p in &current {
                if p.name.is_empty() || done.get(&p.pool_id) == Some(&p.map_version) {
                    continue;
                }
                let tried = attempts.entry(p.pool_id).or_insert((p.map_version, 0));
                if tried.0 != p.map_version {
                    *tried = (p.map_version, 0);
                }
                tried.1 += 1;
                let attempt = tried.1;
                match self.pass(p, attempt, &pools, &stop).await {
                    Ok(Some(v)) => {
                        done.insert(p.pool_id, v);
                    }
                    Ok(None) => {} // superseded by a newer map, or stopping
                    Err(e) => {
                        warn!(pool = %p.name, version = p.map_version, error = %e, "rebuild pass failed; retrying");
                        failed = true;
                    }
                }
                if stop.is_cancelled() {
                    return;
                }
            }
            let pause = if failed { PASS_RETRY } else { Duration::from_secs(3600) };
            tokio::select! {
                _ = stop.cancelled() => return,
                r = pools.changed() => if r.is_err() { return },
                _ = tokio::time::sleep(pause) => {}
            }
        }
    }

    /// This engine's scrub counters for pool `pool_id`.
    pub fn scrub_counters(&self, pool_id: u32) -> ScrubCounters {
        self.scrub.lock().unwrap_or_else(|e| e.into_inner()).get(&pool_id).copied().unwrap_or_default()
    }

    /// Changes this engine's scrub (and EC aggregation) counters for pool `pool_id`.
    pub fn update_scrub(&self, pool_id: u32, f: impl FnOnce(&mut ScrubCounters)) {
        f(self.scrub.lock().unwrap_or_else(|e| e.into_inner()).entry(pool_id).or_default());
    }

    /// Reports the rebuild progress of `pool` with its scrub counters.
    async fn report(&self, pool: &PoolVersion, progress: &RebuildProgress) {
        let r = EngineReport { uuid: self.uuid, rebuild: progress.clone(), scrub: self.scrub_counters(pool.pool_id) };
        if let Err(e) = self.mgmt.report(&pool.name, self.rank, &r).await {
            warn!(pool = %pool.name, error = %e, "cannot report rebuild progress");
        }
    }

    /// Reports the scrub counters of `pool` alone: the rebuild part names no map version (0),
    /// which the service does not count towards any rebuild.
    pub async fn report_scrub(&self, pool: &PoolVersion) -> Result<(), tessera_mgmt_api::MgmtError> {
        let r = EngineReport { uuid: self.uuid, rebuild: RebuildProgress::default(), scrub: self.scrub_counters(pool.pool_id) };
        self.mgmt.report(&pool.name, self.rank, &r).await
    }

    /// One pass for `p`. `Ok(Some(version))` when it completed, `Ok(None)` when a newer map
    /// superseded it.
    async fn pass(
        &self,
        p: &PoolVersion,
        attempt: u32,
        pools: &watch::Receiver<Vec<PoolVersion>>,
        stop: &CancellationToken,
    ) -> Result<Option<u32>, String> {
        let map = self.mgmt.pool_map(&p.name).await.map_err(|e| e.to_string())?;
        let version = map.version;
        let superseded = || stop.is_cancelled() || pools.borrow().iter().any(|q| q.pool_id == p.pool_id && q.map_version > version);
        let infos = self.mgmt.volumes(&p.name).await.map_err(|e| e.to_string())?;
        let mut volumes = Vec::new();
        for info in &infos {
            let v = self.cluster.open_volume(info).await.map_err(|e| e.to_string())?;
            v.refresh_pool_map(version).await;
            volumes.push(v);
        }
        // Every engine refuses the older map from here on (one announcement covers the pool).
        // A write it accepted just before is in a target's queue and commits within its next
        // group commit, long before the scan below reaches data.
        if let Some(v) = volumes.first() {
            v.announce_map().await;
        }
        let shared = Arc::new(Shared::default());
        shared
            .update(|g| *g = RebuildProgress { map_version: version, attempt, objects_total: volumes.len() as u64, ..Default::default() });
        let mine: Vec<(u16, TargetStateName, bool)> =
            map.targets.iter().filter(|t| t.rank == self.rank).map(|t| (t.index, t.state, t.drained)).collect();
        let upin: Vec<u16> = mine.iter().filter(|t| t.1 == TargetStateName::UpIn).map(|t| t.0).collect();
        let moving = map.targets.iter().any(|t| matches!(t.state, TargetStateName::Down | TargetStateName::Up));

        // Hold aggregation while a target is out with a floor.
        let hold =
            map.targets.iter().filter(|t| t.since_epoch > 0 && t.state != TargetStateName::UpIn).map(|t| t.since_epoch).min().unwrap_or(0);
        for v in &volumes {
            for &t in &upin {
                let key = (p.pool_id, v.info().uuid.as_u128(), t);
                let held = self.holds.lock().unwrap_or_else(|e| e.into_inner()).get(&key).copied();
                if held != Some(hold) && (hold > 0 || held.is_some()) {
                    v.hold_aggregation(TargetRef { rank: self.rank, index: t }, hold).await.map_err(|e| e.to_string())?;
                    self.holds.lock().unwrap_or_else(|e| e.into_inner()).insert(key, hold);
                }
            }
        }

        // Reporter.
        // Progress goes to the service every second while the pass runs.
        let body = self.pass_body(p, &map, &volumes, &upin, &mine, moving, attempt, &shared, &superseded);
        tokio::pin!(body);
        let result = loop {
            tokio::select! {
                r = &mut body => break r,
                _ = tokio::time::sleep(REPORT_EVERY) => self.report(p, &shared.get()).await,
            }
        };
        match result {
            Ok(true) => {
                shared.update(|g| g.state = EngineRebuildState::Done);
                self.report(p, &shared.get()).await;
                Ok(Some(version))
            }
            Ok(false) => Ok(None),
            Err(e) => {
                shared.update(|g| {
                    g.state = EngineRebuildState::Failed;
                    g.last_error = Some(e.clone());
                });
                self.report(p, &shared.get()).await;
                Err(e)
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn pass_body(
        &self,
        p: &PoolVersion,
        map: &PoolMapInfo,
        volumes: &[Volume],
        upin: &[u16],
        mine: &[(u16, TargetStateName, bool)],
        moving: bool,
        attempt: u32,
        shared: &Shared,
        superseded: &(dyn Fn() -> bool + Sync),
    ) -> Result<bool, String> {
        let started = Instant::now();
        let floors: HashMap<TargetRef, u64> = map
            .targets
            .iter()
            .filter(|t| t.state == TargetStateName::Up)
            .map(|t| (TargetRef { rank: t.rank, index: t.index }, t.since_epoch))
            .collect();
        let mut tasks = Vec::new();
        let mut stale: Vec<(usize, TargetRef, u64)> = Vec::new();
        for (vi, v) in volumes.iter().enumerate() {
            for &t in upin {
                let me = TargetRef { rank: self.rank, index: t };
                let chunks = v.list_chunks(me, None).await.map_err(|e| e.to_string())?;
                // Chunks changed above each reintegration floor, listed once per floor.
                let mut changed: HashMap<u64, BTreeSet<u64>> = HashMap::new();
                for &floor in floors.values().filter(|&&f| f > 0) {
                    if let std::collections::hash_map::Entry::Vacant(e) = changed.entry(floor) {
                        e.insert(v.list_chunks(me, Some(floor)).await.map_err(|e| e.to_string())?.into_iter().collect());
                    }
                }
                let all: BTreeSet<u64> = chunks.iter().copied().chain(changed.values().flatten().copied()).collect();
                for chunk in all {
                    let group = v.chunk_group(chunk).map_err(|e| e.to_string())?;
                    let Some(_) = group.shards.iter().find(|s| s.target() == me || s.base_source == Some(me)) else {
                        if !moving {
                            stale.push((vi, me, chunk));
                        }
                        continue;
                    };
                    if !moving || !leads(&group, v.layout().class(), me) {
                        continue;
                    }
                    for s in group.shards.iter().filter(|s| s.writable() && s.rebuilding) {
                        let since = floors.get(&s.target()).copied().unwrap_or(0);
                        if since > 0 && !changed.get(&since).is_some_and(|c| c.contains(&chunk)) {
                            continue;
                        }
                        tasks.push(Task { volume: vi, chunk, shard: s.shard, since });
                    }
                }
            }
            shared.update(|g| g.objects_done += 1);
            if superseded() {
                return Ok(false);
            }
        }
        let per_task: Vec<u64> = tasks.iter().map(|t| volumes[t.volume].shard_bytes_per_chunk()).collect();
        shared.update(|g| {
            g.state = EngineRebuildState::Running;
            g.dkeys_total = tasks.len() as u64;
            g.bytes_total = per_task.iter().sum();
        });
        if !tasks.is_empty() {
            info!(pool = %p.name, version = map.version, shards = tasks.len(), "rebuild pass: rebuilding the shards this engine leads");
        }
        // Host I/O on this engine slows the rebuild down to `rebuild_rate_busy` (crate::pace).
        let mut pace = RebuildPace::new(self.settings.rebuild_rate, self.settings.rebuild_rate_busy);
        let host_ops = || self.host_ops.load(Ordering::Relaxed);
        pace.observe(Instant::now(), host_ops());
        let mut busy_time = Duration::ZERO;
        let mut bytes_done = 0u64;
        let mut last_error = None;
        let mut failures = 0u64;
        // Per volume: the snapshot epochs its shards were rebuilt with, and the newest read epoch.
        let mut checks: HashMap<usize, (Vec<u64>, u64)> = HashMap::new();
        for t in &tasks {
            if superseded() {
                return Ok(false);
            }
            let v = &volumes[t.volume];
            let task_started = Instant::now();
            // Reintegration is incremental twice over: only chunks changed above the floor are
            // tasks, and inside each only the versions above it are copied (`since`).
            let opts = RebuildOptions { since: t.since, settle_torn: attempt > SETTLE_TORN_AFTER, discard_below: map.map_epoch };
            let mut outcome = Err(VolumeError::Unavailable("not tried".into()));
            let retained = self.retained(v);
            for i in 0..CHUNK_ATTEMPTS {
                outcome = v.rebuild_shard(t.chunk, t.shard, opts, &retained).await;
                if outcome.is_ok() || superseded() {
                    break;
                }
                if i + 1 < CHUNK_ATTEMPTS {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    v.refresh_pool_map(map.version).await;
                }
            }
            let bytes = outcome.as_ref().map_or(0, |r| r.bytes);
            match outcome {
                Ok(r) => {
                    let check = checks.entry(t.volume).or_insert_with(|| (retained.clone(), 0));
                    check.1 = check.1.max(r.read_epoch);
                    bytes_done += r.bytes;
                    shared.update(|g| {
                        g.dkeys_done += 1;
                        g.bytes_done = bytes_done;
                    });
                }
                Err(e) => {
                    failures += 1;
                    let msg = format!("volume {} chunk {} shard {} (floor {}): {e}", v.info().name, t.chunk, t.shard, t.since);
                    warn!(pool = %p.name, "{msg}");
                    shared.update(|g| g.last_error = Some(msg.clone()));
                    last_error = Some(msg);
                }
            }
            // Throttle: never ahead of the rate in force (lower while hosts do I/O here).
            let now = Instant::now();
            pace.observe(now, host_ops());
            let wait = pace.done(task_started, now, bytes);
            if pace.busy(now) {
                busy_time += now - task_started + wait;
            }
            if !wait.is_zero() {
                tokio::time::sleep(wait).await;
            }
        }
        if let Some(e) = last_error {
            return Err(format!("{failures} shard(s) not rebuilt; last: {e}"));
        }
        // A snapshot taken while the pass ran may be missing from shards rebuilt before the
        // engine heard of it: the pass runs again with it.
        for (vi, (used, read_epoch)) in &checks {
            let v = &volumes[*vi];
            let missed = self.snapshots_missed(v, used, *read_epoch).await?;
            if !missed.is_empty() {
                return Err(format!(
                    "volume {}: snapshots at epochs {missed:?} were taken during the rebuild; rebuilding again",
                    v.info().name
                ));
            }
        }
        if !tasks.is_empty() {
            info!(pool = %p.name, version = map.version, shards = tasks.len(), bytes = bytes_done, secs = started.elapsed().as_secs_f64(), host_busy_secs = busy_time.as_secs_f64(), "rebuild pass done");
        }
        // Clean-up once settled: chunks no longer ours, drained targets emptied.
        if !moving {
            for (vi, target, chunk) in stale {
                volumes[vi].discard_chunk(target, Some(chunk)).await.map_err(|e| e.to_string())?;
            }
            for &(t, state, drained) in mine {
                if drained && state == TargetStateName::DownOut {
                    for v in volumes {
                        v.discard_chunk(TargetRef { rank: self.rank, index: t }, None).await.map_err(|e| e.to_string())?;
                    }
                }
            }
        }
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tessera_client::placement::TargetState;

    fn shard(shard: u32, rank: u32, state: TargetState, rebuilding: bool) -> ShardPlacement {
        ShardPlacement { shard, rank, target_index: 0, state, moved_from: None, rebuilding, shared_domain: false, base_source: None }
    }

    fn me(rank: u32) -> TargetRef {
        TargetRef { rank, index: 0 }
    }

    #[test]
    fn one_leader_per_group_preferring_shards_that_hold_every_dkey() {
        let ec = ObjectClass::Ec { k: 2, p: 1 };
        // Data shard 0 moved (rebuilding): the parity shard leads, not the other data shard.
        let g = Group {
            index: 0,
            shards: vec![
                shard(0, 5, TargetState::UpIn, true),
                shard(1, 1, TargetState::UpIn, false),
                shard(2, 2, TargetState::UpIn, false),
            ],
        };
        assert!(leads(&g, ec, me(2)));
        assert!(!leads(&g, ec, me(1)));
        assert!(!leads(&g, ec, me(5)), "the shard being rebuilt never leads");
        // The parity shard moved: no parity readable, so every readable data shard acts.
        let g = Group {
            index: 0,
            shards: vec![
                shard(0, 0, TargetState::UpIn, false),
                shard(1, 1, TargetState::UpIn, false),
                shard(2, 5, TargetState::UpIn, true),
            ],
        };
        assert!(leads(&g, ec, me(0)) && leads(&g, ec, me(1)) && !leads(&g, ec, me(5)));
        // Replicas: the first readable one.
        let g = Group { index: 0, shards: vec![shard(0, 3, TargetState::Down, false), shard(1, 4, TargetState::UpIn, false)] };
        assert!(leads(&g, ObjectClass::Rp(2), me(4)));
        assert!(!leads(&g, ObjectClass::Rp(2), me(3)));
    }
}
