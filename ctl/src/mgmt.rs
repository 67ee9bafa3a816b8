//! `tessera pool|volume|export|system`: the management service's API from the command line.
//! Aligned tables for people, `--json` (the API types serialised as they came) for scripts.

use clap::{Args, Subcommand};
use serde::Serialize;
use tessera_mgmt_api::{
    CreateExport, CreatePool, CreateVhostExport, CreateVolume, EngineState, ExportInfo, ExtendPool, MgmtClient, MgmtError, PoolInfo,
    SystemInfo, TargetSelector, TargetStateName, VhostExportInfo, VolumeInfo,
};

use crate::pool_status;
use crate::report::parse_size64;

/// `tessera pool ...`
#[derive(Args, Debug)]
pub struct PoolArgs {
    /// Print the service's answer as JSON.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: PoolCommand,
}

#[derive(Subcommand, Debug)]
enum PoolCommand {
    /// Create a pool over the targets of some engines.
    Create {
        /// Pool name ([A-Za-z0-9._-], at most 64).
        name: String,
        /// Engine ranks whose targets the pool spans, e.g. 0,1,2 (default: every engine up).
        #[arg(long, value_delimiter = ',')]
        ranks: Vec<u32>,
        /// Default object class of its volumes: S1, RP_<n>, EC_<k>P<p> (service default EC_2P1).
        #[arg(long)]
        class: Option<String>,
    },
    /// List pools.
    List,
    /// Show one pool: its map, rebuild, scrub counters.
    Query {
        /// Pool name.
        name: String,
        /// Follow the rebuild with a progress bar until the pool is idle.
        #[arg(long)]
        watch: bool,
    },
    /// Take targets out: they become DOWN and their data is rebuilt elsewhere.
    Exclude(TargetArgs),
    /// Empty healthy targets onto the others for good (their data is deleted once rebuilt).
    Drain(TargetArgs),
    /// Bring out targets of an up engine back: they become UP and are filled.
    Reintegrate(TargetArgs),
    /// Add registered engines to the pool: their targets become UP and are filled with their
    /// share of the data (moved off the others, which keep serving it meanwhile).
    Extend {
        /// Pool name.
        name: String,
        /// Engine rank to add (repeat, or comma-separate, for several).
        #[arg(long = "rank", required = true, value_delimiter = ',')]
        ranks: Vec<u32>,
    },
}

/// The targets `exclude`, `drain` and `reintegrate` act on.
#[derive(Args, Debug)]
struct TargetArgs {
    /// Pool name.
    name: String,
    /// Engine rank.
    #[arg(long)]
    rank: u32,
    /// One target index of that engine (default: all of its targets in the pool).
    #[arg(long)]
    target: Option<u16>,
}

/// `tessera volume ...`
#[derive(Args, Debug)]
pub struct VolumeArgs {
    /// Print the service's answer as JSON.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: VolumeCommand,
}

