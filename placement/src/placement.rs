//! Algorithmic placement: where the shards of an object's redundancy group live.
//!
//! There is no per-object table. The layout of a dkey is a pure function of the pool map, the
//! object id, the dkey and the object class ([`layout`]); every client computes the same answer.
//! `docs/PLACEMENT.md` explains the algorithm and what moves when a target fails.
//!
//! In short:
//!
//! 1. The dkey picks one of [`group_count`] redundancy groups by jump consistent hash
//!    (Lamping & Veach). The number of groups depends only on the number of targets in the pool
//!    (256 per target, divided by the shards per group), never on their states, so a failure does
//!    not reshuffle dkeys.
//! 2. Each shard of the group has its own pseudo-random *walk* over the pool map, seeded by
//!    (object, group, shard): step `i` picks an engine by jump hash, then a target of that
//!    engine by jump hash. The group's *natural* layout takes, shard by shard, the first step
//!    whose engine no earlier shard of the group uses. It ignores target states.
//! 3. Failures are replayed in the order they happened (the pool map version at which each
//!    target left the UP states, [`TargetEntry::fseq`]): a shard whose target failed walks again
//!    and takes the first step on a target that was still alive at that time and on an engine no
//!    other shard of the group occupies; if there is none (too few engines left), the first step
//!    on a target that was alive then and that no other shard of the group occupies (the group
//!    then has two shards in one fault domain, [`ShardPlacement::shared_domain`]). Nothing else
//!    moves, so when one target fails only the shards that were on it move. A shard that finds no
//!    target at all (every placeable target is taken by the group) stays where it was and the
//!    layout reports it unavailable: I/O on that group is degraded.
//! 4. A shard is *rebuilding* (written, not read) when its data is not there yet. A map may carry
//!    a *base map* ([`PoolMap::with_base`]), the last settled map: a shard is rebuilding when its
//!    target differs from the base layout's or is `Up` (being reintegrated). So a shard is
//!    readable only on the target where the base layout put it.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use tessera_engine_proto::ObjectId;

/// The state of a target in the pool map (the DAOS states).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TargetState {
    /// Up, being (re)integrated: shards are placed on it and written, but it does not hold their
    /// older data yet, so a shard on it is always `rebuilding` (not read).
    Up,
    /// Failed; the data it held is being rebuilt elsewhere. Never serves I/O.
    Down,
    /// Failed and its data has been rebuilt elsewhere (out of the pool). Never serves I/O.
    DownOut,
    /// Up and in: the normal, healthy state.
    UpIn,
}

impl TargetState {
    /// Whether shards may be placed on (and read from) a target in this state: `Up` or `UpIn`.
    pub fn is_placeable(self) -> bool {
        matches!(self, TargetState::Up | TargetState::UpIn)
    }

    /// The state's name in the management API: `UP`, `DOWN`, `DOWNOUT`, `UPIN`.
    pub fn as_str(self) -> &'static str {
        match self {
            TargetState::Up => "UP",
            TargetState::Down => "DOWN",
            TargetState::DownOut => "DOWNOUT",
            TargetState::UpIn => "UPIN",
        }
    }
}

impl fmt::Display for TargetState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for TargetState {
    type Err = PlacementError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_uppercase().as_str() {
            "UP" => Ok(TargetState::Up),
            "DOWN" => Ok(TargetState::Down),
            "DOWNOUT" => Ok(TargetState::DownOut),
            "UPIN" => Ok(TargetState::UpIn),
            _ => Err(PlacementError::BadTargetState(s.to_string())),
        }
    }
}

/// One target of the pool: target `index` of the engine with `rank`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TargetEntry {
    /// The engine's rank (its fault domain).
    pub rank: u32,
    /// The target's index inside its engine.
    pub index: u16,
    /// Its state.
    pub state: TargetState,
    /// The pool map version at which the target last entered or left the placeable states
    /// ("failure sequence"). For a
    /// target that is not placeable it orders the failures: placement replays them in this order
    /// (ties by rank, index), so an older failure's remapping never depends on a newer one.
    /// [`PoolMap::set_state`] maintains it.
    pub fseq: u32,
    /// The pool map version at which the target joined the pool: 0 for the pool's first
    /// targets, the extension's version for a target added later ([`PoolMap::add_targets`]).
    /// Placement replays extensions in this order, like failures.
    pub added: u32,
}

/// A target's address: engine rank and target index.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TargetRef {
    /// Engine rank.
    pub rank: u32,
    /// Target index inside the engine.
    pub index: u16,
}

/// An engine (fault domain) of the pool map and the range of its targets in
/// [`PoolMap::targets`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EngineEntry {
    /// The engine's rank.
    pub rank: u32,
    /// First target of this engine in [`PoolMap::targets`].
    first: usize,
    /// Number of targets.
    count: usize,
}

impl EngineEntry {
    /// Number of targets of this engine in the pool.
    pub fn target_count(&self) -> usize {
        self.count
    }
}

/// A versioned pool map: the pool's engines (fault domains) and targets with their states.
/// Targets are kept sorted by (rank, index); engines sorted by rank.
///
/// A map may carry a *base map* ([`PoolMap::with_base`]): the last settled map, in which every
/// shard's data is where that map's layout puts it. The base decides which shards are
/// `rebuilding`; it never changes where shards are placed. Equality compares the bases too.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PoolMap {
    version: u32,
    engines: Vec<EngineEntry>,
    targets: Vec<TargetEntry>,
    /// The number of targets [`group_count`] is computed from: the pool's size when it was
    /// created, kept when it grows, so that an extension never moves a dkey to another group.
    group_targets: u32,
    /// The pool as it was after each extension (the first: as created), for the walks.
    views: Arc<[WalkView]>,
    base: Option<Arc<PoolMap>>,
}

/// The targets a shard's walk ranges over: the pool as it was at map version `level` (targets
/// added at or before it). Engines are ordered by (the version they joined, rank) and each
/// engine's targets by (version joined, index), so that every extension appends jump-hash
/// buckets and a walk step either stays where it was or moves to something added.
#[derive(Debug, PartialEq, Eq)]
struct WalkView {
    level: u32,
    /// Per engine, positions of its targets in [`PoolMap::targets`].
    engines: Vec<Vec<usize>>,
    /// Every target of the view, positions in [`PoolMap::targets`], ascending.
    all: Vec<usize>,
}

