//! The tokio side of the target: listeners and one task per TCP connection. This module only moves bytes and futures; protocol decisions are made by
//! [`Queue`], [`connect`], [`Controller`] and [`io`].
//!
//! A connection task owns its socket and its [`Queue`] and selects over: bytes from the socket,
//! the socket becoming writable while output is pending, completions of commands in flight (bdev
//! futures in [`Inflight`] slots, many at once), asynchronous events for held AERs (admin queue),
//! the keep-alive deadline (admin queue) and its controller's teardown.
//!
//! One pass of the loop reads everything the socket has, decodes every whole PDU, starts the
//! commands (a bdev that completes without waiting answers in the same pass) and then writes all
//! pending output with one non-blocking `writev`; what the socket does not take waits in the
//! queue's [`Outbox`] for writability. No second task, no channel, no per-I/O allocation: at
//! queue depth 32 one `recv` and one `writev` serve many commands. Reading never waits on
//! writing, and a host that stops reading stalls only its own connection
//! ([`OUTBOUND_BUDGET`]).

use std::io::IoSlice;
use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use tessera_bdev::{BlockDevice, WriteData};
use tessera_mgmt_api::MgmtClient;
use tessera_nvme_proto::fabrics::ConnectCmd;
use tessera_nvme_proto::opcode::{self, fctype};
use tessera_nvme_proto::{Cqe, Sqe, Status};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::connect;
use crate::controller::{AdminOutcome, Controller};
use crate::inflight::Inflight;
use crate::io::{self, DataPlan, IoOp};
use crate::outbox::Outbox;
use crate::poll::{Polled, Poller};
use crate::queue::{Event, Queue, QueueParams};
use crate::resv;
use crate::target::{self, Namespace, Subsystem, Target};

