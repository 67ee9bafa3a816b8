//! Integration tests: a real `tessera-nvmf` process on 127.0.0.1, driven over TCP by the test host
//! in `common`. They cover the protocol end to end without QEMU; the real Linux host is exercised
//! by `tests/nvme-cli`.

mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use tessera_nvme_proto::fabrics::CNTLID_DYNAMIC;
use tessera_nvme_proto::pdu::{fes, DataPdu};
use tessera_nvme_proto::reader::{u16_at, u32_at, u64_at};
use tessera_nvme_proto::sqe::{SglDescriptor, SGL_ID_INCAPSULE, SGL_ID_TRANSPORT};
use tessera_nvme_proto::{Digests, Pdu, Sqe, Status};

#[test]
fn identify_controller_and_namespace() {
    let t = TargetProc::start();
    let mut a = HostConn::admin(t.addr, SUBNQN, HOSTNQN, 5000);
    let cap = a.prop_get(0, true);
    assert!(cap & 0xFFFF >= 127, "MQES >= 127");
    assert!((cap >> 24) & 0xFF > 0, "CAP.TO");
    assert_eq!(a.prop_get(0x08, false), 0x0001_0300);
    let id = a.identify(1, 0);
    assert!(id.cqe.status.is_success());
    let d = &id.data;
    assert_eq!(u16_at(d, 78), Some(a.cntlid), "CNTLID matches Connect");
    assert!(u16_at(d, 320).unwrap() != 0, "KAS");
    assert_eq!(u32_at(d, 536).unwrap() & 3, 1, "SGLS");
    assert_eq!(u16_at(d, 1800), Some(0), "ICDOFF");
    assert!(u32_at(d, 1792).unwrap() * 16 >= 4096 + 64, "IOCCSZ");
    assert_eq!(d[76] & 2, 2, "CMIC multi-controller");
    assert!(d[77] >= 5, "MDTS >= 128 KiB");
    assert_eq!(&d[768..768 + SUBNQN.len()], SUBNQN.as_bytes());
    let oncs = u16_at(d, 520).unwrap();
    assert_eq!(oncs & 0b1100, 0b1100, "DSM and Write Zeroes");

    let ns = a.identify(0, 1);
    assert_eq!(u64_at(&ns.data, 0), Some(64 * 2048));
    assert_eq!(ns.data[33] & 7, 1, "DLFEAT: deallocated reads zeros");
    let list = a.identify(2, 0);
    assert_eq!((u32_at(&list.data, 0), u32_at(&list.data, 4)), (Some(1), Some(0)));
    let desc1 = a.identify(3, 1).data;
    let desc2 = a.identify(3, 1).data;
    assert_eq!(desc1, desc2, "stable namespace identifiers");
    assert_eq!(desc1[0], 2, "NGUID first");
    assert_eq!(a.identify(0, 5).data, vec![0u8; 4096], "inactive NSID reads zeros");
    assert_eq!(a.identify(0, 0).cqe.status, Status::INVALID_NAMESPACE);
    assert_eq!(a.identify(0x10, 0).cqe.status, Status::INVALID_FIELD);
    // A host buffer of the wrong size.
    assert_eq!(a.admin_read(0x06, 0, &[(10, 1)], 512).cqe.status, Status::DATA_SGL_LENGTH_INVALID);
}

#[test]
fn write_read_in_capsule_and_r2t_with_and_without_digests() {
    let t = TargetProc::start();
    for d in [Digests::default(), Digests { header: true, data: true }] {
        let (_admin, mut io) = controller_with_io(t.addr, d);
        let small = pattern(4096, 1);
        assert!(io.write(1, 8, &small, 512, false).cqe.status.is_success());
        let big = pattern(512 * 1024, 2); // MDTS, several H2CData PDUs
        assert!(io.write(1, 1000, &big, 512, true).cqe.status.is_success());
        assert_eq!(io.read(1, 8, 8, 512).data, small);
        assert_eq!(io.read(1, 1000, 1024, 512).data, big);
    }
    let mut t = t;
    assert!(t.is_alive());
}

