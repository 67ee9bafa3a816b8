//! Index operations and their binary encoding, shared by WAL records and checkpoints.
//!
//! An [`Op`] is one change to the index. WAL records carry the ops of one group commit; a
//! checkpoint is the stream of ops that rebuilds the index from nothing (one `Extent`, `Single`,
//! `Punch` or `Retention` per live item). The encoding is little-endian and length-prefixed; the
//! layout is in `docs/ENGINE-FORMATS.md`. Decoding is bounded and never panics.

use bytes::Bytes;
use thiserror::Error;

use crate::index::{Retention, Version};
use crate::BLOCK;

/// Path of an akey.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct AkeyPath {
    pub cont: u128,
    pub obj: u128,
    pub dkey: Bytes,
    pub akey: Bytes,
}

/// Where a value's bytes live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Loc {
    /// In the data file, from block `start`, contiguous.
    Blocks { start: u64 },
    /// In the metadata itself (small values).
    Inline(Bytes),
}

/// A stored value: location, length and one CRC64 per 4 KiB chunk from its start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    pub loc: Loc,
    pub len: u64,
    pub csums: Vec<u64>,
}

impl Stored {
    /// The chunks `first..end_chunk` of this value, as bytes `start..end` of it.
    pub fn slice_chunks(&self, first: u64, end_chunk: u64, start: u64, end: u64) -> Stored {
        let loc = match &self.loc {
            Loc::Blocks { start: b } => Loc::Blocks { start: b + first },
            Loc::Inline(data) => Loc::Inline(data.slice(start as usize..end as usize)),
        };
        let csums = self.csums.get(first as usize..end_chunk as usize).map(<[u64]>::to_vec).unwrap_or_default();
        Stored { loc, len: end - start, csums }
    }

    /// Data-file blocks this value occupies.
    pub fn blocks(&self) -> Option<(u64, u64)> {
        match self.loc {
            Loc::Blocks { start } => Some((start, self.len.div_ceil(BLOCK))),
            Loc::Inline(_) => None,
        }
    }
}

/// One array extent version: data, or a range punch when `data` is `None`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Extent {
    pub offset: u64,
    pub len: u64,
    pub version: Version,
    pub data: Option<Stored>,
}

/// The level of a punch above extents.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PunchLevel {
    Object,
    Dkey(Bytes),
    Akey(Bytes, Bytes),
}

/// One change to the index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    Extent {
        path: AkeyPath,
        ext: Extent,
    },
    Single {
        path: AkeyPath,
        version: Version,
        value: Stored,
    },
    Punch {
        cont: u128,
        obj: u128,
        level: PunchLevel,
        version: Version,
    },
    Retention {
        cont: u128,
        retention: Retention,
    },
    Aggregate {
        path: AkeyPath,
        remove_extents: Vec<(u64, Version)>,
        add_extents: Vec<Extent>,
        remove_singles: Vec<Version>,
        remove_punches: Vec<Version>,
    },
    Unpunch {
        cont: u128,
        obj: u128,
        level: PunchLevel,
        version: Version,
    },
}

impl Op {
    /// The container the op changes.
    pub fn cont(&self) -> u128 {
        match self {
            Op::Extent { path, .. } | Op::Single { path, .. } | Op::Aggregate { path, .. } => path.cont,
            Op::Punch { cont, .. } | Op::Retention { cont, .. } | Op::Unpunch { cont, .. } => *cont,
        }
    }
}

/// Op type tags on disk.
mod tag {
    pub const EXTENT: u8 = 1;
    pub const SINGLE: u8 = 2;
    pub const PUNCH: u8 = 3;
    pub const RETENTION: u8 = 4;
    pub const AGGREGATE: u8 = 5;
    pub const UNPUNCH: u8 = 6;
}

/// Why an encoded op could not be decoded.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("truncated op encoding")]
    Truncated,
    #[error("unknown op tag {0}")]
    UnknownTag(u8),
    #[error("invalid field: {0}")]
    Invalid(&'static str),
}

