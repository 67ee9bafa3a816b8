//! `tessera bench`: an NVMe/TCP load generator. It connects to a subsystem as a Linux host does
//! and drives a workload like `spdk_nvme_perf` or fio, printing IOPS, bandwidth, latency
//! percentiles and, given the target's pid, the target's CPU time per million I/Os.

use std::net::SocketAddr;
use std::time::Duration;

use tessera_nvme_proto::Digests;
use tessera_nvmf_host::{Controller, ControllerOptions, Rw, Workload};

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

fn parse_size64(s: &str) -> Result<u64, String> {
    let t = s.trim().to_ascii_lowercase();
    let (num, mult) = match t.char_indices().last() {
        Some((i, 'k')) => (&t[..i], 1u64 << 10),
        Some((i, 'm')) => (&t[..i], 1 << 20),
        Some((i, 'g')) => (&t[..i], 1 << 30),
        _ => (t.as_str(), 1),
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .filter(|&n| n > 0)
        .ok_or_else(|| format!("{s:?} is not a size (e.g. 4096, 4k, 128k, 1m)"))
}

fn parse_size(s: &str) -> Result<u32, String> {
    parse_size64(s).and_then(|n| u32::try_from(n).map_err(|_| format!("{s:?} is too large")))
}

/// CPU seconds (user + system) a process has used, from /proc (USER_HZ = 100 on Linux).
fn cpu_seconds(pid: u32) -> Result<f64, String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).map_err(|e| format!("cannot read /proc/{pid}/stat: {e}"))?;
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).ok_or_else(|| format!("unexpected /proc/{pid}/stat format"));
    Ok((ticks(11)? + ticks(12)?) as f64 / 100.0)
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
    let cpu0 = a.target_pid.map(cpu_seconds).transpose()?;
    let report = w.run(&mut ctrl).await.map_err(|e| e.to_string())?;
    let cpu = match (a.target_pid, cpu0) {
        (Some(pid), Some(c0)) => Some(cpu_seconds(pid)? - c0),
        _ => None,
    };
    let cpu_per_mio = cpu.map(|c| c / (report.ios.max(1) as f64 / 1e6));
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
    let mut s = format!(
        "{:?} bs={} qd={} queues={}: {:.0} IOPS, {:.1} MiB/s ({} I/Os in {:.2} s; {} reads, {} writes)\n\
         latency us: avg {:.1}  p50 {:.1}  p99 {:.1}  p99.9 {:.1}  max {:.1}\n",
        a.rw,
        a.bs,
        a.qd,
        a.queues,
        r.iops,
        r.mib_per_s,
        r.ios,
        r.seconds,
        r.reads,
        r.writes,
        r.lat_avg_us,
        r.lat_p50_us,
        r.lat_p99_us,
        r.lat_p999_us,
        r.lat_max_us
    );
    if a.verify {
        s.push_str(&format!("verify: {} blocks read back and matched\n", r.verified_blocks));
    }
    if let (Some(c), Some(p)) = (cpu, cpu_per_mio) {
        s.push_str(&format!("target CPU: {c:.2} s, {p:.2} s per million I/Os\n"));
    }
    Ok(s)
}
