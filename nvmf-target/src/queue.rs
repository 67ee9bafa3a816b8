//! Per-connection NVMe/TCP protocol state, free of I/O.
//!
//! A [`Queue`] is one TCP connection = one NVMe queue pair. It is fed received bytes and returns
//! [`Event`]s (a command is ready to execute, data for a command has fully arrived); the caller
//! executes commands and hands completions back with [`Queue::complete`]. Everything the queue
//! wants sent is appended to its [`Outbox`], which the socket task writes in order.
//!
//! The queue enforces the transport rules: ICReq first and only once; no PDU types that only a
//! controller may send; at most `queue size` commands outstanding with unique CIDs; H2CData only
//! for a command we sent an R2T for, with the R2T's tag, at the next expected offset and within
//! the solicited length. Any violation is a [`PduError`]: the caller sends the C2HTermReq that
//! [`Queue::terminate`] encodes and closes the connection.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

use bytes::{Bytes, BytesMut};
use tessera_nvme_proto::cqe::SQHD_DISABLED;
use tessera_nvme_proto::pdu::{self, DataPdu, IcReq, IcResp, PduErrorKind, R2t, CH_OFF_TYPE};
use tessera_nvme_proto::{Cqe, Digests, Pdu, PduError, PduLimits, Sqe, Status};

use crate::outbox::Outbox;

/// Hashes a command identifier with one multiplication: CIDs are small integers chosen by the
/// host, so a keyed hash buys nothing, and the table never holds more than the queue depth.
#[derive(Debug, Default, Clone, Copy)]
pub struct CidHasher(u64);

