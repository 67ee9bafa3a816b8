//! The engine's RPC server: TCP connections in, target threads out.
//!
//! Each connection is one task. It decodes frames and routes each request to its target's thread
//! at once, in arrival order (no task per request: the checks and the hand-off are synchronous,
//! [`begin`]); it awaits the target threads' answers, as many as [`MAX_INFLIGHT`] at a time, and
//! writes the replies itself in completion order: every reply that is ready goes into one
//! non-blocking vectored write, and what the socket does not take waits for it to drain (no
//! writer task to hand replies to: a request at queue depth 1 is answered by the task the target
//! thread wakes). Past [`OUTBOUND_BUDGET`] of unsent replies the connection stops reading, so a
//! client that stops reading stalls only itself. A frame error closes the connection after one
//! log line; a request error gets an error reply and the connection goes on.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::io::IoSlice;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::{Buf, Bytes, BytesMut};
use futures::stream::{FuturesUnordered, StreamExt};
use futures::FutureExt;
use tessera_engine_proto::{
    decode_frame, encode_reply, DataRun, Discard, EnumBudget, EnumTarget, Enumerate, EpochRun, Fetch, FetchReply, FetchValue, Frame,
    FrameLimits, Opcode, Reply, ReplyResult, Request, RpcStatus, SingleValue, TargetHealth, TargetInfo,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::op::AkeyPath;
use crate::target::{Health, Mutation};
use crate::worker::{TargetHandle, TargetOp, TargetReply};
use crate::EngineError;

/// Requests one connection may have in flight; the reader stops reading beyond this.
pub const MAX_INFLIGHT: usize = 512;
/// Unsent reply bytes past which a connection stops reading requests.
pub const OUTBOUND_BUDGET: usize = 8 << 20;
/// Most buffers (heads and data) handed to one vectored write.
const MAX_IOV: usize = 64;

/// What every connection shares.
#[derive(Debug)]
pub struct Engine {
    pub rank: u32,
    pub targets: Vec<TargetHandle>,
    /// Newest map version seen for requests that name no pool (pool 0); older ones are refused.
    pub map_version: AtomicU32,
    /// Newest map version known per pool id (from requests and from the management service's
    /// heartbeat replies); requests with an older version are refused.
    pub pool_versions: Mutex<HashMap<u32, u32>>,
    pub limits: FrameLimits,
    pub shutting_down: AtomicBool,
    /// Host requests received so far: Updates, Fetches and Punches not marked background
    /// (`flags::BACKGROUND`). The healer paces its rebuild by it (`crate::pace`).
    pub host_ops: Arc<AtomicU64>,
}

impl Engine {
    /// An engine serving `targets`.
    pub fn new(rank: u32, targets: Vec<TargetHandle>) -> Self {
        Self {
            rank,
            targets,
            map_version: AtomicU32::new(0),
            pool_versions: Mutex::new(HashMap::new()),
            limits: FrameLimits::default(),
            shutting_down: AtomicBool::new(false),
            host_ops: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Raises the known map version of `pool` to at least `version` and returns the known
    /// version (the larger of the two). Pool 0 means no pool.
    pub fn observe_map_version(&self, pool: u32, version: u32) -> u32 {
        if pool == 0 {
            return self.map_version.fetch_max(version, Ordering::Relaxed).max(version);
        }
        let mut known = self.pool_versions.lock().unwrap_or_else(|e| e.into_inner());
        let v = known.entry(pool).or_insert(0);
        *v = (*v).max(version);
        *v
    }
}

/// Accepts connections until `stop` is cancelled.
pub async fn serve(engine: Arc<Engine>, listener: TcpListener, stop: CancellationToken) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok((sock, peer)) => {
                    let _ = sock.set_nodelay(true);
                    tokio::spawn(connection(engine.clone(), sock, peer, stop.clone()));
                }
                Err(e) => {
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            }
        }
    }
}

