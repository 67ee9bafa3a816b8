//! Tessera client library.
//!
//! - [`rpc`]: a pipelined, multiplexed TCP connection to one engine speaking the
//!   `tessera-engine-proto` wire format.
//! - [`hlc`]: the hybrid logical clock that hands out epochs.
//! - [`ec`]: Reed-Solomon erasure coding of stripes (k data + p parity cells).
//! - [`placement`]: pool maps, object classes and the algorithmic layout of redundancy groups.
//! - [`layout`]: a volume's block mapping, byte range → chunk (dkey) → stripe → cell.
//!
//! The DAOS bdev builds on these.
#![forbid(unsafe_code)]

pub mod ec;
pub mod hlc;
pub mod layout;
pub mod placement;
pub mod rpc;
pub mod volume;

pub use rpc::{ConnectionOptions, EngineConnection, RpcError};
pub use tessera_engine_proto as proto;
