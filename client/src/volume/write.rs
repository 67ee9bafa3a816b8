//! Writes and write-zeroes: [`VolumeInner::plan`] turns a mapped range into the updates and
//! punches of every writable shard ([`ShardOp`]: full stripes as base cells and parity, partial
//! stripes as deltas and copies, replicated classes as deltas on every replica; whole stripes of
//! a write-zeroes punched), and [`VolumeInner::mutate`] sends them and retries at the same epoch
//! until every writable shard has acknowledged — or, when the pool map changed meanwhile, plans
//! the whole write again at a new epoch, later than the new map's (so a rebuild that discards
//! stale versions on a shard's new home below that epoch never removes it).

use std::sync::atomic::Ordering;
use std::time::Instant;

use bytes::Bytes;
use futures::future::join_all;
use tessera_engine_proto::{key_from_u64, ContainerId, Epoch, ObjectId, Punch, PunchTarget, Request, Update, UpdateValue};
use tracing::debug;

use super::{
    hlc, PoolView, ShardError, VolumeError, VolumeInner, AKEY_BASE, AKEY_COPY, AKEY_DELTA, AKEY_PARITY, RETRY_PAUSE, WRITE_DEADLINE,
};
use crate::layout::{Mapping, Piece};
use crate::placement::ShardPlacement;

/// One update or punch for one shard.
#[derive(Debug, Clone)]
struct ShardOp {
    shard: ShardPlacement,
    req: Request,
}

pub(super) fn array_update(
    cont: ContainerId,
    oid: ObjectId,
    epoch: Epoch,
    dkey: &Bytes,
    akey: &'static [u8],
    offset: u64,
    data: Bytes,
) -> Request {
    Request::Update(Update {
        cont,
        obj: oid,
        epoch,
        dkey: dkey.clone(),
        akey: Bytes::from_static(akey),
        value: UpdateValue::array(offset, data),
    })
}

fn range_punch(cont: ContainerId, oid: ObjectId, epoch: Epoch, dkey: &Bytes, akey: &'static [u8], offset: u64, len: u64) -> Request {
    Request::Punch(Punch {
        cont,
        obj: oid,
        epoch,
        what: PunchTarget::Range { dkey: dkey.clone(), akey: Bytes::from_static(akey), offset, len },
    })
}

