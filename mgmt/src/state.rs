//! The service's metadata as one value ([`State`]): the system map (engines), pools with their
//! pool maps, volumes and exports, and its encoding as keys and values ([`State::to_kv`],
//! [`State::from_kv`]) which every [`crate::store::Store`] persists.
//!
//! Pure data: no I/O. Every record is its own key, so a transaction writes only the records it
//! changed and the layout maps one to one onto an etcd keyspace:
//!
//! | key | value (JSON) |
//! |---|---|
//! | `engine/<rank, 10 digits>` | [`EngineRec`] |
//! | `pool/<name>` | [`PoolRec`] (with its pool map) |
//! | `volume/<pool>/<name>` | [`VolumeRec`] |
//! | `export/<nqn>/<nsid, 10 digits>` | [`ExportRec`] |
//! | `vhost/<socket path>` | [`VhostExportRec`] |
//! | `meta/next_pool_id` | the next pool id (`u32`) |

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use tessera_mgmt_api::{EngineState, PoolTarget, Reservation, TargetStateName};
use tessera_placement::placement::TargetState;
use uuid::Uuid;

/// An engine of the system map.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EngineRec {
    /// Rank.
    pub rank: u32,
    /// Identity the rank is bound to.
    pub uuid: Uuid,
    /// RPC address (`ip:port`).
    pub address: String,
    /// Fault domain.
    pub fault_domain: String,
    /// Number of targets.
    pub targets: u16,
    /// Capacity of each target, bytes.
    pub target_capacity: u64,
    /// Up or Down.
    pub state: EngineState,
}

/// A pool and its pool map.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolRec {
    /// Name.
    pub name: String,
    /// Identity.
    pub uuid: Uuid,
    /// Numeric id, never reused.
    pub pool_id: u32,
    /// Default object class of new volumes (canonical spelling).
    pub default_class: String,
    /// Pool map version.
    pub map_version: u32,
    /// Pool map targets, sorted by (rank, index).
    pub targets: Vec<PoolTarget>,
    /// Version of the base map: the last *settled* map (no target DOWN or UP). Records stored
    /// before rebuilds existed have none (0 with no targets): the current map is the base.
    #[serde(default)]
    pub base_version: u32,
    /// Targets of the base map (empty: the current map is the base).
    #[serde(default)]
    pub base_targets: Vec<PoolTarget>,
    /// How many targets redundancy groups are counted from: the pool's size at creation, kept
    /// when it is extended (`PoolMap::group_targets`). 0 (records stored before extensions
    /// existed): all of `targets`.
    #[serde(default)]
    pub group_targets: u32,
    /// The HLC epoch at which the current map version took effect (0: stored before this was
    /// recorded). Writes planned with this map carry later epochs.
    #[serde(default)]
    pub map_epoch: u64,
}

impl PoolRec {
    /// Whether the map is settled: no target DOWN (being rebuilt elsewhere) or UP (being
    /// reintegrated).
    pub fn settled(&self) -> bool {
        self.targets.iter().all(|t| matches!(t.state, TargetStateName::UpIn | TargetStateName::DownOut))
    }

    /// The base map's version and targets (the current map when none is stored).
    pub fn base(&self) -> (u32, &[PoolTarget]) {
        if self.base_targets.is_empty() {
            (self.map_version, &self.targets)
        } else {
            (self.base_version, &self.base_targets)
        }
    }
}

/// A volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeRec {
    /// Pool name.
    pub pool: String,
    /// Name.
    pub name: String,
    /// Identity (container and object id of its data).
    pub uuid: Uuid,
    /// Size, bytes.
    pub size: u64,
    /// Block size, bytes.
    pub block_size: u32,
    /// Object class (canonical spelling).
    pub class: String,
    /// Cell size, bytes.
    pub cell_size: u32,
    /// Chunk size, bytes.
    pub chunk_size: u64,
    /// End-to-end checksums.
    pub checksum: bool,
    /// Creation time, seconds since the Unix epoch.
    pub created: u64,
    /// Snapshots, oldest first (ascending epochs).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub snapshots: Vec<SnapshotRec>,
    /// The snapshot this volume is a clone of (same pool), until it is flattened.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<CloneOf>,
    /// A flatten is copying the parent's data into this clone: it cannot be exported meanwhile.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub flattening: bool,
    /// Rollbacks, oldest first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rollbacks: Vec<RollbackRec>,
}

