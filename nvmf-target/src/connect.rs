//! The Fabrics Connect command: finds the subsystem, checks the host against its access list,
//! creates a controller for an admin queue (dynamic controller model) or attaches an I/O queue to
//! an existing controller. Pure apart from registering the controller in its subsystem.

use std::sync::Arc;

use tessera_nvme_proto::fabrics::{
    ConnectCmd, ConnectData, CATTR_DISABLE_SQFLOW, CNTLID_DYNAMIC, CONNECT_DATA_LEN, CONNECT_OFF_CNTLID, CONNECT_OFF_HOSTNQN,
    CONNECT_OFF_SUBNQN, CONNECT_SQE_OFF_QID, CONNECT_SQE_OFF_SQSIZE,
};
use tessera_nvme_proto::{Cqe, Sqe, Status};

use crate::controller::{Controller, ControllerKind};
use crate::target::{self, Target};

/// A successful Connect.
#[derive(Debug)]
pub struct Accepted {
    /// The controller the queue belongs to.
    pub ctrl: Arc<Controller>,
    /// Queue id.
    pub qid: u16,
    /// Queue entries.
    pub entries: u16,
    /// Whether the host disabled SQ flow control.
    pub sqflow_disabled: bool,
}

/// A refused Connect: the completion to send and, for the log, why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejected {
    pub status: Status,
    pub dw0: u32,
    /// Why the Connect was refused, in words (logged at warn level; the host sees only the status).
    pub reason: String,
}

impl Rejected {
    fn new(status: Status, reason: impl Into<String>) -> Rejected {
        Rejected { status, dw0: 0, reason: reason.into() }
    }

    /// The completion entry for the host.
    pub fn cqe(&self, cid: u16) -> Cqe {
        let mut c = Cqe::new(cid, self.status);
        c.dw0 = self.dw0;
        c
    }
}

/// Invalid Parameters pointing at a field: IPO in DW0 bits 15:0, IATTR bit 16 set when the
/// field is in the Connect data rather than the SQE.
fn invalid_param(in_data: bool, offset: usize, reason: impl Into<String>) -> Rejected {
    Rejected {
        status: Status::CONNECT_INVALID_PARAMETERS,
        dw0: (offset as u32 & 0xFFFF) | (u32::from(in_data) << 16),
        reason: reason.into(),
    }
}

/// What the Connect data field at `offset` is called, for refusal reasons.
fn data_field_name(offset: u16) -> &'static str {
    match usize::from(offset) {
        CONNECT_OFF_SUBNQN => "SUBNQN",
        CONNECT_OFF_HOSTNQN => "HOSTNQN",
        CONNECT_OFF_CNTLID => "CNTLID",
        _ => "the Connect data",
    }
}

