//! A minimal blocking NVMe/TCP host for integration tests: it speaks the wire format through the
//! same `tessera-nvme-proto` code the target uses, over a real TCP socket to a real
//! `tessera-nvmf` process.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use tessera_nvme_proto::fabrics::{ConnectCmd, ConnectData, PropertyCmd, CNTLID_DYNAMIC};
use tessera_nvme_proto::opcode::{fctype, FABRICS};
use tessera_nvme_proto::pdu::{self, DataPdu, IcReq};
use tessera_nvme_proto::sqe::{SglDescriptor, SGL_ID_INCAPSULE, SGL_ID_TRANSPORT};
use tessera_nvme_proto::{Cqe, Digests, Pdu, PduLimits, Sqe, Status};

pub const HOSTNQN: &str = "nqn.2014-08.org.nvmexpress:uuid:00000000-0000-0000-0000-000000000001";
pub const SUBNQN: &str = "nqn.2026-11.io.tessera:itest";
pub const RESTRICTED: &str = "nqn.2026-11.io.tessera:restricted";
pub const ALLOWED_HOST: &str = "nqn.2014-08.org.nvmexpress:uuid:11111111-2222-3333-4444-555555555555";

/// A running target process, killed on drop.
pub struct TargetProc {
    pub child: Child,
    pub addr: SocketAddr,
    pub config: PathBuf,
    _dir: TempDir,
}

