//! Reads: [`VolumeInner::read_piece`] reads one piece from its data shard (EC: the newest bytes
//! across the base and delta akeys) or a replica, and without the data shard serves it from the
//! parity shards' copies and by reconstruction at the parity's epoch; it retries after a map
//! refresh until [`READ_DEADLINE`]. Each read also says which bytes of the piece were never
//! written ([`Read::holes`]): a clone reads those from its parent.

use std::ops::Range;
use std::sync::atomic::Ordering;
use std::time::Instant;

use bytes::Bytes;
use futures::future::join_all;
use tessera_engine_proto::{key_from_u64, DataRun, Epoch, Fetch, FetchReply, FetchValue, Reply, Request};
use tracing::{debug, warn};

use super::{PoolView, ShardError, VolumeError, VolumeInner, AKEY_BASE, AKEY_COPY, AKEY_DELTA, AKEY_PARITY, READ_DEADLINE, RETRY_PAUSE};
use crate::layout::Piece;
use crate::placement::{Group, ShardPlacement};

/// What a piece read found: its bytes (zeros where nothing was written), the ranges of the
/// piece no write ever reached, ascending, and the epoch of the write that each written range
/// holds (a rolled-back volume reads again, at the snapshot's epoch, what was written before
/// the rollback).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Read {
    pub data: Bytes,
    pub holes: Vec<Range<usize>>,
    pub epochs: Vec<(Range<usize>, Epoch)>,
}

impl Read {
    /// A read of `len` bytes whose written parts are `runs`.
    fn from_runs(data: Bytes, runs: &[DataRun], len: usize) -> Read {
        let epochs: Vec<(Range<usize>, Epoch)> = runs
            .iter()
            .map(|r| {
                let (a, b) = (r.offset as usize, (r.offset as usize + r.len as usize).min(len));
                (a.min(b)..b, r.epoch)
            })
            .collect();
        // Every read comes through here: the gaps between the runs, not a per-byte map.
        let mut written: Vec<Range<usize>> = epochs.iter().map(|(r, _)| r.clone()).collect();
        written.sort_unstable_by_key(|r| r.start);
        let mut holes = Vec::new();
        let mut at = 0;
        for r in written {
            if r.start > at {
                holes.push(at..r.start);
            }
            at = at.max(r.end);
        }
        if at < len {
            holes.push(at..len);
        }
        Read { data, holes, epochs }
    }

    /// The epoch of every byte (`None`: never written).
    fn per_byte(&self) -> Vec<Option<Epoch>> {
        let mut out = vec![None; self.data.len()];
        for (r, e) in &self.epochs {
            let end = r.end.min(out.len());
            out[r.start.min(end)..end].iter_mut().for_each(|x| *x = Some(*e));
        }
        out
    }

    /// A read whose bytes have the epochs in `per_byte` (`None`: never written).
    fn from_per_byte(data: Bytes, per_byte: &[Option<Epoch>]) -> Read {
        let covered: Vec<bool> = per_byte.iter().map(Option::is_some).collect();
        let mut epochs: Vec<(Range<usize>, Epoch)> = Vec::new();
        for (i, e) in per_byte.iter().enumerate() {
            let Some(e) = *e else { continue };
            match epochs.last_mut() {
                Some((r, last)) if r.end == i && *last == e => r.end = i + 1,
                _ => epochs.push((i..i + 1, e)),
            }
        }
        Read { data, holes: holes_of(&covered), epochs }
    }

    /// The byte ranges whose write is at or below `epoch`, ascending.
    pub fn written_at_or_below(&self, epoch: Epoch) -> Vec<Range<usize>> {
        let mut out: Vec<Range<usize>> = self.epochs.iter().filter(|(_, e)| *e <= epoch).map(|(r, _)| r.clone()).collect();
        out.sort_unstable_by_key(|r| r.start);
        out
    }

    /// This read with the bytes of `ranges` (their data, epochs and holes) taken from `older`.
    pub fn overlay(self, ranges: &[Range<usize>], older: &Read) -> Read {
        let mut data = self.data.to_vec();
        let mut epochs = self.per_byte();
        let old_epochs = older.per_byte();
        for r in ranges {
            let end = r.end.min(data.len()).min(older.data.len());
            let start = r.start.min(end);
            data[start..end].copy_from_slice(&older.data[start..end]);
            epochs[start..end].copy_from_slice(&old_epochs[start..end]);
        }
        Read::from_per_byte(Bytes::from(data), &epochs)
    }
}

