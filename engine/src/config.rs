//! The engine daemon's TOML configuration.
//!
//! ```toml
//! rank = 0                          # this engine's rank in the system
//! listen = "127.0.0.1:10001"        # RPC address
//! data_dir = "/var/lib/tessera/engine0"
//! targets = 2                       # targets (threads, each with its own files)
//! target_capacity = "1GiB"          # data file size per target
//!
//! [mgmt]                            # optional: register with the management service
//! address = "127.0.0.1:7400"        # the service's address
//! advertise = "127.0.0.1:10001"     # address clients use (default: listen)
//! fault_domain = "rack-1"           # default: "rank-<rank>"
//!
//! [tuning]                          # optional
//! inline_max = 512                  # values up to this many bytes live in the metadata
//! wal_data_max = "32KiB"            # array updates up to this size are committed inside their
//!                                   # WAL record (one device flush) and written to the data
//!                                   # file later, many per sync (0: never; at most 1MiB) ...
//! destage = "16MiB"                 # ... once this much waits (at most a quarter of
//!                                   # target_capacity; at least 64KiB), and whenever idle
//! checkpoint_wal = "64MiB"          # checkpoint when a target's WAL since the last one reaches this
//! wal_segment = "16MiB"             # WAL segments are preallocated (zeros) to this size and
//!                                   # reused after checkpoints (64KiB to 1GiB)
//! aggregation_lag_secs = 5          # default aggregation boundary: now minus this
//! commit_window_ms = 2000           # host writes whose epoch is older than this are refused
//!                                   # (retried at a new epoch by the client): bounds the stable
//!                                   # epoch (docs/PLACEMENT.md); 0: off; at most 60000
//! max_batch = 256                   # most requests one group commit takes
//!
//! [heal]                            # optional: self-healing (needs [mgmt])
//! rebuild_rate = "64MiB"            # most bytes per second this engine rebuilds while hosts
//!                                   # are quiet ...
//! rebuild_rate_busy = "8MiB"        # ... and while they do I/O on this engine (served a host
//!                                   # read or write in the last second; at most rebuild_rate).
//!                                   # Both at least 64KiB. See docs/HEALING.md, "A pass".
//! scrub_period_secs = 86400         # verify all stored data once per this period (at least
//!                                   # 256 KiB/s) ...
//! scrub_rate = "8MiB"               # ... but never faster than this (bytes per second; 0: no
//!                                   # scrub). See docs/HEALING.md, "Scrub".
//! ec_aggregation_rate = "16MiB"     # EC aggregation: stripe bytes per second folded back into
//!                                   # full stripes (0: off). docs/PLACEMENT.md, "EC aggregation".
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Deserializer};
use thiserror::Error;

use crate::target::TargetConfig;

/// A configuration file that cannot be used.
#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("{path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

/// Optional knobs; the defaults suit most machines.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Tuning {
    pub inline_max: u64,
    #[serde(deserialize_with = "size")]
    pub wal_data_max: u64,
    #[serde(deserialize_with = "size")]
    pub destage: u64,
    #[serde(deserialize_with = "size")]
    pub checkpoint_wal: u64,
    #[serde(deserialize_with = "size")]
    pub wal_segment: u64,
    pub aggregation_lag_secs: u64,
    pub commit_window_ms: u64,
    pub max_batch: usize,
}

impl Default for Tuning {
    fn default() -> Self {
        let t = TargetConfig::default();
        Self {
            inline_max: t.inline_max,
            wal_data_max: t.wal_data_max,
            destage: t.destage_bytes,
            checkpoint_wal: t.checkpoint_wal_bytes,
            wal_segment: t.wal_segment_bytes,
            aggregation_lag_secs: t.aggregation_lag / 1_000_000_000,
            commit_window_ms: t.commit_window / 1_000_000,
            max_batch: 256,
        }
    }
}

/// Self-healing: rebuild and scrub rates.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HealSection {
    /// Most bytes per second written into rebuilt shards by this engine while no host does I/O
    /// on it.
    #[serde(deserialize_with = "size")]
    pub rebuild_rate: u64,
    /// The same while hosts do I/O on this engine (`crate::pace`); at most `rebuild_rate` is
    /// used.
    #[serde(deserialize_with = "size")]
    pub rebuild_rate_busy: u64,
    /// Scrub every byte once per this many seconds (at least [`crate::scrub::RATE_FLOOR`]
    /// bytes per second).
    pub scrub_period_secs: u64,
    /// Upper bound of the scrub rate, bytes per second (0: no scrub).
    #[serde(deserialize_with = "size")]
    pub scrub_rate: u64,
    /// Most stripe bytes per second EC aggregation folds back into full stripes on this engine
    /// (0: no EC aggregation; `crate::ec_agg`).
    #[serde(deserialize_with = "size")]
    pub ec_aggregation_rate: u64,
}

impl Default for HealSection {
    fn default() -> Self {
        HealSection {
            rebuild_rate: 64 << 20,
            rebuild_rate_busy: 8 << 20,
            scrub_period_secs: 86_400,
            scrub_rate: 8 << 20,
            ec_aggregation_rate: 16 << 20,
        }
    }
}

