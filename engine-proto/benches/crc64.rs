//! CRC-64/NVME throughput on a checksum chunk (4 KiB) and on a 128 KiB buffer, for
//! [`tessera_engine_proto::crc64`] (crc-fast: carry-less multiply, chosen at run time) and the
//! table-driven implementation it replaced (the `crc` crate, slice-by-16).
//!
//! ```sh
//! cargo bench -p tessera-engine-proto --bench crc64                                   # crc64 and the old table
//! cargo bench -p tessera-engine-proto --bench crc64 --features compare-crc64fast-nvme # also crc64fast-nvme
//! ```
//!
//! Throughput is input bytes per second. `docs/ENGINE-FORMATS.md` has the numbers.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

const SIZES: [(usize, &str); 2] = [(4 << 10, "4KiB"), (128 << 10, "128KiB")];

/// The implementation `crc64` had before crc-fast.
static TABLE16: crc::Crc<u64, crc::Table<16>> = crc::Crc::<u64, crc::Table<16>>::new(&crc::CRC_64_NVME);

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("crc64-nvme");
    g.warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(2)).sample_size(30);
    for (len, name) in SIZES {
        let data: Vec<u8> = (0..len as u32).map(|i| i.wrapping_mul(2_654_435_761) as u8).collect();
        let want = TABLE16.checksum(&data);
        g.throughput(Throughput::Bytes(len as u64));

        assert_eq!(tessera_engine_proto::crc64(&data), want);
        g.bench_function(BenchmarkId::new("crc64 (crc-fast)", name), |b| b.iter(|| tessera_engine_proto::crc64(black_box(&data))));

        g.bench_function(BenchmarkId::new("old: crc table16", name), |b| b.iter(|| TABLE16.checksum(black_box(&data))));

        #[cfg(feature = "compare-crc64fast-nvme")]
        {
            let sum = |d: &[u8]| {
                let mut h = crc64fast_nvme::Digest::new();
                h.write(d);
                h.sum64()
            };
            assert_eq!(sum(&data), want);
            g.bench_function(BenchmarkId::new("crc64fast-nvme", name), |b| b.iter(|| sum(black_box(&data))));
        }
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
