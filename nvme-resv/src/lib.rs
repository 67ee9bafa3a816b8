//! NVMe reservations (NVMe Base 2.0, section 8.19) as a pure state machine, shared by whoever
//! keeps a namespace's reservation (the management service, so that it holds across every
//! target of a subsystem and survives a target restart) and whoever gates I/O by it (each
//! target).
//!
//! [`Command::parse`] reads a Reservation Register (0Dh), Acquire (11h) or Release (15h) command
//! from its CDW10 and data, bounded and without panicking; [`State::apply`] checks a whole
//! command against the state before changing anything and returns the next state and the
//! notifications other hosts are owed, or the NVMe status to complete it with;
//! [`State::may_access`] says whether a host may read or write under the current reservation;
//! [`report`] builds the Reservation Report (0Eh) data. Hosts are identified by their 128-bit
//! host identifier (NVMe over Fabrics), so one host is one registrant on every path.

use serde::{Deserialize, Serialize};
use tessera_nvme_proto::reader::{u64_at, PageWriter};
use tessera_nvme_proto::Status;

/// A host: its 128-bit host identifier.
pub type HostId = [u8; 16];

/// Reservation types (RTYPE).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum RType {
    /// Only the holder writes; anyone reads.
    WriteExclusive,
    /// Only the holder reads or writes.
    ExclusiveAccess,
    /// Registrants write; anyone reads; one registrant holds it.
    WriteExclusiveRegistrantsOnly,
    /// Only registrants read or write; one registrant holds it.
    ExclusiveAccessRegistrantsOnly,
    /// Registrants write; anyone reads; every registrant holds it.
    WriteExclusiveAllRegistrants,
    /// Only registrants read or write; every registrant holds it.
    ExclusiveAccessAllRegistrants,
}

impl RType {
    /// The type of RTYPE `v` (1 to 6).
    pub fn from_code(v: u8) -> Option<RType> {
        Some(match v {
            1 => RType::WriteExclusive,
            2 => RType::ExclusiveAccess,
            3 => RType::WriteExclusiveRegistrantsOnly,
            4 => RType::ExclusiveAccessRegistrantsOnly,
            5 => RType::WriteExclusiveAllRegistrants,
            6 => RType::ExclusiveAccessAllRegistrants,
            _ => return None,
        })
    }

    /// RTYPE.
    pub fn code(self) -> u8 {
        match self {
            RType::WriteExclusive => 1,
            RType::ExclusiveAccess => 2,
            RType::WriteExclusiveRegistrantsOnly => 3,
            RType::ExclusiveAccessRegistrantsOnly => 4,
            RType::WriteExclusiveAllRegistrants => 5,
            RType::ExclusiveAccessAllRegistrants => 6,
        }
    }

    /// Every registrant is a holder.
    pub fn all_registrants(self) -> bool {
        matches!(self, RType::WriteExclusiveAllRegistrants | RType::ExclusiveAccessAllRegistrants)
    }

    /// Registrants that do not hold it are told when it is released.
    fn registrants_only(self) -> bool {
        matches!(self, RType::WriteExclusiveRegistrantsOnly | RType::ExclusiveAccessRegistrantsOnly)
    }

    /// Reads are limited too (the Exclusive Access types).
    fn exclusive_access(self) -> bool {
        matches!(self, RType::ExclusiveAccess | RType::ExclusiveAccessRegistrantsOnly | RType::ExclusiveAccessAllRegistrants)
    }
}

/// RESCAP of Identify Namespace: every type, Ignore Existing Key; no persistence through power
/// loss (bit 0) — the state lives in the management service.
pub const RESCAP: u8 = 0b1111_1110;

/// A registered host and its key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Registrant {
    pub host: HostId,
    pub key: u64,
}

/// The reservation on a namespace: its type and, unless every registrant holds it, its holder.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Held {
    pub rtype: RType,
    /// None for the All Registrants types.
    pub holder: Option<HostId>,
}

/// One namespace's registrants and reservation.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    /// Counts successful Register, Preempt and Clear commands (Report's GEN).
    pub generation: u32,
    pub registrants: Vec<Registrant>,
    pub reservation: Option<Held>,
}

/// Reservation Register actions (RREGA).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RegisterAction {
    Register,
    Unregister,
    Replace,
}

