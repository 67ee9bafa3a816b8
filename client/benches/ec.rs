//! Erasure-coding throughput on Tessera's cell sizes (4 KiB, 64 KiB, 1 MiB) for EC_2P1 and
//! EC_4P2: encode a stripe's parity, and reconstruct with p data cells lost.
//!
//! ```sh
//! cargo bench -p tessera-client --bench ec                               # reed-solomon-erasure and tessera's Codec
//! cargo bench -p tessera-client --bench ec --features compare-rs-simd   # also reed-solomon-simd
//! ```
//!
//! Throughput is data bytes per second (k × cell per stripe). `docs/PLACEMENT.md` has the numbers.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::time::Duration;

use criterion::{criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion, Throughput};
use tessera_client::ec::Codec;

const CELLS: [(usize, &str); 3] = [(4 << 10, "4KiB"), (64 << 10, "64KiB"), (1 << 20, "1MiB")];
const CLASSES: [(usize, usize); 2] = [(2, 1), (4, 2)];

fn stripe(k: usize, cell: usize) -> Vec<Vec<u8>> {
    (0..k).map(|i| (0..cell).map(|j| (j as u32).wrapping_mul(2_654_435_761).wrapping_add(i as u32 * 7919) as u8).collect()).collect()
}

fn bench(c: &mut Criterion) {
    for (k, p) in CLASSES {
        let mut g = c.benchmark_group(format!("EC_{k}P{p}"));
        g.warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(2)).sample_size(20);
        for (cell, name) in CELLS {
            let data = stripe(k, cell);
            g.throughput(Throughput::Bytes((k * cell) as u64));

            // reed-solomon-simd, reusing one encoder/decoder (their working space).
            #[cfg(feature = "compare-rs-simd")]
            {
                let mut enc = reed_solomon_simd::ReedSolomonEncoder::new(k, p, cell).unwrap();
                g.bench_function(BenchmarkId::new("encode/reed-solomon-simd", name), |b| {
                    b.iter(|| {
                        for d in &data {
                            enc.add_original_shard(d).unwrap();
                        }
                        let r = enc.encode().unwrap();
                        std::hint::black_box(r.recovery(0).unwrap()[0]);
                    })
                });
                let parity = reed_solomon_simd::encode(k, p, &data).unwrap();
                let mut dec = reed_solomon_simd::ReedSolomonDecoder::new(k, p, cell).unwrap();
                g.bench_function(BenchmarkId::new("reconstruct/reed-solomon-simd", name), |b| {
                    b.iter(|| {
                        // The first p data cells are lost.
                        for (i, d) in data.iter().enumerate().skip(p) {
                            dec.add_original_shard(i, d).unwrap();
                        }
                        for (i, q) in parity.iter().enumerate() {
                            dec.add_recovery_shard(i, q).unwrap();
                        }
                        let r = dec.decode().unwrap();
                        std::hint::black_box(r.restored_original(0).unwrap()[0]);
                    })
                });
            }

            // Tessera's Codec (reed-solomon-erasure behind it, with its checks and allocation).
            let codec = Codec::new(k, p).unwrap();
            g.bench_function(BenchmarkId::new("encode/tessera-codec", name), |b| {
                b.iter(|| std::hint::black_box(codec.encode(&data).unwrap()))
            });
            let parity = codec.encode(&data).unwrap();
            let mut full: Vec<Option<Vec<u8>>> = data.iter().cloned().chain(parity.iter().cloned()).map(Some).collect();
            for cell in full.iter_mut().take(p) {
                *cell = None;
            }
            g.bench_function(BenchmarkId::new("reconstruct/tessera-codec", name), |b| {
                b.iter_batched_ref(
                    || full.clone(),
                    |cells| {
                        codec.reconstruct(cells).unwrap();
                    },
                    BatchSize::LargeInput,
                )
            });

            // reed-solomon-erasure (simd-accel), encoding in place.
            {
                use reed_solomon_erasure::galois_8::ReedSolomon;
                let rs = ReedSolomon::new(k, p).unwrap();
                let mut shards: Vec<Vec<u8>> = data.iter().cloned().chain((0..p).map(|_| vec![0u8; cell])).collect();
                g.bench_function(BenchmarkId::new("encode/reed-solomon-erasure", name), |b| {
                    b.iter(|| {
                        rs.encode(&mut shards).unwrap();
                        std::hint::black_box(shards[k][0]);
                    })
                });
                let mut lost: Vec<Option<Vec<u8>>> = shards.iter().cloned().map(Some).collect();
                for cell in lost.iter_mut().take(p) {
                    *cell = None;
                }
                g.bench_function(BenchmarkId::new("reconstruct/reed-solomon-erasure", name), |b| {
                    b.iter_batched_ref(
                        || lost.clone(),
                        |cells| {
                            rs.reconstruct_data(cells).unwrap();
                        },
                        BatchSize::LargeInput,
                    )
                });
            }
        }
        g.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
