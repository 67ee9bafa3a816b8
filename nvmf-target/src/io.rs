//! Command validation for every queue: where a command's data comes from or goes to
//! ([`plan_transfer`]), and the NVM I/O commands ([`validate_io`], [`dsm_ranges`]). All of it is
//! pure: the whole command is checked (namespace, LBA range with checked arithmetic, transfer
//! length against MDTS and the SGL) before any of it executes, and every failure is the exact
//! NVMe status to return.

use bytes::Bytes;
use tessera_bdev::{BdevError, BlockDevice};
use tessera_nvme_proto::opcode::{self, nvm};
use tessera_nvme_proto::sqe::{PSDT_SGL_METABUF, SGL_ID_INCAPSULE, SGL_ID_TRANSPORT};
use tessera_nvme_proto::status::sct;
use tessera_nvme_proto::{Sqe, Status};

use crate::target::Namespace;

/// Where a command's data moves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataPlan {
    /// No data.
    None,
    /// Host to controller, already in the capsule.
    InCapsule(u32),
    /// Host to controller, to be solicited with R2T.
    FromHost(u32),
    /// Controller to host, this many bytes at most (the host buffer).
    ToHost(u32),
}

/// The data transfer direction of a command: opcode bits 1:0 (for fabrics commands, the command
/// type's bits 1:0): 0 none, 1 host to controller, 2 controller to host, 3 bidirectional.
pub fn direction(sqe: &Sqe) -> u8 {
    if sqe.opcode() == opcode::FABRICS {
        sqe.fctype() & 0x3
    } else {
        sqe.opcode() & 0x3
    }
}

/// Checks a command's SGL against its direction and the capsule, and says how its data moves.
pub fn plan_transfer(sqe: &Sqe, incapsule_len: usize, max_transfer: u32) -> Result<DataPlan, Status> {
    if sqe.psdt() != PSDT_SGL_METABUF || sqe.fuse() != 0 {
        return Err(Status::INVALID_FIELD);
    }
    let sgl = sqe.sgl();
    if sgl.length == 0 && incapsule_len == 0 {
        // No data, whatever the direction (Set Features or Get Features without a buffer).
        return Ok(DataPlan::None);
    }
    match direction(sqe) {
        0 => {
            if incapsule_len != 0 {
                return Err(Status::INVALID_FIELD);
            }
            Ok(DataPlan::None)
        }
        1 => match sgl.id {
            SGL_ID_INCAPSULE => {
                if sgl.address != 0 {
                    return Err(Status::SGL_OFFSET_INVALID);
                }
                if sgl.length as usize != incapsule_len {
                    return Err(Status::DATA_SGL_LENGTH_INVALID);
                }
                Ok(DataPlan::InCapsule(sgl.length))
            }
            SGL_ID_TRANSPORT => {
                if incapsule_len != 0 {
                    return Err(Status::SGL_DESCRIPTOR_TYPE_INVALID);
                }
                if sgl.length > max_transfer {
                    return Err(Status::INVALID_FIELD);
                }
                Ok(if sgl.length == 0 { DataPlan::None } else { DataPlan::FromHost(sgl.length) })
            }
            _ => Err(Status::SGL_DESCRIPTOR_TYPE_INVALID),
        },
        2 => {
            if sgl.id != SGL_ID_TRANSPORT || incapsule_len != 0 {
                return Err(Status::SGL_DESCRIPTOR_TYPE_INVALID);
            }
            if sgl.length > max_transfer {
                return Err(Status::INVALID_FIELD);
            }
            Ok(DataPlan::ToHost(sgl.length))
        }
        _ => Err(Status::INVALID_FIELD),
    }
}

/// A validated NVM command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoOp {
    /// Read `blocks` blocks at `lba`.
    Read { lba: u64, blocks: u32 },
    /// Write `blocks` blocks at `lba`.
    Write { lba: u64, blocks: u32, fua: bool },
    /// Flush the namespace (or, with `all`, every namespace of the subsystem).
    Flush { all: bool },
    /// Write zeroes (deallocating when asked).
    WriteZeroes { lba: u64, blocks: u64, deallocate: bool, fua: bool },
    /// Dataset Management with `ranges` range descriptors in its data.
    DatasetManagement { ranges: u32, deallocate: bool },
}

