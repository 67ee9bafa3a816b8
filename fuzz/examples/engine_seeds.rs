//! Writes seed inputs for the engine format fuzz targets (`engine_ops`, `engine_wal`,
//! `engine_checkpoint`) into `fuzz/corpus/<target>/`:
//!
//!     cargo run --manifest-path fuzz/Cargo.toml --example engine_seeds
//!
//! The seeds are real files: a target on the in-memory backend runs a small workload (array
//! updates inline and in the data file, single values, punches at every level, a retention
//! change, aggregation with its unpunches, checkpoints), and its WAL segments (prefixed with
//! their first sequence number, as `engine_wal` expects), checkpoints and WAL record payloads
//! (for `engine_ops`) are written out, plus one hand-made op list with every op kind.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a generator: fail loudly

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use tessera_engine::backend::{MemStorage, Storage};
use tessera_engine::checkpoint::parse_checkpoint_name;
use tessera_engine::csum::{chunk_csums, crc64};
use tessera_engine::index::{Retention, Version};
use tessera_engine::op::{encode_ops, AkeyPath, Extent, Loc, Op, PunchLevel, Stored};
use tessera_engine::target::{Mutation, PunchTarget, Target, TargetConfig, UpdateValue};
use tessera_engine::wal::{parse_segment_name, scan_segment};

fn path(obj: u128, dkey: &[u8], akey: &[u8]) -> AkeyPath {
    AkeyPath { cont: 1, obj, dkey: Bytes::copy_from_slice(dkey), akey: Bytes::copy_from_slice(akey) }
}

fn array(t: &mut Target, p: AkeyPath, epoch: u64, offset: u64, len: usize, fill: u8) {
    let data = Bytes::from(vec![fill; len]);
    let csums = chunk_csums(&data);
    t.stage(Mutation::Update { path: p, epoch, value: UpdateValue::Array { offset, data, csums } }).unwrap();
}

fn single(t: &mut Target, p: AkeyPath, epoch: u64, len: usize, fill: u8) {
    let data = Bytes::from(vec![fill; len]);
    let csum = crc64(&data);
    t.stage(Mutation::Update { path: p, epoch, value: UpdateValue::Single { data, csum } }).unwrap();
}

fn punch(t: &mut Target, obj: u128, epoch: u64, what: PunchTarget) {
    t.stage(Mutation::Punch { cont: 1, obj, epoch, what }).unwrap();
}

fn checkpoint(t: &mut Target) {
    assert!(t.maybe_checkpoint(true).unwrap(), "checkpoint started");
    t.reap_checkpoint(true).unwrap();
}

/// Runs the workload; `snap` is called after each phase (old WAL segments and checkpoints are
/// removed as new checkpoints complete, so the seeds are collected along the way).
fn workload(mem: &MemStorage, snap: &mut dyn FnMut(&MemStorage)) {
    let cfg = TargetConfig { capacity: 1 << 20, ..TargetConfig::default() };
    let mut t = Target::open(Arc::new(mem.clone()), cfg).unwrap();
    let b = |s: &'static [u8]| Bytes::from_static(s);
    array(&mut t, path(1, b"d0", b"x"), 10, 0, 100, 1);
    array(&mut t, path(1, b"d0", b"x"), 10, 4096, 9000, 2);
    single(&mut t, path(1, b"d0", b"s"), 11, 20, 3);
    t.commit().unwrap();
    array(&mut t, path(1, b"d0", b"x"), 20, 4096, 4096, 4);
    single(&mut t, path(1, b"d0", b"s"), 21, 5000, 5);
    punch(&mut t, 1, 22, PunchTarget::Range { dkey: b(b"d0"), akey: b(b"x"), offset: 50, len: 10 });
    t.commit().unwrap();
    snap(mem);
    checkpoint(&mut t);
    array(&mut t, path(2, b"d1", b"y"), 30, 0, 8192, 6);
    punch(&mut t, 2, 31, PunchTarget::Akey { dkey: b(b"d1"), akey: b(b"y") });
    punch(&mut t, 1, 32, PunchTarget::Dkey(b(b"d9")));
    punch(&mut t, 3, 33, PunchTarget::Object);
    array(&mut t, path(4, b"d4", b"z"), 34, 0, 10, 8);
    t.commit().unwrap();
    punch(&mut t, 4, 35, PunchTarget::Object);
    punch(&mut t, 1, 36, PunchTarget::Dkey(b(b"d0")));
    t.stage(Mutation::SetRetention { cont: 1, retention: Retention { aggregate_below: 25, retained: vec![15, 12] } }).unwrap();
    t.commit().unwrap();
    t.aggregate_step(1_000_000).unwrap();
    t.stage(Mutation::SetRetention { cont: 1, retention: Retention { aggregate_below: 40, retained: vec![] } }).unwrap();
    t.commit().unwrap();
    t.aggregate_step(1_000_000).unwrap();
    snap(mem);
    checkpoint(&mut t);
    array(&mut t, path(1, b"d0", b"x"), 50, 100, 300, 7);
    t.commit().unwrap();
    snap(mem);
    // No shutdown: the last segment keeps its records after the newest checkpoint.
}

