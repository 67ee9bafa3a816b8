//! Model-based crash tests of one target.
//!
//! A seeded workload of updates, punches, discards, retention changes, aggregation and checkpoints runs
//! against a target on a fault-injecting in-memory backend. For every write or sync the workload
//! performs, a run cuts the power at exactly that operation (tearing the write in half), and the
//! target is recovered from the crash image — once with every unsynced write lost, once with all
//! of them persisted. After recovery, every view the retention rules promise (latest, retained
//! snapshots, any epoch at or above the aggregation boundary) must read exactly as a brute-force
//! model of the acknowledged mutations says, or as that model plus the whole batch that was in
//! flight: never a part of it.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)] // test helpers panic on failure by design

use std::sync::Arc;

use bytes::Bytes;
use tessera_engine::backend::{Fault, FaultStorage, MemStorage, Storage};
use tessera_engine::csum::{chunk_csums, crc64};
use tessera_engine::index::Retention;
use tessera_engine::op::AkeyPath;
use tessera_engine::target::{Mutation, PunchTarget, SyncJob, Target, TargetConfig, UpdateValue};

const RANGE: u64 = 48 * 1024;
const OBJS: [u128; 2] = [1, 2];
const DKEYS: [&[u8]; 2] = [b"d0", b"d1"];
const ARRAY_AKEYS: [&[u8]; 2] = [b"x", b"y"];
const SINGLE_AKEY: &[u8] = b"s";

/// xorshift64*: deterministic, dependency-free randomness for the workload.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn path(obj: u128, dkey: &[u8], akey: &[u8]) -> AkeyPath {
    AkeyPath { cont: 1, obj, dkey: Bytes::copy_from_slice(dkey), akey: Bytes::copy_from_slice(akey) }
}

/// One mutation as the model sees it, in submission order.
#[derive(Clone, Debug)]
struct ModelOp {
    epoch: u64,
    m: Mutation,
}

#[derive(Clone, Debug, Default)]
struct Model {
    ops: Vec<ModelOp>,
}

fn hides(m: &Mutation, p: &AkeyPath) -> bool {
    match m {
        Mutation::Punch { obj, what, .. } if *obj == p.obj => match what {
            PunchTarget::Object => true,
            PunchTarget::Dkey(d) => *d == p.dkey,
            PunchTarget::Akey { dkey, akey } => *dkey == p.dkey && *akey == p.akey,
            PunchTarget::Range { .. } => false,
        },
        _ => false,
    }
}

/// Whether discard `d` deletes `m` (of epoch `epoch`).
fn discards(d: &Mutation, epoch: u64, m: &Mutation) -> bool {
    let Mutation::Discard { obj, above, below, dkey, .. } = d else { return false };
    let in_scope = |o: u128, k: Option<&Bytes>| o == *obj && (dkey.is_none() || k == dkey.as_ref());
    epoch > *above
        && epoch < *below
        && match m {
            Mutation::Update { path, .. } => in_scope(path.obj, Some(&path.dkey)),
            Mutation::Punch { obj, what, .. } => match what {
                PunchTarget::Object => in_scope(*obj, None) && dkey.is_none(),
                PunchTarget::Dkey(d) | PunchTarget::Akey { dkey: d, .. } | PunchTarget::Range { dkey: d, .. } => in_scope(*obj, Some(d)),
            },
            _ => false,
        }
}

impl Model {
    /// Records an acknowledged mutation: a discard deletes the earlier ones it covers.
    fn push(&mut self, op: ModelOp) {
        if matches!(op.m, Mutation::Discard { .. }) {
            self.ops.retain(|o| !discards(&op.m, o.epoch, &o.m));
        } else {
            self.ops.push(op);
        }
    }

    /// Ops visible at `epoch`, newest last (epoch, then submission order).
    fn ordered(&self, epoch: u64) -> Vec<&ModelOp> {
        let mut v: Vec<(usize, &ModelOp)> = self.ops.iter().enumerate().filter(|(_, o)| o.epoch <= epoch).collect();
        v.sort_by_key(|(i, o)| (o.epoch, *i));
        v.into_iter().map(|(_, o)| o).collect()
    }