async fn connection(engine: Arc<Engine>, mut sock: TcpStream, peer: SocketAddr, stop: CancellationToken) {
    debug!(%peer, "connection opened");
    // Reads go through `AsyncRead` (a short read clears the readiness: no extra `recv` that
    // only says "would block"); writes are non-blocking `writev`s on the same socket.
    let (mut rd, mut wr) = sock.split();
    let mut inflight = FuturesUnordered::new();
    let mut buf = BytesMut::with_capacity(256 * 1024);
    let mut out = Replies::default();
    // Frames decoded but not yet routed (the in-flight bound was reached).
    let mut waiting: VecDeque<Frame> = VecDeque::new();
    let mut closing = false;
    loop {
        // Route what was decoded, in order, while the bound allows.
        while inflight.len() < MAX_INFLIGHT {
            let Some(frame) = waiting.pop_front() else { break };
            match begin(&engine, frame) {
                Begun::Now(encoded) => out.push(encoded),
                Begun::Later(fut) => inflight.push(fut),
            }
        }
        // Every answer that is ready goes out with this pass's write. (Polling without a waker
        // here is fine: the select below polls the set again with this task's waker.)
        while let Some(Some(encoded)) = inflight.next().now_or_never() {
            out.push(encoded);
        }
        if let Err(e) = out.write(wr.as_ref()) {
            debug!(%peer, error = %e, "write failed");
            break;
        }
        if closing && waiting.is_empty() && inflight.is_empty() && out.is_empty() {
            let _ = wr.shutdown().await;
            break;
        }
        let read_more = !closing && waiting.is_empty() && out.bytes < OUTBOUND_BUDGET;
        tokio::select! {
            biased;
            Some(encoded) = inflight.next(), if !inflight.is_empty() => out.push(encoded),
            r = wr.as_ref().writable(), if !out.is_empty() => {
                if let Err(e) = r {
                    debug!(%peer, error = %e, "write failed");
                    break;
                }
            }
            _ = stop.cancelled(), if read_more => closing = true,
            r = rd.read_buf(&mut buf), if read_more => {
                match r {
                    Ok(0) => closing = true,
                    Ok(_) => {}
                    Err(e) => {
                        debug!(%peer, error = %e, "read failed");
                        closing = true;
                    }
                }
                loop {
                    match decode_frame(&mut buf, &engine.limits) {
                        Ok(Some(frame)) => waiting.push_back(frame),
                        Ok(None) => break,
                        Err(e) => {
                            warn!(%peer, error = %e, "malformed frame; closing the connection");
                            closing = true;
                            break;
                        }
                    }
                }
                if buf.capacity() - buf.len() < 64 * 1024 {
                    buf.reserve(256 * 1024);
                }
            }
        }
    }
    debug!(%peer, "connection closed");
}

/// Encoded replies not yet written, in completion order.
#[derive(Default)]
struct Replies {
    /// Heads and data (empty buffers left out).
    bufs: VecDeque<Bytes>,
    bytes: usize,
}

impl Replies {
    fn push(&mut self, e: tessera_engine_proto::Encoded) {
        for b in [e.head, e.data] {
            if !b.is_empty() {
                self.bytes += b.len();
                self.bufs.push_back(b);
            }
        }
    }

    fn is_empty(&self) -> bool {
        self.bufs.is_empty()
    }

