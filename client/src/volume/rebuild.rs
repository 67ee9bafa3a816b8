//! Rebuild of one shard of one chunk (dkey) from the other shards of its redundancy group, at the
//! shard's place in the current layout, keeping every version's epoch.
//!
//! The destination first drops what it holds above the rebuild's floor ([`RebuildOptions::since`],
//! engine Discard), then receives, per akey, every version the survivors show that is newer than
//! the floor, written *at its original epoch*: a write that reaches the destination during the
//! rebuild has a newer epoch and stays on top, and the `B`/`P` invariant (the newest base cells and
//! parity of a stripe share one epoch) holds on the rebuilt shard as it did on the lost one. With
//! a floor (incremental reintegration of a target that kept its data), ranges the survivors show
//! as holes are punched *just above the floor*, which hides the destination's stale bytes without
//! hiding anything newer.
//!
//! **Snapshots.** The survivors keep every retained view (a snapshot's epoch), so the rebuilt
//! shard must too: the shard is rebuilt once per view, oldest first — each snapshot epoch above
//! the floor, then the rebuild's own read epoch — each step with the previous view as its floor.
//! A step writes the versions its view shows newer than the previous view, and punches, just
//! above the previous view, what its view shows as holes: the previous view stays readable at
//! its epoch and the next one reads as on the survivors.
//!
//! | shard | rebuilt from | writes |
//! |---|---|---|
//! | replica | a readable replica's `D` | `D` runs at their epochs |
//! | EC data `c` | a readable parity shard (`P` epoch per stripe, copies `C`) and k − 1 other cells at that epoch | `B` reconstructed per stripe at the parity's epoch; `D` from the copies newer than it |
//! | EC parity `j` | k cells of each stripe at one epoch (data `B`, other parity `P`); copies from another parity shard's `C` or from the data shards' `D` | `P` re-encoded at the stripe's epoch; `C` at the copies' epochs |
//!
//! A stripe whose cells do not share an epoch (a full-stripe write racing the rebuild, or torn by
//! a client that died) is not rebuilt into anything: the call fails and the caller retries later
//! ([`RebuildOptions::settle_torn`] lets a parity shard of a stripe that stays torn take parity at
//! the newest epoch, so that degraded reads of it keep failing instead of returning zeros).

use std::ops::Range;

use bytes::Bytes;
use futures::future::join_all;
use futures::stream::{self, StreamExt};
use tessera_engine_proto::request::ENUM_MAX_KEYS;
use tessera_engine_proto::{
    key_from_u64, key_to_u64, DataRun, Discard, EnumTarget, Enumerate, Epoch, Punch, PunchTarget, Reply, Request, SetRetention,
};
use tracing::debug;

use super::{PoolView, ShardError, Volume, VolumeError, VolumeInner, AKEY_BASE, AKEY_COPY, AKEY_DELTA, AKEY_PARITY};
use crate::hlc;
use crate::placement::{Group, ShardPlacement, TargetRef};

/// Largest range fetched in one request while rebuilding.
const FETCH_WINDOW: u64 = 1 << 20;
/// Writes to the destination in flight at once.
const WRITES_IN_FLIGHT: usize = 16;

/// How to rebuild a shard.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RebuildOptions {
    /// Copy only versions newer than this epoch (the destination kept its data up to it);
    /// 0 rebuilds everything.
    pub since: Epoch,
    /// A parity shard of a stripe whose data cells stay at different epochs takes parity at the
    /// newest of them (only for stripes torn long ago; see the module docs).
    pub settle_torn: bool,
    /// The destination's stale versions are discarded only below this epoch: the epoch at which
    /// the pool map that moved the shard took effect (`PoolMapInfo::map_epoch`), announced to
    /// every engine before the rebuild. Writes planned with that map carry later epochs, so one
    /// that reaches the destination before the discard stays there even if it reaches the
    /// survivors only after they are read. 0: no bound (a repair in place, which must remove
    /// whatever is there).
    pub discard_below: Epoch,
}

