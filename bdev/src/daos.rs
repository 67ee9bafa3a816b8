//! The DAOS bdev: a namespace backed by a Tessera volume, i.e. an erasure-coded or replicated
//! object spread over storage engines, reached through [`tessera_client::volume::Volume`].
//!
//! Mapping: block `lba` is byte `lba × block_size` of the volume; a read of `n` blocks is one
//! `Volume::read(offset, n × block_size)`, a write one `Volume::write` (its segments are
//! concatenated only when there is more than one; the common single segment goes through without
//! a copy), write zeroes and deallocate are both `Volume::write_zeroes` (the volume punches whole
//! stripes and writes zeros into partial ones, so deallocated blocks read as zeros as NVMe's
//! DLFEAT promises). Every call is an independent future over the shared volume handle, so a
//! connection's whole queue depth — hundreds of I/Os across connections — is in flight at once.
//!
//! **No volatile write cache.** `Volume::write` and `write_zeroes` return `Ok` only once every
//! writable shard's engine has the data and its WAL record on stable storage (engine group
//! commit), and nothing between the target and the engines buffers acknowledged data. So the
//! device reports no volatile cache, FUA needs no extra work, and Flush completes at once: there
//! is never acknowledged-but-volatile data for it to push out.
//!
//! Errors: [`VolumeError::Unavailable`] (too many shards down or unreachable) becomes
//! [`BdevError::Unavailable`], which the target reports as a retryable status; `Corrupt` (every
//! copy failed its checksum) becomes [`BdevError::Corrupt`], a media error that retrying cannot
//! fix; a range the volume refuses although the bdev checked it against the same geometry, or a
//! volume whose description is unusable, is [`BdevError::Internal`].
//!
//! Geometry comes from the volume's [`VolumeInfo`]: `block_size`, and `size / block_size`
//! blocks. Growing the volume means opening a handle with the new description and handing it to
//! [`DaosBdev::set_volume`]; I/O already in flight finishes on the old handle.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock};

use bytes::{Bytes, BytesMut};
use tessera_client::volume::{Cluster, Volume, VolumeError, VolumeStats};
use tessera_mgmt_api::{SnapshotInfo, VolumeInfo};

use crate::{check_range, data_len, whole_blocks, BdevError, BlockDevice, WriteData};

/// The volume operations the bdev needs: implemented by [`Volume`], and by fakes in tests.
pub trait VolumeIo: Send + Sync + 'static {
    /// The volume's description (geometry and identity).
    fn info(&self) -> &VolumeInfo;
    /// Reads `len` bytes at `offset`.
    fn read(&self, offset: u64, len: u64) -> impl Future<Output = Result<Bytes, VolumeError>> + Send;
    /// Writes `data` at `offset`, durable on `Ok`.
    fn write(&self, offset: u64, data: Bytes) -> impl Future<Output = Result<(), VolumeError>> + Send;
    /// Makes `len` bytes at `offset` read as zeros, durable on `Ok`.
    fn write_zeroes(&self, offset: u64, len: u64) -> impl Future<Output = Result<(), VolumeError>> + Send;
    /// Counters.
    fn stats(&self) -> VolumeStats;
    /// Whether writes are refused (a snapshot).
    fn read_only(&self) -> bool {
        false
    }
}

impl VolumeIo for Volume {
    fn info(&self) -> &VolumeInfo {
        Volume::info(self)
    }

    fn read(&self, offset: u64, len: u64) -> impl Future<Output = Result<Bytes, VolumeError>> + Send {
        Volume::read(self, offset, len)
    }

