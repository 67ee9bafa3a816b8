//! NVMe/TCP PDU framing (NVMe/TCP Transport Specification 1.0, section 3.6).
//!
//! Every PDU starts with an 8-byte common header, then a PDU-specific header (together `hlen`
//! bytes), an optional header digest (CRC32C of the header), optional padding up to `pdo`, data,
//! and an optional data digest (CRC32C of the data). [`decode`] takes bytes from a receive buffer
//! and returns one complete, validated PDU, `None` if more bytes are needed, or a [`PduError`]
//! that carries the Fatal Error Status/Information for a termination request. Encoders append to a
//! `BytesMut`; data PDUs can be encoded as a header plus a separately sent payload so that read
//! data is never copied into the frame.
//!
//! Byte layouts (offsets from the start of the PDU, all little endian):
//!
//! | PDU | hlen | fields after the common header |
//! |---|---|---|
//! | ICReq (0x00) | 128 | 8 PFV u16, 10 HPDA u8, 11 DGST u8, 12 MAXR2T u32 |
//! | ICResp (0x01) | 128 | 8 PFV u16, 10 CPDA u8, 11 DGST u8, 12 MAXH2CDATA u32 |
//! | H2C/C2HTermReq (0x02/0x03) | 24 | 8 FES u16, 10 FEI u32; data: the offending PDU header |
//! | CapsuleCmd (0x04) | 72 | 8 SQE (64 bytes); data: in-capsule data |
//! | CapsuleResp (0x05) | 24 | 8 CQE (16 bytes) |
//! | H2CData (0x06) | 24 | 8 CCCID u16, 10 TTAG u16, 12 DATAO u32, 16 DATAL u32 |
//! | C2HData (0x07) | 24 | 8 CCCID u16, 12 DATAO u32, 16 DATAL u32 |
//! | R2T (0x09) | 24 | 8 CCCID u16, 10 TTAG u16, 12 R2TO u32, 16 R2TL u32 |

use bytes::{BufMut, Bytes, BytesMut};

use crate::cqe::{Cqe, CQE_LEN};
use crate::reader::{u16_at, u32_at, u8_at};
use crate::sqe::{Sqe, SQE_LEN};

/// Length of the common header.
pub const CH_LEN: usize = 8;
/// Offset of the PDU type in the common header.
pub const CH_OFF_TYPE: u32 = 0;
/// Offset of the flags in the common header.
pub const CH_OFF_FLAGS: u32 = 1;
/// Offset of HLEN in the common header.
pub const CH_OFF_HLEN: u32 = 2;
/// Offset of PDO in the common header.
pub const CH_OFF_PDO: u32 = 3;
/// Offset of PLEN in the common header.
pub const CH_OFF_PLEN: u32 = 4;
/// Length of a digest.
pub const DIGEST_LEN: usize = 4;
/// Header length of ICReq and ICResp, which are also their total length.
pub const IC_LEN: usize = 128;
/// Header length of CapsuleCmd.
pub const CAPSULE_CMD_HLEN: usize = CH_LEN + SQE_LEN;
/// Header length of CapsuleResp.
pub const CAPSULE_RESP_HLEN: usize = CH_LEN + CQE_LEN;
/// Header length of data PDUs, R2T and termination requests.
pub const SHORT_HLEN: usize = 24;
/// Longest termination request: header plus the largest PDU header it may quote.
pub const TERM_REQ_MAX_LEN: usize = SHORT_HLEN + IC_LEN;

/// PDU types.
pub mod pdu_type {
    pub const IC_REQ: u8 = 0x00;
    pub const IC_RESP: u8 = 0x01;
    pub const H2C_TERM_REQ: u8 = 0x02;
    pub const C2H_TERM_REQ: u8 = 0x03;
    pub const CAPSULE_CMD: u8 = 0x04;
    pub const CAPSULE_RESP: u8 = 0x05;
    pub const H2C_DATA: u8 = 0x06;
    pub const C2H_DATA: u8 = 0x07;
    pub const R2T: u8 = 0x09;
}

/// Common header flags.
pub mod flags {
    /// A header digest follows the header.
    pub const HDGSTF: u8 = 1 << 0;
    /// A data digest follows the data.
    pub const DDGSTF: u8 = 1 << 1;
    /// Last data PDU of a transfer (H2CData, C2HData).
    pub const LAST_PDU: u8 = 1 << 2;
    /// C2HData: the command completed successfully and no CapsuleResp follows.
    pub const SUCCESS: u8 = 1 << 3;
}

