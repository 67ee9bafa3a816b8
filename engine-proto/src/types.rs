//! The object store's shared vocabulary: epochs, container and object identifiers, keys and the
//! per-4-KiB data checksums. The engine's store, the client and the RPC codec all use these types
//! directly, so they carry no wire-format concerns beyond the key conventions below.
//!
//! Keys (dkeys and akeys) are opaque byte strings of 1 to [`KEY_MAX`] bytes, ordered bytewise.
//! Integer dkeys are encoded as 8 big-endian bytes ([`key_from_u64`]) so that bytewise order is
//! numeric order; object ids listed by an enumeration are 16 big-endian bytes
//! ([`ObjectId::to_key`]) for the same reason.

use std::fmt;

use bytes::Bytes;

/// A point in a container's history. Every update and punch is tagged with one; a fetch or an
/// enumeration sees the newest version at or below its epoch.
pub type Epoch = u64;

/// Longest dkey or akey, bytes (the wire length prefix is one byte).
pub const KEY_MAX: usize = 255;

/// Size of a checksum chunk: array data carries one [`crc64`] per 4 KiB (the last may be short).
pub const CSUM_CHUNK: usize = 4096;

/// A container: a namespace of objects with its own epochs and retention.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct ContainerId(pub u128);

/// An object inside a container.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct ObjectId(pub u128);

impl fmt::Display for ContainerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

impl fmt::Debug for ContainerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ContainerId({:032x})", self.0)
    }
}

impl fmt::Display for ObjectId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

impl fmt::Debug for ObjectId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ObjectId({:032x})", self.0)
    }
}

impl ObjectId {
    /// Length of an object id in key form.
    pub const KEY_LEN: usize = 16;

    /// The id as an enumeration key: 16 big-endian bytes, so key order is id order.
    pub fn to_key(self) -> Bytes {
        Bytes::copy_from_slice(&self.0.to_be_bytes())
    }

    /// The id from its key form, or `None` unless `key` is exactly 16 bytes.
    pub fn from_key(key: &[u8]) -> Option<ObjectId> {
        let b: [u8; 16] = key.try_into().ok()?;
        Some(ObjectId(u128::from_be_bytes(b)))
    }
}

/// An integer key: 8 big-endian bytes, so that keys sort numerically.
pub fn key_from_u64(v: u64) -> Bytes {
    Bytes::copy_from_slice(&v.to_be_bytes())
}

/// The integer of a key made by [`key_from_u64`], or `None` unless `key` is exactly 8 bytes.
pub fn key_to_u64(key: &[u8]) -> Option<u64> {
    let b: [u8; 8] = key.try_into().ok()?;
    Some(u64::from_be_bytes(b))
}

/// CRC-64/NVME of `data` (the checksum of one chunk or of a single value): the one place the
/// store computes it. crc-fast folds with carry-less multiply (PCLMULQDQ/VPCLMULQDQ on x86-64,
/// PMULL on aarch64, picked at run time) and falls back to a table elsewhere. Never inlined, so
/// that profiles (`scripts/bench.py`) find the checksum's share under this one symbol.
#[inline(never)]
pub fn crc64(data: &[u8]) -> u64 {
    crc_fast::crc64_nvme(data)
}

/// Number of checksum chunks covering `len` bytes: `ceil(len / 4096)`.
pub fn csum_count(len: usize) -> usize {
    len.div_ceil(CSUM_CHUNK)
}

/// One [`crc64`] per 4 KiB chunk of `data`; the last chunk may be short. Empty data has none.
pub fn chunk_csums(data: &[u8]) -> Vec<u64> {
    data.chunks(CSUM_CHUNK).map(crc64).collect()
}

/// Checks `data` against per-chunk checksums. Returns the index of the first chunk that does not
/// match, or of the first missing/extra checksum if the count is wrong.
pub fn verify_chunk_csums(data: &[u8], csums: &[u64]) -> Result<(), usize> {
    let mut n = 0usize;
    for (i, chunk) in data.chunks(CSUM_CHUNK).enumerate() {
        match csums.get(i) {
            Some(&c) if c == crc64(chunk) => {}
            _ => return Err(i),
        }
        n = i + 1;
    }
    if csums.len() != n {
        return Err(n);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn crc64_is_the_nvme_polynomial() {
        // Check value of CRC-64/NVME from the CRC catalogue.
        assert_eq!(crc64(b"123456789"), 0xae8b_1486_0a79_9888);
        assert_eq!(crc64(b""), 0);
    }

    /// The `crc` crate's table-driven CRC-64/NVME, which `crc64` replaced: the reference.
    fn reference(data: &[u8]) -> u64 {
        crc::Crc::<u64, crc::Table<16>>::new(&crc::CRC_64_NVME).checksum(data)
    }

    /// `len` pseudo-random bytes from `seed` (xorshift64), quicker than proptest's vectors.
    fn bytes(mut seed: u64, len: usize) -> Vec<u8> {
        seed |= 1;
        (0..len)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                seed as u8
            })
            .collect()
    }

    #[test]
    fn crc64_matches_the_table_driven_reference_at_every_length_and_alignment() {
        // Every length 0..10000 at an offset of 0..16 bytes into the buffer, so the SIMD paths'
        // short-input code, folding loops and tails all see unaligned input.
        let buf = bytes(0x9e37_79b9_7f4a_7c15, 10_016);
        for len in 0..10_000 {
            let off = len % 16;
            let d = &buf[off..off + len];
            assert_eq!(crc64(d), reference(d), "len {len} offset {off}");
        }
    }

    proptest! {
        #[test]
        fn crc64_matches_the_reference_on_random_slices(seed in any::<u64>(), len in 0usize..140_000, cut in 0usize..64) {
            let data = bytes(seed, len);
            let d = &data[cut.min(len)..];
            prop_assert_eq!(crc64(d), reference(d));
        }
    }

    #[test]
    fn chunk_csums_cover_every_4k_and_a_short_tail() {
        assert!(chunk_csums(&[]).is_empty());
        let data: Vec<u8> = (0..10_000u32).map(|i| i as u8).collect();
        let c = chunk_csums(&data);
        assert_eq!(c.len(), 3);
        assert_eq!(c.len(), csum_count(data.len()));
        assert_eq!(c[0], crc64(&data[..4096]));
        assert_eq!(c[2], crc64(&data[8192..]));
        assert_eq!(verify_chunk_csums(&data, &c), Ok(()));
        let mut bad = data.clone();
        bad[5000] ^= 1;
        assert_eq!(verify_chunk_csums(&bad, &c), Err(1));
        assert_eq!(verify_chunk_csums(&data, &c[..2]), Err(2));
        assert_eq!(verify_chunk_csums(&data[..4096], &c), Err(1));
        assert_eq!(csum_count(4096), 1);
        assert_eq!(csum_count(4097), 2);
    }

    #[test]
    fn integer_and_object_keys_sort_numerically() {
        assert!(key_from_u64(2) < key_from_u64(256));
        assert_eq!(key_to_u64(&key_from_u64(77)), Some(77));
        assert_eq!(key_to_u64(b"abc"), None);
        let (a, b) = (ObjectId(5), ObjectId(1 << 100));
        assert!(a.to_key() < b.to_key());
        assert_eq!(ObjectId::from_key(&b.to_key()), Some(b));
        assert_eq!(ObjectId::from_key(b"short"), None);
    }

    #[test]
    fn ids_print_as_hex() {
        assert_eq!(ObjectId(0xab).to_string(), "000000000000000000000000000000ab");
        assert_eq!(format!("{:?}", ContainerId(1)), "ContainerId(00000000000000000000000000000001)");
    }
}
