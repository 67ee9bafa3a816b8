//! vhost-user-blk exports in managed mode, end to end: the real management service and engines,
//! the real `tessera-nvmf --mgmt`, and the rust-vmm `vhost` crate's vhost-user front end (the
//! protocol side QEMU speaks) on the socket. An export made through the API appears as a bound
//! socket whose device describes the volume (size, block size, queues, features; a snapshot
//! read-only); the volume cannot be deleted, shrunk or rolled back while it is served; removing
//! the export ends the connection and removes the socket; a file in the way is left alone; bad
//! requests are refused with the service's message. Reads and writes through guest memory are the QEMU boot's (`vhost-*` cases
//! of tests/nvme-cli).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

mod common;

use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{managed_system, pool0_vol0};
use tessera_mgmt_api::{CreateVhostExport, MgmtClient};
use tessera_testkit::wait_for;
use tessera_vhost_blk::config::{feature, off, CONFIG_LEN};
use vhost::vhost_user::message::{VhostUserConfigFlags, VhostUserProtocolFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::VhostBackend;

const MIB: u64 = 1 << 20;

fn is_socket(p: &Path) -> bool {
    std::fs::symlink_metadata(p).is_ok_and(|m| m.file_type().is_socket())
}

/// What the device behind `socket` says about itself, read the way QEMU does at start-up:
/// (virtio features, queues, configuration space).
fn describe(fe: &mut Frontend) -> (u64, u64, Vec<u8>) {
    let features = fe.get_features().unwrap();
    fe.set_owner().unwrap();
    let proto = fe.get_protocol_features().unwrap();
    assert!(proto.contains(VhostUserProtocolFeatures::CONFIG | VhostUserProtocolFeatures::MQ), "{proto:?}");
    fe.set_protocol_features(VhostUserProtocolFeatures::CONFIG | VhostUserProtocolFeatures::MQ).unwrap();
    let queues = fe.get_queue_num().unwrap();
    let (_, config) = fe.get_config(0, CONFIG_LEN as u32, VhostUserConfigFlags::WRITABLE, &[0u8; CONFIG_LEN]).unwrap();
    (features, queues, config)
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}

fn export(socket: &Path, volume: &str, snapshot: Option<&str>, queues: Option<u16>, target: &str) -> CreateVhostExport {
    CreateVhostExport {
        socket: socket.to_str().unwrap().into(),
        pool: "pool0".into(),
        volume: volume.into(),
        snapshot: snapshot.map(str::to_string),
        queues,
        read_only: false,
        target: Some(target.into()),
    }
}

async fn setup(mgmt: &MgmtClient) {
    pool0_vol0(mgmt, 16 * MIB).await;
    mgmt.create_snapshot("pool0", "vol0", "a").await.unwrap();
}

#[test]
fn vhost_exports_are_served_refuse_volume_changes_and_go_away() {
    let (cluster, mut nvmf, addr, rt, mgmt) = managed_system("nvmf-vhost", 1, "128MiB", "3s");
    let target = addr.to_string();
    rt.block_on(setup(&mgmt));
    let live: PathBuf = cluster.dir.join("vol0.sock");
    let snap: PathBuf = cluster.dir.join("vol0-a.sock");

    // Refused with the service's message, nothing recorded.
    let refused = |req: CreateVhostExport, status: u16, says: &str| {
        let e = rt.block_on(mgmt.create_vhost_export(&req)).unwrap_err();
        assert_eq!(e.status(), Some(status), "{e}");
        assert!(e.to_string().contains(says), "{e} should say {says}");
    };
    refused(CreateVhostExport { socket: "vol0.sock".into(), ..export(&live, "vol0", None, None, &target) }, 400, "absolute path");
    refused(
        CreateVhostExport { socket: format!("/{}", "x".repeat(120)), ..export(&live, "vol0", None, None, &target) },
        400,
        "more than a UNIX socket holds",
    );
    refused(export(&live, "vol0", None, Some(0), &target), 400, "1 to 64");
    refused(export(&live, "nope", None, None, &target), 404, "no volume");
    refused(export(&live, "vol0", Some("nope"), None, &target), 404, "no snapshot");
    assert!(rt.block_on(mgmt.exports()).unwrap().vhost.is_empty());

    // The volume, with 2 queues, and its snapshot.
    let x = rt.block_on(mgmt.create_vhost_export(&export(&live, "vol0", None, Some(2), &target))).unwrap();
    assert_eq!((x.queues, x.read_only, x.target.as_str()), (2, false, target.as_str()));
    let s = rt.block_on(mgmt.create_vhost_export(&export(&snap, "vol0", Some("a"), None, &target))).unwrap();
    assert_eq!((s.queues, s.read_only), (4, true), "a snapshot is read-only, 4 queues by default");
    refused(export(&cluster.dir.join("again.sock"), "vol0", None, None, &target), 409, "already a vhost-user-blk disk on");
    refused(export(&live, "vol0", Some("a"), None, &target), 409, "already serves pool0/vol0");

    wait_for("the target to bind both sockets", Duration::from_secs(20), || {
        (is_socket(&live) && is_socket(&snap)).then_some(()).ok_or_else(|| std::fs::read_to_string(&nvmf.log).unwrap_or_default())
    });
    let mut fe = Frontend::connect(&live, 2).unwrap();
    let (features, queues, config) = describe(&mut fe);
    assert_eq!(queues, 2);
    for f in [feature::VERSION_1, feature::BLK_SIZE, feature::FLUSH, feature::MQ, feature::DISCARD, feature::WRITE_ZEROES, feature::SEG_MAX]
    {
        assert_ne!(features & (1 << f), 0, "feature bit {f} in {features:#x}");
    }
    assert_eq!(features & (1 << feature::RO), 0, "the volume is writable");
    assert_eq!(u64_at(&config, off::CAPACITY), 16 * MIB / 512, "capacity in 512-byte sectors");
    assert_eq!(u32_at(&config, off::BLK_SIZE), 4096);
    assert_eq!(u16::from_le_bytes([config[off::NUM_QUEUES], config[off::NUM_QUEUES + 1]]), 2);

    let mut sfe = Frontend::connect(&snap, 4).unwrap();
    let (features, queues, config) = describe(&mut sfe);
    assert_ne!(features & (1 << feature::RO), 0, "a snapshot is offered read-only");
    assert_eq!((queues, u64_at(&config, off::CAPACITY)), (4, 16 * MIB / 512));

    // While served, the volume cannot go, shrink or be rolled back under its guest.
    let e = rt.block_on(mgmt.delete_volume("pool0", "vol0")).unwrap_err();
    assert!(e.status() == Some(409) && e.to_string().contains(&format!("the vhost-user-blk disk on {}", live.display())), "{e}");
    let e = rt.block_on(mgmt.resize_volume("pool0", "vol0", 8 * MIB)).unwrap_err();
    assert!(e.status() == Some(409) && e.to_string().contains("can grow but not shrink"), "{e}");
    let e = rt.block_on(mgmt.rollback("pool0", "vol0", "a", false)).unwrap_err();
    assert!(e.status() == Some(409) && e.to_string().contains("vhost-user-blk"), "{e}");
    let e = rt.block_on(mgmt.delete_snapshot("pool0", "vol0", "a")).unwrap_err();
    assert!(e.status() == Some(409) && e.to_string().contains(&format!("the vhost-user-blk disk on {}", snap.display())), "{e}");

    // Removed: the connection ends and the socket goes; the other export goes on.
    let gone = rt.block_on(mgmt.delete_vhost_export(live.to_str().unwrap())).unwrap();
    assert_eq!(gone.volume.name, "vol0");
    wait_for("the target to let go of the socket", Duration::from_secs(20), || {
        (!is_socket(&live)).then_some(()).ok_or("still bound".to_string())
    });
    assert!(fe.get_features().is_err(), "the front end's connection ended");
    let e = rt.block_on(mgmt.delete_vhost_export(live.to_str().unwrap())).unwrap_err();
    assert!(e.status() == Some(404) && e.to_string().contains("no vhost-user-blk disk is exported on"), "{e}");
    assert!(sfe.get_features().is_ok(), "the snapshot's disk is still served");

    // An export naming a file that is not a socket: the target leaves the file alone, says why
    // and keeps retrying; the export can be removed.
    let precious = cluster.dir.join("precious");
    std::fs::write(&precious, b"keep me").unwrap();
    rt.block_on(mgmt.create_vhost_export(&export(&precious, "vol0", None, None, &target))).unwrap();
    wait_for("the target to refuse the file", Duration::from_secs(20), || {
        let log = std::fs::read_to_string(&nvmf.log).unwrap_or_default();
        log.contains("not a socket is in the way").then_some(()).ok_or("not yet".to_string())
    });
    assert_eq!(std::fs::read(&precious).unwrap(), b"keep me");
    rt.block_on(mgmt.delete_vhost_export(precious.to_str().unwrap())).unwrap();

    // A stopped target takes its sockets with it.
    drop(sfe);
    assert!(nvmf.terminate().success());
    assert!(!is_socket(&snap), "the socket of a stopped target is removed");
    let log = std::fs::read_to_string(&nvmf.log).unwrap_or_default();
    assert!(!log.contains("panicked"), "{log}");
    assert!(log.contains("vhost-user-blk export ready"), "{log}");
}
