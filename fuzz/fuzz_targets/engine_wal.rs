//! Fuzzes the WAL segment scanner (`tessera_engine::wal::scan_segment`).
//!
//! Input layout: bytes 0..8 are the segment's first sequence number (little-endian, as recovery
//! takes it from the file name `wal-<seq>.log`); the rest is the segment's content. Inputs
//! shorter than 8 bytes are ignored.
//!
//! Each input is scanned twice: as it is, and "repaired": walking the records by their length
//! fields, the magic and version are written and the payload and header CRC32Cs recomputed (the
//! sequence numbers, lengths, flags and reserved fields stay as the fuzzer wrote them). That
//! gets the fuzzer past the checksums to the sequence checks and the op decoder.
//!
//! Properties checked, for both scans:
//! - `scan_segment` never panics;
//! - `valid_end` lies within the input; scanning stopped early exactly when `valid_end` is
//!   short of the end; `valid_after_stop` only when it stopped;
//! - the records come with consecutive sequence numbers from `first_seq`, and re-encoding them
//!   (`encode_record(seq, encode_ops(ops))`) gives exactly the input's first `valid_end` bytes
//!   (the scanner requires the flags and reserved fields to be zero, as writers write them).
//! - rescanning that valid prefix alone gives the same records and no stop.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use tessera_engine::op::{decode_ops, encode_ops};
use tessera_engine::wal::{encode_record, scan_segment, HEADER_LEN, MAGIC, VERSION};

const OFF_LEN: usize = 16;
const OFF_PAYLOAD_CRC: usize = 20;
const OFF_HEADER_CRC: usize = 28;

/// Rewrites magic, version and both CRCs of every record that can be located by its length.
fn repair(b: &mut [u8]) {
    let mut at = 0usize;
    while let Some(r) = b.get_mut(at..) {
        if r.len() < HEADER_LEN {
            return;
        }
        r[..4].copy_from_slice(&MAGIC);
        r[4..6].copy_from_slice(&VERSION.to_le_bytes());
        let len = u32::from_le_bytes([r[OFF_LEN], r[OFF_LEN + 1], r[OFF_LEN + 2], r[OFF_LEN + 3]]) as usize;
        if let Some(payload) = r.get(HEADER_LEN..HEADER_LEN.saturating_add(len)) {
            let c = crc32c::crc32c(payload);
            r[OFF_PAYLOAD_CRC..OFF_PAYLOAD_CRC + 4].copy_from_slice(&c.to_le_bytes());
        }
        let c = crc32c::crc32c(&r[..OFF_HEADER_CRC]);
        r[OFF_HEADER_CRC..OFF_HEADER_CRC + 4].copy_from_slice(&c.to_le_bytes());
        at = at.saturating_add(HEADER_LEN).saturating_add(len);
    }
}

fn check(seg: &[u8], first_seq: u64) {
    let scan = scan_segment(Bytes::copy_from_slice(seg), first_seq);
    let valid_end = usize::try_from(scan.valid_end).expect("valid_end fits");
    assert!(valid_end <= seg.len(), "valid_end {valid_end} beyond the {} input bytes", seg.len());
    assert_eq!(scan.stopped.is_some(), valid_end < seg.len(), "stop reason {:?} with valid_end {valid_end}", scan.stopped);
    assert!(scan.stopped.is_some() || !scan.valid_after_stop, "valid_after_stop without a stop");
    let mut again = Vec::with_capacity(valid_end);
    for (i, (seq, ops)) in scan.records.iter().enumerate() {
        assert_eq!(*seq, first_seq.wrapping_add(i as u64), "record {i} has a non-consecutive sequence number");
        let payload = encode_ops(ops);
        assert_eq!(decode_ops(Bytes::from(payload.clone())).as_ref(), Ok(ops), "record {seq}: ops did not round trip");
        again.extend_from_slice(&encode_record(*seq, &payload));
    }
    assert_eq!(again.len(), valid_end, "re-encoded records are not as long as the valid prefix");
    assert!(again == seg[..valid_end], "re-encoded records differ from the valid prefix");
    if scan.stopped.is_some() {
        let prefix = scan_segment(Bytes::copy_from_slice(&seg[..valid_end]), first_seq);
        assert!(prefix.stopped.is_none(), "the valid prefix alone does not scan cleanly: {:?}", prefix.stopped);
        assert_eq!(prefix.records, scan.records);
    }
}

fuzz_target!(|input: &[u8]| {
    let Some((seq, seg)) = input.split_first_chunk::<8>() else {
        return;
    };
    let first_seq = u64::from_le_bytes(*seq);
    check(seg, first_seq);
    let mut repaired = seg.to_vec();
    repair(&mut repaired);
    if repaired != seg {
        check(&repaired, first_seq);
    }
});
