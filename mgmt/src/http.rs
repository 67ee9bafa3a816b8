//! The HTTP/JSON API (axum): routes under `/v1`, request parsing that refuses malformed JSON
//! and unknown fields, and errors as `{"error": "..."}` with the status of the
//! [`crate::machine::CmdError`] (or 400/404/405/413 for what axum itself rejects).
//!
//! Handlers are thin: state changes run [`Service`] methods on the blocking pool (a commit
//! fsyncs), reads answer from the published snapshot. `GET /v1/exports?after=V&wait_ms=T`
//! waits on the snapshot channel until the store version exceeds `V`.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Path, Query, Request, State};
use axum::http::request::Parts;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tessera_mgmt_api::{
    ApiError, ClusterVersion, CreateClone, CreateExport, CreatePool, CreateSnapshot, CreateVhostExport, CreateVolume, EngineReport,
    ExportInfo, ExportList, ExtendPool, Flatten, Heartbeat, HeartbeatReply, PoolInfo, PoolMapInfo, RegisterEngine, ReservationCommand,
    ReservationReply, ResizeVolume, Rollback, ServiceRole, SetOptimized, SnapshotInfo, SystemInfo, TargetSelector, VhostExportInfo,
    VolumeInfo, SNAPSHOT_STABLE_WAIT,
};
use tokio_util::sync::CancellationToken;
use tracing::{error, warn};

use crate::followers::{Followers, FENCE_WAIT};
use crate::machine::{self, Command, Outcome};
use crate::punch;
use crate::service::{Service, ServiceError};

/// Longest a long poll waits.
pub const MAX_WAIT_MS: u64 = 60_000;
/// Wait of a long poll that gives `after` but no `wait_ms`.
pub const DEFAULT_WAIT_MS: u64 = 30_000;

/// What every handler shares.
#[derive(Debug, Clone)]
pub struct App {
    /// The service.
    pub svc: Arc<Service>,
    /// Cancelled at shutdown: long polls answer at once.
    pub stop: CancellationToken,
    /// The targets following the export list (the reservation fence).
    pub followers: Arc<Followers>,
}

impl App {
    /// The API of `svc`, stopped by `stop`.
    pub fn new(svc: Arc<Service>, stop: CancellationToken) -> App {
        App { svc, stop, followers: Arc::default() }
    }
}

/// An error answer: a status and one line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpError {
    /// Status.
    pub status: StatusCode,
    /// Message.
    pub message: String,
}

impl HttpError {
    fn new(status: StatusCode, message: impl Into<String>) -> HttpError {
        // One line, whatever the source said.
        let message: String = message.into().lines().map(str::trim).filter(|l| !l.is_empty()).collect::<Vec<_>>().join(" ");
        HttpError { status, message }
    }

    fn bad_request(message: impl Into<String>) -> HttpError {
        HttpError::new(StatusCode::BAD_REQUEST, message)
    }
}

impl From<ServiceError> for HttpError {
    fn from(e: ServiceError) -> HttpError {
        let status = StatusCode::from_u16(e.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        if status.is_server_error() {
            error!("{e}");
        }
        HttpError::new(status, e.to_string())
    }
}

impl From<machine::CmdError> for HttpError {
    fn from(e: machine::CmdError) -> HttpError {
        ServiceError::from(e).into()
    }
}

impl IntoResponse for HttpError {
    fn into_response(self) -> Response {
        (self.status, Json(ApiError { error: self.message })).into_response()
    }
}

/// A JSON body: malformed JSON, trailing data and unknown fields are 400 with an [`ApiError`].
#[derive(Debug)]
pub struct ApiJson<T>(pub T);

/// Parses a JSON request body, refusing fields `T` does not know.
pub fn parse_body<T: DeserializeOwned>(body: &[u8]) -> Result<T, HttpError> {
    let mut unknown = Vec::new();
    let mut de = serde_json::Deserializer::from_slice(body);
    let value: T = serde_ignored::deserialize(&mut de, |path| unknown.push(path.to_string()))
        .map_err(|e| HttpError::bad_request(format!("invalid JSON body: {e}")))?;
    de.end().map_err(|e| HttpError::bad_request(format!("invalid JSON body: {e}")))?;
    if !unknown.is_empty() {
        return Err(HttpError::bad_request(format!("invalid JSON body: unknown field {}", unknown.join(", "))));
    }
    Ok(value)
}

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for ApiJson<T> {
    type Rejection = HttpError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let body = Bytes::from_request(req, state).await.map_err(|e| HttpError::new(e.status(), e.body_text()))?;
        parse_body(&body).map(ApiJson)
    }
}