#[derive(Subcommand, Debug)]
enum VolumeCommand {
    /// Create a volume.
    Create {
        /// Volume name, unique in its pool.
        name: String,
        /// Size: bytes or 512M, 1G, 1GiB, ... (a multiple of the block size).
        #[arg(long, value_parser = parse_size64)]
        size: u64,
        /// Pool.
        #[arg(long, default_value = "default")]
        pool: String,
        /// Object class (default: the pool's).
        #[arg(long)]
        class: Option<String>,
        /// Block size: 512 or 4096 (service default 4096).
        #[arg(long, value_parser = parse_size64)]
        block_size: Option<u64>,
        /// Cell size, e.g. 64K (service default 64 KiB).
        #[arg(long, value_parser = parse_size64)]
        cell_size: Option<u64>,
        /// Chunk (dkey) size, e.g. 1M (service default 1 MiB).
        #[arg(long, value_parser = parse_size64)]
        chunk_size: Option<u64>,
        /// Turn end-to-end checksums off.
        #[arg(long)]
        no_checksum: bool,
    },
    /// List volumes (of one pool, or of every pool).
    List {
        /// Only this pool.
        #[arg(long)]
        pool: Option<String>,
    },
    /// Show one volume.
    Info {
        /// Volume name.
        name: String,
        /// Pool.
        #[arg(long, default_value = "default")]
        pool: String,
    },
    /// Change a volume's size.
    Resize {
        /// Volume name.
        name: String,
        /// New size.
        #[arg(long, value_parser = parse_size64)]
        size: u64,
        /// Pool.
        #[arg(long, default_value = "default")]
        pool: String,
    },
    /// Clone a snapshot: a new volume that reads as the snapshot, writable, with no data copied.
    Clone {
        /// The snapshot: POOL/VOLUME@SNAPSHOT (or VOLUME@SNAPSHOT in pool "default").
        snapshot: String,
        /// The new volume's name.
        name: String,
    },
    /// Copy a clone's shared data from its parent (with progress) and cut the tie; the clone
    /// must not be exported meanwhile.
    Flatten {
        /// The clone's name.
        name: String,
        /// Pool.
        #[arg(long, default_value = "default")]
        pool: String,
    },
    /// Make a volume read exactly as one of its snapshots (no data copied; newer writes become
    /// unreachable). Refused while the volume is exported, unless forced.
    Rollback {
        /// The snapshot: POOL/VOLUME@SNAPSHOT (or VOLUME@SNAPSHOT in pool "default").
        snapshot: String,
        /// Even while exported: its hosts keep whatever they cached; reconnect them.
        #[arg(long)]
        force: bool,
    },
    /// Delete a volume and its data.
    Delete {
        /// Volume name.
        name: String,
        /// Pool.
        #[arg(long, default_value = "default")]
        pool: String,
    },
}

/// `tessera export ...`
#[derive(Args, Debug)]
pub struct ExportArgs {
    /// Print the service's answer as JSON.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: ExportCommand,
}

#[derive(Subcommand, Debug)]
enum ExportCommand {
    /// Export a volume, or a snapshot of it (read-only), as a namespace of an NVMe/TCP subsystem
    /// (--nqn) or as a VM's vhost-user-blk disk on a UNIX socket (--vhost-blk).
    #[command(group(clap::ArgGroup::new("kind").required(true).args(["nqn", "vhost_blk"])))]
    Add {
        /// Subsystem NQN (created with its first namespace).
        #[arg(long)]
        nqn: Option<String>,
        /// Serve it as a vhost-user-blk disk on this UNIX socket, created on the machine of the
        /// target named by --target (QEMU: -chardev socket,path=SOCKET -device vhost-user-blk-pci).
        #[arg(long, value_name = "SOCKET", conflicts_with_all = ["nsid", "hosts", "listen"])]
        vhost_blk: Option<std::path::PathBuf>,
        /// Volume name, or VOLUME@SNAPSHOT for a read-only namespace of a snapshot.
        #[arg(long)]
        volume: String,
        /// Pool.
        #[arg(long, default_value = "default")]
        pool: String,
        /// Namespace ID (default: the lowest free one).
        #[arg(long)]
        nsid: Option<u32>,
        /// Host NQN allowed to connect (repeat for several; none = any host).
        #[arg(long = "host")]
        hosts: Vec<String>,
        /// Address hosts connect to: the target listening there serves it (service default
        /// 127.0.0.1:4420). Repeat for several paths through several targets (ANA multipath):
        /// the first is the optimized path.
        #[arg(long)]
        listen: Vec<String>,
        /// vhost-user-blk: request queues offered (the guest uses up to one per vCPU; service default 4).
        #[arg(long, conflicts_with = "nqn")]
        queues: Option<u16>,
        /// vhost-user-blk: offer the disk read-only (a snapshot always is).
        #[arg(long, conflicts_with = "nqn")]
        read_only: bool,
        /// vhost-user-blk: the target that serves it, by its NVMe/TCP listen address (service default 127.0.0.1:4420).
        #[arg(long, conflicts_with = "nqn")]
        target: Option<String>,
    },
    /// List exports.
    List,
    /// Make one path of a multipath subsystem the optimized one (hosts are told by an ANA
    /// change event and send I/O there).
    SetOptimized {
        /// Subsystem NQN.
        #[arg(long)]
        nqn: String,
        /// The path: the listen address of one of the subsystem's targets.
        #[arg(long)]
        listen: String,
    },
    /// Remove one namespace from a subsystem (--nqn, --nsid), or a vhost-user-blk disk (--vhost-blk).
    #[command(group(clap::ArgGroup::new("kind").required(true).args(["nqn", "vhost_blk"])))]
    Remove {
        /// Subsystem NQN.
        #[arg(long, requires = "nsid")]
        nqn: Option<String>,
        /// Namespace ID.
        #[arg(long, requires = "nqn")]
        nsid: Option<u32>,
        /// The vhost-user-blk disk's socket.
        #[arg(long, value_name = "SOCKET", conflicts_with = "nqn")]
        vhost_blk: Option<std::path::PathBuf>,
    },
}

