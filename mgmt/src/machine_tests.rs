//! Unit tests of the state machine: every command, its success and every refusal.

use super::*;

/// The epoch floor `env` hands out.
const FLOOR: u64 = 5 << 40;

fn env(n: u128) -> Env {
    Env { uuid: Uuid::from_u128(n), now: 1000 + n as u64, epoch_floor: FLOOR, epoch_now: FLOOR + (30 << 30) + n as u64 }
}

/// A registration with automatic reintegration.
fn register(req: RegisterEngine) -> Command {
    Command::RegisterEngine { req, reintegrate: true }
}

fn reg(rank: u32, fault_domain: &str, targets: u16) -> RegisterEngine {
    RegisterEngine {
        rank,
        uuid: Uuid::from_u128(0xE000 + u128::from(rank)),
        address: format!("127.0.0.1:{}", 20000 + rank),
        fault_domain: fault_domain.to_string(),
        targets,
        target_capacity: 1 << 30,
    }
}

fn ok(s: &State, cmd: Command) -> (State, Outcome) {
    apply(s, &cmd, &env(7)).unwrap_or_else(|e| panic!("{cmd:?}: {e}"))
}

fn run(s: &State, cmd: Command) -> State {
    ok(s, cmd).0
}

fn err(s: &State, cmd: Command) -> CmdError {
    match apply(s, &cmd, &env(7)) {
        Ok(_) => panic!("{cmd:?} was accepted"),
        Err(e) => e,
    }
}

fn status(s: &State, cmd: Command) -> u16 {
    err(s, cmd).status()
}

/// Three engines (ranks 0..3, 2 targets of 1 GiB each) and pool "p" over all of them.
fn cluster() -> State {
    let mut s = State::default();
    for r in 0..3 {
        s = run(&s, register(reg(r, "", 2)));
    }
    run(&s, Command::CreatePool(pool_req("p", &[], None)))
}

fn pool_req(name: &str, ranks: &[u32], class: Option<&str>) -> CreatePool {
    CreatePool { name: name.into(), ranks: ranks.to_vec(), default_class: class.map(Into::into) }
}

fn vol_req(name: &str, size: u64) -> CreateVolume {
    CreateVolume { name: name.into(), size, block_size: None, class: None, cell_size: None, chunk_size: None, checksum: None }
}

fn create_vol(pool: &str, req: CreateVolume) -> Command {
    Command::CreateVolume { pool: pool.into(), req }
}

fn export_req(nqn: &str, nsid: Option<u32>, volume: &str) -> CreateExport {
    CreateExport {
        nqn: nqn.into(),
        nsid,
        pool: "p".into(),
        volume: volume.into(),
        snapshot: None,
        hosts: vec![],
        listen: None,
        paths: Vec::new(),
    }
}

const NQN: &str = "nqn.2026-11.io.tessera:a";

// ---------------------------------------------------------------------------------------------
// Engines.

#[test]
fn register_new_engine_is_up_with_default_fault_domain() {
    let s = run(&State::default(), register(reg(4, "", 3)));
    let e = &s.engines[&4];
    assert_eq!((e.state, e.fault_domain.as_str(), e.targets), (EngineState::Up, "rank-4", 3));
    let s = run(&s, register(reg(5, "rack-1", 1)));
    assert_eq!(s.engines[&5].fault_domain, "rack-1");
}

#[test]
fn reregister_same_uuid_updates_address_and_targets() {
    let s = cluster();
    let mut r = reg(1, "", 4);
    r.address = "127.0.0.1:1".into();
    r.target_capacity = 5 << 30;
    let (n, out) = ok(&s, register(r));
    assert_eq!(out, Outcome::Registered { rank: 1, replaced: None, reintegrated: vec![] });
    assert_eq!((n.engines[&1].address.as_str(), n.engines[&1].targets, n.engines[&1].target_capacity), ("127.0.0.1:1", 4, 5 << 30));
    // The same registration again changes nothing.
    assert_eq!(run(&s, register(reg(1, "", 2))), s);
}

#[test]
fn register_refusals() {
    let s = cluster();
    let mut other_uuid = reg(1, "", 2);
    other_uuid.uuid = Uuid::from_u128(99);
    assert_eq!(status(&s, register(other_uuid)), 409);
    let mut stolen = reg(7, "", 2);
    stolen.uuid = s.engines[&0].uuid;
    assert!(err(&s, register(stolen)).to_string().contains("already registered as rank 0"));
    let mut bad_addr = reg(7, "", 2);
    bad_addr.address = "localhost".into();
    assert_eq!(status(&s, register(bad_addr)), 400);
    let mut nil = reg(7, "", 2);
    nil.uuid = Uuid::nil();
    assert_eq!(status(&s, register(nil)), 400);
    assert_eq!(status(&s, register(reg(7, "", 0))), 400);
    let mut no_cap = reg(7, "", 2);
    no_cap.target_capacity = 0;
    assert_eq!(status(&s, register(no_cap)), 400);
    assert_eq!(status(&s, register(reg(7, "rack 1", 2))), 400);
    assert_eq!(status(&s, register(reg(7, &"x".repeat(65), 2))), 400);
    // Pool "p" uses targets 0 and 1 of rank 2.
    let e = err(&s, register(reg(2, "", 1)));
    assert_eq!(e.status(), 409);
    assert!(e.to_string().contains("target 1 in pool p"), "{e}");
}

#[test]
fn engines_down_marks_targets_down_in_one_new_map_version_per_pool() {
    let mut s = cluster();
    s = run(&s, register(reg(3, "", 1)));
    s = run(&s, Command::CreatePool(pool_req("q", &[2, 3], Some("S1"))));
    s = run(&s, Command::CreatePool(pool_req("r", &[0, 3], Some("S1"))));
    let before = s.clone();
    let (n, out) = ok(&s, Command::EnginesDown(vec![1, 2, 42]));
    assert_eq!(out, Outcome::MarkedDown(vec![1, 2]));
    assert_eq!(n.engines[&1].state, EngineState::Down);
    assert_eq!(n.engines[&2].state, EngineState::Down);
    assert_eq!(n.engines[&0].state, EngineState::Up);
    // Pool p: both engines' targets DOWN in version 2, fseq 2; what placement computes too.
    let p = &n.pools["p"];
    assert_eq!(p.map_version, 2);
    let expected = placement_map(&before.pools["p"]).unwrap().set_states(&[
        (TargetRef { rank: 1, index: 0 }, TargetState::Down),
        (TargetRef { rank: 1, index: 1 }, TargetState::Down),
        (TargetRef { rank: 2, index: 0 }, TargetState::Down),
        (TargetRef { rank: 2, index: 1 }, TargetState::Down),
    ]);
    assert_eq!(placement_map(p).unwrap(), expected.unwrap());
    for t in &p.targets {
        let down = t.rank == 1 || t.rank == 2;
        assert_eq!(t.state, if down { TargetStateName::Down } else { TargetStateName::UpIn });
        assert_eq!(t.fseq, if down { 2 } else { 0 });
    }
    assert_eq!(n.pools["q"].map_version, 2);
    // Pool r has none of them: untouched.
    assert_eq!(n.pools["r"], before.pools["r"]);
    // Again: nothing changes.
    assert_eq!(run(&n, Command::EnginesDown(vec![1, 2])), n);
}

