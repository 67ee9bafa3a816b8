//! Property tests of the placement: deterministic, balanced across engines, never two shards of
//! a group on one engine, and minimal movement when a target or an engine fails.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::collections::{HashMap, HashSet};

use proptest::prelude::*;
use tessera_engine_proto::ObjectId;
use tessera_placement::placement::{
    dkey_hash, group_count, layout, layout_for_dkey, Group, ObjectClass, PlacementError, PoolMap, TargetEntry, TargetRef, TargetState,
};

fn class() -> impl Strategy<Value = ObjectClass> {
    prop_oneof![
        Just(ObjectClass::S1),
        Just(ObjectClass::Rp(2)),
        Just(ObjectClass::Rp(3)),
        Just(ObjectClass::Ec { k: 2, p: 1 }),
        Just(ObjectClass::Ec { k: 4, p: 2 }),
        Just(ObjectClass::Ec { k: 8, p: 2 }),
    ]
}

/// A pool of 1..=14 engines with sparse ranks and 1..=6 targets each (uneven), some targets
/// already failed at distinct earlier versions.
fn pool() -> impl Strategy<Value = PoolMap> {
    prop::collection::vec((1u16..=6, prop::collection::vec(0u8..10, 6)), 1..=14).prop_map(|engines| {
        let mut targets = Vec::new();
        let mut fseq = 1;
        for (e, (count, fail)) in engines.iter().enumerate() {
            for index in 0..*count {
                // About one target in ten is down (DOWN or DOWNOUT).
                let state = match fail[index as usize] {
                    0 => TargetState::Down,
                    1 if index % 2 == 0 => TargetState::DownOut,
                    2 => TargetState::Up,
                    _ => TargetState::UpIn,
                };
                if !state.is_placeable() {
                    fseq += 1;
                }
                targets.push(TargetEntry { rank: (e as u32) * 3 + 1, index, state, fseq: if state.is_placeable() { 0 } else { fseq } });
            }
        }
        PoolMap::new(fseq + 1, targets).unwrap()
    })
}

fn engines_distinct(g: &Group) -> bool {
    let mut seen = HashSet::new();
    g.shards.iter().all(|s| seen.insert(s.rank))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn deterministic_and_order_independent(map in pool(), class in class(), oid in any::<u128>(), dkey in prop::collection::vec(any::<u8>(), 1..32)) {
        let a = layout_for_dkey(&map, ObjectId(oid), &dkey, class);
        let b = layout(&map, ObjectId(oid), dkey_hash(&dkey), class);
        prop_assert_eq!(&a, &b);
        // The same map listed in another order gives the same layout.
        let mut rev: Vec<TargetEntry> = map.targets().to_vec();
        rev.reverse();
        let map2 = PoolMap::new(map.version(), rev).unwrap();
        prop_assert_eq!(&a, &layout_for_dkey(&map2, ObjectId(oid), &dkey, class));
        match a {
            Ok(g) => {
                prop_assert_eq!(g.shards.len() as u32, class.shards_per_group());
                prop_assert!(g.index < group_count(&map, class));
                prop_assert!(g.shards.iter().enumerate().all(|(i, s)| s.shard == i as u32));
            }
            Err(e) => {
                prop_assert!(map.engines().len() < class.shards_per_group() as usize);
                prop_assert_eq!(e, PlacementError::NotEnoughEngines { class, shards: class.shards_per_group(), engines: map.engines().len() });
            }
        }
    }

    #[test]
    fn never_two_shards_on_one_engine(map in pool(), class in class(), oid in any::<u128>()) {
        prop_assume!(map.engines().len() >= class.shards_per_group() as usize);
        for d in 0..64u64 {
            let g = layout(&map, ObjectId(oid), d.wrapping_mul(0x9e37_79b9_7f4a_7c15), class).unwrap();
            prop_assert!(engines_distinct(&g), "{:?}", g);
            for s in &g.shards {
                let t = map.target(s.rank, s.target_index).unwrap();
                prop_assert_eq!(t.state, s.state);
                // A shard is on a non-placeable target only when it could not move: then every
                // engine is either used by another shard of the group or has no placeable target.
                if !s.state.is_placeable() {
                    let used: HashSet<u32> = g.shards.iter().filter(|o| o.shard != s.shard).map(|o| o.rank).collect();
                    for e in map.engines() {
                        let has_alive = map.engine_targets(e).iter().any(|t| t.state.is_placeable());
                        prop_assert!(used.contains(&e.rank) || !has_alive, "shard {} stuck on a down target but engine {} is free", s.shard, e.rank);
                    }
                }
            }
        }
    }

    /// From any map, failing one more target moves exactly the shards that were on it.
    #[test]
    fn one_target_failure_moves_only_its_shards(map in pool(), class in class(), oid in any::<u128>(), pick in any::<prop::sample::Index>()) {
        prop_assume!(map.engines().len() >= class.shards_per_group() as usize);
        let alive: Vec<&TargetEntry> = map.targets().iter().filter(|t| t.state.is_placeable()).collect();
        prop_assume!(!alive.is_empty());
        let victim = *pick.get(&alive);
        let after = map.set_state(victim.rank, victim.index, TargetState::Down).unwrap();
        let vref = TargetRef { rank: victim.rank, index: victim.index };
        for d in 0..64u64 {
            let a = layout(&map, ObjectId(oid), d, class).unwrap();
            let b = layout(&after, ObjectId(oid), d, class).unwrap();
            prop_assert_eq!(a.index, b.index);
            for (x, y) in a.shards.iter().zip(&b.shards) {
                if x.target() == vref {
                    // It moved, or it is stuck there (no free engine) and reported down.
                    prop_assert!(y.target() != vref || y.state == TargetState::Down);
                } else {
                    prop_assert_eq!(x.target(), y.target(), "shard {} moved though its target did not fail", x.shard);
                }
            }
        }
    }

    /// A whole engine failing (all its targets in one version) moves only the shards on it.
    #[test]
    fn engine_failure_moves_only_its_shards(map in pool(), class in class(), oid in any::<u128>(), pick in any::<prop::sample::Index>()) {
        prop_assume!(map.engines().len() >= class.shards_per_group() as usize);
        let rank = pick.get(map.engines()).rank;
        let after = map.set_engine_state(rank, TargetState::Down).unwrap();
        for d in 0..64u64 {
            let a = layout(&map, ObjectId(oid), d, class).unwrap();
            let b = layout(&after, ObjectId(oid), d, class).unwrap();
            for (x, y) in a.shards.iter().zip(&b.shards) {
                if x.rank != rank {
                    prop_assert_eq!(x.target(), y.target());
                } else {
                    prop_assert!(y.rank != rank || y.state == TargetState::Down);
                }
            }
            prop_assert!(engines_distinct(&b));
        }
    }

    /// DOWN -> DOWNOUT (rebuild finished) moves nothing; it only makes moved shards readable.
    #[test]
    fn rebuild_completion_moves_nothing(map in pool(), class in class(), oid in any::<u128>()) {
        prop_assume!(map.engines().len() >= class.shards_per_group() as usize);
        let downs: Vec<(TargetRef, TargetState)> = map.targets().iter().filter(|t| t.state == TargetState::Down)
            .map(|t| (TargetRef { rank: t.rank, index: t.index }, TargetState::DownOut)).collect();
        let after = map.set_states(&downs).unwrap();
        for d in 0..32u64 {
            let a = layout(&map, ObjectId(oid), d, class).unwrap();
            let b = layout(&after, ObjectId(oid), d, class).unwrap();
            for (x, y) in a.shards.iter().zip(&b.shards) {
                prop_assert_eq!(x.target(), y.target());
                prop_assert!(!y.rebuilding);
            }
        }
    }
}

