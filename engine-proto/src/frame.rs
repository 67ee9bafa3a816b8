//! Framing: the 64-byte message header, its checks, and splitting a receive buffer into frames.
//!
//! Every message, request or reply, is a header, then `body_len` bytes of body (the request or
//! reply fields, covered by `body_crc`), then `data_len` bytes of bulk data (array or single-value
//! payload, covered by the per-4-KiB checksums carried in the body). All integers little endian:
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 4 | magic `b"TSRP"` |
//! | 4 | 1 | version (1) |
//! | 5 | 1 | opcode |
//! | 6 | 2 | flags: bit 0 = reply, bit 1 = background request; other bits reserved (0) |
//! | 8 | 8 | request_id |
//! | 16 | 4 | map_version (pool map version the sender knows) |
//! | 20 | 2 | target (target index inside the engine) |
//! | 22 | 2 | reserved (0) |
//! | 24 | 4 | status (replies: 0 = ok, else an error code; requests: 0) |
//! | 28 | 4 | body_len |
//! | 32 | 4 | data_len |
//! | 36 | 4 | body_crc (CRC32C of the body) |
//! | 40 | 4 | pool (numeric pool id the map version belongs to; 0 = none, its own version domain) |
//! | 44 | 16 | reserved (0) |
//! | 60 | 4 | header_crc (CRC32C of bytes 0..60) |
//!
//! [`decode_frame`] validates the header — magic, version, header CRC, reserved fields, lengths
//! against [`FrameLimits`] — as soon as 64 bytes are buffered, before waiting for (or reserving
//! room for) the body and data, so a peer can never make the receiver buffer more than one frame
//! within the limits. Every [`FrameError`] means the peer broke the framing and the connection
//! must be closed; unknown opcodes are not frame errors (they are kept as [`Opcode::Unknown`]).
//! Encoders produce an [`Encoded`]: the header and body in one buffer and the bulk data as a
//! separate, uncopied `Bytes` for a vectored write.

use std::fmt;

use bytes::{BufMut, Bytes, BytesMut};

use crate::status::RpcStatus;

/// Length of the header.
pub const HEADER_LEN: usize = 64;
/// Magic at offset 0.
pub const MAGIC: [u8; 4] = *b"TSRP";
/// Protocol version at offset 4.
pub const VERSION: u8 = 1;

/// Offset of the magic.
pub const OFF_MAGIC: usize = 0;
/// Offset of the version.
pub const OFF_VERSION: usize = 4;
/// Offset of the opcode.
pub const OFF_OPCODE: usize = 5;
/// Offset of the flags.
pub const OFF_FLAGS: usize = 6;
/// Offset of the request id.
pub const OFF_REQUEST_ID: usize = 8;
/// Offset of the map version.
pub const OFF_MAP_VERSION: usize = 16;
/// Offset of the target index.
pub const OFF_TARGET: usize = 20;
/// Offset of the first reserved field (2 bytes).
pub const OFF_RESERVED0: usize = 22;
/// Offset of the status.
pub const OFF_STATUS: usize = 24;
/// Offset of the body length.
pub const OFF_BODY_LEN: usize = 28;
/// Offset of the data length.
pub const OFF_DATA_LEN: usize = 32;
/// Offset of the body CRC.
pub const OFF_BODY_CRC: usize = 36;
/// Offset of the pool id.
pub const OFF_POOL: usize = 40;
/// Offset of the second reserved field (16 bytes).
pub const OFF_RESERVED1: usize = 44;
/// Offset of the header CRC.
pub const OFF_HEADER_CRC: usize = 60;

/// Header flag bits.
pub mod flags {
    /// The frame is a reply.
    pub const REPLY: u16 = 1 << 0;
    /// A request made for background work (rebuild, reintegration, scrub repair), not for a
    /// host: the engine does not count it as host I/O when it paces its own rebuild.
    pub const BACKGROUND: u16 = 1 << 1;
    /// Every bit this version defines; the others must be zero.
    pub const KNOWN: u16 = REPLY | BACKGROUND;
}