#[test]
fn invalid_commands_get_exact_statuses() {
    let t = TargetProc::start();
    let (mut admin, mut io) = controller_with_io(t.addr, Digests::default());
    let blocks = 64 * 2048;
    assert_eq!(io.read(1, blocks - 1, 2, 512).cqe.status, Status::LBA_OUT_OF_RANGE);
    assert_eq!(io.read(1, u64::MAX, 2, 512).cqe.status, Status::LBA_OUT_OF_RANGE);
    assert_eq!(io.read(9, 0, 1, 512).cqe.status, Status::INVALID_NAMESPACE);
    // Transfer above MDTS.
    assert_eq!(io.read(1, 0, 2048, 512).cqe.status, Status::INVALID_FIELD);
    // SGL length disagreeing with NLB.
    let mut sqe = Sqe::new(0x02, io.cid());
    sqe.set_nsid(1).set_cdw(12, 7);
    sqe.set_sgl(SglDescriptor { address: 0, length: 512, id: SGL_ID_TRANSPORT });
    assert_eq!(io.exec(sqe, None, 0).cqe.status, Status::DATA_SGL_LENGTH_INVALID);
    let sqe = Sqe::new(0x7C, io.cid());
    assert_eq!(io.exec(sqe, None, 0).cqe.status, Status::INVALID_OPCODE);
    // A rejected write changed nothing.
    assert_eq!(io.write(1, blocks - 4, &pattern(4096, 3), 512, false).cqe.status, Status::LBA_OUT_OF_RANGE);
    assert_eq!(io.read(1, blocks - 4, 4, 512).data, vec![0u8; 2048]);
    // Errors are in the error log, newest first.
    let log = admin.get_log(1, 0xFFFF_FFFF, 64 * 64, 0);
    assert!(log.cqe.status.is_success());
    assert!(u64_at(&log.data, 0).unwrap() >= 6);
    assert_eq!(admin.get_log(0x55, 0, 512, 0).cqe.status, Status::INVALID_LOG_PAGE);
}

#[test]
fn write_zeroes_and_deallocate_read_back_zeros_and_smart_counts() {
    let t = TargetProc::start();
    let (mut admin, mut io) = controller_with_io(t.addr, Digests::default());
    let smart0 = admin.get_log(2, 0xFFFF_FFFF, 512, 0).data;
    let data = pattern(64 * 512, 4);
    assert!(io.write(1, 0, &data, 512, false).cqe.status.is_success());
    // Write Zeroes of blocks 8..16.
    let mut wz = Sqe::new(0x08, io.cid());
    wz.set_nsid(1).set_cdw(10, 8).set_cdw(12, 7);
    assert!(io.exec(wz, None, 0).cqe.status.is_success());
    // Deallocate blocks 32..48 via DSM.
    let mut range = vec![0u8; 16];
    range[4..8].copy_from_slice(&16u32.to_le_bytes());
    range[8..16].copy_from_slice(&32u64.to_le_bytes());
    let mut dsm = Sqe::new(0x09, io.cid());
    dsm.set_nsid(1).set_cdw(10, 0).set_cdw(11, 1 << 2);
    assert!(io.exec(dsm, Some(&range), 8192).cqe.status.is_success());
    let back = io.read(1, 0, 64, 512).data;
    let mut want = data.clone();
    want[8 * 512..16 * 512].fill(0);
    want[32 * 512..48 * 512].fill(0);
    assert_eq!(back, want);
    let mut flush = Sqe::new(0x00, io.cid());
    flush.set_nsid(1);
    assert!(io.exec(flush, None, 0).cqe.status.is_success());
    let smart1 = admin.get_log(2, 0xFFFF_FFFF, 512, 0).data;
    let ctr = |p: &[u8], off: usize| u64_at(p, off).unwrap();
    assert!(ctr(&smart1, 48) > ctr(&smart0, 48), "data units written moved");
    assert!(ctr(&smart1, 80) >= ctr(&smart0, 80) + 2, "host write commands moved");
    assert!(ctr(&smart1, 64) > ctr(&smart0, 64), "host read commands moved");
}

