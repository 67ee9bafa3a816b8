//! Wire format of the Tessera engine RPC: how clients talk to the engine's targets.
//!
//! This crate owns bytes and nothing else. It performs no I/O and keeps no connection state;
//! every decoder works on a buffer, bounds every peer-controlled length before allocating, and
//! returns an error instead of panicking. `docs/ENGINE-RPC.md` specifies the protocol; the byte
//! offsets are named constants next to their users.
//!
//! - [`types`]: the object store's shared vocabulary (epochs, container/object ids, keys,
//!   per-4-KiB CRC64 checksums), used directly by the engine's store and the client;
//! - [`frame`]: the 64-byte header, frame limits and [`decode_frame`], which splits a receive
//!   buffer into frames without copying; [`FrameError`] is connection-fatal;
//! - [`body`]: the bounded field reader and writers every body layout is built from;
//! - [`request`]: [`Request`] and its body layouts, [`encode_request`]; a [`RequestError`] is
//!   answered with an error reply and the connection survives;
//! - [`reply`]: [`Reply`] and its body layouts, error replies, [`encode_reply`];
//! - [`status`]: the reply status codes ([`RpcStatus`]) and target health.
#![forbid(unsafe_code)]
#![cfg_attr(not(test), deny(clippy::indexing_slicing))]

pub mod body;
pub mod frame;
pub mod reply;
pub mod request;
pub mod status;
pub mod types;

#[cfg(test)]
mod proptests;

pub use frame::{decode_frame, encode_frame, Encoded, Frame, FrameError, FrameLimits, Header, Opcode};
pub use reply::{
    encode_reply, DataRun, EnumBudget, EpochRun, FetchReply, Reply, ReplyError, ReplyResult, SingleValue, TargetInfo, EPOCH_RUNS_MAX,
};
pub use request::{
    encode_request, encode_request_flagged, encode_request_in, Discard, EnumTarget, Enumerate, Fetch, FetchValue, Punch, PunchTarget,
    Request, RequestError, SetRetention, Update, UpdateValue, ENUM_MAX_KEYS, FETCH_ALSO_MAX, RETAINED_MAX,
};
pub use status::{RpcStatus, TargetHealth};
pub use types::{
    chunk_csums, crc64, csum_count, key_from_u64, key_to_u64, verify_chunk_csums, ContainerId, Epoch, ObjectId, CSUM_CHUNK, KEY_MAX,
};
