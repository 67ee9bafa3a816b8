//! Tessera placement: where a volume's bytes live, computed without any I/O.
//!
//! - [`placement`]: pool maps, object classes and the algorithmic layout of redundancy groups.
//! - [`layout`]: a volume's block mapping, byte range → chunk (dkey) → stripe → cell, and the
//!   default chunk and cell sizes.
//!
//! The client library and the management service both build on these.
#![forbid(unsafe_code)]

pub mod layout;
pub mod placement;