/// What rebuilding one shard wrote.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ShardRebuilt {
    /// Bytes written.
    pub bytes: u64,
    /// Updates sent.
    pub updates: u64,
    /// Range punches sent (holes, incremental only).
    pub punches: u64,
    /// The epoch the survivors were read at: writes stamped later reached the destination
    /// themselves; a snapshot retained at or below it must be among the retained views passed.
    pub read_epoch: Epoch,
    /// Views copied: the retained snapshot epochs above the floor, plus the current one.
    pub views: u32,
}

/// A run of bytes of one akey at one epoch, at an absolute akey offset.
#[derive(Debug, Clone)]
pub(super) struct Run {
    pub(super) off: u64,
    pub(super) data: Bytes,
    pub(super) epoch: Epoch,
}

impl Run {
    pub(super) fn end(&self) -> u64 {
        self.off + self.data.len() as u64
    }

    /// The part inside `r`, if any.
    fn clip(&self, r: &Range<u64>) -> Option<Run> {
        let (a, b) = (self.off.max(r.start), self.end().min(r.end));
        (a < b).then(|| Run { off: a, data: self.data.slice((a - self.off) as usize..(b - self.off) as usize), epoch: self.epoch })
    }
}

/// The runs of `runs` inside `r`, clipped.
pub(super) fn within(runs: &[Run], r: &Range<u64>) -> Vec<Run> {
    runs.iter().filter_map(|x| x.clip(r)).collect()
}

/// The one epoch the runs cover `r` with: `Ok(None)` if nothing, `Err` if partly or at several.
fn cell_epoch(runs: &[Run], r: &Range<u64>) -> Result<Option<Epoch>, ()> {
    let inside = within(runs, r);
    let Some(first) = inside.first() else { return Ok(None) };
    let covered: u64 = inside.iter().map(|x| x.data.len() as u64).sum();
    if covered != r.end - r.start || inside.iter().any(|x| x.epoch != first.epoch) {
        return Err(());
    }
    Ok(Some(first.epoch))
}

/// The bytes of `r` from runs covering it whole.
fn cell_bytes(runs: &[Run], r: &Range<u64>) -> Vec<u8> {
    let mut out = vec![0u8; (r.end - r.start) as usize];
    for x in within(runs, r) {
        let a = (x.off - r.start) as usize;
        out[a..a + x.data.len()].copy_from_slice(&x.data);
    }
    out
}

/// Parts of `r` that no run covers.
fn holes(runs: &[Run], r: &Range<u64>) -> Vec<Range<u64>> {
    let mut inside = within(runs, r);
    inside.sort_by_key(|x| x.off);
    let mut out = Vec::new();
    let mut at = r.start;
    for x in inside {
        if x.off > at {
            out.push(at..x.off);
        }
        at = at.max(x.end());
    }
    if at < r.end {
        out.push(at..r.end);
    }
    out
}

pub(super) fn shard_fail(s: &ShardPlacement, e: impl std::fmt::Display) -> VolumeError {
    VolumeError::Unavailable(format!("engine {} target {}: {e}", s.rank, s.target_index))
}

/// The writes of one shard rebuild, for the destination.
#[derive(Debug, Default)]
struct Plan {
    reqs: Vec<Request>,
}

fn target_fail(t: TargetRef, e: impl std::fmt::Display) -> VolumeError {
    VolumeError::Unavailable(format!("engine {} target {}: {e}", t.rank, t.index))
}

/// What self-healing (the engines' rebuild agents, scrub repair) does with a volume.
impl Volume {
    /// Fills shard `shard` of chunk `chunk` at its place in the current layout from the group's
    /// other shards (see the module docs). Also repairs a shard whose data failed its checksum:
    /// the destination's versions above `opts.since` are replaced. `retained`: the volume's
    /// snapshot epochs, whose views the destination must keep as the survivors do.
    pub async fn rebuild_shard(
        &self,
        chunk: u64,
        shard: u32,
        opts: RebuildOptions,
        retained: &[Epoch],
    ) -> Result<ShardRebuilt, VolumeError> {
        self.inner.rebuild_shard(chunk, shard, opts, retained).await
    }

