//! Serving a device on a UNIX socket, one vhost-user connection after another, until stopped.
//!
//! The socket is bound once and stays bound while the server runs, so a hypervisor that
//! reconnects (QEMU `reconnect=1`) finds it between connections. A daemon serves one front end,
//! so each connection gets a fresh device; when the front end goes away (a VM stopped, QEMU
//! restarted) the requests in flight finish before the next connection is accepted.
//!
//! [`VhostServer::stop`] ends the connection being served (the front end sees the socket close)
//! or wakes the thread waiting in `accept` by connecting to the socket itself, then removes the
//! socket file.

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use tessera_bdev::BlockDevice;
use tracing::{info, warn};
use vhost::vhost_user::{Error as VhostUserError, Listener};
use vhost_user_backend::{Error as DaemonError, ShutdownHandle, VhostUserDaemon};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

use crate::backend::BlkBackend;

/// Why a server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The socket could not be bound.
    #[error("vhost-user-blk on {path}: cannot listen: {msg}")]
    Listen {
        /// The socket.
        path: String,
        /// What failed.
        msg: String,
    },
    /// The serving thread could not be started.
    #[error("vhost-user-blk on {path}: cannot start its thread: {msg}")]
    Thread {
        /// The socket.
        path: String,
        /// What failed.
        msg: String,
    },
}

/// What the serving thread and [`VhostServer::stop`] share.
#[derive(Default)]
struct Shared {
    stopping: AtomicBool,
    /// The connection being served, to end it.
    conn: Mutex<Option<ShutdownHandle>>,
}

/// A device served on a socket by a thread of its own.
pub struct VhostServer {
    socket: PathBuf,
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for VhostServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VhostServer").field("socket", &self.socket).finish_non_exhaustive()
    }
}

impl VhostServer {
    /// Binds `socket` (replacing a stale socket file) and serves `make()`'s device on it, a new
    /// one per connection, on a thread of its own.
    pub fn start<D, F>(socket: &Path, make: F) -> Result<VhostServer, ServeError>
    where
        D: BlockDevice + Send + Sync + 'static,
        F: Fn() -> BlkBackend<D> + Send + 'static,
    {
        let path = socket.display().to_string();
        let mut listener = Listener::new(socket, true).map_err(|e| ServeError::Listen { path: path.clone(), msg: e.to_string() })?;
        let shared = Arc::new(Shared::default());
        let inner = shared.clone();
        let thread = std::thread::Builder::new()
            .name("vhost-blk".into())
            .spawn(move || serve(&mut listener, &path, make, &inner))
            .map_err(|e| ServeError::Thread { path: socket.display().to_string(), msg: e.to_string() })?;
        info!(socket = %socket.display(), "vhost-user-blk listening");
        Ok(VhostServer { socket: socket.to_path_buf(), shared, thread: Some(thread) })
    }

    /// The socket served.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Ends the connection being served, waits for its requests in flight (see
    /// [`BlkBackend::drain`]) and for the thread, and removes the socket file. Blocks.
    pub fn stop(mut self) {
        self.stop_inner();
    }

    fn stop_inner(&mut self) {
        let Some(thread) = self.thread.take() else { return };
        self.shared.stopping.store(true, Ordering::SeqCst);
        let conn = self.shared.conn.lock().unwrap_or_else(|e| e.into_inner()).clone();
        match conn {
            Some(c) => c.shutdown(),
            // Waiting in accept (or about to): a connection of our own wakes it. If it is just
            // being handed a real one, it sees `stopping` once it has published that one.
            None => drop(UnixStream::connect(&self.socket)),
        }
        if thread.join().is_err() {
            warn!(socket = %self.socket.display(), "the vhost-user-blk thread panicked");
        }
        info!(socket = %self.socket.display(), "vhost-user-blk stopped");
    }
}

impl Drop for VhostServer {
    fn drop(&mut self) {
        self.stop_inner();
    }
}

/// The serving thread: a daemon per connection until stopped; the listener's drop removes the
/// socket file.
fn serve<D: BlockDevice + Send + Sync + 'static>(listener: &mut Listener, path: &str, make: impl Fn() -> BlkBackend<D>, shared: &Shared) {
    while !shared.stopping.load(Ordering::SeqCst) {
        let backend = Arc::new(make());
        let mut daemon =
            match VhostUserDaemon::new("tessera-vhost-blk".into(), backend.clone(), GuestMemoryAtomic::new(GuestMemoryMmap::new())) {
                Ok(d) => d,
                Err(e) => {
                    warn!(socket = %path, error = %e, "vhost-user-blk: cannot create the daemon; retrying");
                    std::thread::sleep(Duration::from_millis(500));
                    continue;
                }
            };
        if let Err(e) = daemon.start(listener) {
            warn!(socket = %path, error = %e, "vhost-user-blk: accepting a connection failed");
            // Not a tight loop when the socket itself fails.
            std::thread::sleep(Duration::from_millis(500));
            continue;
        }
        let handle = daemon.shutdown_handle();
        *shared.conn.lock().unwrap_or_else(|e| e.into_inner()) = handle.clone();
        // `stop` reads the handle after setting `stopping`: one of the two sees the other.
        if shared.stopping.load(Ordering::SeqCst) {
            if let Some(h) = &handle {
                h.shutdown();
            }
        } else {
            info!(socket = %path, "vhost-user-blk front end connected");
        }
        match daemon.wait() {
            Ok(()) | Err(DaemonError::HandleRequest(VhostUserError::Disconnected | VhostUserError::PartialMessage)) => {
                info!(socket = %path, "vhost-user-blk front end disconnected")
            }
            Err(e) => warn!(socket = %path, error = %e, "vhost-user-blk connection ended"),
        }
        *shared.conn.lock().unwrap_or_else(|e| e.into_inner()) = None;
        // Dropping the daemon stops its queue workers; nothing of this connection may still
        // write into guest memory once the next one is accepted.
        drop(daemon);
        backend.drain();
    }
}
