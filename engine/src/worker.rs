//! The thread that owns one [`Target`]: the only code that touches that target's files.
//!
//! Requests arrive on a channel. The loop takes everything that is queued (up to `max_batch`),
//! answers reads at once, stages every mutation, commits them all with one WAL record (group
//! commit: whatever queued up while the previous sync ran forms the next batch; small updates'
//! data rides in the record, larger ones are written and synced to the data file first), and
//! only then answers the mutations. A discard is planned from the committed index, so when one
//! comes, what the batch staged before it is committed and answered first. Between batches it
//! destages small updates' data to the data file once enough waits, starts checkpoints when the
//! WAL has grown and runs bounded aggregation steps; when idle it destages what waits, then
//! aggregates; with nothing to do it blocks, so an idle engine uses no CPU.
//!
//! Scrub runs here too, as bounded steps the scrubber (`scrub`) asks for like any read
//! ([`TargetOp::Scrub`]), so it never races the index. A fetch that finds stored data failing its
//! checksum is noted in the engine's [`CorruptReads`] for the scrubber to repair.

use std::collections::VecDeque;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use tokio::sync::{oneshot, Notify};
use tracing::warn;

use crate::op::AkeyPath;
use crate::target::{Fence, FetchedArray, Mutation, ScrubCursor, ScrubStep, Staged, Target, TargetInfo};
use crate::EngineError;

/// What a client asks of a target.
#[derive(Debug)]
pub enum TargetOp {
    Mutate(Mutation),
    FetchArray {
        path: AkeyPath,
        offset: u64,
        len: u64,
        epoch: u64,
    },
    /// A fetch across the akeys of `paths` (one dkey) with the epoch of every run.
    FetchVersions {
        paths: Vec<AkeyPath>,
        offset: u64,
        len: u64,
        epoch: u64,
    },
    FetchSingle {
        path: AkeyPath,
        epoch: u64,
    },
    ListObjects {
        cont: u128,
        epoch: u64,
        after: Option<u128>,
        max: usize,
    },
    ListDkeys {
        cont: u128,
        obj: u128,
        epoch: u64,
        after: Option<Bytes>,
        max: usize,
    },
    ListAkeys {
        cont: u128,
        obj: u128,
        dkey: Bytes,
        epoch: u64,
        after: Option<Bytes>,
        max: usize,
    },
    /// Dkeys with any version in `(since, epoch]` ([`crate::index::Index::list_dkeys_since`]).
    ListDkeysSince {
        cont: u128,
        obj: u128,
        since: u64,
        epoch: u64,
        after: Option<Bytes>,
        max: usize,
    },
    Query,
    /// One bounded scrub step ([`Target::scrub_step`]).
    Scrub {
        from: Option<ScrubCursor>,
        max_bytes: u64,
    },
    /// Puts up or lifts a repair fence ([`Target::set_fence`]).
    Fence {
        fence: Fence,
        on: bool,
    },
    /// The fences in place.
    Fences,
}

impl TargetOp {
    /// The akey a fetch reads (the first one of a versions fetch), for noting corrupt reads.
    fn fetched_path(&self) -> Option<&AkeyPath> {
        match self {
            TargetOp::FetchArray { path, .. } | TargetOp::FetchSingle { path, .. } => Some(path),
            TargetOp::FetchVersions { paths, .. } => paths.first(),
            _ => None,
        }
    }
}

/// Fetches that found stored data failing its checksum (or unreadable), for the scrubber to
/// repair: (target index, akey). Bounded ([`CorruptReads::MAX`]; more are dropped — the next
/// scrub pass finds them) and without duplicates. The scrubber waits with
/// [`CorruptReads::wait`].
#[derive(Debug, Default)]
pub struct CorruptReads {
    queue: Mutex<VecDeque<(u16, AkeyPath)>>,
    notify: Notify,
}

impl CorruptReads {
    /// Most entries kept.
    pub const MAX: usize = 1024;

    /// An empty queue.
    pub fn new() -> Arc<CorruptReads> {
        Arc::new(CorruptReads::default())
    }

    /// Notes a corrupt read of `path` on target `target`.
    pub fn note(&self, target: u16, path: AkeyPath) {
        let mut q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        if q.len() >= Self::MAX || q.iter().any(|(t, p)| *t == target && *p == path) {
            return;
        }
        q.push_back((target, path));
        drop(q);
        self.notify.notify_one();
    }

    /// Takes every entry.
    pub fn take(&self) -> Vec<(u16, AkeyPath)> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner()).drain(..).collect()
    }

    /// Waits until something is noted (at once if something was noted since the last wait).
    pub async fn wait(&self) {
        self.notify.notified().await;
    }
}

/// Where a target thread notes corrupt reads: its index and the engine's queue.
type CorruptSink = Option<(u16, Arc<CorruptReads>)>;

