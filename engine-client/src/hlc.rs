//! A hybrid logical clock (HLC) that hands out [`Epoch`]s.
//!
//! # Epoch format
//!
//! An epoch is a `u64`:
//!
//! ```text
//!  63                                        16 15              0
//! +--------------------------------------------+-----------------+
//! | physical: nanoseconds since the Unix epoch | logical counter |
//! |           with the low 16 bits cleared     |   (16 bits)     |
//! +--------------------------------------------+-----------------+
//! ```
//!
//! Read as a plain number, an epoch is (approximately) nanoseconds since 1970-01-01 UTC, so
//! [`physical_nanos`] and [`epoch_from_nanos`] convert without a table and a human can read one
//! as a time. The physical part has a granularity of 2^16 ns = 65.536 µs; the 16-bit logical
//! counter orders up to 65,536 epochs inside one such tick. `u64` nanoseconds last until
//! the year 2554.
//!
//! # The rules
//!
//! A clock keeps the largest epoch it has issued or seen (`last`).
//!
//! - [`Hlc::now`]: `e = max(wall, last + 1)` where `wall` is the wall clock with the low 16 bits
//!   cleared; `last = e`; return `e`. So epochs from one clock are strictly increasing even when
//!   many threads ask at once (a single atomic compare-and-swap) or the wall clock steps back; when
//!   more than 65,536 epochs are asked for inside one tick the counter carries into the physical
//!   part and the clock runs slightly ahead of the wall until the wall catches up.
//! - [`Hlc::update`]`(r)`: `last = max(last, r)`. Every reply that completes a write carries the
//!   write's epoch; the client merges it, so any write that *starts* after that completion gets a
//!   larger epoch — even when the two writes come from different processes, provided the
//!   completion (or anything causally after it) reached the second process and was merged there.
//!   Without such a message the order of two processes' epochs is the order of their wall
//!   clocks, which is as good as the clocks are synchronised.
//!
//! The process-wide clock is [`global`]; [`now`] and [`update`] use it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tessera_engine_proto::Epoch;

/// Number of low bits of an epoch that hold the logical counter.
pub const LOGICAL_BITS: u32 = 16;

/// Mask of the logical counter.
pub const LOGICAL_MASK: u64 = (1 << LOGICAL_BITS) - 1;

/// The physical part of `e`, in nanoseconds since the Unix epoch (the low 16 bits cleared).
pub fn physical_nanos(e: Epoch) -> u64 {
    e & !LOGICAL_MASK
}

/// The logical counter of `e`.
pub fn logical(e: Epoch) -> u16 {
    (e & LOGICAL_MASK) as u16
}

/// The epoch for `nanos` since the Unix epoch with logical counter 0.
pub fn epoch_from_nanos(nanos: u64) -> Epoch {
    nanos & !LOGICAL_MASK
}

/// The wall-clock time of `e`'s physical part.
pub fn epoch_to_system_time(e: Epoch) -> SystemTime {
    UNIX_EPOCH + Duration::from_nanos(physical_nanos(e))
}

/// The system wall clock in nanoseconds since the Unix epoch (0 before 1970, saturating in 2554).
pub fn wall_clock_nanos() -> u64 {
    match SystemTime::now().duration_since(UNIX_EPOCH) {
        Ok(d) => u64::try_from(d.as_nanos()).unwrap_or(u64::MAX),
        Err(_) => 0,
    }
}

/// A hybrid logical clock. Thread-safe; every operation is one atomic read-modify-write.
#[derive(Debug)]
pub struct Hlc {
    last: AtomicU64,
    clock: fn() -> u64,
}

impl Default for Hlc {
    fn default() -> Self {
        Hlc::new()
    }
}

impl Hlc {
    /// A clock on the system wall clock that has issued nothing yet.
    pub const fn new() -> Self {
        Hlc::with_clock(wall_clock_nanos)
    }

    /// A clock whose physical time (nanoseconds since the Unix epoch) comes from `clock`; for
    /// tests that need to stop or step the wall clock.
    pub const fn with_clock(clock: fn() -> u64) -> Self {
        Hlc { last: AtomicU64::new(0), clock }
    }

    /// A new epoch, strictly larger than every epoch this clock has issued or merged before.
    ///
    /// # Panics
    ///
    /// Never in practice: only if the clock has reached `u64::MAX` (the year 2554).
    pub fn now(&self) -> Epoch {
        let wall = epoch_from_nanos((self.clock)());
        let mut last = self.last.load(Ordering::Acquire);
        loop {
            let next = wall.max(last.saturating_add(1));
            match self.last.compare_exchange_weak(last, next, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return next,
                Err(seen) => last = seen,
            }
        }
    }

    /// Merges an epoch received from elsewhere (a write's completion, another client's message):
    /// every later [`Hlc::now`] returns something larger than `received`. Returns the clock's
    /// value after the merge (the largest epoch issued or seen).
    pub fn update(&self, received: Epoch) -> Epoch {
        self.last.fetch_max(received, Ordering::AcqRel).max(received)
    }