/// A little-endian `u16` as stored in the header (alignment 1).
#[derive(Clone, Copy, PartialEq, Eq, Default, bytemuck::Pod, bytemuck::Zeroable)]
#[repr(transparent)]
pub struct U16Le(pub [u8; 2]);
/// A little-endian `u32` as stored in the header (alignment 1).
#[derive(Clone, Copy, PartialEq, Eq, Default, bytemuck::Pod, bytemuck::Zeroable)]
#[repr(transparent)]
pub struct U32Le(pub [u8; 4]);
/// A little-endian `u64` as stored in the header (alignment 1).
#[derive(Clone, Copy, PartialEq, Eq, Default, bytemuck::Pod, bytemuck::Zeroable)]
#[repr(transparent)]
pub struct U64Le(pub [u8; 8]);

macro_rules! le_newtype {
    ($t:ident, $int:ty) => {
        impl $t {
            /// The value.
            pub fn get(self) -> $int {
                <$int>::from_le_bytes(self.0)
            }
            /// Stores a value.
            pub fn new(v: $int) -> Self {
                $t(v.to_le_bytes())
            }
        }
        impl fmt::Debug for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Debug::fmt(&self.get(), f)
            }
        }
    };
}
le_newtype!(U16Le, u16);
le_newtype!(U32Le, u32);
le_newtype!(U64Le, u64);

/// The header exactly as on the wire. Every field is a byte array, so the layout (and this
/// struct's size, 64) does not depend on the host's endianness or alignment.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default, bytemuck::Pod, bytemuck::Zeroable)]
#[repr(C)]
pub struct RawHeader {
    pub magic: [u8; 4],
    pub version: u8,
    pub opcode: u8,
    pub flags: U16Le,
    pub request_id: U64Le,
    pub map_version: U32Le,
    pub target: U16Le,
    pub reserved0: U16Le,
    pub status: U32Le,
    pub body_len: U32Le,
    pub data_len: U32Le,
    pub body_crc: U32Le,
    pub pool: U32Le,
    pub reserved1: [u8; 16],
    pub header_crc: U32Le,
}

const _: () = assert!(std::mem::size_of::<RawHeader>() == HEADER_LEN);
const _: () = assert!(std::mem::offset_of!(RawHeader, opcode) == OFF_OPCODE);
const _: () = assert!(std::mem::offset_of!(RawHeader, flags) == OFF_FLAGS);
const _: () = assert!(std::mem::offset_of!(RawHeader, request_id) == OFF_REQUEST_ID);
const _: () = assert!(std::mem::offset_of!(RawHeader, map_version) == OFF_MAP_VERSION);
const _: () = assert!(std::mem::offset_of!(RawHeader, target) == OFF_TARGET);
const _: () = assert!(std::mem::offset_of!(RawHeader, reserved0) == OFF_RESERVED0);
const _: () = assert!(std::mem::offset_of!(RawHeader, status) == OFF_STATUS);
const _: () = assert!(std::mem::offset_of!(RawHeader, body_len) == OFF_BODY_LEN);
const _: () = assert!(std::mem::offset_of!(RawHeader, data_len) == OFF_DATA_LEN);
const _: () = assert!(std::mem::offset_of!(RawHeader, body_crc) == OFF_BODY_CRC);
const _: () = assert!(std::mem::offset_of!(RawHeader, pool) == OFF_POOL);
const _: () = assert!(std::mem::offset_of!(RawHeader, reserved1) == OFF_RESERVED1);
const _: () = assert!(std::mem::offset_of!(RawHeader, header_crc) == OFF_HEADER_CRC);

impl RawHeader {
    /// Reads a header from the first 64 bytes of `b`, or `None` if `b` is shorter.
    pub fn read(b: &[u8]) -> Option<RawHeader> {
        b.get(..HEADER_LEN).and_then(|h| bytemuck::try_pod_read_unaligned(h).ok())
    }

    /// The 64 bytes.
    pub fn as_bytes(&self) -> &[u8] {
        bytemuck::bytes_of(self)
    }

    /// CRC32C of bytes 0..60, the value `header_crc` must hold.
    pub fn compute_crc(&self) -> u32 {
        crc32c::crc32c(self.as_bytes().get(..OFF_HEADER_CRC).unwrap_or_default())
    }
}