#[test]
fn engines_down_leaves_downout_targets_alone() {
    let mut s = cluster();
    let p = s.pools.get_mut("p").unwrap();
    let m = placement_map(p).unwrap().set_state(0, 1, TargetState::DownOut).unwrap();
    store_map(p, &m);
    let n = run(&s, Command::EnginesDown(vec![0]));
    let t = |i: u16| n.pools["p"].targets.iter().find(|t| t.rank == 0 && t.index == i).copied().unwrap();
    assert_eq!((t(0).state, t(0).fseq), (TargetStateName::Down, 3));
    assert_eq!((t(1).state, t(1).fseq), (TargetStateName::DownOut, 2));
}

#[test]
fn down_engine_reregisters_up_but_with_manual_reintegration_its_targets_stay_down() {
    let s = run(&cluster(), Command::EnginesDown(vec![1]));
    let n = run(&s, Command::RegisterEngine { req: reg(1, "", 2), reintegrate: false });
    assert_eq!(n.engines[&1].state, EngineState::Up);
    assert_eq!(n.pools["p"], s.pools["p"]);
    assert!(n.pools["p"].targets.iter().filter(|t| t.rank == 1).all(|t| t.state == TargetStateName::Down));
}

#[test]
fn heartbeat_checks_rank_uuid_and_state() {
    let mut s = cluster();
    s = run(&s, register(reg(3, "", 1)));
    s = run(&s, Command::CreatePool(pool_req("q", &[0], Some("S1"))));
    let uuid = |r: u32| reg(r, "", 1).uuid;
    assert_eq!(
        heartbeat_pools(&s, 0, uuid(0)).unwrap(),
        [PoolVersion { pool_id: 1, map_version: 1, name: "p".into() }, PoolVersion { pool_id: 2, map_version: 1, name: "q".into() }]
    );
    assert_eq!(heartbeat_pools(&s, 3, uuid(3)).unwrap(), []);
    assert_eq!(heartbeat_pools(&s, 9, uuid(9)).unwrap_err(), CmdError::NoEngine(9));
    assert_eq!(heartbeat_pools(&s, 0, uuid(1)).unwrap_err().status(), 409);
    let s = run(&s, Command::EnginesDown(vec![0]));
    let e = heartbeat_pools(&s, 0, uuid(0)).unwrap_err();
    assert_eq!((e.clone(), e.status()), (CmdError::EngineDown(0), 404));
    assert_eq!(
        pool_versions(&s, 0),
        [PoolVersion { pool_id: 1, map_version: 2, name: "p".into() }, PoolVersion { pool_id: 2, map_version: 2, name: "q".into() }]
    );
}

// ---------------------------------------------------------------------------------------------
// Pools.

#[test]
fn create_pool_defaults() {
    let s = run(&cluster(), Command::EnginesDown(vec![2]));
    let (n, out) = ok(&s, Command::CreatePool(pool_req("q", &[], None)));
    let Outcome::Pool(info) = out else { panic!("{out:?}") };
    assert_eq!(info.name, "q");
    assert_eq!(info.uuid, env(7).uuid);
    assert_eq!(info.pool_id, 2);
    assert_eq!(info.default_class, "EC_2P1");
    // Only the engines now Up: ranks 0 and 1, 2 targets each.
    assert_eq!(info.capacity, 4 << 30);
    assert_eq!((info.allocated, info.volumes), (0, 0));
    assert_eq!(info.map.version, 1);
    assert_eq!(info.map.engines.iter().map(|e| e.rank).collect::<Vec<_>>(), [0, 1]);
    assert_eq!(info.map.engines[1].address, "127.0.0.1:20001");
    assert_eq!(info.map.targets.len(), 4);
    assert!(info.map.targets.iter().all(|t| t.state == TargetStateName::UpIn && t.fseq == 0));
    assert_eq!(n.next_pool_id, 3);
    assert_eq!(pool_info(&n, "q").unwrap(), *info);
    assert_eq!(pools(&n).iter().map(|p| p.name.as_str()).collect::<Vec<_>>(), ["p", "q"]);
}

#[test]
fn create_pool_explicit_ranks_and_class() {
    let s = cluster();
    let n = run(&s, Command::CreatePool(pool_req("q", &[2, 0], Some("rp_2"))));
    let info = pool_info(&n, "q").unwrap();
    assert_eq!(info.default_class, "RP_2");
    assert_eq!(info.map.targets.iter().map(|t| (t.rank, t.index)).collect::<Vec<_>>(), [(0, 0), (0, 1), (2, 0), (2, 1)]);
}

#[test]
fn pool_ids_are_never_reused() {
    let mut s = cluster();
    s = run(&s, Command::CreatePool(pool_req("q", &[], Some("S1"))));
    assert_eq!(s.pools["q"].pool_id, 2);
    // Even if a pool record disappeared, its id stays used.
    s.pools.remove("q");
    s = run(&s, Command::CreatePool(pool_req("r", &[], Some("S1"))));
    assert_eq!(s.pools["r"].pool_id, 3);
}

#[test]
fn create_pool_refusals() {
    let s = cluster();
    assert_eq!(status(&s, Command::CreatePool(pool_req("p", &[], None))), 409);
    for bad in ["", "a/b", "a b", ".", "..", &"x".repeat(65), "é"] {
        assert_eq!(status(&s, Command::CreatePool(pool_req(bad, &[], None))), 400, "{bad:?}");
    }
    assert_eq!(status(&s, Command::CreatePool(pool_req("q", &[], Some("EC_1P1")))), 400);
    assert_eq!(status(&s, Command::CreatePool(pool_req("q", &[], Some("RAID5")))), 400);
    assert_eq!(status(&s, Command::CreatePool(pool_req("q", &[9], None))), 400);
    assert_eq!(status(&s, Command::CreatePool(pool_req("q", &[0, 0], None))), 400);
    // An explicit class needs enough fault domains.
    let e = err(&s, Command::CreatePool(pool_req("q", &[0, 1], Some("EC_2P1"))));
    assert_eq!(e.status(), 409, "{e}");
    let down = run(&s, Command::EnginesDown(vec![1]));
    assert_eq!(status(&down, Command::CreatePool(pool_req("q", &[1], Some("S1")))), 409);
    let all_down = run(&s, Command::EnginesDown(vec![0, 1, 2]));
    assert!(err(&all_down, Command::CreatePool(pool_req("q", &[], None))).to_string().contains("no engine is up"));
    assert_eq!(status(&State::default(), Command::CreatePool(pool_req("q", &[], None))), 409);
}

#[test]
fn pool_queries_404() {
    let s = cluster();
    assert_eq!(pool_info(&s, "nope").unwrap_err(), CmdError::NoPool("nope".into()));
    assert_eq!(pool_map(&s, "nope").unwrap_err().status(), 404);
    assert_eq!(volumes(&s, "nope").unwrap_err().status(), 404);
    assert_eq!(volume(&s, "p", "nope").unwrap_err().status(), 404);
    assert_eq!(volume(&s, "nope", "v").unwrap_err(), CmdError::NoPool("nope".into()));
}

// ---------------------------------------------------------------------------------------------
// Volumes.

#[test]
fn create_volume_defaults() {
    let s = cluster();
    let (n, out) = ok(&s, create_vol("p", vol_req("v", 10 << 20)));
    let Outcome::Volume(v) = out else { panic!("{out:?}") };
    assert_eq!(
        v,
        VolumeInfo {
            pool: "p".into(),
            pool_id: 1,
            name: "v".into(),
            uuid: env(7).uuid,
            size: 10 << 20,
            block_size: 4096,
            class: "EC_2P1".into(),
            cell_size: 65536,
            chunk_size: 1 << 20,
            checksum: true,
            created: env(7).now,
            snapshots: Vec::new(),
            parent: None,
            flattening: false,
            rollbacks: Vec::new(),
            allocated_bytes: None,
        }
    );
    assert_eq!(volume(&n, "p", "v").unwrap(), v);
    assert_eq!(volumes(&n, "p").unwrap(), [v]);
    let p = pool_info(&n, "p").unwrap();
    // EC_2P1: 3 shards for 2 of data.
    assert_eq!((p.allocated, p.volumes), (15 << 20, 1));
}