/// A target's answer.
#[derive(Debug)]
pub enum TargetReply {
    Done,
    /// A discard: the number of versions it deleted.
    Discarded(u64),
    Array(FetchedArray),
    /// (data, CRC64 of it, epoch written)
    Single(Option<(Bytes, u64, u64)>),
    Objects(Vec<u128>),
    Keys(Vec<Bytes>),
    Info(TargetInfo),
    Scrub(ScrubStep),
    Fences(Vec<Fence>),
}

/// The reply channel of one request.
pub type ReplyTx = oneshot::Sender<Result<TargetReply, EngineError>>;

enum Msg {
    Job(TargetOp, ReplyTx),
    Shutdown(oneshot::Sender<Result<(), EngineError>>),
}

/// A handle to a running target thread; cheap to clone.
#[derive(Debug, Clone)]
pub struct TargetHandle {
    tx: Sender<Msg>,
}

impl std::fmt::Debug for Msg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Msg::Job(op, _) => write!(f, "Job({op:?})"),
            Msg::Shutdown(_) => write!(f, "Shutdown"),
        }
    }
}

/// The current epoch as the engine sees it: nanoseconds since the Unix epoch, the physical part
/// of the hybrid logical clock clients stamp their updates with.
pub fn now_epoch() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64)
}

impl TargetHandle {
    /// Starts the thread that owns `target`.
    pub fn spawn(name: String, target: Target, max_batch: usize) -> std::io::Result<(TargetHandle, JoinHandle<()>)> {
        Self::spawn_with(name, target, max_batch, None)
    }

    /// Like [`TargetHandle::spawn`], noting fetches that find corrupt data in `corrupt` as
    /// target `index`.
    pub fn spawn_noting(
        name: String,
        target: Target,
        max_batch: usize,
        index: u16,
        corrupt: Arc<CorruptReads>,
    ) -> std::io::Result<(TargetHandle, JoinHandle<()>)> {
        Self::spawn_with(name, target, max_batch, Some((index, corrupt)))
    }

    fn spawn_with(name: String, target: Target, max_batch: usize, sink: CorruptSink) -> std::io::Result<(TargetHandle, JoinHandle<()>)> {
        let (tx, rx) = mpsc::channel();
        let handle = std::thread::Builder::new().name(name).spawn(move || run(target, &rx, max_batch.max(1), &sink))?;
        Ok((TargetHandle { tx }, handle))
    }

    /// Submits a request; the answer arrives on the returned receiver. If the thread is gone the
    /// receiver reports a closed channel.
    pub fn submit(&self, op: TargetOp) -> oneshot::Receiver<Result<TargetReply, EngineError>> {
        let (tx, rx) = oneshot::channel();
        let _ = self.tx.send(Msg::Job(op, tx));
        rx
    }

    /// Asks the thread to finish queued work, commit, checkpoint and stop.
    pub fn shutdown(&self) -> oneshot::Receiver<Result<(), EngineError>> {
        let (tx, rx) = oneshot::channel();
        let _ = self.tx.send(Msg::Shutdown(tx));
        rx
    }
}

/// Bytes one idle destage step moves to the data file (one data sync); requests that arrive
/// meanwhile wait at most about one such step.
const IDLE_DESTAGE_STEP: u64 = 4 << 20;
/// How long to sleep between aggregation passes that found nothing to free.
const AGGREGATION_IDLE: Duration = Duration::from_secs(1);
/// Under sustained load, one aggregation step runs after this many batches (after every batch
/// once half the space is used), so space is reclaimed even when the queue never empties.
const BATCHES_PER_AGGREGATION: u32 = 8;