impl Hasher for CidHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 << 8 | u64::from(b)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }

    fn write_u16(&mut self, n: u16) {
        // Fibonacci hashing: the high bits, which hashbrown uses for its tag byte, depend on
        // every bit of the CID.
        self.0 = u64::from(n).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

type CidMap<V> = HashMap<u16, V, BuildHasherDefault<CidHasher>>;

/// Transport parameters of a queue.
#[derive(Clone, Copy, Debug)]
pub struct QueueParams {
    /// Largest in-capsule data accepted (admin and I/O queues alike).
    pub max_capsule_data: u32,
    /// MAXH2CDATA advertised in ICResp.
    pub maxh2cdata: u32,
    /// Queue entries allowed before Connect tells the real size (the admin queue maximum).
    pub initial_depth: u16,
}

/// Something the caller must act on.
#[derive(Debug)]
pub enum Event<P> {
    /// A command capsule arrived. `incapsule` holds its in-capsule data (possibly empty).
    Command {
        /// The command.
        sqe: Sqe,
        /// In-capsule data.
        incapsule: Bytes,
    },
    /// All data solicited for a command by [`Queue::request_data`] has arrived.
    DataReady {
        /// The command.
        sqe: Sqe,
        /// What the caller attached when requesting the data.
        payload: P,
        /// The data, one segment per H2CData PDU.
        data: Vec<Bytes>,
    },
    /// The host sent H2CTermReq: close the connection without replying.
    HostTerminated {
        /// Fatal error status the host reported.
        fes: u16,
    },
    /// A new command reused the CID of a command the queue was holding ([`Queue::hold`], an
    /// Asynchronous Event Request): the host has given that command up and it must never be
    /// completed. Delivered just before the new command's [`Event::Command`].
    Abandoned {
        /// The CID both commands carry.
        cid: u16,
    },
}

#[derive(Debug)]
enum Slot<P> {
    /// The command is being executed.
    Executing,
    /// The command waits for an event that may never come (an Asynchronous Event Request).
    Held,
    /// An R2T was sent; H2CData is arriving.
    Receiving { sqe: Sqe, payload: P, total: u32, received: u32, data: Vec<Bytes> },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    AwaitIcReq,
    Ready,
    Closed,
}

/// The protocol state of one connection.
#[derive(Debug)]
pub struct Queue<P> {
    params: QueueParams,
    phase: Phase,
    digests: Digests,
    slots: CidMap<Slot<P>>,
    depth: u16,
    qid: u16,
    sqhd: u16,
    sqflow_disabled: bool,
    out: Outbox,
}

impl<P> Queue<P> {
    /// A fresh connection awaiting ICReq.
    pub fn new(params: QueueParams) -> Self {
        Queue {
            params,
            phase: Phase::AwaitIcReq,
            digests: Digests::default(),
            slots: CidMap::default(),
            depth: params.initial_depth,
            qid: 0,
            sqhd: 0,
            sqflow_disabled: false,
            out: Outbox::new(),
        }
    }

    /// Digests negotiated by ICReq.
    pub fn digests(&self) -> Digests {
        self.digests
    }

    /// Records the outcome of a successful Connect: queue id, size (entries) and flow control.
    pub fn on_connected(&mut self, qid: u16, entries: u16, sqflow_disabled: bool) {
        self.qid = qid;
        self.depth = entries;
        self.sqflow_disabled = sqflow_disabled;
    }

    /// Number of commands outstanding.
    pub fn outstanding(&self) -> usize {
        self.slots.len()
    }

    /// Decodes every complete PDU in `buf` and returns the resulting events. On a protocol
    /// violation, returns the error; the connection must then be terminated.
    pub fn receive(&mut self, buf: &mut BytesMut, events: &mut Vec<Event<P>>) -> Result<(), PduError> {
        let limits = PduLimits { max_capsule_data: self.params.max_capsule_data, max_data_pdu: self.params.maxh2cdata };
        while self.phase != Phase::Closed {
            // The first bytes of the PDU, quoted in a termination request if it breaks the rules.
            let mut header = [0u8; pdu::SHORT_HLEN];
            let n = buf.len().min(header.len());
            if let (Some(dst), Some(src)) = (header.get_mut(..n), buf.get(..n)) {
                dst.copy_from_slice(src);
            }
            if self.phase == Phase::AwaitIcReq && buf.first().is_some_and(|&t| t != pdu::pdu_type::IC_REQ) {
                // Only ICReq may open a connection: no need to wait for the rest of the PDU.
                return Err(PduError::new(PduErrorKind::SequenceError, header.get(..n).unwrap_or_default()));
            }
            let Some(p) = pdu::decode(buf, self.digests, &limits)? else {
                break;
            };
            self.on_pdu(p, header.get(..n).unwrap_or_default(), events)?;
        }
        Ok(())
    }

    fn on_pdu(&mut self, p: Pdu, header: &[u8], events: &mut Vec<Event<P>>) -> Result<(), PduError> {
        let err = |k| PduError::new(k, header);
        match (self.phase, p) {
            (Phase::AwaitIcReq, Pdu::IcReq(req)) => self.on_icreq(req, header),
            (Phase::AwaitIcReq, _) | (Phase::Ready, Pdu::IcReq(_)) => Err(err(PduErrorKind::SequenceError)),
            (Phase::Ready, Pdu::CapsuleCmd { sqe, data }) => {
                let slot = self.slots.get(&sqe.cid());
                if !matches!(slot, Some(Slot::Held)) && self.slots.len() >= usize::from(self.depth) {
                    // The host submitted more commands than the queue holds.
                    return Err(err(PduErrorKind::SequenceError).with_reason(format!("more than {} commands outstanding", self.depth)));
                }
                match slot {
                    None => {}
                    // SPDK's host completes its outstanding AERs locally when it detaches a
                    // controller (nvme_ctrlr_destruct_async -> nvme_tcp_admin_qpair_abort_aers)
                    // and hands their CIDs to the shutdown's Property Get CC at once. The AER
                    // can never complete usefully any more: drop it and take the new command.
                    Some(Slot::Held) => events.push(Event::Abandoned { cid: sqe.cid() }),
                    Some(_) => {
                        // Command identifiers must be unique among outstanding commands.
                        return Err(err(PduErrorKind::InvalidHeaderField(pdu::CH_LEN as u32 + 2))
                            .with_reason(format!("CID {} reused while that command is still outstanding", sqe.cid())));
                    }
                }
                self.slots.insert(sqe.cid(), Slot::Executing);
                events.push(Event::Command { sqe, incapsule: data });
                Ok(())
            }
            (Phase::Ready, Pdu::H2cData(d)) => self.on_h2c_data(d, header, events),
            (_, Pdu::H2cTermReq(t)) => {
                self.phase = Phase::Closed;
                events.push(Event::HostTerminated { fes: t.fes });
                Ok(())
            }
            // PDU types only a controller sends.
            (_, Pdu::IcResp(_) | Pdu::CapsuleResp(_) | Pdu::C2hData(_) | Pdu::R2t(_) | Pdu::C2hTermReq(_)) => {
                Err(err(PduErrorKind::InvalidHeaderField(CH_OFF_TYPE)))
            }
            (Phase::Closed, _) => Ok(()),
        }
    }

    fn on_icreq(&mut self, req: IcReq, header: &[u8]) -> Result<(), PduError> {
        check_icreq(&req).map_err(|(kind, reason)| PduError::new(kind, header).with_reason(reason))?;
        // ICResp itself is sent without digests; they apply from the next PDU on.
        let resp = Pdu::IcResp(IcResp { pfv: 0, cpda: 0, digests: req.digests, maxh2cdata: self.params.maxh2cdata });
        self.push_pdu(&resp);
        self.digests = req.digests;
        self.phase = Phase::Ready;
        Ok(())
    }

    fn on_h2c_data(&mut self, d: DataPdu, header: &[u8], events: &mut Vec<Event<P>>) -> Result<(), PduError> {
        let err = |k| PduError::new(k, header);
        let Some(Slot::Receiving { total, received, data, .. }) = self.slots.get_mut(&d.cccid) else {
            return Err(err(PduErrorKind::InvalidHeaderField(8)));
        };
        if d.ttag != d.cccid {
            return Err(err(PduErrorKind::InvalidHeaderField(10)));
        }
        if d.datao != *received {
            return Err(err(PduErrorKind::DataOutOfRange));
        }
        let end = d.datao.checked_add(d.data.len() as u32).filter(|&e| e <= *total);
        let Some(end) = end else {
            return Err(err(PduErrorKind::DataOutOfRange));
        };
        if d.last != (end == *total) {
            return Err(err(PduErrorKind::SequenceError));
        }
        *received = end;
        data.push(d.data);
        if !d.last {
            return Ok(());
        }
        if let Some(Slot::Receiving { sqe, payload, data, .. }) = self.slots.insert(d.cccid, Slot::Executing) {
            events.push(Event::DataReady { sqe, payload, data });
        }
        Ok(())
    }

    /// Marks command `cid` as held: it completes only when an event arrives, and a new command
    /// with the same CID abandons it ([`Event::Abandoned`]) instead of being a protocol error.
    pub fn hold(&mut self, cid: u16) {
        if let Some(slot) = self.slots.get_mut(&cid) {
            *slot = Slot::Held;
        }
    }

    /// Forgets the held commands for which `keep` is false (a controller reset aborted them
    /// without completions).
    pub fn release_held(&mut self, keep: impl Fn(u16) -> bool) {
        self.slots.retain(|&cid, slot| !matches!(slot, Slot::Held) || keep(cid));
    }

    /// Solicits `len` bytes of data for command `sqe` with an R2T; [`Event::DataReady`] follows
    /// when it has arrived. `payload` is returned with the event.
    pub fn request_data(&mut self, sqe: Sqe, len: u32, payload: P) {
        let cid = sqe.cid();
        // The transfer tag is the command id: unique among this queue's outstanding R2Ts.
        self.push_pdu(&Pdu::R2t(R2t { cccid: cid, ttag: cid, r2to: 0, r2tl: len }));
        self.slots.insert(cid, Slot::Receiving { sqe, payload, total: len, received: 0, data: Vec::new() });
    }

    /// Completes command `cid`: sends `data` (if any) in a C2HData PDU, then the response capsule
    /// unless the C2HData's SUCCESS flag can stand in for it.
    pub fn complete(&mut self, cid: u16, mut cqe: Cqe, data: Option<Bytes>) {
        if self.slots.remove(&cid).is_none() || self.phase == Phase::Closed {
            return;
        }
        cqe.cid = cid;
        cqe.sqid = self.qid;
        cqe.sqhd = if self.sqflow_disabled {
            SQHD_DISABLED
        } else {
            self.sqhd = (self.sqhd + 1) % self.depth.max(1);
            self.sqhd
        };
        // With SQ flow control disabled the host needs no SQHD, so a successful read with an
        // all-zero result is completed by the data PDU's SUCCESS flag alone.
        let elide = self.sqflow_disabled && cqe.status.is_success() && cqe.dw0 == 0 && cqe.dw1 == 0;
        let mut elided = false;
        if let Some(data) = data.filter(|d| !d.is_empty()) {
            elided = elide;
            let ddgst = pdu::put_c2h_data_header(self.out.buf(), cid, 0, data.len() as u32, true, elide, self.digests);
            let d = ddgst.then(|| pdu::digest(&data));
            self.out.push_data(data);
            if let Some(d) = d {
                self.out.buf().extend_from_slice(&d);
            }
        }
        if !elided {
            self.push_pdu(&Pdu::CapsuleResp(cqe));
        }
    }

    /// Completes command `cid` with an error status and no data.
    pub fn fail(&mut self, cid: u16, status: Status) {
        self.complete(cid, Cqe::new(cid, status), None);
    }

    /// Encodes the C2HTermReq for `e` as the last output and closes the queue.
    pub fn terminate(&mut self, e: &PduError) {
        if self.phase == Phase::Closed {
            return;
        }
        self.push_pdu(&Pdu::C2hTermReq(e.term_req()));
        self.phase = Phase::Closed;
    }

    /// Whether the connection is finished (terminated by either side).
    pub fn is_closed(&self) -> bool {
        self.phase == Phase::Closed
    }

    /// Takes the chunks to send, in order.
    pub fn take_output(&mut self) -> Vec<Bytes> {
        self.out.take()
    }

    /// The output still to send, for a socket task that writes it in place.
    pub fn outbox(&mut self) -> &mut Outbox {
        &mut self.out
    }

    fn push_pdu(&mut self, p: &Pdu) {
        p.encode(self.digests, self.out.buf());
    }
}

/// Checks an ICReq against NVMe/TCP 1.0 (section 3.6.2.2): PFV must be 0 (the only version);
/// HPDA is 0 to 31 (32 to 255 are reserved). DGST bits 7:2 are reserved and MAXR2T may be any
/// value (the target never has more than one R2T outstanding per command), so neither is checked.
/// Returns the termination error and, for the log, why.
pub fn check_icreq(req: &IcReq) -> Result<(), (PduErrorKind, String)> {
    if req.pfv != 0 {
        return Err((PduErrorKind::UnsupportedParameter(8), format!("ICReq refused: PFV {} is not supported (only 0)", req.pfv)));
    }
    if req.hpda > 31 {
        return Err((PduErrorKind::InvalidHeaderField(10), format!("ICReq refused: HPDA {} is above 31", req.hpda)));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tessera_nvme_proto::pdu::{fes, TermReq};

    const PARAMS: QueueParams = QueueParams { max_capsule_data: 8192, maxh2cdata: 65536, initial_depth: 4 };

    fn drive(q: &mut Queue<u32>, pdus: &[Pdu], d: Digests) -> (Vec<Event<u32>>, Result<(), PduError>) {
        let mut buf = BytesMut::new();
        for p in pdus {
            p.encode(d, &mut buf);
        }
        let mut ev = Vec::new();
        let r = q.receive(&mut buf, &mut ev);
        (ev, r)
    }

    fn decode_out(q: &mut Queue<u32>) -> Vec<Pdu> {
        let mut buf = BytesMut::new();
        for c in q.take_output() {
            buf.extend_from_slice(&c);
        }
        let lim = PduLimits { max_capsule_data: 1 << 20, max_data_pdu: 1 << 20 };
        let mut out = Vec::new();
        let mut d = Digests::default();
        while let Some(p) = pdu::decode(&mut buf, d, &lim).unwrap() {
            if let Pdu::IcResp(r) = &p {
                d = r.digests;
            }
            out.push(p);
        }
        out
    }

    fn icreq(d: Digests) -> Pdu {
        Pdu::IcReq(IcReq { pfv: 0, hpda: 0, digests: d, maxr2t: 0 })
    }

    fn ready(d: Digests) -> Queue<u32> {
        let mut q = Queue::new(PARAMS);
        let (_, r) = drive(&mut q, &[icreq(d)], Digests::default());
        r.unwrap();
        q
    }

    fn write_cmd(cid: u16) -> Sqe {
        Sqe::new(0x01, cid)
    }

    #[test]
    fn icreq_is_answered_and_digests_echoed() {
        let both = Digests { header: true, data: true };
        let mut q = ready(both);
        let out = decode_out(&mut q);
        assert_eq!(out, vec![Pdu::IcResp(IcResp { pfv: 0, cpda: 0, digests: both, maxh2cdata: 65536 })]);
        assert_eq!(q.digests(), both);
    }

    #[test]
    fn command_before_icreq_is_a_sequence_error() {
        let mut q: Queue<u32> = Queue::new(PARAMS);
        let (_, r) = drive(&mut q, &[Pdu::CapsuleCmd { sqe: write_cmd(1), data: Bytes::new() }], Digests::default());
        assert_eq!(r.unwrap_err().fes(), fes::PDU_SEQUENCE_ERROR);
    }

    #[test]
    fn second_icreq_and_controller_pdus_are_rejected() {
        let mut q = ready(Digests::default());
        let (_, r) = drive(&mut q, &[icreq(Digests::default())], Digests::default());
        assert_eq!(r.unwrap_err().fes(), fes::PDU_SEQUENCE_ERROR);
        let mut q = ready(Digests::default());
        let (_, r) = drive(&mut q, &[Pdu::R2t(R2t { cccid: 1, ttag: 1, r2to: 0, r2tl: 1 })], Digests::default());
        assert_eq!(r.unwrap_err().kind, PduErrorKind::InvalidHeaderField(0));
    }

    #[test]
    fn unsupported_pfv_is_rejected() {
        let mut q: Queue<u32> = Queue::new(PARAMS);
        let (_, r) = drive(&mut q, &[Pdu::IcReq(IcReq { pfv: 1, hpda: 0, digests: Digests::default(), maxr2t: 0 })], Digests::default());
        assert_eq!(r.unwrap_err().kind, PduErrorKind::UnsupportedParameter(8));
    }

    /// The ICReq SPDK v24.09 sends (`nvme_tcp_qpair_icreq_send`, lib/nvme/nvme_tcp.c): HLEN =
    /// PLEN = 128, PFV 0, HPDA 0 (NVME_TCP_HPDA_DEFAULT), MAXR2T 0 (NVME_TCP_MAX_R2T_DEFAULT - 1),
    /// digests as configured (off by default).
    fn spdk_icreq() -> Vec<u8> {
        let mut b = vec![0u8; 128];
        b[2] = 128;
        b[4] = 128;
        b
    }

    #[test]
    fn spdk_icreq_is_accepted_and_refusals_say_why() {
        let mut q: Queue<u32> = Queue::new(PARAMS);
        let mut ev = Vec::new();
        q.receive(&mut BytesMut::from(&spdk_icreq()[..]), &mut ev).unwrap();
        assert!(matches!(decode_out(&mut q).as_slice(), [Pdu::IcResp(r)] if r.cpda == 0 && r.pfv == 0));
        // Reserved DGST bits and any MAXR2T are no reason to refuse; HPDA 31 is the largest.
        let ok = IcReq { pfv: 0, hpda: 31, digests: Digests::default(), maxr2t: u32::MAX };
        assert_eq!(check_icreq(&ok), Ok(()));
        let mut raw = spdk_icreq();
        raw[11] = 0xFC;
        let mut q: Queue<u32> = Queue::new(PARAMS);
        q.receive(&mut BytesMut::from(&raw[..]), &mut ev).unwrap();

        let refuse = |req: IcReq| {
            let mut q: Queue<u32> = Queue::new(PARAMS);
            let (_, r) = drive(&mut q, &[Pdu::IcReq(req)], Digests::default());
            let e = r.unwrap_err();
            (e.kind, e.to_string())
        };
        let (kind, msg) = refuse(IcReq { hpda: 32, ..ok });
        assert_eq!(kind, PduErrorKind::InvalidHeaderField(10));
        assert_eq!(msg, "invalid PDU header field at offset 10: ICReq refused: HPDA 32 is above 31");
        let (kind, msg) = refuse(IcReq { pfv: 1, ..ok });
        assert_eq!(kind, PduErrorKind::UnsupportedParameter(8));
        assert!(msg.ends_with("ICReq refused: PFV 1 is not supported (only 0)"), "{msg}");
    }

    #[test]
    fn reusing_the_cid_of_a_held_command_abandons_it() {
        let mut q = ready(Digests::default());
        q.on_connected(0, 32, false);
        let c = |cid| Pdu::CapsuleCmd { sqe: write_cmd(cid), data: Bytes::new() };
        // Four AERs held (CIDs 0 to 3), as SPDK submits them after Set Features AEC.
        let (ev, r) = drive(&mut q, &[c(0), c(1), c(2), c(3)], Digests::default());
        r.unwrap();
        assert_eq!(ev.len(), 4);
        for cid in 0..4 {
            q.hold(cid);
        }
        // SPDK's detach aborts them locally and sends Property Get CC with CID 3.
        let (ev, r) = drive(&mut q, &[c(3)], Digests::default());
        r.unwrap();
        assert!(matches!(ev.as_slice(), [Event::Abandoned { cid: 3 }, Event::Command { sqe, .. }] if sqe.cid() == 3));
        assert_eq!(q.outstanding(), 4);
        q.complete(3, Cqe::new(3, Status::SUCCESS), None);
        // A command still executing keeps its CID: reusing it is fatal.
        let (_, r) = drive(&mut q, &[c(7), c(7)], Digests::default());
        let e = r.unwrap_err();
        assert_eq!(e.kind, PduErrorKind::InvalidHeaderField(10));
        assert!(e.to_string().contains("CID 7 reused while that command is still outstanding"), "{e}");
    }

    #[test]
    fn a_full_queue_of_held_commands_still_takes_a_reused_cid() {
        let mut q = ready(Digests::default()); // depth 4
        let c = |cid| Pdu::CapsuleCmd { sqe: write_cmd(cid), data: Bytes::new() };
        let (_, r) = drive(&mut q, &[c(0), c(1), c(2), c(3)], Digests::default());
        r.unwrap();
        (0..4).for_each(|cid| q.hold(cid));
        let (ev, r) = drive(&mut q, &[c(2)], Digests::default());
        r.unwrap();
        assert!(matches!(ev.as_slice(), [Event::Abandoned { cid: 2 }, Event::Command { .. }]));
        // A fifth distinct CID is still one too many.
        let (_, r) = drive(&mut q, &[c(9)], Digests::default());
        assert_eq!(r.unwrap_err().kind, PduErrorKind::SequenceError);
    }

    #[test]
    fn released_held_commands_free_their_slots() {
        let mut q = ready(Digests::default());
        let c = |cid| Pdu::CapsuleCmd { sqe: write_cmd(cid), data: Bytes::new() };
        let (_, r) = drive(&mut q, &[c(1), c(2), c(3)], Digests::default());
        r.unwrap();
        q.hold(1);
        q.hold(2);
        q.release_held(|cid| cid == 2);
        assert_eq!(q.outstanding(), 2);
        q.release_held(|_| false);
        assert_eq!(q.outstanding(), 1, "an executing command is not released");
    }

    #[test]
    fn r2t_h2c_flow_delivers_data_in_order() {
        let mut q = ready(Digests::default());
        q.take_output();
        let (ev, r) = drive(&mut q, &[Pdu::CapsuleCmd { sqe: write_cmd(7), data: Bytes::new() }], Digests::default());
        r.unwrap();
        let Some(Event::Command { sqe, .. }) = ev.into_iter().next() else { panic!("no command") };
        q.request_data(sqe, 8192, 42);
        assert_eq!(decode_out(&mut q), vec![Pdu::R2t(R2t { cccid: 7, ttag: 7, r2to: 0, r2tl: 8192 })]);
        let part = |datao, last| {
            Pdu::H2cData(DataPdu { cccid: 7, ttag: 7, datao, data: Bytes::from(vec![datao as u8; 4096]), last, success: false })
        };
        let (ev, r) = drive(&mut q, &[part(0, false), part(4096, true)], Digests::default());
        r.unwrap();
        match ev.as_slice() {
            [Event::DataReady { payload: 42, data, .. }] => assert_eq!(data.iter().map(Bytes::len).sum::<usize>(), 8192),
            other => panic!("unexpected {other:?}"),
        }
        q.complete(7, Cqe::new(7, Status::SUCCESS), None);
        assert!(matches!(decode_out(&mut q).as_slice(), [Pdu::CapsuleResp(c)] if c.cid == 7 && c.status.is_success()));
        assert_eq!(q.outstanding(), 0);
    }

    fn receiving(cid: u16) -> Queue<u32> {
        let mut q = ready(Digests::default());
        let (_, r) = drive(&mut q, &[Pdu::CapsuleCmd { sqe: write_cmd(cid), data: Bytes::new() }], Digests::default());
        r.unwrap();
        q.request_data(write_cmd(cid), 4096, 0);
        q.take_output();
        q
    }

    #[test]
    fn h2c_violations_terminate() {
        let h2c = |cccid, ttag, datao, len, last| {
            Pdu::H2cData(DataPdu { cccid, ttag, datao, data: Bytes::from(vec![0; len]), last, success: false })
        };
        let cases = [
            (h2c(9, 9, 0, 4096, true), PduErrorKind::InvalidHeaderField(8)), // no such command
            (h2c(3, 4, 0, 4096, true), PduErrorKind::InvalidHeaderField(10)), // wrong tag
            (h2c(3, 3, 512, 512, false), PduErrorKind::DataOutOfRange),      // out of order
            (h2c(3, 3, 0, 8192, true), PduErrorKind::DataOutOfRange),        // beyond the R2T
            (h2c(3, 3, 0, 512, true), PduErrorKind::SequenceError),          // LAST too early
            (h2c(3, 3, 0, 4096, false), PduErrorKind::SequenceError),        // LAST missing
        ];
        for (p, want) in cases {
            let mut q = receiving(3);
            let (_, r) = drive(&mut q, std::slice::from_ref(&p), Digests::default());
            assert_eq!(r.unwrap_err().kind, want, "{p:?}");
        }
    }

    #[test]
    fn duplicate_cid_and_queue_overflow_terminate() {
        let mut q = ready(Digests::default());
        let c = |cid| Pdu::CapsuleCmd { sqe: write_cmd(cid), data: Bytes::new() };
        let (_, r) = drive(&mut q, &[c(1), c(1)], Digests::default());
        assert!(r.is_err());
        let mut q = ready(Digests::default());
        let (ev, r) = drive(&mut q, &[c(1), c(2), c(3), c(4), c(5)], Digests::default());
        assert_eq!(ev.len(), 4);
        assert_eq!(r.unwrap_err().kind, PduErrorKind::SequenceError);
    }

    #[test]
    fn read_completion_uses_success_flag_only_without_sq_flow_control() {
        for disabled in [false, true] {
            let mut q = ready(Digests { header: true, data: true });
            q.on_connected(1, 128, disabled);
            let (_, r) =
                drive(&mut q, &[Pdu::CapsuleCmd { sqe: Sqe::new(0x02, 5), data: Bytes::new() }], Digests { header: true, data: true });
            r.unwrap();
            q.take_output();
            q.complete(5, Cqe::new(5, Status::SUCCESS), Some(Bytes::from(vec![1u8; 512])));
            let mut buf = BytesMut::new();
            for c in q.take_output() {
                buf.extend_from_slice(&c);
            }
            let lim = PduLimits { max_capsule_data: 0, max_data_pdu: 1 << 20 };
            let d = Digests { header: true, data: true };
            let first = pdu::decode(&mut buf, d, &lim).unwrap().unwrap();
            assert!(matches!(&first, Pdu::C2hData(x) if x.last && x.success == disabled && x.data.len() == 512));
            let second = pdu::decode(&mut buf, d, &lim).unwrap();
            if disabled {
                assert_eq!(second, None);
            } else {
                assert!(matches!(second, Some(Pdu::CapsuleResp(c)) if c.sqhd == 1 && c.sqid == 1));
            }
        }
    }

    #[test]
    fn host_termination_closes_and_terminate_emits_c2h_term_req() {
        let mut q = ready(Digests::default());
        let (ev, r) = drive(&mut q, &[Pdu::H2cTermReq(TermReq { fes: 1, fei: 0, data: Bytes::new() })], Digests::default());
        r.unwrap();
        assert!(matches!(ev.as_slice(), [Event::HostTerminated { fes: 1 }]));
        assert!(q.is_closed());
        let mut q = ready(Digests::default());
        q.take_output();
        q.terminate(&PduError::new(PduErrorKind::HeaderDigest, &[0; 24]));
        assert!(matches!(decode_out(&mut q).as_slice(), [Pdu::C2hTermReq(t)] if t.fes == fes::HEADER_DIGEST_ERROR));
    }

    proptest::proptest! {
        /// Any byte stream, cut anywhere, after a valid ICReq: the queue never panics, emits only
        /// commands it tracks, and after an error stays closed.
        #[test]
        fn arbitrary_streams_never_panic(chunks in proptest::collection::vec(proptest::collection::vec(proptest::prelude::any::<u8>(), 0..200), 0..8), hd in proptest::prelude::any::<bool>()) {
            let d = Digests { header: hd, data: false };
            let mut q = ready(d);
            let mut buf = BytesMut::new();
            for c in chunks {
                buf.extend_from_slice(&c);
                let mut ev = Vec::new();
                let r = q.receive(&mut buf, &mut ev);
                for e in ev {
                    if let Event::Command { sqe, .. } = e {
                        q.request_data(sqe, 4096, 0);
                    }
                }
                if let Err(e) = r {
                    q.terminate(&e);
                    proptest::prop_assert!(q.is_closed());
                    break;
                }
            }
        }
    }
}
