//! Storage backends: the only way a target touches its files.
//!
//! A [`Storage`] is one target's directory: named files that can be created, opened, renamed,
//! removed and listed. A [`StorageFile`] is positioned reads and writes plus `sync`. Three
//! implementations:
//! - [`FileStorage`]: real files under a directory (`pwrite`/`pread` + `fdatasync`; directory
//!   changes are followed by an fsync of the directory so a rename or create is durable).
//! - [`MemStorage`]: in memory, tracking what has been synced. [`MemStorage::crash_image`] returns
//!   the files as a crash would leave them: synced bytes always, unsynced writes dropped or kept.
//! - [`FaultStorage`]: wraps another storage and fails, or cuts off (tears and then refuses all
//!   later I/O, as a power cut would), the N-th write or sync.
//!
//! Directory operations (create, rename, remove) are treated as durable when they return; the file
//! implementation makes that true with a directory fsync.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

/// One open file of a target.
pub trait StorageFile: Send + Sync + std::fmt::Debug {
    /// Reads exactly `buf.len()` bytes at `off`; reading past the end is an error.
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<()>;
    /// Writes all of `data` at `off`, extending the file if needed.
    fn write_at(&self, data: &[u8], off: u64) -> io::Result<()>;
    /// Like [`StorageFile::write_at`] for whole blocks (`off` and the length multiples of
    /// [`DIRECT_ALIGN`], else `InvalidInput`), bypassing the page cache where the backend can
    /// (`O_DIRECT`): no copy into the cache, and the write has reached the device when it
    /// returns. Durability still takes a [`StorageFile::sync`].
    fn write_direct(&self, data: &[u8], off: u64) -> io::Result<()> {
        check_direct(data, off)?;
        self.write_at(data, off)
    }
    /// Makes every completed write durable (`fdatasync`).
    fn sync(&self) -> io::Result<()>;
    /// Current length in bytes.
    fn len(&self) -> io::Result<u64>;
    /// Whether the file is empty.
    fn is_empty(&self) -> io::Result<bool> {
        Ok(self.len()? == 0)
    }
    /// Truncates or extends (with zeros) to `len` bytes.
    fn set_len(&self, len: u64) -> io::Result<()>;
    /// Extends (sparsely, with zeros) to `len` bytes if shorter; never shrinks.
    fn grow_to(&self, len: u64) -> io::Result<()> {
        if self.len()? < len {
            self.set_len(len)?;
        }
        Ok(())
    }
    /// Extends to at least `len` bytes with the file system's space for all of them reserved
    /// (`fallocate`), so that writes inside never fail for want of space. Where the file system
    /// cannot reserve (and in memory) it grows the file sparse ([`StorageFile::grow_to`]).
    fn reserve(&self, len: u64) -> io::Result<()> {
        self.grow_to(len)
    }
}

/// Alignment of [`StorageFile::write_direct`]'s offset, length and (for no copy) buffer.
pub const DIRECT_ALIGN: usize = 4096;

fn check_direct(data: &[u8], off: u64) -> io::Result<()> {
    if !off.is_multiple_of(DIRECT_ALIGN as u64) || !data.len().is_multiple_of(DIRECT_ALIGN) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("direct write of {} bytes at {off} is not block-aligned", data.len()),
        ));
    }
    Ok(())
}

/// A reusable buffer whose contents start at a [`DIRECT_ALIGN`]-aligned address, for
/// [`StorageFile::write_direct`] without a second copy.
#[derive(Debug, Default)]
pub struct AlignedBuf {
    buf: Vec<u8>,
    start: usize,
    len: usize,
}

impl AlignedBuf {
    /// Buffers larger than this are not kept between uses.
    const KEEP_MAX: usize = 64 << 20;

    /// Empties the buffer, making room for `capacity` bytes.
    pub fn reset(&mut self, capacity: usize) {
        if self.buf.len() > Self::KEEP_MAX && capacity <= Self::KEEP_MAX {
            self.buf = Vec::new();
        }
        let need = capacity + DIRECT_ALIGN;
        if self.buf.len() < need {
            self.buf = vec![0; need];
        }
        self.start = self.buf.as_ptr().align_offset(DIRECT_ALIGN).min(DIRECT_ALIGN);
        self.len = 0;
    }

