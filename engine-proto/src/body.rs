//! The body codec: sequential little-endian fields read by a bounded cursor that cannot panic,
//! and the matching writers. Request and reply layouts ([`crate::request`], [`crate::reply`]) are
//! built from these primitives:
//!
//! - integers: `u8`, `u16`, `u32`, `u64`, `u128` little endian;
//! - key: `u8` length (1..=255, or 0..=255 where a field allows an empty key), then the bytes;
//! - optional key: `u8` present flag (0 or 1), then a key if present;
//! - list: `u32` count, then the elements; a count is checked against the bytes left before
//!   anything is allocated, so a body can never make the decoder allocate more than its own size.

use bytes::{BufMut, Bytes, BytesMut};

use crate::types::KEY_MAX;

/// Why a body could not be decoded.
#[derive(Clone, PartialEq, Eq, Debug, thiserror::Error)]
pub enum BodyError {
    /// The body ends inside a field.
    #[error("body truncated: `{field}` at offset {offset} needs {need} bytes, {have} left")]
    Truncated {
        /// The field being read.
        field: &'static str,
        /// Its offset in the body.
        offset: usize,
        /// Bytes it needs.
        need: usize,
        /// Bytes left.
        have: usize,
    },
    /// Bytes are left over after the last field.
    #[error("{0} unexpected bytes after the last field")]
    Trailing(usize),
    /// A field holds a value that is not allowed.
    #[error("`{field}` has invalid value {value}")]
    BadValue {
        /// The field.
        field: &'static str,
        /// Its value.
        value: u64,
    },
    /// Values that are each valid do not fit together.
    #[error("{0}")]
    Inconsistent(&'static str),
}

/// A cursor over a body. Every read is bounds-checked and names its field for the error.
#[derive(Debug)]
pub struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    /// A cursor at the start of `buf`.
    pub fn new(buf: &'a [u8]) -> Self {
        Reader { buf, pos: 0 }
    }

    /// Bytes not yet read.
    pub fn remaining(&self) -> usize {
        self.buf.len().saturating_sub(self.pos)
    }

