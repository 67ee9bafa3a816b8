//! A pipelined connection to one engine: many requests in flight from many tasks over one TCP
//! connection, replies matched to their callers by request id in whatever order they come.
//!
//! Requests are written by the callers themselves: a caller that finds nobody writing writes its
//! frame — and whatever other callers queued meanwhile — with non-blocking vectored writes
//! (headers, bodies and bulk data side by side, never copied into one buffer), in its own task, so
//! a request at queue depth 1 costs no hand-off to another task. Frames queued while someone is
//! writing go out with that writer's next write; what the socket does not take at once is left to
//! the connection's **writer** task, which waits for the socket to drain. The **reader** task
//! splits the byte stream into frames ([`tessera_engine_proto::decode_frame`]) and hands each reply
//! to the caller waiting on its request id. Callers encode their own requests and decode their
//! own replies, so those costs are spread over the callers' tasks.
//!
//! Request ids index a slot table: the low 32 bits are the slot, the high 32 bits the slot's
//! generation, which changes every time the slot is released. A reply to a request that timed out
//! or whose caller went away finds a different generation (or an empty slot) and is dropped.
//!
//! When the connection ends — the engine closes it, a read or write fails, or the engine breaks
//! the framing — every pending call fails at once (`Closed`, or `Protocol` with the framing
//! error) and every later call fails immediately with `Closed`. There is no reconnection here;
//! that belongs to the layer that knows the pool map.

use std::collections::VecDeque;
use std::fmt;
use std::io::{self, IoSlice};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use tessera_engine_proto::{
    decode_frame, encode_request_flagged, Encoded, Frame, FrameError, FrameLimits, Reply, ReplyError, Request, RpcStatus,
};
use tokio::io::AsyncReadExt;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::{oneshot, watch, Notify};
use tokio::task::JoinHandle;

/// Most buffers (heads and data) handed to one vectored write.
const MAX_IOV: usize = 64;
/// A caller that writes for others stops after this many vectored writes and leaves the rest to
/// the writer task (so one call is not held up by a long stream of others' frames).
const CALLER_WRITES: usize = 4;
/// Bytes the reader makes room for before each read.
const READ_CHUNK: usize = 64 * 1024;

/// How to connect and how long to wait.
#[derive(Clone, Copy, Debug)]
pub struct ConnectionOptions {
    /// Longest a call may take, from queueing the request to receiving the reply (default 10 s).
    pub timeout: Duration,
    /// Longest the TCP connect may take (default 5 s).
    pub connect_timeout: Duration,
    /// Pool map version sent with every request until [`EngineConnection::set_map_version`].
    pub map_version: u32,
    /// Limits on the replies accepted (default [`FrameLimits::default`]).
    pub limits: FrameLimits,
    /// Marks every request as background work (`flags::BACKGROUND`: rebuild, scrub repair),
    /// which the engine does not count as host I/O when it paces its rebuild (default false).
    pub background: bool,
}

