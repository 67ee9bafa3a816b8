//! The target's shared state: subsystems, their namespaces and controllers, the discovery
//! generation counter, and configuration reload.
//!
//! Subsystems come from two owners ([`Origin`]): the configuration file (applied at start and on
//! SIGHUP by [`Target::reload`]) and the management service's exports (managed mode, applied by
//! [`Target::apply_exports`]). Both describe the wanted state as [`SubsystemSpec`]s and go through
//! the same [`Target::apply`]; each owner adds, changes and removes only its own subsystems, and
//! an NQN belongs to one owner at a time.
//!
//! Locking: every lock here is a `std::sync` lock held for a lookup or an update, never across an
//! `.await`. The I/O path takes one read lock per command to find its namespace.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};

use tessera_bdev::{Bdev, BdevError, BlockDevice, DaosBdev, MallocBdev, NullBdev};
use tessera_client::volume::Volume;
use tessera_mgmt_api::MgmtClient;
use tessera_nvme_proto::fabrics;

use crate::ana::{AnaCell, AnaPath};
use crate::config::{BdevKind, Config, ConfigError, NamespaceConfig, SubsystemConfig};
use crate::controller::Controller;
use crate::resv::ResvTable;

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

/// Who owns a subsystem.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// The configuration file.
    Config,
    /// The management service (managed mode).
    Mgmt,
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Origin::Config => "the configuration file",
            Origin::Mgmt => "the management service",
        })
    }
}

/// What backs a wanted namespace.
#[derive(Debug, Clone)]
pub enum Backing {
    /// A new malloc bdev.
    Malloc,
    /// A new null bdev.
    Null,
    /// An open volume (opened beforehand: opening is asynchronous, applying is not).
    Daos(Volume),
}

impl Backing {
    /// The bdev module name ([`Bdev::kind`]).
    pub fn kind(&self) -> &'static str {
        match self {
            Backing::Malloc => "malloc",
            Backing::Null => "null",
            Backing::Daos(_) => "daos",
        }
    }
}

/// A wanted namespace.
#[derive(Debug, Clone)]
pub struct NamespaceSpec {
    pub nsid: u32,
    /// UUID, also the NGUID.
    pub uuid: [u8; 16],
    pub block_size: u32,
    pub blocks: u64,
    pub backing: Backing,
}

impl NamespaceSpec {
    /// The namespace a configuration file describes.
    pub fn from_config(subnqn: &str, c: &NamespaceConfig) -> NamespaceSpec {
        let backing = match c.bdev {
            BdevKind::Malloc => Backing::Malloc,
            BdevKind::Null => Backing::Null,
        };
        NamespaceSpec { nsid: c.nsid, uuid: *c.uuid_for(subnqn).as_bytes(), block_size: c.block_size, blocks: c.blocks(), backing }
    }

    /// A namespace serving an open volume; its UUID and NGUID are the volume's UUID, so they are
    /// stable across restarts and re-exports, and its geometry is the volume's.
    pub fn from_volume(nsid: u32, volume: Volume) -> NamespaceSpec {
        let info = volume.info();
        let blocks = if info.block_size == 0 { 0 } else { info.size / u64::from(info.block_size) };
        // A snapshot is another namespace than its volume (a host must never take the two for
        // paths to one namespace): its identity is derived from the volume's and its epoch.
        let uuid = match volume.snapshot() {
            Some((_, epoch)) => uuid::Uuid::new_v5(&info.uuid, &epoch.to_be_bytes()),
            None => info.uuid,
        };
        NamespaceSpec { nsid, uuid: *uuid.as_bytes(), block_size: info.block_size, blocks, backing: Backing::Daos(volume) }
    }
}

/// A wanted subsystem.
#[derive(Debug, Clone)]
pub struct SubsystemSpec {
    pub nqn: String,
    pub serial: String,
    pub model: String,
    pub access: HostAccess,
    pub namespaces: Vec<NamespaceSpec>,
    /// This target as one of several paths to the subsystem (managed exports with several
    /// listen addresses); None: the only path, no ANA reporting.
    pub ana: Option<AnaPath>,
}

impl SubsystemSpec {
    /// The subsystem a configuration file describes.
    pub fn from_config(c: &SubsystemConfig) -> SubsystemSpec {
        SubsystemSpec {
            nqn: c.nqn.clone(),
            serial: c.serial.clone(),
            model: c.model.clone(),
            access: HostAccess { allow_any: c.allow_any_host, hosts: c.allowed_hosts.clone() },
            namespaces: c.namespaces.iter().map(|n| NamespaceSpec::from_config(&c.nqn, n)).collect(),
            ana: None,
        }
    }
}