    /// Bytes and hole mask of an array akey at `epoch`.
    fn read_array(&self, p: &AkeyPath, epoch: u64) -> (Vec<u8>, Vec<bool>) {
        let mut data = vec![0u8; RANGE as usize];
        let mut hole = vec![true; RANGE as usize];
        for op in self.ordered(epoch) {
            match &op.m {
                Mutation::Update { path, value: UpdateValue::Array { offset, data: d, .. }, .. } if path == p => {
                    for (i, b) in d.iter().enumerate() {
                        let at = *offset as usize + i;
                        if at < data.len() {
                            data[at] = *b;
                            hole[at] = false;
                        }
                    }
                }
                Mutation::Punch { what: PunchTarget::Range { dkey, akey, offset, len }, obj, .. }
                    if *obj == p.obj && *dkey == p.dkey && *akey == p.akey =>
                {
                    for at in *offset as usize..(*offset + *len) as usize {
                        if at < data.len() {
                            data[at] = 0;
                            hole[at] = true;
                        }
                    }
                }
                m if hides(m, p) => {
                    data.fill(0);
                    hole.fill(true);
                }
                _ => {}
            }
        }
        (data, hole)
    }

    fn read_single(&self, p: &AkeyPath, epoch: u64) -> Option<Bytes> {
        let mut cur = None;
        for op in self.ordered(epoch) {
            match &op.m {
                Mutation::Update { path, value: UpdateValue::Single { data, .. }, .. } if path == p => cur = Some(data.clone()),
                m if hides(m, p) => cur = None,
                _ => {}
            }
        }
        cur
    }
}

/// State the workload driver carries across batches.
struct Workload {
    rng: Rng,
    base: u64,
    snapshots: Vec<u64>,
    /// Highest aggregation boundary ever in force: reads below it are not promised.
    floor: u64,
    explicit_below: u64,
}

const LAG: u64 = 6;

impl Workload {
    fn new(seed: u64) -> Self {
        Self { rng: Rng(seed | 1), base: 10, snapshots: Vec::new(), floor: 0, explicit_below: 0 }
    }

    fn mutation(&mut self) -> (u64, Mutation) {
        let r = &mut self.rng;
        let epoch = self.base - r.below(3);
        let obj = OBJS[r.below(2) as usize];
        let dkey = DKEYS[r.below(2) as usize];
        let akey = ARRAY_AKEYS[r.below(2) as usize];
        let m = match r.below(20) {
            0..=10 => {
                let offset = r.below(RANGE / 512) * 512;
                let len = (1 + r.below(20_000)).min(RANGE - offset);
                let fill = r.next() as u8;
                let data: Vec<u8> = (0..len).map(|i| fill.wrapping_add((i / 512) as u8)).collect();
                let csums = chunk_csums(&data);
                Mutation::Update {
                    path: path(obj, dkey, akey),
                    epoch,
                    value: UpdateValue::Array { offset, data: Bytes::from(data), csums },
                }
            }
            11..=13 => {
                let len = 1 + r.below(6000) as usize;
                let data = Bytes::from(vec![r.next() as u8; len]);
                let csum = crc64(&data);
                Mutation::Update { path: path(obj, dkey, SINGLE_AKEY), epoch, value: UpdateValue::Single { data, csum } }
            }
            14..=16 => {
                let offset = r.below(RANGE);
                let len = 1 + r.below(RANGE - offset);
                let what = PunchTarget::Range { dkey: Bytes::copy_from_slice(dkey), akey: Bytes::copy_from_slice(akey), offset, len };
                Mutation::Punch { cont: 1, obj, epoch, what }
            }
            17 => Mutation::Punch {
                cont: 1,
                obj,
                epoch,
                what: PunchTarget::Akey { dkey: Bytes::copy_from_slice(dkey), akey: Bytes::copy_from_slice(SINGLE_AKEY) },
            },
            18 => Mutation::Punch { cont: 1, obj, epoch, what: PunchTarget::Dkey(Bytes::copy_from_slice(dkey)) },
            _ => Mutation::Punch { cont: 1, obj, epoch, what: PunchTarget::Object },
        };
        (epoch, m)
    }