#[test]
fn create_volume_chunk_rounds_up_to_whole_stripes() {
    let mut s = cluster();
    for r in 3..6 {
        s = run(&s, register(reg(r, "", 2)));
    }
    s = run(&s, Command::CreatePool(pool_req("big", &[], None)));
    let mut req = vol_req("v", 1 << 30);
    req.class = Some("EC_3P1".into());
    let (_, out) = ok(&s, create_vol("big", req.clone()));
    // 3 × 64 KiB stripes: 6 of them make the first multiple ≥ 1 MiB.
    assert!(matches!(out, Outcome::Volume(ref v) if v.chunk_size == 6 * 3 * 65536 && v.class == "EC_3P1"), "{out:?}");
    req.class = Some("EC_4P2".into());
    req.cell_size = Some(1 << 20);
    let (_, out) = ok(&s, create_vol("big", req));
    assert!(matches!(out, Outcome::Volume(ref v) if v.chunk_size == 4 << 20), "{out:?}");
    let mut rp = vol_req("r", 8192);
    rp.class = Some("RP_3".into());
    rp.block_size = Some(512);
    rp.checksum = Some(false);
    let (_, out) = ok(&s, create_vol("big", rp));
    assert!(matches!(out, Outcome::Volume(ref v) if v.chunk_size == 1 << 20 && v.block_size == 512 && !v.checksum), "{out:?}");
}

#[test]
fn create_volume_refusals() {
    let s = run(&cluster(), create_vol("p", vol_req("v", 1 << 20)));
    assert_eq!(err(&s, create_vol("nope", vol_req("w", 4096))), CmdError::NoPool("nope".into()));
    assert_eq!(status(&s, create_vol("p", vol_req("v", 4096))), 409);
    assert_eq!(status(&s, create_vol("p", vol_req("a/b", 4096))), 400);
    assert_eq!(status(&s, create_vol("p", vol_req("w", 0))), 400);
    assert_eq!(status(&s, create_vol("p", vol_req("w", 4097))), 400);
    let with = |f: &dyn Fn(&mut CreateVolume)| {
        let mut r = vol_req("w", 1 << 20);
        f(&mut r);
        create_vol("p", r)
    };
    assert_eq!(status(&s, with(&|r| r.block_size = Some(1024))), 400);
    assert_eq!(status(&s, with(&|r| r.cell_size = Some(1000))), 400);
    assert_eq!(status(&s, with(&|r| r.cell_size = Some(0))), 400);
    assert_eq!(status(&s, with(&|r| r.chunk_size = Some(65536))), 400);
    assert_eq!(status(&s, with(&|r| r.chunk_size = Some(0))), 400);
    assert_eq!(status(&s, with(&|r| r.class = Some("XX".into()))), 400);
    // 4 shards on 3 fault domains.
    let e = err(&s, with(&|r| r.class = Some("EC_3P1".into())));
    assert_eq!(e.status(), 409, "{e}");
    assert!(e.to_string().contains("needs 4 fault domains"), "{e}");
}

#[test]
fn fault_domains_count_distinct_domains_not_engines() {
    let mut s = State::default();
    for r in 0..3 {
        s = run(&s, register(reg(r, if r < 2 { "rack-a" } else { "rack-b" }, 1)));
    }
    s = run(&s, Command::CreatePool(pool_req("p", &[], Some("S1"))));
    let mut req = vol_req("v", 4096);
    req.class = Some("RP_3".into());
    assert_eq!(status(&s, create_vol("p", req.clone())), 409);
    req.class = Some("RP_2".into());
    run(&s, create_vol("p", req));
}

#[test]
fn capacity_is_enforced_with_redundancy_overhead() {
    let s = cluster(); // 6 GiB
    let mut req = vol_req("a", 4 << 30);
    // EC_2P1 takes 6 GiB for 4 GiB of data: fits exactly.
    let s2 = run(&s, create_vol("p", req.clone()));
    assert_eq!(pool_info(&s2, "p").unwrap().allocated, 6 << 30);
    req.name = "b".into();
    req.size = 4096;
    assert_eq!(status(&s2, create_vol("p", req.clone())), 507);
    // RP_3 takes 3×.
    req.class = Some("RP_3".into());
    req.size = (2 << 30) + 4096;
    let e = err(&s, create_vol("p", req.clone()));
    assert_eq!(e.status(), 507, "{e}");
    req.size = 2 << 30;
    run(&s, create_vol("p", req));
}

#[test]
fn resize_volume() {
    let s = run(&cluster(), create_vol("p", vol_req("v", 1 << 20)));
    let resize = |size| Command::ResizeVolume { pool: "p".into(), volume: "v".into(), size };
    let (n, out) = ok(&s, resize(2 << 20));
    assert!(matches!(out, Outcome::Volume(ref v) if v.size == 2 << 20));
    assert_eq!(pool_info(&n, "p").unwrap().allocated, 3 << 20);
    // Shrinking an unexported volume is allowed.
    assert_eq!(run(&n, resize(4096)).volumes[&("p".into(), "v".into())].size, 4096);
    // Same size: nothing changes.
    assert_eq!(run(&s, resize(1 << 20)), s);
    assert_eq!(status(&s, resize(0)), 400);
    assert_eq!(status(&s, resize(5000)), 400);
    assert_eq!(status(&s, resize((4 << 30) + 4096)), 507);
    // Growing to exactly the capacity works: 4 GiB × 3/2 = 6 GiB.
    run(&s, resize(4 << 30));
    assert_eq!(status(&s, Command::ResizeVolume { pool: "p".into(), volume: "w".into(), size: 4096 }), 404);
    assert_eq!(status(&s, Command::ResizeVolume { pool: "q".into(), volume: "v".into(), size: 4096 }), 404);
    // Exported: grows, does not shrink.
    let x = run(&s, Command::CreateExport(export_req(NQN, None, "v")));
    run(&x, resize(2 << 20));
    let e = err(&x, resize(4096));
    assert_eq!(e.status(), 409);
    assert!(e.to_string().contains("can grow but not shrink"), "{e}");
}

#[test]
fn delete_volume_and_its_punch_plan() {
    let mut s = run(&cluster(), create_vol("p", vol_req("v", 1 << 20)));
    s = run(&s, create_vol("p", vol_req("w", 1 << 20)));
    s = run(&s, Command::EnginesDown(vec![2]));
    // Rank 1 came back: Up, but its targets stay DOWN; rank 0 target 1 is DOWNOUT.
    let p = s.pools.get_mut("p").unwrap();
    store_map(p, &placement_map(p).unwrap().set_state(0, 1, TargetState::DownOut).unwrap());
    let v = s.volumes[&("p".to_string(), "v".to_string())].clone();
    let (n, out) = ok(&s, Command::DeleteVolume { pool: "p".into(), volume: "v".into() });
    let Outcome::VolumeDeleted(info, plan) = out else { panic!("{out:?}") };
    assert_eq!((info.name.as_str(), info.uuid), ("v", v.uuid));
    assert_eq!(plan.uuid, v.uuid);
    assert_eq!((plan.pool_id, plan.map_version), (1, 3));
    let sites: Vec<_> = plan.sites.iter().map(|s| (s.address.as_str(), s.target)).collect();
    assert_eq!(sites, [("127.0.0.1:20000", 0), ("127.0.0.1:20001", 0), ("127.0.0.1:20001", 1)]);
    assert!(!n.volumes.contains_key(&("p".into(), "v".into())));
    assert_eq!(pool_info(&n, "p").unwrap().volumes, 1);
    assert_eq!(status(&n, Command::DeleteVolume { pool: "p".into(), volume: "v".into() }), 404);
    assert_eq!(status(&n, Command::DeleteVolume { pool: "q".into(), volume: "w".into() }), 404);
}

