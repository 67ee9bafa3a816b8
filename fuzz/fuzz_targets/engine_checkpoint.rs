//! Fuzzes checkpoint loading (`tessera_engine::checkpoint::decode`), which decodes the ops of a
//! checkpoint body and applies them to an empty index.
//!
//! Each input is decoded twice: as it is, and "repaired": if it is at least a header long, the
//! magic, version, body length, body CRC32C, op count (when the body decodes) and header CRC32C
//! are rewritten to match the body (the sequence number, next version id and reserved bytes stay
//! as the fuzzer wrote them). That gets the fuzzer past the header checks to the op decoder and
//! `Index::apply`.
//!
//! Properties checked, for both:
//! - `decode` never panics;
//! - when it succeeds, encoding the index again (`encode`, with the same sequence number) gives
//!   a checkpoint that decodes, to the same sequence number, and to an index that encodes to the
//!   same bytes (encoding a decoded checkpoint is a fixed point after one round).
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use tessera_engine::checkpoint::{decode, encode, HEADER_LEN, MAGIC, VERSION};
use tessera_engine::op::decode_ops;

const OFF_COUNT: usize = 24;
const OFF_BODY_LEN: usize = 32;
const OFF_BODY_CRC: usize = 40;
const OFF_HEADER_CRC: usize = 60;

fn repair(b: &mut [u8]) {
    if b.len() < HEADER_LEN {
        return;
    }
    let (header, body) = b.split_at_mut(HEADER_LEN);
    header[..4].copy_from_slice(&MAGIC);
    header[4..8].copy_from_slice(&VERSION.to_le_bytes());
    header[OFF_BODY_LEN..OFF_BODY_LEN + 8].copy_from_slice(&(body.len() as u64).to_le_bytes());
    header[OFF_BODY_CRC..OFF_BODY_CRC + 4].copy_from_slice(&crc32c::crc32c(body).to_le_bytes());
    if let Ok(ops) = decode_ops(Bytes::copy_from_slice(body)) {
        header[OFF_COUNT..OFF_COUNT + 8].copy_from_slice(&(ops.len() as u64).to_le_bytes());
    }
    let c = crc32c::crc32c(&header[..OFF_HEADER_CRC]);
    header[OFF_HEADER_CRC..OFF_HEADER_CRC + 4].copy_from_slice(&c.to_le_bytes());
}

fn check(input: &[u8]) {
    let Ok((index, seq)) = decode(Bytes::copy_from_slice(input)) else {
        return;
    };
    let first = encode(&index, seq);
    let (again, seq2) = decode(Bytes::from(first.clone())).expect("a re-encoded checkpoint decodes");
    assert_eq!(seq2, seq, "sequence number changed");
    let second = encode(&again, seq2);
    assert!(second == first, "re-encoding a decoded checkpoint is not stable");
}

fuzz_target!(|input: &[u8]| {
    check(input);
    let mut repaired = input.to_vec();
    repair(&mut repaired);
    if repaired != input {
        check(&repaired);
    }
});