/// Path parameters; a bad one is 400 with an [`ApiError`].
#[derive(Debug)]
pub struct ApiPath<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned + Send> FromRequestParts<S> for ApiPath<T> {
    type Rejection = HttpError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        Path::<T>::from_request_parts(parts, state).await.map(|Path(v)| ApiPath(v)).map_err(|e| HttpError::new(e.status(), e.body_text()))
    }
}

/// Query parameters; a bad one is 400 with an [`ApiError`].
#[derive(Debug)]
pub struct ApiQuery<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = HttpError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        Query::<T>::from_request_parts(parts, state)
            .await
            .map(|Query(v)| ApiQuery(v))
            .map_err(|e| HttpError::new(e.status(), e.body_text()))
    }
}

/// The router of the whole API.
pub fn router(app: App) -> Router {
    Router::new()
        .route("/v1/engines", post(register_engine))
        .route("/v1/engines/{rank}/heartbeat", post(heartbeat))
        .route("/v1/system", get(system))
        .route("/v1/pools", get(list_pools).post(create_pool))
        .route("/v1/pools/{pool}", get(get_pool))
        .route("/v1/pools/{pool}/map", get(get_pool_map))
        .route("/v1/pools/{pool}/engines/{rank}/report", post(report))
        .route("/v1/pools/{pool}/exclude", post(exclude))
        .route("/v1/pools/{pool}/drain", post(drain))
        .route("/v1/pools/{pool}/reintegrate", post(reintegrate))
        .route("/v1/pools/{pool}/extend", post(extend))
        .route("/v1/pools/{pool}/volumes", get(list_volumes).post(create_volume))
        .route("/v1/pools/{pool}/volumes/{volume}", get(get_volume).patch(resize_volume).delete(delete_volume))
        .route("/v1/pools/{pool}/volumes/{volume}/snapshots", get(list_snapshots).post(create_snapshot))
        .route("/v1/pools/{pool}/volumes/{volume}/snapshots/{name}", get(get_snapshot).delete(delete_snapshot))
        .route("/v1/pools/{pool}/volumes/{volume}/snapshots/{name}/clone", post(clone_volume))
        .route("/v1/pools/{pool}/volumes/{volume}/flatten", post(flatten))
        .route("/v1/pools/{pool}/volumes/{volume}/rollback", post(rollback))
        .route("/v1/exports", get(list_exports).post(create_export))
        .route("/v1/exports/{nqn}/optimized", post(set_optimized))
        .route("/v1/exports/{nqn}/{nsid}", get(get_export).delete(delete_export))
        .route("/v1/exports/{nqn}/{nsid}/reservation", post(reservation))
        .route("/v1/vhost-exports", get(list_vhost_exports).post(create_vhost_export).delete(delete_vhost_export))
        .route("/v1/service", get(service_role))
        .fallback(|| async { HttpError::new(StatusCode::NOT_FOUND, "no such endpoint") })
        .method_not_allowed_fallback(|| async { HttpError::new(StatusCode::METHOD_NOT_ALLOWED, "method not allowed on this endpoint") })
        .layer(axum::middleware::from_fn_with_state(app.clone(), to_leader))
        .with_state(app)
}

