//! The versioned metadata index of one target, in memory and free of I/O.
//!
//! Shape: container → object → dkey → akey → { array extents, single values }, each version tagged
//! with a [`Version`] (epoch, then a per-target id that orders versions within one epoch: the later
//! operation wins). Punches exist at every level: an object, dkey or akey punch hides every older
//! version beneath it; a range punch is an extent without data.
//!
//! Every change is an [`Op`]; the live path and WAL replay both call [`Index::apply`], so a
//! recovered index equals the one that was lost. Reads ([`Index::fetch_array`],
//! [`Index::fetch_single`]) resolve, for each byte, the newest version visible at the read epoch.
//! [`Index::plan_aggregation`] computes which versions no retained view can see any more and
//! returns the ops that drop or trim them; [`Index::plan_discard`] returns the same kinds of ops
//! to delete every version of an object or dkey above an epoch (rebuild and reintegration).

use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::Arc;

use bytes::Bytes;

use crate::op::{AkeyPath, Extent, Loc, Op, PunchLevel, Stored};
use crate::BLOCK;

/// A version's position in time: epoch first, then the id of the operation that wrote it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Version {
    pub epoch: u64,
    pub id: u64,
}

/// Aggregation parameters of a container: views that must stay readable.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Retention {
    /// Versions at or below this epoch may be aggregated (0: set by the engine's default).
    pub aggregate_below: u64,
    /// Snapshot epochs whose view must be preserved, sorted.
    pub retained: Vec<u64>,
}

#[derive(Debug, Clone, Default)]
pub(crate) struct ExtentBody {
    pub(crate) len: u64,
    pub(crate) data: Option<Stored>,
}

/// The versions of one akey.
#[derive(Debug, Clone, Default)]
pub struct Akey {
    pub(crate) punches: Vec<Version>,
    pub(crate) singles: BTreeMap<Version, Stored>,
    /// Keyed by (start offset, version).
    pub(crate) extents: BTreeMap<(u64, Version), ExtentBody>,
    /// Longest extent ever inserted: bounds the backwards scan of an overlap query.
    pub(crate) max_len: u64,
}

/// One dkey. Akeys are shared copy-on-write so that a checkpoint's snapshot of the index costs
/// one pointer per akey, and an update after it copies only the akey it changes.
#[derive(Debug, Clone, Default)]
pub struct Dkey {
    pub(crate) punches: Vec<Version>,
    pub(crate) akeys: BTreeMap<Bytes, Arc<Akey>>,
}

/// One object.
#[derive(Debug, Clone, Default)]
pub struct Object {
    pub(crate) punches: Vec<Version>,
    pub(crate) dkeys: BTreeMap<Bytes, Dkey>,
}

/// One container.
#[derive(Debug, Clone, Default)]
pub struct Container {
    pub(crate) retention: Retention,
    pub(crate) objects: BTreeMap<u128, Object>,
}

/// The whole index of a target.
#[derive(Debug, Clone, Default)]
pub struct Index {
    pub(crate) containers: BTreeMap<u128, Container>,
    /// Next version id to hand out; above every id in the index.
    pub(crate) next_id: u64,
}

/// Where the bytes of one piece of a fetched range come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// Never written, or punched: reads as zeros.
    Hole,
    /// Bytes of a stored extent starting at `extent_start` (the extent's own offset in the akey).
    Data { extent_start: u64, extent_len: u64, stored: Stored },
}

/// A piece of a fetched range.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Segment {
    pub range: Range<u64>,
    pub source: Source,
    /// The version the piece comes from (a write, or a range punch); `None` where nothing
    /// visible covers it.
    pub version: Option<Version>,
}

/// A stored value's place within its akey, in index order: array extents by (offset, version),
/// then single values by version (scrub cursors).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ItemKey {
    Extent { offset: u64, version: Version },
    Single(Version),
}

/// Newest punch visible at `epoch` in a sorted punch list.
fn newest_punch(punches: &[Version], epoch: u64) -> Option<Version> {
    punches.iter().rev().find(|p| p.epoch <= epoch).copied()
}

fn insert_sorted(list: &mut Vec<Version>, v: Version) {
    if let Err(pos) = list.binary_search(&v) {
        list.insert(pos, v);
    }
}

/// Subtracts `cut` from a sorted list of disjoint ranges.
pub(crate) fn subtract(ranges: &mut Vec<Range<u64>>, cut: &Range<u64>) {
    let mut out = Vec::with_capacity(ranges.len() + 1);
    for r in ranges.drain(..) {
        if cut.end <= r.start || cut.start >= r.end {
            out.push(r);
            continue;
        }
        if r.start < cut.start {
            out.push(r.start..cut.start);
        }
        if cut.end < r.end {
            out.push(cut.end..r.end);
        }
    }
    *ranges = out;
}

fn intersect(a: &Range<u64>, b: &Range<u64>) -> Option<Range<u64>> {
    let r = a.start.max(b.start)..a.end.min(b.end);
    (r.start < r.end).then_some(r)
}

impl Akey {
    /// Extents overlapping `range`, any version.
    fn overlapping(&self, range: &Range<u64>) -> impl Iterator<Item = (u64, Version, &ExtentBody)> + '_ {
        let from = range.start.saturating_sub(self.max_len);
        let end = range.end;
        let start = range.start;
        self.extents
            .range((from, Version { epoch: 0, id: 0 })..)
            .take_while(move |((off, _), _)| *off < end)
            .filter(move |((off, _), body)| off + body.len > start)
            .map(|((off, v), body)| (*off, *v, body))
    }

    fn is_empty(&self) -> bool {
        self.punches.is_empty() && self.singles.is_empty() && self.extents.is_empty()
    }

    /// Every version id below `v` in this akey (extents, singles).
    fn has_version_below(&self, v: Version) -> bool {
        self.singles.keys().any(|s| *s < v) || self.extents.keys().any(|(_, e)| *e < v)
    }
}

impl Index {
    /// An empty index.
    pub fn new() -> Self {
        Self::default()
    }

    /// Hands out the next version id.
    pub fn allocate_id(&mut self) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    fn note_id(&mut self, id: u64) {
        self.next_id = self.next_id.max(id.saturating_add(1));
    }

    fn akey_mut(&mut self, p: &AkeyPath) -> &mut Akey {
        let shared = self
            .containers
            .entry(p.cont)
            .or_default()
            .objects
            .entry(p.obj)
            .or_default()
            .dkeys
            .entry(p.dkey.clone())
            .or_default()
            .akeys
            .entry(p.akey.clone())
            .or_default();
        Arc::make_mut(shared)
    }

    /// The akey at `p`, if it exists.
    pub fn akey(&self, p: &AkeyPath) -> Option<&Akey> {
        self.containers.get(&p.cont)?.objects.get(&p.obj)?.dkeys.get(&p.dkey)?.akeys.get(&p.akey).map(|a| &**a)
    }

