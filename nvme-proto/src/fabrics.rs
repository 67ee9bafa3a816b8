//! NVMe over Fabrics command layouts: Connect (command and its 1024-byte data), Property Get/Set,
//! and the controller properties (CAP, VS, CC, CSTS).

use crate::reader::{array_at, u16_at, u32_at, u64_at};
use crate::sqe::Sqe;

/// Length of the Connect command's data.
pub const CONNECT_DATA_LEN: usize = 1024;
/// Offset of HOSTID in the Connect data.
pub const CONNECT_OFF_HOSTID: usize = 0;
/// Offset of CNTLID in the Connect data.
pub const CONNECT_OFF_CNTLID: usize = 16;
/// Offset of SUBNQN in the Connect data.
pub const CONNECT_OFF_SUBNQN: usize = 256;
/// Offset of HOSTNQN in the Connect data.
pub const CONNECT_OFF_HOSTNQN: usize = 512;
/// Width of an NQN field.
pub const NQN_FIELD_LEN: usize = 256;
/// Offset of SQSIZE in the Connect SQE (used as IPO in an Invalid Parameters reply).
pub const CONNECT_SQE_OFF_SQSIZE: u16 = 44;
/// Offset of QID in the Connect SQE.
pub const CONNECT_SQE_OFF_QID: u16 = 42;
/// Connect CATTR bit 2: the host asks to disable SQ flow control.
pub const CATTR_DISABLE_SQFLOW: u8 = 1 << 2;
/// CNTLID in Connect data meaning "dynamic controller model: allocate one".
pub const CNTLID_DYNAMIC: u16 = 0xFFFF;

/// The Connect command's SQE fields.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnectCmd {
    /// Record format (must be 0).
    pub recfmt: u16,
    /// Queue id: 0 for the admin queue.
    pub qid: u16,
    /// Submission queue size, 0's based.
    pub sqsize: u16,
    /// Connect attributes.
    pub cattr: u8,
    /// Keep alive timeout in milliseconds (admin queue only).
    pub kato_ms: u32,
}

impl ConnectCmd {
    /// Reads the Connect fields out of an SQE.
    pub fn from_sqe(s: &Sqe) -> ConnectCmd {
        ConnectCmd {
            recfmt: u16_at(&s.0, 40).unwrap_or(0),
            qid: u16_at(&s.0, 42).unwrap_or(0),
            sqsize: u16_at(&s.0, 44).unwrap_or(0),
            cattr: s.0[46],
            kato_ms: u32_at(&s.0, 48).unwrap_or(0),
        }
    }

    /// Writes these fields into an SQE (host side).
    pub fn write_to(&self, s: &mut Sqe) {
        s.0[4] = crate::opcode::fctype::CONNECT;
        s.0[40..42].copy_from_slice(&self.recfmt.to_le_bytes());
        s.0[42..44].copy_from_slice(&self.qid.to_le_bytes());
        s.0[44..46].copy_from_slice(&self.sqsize.to_le_bytes());
        s.0[46] = self.cattr;
        s.0[48..52].copy_from_slice(&self.kato_ms.to_le_bytes());
    }
}

/// The Connect command's data.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnectData {
    /// Host identifier (128-bit).
    pub hostid: [u8; 16],
    /// Requested controller id (0xFFFF for the dynamic model on the admin queue).
    pub cntlid: u16,
    /// Subsystem NQN.
    pub subnqn: String,
    /// Host NQN.
    pub hostnqn: String,
}

/// Why Connect data could not be decoded; the offset is reported to the host as IPO.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid connect data field at offset {offset}")]
pub struct ConnectDataError {
    /// Byte offset of the bad field in the Connect data.
    pub offset: u16,
}

