//! A controller: the state a host builds with Connect on an admin queue, and the admin command
//! set it serves. Admin commands are plain synchronous functions of (controller state, target
//! state, command); the connection task only moves their results onto the wire.
//!
//! Two kinds exist: I/O controllers of an NVM subsystem and discovery controllers of the discovery
//! subsystem. Both live until their admin connection closes, the keep-alive timer expires, or the
//! subsystem goes away; [`Controller::cancel`] then closes every queue connection attached.

use std::collections::{BTreeSet, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tessera_bdev::BlockDevice;
use tessera_nvme_proto::fabrics::{self, cc, csts, prop, PropertyCmd};
use tessera_nvme_proto::identify::{self, cntrltype, ControllerInfo, NamespaceInfo};
use tessera_nvme_proto::log::{self, DiscoveryEntry, ErrorEntry, SmartInfo};
use tessera_nvme_proto::opcode::{admin, cns, feature, log_id};
use tessera_nvme_proto::{Sqe, Status};
use tessera_nvme_resv::NoticeKind;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::config::MAX_NSID;
use crate::resv::NoticeLog;
use crate::target::{self, Namespace, Subsystem, Target};

/// Outstanding Asynchronous Event Requests allowed, 0's based (AERL).
pub const AERL: u8 = 3;
/// Error log entries kept, 0's based (ELPE).
pub const ELPE: u8 = 63;
/// Extra time past KATO before a silent host's controller is torn down.
pub const KATO_GRACE: Duration = Duration::from_secs(1);
/// Keep Alive granularity reported in Identify (KAS), in 100 ms units.
pub const KAS: u16 = 1;

/// OAES bit 31: discovery log page change notices.
const OAES_DISCOVERY_CHANGE: u32 = 1 << 31;
/// Asynchronous event type "notice".
const AE_TYPE_NOTICE: u32 = 2;
/// Notice: namespace attribute changed.
const AE_INFO_NS_ATTR: u32 = 0x00;
/// Notice: discovery log page change.
const AE_INFO_DISCOVERY: u32 = 0xF0;
/// Notice: Asymmetric Namespace Access Change.
const AE_INFO_ANA_CHANGE: u32 = 0x03;
/// Event type 6 (I/O command specific status), information 00h (Reservation Log Page
/// Available), log page 80h.
const AE_RESERVATION_LOG: u32 = 6 | ((log_id::RESERVATION_NOTIFICATION as u32) << 16);

/// Whether a controller belongs to an NVM subsystem or is a discovery controller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ControllerKind {
    Io,
    Discovery,
}

#[derive(Debug)]
struct State {
    cc: u32,
    csts: u32,
    kato_ms: u32,
    last_keepalive: Instant,
    async_event_config: u32,
    write_cache_enabled: bool,
    io_queues_granted: Option<u16>,
    io_queues: BTreeSet<u16>,
    pending_aers: VecDeque<u16>,
    pending_events: VecDeque<u32>,
    masked_logs: BTreeSet<u8>,
    changed_namespaces: BTreeSet<u32>,
    errors: VecDeque<ErrorEntry>,
    error_count: u64,
    notices: NoticeLog,
}

/// A controller.
#[derive(Debug)]
pub struct Controller {
    pub cntlid: u16,
    pub kind: ControllerKind,
    pub subsys: Arc<Subsystem>,
    pub hostnqn: String,
    pub hostid: [u8; 16],
    state: Mutex<State>,
    /// Cancelled when the controller is torn down; every queue connection of it then closes.
    pub cancel: CancellationToken,
    /// Signalled when an asynchronous event may complete a held AER.
    pub aen: Notify,
}

/// What an admin or fabrics command produced.
#[derive(Debug)]
pub enum AdminOutcome {
    /// Complete now with this status, DW0 and data for the host.
    Reply { status: Status, dw0: u32, dw1: u32, data: Option<Bytes> },
    /// Hold the command (an Asynchronous Event Request) until an event completes it.
    Held,
    /// CC.SHN was set: flush every namespace, then complete with success.
    Shutdown,
}