/// Fatal Error Status values of a termination request.
pub mod fes {
    pub const INVALID_HEADER_FIELD: u16 = 0x01;
    pub const PDU_SEQUENCE_ERROR: u16 = 0x02;
    pub const HEADER_DIGEST_ERROR: u16 = 0x03;
    pub const DATA_OUT_OF_RANGE: u16 = 0x04;
    pub const DATA_LIMIT_EXCEEDED: u16 = 0x05;
    pub const UNSUPPORTED_PARAMETER: u16 = 0x06;
}

/// Which digests are in force on a connection (negotiated by ICReq/ICResp).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Digests {
    /// Header digest (HDGST).
    pub header: bool,
    /// Data digest (DDGST).
    pub data: bool,
}

impl Digests {
    fn from_byte(b: u8) -> Digests {
        Digests { header: b & 1 != 0, data: b & 2 != 0 }
    }

    fn to_byte(self) -> u8 {
        u8::from(self.header) | (u8::from(self.data) << 1)
    }
}

/// Upper bounds the receiver enforces on peer-controlled lengths before buffering a PDU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PduLimits {
    /// Largest in-capsule data accepted in a CapsuleCmd.
    pub max_capsule_data: u32,
    /// Largest data accepted in one H2CData or C2HData PDU.
    pub max_data_pdu: u32,
}

/// Initialize Connection Request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IcReq {
    /// PDU format version (0).
    pub pfv: u16,
    /// Host PDU data alignment (0's based dwords).
    pub hpda: u8,
    /// Digests the host asks for.
    pub digests: Digests,
    /// Maximum outstanding R2Ts per command, 0's based.
    pub maxr2t: u32,
}

/// Initialize Connection Response.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IcResp {
    /// PDU format version (0).
    pub pfv: u16,
    /// Controller PDU data alignment (0's based dwords).
    pub cpda: u8,
    /// Digests enabled.
    pub digests: Digests,
    /// Maximum data in one H2CData PDU, bytes.
    pub maxh2cdata: u32,
}

/// H2C or C2H termination request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TermReq {
    /// Fatal error status.
    pub fes: u16,
    /// Fatal error information (for an invalid header field: its byte offset).
    pub fei: u32,
    /// The header of the PDU that caused the error (at most 128 bytes).
    pub data: Bytes,
}

/// An H2CData or C2HData PDU.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DataPdu {
    /// Command capsule CID the data belongs to.
    pub cccid: u16,
    /// Transfer tag from the R2T (H2CData only; 0 in C2HData).
    pub ttag: u16,
    /// Offset of this data within the command's transfer.
    pub datao: u32,
    /// The data.
    pub data: Bytes,
    /// LAST_PDU flag.
    pub last: bool,
    /// SUCCESS flag (C2HData only).
    pub success: bool,
}

/// Ready to Transfer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct R2t {
    /// Command capsule CID.
    pub cccid: u16,
    /// Transfer tag the host echoes in H2CData.
    pub ttag: u16,
    /// Offset of the requested data.
    pub r2to: u32,
    /// Length of the requested data.
    pub r2tl: u32,
}

/// One decoded PDU.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Pdu {
    /// ICReq.
    IcReq(IcReq),
    /// ICResp.
    IcResp(IcResp),
    /// H2CTermReq.
    H2cTermReq(TermReq),
    /// C2HTermReq.
    C2hTermReq(TermReq),
    /// Command capsule with optional in-capsule data.
    CapsuleCmd {
        /// The submission queue entry.
        sqe: Sqe,
        /// In-capsule data (empty if none).
        data: Bytes,
    },
    /// Response capsule.
    CapsuleResp(Cqe),
    /// Host to controller data.
    H2cData(DataPdu),
    /// Controller to host data.
    C2hData(DataPdu),
    /// Ready to transfer.
    R2t(R2t),
}

/// What was wrong with a received PDU, as a termination request reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PduErrorKind {
    /// A header field is invalid; the value is its byte offset in the PDU.
    #[error("invalid PDU header field at offset {0}")]
    InvalidHeaderField(u32),
    /// The PDU is valid on its own but not allowed at this point of the exchange.
    #[error("PDU sequence error")]
    SequenceError,
    /// The header digest does not match.
    #[error("header digest mismatch")]
    HeaderDigest,
    /// The data digest does not match.
    #[error("data digest mismatch")]
    DataDigest,
    /// Data offset/length outside what the command or R2T allows.
    #[error("data transfer out of range")]
    DataOutOfRange,
    /// More data in one PDU than the negotiated limit.
    #[error("data transfer limit exceeded")]
    DataLimitExceeded,
    /// A parameter value this implementation does not support; the value is its byte offset.
    #[error("unsupported parameter at offset {0}")]
    UnsupportedParameter(u32),
}

