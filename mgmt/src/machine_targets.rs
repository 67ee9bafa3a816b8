//! Commands that change which targets serve a pool: engines registering and going down,
//! exclude, drain, reintegrate, extend, and a rebuild's completion; and the pool-map helpers
//! they share (placement map, base map, epoch floors). Part of [`super`]'s pure state machine.

use super::*;

/// The placement map of `p`'s current targets.
pub(super) fn placement_map(p: &PoolRec) -> Result<PoolMap, CmdError> {
    let targets = p
        .targets
        .iter()
        .map(|t| TargetEntry { rank: t.rank, index: t.index, state: to_placement(t.state), fseq: t.fseq, added: t.added })
        .collect();
    let m = PoolMap::new(p.map_version, targets);
    let m = match p.group_targets {
        0 => m,
        n => m.and_then(|m| m.with_group_targets(n)),
    };
    m.map_err(|e| CmdError::Internal(format!("pool {}: {e}", p.name)))
}

/// Stores `m` as `p`'s map. A placement map carries no epoch floors or drain marks: each target
/// keeps its own.
pub(super) fn store_map(p: &mut PoolRec, m: &PoolMap) {
    let kept: BTreeMap<(u32, u16), (u64, bool)> = p.targets.iter().map(|t| ((t.rank, t.index), (t.since_epoch, t.drained))).collect();
    p.map_version = m.version();
    p.targets = m
        .targets()
        .iter()
        .map(|t| {
            let (since_epoch, drained) = kept.get(&(t.rank, t.index)).copied().unwrap_or_default();
            PoolTarget { rank: t.rank, index: t.index, state: to_api(t.state), fseq: t.fseq, since_epoch, drained, added: t.added }
        })
        .collect();
}

/// One new map version of `p` with `changes` applied. A settled map is the base: it is
/// recorded as such before the change (records stored before rebuilds existed have no base),
/// and a change that leaves the map settled (rebuild done) makes the new map the base.
pub(super) fn set_states(p: &mut PoolRec, changes: &[(TargetRef, TargetState)]) -> Result<(), CmdError> {
    if p.settled() {
        p.base_version = p.map_version;
        p.base_targets = p.targets.clone();
    }
    let m = placement_map(p)?.set_states(changes).map_err(|e| CmdError::Internal(format!("pool {}: {e}", p.name)))?;
    store_map(p, &m);
    if p.settled() {
        p.base_version = p.map_version;
        p.base_targets = p.targets.clone();
    }
    Ok(())
}

pub(super) fn target_mut(p: &mut PoolRec, t: TargetRef) -> Option<&mut PoolTarget> {
    p.targets.iter_mut().find(|x| x.rank == t.rank && x.index == t.index)
}

/// The epoch floor of `t` when it goes DOWN now. A target that failed again while being
/// reintegrated keeps the smaller floor; one being filled from scratch (floor 0) stays at 0,
/// since it never held what came before.
pub(super) fn down_floor(t: &PoolTarget, floor: u64) -> u64 {
    match (t.state, t.since_epoch) {
        (TargetStateName::Up, 0) => 0,
        (_, 0) => floor,
        (_, since) => since.min(floor),
    }
}

pub(super) fn target_ref(t: &PoolTarget) -> TargetRef {
    TargetRef { rank: t.rank, index: t.index }
}

// ---------------------------------------------------------------------------------------------
// Engines.

