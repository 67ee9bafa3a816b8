//! What the cluster tests share: a seeded generator, the data pattern, a byte-exact model of
//! the volume and its writers and verifier.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use bytes::Bytes;
use tessera_client::volume::Cluster;
use tessera_client::volume::{Volume, VolumeError};
use tessera_mgmt_api::{CreatePool, CreateVolume, MgmtClient, PoolInfo, RebuildState, TargetStateName};
use tessera_testkit::{wait_for, LocalCluster};

/// A seeded xorshift generator.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// The bytes every write stores: a function of (offset, generation).
pub fn pattern(offset: u64, len: usize, gen: u64) -> Bytes {
    let mut v = vec![0u8; len];
    for (i, b) in v.iter_mut().enumerate() {
        let x = (offset + i as u64).wrapping_mul(0x9e37_79b9).wrapping_add(gen.wrapping_mul(0x85eb_ca6b));
        *b = (x >> 13) as u8;
    }
    Bytes::from(v)
}

/// One random write (a partial stripe, a whole stripe, or several stripes and chunks), applied
/// to the model too.
pub async fn random_write(vol: &Volume, model: &mut [u8], rng: &mut Rng, gen: u64) -> Result<(), VolumeError> {
    let size = model.len() as u64;
    let block = 4096u64;
    let blocks = match rng.below(4) {
        0 => 1,
        1 => 1 + rng.below(8),
        2 => 8,                  // 32 KiB: one whole EC_2P1 stripe of 16 KiB cells when aligned
        _ => 16 + rng.below(64), // up to 320 KiB: spans stripes and sometimes chunks
    };
    let off = rng.below(size / block - blocks) * block;
    let len = (blocks * block) as usize;
    let data = pattern(off, len, gen);
    model[off as usize..off as usize + len].copy_from_slice(&data);
    vol.write(off, data).await
}

pub async fn verify_all(vol: &Volume, model: &[u8]) {
    let step = 256 * 1024;
    for off in (0..model.len()).step_by(step) {
        let got = vol.read(off as u64, step as u64).await.unwrap_or_else(|e| panic!("read at {off}: {e}"));
        if got[..] != model[off..off + step] {
            // Where exactly: the differing 4 KiB blocks.
            let bad: Vec<usize> = (0..step / 4096)
                .filter(|b| got[b * 4096..(b + 1) * 4096] != model[off + b * 4096..off + (b + 1) * 4096])
                .map(|b| off + b * 4096)
                .collect();
            let zeros = bad.iter().filter(|&&b| got[b - off..b - off + 4096].iter().all(|&x| x == 0)).count();
            panic!("data differs in {off}..{}: blocks {bad:?} ({zeros} of them read as zeros)", off + step);
        }
    }
}

/// Writes the whole volume, 1 MiB (whole stripes) at a time, with generation `gen`.
pub async fn write_whole(vol: &Volume, model: &mut [u8], gen: u64) {
    for off in (0..model.len() as u64).step_by(1 << 20) {
        let d = pattern(off, 1 << 20, gen);
        model[off as usize..(off + (1 << 20)) as usize].copy_from_slice(&d);
        vol.write(off, d).await.unwrap();
    }
}

/// Random writes one after another (so the model is exact).
pub async fn sequential_random_writes(vol: &Volume, model: &mut [u8], rng: &mut Rng, count: usize, gen: u64) {
    for i in 0..count {
        random_write(vol, model, rng, gen * 10_000 + i as u64).await.unwrap_or_else(|e| panic!("write {i}: {e}"));
    }
}

pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

/// Waits until no target of pool "p" is DOWN or UP and its rebuild is idle; returns the pool.
pub fn wait_healed(rt: &tokio::runtime::Runtime, mgmt: &MgmtClient, timeout: Duration) -> PoolInfo {
    wait_for("pool p healed", timeout, || {
        let p = rt.block_on(mgmt.pool("p")).map_err(|e| e.to_string())?;
        let moving = p.map.targets.iter().any(|t| matches!(t.state, TargetStateName::Down | TargetStateName::Up));
        if !moving && p.rebuild.state == RebuildState::Idle {
            Ok(p)
        } else {
            Err(format!("{p:#?}"))
        }
    })
}

/// Lines of engine `rank`'s log containing `what`.
pub fn log_lines(c: &LocalCluster, rank: u32, what: &str) -> Vec<String> {
    let log = std::fs::read_to_string(c.dir.join(format!("engine-{rank}")).join(format!("engine-{rank}.log"))).unwrap_or_default();
    log.lines().filter(|l| l.contains(what)).map(str::to_string).collect()
}

/// Creates pool "p" and volume "v" (`class`, `size`, 4 KiB blocks, 16 KiB cells) and opens it.
pub async fn open(c: &LocalCluster, class: &str, size: u64) -> Volume {
    let mgmt = c.client();
    mgmt.create_pool(&CreatePool { name: "p".into(), ranks: vec![], default_class: None }).await.unwrap();
    let info = mgmt
        .create_volume(
            "p",
            &CreateVolume {
                name: "v".into(),
                size,
                block_size: Some(4096),
                class: Some(class.into()),
                cell_size: Some(16 * 1024),
                chunk_size: None,
                checksum: None,
            },
        )
        .await
        .unwrap();
    Cluster::new(mgmt).open_volume(&info).await.unwrap()
}

/// Bytes in use on every target (2 per engine) of the running engines.
pub async fn used_bytes(c: &LocalCluster) -> u64 {
    use tessera_client::proto::{Reply, Request};
    use tessera_client::{ConnectionOptions, EngineConnection};
    let mut used = 0;
    for e in c.engines.iter().flatten() {
        let conn = EngineConnection::connect(e.addr.parse().unwrap(), ConnectionOptions::default()).await.unwrap();
        for t in 0..2 {
            match conn.call(t, Request::QueryTarget).await.unwrap() {
                Reply::TargetInfo(i) => used += i.used,
                other => panic!("{other:?}"),
            }
        }
    }
    used
}

/// Kills each of the 3 engines in turn, verifies every byte from the other two, and restarts it
/// before the heartbeat timeout (the cluster's must be long), so it is never marked DOWN.
pub fn verify_with_each_engine_down(c: &mut LocalCluster, rt: &tokio::runtime::Runtime, vol: &Volume, model: &[u8]) {
    for rank in 0..3 {
        c.kill_engine(rank);
        rt.block_on(verify_all(vol, model));
        c.engines[rank as usize] = Some(c.start_engine(rank));
        c.wait_engines_up(3, std::time::Duration::from_secs(20));
    }
}
