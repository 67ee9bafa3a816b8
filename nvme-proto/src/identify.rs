//! Byte layouts of the Identify data structures (NVMe Base 2.0, section 5.17.2) that Tessera
//! returns: Identify Controller (CNS 01h), Identify Namespace (CNS 00h), the active namespace list
//! (CNS 02h), the namespace identification descriptor list (CNS 03h) and the NVM command set
//! specific Identify Controller (CNS 06h). Builders take plain values and produce 4096-byte pages.

use crate::reader::PageWriter;

/// Size of every Identify data structure.
pub const IDENTIFY_LEN: usize = 4096;

/// Identify Controller offsets.
pub mod ctrl_off {
    pub const VID: usize = 0;
    pub const SSVID: usize = 2;
    pub const SN: usize = 4;
    pub const MN: usize = 24;
    pub const FR: usize = 64;
    pub const RAB: usize = 72;
    pub const IEEE: usize = 73;
    pub const CMIC: usize = 76;
    pub const MDTS: usize = 77;
    pub const CNTLID: usize = 78;
    pub const VER: usize = 80;
    pub const OAES: usize = 92;
    pub const CTRATT: usize = 96;
    pub const CNTRLTYPE: usize = 111;
    pub const OACS: usize = 256;
    pub const ACL: usize = 258;
    pub const AERL: usize = 259;
    pub const FRMW: usize = 260;
    pub const LPA: usize = 261;
    pub const ELPE: usize = 262;
    pub const KAS: usize = 320;
    pub const ANATT: usize = 343;
    pub const ANACAP: usize = 344;
    pub const ANAGRPMAX: usize = 345;
    pub const NANAGRPID: usize = 349;
    pub const SQES: usize = 512;
    pub const CQES: usize = 513;
    pub const MAXCMD: usize = 514;
    pub const NN: usize = 516;
    pub const ONCS: usize = 520;
    pub const VWC: usize = 525;
    pub const SGLS: usize = 536;
    pub const MNAN: usize = 540;
    pub const SUBNQN: usize = 768;
    pub const IOCCSZ: usize = 1792;
    pub const IORCSZ: usize = 1796;
    pub const ICDOFF: usize = 1800;
    pub const FCATT: usize = 1802;
    pub const MSDBD: usize = 1803;
    pub const OFCS: usize = 1804;
    pub const PSD0: usize = 2048;
}

/// Controller types (CNTRLTYPE).
pub mod cntrltype {
    pub const IO: u8 = 1;
    pub const DISCOVERY: u8 = 2;
}

/// ONCS bits.
pub mod oncs {
    pub const DSM: u16 = 1 << 2;
    pub const WRITE_ZEROES: u16 = 1 << 3;
    pub const RESERVATIONS: u16 = 1 << 5;
}

/// What an Identify Controller page says.
#[derive(Clone, Debug, Default)]
pub struct ControllerInfo {
    pub serial: String,
    pub model: String,
    pub firmware: String,
    pub cntlid: u16,
    pub version: u32,
    pub subnqn: String,
    pub cntrltype: u8,
    /// Maximum data transfer size as a power of two of 4 KiB pages (0 = no limit).
    pub mdts: u8,
    /// Keep alive granularity in 100 ms units (0 = keep alive unsupported).
    pub kas: u16,
    /// Number of namespaces (highest valid NSID).
    pub nn: u32,
    /// Maximum outstanding commands per queue.
    pub maxcmd: u16,
    /// I/O queue command capsule size in 16-byte units.
    pub ioccsz: u32,
    /// I/O queue response capsule size in 16-byte units.
    pub iorcsz: u32,
    /// Whether a volatile write cache is present.
    pub volatile_write_cache: bool,
    /// Asynchronous events supported (OAES).
    pub oaes: u32,
    /// Maximum outstanding AERs, 0's based.
    pub aerl: u8,
    /// Error log entries, 0's based.
    pub elpe: u8,
    /// ONCS bits.
    pub oncs: u16,
    /// Asymmetric namespace access reporting: several controllers on several paths, each path
    /// in an ANA state per ANA group; `Some(groups)` with the number of ANA groups.
    pub ana_groups: Option<u32>,
}

