//! Snapshots and clones: a volume's retained epochs, and volumes that read through to one.
//! Creating a snapshot records the epoch at which the command runs ([`Env::epoch_now`]); engines
//! learn every volume's retained epochs from their heartbeat replies ([`retention`]) and never
//! aggregate a version a snapshot can still see. A clone is a volume of its own (its own uuid,
//! the parent's geometry) whose record names the snapshot it reads through to; the parent
//! snapshot and volume cannot be deleted while it does. Part of [`super`]'s pure state machine.

use tessera_mgmt_api::{CloneParent, SnapshotInfo, VolumeRetention};

use super::*;
use crate::state::{CloneOf, RollbackRec, SnapshotRec};

/// Most snapshots one volume keeps.
pub const MAX_SNAPSHOTS: usize = 64;

/// The API view of a snapshot; `stable` says whether `stable_epoch` (the pool's) has passed it.
pub fn snapshot_info(s: &SnapshotRec, stable_epoch: u64) -> SnapshotInfo {
    SnapshotInfo {
        name: s.name.clone(),
        epoch: s.epoch,
        created: s.created,
        size: s.size,
        stable: stable_epoch >= s.epoch,
        held_bytes: None,
    }
}

/// A volume's snapshot named `name`.
pub(super) fn get_snapshot<'a>(v: &'a VolumeRec, name: &str) -> Result<&'a SnapshotRec, CmdError> {
    v.snapshots.iter().find(|s| s.name == name).ok_or_else(|| CmdError::NoSnapshot {
        pool: v.pool.clone(),
        volume: v.name.clone(),
        snapshot: name.to_string(),
    })
}

pub(super) fn create_snapshot(s: &mut State, pool: &str, volume: &str, name: &str, env: &Env) -> Result<Outcome, CmdError> {
    let v = get_volume(s, pool, volume)?;
    check_name("snapshot", name)?;
    if v.snapshots.iter().any(|x| x.name == name) {
        return conflict(format!("volume {pool}/{volume} already has a snapshot named {name:?}"));
    }
    if v.snapshots.len() >= MAX_SNAPSHOTS {
        return conflict(format!("volume {pool}/{volume} has {MAX_SNAPSHOTS} snapshots, the most it keeps: delete one first"));
    }
    // Epochs only grow (the service's clock is monotonic), so the list stays in epoch order.
    if v.snapshots.last().is_some_and(|last| last.epoch >= env.epoch_now) {
        return Err(CmdError::Internal(format!("the clock stands at or before the newest snapshot of {pool}/{volume}")));
    }
    let rec = SnapshotRec { name: name.to_string(), epoch: env.epoch_now, created: env.now, size: v.size };
    let v = get_volume_mut(s, pool, volume)?;
    v.snapshots.push(rec.clone());
    Ok(Outcome::Snapshot(snapshot_info(&rec, 0)))
}

pub(super) fn delete_snapshot(s: &mut State, pool: &str, volume: &str, name: &str) -> Result<Outcome, CmdError> {
    let v = get_volume(s, pool, volume)?;
    let rec = get_snapshot(v, name)?.clone();
    let clones = clones_of(s, v, Some(name));
    if !clones.is_empty() {
        return conflict(format!("snapshot {pool}/{volume}@{name} has clones: {} (delete or flatten them first)", clones.join(", ")));
    }
    if let Some(how) = s.served_as(pool, volume, Some(name)) {
        return conflict(format!("snapshot {pool}/{volume}@{name} is exported ({how}): delete the export first"));
    }
    let v = get_volume_mut(s, pool, volume)?;
    v.snapshots.retain(|x| x.name != name);
    Ok(Outcome::Snapshot(snapshot_info(&rec, 0)))
}

/// Names of the clones of `v` (of its snapshot `snapshot`, or of any), sorted.
pub(super) fn clones_of(s: &State, v: &VolumeRec, snapshot: Option<&str>) -> Vec<String> {
    s.pool_volumes(&v.pool)
        .filter(|c| c.parent.as_ref().is_some_and(|p| p.uuid == v.uuid && snapshot.is_none_or(|n| p.snapshot == n)))
        .map(|c| c.name.clone())
        .collect()
}

/// The API view of a clone's parent (none if the volume is not a clone).
pub(super) fn clone_parent(s: &State, v: &VolumeRec) -> Option<Box<CloneParent>> {
    let of = v.parent.as_ref()?;
    let parent = s.volumes.get(&(v.pool.clone(), of.volume.clone())).filter(|p| p.uuid == of.uuid)?;
    let snap = parent.snapshots.iter().find(|x| x.name == of.snapshot)?;
    Some(Box::new(CloneParent { volume: volume_info(s, parent), snapshot: snapshot_info(snap, 0) }))
}

