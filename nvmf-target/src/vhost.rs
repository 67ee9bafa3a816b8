//! vhost-user-blk exports of this process: a volume (or a read-only snapshot) of the management
//! service served to a VM over a UNIX socket (`tessera-nvmf --mgmt ADDR --vhost-blk
//! SOCKET=POOL/VOLUME[@SNAPSHOT]`), on the same bdev layer as the NVMe/TCP namespaces
//! (`tessera_bdev::DaosBdev`) and the device of `tessera_vhost_blk`.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tessera_bdev::{BlockDevice, DaosBdev};
use tessera_client::volume::Cluster;
use tessera_mgmt_api::MgmtClient;
use tessera_vhost_blk::backend::BlkBackend;
use tessera_vhost_blk::serve::serve_forever;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

/// One `--vhost-blk` export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VhostExport {
    /// The UNIX socket the hypervisor connects to.
    pub socket: PathBuf,
    /// Pool.
    pub pool: String,
    /// Volume.
    pub volume: String,
    /// A snapshot of it, served read-only.
    pub snapshot: Option<String>,
    /// Request queues offered (the guest uses up to one per vCPU).
    pub queues: u16,
}

impl std::str::FromStr for VhostExport {
    type Err = String;

    /// `SOCKET=POOL/VOLUME[@SNAPSHOT]` (the pool `default` if it is left out).
    fn from_str(s: &str) -> Result<VhostExport, String> {
        let (socket, what) = s.split_once('=').ok_or_else(|| format!("'{s}' is not SOCKET=POOL/VOLUME[@SNAPSHOT]"))?;
        let (path, snapshot) = match what.split_once('@') {
            Some((p, snap)) if !snap.is_empty() => (p, Some(snap.to_string())),
            Some(_) => return Err(format!("'{s}': empty snapshot name")),
            None => (what, None),
        };
        let (pool, volume) = path.split_once('/').unwrap_or(("default", path));
        if socket.is_empty() || pool.is_empty() || volume.is_empty() || volume.contains('/') {
            return Err(format!("'{s}' is not SOCKET=POOL/VOLUME[@SNAPSHOT]"));
        }
        Ok(VhostExport { socket: socket.into(), pool: pool.into(), volume: volume.into(), snapshot, queues: 4 })
    }
}

/// Serves `export` until `stop`: waits for the volume (retrying every second, saying so once),
/// opens it and serves the socket on a thread of its own, connection after connection.
pub async fn run(mgmt_addr: String, export: VhostExport, stop: CancellationToken) {
    let mgmt = MgmtClient::new(&mgmt_addr);
    let cluster = Cluster::new(mgmt.clone());
    let name = format!("{}/{}{}", export.pool, export.volume, export.snapshot.as_ref().map(|s| format!("@{s}")).unwrap_or_default());
    let mut warned = false;
    let bdev = loop {
        let opened = async {
            let info = mgmt.volume(&export.pool, &export.volume).await.map_err(|e| e.to_string())?;
            let serial = info.uuid.simple().to_string();
            let bdev = match &export.snapshot {
                Some(s) => {
                    let snap = info.snapshots.iter().find(|x| &x.name == s).ok_or_else(|| format!("no snapshot {s}"))?;
                    DaosBdev::open_snapshot(&cluster, &info, snap).await
                }
                None => DaosBdev::open(&cluster, &info).await,
            };
            bdev.map(|b| (b, serial)).map_err(|e| e.to_string())
        };
        match opened.await {
            Ok(b) => break b,
            Err(e) if !warned => {
                warn!(volume = %name, socket = %export.socket.display(), "vhost-user-blk export waits for its volume: {e}");
                warned = true;
            }
            Err(_) => {}
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    };
    let (bdev, serial) = (Arc::new(bdev.0), bdev.1);
    info!(volume = %name, socket = %export.socket.display(), blocks = bdev.num_blocks(), block_size = bdev.block_size(), queues = export.queues, "vhost-user-blk export ready");
    let rt = tokio::runtime::Handle::current();
    let stopped = Arc::new(AtomicBool::new(false));
    let flag = stopped.clone();
    let socket = export.socket.clone();
    let read_only = export.snapshot.is_some();
    let thread = std::thread::Builder::new().name("vhost-blk".into()).spawn(move || {
        let make = || BlkBackend::new(bdev.clone(), export.queues, &serial, read_only, rt.clone());
        if let Err(e) = serve_forever(&socket, make, || flag.load(Ordering::Acquire)) {
            error!("{e}");
        }
    });
    if let Err(e) = thread {
        error!(socket = %export.socket.display(), "cannot start the vhost-user-blk thread: {e}");
        return;
    }
    stop.cancelled().await;
    // The thread sees it when its connection ends; the process exits meanwhile.
    stopped.store(true, Ordering::Release);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exports_name_a_socket_and_a_volume() {
        let e: VhostExport = "/tmp/v.sock=p/vol@s1".parse().unwrap();
        assert_eq!(
            (e.socket.to_str(), e.pool.as_str(), e.volume.as_str(), e.snapshot.as_deref()),
            (Some("/tmp/v.sock"), "p", "vol", Some("s1"))
        );
        let e: VhostExport = "/tmp/v.sock=vol".parse().unwrap();
        assert_eq!((e.pool.as_str(), e.snapshot), ("default", None));
        for bad in ["/tmp/v.sock", "=p/v", "/s=p/", "/s=/v", "/s=p/v@", "/s=a/b/c"] {
            assert!(bad.parse::<VhostExport>().is_err(), "{bad}");
        }
    }
}
