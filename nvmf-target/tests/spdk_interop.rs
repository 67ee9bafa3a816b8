//! SPDK's NVMe/TCP host (v24.09, `spdk_nvme_perf`) against a real `tessera-nvmf` process: the
//! bytes SPDK sends, rebuilt from its source and replayed over TCP (issue 11).
//!
//! Where each value comes from (SPDK v24.09):
//! - ICReq: `nvme_tcp_qpair_icreq_send` (lib/nvme/nvme_tcp.c): HLEN = PLEN = 128, PFV 0,
//!   HPDA = NVME_TCP_HPDA_DEFAULT = 0, MAXR2T = NVME_TCP_MAX_R2T_DEFAULT - 1 = 0, DGST from
//!   `opts.header_digest`/`data_digest` (false by default and in perf without -H/-I).
//! - CapsuleCmd: `nvme_tcp_qpair_capsule_cmd_send`: HLEN 72, PDO = 72 when data is in the capsule
//!   (CPDA 0, no header digest), else 0; PLEN 72 + data.
//! - SQE: `nvme_tcp_req_init`: CID = index of the tcp_req (`nvme_tcp_alloc_reqs`; freed requests go
//!   back to the head of the free list, so consecutive commands reuse CID 0), PSDT 01b, SGL
//!   Transport Data Block (5Ah) of the payload size, or for host-to-controller data that fits
//!   8 KiB on the admin queue / for fabrics commands, a Data Block with Offset subtype (01h),
//!   address 0.
//! - Connect: `nvme_fabric_qpair_connect_async` (lib/nvme/nvme_fabric.c): QID, SQSIZE = entries - 1
//!   (admin: DEFAULT_ADMIN_QUEUE_SIZE 32 -> 31; I/O: io_queue_size capped to CAP.MQES + 1), KATO
//!   = opts.keep_alive_timeout_ms (MIN_KEEP_ALIVE_TIMEOUT_IN_MS 10000, perf's default too), CATTR
//!   0, RECFMT 0; data: HOSTID = opts.extended_host_id (a random UUID), CNTLID FFFFh on the admin
//!   queue or the controller's, SUBNQN = trid.subnqn, HOSTNQN = opts.hostnqn. Through discovery
//!   the discovery controller keeps the default host NQN ("nqn.2014-08.org.nvmexpress:uuid:" +
//!   the host id: `nvme_fabric_ctrlr_scan` does not call perf's probe_cb); every other
//!   controller of perf gets `trid_entry->hostnqn` copied over it in perf's `probe_cb`
//!   (app/spdk_nvme_perf/perf.c), which is all zeros unless the transport ID has `hostnqn:`.
//! - Controller initialization (`nvme_ctrlr_process_init`, lib/nvme/nvme_ctrlr.c): Property Get VS,
//!   CAP, CC, CSTS; Property Set CC.EN with IOSQES 6, IOCQES 4; CSTS until RDY; Identify
//!   Controller; Set Features Asynchronous Event Configuration (discovery: bit 31), then
//!   min(8, AERL + 1) AERs; Get Features Keep Alive Timer.
//! - Detach (`nvme_ctrlr_destruct_async`): `nvme_tcp_admin_qpair_abort_aers` completes the AERs
//!   locally — the target is not told — and their CIDs go back to the free list head, so the
//!   shutdown's Property Get CC (`nvme_ctrlr_shutdown_async`) reuses the last AER's CID, then
//!   Property Set CC.SHN = 01b and Property Get CSTS until SHST = 10b.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

mod common;

use common::*;
use tessera_nvme_proto::pdu::{fes, IC_LEN};
use tessera_nvme_proto::reader::{u16_at, u64_at};
use tessera_nvme_proto::{Pdu, Status};

const DISCOVERY_NQN: &str = "nqn.2014-08.org.nvmexpress.discovery";
/// SPDK's default host NQN: `nvme_get_default_hostnqn` from the random extended host id.
const SPDK_DEFAULT_HOSTNQN: &str = "nqn.2014-08.org.nvmexpress:uuid:6f1b4c2e-9a57-4d3e-8c21-0b7e5d9f4a13";
/// `g_spdk_nvme_driver->default_extended_host_id`, the same UUID as bytes.
const SPDK_HOSTID: [u8; 16] = [0x6f, 0x1b, 0x4c, 0x2e, 0x9a, 0x57, 0x4d, 0x3e, 0x8c, 0x21, 0x0b, 0x7e, 0x5d, 0x9f, 0x4a, 0x13];

