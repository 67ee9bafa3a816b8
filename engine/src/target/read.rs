//! Fetches: reading array and single values at an epoch from the index and the data file,
//! verifying the stored CRC64s, and returning the data with checksums of the returned bytes.

#[allow(clippy::wildcard_imports)] // the parent module's types and imports, as if this were its body
use super::*;

/// The result of an array fetch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FetchedArray {
    pub data: Bytes,
    /// (offset in `data`, length) of each hole.
    pub holes: Vec<(u32, u32)>,
    /// CRC64 of each 4 KiB chunk of `data`.
    pub csums: Vec<u64>,
    /// (offset in `data`, length, epoch) of each run of data, ascending (filled only by
    /// [`Target::fetch_versions`]).
    pub runs: Vec<(u32, u32, u64)>,
}

impl Target {
    /// Reads `len` bytes at `offset` of an array akey as of `epoch`.
    pub fn fetch_array(&self, path: &AkeyPath, offset: u64, len: u64, epoch: u64) -> Result<FetchedArray, EngineError> {
        let mut f = self.fetch_versions(std::slice::from_ref(path), offset, len, epoch)?;
        f.runs.clear();
        Ok(f)
    }

    /// Reads `len` bytes at `offset` as of `epoch`, byte by byte from the newest version across
    /// the array akeys `paths` ([`Index::fetch_versions`]), and lists the epoch of every run.
    /// What [`Target::fetch_versions`] would resolve, without reading data: (start, length,
    /// epoch, is a range punch) of each run, relative to `offset`, adjacent runs of one version
    /// kind and epoch merged; at most [`tessera_engine_proto::EPOCH_RUNS_MAX`] runs.
    pub fn fetch_epochs(&self, paths: &[AkeyPath], offset: u64, len: u64, epoch: u64) -> Result<Vec<(u32, u32, u64, bool)>, EngineError> {
        if len == 0 {
            return Err(invalid("fetch of 0 bytes"));
        }
        let end = offset.checked_add(len).ok_or_else(|| invalid("offset + length overflows"))?;
        if len > u64::from(u32::MAX) {
            return Err(invalid("an epochs fetch covers at most 4 GiB"));
        }
        for p in paths {
            self.check_fence(p)?;
        }
        let mut runs: Vec<(u32, u32, u64, bool)> = Vec::new();
        for seg in self.index.fetch_versions(paths, offset..end, epoch) {
            let Some(v) = seg.version else { continue };
            let punched = matches!(seg.source, Source::Hole);
            let (start, n) = ((seg.range.start - offset) as u32, (seg.range.end - seg.range.start) as u32);
            match runs.last_mut() {
                Some((s, l, e, p)) if *s + *l == start && *e == v.epoch && *p == punched => *l += n,
                _ => runs.push((start, n, v.epoch, punched)),
            }
            if runs.len() > tessera_engine_proto::EPOCH_RUNS_MAX {
                return Err(EngineError::TooLarge(format!(
                    "more than {} runs of versions in {len} bytes: ask for a shorter range",
                    tessera_engine_proto::EPOCH_RUNS_MAX
                )));
            }
        }
        Ok(runs)
    }

    pub fn fetch_versions(&self, paths: &[AkeyPath], offset: u64, len: u64, epoch: u64) -> Result<FetchedArray, EngineError> {
        if len == 0 {
            return Err(invalid("fetch of 0 bytes"));
        }
        if len > MAX_IO {
            // The reply would exceed the data limit: `TooLarge`, as the RPC status table says.
            return Err(EngineError::TooLarge(format!("fetch of {len} bytes: at most {MAX_IO}")));
        }
        let end = offset.checked_add(len).ok_or_else(|| invalid("offset + length overflows"))?;
        for p in paths {
            self.check_fence(p)?;
        }
        let mut buf = vec![0u8; len as usize];
        let mut known: Vec<Option<u64>> = vec![None; len.div_ceil(BLOCK) as usize];
        let mut holes = Vec::new();
        let mut runs: Vec<(u32, u32, u64)> = Vec::new();
        for seg in self.index.fetch_versions(paths, offset..end, epoch) {
            if let (Source::Data { .. }, Some(v)) = (&seg.source, seg.version) {
                let (start, n) = ((seg.range.start - offset) as u32, (seg.range.end - seg.range.start) as u32);
                match runs.last_mut() {
                    Some((s, l, e)) if *s + *l == start && *e == v.epoch => *l += n,
                    _ => runs.push((start, n, v.epoch)),
                }
            }
            match seg.source {
                Source::Hole => {
                    let (start, len) = ((seg.range.start - offset) as u32, (seg.range.end - seg.range.start) as u32);
                    match holes.last_mut() {
                        Some((s, l)) if *s + *l == start => *l += len,
                        _ => holes.push((start, len)),
                    }
                }
                Source::Data { extent_start, stored, .. } => {
                    self.read_segment(&stored, extent_start, &seg.range, offset, &mut buf, &mut known)?;
                }
            }
        }
        let csums = buf.chunks(BLOCK as usize).zip(known).map(|(chunk, k)| k.unwrap_or_else(|| crc64(chunk))).collect();
        Ok(FetchedArray { data: Bytes::from(buf), holes, csums, runs })
    }