/// Whether a follower answers `req` itself: reads of the store's state (exports, pool maps,
/// its own role). Everything else — writes, heartbeats, and reads of what only the leader
/// knows (engines' heartbeats, rebuild progress, usage), and the long polls of targets (the
/// leader's reservation fence counts them) — goes to the leader.
fn follower_serves(req: &Request) -> bool {
    let path = req.uri().path();
    let targets_poll = req.uri().query().is_some_and(|q| q.split('&').any(|kv| kv.starts_with("target=")));
    req.method() == axum::http::Method::GET
        && (path == "/v1/service"
            || (path.starts_with("/v1/exports") && !targets_poll)
            || (path.starts_with("/v1/pools/") && path.ends_with("/map")))
}

/// A follower redirects (307, method and body kept) what the leader must answer.
async fn to_leader(State(app): State<App>, req: Request, next: axum::middleware::Next) -> Response {
    if app.svc.is_leader() || follower_serves(&req) {
        return next.run(req).await;
    }
    match app.svc.redirect_to() {
        Some(leader) => {
            let to = format!("http://{leader}{}", req.uri().path_and_query().map_or("", |p| p.as_str()));
            (StatusCode::TEMPORARY_REDIRECT, [(axum::http::header::LOCATION, to)]).into_response()
        }
        None => {
            HttpError::new(StatusCode::SERVICE_UNAVAILABLE, "this management service is a follower and no leader is elected yet: retry")
                .into_response()
        }
    }
}

async fn service_role(State(app): State<App>) -> Json<ServiceRole> {
    Json(ServiceRole { leader: app.svc.is_leader(), leader_addr: app.svc.leader_addr(), version: app.svc.snapshot().version })
}

/// Runs `f` on the blocking pool (commits fsync).
async fn blocking<T: Send + 'static>(
    app: &App,
    f: impl FnOnce(&Service) -> Result<T, ServiceError> + Send + 'static,
) -> Result<T, HttpError> {
    let svc = app.svc.clone();
    match tokio::task::spawn_blocking(move || f(&svc)).await {
        Ok(r) => r.map_err(HttpError::from),
        Err(e) => Err(HttpError::new(StatusCode::INTERNAL_SERVER_ERROR, format!("internal error: {e}"))),
    }
}

async fn execute(app: &App, cmd: Command) -> Result<Outcome, HttpError> {
    blocking(app, move |s| s.execute(&cmd)).await
}

fn unexpected(o: Outcome) -> HttpError {
    HttpError::new(StatusCode::INTERNAL_SERVER_ERROR, format!("internal error: unexpected outcome {o:?}"))
}

fn parse_rank(rank: &str) -> Result<u32, HttpError> {
    rank.parse().map_err(|_| HttpError::bad_request(format!("rank {rank:?} is not a number")))
}

fn parse_nsid(nsid: &str) -> Result<u32, HttpError> {
    nsid.parse().map_err(|_| HttpError::bad_request(format!("namespace id {nsid:?} is not a number")))
}

async fn register_engine(State(app): State<App>, ApiJson(req): ApiJson<RegisterEngine>) -> Result<Json<HeartbeatReply>, HttpError> {
    Ok(Json(blocking(&app, move |s| s.register(&req)).await?))
}

async fn heartbeat(
    State(app): State<App>,
    ApiPath(rank): ApiPath<String>,
    ApiJson(req): ApiJson<Heartbeat>,
) -> Result<Json<HeartbeatReply>, HttpError> {
    let rank = parse_rank(&rank)?;
    // Blocking pool: the reply is read under the write lock, which a commit holds over its fsync.
    Ok(Json(blocking(&app, move |s| s.heartbeat_with(rank, &req)).await?))
}

async fn system(State(app): State<App>) -> Json<SystemInfo> {
    Json(app.svc.system())
}

