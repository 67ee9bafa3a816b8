//! `tessera up`: a whole Tessera system on this machine, each daemon a separate process as it
//! would be on separate machines — the management service, N engines, the NVMe/TCP target in
//! managed mode — plus a pool, a volume and its export, so that a host can connect at once.
//!
//! Everything lives under `--dir`: `mgmt.redb`, `engine-<rank>/engine.toml` and
//! `engine-<rank>/data/`, and `logs/<name>.log` (every child's stdout and stderr, appended). A
//! second `tessera up` on the same directory reuses all of it. The children run in their own
//! process groups, so a Ctrl-C reaches only `tessera up`, which stops them in order: the target,
//! then the management service (so it does not mark the engines DOWN while they stop), then the
//! engines.

use std::fs::File;
use std::net::{SocketAddr, TcpListener};
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use clap::Args;
use tessera_mgmt_api::{
    CreateExport, CreatePool, CreateVhostExport, CreateVolume, EngineState, ExportInfo, MgmtClient, MgmtError, PoolInfo, VhostExportInfo,
    VolumeInfo,
};
use tessera_nvme_proto::Digests;
use tessera_nvmf_host::{Controller, ControllerOptions};

use crate::mgmt::{error_text, size_text};
use crate::report::parse_size64;

#[path = "up_etcd.rs"]
mod etcd;
#[path = "up_netns.rs"]
mod netns;
#[path = "up_procs.rs"]
mod procs;
#[path = "up_summary.rs"]
mod summary;
use procs::{startup_timeout, status_text, Procs, Signals};
use summary::print_summary;

/// `tessera up` options.
#[derive(Args, Debug)]
pub struct UpArgs {
    /// Directory for the service's database, the engines' data and the logs (reused next time).
    #[arg(long, default_value = "./tessera-data")]
    dir: PathBuf,
    /// Number of engines (ranks 0..N).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=64))]
    engines: u32,
    /// Targets per engine.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=64))]
    targets: u16,
    /// Data file size of each target, reserved on the file system when the target is created, e.g. 4G, 512M.
    #[arg(long, default_value = "4G", value_parser = parse_size64)]
    target_capacity: u64,
    /// Size of the volume `vol0` when it is created.
    #[arg(long, default_value = "1G", value_parser = parse_size64)]
    volume_size: u64,
    /// Object class of the pool and of `vol0` when they are created (S1, RP_<n>, EC_<k>P<p>).
    #[arg(long, default_value = "EC_2P1")]
    class: String,
    /// Address the NVMe/TCP target listens on.
    #[arg(long, default_value = "127.0.0.1:4420")]
    listen: SocketAddr,
    /// Another path to the volume: one more NVMe/TCP target, listening here, serves the same
    /// subsystem (ANA multipath; the target on --listen is the optimized path). Repeatable.
    #[arg(long = "path", value_name = "ADDR")]
    paths: Vec<SocketAddr>,
    /// Address the management service listens on.
    #[arg(long, default_value = tessera_mgmt_api::DEFAULT_MGMT_ADDR)]
    mgmt_listen: SocketAddr,
    /// Engine <rank> listens on 127.0.0.1:<this port + rank>.
    #[arg(long, default_value_t = 7410)]
    engine_base_port: u16,
    /// Subsystem NQN the volume is exported as.
    #[arg(long, default_value = "nqn.2026-11.io.tessera:vol0")]
    nqn: String,
    /// Most bytes per second each engine writes into rebuilt shards (`[heal] rebuild_rate` in
    /// the engine configurations), e.g. 1G; default: the engine's own (64 MiB/s).
    #[arg(long, value_parser = parse_rebuild_rate)]
    rebuild_rate: Option<u64>,
    /// The same while hosts do I/O on the engine (`[heal] rebuild_rate_busy`; at most
    /// `--rebuild-rate` is used); default: the engine's own (8 MiB/s).
    #[arg(long, value_parser = parse_rebuild_rate)]
    rebuild_rate_busy: Option<u64>,
    /// How long each start-up step (service up, engines registered, target serving) may take,
    /// seconds.
    #[arg(long, default_value_t = 60)]
    timeout: u64,
    /// Also serve the volume to a VM as a vhost-user-blk disk on this UNIX socket (QEMU:
    /// `-chardev socket,id=vblk,path=PATH -device vhost-user-blk-pci,chardev=vblk` with shared
    /// guest memory).
    #[arg(long, value_name = "PATH")]
    vhost_blk: Option<std::path::PathBuf>,
    /// Keep the management state in a local 3-member etcd cluster (`etcd-server`) shared by two
    /// management services (the second on --mgmt-listen's port + 1): one is elected leader,
    /// the other follows and takes over if it dies.
    #[arg(long)]
    etcd: bool,
    /// Client port of the first etcd member (each member takes two consecutive ports).
    #[arg(long, default_value_t = 2379)]
    etcd_base_port: u16,
    /// Several machines on one: every engine and every NVMe/TCP target in a network namespace
    /// of its own with its own address, joined by a bridge to this namespace (the management
    /// service's and the host's). Needs root and iproute2. The ports of --mgmt-listen, --listen,
    /// --path and --engine-base-port are kept; the addresses come from --netns-subnet.
    #[arg(long)]
    netns: bool,
    /// The /24 of --netns (`A.B.C`): the bridge is .1, engine r is .(10+r), target i .(100+i).
    #[arg(long, default_value = "10.88.0")]
    netns_subnet: String,
}