    /// The next `n` bytes.
    pub fn bytes(&mut self, field: &'static str, n: usize) -> Result<&'a [u8], BodyError> {
        let s = self.pos.checked_add(n).and_then(|end| self.buf.get(self.pos..end));
        match s {
            Some(s) => {
                self.pos += n;
                Ok(s)
            }
            None => Err(BodyError::Truncated { field, offset: self.pos, need: n, have: self.remaining() }),
        }
    }

    fn array<const N: usize>(&mut self, field: &'static str) -> Result<[u8; N], BodyError> {
        let s = self.bytes(field, N)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    /// A `u8`.
    pub fn u8(&mut self, field: &'static str) -> Result<u8, BodyError> {
        self.array::<1>(field).map(|[b]| b)
    }

    /// A little-endian `u16`.
    pub fn u16(&mut self, field: &'static str) -> Result<u16, BodyError> {
        self.array(field).map(u16::from_le_bytes)
    }

    /// A little-endian `u32`.
    pub fn u32(&mut self, field: &'static str) -> Result<u32, BodyError> {
        self.array(field).map(u32::from_le_bytes)
    }

    /// A little-endian `u64`.
    pub fn u64(&mut self, field: &'static str) -> Result<u64, BodyError> {
        self.array(field).map(u64::from_le_bytes)
    }

    /// A little-endian `u128`.
    pub fn u128(&mut self, field: &'static str) -> Result<u128, BodyError> {
        self.array(field).map(u128::from_le_bytes)
    }

    /// A 0/1 flag.
    pub fn flag(&mut self, field: &'static str) -> Result<bool, BodyError> {
        match self.u8(field)? {
            0 => Ok(false),
            1 => Ok(true),
            v => Err(BodyError::BadValue { field, value: v.into() }),
        }
    }

    /// A length-prefixed key of 0..=255 bytes, copied out (keys outlive the body in the store).
    pub fn key_or_empty(&mut self, field: &'static str) -> Result<Bytes, BodyError> {
        let n = self.u8(field)?;
        Ok(Bytes::copy_from_slice(self.bytes(field, n.into())?))
    }

    /// A length-prefixed key of 1..=255 bytes.
    pub fn key(&mut self, field: &'static str) -> Result<Bytes, BodyError> {
        let k = self.key_or_empty(field)?;
        if k.is_empty() {
            return Err(BodyError::BadValue { field, value: 0 });
        }
        Ok(k)
    }

    /// A present flag and, if set, a key of 0..=255 bytes.
    pub fn opt_key(&mut self, field: &'static str) -> Result<Option<Bytes>, BodyError> {
        if self.flag(field)? {
            self.key_or_empty(field).map(Some)
        } else {
            Ok(None)
        }
    }

    /// A `u32` element count, checked against the bytes left (each element is at least
    /// `min_elem` bytes) so that a list can be allocated with it.
    pub fn count(&mut self, field: &'static str, min_elem: usize) -> Result<usize, BodyError> {
        let n = self.u32(field)? as usize;
        let need = n.saturating_mul(min_elem.max(1));
        if need > self.remaining() {
            return Err(BodyError::Truncated { field, offset: self.pos, need, have: self.remaining() });
        }
        Ok(n)
    }

    /// A `u32` count then that many little-endian `u64`s.
    pub fn u64_list(&mut self, field: &'static str) -> Result<Vec<u64>, BodyError> {
        let n = self.count(field, 8)?;
        let mut v = Vec::with_capacity(n);
        for _ in 0..n {
            v.push(self.u64(field)?);
        }
        Ok(v)
    }

    /// Checks that every byte was consumed.
    pub fn finish(self) -> Result<(), BodyError> {
        match self.remaining() {
            0 => Ok(()),
            n => Err(BodyError::Trailing(n)),
        }
    }
}

/// Appends a key (one length byte, then the bytes). Keys longer than [`KEY_MAX`] are truncated
/// so the length byte stays truthful; the decoder of a well-formed request never produces them.
pub fn put_key(b: &mut BytesMut, key: &[u8]) {
    let n = key.len().min(KEY_MAX);
    b.put_u8(n as u8);
    b.put_slice(key.get(..n).unwrap_or_default());
}

/// Appends an optional key (present flag, then the key).
pub fn put_opt_key(b: &mut BytesMut, key: Option<&Bytes>) {
    match key {
        Some(k) => {
            b.put_u8(1);
            put_key(b, k);
        }
        None => b.put_u8(0),
    }
}

/// Appends a `u32` count and the `u64`s.
pub fn put_u64_list(b: &mut BytesMut, v: &[u64]) {
    b.put_u32_le(v.len() as u32);
    for &x in v {
        b.put_u64_le(x);
    }
}

/// Encoded size of a key.
pub fn key_len(key: &[u8]) -> usize {
    1 + key.len().min(KEY_MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_are_bounded_and_name_the_field() {
        let mut r = Reader::new(&[1, 2, 3]);
        assert_eq!(r.u16("a"), Ok(0x0201));
        assert_eq!(r.u32("b"), Err(BodyError::Truncated { field: "b", offset: 2, need: 4, have: 1 }));
        assert_eq!(r.u8("c"), Ok(3));
        assert_eq!(r.u8("d"), Err(BodyError::Truncated { field: "d", offset: 3, need: 1, have: 0 }));
        assert!(r.finish().is_ok());
        let r = Reader::new(&[0]);
        assert_eq!(r.finish(), Err(BodyError::Trailing(1)));
    }

    #[test]
    fn counts_cannot_outrun_the_body() {
        let mut b = BytesMut::new();
        b.put_u32_le(u32::MAX);
        b.put_u64_le(5);
        let mut r = Reader::new(&b);
        assert!(matches!(r.u64_list("csums"), Err(BodyError::Truncated { field: "csums", .. })));
        let mut b = BytesMut::new();
        put_u64_list(&mut b, &[1, 2, 3]);
        assert_eq!(Reader::new(&b).u64_list("x"), Ok(vec![1, 2, 3]));
    }

    #[test]
    fn keys_and_flags() {
        let mut b = BytesMut::new();
        put_key(&mut b, b"dk");
        put_opt_key(&mut b, None);
        put_opt_key(&mut b, Some(&Bytes::new()));
        put_key(&mut b, b"");
        b.put_u8(2);
        let mut r = Reader::new(&b);
        assert_eq!(r.key("dkey").unwrap(), Bytes::from_static(b"dk"));
        assert_eq!(r.opt_key("anchor"), Ok(None));
        assert_eq!(r.opt_key("anchor"), Ok(Some(Bytes::new())));
        assert_eq!(r.key("akey"), Err(BodyError::BadValue { field: "akey", value: 0 }));
        assert_eq!(r.flag("f"), Err(BodyError::BadValue { field: "f", value: 2 }));
        let mut b = BytesMut::new();
        put_key(&mut b, &[7u8; 300]);
        assert_eq!(b.len(), 256);
        assert_eq!(key_len(&[0; 300]), 256);
    }
}
