//! The malloc bdev: a RAM disk. Memory is allocated in 1 MiB chunks on first write, so a large
//! namespace costs nothing until it is used, and deallocating a whole chunk frees it. Blocks that
//! were never written, zeroed or deallocated read as zeros.
//!
//! RAM does not survive the process: the device reports no volatile cache because a completed
//! write is as durable as this medium ever gets, and it is meant for tests and measurements.
//! Concurrency: each chunk has its own lock held only for a memcpy; the chunk table is behind a
//! read-write lock taken for writing only to grow the device.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{PoisonError, RwLock};

use bytes::{Bytes, BytesMut};

use crate::{check_range, data_len, whole_blocks, BdevError, BlockDevice, WriteData};

const CHUNK_LEN: usize = 1 << 20;

type Chunk = RwLock<Option<Box<[u8]>>>;

/// A sparse RAM block device.
#[derive(Debug)]
pub struct MallocBdev {
    block_size: u32,
    blocks: AtomicU64,
    chunks: RwLock<Vec<Chunk>>,
    allocated_chunks: AtomicU64,
}

fn chunks_for(bytes: u64) -> usize {
    bytes.div_ceil(CHUNK_LEN as u64) as usize
}

impl MallocBdev {
    /// A device of `blocks` blocks of `block_size` bytes (a power of two between 512 and 1 MiB).
    pub fn new(block_size: u32, blocks: u64) -> Result<MallocBdev, BdevError> {
        if !block_size.is_power_of_two() || !(512..=CHUNK_LEN as u32).contains(&block_size) {
            return Err(BdevError::Unsupported("block size must be a power of two from 512 to 1 MiB"));
        }
        let bytes = blocks.checked_mul(u64::from(block_size)).ok_or(BdevError::Unsupported("size overflows"))?;
        let chunks = (0..chunks_for(bytes)).map(|_| RwLock::new(None)).collect();
        Ok(MallocBdev { block_size, blocks: AtomicU64::new(blocks), chunks: RwLock::new(chunks), allocated_chunks: AtomicU64::new(0) })
    }

    /// Grows the device to `blocks` blocks; new blocks read as zeros.
    pub fn grow(&self, blocks: u64) -> Result<(), BdevError> {
        if blocks < self.num_blocks() {
            return Err(BdevError::Unsupported("shrinking a namespace"));
        }
        let bytes = blocks.checked_mul(u64::from(self.block_size)).ok_or(BdevError::Unsupported("size overflows"))?;
        let mut table = self.chunks.write().unwrap_or_else(PoisonError::into_inner);
        let want = chunks_for(bytes);
        while table.len() < want {
            table.push(RwLock::new(None));
        }
        self.blocks.store(blocks, Ordering::Release);
        Ok(())
    }

    fn byte_range(&self, lba: u64, blocks: u64) -> Result<(usize, usize), BdevError> {
        check_range(lba, blocks, self.num_blocks())?;
        let bs = u64::from(self.block_size);
        Ok(((lba * bs) as usize, (blocks * bs) as usize))
    }

    /// Calls `f(chunk_index, offset_in_chunk, len, position_in_request)` for each chunk piece of
    /// the byte range `[start, start + len)`.
    fn for_each_piece(start: usize, len: usize, mut f: impl FnMut(usize, usize, usize, usize)) {
        let mut done = 0;
        while done < len {
            let pos = start + done;
            let (idx, off) = (pos / CHUNK_LEN, pos % CHUNK_LEN);
            let n = (CHUNK_LEN - off).min(len - done);
            f(idx, off, n, done);
            done += n;
        }
    }

    fn zero_range(&self, lba: u64, blocks: u64) -> Result<(), BdevError> {
        let (start, len) = self.byte_range(lba, blocks)?;
        let table = self.chunks.read().unwrap_or_else(PoisonError::into_inner);
        Self::for_each_piece(start, len, |idx, off, n, _| {
            let Some(chunk) = table.get(idx) else { return };
            let mut slot = chunk.write().unwrap_or_else(PoisonError::into_inner);
            if n == CHUNK_LEN {
                if slot.take().is_some() {
                    self.allocated_chunks.fetch_sub(1, Ordering::Relaxed);
                }
            } else if let Some(dst) = slot.as_mut().and_then(|c| c.get_mut(off..off + n)) {
                dst.fill(0);
            }
        });
        Ok(())
    }
}

impl BlockDevice for MallocBdev {
    fn block_size(&self) -> u32 {
        self.block_size
    }

    fn num_blocks(&self) -> u64 {
        self.blocks.load(Ordering::Acquire)
    }

    fn allocated_blocks(&self) -> u64 {
        let bytes = self.allocated_chunks.load(Ordering::Relaxed) * CHUNK_LEN as u64;
        (bytes / u64::from(self.block_size)).min(self.num_blocks())
    }

    fn has_volatile_cache(&self) -> bool {
        false
    }

    async fn read(&self, lba: u64, blocks: u32) -> Result<Bytes, BdevError> {
        let (start, len) = self.byte_range(lba, u64::from(blocks))?;
        let mut out = BytesMut::zeroed(len);
        let table = self.chunks.read().unwrap_or_else(PoisonError::into_inner);
        Self::for_each_piece(start, len, |idx, off, n, at| {
            let Some(chunk) = table.get(idx) else { return };
            let slot = chunk.read().unwrap_or_else(PoisonError::into_inner);
            if let (Some(src), Some(dst)) = (slot.as_ref().and_then(|c| c.get(off..off + n)), out.get_mut(at..at + n)) {
                dst.copy_from_slice(src);
            }
        });
        Ok(out.freeze())
    }