/// A rebuild rate: a size per second, at least what the engine accepts (64 KiB).
fn parse_rebuild_rate(s: &str) -> Result<u64, String> {
    parse_size64(s).and_then(|n| if n >= 64 << 10 { Ok(n) } else { Err(format!("{s:?} is below the engine's lowest rebuild rate, 64K")) })
}

const POOL: &str = "default";
const VOLUME: &str = "vol0";
/// A second signal sooner than this after the first is the same request.
const SIGNAL_DEBOUNCE: Duration = Duration::from_secs(2);
/// Log lines shown when a child fails.
const TAIL_LINES: usize = 20;

/// Runs `tessera up` until SIGINT/SIGTERM.
pub fn run(a: UpArgs) -> Result<String, String> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| format!("cannot start the runtime: {e}"))?;
    rt.block_on(up(a)).map(|()| String::new())
}

/// The daemons this command starts.
#[derive(Debug)]
struct Binaries {
    mgmt: PathBuf,
    engine: PathBuf,
    nvmf: PathBuf,
    /// With --etcd.
    etcd: Option<PathBuf>,
}

/// Finds `name` next to the running `tessera`, else on PATH.
fn locate(name: &str) -> Result<PathBuf, String> {
    let exe = std::env::current_exe().ok();
    if let Some(p) = exe.as_ref().and_then(|e| e.parent()).map(|d| d.join(name)).filter(|p| p.is_file()) {
        return Ok(p);
    }
    if let Some(p) = std::env::var_os("PATH").iter().flat_map(std::env::split_paths).map(|d| d.join(name)).find(|p| p.is_file()) {
        return Ok(p);
    }
    let here = exe.as_ref().and_then(|e| e.parent()).map_or_else(|| "tessera".to_string(), |d| d.display().to_string());
    Err(format!("cannot find {name}: not in {here} nor on PATH (build it: cargo build --release --bins)"))
}

/// Where the client reaches a service listening on `addr`.
fn reach(addr: SocketAddr) -> SocketAddr {
    if addr.ip().is_unspecified() {
        SocketAddr::new(std::net::Ipv4Addr::LOCALHOST.into(), addr.port())
    } else {
        addr
    }
}

/// Refuses to start when a port this run needs is taken (a daemon that cannot listen would exit,
/// but a service already answering there would be mistaken for ours).
fn check_free(what: &str, addr: SocketAddr) -> Result<(), String> {
    TcpListener::bind(addr).map(drop).map_err(|e| format!("{what} address {addr} is not available ({e}): is another tessera up running?"))
}

/// The processes by role.
#[derive(Debug, Default)]
struct Roles {
    mgmt: Vec<usize>,
    engines: Vec<usize>,
    nvmf: Vec<usize>,
    etcd: Vec<usize>,
}