impl Namespace {
    fn from_spec(n: &NamespaceSpec) -> Result<Namespace, ConfigError> {
        let invalid = |e: BdevError| ConfigError::Invalid(format!("namespace {}: {e}", n.nsid));
        let bdev = match &n.backing {
            Backing::Malloc => Bdev::Malloc(MallocBdev::new(n.block_size, n.blocks).map_err(invalid)?),
            Backing::Null => Bdev::Null(NullBdev::new(n.block_size, n.blocks)),
            Backing::Daos(v) => Bdev::Daos(DaosBdev::new(v.clone()).map_err(invalid)?),
        };
        Ok(Namespace { nsid: n.nsid, uuid: n.uuid, bdev, counters: Counters::default() })
    }

    /// Whether this namespace is the one `n` describes, apart from its size.
    fn same_identity(&self, n: &NamespaceSpec) -> bool {
        let same_volume = match (&self.bdev, &n.backing) {
            (Bdev::Daos(d), Backing::Daos(v)) => d.volume_uuid() == v.info().uuid,
            _ => true,
        };
        self.bdev.kind() == n.backing.kind() && self.bdev.block_size() == n.block_size && self.uuid == n.uuid && same_volume
    }

    /// Grows the namespace to what `n` describes.
    fn grow_to(&self, n: &NamespaceSpec) -> Result<(), BdevError> {
        match (&self.bdev, &n.backing) {
            (Bdev::Daos(d), Backing::Daos(v)) => d.set_volume(v.clone()),
            _ => self.bdev.grow(n.blocks),
        }
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
    /// Who owns it.
    pub origin: Origin,
    pub serial: String,
    pub model: String,
    access: RwLock<HostAccess>,
    namespaces: RwLock<BTreeMap<u32, Arc<Namespace>>>,
    controllers: Mutex<BTreeMap<u16, Arc<Controller>>>,
    next_cntlid: Mutex<u16>,
    /// This target as one of several paths (ANA), if it is.
    pub ana: AnaCell,
    /// Its namespaces' reservations.
    pub resv: ResvTable,
}

impl Subsystem {
    fn new(c: &SubsystemSpec, origin: Origin, cntlid_min: u16) -> Result<Subsystem, ConfigError> {
        let mut namespaces = BTreeMap::new();
        for n in &c.namespaces {
            namespaces.insert(n.nsid, Arc::new(Namespace::from_spec(n)?));
        }
        Ok(Subsystem {
            nqn: c.nqn.clone(),
            origin,
            serial: c.serial.clone(),
            model: c.model.clone(),
            access: RwLock::new(c.access.clone()),
            namespaces: RwLock::new(namespaces),
            controllers: Mutex::new(BTreeMap::new()),
            next_cntlid: Mutex::new(c.ana.as_ref().map_or(cntlid_min, |a| a.cntlid_min)),
            ana: AnaCell::new(c.ana.clone()),
            resv: ResvTable::default(),
        })
    }

    /// The controller IDs this subsystem hands out here: its path's range, or the target's.
    pub fn cntlid_range(&self, limits: &ControllerLimits) -> (u16, u16) {
        self.ana.get().map_or((limits.cntlid_min, limits.cntlid_max), |a| (a.cntlid_min, a.cntlid_max))
    }

