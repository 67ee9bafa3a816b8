//! EC aggregation against a real local cluster: an EC_2P1 volume written entirely with 4 KiB
//! partial-stripe writes takes about twice its size (each fragment and its copy); the engines
//! fold the stripes back into full base cells and parity in the background, after which it
//! takes about 1.5 times its size, and every read — normal, degraded with each engine down in
//! turn, after an engine killed in the middle of it, and of a snapshot — stays right.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use tessera_client::volume::Volume;
use tessera_mgmt_api::MgmtClient;
use tessera_testkit::{wait_for, LocalCluster};

mod common;
use common::{open, pattern, runtime, used_bytes, verify_all, Rng};

const MIB: u64 = 1 << 20;

/// Writes every 4 KiB block of `range` once, in a random order, 8 at a time; the model follows.
async fn write_blocks(vol: &Volume, model: &mut [u8], range: std::ops::Range<u64>, rng: &mut Rng, gen: u64) {
    let mut blocks: Vec<u64> = (range.start / 4096..range.end / 4096).collect();
    for i in (1..blocks.len()).rev() {
        blocks.swap(i, rng.below(i as u64 + 1) as usize);
    }
    for batch in blocks.chunks(8) {
        let writes = batch.iter().map(|&b| {
            let d = pattern(b * 4096, 4096, gen);
            model[(b * 4096) as usize..(b * 4096 + 4096) as usize].copy_from_slice(&d);
            vol.write(b * 4096, d)
        });
        for r in futures::future::join_all(writes.collect::<Vec<_>>()).await {
            r.unwrap();
        }
    }
}

/// How long ago epoch `e` was taken.
fn epoch_age(e: u64) -> Duration {
    let now = tessera_client::hlc::physical_nanos(tessera_client::hlc::now());
    Duration::from_nanos(now.saturating_sub(tessera_client::hlc::physical_nanos(e)))
}

fn ec_counters(rt: &tokio::runtime::Runtime, mgmt: &MgmtClient) -> (u64, u64) {
    let p = rt.block_on(mgmt.pool("p")).unwrap();
    (p.scrub.ec_stripes, p.scrub.ec_waiting)
}

#[test]
fn partial_stripe_writes_are_folded_into_full_stripes_and_every_read_stays_right() {
    let extra = "\n[tuning]\naggregation_lag_secs = 1\n\n[heal]\nec_aggregation_rate = \"512MiB\"\n";
    let mut c = LocalCluster::start_with("ec-agg", 3, 2, "512MiB", "30s", extra);
    let rt = runtime();
    let mgmt = c.client();
    let size = std::env::var("EC_AGG_TEST_MIB").ok().and_then(|s| s.parse().ok()).unwrap_or(64) * MIB;
    let vol = rt.block_on(open(&c, "EC_2P1", size));
    let mut model = vec![0u8; size as usize];
    let mut rng = Rng(0xa99);
    let base = rt.block_on(used_bytes(&c));
    rt.block_on(write_blocks(&vol, &mut model, 0..size, &mut rng, 1));

    // Folded and freed: at most 1.6 times the data (2 before: every fragment has a copy).
    let limit = base + size * 16 / 10;
    let used = wait_for("the volume to take at most 1.6 times its data", Duration::from_secs(300), || {
        let used = rt.block_on(used_bytes(&c));
        let (stripes, waiting) = ec_counters(&rt, &mgmt);
        if used <= limit && waiting == 0 {
            Ok(used)
        } else {
            Err(format!("{} MiB in use for {} MiB of data; {stripes} stripes folded, {waiting} waiting", used >> 20, size >> 20))
        }
    });
    eprintln!("{} MiB in use for {} MiB of data ({:.2}x)", used >> 20, size >> 20, (used - base) as f64 / size as f64);
    rt.block_on(verify_all(&vol, &model));
    common::verify_with_each_engine_down(&mut c, &rt, &vol, &model);

    // A snapshot keeps its view while new fragments are folded, and kill -9 of an engine in the
    // middle of that folding loses nothing.
    let at_snapshot = model.clone();
    let snap = rt.block_on(mgmt.create_snapshot("p", "v", "s1")).unwrap();
    let folded = ec_counters(&rt, &mgmt).0;
    rt.block_on(write_blocks(&vol, &mut model, 0..8 * MIB, &mut rng, 2));
    wait_for("the new fragments to be folded", Duration::from_secs(120), || {
        let (stripes, waiting) = ec_counters(&rt, &mgmt);
        (stripes > folded).then_some(()).ok_or(format!("{stripes} stripes folded, {waiting} waiting"))
    });
    c.kill_engine(1);
    c.engines[1] = Some(c.start_engine(1));
    c.wait_engines_up(3, Duration::from_secs(20));
    rt.block_on(verify_all(&vol, &model));
    let info = rt.block_on(mgmt.volume("p", "v")).unwrap();
    let cluster = tessera_client::volume::Cluster::new(mgmt.clone());
    let s = rt.block_on(cluster.open_snapshot(&info, &snap)).unwrap();
    rt.block_on(verify_all(&s, &at_snapshot));
}