impl Default for ConnectionOptions {
    fn default() -> Self {
        ConnectionOptions {
            timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(5),
            map_version: 0,
            limits: FrameLimits::default(),
            background: false,
        }
    }
}

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
pub enum RpcError {
    /// Connecting failed.
    #[error("I/O error: {0}")]
    Io(#[from] io::Error),
    /// No reply within the timeout. The engine may still execute the request.
    #[error("request timed out")]
    Timeout,
    /// The connection is closed (by the engine, by a failed read or write, or earlier).
    #[error("connection closed")]
    Closed,
    /// The engine broke the framing; the connection was closed.
    #[error("protocol error: {0}")]
    Protocol(#[from] FrameError),
    /// The reply frame was well framed but not a valid reply to the request.
    #[error("malformed reply: {0}")]
    BadReply(#[from] ReplyError),
    /// The engine answered with an error.
    #[error("engine error ({status}): {message}")]
    Remote {
        /// The reply's status.
        status: RpcStatus,
        /// The engine's message.
        message: String,
    },
}

/// Why the connection ended; pending calls fail with it.
#[derive(Clone, Debug)]
enum CloseReason {
    Closed,
    Protocol(FrameError),
}

impl CloseReason {
    fn to_error(&self) -> RpcError {
        match self {
            CloseReason::Closed => RpcError::Closed,
            CloseReason::Protocol(e) => RpcError::Protocol(e.clone()),
        }
    }
}

type Waiter = oneshot::Sender<Result<Frame, RpcError>>;

#[derive(Default)]
struct Slot {
    generation: u32,
    waiter: Option<Waiter>,
}

#[derive(Default)]
struct Slots {
    slots: Vec<Slot>,
    free: Vec<u32>,
    in_flight: usize,
    closed: Option<CloseReason>,
}

fn split_id(id: u64) -> (usize, u32) {
    ((id & 0xffff_ffff) as usize, (id >> 32) as u32)
}

impl Slots {
    /// A free slot for a new call, or the reason the connection is closed.
    fn register(&mut self, waiter: Waiter) -> Result<u64, RpcError> {
        if self.closed.is_some() {
            return Err(RpcError::Closed);
        }
        let index = match self.free.pop() {
            Some(i) => i,
            None => {
                let i = u32::try_from(self.slots.len()).map_err(|_| RpcError::Closed)?;
                self.slots.push(Slot::default());
                i
            }
        };
        let slot = self.slots.get_mut(index as usize).ok_or(RpcError::Closed)?;
        slot.waiter = Some(waiter);
        self.in_flight += 1;
        Ok(u64::from(slot.generation) << 32 | u64::from(index))
    }

    /// Releases the slot of request `id` if it still belongs to it; returns its waiter (`None`
    /// if it was already taken by a close).
    fn release(&mut self, id: u64) -> Option<Waiter> {
        let (index, generation) = split_id(id);
        let slot = self.slots.get_mut(index).filter(|s| s.generation == generation)?;
        let waiter = slot.waiter.take();
        slot.generation = slot.generation.wrapping_add(1);
        self.free.push(index as u32);
        self.in_flight = self.in_flight.saturating_sub(1);
        waiter
    }
}

/// Frames waiting to be written, in order, and whether someone is writing them.
#[derive(Default)]
struct Outgoing {
    /// Heads and data of the queued frames (empty buffers left out).
    queue: VecDeque<Bytes>,
    /// A caller or the writer task is writing; others only queue behind it.
    writing: bool,
}

impl Outgoing {
    fn push(&mut self, e: Encoded) {
        for b in [e.head, e.data] {
            if !b.is_empty() {
                self.queue.push_back(b);
            }
        }
    }

    /// Up to [`MAX_IOV`] buffers from the front of the queue.
    fn take_batch(&mut self, batch: &mut Vec<Bytes>) {
        let n = self.queue.len().min(MAX_IOV);
        batch.extend(self.queue.drain(..n));
    }

    /// Puts the unwritten rest of a batch back in front of whatever was queued meanwhile.
    fn put_back(&mut self, batch: &mut Vec<Bytes>) {
        for b in batch.drain(..).rev() {
            self.queue.push_front(b);
        }
    }
}

/// State shared by the handles and both tasks.
struct Shared {
    slots: Mutex<Slots>,
    out: Mutex<Outgoing>,
    wr: OwnedWriteHalf,
    /// Wakes the writer task when a caller leaves it frames the socket did not take.
    writer_wake: Notify,
    map_version: AtomicU32,
    engine_map_version: AtomicU32,
    closed: watch::Sender<bool>,
}

impl Shared {
    fn slots(&self) -> MutexGuard<'_, Slots> {
        // The lock is never held across anything that can panic halfway; a poisoned table is
        // still consistent.
        self.slots.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn out(&self) -> MutexGuard<'_, Outgoing> {
        // As for `slots`: a poisoned queue is still a consistent queue.
        self.out.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues frame `e` and, if nobody is writing, writes it and whatever else is queued at
    /// once, in this task, as far as the socket takes it without waiting; the rest goes to the
    /// writer task. Fails if the socket fails (the connection is then closed).
    fn send(&self, e: Encoded) -> Result<(), RpcError> {
        if *self.closed.borrow() {
            return Err(RpcError::Closed);
        }
        let mut out = self.out();
        out.push(e);
        if out.writing {
            return Ok(());
        }
        out.writing = true;
        let mut batch = Vec::new();
        for _ in 0..CALLER_WRITES {
            out.take_batch(&mut batch);
            if batch.is_empty() {
                out.writing = false;
                return Ok(());
            }
            drop(out);
            let written = try_write_batch(&self.wr, &mut batch);
            out = self.out();
            match written {
                Ok(()) if batch.is_empty() => {}
                Ok(()) => break,
                Err(e) => {
                    out.queue.clear();
                    drop(out);
                    tracing::debug!(error = %e, "engine connection write failed");
                    self.close(CloseReason::Closed);
                    return Err(RpcError::Closed);
                }
            }
        }
        if batch.is_empty() && out.queue.is_empty() {
            out.writing = false;
            return Ok(());
        }
        // The socket is full (or others keep queueing): the writer task takes over, still
        // marked as writing so that nobody writes past it.
        out.put_back(&mut batch);
        drop(out);
        self.writer_wake.notify_one();
        Ok(())
    }

    /// Hands a reply to its caller; replies nobody waits for any more are dropped.
    fn complete(&self, frame: Frame) {
        let id = frame.header.request_id;
        self.engine_map_version.fetch_max(frame.header.map_version, Ordering::Relaxed);
        let waiter = self.slots().release(id);
        match waiter {
            Some(w) => {
                let _ = w.send(Ok(frame));
            }
            None => tracing::debug!(request_id = id, "dropping a reply nobody waits for (timed out or cancelled)"),
        }
    }

    /// Ends the connection: fails every pending call with `reason`, and every later one.
    fn close(&self, reason: CloseReason) {
        let waiters: Vec<Waiter> = {
            let mut s = self.slots();
            if s.closed.is_some() {
                return;
            }
            s.closed = Some(reason.clone());
            s.slots.iter_mut().filter_map(|slot| slot.waiter.take()).collect()
        };
        if let CloseReason::Protocol(e) = &reason {
            tracing::warn!(error = %e, pending = waiters.len(), "engine connection closed on a protocol error");
        } else {
            tracing::debug!(pending = waiters.len(), "engine connection closed");
        }
        for w in waiters {
            let _ = w.send(Err(reason.to_error()));
        }
        self.closed.send_replace(true);
    }
}

/// Releases a call's slot if the call ends without its reply (timeout, cancellation, send
/// failure).
struct SlotGuard<'a> {
    shared: &'a Shared,
    id: u64,
    armed: bool,
}

impl Drop for SlotGuard<'_> {
    fn drop(&mut self) {
        if self.armed {
            let _ = self.shared.slots().release(self.id);
        }
    }
}

struct Handle {
    shared: Arc<Shared>,
    timeout: Duration,
    background: bool,
    peer: SocketAddr,
    reader: JoinHandle<()>,
    writer: JoinHandle<()>,
}

impl Drop for Handle {
    fn drop(&mut self) {
        self.shared.close(CloseReason::Closed);
        self.reader.abort();
        self.writer.abort();
    }
}

/// A connection to one engine. Cheap to clone; all clones share the connection, which closes
/// when the last clone is dropped. Any number of tasks may [`call`](Self::call) at once.
#[derive(Clone)]
pub struct EngineConnection {
    inner: Arc<Handle>,
}

impl fmt::Debug for EngineConnection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = self.inner.shared.slots();
        f.debug_struct("EngineConnection")
            .field("peer", &self.inner.peer)
            .field("in_flight", &s.in_flight)
            .field("closed", &s.closed.is_some())
            .finish()
    }
}