    /// A discard of one object, or of one of its dkeys, above an epoch at or above every
    /// aggregation boundary so far (aggregation may already have dropped versions that newer
    /// ones hid, and those cannot come back).
    fn discard(&mut self) -> Mutation {
        let r = &mut self.rng;
        let obj = OBJS[r.below(2) as usize];
        let dkey = (r.below(2) == 0).then(|| Bytes::copy_from_slice(DKEYS[r.below(2) as usize]));
        let above = self.floor.max(self.base.saturating_sub(r.below(8)));
        // Half of them bounded above too (a rebuild's discard below its map's epoch).
        let below = if r.below(2) == 0 { u64::MAX } else { above + 1 + r.below(6) };
        Mutation::Discard { cont: 1, obj, above, below, dkey }
    }

    fn retention(&mut self) -> Mutation {
        if self.rng.below(2) == 0 {
            self.snapshots.push(self.base);
        } else if !self.snapshots.is_empty() {
            self.snapshots.remove(0);
        }
        self.explicit_below = self.explicit_below.max(self.base - LAG);
        Mutation::SetRetention { cont: 1, retention: Retention { aggregate_below: self.explicit_below, retained: self.snapshots.clone() } }
    }

    /// Epochs at which the model and the target must agree.
    fn views(&mut self) -> Vec<u64> {
        let mut v = vec![u64::MAX, self.base, self.floor.max(self.base.saturating_sub(1))];
        v.extend(self.snapshots.iter().copied());
        v
    }
}

fn config() -> TargetConfig {
    TargetConfig {
        capacity: 2 << 20,
        inline_max: 512,
        wal_data_max: 8 << 10,
        destage_bytes: 64 << 10,
        checkpoint_wal_bytes: 1 << 40,
        // Small: records often start new segments, and checkpoints retire and reuse them.
        wal_segment_bytes: 24 << 10,
        aggregation_lag: LAG,
        aggregation_budget: 64,
        // The commit window only refuses host writes at admission (nothing durable); the model's
        // epochs are small numbers, not clock readings.
        commit_window: 0,
        follows_service: false,
        ec_settled_by_engine: false,
    }
}

/// What a run left behind: the acknowledged model, the in-flight batch, the views to check.
struct Outcome {
    acked: Model,
    inflight: Vec<ModelOp>,
    views: Vec<u64>,
}