    /// Appends `data`, growing (and moving) the buffer if needed.
    pub fn extend_from_slice(&mut self, data: &[u8]) {
        let end = self.grow(data.len());
        self.buf[self.start + self.len..self.start + end].copy_from_slice(data);
        self.len = end;
    }

    /// Pads with zeros to `len` bytes (no-op if already that long).
    pub fn pad_to(&mut self, len: usize) {
        if len > self.len {
            self.grow(len - self.len);
            self.buf[self.start + self.len..self.start + len].fill(0);
            self.len = len;
        }
    }

    /// Makes room for `more` bytes after the contents (moving them if the buffer grows);
    /// returns the length they will end at.
    fn grow(&mut self, more: usize) -> usize {
        let end = self.len + more;
        if self.start + end > self.buf.len() {
            let old = std::mem::take(&mut self.buf);
            let (start, len) = (self.start, self.len);
            self.reset(end.max(len * 2));
            self.buf[self.start..self.start + len].copy_from_slice(&old[start..start + len]);
            self.len = len;
        }
        end
    }

    /// Bytes held.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The contents, starting at an aligned address.
    pub fn as_slice(&self) -> &[u8] {
        &self.buf[self.start..self.start + self.len]
    }
}

/// A target's directory of files.
pub trait Storage: Send + Sync + std::fmt::Debug {
    /// Opens `name`, creating it empty if `create` and it does not exist.
    fn open(&self, name: &str, create: bool) -> io::Result<Arc<dyn StorageFile>>;
    /// Atomically replaces `to` with `from`.
    fn rename(&self, from: &str, to: &str) -> io::Result<()>;
    /// Removes `name`; removing a missing file is not an error.
    fn remove(&self, name: &str) -> io::Result<()>;
    /// Names of all files, sorted.
    fn list(&self) -> io::Result<Vec<String>>;
}

/// Real files in one directory.
#[derive(Debug)]
pub struct FileStorage {
    dir: PathBuf,
}

impl FileStorage {
    /// Uses (and creates if missing) `dir`.
    pub fn new(dir: &Path) -> io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        Ok(Self { dir: dir.to_path_buf() })
    }

    fn sync_dir(&self) -> io::Result<()> {
        File::open(&self.dir)?.sync_all()
    }
}

#[derive(Debug)]
struct RealFile {
    file: File,
    path: PathBuf,
    /// A second descriptor opened with `O_DIRECT` on first use; `None` where the filesystem
    /// refuses it (tmpfs), and then direct writes go through the page cache.
    direct: OnceLock<Option<File>>,
}

impl RealFile {
    fn direct(&self) -> Option<&File> {
        self.direct
            .get_or_init(|| {
                let opened = OpenOptions::new().write(true).custom_flags(libc::O_DIRECT).open(&self.path);
                match opened {
                    Ok(f) => Some(f),
                    Err(e) => {
                        tracing::info!(path = %self.path.display(), error = %e, "O_DIRECT refused here: direct writes go through the page cache");
                        None
                    }
                }
            })
            .as_ref()
    }
}

impl StorageFile for RealFile {
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, off)
    }
    fn write_at(&self, data: &[u8], off: u64) -> io::Result<()> {
        self.file.write_all_at(data, off)
    }
    fn write_direct(&self, data: &[u8], off: u64) -> io::Result<()> {
        check_direct(data, off)?;
        let Some(direct) = self.direct() else { return self.file.write_all_at(data, off) };
        if data.as_ptr().align_offset(DIRECT_ALIGN) == 0 {
            return direct.write_all_at(data, off);
        }
        let mut aligned = AlignedBuf::default();
        aligned.reset(data.len());
        aligned.extend_from_slice(data);
        direct.write_all_at(aligned.as_slice(), off)
    }
    fn sync(&self) -> io::Result<()> {
        self.file.sync_data()
    }
    fn len(&self) -> io::Result<u64> {
        Ok(self.file.metadata()?.len())
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.file.set_len(len)
    }
    fn reserve(&self, len: u64) -> io::Result<()> {
        match rustix::fs::fallocate(&self.file, rustix::fs::FallocateFlags::empty(), 0, len) {
            Ok(()) => Ok(()),
            Err(e) if e == rustix::io::Errno::OPNOTSUPP || e == rustix::io::Errno::NOSYS => self.grow_to(len),
            Err(e) => Err(e.into()),
        }
    }
}

