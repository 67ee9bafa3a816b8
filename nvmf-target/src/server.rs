//! The tokio side of the target: listeners, one task per TCP connection, and a writer task per
//! connection. This module only moves bytes and futures; protocol decisions are made by
//! [`Queue`], [`connect`], [`Controller`] and [`io`].
//!
//! A connection task owns its [`Queue`] and selects over: bytes from the socket, completions of
//! commands in flight (bdev futures, many at once), asynchronous events for held AERs (admin
//! queue), the keep-alive deadline (admin queue) and its controller's teardown. Output goes to
//! the writer task through a channel, so reading never waits on writing.

use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use std::collections::VecDeque;
use std::io::IoSlice;

use bytes::{Buf, Bytes, BytesMut};
use futures::stream::{FuturesUnordered, StreamExt};
use tessera_bdev::{BlockDevice, WriteData};
use tessera_nvme_proto::opcode::{self, fctype};
use tessera_nvme_proto::{Cqe, Sqe, Status};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::connect;
use crate::controller::{AdminOutcome, Controller};
use crate::io::{self, DataPlan, IoOp};
use crate::queue::{Event, Queue, QueueParams};
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
}

/// One unit of asynchronous work and its completion.
enum Work {
    Io { ns: Arc<Namespace>, op: IoOp, data: WriteData },
    FlushAll { subsys: Arc<Subsystem> },
    Shutdown { ctrl: Arc<Controller> },
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
                c.media_errors.fetch_add(1, Relaxed);
                io::bdev_status(&e, true)
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

/// Bytes of responses a connection may have queued for its writer. A host that stops reading
/// stalls its own connection at this point instead of making the target buffer without bound.
pub const OUTBOUND_BUDGET: usize = 8 << 20;

/// The sending side of a connection's writer: chunks plus a byte budget released as they are
/// written.
struct Outbound {
    tx: mpsc::UnboundedSender<Vec<Bytes>>,
    budget: Arc<Semaphore>,
}

impl Outbound {
    /// Queues `chunks` for the writer, first waiting until the writer has caught up enough.
    async fn send(&self, chunks: Vec<Bytes>) -> Result<(), ()> {
        let n = chunk_bytes(&chunks).min(OUTBOUND_BUDGET) as u32;
        let permit = self.budget.acquire_many(n).await.map_err(|_| ())?;
        permit.forget();
        self.tx.send(chunks).map_err(|_| ())
    }
}

fn chunk_bytes(chunks: &[Bytes]) -> usize {
    chunks.iter().map(Bytes::len).sum()
}

/// Writes `chunks` with as few `writev` calls as the socket allows: PDU headers and data go out
/// together without being copied into one buffer.
async fn write_chunks(wr: &mut OwnedWriteHalf, chunks: &mut VecDeque<Bytes>) -> std::io::Result<()> {
    const MAX_IOV: usize = 64;
    while !chunks.is_empty() {
        let mut iov = [IoSlice::new(&[]); MAX_IOV];
        let mut count = 0;
        for (slot, c) in iov.iter_mut().zip(chunks.iter()) {
            *slot = IoSlice::new(c);
            count += 1;
        }
        let mut n = wr.write_vectored(iov.get(..count).unwrap_or_default()).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        while n > 0 {
            let Some(front) = chunks.front_mut() else { break };
            if front.len() <= n {
                n -= front.len();
                chunks.pop_front();
            } else {
                front.advance(n);
                n = 0;
            }
        }
    }
    Ok(())
}

/// Writes every chunk sent on `rx`, batching whatever has queued up, then shuts the socket down.
async fn writer(mut wr: OwnedWriteHalf, mut rx: mpsc::UnboundedReceiver<Vec<Bytes>>, budget: Arc<Semaphore>) {
    let mut pending = VecDeque::new();
    while let Some(first) = rx.recv().await {
        // Budget to give back once this batch is written: what each message's sender took.
        let mut release = chunk_bytes(&first).min(OUTBOUND_BUDGET);
        pending.extend(first);
        while let Ok(more) = rx.try_recv() {
            release += chunk_bytes(&more).min(OUTBOUND_BUDGET);
            pending.extend(more);
        }
        if write_chunks(&mut wr, &mut pending).await.is_err() {
            break;
        }
        budget.add_permits(release);
    }
    // Unblock a sender waiting for budget that can no longer be written.
    budget.close();
    let _ = wr.shutdown().await;
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
    async fn run(stream: TcpStream, peer: SocketAddr, target: Arc<Target>, shutdown: CancellationToken) {
        let _ = stream.set_nodelay(true);
        let local = stream.local_addr().unwrap_or(peer);
        let (mut rd, wr) = stream.into_split();
        let (tx, rx) = mpsc::unbounded_channel();
        let budget = Arc::new(Semaphore::new(OUTBOUND_BUDGET));
        let writer = tokio::spawn(writer(wr, rx, budget.clone()));
        let tx = Outbound { tx, budget };
        let params = QueueParams {
            max_capsule_data: target::INCAPSULE_DATA,
            maxh2cdata: target::MAXH2CDATA,
            initial_depth: target::ADMIN_QUEUE_MAX,
        };
        let mut c = Connection { target, peer, local, queue: Queue::new(params), ctrl: None, qid: 0, to_start: Vec::new(), closing: false };
        debug!(%peer, "connection accepted");
        let mut buf = BytesMut::with_capacity(256 * 1024);
        let mut events = Vec::new();
        let mut inflight = FuturesUnordered::new();
        // A connection that has not completed Connect by then is dropped: it holds resources
        // without being a queue.
        let connect_deadline = tokio::time::Instant::now() + CONNECT_TIMEOUT;
        let reason = loop {
            let cancel = c.ctrl.as_ref().map(|x| x.cancel.clone());
            let ctrl = c.ctrl.clone();
            let deadline = ctrl.as_ref().filter(|_| c.qid == 0).and_then(|x| x.keepalive_deadline());
            tokio::select! {
                r = rd.read_buf(&mut buf) => match r {
                    Ok(0) => break "host closed the connection",
                    Ok(_) => {
                        if let Err(e) = c.queue.receive(&mut buf, &mut events) {
                            warn!(peer = %c.peer, fes = e.fes(), fei = e.fei(), "terminating connection: {e}");
                            c.queue.terminate(&e);
                            let _ = tx.send(c.queue.take_output()).await;
                            break "protocol error";
                        }
                        for ev in events.drain(..) {
                            c.on_event(ev);
                        }
                        if buf.capacity() - buf.len() < 64 * 1024 {
                            buf.reserve(256 * 1024);
                        }
                    }
                    Err(e) => break if e.kind() == std::io::ErrorKind::ConnectionReset { "connection reset" } else { "read error" },
                },
                Some(done) = inflight.next(), if !inflight.is_empty() => c.on_done(done),
                _ = async { if let Some(x) = &ctrl { x.aen.notified().await } }, if c.qid == 0 && ctrl.is_some() => {
                    if let Some(x) = &ctrl {
                        for (cid, dw0) in x.take_event_completions() {
                            let mut cqe = Cqe::new(cid, Status::SUCCESS);
                            cqe.dw0 = dw0;
                            c.queue.complete(cid, cqe, None);
                        }
                    }
                }
                _ = tokio::time::sleep_until(deadline.map(tokio::time::Instant::from_std).unwrap_or_else(tokio::time::Instant::now)), if deadline.is_some() => {
                    if let Some(x) = &ctrl {
                        if x.keepalive_deadline().is_some_and(|d| d <= std::time::Instant::now()) {
                            x.shut_down("keep alive timeout expired");
                            break "keep alive timeout";
                        }
                    }
                }
                _ = async { if let Some(t) = &cancel { t.cancelled().await } }, if cancel.is_some() => break "controller torn down",
                _ = tokio::time::sleep_until(connect_deadline), if c.ctrl.is_none() => break "no Connect within the connect timeout",
                _ = shutdown.cancelled() => break "target shutting down",
            }
            for (cid, work) in c.to_start.drain(..) {
                inflight.push(execute(cid, work));
            }
            let out = c.queue.take_output();
            if !out.is_empty() && tx.send(out).await.is_err() {
                break "write error";
            }
            if c.queue.is_closed() {
                break "host terminated the connection";
            }
            if c.closing {
                break "host disconnected";
            }
        };
        debug!(peer = %c.peer, qid = c.qid, "connection closed: {reason}");
        c.close();
        drop(tx);
        let _ = writer.await;
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
                Pending::Io { ns, op } => self.start(sqe.cid(), Work::Io { ns, op, data }),
            },
            Event::HostTerminated { fes } => {
                warn!(peer = %self.peer, fes, "host terminated the connection")
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
            Err(s) => return self.fail(&sqe, s),
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
        let op = match io::validate_io(&sqe, ns.as_deref(), plan, target::MDTS_BYTES) {
            Ok(op) => op,
            Err(s) => return self.fail(&sqe, s),
        };
        let cid = sqe.cid();
        match (op, ns) {
            (IoOp::Flush { all: true }, _) => self.start(cid, Work::FlushAll { subsys: ctrl.subsys.clone() }),
            (op, Some(ns)) => match plan {
                DataPlan::FromHost(len) => self.queue.request_data(sqe, len, Pending::Io { ns, op }),
                DataPlan::InCapsule(_) => self.start(cid, Work::Io { ns, op, data: vec![incapsule] }),
                _ => self.start(cid, Work::Io { ns, op, data: Vec::new() }),
            },
            (_, None) => self.fail(&sqe, Status::INVALID_NAMESPACE),
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
            AdminOutcome::Held => {}
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
                _ => self.fail(&sqe, Status::DATA_SGL_LENGTH_INVALID),
            },
            (fctype::CONNECT, Some(_)) => self.fail(&sqe, Status::COMMAND_SEQUENCE_ERROR),
            (_, None) => self.fail(&sqe, Status::COMMAND_SEQUENCE_ERROR),
            (fctype::PROPERTY_GET | fctype::PROPERTY_SET, Some(ctrl)) if self.qid == 0 => {
                let outcome = ctrl.property(&sqe, sqe.fctype() == fctype::PROPERTY_SET, &self.target.limits);
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
                debug!(peer = %self.peer, status = %rej.status, "connect refused");
                self.queue.complete(sqe.cid(), rej.cqe(sqe.cid()), None);
            }
        }
    }
}
