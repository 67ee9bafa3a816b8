//! Serving a device on a UNIX socket, one vhost-user connection after another: a daemon serves
//! one front end, so each connection gets a fresh device; when the front end goes away (a VM
//! stopped, QEMU restarted) the requests in flight finish and the socket is listened on again.

use std::path::Path;
use std::sync::Arc;

use tessera_bdev::BlockDevice;
use tracing::{info, warn};
use vhost_user_backend::VhostUserDaemon;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

use crate::backend::BlkBackend;

/// Why serving stopped.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The daemon could not be created or the socket not listened on.
    #[error("vhost-user-blk on {path}: {msg}")]
    Daemon {
        /// The socket.
        path: String,
        /// What failed.
        msg: String,
    },
}

/// Serves `make()`'s device on `socket` until `stop()` says so after a connection ends (the
/// socket file is replaced when listening starts). Blocks: run it on a thread of its own.
pub fn serve_forever<D: BlockDevice + Send + Sync + 'static>(
    socket: &Path,
    make: impl Fn() -> BlkBackend<D>,
    stop: impl Fn() -> bool,
) -> Result<(), ServeError> {
    let path = socket.display().to_string();
    let err = |msg: String| ServeError::Daemon { path: path.clone(), msg };
    loop {
        let backend = Arc::new(make());
        let mut daemon = VhostUserDaemon::new("tessera-vhost-blk".into(), backend.clone(), GuestMemoryAtomic::new(GuestMemoryMmap::new()))
            .map_err(|e| err(e.to_string()))?;
        info!(socket = %path, "vhost-user-blk listening");
        match daemon.serve(socket) {
            Ok(()) => info!(socket = %path, "vhost-user-blk front end disconnected"),
            Err(e) => {
                warn!(socket = %path, error = %e, "vhost-user-blk connection ended");
                // Not a tight loop when the socket itself fails.
                std::thread::sleep(std::time::Duration::from_millis(500));
            }
        }
        backend.drain();
        drop(daemon);
        if stop() {
            return Ok(());
        }
    }
}
