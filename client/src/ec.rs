//! Reed-Solomon erasure coding of stripes: `k` data cells and `p` parity cells of one size.
//!
//! The arithmetic is `reed-solomon-erasure` (GF(2^8), a Vandermonde-derived systematic generator
//! matrix, with its `simd-accel` C kernels), chosen over `reed-solomon-simd` by the benchmark in
//! `client/benches/ec.rs` (numbers in `docs/PLACEMENT.md`): encoding is as fast or faster at our
//! cell sizes, and reconstruction is 20–700× faster because `reed-solomon-simd`'s decoder pays a
//! fixed ~300 µs transform over its whole GF(2^16) field on every call. The code is systematic
//! and MDS: data cells are stored as they are, and any `k` of the `k + p` cells give back the
//! rest. The library caches the inverted decode matrix of recent loss patterns, so repeated
//! degraded reads with the same shards down pay only the multiplication.
//!
//! Cells must all have the same, non-zero length. The code is linear (parity of `a ^ b` is
//! parity of `a` ^ parity of `b`), which partial-stripe parity updates and EC aggregation can use.

use reed_solomon_erasure::galois_8::ReedSolomon;

use crate::placement::ObjectClass;

/// Why an erasure-coding operation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EcError {
    /// Unsupported k or p.
    #[error("unsupported erasure code {k}+{p}: need k >= 1, p >= 1 and k + p <= 64")]
    BadParameters {
        /// Data cells.
        k: usize,
        /// Parity cells.
        p: usize,
    },
    /// The class is not an erasure-coded one.
    #[error("object class {0} is not erasure coded")]
    NotErasureCoded(ObjectClass),
    /// The wrong number of cells was given.
    #[error("expected {expected} cells, got {got}")]
    WrongCellCount {
        /// Expected count.
        expected: usize,
        /// Given count.
        got: usize,
    },
    /// Cells of different lengths, or empty cells.
    #[error("cell {index} is {len} bytes but the stripe's cells are {expected} bytes (cells must be equal and non-empty)")]
    CellSize {
        /// Which cell.
        index: usize,
        /// Its length.
        len: usize,
        /// The stripe's cell length.
        expected: usize,
    },
    /// More cells are missing than there are parity cells.
    #[error("{lost} of {total} cells are lost but the code tolerates at most {p}: the stripe cannot be reconstructed")]
    TooManyLost {
        /// Cells missing.
        lost: usize,
        /// Cells in the stripe.
        total: usize,
        /// Parity cells.
        p: usize,
    },
    /// The coding library refused (should not happen after the checks above).
    #[error("erasure coding failed: {0}")]
    Backend(String),
}

impl From<reed_solomon_erasure::Error> for EcError {
    fn from(e: reed_solomon_erasure::Error) -> Self {
        EcError::Backend(format!("{e:?}"))
    }
}

/// A `k + p` Reed-Solomon code. `Send + Sync`: share one per object class.
#[derive(Debug)]
pub struct Codec {
    k: usize,
    p: usize,
    rs: ReedSolomon,
}

impl Codec {
    /// Largest `k + p`.
    pub const MAX_CELLS: usize = 64;

    /// A code with `k` data and `p` parity cells per stripe.
    pub fn new(k: usize, p: usize) -> Result<Codec, EcError> {
        if k == 0 || p == 0 || k + p > Self::MAX_CELLS {
            return Err(EcError::BadParameters { k, p });
        }
        let rs = ReedSolomon::new(k, p).map_err(|_| EcError::BadParameters { k, p })?;
        Ok(Codec { k, p, rs })
    }

    /// The code of an `EC_<k>P<p>` object class.
    pub fn for_class(class: ObjectClass) -> Result<Codec, EcError> {
        match class {
            ObjectClass::Ec { k, p } => Codec::new(k as usize, p as usize),
            other => Err(EcError::NotErasureCoded(other)),
        }
    }