    /// The version of the pool map this volume uses.
    pub fn map_version(&self) -> u32 {
        self.inner.pool.current().map.version()
    }

    /// Refreshes the pool map until it is at least `version` (gives up after a few seconds:
    /// the caller sees the version it got).
    pub async fn refresh_pool_map(&self, version: u32) -> u32 {
        let v = &self.inner;
        for _ in 0..40 {
            if v.pool.current().map.version() >= version {
                break;
            }
            v.cluster.refresh(&v.pool).await;
            if v.pool.current().map.version() < version {
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
        v.pool.current().map.version()
    }

    /// Fetches the pool map and the engines' addresses again (an engine that restarted may
    /// listen elsewhere; the map version alone does not say so).
    pub async fn reload_map(&self) {
        let v = &self.inner;
        v.cluster.refresh(&v.pool).await;
    }

    /// Makes every engine with a placeable target in the pool enforce this volume's pool map
    /// version now: a Ping carrying it to each (engines raise their known version from every
    /// request). From then on no read or write planned with an older map is accepted, so a
    /// rebuild's reads see every write the old map could still route, and a clean-up never
    /// discards what an old map still reads. Engines that cannot be reached are skipped: their
    /// targets are on their way to DOWN.
    pub async fn announce_map(&self) {
        let v = &self.inner;
        let view = v.pool.current();
        let engines: Vec<TargetRef> = view
            .map
            .engines()
            .iter()
            .filter_map(|e| view.map.engine_targets(e).iter().find(|t| t.state.is_placeable()))
            .map(|t| TargetRef { rank: t.rank, index: t.index })
            .collect();
        join_all(engines.into_iter().map(|t| {
            let view = &view;
            async move {
                if let Err(e) = v.call_target(view, t, Request::Ping).await {
                    debug!(volume = %v.info.name, rank = t.rank, error = %e, "map announcement not delivered");
                }
            }
        }))
        .await;
    }

    /// The redundancy group of chunk `chunk` under the current map.
    pub fn chunk_group(&self, chunk: u64) -> Result<Group, VolumeError> {
        let v = &self.inner;
        v.group(&v.pool.current(), &key_from_u64(chunk))
    }

    /// Bytes one shard of one chunk holds at most (its cells, packed).
    pub fn shard_bytes_per_chunk(&self) -> u64 {
        if self.inner.class.is_ec() {
            self.inner.shard_len()
        } else {
            self.inner.layout.chunk_size()
        }
    }

    /// The chunks (dkeys) of this volume that `target` holds visibly now, or, with `since`,
    /// that changed there above that epoch (visible or not), in order.
    pub async fn list_chunks(&self, target: TargetRef, since: Option<Epoch>) -> Result<Vec<u64>, VolumeError> {
        let v = &self.inner;
        let view = v.pool.current();
        let epoch = hlc::now();
        let what = match since {
            Some(s) => EnumTarget::DkeysSince(v.oid, s),
            None => EnumTarget::Dkeys(v.oid),
        };
        let mut out = Vec::new();
        let mut anchor = None;
        loop {
            let req = Request::Enumerate(Enumerate { cont: v.cont, epoch, what: what.clone(), anchor: anchor.take(), max: ENUM_MAX_KEYS });
            let reply = v.call_target(&view, target, req).await.map_err(|e| target_fail(target, e))?;
            let Reply::Enumerated { keys, next } = reply else {
                return Err(target_fail(target, "answered an enumeration with another reply"));
            };
            // Keys that are not chunk numbers are not the volume's (nothing else writes there).
            out.extend(keys.iter().filter_map(|k| key_to_u64(k)));
            match next {
                Some(n) => anchor = Some(n),
                None => return Ok(out),
            }
        }
    }

    /// Deletes (engine Discard) everything `target` holds of chunk `chunk`, or of the whole
    /// volume with `None`: data that moved elsewhere, or a drained target.
    pub async fn discard_chunk(&self, target: TargetRef, chunk: Option<u64>) -> Result<(), VolumeError> {
        let v = &self.inner;
        let req = Request::Discard(Discard { cont: v.cont, obj: v.oid, above: 0, below: u64::MAX, dkey: chunk.map(key_from_u64) });
        v.call_target(&v.pool.current(), target, req).await.map_err(|e| target_fail(target, e))?;
        Ok(())
    }

    /// Keeps `target` from aggregating this volume's versions above `below` (0: the engine's
    /// default boundary again), so punches made while another target is out stay visible to
    /// its incremental reintegration.
    pub async fn hold_aggregation(&self, target: TargetRef, below: Epoch) -> Result<(), VolumeError> {
        let v = &self.inner;
        let req = Request::SetRetention(SetRetention { cont: v.cont, aggregate_below: below, retained: Vec::new() });
        v.call_target(&v.pool.current(), target, req).await.map_err(|e| target_fail(target, e))?;
        Ok(())
    }
}

impl VolumeInner {
    /// See [`super::Volume::rebuild_shard`].
    pub(super) async fn rebuild_shard(
        &self,
        chunk: u64,
        shard: u32,
        opts: RebuildOptions,
        retained: &[Epoch],
    ) -> Result<ShardRebuilt, VolumeError> {
        let view = self.pool.current();
        let dkey = key_from_u64(chunk);
        let group = self.group(&view, &dkey)?;
        let dest = *group
            .shards
            .get(shard as usize)
            .ok_or_else(|| VolumeError::Config(format!("chunk {chunk} has no shard {shard} in class {}", self.class)))?;
        if !dest.writable() {
            return Err(VolumeError::Unavailable(format!("chunk {chunk} shard {shard}: its target is down and has no new home")));
        }
        // Sources: every shard where reads find it (a rebuilding shard at its base target).
        let group = group.for_reads();
        // What the destination holds above the floor goes first: a punch could not hide it
        // without hiding the older epochs about to be rewritten.
        // Only below the moving map's epoch (when given): writes planned with it may already be
        // there and stay.
        let below = match opts.discard_below {
            b if b > opts.since => b,
            _ => u64::MAX,
        };
        let discard = Request::Discard(Discard { cont: self.cont, obj: self.oid, above: opts.since, below, dkey: Some(dkey.clone()) });
        self.call(&view, &dest, discard).await.map_err(|e| shard_fail(&dest, e))?;
        // The survivors are read only now, at an epoch above every write the discard may have
        // removed: a write that reached the destination before it was stamped before this
        // moment, so the read below brings it back. Writes that arrive after the discard stay
        // where they land.
        let epoch = hlc::now();
        // Every snapshot view above the floor, oldest first, then the current one (module docs).
        let mut views: Vec<Epoch> = retained.iter().copied().filter(|&e| e > opts.since && e < epoch).collect();
        views.sort_unstable();
        views.dedup();
        views.push(epoch);

        let mut plan = Plan::default();
        let mut since = opts.since;
        for &at in &views {
            let step = RebuildOptions { since, ..opts };
            if !self.class.is_ec() {
                self.plan_replica(&view, &group, &dest, &dkey, at, step, &mut plan).await?;
            } else if shard < self.class.data_shards() {
                self.plan_data(&view, &group, &dest, &dkey, at, step, &mut plan).await?;
            } else {
                self.plan_parity(&view, &group, &dest, &dkey, at, step, &mut plan).await?;
            }
            since = at;
        }

        let mut done = ShardRebuilt { read_epoch: epoch, views: views.len() as u32, ..ShardRebuilt::default() };
        for r in &plan.reqs {
            match r {
                Request::Update(u) => {
                    done.updates += 1;
                    done.bytes += u.value.data().len() as u64;
                }
                _ => done.punches += 1,
            }
        }
        let results: Vec<_> =
            stream::iter(plan.reqs.into_iter().map(|r| self.call(&view, &dest, r))).buffer_unordered(WRITES_IN_FLIGHT).collect().await;
        for r in results {
            r.map_err(|e| shard_fail(&dest, e))?;
        }
        Ok(done)
    }

    /// Every visible version of `akey` over `range` on `shard`, at `epoch`, as runs at absolute
    /// offsets (fetched in windows of at most [`FETCH_WINDOW`]).
    pub(super) async fn runs(
        &self,
        view: &PoolView,
        shard: &ShardPlacement,
        dkey: &Bytes,
        akey: &'static [u8],
        range: Range<u64>,
        epoch: Epoch,
    ) -> Result<Vec<Run>, VolumeError> {
        let mut out = Vec::new();
        let mut at = range.start;
        while at < range.end {
            let len = (range.end - at).min(FETCH_WINDOW);
            let req = self.fetch(dkey, akey, at, len as u32, epoch, &[]);
            let (data, runs): (Bytes, Vec<DataRun>) = self.fetch_runs(view, shard, req).await.map_err(|e| match e {
                ShardError::Checksum(m) => VolumeError::Corrupt(format!("engine {} target {}: {m}", shard.rank, shard.target_index)),
                other => shard_fail(shard, other),
            })?;
            for r in runs {
                let (a, b) = (r.offset as usize, (r.offset + r.len) as usize);
                out.push(Run { off: at + u64::from(r.offset), data: data.slice(a..b), epoch: r.epoch });
            }
            at += len;
        }
        Ok(out)
    }

    pub(super) fn update(&self, dkey: &Bytes, akey: &'static [u8], off: u64, data: Bytes, epoch: Epoch) -> Request {
        super::write::array_update(self.cont, self.oid, epoch, dkey, akey, off, data)
    }

    pub(super) fn punch_range(&self, dkey: &Bytes, akey: &'static [u8], r: &Range<u64>, epoch: Epoch) -> Request {
        Request::Punch(Punch {
            cont: self.cont,
            obj: self.oid,
            epoch,
            what: PunchTarget::Range { dkey: dkey.clone(), akey: Bytes::from_static(akey), offset: r.start, len: r.end - r.start },
        })
    }

    /// Runs newer than the stripe's base epoch and the floor as updates. With a floor, the holes
    /// as punches at the floor — but only where the stripe has no base (no full-stripe write is
    /// visible): a data shard's reads merge `B` and `D` newest first, so a punch in `D` at the
    /// floor would also hide an older base cell; where a base exists, it already hides every stale
    /// fragment below it (a stripe is only ever punched whole, which removes its base too).
    #[allow(clippy::too_many_arguments)]
    fn push_runs(
        &self,
        plan: &mut Plan,
        dkey: &Bytes,
        akey: &'static [u8],
        runs: &[Run],
        range: &Range<u64>,
        base: Option<Epoch>,
        since: Epoch,
    ) {
        for x in within(runs, range) {
            if x.epoch > base.unwrap_or(0).max(since) {
                plan.reqs.push(self.update(dkey, akey, x.off, x.data, x.epoch));
            }
        }
        if since > 0 && base.is_none() {
            for h in holes(runs, range) {
                plan.reqs.push(self.punch_range(dkey, akey, &h, since + 1));
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn plan_replica(
        &self,
        view: &PoolView,
        group: &Group,
        dest: &ShardPlacement,
        dkey: &Bytes,
        epoch: Epoch,
        opts: RebuildOptions,
        plan: &mut Plan,
    ) -> Result<(), VolumeError> {
        let chunk = self.layout.chunk_size();
        let mut last = String::from("no readable replica");
        for s in group.shards.iter().filter(|s| s.shard != dest.shard && s.readable()) {
            match self.runs(view, s, dkey, AKEY_DELTA, 0..chunk, epoch).await {
                Ok(runs) => {
                    self.push_runs(plan, dkey, AKEY_DELTA, &runs, &(0..chunk), None, opts.since);
                    return Ok(());
                }
                Err(e) => last = e.to_string(),
            }
        }
        Err(VolumeError::Unavailable(format!("rebuilding shard {}: {last}", dest.shard)))
    }

    fn cell(&self) -> u64 {
        u64::from(self.layout.cell_size())
    }

    /// Length of a shard's range in a chunk (its cells packed).
    fn shard_len(&self) -> u64 {
        self.layout.stripes_per_chunk() * self.cell()
    }

    /// Chunk range of cell `c` of stripe `s`.
    fn cell_in_chunk(&self, s: u64, c: u64) -> Range<u64> {
        let k = u64::from(self.class.data_shards());
        let at = (s * k + c) * self.cell();
        at..at + self.cell()
    }

    /// Shard range of stripe `s`.
    fn cell_in_shard(&self, s: u64) -> Range<u64> {
        s * self.cell()..(s + 1) * self.cell()
    }

    /// The base runs (B of data shards, P of parity shards) of every readable shard except
    /// `skip`, over the whole shard range at `epoch`; unreadable ones are `None`.
    async fn cells_of_group(&self, view: &PoolView, group: &Group, dkey: &Bytes, skip: u32, epoch: Epoch) -> Vec<Option<Vec<Run>>> {
        let k = self.class.data_shards();
        let len = self.shard_len();
        let reads = group.shards.iter().map(|s| async move {
            if s.shard == skip || !s.readable() {
                return None;
            }
            let akey = if s.shard < k { AKEY_BASE } else { AKEY_PARITY };
            self.runs(view, s, dkey, akey, 0..len, epoch).await.ok()
        });
        futures::future::join_all(reads).await
    }

    /// k cells of stripe `s` exactly at epoch `e`, in shard order (the others `None`): from the
    /// prefetched runs in `have` when they are at `e`, else fetched at `e`. `None` when fewer
    /// than k shards hold the stripe at `e` (torn, or a full-stripe write racing the rebuild).
    async fn cells_at(
        &self,
        view: &PoolView,
        group: &Group,
        dkey: &Bytes,
        have: &[Option<Vec<Run>>],
        s: u64,
        e: Epoch,
    ) -> Option<Vec<Option<Vec<u8>>>> {
        let k = self.class.data_shards();
        let want = k as usize;
        let r = self.cell_in_shard(s);
        let mut cells: Vec<Option<Vec<u8>>> = vec![None; group.shards.len()];
        let mut got = 0;
        for (i, runs) in have.iter().enumerate() {
            if got >= want {
                break;
            }
            let Some(runs) = runs else { continue };
            if cell_epoch(runs, &r) == Ok(Some(e)) {
                cells[i] = Some(cell_bytes(runs, &r));
                got += 1;
                continue;
            }
            // Newer than e here (a racing or torn write): the version at e may still be there.
            let sh = &group.shards[i];
            let akey = if sh.shard < k { AKEY_BASE } else { AKEY_PARITY };
            if let Ok(exact) = self.runs(view, sh, dkey, akey, r.clone(), e).await {
                if cell_epoch(&exact, &r) == Ok(Some(e)) {
                    cells[i] = Some(cell_bytes(&exact, &r));
                    got += 1;
                }
            }
        }
        (got >= want).then_some(cells)
    }

    #[allow(clippy::too_many_arguments)]
    async fn plan_data(
        &self,
        view: &PoolView,
        group: &Group,
        dest: &ShardPlacement,
        dkey: &Bytes,
        epoch: Epoch,
        opts: RebuildOptions,
        plan: &mut Plan,
    ) -> Result<(), VolumeError> {
        let k = self.class.data_shards() as usize;
        let c = u64::from(dest.shard);
        let q = group.shards[k..]
            .iter()
            .find(|s| s.readable())
            .ok_or_else(|| VolumeError::Unavailable(format!("rebuilding data shard {c}: no readable parity shard")))?;
        let copies = self.runs(view, q, dkey, AKEY_COPY, 0..self.layout.chunk_size(), epoch).await?;
        let have = self.cells_of_group(view, group, dkey, dest.shard, epoch).await;
        let parity = have[q.shard as usize]
            .clone()
            .ok_or_else(|| VolumeError::Unavailable(format!("rebuilding data shard {c}: parity shard {} did not answer", q.shard)))?;
        let codec = self.codec.as_ref().ok_or_else(|| VolumeError::Config("EC volume without a codec".into()))?;
        let mut torn = Vec::new();
        for s in 0..self.layout.stripes_per_chunk() {
            let r = self.cell_in_shard(s);
            let e_p = match cell_epoch(&parity, &r) {
                Ok(e) => e,
                Err(()) => {
                    torn.push(s);
                    continue;
                }
            };
            match e_p {
                Some(e) if e > opts.since => {
                    let Some(mut cells) = self.cells_at(view, group, dkey, &have, s, e).await else {
                        torn.push(s);
                        continue;
                    };
                    codec.reconstruct_data(&mut cells).map_err(|e| VolumeError::Corrupt(e.to_string()))?;
                    let cell = cells[c as usize].take().ok_or_else(|| VolumeError::Corrupt("reconstruction left the cell empty".into()))?;
                    plan.reqs.push(self.update(dkey, AKEY_BASE, r.start, Bytes::from(cell), e));
                }
                Some(_) => {}
                None if opts.since > 0 => plan.reqs.push(self.punch_range(dkey, AKEY_BASE, &r, opts.since + 1)),
                None => {}
            }
            // Fragments: the copies of this cell newer than the base, moved to shard offsets.
            let in_chunk = self.cell_in_chunk(s, c);
            let shift = |x: Run| Run { off: x.off - in_chunk.start + r.start, ..x };
            let mine: Vec<Run> = within(&copies, &in_chunk).into_iter().map(shift).collect();
            self.push_runs(plan, dkey, AKEY_DELTA, &mine, &r, e_p, opts.since);
        }
        if !torn.is_empty() {
            return Err(VolumeError::Unavailable(format!(
                "rebuilding data shard {c}: stripes {torn:?} are torn or being written (cells at different epochs); retry later"
            )));
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    async fn plan_parity(
        &self,
        view: &PoolView,
        group: &Group,
        dest: &ShardPlacement,
        dkey: &Bytes,
        epoch: Epoch,
        opts: RebuildOptions,
        plan: &mut Plan,
    ) -> Result<(), VolumeError> {
        let k = self.class.data_shards() as usize;
        let n = group.shards.len();
        let j = dest.shard as usize;
        let have = self.cells_of_group(view, group, dkey, dest.shard, epoch).await;
        if have.iter().filter(|x| x.is_some()).count() < k {
            return Err(VolumeError::Unavailable(format!("rebuilding parity shard {j}: fewer than {k} other shards readable")));
        }
        let codec = self.codec.as_ref().ok_or_else(|| VolumeError::Config("EC volume without a codec".into()))?;
        // Copies: from another parity shard's C if one is readable, else from the data shards' D.
        let other_parity = group.shards[k..].iter().find(|s| s.shard as usize != j && s.readable());
        let copies: Option<Vec<Run>> = match other_parity {
            Some(q) => self.runs(view, q, dkey, AKEY_COPY, 0..self.layout.chunk_size(), epoch).await.ok(),
            None => None,
        };
        let deltas: Vec<Option<Vec<Run>>> = if copies.is_some() {
            Vec::new()
        } else {
            let reads = group.shards[..k].iter().map(|s| async move {
                if !s.readable() {
                    return None;
                }
                self.runs(view, s, dkey, AKEY_DELTA, 0..self.shard_len(), epoch).await.ok()
            });
            futures::future::join_all(reads).await
        };
        if copies.is_none() && deltas.iter().any(|d| d.is_none()) {
            return Err(VolumeError::Unavailable(format!(
                "rebuilding parity shard {j}: no other parity shard and not every data shard is readable for the copies"
            )));
        }
        let mut torn = Vec::new();
        for s in 0..self.layout.stripes_per_chunk() {
            let r = self.cell_in_shard(s);
            // The stripe's epoch: every readable cell must agree (or all be empty).
            let epochs: Vec<Result<Option<Epoch>, ()>> = have.iter().flatten().map(|runs| cell_epoch(runs, &r)).collect();
            let first = epochs.first().cloned().unwrap_or(Ok(None));
            let agreed = if epochs.iter().all(|e| *e == first) { first } else { Err(()) };
            let e_s = match agreed {
                Ok(e) => e,
                Err(()) if opts.settle_torn && have[..k].iter().all(|x| x.is_some()) => {
                    // Parity at the newest data epoch: degraded reads of this stripe will find the
                    // other cells at other epochs and fail rather than invent data.
                    let newest = have[..k].iter().flatten().flat_map(|runs| within(runs, &r)).map(|x| x.epoch).max();
                    if let Some(e) = newest {
                        let data: Vec<Vec<u8>> = have[..k].iter().flatten().map(|runs| cell_bytes(runs, &r)).collect();
                        let parity = codec.encode(&data).map_err(|e| VolumeError::Config(e.to_string()))?;
                        plan.reqs.push(self.update(dkey, AKEY_PARITY, r.start, Bytes::from(parity[j - k].clone()), e));
                    }
                    continue;
                }
                Err(()) => {
                    torn.push(s);
                    continue;
                }
            };
            match e_s {
                Some(e) if e > opts.since => {
                    let Some(mut cells) = self.cells_at(view, group, dkey, &have, s, e).await else {
                        torn.push(s);
                        continue;
                    };
                    cells.resize(n, None);
                    codec.reconstruct(&mut cells).map_err(|e| VolumeError::Corrupt(e.to_string()))?;
                    let cell = cells[j].take().ok_or_else(|| VolumeError::Corrupt("re-encoding left the parity cell empty".into()))?;
                    plan.reqs.push(self.update(dkey, AKEY_PARITY, r.start, Bytes::from(cell), e));
                }
                Some(_) => {}
                None if opts.since > 0 => plan.reqs.push(self.punch_range(dkey, AKEY_PARITY, &r, opts.since + 1)),
                None => {}
            }
            // Copies of this stripe's fragments newer than its base, at chunk offsets.
            let stripe_chunk = self.cell_in_chunk(s, 0).start..self.cell_in_chunk(s, k as u64 - 1).end;
            let stripe_copies: Vec<Run> = match &copies {
                Some(cp) => within(cp, &stripe_chunk),
                None => deltas
                    .iter()
                    .enumerate()
                    .flat_map(|(c, d)| {
                        let in_chunk = self.cell_in_chunk(s, c as u64);
                        d.iter()
                            .flat_map(|runs| within(runs, &r))
                            .map(move |x| Run { off: x.off - r.start + in_chunk.start, ..x })
                            .collect::<Vec<_>>()
                    })
                    .collect(),
            };
            self.push_runs(plan, dkey, AKEY_COPY, &stripe_copies, &stripe_chunk, e_s, opts.since);
        }
        if !torn.is_empty() {
            return Err(VolumeError::Unavailable(format!(
                "rebuilding parity shard {j}: stripes {torn:?} are torn or being written (cells at different epochs); retry later"
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(off: u64, len: usize, epoch: Epoch) -> Run {
        Run { off, data: Bytes::from(vec![epoch as u8; len]), epoch }
    }

    #[test]
    fn run_arithmetic() {
        let runs = vec![run(10, 10, 1), run(30, 10, 2)];
        assert_eq!(holes(&runs, &(0..50)), vec![0..10, 20..30, 40..50]);
        assert_eq!(holes(&runs, &(12..18)), Vec::<Range<u64>>::new());
        assert_eq!(cell_epoch(&runs, &(10..20)), Ok(Some(1)));
        assert_eq!(cell_epoch(&runs, &(10..40)), Err(()));
        assert_eq!(cell_epoch(&runs, &(0..5)), Ok(None));
        assert_eq!(cell_epoch(&runs, &(5..15)), Err(()));
        assert_eq!(cell_bytes(&runs, &(15..35)), [vec![1u8; 5], vec![0u8; 10], vec![2u8; 5]].concat());
        let clipped = within(&runs, &(15..35));
        assert_eq!(clipped.iter().map(|x| (x.off, x.data.len(), x.epoch)).collect::<Vec<_>>(), vec![(15, 5, 1), (30, 5, 2)]);
    }
}