/// Largest count or byte length a decoded field may claim (bounds allocation).
const MAX_FIELD: u64 = 64 << 20;

/// Appends little-endian fields to a buffer.
#[derive(Debug, Default)]
pub struct Enc {
    pub buf: Vec<u8>,
}

impl Enc {
    fn u8(&mut self, v: u8) {
        self.buf.push(v);
    }
    fn u64(&mut self, v: u64) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    fn u128(&mut self, v: u128) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    fn bytes(&mut self, b: &[u8]) {
        self.u64(b.len() as u64);
        self.buf.extend_from_slice(b);
    }
    fn version(&mut self, v: Version) {
        self.u64(v.epoch);
        self.u64(v.id);
    }
    fn path(&mut self, p: &AkeyPath) {
        self.u128(p.cont);
        self.u128(p.obj);
        self.bytes(&p.dkey);
        self.bytes(&p.akey);
    }
    fn stored(&mut self, s: &Stored) {
        match &s.loc {
            Loc::Blocks { start } => {
                self.u8(0);
                self.u64(*start);
            }
            Loc::Inline(data) => {
                self.u8(1);
                self.bytes(data);
            }
        }
        self.u64(s.len);
        self.u64(s.csums.len() as u64);
        for c in &s.csums {
            self.u64(*c);
        }
    }
    fn extent(&mut self, e: &Extent) {
        self.u64(e.offset);
        self.u64(e.len);
        self.version(e.version);
        match &e.data {
            None => self.u8(0),
            Some(s) => {
                self.u8(1);
                self.stored(s);
            }
        }
    }
    fn level(&mut self, l: &PunchLevel) {
        match l {
            PunchLevel::Object => self.u8(0),
            PunchLevel::Dkey(d) => {
                self.u8(1);
                self.bytes(d);
            }
            PunchLevel::Akey(d, a) => {
                self.u8(2);
                self.bytes(d);
                self.bytes(a);
            }
        }
    }

    /// Appends one op.
    pub fn op(&mut self, op: &Op) {
        match op {
            Op::Extent { path, ext } => {
                self.u8(tag::EXTENT);
                self.path(path);
                self.extent(ext);
            }
            Op::Single { path, version, value } => {
                self.u8(tag::SINGLE);
                self.path(path);
                self.version(*version);
                self.stored(value);
            }
            Op::Punch { cont, obj, level, version } | Op::Unpunch { cont, obj, level, version } => {
                self.u8(if matches!(op, Op::Punch { .. }) { tag::PUNCH } else { tag::UNPUNCH });
                self.u128(*cont);
                self.u128(*obj);
                self.level(level);
                self.version(*version);
            }
            Op::Retention { cont, retention } => {
                self.u8(tag::RETENTION);
                self.u128(*cont);
                self.u64(retention.aggregate_below);
                self.u64(retention.retained.len() as u64);
                for e in &retention.retained {
                    self.u64(*e);
                }
            }
            Op::Aggregate { path, remove_extents, add_extents, remove_singles, remove_punches } => {
                self.u8(tag::AGGREGATE);
                self.path(path);
                self.u64(remove_extents.len() as u64);
                for (off, v) in remove_extents {
                    self.u64(*off);
                    self.version(*v);
                }
                self.u64(add_extents.len() as u64);
                for e in add_extents {
                    self.extent(e);
                }
                for list in [remove_singles, remove_punches] {
                    self.u64(list.len() as u64);
                    for v in list {
                        self.version(*v);
                    }
                }
            }
        }
    }
}

/// Reads fields from a buffer; every read is bounded.
#[derive(Debug)]
pub struct Dec {
    buf: Bytes,
    pos: usize,
}

impl Dec {
    /// Decodes from `buf` (slices of it are shared, not copied).
    pub fn new(buf: Bytes) -> Self {
        Self { buf, pos: 0 }
    }

    /// Whether every byte has been consumed.
    pub fn is_done(&self) -> bool {
        self.pos >= self.buf.len()
    }