/// Per-engine shard counts over `n` placements of many objects and dkeys.
fn engine_counts(map: &PoolMap, class: ObjectClass, n: u64, objects: u64) -> HashMap<u32, u64> {
    let mut counts: HashMap<u32, u64> = map.engines().iter().map(|e| (e.rank, 0)).collect();
    for i in 0..n {
        let oid = ObjectId(u128::from(i % objects).wrapping_mul(0x0123_4567_89ab_cdef_0011_2233_4455_6677) + 12345);
        let dkey = (i / objects).to_be_bytes();
        let g = layout_for_dkey(map, oid, &dkey, class).unwrap();
        for s in &g.shards {
            *counts.get_mut(&s.rank).unwrap() += 1;
        }
    }
    counts
}

fn assert_balanced(counts: &HashMap<u32, u64>, tolerance: f64, what: &str) {
    let mean = counts.values().sum::<u64>() as f64 / counts.len() as f64;
    let worst = counts.values().map(|&c| ((c as f64 - mean) / mean).abs()).fold(0.0, f64::max);
    eprintln!("{what}: worst engine {:.1}% from the mean", worst * 100.0);
    for (rank, &c) in counts {
        let dev = (c as f64 - mean) / mean;
        assert!(dev.abs() <= tolerance, "{what}: engine {rank} has {c} shards, mean {mean:.0} ({:+.1}%)", dev * 100.0);
    }
}

#[test]
fn balanced_across_engines() {
    for (engines, targets, class) in [
        (3, 2, ObjectClass::Ec { k: 2, p: 1 }),
        (4, 2, ObjectClass::Ec { k: 2, p: 1 }),
        (5, 4, ObjectClass::Rp(3)),
        (8, 4, ObjectClass::Ec { k: 4, p: 2 }),
        (12, 8, ObjectClass::Ec { k: 8, p: 2 }),
        (16, 2, ObjectClass::S1),
        (32, 4, ObjectClass::Ec { k: 4, p: 2 }),
    ] {
        let map = PoolMap::uniform(engines, targets).unwrap();
        // Many objects, a few dkeys each; and one object with many dkeys (a volume).
        assert_balanced(&engine_counts(&map, class, 12_000, 3_000), 0.15, &format!("{engines}x{targets} {class} many objects"));
        assert_balanced(&engine_counts(&map, class, 12_000, 1), 0.15, &format!("{engines}x{targets} {class} one object"));
    }
}

#[test]
fn balanced_after_a_failure() {
    // With one engine down, its load spreads over the others evenly.
    let map = PoolMap::uniform(10, 4).unwrap().set_engine_state(3, TargetState::Down).unwrap();
    let class = ObjectClass::Ec { k: 4, p: 2 };
    let mut counts = engine_counts(&map, class, 12_000, 3_000);
    assert_eq!(counts.remove(&3), Some(0));
    assert_balanced(&counts, 0.15, "10x4 EC_4P2 with engine 3 down");
}

#[test]
fn balanced_across_targets_of_an_engine() {
    let map = PoolMap::uniform(6, 4).unwrap();
    let mut counts: HashMap<(u32, u16), u64> = HashMap::new();
    for i in 0..12_000u64 {
        let g = layout(&map, ObjectId(u128::from(i % 100)), i / 100, ObjectClass::Ec { k: 2, p: 1 }).unwrap();
        for s in &g.shards {
            *counts.entry((s.rank, s.target_index)).or_default() += 1;
        }
    }
    assert_eq!(counts.len(), 24);
    let mean = counts.values().sum::<u64>() as f64 / 24.0;
    for (t, &c) in &counts {
        assert!(((c as f64 - mean) / mean).abs() <= 0.15, "target {t:?} has {c}, mean {mean:.0}");
    }
}
