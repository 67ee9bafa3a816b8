//! Replies: what a target answers, their body layouts, decoding from a [`Frame`] and encoding.
//! A reply carries its request's opcode and request id. With status 0 the body is the opcode's
//! reply layout (sequential fields, see [`crate::body`]):
//!
//! | opcode | body | data |
//! |---|---|---|
//! | Ping | rank u32, targets u16, map_version u32 | none |
//! | Update, Punch, SetRetention | empty | none |
//! | Fetch | kind u8; 0 single: present u8, if 1: csum u64, epoch u64; 1 array: holes (u32 count + (offset u32, len u32) each), csums (u32 count + u64 each); 2 array with runs: as 1, then runs (u32 count + (offset u32, len u32, epoch u64) each); 3 epochs: runs (u32 count + (offset u32, len u32, epoch u64, punched u8) each) | the value / the range / none |
//! | Enumerate | keys (u32 count + key each, keys 0..=255 bytes), next (optional key) | none |
//! | QueryTarget | capacity u64, used u64, objects u64, wal_seq u64, checkpoint_seq u64, state u8 | none |
//! | Discard | versions u64 | none |
//!
//! With any other status the body is a UTF-8 message of at most [`ERROR_MESSAGE_MAX`] bytes and
//! there is no data.

use bytes::{BufMut, Bytes, BytesMut};

use crate::body::{key_len, put_key, put_opt_key, put_u64_list, BodyError, Reader};
use crate::frame::{encode_frame_with, Encoded, Frame, Header, Opcode};
use crate::request::ENUM_MAX_KEYS;
use crate::status::{RpcStatus, TargetHealth};
use crate::types::{chunk_csums, crc64, csum_count, verify_chunk_csums, Epoch};

/// Longest error message, bytes; longer messages are cut (at a character boundary) when encoded.
pub const ERROR_MESSAGE_MAX: usize = 1024;

/// Budget for the encoded keys of one Enumerated reply (each key costs 1 + its length), so a
/// reply of [`ENUM_MAX_KEYS`] long keys still fits a 64 KiB body.
pub const ENUM_REPLY_KEY_BYTES: usize = 48 * 1024;

/// A single value as fetched.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct SingleValue {
    /// The value; sent as the frame's data.
    pub data: Bytes,
    /// [`crc64`] of `data`, as stored.
    pub csum: u64,
    /// Epoch of the update that wrote it.
    pub epoch: Epoch,
}

/// A run of fetched data and the epoch of the version it comes from.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct DataRun {
    /// Offset in the reply's data.
    pub offset: u32,
    /// Length (≥ 1).
    pub len: u32,
    /// Epoch of the update that wrote these bytes.
    pub epoch: Epoch,
}

/// A run of an epochs-only fetch: bytes `offset..offset + len` of the requested range resolve
/// to a version of epoch `epoch`, data or (`punched`) a range punch. Bytes in no run were never
/// written (or are hidden by a punch of a whole akey, dkey or object).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct EpochRun {
    /// Offset from the start of the requested range.
    pub offset: u32,
    /// Length (≥ 1).
    pub len: u32,
    /// Epoch of the version.
    pub epoch: Epoch,
    /// The version is a range punch.
    pub punched: bool,
}

/// Most runs in an epochs-only fetch reply.
pub const EPOCH_RUNS_MAX: usize = 16 * 1024;

