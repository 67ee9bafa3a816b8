//! The snapshot epochs the management service retains, as this target last heard them
//! (docs/PLACEMENT.md, "Snapshots"). They live in memory only: after a restart nothing is
//! aggregated until the engine's registration reply brings them again, because
//! [`Snapshots::as_of`] starts at 0.

use std::collections::HashMap;

#[allow(clippy::wildcard_imports)] // the parent module's types and imports, as if this were its body
use super::*;

/// The retained snapshot epochs of every container, complete up to an epoch.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshots {
    /// Every snapshot taken after this epoch has a larger epoch: aggregation never folds above
    /// it, so a snapshot the target has not heard of yet still finds its versions.
    pub as_of: u64,
    /// Snapshot epochs per container, ascending.
    pub epochs: HashMap<u128, Vec<u64>>,
}

/// How far the engine's EC aggregator has settled each EC volume of a target.
#[derive(Debug, Default)]
pub(super) struct EcSettled {
    /// Its first pass has named every EC volume it found.
    ready: bool,
    /// Per container: torn stripes are settled at or below this epoch.
    below: HashMap<u128, u64>,
}

impl Target {
    /// Takes a new list of snapshots. Containers that lost a snapshot are looked at again by
    /// aggregation, which frees what only that snapshot held.
    pub fn set_snapshots(&mut self, new: Arc<Snapshots>) {
        let lost: Vec<u128> = match &self.snapshots {
            Some(old) => old
                .epochs
                .iter()
                .filter(|(cont, epochs)| {
                    let kept = new.epochs.get(cont).map(Vec::as_slice).unwrap_or_default();
                    epochs.iter().any(|e| kept.binary_search(e).is_err())
                })
                .map(|(cont, _)| *cont)
                .collect(),
            None => Vec::new(),
        };
        for cont in lost {
            let paths = self.index.container_akey_paths(cont);
            self.dirty.extend(paths);
        }
        // Containers whose list changed: their snapshots' space is computed again.
        let old = self.snapshots.as_ref().map(|s| &s.epochs);
        for (cont, epochs) in &new.epochs {
            if old.and_then(|o| o.get(cont)) != Some(epochs) {
                self.usage.touch(*cont);
            }
        }
        for cont in old.into_iter().flat_map(|o| o.keys()).filter(|c| !new.epochs.contains_key(c)) {
            self.usage.touch(*cont);
        }
        self.snapshots = Some(new);
    }

    /// Takes how far the engine's EC aggregator has settled the torn stripes of container
    /// `cont` (`u64::MAX`: not an EC volume any more, no limit); `None`: its first pass has
    /// said it for every EC volume, and containers it has not named are not limited.
    pub fn settle_ec(&mut self, cont: Option<u128>, below: u64) {
        let Some(g) = &mut self.ec_settled else { return };
        match cont {
            None => g.ready = true,
            Some(c) if below == u64::MAX => {
                g.below.remove(&c);
            }
            Some(c) => {
                g.below.insert(c, below);
            }
        }
    }

    /// Aggregation of container `cont` stays at or below this epoch: torn stripes above it are
    /// not settled yet, and a torn write's versions (a punch above all) are what settles them.
    pub(super) fn ec_horizon(&self, cont: u128) -> u64 {
        match &self.ec_settled {
            None => u64::MAX,
            Some(g) if !g.ready => 0,
            Some(g) => g.below.get(&cont).copied().unwrap_or(u64::MAX),
        }
    }

    /// Aggregation stays at or below this epoch: the service's snapshot list is complete only
    /// that far (no limit on a target that does not follow a service).
    pub(super) fn snapshot_horizon(&self) -> u64 {
        self.snapshots.as_ref().map_or(u64::MAX, |s| s.as_of)
    }

