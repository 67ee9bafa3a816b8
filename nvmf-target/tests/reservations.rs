//! NVMe reservations end to end: the real management service and engines, two managed
//! `tessera-nvmf` processes serving one subsystem as two paths, and three hosts (the project's
//! own NVMe/TCP host, each with its own host identifier). Registrations and reservations made
//! through one path hold on the other at once (the service answers only after every following
//! path took the change); every reservation type is checked host against host for reads and
//! writes; a preempted host finds its notification in the log page (80h) of the other path; a
//! target restarted finds the reservation where it was (the service keeps it).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::{connect_when_served, export_vol0, host_opts, managed_system, pool0_vol0};
use tessera_nvme_proto::identify::{ctrl_off, ns_off, oncs};
use tessera_nvme_proto::opcode::{admin, cns, log_id};
use tessera_nvme_proto::reader::{u16_at, u32_at, u64_at};
use tessera_nvme_proto::sqe::{SglDescriptor, SGL_ID_TRANSPORT};
use tessera_nvme_proto::{Sqe, Status};
use tessera_nvme_resv::{notice_off, opcode, report_off, RESERVATION_CONFLICT};
use tessera_nvmf_host::{Connection, Controller};

const NQN: &str = "nqn.2026-12.io.tessera:reserved";

struct Host {
    ctrl: Controller,
    q: Connection,
}

async fn host(addr: SocketAddr, id: u8) -> Host {
    let mut o = host_opts(addr, NQN, &format!("nqn.2014-08.org.nvmexpress:uuid:00000000-0000-0000-0000-0000000000{id:02x}"));
    o.hostid = [id; 16];
    let mut ctrl = connect_when_served(o, Duration::from_secs(20)).await;
    ctrl.set_queue_count(1).await.unwrap();
    let q = ctrl.io_queue(1, 16).await.unwrap();
    Host { ctrl, q }
}

impl Host {
    /// Register (0Dh), Acquire (11h) or Release (15h) with `cdw10` and two keys.
    async fn resv(&mut self, op: u8, cdw10: u32, k1: u64, k2: u64) -> Status {
        let mut sqe = Sqe::new(op, self.q.cid());
        sqe.set_nsid(1).set_cdw(10, cdw10);
        let mut data = k1.to_le_bytes().to_vec();
        if op != opcode::RELEASE {
            data.extend_from_slice(&k2.to_le_bytes());
        }
        self.q.exec(sqe, Some(&data), 8192).await.unwrap().cqe.status
    }

    async fn register(&mut self, key: u64) -> Status {
        self.resv(opcode::REGISTER, 0, 0, key).await
    }

    async fn acquire(&mut self, rtype: u8, key: u64) -> Status {
        self.resv(opcode::ACQUIRE, u32::from(rtype) << 8, key, 0).await
    }

    async fn preempt(&mut self, rtype: u8, key: u64, victim: u64) -> Status {
        self.resv(opcode::ACQUIRE, 1 | (u32::from(rtype) << 8), key, victim).await
    }

    async fn release(&mut self, rtype: u8, key: u64) -> Status {
        self.resv(opcode::RELEASE, u32::from(rtype) << 8, key, 0).await
    }

    /// The Reservation Report (extended) as (generation, type, [(cntlid, holds, key, host id)]).
    async fn report(&mut self) -> (u32, u8, Vec<(u16, bool, u64, u8)>) {
        let len = 4096u32;
        let mut sqe = Sqe::new(opcode::REPORT, self.q.cid());
        sqe.set_nsid(1).set_cdw(10, len / 4 - 1).set_cdw(11, 1);
        sqe.set_sgl(SglDescriptor { address: 0, length: len, id: SGL_ID_TRANSPORT });
        let r = self.q.exec(sqe, None, 0).await.unwrap();
        assert!(r.cqe.status.is_success(), "report: {}", r.cqe.status);
        let p = &r.data;
        let n = usize::from(u16_at(p, report_off::REGCTL).unwrap());
        let regs = (0..n)
            .map(|i| {
                let e = report_off::HEADER_LEN + i * report_off::ENTRY_LEN;
                (
                    u16_at(p, e + report_off::ENTRY_CNTLID).unwrap(),
                    p[e + report_off::ENTRY_RCSTS] & 1 == 1,
                    u64_at(p, e + report_off::ENTRY_RKEY).unwrap(),
                    p[e + report_off::ENTRY_HOSTID],
                )
            })
            .collect();
        (u32_at(p, report_off::GEN).unwrap(), p[report_off::RTYPE], regs)
    }

