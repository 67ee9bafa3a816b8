//! The virtio-blk configuration space (virtio 1.2, 5.2.4) and the feature bits the device
//! offers.
//!
//! Layout, little endian, [`CONFIG_LEN`] bytes:
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 8 | capacity, 512-byte sectors |
//! | 8 | 4 | size_max: bytes of one data segment |
//! | 12 | 4 | seg_max: data segments of one request |
//! | 16 | 4 | geometry (unused: 0) |
//! | 20 | 4 | blk_size: the logical block size |
//! | 24 | 8 | topology (physical_block_exp u8, alignment_offset u8, min_io_size u16, opt_io_size u32) |
//! | 32 | 1 | writeback (unused: 0) |
//! | 33 | 1 | unused |
//! | 34 | 2 | num_queues |
//! | 36 | 4 | max_discard_sectors |
//! | 40 | 4 | max_discard_seg |
//! | 44 | 4 | discard_sector_alignment |
//! | 48 | 4 | max_write_zeroes_sectors |
//! | 52 | 4 | max_write_zeroes_seg |
//! | 56 | 1 | write_zeroes_may_unmap |
//! | 57 | 3 | unused |

use crate::request::{Limits, SECTOR};

/// Bytes of the configuration space this device exposes.
pub const CONFIG_LEN: usize = 60;

/// Offsets of the configuration fields.
pub mod off {
    pub const CAPACITY: usize = 0;
    pub const SIZE_MAX: usize = 8;
    pub const SEG_MAX: usize = 12;
    pub const BLK_SIZE: usize = 20;
    pub const MIN_IO_SIZE: usize = 26;
    pub const OPT_IO_SIZE: usize = 28;
    pub const NUM_QUEUES: usize = 34;
    pub const MAX_DISCARD_SECTORS: usize = 36;
    pub const MAX_DISCARD_SEG: usize = 40;
    pub const DISCARD_SECTOR_ALIGNMENT: usize = 44;
    pub const MAX_WRITE_ZEROES_SECTORS: usize = 48;
    pub const MAX_WRITE_ZEROES_SEG: usize = 52;
    pub const WRITE_ZEROES_MAY_UNMAP: usize = 56;
}

/// virtio-blk feature bits (virtio 1.2, 5.2.3) and the transport ones the device offers.
pub mod feature {
    pub const SIZE_MAX: u32 = 1;
    pub const SEG_MAX: u32 = 2;
    pub const RO: u32 = 5;
    pub const BLK_SIZE: u32 = 6;
    pub const FLUSH: u32 = 9;
    pub const TOPOLOGY: u32 = 10;
    pub const MQ: u32 = 12;
    pub const DISCARD: u32 = 13;
    pub const WRITE_ZEROES: u32 = 14;
    pub const RING_INDIRECT_DESC: u32 = 28;
    pub const RING_EVENT_IDX: u32 = 29;
    pub const VERSION_1: u32 = 32;
}

/// Most sectors one discard or write-zeroes range may cover (4 GiB).
pub const MAX_ZERO_SECTORS: u32 = (4u64 << 30).div_ceil(SECTOR) as u32 - 1;

/// What the device is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    /// Logical block size, bytes.
    pub block_size: u32,
    /// Size in logical blocks.
    pub blocks: u64,
    /// Request queues.
    pub queues: u16,
    /// Refuses writes (a snapshot).
    pub read_only: bool,
    /// Chain limits.
    pub limits: Limits,
}

impl Geometry {
    /// The feature bits offered: flush (writes are durable once acknowledged anyway, so a flush
    /// costs nothing), block size, segment limits, topology, multiple queues, event index,
    /// indirect descriptors; discard and write zeroes unless read-only, where RO is offered.
    pub fn features(&self) -> u64 {
        let mut f = [
            feature::SIZE_MAX,
            feature::SEG_MAX,
            feature::BLK_SIZE,
            feature::FLUSH,
            feature::TOPOLOGY,
            feature::MQ,
            feature::RING_INDIRECT_DESC,
            feature::RING_EVENT_IDX,
            feature::VERSION_1,
        ]
        .iter()
        .fold(0u64, |acc, b| acc | 1 << b);
        if self.read_only {
            f |= 1 << feature::RO;
        } else {
            f |= 1 << feature::DISCARD | 1 << feature::WRITE_ZEROES;
        }
        f
    }

    /// The configuration space.
    pub fn config(&self) -> [u8; CONFIG_LEN] {
        let mut c = [0u8; CONFIG_LEN];
        let sectors = self.blocks.saturating_mul(u64::from(self.block_size)) / SECTOR;
        let align = self.block_size / SECTOR as u32;
        c[off::CAPACITY..off::CAPACITY + 8].copy_from_slice(&sectors.to_le_bytes());
        c[off::SIZE_MAX..off::SIZE_MAX + 4].copy_from_slice(&self.limits.size_max.to_le_bytes());
        c[off::SEG_MAX..off::SEG_MAX + 4].copy_from_slice(&self.limits.seg_max.to_le_bytes());
        c[off::BLK_SIZE..off::BLK_SIZE + 4].copy_from_slice(&self.block_size.to_le_bytes());
        // One block is the least and the best a request should move at once (no read-modify-write).
        c[off::MIN_IO_SIZE..off::MIN_IO_SIZE + 2].copy_from_slice(&1u16.to_le_bytes());
        c[off::OPT_IO_SIZE..off::OPT_IO_SIZE + 4].copy_from_slice(&1u32.to_le_bytes());
        c[off::NUM_QUEUES..off::NUM_QUEUES + 2].copy_from_slice(&self.queues.to_le_bytes());
        for (o, v) in [
            (off::MAX_DISCARD_SECTORS, MAX_ZERO_SECTORS),
            (off::MAX_DISCARD_SEG, self.limits.max_ranges),
            (off::DISCARD_SECTOR_ALIGNMENT, align),
            (off::MAX_WRITE_ZEROES_SECTORS, MAX_ZERO_SECTORS),
            (off::MAX_WRITE_ZEROES_SEG, self.limits.max_ranges),
        ] {
            c[o..o + 4].copy_from_slice(&v.to_le_bytes());
        }
        c[off::WRITE_ZEROES_MAY_UNMAP] = 1;
        c
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_config_space_describes_the_device() {
        let g = Geometry { block_size: 4096, blocks: 256, queues: 2, read_only: false, limits: Limits::default() };
        let c = g.config();
        assert_eq!(u64::from_le_bytes(c[0..8].try_into().unwrap()), 2048);
        assert_eq!(u32::from_le_bytes(c[20..24].try_into().unwrap()), 4096);
        assert_eq!(u16::from_le_bytes(c[34..36].try_into().unwrap()), 2);
        assert_eq!(u32::from_le_bytes(c[44..48].try_into().unwrap()), 8);
        assert_ne!(g.features() & 1 << feature::DISCARD, 0);
        assert_eq!(g.features() & 1 << feature::RO, 0);
        let ro = Geometry { read_only: true, ..g };
        assert_ne!(ro.features() & 1 << feature::RO, 0);
        assert_eq!(ro.features() & (1 << feature::DISCARD | 1 << feature::WRITE_ZEROES), 0);
    }
}
