//! Managed mode end to end: the real management service, three real engines and the real
//! `tessera-nvmf --mgmt`, driven by the project's own NVMe/TCP host. A pool and an EC_2P1 volume
//! are created and exported through the management API; the target picks the export up by
//! long poll and serves the volume as a namespace backed by the DAOS bdev; the host writes and
//! reads back data (verify mode, hundreds of commands in flight), checks the namespace's identity
//! and geometry, FUA, Flush and Write Zeroes, the discovery log, host access lists, a resize, an
//! export's removal, and that the target keeps serving when the management service dies.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::{connect_when_served, cpu_ticks, create_volume, export_vol0, host_opts as opts, managed_system, pool0_vol0, HostConn};
use tessera_mgmt_api::{CreateExport, MgmtClient, VolumeInfo};
use tessera_nvme_proto::identify::ns_off;
use tessera_nvme_proto::log::disc_off;
use tessera_nvme_proto::opcode::{admin, cns};
use tessera_nvme_proto::reader::u64_at;
use tessera_nvme_proto::{Digests, Sqe, Status};
use tessera_nvmf_host::{Connection, Controller, ControllerOptions, HostError, Rw, Workload};
use tessera_testkit::Daemon;

const NQN: &str = "nqn.2026-11.io.tessera:managed-vol";
const NQN_RESTRICTED: &str = "nqn.2026-11.io.tessera:managed-restricted";
const NQN_SNAPSHOT: &str = "nqn.2026-12.io.tessera:managed-snapshot";
const HOSTNQN: &str = "nqn.2014-08.org.nvmexpress:uuid:00000000-0000-0000-0000-0000000000aa";
const OTHER_HOST: &str = "nqn.2014-08.org.nvmexpress:uuid:00000000-0000-0000-0000-0000000000bb";
const DISCOVERY: &str = "nqn.2014-08.org.nvmexpress.discovery";
const MIB: u64 = 1 << 20;