/// Operation of a request; a reply carries its request's opcode.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum Opcode {
    /// Liveness and identity.
    Ping,
    /// Write an array extent or a single value.
    Update,
    /// Read an array range or a single value.
    Fetch,
    /// Remove an object, dkey, akey or array range.
    Punch,
    /// List objects, dkeys or akeys.
    Enumerate,
    /// Capacity and state of a target.
    QueryTarget,
    /// Aggregation bounds of a container.
    SetRetention,
    /// Delete the versions of an object or dkey above an epoch (rebuild, reintegration, GC).
    Discard,
    /// An opcode this implementation does not know; answered with `UnknownOpcode`.
    Unknown(u8),
}

impl Opcode {
    /// The opcode for a wire value.
    pub fn from_code(c: u8) -> Opcode {
        match c {
            1 => Opcode::Ping,
            2 => Opcode::Update,
            3 => Opcode::Fetch,
            4 => Opcode::Punch,
            5 => Opcode::Enumerate,
            6 => Opcode::QueryTarget,
            7 => Opcode::SetRetention,
            8 => Opcode::Discard,
            other => Opcode::Unknown(other),
        }
    }

    /// The wire value.
    pub fn code(self) -> u8 {
        match self {
            Opcode::Ping => 1,
            Opcode::Update => 2,
            Opcode::Fetch => 3,
            Opcode::Punch => 4,
            Opcode::Enumerate => 5,
            Opcode::QueryTarget => 6,
            Opcode::SetRetention => 7,
            Opcode::Discard => 8,
            Opcode::Unknown(c) => c,
        }
    }
}

impl fmt::Display for Opcode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Opcode::Unknown(c) => write!(f, "opcode {c}"),
            other => fmt::Debug::fmt(other, f),
        }
    }
}

/// The header's fields after validation. Lengths and CRCs are not kept: they are implied by the
/// frame's `body` and `data`.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Header {
    /// Operation.
    pub opcode: Opcode,
    /// Flags ([`flags`]); only known bits can be set in a decoded header.
    pub flags: u16,
    /// Chosen by the requester, echoed in the reply.
    pub request_id: u64,
    /// Pool map version the sender knows.
    pub map_version: u32,
    /// The pool `map_version` belongs to. 0 means no pool (tools, tests), which is still checked:
    /// the engine keeps pool 0's newest version as a domain of its own and refuses an older one
    /// with `StaleMapVersion`, like any pool's.
    pub pool: u32,
    /// Target index inside the engine.
    pub target: u16,
    /// Reply status (always `Ok` in a request).
    pub status: RpcStatus,
}

impl Header {
    /// A request header.
    pub fn request(opcode: Opcode, request_id: u64, map_version: u32, target: u16) -> Header {
        Header { opcode, flags: 0, request_id, map_version, pool: 0, target, status: RpcStatus::Ok }
    }

    /// The same header with `pool` as its pool id.
    pub fn in_pool(mut self, pool: u32) -> Header {
        self.pool = pool;
        self
    }

    /// A reply header.
    pub fn reply(opcode: Opcode, request_id: u64, map_version: u32, target: u16, status: RpcStatus) -> Header {
        Header { opcode, flags: flags::REPLY, request_id, map_version, pool: 0, target, status }
    }

    /// Whether the reply flag is set.
    pub fn is_reply(&self) -> bool {
        self.flags & flags::REPLY != 0
    }

    /// The same header with the [`flags::BACKGROUND`] flag set or cleared.
    pub fn background(mut self, background: bool) -> Header {
        if background {
            self.flags |= flags::BACKGROUND;
        } else {
            self.flags &= !flags::BACKGROUND;
        }
        self
    }

    /// Whether the request is background work ([`flags::BACKGROUND`]).
    pub fn is_background(&self) -> bool {
        self.flags & flags::BACKGROUND != 0
    }

    /// The wire form of this header for a body of `body` and `data_len` bytes of data, CRCs
    /// filled in.
    pub fn to_raw(&self, body: &[u8], data_len: u32) -> RawHeader {
        let mut raw = RawHeader {
            magic: MAGIC,
            version: VERSION,
            opcode: self.opcode.code(),
            flags: U16Le::new(self.flags),
            request_id: U64Le::new(self.request_id),
            map_version: U32Le::new(self.map_version),
            target: U16Le::new(self.target),
            reserved0: U16Le::default(),
            status: U32Le::new(self.status.code()),
            body_len: U32Le::new(body.len() as u32),
            data_len: U32Le::new(data_len),
            body_crc: U32Le::new(crc32c::crc32c(body)),
            pool: U32Le::new(self.pool),
            reserved1: [0; 16],
            header_crc: U32Le::default(),
        };
        raw.header_crc = U32Le::new(raw.compute_crc());
        raw
    }
}

