//! The real `tessera-mgmt` process over TCP, driven by `MgmtClient` and raw HTTP: fake engines
//! register and heartbeat, pools/volumes/exports, every error status, the heartbeat timeout,
//! long polls, `kill -9` and restart on the same database, the restart grace period, signals,
//! a second instance on the same database, bad arguments.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers panic on failure by design

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tessera_mgmt_api::{
    CreateExport, CreatePool, CreateVolume, EngineRebuildState, EngineReport, EngineState, ExportList, MgmtClient, MgmtError, PoolInfo,
    RebuildProgress, RebuildState, RegisterEngine, ScrubCounters, SystemInfo, TargetSelector, TargetStateName,
};
use uuid::Uuid;

const BIN: &str = env!("CARGO_BIN_EXE_tessera-mgmt");

/// A running service; killed (SIGKILL) when dropped.
struct Mgmt {
    child: Child,
    addr: String,
    log: Arc<Mutex<String>>,
}

impl Mgmt {
    fn start(db: &Path, extra: &[&str]) -> Mgmt {
        let mut child = Command::new(BIN)
            .args(["--listen", "127.0.0.1:0", "--db"])
            .arg(db)
            .args(extra)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let log2 = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if let Some(rest) = line.split("listening addr=").nth(1) {
                    let _ = tx.send(rest.split_whitespace().next().unwrap_or_default().to_string());
                }
                let mut l = log2.lock().unwrap();
                l.push_str(&line);
                l.push('\n');
            }
        });
        let addr = match rx.recv_timeout(Duration::from_secs(20)) {
            Ok(a) => a,
            Err(_) => {
                let _ = child.kill();
                panic!("no listening line; log:\n{}", log.lock().unwrap());
            }
        };
        Mgmt { child, addr, log }
    }

    fn client(&self) -> MgmtClient {
        MgmtClient::new(&self.addr)
    }

    fn kill9(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    fn signal(&self, sig: &str) {
        let st = Command::new("kill").arg(format!("-{sig}")).arg(self.child.id().to_string()).status().unwrap();
        assert!(st.success());
    }

    fn wait_exit(&mut self, within: Duration) -> ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st;
            }
            assert!(Instant::now() < deadline, "did not exit; log:\n{}", self.log.lock().unwrap());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }
}