async fn create_pool(State(app): State<App>, ApiJson(req): ApiJson<CreatePool>) -> Result<(StatusCode, Json<PoolInfo>), HttpError> {
    match execute(&app, Command::CreatePool(req)).await? {
        Outcome::Pool(p) => Ok((StatusCode::CREATED, Json(*p))),
        o => Err(unexpected(o)),
    }
}

async fn list_pools(State(app): State<App>) -> Json<Vec<PoolInfo>> {
    Json(app.svc.pools())
}

async fn get_pool(State(app): State<App>, ApiPath(pool): ApiPath<String>) -> Result<Json<PoolInfo>, HttpError> {
    Ok(Json(app.svc.pool_info(&pool)?))
}

async fn report(
    State(app): State<App>,
    ApiPath((pool, rank)): ApiPath<(String, String)>,
    ApiJson(req): ApiJson<EngineReport>,
) -> Result<StatusCode, HttpError> {
    let rank = parse_rank(&rank)?;
    blocking(&app, move |s| s.report(&pool, rank, &req)).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn exclude(
    State(app): State<App>,
    ApiPath(pool): ApiPath<String>,
    ApiJson(sel): ApiJson<TargetSelector>,
) -> Result<Json<PoolInfo>, HttpError> {
    Ok(Json(blocking(&app, move |s| s.exclude(&pool, sel)).await?))
}

async fn drain(
    State(app): State<App>,
    ApiPath(pool): ApiPath<String>,
    ApiJson(sel): ApiJson<TargetSelector>,
) -> Result<Json<PoolInfo>, HttpError> {
    Ok(Json(blocking(&app, move |s| s.drain(&pool, sel)).await?))
}

async fn reintegrate(
    State(app): State<App>,
    ApiPath(pool): ApiPath<String>,
    ApiJson(sel): ApiJson<TargetSelector>,
) -> Result<Json<PoolInfo>, HttpError> {
    Ok(Json(blocking(&app, move |s| s.reintegrate(&pool, sel)).await?))
}

async fn extend(
    State(app): State<App>,
    ApiPath(pool): ApiPath<String>,
    ApiJson(req): ApiJson<ExtendPool>,
) -> Result<Json<PoolInfo>, HttpError> {
    Ok(Json(blocking(&app, move |s| s.extend(&pool, req.ranks)).await?))
}

async fn get_pool_map(State(app): State<App>, ApiPath(pool): ApiPath<String>) -> Result<Json<PoolMapInfo>, HttpError> {
    Ok(Json(machine::pool_map(&app.svc.snapshot().state, &pool)?))
}

async fn create_volume(
    State(app): State<App>,
    ApiPath(pool): ApiPath<String>,
    ApiJson(req): ApiJson<CreateVolume>,
) -> Result<(StatusCode, Json<VolumeInfo>), HttpError> {
    match execute(&app, Command::CreateVolume { pool, req }).await? {
        Outcome::Volume(v) => Ok((StatusCode::CREATED, Json(v))),
        o => Err(unexpected(o)),
    }
}

async fn list_volumes(State(app): State<App>, ApiPath(pool): ApiPath<String>) -> Result<Json<Vec<VolumeInfo>>, HttpError> {
    let mut vs = machine::volumes(&app.svc.snapshot().state, &pool)?;
    vs.iter_mut().for_each(|v| app.svc.annotate(v));
    Ok(Json(vs))
}

async fn get_volume(State(app): State<App>, ApiPath((pool, volume)): ApiPath<(String, String)>) -> Result<Json<VolumeInfo>, HttpError> {
    let mut v = machine::volume(&app.svc.snapshot().state, &pool, &volume)?;
    app.svc.annotate(&mut v);
    Ok(Json(v))
}

/// Records the snapshot, then answers once it is final (the pool's stable epoch passed it) or
/// after [`SNAPSHOT_STABLE_WAIT`] with `stable: false`.
async fn create_snapshot(
    State(app): State<App>,
    ApiPath((pool, volume)): ApiPath<(String, String)>,
    ApiJson(req): ApiJson<CreateSnapshot>,
) -> Result<(StatusCode, Json<SnapshotInfo>), HttpError> {
    let (p, v) = (pool.clone(), volume.clone());
    let mut info = blocking(&app, move |s| s.create_snapshot(&p, &v, &req.name)).await?;
    info.stable = tokio::select! {
        stable = app.svc.wait_stable(&pool, info.epoch, SNAPSHOT_STABLE_WAIT) => stable,
        _ = app.stop.cancelled() => false,
    };
    Ok((StatusCode::CREATED, Json(info)))
}

async fn list_snapshots(
    State(app): State<App>,
    ApiPath((pool, volume)): ApiPath<(String, String)>,
) -> Result<Json<Vec<SnapshotInfo>>, HttpError> {
    Ok(Json(app.svc.snapshots(&pool, &volume)?))
}

async fn clone_volume(
    State(app): State<App>,
    ApiPath((pool, volume, snapshot)): ApiPath<(String, String, String)>,
    ApiJson(req): ApiJson<CreateClone>,
) -> Result<(StatusCode, Json<VolumeInfo>), HttpError> {
    match execute(&app, Command::CloneVolume { pool, volume, snapshot, name: req.name }).await? {
        Outcome::Volume(v) => Ok((StatusCode::CREATED, Json(v))),
        o => Err(unexpected(o)),
    }
}

async fn flatten(
    State(app): State<App>,
    ApiPath((pool, volume)): ApiPath<(String, String)>,
    ApiJson(req): ApiJson<Flatten>,
) -> Result<Json<VolumeInfo>, HttpError> {
    match execute(&app, Command::Flatten { pool, volume, done: req.done }).await? {
        Outcome::Volume(v) => Ok(Json(v)),
        o => Err(unexpected(o)),
    }
}

/// Records the rollback, then answers once no write at or below its epoch can still commit
/// (the pool's stable epoch passed it), or after [`SNAPSHOT_STABLE_WAIT`].
async fn rollback(
    State(app): State<App>,
    ApiPath((pool, volume)): ApiPath<(String, String)>,
    ApiJson(req): ApiJson<Rollback>,
) -> Result<Json<VolumeInfo>, HttpError> {
    let cmd = Command::Rollback { pool: pool.clone(), volume, snapshot: req.snapshot, force: req.force };
    let v = match execute(&app, cmd).await? {
        Outcome::Volume(v) => v,
        o => return Err(unexpected(o)),
    };
    if let Some(r) = v.rollbacks.last() {
        tokio::select! {
            _ = app.svc.wait_stable(&pool, r.at, SNAPSHOT_STABLE_WAIT) => {}
            _ = app.stop.cancelled() => {}
        }
    }
    Ok(Json(v))
}

async fn get_snapshot(
    State(app): State<App>,
    ApiPath((pool, volume, name)): ApiPath<(String, String, String)>,
) -> Result<Json<SnapshotInfo>, HttpError> {
    let all = app.svc.snapshots(&pool, &volume)?;
    match all.into_iter().find(|s| s.name == name) {
        Some(s) => Ok(Json(s)),
        None => Err(machine::CmdError::NoSnapshot { pool, volume, snapshot: name }.into()),
    }
}

async fn delete_snapshot(
    State(app): State<App>,
    ApiPath((pool, volume, name)): ApiPath<(String, String, String)>,
) -> Result<Json<SnapshotInfo>, HttpError> {
    Ok(Json(blocking(&app, move |s| s.delete_snapshot(&pool, &volume, &name)).await?))
}

async fn resize_volume(
    State(app): State<App>,
    ApiPath((pool, volume)): ApiPath<(String, String)>,
    ApiJson(req): ApiJson<ResizeVolume>,
) -> Result<Json<VolumeInfo>, HttpError> {
    match execute(&app, Command::ResizeVolume { pool, volume, size: req.size }).await? {
        Outcome::Volume(v) => Ok(Json(v)),
        o => Err(unexpected(o)),
    }
}

async fn delete_volume(State(app): State<App>, ApiPath((pool, volume)): ApiPath<(String, String)>) -> Result<Json<VolumeInfo>, HttpError> {
    match execute(&app, Command::DeleteVolume { pool, volume }).await? {
        Outcome::VolumeDeleted(v, plan) => {
            tokio::spawn(punch::punch_volume(plan));
            Ok(Json(v))
        }
        o => Err(unexpected(o)),
    }
}

/// Query of `GET /v1/exports`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExportsQuery {
    /// Answer once the store version exceeds this.
    pub after: Option<ClusterVersion>,
    /// Longest wait, milliseconds (capped at [`MAX_WAIT_MS`]).
    pub wait_ms: Option<u64>,
    /// The polling target's listen addresses, comma-separated ([`tessera_mgmt_api::Follower`]).
    pub target: Option<String>,
    /// The newest list that target has applied.
    pub taken: Option<ClusterVersion>,
}

