//! EC aggregation: folding the partial-stripe fragments of a stripe (its data shards' `D`, its
//! parity shards' copies in `C`) back into full base cells (`B`) and parity (`P`), so that a
//! volume takes (k + p) / k of its data again however it was written.
//!
//! For each stripe of a chunk with copies at or below `boundary` (the pool's stable epoch: no
//! write at or below it can still commit):
//!
//! 1. read the stripe's k data cells at `boundary` (newest per byte across `B` and `D`) and note
//!    the newest epoch `E_a` of anything in them;
//! 2. write every `B` cell and every `P` cell at `E_b = E_a + 1` (skipped unless `E_b` is at or
//!    below `boundary`): nothing else can be at `E_b`, so the new base holds exactly what the
//!    stripe read;
//! 3. punch `D` on the data shards and `C` on the parity shards over the stripe at `E_a`: a
//!    range punch competes with the base as a version in a data shard's read (newest per byte
//!    across `B` and `D`), so it must be older than the new base and newer than every fragment.
//!
//! Views below `E_a` (snapshots) do not see steps 2 and 3 and read as before; views at or above
//! `E_b` see the same bytes as before; a snapshot exactly at `E_a` would see the punch without
//! the base, so such a stripe waits. Each step is idempotent: a crash between them leaves a stripe
//! whose base is newer than its fragments (normal reads right; the next pass folds it again), or
//! a stripe whose base cells are at different epochs (degraded reads of it fail as torn until the
//! next pass, normal reads stay right). Requests go with the pool map the chunk was planned with,
//! so a map change refuses them (the engine sees a stale version) instead of racing a rebuild.
//! Clones and rolled-back volumes are left alone: their holes mean "read older data", which a
//! full base cell would cover.

use futures::future::join_all;
use tessera_engine_proto::{key_from_u64, Epoch, Request};

use super::rebuild::{shard_fail, within, Run};
use super::{PoolView, ShardError, Volume, VolumeError, VolumeInner, AKEY_BASE, AKEY_COPY, AKEY_DELTA};
use crate::placement::{Group, ShardPlacement};

/// What aggregating a chunk did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EcAggregated {
    /// Stripes folded into full base cells and parity.
    pub stripes: u64,
    /// Bytes of fragments and copies punched (what aggregation on the engines then frees).
    pub fragment_bytes: u64,
    /// Stripes with copies left for later (too new, or the group is not all readable).
    pub deferred: u64,
    /// Bytes of the copies in the stripes left for later (0 for a group not all readable: its
    /// copies were not read).
    pub deferred_bytes: u64,
}

impl Volume {
    /// Folds the partial-stripe fragments of chunk `chunk` at or below `boundary` into full
    /// stripes (module docs). A chunk of a replicated class, a clone or a rolled-back volume is
    /// left alone.
    pub async fn aggregate_chunk(&self, chunk: u64, boundary: Epoch) -> Result<EcAggregated, VolumeError> {
        let v = &self.inner;
        if !v.class.is_ec() || v.parent.is_some() || !v.rollbacks.is_empty() || v.snapshot.is_some() {
            return Ok(EcAggregated::default());
        }
        v.aggregate_chunk(chunk, boundary).await
    }
}

impl VolumeInner {
    async fn aggregate_chunk(&self, chunk: u64, boundary: Epoch) -> Result<EcAggregated, VolumeError> {
        let view = self.pool.current();
        let dkey = key_from_u64(chunk);
        let group = self.group(&view, &dkey)?;
        let mut out = EcAggregated::default();
        // Only a settled group: every shard where it belongs, readable and writable.
        if group.shards.iter().any(|s| s.rebuilding || !s.readable() || !s.writable()) {
            out.deferred += 1;
            return Ok(out);
        }
        let k = self.class.data_shards() as usize;
        let cell = u64::from(self.layout.cell_size());
        let stripe_len = cell * k as u64;
        let copies = self.runs(&view, &group.shards[k], &dkey, AKEY_COPY, 0..self.layout.chunk_size(), boundary).await?;
        let mut stripes: Vec<u64> = copies.iter().flat_map(|r| r.off / stripe_len..=(r.end() - 1) / stripe_len).collect();
        stripes.dedup();
        // A torn full stripe is settled first (`ec_resolve`), by whichever engine settles it.
        let torn = if stripes.is_empty() { Vec::new() } else { self.torn_stripes(&view, &group, &dkey, boundary).await? };
        for s in stripes {
            if torn.get(s as usize).copied().unwrap_or(false) {
                out.deferred += 1;
                continue;
            }
            let in_chunk = s * stripe_len..(s + 1) * stripe_len;
            match self.aggregate_stripe(&view, &group, &dkey, s, &within(&copies, &in_chunk), boundary).await? {
                Some(bytes) => {
                    out.stripes += 1;
                    out.fragment_bytes += bytes;
                }
                None => {
                    out.deferred += 1;
                    out.deferred_bytes += within(&copies, &in_chunk).iter().map(|r| r.data.len() as u64).sum::<u64>();
                }
            }
        }
        Ok(out)
    }

