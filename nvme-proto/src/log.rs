//! Byte layouts of the log pages Tessera serves: Error Information (01h), SMART / Health (02h),
//! Firmware Slot (03h), Changed Namespace List (04h), Asymmetric Namespace Access (0Ch) and the
//! Discovery Log (70h).

use crate::reader::PageWriter;

/// Size of one Error Information log entry.
pub const ERROR_ENTRY_LEN: usize = 64;
/// Size of the SMART / Health log.
pub const SMART_LEN: usize = 512;
/// Size of the Firmware Slot log.
pub const FIRMWARE_LEN: usize = 512;
/// Size of the Changed Namespace List log.
pub const CHANGED_NS_LEN: usize = 4096;
/// Size of the Discovery Log header.
pub const DISCOVERY_HEADER_LEN: usize = 1024;
/// Size of one Discovery Log entry.
pub const DISCOVERY_ENTRY_LEN: usize = 1024;

/// One Error Information log entry.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ErrorEntry {
    /// Unique, increasing error count (never 0 for a valid entry).
    pub error_count: u64,
    pub sqid: u16,
    pub cid: u16,
    /// CQE status field (with phase bit 0).
    pub status_field: u16,
    /// Byte and bit of the parameter in error (0xFFFF if not applicable).
    pub param_error_location: u16,
    pub lba: u64,
    pub nsid: u32,
}

impl ErrorEntry {
    /// Appends the 64-byte entry.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        let mut w = PageWriter::new(ERROR_ENTRY_LEN);
        w.u64(0, self.error_count);
        w.u16(8, self.sqid);
        w.u16(10, self.cid);
        w.u16(12, self.status_field);
        w.u16(14, self.param_error_location);
        w.u64(16, self.lba);
        w.u32(24, self.nsid);
        out.extend_from_slice(&w.into_vec());
    }
}

/// SMART / Health counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SmartInfo {
    /// Bytes read by the host.
    pub bytes_read: u64,
    /// Bytes written by the host.
    pub bytes_written: u64,
    pub host_read_commands: u64,
    pub host_write_commands: u64,
    /// Minutes spent busy with I/O.
    pub busy_minutes: u64,
    pub power_on_hours: u64,
    pub power_cycles: u64,
    pub unsafe_shutdowns: u64,
    pub media_errors: u64,
    pub error_log_entries: u64,
}

/// Converts bytes to SMART data units: thousands of 512-byte units, rounded up.
pub fn data_units(bytes: u64) -> u128 {
    let units = u128::from(bytes).div_ceil(512);
    units.div_ceil(1000)
}

/// Builds the SMART / Health log page.
pub fn smart(s: &SmartInfo) -> Vec<u8> {
    let mut w = PageWriter::new(SMART_LEN);
    // Critical warning 0; composite temperature unreported (0); available spare 100 %.
    w.u8(3, 100);
    w.u8(4, 10);
    w.u128(32, data_units(s.bytes_read));
    w.u128(48, data_units(s.bytes_written));
    w.u128(64, u128::from(s.host_read_commands));
    w.u128(80, u128::from(s.host_write_commands));
    w.u128(96, u128::from(s.busy_minutes));
    w.u128(112, u128::from(s.power_cycles));
    w.u128(128, u128::from(s.power_on_hours));
    w.u128(144, u128::from(s.unsafe_shutdowns));
    w.u128(160, u128::from(s.media_errors));
    w.u128(176, u128::from(s.error_log_entries));
    w.into_vec()
}

/// Builds the Firmware Slot log: slot 1 active, holding `revision`.
pub fn firmware_slot(revision: &str) -> Vec<u8> {
    let mut w = PageWriter::new(FIRMWARE_LEN);
    w.u8(0, 1);
    w.str_padded(8, 8, revision, b' ');
    w.into_vec()
}

/// Builds the Changed Namespace List: up to 1024 NSIDs, or FFFFFFFFh first if more changed.
pub fn changed_namespaces(nsids: &[u32]) -> Vec<u8> {
    let mut w = PageWriter::new(CHANGED_NS_LEN);
    if nsids.len() > CHANGED_NS_LEN / 4 {
        w.u32(0, u32::MAX);
    } else {
        for (i, id) in nsids.iter().enumerate() {
            w.u32(i * 4, *id);
        }
    }
    w.into_vec()
}

