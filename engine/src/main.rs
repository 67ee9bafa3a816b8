//! `tessera-engine`: the storage engine daemon.
//!
//! Serves the targets configured in a TOML file over the engine RPC. On start every target
//! recovers (checkpoint + WAL); SIGTERM/SIGINT stop accepting requests, let queued updates
//! commit, write a final checkpoint per target and exit. `kill -9` is safe too: that is what the
//! WAL is for.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tessera_engine::backend::FileStorage;
use tessera_engine::config::{ConfigError, EngineConfig};
use tessera_engine::server::{self, Engine};
use tessera_engine::target::Target;
use tessera_engine::worker::{CorruptReads, TargetHandle};
use tessera_engine::EngineError;
use tessera_engine::{ec_agg, heal, membership, scrub};
use tessera_mgmt_api::{MgmtClient, RegisterEngine};
use tokio::net::TcpListener;
use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// Tessera storage engine.
#[derive(clap::Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Configuration file (TOML).
    #[arg(long, short, required_unless_present = "print_example_config")]
    config: Option<PathBuf>,
    /// Print an example configuration and exit.
    #[arg(long)]
    print_example_config: bool,
}

#[derive(Debug, thiserror::Error)]
enum RunError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("{dir}: {message}")]
    DataDir { dir: PathBuf, message: String },
    #[error("{dir}: {source}")]
    Target { dir: PathBuf, source: EngineError },
    #[error("cannot listen on {addr}: {source}")]
    Listen { addr: std::net::SocketAddr, source: std::io::Error },
    #[error("cannot start: {0}")]
    Start(std::io::Error),
    #[error("the management service refused the registration: {0}")]
    Register(tessera_mgmt_api::MgmtError),
}

fn main() -> ExitCode {
    let args = match tessera_cli_support::parse_args::<Args>("tessera-engine") {
        Ok(a) => a,
        Err(code) => return code,
    };
    tessera_cli_support::init_logging();
    tessera_cli_support::exit_status("tessera-engine", run(args))
}

fn run(args: Args) -> Result<(), RunError> {
    let Some(path) = args.config else {
        print!("{}", EngineConfig::example(0, 10001, Path::new("/var/lib/tessera/engine0")));
        return Ok(());
    };
    let cfg = EngineConfig::load(&path)?;
    let _lock = lock_data_dir(&cfg)?;
    check_identity(&cfg)?;
    let uuid = membership::load_or_create_uuid(&cfg.data_dir)
        .map_err(|e| RunError::DataDir { dir: cfg.data_dir.clone(), message: format!("engine identity: {e}") })?;
    let mut handles = Vec::new();
    let mut threads = Vec::new();
    let corrupt_reads = CorruptReads::new();
    for i in 0..cfg.targets {
        let dir = cfg.target_dir(i);
        let storage =
            FileStorage::new(&dir).map_err(|source| RunError::Target { dir: dir.clone(), source: EngineError::io(".", source) })?;
        let target =
            Target::open(Arc::new(storage), cfg.target_config()).map_err(|source| RunError::Target { dir: dir.clone(), source })?;
        let (handle, thread) = TargetHandle::spawn_noting(format!("target-{i}"), target, cfg.tuning.max_batch, i, corrupt_reads.clone())
            .map_err(RunError::Start)?;
        handles.push(handle);
        threads.push(thread);
    }
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().map_err(RunError::Start)?;
    let engine = Arc::new(Engine::new(cfg.rank, handles.clone()));
    rt.block_on(async {
        let listener = TcpListener::bind(cfg.listen).await.map_err(|source| RunError::Listen { addr: cfg.listen, source })?;
        let addr = listener.local_addr().map_err(RunError::Start)?;
        let stop = CancellationToken::new();
        let signalled = tokio::spawn({
            let stop = stop.clone();
            async move {
                let r = wait_for_signal().await;
                stop.cancel();
                r
            }
        });
        let mut heartbeats = None;
        let mut healing = None;
        let mut scrubbing = None;
        let mut aggregating = None;
        if let Some(m) = &cfg.mgmt {
            // Learn the pool map versions before serving anything (see `membership`).
            let mgmt = MgmtClient::new(&m.address);
            let req = RegisterEngine {
                rank: cfg.rank,
                uuid,
                address: m.advertise.unwrap_or(addr).to_string(),
                fault_domain: m.fault_domain.clone().unwrap_or_default(),
                targets: cfg.targets,
                target_capacity: cfg.target_capacity,
            };
            let learned = membership::Learned::new();
            let pools_rx = learned.pools.subscribe();
            if let Some(reply) = membership::register(&mgmt, &req, &engine, &learned, &stop).await.map_err(RunError::Register)? {
                let interval = Duration::from_millis(reply.heartbeat_interval_ms.clamp(100, 60_000));
                let healer =
                    heal::Healer::new(mgmt.clone(), cfg.rank, uuid, cfg.heal, engine.host_ops.clone(), learned.snapshots.subscribe());
                if cfg.heal.scrub_rate > 0 {
                    let scrubber = scrub::Scrubber::new(
                        mgmt.clone(),
                        healer.clone(),
                        cfg.rank,
                        handles.clone(),
                        corrupt_reads,
                        cfg.heal,
                        pools_rx.clone(),
                    );
                    scrubbing = Some(tokio::spawn(scrubber.run(stop.clone())));
                }
                if cfg.heal.ec_aggregation_rate > 0 {
                    let agg = ec_agg::EcAggregator::new(
                        mgmt.clone(),
                        healer.clone(),
                        cfg.rank,
                        cfg.heal.ec_aggregation_rate,
                        pools_rx.clone(),
                        handles.clone(),
                    );
                    aggregating = Some(tokio::spawn(agg.run(stop.clone())));
                }
                healing = Some(tokio::spawn(healer.run(pools_rx, stop.clone())));
                heartbeats = Some(tokio::spawn(membership::heartbeat_loop(mgmt, req, engine.clone(), learned, interval, stop.clone())));
            }
        }
        server::announce(addr, cfg.rank, handles.len());
        let server = tokio::spawn(server::serve(engine.clone(), listener, stop.clone()));
        stop.cancelled().await;
        if let Ok(Err(e)) = signalled.await {
            return Err(RunError::Start(e));
        }
        if let Some(h) = heartbeats {
            let _ = h.await;
        }
        if let Some(h) = healing {
            let _ = h.await;
        }
        if let Some(h) = scrubbing {
            let _ = h.await;
        }
        if let Some(h) = aggregating {
            let _ = h.await;
        }
        info!("stopping: committing queued updates and writing checkpoints");
        engine.shutting_down.store(true, Ordering::Relaxed);
        stop.cancel();
        let _ = server.await;
        for (i, h) in handles.iter().enumerate() {
            match h.shutdown().await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => warn!(target = i, error = %e, "final checkpoint failed; the WAL still holds everything"),
                Err(_) => warn!(target = i, "target thread had already stopped"),
            }
        }
        Ok::<(), RunError>(())
    })?;
    drop(engine);
    drop(handles);
    for t in threads {
        let _ = t.join();
    }
    info!("stopped");
    Ok(())
}