    /// Retention parameters of a container (defaults if it does not exist).
    pub fn retention(&self, cont: u128) -> Retention {
        self.containers.get(&cont).map(|c| c.retention.clone()).unwrap_or_default()
    }

    /// Newest punch above the akey (object, dkey, akey levels) visible at `epoch`.
    fn ancestor_punch(&self, p: &AkeyPath, epoch: u64) -> Option<Version> {
        let obj = self.containers.get(&p.cont)?.objects.get(&p.obj)?;
        let mut best = newest_punch(&obj.punches, epoch);
        if let Some(d) = obj.dkeys.get(&p.dkey) {
            best = best.max(newest_punch(&d.punches, epoch));
            if let Some(a) = d.akeys.get(&p.akey) {
                best = best.max(newest_punch(&a.punches, epoch));
            }
        }
        best
    }

    /// Applies one operation (live or during replay).
    pub fn apply(&mut self, op: &Op) {
        match op {
            Op::Extent { path, ext } => {
                self.note_id(ext.version.id);
                let akey = self.akey_mut(path);
                akey.max_len = akey.max_len.max(ext.len);
                akey.extents.insert((ext.offset, ext.version), ExtentBody { len: ext.len, data: ext.data.clone() });
            }
            Op::Single { path, version, value } => {
                self.note_id(version.id);
                self.akey_mut(path).singles.insert(*version, value.clone());
            }
            Op::Punch { cont, obj, level, version } => {
                self.note_id(version.id);
                self.punch(*cont, *obj, level, *version);
            }
            Op::Retention { cont, retention } => {
                self.containers.entry(*cont).or_default().retention = retention.clone();
            }
            Op::Aggregate { path, remove_extents, add_extents, remove_singles, remove_punches } => {
                if let Some(max) = add_extents.iter().map(|e| e.version.id).max() {
                    self.note_id(max);
                }
                let akey = self.akey_mut(path);
                for key in remove_extents {
                    akey.extents.remove(key);
                }
                for ext in add_extents {
                    akey.max_len = akey.max_len.max(ext.len);
                    akey.extents.insert((ext.offset, ext.version), ExtentBody { len: ext.len, data: ext.data.clone() });
                }
                for v in remove_singles {
                    akey.singles.remove(v);
                }
                akey.punches.retain(|p| !remove_punches.contains(p));
                self.prune(path.cont, path.obj, Some(&path.dkey), Some(&path.akey));
            }
            Op::Unpunch { cont, obj, level, version } => {
                self.unpunch(*cont, *obj, level, *version);
            }
        }
    }

    fn punch(&mut self, cont: u128, obj: u128, level: &PunchLevel, v: Version) {
        let o = self.containers.entry(cont).or_default().objects.entry(obj).or_default();
        match level {
            PunchLevel::Object => insert_sorted(&mut o.punches, v),
            PunchLevel::Dkey(d) => insert_sorted(&mut o.dkeys.entry(d.clone()).or_default().punches, v),
            PunchLevel::Akey(d, a) => {
                let akey = o.dkeys.entry(d.clone()).or_default().akeys.entry(a.clone()).or_default();
                insert_sorted(&mut Arc::make_mut(akey).punches, v);
            }
        }
    }

    fn unpunch(&mut self, cont: u128, obj: u128, level: &PunchLevel, v: Version) {
        let Some(o) = self.containers.get_mut(&cont).and_then(|c| c.objects.get_mut(&obj)) else { return };
        match level {
            PunchLevel::Object => o.punches.retain(|p| *p != v),
            PunchLevel::Dkey(d) => {
                if let Some(dk) = o.dkeys.get_mut(d) {
                    dk.punches.retain(|p| *p != v);
                }
            }
            PunchLevel::Akey(d, a) => {
                if let Some(ak) = o.dkeys.get_mut(d).and_then(|dk| dk.akeys.get_mut(a)) {
                    Arc::make_mut(ak).punches.retain(|p| *p != v);
                }
            }
        }
        let (dkey, akey) = match level {
            PunchLevel::Object => (None, None),
            PunchLevel::Dkey(d) => (Some(d), None),
            PunchLevel::Akey(d, a) => (Some(d), Some(a)),
        };
        self.prune(cont, obj, dkey, akey);
    }

    /// Removes empty akeys, dkeys and objects along a path.
    fn prune(&mut self, cont: u128, obj: u128, dkey: Option<&Bytes>, akey: Option<&Bytes>) {
        let Some(c) = self.containers.get_mut(&cont) else { return };
        let Some(o) = c.objects.get_mut(&obj) else { return };
        if let Some(d) = dkey {
            if let Some(dk) = o.dkeys.get_mut(d) {
                if let Some(a) = akey {
                    if dk.akeys.get(a).is_some_and(|ak| ak.is_empty()) {
                        dk.akeys.remove(a);
                    }
                }
                if dk.akeys.is_empty() && dk.punches.is_empty() {
                    o.dkeys.remove(d);
                }
            }
        }
        if o.dkeys.is_empty() && o.punches.is_empty() {
            c.objects.remove(&obj);
        }
    }

    /// Resolves `range` of an array akey at `epoch` into data and hole segments, in order.
    pub fn fetch_array(&self, p: &AkeyPath, range: Range<u64>, epoch: u64) -> Vec<Segment> {
        self.fetch_versions(std::slice::from_ref(p), range, epoch)
    }

    /// Resolves `range` at `epoch` across several array akeys (of one dkey) as if they were one:
    /// byte by byte the newest visible version of any of them wins. Each akey's own punches
    /// (and its dkey's and object's) apply to it alone; a range punch competes as a version.
    /// Aggregation may drop a punch that hides nothing older in its own akey, so callers must
    /// not rely on a punch in one akey hiding data in another.
    pub fn fetch_versions(&self, paths: &[AkeyPath], range: Range<u64>, epoch: u64) -> Vec<Segment> {
        let mut segments = Vec::new();
        if range.start >= range.end {
            return segments;
        }
        let mut candidates: Vec<(Version, u64, &ExtentBody)> = Vec::new();
        for p in paths {
            let threshold = self.ancestor_punch(p, epoch);
            if let Some(akey) = self.akey(p) {
                candidates.extend(
                    akey.overlapping(&range)
                        .filter(|(_, v, _)| v.epoch <= epoch && Some(*v) > threshold)
                        .map(|(off, v, body)| (v, off, body)),
                );
            }
        }
        candidates.sort_by_key(|c| std::cmp::Reverse(c.0));
        let mut uncovered = vec![range.clone()];
        for (version, off, body) in candidates {
            if uncovered.is_empty() {
                break;
            }
            let ext = off..off + body.len;
            let mut pieces = Vec::new();
            for u in &uncovered {
                if let Some(i) = intersect(u, &ext) {
                    pieces.push(i);
                }
            }
            for piece in pieces {
                subtract(&mut uncovered, &piece);
                let source = match &body.data {
                    Some(stored) => Source::Data { extent_start: off, extent_len: body.len, stored: stored.clone() },
                    None => Source::Hole,
                };
                segments.push(Segment { range: piece, source, version: Some(version) });
            }
        }
        for u in uncovered {
            segments.push(Segment { range: u, source: Source::Hole, version: None });
        }
        segments.sort_by_key(|s| s.range.start);
        segments
    }