fn run(mut target: Target, rx: &Receiver<Msg>, max_batch: usize, sink: &CorruptSink) {
    let mut aggregation_busy = true;
    let mut batches = 0u32;
    loop {
        let background = target.aggregation_pending() || target.destage_pending();
        let first = if background && aggregation_busy {
            rx.try_recv().map_err(|e| match e {
                mpsc::TryRecvError::Empty => RecvTimeoutError::Timeout,
                mpsc::TryRecvError::Disconnected => RecvTimeoutError::Disconnected,
            })
        } else if background {
            rx.recv_timeout(AGGREGATION_IDLE)
        } else {
            rx.recv().map_err(|_| RecvTimeoutError::Disconnected)
        };
        match first {
            Ok(msg) => {
                let mut batch = vec![msg];
                while batch.len() < max_batch {
                    match rx.try_recv() {
                        Ok(m) => batch.push(m),
                        Err(_) => break,
                    }
                }
                if let Some(done) = execute_batch(&mut target, batch, sink) {
                    let _ = done.send(target.shutdown());
                    return;
                }
                if target.destage_due() {
                    // Under load: what waits in the metadata goes to the data file, one sync.
                    if let Err(e) = target.destage_step(target.destage_waiting_bytes()) {
                        warn!(error = %e, "destage failed");
                    }
                }
                if let Err(e) = target.maybe_checkpoint(false) {
                    warn!(error = %e, "checkpoint not started");
                }
                aggregation_busy = true;
                batches += 1;
                if (batches >= BATCHES_PER_AGGREGATION || target.space_pressure()) && target.aggregation_pending() {
                    batches = 0;
                    if let Err(e) = target.aggregate_step(now_epoch()) {
                        warn!(error = %e, "aggregation step failed");
                    }
                }
            }
            // Idle: first what waits for the data file, then aggregation.
            Err(RecvTimeoutError::Timeout) if target.destage_pending() => match target.destage_step(IDLE_DESTAGE_STEP) {
                Ok(moved) => aggregation_busy = moved > 0 || target.aggregation_pending(),
                Err(e) => {
                    warn!(error = %e, "destage failed");
                    aggregation_busy = false;
                }
            },
            Err(RecvTimeoutError::Timeout) => match target.aggregate_step(now_epoch()) {
                Ok(freed) => aggregation_busy = freed > 0,
                Err(e) => {
                    warn!(error = %e, "aggregation step failed");
                    aggregation_busy = false;
                }
            },
            Err(RecvTimeoutError::Disconnected) => {
                if let Err(e) = target.shutdown() {
                    warn!(error = %e, "final checkpoint failed");
                }
                return;
            }
        }
    }
}

/// Runs one batch; returns the shutdown sender if a shutdown was requested in it.
fn execute_batch(target: &mut Target, batch: Vec<Msg>, sink: &CorruptSink) -> Option<oneshot::Sender<Result<(), EngineError>>> {
    let mut waiting = Vec::new();
    let mut shutdown = None;
    for msg in batch {
        match msg {
            Msg::Job(TargetOp::Mutate(m), tx) => {
                // A discard is planned from the committed index: whatever the batch staged
                // before it is committed (and answered) first.
                if matches!(m, Mutation::Discard { .. }) && target.has_staged() {
                    settle(target, &mut waiting);
                }
                match target.stage(m) {
                    Ok(staged) => waiting.push((tx, staged)),
                    Err(e) => {
                        let _ = tx.send(Err(e));
                    }
                }
            }
            Msg::Job(TargetOp::Fence { fence, on }, tx) => {
                let _ = tx.send(target.set_fence(fence, on).map(|()| TargetReply::Done));
            }
            Msg::Job(op, tx) => {
                let fetched = sink.as_ref().and_then(|_| op.fetched_path().cloned());
                let reply = read(target, op);
                if let (Err(EngineError::DataCorrupt(_) | EngineError::Io { .. }), Some(path), Some((index, corrupt))) =
                    (&reply, fetched, sink)
                {
                    // A fenced dkey is being repaired already.
                    if !target.is_fenced(&path) {
                        corrupt.note(*index, path);
                    }
                }
                let _ = tx.send(reply);
            }
            Msg::Shutdown(tx) => shutdown = Some(tx),
        }
    }
    settle(target, &mut waiting);
    shutdown
}

/// Commits what is staged and answers the mutations waiting for it.
fn settle(target: &mut Target, waiting: &mut Vec<(ReplyTx, Staged)>) {
    match target.commit() {
        Ok(()) => {
            for (tx, staged) in waiting.drain(..) {
                let reply = match staged {
                    Staged::Done => TargetReply::Done,
                    Staged::Discarded { versions } => TargetReply::Discarded(versions),
                };
                let _ = tx.send(Ok(reply));
            }
        }
        Err(e) => {
            let msg = e.to_string();
            for (tx, _) in waiting.drain(..) {
                let _ = tx.send(Err(EngineError::Failed(msg.clone())));
            }
        }
    }
}