impl AdminOutcome {
    fn status(status: Status) -> AdminOutcome {
        AdminOutcome::Reply { status, dw0: 0, dw1: 0, data: None }
    }

    fn ok(dw0: u32) -> AdminOutcome {
        AdminOutcome::Reply { status: Status::SUCCESS, dw0, dw1: 0, data: None }
    }
}

/// Returns `page` to the host if the host's buffer (the SGL length) is exactly its size.
fn reply_page(page: Vec<u8>, sgl_len: u32) -> AdminOutcome {
    if page.len() != sgl_len as usize {
        return AdminOutcome::status(Status::DATA_SGL_LENGTH_INVALID);
    }
    AdminOutcome::Reply { status: Status::SUCCESS, dw0: 0, dw1: 0, data: Some(Bytes::from(page)) }
}

impl Controller {
    /// A new controller of `subsys` for `hostnqn`.
    pub fn new(cntlid: u16, kind: ControllerKind, subsys: Arc<Subsystem>, hostnqn: String, hostid: [u8; 16], kato_ms: u32) -> Controller {
        Controller {
            cntlid,
            kind,
            subsys,
            hostnqn,
            hostid,
            state: Mutex::new(State {
                cc: 0,
                csts: 0,
                kato_ms,
                last_keepalive: Instant::now(),
                async_event_config: 0,
                write_cache_enabled: true,
                io_queues_granted: None,
                io_queues: BTreeSet::new(),
                pending_aers: VecDeque::new(),
                pending_events: VecDeque::new(),
                masked_logs: BTreeSet::new(),
                changed_namespaces: BTreeSet::new(),
                errors: VecDeque::new(),
                error_count: 0,
                notices: NoticeLog::default(),
            }),
            cancel: CancellationToken::new(),
            aen: Notify::new(),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Tears the controller down: its queues close and it leaves its subsystem.
    pub fn shut_down(&self, reason: &str) {
        if !self.cancel.is_cancelled() {
            tracing::info!(cntlid = self.cntlid, subnqn = %self.subsys.nqn, hostnqn = %self.hostnqn, "controller torn down: {reason}");
            self.cancel.cancel();
        }
        self.subsys.remove_controller(self.cntlid);
    }

    /// Whether CSTS.RDY is set.
    pub fn is_ready(&self) -> bool {
        self.state().csts & csts::RDY != 0
    }

    /// Registers I/O queue `qid` after its Connect; the status is the Connect failure otherwise.
    pub fn add_io_queue(&self, qid: u16, max_io_queues: u16) -> Result<(), Status> {
        let mut st = self.state();
        let limit = st.io_queues_granted.unwrap_or(max_io_queues);
        if self.kind != ControllerKind::Io || qid == 0 || qid > limit || st.io_queues.contains(&qid) {
            return Err(Status::CONNECT_INVALID_PARAMETERS);
        }
        st.io_queues.insert(qid);
        Ok(())
    }

    /// Forgets I/O queue `qid` when its connection closes.
    pub fn remove_io_queue(&self, qid: u16) {
        self.state().io_queues.remove(&qid);
    }

    /// The instant after which the controller is torn down unless a Keep Alive arrives.
    pub fn keepalive_deadline(&self) -> Option<Instant> {
        let st = self.state();
        (st.kato_ms != 0).then(|| st.last_keepalive + Duration::from_millis(u64::from(st.kato_ms)) + KATO_GRACE)
    }

    /// Records an error for the Error Information log.
    pub fn record_error(&self, sqid: u16, cid: u16, status: Status, nsid: u32, lba: u64) {
        let mut st = self.state();
        st.error_count += 1;
        let entry =
            ErrorEntry { error_count: st.error_count, sqid, cid, status_field: status.to_field(), param_error_location: 0xFFFF, lba, nsid };
        st.errors.push_front(entry);
        st.errors.truncate(usize::from(ELPE) + 1);
    }

    fn raise_event(&self, log: u8, dw0: u32, enabled: bool) {
        let mut st = self.state();
        if !enabled || st.masked_logs.contains(&log) {
            return;
        }
        // Further events of this kind stay masked until the host reads the log page.
        st.masked_logs.insert(log);
        st.pending_events.push_back(dw0);
        drop(st);
        self.aen.notify_one();
    }

    /// Namespaces of this controller's subsystem were added, removed or resized.
    pub fn namespaces_changed(&self, nsids: &[u32]) {
        let enabled = {
            let mut st = self.state();
            st.changed_namespaces.extend(nsids.iter().copied());
            st.async_event_config & identify::OAES_NS_ATTR != 0
        };
        let dw0 = AE_TYPE_NOTICE | (AE_INFO_NS_ATTR << 8) | (u32::from(log_id::CHANGED_NAMESPACES) << 16);
        self.raise_event(log_id::CHANGED_NAMESPACES, dw0, enabled);
    }

    /// This path's ANA state changed: the host reads the ANA log page again.
    pub fn ana_changed(&self) {
        let enabled = self.state().async_event_config & identify::OAES_ANA_CHANGE != 0;
        let dw0 = AE_TYPE_NOTICE | (AE_INFO_ANA_CHANGE << 8) | (u32::from(log_id::ANA) << 16);
        self.raise_event(log_id::ANA, dw0, enabled);
    }

    /// This controller's host is owed a reservation notification about namespace `nsid`.
    pub fn reservation_notice(&self, nsid: u32, kind: NoticeKind) {
        self.state().notices.push(nsid, kind);
        self.raise_event(log_id::RESERVATION_NOTIFICATION, AE_RESERVATION_LOG, true);
    }

    /// The discovery log changed (for discovery controllers).
    pub fn discovery_log_changed(&self) {
        let enabled = self.state().async_event_config & OAES_DISCOVERY_CHANGE != 0;
        let dw0 = AE_TYPE_NOTICE | (AE_INFO_DISCOVERY << 8) | (u32::from(log_id::DISCOVERY) << 16);
        self.raise_event(log_id::DISCOVERY, dw0, enabled);
    }

    /// Pairs pending events with held AERs: the (CID, DW0) completions to send.
    pub fn take_event_completions(&self) -> Vec<(u16, u32)> {
        let mut st = self.state();
        let mut out = Vec::new();
        while !st.pending_aers.is_empty() && !st.pending_events.is_empty() {
            if let (Some(cid), Some(dw0)) = (st.pending_aers.pop_front(), st.pending_events.pop_front()) {
                out.push((cid, dw0));
            }
        }
        out
    }

    /// Forgets the held Asynchronous Event Request `cid`: the host gave it up (it reused the CID).
    pub fn forget_aer(&self, cid: u16) {
        self.state().pending_aers.retain(|&c| c != cid);
    }

    /// Whether Asynchronous Event Request `cid` is held.
    pub fn holds_aer(&self, cid: u16) -> bool {
        self.state().pending_aers.contains(&cid)
    }

    /// Marks shutdown processing complete (after the namespaces were flushed).
    pub fn shutdown_complete(&self) {
        let mut st = self.state();
        st.csts = (st.csts & !(0b11 << 2)) | csts::SHST_COMPLETE;
    }

    /// Executes a Property Get or Set.
    pub fn property(&self, sqe: &Sqe, set: bool, limits: &target::ControllerLimits) -> AdminOutcome {
        let p = PropertyCmd::from_sqe(sqe);
        let mut st = self.state();
        if set {
            return match (p.offset, p.eight_bytes) {
                (prop::CC, false) => self.set_cc(&mut st, p.value as u32),
                _ => AdminOutcome::status(Status::INVALID_FIELD),
            };
        }
        let mqes = match self.kind {
            ControllerKind::Io => limits.io_queue_depth.max(target::ADMIN_QUEUE_MAX) - 1,
            ControllerKind::Discovery => target::ADMIN_QUEUE_MAX - 1,
        };
        let value: u64 = match (p.offset, p.eight_bytes) {
            (prop::CAP, true) => fabrics::cap_value(mqes, target::CAP_TIMEOUT),
            (prop::VS, false) => u64::from(target::NVME_VERSION),
            (prop::CC, false) => u64::from(st.cc),
            (prop::CSTS, false) => u64::from(st.csts),
            _ => return AdminOutcome::status(Status::INVALID_FIELD),
        };
        AdminOutcome::Reply { status: Status::SUCCESS, dw0: value as u32, dw1: (value >> 32) as u32, data: None }
    }

    fn set_cc(&self, st: &mut State, new: u32) -> AdminOutcome {
        let old = st.cc;
        st.cc = new;
        let enabled = new & cc::EN != 0;
        if enabled && old & cc::EN == 0 {
            let iosqes = (new >> 16) & 0xF;
            let iocqes = (new >> 20) & 0xF;
            let mps = (new >> 7) & 0xF;
            let css = (new >> 4) & 0x7;
            let ams = (new >> 11) & 0x7;
            st.csts = if iosqes == 6 && iocqes == 4 && mps == 0 && css == 0 && ams == 0 { csts::RDY } else { csts::CFS };
        } else if !enabled && old & cc::EN != 0 {
            // Controller reset: queues are gone, pending AERs are aborted by the host's reset.
            st.csts = 0;
            st.pending_aers.clear();
        }
        if (new >> cc::SHN_SHIFT) & cc::SHN_MASK != 0 && (old >> cc::SHN_SHIFT) & cc::SHN_MASK == 0 {
            return AdminOutcome::Shutdown;
        }
        AdminOutcome::ok(0)
    }

    /// Executes an admin command (not a fabrics command). `sgl_len` is the host buffer length for
    /// commands that return data; `local` is the address the host connected to.
    pub fn admin(&self, target: &Target, sqe: &Sqe, sgl_len: u32, local: SocketAddr) -> AdminOutcome {
        let discovery = self.kind == ControllerKind::Discovery;
        match sqe.opcode() {
            admin::IDENTIFY => self.identify(target, sqe, sgl_len),
            admin::GET_LOG_PAGE => self.get_log_page(target, sqe, sgl_len, local),
            admin::GET_FEATURES => self.get_features(target, sqe),
            admin::SET_FEATURES => self.set_features(target, sqe),
            admin::KEEP_ALIVE => {
                self.state().last_keepalive = Instant::now();
                AdminOutcome::ok(0)
            }
            admin::ASYNC_EVENT_REQUEST => self.async_event_request(sqe.cid()),
            // DW0 bit 0 set: the command was not aborted (it completes on its own).
            admin::ABORT if !discovery => AdminOutcome::ok(1),
            _ => AdminOutcome::status(Status::INVALID_OPCODE),
        }
    }

    fn async_event_request(&self, cid: u16) -> AdminOutcome {
        let mut st = self.state();
        if let Some(dw0) = st.pending_events.pop_front() {
            return AdminOutcome::ok(dw0);
        }
        if st.pending_aers.len() > usize::from(AERL) {
            return AdminOutcome::status(Status::AER_LIMIT_EXCEEDED);
        }
        st.pending_aers.push_back(cid);
        AdminOutcome::Held
    }

    fn controller_info(&self, target: &Target) -> ControllerInfo {
        let io = self.kind == ControllerKind::Io;
        ControllerInfo {
            serial: self.subsys.serial.clone(),
            model: self.subsys.model.clone(),
            firmware: target::FIRMWARE_REVISION.into(),
            cntlid: self.cntlid,
            version: target::NVME_VERSION,
            subnqn: self.subsys.nqn.clone(),
            cntrltype: if io { cntrltype::IO } else { cntrltype::DISCOVERY },
            mdts: target::MDTS_EXP,
            kas: KAS,
            nn: if io { MAX_NSID } else { 0 },
            maxcmd: if io { target.limits.io_queue_depth } else { target::ADMIN_QUEUE_MAX },
            ioccsz: if io { (64 + target::INCAPSULE_DATA) / 16 } else { 0 },
            iorcsz: if io { 1 } else { 0 },
            volatile_write_cache: self.subsys.has_volatile_cache(),
            oaes: self.supported_events(),
            aerl: AERL,
            elpe: ELPE,
            oncs: if io { identify::oncs::DSM | identify::oncs::WRITE_ZEROES | identify::oncs::RESERVATIONS } else { 0 },
            ana_groups: self.subsys.ana.get().filter(|_| io).map(|_| 1),
        }
    }

    fn identify(&self, target: &Target, sqe: &Sqe, sgl_len: u32) -> AdminOutcome {
        let cns_v = (sqe.cdw10() & 0xFF) as u8;
        let nsid = sqe.nsid();
        let io = self.kind == ControllerKind::Io;
        let page = match cns_v {
            cns::CONTROLLER => identify::controller(&self.controller_info(target)),
            cns::NAMESPACE if io => match self.subsys.namespace(nsid) {
                Some(ns) => {
                    let anagrpid = if self.subsys.ana.get().is_some() { crate::ana::ANA_GROUP } else { 0 };
                    identify::namespace(&namespace_info(&ns, anagrpid))
                }
                // A valid but inactive NSID reads as zeros.
                None if (1..=MAX_NSID).contains(&nsid) => vec![0; identify::IDENTIFY_LEN],
                None => return AdminOutcome::status(Status::INVALID_NAMESPACE),
            },
            cns::ACTIVE_NS_LIST if io => {
                if nsid >= 0xFFFF_FFFE {
                    return AdminOutcome::status(Status::INVALID_NAMESPACE);
                }
                identify::ns_list(self.subsys.namespaces().iter().map(|n| n.nsid).filter(|&id| id > nsid))
            }
            cns::NS_DESCRIPTORS if io => match self.subsys.namespace(nsid) {
                Some(ns) => identify::ns_descriptors(&ns.uuid, &ns.uuid),
                None => return AdminOutcome::status(Status::INVALID_NAMESPACE),
            },
            cns::CSI_CONTROLLER if io && sqe.cdw11() >> 24 == 0 => identify::nvm_controller(),
            _ => return AdminOutcome::status(Status::INVALID_FIELD),
        };
        reply_page(page, sgl_len)
    }

    fn get_log_page(&self, target: &Target, sqe: &Sqe, sgl_len: u32, local: SocketAddr) -> AdminOutcome {
        let cdw10 = sqe.cdw10();
        let lid = (cdw10 & 0xFF) as u8;
        let retain_event = cdw10 & (1 << 15) != 0;
        let numd = ((u64::from(sqe.cdw11() & 0xFFFF) << 16) | u64::from(cdw10 >> 16)) + 1;
        let offset = u64::from(sqe.cdw12()) | (u64::from(sqe.cdw13()) << 32);
        let len = numd * 4;
        if offset % 4 != 0 {
            return AdminOutcome::status(Status::INVALID_FIELD);
        }
        if len != u64::from(sgl_len) {
            return AdminOutcome::status(Status::DATA_SGL_LENGTH_INVALID);
        }
        let full = match (self.kind, lid) {
            (ControllerKind::Discovery, log_id::DISCOVERY) => discovery_log(target, &self.hostnqn, local),
            (ControllerKind::Io, log_id::ERROR) => {
                let st = self.state();
                let mut out = Vec::with_capacity((usize::from(ELPE) + 1) * log::ERROR_ENTRY_LEN);
                for e in &st.errors {
                    e.encode_into(&mut out);
                }
                out.resize((usize::from(ELPE) + 1) * log::ERROR_ENTRY_LEN, 0);
                out
            }
            (ControllerKind::Io, log_id::SMART) => match self.smart(target, sqe.nsid()) {
                Some(s) => log::smart(&s),
                None => return AdminOutcome::status(Status::INVALID_NAMESPACE),
            },
            (ControllerKind::Io, log_id::FIRMWARE_SLOT) => log::firmware_slot(target::FIRMWARE_REVISION),
            (ControllerKind::Io, log_id::ANA) => {
                // LSP bit 0 (CDW10 bit 8): Return Groups Only.
                let groups_only = cdw10 & (1 << 8) != 0;
                let nsids = self.subsys.namespaces().iter().map(|n| n.nsid).collect();
                match self.subsys.ana.log(nsids, groups_only) {
                    Some(page) => page,
                    None => return AdminOutcome::status(Status::INVALID_LOG_PAGE),
                }
            }
            (ControllerKind::Io, log_id::RESERVATION_NOTIFICATION) => {
                let (page, more) = self.state().notices.pop();
                if more {
                    // The next page is announced once this one is read.
                    self.state().masked_logs.remove(&lid);
                    self.raise_event(lid, AE_RESERVATION_LOG, true);
                }
                page
            }
            (ControllerKind::Io, log_id::CHANGED_NAMESPACES) => {
                let mut st = self.state();
                let ids: Vec<u32> = std::mem::take(&mut st.changed_namespaces).into_iter().collect();
                log::changed_namespaces(&ids)
            }
            _ => return AdminOutcome::status(Status::INVALID_LOG_PAGE),
        };
        if !retain_event {
            self.state().masked_logs.remove(&lid);
        }
        // Return the requested window; bytes past the end of the log read as zeros.
        let mut page = vec![0u8; len as usize];
        if let Some(src) = usize::try_from(offset).ok().and_then(|o| full.get(o..)) {
            let n = src.len().min(page.len());
            if let (Some(d), Some(s)) = (page.get_mut(..n), src.get(..n)) {
                d.copy_from_slice(s);
            }
        }
        reply_page(page, sgl_len)
    }

    fn smart(&self, target: &Target, nsid: u32) -> Option<SmartInfo> {
        let namespaces: Vec<Arc<Namespace>> = match nsid {
            0 | 0xFFFF_FFFF => self.subsys.namespaces(),
            id => vec![self.subsys.namespace(id)?],
        };
        let mut s = SmartInfo {
            power_on_hours: target.started.elapsed().as_secs() / 3600,
            power_cycles: 1,
            error_log_entries: self.state().error_count,
            ..SmartInfo::default()
        };
        use std::sync::atomic::Ordering::Relaxed;
        for ns in namespaces {
            let c = &ns.counters;
            s.bytes_read += c.bytes_read.load(Relaxed);
            s.bytes_written += c.bytes_written.load(Relaxed);
            s.host_read_commands += c.read_commands.load(Relaxed);
            s.host_write_commands += c.write_commands.load(Relaxed);
            s.media_errors += c.media_errors.load(Relaxed);
        }
        Some(s)
    }

    fn supported_events(&self) -> u32 {
        match self.kind {
            ControllerKind::Io if self.subsys.ana.get().is_some() => identify::OAES_NS_ATTR | identify::OAES_ANA_CHANGE,
            ControllerKind::Io => identify::OAES_NS_ATTR,
            ControllerKind::Discovery => OAES_DISCOVERY_CHANGE,
        }
    }

    fn get_features(&self, target: &Target, sqe: &Sqe) -> AdminOutcome {
        let fid = (sqe.cdw10() & 0xFF) as u8;
        let sel = (sqe.cdw10() >> 8) & 0x7;
        let io = self.kind == ControllerKind::Io;
        if sel == 3 {
            // Supported capabilities: changeable, not saveable, not namespace specific.
            return match fid {
                feature::KEEP_ALIVE_TIMER | feature::ASYNC_EVENT_CONFIG => AdminOutcome::ok(1 << 2),
                feature::NUMBER_OF_QUEUES | feature::VOLATILE_WRITE_CACHE if io => AdminOutcome::ok(1 << 2),
                _ => AdminOutcome::status(Status::INVALID_FIELD),
            };
        }
        let current = sel == 0;
        let st = self.state();
        let dw0 = match fid {
            feature::KEEP_ALIVE_TIMER => {
                if current {
                    st.kato_ms
                } else {
                    0
                }
            }
            feature::ASYNC_EVENT_CONFIG => {
                if current {
                    st.async_event_config
                } else {
                    0
                }
            }
            feature::NUMBER_OF_QUEUES if io => {
                let n = u32::from(st.io_queues_granted.filter(|_| current).unwrap_or(target.limits.max_io_queues)) - 1;
                n | (n << 16)
            }
            feature::VOLATILE_WRITE_CACHE if io => u32::from(self.subsys.has_volatile_cache() && (st.write_cache_enabled || !current)),
            _ => return AdminOutcome::status(Status::INVALID_FIELD),
        };
        AdminOutcome::ok(dw0)
    }

    fn set_features(&self, target: &Target, sqe: &Sqe) -> AdminOutcome {
        let fid = (sqe.cdw10() & 0xFF) as u8;
        if sqe.cdw10() & (1 << 31) != 0 {
            return AdminOutcome::status(Status::FEATURE_NOT_SAVEABLE);
        }
        let io = self.kind == ControllerKind::Io;
        let v = sqe.cdw11();
        let mut st = self.state();
        match fid {
            feature::KEEP_ALIVE_TIMER => {
                st.kato_ms = v;
                st.last_keepalive = Instant::now();
                AdminOutcome::ok(0)
            }
            feature::ASYNC_EVENT_CONFIG => {
                st.async_event_config = v & self.supported_events();
                AdminOutcome::ok(0)
            }
            feature::NUMBER_OF_QUEUES if io => {
                let (nsqr, ncqr) = (v & 0xFFFF, v >> 16);
                if nsqr == 0xFFFF || ncqr == 0xFFFF {
                    return AdminOutcome::status(Status::INVALID_FIELD);
                }
                let granted = (nsqr.max(ncqr) + 1).min(u32::from(target.limits.max_io_queues)) as u16;
                st.io_queues_granted = Some(granted);
                let n = u32::from(granted) - 1;
                AdminOutcome::ok(n | (n << 16))
            }
            feature::VOLATILE_WRITE_CACHE if io && self.subsys.has_volatile_cache() => {
                st.write_cache_enabled = v & 1 != 0;
                AdminOutcome::ok(0)
            }
            _ => AdminOutcome::status(Status::INVALID_FIELD),
        }
    }
}

/// Identify Namespace values of a namespace in ANA group `anagrpid` (0: no ANA reporting).
pub fn namespace_info(ns: &Namespace, anagrpid: u32) -> NamespaceInfo {
    NamespaceInfo {
        blocks: ns.bdev.num_blocks(),
        blocks_used: ns.bdev.allocated_blocks(),
        lba_shift: ns.lba_shift(),
        nguid: ns.uuid,
        write_protected: ns.bdev.write_protected(),
        anagrpid,
        rescap: tessera_nvme_resv::RESCAP,
    }
}

/// The discovery log for `hostnqn`: one entry per visible subsystem and listen address. A
/// wildcard listen address is reported as the address the host connected to.
pub fn discovery_log(target: &Target, hostnqn: &str, local: SocketAddr) -> Vec<u8> {
    let mut entries = Vec::new();
    for s in target.visible_subsystems(hostnqn) {
        for (i, addr) in target.listen.iter().enumerate() {
            let ip: IpAddr = if addr.ip().is_unspecified() { local.ip() } else { addr.ip() };
            entries.push(DiscoveryEntry {
                adrfam: if ip.is_ipv4() { log::adrfam::IPV4 } else { log::adrfam::IPV6 },
                subtype: log::subtype::NVME,
                portid: (i + 1) as u16,
                asqsz: target::ADMIN_QUEUE_MAX,
                trsvcid: addr.port().to_string(),
                subnqn: s.nqn.clone(),
                traddr: ip.to_string(),
            });
        }
        // The subsystem's other paths (other targets): a host discovers every path here.
        for (i, peer) in s.ana.get().map(|a| a.peers).unwrap_or_default().into_iter().enumerate() {
            entries.push(DiscoveryEntry {
                adrfam: if peer.is_ipv4() { log::adrfam::IPV4 } else { log::adrfam::IPV6 },
                subtype: log::subtype::NVME,
                portid: (target.listen.len() + i + 1) as u16,
                asqsz: target::ADMIN_QUEUE_MAX,
                trsvcid: peer.port().to_string(),
                subnqn: s.nqn.clone(),
                traddr: peer.ip().to_string(),
            });
        }
    }
    log::discovery(target.genctr(), &entries)
}