impl Storage for FileStorage {
    fn open(&self, name: &str, create: bool) -> io::Result<Arc<dyn StorageFile>> {
        let path = self.dir.join(name);
        let existed = path.exists();
        let file = OpenOptions::new().read(true).write(true).create(create).truncate(false).open(&path)?;
        if !existed {
            self.sync_dir()?;
        }
        Ok(Arc::new(RealFile { file, path, direct: OnceLock::new() }))
    }
    fn rename(&self, from: &str, to: &str) -> io::Result<()> {
        std::fs::rename(self.dir.join(from), self.dir.join(to))?;
        self.sync_dir()
    }
    fn remove(&self, name: &str) -> io::Result<()> {
        match std::fs::remove_file(self.dir.join(name)) {
            Ok(()) => self.sync_dir(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        }
    }
    fn list(&self) -> io::Result<Vec<String>> {
        let mut names = Vec::new();
        for entry in std::fs::read_dir(&self.dir)? {
            if let Some(name) = entry?.file_name().to_str() {
                names.push(name.to_string());
            }
        }
        names.sort();
        Ok(names)
    }
}

/// One in-memory file: what a reader sees now, and the writes not yet synced.
#[derive(Debug, Default, Clone)]
struct MemFileState {
    /// Content as readers see it (synced and unsynced writes applied).
    current: Vec<u8>,
    /// Content as of the last sync.
    synced: Vec<u8>,
}

type MemFiles = Arc<Mutex<BTreeMap<String, Arc<Mutex<MemFileState>>>>>;

/// Files in memory, with the synced state tracked for crash images.
#[derive(Debug, Default, Clone)]
pub struct MemStorage {
    files: MemFiles,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[derive(Debug)]
struct MemFile(Arc<Mutex<MemFileState>>);

impl StorageFile for MemFile {
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        let f = lock(&self.0);
        let start = usize::try_from(off).map_err(|_| eof())?;
        let src = start.checked_add(buf.len()).and_then(|end| f.current.get(start..end)).ok_or_else(eof)?;
        buf.copy_from_slice(src);
        Ok(())
    }
    fn write_at(&self, data: &[u8], off: u64) -> io::Result<()> {
        let mut f = lock(&self.0);
        write_into(&mut f.current, data, off);
        Ok(())
    }
    fn sync(&self) -> io::Result<()> {
        let mut f = lock(&self.0);
        f.synced = f.current.clone();
        Ok(())
    }
    fn len(&self) -> io::Result<u64> {
        Ok(lock(&self.0).current.len() as u64)
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        let len = usize::try_from(len).map_err(|_| io::Error::other("length too large"))?;
        lock(&self.0).current.resize(len, 0);
        Ok(())
    }
}

fn eof() -> io::Error {
    io::Error::new(io::ErrorKind::UnexpectedEof, "read past end of file")
}

fn write_into(buf: &mut Vec<u8>, data: &[u8], off: u64) {
    let start = off as usize;
    let end = start + data.len();
    if buf.len() < end {
        buf.resize(end, 0);
    }
    if let Some(dst) = buf.get_mut(start..end) {
        dst.copy_from_slice(data);
    }
}

impl MemStorage {
    /// An empty directory.
    pub fn new() -> Self {
        Self::default()
    }

