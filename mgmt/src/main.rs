//! `tessera-mgmt`: the management service daemon.
//!
//! Opens (creating if needed) its redb database — or, with `--store etcd:…`, the state in etcd
//! shared with other services, of which one is elected leader (`tessera_mgmt::leader`) — serves
//! the HTTP/JSON API on `--listen`, marks engines that stop heartbeating Down (the leader), and
//! exits cleanly on SIGTERM/SIGINT (resigning the leadership). `kill -9` is safe: every change
//! was durable before it was answered.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use tessera_mgmt::http::{self, App};
use tessera_mgmt::leader;
use tessera_mgmt::parse_duration;
use tessera_mgmt::service::{self, Service, ServiceConfig};
use tessera_mgmt::store::{RedbStore, StoreError};
use tessera_mgmt::store_etcd::{parse_endpoints, EtcdStore};
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
    /// Database file (redb), created if missing: the state of a single service.
    #[arg(long, default_value = "./tessera-mgmt.redb")]
    db: PathBuf,
    /// Keep the state in etcd instead (`etcd:http://HOST:PORT[,http://HOST:PORT…]`): several
    /// services may then share it; one is elected leader, the others follow.
    #[arg(long, value_name = "etcd:URLS")]
    store: Option<String>,
    /// Key prefix of this system's state in etcd.
    #[arg(long, default_value = tessera_mgmt::store_etcd::DEFAULT_ROOT)]
    etcd_root: String,
    /// The address other processes reach this service's API at (etcd mode: the leader's
    /// address followers redirect to). Default: the listen address.
    #[arg(long)]
    advertise: Option<String>,
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
    #[error("--store {0}")]
    StoreSpec(String),
    #[error("{0}")]
    Advertise(String),
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
    let etcd = match &args.store {
        Some(spec) => {
            let endpoints = parse_endpoints(spec).map_err(RunError::StoreSpec)?;
            Some(Arc::new(EtcdStore::connect(&endpoints, &args.etcd_root)?))
        }
        None => None,
    };
    let config = ServiceConfig {
        heartbeat_timeout: args.heartbeat_timeout,
        heartbeat_interval: args.heartbeat_interval,
        auto_reintegrate: !args.manual_reintegration,
        floor_lag: args.reintegration_floor_lag,
        reintegration_window: args.reintegration_window,
    };
    let svc = Arc::new(match &etcd {
        Some(e) => Service::open_follower(e.clone(), config)?,
        None => Service::open(Arc::new(RedbStore::open(&args.db)?), config)?,
    });
    let store_name = match &etcd {
        Some(e) => format!("etcd:{}", e.endpoints().join(",")),
        None => args.db.display().to_string(),
    };
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().map_err(RunError::Start)?;
    rt.block_on(async {
        // Handlers first: a signal that arrives once the listening line is out must stop cleanly.
        let mut term = signal(SignalKind::terminate()).map_err(RunError::Start)?;
        let mut int = signal(SignalKind::interrupt()).map_err(RunError::Start)?;
        let listener = TcpListener::bind(&args.listen).await.map_err(|source| RunError::Listen { addr: args.listen.clone(), source })?;
        let addr = listener.local_addr().map_err(RunError::Start)?;
        let snap = svc.snapshot();
        info!(%addr, store = %store_name, version = snap.version, engines = snap.state.engines.len(), pools = snap.state.pools.len(), auto_reintegrate = config.auto_reintegrate, "mgmt listening");
        let stop = CancellationToken::new();
        let mut ha = Vec::new();
        if let Some(e) = &etcd {
            let me = match &args.advertise {
                Some(a) => a.clone(),
                // Followers send clients here: an unspecified address reaches nothing.
                None if addr.ip().is_unspecified() => {
                    return Err(RunError::Advertise(format!("listening on {addr} with etcd needs --advertise ADDR (the address other processes reach this service at)")));
                }
                None => addr.to_string(),
            };
            let root = args.etcd_root.clone();
            ha.push(tokio::spawn(leader::follow_store(e.client(), e.version_key(), svc.clone(), stop.clone())));
            ha.push(tokio::spawn(leader::watch_leader(e.client(), root.clone(), svc.clone(), stop.clone())));
            ha.push(tokio::spawn(leader::campaign(e.client(), root, me, svc.clone(), stop.clone())));
        }
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
        for t in ha {
            let _ = t.await;
        }
        match server.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(RunError::Serve(e)),
            Err(e) => return Err(RunError::Serve(std::io::Error::other(e))),
        }
        Ok(())
    })
}