/// `tessera system ...`
#[derive(Args, Debug)]
pub struct SystemArgs {
    /// Print the service's answer as JSON.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: SystemCommand,
}

#[derive(Subcommand, Debug)]
enum SystemCommand {
    /// Engines, their states and last heartbeats.
    Query,
}

/// One line for a failed call: the service's own message when it refused.
pub fn error_text(e: &MgmtError, addr: &str) -> String {
    match e {
        MgmtError::Unreachable { detail, .. } => format!("cannot reach the management service at {addr}: {detail}"),
        MgmtError::Refused { message, .. } => message.clone(),
        MgmtError::BadReply(m) => format!("bad reply from the management service at {addr}: {m}"),
    }
}

pub fn block_on<T>(addr: &str, f: impl AsyncFnOnce(&MgmtClient) -> Result<T, MgmtError>) -> Result<T, String> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| format!("cannot start the runtime: {e}"))?;
    let client = MgmtClient::new(addr);
    rt.block_on(f(&client)).map_err(|e| error_text(&e, addr))
}

pub fn json<T: Serialize>(v: &T) -> Result<String, String> {
    serde_json::to_string_pretty(v).map(|s| s + "\n").map_err(|e| e.to_string())
}

fn u32_arg(what: &str, v: Option<u64>) -> Result<Option<u32>, String> {
    v.map(|n| u32::try_from(n).map_err(|_| format!("--{what} {n} is too large"))).transpose()
}

/// `tessera pool ...`
pub fn pool(addr: &str, a: PoolArgs) -> Result<String, String> {
    match a.command {
        PoolCommand::Create { name, ranks, class } => {
            let p = block_on(addr, async |c| c.create_pool(&CreatePool { name, ranks, default_class: class }).await)?;
            if a.json {
                return json(&p);
            }
            Ok(format!(
                "created pool {} (id {}, uuid {}): {} engines, {} targets, {}, default class {}\n",
                p.name,
                p.pool_id,
                p.uuid,
                p.map.engines.len(),
                p.map.targets.len(),
                size_text(p.capacity),
                p.default_class
            ))
        }
        PoolCommand::List => {
            let pools = block_on(addr, async |c| c.pools().await)?;
            if a.json {
                return json(&pools);
            }
            Ok(pool_table(&pools))
        }
        PoolCommand::Query { name, watch } => {
            if watch {
                return pool_status::watch(addr, &name, a.json);
            }
            let (p, vols) = block_on(addr, async |c| Ok((c.pool(&name).await?, c.volumes(&name).await?)))?;
            if a.json {
                return json(&p);
            }
            Ok(pool_text(&p) + "\n" + &crate::snapshot::usage_table(&vols))
        }
        PoolCommand::Exclude(t) => change_targets(addr, t, a.json, "exclude"),
        PoolCommand::Drain(t) => change_targets(addr, t, a.json, "drain"),
        PoolCommand::Reintegrate(t) => change_targets(addr, t, a.json, "reintegrate"),
        PoolCommand::Extend { name, ranks } => {
            let p = block_on(addr, async |c| c.extend(&name, &ExtendPool { ranks: ranks.clone() }).await)?;
            if a.json {
                return json(&p);
            }
            Ok(pool_status::extend_line(&p, &ranks))
        }
    }
}

fn change_targets(addr: &str, t: TargetArgs, as_json: bool, verb: &str) -> Result<String, String> {
    let sel = TargetSelector { rank: t.rank, target: t.target };
    let p = block_on(addr, async |c| match verb {
        "drain" => c.drain(&t.name, &sel).await,
        "reintegrate" => c.reintegrate(&t.name, &sel).await,
        _ => c.exclude(&t.name, &sel).await,
    })?;
    if as_json {
        return json(&p);
    }
    Ok(pool_status::change_line(&p, &sel, verb))
}

