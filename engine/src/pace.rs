//! How fast a rebuild may go: pure, fed by the healer (no I/O, no clock of its own).
//!
//! A rebuild shares the engine's disks and CPUs with host I/O. [`RebuildPace`] runs it at
//! `[heal] rebuild_rate` while the hosts are quiet and at the lower `rebuild_rate_busy` while
//! they are not, so host I/O keeps most of the machine during a rebuild and an idle system still
//! rebuilds fast (the idea of Ceph's recovery sleep and mClock reservations, and of DAOS's rebuild
//! throttling).
//!
//! **Host I/O** is what the engine's RPC server counts in [`crate::server::Engine::host_ops`]:
//! every Update, Fetch and Punch that is not marked background (requests of the healers and
//! scrubbers of every engine carry `flags::BACKGROUND`, so one engine's rebuild does not slow
//! another's). The healer hands the count to [`RebuildPace::observe`] before each decision;
//! host I/O counts as active from a count that moved until [`HOST_HOLD`] after the last
//! observation that saw it move.
//!
//! **The rate** is a leaky bucket without burst: work of `b` bytes done at rate `r` makes the
//! next piece wait until `b / r` after the later of this piece's start and the previous
//! deadline. Time spent rebuilding counts towards the wait, time spent idle is not saved up, so
//! the rebuild never runs faster than the rate in force, even right after a quiet spell.

use std::time::{Duration, Instant};

/// Host I/O counts as active for this long after the last observation that saw it.
pub const HOST_HOLD: Duration = Duration::from_secs(1);

/// The rebuild rate of one engine's healer, by host activity.
#[derive(Debug, Clone)]
pub struct RebuildPace {
    idle_rate: u64,
    busy_rate: u64,
    hold: Duration,
    /// The host request count at the last observation.
    last_ops: Option<u64>,
    /// Host I/O is active until then.
    busy_until: Option<Instant>,
    /// The next piece of work may not start before this.
    next: Option<Instant>,
}

impl RebuildPace {
    /// `idle_rate` bytes per second while the hosts are quiet, `busy_rate` (at most
    /// `idle_rate`) while they do I/O here. A rate of 0 is taken as 1.
    pub fn new(idle_rate: u64, busy_rate: u64) -> RebuildPace {
        let idle_rate = idle_rate.max(1);
        RebuildPace { idle_rate, busy_rate: busy_rate.clamp(1, idle_rate), hold: HOST_HOLD, last_ops: None, busy_until: None, next: None }
    }

    /// The same pace with host I/O held active for `hold` after it was last seen.
    pub fn with_hold(mut self, hold: Duration) -> RebuildPace {
        self.hold = hold;
        self
    }

    /// Notes the engine's cumulative count of host requests, `host_ops`, at `now`. The first
    /// observation only sets the baseline.
    pub fn observe(&mut self, now: Instant, host_ops: u64) {
        if self.last_ops.is_some_and(|last| host_ops != last) {
            self.busy_until = Some(now + self.hold);
        }
        self.last_ops = Some(host_ops);
    }

    /// Whether host I/O is active at `now`.
    pub fn busy(&self, now: Instant) -> bool {
        self.busy_until.is_some_and(|t| now < t)
    }

    /// The rate in force at `now`, bytes per second.
    pub fn rate(&self, now: Instant) -> u64 {
        if self.busy(now) {
            self.busy_rate
        } else {
            self.idle_rate
        }
    }