    /// Data cells per stripe.
    pub fn data_cells(&self) -> usize {
        self.k
    }

    /// Parity cells per stripe.
    pub fn parity_cells(&self) -> usize {
        self.p
    }

    fn check_data<T: AsRef<[u8]>>(&self, data: &[T]) -> Result<usize, EcError> {
        if data.len() != self.k {
            return Err(EcError::WrongCellCount { expected: self.k, got: data.len() });
        }
        let len = data.first().map_or(0, |d| d.as_ref().len());
        for (index, d) in data.iter().enumerate() {
            if d.as_ref().len() != len || len == 0 {
                return Err(EcError::CellSize { index, len: d.as_ref().len(), expected: len });
            }
        }
        Ok(len)
    }

    /// The `p` parity cells of a stripe of `k` data cells of equal, non-zero length.
    pub fn encode<T: AsRef<[u8]>>(&self, data: &[T]) -> Result<Vec<Vec<u8>>, EcError> {
        let len = self.check_data(data)?;
        let mut parity = vec![vec![0u8; len]; self.p];
        self.rs.encode_sep(data, &mut parity)?;
        Ok(parity)
    }

    /// Writes the parity of `data` into `parity` (`p` buffers of the cells' length), without
    /// allocating.
    pub fn encode_into<T: AsRef<[u8]>, U: AsRef<[u8]> + AsMut<[u8]>>(&self, data: &[T], parity: &mut [U]) -> Result<(), EcError> {
        let len = self.check_data(data)?;
        if parity.len() != self.p {
            return Err(EcError::WrongCellCount { expected: self.p, got: parity.len() });
        }
        for (i, q) in parity.iter().enumerate() {
            if q.as_ref().len() != len {
                return Err(EcError::CellSize { index: self.k + i, len: q.as_ref().len(), expected: len });
            }
        }
        self.rs.encode_sep(data, parity)?;
        Ok(())
    }

    /// Checks a stripe with missing cells: the count, that at most `p` are missing, equal
    /// non-zero lengths. Returns the number missing.
    fn check_cells(&self, cells: &[Option<Vec<u8>>]) -> Result<usize, EcError> {
        let total = self.k + self.p;
        if cells.len() != total {
            return Err(EcError::WrongCellCount { expected: total, got: cells.len() });
        }
        let lost = cells.iter().filter(|c| c.is_none()).count();
        if lost > self.p {
            return Err(EcError::TooManyLost { lost, total, p: self.p });
        }
        let len = cells.iter().flatten().next().map_or(0, Vec::len);
        for (index, c) in cells.iter().enumerate() {
            if let Some(c) = c {
                if c.len() != len || len == 0 {
                    return Err(EcError::CellSize { index, len: c.len(), expected: len });
                }
            }
        }
        Ok(lost)
    }

    /// Fills in the missing (`None`) cells of a stripe: `cells` holds the `k` data cells, then the
    /// `p` parity cells. Any `p` or fewer may be missing; more is [`EcError::TooManyLost`]. On an
    /// error `cells` is unchanged.
    pub fn reconstruct(&self, cells: &mut [Option<Vec<u8>>]) -> Result<(), EcError> {
        if self.check_cells(cells)? > 0 {
            self.rs.reconstruct(cells)?;
        }
        Ok(())
    }

    /// Fills in only the missing data cells, leaving missing parity cells `None` (cheaper on a
    /// degraded read, which needs no parity). Same rules as [`Codec::reconstruct`].
    pub fn reconstruct_data(&self, cells: &mut [Option<Vec<u8>>]) -> Result<(), EcError> {
        self.check_cells(cells)?;
        if cells.iter().take(self.k).any(Option::is_none) {
            self.rs.reconstruct_data(cells)?;
        }
        Ok(())
    }

