//! Group commit, in two halves so that the target thread keeps receiving and staging while a
//! commit syncs.
//!
//! [`Target::commit_start`] takes everything staged, writes its data to the data file (direct,
//! block-aligned writes) and reserves its WAL record; it returns a [`SyncJob`]. The job, run on
//! another thread, syncs the data file, then writes the record and syncs the WAL: a record is
//! never written before the data it references is durable, so no crash can leave a record
//! pointing at unwritten blocks. [`Target::commit_finish`] then applies the batch to the index and
//! frees the blocks its aggregation released; only then may its mutations be acknowledged.
//!
//! At most one commit is in flight. While it is, the target may stage more mutations and write
//! their data early ([`Target::write_staged_data`]: no record references those blocks yet), but
//! anything planned from the committed index (discards, aggregation, destage, checkpoints) waits
//! until the target is [settled](Target::settled). [`Target::commit`] is both halves in a row.

use std::sync::Arc;

use bytes::Bytes;

use super::{Target, DATA_FILE};
use crate::backend::{AlignedBuf, StorageFile};
use crate::op::{encode_ops, AkeyPath, Op};
use crate::wal::WalAppend;
use crate::{EngineError, BLOCK};

/// A commit between its start and its finish.
#[derive(Debug)]
pub(super) struct InFlight {
    ops: Vec<Op>,
    paths: Vec<AkeyPath>,
    /// Destage bookkeeping of the batch's updates kept in the record: (akey, blocks, bytes).
    pub(super) destage: Vec<(AkeyPath, u64, u64)>,
    /// Blocks the batch stops referencing, free once its record is durable.
    quarantine: Vec<(u64, u64)>,
    /// The commit window's floor when the commit started: stable once it is applied.
    floor: u64,
}

/// The durable half of a commit: data-file sync, then the WAL record's write and sync.
#[derive(Debug)]
pub struct SyncJob {
    data: Option<Arc<dyn StorageFile>>,
    record: WalAppend,
}

impl SyncJob {
    /// Makes the commit durable. Runs on any thread; the target must not start another commit
    /// until it has passed the result to [`Target::commit_finish`].
    pub fn run(self) -> Result<(), EngineError> {
        if let Some(data) = &self.data {
            data.sync().map_err(|e| EngineError::io(DATA_FILE, e))?;
        }
        self.record.write_and_sync()
    }
}

impl Target {
    /// Whether nothing is staged and no commit is in flight: the index is all there is.
    pub fn settled(&self) -> bool {
        self.staged.is_empty() && self.in_flight.is_none()
    }

    /// Whether a commit has started and not finished.
    pub fn in_flight(&self) -> bool {
        self.in_flight.is_some()
    }

    /// Writes the data of what is staged so far, before its commit starts (while another commit
    /// syncs). The blocks are referenced by no record yet, so this is safe at any time.
    pub fn write_staged_data(&mut self) -> Result<(), EngineError> {
        if self.pending_writes.is_empty() {
            return Ok(());
        }
        self.check_healthy()?;
        let result = write_coalesced(self.data.as_ref(), &mut self.write_buf, std::mem::take(&mut self.pending_writes));
        match result {
            Ok(()) => {
                self.data_unsynced = true;
                Ok(())
            }
            Err(e) => {
                self.fail(&e);
                Err(e)
            }
        }
    }

    /// Makes every staged mutation durable (one data sync if data was written, one WAL record and
    /// its sync) and applies it. On failure nothing staged may be acknowledged and the target
    /// refuses updates.
    pub fn commit(&mut self) -> Result<(), EngineError> {
        match self.commit_start()? {
            Some(job) => {
                let synced = job.run();
                self.commit_finish(synced)
            }
            None => Ok(()),
        }
    }

    /// Starts committing everything staged: writes its data and reserves its WAL record.
    /// Returns the job that makes it durable (None if nothing is staged). Only one commit may be
    /// in flight.
    pub fn commit_start(&mut self) -> Result<Option<SyncJob>, EngineError> {
        if self.staged.is_empty() {
            return Ok(None);
        }
        let result = self.start_inner();
        if let Err(e) = &result {
            self.fail(e);
            self.staged.clear();
            self.staged_paths.clear();
            self.pending_writes.clear();
            self.destage_staged.clear();
        }
        result.map(Some)
    }