impl WalkView {
    /// The walk views of sorted `targets`: one per distinct `added` version.
    fn of(targets: &[TargetEntry]) -> Vec<WalkView> {
        let levels: BTreeSet<u32> = targets.iter().map(|t| t.added).collect();
        levels
            .into_iter()
            .map(|level| {
                let all: Vec<usize> = (0..targets.len()).filter(|&i| targets[i].added <= level).collect();
                let mut engines: BTreeMap<u32, Vec<usize>> = BTreeMap::new();
                for &i in &all {
                    engines.entry(targets[i].rank).or_default().push(i);
                }
                let mut engines: Vec<(u32, u32, Vec<usize>)> = engines
                    .into_iter()
                    .map(|(rank, mut ts)| {
                        ts.sort_by_key(|&i| (targets[i].added, targets[i].index));
                        let joined = ts.iter().map(|&i| targets[i].added).min().unwrap_or(0);
                        (joined, rank, ts)
                    })
                    .collect();
                engines.sort_by_key(|e| (e.0, e.1));
                WalkView { level, engines: engines.into_iter().map(|e| e.2).collect(), all }
            })
            .collect()
    }
}

impl PoolMap {
    /// A pool map of `targets` (in any order). Errors if it is empty or a (rank, index) pair
    /// appears twice.
    /// Its groups are counted from all of these targets ([`PoolMap::with_group_targets`] sets
    /// another basis).
    pub fn new(version: u32, mut targets: Vec<TargetEntry>) -> Result<PoolMap, PlacementError> {
        if targets.is_empty() {
            return Err(PlacementError::EmptyPool);
        }
        targets.sort_by_key(|t| (t.rank, t.index));
        let engines = Self::engines_of(&targets)?;
        let group_targets = u32::try_from(targets.len()).map_err(|_| PlacementError::TooManyTargets)?;
        let views = WalkView::of(&targets).into();
        Ok(PoolMap { version, engines, targets, group_targets, views, base: None })
    }

    /// The engines of sorted `targets`; errors on a duplicate.
    fn engines_of(targets: &[TargetEntry]) -> Result<Vec<EngineEntry>, PlacementError> {
        let mut engines: Vec<EngineEntry> = Vec::new();
        for (i, t) in targets.iter().enumerate() {
            if i > 0 && targets[i - 1].rank == t.rank && targets[i - 1].index == t.index {
                return Err(PlacementError::DuplicateTarget { rank: t.rank, index: t.index });
            }
            match engines.last_mut() {
                Some(e) if e.rank == t.rank => e.count += 1,
                _ => engines.push(EngineEntry { rank: t.rank, first: i, count: 1 }),
            }
        }
        Ok(engines)
    }

    /// This map with its groups counted from `n` targets (the pool's size when it was created;
    /// see [`group_count`]). `n` must be 1 up to the number of targets.
    pub fn with_group_targets(mut self, n: u32) -> Result<PoolMap, PlacementError> {
        if n == 0 || n as usize > self.targets.len() {
            return Err(PlacementError::BadGroupTargets { group_targets: n, targets: self.targets.len() });
        }
        self.group_targets = n;
        Ok(self)
    }

    /// The number of targets [`group_count`] is computed from.
    pub fn group_targets(&self) -> u32 {
        self.group_targets
    }

    /// A new map, one version later, with `new` targets added (the pool is *extended*): each
    /// `Up` (being filled) with the new version as its `fseq`. The group count and the base map
    /// stay, so only shards whose walks now reach the new targets move. Errors if `new` is empty
    /// or names a target the map has.
    pub fn add_targets(&self, new: &[TargetRef]) -> Result<PoolMap, PlacementError> {
        if new.is_empty() {
            return Err(PlacementError::NothingToAdd);
        }
        let version = self.version.checked_add(1).ok_or(PlacementError::VersionOverflow)?;
        let mut targets = self.targets.clone();
        targets.extend(new.iter().map(|t| TargetEntry {
            rank: t.rank,
            index: t.index,
            state: TargetState::Up,
            fseq: version,
            added: version,
        }));
        targets.sort_by_key(|t| (t.rank, t.index));
        u32::try_from(targets.len()).map_err(|_| PlacementError::TooManyTargets)?;
        let engines = Self::engines_of(&targets)?;
        let views = WalkView::of(&targets).into();
        Ok(PoolMap { version, engines, targets, group_targets: self.group_targets, views, base: self.base.clone() })
    }

    /// A pool of `engines` engines (ranks 0..engines) with `targets_per_engine` targets each, all
    /// `UpIn`, at version 1.
    pub fn uniform(engines: u32, targets_per_engine: u16) -> Result<PoolMap, PlacementError> {
        let targets = (0..engines)
            .flat_map(|rank| {
                (0..targets_per_engine).map(move |index| TargetEntry { rank, index, state: TargetState::UpIn, fseq: 0, added: 0 })
            })
            .collect();
        PoolMap::new(1, targets)
    }

    /// The map's version.
    pub fn version(&self) -> u32 {
        self.version
    }

    /// This map with `base` as its base map: the last *settled* map (no target `Down` or `Up`;
    /// every shard's data is where the base layout puts it). With a base, a shard is
    /// [`rebuilding`](ShardPlacement::rebuilding) when its target differs from the one the base
    /// layout gives it, or is `Up`. The base's own base is dropped. The base may have fewer
    /// targets (the pool was extended since); one with another group count
    /// ([`PoolMap::group_targets`]) is kept but ignored by [`group_layout`].
    pub fn with_base(mut self, mut base: PoolMap) -> PoolMap {
        base.base = None;
        self.base = Some(Arc::new(base));
        self
    }

    /// The base map, if one was attached with [`PoolMap::with_base`]. [`PoolMap::set_state`]
    /// and friends keep it.
    pub fn base(&self) -> Option<&PoolMap> {
        self.base.as_deref()
    }

