//! A volume's block mapping: byte range → chunk (dkey) → stripe → cell (data shard).
//!
//! A volume is one object. Its bytes are cut into **chunks** of `chunk_size` (default 1 MiB);
//! chunk `i` is the dkey `i` (as [`tessera_engine_proto::key_from_u64`]). Inside a chunk the
//! bytes are cut into **stripes** of `k × cell_size` (k = the class's data shards; default cell
//! 64 KiB), and a stripe into `k` **cells**: cell `c` of every stripe lives on data shard `c` of
//! the chunk's redundancy group ([`crate::placement::layout`]). On that shard the cells of a
//! chunk are packed: cell `c` of stripe `s` is at akey offset `s × cell_size`
//! ([`Piece::shard_offset`]). For an EC class the `p` parity shards hold, at the same shard
//! offsets, the parity cells of each stripe.
//!
//! For replicated classes (`S1`, `RP_n`) `k` is 1: a stripe is one cell, every piece goes to
//! shard 0 and to every replica alike, and "full stripe" has no consequence.
//!
//! [`VolumeLayout::map`] turns a byte range into the [`Piece`]s it touches, in order, each inside
//! one cell, covering the range exactly once, plus the [`StripeSpan`]s it touches and whether
//! each is written whole (a **full-stripe write**: encode parity, write k + p cells) or in part
//! (a **partial-stripe write**: the piece goes to its data shard and a copy to every parity
//! shard; no read-modify-write).

use crate::placement::ObjectClass;

/// Default chunk (dkey) size: 1 MiB (a new volume's, before rounding up to a multiple of
/// k × cell: [`default_chunk_size`]).
pub const DEFAULT_CHUNK_SIZE: u64 = 1 << 20;
/// Default cell size: 64 KiB.
pub const DEFAULT_CELL_SIZE: u32 = 64 << 10;

/// The chunk size of a new volume that names none: [`DEFAULT_CHUNK_SIZE`] rounded up to a
/// multiple of the stripe's data size, k × `cell_size` (unchanged if that is 0).
pub fn default_chunk_size(class: ObjectClass, cell_size: u32) -> u64 {
    let stripe = u64::from(cell_size) * u64::from(class.data_shards());
    if stripe == 0 {
        DEFAULT_CHUNK_SIZE
    } else {
        DEFAULT_CHUNK_SIZE.div_ceil(stripe) * stripe
    }
}

/// Why a layout or a mapping could not be made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LayoutError {
    /// Block size not a power of two in 512..=cell size.
    #[error("block size {0} must be a power of two between 512 and the cell size")]
    BlockSize(u32),
    /// Cell size not a positive multiple of 4 KiB (the checksum chunk) and of the block size.
    #[error("cell size {cell} must be a positive multiple of 4096 and of the block size {block}")]
    CellSize {
        /// Cell size.
        cell: u32,
        /// Block size.
        block: u32,
    },
    /// Chunk size not a positive multiple of the stripe's data size.
    #[error("chunk size {chunk} must be a positive multiple of the stripe size {stripe} (k × cell size)")]
    ChunkSize {
        /// Chunk size.
        chunk: u64,
        /// Stripe data size.
        stripe: u64,
    },
    /// Volume size not a multiple of the block size.
    #[error("volume size {size} must be a multiple of the block size {block}")]
    VolumeSize {
        /// Volume size.
        size: u64,
        /// Block size.
        block: u32,
    },
    /// The range is empty or leaves the volume.
    #[error("range {offset}+{len} is empty or beyond the volume's {size} bytes")]
    OutOfRange {
        /// Start.
        offset: u64,
        /// Length.
        len: u64,
        /// Volume size.
        size: u64,
    },
}

/// How a volume's bytes map onto its object.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VolumeLayout {
    size: u64,
    block_size: u32,
    chunk_size: u64,
    cell_size: u32,
    class: ObjectClass,
}

/// One piece of a mapped range: the part of it inside one cell.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Piece {
    /// Chunk index: the dkey.
    pub dkey: u64,
    /// Stripe number inside the chunk.
    pub stripe: u64,
    /// Cell index inside the stripe, which is also the data shard it lives on (0 for replicated
    /// classes, whose every shard holds it).
    pub cell: u32,
    /// Offset inside the cell.
    pub cell_offset: u32,
    /// Length (never crosses a cell).
    pub len: u32,
    /// Offset of the piece on its shard (the akey offset): `stripe × cell_size + cell_offset`.
    pub shard_offset: u64,
    /// Offset of the piece inside its chunk (the volume's view of the dkey).
    pub chunk_offset: u64,
    /// Offset of the piece inside the mapped range (the I/O buffer).
    pub buf_offset: u64,
}

