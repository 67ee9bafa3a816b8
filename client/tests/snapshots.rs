//! Snapshots against a real local cluster (the management service and three engines as
//! separate processes): taken while a host writes, read back through the client library at
//! their epochs, through the engines' aggregation, an engine killed and restarted, and deleted.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tessera_client::volume::{Cluster, Volume, VolumeError};
use tessera_mgmt_api::SnapshotInfo;
use tessera_testkit::{wait_for, LocalCluster};

mod common;
use common::{open, pattern, runtime, used_bytes, verify_all, write_whole, Rng};

/// One acknowledged write of the writer: when it started and ended, where, which pattern.
#[derive(Debug, Clone, Copy)]
struct Write {
    start: Instant,
    end: Instant,
    off: u64,
    len: usize,
    gen: u64,
}

/// A snapshot and the moments just before its creation was asked for and just after it returned.
struct Taken {
    info: SnapshotInfo,
    asked: Instant,
    answered: Instant,
}

fn apply(model: &mut [u8], w: &Write) {
    model[w.off as usize..w.off as usize + w.len].copy_from_slice(&pattern(w.off, w.len, w.gen));
}

async fn read_all(vol: &Volume) -> Result<Vec<u8>, VolumeError> {
    let size = vol.info().size;
    let mut out = Vec::with_capacity(size as usize);
    for off in (0..size).step_by(256 << 10) {
        out.extend_from_slice(&vol.read(off, (256 << 10).min(size - off)).await?);
    }
    Ok(out)
}

/// Which prefix of the writer's history `content` is: the writer is sequential and each write
/// takes its epoch when it starts, so a snapshot holds every write acknowledged before it was
/// asked for, none started after it answered, and of those in between a prefix. Panics if no
/// prefix in that range matches.
fn prefix_held(base: &[u8], log: &[Write], t: &Taken, content: &[u8]) -> usize {
    let lo = log.iter().take_while(|w| w.end < t.asked).count();
    let hi = log.iter().take_while(|w| w.start < t.answered).count();
    let mut model = base.to_vec();
    for w in &log[..lo] {
        apply(&mut model, w);
    }
    for p in lo..=hi {
        if model[..] == content[..] {
            return p;
        }
        if let Some(w) = log.get(p) {
            apply(&mut model, w);
        }
    }
    let bad: Vec<u64> = (0..content.len() / 4096)
        .filter(|b| content[b * 4096..(b + 1) * 4096] != model[b * 4096..(b + 1) * 4096])
        .map(|b| b as u64 * 4096)
        .collect();
    let first: Vec<u64> = bad.iter().copied().take(8).collect();
    panic!(
        "snapshot {} is no prefix {lo}..={hi} of the writes; against the last, {} blocks differ, from {first:?}",
        t.info.name,
        bad.len()
    );
}

