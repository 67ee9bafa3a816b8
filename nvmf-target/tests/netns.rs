//! Several machines on one, with network namespaces the test creates: four engines, each in its
//! own namespace with its own address, the NVMe/TCP target in another, and the management
//! service and the host in the test's own, all joined by a bridge. An engine's namespace is
//! partitioned (its link to the bridge goes down; the engine keeps running): the service marks
//! it Down, the others rebuild its shards, and the host's data reads back through the target.
//! When the partition heals the engine comes back and is reintegrated, and everything written
//! before, during and after reads back.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::{connect_when_served, create_volume, export_vol0, host_opts};
use tessera_mgmt_api::{CreatePool, EngineState, MgmtClient, PoolInfo, TargetStateName};
use tessera_nvme_proto::sqe::{SglDescriptor, SGL_ID_TRANSPORT};
use tessera_nvme_proto::Sqe;
use tessera_nvmf_host::Connection;
use tessera_testkit::{wait_for, Daemon, LocalCluster};

const NQN: &str = "nqn.2026-12.io.tessera:netns";
const HOSTNQN: &str = "nqn.2014-08.org.nvmexpress:uuid:00000000-0000-0000-0000-0000000000ab";
const PARTITIONED: u32 = 1;

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    (0..len).map(|i| ((i as u64).wrapping_mul(31) ^ seed) as u8).collect()
}

/// Writes 64 KiB at block `lba` (4 KiB blocks).
async fn write(q: &mut Connection, lba: u64, data: &[u8]) {
    let mut w = Sqe::new(0x01, q.cid());
    w.set_nsid(1).set_cdw(10, lba as u32).set_cdw(12, (data.len() / 4096 - 1) as u32);
    let r = q.exec(w, Some(data), 8192).await.unwrap();
    assert!(r.cqe.status.is_success(), "write at {lba}: {}", r.cqe.status);
}

async fn read(q: &mut Connection, lba: u64, len: usize) -> Vec<u8> {
    let mut r = Sqe::new(0x02, q.cid());
    r.set_nsid(1).set_cdw(10, lba as u32).set_cdw(12, (len / 4096 - 1) as u32);
    r.set_sgl(SglDescriptor { address: 0, length: len as u32, id: SGL_ID_TRANSPORT });
    let rep = q.exec(r, None, 0).await.unwrap();
    assert!(rep.cqe.status.is_success(), "read at {lba}: {}", rep.cqe.status);
    rep.data
}

/// Writes regions `regions` (64 KiB each, at 64 KiB steps from `first`) and records them.
async fn write_regions(q: &mut Connection, first: u64, regions: u64, written: &mut Vec<(u64, Vec<u8>)>) {
    for i in 0..regions {
        let lba = first + i * 16;
        let data = pattern(lba, 64 << 10);
        write(q, lba, &data).await;
        written.push((lba, data));
    }
}

async fn verify(q: &mut Connection, written: &[(u64, Vec<u8>)], when: &str) {
    for (lba, data) in written {
        assert!(read(q, *lba, data.len()).await == *data, "{when}: block {lba} reads back different data");
    }
}

fn pool(rt: &tokio::runtime::Runtime, mgmt: &MgmtClient) -> Result<PoolInfo, String> {
    rt.block_on(mgmt.pool("pool0")).map_err(|e| e.to_string())
}

fn states_of(p: &PoolInfo, rank: u32) -> Vec<TargetStateName> {
    p.map.targets.iter().filter(|t| t.rank == rank).map(|t| t.state).collect()
}