#[test]
fn host_access_is_enforced_and_discovery_filters() {
    let t = TargetProc::start();
    let mut c = HostConn::open(t.addr, Digests::default());
    let cqe = c.connect(RESTRICTED, HOSTNQN, 0, 31, CNTLID_DYNAMIC, 0);
    assert_eq!(cqe.status, Status::CONNECT_INVALID_HOST);
    let mut c = HostConn::open(t.addr, Digests::default());
    let cqe = c.connect("nqn.2026-11.io.tessera:nope", HOSTNQN, 0, 31, CNTLID_DYNAMIC, 0);
    assert_eq!(cqe.status, Status::CONNECT_INVALID_PARAMETERS);
    assert_eq!(cqe.dw0, 256 | (1 << 16), "IATTR data, IPO at SUBNQN");
    let mut c = HostConn::open(t.addr, Digests::default());
    assert!(c.connect(RESTRICTED, ALLOWED_HOST, 0, 31, CNTLID_DYNAMIC, 0).status.is_success());

    let disc = |host: &str| {
        let mut d = HostConn::admin(t.addr, "nqn.2014-08.org.nvmexpress.discovery", host, 0);
        let id = d.identify(1, 0);
        assert_eq!(id.data[111], 2, "discovery controller type");
        let header = d.get_log(0x70, 0, 1024, 0).data;
        let n = u64_at(&header, 8).unwrap() as u32;
        let full = d.get_log(0x70, 0, 1024 * (n + 1), 0).data;
        assert_eq!(u64_at(&full, 0), u64_at(&header, 0), "genctr stable");
        (0..n as usize)
            .map(|i| {
                let e = &full[1024 * (i + 1)..1024 * (i + 2)];
                assert_eq!(e[0], 3, "TCP");
                assert_eq!(e[3] & 3, 0, "treq not specified");
                assert_eq!(e[768], 0, "sectype none");
                assert_eq!(&e[512..521], b"127.0.0.1");
                assert_eq!(e[521], b' ', "space padded traddr");
                String::from_utf8_lossy(&e[256..512]).trim_end_matches('\0').to_string()
            })
            .collect::<Vec<_>>()
    };
    assert_eq!(disc(HOSTNQN), vec![SUBNQN.to_string()]);
    let mut both = disc(ALLOWED_HOST);
    both.sort();
    assert_eq!(both, vec![SUBNQN.to_string(), RESTRICTED.to_string()]);
}

fn expect_termination(c: &mut HostConn, want_fes: u16) {
    match c.recv() {
        Some(Pdu::C2hTermReq(t)) => assert_eq!(t.fes, want_fes, "{t:?}"),
        other => panic!("expected C2HTermReq, got {other:?}"),
    }
    assert!(c.recv().is_none(), "connection closed after termination");
}

#[test]
fn malformed_pdus_end_the_connection_with_a_termination_request() {
    let mut t = TargetProc::start();
    // Unknown PDU type.
    let mut c = HostConn::open(t.addr, Digests::default());
    let mut raw = Pdu::R2t(tessera_nvme_proto::pdu::R2t { cccid: 1, ttag: 1, r2to: 0, r2tl: 1 }).to_bytes(Digests::default()).to_vec();
    raw[0] = 0x0F;
    c.send_raw(&raw);
    expect_termination(&mut c, fes::INVALID_HEADER_FIELD);
    // Bad header digest.
    let mut c = HostConn::open(t.addr, Digests { header: true, data: false });
    let mut raw = Pdu::CapsuleCmd { sqe: Sqe::new(0x7F, 1), data: Bytes::new() }.to_bytes(c.digests).to_vec();
    raw[72] ^= 0xFF;
    c.send_raw(&raw);
    expect_termination(&mut c, fes::HEADER_DIGEST_ERROR);
    // H2CData nobody asked for.
    let (_a, mut io) = controller_with_io(t.addr, Digests::default());
    io.send(&Pdu::H2cData(DataPdu { cccid: 77, ttag: 77, datao: 0, data: Bytes::from(vec![0; 512]), last: true, success: false }));
    expect_termination(&mut io, fes::INVALID_HEADER_FIELD);
    // Data beyond the R2T.
    let (_a, mut io) = controller_with_io(t.addr, Digests::default());
    let mut sqe = Sqe::new(0x01, 5);
    sqe.set_nsid(1).set_cdw(12, 31);
    sqe.set_sgl(SglDescriptor { address: 0, length: 16384, id: SGL_ID_TRANSPORT });
    io.send(&Pdu::CapsuleCmd { sqe, data: Bytes::new() });
    let Some(Pdu::R2t(r)) = io.recv() else { panic!("no R2T") };
    io.send(&Pdu::H2cData(DataPdu { cccid: 5, ttag: r.ttag, datao: 0, data: Bytes::from(vec![0; 20480]), last: true, success: false }));
    expect_termination(&mut io, fes::DATA_OUT_OF_RANGE);
    // ICReq with an unsupported PDU format version, and garbage before ICReq.
    let mut c = std::net::TcpStream::connect(t.addr).unwrap();
    std::io::Write::write_all(&mut c, &[0x04, 0, 72, 0, 72, 0, 0, 0]).unwrap();
    let mut buf = [0u8; 64];
    let n = std::io::Read::read(&mut c, &mut buf).unwrap();
    assert_eq!(buf[0], 0x03, "C2HTermReq");
    assert!(n >= 24);
    // In-capsule data larger than advertised: plen beyond the limit, caught from the header.
    let mut c = HostConn::open(t.addr, Digests::default());
    let mut raw = vec![0x04u8, 0, 72, 72];
    raw.extend_from_slice(&(72u32 + 1_000_000).to_le_bytes());
    c.send_raw(&raw);
    expect_termination(&mut c, fes::INVALID_HEADER_FIELD);
    // The target is still serving.
    assert!(t.is_alive());
    let (_a, mut io) = controller_with_io(t.addr, Digests::default());
    assert!(io.read(1, 0, 1, 512).cqe.status.is_success());
    assert_eq!(t.log().matches("terminating connection").count(), 6, "one log line per termination");
}

