//! Reservations on a target: each namespace's reservation as this target knows it, which gates
//! I/O ([`ResvTable::may_access`]); carrying out a host's Reservation Register, Acquire and
//! Release ([`execute`]) and Report ([`report`]); and each controller's Reservation
//! Notification log ([`NoticeLog`]).
//!
//! Who keeps a reservation: for a subsystem of the management service, the service (the target
//! forwards the command and takes the answer; every other path of the subsystem takes the change
//! through its long poll before the service answers, so what completes on one path holds on all
//! of them — see `docs/RESERVATIONS.md`); for a subsystem of the configuration file, this
//! target, in memory. The rules are `tessera-nvme-resv`'s either way.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{PoisonError, RwLock};

use bytes::Bytes;
use tessera_mgmt_api::{ClusterVersion, MgmtClient, MgmtError, Reservation, ReservationCommand};
use tessera_nvme_proto::Status;
use tessera_nvme_resv::{Command, HostId, Notice, NoticeKind, State};
use tracing::{debug, warn};

use crate::target::{Origin, Subsystem};

/// Whether `op` is a reservation command (NVM command set).
pub fn is_reservation(op: u8) -> bool {
    use tessera_nvme_resv::opcode::*;
    matches!(op, REGISTER | REPORT | ACQUIRE | RELEASE)
}

#[derive(Debug, Clone, Default)]
struct View {
    state: State,
    /// Store version it was read at (0 for a reservation kept here).
    version: ClusterVersion,
    /// The newest notification delivered.
    seq: u64,
}

/// The reservations of one subsystem's namespaces. A namespace with no entry has no
/// registrants.
#[derive(Debug, Default)]
pub struct ResvTable {
    by_nsid: RwLock<BTreeMap<u32, View>>,
}

impl ResvTable {
    /// Whether `host` may read (`write` false) or write namespace `nsid` now.
    pub fn may_access(&self, nsid: u32, host: &HostId, write: bool) -> bool {
        self.by_nsid.read().unwrap_or_else(PoisonError::into_inner).get(&nsid).is_none_or(|v| v.state.may_access(host, write))
    }

    /// Namespace `nsid`'s reservation.
    pub fn state(&self, nsid: u32) -> State {
        self.by_nsid.read().unwrap_or_else(PoisonError::into_inner).get(&nsid).map(|v| v.state.clone()).unwrap_or_default()
    }

    /// Takes the service's reservation of `nsid`, read at store version `version` (an older one
    /// than what it has is ignored); returns the notifications it owes hosts that were not
    /// delivered yet. Notifications from before this target first saw the namespace are not.
    pub fn take(&self, nsid: u32, version: ClusterVersion, r: &Reservation) -> Vec<Notice> {
        let mut map = self.by_nsid.write().unwrap_or_else(PoisonError::into_inner);
        let first = !map.contains_key(&nsid);
        let v = map.entry(nsid).or_default();
        if !first && version <= v.version {
            return Vec::new();
        }
        let from = if first { r.last_seq() } else { v.seq };
        let new = r.notices.iter().filter(|n| n.seq > from).map(|n| n.notice).collect();
        *v = View { state: r.state.clone(), version, seq: r.last_seq() };
        new
    }

    /// Forgets the namespaces not in `nsids`.
    pub fn retain(&self, nsids: &[u32]) {
        self.by_nsid.write().unwrap_or_else(PoisonError::into_inner).retain(|n, _| nsids.contains(n));
    }

    /// Applies `cmd` from `host` to a reservation kept here.
    fn apply_here(&self, nsid: u32, host: &HostId, cmd: &Command) -> Result<Vec<Notice>, Status> {
        let mut map = self.by_nsid.write().unwrap_or_else(PoisonError::into_inner);
        let v = map.entry(nsid).or_default();
        let (next, notices) = v.state.apply(host, cmd)?;
        v.state = next;
        Ok(notices)
    }
}

/// Tells the controllers of `subsys` whose host is owed a notification.
pub fn deliver(subsys: &Subsystem, nsid: u32, notices: &[Notice]) {
    for n in notices {
        for c in subsys.controllers().iter().filter(|c| c.hostid == n.host) {
            c.reservation_notice(nsid, n.kind);
        }
    }
}

/// Carries out Reservation Register, Acquire or Release `op` (with `cdw10` and its data) from
/// `host` on namespace `nsid` of `subsys`; `mgmt` is the service of a managed subsystem.
pub async fn execute(subsys: &Subsystem, mgmt: Option<&MgmtClient>, host: HostId, nsid: u32, op: u8, cdw10: u32, data: &[u8]) -> Status {
    if subsys.origin == Origin::Config {
        let r = Command::parse(op, cdw10, data).and_then(|cmd| subsys.resv.apply_here(nsid, &host, &cmd));
        return match r {
            Ok(notices) => {
                deliver(subsys, nsid, &notices);
                Status::SUCCESS
            }
            Err(s) => s,
        };
    }
    // Refuse what does not parse here; the service checks the rest.
    if let Err(s) = Command::parse(op, cdw10, data) {
        return s;
    }
    let Some(mgmt) = mgmt else {
        return NOT_READY;
    };
    let cmd = ReservationCommand { host, opcode: op, cdw10, data: data.to_vec() };
    match mgmt.reservation(&subsys.nqn, nsid, &cmd).await {
        Ok(reply) => {
            let notices = subsys.resv.take(nsid, reply.version, &reply.reservation);
            deliver(subsys, nsid, &notices);
            Status::from_field(reply.status)
        }
        Err(MgmtError::Refused { status: 404, .. }) => Status::INVALID_NAMESPACE,
        Err(e) => {
            warn!(nqn = %subsys.nqn, nsid, "reservation command not carried out, the host will retry: {e}");
            NOT_READY
        }
    }
}

