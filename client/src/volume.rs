//! Volume I/O: a volume's byte ranges read and written as erasure-coded or replicated objects
//! across engines. (Skeleton: the implementation lands next.)

use std::sync::Arc;

use bytes::Bytes;
use tessera_mgmt_api::{MgmtClient, VolumeInfo};

/// Why a volume operation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VolumeError {
    /// The range is empty, misaligned to blocks or beyond the volume.
    #[error("invalid range: {0}")]
    Range(String),
    /// Too many shards of a redundancy group are unreachable or down: the data cannot be read
    /// or written with the redundancy the class promises.
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// Every copy of the data failed its checksum or the stripe is inconsistent.
    #[error("data corrupt: {0}")]
    Corrupt(String),
    /// The volume's description is invalid (class, layout) or the pool map could not be had.
    #[error("{0}")]
    Config(String),
}

/// Counters of one volume.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VolumeStats {
    /// Reads served without the data shard (from a copy or by reconstruction).
    pub degraded_reads: u64,
    /// Checksum mismatches detected (on the engine or by the client).
    pub checksum_errors: u64,
    /// Writes that skipped an unavailable shard.
    pub degraded_writes: u64,
}

/// Shared client state: the management service, cached pool maps and one connection per
/// engine. One per process.
#[derive(Debug)]
pub struct Cluster {
    mgmt: MgmtClient,
}

impl Cluster {
    /// A cluster handle using the management service at `mgmt`.
    pub fn new(mgmt: MgmtClient) -> Arc<Cluster> {
        Arc::new(Cluster { mgmt })
    }

    /// The management client.
    pub fn mgmt(&self) -> &MgmtClient {
        &self.mgmt
    }

    /// Opens a volume (fetches its pool's map).
    pub async fn open_volume(self: &Arc<Self>, info: &VolumeInfo) -> Result<Volume, VolumeError> {
        Err(VolumeError::Config(format!("volume {} : not yet implemented", info.name)))
    }
}

/// An open volume. Cheap to clone; every method may run concurrently with any other.
#[derive(Debug, Clone)]
pub struct Volume {
    info: Arc<VolumeInfo>,
}

impl Volume {
    /// Its description.
    pub fn info(&self) -> &VolumeInfo {
        &self.info
    }

    /// Reads `len` bytes at `offset` (both multiples of the block size).
    pub async fn read(&self, offset: u64, len: u64) -> Result<Bytes, VolumeError> {
        Err(VolumeError::Range(format!("{offset}+{len}")))
    }

    /// Writes `data` at `offset` (multiples of the block size). When it returns `Ok` the data is
    /// durable on every writable shard.
    pub async fn write(&self, offset: u64, data: Bytes) -> Result<(), VolumeError> {
        Err(VolumeError::Range(format!("{offset}+{}", data.len())))
    }

    /// Makes `len` bytes at `offset` read as zeros (whole stripes punched, the rest written as
    /// zeros). Durable when it returns `Ok`.
    pub async fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), VolumeError> {
        Err(VolumeError::Range(format!("{offset}+{len}")))
    }

    /// Its counters.
    pub fn stats(&self) -> VolumeStats {
        VolumeStats::default()
    }
}