/// How long a new connection may take to complete ICReq and Connect.
pub const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Accepts connections on `listener` until `shutdown` is cancelled.
pub async fn serve(listener: TcpListener, target: Arc<Target>, shutdown: CancellationToken) {
    loop {
        tokio::select! {
            r = listener.accept() => match r {
                Ok((stream, peer)) => {
                    let target = target.clone();
                    let shutdown = shutdown.clone();
                    tokio::spawn(async move { Connection::run(stream, peer, target, shutdown).await });
                }
                Err(e) => {
                    warn!("accept failed: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            },
            _ = shutdown.cancelled() => return,
        }
    }
}

/// What a command waiting for its data will do once the data is here.
#[derive(Debug)]
enum Pending {
    Connect,
    Io { ns: Arc<Namespace>, op: IoOp },
    Reservation,
}

/// One unit of asynchronous work and its completion.
enum Work {
    Io { ns: Arc<Namespace>, op: IoOp, data: WriteData },
    FlushAll { subsys: Arc<Subsystem> },
    Shutdown { ctrl: Arc<Controller> },
    Reservation { ctrl: Arc<Controller>, mgmt: Option<MgmtClient>, sqe: Sqe, data: Bytes },
}

struct Done {
    cid: u16,
    status: Status,
    data: Option<Bytes>,
    nsid: u32,
    lba: u64,
}

async fn flush_all(subsys: &Subsystem) -> Result<(), Status> {
    for ns in subsys.namespaces() {
        ns.bdev.flush().await.map_err(|e| io::bdev_status(&e, false))?;
    }
    Ok(())
}

async fn execute(cid: u16, work: Work) -> Done {
    let mut done = Done { cid, status: Status::SUCCESS, data: None, nsid: 0, lba: 0 };
    let r: Result<Option<Bytes>, Status> = match work {
        Work::Io { ns, op, data } => {
            done.nsid = ns.nsid;
            done.lba = op.lba();
            execute_io(&ns, op, data).await
        }
        Work::FlushAll { subsys } => flush_all(&subsys).await.map(|_| None),
        Work::Shutdown { ctrl } => {
            let r = flush_all(&ctrl.subsys).await;
            ctrl.shutdown_complete();
            r.map(|_| None)
        }
        Work::Reservation { ctrl, mgmt, sqe, data } => {
            done.nsid = sqe.nsid();
            let s = resv::execute(&ctrl.subsys, mgmt.as_ref(), ctrl.hostid, sqe.nsid(), sqe.opcode(), sqe.cdw10(), &data).await;
            if s.is_success() {
                Ok(None)
            } else {
                Err(s)
            }
        }
    };
    match r {
        Ok(d) => done.data = d,
        Err(s) => done.status = s,
    }
    done
}

async fn execute_io(ns: &Namespace, op: IoOp, data: WriteData) -> Result<Option<Bytes>, Status> {
    let c = &ns.counters;
    let bdev = &ns.bdev;
    match op {
        IoOp::Read { lba, blocks } => {
            let d = bdev.read(lba, blocks).await.map_err(|e| {
                let s = io::bdev_status(&e, true);
                // SMART counts data integrity errors, not "engines unreachable".
                if s.sct() == tessera_nvme_proto::status::sct::MEDIA {
                    c.media_errors.fetch_add(1, Relaxed);
                }
                s
            })?;
            c.bytes_read.fetch_add(d.len() as u64, Relaxed);
            c.read_commands.fetch_add(1, Relaxed);
            Ok(Some(d))
        }
        IoOp::Write { lba, fua, .. } => {
            let len = tessera_bdev::data_len(&data) as u64;
            bdev.write(lba, data, fua).await.map_err(|e| io::bdev_status(&e, false))?;
            c.bytes_written.fetch_add(len, Relaxed);
            c.write_commands.fetch_add(1, Relaxed);
            Ok(None)
        }
        IoOp::Flush { .. } => bdev.flush().await.map(|_| None).map_err(|e| io::bdev_status(&e, false)),
        IoOp::WriteZeroes { lba, blocks, deallocate, fua } => {
            let r = if deallocate { bdev.unmap(lba, blocks).await } else { bdev.write_zeroes(lba, blocks).await };
            r.map_err(|e| io::bdev_status(&e, false))?;
            if fua {
                bdev.flush().await.map_err(|e| io::bdev_status(&e, false))?;
            }
            c.write_commands.fetch_add(1, Relaxed);
            Ok(None)
        }
        IoOp::DatasetManagement { ranges, deallocate } => {
            let list = io::dsm_ranges(&data, ranges, ns)?;
            if deallocate {
                for (lba, blocks) in list {
                    bdev.unmap(lba, blocks).await.map_err(|e| io::bdev_status(&e, false))?;
                }
            }
            Ok(None)
        }
    }
}

/// Bytes of responses a connection may have pending. Past this, the connection stops reading
/// commands until the host has taken some: a host that stops reading its responses stalls its own
/// connection instead of making the target buffer without bound (what is pending then is this
/// plus at most the commands already in flight, each no larger than MDTS).
pub const OUTBOUND_BUDGET: usize = 8 << 20;

/// How long a closing connection may take to send its last responses (e.g. a C2HTermReq).
const CLOSE_FLUSH_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// A connection that is never idle still notices target shutdown and controller teardown
/// within this many passes of its loop.
const CANCEL_CHECK_PASSES: u32 = 32;

/// Read buffer size, and the free room below which it is topped up again.
const READ_BUF: usize = 256 * 1024;
const READ_MIN_ROOM: usize = 64 * 1024;

/// Writes as much of `out` as the socket takes without waiting, each call one `writev` of
/// everything pending (PDU headers and read data together, nothing copied). `Ok` also when the
/// socket is full: the rest stays in `out` until it is writable again.
fn flush(stream: &TcpStream, out: &mut Outbox) -> std::io::Result<()> {
    const MAX_IOV: usize = 64;
    while !out.is_empty() {
        let written = {
            let mut iov = [IoSlice::new(&[]); MAX_IOV];
            let n = out.io_slices(&mut iov);
            stream.try_write_vectored(iov.get(..n).unwrap_or_default())
        };
        match written {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => out.consume(n),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(()),
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Sends whatever is still pending on a closing connection (bounded in time), then shuts the
/// socket down.
async fn close_stream(mut stream: TcpStream, out: &mut Outbox) {
    let drained = tokio::time::timeout(CLOSE_FLUSH_TIMEOUT, async {
        while !out.is_empty() {
            stream.writable().await?;
            flush(&stream, out)?;
        }
        Ok::<(), std::io::Error>(())
    });
    let _ = drained.await;
    let _ = stream.shutdown().await;
}

/// What one pass of the connection loop was woken by, beyond the work it did.
enum Wake {
    Continue,
    Stop(&'static str),
}

struct Connection {
    target: Arc<Target>,
    peer: SocketAddr,
    local: SocketAddr,
    queue: Queue<Pending>,
    ctrl: Option<Arc<Controller>>,
    qid: u16,
    /// Work to start: moved into the in-flight set by the connection loop, which owns it so that
    /// every future there has the one concrete type of [`execute`] and needs no boxing.
    to_start: Vec<(u16, Work)>,
    /// Set by Disconnect: close once the reply is out.
    closing: bool,
}

impl Connection {
    async fn run(mut stream: TcpStream, peer: SocketAddr, target: Arc<Target>, shutdown: CancellationToken) {
        let _ = stream.set_nodelay(true);
        let local = stream.local_addr().unwrap_or(peer);
        let params = QueueParams {
            max_capsule_data: target::INCAPSULE_DATA,
            maxh2cdata: target::MAXH2CDATA,
            initial_depth: target::ADMIN_QUEUE_MAX,
        };
        let mut c = Connection { target, peer, local, queue: Queue::new(params), ctrl: None, qid: 0, to_start: Vec::new(), closing: false };
        debug!(%peer, "connection accepted");
        let mut buf = BytesMut::with_capacity(READ_BUF);
        let mut events = Vec::new();
        let mut inflight = Inflight::new();
        let mut done = Vec::new();
        // A connection that has not completed Connect by then is dropped: it holds resources
        // without being a queue.
        let connect_deadline = tokio::time::Instant::now() + CONNECT_TIMEOUT;
        // The controller once connected, and its teardown token (cloned once, not per pass).
        let mut ctrl: Option<Arc<Controller>> = None;
        let mut cancel = CancellationToken::new();
        let mut passes = 0u32;
        // Reads go through `AsyncRead`: a short read clears the socket's readiness, so no
        // `recv` is made only to learn that it would block. Writes are non-blocking `writev`s
        // on the same socket (`wr.as_ref()`).
        let mut poller = Poller::new(&stream, c.target.poll);
        let mut worked = false;
        let (mut rd, wr) = stream.split();
        let reason = loop {
            passes = passes.wrapping_add(1);
            if passes.is_multiple_of(CANCEL_CHECK_PASSES) {
                if shutdown.is_cancelled() {
                    break "target shutting down";
                }
                if cancel.is_cancelled() {
                    break "controller torn down";
                }
            }
            if flush(wr.as_ref(), c.queue.outbox()).is_err() {
                break "write error";
            }
            if c.queue.is_closed() {
                break "host terminated the connection";
            }
            if c.closing && c.queue.outbox().is_empty() {
                break "host disconnected";
            }
            if ctrl.is_none() {
                if let Some(x) = &c.ctrl {
                    cancel = x.cancel.clone();
                    ctrl = Some(x.clone());
                }
            }
            let pending_out = c.queue.outbox().len();
            let admin = ctrl.as_ref().filter(|_| c.qid == 0);
            let keepalive = admin.and_then(|x| x.keepalive_deadline());
            let read_more = pending_out < OUTBOUND_BUDGET && !c.closing;
            if read_more && buf.capacity() - buf.len() < READ_MIN_ROOM {
                buf.reserve(READ_BUF);
            }
            // The polling window runs from the end of the last pass that received commands or
            // completed some (its answers are out by now).
            if std::mem::take(&mut worked) {
                poller.active();
            }
            // Just active, nothing in flight or unsent: look at the socket again before sleeping.
            let polled = if read_more && pending_out == 0 && inflight.running() == 0 && poller.hot() {
                poller.poll(&mut buf).await
            } else {
                Polled::Quiet
            };
            let wake = match polled {
                Polled::Read(r) => {
                    worked = true;
                    c.on_read(r, &mut buf, &mut events)
                }
                Polled::Quiet => tokio::select! {
                    biased;
                    () = inflight.next(&mut done), if inflight.running() > 0 => {
                        worked = true;
                        for d in done.drain(..) {
                            c.on_done(d);
                        }
                        Wake::Continue
                    }
                    r = wr.as_ref().writable(), if pending_out > 0 => match r {
                        Ok(()) => Wake::Continue,
                        Err(_) => Wake::Stop("write error"),
                    },
                    r = rd.read_buf(&mut buf), if read_more => {
                        worked = true;
                        c.on_read(r, &mut buf, &mut events)
                    }
                    _ = async { if let Some(x) = admin { x.aen.notified().await } }, if admin.is_some() => {
                        c.on_async_events();
                        Wake::Continue
                    }
                    _ = async { if let Some(d) = keepalive { tokio::time::sleep_until(d.into()).await } }, if keepalive.is_some() => {
                        match &ctrl {
                            Some(x) if x.keepalive_deadline().is_some_and(|d| d <= std::time::Instant::now()) => {
                                x.shut_down("keep alive timeout expired");
                                Wake::Stop("keep alive timeout")
                            }
                            _ => Wake::Continue,
                        }
                    }
                    _ = async { tokio::time::sleep_until(connect_deadline).await }, if c.ctrl.is_none() => {
                        Wake::Stop("no Connect within the connect timeout")
                    }
                    // Polled only when nothing above is ready (each poll takes two locks); a busy
                    // connection checks them every CANCEL_CHECK_PASSES passes instead.
                    _ = shutdown.cancelled() => Wake::Stop("target shutting down"),
                    _ = cancel.cancelled() => Wake::Stop("controller torn down"),
                },
            };
            if let Wake::Stop(reason) = wake {
                break reason;
            }
            // Start what this pass accepted; what completes at once is answered in this pass.
            let mut starting = std::mem::take(&mut c.to_start);
            for (cid, work) in starting.drain(..) {
                if let Some(d) = inflight.start_with(|| execute(cid, work)) {
                    c.on_done(d);
                }
            }
            c.to_start = starting;
        };
        debug!(peer = %c.peer, qid = c.qid, "connection closed: {reason}");
        c.close();
        drop(inflight);
        close_stream(stream, c.queue.outbox()).await;
    }

    /// Acts on every whole PDU in `buf` after a read of the socket into it (`read`: its result).
    fn on_read(&mut self, read: std::io::Result<usize>, buf: &mut BytesMut, events: &mut Vec<Event<Pending>>) -> Wake {
        match read {
            Ok(0) => return Wake::Stop("host closed the connection"),
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Wake::Continue,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return Wake::Stop("connection reset"),
            Err(_) => return Wake::Stop("read error"),
        }
        if let Err(e) = self.queue.receive(buf, events) {
            warn!(peer = %self.peer, fes = e.fes(), fei = e.fei(), "terminating connection: {e}");
            self.queue.terminate(&e);
            return Wake::Stop("protocol error");
        }
        for ev in events.drain(..) {
            self.on_event(ev);
        }
        Wake::Continue
    }

    /// Completes the Asynchronous Event Requests that events are waiting for.
    fn on_async_events(&mut self) {
        let Some(x) = self.ctrl.clone() else { return };
        for (cid, dw0) in x.take_event_completions() {
            let mut cqe = Cqe::new(cid, Status::SUCCESS);
            cqe.dw0 = dw0;
            self.queue.complete(cid, cqe, None);
        }
    }

    fn close(&mut self) {
        if let Some(ctrl) = self.ctrl.take() {
            if self.qid == 0 {
                ctrl.shut_down("admin queue closed");
            } else {
                ctrl.remove_io_queue(self.qid);
            }
        }
    }

    fn fail(&mut self, sqe: &Sqe, status: Status) {
        if let Some(ctrl) = &self.ctrl {
            ctrl.record_error(self.qid, sqe.cid(), status, sqe.nsid(), 0);
        }
        self.queue.fail(sqe.cid(), status);
    }

    fn on_event(&mut self, ev: Event<Pending>) {
        match ev {
            Event::Command { sqe, incapsule } => self.on_command(sqe, incapsule),
            Event::DataReady { sqe, payload, data } => match payload {
                Pending::Connect => {
                    self.on_connect(&sqe, &io::concat(&data));
                }
                Pending::Io { ns, op } => self.start(sqe.cid(), Work::Io { ns, op, data: data.into() }),
                Pending::Reservation => self.start_reservation(sqe, Bytes::from(io::concat(&data))),
            },
            Event::HostTerminated { fes } => {
                warn!(peer = %self.peer, fes, "host terminated the connection")
            }
            Event::Abandoned { cid } => {
                debug!(peer = %self.peer, cid, "the host reused the CID of a held Asynchronous Event Request: request dropped");
                if let Some(ctrl) = &self.ctrl {
                    ctrl.forget_aer(cid);
                }
            }
        }
    }

    fn start(&mut self, cid: u16, work: Work) {
        self.to_start.push((cid, work));
    }

    fn on_done(&mut self, d: Done) {
        if !d.status.is_success() {
            if let Some(ctrl) = &self.ctrl {
                ctrl.record_error(self.qid, d.cid, d.status, d.nsid, d.lba);
            }
        }
        self.queue.complete(d.cid, Cqe::new(d.cid, d.status), d.data);
    }

    fn on_command(&mut self, sqe: Sqe, incapsule: Bytes) {
        let plan = match io::plan_transfer(&sqe, incapsule.len(), target::MDTS_BYTES) {
            Ok(p) => p,
            Err(s) => {
                if sqe.opcode() == opcode::FABRICS && sqe.fctype() == fctype::CONNECT {
                    self.log_connect_refused(s, "the data pointer (SGL) does not describe the 1024-byte Connect data");
                }
                return self.fail(&sqe, s);
            }
        };
        if sqe.opcode() == opcode::FABRICS {
            return self.on_fabrics(sqe, incapsule, plan);
        }
        let Some(ctrl) = self.ctrl.clone() else {
            return self.fail(&sqe, Status::COMMAND_SEQUENCE_ERROR);
        };
        if self.qid == 0 {
            let sgl_len = if let DataPlan::ToHost(n) = plan { n } else { 0 };
            let outcome = ctrl.admin(&self.target, &sqe, sgl_len, self.local);
            return self.on_admin_outcome(&sqe, outcome);
        }
        let ns = ctrl.subsys.namespace(sqe.nsid());
        if resv::is_reservation(sqe.opcode()) {
            return self.on_reservation(&ctrl, sqe, incapsule, plan, ns.is_some());
        }
        let op = match io::validate_io(&sqe, ns.as_deref(), plan, target::MDTS_BYTES) {
            Ok(op) => op,
            Err(s) => return self.fail(&sqe, s),
        };
        // A path that may not serve I/O now says so with a path status: the host retries the
        // command on another path.
        if let Some(s) = ctrl.subsys.ana.io_status() {
            return self.fail(&sqe, s);
        }
        if let (Some(write), Some(ns)) = (op.access(), &ns) {
            if !ctrl.subsys.resv.may_access(ns.nsid, &ctrl.hostid, write) {
                return self.fail(&sqe, tessera_nvme_resv::RESERVATION_CONFLICT);
            }
        }
        let cid = sqe.cid();
        match (op, ns) {
            (IoOp::Flush { all: true }, _) => self.start(cid, Work::FlushAll { subsys: ctrl.subsys.clone() }),
            (op, Some(ns)) => match plan {
                DataPlan::FromHost(len) => self.queue.request_data(sqe, len, Pending::Io { ns, op }),
                DataPlan::InCapsule(_) => self.start(cid, Work::Io { ns, op, data: incapsule.into() }),
                _ => self.start(cid, Work::Io { ns, op, data: WriteData::empty() }),
            },
            (_, None) => self.fail(&sqe, Status::INVALID_NAMESPACE),
        }
    }

    /// A Reservation Register, Acquire or Release (carried out by whoever keeps the reservation,
    /// asynchronously) or Report (answered from what this target knows).
    fn on_reservation(&mut self, ctrl: &Arc<Controller>, sqe: Sqe, incapsule: Bytes, plan: DataPlan, active: bool) {
        if !active {
            return self.fail(&sqe, Status::INVALID_NAMESPACE);
        }
        if let Some(s) = ctrl.subsys.ana.io_status() {
            return self.fail(&sqe, s);
        }
        let op = sqe.opcode();
        let Some(want) = tessera_nvme_resv::data_len(op) else {
            // Report: NUMD (CDW10, 0's based) dwords to the host.
            let len = (u64::from(sqe.cdw10()) + 1) * 4;
            return match plan {
                DataPlan::ToHost(n) if u64::from(n) == len => match resv::report(&ctrl.subsys, sqe.nsid(), sqe.cdw11(), n as usize) {
                    Ok(data) => self.queue.complete(sqe.cid(), Cqe::new(sqe.cid(), Status::SUCCESS), Some(data)),
                    Err(s) => self.fail(&sqe, s),
                },
                _ => self.fail(&sqe, Status::DATA_SGL_LENGTH_INVALID),
            };
        };
        match plan {
            DataPlan::InCapsule(n) if n as usize == want => self.start_reservation(sqe, incapsule),
            DataPlan::FromHost(n) if n as usize == want => self.queue.request_data(sqe, n, Pending::Reservation),
            _ => self.fail(&sqe, Status::DATA_SGL_LENGTH_INVALID),
        }
    }

    fn start_reservation(&mut self, sqe: Sqe, data: Bytes) {
        if let Some(ctrl) = self.ctrl.clone() {
            let mgmt = self.target.mgmt().cloned();
            self.start(sqe.cid(), Work::Reservation { ctrl, mgmt, sqe, data });
        }
    }

    fn on_admin_outcome(&mut self, sqe: &Sqe, outcome: AdminOutcome) {
        match outcome {
            AdminOutcome::Reply { status, dw0, dw1, data } => {
                if !status.is_success() {
                    if let Some(ctrl) = &self.ctrl {
                        ctrl.record_error(self.qid, sqe.cid(), status, sqe.nsid(), 0);
                    }
                }
                let mut cqe = Cqe::new(sqe.cid(), status);
                cqe.dw0 = dw0;
                cqe.dw1 = dw1;
                self.queue.complete(sqe.cid(), cqe, data);
            }
            AdminOutcome::Held => self.queue.hold(sqe.cid()),
            AdminOutcome::Shutdown => {
                if let Some(ctrl) = self.ctrl.clone() {
                    self.start(sqe.cid(), Work::Shutdown { ctrl });
                }
            }
        }
    }

    fn on_fabrics(&mut self, sqe: Sqe, incapsule: Bytes, plan: DataPlan) {
        match (sqe.fctype(), self.ctrl.clone()) {
            (fctype::CONNECT, None) => match plan {
                DataPlan::InCapsule(_) => self.on_connect(&sqe, &incapsule),
                DataPlan::FromHost(len) => self.queue.request_data(sqe, len, Pending::Connect),
                _ => {
                    self.log_connect_refused(Status::DATA_SGL_LENGTH_INVALID, "Connect without data");
                    self.fail(&sqe, Status::DATA_SGL_LENGTH_INVALID)
                }
            },
            (fctype::CONNECT, Some(_)) => {
                self.log_connect_refused(Status::COMMAND_SEQUENCE_ERROR, "the queue is already connected");
                self.fail(&sqe, Status::COMMAND_SEQUENCE_ERROR)
            }
            (_, None) => self.fail(&sqe, Status::COMMAND_SEQUENCE_ERROR),
            (fctype::PROPERTY_GET | fctype::PROPERTY_SET, Some(ctrl)) if self.qid == 0 => {
                let set = sqe.fctype() == fctype::PROPERTY_SET;
                let outcome = ctrl.property(&sqe, set, &self.target.limits);
                if set {
                    // A controller reset (CC.EN 1 -> 0) drops the held AERs without completions.
                    self.queue.release_held(|cid| ctrl.holds_aer(cid));
                }
                self.on_admin_outcome(&sqe, outcome);
            }
            (fctype::DISCONNECT, Some(_)) => {
                self.queue.complete(sqe.cid(), Cqe::new(sqe.cid(), Status::SUCCESS), None);
                self.closing = true;
            }
            _ => self.fail(&sqe, Status::INVALID_OPCODE),
        }
    }

    fn on_connect(&mut self, sqe: &Sqe, data: &[u8]) {
        match connect::connect(&self.target, sqe, data) {
            Ok(acc) => {
                self.qid = acc.qid;
                self.queue.on_connected(acc.qid, acc.entries, acc.sqflow_disabled);
                let mut cqe = Cqe::new(sqe.cid(), Status::SUCCESS);
                cqe.dw0 = u32::from(acc.ctrl.cntlid);
                if acc.qid != 0 {
                    info!(peer = %self.peer, cntlid = acc.ctrl.cntlid, qid = acc.qid, entries = acc.entries, "I/O queue connected");
                }
                self.ctrl = Some(acc.ctrl);
                self.queue.complete(sqe.cid(), cqe, None);
            }
            Err(rej) => {
                let cmd = ConnectCmd::from_sqe(sqe);
                warn!(
                    peer = %self.peer,
                    qid = cmd.qid,
                    status = %rej.status,
                    dw0 = format_args!("{:#x}", rej.dw0),
                    "Connect refused: {}",
                    rej.reason
                );
                self.queue.complete(sqe.cid(), rej.cqe(sqe.cid()), None);
            }
        }
    }

    /// Logs a Connect refused before [`connect::connect`] could look at it.
    fn log_connect_refused(&self, status: Status, reason: &str) {
        warn!(peer = %self.peer, status = %status, "Connect refused: {reason}");
    }
}