impl Piece {
    /// The data shard the piece lives on (same as [`Piece::cell`]).
    pub fn shard(&self) -> u32 {
        self.cell
    }
}

/// A stripe touched by a mapped range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StripeSpan {
    /// Chunk index (dkey).
    pub dkey: u64,
    /// Stripe number inside the chunk.
    pub stripe: u64,
    /// Whether the range covers the whole stripe: a full-stripe write.
    pub full: bool,
    /// Offset of the covered part inside the stripe.
    pub stripe_offset: u64,
    /// Length of the covered part.
    pub len: u64,
    /// Index of the stripe's first piece in [`Mapping::pieces`].
    pub first_piece: usize,
    /// Number of its pieces.
    pub piece_count: usize,
}

/// A mapped byte range.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Mapping {
    /// The pieces in order of volume offset.
    pub pieces: Vec<Piece>,
    /// The stripes in order, each with the range of its pieces.
    pub stripes: Vec<StripeSpan>,
}

impl Mapping {
    /// The pieces of one stripe.
    pub fn stripe_pieces(&self, s: &StripeSpan) -> &[Piece] {
        &self.pieces[s.first_piece..s.first_piece + s.piece_count]
    }

    /// Number of stripes written whole.
    pub fn full_stripes(&self) -> usize {
        self.stripes.iter().filter(|s| s.full).count()
    }
}

impl VolumeLayout {
    /// A layout for a volume of `size` bytes. Rules: the block size is a power of two from 512
    /// up to the cell size; the cell size a positive multiple of 4096 (the checksum chunk) and of
    /// the block size; the chunk size a positive multiple of the stripe (k × cell size); the
    /// volume size a multiple of the block size.
    pub fn new(size: u64, block_size: u32, chunk_size: u64, cell_size: u32, class: ObjectClass) -> Result<VolumeLayout, LayoutError> {
        if !block_size.is_power_of_two() || block_size < 512 || block_size > cell_size.max(512) {
            return Err(LayoutError::BlockSize(block_size));
        }
        if cell_size == 0 || !cell_size.is_multiple_of(4096) || !cell_size.is_multiple_of(block_size) {
            return Err(LayoutError::CellSize { cell: cell_size, block: block_size });
        }
        let stripe = u64::from(cell_size) * u64::from(class.data_shards());
        if chunk_size == 0 || !chunk_size.is_multiple_of(stripe) {
            return Err(LayoutError::ChunkSize { chunk: chunk_size, stripe });
        }
        if !size.is_multiple_of(u64::from(block_size)) {
            return Err(LayoutError::VolumeSize { size, block: block_size });
        }
        Ok(VolumeLayout { size, block_size, chunk_size, cell_size, class })
    }

    /// A layout with the default chunk (1 MiB) and cell (64 KiB) sizes.
    pub fn with_defaults(size: u64, block_size: u32, class: ObjectClass) -> Result<VolumeLayout, LayoutError> {
        VolumeLayout::new(size, block_size, DEFAULT_CHUNK_SIZE, DEFAULT_CELL_SIZE, class)
    }

    /// Volume size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Block size in bytes.
    pub fn block_size(&self) -> u32 {
        self.block_size
    }

    /// Number of blocks.
    pub fn blocks(&self) -> u64 {
        self.size / u64::from(self.block_size)
    }

    /// Chunk (dkey) size in bytes.
    pub fn chunk_size(&self) -> u64 {
        self.chunk_size
    }

    /// Cell size in bytes.
    pub fn cell_size(&self) -> u32 {
        self.cell_size
    }

    /// The object class.
    pub fn class(&self) -> ObjectClass {
        self.class
    }

    /// Data bytes in one stripe: k × cell size.
    pub fn stripe_size(&self) -> u64 {
        u64::from(self.cell_size) * u64::from(self.class.data_shards())
    }

    /// Stripes per chunk.
    pub fn stripes_per_chunk(&self) -> u64 {
        self.chunk_size / self.stripe_size()
    }

    /// Number of chunks (dkeys) the volume spans.
    pub fn chunks(&self) -> u64 {
        self.size.div_ceil(self.chunk_size)
    }

    /// The same layout for a new volume size (online resize keeps every existing byte in place).
    pub fn resized(&self, size: u64) -> Result<VolumeLayout, LayoutError> {
        VolumeLayout::new(size, self.block_size, self.chunk_size, self.cell_size, self.class)
    }