/// SPDK's ICReq, byte for byte.
fn spdk_icreq(hpda: u8) -> [u8; IC_LEN] {
    let mut b = [0u8; IC_LEN];
    b[0] = 0x00; // PDU type ICReq
    b[1] = 0; // flags
    b[2] = 128; // HLEN
    b[3] = 0; // PDO
    b[4..8].copy_from_slice(&128u32.to_le_bytes()); // PLEN
    b[8..10].copy_from_slice(&0u16.to_le_bytes()); // PFV
    b[10] = hpda; // HPDA: NVME_TCP_HPDA_DEFAULT = 0 in SPDK
    b[11] = 0; // DGST: no header or data digest
    b[12..16].copy_from_slice(&0u32.to_le_bytes()); // MAXR2T: 1 - 1
    b
}

/// A 64-byte SQE as `nvme_tcp_req_init` completes it: CID, PSDT 01b, SGL.
fn sqe(opcode: u8, cid: u16, sgl_len: u32, in_capsule: bool) -> [u8; 64] {
    let mut s = [0u8; 64];
    s[0] = opcode;
    s[1] = 0x40; // PSDT = SPDK_NVME_PSDT_SGL_MPTR_CONTIG (01b)
    s[2..4].copy_from_slice(&cid.to_le_bytes());
    // SGL1: address 0, length, descriptor id (type << 4 | subtype).
    s[32..36].copy_from_slice(&sgl_len.to_le_bytes());
    s[39] = if in_capsule { 0x01 } else { 0x5A };
    s
}

fn set_dw(s: &mut [u8; 64], n: usize, v: u32) {
    s[n * 4..n * 4 + 4].copy_from_slice(&v.to_le_bytes());
}

/// A CapsuleCmd PDU around `sqe` and in-capsule `data`, as `nvme_tcp_qpair_capsule_cmd_send` frames it.
fn capsule(sqe: &[u8; 64], data: &[u8]) -> Vec<u8> {
    let pdo = if data.is_empty() { 0 } else { 72 };
    let plen = 72 + data.len() as u32;
    let mut b = vec![0x04, 0, 72, pdo];
    b.extend_from_slice(&plen.to_le_bytes());
    b.extend_from_slice(sqe);
    b.extend_from_slice(data);
    b
}

/// The Connect capsule `nvme_fabric_qpair_connect_async` builds.
fn spdk_connect(cid: u16, qid: u16, sqsize: u16, cntlid: u16, subnqn: &str, hostnqn: &str) -> Vec<u8> {
    let mut s = sqe(0x7F, cid, 1024, true); // SPDK_NVME_OPC_FABRIC
    s[4] = 0x01; // FCTYPE Connect
    s[40..42].copy_from_slice(&0u16.to_le_bytes()); // RECFMT
    s[42..44].copy_from_slice(&qid.to_le_bytes());
    s[44..46].copy_from_slice(&sqsize.to_le_bytes());
    s[46] = 0; // CATTR
    s[48..52].copy_from_slice(&10_000u32.to_le_bytes()); // KATO
    let mut d = vec![0u8; 1024]; // struct spdk_nvmf_fabric_connect_data, spdk_zmalloc'ed
    d[0..16].copy_from_slice(&SPDK_HOSTID);
    d[16..18].copy_from_slice(&cntlid.to_le_bytes());
    d[256..256 + subnqn.len()].copy_from_slice(subnqn.as_bytes()); // snprintf: NUL-terminated
    d[512..512 + hostnqn.len()].copy_from_slice(hostnqn.as_bytes());
    capsule(&s, &d)
}

/// Property Get/Set (`nvme_fabric_prop_get_cmd_async` / `_set_`): ATTRIB size, OFST, VALUE.
fn spdk_prop(cid: u16, set: bool, offset: u32, eight: bool, value: u64) -> Vec<u8> {
    let mut s = sqe(0x7F, cid, 0, false);
    s[4] = if set { 0x00 } else { 0x04 };
    s[40] = u8::from(eight);
    s[44..48].copy_from_slice(&offset.to_le_bytes());
    s[48..56].copy_from_slice(&value.to_le_bytes());
    capsule(&s, &[])
}

