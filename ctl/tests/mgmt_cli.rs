//! `tessera pool|volume|export|system` and `tessera up` as an operator runs them: the real
//! `tessera`, `tessera-mgmt`, `tessera-engine` and `tessera-nvmf` binaries over real TCP.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;

/// Runs `tessera args` with `envs`; returns (exit code, stdout, stderr).
fn tessera_env(args: &[&str], envs: &[(&str, &str)]) -> (i32, String, String) {
    let out =
        Command::new(env!("CARGO_BIN_EXE_tessera")).args(args).env_remove("TESSERA_MGMT").envs(envs.iter().copied()).output().unwrap();
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

fn tessera(args: &[&str]) -> (i32, String, String) {
    tessera_env(args, &[])
}

/// `tessera args --json`, which must succeed.
fn tessera_json(mgmt: &str, args: &[&str]) -> Value {
    let mut all = vec!["--mgmt", mgmt];
    all.extend_from_slice(args);
    all.push("--json");
    let (code, out, err) = tessera(&all);
    assert_eq!(code, 0, "tessera {all:?}: {err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("tessera {all:?} printed no JSON ({e}): {out}"))
}

/// Builds the daemons `tessera up` starts, next to the `tessera` binary under test.
fn build_daemons() {
    static BUILT: std::sync::Once = std::sync::Once::new();
    BUILT.call_once(|| {
        let exe = PathBuf::from(env!("CARGO_BIN_EXE_tessera"));
        let mut build = Command::new(env!("CARGO"));
        build.args(["build", "--quiet", "-p", "tessera-mgmt", "-p", "tessera-engine", "-p", "tessera-nvmf", "--bins"]);
        build.current_dir(env!("CARGO_MANIFEST_DIR"));
        if exe.parent().and_then(Path::file_name).is_some_and(|n| n == "release") {
            build.arg("--release");
        }
        assert!(build.status().unwrap().success(), "building tessera-mgmt, tessera-engine and tessera-nvmf failed");
    });
}

fn bin(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_tessera")).parent().unwrap().join(name)
}

use tessera_testkit::free_port;

/// A port p with p..p+n free.
fn free_ports(n: u16) -> u16 {
    loop {
        let base = free_port();
        if base.checked_add(n).is_some() && (1..n).all(|i| TcpListener::bind(("127.0.0.1", base + i)).is_ok()) {
            return base;
        }
    }
}

fn temp_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("tessera-ctl-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn signal(pid: u32, sig: &str) {
    let _ = Command::new("kill").arg(format!("-{sig}")).arg(pid.to_string()).status();
}

fn alive(pid: u32) -> bool {
    // A zombie has exited; only its parent has not collected it yet.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|s| !s.rsplit_once(')').is_some_and(|(_, r)| r.trim_start().starts_with('Z')))
}

/// Pids of live processes whose command line mentions `needle`.
fn processes_mentioning(needle: &str) -> Vec<u32> {
    let mut pids = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else { continue };
        if pid == std::process::id() {
            continue;
        }
        let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        if String::from_utf8_lossy(&cmd).contains(needle) && alive(pid) {
            pids.push(pid);
        }
    }
    pids
}

/// A single-line error message on stderr.
fn one_line(err: &str) -> &str {
    assert_eq!(err.lines().count(), 1, "expected one line on stderr: {err:?}");
    assert!(!err.contains("panicked") && !err.contains("RUST_BACKTRACE"), "{err}");
    err.trim_end()
}

#[test]
fn bad_arguments_are_one_line_and_exit_2() {
    for args in [
        &["volume", "create", "v", "--size", "1x"][..],
        &["volume", "create", "v", "--size", "0"],
        &["volume", "create", "v", "--size", "1.5G"],
        &["volume", "create", "v"],
        &["volume", "resize", "v", "--size", "12 parsecs"],
        &["pool", "create"],
        &["pool", "create", "p", "--ranks", "0,x"],
        &["export", "remove", "--nqn", "nqn.x"],
        &["export", "add", "--nqn", "nqn.x"],
        &["export", "add", "--volume", "v"],
        &["export", "add", "--nqn", "nqn.x", "--vhost-blk", "/tmp/x.sock", "--volume", "v"],
        &["export", "add", "--nqn", "nqn.x", "--volume", "v", "--queues", "2"],
        &["export", "add", "--vhost-blk", "/tmp/x.sock", "--volume", "v", "--listen", "127.0.0.1:4420"],
        &["export", "remove", "--vhost-blk", "/tmp/x.sock", "--nqn", "nqn.x", "--nsid", "1"],
        &["export", "remove"],
        &["system", "frobnicate"],
        &["up", "--engines", "0"],
        &["up", "--target-capacity", "lots"],
        &["up", "--listen", "nowhere"],
        &["up", "--rebuild-rate", "0"],
        &["up", "--rebuild-rate-busy", "1K"],
    ] {
        let (code, out, err) = tessera(args);
        assert_eq!(code, 2, "tessera {args:?}: {err}");
        assert!(out.is_empty(), "{out}");
        assert!(one_line(&err).starts_with("tessera: "), "{err}");
    }
    let (_, _, err) = tessera(&["volume", "create", "v", "--size", "1x"]);
    assert!(err.contains("\"1x\" is not a size"), "{err}");
}

#[test]
fn an_unreachable_service_is_named() {
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    for args in
        [&["--mgmt", &addr, "system", "query"][..], &["pool", "list", "--mgmt", &addr], &["volume", "list", "--json", "--mgmt", &addr]]
    {
        let (code, out, err) = tessera(args);
        assert_eq!(code, 1, "{err}");
        assert!(out.is_empty(), "{out}");
        let line = one_line(&err);
        assert!(line.starts_with(&format!("tessera: cannot reach the management service at {addr}: ")), "{line}");
        assert!(line.contains("refused"), "{line}");
    }
    // TESSERA_MGMT is the default; --mgmt wins over it.
    let (code, _, err) = tessera_env(&["system", "query"], &[("TESSERA_MGMT", &addr)]);
    assert_eq!(code, 1);
    assert!(err.contains(&addr), "{err}");
    let (code, help, _) = tessera(&["system", "query", "--help"]);
    assert_eq!(code, 0);
    assert!(help.contains("[env: TESSERA_MGMT=]") && help.contains("[default: 127.0.0.1:7400]"), "{help}");
}

/// A `tessera-mgmt` process on a free port with its own database, killed on drop.
struct Mgmt {
    child: Child,
    addr: String,
    dir: PathBuf,
}

impl Mgmt {
    fn start() -> Mgmt {
        build_daemons();
        // One directory per service: tests run in parallel.
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let dir = temp_dir(&format!("mgmt{}", NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)));
        let mut child = Command::new(bin("tessera-mgmt"))
            .args(["--listen", "127.0.0.1:0", "--db"])
            .arg(dir.join("mgmt.redb"))
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let addr = lines
            .by_ref()
            .map_while(Result::ok)
            .find_map(|l| l.contains("listening").then(|| l.split("addr=").nth(1)?.split_whitespace().next().map(str::to_string)).flatten())
            .expect("tessera-mgmt exited before listening");
        std::thread::spawn(move || lines.for_each(drop));
        Mgmt { child, addr, dir }
    }
}

