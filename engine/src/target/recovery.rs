//! Recovery's reading half: the newest valid checkpoint (falling back to the previous one if it
//! is corrupt), then the WAL from the record after it up to its clean end or a torn tail, with
//! the verdicts of docs/ENGINE-FORMATS.md ("Torn tail or corruption"). [`Target::open`] builds
//! the target from what these return.

#[allow(clippy::wildcard_imports)] // the parent module's types and imports, as if this were its body
use super::*;

pub(super) fn read_whole(storage: &dyn Storage, name: &str) -> Result<Bytes, EngineError> {
    let f = storage.open(name, false).map_err(|e| EngineError::io(name, e))?;
    let len = f.len().map_err(|e| EngineError::io(name, e))?;
    let mut buf = vec![0u8; len as usize];
    f.read_at(&mut buf, 0).map_err(|e| EngineError::io(name, e))?;
    Ok(Bytes::from(buf))
}

/// Loads the newest valid checkpoint, falling back to older ones. Returns the index and the WAL
/// sequence number it covers (0 when starting from nothing).
pub(super) fn load_checkpoint(storage: &dyn Storage, names: &[String]) -> Result<(Index, u64), EngineError> {
    let mut seqs: Vec<u64> = names.iter().filter_map(|n| parse_checkpoint_name(n)).collect();
    seqs.sort_unstable_by(|a, b| b.cmp(a));
    for &seq in &seqs {
        let name = checkpoint_name(seq);
        match checkpoint::decode(read_whole(storage, &name)?) {
            Ok((index, covered)) if covered == seq => return Ok((index, seq)),
            Ok((_, covered)) => warn!(file = %name, covered, "checkpoint covers a different sequence than its name; trying an older one"),
            Err(reason) => warn!(file = %name, %reason, "checkpoint is corrupt; trying an older one"),
        }
    }
    Ok((Index::new(), 0))
}

/// What [`replay_wal`] found after the checkpoint.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct Replayed {
    /// The last sequence number applied.
    pub(super) last: u64,
    /// Bytes of valid records in the segments it read.
    pub(super) bytes: u64,
    /// Segments it read that held records after the checkpoint.
    pub(super) segments: u64,
}

/// Replays WAL records after `from` into `index`.
pub(super) fn replay_wal(storage: &dyn Storage, names: &[String], index: &mut Index, from: u64) -> Result<Replayed, EngineError> {
    let mut starts: Vec<u64> = names.iter().filter_map(|n| parse_segment_name(n)).collect();
    starts.sort_unstable();
    let mut last = from;
    let (mut bytes, mut segments) = (0u64, 0u64);
    for (i, &start) in starts.iter().enumerate() {
        let next_start = starts.get(i + 1).copied();
        if next_start.is_some_and(|n| n <= from.saturating_add(1)) {
            continue; // every record of this segment is in the checkpoint
        }
        let name = segment_name(start);
        if start > last.saturating_add(1) {
            return Err(EngineError::Corrupt {
                file: name,
                reason: format!("WAL records {}..{} are missing (a checkpoint was lost and its WAL already removed)", last + 1, start - 1),
            });
        }
        let scan = scan_segment(read_whole(storage, &name)?, start);
        if !scan.records.is_empty() {
            // What was replayed may have come from the page cache of a process that died before
            // its fdatasync: make it durable before anything is appended after it.
            storage.open(&name, false).and_then(|f| f.sync()).map_err(|e| EngineError::io(&name, e))?;
        }
        if scan.records.iter().any(|(seq, _)| *seq > last) {
            bytes += scan.valid_end;
            segments += 1;
        }
        for (seq, ops) in scan.records {
            if seq > last {
                for op in &ops {
                    index.apply(op);
                }
                last = seq;
            }
        }
        if let Some(reason) = scan.stopped {
            let is_last = next_start.is_none();
            if scan.valid_after_stop || (!is_last && next_start != Some(last.saturating_add(1))) {
                return Err(EngineError::Corrupt {
                    file: name,
                    reason: format!("{reason}; later records exist, so this is not a torn write"),
                });
            }
            if is_last && !scan.clean_end {
                warn!(file = %name, %reason, "WAL ends in a torn record; it was never acknowledged and is discarded");
            }
        }
    }
    Ok(Replayed { last, bytes, segments })
}
