//! [`MgmtClient`], the async HTTP client of the management service, and [`MgmtError`], how its
//! calls fail. The service may run as several instances (one leader, followers redirecting
//! changes to it with 307): a client holds the list of their addresses, sends each call to the
//! one that answered last, and moves on to the next when an address cannot be reached or
//! answers 503 (a follower that knows no leader yet).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::{
    ApiError, ClusterVersion, CreateClone, CreateExport, CreatePool, CreateSnapshot, CreateVhostExport, CreateVolume, EngineReport,
    ExportInfo, ExportList, ExtendPool, Flatten, Follower, Heartbeat, HeartbeatReply, PoolInfo, PoolMapInfo, RegisterEngine,
    ReservationCommand, ReservationReply, ResizeVolume, Rollback, ServiceRole, SetOptimized, SnapshotInfo, SystemInfo, TargetSelector,
    VhostExportInfo, VolumeInfo, SNAPSHOT_STABLE_WAIT,
};

/// Failures talking to the management service.
#[derive(Debug, thiserror::Error)]
pub enum MgmtError {
    /// The service could not be reached or the exchange failed.
    #[error("management service at {addr} unreachable: {detail}")]
    Unreachable {
        /// Service address; every address tried, comma-separated, when several were.
        addr: String,
        /// What failed (at each address, when several were tried).
        detail: String,
    },
    /// The service refused the request (4xx/5xx) with this message.
    #[error("{message}")]
    Refused {
        /// HTTP status.
        status: u16,
        /// The service's one-line message.
        message: String,
    },
    /// The reply did not parse.
    #[error("bad reply from the management service: {0}")]
    BadReply(String),
}