    /// Records `bytes` of work that started at `started` and ended at `now`, charged at the
    /// rate in force at `now`, and returns how long to wait before the next piece.
    pub fn done(&mut self, started: Instant, now: Instant, bytes: u64) -> Duration {
        let cost = Duration::from_secs_f64(bytes as f64 / self.rate(now) as f64);
        let from = self.next.map_or(started, |n| n.max(started));
        let next = from + cost;
        self.next = Some(next);
        next.saturating_duration_since(now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn quiet_hosts_get_the_idle_rate_and_busy_ones_the_busy_rate() {
        let t0 = Instant::now();
        let mut p = RebuildPace::new(64 * MIB, 8 * MIB);
        // The first observation is a baseline, whatever the count.
        p.observe(t0, 1000);
        assert!(!p.busy(t0));
        assert_eq!(p.rate(t0), 64 * MIB);
        // No host request since: still quiet.
        p.observe(t0 + ms(100), 1000);
        assert_eq!(p.rate(t0 + ms(100)), 64 * MIB);
        // One request: busy for the hold, then quiet again.
        p.observe(t0 + ms(200), 1001);
        assert!(p.busy(t0 + ms(200)));
        assert_eq!(p.rate(t0 + ms(1199)), 8 * MIB);
        assert_eq!(p.rate(t0 + ms(1200)), 64 * MIB);
        // An observation that sees no change does not end the hold early...
        p.observe(t0 + ms(1100), 1001);
        assert!(p.busy(t0 + ms(1150)));
        // ... and one that sees a change extends it.
        p.observe(t0 + ms(1150), 1500);
        assert!(p.busy(t0 + ms(2100)));
        assert!(!p.busy(t0 + ms(2150)));
    }

    #[test]
    fn the_busy_rate_never_exceeds_the_idle_rate_and_zero_is_one() {
        let t0 = Instant::now();
        let mut p = RebuildPace::new(4 * MIB, 8 * MIB);
        p.observe(t0, 0);
        p.observe(t0, 1);
        assert_eq!((p.rate(t0), p.rate(t0 + ms(2000))), (4 * MIB, 4 * MIB));
        let z = RebuildPace::new(0, 0);
        assert_eq!(z.rate(t0), 1);
    }

    #[test]
    fn work_is_charged_at_the_rate_in_force_without_saving_up_idle_time() {
        let t0 = Instant::now();
        let mut p = RebuildPace::new(64 * MIB, 8 * MIB);
        p.observe(t0, 0);
        // 512 KiB at 64 MiB/s is 7.8125 ms; the piece took 5 ms, so 2.8125 ms are left.
        assert_eq!(p.done(t0, t0 + ms(5), 512 << 10), Duration::from_micros(2812) + Duration::from_nanos(500));
        // A piece slower than its budget leaves nothing to wait.
        let s = t0 + Duration::from_micros(7812) + Duration::from_nanos(500);
        assert_eq!(p.done(s, s + ms(20), 512 << 10), Duration::ZERO);
        // Hosts start: the next piece is charged at 8 MiB/s (62.5 ms for 512 KiB), counted from
        // its own start since the previous deadline has passed.
        let s = s + ms(20);
        p.observe(s + ms(10), 5);
        assert_eq!(p.done(s, s + ms(10), 512 << 10), ms(52) + Duration::from_micros(500));
        // After a long quiet pause no credit is saved up: the next piece still waits its cost.
        let later = s + ms(10_000);
        p.observe(later, 5);
        assert_eq!(p.done(later, later, 64 << 20), ms(1000));
    }

    #[test]
    fn over_many_pieces_the_average_rate_is_the_rate_in_force() {
        let t0 = Instant::now();
        for (busy, rate) in [(false, 64 * MIB), (true, 8 * MIB)] {
            let mut p = RebuildPace::new(64 * MIB, 8 * MIB);
            let mut now = t0;
            let mut ops = 0;
            p.observe(now, ops);
            let mut bytes = 0u64;
            for _ in 0..100 {
                let started = now;
                now += ms(3); // the piece itself
                if busy {
                    ops += 16;
                }
                p.observe(now, ops);
                now += p.done(started, now, 512 << 10);
                bytes += 512 << 10;
            }
            let achieved = bytes as f64 / (now - t0).as_secs_f64();
            assert!((achieved / rate as f64 - 1.0).abs() < 0.01, "busy {busy}: {achieved} B/s against {rate}");
        }
    }
}