/// A host writes without pause while three snapshots are taken. Each snapshot reads exactly as
/// the volume after a prefix of the acknowledged writes (all acknowledged before it was asked
/// for, none started after it answered); it still does after the engines have aggregated the
/// versions in between, with an engine killed (degraded reads at the snapshot's epoch) and after
/// that engine restarted. Deleting the snapshots frees what only they held.
#[test]
fn snapshots_taken_under_writes_hold_a_prefix_of_them_through_aggregation_and_a_restart() {
    let mut c = LocalCluster::start_with("snap", 3, 2, "256MiB", "30s", "\n[tuning]\naggregation_lag_secs = 1\n");
    let rt = runtime();
    let mgmt = c.client();
    let size: u64 = 2 << 20;
    let vol = rt.block_on(open(&c, "EC_2P1", size));
    let mut base = vec![0u8; size as usize];
    rt.block_on(write_whole(&vol, &mut base, 1));

    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicUsize::new(0));
    let writer = {
        let (vol, stop, done) = (vol.clone(), stop.clone(), done.clone());
        std::thread::spawn(move || {
            let rt = runtime();
            let mut rng = Rng(0x5a5a_0001);
            let mut log = Vec::new();
            while !stop.load(Ordering::Acquire) {
                // 4 KiB to 64 KiB: partial stripes (fragments and copies) and whole ones.
                let blocks = 1 + rng.below(16);
                let off = rng.below(size / 4096 - blocks) * 4096;
                let len = (blocks * 4096) as usize;
                let gen = 100 + log.len() as u64;
                let start = Instant::now();
                rt.block_on(vol.write(off, pattern(off, len, gen))).unwrap_or_else(|e| panic!("write {gen}: {e}"));
                log.push(Write { start, end: Instant::now(), off, len, gen });
                done.store(log.len(), Ordering::Release);
            }
            log
        })
    };
    let cluster = Cluster::new(mgmt.clone());
    let vinfo = rt.block_on(mgmt.volume("p", "v")).unwrap();
    let mut taken = Vec::new();
    let mut snaps = Vec::new();
    let mut contents = Vec::new();
    for name in ["s1", "s2", "s3"] {
        // Some writes between two snapshots.
        let before = done.load(Ordering::Acquire);
        wait_for("writes to go on", Duration::from_secs(30), || {
            let n = done.load(Ordering::Acquire);
            if n >= before + 40 {
                Ok(())
            } else {
                Err(format!("{n} writes"))
            }
        });
        let asked = Instant::now();
        let info = rt.block_on(mgmt.create_snapshot("p", "v", name)).unwrap();
        let answered = Instant::now();
        assert!(info.stable, "{name} answered before the pool's stable epoch passed it: {info:?}");
        eprintln!("{name}: epoch {}, created in {:?}", info.epoch, answered - asked);
        // Read at once, while the writes after it are not aggregated yet.
        let snap = rt.block_on(cluster.open_snapshot(&vinfo, &info)).unwrap();
        contents.push(rt.block_on(read_all(&snap)).unwrap());
        snaps.push(snap);
        taken.push(Taken { info, asked, answered });
    }
    let before = done.load(Ordering::Acquire);
    wait_for("writes after the last snapshot", Duration::from_secs(30), || {
        (done.load(Ordering::Acquire) >= before + 200).then_some(()).ok_or_else(|| "waiting".to_string())
    });
    stop.store(true, Ordering::Release);
    let log = writer.join().unwrap();
    let mut live = base.clone();
    log.iter().for_each(|w| apply(&mut live, w));

    // The service lists them in epoch order.
    let listed = rt.block_on(mgmt.snapshots("p", "v")).unwrap();
    assert_eq!(
        listed.iter().map(|s| (s.name.as_str(), s.epoch)).collect::<Vec<_>>(),
        taken.iter().map(|t| (t.info.name.as_str(), t.info.epoch)).collect::<Vec<_>>()
    );
    assert!(listed.iter().all(|s| s.stable && s.size == size));
    let prefixes: Vec<usize> = taken.iter().zip(&contents).map(|(t, content)| prefix_held(&base, &log, t, content)).collect();
    eprintln!("snapshots hold the first {prefixes:?} of {} writes", log.len());
    assert!(prefixes.windows(2).all(|w| w[0] < w[1]), "{prefixes:?}");
    // A snapshot is read-only.
    let refused = rt.block_on(snaps[0].write(0, Bytes::from(vec![1u8; 4096])));
    assert!(matches!(refused, Err(VolumeError::ReadOnly(_))), "{refused:?}");
    rt.block_on(verify_all(&vol, &live));

    // The engines aggregated the versions no snapshot sees while the writer ran (1 s lag, 2 s
    // commit window): far fewer bytes are in use than were written; the snapshots read the same.
    let written: u64 = log.iter().map(|w| w.len as u64).sum();
    let retained = rt.block_on(used_bytes(&c));
    assert!(retained < written, "{written} bytes written, {retained} in use: versions were not aggregated");
    for (i, s) in snaps.iter().enumerate() {
        assert!(rt.block_on(read_all(s)).unwrap() == contents[i], "snapshot {} changed by aggregation", taken[i].info.name);
    }

    // kill -9 of each engine in turn: the snapshots read degraded, at their epochs; and after its
    // restart. (One engine alone may hold only parity shards of this small volume.)
    for rank in 0..3 {
        c.kill_engine(rank);
        for (i, s) in snaps.iter().enumerate() {
            let got = rt.block_on(read_all(s)).unwrap();
            assert!(got == contents[i], "snapshot {} read with engine {rank} down", taken[i].info.name);
        }
        c.engines[rank as usize] = Some(c.start_engine(rank));
        c.wait_engines_up(3, Duration::from_secs(10));
        for (i, s) in snaps.iter().enumerate() {
            let got = rt.block_on(read_all(s)).unwrap();
            assert!(got == contents[i], "snapshot {} after engine {rank} restarted", taken[i].info.name);
        }
    }
    assert!(snaps.iter().map(|s| s.stats().degraded_reads).sum::<u64>() > 0);

    // The engines account what each snapshot alone holds (overwritten since, so some bytes of
    // each) and the volume's whole space; deleting them frees at least what they alone held.
    let (allocated, held) = wait_for("the engines' accounting of the snapshots", Duration::from_secs(30), || {
        let v = rt.block_on(mgmt.volume("p", "v")).unwrap();
        let held: Vec<u64> = v.snapshots.iter().filter_map(|s| s.held_bytes).collect();
        match v.allocated_bytes {
            Some(a) if held.len() == 3 && held.iter().all(|h| *h > 0) => Ok((a, held)),
            _ => Err(format!("{v:?}")),
        }
    });
    let listed = rt.block_on(mgmt.snapshots("p", "v")).unwrap();
    assert_eq!(listed.iter().filter_map(|s| s.held_bytes).collect::<Vec<_>>().len(), 3);
    let held_total: u64 = held.iter().sum();
    eprintln!("accounting: volume {allocated} bytes, snapshots hold {held:?} alone");
    assert!(held_total < allocated);
    // Deleting them frees what only they held.
    for t in &taken {
        rt.block_on(mgmt.delete_snapshot("p", "v", &t.info.name)).unwrap();
    }
    assert!(rt.block_on(mgmt.snapshots("p", "v")).unwrap().is_empty());
    let freed = wait_for("aggregation of what the snapshots held", Duration::from_secs(30), || {
        let used = rt.block_on(used_bytes(&c));
        if used < retained * 3 / 4 {
            Ok(used)
        } else {
            Err(format!("{retained} -> {used} bytes"))
        }
    });
    eprintln!("bytes: {written} written, {retained} in use with 3 snapshots, {freed} without");
    wait_for("the accounting to see what the deletions freed", Duration::from_secs(30), || {
        let now = rt.block_on(mgmt.volume("p", "v")).unwrap().allocated_bytes.unwrap_or(u64::MAX);
        (now <= allocated - held_total).then_some(()).ok_or(format!("{allocated} - {held_total} held -> {now}"))
    });
    // The engines report what they use in their heartbeats (`tessera system query`).
    wait_for("heartbeats to report the bytes in use", Duration::from_secs(30), || {
        let reported: Option<u64> = rt.block_on(mgmt.system()).unwrap().engines.iter().map(|e| e.used_bytes).sum();
        let used = rt.block_on(used_bytes(&c));
        (reported == Some(used)).then_some(()).ok_or(format!("reported {reported:?}, engines hold {used}"))
    });
    rt.block_on(verify_all(&vol, &live));
}

