//! virtio-blk requests: the bounded, panic-free reading of one descriptor chain into a typed
//! request, free of I/O (the backend reads the guest memory the descriptors point at).
//!
//! A request is a chain of descriptors (virtio 1.2, 5.2.6): first the device-readable header
//! (`type u32, reserved u32, sector u64`, little endian, [`HEADER_LEN`] bytes), then the data —
//! device-readable for writes, discard and write-zeroes ranges, device-writable for reads and the
//! device id — and last one device-writable status byte. The header must sit whole in the first
//! descriptor and the status byte ends the last one (what Linux, QEMU and Cloud Hypervisor send);
//! anything else is refused, and only that request fails.

use thiserror::Error;

/// Bytes of the request header.
pub const HEADER_LEN: u32 = 16;
/// A virtio-blk sector: 512 bytes, whatever the device's block size.
pub const SECTOR: u64 = 512;
/// Bytes of one discard / write-zeroes range (`sector u64, num_sectors u32, flags u32`).
pub const RANGE_LEN: u32 = 16;
/// Bytes of the device id (`VIRTIO_BLK_T_GET_ID`).
pub const ID_LEN: u32 = 20;

/// Request types (virtio 1.2, 5.2.6).
pub mod req_type {
    pub const IN: u32 = 0;
    pub const OUT: u32 = 1;
    pub const FLUSH: u32 = 4;
    pub const GET_ID: u32 = 8;
    pub const DISCARD: u32 = 11;
    pub const WRITE_ZEROES: u32 = 13;
}

/// Status byte values.
pub mod status {
    pub const OK: u8 = 0;
    pub const IOERR: u8 = 1;
    pub const UNSUPP: u8 = 2;
}

/// Flag of a write-zeroes range: the device may deallocate.
pub const WRITE_ZEROES_UNMAP: u32 = 1;

/// One descriptor of a chain, as the backend found it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Desc {
    /// Guest-physical address.
    pub addr: u64,
    /// Length in bytes.
    pub len: u32,
    /// Device-writable (else device-readable).
    pub write_only: bool,
}

/// A piece of guest memory the request's data moves through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// Guest-physical address.
    pub addr: u64,
    /// Length in bytes.
    pub len: u32,
}

/// What a request asks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Read into the data segments.
    Read,
    /// Write the data segments.
    Write,
    /// Make completed writes durable.
    Flush,
    /// Write the device id into the data segments.
    GetId,
    /// Deallocate the ranges in the data segments.
    Discard,
    /// Zero the ranges in the data segments.
    WriteZeroes,
}

/// One request of a chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// What it asks.
    pub kind: Kind,
    /// First 512-byte sector (reads and writes).
    pub sector: u64,
    /// The data segments, in order.
    pub data: Vec<Segment>,
    /// Total bytes of the data segments.
    pub data_len: u64,
    /// Where the status byte goes.
    pub status_addr: u64,
}

/// Limits a chain is checked against (what the device advertises).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Most data segments (`seg_max`).
    pub seg_max: u32,
    /// Most bytes in one data segment (`size_max`).
    pub size_max: u32,
    /// Most bytes of data in one read or write.
    pub max_io: u64,
    /// Most discard / write-zeroes ranges in one request.
    pub max_ranges: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { seg_max: 128, size_max: 1 << 20, max_io: 4 << 20, max_ranges: 1 }
    }
}

/// Why a chain is refused. The status byte gets [`status::IOERR`] (or [`status::UNSUPP`] for an
/// unknown type) when there is a writable status byte to put it in; otherwise the chain is
/// returned to the guest unanswered-as-used with length 0.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ChainError {
    /// Fewer than two descriptors, or no writable status byte at the end.
    #[error("no status byte: the chain must end with a device-writable descriptor")]
    NoStatus,
    /// The first descriptor is not a readable header of at least 16 bytes.
    #[error("the first descriptor must hold the whole {HEADER_LEN}-byte header, device-readable")]
    BadHeader,
    /// A data descriptor has the wrong direction for the request type.
    #[error("data descriptor {index} has the wrong direction for request type {kind}")]
    Direction { index: usize, kind: u32 },
    /// Too many data segments, one too long, or too much data.
    #[error("the chain exceeds the device's limits: {0}")]
    TooLarge(&'static str),
    /// A segment is empty or wraps the address space.
    #[error("descriptor {0} is empty or wraps the address space")]
    BadSegment(usize),
    /// The data of a request type that carries a fixed amount is the wrong size.
    #[error("request type {kind} carries {len} bytes of data")]
    BadLength { kind: u32, len: u64 },
    /// The request type is not supported.
    #[error("unsupported request type {0}")]
    Unsupported(u32),
}

