//! Torn full-stripe writes resolved to all or nothing at their epoch.
//!
//! A full-stripe write sends one update per shard, base cells (`B`) and parity (`P`) at one
//! epoch `E`. A client that dies after some shards took theirs leaves the stripe *torn*: the
//! newest `B`/`P` of its shards are at different epochs, and a degraded read of it fails rather
//! than mix them. Once `E` is at or below the pool's stable epoch no shard can still take `E`, and
//! the engine of the chunk's first parity shard settles it — the only engine that writes below
//! the stable epoch there, one stripe after the other and between its own folds, so nothing it
//! reads changes under it — from what the shards hold:
//!
//! * the shards whose newest version is `E` are the set `A`, `m = |A|`;
//! * a whole-stripe punch (Write Zeroes) at `E`: the other shards are punched at `E` too (*all*);
//! * `m ≥ k`: the stripe at `E` is decoded from k shards of `A` and the other shards' cells are
//!   written at `E` (*all*: the write happened whole);
//! * `m < k`: the stripe as it was before `E` — base cells at the newest epoch `E0` below `E`,
//!   decoded from k shards that still hold `E0` (every shard outside `A` when `m ≤ p`; a shard
//!   of `A` too while the engine has not aggregated its `E0` version away), each data cell with
//!   its fragments between `E0` and `E` on top — is written whole at `E + 1` on every shard
//!   (*nothing*: the write never happened, as a rolled-back version no read will see again). With
//!   fewer than k shards holding `E0` the stripe stays torn (logged; only classes with
//!   `k ≥ p + 2` can get there), as does one of a clone or a rolled-back volume that would have
//!   to be undone (their holes mean "read older data", which whole cells would cover).
//!
//! Every step is idempotent: the next pass finds the stripe settled or settles it the same way.
//! Requests carry the pool map the chunk was planned with, so a map change refuses them.

use futures::future::join_all;
use tessera_engine_proto::{key_from_u64, Epoch, Request};

use super::rebuild::shard_fail;
use super::{PoolView, Volume, VolumeError, VolumeInner, AKEY_BASE, AKEY_COPY, AKEY_DELTA, AKEY_PARITY};
use crate::placement::{Group, ShardPlacement, TargetRef};

/// What settling the torn stripes of a chunk did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TornResolved {
    /// Stripes looked at (their newest base or parity changed since the last pass).
    pub checked: u64,
    /// Torn stripes completed at their epoch.
    pub completed: u64,
    /// Torn stripes returned to their state before the torn write.
    pub undone: u64,
    /// Torn stripes left for later (too new, or the group not all readable).
    pub waiting: u64,
    /// Torn stripes that cannot be settled (fewer than k shards hold the stripe as it was
    /// before the write, or a clone's or rolled-back volume's stripe would have to be undone):
    /// they stay torn, logged; degraded reads of them fail.
    pub unsettled: u64,
}

/// The newest `B`/`P` version over one cell of one shard: (epoch, a range punch); (0, false)
/// where nothing was ever written.
type CellState = (Epoch, bool);

impl Volume {
    /// Looks at the full stripes of chunk `chunk` whose base or parity changed above `since` on
    /// any shard, as seen at `boundary` (the pool's stable epoch), from `from` (a target holding
    /// one of the chunk's shards). The first parity shard's engine — the only one that settles a
    /// chunk's torn stripes, one after the other and between its own folds — settles them;
    /// from another shard the stripes where that shard holds a newer write than the first parity
    /// shard are only counted as waiting (its engine then keeps the versions that settle them).
    /// Replicated classes have nothing to settle.
    pub async fn resolve_torn(
        &self,
        chunk: u64,
        from: TargetRef,
        since: Option<Epoch>,
        boundary: Epoch,
    ) -> Result<TornResolved, VolumeError> {
        let v = &self.inner;
        if !v.class.is_ec() || v.snapshot.is_some() {
            return Ok(TornResolved::default());
        }
        v.resolve_torn(chunk, from, since.unwrap_or(0), boundary).await
    }
}

