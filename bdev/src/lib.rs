//! The block-device (bdev) layer: what a namespace is backed by.
//!
//! [`BlockDevice`] is an async trait over fixed-size logical blocks: read, write (with FUA), flush,
//! write zeroes and unmap, plus the geometry and whether the device has a volatile write cache.
//! Buffers move as reference-counted [`Bytes`], so data received from the network reaches the
//! device without a copy and read data goes back out the same way. Every call is an independent
//! future and a device must accept many at once: the NVMe/TCP target keeps a queue depth of them
//! in flight per connection, and the network-backed DAOS bdev keeps hundreds outstanding across
//! engines.
//!
//! Modules: [`malloc`] (RAM, sparse), [`null`] (discards writes, reads zeros) and [`daos`] (a
//! Tessera volume on the storage engines). [`Bdev`] is the closed set of implementations the
//! target dispatches to without boxing.
#![forbid(unsafe_code)]

use std::future::Future;

use bytes::Bytes;

pub mod daos;
pub mod malloc;
pub mod null;

pub use daos::DaosBdev;
pub use malloc::MallocBdev;
pub use null::NullBdev;

/// Failures of a block device.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BdevError {
    /// The request addresses blocks past the end of the device.
    #[error("blocks {lba}+{blocks} are beyond the device's {size} blocks")]
    OutOfRange {
        /// First block.
        lba: u64,
        /// Number of blocks.
        blocks: u64,
        /// Device size in blocks.
        size: u64,
    },
    /// The data length is not a whole number of blocks.
    #[error("data length {0} is not a multiple of the block size")]
    Misaligned(usize),
    /// The operation is not supported by this device.
    #[error("operation not supported: {0}")]
    Unsupported(&'static str),
    /// The backing medium failed.
    #[error("I/O error: {0}")]
    Io(String),
    /// The data cannot be reached now (e.g. too many engines of a redundancy group are down);
    /// retrying later may succeed.
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// The data was reached but every copy failed its checksum; retrying will not help.
    #[error("data corrupt: {0}")]
    Corrupt(String),
    /// The device is write protected (a snapshot).
    #[error("write protected: {0}")]
    WriteProtected(String),
    /// The device's own state is inconsistent (a bug or a misconfiguration, not the medium).
    #[error("internal error: {0}")]
    Internal(String),
}

/// Data of one write, possibly in several segments (e.g. one per received data PDU). The common
/// case, one segment (in-capsule data), needs no allocation. Dereferences to the segments.
#[derive(Debug, Clone)]
pub enum WriteData {
    /// One segment (possibly empty).
    Single(Bytes),
    /// Several segments, in order.
    Segments(Vec<Bytes>),
}

impl WriteData {
    /// No data.
    pub fn empty() -> WriteData {
        WriteData::Single(Bytes::new())
    }
}

impl Default for WriteData {
    fn default() -> WriteData {
        WriteData::empty()
    }
}

impl std::ops::Deref for WriteData {
    type Target = [Bytes];
    fn deref(&self) -> &[Bytes] {
        match self {
            WriteData::Single(b) => std::slice::from_ref(b),
            WriteData::Segments(v) => v,
        }
    }
}

impl From<Bytes> for WriteData {
    fn from(b: Bytes) -> WriteData {
        WriteData::Single(b)
    }
}

impl From<Vec<Bytes>> for WriteData {
    fn from(v: Vec<Bytes>) -> WriteData {
        WriteData::Segments(v)
    }
}

/// Total length of the segments.
pub fn data_len(data: &[Bytes]) -> usize {
    data.iter().map(Bytes::len).sum()
}