#[test]
fn in_capsule_sgl_must_match_the_data() {
    let t = TargetProc::start();
    let (_a, mut io) = controller_with_io(t.addr, Digests::default());
    let mut sqe = Sqe::new(0x01, io.cid());
    sqe.set_nsid(1).set_cdw(12, 0);
    sqe.set_sgl(SglDescriptor { address: 0, length: 1024, id: SGL_ID_INCAPSULE });
    io.send(&Pdu::CapsuleCmd { sqe, data: Bytes::from(vec![1; 512]) });
    match io.recv() {
        Some(Pdu::CapsuleResp(c)) => assert_eq!(c.status, Status::DATA_SGL_LENGTH_INVALID),
        other => panic!("{other:?}"),
    }
}

#[test]
fn keep_alive_timeout_tears_the_controller_down() {
    let t = TargetProc::start();
    let mut admin = HostConn::admin(t.addr, SUBNQN, HOSTNQN, 1000);
    let mut io = HostConn::open(t.addr, Digests::default());
    assert!(io.connect(SUBNQN, HOSTNQN, 1, 127, admin.cntlid, 0).status.is_success());
    // Keep-alives hold it up.
    for _ in 0..4 {
        std::thread::sleep(Duration::from_millis(500));
        let ka = Sqe::new(0x18, admin.cid());
        assert!(admin.exec(ka, None, 0).cqe.status.is_success());
    }
    // Silence: both queues are closed within KATO plus the grace period.
    let start = Instant::now();
    assert!(admin.recv().is_none());
    assert!(io.recv().is_none());
    let waited = start.elapsed();
    assert!(waited >= Duration::from_millis(900) && waited < Duration::from_secs(5), "{waited:?}");
}

#[test]
fn namespace_added_by_reload_raises_an_event() {
    let t = TargetProc::start();
    let mut admin = HostConn::admin(t.addr, SUBNQN, HOSTNQN, 0);
    // Enable namespace attribute notices, then park an AER.
    let mut sf = Sqe::new(0x09, admin.cid());
    sf.set_cdw(10, 0x0B).set_cdw(11, 1 << 8);
    assert!(admin.exec(sf, None, 0).cqe.status.is_success());
    let aer_cid = admin.cid();
    admin.send(&Pdu::CapsuleCmd { sqe: Sqe::new(0x0C, aer_cid), data: Bytes::new() });
    let port = t.addr.port();
    std::fs::write(&t.config, config_text(port, "[[subsystem.namespace]]\nnsid = 2\nbdev = \"malloc\"\nsize_mib = 8\n")).unwrap();
    t.hup();
    match admin.recv() {
        Some(Pdu::CapsuleResp(c)) => {
            assert_eq!(c.cid, aer_cid);
            assert_eq!(c.dw0 & 0x7, 2, "notice");
            assert_eq!((c.dw0 >> 8) & 0xFF, 0, "namespace attribute changed");
            assert_eq!((c.dw0 >> 16) & 0xFF, 4, "changed namespace list");
        }
        other => panic!("{other:?}"),
    }
    let changed = admin.get_log(4, 0xFFFF_FFFF, 4096, 0).data;
    assert_eq!((u32_at(&changed, 0), u32_at(&changed, 4)), (Some(2), Some(0)));
    let list = admin.identify(2, 0).data;
    assert_eq!((u32_at(&list, 0), u32_at(&list, 4)), (Some(1), Some(2)));
    // A bad reload keeps the running configuration.
    std::fs::write(&t.config, "listen = 3").unwrap();
    t.hup();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(u32_at(&admin.identify(2, 0).data, 4), Some(2));
}

