//! The Tessera storage engine: per-target versioned object stores with a WAL-based metadata index,
//! served over RPC. Its implementation arrives with the engine issue; the crate exists now so the
//! workspace layout matches the architecture in `docs/ARCHITECTURE.md`.
#![forbid(unsafe_code)]