    fn take(&mut self, n: usize) -> Result<&[u8], DecodeError> {
        let end = self.pos.checked_add(n).ok_or(DecodeError::Truncated)?;
        let s = self.buf.get(self.pos..end).ok_or(DecodeError::Truncated)?;
        self.pos = end;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(*self.take(1)?.first().ok_or(DecodeError::Truncated)?)
    }
    fn u64(&mut self) -> Result<u64, DecodeError> {
        let mut a = [0u8; 8];
        a.copy_from_slice(self.take(8)?);
        Ok(u64::from_le_bytes(a))
    }
    fn u128(&mut self) -> Result<u128, DecodeError> {
        let mut a = [0u8; 16];
        a.copy_from_slice(self.take(16)?);
        Ok(u128::from_le_bytes(a))
    }
    fn count(&mut self) -> Result<usize, DecodeError> {
        let n = self.u64()?;
        if n > MAX_FIELD || n as usize > self.buf.len() {
            return Err(DecodeError::Invalid("count or length too large"));
        }
        Ok(n as usize)
    }
    fn bytes(&mut self) -> Result<Bytes, DecodeError> {
        let n = self.count()?;
        let start = self.pos;
        self.take(n)?;
        Ok(self.buf.slice(start..start + n))
    }
    fn version(&mut self) -> Result<Version, DecodeError> {
        let v = Version { epoch: self.u64()?, id: self.u64()? };
        // Ids are handed out below u64::MAX so that "next id" always exists.
        if v.id == u64::MAX {
            return Err(DecodeError::Invalid("version id"));
        }
        Ok(v)
    }
    fn path(&mut self) -> Result<AkeyPath, DecodeError> {
        Ok(AkeyPath { cont: self.u128()?, obj: self.u128()?, dkey: self.bytes()?, akey: self.bytes()? })
    }
    fn stored(&mut self) -> Result<Stored, DecodeError> {
        let loc = match self.u8()? {
            0 => Loc::Blocks { start: self.u64()? },
            1 => Loc::Inline(self.bytes()?),
            _ => return Err(DecodeError::Invalid("location kind")),
        };
        let len = self.u64()?;
        let n = self.count()?;
        let csums = (0..n).map(|_| self.u64()).collect::<Result<Vec<_>, _>>()?;
        if csums.len() as u64 != len.div_ceil(BLOCK) {
            return Err(DecodeError::Invalid("checksum count does not match length"));
        }
        if let Loc::Inline(d) = &loc {
            if d.len() as u64 != len {
                return Err(DecodeError::Invalid("inline length"));
            }
        }
        Ok(Stored { loc, len, csums })
    }
    fn extent(&mut self) -> Result<Extent, DecodeError> {
        let offset = self.u64()?;
        let len = self.u64()?;
        let version = self.version()?;
        let data = match self.u8()? {
            0 => None,
            1 => Some(self.stored()?),
            _ => return Err(DecodeError::Invalid("extent kind")),
        };
        if len == 0 || offset.checked_add(len).is_none() || data.as_ref().is_some_and(|d| d.len != len) {
            return Err(DecodeError::Invalid("extent range"));
        }
        Ok(Extent { offset, len, version, data })
    }
    fn level(&mut self) -> Result<PunchLevel, DecodeError> {
        Ok(match self.u8()? {
            0 => PunchLevel::Object,
            1 => PunchLevel::Dkey(self.bytes()?),
            2 => PunchLevel::Akey(self.bytes()?, self.bytes()?),
            _ => return Err(DecodeError::Invalid("punch level")),
        })
    }
    fn versions(&mut self) -> Result<Vec<Version>, DecodeError> {
        let n = self.count()?;
        (0..n).map(|_| self.version()).collect()
    }