    fn write(&self, offset: u64, data: Bytes) -> impl Future<Output = Result<(), VolumeError>> + Send {
        Volume::write(self, offset, data)
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> impl Future<Output = Result<(), VolumeError>> + Send {
        Volume::write_zeroes(self, offset, len)
    }

    fn stats(&self) -> VolumeStats {
        Volume::stats(self)
    }

    fn read_only(&self) -> bool {
        self.snapshot().is_some()
    }
}

/// The bdev error for a failed volume operation.
pub fn bdev_error(e: VolumeError) -> BdevError {
    match e {
        VolumeError::Unavailable(m) => BdevError::Unavailable(m),
        VolumeError::Corrupt(m) => BdevError::Corrupt(m),
        // The bdev checked the range against the same geometry, so a refusal is a disagreement
        // between the two, not the host's fault.
        VolumeError::Range(m) => BdevError::Internal(format!("volume refused the range: {m}")),
        VolumeError::Config(m) => BdevError::Internal(m),
        VolumeError::ReadOnly(m) => BdevError::WriteProtected(m),
    }
}

/// A block device backed by a Tessera volume.
#[derive(Debug)]
pub struct DaosBdev<V: VolumeIo = Volume> {
    block_size: u32,
    blocks: AtomicU64,
    volume: RwLock<Arc<V>>,
}

/// Blocks of a volume, or why its description cannot back a namespace.
fn geometry(info: &VolumeInfo) -> Result<(u32, u64), BdevError> {
    let bs = info.block_size;
    if !bs.is_power_of_two() || !(512..=(1 << 20)).contains(&bs) {
        return Err(BdevError::Unsupported("volume block size must be a power of two from 512 to 1 MiB"));
    }
    if info.size == 0 || !info.size.is_multiple_of(u64::from(bs)) {
        return Err(BdevError::Unsupported("volume size must be a positive multiple of its block size"));
    }
    Ok((bs, info.size / u64::from(bs)))
}

impl DaosBdev<Volume> {
    /// Opens the volume described by `info` through `cluster` and serves it.
    pub async fn open(cluster: &Arc<Cluster>, info: &VolumeInfo) -> Result<DaosBdev<Volume>, BdevError> {
        geometry(info)?;
        let v = cluster.open_volume(info).await.map_err(bdev_error)?;
        DaosBdev::new(v)
    }

    /// Opens snapshot `snap` of the volume described by `info`: a write-protected device of the
    /// snapshot's size whose reads see the volume at the snapshot's epoch.
    pub async fn open_snapshot(cluster: &Arc<Cluster>, info: &VolumeInfo, snap: &SnapshotInfo) -> Result<DaosBdev<Volume>, BdevError> {
        let v = cluster.open_snapshot(info, snap).await.map_err(bdev_error)?;
        DaosBdev::new(v)
    }
}

impl<V: VolumeIo> DaosBdev<V> {
    /// Serves an open volume; the geometry is its description's.
    pub fn new(volume: V) -> Result<DaosBdev<V>, BdevError> {
        let (block_size, blocks) = geometry(volume.info())?;
        Ok(DaosBdev { block_size, blocks: AtomicU64::new(blocks), volume: RwLock::new(Arc::new(volume)) })
    }

    fn volume(&self) -> Arc<V> {
        self.volume.read().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// The volume's description (of the current handle).
    pub fn info(&self) -> VolumeInfo {
        self.volume().info().clone()
    }

    /// The volume's identity.
    pub fn volume_uuid(&self) -> uuid::Uuid {
        self.volume().info().uuid
    }

    /// The volume's counters.
    pub fn stats(&self) -> VolumeStats {
        self.volume().stats()
    }

    /// Replaces the handle with one of the same volume and block size and at least the same size
    /// (a resize): later I/O uses it, I/O in flight finishes on the old one.
    pub fn set_volume(&self, volume: V) -> Result<(), BdevError> {
        let (bs, blocks) = geometry(volume.info())?;
        let mut cur = self.volume.write().unwrap_or_else(PoisonError::into_inner);
        if volume.info().uuid != cur.info().uuid {
            return Err(BdevError::Unsupported("a namespace cannot switch to another volume"));
        }
        if bs != self.block_size {
            return Err(BdevError::Unsupported("a volume's block size cannot change"));
        }
        if blocks < self.num_blocks() {
            return Err(BdevError::Unsupported("shrinking a namespace"));
        }
        *cur = Arc::new(volume);
        self.blocks.store(blocks, Ordering::Release);
        Ok(())
    }

    /// The byte range of `blocks` blocks at `lba`, checked against the device size.
    pub fn byte_range(&self, lba: u64, blocks: u64) -> Result<(u64, u64), BdevError> {
        check_range(lba, blocks, self.num_blocks())?;
        let bs = u64::from(self.block_size);
        // Cannot overflow: lba + blocks ≤ size in blocks, and size in bytes fits a u64.
        Ok((lba * bs, blocks * bs))
    }
}

/// One buffer holding the segments of a write, copied only when there are several.
fn contiguous(data: WriteData) -> Bytes {
    match data {
        WriteData::Single(b) => b,
        WriteData::Segments(mut v) if v.len() == 1 => v.pop().unwrap_or_default(),
        WriteData::Segments(v) => {
            let mut buf = BytesMut::with_capacity(data_len(&v));
            for s in &v {
                buf.extend_from_slice(s);
            }
            buf.freeze()
        }
    }
}

impl<V: VolumeIo> BlockDevice for DaosBdev<V> {
    fn block_size(&self) -> u32 {
        self.block_size
    }