impl MgmtError {
    /// The HTTP status of a refusal.
    pub fn status(&self) -> Option<u16> {
        match self {
            MgmtError::Refused { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// An async client of the management service. Cheap to clone: clones share one connection pool
/// and learn from each other which address answers.
#[derive(Debug, Clone)]
pub struct MgmtClient {
    /// `host:port` of every instance; never empty.
    addrs: Arc<[String]>,
    /// Index into `addrs` of the address that answered last: where the next call goes first.
    current: Arc<AtomicUsize>,
    http: reqwest::Client,
}

impl MgmtClient {
    /// A client of the service at `addr`: a comma-separated list of its instances' addresses,
    /// each `host:port` or an `http://` URL; empty items are ignored. Requests time out after
    /// 10 s (long polls after their wait plus 10 s).
    pub fn new(addr: &str) -> MgmtClient {
        let mut addrs = parse_addrs(addr);
        if addrs.is_empty() {
            // Kept non-empty so that `addr()` has something to return; every call then fails as
            // `Unreachable`, as it did before lists.
            addrs.push(String::new());
        }
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(3))
            .pool_idle_timeout(Duration::from_secs(30))
            .build()
            .unwrap_or_else(|_| reqwest::Client::new());
        MgmtClient { addrs: addrs.into(), current: Arc::new(AtomicUsize::new(0)), http }
    }

    /// The address (`host:port`) calls go to first: the one that answered last.
    pub fn addr(&self) -> &str {
        self.addrs.get(self.current_index()).map_or("", String::as_str)
    }

    /// Every address of the service (`host:port`), in the order given.
    pub fn addrs(&self) -> &[String] {
        &self.addrs
    }

    fn current_index(&self) -> usize {
        self.current.load(Ordering::Relaxed) % self.addrs.len().max(1)
    }

    /// The URL of `path`. `send` sets its host and port for each address it tries, so a bad
    /// address in the list fails alone rather than failing the request before it is sent.
    fn url(&self, path: &str) -> String {
        format!("http://{URL_HOST}/v1{path}")
    }

    /// Sends the request to the current address, then to each other address once while the
    /// service cannot be reached there or answers 503.
    async fn send<T: for<'de> Deserialize<'de>>(&self, req: reqwest::RequestBuilder, timeout: Duration) -> Result<T, MgmtError> {
        let request =
            req.timeout(timeout).build().map_err(|e| MgmtError::Unreachable { addr: self.addrs.join(","), detail: one_line(&e) })?;
        let start = self.current_index();
        let n = self.addrs.len();
        let mut pending = Some(request);
        let mut failed: Vec<(&str, String)> = Vec::new();
        let mut refused = None;
        for k in 0..n {
            let index = (start + k) % n;
            let (Some(addr), Some(req)) = (self.addrs.get(index), pending.take()) else { break };
            // A request whose body cannot be copied is tried at this address only.
            let mut attempt = match req.try_clone() {
                Some(copy) if k + 1 < n => {
                    pending = Some(req);
                    copy
                }
                _ => req,
            };
            if let Err(detail) = retarget(attempt.url_mut(), addr) {
                failed.push((addr, detail));
                continue;
            }
            let resp = match self.http.execute(attempt).await {
                Ok(resp) => resp,
                // Nothing reached the service (or the connection broke before a reply): the
                // next instance may be up. A timeout after sending is a slow or waiting service,
                // not a dead one, and is not retried elsewhere.
                Err(e) if e.is_connect() || (e.is_request() && !e.is_timeout()) => {
                    failed.push((addr, one_line(&e)));
                    continue;
                }
                Err(e) => return Err(MgmtError::Unreachable { addr: addr.clone(), detail: one_line(&e) }),
            };
            // Redirected to the leader (a follower answers writes with 307): ask the leader
            // first next time, if it is one of ours.
            let answered = resp
                .url()
                .host_str()
                .zip(resp.url().port())
                .and_then(|(h, p)| self.addrs.iter().position(|a| *a == format!("{h}:{p}")))
                .unwrap_or(index);
            let status = resp.status();
            let body = resp.bytes().await.map_err(|e| MgmtError::Unreachable { addr: addr.clone(), detail: one_line(&e) })?;
            if status == reqwest::StatusCode::SERVICE_UNAVAILABLE {
                refused = Some(refusal(status, &body));
                continue;
            }
            self.current.store(answered, Ordering::Relaxed);
            if !status.is_success() {
                return Err(refusal(status, &body));
            }
            let body: &[u8] = if body.is_empty() { b"null" } else { &body };
            return serde_json::from_slice(body).map_err(|e| MgmtError::BadReply(e.to_string()));
        }
        // An instance that answered 503 is up but has no leader: say so rather than that the
        // service is unreachable.
        if let Some(refused) = refused {
            return Err(refused);
        }
        Err(unreachable(&failed))
    }

    async fn get<T: for<'de> Deserialize<'de>>(&self, path: &str) -> Result<T, MgmtError> {
        self.send(self.http.get(self.url(path)), DEFAULT_TIMEOUT).await
    }

    async fn post<B: Serialize, T: for<'de> Deserialize<'de>>(&self, path: &str, body: &B) -> Result<T, MgmtError> {
        self.send(self.http.post(self.url(path)).json(body), DEFAULT_TIMEOUT).await
    }

    /// `POST /v1/engines`.
    pub async fn register_engine(&self, req: &RegisterEngine) -> Result<HeartbeatReply, MgmtError> {
        self.post("/engines", req).await
    }

    /// `POST /v1/engines/{rank}/heartbeat`.
    pub async fn heartbeat(&self, rank: u32, uuid: Uuid) -> Result<HeartbeatReply, MgmtError> {
        self.heartbeat_with(rank, &Heartbeat { uuid, stable_epoch: 0, used_bytes: None, volumes: None }).await
    }

    /// `POST /v1/engines/{rank}/heartbeat` with what the engine reports.
    pub async fn heartbeat_with(&self, rank: u32, hb: &Heartbeat) -> Result<HeartbeatReply, MgmtError> {
        self.post(&format!("/engines/{rank}/heartbeat"), hb).await
    }

    /// `GET /v1/system`.
    pub async fn system(&self) -> Result<SystemInfo, MgmtError> {
        self.get("/system").await
    }

    /// `POST /v1/pools`.
    pub async fn create_pool(&self, req: &CreatePool) -> Result<PoolInfo, MgmtError> {
        self.post("/pools", req).await
    }

    /// `GET /v1/pools`.
    pub async fn pools(&self) -> Result<Vec<PoolInfo>, MgmtError> {
        self.get("/pools").await
    }

    /// `GET /v1/pools/{pool}`.
    pub async fn pool(&self, pool: &str) -> Result<PoolInfo, MgmtError> {
        self.get(&format!("/pools/{pool}")).await
    }

    /// `GET /v1/pools/{pool}/map`.
    pub async fn pool_map(&self, pool: &str) -> Result<PoolMapInfo, MgmtError> {
        self.get(&format!("/pools/{pool}/map")).await
    }

    /// `POST /v1/pools/{pool}/engines/{rank}/report`: an engine's rebuild progress and scrub
    /// counters for the pool.
    pub async fn report(&self, pool: &str, rank: u32, report: &EngineReport) -> Result<(), MgmtError> {
        self.post(&format!("/pools/{pool}/engines/{rank}/report"), report).await
    }

    /// `POST /v1/pools/{pool}/exclude`: the selected targets become DOWN (rebuilt elsewhere).
    pub async fn exclude(&self, pool: &str, sel: &TargetSelector) -> Result<PoolInfo, MgmtError> {
        self.post(&format!("/pools/{pool}/exclude"), sel).await
    }

    /// `POST /v1/pools/{pool}/drain`: the selected healthy targets are emptied onto the others.
    pub async fn drain(&self, pool: &str, sel: &TargetSelector) -> Result<PoolInfo, MgmtError> {
        self.post(&format!("/pools/{pool}/drain"), sel).await
    }

    /// `POST /v1/pools/{pool}/reintegrate`: the selected out targets become UP and are filled.
    pub async fn reintegrate(&self, pool: &str, sel: &TargetSelector) -> Result<PoolInfo, MgmtError> {
        self.post(&format!("/pools/{pool}/reintegrate"), sel).await
    }

    /// `POST /v1/pools/{pool}/extend`: the engines' targets join the pool, UP, and are filled
    /// with their share of the data.
    pub async fn extend(&self, pool: &str, req: &ExtendPool) -> Result<PoolInfo, MgmtError> {
        self.post(&format!("/pools/{pool}/extend"), req).await
    }

    /// `POST /v1/pools/{pool}/volumes`.
    pub async fn create_volume(&self, pool: &str, req: &CreateVolume) -> Result<VolumeInfo, MgmtError> {
        self.post(&format!("/pools/{pool}/volumes"), req).await
    }

    /// `GET /v1/pools/{pool}/volumes`.
    pub async fn volumes(&self, pool: &str) -> Result<Vec<VolumeInfo>, MgmtError> {
        self.get(&format!("/pools/{pool}/volumes")).await
    }

    /// `GET /v1/pools/{pool}/volumes/{volume}`.
    pub async fn volume(&self, pool: &str, volume: &str) -> Result<VolumeInfo, MgmtError> {
        self.get(&format!("/pools/{pool}/volumes/{volume}")).await
    }

    /// `PATCH /v1/pools/{pool}/volumes/{volume}`.
    pub async fn resize_volume(&self, pool: &str, volume: &str, size: u64) -> Result<VolumeInfo, MgmtError> {
        let req = self.http.patch(self.url(&format!("/pools/{pool}/volumes/{volume}"))).json(&ResizeVolume { size });
        self.send(req, DEFAULT_TIMEOUT).await
    }

    /// `DELETE /v1/pools/{pool}/volumes/{volume}`.
    pub async fn delete_volume(&self, pool: &str, volume: &str) -> Result<VolumeInfo, MgmtError> {
        self.send(self.http.delete(self.url(&format!("/pools/{pool}/volumes/{volume}"))), DEFAULT_TIMEOUT).await
    }

    /// `POST /v1/pools/{pool}/volumes/{volume}/snapshots`: answers once the snapshot is final
    /// (the pool's stable epoch passed it), or with `stable: false` after a wait of
    /// [`SNAPSHOT_STABLE_WAIT`].
    pub async fn create_snapshot(&self, pool: &str, volume: &str, name: &str) -> Result<SnapshotInfo, MgmtError> {
        let req =
            self.http.post(self.url(&format!("/pools/{pool}/volumes/{volume}/snapshots"))).json(&CreateSnapshot { name: name.to_string() });
        self.send(req, SNAPSHOT_STABLE_WAIT + DEFAULT_TIMEOUT).await
    }

    /// `GET /v1/pools/{pool}/volumes/{volume}/snapshots`.
    pub async fn snapshots(&self, pool: &str, volume: &str) -> Result<Vec<SnapshotInfo>, MgmtError> {
        self.get(&format!("/pools/{pool}/volumes/{volume}/snapshots")).await
    }

    /// `POST /v1/pools/{pool}/volumes/{volume}/snapshots/{snapshot}/clone`: a new volume that
    /// reads as the snapshot, writable, with no data copied.
    pub async fn clone_volume(&self, pool: &str, volume: &str, snapshot: &str, name: &str) -> Result<VolumeInfo, MgmtError> {
        self.post(&format!("/pools/{pool}/volumes/{volume}/snapshots/{snapshot}/clone"), &CreateClone { name: name.to_string() }).await
    }

    /// `POST /v1/pools/{pool}/volumes/{volume}/rollback`: the volume reads as the snapshot;
    /// answers once no write at or below the rollback's epoch can still commit.
    pub async fn rollback(&self, pool: &str, volume: &str, snapshot: &str, force: bool) -> Result<VolumeInfo, MgmtError> {
        let req = self
            .http
            .post(self.url(&format!("/pools/{pool}/volumes/{volume}/rollback")))
            .json(&Rollback { snapshot: snapshot.to_string(), force });
        self.send(req, SNAPSHOT_STABLE_WAIT + DEFAULT_TIMEOUT).await
    }

    /// `POST /v1/pools/{pool}/volumes/{volume}/flatten`.
    pub async fn flatten(&self, pool: &str, volume: &str, done: bool) -> Result<VolumeInfo, MgmtError> {
        self.post(&format!("/pools/{pool}/volumes/{volume}/flatten"), &Flatten { done }).await
    }

    /// `DELETE /v1/pools/{pool}/volumes/{volume}/snapshots/{name}`.
    pub async fn delete_snapshot(&self, pool: &str, volume: &str, name: &str) -> Result<SnapshotInfo, MgmtError> {
        self.send(self.http.delete(self.url(&format!("/pools/{pool}/volumes/{volume}/snapshots/{name}"))), DEFAULT_TIMEOUT).await
    }

    /// `POST /v1/exports`.
    pub async fn create_export(&self, req: &CreateExport) -> Result<ExportInfo, MgmtError> {
        self.post("/exports", req).await
    }

    /// `GET /v1/service`: the role of the service that answered.
    pub async fn service_role(&self) -> Result<ServiceRole, MgmtError> {
        self.get("/service").await
    }

    /// `GET /v1/exports`.
    pub async fn exports(&self) -> Result<ExportList, MgmtError> {
        self.get("/exports").await
    }

    /// `GET /v1/exports?after=V&wait_ms=T`: waits (up to `wait`) for a store version above
    /// `after`, then lists the exports.
    pub async fn wait_exports(&self, after: ClusterVersion, wait: Duration) -> Result<ExportList, MgmtError> {
        self.follow_exports(after, wait, None).await
    }

    /// [`MgmtClient::wait_exports`] by a target that serves exports: `me` says which target it
    /// is and which list it has applied (see [`Follower`]).
    pub async fn follow_exports(&self, after: ClusterVersion, wait: Duration, me: Option<&Follower>) -> Result<ExportList, MgmtError> {
        let wait_ms = wait.as_millis().min(60_000) as u64;
        let mut req = self.http.get(self.url("/exports")).query(&[("after", after), ("wait_ms", wait_ms)]);
        if let Some(me) = me {
            req = req.query(&[("target", me.listen.join(","))]).query(&[("taken", me.taken)]);
        }
        self.send(req, Duration::from_millis(wait_ms) + DEFAULT_TIMEOUT).await
    }

    /// `POST /v1/exports/{nqn}/{nsid}/reservation`.
    pub async fn reservation(&self, nqn: &str, nsid: u32, cmd: &ReservationCommand) -> Result<ReservationReply, MgmtError> {
        self.post(&format!("/exports/{nqn}/{nsid}/reservation"), cmd).await
    }

    /// `POST /v1/vhost-exports`.
    pub async fn create_vhost_export(&self, req: &CreateVhostExport) -> Result<VhostExportInfo, MgmtError> {
        self.post("/vhost-exports", req).await
    }

    /// `DELETE /v1/vhost-exports?socket=PATH`.
    pub async fn delete_vhost_export(&self, socket: &str) -> Result<VhostExportInfo, MgmtError> {
        self.send(self.http.delete(self.url("/vhost-exports")).query(&[("socket", socket)]), DEFAULT_TIMEOUT).await
    }

    /// `POST /v1/exports/{nqn}/optimized`: the subsystem's exports, as they are now.
    pub async fn set_optimized(&self, nqn: &str, listen: &str) -> Result<Vec<ExportInfo>, MgmtError> {
        self.post(&format!("/exports/{nqn}/optimized"), &SetOptimized { listen: listen.to_string() }).await
    }

    /// `DELETE /v1/exports/{nqn}/{nsid}`.
    pub async fn delete_export(&self, nqn: &str, nsid: u32) -> Result<ExportInfo, MgmtError> {
        self.send(self.http.delete(self.url(&format!("/exports/{nqn}/{nsid}"))), DEFAULT_TIMEOUT).await
    }
}

const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// The host request URLs are built with, replaced before sending.
const URL_HOST: &str = "mgmt.invalid";

/// The addresses of a comma-separated list, as `host:port`.
fn parse_addrs(list: &str) -> Vec<String> {
    list.split(',')
        .map(|a| {
            let a = a.trim().trim_end_matches('/');
            a.strip_prefix("http://").unwrap_or(a).to_string()
        })
        .filter(|a| !a.is_empty())
        .collect()
}

/// Points `url` at `addr` (`host:port`), keeping its path and query.
fn retarget(url: &mut reqwest::Url, addr: &str) -> Result<(), String> {
    let to = reqwest::Url::parse(&format!("http://{addr}/")).map_err(|e| format!("bad address: {e}"))?;
    url.set_host(to.host_str()).map_err(|e| format!("bad address: {e}"))?;
    url.set_port(to.port()).map_err(|()| "bad address: no port allowed".to_string())
}

/// A 4xx/5xx reply as an error: the service's message, or the raw body.
fn refusal(status: reqwest::StatusCode, body: &[u8]) -> MgmtError {
    let message = serde_json::from_slice::<ApiError>(body)
        .map(|e| e.error)
        .unwrap_or_else(|_| format!("HTTP {status}: {}", String::from_utf8_lossy(body).trim()));
    MgmtError::Refused { status: status.as_u16(), message }
}

/// No address could be reached: every address tried, each with its failure. One address keeps
/// the error as it was before lists.
fn unreachable(failed: &[(&str, String)]) -> MgmtError {
    match failed {
        [(addr, detail)] => MgmtError::Unreachable { addr: addr.to_string(), detail: detail.clone() },
        _ => MgmtError::Unreachable {
            addr: failed.iter().map(|(a, _)| *a).collect::<Vec<_>>().join(","),
            detail: failed.iter().map(|(a, d)| format!("{a}: {d}")).collect::<Vec<_>>().join("; "),
        },
    }
}

/// An error and its sources on one line.
fn one_line(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        let m = c.to_string();
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        src = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;

    const EXPORTS: &str = r#"{"version":1,"exports":[]}"#;

    /// An HTTP/1.1 server on 127.0.0.1 answering every request with `status` and `body`, one
    /// request per connection. Returns its address.
    async fn serve(status: &'static str, body: &'static str) -> String {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        tokio::spawn(async move {
            while let Ok((mut sock, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    let mut chunk = [0u8; 1024];
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                        match sock.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => head.extend_from_slice(&chunk[..n]),
                        }
                    }
                    let reply = format!(
                        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = sock.write_all(reply.as_bytes()).await;
                    let _ = sock.shutdown().await;
                });
            }
        });
        addr
    }

    /// An address nothing listens on.
    fn dead() -> String {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().to_string()
    }

    #[tokio::test]
    async fn a_dead_address_is_skipped_and_every_clone_learns_the_live_one() {
        let (down, up) = (dead(), serve("200 OK", EXPORTS).await);
        let client = MgmtClient::new(&format!("{down},{up}"));
        let earlier = client.clone();
        assert_eq!(client.addr(), down);
        let list = client.exports().await.unwrap();
        assert_eq!((list.version, list.exports.len()), (1, 0));
        assert_eq!(client.addr(), up);
        assert_eq!(earlier.addr(), up);
        assert_eq!(earlier.exports().await.unwrap().version, 1);
    }

    #[tokio::test]
    async fn a_follower_without_a_leader_is_skipped() {
        let follower = serve("503 Service Unavailable", r#"{"error":"no leader elected yet"}"#).await;
        let leader = serve("200 OK", EXPORTS).await;
        let client = MgmtClient::new(&format!("{follower},{leader}"));
        assert_eq!(client.exports().await.unwrap().version, 1);
        assert_eq!(client.addr(), leader);
    }

    #[tokio::test]
    async fn when_every_address_answers_503_the_last_refusal_is_returned() {
        let a = serve("503 Service Unavailable", r#"{"error":"a has no leader"}"#).await;
        let b = serve("503 Service Unavailable", r#"{"error":"b has no leader"}"#).await;
        let e = MgmtClient::new(&format!("{a},{b}")).exports().await.unwrap_err();
        assert_eq!(e.status(), Some(503));
        assert_eq!(e.to_string(), "b has no leader");
    }

    #[tokio::test]
    async fn other_refusals_are_final() {
        let a = serve("404 Not Found", r#"{"error":"no such pool"}"#).await;
        let b = serve("200 OK", EXPORTS).await;
        let client = MgmtClient::new(&format!("{a},{b}"));
        let e = client.exports().await.unwrap_err();
        assert_eq!((e.status(), e.to_string()), (Some(404), "no such pool".to_string()));
        assert_eq!(client.addr(), a);
    }

    #[tokio::test]
    async fn when_no_address_answers_the_error_names_them_all() {
        let (a, b) = (dead(), dead());
        let e = MgmtClient::new(&format!("{a},{b}")).exports().await.unwrap_err();
        assert!(matches!(e, MgmtError::Unreachable { .. }), "{e:?}");
        let text = e.to_string();
        assert!(text.contains(&a) && text.contains(&b), "{text}");
        let one = MgmtClient::new(&a).exports().await.unwrap_err();
        assert!(matches!(&one, MgmtError::Unreachable { addr, .. } if *addr == a), "{one:?}");
    }

    #[tokio::test]
    async fn a_bad_address_fails_alone() {
        let up = serve("200 OK", EXPORTS).await;
        let client = MgmtClient::new(&format!("not an address,{up}"));
        assert_eq!(client.exports().await.unwrap().version, 1);
        assert_eq!(client.addr(), up);
    }

    #[test]
    fn address_lists_parse() {
        let c = MgmtClient::new("http://a:1/, b:2,,c:3");
        assert_eq!(c.addrs(), ["a:1", "b:2", "c:3"]);
        assert_eq!(c.addr(), "a:1");
        assert_eq!(MgmtClient::new("127.0.0.1:7400").addrs(), ["127.0.0.1:7400"]);
        assert_eq!(MgmtClient::new("http://[::1]:7400/").addrs(), ["[::1]:7400"]);
    }
}