    /// The files as a crash leaves them. `keep_unsynced`: the process died but the kernel kept
    /// its page cache, so every write is still readable yet only the synced part is on disk
    /// (a later power cut, [`MemStorage::crash_image`] with `false`, loses the rest). Otherwise
    /// a power cut: only synced content survives.
    pub fn crash_image(&self, keep_unsynced: bool) -> MemStorage {
        let files = lock(&self.files);
        let copied = files
            .iter()
            .map(|(name, f)| {
                let f = lock(f);
                let current = if keep_unsynced { f.current.clone() } else { f.synced.clone() };
                (name.clone(), Arc::new(Mutex::new(MemFileState { current, synced: f.synced.clone() })))
            })
            .collect();
        MemStorage { files: Arc::new(Mutex::new(copied)) }
    }

    /// Raw current content of `name` (tests flip bytes in it with [`MemStorage::corrupt`]).
    pub fn contents(&self, name: &str) -> Option<Vec<u8>> {
        lock(&self.files).get(name).map(|f| lock(f).current.clone())
    }

    /// XORs `mask` into the byte at `off` of `name`, in both current and synced content.
    pub fn corrupt(&self, name: &str, off: usize, mask: u8) -> bool {
        let files = lock(&self.files);
        let Some(f) = files.get(name) else { return false };
        let mut guard = lock(f);
        let f = &mut *guard;
        let mut hit = false;
        for buf in [&mut f.current, &mut f.synced] {
            if let Some(b) = buf.get_mut(off) {
                *b ^= mask;
                hit = true;
            }
        }
        hit
    }
}

impl Storage for MemStorage {
    fn open(&self, name: &str, create: bool) -> io::Result<Arc<dyn StorageFile>> {
        let mut files = lock(&self.files);
        if let Some(f) = files.get(name) {
            return Ok(Arc::new(MemFile(f.clone())));
        }
        if !create {
            return Err(io::Error::new(io::ErrorKind::NotFound, format!("{name}: no such file")));
        }
        let f = Arc::new(Mutex::new(MemFileState::default()));
        files.insert(name.to_string(), f.clone());
        Ok(Arc::new(MemFile(f)))
    }
    fn rename(&self, from: &str, to: &str) -> io::Result<()> {
        let mut files = lock(&self.files);
        let f = files.remove(from).ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, format!("{from}: no such file")))?;
        files.insert(to.to_string(), f);
        Ok(())
    }
    fn remove(&self, name: &str) -> io::Result<()> {
        lock(&self.files).remove(name);
        Ok(())
    }
    fn list(&self) -> io::Result<Vec<String>> {
        Ok(lock(&self.files).keys().cloned().collect())
    }
}

/// What happens at the chosen operation of a [`FaultStorage`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The operation returns an error; later operations work.
    Fail,
    /// Power cut: a write persists only its first `keep` bytes (a sync does nothing), and every
    /// later operation fails.
    Cut { keep: usize },
}

#[derive(Debug)]
struct FaultState {
    /// Writes and syncs seen so far.
    ops: u64,
    /// 1-based index of the operation to fault.
    at: u64,
    fault: Fault,
    cut: bool,
}

/// Wraps a storage and injects one fault at the N-th write or sync (counted across all files).
#[derive(Debug, Clone)]
pub struct FaultStorage {
    inner: Arc<dyn Storage>,
    state: Arc<Mutex<FaultState>>,
}

impl FaultStorage {
    /// Faults operation number `at` (1-based; 0 never faults).
    pub fn new(inner: Arc<dyn Storage>, at: u64, fault: Fault) -> Self {
        Self { inner, state: Arc::new(Mutex::new(FaultState { ops: 0, at, fault, cut: false })) }
    }

    /// Writes and syncs performed (or attempted) so far.
    pub fn ops(&self) -> u64 {
        lock(&self.state).ops
    }

    /// Whether the power cut has happened.
    pub fn is_cut(&self) -> bool {
        lock(&self.state).cut
    }

    fn check_alive(&self) -> io::Result<()> {
        if lock(&self.state).cut {
            return Err(io::Error::other("injected power cut: device gone"));
        }
        Ok(())
    }