pub(super) fn clone_volume(s: &mut State, pool: &str, volume: &str, snapshot: &str, name: &str, env: &Env) -> Result<Outcome, CmdError> {
    let v = get_volume(s, pool, volume)?;
    let snap = get_snapshot(v, snapshot)?.clone();
    check_name("volume", name)?;
    if s.volumes.contains_key(&(pool.to_string(), name.to_string())) {
        return conflict(format!("volume {name:?} already exists in pool {pool:?}"));
    }
    let class = parse_class(&v.class)?;
    check_space(s, get_pool(s, pool)?, 0, footprint(snap.size, class))?;
    let rec = VolumeRec {
        pool: pool.to_string(),
        name: name.to_string(),
        uuid: env.uuid,
        size: snap.size,
        snapshots: Vec::new(),
        created: env.now,
        parent: Some(CloneOf { volume: volume.to_string(), uuid: v.uuid, snapshot: snapshot.to_string(), epoch: snap.epoch }),
        flattening: false,
        ..v.clone()
    };
    s.volumes.insert((pool.to_string(), name.to_string()), rec);
    let info = volume_info(s, get_volume(s, pool, name)?);
    Ok(Outcome::Volume(info))
}

pub(super) fn flatten(s: &mut State, pool: &str, volume: &str, done: bool) -> Result<Outcome, CmdError> {
    let v = get_volume(s, pool, volume)?;
    if v.parent.is_none() {
        return conflict(format!("volume {pool}/{volume} is not a clone: nothing to flatten"));
    }
    if !done {
        if !v.snapshots.is_empty() {
            let names: Vec<&str> = v.snapshots.iter().map(|x| x.name.as_str()).collect();
            return conflict(format!(
                "clone {pool}/{volume} has snapshots that read through to its parent: {} (delete them first)",
                names.join(", ")
            ));
        }
        if let Some(how) = s.served_as(pool, volume, None) {
            return conflict(format!("volume {pool}/{volume} is exported ({how}): flatten it while it is not exported"));
        }
    } else if !v.flattening {
        return conflict(format!("volume {pool}/{volume}: no flatten was started"));
    }
    let v = get_volume_mut(s, pool, volume)?;
    if done {
        v.parent = None;
        v.flattening = false;
    } else {
        v.flattening = true;
    }
    let info = volume_info(s, get_volume(s, pool, volume)?);
    Ok(Outcome::Volume(info))
}

pub(super) fn rollback(s: &mut State, pool: &str, volume: &str, snapshot: &str, force: bool, env: &Env) -> Result<Outcome, CmdError> {
    let v = get_volume(s, pool, volume)?;
    let snap = get_snapshot(v, snapshot)?.clone();
    if !force {
        if let Some(how) = s.served_as(pool, volume, None) {
            return conflict(format!(
                "volume {pool}/{volume} is exported ({how}): its hosts would keep what they cached; remove the export or force it"
            ));
        }
    }
    if v.flattening {
        return conflict(format!("volume {pool}/{volume} is being flattened"));
    }
    if let Some(how) = s.served_as(pool, volume, None).filter(|_| snap.size != v.size) {
        return conflict(format!(
            "volume {pool}/{volume} was resized since {snapshot} and is exported ({how}): a disk cannot change size under its hosts; remove the export first"
        ));
    }
    if v.rollbacks.last().is_some_and(|r| r.at >= env.epoch_now) || snap.epoch >= env.epoch_now {
        return Err(CmdError::Internal(format!("the clock stands at or before the newest epoch of {pool}/{volume}")));
    }
    let v = get_volume_mut(s, pool, volume)?;
    v.rollbacks.push(RollbackRec { at: env.epoch_now, to: snap.epoch, snapshot: snapshot.to_string() });
    // The volume reads as the snapshot, whose size it takes back.
    v.size = snap.size;
    let info = volume_info(s, get_volume(s, pool, volume)?);
    Ok(Outcome::Volume(info))
}

/// The snapshots of a volume, oldest first (`stable` measured against `stable_epoch`).
pub fn snapshots(state: &State, pool: &str, volume: &str, stable_epoch: u64) -> Result<Vec<SnapshotInfo>, CmdError> {
    Ok(get_volume(state, pool, volume)?.snapshots.iter().map(|x| snapshot_info(x, stable_epoch)).collect())
}

