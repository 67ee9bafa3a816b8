//! Self-healing in the API: rebuild progress that engines report, the pool's rebuild and scrub
//! status that `GET /v1/pools/{pool}` shows, and the operator's target commands (exclude,
//! drain, reintegrate). `docs/MGMT-API.md` documents the endpoints; `docs/PLACEMENT.md`
//! says what a rebuild does.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// What one engine is doing for one pool map version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum EngineRebuildState {
    /// Counting what it has to do.
    #[default]
    Scanning,
    /// Rebuilding.
    Running,
    /// Finished every dkey it leads for this map version.
    Done,
    /// Gave up on this pass (it retries after a pause); `last_error` says why.
    Failed,
}

/// Rebuild progress of one engine for one pool map version (`POST
/// /v1/pools/{pool}/engines/{rank}/report`). Counters cover this engine's share only.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct RebuildProgress {
    /// The pool map version this pass rebuilds towards.
    pub map_version: u32,
    /// State of the pass.
    pub state: EngineRebuildState,
    /// Objects (volumes) to scan, and scanned.
    pub objects_total: u64,
    /// Objects scanned so far.
    pub objects_done: u64,
    /// Dkeys this engine leads that need a shard rebuilt (known once scanning is over).
    pub dkeys_total: u64,
    /// Of those, done.
    pub dkeys_done: u64,
    /// Estimated bytes to write for `dkeys_total` (shard size per dkey).
    pub bytes_total: u64,
    /// Bytes written to rebuilt shards so far.
    pub bytes_done: u64,
    /// Attempts of this pass so far (1 for the first).
    pub attempt: u32,
    /// Last error of this pass, if any.
    #[serde(default)]
    pub last_error: Option<String>,
}

/// Scrub counters of one engine for one pool, cumulative since the engine started.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct ScrubCounters {
    /// Extents whose stored checksums were verified.
    pub scrubbed: u64,
    /// Bytes verified.
    pub bytes: u64,
    /// Extents that failed their checksum and were rewritten from redundancy.
    pub repaired: u64,
    /// Extents that failed their checksum and could not be repaired.
    pub unrepairable: u64,
    /// Completed passes over all data.
    pub passes: u64,
    /// EC aggregation: stripes folded back into full base cells and parity.
    #[serde(default)]
    pub ec_stripes: u64,
    /// EC aggregation: bytes of partial-stripe fragments and their copies punched (freed by the
    /// engines' version aggregation once no snapshot needs them).
    #[serde(default)]
    pub ec_fragment_bytes: u64,
    /// EC aggregation: stripes with fragments waiting (too new for the stable epoch, or their
    /// group not settled) after the engine's last pass.
    #[serde(default)]
    pub ec_waiting: u64,
    /// EC aggregation: bytes of the copies in the stripes waiting (one copy per fragment).
    #[serde(default)]
    pub ec_waiting_bytes: u64,
    /// EC aggregation: the pace it is held to, stripe bytes per second (`[heal]
    /// ec_aggregation_rate`; summed over the engines).
    #[serde(default)]
    pub ec_rate: u64,
    /// Torn full-stripe writes (a client gone after some shards took theirs) completed at their
    /// epoch: enough shards held the write to decode it.
    #[serde(default)]
    pub torn_completed: u64,
    /// Torn full-stripe writes undone: the stripe written again as it was before them.
    #[serde(default)]
    pub torn_undone: u64,
}

impl ScrubCounters {
    /// Field-wise sum.
    pub fn add(&mut self, o: &ScrubCounters) {
        self.scrubbed += o.scrubbed;
        self.bytes += o.bytes;
        self.repaired += o.repaired;
        self.unrepairable += o.unrepairable;
        self.passes += o.passes;
        self.ec_stripes += o.ec_stripes;
        self.ec_fragment_bytes += o.ec_fragment_bytes;
        self.ec_waiting += o.ec_waiting;
        self.ec_waiting_bytes += o.ec_waiting_bytes;
        self.ec_rate += o.ec_rate;
        self.torn_completed += o.torn_completed;
        self.torn_undone += o.torn_undone;
    }
}

/// `POST /v1/pools/{pool}/engines/{rank}/report` body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EngineReport {
    /// The engine's identity (must match the rank's registration).
    pub uuid: Uuid,
    /// Its rebuild pass for the pool.
    pub rebuild: RebuildProgress,
    /// Its scrub counters for the pool.
    #[serde(default)]
    pub scrub: ScrubCounters,
}

/// State of a pool's rebuild as `pool query` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum RebuildState {
    /// Nothing to rebuild: every target is UPIN or DOWNOUT.
    #[default]
    Idle,
    /// Some target is DOWN (rebuilding its shards elsewhere) or UP (being reintegrated).
    Running,
    /// The current pass failed on some engine; it is being retried.
    Failed,
}

/// A pool's rebuild, summed over its engines (`GET /v1/pools/{pool}`, field `rebuild`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct RebuildStatus {
    /// Idle, running or failed.
    pub state: RebuildState,
    /// The pool map version being rebuilt towards (0 when idle and nothing was ever rebuilt).
    pub map_version: u32,
    /// Targets DOWN (being rebuilt elsewhere) at that version.
    pub targets_down: u32,
    /// Targets UP (being reintegrated) at that version.
    pub targets_up: u32,
    /// Engines that must finish (Up engines with an UPIN target in the pool).
    pub engines_total: u32,
    /// Of those, finished.
    pub engines_done: u32,
    /// Objects scanned, summed over engines.
    pub objects_done: u64,
    /// Objects to scan.
    pub objects_total: u64,
    /// Dkeys rebuilt.
    pub dkeys_done: u64,
    /// Dkeys to rebuild (grows while engines are still scanning).
    pub dkeys_total: u64,
    /// Bytes written.
    pub bytes_done: u64,
    /// Bytes to write (estimate).
    pub bytes_total: u64,
    /// Write rate since the pass started, bytes per second.
    pub rate_bytes_per_sec: u64,
    /// Estimated seconds left (`None` while unknown).
    #[serde(default)]
    pub eta_seconds: Option<u64>,
    /// Seconds since the pass started.
    pub elapsed_seconds: u64,
    /// Last error any engine reported for this pass.
    #[serde(default)]
    pub last_error: Option<String>,
    /// Rebuilds completed since the service started.
    pub completed: u32,
}

/// `POST /v1/pools/{pool}/exclude|drain|reintegrate` body: one engine's targets, or one of them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TargetSelector {
    /// Engine rank.
    pub rank: u32,
    /// One target index; `None`: every target of the engine in the pool.
    #[serde(default)]
    pub target: Option<u16>,
}

/// `POST /v1/pools/{pool}/extend` body: registered engines whose targets join the pool.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExtendPool {
    /// Their ranks (each Up, not yet in the pool).
    pub ranks: Vec<u32>,
}
