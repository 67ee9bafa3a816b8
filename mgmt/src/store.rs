//! Persistence of the [`State`]: the narrow [`Store`] trait (load; commit a whole next state
//! against an expected version) and its implementations, [`RedbStore`] (the redb embedded
//! database: durable when `commit` returns) and [`MemStore`] (tests).
//!
//! Transaction model: the store holds a version counter and the state as keys and values
//! ([`State::to_kv`]). `commit(expected, next)` is one atomic transaction: if the stored version
//! is not `expected` it changes nothing and fails with [`StoreError::Conflict`]; otherwise it
//! deletes the keys `next` no longer has, writes the keys whose value changed, and stores
//! `expected + 1`. On etcd that is one `Txn`: compare the version key's value (or its
//! mod-revision) with `expected`, then the puts and deletes and the new version.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use redb::{ReadableTable, TableDefinition};
use tessera_mgmt_api::ClusterVersion;

use crate::state::{DecodeError, State};

/// Why the store failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The stored version is not the one the commit expected: someone else committed first.
    #[error("store version is {current}, expected {expected}")]
    Conflict {
        /// Version the commit expected.
        expected: ClusterVersion,
        /// Version actually stored.
        current: ClusterVersion,
    },
    /// Another process has the database open.
    #[error("{path}: the database is in use by another process (another tessera-mgmt?)")]
    Locked {
        /// The database file.
        path: PathBuf,
    },
    /// The stored state does not decode.
    #[error("stored state is corrupt: {0}")]
    Corrupt(#[from] DecodeError),
    /// The etcd cluster failed or could not be reached.
    #[error("etcd at {endpoints}: {detail}")]
    Etcd {
        /// The endpoints, comma-separated.
        endpoints: String,
        /// What failed.
        detail: String,
    },
    /// The database failed.
    #[error("{path}: {detail}")]
    Backend {
        /// The database file (empty for the memory store).
        path: PathBuf,
        /// What failed.
        detail: String,
    },
}

/// Where the service's state lives. Implementations must make `commit` atomic (all of `next`
/// or nothing) and, for a durable store, durable before it returns.
pub trait Store: Send + Sync + std::fmt::Debug {
    /// The current version and state (version 0 and the empty state for a new store).
    fn load(&self) -> Result<(ClusterVersion, State), StoreError>;

    /// Replaces the stored state by `next` if the stored version is `expected`; returns the new
    /// version (`expected + 1`).
    fn commit(&self, expected: ClusterVersion, next: &State) -> Result<ClusterVersion, StoreError>;
}

/// The changes that turn `old` into `new`: keys to write and keys to delete.
pub(crate) fn diff<'a>(old: &'a BTreeMap<String, Vec<u8>>, new: &'a BTreeMap<String, Vec<u8>>) -> (Vec<(&'a str, &'a [u8])>, Vec<&'a str>) {
    let puts = new.iter().filter(|(k, v)| old.get(*k) != Some(*v)).map(|(k, v)| (k.as_str(), v.as_slice())).collect();
    let deletes = old.keys().filter(|k| !new.contains_key(*k)).map(String::as_str).collect();
    (puts, deletes)
}

// ---------------------------------------------------------------------------------------------
// In memory.

/// A store in memory, for tests. Keeps the encoded keys and values so that the encoding is
/// exercised too, and can be told to fail commits.
#[derive(Debug, Default)]
pub struct MemStore {
    inner: Mutex<MemInner>,
}

#[derive(Debug, Default)]
struct MemInner {
    version: ClusterVersion,
    kv: BTreeMap<String, Vec<u8>>,
    fail_commits: bool,
    commits: u64,
}

impl MemStore {
    /// An empty store.
    pub fn new() -> MemStore {
        MemStore::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, MemInner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Makes every later commit fail with a backend error (or succeed again).
    pub fn fail_commits(&self, fail: bool) {
        self.lock().fail_commits = fail;
    }

    /// Number of successful commits.
    pub fn commits(&self) -> u64 {
        self.lock().commits
    }
}

impl Store for MemStore {
    fn load(&self) -> Result<(ClusterVersion, State), StoreError> {
        let g = self.lock();
        let state = State::from_kv(g.kv.iter().map(|(k, v)| (k.as_str(), v.as_slice())))?;
        Ok((g.version, state))
    }