pub(super) fn register_engine(s: &mut State, req: &RegisterEngine, reintegrate: bool) -> Result<Outcome, CmdError> {
    parse_addr("engine address", &req.address)?;
    if req.uuid.is_nil() {
        return invalid("engine uuid must not be nil");
    }
    if req.targets == 0 {
        return invalid("an engine needs at least one target");
    }
    if req.target_capacity == 0 {
        return invalid("target_capacity must be positive");
    }
    let fault_domain = if req.fault_domain.is_empty() { format!("rank-{}", req.rank) } else { req.fault_domain.clone() };
    if fault_domain.len() > 64 || !fault_domain.chars().all(|c| c.is_ascii_graphic()) {
        return invalid(format!(
            "fault domain {:?} must be 1 to 64 printable characters without spaces",
            fault_domain.escape_debug().to_string()
        ));
    }
    let mut replaced = None;
    if let Some(e) = s.engines.get(&req.rank) {
        if e.uuid != req.uuid {
            if e.state == EngineState::Up {
                return conflict(format!("rank {} is bound to engine {} which is up, not {}", req.rank, e.uuid, req.uuid));
            }
            // The bound engine is Down: this is its replacement, with an empty data directory.
            replaced = Some(e.uuid);
        }
    }
    if let Some(other) = s.engines.values().find(|e| e.uuid == req.uuid && e.rank != req.rank) {
        return conflict(format!("engine {} is already registered as rank {}", req.uuid, other.rank));
    }
    for p in s.pools.values() {
        if let Some(t) = p.targets.iter().filter(|t| t.rank == req.rank).max_by_key(|t| t.index) {
            if t.index >= req.targets {
                return conflict(format!(
                    "engine rank {} has target {} in pool {}: it cannot register with only {} targets",
                    req.rank, t.index, p.name, req.targets
                ));
            }
        }
    }
    s.engines.insert(
        req.rank,
        EngineRec {
            rank: req.rank,
            uuid: req.uuid,
            address: req.address.clone(),
            fault_domain,
            targets: req.targets,
            target_capacity: req.target_capacity,
            state: EngineState::Up,
        },
    );
    let mut reintegrated = Vec::new();
    for p in s.pools.values_mut() {
        let mine = |t: &&PoolTarget| t.rank == req.rank;
        if !p.targets.iter().any(|t| mine(&t)) {
            continue;
        }
        // A replacement holds nothing: whatever comes back onto it is a full rebuild.
        let wiped = replaced.is_some() && p.targets.iter().filter(mine).any(|t| t.since_epoch != 0);
        let back: Vec<TargetRef> = if reintegrate {
            p.targets
                .iter()
                .filter(mine)
                .filter(|t| matches!(t.state, TargetStateName::Down | TargetStateName::DownOut) && !t.drained)
                .map(target_ref)
                .collect()
        } else {
            Vec::new()
        };
        if back.is_empty() && !wiped {
            continue;
        }
        let changes: Vec<_> = back.iter().map(|&t| (t, TargetState::Up)).collect();
        set_states(p, &changes)?;
        if replaced.is_some() {
            p.targets.iter_mut().filter(|t| t.rank == req.rank).for_each(|t| t.since_epoch = 0);
        }
        if !back.is_empty() {
            reintegrated.push((p.name.clone(), p.map_version));
        }
    }
    Ok(Outcome::Registered { rank: req.rank, replaced, reintegrated })
}

pub(super) fn engines_down(s: &mut State, ranks: &[u32], env: &Env) -> Result<Outcome, CmdError> {
    let ranks: BTreeSet<u32> = ranks.iter().copied().filter(|r| s.engines.contains_key(r)).collect();
    let mut marked = BTreeSet::new();
    for r in &ranks {
        if let Some(e) = s.engines.get_mut(r) {
            if e.state == EngineState::Up {
                e.state = EngineState::Down;
                marked.insert(*r);
            }
        }
    }
    for p in s.pools.values_mut() {
        let floors: Vec<(TargetRef, u64)> = p
            .targets
            .iter()
            .filter(|t| ranks.contains(&t.rank) && to_placement(t.state).is_placeable())
            .map(|t| (target_ref(t), down_floor(t, env.epoch_floor)))
            .collect();
        if floors.is_empty() {
            continue;
        }
        marked.extend(floors.iter().map(|(t, _)| t.rank));
        take_down(p, &floors, false)?;
    }
    Ok(Outcome::MarkedDown(marked.into_iter().collect()))
}

