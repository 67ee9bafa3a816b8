//! Requests: what a client asks of one target, their body layouts, decoding from a [`Frame`] and
//! encoding into an [`Encoded`] frame. Layouts are sequential fields in the order listed (see
//! [`crate::body`] for the field encodings; `docs/ENGINE-RPC.md` has the tables):
//!
//! | opcode | body | data |
//! |---|---|---|
//! | Ping (1) | empty | none |
//! | Update (2) | cont u128, obj u128, epoch u64, dkey, akey, kind u8; kind 0 (single): csum u64; kind 1 (array): offset u64, csums (u32 count + u64 each) | the value |
//! | Fetch (3) | cont u128, obj u128, epoch u64, dkey, akey, kind u8; kind 0 (single); kind 1 (array): offset u64, len u32; kind 2 (array versions): offset u64, len u32, also (u8 count ≤ 3 + key each); kind 3 (epochs only): as kind 2 | none |
//! | Punch (4) | cont u128, obj u128, epoch u64, kind u8; 0 object; 1 dkey: dkey; 2 akey: dkey, akey; 3 range: dkey, akey, offset u64, len u64 | none |
//! | Enumerate (5) | cont u128, epoch u64, kind u8; 0 objects; 1 dkeys: obj u128; 2 akeys: obj u128, dkey; 3 dkeys changed since: obj u128, since u64; then anchor (optional key), max u32 | none |
//! | QueryTarget (6) | empty | none |
//! | SetRetention (7) | cont u128, aggregate_below u64, retained (u32 count + u64 each, strictly ascending) | none |
//! | Discard (8) | cont u128, obj u128, above u64, below u64 (> above), dkey (optional key, 1..=255 bytes when present) | none |
//!
//! Decoding checks structure only: field bounds, tags, non-empty keys, lengths that cannot
//! overflow, checksum counts that match the data. Whether the checksums match the data
//! ([`UpdateValue::verify`]), the map version, the target index and size limits of the engine are
//! the engine's checks.

use bytes::{BufMut, Bytes, BytesMut};

use crate::body::{key_len, put_key, put_opt_key, put_u64_list, BodyError, Reader};
use crate::frame::{encode_frame_with, Encoded, Frame, Header, Opcode};
use crate::status::RpcStatus;
use crate::types::{chunk_csums, crc64, csum_count, verify_chunk_csums, ContainerId, Epoch, ObjectId};

/// Most keys one Enumerate may ask for.
pub const ENUM_MAX_KEYS: u32 = 1024;
/// Most snapshot epochs in one SetRetention.
pub const RETAINED_MAX: usize = 1024;

/// The value of an update.
#[derive(Clone, PartialEq, Eq, Debug)]
pub enum UpdateValue {
    /// An extent of a byte array.
    Array {
        /// Byte offset in the array.
        offset: u64,
        /// The bytes (not empty); sent as the frame's data.
        data: Bytes,
        /// [`crc64`] of each 4 KiB chunk of `data` (the last may be short).
        csums: Vec<u64>,
    },
    /// A single value, replaced as a whole.
    Single {
        /// The value (may be empty); sent as the frame's data.
        data: Bytes,
        /// [`crc64`] of `data`.
        csum: u64,
    },
}

impl UpdateValue {
    /// An array extent with its checksums computed.
    pub fn array(offset: u64, data: Bytes) -> UpdateValue {
        let csums = chunk_csums(&data);
        UpdateValue::Array { offset, data, csums }
    }

    /// A single value with its checksum computed.
    pub fn single(data: Bytes) -> UpdateValue {
        let csum = crc64(&data);
        UpdateValue::Single { data, csum }
    }

    /// The payload.
    pub fn data(&self) -> &Bytes {
        match self {
            UpdateValue::Array { data, .. } | UpdateValue::Single { data, .. } => data,
        }
    }

    /// Checks the payload against its checksums; on mismatch returns the first bad chunk index
    /// (0 for a single value). The engine answers a mismatch with `ChecksumMismatch`.
    pub fn verify(&self) -> Result<(), usize> {
        match self {
            UpdateValue::Array { data, csums, .. } => verify_chunk_csums(data, csums),
            UpdateValue::Single { data, csum } => {
                if crc64(data) == *csum {
                    Ok(())
                } else {
                    Err(0)
                }
            }
        }
    }
}

/// Update (opcode 2): write a value at an epoch.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Update {
    pub cont: ContainerId,
    pub obj: ObjectId,
    pub epoch: Epoch,
    pub dkey: Bytes,
    pub akey: Bytes,
    pub value: UpdateValue,
}

/// Most extra akeys of a [`FetchValue::Versions`].
pub const FETCH_ALSO_MAX: usize = 3;

