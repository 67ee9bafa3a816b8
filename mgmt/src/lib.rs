//! `tessera-mgmt`: the management service. It owns the cluster's metadata — the system map
//! (engines), pools and their versioned pool maps, volumes and exports — and serves it over the
//! HTTP/JSON API of `tessera-mgmt-api` (`docs/MGMT-API.md`).
//!
//! Layers, outermost first:
//!
//! - [`http`]: axum routes, JSON parsing and error bodies.
//! - [`service`]: one write lock, commits, the published snapshot, heartbeat clocks and the
//!   monitor that marks silent engines Down.
//! - [`machine`]: the pure state machine — every command and query, all validation.
//! - [`store`]: the narrow versioned [`store::Store`] trait, on redb or in memory.
//! - [`state`]: the data and its key/value encoding.
//! - [`punch`]: removing a deleted volume's data from the engines.
#![forbid(unsafe_code)]

pub mod followers;
pub mod http;
pub mod leader;
pub mod machine;
pub mod punch;
pub mod service;
pub mod state;
pub mod store;
pub mod store_etcd;

use std::time::Duration;

/// Parses a duration such as `500ms`, `5s`, `2m` or `1h` (a bare number is seconds).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().map_err(|_| format!("invalid duration {s:?} (expected e.g. 500ms, 5s, 2m)"))?;
    let d = match unit.trim() {
        "ms" => Duration::from_millis(n),
        "" | "s" => Duration::from_secs(n),
        "m" | "min" => Duration::from_secs(n.saturating_mul(60)),
        "h" => Duration::from_secs(n.saturating_mul(3600)),
        _ => return Err(format!("invalid duration {s:?}: unit must be ms, s, m or h")),
    };
    if d.is_zero() {
        return Err(format!("invalid duration {s:?}: must be positive"));
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("7"), Ok(Duration::from_secs(7)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        for bad in ["", "ms", "5x", "-1s", "0s", "1.5s", "s5"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }
}