/// A fatal transport error: what went wrong and the header of the offending PDU.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{kind}{}", reason.as_deref().map(|r| format!(": {r}")).unwrap_or_default())]
pub struct PduError {
    /// The error.
    pub kind: PduErrorKind,
    /// Header of the offending PDU (at most 128 bytes), quoted in the termination request.
    pub header: Bytes,
    /// Why, in words, for the log (the termination request carries only FES and FEI).
    pub reason: Option<String>,
}

impl PduError {
    /// An error quoting `header` (truncated to 128 bytes).
    pub fn new(kind: PduErrorKind, header: &[u8]) -> PduError {
        let n = header.len().min(IC_LEN);
        PduError { kind, header: Bytes::copy_from_slice(header.get(..n).unwrap_or_default()), reason: None }
    }

    /// The same error with an explanation for the log.
    pub fn with_reason(mut self, reason: impl Into<String>) -> PduError {
        self.reason = Some(reason.into());
        self
    }

    /// Fatal Error Status for the termination request.
    pub fn fes(&self) -> u16 {
        match self.kind {
            PduErrorKind::InvalidHeaderField(_) => fes::INVALID_HEADER_FIELD,
            PduErrorKind::SequenceError => fes::PDU_SEQUENCE_ERROR,
            PduErrorKind::HeaderDigest => fes::HEADER_DIGEST_ERROR,
            // The transport specification has no FES for a data digest error; the PDU's data
            // cannot be trusted, which for the PLEN-described payload is an invalid header field.
            PduErrorKind::DataDigest => fes::INVALID_HEADER_FIELD,
            PduErrorKind::DataOutOfRange => fes::DATA_OUT_OF_RANGE,
            PduErrorKind::DataLimitExceeded => fes::DATA_LIMIT_EXCEEDED,
            PduErrorKind::UnsupportedParameter(_) => fes::UNSUPPORTED_PARAMETER,
        }
    }

    /// Fatal Error Information for the termination request.
    pub fn fei(&self) -> u32 {
        match self.kind {
            PduErrorKind::InvalidHeaderField(off) | PduErrorKind::UnsupportedParameter(off) => off,
            PduErrorKind::DataDigest => CH_OFF_PLEN,
            _ => 0,
        }
    }

    /// The termination request that reports this error.
    pub fn term_req(&self) -> TermReq {
        TermReq { fes: self.fes(), fei: self.fei(), data: self.header.clone() }
    }
}

/// The fixed header length of a PDU type, or `None` for an unknown type.
pub fn expected_hlen(pdu_type: u8) -> Option<usize> {
    use pdu_type::*;
    match pdu_type {
        IC_REQ | IC_RESP => Some(IC_LEN),
        H2C_TERM_REQ | C2H_TERM_REQ | CAPSULE_RESP | H2C_DATA | C2H_DATA | R2T => Some(SHORT_HLEN),
        CAPSULE_CMD => Some(CAPSULE_CMD_HLEN),
        _ => None,
    }
}

/// Whether PDUs of this type carry a header digest when header digests are enabled.
fn has_header_digest(pdu_type: u8) -> bool {
    use pdu_type::*;
    !matches!(pdu_type, IC_REQ | IC_RESP | H2C_TERM_REQ | C2H_TERM_REQ)
}

/// Whether PDUs of this type carry a data digest when data digests are enabled and data is present.
fn has_data_digest(pdu_type: u8) -> bool {
    use pdu_type::*;
    matches!(pdu_type, CAPSULE_CMD | H2C_DATA | C2H_DATA)
}

/// CRC32C of `data` as transmitted (little endian).
pub fn digest(data: &[u8]) -> [u8; DIGEST_LEN] {
    crc32c::crc32c(data).to_le_bytes()
}

/// The layout of a PDU computed from its common header.
#[derive(Clone, Copy, Debug)]
struct Frame {
    pdu_type: u8,
    flags: u8,
    hlen: usize,
    plen: usize,
    hdgst: usize,
    data_off: usize,
    data_len: usize,
    ddgst: usize,
}