/// Namespace Not Ready (generic 82h), retryable: the service that keeps the reservation cannot be
/// reached now.
pub const NOT_READY: Status = Status::new(0, 0x82);

/// The Reservation Report (0Eh) data of namespace `nsid` for a host buffer of `len` bytes.
pub fn report(subsys: &Subsystem, nsid: u32, cdw11: u32, len: usize) -> Result<Bytes, Status> {
    let state = subsys.resv.state(nsid);
    let ctrls = subsys.controllers();
    let cntlid_of = |h: &HostId| ctrls.iter().find(|c| c.hostid == *h).map_or(0xFFFF, |c| c.cntlid);
    let mut page = tessera_nvme_resv::report(&state, cdw11 & 1 != 0, cntlid_of)?;
    page.resize(len, 0);
    debug!(nqn = %subsys.nqn, nsid, registrants = state.registrants.len(), "reservation report");
    Ok(Bytes::from(page))
}

/// Most notifications a controller keeps unread; older ones are dropped (the log page count
/// then jumps, which tells the host some were lost).
pub const NOTICES_QUEUED: usize = 255;

/// A controller's Reservation Notification log (LID 80h): notifications in order, each read
/// once.
#[derive(Debug, Default)]
pub struct NoticeLog {
    queue: VecDeque<(u64, NoticeKind, u32)>,
    count: u64,
}

impl NoticeLog {
    /// Queues a notification about namespace `nsid`.
    pub fn push(&mut self, nsid: u32, kind: NoticeKind) {
        // The count is never 0 for a notification (0 means "empty").
        self.count = self.count.wrapping_add(1).max(1);
        self.queue.push_back((self.count, kind, nsid));
        if self.queue.len() > NOTICES_QUEUED {
            self.queue.pop_front();
        }
    }

    /// The next log page (taking it off the queue), and whether more are waiting.
    pub fn pop(&mut self) -> (Vec<u8>, bool) {
        let next = self.queue.pop_front();
        let available = u8::try_from(self.queue.len()).unwrap_or(u8::MAX);
        let page = match next {
            Some((count, kind, nsid)) => tessera_nvme_resv::notice_page(count, Some(kind), available, nsid),
            None => tessera_nvme_resv::notice_page(0, None, 0, 0),
        };
        (page, !self.queue.is_empty())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tessera_mgmt_api::SeqNotice;
    use tessera_nvme_resv::{Held, RType, Registrant};

    const A: HostId = [1; 16];
    const B: HostId = [2; 16];

    fn held_by_a(notices: Vec<SeqNotice>) -> Reservation {
        Reservation {
            state: State {
                generation: 1,
                registrants: vec![Registrant { host: A, key: 1 }, Registrant { host: B, key: 2 }],
                reservation: Some(Held { rtype: RType::WriteExclusive, holder: Some(A) }),
            },
            notices,
        }
    }

    #[test]
    fn a_view_gates_io_and_hands_out_each_notice_once() {
        let t = ResvTable::default();
        assert!(t.may_access(1, &B, true));
        let old = SeqNotice { seq: 4, notice: Notice { host: B, kind: NoticeKind::ReservationReleased } };
        // First sight: what was owed before this target knew the namespace is not delivered.
        assert_eq!(t.take(1, 10, &held_by_a(vec![old])), vec![]);
        assert!(t.may_access(1, &A, true));
        assert!(!t.may_access(1, &B, true));
        assert!(t.may_access(1, &B, false));
        assert!(t.may_access(2, &B, true));
        let new = SeqNotice { seq: 5, notice: Notice { host: B, kind: NoticeKind::ReservationPreempted } };
        assert_eq!(t.take(1, 11, &held_by_a(vec![old, new])), vec![new.notice]);
        // The same version again, or an older one, changes nothing.
        assert_eq!(t.take(1, 11, &held_by_a(vec![old, new])), vec![]);
        assert_eq!(t.take(1, 9, &Reservation::default()), vec![]);
        assert!(!t.may_access(1, &B, true));
        assert_eq!(t.take(1, 12, &Reservation::default()), vec![]);
        assert!(t.may_access(1, &B, true));
        t.retain(&[]);
        assert_eq!(t.state(1), State::default());
    }

    #[test]
    fn the_notice_log_reads_each_page_once_and_counts_what_was_lost() {
        let mut log = NoticeLog::default();
        let (page, more) = log.pop();
        assert_eq!(page, tessera_nvme_resv::notice_page(0, None, 0, 0));
        assert!(!more);
        log.push(1, NoticeKind::RegistrationPreempted);
        log.push(2, NoticeKind::ReservationReleased);
        let (page, more) = log.pop();
        assert_eq!(page, tessera_nvme_resv::notice_page(1, Some(NoticeKind::RegistrationPreempted), 1, 1));
        assert!(more);
        let (page, more) = log.pop();
        assert_eq!(page, tessera_nvme_resv::notice_page(2, Some(NoticeKind::ReservationReleased), 0, 2));
        assert!(!more);
        for _ in 0..NOTICES_QUEUED + 10 {
            log.push(3, NoticeKind::ReservationPreempted);
        }
        let (page, _) = log.pop();
        // Ten were dropped: the first one left is the 13th.
        assert_eq!(page, tessera_nvme_resv::notice_page(13, Some(NoticeKind::ReservationPreempted), 254, 3));
    }
}
