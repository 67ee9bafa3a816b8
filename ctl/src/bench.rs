//! `tessera bench`: an NVMe/TCP load generator. It connects to a subsystem as a Linux host does
//! and drives a workload like `spdk_nvme_perf` or fio, printing IOPS, bandwidth, latency
//! percentiles and, given the target's pid, the target's CPU time per million I/Os.

use std::net::SocketAddr;
use std::time::Duration;

use tessera_nvme_proto::Digests;
use tessera_nvmf_host::{Controller, ControllerOptions, Rw, Workload};

use crate::report::{cpu_seconds, cpu_text, latency_text, parse_size, parse_size64, rate_text, CpuMeter};

/// Arguments of `tessera bench`.
#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    /// Target address.
    #[arg(long, default_value = "127.0.0.1:4420")]
    addr: SocketAddr,
    /// Subsystem NQN.
    #[arg(long, default_value = tessera_nvmf::config::DEFAULT_NQN)]
    nqn: String,
    /// Host NQN (default: a fresh UUID-based NQN).
    #[arg(long)]
    hostnqn: Option<String>,
    /// Namespace ID.
    #[arg(long, default_value_t = 1)]
    nsid: u32,
    /// Access pattern: read, write, randread, randwrite, randrw.
    #[arg(long, default_value = "randread")]
    rw: Rw,
    /// Read percentage for randrw.
    #[arg(long, default_value_t = 70, value_parser = clap::value_parser!(u8).range(0..=100))]
    mix: u8,
    /// I/O size: bytes, or with a k/m suffix (4k, 128k, 1m).
    #[arg(long, default_value = "4k", value_parser = parse_size)]
    bs: u32,
    /// Commands in flight per queue.
    #[arg(long, default_value_t = 32)]
    qd: u16,
    /// I/O queues (one TCP connection each).
    #[arg(long, default_value_t = 1)]
    queues: u16,
    /// Run time in seconds.
    #[arg(long, conflicts_with = "ios")]
    time: Option<f64>,
    /// Total number of I/Os.
    #[arg(long)]
    ios: Option<u64>,
    /// Write a pattern, read everything written back and compare.
    #[arg(long)]
    verify: bool,
    /// Limit I/O to the first SIZE of the namespace (k/m/g suffix).
    #[arg(long, value_parser = parse_size64)]
    range: Option<u64>,
    /// Header digest.
    #[arg(long)]
    hdgst: bool,
    /// Data digest.
    #[arg(long)]
    ddgst: bool,
    /// Ask the target to disable SQ flow control (enables the C2HData SUCCESS optimisation).
    #[arg(long)]
    disable_sqflow: bool,
    /// Report this process's (the target's) CPU seconds per million I/Os.
    #[arg(long)]
    target_pid: Option<u32>,
    /// Random seed.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
    /// Connect the controller and the I/O queues, then stay idle for --time seconds and report
    /// the target's CPU use (no busy polling means ~0).
    #[arg(long, requires = "target_pid")]
    idle: bool,
}

/// Holds a connected controller with its I/O queues idle and measures the target's CPU use.
async fn idle(ctrl: &mut Controller, a: &BenchArgs) -> Result<String, String> {
    let (Some(pid), Some(secs)) = (a.target_pid, a.time) else {
        return Err("--idle needs --target-pid and --time".into());
    };
    ctrl.set_queue_count(a.queues).await.map_err(|e| e.to_string())?;
    let mut queues = Vec::new();
    for qid in 1..=a.queues {
        queues.push(ctrl.io_queue(qid, a.qd + 1).await.map_err(|e| e.to_string())?);
    }
    let c0 = cpu_seconds(pid)?;
    tokio::time::sleep(Duration::from_secs_f64(secs)).await;
    let used = cpu_seconds(pid)? - c0;
    drop(queues);
    if a.json {
        return Ok(format!("{{\"idle_seconds\":{secs},\"target_cpu_seconds\":{used},\"queues\":{}}}\n", a.queues));
    }
    Ok(format!(
        "idle for {secs:.0} s with {} I/O queue(s) connected: target used {used:.2} CPU s ({:.3} %)\n",
        a.queues,
        used / secs * 100.0
    ))
}

/// Runs the benchmark and returns the text to print.
pub fn run(a: BenchArgs) -> Result<String, String> {
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().map_err(|e| e.to_string())?;
    rt.block_on(run_async(a))
}

async fn run_async(a: BenchArgs) -> Result<String, String> {
    if a.time.is_none() && a.ios.is_none() {
        return Err("give --time SECONDS or --ios N".into());
    }
    let opts = ControllerOptions {
        addr: a.addr,
        subnqn: a.nqn.clone(),
        hostnqn: a.hostnqn.clone().unwrap_or_else(|| format!("nqn.2014-08.org.nvmexpress:uuid:{}", uuid::Uuid::new_v4())),
        hostid: *uuid::Uuid::new_v4().as_bytes(),
        digests: Digests { header: a.hdgst, data: a.ddgst },
        kato_ms: 0,
        disable_sqflow: a.disable_sqflow,
    };
    let mut ctrl = Controller::connect(opts, a.nsid).await.map_err(|e| e.to_string())?;
    if a.idle {
        return idle(&mut ctrl, &a).await;
    }
    let w = Workload {
        rw: a.rw,
        mix_read_pct: a.mix,
        bs: a.bs,
        qd: a.qd,
        queues: a.queues,
        duration: a.time.map(Duration::from_secs_f64),
        ios: a.ios,
        verify: a.verify,
        range_blocks: a.range.map(|r| r / u64::from(ctrl.geometry.block_size)),
        seed: a.seed,
    };
    let meter = CpuMeter::start(a.target_pid)?;
    let report = w.run(&mut ctrl).await.map_err(|e| e.to_string())?;
    let cpu_used = meter.map(|m| m.finish(report.ios)).transpose()?;
    let (cpu, cpu_per_mio) = (cpu_used.map(|c| c.0), cpu_used.map(|c| c.1));
    if report.errors > 0 {
        return Err(format!("{} I/Os failed", report.errors));
    }
    if a.json {
        #[derive(serde::Serialize)]
        struct Out<'a> {
            rw: Rw,
            bs: u32,
            qd: u16,
            queues: u16,
            #[serde(flatten)]
            report: &'a tessera_nvmf_host::Report,
            target_cpu_seconds: Option<f64>,
            target_cpu_seconds_per_million_ios: Option<f64>,
        }
        let o = Out {
            rw: a.rw,
            bs: a.bs,
            qd: a.qd,
            queues: a.queues,
            report: &report,
            target_cpu_seconds: cpu,
            target_cpu_seconds_per_million_ios: cpu_per_mio,
        };
        return serde_json::to_string(&o).map(|s| s + "\n").map_err(|e| e.to_string());
    }
    let r = &report;
    let mut s =
        format!("{:?} bs={} qd={} queues={}: {}; {} reads, {} writes)\n", a.rw, a.bs, a.qd, a.queues, rate_text(r), r.reads, r.writes);
    s.push_str(&latency_text(r));
    if a.verify {
        s.push_str(&format!("verify: {} blocks read back and matched\n", r.verified_blocks));
    }
    s.push_str(&cpu_text("target", cpu_used));
    Ok(s)
}
