//! Scrub steps and repair fences. [`Target::scrub_step`] verifies the stored CRC64s of every
//! value in index order, in steps bounded by bytes read; a dkey being repaired from redundancy is
//! fenced ([`Target::set_fence`], kept in [`FENCE_FILE`]): fetches of it fail until the repair is
//! done.

#[allow(clippy::wildcard_imports)] // the parent module's types and imports, as if this were its body
use super::*;

/// Where a scrub resumes: chunk `chunk` of the stored value `item` of the akey at `path`, or the
/// first value after it in index order when it is gone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScrubCursor {
    pub path: AkeyPath,
    pub item: ItemKey,
    pub chunk: u64,
}

/// A stored value whose data failed its checksum or could not be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadExtent {
    pub cont: u128,
    pub obj: u128,
    pub dkey: Bytes,
    pub akey: Bytes,
    /// The extent's offset in the akey (0 for a single value).
    pub offset: u64,
    pub len: u64,
    pub epoch: u64,
}

/// What one scrub step verified ([`Target::scrub_step`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ScrubStep {
    /// Where the next step resumes; `None` when this one reached the end of the index.
    pub next: Option<ScrubCursor>,
    /// Stored values finished (their last chunk verified) in this step, bad ones included.
    pub extents: u64,
    /// Bytes verified (read from the data file, or inline).
    pub bytes: u64,
    /// The same per container, in index order: (container, values, bytes).
    pub by_cont: Vec<(u128, u64, u64)>,
    /// Values that failed.
    pub bad: Vec<BadExtent>,
}

impl ScrubStep {
    fn count(&mut self, cont: u128, extents: u64, bytes: u64) {
        self.extents += extents;
        self.bytes += bytes;
        match self.by_cont.last_mut() {
            Some((c, e, b)) if *c == cont => {
                *e += extents;
                *b += bytes;
            }
            _ => self.by_cont.push((cont, extents, bytes)),
        }
    }
}

/// A dkey of an object whose data on this target is being repaired: fetches of it fail with
/// [`EngineError::DataCorrupt`] (clients read it from redundancy) until the fence is lifted.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Fence {
    pub cont: u128,
    pub obj: u128,
    pub dkey: Bytes,
}

impl Fence {
    /// The fence covering `path`.
    pub fn of(path: &AkeyPath) -> Fence {
        Fence { cont: path.cont, obj: path.obj, dkey: path.dkey.clone() }
    }
}

/// The fence file: one line per fence, `<cont> <obj> <dkey>`, each in lower-case hexadecimal
/// (container and object 32 digits, the dkey two per byte, empty for an empty dkey).
fn encode_fences(fences: &BTreeSet<Fence>) -> String {
    let mut out = String::new();
    for f in fences {
        let _ = write!(out, "{:032x} {:032x} ", f.cont, f.obj);
        for b in f.dkey.iter() {
            let _ = write!(out, "{b:02x}");
        }
        out.push('\n');
    }
    out
}

