//! NVMe reservations in the API. The management service keeps each exported namespace's
//! reservation (registrants, holder, type, and the notifications owed to hosts) so that it holds
//! on every path of a subsystem and survives a target's restart; targets forward the host's
//! Reservation Register, Acquire and Release commands (`POST
//! /v1/exports/{nqn}/{nsid}/reservation`) and learn every change through the long poll of
//! `GET /v1/exports`, which carries [`Reservation`] in each export. `docs/MGMT-API.md`
//! documents the endpoint, `docs/RESERVATIONS.md` the design.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};
pub use tessera_nvme_resv::{HostId, Notice, NoticeKind, State as ResvState};

use crate::ClusterVersion;

/// Notifications a reservation keeps (the newest): a target that misses more than these between
/// two looks at the service (it was cut off) skips the older ones.
pub const NOTICES_KEPT: usize = 64;

/// A notification owed to a host, numbered so that each target delivers it once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SeqNotice {
    /// Number, from 1, increasing by one per notification of this namespace.
    pub seq: u64,
    /// The host and what happened.
    pub notice: Notice,
}

/// A namespace's reservation as the service keeps it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reservation {
    /// Registrants, holder, type and generation.
    #[serde(default)]
    pub state: ResvState,
    /// The newest notifications (at most [`NOTICES_KEPT`]), oldest first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub notices: Vec<SeqNotice>,
}

impl Reservation {
    /// Nothing registered and nothing owed: what a new export has.
    pub fn is_empty(&self) -> bool {
        *self == Reservation::default()
    }

    /// Number of the newest notification (0: none yet).
    pub fn last_seq(&self) -> u64 {
        self.notices.last().map_or(0, |n| n.seq)
    }

    /// Records `notices`, numbered after the newest, keeping the newest [`NOTICES_KEPT`].
    pub fn record(&mut self, notices: &[Notice]) {
        let first = self.last_seq() + 1;
        self.notices.extend((first..).zip(notices).map(|(seq, n)| SeqNotice { seq, notice: *n }));
        let excess = self.notices.len().saturating_sub(NOTICES_KEPT);
        self.notices.drain(..excess);
    }
}

/// `POST /v1/exports/{nqn}/{nsid}/reservation`: a host's Reservation Register (0Dh), Acquire
/// (11h) or Release (15h), as the target received it. The service parses and checks it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReservationCommand {
    /// The host's 128-bit host identifier (from its Connect).
    pub host: HostId,
    /// The command's opcode.
    pub opcode: u8,
    /// Its CDW10.
    pub cdw10: u32,
    /// Its data (16 bytes for Register and Acquire, 8 for Release).
    pub data: Vec<u8>,
}

/// The answer to a [`ReservationCommand`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReservationReply {
    /// The NVMe status field to complete the command with (0: success).
    pub status: u16,
    /// The store version the reservation was read or changed at.
    pub version: ClusterVersion,
    /// The reservation after the command.
    pub reservation: Reservation,
}

/// How a target following `GET /v1/exports` names itself (query `target=`), and the version it
/// has taken (`taken=`): the service answers a reservation command once every target serving
/// the subsystem that follows it has taken the change, so that an Acquire or Preempt completed
/// on one path holds on the others.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Follower {
    /// The target's NVMe/TCP listen addresses.
    pub listen: Vec<String>,
    /// The newest export list it has applied (reservations included).
    pub taken: ClusterVersion,
}

/// Whether an export's `listen` address is served by a target listening on `listen`: equal, or
/// the target listens on the unspecified address (0.0.0.0 / ::) at the same port.
pub fn serves(listen: &[SocketAddr], export_listen: &str) -> bool {
    let Ok(want) = export_listen.parse::<SocketAddr>() else {
        return false;
    };
    listen.iter().any(|l| *l == want || (l.ip().is_unspecified() && l.port() == want.port() && l.is_ipv4() == want.is_ipv4()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notices_are_numbered_and_the_newest_kept() {
        let mut r = Reservation::default();
        assert!(r.is_empty());
        let n = Notice { host: [1; 16], kind: NoticeKind::ReservationReleased };
        r.record(&[n, n]);
        assert_eq!(r.notices.iter().map(|s| s.seq).collect::<Vec<_>>(), vec![1, 2]);
        for _ in 0..NOTICES_KEPT {
            r.record(&[n]);
        }
        assert_eq!(r.notices.len(), NOTICES_KEPT);
        assert_eq!(r.last_seq(), 2 + NOTICES_KEPT as u64);
        assert_eq!(r.notices.first().map(|s| s.seq), Some(3));
    }

    #[test]
    fn listen_addresses_match_exactly_or_by_wildcard_port() {
        let l: Vec<SocketAddr> = vec!["127.0.0.1:4420".parse().unwrap()];
        assert!(serves(&l, "127.0.0.1:4420"));
        assert!(!serves(&l, "127.0.0.1:4421"));
        assert!(!serves(&l, "10.0.0.1:4420"));
        assert!(!serves(&l, "localhost:4420"));
        let any: Vec<SocketAddr> = vec!["0.0.0.0:4420".parse().unwrap()];
        assert!(serves(&any, "10.0.0.1:4420"));
        assert!(!serves(&any, "10.0.0.1:4421"));
        assert!(!serves(&any, "[::1]:4420"));
    }
}
