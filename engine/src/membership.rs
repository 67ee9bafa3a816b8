//! Membership: the engine's registration with the management service and its heartbeats.
//!
//! At start the engine registers (rank, identity, address, fault domain, targets) and learns the
//! map version of every pool with targets here *before* it serves a request, so a restarted
//! engine never answers a client whose pool map is older than the one that marked its targets
//! DOWN. Then it heartbeats every interval the service asks for; each reply raises the known
//! pool map versions ([`Engine::observe_map_version`]) and is published to the healer (`heal`),
//! and hands every target the volumes' snapshot epochs that aggregation must keep
//! ([`crate::target::Target::set_snapshots`]). A heartbeat answered 404 (the service lost or
//! never had the registration) registers again.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tessera_mgmt_api::{EpochBytes, Heartbeat, HeartbeatReply, MgmtClient, MgmtError, PoolVersion, RegisterEngine, VolumeUsage};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use uuid::Uuid;

use crate::server::Engine;
use crate::target::Snapshots;
use crate::worker::{TargetOp, TargetReply};

/// Name of the file holding the engine's identity inside its data directory.
pub const UUID_FILE: &str = "ENGINE_UUID";

/// The engine's identity: read from `dir/ENGINE_UUID`, created (durably) on first start.
pub fn load_or_create_uuid(dir: &Path) -> std::io::Result<Uuid> {
    let path = dir.join(UUID_FILE);
    match std::fs::read_to_string(&path) {
        Ok(text) => Uuid::parse_str(text.trim())
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, format!("{}: {e}", path.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let id = Uuid::new_v4();
            let tmp = dir.join(format!("{UUID_FILE}.tmp"));
            std::fs::write(&tmp, format!("{id}\n"))?;
            std::fs::File::open(&tmp)?.sync_all()?;
            std::fs::rename(&tmp, &path)?;
            std::fs::File::open(dir)?.sync_all()?;
            Ok(id)
        }
        Err(e) => Err(e),
    }
}

/// What heartbeat replies teach the rest of the engine: pool map versions (the healer and the
/// scrubber follow them) and the snapshots to keep (rebuilds copy their views).
#[derive(Debug, Clone)]
pub struct Learned {
    /// Pool map versions of the pools with targets here.
    pub pools: watch::Sender<Vec<PoolVersion>>,
    /// The snapshot epochs of every volume, complete up to their `as_of`.
    pub snapshots: watch::Sender<Arc<Snapshots>>,
}

impl Learned {
    /// Nothing learned yet.
    pub fn new() -> Learned {
        Learned { pools: watch::channel(Vec::new()).0, snapshots: watch::channel(Arc::new(Snapshots::default())).0 }
    }
}

impl Default for Learned {
    fn default() -> Self {
        Learned::new()
    }
}