/// Runs `batches` batches on `storage`; stops at the first storage failure.
///
/// Commits are pipelined as the target thread does: every other batch, the next batch is staged
/// and its data written while the previous commit's [`SyncJob`] has not run yet, so cuts also
/// land between a commit's start and its sync, and in data written ahead of any record.
fn run(storage: Arc<dyn Storage>, seed: u64, batches: usize) -> Outcome {
    let mut w = Workload::new(seed);
    let mut acked = Model::default();
    let mut target = match Target::open(storage, config()) {
        Ok(t) => t,
        Err(_) => return Outcome { acked, inflight: Vec::new(), views: vec![u64::MAX] },
    };
    // A started commit whose sync has not run: its job and its batch.
    let mut pending: Option<(SyncJob, Vec<ModelOp>)> = None;
    // Runs the pending job and acknowledges its batch; on failure, the outcome to return.
    let finish = |target: &mut Target, pending: &mut Option<(SyncJob, Vec<ModelOp>)>, acked: &mut Model| -> Result<(), Vec<ModelOp>> {
        let Some((job, batch)) = pending.take() else { return Ok(()) };
        let synced = job.run();
        if target.commit_finish(synced).is_err() {
            return Err(batch);
        }
        for op in batch {
            acked.push(op);
        }
        Ok(())
    };
    for b in 0..batches {
        w.base += 1 + w.rng.below(2);
        let mut batch = Vec::new();
        let n = 1 + w.rng.below(4);
        for i in 0..n {
            // A discard is planned from the committed index: only first in a batch, after the
            // previous commit finished.
            let (epoch, m) = if i == 0 && w.rng.below(10) == 0 {
                if let Err(inflight) = finish(&mut target, &mut pending, &mut acked) {
                    return Outcome { acked, inflight, views: w.views() };
                }
                (0, w.discard())
            } else if w.rng.below(8) == 0 {
                (0, w.retention())
            } else {
                w.mutation()
            };
            if target.stage(m.clone()).is_ok() {
                if !matches!(m, Mutation::SetRetention { .. }) {
                    batch.push(ModelOp { epoch, m });
                }
            } else if target.info().health != tessera_engine::target::Health::Healthy {
                let inflight = pending.map(|p| p.1).unwrap_or_default();
                return Outcome { acked, inflight, views: w.views() };
            }
        }
        if pending.is_some() {
            // This batch's data goes out while the previous commit has yet to sync: no record
            // references it, so a crash now must not show any of it.
            if target.write_staged_data().is_err() {
                let inflight = pending.map(|p| p.1).unwrap_or_default();
                return Outcome { acked, inflight, views: w.views() };
            }
            if let Err(inflight) = finish(&mut target, &mut pending, &mut acked) {
                return Outcome { acked, inflight, views: w.views() };
            }
        }
        match target.commit_start() {
            Ok(Some(job)) => pending = Some((job, batch)),
            Ok(None) => {}
            Err(_) => return Outcome { acked, inflight: batch, views: w.views() },
        }
        if b % 2 == 0 {
            // Pipelined: the next batch stages before this one syncs.
            continue;
        }
        if let Err(inflight) = finish(&mut target, &mut pending, &mut acked) {
            return Outcome { acked, inflight, views: w.views() };
        }
        // Small updates' data waits in the WAL; move it to the data file now and then (also
        // mid-way, so that crashes hit every step of it).
        if b % 4 == 3 && target.destage_step(if b % 8 == 3 { 16 << 10 } else { u64::MAX }).is_err() {
            return Outcome { acked, inflight: Vec::new(), views: w.views() };
        }
        if b % 3 == 2 {
            let retention = target.index().retention(1);
            let boundary = if retention.aggregate_below > 0 { retention.aggregate_below } else { w.base - LAG };
            w.floor = w.floor.max(boundary);
            if target.aggregate_step(w.base).is_err() {
                return Outcome { acked, inflight: Vec::new(), views: w.views() };
            }
        }
        if b % 10 == 9 {
            let started = target.maybe_checkpoint(true);
            if started.is_err() || target.reap_checkpoint(true).is_err() {
                // A failed checkpoint loses nothing: the WAL still holds every record.
                if target.info().health != tessera_engine::target::Health::Healthy {
                    return Outcome { acked, inflight: Vec::new(), views: w.views() };
                }
            }
        }
    }
    if let Err(inflight) = finish(&mut target, &mut pending, &mut acked) {
        return Outcome { acked, inflight, views: w.views() };
    }
    Outcome { acked, inflight: Vec::new(), views: w.views() }
}

fn all_paths() -> Vec<(AkeyPath, bool)> {
    let mut out = Vec::new();
    for obj in OBJS {
        for d in DKEYS {
            for a in ARRAY_AKEYS {
                out.push((path(obj, d, a), true));
            }
            out.push((path(obj, d, SINGLE_AKEY), false));
        }
    }
    out
}

/// Whether `target` reads exactly as `model` at every view.
fn matches(target: &Target, model: &Model, views: &[u64]) -> Result<(), String> {
    for (p, array) in all_paths() {
        for &e in views {
            if array {
                let got = target.fetch_array(&p, 0, RANGE, e).map_err(|err| format!("{p:?}@{e}: {err}"))?;
                let (want, hole) = model.read_array(&p, e);
                if got.data[..] != want[..] {
                    let at = got.data.iter().zip(&want).position(|(a, b)| a != b).unwrap_or(0);
                    return Err(format!("{p:?}@{e}: data differs at byte {at}"));
                }
                let mut got_hole = vec![false; RANGE as usize];
                for (off, len) in &got.holes {
                    got_hole[*off as usize..(*off + *len) as usize].fill(true);
                }
                if got_hole != hole {
                    return Err(format!("{p:?}@{e}: hole map differs"));
                }
                if got.csums != chunk_csums(&got.data) {
                    return Err(format!("{p:?}@{e}: returned checksums do not match returned data"));
                }
            } else {
                let got = target.fetch_single(&p, e).map_err(|err| format!("{p:?}@{e}: {err}"))?.map(|(d, _, _)| d);
                if got != model.read_single(&p, e) {
                    return Err(format!("{p:?}@{e}: single value differs"));
                }
            }
        }
    }
    Ok(())
}