/// Snapshots survive a rebuild and a reintegration: their views are copied onto rebuilt shards
/// (one pass per retained epoch), so reads that must use those shards (another engine killed)
/// still return each snapshot's exact content.
#[test]
fn snapshots_survive_a_rebuild_and_a_reintegration() {
    let mut c = LocalCluster::start_with("snap-rebuild", 4, 2, "256MiB", "2s", "\n[tuning]\naggregation_lag_secs = 1\n");
    let rt = runtime();
    let mgmt = c.client();
    let size: u64 = 4 << 20;
    let vol = rt.block_on(open(&c, "EC_2P1", size));
    let mut live = vec![0u8; size as usize];
    let mut rng = Rng(0xfeed);
    let mut models = Vec::new();
    rt.block_on(async {
        write_whole(&vol, &mut live, 1).await;
        for (i, name) in ["s1", "s2"].into_iter().enumerate() {
            common::sequential_random_writes(&vol, &mut live, &mut rng, 60, 10 + i as u64).await;
            let info = mgmt.create_snapshot("p", "v", name).await.unwrap();
            models.push((info, live.clone()));
        }
        common::sequential_random_writes(&vol, &mut live, &mut rng, 60, 20).await;
    });
    let cluster = Cluster::new(mgmt.clone());
    let vinfo = rt.block_on(mgmt.volume("p", "v")).unwrap();
    let check = |what: &str, rt: &tokio::runtime::Runtime| {
        for (info, model) in &models {
            let s = rt.block_on(cluster.open_snapshot(&vinfo, info)).unwrap();
            let got = rt.block_on(read_all(&s)).unwrap_or_else(|e| panic!("{what}: snapshot {}: {e}", info.name));
            let bad = (0..model.len() / 4096).filter(|b| got[b * 4096..(b + 1) * 4096] != model[b * 4096..(b + 1) * 4096]).count();
            assert_eq!(bad, 0, "{what}: snapshot {} differs in {bad} blocks", info.name);
        }
        rt.block_on(verify_all(&vol, &live));
    };

    // Engine 3 is lost: its shards are rebuilt on the other three engines.
    c.kill_engine(3);
    c.wait_engine_down(3, Duration::from_secs(20));
    common::wait_healed(&rt, &mgmt, Duration::from_secs(120));
    // Reads now need the rebuilt shards: another engine is killed (not long enough to be DOWN).
    c.kill_engine(0);
    check("after the rebuild, engine 0 down", &rt);
    c.engines[0] = Some(c.start_engine(0));
    c.wait_engines_up(3, Duration::from_secs(20));

    // Engine 3 returns: its targets are reintegrated (only what changed above its floor is
    // copied back, snapshot views included).
    c.engines[3] = Some(c.start_engine(3));
    c.wait_engines_up(4, Duration::from_secs(20));
    common::wait_healed(&rt, &mgmt, Duration::from_secs(120));
    for rank in [1, 2] {
        c.kill_engine(rank);
        check(&format!("after the reintegration, engine {rank} down"), &rt);
        c.engines[rank as usize] = Some(c.start_engine(rank));
        c.wait_engines_up(4, Duration::from_secs(20));
    }
}

