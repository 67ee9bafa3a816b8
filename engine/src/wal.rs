//! The write-ahead log: segments of checksummed, sequence-numbered records.
//!
//! A segment is a file `wal-<first seq, 16 hex digits>.log` that is only ever appended to; a new
//! segment starts at every checkpoint and at every start of the engine, so the bytes after the
//! last record of a segment are never old records. Each record holds the encoded [`Op`]s of one
//! group commit. Layout (little-endian, documented in `docs/ENGINE-FORMATS.md`):
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 4 | magic `TWAL` |
//! | 4 | 2 | format version (1) |
//! | 6 | 2 | flags (0) |
//! | 8 | 8 | sequence number (the first record ever is 1; +1 per record, across segments) |
//! | 16 | 4 | payload length |
//! | 20 | 4 | CRC32C of the payload |
//! | 24 | 4 | reserved (0) |
//! | 28 | 4 | CRC32C of bytes 0..28 |
//! | 32 | n | payload: encoded ops |
//!
//! Replay stops at the first record that is short, has a bad header or payload checksum, or an
//! unexpected sequence number. That is a torn tail when nothing valid follows it and it is in
//! the last segment; anything else is corruption and recovery refuses to go on.

use std::sync::Arc;

use bytes::Bytes;

use crate::backend::{Storage, StorageFile};
use crate::op::{decode_ops, Op};
use crate::{le_bytes, EngineError};

pub const MAGIC: [u8; 4] = *b"TWAL";
pub const VERSION: u16 = 1;
pub const HEADER_LEN: usize = 32;
const OFF_VERSION: usize = 4;
const OFF_FLAGS: usize = 6;
const OFF_SEQ: usize = 8;
const OFF_LEN: usize = 16;
const OFF_PAYLOAD_CRC: usize = 20;
const OFF_RESERVED: usize = 24;
const OFF_HEADER_CRC: usize = 28;
/// Largest payload a record may claim.
pub const MAX_PAYLOAD: u32 = 256 << 20;

/// File name of the segment whose first record is `seq`.
pub fn segment_name(seq: u64) -> String {
    format!("wal-{seq:016x}.log")
}

/// The first sequence number of a segment file name, if it is one.
pub fn parse_segment_name(name: &str) -> Option<u64> {
    let hex = name.strip_prefix("wal-")?.strip_suffix(".log")?;
    u64::from_str_radix(hex, 16).ok()
}

/// Encodes one record.
pub fn encode_record(seq: u64, payload: &[u8]) -> Vec<u8> {
    let mut rec = vec![0u8; HEADER_LEN];
    rec[..4].copy_from_slice(&MAGIC);
    rec[OFF_VERSION..OFF_VERSION + 2].copy_from_slice(&VERSION.to_le_bytes());
    rec[OFF_SEQ..OFF_SEQ + 8].copy_from_slice(&seq.to_le_bytes());
    rec[OFF_LEN..OFF_LEN + 4].copy_from_slice(&(payload.len() as u32).to_le_bytes());
    rec[OFF_PAYLOAD_CRC..OFF_PAYLOAD_CRC + 4].copy_from_slice(&crc32c::crc32c(payload).to_le_bytes());
    let hcrc = crc32c::crc32c(&rec[..OFF_HEADER_CRC]);
    rec[OFF_HEADER_CRC..OFF_HEADER_CRC + 4].copy_from_slice(&hcrc.to_le_bytes());
    rec.extend_from_slice(payload);
    rec
}

fn le32(b: &[u8], off: usize) -> Option<u32> {
    le_bytes(b, off).map(u32::from_le_bytes)
}

fn le64(b: &[u8], off: usize) -> Option<u64> {
    le_bytes(b, off).map(u64::from_le_bytes)
}

/// A record header that passed its own checksum.
#[derive(Debug, Clone, Copy)]
struct Header {
    seq: u64,
    len: u32,
    payload_crc: u32,
}

fn parse_header(buf: &[u8]) -> Option<Header> {
    let h = buf.get(..HEADER_LEN)?;
    if h.get(..4)? != MAGIC || le32(h, OFF_HEADER_CRC)? != crc32c::crc32c(h.get(..OFF_HEADER_CRC)?) {
        return None;
    }
    if u16::from_le_bytes(h.get(OFF_VERSION..OFF_VERSION + 2)?.try_into().ok()?) != VERSION {
        return None;
    }
    if h.get(OFF_FLAGS..OFF_VERSION + 4)?.iter().chain(h.get(OFF_RESERVED..OFF_HEADER_CRC)?).any(|b| *b != 0) {
        return None;
    }
    let len = le32(h, OFF_LEN)?;
    (len <= MAX_PAYLOAD).then_some(Header { seq: le64(h, OFF_SEQ)?, len, payload_crc: le32(h, OFF_PAYLOAD_CRC)? })
}