impl IoOp {
    /// Which access a reservation must allow: `Some(false)` reads (Read), `Some(true)` writes
    /// (Write, Write Zeroes, Dataset Management), `None` either (Flush).
    pub fn access(&self) -> Option<bool> {
        match self {
            IoOp::Read { .. } => Some(false),
            IoOp::Flush { .. } => None,
            _ => Some(true),
        }
    }

    /// The first LBA the command addresses, for the error log.
    pub fn lba(&self) -> u64 {
        match *self {
            IoOp::Read { lba, .. } | IoOp::Write { lba, .. } | IoOp::WriteZeroes { lba, .. } => lba,
            _ => 0,
        }
    }
}

const FUA: u32 = 1 << 30;
const PRINFO_MASK: u32 = 0xF << 26;
const DEAC: u32 = 1 << 25;
const DSM_AD: u32 = 1 << 2;
/// Size of one Dataset Management range descriptor.
pub const DSM_RANGE_LEN: usize = 16;

fn check_lba(lba: u64, blocks: u64, ns: &Namespace) -> Result<(), Status> {
    match lba.checked_add(blocks) {
        Some(end) if end <= ns.bdev.num_blocks() => Ok(()),
        _ => Err(Status::LBA_OUT_OF_RANGE),
    }
}

/// Validates an NVM command against its namespace (`None` if the NSID is not active) and its
/// data plan.
pub fn validate_io(sqe: &Sqe, ns: Option<&Namespace>, plan: DataPlan, max_transfer: u32) -> Result<IoOp, Status> {
    let op = sqe.opcode();
    if !matches!(op, nvm::FLUSH | nvm::WRITE | nvm::READ | nvm::WRITE_ZEROES | nvm::DATASET_MANAGEMENT) {
        return Err(Status::INVALID_OPCODE);
    }
    if op == nvm::FLUSH && sqe.nsid() == 0xFFFF_FFFF {
        return Ok(IoOp::Flush { all: true });
    }
    let ns = ns.ok_or(Status::INVALID_NAMESPACE)?;
    // A snapshot's namespace: nothing that changes blocks runs (DSM only when it deallocates).
    let changes = matches!(op, nvm::WRITE | nvm::WRITE_ZEROES) || (op == nvm::DATASET_MANAGEMENT && sqe.cdw11() & DSM_AD != 0);
    if changes && ns.bdev.write_protected() {
        return Err(Status::NAMESPACE_WRITE_PROTECTED);
    }
    let cdw12 = sqe.cdw12();
    let lba = sqe.cdw10_11();
    let data_len = match plan {
        DataPlan::None => 0u64,
        DataPlan::InCapsule(n) | DataPlan::FromHost(n) | DataPlan::ToHost(n) => u64::from(n),
    };
    match op {
        nvm::READ | nvm::WRITE => {
            if cdw12 & PRINFO_MASK != 0 {
                return Err(Status::INVALID_FIELD);
            }
            let blocks = (cdw12 & 0xFFFF) + 1;
            let bytes = u64::from(blocks) << ns.lba_shift();
            if bytes > u64::from(max_transfer) {
                return Err(Status::INVALID_FIELD);
            }
            check_lba(lba, u64::from(blocks), ns)?;
            if bytes != data_len {
                return Err(Status::DATA_SGL_LENGTH_INVALID);
            }
            Ok(if op == nvm::READ { IoOp::Read { lba, blocks } } else { IoOp::Write { lba, blocks, fua: cdw12 & FUA != 0 } })
        }
        nvm::WRITE_ZEROES => {
            if cdw12 & PRINFO_MASK != 0 {
                return Err(Status::INVALID_FIELD);
            }
            let blocks = u64::from(cdw12 & 0xFFFF) + 1;
            check_lba(lba, blocks, ns)?;
            Ok(IoOp::WriteZeroes { lba, blocks, deallocate: cdw12 & DEAC != 0, fua: cdw12 & FUA != 0 })
        }
        nvm::DATASET_MANAGEMENT => {
            let ranges = (sqe.cdw10() & 0xFF) + 1;
            // The host buffer may be larger than the ranges it holds (Linux sends a whole page
            // when it falls back to its preallocated discard page).
            if data_len < u64::from(ranges) * DSM_RANGE_LEN as u64 {
                return Err(Status::DATA_SGL_LENGTH_INVALID);
            }
            Ok(IoOp::DatasetManagement { ranges, deallocate: sqe.cdw11() & DSM_AD != 0 })
        }
        _ => Ok(IoOp::Flush { all: false }),
    }
}

