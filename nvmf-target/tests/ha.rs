//! High availability of the management service: a real 3-member etcd cluster holds the state,
//! two `tessera-mgmt` share it (one elected leader), three engines and a managed `tessera-nvmf`
//! are given both addresses, and a host writes and verifies through the target the whole time.
//! The leader is SIGKILLed: the other service takes over within about a lease period, engines
//! are not marked Down, the host's I/O goes on without an error, and the new leader takes
//! writes. Then one etcd member is SIGKILLed: writes and I/O go on. The old leader, restarted,
//! follows. An engine killed under the new leader is marked Down and I/O goes on degraded.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{connect_when_served, create_volume, export_vol0, host_opts, pool0_vol0};
use tessera_mgmt_api::{EngineState, MgmtClient};
use tessera_nvme_proto::sqe::{SglDescriptor, SGL_ID_TRANSPORT};
use tessera_nvme_proto::Sqe;
use tessera_testkit::{wait_for, wait_log, Daemon, LocalCluster};

const NQN: &str = "nqn.2026-12.io.tessera:ha";
const HOSTNQN: &str = "nqn.2014-08.org.nvmexpress:uuid:00000000-0000-0000-0000-0000000000ee";
/// The services' etcd lease (`tessera_mgmt::leader::LEASE_TTL`).
const LEASE: Duration = Duration::from_secs(5);

#[derive(Default)]
struct Progress {
    ops: AtomicU64,
    errors: AtomicU64,
    last_error: std::sync::Mutex<String>,
}

/// Writes 16 KiB with a pattern, reads it back and compares, over and over, until `stop`.
async fn workload(addr: SocketAddr, stop: Arc<AtomicBool>, p: Arc<Progress>) {
    let mut ctrl = connect_when_served(host_opts(addr, NQN, HOSTNQN), Duration::from_secs(20)).await;
    ctrl.set_queue_count(1).await.unwrap();
    let mut q = ctrl.io_queue(1, 16).await.unwrap();
    let mut i: u64 = 0;
    while !stop.load(Ordering::Relaxed) {
        let lba = (i % 512) * 4;
        let data: Vec<u8> = (0..4 * 4096).map(|b| (b as u64 ^ i) as u8).collect();
        let mut w = Sqe::new(0x01, q.cid());
        w.set_nsid(1).set_cdw(10, lba as u32).set_cdw(12, 3);
        let mut r = Sqe::new(0x02, q.cid());
        r.set_nsid(1).set_cdw(10, lba as u32).set_cdw(12, 3);
        r.set_sgl(SglDescriptor { address: 0, length: 4 * 4096, id: SGL_ID_TRANSPORT });
        let res = match q.exec(w, Some(&data), 8192).await {
            Ok(rep) if rep.cqe.status.is_success() => match q.exec(r, None, 0).await {
                Ok(rep) if rep.cqe.status.is_success() && rep.data == data => Ok(()),
                Ok(rep) if rep.cqe.status.is_success() => Err(format!("lba {lba}: read back differs")),
                Ok(rep) => Err(format!("read: {}", rep.cqe.status)),
                Err(e) => Err(format!("read: {e}")),
            },
            Ok(rep) => Err(format!("write: {}", rep.cqe.status)),
            Err(e) => Err(format!("write: {e}")),
        };
        match res {
            Ok(()) => p.ops.fetch_add(1, Ordering::Relaxed),
            Err(e) => {
                *p.last_error.lock().unwrap() = e;
                p.errors.fetch_add(1, Ordering::Relaxed)
            }
        };
        i += 1;
    }
}

/// Waits until the workload has done `n` more verified round trips.
fn wait_ops(p: &Progress, n: u64, what: &str) {
    let start = p.ops.load(Ordering::Relaxed);
    wait_for(what, Duration::from_secs(60), || {
        let done = p.ops.load(Ordering::Relaxed) - start;
        if done >= n {
            Ok(())
        } else {
            Err(format!("{done} round trips, errors {} ({})", p.errors.load(Ordering::Relaxed), p.last_error.lock().unwrap()))
        }
    });
}

fn role(rt: &tokio::runtime::Runtime, addr: &str) -> Option<tessera_mgmt_api::ServiceRole> {
    rt.block_on(MgmtClient::new(addr).service_role()).ok()
}

