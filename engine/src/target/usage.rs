//! Space accounting per container: the bytes a container's versions take on this target, and
//! for each retained epoch (snapshot) the bytes that only its view still reads — what deleting
//! that snapshot would let aggregation free.
//!
//! A stored version counts whole (its data-file blocks, or its length when inline). It is
//! *held* by every view in which some byte of it is the newest visible version: the head (the
//! newest epoch) and each retained epoch. A version held by exactly one retained epoch and not
//! by the head is that snapshot's alone; one held by no view waits for aggregation and counts
//! only in the container's total. Results are cached per container and computed again only for
//! containers that changed (a commit touched them, or their retained epochs changed), at most
//! once per [`USAGE_EVERY`], on a thread of their own over a copy of the index: a computation
//! over a large container with many snapshots must not hold the target thread (it once slowed
//! the freeing after a snapshot deletion from 2 s to 17–46 s).

#[allow(clippy::wildcard_imports)] // the parent module's types and imports, as if this were its body
use super::*;
use std::collections::HashMap;

/// Shortest interval between two computations of a changed container's usage.
pub const USAGE_EVERY: Duration = Duration::from_secs(2);

/// The space one container takes on a target.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ContainerUsage {
    /// Container id.
    pub cont: u128,
    /// Bytes its versions take (data and inline values).
    pub bytes: u64,
    /// (retained epoch, bytes only that epoch's view reads), ascending by epoch.
    pub retained: Vec<(u64, u64)>,
}

/// What a computation found: per container, its usage (`None`: the container is gone).
type Computed = Vec<(u128, Option<ContainerUsage>)>;

/// The cache of [`ContainerUsage`]s of a target.
#[derive(Debug, Default)]
pub(super) struct UsageCache {
    by_cont: HashMap<u128, ContainerUsage>,
    stale: BTreeSet<u128>,
    computed: Option<Instant>,
    /// A computation running on a thread of its own, over a copy of the index.
    running: Option<std::sync::mpsc::Receiver<Computed>>,
}

impl UsageCache {
    /// Marks container `cont` changed.
    pub(super) fn touch(&mut self, cont: u128) {
        self.stale.insert(cont);
    }
}

fn stored_bytes(s: &Stored) -> u64 {
    s.blocks().map_or(s.len, |(_, n)| n * BLOCK)
}

/// The usage of container `cont` in `index`, with views at `retained` (ascending) and the head.
pub fn container_usage(index: &Index, cont: u128, retained: &[u64]) -> ContainerUsage {
    let mut out = ContainerUsage { cont, bytes: 0, retained: retained.iter().map(|e| (*e, 0)).collect() };
    let head = retained.len();
    for path in index.container_akey_paths(cont) {
        let Some(akey) = index.akey(&path) else { continue };
        out.bytes += akey.singles.values().map(stored_bytes).sum::<u64>();
        let Some(end) = akey.extents.iter().map(|((off, _), b)| off + b.len).max() else { continue };
        // Views (bit i: retained[i]; bit `head`: the head) reading some byte of each extent.
        let mut held: HashMap<(u64, Version), u128> = HashMap::new();
        for (i, epoch) in retained.iter().copied().chain([u64::MAX]).enumerate() {
            for seg in index.fetch_array(&path, 0..end, epoch) {
                if let (Some(v), Source::Data { extent_start, .. }) = (seg.version, &seg.source) {
                    *held.entry((*extent_start, v)).or_default() |= 1u128 << i.min(127);
                }
            }
        }
        for (&(off, v), body) in &akey.extents {
            let Some(stored) = &body.data else { continue };
            let bytes = stored_bytes(stored);
            out.bytes += bytes;
            let views = held.get(&(off, v)).copied().unwrap_or(0);
            if views.count_ones() == 1 && views & (1u128 << head.min(127)) == 0 {
                let only = views.trailing_zeros() as usize;
                if let Some(r) = out.retained.get_mut(only) {
                    r.1 += bytes;
                }
            }
        }
    }
    out
}

