//! Checkpoints: the whole index written as one checksummed file.
//!
//! `ckpt-<seq, 16 hex digits>.ckpt` holds the index as it was after WAL record `seq`: a 64-byte
//! header, then the ops that rebuild the index from nothing. It is written to a `.tmp` name,
//! synced, and renamed, so a file with the final name is always complete. Layout
//! (little-endian, documented in `docs/ENGINE-FORMATS.md`):
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 4 | magic `TCKP` |
//! | 4 | 4 | format version (1) |
//! | 8 | 8 | WAL sequence number covered |
//! | 16 | 8 | next version id |
//! | 24 | 8 | op count |
//! | 32 | 8 | body length |
//! | 40 | 4 | CRC32C of the body |
//! | 44 | 16 | reserved (0) |
//! | 60 | 4 | CRC32C of bytes 0..60 |
//! | 64 | n | body: encoded ops |

use bytes::Bytes;

use crate::index::Index;
use crate::op::{decode_ops, AkeyPath, Enc, Extent, Op, PunchLevel};

pub const MAGIC: [u8; 4] = *b"TCKP";
pub const VERSION: u32 = 1;
pub const HEADER_LEN: usize = 64;
const OFF_VERSION: usize = 4;
const OFF_SEQ: usize = 8;
const OFF_NEXT_ID: usize = 16;
const OFF_COUNT: usize = 24;
const OFF_BODY_LEN: usize = 32;
const OFF_BODY_CRC: usize = 40;
const OFF_RESERVED: usize = 44;
const OFF_HEADER_CRC: usize = 60;

/// File name of the checkpoint covering WAL records up to `seq`.
pub fn checkpoint_name(seq: u64) -> String {
    format!("ckpt-{seq:016x}.ckpt")
}

/// The sequence number of a checkpoint file name, if it is one.
pub fn parse_checkpoint_name(name: &str) -> Option<u64> {
    let hex = name.strip_prefix("ckpt-")?.strip_suffix(".ckpt")?;
    u64::from_str_radix(hex, 16).ok()
}

/// Serialises `index` as of WAL record `seq`.
pub fn encode(index: &Index, seq: u64) -> Vec<u8> {
    let mut enc = Enc::default();
    enc.buf.resize(HEADER_LEN, 0);
    let mut count = 0u64;
    for op in index_ops(index) {
        enc.op(&op);
        count += 1;
    }
    let mut buf = enc.buf;
    let body_len = (buf.len() - HEADER_LEN) as u64;
    let body_crc = crc32c::crc32c(&buf[HEADER_LEN..]);
    buf[..4].copy_from_slice(&MAGIC);
    buf[OFF_VERSION..OFF_VERSION + 4].copy_from_slice(&VERSION.to_le_bytes());
    buf[OFF_SEQ..OFF_SEQ + 8].copy_from_slice(&seq.to_le_bytes());
    buf[OFF_NEXT_ID..OFF_NEXT_ID + 8].copy_from_slice(&index.next_id.to_le_bytes());
    buf[OFF_COUNT..OFF_COUNT + 8].copy_from_slice(&count.to_le_bytes());
    buf[OFF_BODY_LEN..OFF_BODY_LEN + 8].copy_from_slice(&body_len.to_le_bytes());
    buf[OFF_BODY_CRC..OFF_BODY_CRC + 4].copy_from_slice(&body_crc.to_le_bytes());
    let hcrc = crc32c::crc32c(&buf[..OFF_HEADER_CRC]);
    buf[OFF_HEADER_CRC..OFF_HEADER_CRC + 4].copy_from_slice(&hcrc.to_le_bytes());
    buf
}

/// The ops that rebuild `index` from nothing, in index order.
fn index_ops(index: &Index) -> impl Iterator<Item = Op> + '_ {
    index.containers.iter().flat_map(|(&cont, c)| {
        let retention = (c.retention != Default::default()).then(|| Op::Retention { cont, retention: c.retention.clone() });
        retention.into_iter().chain(c.objects.iter().flat_map(move |(&obj, o)| {
            let obj_punches = o.punches.iter().map(move |&version| Op::Punch { cont, obj, level: PunchLevel::Object, version });
            obj_punches.chain(o.dkeys.iter().flat_map(move |(dk, d)| {
                let dkey_punches =
                    d.punches.iter().map(move |&version| Op::Punch { cont, obj, level: PunchLevel::Dkey(dk.clone()), version });
                dkey_punches.chain(d.akeys.iter().flat_map(move |(ak, a)| {
                    let path = AkeyPath { cont, obj, dkey: dk.clone(), akey: ak.clone() };
                    let punches = a.punches.iter().map(move |&version| Op::Punch {
                        cont,
                        obj,
                        level: PunchLevel::Akey(dk.clone(), ak.clone()),
                        version,
                    });
                    let p1 = path.clone();
                    let singles =
                        a.singles.iter().map(move |(&version, value)| Op::Single { path: p1.clone(), version, value: value.clone() });
                    let extents = a.extents.iter().map(move |(&(offset, version), b)| Op::Extent {
                        path: path.clone(),
                        ext: Extent { offset, len: b.len, version, data: b.data.clone() },
                    });
                    punches.chain(singles).chain(extents)
                }))
            }))
        }))
    })
}