    fn commit(&self, expected: ClusterVersion, next: &State) -> Result<ClusterVersion, StoreError> {
        let mut g = self.lock();
        if g.version != expected {
            return Err(StoreError::Conflict { expected, current: g.version });
        }
        if g.fail_commits {
            return Err(StoreError::Backend { path: PathBuf::new(), detail: "injected commit failure".into() });
        }
        g.kv = next.to_kv();
        g.version += 1;
        g.commits += 1;
        Ok(g.version)
    }
}

// ---------------------------------------------------------------------------------------------
// redb.

const KV: TableDefinition<&str, &[u8]> = TableDefinition::new("kv");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const VERSION_KEY: &str = "version";
const SCHEMA_KEY: &str = "schema";
const SCHEMA: u64 = 1;

/// The state in a redb database file: table `kv` holds the state's keys and values, table
/// `meta` the version and the schema number. Every commit is one redb write transaction with
/// immediate durability (fsync before it returns). redb locks the file: a second process opening
/// it gets [`StoreError::Locked`].
#[derive(Debug)]
pub struct RedbStore {
    db: redb::Database,
    path: PathBuf,
}

impl RedbStore {
    /// Opens (creating if needed) the database at `path`.
    pub fn open(path: &Path) -> Result<RedbStore, StoreError> {
        let db = match redb::Database::create(path) {
            Ok(db) => db,
            Err(redb::DatabaseError::DatabaseAlreadyOpen) => return Err(StoreError::Locked { path: path.to_path_buf() }),
            Err(e) => return Err(StoreError::Backend { path: path.to_path_buf(), detail: e.to_string() }),
        };
        let store = RedbStore { db, path: path.to_path_buf() };
        store.init()?;
        Ok(store)
    }

    fn err(&self, e: impl Into<redb::Error>) -> StoreError {
        StoreError::Backend { path: self.path.clone(), detail: e.into().to_string() }
    }

    fn init(&self) -> Result<(), StoreError> {
        let txn = self.db.begin_write().map_err(|e| self.err(e))?;
        {
            txn.open_table(KV).map_err(|e| self.err(e))?;
            let mut meta = txn.open_table(META).map_err(|e| self.err(e))?;
            let schema = meta.get(SCHEMA_KEY).map_err(|e| self.err(e))?.map(|g| g.value());
            match schema {
                None => {
                    meta.insert(SCHEMA_KEY, SCHEMA).map_err(|e| self.err(e))?;
                    meta.insert(VERSION_KEY, 0).map_err(|e| self.err(e))?;
                }
                Some(SCHEMA) => {}
                Some(other) => {
                    return Err(StoreError::Backend {
                        path: self.path.clone(),
                        detail: format!("schema {other} is not the supported schema {SCHEMA}"),
                    })
                }
            }
        }
        txn.commit().map_err(|e| self.err(e))
    }

    fn read_kv(&self, table: &impl ReadableTable<&'static str, &'static [u8]>) -> Result<BTreeMap<String, Vec<u8>>, StoreError> {
        let mut kv = BTreeMap::new();
        for item in table.iter().map_err(|e| self.err(e))? {
            let (k, v) = item.map_err(|e| self.err(e))?;
            kv.insert(k.value().to_string(), v.value().to_vec());
        }
        Ok(kv)
    }
}

impl Store for RedbStore {
    fn load(&self) -> Result<(ClusterVersion, State), StoreError> {
        let txn = self.db.begin_read().map_err(|e| self.err(e))?;
        let meta = txn.open_table(META).map_err(|e| self.err(e))?;
        let version = meta.get(VERSION_KEY).map_err(|e| self.err(e))?.map_or(0, |g| g.value());
        let kv = self.read_kv(&txn.open_table(KV).map_err(|e| self.err(e))?)?;
        let state = State::from_kv(kv.iter().map(|(k, v)| (k.as_str(), v.as_slice())))?;
        Ok((version, state))
    }

