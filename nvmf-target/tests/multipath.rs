//! ANA multipath end to end: the real management service and engines, two real managed
//! `tessera-nvmf` processes (two paths), and the project's own NVMe/TCP host. One export names
//! both listen addresses; each target serves the subsystem as its path: Identify reports ANA
//! (CMIC, ANACAP, ANAGRPID, MNAN), the controller IDs of the two paths never collide, the ANA log
//! says optimized on the first path and non-optimized on the second, the discovery log of either
//! lists both, what is written through one path reads back through the other, moving the
//! optimized path raises an ANA change event and flips the states, and when the first target is
//! killed the other path goes on serving.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::{connect_when_served, export_vol0, host_opts, managed_system, pool0_vol0, HostConn};
use tessera_nvme_proto::identify::{self, cmic, ctrl_off, ns_off};
use tessera_nvme_proto::log::{ana_off, disc_off};
use tessera_nvme_proto::opcode::{admin, cns, feature, log_id};
use tessera_nvme_proto::reader::{u16_at, u32_at, u64_at};
use tessera_nvme_proto::sqe::{SglDescriptor, SGL_ID_TRANSPORT};
use tessera_nvme_proto::Sqe;
use tessera_nvmf_host::{Connection, Controller};

const NQN: &str = "nqn.2026-12.io.tessera:multipath";
const HOSTNQN: &str = "nqn.2014-08.org.nvmexpress:uuid:00000000-0000-0000-0000-0000000000cc";
const MIB: u64 = 1 << 20;

/// Connects to the subsystem on path `addr` once that target serves it.
async fn connect_path(addr: SocketAddr) -> Controller {
    connect_when_served(host_opts(addr, NQN, HOSTNQN), Duration::from_secs(20)).await
}

/// (ANA state of the one group, its NSIDs) from the ANA log page.
async fn ana_log(c: &mut Controller) -> (u8, Vec<u32>) {
    let len = 4096u32;
    let cdw10 = u32::from(log_id::ANA) | ((len / 4 - 1) << 16);
    let page = c.admin.admin_read("Get Log Page ANA", admin::GET_LOG_PAGE, 0, &[(10, cdw10)], len).await.unwrap();
    assert_eq!(u16_at(&page, ana_off::NUM_DESCRIPTORS), Some(1), "one ANA group");
    let d = ana_off::HEADER_LEN;
    assert_eq!(u32_at(&page, d + ana_off::DESC_GRPID), Some(1));
    let n = u32_at(&page, d + ana_off::DESC_NNSID).unwrap() as usize;
    let nsids = (0..n).map(|i| u32_at(&page, d + ana_off::DESC_LEN + 4 * i).unwrap()).collect();
    (page[d + ana_off::DESC_STATE] & 0xF, nsids)
}

fn io(q: &mut Connection, opcode: u8, lba: u64, blocks: u32) -> Sqe {
    let mut sqe = Sqe::new(opcode, q.cid());
    sqe.set_nsid(1).set_cdw(10, lba as u32).set_cdw(11, (lba >> 32) as u32).set_cdw(12, blocks - 1);
    sqe
}

async fn read(q: &mut Connection, what: &'static str, lba: u64, blocks: u32) -> Vec<u8> {
    let mut sqe = io(q, 0x02, lba, blocks);
    sqe.set_sgl(SglDescriptor { address: 0, length: blocks * 4096, id: SGL_ID_TRANSPORT });
    q.exec_ok(what, sqe, None, 0).await.unwrap().data
}

fn discovered_ports(addr: SocketAddr) -> Vec<String> {
    let mut d = HostConn::admin(addr, "nqn.2014-08.org.nvmexpress.discovery", HOSTNQN, 0);
    let page = d.get_log(0x70, 0, 8192, 0);
    assert!(page.cqe.status.is_success(), "{:?}", page.cqe);
    let n = u64_at(&page.data, 8).unwrap() as usize;
    (0..n)
        .map(|i| {
            let e = &page.data[1024 * (i + 1)..1024 * (i + 2)];
            let text = |at: usize, len: usize| String::from_utf8_lossy(&e[at..at + len]).trim_end_matches(['\0', ' ']).to_string();
            format!("{}:{}", text(disc_off::TRADDR, 256), text(disc_off::TRSVCID, 32))
        })
        .collect()
}