fn targets_up(p: &PoolInfo) -> usize {
    p.map.targets.iter().filter(|t| matches!(t.state, TargetStateName::Up | TargetStateName::UpIn)).count()
}

fn pool_table(pools: &[PoolInfo]) -> String {
    let mut t = Table::new(&["NAME", "ID", "CLASS", "CAPACITY", "ALLOCATED", "VOLUMES", "ENGINES", "TARGETS UP", "MAP", "UUID"]);
    for p in pools {
        t.row(vec![
            p.name.clone(),
            p.pool_id.to_string(),
            p.default_class.clone(),
            size_text(p.capacity),
            size_text(p.allocated),
            p.volumes.to_string(),
            p.map.engines.len().to_string(),
            format!("{}/{}", targets_up(p), p.map.targets.len()),
            format!("v{}", p.map.version),
            p.uuid.to_string(),
        ]);
    }
    t.render_or("no pools\n")
}

fn pool_text(p: &PoolInfo) -> String {
    let mut out = format!(
        "pool {} (id {}, uuid {})\n  default class {}\n  capacity {}, allocated {}, {} volume(s)\n  map version {}: {} engines, {}/{} targets up\n\n",
        p.name,
        p.pool_id,
        p.uuid,
        p.default_class,
        size_text(p.capacity),
        size_text(p.allocated),
        p.volumes,
        p.map.version,
        p.map.engines.len(),
        targets_up(p),
        p.map.targets.len()
    );
    let mut t = Table::new(&["RANK", "ADDRESS", "FAULT DOMAIN", "TARGETS"]);
    for e in &p.map.engines {
        let states: Vec<String> =
            p.map.targets.iter().filter(|t| t.rank == e.rank).map(|t| format!("{}:{}", t.index, target_state(t.state))).collect();
        t.row(vec![e.rank.to_string(), e.address.clone(), e.fault_domain.clone(), states.join(" ")]);
    }
    out.push_str(&t.render_or("no engines\n"));
    out.push('\n');
    let mut t = Table::new(&["RANK", "TARGET", "STATE", "FSEQ", "NOTE"]);
    for x in &p.map.targets {
        let note = match (x.drained, x.since_epoch) {
            (true, _) => "drained".to_string(),
            (false, 0) if x.state == TargetStateName::Up => "full rebuild".to_string(),
            (false, 0) => String::new(),
            (false, e) => format!("changes since epoch {e}"),
        };
        t.row(vec![x.rank.to_string(), x.index.to_string(), target_state(x.state).to_string(), x.fseq.to_string(), note]);
    }
    out.push_str(&t.render_or("no targets\n"));
    out.push('\n');
    out.push_str(&pool_status::health_text(p));
    out
}

fn target_state(s: TargetStateName) -> &'static str {
    match s {
        TargetStateName::Up => "UP",
        TargetStateName::Down => "DOWN",
        TargetStateName::DownOut => "DOWNOUT",
        TargetStateName::UpIn => "UPIN",
    }
}