/// An admin command without host data (Identify, Get Log Page, features, AER, Keep Alive).
fn spdk_admin(opcode: u8, cid: u16, nsid: u32, len: u32, dws: &[(usize, u32)]) -> Vec<u8> {
    let mut s = sqe(opcode, cid, len, false);
    s[4..8].copy_from_slice(&nsid.to_le_bytes());
    for &(n, v) in dws {
        set_dw(&mut s, n, v);
    }
    capsule(&s, &[])
}

/// CC as `nvme_ctrlr_enable` writes it: EN, CSS NVM, MPS 4 KiB, AMS round robin, IOSQES 6, IOCQES 4.
const SPDK_CC_ENABLE: u32 = 1 | (6 << 16) | (4 << 20);

fn ok(r: &Reply, what: &str) {
    assert!(r.cqe.status.is_success(), "{what}: {:?}", r.cqe);
}

/// ICReq and ICResp.
fn open(addr: std::net::SocketAddr) -> HostConn {
    let mut c = HostConn::raw(addr);
    c.send_raw(&spdk_icreq(0));
    match c.recv() {
        Some(Pdu::IcResp(r)) => {
            // nvme_tcp_icresp_handle: PFV 0, MAXH2CDATA >= 4096, CPDA <= 31.
            assert_eq!(r.pfv, 0);
            assert!(r.maxh2cdata >= 4096);
            assert!(r.cpda <= 31);
            assert_eq!((r.digests.header, r.digests.data), (false, false));
        }
        other => panic!("expected ICResp, got {other:?}"),
    }
    c
}

/// The controller initialization of `nvme_ctrlr_process_init` up to READY, on the admin queue
/// `c` right after Connect. Returns the CIDs of the AERs left outstanding.
fn spdk_init(c: &mut HostConn, discovery: bool) -> Vec<u16> {
    for (off, eight) in [(0x08, false), (0x00, true), (0x14, false), (0x1C, false)] {
        c.send_raw(&spdk_prop(0, false, off, eight, 0));
        ok(&c.wait_reply(0), "Property Get");
    }
    c.send_raw(&spdk_prop(0, true, 0x14, false, u64::from(SPDK_CC_ENABLE)));
    ok(&c.wait_reply(0), "Property Set CC.EN");
    c.send_raw(&spdk_prop(0, false, 0x1C, false, 0));
    assert_eq!(c.wait_reply(0).cqe.dw0 & 1, 1, "CSTS.RDY");
    c.send_raw(&spdk_admin(0x06, 0, 0, 4096, &[(10, 1)]));
    let id = c.wait_reply(0);
    ok(&id, "Identify Controller");
    let aerl = id.data[259];
    // Set Features Asynchronous Event Configuration.
    let aec = if discovery { 1 << 31 } else { 0x1F | (1 << 8) };
    c.send_raw(&spdk_admin(0x09, 0, 0, 0, &[(10, 0x0B), (11, aec)]));
    ok(&c.wait_reply(0), "Set Features AEC");
    // nvme_ctrlr_configure_aer_done: min(NVME_MAX_ASYNC_EVENTS = 8, AERL + 1) AERs, CIDs 0, 1, ...
    let aers: Vec<u16> = (0..u16::from(aerl).min(7) + 1).collect();
    for &cid in &aers {
        c.send_raw(&spdk_admin(0x0C, cid, 0, 0, &[]));
    }
    let next = aers.len() as u16;
    // Get Features Keep Alive Timer: the target keeps SPDK's 10 s.
    c.send_raw(&spdk_admin(0x0A, next, 0, 0, &[(10, 0x0F)]));
    let kato = c.wait_reply(next);
    ok(&kato, "Get Features KATO");
    assert_eq!(kato.cqe.dw0, 10_000);
    // The first Keep Alive goes out at once.
    c.send_raw(&spdk_admin(0x18, next, 0, 0, &[]));
    ok(&c.wait_reply(next), "Keep Alive");
    aers
}

