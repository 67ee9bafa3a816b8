//! Property tests of the placement: deterministic, balanced across engines, never two shards of
//! a group on one engine, and minimal movement when a target or an engine fails.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::collections::{HashMap, HashSet};

use proptest::prelude::*;
use tessera_engine_proto::ObjectId;
use tessera_placement::placement::{
    dkey_hash, group_count, group_layout, layout, layout_for_dkey, Group, ObjectClass, PlacementError, PoolMap, ShardPlacement,
    TargetEntry, TargetRef, TargetState,
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
                targets.push(TargetEntry {
                    rank: (e as u32) * 3 + 1,
                    index,
                    state,
                    fseq: if state.is_placeable() { 0 } else { fseq },
                    added: 0,
                });
            }
        }
        PoolMap::new(fseq + 1, targets).unwrap()
    })
}

/// The checks every layout must pass: shards on distinct targets, `state` and `shared_domain`
/// as the map and the group say; a shard on a non-placeable target only when every placeable
/// target is taken by the group; two shards on one engine only when every engine with a
/// placeable target is taken by the group; a shard on an UP target is rebuilding.
fn check_group(map: &PoolMap, g: &Group, what: &str) -> Result<(), TestCaseError> {
    let mut seen = HashSet::new();
    prop_assert!(g.shards.iter().all(|s| seen.insert(s.target())), "{what}: two shards on one target: {g:?}");
    let placeable: Vec<&TargetEntry> = map.targets().iter().filter(|t| t.state.is_placeable()).collect();
    for s in &g.shards {
        let t = map.target(s.rank, s.target_index).unwrap();
        prop_assert_eq!(t.state, s.state);
        let others: Vec<&ShardPlacement> = g.shards.iter().filter(|o| o.shard != s.shard).collect();
        prop_assert_eq!(s.shared_domain, others.iter().any(|o| o.rank == s.rank), "{}: shared_domain of shard {}", what, s.shard);
        if !s.state.is_placeable() {
            prop_assert!(!s.rebuilding);
            for p in &placeable {
                // Taken: another shard is there, or reads another shard there while it moves.
                let taken = |o: &&ShardPlacement| {
                    o.target() == TargetRef { rank: p.rank, index: p.index }
                        || o.base_source == Some(TargetRef { rank: p.rank, index: p.index })
                };
                prop_assert!(
                    others.iter().any(taken),
                    "{what}: shard {} stuck on a down target but target {}.{} is free: {g:?}",
                    s.shard,
                    p.rank,
                    p.index
                );
            }
        } else if s.shared_domain {
            for e in map.engines() {
                let has_placeable = map.engine_targets(e).iter().any(|t| t.state.is_placeable());
                prop_assert!(
                    !has_placeable || others.iter().any(|o| o.rank == e.rank || o.base_source.is_some_and(|b| b.rank == e.rank)),
                    "{what}: shard {} shares an engine but engine {} is free: {g:?}",
                    s.shard,
                    e.rank
                );
            }
        }
        if s.state == TargetState::Up {
            prop_assert!(s.rebuilding, "{what}: shard {} on an UP target is read", s.shard);
        }
    }
    prop_assert_eq!(g.shares_domain(), g.shards.iter().any(|s| s.shared_domain));
    Ok(())
}

/// `b` is `layout(map)` with a base: a readable shard is on its base target, placeable, not UP;
/// every shard off its base target (or on an UP target) is rebuilding.
fn check_against_base(map: &PoolMap, oid: ObjectId, g: &Group, class: ObjectClass) -> Result<(), TestCaseError> {
    let base = map.base().unwrap();
    let bg = group_layout(base, oid, g.index, class).unwrap();
    for (s, b) in g.shards.iter().zip(&bg.shards) {
        if s.readable() {
            prop_assert_eq!(s.target(), b.target(), "readable shard {} is off its base target", s.shard);
            prop_assert!(s.state == TargetState::UpIn);
        }
        prop_assert_eq!(s.rebuilding, s.state.is_placeable() && (s.target() != b.target() || s.state == TargetState::Up));
    }
    Ok(())
}

/// The classes the map-change tests run for (the balance tests also use wider ones).
fn lifecycle_class() -> impl Strategy<Value = ObjectClass> {
    prop_oneof![
        Just(ObjectClass::S1),
        Just(ObjectClass::Rp(2)),
        Just(ObjectClass::Rp(3)),
        Just(ObjectClass::Ec { k: 2, p: 1 }),
        Just(ObjectClass::Ec { k: 4, p: 2 }),
    ]
}