/// What a fetch reads.
#[derive(Clone, PartialEq, Eq, Debug)]
pub enum FetchValue {
    /// `len` bytes of the array at `offset` (len ≥ 1).
    Array { offset: u64, len: u32 },
    /// `len` bytes at `offset` of the newest version, byte by byte, across the fetch's akey and
    /// the array akeys in `also` (at most [`FETCH_ALSO_MAX`], distinct from it and each other), as
    /// if they were one akey; the reply lists the epoch of every run of data
    /// ([`crate::reply::DataRun`]).
    Versions { offset: u64, len: u32, also: Vec<Bytes> },
    /// What a [`FetchValue::Versions`] fetch would resolve, without the data: the epoch of every
    /// run, range punches included ([`crate::reply::EpochRun`]).
    Epochs { offset: u64, len: u32, also: Vec<Bytes> },
    /// The single value.
    Single,
}

/// Fetch (opcode 3): read a value as of an epoch.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Fetch {
    pub cont: ContainerId,
    pub obj: ObjectId,
    pub epoch: Epoch,
    pub dkey: Bytes,
    pub akey: Bytes,
    pub what: FetchValue,
}

/// What a punch removes.
#[derive(Clone, PartialEq, Eq, Debug)]
pub enum PunchTarget {
    /// The whole object.
    Object,
    /// One dkey and everything under it.
    Dkey(Bytes),
    /// One akey.
    Akey { dkey: Bytes, akey: Bytes },
    /// A byte range of an array akey (len ≥ 1).
    Range { dkey: Bytes, akey: Bytes, offset: u64, len: u64 },
}

/// Punch (opcode 4): remove at an epoch (older epochs still see the data until aggregated).
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Punch {
    pub cont: ContainerId,
    pub obj: ObjectId,
    pub epoch: Epoch,
    pub what: PunchTarget,
}

/// What an enumeration lists.
#[derive(Clone, PartialEq, Eq, Debug)]
pub enum EnumTarget {
    /// Objects of the container (keys are 16-byte big-endian ids, [`ObjectId::to_key`]).
    Objects,
    /// Dkeys of an object.
    Dkeys(ObjectId),
    /// Akeys under a dkey.
    Akeys(ObjectId, Bytes),
    /// Dkeys of an object changed after an epoch: every dkey holding any version (update, or
    /// punch of the dkey, an akey or a range) with an epoch in `(since, epoch]`, visible or not,
    /// and every dkey of the object with a version at or below `epoch` when the object itself
    /// has a punch in `(since, epoch]`. Reintegration copies only these.
    DkeysSince(ObjectId, Epoch),
}

/// Enumerate (opcode 5): list keys visible at an epoch (or, for [`EnumTarget::DkeysSince`],
/// changed up to it), in key order, after `anchor`.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Enumerate {
    pub cont: ContainerId,
    pub epoch: Epoch,
    pub what: EnumTarget,
    /// Resume strictly after this key (`None`: from the start). For objects, 16 bytes.
    pub anchor: Option<Bytes>,
    /// Most keys to return, 1..=[`ENUM_MAX_KEYS`].
    pub max: u32,
}

/// SetRetention (opcode 7): which history of a container must stay readable.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct SetRetention {
    pub cont: ContainerId,
    /// Versions at or below this epoch that no retained view needs may be aggregated.
    pub aggregate_below: Epoch,
    /// Snapshot epochs whose views are kept, strictly ascending, at most [`RETAINED_MAX`].
    pub retained: Vec<Epoch>,
}

/// Discard (opcode 8): *delete* (not punch) every version of an object, or of one dkey of it,
/// whose epoch is strictly greater than `above` and strictly less than `below`: array extents,
/// single values, and punches of every level (object punches only when no dkey is given; dkey,
/// akey and range punches under the scope). Older versions become visible again as if the
/// deleted ones had never been written. `above = 0, below = u64::MAX` deletes everything in
/// scope. `below` must exceed `above`. Durable when acknowledged, like an update.
///
/// A shard's new home (or a target that returns after an outage, above the epoch it failed at)
/// discards its stale versions before rebuild refills it (a punch would hide the older epochs
/// rebuild rewrites) — only below the epoch the pool map that moved the shard took effect at, so
/// that writes planned with that map, which may reach it first, stay; garbage collection
/// discards a dkey a target no longer holds.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Discard {
    pub cont: ContainerId,
    pub obj: ObjectId,
    /// Versions with an epoch strictly greater than this are deleted (0: all of them)...
    pub above: Epoch,
    /// ...and strictly less than this (`u64::MAX`: no upper bound).
    pub below: Epoch,
    /// Only this dkey (1..=255 bytes) and everything under it; `None`: the whole object.
    pub dkey: Option<Bytes>,
}

/// A request to one target.
#[derive(Clone, PartialEq, Eq, Debug)]
pub enum Request {
    Ping,
    Update(Update),
    Fetch(Fetch),
    Punch(Punch),
    Enumerate(Enumerate),
    QueryTarget,
    SetRetention(SetRetention),
    Discard(Discard),
}

/// A request the engine cannot execute. The connection survives: the engine answers with an
/// error reply carrying [`RequestError::status`] and the message.
#[derive(Clone, PartialEq, Eq, Debug, thiserror::Error)]
pub enum RequestError {
    /// The opcode is not known.
    #[error("unknown opcode {0}")]
    UnknownOpcode(u8),
    /// The frame has the reply flag or a status set.
    #[error("frame is not a request (reply flag or status set)")]
    NotARequest,
    /// The body does not decode.
    #[error("malformed {opcode} request: {source}")]
    Body {
        /// The request's opcode.
        opcode: Opcode,
        /// What is wrong.
        source: BodyError,
    },
    /// Data came with a request that takes none.
    #[error("{opcode} request carries {len} bytes of data but takes none")]
    UnexpectedData {
        /// The request's opcode.
        opcode: Opcode,
        /// Data bytes received.
        len: usize,
    },
}

