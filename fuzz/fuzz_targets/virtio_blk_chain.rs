//! Fuzzes the virtio-blk descriptor chain reader (`tessera_vhost_blk::request::parse`): a guest
//! controls every descriptor and the header.
//!
//! Properties checked: parsing never panics; an accepted request stays within the limits, its
//! segments lie inside the chain's descriptors and add up to its data length, and its status byte
//! is the last byte of the last descriptor.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tessera_vhost_blk::request::{parse, status_addr, Desc, Limits, HEADER_LEN};

fuzz_target!(|data: &[u8]| {
    let Some((header, rest)) = data.split_first_chunk::<{ HEADER_LEN as usize }>() else { return };
    // 13 bytes per descriptor: addr u64, len u32, flags u8.
    let descs: Vec<Desc> = rest
        .chunks_exact(13)
        .map(|c| Desc {
            addr: u64::from_le_bytes(c[0..8].try_into().unwrap()),
            len: u32::from_le_bytes(c[8..12].try_into().unwrap()),
            write_only: c[12] & 1 == 1,
        })
        .collect();
    let limits = Limits::default();
    let Ok(r) = parse(&descs, header, &limits) else { return };
    assert!(r.data.len() as u32 <= limits.seg_max);
    assert_eq!(r.data.iter().map(|s| u64::from(s.len)).sum::<u64>(), r.data_len);
    assert_eq!(Some(r.status_addr), status_addr(&descs));
    for s in &r.data {
        assert!(s.len > 0 && s.len <= limits.size_max);
        let inside = descs.iter().any(|d| s.addr >= d.addr && s.addr + u64::from(s.len) <= d.addr.saturating_add(u64::from(d.len)));
        assert!(inside, "segment {s:?} outside every descriptor");
    }
});
