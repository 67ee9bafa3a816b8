//! The target's shared state: subsystems, their namespaces and controllers, the discovery
//! generation counter, and configuration reload.
//!
//! Locking: every lock here is a `std::sync` lock held for a lookup or an update, never across an
//! `.await`. The I/O path takes one read lock per command to find its namespace.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Instant;

use tessera_bdev::{Bdev, BlockDevice, MallocBdev, NullBdev};
use tessera_nvme_proto::fabrics;

use crate::config::{BdevKind, Config, ConfigError, NamespaceConfig, SubsystemConfig};
use crate::controller::Controller;

/// NVMe version this target reports (VS property and Identify VER): 1.3.0. It is the level the
/// command set implemented here covers; a host may then skip the 2.0-only Identify CNS values.
pub const NVME_VERSION: u32 = fabrics::version(1, 3, 0);
/// Firmware revision reported in Identify and the firmware slot log.
pub const FIRMWARE_REVISION: &str = env!("CARGO_PKG_VERSION");
/// MDTS exponent: 2^7 pages of 4 KiB = 512 KiB per command. Large sequential I/O needs few
/// commands, while one queue of 128 writes can buffer at most 64 MiB of host data.
pub const MDTS_EXP: u8 = 7;
/// Maximum data transfer size in bytes.
pub const MDTS_BYTES: u32 = 4096 << MDTS_EXP;
/// In-capsule data accepted on admin and I/O queues.
pub const INCAPSULE_DATA: u32 = 8192;
/// MAXH2CDATA: largest H2CData PDU the host may send.
pub const MAXH2CDATA: u32 = 128 * 1024;
/// Admin queue entries accepted (the Connect SQSIZE + 1 for queue 0).
pub const ADMIN_QUEUE_MIN: u16 = 32;
/// Largest admin queue.
pub const ADMIN_QUEUE_MAX: u16 = 128;
/// CAP.TO: worst-case time to become ready, in 500 ms units.
pub const CAP_TIMEOUT: u8 = 30;

/// Per-namespace I/O counters, summed into the SMART log.
#[derive(Debug, Default)]
pub struct Counters {
    pub bytes_read: AtomicU64,
    pub bytes_written: AtomicU64,
    pub read_commands: AtomicU64,
    pub write_commands: AtomicU64,
    pub media_errors: AtomicU64,
}

/// A namespace: a bdev with identity.
#[derive(Debug)]
pub struct Namespace {
    pub nsid: u32,
    pub uuid: [u8; 16],
    pub bdev: Bdev,
    pub counters: Counters,
}

impl Namespace {
    fn from_config(subnqn: &str, c: &NamespaceConfig) -> Result<Namespace, ConfigError> {
        let bdev = match c.bdev {
            BdevKind::Malloc => Bdev::Malloc(
                MallocBdev::new(c.block_size, c.blocks()).map_err(|e| ConfigError::Invalid(format!("namespace {}: {e}", c.nsid)))?,
            ),
            BdevKind::Null => Bdev::Null(NullBdev::new(c.block_size, c.blocks())),
        };
        Ok(Namespace { nsid: c.nsid, uuid: *c.uuid_for(subnqn).as_bytes(), bdev, counters: Counters::default() })
    }

    /// log2 of the block size.
    pub fn lba_shift(&self) -> u8 {
        self.bdev.block_size().trailing_zeros() as u8
    }
}

/// Who may connect to a subsystem.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostAccess {
    pub allow_any: bool,
    pub hosts: Vec<String>,
}

impl HostAccess {
    /// Whether `hostnqn` may connect.
    pub fn allows(&self, hostnqn: &str) -> bool {
        self.allow_any || self.hosts.iter().any(|h| h == hostnqn)
    }
}

/// An NVM subsystem.
#[derive(Debug)]
pub struct Subsystem {
    pub nqn: String,
    pub serial: String,
    pub model: String,
    access: RwLock<HostAccess>,
    namespaces: RwLock<BTreeMap<u32, Arc<Namespace>>>,
    controllers: Mutex<BTreeMap<u16, Arc<Controller>>>,
    next_cntlid: Mutex<u16>,
}

impl Subsystem {
    fn new(c: &SubsystemConfig, cntlid_min: u16) -> Result<Subsystem, ConfigError> {
        let mut namespaces = BTreeMap::new();
        for n in &c.namespaces {
            namespaces.insert(n.nsid, Arc::new(Namespace::from_config(&c.nqn, n)?));
        }
        Ok(Subsystem {
            nqn: c.nqn.clone(),
            serial: c.serial.clone(),
            model: c.model.clone(),
            access: RwLock::new(HostAccess { allow_any: c.allow_any_host, hosts: c.allowed_hosts.clone() }),
            namespaces: RwLock::new(namespaces),
            controllers: Mutex::new(BTreeMap::new()),
            next_cntlid: Mutex::new(cntlid_min),
        })
    }