/// The result of a fetch.
#[derive(Clone, PartialEq, Eq, Debug)]
pub enum FetchReply {
    /// An array range. `data` covers the whole requested range (hole bytes are zero).
    Array {
        /// The range; sent as the frame's data.
        data: Bytes,
        /// Ranges of `data` that were never written or are punched: (offset in `data`, length),
        /// ascending, non-overlapping, non-empty, inside `data`.
        holes: Vec<(u32, u32)>,
        /// [`crc64`] of each 4 KiB chunk of `data` (the last may be short).
        csums: Vec<u64>,
        /// For a [`crate::request::FetchValue::Versions`] fetch: every run of data (not hole) with
        /// the epoch of the version it comes from, ascending, disjoint, inside `data`; adjacent
        /// runs of one epoch may or may not be merged. Empty for a plain array fetch.
        runs: Vec<DataRun>,
    },
    /// The runs of an epochs-only fetch ([`crate::request::FetchValue::Epochs`]): ascending,
    /// disjoint, inside the requested range, at most [`EPOCH_RUNS_MAX`]. No data.
    Epochs {
        /// The runs.
        runs: Vec<EpochRun>,
    },
    /// A single value, `None` if there is none at the epoch.
    Single {
        /// The value.
        value: Option<SingleValue>,
    },
}

impl FetchReply {
    /// An array reply with its checksums computed.
    pub fn array(data: Bytes, holes: Vec<(u32, u32)>) -> FetchReply {
        let csums = chunk_csums(&data);
        FetchReply::Array { data, holes, csums, runs: Vec::new() }
    }

    /// The payload.
    pub fn data(&self) -> Bytes {
        match self {
            FetchReply::Array { data, .. } => data.clone(),
            FetchReply::Single { value } => value.as_ref().map(|v| v.data.clone()).unwrap_or_default(),
            FetchReply::Epochs { .. } => Bytes::new(),
        }
    }

    /// Checks the payload against its checksums (the client's end-to-end check); on mismatch
    /// returns the first bad chunk index (0 for a single value).
    pub fn verify(&self) -> Result<(), usize> {
        match self {
            FetchReply::Array { data, csums, .. } => verify_chunk_csums(data, csums),
            FetchReply::Single { value: None } | FetchReply::Epochs { .. } => Ok(()),
            FetchReply::Single { value: Some(v) } => {
                if crc64(&v.data) == v.csum {
                    Ok(())
                } else {
                    Err(0)
                }
            }
        }
    }
}

/// State of a target (QueryTarget).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct TargetInfo {
    /// Bytes of storage.
    pub capacity: u64,
    /// Bytes in use.
    pub used: u64,
    /// Health.
    pub state: TargetHealth,
    /// Objects stored.
    pub objects: u64,
    /// Sequence number of the newest WAL record.
    pub wal_seq: u64,
    /// WAL sequence number covered by the newest checkpoint.
    pub checkpoint_seq: u64,
}

/// A successful reply.
#[derive(Clone, PartialEq, Eq, Debug)]
pub enum Reply {
    /// Ping.
    Pong {
        /// The engine's rank in the pool.
        rank: u32,
        /// Number of targets the engine serves.
        targets: u16,
        /// Newest pool map version the engine knows.
        map_version: u32,
    },
    /// Update.
    Updated,
    /// Fetch.
    Fetched(FetchReply),
    /// Punch.
    Punched,
    /// Enumerate.
    Enumerated {
        /// Keys in order (objects as 16-byte big-endian ids).
        keys: Vec<Bytes>,
        /// Anchor to continue from (the last key), `None` when the listing is complete.
        next: Option<Bytes>,
    },
    /// QueryTarget.
    TargetInfo(TargetInfo),
    /// SetRetention.
    RetentionSet,
    /// Discard.
    Discarded {
        /// Versions deleted: array updates (one each, however many pieces the engine stored it
        /// in), range punches, single values and punches of every level. 0 when there was
        /// nothing above the epoch.
        versions: u64,
    },
}

/// A reply as sent or received: success, or the status and message of an error reply.
pub type ReplyResult = Result<Reply, (RpcStatus, String)>;

