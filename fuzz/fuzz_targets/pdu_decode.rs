//! Fuzzes the NVMe/TCP PDU decoder (`tessera_nvme_proto::pdu::decode`).
//!
//! Input layout: byte 0 selects the connection settings (bit 0: header digest, bit 1: data
//! digest, bits 3:2: one of four receive limit sets, bit 4: fix digests); the remaining bytes are
//! the received byte stream. PDUs are decoded from the stream until it runs dry or an error occurs.
//!
//! With "fix digests" set, the harness first walks the stream PDU by PDU (by each common header's
//! HLEN, PDO and PLEN) and overwrites every header and data digest position with the correct
//! CRC32C, so that the fuzzer gets past the digest checks to the fields behind them; everything
//! else in the stream stays as the fuzzer wrote it.
//!
//! Properties checked:
//! - the decoder never panics;
//! - `Ok(None)` consumes nothing and `Ok(Some)` consumes at least one byte;
//! - every decoded PDU re-encodes (with the same digests) to bytes that decode to an equal PDU,
//!   consuming exactly the encoding;
//! - an error quotes at most 128 header bytes, and the C2HTermReq that reports it itself encodes
//!   and decodes back.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use tessera_nvme_proto::pdu::{self, Pdu, TermReq, IC_LEN};
use tessera_nvme_proto::{Digests, PduLimits};

/// Receive limits to fuzz under: the target's defaults, tiny ones that make the limit checks
/// reachable with short inputs, zero in-capsule data, and the largest values.
const LIMITS: [PduLimits; 4] = [
    PduLimits { max_capsule_data: 8192, max_data_pdu: 131_072 },
    PduLimits { max_capsule_data: 16, max_data_pdu: 32 },
    PduLimits { max_capsule_data: 0, max_data_pdu: 4096 },
    PduLimits { max_capsule_data: u32::MAX, max_data_pdu: u32::MAX },
];

fn round_trip(p: &Pdu, d: Digests, limits: &PduLimits) {
    let mut enc = p.to_bytes(d);
    let len = enc.len();
    match pdu::decode(&mut enc, d, limits) {
        Ok(Some(again)) => {
            assert_eq!(&again, p, "re-decoded PDU differs (digests {d:?})");
            assert!(enc.is_empty(), "decoding the {len}-byte encoding of {p:?} left {} bytes", enc.len());
        }
        other => panic!("encoding of {p:?} (digests {d:?}) did not decode back: {other:?}"),
    }
}

/// Writes correct digests into every PDU of `b` that is framed well enough to locate them.
fn fix_digests(b: &mut [u8], d: Digests) {
    let mut at = 0usize;
    while let Some(pdu) = b.get_mut(at..) {
        let [ty, _, hlen, pdo, p0, p1, p2, p3, ..] = *pdu else {
            return;
        };
        let (hlen, pdo) = (usize::from(hlen), usize::from(pdo));
        let plen = u32::from_le_bytes([p0, p1, p2, p3]) as usize;
        let Some(pdu) = pdu.get_mut(..plen) else {
            return;
        };
        if d.header && ty > pdu::pdu_type::C2H_TERM_REQ {
            if let Some(h) = pdu.get(..hlen) {
                let crc = pdu::digest(h);
                if let Some(dst) = pdu.get_mut(hlen..hlen + pdu::DIGEST_LEN) {
                    dst.copy_from_slice(&crc);
                }
            }
        }
        let carries_ddgst = matches!(ty, pdu::pdu_type::CAPSULE_CMD | pdu::pdu_type::H2C_DATA | pdu::pdu_type::C2H_DATA);
        if d.data && carries_ddgst {
            if let Some(end) = plen.checked_sub(pdu::DIGEST_LEN).filter(|&e| e > pdo) {
                if let Some(data) = pdu.get(pdo..end) {
                    let crc = pdu::digest(data);
                    if let Some(dst) = pdu.get_mut(end..plen) {
                        dst.copy_from_slice(&crc);
                    }
                }
            }
        }
        if plen == 0 {
            return;
        }
        at += plen;
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&sel, stream)) = data.split_first() else {
        return;
    };
    let digests = Digests { header: sel & 1 != 0, data: sel & 2 != 0 };
    let limits = LIMITS[usize::from((sel >> 2) & 3)];
    let mut buf = BytesMut::from(stream);
    if sel & 0x10 != 0 {
        fix_digests(&mut buf, digests);
    }
    loop {
        let before = buf.len();
        match pdu::decode(&mut buf, digests, &limits) {
            Ok(Some(p)) => {
                assert!(buf.len() < before, "a PDU was decoded without consuming input");
                round_trip(&p, digests, &limits);
            }
            Ok(None) => {
                assert_eq!(buf.len(), before, "an incomplete PDU consumed input");
                break;
            }
            Err(e) => {
                assert!(e.header.len() <= IC_LEN, "error quotes {} header bytes", e.header.len());
                // What the target would send back: the termination request must be a valid PDU.
                let t: TermReq = e.term_req();
                round_trip(&Pdu::C2hTermReq(t), digests, &limits);
                break;
            }
        }
    }
});