/// What start-up made or found.
#[derive(Debug)]
struct Ready {
    pool: PoolInfo,
    volume: VolumeInfo,
    export: ExportInfo,
    vhost: Option<VhostExportInfo>,
    notes: Vec<String>,
}

async fn up(mut a: UpArgs) -> Result<(), String> {
    if a.class.trim().is_empty() {
        return Err("--class is empty".into());
    }
    for (flag, addr) in [("--mgmt-listen", a.mgmt_listen), ("--listen", a.listen)].into_iter().chain(a.paths.iter().map(|p| ("--path", *p)))
    {
        if addr.port() == 0 {
            return Err(format!("{flag} {addr}: give a port (clients need to know it)"));
        }
    }
    let bins = Binaries {
        mgmt: locate("tessera-mgmt")?,
        engine: locate("tessera-engine")?,
        nvmf: locate("tessera-nvmf")?,
        etcd: if a.etcd { Some(etcd::locate()?) } else { None },
    };
    std::fs::create_dir_all(a.dir.join("logs")).map_err(|e| format!("cannot create {}: {e}", a.dir.join("logs").display()))?;
    let dir = a.dir.canonicalize().map_err(|e| format!("{}: {e}", a.dir.display()))?;
    let lock_path = dir.join("up.lock");
    let lock = File::create(&lock_path).map_err(|e| format!("cannot create {}: {e}", lock_path.display()))?;
    match lock.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => return Err(format!("{} is in use by another tessera up", dir.display())),
        Err(std::fs::TryLockError::Error(e)) => return Err(format!("cannot lock {}: {e}", lock_path.display())),
    }
    let mut engine_addrs: Vec<SocketAddr> = (0..a.engines)
        .map(|r| {
            u16::try_from(r)
                .ok()
                .and_then(|r| a.engine_base_port.checked_add(r))
                .map(|port| SocketAddr::new(std::net::Ipv4Addr::LOCALHOST.into(), port))
                .ok_or_else(|| format!("--engine-base-port {} leaves no port for rank {r}", a.engine_base_port))
        })
        .collect::<Result<_, _>>()?;
    // --netns: the same ports at the namespaces' addresses; the network is made now (its
    // namespaces are new, so only the bridge's address can be taken).
    let net = if a.netns {
        let net = netns::Net::plan(&dir, netns::parse_subnet(&a.netns_subnet)?, a.engines, 1 + a.paths.len())?;
        a.mgmt_listen = netns::Net::at(net.gateway, a.mgmt_listen.port());
        engine_addrs = engine_addrs.iter().zip(&net.engines).map(|(e, s)| netns::Net::at(s.ip, e.port())).collect();
        a.listen = netns::Net::at(net.targets[0].ip, a.listen.port());
        for (p, s) in a.paths.iter_mut().zip(&net.targets[1..]) {
            *p = netns::Net::at(s.ip, p.port());
        }
        if let Err(e) = net.create() {
            net.remove();
            return Err(e);
        }
        eprintln!(
            "tessera up: made bridge {} ({}/24) and {} network namespaces",
            net.bridge,
            net.gateway,
            net.engines.len() + net.targets.len()
        );
        Some(net)
    } else {
        None
    };
    let r = up_on(&a, &dir, &bins, &engine_addrs, net.as_ref()).await;
    if let Some(n) = &net {
        n.remove();
    }
    r
}