/// Reads the NUL-terminated NQN field at `off`; it may be empty (see [`ConnectData::decode`]).
fn nqn_field(data: &[u8], off: usize) -> Result<String, ConnectDataError> {
    let err = ConnectDataError { offset: off as u16 };
    let raw: [u8; NQN_FIELD_LEN] = array_at(data, off).ok_or(err)?;
    // The NQN is NUL terminated; a field without a terminator or with non-UTF-8 is malformed.
    let end = raw.iter().position(|&b| b == 0).ok_or(err)?;
    let s = std::str::from_utf8(raw.get(..end).ok_or(err)?).map_err(|_| err)?;
    Ok(s.to_owned())
}

impl ConnectData {
    /// Decodes the 1024-byte Connect data.
    ///
    /// Both NQN fields must be NUL terminated within their 256 bytes and UTF-8. SUBNQN must not
    /// be empty (there is nothing to connect to). HOSTNQN may be: SPDK's `spdk_nvme_perf` sends
    /// an all-zero HOSTNQN unless its transport ID names one (`probe_cb` copies an empty
    /// `trid_entry->hostnqn` over the default), and the Linux and SPDK targets accept it. Whether
    /// an empty host NQN may connect is the subsystem's access decision, not a format error.
    pub fn decode(data: &[u8]) -> Result<ConnectData, ConnectDataError> {
        if data.len() < CONNECT_DATA_LEN {
            return Err(ConnectDataError { offset: 0 });
        }
        let subnqn = nqn_field(data, CONNECT_OFF_SUBNQN)?;
        if subnqn.is_empty() {
            return Err(ConnectDataError { offset: CONNECT_OFF_SUBNQN as u16 });
        }
        Ok(ConnectData {
            hostid: array_at(data, CONNECT_OFF_HOSTID).ok_or(ConnectDataError { offset: 0 })?,
            cntlid: u16_at(data, CONNECT_OFF_CNTLID).ok_or(ConnectDataError { offset: 16 })?,
            subnqn,
            hostnqn: nqn_field(data, CONNECT_OFF_HOSTNQN)?,
        })
    }

    /// Encodes the data (host side and tests).
    pub fn encode(&self) -> Vec<u8> {
        let mut w = crate::reader::PageWriter::new(CONNECT_DATA_LEN);
        w.put(CONNECT_OFF_HOSTID, &self.hostid);
        w.u16(CONNECT_OFF_CNTLID, self.cntlid);
        w.str_padded(CONNECT_OFF_SUBNQN, NQN_FIELD_LEN - 1, &self.subnqn, 0);
        w.str_padded(CONNECT_OFF_HOSTNQN, NQN_FIELD_LEN - 1, &self.hostnqn, 0);
        w.into_vec()
    }
}

/// Controller property offsets.
pub mod prop {
    /// Controller Capabilities (8 bytes).
    pub const CAP: u32 = 0x00;
    /// Version (4 bytes).
    pub const VS: u32 = 0x08;
    /// Controller Configuration (4 bytes).
    pub const CC: u32 = 0x14;
    /// Controller Status (4 bytes).
    pub const CSTS: u32 = 0x1C;
    /// NVM Subsystem Reset (4 bytes).
    pub const NSSR: u32 = 0x20;
}

/// A Property Get or Set command.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PropertyCmd {
    /// True for an 8-byte property access (ATTRIB bits 2:0 = 1).
    pub eight_bytes: bool,
    /// Property offset.
    pub offset: u32,
    /// Value to set (Property Set only).
    pub value: u64,
}

impl PropertyCmd {
    /// Reads the Property Get/Set fields out of an SQE.
    pub fn from_sqe(s: &Sqe) -> PropertyCmd {
        PropertyCmd { eight_bytes: s.0[40] & 0x7 == 1, offset: u32_at(&s.0, 44).unwrap_or(0), value: u64_at(&s.0, 48).unwrap_or(0) }
    }

    /// Writes the fields into an SQE of the given fabrics type (host side).
    pub fn write_to(&self, s: &mut Sqe, fctype: u8) {
        s.0[4] = fctype;
        s.0[40] = u8::from(self.eight_bytes);
        s.0[44..48].copy_from_slice(&self.offset.to_le_bytes());
        s.0[48..56].copy_from_slice(&self.value.to_le_bytes());
    }
}