/// `tessera volume ...`
pub fn volume(addr: &str, a: VolumeArgs) -> Result<String, String> {
    match a.command {
        VolumeCommand::Create { name, size, pool, class, block_size, cell_size, chunk_size, no_checksum } => {
            let req = CreateVolume {
                name,
                size,
                block_size: u32_arg("block-size", block_size)?,
                class,
                cell_size: u32_arg("cell-size", cell_size)?,
                chunk_size,
                checksum: no_checksum.then_some(false),
            };
            let v = block_on(addr, async |c| c.create_volume(&pool, &req).await)?;
            if a.json {
                return json(&v);
            }
            Ok(format!("created volume {} in pool {}: {}, {}, uuid {}\n", v.name, v.pool, size_text(v.size), v.class, v.uuid))
        }
        VolumeCommand::List { pool } => {
            let vols = block_on(addr, async |c| match &pool {
                Some(p) => c.volumes(p).await,
                None => {
                    let mut all = Vec::new();
                    for p in c.pools().await? {
                        all.extend(c.volumes(&p.name).await?);
                    }
                    Ok(all)
                }
            })?;
            if a.json {
                return json(&vols);
            }
            Ok(volume_table(&vols))
        }
        VolumeCommand::Info { name, pool } => {
            let v = block_on(addr, async |c| c.volume(&pool, &name).await)?;
            if a.json {
                return json(&v);
            }
            Ok(volume_text(&v))
        }
        VolumeCommand::Resize { name, size, pool } => {
            let v = block_on(addr, async |c| c.resize_volume(&pool, &name, size).await)?;
            if a.json {
                return json(&v);
            }
            Ok(format!("volume {} in pool {} is now {} ({} bytes)\n", v.name, v.pool, size_text(v.size), v.size))
        }
        VolumeCommand::Clone { snapshot, name } => {
            let (pool, vol, snap) = crate::snapshot::pool_volume_snapshot(&snapshot)?;
            let v = block_on(addr, async |c| c.clone_volume(&pool, &vol, &snap, &name).await)?;
            if a.json {
                return json(&v);
            }
            Ok(format!(
                "created volume {} in pool {}: a clone of {pool}/{vol}@{snap}, {}, uuid {}\n",
                v.name,
                v.pool,
                size_text(v.size),
                v.uuid
            ))
        }
        VolumeCommand::Rollback { snapshot, force } => {
            let (pool, vol, snap) = crate::snapshot::pool_volume_snapshot(&snapshot)?;
            let v = block_on(addr, async |c| c.rollback(&pool, &vol, &snap, force).await)?;
            if a.json {
                return json(&v);
            }
            let at = v.rollbacks.last().map_or(0, |r| r.at);
            Ok(format!("rolled volume {pool}/{vol} back to {snap} at epoch {at}: it reads as the snapshot, {}\n", size_text(v.size)))
        }
        VolumeCommand::Flatten { name, pool } => {
            let (v, copied) =
                crate::snapshot::flatten(addr, &pool, &name, !a.json && std::io::IsTerminal::is_terminal(&std::io::stderr()))?;
            if a.json {
                return json(&v);
            }
            Ok(format!(
                "flattened volume {} in pool {}: {} copied from its parent, which it no longer reads\n",
                v.name,
                v.pool,
                size_text(copied)
            ))
        }
        VolumeCommand::Delete { name, pool } => {
            let v = block_on(addr, async |c| c.delete_volume(&pool, &name).await)?;
            if a.json {
                return json(&v);
            }
            Ok(format!("deleted volume {} from pool {} (uuid {})\n", v.name, v.pool, v.uuid))
        }
    }
}

fn volume_table(vols: &[VolumeInfo]) -> String {
    let mut t = Table::new(&["POOL", "NAME", "SIZE", "CLASS", "BLOCK", "CELL", "CHUNK", "CHECKSUM", "UUID"]);
    for v in vols {
        t.row(vec![
            v.pool.clone(),
            v.name.clone(),
            size_text(v.size),
            v.class.clone(),
            v.block_size.to_string(),
            size_text(u64::from(v.cell_size)),
            size_text(v.chunk_size),
            if v.checksum { "on" } else { "off" }.to_string(),
            v.uuid.to_string(),
        ]);
    }
    t.render_or("no volumes\n")
}

fn volume_text(v: &VolumeInfo) -> String {
    format!(
        "volume {} in pool {} (pool id {})\n  uuid        {}\n  size        {} ({} bytes, {} blocks of {})\n  class       {}\n  cell size   {}\n  chunk size  {}\n  checksums   {}\n  created     {} (Unix time)\n  allocated   {} on the engines (with redundancy, snapshots, and what waits for aggregation)\n",
        v.name,
        v.pool,
        v.pool_id,
        v.uuid,
        size_text(v.size),
        v.size,
        v.size / u64::from(v.block_size.max(1)),
        v.block_size,
        v.class,
        size_text(u64::from(v.cell_size)),
        size_text(v.chunk_size),
        if v.checksum { "on" } else { "off" },
        v.created,
        crate::snapshot::reported_size(v.allocated_bytes)
    ) + &lineage_text(v)
}