    /// Counts an operation; returns the fault to apply to it, if any.
    fn next_op(&self) -> io::Result<Option<Fault>> {
        let mut s = lock(&self.state);
        if s.cut {
            return Err(io::Error::other("injected power cut: device gone"));
        }
        s.ops += 1;
        if s.ops != s.at {
            return Ok(None);
        }
        if let Fault::Cut { .. } = s.fault {
            s.cut = true;
        }
        Ok(Some(s.fault))
    }
}

#[derive(Debug)]
struct FaultFile {
    inner: Arc<dyn StorageFile>,
    storage: FaultStorage,
}

impl StorageFile for FaultFile {
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        self.storage.check_alive()?;
        self.inner.read_at(buf, off)
    }
    fn write_at(&self, data: &[u8], off: u64) -> io::Result<()> {
        match self.storage.next_op()? {
            None => self.inner.write_at(data, off),
            Some(Fault::Fail) => Err(io::Error::other("injected write failure")),
            Some(Fault::Cut { keep }) => {
                let torn = data.get(..keep.min(data.len())).unwrap_or_default();
                self.inner.write_at(torn, off)?;
                Err(io::Error::other("injected power cut during write"))
            }
        }
    }
    fn write_direct(&self, data: &[u8], off: u64) -> io::Result<()> {
        check_direct(data, off)?;
        self.write_at(data, off)
    }
    fn sync(&self) -> io::Result<()> {
        match self.storage.next_op()? {
            None => self.inner.sync(),
            Some(Fault::Fail) => Err(io::Error::other("injected sync failure")),
            Some(Fault::Cut { .. }) => Err(io::Error::other("injected power cut during sync")),
        }
    }
    fn len(&self) -> io::Result<u64> {
        self.storage.check_alive()?;
        self.inner.len()
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.storage.check_alive()?;
        self.inner.set_len(len)
    }
}

impl Storage for FaultStorage {
    fn open(&self, name: &str, create: bool) -> io::Result<Arc<dyn StorageFile>> {
        self.check_alive()?;
        Ok(Arc::new(FaultFile { inner: self.inner.open(name, create)?, storage: self.clone() }))
    }
    fn rename(&self, from: &str, to: &str) -> io::Result<()> {
        self.check_alive()?;
        self.inner.rename(from, to)
    }
    fn remove(&self, name: &str) -> io::Result<()> {
        self.check_alive()?;
        self.inner.remove(name)
    }
    fn list(&self) -> io::Result<Vec<String>> {
        self.check_alive()?;
        self.inner.list()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reserved_file_has_its_blocks() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let storage = FileStorage::new(dir.path()).unwrap();
        let f = storage.open("d", true).unwrap();
        f.reserve(4 << 20).unwrap();
        assert_eq!(f.len().unwrap(), 4 << 20);
        let allocated = std::fs::metadata(dir.path().join("d")).unwrap().blocks() * 512;
        assert!(allocated >= 4 << 20, "{allocated} bytes allocated: the file is sparse");
    }

    #[test]
    fn mem_crash_image_drops_unsynced_writes() {
        let s = MemStorage::new();
        let f = s.open("a", true).unwrap();
        f.write_at(b"hello", 0).unwrap();
        f.sync().unwrap();
        f.write_at(b"world", 5).unwrap();
        let lost = s.crash_image(false);
        assert_eq!(lost.contents("a").unwrap(), b"hello");
        let kept = s.crash_image(true);
        assert_eq!(kept.contents("a").unwrap(), b"helloworld");
        assert_eq!(kept.crash_image(false).contents("a").unwrap(), b"hello");
    }

    #[test]
    fn fault_cut_tears_write_and_stops_io() {
        let mem = MemStorage::new();
        let s = FaultStorage::new(Arc::new(mem.clone()), 2, Fault::Cut { keep: 3 });
        let f = s.open("a", true).unwrap();
        f.write_at(b"abcd", 0).unwrap();
        assert!(f.write_at(b"efgh", 4).is_err());
        assert!(s.is_cut());
        assert!(f.sync().is_err());
        assert!(s.open("b", true).is_err());
        assert_eq!(mem.contents("a").unwrap(), b"abcdefg");
    }

