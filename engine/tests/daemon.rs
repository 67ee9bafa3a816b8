//! The real `tessera-engine` process over real TCP: every RPC, `kill -9` mid-stream with every
//! acknowledged update surviving, graceful SIGTERM, malformed frames, corruption of each file
//! kind, out of space, and bounded space under overwrites.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)] // test helpers panic on failure by design

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tessera_client::rpc::{ConnectionOptions, EngineConnection, RpcError};
use tessera_engine_proto::{
    ContainerId, Discard, EnumTarget, Enumerate, Fetch, FetchReply, FetchValue, ObjectId, Punch, PunchTarget, Reply, Request, RpcStatus,
    SetRetention, TargetHealth, Update, UpdateValue,
};

const CONT: ContainerId = ContainerId(0xc0de);

/// A running engine process and the stderr lines it has printed.
struct EngineProc {
    child: Child,
    addr: SocketAddr,
    log: Arc<Mutex<Vec<String>>>,
}

fn write_config(dir: &Path, capacity: &str, targets: u16) -> PathBuf {
    write_config_with(dir, capacity, targets, "")
}

/// A configuration with `tuning` as the lines of its `[tuning]` table. These tests write at
/// small literal epochs, not clock readings, so the commit window is off unless `tuning` sets it.
fn write_config_with(dir: &Path, capacity: &str, targets: u16, tuning: &str) -> PathBuf {
    let cfg = dir.join("engine.toml");
    let window = if tuning.contains("commit_window_ms") { "" } else { "commit_window_ms = 0\n" };
    let text = format!(
        "rank = 1\nlisten = \"127.0.0.1:0\"\ndata_dir = \"{}\"\ntargets = {targets}\ntarget_capacity = \"{capacity}\"\n[tuning]\n{window}{tuning}",
        dir.join("data").display()
    );
    std::fs::write(&cfg, text).unwrap();
    cfg
}

impl EngineProc {
    /// Starts the engine; `Err` carries its stderr when it exits instead of listening.
    fn try_start(config: &Path) -> Result<EngineProc, String> {
        let mut child = Command::new(env!("CARGO_BIN_EXE_tessera-engine"))
            .arg("--config")
            .arg(config)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let log2 = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(addr) = line.split("addr=").nth(1).and_then(|s| s.split_whitespace().next()) {
                    let _ = tx.send(addr.parse::<SocketAddr>().ok());
                }
                log2.lock().unwrap().push(line);
            }
            let _ = tx.send(None);
        });
        match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(Some(addr)) => Ok(EngineProc { child, addr, log }),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                std::thread::sleep(Duration::from_millis(100));
                Err(log.lock().unwrap().join("\n"))
            }
        }
    }

    fn start(config: &Path) -> EngineProc {
        Self::try_start(config).unwrap_or_else(|log| panic!("engine did not start:\n{log}"))
    }

    fn kill9(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// SIGTERM, then the exit status.
    fn terminate(mut self) -> std::process::ExitStatus {
        Command::new("kill").arg("-TERM").arg(self.child.id().to_string()).status().unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "engine ignored SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn log_contains(&self, needle: &str) -> bool {
        self.log.lock().unwrap().iter().any(|l| l.contains(needle))
    }
}

impl Drop for EngineProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

async fn connect(addr: SocketAddr) -> EngineConnection {
    EngineConnection::connect(addr, ConnectionOptions::default()).await.unwrap()
}

fn key(s: &str) -> Bytes {
    Bytes::copy_from_slice(s.as_bytes())
}

fn update(obj: u128, akey: &str, epoch: u64, offset: u64, data: Bytes) -> Request {
    Request::Update(Update {
        cont: CONT,
        obj: ObjectId(obj),
        epoch,
        dkey: key("d"),
        akey: key(akey),
        value: UpdateValue::array(offset, data),
    })
}

fn fetch(obj: u128, akey: &str, epoch: u64, offset: u64, len: u32) -> Request {
    Request::Fetch(Fetch {
        cont: CONT,
        obj: ObjectId(obj),
        epoch,
        dkey: key("d"),
        akey: key(akey),
        what: FetchValue::Array { offset, len },
    })
}

