//! vhost-user-blk: a Tessera block device (a volume, or a read-only snapshot) served to a VM as an
//! ordinary virtio-blk disk over a UNIX socket. The hypervisor (QEMU, Cloud Hypervisor) shares
//! the guest's memory with this process; requests are read from the guest's virtqueues and their
//! data moved to and from guest memory directly.
//!
//! Modules: [`request`] (one descriptor chain into a typed request: bounded, no I/O),
//! [`config`] (the device's configuration space and feature bits), [`backend`] (the device:
//! requests to the block device and back), [`serve`] (a UNIX socket served connection after
//! connection, so a restarted hypervisor or a restarted backend reconnects). The vhost-user protocol and
//! the virtqueues are the rust-vmm crates' (`vhost-user-backend`, `virtio-queue`, `vm-memory`).
#![forbid(unsafe_code)]

pub mod backend;
pub mod config;
pub mod request;
pub mod serve;