    /// The engines, sorted by rank.
    pub fn engines(&self) -> &[EngineEntry] {
        &self.engines
    }

    /// The targets, sorted by (rank, index).
    pub fn targets(&self) -> &[TargetEntry] {
        &self.targets
    }

    /// The targets of one engine.
    pub fn engine_targets(&self, e: &EngineEntry) -> &[TargetEntry] {
        &self.targets[e.first..e.first + e.count]
    }

    /// The target with this address.
    pub fn target(&self, rank: u32, index: u16) -> Option<&TargetEntry> {
        self.position(rank, index).map(|i| &self.targets[i])
    }

    fn position(&self, rank: u32, index: u16) -> Option<usize> {
        self.targets.binary_search_by_key(&(rank, index), |t| (t.rank, t.index)).ok()
    }

    /// A new map, one version later, in which target (rank, index) has `state`; its `fseq` becomes
    /// the new version if the target entered or left the placeable states. The base map, if any,
    /// is kept. Errors if there is no such target.
    pub fn set_state(&self, rank: u32, index: u16, state: TargetState) -> Result<PoolMap, PlacementError> {
        self.set_states(&[(TargetRef { rank, index }, state)])
    }

    /// A new map, one version later, with several targets' states changed at once (an engine
    /// failure takes all its targets down in one version).
    pub fn set_states(&self, changes: &[(TargetRef, TargetState)]) -> Result<PoolMap, PlacementError> {
        let mut m = self.clone();
        m.version = self.version.checked_add(1).ok_or(PlacementError::VersionOverflow)?;
        for &(t, state) in changes {
            let i = m.position(t.rank, t.index).ok_or(PlacementError::NoSuchTarget { rank: t.rank, index: t.index })?;
            let was = m.targets[i].state;
            m.targets[i].state = state;
            // The failure sequence records when a target entered or left the placeable states;
            // DOWN -> DOWNOUT (rebuild finished) or UP -> UPIN keep it, so the order in which
            // failures are replayed never changes after the fact.
            if was.is_placeable() != state.is_placeable() {
                m.targets[i].fseq = m.version;
            }
        }
        Ok(m)
    }

    /// A new map, one version later, with every target of engine `rank` in `state`.
    pub fn set_engine_state(&self, rank: u32, state: TargetState) -> Result<PoolMap, PlacementError> {
        let changes: Vec<_> = self.targets.iter().filter(|t| t.rank == rank).map(|t| (TargetRef { rank, index: t.index }, state)).collect();
        if changes.is_empty() {
            return Err(PlacementError::NoSuchEngine(rank));
        }
        self.set_states(&changes)
    }
}

/// An object class: how many shards a redundancy group has and what they hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ObjectClass {
    /// One shard, no redundancy.
    S1,
    /// `n` full replicas (`RP_n`, 2 ≤ n ≤ [`ObjectClass::MAX_SHARDS`]).
    Rp(u32),
    /// Reed-Solomon erasure code with `k` data and `p` parity cells per stripe (`EC_<k>P<p>`,
    /// k ≥ 2, p ≥ 1, k + p ≤ [`ObjectClass::MAX_SHARDS`]).
    Ec {
        /// Data shards.
        k: u32,
        /// Parity shards.
        p: u32,
    },
}

impl ObjectClass {
    /// Largest number of shards in a group.
    pub const MAX_SHARDS: u32 = 64;

    /// Shards in one redundancy group.
    pub fn shards_per_group(self) -> u32 {
        match self {
            ObjectClass::S1 => 1,
            ObjectClass::Rp(n) => n,
            ObjectClass::Ec { k, p } => k + p,
        }
    }

    /// Shards that hold distinct data: 1 for S1 and replication, k for EC.
    pub fn data_shards(self) -> u32 {
        match self {
            ObjectClass::S1 | ObjectClass::Rp(_) => 1,
            ObjectClass::Ec { k, .. } => k,
        }
    }

    /// Redundant shards: 0 for S1, n − 1 for `RP_n`, p for EC. Also the number of shard losses
    /// a group survives.
    pub fn parity_shards(self) -> u32 {
        self.shards_per_group() - self.data_shards()
    }

    /// Whether this is an erasure-coded class.
    pub fn is_ec(self) -> bool {
        matches!(self, ObjectClass::Ec { .. })
    }
}

impl fmt::Display for ObjectClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ObjectClass::S1 => f.write_str("S1"),
            ObjectClass::Rp(n) => write!(f, "RP_{n}"),
            ObjectClass::Ec { k, p } => write!(f, "EC_{k}P{p}"),
        }
    }
}

impl FromStr for ObjectClass {
    type Err = PlacementError;

    /// Parses `S1`, `RP_<n>` or `EC_<k>P<p>` (case-insensitive).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || PlacementError::BadObjectClass(s.to_string());
        let u = s.to_ascii_uppercase();
        let num = |t: &str| -> Result<u32, PlacementError> {
            if t.is_empty() || t.len() > 3 || !t.bytes().all(|b| b.is_ascii_digit()) {
                return Err(bad());
            }
            t.parse().map_err(|_| bad())
        };
        let class = if u == "S1" {
            ObjectClass::S1
        } else if let Some(n) = u.strip_prefix("RP_") {
            let n = num(n)?;
            if !(2..=Self::MAX_SHARDS).contains(&n) {
                return Err(bad());
            }
            ObjectClass::Rp(n)
        } else if let Some(rest) = u.strip_prefix("EC_") {
            let (k, p) = rest.split_once('P').ok_or_else(bad)?;
            let (k, p) = (num(k)?, num(p)?);
            if k < 2 || p < 1 || k + p > Self::MAX_SHARDS {
                return Err(bad());
            }
            ObjectClass::Ec { k, p }
        } else {
            return Err(bad());
        };
        Ok(class)
    }
}