async fn list_exports(State(app): State<App>, ApiQuery(q): ApiQuery<ExportsQuery>) -> Json<ExportList> {
    let _poll = q.target.as_deref().map(|t| app.followers.poll(t, q.taken.unwrap_or(0)));
    if let Some(after) = q.after {
        let wait = Duration::from_millis(q.wait_ms.unwrap_or(DEFAULT_WAIT_MS).min(MAX_WAIT_MS));
        let mut rx = app.svc.subscribe();
        let changed = async {
            tokio::select! {
                _ = rx.wait_for(|s| s.version > after) => {}
                _ = app.stop.cancelled() => {}
            }
        };
        let _ = tokio::time::timeout(wait, changed).await;
    }
    let snap = app.svc.snapshot();
    Json(ExportList { version: snap.version, exports: machine::exports(&snap.state), vhost: machine::vhost_exports(&snap.state) })
}

async fn get_export(State(app): State<App>, ApiPath((nqn, nsid)): ApiPath<(String, String)>) -> Result<Json<ExportInfo>, HttpError> {
    let nsid = parse_nsid(&nsid)?;
    let snap = app.svc.snapshot();
    machine::exports(&snap.state)
        .into_iter()
        .find(|x| x.nqn == nqn && x.nsid == nsid)
        .map(Json)
        .ok_or_else(|| machine::CmdError::NoExport { nqn, nsid }.into())
}

