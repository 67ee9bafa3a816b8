//! Property tests of the volume block mapping: pieces cover a range exactly once, in order,
//! never cross a cell, and map back to the bytes they came from; stripes are full exactly when
//! covered whole.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use proptest::prelude::*;
use tessera_placement::layout::VolumeLayout;
use tessera_placement::placement::ObjectClass;

fn volume() -> impl Strategy<Value = VolumeLayout> {
    (
        prop_oneof![
            Just(ObjectClass::S1),
            Just(ObjectClass::Rp(3)),
            Just(ObjectClass::Ec { k: 2, p: 1 }),
            Just(ObjectClass::Ec { k: 4, p: 2 }),
            Just(ObjectClass::Ec { k: 3, p: 2 }),
            Just(ObjectClass::Ec { k: 8, p: 2 })
        ],
        prop_oneof![Just(512u32), Just(4096)],
        prop_oneof![Just(4096u32), Just(8192), Just(65536)],
        1u64..=4,
        1u64..=64,
    )
        .prop_map(|(class, block, cell, stripes_per_chunk, chunks)| {
            let chunk = u64::from(cell) * u64::from(class.data_shards()) * stripes_per_chunk;
            // A size that is a whole number of blocks but usually not of chunks.
            let size = (chunk * chunks).saturating_sub(u64::from(block) * (chunks % 3));
            VolumeLayout::new(size.max(u64::from(block)), block, chunk, cell, class).unwrap()
        })
}

/// A volume and a byte range inside it, biased towards boundaries.
fn volume_and_range() -> impl Strategy<Value = (VolumeLayout, u64, u64)> {
    volume().prop_flat_map(|l| {
        let size = l.size();
        let bs = u64::from(l.block_size());
        let blocks = l.blocks();
        prop_oneof![
            // Block-aligned ranges.
            (0..blocks).prop_flat_map(move |lba| (Just(lba), 1..=(blocks - lba).min(4096))).prop_map(move |(lba, n)| (lba * bs, n * bs)),
            // Any bytes.
            (0..size).prop_flat_map(move |o| (Just(o), 1..=(size - o).min(3 << 20))),
            // Ending at the last byte.
            (1..=size.min(3 << 20)).prop_map(move |n| (size - n, n)),
        ]
        .prop_map(move |(o, n)| (l, o, n))
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn pieces_cover_the_range_exactly_once_in_order((l, offset, len) in volume_and_range()) {
        let m = l.map(offset, len).unwrap();
        let cell = u64::from(l.cell_size());
        let mut next = 0u64;
        for p in &m.pieces {
            prop_assert_eq!(p.buf_offset, next, "pieces are contiguous and in order");
            prop_assert!(p.len > 0);
            prop_assert!(u64::from(p.cell_offset) + u64::from(p.len) <= cell, "a piece never crosses a cell");
            prop_assert!(p.cell < l.class().data_shards());
            prop_assert!(p.stripe < l.stripes_per_chunk());
            prop_assert_eq!(p.shard_offset, p.stripe * cell + u64::from(p.cell_offset));
            prop_assert_eq!(p.chunk_offset, p.stripe * l.stripe_size() + u64::from(p.cell) * cell + u64::from(p.cell_offset));
            // It maps back to the bytes it came from.
            prop_assert_eq!(p.dkey * l.chunk_size() + p.chunk_offset, offset + p.buf_offset);
            next += u64::from(p.len);
        }
        prop_assert_eq!(next, len, "the pieces add up to the range");
        // Consecutive pieces are split only at cell boundaries.
        for w in m.pieces.windows(2) {
            prop_assert!(u64::from(w[0].cell_offset) + u64::from(w[0].len) == cell && w[1].cell_offset == 0);
        }
        // The number of pieces is the number of cells touched.
        let first_cell = offset / cell;
        let last_cell = (offset + len - 1) / cell;
        // Cells never straddle chunks (chunks are whole stripes), so cells are volume-aligned.
        prop_assert_eq!(m.pieces.len() as u64, last_cell - first_cell + 1);
    }

    #[test]
    fn stripes_partition_the_pieces((l, offset, len) in volume_and_range()) {
        let m = l.map(offset, len).unwrap();
        let mut covered = 0usize;
        let ss = l.stripe_size();
        for (i, s) in m.stripes.iter().enumerate() {
            prop_assert_eq!(s.first_piece, covered);
            let pieces = m.stripe_pieces(s);
            prop_assert!(!pieces.is_empty());
            prop_assert!(pieces.iter().all(|p| p.dkey == s.dkey && p.stripe == s.stripe));
            prop_assert_eq!(pieces.iter().map(|p| u64::from(p.len)).sum::<u64>(), s.len);
            let start = s.dkey * l.chunk_size() + s.stripe * ss;
            let covers_whole = offset <= start && offset + len >= start + ss;
            prop_assert_eq!(s.full, covers_whole, "stripe {} full flag", i);
            if i > 0 && i + 1 < m.stripes.len() {
                prop_assert!(s.full, "every stripe strictly inside the range is full");
            }
            covered += s.piece_count;
        }
        prop_assert_eq!(covered, m.pieces.len());
    }

    #[test]
    fn out_of_range_is_refused(l in volume(), extra in 1u64..1 << 20) {
        let size = l.size();
        prop_assert!(l.map(size, 1).is_err());
        prop_assert!(l.map(0, size + extra).is_err());
        prop_assert!(l.map(size - 1, 1).is_ok());
        prop_assert!(l.map(0, size).is_ok());
    }
}
