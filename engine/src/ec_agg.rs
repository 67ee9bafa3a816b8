//! The EC aggregator of one engine: folds the partial-stripe fragments of EC volumes back into
//! full stripes (`tessera_client::volume::Volume::aggregate_chunk`; design in docs/PLACEMENT.md,
//! "EC aggregation"), paced to `[heal] ec_aggregation_rate`.
//!
//! Every [`PASS_EVERY`], for every pool with targets here whose map is settled (nothing DOWN or
//! UP: no rebuild can race it), with the pool's stable epoch as the boundary: for every EC volume
//! the chunks that changed on any UPIN target of the pool since this engine's oldest complete
//! pass are listed; for every UPIN target of this engine, the torn full-stripe writes of those
//! whose first parity shard it holds are settled (`Volume::resolve_torn`, all or nothing at their
//! epoch; on a target holding another shard a torn stripe only waits for that), and those chunks
//! (one engine per chunk, the one holding every copy) are aggregated (not in a
//! clone or a rolled-back volume). Counters go to the service
//! with the scrub counters (`pool query`).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tessera_client::placement::TargetRef;
use tessera_client::volume::{Cluster, VolumeError};
use tessera_mgmt_api::{MgmtClient, PoolVersion, TargetStateName, VolumeInfo};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::heal::Healer;
use crate::worker::{TargetHandle, TargetOp};

/// Pause between passes.
pub const PASS_EVERY: Duration = Duration::from_secs(2);

/// The EC aggregator of one engine.
#[derive(Debug)]
pub struct EcAggregator {
    mgmt: MgmtClient,
    cluster: Arc<Cluster>,
    healer: Arc<Healer>,
    rank: u32,
    rate: u64,
    pools: watch::Receiver<Vec<PoolVersion>>,
    /// Per (volume, target): the boundary of the last pass that left nothing behind there;
    /// the next pass lists only chunks changed above it.
    done_below: HashMap<(u128, u16), u64>,
    /// This engine's targets, told how far each EC volume is settled (their aggregation stays
    /// below it, so a torn write's versions outlive its settlement).
    targets: Vec<TargetHandle>,
    /// The EC volumes named to the targets, and their pools.
    named: HashMap<u128, String>,
    /// The targets were told every EC volume has been named once.
    ready: bool,
}

impl EcAggregator {
    /// An aggregator for engine `rank` at `rate` stripe bytes per second; counters go through
    /// `healer` (with the scrub counters).
    pub fn new(
        mgmt: MgmtClient,
        healer: Arc<Healer>,
        rank: u32,
        rate: u64,
        pools: watch::Receiver<Vec<PoolVersion>>,
        targets: Vec<TargetHandle>,
    ) -> EcAggregator {
        EcAggregator {
            cluster: Cluster::background(mgmt.clone()),
            mgmt,
            healer,
            rank,
            rate,
            pools,
            done_below: HashMap::new(),
            targets,
            named: HashMap::new(),
            ready: false,
        }
    }

    /// Tells every target of this engine how far container `cont` is settled (`None`: every EC
    /// volume has been named).
    async fn settle(&self, target: Option<u16>, cont: Option<u128>, below: u64) {
        for (i, t) in self.targets.iter().enumerate() {
            if target.is_none_or(|x| usize::from(x) == i) {
                let _ = t.submit(TargetOp::SettleEc { cont, below }).await;
            }
        }
    }