/// Reservation Acquire actions (RACQA).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AcquireAction {
    Acquire,
    Preempt,
    /// Preempt and abort: commands of the preempted hosts are not aborted here (they complete).
    PreemptAbort,
}

/// A reservation command, parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Register { action: RegisterAction, ignore_key: bool, current: u64, new: u64 },
    Acquire { action: AcquireAction, ignore_key: bool, rtype: RType, current: u64, preempt: u64 },
    Release { clear: bool, ignore_key: bool, rtype: u8, current: u64 },
}

/// Opcodes of the reservation commands (NVM command set).
pub mod opcode {
    pub const REGISTER: u8 = 0x0D;
    pub const REPORT: u8 = 0x0E;
    pub const ACQUIRE: u8 = 0x11;
    pub const RELEASE: u8 = 0x15;
}

/// Bytes of data each command carries from the host.
pub fn data_len(op: u8) -> Option<usize> {
    match op {
        opcode::REGISTER | opcode::ACQUIRE => Some(16),
        opcode::RELEASE => Some(8),
        _ => None,
    }
}

/// What another host is told (Reservation Notification log page, 80h).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum NoticeKind {
    /// Its registration was removed by another host's Preempt.
    RegistrationPreempted = 1,
    /// The reservation was released.
    ReservationReleased = 2,
    /// The reservation was cleared or preempted.
    ReservationPreempted = 3,
}

/// A notification owed to `host`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Notice {
    pub host: HostId,
    pub kind: NoticeKind,
}

/// Reservation Conflict (generic status 83h).
pub const RESERVATION_CONFLICT: Status = Status::new(0, 0x83);
/// Host Identifier Inconsistent Format (command specific 18h): a Report without EDS from a host
/// with a 128-bit identifier.
pub const HOST_ID_INCONSISTENT_FORMAT: Status = Status::dnr(1, 0x18);

impl Command {
    /// Parses opcode `op` with `cdw10` and its data (exactly [`data_len`] bytes).
    pub fn parse(op: u8, cdw10: u32, data: &[u8]) -> Result<Command, Status> {
        if Some(data.len()) != data_len(op) {
            return Err(Status::INVALID_FIELD);
        }
        let key = |at: usize| u64_at(data, at).ok_or(Status::INVALID_FIELD);
        let action = cdw10 & 0x7;
        let ignore_key = cdw10 & (1 << 3) != 0;
        let rtype = ((cdw10 >> 8) & 0xFF) as u8;
        match op {
            opcode::REGISTER => {
                let action = match action {
                    0 => RegisterAction::Register,
                    1 => RegisterAction::Unregister,
                    2 => RegisterAction::Replace,
                    _ => return Err(Status::INVALID_FIELD),
                };
                // CPTPL (bits 31:30): only "no change" (0) — nothing persists through power loss
                // on a target; the service keeps the state.
                if cdw10 >> 30 != 0 {
                    return Err(Status::INVALID_FIELD);
                }
                Ok(Command::Register { action, ignore_key, current: key(0)?, new: key(8)? })
            }
            opcode::ACQUIRE => {
                let action = match action {
                    0 => AcquireAction::Acquire,
                    1 => AcquireAction::Preempt,
                    2 => AcquireAction::PreemptAbort,
                    _ => return Err(Status::INVALID_FIELD),
                };
                let rtype = RType::from_code(rtype).ok_or(Status::INVALID_FIELD)?;
                Ok(Command::Acquire { action, ignore_key, rtype, current: key(0)?, preempt: key(8)? })
            }
            opcode::RELEASE => {
                let clear = match action {
                    0 => false,
                    1 => true,
                    _ => return Err(Status::INVALID_FIELD),
                };
                Ok(Command::Release { clear, ignore_key, rtype, current: key(0)? })
            }
            _ => Err(Status::INVALID_OPCODE),
        }
    }
}

impl State {
    fn key_of(&self, host: &HostId) -> Option<u64> {
        self.registrants.iter().find(|r| r.host == *host).map(|r| r.key)
    }

    /// Whether `host` holds the reservation.
    pub fn holds(&self, host: &HostId) -> bool {
        match self.reservation {
            Some(Held { rtype, .. }) if rtype.all_registrants() => self.key_of(host).is_some(),
            Some(Held { holder, .. }) => holder.as_ref() == Some(host),
            None => false,
        }
    }