impl RequestError {
    /// The status of the error reply: `UnknownOpcode` for an unknown opcode, else
    /// `InvalidRequest`.
    pub fn status(&self) -> RpcStatus {
        match self {
            RequestError::UnknownOpcode(_) => RpcStatus::UnknownOpcode,
            _ => RpcStatus::InvalidRequest,
        }
    }

    /// Status and message of the error reply.
    pub fn to_error_reply(&self) -> (RpcStatus, String) {
        (self.status(), self.to_string())
    }
}

mod kind {
    pub const SINGLE: u8 = 0;
    pub const ARRAY: u8 = 1;
    pub const ARRAY_VERSIONS: u8 = 2;
    pub const ARRAY_EPOCHS: u8 = 3;
    pub const PUNCH_OBJECT: u8 = 0;
    pub const PUNCH_DKEY: u8 = 1;
    pub const PUNCH_AKEY: u8 = 2;
    pub const PUNCH_RANGE: u8 = 3;
    pub const ENUM_OBJECTS: u8 = 0;
    pub const ENUM_DKEYS: u8 = 1;
    pub const ENUM_AKEYS: u8 = 2;
    pub const ENUM_DKEYS_SINCE: u8 = 3;
}

fn bad(field: &'static str, value: impl Into<u64>) -> BodyError {
    BodyError::BadValue { field, value: value.into() }
}

/// `offset + len` must not overflow a u64 byte address.
fn check_range(offset: u64, len: u64) -> Result<(), BodyError> {
    offset.checked_add(len).map(|_| ()).ok_or(BodyError::Inconsistent("offset + len overflows"))
}

fn decode_update(r: &mut Reader<'_>, data: &Bytes) -> Result<Update, BodyError> {
    let cont = ContainerId(r.u128("cont")?);
    let obj = ObjectId(r.u128("obj")?);
    let epoch = r.u64("epoch")?;
    let dkey = r.key("dkey")?;
    let akey = r.key("akey")?;
    let value = match r.u8("kind")? {
        kind::SINGLE => UpdateValue::Single { data: data.clone(), csum: r.u64("csum")? },
        kind::ARRAY => {
            let offset = r.u64("offset")?;
            let csums = r.u64_list("csums")?;
            if data.is_empty() {
                return Err(BodyError::Inconsistent("array update without data"));
            }
            if csums.len() != csum_count(data.len()) {
                return Err(BodyError::Inconsistent("checksum count does not match the data length"));
            }
            check_range(offset, data.len() as u64)?;
            UpdateValue::Array { offset, data: data.clone(), csums }
        }
        k => return Err(bad("kind", k)),
    };
    Ok(Update { cont, obj, epoch, dkey, akey, value })
}

fn decode_fetch(r: &mut Reader<'_>) -> Result<Fetch, BodyError> {
    let cont = ContainerId(r.u128("cont")?);
    let obj = ObjectId(r.u128("obj")?);
    let epoch = r.u64("epoch")?;
    let dkey = r.key("dkey")?;
    let akey = r.key("akey")?;
    let what = match r.u8("kind")? {
        kind::SINGLE => FetchValue::Single,
        kind::ARRAY => {
            let offset = r.u64("offset")?;
            let len = r.u32("len")?;
            if len == 0 {
                return Err(bad("len", 0u8));
            }
            check_range(offset, len.into())?;
            FetchValue::Array { offset, len }
        }
        k @ (kind::ARRAY_VERSIONS | kind::ARRAY_EPOCHS) => {
            let offset = r.u64("offset")?;
            let len = r.u32("len")?;
            if len == 0 {
                return Err(bad("len", 0u8));
            }
            check_range(offset, len.into())?;
            let n = r.u8("also")?;
            if usize::from(n) > FETCH_ALSO_MAX {
                return Err(bad("also", n));
            }
            let mut also: Vec<Bytes> = Vec::with_capacity(n.into());
            for _ in 0..n {
                let k = r.key("also")?;
                if k == akey || also.contains(&k) {
                    return Err(BodyError::Inconsistent("the akeys of a versions fetch must be distinct"));
                }
                also.push(k);
            }
            if k == kind::ARRAY_EPOCHS {
                FetchValue::Epochs { offset, len, also }
            } else {
                FetchValue::Versions { offset, len, also }
            }
        }
        k => return Err(bad("kind", k)),
    };
    Ok(Fetch { cont, obj, epoch, dkey, akey, what })
}