impl ChainError {
    /// The status byte for it.
    pub fn status(&self) -> u8 {
        match self {
            ChainError::Unsupported(_) => status::UNSUPP,
            _ => status::IOERR,
        }
    }
}

/// The request type and sector of a header's 16 bytes.
pub fn header_fields(h: &[u8; HEADER_LEN as usize]) -> (u32, u64) {
    let t = u32::from_le_bytes([h[0], h[1], h[2], h[3]]);
    let s = u64::from_le_bytes([h[8], h[9], h[10], h[11], h[12], h[13], h[14], h[15]]);
    (t, s)
}

/// The address of the status byte of a chain, if it has one (where to say it failed).
pub fn status_addr(descs: &[Desc]) -> Option<u64> {
    let last = descs.last()?;
    (descs.len() >= 2 && last.write_only && last.len >= 1).then(|| last.addr.checked_add(u64::from(last.len) - 1)).flatten()
}

/// Reads a chain whose header (read from the first descriptor) is `header` into a request,
/// checking every descriptor against `limits` before anything is executed.
pub fn parse(descs: &[Desc], header: &[u8; HEADER_LEN as usize], limits: &Limits) -> Result<Request, ChainError> {
    let status_addr = status_addr(descs).ok_or(ChainError::NoStatus)?;
    let first = descs[0];
    if first.write_only || first.len < HEADER_LEN {
        return Err(ChainError::BadHeader);
    }
    let (t, sector) = header_fields(header);
    let (kind, writable) = match t {
        req_type::IN => (Kind::Read, true),
        req_type::OUT => (Kind::Write, false),
        req_type::FLUSH => (Kind::Flush, false),
        req_type::GET_ID => (Kind::GetId, true),
        req_type::DISCARD => (Kind::Discard, false),
        req_type::WRITE_ZEROES => (Kind::WriteZeroes, false),
        other => return Err(ChainError::Unsupported(other)),
    };
    let mut data = Vec::new();
    let mut data_len = 0u64;
    // The header's descriptor may carry data after the header (a merged layout): refused.
    if first.len > HEADER_LEN {
        return Err(ChainError::BadHeader);
    }
    let last = descs.len() - 1;
    // The status descriptor may carry data before the status byte only for device-writable data.
    let status_desc = descs[last];
    let mut middle: Vec<(usize, Desc)> = descs[1..last].iter().copied().enumerate().map(|(i, d)| (i + 1, d)).collect();
    if status_desc.len > 1 {
        if !writable {
            return Err(ChainError::Direction { index: last, kind: t });
        }
        middle.push((last, Desc { addr: status_desc.addr, len: status_desc.len - 1, write_only: true }));
    }
    for (index, d) in middle {
        if d.write_only != writable {
            return Err(ChainError::Direction { index, kind: t });
        }
        if d.len == 0 || d.addr.checked_add(u64::from(d.len)).is_none() {
            return Err(ChainError::BadSegment(index));
        }
        if d.len > limits.size_max {
            return Err(ChainError::TooLarge("a segment is longer than size_max"));
        }
        if data.len() as u32 >= limits.seg_max {
            return Err(ChainError::TooLarge("more segments than seg_max"));
        }
        data_len += u64::from(d.len);
        data.push(Segment { addr: d.addr, len: d.len });
    }
    match kind {
        Kind::Read | Kind::Write if data_len > limits.max_io => return Err(ChainError::TooLarge("more data than one I/O may move")),
        Kind::Flush if data_len != 0 => return Err(ChainError::BadLength { kind: t, len: data_len }),
        Kind::GetId if data_len < u64::from(ID_LEN) => return Err(ChainError::BadLength { kind: t, len: data_len }),
        Kind::Discard | Kind::WriteZeroes => {
            if data_len == 0 || !data_len.is_multiple_of(u64::from(RANGE_LEN)) {
                return Err(ChainError::BadLength { kind: t, len: data_len });
            }
            if data_len / u64::from(RANGE_LEN) > u64::from(limits.max_ranges) {
                return Err(ChainError::TooLarge("more ranges than max_discard_seg / max_write_zeroes_seg"));
            }
        }
        _ => {}
    }
    Ok(Request { kind, sector, data, data_len, status_addr })
}