    #[test]
    fn fault_fail_is_one_shot() {
        let mem = MemStorage::new();
        let s = FaultStorage::new(Arc::new(mem), 1, Fault::Fail);
        let f = s.open("a", true).unwrap();
        assert!(f.sync().is_err());
        f.write_at(b"x", 0).unwrap();
        f.sync().unwrap();
    }

    #[test]
    fn file_storage_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let s = FileStorage::new(dir.path()).unwrap();
        let f = s.open("x", true).unwrap();
        f.write_at(b"data", 10).unwrap();
        f.sync().unwrap();
        let mut buf = [0u8; 4];
        f.read_at(&mut buf, 10).unwrap();
        assert_eq!(&buf, b"data");
        assert_eq!(f.len().unwrap(), 14);
        s.rename("x", "y").unwrap();
        assert_eq!(s.list().unwrap(), vec!["y".to_string()]);
        s.remove("y").unwrap();
        s.remove("y").unwrap();
        assert!(s.open("y", false).is_err());
    }

    #[test]
    fn direct_writes_take_whole_blocks_from_any_buffer_and_read_back_buffered() {
        let dir = tempfile::tempdir().unwrap();
        let s = FileStorage::new(dir.path()).unwrap();
        let f = s.open("d", true).unwrap();
        f.write_at(&[9u8; 100], 0).unwrap();
        let mut cached = [0u8; 100];
        f.read_at(&mut cached, 0).unwrap();
        // An unaligned buffer is copied; an aligned one is written as is.
        let block: Vec<u8> = (0..2 * DIRECT_ALIGN + 1).map(|i| i as u8).collect();
        f.write_direct(&block[1..], 0).unwrap();
        let mut aligned = AlignedBuf::default();
        aligned.reset(DIRECT_ALIGN);
        aligned.extend_from_slice(&[7u8; DIRECT_ALIGN]);
        assert_eq!(aligned.as_slice().as_ptr().align_offset(DIRECT_ALIGN), 0);
        f.write_direct(aligned.as_slice(), 3 * DIRECT_ALIGN as u64).unwrap();
        f.sync().unwrap();
        // Buffered reads see the direct writes (the page cache read before is not stale).
        let mut back = vec![0u8; 4 * DIRECT_ALIGN];
        f.read_at(&mut back, 0).unwrap();
        assert_eq!(&back[..2 * DIRECT_ALIGN], &block[1..]);
        assert!(back[2 * DIRECT_ALIGN..3 * DIRECT_ALIGN].iter().all(|b| *b == 0), "a hole reads as zeros");
        assert!(back[3 * DIRECT_ALIGN..].iter().all(|b| *b == 7));
        for (len, off) in [(100, 0), (DIRECT_ALIGN, 512)] {
            let e = f.write_direct(&block[..len], off).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::InvalidInput, "{len} bytes at {off}");
        }
        let mem = MemStorage::new().open("m", true).unwrap();
        assert_eq!(mem.write_direct(&[0u8; 10], 0).unwrap_err().kind(), io::ErrorKind::InvalidInput);
    }

    #[test]
    fn aligned_buf_keeps_contents_and_alignment_as_it_grows() {
        let mut b = AlignedBuf::default();
        b.reset(10);
        let mut expect = Vec::new();
        for i in 0..50u8 {
            let piece = vec![i; 1000 + i as usize * 37];
            b.extend_from_slice(&piece);
            expect.extend_from_slice(&piece);
            assert_eq!(b.as_slice(), &expect[..]);
            assert_eq!(b.as_slice().as_ptr().align_offset(DIRECT_ALIGN), 0);
        }
        b.pad_to(expect.len().next_multiple_of(DIRECT_ALIGN));
        assert_eq!(b.len() % DIRECT_ALIGN, 0);
        assert!(b.as_slice()[expect.len()..].iter().all(|x| *x == 0));
        b.reset(0);
        assert!(b.is_empty());
    }
}
