//! A pool's health for `tessera pool query`: the rebuild (or reintegration) summed over the
//! engines, the scrub counters, the fault-domain warning, and `--watch`, which follows a
//! rebuild with a progress bar until the pool is idle.

use std::io::Write;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use tessera_client::hlc;
use tessera_mgmt_api::{MgmtClient, PoolInfo, RebuildState, RebuildStatus, TargetSelector};

use crate::mgmt::{error_text, size_text};

/// How often `--watch` asks the service.
pub const WATCH_PERIOD: Duration = Duration::from_millis(500);

/// The warning printed when some group has two shards on one engine.
pub const FAULT_DOMAIN_WARNING: &str = "fault-domain redundancy reduced: some groups have two shards on one engine";

/// `idle`, `running` or `failed`.
pub fn state_text(s: RebuildState) -> &'static str {
    match s {
        RebuildState::Idle => "idle",
        RebuildState::Running => "running",
        RebuildState::Failed => "failed",
    }
}

/// Seconds as `45s`, `3m07s`, `2h05m`.
pub fn duration_text(secs: u64) -> String {
    if secs < 60 {
        format!("{secs}s")
    } else if secs < 3600 {
        format!("{}m{:02}s", secs / 60, secs % 60)
    } else {
        format!("{}h{:02}m", secs / 3600, secs % 3600 / 60)
    }
}

/// Bytes per second, human-readable.
pub fn rate_text(bytes_per_sec: u64) -> String {
    format!("{}/s", size_text(bytes_per_sec))
}

fn of(done: u64, total: u64) -> String {
    format!("{done}/{total}")
}

/// The rebuild, scrub and fault-domain lines of `tessera pool query`.
pub fn health_text(p: &PoolInfo) -> String {
    let r = &p.rebuild;
    let mut out = String::new();
    if r.state == RebuildState::Idle {
        out.push_str("rebuild: idle\n");
        if r.completed > 0 {
            out.push_str(&format!(
                "  last        map version {}: {} in {} ({} rebuild(s) completed since the service started)\n",
                r.map_version,
                size_text(r.bytes_done),
                duration_text(r.elapsed_seconds),
                r.completed
            ));
        }
    } else {
        let what = if r.targets_down == 0 { "reintegration" } else { "rebuild" };
        out.push_str(&format!("rebuild: {} ({what} towards map version {})\n", state_text(r.state), r.map_version));
        let row = |name: &str, value: String| format!("  {name:<12}{value}\n");
        out.push_str(&row("targets", format!("{} down, {} up (being reintegrated)", r.targets_down, r.targets_up)));
        out.push_str(&row("engines", format!("{} done", of(u64::from(r.engines_done), u64::from(r.engines_total)))));
        out.push_str(&row("objects", of(r.objects_done, r.objects_total)));
        out.push_str(&row("dkeys", of(r.dkeys_done, r.dkeys_total)));
        out.push_str(&row("bytes", format!("{} / {}", size_text(r.bytes_done), size_text(r.bytes_total))));
        out.push_str(&row("rate", rate_text(r.rate_bytes_per_sec)));
        out.push_str(&row("ETA", r.eta_seconds.map_or_else(|| "unknown".to_string(), duration_text)));
        out.push_str(&row("elapsed", duration_text(r.elapsed_seconds)));
        if let Some(e) = &r.last_error {
            out.push_str(&row("last error", e.clone()));
        }
        if r.completed > 0 {
            out.push_str(&row("completed", format!("{} rebuild(s) since the service started", r.completed)));
        }
    }
    let s = &p.scrub;
    out.push_str(&format!(
        "scrub: {} extents scrubbed ({}), {} repaired, {} unrepairable, {} passes\n",
        s.scrubbed,
        size_text(s.bytes),
        s.repaired,
        s.unrepairable,
        s.passes
    ));
    out.push_str(&format!(
        "EC aggregation: {} stripes folded into full stripes, {} of fragments and copies punched, {} stripes waiting ({} of copies), paced at {}/s\n",
        s.ec_stripes,
        size_text(s.ec_fragment_bytes),
        s.ec_waiting,
        size_text(s.ec_waiting_bytes),
        size_text(s.ec_rate)
    ));
    if s.torn_completed + s.torn_undone > 0 {
        out.push_str(&format!("torn full-stripe writes: {} completed at their epoch, {} undone\n", s.torn_completed, s.torn_undone));
    }
    out.push_str(&stable_line(p.stable_epoch, hlc::physical_nanos(hlc::now())));
    if p.fault_domains_reduced {
        out.push_str(&format!("warning: {FAULT_DOMAIN_WARNING}\n"));
    }
    out
}