fn check_common_header(ch: &[u8], digests: Digests, limits: &PduLimits) -> Result<Frame, PduErrorKind> {
    use PduErrorKind::InvalidHeaderField as Bad;
    let pdu_type = u8_at(ch, 0).ok_or(Bad(CH_OFF_TYPE))?;
    let flags_b = u8_at(ch, 1).ok_or(Bad(CH_OFF_FLAGS))?;
    let hlen = usize::from(u8_at(ch, 2).ok_or(Bad(CH_OFF_HLEN))?);
    let pdo = usize::from(u8_at(ch, 3).ok_or(Bad(CH_OFF_PDO))?);
    let plen = u32_at(ch, 4).ok_or(Bad(CH_OFF_PLEN))? as usize;

    let want_hlen = expected_hlen(pdu_type).ok_or(Bad(CH_OFF_TYPE))?;
    if hlen != want_hlen {
        return Err(Bad(CH_OFF_HLEN));
    }
    let hdgst_on = digests.header && has_header_digest(pdu_type);
    if (flags_b & flags::HDGSTF != 0) != hdgst_on {
        return Err(Bad(CH_OFF_FLAGS));
    }
    let hdgst = if hdgst_on { DIGEST_LEN } else { 0 };
    let header_end = hlen + hdgst;
    if plen < header_end {
        return Err(Bad(CH_OFF_PLEN));
    }

    let max_data = match pdu_type {
        pdu_type::CAPSULE_CMD => limits.max_capsule_data as usize,
        pdu_type::H2C_DATA | pdu_type::C2H_DATA => limits.max_data_pdu as usize,
        pdu_type::H2C_TERM_REQ | pdu_type::C2H_TERM_REQ => TERM_REQ_MAX_LEN - SHORT_HLEN,
        _ => 0,
    };

    if plen == header_end {
        // No data: DDGSTF must be clear and PDO is meaningless (senders write 0 or the header end).
        if flags_b & flags::DDGSTF != 0 {
            return Err(Bad(CH_OFF_FLAGS));
        }
        return Ok(Frame { pdu_type, flags: flags_b, hlen, plen, hdgst, data_off: plen, data_len: 0, ddgst: 0 });
    }

    if max_data == 0 {
        // This PDU type never carries data.
        return Err(Bad(CH_OFF_PLEN));
    }
    let is_term = matches!(pdu_type, pdu_type::H2C_TERM_REQ | pdu_type::C2H_TERM_REQ);
    let data_off = if is_term { hlen } else { pdo };
    // CPDA is 0 (no padding), so data starts right after the header digest.
    if !is_term && pdo != header_end {
        return Err(Bad(CH_OFF_PDO));
    }
    let ddgst_on = digests.data && has_data_digest(pdu_type);
    if !is_term && (flags_b & flags::DDGSTF != 0) != ddgst_on {
        return Err(Bad(CH_OFF_FLAGS));
    }
    let ddgst = if ddgst_on { DIGEST_LEN } else { 0 };
    let data_len = plen.checked_sub(data_off + ddgst).ok_or(Bad(CH_OFF_PLEN))?;
    if data_len == 0 {
        return Err(Bad(CH_OFF_PLEN));
    }
    if data_len > max_data {
        return Err(if matches!(pdu_type, pdu_type::H2C_DATA | pdu_type::C2H_DATA) {
            PduErrorKind::DataLimitExceeded
        } else {
            Bad(CH_OFF_PLEN)
        });
    }
    Ok(Frame { pdu_type, flags: flags_b, hlen, plen, hdgst, data_off, data_len, ddgst })
}

/// Decodes one PDU from the front of `buf`.
///
/// Returns `Ok(None)` when `buf` does not yet hold a whole PDU (nothing is consumed), `Ok(Some)`
/// with the PDU removed from `buf`, or an error for a PDU that violates the framing rules. All
/// lengths are checked against `limits` from the common header alone, before any payload is
/// buffered, so a peer cannot make the receiver hold more than one bounded PDU.
pub fn decode(buf: &mut BytesMut, digests: Digests, limits: &PduLimits) -> Result<Option<Pdu>, PduError> {
    let Some(ch) = buf.get(..CH_LEN) else {
        return Ok(None);
    };
    let frame = check_common_header(ch, digests, limits).map_err(|k| PduError::new(k, ch))?;
    if buf.len() < frame.plen {
        return Ok(None);
    }
    let pdu = buf.split_to(frame.plen).freeze();
    decode_frame(&pdu, &frame).map(Some)
}

fn slice(b: &Bytes, start: usize, len: usize) -> Bytes {
    if start.checked_add(len).is_some_and(|end| end <= b.len()) {
        b.slice(start..start + len)
    } else {
        Bytes::new()
    }
}

