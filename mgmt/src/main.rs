//! `tessera-mgmt`: the management service daemon.
//!
//! Opens (creating if needed) its redb database, serves the HTTP/JSON API on `--listen`, marks
//! engines that stop heartbeating Down, and exits cleanly on SIGTERM/SIGINT. `kill -9` is safe:
//! every change was durable before it was answered.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use tessera_mgmt::http::{self, App};
use tessera_mgmt::parse_duration;
use tessera_mgmt::service::{self, Service, ServiceConfig};
use tessera_mgmt::store::{RedbStore, StoreError};
use tokio::net::TcpListener;
use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;
use tracing::info;

/// Tessera management service: system map, pools, volumes, exports.
#[derive(clap::Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Address to serve the HTTP API on (`ip:port`; port 0 picks a free one).
    #[arg(long, default_value = tessera_mgmt_api::DEFAULT_MGMT_ADDR)]
    listen: String,
    /// Database file (redb), created if missing.
    #[arg(long, default_value = "./tessera-mgmt.redb")]
    db: PathBuf,
    /// An engine silent this long is marked DOWN (e.g. 500ms, 5s).
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    heartbeat_timeout: Duration,
    /// How often engines are asked to heartbeat (e.g. 1s).
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    heartbeat_interval: Duration,
    /// An engine that comes back keeps its targets out (DOWN/DOWNOUT) until the operator runs
    /// `tessera pool reintegrate`; by default they are reintegrated at its registration.
    #[arg(long)]
    manual_reintegration: bool,
    /// A target marked DOWN is later refilled with what changed above the epoch this long
    /// before the marking; it must exceed the clients' write retry deadline (25 s).
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    reintegration_floor_lag: Duration,
    /// A target out longer than this (DOWNOUT) is no longer reintegrated incrementally: engines
    /// stop holding aggregation for it, and its return is a full rebuild.
    #[arg(long, default_value = "24h", value_parser = parse_duration)]
    reintegration_window: Duration,
}

#[derive(Debug, thiserror::Error)]
enum RunError {
    #[error("{0}")]
    Store(#[from] StoreError),
    #[error("cannot listen on {addr}: {source}")]
    Listen { addr: String, source: std::io::Error },
    #[error("cannot start: {0}")]
    Start(std::io::Error),
    #[error("server failed: {0}")]
    Serve(std::io::Error),
}

fn main() -> ExitCode {
    let args = match tessera_cli_support::parse_args::<Args>("tessera-mgmt") {
        Ok(a) => a,
        Err(code) => return code,
    };
    tessera_cli_support::init_logging();
    tessera_cli_support::exit_status("tessera-mgmt", run(args))
}

fn run(args: Args) -> Result<(), RunError> {
    let store = RedbStore::open(&args.db)?;
    let config = ServiceConfig {
        heartbeat_timeout: args.heartbeat_timeout,
        heartbeat_interval: args.heartbeat_interval,
        auto_reintegrate: !args.manual_reintegration,
        floor_lag: args.reintegration_floor_lag,
        reintegration_window: args.reintegration_window,
    };
    let svc = Arc::new(Service::open(Arc::new(store), config)?);
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().map_err(RunError::Start)?;
    rt.block_on(async {
        // Handlers first: a signal that arrives once the listening line is out must stop cleanly.
        let mut term = signal(SignalKind::terminate()).map_err(RunError::Start)?;
        let mut int = signal(SignalKind::interrupt()).map_err(RunError::Start)?;
        let listener = TcpListener::bind(&args.listen).await.map_err(|source| RunError::Listen { addr: args.listen.clone(), source })?;
        let addr = listener.local_addr().map_err(RunError::Start)?;
        let snap = svc.snapshot();
        info!(%addr, db = %args.db.display(), version = snap.version, engines = snap.state.engines.len(), pools = snap.state.pools.len(), auto_reintegrate = config.auto_reintegrate, "mgmt listening");
        let stop = CancellationToken::new();
        let monitor = tokio::spawn(service::monitor(svc.clone(), stop.clone()));
        let app = App::new(svc.clone(), stop.clone());
        let server = axum::serve(listener, http::router(app)).with_graceful_shutdown(stop.clone().cancelled_owned());
        let server = tokio::spawn(async move { server.await });
        tokio::select! {
            _ = term.recv() => info!("SIGTERM: stopping"),
            _ = int.recv() => info!("SIGINT: stopping"),
        }
        stop.cancel();
        let _ = monitor.await;
        match server.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(RunError::Serve(e)),
            Err(e) => return Err(RunError::Serve(std::io::Error::other(e))),
        }
        Ok(())
    })
}