/// The ranges of `covered` that are false.
fn holes_of(covered: &[bool]) -> Vec<Range<usize>> {
    let mut out = Vec::new();
    let mut at = 0;
    while at < covered.len() {
        if covered[at] {
            at += 1;
            continue;
        }
        let start = at;
        while at < covered.len() && !covered[at] {
            at += 1;
        }
        out.push(start..at);
    }
    out
}

impl VolumeInner {
    /// Reads one piece (inside one cell), degrading to copies or reconstruction as needed.
    pub(super) async fn read_piece(&self, p: &Piece, epoch: Epoch) -> Result<Read, VolumeError> {
        let start = Instant::now();
        loop {
            let view = self.pool.current();
            let dkey = key_from_u64(p.dkey);
            let group = self.group(&view, &dkey)?.for_reads();
            let r = if self.class.is_ec() {
                self.read_ec(&view, &group, &dkey, p, epoch).await
            } else {
                self.read_replica(&view, &group, &dkey, p, epoch).await
            };
            match r {
                Ok(b) => return Ok(b),
                Err(Retry::Fatal(e)) => return Err(e),
                Err(Retry::Again(e)) => {
                    if start.elapsed() > READ_DEADLINE {
                        return Err(e);
                    }
                    let before = view.map.version();
                    self.cluster.refresh(&self.pool).await;
                    let view = self.pool.current();
                    if !self.can_serve(&self.group(&view, &dkey)?.for_reads(), p) {
                        // The map itself says too few shards are left: no retry can help until
                        // a reintegration, so fail now rather than at the deadline.
                        return Err(e);
                    }
                    if view.map.version() == before {
                        tokio::time::sleep(RETRY_PAUSE).await;
                    }
                }
            }
        }
    }

    /// Whether the map leaves enough readable shards to serve piece `p` of this group.
    fn can_serve(&self, group: &Group, p: &Piece) -> bool {
        if !self.class.is_ec() {
            return group.readable_count() > 0;
        }
        group.shards.get(p.cell as usize).is_some_and(ShardPlacement::readable)
            || group.readable_count() >= self.class.data_shards() as usize
    }