/// Waits until Connect to `subnqn` fails with `status` (the subsystem is gone or refuses).
async fn wait_connect_refused(o: ControllerOptions, status: Status, timeout: Duration) {
    let start = Instant::now();
    loop {
        match Controller::connect(o.clone(), 1).await {
            Err(HostError::Status { status: s, .. }) if s == status => return,
            other => {
                assert!(start.elapsed() < timeout, "connect to {} still {other:?} after {timeout:?}", o.subnqn);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

fn workload(rw: Rw, bs: u32, qd: u16, queues: u16, ios: u64, range_blocks: u64, seed: u64) -> Workload {
    Workload { rw, mix_read_pct: 50, bs, qd, queues, duration: None, ios: Some(ios), verify: true, range_blocks: Some(range_blocks), seed }
}

async fn verify(ctrl: &mut Controller, w: Workload) {
    let what = format!("{:?} bs {} qd {} x{}", w.rw, w.bs, w.qd, w.queues);
    let r = tokio::time::timeout(Duration::from_secs(120), w.run(ctrl)).await.unwrap_or_else(|_| panic!("{what} timed out"));
    let r = r.unwrap_or_else(|e| panic!("{what}: {e}"));
    assert_eq!(r.errors, 0, "{what}");
    assert!(r.verified_blocks > 0, "{what}: nothing verified");
}

fn io_cmd(q: &mut Connection, opcode: u8, nsid: u32, lba: u64, blocks: u32, cdw12_flags: u32) -> Sqe {
    let mut sqe = Sqe::new(opcode, q.cid());
    let nlb = blocks.saturating_sub(1);
    sqe.set_nsid(nsid).set_cdw(10, lba as u32).set_cdw(11, (lba >> 32) as u32).set_cdw(12, nlb | cdw12_flags);
    sqe
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 9) as u8).collect()
}

/// Subsystem NQNs in a discovery log page.
fn discovery_nqns(page: &[u8]) -> Vec<String> {
    let n = u64_at(page, 8).unwrap() as usize;
    (0..n)
        .map(|i| {
            let e = &page[1024 * (i + 1)..1024 * (i + 2)];
            let nqn = &e[disc_off::SUBNQN..disc_off::SUBNQN + 256];
            String::from_utf8_lossy(nqn).trim_end_matches('\0').to_string()
        })
        .collect()
}

fn discover(addr: SocketAddr, hostnqn: &str) -> Vec<String> {
    let mut d = HostConn::admin(addr, DISCOVERY, hostnqn, 0);
    let page = d.get_log(0x70, 0, 8192, 0);
    assert!(page.cqe.status.is_success(), "{:?}", page.cqe);
    discovery_nqns(&page.data)
}

/// Pool `pool0`, volume `vol0` of `size` bytes, exported as namespace 1 of [`NQN`] at `addr`.
async fn export_new_volume(mgmt: &MgmtClient, size: u64, addr: SocketAddr) -> VolumeInfo {
    let vol = pool0_vol0(mgmt, size).await;
    mgmt.create_export(&export_vol0(NQN, addr, &[])).await.unwrap();
    vol
}

fn log_text(d: &Daemon) -> String {
    std::fs::read_to_string(&d.log).unwrap_or_default()
}

#[test]
fn managed_target_serves_an_exported_ec_volume() {
    let (cluster, mut nvmf, addr, rt, mgmt) = managed_system("nvmf-managed", 2, "256MiB", "3s");

    // Pool, EC_2P1 volume, export at this target's address.
    let vol = rt.block_on(async { export_new_volume(&mgmt, 64 * MIB, addr).await });

    rt.block_on(async {
        let mut ctrl = connect_when_served(opts(addr, NQN, HOSTNQN), Duration::from_secs(20)).await;
        // Geometry from the volume; UUID/NGUID are the volume's UUID; no volatile write cache.
        assert_eq!((ctrl.geometry.block_size, ctrl.geometry.blocks), (4096, 64 * MIB / 4096));
        let ns = ctrl.admin.admin_read("Identify Namespace", admin::IDENTIFY, 1, &[(10, u32::from(cns::NAMESPACE))], 4096).await.unwrap();
        assert_eq!(&ns[ns_off::NGUID..ns_off::NGUID + 16], vol.uuid.as_bytes());
        let id = ctrl.admin.admin_read("Identify Controller", admin::IDENTIFY, 0, &[(10, u32::from(cns::CONTROLLER))], 4096).await.unwrap();
        assert_eq!(id[tessera_nvme_proto::identify::ctrl_off::VWC] & 1, 0, "VWC: no volatile write cache");

        // Verify mode: random 4 KiB writes at 2 x 127 in flight, then 128 KiB (R2T) writes and a
        // read/write mix, every block read back and compared.
        verify(&mut ctrl, workload(Rw::RandWrite, 4096, 127, 2, 3000, 4096, 1)).await;
        verify(&mut ctrl, workload(Rw::Write, 128 * 1024, 16, 2, 200, 8192, 2)).await;
        verify(&mut ctrl, workload(Rw::RandRw, 8192, 32, 2, 1000, 16384, 3)).await;

        // Single commands: a FUA write, Flush, read back; Write Zeroes and Deallocate read as zeros.
        ctrl.set_queue_count(8).await.unwrap();
        let mut q = ctrl.io_queue(8, 32).await.unwrap();
        let data = pattern(3 * 4096, 5);
        let w = io_cmd(&mut q, 0x01, 1, 1000, 3, 1 << 30);
        q.exec_ok("Write FUA", w, Some(&data), 8192).await.unwrap();
        let f = io_cmd(&mut q, 0x00, 1, 0, 0, 0);
        q.exec_ok("Flush", f, None, 0).await.unwrap();
        let r = io_cmd(&mut q, 0x02, 1, 1000, 3, 0);
        assert_eq!(read(&mut q, r, 3 * 4096).await, data);
        let z = io_cmd(&mut q, 0x08, 1, 1001, 1, 0);
        q.exec_ok("Write Zeroes", z, None, 0).await.unwrap();
        let r = io_cmd(&mut q, 0x02, 1, 1000, 3, 0);
        let got = read(&mut q, r, 3 * 4096).await;
        assert_eq!(&got[..4096], &data[..4096]);
        assert!(got[4096..8192].iter().all(|&b| b == 0));
        assert_eq!(&got[8192..], &data[8192..]);
        // Dataset Management, deallocate LBA 1002.
        let mut dsm = Sqe::new(0x09, q.cid());
        dsm.set_nsid(1).set_cdw(10, 0).set_cdw(11, 1 << 2);
        let mut range = vec![0u8; 16];
        range[4..8].copy_from_slice(&1u32.to_le_bytes());
        range[8..16].copy_from_slice(&1002u64.to_le_bytes());
        q.exec_ok("Deallocate", dsm, Some(&range), 8192).await.unwrap();
        let r = io_cmd(&mut q, 0x02, 1, 1002, 1, 0);
        assert!(read(&mut q, r, 4096).await.iter().all(|&b| b == 0));
        // Out of range is refused by the target before the volume sees it.
        let r = io_cmd(&mut q, 0x02, 1, 64 * MIB / 4096, 1, 0);
        let reply = exec_read(&mut q, r, 4096).await;
        assert_eq!(reply, Status::LBA_OUT_OF_RANGE);
    });

    // Discovery lists the exported subsystem.
    assert!(discover(addr, HOSTNQN).contains(&NQN.to_string()));

    // A second export limited to one host: others can neither connect nor discover it.
    rt.block_on(async {
        create_volume(&mgmt, "vol1", 16 * MIB).await;
        let req = CreateExport {
            nqn: NQN_RESTRICTED.into(),
            nsid: None,
            pool: "pool0".into(),
            volume: "vol1".into(),
            snapshot: None,
            hosts: vec![OTHER_HOST.into()],
            listen: Some(addr.to_string()),
            paths: Vec::new(),
        };
        let e = mgmt.create_export(&req).await.unwrap();
        let mut ctrl = connect_when_served(opts(addr, NQN_RESTRICTED, OTHER_HOST), Duration::from_secs(20)).await;
        assert_eq!(ctrl.geometry.blocks, 16 * MIB / 4096);
        verify(&mut ctrl, workload(Rw::RandWrite, 4096, 32, 1, 300, 4096, 4)).await;
        let refused = Controller::connect(opts(addr, NQN_RESTRICTED, HOSTNQN), 1).await.unwrap_err();
        assert!(matches!(refused, HostError::Status { status: Status::CONNECT_INVALID_HOST, .. }), "{refused}");
        drop(ctrl);
        let seen_by_other = tokio::task::spawn_blocking(move || discover(addr, OTHER_HOST)).await.unwrap();
        assert!(seen_by_other.contains(&NQN_RESTRICTED.to_string()), "{seen_by_other:?}");
        let seen = tokio::task::spawn_blocking(move || discover(addr, HOSTNQN)).await.unwrap();
        assert!(!seen.contains(&NQN_RESTRICTED.to_string()), "{seen:?}");

        // Removing the export removes the subsystem.
        mgmt.delete_export(&e.nqn, e.nsid).await.unwrap();
        wait_connect_refused(opts(addr, NQN_RESTRICTED, OTHER_HOST), Status::CONNECT_INVALID_PARAMETERS, Duration::from_secs(20)).await;
    });

    // Growing the volume grows the namespace; data written before is still there.
    rt.block_on(async {
        let mut ctrl = connect_when_served(opts(addr, NQN, HOSTNQN), Duration::from_secs(5)).await;
        ctrl.set_queue_count(8).await.unwrap();
        let mut q = ctrl.io_queue(8, 32).await.unwrap();
        let data = pattern(4096, 9);
        let w = io_cmd(&mut q, 0x01, 1, 7, 1, 0);
        q.exec_ok("Write", w, Some(&data), 8192).await.unwrap();
        mgmt.resize_volume("pool0", "vol0", 128 * MIB).await.unwrap();
        let start = Instant::now();
        loop {
            let ns =
                ctrl.admin.admin_read("Identify Namespace", admin::IDENTIFY, 1, &[(10, u32::from(cns::NAMESPACE))], 4096).await.unwrap();
            if u64_at(&ns, ns_off::NSZE) == Some(128 * MIB / 4096) {
                break;
            }
            assert!(start.elapsed() < Duration::from_secs(20), "namespace did not grow");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let r = io_cmd(&mut q, 0x02, 1, 7, 1, 0);
        assert_eq!(read(&mut q, r, 4096).await, data);
        let top = 128 * MIB / 4096 - 1;
        let w = io_cmd(&mut q, 0x01, 1, top, 1, 0);
        q.exec_ok("Write at the new end", w, Some(&data), 8192).await.unwrap();
        let r = io_cmd(&mut q, 0x02, 1, top, 1, 0);
        assert_eq!(read(&mut q, r, 4096).await, data);
        verify(&mut ctrl, workload(Rw::RandWrite, 4096, 64, 1, 500, 4096, 6)).await;
    });

    // Idle (no hosts, nothing changing): the long poll costs no measurable CPU.
    let before = cpu_ticks(nvmf.child.id());
    std::thread::sleep(Duration::from_secs(3));
    let used = cpu_ticks(nvmf.child.id()) - before;
    assert!(used <= 3, "idle managed target used {used} ticks of CPU in 3 s");

    // The management service dies: the target keeps serving, logs it once, and keeps retrying.
    let mut cluster = cluster;
    cluster.mgmt.kill();
    rt.block_on(async {
        let mut ctrl = connect_when_served(opts(addr, NQN, HOSTNQN), Duration::from_secs(5)).await;
        verify(&mut ctrl, workload(Rw::RandRw, 4096, 32, 2, 1000, 8192, 7)).await;
        // Backoff 0.5, 1, 2 s: several retries within 5 s.
        tokio::time::sleep(Duration::from_secs(5)).await;
        verify(&mut ctrl, workload(Rw::RandWrite, 4096, 16, 1, 200, 4096, 8)).await;
    });
    let log = log_text(&nvmf);
    assert_eq!(log.matches("management service unreachable").count(), 1, "{log}");
    assert!(nvmf.child.try_wait().unwrap().is_none(), "target exited");
    assert!(!log.contains("panicked"), "{log}");
    assert!(nvmf.terminate().success());
}

/// A snapshot exported beside its volume: a read-only namespace of its own identity that reads
/// the volume as it was; every command that would change a block is refused with Namespace is
/// Write Protected before any data moves; the snapshot cannot be deleted while it is exported.
#[test]
fn a_snapshot_is_served_read_only_beside_its_volume() {
    let (_cluster, mut nvmf, addr, rt, mgmt) = managed_system("nvmf-managed-snap", 1, "128MiB", "3s");
    let vol = rt.block_on(export_new_volume(&mgmt, 16 * MIB, addr));
    rt.block_on(async {
        let mut live = connect_when_served(opts(addr, NQN, HOSTNQN), Duration::from_secs(20)).await;
        live.set_queue_count(2).await.unwrap();
        let mut q = live.io_queue(1, 32).await.unwrap();
        // Pattern A over 40 blocks (a 128 KiB write and a 32 KiB one), snapshot, pattern B.
        let (a, b) = (pattern(40 * 4096, 1), pattern(40 * 4096, 2));
        for (data, seed) in [(&a, "A"), (&b, "B")] {
            let w = io_cmd(&mut q, 0x01, 1, 0, 32, 0);
            q.exec_ok(seed, w, Some(&data[..32 * 4096]), 8192).await.unwrap();
            let w = io_cmd(&mut q, 0x01, 1, 32, 8, 0);
            q.exec_ok(seed, w, Some(&data[32 * 4096..]), 8192).await.unwrap();
            if seed == "A" {
                let s = mgmt.create_snapshot("pool0", "vol0", "a").await.unwrap();
                assert!(s.stable, "{s:?}");
            }
        }
        let req = CreateExport {
            nqn: NQN_SNAPSHOT.into(),
            nsid: None,
            pool: "pool0".into(),
            volume: "vol0".into(),
            snapshot: Some("a".into()),
            hosts: Vec::new(),
            listen: Some(addr.to_string()),
            paths: Vec::new(),
        };
        let x = mgmt.create_export(&req).await.unwrap();
        assert_eq!(x.snapshot.as_ref().map(|s| s.name.as_str()), Some("a"));
        let mut snap = connect_when_served(opts(addr, NQN_SNAPSHOT, HOSTNQN), Duration::from_secs(20)).await;
        assert_eq!(snap.geometry.blocks, 16 * MIB / 4096);
        let ns = snap.admin.admin_read("Identify Namespace", admin::IDENTIFY, 1, &[(10, u32::from(cns::NAMESPACE))], 4096).await.unwrap();
        assert_eq!(ns[ns_off::NSATTR] & 1, 1, "NSATTR: write protected");
        assert_ne!(&ns[ns_off::NGUID..ns_off::NGUID + 16], vol.uuid.as_bytes(), "a snapshot is not its volume");
        let ns = live.admin.admin_read("Identify Namespace", admin::IDENTIFY, 1, &[(10, u32::from(cns::NAMESPACE))], 4096).await.unwrap();
        assert_eq!(ns[ns_off::NSATTR] & 1, 0, "the volume stays writable");

        snap.set_queue_count(2).await.unwrap();
        let mut sq = snap.io_queue(1, 32).await.unwrap();
        let r = io_cmd(&mut sq, 0x02, 1, 0, 32, 0);
        assert!(read(&mut sq, r, 32 * 4096).await == a[..32 * 4096], "the snapshot reads pattern A");
        let r = io_cmd(&mut sq, 0x02, 1, 32, 8, 0);
        assert!(read(&mut sq, r, 8 * 4096).await == a[32 * 4096..]);
        let r = io_cmd(&mut q, 0x02, 1, 0, 40, 0);
        assert!(read(&mut q, r, 40 * 4096).await == b, "the volume reads pattern B");

        // Writes (in the capsule and through R2T), Write Zeroes, Deallocate: refused, no data sent.
        let w = io_cmd(&mut sq, 0x01, 1, 0, 1, 0);
        let status = sq.exec(w, Some(&b[..4096]), 8192).await.unwrap().cqe.status;
        assert_eq!(status, Status::NAMESPACE_WRITE_PROTECTED);
        let w = io_cmd(&mut sq, 0x01, 1, 0, 32, 0);
        let status = sq.exec(w, Some(&b[..32 * 4096]), 8192).await.unwrap().cqe.status;
        assert_eq!(status, Status::NAMESPACE_WRITE_PROTECTED);
        let z = io_cmd(&mut sq, 0x08, 1, 0, 8, 0);
        assert_eq!(sq.exec(z, None, 0).await.unwrap().cqe.status, Status::NAMESPACE_WRITE_PROTECTED);
        let mut dsm = Sqe::new(0x09, sq.cid());
        dsm.set_nsid(1).set_cdw(10, 0).set_cdw(11, 1 << 2);
        let mut range = vec![0u8; 16];
        range[4..8].copy_from_slice(&8u32.to_le_bytes());
        assert_eq!(sq.exec(dsm, Some(&range), 8192).await.unwrap().cqe.status, Status::NAMESPACE_WRITE_PROTECTED);
        let f = io_cmd(&mut sq, 0x00, 1, 0, 0, 0);
        sq.exec_ok("Flush of a snapshot", f, None, 0).await.unwrap();
        let r = io_cmd(&mut sq, 0x02, 1, 0, 40, 0);
        assert!(read(&mut sq, r, 40 * 4096).await == a, "still pattern A");

        // Kept while exported; deleted once the export is gone.
        let refused = mgmt.delete_snapshot("pool0", "vol0", "a").await.unwrap_err();
        assert_eq!(refused.status(), Some(409), "{refused}");
        drop(sq);
        drop(snap);
        mgmt.delete_export(&x.nqn, x.nsid).await.unwrap();
        wait_connect_refused(opts(addr, NQN_SNAPSHOT, HOSTNQN), Status::CONNECT_INVALID_PARAMETERS, Duration::from_secs(20)).await;
        mgmt.delete_snapshot("pool0", "vol0", "a").await.unwrap();
        let r = io_cmd(&mut q, 0x02, 1, 0, 40, 0);
        assert!(read(&mut q, r, 40 * 4096).await == b);
    });
    let log = log_text(&nvmf);
    assert!(!log.contains("panicked"), "{log}");
    assert!(nvmf.terminate().success());
}

#[test]
fn engine_failures_degrade_then_complete_with_namespace_not_ready() {
    let (mut cluster, nvmf, addr, rt, mgmt) = managed_system("nvmf-managed-fail", 1, "128MiB", "2s");
    rt.block_on(async {
        export_new_volume(&mgmt, 16 * MIB, addr).await;
        drop(connect_when_served(opts(addr, NQN, HOSTNQN), Duration::from_secs(20)).await);
    });
    // A blocking host whose reads may wait longer than the volume's 10 s read deadline.
    let mut admin = HostConn::admin(addr, NQN, HOSTNQN, 0);
    let mut io = HostConn::open(addr, Digests::default());
    assert!(io.connect(NQN, HOSTNQN, 1, 31, admin.cntlid, 0).status.is_success());
    io.sock.set_read_timeout(Some(Duration::from_secs(40))).unwrap();
    let data = pattern(32 * 4096, 3);
    assert!(io.write(1, 0, &data, 4096, false).cqe.status.is_success());

    // One engine of three down: EC_2P1 still reads (reconstructing) and writes (degraded).
    cluster.kill_engine(2);
    cluster.wait_engine_down(2, Duration::from_secs(20));
    let r = io.read(1, 0, 32, 4096);
    assert!(r.cqe.status.is_success(), "degraded read: {:?}", r.cqe.status);
    assert_eq!(r.data, data);
    let more = pattern(4096, 4);
    assert!(io.write(1, 100, &more, 4096, false).cqe.status.is_success(), "degraded write");
    assert_eq!(io.read(1, 100, 1, 4096).data, more);

    // Two down: more than the class survives. Reads and writes of a whole stripe complete with
    // Namespace Not Ready, without Do Not Retry; the target stays up and counts no media error.
    cluster.kill_engine(1);
    cluster.wait_engine_down(1, Duration::from_secs(20));
    let st = io.read(1, 0, 32, 4096).cqe.status;
    assert_eq!(st, Status::NAMESPACE_NOT_READY, "read: {st:?}");
    assert!(!st.is_dnr());
    let st = io.write(1, 0, &data, 4096, false).cqe.status;
    assert_eq!(st, Status::NAMESPACE_NOT_READY, "write: {st:?}");
    let smart = admin.get_log(0x02, 0xFFFF_FFFF, 512, 0);
    assert!(smart.cqe.status.is_success());
    assert_eq!(u64_at(&smart.data, 160), Some(0), "media errors");
    let log = log_text(&nvmf);
    assert!(!log.contains("panicked"), "{log}");
}

async fn exec_read(q: &mut Connection, mut sqe: Sqe, len: u32) -> Status {
    use tessera_nvme_proto::sqe::{SglDescriptor, SGL_ID_TRANSPORT};
    sqe.set_sgl(SglDescriptor { address: 0, length: len, id: SGL_ID_TRANSPORT });
    q.exec(sqe, None, 0).await.unwrap().cqe.status
}

async fn read(q: &mut Connection, mut sqe: Sqe, len: u32) -> Vec<u8> {
    use tessera_nvme_proto::sqe::{SglDescriptor, SGL_ID_TRANSPORT};
    sqe.set_sgl(SglDescriptor { address: 0, length: len, id: SGL_ID_TRANSPORT });
    let r = q.exec(sqe, None, 0).await.unwrap();
    assert!(r.cqe.status.is_success(), "read: {:?}", r.cqe.status);
    assert_eq!(r.data.len(), len as usize);
    r.data
}