async fn up_on(a: &UpArgs, dir: &Path, bins: &Binaries, engine_addrs: &[SocketAddr], net: Option<&netns::Net>) -> Result<(), String> {
    check_free("management service", a.mgmt_listen)?;
    if a.etcd {
        check_free("second management service", second_mgmt(a.mgmt_listen)?)?;
        for m in etcd::members(a.etcd_base_port)? {
            check_free(&format!("{} client", m.name), m.client)?;
            check_free(&format!("{} peer", m.name), m.peer)?;
        }
    }
    for p in &a.paths {
        if *p == a.listen || a.paths.iter().filter(|q| *q == p).count() > 1 {
            return Err(format!("--path {p} is named twice"));
        }
    }
    if net.is_none() {
        for (r, addr) in engine_addrs.iter().enumerate() {
            check_free(&format!("engine {r}"), *addr)?;
        }
        for addr in std::iter::once(&a.listen).chain(&a.paths) {
            check_free("NVMe/TCP target", *addr)?;
        }
    }

    let mut signals = Signals::new()?;
    let mut procs = Procs::new(dir.join("logs"));
    let mut roles = Roles::default();
    let started = {
        let fut = start(a, dir, bins, engine_addrs, net, &mut procs, &mut roles);
        tokio::pin!(fut);
        tokio::select! {
            r = &mut fut => r.map_err(Some),
            sig = signals.recv() => {
                eprintln!("tessera up: {sig} during start-up: stopping");
                Err(None)
            }
        }
    };
    let ready = match started {
        Ok(r) => r,
        Err(e) => {
            shutdown(&mut procs, &roles, &mut signals).await;
            return Err(e.unwrap_or_else(|| "interrupted during start-up".into()));
        }
    };
    print_summary(a, dir, &procs, &ready, net);

    // Running: report children that die (an operator testing degraded mode kill -9s an engine)
    // and keep the others going until we are told to stop.
    let sig = loop {
        tokio::select! {
            sig = signals.recv() => break sig,
            exit = procs.rx.recv() => {
                let Some((idx, status)) = exit else { continue };
                if let Some(p) = procs.record(idx, status) {
                    eprintln!(
                        "tessera up: {} (pid {}) exited: {}; the others keep running (log: {})",
                        p.name, p.pid, status_text(status), p.log.display()
                    );
                }
                if !procs.any_running() {
                    return Err("every process has exited".into());
                }
            }
        }
    };
    eprintln!("tessera up: {sig}: stopping the target, the management service, then the engines");
    if shutdown(&mut procs, &roles, &mut signals).await {
        eprintln!("tessera up: stopped; data kept in {}", dir.display());
        Ok(())
    } else {
        Err("some processes had to be killed".into())
    }
}

/// Stops the target, then the management service, then the engines.
async fn shutdown(procs: &mut Procs, roles: &Roles, signals: &mut Signals) -> bool {
    let since = Instant::now();
    let a = procs.stop(&roles.nvmf, Duration::from_secs(10), signals, since).await;
    let b = procs.stop(&roles.mgmt, Duration::from_secs(10), signals, since).await;
    let c = procs.stop(&roles.engines, Duration::from_secs(60), signals, since).await;
    let d = procs.stop(&roles.etcd, Duration::from_secs(10), signals, since).await;
    a && b && c && d
}

/// Where the second management service of `--etcd` listens: the first's port + 1.
fn second_mgmt(first: SocketAddr) -> Result<SocketAddr, String> {
    first
        .port()
        .checked_add(1)
        .map(|p| SocketAddr::new(first.ip(), p))
        .ok_or_else(|| format!("--mgmt-listen {first} leaves no port for a second service"))
}

/// A TOML basic string (JSON string escapes are valid TOML).
fn toml_str(s: &str) -> String {
    serde_json::Value::String(s.to_string()).to_string()
}

