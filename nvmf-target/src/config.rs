//! The target's configuration: one TOML file (see the README's configuration reference), parsed
//! with serde and checked as a whole before anything is served, so a bad file is rejected with a
//! message naming the offending key instead of half-applied.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::Path;

use serde::{Deserialize, Serialize};

/// The well-known NQN of the discovery subsystem.
pub const DISCOVERY_NQN: &str = "nqn.2014-08.org.nvmexpress.discovery";
/// NQN of the built-in default subsystem.
pub const DEFAULT_NQN: &str = "nqn.2026-11.io.tessera:default";
/// Highest namespace ID a subsystem may use (the NN the controllers report).
pub const MAX_NSID: u32 = 1024;
/// Default adaptive polling window ([`Config::poll_us`]), microseconds.
pub const DEFAULT_POLL_US: u32 = 50;
/// Longest adaptive polling window a configuration may set, microseconds.
pub const MAX_POLL_US: u32 = 1000;
/// Longest NQN the specifications allow, in bytes.
pub const MAX_NQN_LEN: usize = 223;

/// Errors in a configuration file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The path.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The file is not valid TOML for this schema.
    #[error("{path}: {message}")]
    Parse {
        /// The path.
        path: String,
        /// What the TOML parser said.
        message: String,
    },
    /// A value is out of range or inconsistent.
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

/// The block device module backing a namespace.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BdevKind {
    /// RAM.
    Malloc,
    /// Discards writes, reads zeros.
    Null,
}

impl BdevKind {
    /// The module's name, as in the configuration and [`tessera_bdev::Bdev::kind`].
    pub fn name(self) -> &'static str {
        match self {
            BdevKind::Malloc => "malloc",
            BdevKind::Null => "null",
        }
    }
}

/// One namespace of a subsystem.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NamespaceConfig {
    /// Namespace ID (1..=1024), unique in the subsystem.
    pub nsid: u32,
    /// Backing device module.
    pub bdev: BdevKind,
    /// Size in MiB.
    pub size_mib: u64,
    /// Logical block size in bytes: 512 or 4096.
    #[serde(default = "default_block_size")]
    pub block_size: u32,
    /// Namespace UUID; the NGUID is the same 16 bytes. Derived from the subsystem NQN and NSID
    /// when absent, so it is stable across restarts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uuid: Option<uuid::Uuid>,
}

fn default_block_size() -> u32 {
    512
}

/// One NVM subsystem.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubsystemConfig {
    /// NVMe Qualified Name.
    pub nqn: String,
    /// Serial number reported by Identify Controller (at most 20 ASCII characters).
    #[serde(default = "default_serial")]
    pub serial: String,
    /// Model number reported by Identify Controller (at most 40 ASCII characters).
    #[serde(default = "default_model")]
    pub model: String,
    /// Whether any host may connect. When false, only `allowed_hosts` may.
    #[serde(default)]
    pub allow_any_host: bool,
    /// Host NQNs allowed to connect and to see this subsystem in discovery.
    #[serde(default)]
    pub allowed_hosts: Vec<String>,
    /// Namespaces.
    #[serde(default, rename = "namespace")]
    pub namespaces: Vec<NamespaceConfig>,
}

fn default_serial() -> String {
    "TESSERA0000000000001".into()
}

fn default_model() -> String {
    "Tessera".into()
}

/// The whole configuration.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// TCP addresses to listen on (`ip:port`).
    #[serde(default = "default_listen")]
    pub listen: Vec<SocketAddr>,
    /// Maximum I/O queues per controller.
    #[serde(default = "default_max_io_queues")]
    pub max_io_queues: u16,
    /// Maximum entries per I/O queue (reported as CAP.MQES + 1).
    #[serde(default = "default_io_queue_depth")]
    pub io_queue_depth: u16,
    /// Lowest controller ID this target assigns.
    #[serde(default = "default_cntlid_min")]
    pub cntlid_min: u16,
    /// Highest controller ID this target assigns.
    #[serde(default = "default_cntlid_max")]
    pub cntlid_max: u16,
    /// Adaptive polling: after a queue's socket brought commands or a pass completed some, how
    /// long (microseconds) the queue keeps checking its socket before it sleeps in epoll. A
    /// host that sends its next command within the window finds the target awake (no wake-up
    /// on its path). Polling runs only while I/O flows: an idle queue sleeps, so an idle target
    /// uses no CPU. 0 turns it off; at most [`MAX_POLL_US`].
    #[serde(default = "default_poll_us")]
    pub poll_us: u32,
    /// Subsystems.
    #[serde(default, rename = "subsystem")]
    pub subsystems: Vec<SubsystemConfig>,
    /// The management service to take exported volumes from (managed mode), in addition to the
    /// subsystems above.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mgmt: Option<MgmtConfig>,
}

/// Managed mode: subsystems and namespaces come from the management service's exports.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MgmtConfig {
    /// Address of the management service (`host:port`).
    pub address: String,
}

fn default_listen() -> Vec<SocketAddr> {
    vec![SocketAddr::from(([127, 0, 0, 1], 4420))]
}