/// A reply frame that does not decode. For a client this means the engine is broken or not an
/// engine; the connection's other requests are unaffected.
#[derive(Clone, PartialEq, Eq, Debug, thiserror::Error)]
pub enum ReplyError {
    /// The frame lacks the reply flag.
    #[error("frame is not a reply")]
    NotAReply,
    /// The reply is for a different operation than the request with its id.
    #[error("reply opcode {got} does not match request opcode {expected}")]
    OpcodeMismatch {
        /// The request's opcode.
        expected: Opcode,
        /// The reply's opcode.
        got: Opcode,
    },
    /// A success reply for an opcode this implementation does not know.
    #[error("success reply for unknown opcode {0}")]
    UnknownOpcode(u8),
    /// The body does not decode.
    #[error("malformed {opcode} reply: {source}")]
    Body {
        /// The opcode.
        opcode: Opcode,
        /// What is wrong.
        source: BodyError,
    },
    /// Data came with a reply that has none.
    #[error("{opcode} reply carries {len} bytes of data but has none")]
    UnexpectedData {
        /// The opcode.
        opcode: Opcode,
        /// Data bytes received.
        len: usize,
    },
    /// An error message longer than [`ERROR_MESSAGE_MAX`].
    #[error("error message of {0} bytes is too long")]
    MessageTooLong(usize),
}

mod kind {
    pub const SINGLE: u8 = 0;
    pub const ARRAY: u8 = 1;
    pub const ARRAY_RUNS: u8 = 2;
    pub const EPOCHS: u8 = 3;
}

/// Counts keys into an Enumerated reply within [`ENUM_MAX_KEYS`], the request's `max` and
/// [`ENUM_REPLY_KEY_BYTES`]. The engine stops listing at the first key [`EnumBudget::take`]
/// refuses and returns the last key it took as `next`.
#[derive(Clone, Copy, Debug)]
pub struct EnumBudget {
    keys_left: u32,
    bytes_left: usize,
}

impl EnumBudget {
    /// A budget for a request asking for `max` keys.
    pub fn new(max: u32) -> EnumBudget {
        EnumBudget { keys_left: max.min(ENUM_MAX_KEYS), bytes_left: ENUM_REPLY_KEY_BYTES }
    }

    /// Takes room for `key`; `false` if the reply is full.
    pub fn take(&mut self, key: &[u8]) -> bool {
        let cost = key_len(key);
        if self.keys_left == 0 || cost > self.bytes_left {
            return false;
        }
        self.keys_left -= 1;
        self.bytes_left -= cost;
        true
    }
}

fn decode_fetched(r: &mut Reader<'_>, data: &Bytes) -> Result<FetchReply, BodyError> {
    match r.u8("kind")? {
        kind::SINGLE => {
            if !r.flag("present")? {
                if !data.is_empty() {
                    return Err(BodyError::Inconsistent("absent single value with data"));
                }
                return Ok(FetchReply::Single { value: None });
            }
            let csum = r.u64("csum")?;
            let epoch = r.u64("epoch")?;
            Ok(FetchReply::Single { value: Some(SingleValue { data: data.clone(), csum, epoch }) })
        }
        k @ (kind::ARRAY | kind::ARRAY_RUNS) => {
            let n = r.count("holes", 8)?;
            let mut holes = Vec::with_capacity(n);
            let mut end = 0u64;
            for _ in 0..n {
                let (off, len) = (r.u32("hole offset")?, r.u32("hole len")?);
                let hole_end = u64::from(off) + u64::from(len);
                if len == 0 || u64::from(off) < end || hole_end > data.len() as u64 {
                    return Err(BodyError::Inconsistent("holes must be non-empty, ascending, disjoint and inside the data"));
                }
                end = hole_end;
                holes.push((off, len));
            }
            let csums = r.u64_list("csums")?;
            if csums.len() != csum_count(data.len()) {
                return Err(BodyError::Inconsistent("checksum count does not match the data length"));
            }
            let mut runs = Vec::new();
            if k == kind::ARRAY_RUNS {
                let n = r.count("runs", 16)?;
                runs.reserve(n);
                let mut end = 0u64;
                for _ in 0..n {
                    let (offset, len, epoch) = (r.u32("run offset")?, r.u32("run len")?, r.u64("run epoch")?);
                    let run_end = u64::from(offset) + u64::from(len);
                    if len == 0 || u64::from(offset) < end || run_end > data.len() as u64 {
                        return Err(BodyError::Inconsistent("runs must be non-empty, ascending, disjoint and inside the data"));
                    }
                    end = run_end;
                    runs.push(DataRun { offset, len, epoch });
                }
            }
            Ok(FetchReply::Array { data: data.clone(), holes, csums, runs })
        }
        kind::EPOCHS => {
            if !data.is_empty() {
                return Err(BodyError::Inconsistent("an epochs reply carries no data"));
            }
            let n = r.count("runs", 17)?;
            if n > EPOCH_RUNS_MAX {
                return Err(BodyError::BadValue { field: "runs", value: n as u64 });
            }
            let mut runs = Vec::with_capacity(n);
            let mut end = 0u64;
            for _ in 0..n {
                let (offset, len, epoch) = (r.u32("run offset")?, r.u32("run len")?, r.u64("run epoch")?);
                let punched = r.flag("run punched")?;
                if len == 0 || u64::from(offset) < end {
                    return Err(BodyError::Inconsistent("runs must be non-empty, ascending and disjoint"));
                }
                end = u64::from(offset) + u64::from(len);
                runs.push(EpochRun { offset, len, epoch, punched });
            }
            Ok(FetchReply::Epochs { runs })
        }
        k => Err(BodyError::BadValue { field: "kind", value: k.into() }),
    }
}