    /// A subsystem with no namespaces that any host may use (the discovery subsystem).
    pub fn discovery() -> Subsystem {
        Subsystem {
            nqn: crate::config::DISCOVERY_NQN.into(),
            origin: Origin::Config,
            serial: "TESSERADISCOVERY".into(),
            model: "Tessera discovery".into(),
            access: RwLock::new(HostAccess { allow_any: true, hosts: Vec::new() }),
            namespaces: RwLock::new(BTreeMap::new()),
            controllers: Mutex::new(BTreeMap::new()),
            next_cntlid: Mutex::new(1),
            ana: AnaCell::default(),
            resv: ResvTable::default(),
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

    pub fn controllers(&self) -> Vec<Arc<Controller>> {
        self.controllers.lock().unwrap_or_else(PoisonError::into_inner).values().cloned().collect()
    }

    /// Applies a new description of this subsystem: adds, grows and removes namespaces and
    /// updates host access. A namespace whose identity (bdev kind, block size, UUID, volume)
    /// changed or that shrank is refused, or with `replace` swapped for a new one (the
    /// management service's view is authoritative: an export re-created on another volume).
    /// Unchanged namespaces keep their bdev. Returns the NSIDs whose attributes changed.
    fn reconfigure(&self, c: &SubsystemSpec, replace: bool) -> Result<Vec<u32>, ConfigError> {
        let mut changed = Vec::new();
        let mut map = self.namespaces.write().unwrap_or_else(PoisonError::into_inner);
        // Validate every change before applying any.
        for n in c.namespaces.iter().filter(|_| !replace) {
            if let Some(cur) = map.get(&n.nsid) {
                if !cur.same_identity(n) {
                    return Err(ConfigError::Invalid(format!(
                        "subsystem {:?} namespace {}: only size_mib can change while serving (remove it and add it under a new nsid)",
                        c.nqn, n.nsid
                    )));
                }
                if n.blocks < cur.bdev.num_blocks() {
                    return Err(ConfigError::Invalid(format!("subsystem {:?} namespace {}: shrinking is not supported", c.nqn, n.nsid)));
                }
            }
        }
        let wanted: BTreeMap<u32, &NamespaceSpec> = c.namespaces.iter().map(|n| (n.nsid, n)).collect();
        map.retain(|id, _| {
            let keep = wanted.contains_key(id);
            if !keep {
                changed.push(*id);
            }
            keep
        });
        for (id, n) in wanted {
            match map.get(&id) {
                Some(cur) if replace && (!cur.same_identity(n) || n.blocks < cur.bdev.num_blocks()) => {
                    map.insert(id, Arc::new(Namespace::from_spec(n)?));
                    changed.push(id);
                }
                Some(cur) if n.blocks > cur.bdev.num_blocks() => {
                    cur.grow_to(n).map_err(|e| ConfigError::Invalid(format!("namespace {id}: {e}")))?;
                    changed.push(id);
                }
                Some(_) => {}
                None => {
                    map.insert(id, Arc::new(Namespace::from_spec(n)?));
                    changed.push(id);
                }
            }
        }
        *self.access.write().unwrap_or_else(PoisonError::into_inner) = c.access.clone();
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
    /// How long a queue that was just active keeps polling its socket ([`Config::poll_us`]).
    pub poll: Duration,
    pub listen: Vec<SocketAddr>,
    pub discovery: Arc<Subsystem>,
    subsystems: RwLock<BTreeMap<String, Arc<Subsystem>>>,
    genctr: AtomicU64,
    pub started: Instant,
    mgmt: std::sync::OnceLock<MgmtClient>,
}

impl Target {
    /// Builds the target from a validated configuration.
    pub fn new(cfg: &Config) -> Result<Target, ConfigError> {
        cfg.validate()?;
        let mut subsystems = BTreeMap::new();
        for s in &cfg.subsystems {
            subsystems.insert(s.nqn.clone(), Arc::new(Subsystem::new(&SubsystemSpec::from_config(s), Origin::Config, cfg.cntlid_min)?));
        }
        Ok(Target {
            limits: ControllerLimits {
                max_io_queues: cfg.max_io_queues,
                io_queue_depth: cfg.io_queue_depth,
                cntlid_min: cfg.cntlid_min,
                cntlid_max: cfg.cntlid_max,
            },
            poll: Duration::from_micros(u64::from(cfg.poll_us)),
            listen: cfg.listen.clone(),
            discovery: Arc::new(Subsystem::discovery()),
            subsystems: RwLock::new(subsystems),
            genctr: AtomicU64::new(1),
            started: Instant::now(),
            mgmt: std::sync::OnceLock::new(),
        })
    }

    /// In managed mode: the service that keeps the reservations of its subsystems.
    pub fn set_mgmt(&self, mgmt: MgmtClient) {
        let _ = self.mgmt.set(mgmt);
    }

    /// The service of managed subsystems, once the manager set it.
    pub fn mgmt(&self) -> Option<&MgmtClient> {
        self.mgmt.get()
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

    /// Number of subsystems owned by `origin`.
    pub fn subsystem_count(&self, origin: Origin) -> usize {
        self.subsystems.read().unwrap_or_else(PoisonError::into_inner).values().filter(|s| s.origin == origin).count()
    }

    /// Who owns subsystem `nqn`, if it exists.
    pub fn origin(&self, nqn: &str) -> Option<Origin> {
        self.subsystems.read().unwrap_or_else(PoisonError::into_inner).get(nqn).map(|s| s.origin)
    }

    /// Applies a reloaded configuration file to the subsystems it owns (those of the management
    /// service stay). Listen addresses and controller limits are fixed for the life of the
    /// process; everything about subsystems and namespaces may change. On error, nothing has
    /// been applied to the subsystem that failed or any after it. Hosts attached to a subsystem
    /// whose namespaces changed receive a Namespace Attribute Changed event.
    pub fn reload(&self, cfg: &Config) -> Result<ReloadSummary, ConfigError> {
        cfg.validate()?;
        let specs: Vec<SubsystemSpec> = cfg.subsystems.iter().map(SubsystemSpec::from_config).collect();
        self.apply(Origin::Config, &specs, false)
    }

    /// Applies the management service's exports (already filtered to this target, volumes open)
    /// to the subsystems it owns. A namespace whose volume changed is replaced rather than
    /// refused.
    pub fn apply_exports(&self, specs: &[SubsystemSpec]) -> Result<ReloadSummary, ConfigError> {
        self.apply(Origin::Mgmt, specs, true)
    }

    /// Makes the subsystems owned by `origin` what `specs` describe: adds, changes and removes
    /// them. A spec naming a subsystem of the other owner is refused before anything changes.
    pub fn apply(&self, origin: Origin, specs: &[SubsystemSpec], replace: bool) -> Result<ReloadSummary, ConfigError> {
        let mut summary = ReloadSummary::default();
        let mut map = self.subsystems.write().unwrap_or_else(PoisonError::into_inner);
        let mut discovery_changed = false;
        for s in specs {
            if let Some(cur) = map.get(&s.nqn).filter(|cur| cur.origin != origin) {
                return Err(ConfigError::Invalid(format!("subsystem {:?} is already served from {}", s.nqn, cur.origin)));
            }
        }
        // A subsystem that starts or stops being one of several paths is made anew: what its
        // controllers told their hosts (CMIC, controller IDs) cannot change under them.
        let remade: Vec<&SubsystemSpec> =
            specs.iter().filter(|s| map.get(&s.nqn).is_some_and(|cur| cur.ana.get().is_some() != s.ana.is_some())).collect();
        // Build new subsystems first so a failure leaves the map untouched.
        let mut fresh = Vec::new();
        for s in specs.iter().filter(|s| !map.contains_key(&s.nqn) || remade.iter().any(|r| r.nqn == s.nqn)) {
            fresh.push(Arc::new(Subsystem::new(s, origin, self.limits.cntlid_min)?));
        }
        for s in &remade {
            if let Some(old) = map.remove(&s.nqn) {
                for c in old.controllers() {
                    c.shut_down("the subsystem's paths changed");
                }
                summary.removed_subsystems.push(s.nqn.clone());
            }
        }
        for s in specs {
            if let Some(cur) = map.get(&s.nqn) {
                if cur.ana.set(s.ana.clone()) {
                    for c in cur.controllers() {
                        c.ana_changed();
                    }
                    discovery_changed = true;
                }
                let before = cur.access.read().unwrap_or_else(PoisonError::into_inner).clone();
                let changed = cur.reconfigure(s, replace)?;
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
        let wanted: std::collections::BTreeSet<&str> = specs.iter().map(|s| s.nqn.as_str()).collect();
        let removed: Vec<String> =
            map.iter().filter(|(k, s)| s.origin == origin && !wanted.contains(k.as_str())).map(|(k, _)| k.clone()).collect();
        for nqn in removed {
            if let Some(s) = map.remove(&nqn) {
                let why = match origin {
                    Origin::Config => "subsystem removed from the configuration",
                    Origin::Mgmt => "subsystem no longer exported by the management service",
                };
                for c in s.controllers() {
                    c.shut_down(why);
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
    Namespace::from_spec(&NamespaceSpec::from_config(subnqn, c)).unwrap_or_else(|e| panic!("{e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(nqn: &str, nss: &[(u32, u8, u64)]) -> SubsystemSpec {
        SubsystemSpec {
            nqn: nqn.into(),
            serial: "S".into(),
            model: "M".into(),
            access: HostAccess { allow_any: true, hosts: Vec::new() },
            namespaces: nss
                .iter()
                .map(|&(nsid, id, blocks)| NamespaceSpec { nsid, uuid: [id; 16], block_size: 512, blocks, backing: Backing::Malloc })
                .collect(),
            ana: None,
        }
    }

    fn config_target() -> Target {
        let mut cfg = Config::default();
        cfg.subsystems[0].nqn = "nqn.cfg".into();
        Target::new(&cfg).unwrap()
    }

    #[test]
    fn each_owner_changes_only_its_own_subsystems() {
        let t = config_target();
        let s = t.apply(Origin::Mgmt, &[spec("nqn.m1", &[(1, 1, 100)]), spec("nqn.m2", &[(1, 2, 100)])], true).unwrap();
        assert_eq!(s.added_subsystems, vec!["nqn.m1", "nqn.m2"]);
        assert_eq!((t.subsystem_count(Origin::Config), t.subsystem_count(Origin::Mgmt)), (1, 2));
        assert_eq!(t.origin("nqn.m1"), Some(Origin::Mgmt));
        // A config reload with no subsystems removes only the file's.
        let s = t.reload(&Config::empty()).unwrap();
        assert_eq!(s.removed_subsystems, vec!["nqn.cfg"]);
        assert_eq!(t.subsystem_count(Origin::Mgmt), 2);
        let t = config_target();
        t.apply(Origin::Mgmt, &[spec("nqn.m1", &[(1, 1, 100)])], true).unwrap();
        // The service dropping everything removes only its own.
        let s = t.apply_exports(&[]).unwrap();
        assert_eq!(s.removed_subsystems, vec!["nqn.m1"]);
        assert_eq!(t.origin("nqn.cfg"), Some(Origin::Config));
        // An NQN belongs to one owner.
        let e = t.apply_exports(&[spec("nqn.cfg", &[(1, 1, 100)])]).unwrap_err();
        assert!(e.to_string().contains("already served from the configuration file"), "{e}");
        t.apply_exports(&[spec("nqn.m1", &[(1, 1, 100)])]).unwrap();
        let mut cfg = Config::default();
        cfg.subsystems[0].nqn = "nqn.m1".into();
        assert!(t.reload(&cfg).unwrap_err().to_string().contains("management service"));
        assert_eq!(t.origin("nqn.cfg"), Some(Origin::Config), "a refused reload changes nothing");
    }

    #[test]
    fn managed_namespaces_are_kept_grown_replaced_or_removed() {
        let t = config_target();
        t.apply_exports(&[spec("nqn.m", &[(1, 1, 100), (2, 2, 100), (3, 3, 100)])]).unwrap();
        let sub = t.subsystem("nqn.m").unwrap();
        let before: Vec<Arc<Namespace>> = sub.namespaces();
        // nsid 1 unchanged, 2 grown, 3 re-created on another volume (uuid), 4 new; nothing removed.
        let s = t.apply_exports(&[spec("nqn.m", &[(1, 1, 100), (2, 2, 200), (3, 9, 100), (4, 4, 100)])]).unwrap();
        assert_eq!(s.changed_namespaces, vec![("nqn.m".to_string(), vec![2, 3, 4])]);
        let after = sub.namespaces();
        assert!(Arc::ptr_eq(&before[0], &after[0]), "unchanged namespace keeps its bdev");
        assert!(Arc::ptr_eq(&before[1], &after[1]), "grown in place");
        assert_eq!(after[1].bdev.num_blocks(), 200);
        assert!(!Arc::ptr_eq(&before[2], &after[2]));
        assert_eq!(after[2].uuid, [9; 16]);
        // A shrink replaces too (the service is authoritative); the file's reload refuses it.
        t.apply_exports(&[spec("nqn.m", &[(1, 1, 50)])]).unwrap();
        assert_eq!(sub.namespaces().len(), 1);
        assert_eq!(sub.namespace(1).unwrap().bdev.num_blocks(), 50);
        let mut cfg = Config::default();
        cfg.subsystems[0].nqn = "nqn.cfg".into();
        cfg.subsystems[0].namespaces[0].size_mib = 1;
        assert!(t.reload(&cfg).unwrap_err().to_string().contains("shrinking"));
        cfg.subsystems[0].namespaces[0].size_mib = 1024;
        cfg.subsystems[0].namespaces[0].bdev = BdevKind::Null;
        assert!(t.reload(&cfg).unwrap_err().to_string().contains("only size_mib"));
    }

    #[test]
    fn host_access_changes_bump_the_discovery_generation() {
        let t = config_target();
        t.apply_exports(&[spec("nqn.m", &[(1, 1, 100)])]).unwrap();
        let g = t.genctr();
        let mut s = spec("nqn.m", &[(1, 1, 100)]);
        s.access = HostAccess { allow_any: false, hosts: vec!["nqn.h".into()] };
        t.apply_exports(std::slice::from_ref(&s)).unwrap();
        assert!(t.genctr() > g);
        assert!(t.visible_subsystems("nqn.other").iter().all(|x| x.nqn != "nqn.m"));
        assert!(t.visible_subsystems("nqn.h").iter().any(|x| x.nqn == "nqn.m"));
        let g = t.genctr();
        t.apply_exports(&[s]).unwrap();
        assert_eq!(t.genctr(), g, "no change, no new generation");
    }
}