fn default_poll_us() -> u32 {
    DEFAULT_POLL_US
}

fn default_max_io_queues() -> u16 {
    16
}

fn default_io_queue_depth() -> u16 {
    128
}

fn default_cntlid_min() -> u16 {
    1
}

fn default_cntlid_max() -> u16 {
    0xFFEF
}

impl Default for Config {
    /// The built-in default: one subsystem any host may use, with one 1 GiB malloc namespace,
    /// on 127.0.0.1:4420.
    fn default() -> Config {
        Config {
            listen: default_listen(),
            max_io_queues: default_max_io_queues(),
            io_queue_depth: default_io_queue_depth(),
            cntlid_min: default_cntlid_min(),
            cntlid_max: default_cntlid_max(),
            poll_us: default_poll_us(),
            subsystems: vec![SubsystemConfig {
                nqn: DEFAULT_NQN.into(),
                serial: default_serial(),
                model: "Tessera malloc".into(),
                allow_any_host: true,
                allowed_hosts: Vec::new(),
                namespaces: vec![NamespaceConfig { nsid: 1, bdev: BdevKind::Malloc, size_mib: 1024, block_size: 512, uuid: None }],
            }],
            mgmt: None,
        }
    }
}

fn invalid(msg: String) -> ConfigError {
    ConfigError::Invalid(msg)
}

/// Checks that `nqn` is an NQN ("nqn." and at most 223 printable ASCII bytes, no spaces).
pub fn check_nqn(what: &str, nqn: &str) -> Result<(), ConfigError> {
    if !nqn.starts_with("nqn.") || nqn.len() > MAX_NQN_LEN || !nqn.is_ascii() || nqn.chars().any(|c| c.is_ascii_control() || c == ' ') {
        return Err(invalid(format!("{what} {nqn:?} is not an NQN (\"nqn.\" followed by at most {MAX_NQN_LEN} printable ASCII bytes)")));
    }
    Ok(())
}

fn check_ascii(what: &str, s: &str, max: usize) -> Result<(), ConfigError> {
    if s.is_empty() || s.len() > max || !s.bytes().all(|b| (0x20..0x7f).contains(&b)) {
        return Err(invalid(format!("{what} {s:?} must be 1 to {max} printable ASCII characters")));
    }
    Ok(())
}

impl Config {
    /// Parses and validates TOML text; `path` names the source in errors.
    pub fn from_toml(text: &str, path: &str) -> Result<Config, ConfigError> {
        let cfg: Config = toml::from_str(text).map_err(|e| ConfigError::Parse { path: path.into(), message: e.to_string() })?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// A configuration with no subsystems: what a target that takes everything from the
    /// management service starts from.
    pub fn empty() -> Config {
        Config { subsystems: Vec::new(), ..Config::default() }
    }

    /// Reads, parses and validates a file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: shown.clone(), source })?;
        Config::from_toml(&text, &shown)
    }

    /// The configuration as TOML.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_default()
    }

    /// Checks every value and cross-reference.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.listen.is_empty() {
            return Err(invalid("listen must name at least one address".into()));
        }
        if !(1..=1024).contains(&self.max_io_queues) {
            return Err(invalid(format!("max_io_queues = {} must be 1 to 1024", self.max_io_queues)));
        }
        if !(128..=4096).contains(&self.io_queue_depth) {
            return Err(invalid(format!("io_queue_depth = {} must be 128 to 4096", self.io_queue_depth)));
        }
        if self.cntlid_min == 0 || self.cntlid_max > 0xFFEF || self.cntlid_min > self.cntlid_max {
            return Err(invalid(format!(
                "cntlid_min..cntlid_max = {}..{} must be a non-empty range within 1..65519",
                self.cntlid_min, self.cntlid_max
            )));
        }
        if self.poll_us > MAX_POLL_US {
            return Err(invalid(format!("poll_us = {} must be 0 to {MAX_POLL_US}", self.poll_us)));
        }
        if let Some(m) = &self.mgmt {
            let a = m.address.strip_prefix("http://").unwrap_or(&m.address);
            if a.is_empty() || a.contains(char::is_whitespace) || !a.contains(':') {
                return Err(invalid(format!("mgmt address {:?} must be host:port", m.address)));
            }
        }
        let mut nqns = BTreeSet::new();
        for s in &self.subsystems {
            check_nqn("subsystem nqn", &s.nqn)?;
            if s.nqn == DISCOVERY_NQN {
                return Err(invalid(format!("subsystem nqn {DISCOVERY_NQN:?} is reserved for the discovery controller")));
            }
            if !nqns.insert(s.nqn.as_str()) {
                return Err(invalid(format!("subsystem {:?} is defined twice", s.nqn)));
            }
            check_ascii(&format!("subsystem {:?} serial", s.nqn), &s.serial, 20)?;
            check_ascii(&format!("subsystem {:?} model", s.nqn), &s.model, 40)?;
            for h in &s.allowed_hosts {
                check_nqn(&format!("subsystem {:?} allowed host", s.nqn), h)?;
            }
            if !s.allow_any_host && s.allowed_hosts.is_empty() {
                return Err(invalid(format!("subsystem {:?} allows no host: set allow_any_host = true or list allowed_hosts", s.nqn)));
            }
            let mut ids = BTreeSet::new();
            for n in &s.namespaces {
                let at = format!("subsystem {:?} namespace {}", s.nqn, n.nsid);
                if !(1..=MAX_NSID).contains(&n.nsid) {
                    return Err(invalid(format!("{at}: nsid must be 1 to {MAX_NSID}")));
                }
                if !ids.insert(n.nsid) {
                    return Err(invalid(format!("{at}: nsid is used twice")));
                }
                if n.block_size != 512 && n.block_size != 4096 {
                    return Err(invalid(format!("{at}: block_size = {} must be 512 or 4096", n.block_size)));
                }
                if n.size_mib == 0 || n.size_mib > (1 << 30) {
                    return Err(invalid(format!("{at}: size_mib = {} must be 1 to 2^30", n.size_mib)));
                }
            }
        }
        Ok(())
    }
}

