//! Scrub: every engine verifies the stored CRC64s of its targets' data in the background and
//! repairs what fails from redundancy.
//!
//! One [`Scrubber`] task per engine (started next to the healer when `[mgmt]` is configured and
//! `[heal] scrub_rate` is not 0) runs **passes**. A pass walks every target's index in order with
//! bounded steps on the target's own thread ([`TargetOp::Scrub`], at most [`STEP_BYTES`] read
//! per step, so host I/O waits behind one short read at most), paced to
//! [`scrub_rate`]: everything stored once per `scrub_period_secs`, at least [`RATE_FLOOR`], never
//! faster than `scrub_rate`. Between steps, and once the pass is done until the period is over,
//! the task sleeps (no polling); a fetch that hits a checksum error ([`CorruptReads`]) wakes it.
//!
//! **Repair.** A bad value makes its *chunk-shard* (the dkey on this target) pending. Repair
//! maps it to (pool, volume, chunk, shard) — volumes are objects whose container id = object
//! id = the volume uuid, the dkey is the chunk number — and, when this target is the shard's
//! readable home and enough of the group's other shards are readable, rewrites the whole
//! chunk-shard from them with [`Volume::rebuild_shard`] (discard, then every version at its
//! original epoch). While it does, the dkey is **fenced** on the target ([`TargetOp::Fence`],
//! kept in the target's `repair-fences` file): fetches of it fail as corrupt, so clients read
//! it from redundancy instead of seeing it half rewritten — also after a crash in the middle,
//! until a later repair succeeds. A shard that is being rebuilt or moved is left to the healer
//! and retried later; a repair that fails is retried with backoff and, after
//! [`UNREPAIRABLE_AFTER`] failures, counted unrepairable (and still retried).
//!
//! **Counters** per pool in [`Healer::scrub`]: values verified and their bytes, values repaired
//! and unrepairable (a chunk-shard flagged by a read, or by an interrupted repair, counts one),
//! passes. They go to the management service in scrub-only reports (`Healer::report_scrub`)
//! every [`REPORT_EVERY`] when they changed and after every pass.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tessera_client::placement::TargetRef;
use tessera_client::volume::{Cluster, RebuildOptions, Volume};
use tessera_engine_proto::key_to_u64;
use tessera_mgmt_api::{MgmtClient, PoolVersion, ScrubCounters};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::config::HealSection;
use crate::heal::Healer;
use crate::target::{Fence, ScrubStep};
use crate::worker::{CorruptReads, TargetHandle, TargetOp, TargetReply};
use crate::BLOCK;

/// Most bytes one scrub step reads.
pub const STEP_BYTES: u64 = 1 << 20;
/// Slowest scrub rate (bytes per second) unless `scrub_rate` is lower: little data is still
/// scrubbed soon after it is written, and the pass then idles for the rest of the period.
pub const RATE_FLOOR: u64 = 256 << 10;
/// How often changed counters are reported.
pub const REPORT_EVERY: Duration = Duration::from_secs(2);
/// Failed repairs of a chunk-shard after which its values count as unrepairable.
pub const UNREPAIRABLE_AFTER: u32 = 5;
/// Retry of a repair the healer's work or a moving map holds up.
const DEFER: Duration = Duration::from_secs(5);
/// Retry of a chunk-shard this target no longer owns but still holds.
const DEFER_STALE: Duration = Duration::from_secs(60);
/// Longest pause between retries of a failing repair.
pub const MAX_BACKOFF: Duration = Duration::from_secs(300);
/// Least time between two reads of the volume list for a repair.
const VOLUME_REFRESH: Duration = Duration::from_secs(1);

/// The scrub rate in bytes per second: `stored` bytes once per `period_secs`, at least
/// [`RATE_FLOOR`], at most `cap` (0: no scrub).
pub fn scrub_rate(stored: u64, period_secs: u64, cap: u64) -> u64 {
    (stored / period_secs.max(1)).max(RATE_FLOOR).min(cap)
}

