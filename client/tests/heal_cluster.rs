//! Self-healing against a real local cluster: the management service and four engines (two
//! targets each) as separate processes. Engines are killed with SIGKILL; the engines' healers
//! rebuild the lost shards onto the survivors by themselves, reintegrate a returning engine, and every byte of an EC_2P1 and an RP_2 volume is verified after each step,
//! also after failures that would lose data without the rebuild.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use tessera_client::volume::{Cluster, Volume};
use tessera_mgmt_api::{CreatePool, CreateVolume, MgmtClient, PoolInfo, RebuildState, TargetStateName};
use tessera_testkit::LocalCluster;

mod common;
use common::{runtime, sequential_random_writes, verify_all, write_whole, Rng};

const HEAL: &str = "\n[heal]\nrebuild_rate = \"1GiB\"\n";

async fn create(mgmt: &MgmtClient, name: &str, class: &str, size: u64) -> Volume {
    let info = mgmt
        .create_volume(
            "p",
            &CreateVolume {
                name: name.into(),
                size,
                block_size: Some(4096),
                class: Some(class.into()),
                cell_size: Some(16 * 1024),
                chunk_size: Some(256 * 1024),
                checksum: None,
            },
        )
        .await
        .unwrap();
    Cluster::new(mgmt.clone()).open_volume(&info).await.unwrap()
}

/// Waits until the pool has no DOWN or UP target and its rebuild is idle; returns the pool.
fn wait_healed(rt: &tokio::runtime::Runtime, mgmt: &MgmtClient, timeout: Duration) -> PoolInfo {
    let start = Instant::now();
    let mut last = None;
    loop {
        if let Ok(p) = rt.block_on(mgmt.pool("p")) {
            let moving = p.map.targets.iter().any(|t| matches!(t.state, TargetStateName::Down | TargetStateName::Up));
            if !moving && p.rebuild.state == RebuildState::Idle {
                return p;
            }
            last = Some(p);
        }
        assert!(start.elapsed() < timeout, "pool not healed after {timeout:?}: {last:#?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn states(p: &PoolInfo, rank: u32) -> Vec<TargetStateName> {
    p.map.targets.iter().filter(|t| t.rank == rank).map(|t| t.state).collect()
}

#[test]
fn rebuild_then_second_failure_then_reintegration_then_third_failure() {
    let mut c = LocalCluster::start_with("heal", 4, 2, "256MiB", "1500ms", HEAL);
    let rt = runtime();
    let mgmt = c.client();
    rt.block_on(mgmt.create_pool(&CreatePool { name: "p".into(), ranks: vec![], default_class: None })).unwrap();
    let size = 4u64 << 20;
    let ec = rt.block_on(create(&mgmt, "ec", "EC_2P1", size));
    let rp = rt.block_on(create(&mgmt, "rp", "RP_2", size));
    let mut m_ec = vec![0u8; size as usize];
    let mut m_rp = vec![0u8; size as usize];
    let mut rng = Rng(0x4ea1);
    rt.block_on(async {
        write_whole(&ec, &mut m_ec, 1).await;
        write_whole(&rp, &mut m_rp, 1).await;
        sequential_random_writes(&ec, &mut m_ec, &mut rng, 60, 2).await;
        sequential_random_writes(&rp, &mut m_rp, &mut rng, 60, 2).await;
    });

    // 1. kill -9 one engine: a rebuild starts by itself; writes and reads go on during it.
    c.kill_engine(1);
    c.wait_engine_down(1, Duration::from_secs(10));
    rt.block_on(async {
        sequential_random_writes(&ec, &mut m_ec, &mut rng, 40, 3).await;
        sequential_random_writes(&rp, &mut m_rp, &mut rng, 40, 3).await;
        verify_all(&ec, &m_ec).await;
        verify_all(&rp, &m_rp).await;
    });
    let p = wait_healed(&rt, &mgmt, Duration::from_secs(60));
    assert_eq!(states(&p, 1), [TargetStateName::DownOut; 2]);
    rt.block_on(async {
        verify_all(&ec, &m_ec).await;
        verify_all(&rp, &m_rp).await;
    });

    // 2. A second engine: without the rebuild, groups that had shards on both would be lost.
    c.kill_engine(2);
    c.wait_engine_down(2, Duration::from_secs(10));
    let full = wait_healed(&rt, &mgmt, Duration::from_secs(60)).rebuild;
    rt.block_on(async {
        verify_all(&ec, &m_ec).await;
        verify_all(&rp, &m_rp).await;
        // While it is away, a few small writes into one chunk of each volume.
        for (vol, model) in [(&ec, &mut m_ec), (&rp, &mut m_rp)] {
            for i in 0..3u64 {
                let off = 8192 * i;
                let d = common::pattern(off, 4096, 40 + i);
                model[off as usize..off as usize + 4096].copy_from_slice(&d);
                vol.write(off, d).await.unwrap();
            }
        }
    });

    // 3. The last engine lost returns with its data: reintegrated (UP, then UPIN), copying
    //    only the chunks written while it was away.
    let d = c.start_engine(2);
    c.engines[2] = Some(d);
    let p = wait_healed(&rt, &mgmt, Duration::from_secs(60));
    assert_eq!(states(&p, 2), [TargetStateName::UpIn; 2]);
    // Incremental: only the chunk written meanwhile (per volume, its shards that moved back),
    // against every chunk the full rebuild of the same engine copied.
    let back = &p.rebuild;
    assert!(full.dkeys_done >= 8, "the full rebuild moved {} chunks", full.dkeys_done);
    assert!(back.dkeys_done <= 2 * 2, "reintegration copied {} chunk shards (full rebuild: {})", back.dkeys_done, full.dkeys_done);
    assert!(back.bytes_done < full.bytes_done / 2, "reintegration {} bytes, full rebuild {}", back.bytes_done, full.bytes_done);
    rt.block_on(async {
        verify_all(&ec, &m_ec).await;
        verify_all(&rp, &m_rp).await;
    });

    // 4. Another engine: the reintegrated one must now hold its share.
    c.kill_engine(3);
    c.wait_engine_down(3, Duration::from_secs(10));
    wait_healed(&rt, &mgmt, Duration::from_secs(60));
    rt.block_on(async {
        verify_all(&ec, &m_ec).await;
        verify_all(&rp, &m_rp).await;
    });
}