/// A rollback: from epoch `at` on, what was written at or below `at` reads as of `to`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RollbackRec {
    /// The rollback's epoch.
    pub at: u64,
    /// The snapshot's epoch.
    pub to: u64,
    /// The snapshot's name.
    pub snapshot: String,
}

/// The snapshot a clone reads through to where it has not written.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CloneOf {
    /// The parent volume's name.
    pub volume: String,
    /// Its uuid (the parent is never renamed, but names can be reused after a delete).
    pub uuid: Uuid,
    /// The snapshot's name.
    pub snapshot: String,
    /// The snapshot's epoch.
    pub epoch: u64,
}

/// A snapshot of a volume: a retained epoch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotRec {
    /// Name, unique in its volume.
    pub name: String,
    /// The epoch it holds the volume at.
    pub epoch: u64,
    /// Creation time, seconds since the Unix epoch.
    pub created: u64,
    /// The volume's size then, bytes.
    pub size: u64,
}

/// An export: one volume as namespace `nsid` of subsystem `nqn`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExportRec {
    /// Subsystem NQN.
    pub nqn: String,
    /// Namespace id.
    pub nsid: u32,
    /// Allowed host NQNs (empty = any).
    pub hosts: Vec<String>,
    /// Listen address (the optimized path).
    pub listen: String,
    /// Further paths.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub paths: Vec<String>,
    /// The optimized path when it is not `listen` (one of `paths`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub optimized: Option<String>,
    /// Pool name.
    pub pool: String,
    /// Volume name.
    pub volume: String,
    /// The snapshot of the volume served (read-only) instead of the volume.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<String>,
    /// The namespace's NVMe reservation: kept here so that it holds on every path of the
    /// subsystem and survives a target's restart; it goes with the export.
    #[serde(default, skip_serializing_if = "Reservation::is_empty")]
    pub reservation: Reservation,
}

/// A vhost-user-blk export: one volume (or snapshot) as a VM disk on a UNIX socket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VhostExportRec {
    /// Absolute socket path.
    pub socket: String,
    /// Listen address of the `tessera-nvmf` that serves it.
    pub target: String,
    /// Request queues.
    pub queues: u16,
    /// Offered read-only.
    pub read_only: bool,
    /// Pool name.
    pub pool: String,
    /// Volume name.
    pub volume: String,
    /// The snapshot of the volume served instead of the volume.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<String>,
}

/// Everything the service knows, as of one store version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct State {
    /// Engines by rank.
    pub engines: BTreeMap<u32, EngineRec>,
    /// Pools by name.
    pub pools: BTreeMap<String, PoolRec>,
    /// Volumes by (pool, name).
    pub volumes: BTreeMap<(String, String), VolumeRec>,
    /// Exports by (nqn, nsid).
    pub exports: BTreeMap<(String, u32), ExportRec>,
    /// vhost-user-blk exports by socket path.
    pub vhost_exports: BTreeMap<String, VhostExportRec>,
    /// Id of the next pool (ids are never reused).
    pub next_pool_id: u32,
}

impl Default for State {
    fn default() -> Self {
        State {
            engines: BTreeMap::new(),
            pools: BTreeMap::new(),
            volumes: BTreeMap::new(),
            exports: BTreeMap::new(),
            vhost_exports: BTreeMap::new(),
            next_pool_id: 1,
        }
    }
}

/// The encoded state did not decode.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("stored key {key:?}: {detail}")]
pub struct DecodeError {
    /// The offending key.
    pub key: String,
    /// What is wrong with it.
    pub detail: String,
}

const NEXT_POOL_ID: &str = "meta/next_pool_id";