#[test]
fn the_host_keeps_its_volume_through_the_death_of_the_leader_service_and_of_an_etcd_member() {
    let mut cluster = LocalCluster::start_ha("ha", 3, 1, "128MiB", "3s");
    let nvmf = Daemon::start(
        "tessera-nvmf",
        &["--mgmt", &cluster.mgmt_addrs(), "--listen", "127.0.0.1:0", "--threads", "2"],
        "listening",
        &cluster.dir.join("nvmf.log"),
    );
    let addr: SocketAddr = nvmf.addr.parse().unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let mgmt = cluster.client();
    let (first, second) = (cluster.mgmt.addr.clone(), cluster.mgmt2.as_ref().unwrap().addr.clone());
    assert!(role(&rt, &first).unwrap().leader);
    let follower = role(&rt, &second).unwrap();
    assert!(!follower.leader);
    assert_eq!(follower.leader_addr.as_deref(), Some(first.as_str()));

    rt.block_on(async {
        pool0_vol0(&mgmt, 16 << 20).await;
        mgmt.create_export(&export_vol0(NQN, addr, &[])).await.unwrap();
    });
    // The follower serves reads of the state the leader committed (it follows by watch).
    wait_for("the follower has the export", Duration::from_secs(10), || {
        let n = rt.block_on(MgmtClient::new(&second).exports()).map_err(|e| e.to_string())?.exports.len();
        if n == 1 {
            Ok(())
        } else {
            Err(format!("{n} exports"))
        }
    });

    let stop = Arc::new(AtomicBool::new(false));
    let progress = Arc::new(Progress::default());
    let io = rt.spawn(workload(addr, stop.clone(), progress.clone()));
    wait_ops(&progress, 20, "I/O before the leader dies");

    // The leader service dies.
    cluster.mgmt.kill();
    let killed = Instant::now();
    wait_log(&cluster.mgmt2.as_ref().unwrap().log, "became the leader", LEASE * 4);
    let takeover = killed.elapsed();
    eprintln!("the follower took over {takeover:?} after the leader was killed");
    assert!(takeover < LEASE + Duration::from_secs(3), "takeover took {takeover:?}, more than a lease period ({LEASE:?}) and a margin");
    wait_ops(&progress, 20, "I/O after the takeover");
    // The new leader takes writes; the engines kept heartbeating it and none was marked Down.
    rt.block_on(create_volume(&mgmt, "after-takeover", 4 << 20));
    wait_for("heartbeats reach the new leader", Duration::from_secs(20), || {
        let sys = rt.block_on(MgmtClient::new(&second).system()).map_err(|e| e.to_string())?;
        let up = sys.engines.iter().filter(|e| e.state == EngineState::Up).count();
        if up == 3 {
            Ok(())
        } else {
            Err(format!("{up} engines up"))
        }
    });
    let nvmf_log = std::fs::read_to_string(&nvmf.log).unwrap_or_default();
    assert!(!nvmf_log.contains("panicked"), "{nvmf_log}");

    // One etcd member of three dies: the state stays writable and I/O goes on.
    cluster.etcd.as_mut().unwrap().kill(0);
    rt.block_on(create_volume(&mgmt, "one-etcd-member-down", 4 << 20));
    wait_ops(&progress, 20, "I/O with an etcd member down");

    // The old leader comes back as a follower of the new one.
    let old = cluster.mgmt.addr.clone();
    cluster.restart_mgmt();
    wait_for("the restarted service follows", Duration::from_secs(20), || match role(&rt, &old) {
        Some(r) if !r.leader && r.leader_addr.as_deref() == Some(second.as_str()) => Ok(()),
        other => Err(format!("{other:?}")),
    });
    let vols = rt.block_on(MgmtClient::new(&old).exports()).unwrap();
    assert_eq!(vols.exports.len(), 1);

    // Failure detection works under the new leader: an engine killed now is marked Down, and
    // the host's I/O goes on degraded.
    cluster.kill_engine(2);
    cluster.wait_engine_down(2, Duration::from_secs(30));
    wait_ops(&progress, 20, "I/O with an engine down under the new leader");

    stop.store(true, Ordering::Relaxed);
    rt.block_on(io).unwrap();
    let errors = progress.errors.load(Ordering::Relaxed);
    assert_eq!(errors, 0, "the host saw I/O errors: {}", progress.last_error.lock().unwrap());
    let sys = rt.block_on(mgmt.system()).unwrap();
    assert_eq!(sys.engines.iter().filter(|e| e.state == EngineState::Up).count(), 2, "{:?}", sys.engines);
    // Losing an etcd member did not cost the leadership (the lease was renewed through another).
    let log = std::fs::read_to_string(&cluster.mgmt2.as_ref().unwrap().log).unwrap_or_default();
    assert!(!log.contains("lost the leadership"), "{log}");
}
