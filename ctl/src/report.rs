//! What the load generators (`tessera bench`, `tessera bench-engine`) share: sizes on the command
//! line, the CPU time of the process under test, and the summary of a run (IOPS, bandwidth and
//! latency percentiles from an HDR histogram) as text. The summary itself is
//! [`tessera_nvmf_host::Report`], so both commands print the same JSON fields.

use std::time::Duration;

use hdrhistogram::Histogram;
pub use tessera_nvmf_host::Report;

/// Parses a size: bytes, or with a unit, case-insensitive: `k`/`KiB`, `m`/`MiB`, `g`/`GiB`,
/// `t`/`TiB` (powers of 1024; `4k` = `4K` = `4KiB`), `KB`/`MB`/`GB`/`TB` (powers of 1000, as
/// the engine's configuration reads them), or `B`. Zero is refused.
pub fn parse_size64(s: &str) -> Result<u64, String> {
    let t = s.trim().to_ascii_lowercase();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let mult: Option<u64> = match unit.trim() {
        "" | "b" => Some(1),
        "k" | "kib" => Some(1 << 10),
        "m" | "mib" => Some(1 << 20),
        "g" | "gib" => Some(1 << 30),
        "t" | "tib" => Some(1 << 40),
        "kb" => Some(1_000),
        "mb" => Some(1_000_000),
        "gb" => Some(1_000_000_000),
        "tb" => Some(1_000_000_000_000),
        _ => None,
    };
    mult.zip(num.parse::<u64>().ok())
        .and_then(|(m, n)| n.checked_mul(m))
        .filter(|&n| n > 0)
        .ok_or_else(|| format!("{s:?} is not a size (e.g. 4096, 4k, 64K, 512M, 1G, 1GiB)"))
}

/// [`parse_size64`] for sizes that must fit 32 bits.
pub fn parse_size(s: &str) -> Result<u32, String> {
    parse_size64(s).and_then(|n| u32::try_from(n).map_err(|_| format!("{s:?} is too large")))
}

/// CPU seconds (user + system) a process has used, from /proc (USER_HZ = 100 on Linux).
pub fn cpu_seconds(pid: u32) -> Result<f64, String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).map_err(|e| format!("cannot read /proc/{pid}/stat: {e}"))?;
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).ok_or_else(|| format!("unexpected /proc/{pid}/stat format"));
    Ok((ticks(11)? + ticks(12)?) as f64 / 100.0)
}

/// The CPU time another process (the target, the engine) spends during a run.
#[derive(Debug)]
pub struct CpuMeter {
    pid: u32,
    start: f64,
}

impl CpuMeter {
    /// Starts measuring `pid`, if given.
    pub fn start(pid: Option<u32>) -> Result<Option<CpuMeter>, String> {
        pid.map(|pid| Ok(CpuMeter { pid, start: cpu_seconds(pid)? })).transpose()
    }

    /// CPU seconds used since [`start`](Self::start), and that per million of `ops`.
    pub fn finish(self, ops: u64) -> Result<(f64, f64), String> {
        let used = cpu_seconds(self.pid)? - self.start;
        Ok((used, used / (ops.max(1) as f64 / 1e6)))
    }
}

/// A latency histogram in nanoseconds, 1 ns to 60 s, 3 significant digits.
pub fn histogram() -> Result<Histogram<u64>, String> {
    Histogram::new_with_bounds(1, 60_000_000_000, 3).map_err(|e| e.to_string())
}

/// Counts of a run besides its latencies.
#[derive(Debug, Default, Clone, Copy)]
pub struct Counts {
    pub reads: u64,
    pub writes: u64,
    pub bytes: u64,
    pub errors: u64,
}

/// The report of a run: `hist` holds every completed operation's latency in nanoseconds.
pub fn summarize(hist: &Histogram<u64>, c: Counts, elapsed: Duration, verified_blocks: u64) -> Report {
    let secs = elapsed.as_secs_f64().max(1e-9);
    let us = |ns: u64| ns as f64 / 1000.0;
    let ios = c.reads + c.writes;
    Report {
        ios,
        reads: c.reads,
        writes: c.writes,
        bytes: c.bytes,
        seconds: secs,
        iops: ios as f64 / secs,
        mib_per_s: c.bytes as f64 / secs / (1 << 20) as f64,
        lat_avg_us: hist.mean() / 1000.0,
        lat_p50_us: us(hist.value_at_quantile(0.5)),
        lat_p99_us: us(hist.value_at_quantile(0.99)),
        lat_p999_us: us(hist.value_at_quantile(0.999)),
        lat_max_us: us(hist.max()),
        errors: c.errors,
        verified_blocks,
    }
}

/// "N IOPS, X MiB/s (n I/Os in s s" — the caller closes the parenthesis.
pub fn rate_text(r: &Report) -> String {
    format!("{:.0} IOPS, {:.1} MiB/s ({} I/Os in {:.2} s", r.iops, r.mib_per_s, r.ios, r.seconds)
}

/// The latency line of the text report.
pub fn latency_text(r: &Report) -> String {
    format!(
        "latency us: avg {:.1}  p50 {:.1}  p99 {:.1}  p99.9 {:.1}  max {:.1}\n",
        r.lat_avg_us, r.lat_p50_us, r.lat_p99_us, r.lat_p999_us, r.lat_max_us
    )
}

/// The CPU line of the text report (`who`: "target", "engine").
pub fn cpu_text(who: &str, cpu: Option<(f64, f64)>) -> String {
    match cpu {
        Some((c, p)) => format!("{who} CPU: {c:.2} s, {p:.2} s per million I/Os\n"),
        None => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size64("4k"), Ok(4096));
        assert_eq!(parse_size64("128K"), Ok(128 << 10));
        assert_eq!(parse_size64("1g"), Ok(1 << 30));
        assert_eq!(parse_size64("512"), Ok(512));
        assert!(parse_size64("0").is_err());
        assert!(parse_size64("x").is_err());
        assert!(parse_size("8g").is_err());
        assert_eq!(parse_size64("1G"), Ok(1 << 30));
        assert_eq!(parse_size64("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size64("512M"), Ok(512 << 20));
        assert_eq!(parse_size64("64KiB"), Ok(64 << 10));
        assert_eq!(parse_size64("2T"), Ok(2 << 40));
        assert_eq!(parse_size64("1GB"), Ok(1_000_000_000));
        assert_eq!(parse_size64("4096B"), Ok(4096));
        assert!(parse_size64("1.5G").is_err());
        assert!(parse_size64("G").is_err());
        assert!(parse_size64("-1").is_err());
        assert!(parse_size64("12 parsecs").is_err());
        assert!(parse_size64("99999999999T").is_err());
    }

    #[test]
    fn summary_of_a_histogram() {
        let mut h = histogram().unwrap();
        for v in 1..=1000u64 {
            h.record(v * 1000).unwrap();
        }
        let r = summarize(&h, Counts { reads: 0, writes: 1000, bytes: 1000 * 4096, errors: 0 }, Duration::from_secs(2), 0);
        assert_eq!(r.ios, 1000);
        assert!((r.iops - 500.0).abs() < 1e-9);
        assert!((r.lat_p50_us - 500.0).abs() < 1.0, "{}", r.lat_p50_us);
        assert!((r.lat_max_us - 1000.0).abs() < 1.0, "{}", r.lat_max_us);
    }
}