/// The retained epochs of every volume with snapshots in the pools that have targets on engine
/// `rank`: what its heartbeat reply carries.
pub fn retention(state: &State, rank: u32) -> Vec<VolumeRetention> {
    let pools: BTreeSet<&str> =
        state.pools.values().filter(|p| p.targets.iter().any(|t| t.rank == rank)).map(|p| p.name.as_str()).collect();
    state
        .volumes
        .values()
        .filter(|v| (!v.snapshots.is_empty() || !v.rollbacks.is_empty()) && pools.contains(v.pool.as_str()))
        .map(|v| {
            // A rollback needs the views at both its epochs: the snapshot's, and its own (which
            // tells writes before it from writes after it).
            let mut epochs: Vec<u64> = v.snapshots.iter().map(|x| x.epoch).chain(v.rollbacks.iter().flat_map(|r| [r.at, r.to])).collect();
            epochs.sort_unstable();
            epochs.dedup();
            VolumeRetention { volume: v.uuid, epochs }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use tessera_mgmt_api::CreateVolume;

    use super::*;

    fn env(epoch: u64) -> Env {
        Env { uuid: Uuid::from_u128(u128::from(epoch)), now: 1000, epoch_floor: 1, epoch_now: epoch }
    }

    fn run(s: &State, cmd: Command, epoch: u64) -> Result<(State, Outcome), CmdError> {
        apply(s, &cmd, &env(epoch))
    }

    fn ok(s: &State, cmd: Command, epoch: u64) -> State {
        run(s, cmd, epoch).unwrap_or_else(|e| panic!("{e}")).0
    }

    /// Three engines of two targets, pool "p" over ranks 0 and 1 only, volume "v" in it.
    fn cluster() -> State {
        let mut s = State::default();
        for rank in 0..3 {
            let req = RegisterEngine {
                rank,
                uuid: Uuid::from_u128(u128::from(rank) + 100),
                address: format!("127.0.0.1:{}", 10000 + rank),
                fault_domain: String::new(),
                targets: 2,
                target_capacity: 1 << 30,
            };
            s = ok(&s, Command::RegisterEngine { req, reintegrate: true }, 10);
        }
        let pool = CreatePool { name: "p".into(), ranks: vec![0, 1], default_class: Some("RP_2".into()) };
        s = ok(&s, Command::CreatePool(pool), 11);
        let v = CreateVolume {
            name: "v".into(),
            size: 1 << 20,
            block_size: None,
            class: None,
            cell_size: None,
            chunk_size: None,
            checksum: None,
        };
        ok(&s, Command::CreateVolume { pool: "p".into(), req: v }, 12)
    }

    fn create(name: &str) -> Command {
        Command::CreateSnapshot { pool: "p".into(), volume: "v".into(), name: name.into() }
    }

    fn delete(name: &str) -> Command {
        Command::DeleteSnapshot { pool: "p".into(), volume: "v".into(), name: name.into() }
    }

    fn export(nqn: &str, snapshot: Option<&str>) -> Command {
        Command::CreateExport(CreateExport {
            nqn: nqn.into(),
            nsid: None,
            pool: "p".into(),
            volume: "v".into(),
            snapshot: snapshot.map(Into::into),
            hosts: vec![],
            listen: None,
            paths: Vec::new(),
        })
    }

    #[test]
    fn a_snapshot_takes_the_commands_epoch_and_engines_of_its_pool_retain_it() {
        let s = ok(&cluster(), create("s1"), 1000);
        let s = ok(&s, create("s2"), 2000);
        let info = volume(&s, "p", "v").unwrap();
        let got: Vec<(&str, u64, u64)> = info.snapshots.iter().map(|x| (x.name.as_str(), x.epoch, x.size)).collect();
        assert_eq!(got, [("s1", 1000, 1 << 20), ("s2", 2000, 1 << 20)]);
        let uuid = info.uuid;
        assert_eq!(retention(&s, 0), [VolumeRetention { volume: uuid, epochs: vec![1000, 2000] }]);
        assert_eq!(retention(&s, 1), retention(&s, 0));
        assert!(retention(&s, 2).is_empty(), "rank 2 holds nothing of pool p");
        let listed = snapshots(&s, "p", "v", 1500).unwrap();
        assert_eq!(listed.iter().map(|x| x.stable).collect::<Vec<_>>(), [true, false]);
        // Deleting one leaves the other retained.
        let s = ok(&s, delete("s1"), 3000);
        assert_eq!(retention(&s, 0), [VolumeRetention { volume: uuid, epochs: vec![2000] }]);
        let s = ok(&s, delete("s2"), 3001);
        assert!(retention(&s, 0).is_empty());
    }

    #[test]
    fn snapshot_refusals_name_the_reason() {
        let s = ok(&cluster(), create("s1"), 1000);
        let e = run(&s, create("s1"), 2000).unwrap_err();
        assert_eq!((e.status(), e.to_string().contains("already has a snapshot named \"s1\"")), (409, true), "{e}");
        assert_eq!(run(&s, create("bad/name"), 2000).unwrap_err().status(), 400);
        let e = run(&s, delete("nope"), 2000).unwrap_err();
        assert_eq!((e.status(), e.to_string()), (404, "volume p/v has no snapshot named \"nope\"".to_string()));
        let missing = Command::CreateSnapshot { pool: "p".into(), volume: "w".into(), name: "x".into() };
        assert_eq!(run(&s, missing, 2000).unwrap_err().status(), 404);
        // A clock that stands still would break the epoch order of the list.
        assert_eq!(run(&s, create("s2"), 1000).unwrap_err().status(), 500);
        let mut full = s.clone();
        for i in 1..MAX_SNAPSHOTS as u64 {
            full = ok(&full, create(&format!("n{i}")), 1000 + i);
        }
        let e = run(&full, create("one-too-many"), 1_000_000).unwrap_err();
        assert_eq!(e.status(), 409, "{e}");
    }

    #[test]
    fn an_exported_snapshot_is_kept_until_its_export_goes() {
        let s = ok(&cluster(), create("s1"), 1000);
        const LIVE: &str = "nqn.2026-12.io.tessera:live";
        const SNAP: &str = "nqn.2026-12.io.tessera:snap";
        // The volume and its snapshot are exported side by side, each once.
        let s = ok(&s, export(LIVE, None), 1001);
        let (s, out) = run(&s, export(SNAP, Some("s1")), 1002).unwrap();
        let Outcome::Export(x) = out else { panic!("{out:?}") };
        assert_eq!(x.snapshot.map(|s| (s.name, s.epoch)), Some(("s1".to_string(), 1000)));
        assert_eq!(run(&s, export("nqn.2026-12.io.tessera:again", Some("s1")), 1003).unwrap_err().status(), 409);
        assert_eq!(run(&s, export("nqn.2026-12.io.tessera:other", Some("nope")), 1003).unwrap_err().status(), 404);
        let e = run(&s, delete("s1"), 1004).unwrap_err();
        assert_eq!(e.status(), 409);
        assert!(e.to_string().contains("is exported (namespace 1 of nqn.2026-12.io.tessera:snap)"), "{e}");
        // The volume cannot go while its snapshot is served, even with its own export gone.
        let s = ok(&s, Command::DeleteExport { nqn: LIVE.into(), nsid: 1 }, 1005);
        let e = run(&s, Command::DeleteVolume { pool: "p".into(), volume: "v".into() }, 1006).unwrap_err();
        assert!(e.to_string().contains("snapshot p/v@s1 is exported"), "{e}");
        let s = ok(&s, Command::DeleteExport { nqn: SNAP.into(), nsid: 1 }, 1007);
        let s = ok(&s, delete("s1"), 1008);
        ok(&s, Command::DeleteVolume { pool: "p".into(), volume: "v".into() }, 1009);
    }

    fn clone_cmd(snapshot: &str, name: &str) -> Command {
        Command::CloneVolume { pool: "p".into(), volume: "v".into(), snapshot: snapshot.into(), name: name.into() }
    }

    #[test]
    fn a_clone_reads_through_to_its_snapshot_which_stays_until_the_clone_lets_go() {
        let s = ok(&cluster(), create("s1"), 1000);
        let (s, out) = run(&s, clone_cmd("s1", "c"), 2000).unwrap();
        let Outcome::Volume(c) = out else { panic!("{out:?}") };
        let parent = c.parent.as_ref().expect("a clone names its parent");
        assert_eq!((parent.volume.name.as_str(), parent.snapshot.name.as_str(), parent.snapshot.epoch), ("v", "s1", 1000));
        let v = volume(&s, "p", "v").unwrap();
        assert_ne!(c.uuid, v.uuid);
        assert_eq!((c.size, c.class.as_str(), c.cell_size, c.chunk_size), (v.size, v.class.as_str(), v.cell_size, v.chunk_size));
        assert!(c.snapshots.is_empty());
        // The parent's snapshot and the parent are kept; the errors name the clone.
        let e = run(&s, delete("s1"), 3000).unwrap_err();
        assert_eq!(e.status(), 409);
        assert!(e.to_string().contains("has clones: c"), "{e}");
        let e = run(&s, Command::DeleteVolume { pool: "p".into(), volume: "v".into() }, 3000).unwrap_err();
        assert!(e.to_string().contains("has clones: c"), "{e}");
        assert_eq!(run(&s, clone_cmd("s1", "c"), 3000).unwrap_err().status(), 409, "the name is taken");
        assert_eq!(run(&s, clone_cmd("nope", "d"), 3000).unwrap_err().status(), 404);
        // Flatten: exports are refused while it copies; done, the tie is cut.
        let fl = |done| Command::Flatten { pool: "p".into(), volume: "c".into(), done };
        assert_eq!(run(&s, fl(true), 3000).unwrap_err().status(), 409, "done without a start");
        let started = ok(&s, fl(false), 3001);
        let exp = Command::CreateExport(CreateExport {
            nqn: "nqn.2026-12.io.tessera:c".into(),
            nsid: None,
            pool: "p".into(),
            volume: "c".into(),
            snapshot: None,
            hosts: vec![],
            listen: None,
            paths: Vec::new(),
        });
        let e = run(&started, exp.clone(), 3002).unwrap_err();
        assert!(e.to_string().contains("being flattened"), "{e}");
        let done = ok(&started, fl(true), 3003);
        let c = volume(&done, "p", "c").unwrap();
        assert!(c.parent.is_none() && !c.flattening);
        let done = ok(&done, delete("s1"), 3004);
        ok(&done, exp, 3005);
        // Not while the clone has snapshots (they read through to the parent too).
        let with_snap = ok(&s, Command::CreateSnapshot { pool: "p".into(), volume: "c".into(), name: "cs".into() }, 3100);
        let e = run(&with_snap, fl(false), 3101).unwrap_err();
        assert!(e.to_string().contains("has snapshots that read through to its parent: cs"), "{e}");
        // A volume that is not a clone has nothing to flatten; an exported clone is not flattened.
        assert_eq!(run(&s, Command::Flatten { pool: "p".into(), volume: "v".into(), done: false }, 3000).unwrap_err().status(), 409);
    }

    #[test]
    fn a_rollback_retains_both_its_epochs_and_refuses_exported_volumes_unless_forced() {
        let s = ok(&cluster(), create("s1"), 1000);
        let rb = |force| Command::Rollback { pool: "p".into(), volume: "v".into(), snapshot: "s1".into(), force };
        let exported = ok(&s, export("nqn.2026-12.io.tessera:v", None), 1500);
        let e = run(&exported, rb(false), 2000).unwrap_err();
        assert_eq!(e.status(), 409);
        assert!(e.to_string().contains("is exported"), "{e}");
        let (forced, out) = run(&exported, rb(true), 2000).unwrap();
        let Outcome::Volume(v) = out else { panic!("{out:?}") };
        assert_eq!(v.rollbacks.iter().map(|r| (r.at, r.to, r.snapshot.as_str())).collect::<Vec<_>>(), [(2000, 1000, "s1")]);
        let uuid = v.uuid;
        // The snapshot may go; both epochs stay retained for the rollback.
        let gone = ok(&forced, delete("s1"), 3000);
        assert_eq!(retention(&gone, 0), [VolumeRetention { volume: uuid, epochs: vec![1000, 2000] }]);
        assert_eq!(run(&gone, rb(true), 4000).unwrap_err().status(), 404, "no snapshot s1 any more");
        // A grown volume takes its snapshot's size back; exported, that is refused.
        let grown = ok(&exported, Command::ResizeVolume { pool: "p".into(), volume: "v".into(), size: 2 << 20 }, 1600);
        let e = run(&grown, rb(true), 2000).unwrap_err();
        assert!(e.to_string().contains("was resized since s1"), "{e}");
        let unexported = ok(&grown, Command::DeleteExport { nqn: "nqn.2026-12.io.tessera:v".into(), nsid: 1 }, 1700);
        let (_, out) = run(&unexported, rb(false), 2000).unwrap();
        let Outcome::Volume(v) = out else { panic!("{out:?}") };
        assert_eq!(v.size, 1 << 20);
    }
}