    /// One stripe whose copies (read with the chunk's, at `boundary`) are `copies`:
    /// `Some(bytes of fragments punched)`, or `None` if it must wait.
    async fn aggregate_stripe(
        &self,
        view: &PoolView,
        group: &Group,
        dkey: &bytes::Bytes,
        s: u64,
        copies: &[Run],
        boundary: Epoch,
    ) -> Result<Option<u64>, VolumeError> {
        let k = self.class.data_shards() as usize;
        let cell = u64::from(self.layout.cell_size());
        let in_shard = s * cell..(s + 1) * cell;
        let in_chunk = s * cell * k as u64..(s + 1) * cell * k as u64;
        // 1. The k cells at the boundary, and the newest epoch in them.
        let reads = group.shards[..k].iter().map(|sh| {
            let req = self.fetch(dkey, AKEY_BASE, in_shard.start, cell as u32, boundary, &[AKEY_DELTA]);
            async move { self.fetch_runs(view, sh, req).await.map_err(|e| shard_fail(sh, e)) }
        });
        let mut cells = Vec::with_capacity(k);
        let mut newest = 0;
        for r in join_all(reads).await {
            let (data, runs) = r?;
            newest = runs.iter().map(|x| x.epoch).fold(newest, Epoch::max);
            cells.push(data);
        }
        newest = copies.iter().map(|x| x.epoch).fold(newest, Epoch::max);
        let Some(e_b) = newest.checked_add(1).filter(|e| *e <= boundary) else { return Ok(None) };
        if self.info.snapshots.iter().any(|s| s.epoch == newest) {
            return Ok(None);
        }
        if copies.is_empty() {
            return Ok(Some(0));
        }
        // 2. Base cells and parity at E_b.
        let codec = self.codec.as_ref().ok_or_else(|| VolumeError::Config("EC volume without a codec".into()))?;
        let parity = codec.encode(&cells).map_err(|e| VolumeError::Config(e.to_string()))?;
        // The data cells first, the parity once every one of them is durable: a parity at E_b
        // then always comes with every base cell at E_b, so a fold cut short (an engine gone
        // mid-write) leaves degraded reads the parity and cells as of the previous base, which
        // the versioned store still holds. In parallel, a parity could land while a cell did
        // not, and a later degraded read of another cell would find the two at different
        // epochs.
        let mut writes: Vec<(&ShardPlacement, Request)> = Vec::new();
        for (c, sh) in group.shards[..k].iter().enumerate() {
            writes.push((sh, self.update(dkey, AKEY_BASE, in_shard.start, cells[c].clone(), e_b)));
        }
        self.send_all(view, writes).await?;
        let mut writes: Vec<(&ShardPlacement, Request)> = Vec::new();
        for (j, sh) in group.shards[k..].iter().enumerate() {
            writes.push((sh, self.update(dkey, super::AKEY_PARITY, in_shard.start, bytes::Bytes::from(parity[j].clone()), e_b)));
        }
        self.send_all(view, writes).await?;
        // 3. Fragments and copies punched at E_a: above every one of them, below the new base.
        let mut punches: Vec<(&ShardPlacement, Request)> = Vec::new();
        for sh in &group.shards[..k] {
            punches.push((sh, self.punch_range(dkey, AKEY_DELTA, &in_shard, newest)));
        }
        for sh in &group.shards[k..] {
            punches.push((sh, self.punch_range(dkey, AKEY_COPY, &in_chunk, newest)));
        }
        self.send_all(view, punches).await?;
        // The fragments in D and a copy of them on each of the p parity shards.
        let copied: u64 = copies.iter().map(|r| r.data.len() as u64).sum();
        let p = (group.shards.len() - k) as u64;
        Ok(Some(copied * (1 + p)))
    }

    /// Sends every request to its shard; all must succeed.
    pub(super) async fn send_all(&self, view: &PoolView, reqs: Vec<(&ShardPlacement, Request)>) -> Result<(), VolumeError> {
        let results = join_all(reqs.into_iter().map(|(sh, req)| async move { (sh, self.call(view, sh, req).await) })).await;
        for (sh, r) in results {
            match r {
                Ok(_) => {}
                Err(ShardError::Stale) => return Err(VolumeError::Unavailable("the pool map changed; aggregation waits".into())),
                Err(e) => return Err(shard_fail(sh, e)),
            }
        }
        Ok(())
    }
}