/// The segments of a command's data as one contiguous buffer (for small command payloads such as
/// Connect data and DSM ranges, never for block data).
pub fn concat(data: &[Bytes]) -> Vec<u8> {
    data.concat()
}

/// Parses and range-checks every Dataset Management range before any is executed. Returns
/// (LBA, blocks) pairs, skipping empty ranges.
pub fn dsm_ranges(data: &[Bytes], count: u32, ns: &Namespace) -> Result<Vec<(u64, u64)>, Status> {
    let flat = concat(data);
    let mut out = Vec::with_capacity(count as usize);
    for i in 0..count as usize {
        let at = i * DSM_RANGE_LEN;
        let blocks = tessera_nvme_proto::reader::u32_at(&flat, at + 4).ok_or(Status::DATA_SGL_LENGTH_INVALID)?;
        let lba = tessera_nvme_proto::reader::u64_at(&flat, at + 8).ok_or(Status::DATA_SGL_LENGTH_INVALID)?;
        if blocks == 0 {
            continue;
        }
        check_lba(lba, u64::from(blocks), ns)?;
        out.push((lba, u64::from(blocks)));
    }
    Ok(out)
}

/// Unrecovered Read Error with Do Not Retry: the data was reached and is bad, so a retry reads
/// the same bad data.
pub const CORRUPT_READ: Status = Status::dnr(sct::MEDIA, 0x81);
/// Write Fault with Do Not Retry, for a write that failed on corrupt data.
pub const CORRUPT_WRITE: Status = Status::dnr(sct::MEDIA, 0x80);

