//! Managed mode: the target serves the management service's exports.
//!
//! A [`Manager`] task long-polls `GET /v1/exports?after=V&wait_ms=30000`
//! ([`MgmtClient::wait_exports`]): the service answers as soon as its store changes, or after
//! 30 s with the unchanged state, so an idle target makes one request every 30 s and otherwise
//! sleeps. Each new export list is turned into wanted subsystems ([`plan`]): the exports whose
//! `listen` address is one this target listens on, grouped by NQN (a subsystem exists while it
//! has at least one namespace), each namespace backed by a DAOS bdev of the export's volume and
//! identified by the volume's UUID (UUID and NGUID) — or, for an exported snapshot, a read-only
//! handle at the snapshot's epoch with an identity derived from the volume's and the epoch —
//! hosts limited to the export's list (empty: any host). Volumes are opened before the list is applied (opening is asynchronous) and kept
//! open across lists, so an unchanged namespace keeps its volume handle and a grown volume gets a
//! new handle with the new size. The result goes through [`Target::apply_exports`], the same code
//! as a SIGHUP reload of the configuration file: hosts get Namespace Attribute Changed and
//! Discovery Log Change events, controllers of a subsystem that is no longer exported are torn
//! down. Subsystems of the configuration file are never touched; an export naming one of their
//! NQNs is skipped with a warning.
//!
//! If the service cannot be reached the target keeps serving what it has and retries with
//! exponential backoff (0.5 s doubling to 30 s), logging once when the service becomes
//! unreachable and once when it is back. A volume that fails to open is retried the same way.
//! SIGHUP makes the manager ask again at once.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures::future::join_all;
use tessera_client::volume::{Cluster, Volume};
pub use tessera_mgmt_api::serves;
use tessera_mgmt_api::{path_cntlids, ExportInfo, ExportList, Follower, MgmtClient, SnapshotInfo, VhostExportInfo, VolumeInfo};
use tessera_nvme_proto::log::AnaState;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use uuid::Uuid;

use crate::ana::AnaPath;
use crate::config::{check_nqn, DISCOVERY_NQN, MAX_NSID};
use crate::target::{HostAccess, NamespaceSpec, Origin, SubsystemSpec, Target};
use crate::vhost::VhostSet;

/// How long one long poll waits for a change.
pub const LONG_POLL: Duration = Duration::from_secs(30);
/// First retry delay after a failure.
pub const BACKOFF_MIN: Duration = Duration::from_millis(500);
/// Longest retry delay.
pub const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// Model number of managed subsystems (Identify Controller).
pub const MANAGED_MODEL: &str = "Tessera volume";

/// The serial number of a managed subsystem: derived from its NQN, so stable and distinct.
pub fn serial_for(nqn: &str) -> String {
    let u = Uuid::new_v5(&Uuid::NAMESPACE_OID, format!("tessera-subsystem:{nqn}").as_bytes());
    let hex = u.simple().to_string();
    format!("TS{}", hex.get(..18).unwrap_or(&hex))
}

/// One wanted subsystem before its volumes are open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedSubsystem {
    pub nqn: String,
    pub access: HostAccess,
    /// (nsid, volume), by nsid.
    pub namespaces: Vec<(u32, Exported)>,
    /// This target as one of the subsystem's several paths.
    pub ana: Option<AnaPath>,
}

/// Which path of export `e` a target listening on `listen` is, if any: 0 for `listen` (the
/// optimized one), then 1.. for `paths`.
pub fn path_index(listen: &[SocketAddr], e: &ExportInfo) -> Option<usize> {
    std::iter::once(&e.listen).chain(&e.paths).position(|a| serves(listen, a))
}

/// The ANA description of path `index` of export `e` (None for a single-path export).
pub fn ana_path(e: &ExportInfo, index: usize) -> Option<AnaPath> {
    if e.paths.is_empty() {
        return None;
    }
    let (cntlid_min, cntlid_max) = path_cntlids(index);
    let all: Vec<&String> = std::iter::once(&e.listen).chain(&e.paths).collect();
    let peers = all.iter().enumerate().filter(|(i, _)| *i != index).filter_map(|(_, a)| a.parse::<SocketAddr>().ok()).collect();
    let best = e.optimized.as_ref().unwrap_or(&e.listen).parse::<SocketAddr>().ok();
    let state =
        if all.get(index).and_then(|a| a.parse::<SocketAddr>().ok()) == best { AnaState::Optimized } else { AnaState::NonOptimized };
    Some(AnaPath { state, cntlid_min, cntlid_max, peers })
}