    /// The single value of an akey visible at `epoch`: its version and stored form.
    pub fn fetch_single(&self, p: &AkeyPath, epoch: u64) -> Option<(Version, Stored)> {
        let threshold = self.ancestor_punch(p, epoch);
        let akey = self.akey(p)?;
        let (v, s) = akey.singles.range(..=Version { epoch, id: u64::MAX }).next_back()?;
        (Some(*v) > threshold).then(|| (*v, s.clone()))
    }

    /// Whether an akey has a version visible at `epoch` (used by enumeration).
    fn akey_visible(akey: &Akey, threshold: Option<Version>, epoch: u64) -> bool {
        let thr = threshold.max(newest_punch(&akey.punches, epoch));
        akey.singles.keys().any(|v| v.epoch <= epoch && Some(*v) > thr)
            || akey.extents.iter().any(|((_, v), b)| v.epoch <= epoch && Some(*v) > thr && b.data.is_some())
    }

    fn dkey_visible(dkey: &Dkey, threshold: Option<Version>, epoch: u64) -> bool {
        let thr = threshold.max(newest_punch(&dkey.punches, epoch));
        dkey.akeys.values().any(|a| Self::akey_visible(a, thr, epoch))
    }

    /// Objects of a container with data visible at `epoch`, after `anchor`, at most `max`.
    pub fn list_objects(&self, cont: u128, epoch: u64, after: Option<u128>, max: usize) -> Vec<u128> {
        let Some(c) = self.containers.get(&cont) else { return Vec::new() };
        let start = after.map_or(std::ops::Bound::Unbounded, std::ops::Bound::Excluded);
        c.objects
            .range((start, std::ops::Bound::Unbounded))
            .filter(|(_, o)| {
                let thr = newest_punch(&o.punches, epoch);
                o.dkeys.values().any(|d| Self::dkey_visible(d, thr, epoch))
            })
            .map(|(id, _)| *id)
            .take(max)
            .collect()
    }

    /// Dkeys of an object visible at `epoch`, after `anchor`, at most `max`.
    pub fn list_dkeys(&self, cont: u128, obj: u128, epoch: u64, after: Option<&Bytes>, max: usize) -> Vec<Bytes> {
        let Some(o) = self.containers.get(&cont).and_then(|c| c.objects.get(&obj)) else { return Vec::new() };
        let thr = newest_punch(&o.punches, epoch);
        let start = after.map_or(std::ops::Bound::Unbounded, |a| std::ops::Bound::Excluded(a.clone()));
        o.dkeys
            .range((start, std::ops::Bound::Unbounded))
            .filter(|(_, d)| Self::dkey_visible(d, thr, epoch))
            .map(|(k, _)| k.clone())
            .take(max)
            .collect()
    }

    /// Dkeys of an object changed in the epoch window `(since, epoch]`, after `anchor`, at most
    /// `max`: every dkey holding a version of any kind (extent, range punch, single value, akey
    /// or dkey punch) with an epoch in the window, whether or not anything in it is visible at
    /// `epoch`. If the object itself has a punch in the window, every dkey holding any version
    /// at or below `epoch`.
    pub fn list_dkeys_since(&self, cont: u128, obj: u128, since: u64, epoch: u64, after: Option<&Bytes>, max: usize) -> Vec<Bytes> {
        let Some(o) = self.containers.get(&cont).and_then(|c| c.objects.get(&obj)) else { return Vec::new() };
        let in_window = |v: &Version| v.epoch > since && v.epoch <= epoch;
        let object_punched = o.punches.iter().any(in_window);
        let start = after.map_or(std::ops::Bound::Unbounded, |a| std::ops::Bound::Excluded(a.clone()));
        o.dkeys
            .range((start, std::ops::Bound::Unbounded))
            .filter(|(_, d)| if object_punched { dkey_has_version(d, |v| v.epoch <= epoch) } else { dkey_has_version(d, in_window) })
            .map(|(k, _)| k.clone())
            .take(max)
            .collect()
    }

    /// Akeys of a dkey visible at `epoch`, after `anchor`, at most `max`.
    pub fn list_akeys(&self, cont: u128, obj: u128, dkey: &Bytes, epoch: u64, after: Option<&Bytes>, max: usize) -> Vec<Bytes> {
        let Some(o) = self.containers.get(&cont).and_then(|c| c.objects.get(&obj)) else { return Vec::new() };
        let Some(d) = o.dkeys.get(dkey) else { return Vec::new() };
        let thr = newest_punch(&o.punches, epoch).max(newest_punch(&d.punches, epoch));
        let start = after.map_or(std::ops::Bound::Unbounded, |a| std::ops::Bound::Excluded(a.clone()));
        d.akeys
            .range((start, std::ops::Bound::Unbounded))
            .filter(|(_, a)| Self::akey_visible(a, thr, epoch))
            .map(|(k, _)| k.clone())
            .take(max)
            .collect()
    }