async fn create_export(State(app): State<App>, ApiJson(req): ApiJson<CreateExport>) -> Result<(StatusCode, Json<ExportInfo>), HttpError> {
    match execute(&app, Command::CreateExport(req)).await? {
        Outcome::Export(x) => Ok((StatusCode::CREATED, Json(x))),
        o => Err(unexpected(o)),
    }
}

async fn delete_export(State(app): State<App>, ApiPath((nqn, nsid)): ApiPath<(String, String)>) -> Result<Json<ExportInfo>, HttpError> {
    let nsid = parse_nsid(&nsid)?;
    match execute(&app, Command::DeleteExport { nqn, nsid }).await? {
        Outcome::Export(x) => Ok(Json(x)),
        o => Err(unexpected(o)),
    }
}

async fn set_optimized(
    State(app): State<App>,
    ApiPath(nqn): ApiPath<String>,
    ApiJson(req): ApiJson<SetOptimized>,
) -> Result<Json<Vec<ExportInfo>>, HttpError> {
    match execute(&app, Command::SetOptimized { nqn, listen: req.listen }).await? {
        Outcome::Exports(x) => Ok(Json(x)),
        o => Err(unexpected(o)),
    }
}

/// A host's reservation command, forwarded by the target it reached. A change is answered once
/// every other target serving the subsystem has taken it (see [`Followers`]), so that what one
/// path completed holds on all of them.
async fn reservation(
    State(app): State<App>,
    ApiPath((nqn, nsid)): ApiPath<(String, String)>,
    ApiJson(cmd): ApiJson<ReservationCommand>,
) -> Result<Json<ReservationReply>, HttpError> {
    let nsid = parse_nsid(&nsid)?;
    let Outcome::Reservation { status, reservation } = execute(&app, Command::Reservation { nqn: nqn.clone(), nsid, cmd }).await? else {
        return Err(HttpError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal error: unexpected outcome"));
    };
    let snap = app.svc.snapshot();
    if status == 0 {
        let paths: Vec<String> = snap
            .state
            .exports
            .get(&(nqn.clone(), nsid))
            .map(|x| std::iter::once(&x.listen).chain(&x.paths).cloned().collect())
            .unwrap_or_default();
        let behind = app.followers.fence(&paths, snap.version, FENCE_WAIT).await;
        if !behind.is_empty() {
            warn!(nqn, nsid, version = snap.version, targets = ?behind, "reservation change answered before these paths took it");
        }
    }
    Ok(Json(ReservationReply { status, version: snap.version, reservation }))
}

/// Query of `DELETE /v1/vhost-exports`: the socket path (a path holds `/`, so it is not a
/// path segment).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VhostSocketQuery {
    /// The export's socket.
    pub socket: String,
}