async fn fetch_array(c: &EngineConnection, target: u16, req: Request) -> Result<(Bytes, Vec<(u32, u32)>), RpcError> {
    match c.call(target, req).await? {
        Reply::Fetched(FetchReply::Array { data, holes, csums, .. }) => {
            assert_eq!(csums, tessera_engine_proto::chunk_csums(&data), "reply checksums must match reply data");
            Ok((data, holes))
        }
        other => panic!("unexpected reply {other:?}"),
    }
}

fn remote_status(r: Result<Reply, RpcError>) -> RpcStatus {
    match r {
        Err(RpcError::Remote { status, .. }) => status,
        other => panic!("expected an error reply, got {other:?}"),
    }
}

fn pattern(i: u64, len: usize) -> Bytes {
    Bytes::from((0..len).map(|j| (i as usize * 31 + j / 7) as u8).collect::<Vec<u8>>())
}

#[test]
fn every_rpc_against_the_real_daemon() {
    let dir = tempfile::tempdir().unwrap();
    let engine = EngineProc::start(&write_config(dir.path(), "64MiB", 2));
    rt().block_on(async {
        let c = connect(engine.addr).await;
        match c.call(0, Request::Ping).await.unwrap() {
            Reply::Pong { rank, targets, .. } => assert_eq!((rank, targets), (1, 2)),
            r => panic!("{r:?}"),
        }
        let data = pattern(1, 10_000);
        assert_eq!(c.call(1, update(7, "a", 10, 4096, data.clone())).await.unwrap(), Reply::Updated);
        let (got, holes) = fetch_array(&c, 1, fetch(7, "a", 10, 0, 16384)).await.unwrap();
        assert_eq!(&got[4096..14096], &data[..]);
        assert_eq!(holes, vec![(0, 4096), (14096, 16384 - 14096)]);
        // Older epoch: nothing. Other target: nothing (targets are separate shards).
        assert_eq!(fetch_array(&c, 1, fetch(7, "a", 9, 4096, 100)).await.unwrap().1, vec![(0, 100)]);
        assert_eq!(fetch_array(&c, 0, fetch(7, "a", 10, 4096, 100)).await.unwrap().1, vec![(0, 100)]);
        // Range punch at a later epoch.
        let punch = Request::Punch(Punch {
            cont: CONT,
            obj: ObjectId(7),
            epoch: 11,
            what: PunchTarget::Range { dkey: key("d"), akey: key("a"), offset: 5000, len: 1000 },
        });
        assert_eq!(c.call(1, punch).await.unwrap(), Reply::Punched);
        let (got, holes) = fetch_array(&c, 1, fetch(7, "a", 11, 4096, 4096)).await.unwrap();
        assert_eq!(holes, vec![(904, 1000)]);
        assert!(got[904..1904].iter().all(|b| *b == 0));
        // Single values.
        let single = Request::Update(Update {
            cont: CONT,
            obj: ObjectId(7),
            epoch: 12,
            dkey: key("d"),
            akey: key("meta"),
            value: UpdateValue::single(key("hello")),
        });
        c.call(1, single).await.unwrap();
        let f =
            Request::Fetch(Fetch { cont: CONT, obj: ObjectId(7), epoch: 12, dkey: key("d"), akey: key("meta"), what: FetchValue::Single });
        match c.call(1, f).await.unwrap() {
            Reply::Fetched(FetchReply::Single { value: Some(v) }) => assert_eq!((v.data, v.epoch), (key("hello"), 12)),
            r => panic!("{r:?}"),
        }
        // Enumeration, paged.
        for obj in 100..105u128 {
            c.call(1, update(obj, "a", 20, 0, pattern(obj as u64, 10))).await.unwrap();
        }
        let mut seen = Vec::new();
        let mut anchor = None;
        loop {
            let e = Request::Enumerate(Enumerate { cont: CONT, epoch: 20, what: EnumTarget::Objects, anchor: anchor.clone(), max: 2 });
            let Reply::Enumerated { keys, next } = c.call(1, e).await.unwrap() else { panic!() };
            seen.extend(keys.iter().map(|k| u128::from_be_bytes(k[..].try_into().unwrap())));
            if next.is_none() {
                break;
            }
            anchor = next;
        }
        assert_eq!(seen, vec![7, 100, 101, 102, 103, 104]);
        let e =
            Request::Enumerate(Enumerate { cont: CONT, epoch: 20, what: EnumTarget::Akeys(ObjectId(7), key("d")), anchor: None, max: 10 });
        assert_eq!(c.call(1, e).await.unwrap(), Reply::Enumerated { keys: vec![key("a"), key("meta")], next: None });
        // Dkeys changed since an epoch (the range punch at 11 and the single value at 12), then
        // a discard of everything above epoch 10: the punch is deleted, so the data of epoch 10
        // reads whole again.
        let since = |since| {
            Request::Enumerate(Enumerate { cont: CONT, epoch: 20, what: EnumTarget::DkeysSince(ObjectId(7), since), anchor: None, max: 10 })
        };
        assert_eq!(c.call(1, since(10)).await.unwrap(), Reply::Enumerated { keys: vec![key("d")], next: None });
        assert_eq!(c.call(1, since(12)).await.unwrap(), Reply::Enumerated { keys: vec![], next: None });
        let discard = Request::Discard(Discard { cont: CONT, obj: ObjectId(7), above: 10, below: u64::MAX, dkey: None });
        assert_eq!(c.call(1, discard.clone()).await.unwrap(), Reply::Discarded { versions: 2 });
        let (got, holes) = fetch_array(&c, 1, fetch(7, "a", 20, 4096, 10_000)).await.unwrap();
        assert_eq!((got, holes), (data.clone(), vec![]));
        assert_eq!(c.call(1, discard).await.unwrap(), Reply::Discarded { versions: 0 });
        assert_eq!(c.call(1, since(10)).await.unwrap(), Reply::Enumerated { keys: vec![], next: None });
        // Query and retention.
        match c.call(1, Request::QueryTarget).await.unwrap() {
            Reply::TargetInfo(i) => {
                assert_eq!(i.capacity, 64 << 20);
                assert!(i.used >= 12288, "{i:?}");
                assert_eq!(i.state, TargetHealth::Healthy);
                assert_eq!(i.objects, 6);
            }
            r => panic!("{r:?}"),
        }
        let sr = Request::SetRetention(SetRetention { cont: CONT, aggregate_below: 5, retained: vec![3] });
        assert_eq!(c.call(0, sr).await.unwrap(), Reply::RetentionSet);
        // Errors: a corrupt payload, a bad target, a stale map version, a too-large fetch.
        let mut bad = update(8, "a", 30, 0, pattern(3, 4096));
        if let Request::Update(Update { value: UpdateValue::Array { csums, .. }, .. }) = &mut bad {
            csums[0] ^= 1;
        }
        assert_eq!(remote_status(c.call(1, bad).await), RpcStatus::ChecksumMismatch);
        assert_eq!(remote_status(c.call(9, Request::QueryTarget).await), RpcStatus::NoSuchTarget);
        let newer = EngineConnection::connect(engine.addr, ConnectionOptions { map_version: 5, ..Default::default() }).await.unwrap();
        newer.call(0, Request::Ping).await.unwrap();
        assert_eq!(remote_status(c.call(0, Request::QueryTarget).await), RpcStatus::StaleMapVersion);
        c.set_map_version(5);
        c.call(0, Request::QueryTarget).await.unwrap();
        // Nothing that failed was applied.
        assert_eq!(fetch_array(&c, 1, fetch(8, "a", 30, 0, 4096)).await.unwrap().1, vec![(0, 4096)]);
    });
    assert!(!engine.log_contains("panicked"));
}