    /// Whether `host` may read (`write` false) or write under the current reservation.
    pub fn may_access(&self, host: &HostId, write: bool) -> bool {
        let Some(Held { rtype, .. }) = self.reservation else { return true };
        if !write && !rtype.exclusive_access() {
            return true;
        }
        match rtype {
            RType::WriteExclusive | RType::ExclusiveAccess => self.holds(host),
            _ => self.key_of(host).is_some(),
        }
    }

    /// Checks `cmd` from `host` and returns the state after it and the notifications owed to
    /// other hosts; nothing changes on an error.
    pub fn apply(&self, host: &HostId, cmd: &Command) -> Result<(State, Vec<Notice>), Status> {
        let mut next = self.clone();
        let mut notices = Vec::new();
        let mine = self.key_of(host);
        let check_key = |ignore: bool, current: u64| match mine {
            Some(k) if ignore || k == current => Ok(()),
            _ => Err(RESERVATION_CONFLICT),
        };
        match *cmd {
            Command::Register { action, ignore_key, current, new } => {
                match action {
                    RegisterAction::Register => match mine {
                        None if new != 0 => next.registrants.push(Registrant { host: *host, key: new }),
                        None => return Err(Status::INVALID_FIELD),
                        Some(k) if k == new => {}
                        Some(_) => return Err(RESERVATION_CONFLICT),
                    },
                    RegisterAction::Unregister => {
                        check_key(ignore_key, current)?;
                        next.registrants.retain(|r| r.host != *host);
                        next.drop_holder(host, &mut notices);
                    }
                    RegisterAction::Replace => {
                        check_key(ignore_key, current)?;
                        if new == 0 {
                            return Err(Status::INVALID_FIELD);
                        }
                        next.registrants.iter_mut().filter(|r| r.host == *host).for_each(|r| r.key = new);
                    }
                }
                next.generation = next.generation.wrapping_add(1);
            }
            Command::Acquire { action: AcquireAction::Acquire, ignore_key, rtype, current, .. } => {
                check_key(ignore_key, current)?;
                match self.reservation {
                    None => next.reservation = Some(Held { rtype, holder: (!rtype.all_registrants()).then_some(*host) }),
                    Some(h) if h.rtype == rtype && self.holds(host) => {}
                    Some(_) => return Err(RESERVATION_CONFLICT),
                }
            }
            Command::Acquire { ignore_key, rtype, current, preempt, .. } => {
                check_key(ignore_key, current)?;
                let holder_key = self.reservation.and_then(|h| h.holder).and_then(|h| self.key_of(&h));
                let take_over = match self.reservation {
                    None => false,
                    Some(h) if h.rtype.all_registrants() => preempt == 0,
                    Some(_) => holder_key == Some(preempt),
                };
                if preempt == 0 && !take_over {
                    return Err(Status::INVALID_FIELD);
                }
                // Preempted: registrants with that key (every other one for an All Registrants
                // reservation preempted with key 0), never the requester.
                let gone: Vec<HostId> = self
                    .registrants
                    .iter()
                    .filter(|r| r.host != *host && (r.key == preempt || (preempt == 0 && take_over)))
                    .map(|r| r.host)
                    .collect();
                next.registrants.retain(|r| !gone.contains(&r.host));
                notices.extend(gone.iter().map(|h| Notice { host: *h, kind: NoticeKind::RegistrationPreempted }));
                if let Some(old) = self.reservation.filter(|_| take_over) {
                    next.reservation = Some(Held { rtype, holder: (!rtype.all_registrants()).then_some(*host) });
                    // Registrants whose access came from the old reservation learn it changed hands.
                    let told = old.rtype.registrants_only() || old.rtype.all_registrants();
                    notices.extend(
                        next.registrants
                            .iter()
                            .filter(|r| told && r.host != *host)
                            .map(|r| Notice { host: r.host, kind: NoticeKind::ReservationPreempted }),
                    );
                }
                next.generation = next.generation.wrapping_add(1);
            }
            Command::Release { clear: false, ignore_key, rtype, current } => {
                check_key(ignore_key, current)?;
                if let Some(h) = self.reservation.filter(|_| self.holds(host)) {
                    if h.rtype.code() != rtype {
                        return Err(Status::INVALID_FIELD);
                    }
                    next.reservation = None;
                    if h.rtype.registrants_only() || h.rtype.all_registrants() {
                        notices.extend(
                            self.registrants
                                .iter()
                                .filter(|r| r.host != *host)
                                .map(|r| Notice { host: r.host, kind: NoticeKind::ReservationReleased }),
                        );
                    }
                }
            }
            Command::Release { clear: true, ignore_key, current, .. } => {
                check_key(ignore_key, current)?;
                notices.extend(
                    self.registrants
                        .iter()
                        .filter(|r| r.host != *host)
                        .map(|r| Notice { host: r.host, kind: NoticeKind::ReservationPreempted }),
                );
                next.registrants.clear();
                next.reservation = None;
                next.generation = next.generation.wrapping_add(1);
            }
        }
        Ok((next, notices))
    }