fn decode_enumerated(r: &mut Reader<'_>) -> Result<Reply, BodyError> {
    let n = r.count("keys", 1)?;
    if n > ENUM_MAX_KEYS as usize {
        return Err(BodyError::BadValue { field: "keys", value: n as u64 });
    }
    let mut keys = Vec::with_capacity(n);
    for _ in 0..n {
        keys.push(r.key_or_empty("key")?);
    }
    let next = r.opt_key("next")?;
    Ok(Reply::Enumerated { keys, next })
}

fn decode_target_info(r: &mut Reader<'_>) -> Result<Reply, BodyError> {
    let capacity = r.u64("capacity")?;
    let used = r.u64("used")?;
    let objects = r.u64("objects")?;
    let wal_seq = r.u64("wal_seq")?;
    let checkpoint_seq = r.u64("checkpoint_seq")?;
    let state = TargetHealth::from_code(r.u8("state")?);
    Ok(Reply::TargetInfo(TargetInfo { capacity, used, state, objects, wal_seq, checkpoint_seq }))
}

impl Reply {
    /// The opcode of the request this answers.
    pub fn opcode(&self) -> Opcode {
        match self {
            Reply::Pong { .. } => Opcode::Ping,
            Reply::Updated => Opcode::Update,
            Reply::Fetched(_) => Opcode::Fetch,
            Reply::Punched => Opcode::Punch,
            Reply::Enumerated { .. } => Opcode::Enumerate,
            Reply::TargetInfo(_) => Opcode::QueryTarget,
            Reply::RetentionSet => Opcode::SetRetention,
            Reply::Discarded { .. } => Opcode::Discard,
        }
    }

