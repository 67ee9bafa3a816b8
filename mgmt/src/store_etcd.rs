//! The management state in etcd: [`EtcdStore`] implements [`Store`] so that several
//! `tessera-mgmt` processes on several machines share one replicated state.
//!
//! Layout under the root prefix (default `/tessera`): `{root}/version` holds the store version
//! (decimal), `{root}/state/<key>` each record of [`State::to_kv`]. A commit is one etcd `Txn`:
//! if `{root}/version` still holds the expected version (or, for version 0, does not exist),
//! put the changed records, delete the removed ones and put the new version; otherwise read the
//! version that is there and fail with [`StoreError::Conflict`]. A load is one range read of
//! `{root}/`, so the version and the records come from one etcd revision.
//!
//! etcd answers a commit once a quorum of members has it in its log on disk, so a committed
//! change survives the loss of a minority of members. etcd refuses a transaction of more than
//! its `--max-txn-ops` operations (128 by default; `tessera up --etcd` starts members with
//! [`MAX_TXN_OPS`]); such a commit fails with a message that says so.
//!
//! The [`Store`] trait is synchronous (the service calls it from blocking threads); the etcd
//! client is async, so each call runs on this store's own small runtime, on a thread of its own
//! (never inside the caller's runtime).

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Mutex;
use std::time::Duration;

use etcd_client::{Client, Compare, CompareOp, ConnectOptions, GetOptions, Txn, TxnOp, TxnOpResponse};
use tessera_mgmt_api::ClusterVersion;

use crate::state::State;
use crate::store::{diff, Store, StoreError};

/// Operations per transaction the members `tessera up --etcd` starts allow.
pub const MAX_TXN_OPS: usize = tessera_mgmt_api::ETCD_MAX_TXN_OPS;
/// The root prefix when none is given.
pub const DEFAULT_ROOT: &str = "/tessera";
/// How long one etcd request may take.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a failing request is retried (an etcd leader election takes about a second).
pub const RETRY_FOR: Duration = Duration::from_secs(10);

/// Parses `etcd:http://HOST:PORT[,http://HOST:PORT…]` (the `--store` value) into endpoints.
pub fn parse_endpoints(spec: &str) -> Result<Vec<String>, String> {
    let list = spec.strip_prefix("etcd:").ok_or_else(|| format!("{spec:?}: an etcd store is etcd:http://HOST:PORT[,…]"))?;
    let eps: Vec<String> = list.split(',').map(str::trim).filter(|e| !e.is_empty()).map(str::to_string).collect();
    if eps.is_empty() {
        return Err(format!("{spec:?} names no etcd endpoint"));
    }
    for e in &eps {
        let rest = e.strip_prefix("http://").ok_or_else(|| format!("etcd endpoint {e:?} must start with http://"))?;
        if rest.trim_end_matches('/').rsplit_once(':').is_none_or(|(h, p)| h.is_empty() || p.parse::<u16>().is_err()) {
            return Err(format!("etcd endpoint {e:?} is not http://HOST:PORT"));
        }
    }
    Ok(eps)
}

/// Records by key.
type Records = BTreeMap<String, Vec<u8>>;

/// The state in etcd.
pub struct EtcdStore {
    endpoints: Vec<String>,
    root: String,
    client: Client,
    rt: tokio::runtime::Runtime,
    /// The records as of the last load or commit, and their version: a commit diffs against
    /// them when they are still current (the transaction checks that they are).
    cache: Mutex<Option<(ClusterVersion, Records)>>,
}

impl std::fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdStore").field("endpoints", &self.endpoints).field("root", &self.root).finish()
    }
}