/// The longest `[tuning] commit_window_ms`: a stable epoch a minute behind is already of
/// little use to snapshots and aggregation.
pub const MAX_COMMIT_WINDOW_MS: u64 = 60_000;

/// The lowest `[heal] rebuild_rate` and `rebuild_rate_busy` accepted, bytes per second: below
/// it one chunk-shard (512 KiB by default) would take more than 8 s.
pub const MIN_REBUILD_RATE: u64 = 64 << 10;

/// Membership: where the management service is and how this engine presents itself.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MgmtSection {
    /// The management service (`host:port` or `http://host:port`).
    pub address: String,
    /// Address clients reach this engine at (default: `listen`; required when `listen` is a
    /// wildcard address).
    #[serde(default)]
    pub advertise: Option<SocketAddr>,
    /// Fault domain (default `rank-<rank>`).
    #[serde(default)]
    pub fault_domain: Option<String>,
}

/// The engine configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EngineConfig {
    pub rank: u32,
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    pub targets: u16,
    #[serde(deserialize_with = "size")]
    pub target_capacity: u64,
    #[serde(default)]
    pub mgmt: Option<MgmtSection>,
    #[serde(default)]
    pub tuning: Tuning,
    #[serde(default)]
    pub heal: HealSection,
}

/// Parses "4096", "64KiB", "1MiB", "1GiB", "2TiB" (also KB/MB/GB/TB as powers of 1000).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().map_err(|_| format!("size {s:?} does not start with a number"))?;
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" | "K" => 1 << 10,
        "MiB" | "M" => 1 << 20,
        "GiB" | "G" => 1 << 30,
        "TiB" | "T" => 1 << 40,
        "KB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        "TB" => 1_000_000_000_000,
        u => return Err(format!("unknown size unit {u:?} in {s:?} (use B, KiB, MiB, GiB, TiB)")),
    };
    n.checked_mul(mult).ok_or_else(|| format!("size {s:?} is too large"))
}

fn size<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Size {
        Int(u64),
        Text(String),
    }
    match Size::deserialize(d)? {
        Size::Int(n) => Ok(n),
        Size::Text(s) => parse_size(&s).map_err(serde::de::Error::custom),
    }
}