/// Every op kind and every variant of its fields, by hand.
fn all_op_kinds() -> Vec<Op> {
    let p = path(7, b"dk", b"");
    let v = Version { epoch: 5, id: 9 };
    let blocks = Stored { loc: Loc::Blocks { start: 3 }, len: 5000, csums: vec![1, 2] };
    let inline = Stored { loc: Loc::Inline(Bytes::from_static(b"abc")), len: 3, csums: vec![4] };
    vec![
        Op::Extent { path: p.clone(), ext: Extent { offset: 4096, len: 5000, version: v, data: Some(blocks.clone()) } },
        Op::Extent { path: p.clone(), ext: Extent { offset: 0, len: 1, version: v, data: None } },
        Op::Single { path: p.clone(), version: v, value: inline },
        Op::Punch { cont: 1, obj: 2, level: PunchLevel::Object, version: v },
        Op::Punch { cont: 1, obj: 2, level: PunchLevel::Akey(Bytes::from_static(b"x"), Bytes::from_static(b"y")), version: v },
        Op::Unpunch { cont: 1, obj: 2, level: PunchLevel::Dkey(Bytes::from_static(b"x")), version: v },
        Op::Retention { cont: 3, retention: Retention { aggregate_below: 77, retained: vec![1, 2, 3] } },
        Op::Aggregate {
            path: p,
            remove_extents: vec![(0, v)],
            add_extents: vec![Extent { offset: 0, len: 5000, version: v, data: Some(blocks) }],
            remove_singles: vec![v],
            remove_punches: vec![v],
        },
    ]
}

fn kind(op: &Op) -> &'static str {
    match op {
        Op::Extent { ext, .. } if ext.data.is_none() => "range punch",
        Op::Extent { .. } => "extent",
        Op::Single { .. } => "single",
        Op::Punch { .. } => "punch",
        Op::Retention { .. } => "retention",
        Op::Aggregate { .. } => "aggregate",
        Op::Unpunch { .. } => "unpunch",
    }
}

fn write(dir: &Path, name: &str, data: &[u8]) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join(name), data).unwrap();
}

fn main() {
    let corpus = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("corpus");
    let mem = MemStorage::new();
    let mut files = BTreeMap::new();
    workload(&mem, &mut |m: &MemStorage| {
        for name in m.list().unwrap() {
            files.insert(name.clone(), m.contents(&name).unwrap());
        }
    });
    let (mut wal, mut ckpt, mut ops) = (0, 0, 0);
    let mut kinds = BTreeSet::new();
    for (name, content) in files {
        if let Some(seq) = parse_segment_name(&name) {
            let mut input = seq.to_le_bytes().to_vec();
            input.extend_from_slice(&content);
            write(&corpus.join("engine_wal"), &format!("seed-{name}"), &input);
            wal += 1;
            for (seq, rec) in scan_segment(Bytes::from(content), seq).records {
                kinds.extend(rec.iter().map(kind));
                write(&corpus.join("engine_ops"), &format!("seed-record-{seq}"), &encode_ops(&rec));
                ops += 1;
            }
        } else if parse_checkpoint_name(&name).is_some() {
            write(&corpus.join("engine_checkpoint"), &format!("seed-{name}"), &content);
            ckpt += 1;
        }
    }
    write(&corpus.join("engine_ops"), "seed-all-kinds", &encode_ops(&all_op_kinds()));
    println!(
        "engine seeds in {}: {wal} WAL segments, {ckpt} checkpoints, {} op lists; the workload's WAL has {kinds:?}",
        corpus.display(),
        ops + 1
    );
}