async fn start(
    a: &UpArgs,
    dir: &Path,
    bins: &Binaries,
    engine_addrs: &[SocketAddr],
    net: Option<&netns::Net>,
    procs: &mut Procs,
    roles: &mut Roles,
) -> Result<Ready, String> {
    // In its namespace with --netns.
    let program = |space: Option<&netns::Space>, exe: &Path, args: Vec<String>| match space {
        Some(s) => netns::Net::wrap(s, exe, &args),
        None => (exe.to_path_buf(), args),
    };
    let timeout = Duration::from_secs(a.timeout.max(1));
    let mut listens = vec![a.mgmt_listen];
    if a.etcd {
        listens.push(second_mgmt(a.mgmt_listen)?);
    }
    let mgmt_addr = listens.iter().map(|l| reach(*l).to_string()).collect::<Vec<_>>().join(",");
    let client = MgmtClient::new(&mgmt_addr);
    let call = |e: MgmtError| error_text(&e, &mgmt_addr);

    // 1. The management service (with --etcd: the etcd members, then two services sharing
    //    them; the first is elected leader before the second starts).
    let mut store = vec!["--db".to_string(), dir.join("mgmt.redb").display().to_string()];
    if let Some(bin) = &bins.etcd {
        let members = etcd::members(a.etcd_base_port)?;
        for m in &members {
            roles.etcd.push(procs.spawn(&m.name, bin, &etcd::args(m, &members, dir))?);
        }
        let deadline = Instant::now() + timeout;
        for m in &members {
            if !etcd::wait_listening(m.client, deadline).await {
                procs.check_startup()?;
                return Err(startup_timeout(procs, &roles.etcd, &format!("{} does not serve clients on {}", m.name, m.client)));
            }
        }
        eprintln!("tessera up: started {} etcd members on {}..", members.len(), a.etcd_base_port);
        store = vec!["--store".to_string(), etcd::store_spec(&members)];
    }
    for (i, listen) in listens.iter().enumerate() {
        let mut args = vec!["--listen".to_string(), listen.to_string()];
        args.extend(store.iter().cloned());
        let name = if i == 0 { "mgmt".to_string() } else { format!("mgmt-{}", i + 1) };
        roles.mgmt.push(procs.spawn(&name, &bins.mgmt, &args)?);
        eprintln!("tessera up: started tessera-mgmt on {listen}");
        let one = MgmtClient::new(&reach(*listen).to_string());
        let deadline = Instant::now() + timeout;
        loop {
            procs.check_startup()?;
            match one.service_role().await {
                // The first must lead before the second starts (so which one leads is known).
                Ok(r) if r.leader || i > 0 => break,
                Ok(_) => {}
                Err(MgmtError::Unreachable { .. }) => {}
                Err(e) => return Err(startup_timeout(procs, &roles.mgmt, &format!("the management service did not answer: {}", call(e)))),
            }
            if Instant::now() >= deadline {
                return Err(startup_timeout(
                    procs,
                    &roles.mgmt,
                    &format!("the management service on {listen} did not answer within {timeout:?}"),
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    // 2. The engines: they register with the service and heartbeat.
    for (rank, addr) in engine_addrs.iter().enumerate() {
        let edir = dir.join(format!("engine-{rank}"));
        std::fs::create_dir_all(&edir).map_err(|e| format!("cannot create {}: {e}", edir.display()))?;
        let mut config = format!(
            "# Written by tessera up at every start.\nrank = {rank}\nlisten = \"{addr}\"\ndata_dir = {}\ntargets = {}\ntarget_capacity = {}\n\n[mgmt]\naddress = {}\n",
            toml_str(&edir.join("data").display().to_string()),
            a.targets,
            a.target_capacity,
            toml_str(&mgmt_addr),
        );
        if a.rebuild_rate.is_some() || a.rebuild_rate_busy.is_some() {
            config.push_str("\n[heal]\n");
        }
        if let Some(rate) = a.rebuild_rate {
            config.push_str(&format!("rebuild_rate = {rate}\n"));
        }
        if let Some(rate) = a.rebuild_rate_busy {
            config.push_str(&format!("rebuild_rate_busy = {rate}\n"));
        }
        let path = edir.join("engine.toml");
        std::fs::write(&path, config).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        let (exe, args) = program(net.and_then(|n| n.engines.get(rank)), &bins.engine, vec!["--config".into(), path.display().to_string()]);
        roles.engines.push(procs.spawn(&format!("engine-{rank}"), &exe, &args)?);
    }
    eprintln!(
        "tessera up: started {} engines on {}..; waiting for them to register",
        engine_addrs.len(),
        engine_addrs.first().map_or(String::new(), |a| a.to_string())
    );
    let deadline = Instant::now() + timeout;
    loop {
        procs.check_startup()?;
        let sys = match client.system().await {
            Ok(s) => s,
            Err(e) => {
                // The service may have just died: say so, with its log, rather than "unreachable".
                tokio::time::sleep(Duration::from_millis(300)).await;
                procs.check_startup()?;
                return Err(call(e));
            }
        };
        let missing: Vec<String> = (0..a.engines)
            .filter(|&r| !sys.engines.iter().any(|e| e.rank == r && e.state == EngineState::Up && e.last_heartbeat_ms.is_some()))
            .map(|r| r.to_string())
            .collect();
        if missing.is_empty() {
            break;
        }
        if Instant::now() >= deadline {
            let idxs: Vec<usize> =
                missing.iter().filter_map(|r| r.parse::<usize>().ok()).filter_map(|r| roles.engines.get(r).copied()).collect();
            return Err(startup_timeout(procs, &idxs, &format!("engine(s) {} did not register within {timeout:?}", missing.join(", "))));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // 3. Pool, volume, export: created once, found again on later runs.
    let mut notes = Vec::new();
    let pool = match client.pools().await.map_err(call)?.into_iter().find(|p| p.name == POOL) {
        Some(p) => p,
        None => client
            .create_pool(&CreatePool { name: POOL.into(), ranks: (0..a.engines).collect(), default_class: Some(a.class.clone()) })
            .await
            .map_err(|e| format!("creating pool {POOL}: {}", call(e)))?,
    };
    let volume = match client.volumes(POOL).await.map_err(call)?.into_iter().find(|v| v.name == VOLUME) {
        Some(v) => {
            if v.size != a.volume_size || v.class != a.class {
                notes.push(format!(
                    "volume {VOLUME} already exists ({}, {}); --volume-size and --class apply only when it is created",
                    size_text(v.size),
                    v.class
                ));
            }
            v
        }
        None => client
            .create_volume(
                POOL,
                &CreateVolume {
                    name: VOLUME.into(),
                    size: a.volume_size,
                    block_size: None,
                    class: Some(a.class.clone()),
                    cell_size: None,
                    chunk_size: None,
                    checksum: None,
                },
            )
            .await
            .map_err(|e| format!("creating volume {VOLUME}: {}", call(e)))?,
    };
    let export = match client.exports().await.map_err(call)?.exports.into_iter().find(|e| e.nqn == a.nqn && e.volume.uuid == volume.uuid) {
        Some(e) => {
            if e.listen != a.listen.to_string() {
                notes.push(format!(
                    "{} is exported on {}, not on --listen {}: the target here will not serve it",
                    e.nqn, e.listen, a.listen
                ));
            }
            let paths: Vec<String> = a.paths.iter().map(ToString::to_string).collect();
            if e.paths != paths {
                notes.push(format!(
                    "{} is served on paths {:?} besides {}, not {paths:?}: remove the export to change them",
                    e.nqn, e.paths, e.listen
                ));
            }
            e
        }
        None => client
            .create_export(&CreateExport {
                nqn: a.nqn.clone(),
                nsid: None,
                pool: POOL.into(),
                volume: VOLUME.into(),
                snapshot: None,
                hosts: Vec::new(),
                listen: Some(a.listen.to_string()),
                paths: a.paths.iter().map(ToString::to_string).collect(),
            })
            .await
            .map_err(|e| format!("exporting {POOL}/{VOLUME} as {}: {}", a.nqn, call(e)))?,
    };

    let vhost = match &a.vhost_blk {
        Some(sock) => Some(vhost_export(&client, sock, &volume, a.listen, &call, &mut notes).await?),
        None => None,
    };

    // 4. The NVMe/TCP target, serving the exports of the service; ready once a host can
    //    connect to the subsystem and identify the namespace (and the vhost-user-blk socket is
    //    bound).
    let deadline = Instant::now() + timeout;
    for (i, listen) in std::iter::once(a.listen).chain(a.paths.iter().copied()).enumerate() {
        let args = vec!["--mgmt".into(), mgmt_addr.clone(), "--listen".into(), listen.to_string()];
        let name = if i == 0 { "nvmf".to_string() } else { format!("nvmf-{}", i + 1) };
        let (exe, args) = program(net.and_then(|n| n.targets.get(i)), &bins.nvmf, args);
        roles.nvmf.push(procs.spawn(&name, &exe, &args)?);
        eprintln!("tessera up: started tessera-nvmf on {listen}; waiting for it to serve {}", export.nqn);
        wait_served(procs, &roles.nvmf, listen, &export, &volume, deadline).await?;
    }
    if let Some(x) = &vhost {
        let sock = Path::new(&x.socket);
        while !sock.metadata().is_ok_and(|m| m.file_type().is_socket()) {
            procs.check_startup()?;
            if Instant::now() >= deadline {
                return Err(startup_timeout(procs, &roles.nvmf, &format!("the target does not listen on {}", x.socket)));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    Ok(Ready { pool, volume, export, vhost, notes })
}

/// Waits until the target on `listen` serves `export` with the volume's size.
async fn wait_served(
    procs: &mut Procs,
    nvmf: &[usize],
    listen: SocketAddr,
    export: &ExportInfo,
    volume: &VolumeInfo,
    deadline: Instant,
) -> Result<(), String> {
    let opts = ControllerOptions {
        addr: reach(listen),
        subnqn: export.nqn.clone(),
        hostnqn: format!("nqn.2014-08.org.nvmexpress:uuid:{}", uuid::Uuid::new_v4()),
        hostid: *uuid::Uuid::new_v4().as_bytes(),
        digests: Digests { header: false, data: false },
        kato_ms: 0,
        disable_sqflow: false,
    };
    loop {
        procs.check_startup()?;
        let last = match tokio::time::timeout(Duration::from_secs(5), Controller::connect(opts.clone(), export.nsid)).await {
            Ok(Ok(ctrl)) => {
                let bytes = ctrl.geometry.blocks.saturating_mul(u64::from(ctrl.geometry.block_size));
                if bytes == volume.size {
                    return Ok(());
                }
                format!("namespace {} has {bytes} bytes, volume {VOLUME} {}", export.nsid, volume.size)
            }
            Ok(Err(e)) => e.to_string(),
            Err(_) => "no answer in 5s".to_string(),
        };
        if Instant::now() >= deadline {
            return Err(startup_timeout(
                procs,
                nvmf,
                &format!("the target on {listen} does not serve {} nsid {}: {last}", export.nqn, export.nsid),
            ));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The vhost-user-blk export of the volume on `sock`: the existing one, or a new one served by
/// the target listening on `listen`. A stale socket file there (a crash) is removed, so that the
/// socket's appearing means the target serves it.
async fn vhost_export(
    client: &MgmtClient,
    sock: &Path,
    volume: &VolumeInfo,
    listen: SocketAddr,
    call: &dyn Fn(MgmtError) -> String,
    notes: &mut Vec<String>,
) -> Result<VhostExportInfo, String> {
    let socket = std::path::absolute(sock).map_err(|e| format!("--vhost-blk {}: {e}", sock.display()))?;
    let socket = socket.to_str().ok_or_else(|| format!("--vhost-blk {}: not UTF-8", socket.display()))?.to_string();
    match std::fs::symlink_metadata(&socket) {
        Ok(m) if m.file_type().is_socket() => {
            std::fs::remove_file(&socket).map_err(|e| format!("removing the stale socket {socket}: {e}"))?
        }
        Ok(_) => return Err(format!("--vhost-blk {socket}: a file that is not a socket is in the way")),
        Err(_) => {}
    }
    let list = client.exports().await.map_err(call)?;
    if let Some(x) = list.vhost.into_iter().find(|x| x.socket == socket) {
        if x.volume.uuid != volume.uuid || x.snapshot.is_some() {
            return Err(format!(
                "{socket} is already the vhost-user-blk disk of {}/{}: remove that export first",
                x.volume.pool, x.volume.name
            ));
        }
        if x.target != listen.to_string() {
            notes.push(format!(
                "{socket} is served by the target on {}, not on --listen {listen}: the target here will not serve it",
                x.target
            ));
        }
        return Ok(x);
    }
    let req = CreateVhostExport {
        socket: socket.clone(),
        pool: POOL.into(),
        volume: VOLUME.into(),
        snapshot: None,
        queues: None,
        read_only: false,
        target: Some(listen.to_string()),
    };
    client.create_vhost_export(&req).await.map_err(|e| format!("exporting {POOL}/{VOLUME} on {socket}: {}", call(e)))
}
