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

use std::os::unix::fs::FileTypeExt;
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
    /// Binds `socket` and serves `make()`'s device on it, a new one per connection, on a thread
    /// of its own. A stale socket file there (of a process that died) is replaced; any other file,
    /// or a socket another process still serves, is left alone and refused.
    pub fn start<D, F>(socket: &Path, make: F) -> Result<VhostServer, ServeError>
    where
        D: BlockDevice + Send + Sync + 'static,
        F: Fn() -> BlkBackend<D> + Send + 'static,
    {
        let path = socket.display().to_string();
        let refuse = |msg: String| ServeError::Listen { path: path.clone(), msg };
        claim(socket).map_err(refuse)?;
        let mut listener = Listener::new(socket, false).map_err(|e| refuse(e.to_string()))?;
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

/// Makes `socket` free to bind: nothing there, or a socket nobody answers on (removed).
fn claim(socket: &Path) -> Result<(), String> {
    match std::fs::symlink_metadata(socket) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e.to_string()),
        Ok(m) if !m.file_type().is_socket() => Err("a file that is not a socket is in the way (left alone)".into()),
        Ok(_) if UnixStream::connect(socket).is_ok() => Err("another process serves this socket".into()),
        Ok(_) => std::fs::remove_file(socket).map_err(|e| format!("cannot remove the stale socket: {e}")),
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;
    use tessera_bdev::MallocBdev;
    use vhost::vhost_user::Frontend;
    use vhost::VhostBackend;

    fn temp(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("tessera-vhost-serve-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn server(rt: &tokio::runtime::Runtime, socket: &Path) -> Result<VhostServer, ServeError> {
        let dev = Arc::new(MallocBdev::new(4096, 256).unwrap());
        let h = rt.handle().clone();
        VhostServer::start(socket, move || BlkBackend::new(dev.clone(), 2, "serial", false, h.clone()))
    }

    #[test]
    fn a_server_serves_connection_after_connection_and_stops_with_its_socket() {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        let dir = temp("cycle");
        let sock = dir.join("d.sock");
        let s = server(&rt, &sock).unwrap();
        for _ in 0..2 {
            let fe = Frontend::connect(&sock, 2).unwrap();
            assert_ne!(fe.get_features().unwrap() & (1 << crate::config::feature::VERSION_1), 0);
            drop(fe); // the next connection gets a fresh device
        }
        let fe = Frontend::connect(&sock, 2).unwrap();
        fe.get_features().unwrap();
        s.stop();
        assert!(fe.get_features().is_err(), "stopping ends the connection");
        assert!(!sock.exists(), "and removes the socket");
        // Stopped while waiting for a connection, too.
        server(&rt, &sock).unwrap().stop();
        assert!(!sock.exists());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn only_a_stale_socket_is_replaced() {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        let dir = temp("claim");
        let file = dir.join("precious");
        std::fs::write(&file, b"keep me").unwrap();
        let e = server(&rt, &file).unwrap_err();
        assert!(e.to_string().contains("not a socket is in the way"), "{e}");
        assert_eq!(std::fs::read(&file).unwrap(), b"keep me");

        let live = dir.join("live.sock");
        let other = UnixListener::bind(&live).unwrap();
        let e = server(&rt, &live).unwrap_err();
        assert!(e.to_string().contains("another process serves"), "{e}");
        drop(other); // its file stays behind: stale
        let s = server(&rt, &live).unwrap();
        Frontend::connect(&live, 2).unwrap().get_features().unwrap();
        s.stop();
        let _ = std::fs::remove_dir_all(&dir);
    }
}
