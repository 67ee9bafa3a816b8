//! Tessera client library.
//!
//! - [`ec`]: Reed-Solomon erasure coding of stripes (k data + p parity cells).
//! - [`volume`]: volume I/O over the engines: pool map cache and refresh, one connection per
//!   engine, EC and replicated writes, degraded reads.
//!
//! Re-exported for source compatibility:
//!
//! - [`rpc`], [`hlc`] (from `tessera-engine-client`): the pipelined engine connection and the
//!   hybrid logical clock that hands out epochs.
//! - [`placement`], [`layout`] (from `tessera-placement`): pool maps, object classes and the
//!   algorithmic layout of redundancy groups; a volume's block mapping, byte range → chunk
//!   (dkey) → stripe → cell.
//!
//! The DAOS bdev builds on these.
#![forbid(unsafe_code)]

pub mod ec;
pub mod volume;

pub use tessera_engine_client::rpc::{ConnectionOptions, EngineConnection, RpcError};
pub use tessera_engine_client::{hlc, rpc};
pub use tessera_engine_proto as proto;
pub use tessera_placement::{layout, placement};