/// A clone's parent and the volume's snapshots, one line each (nothing for a plain volume).
fn lineage_text(v: &VolumeInfo) -> String {
    let mut out = String::new();
    if let Some(p) = &v.parent {
        let flattening = if v.flattening { " (being flattened)" } else { "" };
        out += &format!("  clone of   {}/{}@{} (epoch {}){flattening}\n", p.volume.pool, p.volume.name, p.snapshot.name, p.snapshot.epoch);
    }
    for s in &v.snapshots {
        let held = crate::snapshot::reported_size(s.held_bytes);
        out += &format!("  snapshot   {} (epoch {}, {}; holds {held} only it reads)\n", s.name, s.epoch, size_text(s.size));
    }
    for r in &v.rollbacks {
        out += &format!("  rollback   to {} (epoch {}) at epoch {}\n", r.snapshot, r.to, r.at);
    }
    out
}

/// `tessera export ...`
pub fn export(addr: &str, a: ExportArgs) -> Result<String, String> {
    match a.command {
        ExportCommand::Add { nqn, vhost_blk, volume, pool, nsid, hosts, listen, queues, read_only, target } => {
            let (volume, snapshot) = match volume.split_once('@') {
                Some((v, s)) => (v.to_string(), Some(s.to_string())),
                None => (volume, None),
            };
            let Some(nqn) = nqn else {
                let socket = socket_path(vhost_blk.as_deref())?;
                let req = CreateVhostExport { socket, pool, volume, snapshot, queues, read_only, target };
                let e = block_on(addr, async |c| c.create_vhost_export(&req).await)?;
                if a.json {
                    return json(&e);
                }
                return Ok(format!(
                    "exported {}/{}{} as a vhost-user-blk disk on {} ({} queues, {}, served by the target on {})\n",
                    e.volume.pool,
                    e.volume.name,
                    e.snapshot.as_ref().map(|s| format!("@{}", s.name)).unwrap_or_default(),
                    e.socket,
                    e.queues,
                    if e.read_only { "read-only" } else { "read-write" },
                    e.target
                ));
            };
            let (listen, paths) = match listen.split_first() {
                Some((first, rest)) => (Some(first.clone()), rest.to_vec()),
                None => (None, Vec::new()),
            };
            let req = CreateExport { nqn, nsid, pool, volume, snapshot, hosts, listen, paths };
            let e = block_on(addr, async |c| c.create_export(&req).await)?;
            if a.json {
                return json(&e);
            }
            Ok(format!(
                "exported {}/{}{} as {} nsid {} on {} ({})\n",
                e.volume.pool,
                e.volume.name,
                e.snapshot.as_ref().map(|s| format!("@{} (read-only)", s.name)).unwrap_or_default(),
                e.nqn,
                e.nsid,
                listen_text(&e.listen, &e.paths, e.optimized.as_deref()),
                hosts_text(&e.hosts)
            ))
        }
        ExportCommand::SetOptimized { nqn, listen } => {
            let xs = block_on(addr, async |c| c.set_optimized(&nqn, &listen).await)?;
            if a.json {
                return json(&xs);
            }
            Ok(format!("{nqn}: {listen} is the optimized path ({} namespace(s))\n", xs.len()))
        }
        ExportCommand::List => {
            let l = block_on(addr, async |c| c.exports().await)?;
            if a.json {
                return json(&l);
            }
            Ok(export_tables(&l.exports, &l.vhost))
        }
        ExportCommand::Remove { nqn, nsid, vhost_blk } => {
            let (Some(nqn), Some(nsid)) = (nqn, nsid) else {
                let socket = socket_path(vhost_blk.as_deref())?;
                let e = block_on(addr, async |c| c.delete_vhost_export(&socket).await)?;
                if a.json {
                    return json(&e);
                }
                return Ok(format!("removed the vhost-user-blk disk on {} ({}/{})\n", e.socket, e.volume.pool, e.volume.name));
            };
            let e = block_on(addr, async |c| c.delete_export(&nqn, nsid).await)?;
            if a.json {
                return json(&e);
            }
            Ok(format!("removed {} nsid {} ({}/{})\n", e.nqn, e.nsid, e.volume.pool, e.volume.name))
        }
    }
}