/// One discard / write-zeroes range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Range {
    /// First 512-byte sector.
    pub sector: u64,
    /// Sectors.
    pub sectors: u32,
    /// Flags ([`WRITE_ZEROES_UNMAP`]).
    pub flags: u32,
}

/// The ranges in the bytes of a discard / write-zeroes request's data (a whole number of
/// [`RANGE_LEN`]-byte entries; a trailing partial entry is ignored).
pub fn ranges(bytes: &[u8]) -> Vec<Range> {
    bytes
        .chunks_exact(RANGE_LEN as usize)
        .map(|c| Range {
            sector: u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]),
            sectors: u32::from_le_bytes([c[8], c[9], c[10], c[11]]),
            flags: u32::from_le_bytes([c[12], c[13], c[14], c[15]]),
        })
        .collect()
}

/// The blocks `(lba, count)` of `bytes` bytes at 512-byte sector `sector` on a device of
/// `blocks` blocks of `block_size` bytes: `None` if they are not whole blocks or run past the end.
pub fn to_blocks(sector: u64, bytes: u64, block_size: u32, blocks: u64) -> Option<(u64, u64)> {
    let bs = u64::from(block_size);
    let start = sector.checked_mul(SECTOR)?;
    if !start.is_multiple_of(bs) || !bytes.is_multiple_of(bs) {
        return None;
    }
    let (lba, count) = (start / bs, bytes / bs);
    (lba.checked_add(count)? <= blocks).then_some((lba, count))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn header(t: u32, sector: u64) -> [u8; 16] {
        let mut h = [0u8; 16];
        h[..4].copy_from_slice(&t.to_le_bytes());
        h[8..].copy_from_slice(&sector.to_le_bytes());
        h
    }

    fn d(addr: u64, len: u32, write_only: bool) -> Desc {
        Desc { addr, len, write_only }
    }

    #[test]
    fn reads_writes_and_flushes_as_linux_sends_them() {
        let l = Limits::default();
        let read = parse(&[d(0x1000, 16, false), d(0x2000, 4096, true), d(0x3000, 4096, true), d(0x4000, 1, true)], &header(0, 8), &l);
        assert_eq!(
            read,
            Ok(Request {
                kind: Kind::Read,
                sector: 8,
                data: vec![Segment { addr: 0x2000, len: 4096 }, Segment { addr: 0x3000, len: 4096 }],
                data_len: 8192,
                status_addr: 0x4000
            })
        );
        let write = parse(&[d(0x1000, 16, false), d(0x2000, 512, false), d(0x4000, 1, true)], &header(1, 3), &l).unwrap();
        assert_eq!((write.kind, write.sector, write.data_len), (Kind::Write, 3, 512));
        let flush = parse(&[d(0x1000, 16, false), d(0x4000, 1, true)], &header(4, 0), &l).unwrap();
        assert_eq!((flush.kind, flush.data_len), (Kind::Flush, 0));
        let id = parse(&[d(0x1000, 16, false), d(0x2000, 20, true), d(0x4000, 1, true)], &header(8, 0), &l).unwrap();
        assert_eq!(id.kind, Kind::GetId);
        // A status descriptor longer than one byte: the bytes before the status are read data.
        let merged = parse(&[d(0x1000, 16, false), d(0x2000, 4097, true)], &header(0, 0), &l).unwrap();
        assert_eq!((merged.data, merged.status_addr), (vec![Segment { addr: 0x2000, len: 4096 }], 0x3000));
    }

    #[test]
    fn bad_chains_are_refused_with_the_right_status() {
        let l = Limits::default();
        let h = header(1, 0);
        // No status byte.
        assert_eq!(parse(&[d(0x1000, 16, false), d(0x2000, 512, false)], &h, &l), Err(ChainError::NoStatus));
        assert_eq!(status_addr(&[d(0x1000, 16, false)]), None);
        // A header that is short, writable, or shares its descriptor with data.
        assert_eq!(parse(&[d(0x1000, 8, false), d(0x4000, 1, true)], &h, &l), Err(ChainError::BadHeader));
        assert_eq!(parse(&[d(0x1000, 16, true), d(0x4000, 1, true)], &h, &l), Err(ChainError::BadHeader));
        assert_eq!(parse(&[d(0x1000, 528, false), d(0x4000, 1, true)], &h, &l), Err(ChainError::BadHeader));
        // Writable data for a write, readable data for a read.
        let e = parse(&[d(0x1000, 16, false), d(0x2000, 512, true), d(0x4000, 1, true)], &h, &l).unwrap_err();
        assert_eq!((e.clone(), e.status()), (ChainError::Direction { index: 1, kind: 1 }, status::IOERR));
        assert!(parse(&[d(0x1000, 16, false), d(0x2000, 512, false), d(0x4000, 1, true)], &header(0, 0), &l).is_err());
        // Limits.
        let many: Vec<Desc> = std::iter::once(d(0x1000, 16, false))
            .chain((0..129).map(|i| d(0x10000 + i * 512, 512, false)))
            .chain(std::iter::once(d(0x4000, 1, true)))
            .collect();
        assert!(matches!(parse(&many, &h, &l), Err(ChainError::TooLarge(_))));
        assert!(matches!(
            parse(&[d(0x1000, 16, false), d(0x2000, 2 << 20, false), d(0x4000, 1, true)], &h, &l),
            Err(ChainError::TooLarge(_))
        ));
        // Wrapping and empty segments.
        assert_eq!(
            parse(&[d(0x1000, 16, false), d(u64::MAX - 10, 512, false), d(0x4000, 1, true)], &h, &l),
            Err(ChainError::BadSegment(1))
        );
        assert_eq!(parse(&[d(0x1000, 16, false), d(0x2000, 0, false), d(0x4000, 1, true)], &h, &l), Err(ChainError::BadSegment(1)));
        // Unknown types say UNSUPP; a flush with data, a short id, a partial range are errors.
        let e = parse(&[d(0x1000, 16, false), d(0x4000, 1, true)], &header(99, 0), &l).unwrap_err();
        assert_eq!(e.status(), status::UNSUPP);
        assert!(parse(&[d(0x1000, 16, false), d(0x2000, 512, false), d(0x4000, 1, true)], &header(4, 0), &l).is_err());
        assert!(parse(&[d(0x1000, 16, false), d(0x2000, 8, true), d(0x4000, 1, true)], &header(8, 0), &l).is_err());
        assert!(parse(&[d(0x1000, 16, false), d(0x2000, 20, false), d(0x4000, 1, true)], &header(11, 0), &l).is_err());
        assert!(parse(&[d(0x1000, 16, false), d(0x2000, 32, false), d(0x4000, 1, true)], &header(13, 0), &l).is_err());
        assert!(parse(&[d(0x1000, 16, false), d(0x2000, 16, false), d(0x4000, 1, true)], &header(13, 0), &l).is_ok());
    }

    #[test]
    fn ranges_and_blocks() {
        let mut b = Vec::new();
        b.extend_from_slice(&16u64.to_le_bytes());
        b.extend_from_slice(&8u32.to_le_bytes());
        b.extend_from_slice(&1u32.to_le_bytes());
        assert_eq!(ranges(&b), vec![Range { sector: 16, sectors: 8, flags: WRITE_ZEROES_UNMAP }]);
        assert_eq!(to_blocks(16, 4096, 4096, 10), Some((2, 1)));
        assert_eq!(to_blocks(1, 4096, 4096, 10), None);
        assert_eq!(to_blocks(0, 512, 4096, 10), None);
        assert_eq!(to_blocks(72, 8192, 4096, 10), None);
        assert_eq!(to_blocks(u64::MAX, 512, 512, u64::MAX), None);
    }

    proptest! {
        /// Any chain is either refused or a request whose segments lie within its descriptors,
        /// within the limits; nothing panics.
        #[test]
        fn any_chain_is_refused_or_within_limits(
            descs in proptest::collection::vec((any::<u64>(), 0..(3u32 << 20), any::<bool>()), 0..140),
            t in prop_oneof![Just(0u32), Just(1), Just(4), Just(8), Just(11), Just(13), any::<u32>()],
            sector in any::<u64>(),
        ) {
            let descs: Vec<Desc> = descs.into_iter().map(|(addr, len, w)| Desc { addr, len, write_only: w }).collect();
            let l = Limits::default();
            if let Ok(r) = parse(&descs, &header(t, sector), &l) {
                prop_assert!(r.data.len() as u32 <= l.seg_max);
                prop_assert!(r.data.iter().all(|s| s.len > 0 && s.len <= l.size_max && s.addr.checked_add(u64::from(s.len)).is_some()));
                prop_assert_eq!(r.data.iter().map(|s| u64::from(s.len)).sum::<u64>(), r.data_len);
                prop_assert_eq!(Some(r.status_addr), status_addr(&descs));
            }
        }
    }
}