/// The NVMe status for a failed bdev operation.
///
/// - `Unavailable` (e.g. too many engines of a volume's redundancy group down) is Namespace Not
///   Ready without DNR: the host (Linux: up to `nvme_core.max_retries`) retries later, which is
///   right for a condition that heals when engines return.
/// - `Corrupt` is a media error with DNR: Unrecovered Read Error on a read, Write Fault on a
///   write (a partial-stripe write that had to read corrupt data).
/// - `Internal` is Internal Error without DNR.
pub fn bdev_status(e: &BdevError, is_read: bool) -> Status {
    match e {
        BdevError::OutOfRange { .. } => Status::LBA_OUT_OF_RANGE,
        BdevError::Misaligned(_) => Status::DATA_SGL_LENGTH_INVALID,
        BdevError::Unsupported(_) => Status::INVALID_FIELD,
        BdevError::Io(_) if is_read => Status::UNRECOVERED_READ_ERROR,
        BdevError::Io(_) => Status::WRITE_FAULT,
        BdevError::Unavailable(_) => Status::NAMESPACE_NOT_READY,
        BdevError::Corrupt(_) if is_read => CORRUPT_READ,
        BdevError::Corrupt(_) => CORRUPT_WRITE,
        BdevError::Internal(_) => Status::INTERNAL_ERROR,
        BdevError::WriteProtected(_) => Status::NAMESPACE_WRITE_PROTECTED,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{BdevKind, NamespaceConfig};
    use tessera_nvme_proto::sqe::SglDescriptor;

    fn ns(blocks_mib: u64) -> Namespace {
        let c = NamespaceConfig { nsid: 1, bdev: BdevKind::Null, size_mib: blocks_mib, block_size: 512, uuid: None };
        crate::target::namespace_for_tests("nqn.t", &c)
    }

    fn rw(op: u8, lba: u64, nlb0: u32, sgl_len: u32, id: u8) -> Sqe {
        let mut s = Sqe::new(op, 1);
        s.set_nsid(1).set_cdw(10, lba as u32).set_cdw(11, (lba >> 32) as u32).set_cdw(12, nlb0);
        s.set_sgl(SglDescriptor { address: 0, length: sgl_len, id });
        s
    }

    const MDTS: u32 = 512 * 1024;

    #[test]
    fn transfer_plans() {
        let w = rw(nvm::WRITE, 0, 7, 4096, SGL_ID_INCAPSULE);
        assert_eq!(plan_transfer(&w, 4096, MDTS), Ok(DataPlan::InCapsule(4096)));
        assert_eq!(plan_transfer(&w, 512, MDTS), Err(Status::DATA_SGL_LENGTH_INVALID));
        let w = rw(nvm::WRITE, 0, 255, 131072, SGL_ID_TRANSPORT);
        assert_eq!(plan_transfer(&w, 0, MDTS), Ok(DataPlan::FromHost(131072)));
        let r = rw(nvm::READ, 0, 7, 4096, SGL_ID_TRANSPORT);
        assert_eq!(plan_transfer(&r, 0, MDTS), Ok(DataPlan::ToHost(4096)));
        let r = rw(nvm::READ, 0, 7, 4096, SGL_ID_INCAPSULE);
        assert_eq!(plan_transfer(&r, 0, MDTS), Err(Status::SGL_DESCRIPTOR_TYPE_INVALID));
        let big = rw(nvm::READ, 0, 0, MDTS + 512, SGL_ID_TRANSPORT);
        assert_eq!(plan_transfer(&big, 0, MDTS), Err(Status::INVALID_FIELD));
        let mut prp = rw(nvm::READ, 0, 7, 4096, SGL_ID_TRANSPORT);
        prp.0[1] = 0; // PSDT = PRP
        assert_eq!(plan_transfer(&prp, 0, MDTS), Err(Status::INVALID_FIELD));
    }

    #[test]
    fn io_validation_statuses() {
        let n = ns(1); // 2048 blocks
        let plan = |s: &Sqe| plan_transfer(s, 0, MDTS).unwrap();
        let r = rw(nvm::READ, 2040, 7, 4096, SGL_ID_TRANSPORT);
        assert_eq!(validate_io(&r, Some(&n), plan(&r), MDTS), Ok(IoOp::Read { lba: 2040, blocks: 8 }));
        let r = rw(nvm::READ, 2041, 7, 4096, SGL_ID_TRANSPORT);
        assert_eq!(validate_io(&r, Some(&n), plan(&r), MDTS), Err(Status::LBA_OUT_OF_RANGE));
        // SLBA + NLB overflowing u64 is out of range, not a wrap-around.
        let r = rw(nvm::READ, u64::MAX - 2, 7, 4096, SGL_ID_TRANSPORT);
        assert_eq!(validate_io(&r, Some(&n), plan(&r), MDTS), Err(Status::LBA_OUT_OF_RANGE));
        let r = rw(nvm::READ, 0, 7, 2048, SGL_ID_TRANSPORT);
        assert_eq!(validate_io(&r, Some(&n), plan(&r), MDTS), Err(Status::DATA_SGL_LENGTH_INVALID));
        let r = rw(nvm::READ, 0, 7, 4096, SGL_ID_TRANSPORT);
        assert_eq!(validate_io(&r, None, plan(&r), MDTS), Err(Status::INVALID_NAMESPACE));
        let r = rw(0x7E, 0, 0, 0, SGL_ID_TRANSPORT);
        assert_eq!(validate_io(&r, Some(&n), DataPlan::None, MDTS), Err(Status::INVALID_OPCODE));
        let w = rw(nvm::WRITE, 0, (1 << 30) | 0xFFFF, 65536 * 512, SGL_ID_TRANSPORT);
        assert_eq!(validate_io(&w, Some(&n), DataPlan::FromHost(65536 * 512), MDTS), Err(Status::INVALID_FIELD));
        let w = rw(nvm::WRITE, 8, (1 << 30) | 7, 4096, SGL_ID_TRANSPORT);
        assert_eq!(validate_io(&w, Some(&n), DataPlan::FromHost(4096), MDTS), Ok(IoOp::Write { lba: 8, blocks: 8, fua: true }));
        let z = rw(nvm::WRITE_ZEROES, 2047, 1, 0, SGL_ID_TRANSPORT);
        assert_eq!(validate_io(&z, Some(&n), DataPlan::None, MDTS), Err(Status::LBA_OUT_OF_RANGE));
        let mut f = rw(nvm::FLUSH, 0, 0, 0, SGL_ID_TRANSPORT);
        f.set_nsid(0xFFFF_FFFF);
        assert_eq!(validate_io(&f, None, DataPlan::None, MDTS), Ok(IoOp::Flush { all: true }));
    }

    #[test]
    fn dsm_ranges_are_all_checked_first() {
        let n = ns(1);
        let range = |lba: u64, nlb: u32| {
            let mut r = vec![0u8; 16];
            r[4..8].copy_from_slice(&nlb.to_le_bytes());
            r[8..16].copy_from_slice(&lba.to_le_bytes());
            r
        };
        let ok = [range(0, 8), range(100, 0), range(2040, 8)].concat();
        assert_eq!(dsm_ranges(&[Bytes::from(ok)], 3, &n), Ok(vec![(0, 8), (2040, 8)]));
        let bad = [range(0, 8), range(2041, 8)].concat();
        assert_eq!(dsm_ranges(&[Bytes::from(bad)], 2, &n), Err(Status::LBA_OUT_OF_RANGE));
        let mut d = rw(nvm::DATASET_MANAGEMENT, 0, 0, 32, SGL_ID_INCAPSULE);
        d.set_cdw(10, 1).set_cdw(11, 1 << 2);
        assert_eq!(validate_io(&d, Some(&n), DataPlan::InCapsule(32), MDTS), Ok(IoOp::DatasetManagement { ranges: 2, deallocate: true }));
        assert_eq!(validate_io(&d, Some(&n), DataPlan::InCapsule(16), MDTS), Err(Status::DATA_SGL_LENGTH_INVALID));
        assert_eq!(validate_io(&d, Some(&n), DataPlan::InCapsule(4096), MDTS), Ok(IoOp::DatasetManagement { ranges: 2, deallocate: true }));
    }

    #[test]
    fn bdev_errors_map_to_the_statuses_hosts_act_on() {
        let st = |e: BdevError, read| bdev_status(&e, read);
        // Unavailable: retryable (no DNR), not a media error.
        let s = st(BdevError::Unavailable("engines down".into()), true);
        assert_eq!(s, Status::NAMESPACE_NOT_READY);
        assert!(!s.is_dnr());
        assert_eq!((s.sct(), s.sc()), (sct::GENERIC, 0x82));
        assert_eq!(st(BdevError::Unavailable("x".into()), false), Status::NAMESPACE_NOT_READY);
        // Corrupt: media error, do not retry.
        let s = st(BdevError::Corrupt("crc".into()), true);
        assert_eq!((s.sct(), s.sc(), s.is_dnr()), (sct::MEDIA, 0x81, true));
        let s = st(BdevError::Corrupt("crc".into()), false);
        assert_eq!((s.sct(), s.sc(), s.is_dnr()), (sct::MEDIA, 0x80, true));
        let s = st(BdevError::Internal("bug".into()), true);
        assert_eq!((s, s.is_dnr()), (Status::INTERNAL_ERROR, false));
        assert_eq!(st(BdevError::Io("eio".into()), true), Status::UNRECOVERED_READ_ERROR);
        assert_eq!(st(BdevError::Io("eio".into()), false), Status::WRITE_FAULT);
        assert_eq!(st(BdevError::OutOfRange { lba: 1, blocks: 1, size: 1 }, true), Status::LBA_OUT_OF_RANGE);
    }
}