/// OAES bit 8: Namespace Attribute Notices.
pub const OAES_NS_ATTR: u32 = 1 << 8;
/// OAES bit 11: Asymmetric Namespace Access Change Notices.
pub const OAES_ANA_CHANGE: u32 = 1 << 11;

/// CMIC bits.
pub mod cmic {
    /// Two or more controllers in the subsystem.
    pub const MULTI_CTRL: u8 = 1 << 1;
    /// Asymmetric namespace access reporting.
    pub const ANA: u8 = 1 << 3;
}

/// ANA transition time reported (seconds a path may stay in the change state).
pub const ANATT_SECS: u8 = 10;
/// ANACAP value: optimized, non-optimized, inaccessible and change states reported (bits 0, 1, 2, 4);
/// a namespace's ANA group does not change while it is attached (bit 6); groups are non-zero
/// (bit 7).
pub const ANA_CAPABILITIES: u8 = 0b1101_0111;

/// Builds Identify Controller (CNS 01h).
pub fn controller(c: &ControllerInfo) -> Vec<u8> {
    use ctrl_off::*;
    let mut w = PageWriter::new(IDENTIFY_LEN);
    w.str_padded(SN, 20, &c.serial, b' ');
    w.str_padded(MN, 40, &c.model, b' ');
    w.str_padded(FR, 8, &c.firmware, b' ');
    w.u8(RAB, 6);
    // Multi-controller subsystem: several hosts or queues-sets may attach at once.
    w.u8(CMIC, cmic::MULTI_CTRL | if c.ana_groups.is_some() { cmic::ANA } else { 0 });
    w.u8(MDTS, c.mdts);
    w.u16(CNTLID, c.cntlid);
    w.u32(VER, c.version);
    w.u32(OAES, c.oaes);
    // 128-bit host identifier supported.
    w.u32(CTRATT, 1);
    w.u8(CNTRLTYPE, c.cntrltype);
    w.u8(ACL, 3);
    w.u8(AERL, c.aerl);
    // One read-only firmware slot.
    w.u8(FRMW, 1 | (1 << 1));
    // LPA bit 2: extended data for Get Log Page (NUMDU, LPO).
    w.u8(LPA, 1 << 2);
    w.u8(ELPE, c.elpe);
    w.u16(KAS, c.kas);
    if let Some(groups) = c.ana_groups {
        w.u8(ANATT, ANATT_SECS);
        w.u8(ANACAP, ANA_CAPABILITIES);
        w.u32(ANAGRPMAX, groups);
        w.u32(NANAGRPID, groups);
    }
    w.u8(SQES, 0x66);
    w.u8(CQES, 0x44);
    w.u16(MAXCMD, c.maxcmd);
    w.u32(NN, c.nn);
    w.u16(ONCS, c.oncs);
    // VWC bit 0: present; bits 2:1 = 11b: Flush with NSID FFFFFFFFh is supported.
    w.u8(VWC, u8::from(c.volatile_write_cache) | (0b11 << 1));
    // SGLs supported without alignment requirement; SGL address may be an offset (in-capsule).
    w.u32(SGLS, 1 | (1 << 20));
    // With ANA, hosts size the ANA log by MNAN (every namespace may be in it): at most NN.
    w.u32(MNAN, if c.ana_groups.is_some() { c.nn } else { 0 });
    w.str_padded(SUBNQN, 256, &c.subnqn, 0);
    w.u32(IOCCSZ, c.ioccsz);
    w.u32(IORCSZ, c.iorcsz);
    w.u16(ICDOFF, 0);
    // Dynamic controller model.
    w.u8(FCATT, 0);
    w.u8(MSDBD, 1);
    // OFCS bit 0: Disconnect command supported.
    w.u16(OFCS, 1);
    // Power state 0: maximum power left 0 (not reported).
    w.into_vec()
}