impl Drop for Mgmt {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

fn engine(rank: u32) -> RegisterEngine {
    RegisterEngine {
        rank,
        uuid: Uuid::from_u128(0x1000 + u128::from(rank)),
        address: format!("127.0.0.1:{}", 1 + rank),
        fault_domain: String::new(),
        targets: 2,
        target_capacity: 1 << 30,
    }
}

fn pool(name: &str) -> CreatePool {
    CreatePool { name: name.into(), ranks: vec![], default_class: None }
}

fn volume(name: &str, size: u64) -> CreateVolume {
    CreateVolume { name: name.into(), size, block_size: None, class: None, cell_size: None, chunk_size: None, checksum: None }
}

fn export(nqn: &str, volume: &str) -> CreateExport {
    CreateExport {
        nqn: nqn.into(),
        nsid: None,
        pool: "p".into(),
        volume: volume.into(),
        snapshot: None,
        hosts: vec![],
        listen: None,
        paths: Vec::new(),
    }
}

fn status<T: std::fmt::Debug>(r: Result<T, MgmtError>) -> u16 {
    match r {
        Ok(v) => panic!("accepted: {v:?}"),
        Err(e) => e.status().unwrap_or_else(|| panic!("not a refusal: {e}")),
    }
}

fn db(dir: &tempfile::TempDir) -> PathBuf {
    dir.path().join("mgmt.redb")
}

/// Raw request: status and body as JSON.
async fn raw(addr: &str, method: &str, path: &str, body: Option<&str>) -> (u16, serde_json::Value) {
    let http = reqwest::Client::new();
    let mut req = http.request(method.parse().unwrap(), format!("http://{addr}{path}"));
    if let Some(b) = body {
        req = req.header("content-type", "application/json").body(b.to_string());
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap();
    let json = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{method} {path}: body {text:?} is not JSON: {e}"));
    (status, json)
}

fn error_line(v: &serde_json::Value) -> String {
    let msg = v["error"].as_str().unwrap_or_else(|| panic!("no error field in {v}")).to_string();
    assert!(!msg.is_empty() && !msg.contains('\n'), "{msg:?}");
    msg
}

#[test]
fn pools_volumes_exports_and_error_statuses() {
    let dir = tempfile::tempdir().unwrap();
    let m = Mgmt::start(&db(&dir), &[]);
    rt().block_on(async {
        let c = m.client();
        for r in 0..3 {
            let reply = c.register_engine(&engine(r)).await.unwrap();
            assert_eq!((reply.heartbeat_interval_ms, reply.pools.len()), (1000, 0));
        }
        // Rank bound to another uuid; uuid on another rank; bad address.
        let mut other = engine(1);
        other.uuid = Uuid::from_u128(7);
        assert_eq!(status(c.register_engine(&other).await), 409);
        let mut stolen = engine(9);
        stolen.uuid = engine(0).uuid;
        assert_eq!(status(c.register_engine(&stolen).await), 409);
        let mut bad = engine(9);
        bad.address = "nowhere".into();
        assert_eq!(status(c.register_engine(&bad).await), 400);
        // Heartbeats: unknown rank 404, wrong uuid 409.
        assert_eq!(status(c.heartbeat(9, engine(9).uuid).await), 404);
        assert_eq!(status(c.heartbeat(0, engine(1).uuid).await), 409);

        let p = c.create_pool(&pool("p")).await.unwrap();
        assert_eq!((p.pool_id, p.default_class.as_str(), p.capacity, p.map.version), (1, "EC_2P1", 6 << 30, 1));
        assert_eq!(p.map.targets.len(), 6);
        assert!(p.map.targets.iter().all(|t| t.state == TargetStateName::UpIn));
        assert_eq!(c.pools().await.unwrap(), std::slice::from_ref(&p));
        assert_eq!(c.pool("p").await.unwrap(), p);
        assert_eq!(c.pool_map("p").await.unwrap(), p.map);
        assert_eq!(status(c.create_pool(&pool("p")).await), 409);
        assert_eq!(status(c.create_pool(&pool("bad name")).await), 400);
        assert_eq!(status(c.create_pool(&CreatePool { default_class: Some("EC_9".into()), ..pool("q") }).await), 400);
        assert_eq!(status(c.pool("nope").await), 404);
        assert_eq!(status(c.pool_map("nope").await), 404);
        let hb = c.heartbeat(0, engine(0).uuid).await.unwrap();
        assert_eq!((hb.pools[0].pool_id, hb.pools[0].map_version), (1, 1));

        let v = c.create_volume("p", &volume("v", 64 << 20)).await.unwrap();
        assert_eq!(
            (v.pool_id, v.size, v.block_size, v.class.as_str(), v.chunk_size, v.checksum),
            (1, 64 << 20, 4096, "EC_2P1", 1 << 20, true)
        );
        assert_eq!(c.volume("p", "v").await.unwrap(), v);
        assert_eq!(c.volumes("p").await.unwrap(), std::slice::from_ref(&v));
        assert_eq!(c.pool("p").await.unwrap().allocated, 96 << 20);
        assert_eq!(status(c.create_volume("p", &volume("v", 4096)).await), 409);
        assert_eq!(status(c.create_volume("p", &volume("w", 4095)).await), 400);
        assert_eq!(status(c.create_volume("p", &volume("w", 0)).await), 400);
        assert_eq!(status(c.create_volume("nope", &volume("w", 4096)).await), 404);
        assert_eq!(status(c.create_volume("p", &volume("w", 8 << 30)).await), 507);
        assert_eq!(status(c.create_volume("p", &CreateVolume { class: Some("EC_4P2".into()), ..volume("w", 4096) }).await), 409);
        assert_eq!(status(c.volume("p", "nope").await), 404);
        assert_eq!(status(c.volumes("nope").await), 404);

        let x = c.create_export(&export("nqn.2026-11.io.tessera:a", "v")).await.unwrap();
        assert_eq!((x.nsid, x.listen.as_str(), &x.volume), (1, "127.0.0.1:4420", &v));
        let list = c.exports().await.unwrap();
        assert_eq!(list.exports, std::slice::from_ref(&x));
        assert_eq!(status(c.create_export(&export("nqn.2026-11.io.tessera:b", "v")).await), 409);
        assert_eq!(status(c.create_export(&CreateExport { nsid: Some(1), ..export("nqn.2026-11.io.tessera:a", "w") }).await), 404);
        assert_eq!(status(c.create_export(&export("iqn.bad", "v")).await), 400);
        // Exported: cannot delete or shrink; can grow.
        assert_eq!(status(c.delete_volume("p", "v").await), 409);
        assert_eq!(status(c.resize_volume("p", "v", 4096).await), 409);
        let grown = c.resize_volume("p", "v", 128 << 20).await.unwrap();
        assert_eq!(grown.size, 128 << 20);
        assert_eq!(c.exports().await.unwrap().exports[0].volume.size, 128 << 20);
        assert_eq!(status(c.resize_volume("p", "v", 4097).await), 400);
        assert_eq!(status(c.resize_volume("p", "nope", 4096).await), 404);
        assert_eq!(status(c.delete_export("nqn.2026-11.io.tessera:a", 2).await), 404);
        assert_eq!(c.delete_export("nqn.2026-11.io.tessera:a", 1).await.unwrap().volume.uuid, v.uuid);
        assert_eq!(c.resize_volume("p", "v", 4096).await.unwrap().size, 4096);
        assert_eq!(c.delete_volume("p", "v").await.unwrap().uuid, v.uuid);
        assert_eq!(status(c.delete_volume("p", "v").await), 404);
        assert!(c.volumes("p").await.unwrap().is_empty());
        assert_eq!(c.pool("p").await.unwrap().allocated, 0);

        // Whatever axum itself rejects is an ApiError too.
        let addr = m.addr.as_str();
        let (s, b) = raw(addr, "POST", "/v1/pools", Some("{not json")).await;
        assert_eq!(s, 400);
        assert!(error_line(&b).contains("invalid JSON"));
        let (s, b) = raw(addr, "POST", "/v1/pools", Some(r#"{"name":"q","colour":"red"}"#)).await;
        assert_eq!(s, 400);
        assert!(error_line(&b).contains("unknown field colour"), "{b}");
        let (s, b) = raw(addr, "POST", "/v1/pools", Some(r#"{"ranks":[]}"#)).await;
        assert_eq!(s, 400);
        assert!(error_line(&b).contains("missing field `name`"), "{b}");
        let (s, b) = raw(addr, "GET", "/v1/nothing", None).await;
        assert_eq!(s, 404);
        error_line(&b);
        let (s, b) = raw(addr, "PUT", "/v1/pools", None).await;
        assert_eq!(s, 405);
        error_line(&b);
        let (s, b) = raw(addr, "POST", "/v1/engines/abc/heartbeat", Some(&format!(r#"{{"uuid":"{}"}}"#, engine(0).uuid))).await;
        assert_eq!(s, 400);
        assert!(error_line(&b).contains("rank"));
        let (s, b) = raw(addr, "GET", "/v1/exports?after=x", None).await;
        assert_eq!(s, 400);
        error_line(&b);
        let (s, b) = raw(addr, "DELETE", "/v1/exports/nqn.x/notanumber", None).await;
        assert_eq!(s, 400);
        error_line(&b);
        let (s, b) = raw(addr, "GET", "/v1/system", None).await;
        assert_eq!(s, 200);
        let sys: SystemInfo = serde_json::from_value(b).unwrap();
        assert_eq!(sys.engines.len(), 3);
    });
}

/// Heartbeats `ranks` every 50 ms until the returned guard is dropped.
fn keep_alive(c: MgmtClient, ranks: Vec<u32>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            for &r in &ranks {
                let _ = c.heartbeat(r, engine(r).uuid).await;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
}

async fn wait_until<F: std::future::Future<Output = bool>>(what: &str, within: Duration, mut f: impl FnMut() -> F) {
    let deadline = Instant::now() + within;
    while !f().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[test]
fn silent_engine_goes_down_with_its_targets_and_with_manual_reintegration_stays_down_after_reregistering() {
    let dir = tempfile::tempdir().unwrap();
    let m = Mgmt::start(&db(&dir), &["--heartbeat-timeout", "300ms", "--heartbeat-interval", "100ms", "--manual-reintegration"]);
    rt().block_on(async {
        let c = m.client();
        for r in 0..3 {
            assert_eq!(c.register_engine(&engine(r)).await.unwrap().heartbeat_interval_ms, 100);
        }
        c.create_pool(&pool("p")).await.unwrap();
        c.create_pool(&CreatePool { ranks: vec![0, 1], default_class: Some("S1".into()), ..pool("q") }).await.unwrap();
        let alive = keep_alive(c.clone(), vec![0, 1]);
        let started = Instant::now();
        wait_until("rank 2 down", Duration::from_secs(5), || async {
            c.system().await.unwrap().engines.iter().any(|e| e.rank == 2 && e.state == EngineState::Down)
        })
        .await;
        let took = started.elapsed();
        assert!(took >= Duration::from_millis(250), "marked down after only {took:?}");
        let sys = c.system().await.unwrap();
        assert_eq!(sys.heartbeat_timeout_ms, 300);
        assert!(sys.engines.iter().filter(|e| e.rank != 2).all(|e| e.state == EngineState::Up), "{sys:?}");
        let map = c.pool_map("p").await.unwrap();
        assert_eq!(map.version, 2);
        for t in &map.targets {
            let want = if t.rank == 2 { (TargetStateName::Down, 2) } else { (TargetStateName::UpIn, 0) };
            assert_eq!((t.state, t.fseq), want, "{t:?}");
        }
        // Pool q has no target on rank 2: untouched.
        assert_eq!(c.pool_map("q").await.unwrap().version, 1);
        let hb = c.heartbeat(0, engine(0).uuid).await.unwrap();
        assert_eq!(hb.pools.iter().map(|p| (p.pool_id, p.map_version)).collect::<Vec<_>>(), [(1, 2), (2, 1)]);
        // The down engine's heartbeat is refused (404: register again); it re-registers Up, its
        // targets stay DOWN, no new map version.
        assert_eq!(status(c.heartbeat(2, engine(2).uuid).await), 404);
        let reply = c.register_engine(&engine(2)).await.unwrap();
        assert_eq!(reply.pools.iter().map(|p| (p.pool_id, p.map_version)).collect::<Vec<_>>(), [(1, 2)]);
        let sys = c.system().await.unwrap();
        assert!(sys.engines.iter().all(|e| e.state == EngineState::Up), "{sys:?}");
        let map = c.pool_map("p").await.unwrap();
        assert_eq!(map.version, 2);
        assert!(map.targets.iter().filter(|t| t.rank == 2).all(|t| t.state == TargetStateName::Down && t.fseq == 2));
        // A new pool only takes Up engines' targets, including the re-registered one's.
        let r = c.create_pool(&CreatePool { default_class: Some("S1".into()), ..pool("r") }).await.unwrap();
        assert_eq!(r.map.targets.len(), 6);
        alive.abort();
    });
    assert!(m.log().contains("engine missed its heartbeats"), "{}", m.log());
}

#[test]
fn long_poll_wakes_on_change_and_times_out_otherwise() {
    let dir = tempfile::tempdir().unwrap();
    let m = Mgmt::start(&db(&dir), &[]);
    rt().block_on(async {
        let c = m.client();
        for r in 0..3 {
            c.register_engine(&engine(r)).await.unwrap();
        }
        c.create_pool(&pool("p")).await.unwrap();
        c.create_volume("p", &volume("v", 1 << 20)).await.unwrap();
        let now = c.exports().await.unwrap();
        assert!(now.exports.is_empty());
        // Nothing changes: answers after the wait with the same version.
        let t = Instant::now();
        let same = c.wait_exports(now.version, Duration::from_millis(400)).await.unwrap();
        assert!(t.elapsed() >= Duration::from_millis(380), "{:?}", t.elapsed());
        assert_eq!(same, now);
        // A version already passed answers at once.
        let t = Instant::now();
        c.wait_exports(now.version - 1, Duration::from_secs(30)).await.unwrap();
        assert!(t.elapsed() < Duration::from_secs(5));
        // A change wakes the poll long before its wait.
        let poller = {
            let c = c.clone();
            tokio::spawn(async move {
                let t = Instant::now();
                (c.wait_exports(now.version, Duration::from_secs(30)).await.unwrap(), t.elapsed())
            })
        };
        tokio::time::sleep(Duration::from_millis(300)).await;
        c.create_export(&export("nqn.2026-11.io.tessera:lp", "v")).await.unwrap();
        let (list, took): (ExportList, Duration) = poller.await.unwrap();
        assert!(took < Duration::from_secs(10), "{took:?}");
        assert!(took >= Duration::from_millis(250), "{took:?}");
        assert_eq!(list.version, now.version + 1);
        assert_eq!(list.exports.len(), 1);
        assert_eq!(list.exports[0].volume.name, "v");
    });
}

fn done(rank: u32, version: u32, bytes: u64) -> EngineReport {
    EngineReport {
        uuid: engine(rank).uuid,
        rebuild: RebuildProgress {
            map_version: version,
            state: EngineRebuildState::Done,
            objects_total: 1,
            objects_done: 1,
            dkeys_total: 2,
            dkeys_done: 2,
            bytes_total: bytes,
            bytes_done: bytes,
            attempt: 1,
            last_error: None,
        },
        scrub: ScrubCounters { scrubbed: 1, ..Default::default() },
    }
}

fn sel(rank: u32, target: Option<u16>) -> TargetSelector {
    TargetSelector { rank, target }
}

fn state_of(p: &PoolInfo, rank: u32, index: u16) -> (TargetStateName, u64, bool) {
    let t = p.map.targets.iter().find(|t| t.rank == rank && t.index == index).unwrap();
    (t.state, t.since_epoch, t.drained)
}

#[test]
fn exclude_reports_rebuild_drain_reintegrate_and_replacement() {
    let dir = tempfile::tempdir().unwrap();
    let m = Mgmt::start(&db(&dir), &["--heartbeat-timeout", "600ms", "--heartbeat-interval", "100ms"]);
    rt().block_on(async {
        let c = m.client();
        for r in 0..3 {
            c.register_engine(&engine(r)).await.unwrap();
        }
        let alive = keep_alive(c.clone(), vec![0, 1, 2]);
        let p = c.create_pool(&pool("p")).await.unwrap();
        assert_eq!((p.map.base_version, &p.map.base_targets), (1, &p.map.targets));
        assert_eq!(p.rebuild.state, RebuildState::Idle);
        c.create_volume("p", &volume("v", 1 << 20)).await.unwrap();

        // Exclude one target: DOWN with a floor about 30 s back, rebuild running.
        let now_ns = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64;
        let p = c.exclude("p", &sel(2, Some(0))).await.unwrap();
        assert_eq!(p.map.version, 2);
        let (st, since, drained) = state_of(&p, 2, 0);
        assert_eq!((st, drained), (TargetStateName::Down, false));
        let lag = now_ns.saturating_sub(since);
        assert!(lag > 29_000_000_000 && lag < 40_000_000_000, "floor {since} is {lag} ns before now");
        assert_eq!(since & 0xffff, 0);
        assert_eq!((p.map.base_version, p.map.base_targets.iter().all(|t| t.state == TargetStateName::UpIn)), (1, true));
        assert_eq!(
            (p.rebuild.state, p.rebuild.map_version, p.rebuild.targets_down, p.rebuild.engines_total),
            (RebuildState::Running, 2, 1, 3)
        );
        let (s, b) = raw(&m.addr, "GET", "/v1/pools/p", None).await;
        assert_eq!((s, b["rebuild"]["state"].as_str()), (200, Some("running")));

        // Refusals, each one line.
        let addr = m.addr.as_str();
        for (path, body, want) in [
            ("/v1/pools/p/exclude", r#"{"rank":2,"target":0}"#, 409),
            ("/v1/pools/p/exclude", r#"{"rank":9}"#, 404),
            ("/v1/pools/p/exclude", r#"{"rank":2,"target":7}"#, 404),
            ("/v1/pools/nope/exclude", r#"{"rank":2}"#, 404),
            ("/v1/pools/p/exclude", r#"{"rank":"x"}"#, 400),
            ("/v1/pools/p/drain", r#"{"rank":2,"colour":1}"#, 400),
            ("/v1/pools/p/drain", r#"{"rank":2,"target":0}"#, 409),
            ("/v1/pools/p/reintegrate", r#"{"rank":1}"#, 409),
            ("/v1/pools/p/engines/x/report", "{}", 400),
            ("/v1/pools/p/engines/0/report", r#"{"uuid":"00000000-0000-0000-0000-000000000007"}"#, 400),
        ] {
            let (s, b) = raw(addr, "POST", path, Some(body)).await;
            assert_eq!(s, want, "{path} {body}: {b}");
            error_line(&b);
        }
        let mut wrong = done(0, 2, 0);
        wrong.uuid = engine(1).uuid;
        assert_eq!(status(c.report("p", 0, &wrong).await), 409);
        assert_eq!(status(c.report("p", 7, &done(7, 2, 0)).await), 404);

        // Every engine with an UPIN target reports done: DOWN -> DOWNOUT, the new base.
        c.report("p", 0, &done(0, 2, 1000)).await.unwrap();
        c.report("p", 1, &done(1, 2, 2000)).await.unwrap();
        let p = c.pool("p").await.unwrap();
        assert_eq!((p.map.version, p.rebuild.engines_done, p.rebuild.bytes_done), (2, 2, 3000));
        c.report("p", 2, &done(2, 2, 0)).await.unwrap();
        let p = c.pool("p").await.unwrap();
        assert_eq!((p.map.version, p.map.base_version), (3, 3));
        assert_eq!(state_of(&p, 2, 0), (TargetStateName::DownOut, since, false));
        assert_eq!((p.rebuild.state, p.rebuild.completed, p.rebuild.map_version), (RebuildState::Idle, 1, 2));
        assert_eq!(p.scrub.scrubbed, 3);
        assert_eq!(c.pools().await.unwrap()[0].rebuild, p.rebuild);

        // Reintegrate it (UP, floor kept) and drain another (DOWN, drained).
        let p = c.reintegrate("p", &sel(2, Some(0))).await.unwrap();
        assert_eq!((p.map.version, state_of(&p, 2, 0)), (4, (TargetStateName::Up, since, false)));
        let p = c.drain("p", &sel(1, Some(1))).await.unwrap();
        assert_eq!((p.map.version, state_of(&p, 1, 1)), (5, (TargetStateName::Down, 0, true)));
        assert_eq!((p.rebuild.targets_up, p.rebuild.targets_down), (1, 1));
        for r in 0..3 {
            c.report("p", r, &done(r, 5, 10)).await.unwrap();
        }
        let p = c.pool("p").await.unwrap();
        assert_eq!(p.map.version, 6);
        assert_eq!(state_of(&p, 2, 0), (TargetStateName::UpIn, 0, false));
        assert_eq!(state_of(&p, 1, 1), (TargetStateName::DownOut, 0, true));
        assert_eq!(p.rebuild.completed, 2);

        // Rank 2 dies and a replacement (new uuid, empty data) takes its rank: its targets come
        // back UP, from scratch.
        alive.abort();
        let alive = keep_alive(c.clone(), vec![0, 1]);
        wait_until("rank 2 down", Duration::from_secs(5), || async {
            c.system().await.unwrap().engines.iter().any(|e| e.rank == 2 && e.state == EngineState::Down)
        })
        .await;
        let p = c.pool("p").await.unwrap();
        assert_eq!((p.map.version, state_of(&p, 2, 1).0), (7, TargetStateName::Down));
        let reply = c.register_engine(&RegisterEngine { uuid: Uuid::from_u128(0xBEEF), ..engine(2) }).await.unwrap();
        assert_eq!(reply.pools[0].map_version, 8);
        let p = c.pool("p").await.unwrap();
        assert_eq!((state_of(&p, 2, 0), state_of(&p, 2, 1)), ((TargetStateName::Up, 0, false), (TargetStateName::Up, 0, false)));
        assert_eq!(p.rebuild.state, RebuildState::Running);
        alive.abort();
    });
    let log = m.log();
    assert!(log.contains("rebuild started") && log.contains("rebuild complete"), "{log}");
    assert!(log.contains("replacement engine"), "{log}");
}

fn comparable(mut s: SystemInfo) -> SystemInfo {
    for e in &mut s.engines {
        e.last_heartbeat_ms = None;
    }
    s
}

#[test]
fn kill_9_and_restart_keeps_everything_and_gives_engines_a_grace_period() {
    let dir = tempfile::tempdir().unwrap();
    let path = db(&dir);
    let m = Mgmt::start(&path, &["--heartbeat-timeout", "300ms"]);
    let rt = rt();
    let (sys, pools, volumes, exports): (SystemInfo, Vec<PoolInfo>, _, ExportList) = rt.block_on(async {
        let c = m.client();
        for r in 0..4 {
            c.register_engine(&engine(r)).await.unwrap();
        }
        let alive = keep_alive(c.clone(), vec![0, 1, 2]);
        c.create_pool(&pool("p")).await.unwrap();
        c.create_volume("p", &volume("v", 1 << 20)).await.unwrap();
        c.create_volume("p", &CreateVolume { class: Some("RP_2".into()), block_size: Some(512), ..volume("w", 1 << 20) }).await.unwrap();
        c.create_export(&CreateExport { hosts: vec!["nqn.2026-11.io.host:h".into()], ..export("nqn.2026-11.io.tessera:k", "w") })
            .await
            .unwrap();
        // Rank 3 goes silent: down, with a new pool map version, before the crash.
        wait_until("rank 3 down", Duration::from_secs(5), || async { c.pool_map("p").await.unwrap().version == 2 }).await;
        alive.abort();
        (c.system().await.unwrap(), c.pools().await.unwrap(), c.volumes("p").await.unwrap(), c.exports().await.unwrap())
    });
    m.kill9();

    let m = Mgmt::start(&path, &["--heartbeat-timeout", "1s"]);
    rt.block_on(async {
        let c = m.client();
        // Everything is there, at the same version.
        let sys2 = c.system().await.unwrap();
        assert_eq!(sys2.version, sys.version);
        assert!(sys2.engines.iter().all(|e| e.last_heartbeat_ms.is_none()), "{sys2:?}");
        assert_eq!(comparable(sys2).engines, comparable(sys.clone()).engines);
        assert_eq!(c.pools().await.unwrap(), pools);
        assert_eq!(c.volumes("p").await.unwrap(), volumes);
        assert_eq!(c.exports().await.unwrap(), exports);
        // Grace: engines 0..3 (Up before the crash) are not down right after the restart.
        let st = |sys: &SystemInfo, r: u32| sys.engines.iter().find(|e| e.rank == r).unwrap().state;
        let now = c.system().await.unwrap();
        assert_eq!(
            [st(&now, 0), st(&now, 1), st(&now, 2), st(&now, 3)],
            [EngineState::Up, EngineState::Up, EngineState::Up, EngineState::Down]
        );
        // Rank 0 heartbeats; the others stay silent and go down after the timeout.
        let alive = keep_alive(c.clone(), vec![0]);
        tokio::time::sleep(Duration::from_millis(500)).await;
        let mid = c.system().await.unwrap();
        assert_eq!(st(&mid, 1), EngineState::Up, "went down within the grace period");
        wait_until("ranks 1 and 2 down", Duration::from_secs(5), || async {
            let s = c.system().await.unwrap();
            st(&s, 1) == EngineState::Down && st(&s, 2) == EngineState::Down
        })
        .await;
        assert_eq!(st(&c.system().await.unwrap(), 0), EngineState::Up);
        alive.abort();
        // Pool ids continue after the restart.
        let q = c.create_pool(&CreatePool { default_class: Some("S1".into()), ..pool("q") }).await.unwrap();
        assert_eq!(q.pool_id, 2);
    });
}

#[test]
fn sigterm_exits_cleanly_even_with_a_long_poll_in_flight() {
    let dir = tempfile::tempdir().unwrap();
    let mut m = Mgmt::start(&db(&dir), &[]);
    let rt = rt();
    let c = m.client();
    let poll = rt.spawn(async move { c.wait_exports(0, Duration::from_secs(60)).await });
    std::thread::sleep(Duration::from_millis(300));
    m.signal("TERM");
    let st = m.wait_exit(Duration::from_secs(10));
    assert_eq!(st.code(), Some(0), "log:\n{}", m.log());
    // The poll was answered, not cut off.
    let list = rt.block_on(poll).unwrap().unwrap();
    assert_eq!(list.version, 0);

    let mut m = Mgmt::start(&db(&dir), &[]);
    m.signal("INT");
    assert_eq!(m.wait_exit(Duration::from_secs(10)).code(), Some(0));
}

#[test]
fn a_second_instance_on_the_same_database_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let _first = Mgmt::start(&db(&dir), &[]);
    let out = Command::new(BIN).args(["--listen", "127.0.0.1:0", "--db"]).arg(db(&dir)).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("in use by another process"), "{err}");
}

#[test]
fn bad_arguments_exit_2_with_one_line() {
    for args in [&["--heartbeat-timeout", "5x"][..], &["--bogus"], &["--heartbeat-interval", "0s"], &["--listen"]] {
        let out = Command::new(BIN).args(args).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(err.trim_end().lines().count(), 1, "{args:?}: {err}");
        assert!(err.starts_with("tessera-mgmt: "), "{err}");
    }
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(BIN).args(["--listen", "not-an-address", "--db"]).arg(db(&dir)).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot listen on not-an-address"));
}

/// (pool, map version, target, object) of every Punch a fake engine received.
type Punches = Arc<Mutex<Vec<(u32, u32, u16, u128)>>>;

/// A fake engine that records every Punch it gets.
async fn fake_engine() -> (String, Punches) {
    use tessera_engine_proto::{decode_frame, encode_reply, FrameLimits, Opcode, Reply, Request};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let seen: Punches = Arc::default();
    let seen2 = seen.clone();
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            let seen = seen2.clone();
            tokio::spawn(async move {
                let mut buf = bytes::BytesMut::new();
                loop {
                    while let Some(frame) = decode_frame(&mut buf, &FrameLimits::default()).unwrap() {
                        let h = frame.header;
                        if let Request::Punch(p) = Request::decode(&frame).unwrap() {
                            seen.lock().unwrap().push((h.pool, h.map_version, h.target, p.obj.0));
                        }
                        let reply = encode_reply(h.request_id, Opcode::Punch, h.map_version, h.target, &Ok(Reply::Punched));
                        sock.write_all(&reply.to_bytes()).await.unwrap();
                    }
                    if sock.read_buf(&mut buf).await.unwrap_or(0) == 0 {
                        return;
                    }
                }
            });
        }
    });
    (addr, seen)
}

#[test]
fn deleting_a_volume_punches_its_data_on_the_pools_up_targets() {
    let dir = tempfile::tempdir().unwrap();
    let m = Mgmt::start(&db(&dir), &["--heartbeat-timeout", "300ms"]);
    rt().block_on(async {
        let c = m.client();
        let (addr, seen) = fake_engine().await;
        // Ranks 0 and 1 are the fake engine; rank 2 goes silent and DOWN first.
        for r in 0..3 {
            c.register_engine(&RegisterEngine { address: addr.clone(), ..engine(r) }).await.unwrap();
        }
        c.create_pool(&CreatePool { default_class: Some("RP_2".into()), ..pool("p") }).await.unwrap();
        let v = c.create_volume("p", &volume("v", 1 << 20)).await.unwrap();
        let alive = keep_alive(c.clone(), vec![0, 1]);
        wait_until("rank 2 down", Duration::from_secs(5), || async { c.pool_map("p").await.unwrap().version == 2 }).await;
        c.delete_volume("p", "v").await.unwrap();
        wait_until("4 punches", Duration::from_secs(5), || async { seen.lock().unwrap().len() >= 4 }).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        alive.abort();
        let mut got = seen.lock().unwrap().clone();
        got.sort();
        // Both targets of ranks 0 and 1 (one fake engine answers for both); none for DOWN rank 2.
        let o = v.uuid.as_u128();
        assert_eq!(got, [(1, 2, 0, o), (1, 2, 0, o), (1, 2, 1, o), (1, 2, 1, o)]);
    });
}