    /// The largest epoch this clock has issued or merged (0 if none), without advancing it.
    pub fn last(&self) -> Epoch {
        self.last.load(Ordering::Acquire)
    }

    /// How far `received` is ahead of this clock's wall time, if it is: a receiver can refuse
    /// epochs from a peer whose clock is wildly ahead instead of merging them.
    pub fn ahead_of_wall(&self, received: Epoch) -> Option<Duration> {
        let wall = (self.clock)();
        let p = physical_nanos(received);
        (p > wall).then(|| Duration::from_nanos(p - wall))
    }
}

/// The process-wide clock.
pub fn global() -> &'static Hlc {
    static GLOBAL: Hlc = Hlc::new();
    &GLOBAL
}

/// [`Hlc::now`] on the process-wide clock.
pub fn now() -> Epoch {
    global().now()
}

/// [`Hlc::update`] on the process-wide clock.
pub fn update(received: Epoch) -> Epoch {
    global().update(received)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU64;
    use std::sync::Arc;

    static FROZEN: AtomicU64 = AtomicU64::new(1_800_000_000_000_000_000);

    fn frozen() -> u64 {
        FROZEN.load(Ordering::Relaxed)
    }

    #[test]
    fn format_round_trips() {
        let ns = 1_800_000_123_456_789_u64;
        let e = epoch_from_nanos(ns) | 42;
        assert_eq!(logical(e), 42);
        assert_eq!(physical_nanos(e), ns & !0xffff);
        assert!(ns - physical_nanos(e) < 65_536);
        assert_eq!(epoch_to_system_time(e), UNIX_EPOCH + Duration::from_nanos(ns & !0xffff));
    }

    #[test]
    fn strictly_increasing_with_a_frozen_wall_clock() {
        let c = Hlc::with_clock(frozen);
        let first = c.now();
        assert_eq!(first, epoch_from_nanos(frozen()));
        let mut prev = first;
        // More than one tick's worth of logical counter: it carries into the physical part.
        for _ in 0..100_000 {
            let e = c.now();
            assert_eq!(e, prev + 1);
            prev = e;
        }
        assert!(physical_nanos(prev) > physical_nanos(first));
    }

    #[test]
    fn monotonic_under_threads() {
        let c = Arc::new(Hlc::new());
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let c = Arc::clone(&c);
                std::thread::spawn(move || {
                    let mut v = Vec::with_capacity(50_000);
                    for _ in 0..50_000 {
                        v.push(c.now());
                    }
                    v
                })
            })
            .collect();
        let mut all = Vec::new();
        for t in threads {
            let v = t.join().unwrap();
            assert!(v.windows(2).all(|w| w[0] < w[1]), "each thread sees strictly increasing epochs");
            all.extend(v);
        }
        let n = all.len();
        all.sort_unstable();
        all.dedup();
        assert_eq!(all.len(), n, "no epoch is issued twice");
    }

    #[test]
    fn update_makes_later_epochs_larger() {
        let c = Hlc::new();
        let local = c.now();
        // A remote clock one hour ahead.
        let remote = local + 3_600 * 1_000_000_000;
        assert_eq!(c.update(remote), remote);
        let e = c.now();
        assert!(e > remote);
        assert_eq!(e, remote + 1, "the wall clock is behind, so the logical counter advances");
        // Merging an older epoch changes nothing.
        assert_eq!(c.update(local), e);
        assert!(c.now() > e);
        assert!(c.ahead_of_wall(remote).is_some_and(|d| d > Duration::from_secs(3_599)));
        assert_eq!(c.ahead_of_wall(local), None);
    }

    #[test]
    fn causality_across_two_clocks() {
        // Process B's wall clock is 10 s behind A's. A write completes on A at epoch `ea`; B
        // learns of it and merges; B's next write is ordered after it.
        static A_WALL: AtomicU64 = AtomicU64::new(1_800_000_010_000_000_000);
        static B_WALL: AtomicU64 = AtomicU64::new(1_800_000_000_000_000_000);
        let a = Hlc::with_clock(|| A_WALL.load(Ordering::Relaxed));
        let b = Hlc::with_clock(|| B_WALL.load(Ordering::Relaxed));
        let eb0 = b.now();
        let ea = a.now();
        assert!(ea > eb0);
        b.update(ea);
        let eb = b.now();
        assert!(eb > ea);
        // And back: A merges B's epoch.
        a.update(eb);
        assert!(a.now() > eb);
    }

    #[test]
    fn physical_part_tracks_wall_time() {
        let c = Hlc::new();
        let before = wall_clock_nanos();
        let e = c.now();
        let after = wall_clock_nanos();
        assert!(physical_nanos(e) <= after);
        assert!(physical_nanos(e) + 65_536 > before);
        std::thread::sleep(Duration::from_millis(20));
        let e2 = c.now();
        let gap = physical_nanos(e2) - physical_nanos(e);
        assert!(gap >= 19_000_000, "20 ms later the physical part moved by {gap} ns");
    }

    #[test]
    fn global_clock() {
        let a = now();
        let b = now();
        assert!(b > a);
        update(b + 1_000);
        assert!(now() > b + 1_000);
    }
}