/// Identify Namespace offsets.
pub mod ns_off {
    pub const NSZE: usize = 0;
    pub const NCAP: usize = 8;
    pub const NUSE: usize = 16;
    pub const NSFEAT: usize = 24;
    pub const NLBAF: usize = 25;
    pub const FLBAS: usize = 26;
    pub const NMIC: usize = 30;
    pub const RESCAP: usize = 31;
    pub const DLFEAT: usize = 33;
    pub const NOWS: usize = 72;
    pub const ANAGRPID: usize = 92;
    pub const NSATTR: usize = 99;
    pub const NGUID: usize = 104;
    pub const EUI64: usize = 120;
    pub const LBAF0: usize = 128;
}

/// What an Identify Namespace page says.
#[derive(Clone, Copy, Debug, Default)]
pub struct NamespaceInfo {
    /// Size in logical blocks.
    pub blocks: u64,
    /// Blocks currently allocated (NUSE).
    pub blocks_used: u64,
    /// log2 of the block size.
    pub lba_shift: u8,
    /// Namespace globally unique identifier.
    pub nguid: [u8; 16],
    /// Write protected (a snapshot): NSATTR bit 0, writes fail with Namespace is Write Protected.
    pub write_protected: bool,
    /// The namespace's ANA group (0: the controller does not report ANA).
    pub anagrpid: u32,
    /// Reservation capabilities (RESCAP; 0: no reservations).
    pub rescap: u8,
}

/// Builds Identify Namespace (CNS 00h) for an active namespace.
pub fn namespace(n: &NamespaceInfo) -> Vec<u8> {
    use ns_off::*;
    let mut w = PageWriter::new(IDENTIFY_LEN);
    w.u64(NSZE, n.blocks);
    w.u64(NCAP, n.blocks);
    w.u64(NUSE, n.blocks_used);
    // Thin provisioning (NUSE may be below NCAP); NGUID never reused.
    w.u8(NSFEAT, 1 | (1 << 3));
    w.u8(NLBAF, 0);
    w.u8(FLBAS, 0);
    // May be attached to several controllers at once.
    w.u8(NMIC, 1);
    w.u8(RESCAP, n.rescap);
    // Deallocated blocks read as zeros (bits 2:0 = 001b); Write Zeroes may deallocate (bit 3).
    w.u8(DLFEAT, 0b001 | (1 << 3));
    // NSATTR bit 0: the namespace is write protected.
    w.u8(NSATTR, u8::from(n.write_protected));
    w.u32(ANAGRPID, n.anagrpid);
    w.put(NGUID, &n.nguid);
    // LBA format 0: no metadata, LBADS = lba_shift, relative performance "best".
    w.u32(LBAF0, u32::from(n.lba_shift) << 16);
    w.into_vec()
}

/// Builds an active namespace ID list (CNS 02h): up to 1024 IDs, ascending, zero terminated.
pub fn ns_list(nsids: impl IntoIterator<Item = u32>) -> Vec<u8> {
    let mut w = PageWriter::new(IDENTIFY_LEN);
    for (i, id) in nsids.into_iter().take(IDENTIFY_LEN / 4).enumerate() {
        w.u32(i * 4, id);
    }
    w.into_vec()
}

/// Namespace identifier types of the descriptor list.
pub mod nidt {
    pub const EUI64: u8 = 1;
    pub const NGUID: u8 = 2;
    pub const UUID: u8 = 3;
    pub const CSI: u8 = 4;
}

/// Builds the namespace identification descriptor list (CNS 03h): NGUID, UUID and the command
/// set identifier (NVM).
pub fn ns_descriptors(nguid: &[u8; 16], uuid: &[u8; 16]) -> Vec<u8> {
    let mut w = PageWriter::new(IDENTIFY_LEN);
    let mut off = 0;
    for (t, v) in [(nidt::NGUID, &nguid[..]), (nidt::UUID, &uuid[..]), (nidt::CSI, &[0u8][..])] {
        w.u8(off, t);
        w.u8(off + 1, v.len() as u8);
        w.put(off + 4, v);
        off += 4 + v.len();
    }
    w.into_vec()
}