/// Key of an engine record.
pub fn engine_key(rank: u32) -> String {
    format!("engine/{rank:010}")
}

/// Key of a pool record.
pub fn pool_key(name: &str) -> String {
    format!("pool/{name}")
}

/// Key of a volume record.
pub fn volume_key(pool: &str, name: &str) -> String {
    format!("volume/{pool}/{name}")
}

/// Key of an export record.
pub fn export_key(nqn: &str, nsid: u32) -> String {
    format!("export/{nqn}/{nsid:010}")
}

/// Key of a vhost-user-blk export record.
pub fn vhost_key(socket: &str) -> String {
    format!("vhost/{socket}")
}

fn json<T: Serialize>(v: &T) -> Vec<u8> {
    // Serialising these plain structs (string keys, no maps with non-string keys) cannot fail.
    serde_json::to_vec(v).unwrap_or_default()
}

impl State {
    /// The state as keys and values (see the module docs).
    pub fn to_kv(&self) -> BTreeMap<String, Vec<u8>> {
        let mut kv = BTreeMap::new();
        kv.insert(NEXT_POOL_ID.to_string(), json(&self.next_pool_id));
        for e in self.engines.values() {
            kv.insert(engine_key(e.rank), json(e));
        }
        for p in self.pools.values() {
            kv.insert(pool_key(&p.name), json(p));
        }
        for v in self.volumes.values() {
            kv.insert(volume_key(&v.pool, &v.name), json(v));
        }
        for x in self.exports.values() {
            kv.insert(export_key(&x.nqn, x.nsid), json(x));
        }
        for x in self.vhost_exports.values() {
            kv.insert(vhost_key(&x.socket), json(x));
        }
        kv
    }

    /// The state from keys and values written by [`State::to_kv`]. Every record must sit under
    /// its own key and refer only to records that exist.
    pub fn from_kv<'a, I>(kv: I) -> Result<State, DecodeError>
    where
        I: IntoIterator<Item = (&'a str, &'a [u8])>,
    {
        fn parse<T: for<'de> Deserialize<'de>>(key: &str, value: &[u8]) -> Result<T, DecodeError> {
            serde_json::from_slice(value).map_err(|e| DecodeError { key: key.to_string(), detail: e.to_string() })
        }
        let mut s = State::default();
        let (mut seen_next, mut empty) = (false, true);
        for (key, value) in kv {
            empty = false;
            let misplaced = |expected: String| {
                if expected == key {
                    Ok(())
                } else {
                    Err(DecodeError { key: key.to_string(), detail: format!("record belongs under {expected:?}") })
                }
            };
            if key == NEXT_POOL_ID {
                s.next_pool_id = parse(key, value)?;
                seen_next = true;
            } else if key.starts_with("engine/") {
                let e: EngineRec = parse(key, value)?;
                misplaced(engine_key(e.rank))?;
                s.engines.insert(e.rank, e);
            } else if key.starts_with("pool/") {
                let p: PoolRec = parse(key, value)?;
                misplaced(pool_key(&p.name))?;
                s.pools.insert(p.name.clone(), p);
            } else if key.starts_with("volume/") {
                let v: VolumeRec = parse(key, value)?;
                misplaced(volume_key(&v.pool, &v.name))?;
                s.volumes.insert((v.pool.clone(), v.name.clone()), v);
            } else if key.starts_with("export/") {
                let x: ExportRec = parse(key, value)?;
                misplaced(export_key(&x.nqn, x.nsid))?;
                s.exports.insert((x.nqn.clone(), x.nsid), x);
            } else if key.starts_with("vhost/") {
                let x: VhostExportRec = parse(key, value)?;
                misplaced(vhost_key(&x.socket))?;
                s.vhost_exports.insert(x.socket.clone(), x);
            } else {
                return Err(DecodeError { key: key.to_string(), detail: "unknown key".into() });
            }
        }
        let broken = |key: String, detail: String| Err(DecodeError { key, detail });
        if !seen_next && !empty {
            return broken(NEXT_POOL_ID.into(), "missing".into());
        }
        for p in s.pools.values() {
            if p.pool_id >= s.next_pool_id {
                return broken(pool_key(&p.name), format!("pool id {} not below the next pool id {}", p.pool_id, s.next_pool_id));
            }
            if let Some(t) = p.targets.iter().find(|t| !s.engines.contains_key(&t.rank)) {
                return broken(pool_key(&p.name), format!("target on unknown engine rank {}", t.rank));
            }
        }
        for v in s.volumes.values() {
            if !s.pools.contains_key(&v.pool) {
                return broken(volume_key(&v.pool, &v.name), "volume of an unknown pool".into());
            }
        }
        for x in s.exports.values() {
            if !s.volumes.contains_key(&(x.pool.clone(), x.volume.clone())) {
                return broken(export_key(&x.nqn, x.nsid), "export of an unknown volume".into());
            }
        }
        for x in s.vhost_exports.values() {
            if !s.volumes.contains_key(&(x.pool.clone(), x.volume.clone())) {
                return broken(vhost_key(&x.socket), "export of an unknown volume".into());
            }
        }
        Ok(s)
    }