/// A subsystem's listen address, and its further paths when it has some (the optimized one
/// marked).
fn listen_text(listen: &str, paths: &[String], optimized: Option<&str>) -> String {
    if paths.is_empty() {
        return listen.to_string();
    }
    let best = optimized.unwrap_or(listen);
    std::iter::once(listen)
        .chain(paths.iter().map(String::as_str))
        .map(|p| if p == best { format!("{p} (optimized)") } else { p.to_string() })
        .collect::<Vec<_>>()
        .join(", ")
}

fn hosts_text(hosts: &[String]) -> String {
    if hosts.is_empty() {
        "any host".to_string()
    } else {
        hosts.join(",")
    }
}

/// A socket path as the service wants it: absolute (a relative one is taken from here).
fn socket_path(p: Option<&std::path::Path>) -> Result<String, String> {
    let p = p.ok_or("give --nqn or --vhost-blk")?;
    let abs = std::path::absolute(p).map_err(|e| format!("socket {}: {e}", p.display()))?;
    abs.to_str().map(str::to_string).ok_or_else(|| format!("socket {} is not UTF-8", abs.display()))
}

fn export_tables(exports: &[ExportInfo], vhost: &[VhostExportInfo]) -> String {
    let mut out = if exports.is_empty() && !vhost.is_empty() { String::new() } else { export_table(exports) };
    if !vhost.is_empty() {
        if !out.is_empty() {
            out.push('\n');
        }
        let mut t = Table::new(&["VHOST-USER-BLK SOCKET", "VOLUME", "SIZE", "QUEUES", "MODE", "TARGET"]);
        for e in vhost {
            t.row(vec![
                e.socket.clone(),
                match &e.snapshot {
                    Some(s) => format!("{}/{}@{}", e.volume.pool, e.volume.name, s.name),
                    None => format!("{}/{}", e.volume.pool, e.volume.name),
                },
                size_text(e.snapshot.as_ref().map_or(e.volume.size, |s| s.size)),
                e.queues.to_string(),
                if e.read_only { "ro" } else { "rw" }.to_string(),
                e.target.clone(),
            ]);
        }
        out.push_str(&t.render_or(""));
    }
    out
}

/// An NVMe reservation in a word: none, or its type and holder, and how many registrants.
fn reservation_text(r: &tessera_mgmt_api::Reservation) -> String {
    let regs = r.state.registrants.len();
    let host = |h: &[u8; 16]| h.iter().take(4).map(|b| format!("{b:02x}")).collect::<String>();
    match r.state.reservation {
        None if regs == 0 => "-".into(),
        None => format!("{regs} registered"),
        Some(held) => {
            let by = held.holder.map_or("all registrants".to_string(), |h| format!("host {}…", host(&h)));
            format!("type {} by {by}, {regs} registered", held.rtype.code())
        }
    }
}

fn export_table(exports: &[ExportInfo]) -> String {
    let mut t = Table::new(&["NQN", "NSID", "VOLUME", "SIZE", "LISTEN", "HOSTS", "RESERVATION"]);
    for e in exports {
        t.row(vec![
            e.nqn.clone(),
            e.nsid.to_string(),
            match &e.snapshot {
                Some(s) => format!("{}/{}@{} (ro)", e.volume.pool, e.volume.name, s.name),
                None => format!("{}/{}", e.volume.pool, e.volume.name),
            },
            size_text(e.snapshot.as_ref().map_or(e.volume.size, |s| s.size)),
            listen_text(&e.listen, &e.paths, e.optimized.as_deref()),
            hosts_text(&e.hosts),
            reservation_text(&e.reservation),
        ]);
    }
    t.render_or("no exports\n")
}

/// `tessera system ...`
pub fn system(addr: &str, a: SystemArgs) -> Result<String, String> {
    match a.command {
        SystemCommand::Query => {
            let s = block_on(addr, async |c| c.system().await)?;
            if a.json {
                return json(&s);
            }
            Ok(system_text(&s))
        }
    }
}