/// CC fields.
pub mod cc {
    /// Enable.
    pub const EN: u32 = 1 << 0;
    /// Shutdown notification field shift (bits 15:14).
    pub const SHN_SHIFT: u32 = 14;
    /// Shutdown notification mask (after shifting).
    pub const SHN_MASK: u32 = 0x3;
}

/// CSTS fields.
pub mod csts {
    /// Ready.
    pub const RDY: u32 = 1 << 0;
    /// Controller fatal status.
    pub const CFS: u32 = 1 << 1;
    /// Shutdown status "shutdown processing complete" (SHST = 10b, bits 3:2).
    pub const SHST_COMPLETE: u32 = 0b10 << 2;
}

/// Builds the CAP property.
pub fn cap_value(mqes: u16, timeout_500ms: u8) -> u64 {
    let css_nvm: u64 = 1 << 37;
    let cqr: u64 = 1 << 16;
    u64::from(mqes) | cqr | (u64::from(timeout_500ms) << 24) | css_nvm
}

/// Encodes a version as the VS property: major in bits 31:16, minor 15:8, tertiary 7:0.
pub const fn version(major: u16, minor: u8, tertiary: u8) -> u32 {
    ((major as u32) << 16) | ((minor as u32) << 8) | tertiary as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_data_round_trip_and_errors() {
        let d = ConnectData {
            hostid: [7; 16],
            cntlid: CNTLID_DYNAMIC,
            subnqn: "nqn.2026-11.io.tessera:a".into(),
            hostnqn: "nqn.2014-08.org.nvmexpress:uuid:x".into(),
        };
        let enc = d.encode();
        assert_eq!(ConnectData::decode(&enc), Ok(d));
        assert_eq!(ConnectData::decode(&enc[..1000]), Err(ConnectDataError { offset: 0 }));
        let mut no_nul = enc.clone();
        no_nul[256..512].fill(b'a');
        assert_eq!(ConnectData::decode(&no_nul), Err(ConnectDataError { offset: 256 }));
        let mut no_host_nul = enc.clone();
        no_host_nul[512..768].fill(b'h');
        assert_eq!(ConnectData::decode(&no_host_nul), Err(ConnectDataError { offset: 512 }));
        let mut bad_utf8 = enc.clone();
        bad_utf8[512] = 0xff;
        assert_eq!(ConnectData::decode(&bad_utf8), Err(ConnectDataError { offset: 512 }));
        let mut empty_sub = enc.clone();
        empty_sub[256] = 0;
        assert_eq!(ConnectData::decode(&empty_sub), Err(ConnectDataError { offset: 256 }));
        // An empty HOSTNQN (what spdk_nvme_perf sends without `hostnqn:`) decodes.
        let mut empty_host = enc;
        empty_host[512..768].fill(0);
        let d = ConnectData::decode(&empty_host).unwrap();
        assert_eq!(d.hostnqn, "");
        assert_eq!(ConnectData::decode(&d.encode()), Ok(d));
    }

    #[test]
    fn connect_sqe_round_trip() {
        let c = ConnectCmd { recfmt: 0, qid: 3, sqsize: 127, cattr: CATTR_DISABLE_SQFLOW, kato_ms: 5000 };
        let mut s = Sqe::new(crate::opcode::FABRICS, 1);
        c.write_to(&mut s);
        assert_eq!(ConnectCmd::from_sqe(&s), c);
        assert_eq!(s.fctype(), crate::opcode::fctype::CONNECT);
    }

    #[test]
    fn cap_layout() {
        let cap = cap_value(127, 20);
        assert_eq!(cap & 0xffff, 127);
        assert_eq!((cap >> 24) & 0xff, 20);
        assert_eq!((cap >> 37) & 1, 1);
        assert_eq!(version(1, 3, 0), 0x0001_0300);
    }
}