fn decode_punch(r: &mut Reader<'_>) -> Result<Punch, BodyError> {
    let cont = ContainerId(r.u128("cont")?);
    let obj = ObjectId(r.u128("obj")?);
    let epoch = r.u64("epoch")?;
    let what = match r.u8("kind")? {
        kind::PUNCH_OBJECT => PunchTarget::Object,
        kind::PUNCH_DKEY => PunchTarget::Dkey(r.key("dkey")?),
        kind::PUNCH_AKEY => PunchTarget::Akey { dkey: r.key("dkey")?, akey: r.key("akey")? },
        kind::PUNCH_RANGE => {
            let (dkey, akey) = (r.key("dkey")?, r.key("akey")?);
            let (offset, len) = (r.u64("offset")?, r.u64("len")?);
            if len == 0 {
                return Err(bad("len", 0u8));
            }
            check_range(offset, len)?;
            PunchTarget::Range { dkey, akey, offset, len }
        }
        k => return Err(bad("kind", k)),
    };
    Ok(Punch { cont, obj, epoch, what })
}

fn decode_enumerate(r: &mut Reader<'_>) -> Result<Enumerate, BodyError> {
    let cont = ContainerId(r.u128("cont")?);
    let epoch = r.u64("epoch")?;
    let what = match r.u8("kind")? {
        kind::ENUM_OBJECTS => EnumTarget::Objects,
        kind::ENUM_DKEYS => EnumTarget::Dkeys(ObjectId(r.u128("obj")?)),
        kind::ENUM_AKEYS => EnumTarget::Akeys(ObjectId(r.u128("obj")?), r.key("dkey")?),
        kind::ENUM_DKEYS_SINCE => EnumTarget::DkeysSince(ObjectId(r.u128("obj")?), r.u64("since")?),
        k => return Err(bad("kind", k)),
    };
    let anchor = r.opt_key("anchor")?;
    if let (EnumTarget::Objects, Some(a)) = (&what, &anchor) {
        if a.len() != ObjectId::KEY_LEN {
            return Err(bad("anchor length", a.len() as u64));
        }
    }
    let max = r.u32("max")?;
    if max == 0 || max > ENUM_MAX_KEYS {
        return Err(bad("max", max));
    }
    Ok(Enumerate { cont, epoch, what, anchor, max })
}

fn decode_set_retention(r: &mut Reader<'_>) -> Result<SetRetention, BodyError> {
    let cont = ContainerId(r.u128("cont")?);
    let aggregate_below = r.u64("aggregate_below")?;
    let retained = r.u64_list("retained")?;
    if retained.len() > RETAINED_MAX {
        return Err(bad("retained count", retained.len() as u64));
    }
    if retained.windows(2).any(|w| matches!(w, [a, b] if a >= b)) {
        return Err(BodyError::Inconsistent("retained epochs are not strictly ascending"));
    }
    Ok(SetRetention { cont, aggregate_below, retained })
}

fn decode_discard(r: &mut Reader<'_>) -> Result<Discard, BodyError> {
    let cont = ContainerId(r.u128("cont")?);
    let obj = ObjectId(r.u128("obj")?);
    let above = r.u64("above")?;
    let below = r.u64("below")?;
    if below <= above {
        return Err(BodyError::Inconsistent("a discard's below epoch must exceed its above epoch"));
    }
    let dkey = r.opt_key("dkey")?;
    if dkey.as_ref().is_some_and(Bytes::is_empty) {
        return Err(bad("dkey", 0u8));
    }
    Ok(Discard { cont, obj, above, below, dkey })
}

impl Request {
    /// The opcode.
    pub fn opcode(&self) -> Opcode {
        match self {
            Request::Ping => Opcode::Ping,
            Request::Update(_) => Opcode::Update,
            Request::Fetch(_) => Opcode::Fetch,
            Request::Punch(_) => Opcode::Punch,
            Request::Enumerate(_) => Opcode::Enumerate,
            Request::QueryTarget => Opcode::QueryTarget,
            Request::SetRetention(_) => Opcode::SetRetention,
            Request::Discard(_) => Opcode::Discard,
        }
    }

    /// Decodes the request in `frame` (whose header has already been validated).
    pub fn decode(frame: &Frame) -> Result<Request, RequestError> {
        let h = &frame.header;
        if h.is_reply() || !h.status.is_ok() {
            return Err(RequestError::NotARequest);
        }
        let opcode = h.opcode;
        if let Opcode::Unknown(c) = opcode {
            return Err(RequestError::UnknownOpcode(c));
        }
        if opcode != Opcode::Update && !frame.data.is_empty() {
            return Err(RequestError::UnexpectedData { opcode, len: frame.data.len() });
        }
        let mut r = Reader::new(&frame.body);
        let body = |source| RequestError::Body { opcode, source };
        let req = match opcode {
            Opcode::Ping => Request::Ping,
            Opcode::QueryTarget => Request::QueryTarget,
            Opcode::Update => Request::Update(decode_update(&mut r, &frame.data).map_err(body)?),
            Opcode::Fetch => Request::Fetch(decode_fetch(&mut r).map_err(body)?),
            Opcode::Punch => Request::Punch(decode_punch(&mut r).map_err(body)?),
            Opcode::Enumerate => Request::Enumerate(decode_enumerate(&mut r).map_err(body)?),
            Opcode::SetRetention => Request::SetRetention(decode_set_retention(&mut r).map_err(body)?),
            Opcode::Discard => Request::Discard(decode_discard(&mut r).map_err(body)?),
            Opcode::Unknown(c) => return Err(RequestError::UnknownOpcode(c)),
        };
        r.finish().map_err(body)?;
        Ok(req)
    }