/// How long `bytes` take at `rate` bytes per second.
pub fn time_for(bytes: u64, rate: u64) -> Duration {
    Duration::from_secs_f64(bytes as f64 / rate.max(1) as f64)
}

/// Pause before retry `failures` (1, 2, ...) of a failing repair: 1 s, doubling, at most
/// [`MAX_BACKOFF`].
pub fn backoff(failures: u32) -> Duration {
    Duration::from_secs(1u64 << failures.saturating_sub(1).min(16)).min(MAX_BACKOFF)
}

/// A chunk-shard to repair: one dkey of one object on one of this engine's targets.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RepairKey {
    pub target: u16,
    pub cont: u128,
    pub obj: u128,
    pub dkey: Bytes,
}

impl RepairKey {
    fn fence(&self) -> Fence {
        Fence { cont: self.cont, obj: self.obj, dkey: self.dkey.clone() }
    }
}

/// What is known about a pending repair.
#[derive(Debug, Clone)]
struct Pending {
    /// What found it first: "scrub", "read" or "interrupted repair".
    found_by: &'static str,
    /// Bad values found by scrub: (akey, offset, epoch).
    extents: BTreeSet<(Bytes, u64, u64)>,
    /// Fenced on the target (by this task, or left by an interrupted repair).
    fenced: bool,
    failures: u32,
    /// Values already counted unrepairable.
    counted_unrepairable: u64,
    not_before: Instant,
}

impl Pending {
    fn new(found_by: &'static str, now: Instant) -> Self {
        Pending { found_by, extents: BTreeSet::new(), fenced: false, failures: 0, counted_unrepairable: 0, not_before: now }
    }

    /// Values this repair stands for: the bad ones found, or one for a chunk-shard flagged by
    /// a read or an interrupted repair.
    fn values(&self) -> u64 {
        (self.extents.len() as u64).max(1)
    }
}

/// How one repair attempt ended.
#[derive(Debug)]
enum Outcome {
    Repaired {
        chunk: u64,
        shard: u32,
        bytes: u64,
    },
    /// The target no longer holds the dkey: nothing to repair.
    Gone,
    /// Not now (the healer's work, a moving map); retry after the pause.
    Later(String, Duration),
    Failed(String),
}

/// A volume this engine may hold chunks of.
#[derive(Debug, Clone)]
struct Known {
    pool: u32,
    volume: Volume,
}

/// The scrub agent of one engine.
#[derive(Debug)]
pub struct Scrubber {
    healer: Arc<Healer>,
    cluster: Arc<Cluster>,
    rank: u32,
    targets: Vec<TargetHandle>,
    corrupt: Arc<CorruptReads>,
    settings: HealSection,
    pools: watch::Receiver<Vec<PoolVersion>>,
    /// By container id (= object id = volume uuid).
    volumes: HashMap<u128, Known>,
    volumes_refreshed: Option<Instant>,
    pending: BTreeMap<RepairKey, Pending>,
    /// Counters changed since the last report.
    dirty: bool,
    last_report: Instant,
    report_failing: bool,
}

impl Scrubber {
    /// A scrubber for engine `rank` over `targets`; counters go into `healer`'s.
    pub fn new(
        mgmt: MgmtClient,
        healer: Arc<Healer>,
        rank: u32,
        targets: Vec<TargetHandle>,
        corrupt: Arc<CorruptReads>,
        settings: HealSection,
        pools: watch::Receiver<Vec<PoolVersion>>,
    ) -> Scrubber {
        Scrubber {
            healer,
            cluster: Cluster::background(mgmt),
            rank,
            targets,
            corrupt,
            settings,
            pools,
            volumes: HashMap::new(),
            volumes_refreshed: None,
            pending: BTreeMap::new(),
            dirty: false,
            last_report: Instant::now(),
            report_failing: false,
        }
    }