/// What one namespace serves: a volume, or a snapshot of it (read-only).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exported {
    /// The volume.
    pub volume: VolumeInfo,
    /// The snapshot served instead of the live volume.
    pub snapshot: Option<SnapshotInfo>,
}

impl From<&VhostExportInfo> for Exported {
    fn from(x: &VhostExportInfo) -> Exported {
        Exported { volume: x.volume.clone(), snapshot: x.snapshot.clone() }
    }
}

impl Exported {
    /// The handle this namespace needs: one per volume, and one per exported snapshot of it.
    fn key(&self) -> (Uuid, Option<u64>) {
        (self.volume.uuid, self.snapshot.as_ref().map(|s| s.epoch))
    }
}

/// What an export list means for this target.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// Wanted subsystems, by NQN.
    pub subsystems: Vec<PlannedSubsystem>,
    /// Exports for this target that cannot be served, with why (one line each).
    pub skipped: Vec<String>,
}

fn check_export(e: &ExportInfo) -> Result<(), String> {
    check_nqn("subsystem nqn", &e.nqn).map_err(|x| x.to_string())?;
    if e.nqn == DISCOVERY_NQN {
        return Err("the discovery NQN cannot be exported".into());
    }
    for h in &e.hosts {
        check_nqn("allowed host", h).map_err(|x| x.to_string())?;
    }
    if !(1..=MAX_NSID).contains(&e.nsid) {
        return Err(format!("nsid {} must be 1 to {MAX_NSID}", e.nsid));
    }
    let v = &e.volume;
    if v.block_size != 512 && v.block_size != 4096 {
        return Err(format!("volume block size {} must be 512 or 4096", v.block_size));
    }
    let size = e.snapshot.as_ref().map_or(v.size, |s| s.size);
    if size == 0 || !size.is_multiple_of(u64::from(v.block_size)) {
        return Err(format!("volume size {size} is not a positive multiple of its block size"));
    }
    Ok(())
}

/// Turns an export list into wanted subsystems for a target listening on `listen`.
/// `config_owned(nqn)` says whether the configuration file serves that NQN (such exports are
/// skipped). Exports of one NQN share a subsystem; its hosts are the union of their lists, and
/// any host may connect only if every list is empty.
pub fn plan(exports: &[ExportInfo], listen: &[SocketAddr], config_owned: impl Fn(&str) -> bool) -> Plan {
    let mut p = Plan::default();
    // Per NQN: hosts, whether every list was empty, namespaces.
    type Grouped = (Vec<String>, bool, BTreeMap<u32, Exported>, Option<AnaPath>);
    let mut subs: BTreeMap<&str, Grouped> = BTreeMap::new();
    for (e, index) in exports.iter().filter_map(|e| path_index(listen, e).map(|i| (e, i))) {
        let snap = e.snapshot.as_ref().map(|s| format!("@{}", s.name)).unwrap_or_default();
        let at = format!("export {} nsid {} (volume {}/{}{snap})", e.nqn, e.nsid, e.volume.pool, e.volume.name);
        if let Err(why) = check_export(e) {
            p.skipped.push(format!("{at}: {why}"));
            continue;
        }
        if config_owned(&e.nqn) {
            p.skipped.push(format!("{at}: the configuration file already serves this NQN"));
            continue;
        }
        let (hosts, any, nss, _) = subs.entry(&e.nqn).or_insert_with(|| (Vec::new(), true, BTreeMap::new(), ana_path(e, index)));
        if nss.contains_key(&e.nsid) {
            p.skipped.push(format!("{at}: nsid exported twice"));
            continue;
        }
        nss.insert(e.nsid, Exported { volume: e.volume.clone(), snapshot: e.snapshot.clone() });
        if !e.hosts.is_empty() {
            *any = false;
        }
        for h in &e.hosts {
            if !hosts.contains(h) {
                hosts.push(h.clone());
            }
        }
    }
    for (nqn, (mut hosts, any, nss, ana)) in subs {
        hosts.sort();
        p.subsystems.push(PlannedSubsystem {
            nqn: nqn.to_string(),
            access: HostAccess { allow_any: any, hosts },
            namespaces: nss.into_iter().collect(),
            ana,
        });
    }
    p
}