impl VolumeInner {
    /// The updates and punches of one write (`data`) or write-zeroes (`None`) under `view`.
    /// Returns them and whether any shard had to be skipped.
    fn plan(&self, view: &PoolView, mapping: &Mapping, data: Option<&Bytes>, epoch: Epoch) -> Result<(Vec<ShardOp>, bool), VolumeError> {
        let (cont, oid) = (self.cont, self.oid);
        let mut ops = Vec::new();
        let mut skipped = false;
        let k = self.class.data_shards() as usize;
        let cell = u64::from(self.layout.cell_size());
        for span in &mapping.stripes {
            let dkey = key_from_u64(span.dkey);
            let group = self.group(view, &dkey)?;
            // A group with fewer than k shards readable anywhere could not serve what we write:
            // refuse rather than acknowledge data that cannot be read back.
            let sources = group.shards.iter().filter(|s| s.read_from().is_some()).count();
            let lost = group.unavailable_count().max(group.shards.len().saturating_sub(sources));
            if lost as u32 > self.class.parity_shards() {
                return Err(VolumeError::Unavailable(format!(
                    "{lost} of the {} shards of chunk {} are down: more than the {} the class {} survives",
                    group.shards.len(),
                    span.dkey,
                    self.class.parity_shards(),
                    self.class
                )));
            }
            let mut push = |shard: &ShardPlacement, req: Request| {
                if shard.writable() {
                    // A rebuilding shard whose base target still holds its data is written
                    // there too, so reads from the base stay current until the rebuild is done.
                    if shard.base_source.is_some() {
                        ops.push(ShardOp { shard: shard.for_reads(), req: req.clone() });
                    }
                    ops.push(ShardOp { shard: *shard, req });
                } else {
                    skipped = true;
                }
            };
            let pieces = mapping.pieces.get(span.first_piece..span.first_piece + span.piece_count).unwrap_or_default();
            let piece_data = |p: &Piece| -> Bytes {
                match data {
                    Some(d) => d.slice(p.buf_offset as usize..(p.buf_offset + u64::from(p.len)) as usize),
                    None => Bytes::from(vec![0u8; p.len as usize]),
                }
            };
            if !self.class.is_ec() {
                for p in pieces {
                    for s in &group.shards {
                        push(s, array_update(cont, oid, epoch, &dkey, AKEY_DELTA, p.chunk_offset, piece_data(p)));
                    }
                }
                continue;
            }
            let stripe_off = span.stripe * cell;
            match (span.full, data) {
                (true, Some(_)) => {
                    let cells: Vec<Bytes> = pieces.iter().map(piece_data).collect();
                    let codec = self.codec.as_ref().ok_or_else(|| VolumeError::Config("EC volume without a codec".into()))?;
                    let parity = codec.encode(&cells).map_err(|e| VolumeError::Config(e.to_string()))?;
                    for (c, bytes) in cells.into_iter().enumerate() {
                        push(&group.shards[c], array_update(cont, oid, epoch, &dkey, AKEY_BASE, stripe_off, bytes));
                    }
                    for (j, q) in parity.into_iter().enumerate() {
                        push(&group.shards[k + j], array_update(cont, oid, epoch, &dkey, AKEY_PARITY, stripe_off, Bytes::from(q)));
                    }
                }
                (true, None) => {
                    let stripe_chunk_off = span.stripe * cell * k as u64;
                    for s in &group.shards[..k] {
                        push(s, range_punch(cont, oid, epoch, &dkey, AKEY_BASE, stripe_off, cell));
                        push(s, range_punch(cont, oid, epoch, &dkey, AKEY_DELTA, stripe_off, cell));
                    }
                    for s in &group.shards[k..] {
                        push(s, range_punch(cont, oid, epoch, &dkey, AKEY_PARITY, stripe_off, cell));
                        push(s, range_punch(cont, oid, epoch, &dkey, AKEY_COPY, stripe_chunk_off, cell * k as u64));
                    }
                }
                (false, _) => {
                    for p in pieces {
                        let bytes = piece_data(p);
                        push(
                            &group.shards[p.cell as usize],
                            array_update(cont, oid, epoch, &dkey, AKEY_DELTA, p.shard_offset, bytes.clone()),
                        );
                        for s in &group.shards[k..] {
                            push(s, array_update(cont, oid, epoch, &dkey, AKEY_COPY, p.chunk_offset, bytes.clone()));
                        }
                    }
                }
            }
        }
        Ok((ops, skipped))
    }

    /// Sends the updates and punches of one write (`data`) or write-zeroes (`None`) at a new
    /// epoch to the shards numbered in `shards` only, once, as a client that died after those
    /// shards took theirs would have; returns the epoch.
    pub(super) async fn mutate_torn(&self, mapping: &Mapping, data: Option<&Bytes>, shards: &[u32]) -> Result<Epoch, VolumeError> {
        let view = self.pool.current();
        let epoch = hlc::now();
        let (ops, _) = self.plan(&view, mapping, data, epoch)?;
        let ops: Vec<ShardOp> = ops.into_iter().filter(|op| shards.contains(&op.shard.shard)).collect();
        for r in join_all(ops.iter().map(|op| self.call(&view, &op.shard, op.req.clone()))).await {
            r.map_err(|e| VolumeError::Unavailable(e.to_string()))?;
        }
        Ok(epoch)
    }