/// The commit window at its default: a host update whose epoch is older than the window is
/// refused with `EpochTooOld` and stores nothing; the same update marked background (what a
/// rebuild sends: versions at their original epochs) is taken; a host punch is held to the
/// window too.
#[test]
fn host_writes_older_than_the_commit_window_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config_with(dir.path(), "64MiB", 1, "commit_window_ms = 2000\n");
    let engine = EngineProc::start(&cfg);
    rt().block_on(async {
        let c = connect(engine.addr).await;
        let now = tessera_client::hlc::now();
        let old = now - 10_000_000_000;
        let e = c.call(0, update(7, "a", old, 0, pattern(1, 4096))).await.unwrap_err();
        assert!(matches!(&e, RpcError::Remote { status: RpcStatus::EpochTooOld, message } if message.contains("commit window")), "{e}");
        let (data, holes) = fetch_array(&c, 0, fetch(7, "a", now, 0, 4096)).await.unwrap();
        assert_eq!(holes, vec![(0, 4096)], "a refused update stores nothing");
        assert!(data.iter().all(|b| *b == 0));
        c.call(0, update(7, "a", now, 0, pattern(2, 4096))).await.unwrap();
        let punch = Request::Punch(Punch { cont: CONT, obj: ObjectId(7), epoch: old, what: PunchTarget::Object });
        assert_eq!(remote_status(c.call(0, punch).await), RpcStatus::EpochTooOld);
        let bg =
            EngineConnection::connect(engine.addr, ConnectionOptions { background: true, ..ConnectionOptions::default() }).await.unwrap();
        bg.call(0, update(7, "b", old, 0, pattern(3, 4096))).await.unwrap();
        let (data, _) = fetch_array(&c, 0, fetch(7, "b", now, 0, 4096)).await.unwrap();
        assert_eq!(data, pattern(3, 4096));
    });
}