fn decode_frame(pdu: &Bytes, f: &Frame) -> Result<Pdu, PduError> {
    let header = pdu.get(..f.hlen).unwrap_or_default();
    let err = |k| PduError::new(k, header);
    if f.hdgst != 0 {
        let got = pdu.get(f.hlen..f.hlen + DIGEST_LEN).unwrap_or_default();
        if got != digest(header) {
            return Err(err(PduErrorKind::HeaderDigest));
        }
    }
    let data = slice(pdu, f.data_off, f.data_len);
    if f.ddgst != 0 {
        let at = f.data_off + f.data_len;
        let got = pdu.get(at..at + DIGEST_LEN).unwrap_or_default();
        if got != digest(&data) {
            return Err(err(PduErrorKind::DataDigest));
        }
    }
    let bad = |off: u32| err(PduErrorKind::InvalidHeaderField(off));
    let u16f = |off: usize| u16_at(header, off).ok_or_else(|| bad(off as u32));
    let u32f = |off: usize| u32_at(header, off).ok_or_else(|| bad(off as u32));
    let pdu = match f.pdu_type {
        pdu_type::IC_REQ => Pdu::IcReq(IcReq {
            pfv: u16f(8)?,
            hpda: u8_at(header, 10).unwrap_or(0),
            digests: Digests::from_byte(u8_at(header, 11).unwrap_or(0)),
            maxr2t: u32f(12)?,
        }),
        pdu_type::IC_RESP => Pdu::IcResp(IcResp {
            pfv: u16f(8)?,
            cpda: u8_at(header, 10).unwrap_or(0),
            digests: Digests::from_byte(u8_at(header, 11).unwrap_or(0)),
            maxh2cdata: u32f(12)?,
        }),
        pdu_type::H2C_TERM_REQ | pdu_type::C2H_TERM_REQ => {
            let t = TermReq { fes: u16f(8)?, fei: u32f(10)?, data };
            if f.pdu_type == pdu_type::H2C_TERM_REQ {
                Pdu::H2cTermReq(t)
            } else {
                Pdu::C2hTermReq(t)
            }
        }
        pdu_type::CAPSULE_CMD => {
            let sqe = header.get(CH_LEN..).and_then(Sqe::from_slice).ok_or_else(|| bad(CH_LEN as u32))?;
            Pdu::CapsuleCmd { sqe, data }
        }
        pdu_type::CAPSULE_RESP => {
            let cqe = header.get(CH_LEN..).and_then(Cqe::from_slice).ok_or_else(|| bad(CH_LEN as u32))?;
            Pdu::CapsuleResp(cqe)
        }
        pdu_type::H2C_DATA | pdu_type::C2H_DATA => {
            let datal = u32f(16)?;
            if datal as usize != f.data_len {
                return Err(bad(16));
            }
            let d = DataPdu {
                cccid: u16f(8)?,
                ttag: if f.pdu_type == pdu_type::H2C_DATA { u16f(10)? } else { 0 },
                datao: u32f(12)?,
                data,
                last: f.flags & flags::LAST_PDU != 0,
                success: f.flags & flags::SUCCESS != 0,
            };
            if f.pdu_type == pdu_type::H2C_DATA {
                if d.success {
                    return Err(bad(CH_OFF_FLAGS));
                }
                Pdu::H2cData(d)
            } else {
                if d.success && !d.last {
                    return Err(bad(CH_OFF_FLAGS));
                }
                Pdu::C2hData(d)
            }
        }
        pdu_type::R2T => Pdu::R2t(R2t { cccid: u16f(8)?, ttag: u16f(10)?, r2to: u32f(12)?, r2tl: u32f(16)? }),
        _ => return Err(bad(CH_OFF_TYPE)),
    };
    Ok(pdu)
}

/// Appends a PDU header (common header, PDU-specific fields, header digest) for a PDU carrying
/// `data_len` bytes of data. The caller appends the data and, if `data_digest` is returned true,
/// the data digest ([`digest`]) after it.
fn put_header(out: &mut BytesMut, pdu_type: u8, extra_flags: u8, specific: &[u8], data_len: usize, digests: Digests) -> bool {
    let hlen = CH_LEN + specific.len();
    let hdgst = digests.header && has_header_digest(pdu_type);
    let ddgst = digests.data && has_data_digest(pdu_type) && data_len > 0;
    let header_end = hlen + if hdgst { DIGEST_LEN } else { 0 };
    let plen = header_end + data_len + if ddgst { DIGEST_LEN } else { 0 };
    let is_term = matches!(pdu_type, pdu_type::H2C_TERM_REQ | pdu_type::C2H_TERM_REQ);
    let pdo = if data_len > 0 && !is_term { header_end } else { 0 };
    let mut f = extra_flags;
    if hdgst {
        f |= flags::HDGSTF;
    }
    if ddgst {
        f |= flags::DDGSTF;
    }
    let start = out.len();
    out.reserve(header_end);
    out.put_u8(pdu_type);
    out.put_u8(f);
    out.put_u8(hlen as u8);
    out.put_u8(pdo as u8);
    out.put_u32_le(plen as u32);
    out.put_slice(specific);
    if hdgst {
        let d = digest(out.get(start..start + hlen).unwrap_or_default());
        out.put_slice(&d);
    }
    ddgst
}