impl EngineConnection {
    /// Connects to the engine at `addr` (TCP_NODELAY on) and starts the connection's tasks.
    pub async fn connect(addr: SocketAddr, opts: ConnectionOptions) -> Result<EngineConnection, RpcError> {
        let stream = match tokio::time::timeout(opts.connect_timeout, TcpStream::connect(addr)).await {
            Ok(s) => s?,
            Err(_) => return Err(RpcError::Io(io::Error::new(io::ErrorKind::TimedOut, format!("connect to {addr} timed out")))),
        };
        stream.set_nodelay(true)?;
        let (rd, wr) = stream.into_split();
        let (closed_tx, closed_rx) = watch::channel(false);
        let shared = Arc::new(Shared {
            slots: Mutex::new(Slots::default()),
            out: Mutex::new(Outgoing::default()),
            wr,
            writer_wake: Notify::new(),
            map_version: AtomicU32::new(opts.map_version),
            engine_map_version: AtomicU32::new(0),
            closed: closed_tx,
        });
        let reader = tokio::spawn(read_loop(rd, shared.clone(), opts.limits, closed_rx.clone()));
        let writer = tokio::spawn(write_loop(shared.clone(), closed_rx));
        Ok(EngineConnection {
            inner: Arc::new(Handle { shared, timeout: opts.timeout, background: opts.background, peer: addr, reader, writer }),
        })
    }