/// A settled pool (no DOWN or UP target) of at least `min` engines (up to `min + 5`, sparse
/// ranks, 1..=4 targets each), some targets already DOWNOUT at distinct earlier versions, with
/// itself as its base.
fn settled_pool(min: usize) -> impl Strategy<Value = PoolMap> {
    prop::collection::vec((1u16..=4, prop::collection::vec(0u8..12, 4)), min..=min + 5).prop_map(|engines| {
        let mut targets = Vec::new();
        let mut fseq = 1;
        for (e, (count, fail)) in engines.iter().enumerate() {
            for index in 0..*count {
                let state = if fail[index as usize] == 0 { TargetState::DownOut } else { TargetState::UpIn };
                if state == TargetState::DownOut {
                    fseq += 1;
                }
                targets.push(TargetEntry {
                    rank: (e as u32) * 2 + 3,
                    index,
                    state,
                    fseq: if state.is_placeable() { 0 } else { fseq },
                    added: 0,
                });
            }
        }
        let map = PoolMap::new(fseq + 1, targets).unwrap();
        map.clone().with_base(map)
    })
}

/// A settled map, one class with enough engines for it, an object and which targets fail.
fn lifecycle_case() -> impl Strategy<Value = (PoolMap, ObjectClass, u128, prop::sample::Index, bool, prop::sample::Index)> {
    lifecycle_class().prop_flat_map(|class| {
        (
            settled_pool(class.shards_per_group() as usize),
            Just(class),
            any::<u128>(),
            any::<prop::sample::Index>(),
            any::<bool>(),
            any::<prop::sample::Index>(),
        )
    })
}

fn refs(ts: &[TargetRef], state: TargetState) -> Vec<(TargetRef, TargetState)> {
    ts.iter().map(|&t| (t, state)).collect()
}

