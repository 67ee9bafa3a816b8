//! The load generator (`tessera-nvmf-host`, the engine of `tessera bench`) against a real target
//! process: verify mode writes self-describing blocks over several queues and reads every one
//! back, with and without digests, in-capsule and R2T sizes.

mod common;

use std::time::Duration;

use common::{TargetProc, HOSTNQN, SUBNQN};
use tessera_nvme_proto::Digests;
use tessera_nvmf_host::{Controller, ControllerOptions, Rw, Workload};

fn opts(t: &TargetProc, digests: Digests, disable_sqflow: bool) -> ControllerOptions {
    ControllerOptions { addr: t.addr, subnqn: SUBNQN.into(), hostnqn: HOSTNQN.into(), hostid: [9; 16], digests, kato_ms: 0, disable_sqflow }
}

fn workload(rw: Rw, bs: u32, qd: u16, queues: u16) -> Workload {
    Workload { rw, mix_read_pct: 70, bs, qd, queues, duration: None, ios: Some(600), verify: true, range_blocks: Some(16384), seed: 42 }
}

#[test]
fn verify_mode_reads_back_everything_it_wrote() {
    let mut t = TargetProc::start();
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let cases = [
            (Rw::RandWrite, 4096, 32, 2, Digests::default(), false),
            (Rw::Write, 131072, 16, 1, Digests { header: true, data: true }, true),
            (Rw::RandRw, 8192, 8, 2, Digests { header: true, data: false }, false),
            (Rw::RandWrite, 512 * 1024, 4, 2, Digests::default(), true),
        ];
        for (rw, bs, qd, queues, digests, sqflow_off) in cases {
            let mut ctrl = Controller::connect(opts(&t, digests, sqflow_off), 1).await.unwrap();
            let r = tokio::time::timeout(Duration::from_secs(60), workload(rw, bs, qd, queues).run(&mut ctrl)).await.unwrap().unwrap();
            assert_eq!(r.errors, 0);
            assert_eq!(r.ios, 600);
            assert!(r.verified_blocks > 0, "{rw:?} {bs}: nothing verified");
            assert!(r.lat_p50_us > 0.0 && r.lat_p50_us <= r.lat_p99_us);
        }
    });
    assert!(t.is_alive());
}

#[test]
fn verify_detects_data_that_is_not_what_was_written() {
    // A null namespace discards writes, so the read-back must fail.
    let t = TargetProc::start();
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let mut o = opts(&t, Digests::default(), false);
        o.subnqn = common::RESTRICTED.into();
        o.hostnqn = common::ALLOWED_HOST.into();
        let mut ctrl = Controller::connect(o, 1).await.unwrap();
        let e = workload(Rw::RandWrite, 4096, 8, 1).run(&mut ctrl).await.unwrap_err();
        assert!(e.to_string().contains("verify failed at LBA"), "{e}");
    });
}