    /// A subsystem with no namespaces that any host may use (the discovery subsystem).
    pub fn discovery() -> Subsystem {
        Subsystem {
            nqn: crate::config::DISCOVERY_NQN.into(),
            serial: "TESSERADISCOVERY".into(),
            model: "Tessera discovery".into(),
            access: RwLock::new(HostAccess { allow_any: true, hosts: Vec::new() }),
            namespaces: RwLock::new(BTreeMap::new()),
            controllers: Mutex::new(BTreeMap::new()),
            next_cntlid: Mutex::new(1),
        }
    }

    /// Whether any namespace has a volatile write cache (what Identify VWC and feature 06h say).
    pub fn has_volatile_cache(&self) -> bool {
        self.namespaces.read().unwrap_or_else(PoisonError::into_inner).values().any(|n| n.bdev.has_volatile_cache())
    }

    /// Whether `hostnqn` may connect.
    pub fn allows(&self, hostnqn: &str) -> bool {
        self.access.read().unwrap_or_else(PoisonError::into_inner).allows(hostnqn)
    }

    /// The namespace `nsid`, if active.
    pub fn namespace(&self, nsid: u32) -> Option<Arc<Namespace>> {
        self.namespaces.read().unwrap_or_else(PoisonError::into_inner).get(&nsid).cloned()
    }

    /// All active namespaces, by NSID.
    pub fn namespaces(&self) -> Vec<Arc<Namespace>> {
        self.namespaces.read().unwrap_or_else(PoisonError::into_inner).values().cloned().collect()
    }

    /// Allocates a controller ID in `[min, max]` unused in this subsystem and registers the
    /// controller built by `make`. `None` if every ID is taken.
    pub fn add_controller(&self, min: u16, max: u16, make: impl FnOnce(u16) -> Arc<Controller>) -> Option<Arc<Controller>> {
        let mut ctrls = self.controllers.lock().unwrap_or_else(PoisonError::into_inner);
        let mut next = self.next_cntlid.lock().unwrap_or_else(PoisonError::into_inner);
        let span = u32::from(max - min) + 1;
        for _ in 0..span {
            let id = if (min..=max).contains(&*next) { *next } else { min };
            *next = if id >= max { min } else { id + 1 };
            if let std::collections::btree_map::Entry::Vacant(slot) = ctrls.entry(id) {
                let c = make(id);
                slot.insert(c.clone());
                return Some(c);
            }
        }
        None
    }

    /// The controller `cntlid`.
    pub fn controller(&self, cntlid: u16) -> Option<Arc<Controller>> {
        self.controllers.lock().unwrap_or_else(PoisonError::into_inner).get(&cntlid).cloned()
    }

    /// Removes controller `cntlid` (after teardown).
    pub fn remove_controller(&self, cntlid: u16) {
        self.controllers.lock().unwrap_or_else(PoisonError::into_inner).remove(&cntlid);
    }

    fn controllers(&self) -> Vec<Arc<Controller>> {
        self.controllers.lock().unwrap_or_else(PoisonError::into_inner).values().cloned().collect()
    }

    /// Applies a new configuration of this subsystem: adds, grows and removes namespaces and
    /// updates host access. Returns the NSIDs whose attributes changed.
    fn reconfigure(&self, c: &SubsystemConfig) -> Result<Vec<u32>, ConfigError> {
        let mut changed = Vec::new();
        let mut map = self.namespaces.write().unwrap_or_else(PoisonError::into_inner);
        // Validate every change before applying any.
        for n in &c.namespaces {
            if let Some(cur) = map.get(&n.nsid) {
                let same_kind = cur.bdev.kind() == n.bdev.name();
                if !same_kind || cur.bdev.block_size() != n.block_size || cur.uuid != *n.uuid_for(&c.nqn).as_bytes() {
                    return Err(ConfigError::Invalid(format!(
                        "subsystem {:?} namespace {}: only size_mib can change while serving (remove it and add it under a new nsid)",
                        c.nqn, n.nsid
                    )));
                }
                if n.blocks() < cur.bdev.num_blocks() {
                    return Err(ConfigError::Invalid(format!("subsystem {:?} namespace {}: shrinking is not supported", c.nqn, n.nsid)));
                }
            }
        }
        let wanted: BTreeMap<u32, &NamespaceConfig> = c.namespaces.iter().map(|n| (n.nsid, n)).collect();
        map.retain(|id, _| {
            let keep = wanted.contains_key(id);
            if !keep {
                changed.push(*id);
            }
            keep
        });
        for (id, n) in wanted {
            match map.get(&id) {
                Some(cur) if n.blocks() > cur.bdev.num_blocks() => {
                    cur.bdev.grow(n.blocks()).map_err(|e| ConfigError::Invalid(format!("namespace {id}: {e}")))?;
                    changed.push(id);
                }
                Some(_) => {}
                None => {
                    map.insert(id, Arc::new(Namespace::from_config(&c.nqn, n)?));
                    changed.push(id);
                }
            }
        }
        *self.access.write().unwrap_or_else(PoisonError::into_inner) =
            HostAccess { allow_any: c.allow_any_host, hosts: c.allowed_hosts.clone() };
        changed.sort_unstable();
        Ok(changed)
    }
}

/// Limits that apply to every controller of the target.
#[derive(Debug, Clone, Copy)]
pub struct ControllerLimits {
    pub max_io_queues: u16,
    pub io_queue_depth: u16,
    pub cntlid_min: u16,
    pub cntlid_max: u16,
}