impl VolumeInner {
    async fn resolve_torn(&self, chunk: u64, from: TargetRef, since: Epoch, boundary: Epoch) -> Result<TornResolved, VolumeError> {
        let view = self.pool.current();
        let dkey = key_from_u64(chunk);
        let group = self.group(&view, &dkey)?;
        let mut out = TornResolved::default();
        let Some(me) = group.shards.iter().position(|s| s.target() == from) else { return Ok(out) };
        let k = self.class.data_shards() as usize;
        let cell = u64::from(self.layout.cell_size());
        let stripes = self.layout.chunk_size() / (cell * k as u64);
        let akey_of = |i: usize| if i < k { AKEY_BASE } else { AKEY_PARITY };
        let states_of = |i: usize| self.cell_states(&view, &group.shards[i], &dkey, akey_of(i), stripes, boundary);
        if me != k {
            // Another shard: ahead of the first parity shard, in a way that is torn, it waits.
            let mine = states_of(me).await?;
            if mine.iter().all(|c| c.0 <= since) {
                return Ok(out);
            }
            let leader = states_of(k).await?;
            out.waiting = (0..stripes as usize)
                .filter(|&s| mine[s].0 > since && mine[s].0 > leader[s].0 && !tear(&[mine[s], leader[s]]).torn.is_empty())
                .count() as u64;
            return Ok(out);
        }
        let mut states = Vec::with_capacity(group.shards.len());
        for r in join_all((0..group.shards.len()).map(states_of)).await {
            states.push(r?);
        }
        let candidates: Vec<u64> = (0..stripes).filter(|&s| states.iter().any(|st| st[s as usize].0 > since)).collect();
        if candidates.is_empty() {
            return Ok(out);
        }
        if group.shards.iter().any(|s| s.rebuilding || !s.readable() || !s.writable()) {
            out.waiting += candidates.len() as u64;
            return Ok(out);
        }
        for s in candidates {
            out.checked += 1;
            let cells: Vec<CellState> = states.iter().map(|st| st.get(s as usize).copied().unwrap_or_default()).collect();
            match self.settle_stripe(&view, &group, &dkey, s, &cells, boundary).await? {
                Settled::Whole => {}
                Settled::Completed => out.completed += 1,
                Settled::Undone => out.undone += 1,
                Settled::Waiting => out.waiting += 1,
                Settled::Unsettleable(why) => {
                    out.unsettled += 1;
                    tracing::warn!(volume = %self.info.name, chunk, stripe = s, "a torn full-stripe write cannot be settled: {why}");
                }
            }
        }
        Ok(out)
    }

    /// The newest version over each cell of `akey` on one shard, for every stripe of the chunk.
    async fn cell_states(
        &self,
        view: &PoolView,
        shard: &ShardPlacement,
        dkey: &bytes::Bytes,
        akey: &'static [u8],
        stripes: u64,
        boundary: Epoch,
    ) -> Result<Vec<CellState>, VolumeError> {
        let cell = u64::from(self.layout.cell_size());
        let runs = self.fetch_epochs(view, shard, dkey, akey, 0..stripes * cell, boundary).await.map_err(|e| shard_fail(shard, e))?;
        let mut out = vec![(0, false); stripes as usize];
        for (off, len, epoch, punched) in runs {
            for s in off / cell..=(off + len - 1) / cell {
                if let Some(c) = out.get_mut(s as usize) {
                    if epoch > c.0 {
                        *c = (epoch, punched);
                    }
                }
            }
        }
        Ok(out)
    }