/// Receive limits on the peer-controlled lengths of a frame.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct FrameLimits {
    /// Largest body accepted, bytes.
    pub max_body: u32,
    /// Largest bulk data accepted, bytes.
    pub max_data: u32,
}

/// Default largest body: 64 KiB (enough for the checksums of 16 MiB of data, 32 KiB).
pub const DEFAULT_MAX_BODY: u32 = 64 * 1024;
/// Default largest bulk data: 16 MiB.
pub const DEFAULT_MAX_DATA: u32 = 16 * 1024 * 1024;

impl Default for FrameLimits {
    fn default() -> Self {
        FrameLimits { max_body: DEFAULT_MAX_BODY, max_data: DEFAULT_MAX_DATA }
    }
}

/// One received frame: its header, body and data, the latter two slices of the receive buffer.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Frame {
    /// The validated header.
    pub header: Header,
    /// The body (request or reply fields).
    pub body: Bytes,
    /// The bulk data.
    pub data: Bytes,
}

/// The peer broke the framing; the connection cannot continue.
#[derive(Clone, PartialEq, Eq, Debug, thiserror::Error)]
pub enum FrameError {
    /// The first four bytes are not `TSRP`.
    #[error("bad magic {0:02x?}")]
    BadMagic([u8; 4]),
    /// A protocol version this implementation does not speak.
    #[error("unsupported protocol version {0}")]
    UnsupportedVersion(u8),
    /// The header CRC does not match.
    #[error("header CRC mismatch: header says {expected:#010x}, computed {actual:#010x}")]
    HeaderCrc {
        /// The value in the header.
        expected: u32,
        /// The value computed over bytes 0..60.
        actual: u32,
    },
    /// A reserved field or flag bit is not zero; the value is the field's byte offset.
    #[error("reserved field at offset {0} is not zero")]
    ReservedNotZero(usize),
    /// The body is longer than the receiver accepts.
    #[error("body of {len} bytes exceeds the limit of {max}")]
    BodyTooLarge {
        /// `body_len` from the header.
        len: u32,
        /// The limit.
        max: u32,
    },
    /// The bulk data is longer than the receiver accepts.
    #[error("data of {len} bytes exceeds the limit of {max}")]
    DataTooLarge {
        /// `data_len` from the header.
        len: u32,
        /// The limit.
        max: u32,
    },
    /// The body CRC does not match.
    #[error("body CRC mismatch: header says {expected:#010x}, computed {actual:#010x}")]
    BodyCrc {
        /// The value in the header.
        expected: u32,
        /// The value computed over the body.
        actual: u32,
    },
}

/// Validates a complete header and returns it with the body and data lengths.
fn check_header(raw: &RawHeader, limits: &FrameLimits) -> Result<(Header, usize, usize), FrameError> {
    if raw.magic != MAGIC {
        return Err(FrameError::BadMagic(raw.magic));
    }
    if raw.version != VERSION {
        return Err(FrameError::UnsupportedVersion(raw.version));
    }
    let actual = raw.compute_crc();
    if raw.header_crc.get() != actual {
        return Err(FrameError::HeaderCrc { expected: raw.header_crc.get(), actual });
    }
    let fl = raw.flags.get();
    if fl & !flags::KNOWN != 0 {
        return Err(FrameError::ReservedNotZero(OFF_FLAGS));
    }
    if raw.reserved0.get() != 0 {
        return Err(FrameError::ReservedNotZero(OFF_RESERVED0));
    }
    if let Some(i) = raw.reserved1.iter().position(|&b| b != 0) {
        return Err(FrameError::ReservedNotZero(OFF_RESERVED1 + i));
    }
    let (body_len, data_len) = (raw.body_len.get(), raw.data_len.get());
    if body_len > limits.max_body {
        return Err(FrameError::BodyTooLarge { len: body_len, max: limits.max_body });
    }
    if data_len > limits.max_data {
        return Err(FrameError::DataTooLarge { len: data_len, max: limits.max_data });
    }
    let header = Header {
        opcode: Opcode::from_code(raw.opcode),
        flags: fl,
        request_id: raw.request_id.get(),
        map_version: raw.map_version.get(),
        pool: raw.pool.get(),
        target: raw.target.get(),
        status: RpcStatus::from_code(raw.status.get()),
    };
    Ok((header, body_len as usize, data_len as usize))
}