#[test]
fn kill_9_mid_stream_keeps_every_acknowledged_update() {
    let dir = tempfile::tempdir().unwrap();
    // Small WAL segments: background checkpoints and WAL removal run while updates stream.
    let cfg = write_config_with(dir.path(), "256MiB", 2, "checkpoint_wal = \"16KiB\"\n");
    let engine = EngineProc::start(&cfg);
    let acked: Arc<Mutex<Vec<u64>>> = Arc::new(Mutex::new(Vec::new()));
    let sent = rt().block_on(async {
        let c = connect(engine.addr).await;
        let next = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let mut tasks = Vec::new();
        for _ in 0..32 {
            let (c, next, acked) = (c.clone(), next.clone(), acked.clone());
            tasks.push(tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let len = if i % 5 == 0 { 128 * 1024 } else { 4096 };
                    let req = update(1, "blocks", 100 + i, i * 128 * 1024, pattern(i, len));
                    match c.call((i % 2) as u16, req).await {
                        Ok(_) => acked.lock().unwrap().push(i),
                        Err(_) => return,
                    }
                }
            }));
        }
        // Let updates stream, then pull the plug while requests are in flight.
        while acked.lock().unwrap().len() < 1500 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        engine.kill9();
        for t in tasks {
            let _ = t.await;
        }
        next.load(std::sync::atomic::Ordering::Relaxed)
    });
    let acked = acked.lock().unwrap().clone();
    let ckpts = std::fs::read_dir(dir.path().join("data/target-0"))
        .unwrap()
        .filter(|e| e.as_ref().unwrap().file_name().to_str().unwrap().starts_with("ckpt-"));
    assert!(ckpts.count() >= 1, "no checkpoint was written while updates streamed");
    let restarted = EngineProc::start(&cfg);
    rt().block_on(async {
        let c = connect(restarted.addr).await;
        let acked_set: std::collections::HashSet<u64> = acked.iter().copied().collect();
        let mut unacked_present = 0;
        for i in 0..sent {
            let len = if i % 5 == 0 { 128 * 1024 } else { 4096 };
            let (data, holes) = fetch_array(&c, (i % 2) as u16, fetch(1, "blocks", u64::MAX, i * 128 * 1024, len as u32)).await.unwrap();
            if acked_set.contains(&i) {
                assert!(holes.is_empty() && data == pattern(i, len), "acknowledged update {i} lost or damaged after kill -9");
            } else if holes.is_empty() {
                assert_eq!(data, pattern(i, len), "unacknowledged update {i} half-written");
                unacked_present += 1;
            } else {
                assert_eq!(holes, vec![(0, len as u32)], "unacknowledged update {i} partly present");
            }
        }
        eprintln!(
            "{} acknowledged updates verified; {} of {} unacknowledged ones had become durable",
            acked.len(),
            unacked_present,
            sent - acked.len() as u64
        );
    });
}

