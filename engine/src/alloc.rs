//! The data file's block allocator: free runs of 4 KiB blocks.
//!
//! Nothing about it is persisted: after a restart it is rebuilt from the blocks the recovered
//! index references, so the allocator and the index cannot disagree. Blocks freed by
//! aggregation are first *quarantined* and only become allocatable once the WAL record that
//! freed them is durable; otherwise a crash could bring back an index entry pointing at blocks
//! already reused for new data.
//!
//! Every operation is logarithmic in the number of free runs: runs are indexed by first block and
//! by length, and next-fit looks at only [`NEXT_FIT_PROBES`] runs after its cursor before it
//! takes the smallest run that fits (a fragmented file of 100k runs must not cost a scan per
//! update).

use std::collections::{BTreeMap, BTreeSet};

/// Runs next-fit examines from its cursor before it falls back to the smallest run that fits.
pub const NEXT_FIT_PROBES: usize = 8;

/// Free space as disjoint runs keyed by first block.
#[derive(Debug, Clone)]
pub struct Allocator {
    free: BTreeMap<u64, u64>,
    /// The same runs as (length, first block).
    by_len: BTreeSet<(u64, u64)>,
    quarantine: Vec<(u64, u64)>,
    total: u64,
    free_blocks: u64,
    /// Where the next search starts (next-fit keeps sequential writes sequential on disk).
    cursor: u64,
}

impl Allocator {
    /// `total` blocks, all free.
    pub fn new(total: u64) -> Self {
        let mut a = Self { free: BTreeMap::new(), by_len: BTreeSet::new(), quarantine: Vec::new(), total, free_blocks: total, cursor: 0 };
        if total > 0 {
            a.insert_run(0, total);
        }
        a
    }

    fn insert_run(&mut self, start: u64, len: u64) {
        self.free.insert(start, len);
        self.by_len.insert((len, start));
    }

    fn remove_run(&mut self, start: u64, len: u64) {
        self.free.remove(&start);
        self.by_len.remove(&(len, start));
    }

    /// `total` blocks with the `used` runs taken. Fails if two runs overlap or one is out of range.
    pub fn rebuild(total: u64, used: &[(u64, u64)]) -> Result<Self, String> {
        let mut runs: Vec<(u64, u64)> = used.iter().copied().filter(|r| r.1 > 0).collect();
        runs.sort_unstable();
        let mut free = Vec::new();
        let mut pos = 0u64;
        let mut free_blocks = 0;
        for (start, n) in runs {
            if start < pos {
                return Err(format!("block {start} is referenced twice"));
            }
            let end = start.checked_add(n).filter(|e| *e <= total).ok_or_else(|| format!("blocks {start}+{n} beyond the data file"))?;
            if start > pos {
                free.push((pos, start - pos));
                free_blocks += start - pos;
            }
            pos = end;
        }
        if pos < total {
            free.push((pos, total - pos));
            free_blocks += total - pos;
        }
        let mut a = Self { free: BTreeMap::new(), by_len: BTreeSet::new(), quarantine: Vec::new(), total, free_blocks, cursor: 0 };
        for (start, len) in free {
            a.insert_run(start, len);
        }
        Ok(a)
    }

    /// Total blocks.
    pub fn total(&self) -> u64 {
        self.total
    }

    /// Blocks in use (including quarantined ones).
    pub fn used(&self) -> u64 {
        self.total - self.free_blocks
    }

    /// The largest contiguous run available now.
    pub fn largest_free(&self) -> u64 {
        self.by_len.last().map_or(0, |r| r.0)
    }

    /// Takes `n` contiguous blocks: next-fit from the cursor (so sequential writes stay
    /// sequential on disk) among the next [`NEXT_FIT_PROBES`] runs, else the smallest run that fits.
    pub fn alloc(&mut self, n: u64) -> Option<u64> {
        if n == 0 || n > self.free_blocks {
            return None;
        }
        let near = self.free.range(self.cursor..).chain(self.free.range(..self.cursor)).take(NEXT_FIT_PROBES).find(|(_, len)| **len >= n);
        let found = near.map(|(s, l)| (*s, *l)).or_else(|| self.by_len.range((n, 0)..).next().map(|(l, s)| (*s, *l)));
        let (start, len) = found?;
        self.remove_run(start, len);
        if len > n {
            self.insert_run(start + n, len - n);
        }
        self.free_blocks -= n;
        self.cursor = start + n;
        Some(start)
    }