    /// The volumes of one pool, by name.
    pub fn pool_volumes<'a>(&'a self, pool: &'a str) -> impl Iterator<Item = &'a VolumeRec> + 'a {
        self.volumes.range((pool.to_string(), String::new())..).map(|(_, v)| v).take_while(move |v| v.pool == pool)
    }

    /// The export of a volume itself (not of a snapshot of it), if it is exported.
    pub fn export_of(&self, pool: &str, volume: &str) -> Option<&ExportRec> {
        self.exports.values().find(|x| x.pool == pool && x.volume == volume && x.snapshot.is_none())
    }

    /// The export of a volume's snapshot `snapshot`, if any.
    pub fn snapshot_export(&self, pool: &str, volume: &str, snapshot: &str) -> Option<&ExportRec> {
        self.exports.values().find(|x| x.pool == pool && x.volume == volume && x.snapshot.as_deref() == Some(snapshot))
    }

    /// The vhost-user-blk export of a volume itself (`snapshot` None) or of one of its snapshots.
    pub fn vhost_export_of(&self, pool: &str, volume: &str, snapshot: Option<&str>) -> Option<&VhostExportRec> {
        self.vhost_exports.values().find(|x| x.pool == pool && x.volume == volume && x.snapshot.as_deref() == snapshot)
    }

    /// How a volume itself (`snapshot` None) or one of its snapshots is served, for messages:
    /// `namespace N of NQN`, `the vhost-user-blk disk on PATH`, or both; None if it is not.
    pub fn served_as(&self, pool: &str, volume: &str, snapshot: Option<&str>) -> Option<String> {
        let nvme = match snapshot {
            Some(snap) => self.snapshot_export(pool, volume, snap),
            None => self.export_of(pool, volume),
        };
        let mut ways: Vec<String> = nvme.map(|x| format!("namespace {} of {}", x.nsid, x.nqn)).into_iter().collect();
        ways.extend(self.vhost_export_of(pool, volume, snapshot).map(|x| format!("the vhost-user-blk disk on {}", x.socket)));
        (!ways.is_empty()).then(|| ways.join(" and "))
    }
}

/// The placement state of an API target state.
pub fn to_placement(s: TargetStateName) -> TargetState {
    match s {
        TargetStateName::Up => TargetState::Up,
        TargetStateName::Down => TargetState::Down,
        TargetStateName::DownOut => TargetState::DownOut,
        TargetStateName::UpIn => TargetState::UpIn,
    }
}