    pub(super) fn fetch(&self, dkey: &Bytes, akey: &'static [u8], offset: u64, len: u32, epoch: Epoch, also: &[&'static [u8]]) -> Request {
        Request::Fetch(Fetch {
            cont: self.cont,
            obj: self.oid,
            epoch,
            dkey: dkey.clone(),
            akey: Bytes::from_static(akey),
            what: FetchValue::Versions { offset, len, also: also.iter().map(|a| Bytes::from_static(a)).collect() },
        })
    }

    /// A versions fetch from one shard, verified end to end: data and runs.
    pub(super) async fn fetch_runs(
        &self,
        view: &PoolView,
        shard: &ShardPlacement,
        req: Request,
    ) -> Result<(Bytes, Vec<DataRun>), ShardError> {
        let Reply::Fetched(f) = self.call(view, shard, req).await? else {
            return Err(ShardError::Failed(format!("engine {} answered a fetch with another reply", shard.rank)));
        };
        if let Err(chunk) = f.verify() {
            self.counters.checksum_errors.fetch_add(1, Ordering::Relaxed);
            warn!(volume = %self.info.name, rank = shard.rank, target = shard.target_index, chunk, "fetched data fails its checksum");
            return Err(ShardError::Checksum(format!("chunk {chunk} of a reply from engine {}", shard.rank)));
        }
        match f {
            FetchReply::Array { data, runs, .. } => Ok((data, runs)),
            FetchReply::Single { .. } | FetchReply::Epochs { .. } => {
                Err(ShardError::Failed(format!("engine {} answered an array fetch with another kind of reply", shard.rank)))
            }
        }
    }

    /// The epochs of what a versions fetch of `range` of `akey` at `epoch` would resolve on one
    /// shard, without the data: (offset in the akey, length, epoch, range punch).
    pub(super) async fn fetch_epochs(
        &self,
        view: &PoolView,
        shard: &ShardPlacement,
        dkey: &Bytes,
        akey: &'static [u8],
        range: std::ops::Range<u64>,
        epoch: Epoch,
    ) -> Result<Vec<(u64, u64, Epoch, bool)>, ShardError> {
        let len = u32::try_from(range.end - range.start).map_err(|_| ShardError::Failed("an epochs fetch covers at most 4 GiB".into()))?;
        let req = Request::Fetch(Fetch {
            cont: self.cont,
            obj: self.oid,
            epoch,
            dkey: dkey.clone(),
            akey: Bytes::from_static(akey),
            what: FetchValue::Epochs { offset: range.start, len, also: Vec::new() },
        });
        match self.call(view, shard, req).await? {
            Reply::Fetched(FetchReply::Epochs { runs }) => {
                Ok(runs.into_iter().map(|r| (range.start + u64::from(r.offset), u64::from(r.len), r.epoch, r.punched)).collect())
            }
            _ => Err(ShardError::Failed(format!("engine {} answered an epochs fetch with another reply", shard.rank))),
        }
    }

    async fn read_replica(&self, view: &PoolView, group: &Group, dkey: &Bytes, p: &Piece, epoch: Epoch) -> Result<Read, Retry> {
        let n = group.shards.len();
        // Spread reads over the replicas by chunk.
        let first = (p.dkey as usize) % n;
        let mut last = String::from("no readable replica");
        let mut all_checksum = true;
        for i in 0..n {
            let s = &group.shards[(first + i) % n];
            if !s.readable() {
                continue;
            }
            let req = self.fetch(dkey, AKEY_DELTA, p.chunk_offset, p.len, epoch, &[]);
            match self.fetch_runs(view, s, req).await {
                Ok((data, runs)) => {
                    if i > 0 {
                        self.counters.degraded_reads.fetch_add(1, Ordering::Relaxed);
                    }
                    return Ok(Read::from_runs(data, &runs, p.len as usize));
                }
                Err(e) => {
                    all_checksum &= matches!(e, ShardError::Checksum(_));
                    last = e.to_string();
                }
            }
        }
        let what = format!("chunk {} offset {}: {last}", p.dkey, p.chunk_offset);
        if all_checksum && last.starts_with("checksum") {
            return Err(Retry::Fatal(VolumeError::Corrupt(what)));
        }
        Err(Retry::Again(VolumeError::Unavailable(what)))
    }

    async fn read_ec(&self, view: &PoolView, group: &Group, dkey: &Bytes, p: &Piece, epoch: Epoch) -> Result<Read, Retry> {
        let data_shard = &group.shards[p.cell as usize];
        if data_shard.readable() {
            let req = self.fetch(dkey, AKEY_BASE, p.shard_offset, p.len, epoch, &[AKEY_DELTA]);
            match self.fetch_runs(view, data_shard, req).await {
                Ok((data, runs)) => return Ok(Read::from_runs(data, &runs, p.len as usize)),
                Err(e) => debug!(volume = %self.info.name, error = %e, "data shard read failed; degraded read"),
            }
        }
        self.counters.degraded_reads.fetch_add(1, Ordering::Relaxed);
        self.read_ec_degraded(view, group, dkey, p, epoch).await
    }

    /// Cell `p.cell` without its data shard: copies newer than the parity, the rest rebuilt
    /// from k other cells at the parity's epoch.
    async fn read_ec_degraded(&self, view: &PoolView, group: &Group, dkey: &Bytes, p: &Piece, epoch: Epoch) -> Result<Read, Retry> {
        let k = self.class.data_shards() as usize;
        let len = p.len as usize;
        let mut last = String::from("no readable parity shard");
        for q in k..group.shards.len() {
            let ps = &group.shards[q];
            if !ps.readable() {
                continue;
            }
            let copies = self.fetch_runs(view, ps, self.fetch(dkey, AKEY_COPY, p.chunk_offset, p.len, epoch, &[]));
            let parity = self.fetch_runs(view, ps, self.fetch(dkey, AKEY_PARITY, p.shard_offset, p.len, epoch, &[]));
            let (copies, parity) = futures::join!(copies, parity);
            let ((copy_data, copy_runs), (parity_data, parity_runs)) = match (copies, parity) {
                (Ok(c), Ok(pa)) => (c, pa),
                (Err(e), _) | (_, Err(e)) => {
                    last = e.to_string();
                    continue;
                }
            };
            let e_p = match single_epoch(&parity_runs, len) {
                Ok(e) => e,
                Err(m) => return Err(Retry::Fatal(VolumeError::Corrupt(format!("chunk {} parity cell: {m}", p.dkey)))),
            };
            // Bytes whose newest copy is newer than the parity come from the copy.
            let mut out = vec![0u8; len];
            let mut from_copy = vec![false; len];
            for r in &copy_runs {
                if e_p.is_none_or(|e| r.epoch > e) {
                    let (a, b) = (r.offset as usize, (r.offset + r.len) as usize);
                    out[a..b].copy_from_slice(&copy_data[a..b]);
                    from_copy[a..b].iter_mut().for_each(|f| *f = true);
                }
            }
            let copied: Vec<(Range<usize>, Epoch)> = copy_runs
                .iter()
                .filter(|r| e_p.is_none_or(|e| r.epoch > e))
                .map(|r| (r.offset as usize..(r.offset + r.len) as usize, r.epoch))
                .collect();
            let Some(e_p) = e_p else {
                // No full-stripe write is visible: what no copy covers was never written.
                return Ok(Read { data: Bytes::from(out), holes: holes_of(&from_copy), epochs: copied });
            };
            // What no newer copy covers is the base cell at e_p, which covers the whole cell.
            let mut epochs = copied;
            epochs.extend(holes_of(&from_copy).into_iter().map(|r| (r, e_p)));
            if from_copy.iter().all(|&f| f) {
                return Ok(Read { data: Bytes::from(out), holes: Vec::new(), epochs });
            }
            let base = self.reconstruct(view, group, dkey, p, e_p, q, parity_data).await?;
            for (i, b) in base.into_iter().enumerate() {
                if !from_copy[i] {
                    out[i] = b;
                }
            }
            return Ok(Read { data: Bytes::from(out), holes: Vec::new(), epochs });
        }
        Err(Retry::Again(VolumeError::Unavailable(format!(
            "chunk {} cell {}: data shard unavailable and no parity shard could serve it ({last})",
            p.dkey, p.cell
        ))))
    }

    /// Cell `p.cell`'s bytes `p.shard_offset..+len` as of the full-stripe write at `e_p`, from
    /// the other data shards' base cells and the parity (`parity_data` from parity shard `q`).
    #[allow(clippy::too_many_arguments)]
    async fn reconstruct(
        &self,
        view: &PoolView,
        group: &Group,
        dkey: &Bytes,
        p: &Piece,
        e_p: Epoch,
        q: usize,
        parity_data: Bytes,
    ) -> Result<Vec<u8>, Retry> {
        let k = self.class.data_shards() as usize;
        let total = group.shards.len();
        let len = p.len as usize;
        let mut cells: Vec<Option<Vec<u8>>> = vec![None; total];
        cells[q] = Some(parity_data.to_vec());
        let mut have = 1;
        // Other data shards first (cheapest to combine), then further parity shards.
        let candidates: Vec<usize> = (0..k).filter(|&c| c != p.cell as usize).chain((k..total).filter(|&j| j != q)).collect();
        let reads = candidates.iter().filter(|&&i| group.shards[i].readable()).map(|&i| {
            let akey = if i < k { AKEY_BASE } else { AKEY_PARITY };
            let req = self.fetch(dkey, akey, p.shard_offset, p.len, e_p, &[]);
            async move { (i, self.fetch_runs(view, &group.shards[i], req).await) }
        });
        let mut problems = Vec::new();
        for (i, r) in join_all(reads).await {
            match r {
                Ok((data, runs)) => match single_epoch(&runs, len) {
                    Ok(Some(e)) if e == e_p => {
                        if have < k {
                            cells[i] = Some(data.to_vec());
                            have += 1;
                        }
                    }
                    Ok(other) => problems.push(format!("shard {i} holds epoch {other:?}, parity {e_p}")),
                    Err(m) => problems.push(format!("shard {i}: {m}")),
                },
                Err(e) => problems.push(format!("shard {i}: {e}")),
            }
        }
        if have < k {
            let msg = format!("chunk {} cell {}: cannot rebuild from {have} of {k} cells: {}", p.dkey, p.cell, problems.join("; "));
            // Cells at another epoch than the parity mean a torn or racing full-stripe write:
            // retry (a racing write settles), give up as corrupt at the deadline.
            return Err(Retry::Again(VolumeError::Unavailable(msg)));
        }
        let codec = self.codec.as_ref().ok_or_else(|| Retry::Fatal(VolumeError::Config("EC volume without a codec".into())))?;
        codec.reconstruct_data(&mut cells).map_err(|e| Retry::Fatal(VolumeError::Corrupt(e.to_string())))?;
        cells[p.cell as usize].take().ok_or_else(|| Retry::Fatal(VolumeError::Corrupt("reconstruction left the cell empty".into())))
    }
}