fn check_recovery(image: MemStorage, out: &Outcome, what: &str) {
    let target = Target::open(Arc::new(image.clone()), config()).unwrap_or_else(|e| panic!("{what}: recovery failed: {e}"));
    let mut with_inflight = out.acked.clone();
    for op in &out.inflight {
        with_inflight.push(op.clone());
    }
    let model = match matches(&target, &out.acked, &out.views) {
        Ok(()) => &out.acked,
        Err(without) => match matches(&target, &with_inflight, &out.views) {
            Ok(()) => &with_inflight,
            Err(with_err) => {
                panic!("{what}: recovered state is neither acknowledged ({without}) nor acknowledged + in-flight batch ({with_err})")
            }
        },
    };
    // A second power cut right after recovery loses nothing that recovery showed: what it
    // replayed (perhaps from a dead process's page cache) was made durable before going on.
    drop(target);
    let again =
        Target::open(Arc::new(image.crash_image(false)), config()).unwrap_or_else(|e| panic!("{what}: second recovery failed: {e}"));
    if let Err(e) = matches(&again, model, &out.views) {
        panic!("{what}: a second crash right after recovery changed the state: {e}");
    }
    drop(again);
    // The recovered target keeps working: a new update lands and reads back.
    let mut target = Target::open(Arc::new(image), config()).expect("second recovery");
    let p = path(9, b"after", b"crash");
    let data = Bytes::from(vec![0xab; 8192]);
    let m = Mutation::Update {
        path: p.clone(),
        epoch: u64::MAX - 1,
        value: UpdateValue::Array { offset: 0, data: data.clone(), csums: chunk_csums(&data) },
    };
    target.stage(m).expect("stage after recovery");
    target.commit().expect("commit after recovery");
    assert_eq!(target.fetch_array(&p, 0, 8192, u64::MAX).unwrap().data, data, "{what}");
}

fn count_ops(seed: u64, batches: usize) -> u64 {
    let mem = MemStorage::new();
    let counting = FaultStorage::new(Arc::new(mem.clone()), 0, Fault::Fail);
    let out = run(Arc::new(counting.clone()), seed, batches);
    // Without faults, everything is acknowledged and a clean reopen matches the model.
    let target = Target::open(Arc::new(mem), config()).unwrap();
    matches(&target, &out.acked, &out.views).unwrap();
    counting.ops()
}

#[test]
fn model_matches_without_faults() {
    for seed in 1..=5 {
        count_ops(seed, 120);
    }
}

#[test]
fn power_cut_at_every_write_and_sync() {
    for seed in [11u64, 12] {
        let batches = 45;
        let total = count_ops(seed, batches);
        assert!(total > 100, "workload too small: {total} ops");
        for at in 1..=total {
            let mem = MemStorage::new();
            let faulty = FaultStorage::new(Arc::new(mem.clone()), at, Fault::Cut { keep: 37 });
            let out = run(Arc::new(faulty), seed, batches);
            for keep_unsynced in [false, true] {
                check_recovery(
                    mem.crash_image(keep_unsynced),
                    &out,
                    &format!("seed {seed}, cut at op {at}/{total}, unsynced kept: {keep_unsynced}"),
                );
            }
        }
    }
}

#[test]
fn failed_write_or_sync_stops_updates_and_loses_nothing_acknowledged() {
    let seed = 21;
    let batches = 30;
    let total = count_ops(seed, batches);
    for at in (1..=total).step_by(3) {
        let mem = MemStorage::new();
        let faulty = FaultStorage::new(Arc::new(mem.clone()), at, Fault::Fail);
        let out = run(Arc::new(faulty), seed, batches);
        check_recovery(mem.crash_image(true), &out, &format!("fail at op {at}/{total}"));
    }
}