fn data_specific(cccid: u16, ttag: u16, datao: u32, datal: u32) -> [u8; 16] {
    let mut s = [0u8; 16];
    s[0..2].copy_from_slice(&cccid.to_le_bytes());
    s[2..4].copy_from_slice(&ttag.to_le_bytes());
    s[4..8].copy_from_slice(&datao.to_le_bytes());
    s[8..12].copy_from_slice(&datal.to_le_bytes());
    s
}

/// Appends the header of a C2HData PDU whose `data_len` bytes of data the caller sends next.
/// Returns whether a data digest must follow the data.
pub fn put_c2h_data_header(out: &mut BytesMut, cccid: u16, datao: u32, data_len: u32, last: bool, success: bool, digests: Digests) -> bool {
    let mut f = 0;
    if last {
        f |= flags::LAST_PDU;
    }
    if success {
        f |= flags::SUCCESS;
    }
    put_header(out, pdu_type::C2H_DATA, f, &data_specific(cccid, 0, datao, data_len), data_len as usize, digests)
}

impl Pdu {
    /// Appends the encoded PDU, data and digests included, to `out`.
    pub fn encode(&self, digests: Digests, out: &mut BytesMut) {
        let mut spec = [0u8; IC_LEN - CH_LEN];
        let (t, f, n, data): (u8, u8, usize, &[u8]) = match self {
            Pdu::IcReq(r) => {
                spec[0..2].copy_from_slice(&r.pfv.to_le_bytes());
                spec[2] = r.hpda;
                spec[3] = r.digests.to_byte();
                spec[4..8].copy_from_slice(&r.maxr2t.to_le_bytes());
                (pdu_type::IC_REQ, 0, IC_LEN - CH_LEN, &[])
            }
            Pdu::IcResp(r) => {
                spec[0..2].copy_from_slice(&r.pfv.to_le_bytes());
                spec[2] = r.cpda;
                spec[3] = r.digests.to_byte();
                spec[4..8].copy_from_slice(&r.maxh2cdata.to_le_bytes());
                (pdu_type::IC_RESP, 0, IC_LEN - CH_LEN, &[])
            }
            Pdu::H2cTermReq(t) | Pdu::C2hTermReq(t) => {
                spec[0..2].copy_from_slice(&t.fes.to_le_bytes());
                spec[2..6].copy_from_slice(&t.fei.to_le_bytes());
                let ty = if matches!(self, Pdu::H2cTermReq(_)) { pdu_type::H2C_TERM_REQ } else { pdu_type::C2H_TERM_REQ };
                let quoted = t.data.get(..t.data.len().min(IC_LEN)).unwrap_or_default();
                (ty, 0, SHORT_HLEN - CH_LEN, quoted)
            }
            Pdu::CapsuleCmd { sqe, data } => {
                spec[..SQE_LEN].copy_from_slice(&sqe.0);
                (pdu_type::CAPSULE_CMD, 0, SQE_LEN, data.as_ref())
            }
            Pdu::CapsuleResp(c) => {
                spec[..CQE_LEN].copy_from_slice(&c.to_bytes());
                (pdu_type::CAPSULE_RESP, 0, CQE_LEN, &[])
            }
            Pdu::H2cData(d) | Pdu::C2hData(d) => {
                spec[..16].copy_from_slice(&data_specific(d.cccid, d.ttag, d.datao, d.data.len() as u32));
                let mut fl = if d.last { flags::LAST_PDU } else { 0 };
                let ty = if matches!(self, Pdu::H2cData(_)) {
                    pdu_type::H2C_DATA
                } else {
                    if d.success {
                        fl |= flags::SUCCESS;
                    }
                    pdu_type::C2H_DATA
                };
                (ty, fl, SHORT_HLEN - CH_LEN, d.data.as_ref())
            }
            Pdu::R2t(r) => {
                spec[0..2].copy_from_slice(&r.cccid.to_le_bytes());
                spec[2..4].copy_from_slice(&r.ttag.to_le_bytes());
                spec[4..8].copy_from_slice(&r.r2to.to_le_bytes());
                spec[8..12].copy_from_slice(&r.r2tl.to_le_bytes());
                (pdu_type::R2T, 0, SHORT_HLEN - CH_LEN, &[])
            }
        };
        let ddgst = put_header(out, t, f, spec.get(..n).unwrap_or_default(), data.len(), digests);
        out.put_slice(data);
        if ddgst {
            out.put_slice(&digest(data));
        }
    }