#[test]
fn sigterm_checkpoints_and_restart_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), "64MiB", 1);
    let engine = EngineProc::start(&cfg);
    rt().block_on(async {
        let c = connect(engine.addr).await;
        for i in 0..50 {
            c.call(0, update(2, "x", 10 + i, i * 4096, pattern(i, 4096))).await.unwrap();
        }
    });
    assert!(engine.terminate().success());
    let names: Vec<String> =
        std::fs::read_dir(dir.path().join("data/target-0")).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    assert!(names.iter().any(|n| n.starts_with("ckpt-")), "no checkpoint after SIGTERM: {names:?}");
    let engine = EngineProc::start(&cfg);
    rt().block_on(async {
        let c = connect(engine.addr).await;
        for i in 0..50 {
            assert_eq!(fetch_array(&c, 0, fetch(2, "x", 100, i * 4096, 4096)).await.unwrap().0, pattern(i, 4096));
        }
    });
    // A second engine on the same data directory is refused.
    let err = EngineProc::try_start(&cfg).err().expect("second engine on one data dir must fail");
    assert!(err.contains("in use by another tessera-engine"), "{err}");
}

#[test]
fn malformed_frame_closes_only_that_connection() {
    let dir = tempfile::tempdir().unwrap();
    let engine = EngineProc::start(&write_config(dir.path(), "12MiB", 1));
    let mut raw = TcpStream::connect(engine.addr).unwrap();
    raw.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    raw.write_all(&[0x55; 64]).unwrap();
    let mut buf = [0u8; 16];
    assert_eq!(raw.read(&mut buf).unwrap(), 0, "engine must close a connection that sent garbage");
    rt().block_on(async {
        let c = connect(engine.addr).await;
        c.call(0, Request::Ping).await.unwrap();
    });
    std::thread::sleep(Duration::from_millis(100));
    assert!(engine.log_contains("malformed frame"));
}

/// Writes some updates, optionally forcing a checkpoint by SIGTERM, and stops the engine.
fn populate(cfg: &Path, graceful: bool, from: u64, n: u64) {
    let engine = EngineProc::start(cfg);
    rt().block_on(async {
        let c = connect(engine.addr).await;
        for i in from..from + n {
            c.call(0, update(3, "x", 10 + i, i * 8192, pattern(i, 8192))).await.unwrap();
        }
    });
    if graceful {
        assert!(engine.terminate().success());
    } else {
        engine.kill9();
    }
}

fn flip(path: &Path, off: u64) {
    let mut bytes = std::fs::read(path).unwrap();
    bytes[off as usize] ^= 0x20;
    std::fs::write(path, bytes).unwrap();
}

fn files(dir: &Path, prefix: &str) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().unwrap().to_str().unwrap().starts_with(prefix))
        .collect();
    v.sort();
    v
}

#[test]
fn corruption_of_each_file_is_detected() {
    // Data file: the fetch fails with DataCorrupt instead of returning wrong bytes. (Updates go
    // straight to the data file: none may still wait in the WAL when it is corrupted.)
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config_with(dir.path(), "16MiB", 1, "wal_data_max = 0\n");
    populate(&cfg, false, 0, 4);
    let tdir = dir.path().join("data/target-0");
    flip(&tdir.join("data.blk"), 8192 + 100);
    let engine = EngineProc::start(&cfg);
    rt().block_on(async {
        let c = connect(engine.addr).await;
        assert_eq!(fetch_array(&c, 0, fetch(3, "x", 100, 0, 8192)).await.unwrap().0, pattern(0, 8192));
        let r = c.call(0, fetch(3, "x", 100, 8192, 8192)).await;
        assert_eq!(remote_status(r), RpcStatus::DataCorrupt);
    });
    drop(engine);

    // A WAL record in the middle: refuse to start, naming the file.
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), "16MiB", 1);
    populate(&cfg, false, 0, 6);
    let tdir = dir.path().join("data/target-0");
    let wal = files(&tdir, "wal-").into_iter().find(|p| std::fs::metadata(p).unwrap().len() > 0).unwrap();
    flip(&wal, 40);
    let err = EngineProc::try_start(&cfg).err().expect("engine must refuse a corrupt WAL");
    let name = wal.file_name().unwrap().to_str().unwrap();
    assert!(err.contains(name) && err.contains("not a torn write"), "{err}");

    // The newest checkpoint: fall back to the previous one plus the WAL, nothing lost.
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), "16MiB", 1);
    populate(&cfg, true, 0, 5);
    populate(&cfg, true, 5, 5);
    let tdir = dir.path().join("data/target-0");
    let ckpts = files(&tdir, "ckpt-");
    assert!(ckpts.len() >= 2, "{ckpts:?}");
    flip(ckpts.last().unwrap(), 70);
    let engine = EngineProc::start(&cfg);
    rt().block_on(async {
        let c = connect(engine.addr).await;
        for i in 0..10 {
            assert_eq!(fetch_array(&c, 0, fetch(3, "x", 100, i * 8192, 8192)).await.unwrap().0, pattern(i, 8192), "update {i}");
        }
    });
    std::thread::sleep(Duration::from_millis(100));
    assert!(engine.log_contains("checkpoint is corrupt"));
}

