//! The null bdev: accepts writes and discards them, reads return zeros. It measures the target
//! and the network alone, with no device cost.

use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;

use crate::{check_range, data_len, whole_blocks, BdevError, BlockDevice, WriteData};

/// Reads up to this size are served from one shared zero buffer without allocating.
const ZERO_BUF_LEN: usize = 1 << 20;
static ZEROS: [u8; ZERO_BUF_LEN] = [0; ZERO_BUF_LEN];

/// A device that stores nothing.
#[derive(Debug)]
pub struct NullBdev {
    block_size: u32,
    blocks: AtomicU64,
}

impl NullBdev {
    /// A null device of `blocks` blocks of `block_size` bytes.
    pub fn new(block_size: u32, blocks: u64) -> NullBdev {
        NullBdev { block_size, blocks: AtomicU64::new(blocks) }
    }

    /// Grows the device.
    pub fn grow(&self, blocks: u64) -> Result<(), BdevError> {
        if blocks < self.num_blocks() {
            return Err(BdevError::Unsupported("shrinking a namespace"));
        }
        self.blocks.store(blocks, Ordering::Release);
        Ok(())
    }
}

impl BlockDevice for NullBdev {
    fn block_size(&self) -> u32 {
        self.block_size
    }

    fn num_blocks(&self) -> u64 {
        self.blocks.load(Ordering::Acquire)
    }

    fn allocated_blocks(&self) -> u64 {
        0
    }

    fn has_volatile_cache(&self) -> bool {
        false
    }

    async fn read(&self, lba: u64, blocks: u32) -> Result<Bytes, BdevError> {
        check_range(lba, u64::from(blocks), self.num_blocks())?;
        let len = blocks as usize * self.block_size as usize;
        Ok(match ZEROS.get(..len) {
            Some(z) => Bytes::from_static(z),
            None => Bytes::from(vec![0u8; len]),
        })
    }

    async fn write(&self, lba: u64, data: WriteData, _fua: bool) -> Result<(), BdevError> {
        check_range(lba, whole_blocks(data_len(&data), self.block_size)?, self.num_blocks())
    }

    async fn flush(&self) -> Result<(), BdevError> {
        Ok(())
    }

    async fn write_zeroes(&self, lba: u64, blocks: u64) -> Result<(), BdevError> {
        check_range(lba, blocks, self.num_blocks())
    }

    async fn unmap(&self, lba: u64, blocks: u64) -> Result<(), BdevError> {
        check_range(lba, blocks, self.num_blocks())
    }
}