/// A read attempt's failure: try again (after a map refresh) or give up.
enum Retry {
    Again(VolumeError),
    Fatal(VolumeError),
}

/// The one epoch the runs of a whole cell range share: `None` if there is no data at all, an
/// error if the range is partly written or written at several epochs.
fn single_epoch(runs: &[DataRun], len: usize) -> Result<Option<Epoch>, String> {
    let Some(first) = runs.first() else { return Ok(None) };
    let covered: usize = runs.iter().map(|r| r.len as usize).sum();
    if covered != len || runs.iter().any(|r| r.epoch != first.epoch) {
        return Err(format!(
            "{covered} of {len} bytes written, at {} epochs",
            runs.iter().map(|r| r.epoch).collect::<std::collections::BTreeSet<_>>().len()
        ));
    }
    Ok(Some(first.epoch))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_epoch_rules() {
        let run = |offset, len, epoch| DataRun { offset, len, epoch };
        assert_eq!(single_epoch(&[], 100), Ok(None));
        assert_eq!(single_epoch(&[run(0, 100, 7)], 100), Ok(Some(7)));
        assert_eq!(single_epoch(&[run(0, 50, 7), run(50, 50, 7)], 100), Ok(Some(7)));
        assert!(single_epoch(&[run(0, 50, 7), run(50, 50, 8)], 100).is_err());
        assert!(single_epoch(&[run(0, 50, 7)], 100).is_err());
    }

    #[test]
    fn holes_are_what_no_run_covers() {
        let run = |offset, len| DataRun { offset, len, epoch: 1 };
        let holes = |runs: &[DataRun], len| Read::from_runs(Bytes::new(), runs, len).holes;
        assert_eq!(holes(&[], 10), vec![0..10]);
        assert_eq!(holes(&[run(0, 10)], 10), Vec::<Range<usize>>::new());
        assert_eq!(holes(&[run(2, 3), run(7, 1)], 10), vec![0..2, 5..7, 8..10]);
        assert_eq!(holes(&[run(0, 4), run(4, 6)], 10), Vec::<Range<usize>>::new());
        // A run reaching past the piece (never sent, but harmless).
        assert_eq!(holes(&[run(8, 9)], 10), vec![0..8]);
    }

    #[test]
    fn an_overlay_takes_data_epochs_and_holes_of_the_older_read() {
        let run = |offset, len, epoch| DataRun { offset, len, epoch };
        let new = Read::from_runs(Bytes::from(vec![9u8; 10]), &[run(0, 4, 50), run(4, 6, 20)], 10);
        let old = Read::from_runs(Bytes::from(vec![1u8; 10]), &[run(0, 2, 5), run(6, 4, 7)], 10);
        assert_eq!(new.written_at_or_below(30), vec![4..10]);
        let stale = [4..6, 6..10];
        let merged = new.overlay(&stale, &old);
        assert_eq!(&merged.data[..], &[9, 9, 9, 9, 1, 1, 1, 1, 1, 1]);
        assert_eq!(merged.holes, vec![4..6]);
        assert_eq!(merged.epochs, vec![(0..4, 50), (6..10, 7)]);
    }
}