    async fn write(&self, lba: u64, data: WriteData, _fua: bool) -> Result<(), BdevError> {
        let (start, _) = self.byte_range(lba, whole_blocks(data_len(&data), self.block_size)?)?;
        let table = self.chunks.read().unwrap_or_else(PoisonError::into_inner);
        let mut pos = start;
        for seg in data.iter() {
            Self::for_each_piece(pos, seg.len(), |idx, off, n, at| {
                let Some(chunk) = table.get(idx) else { return };
                let mut slot = chunk.write().unwrap_or_else(PoisonError::into_inner);
                let c = slot.get_or_insert_with(|| {
                    self.allocated_chunks.fetch_add(1, Ordering::Relaxed);
                    vec![0u8; CHUNK_LEN].into_boxed_slice()
                });
                if let (Some(dst), Some(src)) = (c.get_mut(off..off + n), seg.get(at..at + n)) {
                    dst.copy_from_slice(src);
                }
            });
            pos += seg.len();
        }
        Ok(())
    }

    async fn flush(&self) -> Result<(), BdevError> {
        Ok(())
    }

    async fn write_zeroes(&self, lba: u64, blocks: u64) -> Result<(), BdevError> {
        self.zero_range(lba, blocks)
    }

    async fn unmap(&self, lba: u64, blocks: u64) -> Result<(), BdevError> {
        self.zero_range(lba, blocks)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::executor::block_on;

    fn pattern(len: usize, seed: u8) -> Bytes {
        Bytes::from((0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect::<Vec<_>>())
    }

    #[test]
    fn write_read_across_chunks_and_segments() {
        let d = MallocBdev::new(512, 8192).unwrap(); // 4 MiB
        let a = pattern(CHUNK_LEN, 1);
        let b = pattern(4096, 2);
        let lba = (CHUNK_LEN as u64 - 2048) / 512; // straddles the first chunk boundary
        block_on(d.write(lba, vec![a.clone(), b.clone()].into(), false)).unwrap();
        let got = block_on(d.read(lba, ((a.len() + b.len()) / 512) as u32)).unwrap();
        assert_eq!(&got[..a.len()], &a[..]);
        assert_eq!(&got[a.len()..], &b[..]);
        assert_eq!(d.allocated_blocks(), 3 * CHUNK_LEN as u64 / 512);
        // Never written: zeros.
        assert!(block_on(d.read(8000, 8)).unwrap().iter().all(|&x| x == 0));
    }

    #[test]
    fn zeroes_and_unmap_read_back_as_zeros_and_free_whole_chunks() {
        let d = MallocBdev::new(4096, 1024).unwrap();
        block_on(d.write(0, vec![pattern(4 * CHUNK_LEN, 3)].into(), false)).unwrap();
        block_on(d.write_zeroes(1, 2)).unwrap();
        let got = block_on(d.read(0, 4)).unwrap();
        assert!(got[4096..3 * 4096].iter().all(|&x| x == 0));
        assert_ne!(&got[..4096], &[0u8; 4096][..]);
        let per_chunk = (CHUNK_LEN / 4096) as u64;
        block_on(d.unmap(per_chunk, 2 * per_chunk)).unwrap();
        assert_eq!(d.allocated_blocks(), 2 * per_chunk);
        assert!(block_on(d.read(per_chunk, 8)).unwrap().iter().all(|&x| x == 0));
    }

    #[test]
    fn range_and_alignment_errors() {
        let d = MallocBdev::new(512, 100).unwrap();
        assert!(matches!(block_on(d.read(99, 2)), Err(BdevError::OutOfRange { .. })));
        assert!(matches!(block_on(d.read(u64::MAX, 2)), Err(BdevError::OutOfRange { .. })));
        assert_eq!(block_on(d.write(0, vec![Bytes::from_static(&[0; 100])].into(), false)), Err(BdevError::Misaligned(100)));
        assert!(MallocBdev::new(1000, 1).is_err());
    }

    #[test]
    fn grow_keeps_data_and_refuses_shrink() {
        let d = MallocBdev::new(512, 10).unwrap();
        block_on(d.write(9, vec![pattern(512, 5)].into(), false)).unwrap();
        d.grow(5000).unwrap();
        assert_eq!(d.num_blocks(), 5000);
        assert_eq!(block_on(d.read(9, 1)).unwrap(), pattern(512, 5));
        block_on(d.write(4999, vec![pattern(512, 6)].into(), false)).unwrap();
        assert!(d.grow(10).is_err());
    }

    #[test]
    fn concurrent_writers_do_not_tear_blocks() {
        let d = std::sync::Arc::new(MallocBdev::new(512, 4096).unwrap());
        let hs: Vec<_> = (0..4u8)
            .map(|t| {
                let d = d.clone();
                std::thread::spawn(move || {
                    for i in 0..200u64 {
                        block_on(d.write((i * 4 + u64::from(t)) % 4096, vec![Bytes::from(vec![t; 512])].into(), false)).unwrap();
                    }
                })
            })
            .collect();
        for h in hs {
            h.join().unwrap();
        }
        for lba in 0..800 {
            let b = block_on(d.read(lba, 1)).unwrap();
            assert!(b.iter().all(|&x| x == b[0]));
        }
    }
}
