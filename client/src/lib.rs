//! Tessera client library. Today it holds the engine RPC connection ([`rpc`]): a pipelined,
//! multiplexed TCP connection to one engine speaking the `tessera-engine-proto` wire format.
//! Placement, erasure coding and the DAOS bdev build on it later.
#![forbid(unsafe_code)]

pub mod rpc;

pub use rpc::{ConnectionOptions, EngineConnection, RpcError};
pub use tessera_engine_proto as proto;
