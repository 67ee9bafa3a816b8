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
use crate::index::{ExtentBody, Version};
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
            let (blocks, bytes) =
                waiting(akey.extents.values(), self.cfg.inline_max).fold((0, 0), |(b, n), (len, _)| (b + len.div_ceil(BLOCK), n + len));
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
        if self.has_staged() || self.destage.is_empty() {
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
            let mut short = false;
            if let Some(akey) = self.index.akey(&path) {
                let exts: Vec<Waiting> = akey
                    .extents
                    .iter()
                    .filter_map(|(&(offset, version), body)| match &body.data {
                        Some(Stored { loc: Loc::Inline(data), len, csums }) if *len > self.cfg.inline_max => {
                            Some(Waiting { offset, version, len: *len, data: data.clone(), csums: csums.clone() })
                        }
                        _ => None,
                    })
                    .collect();
                for Waiting { offset, version, len, data, csums } in exts {
                    let Some(start) = self.alloc.alloc(len.div_ceil(BLOCK)) else {
                        short = true;
                        break;
                    };
                    self.pending_writes.push((start * BLOCK, data));
                    remove_extents.push((offset, version));
                    add_extents.push(Extent { offset, len, version, data: Some(Stored { loc: Loc::Blocks { start }, len, csums }) });
                    moved += len;
                }
            }
            if !remove_extents.is_empty() {
                ops.push(Op::Aggregate {
                    path: path.clone(),
                    remove_extents,
                    add_extents,
                    remove_singles: Vec::new(),
                    remove_punches: Vec::new(),
                });
            }
            if short {
                // No contiguous run for the rest now: it waits (its blocks stay kept).
                let moving: Vec<(u64, Version)> = ops.last().map_or_else(Vec::new, |op| match op {
                    Op::Aggregate { path: p, remove_extents, .. } if *p == path => remove_extents.clone(),
                    _ => Vec::new(),
                });
                let rest = self.index.akey(&path).map_or((0, 0), |a| {
                    a.extents
                        .iter()
                        .filter(|(key, _)| !moving.contains(key))
                        .filter_map(|(_, b)| waiting(std::iter::once(b), self.cfg.inline_max).next())
                        .fold((0, 0), |(bl, n), (len, _)| (bl + len.div_ceil(BLOCK), n + len))
                });
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

/// The extents among `bodies` kept in the metadata though longer than `inline_max`: (length,
/// data).
fn waiting<'a>(bodies: impl Iterator<Item = &'a ExtentBody>, inline_max: u64) -> impl Iterator<Item = (u64, &'a Bytes)> {
    bodies.filter_map(move |b| match &b.data {
        Some(Stored { loc: Loc::Inline(data), len, .. }) if *len > inline_max => Some((*len, data)),
        _ => None,
    })
}