/// The whole target.
#[derive(Debug)]
pub struct Target {
    pub limits: ControllerLimits,
    pub listen: Vec<SocketAddr>,
    pub discovery: Arc<Subsystem>,
    subsystems: RwLock<BTreeMap<String, Arc<Subsystem>>>,
    genctr: AtomicU64,
    pub started: Instant,
}

impl Target {
    /// Builds the target from a validated configuration.
    pub fn new(cfg: &Config) -> Result<Target, ConfigError> {
        cfg.validate()?;
        let mut subsystems = BTreeMap::new();
        for s in &cfg.subsystems {
            subsystems.insert(s.nqn.clone(), Arc::new(Subsystem::new(s, cfg.cntlid_min)?));
        }
        Ok(Target {
            limits: ControllerLimits {
                max_io_queues: cfg.max_io_queues,
                io_queue_depth: cfg.io_queue_depth,
                cntlid_min: cfg.cntlid_min,
                cntlid_max: cfg.cntlid_max,
            },
            listen: cfg.listen.clone(),
            discovery: Arc::new(Subsystem::discovery()),
            subsystems: RwLock::new(subsystems),
            genctr: AtomicU64::new(1),
            started: Instant::now(),
        })
    }

    /// Looks up a subsystem (the discovery subsystem included) by NQN.
    pub fn subsystem(&self, nqn: &str) -> Option<Arc<Subsystem>> {
        if nqn == self.discovery.nqn {
            return Some(self.discovery.clone());
        }
        self.subsystems.read().unwrap_or_else(PoisonError::into_inner).get(nqn).cloned()
    }

    /// NVM subsystems `hostnqn` may connect to.
    pub fn visible_subsystems(&self, hostnqn: &str) -> Vec<Arc<Subsystem>> {
        self.subsystems.read().unwrap_or_else(PoisonError::into_inner).values().filter(|s| s.allows(hostnqn)).cloned().collect()
    }

    /// Discovery log generation counter: changes whenever the set of subsystems or their access
    /// lists change.
    pub fn genctr(&self) -> u64 {
        self.genctr.load(Ordering::Acquire)
    }

    /// Applies a reloaded configuration. Listen addresses and controller limits are fixed for the
    /// life of the process; everything about subsystems and namespaces may change. On error,
    /// nothing has been applied to the subsystem that failed or any after it. Hosts attached to a
    /// subsystem whose namespaces changed receive a Namespace Attribute Changed event.
    pub fn reload(&self, cfg: &Config) -> Result<ReloadSummary, ConfigError> {
        cfg.validate()?;
        let mut summary = ReloadSummary::default();
        let mut map = self.subsystems.write().unwrap_or_else(PoisonError::into_inner);
        let mut discovery_changed = false;
        // Build new subsystems first so a failure leaves the map untouched.
        let mut fresh = Vec::new();
        for s in cfg.subsystems.iter().filter(|s| !map.contains_key(&s.nqn)) {
            fresh.push(Arc::new(Subsystem::new(s, cfg.cntlid_min)?));
        }
        for s in &cfg.subsystems {
            if let Some(cur) = map.get(&s.nqn) {
                let before = cur.access.read().unwrap_or_else(PoisonError::into_inner).clone();
                let changed = cur.reconfigure(s)?;
                if *cur.access.read().unwrap_or_else(PoisonError::into_inner) != before {
                    discovery_changed = true;
                }
                if !changed.is_empty() {
                    for c in cur.controllers() {
                        c.namespaces_changed(&changed);
                    }
                    summary.changed_namespaces.push((s.nqn.clone(), changed));
                }
            }
        }
        let wanted: std::collections::BTreeSet<&str> = cfg.subsystems.iter().map(|s| s.nqn.as_str()).collect();
        let removed: Vec<String> = map.keys().filter(|k| !wanted.contains(k.as_str())).cloned().collect();
        for nqn in removed {
            if let Some(s) = map.remove(&nqn) {
                for c in s.controllers() {
                    c.shut_down("subsystem removed from the configuration");
                }
            }
            summary.removed_subsystems.push(nqn);
            discovery_changed = true;
        }
        for s in fresh {
            summary.added_subsystems.push(s.nqn.clone());
            map.insert(s.nqn.clone(), s);
            discovery_changed = true;
        }
        if discovery_changed {
            self.genctr.fetch_add(1, Ordering::AcqRel);
            for c in self.discovery.controllers() {
                c.discovery_log_changed();
            }
        }
        Ok(summary)
    }
}

/// What a reload changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ReloadSummary {
    pub added_subsystems: Vec<String>,
    pub removed_subsystems: Vec<String>,
    pub changed_namespaces: Vec<(String, Vec<u32>)>,
}

/// Builds a namespace outside a subsystem (unit tests of command validation).
#[cfg(test)]
pub fn namespace_for_tests(subnqn: &str, c: &NamespaceConfig) -> Namespace {
    Namespace::from_config(subnqn, c).unwrap_or_else(|e| panic!("{e}"))
}