pub(super) fn decode_fences(text: &str) -> Result<BTreeSet<Fence>, String> {
    let mut out = BTreeSet::new();
    for (n, line) in text.lines().enumerate() {
        let bad = || format!("line {}: not `<cont> <obj> <dkey>` in hexadecimal: {line:?}", n + 1);
        let mut parts = line.split(' ');
        let (Some(c), Some(o), Some(d), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else { return Err(bad()) };
        let cont = u128::from_str_radix(c, 16).map_err(|_| bad())?;
        let obj = u128::from_str_radix(o, 16).map_err(|_| bad())?;
        if d.len() % 2 != 0 || d.len() > 2 * KEY_MAX {
            return Err(bad());
        }
        let dkey =
            (0..d.len()).step_by(2).map(|i| d.get(i..i + 2).and_then(|h| u8::from_str_radix(h, 16).ok())).collect::<Option<Vec<u8>>>();
        out.insert(Fence { cont, obj, dkey: Bytes::from(dkey.ok_or_else(bad)?) });
    }
    Ok(out)
}

impl Target {
    /// Verifies the stored CRC64s of the values after `from` (from the start of the index with
    /// `None`), in index order, reading at most `max_bytes` (at least one chunk) and looking at
    /// most [`SCRUB_STEP_ITEMS`] values. A value larger than what is left of the budget is
    /// verified over several steps (the cursor names its next chunk). A value whose data fails
    /// its checksum, or cannot be read, is reported in `bad` and the rest of it skipped.
    /// Reads the committed index and the data file only: it may run between any two requests.
    pub fn scrub_step(&self, from: Option<&ScrubCursor>, max_bytes: u64) -> ScrubStep {
        let mut chunks_left = (max_bytes / BLOCK).max(1);
        let mut items = 0usize;
        let mut out = ScrubStep::default();
        let mut next = None;
        self.index.visit_stored(from.map(|c| (&c.path, c.item)), |path, item, stored| {
            let chunks = stored.len.div_ceil(BLOCK);
            let first = from.filter(|c| c.item == item && c.path == *path).map_or(0, |c| c.chunk).min(chunks);
            if items >= SCRUB_STEP_ITEMS || chunks_left == 0 {
                next = Some(ScrubCursor { path: path.clone(), item, chunk: first });
                return false;
            }
            let end = chunks.min(first + chunks_left);
            chunks_left -= end - first;
            let bytes = (end * BLOCK).min(stored.len) - first * BLOCK;
            match self.verify_chunks(stored, first, end) {
                Ok(()) if end < chunks => {
                    out.count(path.cont, 0, bytes);
                    next = Some(ScrubCursor { path: path.clone(), item, chunk: end });
                    return false;
                }
                Ok(()) => out.count(path.cont, 1, bytes),
                Err(reason) => {
                    out.count(path.cont, 1, bytes);
                    let (offset, epoch) = match item {
                        ItemKey::Extent { offset, version } => (offset, version.epoch),
                        ItemKey::Single(v) => (0, v.epoch),
                    };
                    warn!(cont = %format_args!("{:032x}", path.cont), dkey = ?path.dkey, akey = ?path.akey, offset, len = stored.len, epoch, %reason, "scrub: stored data is bad");
                    out.bad.push(BadExtent {
                        cont: path.cont,
                        obj: path.obj,
                        dkey: path.dkey.clone(),
                        akey: path.akey.clone(),
                        offset,
                        len: stored.len,
                        epoch,
                    });
                }
            }
            items += 1;
            true
        });
        out.next = next;
        out
    }

    pub(super) fn check_fence(&self, path: &AkeyPath) -> Result<(), EngineError> {
        if !self.fences.is_empty() && self.fences.contains(&Fence::of(path)) {
            return Err(EngineError::DataCorrupt(format!("dkey {:?} is being repaired from redundancy", path.dkey)));
        }
        Ok(())
    }

    /// Whether fetches of `path`'s dkey are fenced off.
    pub fn is_fenced(&self, path: &AkeyPath) -> bool {
        !self.fences.is_empty() && self.fences.contains(&Fence::of(path))
    }

    /// The fences in place (also those of repairs a crash interrupted).
    pub fn fences(&self) -> Vec<Fence> {
        self.fences.iter().cloned().collect()
    }

    /// Puts up (`on`) or lifts a fence and makes the set durable in [`FENCE_FILE`] (written
    /// whole to a `.tmp` file, synced, renamed; removed when empty), so that a crash in the
    /// middle of a repair still reads that dkey from redundancy after the restart. A fence that
    /// cannot be made durable is not put up; a lifted one is lifted even if the file could not
    /// be rewritten (it comes back after a restart, which only repeats the repair).
    pub fn set_fence(&mut self, fence: Fence, on: bool) -> Result<(), EngineError> {
        let changed = if on { self.fences.insert(fence.clone()) } else { self.fences.remove(&fence) };
        if !changed {
            return Ok(());
        }
        let result = self.write_fences();
        if result.is_err() && on {
            self.fences.remove(&fence);
        }
        result
    }

    fn write_fences(&self) -> Result<(), EngineError> {
        if self.fences.is_empty() {
            return self.storage.remove(FENCE_FILE).map_err(|e| EngineError::io(FENCE_FILE, e));
        }
        let tmp = format!("{FENCE_FILE}.tmp");
        let f = self.storage.open(&tmp, true).map_err(|e| EngineError::io(&tmp, e))?;
        let text = encode_fences(&self.fences);
        f.set_len(0).map_err(|e| EngineError::io(&tmp, e))?;
        f.write_at(text.as_bytes(), 0).map_err(|e| EngineError::io(&tmp, e))?;
        f.sync().map_err(|e| EngineError::io(&tmp, e))?;
        self.storage.rename(&tmp, FENCE_FILE).map_err(|e| EngineError::io(FENCE_FILE, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::MemStorage;
    use crate::target::tests::{p, small};

    /// A target of 1 MiB holding, in index order: container 1 (dkeys "a".."c": arrays of
    /// 10 KiB, 64 KiB and 100 bytes inline, a range punch, a 5000-byte single value) and
    /// container 2 (one 20 KiB array). Returns the target and (values, bytes) it stores.
    fn scrub_fixture(mem: &MemStorage) -> (Target, u64, u64) {
        let cfg = TargetConfig { capacity: 256 * BLOCK, ..small() };
        let mut t = Target::open(Arc::new(mem.clone()), cfg).unwrap();
        let arr = |cont, dkey: &'static [u8], off: u64, len: usize, fill: u8| Mutation::Update {
            path: AkeyPath { cont, obj: 7, dkey: Bytes::from_static(dkey), akey: Bytes::from_static(b"x") },
            epoch: 10,
            value: UpdateValue::array(off, Bytes::from((0..len).map(|i| fill.wrapping_add(i as u8)).collect::<Vec<u8>>())),
        };
        t.stage(arr(1, b"a", 0, 10 * 1024, 1)).unwrap();
        t.stage(arr(1, b"b", 4096, 64 * 1024, 2)).unwrap();
        t.stage(arr(1, b"b", 1 << 20, 100, 3)).unwrap();
        let punch = PunchTarget::Range { dkey: Bytes::from_static(b"b"), akey: Bytes::from_static(b"x"), offset: 0, len: 100 };
        t.stage(Mutation::Punch { cont: 1, obj: 7, epoch: 11, what: punch }).unwrap();
        t.stage(Mutation::Update { path: p(b"c", b"s"), epoch: 12, value: UpdateValue::single(Bytes::from(vec![9u8; 5000])) }).unwrap();
        t.stage(arr(2, b"a", 0, 20 * 1024, 4)).unwrap();
        t.commit().unwrap();
        (t, 5, (10 + 64 + 20) * 1024 + 100 + 5000)
    }

    /// Scrubs the whole target in steps of `max_bytes`: (values, bytes, bad, steps), checking
    /// that no step reads more than its budget.
    fn scrub_all(t: &Target, max_bytes: u64) -> (u64, u64, Vec<BadExtent>, usize) {
        let (mut values, mut bytes, mut bad, mut steps) = (0, 0, Vec::new(), 0);
        let mut from = None;
        loop {
            let step = t.scrub_step(from.as_ref(), max_bytes);
            assert!(step.bytes <= max_bytes.max(BLOCK), "a step read {} bytes, budget {max_bytes}", step.bytes);
            assert_eq!(step.by_cont.iter().map(|c| (c.1, c.2)).fold((0, 0), |a, c| (a.0 + c.0, a.1 + c.1)), (step.extents, step.bytes));
            values += step.extents;
            bytes += step.bytes;
            bad.extend(step.bad);
            steps += 1;
            match step.next {
                Some(c) => from = Some(c),
                None => return (values, bytes, bad, steps),
            }
        }
    }

    #[test]
    fn scrub_step_finds_exactly_the_corrupt_chunk_within_its_budget() {
        let mem = MemStorage::new();
        let (t, values, bytes) = scrub_fixture(&mem);
        let whole = t.scrub_step(None, 16 << 20);
        assert_eq!((whole.extents, whole.bytes, whole.bad.len(), whole.next.is_none()), (values, bytes, 0, true));
        assert_eq!(whole.by_cont, vec![(1, 4, (10 + 64) * 1024 + 100 + 5000), (2, 1, 20 * 1024)]);
        assert_eq!(scrub_all(&t, 8192), (values, bytes, Vec::new(), 14), "27 chunks, two per step");

        // Flip one byte in chunk 5 of the 64 KiB extent of dkey "b".
        let mut loc = None;
        t.index().visit_stored(None, |path, item, stored| {
            if path.dkey == Bytes::from_static(b"b") && stored.len == 64 * 1024 {
                loc = Some((item, stored.blocks().unwrap().0));
            }
            true
        });
        let (item, start) = loc.unwrap();
        assert_eq!(item, ItemKey::Extent { offset: 4096, version: Version { epoch: 10, id: 1 } });
        let data = mem.open(DATA_FILE, false).unwrap();
        let at = (start + 5) * BLOCK + 7;
        let mut b = [0u8; 1];
        data.read_at(&mut b, at).unwrap();
        data.write_at(&[b[0] ^ 0x5a], at).unwrap();

        let expect = BadExtent {
            cont: 1,
            obj: 7,
            dkey: Bytes::from_static(b"b"),
            akey: Bytes::from_static(b"x"),
            offset: 4096,
            len: 64 * 1024,
            epoch: 10,
        };
        let whole = t.scrub_step(None, 16 << 20);
        assert_eq!((whole.extents, whole.bad.clone()), (values, vec![expect.clone()]));
        // In small steps: the same one, found once, and the rest of it skipped.
        for budget in [0, 4096, 8192, 12 * 1024, 1 << 20] {
            let (v, by, bad, _) = scrub_all(&t, budget);
            assert_eq!((v, bad), (values, vec![expect.clone()]), "budget {budget}");
            // Chunk by chunk, the ten after the bad one are skipped.
            assert_eq!(by, if budget <= 4096 { bytes - 10 * BLOCK } else { by.min(bytes) }, "budget {budget}");
        }
        // A fetch sees the same corruption.
        assert!(matches!(t.fetch_array(&p(b"b", b"x"), 4096, 64 * 1024, 20), Err(EngineError::DataCorrupt(_))));
    }

    #[test]
    fn scrub_cursor_resumes_after_changes_to_the_index() {
        let mem = MemStorage::new();
        let (mut t, values, _) = scrub_fixture(&mem);
        // Stop inside the 64 KiB extent of "b".
        let first = t.scrub_step(None, 16 * 1024);
        let c = first.next.clone().unwrap();
        assert_eq!(
            (c.path.dkey.as_ref(), c.item, c.chunk),
            (&b"b"[..], ItemKey::Extent { offset: 4096, version: Version { epoch: 10, id: 1 } }, 1)
        );
        assert_eq!((first.extents, first.bytes), (1, 10 * 1024 + 4096));
        let second = t.scrub_step(Some(&c), 4 * 4096);
        assert_eq!((second.extents, second.bytes, second.next.as_ref().map(|n| n.chunk)), (0, 4 * 4096, Some(5)));
        // Meanwhile: a value before the cursor (not seen in this pass), one after it (seen), and
        // the value under the cursor is discarded (the scrub goes on with the next one).
        let new = |dkey: &'static [u8]| Mutation::Update {
            path: AkeyPath { cont: 1, obj: 7, dkey: Bytes::from_static(dkey), akey: Bytes::from_static(b"x") },
            epoch: 20,
            value: UpdateValue::array(0, Bytes::from(vec![5u8; 8192])),
        };
        t.stage(new(b"a")).unwrap();
        t.stage(new(b"bb")).unwrap();
        t.commit().unwrap();
        let (mut rest_values, mut rest_bytes) = (0, 0);
        let mut from = second.next.clone();
        while let Some(c) = from {
            let s = t.scrub_step(Some(&c), 16 << 20);
            rest_values += s.extents;
            rest_bytes += s.bytes;
            from = s.next;
        }
        // The rest of "b" (11 chunks), "b" inline, "bb", "c", container 2.
        assert_eq!((rest_values, rest_bytes), (values - 1 + 1, 11 * 4096 + 100 + 8192 + 5000 + 20 * 1024));

        let c = second.next.unwrap();
        t.stage(Mutation::Discard { cont: 1, obj: 7, above: 0, below: u64::MAX, dkey: Some(Bytes::from_static(b"b")) }).unwrap();
        t.commit().unwrap();
        let s = t.scrub_step(Some(&c), 16 << 20);
        assert_eq!((s.extents, s.bytes), (3, 8192 + 5000 + 20 * 1024), "resumes at \"bb\"");
    }

    #[test]
    fn fences_fail_fetches_of_their_dkey_and_survive_a_restart() {
        let mem = MemStorage::new();
        let (mut t, _, _) = scrub_fixture(&mem);
        let b = AkeyPath { cont: 1, obj: 7, dkey: Bytes::from_static(b"b"), akey: Bytes::from_static(b"x") };
        let a = AkeyPath { dkey: Bytes::from_static(b"a"), ..b.clone() };
        let fence = Fence::of(&b);
        t.set_fence(fence.clone(), true).unwrap();
        let weird = Fence { cont: u128::MAX, obj: 0, dkey: Bytes::new() };
        t.set_fence(weird.clone(), true).unwrap();
        assert!(matches!(t.fetch_array(&b, 4096, 4096, 20), Err(EngineError::DataCorrupt(_))));
        assert!(t.fetch_array(&a, 0, 4096, 20).is_ok(), "other dkeys are served");
        assert!(t.is_fenced(&b) && !t.is_fenced(&a));
        drop(t);
        // A crash in the middle of the repair: still fenced after the restart.
        let mut t = Target::open(Arc::new(mem.crash_image(false)), TargetConfig { capacity: 256 * BLOCK, ..small() }).unwrap();
        assert_eq!(t.fences(), vec![fence.clone(), weird.clone()]);
        assert!(matches!(t.fetch_array(&b, 4096, 4096, 20), Err(EngineError::DataCorrupt(_))));
        t.set_fence(fence, false).unwrap();
        t.set_fence(weird, false).unwrap();
        assert!(t.fetch_array(&b, 4096, 4096, 20).is_ok());
        assert!(!t.storage.list().unwrap().iter().any(|n| n.starts_with(FENCE_FILE)));
        // The file format: lines of hexadecimal.
        let set: BTreeSet<Fence> = [Fence { cont: 1, obj: 2, dkey: Bytes::from_static(&[0, 0xff, 7]) }].into();
        assert_eq!(encode_fences(&set), format!("{:032x} {:032x} 00ff07\n", 1, 2));
        assert_eq!(decode_fences(&encode_fences(&set)).unwrap(), set);
        for bad in ["1 2", "1 2 3", "x 2 00", "1 2 00 00", "1 2 0g"] {
            assert!(decode_fences(bad).is_err(), "{bad}");
        }
    }
}