    /// Runs a write or write-zeroes to completion: every writable shard of the current map
    /// acknowledges, retrying (same epoch) while shards are unreachable but not yet DOWN.
    pub(super) async fn mutate(&self, mapping: &Mapping, data: Option<&Bytes>, mut epoch: Epoch) -> Result<(), VolumeError> {
        let start = Instant::now();
        let mut pending: Option<Vec<ShardOp>> = None;
        let mut planned_version = 0;
        let mut epoch_retries = 0u32;
        loop {
            let view = self.pool.current();
            // A new map may move or drop shards: plan again; otherwise retry only what failed.
            let ops = match pending.take() {
                Some(ops) if planned_version == view.map.version() => ops,
                _ => {
                    if planned_version != 0 || epoch <= view.map_epoch {
                        // Every op goes out (again) under this map: at an epoch after the map's
                        // (merged into the clock when the map was loaded).
                        epoch = hlc::now();
                    }
                    let (ops, skipped) = self.plan(&view, mapping, data, epoch)?;
                    if skipped {
                        self.counters.degraded_writes.fetch_add(1, Ordering::Relaxed);
                    }
                    planned_version = view.map.version();
                    ops
                }
            };
            let results = join_all(ops.iter().map(|op| self.call(&view, &op.shard, op.req.clone()))).await;
            let mut failed = Vec::new();
            let mut last_error = String::new();
            let mut need_refresh = false;
            let mut too_old = false;
            for (op, r) in ops.into_iter().zip(results) {
                match r {
                    Ok(_) => {}
                    Err(e) => {
                        need_refresh |= matches!(e, ShardError::Stale | ShardError::Unreachable(_));
                        too_old |= matches!(e, ShardError::EpochTooOld(_));
                        if let ShardError::Failed(m) = &e {
                            // The engine refused (no space, failed target, invalid): retrying
                            // will not help.
                            return Err(VolumeError::Unavailable(m.clone()));
                        }
                        last_error = e.to_string();
                        failed.push(op);
                    }
                }
            }
            if failed.is_empty() {
                return Ok(());
            }
            if start.elapsed() > WRITE_DEADLINE {
                return Err(VolumeError::Unavailable(format!(
                    "write not acknowledged by every shard after {WRITE_DEADLINE:?}: {last_error}"
                )));
            }
            debug!(volume = %self.info.name, failed = failed.len(), error = %last_error, "write retry");
            if too_old {
                // Some engine's commit window passed since the epoch was taken (a slow or
                // retried request): every op goes out again at a new epoch, since the shards of
                // a stripe must share one. Refused again, the clocks may be apart: pause first.
                epoch_retries += 1;
                self.counters.epoch_retries.fetch_add(1, Ordering::Relaxed);
                if epoch_retries > 1 {
                    tokio::time::sleep(RETRY_PAUSE).await;
                }
                continue;
            }
            if need_refresh {
                self.cluster.refresh(&self.pool).await;
            }
            if self.pool.current().map.version() == planned_version {
                tokio::time::sleep(RETRY_PAUSE).await;
                self.cluster.refresh(&self.pool).await;
            }
            pending = Some(failed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ec::Codec;
    use crate::placement::{PoolMap, TargetState};
    use crate::volume::tests::volume;

    /// (akey, offset, length, is a punch) of every planned op, sorted.
    fn summary(ops: &[ShardOp]) -> Vec<(Vec<u8>, u64, u64, bool)> {
        let mut v: Vec<_> = ops
            .iter()
            .map(|op| match &op.req {
                Request::Update(u) => match &u.value {
                    UpdateValue::Array { offset, data, .. } => (u.akey.to_vec(), *offset, data.len() as u64, false),
                    UpdateValue::Single { .. } => panic!("single value planned"),
                },
                Request::Punch(Punch { what: PunchTarget::Range { akey, offset, len, .. }, .. }) => (akey.to_vec(), *offset, *len, true),
                other => panic!("unexpected {other:?}"),
            })
            .collect();
        v.sort();
        v
    }

    #[test]
    fn ec_plans_full_stripes_as_base_and_parity_and_partial_ones_as_delta_and_copies() {
        let v = volume("EC_2P1", PoolMap::uniform(3, 2).unwrap());
        let view = v.pool.current();
        // Bytes 32 KiB .. 72 KiB: stripe 1 whole (32..64 KiB), stripe 2 partly (64..72 KiB).
        let data = Bytes::from(vec![7u8; 40 * 1024]);
        let (ops, skipped) = v.plan(&view, &v.layout.map(32 * 1024, 40 * 1024).unwrap(), Some(&data), 5).unwrap();
        assert!(!skipped);
        let b = |s: &str| s.as_bytes().to_vec();
        assert_eq!(
            summary(&ops),
            vec![
                (b("B"), 16384, 16384, false), // stripe 1, cell 0
                (b("B"), 16384, 16384, false), // stripe 1, cell 1
                (b("C"), 65536, 8192, false),  // copy of the fragment at its chunk offset
                (b("D"), 32768, 8192, false),  // stripe 2, cell 0, shard offset 2 × 16 KiB
                (b("P"), 16384, 16384, false), // stripe 1 parity
            ]
        );
        // Every shard of a group is on its own engine; the parity of a full stripe is the
        // code's parity of the two cells.
        let group = v.group(&view, &key_from_u64(0)).unwrap();
        let ranks: std::collections::BTreeSet<_> = group.shards.iter().map(|s| s.rank).collect();
        assert_eq!(ranks.len(), 3);
        let parity = ops.iter().find_map(|op| match &op.req {
            Request::Update(u) if &u.akey[..] == b"P" => Some(u.value.data().clone()),
            _ => None,
        });
        let expect = Codec::new(2, 1).unwrap().encode(&[vec![7u8; 16384], vec![7u8; 16384]]).unwrap();
        assert_eq!(parity.unwrap().to_vec(), expect[0]);
    }

    #[test]
    fn write_zeroes_punches_whole_stripes_in_every_akey_and_writes_zeros_elsewhere() {
        let v = volume("EC_2P1", PoolMap::uniform(3, 1).unwrap());
        let view = v.pool.current();
        let (ops, _) = v.plan(&view, &v.layout.map(28 * 1024, 36 * 1024).unwrap(), None, 5).unwrap();
        let b = |s: &str| s.as_bytes().to_vec();
        assert_eq!(
            summary(&ops),
            vec![
                (b("B"), 16384, 16384, true),
                (b("B"), 16384, 16384, true),
                (b("C"), 28672, 4096, false), // the partial piece of stripe 0, as zeros
                (b("C"), 32768, 32768, true),
                (b("D"), 12288, 4096, false),
                (b("D"), 16384, 16384, true),
                (b("D"), 16384, 16384, true),
                (b("P"), 16384, 16384, true),
            ]
        );
        assert!(ops.iter().all(|op| match &op.req {
            Request::Update(u) => u.value.data().iter().all(|&x| x == 0),
            _ => true,
        }));
    }

    #[test]
    fn plans_skip_down_shards_and_refuse_more_than_p() {
        let map = PoolMap::uniform(3, 1).unwrap().set_engine_state(1, TargetState::Down).unwrap();
        let v = volume("EC_2P1", map);
        let view = v.pool.current();
        let data = Bytes::from(vec![1u8; 4096]);
        let (ops, skipped) = v.plan(&view, &v.layout.map(0, 4096).unwrap(), Some(&data), 5).unwrap();
        assert!(ops.iter().all(|op| op.shard.rank != 1));
        let group = v.group(&view, &key_from_u64(0)).unwrap();
        assert_eq!(skipped, group.shards.iter().any(|s| s.rank == 1 && (s.shard == 0 || s.shard == 2)));
        let map =
            PoolMap::uniform(3, 1).unwrap().set_engine_state(1, TargetState::Down).unwrap().set_engine_state(2, TargetState::Down).unwrap();
        let v = volume("EC_2P1", map);
        let view = v.pool.current();
        let e = v.plan(&view, &v.layout.map(0, 4096).unwrap(), Some(&data), 5).unwrap_err();
        assert!(matches!(e, VolumeError::Unavailable(_)), "{e}");
        // Three replicas survive two losses.
        let map =
            PoolMap::uniform(3, 1).unwrap().set_engine_state(1, TargetState::Down).unwrap().set_engine_state(2, TargetState::Down).unwrap();
        let v = volume("RP_3", map);
        let view = v.pool.current();
        let (ops, skipped) = v.plan(&view, &v.layout.map(0, 4096).unwrap(), Some(&data), 5).unwrap();
        assert_eq!((ops.len(), skipped), (1, true));
    }
}
