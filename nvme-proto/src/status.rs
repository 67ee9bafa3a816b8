//! NVMe completion status: Status Code Type (SCT), Status Code (SC) and the Do Not Retry bit, laid
//! out as in the upper 15 bits of CQE DW3 (the phase bit is not part of a fabrics completion).

use std::fmt;

/// A completion status: bits 7:0 SC, 10:8 SCT, 14 DNR (this is the CQE status field shifted right
/// by one, dropping the phase tag).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Status(u16);

/// Status code types.
pub mod sct {
    /// Generic command status.
    pub const GENERIC: u8 = 0;
    /// Command specific status.
    pub const COMMAND_SPECIFIC: u8 = 1;
    /// Media and data integrity errors.
    pub const MEDIA: u8 = 2;
    /// Path related status (a multipath host retries on another path).
    pub const PATH: u8 = 3;
}

const DNR: u16 = 1 << 14;

impl Status {
    /// Successful completion.
    pub const SUCCESS: Status = Status(0);
    /// Invalid Command Opcode.
    pub const INVALID_OPCODE: Status = Status::dnr(sct::GENERIC, 0x01);
    /// Invalid Field in Command.
    pub const INVALID_FIELD: Status = Status::dnr(sct::GENERIC, 0x02);
    /// Command ID Conflict.
    pub const CID_CONFLICT: Status = Status::dnr(sct::GENERIC, 0x03);
    /// Data Transfer Error.
    pub const DATA_TRANSFER_ERROR: Status = Status::new(sct::GENERIC, 0x04);
    /// Internal Error.
    pub const INTERNAL_ERROR: Status = Status::new(sct::GENERIC, 0x06);
    /// Command Abort Requested.
    pub const ABORT_REQUESTED: Status = Status::new(sct::GENERIC, 0x07);
    /// Command Aborted due to SQ Deletion.
    pub const ABORTED_SQ_DELETION: Status = Status::new(sct::GENERIC, 0x08);
    /// Invalid Namespace or Format.
    pub const INVALID_NAMESPACE: Status = Status::dnr(sct::GENERIC, 0x0B);
    /// Command Sequence Error.
    pub const COMMAND_SEQUENCE_ERROR: Status = Status::dnr(sct::GENERIC, 0x0C);
    /// Invalid SGL Segment Descriptor.
    pub const INVALID_SGL_SEGMENT: Status = Status::dnr(sct::GENERIC, 0x0D);
    /// Data SGL Length Invalid.
    pub const DATA_SGL_LENGTH_INVALID: Status = Status::dnr(sct::GENERIC, 0x0F);
    /// SGL Descriptor Type Invalid.
    pub const SGL_DESCRIPTOR_TYPE_INVALID: Status = Status::dnr(sct::GENERIC, 0x11);
    /// SGL Offset Invalid.
    pub const SGL_OFFSET_INVALID: Status = Status::dnr(sct::GENERIC, 0x16);
    /// Namespace is Write Protected.
    pub const NAMESPACE_WRITE_PROTECTED: Status = Status::dnr(sct::GENERIC, 0x20);
    /// LBA Out of Range.
    pub const LBA_OUT_OF_RANGE: Status = Status::dnr(sct::GENERIC, 0x80);
    /// Capacity Exceeded.
    pub const CAPACITY_EXCEEDED: Status = Status::dnr(sct::GENERIC, 0x81);
    /// Namespace Not Ready.
    pub const NAMESPACE_NOT_READY: Status = Status::new(sct::GENERIC, 0x82);