impl Drop for Mgmt {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn service_refusals_print_its_message_and_exit_1() {
    let m = Mgmt::start();
    let a = m.addr.as_str();
    assert_eq!(tessera_json(a, &["pool", "list"]), serde_json::json!([]));
    assert_eq!(tessera_json(a, &["system", "query"])["engines"], serde_json::json!([]));
    let (code, out, _) = tessera(&["--mgmt", a, "pool", "list"]);
    assert_eq!((code, out.as_str()), (0, "no pools\n"));

    for (args, needle) in [
        (&["pool", "create", "p", "--class", "BOGUS"][..], "BOGUS"),
        (&["pool", "create", "p"], "no engine is up"),
        (&["pool", "query", "nope"], "nope"),
        (&["volume", "info", "vol0", "--pool", "nope"], "nope"),
        (&["volume", "create", "v", "--size", "1G", "--pool", "nope"], "nope"),
        (&["export", "remove", "--nqn", "nqn.2026-11.io.tessera:none", "--nsid", "1"], "nqn.2026-11.io.tessera:none"),
    ] {
        let mut all = vec!["--mgmt", a];
        all.extend_from_slice(args);
        let (code, out, err) = tessera(&all);
        assert_eq!(code, 1, "tessera {all:?}: {err}");
        assert!(out.is_empty(), "{out}");
        let line = one_line(&err);
        assert!(line.starts_with("tessera: ") && line.contains(needle), "tessera {all:?}: {line}");
        assert!(!line.contains("HTTP") && !line.contains("{"), "the service's message, not its envelope: {line}");
    }
}

/// A running `tessera up`: its output lines as they come, and cleanup if a test fails.
struct Up {
    child: Child,
    out: mpsc::Receiver<String>,
    err: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    /// Pids from the summary: name -> pid.
    pids: Vec<(String, u32)>,
    stdout: Vec<String>,
}

#[derive(Clone)]
struct Ports {
    mgmt: u16,
    nvmf: u16,
    engines: u16,
}

impl Ports {
    fn pick() -> Ports {
        Ports { mgmt: free_port(), nvmf: free_port(), engines: free_ports(3) }
    }
}

impl Up {
    fn start(dir: &Path, ports: &Ports, extra: &[&str]) -> Up {
        build_daemons();
        let mut child = Command::new(env!("CARGO_BIN_EXE_tessera"))
            .arg("up")
            .arg("--dir")
            .arg(dir)
            .args(["--engines", "3", "--targets", "2", "--target-capacity", "64M", "--volume-size", "32M"])
            .args(["--mgmt-listen", &format!("127.0.0.1:{}", ports.mgmt)])
            .args(["--listen", &format!("127.0.0.1:{}", ports.nvmf)])
            .args(["--engine-base-port", &ports.engines.to_string()])
            .args(extra)
            .env_remove("TESSERA_MGMT")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let (tx, out) = mpsc::channel();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        std::thread::spawn(move || {
            for l in stdout.lines().map_while(Result::ok) {
                let _ = tx.send(l);
            }
        });
        let err = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let stderr = BufReader::new(child.stderr.take().unwrap());
        let sink = err.clone();
        std::thread::spawn(move || {
            for l in stderr.lines().map_while(Result::ok) {
                sink.lock().unwrap().push(l);
            }
        });
        Up { child, out, err, pids: Vec::new(), stdout: Vec::new() }
    }

    fn stderr(&self) -> String {
        self.err.lock().unwrap().join("\n")
    }

