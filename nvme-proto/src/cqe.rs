//! The 16-byte completion queue entry.

use crate::reader::{u16_at, u32_at};
use crate::status::Status;

/// Size of a completion queue entry.
pub const CQE_LEN: usize = 16;

/// SQ Head Pointer value meaning "SQ flow control disabled" (NVMe-oF 1.1, Connect CATTR bit 2).
pub const SQHD_DISABLED: u16 = 0xFFFF;

/// A completion queue entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cqe {
    /// Command specific DW0.
    pub dw0: u32,
    /// Command specific DW1.
    pub dw1: u32,
    /// SQ head pointer.
    pub sqhd: u16,
    /// SQ identifier.
    pub sqid: u16,
    /// Command identifier.
    pub cid: u16,
    /// Status (the phase tag is always 0 on fabrics).
    pub status: Status,
}

impl Cqe {
    /// A completion for `cid` with `status` and zero dwords.
    pub fn new(cid: u16, status: Status) -> Cqe {
        Cqe { dw0: 0, dw1: 0, sqhd: 0, sqid: 0, cid, status }
    }

    /// Encodes the entry.
    pub fn to_bytes(&self) -> [u8; CQE_LEN] {
        let mut b = [0u8; CQE_LEN];
        b[0..4].copy_from_slice(&self.dw0.to_le_bytes());
        b[4..8].copy_from_slice(&self.dw1.to_le_bytes());
        b[8..10].copy_from_slice(&self.sqhd.to_le_bytes());
        b[10..12].copy_from_slice(&self.sqid.to_le_bytes());
        b[12..14].copy_from_slice(&self.cid.to_le_bytes());
        b[14..16].copy_from_slice(&self.status.to_field().to_le_bytes());
        b
    }

    /// Decodes an entry, or `None` if `b` is shorter than 16 bytes.
    pub fn from_slice(b: &[u8]) -> Option<Cqe> {
        Some(Cqe {
            dw0: u32_at(b, 0)?,
            dw1: u32_at(b, 4)?,
            sqhd: u16_at(b, 8)?,
            sqid: u16_at(b, 10)?,
            cid: u16_at(b, 12)?,
            status: Status::from_field(u16_at(b, 14)?),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let c = Cqe { dw0: 1, dw1: 2, sqhd: SQHD_DISABLED, sqid: 3, cid: 4, status: Status::INVALID_FIELD };
        assert_eq!(Cqe::from_slice(&c.to_bytes()), Some(c));
        assert_eq!(Cqe::from_slice(&[0; 15]), None);
    }
}
