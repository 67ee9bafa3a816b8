//! The write-ahead log: segments of checksummed, sequence-numbered records.
//!
//! A segment is a file `wal-<first seq, 16 hex digits>.log`, preallocated (zeros, or a retired
//! segment reused: `wal-free-<seq>.log`) so that appending changes no file metadata. Records are
//! written in order with whole-block direct writes (the block holding the end of the previous
//! record is rewritten with the same bytes). A new segment starts at every checkpoint, at every
//! start of the engine, and when a record does not fit; after the last record of a segment come
//! zeros, or bytes and whole records of its previous use, whose sequence numbers are all lower
//! than any record of the new use. Each record holds the encoded [`Op`]s of one
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
//! unexpected sequence number. Zeros or an older whole record there are the clean end of the
//! written records; anything else is a torn tail when nothing valid follows it and it is in the
//! last segment, and otherwise corruption: recovery refuses to go on.

use std::sync::Arc;

use bytes::Bytes;

use crate::backend::{AlignedBuf, Storage, StorageFile, DIRECT_ALIGN};
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
    /// Whether the stop is where the written records end in a preallocated segment: zeros, or a
    /// whole record older than the segment (left from its previous use).
    pub clean_end: bool,
}

/// Reads every valid record of a segment, expecting the first to be `first_seq`.
pub fn scan_segment(content: Bytes, first_seq: u64) -> SegmentScan {
    let mut records = Vec::new();
    let mut pos = 0usize;
    let mut expect = first_seq;
    let mut stopped = None;
    let mut valid_after_stop = false;
    let mut clean_end = false;
    // The length of what stops a scan is unknown: look for the next record anywhere after it.
    let valid_later = |pos: usize, expect: u64| {
        expect.checked_add(1).is_some_and(|next| (pos + 1..content.len()).any(|off| valid_record_at(&content, off, next)))
    };
    while pos < content.len() {
        let rest = content.get(pos..).unwrap_or_default();
        let Some(h) = parse_header(rest) else {
            let zeros = rest.iter().take(HEADER_LEN).all(|b| *b == 0);
            stopped = Some(format!("{} at offset {pos}", if zeros { "end of records (zeros)" } else { "bad or torn record header" }));
            valid_after_stop = valid_later(pos, expect);
            clean_end = zeros;
            break;
        };
        if h.seq < expect {
            // A whole record from the segment's previous use: the new records end here.
            stopped = Some(format!("end of records (an older record, {}) at offset {pos}", h.seq));
            valid_after_stop = valid_later(pos, expect);
            clean_end = true;
            break;
        }
        if h.seq != expect {
            // Records are written in order: a valid header from the future is damage.
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
    SegmentScan { records, valid_end: pos as u64, stopped, valid_after_stop, clean_end }
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
    /// Size segments are preallocated to.
    segment_size: u64,
    /// The bytes of the block holding `offset` that lie before it: rewritten with the next
    /// record, since writes are whole blocks.
    tail: Vec<u8>,
}

/// One record to write and sync at its reserved place ([`WalWriter::prepare`]): the whole blocks
/// from the one holding the record's start, padded with zeros.
#[derive(Debug)]
pub struct WalAppend {
    file: Arc<dyn StorageFile>,
    name: String,
    block_offset: u64,
    blocks: AlignedBuf,
    record_len: u64,
    /// The record's sequence number.
    pub seq: u64,
}

impl WalAppend {
    /// Bytes the record takes in its segment.
    pub fn len(&self) -> u64 {
        self.record_len
    }

    /// Whether the record is empty (never: it has a header).
    pub fn is_empty(&self) -> bool {
        self.record_len == 0
    }

    /// Writes the record and syncs the segment: once this returns, the record is durable.
    pub fn write_and_sync(self) -> Result<(), EngineError> {
        self.file.write_direct(self.blocks.as_slice(), self.block_offset).map_err(|e| EngineError::io(&self.name, e))?;
        self.file.sync().map_err(|e| EngineError::io(&self.name, e))
    }
}

/// Name a retired segment waits under until it is reused: `wal-free-<its old first seq>.log`.
pub fn free_segment_name(seq: u64) -> String {
    format!("{FREE_PREFIX}{seq:016x}.log")
}

const FREE_PREFIX: &str = "wal-free-";
/// Retired segments kept for reuse (more are removed): a checkpoint retires about
/// [`crate::target::CHECKPOINT_SEGMENTS`] of them, and a new segment that finds none must be
/// written full of zeros first.
pub const FREE_SEGMENTS_KEPT: usize = 4;
const ZERO_CHUNK: usize = 1 << 20;

/// How many of `names` are retired segments waiting for reuse.
pub fn free_segments(names: &[String]) -> usize {
    names.iter().filter(|n| n.starts_with(FREE_PREFIX)).count()
}

/// Retires a segment whose records are all in a checkpoint: kept for reuse (renamed to its free
/// name) while fewer than [`FREE_SEGMENTS_KEPT`] wait (`free`, counted up here), else removed.
/// The target thread may take free segments meanwhile, so `free` can only overstate them: never
/// more than [`FREE_SEGMENTS_KEPT`] are kept.
pub fn retire_segment(storage: &dyn Storage, start: u64, free: &mut usize) -> Result<(), EngineError> {
    let name = segment_name(start);
    if *free < FREE_SEGMENTS_KEPT {
        storage.rename(&name, &free_segment_name(start)).map_err(|e| EngineError::io(&name, e))?;
        *free += 1;
        Ok(())
    } else {
        storage.remove(&name).map_err(|e| EngineError::io(&name, e))
    }
}

impl WalWriter {
    /// Starts a new segment whose first record will be `next_seq`, preallocated to
    /// `segment_size` bytes: a retired segment is reused if one waits, else a new file is filled
    /// with zeros and synced. Either way every later record overwrites blocks that already exist,
    /// so its `fdatasync` changes no metadata and costs one device flush.
    pub fn create(storage: Arc<dyn Storage>, next_seq: u64, segment_size: u64) -> Result<Self, EngineError> {
        let name = segment_name(next_seq);
        let names = storage.list().map_err(|e| EngineError::io(".", e))?;
        let file = match names.iter().find(|n| n.starts_with(FREE_PREFIX)) {
            Some(free) => {
                storage.rename(free, &name).map_err(|e| EngineError::io(free, e))?;
                storage.open(&name, false).map_err(|e| EngineError::io(&name, e))?
            }
            None => {
                let file = storage.open(&name, true).map_err(|e| EngineError::io(&name, e))?;
                file.set_len(0).map_err(|e| EngineError::io(&name, e))?;
                file
            }
        };
        let segment_size = segment_size.next_multiple_of(DIRECT_ALIGN as u64);
        let len = file.len().map_err(|e| EngineError::io(&name, e))?;
        if len < segment_size {
            // Direct writes of whole blocks (no page-cache copy), from the last whole block on:
            // nothing in a file being (re)started as this segment is a record of it yet.
            let mut zeros = AlignedBuf::default();
            zeros.reset(ZERO_CHUNK);
            zeros.pad_to(ZERO_CHUNK);
            let mut at = len - len % DIRECT_ALIGN as u64;
            while at < segment_size {
                let n = (segment_size - at).min(ZERO_CHUNK as u64) as usize;
                let chunk = zeros.as_slice().get(..n).unwrap_or_default();
                file.write_direct(chunk, at).map_err(|e| EngineError::io(&name, e))?;
                at += n as u64;
            }
            file.sync().map_err(|e| EngineError::io(&name, e))?;
        }
        Ok(Self { storage, file, segment_start: next_seq, offset: 0, next_seq, segment_size, tail: Vec::new() })
    }

    /// First sequence number of the open segment.
    pub fn segment_start(&self) -> u64 {
        self.segment_start
    }

    /// Sequence number the next record will get.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
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
    /// is past a record that may be torn: nothing more may be appended. A record that does not
    /// fit in the open segment starts a new one (see [`WalWriter::segment_start`]).
    pub fn prepare(&mut self, payload: &[u8]) -> Result<WalAppend, EngineError> {
        if payload.len() > MAX_PAYLOAD as usize {
            return Err(EngineError::Invalid(format!("WAL record of {} bytes exceeds {MAX_PAYLOAD}", payload.len())));
        }
        let record_len = (HEADER_LEN + payload.len()) as u64;
        if self.offset > 0 && self.offset + record_len > self.segment_size {
            self.rotate()?;
        }
        let seq = self.next_seq;
        let record = encode_record(seq, payload);
        let mut blocks = AlignedBuf::default();
        blocks.reset(self.tail.len() + record.len() + DIRECT_ALIGN);
        blocks.extend_from_slice(&self.tail);
        blocks.extend_from_slice(&record);
        let used = blocks.len();
        blocks.pad_to(used.next_multiple_of(DIRECT_ALIGN));
        let block_offset = self.offset - self.tail.len() as u64;
        let last_block = used - used % DIRECT_ALIGN;
        self.tail = blocks.as_slice().get(last_block..used).unwrap_or_default().to_vec();
        self.offset += record_len;
        self.next_seq += 1;
        Ok(WalAppend { file: self.file.clone(), name: segment_name(self.segment_start), block_offset, blocks, record_len, seq })
    }

    /// Closes the open segment and starts a new one at the next sequence number.
    pub fn rotate(&mut self) -> Result<(), EngineError> {
        *self = Self::create(self.storage.clone(), self.next_seq, self.segment_size)?;
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

    fn read(storage: &crate::backend::MemStorage, name: &str) -> Bytes {
        Bytes::from(storage.contents(name).unwrap())
    }

    #[test]
    fn segments_are_preallocated_reused_and_end_cleanly_over_old_records() {
        let mem = crate::backend::MemStorage::new();
        let storage: Arc<dyn Storage> = Arc::new(mem.clone());
        let size = 64 << 10;
        let mut w = WalWriter::create(storage.clone(), 1, size).unwrap();
        assert_eq!(mem.contents(&segment_name(1)).unwrap().len() as u64, size, "preallocated");
        for n in 1..=40 {
            w.append(&payload(n)).unwrap();
        }
        let scan = scan_segment(read(&mem, &segment_name(1)), 1);
        assert_eq!((scan.records.len(), scan.clean_end, scan.valid_after_stop), (40, true, false), "zeros end it");
        // Retired after a checkpoint, then reused for records 41..: its old records stay behind
        // the new ones.
        w.rotate().unwrap();
        retire_segment(storage.as_ref(), 1, &mut free_segments(&storage.list().unwrap())).unwrap();
        assert!(storage.list().unwrap().contains(&free_segment_name(1)));
        w.rotate().unwrap();
        let reused = segment_name(w.segment_start());
        assert!(!storage.list().unwrap().iter().any(|n| n.starts_with(FREE_PREFIX)), "the free segment was taken");
        for n in 0..3 {
            w.append(&payload(100 + n)).unwrap();
            let scan = scan_segment(read(&mem, &reused), w.segment_start());
            assert_eq!(scan.records.len() as u64, n + 1);
            assert!(scan.clean_end && !scan.valid_after_stop, "{:?}", scan.stopped);
        }
        // A record torn over the old bytes, at every length, is a torn tail, never corruption.
        let content = mem.contents(&reused).unwrap();
        let before = scan_segment(Bytes::from(content.clone()), w.segment_start()).valid_end as usize;
        let rec = encode_record(w.next_seq(), &payload(7));
        for keep in 0..rec.len() {
            let mut torn = content.clone();
            torn[before..before + keep].copy_from_slice(&rec[..keep]);
            // (The bytes behind the record's end may already hold its zero tail.)
            let whole = torn[before..before + rec.len()] == rec[..];
            let scan = scan_segment(Bytes::from(torn), w.segment_start());
            assert_eq!(scan.records.len(), 3 + usize::from(whole), "kept {keep}");
            assert!(!scan.valid_after_stop, "kept {keep}: {:?}", scan.stopped);
        }
        // A record that does not fit starts a new segment.
        let start = w.segment_start();
        w.append(&vec![0u8; 64 << 10]).unwrap();
        assert_ne!(w.segment_start(), start);
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