impl NamespaceConfig {
    /// The namespace's UUID: configured, or derived from the subsystem NQN and NSID.
    pub fn uuid_for(&self, subnqn: &str) -> uuid::Uuid {
        self.uuid.unwrap_or_else(|| uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_OID, format!("tessera:{subnqn}:ns{}", self.nsid).as_bytes()))
    }

    /// Size in blocks.
    pub fn blocks(&self) -> u64 {
        self.size_mib * (1 << 20) / u64::from(self.block_size)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_is_valid_and_round_trips() {
        let d = Config::default();
        d.validate().unwrap();
        assert_eq!(Config::from_toml(&d.to_toml(), "x").unwrap(), d);
        assert_eq!(d.listen[0].to_string(), "127.0.0.1:4420");
    }

    #[test]
    fn minimal_file_gets_defaults() {
        let c = Config::from_toml(
            r#"
            [[subsystem]]
            nqn = "nqn.2026-11.io.tessera:a"
            allow_any_host = true
            [[subsystem.namespace]]
            nsid = 1
            bdev = "null"
            size_mib = 16
            "#,
            "t",
        )
        .unwrap();
        assert_eq!(c.subsystems[0].namespaces[0].block_size, 512);
        assert_eq!(c.io_queue_depth, 128);
        assert_eq!(c.subsystems[0].namespaces[0].blocks(), 32768);
    }

    #[test]
    fn mgmt_section() {
        let c = Config::from_toml("[mgmt]\naddress = \"127.0.0.1:7400\"\n", "t").unwrap();
        assert_eq!(c.mgmt, Some(MgmtConfig { address: "127.0.0.1:7400".into() }));
        assert!(c.subsystems.is_empty());
        assert_eq!(Config::from_toml(&c.to_toml(), "x").unwrap(), c);
        let bad = |t: &str| Config::from_toml(t, "f.toml").unwrap_err().to_string();
        assert!(bad("[mgmt]\naddress = \"\"").contains("mgmt address"));
        assert!(bad("[mgmt]\naddress = \"nohost\"").contains("mgmt address"));
        assert!(bad("[mgmt]\naddress = \"a:1\"\npoll = 3").contains("unknown field"));
        assert!(!Config::default().to_toml().contains("mgmt"));
        assert!(Config::empty().subsystems.is_empty());
    }

    #[test]
    fn stable_uuid() {
        let n = NamespaceConfig { nsid: 1, bdev: BdevKind::Malloc, size_mib: 1, block_size: 512, uuid: None };
        assert_eq!(n.uuid_for("nqn.a"), n.uuid_for("nqn.a"));
        assert_ne!(n.uuid_for("nqn.a"), n.uuid_for("nqn.b"));
    }

    #[test]
    fn errors_name_the_problem() {
        let bad = |t: &str| Config::from_toml(t, "f.toml").unwrap_err().to_string();
        assert!(bad("listen = [\"nope\"]").contains("f.toml"));
        assert!(bad("bogus = 1").contains("unknown field"));
        assert!(bad("poll_us = 1001").contains("poll_us = 1001 must be 0 to 1000"));
        assert_eq!(Config::from_toml("poll_us = 0", "f.toml").unwrap().poll_us, 0);
        assert!(bad("[[subsystem]]\nnqn = \"x\"\nallow_any_host = true").contains("not an NQN"));
        assert!(bad("[[subsystem]]\nnqn = \"nqn.a\"").contains("allows no host"));
        let ns = |extra: &str| {
            format!("[[subsystem]]\nnqn = \"nqn.a\"\nallow_any_host = true\n[[subsystem.namespace]]\nnsid = 1\nbdev = \"malloc\"\nsize_mib = 1\n{extra}")
        };
        assert!(bad(&ns("block_size = 1000")).contains("block_size"));
        assert!(bad(&format!("{}\n[[subsystem.namespace]]\nnsid = 1\nbdev = \"null\"\nsize_mib = 1", ns(""))).contains("used twice"));
        assert!(bad(&ns("").replace("nsid = 1", "nsid = 0")).contains("nsid must be"));
        assert!(bad(&ns("").replace("\"malloc\"", "\"disk\"")).contains("unknown variant"));
    }
}
