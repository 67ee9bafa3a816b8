//! CRC64 (NVMe polynomial) checksums, one per 4 KiB chunk of a value.

use crate::BLOCK;

static CRC64: crc::Crc<u64, crc::Table<16>> = crc::Crc::<u64, crc::Table<16>>::new(&crc::CRC_64_NVME);

/// CRC64/NVME of `data`.
pub fn crc64(data: &[u8]) -> u64 {
    CRC64.checksum(data)
}

/// One CRC64 per 4 KiB chunk of `data` (the last chunk may be short).
pub fn chunk_csums(data: &[u8]) -> Vec<u64> {
    data.chunks(BLOCK as usize).map(crc64).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nvme_check_value() {
        // The CRC-64/NVME check value from the catalogue of parametrised CRCs.
        assert_eq!(crc64(b"123456789"), 0xae8b_1486_0a79_9888);
        assert_eq!(chunk_csums(&[0u8; 5000]).len(), 2);
    }
}