    /// Runs passes until `stop`.
    pub async fn run(mut self, stop: CancellationToken) {
        if self.settings.scrub_rate == 0 {
            return;
        }
        // Repairs a crash interrupted come first.
        let now = Instant::now();
        for t in 0..self.targets.len() {
            if let Some(TargetReply::Fences(fences)) = self.call(t, TargetOp::Fences).await {
                for f in fences {
                    let key = RepairKey { target: t as u16, cont: f.cont, obj: f.obj, dkey: f.dkey };
                    self.pending.entry(key).or_insert_with(|| Pending::new("interrupted repair", now)).fenced = true;
                }
            }
        }
        let period = Duration::from_secs(self.settings.scrub_period_secs.max(1));
        loop {
            let started = Instant::now();
            if !self.pass(&stop).await || !self.idle_until(started + period, &stop).await {
                return;
            }
        }
    }

    /// One pass over every target. False when stopping.
    async fn pass(&mut self, stop: &CancellationToken) -> bool {
        let started = Instant::now();
        self.refresh_volumes().await;
        let mut stored = 0;
        for t in 0..self.targets.len() {
            if let Some(TargetReply::Info(i)) = self.call(t, TargetOp::Query).await {
                stored += i.used;
            }
        }
        let rate = scrub_rate(stored, self.settings.scrub_period_secs, self.settings.scrub_rate);
        let (mut values, mut bytes, mut bad) = (0u64, 0u64, 0usize);
        let mut due = Instant::now();
        for t in 0..self.targets.len() {
            let mut from = None;
            loop {
                let step_started = Instant::now();
                let Some(TargetReply::Scrub(step)) = self.call(t, TargetOp::Scrub { from, max_bytes: STEP_BYTES }).await else {
                    warn!(target = t, "scrub step not answered; skipping the target in this pass");
                    break;
                };
                values += step.extents;
                bytes += step.bytes;
                bad += step.bad.len();
                self.account(t as u16, &step);
                due = due.max(step_started) + time_for(step.bytes.max(BLOCK), rate);
                self.repair_due().await;
                if !self.idle_until(due, stop).await {
                    return false;
                }
                match step.next {
                    Some(c) => from = Some(c),
                    None => break,
                }
            }
        }
        let secs = started.elapsed().as_secs_f64();
        info!(values, bytes, bad, secs = %format_args!("{secs:.2}"), rate_limit = rate, rate = (bytes as f64 / secs.max(1e-9)) as u64, "scrub pass done");
        for p in self.current_pools() {
            self.counters(p.pool_id, |c| c.passes += 1);
        }
        self.report(true).await;
        true
    }

    /// Sleeps until `deadline`, repairing what reads report and what is due meanwhile. False
    /// when stopping.
    async fn idle_until(&mut self, deadline: Instant, stop: &CancellationToken) -> bool {
        loop {
            self.report(false).await;
            let retry = self.pending.values().map(|p| p.not_before).min();
            let wake = retry.map_or(deadline, |r| r.min(deadline));
            let corrupt = self.corrupt.clone();
            tokio::select! {
                _ = stop.cancelled() => return false,
                _ = corrupt.wait() => {
                    let now = Instant::now();
                    for (target, path) in corrupt.take() {
                        let key = RepairKey { target, cont: path.cont, obj: path.obj, dkey: path.dkey };
                        self.pending.entry(key).or_insert_with(|| Pending::new("read", now));
                    }
                    self.repair_due().await;
                }
                _ = tokio::time::sleep_until(tokio::time::Instant::from_std(wake)) => {
                    self.repair_due().await;
                    if Instant::now() >= deadline {
                        return true;
                    }
                }
            }
        }
    }