/// The aggregator folds only at or below the pool's stable epoch: a write whose client took its
/// epoch before another write to the same stripe but reaches the engines after it (held up, yet
/// inside the commit window, so accepted) is still to come when the stripe's newest version is
/// above the stable epoch. Folding that stripe then would bury the late write under the new base
/// cell; instead the stripe waits, the late write lands, and the fold that follows keeps it.
#[test]
fn a_stripe_waits_for_the_stable_epoch_so_a_held_up_write_is_not_buried() {
    // A 10 s commit window: the late write comes well inside it, on a loaded machine too.
    let extra = "\n[tuning]\naggregation_lag_secs = 1\ncommit_window_ms = 10000\n\n[heal]\nec_aggregation_rate = \"512MiB\"\n";
    let mut c = LocalCluster::start_with("ec-agg-late", 3, 2, "256MiB", "30s", extra);
    let rt = runtime();
    let mgmt = c.client();
    let size = 4 * MIB;
    let vol = rt.block_on(open(&c, "EC_2P1", size));
    let mut model = vec![0u8; size as usize];
    rt.block_on(common::write_whole(&vol, &mut model, 1));
    let (folded, _) = ec_counters(&rt, &mgmt);

    // The late write takes its epoch first; a write to the other cell of stripe 0 goes through.
    let late_epoch = tessera_client::hlc::now();
    let (late_at, other_at) = (0u64, u64::from(vol.layout().cell_size()));
    let other = pattern(other_at, 4096, 2);
    rt.block_on(vol.write(other_at, other.clone())).unwrap();
    model[other_at as usize..other_at as usize + 4096].copy_from_slice(&other);
    // Two aggregation passes (every 2 s) have had the stripe in front of them. A pass that
    // declines a stripe too new leaves no trace, so this waits for the time of two passes, or
    // for the fold that a pass at a boundary above the stable epoch would do.
    let acked = std::time::Instant::now();
    wait_for("two aggregation passes", Duration::from_secs(30), || {
        let (stripes, _) = ec_counters(&rt, &mgmt);
        (stripes > folded || acked.elapsed() > Duration::from_secs(5)).then_some(()).ok_or(format!("{stripes} folded"))
    });
    eprintln!("the late write goes {:?} after its epoch; {:?}", epoch_age(late_epoch), ec_counters(&rt, &mgmt));
    let late = pattern(late_at, 4096, 3);
    rt.block_on(vol.write_held_up_since(late_epoch, late_at, late.clone())).unwrap();
    model[late_at as usize..late_at as usize + 4096].copy_from_slice(&late);
    assert_eq!(vol.stats().epoch_retries, 0, "the late write came after the commit window: the test proves nothing");
    assert!(
        rt.block_on(vol.read(late_at, 4096)).unwrap() == late,
        "the held-up write is buried under a base folded above the stable epoch"
    );

    // Once the stable epoch passes the stripe it is folded, the late write with it.
    wait_for("the stripe to be folded", Duration::from_secs(60), || {
        let (stripes, waiting) = ec_counters(&rt, &mgmt);
        (stripes > folded && waiting == 0).then_some(()).ok_or(format!("{stripes} folded, {waiting} waiting"))
    });
    rt.block_on(verify_all(&vol, &model));
    common::verify_with_each_engine_down(&mut c, &rt, &vol, &model);
}

