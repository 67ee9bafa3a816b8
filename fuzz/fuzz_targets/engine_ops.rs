//! Fuzzes the engine's index-op encoding (`tessera_engine::op`), shared by WAL records and
//! checkpoints: `decode_ops` on arbitrary bytes.
//!
//! Properties checked:
//! - `decode_ops` never panics (every count and length is bounded, every read checked);
//! - ops that decode re-encode (`encode_ops`) to bytes that decode to equal ops;
//! - the encoding is canonical: those bytes are exactly the input.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use tessera_engine::op::{decode_ops, encode_ops};

fuzz_target!(|input: &[u8]| {
    let Ok(ops) = decode_ops(Bytes::copy_from_slice(input)) else {
        return;
    };
    let enc = encode_ops(&ops);
    let again = decode_ops(Bytes::from(enc.clone())).expect("re-encoded ops decode");
    assert_eq!(again, ops, "ops did not round trip");
    assert_eq!(&enc[..], input, "op encoding is not canonical: {ops:?}");
});