/// The valid records of one segment, and how its end looked.
#[derive(Debug)]
pub struct SegmentScan {
    /// (sequence number, ops) of each valid record in order.
    pub records: Vec<(u64, Vec<Op>)>,
    /// Byte offset just past the last valid record.
    pub valid_end: u64,
    /// Why scanning stopped before the end of the file, if it did.
    pub stopped: Option<String>,
    /// Whether an intact later record shows the stop is damage, not a torn final write.
    pub valid_after_stop: bool,
}

/// Reads every valid record of a segment, expecting the first to be `first_seq`.
pub fn scan_segment(content: Bytes, first_seq: u64) -> SegmentScan {
    let mut records = Vec::new();
    let mut pos = 0usize;
    let mut expect = first_seq;
    let mut stopped = None;
    let mut valid_after_stop = false;
    while pos < content.len() {
        let rest = content.get(pos..).unwrap_or_default();
        let Some(h) = parse_header(rest) else {
            stopped = Some(format!("bad or torn record header at offset {pos}"));
            // The length is unknown: look for the next record anywhere after this one.
            valid_after_stop =
                expect.checked_add(1).is_some_and(|next| (pos + 1..content.len()).any(|off| valid_record_at(&content, off, next)));
            break;
        };
        if h.seq != expect {
            // A valid header at a record boundary of a fresh file is never a torn write.
            stopped = Some(format!("sequence {} at offset {pos}, expected {expect}", h.seq));
            valid_after_stop = true;
            break;
        }
        let end = HEADER_LEN + h.len as usize;
        let Some(payload) = rest.get(HEADER_LEN..end) else {
            stopped = Some(format!("record {expect} at offset {pos} is cut short"));
            break;
        };
        let problem = if crc32c::crc32c(payload) != h.payload_crc {
            Some("payload checksum mismatch".to_string())
        } else {
            match decode_ops(content.slice(pos + HEADER_LEN..pos + end)) {
                Ok(ops) => {
                    records.push((expect, ops));
                    None
                }
                Err(e) => Some(e.to_string()),
            }
        };
        if let Some(problem) = problem {
            stopped = Some(format!("record {expect} at offset {pos}: {problem}"));
            // Whole but damaged: corruption if the next record follows intact.
            valid_after_stop = expect.checked_add(1).is_some_and(|next| valid_record_at(&content, pos + end, next));
            break;
        }
        pos += end;
        let Some(next) = expect.checked_add(1) else {
            stopped = Some("sequence numbers exhausted".into());
            valid_after_stop = pos < content.len();
            break;
        };
        expect = next;
    }
    SegmentScan { records, valid_end: pos as u64, stopped, valid_after_stop }
}

/// Whether a whole, valid record with sequence number `seq` starts at `off`.
fn valid_record_at(content: &[u8], off: usize, seq: u64) -> bool {
    let Some(rest) = content.get(off..) else { return false };
    if rest.get(..4) != Some(&MAGIC[..]) {
        return false;
    }
    parse_header(rest).is_some_and(|h| {
        h.seq == seq && rest.get(HEADER_LEN..HEADER_LEN + h.len as usize).is_some_and(|p| crc32c::crc32c(p) == h.payload_crc)
    })
}

/// The segment being appended to.
#[derive(Debug)]
pub struct WalWriter {
    storage: Arc<dyn Storage>,
    file: Arc<dyn StorageFile>,
    /// First sequence number of the open segment.
    segment_start: u64,
    offset: u64,
    next_seq: u64,
    bytes_since_rotate: u64,
}

/// One record to write and sync at its reserved place ([`WalWriter::prepare`]).
#[derive(Debug)]
pub struct WalAppend {
    file: Arc<dyn StorageFile>,
    name: String,
    offset: u64,
    record: Vec<u8>,
    /// The record's sequence number.
    pub seq: u64,
}

impl WalAppend {
    /// Bytes the record takes in its segment.
    pub fn len(&self) -> u64 {
        self.record.len() as u64
    }

    /// Whether the record is empty (never: it has a header).
    pub fn is_empty(&self) -> bool {
        self.record.is_empty()
    }

    /// Writes the record and syncs the segment: once this returns, the record is durable.
    pub fn write_and_sync(self) -> Result<(), EngineError> {
        self.file.write_at(&self.record, self.offset).map_err(|e| EngineError::io(&self.name, e))?;
        self.file.sync().map_err(|e| EngineError::io(&self.name, e))
    }
}

impl WalWriter {
    /// Starts a new segment whose first record will be `next_seq`.
    pub fn create(storage: Arc<dyn Storage>, next_seq: u64) -> Result<Self, EngineError> {
        let name = segment_name(next_seq);
        let file = storage.open(&name, true).map_err(|e| EngineError::io(&name, e))?;
        file.set_len(0).map_err(|e| EngineError::io(&name, e))?;
        Ok(Self { storage, file, segment_start: next_seq, offset: 0, next_seq, bytes_since_rotate: 0 })
    }

    /// Sequence number the next record will get.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Bytes written to the open segment.
    pub fn segment_bytes(&self) -> u64 {
        self.bytes_since_rotate
    }

    /// Writes and syncs one record; returns its sequence number once it is durable.
    pub fn append(&mut self, payload: &[u8]) -> Result<u64, EngineError> {
        let append = self.prepare(payload)?;
        let seq = append.seq;
        append.write_and_sync()?;
        Ok(seq)
    }