    /// Every block run referenced by the index: (first block, block count).
    pub fn referenced_blocks(&self) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        for c in self.containers.values() {
            for o in c.objects.values() {
                for d in o.dkeys.values() {
                    for a in d.akeys.values() {
                        for b in a.extents.values() {
                            if let Some(Stored { loc: Loc::Blocks { start }, .. }) = &b.data {
                                out.push((*start, b.len.div_ceil(BLOCK)));
                            }
                        }
                        for s in a.singles.values() {
                            if let Loc::Blocks { start } = s.loc {
                                out.push((start, s.len.div_ceil(BLOCK)));
                            }
                        }
                    }
                }
            }
        }
        out
    }

    /// Number of objects across containers.
    pub fn object_count(&self) -> u64 {
        self.containers.values().map(|c| c.objects.len() as u64).sum()
    }

    /// The paths of every akey of container `cont`.
    pub fn container_akey_paths(&self, cont: u128) -> Vec<AkeyPath> {
        let Some(c) = self.containers.get(&cont) else { return Vec::new() };
        c.objects.keys().flat_map(|&obj| self.object_akey_paths(cont, obj)).collect()
    }

    /// The paths of every akey of object `obj` of container `cont`.
    pub fn object_akey_paths(&self, cont: u128, obj: u128) -> Vec<AkeyPath> {
        let Some(o) = self.containers.get(&cont).and_then(|c| c.objects.get(&obj)) else { return Vec::new() };
        o.dkeys
            .iter()
            .flat_map(|(dk, d)| d.akeys.keys().map(move |ak| AkeyPath { cont, obj, dkey: dk.clone(), akey: ak.clone() }))
            .collect()
    }

    /// Visits every stored value (array extents with data, single values) in index order —
    /// container, object, dkey, akey, then [`ItemKey`] — from `from` (included; or the first
    /// value after it when it no longer exists) until `f` returns false. Range punches hold no
    /// data and are skipped.
    pub fn visit_stored(&self, from: Option<(&AkeyPath, ItemKey)>, mut f: impl FnMut(&AkeyPath, ItemKey, &Stored) -> bool) {
        use std::ops::Bound::{Included, Unbounded};
        fn at(b: Option<&AkeyPath>) -> std::ops::Bound<&AkeyPath> {
            b.map_or(Unbounded, Included)
        }
        let start = from.map(|(p, _)| p);
        for (cid, c) in self.containers.range((at(start).map(|p| &p.cont), Unbounded)) {
            let start = start.filter(|p| p.cont == *cid);
            for (oid, o) in c.objects.range((at(start).map(|p| &p.obj), Unbounded)) {
                let start = start.filter(|p| p.obj == *oid);
                for (dk, d) in o.dkeys.range::<Bytes, _>((at(start).map(|p| &p.dkey), Unbounded)) {
                    let start = start.filter(|p| p.dkey == *dk);
                    for (ak, a) in d.akeys.range::<Bytes, _>((at(start).map(|p| &p.akey), Unbounded)) {
                        let item = from.filter(|_| start.is_some_and(|p| p.akey == *ak)).map(|(_, k)| k);
                        let path = AkeyPath { cont: *cid, obj: *oid, dkey: dk.clone(), akey: ak.clone() };
                        let extents_from = match item {
                            None => Some((0, Version { epoch: 0, id: 0 })),
                            Some(ItemKey::Extent { offset, version }) => Some((offset, version)),
                            Some(ItemKey::Single(_)) => None,
                        };
                        if let Some(k) = extents_from {
                            for ((offset, version), body) in a.extents.range(k..) {
                                if let Some(stored) = &body.data {
                                    if !f(&path, ItemKey::Extent { offset: *offset, version: *version }, stored) {
                                        return;
                                    }
                                }
                            }
                        }
                        let singles_from = match item {
                            Some(ItemKey::Single(v)) => v,
                            _ => Version { epoch: 0, id: 0 },
                        };
                        for (v, stored) in a.singles.range(singles_from..) {
                            if !f(&path, ItemKey::Single(*v), stored) {
                                return;
                            }
                        }
                    }
                }
            }
        }
    }

    /// Every akey path, in order (aggregation after a restart starts from all of them).
    pub fn akey_paths(&self) -> Vec<AkeyPath> {
        let mut out = Vec::new();
        for (cid, c) in &self.containers {
            for (oid, o) in &c.objects {
                for (dk, d) in &o.dkeys {
                    for ak in d.akeys.keys() {
                        out.push(AkeyPath { cont: *cid, obj: *oid, dkey: dk.clone(), akey: ak.clone() });
                    }
                }
            }
        }
        out
    }

    /// The ops that aggregate one akey below `boundary`, keeping every view in `retained`
    /// readable, and the oldest epoch above the boundary the akey still holds (look at it again
    /// once the boundary reaches that epoch). Returns no op when nothing can be freed.
    pub fn plan_aggregation(&self, p: &AkeyPath, boundary: u64, retained: &[u64]) -> (Option<Op>, Option<u64>) {
        let Some(akey) = self.akey(p) else { return (None, None) };
        let pending = akey
            .extents
            .keys()
            .map(|(_, v)| v.epoch)
            .chain(akey.singles.keys().map(|v| v.epoch))
            .chain(akey.punches.iter().map(|v| v.epoch))
            .filter(|e| *e > boundary)
            .min();
        // The smallest view at or above an epoch; every version at or below the boundary has one.
        let view_of = |epoch: u64| retained.iter().copied().filter(|r| *r >= epoch && *r <= boundary).min().unwrap_or(boundary);
        let ancestors = self.ancestor_punch_list(p);
        let hidden_by_ancestor = |v: Version, view: u64| ancestors.iter().any(|a| *a > v && a.epoch <= view);
        let mut remove_extents = Vec::new();
        let mut add_extents = Vec::new();
        // Data first, so that a range punch can see which older data is already gone.
        for (&(off, v), body) in akey.extents.iter().filter(|(_, b)| b.data.is_some()) {
            if v.epoch > boundary {
                continue;
            }
            let view = view_of(v.epoch);
            let ext = off..off + body.len;
            if hidden_by_ancestor(v, view) {
                remove_extents.push((off, v));
                continue;
            }
            let visible = visible_part(akey, &ext, v, view);
            if visible.is_empty() {
                remove_extents.push((off, v));
            } else if let Some(pieces) = trim_pieces(off, body, &visible) {
                remove_extents.push((off, v));
                add_extents.extend(pieces.into_iter().map(|mut e| {
                    e.version = v;
                    e
                }));
            }
        }
        for (&(off, v), body) in akey.extents.iter().filter(|(_, b)| b.data.is_none()) {
            if v.epoch > boundary {
                continue;
            }
            let view = view_of(v.epoch);
            let ext = off..off + body.len;
            // A range punch only matters while an older version under it remains.
            let shadows = akey.overlapping(&ext).any(|(o2, v2, _)| v2 < v && !remove_extents.contains(&(o2, v2)))
                || add_extents.iter().any(|e| e.version < v && intersect(&(e.offset..e.offset + e.len), &ext).is_some());
            if hidden_by_ancestor(v, view) || !shadows || visible_part(akey, &ext, v, view).is_empty() {
                remove_extents.push((off, v));
            }
        }
        let mut remove_singles = Vec::new();
        for &v in akey.singles.keys() {
            if v.epoch > boundary {
                continue;
            }
            let view = view_of(v.epoch);
            let newer_single = akey.singles.range(v..).skip(1).any(|(n, _)| n.epoch <= view);
            if newer_single || hidden_by_ancestor(v, view) {
                remove_singles.push(v);
            }
        }
        let mut remove_punches = Vec::new();
        for &pv in &akey.punches {
            if pv.epoch > boundary {
                continue;
            }
            let older_left = akey.singles.keys().any(|s| *s < pv && !remove_singles.contains(s))
                || akey.extents.keys().any(|k| k.1 < pv && !remove_extents.contains(k))
                || add_extents.iter().any(|e| e.version < pv);
            if !older_left {
                remove_punches.push(pv);
            }
        }
        if remove_extents.is_empty() && remove_singles.is_empty() && remove_punches.is_empty() {
            return (None, pending);
        }
        let op = Op::Aggregate { path: p.clone(), remove_extents, add_extents, remove_singles, remove_punches };
        (Some(op), pending)
    }

    /// Object, dkey and akey punches of an akey's path (all epochs).
    fn ancestor_punch_list(&self, p: &AkeyPath) -> Vec<Version> {
        let Some(o) = self.containers.get(&p.cont).and_then(|c| c.objects.get(&p.obj)) else { return Vec::new() };
        let mut out = o.punches.clone();
        if let Some(d) = o.dkeys.get(&p.dkey) {
            out.extend_from_slice(&d.punches);
            if let Some(a) = d.akeys.get(&p.akey) {
                out.extend_from_slice(&a.punches);
            }
        }
        out
    }

    /// The ops that delete every version of object `obj` with an epoch strictly above
    /// `epochs.start` and strictly below `epochs.end` (every version for `0..u64::MAX`), or with
    /// `dkey` only those under that dkey, and the
    /// number of versions they delete (the pieces of one update count once). Unlike a punch,
    /// the versions are gone: older ones become visible again. One `Aggregate` op per akey that
    /// loses anything (its extents, range punches, single values and akey punches above the
    /// epoch; nothing is added), then an `Unpunch` per dkey punch and, for the whole object, per
    /// object punch above the epoch. Applying them deletes akeys, dkeys and the object when they
    /// become empty.
    pub fn plan_discard(&self, cont: u128, obj: u128, epochs: std::ops::Range<u64>, dkey: Option<&Bytes>) -> (Vec<Op>, u64) {
        let Some(o) = self.containers.get(&cont).and_then(|c| c.objects.get(&obj)) else { return (Vec::new(), 0) };
        let newer = |v: &Version| v.epoch > epochs.start && v.epoch < epochs.end;
        let dkeys: Vec<(&Bytes, &Dkey)> = match dkey {
            Some(d) => o.dkeys.get_key_value(d).into_iter().collect(),
            None => o.dkeys.iter().collect(),
        };
        let mut ops = Vec::new();
        let mut unpunches = Vec::new();
        let mut versions = 0u64;
        for (dk, d) in dkeys {
            for (ak, a) in &d.akeys {
                let remove_extents: Vec<(u64, Version)> = a.extents.keys().filter(|(_, v)| newer(v)).copied().collect();
                let remove_singles: Vec<Version> = a.singles.keys().copied().filter(newer).collect();
                let remove_punches: Vec<Version> = a.punches.iter().copied().filter(newer).collect();
                // An update stored in several pieces (or trimmed by aggregation) is one version.
                let mut extent_versions: Vec<Version> = remove_extents.iter().map(|(_, v)| *v).collect();
                extent_versions.sort_unstable();
                extent_versions.dedup();
                let n = extent_versions.len() + remove_singles.len() + remove_punches.len();
                if n > 0 {
                    versions += n as u64;
                    let path = AkeyPath { cont, obj, dkey: dk.clone(), akey: ak.clone() };
                    ops.push(Op::Aggregate { path, remove_extents, add_extents: Vec::new(), remove_singles, remove_punches });
                }
            }
            for &version in d.punches.iter().filter(|v| newer(v)) {
                unpunches.push(Op::Unpunch { cont, obj, level: PunchLevel::Dkey(dk.clone()), version });
            }
        }
        if dkey.is_none() {
            for &version in o.punches.iter().filter(|v| newer(v)) {
                unpunches.push(Op::Unpunch { cont, obj, level: PunchLevel::Object, version });
            }
        }
        versions += unpunches.len() as u64;
        ops.extend(unpunches);
        (ops, versions)
    }

    /// Object and dkey punches at or below `boundary` that no longer shadow anything.
    pub fn plan_unpunch(&self, cont: u128, obj: u128, boundary: u64) -> Vec<Op> {
        let Some(o) = self.containers.get(&cont).and_then(|c| c.objects.get(&obj)) else { return Vec::new() };
        let mut ops = Vec::new();
        for (dk, d) in &o.dkeys {
            for &pv in &d.punches {
                if pv.epoch <= boundary && !d.akeys.values().any(|a| a.has_version_below(pv)) {
                    ops.push(Op::Unpunch { cont, obj, level: PunchLevel::Dkey(dk.clone()), version: pv });
                }
            }
        }
        for &pv in &o.punches {
            let older = o.dkeys.values().any(|d| d.akeys.values().any(|a| a.has_version_below(pv)));
            if pv.epoch <= boundary && !older {
                ops.push(Op::Unpunch { cont, obj, level: PunchLevel::Object, version: pv });
            }
        }
        ops
    }
}

