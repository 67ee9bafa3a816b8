//! vhost-user-blk exports of this process: a volume (or a read-only snapshot) of the management
//! service served to a VM over a UNIX socket, on the same bdev layer as the NVMe/TCP namespaces
//! (`tessera_bdev::DaosBdev`) and the device of `tessera_vhost_blk`: the management service's
//! vhost exports (`tessera export add --vhost-blk SOCKET`) whose target is this process's listen
//! address, followed in managed mode ([`VhostSet`], applied by [`crate::managed::Manager`]).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use tessera_bdev::{BlockDevice, DaosBdev};
use tessera_client::volume::Volume;
use tessera_mgmt_api::{SnapshotInfo, VhostExportInfo, VolumeInfo, VHOST_QUEUES_MAX};
use tessera_vhost_blk::backend::BlkBackend;
use tessera_vhost_blk::serve::{ServeError, VhostServer};
use tracing::{info, warn};
use uuid::Uuid;

use crate::managed::serves;

/// The disk's id (`VIRTIO_BLK_T_GET_ID`): the volume's UUID, or for a snapshot one derived from
/// it and the snapshot's epoch (the same identity its NVMe namespace has).
pub fn serial_of(info: &VolumeInfo, snapshot: Option<&SnapshotInfo>) -> String {
    match snapshot {
        Some(s) => Uuid::new_v5(&info.uuid, &s.epoch.to_be_bytes()).simple().to_string(),
        None => info.uuid.simple().to_string(),
    }
}

/// Starts serving `bdev` on `socket` (requests run on the current tokio runtime).
fn start(socket: &Path, bdev: Arc<DaosBdev>, queues: u16, serial: String, read_only: bool) -> Result<VhostServer, ServeError> {
    let rt = tokio::runtime::Handle::current();
    VhostServer::start(socket, move || BlkBackend::new(bdev.clone(), queues, &serial, read_only, rt.clone()))
}

/// What a running vhost-user-blk export serves; a change of any of it restarts the export.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Served {
    volume: Uuid,
    snapshot_epoch: Option<u64>,
    queues: u16,
    read_only: bool,
}

impl Served {
    fn of(x: &VhostExportInfo) -> Served {
        Served { volume: x.volume.uuid, snapshot_epoch: x.snapshot.as_ref().map(|s| s.epoch), queues: x.queues, read_only: x.read_only }
    }
}

#[derive(Debug)]
struct Running {
    served: Served,
    bdev: Arc<DaosBdev>,
    server: VhostServer,
}

/// The management service's vhost-user-blk exports this process serves, by socket: the
/// managed-mode counterpart of the NVMe subsystems (see [`crate::managed`]).
#[derive(Debug, Default)]
pub struct VhostSet {
    running: BTreeMap<String, Running>,
}

/// The exports of `list` a target listening on `listen` serves, and the ones it cannot serve
/// with why (one line each).
pub fn wanted(list: &[VhostExportInfo], listen: &[SocketAddr]) -> (Vec<VhostExportInfo>, Vec<String>) {
    let (mut ok, mut skipped) = (Vec::new(), Vec::new());
    for x in list.iter().filter(|x| serves(listen, &x.target)) {
        let v = &x.volume;
        let size = x.snapshot.as_ref().map_or(v.size, |s| s.size);
        let why = if !x.socket.starts_with('/') {
            Some("the socket path is not absolute".to_string())
        } else if !(1..=VHOST_QUEUES_MAX).contains(&x.queues) {
            Some(format!("{} queues (1 to {VHOST_QUEUES_MAX})", x.queues))
        } else if v.block_size != 512 && v.block_size != 4096 {
            Some(format!("volume block size {} must be 512 or 4096", v.block_size))
        } else if size == 0 || !size.is_multiple_of(u64::from(v.block_size)) {
            Some(format!("volume size {size} is not a positive multiple of its block size"))
        } else {
            None
        };
        match why {
            Some(why) => skipped.push(format!("vhost-user-blk export on {} (volume {}/{}): {why}", x.socket, v.pool, v.name)),
            None => ok.push(x.clone()),
        }
    }
    (ok, skipped)
}

impl VhostSet {
    /// Serves exactly `wanted`: stops the exports no longer wanted or changed, hands a grown
    /// volume's new handle to its running export, and starts the new ones with the volume handle
    /// `open(export)` gives (None: not open yet). Returns whether all of them are served.
    pub async fn apply(&mut self, wanted: &[VhostExportInfo], open: impl Fn(&VhostExportInfo) -> Option<Volume>) -> bool {
        let mut complete = true;
        let keep: BTreeMap<&str, &VhostExportInfo> = wanted.iter().map(|x| (x.socket.as_str(), x)).collect();
        let gone: Vec<String> = self
            .running
            .iter()
            .filter(|(sock, r)| keep.get(sock.as_str()).is_none_or(|x| Served::of(x) != r.served))
            .map(|(s, _)| s.clone())
            .collect();
        for sock in gone {
            if let Some(r) = self.running.remove(&sock) {
                info!(socket = %sock, "vhost-user-blk export removed");
                let _ = tokio::task::spawn_blocking(move || r.server.stop()).await;
            }
        }
        for x in wanted {
            let Some(vol) = open(x) else {
                complete = false;
                continue;
            };
            if let Some(r) = self.running.get(&x.socket) {
                // Same export. A volume whose description changed (grown, rolled back with
                // --force) was opened again: later requests use the new handle.
                if *vol.info() != r.bdev.info() {
                    let grown = vol.info().size > r.bdev.info().size;
                    match r.bdev.set_volume(vol) {
                        Ok(()) if grown => {
                            info!(socket = %x.socket, blocks = r.bdev.num_blocks(), "vhost-user-blk disk grown (the guest sees it when it reconnects)")
                        }
                        Ok(()) => info!(socket = %x.socket, "vhost-user-blk disk switched to the volume's new handle"),
                        Err(e) => warn!(socket = %x.socket, "vhost-user-blk disk keeps its volume handle: {e}"),
                    }
                }
                continue;
            }
            let bdev = match DaosBdev::new(vol) {
                Ok(b) => Arc::new(b),
                Err(e) => {
                    warn!(socket = %x.socket, "vhost-user-blk export not served: {e}");
                    complete = false;
                    continue;
                }
            };
            let serial = serial_of(&x.volume, x.snapshot.as_ref());
            match start(Path::new(&x.socket), bdev.clone(), x.queues, serial, x.read_only) {
                Ok(server) => {
                    let snap = x.snapshot.as_ref().map(|s| format!("@{}", s.name)).unwrap_or_default();
                    info!(socket = %x.socket, volume = %format!("{}/{}{snap}", x.volume.pool, x.volume.name), queues = x.queues, read_only = x.read_only, "vhost-user-blk export ready");
                    self.running.insert(x.socket.clone(), Running { served: Served::of(x), bdev, server });
                }
                Err(e) => {
                    warn!("vhost-user-blk export not served, will retry: {e}");
                    complete = false;
                }
            }
        }
        complete
    }

    /// Stops every export (their sockets are removed).
    pub async fn stop_all(&mut self) {
        let all = std::mem::take(&mut self.running);
        let _ = tokio::task::spawn_blocking(move || {
            for (_, r) in all {
                r.server.stop();
            }
        })
        .await;
    }
}