#[test]
fn exported_volume_cannot_be_deleted() {
    let s = run(&cluster(), create_vol("p", vol_req("v", 1 << 20)));
    let x = run(&s, Command::CreateExport(export_req(NQN, None, "v")));
    let e = err(&x, Command::DeleteVolume { pool: "p".into(), volume: "v".into() });
    assert_eq!(e.status(), 409);
    assert!(e.to_string().contains("delete the export first"), "{e}");
    let y = run(&x, Command::DeleteExport { nqn: NQN.into(), nsid: 1 });
    run(&y, Command::DeleteVolume { pool: "p".into(), volume: "v".into() });
}

// ---------------------------------------------------------------------------------------------
// Exports.

fn with_volumes(names: &[&str]) -> State {
    let mut s = cluster();
    for n in names {
        s = run(&s, create_vol("p", vol_req(n, 1 << 20)));
    }
    s
}

#[test]
fn create_export_defaults_and_lowest_free_nsid() {
    let s = with_volumes(&["a", "b", "c", "d"]);
    let (s, out) = ok(&s, Command::CreateExport(export_req(NQN, None, "a")));
    let Outcome::Export(x) = out else { panic!("{out:?}") };
    assert_eq!((x.nqn.as_str(), x.nsid, x.listen.as_str()), (NQN, 1, "127.0.0.1:4420"));
    assert!(x.hosts.is_empty());
    assert_eq!(x.volume, volume(&s, "p", "a").unwrap());
    let s = run(&s, Command::CreateExport(export_req(NQN, Some(3), "b")));
    let (s, out) = ok(&s, Command::CreateExport(export_req(NQN, None, "c")));
    assert!(matches!(out, Outcome::Export(ref x) if x.nsid == 2));
    // Another subsystem numbers from 1 again.
    let (s, out) = ok(&s, Command::CreateExport(export_req("nqn.2026-11.io.tessera:b", None, "d")));
    assert!(matches!(out, Outcome::Export(ref x) if x.nsid == 1));
    let list: Vec<_> = exports(&s).iter().map(|x| (x.nqn.clone(), x.nsid, x.volume.name.clone())).collect();
    assert_eq!(
        list,
        [
            (NQN.to_string(), 1, "a".to_string()),
            (NQN.to_string(), 2, "c".to_string()),
            (NQN.to_string(), 3, "b".to_string()),
            ("nqn.2026-11.io.tessera:b".to_string(), 1, "d".to_string())
        ]
    );
    // Freed ids are reused lowest first.
    let s = run(&s, Command::DeleteExport { nqn: NQN.into(), nsid: 1 });
    let (_, out) = ok(&s, Command::CreateExport(export_req(NQN, None, "a")));
    assert!(matches!(out, Outcome::Export(ref x) if x.nsid == 1));
}

#[test]
fn create_export_refusals() {
    let s = run(&with_volumes(&["a", "b"]), Command::CreateExport(export_req(NQN, None, "a")));
    assert_eq!(status(&s, Command::CreateExport(export_req(NQN, Some(1), "b"))), 409);
    assert!(err(&s, Command::CreateExport(export_req("nqn.2026-11.io.tessera:other", None, "a"))).to_string().contains("already exported"));
    assert_eq!(status(&s, Command::CreateExport(export_req(NQN, Some(0), "b"))), 400);
    assert_eq!(status(&s, Command::CreateExport(export_req(NQN, Some(u32::MAX), "b"))), 400);
    assert_eq!(status(&s, Command::CreateExport(export_req(NQN, None, "nope"))), 404);
    let mut other_pool = export_req(NQN, None, "b");
    other_pool.pool = "nope".into();
    assert_eq!(err(&s, Command::CreateExport(other_pool)), CmdError::NoPool("nope".into()));
    let long = format!("nqn.{}", "x".repeat(220));
    for bad in ["iqn.2026-11.io.tessera:a", "nqn.a/b", "nqn.a\u{7}", "nqn.é", long.as_str(), DISCOVERY_NQN] {
        assert_eq!(status(&s, Command::CreateExport(export_req(bad, None, "b"))), 400, "{bad:?}");
    }
    let mut bad_host = export_req("nqn.x", None, "b");
    bad_host.hosts = vec!["host1".into()];
    assert_eq!(status(&s, Command::CreateExport(bad_host)), 400);
    let mut dup_host = export_req("nqn.x", None, "b");
    dup_host.hosts = vec!["nqn.h".into(), "nqn.h".into()];
    assert_eq!(status(&s, Command::CreateExport(dup_host)), 400);
    let mut bad_listen = export_req("nqn.x", None, "b");
    bad_listen.listen = Some("0.0.0.0".into());
    assert_eq!(status(&s, Command::CreateExport(bad_listen)), 400);
    // Exactly 223 bytes is allowed.
    let max = format!("nqn.{}", "x".repeat(MAX_NQN_LEN - 4));
    run(&s, Command::CreateExport(export_req(&max, None, "b")));
}

#[test]
fn namespaces_of_a_subsystem_share_hosts_and_listen_address() {
    let s = with_volumes(&["a", "b", "c"]);
    let mut first = export_req(NQN, None, "a");
    first.hosts = vec!["nqn.h1".into(), "nqn.h2".into()];
    first.listen = Some("127.0.0.1:4421".into());
    let s = run(&s, Command::CreateExport(first));
    // Left out: inherited.
    let (n, out) = ok(&s, Command::CreateExport(export_req(NQN, None, "b")));
    assert!(matches!(out, Outcome::Export(ref x) if x.hosts == ["nqn.h1", "nqn.h2"] && x.listen == "127.0.0.1:4421"), "{out:?}");
    // Named: must agree (host order does not matter).
    let mut same = export_req(NQN, None, "c");
    same.hosts = vec!["nqn.h2".into(), "nqn.h1".into()];
    same.listen = Some("127.0.0.1:4421".into());
    run(&n, Command::CreateExport(same));
    let mut hosts = export_req(NQN, None, "c");
    hosts.hosts = vec!["nqn.h3".into()];
    assert_eq!(status(&n, Command::CreateExport(hosts)), 409);
    let mut listen = export_req(NQN, None, "c");
    listen.listen = Some("127.0.0.1:4420".into());
    assert_eq!(status(&n, Command::CreateExport(listen)), 409);
}