    /// The bulk data sent after the body (only an update has any).
    pub fn data(&self) -> Bytes {
        match self {
            Request::Update(u) => u.value.data().clone(),
            _ => Bytes::new(),
        }
    }

    /// Upper bound of the body's encoded size (for buffer sizing).
    fn body_hint(&self) -> usize {
        match self {
            Request::Update(u) => 64 + key_len(&u.dkey) + key_len(&u.akey) + 8 * csum_count(u.value.data().len()),
            Request::SetRetention(s) => 32 + 8 * s.retained.len(),
            Request::Fetch(f) => match &f.what {
                FetchValue::Versions { also, .. } | FetchValue::Epochs { also, .. } => 600 + also.iter().map(|k| key_len(k)).sum::<usize>(),
                _ => 600,
            },
            _ => 600,
        }
    }

    /// Appends the body to `b`.
    pub fn encode_body(&self, b: &mut BytesMut) {
        match self {
            Request::Ping | Request::QueryTarget => {}
            Request::Update(u) => {
                b.put_u128_le(u.cont.0);
                b.put_u128_le(u.obj.0);
                b.put_u64_le(u.epoch);
                put_key(b, &u.dkey);
                put_key(b, &u.akey);
                match &u.value {
                    UpdateValue::Single { csum, .. } => {
                        b.put_u8(kind::SINGLE);
                        b.put_u64_le(*csum);
                    }
                    UpdateValue::Array { offset, csums, .. } => {
                        b.put_u8(kind::ARRAY);
                        b.put_u64_le(*offset);
                        put_u64_list(b, csums);
                    }
                }
            }
            Request::Fetch(f) => {
                b.put_u128_le(f.cont.0);
                b.put_u128_le(f.obj.0);
                b.put_u64_le(f.epoch);
                put_key(b, &f.dkey);
                put_key(b, &f.akey);
                match &f.what {
                    FetchValue::Single => b.put_u8(kind::SINGLE),
                    FetchValue::Array { offset, len } => {
                        b.put_u8(kind::ARRAY);
                        b.put_u64_le(*offset);
                        b.put_u32_le(*len);
                    }
                    FetchValue::Versions { offset, len, also } | FetchValue::Epochs { offset, len, also } => {
                        b.put_u8(if matches!(f.what, FetchValue::Epochs { .. }) { kind::ARRAY_EPOCHS } else { kind::ARRAY_VERSIONS });
                        b.put_u64_le(*offset);
                        b.put_u32_le(*len);
                        b.put_u8(also.len() as u8);
                        for k in also {
                            put_key(b, k);
                        }
                    }
                }
            }
            Request::Punch(p) => {
                b.put_u128_le(p.cont.0);
                b.put_u128_le(p.obj.0);
                b.put_u64_le(p.epoch);
                match &p.what {
                    PunchTarget::Object => b.put_u8(kind::PUNCH_OBJECT),
                    PunchTarget::Dkey(d) => {
                        b.put_u8(kind::PUNCH_DKEY);
                        put_key(b, d);
                    }
                    PunchTarget::Akey { dkey, akey } => {
                        b.put_u8(kind::PUNCH_AKEY);
                        put_key(b, dkey);
                        put_key(b, akey);
                    }
                    PunchTarget::Range { dkey, akey, offset, len } => {
                        b.put_u8(kind::PUNCH_RANGE);
                        put_key(b, dkey);
                        put_key(b, akey);
                        b.put_u64_le(*offset);
                        b.put_u64_le(*len);
                    }
                }
            }
            Request::Enumerate(e) => {
                b.put_u128_le(e.cont.0);
                b.put_u64_le(e.epoch);
                match &e.what {
                    EnumTarget::Objects => b.put_u8(kind::ENUM_OBJECTS),
                    EnumTarget::Dkeys(o) => {
                        b.put_u8(kind::ENUM_DKEYS);
                        b.put_u128_le(o.0);
                    }
                    EnumTarget::Akeys(o, d) => {
                        b.put_u8(kind::ENUM_AKEYS);
                        b.put_u128_le(o.0);
                        put_key(b, d);
                    }
                    EnumTarget::DkeysSince(o, since) => {
                        b.put_u8(kind::ENUM_DKEYS_SINCE);
                        b.put_u128_le(o.0);
                        b.put_u64_le(*since);
                    }
                }
                put_opt_key(b, e.anchor.as_ref());
                b.put_u32_le(e.max);
            }
            Request::SetRetention(s) => {
                b.put_u128_le(s.cont.0);
                b.put_u64_le(s.aggregate_below);
                put_u64_list(b, &s.retained);
            }
            Request::Discard(d) => {
                b.put_u128_le(d.cont.0);
                b.put_u128_le(d.obj.0);
                b.put_u64_le(d.above);
                b.put_u64_le(d.below);
                put_opt_key(b, d.dkey.as_ref());
            }
        }
    }
}