/// Follows the management service's exports and applies them to the target.
#[derive(Debug)]
pub struct Manager {
    target: Arc<Target>,
    mgmt: MgmtClient,
    cluster: Arc<Cluster>,
    /// Open volume and snapshot handles by (UUID, snapshot epoch), with what they were opened as.
    volumes: HashMap<(Uuid, Option<u64>), (Exported, Volume)>,
    /// Skipped-export messages last logged (logged again only when they change).
    skipped: Vec<String>,
    /// The vhost-user-blk exports served.
    vhost: VhostSet,
    poke: Arc<Notify>,
}

impl Manager {
    /// A manager of `target` following the service at `addr`.
    pub fn new(target: Arc<Target>, addr: &str) -> Manager {
        let mgmt = MgmtClient::new(addr);
        let cluster = Cluster::new(mgmt.clone());
        target.set_mgmt(mgmt.clone());
        Manager {
            target,
            mgmt,
            cluster,
            volumes: HashMap::new(),
            skipped: Vec::new(),
            vhost: VhostSet::default(),
            poke: Arc::new(Notify::new()),
        }
    }

    /// Notifying it makes the manager ask the service again at once (SIGHUP).
    pub fn poke_handle(&self) -> Arc<Notify> {
        self.poke.clone()
    }

    /// Opens what `plan` and the vhost-user-blk exports `vhost` need and applies them. Returns
    /// whether everything was applied (false: some volume could not be opened, a socket not
    /// bound or the target refused the list; retry later).
    pub async fn apply(&mut self, version: u64, plan: Plan, vhost: &[VhostExportInfo]) -> bool {
        if plan.skipped != self.skipped {
            for s in &plan.skipped {
                warn!(version, "export not served: {s}");
            }
            self.skipped.clone_from(&plan.skipped);
        }
        let mut complete = true;
        // Open every volume that is new or whose description changed (a resize), concurrently.
        let mut wanted: BTreeMap<(Uuid, Option<u64>), Exported> = BTreeMap::new();
        for s in &plan.subsystems {
            for (_, x) in &s.namespaces {
                wanted.insert(x.key(), x.clone());
            }
        }
        for x in vhost.iter().map(Exported::from) {
            wanted.insert(x.key(), x);
        }
        // A snapshot's description in the volume (its list of snapshots, its size) changes with
        // the volume's: only its own size and epoch matter to its handle.
        let same = |cur: &Exported, x: &Exported| match (&cur.snapshot, &x.snapshot) {
            (Some(a), Some(b)) => a == b,
            _ => VolumeInfo { snapshots: Vec::new(), ..cur.volume.clone() } == VolumeInfo { snapshots: Vec::new(), ..x.volume.clone() },
        };
        let to_open: Vec<Exported> =
            wanted.iter().filter(|(k, x)| self.volumes.get(*k).is_none_or(|(cur, _)| !same(cur, x))).map(|(_, x)| x.clone()).collect();
        let opened = join_all(to_open.iter().map(|x| async {
            match &x.snapshot {
                Some(snap) => self.cluster.open_snapshot(&x.volume, snap).await,
                None => self.cluster.open_volume(&x.volume).await,
            }
        }))
        .await;
        for (x, r) in to_open.into_iter().zip(opened) {
            let (info, snapshot) = (&x.volume, x.snapshot.as_ref().map(|s| s.name.as_str()).unwrap_or_default());
            match r {
                Ok(vol) => {
                    info!(pool = %info.pool, volume = %info.name, snapshot, uuid = %info.uuid, size = vol.info().size, class = %info.class, "volume opened");
                    self.volumes.insert(x.key(), (x, vol));
                }
                Err(e) => {
                    // A grown volume that cannot be reopened keeps its old handle (and size).
                    warn!(pool = %info.pool, volume = %info.name, snapshot, "cannot open volume, will retry: {e}");
                    complete = false;
                }
            }
        }
        self.volumes.retain(|id, _| wanted.contains_key(id));
        let mut specs = Vec::new();
        for s in &plan.subsystems {
            let namespaces: Vec<NamespaceSpec> = s
                .namespaces
                .iter()
                .filter_map(|(nsid, x)| self.volumes.get(&x.key()).map(|(_, vol)| NamespaceSpec::from_volume(*nsid, vol.clone())))
                .collect();
            // A subsystem exists while it has a namespace.
            if namespaces.is_empty() {
                continue;
            }
            specs.push(SubsystemSpec {
                nqn: s.nqn.clone(),
                serial: serial_for(&s.nqn),
                model: MANAGED_MODEL.into(),
                access: s.access.clone(),
                namespaces,
                ana: s.ana.clone(),
            });
        }
        let volumes = &self.volumes;
        let open = |x: &VhostExportInfo| volumes.get(&Exported::from(x).key()).map(|(_, v)| v.clone());
        if !self.vhost.apply(vhost, open).await {
            complete = false;
        }
        match self.target.apply_exports(&specs) {
            Ok(sum) => {
                if sum != Default::default() {
                    info!(version, added = ?sum.added_subsystems, removed = ?sum.removed_subsystems, namespaces = ?sum.changed_namespaces, "exports applied");
                }
                for s in specs.iter().filter(|s| sum.added_subsystems.contains(&s.nqn)) {
                    info!(nqn = %s.nqn, namespaces = s.namespaces.len(), allow_any_host = s.access.allow_any, "subsystem ready");
                }
            }
            Err(e) => {
                warn!(version, "cannot apply the exports, will retry: {e}");
                complete = false;
            }
        }
        complete
    }

