//! vhost-user-blk: a Tessera block device (a volume, or a read-only snapshot) served to a VM as an
//! ordinary virtio-blk disk over a UNIX socket. The hypervisor (QEMU, Cloud Hypervisor) shares
//! the guest's memory with this process; requests are read from the guest's virtqueues and their
//! data moved to and from guest memory directly.
//!
//! Modules: [`request`] (one descriptor chain into a typed request: bounded, no I/O),
//! [`config`] (the device's configuration space and feature bits). The vhost-user protocol and
//! the virtqueues are the rust-vmm crates' (`vhost-user-backend`, `virtio-queue`, `vm-memory`).
#![forbid(unsafe_code)]

pub mod config;
pub mod request;
