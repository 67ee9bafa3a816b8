//! The Fabrics Connect command: finds the subsystem, checks the host against its access list,
//! creates a controller for an admin queue (dynamic controller model) or attaches an I/O queue to
//! an existing controller. Pure apart from registering the controller in its subsystem.

use std::sync::Arc;

use tessera_nvme_proto::fabrics::{
    ConnectCmd, ConnectData, CATTR_DISABLE_SQFLOW, CNTLID_DYNAMIC, CONNECT_OFF_CNTLID, CONNECT_OFF_HOSTNQN, CONNECT_OFF_SUBNQN,
    CONNECT_SQE_OFF_QID, CONNECT_SQE_OFF_SQSIZE,
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

/// A refused Connect: the completion to send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rejected {
    pub status: Status,
    pub dw0: u32,
}

impl Rejected {
    /// The completion entry for the host.
    pub fn cqe(&self, cid: u16) -> Cqe {
        let mut c = Cqe::new(cid, self.status);
        c.dw0 = self.dw0;
        c
    }
}

/// Invalid Parameters pointing at a field: IPO in DW0 bits 15:0, IATTR bit 16 set when the
/// field is in the Connect data rather than the SQE.
fn invalid_param(in_data: bool, offset: usize) -> Rejected {
    Rejected { status: Status::CONNECT_INVALID_PARAMETERS, dw0: (offset as u32 & 0xFFFF) | (u32::from(in_data) << 16) }
}

/// Executes Connect with its 1024-byte data.
pub fn connect(target: &Target, sqe: &Sqe, data: &[u8]) -> Result<Accepted, Rejected> {
    let cmd = ConnectCmd::from_sqe(sqe);
    if cmd.recfmt != 0 {
        return Err(Rejected { status: Status::CONNECT_INCOMPATIBLE_FORMAT, dw0: 0 });
    }
    let d = ConnectData::decode(data).map_err(|e| invalid_param(true, usize::from(e.offset)))?;
    let subsys = target.subsystem(&d.subnqn).ok_or(invalid_param(true, CONNECT_OFF_SUBNQN))?;
    if !subsys.allows(&d.hostnqn) {
        tracing::warn!(hostnqn = %d.hostnqn, subnqn = %d.subnqn, "host not allowed to connect");
        return Err(Rejected { status: Status::CONNECT_INVALID_HOST, dw0: 0 });
    }
    let entries = u32::from(cmd.sqsize) + 1;
    let sqflow_disabled = cmd.cattr & CATTR_DISABLE_SQFLOW != 0;
    let discovery = subsys.nqn == target.discovery.nqn;
    if cmd.qid == 0 {
        if !(u32::from(target::ADMIN_QUEUE_MIN)..=u32::from(target::ADMIN_QUEUE_MAX)).contains(&entries) {
            return Err(invalid_param(false, usize::from(CONNECT_SQE_OFF_SQSIZE)));
        }
        if d.cntlid != CNTLID_DYNAMIC {
            return Err(invalid_param(true, CONNECT_OFF_CNTLID));
        }
        let kind = if discovery { ControllerKind::Discovery } else { ControllerKind::Io };
        let lim = target.limits;
        let ctrl = subsys
            .add_controller(lim.cntlid_min, lim.cntlid_max, |id| {
                Arc::new(Controller::new(id, kind, subsys.clone(), d.hostnqn.clone(), d.hostid, cmd.kato_ms))
            })
            .ok_or(Rejected { status: Status::CONNECT_CONTROLLER_BUSY, dw0: 0 })?;
        tracing::info!(cntlid = ctrl.cntlid, subnqn = %subsys.nqn, hostnqn = %d.hostnqn, kato_ms = cmd.kato_ms, "controller created");
        return Ok(Accepted { ctrl, qid: 0, entries: entries as u16, sqflow_disabled });
    }
    if discovery {
        return Err(invalid_param(false, usize::from(CONNECT_SQE_OFF_QID)));
    }
    let ctrl = subsys.controller(d.cntlid).ok_or(invalid_param(true, CONNECT_OFF_CNTLID))?;
    if ctrl.hostnqn != d.hostnqn || ctrl.hostid != d.hostid {
        return Err(invalid_param(true, CONNECT_OFF_HOSTNQN));
    }
    if entries < 2 || entries > u32::from(target.limits.io_queue_depth) {
        return Err(invalid_param(false, usize::from(CONNECT_SQE_OFF_SQSIZE)));
    }
    if !ctrl.is_ready() {
        return Err(Rejected { status: Status::COMMAND_SEQUENCE_ERROR, dw0: 0 });
    }
    ctrl.add_io_queue(cmd.qid, target.limits.max_io_queues).map_err(|_| invalid_param(false, usize::from(CONNECT_SQE_OFF_QID)))?;
    Ok(Accepted { ctrl, qid: cmd.qid, entries: entries as u16, sqflow_disabled })
}