    /// Maps `blocks` blocks starting at `lba`.
    pub fn map_blocks(&self, lba: u64, blocks: u64) -> Result<Mapping, LayoutError> {
        let bs = u64::from(self.block_size);
        let overflow = LayoutError::OutOfRange { offset: u64::MAX, len: blocks, size: self.size };
        let offset = lba.checked_mul(bs).ok_or(overflow.clone())?;
        let len = blocks.checked_mul(bs).ok_or(overflow)?;
        self.map(offset, len)
    }

    /// Maps the byte range `offset .. offset + len` (non-empty, inside the volume; any
    /// alignment) onto pieces and stripes.
    pub fn map(&self, offset: u64, len: u64) -> Result<Mapping, LayoutError> {
        let end = offset.checked_add(len).filter(|&e| len > 0 && e <= self.size);
        let Some(end) = end else {
            return Err(LayoutError::OutOfRange { offset, len, size: self.size });
        };
        let cell = u64::from(self.cell_size);
        let stripe_size = self.stripe_size();
        let mut m = Mapping::default();
        let mut pos = offset;
        while pos < end {
            let dkey = pos / self.chunk_size;
            let chunk_offset = pos % self.chunk_size;
            let stripe = chunk_offset / stripe_size;
            let in_stripe = chunk_offset % stripe_size;
            let c = in_stripe / cell;
            let cell_offset = in_stripe % cell;
            let n = (cell - cell_offset).min(end - pos);
            let piece = Piece {
                dkey,
                stripe,
                cell: c as u32,
                cell_offset: cell_offset as u32,
                len: n as u32,
                shard_offset: stripe * cell + cell_offset,
                chunk_offset,
                buf_offset: pos - offset,
            };
            match m.stripes.last_mut() {
                Some(s) if s.dkey == dkey && s.stripe == stripe => {
                    s.len += n;
                    s.piece_count += 1;
                }
                _ => m.stripes.push(StripeSpan {
                    dkey,
                    stripe,
                    full: false,
                    stripe_offset: in_stripe,
                    len: n,
                    first_piece: m.pieces.len(),
                    piece_count: 1,
                }),
            }
            m.pieces.push(piece);
            pos += n;
        }
        for s in &mut m.stripes {
            s.full = s.stripe_offset == 0 && s.len == stripe_size;
        }
        Ok(m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EC21: ObjectClass = ObjectClass::Ec { k: 2, p: 1 };
    const EC42: ObjectClass = ObjectClass::Ec { k: 4, p: 2 };
    const GIB: u64 = 1 << 30;

    #[test]
    fn validation() {
        assert!(VolumeLayout::with_defaults(GIB, 4096, EC21).is_ok());
        assert!(VolumeLayout::with_defaults(GIB, 512, EC42).is_ok());
        assert_eq!(VolumeLayout::with_defaults(GIB, 1000, EC21), Err(LayoutError::BlockSize(1000)));
        assert_eq!(VolumeLayout::with_defaults(GIB, 256, EC21), Err(LayoutError::BlockSize(256)));
        assert_eq!(VolumeLayout::new(GIB, 4096, 1 << 20, 6000, EC21), Err(LayoutError::CellSize { cell: 6000, block: 4096 }));
        assert_eq!(VolumeLayout::new(GIB, 8192, 1 << 20, 4096, EC21), Err(LayoutError::BlockSize(8192)));
        // EC_3P1 with 64 KiB cells has 192 KiB stripes: 1 MiB chunks do not fit.
        let ec31 = ObjectClass::Ec { k: 3, p: 1 };
        assert_eq!(VolumeLayout::with_defaults(GIB, 4096, ec31), Err(LayoutError::ChunkSize { chunk: 1 << 20, stripe: 192 << 10 }));
        assert!(VolumeLayout::new(GIB, 4096, 768 << 10, 64 << 10, ec31).is_ok());
        assert_eq!(VolumeLayout::with_defaults(GIB + 1, 4096, EC21), Err(LayoutError::VolumeSize { size: GIB + 1, block: 4096 }));
        let l = VolumeLayout::with_defaults(GIB, 4096, EC42).unwrap();
        assert_eq!((l.stripe_size(), l.stripes_per_chunk(), l.chunks(), l.blocks()), (256 << 10, 4, 1024, GIB / 4096));
    }

    #[test]
    fn first_and_last_block() {
        let l = VolumeLayout::with_defaults(GIB, 4096, EC21).unwrap();
        let m = l.map_blocks(0, 1).unwrap();
        assert_eq!(
            m.pieces,
            [Piece { dkey: 0, stripe: 0, cell: 0, cell_offset: 0, len: 4096, shard_offset: 0, chunk_offset: 0, buf_offset: 0 }]
        );
        assert_eq!(m.stripes.len(), 1);
        assert!(!m.stripes[0].full);
        let last = l.blocks() - 1;
        let m = l.map_blocks(last, 1).unwrap();
        // The last 4 KiB of the last chunk: stripe 7 (128 KiB stripes), cell 1, at 60 KiB.
        assert_eq!(
            m.pieces,
            [Piece {
                dkey: 1023,
                stripe: 7,
                cell: 1,
                cell_offset: 60 << 10,
                len: 4096,
                shard_offset: 7 * (64 << 10) + (60 << 10),
                chunk_offset: (1 << 20) - 4096,
                buf_offset: 0
            }]
        );
        assert!(matches!(l.map_blocks(last, 2), Err(LayoutError::OutOfRange { .. })));
        assert!(matches!(l.map_blocks(l.blocks(), 1), Err(LayoutError::OutOfRange { .. })));
        assert!(matches!(l.map(0, 0), Err(LayoutError::OutOfRange { .. })));
        assert!(matches!(l.map_blocks(u64::MAX, 1), Err(LayoutError::OutOfRange { .. })));
        assert!(matches!(l.map(u64::MAX, 2), Err(LayoutError::OutOfRange { .. })));
    }

    #[test]
    fn write_spanning_chunks() {
        // 256 KiB starting 64 KiB before the end of chunk 2, EC_4P2 (256 KiB stripes).
        let l = VolumeLayout::with_defaults(GIB, 4096, EC42).unwrap();
        let m = l.map(3 * (1 << 20) - (64 << 10), 256 << 10).unwrap();
        let got: Vec<_> = m.pieces.iter().map(|p| (p.dkey, p.stripe, p.cell, p.cell_offset, p.len)).collect();
        assert_eq!(got, [(2, 3, 3, 0, 65536), (3, 0, 0, 0, 65536), (3, 0, 1, 0, 65536), (3, 0, 2, 0, 65536)]);
        assert_eq!(m.stripes.len(), 2);
        assert!(!m.stripes[0].full && !m.stripes[1].full);
        assert_eq!(m.stripe_pieces(&m.stripes[1]).len(), 3);
    }

    #[test]
    fn full_stripes_in_a_large_aligned_write() {
        let l = VolumeLayout::with_defaults(GIB, 4096, EC21).unwrap();
        // 1 MiB aligned: one chunk, eight full 128 KiB stripes, sixteen cells.
        let m = l.map(5 << 20, 1 << 20).unwrap();
        assert_eq!(m.pieces.len(), 16);
        assert_eq!(m.full_stripes(), 8);
        assert!(m.pieces.iter().all(|p| p.dkey == 5 && p.len == 65536 && p.cell_offset == 0));
        // Shifted by one 4 KiB block: 9 stripes, the first and last partial.
        let m = l.map((5 << 20) + 4096, 1 << 20).unwrap();
        assert_eq!(m.stripes.len(), 9);
        assert_eq!(m.full_stripes(), 7);
        assert!(!m.stripes[0].full && !m.stripes[8].full);
        assert_eq!(m.stripes[8].dkey, 6);
    }

    #[test]
    fn unaligned_to_cells_and_blocks() {
        let l = VolumeLayout::new(GIB, 512, 1 << 20, 4096, EC21).unwrap();
        let m = l.map_blocks(7, 3).unwrap(); // bytes 3584 .. 5120: crosses the first cell
        let got: Vec<_> = m.pieces.iter().map(|p| (p.stripe, p.cell, p.cell_offset, p.len, p.shard_offset, p.buf_offset)).collect();
        assert_eq!(got, [(0, 0, 3584, 512, 3584, 0), (0, 1, 0, 1024, 0, 512)]);
        // A byte range not even block aligned is mapped as given.
        let m = l.map(8191, 2).unwrap();
        let got: Vec<_> = m.pieces.iter().map(|p| (p.stripe, p.cell, p.cell_offset, p.len)).collect();
        assert_eq!(got, [(0, 1, 4095, 1), (1, 0, 0, 1)]);
    }

    #[test]
    fn replicated_classes_use_shard_zero() {
        let l = VolumeLayout::with_defaults(GIB, 4096, ObjectClass::Rp(3)).unwrap();
        let m = l.map(100 << 10, 200 << 10).unwrap();
        assert!(m.pieces.iter().all(|p| p.shard() == 0));
        assert_eq!(m.pieces.iter().map(|p| p.len).sum::<u32>(), 200 << 10);
        // Stripes are single 64 KiB cells: the middle two are covered whole.
        assert_eq!(m.full_stripes(), 2);
    }
}
