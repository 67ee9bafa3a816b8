//! Measures how long a checkpoint stops a target's updates (the pause: WAL rotation and
//! serialising the index) and how long the background write takes, for indexes of growing size.
//!
//! `cargo run --release -p tessera-engine --example checkpoint_pause -- [DIR]` (default: a
//! temporary directory under target/). Prints one line per index size.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a measurement tool: failing loudly is fine

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use tessera_engine::backend::FileStorage;
use tessera_engine::csum::chunk_csums;
use tessera_engine::op::AkeyPath;
use tessera_engine::target::{Mutation, Target, TargetConfig, UpdateValue};

fn main() {
    let base = std::env::args().nth(1).map_or_else(|| std::path::PathBuf::from("target/checkpoint-pause"), Into::into);
    println!("| extents in the index | checkpoint bytes | pause (ms) | background write + sync (ms) |");
    println!("|---|---|---|---|");
    for extents in [10_000u64, 100_000, 400_000] {
        let dir = base.join(format!("n{extents}"));
        let _ = std::fs::remove_dir_all(&dir);
        let storage = Arc::new(FileStorage::new(&dir).unwrap());
        let cfg = TargetConfig { capacity: extents * 4096 + (64 << 20), checkpoint_wal_bytes: u64::MAX, ..TargetConfig::default() };
        let mut target = Target::open(storage, cfg).unwrap();
        let data = Bytes::from(vec![7u8; 4096]);
        let csums = chunk_csums(&data);
        for i in 0..extents {
            // One akey per 1 MiB chunk (256 blocks), like a volume's layout.
            let path = AkeyPath { cont: 1, obj: 1, dkey: Bytes::copy_from_slice(&(i / 256).to_be_bytes()), akey: Bytes::from_static(b"0") };
            let value = UpdateValue::Array { offset: (i % 256) * 4096, data: data.clone(), csums: csums.clone() };
            target.stage(Mutation::Update { path, epoch: 1, value }).unwrap();
            if i % 256 == 255 {
                target.commit().unwrap();
            }
        }
        target.commit().unwrap();
        let started = Instant::now();
        target.maybe_checkpoint(true).unwrap();
        let pause = target.max_checkpoint_pause;
        target.reap_checkpoint(true).unwrap();
        let total = started.elapsed();
        let bytes: u64 = std::fs::read_dir(&dir)
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().starts_with("ckpt-"))
            .map(|e| e.metadata().unwrap().len())
            .sum();
        println!("| {extents} | {bytes} | {:.1} | {:.1} |", pause.as_secs_f64() * 1e3, (total - pause).as_secs_f64() * 1e3);
        drop(target);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