    /// Decodes the next op.
    pub fn op(&mut self) -> Result<Op, DecodeError> {
        Ok(match self.u8()? {
            tag::EXTENT => Op::Extent { path: self.path()?, ext: self.extent()? },
            tag::SINGLE => Op::Single { path: self.path()?, version: self.version()?, value: self.stored()? },
            t @ (tag::PUNCH | tag::UNPUNCH) => {
                let (cont, obj, level, version) = (self.u128()?, self.u128()?, self.level()?, self.version()?);
                if t == tag::PUNCH {
                    Op::Punch { cont, obj, level, version }
                } else {
                    Op::Unpunch { cont, obj, level, version }
                }
            }
            tag::RETENTION => {
                let cont = self.u128()?;
                let aggregate_below = self.u64()?;
                let n = self.count()?;
                let retained = (0..n).map(|_| self.u64()).collect::<Result<Vec<_>, _>>()?;
                Op::Retention { cont, retention: Retention { aggregate_below, retained } }
            }
            tag::AGGREGATE => {
                let path = self.path()?;
                let n = self.count()?;
                let remove_extents = (0..n).map(|_| Ok((self.u64()?, self.version()?))).collect::<Result<Vec<_>, _>>()?;
                let n = self.count()?;
                let add_extents = (0..n).map(|_| self.extent()).collect::<Result<Vec<_>, _>>()?;
                let remove_singles = self.versions()?;
                let remove_punches = self.versions()?;
                Op::Aggregate { path, remove_extents, add_extents, remove_singles, remove_punches }
            }
            t => return Err(DecodeError::UnknownTag(t)),
        })
    }
}

/// Encodes a list of ops.
pub fn encode_ops(ops: &[Op]) -> Vec<u8> {
    let mut enc = Enc::default();
    for op in ops {
        enc.op(op);
    }
    enc.buf
}

/// Decodes a buffer holding whole ops.
pub fn decode_ops(buf: Bytes) -> Result<Vec<Op>, DecodeError> {
    let mut dec = Dec::new(buf);
    let mut ops = Vec::new();
    while !dec.is_done() {
        ops.push(dec.op()?);
    }
    Ok(ops)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample_ops() -> Vec<Op> {
        let path = AkeyPath { cont: 7, obj: u128::MAX, dkey: Bytes::from_static(b"dk"), akey: Bytes::from_static(b"") };
        let v = Version { epoch: 5, id: 9 };
        let stored = Stored { loc: Loc::Blocks { start: 3 }, len: 5000, csums: vec![1, 2] };
        vec![
            Op::Extent { path: path.clone(), ext: Extent { offset: 4096, len: 5000, version: v, data: Some(stored.clone()) } },
            Op::Extent { path: path.clone(), ext: Extent { offset: 0, len: 1, version: v, data: None } },
            Op::Single {
                path: path.clone(),
                version: v,
                value: Stored { loc: Loc::Inline(Bytes::from_static(b"abc")), len: 3, csums: vec![4] },
            },
            Op::Punch { cont: 1, obj: 2, level: PunchLevel::Akey(Bytes::from_static(b"x"), Bytes::from_static(b"y")), version: v },
            Op::Unpunch { cont: 1, obj: 2, level: PunchLevel::Dkey(Bytes::from_static(b"x")), version: v },
            Op::Retention { cont: 3, retention: Retention { aggregate_below: 77, retained: vec![1, 2, 3] } },
            Op::Aggregate {
                path,
                remove_extents: vec![(0, v)],
                add_extents: vec![Extent { offset: 0, len: 5000, version: v, data: Some(stored) }],
                remove_singles: vec![v],
                remove_punches: vec![],
            },
        ]
    }

    #[test]
    fn ops_round_trip() {
        let ops = sample_ops();
        let buf = encode_ops(&ops);
        assert_eq!(decode_ops(Bytes::from(buf)).unwrap(), ops);
    }

    #[test]
    fn every_truncation_is_an_error() {
        let buf = encode_ops(&sample_ops()[..1]);
        for n in 0..buf.len() {
            assert!(decode_ops(Bytes::copy_from_slice(&buf[..n])).is_err() || n == 0);
        }
    }

    proptest! {
        #[test]
        fn decode_never_panics(data in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode_ops(Bytes::from(data));
        }
    }
}