    /// (read allowed, write allowed) of one block.
    async fn access(&mut self) -> (bool, bool) {
        let mut r = Sqe::new(0x02, self.q.cid());
        r.set_nsid(1).set_cdw(10, 3).set_cdw(12, 0);
        r.set_sgl(SglDescriptor { address: 0, length: 4096, id: SGL_ID_TRANSPORT });
        let read = self.q.exec(r, None, 0).await.unwrap().cqe.status;
        let mut w = Sqe::new(0x01, self.q.cid());
        w.set_nsid(1).set_cdw(10, 3).set_cdw(12, 0);
        let write = self.q.exec(w, Some(&[0x5A; 4096]), 8192).await.unwrap().cqe.status;
        for s in [read, write] {
            assert!(s.is_success() || s == RESERVATION_CONFLICT, "an I/O failed with {s}, not a reservation conflict");
        }
        (read.is_success(), write.is_success())
    }

    /// The next Reservation Notification log page: (count, type, nsid).
    async fn notice(&mut self) -> (u64, u8, u32) {
        let cdw10 = u32::from(log_id::RESERVATION_NOTIFICATION) | ((64 / 4 - 1) << 16);
        let p = self.ctrl.admin.admin_read("Get Log Page 80h", admin::GET_LOG_PAGE, 0, &[(10, cdw10)], 64).await.unwrap();
        (u64_at(&p, notice_off::COUNT).unwrap(), p[notice_off::TYPE], u32_at(&p, notice_off::NSID).unwrap())
    }
}