    /// Whether the parity cells of a complete stripe match its data cells (for scrubbing).
    pub fn verify<T: AsRef<[u8]>>(&self, cells: &[T]) -> Result<bool, EcError> {
        if cells.len() != self.k + self.p {
            return Err(EcError::WrongCellCount { expected: self.k + self.p, got: cells.len() });
        }
        let (data, parity) = cells.split_at(self.k);
        let fresh = self.encode(data)?;
        Ok(fresh.iter().zip(parity).all(|(f, q)| f.as_slice() == q.as_ref()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stripe(k: usize, len: usize, salt: u8) -> Vec<Vec<u8>> {
        (0..k).map(|i| (0..len).map(|j| (j as u8).wrapping_mul(31).wrapping_add(i as u8 * 17) ^ salt).collect()).collect()
    }

    /// Every subset of `0..n` with at most `max` elements, as bit masks.
    fn loss_patterns(n: usize, max: usize) -> impl Iterator<Item = u64> {
        (0u64..1 << n).filter(move |m| m.count_ones() as usize <= max)
    }

    fn round_trips(k: usize, p: usize, len: usize) {
        let codec = Codec::new(k, p).unwrap();
        let data = stripe(k, len, (k * 10 + p) as u8);
        let parity = codec.encode(&data).unwrap();
        assert_eq!(parity.len(), p);
        assert!(parity.iter().all(|q| q.len() == len));
        let full: Vec<Vec<u8>> = data.iter().chain(&parity).cloned().collect();
        assert!(codec.verify(&full).unwrap());
        let mut patterns = 0;
        for mask in loss_patterns(k + p, p) {
            let mut cells: Vec<Option<Vec<u8>>> = full.iter().enumerate().map(|(i, c)| (mask & (1 << i) == 0).then(|| c.clone())).collect();
            codec.reconstruct(&mut cells).unwrap();
            let got: Vec<Vec<u8>> = cells.into_iter().map(Option::unwrap).collect();
            assert_eq!(got, full, "EC_{k}P{p} len {len}, lost mask {mask:#b}");
            patterns += 1;
        }
        // Sum over j ≤ p of C(k+p, j).
        let binom = |n: usize, r: usize| (0..r).fold(1usize, |acc, i| acc * (n - i) / (i + 1));
        assert_eq!(patterns, (0..=p).map(|j| binom(k + p, j)).sum::<usize>());
    }

    #[test]
    fn every_loss_pattern_up_to_p_round_trips() {
        for (k, p) in [(2, 1), (4, 2), (8, 2)] {
            round_trips(k, p, 4096);
            round_trips(k, p, 64);
        }
        round_trips(4, 2, 65536);
    }

    #[test]
    fn wide_code_every_loss_pattern() {
        // EC_16P4: all 6,196 patterns of up to 4 losses.
        round_trips(16, 4, 512);
    }

    #[test]
    fn reconstruct_data_leaves_parity_missing() {
        let c = Codec::new(4, 2).unwrap();
        let data = stripe(4, 4096, 5);
        let parity = c.encode(&data).unwrap();
        let mut q = vec![vec![0u8; 4096]; 2];
        c.encode_into(&data, &mut q).unwrap();
        assert_eq!(q, parity);
        let mut cells: Vec<Option<Vec<u8>>> = data.iter().cloned().chain(parity.iter().cloned()).map(Some).collect();
        cells[1] = None;
        cells[5] = None;
        c.reconstruct_data(&mut cells).unwrap();
        assert_eq!(cells[1].as_ref(), Some(&data[1]));
        assert!(cells[5].is_none());
        cells[0] = None;
        cells[2] = None;
        assert_eq!(c.reconstruct_data(&mut cells), Err(EcError::TooManyLost { lost: 3, total: 6, p: 2 }));
    }

    #[test]
    fn odd_cell_lengths_work() {
        round_trips(2, 1, 1);
        round_trips(4, 2, 4095);
    }

    #[test]
    fn more_than_p_lost_is_a_clear_error() {
        for (k, p) in [(2usize, 1usize), (4, 2), (8, 2)] {
            let codec = Codec::new(k, p).unwrap();
            let data = stripe(k, 256, 3);
            let parity = codec.encode(&data).unwrap();
            let full: Vec<Option<Vec<u8>>> = data.into_iter().chain(parity).map(Some).collect();
            for mask in (0u64..1 << (k + p)).filter(|m| m.count_ones() as usize == p + 1) {
                let mut cells: Vec<_> = full.iter().enumerate().map(|(i, c)| if mask & (1 << i) != 0 { None } else { c.clone() }).collect();
                let before = cells.clone();
                let err = codec.reconstruct(&mut cells).unwrap_err();
                assert_eq!(err, EcError::TooManyLost { lost: p + 1, total: k + p, p });
                assert_eq!(cells, before, "a failed reconstruction leaves the cells alone");
                assert!(err.to_string().contains("cannot be reconstructed"));
            }
        }
    }

    #[test]
    fn bad_input() {
        assert_eq!(Codec::new(0, 1).err(), Some(EcError::BadParameters { k: 0, p: 1 }));
        assert_eq!(Codec::new(2, 0).err(), Some(EcError::BadParameters { k: 2, p: 0 }));
        assert_eq!(Codec::new(60, 5).err(), Some(EcError::BadParameters { k: 60, p: 5 }));
        assert_eq!(Codec::for_class(ObjectClass::Rp(3)).err(), Some(EcError::NotErasureCoded(ObjectClass::Rp(3))));
        assert_eq!(Codec::for_class(ObjectClass::Ec { k: 4, p: 2 }).unwrap().data_cells(), 4);
        let c = Codec::new(2, 1).unwrap();
        assert_eq!(c.encode(&[vec![1u8; 4]]), Err(EcError::WrongCellCount { expected: 2, got: 1 }));
        assert_eq!(c.encode(&[vec![1u8; 4], vec![1u8; 6]]), Err(EcError::CellSize { index: 1, len: 6, expected: 4 }));
        assert_eq!(c.encode(&[vec![], vec![]]), Err(EcError::CellSize { index: 0, len: 0, expected: 0 }));
        let mut cells = vec![Some(vec![1u8; 4]), None, Some(vec![2u8; 8])];
        assert_eq!(c.reconstruct(&mut cells), Err(EcError::CellSize { index: 2, len: 8, expected: 4 }));
        assert_eq!(c.reconstruct(&mut [None, None]), Err(EcError::WrongCellCount { expected: 3, got: 2 }));
        let mut whole = vec![Some(vec![1u8; 4]), Some(vec![1u8; 4]), Some(vec![9u8; 4])];
        assert_eq!(c.reconstruct(&mut whole), Ok(()), "nothing missing is a no-op");
        assert!(!c.verify(&[vec![1u8; 4], vec![1u8; 4], vec![9u8; 4]]).unwrap());
    }

    #[test]
    fn parity_is_linear_so_deltas_can_update_it() {
        // What EC aggregation and partial-stripe parity updates will rely on: parity(a ^ b) =
        // parity(a) ^ parity(b), so parity can be updated from a data delta alone.
        let c = Codec::new(4, 2).unwrap();
        let a = stripe(4, 128, 1);
        let mut delta = vec![vec![0u8; 128]; 4];
        delta[2] = (0..128).map(|i| i as u8 ^ 0x5a).collect();
        let b: Vec<Vec<u8>> = a.iter().zip(&delta).map(|(x, d)| x.iter().zip(d).map(|(x, d)| x ^ d).collect()).collect();
        let (pa, pb, pd) = (c.encode(&a).unwrap(), c.encode(&b).unwrap(), c.encode(&delta).unwrap());
        for i in 0..2 {
            let xor: Vec<u8> = pa[i].iter().zip(&pd[i]).map(|(x, y)| x ^ y).collect();
            assert_eq!(xor, pb[i]);
        }
    }
}
