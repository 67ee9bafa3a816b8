//! Aggregation: folding versions below the boundary (retained epochs kept) into the newest one,
//! in steps bounded by akeys, freeing the blocks they no longer reference once the record that
//! says so is durable (quarantine).

#[allow(clippy::wildcard_imports)] // the parent module's types and imports, as if this were its body
use super::*;

/// Data-file blocks an aggregation op stops referencing.
pub(super) fn freed_blocks(index: &Index, op: &Op) -> Vec<(u64, u64)> {
    let Op::Aggregate { path, remove_extents, add_extents, remove_singles, .. } = op else { return Vec::new() };
    let Some(akey) = index.akey(path) else { return Vec::new() };
    let mut freed: Vec<Range<u64>> = remove_extents
        .iter()
        .filter_map(|k| akey.extents.get(k))
        .filter_map(|b| b.data.as_ref().and_then(Stored::blocks))
        .chain(remove_singles.iter().filter_map(|v| akey.singles.get(v)).filter_map(Stored::blocks))
        .map(|(s, n)| s..s + n)
        .collect();
    freed.sort_unstable_by_key(|r| r.start);
    for (ks, kn) in add_extents.iter().filter_map(|e| e.data.as_ref().and_then(Stored::blocks)) {
        subtract(&mut freed, &(ks..ks + kn));
    }
    freed.into_iter().map(|r| (r.start, r.end - r.start)).collect()
}

impl Target {
    /// Whether more than half of the data file is in use.
    pub fn space_pressure(&self) -> bool {
        self.alloc.used() * 2 > self.alloc.total()
    }

    /// Whether aggregation has akeys left to look at, now or once the boundary moves.
    pub fn aggregation_pending(&self) -> bool {
        !self.dirty.is_empty() || !self.deferred.is_empty()
    }

    /// The epoch below which `cont`'s versions are folded: the container's own, else `now` minus
    /// the lag; never above the stable epoch (a host write may still commit above it), the
    /// epoch the service's snapshot list is complete to, nor where the engine's EC aggregator
    /// has settled the container's torn stripes (their evidence must outlive them).
    fn boundary(&self, cont: u128, now: u64) -> u64 {
        let below = self.index.retention(cont).aggregate_below;
        let wanted = if below > 0 { below } else { now.saturating_sub(self.cfg.aggregation_lag) };
        wanted.min(self.stable_epoch()).min(self.snapshot_horizon()).min(self.ec_horizon(cont))
    }

    /// Moves parked akeys whose waiting epoch the boundary has reached back to the dirty set.
    fn wake_deferred(&mut self, now: u64) {
        while let Some(Reverse((epoch, path))) = self.deferred.peek() {
            if *epoch > self.boundary(path.cont, now) {
                break;
            }
            if let Some(Reverse((_, path))) = self.deferred.pop() {
                self.dirty.insert(path);
            }
        }
    }

    /// Aggregates up to the configured budget of akeys; `now` is the current epoch (HLC) used
    /// for containers without an explicit aggregation epoch. Commits what it changed. Returns
    /// the number of blocks freed.
    pub fn aggregate_step(&mut self, now: u64) -> Result<u64, EngineError> {
        self.check_healthy()?;
        if !self.settled() {
            return Ok(0);
        }
        self.advance_floor(now);
        self.wake_deferred(now);
        let batch: Vec<AkeyPath> = self.dirty.iter().take(self.cfg.aggregation_budget).cloned().collect();
        let mut freed = Vec::new();
        let mut objects = BTreeSet::new();
        for path in batch {
            self.dirty.remove(&path);
            let retained = self.retained_epochs(path.cont, &self.index.retention(path.cont).retained);
            let boundary = self.boundary(path.cont, now);
            let (op, pending) = self.index.plan_aggregation(&path, boundary, &retained);
            if let Some(op) = op {
                freed.extend(freed_blocks(&self.index, &op));
                self.staged.push(op);
                objects.insert((path.cont, path.obj, boundary));
            }
            if let Some(epoch) = pending {
                // Newer versions become aggregatable once the boundary reaches them: park the
                // akey until then instead of planning it again at every step.
                self.deferred.push(Reverse((epoch, path)));
            }
        }
        let count: u64 = freed.iter().map(|(_, n)| n).sum();
        for (s, n) in freed {
            self.alloc.quarantine(s, n);
        }
        self.commit()?;
        // Object and dkey punches left with nothing older beneath them can go too.
        for (cont, obj, boundary) in objects {
            let ops = self.index.plan_unpunch(cont, obj, boundary);
            self.staged.extend(ops);
        }
        self.commit()?;
        Ok(count)
    }
}
