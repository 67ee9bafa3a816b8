//! `tessera`: the operator's command-line tool. It starts a whole system on one machine
//! (`tessera up`), manages pools, volumes and exports through the management service
//! (`tessera pool|volume|export|system`), works with target configurations (print the default,
//! check a file before deploying it) and benchmarks NVMe/TCP subsystems (`tessera bench`) and
//! storage engines (`tessera bench-engine`).
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tessera_nvmf::config::Config;

mod bench;
mod engine_bench;
mod mgmt;
mod pool_status;
mod report;
mod snapshot;
mod up;
mod wire;

/// Tessera command-line tool.
#[derive(Parser, Debug)]
#[command(name = "tessera", version, about)]
struct Cli {
    /// Address of the management service (host:port).
    #[arg(long, global = true, env = "TESSERA_MGMT", default_value = tessera_mgmt_api::DEFAULT_MGMT_ADDR)]
    mgmt: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Start a whole system on this machine: management service, engines, NVMe/TCP target, and a
    /// pool, volume and export to connect to.
    Up(up::UpArgs),
    /// Pools: create, list, query (with rebuild status), exclude, drain, reintegrate, extend.
    Pool(mgmt::PoolArgs),
    /// Volumes: create, list, info, resize, delete.
    Volume(mgmt::VolumeArgs),
    /// Exports (volumes served as NVMe namespaces): add, list, remove.
    Export(mgmt::ExportArgs),
    /// Snapshots of a volume: create, list, delete.
    Snapshot(snapshot::SnapshotArgs),
    /// The system map: engines and their states.
    System(mgmt::SystemArgs),
    /// Drive a workload against an NVMe/TCP subsystem and report IOPS, bandwidth and latency.
    Bench(bench::BenchArgs),
    /// Drive array updates or fetches against a tessera-engine and report IOPS, bandwidth and latency.
    BenchEngine(engine_bench::EngineBenchArgs),
    /// Measure the loopback TCP request/response limit for NVMe/TCP-sized messages.
    BenchWire(wire::WireArgs),
    /// NVMe/TCP target configuration.
    Nvmf {
        #[command(subcommand)]
        command: NvmfCommand,
    },
}

#[derive(Subcommand, Debug)]
enum NvmfCommand {
    /// Print the built-in default target configuration as TOML.
    DefaultConfig,
    /// Check a target configuration file and summarise what it serves.
    CheckConfig {
        /// The TOML file.
        file: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = match tessera_cli_support::parse_args::<Cli>("tessera") {
        Ok(c) => c,
        Err(code) => return code,
    };
    match run(cli) {
        Ok(out) => {
            print!("{out}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("tessera: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<String, String> {
    match cli.command {
        Command::Up(a) => up::run(a),
        Command::Pool(a) => mgmt::pool(&cli.mgmt, a),
        Command::Volume(a) => mgmt::volume(&cli.mgmt, a),
        Command::Export(a) => mgmt::export(&cli.mgmt, a),
        Command::Snapshot(a) => snapshot::run(&cli.mgmt, a),
        Command::System(a) => mgmt::system(&cli.mgmt, a),
        Command::Bench(a) => bench::run(a),
        Command::BenchEngine(a) => engine_bench::run(a),
        Command::BenchWire(a) => wire::run(a),
        Command::Nvmf { command: NvmfCommand::DefaultConfig } => Ok(Config::default().to_toml()),
        Command::Nvmf { command: NvmfCommand::CheckConfig { file } } => {
            Config::load(&file).map(|cfg| summary(&cfg)).map_err(|e| e.to_string())
        }
    }
}

fn summary(cfg: &Config) -> String {
    let mut out = String::new();
    let listen: Vec<String> = cfg.listen.iter().map(ToString::to_string).collect();
    out.push_str(&format!("ok: listening on {}\n", listen.join(", ")));
    for s in &cfg.subsystems {
        let hosts = if s.allow_any_host { "any host".to_string() } else { format!("{} allowed host(s)", s.allowed_hosts.len()) };
        out.push_str(&format!("subsystem {} ({hosts})\n", s.nqn));
        for n in &s.namespaces {
            out.push_str(&format!(
                "  nsid {}: {:?} {} MiB, {}-byte blocks, uuid {}\n",
                n.nsid,
                n.bdev,
                n.size_mib,
                n.block_size,
                n.uuid_for(&s.nqn)
            ));
        }
    }
    out
}