/// One new map version in which these targets are DOWN with these floors (and drained marks).
pub(super) fn take_down(p: &mut PoolRec, floors: &[(TargetRef, u64)], drained: bool) -> Result<(), CmdError> {
    let changes: Vec<_> = floors.iter().map(|&(t, _)| (t, TargetState::Down)).collect();
    set_states(p, &changes)?;
    for &(t, since) in floors {
        if let Some(x) = target_mut(p, t) {
            x.since_epoch = since;
            x.drained = drained;
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Exclude, drain, reintegrate, rebuild completion.

/// The targets `sel` names in pool `p` (404 if the pool has none such) and of those the ones in
/// a state that `fits` (409 if a named target does not fit, or none of the engine's does).
pub(super) fn select(
    p: &PoolRec,
    sel: &TargetSelector,
    what: &str,
    fits: impl Fn(TargetStateName) -> bool,
) -> Result<Vec<PoolTarget>, CmdError> {
    let named: Vec<&PoolTarget> = p.targets.iter().filter(|t| t.rank == sel.rank && sel.target.is_none_or(|i| i == t.index)).collect();
    if named.is_empty() {
        return Err(CmdError::NoTarget(match sel.target {
            Some(i) if p.targets.iter().any(|t| t.rank == sel.rank) => format!("pool {} has no target {}:{i}", p.name, sel.rank),
            _ => format!("pool {} has no targets on engine rank {}", p.name, sel.rank),
        }));
    }
    let fitting: Vec<PoolTarget> = named.iter().filter(|t| fits(t.state)).map(|t| **t).collect();
    if fitting.is_empty() {
        let states: BTreeSet<&str> = named.iter().map(|t| to_placement(t.state).as_str()).collect();
        let states = states.into_iter().collect::<Vec<_>>().join("/");
        return conflict(match sel.target {
            Some(i) => format!("target {}:{i} of pool {} is {states}: {what}", sel.rank, p.name),
            None => format!("the targets of engine rank {} in pool {} are {states}: {what}", sel.rank, p.name),
        });
    }
    Ok(fitting)
}

pub(super) fn get_pool_mut<'a>(s: &'a mut State, pool: &str) -> Result<&'a mut PoolRec, CmdError> {
    s.pools.get_mut(pool).ok_or_else(|| CmdError::NoPool(pool.to_string()))
}

pub(super) fn changed(p: &PoolRec, targets: &[PoolTarget]) -> Outcome {
    Outcome::TargetsChanged { pool: p.name.clone(), version: p.map_version, targets: targets.iter().map(target_ref).collect() }
}

pub(super) fn exclude(s: &mut State, pool: &str, sel: &TargetSelector, env: &Env) -> Result<Outcome, CmdError> {
    let p = get_pool_mut(s, pool)?;
    let ts = select(p, sel, "only UPIN or UP targets can be excluded", |st| to_placement(st).is_placeable())?;
    let floors: Vec<_> = ts.iter().map(|t| (target_ref(t), down_floor(t, env.epoch_floor))).collect();
    take_down(p, &floors, false)?;
    Ok(changed(p, &ts))
}

pub(super) fn drain(s: &mut State, pool: &str, sel: &TargetSelector) -> Result<Outcome, CmdError> {
    let p = get_pool_mut(s, pool)?;
    let ts = select(p, sel, "only UPIN targets can be drained", |st| st == TargetStateName::UpIn)?;
    // A drained target's data is deleted: it never comes back incrementally.
    let floors: Vec<_> = ts.iter().map(|t| (target_ref(t), 0)).collect();
    take_down(p, &floors, true)?;
    Ok(changed(p, &ts))
}

pub(super) fn reintegrate(s: &mut State, pool: &str, sel: &TargetSelector) -> Result<Outcome, CmdError> {
    let engine_down = s.engines.get(&sel.rank).is_some_and(|e| e.state == EngineState::Down);
    let p = get_pool_mut(s, pool)?;
    let ts = select(p, sel, "only DOWN or DOWNOUT targets can be reintegrated", |st| {
        matches!(st, TargetStateName::Down | TargetStateName::DownOut)
    })?;
    if engine_down {
        return conflict(format!("engine rank {} is down: it must be up to be reintegrated", sel.rank));
    }
    let changes: Vec<_> = ts.iter().map(|t| (target_ref(t), TargetState::Up)).collect();
    set_states(p, &changes)?;
    for t in &ts {
        if let Some(x) = target_mut(p, target_ref(t)) {
            if x.drained {
                // Its data was deleted: a full rebuild onto it.
                x.since_epoch = 0;
                x.drained = false;
            }
        }
    }
    Ok(changed(p, &ts))
}

/// Most engines one extension adds.
pub const MAX_EXTEND_RANKS: usize = 1024;

pub(super) fn extend(s: &mut State, pool: &str, ranks: &[u32]) -> Result<Outcome, CmdError> {
    if ranks.is_empty() {
        return invalid("name at least one engine rank to add");
    }
    if ranks.len() > MAX_EXTEND_RANKS {
        return invalid(format!("at most {MAX_EXTEND_RANKS} engines can be added at once"));
    }
    let mut seen = BTreeSet::new();
    let mut added = Vec::new();
    {
        let p = get_pool(s, pool)?;
        for &r in ranks {
            if !seen.insert(r) {
                return invalid(format!("rank {r} is listed twice"));
            }
            let e = s.engines.get(&r).ok_or(CmdError::NoEngine(r))?;
            if e.state == EngineState::Down {
                return conflict(format!("engine rank {r} is down: it must be up to join pool {pool}"));
            }
            if p.targets.iter().any(|t| t.rank == r) {
                return conflict(format!("engine rank {r} already serves pool {pool}"));
            }
            added.extend((0..e.targets).map(|index| TargetRef { rank: r, index }));
        }
        if !p.settled() {
            return conflict(format!(
                "pool {pool} is rebuilding (map version {} is not settled): extend it once `tessera pool query {pool}` shows the rebuild idle",
                p.map_version
            ));
        }
    }
    let p = get_pool_mut(s, pool)?;
    let m = placement_map(p)?.add_targets(&added).map_err(|e| CmdError::Internal(format!("pool {pool}: {e}")))?;
    // The settled map before is the base: the moved shards are read there until they are filled.
    p.base_version = p.map_version;
    p.base_targets = p.targets.clone();
    p.group_targets = m.group_targets();
    store_map(p, &m);
    Ok(Outcome::TargetsChanged { pool: p.name.clone(), version: p.map_version, targets: added })
}

pub(super) fn expire_floors(s: &mut State, below: u64) -> Result<Outcome, CmdError> {
    let mut expired = Vec::new();
    for p in s.pools.values_mut() {
        let old: Vec<TargetRef> = p
            .targets
            .iter()
            .filter(|t| t.state == TargetStateName::DownOut && t.since_epoch > 0 && t.since_epoch < below)
            .map(target_ref)
            .collect();
        if old.is_empty() {
            continue;
        }
        for &t in &old {
            if let Some(x) = target_mut(p, t) {
                x.since_epoch = 0;
            }
        }
        // A new version (same states): engines run a pass and release the aggregation hold.
        set_states(p, &[])?;
        expired.push((p.name.clone(), p.map_version, old));
    }
    Ok(Outcome::FloorsExpired(expired))
}

pub(super) fn rebuild_done(s: &mut State, pool: &str, version: u32) -> Result<Outcome, CmdError> {
    let p = get_pool_mut(s, pool)?;
    let noop = Outcome::RebuildDone { pool: pool.to_string(), version: None };
    if p.map_version != version || p.settled() {
        return Ok(noop);
    }
    let changes: Vec<_> = p
        .targets
        .iter()
        .filter_map(|t| match t.state {
            TargetStateName::Down => Some((target_ref(t), TargetState::DownOut)),
            TargetStateName::Up => Some((target_ref(t), TargetState::UpIn)),
            _ => None,
        })
        .collect();
    set_states(p, &changes)?;
    for t in p.targets.iter_mut().filter(|t| t.state == TargetStateName::UpIn) {
        t.since_epoch = 0;
        t.drained = false;
    }
    // The map is settled now: set_states made it the base; refresh it with the floors cleared.
    p.base_targets = p.targets.clone();
    Ok(Outcome::RebuildDone { pool: pool.to_string(), version: Some(p.map_version) })
}