/// Where one shard of a group lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ShardPlacement {
    /// Shard number inside the group: for EC, `0..k` are data and `k..k+p` parity; for
    /// replication every shard is a full replica.
    pub shard: u32,
    /// Engine rank.
    pub rank: u32,
    /// Target index inside the engine.
    pub target_index: u16,
    /// The state of that target. Not placeable (`Down`/`DownOut`) only when the shard could not be
    /// moved anywhere (every placeable target is taken by the group): the shard is unavailable.
    pub state: TargetState,
    /// The shard's natural target, if the shard was moved away from it by a failure.
    pub moved_from: Option<TargetRef>,
    /// The shard's target does not hold its older data yet: write there, but read older data
    /// from the group's other shards. With a base map ([`PoolMap::with_base`]): the target is
    /// placeable and differs from the base layout's target of this shard, or is `Up`. Without
    /// one: the target is placeable and either `Up` (being reintegrated) or the target the shard
    /// last left is `Down` (not yet `DownOut`, rebuilt).
    pub rebuilding: bool,
    /// Another shard of the group is on the same engine (fault domain): the group survives fewer
    /// engine losses than its class promises until the pool has enough engines again. Only set
    /// when a failed shard found no target on an engine the group does not use.
    pub shared_domain: bool,
    /// While the shard is rebuilding: its target in the base layout, if that target is still
    /// `UpIn` and no other shard of the group is placed on it now. It still holds the shard's
    /// data, so reads go there and writes go there too (as well as to the new target) until the
    /// rebuild completes: a reintegration or a cascade of moves never leaves the group with
    /// fewer readable shards than before.
    pub base_source: Option<TargetRef>,
}

impl ShardPlacement {
    /// Where this shard's data can be read now: its target when readable, else its base source.
    pub fn read_from(&self) -> Option<TargetRef> {
        if self.readable() {
            Some(self.target())
        } else {
            self.base_source
        }
    }

    /// The placement reads use: a rebuilding shard with a base source stands at its base target
    /// (readable there); anything else as it is.
    pub fn for_reads(&self) -> ShardPlacement {
        match (self.readable(), self.base_source) {
            (false, Some(b)) => ShardPlacement {
                rank: b.rank,
                target_index: b.index,
                state: TargetState::UpIn,
                rebuilding: false,
                base_source: None,
                ..*self
            },
            _ => *self,
        }
    }

    /// The shard's target address.
    pub fn target(&self) -> TargetRef {
        TargetRef { rank: self.rank, index: self.target_index }
    }

    /// Whether writes go to this shard.
    pub fn writable(&self) -> bool {
        self.state.is_placeable()
    }

    /// Whether this shard can serve reads of data written before the layout last changed.
    pub fn readable(&self) -> bool {
        self.state.is_placeable() && !self.rebuilding
    }
}

/// The layout of one redundancy group.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Group {
    /// The group's number, `0..group_count`.
    pub index: u32,
    /// Its shards, in shard order.
    pub shards: Vec<ShardPlacement>,
}

impl Group {
    /// Shards that can serve reads.
    pub fn readable_count(&self) -> usize {
        self.shards.iter().filter(|s| s.readable()).count()
    }

    /// Shards that cannot take writes (their target is down and they could not be moved).
    pub fn unavailable_count(&self) -> usize {
        self.shards.iter().filter(|s| !s.writable()).count()
    }

    /// The group as reads see it ([`ShardPlacement::for_reads`] of every shard).
    pub fn for_reads(&self) -> Group {
        Group { index: self.index, shards: self.shards.iter().map(ShardPlacement::for_reads).collect() }
    }

    /// Whether two shards of the group share an engine (fault-domain redundancy reduced, see
    /// [`ShardPlacement::shared_domain`]).
    pub fn shares_domain(&self) -> bool {
        self.shards.iter().any(|s| s.shared_domain)
    }
}

/// Why a layout or a pool map could not be made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlacementError {
    /// The pool map has no targets.
    #[error("the pool has no targets")]
    EmptyPool,
    /// A (rank, index) pair appears twice in a pool map.
    #[error("target {index} of engine {rank} appears twice in the pool map")]
    DuplicateTarget {
        /// Engine rank.
        rank: u32,
        /// Target index.
        index: u16,
    },
    /// No such target.
    #[error("the pool has no target {index} on engine {rank}")]
    NoSuchTarget {
        /// Engine rank.
        rank: u32,
        /// Target index.
        index: u16,
    },
    /// No such engine.
    #[error("the pool has no engine of rank {0}")]
    NoSuchEngine(u32),
    /// The pool map version would wrap.
    #[error("pool map version overflow")]
    VersionOverflow,
    /// More targets than a pool map can count.
    #[error("a pool map holds at most 2^32 - 1 targets")]
    TooManyTargets,
    /// An extension that adds nothing.
    #[error("no targets to add")]
    NothingToAdd,
    /// A group basis outside 1..=targets.
    #[error("groups counted from {group_targets} targets, but the pool has {targets}")]
    BadGroupTargets {
        /// The basis asked for.
        group_targets: u32,
        /// Targets in the map.
        targets: usize,
    },
    /// The class's groups need more distinct engines (fault domains) than the pool has.
    #[error("object class {class} needs {shards} engines (fault domains) but the pool has {engines}")]
    NotEnoughEngines {
        /// The class.
        class: ObjectClass,
        /// Shards per group.
        shards: u32,
        /// Engines in the pool.
        engines: usize,
    },
    /// An object class name that does not parse.
    #[error("bad object class {0:?}: expected S1, RP_<n> (2..=64) or EC_<k>P<p> (k >= 2, p >= 1, k+p <= 64)")]
    BadObjectClass(String),
    /// A target state name that does not parse.
    #[error("bad target state {0:?}: expected UP, DOWN, DOWNOUT or UPIN")]
    BadTargetState(String),
}

/// Jump consistent hash (Lamping & Veach, 2014): maps `key` to a bucket in `0..buckets` so that
/// growing `buckets` from n to n + 1 moves only 1/(n + 1) of the keys (all to the new bucket).
/// `buckets` must be at least 1.
pub fn jump_hash(mut key: u64, buckets: u32) -> u32 {
    let mut b: i64 = -1;
    let mut j: i64 = 0;
    while j < i64::from(buckets) {
        b = j;
        key = key.wrapping_mul(2_862_933_555_777_941_757).wrapping_add(1);
        j = ((b + 1) as f64 * ((1u64 << 31) as f64 / ((key >> 33) + 1) as f64)) as i64;
    }
    b.max(0) as u32
}