#[test]
fn a_subsystem_can_be_served_on_several_paths() {
    let s = with_volumes(&["a", "b", "c"]);
    let mut first = export_req(NQN, None, "a");
    first.listen = Some("127.0.0.1:4420".into());
    first.paths = vec!["127.0.0.1:4421".into(), "10.0.0.2:4420".into()];
    let (s, out) = ok(&s, Command::CreateExport(first));
    assert!(matches!(out, Outcome::Export(ref x) if x.paths == ["127.0.0.1:4421", "10.0.0.2:4420"]), "{out:?}");
    // A further namespace inherits the paths, or must name the same ones.
    let (n, out) = ok(&s, Command::CreateExport(export_req(NQN, None, "b")));
    assert!(matches!(out, Outcome::Export(ref x) if x.paths.len() == 2), "{out:?}");
    let mut other = export_req(NQN, None, "c");
    other.listen = Some("127.0.0.1:4420".into());
    other.paths = vec!["127.0.0.1:4421".into()];
    assert!(err(&n, Command::CreateExport(other)).to_string().contains("served on paths"));
    // Bad paths: unparsable, repeated (also as the listen address), too many.
    for paths in [vec!["nowhere".to_string()], vec!["127.0.0.1:4425".into(), "127.0.0.1:4425".into()], vec!["127.0.0.1:4420".into()]] {
        let mut r = export_req("nqn.2026-11.io.tessera:p", None, "c");
        r.paths = paths.clone();
        assert_eq!(status(&s, Command::CreateExport(r)), 400, "{paths:?}");
    }
    // The optimized path moves for every namespace of the subsystem; only a path can be it.
    let (m, out) = ok(&n, Command::SetOptimized { nqn: NQN.into(), listen: "10.0.0.2:4420".into() });
    let Outcome::Exports(xs) = out else { panic!("{out:?}") };
    assert_eq!(xs.iter().map(|x| x.optimized.as_deref()).collect::<Vec<_>>(), [Some("10.0.0.2:4420"); 2]);
    let (_, out) = ok(&m, Command::SetOptimized { nqn: NQN.into(), listen: "127.0.0.1:4420".into() });
    assert!(matches!(out, Outcome::Exports(ref xs) if xs.iter().all(|x| x.optimized.is_none())), "{out:?}");
    assert_eq!(status(&m, Command::SetOptimized { nqn: NQN.into(), listen: "127.0.0.1:4999".into() }), 400);
    assert_eq!(status(&m, Command::SetOptimized { nqn: "nqn.2026-11.io.tessera:none".into(), listen: "127.0.0.1:4420".into() }), 404);
    let mut many = export_req("nqn.2026-11.io.tessera:p", None, "c");
    many.paths = (1..=8).map(|i| format!("127.0.0.1:{}", 4420 + i)).collect();
    assert!(err(&s, Command::CreateExport(many)).to_string().contains("at most 8"));
}

#[test]
fn delete_export() {
    let s = run(&with_volumes(&["a"]), Command::CreateExport(export_req(NQN, None, "a")));
    let (n, out) = ok(&s, Command::DeleteExport { nqn: NQN.into(), nsid: 1 });
    assert!(matches!(out, Outcome::Export(ref x) if x.nsid == 1 && x.volume.name == "a"));
    assert!(n.exports.is_empty());
    assert_eq!(err(&n, Command::DeleteExport { nqn: NQN.into(), nsid: 1 }), CmdError::NoExport { nqn: NQN.into(), nsid: 1 });
    assert_eq!(status(&s, Command::DeleteExport { nqn: NQN.into(), nsid: 2 }), 404);
}

#[test]
fn refused_commands_change_nothing_and_statuses_are_distinct() {
    let s = with_volumes(&["a"]);
    let copy = s.clone();
    let _ = err(&s, create_vol("p", vol_req("b", 1 << 40)));
    assert_eq!(s, copy);
    assert_eq!(CmdError::Internal("x".into()).status(), 500);
    assert_eq!(CmdError::NoSpace("x".into()).status(), 507);
}

#[test]
fn footprint_rounds_up() {
    assert_eq!(footprint(4096, ObjectClass::S1), 4096);
    assert_eq!(footprint(4096, ObjectClass::Rp(3)), 3 * 4096);
    assert_eq!(footprint(4096, ObjectClass::Ec { k: 4, p: 2 }), 6144);
    assert_eq!(footprint(4097, ObjectClass::Ec { k: 2, p: 1 }), 6146);
    assert_eq!(footprint(u64::MAX, ObjectClass::Rp(3)), 3 * u128::from(u64::MAX));
}

// ---------------------------------------------------------------------------------------------
// Self-healing: floors, reintegration, exclude, drain, rebuild completion, the base map.

fn at(env_floor: u64) -> Env {
    Env { epoch_floor: env_floor, ..env(7) }
}

fn target(s: &State, pool: &str, rank: u32, index: u16) -> PoolTarget {
    s.pools[pool].targets.iter().find(|t| t.rank == rank && t.index == index).copied().unwrap()
}

fn sel(rank: u32, target: Option<u16>) -> TargetSelector {
    TargetSelector { rank, target }
}

fn exclude_cmd(rank: u32, target: Option<u16>) -> Command {
    Command::Exclude { pool: "p".into(), sel: sel(rank, target) }
}

fn drain_cmd(rank: u32, target: Option<u16>) -> Command {
    Command::Drain { pool: "p".into(), sel: sel(rank, target) }
}

fn reintegrate_cmd(rank: u32, target: Option<u16>) -> Command {
    Command::Reintegrate { pool: "p".into(), sel: sel(rank, target) }
}

fn done(version: u32) -> Command {
    Command::RebuildDone { pool: "p".into(), version }
}

fn states(s: &State, rank: u32) -> Vec<(TargetStateName, u64, bool)> {
    s.pools["p"].targets.iter().filter(|t| t.rank == rank).map(|t| (t.state, t.since_epoch, t.drained)).collect()
}

use TargetStateName::{Down as DOWN, DownOut as DOWNOUT, Up as UP, UpIn as UPIN};

#[test]
fn engines_down_sets_epoch_floors_and_a_second_failure_keeps_the_smaller() {
    let s = run(&cluster(), Command::EnginesDown(vec![1]));
    assert_eq!(states(&s, 1), [(DOWN, FLOOR, false), (DOWN, FLOOR, false)]);
    assert_eq!(states(&s, 0), [(UPIN, 0, false), (UPIN, 0, false)]);
    // Back (UP, floor kept), then down again while being reintegrated: the older floor stays.
    let s = run(&s, register(reg(1, "", 2)));
    assert_eq!(states(&s, 1), [(UP, FLOOR, false), (UP, FLOOR, false)]);
    let (later, _) = apply(&s, &Command::EnginesDown(vec![1]), &at(FLOOR + 1000)).unwrap();
    assert_eq!(states(&later, 1), [(DOWN, FLOOR, false), (DOWN, FLOOR, false)]);
    let (earlier, _) = apply(&s, &Command::EnginesDown(vec![1]), &at(FLOOR - 1000)).unwrap();
    assert_eq!(states(&earlier, 1), [(DOWN, FLOOR - 1000, false), (DOWN, FLOOR - 1000, false)]);
    // A target filled from scratch (floor 0) that fails again still needs everything.
    let mut zero = s.clone();
    zero.pools.get_mut("p").unwrap().targets.iter_mut().filter(|t| t.rank == 1).for_each(|t| t.since_epoch = 0);
    let n = run(&zero, Command::EnginesDown(vec![1]));
    assert_eq!(states(&n, 1), [(DOWN, 0, false), (DOWN, 0, false)]);
}

