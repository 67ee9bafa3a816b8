//! Checkpoints of a running target: when one is due (WAL bytes or segments since the last), the
//! index is cloned (copy-on-write) and serialised and written on a background thread; the
//! previous checkpoint is kept as a fallback and the WAL segments before it are retired.

#[allow(clippy::wildcard_imports)] // the parent module's types and imports, as if this were its body
use super::*;
use crate::wal::{free_segments, retire_segment};

/// A checkpoint being written by a background thread.
#[derive(Debug)]
pub(super) struct CheckpointJob {
    seq: u64,
    started: Instant,
    pause: Duration,
    /// Yields the checkpoint's size once it is written.
    handle: JoinHandle<Result<usize, EngineError>>,
}

/// Segments holding records after the last checkpoint (the open one included) at which a
/// checkpoint starts whatever their size: every start of the engine opens a segment, so
/// repeated crashes under light load would otherwise pile up small segments, and replay with
/// them, without ever reaching `checkpoint_wal_bytes`.
pub const CHECKPOINT_SEGMENTS: u64 = 4;

/// Writes a checkpoint file atomically, then removes the files the previous checkpoint
/// (`keep_from`, kept as a fallback) no longer needs.
pub(super) fn write_checkpoint(storage: &dyn Storage, seq: u64, image: &[u8], keep_from: u64) -> Result<(), EngineError> {
    let name = checkpoint_name(seq);
    let tmp = format!("{name}.tmp");
    let f = storage.open(&tmp, true).map_err(|e| EngineError::io(&tmp, e))?;
    f.set_len(0).map_err(|e| EngineError::io(&tmp, e))?;
    f.write_at(image, 0).map_err(|e| EngineError::io(&tmp, e))?;
    f.sync().map_err(|e| EngineError::io(&tmp, e))?;
    storage.rename(&tmp, &name).map_err(|e| EngineError::io(&name, e))?;
    let names = storage.list().map_err(|e| EngineError::io(".", e))?;
    for old in names.iter().filter(|n| parse_checkpoint_name(n).is_some_and(|s| s < keep_from)) {
        storage.remove(old).map_err(|e| EngineError::io(old, e))?;
    }
    let mut starts: Vec<u64> = names.iter().filter_map(|n| parse_segment_name(n)).collect();
    starts.sort_unstable();
    let mut free = free_segments(&names);
    for pair in starts.windows(2) {
        if let [start, next] = pair {
            if *next <= keep_from + 1 {
                retire_segment(storage, *start, &mut free)?;
            }
        }
    }
    Ok(())
}

impl Target {
    /// Whether [`Target::maybe_checkpoint`] has work: the WAL has grown enough for a new
    /// checkpoint, or a running one has finished.
    pub fn checkpoint_due(&self) -> bool {
        match &self.checkpoint_job {
            Some(job) => job.handle.is_finished(),
            None => self.wal_grown() && self.wal.next_seq() - 1 != self.checkpoint_seq,
        }
    }

    /// Whether the WAL since the last checkpoint (across segments, including what the last start
    /// replayed) calls for a new one.
    fn wal_grown(&self) -> bool {
        self.wal_backlog >= self.cfg.checkpoint_wal_bytes || self.wal_segments >= CHECKPOINT_SEGMENTS
    }

    /// Starts a background checkpoint if the WAL has grown enough (or `force`), and reaps a
    /// finished one. Returns true when a new checkpoint was started.
    pub fn maybe_checkpoint(&mut self, force: bool) -> Result<bool, EngineError> {
        self.reap_checkpoint(false)?;
        if self.checkpoint_job.is_some() || !self.settled() || self.failed.is_some() {
            return Ok(false);
        }
        let seq = self.wal.next_seq() - 1;
        if seq == self.checkpoint_seq || !(force || self.wal_grown()) {
            return Ok(false);
        }
        let paused = Instant::now();
        self.wal.rotate()?;
        self.wal_backlog = 0;
        self.wal_segments = 1;
        // The snapshot shares every akey with the live index (copy-on-write): the pause is one
        // pointer copy per akey; serialising happens on the checkpoint thread.
        let snapshot = self.index.clone();
        let pause = paused.elapsed();
        self.max_checkpoint_pause = self.max_checkpoint_pause.max(pause);
        let storage = self.storage.clone();
        let keep_from = self.checkpoint_seq;
        let handle = std::thread::Builder::new()
            .name("checkpoint".into())
            .spawn(move || {
                let image = checkpoint::encode(&snapshot, seq);
                drop(snapshot);
                write_checkpoint(storage.as_ref(), seq, &image, keep_from).map(|()| image.len())
            })
            .map_err(|e| EngineError::io("checkpoint thread", e))?;
        self.checkpoint_job = Some(CheckpointJob { seq, started: paused, pause, handle });
        Ok(true)
    }

    /// Collects a finished checkpoint (or waits for it when `wait`).
    pub fn reap_checkpoint(&mut self, wait: bool) -> Result<(), EngineError> {
        let finished = self.checkpoint_job.as_ref().is_some_and(|j| wait || j.handle.is_finished());
        if !finished {
            return Ok(());
        }
        let Some(job) = self.checkpoint_job.take() else { return Ok(()) };
        match job.handle.join() {
            Ok(Ok(bytes)) => {
                info!(
                    seq = job.seq,
                    bytes,
                    pause_us = job.pause.as_micros() as u64,
                    total_ms = job.started.elapsed().as_millis() as u64,
                    "checkpoint written"
                );
                self.checkpoint_seq = job.seq;
                Ok(())
            }
            Ok(Err(e)) => {
                warn!(error = %e, "checkpoint failed; the WAL still holds everything");
                Err(e)
            }
            Err(_) => Err(EngineError::Failed("checkpoint thread panicked".into())),
        }
    }
}