/// A strong 64-bit finaliser (splitmix64's), used to mix seeds.
fn mix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Combines words into one well-mixed seed.
fn seed(words: &[u64]) -> u64 {
    words.iter().fold(0x5445_5353_4552_4121, |h, &w| mix64(h ^ w))
}

/// The placement hash of a dkey: FNV-1a over its bytes, then mixed. Part of the layout: changing
/// it would move every dkey.
pub fn dkey_hash(dkey: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in dkey {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    mix64(h)
}

/// Redundancy groups per target of the pool, see [`group_count`].
pub const GROUPS_PER_TARGET: u64 = 256;

/// Number of redundancy groups an object of `class` has in this pool:
/// `group targets × GROUPS_PER_TARGET / shards per group` (at least 1, at most `u32::MAX`), where
/// the group targets ([`PoolMap::group_targets`]) are the pool's targets when it was created, in
/// every state. So it never changes: not when targets fail, and not when the pool is extended
/// (then only the shards whose walks reach the new targets move, never a whole dkey). Each target takes part in about [`GROUPS_PER_TARGET`] groups of every object, so even a
/// single object (a volume) spreads evenly over the pool; with only `targets / shards` groups an
/// object would have a handful of fixed layouts and a few targets would get twice the average.
pub fn group_count(map: &PoolMap, class: ObjectClass) -> u32 {
    let g = u64::from(map.group_targets) * GROUPS_PER_TARGET / u64::from(class.shards_per_group());
    u32::try_from(g).unwrap_or(u32::MAX).max(1)
}

/// The redundancy group a dkey (given by its [`dkey_hash`]) of `oid` falls in.
pub fn group_of(map: &PoolMap, oid: ObjectId, dkey_hash: u64, class: ObjectClass) -> u32 {
    jump_hash(seed(&[oid.0 as u64, (oid.0 >> 64) as u64, dkey_hash]), group_count(map, class))
}

/// The layout of the group that dkey `dkey` of object `oid` falls in.
pub fn layout_for_dkey(map: &PoolMap, oid: ObjectId, dkey: &[u8], class: ObjectClass) -> Result<Group, PlacementError> {
    layout(map, oid, dkey_hash(dkey), class)
}

/// The layout of the group that the dkey with hash `dkey_hash` ([`dkey_hash`]) of object `oid`
/// falls in. Errors if the pool has fewer engines than the class has shards per group.
pub fn layout(map: &PoolMap, oid: ObjectId, dkey_hash: u64, class: ObjectClass) -> Result<Group, PlacementError> {
    let g = group_of(map, oid, dkey_hash, class);
    group_layout(map, oid, g, class)
}

/// Maximum number of pseudo-random steps of a shard's walk before it falls back to a scan.
const RANDOM_STEPS: u64 = 48;

/// The `step`-th target (an index into `map.targets`) of a shard's walk over `view`.
fn walk_step(view: &WalkView, shard_seed: u64, step: u64) -> usize {
    let n = view.engines.len();
    if step < RANDOM_STEPS {
        let h = mix64(shard_seed ^ step.wrapping_mul(0xd6e8_feb8_6659_fd93));
        let e = &view.engines[jump_hash(h, n as u32) as usize];
        e[jump_hash(mix64(h ^ 0x7461_7267_6574), e.len() as u32) as usize]
    } else {
        // A deterministic scan of every target, starting at a seeded position, so a walk always
        // finds a target when one exists.
        let start = (shard_seed % view.all.len() as u64) as usize;
        view.all[(start + (step - RANDOM_STEPS) as usize) % view.all.len()]
    }
}

/// A shard's whole walk over `view`: the random steps, then one full scan.
fn walk(view: &WalkView, shard_seed: u64) -> impl Iterator<Item = usize> + '_ {
    (0..RANDOM_STEPS + view.all.len() as u64).map(move |i| walk_step(view, shard_seed, i))
}

/// One shard during layout computation.
#[derive(Clone, Copy)]
struct Slot {
    /// Index into `map.targets`.
    target: usize,
    natural: usize,
    last_left: Option<usize>,
    stuck: bool,
}

