//! Cost of computing one group's layout (`placement::layout`) on healthy and degraded pools.
//!
//! ```sh
//! cargo bench -p tessera-placement --bench placement
//! ```
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use tessera_engine_proto::ObjectId;
use tessera_placement::placement::{layout, ObjectClass, PoolMap, TargetState};

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("layout");
    g.warm_up_time(Duration::from_millis(300)).measurement_time(Duration::from_secs(1)).sample_size(20);
    for (engines, targets, class) in [
        (3u32, 2u16, ObjectClass::Ec { k: 2, p: 1 }),
        (16, 4, ObjectClass::Ec { k: 4, p: 2 }),
        (64, 8, ObjectClass::Ec { k: 8, p: 2 }),
        (64, 8, ObjectClass::Rp(3)),
    ] {
        let healthy = PoolMap::uniform(engines, targets).unwrap();
        let degraded = healthy.set_engine_state(1, TargetState::Down).unwrap().set_state(2, 0, TargetState::Down).unwrap();
        // The same failures with the healthy map as the base (rebuilding decided against it: a
        // second layout of the group).
        let with_base = degraded.clone().with_base(healthy.clone());
        for (name, map) in [("healthy", &healthy), ("degraded", &degraded), ("degraded+base", &with_base)] {
            let mut d = 0u64;
            g.bench_function(BenchmarkId::new(format!("{engines}x{targets}/{class}"), name), |b| {
                b.iter(|| {
                    d = d.wrapping_add(0x9e37_79b9_7f4a_7c15);
                    layout(map, ObjectId(42), d, class).unwrap()
                })
            });
        }
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
