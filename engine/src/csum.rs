//! CRC64 (NVMe polynomial) checksums, one per 4 KiB chunk of a value: the wire format's
//! definitions, so the engine verifies exactly what clients compute.

pub use tessera_engine_proto::{chunk_csums, crc64};