#[test]
fn out_of_space_is_a_clear_error_and_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let engine = EngineProc::start(&write_config(dir.path(), "1MiB", 1));
    rt().block_on(async {
        let c = connect(engine.addr).await;
        let mut written = 0u64;
        let status = loop {
            match c.call(0, update(4, "x", 10, written * 65536, pattern(written, 65536))).await {
                Ok(_) => written += 1,
                Err(RpcError::Remote { status, message }) => {
                    assert!(message.contains("no space"), "{message}");
                    break status;
                }
                Err(e) => panic!("{e}"),
            }
            assert!(written < 100, "1 MiB target accepted more than 6 MiB");
        };
        assert_eq!(status, RpcStatus::NoSpace);
        assert_eq!(written, 16);
        for i in 0..written {
            assert_eq!(fetch_array(&c, 0, fetch(4, "x", 10, i * 65536, 65536)).await.unwrap().0, pattern(i, 65536));
        }
    });
}

#[test]
fn overwrites_keep_space_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let engine = EngineProc::start(&write_config(dir.path(), "12MiB", 1));
    rt().block_on(async {
        let c = connect(engine.addr).await;
        // 64 MiB of overwrites of one 1 MiB range into a 12 MiB target, 8 writers at once so the
        // queue rarely empties: only aggregation under load makes room.
        let peak = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let mut tasks = Vec::new();
        for w in 0..8u64 {
            let (c, peak) = (c.clone(), peak.clone());
            tasks.push(tokio::spawn(async move {
                for n in 0..32u64 {
                    let round = n * 8 + w;
                    let off = (round % 4) * 262_144;
                    c.call(0, update(5, "x", 1000 + round, off, pattern(round, 262_144))).await.unwrap();
                    if let Reply::TargetInfo(i) = c.call(0, Request::QueryTarget).await.unwrap() {
                        peak.fetch_max(i.used, std::sync::atomic::Ordering::Relaxed);
                    }
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        for q in 0..4u64 {
            let round = 252 + q;
            let want = pattern(round, 262_144);
            assert_eq!(fetch_array(&c, 0, fetch(5, "x", u64::MAX, q * 262_144, 262_144)).await.unwrap().0, want);
        }
        let peak = peak.load(std::sync::atomic::Ordering::Relaxed);
        eprintln!("peak space used: {} KiB for 1024 KiB of live data", peak / 1024);
        assert!(peak <= 8 << 20, "space grew to {peak} bytes");
    });
}

/// User + system CPU ticks of a process.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after_comm = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = after_comm.split_whitespace().collect();
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

#[test]
fn idle_engine_uses_no_cpu() {
    let dir = tempfile::tempdir().unwrap();
    let engine = EngineProc::start(&write_config(dir.path(), "64MiB", 2));
    rt().block_on(async {
        let c = connect(engine.addr).await;
        // Recent epochs (HLC: ns since the Unix epoch) leave versions for aggregation to revisit.
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64;
        for i in 0..64 {
            c.call((i % 2) as u16, update(6, "x", now + i, (i % 8) * 4096, pattern(i, 4096))).await.unwrap();
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        let before = cpu_ticks(engine.child.id());
        tokio::time::sleep(Duration::from_secs(3)).await;
        let used = cpu_ticks(engine.child.id()) - before;
        // Clock ticks are 10 ms: an engine that polls would burn ~300 of them in 3 s.
        assert!(used <= 3, "idle engine used {used} CPU ticks in 3 s");
    });
}
