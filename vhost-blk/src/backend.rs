//! The vhost-user-blk device: a [`BlockDevice`] behind the virtqueues of one vhost-user
//! connection (`vhost-user-backend`'s `VhostUserBackend`).
//!
//! Each queue has a worker thread of the daemon that sleeps in epoll until the guest kicks it (no
//! polling: an idle device uses no CPU). On a kick the worker takes every available chain, reads
//! its descriptors into a [`crate::request::Request`] (refusing a bad chain with an error status,
//! alone) and hands the request to the tokio runtime; many run at once. A task moves the data
//! between guest memory and the device, writes the status byte, puts the chain on the used ring
//! and notifies the guest if the event index asks for it.
//!
//! Durability: a write completes once the device acknowledged it, and a Tessera volume
//! acknowledges only durable writes (every shard synced), so a completed write survives the
//! loss of this process; a flush has nothing left to do but is still sent to the device. A request
//! the process dies with was never completed: the guest's driver times it out and retries it
//! after the hypervisor reconnects (QEMU `reconnect=1`); in-flight tracking across a restart
//! (`VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD`) is not offered.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::time::Duration;

use bytes::Bytes;
use tessera_bdev::{BdevError, BlockDevice, WriteData};
use tracing::{debug, warn};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use virtio_queue::QueueOwnedT;
use vm_memory::{Bytes as _, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier};

use crate::config::Geometry;
use crate::request::{self, status, Desc, Kind, Request, HEADER_LEN, ID_LEN, SECTOR};

/// Guest memory as the daemon shares it.
pub type GuestMem = GuestMemoryAtomic<GuestMemoryMmap<()>>;

/// Descriptors of the longest chain read (a queue of 256 entries cannot hold more).
pub const QUEUE_SIZE: usize = 256;

/// Longest a disconnected device waits for its requests in flight before it lets go.
const DRAIN_WAIT: Duration = Duration::from_secs(60);

/// A device: a block device, the runtime its requests run on, and the guest memory of the
/// current connection.
pub struct BlkBackend<D> {
    dev: Arc<D>,
    geometry: Geometry,
    serial: [u8; ID_LEN as usize],
    rt: tokio::runtime::Handle,
    event_idx: AtomicBool,
    mem: RwLock<Option<GuestMem>>,
    in_flight: Arc<(Mutex<usize>, Condvar)>,
}

impl<D> std::fmt::Debug for BlkBackend<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlkBackend").field("geometry", &self.geometry).finish_non_exhaustive()
    }
}

fn qerr(e: impl std::error::Error + Send + Sync + 'static) -> io::Error {
    io::Error::other(e)
}

impl<D: BlockDevice + Send + Sync + 'static> BlkBackend<D> {
    /// A device for `dev` with `queues` request queues, its id (`VIRTIO_BLK_T_GET_ID`) `serial`
    /// (cut or zero-padded to 20 bytes), read-only if `read_only` or the device is write protected.
    pub fn new(dev: Arc<D>, queues: u16, serial: &str, read_only: bool, rt: tokio::runtime::Handle) -> BlkBackend<D> {
        let mut id = [0u8; ID_LEN as usize];
        let n = serial.len().min(id.len());
        id[..n].copy_from_slice(&serial.as_bytes()[..n]);
        let geometry = Geometry {
            block_size: dev.block_size(),
            blocks: dev.num_blocks(),
            queues: queues.max(1),
            read_only: read_only || dev.write_protected(),
            limits: request::Limits::default(),
        };
        BlkBackend {
            dev,
            geometry,
            serial: id,
            rt,
            event_idx: AtomicBool::new(false),
            mem: RwLock::new(None),
            in_flight: Arc::new((Mutex::new(0), Condvar::new())),
        }
    }

    /// What the device tells the guest.
    pub fn geometry(&self) -> Geometry {
        self.geometry
    }

    /// Waits until no request is in flight (or [`DRAIN_WAIT`] passed): before the next
    /// connection's device is made, so nothing of this one still writes into guest memory.
    pub fn drain(&self) {
        let (count, cv) = &*self.in_flight;
        let guard = count.lock().unwrap_or_else(|e| e.into_inner());
        let (left, _) = cv.wait_timeout_while(guard, DRAIN_WAIT, |n| *n > 0).unwrap_or_else(|e| e.into_inner());
        if *left > 0 {
            warn!(requests = *left, "vhost-user-blk: requests still in flight after the connection closed");
        }
    }

    /// Takes every available chain of `vring` and starts its request.
    fn process_queue(&self, vring: &VringRwLock) -> io::Result<()> {
        let Some(atomic) = self.mem.read().unwrap_or_else(|e| e.into_inner()).clone() else { return Ok(()) };
        let mem = atomic.memory();
        let chains: Vec<_> = vring.get_mut().get_queue_mut().iter(mem.clone()).map_err(qerr)?.collect();
        for chain in chains {
            let head = chain.head_index();
            let descs: Vec<Desc> = chain
                .clone()
                .take(QUEUE_SIZE + 1)
                .map(|d| Desc { addr: d.addr().0, len: d.len(), write_only: d.is_write_only() })
                .collect();
            let mut header = [0u8; HEADER_LEN as usize];
            let parsed = match descs.first() {
                Some(first) if first.len >= HEADER_LEN && mem.read_slice(&mut header, GuestAddress(first.addr)).is_ok() => {
                    request::parse(&descs, &header, &self.geometry.limits)
                }
                _ => Err(request::ChainError::BadHeader),
            };
            match parsed {
                Ok(req) => self.start(vring.clone(), atomic.clone(), head, req),
                Err(e) => {
                    debug!(error = %e, "vhost-user-blk: a request is refused");
                    complete(vring, &atomic, head, request::status_addr(&descs), e.status(), 1);
                }
            }
        }
        Ok(())
    }

    /// Runs one request on the runtime and completes it.
    fn start(&self, vring: VringRwLock, atomic: GuestMem, head: u16, req: Request) {
        {
            let mut n = self.in_flight.0.lock().unwrap_or_else(|e| e.into_inner());
            *n += 1;
        }
        let dev = self.dev.clone();
        let (geometry, serial, in_flight) = (self.geometry, self.serial, self.in_flight.clone());
        self.rt.spawn(async move {
            let (st, written) = match execute(&*dev, &geometry, &serial, &atomic, &req).await {
                Ok(written) => (status::OK, written),
                Err(e) => {
                    debug!(error = %e, kind = ?req.kind, sector = req.sector, "vhost-user-blk: request failed");
                    (status::IOERR, 0)
                }
            };
            complete(&vring, &atomic, head, Some(req.status_addr), st, written + 1);
            let (count, cv) = &*in_flight;
            let mut n = count.lock().unwrap_or_else(|e| e.into_inner());
            *n -= 1;
            if *n == 0 {
                cv.notify_all();
            }
        });
    }
}