impl EtcdStore {
    /// Connects to the etcd cluster at `endpoints` and checks that it answers.
    pub fn connect(endpoints: &[String], root: &str) -> Result<EtcdStore, StoreError> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("etcd-store")
            .enable_all()
            .build()
            .map_err(|e| etcd_error(endpoints, e))?;
        let opts = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(3))
            .with_timeout(REQUEST_TIMEOUT)
            .with_keep_alive(Duration::from_secs(2), Duration::from_secs(2));
        let eps = endpoints.to_vec();
        let client = on_thread(&rt, async move { Client::connect(eps, Some(opts)).await }).map_err(|e| etcd_error(endpoints, e))?;
        let store =
            EtcdStore { endpoints: endpoints.to_vec(), root: root.trim_end_matches('/').to_string(), client, rt, cache: Mutex::new(None) };
        store.load()?;
        Ok(store)
    }

    /// A client of the same cluster (cheap to clone), for the election and watches.
    pub fn client(&self) -> Client {
        self.client.clone()
    }

    /// The key that holds the version (every commit changes it: watch it to follow commits).
    pub fn version_key(&self) -> String {
        format!("{}/version", self.root)
    }

    /// The endpoints, as given.
    pub fn endpoints(&self) -> &[String] {
        &self.endpoints
    }

    fn state_prefix(&self) -> String {
        format!("{}/state/", self.root)
    }

    fn err(&self, e: impl std::fmt::Display) -> StoreError {
        etcd_error(&self.endpoints, e)
    }

    fn run<F: Future + Send>(&self, f: F) -> F::Output
    where
        F::Output: Send,
    {
        on_thread(&self.rt, f)
    }

    /// Runs `attempt` until it succeeds or [`RETRY_FOR`] has passed (etcd answers "leader
    /// changed" or "unavailable" while its members elect a leader).
    fn retrying<T>(&self, mut attempt: impl FnMut() -> Result<T, etcd_client::Error>) -> Result<T, StoreError> {
        let start = std::time::Instant::now();
        let mut pause = Duration::from_millis(50);
        loop {
            match attempt() {
                Ok(v) => return Ok(v),
                Err(e) if start.elapsed() + pause < RETRY_FOR => {
                    tracing::debug!("etcd request failed, retrying: {e}");
                    std::thread::sleep(pause);
                    pause = (pause * 2).min(Duration::from_secs(1));
                }
                Err(e) => return Err(self.err(e)),
            }
        }
    }

    /// (version, records) at one revision.
    fn read_all(&self) -> Result<(ClusterVersion, Records), StoreError> {
        let prefix = format!("{}/", self.root);
        let resp = self.retrying(|| {
            let (mut c, prefix) = (self.client.clone(), prefix.clone());
            self.run(async move { c.get(prefix, Some(GetOptions::new().with_prefix())).await })
        })?;
        let (vkey, sprefix) = (self.version_key(), self.state_prefix());
        let mut version = 0;
        let mut kv = BTreeMap::new();
        for item in resp.kvs() {
            let key = item.key_str().map_err(|e| self.err(e))?;
            if key == vkey {
                version = parse_version(item.value()).ok_or_else(|| self.err(format!("{vkey} holds {:?}, not a version", item.value())))?;
            } else if let Some(k) = key.strip_prefix(&sprefix) {
                kv.insert(k.to_string(), item.value().to_vec());
            }
        }
        Ok((version, kv))
    }

    fn current_version(&self) -> Result<ClusterVersion, StoreError> {
        let key = self.version_key();
        let resp = self.retrying(|| {
            let (mut c, key) = (self.client.clone(), key.clone());
            self.run(async move { c.get(key, None).await })
        })?;
        Ok(resp.kvs().first().and_then(|kv| parse_version(kv.value())).unwrap_or(0))
    }
}

fn parse_version(v: &[u8]) -> Option<ClusterVersion> {
    std::str::from_utf8(v).ok()?.parse().ok()
}

fn etcd_error(endpoints: &[String], e: impl std::fmt::Display) -> StoreError {
    StoreError::Etcd { endpoints: endpoints.join(","), detail: e.to_string() }
}

/// Runs `f` to completion on `rt` from a thread of its own: callable from any context,
/// including a thread that is inside another runtime.
fn on_thread<F: Future + Send>(rt: &tokio::runtime::Runtime, f: F) -> F::Output
where
    F::Output: Send,
{
    std::thread::scope(|s| match s.spawn(|| rt.block_on(f)).join() {
        Ok(v) => v,
        Err(p) => std::panic::resume_unwind(p),
    })
}

impl Store for EtcdStore {
    fn load(&self) -> Result<(ClusterVersion, State), StoreError> {
        let (version, kv) = self.read_all()?;
        let state = State::from_kv(kv.iter().map(|(k, v)| (k.as_str(), v.as_slice())))?;
        *self.cache.lock().unwrap_or_else(|e| e.into_inner()) = Some((version, kv));
        Ok((version, state))
    }