/// `after` is `before` with `failed` DOWN and `before` (settled) as its base: only the shards on
/// the failed targets move, exactly those are rebuilding, everything else is as readable as
/// before. Returns the layouts after.
fn check_failure(
    before: &PoolMap,
    after: &PoolMap,
    failed: &[TargetRef],
    class: ObjectClass,
    oid: ObjectId,
) -> Result<Vec<Group>, TestCaseError> {
    let mut out = Vec::new();
    for d in 0..24u64 {
        let a = layout(before, oid, d, class).unwrap();
        let b = layout(after, oid, d, class).unwrap();
        check_group(after, &b, "after a failure")?;
        check_against_base(after, oid, &b, class)?;
        prop_assert_eq!(a.index, b.index);
        for (x, y) in a.shards.iter().zip(&b.shards) {
            prop_assert!(!x.rebuilding, "the map before is settled");
            if failed.contains(&x.target()) {
                if y.target() == x.target() {
                    // Stuck: every placeable target is taken by the group (check_group).
                    prop_assert_eq!(y.state, TargetState::Down);
                } else {
                    prop_assert!(!failed.contains(&y.target()));
                    prop_assert!(y.writable() && y.rebuilding && !y.readable(), "moved shard {:?}", y);
                }
            } else {
                prop_assert_eq!(x.target(), y.target(), "shard {} moved though its target did not fail", x.shard);
                prop_assert!(!y.rebuilding);
                prop_assert_eq!(x.readable(), y.readable());
            }
        }
        out.push(b);
    }
    Ok(out)
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

    /// No two shards of a group on one target; two on one engine, or one on a down target, only
    /// when the group has taken every engine, or every target, that could take it.
    #[test]
    fn never_two_shards_on_one_target(map in pool(), class in class(), oid in any::<u128>()) {
        prop_assume!(map.engines().len() >= class.shards_per_group() as usize);
        for d in 0..64u64 {
            let g = layout(&map, ObjectId(oid), d.wrapping_mul(0x9e37_79b9_7f4a_7c15), class).unwrap();
            check_group(&map, &g, "random pool")?;
        }
    }

    /// The base map decides only `rebuilding`, never where shards go; a readable shard is always
    /// on the target the base layout gives it (and that target is UPIN).
    #[test]
    fn readable_shards_are_on_their_base_target(
        base in pool(),
        class in class(),
        oid in any::<u128>(),
        changes in prop::collection::vec((any::<prop::sample::Index>(), 0u8..4), 0..6),
    ) {
        prop_assume!(base.engines().len() >= class.shards_per_group() as usize);
        let states = [TargetState::Up, TargetState::Down, TargetState::DownOut, TargetState::UpIn];
        let changes: Vec<(TargetRef, TargetState)> = changes
            .iter()
            .map(|(i, s)| {
                let t = i.get(base.targets());
                (TargetRef { rank: t.rank, index: t.index }, states[*s as usize])
            })
            .collect();
        let bare = base.set_states(&changes).unwrap();
        let map = bare.clone().with_base(base.clone());
        for d in 0..32u64 {
            let g = layout(&map, ObjectId(oid), d, class).unwrap();
            let plain = layout(&bare, ObjectId(oid), d, class).unwrap();
            check_group(&map, &g, "with a base")?;
            check_against_base(&map, ObjectId(oid), &g, class)?;
            for (x, y) in g.shards.iter().zip(&plain.shards) {
                prop_assert_eq!((x.target(), x.state, x.moved_from, x.shared_domain), (y.target(), y.state, y.moved_from, y.shared_domain));
            }
        }
    }

    /// A settled map that is its own base has nothing rebuilding.
    #[test]
    fn settled_map_has_nothing_rebuilding(map in settled_pool(1), class in class(), oid in any::<u128>()) {
        prop_assume!(map.engines().len() >= class.shards_per_group() as usize);
        for d in 0..32u64 {
            let g = layout(&map, ObjectId(oid), d, class).unwrap();
            prop_assert!(g.shards.iter().all(|s| !s.rebuilding && s.readable() == s.writable()), "{:?}", g);
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
                    // It moved, or it is stuck there (every placeable target taken) and reported down.
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
            check_group(&after, &b, "engine failure")?;
        }
    }

    /// DOWN -> DOWNOUT (rebuild finished) moves nothing; without a base map only shards on UP
    /// targets are still rebuilding.
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
                prop_assert_eq!(y.rebuilding, y.state == TargetState::Up);
            }
        }
    }

    /// Which shards move, and which are read, through a target's (or an engine's) whole life:
    /// fail, rebuild done, reintegrate, reintegration done, drain.
    #[test]
    fn fail_rebuild_reintegrate_drain((m0, class, oid, pick, whole_engine, pick2) in lifecycle_case()) {
        let oid = ObjectId(oid);
        let placeable = |m: &PoolMap| -> Vec<TargetRef> {
            m.targets().iter().filter(|t| t.state.is_placeable()).map(|t| TargetRef { rank: t.rank, index: t.index }).collect()
        };
        let alive = placeable(&m0);
        prop_assume!(!alive.is_empty());
        let victim = *pick.get(&alive);
        let failed: Vec<TargetRef> = if whole_engine { alive.iter().copied().filter(|t| t.rank == victim.rank).collect() } else { vec![victim] };
        let original: Vec<Group> = (0..24u64).map(|d| layout(&m0, oid, d, class).unwrap()).collect();

        // Fail: the failed targets DOWN, the map before is the base.
        let m1 = m0.set_states(&refs(&failed, TargetState::Down)).unwrap().with_base(m0.clone());
        let after_failure = check_failure(&m0, &m1, &failed, class, oid)?;

        // Rebuild done: DOWN -> DOWNOUT and that map is the new base. Nothing moves, nothing is
        // rebuilding.
        let m2 = m1.set_states(&refs(&failed, TargetState::DownOut)).unwrap();
        let m2 = m2.clone().with_base(m2);
        for (d, b) in after_failure.iter().enumerate() {
            let c = layout(&m2, oid, d as u64, class).unwrap();
            check_group(&m2, &c, "rebuilt")?;
            for (x, y) in b.shards.iter().zip(&c.shards) {
                prop_assert_eq!(x.target(), y.target());
                prop_assert!(!y.rebuilding && y.readable() == y.writable());
            }
        }

        // Reintegrate: DOWNOUT -> UP, the DOWNOUT map stays the base. Shards go back exactly to
        // where they were before the failure: to the reintegrated targets, rebuilding; shards whose
        // natural target it is are on it; nothing readable is off its base target.
        let m3 = m2.set_states(&refs(&failed, TargetState::Up)).unwrap();
        prop_assert_eq!(m3.base(), Some(m2.base().unwrap()));
        for (d, (orig, b)) in original.iter().zip(&after_failure).enumerate() {
            let e = layout(&m3, oid, d as u64, class).unwrap();
            check_group(&m3, &e, "reintegrating")?;
            check_against_base(&m3, oid, &e, class)?;
            for ((o, x), y) in orig.shards.iter().zip(&b.shards).zip(&e.shards) {
                prop_assert_eq!(o.target(), y.target(), "reintegration must restore the layout before the failure");
                prop_assert_eq!((o.moved_from, o.shared_domain), (y.moved_from, y.shared_domain));
                if failed.contains(&y.moved_from.unwrap_or(y.target())) {
                    prop_assert_eq!(y.moved_from, None, "a shard whose natural target is back is on it");
                }
                if x.target() != y.target() {
                    prop_assert!(failed.contains(&y.target()));
                }
                if failed.contains(&y.target()) {
                    prop_assert!(y.rebuilding && !y.readable() && y.writable());
                } else {
                    prop_assert_eq!(x.target(), y.target());
                    prop_assert!(!y.rebuilding);
                    prop_assert_eq!(y.readable(), y.writable());
                }
            }
        }

        // Reintegration done: UP -> UPIN and that map is the new base: nothing rebuilding, the
        // layout of before the failure.
        let m4 = m3.set_states(&refs(&failed, TargetState::UpIn)).unwrap();
        let m4 = m4.clone().with_base(m4);
        for (d, orig) in original.iter().enumerate() {
            let f = layout(&m4, oid, d as u64, class).unwrap();
            check_group(&m4, &f, "reintegrated")?;
            for (o, y) in orig.shards.iter().zip(&f.shards) {
                prop_assert_eq!((o.target(), o.readable(), o.moved_from), (y.target(), y.readable(), y.moved_from));
                prop_assert!(!y.rebuilding);
            }
        }

        // Drain one target (UPIN -> DOWN, the operator's choice): like a failure.
        let alive = placeable(&m4);
        let drained = *pick2.get(&alive);
        let m5 = m4.set_states(&refs(&[drained], TargetState::Down)).unwrap().with_base(m4.clone());
        check_failure(&m4, &m5, &[drained], class, oid)?;
    }

    /// Too few engines for a failed shard to find an engine of its own: it goes to a distinct
    /// target of an engine the group already uses (shared_domain) rather than staying down.
    #[test]
    fn too_few_engines_share_a_domain_rather_than_stay_down(
        class in lifecycle_class(),
        targets in 2u16..=4,
        oid in any::<u128>(),
        pick in any::<prop::sample::Index>(),
    ) {
        let n = class.shards_per_group();
        prop_assume!(n >= 2);
        let m0 = PoolMap::uniform(n, targets).unwrap();
        let m0 = m0.clone().with_base(m0);
        let rank = pick.get(m0.engines()).rank;
        let m1 = m0.set_engine_state(rank, TargetState::Down).unwrap().with_base(m0.clone());
        let failed: Vec<TargetRef> = (0..targets).map(|index| TargetRef { rank, index }).collect();
        let groups = check_failure(&m0, &m1, &failed, class, ObjectId(oid))?;
        for g in &groups {
            // n − 1 engines with at least two targets each hold n shards: nobody is stuck.
            prop_assert_eq!(g.unavailable_count(), 0);
            prop_assert!(g.shares_domain());
            let moved: Vec<&ShardPlacement> = g.shards.iter().filter(|s| s.moved_from.is_some()).collect();
            prop_assert_eq!(moved.len(), 1);
            prop_assert!(moved[0].shared_domain && moved[0].rank != rank && moved[0].rebuilding);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Extending a settled pool with a new engine: no dkey changes group; a shard either stays
    /// (readable, not rebuilding) or moves, and every move is rebuilding; a shard whose new target
    /// is a new one is there because its walk now reaches the new engine; the group keeps at
    /// least k shards it can read (on their targets or at their base sources); once the new
    /// targets are UPIN and that map is the base, the same layout is settled.
    #[test]
    fn extend_moves_shards_onto_the_new_engine(
        (m0, class, oid, _pick, _whole, _pick2) in lifecycle_case(),
        new_targets in 1u16..=4,
    ) {
        let oid = ObjectId(oid);
        let rank = m0.engines().last().unwrap().rank + 7;
        let added: Vec<TargetRef> = (0..new_targets).map(|index| TargetRef { rank, index }).collect();
        let m1 = m0.add_targets(&added).unwrap();
        prop_assert_eq!(m1.version(), m0.version() + 1);
        prop_assert_eq!(m1.group_targets(), m0.group_targets());
        prop_assert_eq!(m1.base(), Some(m0.base().unwrap()));
        prop_assert!(added.iter().all(|t| m1.target(t.rank, t.index).is_some_and(|e| e.state == TargetState::Up && e.fseq == m1.version())));
        let m2 = m1.set_states(&refs(&added, TargetState::UpIn)).unwrap();
        let m2 = m2.clone().with_base(m2);
        for d in 0..24u64 {
            let a = layout(&m0, oid, d, class).unwrap();
            let b = layout(&m1, oid, d, class).unwrap();
            prop_assert_eq!(a.index, b.index, "an extension moved dkey {} to another group", d);
            check_group(&m1, &b, "extending")?;
            check_against_base(&m1, oid, &b, class)?;
            for (x, y) in a.shards.iter().zip(&b.shards) {
                if x.target() == y.target() {
                    prop_assert_eq!(y.rebuilding, false);
                    prop_assert_eq!(x.readable(), y.readable());
                } else {
                    // Only onto the new engine, never between old targets; readable at its old
                    // home (unless it was stuck on a down target) until it is filled.
                    prop_assert_eq!(y.rank, rank, "a shard moved between old targets: {:?} -> {:?}", x, y);
                    prop_assert!(y.writable() && y.rebuilding && !y.readable(), "moved shard {:?}", y);
                    if x.readable() {
                        prop_assert_eq!(y.base_source, Some(x.target()));
                    }
                }
            }
            let sources = b.shards.iter().filter(|s| s.read_from().is_some()).count();
            let before = a.shards.iter().filter(|s| s.readable()).count();
            prop_assert_eq!(sources, before, "extending changed what dkey {} can read: {:?}", d, b);
            let c = layout(&m2, oid, d, class).unwrap();
            check_group(&m2, &c, "extended")?;
            for (y, z) in b.shards.iter().zip(&c.shards) {
                prop_assert_eq!(y.target(), z.target());
                prop_assert!(!z.rebuilding && z.readable() == z.writable());
            }
        }
    }
}

#[test]
fn extend_moves_about_the_new_share_and_rebalances() {
    // 4 engines x 2 targets, EC_2P1, plus a fifth engine of 2 targets: about 2/10 of the shards
    // move, nearly all onto the new engine, and afterwards the load is even again.
    let class = ObjectClass::Ec { k: 2, p: 1 };
    let m0 = PoolMap::uniform(4, 2).unwrap();
    let m0 = m0.clone().with_base(m0);
    let m1 = m0.add_targets(&[TargetRef { rank: 4, index: 0 }, TargetRef { rank: 4, index: 1 }]).unwrap();
    let (mut shards, mut moved, mut onto_new, mut short) = (0u64, 0u64, 0u64, 0u64);
    assert_eq!(group_count(&m1, class), group_count(&m0, class));
    for d in 0..6_000u64 {
        let a = layout(&m0, ObjectId(7), d, class).unwrap();
        let b = layout(&m1, ObjectId(7), d, class).unwrap();
        for (x, y) in a.shards.iter().zip(&b.shards) {
            shards += 1;
            if x.target() != y.target() {
                moved += 1;
                onto_new += u64::from(y.rank == 4);
            }
        }
        short += u64::from(b.shards.iter().filter(|s| s.read_from().is_some()).count() < b.shards.len());
    }
    let frac = moved as f64 / shards as f64;
    eprintln!("extend 4x2 -> 5x2 EC_2P1: {moved}/{shards} shards move ({:.1}%), {onto_new} onto the new engine", frac * 100.0);
    // The new engine's fair share is 2/10 of the shards: that much moves, all of it onto it, and
    // every group keeps every shard readable meanwhile.
    assert!((0.17..=0.23).contains(&frac), "{frac}");
    assert_eq!((onto_new, short), (moved, 0));
    let m2 = m1.set_engine_state(4, TargetState::UpIn).unwrap();
    assert_balanced(&engine_counts(&m2, class, 12_000, 1), 0.15, "5x2 EC_2P1 after extending 4x2");
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