    fn num_blocks(&self) -> u64 {
        self.blocks.load(Ordering::Acquire)
    }

    /// Acknowledged writes are durable on the engines: nothing to flush.
    fn has_volatile_cache(&self) -> bool {
        false
    }

    fn write_protected(&self) -> bool {
        self.volume().read_only()
    }

    async fn read(&self, lba: u64, blocks: u32) -> Result<Bytes, BdevError> {
        let (offset, len) = self.byte_range(lba, u64::from(blocks))?;
        let data = self.volume().read(offset, len).await.map_err(bdev_error)?;
        if data.len() as u64 != len {
            return Err(BdevError::Internal(format!("volume returned {} bytes for a {len}-byte read at {offset}", data.len())));
        }
        Ok(data)
    }

    async fn write(&self, lba: u64, data: WriteData, _fua: bool) -> Result<(), BdevError> {
        // FUA needs nothing more: an acknowledged volume write is already durable.
        let blocks = whole_blocks(data_len(&data), self.block_size)?;
        let (offset, _) = self.byte_range(lba, blocks)?;
        if blocks == 0 {
            return Ok(());
        }
        self.volume().write(offset, contiguous(data)).await.map_err(bdev_error)
    }

    /// Succeeds at once: every acknowledged write is already on stable storage (see the module
    /// documentation), so there is nothing volatile to flush.
    async fn flush(&self) -> Result<(), BdevError> {
        Ok(())
    }

    async fn write_zeroes(&self, lba: u64, blocks: u64) -> Result<(), BdevError> {
        let (offset, len) = self.byte_range(lba, blocks)?;
        if len == 0 {
            return Ok(());
        }
        self.volume().write_zeroes(offset, len).await.map_err(bdev_error)
    }

    async fn unmap(&self, lba: u64, blocks: u64) -> Result<(), BdevError> {
        self.write_zeroes(lba, blocks).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::executor::block_on;
    use std::sync::Mutex;

    #[derive(Debug, Clone, PartialEq, Eq)]
    enum Call {
        Read(u64, u64),
        Write(u64, Vec<u8>),
        Zero(u64, u64),
    }

    /// A volume that records calls and answers with a configurable result.
    #[derive(Debug)]
    struct Fake {
        info: VolumeInfo,
        calls: Arc<Mutex<Vec<Call>>>,
        fail: Option<VolumeError>,
        short_read: bool,
    }

    fn info(block_size: u32, size: u64) -> VolumeInfo {
        VolumeInfo {
            pool: "p".into(),
            pool_id: 1,
            name: "v".into(),
            uuid: uuid::Uuid::from_u128(7),
            size,
            block_size,
            class: "EC_2P1".into(),
            cell_size: 65536,
            chunk_size: 1 << 20,
            checksum: true,
            created: 0,
            snapshots: Vec::new(),
            parent: None,
            flattening: false,
            rollbacks: Vec::new(),
            allocated_bytes: None,
        }
    }

    fn fake(block_size: u32, size: u64) -> (DaosBdev<Fake>, Arc<Mutex<Vec<Call>>>) {
        let calls = Arc::new(Mutex::new(Vec::new()));
        let f = Fake { info: info(block_size, size), calls: calls.clone(), fail: None, short_read: false };
        (DaosBdev::new(f).unwrap(), calls)
    }

    fn failing(e: VolumeError) -> DaosBdev<Fake> {
        let f = Fake { info: info(512, 1 << 20), calls: Arc::default(), fail: Some(e), short_read: false };
        DaosBdev::new(f).unwrap()
    }

    impl VolumeIo for Fake {
        fn info(&self) -> &VolumeInfo {
            &self.info
        }

        async fn read(&self, offset: u64, len: u64) -> Result<Bytes, VolumeError> {
            self.calls.lock().unwrap().push(Call::Read(offset, len));
            if let Some(e) = &self.fail {
                return Err(e.clone());
            }
            let len = if self.short_read { len - 1 } else { len };
            Ok(Bytes::from(vec![0xAB; len as usize]))
        }

        async fn write(&self, offset: u64, data: Bytes) -> Result<(), VolumeError> {
            self.calls.lock().unwrap().push(Call::Write(offset, data.to_vec()));
            self.fail.clone().map_or(Ok(()), Err)
        }

        async fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), VolumeError> {
            self.calls.lock().unwrap().push(Call::Zero(offset, len));
            self.fail.clone().map_or(Ok(()), Err)
        }

        fn stats(&self) -> VolumeStats {
            VolumeStats { degraded_reads: 3, ..VolumeStats::default() }
        }
    }

