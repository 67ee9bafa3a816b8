//! Fuzzes the Fabrics Connect data decoder (`ConnectData::decode`).
//!
//! Properties checked: decoding never panics, and whatever decodes encodes to 1024 bytes that
//! decode to an equal value.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tessera_nvme_proto::fabrics::{ConnectData, CONNECT_DATA_LEN};

fuzz_target!(|data: &[u8]| {
    let Ok(cd) = ConnectData::decode(data) else {
        return;
    };
    let enc = cd.encode();
    assert_eq!(enc.len(), CONNECT_DATA_LEN);
    assert_eq!(ConnectData::decode(&enc).as_ref(), Ok(&cd), "Connect data did not round trip");
});