    fn commit(&self, expected: ClusterVersion, next: &State) -> Result<ClusterVersion, StoreError> {
        let cached = self.cache.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let old = match cached {
            Some((v, kv)) if v == expected => kv,
            _ => {
                let (v, kv) = self.read_all()?;
                if v != expected {
                    return Err(StoreError::Conflict { expected, current: v });
                }
                kv
            }
        };
        let new = next.to_kv();
        let (puts, deletes) = diff(&old, &new);
        let ops = puts.len() + deletes.len() + 1;
        if ops > MAX_TXN_OPS {
            return Err(self.err(format!("one change of {ops} records is more than one etcd transaction takes ({MAX_TXN_OPS})")));
        }
        let vkey = self.version_key();
        let when = if expected == 0 {
            Compare::version(vkey.clone(), CompareOp::Equal, 0)
        } else {
            Compare::value(vkey.clone(), CompareOp::Equal, expected.to_string())
        };
        let prefix = self.state_prefix();
        let mut then: Vec<TxnOp> = puts.iter().map(|(k, v)| TxnOp::put(format!("{prefix}{k}"), v.to_vec(), None)).collect();
        then.extend(deletes.iter().map(|k| TxnOp::delete(format!("{prefix}{k}"), None)));
        let version = expected + 1;
        then.push(TxnOp::put(vkey.clone(), version.to_string(), None));
        let txn = Txn::new().when([when]).and_then(then).or_else([TxnOp::get(vkey, None)]);
        let start = std::time::Instant::now();
        let resp = loop {
            let (mut c, t) = (self.client.clone(), txn.clone());
            match self.run(async move { c.txn(t).await }) {
                Ok(r) => break r,
                Err(e) => {
                    // The outcome is unknown: look at what is stored. Our version with our
                    // records is our commit; the expected version still there means it did
                    // not land (try again); anything else is someone else's.
                    *self.cache.lock().unwrap_or_else(|e| e.into_inner()) = None;
                    tracing::debug!("etcd transaction failed, looking at what landed: {e}");
                    if start.elapsed() >= RETRY_FOR {
                        return Err(self.err(e));
                    }
                    std::thread::sleep(Duration::from_millis(100));
                    let (v, kv) = self.read_all()?;
                    if v == version && kv == new {
                        *self.cache.lock().unwrap_or_else(|e| e.into_inner()) = Some((version, new));
                        return Ok(version);
                    }
                    if v != expected {
                        return Err(StoreError::Conflict { expected, current: v });
                    }
                }
            }
        };
        if !resp.succeeded() {
            let current = resp
                .op_responses()
                .iter()
                .find_map(|r| match r {
                    TxnOpResponse::Get(g) => Some(g.kvs().first().and_then(|kv| parse_version(kv.value())).unwrap_or(0)),
                    _ => None,
                })
                .map_or_else(|| self.current_version(), Ok)?;
            *self.cache.lock().unwrap_or_else(|e| e.into_inner()) = None;
            return Err(StoreError::Conflict { expected, current });
        }
        *self.cache.lock().unwrap_or_else(|e| e.into_inner()) = Some((version, new));
        Ok(version)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::tests::sample;
    use crate::store::tests::exercise;
    use tessera_testkit::etcd::EtcdCluster;

    #[test]
    fn endpoints_parse_or_say_why_not() {
        assert_eq!(parse_endpoints("etcd:http://127.0.0.1:2379, http://h:1/").unwrap(), ["http://127.0.0.1:2379", "http://h:1/"]);
        for bad in ["http://127.0.0.1:2379", "etcd:", "etcd:127.0.0.1:2379", "etcd:http://h", "etcd:http://:1"] {
            assert!(parse_endpoints(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn transactions_on_a_real_etcd_cluster_and_a_second_writer() {
        let dir = tempfile::tempdir().unwrap();
        let mut etcd = EtcdCluster::start(dir.path(), 3);
        let eps: Vec<String> = etcd.endpoints().split(',').map(str::to_string).collect();
        let a = EtcdStore::connect(&eps, "/t1").unwrap();
        exercise(&a);
        // A second service on the same root sees the same state, and the two writers are
        // serialised by the version: the one that read an older version is refused.
        let b = EtcdStore::connect(&eps[1..], "/t1").unwrap();
        let (v, s) = b.load().unwrap();
        assert_eq!((v, &s), (2, &a.load().unwrap().1));
        let mut s3 = s.clone();
        s3.next_pool_id = 77;
        assert_eq!(b.commit(2, &s3).unwrap(), 3);
        assert!(matches!(a.commit(2, &sample()), Err(StoreError::Conflict { expected: 2, current: 3 })));
        assert_eq!(a.load().unwrap(), (3, s3.clone()));
        // Another root is another state.
        assert_eq!(EtcdStore::connect(&eps, "/t2").unwrap().load().unwrap().0, 0);
        // One member of three down: commits go on.
        etcd.kill(0);
        let c = EtcdStore::connect(&eps[1..], "/t1").unwrap();
        let mut s4 = s3.clone();
        s4.next_pool_id = 78;
        assert_eq!(c.commit(3, &s4).unwrap(), 4);
        etcd.restart(0);
        let d = EtcdStore::connect(&eps[..1], "/t1").unwrap();
        assert_eq!(d.load().unwrap(), (4, s4));
        // Unreachable: a clear error naming the endpoint.
        drop(etcd);
        let e = EtcdStore::connect(&["http://127.0.0.1:1".to_string()], "/t1").unwrap_err();
        assert!(e.to_string().contains("etcd at http://127.0.0.1:1"), "{e}");
    }
}