/// Why a request failed (its status is IOERR).
#[derive(Debug, thiserror::Error)]
enum ExecError {
    #[error("{0}")]
    Device(#[from] BdevError),
    #[error("guest memory: {0}")]
    Memory(String),
    #[error("blocks out of range or not whole")]
    Range,
    #[error("the device is read-only")]
    ReadOnly,
}

/// Executes one request; returns the bytes written into guest buffers (the status byte aside).
async fn execute<D: BlockDevice>(dev: &D, g: &Geometry, serial: &[u8], atomic: &GuestMem, req: &Request) -> Result<u32, ExecError> {
    let mem = atomic.memory();
    let blocks = |sector: u64, bytes: u64| request::to_blocks(sector, bytes, g.block_size, dev.num_blocks()).ok_or(ExecError::Range);
    let gather = |len: u64| -> Result<Vec<u8>, ExecError> {
        let mut buf = vec![0u8; usize::try_from(len).map_err(|_| ExecError::Range)?];
        let mut at = 0usize;
        for s in &req.data {
            let n = s.len as usize;
            mem.read_slice(&mut buf[at..at + n], GuestAddress(s.addr)).map_err(|e| ExecError::Memory(e.to_string()))?;
            at += n;
        }
        Ok(buf)
    };
    match req.kind {
        Kind::Read => {
            let (lba, n) = blocks(req.sector, req.data_len)?;
            let data = if n == 0 { Bytes::new() } else { dev.read(lba, u32::try_from(n).map_err(|_| ExecError::Range)?).await? };
            let mut at = 0usize;
            for s in &req.data {
                let n = s.len as usize;
                mem.write_slice(&data[at..at + n], GuestAddress(s.addr)).map_err(|e| ExecError::Memory(e.to_string()))?;
                at += n;
            }
            u32::try_from(req.data_len).map_err(|_| ExecError::Range)
        }
        Kind::Write => {
            if g.read_only {
                return Err(ExecError::ReadOnly);
            }
            let (lba, _) = blocks(req.sector, req.data_len)?;
            let data = gather(req.data_len)?;
            if !data.is_empty() {
                dev.write(lba, WriteData::Single(Bytes::from(data)), false).await?;
            }
            Ok(0)
        }
        Kind::Flush => {
            dev.flush().await?;
            Ok(0)
        }
        Kind::GetId => {
            let mut at = 0usize;
            for s in &req.data {
                let n = (s.len as usize).min(serial.len() - at);
                mem.write_slice(&serial[at..at + n], GuestAddress(s.addr)).map_err(|e| ExecError::Memory(e.to_string()))?;
                at += n;
                if at == serial.len() {
                    break;
                }
            }
            Ok(ID_LEN)
        }
        Kind::Discard | Kind::WriteZeroes => {
            if g.read_only {
                return Err(ExecError::ReadOnly);
            }
            for r in request::ranges(&gather(req.data_len)?) {
                let (lba, n) = blocks(r.sector, u64::from(r.sectors) * SECTOR)?;
                if n == 0 {
                    continue;
                }
                match req.kind {
                    Kind::Discard => dev.unmap(lba, n).await?,
                    _ => dev.write_zeroes(lba, n).await?,
                }
            }
            Ok(0)
        }
    }
}

/// Writes the status byte (if the chain has one), puts the chain on the used ring and notifies
/// the guest if it wants to be. Failures here mean the guest broke its own rings: logged.
fn complete(vring: &VringRwLock, atomic: &GuestMem, head: u16, status_addr: Option<u64>, st: u8, used: u32) {
    let mut used = used;
    if let Some(a) = status_addr {
        if atomic.memory().write_slice(&[st], GuestAddress(a)).is_err() {
            used = 0;
        }
    } else {
        used = 0;
    }
    let mut state = vring.get_mut();
    if let Err(e) = state.add_used(head, used) {
        warn!(error = %e, "vhost-user-blk: cannot return a request to the guest");
        return;
    }
    match state.needs_notification() {
        Ok(false) => {}
        Ok(true) | Err(_) => {
            if let Err(e) = state.signal_used_queue() {
                debug!(error = %e, "vhost-user-blk: cannot notify the guest");
            }
        }
    }
}

impl<D: BlockDevice + Send + Sync + 'static> VhostUserBackend for BlkBackend<D> {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        usize::from(self.geometry.queues)
    }

    fn max_queue_size(&self) -> usize {
        QUEUE_SIZE
    }

    fn features(&self) -> u64 {
        self.geometry.features() | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG | VhostUserProtocolFeatures::MQ | VhostUserProtocolFeatures::REPLY_ACK
    }

    fn set_event_idx(&self, enabled: bool) {
        self.event_idx.store(enabled, Ordering::Relaxed);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        // Exactly `size` bytes, zero past the end of the space.
        let cfg = self.geometry.config();
        let mut out = vec![0u8; size as usize];
        let start = (offset as usize).min(cfg.len());
        let end = (offset as usize).saturating_add(size as usize).min(cfg.len());
        out[..end - start].copy_from_slice(&cfg[start..end]);
        out
    }

    fn update_memory(&self, mem: GuestMem) -> io::Result<()> {
        *self.mem.write().unwrap_or_else(|e| e.into_inner()) = Some(mem);
        Ok(())
    }

    /// A worker thread per queue (the guest has one queue per vCPU).
    fn queues_per_thread(&self) -> Vec<u64> {
        (0..self.geometry.queues).map(|q| 1u64 << q).collect()
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        new_event_consumer_and_notifier(EventFlag::NONBLOCK).ok()
    }

    fn handle_event(&self, device_event: u16, evset: EventSet, vrings: &[VringRwLock], _thread_id: usize) -> io::Result<()> {
        if evset != EventSet::IN {
            return Err(io::Error::other("unexpected event set"));
        }
        let vring = vrings.get(usize::from(device_event)).ok_or_else(|| io::Error::other("unknown queue"))?;
        if self.event_idx.load(Ordering::Relaxed) {
            // Until no chain arrived while notifications were off.
            loop {
                vring.disable_notification().map_err(qerr)?;
                self.process_queue(vring)?;
                if !vring.enable_notification().map_err(qerr)? {
                    break;
                }
            }
        } else {
            self.process_queue(vring)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tessera_bdev::MallocBdev;
    use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::GuestAddress;

    const HDR: u64 = 0x1_0000;
    const DATA: u64 = 0x2_0000;
    const STATUS: u64 = 0x3_0000;

    fn header(t: u32, sector: u64) -> [u8; 16] {
        let mut h = [0u8; 16];
        h[..4].copy_from_slice(&t.to_le_bytes());
        h[8..].copy_from_slice(&sector.to_le_bytes());
        h
    }

    fn chain(first: u16, data_len: u32, data_writable: bool) -> Vec<RawDescriptor> {
        let mut v = vec![RawDescriptor::from(SplitDescriptor::new(HDR, 16, VRING_DESC_F_NEXT as u16, first + 1))];
        if data_len > 0 {
            let f = VRING_DESC_F_NEXT as u16 | if data_writable { VRING_DESC_F_WRITE as u16 } else { 0 };
            v.push(RawDescriptor::from(SplitDescriptor::new(DATA, data_len, f, first + 2)));
        }
        v.push(RawDescriptor::from(SplitDescriptor::new(STATUS, 1, VRING_DESC_F_WRITE as u16, 0)));
        v
    }

    /// A device over a 1 MiB RAM disk and one queue on mock guest memory; runs `chains` (each
    /// with its header) one after the other and returns (status, used length) of each.
    /// A request's header, its chain, and what its data buffer holds before it runs.
    type Case = ([u8; 16], Vec<RawDescriptor>, Option<Vec<u8>>);

    fn run(read_only: bool, requests: &[Case]) -> (Vec<(u8, u32)>, Vec<Vec<u8>>) {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        let dev = Arc::new(MallocBdev::new(4096, 256).unwrap());
        let backend = BlkBackend::new(dev, 1, "tessera-test-serial-0123", read_only, rt.handle().clone());
        let atomic: GuestMem = GuestMemoryAtomic::new(GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap());
        backend.update_memory(atomic.clone()).unwrap();
        let mem = atomic.memory();
        let vq = MockSplitQueue::new(&*mem, 16);
        let vring = VringRwLock::new(atomic.clone(), 16).unwrap();
        vring.set_queue_size(16);
        vring.set_queue_info(vq.desc_table_addr().0, vq.avail_addr().0, vq.used_addr().0).unwrap();
        vring.set_queue_ready(true);
        vring.set_enabled(true);
        let mut out = Vec::new();
        let mut data_out = Vec::new();
        for (i, (h, descs, data)) in requests.iter().enumerate() {
            mem.write_slice(h, GuestAddress(HDR)).unwrap();
            if let Some(d) = data {
                mem.write_slice(d, GuestAddress(DATA)).unwrap();
            }
            mem.write_slice(&[0xff], GuestAddress(STATUS)).unwrap();
            vq.add_desc_chains(descs, 0).unwrap();
            backend.handle_event(0, EventSet::IN, std::slice::from_ref(&vring), 0).unwrap();
            backend.drain();
            assert_eq!(usize::from(vq.used().idx().load()), i + 1, "request {i} not completed");
            let used = vq.used().ring().ref_at(i).unwrap().load();
            let mut st = [0u8];
            mem.read_slice(&mut st, GuestAddress(STATUS)).unwrap();
            out.push((st[0], used.len()));
            let mut d = vec![0u8; 8192];
            mem.read_slice(&mut d, GuestAddress(DATA)).unwrap();
            data_out.push(d);
        }
        (out, data_out)
    }

    #[test]
    fn writes_read_back_and_bad_chains_fail_alone() {
        let block: Vec<u8> = (0..8192u32).map(|i| (i * 7 % 251) as u8).collect();
        let (st, data) = run(
            false,
            &[
                // Write 8 KiB at sector 8 (block 1), read it back.
                (header(request::req_type::OUT, 8), chain(0, 8192, false), Some(block.clone())),
                (header(request::req_type::IN, 8), chain(0, 8192, true), Some(vec![0u8; 8192])),
                // A read whose data descriptor is device-readable: refused, status IOERR.
                (header(request::req_type::IN, 8), chain(0, 8192, false), None),
                // Misaligned to the 4 KiB block: IOERR.
                (header(request::req_type::IN, 1), chain(0, 4096, true), None),
                // Unknown type: UNSUPP.
                (header(99, 0), chain(0, 0, false), None),
                // Write zeroes over block 1, then read: zeros.
                (
                    header(request::req_type::WRITE_ZEROES, 0),
                    chain(0, 16, false),
                    Some([8u64.to_le_bytes().as_slice(), &8u32.to_le_bytes(), &0u32.to_le_bytes()].concat()),
                ),
                (header(request::req_type::IN, 8), chain(0, 4096, true), Some(vec![0xaa; 4096])),
                // The id, and a flush.
                (header(request::req_type::GET_ID, 0), chain(0, 20, true), None),
                (header(request::req_type::FLUSH, 0), chain(0, 0, false), None),
            ],
        );
        assert_eq!(st[0], (status::OK, 1));
        assert_eq!(st[1], (status::OK, 8193));
        assert_eq!(data[1], block);
        assert_eq!(st[2].0, status::IOERR);
        assert_eq!(st[3].0, status::IOERR);
        assert_eq!(st[4].0, status::UNSUPP);
        assert_eq!(st[5], (status::OK, 1));
        assert_eq!((st[6], &data[6][..4096]), ((status::OK, 4097), &[0u8; 4096][..]));
        assert_eq!((st[7], &data[7][..20]), ((status::OK, 21), &b"tessera-test-serial-"[..]));
        assert_eq!(st[8], (status::OK, 1));
    }

    #[test]
    fn a_read_only_device_refuses_writes() {
        let (st, _) = run(
            true,
            &[
                (header(request::req_type::OUT, 0), chain(0, 4096, false), Some(vec![1u8; 4096])),
                (header(request::req_type::IN, 0), chain(0, 4096, true), None),
            ],
        );
        assert_eq!((st[0].0, st[1].0), (status::IOERR, status::OK));
    }
}