#[test]
fn a_returning_engine_is_reintegrated_in_one_new_version_per_pool() {
    let mut s = cluster();
    s = run(&s, Command::CreatePool(pool_req("q", &[1, 2], Some("S1"))));
    s = run(&s, Command::CreatePool(pool_req("r", &[0, 2], Some("S1"))));
    s = run(&s, Command::EnginesDown(vec![1]));
    // Target 1:1 of p was rebuilt (DOWNOUT) meanwhile: it comes back too.
    s = run(&s, done(2));
    assert_eq!(states(&s, 1), [(DOWNOUT, FLOOR, false), (DOWNOUT, FLOOR, false)]);
    let before = s.clone();
    let (n, out) = ok(&s, register(reg(1, "", 2)));
    assert_eq!(out, Outcome::Registered { rank: 1, replaced: None, reintegrated: vec![("p".into(), 4), ("q".into(), 3)] });
    assert_eq!(n.engines[&1].state, EngineState::Up);
    assert_eq!(states(&n, 1), [(UP, FLOOR, false), (UP, FLOOR, false)]);
    assert!(n.pools["p"].targets.iter().filter(|t| t.rank == 1).all(|t| t.fseq == 4));
    assert_eq!(n.pools["q"].map_version, 3);
    assert_eq!(n.pools["r"], before.pools["r"]);
    // Registering again changes nothing more.
    assert_eq!(run(&n, register(reg(1, "", 2))), n);
}

#[test]
fn drained_targets_are_not_reintegrated_automatically() {
    let mut s = run(&cluster(), drain_cmd(1, Some(0)));
    s = run(&s, Command::EnginesDown(vec![1]));
    assert_eq!(states(&s, 1), [(DOWN, 0, true), (DOWN, FLOOR, false)]);
    let n = run(&s, register(reg(1, "", 2)));
    assert_eq!(states(&n, 1), [(DOWN, 0, true), (UP, FLOOR, false)]);
}

#[test]
fn a_replacement_engine_takes_over_a_down_rank_and_is_filled_from_scratch() {
    let s = run(&cluster(), Command::EnginesDown(vec![1]));
    let mut new = reg(1, "", 2);
    new.uuid = Uuid::from_u128(0xBEEF);
    new.address = "127.0.0.1:1".into();
    let (n, out) = ok(&s, register(new.clone()));
    assert_eq!(out, Outcome::Registered { rank: 1, replaced: Some(reg(1, "", 2).uuid), reintegrated: vec![("p".into(), 3)] });
    assert_eq!((n.engines[&1].uuid, n.engines[&1].address.as_str(), n.engines[&1].state), (new.uuid, "127.0.0.1:1", EngineState::Up));
    assert_eq!(states(&n, 1), [(UP, 0, false), (UP, 0, false)]);
    // The old engine is refused now.
    assert_eq!(heartbeat_pools(&n, 1, reg(1, "", 2).uuid).unwrap_err().status(), 409);
    // Manual reintegration: the targets stay out, but their floors are gone (a new version says so).
    let (m, _) = ok(&s, Command::RegisterEngine { req: new.clone(), reintegrate: false });
    assert_eq!(states(&m, 1), [(DOWN, 0, false), (DOWN, 0, false)]);
    assert_eq!(m.pools["p"].map_version, 3);
    // An Up rank is not taken over.
    let e = err(&n, register(reg(1, "", 2)));
    assert_eq!(e.status(), 409, "{e}");
    assert!(e.to_string().contains("which is up"), "{e}");
}

#[test]
fn exclude_takes_placeable_targets_down_with_floors() {
    let s = cluster();
    let (n, out) = ok(&s, exclude_cmd(1, Some(0)));
    assert_eq!(out, Outcome::TargetsChanged { pool: "p".into(), version: 2, targets: vec![TargetRef { rank: 1, index: 0 }] });
    assert_eq!(states(&n, 1), [(DOWN, FLOOR, false), (UPIN, 0, false)]);
    assert_eq!(target(&n, "p", 1, 0).fseq, 2);
    // The whole engine: only the target still in changes.
    let (n2, out) = ok(&n, exclude_cmd(1, None));
    assert_eq!(out, Outcome::TargetsChanged { pool: "p".into(), version: 3, targets: vec![TargetRef { rank: 1, index: 1 }] });
    assert_eq!(states(&n2, 1), [(DOWN, FLOOR, false), (DOWN, FLOOR, false)]);
    // An UP target can be excluded (it keeps its floor).
    let up = run(&run(&n2, Command::EnginesDown(vec![1])), register(reg(1, "", 2)));
    let (n3, _) = apply(&up, &exclude_cmd(1, Some(0)), &at(FLOOR + 1)).unwrap();
    assert_eq!(states(&n3, 1)[0], (DOWN, FLOOR, false));
    // Refusals.
    let e = err(&n, exclude_cmd(1, Some(0)));
    assert_eq!(e.status(), 409);
    assert_eq!(e.to_string(), "target 1:0 of pool p is DOWN: only UPIN or UP targets can be excluded");
    assert_eq!(status(&n2, exclude_cmd(1, None)), 409);
    assert_eq!(err(&s, exclude_cmd(7, None)).to_string(), "pool p has no targets on engine rank 7");
    assert_eq!(status(&s, exclude_cmd(7, None)), 404);
    assert_eq!(err(&s, exclude_cmd(1, Some(5))).to_string(), "pool p has no target 1:5");
    assert_eq!(status(&s, exclude_cmd(1, Some(5))), 404);
    assert_eq!(status(&s, Command::Exclude { pool: "nope".into(), sel: sel(1, None) }), 404);
}

#[test]
fn drain_takes_upin_targets_down_for_good() {
    let s = cluster();
    let (n, out) = ok(&s, drain_cmd(2, None));
    assert!(matches!(out, Outcome::TargetsChanged { version: 2, ref targets, .. } if targets.len() == 2), "{out:?}");
    assert_eq!(states(&n, 2), [(DOWN, 0, true), (DOWN, 0, true)]);
    // Rebuilt: DOWNOUT, still drained.
    let n = run(&n, done(2));
    assert_eq!(states(&n, 2), [(DOWNOUT, 0, true), (DOWNOUT, 0, true)]);
    assert_eq!(err(&n, drain_cmd(2, Some(0))).to_string(), "target 2:0 of pool p is DOWNOUT: only UPIN targets can be drained");
    // UP targets cannot be drained.
    let up = run(&run(&s, Command::EnginesDown(vec![1])), register(reg(1, "", 2)));
    assert_eq!(status(&up, drain_cmd(1, None)), 409);
    assert_eq!(status(&s, drain_cmd(9, None)), 404);
    // A drained target comes back only when asked, from scratch.
    let (back, _) = ok(&n, reintegrate_cmd(2, Some(1)));
    assert_eq!(states(&back, 2), [(DOWNOUT, 0, true), (UP, 0, false)]);
}

#[test]
fn reintegrate_brings_out_targets_of_an_up_engine_back() {
    let s = run(&cluster(), Command::EnginesDown(vec![1]));
    let e = err(&s, reintegrate_cmd(1, None));
    assert_eq!((e.status(), e.to_string().as_str()), (409, "engine rank 1 is down: it must be up to be reintegrated"));
    let s = run(&s, Command::RegisterEngine { req: reg(1, "", 2), reintegrate: false });
    let s = run(&s, done(2));
    let (n, out) = ok(&s, reintegrate_cmd(1, Some(1)));
    assert_eq!(out, Outcome::TargetsChanged { pool: "p".into(), version: 4, targets: vec![TargetRef { rank: 1, index: 1 }] });
    assert_eq!(states(&n, 1), [(DOWNOUT, FLOOR, false), (UP, FLOOR, false)]);
    let (n, _) = ok(&n, reintegrate_cmd(1, None));
    assert_eq!(states(&n, 1), [(UP, FLOOR, false), (UP, FLOOR, false)]);
    let e = err(&n, reintegrate_cmd(1, None));
    assert_eq!(e.status(), 409);
    assert!(e.to_string().contains("are UP: only DOWN or DOWNOUT targets can be reintegrated"), "{e}");
    assert_eq!(status(&n, reintegrate_cmd(0, Some(0))), 409);
    assert_eq!(status(&n, reintegrate_cmd(4, None)), 404);
    assert_eq!(status(&n, Command::Reintegrate { pool: "nope".into(), sel: sel(1, None) }), 404);
}