    /// Takes the reservations of the exports this target serves (list `version`) and tells
    /// hosts what they are owed.
    fn take_reservations(&self, version: u64, exports: &[ExportInfo]) {
        let mut nsids: BTreeMap<&str, Vec<u32>> = BTreeMap::new();
        for e in exports.iter().filter(|e| path_index(&self.target.listen, e).is_some()) {
            nsids.entry(&e.nqn).or_default().push(e.nsid);
            if let Some(s) = self.target.subsystem(&e.nqn).filter(|s| s.origin == Origin::Mgmt) {
                let owed = s.resv.take(e.nsid, version, &e.reservation);
                crate::resv::deliver(&s, e.nsid, &owed);
            }
        }
        for (nqn, ids) in nsids {
            if let Some(s) = self.target.subsystem(nqn).filter(|s| s.origin == Origin::Mgmt) {
                s.resv.retain(&ids);
            }
        }
    }

    /// Follows the service until `shutdown`.
    pub async fn run(mut self, shutdown: CancellationToken) {
        let addr = self.mgmt.addr().to_string();
        let mut after = 0;
        // Ask without waiting first, and after every failure: the answer is the state now.
        let mut ask_now = true;
        let mut applied: Option<(Vec<ExportInfo>, Vec<VhostExportInfo>)> = None;
        let mut reachable: Option<bool> = None;
        let mut backoff = BACKOFF_MIN;
        let mut retry_apply = false;
        let mut me = Follower { listen: self.target.listen.iter().map(ToString::to_string).collect(), taken: 0 };
        loop {
            let wait = if ask_now {
                Duration::ZERO
            } else if retry_apply {
                backoff
            } else {
                LONG_POLL
            };
            let poke = self.poke.clone();
            let r: Result<ExportList, _> = tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = poke.notified() => {
                    ask_now = true;
                    applied = None;
                    continue;
                }
                r = self.mgmt.follow_exports(after, wait, Some(&me)) => r,
            };
            ask_now = false;
            match r {
                Ok(list) => {
                    if reachable != Some(true) {
                        info!(mgmt = %addr, version = list.version, exports = list.exports.len(), "management service reachable");
                        reachable = Some(true);
                    }
                    after = list.version;
                    let now = (list.exports, list.vhost);
                    if applied.as_ref() == Some(&now) {
                        me.taken = list.version;
                        backoff = BACKOFF_MIN;
                        continue;
                    }
                    let target = self.target.clone();
                    let mut p = plan(&now.0, &target.listen, |nqn| target.origin(nqn) == Some(Origin::Config));
                    let (vhost, skipped) = crate::vhost::wanted(&now.1, &target.listen);
                    p.skipped.extend(skipped);
                    let complete = self.apply(list.version, p, &vhost).await;
                    // Reservations are taken whether or not every volume opened: they gate I/O
                    // on what is served, and the service waits for them (see `Follower`).
                    self.take_reservations(list.version, &now.0);
                    me.taken = list.version;
                    if complete {
                        applied = Some(now);
                        retry_apply = false;
                        backoff = BACKOFF_MIN;
                    } else {
                        applied = None;
                        retry_apply = true;
                        backoff = (backoff * 2).min(BACKOFF_MAX);
                    }
                }
                Err(e) => {
                    if reachable != Some(false) {
                        let serving = self.target.subsystem_count(Origin::Mgmt);
                        warn!(mgmt = %addr, subsystems = serving, "management service unreachable; serving what it last exported and retrying: {e}");
                        reachable = Some(false);
                    }
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = poke.notified() => {}
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                    ask_now = true;
                }
            }
        }
        // The VMs' sockets go with the process (their guests see the disk stop answering).
        self.vhost.stop_all().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vol(name: &str, id: u128, bs: u32, size: u64) -> VolumeInfo {
        VolumeInfo {
            pool: "p".into(),
            pool_id: 1,
            name: name.into(),
            uuid: Uuid::from_u128(id),
            size,
            block_size: bs,
            class: "EC_2P1".into(),
            cell_size: 65536,
            chunk_size: 1 << 20,
            checksum: true,
            created: 0,
            snapshots: Vec::new(),
            parent: None,
            flattening: false,
            rollbacks: Vec::new(),
            allocated_bytes: None,
        }
    }