/// Asymmetric access states of an ANA group on one path (NVMe Base 2.0, 8.20.3).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AnaState {
    /// The preferred path: full performance.
    Optimized,
    /// Serves every command, less well (another path is preferred).
    NonOptimized,
    /// Serves no I/O for now (ANA Inaccessible status).
    Inaccessible,
    /// Will never serve the namespaces again.
    PersistentLoss,
    /// Changing state (ANA Transition status; at most ANATT seconds).
    Change,
}

impl AnaState {
    /// The state's code in the log page (bits 3:0 of the descriptor's state byte).
    pub const fn code(self) -> u8 {
        match self {
            AnaState::Optimized => 0x1,
            AnaState::NonOptimized => 0x2,
            AnaState::Inaccessible => 0x3,
            AnaState::PersistentLoss => 0x4,
            AnaState::Change => 0xF,
        }
    }
}

/// One ANA group descriptor: its id, change count, state on this path and namespaces.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AnaGroup {
    pub id: u32,
    pub change_count: u64,
    pub state: AnaState,
    pub nsids: Vec<u32>,
}

/// ANA log offsets: the 16-byte header, then descriptors (32 bytes and 4 per NSID each).
pub mod ana_off {
    pub const CHANGE_COUNT: usize = 0;
    pub const NUM_DESCRIPTORS: usize = 8;
    pub const HEADER_LEN: usize = 16;
    pub const DESC_GRPID: usize = 0;
    pub const DESC_NNSID: usize = 4;
    pub const DESC_CHANGE_COUNT: usize = 8;
    pub const DESC_STATE: usize = 16;
    pub const DESC_LEN: usize = 32;
}

/// Builds the Asymmetric Namespace Access log: `groups` in order, without their NSID lists when
/// `groups_only` (RGO).
pub fn ana(change_count: u64, groups: &[AnaGroup], groups_only: bool) -> Vec<u8> {
    use ana_off::*;
    let len = HEADER_LEN + groups.iter().map(|g| DESC_LEN + if groups_only { 0 } else { 4 * g.nsids.len() }).sum::<usize>();
    let mut w = PageWriter::new(len);
    w.u64(CHANGE_COUNT, change_count);
    w.u16(NUM_DESCRIPTORS, u16::try_from(groups.len()).unwrap_or(u16::MAX));
    let mut at = HEADER_LEN;
    for g in groups {
        let nsids: &[u32] = if groups_only { &[] } else { &g.nsids };
        w.u32(at + DESC_GRPID, g.id);
        w.u32(at + DESC_NNSID, u32::try_from(nsids.len()).unwrap_or(u32::MAX));
        w.u64(at + DESC_CHANGE_COUNT, g.change_count);
        w.u8(at + DESC_STATE, g.state.code());
        at += DESC_LEN;
        for id in nsids {
            w.u32(at, *id);
            at += 4;
        }
    }
    w.into_vec()
}

/// Transport types.
pub const TRTYPE_TCP: u8 = 3;
/// Address families.
pub mod adrfam {
    pub const IPV4: u8 = 1;
    pub const IPV6: u8 = 2;
}
/// Subsystem types in a discovery log entry.
pub mod subtype {
    pub const DISCOVERY: u8 = 1;
    pub const NVME: u8 = 2;
    pub const CURRENT_DISCOVERY: u8 = 3;
}

/// One Discovery Log entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiscoveryEntry {
    pub adrfam: u8,
    pub subtype: u8,
    pub portid: u16,
    /// Admin max submission queue size.
    pub asqsz: u16,
    pub trsvcid: String,
    pub subnqn: String,
    pub traddr: String,
}

/// Discovery Log entry offsets.
pub mod disc_off {
    pub const TRTYPE: usize = 0;
    pub const ADRFAM: usize = 1;
    pub const SUBTYPE: usize = 2;
    pub const TREQ: usize = 3;
    pub const PORTID: usize = 4;
    pub const CNTLID: usize = 6;
    pub const ASQSZ: usize = 8;
    pub const EFLAGS: usize = 10;
    pub const TRSVCID: usize = 32;
    pub const SUBNQN: usize = 256;
    pub const TRADDR: usize = 512;
    pub const TSAS: usize = 768;
}