    /// Runs passes until `stop`.
    pub async fn run(mut self, stop: CancellationToken) {
        let mut failing = false;
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(PASS_EVERY) => {}
            }
            let pools: Vec<PoolVersion> = self.pools.borrow().iter().filter(|p| !p.name.is_empty()).cloned().collect();
            let mut all_named = true;
            for p in pools {
                let vols = match self.name_volumes(&p).await {
                    Ok(v) => v,
                    Err(e) => {
                        all_named = false;
                        warn!(pool = %p.name, error = %e, "cannot list the pool's volumes; EC volumes stay unaggregated there");
                        continue;
                    }
                };
                match self.pass(&p, vols, &stop).await {
                    Ok(()) => failing = false,
                    Err(e) if !failing => {
                        warn!(pool = %p.name, error = %e, "EC aggregation pass failed; retrying");
                        failing = true;
                    }
                    Err(_) => {}
                }
            }
            if all_named && !self.ready {
                self.settle(None, None, 0).await;
                self.ready = true;
            }
        }
    }

    /// Names every EC volume of pool `p` to the targets (settled as far as the last complete
    /// pass got, else not at all) and lifts the limit of volumes deleted since; returns the
    /// pool's volumes for the pass.
    async fn name_volumes(&mut self, p: &PoolVersion) -> Result<Vec<VolumeInfo>, String> {
        let vols = self.mgmt.volumes(&p.name).await.map_err(|e| e.to_string())?;
        let ec: Vec<u128> = vols.iter().filter(|v| v.class.starts_with("EC_")).map(|v| v.uuid.as_u128()).collect();
        for &cont in &ec {
            if !self.named.contains_key(&cont) {
                for t in 0..self.targets.len() as u16 {
                    let below = self.done_below.get(&(cont, t)).copied().unwrap_or(0);
                    self.settle(Some(t), Some(cont), below).await;
                }
                self.named.insert(cont, p.name.clone());
            }
        }
        let gone: Vec<u128> = self.named.iter().filter(|(c, pool)| **pool == p.name && !ec.contains(c)).map(|(c, _)| *c).collect();
        for cont in gone {
            self.settle(None, Some(cont), u64::MAX).await;
            self.named.remove(&cont);
            self.done_below.retain(|(c, _), _| *c != cont);
        }
        Ok(vols)
    }

    /// One pass over the volumes `vols` of pool `p`.
    async fn pass(&mut self, p: &PoolVersion, vols: Vec<VolumeInfo>, stop: &CancellationToken) -> Result<(), String> {
        let map = self.mgmt.pool_map(&p.name).await.map_err(|e| e.to_string())?;
        if map.targets.iter().any(|t| matches!(t.state, TargetStateName::Down | TargetStateName::Up)) {
            return Ok(());
        }
        let Some(boundary) = self.mgmt.pool(&p.name).await.map_err(|e| e.to_string())?.stable_epoch else { return Ok(()) };
        let mine: Vec<u16> =
            map.targets.iter().filter(|t| t.rank == self.rank && t.state == TargetStateName::UpIn).map(|t| t.index).collect();
        let started = Instant::now();
        let (mut stripes, mut bytes, mut waiting) = (0u64, 0u64, 0u64);
        let (mut torn_completed, mut torn_undone) = (0u64, 0u64);
        let mut waiting_bytes = 0u64;
        for info in vols {
            // Clones and rolled-back volumes too: their torn stripes are settled (never folded).
            if !info.class.starts_with("EC_") {
                continue;
            }
            let v = self.cluster.open_volume(&info).await.map_err(|e| e.to_string())?;
            v.refresh_pool_map(map.version).await;
            let k = u64::from(v.layout().class().data_shards());
            let stripe = u64::from(v.layout().cell_size()) * k;
            // The chunks that changed anywhere in the pool since the oldest of this engine's
            // passes: a torn write may have missed this engine's shard and reached others.
            if mine.is_empty() {
                continue;
            }
            let oldest = mine.iter().map(|t| self.done_below.get(&(info.uuid.as_u128(), *t)).copied()).min().flatten();
            let mut changed = std::collections::BTreeSet::new();
            for t in map.targets.iter().filter(|t| t.state == TargetStateName::UpIn) {
                let target = TargetRef { rank: t.rank, index: t.index };
                changed.extend(v.list_chunks(target, oldest).await.map_err(|e| e.to_string())?);
            }
            for &t in &mine {
                let me = TargetRef { rank: self.rank, index: t };
                let key = (info.uuid.as_u128(), t);
                let since = self.done_below.get(&key).copied();
                tracing::debug!(pool = %p.name, volume = %info.name, target = t, ?since, boundary, chunks = changed.len(), "EC aggregation: chunks to look at");
                let mut left = 0;
                for &chunk in &changed {
                    if stop.is_cancelled() {
                        return Ok(());
                    }
                    // Torn full-stripe writes first: a fold of a torn stripe would keep its mix.
                    match v.resolve_torn(chunk, me, since, boundary).await {
                        Ok(r) => {
                            torn_completed += r.completed;
                            torn_undone += r.undone;
                            if r.waiting > 0 {
                                left += 1;
                                continue;
                            }
                        }
                        Err(VolumeError::Unavailable(m)) => {
                            left += 1;
                            warn!(pool = %p.name, volume = %info.name, chunk, "settling torn stripes of the chunk waits: {m}");
                            v.reload_map().await;
                            continue;
                        }
                        Err(e) => return Err(format!("volume {} chunk {chunk}: {e}", info.name)),
                    }
                    let group = v.chunk_group(chunk).map_err(|e| e.to_string())?;
                    if group.shards.get(k as usize).is_none_or(|s| s.target() != me) {
                        continue;
                    }
                    let t0 = Instant::now();
                    match v.aggregate_chunk(chunk, boundary).await {
                        Ok(r) => {
                            stripes += r.stripes;
                            bytes += r.fragment_bytes;
                            left += r.deferred;
                            waiting_bytes += r.deferred_bytes;
                            // Pace: the stripes folded at the configured rate.
                            let work = r.stripes * stripe;
                            if self.rate > 0 && work > 0 {
                                let due = Duration::from_secs_f64(work as f64 / self.rate as f64);
                                if let Some(wait) = due.checked_sub(t0.elapsed()) {
                                    tokio::time::sleep(wait).await;
                                }
                            }
                        }
                        Err(VolumeError::Unavailable(m)) => {
                            left += 1;
                            warn!(pool = %p.name, volume = %info.name, chunk, "EC aggregation of the chunk waits: {m}");
                            // An engine may have come back elsewhere: the next chunk uses a fresh map.
                            v.reload_map().await;
                        }
                        Err(e) => return Err(format!("volume {} chunk {chunk}: {e}", info.name)),
                    }
                }
                waiting += left;
                if left == 0 {
                    self.done_below.insert(key, boundary);
                    self.settle(Some(t), Some(key.0), boundary).await;
                }
            }
        }
        let before = self.healer.scrub_counters(p.pool_id);
        let changed = stripes > 0
            || torn_completed + torn_undone > 0
            || before.ec_waiting != waiting
            || before.ec_waiting_bytes != waiting_bytes
            || before.ec_rate != self.rate;
        self.healer.update_scrub(p.pool_id, |c| {
            c.ec_stripes += stripes;
            c.ec_fragment_bytes += bytes;
            c.ec_waiting = waiting;
            c.ec_waiting_bytes = waiting_bytes;
            c.ec_rate = self.rate;
            c.torn_completed += torn_completed;
            c.torn_undone += torn_undone;
        });
        if changed {
            if stripes > 0 {
                info!(pool = %p.name, stripes, fragment_bytes = bytes, waiting, secs = started.elapsed().as_secs_f64(), "EC aggregation folded stripes");
            }
            self.healer.report_scrub(p).await.map_err(|e| e.to_string())?;
        }
        Ok(())
    }
}
