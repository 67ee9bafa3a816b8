//! The service: a [`Store`], the last committed state ([`Snapshot`], published on a
//! `tokio::sync::watch` channel so that long polls wake on every commit), the engines'
//! heartbeat clocks (memory only), and the heartbeat monitor.
//!
//! Writes are serialised by one lock: take the latest snapshot, [`machine::apply`] the command,
//! commit the result against the snapshot's version, publish. If the store reports a conflict
//! (another writer), the state is reloaded and the command applied again. Reads use the
//! published snapshot and take no lock.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tessera_mgmt_api::{ClusterVersion, EngineInfo, EngineState, HeartbeatReply, RegisterEngine, SystemInfo};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};
use uuid::Uuid;

use crate::machine::{self, CmdError, Command, Env, Outcome};
use crate::state::State;
use crate::store::{Store, StoreError};

/// Heartbeat settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServiceConfig {
    /// An engine silent this long is marked Down.
    pub heartbeat_timeout: Duration,
    /// How often engines are told to heartbeat.
    pub heartbeat_interval: Duration,
}

impl Default for ServiceConfig {
    fn default() -> Self {
        ServiceConfig { heartbeat_timeout: Duration::from_secs(5), heartbeat_interval: Duration::from_secs(1) }
    }
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
    started: Instant,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

impl Service {
    /// Loads the state from `store`. Every known engine's heartbeat clock starts now (grace).
    pub fn open(store: Arc<dyn Store>, config: ServiceConfig) -> Result<Service, StoreError> {
        let (version, state) = store.load()?;
        let (snap, _) = watch::channel(Arc::new(Snapshot { version, state }));
        Ok(Service { store, config, write: Mutex::new(()), snap, clocks: Mutex::new(HashMap::new()), started: Instant::now() })
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
            let env = Env { uuid: Uuid::new_v4(), now: unix_now() };
            let (next, outcome) = machine::apply(&snap.state, cmd, &env)?;
            if next == snap.state {
                on_commit(&snap);
                return Ok(outcome);
            }
            match self.store.commit(snap.version, &next) {
                Ok(version) => {
                    let s = Arc::new(Snapshot { version, state: next });
                    self.snap.send_replace(s.clone());
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

    fn heartbeat_reply(&self, state: &State, rank: u32) -> HeartbeatReply {
        HeartbeatReply {
            heartbeat_interval_ms: self.config.heartbeat_interval.as_millis() as u64,
            pools: machine::pool_versions(state, rank),
        }
    }

    /// An engine registers; its heartbeat clock restarts in the same locked section, so the
    /// monitor never sees it Up with an old clock.
    pub fn register(&self, req: &RegisterEngine) -> Result<HeartbeatReply, ServiceError> {
        let mut reply = None;
        let was = self.snapshot().state.engines.get(&req.rank).map(|e| e.state);
        self.execute_with(&Command::RegisterEngine(req.clone()), |s| {
            lock(&self.clocks).insert(req.rank, Instant::now());
            reply = Some(self.heartbeat_reply(&s.state, req.rank));
        })?;
        match was {
            None => info!(rank = req.rank, uuid = %req.uuid, address = %req.address, targets = req.targets, "engine registered"),
            Some(EngineState::Down) => info!(rank = req.rank, address = %req.address, "engine up again (its targets stay DOWN)"),
            Some(EngineState::Up) => {}
        }
        Ok(reply.unwrap_or_else(|| self.heartbeat_reply(&self.snapshot().state, req.rank)))
    }

    /// An engine heartbeats. No store write.
    pub fn heartbeat(&self, rank: u32, uuid: Uuid) -> Result<HeartbeatReply, ServiceError> {
        let mut clocks = lock(&self.clocks);
        let snap = self.snapshot();
        let pools = machine::heartbeat_pools(&snap.state, rank, uuid)?;
        clocks.insert(rank, Instant::now());
        Ok(HeartbeatReply { heartbeat_interval_ms: self.config.heartbeat_interval.as_millis() as u64, pools })
    }

    /// The system map with each engine's time since its last heartbeat.
    pub fn system(&self) -> SystemInfo {
        let snap = self.snapshot();
        let clocks = lock(&self.clocks);
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
            })
            .collect();
        SystemInfo { version: snap.version, engines, heartbeat_timeout_ms: self.config.heartbeat_timeout.as_millis() as u64 }
    }

    /// Marks Down every Up engine silent for longer than the timeout at `now` (an engine not
    /// heard from since the service started counts from the start), with its targets DOWN in
    /// every pool, in one transaction. Returns the ranks marked.
    pub fn check_heartbeats(&self, now: Instant) -> Result<Vec<u32>, ServiceError> {
        // Registrations restart clocks under the same lock, so none slips in between.
        let w = lock(&self.write);
        let snap = self.snapshot();
        let silent: Vec<u32> = {
            let clocks = lock(&self.clocks);
            snap.state
                .engines
                .values()
                .filter(|e| e.state == EngineState::Up)
                .filter(|e| {
                    now.saturating_duration_since(clocks.get(&e.rank).copied().unwrap_or(self.started)) > self.config.heartbeat_timeout
                })
                .map(|e| e.rank)
                .collect()
        };
        if silent.is_empty() {
            return Ok(Vec::new());
        }
        match self.execute_locked(&w, &Command::EnginesDown(silent), |_| {})? {
            Outcome::MarkedDown(ranks) => {
                for r in &ranks {
                    warn!(
                        rank = r,
                        timeout_ms = self.config.heartbeat_timeout.as_millis() as u64,
                        "engine missed its heartbeats: DOWN, its targets DOWN in every pool"
                    );
                }
                Ok(ranks)
            }
            other => Err(CmdError::Internal(format!("unexpected outcome {other:?}")).into()),
        }
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
        let s = svc.clone();
        match tokio::task::spawn_blocking(move || s.check_heartbeats(Instant::now())).await {
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
        ServiceConfig { heartbeat_timeout: TIMEOUT, heartbeat_interval: Duration::from_millis(100) }
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
        assert_eq!(reply, HeartbeatReply { heartbeat_interval_ms: 100, pools: vec![] });
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
        let reply = svc.register(&reg(0)).unwrap();
        assert_eq!(reply.pools, [tessera_mgmt_api::PoolVersion { pool_id: 1, map_version: 2, name: "p".into() }]);
        assert_eq!(svc.snapshot().state.engines[&0].state, EngineState::Up);
        assert!(svc.snapshot().state.pools["p"].targets.iter().filter(|t| t.rank == 0).all(|t| t.state == TargetStateName::Down));
        // Its clock restarted at registration: not down again right away.
        assert!(!svc.check_heartbeats(Instant::now()).unwrap().contains(&0));
        let info = svc.system();
        assert_eq!(info.heartbeat_timeout_ms, 300);
        assert!(info.engines.iter().all(|e| e.last_heartbeat_ms.is_some()));
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