    /// The epochs whose views of container `cont` aggregation keeps: its own retention's and
    /// the service's snapshots, ascending.
    pub(super) fn retained_epochs(&self, cont: u128, own: &[u64]) -> Vec<u64> {
        let mut all = own.to_vec();
        if let Some(e) = self.snapshots.as_ref().and_then(|s| s.epochs.get(&cont)) {
            all.extend_from_slice(e);
        }
        all.sort_unstable();
        all.dedup();
        all
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::MemStorage;
    use crate::target::tests::{p, small};
    use tessera_engine_proto::UpdateValue;

    fn write(t: &mut Target, epoch: u64, fill: u8) {
        let value = UpdateValue::array(0, Bytes::from(vec![fill; BLOCK as usize]));
        t.stage(Mutation::Update { path: p(b"d", b"a"), epoch, value }).unwrap();
        t.commit().unwrap();
    }

    fn byte_at(t: &Target, epoch: u64) -> u8 {
        t.fetch_array(&p(b"d", b"a"), 0, BLOCK, epoch).unwrap().data[0]
    }

    fn used_blocks(t: &Target) -> u64 {
        t.info().used / BLOCK
    }

    fn told(as_of: u64, epochs: &[u64]) -> Arc<Snapshots> {
        let mut s = Snapshots { as_of, epochs: HashMap::new() };
        if !epochs.is_empty() {
            s.epochs.insert(1, epochs.to_vec());
        }
        Arc::new(s)
    }

    #[test]
    fn a_target_following_a_service_aggregates_only_what_no_snapshot_it_heard_of_can_see() {
        let cfg = TargetConfig { capacity: 64 * BLOCK, follows_service: true, ..small() };
        let mut t = Target::open(Arc::new(MemStorage::new()), cfg).unwrap();
        for (epoch, fill) in [(10, 1), (20, 2), (30, 3), (40, 4)] {
            write(&mut t, epoch, fill);
        }
        assert_eq!(used_blocks(&t), 4);
        // Nothing heard yet: a snapshot could exist at any epoch.
        t.aggregate_step(100).unwrap();
        assert_eq!(used_blocks(&t), 4, "aggregated before the service said which snapshots exist");
        // Heard up to 25: 10 folds into 20; 30 and 40 wait.
        t.set_snapshots(told(25, &[]));
        t.aggregate_step(100).unwrap();
        assert_eq!((used_blocks(&t), byte_at(&t, 25), byte_at(&t, 35)), (3, 2, 3));
        // Complete to 100 with a snapshot at 35: its view (30) and the newest (40) stay.
        t.set_snapshots(told(100, &[35]));
        t.aggregate_step(100).unwrap();
        assert_eq!((used_blocks(&t), byte_at(&t, 35), byte_at(&t, u64::MAX)), (2, 3, 4));
        // The snapshot is deleted: what only it held is freed.
        t.set_snapshots(told(100, &[]));
        t.aggregate_step(100).unwrap();
        assert_eq!((used_blocks(&t), byte_at(&t, u64::MAX)), (1, 4));
    }

    #[test]
    fn an_ec_volume_aggregates_only_as_far_as_the_engine_settled_its_torn_stripes() {
        let cfg = TargetConfig { capacity: 64 * BLOCK, follows_service: true, ec_settled_by_engine: true, ..small() };
        let mut t = Target::open(Arc::new(MemStorage::new()), cfg).unwrap();
        t.set_snapshots(told(100, &[]));
        for (epoch, fill) in [(10, 1), (20, 2), (30, 3)] {
            write(&mut t, epoch, fill);
        }
        // Before the engine's first pass named its EC volumes: nothing.
        t.aggregate_step(100).unwrap();
        assert_eq!(used_blocks(&t), 3, "aggregated before the EC volumes were named");
        // Container 1 settled to 25: 10 folds into 20; 30 waits.
        t.settle_ec(Some(1), 25);
        t.settle_ec(None, 0);
        t.aggregate_step(100).unwrap();
        assert_eq!((used_blocks(&t), byte_at(&t, 25), byte_at(&t, u64::MAX)), (2, 2, 3));
        // Settled further (or no longer an EC volume): the rest.
        t.settle_ec(Some(1), u64::MAX);
        t.aggregate_step(100).unwrap();
        assert_eq!((used_blocks(&t), byte_at(&t, u64::MAX)), (1, 3));
    }

    #[test]
    fn a_target_without_a_service_keeps_its_own_boundary() {
        let mut t = Target::open(Arc::new(MemStorage::new()), TargetConfig { capacity: 64 * BLOCK, ..small() }).unwrap();
        write(&mut t, 10, 1);
        write(&mut t, 20, 2);
        t.aggregate_step(100).unwrap();
        assert_eq!((used_blocks(&t), byte_at(&t, u64::MAX)), (1, 2));
    }
}

#[cfg(test)]
mod punched_fragments {
    use super::*;
    use crate::backend::MemStorage;
    use crate::target::tests::p;
    use tessera_engine_proto::UpdateValue;

    /// What EC aggregation relies on: fragments hidden by a newer range punch are freed by the
    /// target's own aggregation, whether they were still in the WAL or already destaged.
    #[test]
    fn fragments_under_a_range_punch_are_freed() {
        let cfg = TargetConfig { capacity: 4096 * BLOCK, commit_window: 0, aggregation_lag: 0, ..TargetConfig::default() };
        let mut t = Target::open(Arc::new(MemStorage::new()), cfg).unwrap();
        for i in 0..64u64 {
            let value = UpdateValue::array(i * 4096, Bytes::from(vec![1u8; 4096]));
            t.stage(Mutation::Update { path: p(b"d", b"D"), epoch: 10 + i, value }).unwrap();
            t.commit().unwrap();
        }
        t.destage_step(u64::MAX).unwrap();
        assert_eq!(t.info().used / BLOCK, 64);
        let range = PunchTarget::Range { dkey: Bytes::from_static(b"d"), akey: Bytes::from_static(b"D"), offset: 0, len: 64 * 4096 };
        t.stage(Mutation::Punch { cont: 1, obj: 7, epoch: 200, what: range }).unwrap();
        t.commit().unwrap();
        t.aggregate_step(1000).unwrap();
        t.aggregate_step(1000).unwrap();
        assert_eq!(t.info().used, 0);
    }
}