#[test]
fn rebuild_done_settles_the_current_version_only() {
    let s = run(&cluster(), exclude_cmd(1, None));
    assert_eq!(s.pools["p"].map_version, 2);
    // Stale or future versions: nothing.
    for v in [1, 3] {
        let (n, out) = ok(&s, done(v));
        assert_eq!((n, out), (s.clone(), Outcome::RebuildDone { pool: "p".into(), version: None }));
    }
    let (n, out) = ok(&s, done(2));
    assert_eq!(out, Outcome::RebuildDone { pool: "p".into(), version: Some(3) });
    assert_eq!(states(&n, 1), [(DOWNOUT, FLOOR, false), (DOWNOUT, FLOOR, false)]);
    // DOWN -> DOWNOUT keeps fseq.
    assert_eq!(target(&n, "p", 1, 0).fseq, 2);
    let p = &n.pools["p"];
    assert_eq!((p.base_version, &p.base_targets), (3, &p.targets));
    // Settled: nothing to finish.
    assert_eq!(ok(&n, done(3)).1, Outcome::RebuildDone { pool: "p".into(), version: None });
    // Reintegrated and finished: UPIN with floors cleared, the base again.
    let n = run(&n, reintegrate_cmd(1, None));
    let n = run(&n, done(4));
    assert_eq!(states(&n, 1), [(UPIN, 0, false), (UPIN, 0, false)]);
    let p = &n.pools["p"];
    assert_eq!((p.map_version, p.base_version, &p.base_targets), (5, 5, &p.targets));
    assert_eq!(status(&n, Command::RebuildDone { pool: "nope".into(), version: 1 }), 404);
}

#[test]
fn rebuild_done_handles_down_and_up_together() {
    let s = run(&cluster(), Command::EnginesDown(vec![1]));
    let s = run(&s, register(reg(1, "", 2)));
    let s = run(&s, exclude_cmd(2, Some(0)));
    assert_eq!(states(&s, 1), [(UP, FLOOR, false), (UP, FLOOR, false)]);
    let n = run(&s, done(4));
    assert_eq!(states(&n, 1), [(UPIN, 0, false), (UPIN, 0, false)]);
    assert_eq!(states(&n, 2), [(DOWNOUT, FLOOR, false), (UPIN, 0, false)]);
    assert_eq!(n.pools["p"].map_version, 5);
}

#[test]
fn the_base_map_is_the_last_settled_one() {
    let s = cluster();
    let m = pool_map(&s, "p").unwrap();
    assert_eq!((m.base_version, &m.base_targets), (1, &m.targets));
    // Unsettled: the base stays at version 1 while the map moves on.
    let n = run(&run(&s, exclude_cmd(0, Some(0))), exclude_cmd(2, None));
    let m = pool_map(&n, "p").unwrap();
    assert_eq!((m.version, m.base_version), (3, 1));
    assert_eq!(m.base_targets, s.pools["p"].targets);
    // A record stored before bases existed: the current map is served as the base, and is
    // recorded as the base when the map first changes.
    let mut old = s.clone();
    let p = old.pools.get_mut("p").unwrap();
    (p.base_version, p.base_targets) = (0, Vec::new());
    let m = pool_map(&old, "p").unwrap();
    assert_eq!((m.base_version, &m.base_targets), (1, &m.targets));
    let n = run(&old, exclude_cmd(0, Some(0)));
    assert_eq!((n.pools["p"].base_version, &n.pools["p"].base_targets), (1, &s.pools["p"].targets));
}

#[test]
fn store_map_keeps_floors_and_drain_marks() {
    let mut s = run(&run(&cluster(), exclude_cmd(1, Some(0))), drain_cmd(2, Some(1)));
    let p = s.pools.get_mut("p").unwrap();
    let before = p.targets.clone();
    let m = placement_map(p).unwrap().set_state(0, 0, TargetState::Down).unwrap();
    store_map(p, &m);
    for (a, b) in before.iter().zip(&p.targets) {
        assert_eq!((a.since_epoch, a.drained), (b.since_epoch, b.drained), "{a:?} {b:?}");
    }
    assert_eq!(target(&s, "p", 1, 0).since_epoch, FLOOR);
    assert!(target(&s, "p", 2, 1).drained);
}

#[test]
fn fault_domain_check_runs_only_when_engines_are_short() {
    let s = run(&cluster(), create_vol("p", vol_req("v", 1 << 20)));
    assert!(!pool_info(&s, "p").unwrap().fault_domains_reduced);
    // Two engines left for EC_2P1 (3 shards): whatever placement does with the third shard
    // (leave it unavailable, or put it on a second target of a used engine), the flag says
    // whether some group has two writable shards on one engine.
    let n = run(&s, Command::EnginesDown(vec![2]));
    let m = placement_map(&n.pools["p"]).unwrap();
    let oid = ObjectId(n.volumes[&("p".to_string(), "v".to_string())].uuid.as_u128());
    let class = ObjectClass::Ec { k: 2, p: 1 };
    let doubled = (0..group_count(&m, class)).any(|g| {
        let grp = group_layout(&m, oid, g, class).unwrap();
        let w: Vec<u32> = grp.shards.iter().filter(|s| s.writable()).map(|s| s.rank).collect();
        w.iter().collect::<BTreeSet<_>>().len() < w.len()
    });
    assert_eq!(fault_domains_reduced(&n, &n.pools["p"]), doubled);
    assert_eq!(pool_info(&n, "p").unwrap().fault_domains_reduced, doubled);
    // No volume, nothing to reduce.
    let empty = run(&cluster(), Command::EnginesDown(vec![2]));
    assert!(!pool_info(&empty, "p").unwrap().fault_domains_reduced);
}

fn extend_cmd(ranks: &[u32]) -> Command {
    Command::Extend { pool: "p".into(), ranks: ranks.to_vec() }
}

#[test]
fn extend_adds_up_targets_keeps_the_group_count_and_settles_into_the_base() {
    let mut s = cluster();
    s = run(&s, register(reg(3, "", 3)));
    let capacity = pool_capacity(&s, &s.pools["p"]);
    let (n, out) = ok(&s, extend_cmd(&[3]));
    let added: Vec<TargetRef> = (0..3).map(|index| TargetRef { rank: 3, index }).collect();
    assert_eq!(out, Outcome::TargetsChanged { pool: "p".into(), version: 2, targets: added });
    let p = &n.pools["p"];
    assert_eq!(p.targets.len(), 9);
    assert_eq!(states(&n, 3), [(UP, 0, false); 3]);
    assert!(p.targets.iter().filter(|t| t.rank == 3).all(|t| (t.added, t.fseq) == (2, 2)));
    assert!(p.targets.iter().filter(|t| t.rank != 3).all(|t| (t.added, t.state) == (0, UPIN)));
    // The map before is the base; groups are still counted from the 6 targets it was created with.
    assert_eq!((p.base_version, p.base_targets.len(), p.group_targets), (1, 6, 6));
    let info = pool_map(&n, "p").unwrap();
    assert_eq!((info.group_targets, info.base_targets.len()), (6, 6));
    assert_eq!(pool_capacity(&n, p), capacity + 3 * (1 << 30));
    // Filled: UPIN, and the whole map is the base; the group count stays.
    let n = run(&n, done(2));
    let p = &n.pools["p"];
    assert_eq!(states(&n, 3), [(UPIN, 0, false); 3]);
    assert_eq!((p.map_version, p.base_version, p.base_targets.len(), p.group_targets), (3, 3, 9, 6));
    assert_eq!(placement_map(p).unwrap().group_targets(), 6);
}