#[test]
fn a_partitioned_engine_is_marked_down_rebuilt_around_and_reintegrated_when_it_heals() {
    let mut cluster = LocalCluster::start_netns("netns", 4, 1, "128MiB", "2s");
    let net = cluster.net.as_mut().unwrap();
    let tns = net.add();
    let target_addr: SocketAddr = format!("{}:4420", net.spaces[tns].ip).parse().unwrap();
    let engine_ip = net.spaces[PARTITIONED as usize].ip.clone();
    let prefix = net.exec(tns);
    let nvmf = Daemon::start_in(
        &prefix,
        "tessera-nvmf",
        &["--mgmt", &cluster.mgmt.addr, "--listen", &target_addr.to_string(), "--threads", "2"],
        "listening",
        &cluster.dir.join("nvmf.log"),
    );
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let mgmt = cluster.client();
    let sys = rt.block_on(mgmt.system()).unwrap();
    let e1 = sys.engines.iter().find(|e| e.rank == PARTITIONED).unwrap();
    assert!(e1.address.starts_with(&format!("{engine_ip}:")), "engine {PARTITIONED} serves on its own interface: {}", e1.address);

    let mut written = Vec::new();
    let (mut ctrl, mut q) = rt.block_on(async {
        mgmt.create_pool(&CreatePool { name: "pool0".into(), ranks: Vec::new(), default_class: None }).await.unwrap();
        create_volume(&mgmt, "vol0", 32 << 20).await;
        mgmt.create_export(&export_vol0(NQN, target_addr, &[])).await.unwrap();
        let mut ctrl = connect_when_served(host_opts(target_addr, NQN, HOSTNQN), Duration::from_secs(20)).await;
        ctrl.set_queue_count(1).await.unwrap();
        let mut q = ctrl.io_queue(1, 16).await.unwrap();
        write_regions(&mut q, 0, 64, &mut written).await;
        verify(&mut q, &written, "before the partition").await;
        (ctrl, q)
    });

    // The partition: the engine runs on, unreachable.
    net_of(&cluster).cut(PARTITIONED as usize);
    cluster.wait_engine_down(PARTITIONED, Duration::from_secs(30));
    assert!(cluster.engines[PARTITIONED as usize].as_mut().unwrap().child.try_wait().unwrap().is_none(), "the engine itself kept running");
    let rebuilt = wait_for("the partitioned engine's shards rebuilt on the others", Duration::from_secs(90), || {
        let p = pool(&rt, &mgmt)?;
        let out = states_of(&p, PARTITIONED).iter().all(|s| *s == TargetStateName::DownOut);
        let others = p.map.targets.iter().filter(|t| t.rank != PARTITIONED).all(|t| t.state == TargetStateName::UpIn);
        if out && others {
            Ok(p)
        } else {
            Err(format!("{:?}", p.map.targets.iter().map(|t| (t.rank, t.state)).collect::<Vec<_>>()))
        }
    });
    eprintln!("rebuilt around the partition: map version {}", rebuilt.map.version);
    rt.block_on(async {
        verify(&mut q, &written, "while partitioned").await;
        write_regions(&mut q, 64 * 16, 32, &mut written).await;
    });

    // The partition heals: the engine heartbeats again, registers and is reintegrated.
    net_of(&cluster).heal(PARTITIONED as usize);
    wait_for("the engine back and reintegrated", Duration::from_secs(90), || {
        let sys = rt.block_on(mgmt.system()).map_err(|e| e.to_string())?;
        let up = sys.engines.iter().filter(|e| e.state == EngineState::Up).count();
        let p = pool(&rt, &mgmt)?;
        if up == 4 && p.map.targets.iter().all(|t| t.state == TargetStateName::UpIn) {
            Ok(())
        } else {
            Err(format!("{up} engines up; {:?}", p.map.targets.iter().map(|t| (t.rank, t.state)).collect::<Vec<_>>()))
        }
    });
    rt.block_on(async {
        write_regions(&mut q, 96 * 16, 16, &mut written).await;
        verify(&mut q, &written, "after the partition healed").await;
        let _ = ctrl.keep_alive().await;
    });
    let log = std::fs::read_to_string(&nvmf.log).unwrap_or_default();
    assert!(!log.contains("panicked"), "{log}");
}

fn net_of(c: &LocalCluster) -> &tessera_testkit::netns::Net {
    c.net.as_ref().unwrap()
}
