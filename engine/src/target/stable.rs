//! The target's stable epoch: the commit window that bounds how late a host write may commit,
//! and the epoch below which nothing can change any more (docs/PLACEMENT.md, "The stable
//! epoch").
//!
//! A host update or punch is refused ([`EngineError::EpochTooOld`]) when its epoch is at or
//! below the target's *floor*, which trails the clock by the commit window. The floor only rises,
//! so an update accepted at any moment has an epoch above the floor of that moment. The *stable
//! epoch* is a floor every update at or below which is applied: when a commit starts it takes
//! everything staged so far, so once it is applied the floor of its start is stable (anything
//! staged later was accepted later, above a floor at least as high). With nothing staged or in
//! flight the current floor is stable at once. Requests marked background (rebuild,
//! reintegration, scrub repair) are exempt: they rewrite versions that are already durable
//! elsewhere, at their original epochs.

#[allow(clippy::wildcard_imports)] // the parent module's types and imports, as if this were its body
use super::*;

/// Floor and stable epoch of one target.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct StableEpoch {
    /// Host mutations at or below this epoch are refused.
    floor: u64,
    /// Every mutation at or below this epoch is applied to the index.
    stable: u64,
}

impl Target {
    /// Raises the floor to `now` minus the commit window (epochs are HLC nanoseconds), and the
    /// stable epoch with it when nothing is staged or committing. With the window off (0) nothing
    /// is refused and the stable epoch is `now`: no promise is kept.
    pub fn advance_floor(&mut self, now: u64) {
        if self.cfg.commit_window == 0 {
            self.epochs.stable = self.epochs.stable.max(now);
            return;
        }
        self.epochs.floor = self.epochs.floor.max(now.saturating_sub(self.cfg.commit_window));
        if self.settled() {
            self.epochs.stable = self.epochs.floor;
        }
    }

    /// The epoch at or below which every mutation this target will ever apply is applied.
    pub fn stable_epoch(&self) -> u64 {
        self.epochs.stable
    }

    /// The floor a commit starting now records ([`Target::commit_start`]).
    pub(super) fn floor(&self) -> u64 {
        self.epochs.floor
    }

    /// A commit that started at floor `floor` is applied.
    pub(super) fn applied_up_to(&mut self, floor: u64) {
        if self.cfg.commit_window != 0 {
            self.epochs.stable = self.epochs.stable.max(floor);
        }
    }

    /// Stages a host mutation: refused, with nothing changed, if its epoch is at or below the
    /// floor. Background mutations go through [`Target::stage`] directly.
    pub fn stage_host(&mut self, m: Mutation) -> Result<Staged, EngineError> {
        let epoch = match &m {
            Mutation::Update { epoch, .. } | Mutation::Punch { epoch, .. } => Some(*epoch),
            Mutation::SetRetention { .. } | Mutation::Discard { .. } => None,
        };
        if let Some(epoch) = epoch.filter(|e| *e <= self.epochs.floor) {
            return Err(EngineError::EpochTooOld { epoch, floor: self.epochs.floor });
        }
        self.stage(m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::MemStorage;

    const WINDOW: u64 = 2_000_000_000;

    fn target() -> Target {
        let cfg = TargetConfig { capacity: 16 << 20, commit_window: WINDOW, ..TargetConfig::default() };
        Target::open(Arc::new(MemStorage::new()), cfg).unwrap()
    }

    fn update(epoch: u64) -> Mutation {
        let path = AkeyPath { cont: 1, obj: 2, dkey: Bytes::from_static(b"d"), akey: Bytes::from_static(b"a") };
        Mutation::Update { path, epoch, value: UpdateValue::single(Bytes::from_static(b"v")) }
    }

    #[test]
    fn host_writes_older_than_the_window_are_refused_and_change_nothing() {
        let mut t = target();
        let now = 100 * WINDOW;
        t.advance_floor(now);
        let e = t.stage_host(update(now - WINDOW)).unwrap_err();
        assert!(matches!(e, EngineError::EpochTooOld { floor, .. } if floor == now - WINDOW), "{e}");
        assert!(t.settled(), "a refused write stages nothing");
        t.stage_host(update(now - WINDOW + 1)).unwrap();
        // Background work (rebuild) keeps its original epochs.
        t.stage(update(1)).unwrap();
        t.commit().unwrap();
        // A punch is a host mutation too.
        let punch = Mutation::Punch { cont: 1, obj: 2, epoch: 5, what: PunchTarget::Object };
        assert!(matches!(t.stage_host(punch), Err(EngineError::EpochTooOld { .. })));
    }

    #[test]
    fn the_stable_epoch_waits_for_what_was_accepted_below_it() {
        let mut t = target();
        let now = 100 * WINDOW;
        t.advance_floor(now);
        assert_eq!(t.stable_epoch(), now - WINDOW, "nothing staged: the floor is stable at once");
        // Accepted just above the floor, then the clock moves on while it is staged.
        t.stage_host(update(now - WINDOW + 10)).unwrap();
        t.advance_floor(now + WINDOW);
        assert_eq!(t.stable_epoch(), now - WINDOW, "an accepted write below the new floor is not applied yet");
        let job = t.commit_start().unwrap().unwrap();
        // Accepted while the commit syncs: above the floor the commit started with.
        t.stage_host(update(now + 10)).unwrap();
        t.advance_floor(now + 2 * WINDOW);
        assert_eq!(t.stable_epoch(), now - WINDOW);
        t.commit_finish(job.run()).unwrap();
        assert_eq!(t.stable_epoch(), now, "the commit's start floor, not the current one: a later write is still staged");
        t.commit().unwrap();
        t.advance_floor(now + 2 * WINDOW);
        assert_eq!(t.stable_epoch(), now + WINDOW);
    }

    #[test]
    fn with_the_window_off_nothing_is_refused() {
        let mut t = Target::open(Arc::new(MemStorage::new()), TargetConfig { commit_window: 0, ..TargetConfig::default() }).unwrap();
        t.advance_floor(100 * WINDOW);
        t.stage_host(update(1)).unwrap();
        assert_eq!(t.stable_epoch(), 100 * WINDOW);
    }
}
