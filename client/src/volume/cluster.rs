//! The shared client state of the volumes of one process: [`Cluster`] holds the management
//! client, each pool's cached map ([`PoolCache`], refreshed on demand and at most every
//! [`MIN_REFRESH_INTERVAL`]) with its engines' addresses ([`PoolView`]), and one connection per
//! engine; it opens volumes.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use tessera_engine_proto::{ContainerId, ObjectId};
use tessera_mgmt_api::{MgmtClient, PoolMapInfo, SnapshotInfo, TargetStateName, VolumeInfo};
use tracing::{debug, info, warn};

use super::{Counters, Parent, Volume, VolumeError, VolumeInner};
use crate::ec::Codec;
use crate::hlc;
use crate::layout::VolumeLayout;
use crate::placement::{ObjectClass, PoolMap, TargetEntry, TargetState};
use crate::rpc::{ConnectionOptions, EngineConnection, RpcError};

/// Shortest interval between two pool map fetches of one pool.
const MIN_REFRESH_INTERVAL: Duration = Duration::from_millis(100);

/// A pool map as the client uses it: placement map plus engine addresses.
#[derive(Debug)]
pub(super) struct PoolView {
    pub(super) map: PoolMap,
    pub(super) addrs: HashMap<u32, SocketAddr>,
    /// The epoch the map took effect at (merged into the clock when it was loaded).
    pub(super) map_epoch: u64,
}

impl PoolView {
    fn from_info(info: &PoolMapInfo) -> Result<PoolView, VolumeError> {
        let entries = |targets: &[tessera_mgmt_api::PoolTarget]| -> Vec<TargetEntry> {
            targets
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
                    added: t.added,
                })
                .collect()
        };
        // States and failure sequences come from the service, which keeps them with `PoolMap`.
        // Writes planned with this map carry later epochs than the one it took effect at.
        hlc::update(info.map_epoch);
        // Groups are counted from the pool's size at creation (0: all its targets).
        let groups = |m: PoolMap| match info.group_targets {
            0 => Ok(m),
            n => m.with_group_targets(n),
        };
        let mut map = PoolMap::new(info.version, entries(&info.targets))
            .and_then(groups)
            .map_err(|e| VolumeError::Config(format!("pool map: {e}")))?;
        // The base (last settled) map decides which shards are being rebuilt (written, not
        // read). None listed: the current map is settled, so it is its own base.
        if !info.base_targets.is_empty() {
            let base = PoolMap::new(info.base_version, entries(&info.base_targets))
                .and_then(groups)
                .map_err(|e| VolumeError::Config(format!("base pool map: {e}")))?;
            map = map.with_base(base);
        }
        let mut addrs = HashMap::new();
        for e in &info.engines {
            let a: SocketAddr = e.address.parse().map_err(|_| VolumeError::Config(format!("engine {} address {:?}", e.rank, e.address)))?;
            addrs.insert(e.rank, a);
        }
        Ok(PoolView { map, addrs, map_epoch: info.map_epoch })
    }
}

/// One pool's cached map.
#[derive(Debug)]
pub(super) struct PoolCache {
    pub(super) name: String,
    pub(super) pool_id: u32,
    pub(super) view: RwLock<Arc<PoolView>>,
    pub(super) refresh: tokio::sync::Mutex<Instant>,
}

impl PoolCache {
    pub(super) fn current(&self) -> Arc<PoolView> {
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
        Self::with_background(mgmt, false)
    }

    /// A cluster handle for background work (an engine's healer and scrubber): every request
    /// it sends is marked background, so the engines do not count it as host I/O when they
    /// pace their rebuild (`ConnectionOptions::background`).
    pub fn background(mgmt: MgmtClient) -> Arc<Cluster> {
        Self::with_background(mgmt, true)
    }

    fn with_background(mgmt: MgmtClient, background: bool) -> Arc<Cluster> {
        let opts = ConnectionOptions {
            timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(2),
            background,
            ..ConnectionOptions::default()
        };
        Arc::new(Cluster { mgmt, pools: Mutex::new(HashMap::new()), conns: Mutex::new(HashMap::new()), opts })
    }

    /// The management client.
    pub fn mgmt(&self) -> &MgmtClient {
        &self.mgmt
    }

    /// Opens a volume (fetches its pool's map).
    pub async fn open_volume(self: &Arc<Self>, info: &VolumeInfo) -> Result<Volume, VolumeError> {
        self.open(info, None).await
    }

    /// Opens snapshot `snap` of a volume: read-only, reads at the snapshot's epoch, of the size
    /// the volume had then.
    pub async fn open_snapshot(self: &Arc<Self>, info: &VolumeInfo, snap: &SnapshotInfo) -> Result<Volume, VolumeError> {
        self.open(info, Some(snap)).await
    }

    async fn open(self: &Arc<Self>, info: &VolumeInfo, snap: Option<&SnapshotInfo>) -> Result<Volume, VolumeError> {
        let class: ObjectClass = info.class.parse().map_err(|e| VolumeError::Config(format!("volume {}: {e}", info.name)))?;
        // A snapshot's handle describes the volume as it was: the size it had then.
        let info = &VolumeInfo { size: snap.map_or(info.size, |s| s.size), ..info.clone() };
        let layout = VolumeLayout::new(info.size, info.block_size, info.chunk_size, info.cell_size, class)
            .map_err(|e| VolumeError::Config(format!("volume {}: {e}", info.name)))?;
        let codec = match class {
            ObjectClass::Ec { .. } => Some(Codec::for_class(class).map_err(|e| VolumeError::Config(e.to_string()))?),
            _ => None,
        };
        let pool = self.pool(&info.pool, info.pool_id).await?;
        let id = info.uuid.as_u128();
        // A clone reads its parent's snapshot where it never wrote (a chain for a clone of a clone).
        let parent = match &info.parent {
            Some(p) => Some(Parent { snapshot: Box::pin(self.open(&p.volume, Some(&p.snapshot))).await?, size: p.snapshot.size }),
            None => None,
        };
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
                snapshot: snap.map(|s| (s.name.clone(), s.epoch)),
                parent,
                rollbacks: info.rollbacks.iter().map(|r| (r.at, r.to)).collect(),
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
    pub(super) async fn refresh(&self, pool: &PoolCache) {
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

    pub(super) async fn connection(&self, addr: SocketAddr) -> Result<EngineConnection, RpcError> {
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
