//! The data file's block allocator: free runs of 4 KiB blocks.
//!
//! Nothing about it is persisted: after a restart it is rebuilt from the blocks the recovered
//! index references, so the allocator and the index cannot disagree. Blocks freed by
//! aggregation are first *quarantined* and only become allocatable once the WAL record that
//! freed them is durable; otherwise a crash could bring back an index entry pointing at blocks
//! already reused for new data.

use std::collections::BTreeMap;

/// Free space as disjoint runs keyed by first block.
#[derive(Debug, Clone)]
pub struct Allocator {
    free: BTreeMap<u64, u64>,
    quarantine: Vec<(u64, u64)>,
    total: u64,
    free_blocks: u64,
    /// Where the next search starts (next-fit keeps sequential writes sequential on disk).
    cursor: u64,
}

impl Allocator {
    /// `total` blocks, all free.
    pub fn new(total: u64) -> Self {
        let mut free = BTreeMap::new();
        if total > 0 {
            free.insert(0, total);
        }
        Self { free, quarantine: Vec::new(), total, free_blocks: total, cursor: 0 }
    }

    /// `total` blocks with the `used` runs taken. Fails if two runs overlap or one is out of range.
    pub fn rebuild(total: u64, used: &[(u64, u64)]) -> Result<Self, String> {
        let mut runs: Vec<(u64, u64)> = used.iter().copied().filter(|r| r.1 > 0).collect();
        runs.sort_unstable();
        let mut free = BTreeMap::new();
        let mut pos = 0u64;
        let mut free_blocks = 0;
        for (start, n) in runs {
            if start < pos {
                return Err(format!("block {start} is referenced twice"));
            }
            let end = start.checked_add(n).filter(|e| *e <= total).ok_or_else(|| format!("blocks {start}+{n} beyond the data file"))?;
            if start > pos {
                free.insert(pos, start - pos);
                free_blocks += start - pos;
            }
            pos = end;
        }
        if pos < total {
            free.insert(pos, total - pos);
            free_blocks += total - pos;
        }
        Ok(Self { free, quarantine: Vec::new(), total, free_blocks, cursor: 0 })
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
        self.free.values().copied().max().unwrap_or(0)
    }

    /// Takes `n` contiguous blocks, next-fit from the cursor.
    pub fn alloc(&mut self, n: u64) -> Option<u64> {
        if n == 0 || n > self.free_blocks {
            return None;
        }
        let found = self.free.range(self.cursor..).chain(self.free.range(..self.cursor)).find(|(_, len)| **len >= n).map(|(s, l)| (*s, *l));
        let (start, len) = found?;
        self.free.remove(&start);
        if len > n {
            self.free.insert(start + n, len - n);
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
                self.free.remove(&ps);
                start = ps;
                n += pl;
            }
        }
        if let Some(&nl) = self.free.get(&(start + n)) {
            self.free.remove(&(start + n));
            n += nl;
        }
        self.free.insert(start, n);
    }

    /// Frees a run once the record that stopped referencing it is durable.
    pub fn quarantine(&mut self, start: u64, n: u64) {
        if n > 0 {
            self.quarantine.push((start, n));
        }
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