    fn export(nqn: &str, nsid: u32, listen: &str, hosts: &[&str], v: VolumeInfo) -> ExportInfo {
        ExportInfo {
            nqn: nqn.into(),
            nsid,
            hosts: hosts.iter().map(|h| h.to_string()).collect(),
            listen: listen.into(),
            paths: Vec::new(),
            optimized: None,
            volume: v,
            snapshot: None,
            reservation: Default::default(),
        }
    }

    const L: &str = "127.0.0.1:4420";
    const H1: &str = "nqn.2014-08.org.nvmexpress:uuid:1";
    const H2: &str = "nqn.2014-08.org.nvmexpress:uuid:2";

    fn listen() -> Vec<SocketAddr> {
        vec![L.parse().unwrap()]
    }

    #[test]
    fn exports_group_into_subsystems_for_this_listener() {
        let ex = vec![
            export("nqn.2026-11.io.tessera:a", 2, L, &[], vol("v2", 2, 4096, 1 << 20)),
            export("nqn.2026-11.io.tessera:a", 1, L, &[], vol("v1", 1, 4096, 1 << 20)),
            export("nqn.2026-11.io.tessera:b", 1, L, &[H2], vol("v3", 3, 512, 1 << 20)),
            export("nqn.2026-11.io.tessera:b", 2, L, &[H1, H2], vol("v4", 4, 512, 1 << 20)),
            export("nqn.2026-11.io.tessera:other", 1, "127.0.0.1:9999", &[], vol("v5", 5, 512, 1 << 20)),
        ];
        let p = plan(&ex, &listen(), |_| false);
        assert!(p.skipped.is_empty(), "{:?}", p.skipped);
        assert_eq!(p.subsystems.len(), 2);
        let a = &p.subsystems[0];
        assert_eq!(a.nqn, "nqn.2026-11.io.tessera:a");
        assert_eq!(a.access, HostAccess { allow_any: true, hosts: vec![] });
        assert_eq!(a.namespaces.iter().map(|(n, x)| (*n, x.volume.name.as_str())).collect::<Vec<_>>(), vec![(1, "v1"), (2, "v2")]);
        let b = &p.subsystems[1];
        assert_eq!(b.access, HostAccess { allow_any: false, hosts: vec![H1.into(), H2.into()] });
    }