/// The stable epoch and how far it trails `now_nanos` (the clock's physical part).
fn stable_line(stable: Option<u64>, now_nanos: u64) -> String {
    match stable {
        Some(e) => {
            let behind = now_nanos.saturating_sub(hlc::physical_nanos(e));
            format!("stable epoch: {e} ({:.1} s behind now)\n", behind as f64 / 1e9)
        }
        None => "stable epoch: not reported yet by every engine holding the pool\n".to_string(),
    }
}

/// The one line `exclude`, `drain` and `reintegrate` print: which targets changed to what.
pub fn change_line(p: &PoolInfo, sel: &TargetSelector, verb: &str) -> String {
    let changed: Vec<String> = p
        .map
        .targets
        .iter()
        .filter(|t| t.rank == sel.rank && sel.target.is_none_or(|i| i == t.index) && t.fseq == p.map.version)
        .map(|t| format!("{}:{}", t.rank, t.index))
        .collect();
    let (state, what) = match verb {
        "reintegrate" => ("UP", "reintegration"),
        "drain" => ("DOWN (drained)", "rebuild"),
        _ => ("DOWN", "rebuild"),
    };
    let noun = if changed.len() == 1 { "target" } else { "targets" };
    format!(
        "pool {}: {noun} {} {state} at map version {}; {what} started — watch with: tessera pool query {} --watch\n",
        p.name,
        changed.join(","),
        p.map.version,
        p.name
    )
}

/// The one line `tessera pool extend` prints.
pub fn extend_line(p: &PoolInfo, ranks: &[u32]) -> String {
    let added = p.map.targets.iter().filter(|t| ranks.contains(&t.rank)).count();
    let engines = ranks.iter().map(u32::to_string).collect::<Vec<_>>().join(",");
    let noun = if ranks.len() == 1 { "engine" } else { "engines" };
    format!(
        "pool {}: {noun} {engines} added ({added} targets UP) at map version {}; data is moving onto them — watch with: tessera pool query {} --watch\n",
        p.name, p.map.version, p.name
    )
}

fn bar_message(r: &RebuildStatus) -> String {
    let eta = r.eta_seconds.map_or_else(|| "?".to_string(), duration_text);
    let mut m = format!(
        "{} ETA {eta} | {} v{}, dkeys {}/{}, engines {}/{}",
        rate_text(r.rate_bytes_per_sec),
        state_text(r.state),
        r.map_version,
        r.dkeys_done,
        r.dkeys_total,
        r.engines_done,
        r.engines_total
    );
    if let Some(e) = &r.last_error {
        m.push_str(&format!(", {e}"));
    }
    m
}

/// One line for a state change, when stdout is not a terminal.
fn change_text(name: &str, r: &RebuildStatus) -> String {
    format!(
        "pool {name}: rebuild {} at map version {}, engines {}/{} done, dkeys {}/{}, {} / {}{}",
        state_text(r.state),
        r.map_version,
        r.engines_done,
        r.engines_total,
        r.dkeys_done,
        r.dkeys_total,
        size_text(r.bytes_done),
        size_text(r.bytes_total),
        r.last_error.as_ref().map_or_else(String::new, |e| format!(" (last error: {e})"))
    )
}

/// The line `--watch` ends with.
fn final_line(p: &PoolInfo) -> String {
    let r = &p.rebuild;
    if r.completed > 0 {
        format!(
            "pool {}: rebuild idle at map version {} (last rebuild: map version {}, {} in {})\n",
            p.name,
            p.map.version,
            r.map_version,
            size_text(r.bytes_done),
            duration_text(r.elapsed_seconds)
        )
    } else {
        format!("pool {}: rebuild idle at map version {}\n", p.name, p.map.version)
    }
}