fn system_text(s: &SystemInfo) -> String {
    let up = s.engines.iter().filter(|e| e.state == EngineState::Up).count();
    let mut out = format!(
        "{} engine(s), {} up; heartbeat timeout {}; store version {}\n",
        s.engines.len(),
        up,
        ms_text(s.heartbeat_timeout_ms),
        s.version
    );
    let mut t = Table::new(&["RANK", "STATE", "ADDRESS", "TARGETS", "USED", "FAULT DOMAIN", "LAST HEARTBEAT", "UUID"]);
    for e in &s.engines {
        t.row(vec![
            e.rank.to_string(),
            match e.state {
                EngineState::Up => "UP",
                EngineState::Down => "DOWN",
            }
            .to_string(),
            e.address.clone(),
            format!("{} x {}", e.targets, size_text(e.target_capacity)),
            e.used_bytes.map_or_else(|| "-".to_string(), size_text),
            e.fault_domain.clone(),
            e.last_heartbeat_ms.map_or_else(|| "never (since the service started)".to_string(), |ms| format!("{} ago", ms_text(ms))),
            e.uuid.to_string(),
        ]);
    }
    if !s.engines.is_empty() {
        out.push('\n');
    }
    out.push_str(&t.render_or(""));
    out
}

fn ms_text(ms: u64) -> String {
    if ms < 1000 {
        format!("{ms}ms")
    } else if ms < 60_000 {
        format!("{:.1}s", ms as f64 / 1000.0)
    } else {
        format!("{}m{:02}s", ms / 60_000, ms % 60_000 / 1000)
    }
}

/// Bytes as the largest binary unit that keeps at least one whole unit: `1 GiB`, `1.5 GiB`,
/// `4096 B`... exact values print without decimals.
pub fn size_text(n: u64) -> String {
    const UNITS: [(&str, u64); 5] = [("PiB", 1 << 50), ("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)];
    for (name, unit) in UNITS {
        if n >= unit {
            return if n.is_multiple_of(unit) { format!("{} {name}", n / unit) } else { format!("{:.1} {name}", n as f64 / unit as f64) };
        }
    }
    format!("{n} B")
}

/// A table whose columns are as wide as their widest cell.
pub struct Table {
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(header: &[&str]) -> Table {
        Table { rows: vec![header.iter().map(|s| (*s).to_string()).collect()] }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    /// The table, or `empty` when it has no rows besides the header.
    pub fn render_or(&self, empty: &str) -> String {
        if self.rows.len() <= 1 {
            return empty.to_string();
        }
        let cols = self.rows.iter().map(Vec::len).max().unwrap_or(0);
        let widths: Vec<usize> =
            (0..cols).map(|i| self.rows.iter().filter_map(|r| r.get(i)).map(|c| c.chars().count()).max().unwrap_or(0)).collect();
        let mut out = String::new();
        for r in &self.rows {
            let mut line = String::new();
            for (i, c) in r.iter().enumerate() {
                if i > 0 {
                    line.push_str("  ");
                }
                line.push_str(c);
                let w = widths.get(i).copied().unwrap_or(0);
                line.extend(std::iter::repeat_n(' ', w.saturating_sub(c.chars().count())));
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_read_back() {
        assert_eq!(size_text(1 << 30), "1 GiB");
        assert_eq!(size_text(3 << 29), "1.5 GiB");
        assert_eq!(size_text(4096), "4 KiB");
        assert_eq!(size_text(100), "100 B");
        assert_eq!(size_text(0), "0 B");
    }

    #[test]
    fn tables_align() {
        let mut t = Table::new(&["A", "LONGER"]);
        t.row(vec!["wide cell".into(), "x".into()]);
        t.row(vec!["y".into(), "z".into()]);
        assert_eq!(t.render_or("none"), "A          LONGER\nwide cell  x\ny          z\n");
        assert_eq!(Table::new(&["A"]).render_or("none\n"), "none\n");
    }

    #[test]
    fn refusals_print_the_service_message_and_unreachable_names_the_address() {
        let e = MgmtError::Refused { status: 400, message: "unknown object class \"X\"".into() };
        assert_eq!(error_text(&e, "a:1"), "unknown object class \"X\"");
        let e = MgmtError::Unreachable { addr: "a:1".into(), detail: "connection refused".into() };
        assert_eq!(error_text(&e, "a:1"), "cannot reach the management service at a:1: connection refused");
    }
}
