//! Asymmetric namespace access: this target as one path of several to a subsystem. The
//! management service names a subsystem's paths (listen addresses of several `tessera-nvmf`s);
//! each path hands out controller IDs from its own range, so that a host's controllers of one
//! subsystem never share an ID, and reports its ANA state (optimized for the preferred path,
//! non-optimized for the others) for the single ANA group every namespace of the subsystem is in.
//! A host with native multipath then sees one namespace with several paths and fails over.
//!
//! Pure state: [`AnaCell`] holds a subsystem's path description and change count; the
//! controller reads it for Identify and the ANA log page and raises the ANA change event when
//! [`AnaCell::set`] says the state changed.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{PoisonError, RwLock};

use tessera_nvme_proto::log::{self, AnaGroup, AnaState};
use tessera_nvme_proto::Status;

/// The ANA group of every namespace of a multipath subsystem.
pub const ANA_GROUP: u32 = 1;

/// How this target serves a subsystem as one of its paths.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AnaPath {
    /// This path's state.
    pub state: AnaState,
    /// The controller IDs this path hands out (disjoint from every other path's).
    pub cntlid_min: u16,
    pub cntlid_max: u16,
    /// The subsystem's other paths, for the discovery log.
    pub peers: Vec<SocketAddr>,
}

/// The status an I/O command gets on a path in `state`, if it may not run there.
pub fn io_status(state: AnaState) -> Option<Status> {
    match state {
        AnaState::Optimized | AnaState::NonOptimized => None,
        AnaState::Inaccessible => Some(Status::ANA_INACCESSIBLE),
        AnaState::PersistentLoss => Some(Status::ANA_PERSISTENT_LOSS),
        AnaState::Change => Some(Status::ANA_TRANSITION),
    }
}

/// A subsystem's path description (None: a single-path subsystem that reports no ANA) and the
/// count of its ANA state changes.
#[derive(Debug, Default)]
pub struct AnaCell {
    path: RwLock<Option<AnaPath>>,
    change_count: AtomicU64,
}

impl AnaCell {
    /// A cell holding `path`.
    pub fn new(path: Option<AnaPath>) -> AnaCell {
        AnaCell { path: RwLock::new(path), change_count: AtomicU64::new(0) }
    }

    /// The current description.
    pub fn get(&self) -> Option<AnaPath> {
        self.path.read().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// Replaces the description; returns whether the ANA state hosts see changed (then the
    /// change count moved on and controllers owe their hosts an ANA change event). Whether a
    /// subsystem reports ANA at all cannot change while hosts are attached: such a change is
    /// ignored (the caller recreates the subsystem).
    pub fn set(&self, next: Option<AnaPath>) -> bool {
        let mut cur = self.path.write().unwrap_or_else(PoisonError::into_inner);
        let changed = match (&*cur, &next) {
            (Some(a), Some(b)) => a.state != b.state,
            _ => false,
        };
        if cur.is_some() == next.is_some() {
            *cur = next;
        }
        if changed {
            self.change_count.fetch_add(1, Ordering::AcqRel);
        }
        changed
    }

    /// The status an I/O command gets on this path now, if it may not run.
    pub fn io_status(&self) -> Option<Status> {
        self.get().and_then(|p| io_status(p.state))
    }

    /// The ANA log page over active namespaces `nsids` (RGO: `groups_only`), or None if the
    /// subsystem does not report ANA.
    pub fn log(&self, nsids: Vec<u32>, groups_only: bool) -> Option<Vec<u8>> {
        let p = self.get()?;
        let count = self.change_count.load(Ordering::Acquire);
        Some(log::ana(count, &[AnaGroup { id: ANA_GROUP, change_count: count, state: p.state, nsids }], groups_only))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tessera_nvme_proto::reader::{u32_at, u64_at};

    fn path(state: AnaState) -> AnaPath {
        AnaPath { state, cntlid_min: 0x1001, cntlid_max: 0x1FFF, peers: vec!["127.0.0.1:4420".parse().unwrap()] }
    }

    #[test]
    fn state_changes_count_and_gate_io() {
        let c = AnaCell::new(Some(path(AnaState::NonOptimized)));
        assert_eq!(c.io_status(), None);
        assert!(!c.set(Some(path(AnaState::NonOptimized))), "same state: no event");
        assert!(c.set(Some(path(AnaState::Optimized))));
        assert!(c.set(Some(path(AnaState::Inaccessible))));
        assert_eq!(c.io_status(), Some(Status::ANA_INACCESSIBLE));
        assert!(c.set(Some(path(AnaState::Change))));
        assert_eq!(c.io_status(), Some(Status::ANA_TRANSITION));
        let page = c.log(vec![1, 3], false).unwrap();
        assert_eq!(u64_at(&page, 0), Some(3), "three changes");
        assert_eq!((u32_at(&page, 16), u32_at(&page, 20), page[32]), (Some(ANA_GROUP), Some(2), 0xF));
        assert_eq!((u32_at(&page, 48), u32_at(&page, 52)), (Some(1), Some(3)));
        // Reporting ANA or not is fixed while the subsystem exists.
        assert!(!c.set(None));
        assert!(c.get().is_some());
        let none = AnaCell::new(None);
        assert!(!none.set(Some(path(AnaState::Optimized))));
        assert_eq!((none.log(vec![1], false), none.io_status()), (None, None));
    }

    #[test]
    fn every_state_maps_to_its_path_status() {
        assert_eq!(io_status(AnaState::Optimized), None);
        assert_eq!(io_status(AnaState::NonOptimized), None);
        assert_eq!(io_status(AnaState::PersistentLoss), Some(Status::ANA_PERSISTENT_LOSS));
        for s in [AnaState::Inaccessible, AnaState::PersistentLoss, AnaState::Change] {
            let st = io_status(s).unwrap();
            assert_eq!(st.sct(), 3, "path related: the host retries on another path");
            assert!(!st.is_dnr());
        }
    }
}