/// Takes one frame off the front of `buf`.
///
/// Returns `Ok(None)` while `buf` holds less than a whole frame (nothing is consumed; once the
/// header is in and valid, room for the rest is reserved), `Ok(Some)` with the frame removed from
/// `buf` (body and data are split off without copying), or a [`FrameError`]. A wrong magic is
/// reported as soon as the bytes that differ arrive; everything else in the header is checked
/// once its 64 bytes are in, before any of the body is waited for.
pub fn decode_frame(buf: &mut BytesMut, limits: &FrameLimits) -> Result<Option<Frame>, FrameError> {
    let Some(raw) = RawHeader::read(buf) else {
        let have = buf.len().min(MAGIC.len());
        if buf.get(..have) != MAGIC.get(..have) {
            let mut m = [0u8; 4];
            if let (Some(dst), Some(src)) = (m.get_mut(..have), buf.get(..have)) {
                dst.copy_from_slice(src);
            }
            return Err(FrameError::BadMagic(m));
        }
        return Ok(None);
    };
    let (header, body_len, data_len) = check_header(&raw, limits)?;
    let total = HEADER_LEN + body_len + data_len;
    if buf.len() < total {
        buf.reserve(total - buf.len());
        return Ok(None);
    }
    let actual = crc32c::crc32c(buf.get(HEADER_LEN..HEADER_LEN + body_len).unwrap_or_default());
    if raw.body_crc.get() != actual {
        return Err(FrameError::BodyCrc { expected: raw.body_crc.get(), actual });
    }
    let _ = buf.split_to(HEADER_LEN);
    let body = buf.split_to(body_len).freeze();
    let data = buf.split_to(data_len).freeze();
    Ok(Some(Frame { header, body, data }))
}

/// An encoded frame ready to send: `head` (header and body) then `data`, written back to back
/// (with a vectored write, so the bulk data is never copied into the frame).
#[derive(Clone, PartialEq, Eq, Debug, Default)]
pub struct Encoded {
    /// The 64-byte header followed by the body.
    pub head: Bytes,
    /// The bulk data.
    pub data: Bytes,
}

impl Encoded {
    /// Total bytes on the wire.
    pub fn len(&self) -> usize {
        self.head.len() + self.data.len()
    }

    /// Whether there is nothing to send (never true for a real frame).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Header, body and data in one contiguous buffer (copies; for tests and small frames).
    pub fn to_bytes(&self) -> BytesMut {
        let mut b = BytesMut::with_capacity(self.len());
        b.put_slice(&self.head);
        b.put_slice(&self.data);
        b
    }
}

/// Encodes a frame: `header`, the body written by `body` into the buffer after it, and `data`.
/// Body and data lengths and both CRCs are computed here.
pub fn encode_frame_with(header: &Header, body_hint: usize, data: Bytes, body: impl FnOnce(&mut BytesMut)) -> Encoded {
    let mut b = BytesMut::with_capacity(HEADER_LEN + body_hint);
    b.put_bytes(0, HEADER_LEN);
    body(&mut b);
    let raw = header.to_raw(b.get(HEADER_LEN..).unwrap_or_default(), data.len() as u32);
    if let Some(h) = b.get_mut(..HEADER_LEN) {
        h.copy_from_slice(raw.as_bytes());
    }
    Encoded { head: b.freeze(), data }
}