async fn wait_for_signal() -> std::io::Result<()> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    Ok(())
}

/// Takes an exclusive lock on the data directory so two engines never share it.
fn lock_data_dir(cfg: &EngineConfig) -> Result<File, RunError> {
    let dir = &cfg.data_dir;
    let err = |message: String| RunError::DataDir { dir: dir.clone(), message };
    std::fs::create_dir_all(dir).map_err(|e| err(format!("cannot create: {e}")))?;
    let file = File::create(dir.join("LOCK")).map_err(|e| err(format!("cannot create LOCK: {e}")))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => Err(err("in use by another tessera-engine (LOCK is held)".into())),
        Err(std::fs::TryLockError::Error(e)) => Err(err(format!("cannot lock: {e}"))),
    }
}

/// Records the rank and target count on first start and refuses a configuration that
/// disagrees with the data already there.
fn check_identity(cfg: &EngineConfig) -> Result<(), RunError> {
    let path = cfg.data_dir.join("ENGINE");
    let want = format!("rank = {}\ntargets = {}\n", cfg.rank, cfg.targets);
    match std::fs::read_to_string(&path) {
        Ok(have) if have == want => Ok(()),
        Ok(have) => Err(RunError::DataDir {
            dir: cfg.data_dir.clone(),
            message: format!(
                "holds data of another engine layout ({}), configuration says ({})",
                have.trim().replace('\n', ", "),
                want.trim().replace('\n', ", ")
            ),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let tmp = cfg.data_dir.join("ENGINE.tmp");
            std::fs::write(&tmp, &want)
                .and_then(|()| File::open(&tmp)?.sync_all())
                .and_then(|()| std::fs::rename(&tmp, &path))
                .and_then(|()| File::open(&cfg.data_dir)?.sync_all())
                .map_err(|e| RunError::DataDir { dir: cfg.data_dir.clone(), message: format!("cannot write ENGINE: {e}") })
        }
        Err(e) => Err(RunError::DataDir { dir: cfg.data_dir.clone(), message: format!("cannot read ENGINE: {e}") }),
    }
}