    #[test]
    fn geometry_comes_from_the_volume() {
        let (d, _) = fake(4096, 64 << 20);
        assert_eq!((d.block_size(), d.num_blocks()), (4096, 16384));
        assert!(!d.has_volatile_cache());
        assert_eq!(d.stats().degraded_reads, 3);
        let bad = |bs, size| DaosBdev::new(Fake { info: info(bs, size), calls: Arc::default(), fail: None, short_read: false }).is_err();
        assert!(bad(1000, 8000));
        assert!(bad(4096, 4097));
        assert!(bad(4096, 0));
        assert!(!bad(512, 512));
    }

    #[test]
    fn lbas_become_byte_offsets() {
        let (d, calls) = fake(4096, 64 << 20);
        assert_eq!(block_on(d.read(3, 2)).unwrap().len(), 8192);
        block_on(d.write(5, Bytes::from(vec![1u8; 4096]).into(), true)).unwrap();
        block_on(d.write_zeroes(16383, 1)).unwrap();
        block_on(d.unmap(10, 6)).unwrap();
        let (d512, calls512) = fake(512, 1 << 30);
        block_on(d512.read(1_000_001, 1)).unwrap();
        assert_eq!(
            *calls.lock().unwrap(),
            vec![
                Call::Read(3 * 4096, 8192),
                Call::Write(5 * 4096, vec![1; 4096]),
                Call::Zero(16383 * 4096, 4096),
                Call::Zero(10 * 4096, 6 * 4096)
            ]
        );
        assert_eq!(*calls512.lock().unwrap(), vec![Call::Read(1_000_001 * 512, 512)]);
    }

    #[test]
    fn segments_are_concatenated_in_order() {
        let (d, calls) = fake(512, 1 << 20);
        let segs = vec![Bytes::from(vec![1u8; 512]), Bytes::from(vec![2u8; 1024]), Bytes::from(vec![3u8; 512])];
        block_on(d.write(8, segs.into(), false)).unwrap();
        let mut want = vec![1u8; 512];
        want.extend_from_slice(&[2; 1024]);
        want.extend_from_slice(&[3; 512]);
        assert_eq!(*calls.lock().unwrap(), vec![Call::Write(8 * 512, want)]);
    }

    #[test]
    fn a_single_segment_is_passed_without_a_copy() {
        let seg = Bytes::from(vec![9u8; 4096]);
        let ptr = seg.as_ptr();
        assert_eq!(contiguous(WriteData::Single(seg.clone())).as_ptr(), ptr);
        assert_eq!(contiguous(WriteData::Segments(vec![seg])).as_ptr(), ptr);
        assert!(contiguous(WriteData::Segments(Vec::new())).is_empty());
    }

    #[test]
    fn range_and_alignment_are_checked_before_the_volume_is_asked() {
        let (d, calls) = fake(512, 1 << 20);
        assert!(matches!(block_on(d.read(2047, 2)), Err(BdevError::OutOfRange { .. })));
        assert!(matches!(block_on(d.read(u64::MAX, 1)), Err(BdevError::OutOfRange { .. })));
        assert!(matches!(block_on(d.write_zeroes(u64::MAX - 1, 4)), Err(BdevError::OutOfRange { .. })));
        assert!(matches!(block_on(d.write(2048, Bytes::from(vec![0; 512]).into(), false)), Err(BdevError::OutOfRange { .. })));
        assert_eq!(block_on(d.write(0, Bytes::from(vec![0; 100]).into(), false)), Err(BdevError::Misaligned(100)));
        assert_eq!(block_on(d.write(0, WriteData::empty(), false)), Ok(()));
        assert!(calls.lock().unwrap().is_empty());
    }

