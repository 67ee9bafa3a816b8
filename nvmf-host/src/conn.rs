//! Connection setup and one-command-at-a-time execution: enough for Connect, properties, Identify
//! and other admin commands. I/O at depth uses [`crate::workload`].

use std::net::SocketAddr;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tessera_nvme_proto::fabrics::{ConnectCmd, ConnectData, PropertyCmd, CATTR_DISABLE_SQFLOW, CNTLID_DYNAMIC};
use tessera_nvme_proto::opcode::{admin, cns, fctype, FABRICS};
use tessera_nvme_proto::pdu::{self, DataPdu, IcReq};
use tessera_nvme_proto::reader::{u32_at, u64_at, u8_at};
use tessera_nvme_proto::sqe::{SglDescriptor, SGL_ID_INCAPSULE, SGL_ID_TRANSPORT};
use tessera_nvme_proto::{Cqe, Digests, Pdu, PduLimits, Sqe, Status};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Host-side failures.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    /// Socket failure.
    #[error("connection to {addr}: {source}")]
    Io {
        /// Target address.
        addr: SocketAddr,
        /// Cause.
        source: std::io::Error,
    },
    /// The target broke the protocol (or closed the connection).
    #[error("protocol error from {addr}: {what}")]
    Protocol {
        /// Target address.
        addr: SocketAddr,
        /// What happened.
        what: String,
    },
    /// A command completed with an error status.
    #[error("{what} failed: {status}")]
    Status {
        /// The command.
        what: &'static str,
        /// Its status.
        status: Status,
    },
    /// No answer in time.
    #[error("timed out waiting for {0}")]
    Timeout(&'static str),
    /// A verify mismatch or other data error.
    #[error("{0}")]
    Data(String),
}

/// A command's completion and any data the target returned.
#[derive(Debug)]
pub struct Reply {
    /// The completion.
    pub cqe: Cqe,
    /// C2H data.
    pub data: Vec<u8>,
}

/// How long a setup command may take.
const SETUP_TIMEOUT: Duration = Duration::from_secs(10);

/// One NVMe/TCP connection (one queue).
#[derive(Debug)]
pub struct Connection {
    pub(crate) stream: TcpStream,
    pub(crate) addr: SocketAddr,
    pub(crate) digests: Digests,
    pub(crate) maxh2cdata: u32,
    pub(crate) buf: BytesMut,
    next_cid: u16,
}

/// PDU size limits a host accepts from a target.
pub(crate) const HOST_LIMITS: PduLimits = PduLimits { max_capsule_data: 0, max_data_pdu: 16 << 20 };

impl Connection {
    /// Opens a TCP connection and exchanges ICReq/ICResp.
    pub async fn open(addr: SocketAddr, digests: Digests) -> Result<Connection, HostError> {
        let io = |source| HostError::Io { addr, source };
        let stream = TcpStream::connect(addr).await.map_err(io)?;
        stream.set_nodelay(true).map_err(io)?;
        let mut c =
            Connection { stream, addr, digests: Digests::default(), maxh2cdata: 0, buf: BytesMut::with_capacity(1 << 20), next_cid: 0 };
        c.send(&Pdu::IcReq(IcReq { pfv: 0, hpda: 0, digests, maxr2t: 0 })).await?;
        match c.recv().await? {
            Pdu::IcResp(r) if r.digests == digests && r.cpda == 0 => c.maxh2cdata = r.maxh2cdata,
            other => return Err(c.protocol(format!("expected ICResp echoing digests, got {other:?}"))),
        }
        c.digests = digests;
        Ok(c)
    }

    pub(crate) fn protocol(&self, what: String) -> HostError {
        HostError::Protocol { addr: self.addr, what }
    }

    async fn send(&mut self, p: &Pdu) -> Result<(), HostError> {
        let b = p.to_bytes(self.digests);
        self.stream.write_all(&b).await.map_err(|source| HostError::Io { addr: self.addr, source })
    }

    async fn recv(&mut self) -> Result<Pdu, HostError> {
        loop {
            match pdu::decode(&mut self.buf, self.digests, &HOST_LIMITS) {
                Ok(Some(p)) => return Ok(p),
                Ok(None) => {}
                Err(e) => return Err(self.protocol(e.to_string())),
            }
            self.buf.reserve(64 * 1024);
            let n = tokio::time::timeout(SETUP_TIMEOUT, self.stream.read_buf(&mut self.buf))
                .await
                .map_err(|_| HostError::Timeout("a response"))?
                .map_err(|source| HostError::Io { addr: self.addr, source })?;
            if n == 0 {
                return Err(self.protocol("connection closed".into()));
            }
        }
    }