    /// Copies `range` (akey offsets) of a stored extent into `buf` (which starts at `base`),
    /// verifying every stored chunk it touches. Reply chunks that coincide with a whole stored
    /// chunk reuse its checksum.
    fn read_segment(
        &self,
        stored: &Stored,
        extent_start: u64,
        range: &Range<u64>,
        base: u64,
        buf: &mut [u8],
        known: &mut [Option<u64>],
    ) -> Result<(), EngineError> {
        let first = (range.start - extent_start) / BLOCK;
        let last = (range.end - extent_start).div_ceil(BLOCK);
        let from = first * BLOCK;
        let to = (last * BLOCK).min(stored.len);
        let bytes = self.stored_bytes(stored, from, to)?;
        for (i, chunk) in bytes.chunks(BLOCK as usize).enumerate() {
            let c = first as usize + i;
            let sum = crc64(chunk);
            if stored.csums.get(c) != Some(&sum) {
                return Err(EngineError::DataCorrupt(format!(
                    "chunk {c} of the extent at offset {extent_start} ({:?}) fails its checksum",
                    stored.loc_summary()
                )));
            }
            let abs = extent_start + c as u64 * BLOCK;
            let reply_rel = abs.checked_sub(base);
            if let Some(rel) = reply_rel.filter(|r| r % BLOCK == 0 && abs >= range.start && abs + chunk.len() as u64 <= range.end) {
                let j = (rel / BLOCK) as usize;
                let reply_chunk_len = BLOCK.min(buf.len() as u64 - rel);
                if chunk.len() as u64 == reply_chunk_len {
                    if let Some(k) = known.get_mut(j) {
                        *k = Some(sum);
                    }
                }
            }
        }
        let src_from = (range.start - extent_start - from) as usize;
        let n = (range.end - range.start) as usize;
        let dst_from = (range.start - base) as usize;
        buf[dst_from..dst_from + n].copy_from_slice(&bytes[src_from..src_from + n]);
        Ok(())
    }

    /// The single value visible at `epoch`: data, CRC64 of all of it, and its epoch.
    pub fn fetch_single(&self, path: &AkeyPath, epoch: u64) -> Result<Option<(Bytes, u64, u64)>, EngineError> {
        self.check_fence(path)?;
        let Some((version, stored)) = self.index.fetch_single(path, epoch) else { return Ok(None) };
        let mut buf = vec![0u8; stored.len as usize];
        let mut known = vec![None; stored.csums.len()];
        self.read_segment(&stored, 0, &(0..stored.len), 0, &mut buf, &mut known)?;
        let csum = crc64(&buf);
        Ok(Some((Bytes::from(buf), csum, version.epoch)))
    }

    /// Bytes `from..to` of a stored value (`from` on a chunk boundary).
    pub(super) fn stored_bytes(&self, stored: &Stored, from: u64, to: u64) -> Result<Bytes, EngineError> {
        Ok(match &stored.loc {
            Loc::Inline(d) => d.slice(from as usize..to as usize),
            Loc::Blocks { start } => {
                let mut tmp = vec![0u8; (to - from) as usize];
                self.data.read_at(&mut tmp, start * BLOCK + from).map_err(|e| EngineError::io(DATA_FILE, e))?;
                Bytes::from(tmp)
            }
        })
    }

    /// Verifies chunks `first..end` of a stored value against its stored CRC64s (what a fetch
    /// checks); the error says which chunk failed or why it could not be read.
    pub(super) fn verify_chunks(&self, stored: &Stored, first: u64, end: u64) -> Result<(), String> {
        if first >= end {
            return Ok(());
        }
        let bytes = self.stored_bytes(stored, first * BLOCK, (end * BLOCK).min(stored.len)).map_err(|e| e.to_string())?;
        for (i, chunk) in bytes.chunks(BLOCK as usize).enumerate() {
            let c = first as usize + i;
            if stored.csums.get(c) != Some(&crc64(chunk)) {
                return Err(format!("chunk {c} ({}) fails its checksum", stored.loc_summary()));
            }
        }
        Ok(())
    }
}
