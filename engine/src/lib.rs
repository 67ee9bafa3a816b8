//! The Tessera storage engine: per-target versioned object stores with a WAL-based metadata
//! index, served over RPC.
//!
//! - [`backend`]: the storage trait every file access goes through (real files, memory, faults).
//! - [`index`]: the in-memory versioned index (pure: no I/O).
//! - [`op`]: index operations and their encoding, shared by the WAL and checkpoints.
//! - [`wal`], [`checkpoint`]: the on-disk formats (see `docs/ENGINE-FORMATS.md`).
//! - [`alloc`]: the data file's block allocator, rebuilt from the index at start.
//! - [`target`]: one target: validation, data writes, group commit, fetch, aggregation,
//!   checkpoints, recovery, and the bounded scrub step that verifies stored checksums.
//! - [`worker`]: the thread that owns a target; [`server`]: the RPC server.
//! - [`heal`]: rebuild, reintegration and clean-up passes, paced by [`pace`] (pure: the rebuild
//!   rate by host activity); [`scrub`]: background verification of stored checksums and repair
//!   from redundancy.
#![forbid(unsafe_code)]

pub mod alloc;
pub mod backend;
pub mod checkpoint;
pub mod config;
pub mod csum;
pub mod ec_agg;
pub mod heal;
pub mod index;
pub mod membership;
pub mod op;
pub mod pace;
pub mod scrub;
pub mod server;
pub mod target;
pub mod wal;
pub mod worker;

use std::io;

use thiserror::Error;

/// Allocation and checksum granularity: 4 KiB.
pub const BLOCK: u64 = 4096;

/// Errors of the engine's storage layer.
#[derive(Debug, Error)]
pub enum EngineError {
    /// The request is malformed or out of bounds.
    #[error("invalid request: {0}")]
    Invalid(String),
    /// An update's payload does not match the checksum the client sent.
    #[error("payload checksum mismatch in 4 KiB chunk {chunk}")]
    ChecksumMismatch { chunk: usize },
    /// Stored data no longer matches its checksum.
    #[error("stored data is corrupt: {0}")]
    DataCorrupt(String),
    /// The data file has no room for the update.
    #[error("no space: {0}")]
    NoSpace(String),
    /// The request is well formed but exceeds a size limit of the engine.
    #[error("too large: {0}")]
    TooLarge(String),
    /// A host mutation at or below the target's floor (more than the commit window old).
    #[error("epoch {epoch} is at or below this target's floor {floor}: older than the commit window (retry at a new epoch; are the clocks in step?)")]
    EpochTooOld { epoch: u64, floor: u64 },
    /// A file operation failed.
    #[error("{file}: {source}")]
    Io { file: String, source: io::Error },
    /// An earlier I/O failure left the target unable to promise durability.
    #[error("target failed and refuses updates until the engine restarts: {0}")]
    Failed(String),
    /// A file failed validation at start-up.
    #[error("{file}: {reason}")]
    Corrupt { file: String, reason: String },
}

/// `N` bytes at `off` of a header, or `None` past its end (WAL and checkpoint headers).
pub(crate) fn le_bytes<const N: usize>(b: &[u8], off: usize) -> Option<[u8; N]> {
    b.get(off..off.checked_add(N)?)?.try_into().ok()
}

impl EngineError {
    /// An I/O error on `file`.
    pub fn io(file: &str, source: io::Error) -> Self {
        Self::Io { file: file.to_string(), source }
    }
}