/// Detach: the AERs are aborted on the host only; Property Get CC reuses the last AER's CID,
/// then CC.SHN = 01b and CSTS until SHST = 10b.
fn spdk_detach(c: &mut HostConn, aers: &[u16]) {
    let cid = *aers.last().unwrap();
    c.send_raw(&spdk_prop(cid, false, 0x14, false, 0));
    let cc = c.wait_reply(cid);
    ok(&cc, "Property Get CC with the CID of an aborted AER");
    let shn = cc.cqe.dw0 | (1 << 14);
    c.send_raw(&spdk_prop(cid, true, 0x14, false, u64::from(shn)));
    ok(&c.wait_reply(cid), "Property Set CC.SHN");
    c.send_raw(&spdk_prop(cid, false, 0x1C, false, 0));
    assert_eq!((c.wait_reply(cid).cqe.dw0 >> 2) & 3, 0b10, "CSTS.SHST complete");
}

#[test]
fn spdk_through_the_discovery_controller() {
    let mut t = TargetProc::start();
    let mut c = open(t.addr);
    c.send_raw(&spdk_connect(0, 0, 31, 0xFFFF, DISCOVERY_NQN, SPDK_DEFAULT_HOSTNQN));
    let r = c.wait_reply(0);
    ok(&r, "discovery Connect");
    assert_ne!(r.cqe.dw0 & 0xFFFF, 0xFFFF, "a controller id");
    let aers = spdk_init(&mut c, true);
    assert_eq!(aers.len(), 4, "AERL 3: four AERs");
    // nvme_fabric_ctrlr_scan: Identify again, then nvme_fabric_get_discovery_log_page, 4 KiB at offset 0.
    c.send_raw(&spdk_admin(0x06, 4, 0, 4096, &[(10, 1)]));
    ok(&c.wait_reply(4), "Identify");
    c.send_raw(&spdk_admin(0x02, 4, 0, 4096, &[(10, 0x70 | (1023 << 16))]));
    let log = c.wait_reply(4);
    ok(&log, "Get Log Page Discovery");
    assert_eq!(u16_at(&log.data, 16), Some(0), "RECFMT");
    assert!(u64_at(&log.data, 8).unwrap() >= 1, "NUMREC");
    let entry = &log.data[1024..2048];
    assert_eq!(entry[2], 2, "SUBTYPE NVMe subsystem");
    assert_eq!(&entry[256..256 + SUBNQN.len()], SUBNQN.as_bytes());
    assert_eq!(&entry[32..32 + 5], t.addr.port().to_string().as_bytes());
    spdk_detach(&mut c, &aers);
    drop(c);

    // Then the subsystem found in the log, as perf's probe_cb configures it: empty HOSTNQN.
    let (admin, io) = spdk_io_controller(&t);
    drop(admin);
    drop(io);
    // The discovery connection and both of the I/O controller's.
    wait_closed(&t, 3);
    assert!(t.is_alive());
    let log = t.log();
    assert!(!log.contains("terminating connection"), "{log}");
    assert!(!log.contains("Connect refused"), "{log}");
}

/// Waits (at most 5 s) until the target has logged the end of `n` connections, so that what
/// it would log about them is in its log.
fn wait_closed(t: &TargetProc, n: usize) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let log = t.log();
        if log.matches("connection closed").count() >= n {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "{n} connections not closed in:\n{log}");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// Admin and one I/O queue of SUBNQN the way SPDK connects directly (`subnqn:` in the transport