    /// Waits for the `nvme connect` line; returns it.
    fn wait_ready(&mut self) -> String {
        let deadline = Instant::now() + Duration::from_secs(180);
        loop {
            match self.out.recv_timeout(Duration::from_millis(200)) {
                Ok(l) => {
                    let words: Vec<&str> = l.split_whitespace().collect();
                    if let [name, "pid", pid, ..] = words[..] {
                        self.pids.push((name.to_string(), pid.parse().unwrap()));
                    }
                    self.stdout.push(l.clone());
                    if l.trim_start().starts_with("nvme connect ") {
                        return l.trim().to_string();
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    if let Some(st) = self.child.try_wait().unwrap() {
                        std::thread::sleep(Duration::from_millis(200));
                        panic!("tessera up exited ({st}) before it was ready:\n{}\n{}", self.stdout.join("\n"), self.stderr());
                    }
                    assert!(Instant::now() < deadline, "tessera up not ready in time:\n{}\n{}", self.stdout.join("\n"), self.stderr());
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let st = self.child.wait().unwrap();
                    std::thread::sleep(Duration::from_millis(200));
                    panic!("tessera up exited ({st}) before it was ready:\n{}\n{}", self.stdout.join("\n"), self.stderr());
                }
            }
        }
    }

    fn pid(&self, name: &str) -> u32 {
        self.pids.iter().find(|(n, _)| n == name).map(|(_, p)| *p).unwrap_or_else(|| panic!("no pid for {name} in {:?}", self.pids))
    }

    /// Reads the summary up to its line containing `needle`.
    fn wait_stdout(&mut self, needle: &str) {
        while !self.stdout.iter().any(|l| l.contains(needle)) {
            match self.out.recv_timeout(Duration::from_secs(30)) {
                Ok(l) => self.stdout.push(l),
                Err(e) => panic!("no {needle:?} in the summary ({e}):\n{}", self.stdout.join("\n")),
            }
        }
    }

    /// Waits up to `secs` for `tessera up` to exit; its exit code.
    fn wait_exit(&mut self, secs: u64) -> i32 {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                std::thread::sleep(Duration::from_millis(100));
                return st.code().unwrap_or(-1);
            }
            assert!(Instant::now() < deadline, "tessera up still running after {secs}s:\n{}", self.stderr());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits for a stderr line containing `needle`.
    fn wait_stderr(&self, needle: &str) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !self.stderr().contains(needle) {
            assert!(Instant::now() < deadline, "no {needle:?} on stderr:\n{}", self.stderr());
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Up {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            signal(self.child.id(), "TERM");
            let deadline = Instant::now() + Duration::from_secs(60);
            while self.child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        for (_, pid) in &self.pids {
            if alive(*pid) {
                signal(*pid, "KILL");
            }
        }
    }
}

/// Target states of engine `rank` in the pool of `tessera pool query --json`.
fn targets_of(pool: &Value, rank: u32) -> Vec<String> {
    pool["map"]["targets"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["rank"] == rank)
        .map(|t| t["state"].as_str().unwrap().to_string())
        .collect()
}

/// No target DOWN or UP and no rebuild running.
fn settled(pool: &Value) -> bool {
    pool["rebuild"]["state"] == "idle"
        && pool["map"]["targets"].as_array().unwrap().iter().all(|t| t["state"] == "UPIN" || t["state"] == "DOWNOUT")
}

/// Polls `tessera pool query default` and `tessera system query` until `done(pool, system)`;
/// returns the pool.
fn wait_for(mgmt: &str, timeout: Duration, what: &str, done: impl Fn(&Value, &Value) -> bool) -> Value {
    tessera_testkit::wait_for(what, timeout, || {
        let pool = tessera_json(mgmt, &["pool", "query", "default"]);
        let sys = tessera_json(mgmt, &["system", "query"]);
        if done(&pool, &sys) {
            Ok(pool)
        } else {
            Err(format!("\n{pool:#}\n{sys:#}"))
        }
    })
}

/// `tessera bench --verify` of `ios` 8 KiB random reads and writes through the target.
fn bench_verify(addr: &str, nqn: &str, ios: u32) {
    let ios = ios.to_string();
    let (code, out, err) =
        tessera(&["bench", "--addr", addr, "--nqn", nqn, "--rw", "randrw", "--bs", "8k", "--qd", "4", "--ios", &ios, "--verify", "--json"]);
    assert_eq!(code, 0, "{err}");
    let report: Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(report["errors"], 0, "{report}");
    assert_eq!(report["ios"].to_string(), ios, "{report}");
}

#[test]
fn up_serves_a_volume_stops_cleanly_and_comes_back_with_the_same_data() {
    let dir = temp_dir("up");
    let ports = Ports::pick();
    let mgmt = format!("127.0.0.1:{}", ports.mgmt);
    let nqn = "nqn.2026-11.io.tessera:vol0";

    let vhost_sock = dir.join("vol0.sock");
    let mut up =
        Up::start(&dir, &ports, &["--rebuild-rate", "256M", "--rebuild-rate-busy", "16M", "--vhost-blk", vhost_sock.to_str().unwrap()]);
    let connect = up.wait_ready();
    // --vhost-blk: a managed export of vol0, its socket bound before up says it is ready.
    assert!(up.stdout.iter().any(|l| l.trim() == format!("vhost-user-blk disk: {} (4 queues)", vhost_sock.display())), "{:?}", up.stdout);
    assert!(std::fs::symlink_metadata(&vhost_sock).is_ok_and(|m| m.file_type().is_socket()), "{}", vhost_sock.display());
    assert_eq!(connect, format!("nvme connect -t tcp -a 127.0.0.1 -s {} -n {nqn}", ports.nvmf));
    assert!(up.stdout.iter().any(|l| l.trim() == format!("nvme discover -t tcp -a 127.0.0.1 -s {}", ports.nvmf)), "{:?}", up.stdout);
    let names: Vec<&str> = up.pids.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["mgmt", "engine-0", "engine-1", "engine-2", "nvmf"]);
    for (name, pid) in &up.pids {
        assert!(alive(*pid), "{name} is not running");
    }
    for f in ["mgmt.redb", "engine-0/engine.toml", "engine-2/data/ENGINE", "logs/mgmt.log", "logs/engine-1.log", "logs/nvmf.log"] {
        assert!(dir.join(f).exists(), "no {f} in {}", dir.display());
    }
    // --rebuild-rate(-busy) become every engine's [heal] rebuild_rate(_busy) (and the engines
    // accept them).
    let engine_toml = || std::fs::read_to_string(dir.join("engine-1/engine.toml")).unwrap();
    assert!(engine_toml().contains("\n[heal]\nrebuild_rate = 268435456\nrebuild_rate_busy = 16777216\n"), "{}", engine_toml());

    let pools = tessera_json(&mgmt, &["pool", "list"]);
    let pools = pools.as_array().unwrap();
    assert_eq!(pools.len(), 1, "{pools:?}");
    assert_eq!(pools[0]["name"], "default");
    assert_eq!(pools[0]["default_class"], "EC_2P1");
    assert_eq!(pools[0]["map"]["targets"].as_array().unwrap().len(), 6);

    let vols = tessera_json(&mgmt, &["volume", "list"]);
    assert_eq!(vols.as_array().unwrap().len(), 1, "{vols}");
    assert_eq!(vols[0]["name"], "vol0");
    assert_eq!(vols[0]["size"], 32 << 20);
    assert_eq!(vols[0]["class"], "EC_2P1");
    let uuid = vols[0]["uuid"].as_str().unwrap().to_string();

    let exports = tessera_json(&mgmt, &["export", "list"]);
    assert_eq!(exports["exports"].as_array().unwrap().len(), 1, "{exports}");
    assert_eq!(exports["exports"][0]["nqn"], nqn);
    assert_eq!(exports["exports"][0]["nsid"], 1);
    assert_eq!(exports["exports"][0]["listen"], format!("127.0.0.1:{}", ports.nvmf));
    assert_eq!(exports["exports"][0]["volume"]["uuid"], uuid.as_str());
    assert_eq!(exports["vhost"].as_array().unwrap().len(), 1, "{exports}");
    assert_eq!(exports["vhost"][0]["socket"], vhost_sock.to_str().unwrap());
    assert_eq!(exports["vhost"][0]["target"], format!("127.0.0.1:{}", ports.nvmf));
    let (_, out, _) = tessera(&["--mgmt", &mgmt, "export", "list"]);
    let row = out.lines().find(|l| l.starts_with(vhost_sock.to_str().unwrap())).unwrap_or_else(|| panic!("{out}"));
    assert!(out.contains("VHOST-USER-BLK SOCKET") && row.contains("default/vol0") && row.contains(" rw "), "{out}");

    let sys = tessera_json(&mgmt, &["system", "query"]);
    let engines = sys["engines"].as_array().unwrap();
    assert_eq!(engines.len(), 3, "{sys}");
    for (r, e) in engines.iter().enumerate() {
        assert_eq!(e["rank"], r);
        assert_eq!(e["state"], "up", "{sys}");
        assert_eq!(e["address"], format!("127.0.0.1:{}", usize::from(ports.engines) + r));
    }

    // The human forms name the same things.
    let (code, out, err) = tessera(&["--mgmt", &mgmt, "volume", "list"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("POOL ") && out.contains(&uuid) && out.contains("32 MiB"), "{out}");
    let (_, out, _) = tessera(&["--mgmt", &mgmt, "system", "query"]);
    assert!(out.starts_with("3 engine(s), 3 up"), "{out}");

    // Blocks go through the target, the DAOS bdev and the engines and come back the same.
    let addr = format!("127.0.0.1:{}", ports.nvmf);
    let (code, out, err) = tessera(&[
        "bench", "--addr", &addr, "--nqn", nqn, "--rw", "randrw", "--bs", "8k", "--qd", "4", "--ios", "300", "--verify", "--json",
    ]);
    assert_eq!(code, 0, "{err}");
    let report: Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(report["errors"], 0, "{report}");
    assert_eq!(report["ios"], 300, "{report}");

    // A snapshot, exported read-only beside the volume: it reads, it is kept while exported.
    let (code, out, err) = tessera(&["--mgmt", &mgmt, "snapshot", "create", "vol0", "s1"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("created snapshot default/vol0@s1 at epoch ") && out.trim_end().ends_with("(final)"), "{out}");
    let snaps = tessera_json(&mgmt, &["snapshot", "list", "default/vol0"]);
    assert_eq!(
        (snaps[0]["name"].as_str(), snaps[0]["stable"].as_bool(), snaps[0]["size"].as_u64()),
        (Some("s1"), Some(true), Some(32 << 20))
    );
    let snap_epoch = snaps[0]["epoch"].as_u64().unwrap();
    // The engines' accounting reaches the service: the volume's space, and what only the
    // snapshot holds (nothing written since: nothing).
    let vol0 = tessera_testkit::wait_for("the engines to report the volume's space", Duration::from_secs(30), || {
        let v = tessera_json(&mgmt, &["volume", "info", "vol0"]);
        let held = v["snapshots"][0]["held_bytes"].as_u64();
        (v["allocated_bytes"].as_u64().is_some_and(|b| b > 0) && held.is_some()).then_some(v.clone()).ok_or(format!("{v:#}"))
    });
    assert_eq!(vol0["snapshots"][0]["held_bytes"], 0, "{vol0:#}");
    let (_, out, _) = tessera(&["--mgmt", &mgmt, "pool", "query", "default"]);
    let row = out.lines().find(|l| l.starts_with("vol0 ")).unwrap_or_else(|| panic!("{out}"));
    assert!(row.contains("32 MiB") && !row.contains(" - "), "{out}");
    assert!(out.lines().any(|l| l.starts_with("vol0@s1 ")), "{out}");
    let (_, out, _) = tessera(&["--mgmt", &mgmt, "volume", "info", "vol0"]);
    assert!(out.contains("allocated   ") && out.contains("snapshot   s1 (epoch"), "{out}");
    let snap_nqn = "nqn.2026-12.io.tessera:vol0-s1";
    let (code, out, err) = tessera(&["--mgmt", &mgmt, "export", "add", "--nqn", snap_nqn, "--volume", "vol0@s1", "--listen", &addr]);
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with(&format!("exported default/vol0@s1 (read-only) as {snap_nqn} nsid 1")), "{out}");
    let (code, out, err) =
        tessera(&["bench", "--addr", &addr, "--nqn", snap_nqn, "--rw", "randread", "--bs", "8k", "--qd", "4", "--ios", "100", "--json"]);
    assert_eq!(code, 0, "{err}");
    let report: Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!((report["errors"].as_u64(), report["ios"].as_u64()), (Some(0), Some(100)), "{report}");
    let (code, _, err) = tessera(&["--mgmt", &mgmt, "snapshot", "delete", "vol0", "s1"]);
    assert_eq!(code, 1);
    assert!(one_line(&err).contains("snapshot default/vol0@s1 is exported"), "{err}");
    let (code, _, err) = tessera(&["--mgmt", &mgmt, "export", "remove", "--nqn", snap_nqn, "--nsid", "1"]);
    assert_eq!(code, 0, "{err}");
    // The snapshot as a VM's read-only disk, and the volume's disk: both keep the snapshot.
    let snap_sock = dir.join("vol0-s1.sock");
    let (code, out, err) =
        tessera(&["--mgmt", &mgmt, "export", "add", "--vhost-blk", snap_sock.to_str().unwrap(), "--volume", "vol0@s1", "--queues", "2"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.starts_with(&format!("exported default/vol0@s1 as a vhost-user-blk disk on {} (2 queues, read-only", snap_sock.display())),
        "{out}"
    );
    let (code, _, err) = tessera(&["--mgmt", &mgmt, "snapshot", "delete", "vol0", "s1"]);
    assert_eq!(code, 1);
    assert!(one_line(&err).contains(&format!("is exported (the vhost-user-blk disk on {})", snap_sock.display())), "{err}");
    let (code, out, err) = tessera(&["--mgmt", &mgmt, "export", "remove", "--vhost-blk", snap_sock.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out, format!("removed the vhost-user-blk disk on {} (default/vol0)\n", snap_sock.display()));
    let (code, _, err) = tessera(&["--mgmt", &mgmt, "export", "remove", "--vhost-blk", snap_sock.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(one_line(&err).contains("no vhost-user-blk disk is exported on"), "{err}");
    // A clone of it: listed with its parent, kept from the snapshot, flattened, deleted.
    let (code, out, err) = tessera(&["--mgmt", &mgmt, "volume", "clone", "vol0@s1", "c1"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("created volume c1 in pool default: a clone of default/vol0@s1, 32 MiB"), "{out}");
    let (_, out, _) = tessera(&["--mgmt", &mgmt, "volume", "info", "c1"]);
    assert!(out.contains("clone of   default/vol0@s1"), "{out}");
    let (code, _, err) = tessera(&["--mgmt", &mgmt, "snapshot", "delete", "vol0", "s1"]);
    assert_eq!(code, 1);
    assert!(one_line(&err).contains("has clones: c1"), "{err}");
    let (code, out, err) = tessera(&["--mgmt", &mgmt, "volume", "flatten", "c1"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("flattened volume c1 in pool default: ") && out.contains("copied from its parent"), "{out}");
    assert!(tessera_json(&mgmt, &["volume", "info", "c1"]).get("parent").is_none());
    let (code, _, err) = tessera(&["--mgmt", &mgmt, "volume", "delete", "c1"]);
    assert_eq!(code, 0, "{err}");
    // Rollback: refused while exported, done with --force (the target switches to it).
    let (code, _, err) = tessera(&["--mgmt", &mgmt, "volume", "rollback", "vol0@s1"]);
    assert_eq!(code, 1);
    assert!(one_line(&err).contains("is exported"), "{err}");
    let (code, out, err) = tessera(&["--mgmt", &mgmt, "volume", "rollback", "vol0@s1", "--force"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("rolled volume default/vol0 back to s1 at epoch "), "{out}");
    let (_, out, _) = tessera(&["--mgmt", &mgmt, "volume", "info", "vol0"]);
    assert!(out.contains("rollback   to s1"), "{out}");

    // An engine killed -9 is reported; the others keep running.
    let victim = up.pid("engine-2");
    signal(victim, "KILL");
    up.wait_stderr(&format!("engine-2 (pid {victim}) exited: killed by signal 9"));
    assert!(up.child.try_wait().unwrap().is_none(), "tessera up stopped when an engine died:\n{}", up.stderr());
    assert_eq!(tessera_json(&mgmt, &["pool", "list"]).as_array().unwrap().len(), 1);
    // The service marks it down and the survivors rebuild its shards on their spare targets
    // (two shards of a group on one engine: fault-domain redundancy reduced); blocks still go
    // through and come back the same.
    wait_for(&mgmt, Duration::from_secs(30), "engine-2 down", |_, sys| {
        sys["engines"].as_array().unwrap().iter().any(|e| e["rank"] == 2 && e["state"] == "down")
    });
    let pool = wait_for(&mgmt, Duration::from_secs(90), "the rebuild done", |pool, _| {
        settled(pool) && targets_of(pool, 2).iter().all(|s| s == "DOWNOUT")
    });
    assert_eq!(pool["fault_domains_reduced"], true, "{pool}");
    bench_verify(&addr, nqn, 100);

    // Ctrl-C: target, then service, then engines; exit 0 and nothing left running.
    signal(up.child.id(), "INT");
    assert_eq!(up.wait_exit(120), 0, "{}", up.stderr());
    let err = up.stderr();
    let at = |s: &str| err.find(s).unwrap_or_else(|| panic!("no {s:?} in:\n{err}"));
    assert!(at("stopped nvmf") < at("stopped mgmt"), "{err}");
    assert!(at("stopped mgmt") < at("stopped engine-0") && at("stopped mgmt") < at("stopped engine-1"), "{err}");
    for (name, pid) in &up.pids {
        assert!(!alive(*pid), "{name} (pid {pid}) still running after tessera up exited");
    }
    assert_eq!(processes_mentioning(dir.to_str().unwrap()), Vec::<u32>::new());
    assert!(!vhost_sock.exists(), "the stopped target removed its vhost-user-blk socket");
    drop(up);

    // Again on the same directory: the same pool, volume and export, all three engines back.
    let mut up = Up::start(&dir, &ports, &[]);
    assert_eq!(up.wait_ready(), connect);
    assert!(!engine_toml().contains("[heal]"), "without --rebuild-rate the engine's default: {}", engine_toml());
    let vols = tessera_json(&mgmt, &["volume", "list"]);
    assert_eq!(vols.as_array().unwrap().len(), 1, "{vols}");
    assert_eq!(vols[0]["uuid"], uuid.as_str());
    assert_eq!(tessera_json(&mgmt, &["export", "list"])["exports"].as_array().unwrap().len(), 1);
    // The vhost-user-blk export is the service's: served again without --vhost-blk.
    tessera_testkit::wait_for("the vhost-user-blk socket again", Duration::from_secs(20), || {
        vhost_sock.exists().then_some(()).ok_or("not bound".to_string())
    });
    let sys = tessera_json(&mgmt, &["system", "query"]);
    assert!(sys["engines"].as_array().unwrap().iter().all(|e| e["state"] == "up"), "{sys}");
    // The engine that was lost is reintegrated by itself (UP, then UPIN once the survivors have
    // copied back what changed while it was away); the groups are on distinct engines again.
    let pool = wait_for(&mgmt, Duration::from_secs(90), "engine-2 reintegrated", |pool, _| {
        settled(pool) && (0..3).all(|r| targets_of(pool, r).iter().all(|s| s == "UPIN"))
    });
    assert_eq!(pool["fault_domains_reduced"], false, "{pool}");
    bench_verify(&addr, nqn, 100);
    // The snapshot came through the restart and the reintegration; deleting it empties the list.
    let snaps = tessera_json(&mgmt, &["snapshot", "list", "vol0"]);
    assert_eq!((snaps[0]["name"].as_str(), snaps[0]["epoch"].as_u64()), (Some("s1"), Some(snap_epoch)), "{snaps}");
    let (code, out, err) = tessera(&["--mgmt", &mgmt, "snapshot", "delete", "vol0", "s1"]);
    assert_eq!((code, out), (0, format!("deleted snapshot default/vol0@s1 (epoch {snap_epoch})\n")), "{err}");
    let (_, out, _) = tessera(&["--mgmt", &mgmt, "snapshot", "list", "vol0"]);
    assert_eq!(out, "no snapshots\n");
    signal(up.child.id(), "TERM");
    assert_eq!(up.wait_exit(120), 0, "{}", up.stderr());
    for (name, pid) in &up.pids {
        assert!(!alive(*pid), "{name} (pid {pid}) still running after tessera up exited");
    }
    drop(up);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn up_etcd_runs_two_services_on_etcd_and_survives_the_leaders_death() {
    let dir = temp_dir("up-etcd");
    let ports = Ports { mgmt: free_ports(2), nvmf: free_port(), engines: free_ports(3) };
    let etcd_base = free_ports(6).to_string();
    let (a, b) = (format!("127.0.0.1:{}", ports.mgmt), format!("127.0.0.1:{}", ports.mgmt + 1));
    let both = format!("{a},{b}");
    let mut up = Up::start(&dir, &ports, &["--etcd", "--etcd-base-port", &etcd_base]);
    up.wait_ready();
    up.wait_stdout("Ctrl-C stops everything");
    let names: Vec<&str> = up.pids.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["etcd-0", "etcd-1", "etcd-2", "mgmt", "mgmt-2", "engine-0", "engine-1", "engine-2", "nvmf"]);
    assert!(up.stdout.iter().any(|l| l.contains(&format!("two services share it, {a} leads, {b} follows"))), "{:?}", up.stdout);
    assert!(up.stdout.iter().any(|l| l.contains(&format!("tessera --mgmt {both} system query"))), "{:?}", up.stdout);
    // The follower answers reads and passes writes to the leader.
    assert_eq!(tessera_json(&b, &["volume", "list"]).as_array().unwrap().len(), 1);
    let (code, _, err) = tessera(&["--mgmt", &b, "volume", "create", "through-follower", "--size", "8M"]);
    assert_eq!(code, 0, "{err}");

    // The leader is killed: the other takes over; the CLI with both addresses goes on.
    signal(up.pid("mgmt"), "KILL");
    up.wait_stderr("mgmt (pid");
    tessera_testkit::wait_for("a leader takes a write after the first was killed", Duration::from_secs(30), || {
        let (code, _, err) = tessera(&["--mgmt", &both, "volume", "create", "after-takeover", "--size", "8M"]);
        if code == 0 {
            Ok(())
        } else {
            Err(err)
        }
    });
    let sys = tessera_json(&both, &["system", "query"]);
    assert!(sys["engines"].as_array().unwrap().iter().all(|e| e["state"] == "up"), "{sys}");
    bench_verify(&format!("127.0.0.1:{}", ports.nvmf), "nqn.2026-11.io.tessera:vol0", 50);

    signal(up.child.id(), "TERM");
    assert_eq!(up.wait_exit(120), 0, "{}", up.stderr());
    let err = up.stderr();
    assert!(err.contains("stopped etcd-0") && err.contains("stopped mgmt-2"), "{err}");
    for (name, pid) in &up.pids {
        assert!(!alive(*pid), "{name} (pid {pid}) still running after tessera up exited");
    }
    drop(up);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn up_netns_puts_engines_and_the_target_in_namespaces_and_removes_them() {
    let dir = temp_dir("up-netns");
    let ports = Ports::pick();
    let pid = std::process::id();
    let subnet = format!("10.{}.{}", 150 + (pid / 250) % 50, pid % 250);
    let mgmt = format!("{subnet}.1:{}", ports.mgmt);
    let mut up = Up::start(&dir, &ports, &["--netns", "--netns-subnet", &subnet]);
    let connect = up.wait_ready();
    up.wait_stdout("Ctrl-C stops everything");
    let target = format!("{subnet}.100:{}", ports.nvmf);
    assert_eq!(connect, format!("nvme connect -t tcp -a {subnet}.100 -s {} -n nqn.2026-11.io.tessera:vol0", ports.nvmf));
    let spaces: Vec<String> =
        up.stdout.iter().filter_map(|l| l.split_whitespace().skip_while(|w| *w != "netns").nth(1).map(str::to_string)).collect();
    assert_eq!(spaces.len(), 4, "three engines and the target, each in its namespace: {:?}", up.stdout);
    let listed = String::from_utf8(Command::new("ip").args(["netns", "list"]).output().unwrap().stdout).unwrap();
    assert!(spaces.iter().all(|s| listed.contains(s.as_str())), "{listed}");
    // Every engine serves on its own address, the service on the bridge's.
    let sys = tessera_json(&mgmt, &["system", "query"]);
    let addrs: Vec<String> = sys["engines"].as_array().unwrap().iter().map(|e| e["address"].as_str().unwrap().to_string()).collect();
    assert_eq!(addrs, (0..3).map(|r| format!("{subnet}.{}:{}", 10 + r, ports.engines + r)).collect::<Vec<_>>());
    bench_verify(&target, "nqn.2026-11.io.tessera:vol0", 100);

    // Engine 1's link to the bridge goes down: it runs on but is marked DOWN; back up, it is UP.
    let link = up
        .stdout
        .iter()
        .find(|l| l.trim_start().starts_with("engine-1"))
        .and_then(|l| l.split_whitespace().skip_while(|w| *w != "link").nth(1))
        .unwrap()
        .to_string();
    let ip = |state: &str| assert!(Command::new("ip").args(["link", "set", &link, state]).status().unwrap().success());
    ip("down");
    let state = |want: &str| {
        wait_for(&mgmt, Duration::from_secs(60), &format!("engine 1 {want}"), |_, sys| sys["engines"][1]["state"] == want);
    };
    state("down");
    assert!(alive(up.pid("engine-1")), "the partitioned engine runs on");
    ip("up");
    state("up");
    bench_verify(&target, "nqn.2026-11.io.tessera:vol0", 100);

    signal(up.child.id(), "TERM");
    assert_eq!(up.wait_exit(120), 0, "{}", up.stderr());
    let listed = String::from_utf8(Command::new("ip").args(["netns", "list"]).output().unwrap().stdout).unwrap();
    assert!(spaces.iter().all(|s| !listed.contains(s.as_str())), "namespaces left behind: {listed}");
    drop(up);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn up_refuses_unusable_addresses_before_starting_anything() {
    build_daemons();
    let dir = temp_dir("up-addr");
    let d = dir.to_str().unwrap();
    let (code, out, err) = tessera(&["up", "--dir", d, "--listen", "127.0.0.1:0"]);
    assert_eq!(code, 1, "{err}");
    assert!(out.is_empty());
    assert!(one_line(&err).contains("--listen 127.0.0.1:0: give a port"), "{err}");
    // A port in use (here: by this test) is refused, naming the address.
    let busy = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = busy.local_addr().unwrap().port();
    let ports = Ports::pick();
    let (code, _, err) = tessera(&[
        "up",
        "--dir",
        d,
        "--mgmt-listen",
        &format!("127.0.0.1:{}", ports.mgmt),
        "--listen",
        &format!("127.0.0.1:{}", ports.nvmf),
        "--engine-base-port",
        &port.to_string(),
    ]);
    assert_eq!(code, 1, "{err}");
    let line = one_line(&err);
    assert!(line.contains(&format!("engine 0 address 127.0.0.1:{port} is not available")), "{line}");
    assert!(!dir.join("logs/mgmt.log").exists(), "nothing was started");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn up_reports_a_daemon_that_fails_to_start_and_stops_the_others() {
    let dir = temp_dir("up-fail");
    // Engine 1's data directory belongs to another layout: that engine refuses to start.
    std::fs::create_dir_all(dir.join("engine-1/data")).unwrap();
    std::fs::write(dir.join("engine-1/data/ENGINE"), "rank = 7\ntargets = 5\n").unwrap();
    let ports = Ports::pick();
    let mut up = Up::start(&dir, &ports, &["--timeout", "60"]);
    let code = up.wait_exit(120);
    let err = up.stderr();
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("engine-1 exited during start-up (exit status 1)"), "{err}");
    assert!(err.contains("holds data of another engine layout"), "the engine's own log line is shown: {err}");
    assert!(err.contains("stopped mgmt") && err.contains("stopped engine-0") && err.contains("stopped engine-2"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    let printed: Vec<String> = up.out.try_iter().collect();
    assert!(!printed.iter().any(|l| l.contains("nvme connect")), "{printed:?}");
    assert_eq!(processes_mentioning(dir.to_str().unwrap()), Vec::<u32>::new());
    drop(up);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Registers fake engines 0..3 (2 targets each) and heartbeats them until dropped.
struct FakeEngines {
    rt: tokio::runtime::Runtime,
    client: tessera_mgmt_api::MgmtClient,
    alive: tokio::task::JoinHandle<()>,
}

fn fake_uuid(rank: u32) -> uuid::Uuid {
    uuid::Uuid::from_u128(0x5000 + u128::from(rank))
}

impl FakeEngines {
    fn register(addr: &str) -> FakeEngines {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        let client = tessera_mgmt_api::MgmtClient::new(addr);
        rt.block_on(async {
            for rank in 0..3 {
                let req = tessera_mgmt_api::RegisterEngine {
                    rank,
                    uuid: fake_uuid(rank),
                    address: format!("127.0.0.1:{}", 1 + rank),
                    fault_domain: String::new(),
                    targets: 2,
                    target_capacity: 1 << 30,
                };
                client.register_engine(&req).await.unwrap();
            }
        });
        let c = client.clone();
        let alive = rt.spawn(async move {
            loop {
                for rank in 0..3 {
                    let _ = c.heartbeat(rank, fake_uuid(rank)).await;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        });
        FakeEngines { rt, client, alive }
    }

    /// Every engine reports its rebuild towards `version` done.
    fn all_done(&self, pool: &str, version: u32) {
        self.rt.block_on(async {
            for rank in 0..3 {
                let rebuild = tessera_mgmt_api::RebuildProgress {
                    map_version: version,
                    state: tessera_mgmt_api::EngineRebuildState::Done,
                    dkeys_total: 4,
                    dkeys_done: 4,
                    bytes_total: 1 << 20,
                    bytes_done: 1 << 20,
                    attempt: 1,
                    ..Default::default()
                };
                let report = tessera_mgmt_api::EngineReport { uuid: fake_uuid(rank), rebuild, scrub: Default::default() };
                self.client.report(pool, rank, &report).await.unwrap();
            }
        });
    }
}

impl Drop for FakeEngines {
    fn drop(&mut self) {
        self.alive.abort();
    }
}

#[test]
fn pool_exclude_query_and_watch_a_rebuild() {
    let m = Mgmt::start();
    let a = m.addr.as_str();
    let engines = FakeEngines::register(a);
    tessera_json(a, &["pool", "create", "p"]);
    let run = |args: &[&str]| {
        let mut all = vec!["--mgmt", a];
        all.extend_from_slice(args);
        tessera(&all)
    };

    let (code, out, err) = run(&["pool", "exclude", "p", "--rank", "2", "--target", "0"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out, "pool p: target 2:0 DOWN at map version 2; rebuild started — watch with: tessera pool query p --watch\n");
    let p = tessera_json(a, &["pool", "query", "p"]);
    assert_eq!(p["rebuild"]["state"], "running", "{p}");
    assert_eq!(p["rebuild"]["map_version"], 2);
    assert_eq!(p["map"]["base_version"], 1);
    let (code, out, err) = run(&["pool", "query", "p"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("rebuild: running (rebuild towards map version 2)"), "{out}");
    assert!(out.contains("  engines     0/3 done"), "{out}");
    assert!(out.contains("scrub: 0 extents scrubbed"), "{out}");

    // Refusals: the service's line and exit 1; bad arguments exit 2.
    let (code, out, err) = run(&["pool", "exclude", "p", "--rank", "2", "--target", "0"]);
    assert_eq!((code, out.as_str()), (1, ""));
    assert_eq!(one_line(&err), "tessera: target 2:0 of pool p is DOWN: only UPIN or UP targets can be excluded");
    let (code, _, err) = run(&["pool", "reintegrate", "p", "--rank", "9"]);
    assert_eq!(code, 1);
    assert!(one_line(&err).contains("no targets on engine rank 9"), "{err}");
    for bad in [
        &["pool", "exclude", "p"][..],
        &["pool", "drain", "p", "--rank", "x"],
        &["pool", "exclude", "p", "--rank", "1", "--target", "70000"],
    ] {
        let (code, _, err) = run(bad);
        assert_eq!(code, 2, "{bad:?}: {err}");
        assert!(one_line(&err).starts_with("tessera: "), "{err}");
    }

    // --watch off a terminal: a line per state change, then the final line once idle.
    let mut watcher = Command::new(env!("CARGO_BIN_EXE_tessera"))
        .args(["--mgmt", a, "pool", "query", "p", "--watch"])
        .env_remove("TESSERA_MGMT")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(watcher.stdout.take().unwrap()).lines().map_while(Result::ok);
    let first = lines.next().unwrap();
    assert!(first.starts_with("pool p: rebuild running at map version 2, engines 0/3 done"), "{first}");
    engines.all_done("p", 2);
    let rest: Vec<String> = lines.collect();
    assert!(watcher.wait().unwrap().success());
    let last = rest.last().unwrap();
    assert!(last.starts_with("pool p: rebuild idle at map version 3 (last rebuild: map version 2, 3 MiB in "), "{rest:?}");
    let p = tessera_json(a, &["pool", "query", "p"]);
    assert_eq!((p["rebuild"]["state"].as_str(), p["rebuild"]["completed"].as_u64()), (Some("idle"), Some(1)));
    assert_eq!(p["map"]["targets"][4]["state"], "DOWNOUT", "{p}");

    // Back in: UP, reintegration.
    let (code, out, err) = run(&["pool", "reintegrate", "p", "--rank", "2"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out, "pool p: target 2:0 UP at map version 4; reintegration started — watch with: tessera pool query p --watch\n");
    let p = tessera_json(a, &["pool", "drain", "p", "--rank", "1", "--target", "1"]);
    assert_eq!(p["map"]["targets"][3]["drained"], true, "{p}");
}

#[test]
fn pool_extend_adds_an_engine_and_refuses_clearly() {
    let m = Mgmt::start();
    let a = m.addr.as_str();
    let engines = FakeEngines::register(a);
    tessera_json(a, &["pool", "create", "q", "--ranks", "0,1", "--class", "RP_2"]);
    let run = |args: &[&str]| {
        let mut all = vec!["--mgmt", a];
        all.extend_from_slice(args);
        tessera(&all)
    };
    let (code, out, err) = run(&["pool", "extend", "q", "--rank", "2"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        out,
        "pool q: engine 2 added (2 targets UP) at map version 2; data is moving onto them — watch with: tessera pool query q --watch\n"
    );
    let p = tessera_json(a, &["pool", "query", "q"]);
    assert_eq!(
        (p["map"]["version"].as_u64(), p["map"]["group_targets"].as_u64(), p["map"]["base_version"].as_u64()),
        (Some(2), Some(4), Some(1))
    );
    assert_eq!(p["map"]["targets"][4]["state"], "UP", "{p}");
    assert_eq!(p["map"]["targets"][4]["added"], 2, "{p}");
    assert_eq!(p["rebuild"]["state"], "running", "{p}");
    // Refusals: the service's line and exit 1; bad arguments exit 2.
    let (code, out, err) = run(&["pool", "extend", "q", "--rank", "2"]);
    assert_eq!((code, out.as_str()), (1, ""));
    assert_eq!(one_line(&err), "tessera: engine rank 2 already serves pool q");
    engines.all_done("q", 2);
    let (code, _, err) = run(&["pool", "extend", "q", "--rank", "7"]);
    assert_eq!(code, 1);
    assert_eq!(one_line(&err), "tessera: no engine with rank 7 is registered");
    for bad in [&["pool", "extend", "q"][..], &["pool", "extend", "q", "--rank", "x"]] {
        let (code, _, err) = run(bad);
        assert_eq!(code, 2, "{bad:?}: {err}");
        assert!(one_line(&err).starts_with("tessera: "), "{err}");
    }
    let p = tessera_json(a, &["pool", "query", "q"]);
    assert_eq!(p["map"]["targets"][4]["state"], "UPIN", "{p}");
}
