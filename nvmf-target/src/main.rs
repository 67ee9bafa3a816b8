//! `tessera-nvmf`: the NVMe/TCP target daemon.
//!
//! With no arguments it serves the built-in default (one subsystem any host may use, one 1 GiB
//! malloc namespace, 127.0.0.1:4420). `--config FILE` serves a TOML configuration; SIGHUP reloads
//! that file (namespaces added, grown or removed, subsystems added or removed, host lists changed)
//! and SIGINT/SIGTERM stop the target. `--mgmt ADDR` (or `[mgmt] address` in the file) adds the
//! management service's exports for this target's listen addresses (managed mode, see
//! `tessera_nvmf::managed`); without a file it then serves only those. `--listen ADDR` (repeatable)
//! replaces the file's listen addresses; port 0 picks a free port, and the log line
//! `listening addr=…` says which.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use tessera_nvmf::config::{Config, MgmtConfig};
use tessera_nvmf::managed::Manager;
use tessera_nvmf::server;
use tessera_nvmf::target::Target;
use tokio::net::TcpListener;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{error, info};

/// Tessera NVMe/TCP target.
#[derive(clap::Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Configuration file (TOML). Without it, the built-in default is served (or, with --mgmt,
    /// only the management service's exports).
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Management service address (host:port): serve the volumes it exports to this target's
    /// listen addresses. Overrides the file's [mgmt] address.
    #[arg(long, value_name = "ADDR")]
    mgmt: Option<String>,
    /// Address to listen on (ip:port; repeatable). Replaces the file's listen list.
    #[arg(long, value_name = "ADDR")]
    listen: Vec<SocketAddr>,
    /// Print the built-in default configuration as TOML and exit.
    #[arg(long)]
    print_default_config: bool,
    /// Worker threads for the async runtime (default: one per CPU).
    #[arg(long)]
    threads: Option<usize>,
}

#[derive(Debug, thiserror::Error)]
enum RunError {
    #[error(transparent)]
    Config(#[from] tessera_nvmf::config::ConfigError),
    #[error("cannot listen on {addr}: {source}")]
    Listen { addr: std::net::SocketAddr, source: std::io::Error },
    #[error("cannot start the runtime: {0}")]
    Runtime(std::io::Error),
}

fn main() -> ExitCode {
    let args = match tessera_cli_support::parse_args::<Args>("tessera-nvmf") {
        Ok(a) => a,
        Err(code) => return code,
    };
    tessera_cli_support::init_logging();
    tessera_cli_support::exit_status("tessera-nvmf", run(args))
}

fn run(args: Args) -> Result<(), RunError> {
    if args.print_default_config {
        print!("{}", Config::default().to_toml());
        return Ok(());
    }
    let mut cfg = match &args.config {
        Some(p) => Config::load(p)?,
        None if args.mgmt.is_some() => Config::empty(),
        None => Config::default(),
    };
    if !args.listen.is_empty() {
        cfg.listen.clone_from(&args.listen);
    }
    if let Some(address) = &args.mgmt {
        cfg.mgmt = Some(MgmtConfig { address: address.clone() });
    }
    cfg.validate()?;
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    rt.enable_all();
    if let Some(n) = args.threads {
        rt.worker_threads(n.max(1));
    }
    let rt = rt.build().map_err(RunError::Runtime)?;
    rt.block_on(serve(cfg, args.config))
}

async fn serve(mut cfg: Config, path: Option<PathBuf>) -> Result<(), RunError> {
    // Bind first: the target (discovery log, which exports are ours) needs the real addresses
    // when a port was 0.
    let mut listeners = Vec::new();
    for addr in &cfg.listen {
        let l = TcpListener::bind(addr).await.map_err(|source| RunError::Listen { addr: *addr, source })?;
        let bound = l.local_addr().map_err(|source| RunError::Listen { addr: *addr, source })?;
        listeners.push((bound, l));
    }
    cfg.listen = listeners.iter().map(|(a, _)| *a).collect();
    let target = Arc::new(Target::new(&cfg)?);
    let shutdown = CancellationToken::new();
    let mut tasks = Vec::new();
    for (addr, l) in listeners {
        info!(%addr, "listening");
        tasks.push(tokio::spawn(server::serve(l, target.clone(), shutdown.clone())));
    }
    for s in &cfg.subsystems {
        info!(nqn = %s.nqn, namespaces = s.namespaces.len(), allow_any_host = s.allow_any_host, "subsystem ready");
    }
    let mut poke: Option<Arc<Notify>> = None;
    if let Some(m) = &cfg.mgmt {
        let manager = Manager::new(target.clone(), &m.address);
        poke = Some(manager.poke_handle());
        info!(mgmt = %m.address, "managed mode: serving the management service's exports");
        tasks.push(tokio::spawn(manager.run(shutdown.clone())));
    }
    let mut hup = signal(SignalKind::hangup()).map_err(RunError::Runtime)?;
    let mut term = signal(SignalKind::terminate()).map_err(RunError::Runtime)?;
    loop {
        tokio::select! {
            _ = hup.recv() => reload(&target, path.as_deref(), poke.as_deref()),
            _ = term.recv() => break,
            _ = tokio::signal::ctrl_c() => break,
        }
    }
    info!("shutting down");
    shutdown.cancel();
    for t in tasks {
        let _ = t.await;
    }
    Ok(())
}

fn reload(target: &Target, path: Option<&std::path::Path>, poke: Option<&Notify>) {
    if let Some(p) = poke {
        info!("SIGHUP: asking the management service for its exports");
        p.notify_one();
    }
    let Some(path) = path else {
        if poke.is_none() {
            info!("SIGHUP ignored: serving the built-in default, no file to reload");
        }
        return;
    };
    match Config::load(path).and_then(|cfg| target.reload(&cfg)) {
        Ok(s) => {
            info!(added = ?s.added_subsystems, removed = ?s.removed_subsystems, namespaces = ?s.changed_namespaces, "configuration reloaded")
        }
        Err(e) => error!("configuration reload failed, keeping the running configuration: {e}"),
    }
}