    async fn settle_stripe(
        &self,
        view: &PoolView,
        group: &Group,
        dkey: &bytes::Bytes,
        s: u64,
        cells: &[CellState],
        boundary: Epoch,
    ) -> Result<Settled, VolumeError> {
        let k = self.class.data_shards() as usize;
        let n = group.shards.len();
        let cell = u64::from(self.layout.cell_size());
        let in_shard = s * cell..(s + 1) * cell;
        let in_chunk = s * cell * k as u64..(s + 1) * cell * k as u64;
        let Tear { newest, punched, torn } = tear(cells);
        if torn.is_empty() {
            return Ok(Settled::Whole);
        }
        let have: Vec<usize> = (0..n).filter(|&i| cells[i].0 == newest).collect();
        let codec = self.codec.as_ref().ok_or_else(|| VolumeError::Config("EC volume without a codec".into()))?;
        let note = |how: &str| {
            tracing::info!(volume = %self.info.name, stripe = s, epoch = newest, shards = have.len(), of = n, "a torn full-stripe write is {how}");
        };
        // A whole-stripe punch needs no data: the others are punched too.
        if punched {
            let mut reqs: Vec<(&ShardPlacement, Request)> = Vec::new();
            for &i in &torn {
                let sh = &group.shards[i];
                if i < k {
                    reqs.push((sh, self.punch_range(dkey, AKEY_BASE, &in_shard, newest)));
                    reqs.push((sh, self.punch_range(dkey, AKEY_DELTA, &in_shard, newest)));
                } else {
                    reqs.push((sh, self.punch_range(dkey, AKEY_PARITY, &in_shard, newest)));
                    reqs.push((sh, self.punch_range(dkey, AKEY_COPY, &in_chunk, newest)));
                }
            }
            self.send_all(view, reqs).await?;
            note("completed (a punch)");
            return Ok(Settled::Completed);
        }
        if have.len() >= k {
            // All: the stripe at E from k shards that hold it; the others take their cell at E.
            let Some(mut stripe) = self.stripe_cells_at(view, group, dkey, &in_shard, &have, newest).await? else {
                return Ok(Settled::Unsettleable(format!("fewer than k shards hold whole cells at epoch {newest}")));
            };
            codec.reconstruct(&mut stripe).map_err(|e| VolumeError::Config(e.to_string()))?;
            let mut reqs = Vec::new();
            for &i in &torn {
                let data = bytes::Bytes::from(stripe[i].take().unwrap_or_default());
                reqs.push((&group.shards[i], self.update(dkey, if i < k { AKEY_BASE } else { AKEY_PARITY }, in_shard.start, data, newest)));
            }
            self.send_all(view, reqs).await?;
            note("completed");
            return Ok(Settled::Completed);
        }
        // Nothing: the stripe as before E, written whole above it.
        let Some(after) = newest.checked_add(1).filter(|e| *e <= boundary) else { return Ok(Settled::Waiting) };
        if self.parent.is_some() || !self.rollbacks.is_empty() {
            // Holes there read older data, which whole base cells would cover.
            return Ok(Settled::Unsettleable("undoing it in a clone or a rolled-back volume is not supported".into()));
        }
        let before = torn.iter().map(|&i| cells[i].0).max().unwrap_or(0);
        let mut base: Vec<Option<Vec<u8>>> = if before == 0 {
            vec![Some(vec![0u8; cell as usize]); n]
        } else {
            // Shards outside A hold E0 if they are at it; shards of A may still hold it below E.
            let sources: Vec<usize> = (0..n).filter(|&i| cells[i].0 == before || cells[i].0 == newest).collect();
            match self.stripe_cells_at(view, group, dkey, &in_shard, &sources, before).await? {
                Some(cells) => cells,
                None => {
                    return Ok(Settled::Unsettleable(format!(
                        "fewer than k shards hold the stripe as it was before epoch {newest} (at {before})"
                    )))
                }
            }
        };
        if let Err(e) = codec.reconstruct_data(&mut base) {
            return Ok(Settled::Unsettleable(e.to_string()));
        }
        let mut data = Vec::with_capacity(k);
        for (c, b) in base.iter_mut().take(k).enumerate() {
            let mut cell_bytes = b.take().unwrap_or_else(|| vec![0u8; cell as usize]);
            // Fragments written between E0 and E, on top of the base.
            let req = self.fetch(dkey, AKEY_DELTA, in_shard.start, cell as u32, newest - 1, &[]);
            let (bytes, runs) = self.fetch_runs(view, &group.shards[c], req).await.map_err(|e| shard_fail(&group.shards[c], e))?;
            for r in runs.iter().filter(|r| r.epoch > before) {
                let (a, b) = (r.offset as usize, (r.offset + r.len) as usize);
                cell_bytes[a..b].copy_from_slice(&bytes[a..b]);
            }
            data.push(cell_bytes);
        }
        let parity = codec.encode(&data).map_err(|e| VolumeError::Config(e.to_string()))?;
        let mut reqs = Vec::new();
        for (c, d) in data.into_iter().enumerate() {
            reqs.push((&group.shards[c], self.update(dkey, AKEY_BASE, in_shard.start, bytes::Bytes::from(d), after)));
        }
        for (j, q) in parity.into_iter().enumerate() {
            reqs.push((&group.shards[k + j], self.update(dkey, AKEY_PARITY, in_shard.start, bytes::Bytes::from(q), after)));
        }
        self.send_all(view, reqs).await?;
        note("undone");
        Ok(Settled::Undone)
    }