    /// Writes as much as the socket takes without waiting, each call one `writev` of up to
    /// [`MAX_IOV`] buffers. Fails only if the socket fails.
    fn write(&mut self, sock: &TcpStream) -> std::io::Result<()> {
        while !self.bufs.is_empty() {
            let mut iov = [IoSlice::new(&[]); MAX_IOV];
            let mut n_iov = 0;
            for (slot, b) in iov.iter_mut().zip(self.bufs.iter()) {
                *slot = IoSlice::new(b);
                n_iov += 1;
            }
            let mut n = match sock.try_write_vectored(iov.get(..n_iov).unwrap_or_default()) {
                Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            self.bytes = self.bytes.saturating_sub(n);
            while n > 0 {
                let Some(front) = self.bufs.front_mut() else { break };
                if n >= front.len() {
                    n -= front.len();
                    self.bufs.pop_front();
                } else {
                    front.advance(n);
                    n = 0;
                }
            }
        }
        Ok(())
    }
}

/// A request routed by [`begin`]: answered at once, or waiting for its target thread.
enum Begun {
    Now(tessera_engine_proto::Encoded),
    Later(Answer),
}

/// The reply of a request handed to a target thread, encoded once the thread answers.
type Answer = Pin<Box<dyn Future<Output = tessera_engine_proto::Encoded> + Send>>;

/// Decodes and checks one request and hands it to its target's thread (synchronously, so
/// requests reach the threads in arrival order); what is answered without a target thread
/// (errors, pings) is encoded at once.
fn begin(engine: &Engine, frame: Frame) -> Begun {
    let h = frame.header;
    if !h.is_background() && matches!(h.opcode, Opcode::Update | Opcode::Fetch | Opcode::Punch) {
        engine.host_ops.fetch_add(1, Ordering::Relaxed);
    }
    // One look at the pool's known map version per request: it checks the request and goes
    // back in the reply header.
    let (known, started) = match Request::decode(&frame) {
        Ok(req) => {
            let known = engine.observe_map_version(h.pool, h.map_version);
            (known, start_request(engine, &h, known, req))
        }
        Err(e) => (engine.observe_map_version(h.pool, 0), Err(e.to_error_reply())),
    };
    match started {
        Ok(Started::Done(reply)) => Begun::Now(encode_reply(h.request_id, h.opcode, known, h.target, &Ok(reply))),
        Err(e) => Begun::Now(encode_reply(h.request_id, h.opcode, known, h.target, &Err(e))),
        Ok(Started::Submitted(rx, shape)) => Begun::Later(Box::pin(async move {
            let result = match rx.await {
                Ok(Ok(r)) => to_reply(r, shape),
                Ok(Err(e)) => Err(error_reply(&e)),
                Err(_) => Err((RpcStatus::ShuttingDown, "target thread has stopped".to_string())),
            };
            encode_reply(h.request_id, h.opcode, known, h.target, &result)
        })),
    }
}

/// A request after its checks: answered, or handed to a target thread.
enum Started {
    Done(Reply),
    Submitted(oneshot::Receiver<Result<TargetReply, EngineError>>, Shape),
}

fn start_request(engine: &Engine, h: &tessera_engine_proto::Header, known: u32, req: Request) -> Result<Started, (RpcStatus, String)> {
    let (target, pool, map_version) = (h.target, h.pool, h.map_version);
    if map_version < known {
        return Err((RpcStatus::StaleMapVersion, format!("pool {pool} map version {map_version} is older than {known}")));
    }
    if let Request::Ping = req {
        return Ok(Started::Done(Reply::Pong { rank: engine.rank, targets: engine.targets.len() as u16, map_version: known }));
    }
    if engine.shutting_down.load(Ordering::Relaxed) {
        return Err((RpcStatus::ShuttingDown, "engine is shutting down".into()));
    }
    let Some(handle) = engine.targets.get(target as usize) else {
        return Err((RpcStatus::NoSuchTarget, format!("target {target} does not exist; this engine has {}", engine.targets.len())));
    };
    let (op, shape) = to_target_op(req, h.is_background())?;
    Ok(Started::Submitted(handle.submit(op), shape))
}

/// How the target's answer turns into a wire reply.
enum Shape {
    Done(Reply),
    Discarded,
    Array,
    Epochs,
    Single,
    Objects { budget: EnumBudget, max: usize },
    Keys { budget: EnumBudget, max: usize },
    Info,
}

fn path(cont: u128, obj: u128, dkey: Bytes, akey: Bytes) -> AkeyPath {
    AkeyPath { cont, obj, dkey, akey }
}

/// The target thread's operation for a request; an update or punch not marked background is a
/// host's, held to the commit window.
fn to_target_op(req: Request, background: bool) -> Result<(TargetOp, Shape), (RpcStatus, String)> {
    let mutate = |m| if background { TargetOp::Mutate(m) } else { TargetOp::HostMutate(m) };
    Ok(match req {
        Request::Ping => return Err((RpcStatus::InvalidRequest, "ping is answered by the engine".into())),
        Request::Update(u) => {
            let m = Mutation::Update { path: path(u.cont.0, u.obj.0, u.dkey, u.akey), epoch: u.epoch, value: u.value };
            (mutate(m), Shape::Done(Reply::Updated))
        }
        Request::Punch(p) => {
            (mutate(Mutation::Punch { cont: p.cont.0, obj: p.obj.0, epoch: p.epoch, what: p.what }), Shape::Done(Reply::Punched))
        }
        Request::SetRetention(s) => {
            let retention = crate::index::Retention { aggregate_below: s.aggregate_below, retained: s.retained };
            (TargetOp::Mutate(Mutation::SetRetention { cont: s.cont.0, retention }), Shape::Done(Reply::RetentionSet))
        }
        Request::Discard(Discard { cont, obj, above, below, dkey }) => {
            (TargetOp::Mutate(Mutation::Discard { cont: cont.0, obj: obj.0, above, below, dkey }), Shape::Discarded)
        }
        Request::Fetch(Fetch { cont, obj, epoch, dkey, akey, what }) => match what {
            FetchValue::Array { offset, len } => {
                (TargetOp::FetchArray { path: path(cont.0, obj.0, dkey, akey), offset, len: u64::from(len), epoch }, Shape::Array)
            }
            FetchValue::Versions { offset, len, also } => {
                let mut paths = vec![path(cont.0, obj.0, dkey.clone(), akey)];
                paths.extend(also.into_iter().map(|a| path(cont.0, obj.0, dkey.clone(), a)));
                (TargetOp::FetchVersions { paths, offset, len: u64::from(len), epoch }, Shape::Array)
            }
            FetchValue::Epochs { offset, len, also } => {
                let mut paths = vec![path(cont.0, obj.0, dkey.clone(), akey)];
                paths.extend(also.into_iter().map(|a| path(cont.0, obj.0, dkey.clone(), a)));
                (TargetOp::FetchEpochs { paths, offset, len: u64::from(len), epoch }, Shape::Epochs)
            }
            FetchValue::Single => (TargetOp::FetchSingle { path: path(cont.0, obj.0, dkey, akey), epoch }, Shape::Single),
        },
        Request::Enumerate(Enumerate { cont, epoch, what, anchor, max }) => {
            let budget = EnumBudget::new(max);
            let max = max.min(tessera_engine_proto::request::ENUM_MAX_KEYS) as usize;
            match what {
                EnumTarget::Objects => {
                    let after = match anchor {
                        None => None,
                        Some(a) => Some(u128::from_be_bytes(
                            a.as_ref().try_into().map_err(|_| (RpcStatus::InvalidRequest, "object anchor must be 16 bytes".to_string()))?,
                        )),
                    };
                    (TargetOp::ListObjects { cont: cont.0, epoch, after, max }, Shape::Objects { budget, max })
                }
                EnumTarget::Dkeys(obj) => {
                    (TargetOp::ListDkeys { cont: cont.0, obj: obj.0, epoch, after: anchor, max }, Shape::Keys { budget, max })
                }
                EnumTarget::Akeys(obj, dkey) => {
                    (TargetOp::ListAkeys { cont: cont.0, obj: obj.0, dkey, epoch, after: anchor, max }, Shape::Keys { budget, max })
                }
                EnumTarget::DkeysSince(obj, since) => {
                    (TargetOp::ListDkeysSince { cont: cont.0, obj: obj.0, since, epoch, after: anchor, max }, Shape::Keys { budget, max })
                }
            }
        }
        Request::QueryTarget => (TargetOp::Query, Shape::Info),
    })
}

/// Keys that fit the budget, and the anchor to continue from when the budget cut the list or
/// the target returned as many keys as asked (so there may be more).
fn budgeted(keys: Vec<Bytes>, mut budget: EnumBudget, max: usize) -> Reply {
    let total = keys.len();
    let mut out = Vec::with_capacity(total);
    for k in keys {
        if !budget.take(&k) {
            break;
        }
        out.push(k);
    }
    let more = out.len() < total || (total == max && max > 0);
    let next = if more { out.last().cloned() } else { None };
    Reply::Enumerated { keys: out, next }
}

fn to_reply(r: TargetReply, shape: Shape) -> ReplyResult {
    Ok(match (r, shape) {
        (TargetReply::Done, Shape::Done(reply)) => reply,
        (TargetReply::Discarded(versions), Shape::Discarded) => Reply::Discarded { versions },
        (TargetReply::Array(a), Shape::Array) => {
            let runs = a.runs.into_iter().map(|(offset, len, epoch)| DataRun { offset, len, epoch }).collect();
            Reply::Fetched(FetchReply::Array { data: a.data, holes: a.holes, csums: a.csums, runs })
        }
        (TargetReply::Epochs(runs), Shape::Epochs) => Reply::Fetched(FetchReply::Epochs {
            runs: runs.into_iter().map(|(offset, len, epoch, punched)| EpochRun { offset, len, epoch, punched }).collect(),
        }),
        (TargetReply::Single(s), Shape::Single) => {
            Reply::Fetched(FetchReply::Single { value: s.map(|(data, csum, epoch)| SingleValue { data, csum, epoch }) })
        }
        (TargetReply::Objects(ids), Shape::Objects { budget, max }) => {
            let keys = ids.iter().map(|id| Bytes::copy_from_slice(&id.to_be_bytes())).collect();
            budgeted(keys, budget, max)
        }
        (TargetReply::Keys(keys), Shape::Keys { budget, max }) => budgeted(keys, budget, max),
        (TargetReply::Info(i), Shape::Info) => Reply::TargetInfo(TargetInfo {
            capacity: i.capacity,
            used: i.used,
            state: match i.health {
                Health::Healthy => TargetHealth::Healthy,
                Health::Failed => TargetHealth::Failed,
            },
            objects: i.objects,
            wal_seq: i.wal_seq,
            checkpoint_seq: i.checkpoint_seq,
        }),
        (r, _) => return Err((RpcStatus::IoError, format!("internal error: unexpected target answer {r:?}"))),
    })
}

/// The wire status and message for an engine error.
pub fn error_reply(e: &EngineError) -> (RpcStatus, String) {
    let status = match e {
        EngineError::Invalid(_) => RpcStatus::InvalidRequest,
        EngineError::ChecksumMismatch { .. } => RpcStatus::ChecksumMismatch,
        EngineError::DataCorrupt(_) => RpcStatus::DataCorrupt,
        EngineError::NoSpace(_) => RpcStatus::NoSpace,
        EngineError::TooLarge(_) => RpcStatus::TooLarge,
        EngineError::EpochTooOld { .. } => RpcStatus::EpochTooOld,
        EngineError::Io { .. } | EngineError::Failed(_) | EngineError::Corrupt { .. } => RpcStatus::IoError,
    };
    (status, e.to_string())
}

/// Logs the engine's listening line (tests wait for it).
pub fn announce(addr: SocketAddr, rank: u32, targets: usize) {
    info!(%addr, rank, targets, "engine listening");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::MemStorage;
    use crate::target::{Target, TargetConfig};
    use tessera_engine_proto::{encode_request_flagged, ContainerId, ObjectId};

    #[test]
    fn requests_reach_the_target_thread_in_arrival_order() {
        // Updates of one akey at one epoch, routed back to back: the last one routed wins, as
        // it must when a client sends them in that order on one connection.
        let target = Target::open(Arc::new(MemStorage::new()), TargetConfig::default()).unwrap();
        let (h, thread) = TargetHandle::spawn("t".into(), target, 64).unwrap();
        let engine = Engine::new(0, vec![h.clone()]);
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        // Host writes: at an epoch of now (an older one would be below the commit window).
        let epoch = crate::worker::now_epoch();
        let answers: Vec<Answer> = (0..64u8)
            .filter_map(|i| {
                let value = tessera_engine_proto::UpdateValue::array(0, Bytes::from(vec![i; 4096]));
                let req = Request::Update(tessera_engine_proto::Update {
                    cont: ContainerId(1),
                    obj: ObjectId(2),
                    epoch,
                    dkey: Bytes::from_static(b"d"),
                    akey: Bytes::from_static(b"a"),
                    value,
                });
                let mut b = encode_request_flagged(u32::from(i), 1, 0, 0, false, &req).to_bytes();
                match begin(&engine, decode_frame(&mut b, &FrameLimits::default()).unwrap().unwrap()) {
                    Begun::Later(a) => Some(a),
                    Begun::Now(_) => None,
                }
            })
            .collect();
        assert_eq!(answers.len(), 64);
        rt.block_on(futures::future::join_all(answers));
        let got = rt
            .block_on(h.submit(TargetOp::FetchArray {
                path: AkeyPath { cont: 1, obj: 2, dkey: Bytes::from_static(b"d"), akey: Bytes::from_static(b"a") },
                offset: 0,
                len: 4096,
                epoch,
            }))
            .unwrap()
            .unwrap();
        let TargetReply::Array(a) = got else { panic!("not an array") };
        assert_eq!(a.data[0], 63);
        drop(engine);
        h.shutdown().blocking_recv().unwrap().unwrap();
        thread.join().unwrap();
    }

    #[test]
    fn host_requests_are_counted_and_background_ones_are_not() {
        let target = Target::open(Arc::new(MemStorage::new()), TargetConfig::default()).unwrap();
        let (h, thread) = TargetHandle::spawn("t".into(), target, 64).unwrap();
        let engine = Engine::new(0, vec![h.clone()]);
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let fetch = Request::Fetch(Fetch {
            cont: ContainerId(1),
            obj: ObjectId(2),
            epoch: 10,
            dkey: Bytes::from_static(b"d"),
            akey: Bytes::from_static(b"a"),
            what: FetchValue::Array { offset: 0, len: 4096 },
        });
        let list = Request::Enumerate(Enumerate { cont: ContainerId(1), epoch: 10, what: EnumTarget::Objects, anchor: None, max: 8 });
        let send = |req: &Request, background: bool| {
            let mut b = encode_request_flagged(0, 1, 0, 0, background, req).to_bytes();
            let frame = decode_frame(&mut b, &FrameLimits::default()).unwrap().unwrap();
            if let Begun::Later(answer) = begin(&engine, frame) {
                rt.block_on(answer);
            }
            engine.host_ops.load(Ordering::Relaxed)
        };
        assert_eq!(send(&fetch, false), 1);
        assert_eq!(send(&fetch, true), 1, "a background fetch is not host I/O");
        assert_eq!(send(&Request::Ping, false), 1, "nor is a ping");
        assert_eq!(send(&list, false), 1, "nor an enumeration");
        assert_eq!(send(&fetch, false), 2);
        drop(engine);
        h.shutdown().blocking_recv().unwrap().unwrap();
        thread.join().unwrap();
    }
}
