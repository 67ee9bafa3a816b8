//! The thread that owns one [`Target`]: the only code that touches that target's files, with the
//! target's sync thread.
//!
//! Requests arrive on a channel. The loop takes everything that is queued (up to `max_batch`),
//! answers reads at once, and stages every mutation. Commits are pipelined
//! (`target/commit.rs`): when no commit is in flight, what is staged starts one at once and its
//! [`SyncJob`] goes to the sync thread; while it syncs, the loop keeps taking requests, staging
//! them and writing their data early, and when the sync reports back it applies the commit,
//! answers its mutations and starts the next commit with everything staged meanwhile. A lone
//! mutation with nothing queued behind it (QD1) is made durable on this thread instead: the
//! hand-off would only add two thread switches to its latency. A discard
//! is planned from the committed index, so when one comes, what came before it is committed and
//! answered first. Every few commits (and whenever destage or a checkpoint is due), the loop
//! settles the target and runs the background steps: destaging small updates' data to the data
//! file, starting checkpoints, bounded aggregation; when idle it destages what waits, then
//! aggregates; with nothing to do it blocks, so an idle engine uses no CPU.
//!
//! Scrub runs here too, as bounded steps the scrubber (`scrub`) asks for like any read
//! ([`TargetOp::Scrub`]), so it never races the index. A fetch that finds stored data failing its
//! checksum is noted in the engine's [`CorruptReads`] for the scrubber to repair.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use crossbeam_channel::{self as channel, Receiver, RecvTimeoutError, Sender, TryRecvError};
use tokio::sync::{oneshot, Notify};
use tracing::warn;

use crate::op::AkeyPath;
use crate::target::{
    ContainerUsage, Fence, FetchedArray, Mutation, ScrubCursor, ScrubStep, Snapshots, Staged, SyncJob, Target, TargetInfo,
};
use crate::EngineError;