    #[test]
    fn flush_is_immediate_and_touches_nothing() {
        let (d, calls) = fake(512, 1 << 20);
        assert_eq!(block_on(d.flush()), Ok(()));
        assert!(calls.lock().unwrap().is_empty());
    }

    #[test]
    fn volume_errors_map_to_bdev_errors() {
        let cases = [
            (VolumeError::Unavailable("2 of 3 shards down".into()), "Unavailable"),
            (VolumeError::Corrupt("checksum".into()), "Corrupt"),
            (VolumeError::Range("x".into()), "Internal"),
            (VolumeError::Config("no map".into()), "Internal"),
        ];
        for (e, want) in cases {
            let d = failing(e.clone());
            for got in [
                block_on(d.read(0, 1)).map(|_| ()),
                block_on(d.write(0, Bytes::from(vec![0; 512]).into(), false)),
                block_on(d.write_zeroes(0, 1)),
                block_on(d.unmap(0, 1)),
            ] {
                let got = got.unwrap_err();
                assert!(format!("{got:?}").starts_with(want), "{e:?} -> {got:?}");
            }
        }
        assert_eq!(bdev_error(VolumeError::Corrupt("c".into())), BdevError::Corrupt("c".into()));
        assert_eq!(bdev_error(VolumeError::Unavailable("u".into())), BdevError::Unavailable("u".into()));
    }

    #[test]
    fn a_short_read_is_an_error_not_short_data() {
        let d = DaosBdev::new(Fake { info: info(512, 1 << 20), calls: Arc::default(), fail: None, short_read: true }).unwrap();
        assert!(matches!(block_on(d.read(0, 1)), Err(BdevError::Internal(_))));
    }

    #[test]
    fn set_volume_grows_and_refuses_other_changes() {
        let (d, _) = fake(4096, 1 << 20);
        let with = |i: VolumeInfo| Fake { info: i, calls: Arc::default(), fail: None, short_read: false };
        d.set_volume(with(info(4096, 2 << 20))).unwrap();
        assert_eq!(d.num_blocks(), 512);
        assert_eq!(d.info().size, 2 << 20);
        assert!(d.set_volume(with(info(4096, 1 << 20))).is_err(), "shrink");
        assert!(d.set_volume(with(info(512, 4 << 20))).is_err(), "block size");
        let mut other = info(4096, 4 << 20);
        other.uuid = uuid::Uuid::from_u128(8);
        assert!(d.set_volume(with(other)).is_err(), "another volume");
        assert_eq!(d.num_blocks(), 512);
    }

    #[test]
    fn many_ios_in_flight_at_once() {
        // Futures that complete only when all are polled together: a bdev that serialised its
        // calls would deadlock here.
        #[derive(Debug)]
        struct Gate {
            info: VolumeInfo,
            barrier: tokio::sync::Barrier,
        }
        impl VolumeIo for Gate {
            fn info(&self) -> &VolumeInfo {
                &self.info
            }
            async fn read(&self, _: u64, len: u64) -> Result<Bytes, VolumeError> {
                self.barrier.wait().await;
                Ok(Bytes::from(vec![0; len as usize]))
            }
            async fn write(&self, _: u64, _: Bytes) -> Result<(), VolumeError> {
                self.barrier.wait().await;
                Ok(())
            }
            async fn write_zeroes(&self, _: u64, _: u64) -> Result<(), VolumeError> {
                Ok(())
            }
            fn stats(&self) -> VolumeStats {
                VolumeStats::default()
            }
        }
        const N: usize = 512;
        let d = Arc::new(DaosBdev::new(Gate { info: info(4096, 1 << 30), barrier: tokio::sync::Barrier::new(N) }).unwrap());
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        rt.block_on(async {
            let tasks: Vec<_> = (0..N as u64)
                .map(|i| {
                    let d = d.clone();
                    tokio::spawn(async move {
                        if i % 2 == 0 {
                            d.read(i, 1).await.map(|_| ())
                        } else {
                            d.write(i, Bytes::from(vec![0; 4096]).into(), false).await
                        }
                    })
                })
                .collect();
            let all = tokio::time::timeout(std::time::Duration::from_secs(10), futures::future::join_all(tasks)).await.unwrap();
            assert!(all.into_iter().all(|r| r.unwrap().is_ok()));
        });
    }
}