/// A clone of a snapshot: it reads as the snapshot at once (nothing copied), its writes never
/// reach the parent and the parent's never reach it, Write Zeroes in it reads zeros (not the
/// parent's bytes), it reads right with an engine down, the parent snapshot is kept while the
/// clone needs it, and a flatten copies what it shares so that it stands alone.
#[test]
fn a_clone_reads_through_to_its_snapshot_and_stands_alone_once_flattened() {
    let mut c = LocalCluster::start("clone", 3, 2, "256MiB", "30s");
    let rt = runtime();
    let mgmt = c.client();
    let size: u64 = 4 << 20;
    let parent = rt.block_on(open(&c, "EC_2P1", size));
    let mut rng = Rng(0xc10e);
    let mut live = vec![0u8; size as usize];
    rt.block_on(async {
        // Half the volume written (the rest never: the clone's holes fall through to holes).
        for off in (0..size / 2).step_by(1 << 20) {
            let d = pattern(off, 1 << 20, 1);
            live[off as usize..off as usize + (1 << 20)].copy_from_slice(&d);
            parent.write(off, d).await.unwrap();
        }
        common::sequential_random_writes(&parent, &mut live, &mut rng, 40, 2).await;
    });
    let at_snapshot = live.clone();
    rt.block_on(mgmt.create_snapshot("p", "v", "s1")).unwrap();
    let info = rt.block_on(mgmt.clone_volume("p", "v", "s1", "c")).unwrap();
    assert_eq!(info.parent.as_ref().map(|p| p.snapshot.name.as_str()), Some("s1"));
    let cluster = Cluster::new(mgmt.clone());
    let clone = rt.block_on(cluster.open_volume(&info)).unwrap();
    assert!(clone.is_clone());
    let used_before = rt.block_on(common::used_bytes(&c));
    rt.block_on(verify_all(&clone, &at_snapshot));
    assert_eq!(rt.block_on(common::used_bytes(&c)), used_before, "creating and reading a clone copies nothing");

    // Writes on both sides: each sees only its own.
    let mut cloned = at_snapshot.clone();
    rt.block_on(async {
        common::sequential_random_writes(&clone, &mut cloned, &mut rng, 60, 3).await;
        common::sequential_random_writes(&parent, &mut live, &mut rng, 60, 4).await;
        // Zeros over written and never-written ranges of the parent's snapshot.
        for (off, len) in [(8192u64, 3 * 4096u64), (size / 2 - 65536, 131072)] {
            clone.write_zeroes(off, len).await.unwrap();
            cloned[off as usize..(off + len) as usize].iter_mut().for_each(|b| *b = 0);
        }
    });
    rt.block_on(verify_all(&clone, &cloned));
    rt.block_on(verify_all(&parent, &live));
    let snap =
        rt.block_on(cluster.open_snapshot(&rt.block_on(mgmt.volume("p", "v")).unwrap(), &info.parent.as_ref().unwrap().snapshot)).unwrap();
    rt.block_on(verify_all(&snap, &at_snapshot));

    // An engine down: the clone's own data and the parent's both read degraded.
    c.kill_engine(1);
    rt.block_on(verify_all(&clone, &cloned));
    c.engines[1] = Some(c.start_engine(1));
    c.wait_engines_up(3, Duration::from_secs(20));

    // The parent's snapshot stays while the clone reads it.
    let refused = rt.block_on(mgmt.delete_snapshot("p", "v", "s1")).unwrap_err();
    assert!(refused.to_string().contains("has clones: c"), "{refused}");

    // Flatten: the shared bytes are copied, the tie is cut, the snapshot can go.
    rt.block_on(mgmt.flatten("p", "c", false)).unwrap();
    let mut copied = 0;
    for off in (0..size).step_by(1 << 20) {
        copied += rt.block_on(clone.copy_parent(off, 1 << 20)).unwrap();
    }
    assert!(copied > 0 && copied < size, "{copied} bytes copied");
    assert_eq!(rt.block_on(clone.copy_parent(0, size)).unwrap(), 0, "a second pass finds nothing left to copy");
    let flat = rt.block_on(mgmt.flatten("p", "c", true)).unwrap();
    assert!(flat.parent.is_none());
    rt.block_on(mgmt.delete_snapshot("p", "v", "s1")).unwrap();
    let alone = rt.block_on(cluster.open_volume(&flat)).unwrap();
    assert!(!alone.is_clone());
    rt.block_on(verify_all(&alone, &cloned));
    // Deleting the parent leaves the flattened clone whole.
    rt.block_on(mgmt.delete_volume("p", "v")).unwrap();
    rt.block_on(verify_all(&alone, &cloned));
}

