//! `tessera snapshot create|list|delete`: a volume's snapshots (retained epochs) through the
//! management API.

use clap::{Args, Subcommand};
use tessera_mgmt_api::SnapshotInfo;

use crate::mgmt::{block_on, json, size_text, Table};

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

fn snapshot_table(list: &[SnapshotInfo]) -> String {
    let mut t = Table::new(&["NAME", "EPOCH", "CREATED", "SIZE", "STATE"]);
    for s in list {
        t.row(vec![
            s.name.clone(),
            s.epoch.to_string(),
            s.created.to_string(),
            size_text(s.size),
            if s.stable { "final" } else { "settling" }.to_string(),
        ]);
    }
    t.render_or("no snapshots\n")
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
    }
}