/// Full-stripe writes torn by their client's death (only some shards took their part) settle
/// all or nothing at their epoch once the stable epoch passes them: with k shards holding the
/// write it is completed on the others; with fewer it is undone, the stripe written again as it
/// was before (fragments written in between kept). Normal reads and degraded reads with each
/// engine down then agree. The shards that took the write include or miss the first parity
/// shard (the chunk's leader), and one write is a Write Zeroes.
#[test]
fn torn_full_stripe_writes_settle_all_or_nothing() {
    let extra = "\n[tuning]\naggregation_lag_secs = 1\n";
    let mut c = LocalCluster::start_with("ec-torn", 3, 2, "256MiB", "30s", extra);
    let rt = runtime();
    let mgmt = c.client();
    let size = 4 * MIB;
    let vol = rt.block_on(open(&c, "EC_2P1", size));
    let stripe = 2 * u64::from(vol.layout().cell_size());
    let mut model = vec![0u8; size as usize];
    rt.block_on(common::write_whole(&vol, &mut model, 1));
    // A fragment in the stripe of case (f), written before its torn write.
    let frag_at = MIB + 2 * stripe + stripe / 2;
    let frag = pattern(frag_at, 4096, 2);
    rt.block_on(vol.write(frag_at, frag.clone())).unwrap();
    model[frag_at as usize..frag_at as usize + 4096].copy_from_slice(&frag);
    // (offset, shards that take the torn write, a write-zeroes, completed).
    let cases: [(u64, &[u32], bool, bool); 6] = [
        (0, &[0, 2], false, true),              // a: k shards, the leader among them
        (MIB, &[1], false, false),              // b: one data shard, no leader
        (2 * MIB, &[2], false, false),          // c: the leader alone
        (3 * MIB, &[0, 1], false, true),        // d: both data shards, no leader
        (stripe, &[0], true, true),             // e: a Write Zeroes on one data shard
        (MIB + 2 * stripe, &[0], false, false), // f: one data shard, over a fragment
    ];
    for (i, (off, shards, zeroes, completed)) in cases.iter().enumerate() {
        let data = pattern(*off, stripe as usize, 10 + i as u64);
        let epoch = rt.block_on(vol.write_torn(*off, stripe, (!zeroes).then(|| data.clone()), shards)).unwrap();
        eprintln!("torn write {i} at {off} epoch {epoch} on shards {shards:?}");
        if *completed {
            let new = if *zeroes { vec![0u8; stripe as usize] } else { data.to_vec() };
            model[*off as usize..(*off + stripe) as usize].copy_from_slice(&new);
        }
    }
    let settled = wait_for("the torn stripes to settle", Duration::from_secs(60), || {
        let s = rt.block_on(mgmt.pool("p")).unwrap().scrub;
        if s.torn_completed >= 3 && s.torn_undone >= 3 {
            Ok(s)
        } else {
            Err(format!("{} completed, {} undone", s.torn_completed, s.torn_undone))
        }
    });
    assert_eq!((settled.torn_completed, settled.torn_undone), (3, 3), "{settled:?}");
    rt.block_on(verify_all(&vol, &model));
    common::verify_with_each_engine_down(&mut c, &rt, &vol, &model);
}