/// Rollback: the volume reads exactly as the snapshot at once, with nothing copied; writes after
/// it are the volume's new history; a later snapshot taken before the rollback keeps its own
/// content and can be rolled back to in turn; everything stays right through aggregation and
/// with an engine killed.
#[test]
fn a_rollback_makes_the_volume_read_as_the_snapshot_with_nothing_copied() {
    let mut c = LocalCluster::start_with("rollback", 3, 2, "256MiB", "30s", "\n[tuning]\naggregation_lag_secs = 1\n");
    let rt = runtime();
    let mgmt = c.client();
    let size: u64 = 4 << 20;
    let vol = rt.block_on(open(&c, "EC_2P1", size));
    let mut rng = Rng(0x0b0c);
    let mut live = vec![0u8; size as usize];
    let mut at = Vec::new();
    rt.block_on(async {
        for (i, name) in ["s1", "s2"].into_iter().enumerate() {
            common::sequential_random_writes(&vol, &mut live, &mut rng, 60, 1 + i as u64).await;
            mgmt.create_snapshot("p", "v", name).await.unwrap();
            at.push(live.clone());
        }
        common::sequential_random_writes(&vol, &mut live, &mut rng, 60, 3).await;
        vol.write_zeroes(0, 1 << 20).await.unwrap();
    });
    let used = rt.block_on(common::used_bytes(&c));
    let rolled = rt.block_on(mgmt.rollback("p", "v", "s1", false)).unwrap();
    assert_eq!(rolled.rollbacks.len(), 1);
    let cluster = Cluster::new(mgmt.clone());
    let vol = rt.block_on(cluster.open_volume(&rolled)).unwrap();
    rt.block_on(verify_all(&vol, &at[0]));
    assert!(rt.block_on(common::used_bytes(&c)) <= used, "a rollback copies nothing");
    // New writes on top of the rolled-back content.
    let mut after = at[0].clone();
    rt.block_on(common::sequential_random_writes(&vol, &mut after, &mut rng, 60, 4));
    rt.block_on(verify_all(&vol, &after));
    // s2 (taken before the rollback) still reads as it was, and can be rolled back to.
    let info = rt.block_on(mgmt.volume("p", "v")).unwrap();
    let s2 = info.snapshots.iter().find(|s| s.name == "s2").unwrap();
    rt.block_on(verify_all(&rt.block_on(cluster.open_snapshot(&info, s2)).unwrap(), &at[1]));
    let rolled = rt.block_on(mgmt.rollback("p", "v", "s2", false)).unwrap();
    let vol = rt.block_on(cluster.open_volume(&rolled)).unwrap();
    rt.block_on(verify_all(&vol, &at[1]));
    let mut last = at[1].clone();
    rt.block_on(common::sequential_random_writes(&vol, &mut last, &mut rng, 40, 5));
    // Through aggregation (1 s lag) and with each engine killed in turn.
    let before = rt.block_on(common::used_bytes(&c));
    wait_for("aggregation after the rollbacks", Duration::from_secs(30), || {
        let now = rt.block_on(common::used_bytes(&c));
        (now < before).then_some(()).ok_or(format!("{before} -> {now} bytes"))
    });
    rt.block_on(verify_all(&vol, &last));
    common::verify_with_each_engine_down(&mut c, &rt, &vol, &last);
}