#[test]
fn reservations_hold_across_paths_for_every_type() {
    let (cluster, _first, a, rt, mgmt) = managed_system("nvmf-resv", 1, "128MiB", "3s");
    let start_second = |listen: &str| {
        tessera_testkit::Daemon::start(
            "tessera-nvmf",
            &["--mgmt", &cluster.mgmt.addr, "--listen", listen, "--threads", "2"],
            "listening",
            &cluster.dir.join("nvmf-2.log"),
        )
    };
    let mut second = start_second("127.0.0.1:0");
    let b: SocketAddr = second.addr.parse().unwrap();
    rt.block_on(async {
        pool0_vol0(&mgmt, 16 << 20).await;
        mgmt.create_export(&export_vol0(NQN, a, &[b])).await.unwrap();
        let (mut ha, mut hb, mut hc) = (host(a, 0xA1).await, host(b, 0xB2).await, host(b, 0xC3).await);
        let id =
            ha.ctrl.admin.admin_read("Identify Controller", admin::IDENTIFY, 0, &[(10, u32::from(cns::CONTROLLER))], 4096).await.unwrap();
        assert_ne!(u16_at(&id, ctrl_off::ONCS).unwrap() & oncs::RESERVATIONS, 0, "ONCS: reservations");
        let ns =
            ha.ctrl.admin.admin_read("Identify Namespace", admin::IDENTIFY, 1, &[(10, u32::from(cns::NAMESPACE))], 4096).await.unwrap();
        assert_eq!(ns[ns_off::RESCAP], tessera_nvme_resv::RESCAP);

        // Registered through one path, seen through the other (A has no controller there).
        assert_eq!(ha.register(0xA1).await, Status::SUCCESS);
        assert_eq!(hb.register(0xB2).await, Status::SUCCESS);
        assert_eq!(hb.register(0xB3).await, RESERVATION_CONFLICT, "registered with another key");
        let (generation, rtype, regs) = hc.report().await;
        assert_eq!((generation, rtype), (2, 0));
        assert_eq!(regs, vec![(0xFFFF, false, 0xA1, 0xA1), (hb.ctrl.cntlid, false, 0xB2, 0xB2)]);
        let mut no_eds = Sqe::new(opcode::REPORT, hc.q.cid());
        no_eds.set_nsid(1).set_cdw(10, 1023);
        no_eds.set_sgl(SglDescriptor { address: 0, length: 4096, id: SGL_ID_TRANSPORT });
        assert_eq!(hc.q.exec(no_eds, None, 0).await.unwrap().cqe.status, tessera_nvme_resv::HOST_ID_INCONSISTENT_FORMAT);

        // Every type, held by A (path a): what B (registered) and C (not) may do on path b.
        // (type, B read/write, C read/write)
        let matrix = [
            (1u8, (true, false), (true, false)),
            (2, (false, false), (false, false)),
            (3, (true, true), (true, false)),
            (4, (true, true), (false, false)),
            (5, (true, true), (true, false)),
            (6, (true, true), (false, false)),
        ];
        for (t, b_may, c_may) in matrix {
            assert_eq!(ha.acquire(t, 0xA1).await, Status::SUCCESS, "A acquires type {t}");
            assert_eq!(hb.access().await, b_may, "registrant B under type {t} held by A");
            assert_eq!(hc.access().await, c_may, "unregistered C under type {t} held by A");
            assert_eq!(ha.access().await, (true, true), "A holds type {t}");
            let all_registrants = t >= 5;
            let b_acquires = hb.acquire(t, 0xB2).await;
            assert_eq!(b_acquires.is_success(), all_registrants, "B acquires type {t} too: {b_acquires}");
            assert_eq!(hc.acquire(t, 0xC3).await, RESERVATION_CONFLICT, "C is not registered");
            assert_eq!(hb.acquire(if t == 1 { 2 } else { 1 }, 0xB2).await, RESERVATION_CONFLICT, "another type while type {t} is held");
            assert_eq!(hc.report().await.1, t);
            assert_eq!(ha.release(t, 0xA1).await, Status::SUCCESS);
            assert_eq!(hc.access().await, (true, true), "released: anyone reads and writes");
        }

        // B preempts A: A's registration goes, A is told on its own path, and A may not write.
        assert_eq!(ha.acquire(1, 0xA1).await, Status::SUCCESS);
        let before = ha.notice().await;
        assert_eq!(before.1, 0, "no notification yet: {before:?}");
        assert_eq!(hb.preempt(1, 0xB2, 0xA1).await, Status::SUCCESS);
        let (count, kind, nsid) = ha.notice().await;
        assert_eq!((kind, nsid), (1, 1), "registration preempted, namespace 1");
        assert!(count >= 1);
        assert_eq!(ha.access().await, (true, false), "A, preempted, under B's Write Exclusive");
        let (_, rtype, regs) = hc.report().await;
        assert_eq!((rtype, regs), (1, vec![(hb.ctrl.cntlid, true, 0xB2, 0xB2)]));

        // Path b's target restarts: the reservation is where it was.
        drop((hb, hc));
        second.kill();
        second = start_second(&b.to_string());
        let mut hc = host(b, 0xC3).await;
        assert_eq!(hc.report().await.1, 1, "B's reservation survived the restart");
        assert_eq!(hc.access().await, (true, false));
        let mut hb = host(b, 0xB2).await;
        assert_eq!(hb.access().await, (true, true));
        // Clear (B's key) ends it all.
        assert_eq!(hb.resv(opcode::RELEASE, 1, 0xB2, 0).await, Status::SUCCESS);
        assert_eq!(hc.report().await.2, vec![]);
        assert_eq!(hc.access().await, (true, true));
    });
    let log = std::fs::read_to_string(&second.log).unwrap_or_default();
    assert!(!log.contains("panicked"), "{log}");
    let mgmt_log = std::fs::read_to_string(&cluster.mgmt.log).unwrap_or_default();
    assert!(!mgmt_log.contains("before these paths took it"), "a change was answered before both paths took it: {mgmt_log}");
}
