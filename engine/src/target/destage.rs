//! Destaging: array extents that a commit kept in the metadata (and so in its WAL record) move
//! to the data file, many per data sync.
//!
//! An update of at most `wal_data_max` bytes is committed with its data inside the WAL record:
//! one device flush (the WAL's) makes it durable, instead of a data sync and a WAL sync. Its
//! blocks in the data file are kept free meanwhile ([`Target::free_blocks`]). A destage step
//! allocates them, writes the data, syncs the data file once, and commits one WAL record of
//! `Aggregate` ops that replace each inline extent by the same extent (same offset, length,
//! version and checksums) in the data file. A crash before that record is durable leaves the
//! written blocks unreferenced (free again at recovery) and the extents inline, to be destaged
//! again; after it, the index points at data that was synced first. Recovery finds the waiting
//! extents by scanning the index ([`Target::find_waiting_extents`]).

use bytes::Bytes;

use super::{Target, BLOCK};
use crate::index::{Akey, Version};
use crate::op::{Extent, Loc, Op, Stored};
use crate::EngineError;

impl Target {
    /// Whether enough bytes wait in the metadata to destage now, under load.
    pub fn destage_due(&self) -> bool {
        self.destage_pending_bytes >= self.cfg.destage_bytes
    }

    /// Whether anything waits in the metadata for the data file.
    pub fn destage_pending(&self) -> bool {
        !self.destage.is_empty()
    }

    /// Bytes waiting in the metadata for the data file.
    pub fn destage_waiting_bytes(&self) -> u64 {
        self.destage_pending_bytes
    }

    /// Notes, after recovery, every array extent kept in the metadata that belongs in the data
    /// file (longer than `inline_max`).
    pub(super) fn find_waiting_extents(&mut self) {
        for path in self.index.akey_paths() {
            let Some(akey) = self.index.akey(&path) else { continue };
            let (blocks, bytes) = kept_for(&waiting(akey, self.cfg.inline_max));
            if blocks > 0 {
                self.destage.insert(path, (blocks, bytes));
                self.destage_blocks += blocks;
                self.destage_pending_bytes += bytes;
            }
        }
    }

    /// Moves at least `max_bytes` (whole akeys at a time) of the extents waiting in the
    /// metadata to the data file: one data sync and one WAL record. Only when nothing is staged
    /// (it is planned from the committed index). Returns the bytes moved.
    pub fn destage_step(&mut self, max_bytes: u64) -> Result<u64, EngineError> {
        if !self.settled() || self.destage.is_empty() {
            return Ok(0);
        }
        self.check_healthy()?;
        let mut moved = 0u64;
        let mut ops = Vec::new();
        while moved < max_bytes {
            let Some((path, (kept, bytes))) = self.destage.pop_first() else { break };
            self.destage_blocks -= kept;
            self.destage_pending_bytes = self.destage_pending_bytes.saturating_sub(bytes);
            let mut remove_extents = Vec::new();
            let mut add_extents = Vec::new();
            let mut exts = self.index.akey(&path).map(|a| waiting(a, self.cfg.inline_max)).unwrap_or_default().into_iter();
            // What finds no contiguous run now: it waits (its blocks stay kept).
            let mut left = Vec::new();
            for w in exts.by_ref() {
                let Some(start) = self.alloc.alloc(w.len.div_ceil(BLOCK)) else {
                    left.push(w);
                    break;
                };
                let Waiting { offset, version, len, data, csums } = w;
                self.pending_writes.push((start * BLOCK, data));
                remove_extents.push((offset, version));
                add_extents.push(Extent { offset, len, version, data: Some(Stored { loc: Loc::Blocks { start }, len, csums }) });
                moved += len;
            }
            left.extend(exts);
            if !remove_extents.is_empty() {
                ops.push(Op::Aggregate {
                    path: path.clone(),
                    remove_extents,
                    add_extents,
                    remove_singles: Vec::new(),
                    remove_punches: Vec::new(),
                });
            }
            if !left.is_empty() {
                let rest = kept_for(&left);
                self.destage.insert(path, rest);
                self.destage_blocks += rest.0;
                self.destage_pending_bytes += rest.1;
                break;
            }
        }
        if ops.is_empty() {
            return Ok(0);
        }
        self.staged.extend(ops);
        // On failure the target is failed; the blocks are free again at the next start.
        self.commit()?;
        self.stats.destaged += moved;
        Ok(moved)
    }
}

/// One extent waiting in the metadata for the data file.
struct Waiting {
    offset: u64,
    version: Version,
    len: u64,
    data: Bytes,
    csums: Vec<u64>,
}

/// The array extents of `akey` kept in the metadata though longer than `inline_max`.
fn waiting(akey: &Akey, inline_max: u64) -> Vec<Waiting> {
    akey.extents
        .iter()
        .filter_map(|(&(offset, version), body)| match &body.data {
            Some(Stored { loc: Loc::Inline(data), len, csums }) if *len > inline_max => {
                Some(Waiting { offset, version, len: *len, data: data.clone(), csums: csums.clone() })
            }
            _ => None,
        })
        .collect()
}

/// The blocks to keep free for `exts`, and their bytes.
fn kept_for(exts: &[Waiting]) -> (u64, u64) {
    exts.iter().fold((0, 0), |(b, n), w| (b + w.len.div_ceil(BLOCK), n + w.len))
}