    /// Counts a step and queues its bad values.
    fn account(&mut self, target: u16, step: &ScrubStep) {
        for &(cont, values, bytes) in &step.by_cont {
            if let Some(pool) = self.volumes.get(&cont).map(|k| k.pool) {
                self.counters(pool, |c| {
                    c.scrubbed += values;
                    c.bytes += bytes;
                });
            }
        }
        let now = Instant::now();
        for b in &step.bad {
            let key = RepairKey { target, cont: b.cont, obj: b.obj, dkey: b.dkey.clone() };
            self.pending.entry(key).or_insert_with(|| Pending::new("scrub", now)).extents.insert((b.akey.clone(), b.offset, b.epoch));
        }
    }

    fn counters(&mut self, pool: u32, f: impl FnOnce(&mut ScrubCounters)) {
        self.healer.update_scrub(pool, f);
        self.dirty = true;
    }

    fn current_pools(&self) -> Vec<PoolVersion> {
        self.pools.borrow().iter().filter(|p| !p.name.is_empty()).cloned().collect()
    }

    /// Sends the counters of every pool: `force`d, or when they changed and the last report is
    /// [`REPORT_EVERY`] old.
    async fn report(&mut self, force: bool) {
        if !force && (!self.dirty || self.last_report.elapsed() < REPORT_EVERY) {
            return;
        }
        self.dirty = false;
        self.last_report = Instant::now();
        let mut failed = None;
        for p in self.current_pools() {
            if let Err(e) = self.healer.report_scrub(&p).await {
                failed = Some(format!("pool {}: {e}", p.name));
            }
        }
        match failed {
            Some(e) if !self.report_failing => {
                warn!(error = %e, "cannot report scrub counters; retrying");
                self.report_failing = true;
                self.dirty = true;
            }
            Some(_) => self.dirty = true,
            None => self.report_failing = false,
        }
    }

    /// Re-reads the volumes of every pool with targets here.
    async fn refresh_volumes(&mut self) {
        self.volumes_refreshed = Some(Instant::now());
        for p in self.current_pools() {
            let infos = match self.cluster.mgmt().volumes(&p.name).await {
                Ok(v) => v,
                Err(e) => {
                    debug!(pool = %p.name, error = %e, "scrub: cannot list volumes");
                    continue;
                }
            };
            let listed: BTreeSet<u128> = infos.iter().map(|i| i.uuid.as_u128()).collect();
            self.volumes.retain(|id, k| k.pool != p.pool_id || listed.contains(id));
            for info in infos {
                let id = info.uuid.as_u128();
                if self.volumes.contains_key(&id) {
                    continue;
                }
                match self.cluster.open_volume(&info).await {
                    Ok(volume) => {
                        self.volumes.insert(id, Known { pool: p.pool_id, volume });
                    }
                    Err(e) => debug!(volume = %info.name, error = %e, "scrub: cannot open volume"),
                }
            }
        }
    }

    async fn call(&self, target: usize, op: TargetOp) -> Option<TargetReply> {
        let h = self.targets.get(target)?;
        match h.submit(op).await {
            Ok(Ok(r)) => Some(r),
            Ok(Err(e)) => {
                warn!(target, error = %e, "scrub: target request failed");
                None
            }
            Err(_) => None,
        }
    }