    /// Sends `req` to target `target` of the engine and waits for its reply.
    ///
    /// Fails with `Remote` if the engine answers with an error status, `Timeout` if no reply
    /// comes within the connection's timeout, `Closed`/`Protocol` if the connection ends first,
    /// `BadReply` if the reply does not decode.
    pub async fn call(&self, target: u16, req: Request) -> Result<Reply, RpcError> {
        self.call_at(0, self.map_version(), target, req).await
    }

    /// Like [`EngineConnection::call`], with `map_version` as the map version of pool `pool` (the
    /// engine refuses it with `StaleMapVersion` if it knows a newer one for that pool).
    pub async fn call_at(&self, pool: u32, map_version: u32, target: u16, req: Request) -> Result<Reply, RpcError> {
        let h = &*self.inner;
        let opcode = req.opcode();
        let (tx, rx) = oneshot::channel();
        let id = h.shared.slots().register(tx)?;
        let mut guard = SlotGuard { shared: &h.shared, id, armed: true };
        let encoded = encode_request_flagged(pool, id, map_version, target, h.background, &req);
        drop(req);
        h.shared.send(encoded)?;
        let exchange = async { rx.await.map_err(|_| RpcError::Closed)? };
        let frame = match tokio::time::timeout(h.timeout, exchange).await {
            Ok(Ok(frame)) => {
                // The reader released the slot when it handed the reply over.
                guard.armed = false;
                frame
            }
            Ok(Err(e)) => return Err(e),
            Err(_) => return Err(RpcError::Timeout),
        };
        match Reply::decode(opcode, &frame)? {
            Ok(reply) => Ok(reply),
            Err((status, message)) => Err(RpcError::Remote { status, message }),
        }
    }

    /// Sets the pool map version sent with later requests.
    pub fn set_map_version(&self, version: u32) {
        self.inner.shared.map_version.store(version, Ordering::Relaxed);
    }

    /// The pool map version sent with requests.
    pub fn map_version(&self) -> u32 {
        self.inner.shared.map_version.load(Ordering::Relaxed)
    }

    /// The newest pool map version the engine has reported in a reply header (0 before any).
    pub fn engine_map_version(&self) -> u32 {
        self.inner.shared.engine_map_version.load(Ordering::Relaxed)
    }

    /// The engine's address.
    pub fn peer_addr(&self) -> SocketAddr {
        self.inner.peer
    }

    /// Calls waiting for a reply.
    pub fn in_flight(&self) -> usize {
        self.inner.shared.slots().in_flight
    }

    /// Whether the connection has ended (every call now fails with `Closed`).
    pub fn is_closed(&self) -> bool {
        self.inner.shared.slots().closed.is_some()
    }
}