    fn commit(&self, expected: ClusterVersion, next: &State) -> Result<ClusterVersion, StoreError> {
        let txn = self.db.begin_write().map_err(|e| self.err(e))?;
        let version = {
            let mut meta = txn.open_table(META).map_err(|e| self.err(e))?;
            let current = meta.get(VERSION_KEY).map_err(|e| self.err(e))?.map_or(0, |g| g.value());
            if current != expected {
                // Dropping the transaction aborts it.
                return Err(StoreError::Conflict { expected, current });
            }
            let mut table = txn.open_table(KV).map_err(|e| self.err(e))?;
            let old = self.read_kv(&table)?;
            let new = next.to_kv();
            let (puts, deletes) = diff(&old, &new);
            for k in deletes {
                table.remove(k).map_err(|e| self.err(e))?;
            }
            for (k, v) in puts {
                table.insert(k, v).map_err(|e| self.err(e))?;
            }
            let version = expected + 1;
            meta.insert(VERSION_KEY, version).map_err(|e| self.err(e))?;
            version
        };
        txn.commit().map_err(|e| self.err(e))?;
        Ok(version)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::state::tests::sample;

    pub(crate) fn exercise(store: &dyn Store) {
        let (v0, s0) = store.load().unwrap();
        assert_eq!((v0, &s0), (0, &State::default()));
        let s1 = sample();
        assert_eq!(store.commit(0, &s1).unwrap(), 1);
        assert_eq!(store.load().unwrap(), (1, s1.clone()));
        // A stale commit changes nothing.
        let mut stale = s1.clone();
        stale.next_pool_id = 99;
        assert!(matches!(store.commit(0, &stale), Err(StoreError::Conflict { expected: 0, current: 1 })));
        assert_eq!(store.load().unwrap(), (1, s1.clone()));
        // Deletions and updates both land.
        let mut s2 = s1.clone();
        s2.exports.clear();
        s2.vhost_exports.clear();
        s2.volumes.clear();
        s2.engines.get_mut(&0).unwrap().address = "127.0.0.1:1".into();
        assert_eq!(store.commit(1, &s2).unwrap(), 2);
        assert_eq!(store.load().unwrap(), (2, s2));
    }

    #[test]
    fn mem_store_transactions() {
        let m = MemStore::new();
        exercise(&m);
        assert_eq!(m.commits(), 2);
        m.fail_commits(true);
        assert!(matches!(m.commit(2, &State::default()), Err(StoreError::Backend { .. })));
        assert_eq!(m.load().unwrap().0, 2);
    }

    #[test]
    fn redb_store_transactions_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.redb");
        {
            let s = RedbStore::open(&path).unwrap();
            exercise(&s);
            // A second open of the same file while this one lives is refused.
            assert!(matches!(RedbStore::open(&path), Err(StoreError::Locked { .. })));
        }
        let s = RedbStore::open(&path).unwrap();
        let (v, st) = s.load().unwrap();
        assert_eq!(v, 2);
        assert!(st.volumes.is_empty());
        assert_eq!(st.engines[&0].address, "127.0.0.1:1");
        assert_eq!(st.pools.len(), 1);
    }

    #[test]
    fn redb_store_refuses_other_schema() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.redb");
        {
            let db = redb::Database::create(&path).unwrap();
            let txn = db.begin_write().unwrap();
            txn.open_table(META).unwrap().insert(SCHEMA_KEY, 7).unwrap();
            txn.commit().unwrap();
        }
        let e = RedbStore::open(&path).unwrap_err();
        assert!(e.to_string().contains("schema 7"), "{e}");
    }

    #[test]
    fn diff_puts_changed_and_deletes_missing() {
        let old: BTreeMap<String, Vec<u8>> =
            [("a", "1"), ("b", "2"), ("c", "3")].iter().map(|(k, v)| (k.to_string(), v.as_bytes().to_vec())).collect();
        let new: BTreeMap<String, Vec<u8>> =
            [("a", "1"), ("b", "9"), ("d", "4")].iter().map(|(k, v)| (k.to_string(), v.as_bytes().to_vec())).collect();
        let (puts, deletes) = diff(&old, &new);
        assert_eq!(puts, [("b", b"9".as_slice()), ("d", b"4".as_slice())]);
        assert_eq!(deletes, ["c"]);
    }
}