fn read(target: &Target, op: TargetOp) -> Result<TargetReply, EngineError> {
    let idx = target.index();
    Ok(match op {
        TargetOp::Mutate(_) => return Err(EngineError::Invalid("mutation routed as a read".into())),
        TargetOp::FetchArray { path, offset, len, epoch } => TargetReply::Array(target.fetch_array(&path, offset, len, epoch)?),
        TargetOp::FetchVersions { paths, offset, len, epoch } => TargetReply::Array(target.fetch_versions(&paths, offset, len, epoch)?),
        TargetOp::FetchSingle { path, epoch } => TargetReply::Single(target.fetch_single(&path, epoch)?),
        TargetOp::ListObjects { cont, epoch, after, max } => TargetReply::Objects(idx.list_objects(cont, epoch, after, max)),
        TargetOp::ListDkeys { cont, obj, epoch, after, max } => TargetReply::Keys(idx.list_dkeys(cont, obj, epoch, after.as_ref(), max)),
        TargetOp::ListAkeys { cont, obj, dkey, epoch, after, max } => {
            TargetReply::Keys(idx.list_akeys(cont, obj, &dkey, epoch, after.as_ref(), max))
        }
        TargetOp::ListDkeysSince { cont, obj, since, epoch, after, max } => {
            TargetReply::Keys(idx.list_dkeys_since(cont, obj, since, epoch, after.as_ref(), max))
        }
        TargetOp::Query => TargetReply::Info(target.info()),
        TargetOp::Scrub { from, max_bytes } => TargetReply::Scrub(target.scrub_step(from.as_ref(), max_bytes)),
        TargetOp::Fences => TargetReply::Fences(target.fences()),
        TargetOp::Fence { .. } => return Err(EngineError::Invalid("fence routed as a read".into())),
    })
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::backend::{MemStorage, Storage};
    use crate::target::{TargetConfig, UpdateValue};

    #[test]
    fn a_discard_sees_every_mutation_queued_before_it() {
        let target = Target::open(Arc::new(MemStorage::new()), TargetConfig::default()).unwrap();
        let (h, thread) = TargetHandle::spawn("t".into(), target, 64).unwrap();
        let path = AkeyPath { cont: 1, obj: 2, dkey: Bytes::from_static(b"d"), akey: Bytes::from_static(b"a") };
        let update = |epoch| {
            let value = UpdateValue::array(0, Bytes::from(vec![epoch as u8; 100]));
            TargetOp::Mutate(Mutation::Update { path: path.clone(), epoch, value })
        };
        let discard = |above| TargetOp::Mutate(Mutation::Discard { cont: 1, obj: 2, above, below: u64::MAX, dkey: None });
        // Queued back to back, so that they usually share batches: each discard still deletes
        // the update queued just before it, and mutations after it are applied after it.
        let replies: Vec<_> = [update(20), discard(10), update(30), update(5), discard(25), discard(25)].map(|op| h.submit(op)).into();
        let got: Vec<String> = replies.into_iter().map(|r| format!("{:?}", r.blocking_recv().unwrap().unwrap())).collect();
        assert_eq!(got, ["Done", "Discarded(1)", "Done", "Done", "Discarded(1)", "Discarded(0)"]);
        let read = h.submit(TargetOp::FetchArray { path: path.clone(), offset: 0, len: 100, epoch: u64::MAX });
        match read.blocking_recv().unwrap().unwrap() {
            TargetReply::Array(a) => assert_eq!((a.data[0], a.holes.len()), (5, 0)),
            r => panic!("{r:?}"),
        }
        h.shutdown().blocking_recv().unwrap().unwrap();
        thread.join().unwrap();
    }

    #[test]
    fn fetches_of_corrupt_data_are_noted_once_unless_fenced() {
        let mem = MemStorage::new();
        // The update goes straight to the data file, which the test corrupts.
        let cfg = TargetConfig { wal_data_max: 0, ..TargetConfig::default() };
        let target = Target::open(Arc::new(mem.clone()), cfg).unwrap();
        let corrupt = CorruptReads::new();
        let (h, thread) = TargetHandle::spawn_noting("t".into(), target, 64, 3, corrupt.clone()).unwrap();
        let path = AkeyPath { cont: 1, obj: 2, dkey: Bytes::from_static(b"d"), akey: Bytes::from_static(b"a") };
        let value = UpdateValue::array(0, Bytes::from(vec![7u8; 8192]));
        h.submit(TargetOp::Mutate(Mutation::Update { path: path.clone(), epoch: 5, value })).blocking_recv().unwrap().unwrap();
        let fetch = || {
            let r = h.submit(TargetOp::FetchArray { path: path.clone(), offset: 0, len: 8192, epoch: 9 }).blocking_recv().unwrap();
            matches!(r, Err(EngineError::DataCorrupt(_)))
        };
        assert!(!fetch());
        assert!(corrupt.take().is_empty());
        // The first (and only) update went to block 0.
        mem.open(crate::target::DATA_FILE, false).unwrap().write_at(&[0xee], 5000).unwrap();
        assert!(fetch() && fetch());
        assert_eq!(corrupt.take(), vec![(3, path.clone())], "noted once");
        // A fenced dkey is being repaired: not noted again.
        let fence = TargetOp::Fence { fence: Fence::of(&path), on: true };
        h.submit(fence).blocking_recv().unwrap().unwrap();
        assert!(fetch());
        assert!(corrupt.take().is_empty());
        match h.submit(TargetOp::Fences).blocking_recv().unwrap().unwrap() {
            TargetReply::Fences(f) => assert_eq!(f, vec![Fence::of(&path)]),
            r => panic!("{r:?}"),
        }
        h.shutdown().blocking_recv().unwrap().unwrap();
        thread.join().unwrap();
    }
}