impl EngineConfig {
    /// Reads and validates a configuration file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.into(), source })?;
        Self::parse(&text, path)
    }

    /// Parses and validates configuration text; `path` is only used in messages.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let cfg: EngineConfig =
            toml::from_str(text).map_err(|e| ConfigError::Parse { path: path.into(), message: e.message().to_string() })?;
        let invalid = |message: String| ConfigError::Invalid { path: path.into(), message };
        if cfg.targets == 0 {
            return Err(invalid("targets must be at least 1".into()));
        }
        if cfg.target_capacity < 1 << 20 {
            return Err(invalid(format!("target_capacity is {} bytes; at least 1MiB", cfg.target_capacity)));
        }
        if cfg.tuning.max_batch == 0 {
            return Err(invalid("tuning.max_batch must be at least 1".into()));
        }
        if cfg.tuning.inline_max > 4096 {
            return Err(invalid("tuning.inline_max must be at most 4096".into()));
        }
        if cfg.tuning.wal_data_max > 1 << 20 {
            return Err(invalid(format!("tuning.wal_data_max is {} bytes; at most 1MiB", cfg.tuning.wal_data_max)));
        }
        if !(64 << 10..=1 << 30).contains(&cfg.tuning.wal_segment) {
            return Err(invalid(format!("tuning.wal_segment is {} bytes; 64KiB to 1GiB", cfg.tuning.wal_segment)));
        }
        if cfg.tuning.commit_window_ms > MAX_COMMIT_WINDOW_MS {
            return Err(invalid(format!("tuning.commit_window_ms is {}; at most {MAX_COMMIT_WINDOW_MS}", cfg.tuning.commit_window_ms)));
        }
        if cfg.tuning.destage < 64 << 10 {
            return Err(invalid(format!("tuning.destage is {} bytes; at least 64KiB", cfg.tuning.destage)));
        }
        for (key, rate) in [("rebuild_rate", cfg.heal.rebuild_rate), ("rebuild_rate_busy", cfg.heal.rebuild_rate_busy)] {
            if rate < MIN_REBUILD_RATE {
                return Err(invalid(format!("heal.{key} is {rate} bytes per second; at least 64KiB")));
            }
        }
        if let Some(m) = &cfg.mgmt {
            if m.address.trim().is_empty() {
                return Err(invalid("mgmt.address is empty".into()));
            }
            if m.advertise.is_none() && cfg.listen.ip().is_unspecified() {
                return Err(invalid(format!("listen is {}: set mgmt.advertise to the address clients should use", cfg.listen)));
            }
        }
        Ok(cfg)
    }

    /// Per-target settings derived from this configuration.
    pub fn target_config(&self) -> TargetConfig {
        TargetConfig {
            capacity: self.target_capacity,
            inline_max: self.tuning.inline_max,
            wal_data_max: self.tuning.wal_data_max,
            // At most a quarter of the target waits for the data file.
            destage_bytes: self.tuning.destage.min(self.target_capacity / 4),
            checkpoint_wal_bytes: self.tuning.checkpoint_wal,
            wal_segment_bytes: self.tuning.wal_segment,
            aggregation_lag: self.tuning.aggregation_lag_secs.saturating_mul(1_000_000_000),
            commit_window: self.tuning.commit_window_ms.saturating_mul(1_000_000),
            follows_service: self.mgmt.is_some(),
            ec_settled_by_engine: self.mgmt.is_some() && self.heal.ec_aggregation_rate > 0,
            ..TargetConfig::default()
        }
    }

    /// Directory of target `i`.
    pub fn target_dir(&self, i: u16) -> PathBuf {
        self.data_dir.join(format!("target-{i}"))
    }

    /// An example configuration for one engine on this machine.
    pub fn example(rank: u32, port: u16, data_dir: &Path) -> String {
        format!(
            "rank = {rank}\nlisten = \"127.0.0.1:{port}\"\ndata_dir = \"{}\"\ntargets = 2\ntarget_capacity = \"1GiB\"\n",
            data_dir.display()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_example_and_sizes() {
        let text = EngineConfig::example(3, 10003, Path::new("/tmp/e3"));
        let cfg = EngineConfig::parse(&text, Path::new("x.toml")).unwrap();
        assert_eq!(cfg.rank, 3);
        assert_eq!(cfg.target_capacity, 1 << 30);
        assert_eq!(cfg.target_dir(1), PathBuf::from("/tmp/e3/target-1"));
        assert_eq!(parse_size("64KiB"), Ok(65536));
        assert!(parse_size("12 parsecs").is_err());
        assert!(parse_size("99999999999TiB").is_err());
    }

    #[test]
    fn heal_section_sets_the_scrub_pace() {
        let base = EngineConfig::example(0, 1, Path::new("/x"));
        let cfg = EngineConfig::parse(&base, Path::new("e.toml")).unwrap();
        assert_eq!((cfg.heal.scrub_period_secs, cfg.heal.scrub_rate), (86_400, 8 << 20));
        let text = format!("{base}[heal]\nscrub_period_secs = 1\nscrub_rate = \"64MiB\"\n");
        let cfg = EngineConfig::parse(&text, Path::new("e.toml")).unwrap();
        assert_eq!((cfg.heal.scrub_period_secs, cfg.heal.scrub_rate, cfg.heal.rebuild_rate), (1, 64 << 20, 64 << 20));
        let off = format!("{base}[heal]\nscrub_rate = 0\n");
        assert_eq!(EngineConfig::parse(&off, Path::new("e.toml")).unwrap().heal.scrub_rate, 0);
    }

    #[test]
    fn heal_section_sets_the_rebuild_rates() {
        let base = EngineConfig::example(0, 1, Path::new("/x"));
        let cfg = EngineConfig::parse(&base, Path::new("e.toml")).unwrap();
        assert_eq!((cfg.heal.rebuild_rate, cfg.heal.rebuild_rate_busy), (64 << 20, 8 << 20));
        let text = format!("{base}[heal]\nrebuild_rate = \"1GiB\"\nrebuild_rate_busy = 65536\n");
        let cfg = EngineConfig::parse(&text, Path::new("e.toml")).unwrap();
        assert_eq!((cfg.heal.rebuild_rate, cfg.heal.rebuild_rate_busy), (1 << 30, 64 << 10));
        for (line, key) in [
            ("rebuild_rate = 0", "heal.rebuild_rate is 0 bytes per second"),
            ("rebuild_rate_busy = \"1KiB\"", "heal.rebuild_rate_busy is 1024 bytes per second"),
        ] {
            let e = EngineConfig::parse(&format!("{base}[heal]\n{line}\n"), Path::new("e.toml")).unwrap_err().to_string();
            assert_eq!(e, format!("e.toml: {key}; at least 64KiB"));
        }
        let e = EngineConfig::parse(&format!("{base}[heal]\nrebuild_rate_busy = \"fast\"\n"), Path::new("e.toml")).unwrap_err();
        assert!(e.to_string().contains("\"fast\""), "{e}");
    }

    #[test]
    fn rejects_unknown_keys_and_bad_values() {
        let bad = "rank = 0\nlisten = \"127.0.0.1:1\"\ndata_dir = \"/x\"\ntargets = 1\ntarget_capacity = 4096\n";
        let e = EngineConfig::parse(bad, Path::new("e.toml")).unwrap_err().to_string();
        assert!(e.contains("target_capacity"), "{e}");
        let unknown = format!("{}colour = \"blue\"\n", EngineConfig::example(0, 1, Path::new("/x")));
        let e = EngineConfig::parse(&unknown, Path::new("e.toml")).unwrap_err().to_string();
        assert!(e.contains("colour"), "{e}");
    }
}