/// What a client asks of a target.
#[derive(Debug)]
pub enum TargetOp {
    /// A mutation for background work (rebuild, reintegration, repair: versions already durable
    /// elsewhere, at their original epochs) or a tool: not held to the commit window.
    Mutate(Mutation),
    /// A host's mutation: refused if its epoch is at or below the target's floor
    /// (`target/stable.rs`).
    HostMutate(Mutation),
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
    /// [`Target::fetch_epochs`].
    FetchEpochs {
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
    /// The management service's snapshots ([`Target::set_snapshots`]).
    Snapshots(Arc<Snapshots>),
    /// The space each container takes ([`Target::usage`]).
    Usage,
    /// How far the engine's EC aggregator settled a container ([`Target::settle_ec`]).
    SettleEc {
        cont: Option<u128>,
        below: u64,
    },
}

impl TargetOp {
    /// The akey a fetch reads (the first one of a versions fetch), for noting corrupt reads.
    fn fetched_path(&self) -> Option<&AkeyPath> {
        match self {
            TargetOp::FetchArray { path, .. } | TargetOp::FetchSingle { path, .. } => Some(path),
            TargetOp::FetchVersions { paths, .. } | TargetOp::FetchEpochs { paths, .. } => paths.first(),
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
    Usage(Vec<ContainerUsage>),
    /// (start, length, epoch, range punch) runs of an epochs fetch.
    Epochs(Vec<(u32, u32, u64, bool)>),
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
        let (tx, rx) = channel::unbounded();
        let syncer = Syncer::spawn(&name)?;
        let handle = std::thread::Builder::new().name(name).spawn(move || run(target, syncer, &rx, max_batch.max(1), sink))?;
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

/// What the target thread waits for.
enum Event {
    Msg(Msg),
    /// The commit in flight is durable (or failed).
    Synced(Result<(), EngineError>),
    Timeout,
    Disconnected,
}

/// The thread that runs [`SyncJob`]s: it makes one commit durable while the target thread
/// receives and stages the next.
struct Syncer {
    jobs: Option<Sender<SyncJob>>,
    done: Receiver<Result<(), EngineError>>,
    thread: Option<JoinHandle<()>>,
}

impl Syncer {
    fn spawn(name: &str) -> std::io::Result<Syncer> {
        let (jobs, job_rx) = channel::bounded::<SyncJob>(1);
        let (done_tx, done) = channel::bounded(1);
        let thread = std::thread::Builder::new().name(format!("{name}-sync")).spawn(move || {
            for job in job_rx {
                if done_tx.send(job.run()).is_err() {
                    return;
                }
            }
        })?;
        Ok(Syncer { jobs: Some(jobs), done, thread: Some(thread) })
    }
}

impl Drop for Syncer {
    fn drop(&mut self) {
        self.jobs.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A target, its sync thread, and the mutations waiting for a commit.
struct Worker {
    target: Target,
    syncer: Syncer,
    /// Mutations in the commit in flight: answered when it finishes.
    syncing: Vec<(ReplyTx, Staged)>,
    /// Mutations staged for the next commit.
    waiting: Vec<(ReplyTx, Staged)>,
    sink: CorruptSink,
    /// Commits since the last aggregation step.
    commits: u32,
}

/// Answers mutations with their commit's outcome.
fn answer(waiting: Vec<(ReplyTx, Staged)>, result: &Result<(), EngineError>) {
    for (tx, staged) in waiting {
        let reply = match (result, staged) {
            (Ok(()), Staged::Done) => Ok(TargetReply::Done),
            (Ok(()), Staged::Discarded { versions }) => Ok(TargetReply::Discarded(versions)),
            (Err(e), _) => Err(EngineError::Failed(e.to_string())),
        };
        let _ = tx.send(reply);
    }
}

impl Worker {
    /// Starts committing what is staged; no commit may be in flight. `inline`: make it durable
    /// on this thread and finish it before returning.
    fn start_commit(&mut self, inline: bool) {
        match self.target.commit_start() {
            Ok(Some(job)) => {
                self.syncing = std::mem::take(&mut self.waiting);
                if inline {
                    let synced = job.run();
                    self.finish(synced);
                    return;
                }
                let sent = self.syncer.jobs.as_ref().is_some_and(|jobs| jobs.send(job).is_ok());
                if !sent {
                    self.finish(Err(EngineError::Failed("the sync thread is gone".into())));
                }
            }
            Ok(None) => answer(std::mem::take(&mut self.waiting), &Ok(())),
            Err(e) => answer(std::mem::take(&mut self.waiting), &Err(e)),
        }
    }

    /// Ends the commit in flight and answers its mutations.
    fn finish(&mut self, synced: Result<(), EngineError>) {
        let result = self.target.commit_finish(synced);
        answer(std::mem::take(&mut self.syncing), &result);
    }

    /// Waits for the commit in flight, if any.
    fn drain(&mut self) {
        if self.target.in_flight() {
            let synced = self.syncer.done.recv().unwrap_or_else(|_| Err(EngineError::Failed("the sync thread is gone".into())));
            self.finish(synced);
        }
    }

    /// Commits everything and waits for it: afterwards the target is settled.
    fn settle(&mut self) {
        self.drain();
        if self.target.has_staged() || !self.waiting.is_empty() {
            self.start_commit(true);
        }
    }

    /// After a commit finished: background work if it is due (on a settled target), then the
    /// next commit with whatever was staged meanwhile.
    fn after_commit(&mut self) {
        self.commits += 1;
        let aggregate = (self.commits >= BATCHES_PER_AGGREGATION || self.target.space_pressure()) && self.target.aggregation_pending();
        if aggregate || self.target.destage_due() || self.target.checkpoint_due() {
            self.settle();
            if self.target.destage_due() {
                // Under load: what waits in the metadata goes to the data file, one sync.
                if let Err(e) = self.target.destage_step(self.target.destage_waiting_bytes()) {
                    warn!(error = %e, "destage failed");
                }
            }
            if let Err(e) = self.target.maybe_checkpoint(false) {
                warn!(error = %e, "checkpoint not started");
            }
            if aggregate {
                self.commits = 0;
                if let Err(e) = self.target.aggregate_step(now_epoch()) {
                    warn!(error = %e, "aggregation step failed");
                }
            }
        }
        if self.target.has_staged() || !self.waiting.is_empty() {
            self.start_commit(false);
        }
    }
}

fn run(target: Target, syncer: Syncer, rx: &Receiver<Msg>, max_batch: usize, sink: CorruptSink) {
    let mut w = Worker { target, syncer, syncing: Vec::new(), waiting: Vec::new(), sink, commits: 0 };
    let mut aggregation_busy = true;
    loop {
        let background = w.target.aggregation_pending() || w.target.destage_pending();
        let event = if w.target.in_flight() {
            channel::select! {
                recv(rx) -> m => m.map_or(Event::Disconnected, Event::Msg),
                recv(w.syncer.done) -> r => Event::Synced(r.unwrap_or_else(|_| Err(EngineError::Failed("the sync thread is gone".into())))),
            }
        } else {
            let got = if background && aggregation_busy {
                rx.try_recv().map_err(|e| match e {
                    TryRecvError::Empty => RecvTimeoutError::Timeout,
                    TryRecvError::Disconnected => RecvTimeoutError::Disconnected,
                })
            } else if background {
                rx.recv_timeout(AGGREGATION_IDLE)
            } else {
                rx.recv().map_err(|_| RecvTimeoutError::Disconnected)
            };
            match got {
                Ok(m) => Event::Msg(m),
                Err(RecvTimeoutError::Timeout) => Event::Timeout,
                Err(RecvTimeoutError::Disconnected) => Event::Disconnected,
            }
        };
        // The commit window's floor follows the clock (and the stable epoch with it when idle).
        w.target.advance_floor(now_epoch());
        match event {
            Event::Synced(synced) => {
                w.finish(synced);
                w.after_commit();
            }
            Event::Msg(msg) => {
                let mut batch = vec![msg];
                while batch.len() < max_batch {
                    match rx.try_recv() {
                        Ok(m) => batch.push(m),
                        Err(_) => break,
                    }
                }
                if let Some(done) = w.execute_batch(batch) {
                    w.settle();
                    let _ = done.send(w.target.shutdown());
                    return;
                }
                if !w.target.in_flight() {
                    // A lone mutation with nothing queued behind it (QD1) commits on this thread:
                    // handing it to the sync thread and back would only add two thread switches
                    // to its latency, with nothing to stage meanwhile.
                    let lone = w.waiting.len() <= 1 && rx.is_empty();
                    w.start_commit(lone);
                    if lone {
                        w.after_commit();
                    }
                } else if let Err(e) = w.target.write_staged_data() {
                    // The target is failed: the staged mutations get the error at their commit.
                    warn!(error = %e, "writing staged data failed");
                }
                aggregation_busy = true;
            }
            // Idle (nothing staged or in flight): first what waits for the data file, then aggregation.
            Event::Timeout if w.target.destage_pending() => match w.target.destage_step(IDLE_DESTAGE_STEP) {
                Ok(moved) => aggregation_busy = moved > 0 || w.target.aggregation_pending(),
                Err(e) => {
                    warn!(error = %e, "destage failed");
                    aggregation_busy = false;
                }
            },
            Event::Timeout => match w.target.aggregate_step(now_epoch()) {
                Ok(freed) => aggregation_busy = freed > 0,
                Err(e) => {
                    warn!(error = %e, "aggregation step failed");
                    aggregation_busy = false;
                }
            },
            Event::Disconnected => {
                w.settle();
                if let Err(e) = w.target.shutdown() {
                    warn!(error = %e, "final checkpoint failed");
                }
                return;
            }
        }
    }
}

impl Worker {
    /// Handles one batch of requests: answers reads, stages mutations into `waiting`. Returns the
    /// shutdown sender if a shutdown was requested in it.
    fn execute_batch(&mut self, batch: Vec<Msg>) -> Option<oneshot::Sender<Result<(), EngineError>>> {
        let mut shutdown = None;
        for msg in batch {
            match msg {
                Msg::Job(TargetOp::Mutate(m), tx) => self.stage_one(m, false, tx),
                Msg::Job(TargetOp::HostMutate(m), tx) => self.stage_one(m, true, tx),
                Msg::Job(TargetOp::Fence { fence, on }, tx) => {
                    let _ = tx.send(self.target.set_fence(fence, on).map(|()| TargetReply::Done));
                }
                Msg::Job(TargetOp::Snapshots(s), tx) => {
                    self.target.set_snapshots(s);
                    let _ = tx.send(Ok(TargetReply::Done));
                }
                Msg::Job(TargetOp::SettleEc { cont, below }, tx) => {
                    self.target.settle_ec(cont, below);
                    let _ = tx.send(Ok(TargetReply::Done));
                }
                Msg::Job(TargetOp::Usage, tx) => {
                    let _ = tx.send(Ok(TargetReply::Usage(self.target.usage())));
                }
                Msg::Job(op, tx) => {
                    let fetched = self.sink.as_ref().and_then(|_| op.fetched_path().cloned());
                    let reply = read(&self.target, op);
                    if let (Err(EngineError::DataCorrupt(_) | EngineError::Io { .. }), Some(path), Some((index, corrupt))) =
                        (&reply, fetched, &self.sink)
                    {
                        // A fenced dkey is being repaired already.
                        if !self.target.is_fenced(&path) {
                            corrupt.note(*index, path);
                        }
                    }
                    let _ = tx.send(reply);
                }
                Msg::Shutdown(tx) => shutdown = Some(tx),
            }
        }
        shutdown
    }

    /// Stages one mutation (a host's: held to the commit window) and queues its answer for its
    /// commit, or answers its refusal at once.
    fn stage_one(&mut self, m: Mutation, host: bool, tx: ReplyTx) {
        // A discard is planned from the committed index: whatever came before it is committed
        // (and answered) first.
        if matches!(m, Mutation::Discard { .. }) && !self.target.settled() {
            self.settle();
        }
        let staged = if host { self.target.stage_host(m) } else { self.target.stage(m) };
        match staged {
            Ok(staged) => self.waiting.push((tx, staged)),
            Err(e) => {
                let _ = tx.send(Err(e));
            }
        }
    }
}

fn read(target: &Target, op: TargetOp) -> Result<TargetReply, EngineError> {
    let idx = target.index();
    Ok(match op {
        TargetOp::Mutate(_) | TargetOp::HostMutate(_) => return Err(EngineError::Invalid("mutation routed as a read".into())),
        TargetOp::FetchArray { path, offset, len, epoch } => TargetReply::Array(target.fetch_array(&path, offset, len, epoch)?),
        TargetOp::FetchVersions { paths, offset, len, epoch } => TargetReply::Array(target.fetch_versions(&paths, offset, len, epoch)?),
        TargetOp::FetchEpochs { paths, offset, len, epoch } => TargetReply::Epochs(target.fetch_epochs(&paths, offset, len, epoch)?),
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
        TargetOp::Snapshots(_) => return Err(EngineError::Invalid("snapshot list routed as a read".into())),
        TargetOp::Usage => return Err(EngineError::Invalid("space accounting routed as a read".into())),
        TargetOp::SettleEc { .. } => return Err(EngineError::Invalid("an EC settlement routed as a read".into())),
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