    /// Decodes the reply in `frame` to a request with opcode `opcode`: `Ok(Ok(reply))` for
    /// success, `Ok(Err((status, message)))` for an error reply, `Err` if the frame is not a
    /// well-formed reply to such a request.
    pub fn decode(opcode: Opcode, frame: &Frame) -> Result<ReplyResult, ReplyError> {
        let h = &frame.header;
        if !h.is_reply() {
            return Err(ReplyError::NotAReply);
        }
        if h.opcode != opcode {
            return Err(ReplyError::OpcodeMismatch { expected: opcode, got: h.opcode });
        }
        let data_err = || ReplyError::UnexpectedData { opcode, len: frame.data.len() };
        if !h.status.is_ok() {
            if !frame.data.is_empty() {
                return Err(data_err());
            }
            if frame.body.len() > ERROR_MESSAGE_MAX {
                return Err(ReplyError::MessageTooLong(frame.body.len()));
            }
            return Ok(Err((h.status, String::from_utf8_lossy(&frame.body).into_owned())));
        }
        if opcode != Opcode::Fetch && !frame.data.is_empty() {
            return Err(data_err());
        }
        let mut r = Reader::new(&frame.body);
        let body = |source| ReplyError::Body { opcode, source };
        let reply = match opcode {
            Opcode::Ping => {
                let rank = r.u32("rank").map_err(body)?;
                let targets = r.u16("targets").map_err(body)?;
                let map_version = r.u32("map_version").map_err(body)?;
                Reply::Pong { rank, targets, map_version }
            }
            Opcode::Update => Reply::Updated,
            Opcode::Punch => Reply::Punched,
            Opcode::SetRetention => Reply::RetentionSet,
            Opcode::Fetch => Reply::Fetched(decode_fetched(&mut r, &frame.data).map_err(body)?),
            Opcode::Enumerate => decode_enumerated(&mut r).map_err(body)?,
            Opcode::QueryTarget => decode_target_info(&mut r).map_err(body)?,
            Opcode::Discard => Reply::Discarded { versions: r.u64("versions").map_err(body)? },
            Opcode::Unknown(c) => return Err(ReplyError::UnknownOpcode(c)),
        };
        r.finish().map_err(body)?;
        Ok(Ok(reply))
    }

    /// The bulk data sent after the body (only a fetch reply has any).
    pub fn data(&self) -> Bytes {
        match self {
            Reply::Fetched(f) => f.data(),
            _ => Bytes::new(),
        }
    }

    fn body_hint(&self) -> usize {
        match self {
            Reply::Fetched(FetchReply::Array { holes, csums, runs, .. }) => 13 + 8 * holes.len() + 8 * csums.len() + 16 * runs.len(),
            Reply::Fetched(FetchReply::Epochs { runs }) => 5 + 17 * runs.len(),
            Reply::Enumerated { keys, .. } => 262 + keys.iter().map(|k| key_len(k)).sum::<usize>(),
            _ => 48,
        }
    }

    /// Appends the body to `b`.
    pub fn encode_body(&self, b: &mut BytesMut) {
        match self {
            Reply::Pong { rank, targets, map_version } => {
                b.put_u32_le(*rank);
                b.put_u16_le(*targets);
                b.put_u32_le(*map_version);
            }
            Reply::Updated | Reply::Punched | Reply::RetentionSet => {}
            Reply::Fetched(FetchReply::Single { value }) => {
                b.put_u8(kind::SINGLE);
                match value {
                    None => b.put_u8(0),
                    Some(v) => {
                        b.put_u8(1);
                        b.put_u64_le(v.csum);
                        b.put_u64_le(v.epoch);
                    }
                }
            }
            Reply::Fetched(FetchReply::Array { holes, csums, runs, .. }) => {
                b.put_u8(if runs.is_empty() { kind::ARRAY } else { kind::ARRAY_RUNS });
                b.put_u32_le(holes.len() as u32);
                for &(off, len) in holes {
                    b.put_u32_le(off);
                    b.put_u32_le(len);
                }
                put_u64_list(b, csums);
                if !runs.is_empty() {
                    b.put_u32_le(runs.len() as u32);
                    for r in runs {
                        b.put_u32_le(r.offset);
                        b.put_u32_le(r.len);
                        b.put_u64_le(r.epoch);
                    }
                }
            }
            Reply::Fetched(FetchReply::Epochs { runs }) => {
                b.put_u8(kind::EPOCHS);
                b.put_u32_le(runs.len() as u32);
                for r in runs {
                    b.put_u32_le(r.offset);
                    b.put_u32_le(r.len);
                    b.put_u64_le(r.epoch);
                    b.put_u8(u8::from(r.punched));
                }
            }
            Reply::Enumerated { keys, next } => {
                b.put_u32_le(keys.len() as u32);
                for k in keys {
                    put_key(b, k);
                }
                put_opt_key(b, next.as_ref());
            }
            Reply::TargetInfo(t) => {
                b.put_u64_le(t.capacity);
                b.put_u64_le(t.used);
                b.put_u64_le(t.objects);
                b.put_u64_le(t.wal_seq);
                b.put_u64_le(t.checkpoint_seq);
                b.put_u8(t.state.code());
            }
            Reply::Discarded { versions } => b.put_u64_le(*versions),
        }
    }
}