    /// A fresh command identifier.
    pub fn cid(&mut self) -> u16 {
        self.next_cid = self.next_cid.wrapping_add(1);
        self.next_cid
    }

    /// Executes one command, sending `data` in the capsule if it fits `incapsule_max` and by
    /// R2T otherwise, and collects its completion and C2H data.
    pub async fn exec(&mut self, mut sqe: Sqe, data: Option<&[u8]>, incapsule_max: usize) -> Result<Reply, HostError> {
        let cid = sqe.cid();
        let mut capsule = Bytes::new();
        if let Some(d) = data {
            let id = if d.len() <= incapsule_max { SGL_ID_INCAPSULE } else { SGL_ID_TRANSPORT };
            sqe.set_sgl(SglDescriptor { address: 0, length: d.len() as u32, id });
            if id == SGL_ID_INCAPSULE {
                capsule = Bytes::copy_from_slice(d);
            }
        }
        self.send(&Pdu::CapsuleCmd { sqe, data: capsule }).await?;
        let mut got = Vec::new();
        loop {
            match self.recv().await? {
                Pdu::CapsuleResp(c) if c.cid == cid => return Ok(Reply { cqe: c, data: got }),
                Pdu::C2hData(d) if d.cccid == cid => {
                    got.extend_from_slice(&d.data);
                    if d.success {
                        return Ok(Reply { cqe: Cqe::new(cid, Status::SUCCESS), data: got });
                    }
                }
                Pdu::R2t(r) if r.cccid == cid => {
                    let all = data.ok_or_else(|| self.protocol("R2T for a command without data".into()))?;
                    let (start, end) = (r.r2to as usize, r.r2to as usize + r.r2tl as usize);
                    let mut off = start;
                    while off < end {
                        let n = (end - off).min(self.maxh2cdata as usize);
                        let chunk = all.get(off..off + n).ok_or_else(|| self.protocol("R2T beyond the data".into()))?;
                        let p = DataPdu {
                            cccid: cid,
                            ttag: r.ttag,
                            datao: off as u32,
                            data: Bytes::copy_from_slice(chunk),
                            last: off + n == end,
                            success: false,
                        };
                        self.send(&Pdu::H2cData(p)).await?;
                        off += n;
                    }
                }
                other => return Err(self.protocol(format!("unexpected {other:?}"))),
            }
        }
    }

    /// Executes a command that must succeed.
    pub async fn exec_ok(&mut self, what: &'static str, sqe: Sqe, data: Option<&[u8]>, incapsule_max: usize) -> Result<Reply, HostError> {
        let r = self.exec(sqe, data, incapsule_max).await?;
        if !r.cqe.status.is_success() {
            return Err(HostError::Status { what, status: r.cqe.status });
        }
        Ok(r)
    }

    /// Sends Connect for queue `qid` and returns the controller ID.
    pub async fn connect(&mut self, opts: &ControllerOptions, qid: u16, entries: u16, cntlid: u16) -> Result<u16, HostError> {
        let mut sqe = Sqe::new(FABRICS, self.cid());
        let cattr = if opts.disable_sqflow { CATTR_DISABLE_SQFLOW } else { 0 };
        let kato_ms = if qid == 0 { opts.kato_ms } else { 0 };
        ConnectCmd { recfmt: 0, qid, sqsize: entries - 1, cattr, kato_ms }.write_to(&mut sqe);
        let data = ConnectData { hostid: opts.hostid, cntlid, subnqn: opts.subnqn.clone(), hostnqn: opts.hostnqn.clone() }.encode();
        let r = self.exec_ok("Connect", sqe, Some(&data), 8192).await?;
        Ok(r.cqe.dw0 as u16)
    }

    async fn property(&mut self, set: bool, offset: u32, eight: bool, value: u64) -> Result<u64, HostError> {
        let mut sqe = Sqe::new(FABRICS, self.cid());
        PropertyCmd { eight_bytes: eight, offset, value }.write_to(&mut sqe, if set { fctype::PROPERTY_SET } else { fctype::PROPERTY_GET });
        let r = self.exec_ok(if set { "Property Set" } else { "Property Get" }, sqe, None, 0).await?;
        Ok(u64::from(r.cqe.dw0) | (u64::from(r.cqe.dw1) << 32))
    }

    /// An admin command returning `len` bytes.
    pub async fn admin_read(
        &mut self,
        what: &'static str,
        opcode: u8,
        nsid: u32,
        cdws: &[(usize, u32)],
        len: u32,
    ) -> Result<Vec<u8>, HostError> {
        let mut sqe = Sqe::new(opcode, self.cid());
        sqe.set_nsid(nsid);
        for &(n, v) in cdws {
            sqe.set_cdw(n, v);
        }
        sqe.set_sgl(SglDescriptor { address: 0, length: len, id: SGL_ID_TRANSPORT });
        Ok(self.exec_ok(what, sqe, None, 0).await?.data)
    }
}

