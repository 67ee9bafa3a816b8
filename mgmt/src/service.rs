//! The service: a [`Store`], the last committed state ([`Snapshot`], published on a
//! `tokio::sync::watch` channel so that long polls wake on every commit), the engines'
//! heartbeat clocks (memory only), the heartbeat monitor, and the engines' rebuild and scrub
//! reports (memory only): when every engine that must has finished rebuilding towards a pool's
//! current map version, the service runs [`Command::RebuildDone`].
//!
//! Writes are serialised by one lock: take the latest snapshot, [`machine::apply`] the command,
//! commit the result against the snapshot's version, publish. If the store reports a conflict
//! (another writer), the state is reloaded and the command applied again. Reads use the
//! published snapshot and take no lock.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tessera_engine_client::hlc;
use tessera_mgmt_api::{
    ClusterVersion, EngineInfo, EngineRebuildState, EngineReport, EngineState, Heartbeat, HeartbeatReply, PoolInfo, PoolVersion,
    RebuildProgress, RebuildState, RebuildStatus, RegisterEngine, ScrubCounters, SnapshotInfo, SystemInfo, TargetSelector, TargetStateName,
    VolumeInfo, VolumeUsage,
};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};
use uuid::Uuid;

use crate::machine::{self, CmdError, Command, Env, Outcome};
use crate::state::{PoolRec, State};
use crate::store::{Store, StoreError};

/// Heartbeat and reintegration settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServiceConfig {
    /// An engine silent this long is marked Down.
    pub heartbeat_timeout: Duration,
    /// How often engines are told to heartbeat.
    pub heartbeat_interval: Duration,
    /// An engine that registers gets its DOWN and DOWNOUT (not drained) targets back: UP, to be
    /// reintegrated. Off: they stay out until `POST /v1/pools/{pool}/reintegrate`.
    pub auto_reintegrate: bool,
    /// How far before a DOWN marking a target's reintegration floor lies: must exceed the
    /// longest a client retries a write (25 s), so every write the target missed is above it.
    pub floor_lag: Duration,
    /// A target out (DOWNOUT) for longer than this is no longer reintegrated incrementally: its
    /// floor expires, and engines stop holding aggregation (and the space of overwritten
    /// versions) for it. A return after that is a full rebuild.
    pub reintegration_window: Duration,
}

/// Default [`ServiceConfig::reintegration_window`]: one day.
pub const REINTEGRATION_WINDOW: Duration = Duration::from_secs(24 * 3600);

impl Default for ServiceConfig {
    fn default() -> Self {
        ServiceConfig {
            heartbeat_timeout: Duration::from_secs(5),
            heartbeat_interval: Duration::from_secs(1),
            auto_reintegrate: true,
            floor_lag: machine::EPOCH_FLOOR_LAG,
            reintegration_window: REINTEGRATION_WINDOW,
        }
    }
}

/// What the service knows of one pool's rebuild (memory only).
#[derive(Debug, Default)]
struct PoolHeal {
    /// The map version `reports` are for.
    version: u32,
    /// When that version was first seen with DOWN or UP targets.
    started: Option<Instant>,
    /// When the first report for that version came.
    first_report: Option<Instant>,
    /// Latest rebuild report per rank for `version`.
    reports: BTreeMap<u32, RebuildProgress>,
    /// Latest scrub counters per rank.
    scrub: BTreeMap<u32, ScrubCounters>,
    /// Rebuilds completed since the service started.
    completed: u32,
    /// The last completed rebuild, shown while idle.
    last: Option<RebuildStatus>,
}

impl PoolHeal {
    /// Moves on to `p`'s current map version (never back: a report may carry an older snapshot).
    fn sync(&mut self, p: &PoolRec) {
        if p.map_version <= self.version {
            return;
        }
        self.version = p.map_version;
        self.reports.clear();
        self.first_report = None;
        self.started = None;
        if !p.settled() {
            self.started = Some(Instant::now());
            let (down, up) = down_up(p);
            info!(pool = %p.name, version = p.map_version, targets_down = down, targets_up = up, "rebuild started");
        }
    }
}

fn down_up(p: &PoolRec) -> (u32, u32) {
    let count = |s: TargetStateName| p.targets.iter().filter(|t| t.state == s).count() as u32;
    (count(TargetStateName::Down), count(TargetStateName::Up))
}

/// The engines that must finish a rebuild of `p`: the Up engines with an UPIN target in it (or,
/// when there is none, with an UP target: they can only rebuild among themselves).
pub fn required_engines(state: &State, p: &PoolRec) -> BTreeSet<u32> {
    let with = |s: TargetStateName| -> BTreeSet<u32> {
        p.targets
            .iter()
            .filter(|t| t.state == s)
            .filter(|t| state.engines.get(&t.rank).is_some_and(|e| e.state == EngineState::Up))
            .map(|t| t.rank)
            .collect()
    };
    let upin = with(TargetStateName::UpIn);
    if upin.is_empty() {
        with(TargetStateName::Up)
    } else {
        upin
    }
}

/// Whether every engine that must has reported `done` for `p`'s current map version (and there
/// is something to finish).
fn all_done(state: &State, p: &PoolRec, h: &PoolHeal) -> bool {
    let required = required_engines(state, p);
    !p.settled()
        && h.version == p.map_version
        && !required.is_empty()
        && required.iter().all(|r| h.reports.get(r).is_some_and(|x| x.state == EngineRebuildState::Done))
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

/// The rebuild status of `p` from its map and the reports.
fn rebuild_status(state: &State, p: &PoolRec, h: &PoolHeal, now: Instant) -> RebuildStatus {
    let (down, up) = down_up(p);
    if down + up == 0 {
        let mut st = h.last.clone().unwrap_or_default();
        st.state = RebuildState::Idle;
        st.eta_seconds = None;
        st.completed = h.completed;
        return st;
    }
    let required = required_engines(state, p);
    let current = h.version == p.map_version;
    let reports: Vec<(u32, &RebuildProgress)> = if current { h.reports.iter().map(|(r, x)| (*r, x)).collect() } else { Vec::new() };
    let mut st = RebuildStatus {
        state: RebuildState::Running,
        map_version: p.map_version,
        targets_down: down,
        targets_up: up,
        engines_total: required.len() as u32,
        completed: h.completed,
        ..Default::default()
    };
    for (_, x) in &reports {
        st.objects_done += x.objects_done;
        st.objects_total += x.objects_total;
        st.dkeys_done += x.dkeys_done;
        st.dkeys_total += x.dkeys_total;
        st.bytes_done += x.bytes_done;
        st.bytes_total += x.bytes_total;
    }
    let of = |r: &u32| reports.iter().find(|(k, _)| k == r).map(|(_, x)| *x);
    st.engines_done = required.iter().filter(|r| of(r).is_some_and(|x| x.state == EngineRebuildState::Done)).count() as u32;
    if required.iter().any(|r| of(r).is_some_and(|x| x.state == EngineRebuildState::Failed)) {
        st.state = RebuildState::Failed;
    }
    st.last_error = reports
        .iter()
        .filter(|(_, x)| x.state == EngineRebuildState::Failed)
        .chain(reports.iter())
        .find_map(|(r, x)| x.last_error.as_ref().map(|e| format!("rank {r}: {e}")));
    if current {
        st.elapsed_seconds = h.started.map_or(0, |t| now.saturating_duration_since(t).as_secs());
        if let Some(t) = h.first_report {
            let s = secs(now.saturating_duration_since(t));
            if s > 0.0 {
                st.rate_bytes_per_sec = (st.bytes_done as f64 / s) as u64;
            }
        }
    }
    let scanned = required.iter().all(|r| of(r).is_some_and(|x| x.state != EngineRebuildState::Scanning));
    if st.rate_bytes_per_sec > 0 && scanned {
        st.eta_seconds = Some(st.bytes_total.saturating_sub(st.bytes_done) / st.rate_bytes_per_sec);
    }
    st
}

/// A committed state and its store version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// Store version.
    pub version: ClusterVersion,
    /// The state.
    pub state: State,
}