/// Encodes a request frame. The update payload is carried in [`Encoded::data`] without a copy.
pub fn encode_request(request_id: u64, map_version: u32, target: u16, req: &Request) -> Encoded {
    encode_request_in(0, request_id, map_version, target, req)
}

/// Encodes a request frame whose `map_version` is the map version of pool `pool`.
pub fn encode_request_in(pool: u32, request_id: u64, map_version: u32, target: u16, req: &Request) -> Encoded {
    encode_request_flagged(pool, request_id, map_version, target, false, req)
}

/// Like [`encode_request_in`], marked as background work ([`crate::frame::flags::BACKGROUND`])
/// when `background` is set.
pub fn encode_request_flagged(pool: u32, request_id: u64, map_version: u32, target: u16, background: bool, req: &Request) -> Encoded {
    let h = Header::request(req.opcode(), request_id, map_version, target).in_pool(pool).background(background);
    encode_frame_with(&h, req.body_hint(), req.data(), |b| req.encode_body(b))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::{decode_frame, encode_frame, FrameLimits, HEADER_LEN};

    pub(crate) fn samples() -> Vec<Request> {
        let (cont, obj) = (ContainerId(0xc0ffee), ObjectId(u128::MAX - 7));
        let (dkey, akey) = (Bytes::from_static(b"dkey-1"), Bytes::from_static(b"a"));
        let big: Bytes = (0..9000u32).map(|i| (i * 7) as u8).collect::<Vec<u8>>().into();
        vec![
            Request::Ping,
            Request::QueryTarget,
            Request::Update(Update {
                cont,
                obj,
                epoch: 42,
                dkey: dkey.clone(),
                akey: akey.clone(),
                value: UpdateValue::array(1 << 40, big.clone()),
            }),
            Request::Update(Update {
                cont,
                obj,
                epoch: 43,
                dkey: dkey.clone(),
                akey: akey.clone(),
                value: UpdateValue::single(Bytes::from_static(b"v")),
            }),
            Request::Update(Update {
                cont,
                obj,
                epoch: 44,
                dkey: dkey.clone(),
                akey: akey.clone(),
                value: UpdateValue::single(Bytes::new()),
            }),
            Request::Fetch(Fetch {
                cont,
                obj,
                epoch: u64::MAX,
                dkey: dkey.clone(),
                akey: akey.clone(),
                what: FetchValue::Array { offset: 4096, len: 8192 },
            }),
            Request::Fetch(Fetch { cont, obj, epoch: 1, dkey: dkey.clone(), akey: akey.clone(), what: FetchValue::Single }),
            Request::Punch(Punch { cont, obj, epoch: 5, what: PunchTarget::Object }),
            Request::Punch(Punch { cont, obj, epoch: 5, what: PunchTarget::Dkey(dkey.clone()) }),
            Request::Punch(Punch { cont, obj, epoch: 5, what: PunchTarget::Akey { dkey: dkey.clone(), akey: akey.clone() } }),
            Request::Punch(Punch {
                cont,
                obj,
                epoch: 5,
                what: PunchTarget::Range { dkey: dkey.clone(), akey: akey.clone(), offset: 10, len: 20 },
            }),
            Request::Enumerate(Enumerate { cont, epoch: 9, what: EnumTarget::Objects, anchor: None, max: 100 }),
            Request::Enumerate(Enumerate { cont, epoch: 9, what: EnumTarget::Objects, anchor: Some(obj.to_key()), max: 1 }),
            Request::Enumerate(Enumerate { cont, epoch: 9, what: EnumTarget::Dkeys(obj), anchor: Some(dkey.clone()), max: ENUM_MAX_KEYS }),
            Request::Enumerate(Enumerate { cont, epoch: 9, what: EnumTarget::Akeys(obj, dkey.clone()), anchor: None, max: 3 }),
            Request::Enumerate(Enumerate { cont, epoch: 9, what: EnumTarget::DkeysSince(obj, 4), anchor: None, max: 10 }),
            Request::Enumerate(Enumerate {
                cont,
                epoch: u64::MAX,
                what: EnumTarget::DkeysSince(obj, u64::MAX - 1),
                anchor: Some(Bytes::new()),
                max: 1,
            }),
            Request::SetRetention(SetRetention { cont, aggregate_below: 100, retained: vec![] }),
            Request::SetRetention(SetRetention { cont, aggregate_below: 100, retained: vec![3, 50, 99] }),
            Request::Discard(Discard { cont, obj, above: 0, below: u64::MAX, dkey: None }),
            Request::Discard(Discard { cont, obj, above: 77, below: 78, dkey: Some(dkey.clone()) }),
        ]
    }

    fn via_wire(req: &Request) -> Result<Request, RequestError> {
        let mut b = encode_request(7, 3, 1, req).to_bytes();
        let f = decode_frame(&mut b, &FrameLimits::default()).unwrap().unwrap();
        assert!(b.is_empty());
        assert_eq!((f.header.request_id, f.header.map_version, f.header.target), (7, 3, 1));
        Request::decode(&f)
    }

    #[test]
    fn every_opcode_round_trips() {
        let mut seen = std::collections::HashSet::new();
        for req in samples() {
            assert_eq!(via_wire(&req).as_ref(), Ok(&req));
            seen.insert(req.opcode());
        }
        assert_eq!(seen.len(), 8);
    }

    #[test]
    fn the_background_flag_travels_with_the_request() {
        for background in [false, true] {
            let req = &samples()[2];
            let mut b = encode_request_flagged(5, 7, 3, 1, background, req).to_bytes();
            let f = decode_frame(&mut b, &FrameLimits::default()).unwrap().unwrap();
            assert_eq!((f.header.is_background(), f.header.is_reply(), f.header.pool), (background, false, 5));
            assert_eq!(Request::decode(&f).as_ref(), Ok(req));
        }
        assert!(!decode_frame(&mut encode_request(1, 0, 0, &Request::Ping).to_bytes(), &FrameLimits::default())
            .unwrap()
            .unwrap()
            .header
            .is_background());
    }

    #[test]
    fn update_payload_is_not_copied_into_the_head() {
        let req = &samples()[2];
        let e = encode_request(1, 0, 0, req);
        assert_eq!(e.data.len(), 9000);
        assert_eq!(e.data.as_ptr(), req.data().as_ptr());
        assert!(e.head.len() < HEADER_LEN + 200);
    }

    /// Decodes `body` as the body of an `opcode` request with `data`.
    fn decode_raw(opcode: Opcode, body: &[u8], data: &[u8]) -> Result<Request, RequestError> {
        let e = encode_frame(&Header::request(opcode, 1, 0, 0), body, Bytes::copy_from_slice(data));
        let f = decode_frame(&mut e.to_bytes(), &FrameLimits::default()).unwrap().unwrap();
        Request::decode(&f)
    }

    #[test]
    fn every_truncation_of_every_body_is_an_error() {
        for req in samples() {
            let mut body = BytesMut::new();
            req.encode_body(&mut body);
            let data = req.data();
            for cut in 0..body.len() {
                let r = decode_raw(req.opcode(), &body[..cut], &data);
                assert!(matches!(r, Err(RequestError::Body { .. })), "{:?} cut at {cut}: {r:?}", req.opcode());
            }
            // And one byte too many.
            let mut long = body.to_vec();
            long.push(0);
            assert!(matches!(decode_raw(req.opcode(), &long, &data), Err(RequestError::Body { source: BodyError::Trailing(1), .. })));
        }
    }

    #[test]
    fn structural_checks() {
        let err = |req: &Request| via_wire(req).unwrap_err();
        let (cont, obj) = (ContainerId(1), ObjectId(2));
        let k = Bytes::from_static(b"k");
        let upd = |value| Request::Update(Update { cont, obj, epoch: 1, dkey: k.clone(), akey: k.clone(), value });
        // Wrong number of checksums, empty array data, overflowing ranges.
        let e = err(&upd(UpdateValue::Array { offset: 0, data: Bytes::from(vec![1; 4097]), csums: vec![1] }));
        assert!(matches!(e, RequestError::Body { source: BodyError::Inconsistent(_), .. }), "{e}");
        assert!(matches!(err(&upd(UpdateValue::Array { offset: 0, data: Bytes::new(), csums: vec![] })), RequestError::Body { .. }));
        assert!(matches!(err(&upd(UpdateValue::array(u64::MAX, Bytes::from_static(b"xy")))), RequestError::Body { .. }));
        // Empty keys.
        let e = err(&Request::Update(Update {
            cont,
            obj,
            epoch: 1,
            dkey: Bytes::new(),
            akey: k.clone(),
            value: UpdateValue::single(k.clone()),
        }));
        assert_eq!(e, RequestError::Body { opcode: Opcode::Update, source: BodyError::BadValue { field: "dkey", value: 0 } });
        // Zero-length fetch and punch ranges.
        let fetch = |what| Request::Fetch(Fetch { cont, obj, epoch: 1, dkey: k.clone(), akey: k.clone(), what });
        assert!(matches!(err(&fetch(FetchValue::Array { offset: 0, len: 0 })), RequestError::Body { .. }));
        assert!(matches!(err(&fetch(FetchValue::Array { offset: u64::MAX, len: 1 })), RequestError::Body { .. }));
        let punch = |what| Request::Punch(Punch { cont, obj, epoch: 1, what });
        assert!(matches!(
            err(&punch(PunchTarget::Range { dkey: k.clone(), akey: k.clone(), offset: 0, len: 0 })),
            RequestError::Body { .. }
        ));
        // Enumeration bounds and object anchors.
        let en = |what, anchor, max| Request::Enumerate(Enumerate { cont, epoch: 1, what, anchor, max });
        assert!(matches!(err(&en(EnumTarget::Objects, None, 0)), RequestError::Body { .. }));
        assert!(matches!(err(&en(EnumTarget::Objects, None, ENUM_MAX_KEYS + 1)), RequestError::Body { .. }));
        assert!(matches!(err(&en(EnumTarget::Objects, Some(k.clone()), 1)), RequestError::Body { .. }));
        assert!(via_wire(&en(EnumTarget::Dkeys(obj), Some(k.clone()), 1)).is_ok());
        // Retained epochs: ascending and bounded.
        let ret = |retained| Request::SetRetention(SetRetention { cont, aggregate_below: 1, retained });
        assert!(matches!(err(&ret(vec![5, 5])), RequestError::Body { .. }));
        assert!(matches!(err(&ret(vec![6, 5])), RequestError::Body { .. }));
        assert!(matches!(err(&ret((0..=RETAINED_MAX as u64).collect())), RequestError::Body { .. }));
        assert!(via_wire(&ret((0..RETAINED_MAX as u64).collect())).is_ok());
        // A discard's dkey, when present, is not empty.
        let discard = |dkey| Request::Discard(Discard { cont, obj, above: 3, below: u64::MAX, dkey });
        assert_eq!(
            err(&discard(Some(Bytes::new()))),
            RequestError::Body { opcode: Opcode::Discard, source: BodyError::BadValue { field: "dkey", value: 0 } }
        );
        assert!(via_wire(&discard(Some(Bytes::from(vec![0xff; 255])))).is_ok());
        // ... and its bounds leave room for a version.
        for (above, below) in [(3, 3), (3, 2), (u64::MAX, u64::MAX)] {
            assert!(matches!(
                err(&Request::Discard(Discard { cont, obj, above, below, dkey: None })),
                RequestError::Body { source: BodyError::Inconsistent(_), .. }
            ));
        }
    }

    #[test]
    fn tags_data_opcodes_and_direction() {
        let mut body = BytesMut::new();
        Request::Punch(Punch { cont: ContainerId(1), obj: ObjectId(1), epoch: 1, what: PunchTarget::Object }).encode_body(&mut body);
        let n = body.len();
        body[n - 1] = 9;
        assert_eq!(
            decode_raw(Opcode::Punch, &body, b""),
            Err(RequestError::Body { opcode: Opcode::Punch, source: BodyError::BadValue { field: "kind", value: 9 } })
        );
        assert_eq!(decode_raw(Opcode::Ping, b"", b"x"), Err(RequestError::UnexpectedData { opcode: Opcode::Ping, len: 1 }));
        let e = decode_raw(Opcode::Unknown(77), b"whatever", b"");
        assert_eq!(e, Err(RequestError::UnknownOpcode(77)));
        assert_eq!(e.unwrap_err().to_error_reply().0, RpcStatus::UnknownOpcode);
        assert_eq!(decode_raw(Opcode::Ping, b"x", b"").unwrap_err().status(), RpcStatus::InvalidRequest);
        // Discard: a present flag other than 0/1, and no data allowed.
        let mut body = BytesMut::new();
        Request::Discard(Discard { cont: ContainerId(1), obj: ObjectId(1), above: 1, below: u64::MAX, dkey: None }).encode_body(&mut body);
        assert_eq!(body.len(), 16 + 16 + 8 + 8 + 1);
        assert_eq!(decode_raw(Opcode::Discard, &body, b"x"), Err(RequestError::UnexpectedData { opcode: Opcode::Discard, len: 1 }));
        let n = body.len();
        body[n - 1] = 2;
        assert_eq!(
            decode_raw(Opcode::Discard, &body, b""),
            Err(RequestError::Body { opcode: Opcode::Discard, source: BodyError::BadValue { field: "dkey", value: 2 } })
        );
        // Enumerate kind 3 carries obj and since; an unknown kind is refused.
        let mut body = BytesMut::new();
        let e = Enumerate { cont: ContainerId(1), epoch: 9, what: EnumTarget::DkeysSince(ObjectId(2), 5), anchor: None, max: 1 };
        Request::Enumerate(e).encode_body(&mut body);
        assert_eq!(body.len(), 16 + 8 + 1 + 16 + 8 + 1 + 4);
        assert_eq!(body[24], 3);
        assert_eq!(&body[41..49], &5u64.to_le_bytes());
        body[24] = 4;
        assert_eq!(
            decode_raw(Opcode::Enumerate, &body, b""),
            Err(RequestError::Body { opcode: Opcode::Enumerate, source: BodyError::BadValue { field: "kind", value: 4 } })
        );
        let reply = encode_frame(&Header::reply(Opcode::Ping, 1, 0, 0, RpcStatus::Ok), b"", Bytes::new());
        let f = decode_frame(&mut reply.to_bytes(), &FrameLimits::default()).unwrap().unwrap();
        assert_eq!(Request::decode(&f), Err(RequestError::NotARequest));
    }

    #[test]
    fn update_values_verify_their_checksums() {
        let v = UpdateValue::array(0, Bytes::from(vec![3u8; 10_000]));
        assert_eq!(v.verify(), Ok(()));
        let UpdateValue::Array { offset, data, mut csums } = v else { unreachable!() };
        csums[2] ^= 1;
        assert_eq!(UpdateValue::Array { offset, data, csums }.verify(), Err(2));
        let s = UpdateValue::single(Bytes::from_static(b"abc"));
        assert_eq!(s.verify(), Ok(()));
        assert_eq!(UpdateValue::Single { data: Bytes::from_static(b"abd"), csum: crc64(b"abc") }.verify(), Err(0));
    }
}