#[test]
fn extend_refusals() {
    let mut s = cluster();
    s = run(&s, register(reg(3, "", 2)));
    s = run(&s, register(reg(4, "", 2)));
    assert_eq!(status(&s, extend_cmd(&[])), 400);
    assert_eq!(status(&s, extend_cmd(&[3, 3])), 400);
    assert_eq!(status(&s, extend_cmd(&[9])), 404);
    assert_eq!(status(&s, Command::Extend { pool: "nope".into(), ranks: vec![3] }), 404);
    assert_eq!(status(&s, extend_cmd(&[1])), 409, "already in the pool");
    let down = run(&s, Command::EnginesDown(vec![4]));
    assert!(err(&down, extend_cmd(&[4])).to_string().contains("down"));
    // Not while a rebuild runs (rank 0 down: the map is not settled).
    let rebuilding = run(&s, Command::EnginesDown(vec![0]));
    let e = err(&rebuilding, extend_cmd(&[3]));
    assert_eq!(e.status(), 409);
    assert!(e.to_string().contains("rebuilding"), "{e}");
    // Two at once, in one version.
    let (n, _) = ok(&s, extend_cmd(&[4, 3]));
    assert_eq!(n.pools["p"].map_version, 2);
    assert_eq!(n.pools["p"].targets.iter().filter(|t| t.state == UP).count(), 4);
}

#[test]
fn a_new_map_version_records_the_epoch_it_takes_effect_at() {
    let s = cluster();
    assert_eq!(s.pools["p"].map_epoch, env(7).epoch_now, "created");
    let later = Env { epoch_now: env(7).epoch_now + 1000, ..env(7) };
    let (n, _) = apply(&s, &Command::EnginesDown(vec![1]), &later).unwrap();
    assert_eq!((n.pools["p"].map_version, n.pools["p"].map_epoch), (2, later.epoch_now));
    assert_eq!(pool_map(&n, "p").unwrap().map_epoch, later.epoch_now);
    // A command that leaves the map alone keeps its epoch.
    let (v, _) = apply(&n, &create_vol("p", vol_req("v", 1 << 20)), &Env { epoch_now: later.epoch_now + 5, ..later }).unwrap();
    assert_eq!(v.pools["p"].map_epoch, later.epoch_now);
}

#[test]
fn floors_of_targets_out_too_long_expire_in_one_new_version() {
    // Engine 1 down and rebuilt elsewhere (DOWNOUT, floor FLOOR); engine 2 down, still DOWN.
    let mut s = run(&cluster(), Command::EnginesDown(vec![1]));
    s = run(&s, done(2));
    let (n, _) = apply(&s, &Command::EnginesDown(vec![2]), &at(FLOOR + 10)).unwrap();
    assert_eq!(states(&n, 1), [(DOWNOUT, FLOOR, false); 2]);
    // Not yet: nothing changes, no new version.
    let (same, out) = ok(&n, Command::ExpireFloors { below: FLOOR });
    assert_eq!(out, Outcome::FloorsExpired(vec![]));
    assert_eq!(same, n);
    // Past the window: only the DOWNOUT targets' floors expire (the DOWN ones are being rebuilt),
    // in one new map version, which engines see and release their aggregation hold on.
    let (e, out) = ok(&n, Command::ExpireFloors { below: FLOOR + 100 });
    let expired: Vec<TargetRef> = (0..2).map(|index| TargetRef { rank: 1, index }).collect();
    assert_eq!(out, Outcome::FloorsExpired(vec![("p".into(), n.pools["p"].map_version + 1, expired)]));
    assert_eq!(states(&e, 1), [(DOWNOUT, 0, false); 2]);
    assert_eq!(states(&e, 2), [(DOWN, FLOOR + 10, false); 2]);
    // Once expired, never again.
    assert_eq!(ok(&e, Command::ExpireFloors { below: u64::MAX }).1, Outcome::FloorsExpired(vec![]));
}

#[test]
fn reservations_are_kept_per_exported_namespace() {
    use tessera_mgmt_api::ReservationCommand;
    use tessera_nvme_resv::{opcode, RESERVATION_CONFLICT};
    let s = run(&with_volumes(&["a"]), Command::CreateExport(export_req(NQN, None, "a")));
    let cmd = |host: u8, op: u8, cdw10: u32, k1: u64, k2: u64| {
        let mut data = k1.to_le_bytes().to_vec();
        if op != opcode::RELEASE {
            data.extend_from_slice(&k2.to_le_bytes());
        }
        Command::Reservation { nqn: NQN.into(), nsid: 1, cmd: ReservationCommand { host: [host; 16], opcode: op, cdw10, data } }
    };
    let (s, out) = ok(&s, cmd(1, opcode::REGISTER, 0, 0, 0x11));
    assert!(matches!(out, Outcome::Reservation { status: 0, ref reservation } if reservation.state.registrants.len() == 1), "{out:?}");
    let (s, _) = ok(&s, cmd(2, opcode::REGISTER, 0, 0, 0x22));
    let (s, _) = ok(&s, cmd(1, opcode::ACQUIRE, 1 << 8, 0x11, 0));
    // Refused by the rules: an NVMe status, nothing changed.
    let (same, out) = ok(&s, cmd(2, opcode::ACQUIRE, 1 << 8, 0x22, 0));
    assert!(matches!(out, Outcome::Reservation { status, .. } if status == RESERVATION_CONFLICT.to_field()), "{out:?}");
    assert_eq!(same, s);
    let (_, out) = ok(&s, cmd(2, opcode::ACQUIRE, 7 << 8, 0x22, 0));
    assert!(matches!(out, Outcome::Reservation { status, .. } if status != 0 && status != RESERVATION_CONFLICT.to_field()), "{out:?}");
    // A preempt records the notification owed to the preempted host; the export list carries it.
    let (s, _) = ok(&s, cmd(2, opcode::ACQUIRE, 1 | (1 << 8), 0x22, 0x11));
    let x = &exports(&s)[0];
    assert_eq!(x.reservation.state.reservation.and_then(|h| h.holder), Some([2; 16]));
    assert_eq!(x.reservation.notices.iter().map(|n| (n.seq, n.notice.host)).collect::<Vec<_>>(), vec![(1, [1; 16])]);
    // No such namespace: 404; the reservation goes with the export.
    assert_eq!(
        status(
            &s,
            Command::Reservation {
                nqn: NQN.into(),
                nsid: 2,
                cmd: ReservationCommand { host: [1; 16], opcode: opcode::REGISTER, cdw10: 0, data: vec![0; 16] }
            }
        ),
        404
    );
    let n = run(&s, Command::DeleteExport { nqn: NQN.into(), nsid: 1 });
    let again = run(&n, Command::CreateExport(export_req(NQN, None, "a")));
    assert!(exports(&again)[0].reservation.is_empty());
}
