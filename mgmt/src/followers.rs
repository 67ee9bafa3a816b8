//! Which targets follow the export list, and how far: the fence that makes a reservation change
//! hold on every path of a subsystem before the command that made it completes.
//!
//! A target long-polls `GET /v1/exports` naming itself (`target=` its listen addresses) and the
//! newest list it has applied (`taken=`). [`Followers`] keeps, per target, the version it has
//! taken, whether a poll of it is waiting now, and when it last asked. [`Followers::fence`]
//! waits until every target serving one of a subsystem's paths has taken version `v` — except
//! targets that are not following (no poll waiting and none for [`LIVE_WINDOW`]): a target that
//! stopped or lost the service; when it comes back it takes the current list before it serves
//! anything. The wait is bounded by [`FENCE_WAIT`].

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tessera_mgmt_api::{serves, ClusterVersion};
use tokio::sync::Notify;

/// A target that asked within this long, or has a poll waiting, is following.
pub const LIVE_WINDOW: Duration = Duration::from_secs(5);
/// Longest a reservation command waits for the other paths to take its change.
pub const FENCE_WAIT: Duration = Duration::from_secs(3);

#[derive(Debug, Clone)]
struct Seen {
    listen: Vec<SocketAddr>,
    taken: ClusterVersion,
    waiting: u32,
    last: Instant,
}

/// The targets following the export list.
#[derive(Debug, Default)]
pub struct Followers {
    seen: Mutex<HashMap<String, Seen>>,
    changed: Notify,
}

/// A poll in progress; dropping it marks the poll answered.
#[derive(Debug)]
pub struct Poll {
    followers: Arc<Followers>,
    id: String,
}

impl Drop for Poll {
    fn drop(&mut self) {
        let mut seen = self.followers.lock();
        if let Some(s) = seen.get_mut(&self.id) {
            s.waiting = s.waiting.saturating_sub(1);
            s.last = Instant::now();
        }
    }
}

impl Followers {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Seen>> {
        self.seen.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Target `target` (its listen addresses, comma-separated) polls, having taken `taken`.
    pub fn poll(self: &Arc<Self>, target: &str, taken: ClusterVersion) -> Poll {
        let mut seen = self.lock();
        let s = seen.entry(target.to_string()).or_insert_with(|| Seen {
            listen: target.split(',').filter_map(|a| a.trim().parse::<SocketAddr>().ok()).collect(),
            taken,
            waiting: 0,
            last: Instant::now(),
        });
        s.taken = s.taken.max(taken);
        s.waiting += 1;
        s.last = Instant::now();
        drop(seen);
        self.changed.notify_waiters();
        Poll { followers: self.clone(), id: target.to_string() }
    }

    /// Following targets serving one of `paths` that have not taken `v` yet.
    pub fn behind(&self, paths: &[String], v: ClusterVersion) -> Vec<String> {
        let now = Instant::now();
        self.lock()
            .iter()
            .filter(|(_, s)| s.taken < v && (s.waiting > 0 || now.duration_since(s.last) < LIVE_WINDOW))
            .filter(|(_, s)| paths.iter().any(|p| serves(&s.listen, p)))
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// Waits until every following target serving one of `paths` has taken `v`, or `wait`
    /// passed; returns those still behind.
    pub async fn fence(&self, paths: &[String], v: ClusterVersion, wait: Duration) -> Vec<String> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let changed = self.changed.notified();
            let behind = self.behind(paths, v);
            if behind.is_empty() {
                return behind;
            }
            // Also look again now and then: a target can stop following without asking again.
            let step = (deadline - tokio::time::Instant::now().min(deadline)).min(Duration::from_millis(500));
            if step.is_zero() {
                return behind;
            }
            let _ = tokio::time::timeout(step, changed).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const P1: &str = "127.0.0.1:4420";
    const P2: &str = "127.0.0.1:4421";

    #[tokio::test]
    async fn a_change_waits_for_the_following_paths_only() {
        let f = Arc::new(Followers::default());
        let paths = vec![P1.to_string(), P2.to_string()];
        let a = f.poll(P1, 5);
        let b = f.poll("0.0.0.0:4421", 5);
        let other = f.poll("127.0.0.1:4500", 1);
        assert_eq!(f.behind(&paths, 5), Vec::<String>::new());
        let mut behind = f.behind(&paths, 6);
        behind.sort();
        assert_eq!(behind, vec!["0.0.0.0:4421".to_string(), P1.to_string()]);
        // Each takes version 6 by asking again; the fence returns once both did.
        let f2 = f.clone();
        let waiter = tokio::spawn(async move { f2.fence(&[P1.to_string(), P2.to_string()], 6, Duration::from_secs(10)).await });
        drop(a);
        let _a = f.poll(P1, 6);
        drop(b);
        let _b = f.poll("0.0.0.0:4421", 6);
        assert_eq!(waiter.await.unwrap(), Vec::<String>::new());
        drop(other);
    }

    #[tokio::test]
    async fn a_target_that_does_not_answer_is_waited_for_only_so_long() {
        let f = Arc::new(Followers::default());
        let _stuck = f.poll(P2, 1);
        let t = tokio::time::Instant::now();
        assert_eq!(f.fence(&[P2.to_string()], 2, Duration::from_millis(300)).await, vec![P2.to_string()]);
        assert!(t.elapsed() >= Duration::from_millis(300));
    }
}