/// The longest prefix of `s` of at most `max` bytes that ends on a character boundary.
fn truncate_utf8(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s.get(..end).unwrap_or_default()
}

/// Encodes a reply frame to request `request_id` with opcode `opcode`. `map_version` is the
/// newest pool map version the engine knows. An error reply's message is cut to
/// [`ERROR_MESSAGE_MAX`] bytes; an error with status `Ok` (a caller bug) is sent as `IoError`.
/// Fetched data is carried in [`Encoded::data`] without a copy. A success reply must answer
/// `opcode` ([`Reply::opcode`]); debug builds assert it.
pub fn encode_reply(request_id: u64, opcode: Opcode, map_version: u32, target: u16, reply: &ReplyResult) -> Encoded {
    match reply {
        Ok(r) => {
            debug_assert_eq!(r.opcode(), opcode, "reply does not answer the request's opcode");
            let h = Header::reply(opcode, request_id, map_version, target, RpcStatus::Ok);
            encode_frame_with(&h, r.body_hint(), r.data(), |b| r.encode_body(b))
        }
        Err((status, msg)) => {
            let status = if status.is_ok() { RpcStatus::IoError } else { *status };
            let h = Header::reply(opcode, request_id, map_version, target, status);
            let msg = truncate_utf8(msg, ERROR_MESSAGE_MAX);
            encode_frame_with(&h, msg.len(), Bytes::new(), |b| b.put_slice(msg.as_bytes()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::{decode_frame, encode_frame, FrameLimits};
    use crate::types::ObjectId;

    pub(crate) fn samples() -> Vec<Reply> {
        let data: Bytes = (0..10_000u32).map(|i| i as u8).collect::<Vec<u8>>().into();
        vec![
            Reply::Pong { rank: 3, targets: 8, map_version: 17 },
            Reply::Updated,
            Reply::Punched,
            Reply::RetentionSet,
            Reply::Discarded { versions: 0 },
            Reply::Discarded { versions: u64::MAX },
            Reply::Fetched(FetchReply::array(data.clone(), vec![])),
            Reply::Fetched(FetchReply::array(data.slice(..8192), vec![(0, 4096), (5000, 100)])),
            Reply::Fetched(FetchReply::Single { value: None }),
            Reply::Fetched(FetchReply::Single {
                value: Some(SingleValue { data: Bytes::from_static(b"val"), csum: crc64(b"val"), epoch: 9 }),
            }),
            Reply::Fetched(FetchReply::Single { value: Some(SingleValue { data: Bytes::new(), csum: 0, epoch: 1 }) }),
            Reply::Enumerated { keys: vec![], next: None },
            Reply::Enumerated { keys: vec![ObjectId(1).to_key(), ObjectId(2).to_key()], next: Some(ObjectId(2).to_key()) },
            Reply::TargetInfo(TargetInfo {
                capacity: 1 << 40,
                used: 12345,
                state: TargetHealth::ReadOnly,
                objects: 77,
                wal_seq: 1000,
                checkpoint_seq: 900,
            }),
            Reply::TargetInfo(TargetInfo {
                capacity: 0,
                used: 0,
                state: TargetHealth::Unknown(9),
                objects: 0,
                wal_seq: 0,
                checkpoint_seq: 0,
            }),
        ]
    }

    fn via_wire(opcode: Opcode, r: &ReplyResult) -> Result<ReplyResult, ReplyError> {
        let mut b = encode_reply(11, opcode, 4, 2, r).to_bytes();
        let f = decode_frame(&mut b, &FrameLimits::default()).unwrap().unwrap();
        assert!(b.is_empty());
        assert_eq!((f.header.request_id, f.header.map_version, f.header.target), (11, 4, 2));
        Reply::decode(opcode, &f)
    }

    #[test]
    fn every_reply_round_trips() {
        let mut seen = std::collections::HashSet::new();
        for r in samples() {
            seen.insert(r.opcode());
            assert_eq!(via_wire(r.opcode(), &Ok(r.clone())), Ok(Ok(r)));
        }
        assert_eq!(seen.len(), 8);
    }

    #[test]
    fn error_replies_round_trip_for_any_opcode() {
        for op in [Opcode::Ping, Opcode::Fetch, Opcode::Unknown(200)] {
            let e: ReplyResult = Err((RpcStatus::StaleMapVersion, "map 3 < 5".into()));
            assert_eq!(via_wire(op, &e), Ok(e));
        }
        let long = "é".repeat(ERROR_MESSAGE_MAX);
        let Ok(Err((s, m))) = via_wire(Opcode::Ping, &Err((RpcStatus::Unknown(99), long))) else { panic!() };
        assert_eq!(s, RpcStatus::Unknown(99));
        assert_eq!(m.len(), ERROR_MESSAGE_MAX);
        assert_eq!(via_wire(Opcode::Ping, &Err((RpcStatus::Ok, "x".into()))), Ok(Err((RpcStatus::IoError, "x".into()))));
    }

    fn decode_raw(opcode: Opcode, status: RpcStatus, body: &[u8], data: &[u8]) -> Result<ReplyResult, ReplyError> {
        let e = encode_frame(&Header::reply(opcode, 1, 0, 0, status), body, Bytes::copy_from_slice(data));
        let f = decode_frame(&mut e.to_bytes(), &FrameLimits::default()).unwrap().unwrap();
        Reply::decode(opcode, &f)
    }

    #[test]
    fn every_truncation_of_every_body_is_an_error() {
        for r in samples() {
            let mut body = BytesMut::new();
            r.encode_body(&mut body);
            let data = r.data();
            for cut in 0..body.len() {
                let d = decode_raw(r.opcode(), RpcStatus::Ok, &body[..cut], &data);
                assert!(matches!(d, Err(ReplyError::Body { .. })), "{r:?} cut at {cut}: {d:?}");
            }
            let mut long = body.to_vec();
            long.push(1);
            assert!(matches!(decode_raw(r.opcode(), RpcStatus::Ok, &long, &data), Err(ReplyError::Body { .. })));
        }
    }

    #[test]
    fn structural_checks() {
        let data = Bytes::from(vec![0u8; 8192]);
        let arr = |holes: Vec<(u32, u32)>| Reply::Fetched(FetchReply::array(data.clone(), holes));
        for holes in [vec![(0, 0)], vec![(10, 5), (12, 1)], vec![(10, 5), (0, 1)], vec![(8000, 193)], vec![(u32::MAX, u32::MAX)]] {
            let d = via_wire(Opcode::Fetch, &Ok(arr(holes.clone())));
            assert!(matches!(d, Err(ReplyError::Body { source: BodyError::Inconsistent(_), .. })), "{holes:?}: {d:?}");
        }
        assert!(via_wire(Opcode::Fetch, &Ok(arr(vec![(0, 10), (10, 8182)]))).is_ok());
        let wrong_csums = Reply::Fetched(FetchReply::Array { data: data.clone(), holes: vec![], csums: vec![1], runs: vec![] });
        assert!(matches!(via_wire(Opcode::Fetch, &Ok(wrong_csums)), Err(ReplyError::Body { .. })));
        // An absent single value carries no data.
        assert!(matches!(decode_raw(Opcode::Fetch, RpcStatus::Ok, &[0, 0], b"x"), Err(ReplyError::Body { .. })));
        // Data on replies without any, and on error replies.
        assert!(matches!(decode_raw(Opcode::Ping, RpcStatus::Ok, &[0; 10], b"x"), Err(ReplyError::UnexpectedData { .. })));
        assert!(matches!(decode_raw(Opcode::Fetch, RpcStatus::IoError, b"m", b"x"), Err(ReplyError::UnexpectedData { .. })));
        assert_eq!(
            decode_raw(Opcode::Fetch, RpcStatus::IoError, &[b'x'; ERROR_MESSAGE_MAX + 1], b""),
            Err(ReplyError::MessageTooLong(ERROR_MESSAGE_MAX + 1))
        );
        assert_eq!(decode_raw(Opcode::Unknown(50), RpcStatus::Ok, b"", b""), Err(ReplyError::UnknownOpcode(50)));
        let too_many = Reply::Enumerated { keys: vec![Bytes::from_static(b"k"); ENUM_MAX_KEYS as usize + 1], next: None };
        assert!(matches!(via_wire(Opcode::Enumerate, &Ok(too_many)), Err(ReplyError::Body { .. })));
    }

    #[test]
    fn direction_and_opcode_are_checked() {
        let e = encode_reply(1, Opcode::Punch, 0, 0, &Ok(Reply::Punched));
        let f = decode_frame(&mut e.to_bytes(), &FrameLimits::default()).unwrap().unwrap();
        assert_eq!(Reply::decode(Opcode::Update, &f), Err(ReplyError::OpcodeMismatch { expected: Opcode::Update, got: Opcode::Punch }));
        let e = encode_reply(1, Opcode::Discard, 0, 0, &Ok(Reply::Discarded { versions: 3 }));
        let f = decode_frame(&mut e.to_bytes(), &FrameLimits::default()).unwrap().unwrap();
        assert_eq!(&f.body[..], &3u64.to_le_bytes());
        assert_eq!(Reply::decode(Opcode::Punch, &f), Err(ReplyError::OpcodeMismatch { expected: Opcode::Punch, got: Opcode::Discard }));
        let req = encode_frame(&Header::request(Opcode::Punch, 1, 0, 0), b"", Bytes::new());
        let f = decode_frame(&mut req.to_bytes(), &FrameLimits::default()).unwrap().unwrap();
        assert_eq!(Reply::decode(Opcode::Punch, &f), Err(ReplyError::NotAReply));
    }

    #[test]
    fn enum_budget_bounds_keys_and_bytes() {
        let mut b = EnumBudget::new(3);
        assert!(b.take(b"a") && b.take(b"b") && b.take(b"c"));
        assert!(!b.take(b"d"));
        let mut b = EnumBudget::new(u32::MAX);
        let key = [7u8; 255];
        let mut n = 0;
        while b.take(&key) {
            n += 1;
        }
        assert_eq!(n, ENUM_REPLY_KEY_BYTES / 256);
        // The fullest possible reply fits the default body limit.
        let keys = vec![Bytes::from(vec![1u8; 255]); n];
        let e = encode_reply(1, Opcode::Enumerate, 0, 0, &Ok(Reply::Enumerated { next: keys.last().cloned(), keys }));
        assert!(e.head.len() <= crate::frame::DEFAULT_MAX_BODY as usize);
        let mut b = EnumBudget::new(u32::MAX);
        let mut n = 0;
        while b.take(b"") {
            n += 1;
        }
        assert_eq!(n, ENUM_MAX_KEYS);
    }

    #[test]
    fn fetch_replies_verify() {
        let r = FetchReply::array(Bytes::from(vec![1u8; 5000]), vec![]);
        assert_eq!(r.verify(), Ok(()));
        let FetchReply::Array { data, holes, mut csums, runs } = r else { unreachable!() };
        csums[1] = 0;
        assert_eq!(FetchReply::Array { data, holes, csums, runs }.verify(), Err(1));
        assert_eq!(FetchReply::Single { value: None }.verify(), Ok(()));
        let v = SingleValue { data: Bytes::from_static(b"x"), csum: 1, epoch: 1 };
        assert_eq!(FetchReply::Single { value: Some(v) }.verify(), Err(0));
    }
}