#[test]
fn two_targets_serve_one_subsystem_as_two_paths() {
    let (cluster, mut first, a, rt, mgmt) = managed_system("nvmf-multipath", 1, "128MiB", "3s");
    let mut second = tessera_testkit::Daemon::start(
        "tessera-nvmf",
        &["--mgmt", &cluster.mgmt.addr, "--listen", "127.0.0.1:0", "--threads", "2"],
        "listening",
        &cluster.dir.join("nvmf-2.log"),
    );
    let b: SocketAddr = second.addr.parse().unwrap();
    rt.block_on(async {
        let vol = pool0_vol0(&mgmt, 16 * MIB).await;
        let x = mgmt.create_export(&export_vol0(NQN, a, &[b])).await.unwrap();
        assert_eq!((x.listen.as_str(), x.paths.clone()), (a.to_string().as_str(), vec![b.to_string()]));

        let mut pa = connect_path(a).await;
        let mut pb = connect_path(b).await;
        // Identify: ANA reported, controller IDs from each path's own range.
        for (c, range) in [(&mut pa, 1..=0x0FFF), (&mut pb, 0x1001..=0x1FFF)] {
            assert!(range.contains(&c.cntlid), "controller {:#x} outside its path's range {range:?}", c.cntlid);
            let id =
                c.admin.admin_read("Identify Controller", admin::IDENTIFY, 0, &[(10, u32::from(cns::CONTROLLER))], 4096).await.unwrap();
            assert_eq!(id[ctrl_off::CMIC] & (cmic::ANA | cmic::MULTI_CTRL), cmic::ANA | cmic::MULTI_CTRL);
            assert_eq!((u32_at(&id, ctrl_off::ANAGRPMAX), u32_at(&id, ctrl_off::NANAGRPID)), (Some(1), Some(1)));
            assert!(u32_at(&id, ctrl_off::MNAN).unwrap() >= 1);
            let ns = c.admin.admin_read("Identify Namespace", admin::IDENTIFY, 1, &[(10, u32::from(cns::NAMESPACE))], 4096).await.unwrap();
            assert_eq!(u32_at(&ns, ns_off::ANAGRPID), Some(1));
            assert_eq!(&ns[ns_off::NGUID..ns_off::NGUID + 16], vol.uuid.as_bytes(), "one namespace identity on both paths");
        }
        assert_eq!(ana_log(&mut pa).await, (0x1, vec![1]), "the first path is optimized");
        assert_eq!(ana_log(&mut pb).await, (0x2, vec![1]), "the second is not");

        // Written through one path, read back through the other.
        pa.set_queue_count(1).await.unwrap();
        pb.set_queue_count(1).await.unwrap();
        let mut qa = pa.io_queue(1, 16).await.unwrap();
        let mut qb = pb.io_queue(1, 16).await.unwrap();
        let data: Vec<u8> = (0..32 * 4096).map(|i| (i % 251) as u8).collect();
        let w = io(&mut qa, 0x01, 8, 32);
        qa.exec_ok("write through path A", w, Some(&data), 8192).await.unwrap();
        assert!(read(&mut qb, "read through path B", 8, 32).await == data);
        drop((qa, pa));

        // The operator moves the optimized path to the second target: its hosts get an ANA change
        // event (notice 03h, log 0Ch) and read the new states.
        let mut watcher = connect_path(b).await;
        let mut sf = Sqe::new(admin::SET_FEATURES, watcher.admin.cid());
        sf.set_cdw(10, u32::from(feature::ASYNC_EVENT_CONFIG)).set_cdw(11, identify::OAES_ANA_CHANGE);
        watcher.admin.exec_ok("enable ANA change events", sf, None, 0).await.unwrap();
        let mut admin_b = watcher.admin;
        let aer = tokio::spawn(async move {
            let sqe = Sqe::new(admin::ASYNC_EVENT_REQUEST, admin_b.cid());
            admin_b.exec(sqe, None, 0).await.map(|r| r.cqe.dw0)
        });
        let xs = mgmt.set_optimized(NQN, &b.to_string()).await.unwrap();
        assert_eq!(xs[0].optimized.as_deref(), Some(b.to_string().as_str()));
        let dw0 = tokio::time::timeout(Duration::from_secs(20), aer).await.expect("no ANA change event").unwrap().unwrap();
        assert_eq!(dw0, 0x2 | (0x03 << 8) | (u32::from(log_id::ANA) << 16), "AEN: notice, ANA change, log 0Ch");
        assert_eq!(ana_log(&mut pb).await.0, 0x1, "the second path is optimized now");

        // The first target dies: the other path goes on, reads and writes.
        first.kill();
        let w = io(&mut qb, 0x01, 64, 32);
        qb.exec_ok("write through path B alone", w, Some(&data), 8192).await.unwrap();
        assert!(read(&mut qb, "read through path B alone", 64, 32).await == data);
    });
    // Either path's discovery log names both (the one left running shows it now).
    let ports = discovered_ports(b);
    assert!(ports.contains(&a.to_string()) && ports.contains(&b.to_string()), "{ports:?}");
    let log = std::fs::read_to_string(&second.log).unwrap_or_default();
    assert!(!log.contains("panicked"), "{log}");
    assert!(second.terminate().success());
}
