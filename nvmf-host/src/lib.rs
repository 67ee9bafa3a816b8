//! The host side of NVMe/TCP, built on the same wire-format code as the target
//! (`tessera-nvme-proto`): connect to a subsystem as a Linux host does — ICReq, admin queue,
//! Connect, controller enable, Identify, I/O queues — and drive workloads over them.
//!
//! [`conn`] is a request/response connection used for setup and admin commands; [`workload`]
//! turns I/O queues into pipelined load generators with latency histograms and a verify mode.
//! `tessera bench` is the command-line front end.
#![forbid(unsafe_code)]

pub mod conn;
pub mod workload;

pub use conn::{Connection, Controller, ControllerOptions, HostError};
pub use workload::{Report, Rng, Rw, Workload};
