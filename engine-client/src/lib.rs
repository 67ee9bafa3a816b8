//! Tessera engine RPC client.
//!
//! - [`rpc`]: a pipelined, multiplexed TCP connection to one engine speaking the
//!   `tessera-engine-proto` wire format.
//! - [`hlc`]: the hybrid logical clock that hands out epochs.
//!
//! The client library and the management service (punches of deleted volumes) build on these.
#![forbid(unsafe_code)]

pub mod hlc;
pub mod rpc;

pub use rpc::{ConnectionOptions, EngineConnection, RpcError};