/// A rollback is one transaction of the management service: `kill -9` of the service while the
/// call waits for the stable epoch (the record written, no answer sent), or of the service and
/// an engine the moment the call is sent, leaves the volume reading wholly as before or wholly as
/// the snapshot — as the restarted service's record says — and writes after it stay right.
#[test]
fn a_rollback_cut_short_by_kill_9_of_the_service_and_an_engine_leaves_the_old_or_the_new_state() {
    let mut c = LocalCluster::start_with("rollback-crash", 3, 2, "256MiB", "30s", "\n[tuning]\naggregation_lag_secs = 1\n");
    let rt = runtime();
    let size: u64 = 2 << 20;
    let vol = rt.block_on(open(&c, "EC_2P1", size));
    let mut rng = Rng(0x0c0d);
    let mut snap = vec![0u8; size as usize];
    rt.block_on(write_whole(&vol, &mut snap, 1));
    rt.block_on(c.client().create_snapshot("p", "v", "s1")).unwrap();
    let mut live = snap.clone();
    rt.block_on(common::sequential_random_writes(&vol, &mut live, &mut rng, 40, 2));
    drop(vol);

    // Each round sends the rollback from a thread of its own and cuts it short.
    let rollback_in_background = |mgmt: tessera_mgmt_api::MgmtClient| {
        std::thread::spawn(move || {
            let rt = runtime();
            // Cut short: the answer is an error, or never comes before the kill.
            let _ = rt.block_on(mgmt.rollback("p", "v", "s1", false));
        })
    };
    for round in 0..2 {
        let mgmt = c.client();
        let rollbacks_before = rt.block_on(mgmt.volume("p", "v")).unwrap().rollbacks.len();
        let call = rollback_in_background(mgmt.clone());
        if round == 0 {
            // The record is written; the call is still waiting for the stable epoch past it.
            wait_for("the rollback record", Duration::from_secs(10), || {
                let n = rt.block_on(mgmt.volume("p", "v")).map(|v| v.rollbacks.len()).unwrap_or(0);
                (n > rollbacks_before).then_some(()).ok_or(format!("{n} rollbacks"))
            });
            c.restart_mgmt();
        } else {
            // Wherever the call is: the service and an engine die together.
            c.kill_engine(1);
            c.restart_mgmt();
            c.engines[1] = Some(c.start_engine(1));
        }
        call.join().unwrap();
        c.wait_engines_up(3, Duration::from_secs(20));
        let mgmt = c.client();
        let info = rt.block_on(mgmt.volume("p", "v")).unwrap();
        let rolled = info.rollbacks.len() > rollbacks_before;
        eprintln!("round {round}: rolled back: {rolled}");
        if round == 0 {
            assert!(rolled, "the rollback recorded before the kill is lost");
        }
        let expected = if rolled { snap.clone() } else { live.clone() };
        let cluster = Cluster::new(mgmt.clone());
        let vol = rt.block_on(cluster.open_volume(&info)).unwrap();
        let got = rt.block_on(read_all(&vol)).unwrap();
        let other = if rolled { &live } else { &snap };
        assert!(
            got == expected,
            "round {round}: the volume reads neither as its record says (rolled back: {rolled}); as the other state: {}",
            got == *other
        );
        // The volume's history goes on from there: new writes, read with an engine down.
        live = expected;
        rt.block_on(common::sequential_random_writes(&vol, &mut live, &mut rng, 30, 10 + round));
        c.kill_engine(2);
        rt.block_on(verify_all(&vol, &live));
        c.engines[2] = Some(c.start_engine(2));
        c.wait_engines_up(3, Duration::from_secs(20));
    }
}