async fn read_loop(mut rd: OwnedReadHalf, shared: Arc<Shared>, limits: FrameLimits, mut closed: watch::Receiver<bool>) {
    let mut buf = BytesMut::with_capacity(READ_CHUNK);
    let reason = loop {
        match decode_frame(&mut buf, &limits) {
            Ok(Some(frame)) => {
                shared.complete(frame);
                continue;
            }
            Ok(None) => {}
            Err(e) => break CloseReason::Protocol(e),
        }
        buf.reserve(READ_CHUNK);
        tokio::select! {
            r = rd.read_buf(&mut buf) => match r {
                Ok(0) => break CloseReason::Closed,
                Ok(_) => {}
                Err(e) => {
                    tracing::debug!(error = %e, "engine connection read failed");
                    break CloseReason::Closed;
                }
            },
            _ = closed.wait_for(|c| *c) => return,
        }
    };
    shared.close(reason);
}

/// Writes what callers left queued when the socket was full, waiting for it to drain, until the
/// queue is empty; then callers write for themselves again.
async fn write_loop(shared: Arc<Shared>, mut closed: watch::Receiver<bool>) {
    let mut batch = Vec::with_capacity(MAX_IOV);
    loop {
        tokio::select! {
            () = shared.writer_wake.notified() => {}
            _ = closed.wait_for(|c| *c) => return,
        }
        loop {
            {
                let mut out = shared.out();
                out.take_batch(&mut batch);
                if batch.is_empty() {
                    out.writing = false;
                    break;
                }
            }
            let written = tokio::select! {
                r = write_all(&shared.wr, &mut batch) => r,
                _ = closed.wait_for(|c| *c) => return,
            };
            if let Err(e) = written {
                tracing::debug!(error = %e, "engine connection write failed");
                shared.out().queue.clear();
                shared.close(CloseReason::Closed);
                return;
            }
        }
    }
}

/// Writes `batch` from the front with non-blocking vectored writes until it is all written
/// (`batch` left empty) or the socket is full (the unwritten rest left in `batch`).
fn try_write_batch(wr: &OwnedWriteHalf, batch: &mut Vec<Bytes>) -> io::Result<()> {
    let mut start = 0;
    let result = loop {
        if start == batch.len() {
            break Ok(());
        }
        let mut iov = [IoSlice::new(&[]); MAX_IOV];
        let mut n_iov = 0;
        for (slot, b) in iov.iter_mut().zip(batch.iter().skip(start)) {
            *slot = IoSlice::new(b);
            n_iov += 1;
        }
        match wr.try_write_vectored(iov.get(..n_iov).unwrap_or_default()) {
            Ok(0) => break Err(io::ErrorKind::WriteZero.into()),
            Ok(mut n) => {
                // Drop what was written: whole buffers, then the front of a partly written one.
                while n > 0 {
                    let Some(b) = batch.get_mut(start) else { break };
                    if n >= b.len() {
                        n -= b.len();
                        start += 1;
                    } else {
                        b.advance(n);
                        n = 0;
                    }
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break Ok(()),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => break Err(e),
        }
    };
    batch.drain(..start);
    result
}

/// Writes all of `batch`, waiting for the socket whenever it is full.
async fn write_all(wr: &OwnedWriteHalf, batch: &mut Vec<Bytes>) -> io::Result<()> {
    loop {
        try_write_batch(wr, batch)?;
        if batch.is_empty() {
            return Ok(());
        }
        wr.writable().await?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slot_ids_change_generation_on_release() {
        let mut s = Slots::default();
        let (a_tx, _a) = oneshot::channel();
        let a = s.register(a_tx).unwrap();
        assert_eq!(a, 0);
        assert!(s.release(a).is_some());
        // A stale id (same slot, old generation) matches nothing.
        assert!(s.release(a).is_none());
        let (b_tx, _b) = oneshot::channel();
        let b = s.register(b_tx).unwrap();
        assert_eq!(split_id(b), (0, 1));
        assert!(s.release(a).is_none());
        let (c_tx, _c) = oneshot::channel();
        let c = s.register(c_tx).unwrap();
        assert_eq!(split_id(c), (1, 0));
        assert_eq!(s.in_flight, 2);
        assert!(s.release(u64::MAX).is_none());
        s.closed = Some(CloseReason::Closed);
        let (d_tx, _d) = oneshot::channel();
        assert!(matches!(s.register(d_tx), Err(RpcError::Closed)));
    }
}