    /// `host` stopped being registered: a reservation it held alone is released (its other
    /// registrants told, for the Registrants Only types); an All Registrants one goes with its
    /// last registrant.
    fn drop_holder(&mut self, host: &HostId, notices: &mut Vec<Notice>) {
        let Some(h) = self.reservation else { return };
        let released = if h.rtype.all_registrants() { self.registrants.is_empty() } else { h.holder.as_ref() == Some(host) };
        if released {
            self.reservation = None;
            if h.rtype.registrants_only() {
                notices.extend(self.registrants.iter().map(|r| Notice { host: r.host, kind: NoticeKind::ReservationReleased }));
            }
        }
    }
}

/// Reservation Notification log page (LID 80h) offsets.
pub mod notice_off {
    pub const COUNT: usize = 0;
    pub const TYPE: usize = 8;
    pub const AVAILABLE: usize = 9;
    pub const NSID: usize = 12;
    pub const LEN: usize = 64;
}

/// One Reservation Notification log page: the `count`th notification (0 and no `kind`: the log
/// is empty), `available` more waiting after it.
pub fn notice_page(count: u64, kind: Option<NoticeKind>, available: u8, nsid: u32) -> Vec<u8> {
    use notice_off::*;
    let mut w = PageWriter::new(LEN);
    w.u64(COUNT, count);
    w.u8(TYPE, kind.map_or(0, |k| k as u8));
    w.u8(AVAILABLE, available);
    w.u32(NSID, nsid);
    w.into_vec()
}

/// Reservation Report offsets (extended data structure, EDS = 1).
pub mod report_off {
    pub const GEN: usize = 0;
    pub const RTYPE: usize = 4;
    pub const REGCTL: usize = 5;
    pub const PTPLS: usize = 9;
    pub const HEADER_LEN: usize = 64;
    pub const ENTRY_CNTLID: usize = 0;
    pub const ENTRY_RCSTS: usize = 2;
    pub const ENTRY_RKEY: usize = 8;
    pub const ENTRY_HOSTID: usize = 16;
    pub const ENTRY_LEN: usize = 64;
}

/// The Reservation Report data (`eds`: CDW11 bit 0, which fabrics hosts must set: their
/// identifiers are 128-bit), `cntlid_of` naming a registrant's controller on this target
/// (FFFFh if it has none here).
pub fn report(s: &State, eds: bool, cntlid_of: impl Fn(&HostId) -> u16) -> Result<Vec<u8>, Status> {
    use report_off::*;
    if !eds {
        return Err(HOST_ID_INCONSISTENT_FORMAT);
    }
    let mut w = PageWriter::new(HEADER_LEN + ENTRY_LEN * s.registrants.len());
    w.u32(GEN, s.generation);
    w.u8(RTYPE, s.reservation.map_or(0, |h| h.rtype.code()));
    w.u16(REGCTL, u16::try_from(s.registrants.len()).unwrap_or(u16::MAX));
    for (i, r) in s.registrants.iter().enumerate() {
        let at = HEADER_LEN + i * ENTRY_LEN;
        w.u16(at + ENTRY_CNTLID, cntlid_of(&r.host));
        w.u8(at + ENTRY_RCSTS, u8::from(s.holds(&r.host)));
        w.u64(at + ENTRY_RKEY, r.key);
        w.put(at + ENTRY_HOSTID, &r.host);
    }
    Ok(w.into_vec())
}

#[cfg(test)]
mod tests;