    #[test]
    fn bad_and_conflicting_exports_are_skipped_with_a_reason() {
        let ex = vec![
            export("bogus", 1, L, &[], vol("v1", 1, 4096, 1 << 20)),
            export(DISCOVERY_NQN, 1, L, &[], vol("v1", 1, 4096, 1 << 20)),
            export("nqn.2026-11.io.tessera:a", 0, L, &[], vol("v1", 1, 4096, 1 << 20)),
            export("nqn.2026-11.io.tessera:a", 1, L, &["not an nqn"], vol("v1", 1, 4096, 1 << 20)),
            export("nqn.2026-11.io.tessera:a", 1, L, &[], vol("v1", 1, 1000, 1 << 20)),
            export("nqn.2026-11.io.tessera:a", 1, L, &[], vol("v1", 1, 4096, 4097)),
            export("nqn.2026-11.io.tessera:cfg", 1, L, &[], vol("v1", 1, 4096, 1 << 20)),
            export("nqn.2026-11.io.tessera:ok", 1, L, &[], vol("v1", 1, 4096, 1 << 20)),
            export("nqn.2026-11.io.tessera:ok", 1, L, &[], vol("v9", 9, 4096, 1 << 20)),
        ];
        let p = plan(&ex, &listen(), |n| n.ends_with(":cfg"));
        assert_eq!(p.subsystems.len(), 1);
        assert_eq!(p.subsystems[0].namespaces.len(), 1);
        assert_eq!(p.skipped.len(), 8, "{:#?}", p.skipped);
        for (s, want) in p.skipped.iter().zip([
            "not an NQN",
            "discovery NQN",
            "nsid 0",
            "not an NQN",
            "block size 1000",
            "positive multiple",
            "configuration file already serves",
            "nsid exported twice",
        ]) {
            assert!(s.contains(want), "{s} should say {want}");
        }
    }

    #[test]
    fn every_path_of_a_multipath_export_plans_its_own_state_and_controller_ids() {
        let mut e = export("nqn.2026-12.io.tessera:mp", 1, "127.0.0.1:4420", &[], vol("v1", 1, 4096, 1 << 20));
        e.paths = vec!["127.0.0.1:4421".into(), "127.0.0.1:4422".into()];
        let at_with = |e: &ExportInfo, port: u16| plan(std::slice::from_ref(e), &[format!("127.0.0.1:{port}").parse().unwrap()], |_| false);
        let at = |port: u16| at_with(&e, port);
        let first = at(4420).subsystems[0].ana.clone().unwrap();
        assert_eq!((first.state, first.cntlid_min, first.cntlid_max), (AnaState::Optimized, 1, 0x0FFF));
        assert_eq!(first.peers, vec!["127.0.0.1:4421".parse::<SocketAddr>().unwrap(), "127.0.0.1:4422".parse().unwrap()]);
        let third = at(4422).subsystems[0].ana.clone().unwrap();
        assert_eq!((third.state, third.cntlid_min, third.cntlid_max), (AnaState::NonOptimized, 0x2001, 0x2FFF));
        assert_eq!(third.peers.len(), 2);
        // The optimized path moved to the third: states change, controller IDs do not.
        let mut moved = e.clone();
        moved.optimized = Some("127.0.0.1:4422".into());
        let third = at_with(&moved, 4422).subsystems[0].ana.clone().unwrap();
        assert_eq!((third.state, third.cntlid_min), (AnaState::Optimized, 0x2001));
        assert_eq!(at_with(&moved, 4420).subsystems[0].ana.clone().unwrap().state, AnaState::NonOptimized);
        assert!(at(4423).subsystems.is_empty(), "not a path of it");
        // A single-path export reports no ANA.
        let mut single = e.clone();
        single.paths.clear();
        assert_eq!(at_with(&single, 4420).subsystems[0].ana, None);
    }

    #[test]
    fn serials_are_stable_distinct_and_short() {
        let a = serial_for("nqn.2026-11.io.tessera:a");
        assert_eq!(a, serial_for("nqn.2026-11.io.tessera:a"));
        assert_ne!(a, serial_for("nqn.2026-11.io.tessera:b"));
        assert_eq!(a.len(), 20);
        assert!(a.is_ascii());
    }
}