/// An asynchronous block device.
pub trait BlockDevice: Send + Sync + 'static {
    /// Logical block size in bytes (a power of two, at least 512).
    fn block_size(&self) -> u32;

    /// Size in logical blocks.
    fn num_blocks(&self) -> u64;

    /// Blocks currently holding data (for thin devices; equals `num_blocks` otherwise).
    fn allocated_blocks(&self) -> u64 {
        self.num_blocks()
    }

    /// Whether completed writes may sit in a volatile cache until [`BlockDevice::flush`] (or FUA).
    fn has_volatile_cache(&self) -> bool;

    /// Whether the device refuses writes (a snapshot): [`BdevError::WriteProtected`].
    fn write_protected(&self) -> bool {
        false
    }

    /// Reads `blocks` blocks starting at `lba`.
    fn read(&self, lba: u64, blocks: u32) -> impl Future<Output = Result<Bytes, BdevError>> + Send;

    /// Writes `data` (a whole number of blocks) at `lba`. With `fua`, the data is on stable media
    /// when the future completes, whatever the cache setting.
    fn write(&self, lba: u64, data: WriteData, fua: bool) -> impl Future<Output = Result<(), BdevError>> + Send;

    /// Makes every completed write durable.
    fn flush(&self) -> impl Future<Output = Result<(), BdevError>> + Send;

    /// Zeroes `blocks` blocks at `lba`; afterwards they read as zeros.
    fn write_zeroes(&self, lba: u64, blocks: u64) -> impl Future<Output = Result<(), BdevError>> + Send;

    /// Deallocates `blocks` blocks at `lba`; afterwards they read as zeros.
    fn unmap(&self, lba: u64, blocks: u64) -> impl Future<Output = Result<(), BdevError>> + Send;
}

/// The number of whole blocks in `len` bytes, or [`BdevError::Misaligned`].
pub fn whole_blocks(len: usize, block_size: u32) -> Result<u64, BdevError> {
    if !len.is_multiple_of(block_size as usize) {
        return Err(BdevError::Misaligned(len));
    }
    Ok((len / block_size as usize) as u64)
}

/// Checks that `[lba, lba + blocks)` lies inside a device of `size` blocks.
pub fn check_range(lba: u64, blocks: u64, size: u64) -> Result<(), BdevError> {
    match lba.checked_add(blocks) {
        Some(end) if end <= size => Ok(()),
        _ => Err(BdevError::OutOfRange { lba, blocks, size }),
    }
}

/// The block devices the target can serve.
#[derive(Debug)]
pub enum Bdev {
    /// RAM-backed device.
    Malloc(MallocBdev),
    /// Device that discards writes and reads zeros.
    Null(NullBdev),
    /// A Tessera volume on the storage engines.
    Daos(DaosBdev),
}

macro_rules! dispatch {
    ($self:ident, $d:ident => $e:expr) => {
        match $self {
            Bdev::Malloc($d) => $e,
            Bdev::Null($d) => $e,
            Bdev::Daos($d) => $e,
        }
    };
}

impl Bdev {
    /// Grows the device to `blocks` blocks (shrinking is refused: it would drop host data). A
    /// DAOS bdev grows with its volume instead ([`DaosBdev::set_volume`]).
    pub fn grow(&self, blocks: u64) -> Result<(), BdevError> {
        match self {
            Bdev::Malloc(d) => d.grow(blocks),
            Bdev::Null(d) => d.grow(blocks),
            Bdev::Daos(_) => Err(BdevError::Unsupported("a DAOS bdev grows with its volume")),
        }
    }

    /// A short name of the module ("malloc", "null", "daos").
    pub fn kind(&self) -> &'static str {
        match self {
            Bdev::Malloc(_) => "malloc",
            Bdev::Null(_) => "null",
            Bdev::Daos(_) => "daos",
        }
    }
}

impl BlockDevice for Bdev {
    fn block_size(&self) -> u32 {
        dispatch!(self, d => d.block_size())
    }

    fn num_blocks(&self) -> u64 {
        dispatch!(self, d => d.num_blocks())
    }

    fn allocated_blocks(&self) -> u64 {
        dispatch!(self, d => d.allocated_blocks())
    }

    fn has_volatile_cache(&self) -> bool {
        dispatch!(self, d => d.has_volatile_cache())
    }

    fn write_protected(&self) -> bool {
        dispatch!(self, d => d.write_protected())
    }

    async fn read(&self, lba: u64, blocks: u32) -> Result<Bytes, BdevError> {
        dispatch!(self, d => d.read(lba, blocks).await)
    }

    async fn write(&self, lba: u64, data: WriteData, fua: bool) -> Result<(), BdevError> {
        dispatch!(self, d => d.write(lba, data, fua).await)
    }

    async fn flush(&self) -> Result<(), BdevError> {
        dispatch!(self, d => d.flush().await)
    }

    async fn write_zeroes(&self, lba: u64, blocks: u64) -> Result<(), BdevError> {
        dispatch!(self, d => d.write_zeroes(lba, blocks).await)
    }

    async fn unmap(&self, lba: u64, blocks: u64) -> Result<(), BdevError> {
        dispatch!(self, d => d.unmap(lba, blocks).await)
    }
}
