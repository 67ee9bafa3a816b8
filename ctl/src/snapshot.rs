//! `tessera snapshot create|list|delete`: a volume's snapshots (retained epochs) through the
//! management API.

use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use tessera_client::volume::Cluster;
use tessera_mgmt_api::{MgmtClient, SnapshotInfo, VolumeInfo};

use crate::mgmt::{block_on, error_text, json, size_text, Table};

/// `tessera snapshot ...`
#[derive(Args, Debug)]
pub struct SnapshotArgs {
    /// Print the service's answer as JSON.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: SnapshotCommand,
}

#[derive(Subcommand, Debug)]
enum SnapshotCommand {
    /// Take a snapshot of a volume: its content now, kept readable while hosts write on.
    Create {
        /// The volume: POOL/VOLUME, or VOLUME in pool "default".
        volume: String,
        /// Snapshot name ([A-Za-z0-9._-], at most 64), unique in the volume.
        name: String,
    },
    /// List a volume's snapshots.
    List {
        /// The volume: POOL/VOLUME, or VOLUME in pool "default".
        volume: String,
    },
    /// Delete a snapshot; what only it held is freed by the engines' aggregation.
    Delete {
        /// The volume: POOL/VOLUME, or VOLUME in pool "default".
        volume: String,
        /// Snapshot name.
        name: String,
    },
}

/// `POOL/VOLUME` or `VOLUME` (pool "default") as (pool, volume).
pub fn pool_volume(s: &str) -> Result<(String, String), String> {
    match s.split_once('/') {
        Some((p, v)) if !p.is_empty() && !v.is_empty() && !v.contains('/') => Ok((p.to_string(), v.to_string())),
        Some(_) => Err(format!("{s:?} is not POOL/VOLUME")),
        None if s.is_empty() => Err("the volume name is empty".to_string()),
        None => Ok(("default".to_string(), s.to_string())),
    }
}

/// `POOL/VOLUME@SNAPSHOT` or `VOLUME@SNAPSHOT` (pool "default") as (pool, volume, snapshot).
pub fn pool_volume_snapshot(s: &str) -> Result<(String, String, String), String> {
    let (vol, snap) = s.split_once('@').ok_or_else(|| format!("{s:?} is not POOL/VOLUME@SNAPSHOT"))?;
    let (pool, vol) = pool_volume(vol)?;
    Ok((pool, vol, snap.to_string()))
}

/// `tessera snapshot ...`
pub fn run(addr: &str, a: SnapshotArgs) -> Result<String, String> {
    match a.command {
        SnapshotCommand::Create { volume, name } => {
            let (pool, vol) = pool_volume(&volume)?;
            let s = block_on(addr, async |c| c.create_snapshot(&pool, &vol, &name).await)?;
            if a.json {
                return json(&s);
            }
            let state = if s.stable { "final" } else { "not final yet: the pool's stable epoch has not passed it" };
            Ok(format!("created snapshot {pool}/{vol}@{} at epoch {} ({state})\n", s.name, s.epoch))
        }
        SnapshotCommand::List { volume } => {
            let (pool, vol) = pool_volume(&volume)?;
            let list = block_on(addr, async |c| c.snapshots(&pool, &vol).await)?;
            if a.json {
                return json(&list);
            }
            Ok(snapshot_table(&list))
        }
        SnapshotCommand::Delete { volume, name } => {
            let (pool, vol) = pool_volume(&volume)?;
            let s = block_on(addr, async |c| c.delete_snapshot(&pool, &vol, &name).await)?;
            if a.json {
                return json(&s);
            }
            Ok(format!("deleted snapshot {pool}/{vol}@{} (epoch {})\n", s.name, s.epoch))
        }
    }
}