/// `tessera pool query NAME --watch`: redraws a progress bar every 500 ms until the pool's
/// rebuild is idle; without a terminal on stdout, one line per state change. Returns what is
/// left to print: the final line, or the pool as JSON.
pub fn watch(addr: &str, name: &str, json: bool) -> Result<String, String> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| format!("cannot start the runtime: {e}"))?;
    let client = MgmtClient::new(addr);
    let bar = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stdout());
    let style = ProgressStyle::with_template("{spinner} [{bar:24}] {bytes}/{total_bytes} {wide_msg}")
        .map_err(|e| e.to_string())?
        .progress_chars("=> ");
    bar.set_style(style);
    let quiet = bar.is_hidden() || json;
    let mut last: Option<(RebuildState, u32, u32)> = None;
    loop {
        let p = rt.block_on(client.pool(name)).map_err(|e| {
            bar.finish_and_clear();
            error_text(&e, addr)
        })?;
        let r = &p.rebuild;
        if r.state == RebuildState::Idle {
            bar.finish_and_clear();
            if json {
                return serde_json::to_string_pretty(&p).map(|s| s + "\n").map_err(|e| e.to_string());
            }
            return Ok(final_line(&p));
        }
        let key = (r.state, r.map_version, r.engines_done);
        if quiet {
            if !json && last != Some(key) {
                let mut out = std::io::stdout().lock();
                let _ = writeln!(out, "{}", change_text(name, r));
                let _ = out.flush();
            }
        } else {
            bar.set_length(r.bytes_total.max(r.bytes_done));
            bar.set_position(r.bytes_done);
            bar.set_message(bar_message(r));
            bar.tick();
        }
        last = Some(key);
        std::thread::sleep(WATCH_PERIOD);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tessera_mgmt_api::{PoolMapInfo, PoolTarget, ScrubCounters, TargetStateName};
    use uuid::Uuid;

    fn pool(rebuild: RebuildStatus, reduced: bool) -> PoolInfo {
        let t = |rank, index, state, fseq| PoolTarget { rank, index, state, fseq, since_epoch: 0, drained: false, added: 0 };
        PoolInfo {
            name: "p".into(),
            uuid: Uuid::nil(),
            pool_id: 1,
            default_class: "EC_2P1".into(),
            capacity: 1 << 30,
            allocated: 0,
            map: PoolMapInfo {
                pool_id: 1,
                version: 7,
                engines: vec![],
                targets: vec![
                    t(0, 0, TargetStateName::UpIn, 0),
                    t(1, 0, TargetStateName::Down, 7),
                    t(1, 1, TargetStateName::Down, 7),
                    t(1, 2, TargetStateName::Down, 3),
                ],
                base_version: 3,
                base_targets: vec![],
                group_targets: 0,
                map_epoch: 0,
            },
            volumes: 0,
            rebuild,
            scrub: ScrubCounters {
                scrubbed: 10,
                bytes: 40960,
                repaired: 1,
                unrepairable: 0,
                passes: 2,
                ec_stripes: 3,
                ec_fragment_bytes: 3 << 20,
                ec_waiting: 1,
                ec_waiting_bytes: 8192,
                ec_rate: 16 << 20,
                torn_completed: 0,
                torn_undone: 0,
            },
            fault_domains_reduced: reduced,
            stable_epoch: None,
        }
    }

    #[test]
    fn health_shows_the_rebuild_scrub_and_warning() {
        let r = RebuildStatus {
            state: RebuildState::Running,
            map_version: 7,
            targets_down: 3,
            engines_total: 2,
            engines_done: 1,
            dkeys_done: 5,
            dkeys_total: 10,
            bytes_done: 1 << 20,
            bytes_total: 4 << 20,
            rate_bytes_per_sec: 1 << 19,
            eta_seconds: Some(6),
            elapsed_seconds: 75,
            last_error: Some("rank 1: boom".into()),
            ..Default::default()
        };
        let text = health_text(&pool(r, true));
        assert!(text.starts_with("rebuild: running (rebuild towards map version 7)\n"), "{text}");
        for want in [
            "  engines     1/2 done\n",
            "  dkeys       5/10\n",
            "  bytes       1 MiB / 4 MiB\n",
            "  rate        512 KiB/s\n",
            "  ETA         6s\n",
            "  elapsed     1m15s\n",
            "  last error  rank 1: boom\n",
            "scrub: 10 extents scrubbed (40 KiB), 1 repaired, 0 unrepairable, 2 passes\n",
            "EC aggregation: 3 stripes folded into full stripes, 3 MiB of fragments and copies punched, 1 stripes waiting (8 KiB of copies), paced at 16 MiB/s\n",
            "warning: fault-domain redundancy reduced: some groups have two shards on one engine\n",
        ] {
            assert!(text.contains(want), "{want:?} not in:\n{text}");
        }
        let idle = health_text(&pool(RebuildStatus::default(), false));
        assert!(idle.starts_with("rebuild: idle\nscrub: "), "{idle}");
        assert!(!idle.contains("warning"));
        assert!(idle.contains("stable epoch: not reported yet"), "{idle}");
        let now = 1_000_000_000_000;
        assert_eq!(
            stable_line(Some(hlc::epoch_from_nanos(now - 2_500_000_000)), now),
            format!("stable epoch: {} (2.5 s behind now)\n", hlc::epoch_from_nanos(now - 2_500_000_000))
        );
    }

    #[test]
    fn change_lines_name_the_targets_changed_in_this_version() {
        let p = pool(RebuildStatus::default(), false);
        assert_eq!(
            change_line(&p, &TargetSelector { rank: 1, target: None }, "exclude"),
            "pool p: targets 1:0,1:1 DOWN at map version 7; rebuild started — watch with: tessera pool query p --watch\n"
        );
        assert!(change_line(&p, &TargetSelector { rank: 1, target: Some(0) }, "reintegrate").starts_with("pool p: target 1:0 UP at"));
    }

    #[test]
    fn durations_read_back() {
        assert_eq!(duration_text(0), "0s");
        assert_eq!(duration_text(61), "1m01s");
        assert_eq!(duration_text(7300), "2h01m");
    }
}