/// The layout of group `g` of `oid`: where its shards are placed and why, before the states
/// are looked at for `rebuilding`.
fn place(map: &PoolMap, oid: ObjectId, g: u32, class: ObjectClass) -> Result<Vec<Slot>, PlacementError> {
    let n = class.shards_per_group() as usize;
    let not_enough = || PlacementError::NotEnoughEngines { class, shards: n as u32, engines: map.engines.len() };
    if map.engines.len() < n {
        return Err(not_enough());
    }
    // The pool as created, or after the first extension that gave it enough engines.
    let start = map.views.iter().position(|v| v.engines.len() >= n).ok_or_else(not_enough)?;
    let view_at = |version: u32| map.views.iter().rposition(|v| v.level <= version).unwrap_or(0).max(start);
    let engine_of = |t: usize| map.targets[t].rank;
    let seeds: Vec<u64> =
        (0..n as u64).map(|s| seed(&[oid.0 as u64, (oid.0 >> 64) as u64, u64::from(g), s, u64::from(class.shards_per_group())])).collect();

    // 1. The natural layout: states ignored, shard by shard, distinct engines.
    let mut slots: Vec<Slot> = Vec::with_capacity(n);
    for &sd in &seeds {
        let t = walk(&map.views[start], sd).find(|&t| slots.iter().all(|s| engine_of(s.target) != engine_of(t))).ok_or_else(not_enough)?;
        slots.push(Slot { target: t, natural: t, last_left: None, stuck: false });
    }

    // 2. Replay failures (fseq) and extensions (the version targets were added) in order.
    //    A failure moves each shard off the failed target to the first step of its walk (over
    //    the pool as it was then) that was alive then and is on an engine no other shard
    //    occupies; failing that (too few engines), to the first step that was alive then and that
    //    no other shard occupies (a distinct target in a shared fault domain). An extension moves
    //    a shard onto an added target only if its walk reaches one (on an engine no other shard
    //    occupies) before its present target: nothing moves between old targets, so the moved
    //    shards' old homes stay free to read from while they are filled.
    let failed_at = |t: usize| {
        let e = &map.targets[t];
        (!e.state.is_placeable()).then_some(e.fseq)
    };
    let mut extensions = map.views[start + 1..].iter().peekable();
    loop {
        let failure = (0..n).filter(|&s| !slots[s].stuck).filter_map(|s| failed_at(slots[s].target).map(|f| (f, slots[s].target, s))).min();
        let extension = extensions.peek().map(|v| v.level);
        let failure_first = match (failure, extension) {
            (None, None) => break,
            (Some((f, _, _)), Some(e)) => f < e,
            (Some(_), None) => true,
            (None, Some(_)) => false,
        };
        match (failure, extension) {
            (Some((f, from, s)), _) if failure_first => {
                let view = &map.views[view_at(f)];
                let alive_at_f = |t: usize| failed_at(t).is_none_or(|ft| ft > f);
                let others = || slots.iter().enumerate().filter(move |&(o, _)| o != s).map(|(_, other)| other.target);
                let steps = || walk(view, seeds[s]).filter(|&t| alive_at_f(t));
                let found = steps()
                    .find(|&t| others().all(|o| engine_of(o) != engine_of(t)))
                    .or_else(|| steps().find(|&t| others().all(|o| o != t)));
                match found {
                    Some(t) => {
                        slots[s].target = t;
                        slots[s].last_left = Some(from);
                    }
                    None => slots[s].stuck = true,
                }
            }
            (_, Some(level)) => {
                let Some(view) = extensions.next() else { break };
                let alive = |t: usize| failed_at(t).is_none_or(|ft| ft > level);
                // Where the shards are before this extension: a moved shard is read there until
                // it is filled, so nothing else may take it meanwhile.
                let homes: Vec<usize> = slots.iter().map(|slot| slot.target).collect();
                // Stuck shards first, then shards sharing a fault domain: they take what is free
                // before anything else moves.
                let shares =
                    |s: usize| slots.iter().enumerate().any(|(o, other)| o != s && engine_of(other.target) == engine_of(slots[s].target));
                let mut order: Vec<usize> = (0..n).collect();
                order.sort_by_key(|&s| (!slots[s].stuck, !shares(s)));
                for s in order {
                    let here = slots[s].target;
                    let others: Vec<usize> = slots.iter().enumerate().filter(|&(o, _)| o != s).map(|(_, other)| other.target).collect();
                    let free = |t: usize| alive(t) && others.iter().all(|&o| engine_of(o) != engine_of(t));
                    let to = if slots[s].stuck {
                        // It holds nothing: any target it can have now, as a failure would pick.
                        let steps = || walk(view, seeds[s]).filter(|&t| alive(t) && !homes.contains(&t));
                        steps().find(|&t| free(t)).or_else(|| steps().find(|&t| !others.contains(&t)))
                    } else if others.iter().any(|&o| engine_of(o) == engine_of(here)) {
                        // It shares a fault domain: onto an added engine of its own if it can.
                        walk(view, seeds[s]).find(|&t| free(t) && map.targets[t].added == level)
                    } else {
                        walk(view, seeds[s]).find(|&t| t == here || free(t)).filter(|&t| t != here && map.targets[t].added == level)
                    };
                    if let Some(t) = to {
                        slots[s] = Slot { target: t, natural: slots[s].natural, last_left: Some(here), stuck: false };
                    }
                }
            }
            _ => break,
        }
    }
    Ok(slots)
}

