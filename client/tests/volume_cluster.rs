//! Volume I/O against a real local cluster: the management service and three engines as
//! separate processes on 127.0.0.1, through the client library (what the DAOS bdev uses).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use tessera_client::volume::VolumeError;
use tessera_mgmt_api::{MgmtClient, TargetStateName};
use tessera_testkit::{wait_for, LocalCluster};

mod common;
use common::{
    log_lines, open, pattern, runtime, sequential_random_writes, used_bytes, verify_all, verify_with_each_engine_down, wait_healed,
    write_whole, Rng,
};

/// The pool map version the service has now.
fn pool_version(rt: &tokio::runtime::Runtime, mgmt: &MgmtClient) -> u32 {
    rt.block_on(mgmt.pool("p")).unwrap().map.version
}

/// 3 engines × 2 targets, EC_2P1: one engine is lost mid-workload and its shards are rebuilt on
/// the spare targets of the other two (each group then has two shards on one engine: "fault-domain
/// redundancy reduced"); then a second engine is lost. Every read is checked against a byte-exact
/// model at every step; after the second loss a read may fail (Unavailable) but is never wrong.
///
/// Before self-healing this test expected the lost engine's shards to stay unavailable (every
/// write after the DOWN degraded, every write after the second loss refused). With the rebuild
/// the lost shards move to spare targets, so writes are not degraded and, after the second loss,
/// every group keeps at most one unplaceable shard (both survivors' targets are used by the
/// group, at most one shard is left without a target), so writes succeed; reads of the groups
/// left with fewer than k readable shards fail.
#[test]
fn ec_2p1_survives_one_engine_killed_mid_workload_and_refuses_after_two() {
    // The rebuild throttled (each moved shard of a chunk is 512 KiB) so that it is still running
    // while the first reads after the DOWN are checked: they are degraded reads.
    let mut c = LocalCluster::start_with("vol-ec", 3, 2, "256MiB", "1500ms", "\n[heal]\nrebuild_rate = \"1MiB\"\n");
    let rt = runtime();
    let mgmt = c.client();
    let size = 8 << 20;
    let vol = rt.block_on(open(&c, "EC_2P1", size));
    let class = vol.layout().class();
    let (k, p) = (class.data_shards() as usize, class.parity_shards() as usize);
    let chunk = vol.layout().chunk_size();
    let chunks = size / chunk;
    let mut model = vec![0u8; size as usize];
    let mut rng = Rng(0x5eed_1234);
    // Start from a fully written volume so every read checks real data.
    rt.block_on(async {
        write_whole(&vol, &mut model, 7).await;
    });
    rt.block_on(sequential_random_writes(&vol, &mut model, &mut rng, 150, 1));
    rt.block_on(verify_all(&vol, &model));
    assert_eq!(vol.stats().degraded_reads, 0);

    // kill -9 one engine while writes are in flight.
    let writer = {
        let vol = vol.clone();
        let mut model2 = model.clone();
        let mut rng2 = Rng(0xabcdef);
        std::thread::spawn(move || {
            let rt = runtime();
            rt.block_on(sequential_random_writes(&vol, &mut model2, &mut rng2, 200, 2));
            model2
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    c.kill_engine(1);
    let model = writer.join().unwrap();
    c.wait_engine_down(1, Duration::from_secs(10));
    // The writes waited for the DOWN, then went to the moved shards. Reads are right while the
    // rebuild runs: a chunk whose data shard was on engine 1 is read degraded until the service
    // commits the rebuild (a new map version; until then the moved shard is not read).
    let down_version = pool_version(&rt, &mgmt);
    rt.block_on(vol.refresh_pool_map(down_version));
    let lost_data_shard = (0..chunks).any(|ch| vol.chunk_group(ch).unwrap().for_reads().shards[..k].iter().any(|s| !s.readable()));
    rt.block_on(verify_all(&vol, &model));
    let during_rebuild = pool_version(&rt, &mgmt) == down_version;
    eprintln!("reads during the rebuild: {during_rebuild}, degraded: {}", vol.stats().degraded_reads);
    if lost_data_shard && during_rebuild {
        assert!(vol.stats().degraded_reads > 0, "{:?}", vol.stats());
    }
    // Writes after the DOWN are not degraded any more: the lost shard of every group moved to a
    // spare target (written at once, rebuilt meanwhile). They read back, concurrently with the
    // rebuild.
    let mut model = model;
    rt.block_on(sequential_random_writes(&vol, &mut model, &mut rng, 100, 3));
    rt.block_on(verify_all(&vol, &model));
    assert_eq!(vol.stats().degraded_writes, 0, "{:?}", vol.stats());

    // The rebuild completes: engine 1's targets DOWNOUT, groups doubled up on an engine. Every
    // byte is then read from the rebuilt shards themselves (no degraded read) and is right.
    let healed = wait_healed(&rt, &mgmt, Duration::from_secs(60));
    let states: Vec<TargetStateName> = healed.map.targets.iter().filter(|t| t.rank == 1).map(|t| t.state).collect();
    assert_eq!(states, [TargetStateName::DownOut; 2]);
    assert!(healed.fault_domains_reduced, "{healed:#?}");
    rt.block_on(vol.refresh_pool_map(healed.map.version));
    let degraded = vol.stats().degraded_reads;
    rt.block_on(verify_all(&vol, &model));
    assert_eq!(vol.stats().degraded_reads, degraded, "reads after the rebuild must not need reconstruction");

    // A second engine lost. Engines learn the new map version from their next heartbeat (every
    // 200 ms here) and from then on refuse our stale map; take it from the service directly.
    c.kill_engine(2);
    c.wait_engine_down(2, Duration::from_secs(10));
    std::thread::sleep(Duration::from_secs(1));
    rt.block_on(vol.refresh_pool_map(pool_version(&rt, &mgmt)));
    let (mut readable_groups, mut failed) = (0, 0);
    for ch in 0..chunks {
        // A partial stripe (the second cell of stripe 0) and a whole stripe (stripe 1).
        let off = ch * chunk + 16 * 1024;
        let data = pattern(off, 48 * 1024, 99);
        let group = vol.chunk_group(ch).unwrap();
        let unavailable = group.unavailable_count();
        let readable = group.for_reads().readable_count();
        match rt.block_on(vol.write(off, data.clone())) {
            Ok(()) => {
                assert!(unavailable <= p, "chunk {ch}: write succeeded with {unavailable} shards down: {group:?}");
                model[off as usize..off as usize + data.len()].copy_from_slice(&data);
            }
            Err(e) => {
                // Refused only when the group lost more than p shards: unplaceable ones, or (a
                // stricter rule the write path may adopt) a moved shard that can never be
                // rebuilt because fewer than k shards are readable. Now such a group takes the
                // write (acknowledged by the one readable shard and the moved one) though its
                // reads fail.
                assert!(unavailable > p || readable < k, "chunk {ch}: write failed with {unavailable} shards down: {e}; {group:?}");
                assert!(matches!(e, VolumeError::Unavailable(_)), "{e}");
                assert!(e.to_string().contains("down"), "{e}");
            }
        }
        // Reads are never wrong. With k readable shards left they succeed; with fewer they fail
        // (Unavailable, at once: no retry can help), unless the parity shard's copies newer
        // than its parity cover the range (partial writes), which serve it alone.
        let serves = vol.chunk_group(ch).unwrap().for_reads().readable_count() >= k;
        readable_groups += u64::from(serves);
        for off in (ch * chunk..(ch + 1) * chunk).step_by(64 * 1024) {
            match rt.block_on(vol.read(off, 64 * 1024)) {
                Ok(d) => assert!(d[..] == model[off as usize..off as usize + 64 * 1024], "wrong data at {off}"),
                Err(e) => {
                    assert!(matches!(e, VolumeError::Unavailable(_)), "{e}");
                    assert!(!serves, "chunk {ch}: read at {off} failed with {k} readable shards: {e}");
                    failed += 1;
                }
            }
        }
    }
    eprintln!("after the second engine loss: {readable_groups} of {chunks} chunks with {k} readable shards, {failed} reads failed");
    // Nothing is invented for the groups that lost too much: copies never cover a whole chunk
    // here (it was written whole, then partly), so some of their reads fail.
    assert!(readable_groups == chunks || failed > 0, "chunks with fewer than {k} readable shards served every read");
}

#[test]
fn checksum_corruption_on_one_engine_is_detected_and_served_from_redundancy() {
    // The corruption goes into the data file: no update may still wait in the WAL for it.
    let c = LocalCluster::start_with("vol-csum", 3, 1, "64MiB", "5s", "\n[tuning]\nwal_data_max = 0\n");
    let rt = runtime();
    let size = 4 << 20;
    let vol = rt.block_on(open(&c, "EC_2P1", size));
    let mut model = vec![0u8; size as usize];
    // Whole-stripe writes (base cells + parity) and partial ones (deltas + copies).
    rt.block_on(async {
        write_whole(&vol, &mut model, 1).await;
        for off in (0..size).step_by(96 * 1024) {
            let d = pattern(off, 4096, 2);
            model[off as usize..off as usize + 4096].copy_from_slice(&d);
            vol.write(off, d).await.unwrap();
        }
    });
    // Flip bytes all over the data file (every 4 KiB block) of the engine holding the first
    // data shard of chunk 0: reads go to data shards, so an engine that happens to hold only
    // parity shards of this volume's few chunks (the volume uuid is random) would never be read.
    let victim = vol.chunk_group(0).unwrap().shards[0];
    let path = c.target_dir(victim.rank, victim.target_index).join("data.blk");
    let mut bytes = std::fs::read(&path).unwrap();
    let mut flipped = 0;
    for i in (100..bytes.len()).step_by(4096) {
        bytes[i] ^= 0x5a;
        flipped += 1;
    }
    assert!(flipped > 100);
    std::fs::write(&path, &bytes).unwrap();
    rt.block_on(verify_all(&vol, &model));
    let s = vol.stats();
    assert!(s.checksum_errors > 0, "{s:?}");
    assert!(s.degraded_reads > 0, "{s:?}");
    // Reads that met the corruption trigger its repair (scrub, at its default pace of one pass
    // a day, is far too slow to get there first): the engine logs repairs found by reads, and
    // then a full read meets no checksum error any more.
    wait_for("repairs found by reads", Duration::from_secs(60), || {
        let n = log_lines(&c, victim.rank, "found_by=read").len();
        if n > 0 {
            Ok(())
        } else {
            Err("none yet".into())
        }
    });
    wait_for("a full read without checksum errors", Duration::from_secs(60), || {
        let before = vol.stats().checksum_errors;
        rt.block_on(verify_all(&vol, &model));
        let after = vol.stats().checksum_errors;
        if after == before {
            Ok(())
        } else {
            Err(format!("{} more checksum errors", after - before))
        }
    });
}

#[test]
fn rp_3_and_write_zeroes() {
    let mut c = LocalCluster::start("vol-rp", 3, 2, "64MiB", "1500ms");
    let rt = runtime();
    let size = 4 << 20;
    let vol = rt.block_on(open(&c, "RP_3", size));
    let mut model = vec![0u8; size as usize];
    let mut rng = Rng(42);
    rt.block_on(sequential_random_writes(&vol, &mut model, &mut rng, 60, 1));
    rt.block_on(verify_all(&vol, &model));
    // Zero a range that covers whole stripes and partial ones.
    rt.block_on(vol.write_zeroes(12 * 1024, 300 * 1024)).unwrap();
    model[12 * 1024..312 * 1024].fill(0);
    rt.block_on(verify_all(&vol, &model));
    c.kill_engine(0);
    rt.block_on(verify_all(&vol, &model));
    c.wait_engine_down(0, Duration::from_secs(10));
    rt.block_on(sequential_random_writes(&vol, &mut model, &mut rng, 30, 2));
    rt.block_on(verify_all(&vol, &model));
}

#[test]
fn ec_write_zeroes_whole_and_partial_stripes_read_back_degraded() {
    // A long heartbeat timeout: engines are only ever unreachable here, never marked DOWN.
    let mut c = LocalCluster::start("vol-ecz", 3, 1, "64MiB", "60s");
    let rt = runtime();
    let size = 2 << 20;
    let vol = rt.block_on(open(&c, "EC_2P1", size));
    let mut model = vec![0u8; size as usize];
    rt.block_on(async {
        let d = pattern(0, size as usize, 3);
        model.copy_from_slice(&d);
        vol.write(0, d).await.unwrap();
        vol.write_zeroes(4096, 100 * 1024).await.unwrap();
        model[4096..4096 + 100 * 1024].fill(0);
        let d = pattern(40 * 1024, 8192, 4);
        model[40 * 1024..48 * 1024].copy_from_slice(&d);
        vol.write(40 * 1024, d).await.unwrap();
    });
    rt.block_on(verify_all(&vol, &model));
    verify_with_each_engine_down(&mut c, &rt, &vol, &model);
}

/// Bytes in use on every target of every live engine (QueryTarget over the engine RPC).
/// The engines aggregate each akey on its own (1 s lag here); the base cells (`B`) and parity
/// (`P`) must stay at one epoch through that, so degraded reads after aggregation still
/// reconstruct the right bytes.
#[test]
fn degraded_reads_stay_right_after_the_engines_aggregate() {
    let mut c = LocalCluster::start_with("vol-agg", 3, 2, "128MiB", "30s", "\n[tuning]\naggregation_lag_secs = 1\n");
    let rt = runtime();
    let size = 4 << 20;
    let vol = rt.block_on(open(&c, "EC_2P1", size));
    let mut model = vec![0u8; size as usize];
    let mut rng = Rng(7);
    rt.block_on(async {
        // Several generations of whole-stripe overwrites and partial writes on top.
        for gen in 0..4u64 {
            write_whole(&vol, &mut model, 100 + gen).await;
            sequential_random_writes(&vol, &mut model, &mut rng, 40, gen).await;
        }
    });
    let before = rt.block_on(used_bytes(&c));
    // Let the aggregation boundary pass every version, then keep the targets busy (small
    // writes elsewhere) so their aggregation steps run.
    std::thread::sleep(Duration::from_millis(2500));
    let mut after = before;
    for round in 0..40 {
        rt.block_on(async {
            let off = (size - (1 << 20)) + (round % 8) * 4096;
            let d = pattern(off, 4096, 1000 + round);
            model[off as usize..off as usize + 4096].copy_from_slice(&d);
            vol.write(off, d).await.unwrap();
        });
        std::thread::sleep(Duration::from_millis(100));
        after = rt.block_on(used_bytes(&c));
        if after < before * 2 / 3 {
            break;
        }
    }
    assert!(after < before * 2 / 3, "aggregation should have freed the overwritten versions: {before} -> {after} bytes");
    rt.block_on(verify_all(&vol, &model));
    verify_with_each_engine_down(&mut c, &rt, &vol, &model);
    assert!(vol.stats().degraded_reads > 0);
}

/// The stable epoch (docs/PLACEMENT.md) through the real daemons: each engine reports the lowest
/// of its targets' in its heartbeats, and the pool's follows the acknowledged writes to within
/// the commit window (2 s by default) plus a heartbeat, never ahead of the clock. An engine
/// killed takes its report with it from the pool's stable epoch once it is DOWN.
#[test]
fn the_pool_stable_epoch_follows_acknowledged_writes() {
    let mut c = LocalCluster::start("vol-stable", 3, 2, "64MiB", "1500ms");
    let rt = runtime();
    let size = 1 << 20;
    let vol = rt.block_on(open(&c, "EC_2P1", size));
    let mgmt = c.client();
    let mut model = vec![0u8; size as usize];
    rt.block_on(sequential_random_writes(&vol, &mut model, &mut Rng(9), 20, 1));
    let written = tessera_client::hlc::now();
    let stable = wait_for("the pool's stable epoch passes the acknowledged writes", Duration::from_secs(20), || {
        match rt.block_on(mgmt.pool("p")).unwrap().stable_epoch {
            Some(e) if e >= written => Ok(e),
            other => Err(format!("stable epoch {other:?}, writes acknowledged by {written}")),
        }
    });
    assert!(stable <= tessera_client::hlc::now(), "the stable epoch {stable} is ahead of the clock");
    let system = rt.block_on(mgmt.system()).unwrap();
    assert!(system.engines.iter().all(|e| e.stable_epoch.is_some_and(|s| s > 0)), "{:?}", system.engines);
    rt.block_on(verify_all(&vol, &model));
    c.kill_engine(2);
    c.wait_engine_down(2, Duration::from_secs(10));
    let later = tessera_client::hlc::now();
    wait_for("the survivors' stable epoch moves on without engine 2", Duration::from_secs(20), || {
        match rt.block_on(mgmt.pool("p")).unwrap().stable_epoch {
            Some(e) if e >= later => Ok(()),
            other => Err(format!("stable epoch {other:?}, waiting for {later}")),
        }
    });
}

/// Sends `sig` (`STOP`, `CONT`) to process `pid`.
fn signal(pid: u32, sig: &str) {
    let ok = std::process::Command::new("kill").arg(format!("-{sig}")).arg(pid.to_string()).status().unwrap().success();
    assert!(ok, "kill -{sig} {pid}");
}

/// A write held up past the commit window: engine 1 is stopped (SIGSTOP) while a write to it is
/// in flight and continued once more than the window (2 s) has passed since the write took its
/// epoch. The
/// engine refuses the stale epoch, the client sends the whole write again at a new epoch, and
/// every replica, the stopped one included, holds the new data.
#[test]
fn a_write_held_up_past_the_commit_window_is_sent_again_at_a_new_epoch() {
    // A heartbeat timeout far above the pause: the stopped engine is not marked DOWN.
    let mut c = LocalCluster::start("vol-window", 3, 2, "64MiB", "10s");
    let rt = runtime();
    let size = 1 << 20;
    // RP_3 on 3 engines: every write has a replica on engine 1.
    let vol = rt.block_on(open(&c, "RP_3", size));
    let data = pattern(0, 64 * 1024, 5);
    let pid = c.engines[1].as_ref().unwrap().child.id();
    signal(pid, "STOP");
    // When the write starts (it takes its epoch at once): a loaded machine may start the task late.
    let started = std::sync::Arc::new(std::sync::OnceLock::new());
    let (v, d, s) = (vol.clone(), data.clone(), started.clone());
    let write = rt.spawn(async move {
        let _ = s.set(tessera_client::hlc::physical_nanos(tessera_client::hlc::now()));
        v.write(0, d).await
    });
    // 5 s: the commit window (2 s) with room for the write task to be held up between noting
    // the time and taking its epoch on a loaded machine (a CI run once saw no refusal at 3 s).
    wait_for("the commit window (2 s) passes while engine 1 is stopped", Duration::from_secs(30), || {
        let now = tessera_client::hlc::physical_nanos(tessera_client::hlc::now());
        match started.get() {
            Some(t) if now > t + 5_000_000_000 => Ok(()),
            Some(t) => Err(format!("{} ms since the write started", (now - t) / 1_000_000)),
            None => Err("the write has not started".into()),
        }
    });
    signal(pid, "CONT");
    rt.block_on(write).unwrap().unwrap();
    assert!(vol.stats().epoch_retries >= 1, "{:?}", vol.stats());
    assert_eq!(rt.block_on(vol.read(0, data.len() as u64)).unwrap(), data);
    // Each replica alone holds it: read with the other two engines gone.
    c.kill_engine(0);
    c.kill_engine(2);
    assert_eq!(rt.block_on(vol.read(0, data.len() as u64)).unwrap(), data);
}
