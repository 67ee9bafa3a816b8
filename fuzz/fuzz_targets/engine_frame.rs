//! Fuzzes the engine RPC decoders (`tessera_engine_proto`): `decode_frame` over a byte stream,
//! then `Request::decode` and `Reply::decode` on every frame.
//!
//! Input layout: byte 0 selects the settings (bit 0: tiny frame limits instead of the defaults,
//! bit 1: repair CRCs, bit 2: repair the fixed header fields); the remaining bytes are the
//! received byte stream. Frames are decoded until the stream runs dry or an error occurs.
//!
//! "Repair" walks the stream frame by frame (by each header's body_len and data_len) before
//! decoding: with bit 2 it writes the magic and version and clears the reserved fields and
//! unknown flag bits; with bit 1 it writes the correct body and header CRC32Cs. That gets the
//! fuzzer past the header checks to the body decoders; everything else stays as it wrote it.
//!
//! Properties checked:
//! - the decoders never panic;
//! - `Ok(None)` consumes nothing; `Ok(Some)` consumes exactly header + body + data;
//! - a request that decodes re-encodes to exactly the bytes it came from (the request encoding
//!   is canonical), and those decode to an equal request;
//! - a request error becomes an error reply that decodes with the same status;
//! - a success reply that decodes re-encodes to exactly the bytes it came from, which decode to
//!   an equal reply; an error reply's message stays within its bound.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use tessera_engine_proto::frame::{self, HEADER_LEN, OFF_BODY_CRC, OFF_BODY_LEN, OFF_DATA_LEN, OFF_HEADER_CRC};
use tessera_engine_proto::reply::ERROR_MESSAGE_MAX;
use tessera_engine_proto::{decode_frame, encode_reply, encode_request, FrameLimits, Reply, Request};

const LIMITS: [FrameLimits; 2] =
    [FrameLimits { max_body: 64 * 1024, max_data: 16 * 1024 * 1024 }, FrameLimits { max_body: 64, max_data: 300 }];

fn u32_at(b: &[u8], off: usize) -> Option<u32> {
    b.get(off..off + 4).map(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
}

fn put_u32(b: &mut [u8], off: usize, v: u32) {
    if let Some(d) = b.get_mut(off..off + 4) {
        d.copy_from_slice(&v.to_le_bytes());
    }
}

/// Repairs the header fields and/or CRCs of every frame in `b` that can be located.
fn repair(b: &mut [u8], fields: bool, crcs: bool) {
    let mut at = 0usize;
    while let Some(f) = b.get_mut(at..) {
        if f.len() < HEADER_LEN {
            return;
        }
        if fields {
            f[0..4].copy_from_slice(&frame::MAGIC);
            f[4] = frame::VERSION;
            f[6] &= frame::flags::KNOWN as u8;
            f[7] = 0;
            f[22] = 0;
            f[23] = 0;
            f[40..60].fill(0);
        }
        let (Some(body_len), Some(data_len)) = (u32_at(f, OFF_BODY_LEN), u32_at(f, OFF_DATA_LEN)) else {
            return;
        };
        let (body_len, data_len) = (body_len as usize, data_len as usize);
        if crcs {
            if let Some(body) = f.get(HEADER_LEN..HEADER_LEN + body_len) {
                let c = crc32c::crc32c(body);
                put_u32(f, OFF_BODY_CRC, c);
            }
            let c = crc32c::crc32c(&f[..OFF_HEADER_CRC]);
            put_u32(f, OFF_HEADER_CRC, c);
        }
        at += HEADER_LEN + body_len + data_len;
    }
}

fuzz_target!(|input: &[u8]| {
    let Some((&sel, stream)) = input.split_first() else {
        return;
    };
    let limits = LIMITS[usize::from(sel & 1)];
    let mut buf = BytesMut::from(stream);
    repair(&mut buf, sel & 4 != 0, sel & 2 != 0);
    loop {
        let before = buf.len();
        let original = buf.clone();
        let f = match decode_frame(&mut buf, &limits) {
            Ok(Some(f)) => f,
            Ok(None) => {
                assert_eq!(buf.len(), before, "an incomplete frame consumed input");
                return;
            }
            Err(_) => return,
        };
        let used = HEADER_LEN + f.body.len() + f.data.len();
        assert_eq!(before - buf.len(), used, "frame size does not match what was consumed");
        let h = f.header;

        match Request::decode(&f) {
            Ok(req) => {
                assert_eq!(req.opcode(), h.opcode);
                let enc = encode_request(h.request_id, h.map_version, h.target, &req);
                assert_eq!(&enc.to_bytes()[..], &original[..used], "request encoding is not canonical: {req:?}");
                let again = decode_frame(&mut enc.to_bytes(), &limits).expect("re-encoded request frames").expect("whole frame");
                assert_eq!(again.header, h);
                assert_eq!(Request::decode(&again).as_ref(), Ok(&req), "request did not round trip");
            }
            Err(e) => {
                let (status, msg) = e.to_error_reply();
                assert!(!status.is_ok());
                let enc = encode_reply(h.request_id, h.opcode, 0, h.target, &Err((status, msg)));
                let again = decode_frame(&mut enc.to_bytes(), &FrameLimits::default()).expect("error reply frames").expect("whole frame");
                match Reply::decode(h.opcode, &again) {
                    Ok(Err((s, _))) => assert_eq!(s, status),
                    other => panic!("error reply for {e} decoded as {other:?}"),
                }
            }
        }

        match Reply::decode(h.opcode, &f) {
            Ok(Ok(r)) => {
                assert_eq!(r.opcode(), h.opcode);
                let enc = encode_reply(h.request_id, h.opcode, h.map_version, h.target, &Ok(r.clone()));
                assert_eq!(&enc.to_bytes()[..], &original[..used], "reply encoding is not canonical: {r:?}");
                let again = decode_frame(&mut enc.to_bytes(), &limits).expect("re-encoded reply frames").expect("whole frame");
                assert_eq!(again.header, h);
                assert_eq!(Reply::decode(h.opcode, &again), Ok(Ok(r)), "reply did not round trip");
            }
            Ok(Err((status, msg))) => {
                assert!(!status.is_ok());
                assert!(msg.len() <= 3 * ERROR_MESSAGE_MAX, "lossy message grew beyond its bound");
            }
            Err(_) => {}
        }
    }
});