    async fn fence(&self, key: &RepairKey, on: bool) -> Result<(), String> {
        let h = self.targets.get(key.target as usize).ok_or("no such target")?;
        match h.submit(TargetOp::Fence { fence: key.fence(), on }).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("target thread stopped".into()),
        }
    }

    /// Attempts every repair that is due.
    async fn repair_due(&mut self) {
        let now = Instant::now();
        let due: Vec<RepairKey> = self.pending.iter().filter(|(_, p)| p.not_before <= now).map(|(k, _)| k.clone()).collect();
        for key in due {
            self.repair(&key).await;
        }
    }

    async fn repair(&mut self, key: &RepairKey) {
        let outcome = self.try_repair(key).await;
        let pool = self.volumes.get(&key.cont).map(|k| k.pool);
        let Some(p) = self.pending.get(key).cloned() else { return };
        let dkey = key_to_u64(&key.dkey).map_or_else(|| format!("{:?}", key.dkey), |c| c.to_string());
        let cont = format!("{:032x}", key.cont);
        match outcome {
            Outcome::Repaired { chunk, shard, bytes } => {
                self.pending.remove(key);
                if let Err(e) = self.fence(key, false).await {
                    warn!(target = key.target, volume = %cont, chunk, error = %e, "scrub: cannot lift the repair fence (it is lifted in memory)");
                }
                if let Some(pool) = pool {
                    self.counters(pool, |c| c.repaired += p.values());
                }
                warn!(target = key.target, volume = %cont, chunk, shard, values = p.values(), bytes, found_by = %p.found_by, "scrub: repaired a chunk-shard from redundancy");
            }
            Outcome::Gone => {
                self.pending.remove(key);
                if p.fenced {
                    let _ = self.fence(key, false).await;
                }
                info!(target = key.target, volume = %cont, chunk = %dkey, "scrub: the target no longer holds the bad chunk-shard");
            }
            Outcome::Later(reason, pause) => {
                debug!(target = key.target, volume = %cont, chunk = %dkey, %reason, "scrub: repair postponed");
                if let Some(e) = self.pending.get_mut(key) {
                    e.not_before = Instant::now() + pause;
                }
            }
            Outcome::Failed(reason) => {
                let failures = p.failures + 1;
                let unrepairable = failures >= UNREPAIRABLE_AFTER && p.values() > p.counted_unrepairable;
                if let Some(e) = self.pending.get_mut(key) {
                    e.failures = failures;
                    e.not_before = Instant::now() + backoff(failures);
                    if unrepairable {
                        e.counted_unrepairable = p.values();
                    }
                }
                if unrepairable {
                    if let Some(pool) = pool {
                        self.counters(pool, |c| c.unrepairable += p.values() - p.counted_unrepairable);
                    }
                    error!(target = key.target, volume = %cont, chunk = %dkey, values = p.values(), failures, %reason, "scrub: bad data cannot be repaired from redundancy; still retrying");
                } else {
                    warn!(target = key.target, volume = %cont, chunk = %dkey, failures, %reason, "scrub: repair failed; retrying");
                }
            }
        }
    }

    /// The volume of container `cont`, re-reading the volume list if it is unknown (a volume
    /// created since the pass started): `Err` with the time to wait when the list was read
    /// moments ago.
    async fn volume(&mut self, cont: u128) -> Result<Option<Known>, Duration> {
        if let Some(k) = self.volumes.get(&cont) {
            return Ok(Some(k.clone()));
        }
        if let Some(wait) = self.volumes_refreshed.and_then(|t| VOLUME_REFRESH.checked_sub(t.elapsed())) {
            return Err(wait);
        }
        self.refresh_volumes().await;
        Ok(self.volumes.get(&cont).cloned())
    }

    async fn try_repair(&mut self, key: &RepairKey) -> Outcome {
        let Known { pool, volume: v } = match self.volume(key.cont).await {
            Ok(Some(k)) => k,
            Ok(None) => return Outcome::Failed("the container is not a volume of a pool with targets here".into()),
            Err(wait) => return Outcome::Later("the container is not a volume known yet".into(), wait),
        };
        if key.obj != key.cont {
            return Outcome::Failed("the object is not a volume".into());
        }
        let Some(chunk) = key_to_u64(&key.dkey) else { return Outcome::Failed("the dkey is not a chunk number".into()) };
        let version = self.pools.borrow().iter().find(|p| p.pool_id == pool).map_or(0, |p| p.map_version);
        v.refresh_pool_map(version).await;
        let group = match v.chunk_group(chunk) {
            Ok(g) => g,
            Err(e) => return Outcome::Failed(e.to_string()),
        };
        let me = TargetRef { rank: self.rank, index: key.target };
        let Some(mine) = group.shards.iter().find(|s| s.target() == me).copied() else {
            if group.shards.iter().any(|s| s.base_source == Some(me)) {
                return Outcome::Later("the shard is moving away from this target".into(), DEFER);
            }
            return match self.holds(key).await {
                Some(false) => Outcome::Gone,
                _ => Outcome::Later("this target no longer has a shard of the chunk; clean-up discards it".into(), DEFER_STALE),
            };
        };
        if !mine.readable() {
            return Outcome::Later("the shard is being rebuilt onto this target".into(), DEFER);
        }
        let class = v.layout().class();
        if class.parity_shards() == 0 {
            return Outcome::Failed(format!("class {class} has no redundancy"));
        }
        let sources = group.for_reads();
        let others = sources.shards.iter().filter(|s| s.shard != mine.shard && s.readable()).count() as u32;
        if others < class.data_shards() {
            let why = format!("{others} of the group's other shards are readable, {} needed", class.data_shards());
            if group.shards.iter().any(|s| s.rebuilding || !s.writable()) {
                return Outcome::Later(why, DEFER);
            }
            return Outcome::Failed(why);
        }
        if let Err(e) = self.fence(key, true).await {
            return Outcome::Failed(format!("cannot fence the dkey: {e}"));
        }
        if let Some(p) = self.pending.get_mut(key) {
            p.fenced = true;
        }
        let retained = self.healer.retained(&v);
        match v.rebuild_shard(chunk, mine.shard, RebuildOptions { since: 0, settle_torn: false, discard_below: 0 }, &retained).await {
            Ok(r) => match self.healer.snapshots_missed(&v, &retained, r.read_epoch).await {
                Ok(missed) if missed.is_empty() => Outcome::Repaired { chunk, shard: mine.shard, bytes: r.bytes },
                Ok(missed) => {
                    Outcome::Later(format!("snapshots at epochs {missed:?} were taken during the repair; repairing again"), DEFER)
                }
                Err(e) => Outcome::Later(e, DEFER),
            },
            Err(e) => Outcome::Failed(format!("shard {}: {e}", mine.shard)),
        }
    }

    /// Whether the target still holds anything of the dkey (`None`: could not ask).
    async fn holds(&self, key: &RepairKey) -> Option<bool> {
        let op = TargetOp::ListAkeys { cont: key.cont, obj: key.obj, dkey: key.dkey.clone(), epoch: u64::MAX, after: None, max: 1 };
        match self.call(key.target as usize, op).await? {
            TargetReply::Keys(k) => Some(!k.is_empty()),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_spreads_the_data_over_the_period_between_the_floor_and_the_cap() {
        let day = 86_400;
        // 1 TiB a day: ~12.1 MiB/s, capped at 8 MiB/s.
        assert_eq!(scrub_rate(1 << 40, day, 8 << 20), 8 << 20);
        // 100 GiB a day: ~1.2 MiB/s.
        assert_eq!(scrub_rate(100 << 30, day, 8 << 20), (100u64 << 30) / day);
        // Little data: the floor.
        assert_eq!(scrub_rate(1 << 20, day, 8 << 20), RATE_FLOOR);
        // A cap below the floor wins; a zero period is one second.
        assert_eq!(scrub_rate(1 << 30, day, 4096), 4096);
        assert_eq!(scrub_rate(3 << 20, 0, 64 << 20), 3 << 20);
        assert_eq!(time_for(8 << 20, 8 << 20), Duration::from_secs(1));
        assert_eq!(time_for(1, 0), Duration::from_secs(1));
    }

    #[test]
    fn backoff_doubles_up_to_the_limit() {
        assert_eq!(backoff(1), Duration::from_secs(1));
        assert_eq!(backoff(2), Duration::from_secs(2));
        assert_eq!(backoff(5), Duration::from_secs(16));
        assert_eq!(backoff(40), MAX_BACKOFF);
    }
}