/// How to reach and identify as a host to a subsystem.
#[derive(Debug, Clone)]
pub struct ControllerOptions {
    pub addr: SocketAddr,
    pub subnqn: String,
    pub hostnqn: String,
    pub hostid: [u8; 16],
    pub digests: Digests,
    pub kato_ms: u32,
    pub disable_sqflow: bool,
}

/// What Identify said about the controller and one namespace.
#[derive(Debug, Clone, Copy)]
pub struct Geometry {
    pub nsid: u32,
    pub block_size: u32,
    pub blocks: u64,
    /// Largest in-capsule data on I/O queues.
    pub incapsule: usize,
    /// Maximum transfer size in bytes (0 = unlimited).
    pub mdts_bytes: u64,
    /// Maximum I/O queue entries (CAP.MQES + 1).
    pub max_queue_entries: u32,
}

/// An enabled controller with its admin queue.
#[derive(Debug)]
pub struct Controller {
    pub opts: ControllerOptions,
    pub admin: Connection,
    pub cntlid: u16,
    pub geometry: Geometry,
}

impl Controller {
    /// Connects the admin queue, enables the controller and identifies namespace `nsid`.
    pub async fn connect(opts: ControllerOptions, nsid: u32) -> Result<Controller, HostError> {
        let mut admin = Connection::open(opts.addr, opts.digests).await?;
        let cntlid = admin.connect(&opts, 0, 32, CNTLID_DYNAMIC).await?;
        let cap = admin.property(false, 0x00, true, 0).await?;
        // CC: enable, 64-byte SQEs, 16-byte CQEs.
        admin.property(true, 0x14, false, 1 | (6 << 16) | (4 << 20)).await?;
        let deadline = tokio::time::Instant::now() + SETUP_TIMEOUT;
        while admin.property(false, 0x1C, false, 0).await? & 1 == 0 {
            if tokio::time::Instant::now() > deadline {
                return Err(HostError::Timeout("CSTS.RDY"));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let id = admin.admin_read("Identify Controller", admin::IDENTIFY, 0, &[(10, u32::from(cns::CONTROLLER))], 4096).await?;
        let ns = admin.admin_read("Identify Namespace", admin::IDENTIFY, nsid, &[(10, u32::from(cns::NAMESPACE))], 4096).await?;
        let blocks = u64_at(&ns, 0).unwrap_or(0);
        if blocks == 0 {
            return Err(HostError::Data(format!("namespace {nsid} is not active")));
        }
        let flbas = u8_at(&ns, 26).unwrap_or(0) & 0xF;
        let lbads = u8_at(&ns, 128 + 4 * usize::from(flbas) + 2).unwrap_or(9);
        let mdts = u8_at(&id, 77).unwrap_or(0);
        let ioccsz = u32_at(&id, 1792).unwrap_or(4);
        let geometry = Geometry {
            nsid,
            block_size: 1 << lbads,
            blocks,
            incapsule: (ioccsz as usize * 16).saturating_sub(64),
            mdts_bytes: if mdts == 0 { 0 } else { 4096u64 << mdts },
            max_queue_entries: (cap & 0xFFFF) as u32 + 1,
        };
        Ok(Controller { opts, admin, cntlid, geometry })
    }

    /// Asks for `n` I/O queues; returns how many the controller granted.
    pub async fn set_queue_count(&mut self, n: u16) -> Result<u16, HostError> {
        let mut sqe = Sqe::new(admin::SET_FEATURES, self.admin.cid());
        let v = u32::from(n - 1);
        sqe.set_cdw(10, 0x07).set_cdw(11, v | (v << 16));
        let r = self.admin.exec_ok("Set Features (Number of Queues)", sqe, None, 0).await?;
        Ok(((r.cqe.dw0 & 0xFFFF) as u16).min((r.cqe.dw0 >> 16) as u16) + 1)
    }

    /// Opens I/O queue `qid` with `entries` entries.
    pub async fn io_queue(&self, qid: u16, entries: u16) -> Result<Connection, HostError> {
        let mut c = Connection::open(self.opts.addr, self.opts.digests).await?;
        c.connect(&self.opts, qid, entries, self.cntlid).await?;
        Ok(c)
    }

    /// Sends Keep Alive.
    pub async fn keep_alive(&mut self) -> Result<(), HostError> {
        let sqe = Sqe::new(admin::KEEP_ALIVE, self.admin.cid());
        self.admin.exec_ok("Keep Alive", sqe, None, 0).await.map(|_| ())
    }
}
