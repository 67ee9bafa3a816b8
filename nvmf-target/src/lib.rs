//! Tessera's NVMe over Fabrics TCP target: serves bdevs as namespaces of NVM subsystems to Linux
//! (or any NVMe/TCP) hosts, plus the discovery controller that tells hosts what they may connect
//! to.
//!
//! Layout, from the wire inward: [`queue`] is the per-connection protocol state machine (bytes in,
//! events and bytes out, no I/O) with its pending output in an [`outbox`]; [`inflight`] runs a
//! connection's commands in flight in reusable slots; [`connect`] handles Fabrics Connect; [`controller`] owns a
//! controller's state and the admin command set; [`io`] validates NVM commands; [`target`] holds
//! subsystems, namespaces and configuration reload; [`server`] is the tokio code that moves bytes
//! between sockets and those pieces; [`config`] is the TOML configuration; [`managed`] follows the
//! management service's exports (managed mode).
#![forbid(unsafe_code)]

pub mod ana;
pub mod config;
pub mod connect;
pub mod controller;
pub mod inflight;
pub mod io;
pub mod managed;
pub mod outbox;
pub mod poll;
pub mod queue;
pub mod resv;
pub mod server;
pub mod target;
pub mod vhost;