/// ID, no `hostnqn:`), with a write and a read on the I/O queue.
fn spdk_io_controller(t: &TargetProc) -> (HostConn, HostConn) {
    let mut a = open(t.addr);
    a.send_raw(&spdk_connect(0, 0, 31, 0xFFFF, SUBNQN, ""));
    let r = a.wait_reply(0);
    ok(&r, "admin Connect with an empty HOSTNQN");
    let cntlid = r.cqe.dw0 as u16;
    a.cntlid = cntlid;
    // CAP.MQES caps io_queue_size (perf asks for UINT16_MAX).
    a.send_raw(&spdk_prop(0, false, 0x00, true, 0));
    let mqes = a.wait_reply(0).cqe.dw0 & 0xFFFF;
    let aers = spdk_init(&mut a, false);
    // Set Features Number of Queues, then the I/O queue on its own connection.
    a.send_raw(&spdk_admin(0x09, 5, 0, 0, &[(10, 0x07), (11, 0)]));
    ok(&a.wait_reply(5), "Set Features Number of Queues");
    let mut io = open(t.addr);
    io.send_raw(&spdk_connect(0, 1, mqes as u16, cntlid, SUBNQN, ""));
    let r = io.wait_reply(0);
    ok(&r, "I/O Connect");
    // Write 4 KiB in the capsule (ioccsz allows 8 KiB), read it back.
    let data = pattern(4096, 7);
    let mut w = sqe(0x01, 0, 4096, true);
    set_dw(&mut w, 1, 1);
    set_dw(&mut w, 10, 16);
    set_dw(&mut w, 12, 7);
    io.send_raw(&capsule(&w, &data));
    ok(&io.wait_reply(0), "Write");
    io.send_raw(&spdk_admin(0x02, 0, 1, 4096, &[(10, 16), (12, 7)]));
    let r = io.wait_reply(0);
    ok(&r, "Read");
    assert_eq!(r.data, data);
    assert_eq!(aers, [0, 1, 2, 3]);
    (a, io)
}

#[test]
fn spdk_direct_connect_with_an_empty_hostnqn() {
    let mut t = TargetProc::start();
    let (mut admin, io) = spdk_io_controller(&t);
    // perf's detach: the four AERs aborted on the host, the shutdown reuses CID 3.
    drop(io);
    spdk_detach(&mut admin, &[0, 1, 2, 3]);
    drop(admin);
    wait_closed(&t, 2);
    assert!(t.is_alive());
    let log = t.log();
    assert!(!log.contains("terminating connection"), "{log}");
    assert!(!log.contains("Connect refused"), "{log}");
}

fn warn_line<'a>(log: &'a str, needle: &str) -> Option<&'a str> {
    log.lines().find(|l| l.contains("WARN") && l.contains(needle))
}

#[test]
fn refused_connects_and_icreqs_are_logged_with_their_reason() {
    let t = TargetProc::start();
    // An empty HOSTNQN where only listed hosts may connect.
    let mut c = open(t.addr);
    c.send_raw(&spdk_connect(0, 0, 31, 0xFFFF, RESTRICTED, ""));
    assert_eq!(c.wait_reply(0).cqe.status, Status::CONNECT_INVALID_HOST);
    // No such subsystem: Invalid Parameters, IATTR 1, IPO 256.
    let mut c = open(t.addr);
    c.send_raw(&spdk_connect(0, 0, 31, 0xFFFF, "nqn.2026-11.io.tessera:nope", SPDK_DEFAULT_HOSTNQN));
    let r = c.wait_reply(0);
    assert_eq!((r.cqe.status, r.cqe.dw0), (Status::CONNECT_INVALID_PARAMETERS, (1 << 16) | 256));
    // An I/O queue with a CNTLID that does not exist.
    let mut c = open(t.addr);
    c.send_raw(&spdk_connect(0, 1, 127, 0x1234, SUBNQN, SPDK_DEFAULT_HOSTNQN));
    assert_eq!(c.wait_reply(0).cqe.status, Status::CONNECT_INVALID_PARAMETERS);
    // HPDA 32 is reserved: C2HTermReq, FES 1 (invalid header field), FEI 10.
    let mut c = HostConn::raw(t.addr);
    c.send_raw(&spdk_icreq(32));
    match c.recv() {
        Some(Pdu::C2hTermReq(tr)) => assert_eq!((tr.fes, tr.fei), (fes::INVALID_HEADER_FIELD, 10)),
        other => panic!("expected C2HTermReq, got {other:?}"),
    }
    assert!(c.recv().is_none(), "the connection is closed");

    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let wanted = [
        "Connect refused: the host sent an empty HOSTNQN and the subsystem allows only listed hosts",
        "Connect refused: no subsystem \"nqn.2026-11.io.tessera:nope\"",
        "Connect refused: I/O queue for controller 4660 which does not exist",
        "ICReq refused: HPDA 32 is above 31",
    ];
    loop {
        let log = t.log();
        let missing: Vec<&str> = wanted.iter().copied().filter(|w| warn_line(&log, w).is_none()).collect();
        if missing.is_empty() {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "no WARN line for {missing:?} in:\n{log}");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}