async fn list_vhost_exports(State(app): State<App>) -> Json<Vec<VhostExportInfo>> {
    Json(machine::vhost_exports(&app.svc.snapshot().state))
}

async fn create_vhost_export(
    State(app): State<App>,
    ApiJson(req): ApiJson<CreateVhostExport>,
) -> Result<(StatusCode, Json<VhostExportInfo>), HttpError> {
    match execute(&app, Command::CreateVhostExport(req)).await? {
        Outcome::VhostExport(x) => Ok((StatusCode::CREATED, Json(x))),
        o => Err(unexpected(o)),
    }
}

async fn delete_vhost_export(State(app): State<App>, ApiQuery(q): ApiQuery<VhostSocketQuery>) -> Result<Json<VhostExportInfo>, HttpError> {
    match execute(&app, Command::DeleteVhostExport { socket: q.socket }).await? {
        Outcome::VhostExport(x) => Ok(Json(x)),
        o => Err(unexpected(o)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_refuse_bad_json_trailing_data_and_unknown_fields() {
        let ok: ResizeVolume = parse_body(br#"{"size": 4096}"#).unwrap();
        assert_eq!(ok.size, 4096);
        let e = parse_body::<ResizeVolume>(br#"{"size": 4096, "extra": 1}"#).unwrap_err();
        assert_eq!((e.status, e.message.as_str()), (StatusCode::BAD_REQUEST, "invalid JSON body: unknown field extra"));
        let e = parse_body::<CreatePool>(br#"{"name": "p", "ranks": [], "nested": {"a": 1}}"#).unwrap_err();
        assert!(e.message.contains("unknown field nested"), "{}", e.message);
        for bad in [&b""[..], b"{", b"[]", br#"{"size": "big"}"#, br#"{"size": 1} x"#, br#"{}"#] {
            let e = parse_body::<ResizeVolume>(bad).unwrap_err();
            assert_eq!(e.status, StatusCode::BAD_REQUEST);
            assert!(e.message.starts_with("invalid JSON body: "), "{}", e.message);
            assert!(!e.message.contains('\n'));
        }
    }

    #[test]
    fn errors_are_one_line() {
        let e = HttpError::new(StatusCode::BAD_REQUEST, "first\n  second\n\n");
        assert_eq!(e.message, "first second");
        let e: HttpError = machine::CmdError::NoPool("x".into()).into();
        assert_eq!(e.status, StatusCode::NOT_FOUND);
    }
}