    /// Returns a run straight to the free set (blocks never referenced by a durable record).
    pub fn release(&mut self, start: u64, n: u64) {
        if n == 0 {
            return;
        }
        self.free_blocks += n;
        let mut start = start;
        let mut n = n;
        if let Some((&ps, &pl)) = self.free.range(..start).next_back() {
            if ps + pl == start {
                self.remove_run(ps, pl);
                start = ps;
                n += pl;
            }
        }
        if let Some(&nl) = self.free.get(&(start + n)) {
            self.remove_run(start + n, nl);
            n += nl;
        }
        self.insert_run(start, n);
    }

    /// Frees a run once the record that stopped referencing it is durable.
    pub fn quarantine(&mut self, start: u64, n: u64) {
        if n > 0 {
            self.quarantine.push((start, n));
        }
    }

    /// Takes the quarantined runs, for the caller to [`Allocator::release`] once the record that
    /// freed them is durable.
    pub fn take_quarantine(&mut self) -> Vec<(u64, u64)> {
        std::mem::take(&mut self.quarantine)
    }

    /// The WAL is durable up to now: quarantined runs become free.
    pub fn release_quarantine(&mut self) {
        for (s, n) in std::mem::take(&mut self.quarantine) {
            self.release(s, n);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The longest run of free blocks in a bitmap model.
    fn model_largest(used: &[bool]) -> u64 {
        used.split(|u| *u).map(|r| r.len() as u64).max().unwrap_or(0)
    }

    proptest! {
        /// Against a bitmap: alloc succeeds exactly when a run of `n` free blocks exists and takes
        /// only free blocks; release and the counts agree; the size index follows every change.
        #[test]
        fn matches_a_bitmap_model(ops in proptest::collection::vec((any::<bool>(), 1u64..12, any::<u16>()), 1..200)) {
            let total = 64u64;
            let mut a = Allocator::new(total);
            let mut used = vec![false; total as usize];
            let mut live: Vec<(u64, u64)> = Vec::new();
            for (take, n, pick) in ops {
                if take || live.is_empty() {
                    let fits = model_largest(&used) >= n;
                    match a.alloc(n) {
                        Some(s) => {
                            prop_assert!(fits);
                            for b in s..s + n {
                                prop_assert!(!used[b as usize], "block {} handed out twice", b);
                                used[b as usize] = true;
                            }
                            live.push((s, n));
                        }
                        None => prop_assert!(!fits, "a run of {} was free", n),
                    }
                } else {
                    let (s, n) = live.swap_remove(pick as usize % live.len());
                    a.release(s, n);
                    for b in s..s + n {
                        used[b as usize] = false;
                    }
                }
                prop_assert_eq!(a.used(), used.iter().filter(|u| **u).count() as u64);
                prop_assert_eq!(a.largest_free(), model_largest(&used));
                prop_assert_eq!(a.by_len.len(), a.free.len());
            }
        }
    }

    #[test]
    fn alloc_release_coalesces() {
        let mut a = Allocator::new(10);
        assert_eq!(a.alloc(4), Some(0));
        assert_eq!(a.alloc(4), Some(4));
        assert_eq!(a.alloc(4), None);
        a.release(0, 4);
        a.release(4, 4);
        assert_eq!(a.largest_free(), 10);
        assert_eq!(a.used(), 0);
    }

    #[test]
    fn quarantine_holds_blocks_until_released() {
        let mut a = Allocator::new(4);
        let s = a.alloc(4).unwrap();
        a.quarantine(s, 4);
        assert_eq!(a.alloc(1), None);
        a.release_quarantine();
        assert_eq!(a.alloc(4), Some(0));
    }

    #[test]
    fn rebuild_detects_double_reference() {
        assert!(Allocator::rebuild(10, &[(0, 4), (3, 2)]).is_err());
        assert!(Allocator::rebuild(10, &[(8, 4)]).is_err());
        let a = Allocator::rebuild(10, &[(2, 2), (6, 1)]).unwrap();
        assert_eq!(a.used(), 3);
        assert_eq!(a.largest_free(), 3);
    }
}