#[test]
fn host_vanishing_mid_transfer_leaves_the_target_serving() {
    let mut t = TargetProc::start();
    for _ in 0..3 {
        let (_a, mut io) = controller_with_io(t.addr, Digests::default());
        let mut sqe = Sqe::new(0x01, 9);
        sqe.set_nsid(1).set_cdw(12, 255);
        sqe.set_sgl(SglDescriptor { address: 0, length: 131072, id: SGL_ID_TRANSPORT });
        io.send(&Pdu::CapsuleCmd { sqe, data: Bytes::new() });
        let Some(Pdu::R2t(r)) = io.recv() else { panic!("no R2T") };
        io.send(&Pdu::H2cData(DataPdu { cccid: 9, ttag: r.ttag, datao: 0, data: Bytes::from(vec![0; 4096]), last: false, success: false }));
        // Drop both connections mid-transfer.
    }
    std::thread::sleep(Duration::from_millis(200));
    assert!(t.is_alive());
    let (_a, mut io) = controller_with_io(t.addr, Digests::default());
    let p = pattern(8192, 9);
    assert!(io.write(1, 0, &p, 512, false).cqe.status.is_success());
    assert_eq!(io.read(1, 0, 16, 512).data, p);
}

#[test]
fn a_host_that_stops_reading_cannot_make_the_target_buffer_without_bound() {
    let mut t = TargetProc::start();
    let (_a, mut io) = controller_with_io(t.addr, Digests::default());
    // Reads of written blocks, so every response really occupies memory.
    assert!(io.write(1, 0, &pattern(512 * 1024, 7), 512, false).cqe.status.is_success());
    let mut sock = io.sock.try_clone().unwrap();
    sock.set_write_timeout(Some(Duration::from_secs(3))).unwrap();
    // 1 GiB of 512 KiB reads with distinct CIDs, never reading a response, paced so that the
    // queue depth is never exceeded. The target must stop reading from us long before that,
    // with bounded memory.
    let mut sent = 0u64;
    for i in 0..2048u16 {
        if i % 32 == 0 {
            std::thread::sleep(Duration::from_millis(50));
        }
        let mut sqe = Sqe::new(0x02, i + 100);
        sqe.set_nsid(1).set_cdw(12, 1023);
        sqe.set_sgl(SglDescriptor { address: 0, length: 512 * 1024, id: SGL_ID_TRANSPORT });
        let b = Pdu::CapsuleCmd { sqe, data: Bytes::new() }.to_bytes(Digests::default());
        if std::io::Write::write_all(&mut sock, &b).is_err() {
            break;
        }
        sent += 1;
    }
    std::thread::sleep(Duration::from_secs(1));
    assert!(t.is_alive(), "target died after {sent} commands");
    let rss = rss_kib(t.child.id());
    assert!(rss < 256 * 1024, "target RSS {rss} KiB after {sent} commands");
    // Other hosts are still served.
    let (_a2, mut io2) = controller_with_io(t.addr, Digests::default());
    assert!(io2.read(1, 0, 8, 512).cqe.status.is_success());
    assert!(t.is_alive());
}

#[test]
fn polling_stops_when_the_host_goes_quiet() {
    // The default configuration polls a queue's socket for a short window after each command
    // (`poll_us`). Under a QD1 loop it keeps polling; once the host stops, the queues must sleep
    // in epoll again: an idle connected controller costs no CPU.
    let t = TargetProc::start();
    let (_admin, mut io) = controller_with_io(t.addr, Digests::default());
    let data = pattern(4096, 9);
    for i in 0..300u64 {
        assert!(io.write(1, i * 8, &data, 512, false).cqe.status.is_success());
        let r = io.read(1, i * 8, 8, 512);
        assert!(r.cqe.status.is_success());
        assert_eq!(r.data, data);
    }
    let before = cpu_ticks(t.child.id());
    std::thread::sleep(Duration::from_secs(3));
    let used = cpu_ticks(t.child.id()) - before;
    assert!(used <= 3, "a connected but idle target used {used} ticks of CPU in 3 s");
}