/// Builds the NVM command set specific Identify Controller (CNS 06h, CSI 0): all limits zero,
/// meaning Write Zeroes, Verify and DSM are bounded only by MDTS and the range count.
pub fn nvm_controller() -> Vec<u8> {
    vec![0; IDENTIFY_LEN]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reader::{u16_at, u32_at, u64_at};

    #[test]
    fn controller_fields_at_their_offsets() {
        let page = controller(&ControllerInfo {
            serial: "SN1".into(),
            model: "Model".into(),
            firmware: "0.1.0".into(),
            cntlid: 5,
            version: 0x10300,
            subnqn: "nqn.x".into(),
            cntrltype: cntrltype::IO,
            mdts: 5,
            kas: 1,
            nn: 32,
            maxcmd: 128,
            ioccsz: 516,
            iorcsz: 1,
            volatile_write_cache: false,
            oaes: OAES_NS_ATTR,
            aerl: 3,
            elpe: 63,
            oncs: oncs::DSM | oncs::WRITE_ZEROES,
            ana_groups: None,
        });
        assert_eq!(page.len(), 4096);
        assert_eq!(&page[4..24], b"SN1                 ");
        assert_eq!(u16_at(&page, ctrl_off::CNTLID), Some(5));
        assert_eq!(u16_at(&page, ctrl_off::KAS), Some(1));
        assert_eq!(u32_at(&page, ctrl_off::IOCCSZ), Some(516));
        assert_eq!(page[ctrl_off::SGLS] & 0x3, 1);
        assert_eq!(page[ctrl_off::VWC], 0b110);
        assert_eq!(&page[768..773], b"nqn.x");
        assert_eq!(page[773], 0);
        assert_eq!(u16_at(&page, ctrl_off::ICDOFF), Some(0));
        assert_eq!(page[ctrl_off::CMIC], cmic::MULTI_CTRL);
        assert_eq!(u32_at(&page, ctrl_off::MNAN), Some(0));
    }

    #[test]
    fn ana_reporting_fields() {
        let page = controller(&ControllerInfo { nn: 1024, ana_groups: Some(1), ..Default::default() });
        assert_eq!(page[ctrl_off::CMIC], cmic::MULTI_CTRL | cmic::ANA);
        assert_eq!(page[ctrl_off::ANATT], ANATT_SECS);
        assert_eq!(page[ctrl_off::ANACAP], 0xD7);
        assert_eq!(u32_at(&page, ctrl_off::ANAGRPMAX), Some(1));
        assert_eq!(u32_at(&page, ctrl_off::NANAGRPID), Some(1));
        assert_eq!(u32_at(&page, ctrl_off::MNAN), Some(1024), "MNAN sizes the host's ANA log buffer");
        let ns = namespace(&NamespaceInfo { blocks: 8, lba_shift: 12, anagrpid: 1, ..Default::default() });
        assert_eq!(u32_at(&ns, ns_off::ANAGRPID), Some(1));
    }

    #[test]
    fn namespace_and_lists() {
        let page = namespace(&NamespaceInfo {
            blocks: 1000,
            blocks_used: 10,
            lba_shift: 9,
            nguid: [9; 16],
            write_protected: false,
            anagrpid: 0,
            rescap: 0x7E,
        });
        assert_eq!(u64_at(&page, 0), Some(1000));
        assert_eq!(u64_at(&page, 16), Some(10));
        assert_eq!(page[130], 9);
        assert_eq!(page[ns_off::DLFEAT] & 0x7, 1);
        assert_eq!(page[ns_off::NSATTR], 0);
        assert_eq!(page[31], 0x7E, "RESCAP");
        let ro = namespace(&NamespaceInfo {
            blocks: 1000,
            blocks_used: 10,
            lba_shift: 9,
            nguid: [9; 16],
            write_protected: true,
            anagrpid: 0,
            rescap: 0,
        });
        assert_eq!(ro[99], 1, "NSATTR bit 0: write protected");
        let l = ns_list([1, 2, 7]);
        assert_eq!((u32_at(&l, 0), u32_at(&l, 8), u32_at(&l, 12)), (Some(1), Some(7), Some(0)));
        let d = ns_descriptors(&[1; 16], &[2; 16]);
        assert_eq!(&d[0..4], &[nidt::NGUID, 16, 0, 0]);
        assert_eq!(&d[20..24], &[nidt::UUID, 16, 0, 0]);
        assert_eq!(&d[40..45], &[nidt::CSI, 1, 0, 0, 0]);
    }
}