/// The API name of a placement target state.
pub fn to_api(s: TargetState) -> TargetStateName {
    match s {
        TargetState::Up => TargetStateName::Up,
        TargetState::Down => TargetStateName::Down,
        TargetState::DownOut => TargetStateName::DownOut,
        TargetState::UpIn => TargetStateName::UpIn,
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A state with two engines, a pool over them, a volume and its export.
    pub(crate) fn sample() -> State {
        let mut s = State::default();
        for rank in 0..2u32 {
            s.engines.insert(
                rank,
                EngineRec {
                    rank,
                    uuid: Uuid::from_u128(u128::from(rank) + 1),
                    address: format!("127.0.0.1:{}", 10000 + rank),
                    fault_domain: format!("rank-{rank}"),
                    targets: 2,
                    target_capacity: 1 << 30,
                    state: EngineState::Up,
                },
            );
        }
        let targets: Vec<PoolTarget> = (0..2u32)
            .flat_map(|rank| {
                (0..2u16).map(move |index| PoolTarget {
                    rank,
                    index,
                    state: TargetStateName::UpIn,
                    fseq: 0,
                    since_epoch: 0,
                    drained: false,
                    added: 0,
                })
            })
            .collect();
        s.pools.insert(
            "p".into(),
            PoolRec {
                name: "p".into(),
                uuid: Uuid::from_u128(9),
                pool_id: 1,
                default_class: "RP_2".into(),
                map_version: 1,
                base_version: 1,
                base_targets: targets.clone(),
                targets,
                group_targets: 0,
                map_epoch: 0,
            },
        );
        s.next_pool_id = 2;
        s.volumes.insert(
            ("p".into(), "v".into()),
            VolumeRec {
                pool: "p".into(),
                name: "v".into(),
                uuid: Uuid::from_u128(10),
                size: 1 << 20,
                block_size: 4096,
                class: "RP_2".into(),
                cell_size: 65536,
                chunk_size: 1 << 20,
                checksum: true,
                created: 5,
                snapshots: vec![SnapshotRec { name: "s1".into(), epoch: 1 << 40, created: 6, size: 1 << 20 }],
                parent: Some(CloneOf { volume: "base".into(), uuid: Uuid::from_u128(9), snapshot: "gold".into(), epoch: 1 << 39 }),
                flattening: true,
                rollbacks: vec![RollbackRec { at: 1 << 41, to: 1 << 40, snapshot: "s1".into() }],
            },
        );
        s.exports.insert(
            ("nqn.2026-01.io.x:a".into(), 1),
            ExportRec {
                nqn: "nqn.2026-01.io.x:a".into(),
                nsid: 1,
                hosts: vec![],
                listen: "127.0.0.1:4420".into(),
                paths: vec!["127.0.0.1:4421".into()],
                optimized: Some("127.0.0.1:4421".into()),
                pool: "p".into(),
                volume: "v".into(),
                snapshot: None,
                reservation: {
                    let mut r = Reservation::default();
                    r.state.registrants.push(tessera_nvme_resv::Registrant { host: [7; 16], key: 0xABCD });
                    r.state.reservation =
                        Some(tessera_nvme_resv::Held { rtype: tessera_nvme_resv::RType::WriteExclusive, holder: Some([7; 16]) });
                    r.record(&[tessera_nvme_resv::Notice { host: [8; 16], kind: tessera_nvme_resv::NoticeKind::RegistrationPreempted }]);
                    r
                },
            },
        );
        s.vhost_exports.insert(
            "/run/vm/v.sock".into(),
            VhostExportRec {
                socket: "/run/vm/v.sock".into(),
                target: "127.0.0.1:4420".into(),
                queues: 2,
                read_only: true,
                pool: "p".into(),
                volume: "v".into(),
                snapshot: Some("s1".into()),
            },
        );
        s
    }

    fn decode(kv: &BTreeMap<String, Vec<u8>>) -> Result<State, DecodeError> {
        State::from_kv(kv.iter().map(|(k, v)| (k.as_str(), v.as_slice())))
    }

    #[test]
    fn kv_round_trip() {
        let s = sample();
        let kv = s.to_kv();
        assert_eq!(kv.len(), 1 + 2 + 1 + 1 + 1 + 1);
        assert!(kv.contains_key("engine/0000000001"));
        assert!(kv.contains_key("vhost//run/vm/v.sock"));
        assert!(kv.contains_key("export/nqn.2026-01.io.x:a/0000000001"));
        assert_eq!(decode(&kv).unwrap(), s);
        assert_eq!(decode(&State::default().to_kv()).unwrap(), State::default());
        assert_eq!(decode(&BTreeMap::new()).unwrap(), State::default());
    }

    #[test]
    fn kv_refuses_misplaced_unknown_and_dangling_records() {
        let kv = sample().to_kv();
        let mut moved = kv.clone();
        let v = moved.remove("engine/0000000001").unwrap();
        moved.insert("engine/0000000007".into(), v);
        assert!(decode(&moved).unwrap_err().detail.contains("belongs under"));

        let mut unknown = kv.clone();
        unknown.insert("junk/1".into(), b"{}".to_vec());
        assert_eq!(decode(&unknown).unwrap_err().detail, "unknown key");

        let mut bad = kv.clone();
        bad.insert("pool/p".into(), b"{".to_vec());
        assert_eq!(decode(&bad).unwrap_err().key, "pool/p");

        let mut dangling = kv.clone();
        dangling.remove("volume/p/v");
        assert!(decode(&dangling).unwrap_err().detail.contains("unknown volume"));
        let mut dangling = kv.clone();
        dangling.remove("volume/p/v");
        dangling.retain(|k, _| !k.starts_with("export/"));
        let e = decode(&dangling).unwrap_err();
        assert_eq!((e.key.as_str(), e.detail.as_str()), ("vhost//run/vm/v.sock", "export of an unknown volume"));

        let mut no_engine = kv.clone();
        no_engine.remove("engine/0000000000");
        assert!(decode(&no_engine).unwrap_err().detail.contains("unknown engine"));

        let mut reused = kv;
        reused.insert(NEXT_POOL_ID.into(), b"1".to_vec());
        assert!(decode(&reused).unwrap_err().detail.contains("next pool id"));
    }

    #[test]
    fn pool_volumes_lists_only_that_pool() {
        let mut s = sample();
        let mut other = s.volumes[&("p".to_string(), "v".to_string())].clone();
        other.pool = "p2".into();
        s.volumes.insert(("p2".into(), "v".into()), other.clone());
        other.pool = "o".into();
        s.volumes.insert(("o".into(), "a".into()), other);
        let names: Vec<_> = s.pool_volumes("p").map(|v| (v.pool.as_str(), v.name.as_str())).collect();
        assert_eq!(names, [("p", "v")]);
        assert_eq!(s.pool_volumes("q").count(), 0);
        assert!(s.export_of("p", "v").is_some());
        assert!(s.export_of("p2", "v").is_none());
        assert_eq!(s.served_as("p", "v", None).as_deref(), Some("namespace 1 of nqn.2026-01.io.x:a"));
        assert_eq!(s.served_as("p", "v", Some("s1")).as_deref(), Some("the vhost-user-blk disk on /run/vm/v.sock"));
        assert_eq!(s.served_as("p2", "v", None), None);
    }

    #[test]
    fn pool_records_without_a_base_load_and_serve_the_current_map_as_base() {
        let p = &sample().pools["p"];
        let mut v: serde_json::Value = serde_json::to_value(p).unwrap();
        let o = v.as_object_mut().unwrap();
        o.remove("base_version");
        o.remove("base_targets");
        for t in o["targets"].as_array_mut().unwrap() {
            let t = t.as_object_mut().unwrap();
            t.remove("since_epoch");
            t.remove("drained");
        }
        let old: PoolRec = serde_json::from_value(v).unwrap();
        assert_eq!((old.base_version, old.base_targets.len()), (0, 0));
        assert_eq!(old.targets, p.targets);
        assert_eq!(old.base(), (1, &p.targets[..]));
        assert!(old.settled());
    }

    #[test]
    fn target_state_names_round_trip() {
        for s in [TargetState::Up, TargetState::Down, TargetState::DownOut, TargetState::UpIn] {
            assert_eq!(to_placement(to_api(s)), s);
            assert_eq!(serde_json::to_string(&to_api(s)).unwrap(), format!("\"{}\"", s.as_str()));
        }
    }
}