    /// Reserves the next record for `payload` without writing it: the caller runs the returned
    /// [`WalAppend`] (on any thread) before preparing another. If it fails, the writer's state
    /// is past a record that may be torn: nothing more may be appended.
    pub fn prepare(&mut self, payload: &[u8]) -> Result<WalAppend, EngineError> {
        let seq = self.next_seq;
        if payload.len() > MAX_PAYLOAD as usize {
            return Err(EngineError::Invalid(format!("WAL record of {} bytes exceeds {MAX_PAYLOAD}", payload.len())));
        }
        let record = encode_record(seq, payload);
        let append = WalAppend { file: self.file.clone(), name: segment_name(self.segment_start), offset: self.offset, record, seq };
        self.offset += append.record.len() as u64;
        self.bytes_since_rotate += append.record.len() as u64;
        self.next_seq += 1;
        Ok(append)
    }

    /// Closes the open segment and starts a new one at the next sequence number.
    pub fn rotate(&mut self) -> Result<(), EngineError> {
        *self = Self::create(self.storage.clone(), self.next_seq)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::Retention;

    fn payload(n: u64) -> Vec<u8> {
        crate::op::encode_ops(&[Op::Retention { cont: n as u128, retention: Retention { aggregate_below: n, retained: vec![] } }])
    }

    fn segment(records: &[(u64, Vec<u8>)]) -> Vec<u8> {
        records.iter().flat_map(|(s, p)| encode_record(*s, p)).collect()
    }

    #[test]
    fn scan_reads_all_records() {
        let seg = segment(&[(5, payload(1)), (6, payload(2))]);
        let scan = scan_segment(Bytes::from(seg.clone()), 5);
        assert_eq!(scan.records.len(), 2);
        assert_eq!(scan.valid_end, seg.len() as u64);
        assert!(scan.stopped.is_none());
    }

    #[test]
    fn torn_tail_at_every_length_is_not_corruption() {
        let seg = segment(&[(1, payload(1)), (2, payload(2))]);
        let first = encode_record(1, &payload(1)).len();
        for cut in first..seg.len() {
            let scan = scan_segment(Bytes::copy_from_slice(&seg[..cut]), 1);
            assert_eq!(scan.records.len(), 1, "cut at {cut}");
            assert_eq!(cut == first, scan.stopped.is_none());
            assert!(!scan.valid_after_stop);
        }
    }

    #[test]
    fn flipped_byte_in_middle_record_is_corruption() {
        let seg = segment(&[(1, payload(1)), (2, payload(2)), (3, payload(3))]);
        for off in 0..encode_record(1, &payload(1)).len() {
            let mut bad = seg.clone();
            bad[off] ^= 0x40;
            let scan = scan_segment(Bytes::from(bad), 1);
            assert!(scan.stopped.is_some(), "flip at {off} undetected");
            assert!(scan.valid_after_stop, "flip at {off} looks like a tear");
        }
    }

    #[test]
    fn forged_header_inside_a_torn_record_is_not_corruption() {
        // A client's inline value can hold bytes that look like a whole WAL record.
        let forged = encode_record(u64::MAX - 1, &payload(9));
        let seg = segment(&[(1, payload(1)), (2, forged.clone()), (3, forged.clone())]);
        let first = encode_record(1, &payload(1)).len();
        let second = first + HEADER_LEN + forged.len();
        for cut in first + 1..second {
            let scan = scan_segment(Bytes::copy_from_slice(&seg[..cut]), 1);
            assert_eq!(scan.records.len(), 1);
            assert!(!scan.valid_after_stop, "cut at {cut} called corruption");
        }
    }

    #[test]
    fn nonzero_flags_or_reserved_are_rejected() {
        for off in [6, 7, 24, 27] {
            let mut rec = encode_record(1, &payload(1));
            rec[off] = 1;
            let crc = crc32c::crc32c(&rec[..OFF_HEADER_CRC]);
            rec[OFF_HEADER_CRC..OFF_HEADER_CRC + 4].copy_from_slice(&crc.to_le_bytes());
            assert!(scan_segment(Bytes::from(rec), 1).records.is_empty(), "byte {off}");
        }
    }

    #[test]
    fn last_sequence_number_does_not_overflow() {
        let seg = segment(&[(u64::MAX, payload(1))]);
        let scan = scan_segment(Bytes::from(seg), u64::MAX);
        assert_eq!(scan.records.len(), 1);
    }

    #[test]
    fn wrong_sequence_stops() {
        let seg = segment(&[(1, payload(1)), (3, payload(3))]);
        let scan = scan_segment(Bytes::from(seg), 1);
        assert_eq!(scan.records.len(), 1);
        assert!(scan.stopped.unwrap().contains("expected 2"));
    }

    #[test]
    fn segment_names_round_trip() {
        assert_eq!(parse_segment_name(&segment_name(0xabc)), Some(0xabc));
        assert_eq!(parse_segment_name("ckpt-1.ckpt"), None);
    }
}
