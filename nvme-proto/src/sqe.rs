//! The 64-byte submission queue entry and its SGL data pointer as NVMe/TCP uses it.

use crate::reader::{u16_at, u32_at, u64_at};

/// Size of a submission queue entry.
pub const SQE_LEN: usize = 64;

const OFF_OPCODE: usize = 0;
const OFF_FLAGS: usize = 1;
const OFF_CID: usize = 2;
const OFF_NSID: usize = 4;
const OFF_DPTR: usize = 24;
const OFF_CDW10: usize = 40;

/// SGL descriptor identifier (type in bits 7:4, subtype in bits 3:0) of an in-capsule data block
/// addressed by offset: Data Block descriptor, subtype Offset.
pub const SGL_ID_INCAPSULE: u8 = 0x01;
/// SGL descriptor identifier of a Transport SGL Data Block, subtype Transport specific (data moved
/// by R2T/H2CData or C2HData).
pub const SGL_ID_TRANSPORT: u8 = 0x5A;

/// PSDT value (flags bits 7:6) "SGL for data, metadata as a contiguous buffer": the only value an
/// NVMe/TCP host may use.
pub const PSDT_SGL_METABUF: u8 = 0b01;

/// A submission queue entry, kept as its raw bytes; accessors decode fields on demand.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Sqe(pub [u8; SQE_LEN]);

/// The data pointer of an SQE interpreted as one SGL descriptor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SglDescriptor {
    /// Address field (for in-capsule data: the offset into the capsule data).
    pub address: u64,
    /// Length in bytes.
    pub length: u32,
    /// Descriptor identifier byte: type in bits 7:4, subtype in bits 3:0.
    pub id: u8,
}

impl Sqe {
    /// Copies an SQE out of a slice, or `None` if it is shorter than 64 bytes.
    pub fn from_slice(b: &[u8]) -> Option<Sqe> {
        crate::reader::array_at(b, 0).map(Sqe)
    }

    fn u32_field(&self, off: usize) -> u32 {
        u32_at(&self.0, off).unwrap_or(0)
    }

    /// Command opcode.
    pub fn opcode(&self) -> u8 {
        self.0[OFF_OPCODE]
    }

    /// Flags byte: FUSE in bits 1:0, PSDT in bits 7:6.
    pub fn flags(&self) -> u8 {
        self.0[OFF_FLAGS]
    }

    /// Fused operation bits.
    pub fn fuse(&self) -> u8 {
        self.flags() & 0x3
    }

    /// PRP or SGL for Data Transfer.
    pub fn psdt(&self) -> u8 {
        self.flags() >> 6
    }

    /// Command identifier.
    pub fn cid(&self) -> u16 {
        u16_at(&self.0, OFF_CID).unwrap_or(0)
    }

    /// Namespace identifier.
    pub fn nsid(&self) -> u32 {
        self.u32_field(OFF_NSID)
    }

    /// Command dword `n` (0..=15).
    pub fn cdw(&self, n: usize) -> u32 {
        self.u32_field(n.min(15) * 4)
    }

    /// CDW10.
    pub fn cdw10(&self) -> u32 {
        self.u32_field(OFF_CDW10)
    }

    /// CDW11.
    pub fn cdw11(&self) -> u32 {
        self.u32_field(OFF_CDW10 + 4)
    }

    /// CDW12.
    pub fn cdw12(&self) -> u32 {
        self.u32_field(OFF_CDW10 + 8)
    }

    /// CDW13.
    pub fn cdw13(&self) -> u32 {
        self.u32_field(OFF_CDW10 + 12)
    }

    /// CDW10 and CDW11 as one little-endian 64-bit value (the SLBA of NVM commands).
    pub fn cdw10_11(&self) -> u64 {
        u64_at(&self.0, OFF_CDW10).unwrap_or(0)
    }

    /// The data pointer as an SGL descriptor.
    pub fn sgl(&self) -> SglDescriptor {
        SglDescriptor { address: u64_at(&self.0, OFF_DPTR).unwrap_or(0), length: self.u32_field(OFF_DPTR + 8), id: self.0[OFF_DPTR + 15] }
    }

    /// The fabrics command type (byte 4) of a fabrics command.
    pub fn fctype(&self) -> u8 {
        self.0[4]
    }

    /// A new SQE with opcode and command id set (host side and tests).
    pub fn new(opcode: u8, cid: u16) -> Sqe {
        let mut s = Sqe([0; SQE_LEN]);
        s.0[OFF_OPCODE] = opcode;
        s.0[OFF_FLAGS] = PSDT_SGL_METABUF << 6;
        s.0[OFF_CID..OFF_CID + 2].copy_from_slice(&cid.to_le_bytes());
        s
    }

    /// Sets the namespace identifier.
    pub fn set_nsid(&mut self, nsid: u32) -> &mut Self {
        self.0[OFF_NSID..OFF_NSID + 4].copy_from_slice(&nsid.to_le_bytes());
        self
    }

    /// Sets command dword `n` (0..=15; 0 is ignored since it holds opcode and CID).
    pub fn set_cdw(&mut self, n: usize, v: u32) -> &mut Self {
        if (1..16).contains(&n) {
            if let Some(dst) = self.0.get_mut(n * 4..n * 4 + 4) {
                dst.copy_from_slice(&v.to_le_bytes());
            }
        }
        self
    }

    /// Sets the data pointer to one SGL descriptor.
    pub fn set_sgl(&mut self, d: SglDescriptor) -> &mut Self {
        self.0[OFF_DPTR..OFF_DPTR + 8].copy_from_slice(&d.address.to_le_bytes());
        self.0[OFF_DPTR + 8..OFF_DPTR + 12].copy_from_slice(&d.length.to_le_bytes());
        self.0[OFF_DPTR + 12..OFF_DPTR + 15].fill(0);
        self.0[OFF_DPTR + 15] = d.id;
        self
    }
}

impl std::fmt::Debug for Sqe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sqe")
            .field("opcode", &format_args!("{:#04x}", self.opcode()))
            .field("cid", &self.cid())
            .field("nsid", &self.nsid())
            .field("cdw10", &format_args!("{:#x}", self.cdw10()))
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_round_trip() {
        let mut s = Sqe::new(0x02, 0xbeef);
        s.set_nsid(7).set_cdw(10, 0x1122_3344).set_cdw(11, 0x5566_7788).set_cdw(12, 0x4000_0007);
        s.set_sgl(SglDescriptor { address: 0, length: 4096, id: SGL_ID_TRANSPORT });
        assert_eq!(s.opcode(), 2);
        assert_eq!(s.cid(), 0xbeef);
        assert_eq!(s.nsid(), 7);
        assert_eq!(s.cdw10_11(), 0x5566_7788_1122_3344);
        assert_eq!(s.cdw12(), 0x4000_0007);
        assert_eq!(s.psdt(), PSDT_SGL_METABUF);
        assert_eq!(s.sgl(), SglDescriptor { address: 0, length: 4096, id: SGL_ID_TRANSPORT });
        assert_eq!(s.cdw(12), s.cdw12());
    }
}
