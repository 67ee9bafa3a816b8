//! Wire formats of NVMe over TCP, shared by every Tessera component that speaks NVMe: the target
//! (`tessera-nvmf`) and, later, the load generator acting as a host.
//!
//! This crate owns bytes and nothing else: PDU framing and digests ([`pdu`]), submission and
//! completion queue entries ([`sqe`], [`cqe`]), status codes ([`status`]), and the byte layouts of
//! the Identify data structures and log pages ([`identify`], [`log`]). It performs no I/O and keeps
//! no connection state; every decoder works on a byte slice, is bounded by explicit limits and
//! returns an error instead of panicking. The layouts follow NVMe Base 2.0, NVMe-oF 1.1 and the
//! NVMe/TCP Transport Specification 1.0; byte offsets are named constants next to their users.
#![forbid(unsafe_code)]
#![deny(clippy::indexing_slicing)]

pub mod cqe;
pub mod fabrics;
pub mod identify;
pub mod log;
pub mod opcode;
pub mod pdu;
pub mod reader;
pub mod sqe;
pub mod status;

pub use cqe::Cqe;
pub use pdu::{Digests, Pdu, PduError, PduLimits};
pub use sqe::Sqe;
pub use status::Status;