fn le<const N: usize>(b: &[u8], off: usize) -> Result<[u8; N], String> {
    crate::le_bytes(b, off).ok_or_else(|| "file too short for its header".to_string())
}

/// Loads a checkpoint; the error says what is wrong with it.
pub fn decode(content: Bytes) -> Result<(Index, u64), String> {
    let header = content.get(..HEADER_LEN).ok_or("file too short for its header")?;
    if header.get(..4) != Some(&MAGIC[..]) {
        return Err("bad magic".into());
    }
    if u32::from_le_bytes(le(header, OFF_HEADER_CRC)?) != crc32c::crc32c(&header[..OFF_HEADER_CRC]) {
        return Err("header checksum mismatch".into());
    }
    let version = u32::from_le_bytes(le(header, OFF_VERSION)?);
    if version != VERSION {
        return Err(format!("unsupported format version {version}"));
    }
    let seq = u64::from_le_bytes(le(header, OFF_SEQ)?);
    let next_id = u64::from_le_bytes(le(header, OFF_NEXT_ID)?);
    let count = u64::from_le_bytes(le(header, OFF_COUNT)?);
    let body_len = u64::from_le_bytes(le(header, OFF_BODY_LEN)?);
    if body_len != (content.len() - HEADER_LEN) as u64 {
        return Err(format!("body is {} bytes, header says {body_len}", content.len() - HEADER_LEN));
    }
    if u32::from_le_bytes(le(header, OFF_BODY_CRC)?) != crc32c::crc32c(&content[HEADER_LEN..]) {
        return Err("body checksum mismatch".into());
    }
    if header.get(OFF_RESERVED..OFF_HEADER_CRC).is_some_and(|r| r.iter().any(|b| *b != 0)) {
        return Err("reserved header bytes are not zero".into());
    }
    let ops = decode_ops(content.slice(HEADER_LEN..)).map_err(|e| e.to_string())?;
    if ops.iter().any(|op| matches!(op, Op::Aggregate { .. } | Op::Unpunch { .. })) {
        return Err("body holds an aggregation op; a checkpoint only holds live items".into());
    }
    if ops.len() as u64 != count {
        return Err(format!("{} ops, header says {count}", ops.len()));
    }
    let mut index = Index::new();
    for op in &ops {
        index.apply(op);
    }
    index.next_id = index.next_id.max(next_id);
    Ok((index, seq))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::{Retention, Version};
    use crate::op::{Loc, Stored};

    fn sample() -> Index {
        let mut idx = Index::new();
        let path = AkeyPath { cont: 1, obj: 2, dkey: Bytes::from_static(b"d"), akey: Bytes::from_static(b"a") };
        let v = |idx: &mut Index, e| Version { epoch: e, id: idx.allocate_id() };
        let v1 = v(&mut idx, 10);
        idx.apply(&Op::Retention { cont: 1, retention: Retention { aggregate_below: 5, retained: vec![3] } });
        idx.apply(&Op::Extent {
            path: path.clone(),
            ext: Extent {
                offset: 0,
                len: 4096,
                version: v1,
                data: Some(Stored { loc: Loc::Blocks { start: 7 }, len: 4096, csums: vec![9] }),
            },
        });
        let v2 = v(&mut idx, 11);
        idx.apply(&Op::Single { path, version: v2, value: Stored { loc: Loc::Inline(Bytes::from_static(b"x")), len: 1, csums: vec![1] } });
        let v3 = v(&mut idx, 12);
        idx.apply(&Op::Punch { cont: 1, obj: 3, level: PunchLevel::Dkey(Bytes::from_static(b"z")), version: v3 });
        idx
    }

    #[test]
    fn round_trip() {
        let idx = sample();
        let buf = encode(&idx, 42);
        let (back, seq) = decode(Bytes::from(buf.clone())).unwrap();
        assert_eq!(seq, 42);
        assert_eq!(encode(&back, 42), buf);
        assert_eq!(back.next_id, idx.next_id);
    }

    #[test]
    fn every_flipped_byte_is_detected() {
        let buf = encode(&sample(), 1);
        for off in 0..buf.len() {
            let mut bad = buf.clone();
            bad[off] ^= 0x01;
            assert!(decode(Bytes::from(bad)).is_err(), "flip at {off} undetected");
        }
    }

    #[test]
    fn names_round_trip() {
        assert_eq!(parse_checkpoint_name(&checkpoint_name(77)), Some(77));
        assert_eq!(parse_checkpoint_name("ckpt-x.tmp"), None);
    }
}