pub struct TempDir(pub PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
pub use tessera_testkit::free_port;

pub fn config_text(port: u16, extra_ns: &str) -> String {
    format!(
        r#"listen = ["127.0.0.1:{port}"]

[[subsystem]]
nqn = "{SUBNQN}"
serial = "ITEST0001"
model = "Tessera itest"
allow_any_host = true

[[subsystem.namespace]]
nsid = 1
bdev = "malloc"
size_mib = 64
block_size = 512
{extra_ns}
[[subsystem]]
nqn = "{RESTRICTED}"
allowed_hosts = ["{ALLOWED_HOST}"]

[[subsystem.namespace]]
nsid = 1
bdev = "null"
size_mib = 16
"#
    )
}

impl TargetProc {
    pub fn start() -> TargetProc {
        let port = free_port();
        let dir = std::env::temp_dir().join(format!("tessera-itest-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let config = dir.join("target.toml");
        std::fs::write(&config, config_text(port, "")).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_tessera-nvmf"))
            .arg("--config")
            .arg(&config)
            .arg("--threads")
            .arg("2")
            .env("RUST_LOG", "debug")
            .stdout(Stdio::null())
            .stderr(Stdio::from(std::fs::File::create(dir.join("target.log")).unwrap()))
            .spawn()
            .unwrap();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(addr).is_err() {
            assert!(Instant::now() < deadline, "target did not start listening");
            std::thread::sleep(Duration::from_millis(20));
        }
        TargetProc { child, addr, config, _dir: TempDir(dir) }
    }

    pub fn is_alive(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.config.with_file_name("target.log")).unwrap_or_default()
    }

    pub fn hup(&self) {
        let ok = Command::new("kill").arg("-HUP").arg(self.child.id().to_string()).status().unwrap().success();
        assert!(ok);
    }
}

impl Drop for TargetProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One host connection (one queue).
pub struct HostConn {
    pub sock: TcpStream,
    pub digests: Digests,
    pub maxh2cdata: u32,
    buf: BytesMut,
    next_cid: u16,
    pub cntlid: u16,
}

/// A command's outcome.
#[derive(Debug)]
pub struct Reply {
    pub cqe: Cqe,
    pub data: Vec<u8>,
}

impl HostConn {
    pub fn open(addr: SocketAddr, digests: Digests) -> HostConn {
        let sock = TcpStream::connect(addr).unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        sock.set_nodelay(true).unwrap();
        let mut c = HostConn { sock, digests: Digests::default(), maxh2cdata: 0, buf: BytesMut::new(), next_cid: 1, cntlid: 0 };
        c.send(&Pdu::IcReq(IcReq { pfv: 0, hpda: 0, digests, maxr2t: 0 }));
        match c.recv() {
            Some(Pdu::IcResp(r)) => {
                assert_eq!(r.digests, digests);
                assert_eq!(r.cpda, 0);
                assert!(r.maxh2cdata >= 4096 && r.maxh2cdata % 4 == 0);
                c.maxh2cdata = r.maxh2cdata;
            }
            other => panic!("expected ICResp, got {other:?}"),
        }
        c.digests = digests;
        c
    }

    /// A TCP connection that has sent nothing yet (the caller sends its own ICReq bytes).
    pub fn raw(addr: SocketAddr) -> HostConn {
        let sock = TcpStream::connect(addr).unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        sock.set_nodelay(true).unwrap();
        HostConn { sock, digests: Digests::default(), maxh2cdata: 0, buf: BytesMut::new(), next_cid: 1, cntlid: 0 }
    }

    /// Collects the C2H data and the response of command `cid` (for commands sent as raw bytes).
    pub fn wait_reply(&mut self, cid: u16) -> Reply {
        let mut got = Vec::new();
        loop {
            match self.recv() {
                Some(Pdu::CapsuleResp(c)) => {
                    assert_eq!(c.cid, cid);
                    return Reply { cqe: c, data: got };
                }
                Some(Pdu::C2hData(d)) => {
                    assert_eq!(d.cccid, cid);
                    assert_eq!(d.datao as usize, got.len());
                    got.extend_from_slice(&d.data);
                    if d.success {
                        return Reply { cqe: Cqe::new(cid, Status::SUCCESS), data: got };
                    }
                }
                other => panic!("expected the reply to CID {cid}, got {other:?}"),
            }
        }
    }

    pub fn send(&mut self, p: &Pdu) {
        let b = p.to_bytes(self.digests);
        self.sock.write_all(&b).unwrap();
    }

    pub fn send_raw(&mut self, b: &[u8]) {
        self.sock.write_all(b).unwrap();
    }

    /// Next PDU, or `None` at EOF.
    pub fn recv(&mut self) -> Option<Pdu> {
        let lim = PduLimits { max_capsule_data: 1 << 20, max_data_pdu: 1 << 24 };
        loop {
            if let Some(p) = pdu::decode(&mut self.buf, self.digests, &lim).unwrap() {
                return Some(p);
            }
            let mut tmp = vec![0u8; 1 << 16];
            let n = self.sock.read(&mut tmp).unwrap_or(0);
            if n == 0 {
                return None;
            }
            self.buf.extend_from_slice(&tmp[..n]);
        }
    }

    pub fn cid(&mut self) -> u16 {
        self.next_cid = self.next_cid.wrapping_add(1);
        self.next_cid
    }

    /// Sends `sqe` with optional host data (in-capsule if it fits `incapsule_max`, else via R2T)
    /// and collects the reply and any C2H data.
    pub fn exec(&mut self, mut sqe: Sqe, data: Option<&[u8]>, incapsule_max: usize) -> Reply {
        let cid = sqe.cid();
        let mut r2t_data: Option<Vec<u8>> = None;
        let capsule_data = match data {
            Some(d) if d.len() <= incapsule_max => {
                sqe.set_sgl(SglDescriptor { address: 0, length: d.len() as u32, id: SGL_ID_INCAPSULE });
                Bytes::copy_from_slice(d)
            }
            Some(d) => {
                sqe.set_sgl(SglDescriptor { address: 0, length: d.len() as u32, id: SGL_ID_TRANSPORT });
                r2t_data = Some(d.to_vec());
                Bytes::new()
            }
            None => Bytes::new(),
        };
        self.send(&Pdu::CapsuleCmd { sqe, data: capsule_data });
        let mut got = Vec::new();
        loop {
            match self.recv() {
                Some(Pdu::CapsuleResp(c)) => {
                    assert_eq!(c.cid, cid);
                    return Reply { cqe: c, data: got };
                }
                Some(Pdu::C2hData(d)) => {
                    assert_eq!(d.cccid, cid);
                    assert_eq!(d.datao as usize, got.len());
                    got.extend_from_slice(&d.data);
                    if d.success {
                        assert!(d.last);
                        return Reply { cqe: Cqe::new(cid, Status::SUCCESS), data: got };
                    }
                }
                Some(Pdu::R2t(r)) => {
                    let all = r2t_data.as_ref().expect("R2T for a command without data");
                    let mut off = r.r2to as usize;
                    let end = off + r.r2tl as usize;
                    while off < end {
                        let n = (end - off).min(self.maxh2cdata as usize);
                        let p = Pdu::H2cData(DataPdu {
                            cccid: cid,
                            ttag: r.ttag,
                            datao: off as u32,
                            data: Bytes::copy_from_slice(&all[off..off + n]),
                            last: off + n == end,
                            success: false,
                        });
                        self.send(&p);
                        off += n;
                    }
                }
                other => panic!("unexpected {other:?}"),
            }
        }
    }

    /// Connects this queue; returns the completion.
    pub fn connect(&mut self, subnqn: &str, hostnqn: &str, qid: u16, sqsize: u16, cntlid: u16, kato_ms: u32) -> Cqe {
        let mut sqe = Sqe::new(FABRICS, self.cid());
        ConnectCmd { recfmt: 0, qid, sqsize, cattr: 0, kato_ms }.write_to(&mut sqe);
        let data = ConnectData { hostid: [0x42; 16], cntlid, subnqn: subnqn.into(), hostnqn: hostnqn.into() }.encode();
        let r = self.exec(sqe, Some(&data), 8192);
        if r.cqe.status.is_success() {
            self.cntlid = r.cqe.dw0 as u16;
        }
        r.cqe
    }

    pub fn prop_get(&mut self, offset: u32, eight: bool) -> u64 {
        let mut sqe = Sqe::new(FABRICS, self.cid());
        PropertyCmd { eight_bytes: eight, offset, value: 0 }.write_to(&mut sqe, fctype::PROPERTY_GET);
        let r = self.exec(sqe, None, 0);
        assert!(r.cqe.status.is_success(), "{:?}", r.cqe);
        u64::from(r.cqe.dw0) | (u64::from(r.cqe.dw1) << 32)
    }

    pub fn prop_set(&mut self, offset: u32, value: u32) -> Cqe {
        let mut sqe = Sqe::new(FABRICS, self.cid());
        PropertyCmd { eight_bytes: false, offset, value: u64::from(value) }.write_to(&mut sqe, fctype::PROPERTY_SET);
        self.exec(sqe, None, 0).cqe
    }

    /// Admin queue: connect, enable, wait for ready.
    pub fn admin(addr: SocketAddr, subnqn: &str, hostnqn: &str, kato_ms: u32) -> HostConn {
        let mut c = HostConn::open(addr, Digests::default());
        let cqe = c.connect(subnqn, hostnqn, 0, 31, CNTLID_DYNAMIC, kato_ms);
        assert!(cqe.status.is_success(), "admin connect failed: {cqe:?}");
        // CC: EN, IOSQES 6, IOCQES 4.
        assert!(c.prop_set(0x14, 1 | (6 << 16) | (4 << 20)).status.is_success());
        assert_eq!(c.prop_get(0x1C, false) & 1, 1, "CSTS.RDY");
        c
    }

    /// Admin command returning data.
    pub fn admin_read(&mut self, opcode: u8, nsid: u32, cdws: &[(usize, u32)], len: u32) -> Reply {
        let mut sqe = Sqe::new(opcode, self.cid());
        sqe.set_nsid(nsid);
        for &(n, v) in cdws {
            sqe.set_cdw(n, v);
        }
        sqe.set_sgl(SglDescriptor { address: 0, length: len, id: SGL_ID_TRANSPORT });
        self.exec(sqe, None, 0)
    }

    pub fn identify(&mut self, cns: u32, nsid: u32) -> Reply {
        self.admin_read(0x06, nsid, &[(10, cns)], 4096)
    }

    pub fn get_log(&mut self, lid: u8, nsid: u32, len: u32, offset: u64) -> Reply {
        let numd = len / 4 - 1;
        let cdw10 = u32::from(lid) | ((numd & 0xFFFF) << 16);
        self.admin_read(0x02, nsid, &[(10, cdw10), (11, numd >> 16), (12, offset as u32), (13, (offset >> 32) as u32)], len)
    }

    pub fn read(&mut self, nsid: u32, lba: u64, blocks: u32, bs: u32) -> Reply {
        let mut sqe = Sqe::new(0x02, self.cid());
        sqe.set_nsid(nsid).set_cdw(10, lba as u32).set_cdw(11, (lba >> 32) as u32).set_cdw(12, blocks - 1);
        sqe.set_sgl(SglDescriptor { address: 0, length: blocks * bs, id: SGL_ID_TRANSPORT });
        self.exec(sqe, None, 0)
    }

    pub fn write(&mut self, nsid: u32, lba: u64, data: &[u8], bs: u32, fua: bool) -> Reply {
        let mut sqe = Sqe::new(0x01, self.cid());
        let nlb = (data.len() as u32 / bs) - 1;
        sqe.set_nsid(nsid).set_cdw(10, lba as u32).set_cdw(11, (lba >> 32) as u32).set_cdw(12, nlb | if fua { 1 << 30 } else { 0 });
        self.exec(sqe, Some(data), 8192)
    }
}

/// Connects an admin queue and `n` I/O queues of one controller.
pub fn controller_with_io(addr: SocketAddr, digests: Digests) -> (HostConn, HostConn) {
    let admin = HostConn::admin(addr, SUBNQN, HOSTNQN, 0);
    let mut io = HostConn::open(addr, digests);
    let cqe = io.connect(SUBNQN, HOSTNQN, 1, 127, admin.cntlid, 0);
    assert!(cqe.status.is_success(), "I/O connect failed: {cqe:?}");
    (admin, io)
}

pub fn pattern(len: usize, seed: u32) -> Vec<u8> {
    let mut x = seed.wrapping_mul(2654435761).wrapping_add(1);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

/// User + system CPU time of process `pid`, in clock ticks (1/100 s).
pub fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name (which is in parentheses): utime and stime are 14 and 15.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

/// Resident set size of process `pid`, in KiB.
pub fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// A local cluster (`engines` × `targets` of `capacity`, heartbeat timeout `hb_timeout`) and a
/// managed `tessera-nvmf` following it: (cluster, target, its address, a runtime, a client).
pub fn managed_system(
    name: &str,
    targets: u16,
    capacity: &str,
    hb_timeout: &str,
) -> (tessera_testkit::LocalCluster, tessera_testkit::Daemon, SocketAddr, tokio::runtime::Runtime, tessera_mgmt_api::MgmtClient) {
    let cluster = tessera_testkit::LocalCluster::start(name, 3, targets, capacity, hb_timeout);
    let nvmf = tessera_testkit::Daemon::start(
        "tessera-nvmf",
        &["--mgmt", &cluster.mgmt.addr, "--listen", "127.0.0.1:0", "--threads", "2"],
        "listening",
        &cluster.dir.join("nvmf.log"),
    );
    let addr: SocketAddr = nvmf.addr.parse().unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let mgmt = cluster.client();
    (cluster, nvmf, addr, rt, mgmt)
}

/// How the async host (`tessera-nvmf-host`) reaches `subnqn` at `addr` as `hostnqn`.
pub fn host_opts(addr: SocketAddr, subnqn: &str, hostnqn: &str) -> tessera_nvmf_host::ControllerOptions {
    tessera_nvmf_host::ControllerOptions {
        addr,
        subnqn: subnqn.into(),
        hostnqn: hostnqn.into(),
        hostid: [7; 16],
        digests: Digests::default(),
        kato_ms: 0,
        disable_sqflow: false,
    }
}

/// Connects (retrying while the export has not reached the target yet) within `timeout`.
pub async fn connect_when_served(o: tessera_nvmf_host::ControllerOptions, timeout: Duration) -> tessera_nvmf_host::Controller {
    let start = Instant::now();
    loop {
        match tessera_nvmf_host::Controller::connect(o.clone(), 1).await {
            Ok(c) => return c,
            Err(e) => {
                assert!(start.elapsed() < timeout, "{} not served on {} after {timeout:?}: {e}", o.subnqn, o.addr);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// An EC_2P1 volume `name` of `size` bytes (4 KiB blocks) in pool `pool0`.
pub async fn create_volume(mgmt: &tessera_mgmt_api::MgmtClient, name: &str, size: u64) -> tessera_mgmt_api::VolumeInfo {
    let req = tessera_mgmt_api::CreateVolume {
        name: name.into(),
        size,
        block_size: Some(4096),
        class: Some("EC_2P1".into()),
        cell_size: None,
        chunk_size: None,
        checksum: None,
    };
    mgmt.create_volume("pool0", &req).await.unwrap()
}

/// Pool `pool0` over every engine and an EC_2P1 volume `vol0` of `size` bytes (4 KiB blocks).
pub async fn pool0_vol0(mgmt: &tessera_mgmt_api::MgmtClient, size: u64) -> tessera_mgmt_api::VolumeInfo {
    use tessera_mgmt_api::CreatePool;
    mgmt.create_pool(&CreatePool { name: "pool0".into(), ranks: Vec::new(), default_class: None }).await.unwrap();
    create_volume(mgmt, "vol0", size).await
}

/// `pool0/vol0` as namespace 1 of `nqn` on `listen` (and further `paths`: ANA multipath), any
/// host.
pub fn export_vol0(nqn: &str, listen: SocketAddr, paths: &[SocketAddr]) -> tessera_mgmt_api::CreateExport {
    tessera_mgmt_api::CreateExport {
        nqn: nqn.into(),
        nsid: Some(1),
        pool: "pool0".into(),
        volume: "vol0".into(),
        snapshot: None,
        hosts: Vec::new(),
        listen: Some(listen.to_string()),
        paths: paths.iter().map(ToString::to_string).collect(),
    }
}