impl Target {
    /// The space every container takes here, as last computed. Containers that changed are
    /// computed again, at most every [`USAGE_EVERY`], on a thread of their own over a copy of the
    /// index (copy-on-write: one pointer per akey), so the target thread never waits for it.
    pub fn usage(&mut self) -> Vec<ContainerUsage> {
        if let Some(rx) = &self.usage.running {
            match rx.try_recv() {
                Ok(results) => {
                    for (cont, u) in results {
                        match u {
                            Some(u) => self.usage.by_cont.insert(cont, u),
                            None => self.usage.by_cont.remove(&cont),
                        };
                    }
                    self.usage.running = None;
                }
                Err(std::sync::mpsc::TryRecvError::Empty) => {}
                Err(std::sync::mpsc::TryRecvError::Disconnected) => self.usage.running = None,
            }
        }
        let due = self.usage.computed.is_none_or(|t| t.elapsed() >= USAGE_EVERY);
        if due && self.usage.running.is_none() && !self.usage.stale.is_empty() {
            let work: Vec<(u128, Vec<u64>)> = std::mem::take(&mut self.usage.stale)
                .into_iter()
                .map(|cont| (cont, self.retained_epochs(cont, &self.index.retention(cont).retained)))
                .collect();
            let index = self.index.clone();
            let (tx, rx) = std::sync::mpsc::channel();
            let spawned = std::thread::Builder::new().name("target-usage".into()).spawn(move || {
                let results = work
                    .into_iter()
                    .map(|(cont, retained)| {
                        let u = index.containers.contains_key(&cont).then(|| container_usage(&index, cont, &retained));
                        (cont, u)
                    })
                    .collect();
                let _ = tx.send(results);
            });
            if spawned.is_ok() {
                self.usage.running = Some(rx);
            }
            self.usage.computed = Some(Instant::now());
        }
        let mut all: Vec<ContainerUsage> = self.usage.by_cont.values().cloned().collect();
        all.sort_unstable_by_key(|u| u.cont);
        all
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::op::{AkeyPath, Extent, Loc, Op, Stored};

    fn path() -> AkeyPath {
        AkeyPath { cont: 7, obj: 1, dkey: Bytes::from_static(b"d"), akey: Bytes::from_static(b"a") }
    }

    /// An extent of `blocks` blocks at block offset `at`, written at `epoch`.
    fn write(index: &mut Index, at: u64, blocks: u64, epoch: u64) {
        let id = index.allocate_id();
        let ext = Extent {
            offset: at * BLOCK,
            len: blocks * BLOCK,
            version: Version { epoch, id },
            data: Some(Stored { loc: Loc::Blocks { start: 1000 + id * 16 }, len: blocks * BLOCK, csums: Vec::new() }),
        };
        index.apply(&Op::Extent { path: path(), ext });
    }

    #[test]
    fn a_version_only_a_snapshot_reads_counts_to_that_snapshot() {
        let mut index = Index::new();
        write(&mut index, 0, 4, 10); // blocks 0..4 at 10
        write(&mut index, 0, 2, 20); // blocks 0..2 at 20: the first still read at 2..4 by all
        write(&mut index, 0, 4, 30); // blocks 0..4 at 30: hides both at the head
        write(&mut index, 8, 1, 5); // block 8 at 5: read by every view
                                    // Snapshots at 15 and 25.
        let u = container_usage(&index, 7, &[15, 25]);
        assert_eq!(u.bytes, 11 * BLOCK);
        // At 15: the extent at 10 (also read at 25, blocks 2..4): nothing of its own.
        // At 25: the extent at 20 alone.
        assert_eq!(u.retained, vec![(15, 0), (25, 2 * BLOCK)]);
        // Without snapshots nothing is any snapshot's; with one at 12 the extent at 10 is its
        // own only if no other view reads it: 25 is gone, so it is.
        assert_eq!(container_usage(&index, 7, &[]).retained, vec![]);
        assert_eq!(container_usage(&index, 7, &[12]).retained, vec![(12, 4 * BLOCK)]);
        // Another container holds nothing.
        assert_eq!(container_usage(&index, 8, &[12]).bytes, 0);
    }
}