/// `tessera volume flatten`: marks the flatten started (the service then refuses to export the
/// clone), copies the parent's bytes into every range the clone never wrote, one chunk at a
/// time with a progress bar (on a terminal, when `progress`), and cuts the tie. Running it again
/// after an interruption continues (a copied range has no holes left).
pub fn flatten(addr: &str, pool: &str, name: &str, progress: bool) -> Result<(VolumeInfo, u64), String> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the runtime: {e}"))?;
    let mgmt = MgmtClient::new(addr);
    let err = |e| error_text(&e, addr);
    rt.block_on(async {
        let info = mgmt.flatten(pool, name, false).await.map_err(err)?;
        let vol = Cluster::new(mgmt.clone()).open_volume(&info).await.map_err(|e| format!("opening {pool}/{name}: {e}"))?;
        let step = vol.layout().chunk_size();
        let bar = if progress { ProgressBar::new(info.size) } else { ProgressBar::hidden() };
        bar.set_style(
            ProgressStyle::with_template("{msg} [{bar:40}] {bytes}/{total_bytes} ({eta})")
                .map_err(|e| e.to_string())?
                .progress_chars("=> "),
        );
        bar.set_message(format!("flattening {pool}/{name}"));
        let mut copied = 0;
        let mut at = 0;
        while at < info.size {
            let n = step.min(info.size - at);
            copied += vol.copy_parent(at, n).await.map_err(|e| format!("copying {pool}/{name} at byte {at}: {e}"))?;
            at += n;
            bar.set_position(at);
        }
        bar.finish_and_clear();
        Ok((mgmt.flatten(pool, name, true).await.map_err(err)?, copied))
    })
}

/// Bytes by the engines' accounting, or "-" where none has reported yet.
pub fn reported_size(bytes: Option<u64>) -> String {
    bytes.map_or_else(|| "-".to_string(), size_text)
}

fn snapshot_table(list: &[SnapshotInfo]) -> String {
    let mut t = Table::new(&["NAME", "EPOCH", "CREATED", "SIZE", "HELD", "STATE"]);
    for s in list {
        t.row(vec![
            s.name.clone(),
            s.epoch.to_string(),
            s.created.to_string(),
            size_text(s.size),
            reported_size(s.held_bytes),
            if s.stable { "final" } else { "settling" }.to_string(),
        ]);
    }
    t.render_or("no snapshots\n")
        + if list.is_empty() {
            ""
        } else {
            "HELD: bytes only the snapshot still reads (what deleting it frees), by the engines' accounting\n"
        }
}

/// The space each volume of a pool and each of its snapshots take on the engines (`pool query`).
pub fn usage_table(vols: &[VolumeInfo]) -> String {
    let mut t = Table::new(&["VOLUME", "SIZE", "ALLOCATED", "SNAPSHOT HELD"]);
    for v in vols {
        t.row(vec![v.name.clone(), size_text(v.size), reported_size(v.allocated_bytes), String::new()]);
        for s in &v.snapshots {
            t.row(vec![format!("{}@{}", v.name, s.name), size_text(s.size), String::new(), reported_size(s.held_bytes)]);
        }
    }
    t.render_or("no volumes\n")
        + if vols.is_empty() {
            ""
        } else {
            "ALLOCATED: bytes the volume takes on the engines (with redundancy, its snapshots and what waits for aggregation); SNAPSHOT HELD: bytes only that snapshot reads\n"
        }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn volume_arguments_name_the_pool_or_default() {
        assert_eq!(pool_volume("p/v").unwrap(), ("p".to_string(), "v".to_string()));
        assert_eq!(pool_volume("v").unwrap(), ("default".to_string(), "v".to_string()));
        assert!(pool_volume("p/").is_err());
        assert!(pool_volume("/v").is_err());
        assert!(pool_volume("a/b/c").is_err());
        assert!(pool_volume("").is_err());
        let full = |p: &str, v: &str, s: &str| (p.to_string(), v.to_string(), s.to_string());
        assert_eq!(pool_volume_snapshot("p/v@s").unwrap(), full("p", "v", "s"));
        assert_eq!(pool_volume_snapshot("v@s").unwrap(), full("default", "v", "s"));
        assert!(pool_volume_snapshot("p/v").is_err());
    }
}