/// Registers with the service, retrying every second until it answers or `stop` is cancelled.
/// A refusal (4xx: another engine holds the rank) is returned as an error.
pub async fn register(
    mgmt: &MgmtClient,
    req: &RegisterEngine,
    engine: &Engine,
    learned: &Learned,
    stop: &CancellationToken,
) -> Result<Option<HeartbeatReply>, MgmtError> {
    let mut warned = false;
    loop {
        match mgmt.register_engine(req).await {
            Ok(reply) => {
                apply(engine, learned, &reply);
                info!(mgmt = mgmt.addr(), pools = reply.pools.len(), "registered with the management service");
                return Ok(Some(reply));
            }
            Err(e @ MgmtError::Refused { .. }) => return Err(e),
            Err(e) => {
                if !warned {
                    warn!(error = %e, "cannot register yet; retrying every second");
                    warned = true;
                }
            }
        }
        tokio::select! {
            _ = stop.cancelled() => return Ok(None),
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

/// Heartbeats until `stop` is cancelled, re-registering when the service no longer knows us.
pub async fn heartbeat_loop(
    mgmt: MgmtClient,
    req: RegisterEngine,
    engine: Arc<Engine>,
    learned: Learned,
    mut interval: Duration,
    stop: CancellationToken,
) {
    let mut failing = false;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
        }
        let (stable_epoch, used_bytes) = report(&engine).await;
        let volumes = volume_usage(&engine).await;
        let hb = Heartbeat { uuid: req.uuid, stable_epoch, used_bytes, volumes };
        let result = match mgmt.heartbeat_with(req.rank, &hb).await {
            Err(MgmtError::Refused { status: 404, .. }) => mgmt.register_engine(&req).await,
            other => other,
        };
        match result {
            Ok(reply) => {
                apply(&engine, &learned, &reply);
                interval = Duration::from_millis(reply.heartbeat_interval_ms.clamp(100, 60_000));
                if failing {
                    info!("heartbeats reach the management service again");
                    failing = false;
                }
            }
            Err(e) => {
                if !failing {
                    warn!(error = %e, "heartbeat failed; still serving, retrying");
                    failing = true;
                }
            }
        }
    }
}

/// What a heartbeat reports: the lowest stable epoch of the engine's targets (asking each
/// thread, which also moves its floor on if it was idle; 0 if some target does not answer) and
/// the bytes in use on them (`None` then too).
async fn report(engine: &Engine) -> (u64, Option<u64>) {
    let mut lowest = u64::MAX;
    let mut used = 0;
    for t in &engine.targets {
        match t.submit(TargetOp::Query).await {
            Ok(Ok(TargetReply::Info(i))) => {
                lowest = lowest.min(i.stable_epoch);
                used += i.used;
            }
            _ => return (0, None),
        }
    }
    if lowest == u64::MAX {
        (0, None)
    } else {
        (lowest, Some(used))
    }
}

/// The space each volume (container) takes on the engine's targets, summed (`None` if some
/// target does not answer: a partial sum would read as space freed).
async fn volume_usage(engine: &Engine) -> Option<Vec<VolumeUsage>> {
    let mut by_cont: BTreeMap<u128, (u64, BTreeMap<u64, u64>)> = BTreeMap::new();
    for t in &engine.targets {
        let Ok(Ok(TargetReply::Usage(list))) = t.submit(TargetOp::Usage).await else { return None };
        for u in list {
            let e = by_cont.entry(u.cont).or_default();
            e.0 += u.bytes;
            for (epoch, bytes) in u.retained {
                *e.1.entry(epoch).or_default() += bytes;
            }
        }
    }
    Some(
        by_cont
            .into_iter()
            .map(|(cont, (bytes, retained))| VolumeUsage {
                uuid: Uuid::from_u128(cont),
                bytes,
                retained: retained.into_iter().map(|(epoch, bytes)| EpochBytes { epoch, bytes }).collect(),
            })
            .collect(),
    )
}

/// Raises the known map versions first, then tells the healer: by the time it acts on a new
/// version, this engine already refuses requests made with an older map. Hands every target the
/// snapshots to keep (queued before any aggregation step that could need them).
fn apply(engine: &Engine, learned: &Learned, reply: &HeartbeatReply) {
    for p in &reply.pools {
        engine.observe_map_version(p.pool_id, p.map_version);
    }
    let snapshots = Arc::new(Snapshots {
        as_of: reply.retention_as_of,
        epochs: reply.retention.iter().map(|r| (r.volume.as_u128(), r.epochs.clone())).collect(),
    });
    for t in &engine.targets {
        // The answer carries nothing; a target that stopped has nothing to aggregate.
        drop(t.submit(TargetOp::Snapshots(snapshots.clone())));
    }
    learned.snapshots.send_replace(snapshots);
    learned.pools.send_if_modified(|current| {
        let changed = *current != reply.pools;
        if changed {
            current.clone_from(&reply.pools);
        }
        changed
    });
}