/// Whether a dkey holds a version for which `f` is true: a punch of the dkey or of one of its
/// akeys, a single value, or an extent (data or range punch).
fn dkey_has_version(d: &Dkey, f: impl Fn(&Version) -> bool) -> bool {
    d.punches.iter().any(&f)
        || d.akeys.values().any(|a| a.punches.iter().any(&f) || a.singles.keys().any(&f) || a.extents.keys().any(|(_, v)| f(v)))
}

/// The parts of `ext` (written at `v`) not covered by a newer version visible at `view`.
fn visible_part(akey: &Akey, ext: &Range<u64>, v: Version, view: u64) -> Vec<Range<u64>> {
    let mut visible = vec![ext.clone()];
    for (o2, v2, b2) in akey.overlapping(ext) {
        if v2 > v && v2.epoch <= view {
            subtract(&mut visible, &(o2..o2 + b2.len));
        }
    }
    visible
}

/// Splits a partly visible data extent into the runs of whole 4 KiB chunks (counted from the
/// extent's start) that hold a visible byte. `None` when every chunk is still needed.
fn trim_pieces(off: u64, body: &ExtentBody, visible: &[Range<u64>]) -> Option<Vec<Extent>> {
    let stored = body.data.as_ref()?;
    let chunks = body.len.div_ceil(BLOCK);
    let needed: Vec<bool> = (0..chunks)
        .map(|c| {
            let chunk = off + c * BLOCK..(off + (c + 1) * BLOCK).min(off + body.len);
            visible.iter().any(|v| intersect(v, &chunk).is_some())
        })
        .collect();
    if needed.iter().all(|n| *n) {
        return None;
    }
    let mut pieces = Vec::new();
    let mut c = 0u64;
    while c < chunks {
        if !needed.get(c as usize).copied().unwrap_or(false) {
            c += 1;
            continue;
        }
        let first = c;
        while c < chunks && needed.get(c as usize).copied().unwrap_or(false) {
            c += 1;
        }
        let start = first * BLOCK;
        let end = (c * BLOCK).min(body.len);
        pieces.push(Extent {
            offset: off + start,
            len: end - start,
            version: Version { epoch: 0, id: 0 },
            data: Some(stored.slice_chunks(first, c, start, end)),
        });
    }
    Some(pieces)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn path() -> AkeyPath {
        AkeyPath { cont: 1, obj: 2, dkey: Bytes::from_static(b"d"), akey: Bytes::from_static(b"a") }
    }

    fn ext(idx: &mut Index, offset: u64, len: u64, epoch: u64, inline: u8) -> Version {
        let version = Version { epoch, id: idx.allocate_id() };
        let data = Bytes::from(vec![inline; len as usize]);
        let stored = Stored { loc: Loc::Inline(data.clone()), len, csums: crate::csum::chunk_csums(&data) };
        idx.apply(&Op::Extent { path: path(), ext: Extent { offset, len, version, data: Some(stored) } });
        version
    }

    fn describe(segs: &[Segment]) -> Vec<(u64, u64, u8)> {
        segs.iter()
            .map(|s| {
                let tag = match &s.source {
                    Source::Hole => 0,
                    Source::Data { stored: Stored { loc: Loc::Inline(b), .. }, .. } => b[0],
                    Source::Data { .. } => 255,
                };
                (s.range.start, s.range.end, tag)
            })
            .collect()
    }

    #[test]
    fn versions_fetch_merges_akeys_newest_first_and_reports_epochs() {
        let mut idx = Index::new();
        let a = path();
        let b = AkeyPath { akey: Bytes::from_static(b"b"), ..path() };
        ext(&mut idx, 0, 8192, 10, 1); // akey a, epoch 10
        let v = Version { epoch: 20, id: idx.allocate_id() };
        let data = Bytes::from(vec![2u8; 100]);
        let stored = Stored { loc: Loc::Inline(data.clone()), len: 100, csums: crate::csum::chunk_csums(&data) };
        idx.apply(&Op::Extent { path: b.clone(), ext: Extent { offset: 4096, len: 100, version: v, data: Some(stored) } });
        let segs = idx.fetch_versions(&[a.clone(), b.clone()], 0..10000, 30);
        assert_eq!(describe(&segs), vec![(0, 4096, 1), (4096, 4196, 2), (4196, 8192, 1), (8192, 10000, 0)]);
        let epochs: Vec<_> = segs.iter().map(|s| s.version.map(|v| v.epoch)).collect();
        assert_eq!(epochs, vec![Some(10), Some(20), Some(10), None]);
        // Below the newer akey's epoch only the older one shows; one akey alone ignores the other.
        assert_eq!(describe(&idx.fetch_versions(&[a.clone(), b.clone()], 0..8192, 15)), vec![(0, 8192, 1)]);
        assert_eq!(describe(&idx.fetch_versions(&[b], 0..8192, 30)), vec![(0, 4096, 0), (4096, 4196, 2), (4196, 8192, 0)]);
    }

    #[test]
    fn newest_version_wins_per_byte() {
        let mut idx = Index::new();
        ext(&mut idx, 0, 8192, 10, 1);
        ext(&mut idx, 4096, 100, 20, 2);
        assert_eq!(describe(&idx.fetch_array(&path(), 0..8192, 15)), vec![(0, 8192, 1)]);
        assert_eq!(describe(&idx.fetch_array(&path(), 0..8192, 20)), vec![(0, 4096, 1), (4096, 4196, 2), (4196, 8192, 1)]);
        assert_eq!(describe(&idx.fetch_array(&path(), 0..10000, 5)), vec![(0, 10000, 0)]);
        assert_eq!(describe(&idx.fetch_array(&path(), 8000..10000, 30)), vec![(8000, 8192, 1), (8192, 10000, 0)]);
    }

    #[test]
    fn punches_hide_older_versions_only() {
        let mut idx = Index::new();
        ext(&mut idx, 0, 4096, 10, 1);
        let v = Version { epoch: 20, id: idx.allocate_id() };
        idx.apply(&Op::Extent { path: path(), ext: Extent { offset: 1000, len: 1000, version: v, data: None } });
        assert_eq!(describe(&idx.fetch_array(&path(), 0..4096, 25)), vec![(0, 1000, 1), (1000, 2000, 0), (2000, 4096, 1)]);
        let v = Version { epoch: 30, id: idx.allocate_id() };
        idx.apply(&Op::Punch { cont: 1, obj: 2, level: PunchLevel::Object, version: v });
        assert_eq!(describe(&idx.fetch_array(&path(), 0..4096, 30)), vec![(0, 4096, 0)]);
        assert_eq!(describe(&idx.fetch_array(&path(), 0..4096, 29)), vec![(0, 1000, 1), (1000, 2000, 0), (2000, 4096, 1)]);
        ext(&mut idx, 0, 10, 40, 3);
        assert_eq!(describe(&idx.fetch_array(&path(), 0..4096, 40)), vec![(0, 10, 3), (10, 4096, 0)]);
        assert!(idx.list_objects(1, 35, None, 10).is_empty());
        assert_eq!(idx.list_objects(1, 40, None, 10), vec![2]);
    }

    #[test]
    fn same_epoch_later_operation_wins() {
        let mut idx = Index::new();
        ext(&mut idx, 0, 4096, 10, 1);
        ext(&mut idx, 0, 4096, 10, 2);
        assert_eq!(describe(&idx.fetch_array(&path(), 0..4096, 10)), vec![(0, 4096, 2)]);
    }

    #[test]
    fn aggregation_drops_overwritten_and_keeps_snapshot_views() {
        let mut idx = Index::new();
        ext(&mut idx, 0, 8192, 10, 1);
        ext(&mut idx, 0, 8192, 20, 2);
        ext(&mut idx, 0, 4096, 30, 3);
        // Snapshot at 15 keeps epoch 10; epoch 20 is half overwritten at 30: trimmed to its 2nd chunk.
        let (op, pending) = idx.plan_aggregation(&path(), 100, &[15]);
        assert!(pending.is_none());
        idx.apply(&op.unwrap());
        assert_eq!(describe(&idx.fetch_array(&path(), 0..8192, 15)), vec![(0, 8192, 1)]);
        assert_eq!(describe(&idx.fetch_array(&path(), 0..8192, 100)), vec![(0, 4096, 3), (4096, 8192, 2)]);
        let akey = idx.akey(&path()).unwrap();
        assert_eq!(akey.extents.len(), 3);
        assert!(akey.extents.contains_key(&(4096, Version { epoch: 20, id: 1 })));
        // Without the snapshot, epoch 10 goes too.
        let (op, _) = idx.plan_aggregation(&path(), 100, &[]);
        idx.apply(&op.unwrap());
        assert_eq!(idx.akey(&path()).unwrap().extents.len(), 2);
        assert!(idx.plan_aggregation(&path(), 100, &[]).0.is_none());
    }

    #[test]
    fn aggregation_respects_boundary_and_drops_dead_punches() {
        let mut idx = Index::new();
        ext(&mut idx, 0, 4096, 10, 1);
        let v = Version { epoch: 20, id: idx.allocate_id() };
        idx.apply(&Op::Extent { path: path(), ext: Extent { offset: 0, len: 4096, version: v, data: None } });
        let (op, pending) = idx.plan_aggregation(&path(), 15, &[]);
        assert!(op.is_none() && pending == Some(20));
        let (op, _) = idx.plan_aggregation(&path(), 25, &[]);
        idx.apply(&op.unwrap());
        // Data and the punch that hid it are both gone, and so is the empty akey/object.
        assert!(idx.akey(&path()).is_none());
        assert_eq!(idx.object_count(), 0);
    }

    fn at(dkey: &'static [u8], akey: &'static [u8]) -> AkeyPath {
        AkeyPath { cont: 1, obj: 2, dkey: Bytes::from_static(dkey), akey: Bytes::from_static(akey) }
    }

    /// A data extent (`fill` bytes, or a range punch when `fill` is `None`) at `p`.
    fn put(idx: &mut Index, p: &AkeyPath, offset: u64, len: u64, epoch: u64, fill: Option<u8>) -> Version {
        let version = Version { epoch, id: idx.allocate_id() };
        let data = fill.map(|f| {
            let d = Bytes::from(vec![f; len as usize]);
            Stored { loc: Loc::Inline(d.clone()), len, csums: crate::csum::chunk_csums(&d) }
        });
        idx.apply(&Op::Extent { path: p.clone(), ext: Extent { offset, len, version, data } });
        version
    }

    fn single(idx: &mut Index, p: &AkeyPath, epoch: u64, value: &'static [u8]) -> Version {
        let version = Version { epoch, id: idx.allocate_id() };
        let d = Bytes::from_static(value);
        let value = Stored { loc: Loc::Inline(d.clone()), len: d.len() as u64, csums: crate::csum::chunk_csums(&d) };
        idx.apply(&Op::Single { path: p.clone(), version, value });
        version
    }

    fn punch(idx: &mut Index, level: PunchLevel, epoch: u64) -> Version {
        let version = Version { epoch, id: idx.allocate_id() };
        idx.apply(&Op::Punch { cont: 1, obj: 2, level, version });
        version
    }

    fn discard(idx: &mut Index, above: u64, dkey: Option<&'static [u8]>) -> u64 {
        let dkey = dkey.map(Bytes::from_static);
        let (ops, n) = idx.plan_discard(1, 2, above..u64::MAX, dkey.as_ref());
        // Discard is built from the ops aggregation already logs: they survive the WAL encoding.
        assert_eq!(crate::op::decode_ops(Bytes::from(crate::op::encode_ops(&ops))).unwrap(), ops);
        for op in &ops {
            idx.apply(op);
        }
        n
    }

    fn single_at(idx: &Index, p: &AkeyPath, epoch: u64) -> Option<u64> {
        idx.fetch_single(p, epoch).map(|(v, _)| v.epoch)
    }

    #[test]
    fn discard_deletes_versions_above_the_epoch_at_every_level() {
        let mut idx = Index::new();
        let (da, ds, ea, eb) = (at(b"d", b"a"), at(b"d", b"s"), at(b"e", b"a"), at(b"e", b"b"));
        let dkey = |k: &'static [u8]| PunchLevel::Dkey(Bytes::from_static(k));
        let obj_old = punch(&mut idx, PunchLevel::Object, 2);
        punch(&mut idx, dkey(b"d"), 3);
        put(&mut idx, &da, 0, 50, 5, None);
        put(&mut idx, &da, 0, 4096, 10, Some(1));
        put(&mut idx, &da, 100, 100, 25, None);
        put(&mut idx, &da, 0, 4096, 30, Some(3));
        single(&mut idx, &ds, 10, b"old");
        punch(&mut idx, PunchLevel::Akey(Bytes::from_static(b"d"), Bytes::from_static(b"s")), 20);
        single(&mut idx, &ds, 30, b"new");
        punch(&mut idx, dkey(b"d"), 40);
        put(&mut idx, &ea, 0, 4096, 10, Some(7));
        put(&mut idx, &ea, 0, 4096, 50, Some(8));
        put(&mut idx, &eb, 0, 10, 60, Some(9));
        punch(&mut idx, PunchLevel::Object, 45);
        let before = idx.clone();
        assert_eq!(describe(&idx.fetch_array(&da, 0..4096, 44)), vec![(0, 4096, 0)], "the dkey punch at 40 hides it all");

        // Only dkey "d", above 20: the extent and range punch at 30 and 25, the single value at
        // 30 and the dkey punch at 40 go. The akey punch at exactly 20 stays, and so does
        // everything of "e" and the object punch.
        assert_eq!(discard(&mut idx, 20, Some(b"d")), 4);
        assert_eq!(describe(&idx.fetch_array(&da, 0..4096, 44)), vec![(0, 4096, 1)]);
        assert_eq!(describe(&idx.fetch_array(&da, 0..4096, 9)), vec![(0, 50, 0), (50, 4096, 0)]);
        assert_eq!(single_at(&idx, &ds, 44), None, "the akey punch at 20 still hides the value at 10");
        assert_eq!(single_at(&idx, &ds, 15), Some(10));
        assert_eq!(describe(&idx.fetch_array(&ea, 0..4096, 47)), vec![(0, 4096, 0)], "the object punch at 45 is not under the dkey");
        assert_eq!(describe(&idx.fetch_array(&ea, 0..4096, 44)), vec![(0, 4096, 7)]);
        assert_eq!(describe(&idx.fetch_array(&ea, 0..4096, 55)), vec![(0, 4096, 8)]);
        assert_eq!(idx.akey(&eb).unwrap().extents.len(), 1);
        // Everything of "d" at or below 20 is exactly as before.
        for e in [0, 2, 3, 5, 10, 19, 20] {
            assert_eq!(idx.fetch_array(&da, 0..4096, e), before.fetch_array(&da, 0..4096, e), "epoch {e}");
            assert_eq!(idx.fetch_single(&ds, e), before.fetch_single(&ds, e), "epoch {e}");
        }
        // Nothing left above 20 under "d".
        assert_eq!(discard(&mut idx, 20, Some(b"d")), 0);

        // The whole object above 20: "e"'s extents at 50 and 60 (akey "b" disappears) and the
        // object punch at 45; the one at 2 stays.
        assert_eq!(discard(&mut idx, 20, None), 3);
        assert_eq!(describe(&idx.fetch_array(&da, 0..4096, u64::MAX)), vec![(0, 4096, 1)]);
        assert_eq!(describe(&idx.fetch_array(&ea, 0..4096, u64::MAX)), vec![(0, 4096, 7)]);
        assert!(idx.akey(&eb).is_none());
        let o = &idx.containers[&1].objects[&2];
        assert_eq!(o.punches, vec![obj_old]);
        assert_eq!(idx.list_dkeys(1, 2, u64::MAX, None, 10), vec![Bytes::from_static(b"d"), Bytes::from_static(b"e")]);

        // Above 0 deletes everything: first one dkey (it disappears), then the rest.
        assert_eq!(discard(&mut idx, 0, Some(b"e")), 1);
        assert!(!idx.containers[&1].objects[&2].dkeys.contains_key(&Bytes::from_static(b"e")));
        // "d": range punch at 5, extent at 10, single at 10, akey punch at 20, dkey punch at 3;
        // and the object punch at 2.
        assert_eq!(discard(&mut idx, 0, None), 6);
        assert_eq!(idx.object_count(), 0);
        assert!(idx.referenced_blocks().is_empty());
        assert_eq!(idx.plan_discard(1, 2, 0..u64::MAX, None), (Vec::new(), 0));
        assert_eq!(idx.plan_discard(1, 9, 0..u64::MAX, Some(&Bytes::from_static(b"d"))), (Vec::new(), 0));
    }

    #[test]
    fn discard_of_a_dkey_keeps_other_dkeys_and_missing_dkeys_are_no_ops() {
        let mut idx = Index::new();
        let (da, ea) = (at(b"d", b"a"), at(b"e", b"a"));
        put(&mut idx, &da, 0, 100, 10, Some(1));
        put(&mut idx, &ea, 0, 100, 10, Some(2));
        punch(&mut idx, PunchLevel::Dkey(Bytes::from_static(b"e")), 11);
        assert_eq!(discard(&mut idx, 0, Some(b"x")), 0);
        assert_eq!(discard(&mut idx, 10, Some(b"e")), 1);
        assert_eq!(describe(&idx.fetch_array(&ea, 0..100, u64::MAX)), vec![(0, 100, 2)], "the punch is deleted, not hidden");
        // An update the target stored in two pieces (one version) and the one at 10.
        let v = Version { epoch: 12, id: idx.allocate_id() };
        for offset in [0, 50] {
            let d = Bytes::from(vec![3u8; 50]);
            let data = Some(Stored { loc: Loc::Inline(d.clone()), len: 50, csums: crate::csum::chunk_csums(&d) });
            idx.apply(&Op::Extent { path: da.clone(), ext: Extent { offset, len: 50, version: v, data } });
        }
        assert_eq!(describe(&idx.fetch_array(&da, 0..100, 12)), vec![(0, 50, 3), (50, 100, 3)]);
        assert_eq!(discard(&mut idx, 0, Some(b"d")), 2);
        assert!(idx.akey(&da).is_none());
        assert_eq!(idx.list_dkeys(1, 2, u64::MAX, None, 10), vec![Bytes::from_static(b"e")]);
        assert_eq!(idx.object_count(), 1);
    }

    #[test]
    fn a_bounded_discard_keeps_the_versions_at_and_above_its_upper_epoch() {
        let mut idx = Index::new();
        let da = at(b"d", b"a");
        put(&mut idx, &da, 0, 100, 10, Some(1));
        put(&mut idx, &da, 0, 100, 20, Some(2));
        put(&mut idx, &da, 50, 50, 30, Some(3));
        punch(&mut idx, PunchLevel::Dkey(Bytes::from_static(b"d")), 25);
        // (10, 30): the extent at 20 and the dkey punch at 25 go; 10 and 30 stay.
        let (ops, n) = idx.plan_discard(1, 2, 10..30, Some(&Bytes::from_static(b"d")));
        assert_eq!(n, 2);
        for op in &ops {
            idx.apply(op);
        }
        assert_eq!(describe(&idx.fetch_array(&da, 0..100, u64::MAX)), vec![(0, 50, 1), (50, 100, 3)]);
        assert_eq!(describe(&idx.fetch_array(&da, 0..100, 29)), vec![(0, 100, 1)]);
        assert_eq!(idx.plan_discard(1, 2, 10..30, None), (Vec::new(), 0), "nothing left in the window");
    }

    #[test]
    fn dkeys_since_lists_every_change_in_the_window() {
        let mut idx = Index::new();
        let keys = |v: Vec<Bytes>| v.iter().map(|k| k[0]).collect::<Vec<u8>>();
        put(&mut idx, &at(b"a", b"x"), 0, 10, 10, Some(1));
        put(&mut idx, &at(b"b", b"x"), 0, 10, 10, Some(1));
        put(&mut idx, &at(b"b", b"x"), 0, 10, 30, Some(2));
        single(&mut idx, &at(b"c", b"s"), 10, b"v");
        punch(&mut idx, PunchLevel::Dkey(Bytes::from_static(b"c")), 30);
        put(&mut idx, &at(b"d", b"x"), 0, 10, 10, Some(1));
        put(&mut idx, &at(b"d", b"x"), 5, 1, 30, None);
        put(&mut idx, &at(b"e", b"x"), 0, 10, 10, Some(1));
        punch(&mut idx, PunchLevel::Akey(Bytes::from_static(b"e"), Bytes::from_static(b"x")), 30);
        put(&mut idx, &at(b"f", b"x"), 0, 10, 50, Some(1));
        single(&mut idx, &at(b"g", b"s"), 20, b"v");
        // An update, a wholly punched dkey (nothing visible), a range punch and an akey punch.
        assert_eq!(keys(idx.list_dkeys_since(1, 2, 20, 40, None, 100)), b"bcde".to_vec());
        assert!(!idx.list_dkeys(1, 2, 40, None, 100).contains(&Bytes::from_static(b"c")));
        assert_eq!(keys(idx.list_dkeys_since(1, 2, 20, 40, Some(&Bytes::from_static(b"b")), 2)), b"cd".to_vec());
        assert_eq!(keys(idx.list_dkeys_since(1, 2, 20, 60, None, 100)), b"bcdef".to_vec());
        assert_eq!(keys(idx.list_dkeys_since(1, 2, 19, 20, None, 100)), b"g".to_vec());
        assert!(idx.list_dkeys_since(1, 2, 40, 40, None, 100).is_empty());
        assert!(idx.list_dkeys_since(1, 2, 60, 40, None, 100).is_empty());
        assert!(idx.list_dkeys_since(1, 3, 0, u64::MAX, None, 100).is_empty());
        // An object punch in the window lists every dkey that has a version at or below the
        // epoch; one outside the window changes nothing.
        punch(&mut idx, PunchLevel::Object, 35);
        assert_eq!(keys(idx.list_dkeys_since(1, 2, 34, 40, None, 100)), b"abcdeg".to_vec());
        assert!(idx.list_dkeys_since(1, 2, 35, 40, None, 100).is_empty());
        assert_eq!(keys(idx.list_dkeys_since(1, 2, 34, 60, None, 100)), b"abcdefg".to_vec());
        assert_eq!(keys(idx.list_dkeys_since(1, 2, 34, 40, Some(&Bytes::from_static(b"c")), 2)), b"de".to_vec());
    }
}