/// Executes Connect with its 1024-byte data.
///
/// What is checked, against NVMe over Fabrics 1.1 section 3.3 and what hosts send (SPDK v24.09's
/// `nvme_fabric_qpair_connect_async`, the Linux host's `nvmf_connect_admin_queue`):
/// - RECFMT must be 0.
/// - SUBNQN must name a subsystem here (the discovery subsystem included); an empty HOSTNQN is
///   accepted where any host is allowed (see [`ConnectData::decode`]).
/// - Admin queue (QID 0): SQSIZE + 1 within 32 (the Fabrics minimum) ..= the admin queue maximum;
///   CNTLID must be FFFFh, the dynamic controller model (both hosts send it); any KATO (0 turns
///   the keep-alive timer off).
/// - I/O queue: the controller CNTLID of the same host (HOSTNQN and HOSTID), SQSIZE + 1 within
///   2 ..= the I/O queue depth (CAP.MQES + 1), the controller enabled, the QID free and granted.
/// - CATTR bit 2 (disable SQ flow control) is honoured; the other bits are not checked.
pub fn connect(target: &Target, sqe: &Sqe, data: &[u8]) -> Result<Accepted, Rejected> {
    let cmd = ConnectCmd::from_sqe(sqe);
    if cmd.recfmt != 0 {
        return Err(Rejected::new(Status::CONNECT_INCOMPATIBLE_FORMAT, format!("record format {} is not 0", cmd.recfmt)));
    }
    let d = ConnectData::decode(data).map_err(|e| {
        let why = if data.len() < CONNECT_DATA_LEN {
            format!("Connect data is {} bytes, not {CONNECT_DATA_LEN}", data.len())
        } else {
            format!("{} is not a NUL-terminated UTF-8 string (or SUBNQN is empty)", data_field_name(e.offset))
        };
        invalid_param(true, usize::from(e.offset), why)
    })?;
    let subsys =
        target.subsystem(&d.subnqn).ok_or_else(|| invalid_param(true, CONNECT_OFF_SUBNQN, format!("no subsystem {:?}", d.subnqn)))?;
    if !subsys.allows(&d.hostnqn) {
        let why = if d.hostnqn.is_empty() {
            "the host sent an empty HOSTNQN and the subsystem allows only listed hosts (SPDK: add hostnqn:<nqn> to the transport ID)"
                .to_owned()
        } else {
            format!("host {:?} is not allowed", d.hostnqn)
        };
        return Err(Rejected::new(Status::CONNECT_INVALID_HOST, why));
    }
    let entries = u32::from(cmd.sqsize) + 1;
    let sqflow_disabled = cmd.cattr & CATTR_DISABLE_SQFLOW != 0;
    let discovery = subsys.nqn == target.discovery.nqn;
    if cmd.qid == 0 {
        let (min, max) = (u32::from(target::ADMIN_QUEUE_MIN), u32::from(target::ADMIN_QUEUE_MAX));
        if !(min..=max).contains(&entries) {
            return Err(invalid_param(
                false,
                usize::from(CONNECT_SQE_OFF_SQSIZE),
                format!("admin queue SQSIZE {} ({entries} entries) is outside {min}..={max} entries", cmd.sqsize),
            ));
        }
        if d.cntlid != CNTLID_DYNAMIC {
            return Err(invalid_param(
                true,
                CONNECT_OFF_CNTLID,
                format!("admin queue CNTLID {:#06x} is not FFFFh (the dynamic controller model)", d.cntlid),
            ));
        }
        let kind = if discovery { ControllerKind::Discovery } else { ControllerKind::Io };
        let (cntlid_min, cntlid_max) = subsys.cntlid_range(&target.limits);
        let ctrl = subsys
            .add_controller(cntlid_min, cntlid_max, |id| {
                Arc::new(Controller::new(id, kind, subsys.clone(), d.hostnqn.clone(), d.hostid, cmd.kato_ms))
            })
            .ok_or_else(|| Rejected::new(Status::CONNECT_CONTROLLER_BUSY, "every controller id of the subsystem is in use"))?;
        tracing::info!(cntlid = ctrl.cntlid, subnqn = %subsys.nqn, hostnqn = %d.hostnqn, kato_ms = cmd.kato_ms, "controller created");
        return Ok(Accepted { ctrl, qid: 0, entries: entries as u16, sqflow_disabled });
    }
    if discovery {
        return Err(invalid_param(
            false,
            usize::from(CONNECT_SQE_OFF_QID),
            format!("QID {}: a discovery controller has no I/O queues", cmd.qid),
        ));
    }
    let ctrl = subsys
        .controller(d.cntlid)
        .ok_or_else(|| invalid_param(true, CONNECT_OFF_CNTLID, format!("I/O queue for controller {} which does not exist", d.cntlid)))?;
    if ctrl.hostnqn != d.hostnqn || ctrl.hostid != d.hostid {
        return Err(invalid_param(
            true,
            CONNECT_OFF_HOSTNQN,
            format!("HOSTNQN/HOSTID differ from those that created controller {}", d.cntlid),
        ));
    }
    let depth = u32::from(target.limits.io_queue_depth);
    if entries < 2 || entries > depth {
        return Err(invalid_param(
            false,
            usize::from(CONNECT_SQE_OFF_SQSIZE),
            format!("I/O queue SQSIZE {} ({entries} entries) is outside 2..={depth} entries", cmd.sqsize),
        ));
    }
    if !ctrl.is_ready() {
        return Err(Rejected::new(
            Status::COMMAND_SEQUENCE_ERROR,
            format!("I/O queue before controller {} is enabled (CSTS.RDY = 0)", d.cntlid),
        ));
    }
    ctrl.add_io_queue(cmd.qid, target.limits.max_io_queues).map_err(|_| {
        invalid_param(
            false,
            usize::from(CONNECT_SQE_OFF_QID),
            format!("QID {} is already connected, or beyond the I/O queues granted to controller {}", cmd.qid, d.cntlid),
        )
    })?;
    Ok(Accepted { ctrl, qid: cmd.qid, entries: entries as u16, sqflow_disabled })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, DEFAULT_NQN, DISCOVERY_NQN};
    use tessera_nvme_proto::fabrics::{prop, PropertyCmd};
    use tessera_nvme_proto::opcode::{fctype, FABRICS};

    /// The Connect SQE as SPDK v24.09 builds it (`nvme_fabric_qpair_connect_async` in
    /// lib/nvme/nvme_fabric.c, SGL and CID from `nvme_tcp_req_init` in lib/nvme/nvme_tcp.c):
    /// admin queue of 32 entries (DEFAULT_ADMIN_QUEUE_SIZE) so SQSIZE 31, KATO 10000 ms
    /// (MIN_KEEP_ALIVE_TIMEOUT_IN_MS), CATTR 0, in-capsule SGL of 1024 bytes.
    fn spdk_sqe(qid: u16, sqsize: u16) -> Sqe {
        let mut s = Sqe([0; 64]);
        s.0[0] = FABRICS;
        s.0[1] = 0x40; // PSDT 01b: SGL, metadata buffer
        s.0[4] = fctype::CONNECT;
        s.0[32..36].copy_from_slice(&1024u32.to_le_bytes()); // SGL length
        s.0[39] = 0x01; // data block, offset subtype
        s.0[42..44].copy_from_slice(&qid.to_le_bytes());
        s.0[44..46].copy_from_slice(&sqsize.to_le_bytes());
        s.0[48..52].copy_from_slice(&10_000u32.to_le_bytes());
        s
    }

    fn spdk_data(cntlid: u16, subnqn: &str, hostnqn: &str) -> Vec<u8> {
        let mut d = vec![0u8; 1024];
        d[..16].copy_from_slice(&[0x5a; 16]); // extended_host_id: a random UUID
        d[16..18].copy_from_slice(&cntlid.to_le_bytes());
        d[256..256 + subnqn.len()].copy_from_slice(subnqn.as_bytes());
        d[512..512 + hostnqn.len()].copy_from_slice(hostnqn.as_bytes());
        d
    }

    fn target(allow_any: bool) -> Target {
        let mut cfg = Config::default();
        if !allow_any {
            cfg.subsystems[0].allow_any_host = false;
            cfg.subsystems[0].allowed_hosts = vec!["nqn.2014-08.org.nvmexpress:uuid:1".into()];
        }
        Target::new(&cfg).unwrap()
    }

    fn enable(ctrl: &Controller, t: &Target) {
        let mut s = Sqe::new(FABRICS, 1);
        PropertyCmd { eight_bytes: false, offset: prop::CC, value: 1 | (6 << 16) | (4 << 20) }.write_to(&mut s, fctype::PROPERTY_SET);
        ctrl.property(&s, true, &t.limits);
        assert!(ctrl.is_ready());
    }

    #[test]
    fn spdk_connects_to_discovery_and_io_subsystems_with_an_empty_hostnqn() {
        let t = target(true);
        let uuid_nqn = "nqn.2014-08.org.nvmexpress:uuid:5a5a5a5a-5a5a-5a5a-5a5a-5a5a5a5a5a5a";
        let a = connect(&t, &spdk_sqe(0, 31), &spdk_data(0xFFFF, DISCOVERY_NQN, uuid_nqn)).unwrap();
        assert_eq!((a.qid, a.entries, a.sqflow_disabled), (0, 32, false));
        assert_eq!(a.ctrl.kind, ControllerKind::Discovery);
        // spdk_nvme_perf without hostnqn: in its transport ID sends an all-zero HOSTNQN.
        let a = connect(&t, &spdk_sqe(0, 31), &spdk_data(0xFFFF, DEFAULT_NQN, "")).unwrap();
        assert_eq!(a.ctrl.kind, ControllerKind::Io);
        enable(&a.ctrl, &t);
        let io = connect(&t, &spdk_sqe(1, 127), &spdk_data(a.ctrl.cntlid, DEFAULT_NQN, "")).unwrap();
        assert_eq!((io.qid, io.entries), (1, 128));
    }

    #[test]
    fn every_refusal_says_why() {
        let t = target(true);
        let reason = |sqe: Sqe, data: Vec<u8>| connect(&t, &sqe, &data).unwrap_err();
        let host = "nqn.2014-08.org.nvmexpress:uuid:1";
        let r = reason(spdk_sqe(0, 31), spdk_data(0xFFFF, "nqn.2026-11.io.tessera:nope", host));
        assert_eq!((r.status, r.dw0), (Status::CONNECT_INVALID_PARAMETERS, (1 << 16) | 256));
        assert!(r.reason.contains("no subsystem \"nqn.2026-11.io.tessera:nope\""), "{}", r.reason);
        let r = reason(spdk_sqe(0, 31), spdk_data(0xFFFE, DEFAULT_NQN, host));
        assert_eq!(r.dw0, (1 << 16) | 16);
        assert!(r.reason.contains("CNTLID 0xfffe is not FFFFh"), "{}", r.reason);
        let r = reason(spdk_sqe(0, 15), spdk_data(0xFFFF, DEFAULT_NQN, host));
        assert_eq!(r.dw0, 44);
        assert!(r.reason.contains("SQSIZE 15 (16 entries) is outside 32..=128"), "{}", r.reason);
        let mut unterminated = spdk_data(0xFFFF, DEFAULT_NQN, host);
        unterminated[512..768].fill(b'x');
        let r = reason(spdk_sqe(0, 31), unterminated);
        assert_eq!(r.dw0, (1 << 16) | 512);
        assert!(r.reason.contains("HOSTNQN is not a NUL-terminated"), "{}", r.reason);
        let r = reason(spdk_sqe(0, 31), vec![0; 512]);
        assert!(r.reason.contains("512 bytes, not 1024"), "{}", r.reason);
        let mut fmt = spdk_sqe(0, 31);
        fmt.0[40] = 1;
        let r = reason(fmt, spdk_data(0xFFFF, DEFAULT_NQN, host));
        assert_eq!(r.status, Status::CONNECT_INCOMPATIBLE_FORMAT);
        assert!(r.reason.contains("record format 1"), "{}", r.reason);
        let r = reason(spdk_sqe(1, 127), spdk_data(0xFFFF, DISCOVERY_NQN, host));
        assert!(r.reason.contains("discovery controller has no I/O queues"), "{}", r.reason);
        let r = reason(spdk_sqe(1, 127), spdk_data(7, DEFAULT_NQN, host));
        assert!(r.reason.contains("controller 7 which does not exist"), "{}", r.reason);

        let a = connect(&t, &spdk_sqe(0, 31), &spdk_data(0xFFFF, DEFAULT_NQN, host)).unwrap();
        let id = a.ctrl.cntlid;
        let r = reason(spdk_sqe(1, 127), spdk_data(id, DEFAULT_NQN, host));
        assert_eq!(r.status, Status::COMMAND_SEQUENCE_ERROR);
        assert!(r.reason.contains("is enabled"), "{}", r.reason);
        enable(&a.ctrl, &t);
        let r = reason(spdk_sqe(1, 127), spdk_data(id, DEFAULT_NQN, "nqn.other"));
        assert!(r.reason.contains("HOSTNQN/HOSTID differ"), "{}", r.reason);
        let r = reason(spdk_sqe(1, 128), spdk_data(id, DEFAULT_NQN, host));
        assert!(r.reason.contains("SQSIZE 128 (129 entries) is outside 2..=128"), "{}", r.reason);
        connect(&t, &spdk_sqe(1, 127), &spdk_data(id, DEFAULT_NQN, host)).unwrap();
        let r = reason(spdk_sqe(1, 127), spdk_data(id, DEFAULT_NQN, host));
        assert!(r.reason.contains("QID 1 is already connected"), "{}", r.reason);

        // Only listed hosts: an empty HOSTNQN cannot be one of them.
        let t = target(false);
        let r = connect(&t, &spdk_sqe(0, 31), &spdk_data(0xFFFF, DEFAULT_NQN, "")).unwrap_err();
        assert_eq!(r.status, Status::CONNECT_INVALID_HOST);
        assert!(r.reason.contains("empty HOSTNQN"), "{}", r.reason);
        let r = connect(&t, &spdk_sqe(0, 31), &spdk_data(0xFFFF, DEFAULT_NQN, "nqn.x")).unwrap_err();
        assert!(r.reason.contains("host \"nqn.x\" is not allowed"), "{}", r.reason);
        connect(&t, &spdk_sqe(0, 31), &spdk_data(0xFFFF, DEFAULT_NQN, host)).unwrap();
    }
}