    fn start_inner(&mut self) -> Result<SyncJob, EngineError> {
        self.check_healthy()?;
        if self.in_flight.is_some() {
            return Err(EngineError::Invalid("a commit is already in flight".into()));
        }
        if !self.pending_writes.is_empty() {
            write_coalesced(self.data.as_ref(), &mut self.write_buf, std::mem::take(&mut self.pending_writes))?;
            self.data_unsynced = true;
        }
        let segment = self.wal.segment_start();
        let record = self.wal.prepare(&encode_ops(&self.staged))?;
        if self.wal.segment_start() != segment {
            self.wal_segments += 1;
        }
        self.wal_backlog += record.len();
        let data = std::mem::take(&mut self.data_unsynced).then(|| self.data.clone());
        self.in_flight = Some(InFlight {
            ops: std::mem::take(&mut self.staged),
            paths: std::mem::take(&mut self.staged_paths),
            destage: std::mem::take(&mut self.destage_staged),
            quarantine: self.alloc.take_quarantine(),
            floor: self.floor(),
        });
        Ok(SyncJob { data, record })
    }

    /// Ends the commit in flight with its [`SyncJob`]'s result: applies it to the index if it is
    /// durable, else fails the target (the batch must not be acknowledged).
    pub fn commit_finish(&mut self, synced: Result<(), EngineError>) -> Result<(), EngineError> {
        let Some(done) = self.in_flight.take() else {
            return Err(EngineError::Invalid("no commit in flight".into()));
        };
        if let Err(e) = synced {
            self.fail(&e);
            return Err(e);
        }
        self.stats.commits += 1;
        self.stats.ops += done.ops.len() as u64;
        for op in &done.ops {
            self.index.apply(op);
            self.usage.touch(op.cont());
        }
        self.dirty.extend(done.paths);
        for (path, blocks, bytes) in done.destage {
            let e = self.destage.entry(path).or_default();
            e.0 += blocks;
            e.1 += bytes;
            self.destage_blocks += blocks;
            self.destage_pending_bytes += bytes;
        }
        for (start, n) in done.quarantine {
            self.alloc.release(start, n);
        }
        self.applied_up_to(done.floor);
        Ok(())
    }
}

/// Writes a batch's data with one direct (block-aligned, page-cache-bypassing) write per
/// contiguous run, assembled in `buf`. Next-fit allocation places the updates of a batch one after
/// another, so a batch is usually one write; a value's partly filled last block is padded with
/// zeros, which also joins it to the next block.
pub(super) fn write_coalesced(file: &dyn StorageFile, buf: &mut AlignedBuf, mut writes: Vec<(u64, Bytes)>) -> Result<(), EngineError> {
    writes.sort_unstable_by_key(|w| w.0);
    let total: usize = writes.iter().map(|w| (w.1.len() as u64).next_multiple_of(BLOCK) as usize).sum();
    buf.reset(total);
    let flush = |start: u64, buf: &mut AlignedBuf| -> Result<(), EngineError> {
        let padded = (buf.len() as u64).next_multiple_of(BLOCK) as usize;
        buf.pad_to(padded);
        let result = if buf.is_empty() { Ok(()) } else { file.write_direct(buf.as_slice(), start) };
        buf.reset(0);
        result.map_err(|e| EngineError::io(DATA_FILE, e))
    };
    let mut run_start = 0u64;
    for (off, bytes) in writes {
        let joins = !buf.is_empty() && off == run_start + (buf.len() as u64).next_multiple_of(BLOCK);
        if !joins {
            flush(run_start, buf)?;
            run_start = off;
        }
        buf.pad_to((off - run_start) as usize);
        buf.extend_from_slice(&bytes);
    }
    flush(run_start, buf)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{Fault, FaultStorage, MemStorage, Storage};

    #[test]
    fn batch_data_is_written_in_contiguous_runs() {
        let mem = MemStorage::new();
        let counting = FaultStorage::new(Arc::new(mem.clone()), 0, Fault::Fail);
        let file = counting.open("d", true).unwrap();
        let writes = vec![
            (4096, Bytes::from(vec![2u8; 4096])),
            (0, Bytes::from(vec![1u8; 100])),
            (8192, Bytes::from(vec![3u8; 5000])),
            (40960, Bytes::from(vec![4u8; 10])),
        ];
        write_coalesced(file.as_ref(), &mut AlignedBuf::default(), writes).unwrap();
        assert_eq!(counting.ops(), 2, "two runs, two writes");
        let content = mem.contents("d").unwrap();
        assert_eq!(&content[..100], &[1u8; 100][..]);
        assert!(content[100..4096].iter().all(|b| *b == 0));
        assert_eq!(&content[4096..8192], &[2u8; 4096][..]);
        assert_eq!(&content[8192..13192], &[3u8; 5000][..]);
        assert_eq!(&content[40960..40970], &[4u8; 10][..]);
        assert_eq!(content.len(), 45056, "runs end on a block boundary");
    }
}