    /// Invalid Queue Identifier.
    pub const INVALID_QUEUE_ID: Status = Status::dnr(sct::COMMAND_SPECIFIC, 0x01);
    /// Invalid Queue Size.
    pub const INVALID_QUEUE_SIZE: Status = Status::dnr(sct::COMMAND_SPECIFIC, 0x02);
    /// Asynchronous Event Request Limit Exceeded.
    pub const AER_LIMIT_EXCEEDED: Status = Status::dnr(sct::COMMAND_SPECIFIC, 0x05);
    /// Invalid Log Page.
    pub const INVALID_LOG_PAGE: Status = Status::dnr(sct::COMMAND_SPECIFIC, 0x09);
    /// Feature Identifier Not Saveable.
    pub const FEATURE_NOT_SAVEABLE: Status = Status::dnr(sct::COMMAND_SPECIFIC, 0x0D);
    /// Connect: Incompatible Format.
    pub const CONNECT_INCOMPATIBLE_FORMAT: Status = Status::dnr(sct::COMMAND_SPECIFIC, 0x80);
    /// Connect: Controller Busy.
    pub const CONNECT_CONTROLLER_BUSY: Status = Status::new(sct::COMMAND_SPECIFIC, 0x81);
    /// Connect: Invalid Parameters.
    pub const CONNECT_INVALID_PARAMETERS: Status = Status::dnr(sct::COMMAND_SPECIFIC, 0x82);
    /// Connect: Invalid Host.
    pub const CONNECT_INVALID_HOST: Status = Status::dnr(sct::COMMAND_SPECIFIC, 0x84);

    /// Write Fault.
    pub const WRITE_FAULT: Status = Status::new(sct::MEDIA, 0x80);
    /// Unrecovered Read Error.
    pub const UNRECOVERED_READ_ERROR: Status = Status::new(sct::MEDIA, 0x81);
    /// Asymmetric Access Persistent Loss: this path will not serve the namespace again.
    pub const ANA_PERSISTENT_LOSS: Status = Status::new(sct::PATH, 0x01);
    /// Asymmetric Access Inaccessible: this path cannot serve the namespace now; use another.
    pub const ANA_INACCESSIBLE: Status = Status::new(sct::PATH, 0x02);
    /// Asymmetric Access Transition: this path's access state is changing; retry.
    pub const ANA_TRANSITION: Status = Status::new(sct::PATH, 0x03);

    /// A status without the Do Not Retry bit.
    pub const fn new(sct: u8, sc: u8) -> Status {
        Status((((sct & 0x7) as u16) << 8) | sc as u16)
    }

    /// A status with the Do Not Retry bit set: the same command will fail the same way again.
    pub const fn dnr(sct: u8, sc: u8) -> Status {
        Status(Status::new(sct, sc).0 | DNR)
    }

    /// Rebuilds a status from the upper 15 bits of CQE DW3 (`raw >> 1` of the status field).
    pub const fn from_field(field: u16) -> Status {
        Status((field >> 1) & 0x7fff)
    }

    /// The CQE status field (DW3 bits 31:16) with the phase tag cleared.
    pub const fn to_field(self) -> u16 {
        self.0 << 1
    }

    /// Status code type.
    pub const fn sct(self) -> u8 {
        ((self.0 >> 8) & 0x7) as u8
    }

    /// Status code.
    pub const fn sc(self) -> u8 {
        (self.0 & 0xff) as u8
    }

    /// Whether Do Not Retry is set.
    pub const fn is_dnr(self) -> bool {
        self.0 & DNR != 0
    }

    /// Whether this is a successful completion.
    pub const fn is_success(self) -> bool {
        self.sct() == 0 && self.sc() == 0
    }
}

impl fmt::Debug for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Status(sct={:#x}, sc={:#04x}{})", self.sct(), self.sc(), if self.is_dnr() { ", dnr" } else { "" })
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn field_round_trip_and_bits() {
        let s = Status::LBA_OUT_OF_RANGE;
        assert_eq!(s.sct(), 0);
        assert_eq!(s.sc(), 0x80);
        assert!(s.is_dnr());
        // CQE status field: SC in bits 8:1, SCT in 11:9, DNR in bit 15.
        assert_eq!(s.to_field(), (0x80 << 1) | (1 << 15));
        assert_eq!(Status::from_field(s.to_field() | 1), s);
        assert_eq!(Status::CONNECT_INVALID_HOST.to_field(), (0x84 << 1) | (1 << 9) | (1 << 15));
    }
}