impl DiscoveryEntry {
    /// Appends the 1024-byte entry.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        use disc_off::*;
        let mut w = PageWriter::new(DISCOVERY_ENTRY_LEN);
        w.u8(TRTYPE, TRTYPE_TCP);
        w.u8(ADRFAM, self.adrfam);
        w.u8(SUBTYPE, self.subtype);
        // TREQ: secure channel not specified (00b); SQ flow control disable supported (bit 2).
        w.u8(TREQ, 1 << 2);
        w.u16(PORTID, self.portid);
        // Dynamic controller model.
        w.u16(CNTLID, 0xFFFF);
        w.u16(ASQSZ, self.asqsz);
        w.u16(EFLAGS, 0);
        w.str_padded(TRSVCID, 32, &self.trsvcid, b' ');
        w.str_padded(SUBNQN, 256, &self.subnqn, 0);
        w.str_padded(TRADDR, 256, &self.traddr, b' ');
        // TSAS for TCP: SECTYPE (byte 0) = 0, no security.
        w.u8(TSAS, 0);
        out.extend_from_slice(&w.into_vec());
    }
}

/// Builds the whole Discovery Log (header plus entries); the caller returns the requested window.
pub fn discovery(genctr: u64, entries: &[DiscoveryEntry]) -> Vec<u8> {
    let mut w = PageWriter::new(DISCOVERY_HEADER_LEN);
    w.u64(0, genctr);
    w.u64(8, entries.len() as u64);
    w.u16(16, 0);
    let mut out = w.into_vec();
    for e in entries {
        e.encode_into(&mut out);
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn ana_log_layout() {
        use crate::reader::{u16_at, u32_at, u64_at};
        let groups = [
            AnaGroup { id: 1, change_count: 3, state: AnaState::Optimized, nsids: vec![1, 2] },
            AnaGroup { id: 2, change_count: 4, state: AnaState::Change, nsids: vec![] },
        ];
        let page = ana(7, &groups, false);
        assert_eq!(page.len(), 16 + 32 + 8 + 32);
        assert_eq!((u64_at(&page, 0), u16_at(&page, 8)), (Some(7), Some(2)));
        assert_eq!((u32_at(&page, 16), u32_at(&page, 20), u64_at(&page, 24), page[32]), (Some(1), Some(2), Some(3), 0x1));
        assert_eq!((u32_at(&page, 48), u32_at(&page, 52)), (Some(1), Some(2)), "the NSIDs follow their descriptor");
        assert_eq!((u32_at(&page, 56), page[56 + 16]), (Some(2), 0xF));
        let rgo = ana(7, &groups, true);
        assert_eq!(rgo.len(), 16 + 64);
        assert_eq!((u32_at(&rgo, 20), u32_at(&rgo, 48)), (Some(0), Some(2)), "groups only: no NSIDs");
        let codes: Vec<u8> =
            [AnaState::Optimized, AnaState::NonOptimized, AnaState::Inaccessible, AnaState::PersistentLoss, AnaState::Change]
                .map(AnaState::code)
                .into();
        assert_eq!(codes, [1, 2, 3, 4, 0xF]);
    }

    use super::*;
    use crate::reader::{u16_at, u64_at};

    #[test]
    fn data_units_round_up() {
        assert_eq!(data_units(0), 0);
        assert_eq!(data_units(1), 1);
        assert_eq!(data_units(512_000), 1);
        assert_eq!(data_units(512_001), 2);
    }

    #[test]
    fn discovery_layout() {
        let e = DiscoveryEntry {
            adrfam: adrfam::IPV4,
            subtype: subtype::NVME,
            portid: 1,
            asqsz: 32,
            trsvcid: "4420".into(),
            subnqn: "nqn.a".into(),
            traddr: "127.0.0.1".into(),
        };
        let log = discovery(7, &[e.clone(), e]);
        assert_eq!(log.len(), 1024 * 3);
        assert_eq!(u64_at(&log, 0), Some(7));
        assert_eq!(u64_at(&log, 8), Some(2));
        let first = &log[1024..2048];
        assert_eq!(first[0], TRTYPE_TCP);
        assert_eq!(first[disc_off::TREQ] & 0x3, 0);
        assert_eq!(u16_at(first, disc_off::ASQSZ), Some(32));
        assert_eq!(&first[32..40], b"4420    ");
        assert_eq!(&first[512..523], b"127.0.0.1  ");
        assert_eq!(first[disc_off::TSAS], 0);
    }

    #[test]
    fn smart_counters() {
        let p = smart(&SmartInfo { bytes_written: 1_024_000, host_write_commands: 3, ..Default::default() });
        assert_eq!(p[48], 2);
        assert_eq!(p[80], 3);
    }
}