    /// The cells (`B` of data shards, `P` of parity shards) of the shards in `from` whose
    /// version over the whole cell is exactly `epoch`, as a stripe with the others `None`;
    /// `None` if fewer than k are.
    async fn stripe_cells_at(
        &self,
        view: &PoolView,
        group: &Group,
        dkey: &bytes::Bytes,
        in_shard: &std::ops::Range<u64>,
        from: &[usize],
        epoch: Epoch,
    ) -> Result<Option<Vec<Option<Vec<u8>>>>, VolumeError> {
        let k = self.class.data_shards() as usize;
        let cell = in_shard.end - in_shard.start;
        let reads = from.iter().map(|&i| {
            let sh = &group.shards[i];
            let req = self.fetch(dkey, if i < k { AKEY_BASE } else { AKEY_PARITY }, in_shard.start, cell as u32, epoch, &[]);
            async move { (i, self.fetch_runs(view, sh, req).await.map_err(|e| shard_fail(sh, e))) }
        });
        let mut stripe: Vec<Option<Vec<u8>>> = vec![None; group.shards.len()];
        let mut found = 0;
        for (i, r) in join_all(reads).await {
            let (data, runs) = r?;
            let whole = runs.first().is_some_and(|r| r.offset == 0) && runs.iter().map(|r| u64::from(r.len)).sum::<u64>() == cell;
            if whole && runs.iter().all(|r| r.epoch == epoch) {
                stripe[i] = Some(data.to_vec());
                found += 1;
            }
        }
        Ok((found >= k).then_some(stripe))
    }
}

/// How a stripe's shards disagree.
struct Tear {
    /// The newest epoch of any shard's `B`/`P`.
    newest: Epoch,
    /// That version is a whole-stripe punch.
    punched: bool,
    /// The shards that do not hold it (empty: the stripe is whole).
    torn: Vec<usize>,
}

fn tear(cells: &[CellState]) -> Tear {
    let newest = cells.iter().map(|c| c.0).max().unwrap_or(0);
    let punched = cells.contains(&(newest, true));
    // After a whole-stripe punch every cell reads zeros: punched (at any epoch) or, once the
    // engines dropped a punch that hid nothing, never written. Only older data is torn.
    let torn = (0..cells.len()).filter(|&i| if punched { !cells[i].1 && cells[i].0 > 0 } else { cells[i].0 != newest }).collect();
    Tear { newest, punched, torn }
}

impl VolumeInner {
    /// Which stripes of a chunk are torn at `boundary` (EC aggregation leaves them to be settled
    /// first: folding one would keep its mix of old and new cells).
    pub(super) async fn torn_stripes(
        &self,
        view: &PoolView,
        group: &Group,
        dkey: &bytes::Bytes,
        boundary: Epoch,
    ) -> Result<Vec<bool>, VolumeError> {
        let k = self.class.data_shards() as usize;
        let stripes = self.layout.chunk_size() / (u64::from(self.layout.cell_size()) * k as u64);
        let reads = group
            .shards
            .iter()
            .enumerate()
            .map(|(i, sh)| self.cell_states(view, sh, dkey, if i < k { AKEY_BASE } else { AKEY_PARITY }, stripes, boundary));
        let mut states = Vec::with_capacity(group.shards.len());
        for r in join_all(reads).await {
            states.push(r?);
        }
        Ok((0..stripes as usize)
            .map(|s| {
                let cells: Vec<CellState> = states.iter().map(|st| st.get(s).copied().unwrap_or_default()).collect();
                !tear(&cells).torn.is_empty()
            })
            .collect())
    }
}

/// What became of one stripe.
enum Settled {
    /// It was not torn.
    Whole,
    Completed,
    Undone,
    Waiting,
    Unsettleable(String),
}