/// Why a service call failed.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// The command was refused.
    #[error(transparent)]
    Command(#[from] CmdError),
    /// The store failed; nothing was changed.
    #[error("store: {0}")]
    Store(#[from] StoreError),
}

impl ServiceError {
    /// The HTTP status to answer with.
    pub fn status(&self) -> u16 {
        match self {
            ServiceError::Command(c) => c.status(),
            ServiceError::Store(StoreError::Conflict { .. }) => 409,
            ServiceError::Store(_) => 500,
        }
    }
}

/// How many times a command is retried after store conflicts.
const CONFLICT_RETRIES: usize = 5;

/// The management service's core (no HTTP).
#[derive(Debug)]
pub struct Service {
    store: Arc<dyn Store>,
    config: ServiceConfig,
    write: Mutex<()>,
    snap: watch::Sender<Arc<Snapshot>>,
    /// Last registration or heartbeat per rank, since this process started.
    clocks: Mutex<HashMap<u32, Instant>>,
    /// Each engine's stable epoch from its last heartbeat (reported ones only; not stored).
    stable: Mutex<HashMap<u32, u64>>,
    /// Woken whenever an engine's stable epoch moves on.
    stable_moved: tokio::sync::Notify,
    /// Each engine's bytes in use from its last heartbeat (not stored).
    used: Mutex<HashMap<u32, u64>>,
    /// Each engine's space per volume from its last heartbeat that reported it (not stored).
    volume_usage: Mutex<HashMap<u32, HashMap<Uuid, VolumeUsage>>>,
    /// Engines not heard from since count their silence from here (the start, or when this
    /// service became the leader).
    grace_from: Mutex<Instant>,
    /// Whether this service acts as the leader: marks engines Down, expires floors, takes
    /// writes. Always with an embedded store; with etcd, while it holds the election.
    leader: AtomicBool,
    /// The leader's API address (etcd mode), where a follower redirects what it does not serve.
    leader_addr: Mutex<Option<String>>,
    /// This service's own address, once it has led.
    me: Mutex<Option<String>>,
    /// Every engine went silent at once (warned once; see [`Service::check_heartbeats`]).
    cut_off: AtomicBool,
    /// Rebuild and scrub reports per pool (lock order: `write` before `heal`).
    heal: Mutex<HashMap<String, PoolHeal>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Sets each snapshot's bytes held alone from the engines' reports (`None`: none reported).
fn fill_held(snapshots: &mut [SnapshotInfo], held: Option<&HashMap<u64, u64>>) {
    for s in snapshots {
        s.held_bytes = held.map(|h| h.get(&s.epoch).copied().unwrap_or(0));
    }
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// The epoch floor of a target going DOWN now: the HLC epoch of [`machine::EPOCH_FLOOR_LAG`] ago.
pub fn epoch_floor_now(lag: Duration) -> u64 {
    let lag = lag.as_nanos() as u64;
    hlc::epoch_from_nanos(hlc::physical_nanos(hlc::now()).saturating_sub(lag))
}

impl Service {
    /// Loads the state from `store`. Every known engine's heartbeat clock starts now (grace).
    pub fn open(store: Arc<dyn Store>, config: ServiceConfig) -> Result<Service, StoreError> {
        let (version, state) = store.load()?;
        let svc = Service {
            store,
            config,
            write: Mutex::new(()),
            snap: watch::channel(Arc::new(Snapshot { version, state })).0,
            clocks: Mutex::new(HashMap::new()),
            stable: Mutex::new(HashMap::new()),
            stable_moved: tokio::sync::Notify::new(),
            used: Mutex::new(HashMap::new()),
            volume_usage: Mutex::new(HashMap::new()),
            grace_from: Mutex::new(Instant::now()),
            leader: AtomicBool::new(true),
            leader_addr: Mutex::new(None),
            me: Mutex::new(None),
            cut_off: AtomicBool::new(false),
            heal: Mutex::new(HashMap::new()),
        };
        svc.observe(&svc.snapshot().state);
        Ok(svc)
    }

    /// A service sharing its store with others (etcd): it starts as a follower and acts as the
    /// leader only after [`Service::lead`].
    pub fn open_follower(store: Arc<dyn Store>, config: ServiceConfig) -> Result<Service, StoreError> {
        let svc = Service::open(store, config)?;
        svc.leader.store(false, Ordering::SeqCst);
        Ok(svc)
    }

    /// Whether this service acts as the leader.
    pub fn is_leader(&self) -> bool {
        self.leader.load(Ordering::SeqCst)
    }

    /// The leader's API address, if known (etcd mode).
    pub fn leader_addr(&self) -> Option<String> {
        lock(&self.leader_addr).clone()
    }

    /// Records where the leader serves its API.
    pub fn set_leader_addr(&self, addr: Option<String>) {
        *lock(&self.leader_addr) = addr;
    }

    /// Becomes the leader (won the election as `me`): takes the store's current state, and
    /// every engine's heartbeat clock restarts now, so that engines that kept heartbeating the
    /// old leader are not all marked Down at once.
    pub fn lead(&self, me: &str) -> Result<(), StoreError> {
        let _w = lock(&self.write);
        let (version, state) = self.store.load()?;
        self.publish(version, state);
        lock(&self.clocks).clear();
        *lock(&self.grace_from) = Instant::now();
        *lock(&self.me) = Some(me.to_string());
        self.set_leader_addr(Some(me.to_string()));
        self.leader.store(true, Ordering::SeqCst);
        Ok(())
    }

    /// Stops acting as the leader (the election was lost or left). Until the election names
    /// the next leader there is none to send clients to (never this service itself).
    pub fn follow(&self) {
        self.leader.store(false, Ordering::SeqCst);
        let me = lock(&self.me).clone();
        let mut addr = lock(&self.leader_addr);
        if me.is_some() && *addr == me {
            *addr = None;
        }
    }

    /// The leader's address to send a client to: never this service's own (a follower that was
    /// the leader a moment ago would send clients to itself).
    pub fn redirect_to(&self) -> Option<String> {
        let me = lock(&self.me).clone();
        self.leader_addr().filter(|a| Some(a) != me.as_ref())
    }

    /// Takes the store's state if another service committed a newer one (a follower follows
    /// the leader's commits this way).
    pub fn refresh(&self) -> Result<ClusterVersion, StoreError> {
        let _w = lock(&self.write);
        let (version, state) = self.store.load()?;
        if version > self.snapshot().version {
            self.publish(version, state);
        }
        Ok(version)
    }

    /// Makes `state` at store `version` the published snapshot (long polls wake) and follows
    /// its pools' map versions. Callers hold the write lock.
    fn publish(&self, version: ClusterVersion, state: State) -> Arc<Snapshot> {
        let s = Arc::new(Snapshot { version, state });
        self.snap.send_replace(s.clone());
        self.observe(&s.state);
        s
    }

    /// Follows every pool's map version in the rebuild bookkeeping (logs rebuilds starting).
    fn observe(&self, state: &State) {
        let mut heal = lock(&self.heal);
        for p in state.pools.values() {
            heal.entry(p.name.clone()).or_default().sync(p);
        }
    }

    /// The settings.
    pub fn config(&self) -> ServiceConfig {
        self.config
    }

    /// The last committed state.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snap.borrow().clone()
    }

    /// A receiver that sees every committed state.
    pub fn subscribe(&self) -> watch::Receiver<Arc<Snapshot>> {
        self.snap.subscribe()
    }

    /// Applies `cmd` as one transaction. `on_commit` runs with the write lock held, after the
    /// commit (or after a no-op), before anyone else can write.
    fn execute_with(&self, cmd: &Command, on_commit: impl FnOnce(&Snapshot)) -> Result<Outcome, ServiceError> {
        let w = lock(&self.write);
        self.execute_locked(&w, cmd, on_commit)
    }

    /// [`Service::execute_with`] with the write lock already held (`_w` proves it).
    fn execute_locked(&self, _w: &MutexGuard<'_, ()>, cmd: &Command, on_commit: impl FnOnce(&Snapshot)) -> Result<Outcome, ServiceError> {
        let mut snap = self.snapshot();
        let mut attempt = 0;
        loop {
            attempt += 1;
            let env =
                Env { uuid: Uuid::new_v4(), now: unix_now(), epoch_floor: epoch_floor_now(self.config.floor_lag), epoch_now: hlc::now() };
            let (next, outcome) = machine::apply(&snap.state, cmd, &env)?;
            if next == snap.state {
                on_commit(&snap);
                return Ok(outcome);
            }
            match self.store.commit(snap.version, &next) {
                Ok(version) => {
                    let s = self.publish(version, next);
                    on_commit(&s);
                    return Ok(outcome);
                }
                Err(StoreError::Conflict { current, .. }) if attempt <= CONFLICT_RETRIES => {
                    warn!(expected = snap.version, current, "store changed underneath; reloading");
                    let (version, state) = self.store.load()?;
                    snap = Arc::new(Snapshot { version, state });
                    self.snap.send_replace(snap.clone());
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Applies `cmd` as one transaction.
    pub fn execute(&self, cmd: &Command) -> Result<Outcome, ServiceError> {
        self.execute_with(cmd, |_| {})
    }

    /// A heartbeat reply from `state`, which must be the last committed one, with the write
    /// lock held: no snapshot can then be recorded between reading the retained epochs and
    /// taking `retention_as_of`, and any snapshot recorded after it takes a larger epoch.
    fn heartbeat_reply(&self, state: &State, rank: u32, pools: Vec<PoolVersion>) -> HeartbeatReply {
        HeartbeatReply {
            heartbeat_interval_ms: self.config.heartbeat_interval.as_millis() as u64,
            pools,
            retention: machine::retention(state, rank),
            retention_as_of: hlc::now(),
        }
    }

    /// An engine registers; its heartbeat clock restarts in the same locked section, so the
    /// monitor never sees it Up with an old clock.
    pub fn register(&self, req: &RegisterEngine) -> Result<HeartbeatReply, ServiceError> {
        let mut reply = None;
        let was = self.snapshot().state.engines.get(&req.rank).map(|e| e.state);
        let cmd = Command::RegisterEngine { req: req.clone(), reintegrate: self.config.auto_reintegrate };
        let out = self.execute_with(&cmd, |s| {
            lock(&self.clocks).insert(req.rank, Instant::now());
            reply = Some(self.heartbeat_reply(&s.state, req.rank, machine::pool_versions(&s.state, req.rank)));
        })?;
        let (replaced, reintegrated) = match out {
            Outcome::Registered { replaced, reintegrated, .. } => (replaced, reintegrated),
            _ => (None, Vec::new()),
        };
        if let Some(old) = replaced {
            warn!(rank = req.rank, old = %old, new = %req.uuid, address = %req.address, "rank taken over by a replacement engine: its targets are rebuilt from scratch");
        }
        match was {
            None => info!(rank = req.rank, uuid = %req.uuid, address = %req.address, targets = req.targets, "engine registered"),
            Some(EngineState::Down) if !self.config.auto_reintegrate => {
                info!(rank = req.rank, address = %req.address, "engine up again (manual reintegration: its targets stay out)")
            }
            Some(EngineState::Down) => info!(rank = req.rank, address = %req.address, "engine up again"),
            Some(EngineState::Up) => {}
        }
        for (pool, version) in &reintegrated {
            info!(rank = req.rank, pool = %pool, version, "reintegrating the engine's targets: UP");
        }
        match reply {
            Some(r) => Ok(r),
            None => {
                let _w = lock(&self.write);
                let state = &self.snapshot().state;
                Ok(self.heartbeat_reply(state, req.rank, machine::pool_versions(state, req.rank)))
            }
        }
    }

    /// An engine heartbeats. No store write.
    pub fn heartbeat(&self, rank: u32, uuid: Uuid) -> Result<HeartbeatReply, ServiceError> {
        self.heartbeat_with(rank, &Heartbeat { uuid, stable_epoch: 0, used_bytes: None, volumes: None })
    }

    /// An engine heartbeats with what it reports (its stable epoch). No store write.
    pub fn heartbeat_with(&self, rank: u32, hb: &Heartbeat) -> Result<HeartbeatReply, ServiceError> {
        // The write lock makes the retained epochs and `retention_as_of` one consistent reading.
        let _w = lock(&self.write);
        let mut clocks = lock(&self.clocks);
        let snap = self.snapshot();
        let pools = machine::heartbeat_pools(&snap.state, rank, hb.uuid)?;
        clocks.insert(rank, Instant::now());
        if let Some(used) = hb.used_bytes {
            lock(&self.used).insert(rank, used);
        }
        if let Some(volumes) = &hb.volumes {
            lock(&self.volume_usage).insert(rank, volumes.iter().map(|u| (u.uuid, u.clone())).collect());
        }
        if hb.stable_epoch != 0 {
            let mut stable = lock(&self.stable);
            let e = stable.entry(rank).or_default();
            if hb.stable_epoch > *e {
                *e = hb.stable_epoch;
                self.stable_moved.notify_waiters();
            }
        }
        Ok(self.heartbeat_reply(&snap.state, rank, pools))
    }

    /// Takes snapshot `name` of `pool`/`volume` at the current epoch.
    pub fn create_snapshot(&self, pool: &str, volume: &str, name: &str) -> Result<SnapshotInfo, ServiceError> {
        let cmd = Command::CreateSnapshot { pool: pool.to_string(), volume: volume.to_string(), name: name.to_string() };
        match self.execute(&cmd)? {
            Outcome::Snapshot(info) => {
                info!(pool, volume, snapshot = name, epoch = info.epoch, "snapshot taken");
                Ok(info)
            }
            other => Err(ServiceError::Command(CmdError::Internal(format!("snapshot creation answered {other:?}")))),
        }
    }

    /// Deletes snapshot `name` of `pool`/`volume`.
    pub fn delete_snapshot(&self, pool: &str, volume: &str, name: &str) -> Result<SnapshotInfo, ServiceError> {
        let cmd = Command::DeleteSnapshot { pool: pool.to_string(), volume: volume.to_string(), name: name.to_string() };
        match self.execute(&cmd)? {
            Outcome::Snapshot(info) => {
                info!(pool, volume, snapshot = name, epoch = info.epoch, "snapshot deleted");
                Ok(info)
            }
            other => Err(ServiceError::Command(CmdError::Internal(format!("snapshot deletion answered {other:?}")))),
        }
    }

    /// The snapshots of a volume, each marked stable once the pool's stable epoch passed it,
    /// with the bytes only it holds.
    pub fn snapshots(&self, pool: &str, volume: &str) -> Result<Vec<SnapshotInfo>, CmdError> {
        let stable = self.stable_epoch_of(pool).unwrap_or(0);
        let snap = self.snapshot();
        let mut list = machine::snapshots(&snap.state, pool, volume, stable)?;
        let uuid = machine::volume(&snap.state, pool, volume)?.uuid;
        let (_, held) = self.usage_of(&snap.state, uuid);
        fill_held(&mut list, held.as_ref());
        Ok(list)
    }

    /// The bytes volume `uuid` takes on the Up engines that reported it, and per retained epoch
    /// the bytes only that epoch holds (`None`s: no Up engine has reported the volume's usage
    /// yet, which a new volume without data never gets).
    fn usage_of(&self, state: &State, uuid: Uuid) -> (Option<u64>, Option<HashMap<u64, u64>>) {
        let usage = lock(&self.volume_usage);
        let up = |rank: &u32| state.engines.values().any(|e| e.rank == *rank && e.state == EngineState::Up);
        let reports: Vec<&HashMap<Uuid, VolumeUsage>> = usage.iter().filter(|(r, _)| up(r)).map(|(_, u)| u).collect();
        if reports.is_empty() {
            return (None, None);
        }
        let mut bytes = 0;
        let mut held: HashMap<u64, u64> = HashMap::new();
        for u in reports.iter().filter_map(|r| r.get(&uuid)) {
            bytes += u.bytes;
            for e in &u.retained {
                *held.entry(e.epoch).or_default() += e.bytes;
            }
        }
        (Some(bytes), Some(held))
    }

    /// Fills in what the service knows beyond its store: snapshots marked stable, and the space
    /// the volume and each snapshot take by the engines' reports.
    pub fn annotate(&self, v: &mut VolumeInfo) {
        self.mark_stable(v);
        let (bytes, held) = self.usage_of(&self.snapshot().state, v.uuid);
        v.allocated_bytes = bytes;
        fill_held(&mut v.snapshots, held.as_ref());
    }

    /// The stable epoch of pool `pool` (`None`: no such pool, or an engine has not reported).
    fn stable_epoch_of(&self, pool: &str) -> Option<u64> {
        self.snapshot().state.pools.get(pool).and_then(|p| self.pool_stable_epoch(p))
    }

    /// Marks `v`'s snapshots stable where the pool's stable epoch passed them.
    pub fn mark_stable(&self, v: &mut VolumeInfo) {
        let stable = self.stable_epoch_of(&v.pool).unwrap_or(0);
        for s in &mut v.snapshots {
            s.stable = stable >= s.epoch;
        }
    }

    /// Waits until the stable epoch of `pool` reaches `epoch` (true) or `timeout` passes (false).
    pub async fn wait_stable(&self, pool: &str, epoch: u64, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let moved = self.stable_moved.notified();
            if self.stable_epoch_of(pool).is_some_and(|s| s >= epoch) {
                return true;
            }
            if tokio::time::timeout_at(deadline, moved).await.is_err() {
                return false;
            }
        }
    }

    /// The system map with each engine's time since its last heartbeat.
    pub fn system(&self) -> SystemInfo {
        let snap = self.snapshot();
        let clocks = lock(&self.clocks);
        let stable = lock(&self.stable);
        let used = lock(&self.used);
        let now = Instant::now();
        let engines = snap
            .state
            .engines
            .values()
            .map(|e| EngineInfo {
                rank: e.rank,
                uuid: e.uuid,
                address: e.address.clone(),
                fault_domain: e.fault_domain.clone(),
                targets: e.targets,
                target_capacity: e.target_capacity,
                state: e.state,
                last_heartbeat_ms: clocks.get(&e.rank).map(|t| now.saturating_duration_since(*t).as_millis() as u64),
                stable_epoch: stable.get(&e.rank).copied(),
                used_bytes: used.get(&e.rank).copied(),
            })
            .collect();
        SystemInfo { version: snap.version, engines, heartbeat_timeout_ms: self.config.heartbeat_timeout.as_millis() as u64 }
    }

    /// Expires the floors of targets out (DOWNOUT) since before `now_epoch` minus the
    /// reintegration window ([`Command::ExpireFloors`]); returns the pools touched.
    pub fn expire_floors(&self, now_epoch: u64) -> Result<Vec<String>, ServiceError> {
        let window = u64::try_from(self.config.reintegration_window.as_nanos()).unwrap_or(u64::MAX);
        let below = now_epoch.saturating_sub(window);
        let due = self
            .snapshot()
            .state
            .pools
            .values()
            .any(|p| p.targets.iter().any(|t| t.state == TargetStateName::DownOut && t.since_epoch > 0 && t.since_epoch < below));
        if !due {
            return Ok(Vec::new());
        }
        match self.execute(&Command::ExpireFloors { below })? {
            Outcome::FloorsExpired(pools) => Ok(pools
                .into_iter()
                .map(|(pool, version, targets)| {
                    info!(
                        pool = %pool,
                        version,
                        targets = %machine::targets_text(&targets),
                        window_secs = self.config.reintegration_window.as_secs(),
                        "targets out longer than the reintegration window: a return is a full rebuild; aggregation no longer held for them"
                    );
                    pool
                })
                .collect()),
            other => Err(CmdError::Internal(format!("unexpected outcome {other:?}")).into()),
        }
    }

    /// Marks Down every Up engine silent for longer than the timeout at `now` (an engine not
    /// heard from since the service started counts from the start), with its targets DOWN in
    /// every pool, in one transaction — unless every Up engine (two or more) is silent at once,
    /// which says more about this service's network than about the engines: then none. Returns
    /// the ranks marked.
    pub fn check_heartbeats(&self, now: Instant) -> Result<Vec<u32>, ServiceError> {
        // Registrations restart clocks under the same lock, so none slips in between.
        let w = lock(&self.write);
        let snap = self.snapshot();
        let grace_from = *lock(&self.grace_from);
        let silent: Vec<u32> = {
            let clocks = lock(&self.clocks);
            snap.state
                .engines
                .values()
                .filter(|e| e.state == EngineState::Up)
                .filter(|e| {
                    now.saturating_duration_since(clocks.get(&e.rank).copied().unwrap_or(grace_from)) > self.config.heartbeat_timeout
                })
                .map(|e| e.rank)
                .collect()
        };
        if silent.is_empty() {
            self.cut_off.store(false, Ordering::SeqCst);
            return Ok(Vec::new());
        }
        // Every engine silent at once: this service is far more likely cut off from them (its
        // own link, a partition) than they all failed together — and marking them all DOWN
        // would leave nothing to rebuild from. Wait until one is heard again.
        let up = snap.state.engines.values().filter(|e| e.state == EngineState::Up).count();
        if up >= 2 && silent.len() == up {
            if !self.cut_off.swap(true, Ordering::SeqCst) {
                warn!(
                    engines = up,
                    "no engine has heartbeated within the timeout: this service is probably cut off from them; marking none DOWN until one is heard again"
                );
            }
            return Ok(Vec::new());
        }
        self.cut_off.store(false, Ordering::SeqCst);
        match self.execute_locked(&w, &Command::EnginesDown(silent), |_| {})? {
            Outcome::MarkedDown(ranks) => {
                for r in &ranks {
                    warn!(
                        rank = r,
                        timeout_ms = self.config.heartbeat_timeout.as_millis() as u64,
                        "engine missed its heartbeats: DOWN, its targets DOWN in every pool"
                    );
                }
                // Fewer engines must finish now: the others may all be done.
                let pools: Vec<String> = self.snapshot().state.pools.keys().cloned().collect();
                for pool in pools {
                    self.finish_locked(&w, &pool)?;
                }
                Ok(ranks)
            }
            other => Err(CmdError::Internal(format!("unexpected outcome {other:?}")).into()),
        }
    }

    /// Exclude, drain, reintegrate or add targets ([`Command::Exclude`], [`Command::Drain`],
    /// [`Command::Reintegrate`], [`Command::Extend`]); the pool as it is afterwards.
    pub fn change_targets(&self, cmd: &Command) -> Result<PoolInfo, ServiceError> {
        let what = match cmd {
            Command::Exclude { .. } => "excluded: DOWN, rebuilt elsewhere",
            Command::Drain { .. } => "drained: DOWN, rebuilt elsewhere, then deleted",
            Command::Reintegrate { .. } => "reintegrating: UP",
            Command::Extend { .. } => "added: UP, being filled",
            _ => return Err(CmdError::Internal(format!("not a target command: {cmd:?}")).into()),
        };
        match self.execute(cmd)? {
            Outcome::TargetsChanged { pool, version, targets } => {
                info!(pool = %pool, version, targets = %machine::targets_text(&targets), "targets {what}");
                Ok(self.pool_info(&pool)?)
            }
            other => Err(CmdError::Internal(format!("unexpected outcome {other:?}")).into()),
        }
    }

    /// Exclude targets of `pool`.
    pub fn exclude(&self, pool: &str, sel: TargetSelector) -> Result<PoolInfo, ServiceError> {
        self.change_targets(&Command::Exclude { pool: pool.to_string(), sel })
    }

    /// Drain targets of `pool`.
    pub fn drain(&self, pool: &str, sel: TargetSelector) -> Result<PoolInfo, ServiceError> {
        self.change_targets(&Command::Drain { pool: pool.to_string(), sel })
    }

    /// Reintegrate targets of `pool`.
    pub fn reintegrate(&self, pool: &str, sel: TargetSelector) -> Result<PoolInfo, ServiceError> {
        self.change_targets(&Command::Reintegrate { pool: pool.to_string(), sel })
    }

    /// Extend `pool` with the targets of engines `ranks`.
    pub fn extend(&self, pool: &str, ranks: Vec<u32>) -> Result<PoolInfo, ServiceError> {
        self.change_targets(&Command::Extend { pool: pool.to_string(), ranks })
    }

    /// An engine's rebuild progress and scrub counters for `pool`. The rank must be registered
    /// to `report.uuid` (409) and have targets in the pool (404). A report for the pool's current
    /// map version while it has DOWN or UP targets counts towards the rebuild; when every engine
    /// that must has reported `done`, the rebuild is finished ([`Command::RebuildDone`]).
    pub fn report(&self, pool: &str, rank: u32, report: &EngineReport) -> Result<(), ServiceError> {
        let snap = self.snapshot();
        let p = snap.state.pools.get(pool).ok_or_else(|| CmdError::NoPool(pool.to_string()))?;
        let e = snap.state.engines.get(&rank).ok_or(CmdError::NoEngine(rank))?;
        if e.uuid != report.uuid {
            return Err(CmdError::Conflict(format!("rank {rank} is bound to engine {}, not {}", e.uuid, report.uuid)).into());
        }
        if !p.targets.iter().any(|t| t.rank == rank) {
            return Err(CmdError::NoTarget(format!("pool {pool} has no targets on engine rank {rank}")).into());
        }
        let done = {
            let mut heal = lock(&self.heal);
            let h = heal.entry(pool.to_string()).or_default();
            h.sync(p);
            h.scrub.insert(rank, report.scrub);
            let r = &report.rebuild;
            if r.map_version != h.version || p.map_version != h.version || p.settled() {
                return Ok(());
            }
            let prev = h.reports.insert(rank, r.clone());
            h.first_report.get_or_insert_with(Instant::now);
            let newly_failed = prev.as_ref().is_none_or(|x| x.state != EngineRebuildState::Failed || x.attempt != r.attempt);
            if r.state == EngineRebuildState::Failed && newly_failed {
                warn!(
                    pool = %pool,
                    rank,
                    version = r.map_version,
                    attempt = r.attempt,
                    error = r.last_error.as_deref().unwrap_or("(none given)"),
                    "rebuild failed on an engine; it retries"
                );
            }
            all_done(&snap.state, p, h)
        };
        if done {
            let w = lock(&self.write);
            self.finish_locked(&w, pool)?;
        }
        Ok(())
    }

    /// Finishes `pool`'s rebuild if every engine that must is done with its current version.
    fn finish_locked(&self, w: &MutexGuard<'_, ()>, pool: &str) -> Result<(), ServiceError> {
        let snap = self.snapshot();
        let Some(p) = snap.state.pools.get(pool) else { return Ok(()) };
        let (status, took) = {
            let mut heal = lock(&self.heal);
            let h = heal.entry(pool.to_string()).or_default();
            h.sync(p);
            if !all_done(&snap.state, p, h) {
                return Ok(());
            }
            (rebuild_status(&snap.state, p, h, Instant::now()), h.started.map_or(Duration::ZERO, |t| t.elapsed()))
        };
        let out = self.execute_locked(w, &Command::RebuildDone { pool: pool.to_string(), version: p.map_version }, |_| {})?;
        if let Outcome::RebuildDone { version: Some(settled), .. } = out {
            let mut heal = lock(&self.heal);
            let h = heal.entry(pool.to_string()).or_default();
            h.completed += 1;
            info!(
                pool = %pool,
                version = status.map_version,
                settled_version = settled,
                seconds = format!("{:.1}", took.as_secs_f64()),
                bytes = status.bytes_done,
                dkeys = status.dkeys_done,
                "rebuild complete"
            );
            let mut last = status;
            last.state = RebuildState::Idle;
            last.engines_done = last.engines_total;
            last.elapsed_seconds = took.as_secs();
            last.eta_seconds = None;
            last.last_error = None;
            h.last = Some(last);
        }
        Ok(())
    }

    /// A pool with its rebuild and scrub status.
    pub fn pool_info(&self, pool: &str) -> Result<PoolInfo, CmdError> {
        let snap = self.snapshot();
        let mut info = machine::pool_info(&snap.state, pool)?;
        self.fill_heal(&snap.state, &mut info);
        Ok(info)
    }

    /// Every pool, by name, with its rebuild and scrub status.
    pub fn pools(&self) -> Vec<PoolInfo> {
        let snap = self.snapshot();
        let mut pools = machine::pools(&snap.state);
        for p in &mut pools {
            self.fill_heal(&snap.state, p);
        }
        pools
    }

    fn fill_heal(&self, state: &State, info: &mut PoolInfo) {
        let Some(p) = state.pools.get(&info.name) else { return };
        let mut heal = lock(&self.heal);
        let h = heal.entry(info.name.clone()).or_default();
        h.sync(p);
        info.rebuild = rebuild_status(state, p, h, Instant::now());
        let mut scrub = ScrubCounters::default();
        for c in h.scrub.values() {
            scrub.add(c);
        }
        info.scrub = scrub;
        drop(heal);
        info.stable_epoch = self.pool_stable_epoch(p);
    }

    /// The lowest stable epoch reported by the engines holding `p`'s targets that are read or
    /// written (not DOWN nor DOWNOUT); `None` while one of them has not reported.
    fn pool_stable_epoch(&self, p: &PoolRec) -> Option<u64> {
        let stable = lock(&self.stable);
        let ranks: BTreeSet<u32> =
            p.targets.iter().filter(|t| !matches!(t.state, TargetStateName::Down | TargetStateName::DownOut)).map(|t| t.rank).collect();
        ranks.iter().map(|r| stable.get(r).copied()).collect::<Option<Vec<u64>>>()?.into_iter().min()
    }
}

/// Runs the heartbeat monitor until `stop`: checks several times per timeout.
pub async fn monitor(svc: Arc<Service>, stop: CancellationToken) {
    let period = (svc.config.heartbeat_timeout / 4).clamp(Duration::from_millis(20), Duration::from_secs(1));
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        if !svc.is_leader() {
            continue;
        }
        let s = svc.clone();
        match tokio::task::spawn_blocking(move || s.check_heartbeats(Instant::now()).and_then(|_| s.expire_floors(hlc::now()))).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => error!("heartbeat monitor: {e}"),
            Err(e) => error!("heartbeat monitor: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::MemStore;
    use tessera_mgmt_api::{CreatePool, TargetStateName};

    const TIMEOUT: Duration = Duration::from_millis(300);

    fn config() -> ServiceConfig {
        ServiceConfig {
            heartbeat_timeout: TIMEOUT,
            heartbeat_interval: Duration::from_millis(100),
            auto_reintegrate: true,
            floor_lag: machine::EPOCH_FLOOR_LAG,
            reintegration_window: REINTEGRATION_WINDOW,
        }
    }

    fn reg(rank: u32) -> RegisterEngine {
        RegisterEngine {
            rank,
            uuid: Uuid::from_u128(0xA0 + u128::from(rank)),
            address: format!("127.0.0.1:{}", 30000 + rank),
            fault_domain: String::new(),
            targets: 2,
            target_capacity: 1 << 30,
        }
    }

    fn service(store: &Arc<MemStore>) -> Service {
        Service::open(store.clone(), config()).unwrap()
    }

    fn three_engines_and_a_pool(svc: &Service) {
        for r in 0..3 {
            svc.register(&reg(r)).unwrap();
        }
        svc.execute(&Command::CreatePool(CreatePool { name: "p".into(), ranks: vec![], default_class: None })).unwrap();
    }

    #[test]
    fn commits_publish_snapshots_and_noops_commit_nothing() {
        let store = Arc::new(MemStore::new());
        let svc = service(&store);
        let mut rx = svc.subscribe();
        let reply = svc.register(&reg(0)).unwrap();
        assert_eq!((reply.heartbeat_interval_ms, reply.pools, reply.retention), (100, vec![], vec![]));
        assert!(reply.retention_as_of > 0);
        assert!(rx.has_changed().unwrap());
        assert_eq!(rx.borrow_and_update().version, 1);
        // The same registration again: no transaction.
        svc.register(&reg(0)).unwrap();
        assert_eq!(store.commits(), 1);
        assert!(!rx.has_changed().unwrap());
        // What is published is what is stored.
        let (v, st) = store.load().unwrap();
        assert_eq!((v, &st), (svc.snapshot().version, &svc.snapshot().state));
    }

    #[test]
    fn heartbeats_keep_engines_up_and_silence_takes_them_down() {
        let store = Arc::new(MemStore::new());
        let svc = service(&store);
        three_engines_and_a_pool(&svc);
        let t0 = Instant::now();
        assert_eq!(svc.check_heartbeats(t0).unwrap(), Vec::<u32>::new());
        // Rank 1 heartbeats later than the others.
        std::thread::sleep(Duration::from_millis(50));
        let hb = svc.heartbeat(1, reg(1).uuid).unwrap();
        assert_eq!(hb.pools, [tessera_mgmt_api::PoolVersion { pool_id: 1, map_version: 1, name: "p".into() }]);
        let commits = store.commits();
        let down = svc.check_heartbeats(t0 + TIMEOUT + Duration::from_millis(20)).unwrap();
        assert_eq!(down, [0, 2]);
        assert_eq!(store.commits(), commits + 1, "one transaction for every engine marked down");
        let st = &svc.snapshot().state;
        assert_eq!(st.engines[&0].state, EngineState::Down);
        assert_eq!(st.engines[&1].state, EngineState::Up);
        let p = &st.pools["p"];
        assert_eq!(p.map_version, 2);
        for t in &p.targets {
            let want = if t.rank == 1 { (TargetStateName::UpIn, 0) } else { (TargetStateName::Down, 2) };
            assert_eq!((t.state, t.fseq), want);
        }
        // A Down engine's heartbeat is refused with 404 so that it registers again.
        let e = svc.heartbeat(0, reg(0).uuid).unwrap_err();
        assert_eq!(e.status(), 404);
        // It registers again: Up, and its targets UP (reintegrated) in a new map version.
        let reply = svc.register(&reg(0)).unwrap();
        assert_eq!(reply.pools, [tessera_mgmt_api::PoolVersion { pool_id: 1, map_version: 3, name: "p".into() }]);
        assert_eq!(svc.snapshot().state.engines[&0].state, EngineState::Up);
        assert!(svc.snapshot().state.pools["p"].targets.iter().filter(|t| t.rank == 0).all(|t| t.state == TargetStateName::Up));
        // Its clock restarted at registration: not down again right away.
        assert!(!svc.check_heartbeats(Instant::now()).unwrap().contains(&0));
        let info = svc.system();
        assert_eq!(info.heartbeat_timeout_ms, 300);
        assert!(info.engines.iter().all(|e| e.last_heartbeat_ms.is_some()));
    }

    fn progress(version: u32, state: EngineRebuildState, bytes: (u64, u64)) -> RebuildProgress {
        RebuildProgress {
            map_version: version,
            state,
            objects_total: 1,
            objects_done: 1,
            dkeys_total: 10,
            dkeys_done: if state == EngineRebuildState::Done { 10 } else { 4 },
            bytes_total: bytes.1,
            bytes_done: bytes.0,
            attempt: 1,
            last_error: None,
        }
    }

    fn report(rank: u32, rebuild: RebuildProgress, scrubbed: u64) -> EngineReport {
        EngineReport { uuid: reg(rank).uuid, rebuild, scrub: ScrubCounters { scrubbed, passes: 1, ..Default::default() } }
    }

    fn exclude(svc: &Service, rank: u32) -> PoolInfo {
        svc.exclude("p", TargetSelector { rank, target: None }).unwrap()
    }

    use EngineRebuildState::{Done, Failed, Running, Scanning};

    #[test]
    fn reports_finish_a_rebuild_once_every_required_engine_is_done() {
        let store = Arc::new(MemStore::new());
        let svc = service(&store);
        three_engines_and_a_pool(&svc);
        let idle = svc.pool_info("p").unwrap().rebuild;
        assert_eq!((idle.state, idle.map_version, idle.completed), (RebuildState::Idle, 0, 0));
        // Reports while nothing is rebuilt only count their scrub counters.
        svc.report("p", 0, &report(0, progress(1, Done, (0, 0)), 5)).unwrap();
        assert_eq!(svc.pool_info("p").unwrap().rebuild, idle);
        let p = exclude(&svc, 2);
        assert_eq!(p.map.version, 2);
        assert_eq!((p.rebuild.state, p.rebuild.map_version, p.rebuild.targets_down), (RebuildState::Running, 2, 2));
        // Ranks 0 and 1 must finish; rank 2 has no UPIN target left.
        assert_eq!((p.rebuild.engines_total, p.rebuild.engines_done), (2, 0));

        // Refused reports change nothing.
        let mut wrong = report(0, progress(2, Done, (0, 0)), 0);
        wrong.uuid = reg(1).uuid;
        assert_eq!(svc.report("p", 0, &wrong).unwrap_err().status(), 409);
        assert_eq!(svc.report("nope", 0, &report(0, progress(2, Done, (0, 0)), 0)).unwrap_err().status(), 404);
        assert_eq!(svc.report("p", 9, &report(9, progress(2, Done, (0, 0)), 0)).unwrap_err().status(), 404);

        svc.report("p", 0, &report(0, progress(2, Done, (100, 100)), 7)).unwrap();
        svc.report("p", 1, &report(1, progress(2, Scanning, (10, 300)), 3)).unwrap();
        // Rank 2 reports too (it counts in the sums, not in the required set).
        svc.report("p", 2, &report(2, progress(2, Done, (0, 0)), 0)).unwrap();
        // A stale version is not counted.
        svc.report("p", 1, &report(1, progress(1, Done, (0, 0)), 3)).unwrap();
        let p = svc.pool_info("p").unwrap();
        let r = &p.rebuild;
        assert_eq!((r.state, r.engines_total, r.engines_done), (RebuildState::Running, 2, 1));
        assert_eq!((r.bytes_done, r.bytes_total, r.dkeys_done, r.dkeys_total, r.objects_total), (110, 400, 24, 30, 3));
        assert_eq!(r.eta_seconds, None, "rank 1 is still scanning");
        assert_eq!((p.scrub.scrubbed, p.scrub.passes), (10, 3));
        assert_eq!(p.map.version, 2);
        std::thread::sleep(Duration::from_millis(20));
        svc.report("p", 1, &report(1, progress(2, Running, (20, 300)), 3)).unwrap();
        let r = svc.pool_info("p").unwrap().rebuild;
        assert!(r.rate_bytes_per_sec > 0, "{r:?}");
        assert!(r.eta_seconds.is_some(), "{r:?}");

        // The last required engine is done: DOWN -> DOWNOUT in version 3, which is the base.
        svc.report("p", 1, &report(1, progress(2, Done, (300, 300)), 3)).unwrap();
        let p = svc.pool_info("p").unwrap();
        assert_eq!(p.map.version, 3);
        assert_eq!(p.map.base_version, 3);
        assert!(p.map.targets.iter().filter(|t| t.rank == 2).all(|t| t.state == TargetStateName::DownOut));
        let r = &p.rebuild;
        assert_eq!((r.state, r.map_version, r.completed, r.engines_done, r.bytes_done), (RebuildState::Idle, 2, 1, 2, 400));
        // Late reports for the old version do nothing.
        svc.report("p", 0, &report(0, progress(2, Done, (0, 0)), 7)).unwrap();
        assert_eq!(svc.snapshot().state.pools["p"].map_version, 3);
    }

    #[test]
    fn a_failed_engine_marks_the_rebuild_failed_until_it_retries() {
        let store = Arc::new(MemStore::new());
        let svc = service(&store);
        three_engines_and_a_pool(&svc);
        exclude(&svc, 2);
        let mut failed = progress(2, Failed, (5, 100));
        failed.last_error = Some("engine 1 unreachable".into());
        svc.report("p", 0, &report(0, failed, 0)).unwrap();
        let r = svc.pool_info("p").unwrap().rebuild;
        assert_eq!((r.state, r.last_error.as_deref()), (RebuildState::Failed, Some("rank 0: engine 1 unreachable")));
        let mut retry = progress(2, Running, (6, 100));
        retry.attempt = 2;
        svc.report("p", 0, &report(0, retry, 0)).unwrap();
        assert_eq!(svc.pool_info("p").unwrap().rebuild.state, RebuildState::Running);
    }

    #[test]
    fn an_engine_going_down_leaves_the_required_set() {
        let store = Arc::new(MemStore::new());
        let svc = service(&store);
        for r in 0..4 {
            svc.register(&reg(r)).unwrap();
        }
        svc.execute(&Command::CreatePool(CreatePool { name: "p".into(), ranks: vec![], default_class: None })).unwrap();
        exclude(&svc, 3);
        svc.report("p", 0, &report(0, progress(2, Done, (1, 1)), 0)).unwrap();
        svc.report("p", 1, &report(1, progress(2, Done, (1, 1)), 0)).unwrap();
        assert_eq!(svc.pool_info("p").unwrap().rebuild.engines_total, 3);
        // Rank 2 never reports; it stops heartbeating and goes Down: a new map version (its
        // targets DOWN too) that only ranks 0 and 1 must finish.
        let t0 = Instant::now();
        for r in [0, 1, 3] {
            svc.heartbeat(r, reg(r).uuid).unwrap();
        }
        std::thread::sleep(TIMEOUT + Duration::from_millis(20));
        for r in [0, 1, 3] {
            svc.heartbeat(r, reg(r).uuid).unwrap();
        }
        assert_eq!(svc.check_heartbeats(t0 + TIMEOUT + Duration::from_millis(10)).unwrap(), [2]);
        let r = svc.pool_info("p").unwrap().rebuild;
        assert_eq!((r.map_version, r.engines_total, r.engines_done, r.targets_down), (3, 2, 0, 4));
        svc.report("p", 0, &report(0, progress(3, Done, (1, 1)), 0)).unwrap();
        svc.report("p", 1, &report(1, progress(3, Done, (1, 1)), 0)).unwrap();
        let p = svc.pool_info("p").unwrap();
        assert_eq!((p.map.version, p.rebuild.state, p.rebuild.completed), (4, RebuildState::Idle, 1));
    }

    #[test]
    fn manual_reintegration_keeps_a_returning_engine_out_until_asked() {
        let store = Arc::new(MemStore::new());
        let svc = Service::open(store.clone(), ServiceConfig { auto_reintegrate: false, ..config() }).unwrap();
        three_engines_and_a_pool(&svc);
        svc.execute(&Command::EnginesDown(vec![2])).unwrap();
        svc.register(&reg(2)).unwrap();
        let p = svc.pool_info("p").unwrap();
        assert_eq!(p.map.version, 2);
        assert!(p.map.targets.iter().filter(|t| t.rank == 2).all(|t| t.state == TargetStateName::Down));
        let p = svc.reintegrate("p", TargetSelector { rank: 2, target: Some(1) }).unwrap();
        assert_eq!(p.map.version, 3);
        let st: Vec<_> = p.map.targets.iter().filter(|t| t.rank == 2).map(|t| t.state).collect();
        assert_eq!(st, [TargetStateName::Down, TargetStateName::Up]);
        assert_eq!((p.rebuild.state, p.rebuild.targets_down, p.rebuild.targets_up), (RebuildState::Running, 1, 1));
        assert_eq!(svc.drain("p", TargetSelector { rank: 2, target: Some(0) }).unwrap_err().status(), 409);
    }

    #[test]
    fn floors_expire_after_the_reintegration_window() {
        let store = Arc::new(MemStore::new());
        let window = Duration::from_secs(3600);
        let svc = Service::open(store.clone(), ServiceConfig { reintegration_window: window, ..config() }).unwrap();
        three_engines_and_a_pool(&svc);
        svc.execute(&Command::EnginesDown(vec![2])).unwrap();
        svc.execute(&Command::RebuildDone { pool: "p".into(), version: 2 }).unwrap();
        let p = svc.pool_info("p").unwrap();
        let floor = p.map.targets.iter().find(|t| t.rank == 2).unwrap().since_epoch;
        assert!(floor > 0 && p.map.version == 3, "{p:?}");
        let hour = window.as_nanos() as u64;
        assert!(svc.expire_floors(floor + hour).unwrap().is_empty(), "not before the window has passed");
        assert_eq!(svc.expire_floors(floor + hour + 1).unwrap(), ["p"]);
        let p = svc.pool_info("p").unwrap();
        assert_eq!(p.map.version, 4);
        assert!(p.map.targets.iter().filter(|t| t.rank == 2).all(|t| t.since_epoch == 0 && t.state == TargetStateName::DownOut));
        assert!(svc.expire_floors(u64::MAX).unwrap().is_empty());
    }

    #[test]
    fn heartbeat_errors() {
        let store = Arc::new(MemStore::new());
        let svc = service(&store);
        svc.register(&reg(0)).unwrap();
        assert_eq!(svc.heartbeat(5, reg(5).uuid).unwrap_err().status(), 404);
        assert_eq!(svc.heartbeat(0, reg(5).uuid).unwrap_err().status(), 409);
    }

    #[test]
    fn every_engine_silent_at_once_is_not_marked_down() {
        let store = Arc::new(MemStore::new());
        let svc = service(&store);
        three_engines_and_a_pool(&svc);
        let t0 = Instant::now();
        // Nobody heard for the timeout: the service suspects itself and marks none.
        assert_eq!(svc.check_heartbeats(t0 + TIMEOUT * 2).unwrap(), Vec::<u32>::new());
        assert!(svc.snapshot().state.engines.values().all(|e| e.state == EngineState::Up));
        // One engine is heard again (its clock is set as if it heartbeated a timeout later, not
        // slept for): the silent others are marked DOWN.
        svc.heartbeat(1, reg(1).uuid).unwrap();
        lock(&svc.clocks).insert(1, t0 + TIMEOUT);
        assert_eq!(svc.check_heartbeats(t0 + TIMEOUT * 2 - Duration::from_millis(50)).unwrap(), [0, 2]);
    }

    #[test]
    fn restart_gives_known_engines_a_grace_period() {
        let store = Arc::new(MemStore::new());
        {
            let svc = service(&store);
            three_engines_and_a_pool(&svc);
        }
        let svc = service(&store);
        let started = Instant::now();
        assert!(svc.system().engines.iter().all(|e| e.last_heartbeat_ms.is_none() && e.state == EngineState::Up));
        assert_eq!(svc.check_heartbeats(started).unwrap(), Vec::<u32>::new());
        std::thread::sleep(Duration::from_millis(100));
        svc.heartbeat(2, reg(2).uuid).unwrap();
        assert_eq!(svc.check_heartbeats(started + TIMEOUT + Duration::from_millis(50)).unwrap(), [0, 1]);
    }

    #[test]
    fn a_failed_commit_changes_nothing() {
        let store = Arc::new(MemStore::new());
        let svc = service(&store);
        three_engines_and_a_pool(&svc);
        let before = svc.snapshot();
        store.fail_commits(true);
        let e = svc.execute(&Command::CreatePool(CreatePool { name: "q".into(), ranks: vec![], default_class: None })).unwrap_err();
        assert_eq!(e.status(), 500);
        assert_eq!(svc.snapshot(), before);
        store.fail_commits(false);
        svc.execute(&Command::CreatePool(CreatePool { name: "q".into(), ranks: vec![], default_class: None })).unwrap();
        assert_eq!(svc.snapshot().state.pools["q"].pool_id, 2);
    }

    #[test]
    fn a_stale_writer_reloads_and_retries() {
        let store = Arc::new(MemStore::new());
        let a = service(&store);
        let b = service(&store);
        a.register(&reg(0)).unwrap();
        // b has not seen a's commit: its first attempt conflicts, then it reloads.
        b.register(&reg(1)).unwrap();
        let st = &b.snapshot().state;
        assert_eq!(st.engines.keys().copied().collect::<Vec<_>>(), [0, 1]);
        assert_eq!(b.snapshot().version, 2);
        // A refusal computed on reloaded state is still a refusal.
        let mut stolen = reg(0);
        stolen.uuid = Uuid::from_u128(1);
        let c = service(&Arc::new(MemStore::new()));
        assert!(c.register(&stolen).is_ok());
        assert_eq!(b.register(&stolen).unwrap_err().status(), 409);
    }
}