/// Encodes a frame from a finished body.
pub fn encode_frame(header: &Header, body: &[u8], data: Bytes) -> Encoded {
    encode_frame_with(header, body.len(), data, |b| b.put_slice(body))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> Encoded {
        let h = Header::request(Opcode::Update, 0x0102_0304_0506_0708, 9, 3);
        encode_frame(&h, b"hello body", Bytes::from_static(b"bulk data!"))
    }

    fn decode_all(bytes: &[u8]) -> Result<Option<Frame>, FrameError> {
        decode_frame(&mut BytesMut::from(bytes), &FrameLimits::default())
    }

    #[test]
    fn header_layout_matches_the_table() {
        let e = sample();
        let h = &e.head[..];
        assert_eq!(&h[OFF_MAGIC..4], b"TSRP");
        assert_eq!(h[OFF_VERSION], 1);
        assert_eq!(h[OFF_OPCODE], 2);
        assert_eq!(&h[OFF_FLAGS..8], &[0, 0]);
        assert_eq!(&h[OFF_REQUEST_ID..16], &[8, 7, 6, 5, 4, 3, 2, 1]);
        assert_eq!(&h[OFF_MAP_VERSION..20], &9u32.to_le_bytes());
        assert_eq!(&h[OFF_TARGET..22], &3u16.to_le_bytes());
        assert_eq!(&h[OFF_BODY_LEN..32], &10u32.to_le_bytes());
        assert_eq!(&h[OFF_DATA_LEN..36], &10u32.to_le_bytes());
        assert_eq!(&h[OFF_BODY_CRC..40], &crc32c::crc32c(b"hello body").to_le_bytes());
        assert_eq!(&h[OFF_HEADER_CRC..64], &crc32c::crc32c(&h[..60]).to_le_bytes());
        assert_eq!(&h[HEADER_LEN..], b"hello body");
    }

    #[test]
    fn frame_round_trips_and_every_prefix_is_incomplete() {
        let e = sample();
        let all = e.to_bytes();
        for cut in 0..all.len() {
            let mut part = BytesMut::from(&all[..cut]);
            assert_eq!(decode_frame(&mut part, &FrameLimits::default()), Ok(None), "prefix {cut}");
            assert_eq!(part.len(), cut, "an incomplete frame consumed bytes");
        }
        // Two frames back to back come out one at a time.
        let mut two = all.clone();
        two.extend_from_slice(&all);
        let f = decode_frame(&mut two, &FrameLimits::default()).unwrap().unwrap();
        assert_eq!(f.header, Header::request(Opcode::Update, 0x0102_0304_0506_0708, 9, 3));
        assert_eq!((&f.body[..], &f.data[..]), (&b"hello body"[..], &b"bulk data!"[..]));
        assert_eq!(two.len(), all.len());
        assert!(decode_frame(&mut two, &FrameLimits::default()).unwrap().is_some());
        assert!(two.is_empty());
    }

    fn with_raw(f: impl FnOnce(&mut RawHeader), fix_crc: bool) -> BytesMut {
        let e = sample();
        let mut raw = RawHeader::read(&e.head).unwrap();
        f(&mut raw);
        if fix_crc {
            raw.header_crc = U32Le::new(raw.compute_crc());
        }
        let mut b = BytesMut::from(raw.as_bytes());
        b.extend_from_slice(&e.head[HEADER_LEN..]);
        b.extend_from_slice(&e.data);
        b
    }

    #[test]
    fn each_header_error_is_reported() {
        let err = |b: BytesMut| decode_all(&b).unwrap_err();
        assert_eq!(err(with_raw(|r| r.magic = *b"TSRQ", true)), FrameError::BadMagic(*b"TSRQ"));
        // A wrong magic is caught from the first differing byte.
        assert_eq!(decode_all(b"TX"), Err(FrameError::BadMagic(*b"TX\0\0")));
        assert_eq!(decode_all(b"TSR"), Ok(None));
        assert_eq!(err(with_raw(|r| r.version = 2, true)), FrameError::UnsupportedVersion(2));
        assert!(matches!(err(with_raw(|r| r.target = U16Le::new(4), false)), FrameError::HeaderCrc { .. }));
        assert_eq!(err(with_raw(|r| r.flags = U16Le::new(4), true)), FrameError::ReservedNotZero(OFF_FLAGS));
        assert_eq!(err(with_raw(|r| r.reserved0 = U16Le::new(1), true)), FrameError::ReservedNotZero(OFF_RESERVED0));
        assert_eq!(err(with_raw(|r| r.reserved1[7] = 1, true)), FrameError::ReservedNotZero(OFF_RESERVED1 + 7));
        assert_eq!(
            err(with_raw(|r| r.body_len = U32Le::new(DEFAULT_MAX_BODY + 1), true)),
            FrameError::BodyTooLarge { len: DEFAULT_MAX_BODY + 1, max: DEFAULT_MAX_BODY }
        );
        assert_eq!(
            err(with_raw(|r| r.data_len = U32Le::new(u32::MAX), true)),
            FrameError::DataTooLarge { len: u32::MAX, max: DEFAULT_MAX_DATA }
        );
        assert!(matches!(err(with_raw(|r| r.body_crc = U32Le::new(1), true)), FrameError::BodyCrc { expected: 1, .. }));
    }

    #[test]
    fn lengths_are_checked_from_the_header_alone() {
        // Only the 64 header bytes are present; the oversized length is refused before any body.
        let b = with_raw(|r| r.data_len = U32Le::new(DEFAULT_MAX_DATA + 1), true);
        let mut head = BytesMut::from(&b[..HEADER_LEN]);
        assert!(matches!(decode_frame(&mut head, &FrameLimits::default()), Err(FrameError::DataTooLarge { .. })));
        // Tiny limits are enforced exactly.
        let limits = FrameLimits { max_body: 10, max_data: 9 };
        let mut full = sample().to_bytes();
        assert_eq!(decode_frame(&mut full, &limits), Err(FrameError::DataTooLarge { len: 10, max: 9 }));
        let limits = FrameLimits { max_body: 10, max_data: 10 };
        assert!(decode_frame(&mut full, &limits).unwrap().is_some());
    }

    #[test]
    fn body_corruption_is_caught_only_once_the_body_is_in() {
        let mut b = sample().to_bytes();
        b[HEADER_LEN + 2] ^= 0x40;
        let mut part = BytesMut::from(&b[..HEADER_LEN + 5]);
        assert_eq!(decode_frame(&mut part, &FrameLimits::default()), Ok(None));
        assert!(matches!(decode_all(&b), Err(FrameError::BodyCrc { .. })));
        // The data is not covered by the frame CRCs (it has its own per-chunk checksums).
        let mut b = sample().to_bytes();
        let n = b.len();
        b[n - 1] ^= 1;
        assert!(decode_all(&b).unwrap().is_some());
    }

    #[test]
    fn opcodes_keep_unknown_values() {
        for c in 0..=255u8 {
            assert_eq!(Opcode::from_code(c).code(), c);
        }
        assert_eq!(Opcode::from_code(0), Opcode::Unknown(0));
        assert_eq!(Opcode::from_code(99).to_string(), "opcode 99");
        assert_eq!(Opcode::Fetch.to_string(), "Fetch");
        assert_eq!(Opcode::from_code(8), Opcode::Discard);
        assert_eq!(Opcode::from_code(9), Opcode::Unknown(9));
        let h = Header::reply(Opcode::Unknown(200), 1, 0, 0, RpcStatus::UnknownOpcode);
        let f = decode_all(&encode_frame(&h, b"", Bytes::new()).to_bytes()).unwrap().unwrap();
        assert_eq!(f.header, h);
        assert!(f.header.is_reply());
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300), small in any::<bool>()) {
            let limits = if small { FrameLimits { max_body: 16, max_data: 16 } } else { FrameLimits::default() };
            let mut b = BytesMut::from(&bytes[..]);
            let before = b.len();
            match decode_frame(&mut b, &limits) {
                Ok(None) => prop_assert_eq!(b.len(), before),
                Ok(Some(f)) => prop_assert_eq!(b.len(), before - HEADER_LEN - f.body.len() - f.data.len()),
                Err(_) => {}
            }
        }

        #[test]
        fn arbitrary_headers_round_trip(op in any::<u8>(), reply in any::<bool>(), id in any::<u64>(), mv in any::<u32>(), t in any::<u16>(),
                                        st in any::<u32>(), body in proptest::collection::vec(any::<u8>(), 0..100), data in proptest::collection::vec(any::<u8>(), 0..100)) {
            let h = Header { opcode: Opcode::from_code(op), flags: if reply { flags::REPLY } else { 0 }, request_id: id, map_version: mv, pool: 0, target: t, status: RpcStatus::from_code(st) };
            let e = encode_frame(&h, &body, Bytes::from(data.clone()));
            let mut b = e.to_bytes();
            let f = decode_frame(&mut b, &FrameLimits::default()).unwrap().unwrap();
            prop_assert_eq!(f.header, h);
            prop_assert_eq!(&f.body[..], &body[..]);
            prop_assert_eq!(&f.data[..], &data[..]);
        }
    }
}