/// The layout of group `g` of `oid`.
pub fn group_layout(map: &PoolMap, oid: ObjectId, g: u32, class: ObjectClass) -> Result<Group, PlacementError> {
    let slots = place(map, oid, g, class)?;
    let tref = |m: &PoolMap, t: usize| TargetRef { rank: m.targets[t].rank, index: m.targets[t].index };
    // With a base map of the same group count (so the same groups; it may have fewer targets if
    // the pool was extended since), a shard's data is where the base layout put it. Otherwise fall back to the last move: rebuilding while its source is DOWN.
    // A base identical to the map (the settled case, which is most of the time) places every
    // shard where the map does: no second walk.
    let base_targets: Option<Vec<TargetRef>> = match map.base.as_deref() {
        Some(b) if b.targets == map.targets => Some(slots.iter().map(|slot| tref(map, slot.target)).collect()),
        Some(b) if b.group_targets == map.group_targets => {
            place(b, oid, g, class).ok().map(|bs| bs.iter().map(|slot| tref(b, slot.target)).collect())
        }
        _ => None,
    };
    let current: Vec<TargetRef> = slots.iter().map(|slot| tref(map, slot.target)).collect();
    let shards = slots
        .iter()
        .enumerate()
        .map(|(s, slot)| {
            let t = &map.targets[slot.target];
            let here = tref(map, slot.target);
            let base_source = base_targets.as_ref().map(|b| b[s]).filter(|b| {
                *b != here && !current.contains(b) && map.target(b.rank, b.index).is_some_and(|e| e.state == TargetState::UpIn)
            });
            let elsewhere = match &base_targets {
                Some(base) => base[s] != here,
                None => slot.last_left.is_some_and(|l| map.targets[l].state == TargetState::Down),
            };
            ShardPlacement {
                shard: s as u32,
                rank: t.rank,
                target_index: t.index,
                state: t.state,
                moved_from: (slot.target != slot.natural).then(|| tref(map, slot.natural)),
                rebuilding: t.state.is_placeable() && (elsewhere || t.state == TargetState::Up),
                shared_domain: slots.iter().enumerate().any(|(o, other)| o != s && map.targets[other.target].rank == t.rank),
                base_source: if t.state.is_placeable() { base_source } else { None },
            }
        })
        .collect();
    Ok(Group { index: g, shards })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes_parse_and_print() {
        for (s, c, n, d, p) in [
            ("S1", ObjectClass::S1, 1, 1, 0),
            ("RP_2", ObjectClass::Rp(2), 2, 1, 1),
            ("RP_3", ObjectClass::Rp(3), 3, 1, 2),
            ("EC_2P1", ObjectClass::Ec { k: 2, p: 1 }, 3, 2, 1),
            ("EC_4P2", ObjectClass::Ec { k: 4, p: 2 }, 6, 4, 2),
            ("EC_16P3", ObjectClass::Ec { k: 16, p: 3 }, 19, 16, 3),
        ] {
            let got: ObjectClass = s.parse().unwrap();
            assert_eq!(got, c);
            assert_eq!(got.to_string(), s);
            assert_eq!((got.shards_per_group(), got.data_shards(), got.parity_shards()), (n, d, p));
        }
        assert_eq!("ec_8p2".parse::<ObjectClass>().unwrap(), ObjectClass::Ec { k: 8, p: 2 });
        for bad in
            ["", "S2", "RP_1", "RP_", "RP_x", "RP_65", "EC_1P1", "EC_2P0", "EC_2", "EC_P1", "EC_60P5", "EC_+2P1", "EC_2P1x", "RS_2P1"]
        {
            assert!(matches!(bad.parse::<ObjectClass>(), Err(PlacementError::BadObjectClass(_))), "{bad}");
        }
    }

    #[test]
    fn states_parse() {
        for s in [TargetState::Up, TargetState::Down, TargetState::DownOut, TargetState::UpIn] {
            assert_eq!(s.as_str().parse::<TargetState>().unwrap(), s);
        }
        assert!("sideways".parse::<TargetState>().is_err());
    }

    #[test]
    fn jump_hash_is_consistent() {
        assert_eq!(jump_hash(12345, 1), 0);
        for key in 0..2_000u64 {
            let k = mix64(key);
            for n in 1..40 {
                let a = jump_hash(k, n);
                let b = jump_hash(k, n + 1);
                assert!(a < n);
                assert!(b == a || b == n, "growing {n} -> {} moved key {key} from {a} to {b}", n + 1);
            }
        }
    }

    #[test]
    fn pool_map_building() {
        let m = PoolMap::uniform(3, 2).unwrap();
        assert_eq!(m.engines().len(), 3);
        assert_eq!(m.targets().len(), 6);
        assert_eq!(m.engine_targets(&m.engines()[1]).iter().map(|t| (t.rank, t.index)).collect::<Vec<_>>(), [(1, 0), (1, 1)]);
        let m2 = m.set_state(1, 1, TargetState::Down).unwrap();
        assert_eq!(m2.version(), 2);
        assert_eq!(m2.target(1, 1).unwrap().state, TargetState::Down);
        assert_eq!(m2.target(1, 1).unwrap().fseq, 2);
        assert_eq!(m.set_state(3, 0, TargetState::Down), Err(PlacementError::NoSuchTarget { rank: 3, index: 0 }));
        let m3 = m2.set_engine_state(2, TargetState::Down).unwrap();
        assert!(m3.engine_targets(&m3.engines()[2]).iter().all(|t| t.state == TargetState::Down && t.fseq == 3));
        let dup = vec![TargetEntry { rank: 0, index: 0, state: TargetState::UpIn, fseq: 0, added: 0 }; 2];
        assert_eq!(PoolMap::new(1, dup), Err(PlacementError::DuplicateTarget { rank: 0, index: 0 }));
        assert_eq!(PoolMap::new(1, vec![]), Err(PlacementError::EmptyPool));
    }

    #[test]
    fn too_few_engines() {
        let m = PoolMap::uniform(3, 4).unwrap();
        let ec42 = ObjectClass::Ec { k: 4, p: 2 };
        assert_eq!(layout(&m, ObjectId(1), 0, ec42), Err(PlacementError::NotEnoughEngines { class: ec42, shards: 6, engines: 3 }));
        assert!(layout(&m, ObjectId(1), 0, ObjectClass::Ec { k: 2, p: 1 }).is_ok());
    }

    #[test]
    fn three_engines_one_down_is_degraded_not_an_error() {
        // The `tessera up` shape: three engines, two targets each, EC_2P1. With one engine down
        // no engine is free, so the shard that was on it moves to the spare target of a
        // surviving engine: every group stays whole, with two shards in one fault domain.
        let m = PoolMap::uniform(3, 2).unwrap();
        let ec = ObjectClass::Ec { k: 2, p: 1 };
        let down = m.set_engine_state(1, TargetState::Down).unwrap();
        let with_base = down.clone().with_base(m.clone());
        for d in 0..500u64 {
            let healthy = layout_for_dkey(&m, ObjectId(7), &d.to_be_bytes(), ec).unwrap();
            let g = layout_for_dkey(&down, ObjectId(7), &d.to_be_bytes(), ec).unwrap();
            assert!(!healthy.shares_domain());
            assert_eq!(g.unavailable_count(), 0);
            assert_eq!(g.readable_count(), 2);
            assert!(g.shares_domain());
            for (a, b) in healthy.shards.iter().zip(&g.shards) {
                assert_eq!(b.state, TargetState::UpIn);
                if a.rank == 1 {
                    assert_ne!(b.rank, 1);
                    assert!(g.shards.iter().all(|o| o.shard == b.shard || o.target() != b.target()), "{g:?}");
                    assert_eq!(b.moved_from, Some(a.target()));
                    assert!(b.shared_domain && b.rebuilding && b.writable() && !b.readable());
                } else {
                    assert_eq!(a.target(), b.target(), "only the shard on the failed engine moves");
                    assert!(b.readable());
                    assert_eq!(b.shared_domain, g.shards.iter().filter(|s| s.rank == b.rank).count() == 2);
                }
            }
            // The base map (the healthy one) gives the same answer.
            assert_eq!(layout_for_dkey(&with_base, ObjectId(7), &d.to_be_bytes(), ec).unwrap(), g);
        }
        // Two engines down: only two targets left for three shards, so one stays unavailable.
        let two_down = down.set_engine_state(2, TargetState::Down).unwrap();
        for d in 0..100u64 {
            let g = layout_for_dkey(&two_down, ObjectId(7), &d.to_be_bytes(), ec).unwrap();
            assert_eq!((g.unavailable_count(), g.readable_count()), (1, 1), "{g:?}");
            assert!(g.shards.iter().filter(|s| s.writable()).all(|s| s.rank == 0));
        }
    }

    #[test]
    fn a_failed_target_moves_within_or_across_engines() {
        let m = PoolMap::uniform(6, 4).unwrap();
        let ec = ObjectClass::Ec { k: 2, p: 1 };
        let g = layout(&m, ObjectId(99), 5, ec).unwrap();
        let victim = g.shards[1];
        let m2 = m.set_state(victim.rank, victim.target_index, TargetState::Down).unwrap();
        let g2 = layout(&m2, ObjectId(99), 5, ec).unwrap();
        assert_eq!(g2.shards[0], g.shards[0]);
        assert_eq!(g2.shards[2], g.shards[2]);
        let moved = g2.shards[1];
        assert_ne!(moved.target(), victim.target());
        assert_eq!(moved.moved_from, Some(victim.target()));
        assert!(moved.rebuilding && moved.writable() && !moved.readable());
        // Once rebuilt (DOWNOUT), the new place serves reads.
        let m3 = m2.set_state(victim.rank, victim.target_index, TargetState::DownOut).unwrap();
        let g3 = layout(&m3, ObjectId(99), 5, ec).unwrap();
        assert_eq!(g3.shards[1].target(), moved.target());
        assert!(g3.shards[1].readable());
    }

    #[test]
    fn base_map_accessors() {
        let m = PoolMap::uniform(4, 2).unwrap();
        assert!(m.base().is_none());
        let inner = m.clone().with_base(m.clone());
        let outer = m.set_state(0, 0, TargetState::Down).unwrap().with_base(inner.clone());
        // The base's own base is dropped; state changes keep the base.
        assert_eq!(outer.base(), Some(&m));
        assert!(outer.base().unwrap().base().is_none());
        let next = outer.set_state(0, 0, TargetState::DownOut).unwrap();
        assert_eq!(next.base(), Some(&m));
        assert_ne!(next, next.clone().with_base(next.clone()), "equality compares the bases");
    }

    /// A target fails, is rebuilt elsewhere, comes back (reintegration) and is in again: the
    /// shard that was on it moves away and back, and is read only where its data is.
    #[test]
    fn fail_rebuild_reintegrate_against_the_base_map() {
        let ec = ObjectClass::Ec { k: 2, p: 1 };
        let m0 = PoolMap::uniform(6, 4).unwrap();
        let at = |m: &PoolMap| layout(m, ObjectId(99), 5, ec).unwrap();
        let g0 = at(&m0);
        let victim = g0.shards[1].target();
        // Fail: base = before. Only shard 1 moves; it is rebuilding.
        let m1 = m0.set_state(victim.rank, victim.index, TargetState::Down).unwrap().with_base(m0.clone());
        let g1 = at(&m1);
        assert_eq!((g1.shards[0], g1.shards[2]), (g0.shards[0], g0.shards[2]));
        assert!(g1.shards[1].target() != victim && g1.shards[1].rebuilding && !g1.shards[1].readable());
        // Rebuild done: DOWNOUT, and the map is the new base. Nothing moves or is rebuilding.
        let m2 = m1.set_state(victim.rank, victim.index, TargetState::DownOut).unwrap();
        let m2 = m2.clone().with_base(m2);
        let g2 = at(&m2);
        assert!(g2.shards.iter().zip(&g1.shards).all(|(a, b)| a.target() == b.target() && a.readable()));
        // Reintegrate: UP with the DOWNOUT map as base. Shard 1 goes back, written, not read.
        let m3 = m2.set_state(victim.rank, victim.index, TargetState::Up).unwrap();
        let g3 = at(&m3);
        assert_eq!(g3.shards[1].target(), victim);
        assert!(g3.shards[1].rebuilding && g3.shards[1].writable() && !g3.shards[1].readable());
        assert!(g3.shards[0].readable() && g3.shards[2].readable());
        // With the base, the shard's interim home (UPIN, free) stays its source: read there
        // and written there too until the reintegration is done.
        assert!(g3.shards[1].base_source.is_some_and(|b| b != victim && b == g2.shards[1].target()));
        assert_eq!(g3.shards[1].read_from(), g3.shards[1].base_source);
        // Without a base a shard on an UP target is rebuilding too (and has no known source).
        let m3_no_base = PoolMap::new(m3.version(), m3.targets().to_vec()).unwrap();
        let no_base = at(&m3_no_base);
        assert_eq!(
            no_base.shards.iter().map(|s| (s.target(), s.rebuilding)).collect::<Vec<_>>(),
            g3.shards.iter().map(|s| (s.target(), s.rebuilding)).collect::<Vec<_>>()
        );
        assert!(no_base.shards.iter().all(|s| s.base_source.is_none()));
        // Reintegration done: UPIN, new base. The original layout, all readable.
        let m4 = m3.set_state(victim.rank, victim.index, TargetState::UpIn).unwrap();
        let m4 = m4.clone().with_base(m4);
        let g4 = at(&m4);
        assert!(g4.shards.iter().zip(&g0.shards).all(|(a, b)| a.target() == b.target() && a.readable()));
        // The old rule without a base would call shard 1 readable on the UPIN target as soon as
        // it is UPIN; with a stale base (the DOWNOUT map) it stays rebuilding.
        let stale = m3.set_state(victim.rank, victim.index, TargetState::UpIn).unwrap();
        assert!(at(&stale).shards[1].rebuilding);
        // A base of another size (the pool grew) is ignored: the last move decides.
        let grown = m1.clone().with_base(PoolMap::uniform(7, 4).unwrap());
        assert_eq!(at(&grown), at(&PoolMap::new(m1.version(), m1.targets().to_vec()).unwrap()));
    }
}