    /// The PDU encoded into a fresh buffer.
    pub fn to_bytes(&self, digests: Digests) -> BytesMut {
        let mut b = BytesMut::new();
        self.encode(digests, &mut b);
        b
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::Status;
    use proptest::prelude::*;

    const LIMITS: PduLimits = PduLimits { max_capsule_data: 8192, max_data_pdu: 131072 };
    const BOTH: Digests = Digests { header: true, data: true };
    const NONE: Digests = Digests { header: false, data: false };

    fn round_trip(p: &Pdu, d: Digests) {
        let mut b = p.to_bytes(d);
        let total = b.len();
        // Every strict prefix is incomplete, never an error.
        for cut in 0..total {
            let mut part = BytesMut::from(&b[..cut]);
            assert_eq!(decode(&mut part, d, &LIMITS), Ok(None), "prefix {cut} of {p:?}");
        }
        assert_eq!(decode(&mut b, d, &LIMITS), Ok(Some(p.clone())));
        assert!(b.is_empty());
    }

    fn samples() -> Vec<Pdu> {
        let mut sqe = Sqe::new(0x01, 9);
        sqe.set_nsid(1);
        vec![
            Pdu::IcReq(IcReq { pfv: 0, hpda: 0, digests: BOTH, maxr2t: 0 }),
            Pdu::IcResp(IcResp { pfv: 0, cpda: 0, digests: NONE, maxh2cdata: 131072 }),
            Pdu::CapsuleCmd { sqe, data: Bytes::new() },
            Pdu::CapsuleCmd { sqe, data: Bytes::from(vec![0xab; 4096]) },
            Pdu::CapsuleResp(Cqe::new(9, Status::LBA_OUT_OF_RANGE)),
            Pdu::H2cData(DataPdu { cccid: 9, ttag: 3, datao: 4096, data: Bytes::from(vec![1; 512]), last: true, success: false }),
            Pdu::C2hData(DataPdu { cccid: 9, ttag: 0, datao: 0, data: Bytes::from(vec![2; 100]), last: true, success: true }),
            Pdu::R2t(R2t { cccid: 9, ttag: 3, r2to: 0, r2tl: 65536 }),
            Pdu::C2hTermReq(TermReq { fes: fes::INVALID_HEADER_FIELD, fei: 2, data: Bytes::from(vec![4; 24]) }),
            Pdu::H2cTermReq(TermReq { fes: fes::PDU_SEQUENCE_ERROR, fei: 0, data: Bytes::new() }),
        ]
    }

    #[test]
    fn every_pdu_round_trips_with_and_without_digests() {
        for p in samples() {
            for d in [NONE, BOTH, Digests { header: true, data: false }, Digests { header: false, data: true }] {
                round_trip(&p, d);
            }
        }
    }

    fn decode_err(bytes: &[u8], d: Digests) -> PduErrorKind {
        let mut b = BytesMut::from(bytes);
        match decode(&mut b, d, &LIMITS) {
            Err(e) => e.kind,
            other => panic!("expected an error, got {other:?}"),
        }
    }

    #[test]
    fn unknown_type_and_bad_hlen_are_invalid_header_fields() {
        let mut b = Pdu::CapsuleResp(Cqe::new(1, Status::SUCCESS)).to_bytes(NONE).to_vec();
        b[0] = 0x08;
        assert_eq!(decode_err(&b, NONE), PduErrorKind::InvalidHeaderField(0));
        b[0] = 0x7f;
        assert_eq!(decode_err(&b, NONE), PduErrorKind::InvalidHeaderField(0));
        b[0] = pdu_type::CAPSULE_RESP;
        b[2] = 23;
        assert_eq!(decode_err(&b, NONE), PduErrorKind::InvalidHeaderField(2));
    }

    #[test]
    fn plen_shorter_than_header_is_rejected() {
        let mut b = Pdu::CapsuleResp(Cqe::new(1, Status::SUCCESS)).to_bytes(NONE).to_vec();
        b[4..8].copy_from_slice(&10u32.to_le_bytes());
        assert_eq!(decode_err(&b, NONE), PduErrorKind::InvalidHeaderField(4));
    }

    #[test]
    fn oversized_capsule_data_is_rejected_before_buffering() {
        let mut sqe_pdu = Pdu::CapsuleCmd { sqe: Sqe::new(1, 1), data: Bytes::from(vec![0; 16]) }.to_bytes(NONE).to_vec();
        sqe_pdu[4..8].copy_from_slice(&(72 + 8193u32).to_le_bytes());
        // Only the common header is present: the limit is enforced from it alone.
        assert_eq!(decode_err(&sqe_pdu[..8], NONE), PduErrorKind::InvalidHeaderField(4));
        let mut h2c = Pdu::H2cData(DataPdu { cccid: 1, ttag: 1, datao: 0, data: Bytes::from(vec![0; 4]), last: true, success: false })
            .to_bytes(NONE)
            .to_vec();
        h2c[4..8].copy_from_slice(&(24 + 131073u32).to_le_bytes());
        assert_eq!(decode_err(&h2c[..8], NONE), PduErrorKind::DataLimitExceeded);
    }

    #[test]
    fn digest_errors_are_detected() {
        let p = Pdu::CapsuleCmd { sqe: Sqe::new(1, 1), data: Bytes::from(vec![5; 64]) };
        let good = p.to_bytes(BOTH).to_vec();
        let mut bad_h = good.clone();
        bad_h[10] ^= 1; // inside the SQE
        assert_eq!(decode_err(&bad_h, BOTH), PduErrorKind::HeaderDigest);
        let mut bad_d = good.clone();
        let n = bad_d.len();
        bad_d[n - 10] ^= 1; // inside the data
        assert_eq!(decode_err(&bad_d, BOTH), PduErrorKind::DataDigest);
        // Digest flags must match what was negotiated.
        assert_eq!(decode_err(&good, NONE), PduErrorKind::InvalidHeaderField(1));
    }

    #[test]
    fn data_pdu_length_fields_must_agree() {
        let p = Pdu::H2cData(DataPdu { cccid: 1, ttag: 1, datao: 0, data: Bytes::from(vec![0; 8]), last: true, success: false });
        let mut b = p.to_bytes(NONE).to_vec();
        b[16..20].copy_from_slice(&9u32.to_le_bytes());
        assert_eq!(decode_err(&b, NONE), PduErrorKind::InvalidHeaderField(16));
        let mut b = p.to_bytes(NONE).to_vec();
        b[3] = 30; // PDO not at header end
        assert_eq!(decode_err(&b, NONE), PduErrorKind::InvalidHeaderField(3));
    }

    #[test]
    fn pdu_without_data_may_not_claim_some() {
        let mut b = Pdu::R2t(R2t { cccid: 1, ttag: 1, r2to: 0, r2tl: 1 }).to_bytes(NONE).to_vec();
        b[4..8].copy_from_slice(&28u32.to_le_bytes());
        b.extend_from_slice(&[0; 4]);
        assert_eq!(decode_err(&b, NONE), PduErrorKind::InvalidHeaderField(4));
    }

    #[test]
    fn term_req_error_codes() {
        let e = PduError::new(PduErrorKind::InvalidHeaderField(3), &[1, 2, 3]);
        assert_eq!(e.to_string(), "invalid PDU header field at offset 3");
        assert_eq!(e.clone().with_reason("PDO 30").to_string(), "invalid PDU header field at offset 3: PDO 30");
        let t = e.term_req();
        assert_eq!((t.fes, t.fei, t.data.as_ref()), (1, 3, &[1u8, 2, 3][..]));
        assert_eq!(PduError::new(PduErrorKind::HeaderDigest, &[]).fes(), 3);
        assert_eq!(PduError::new(PduErrorKind::DataLimitExceeded, &[]).fes(), 5);
    }

    proptest! {
        #[test]
        fn decoder_never_panics_and_consumes_only_whole_pdus(bytes in proptest::collection::vec(any::<u8>(), 0..600), hd in any::<bool>(), dd in any::<bool>()) {
            let d = Digests { header: hd, data: dd };
            let mut b = BytesMut::from(&bytes[..]);
            let before = b.len();
            match decode(&mut b, d, &LIMITS) {
                Ok(None) => prop_assert_eq!(b.len(), before),
                Ok(Some(p)) => {
                    // What decodes re-encodes to a PDU that decodes to the same value.
                    let mut re = p.to_bytes(d);
                    prop_assert_eq!(decode(&mut re, d, &LIMITS), Ok(Some(p)));
                }
                Err(e) => prop_assert!(e.header.len() <= IC_LEN),
            }
        }

        #[test]
        fn data_pdus_round_trip(cccid in any::<u16>(), ttag in any::<u16>(), datao in any::<u32>(), len in 1usize..2048, last in any::<bool>(), hd in any::<bool>(), dd in any::<bool>()) {
            let d = Digests { header: hd, data: dd };
            let p = Pdu::H2cData(DataPdu { cccid, ttag, datao, data: Bytes::from(vec![7u8; len]), last, success: false });
            let mut b = p.to_bytes(d);
            prop_assert_eq!(decode(&mut b, d, &LIMITS), Ok(Some(p)));
        }
    }
}
