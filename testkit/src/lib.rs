//! Test support: a local cluster of real processes — the management service (`tessera-mgmt`),
//! engines (`tessera-engine`, registered with it) and optionally the NVMe/TCP target
//! (`tessera-nvmf --mgmt`) — on 127.0.0.1 with free ports and a temporary directory, for
//! integration tests. Processes are killed and the directory removed on drop.
//!
//! Binaries come from the workspace's build profile (built on first use with `cargo build`).
#![forbid(unsafe_code)]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::missing_panics_doc)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::Once;
use std::time::{Duration, Instant};

use tessera_mgmt_api::{EngineState, MgmtClient};

pub mod etcd;
pub mod netns;

/// A free TCP port on 127.0.0.1 (bound, then released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// How often [`wait_for`] looks again.
pub const POLL: Duration = Duration::from_millis(100);

/// Waits on state: calls `check` every [`POLL`] until it returns `Ok`, and fails the test with
/// `what` and the last `Err` (what the state was instead) once `timeout` has passed.
pub fn wait_for<T>(what: &str, timeout: Duration, mut check: impl FnMut() -> Result<T, String>) -> T {
    let start = Instant::now();
    loop {
        match check() {
            Ok(v) => return v,
            Err(state) => assert!(start.elapsed() < timeout, "{what}: not after {timeout:?}: {state}"),
        }
        std::thread::sleep(POLL);
    }
}

/// `target/<profile>/`, where the workspace's binaries land.
pub fn profile_dir() -> PathBuf {
    // A test binary is target/<profile>/deps/<name>-<hash>.
    let exe = std::env::current_exe().unwrap();
    exe.parent().and_then(|d| d.parent()).unwrap().to_path_buf()
}

/// Builds the daemons once per test process (same profile as the test).
pub fn build_binaries() {
    static BUILD: Once = Once::new();
    BUILD.call_once(|| {
        let mut build = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
        build.args(["build", "--quiet", "-p", "tessera-mgmt", "-p", "tessera-engine", "-p", "tessera-nvmf", "--bins"]);
        if profile_dir().file_name().is_some_and(|n| n == "release") {
            build.arg("--release");
        }
        assert!(build.status().unwrap().success(), "cargo build of the daemons failed");
    });
}

/// Waits until `log` holds a line containing `what`.
pub fn wait_log(log: &Path, what: &str, timeout: Duration) {
    wait_for(&format!("{what:?} in {}", log.display()), timeout, || {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if text.contains(what) {
            Ok(())
        } else {
            Err(text.lines().last().unwrap_or("").to_string())
        }
    })
}

/// A running child process whose stderr is scanned for `listening addr=` and then drained
/// into a log file.
#[derive(Debug)]
pub struct Daemon {
    /// The process.
    pub child: Child,
    /// The address it announced.
    pub addr: String,
    /// Its log file.
    pub log: PathBuf,
}

impl Daemon {
    /// Starts `bin` with `args`, waits (up to 60 s) for a stderr line containing `ready` and
    /// `addr=`, and returns with the address.
    pub fn start(bin: &str, args: &[&str], ready: &str, log: &Path) -> Daemon {
        Self::start_in(&[], bin, args, ready, log)
    }

    /// [`Daemon::start`] through a command prefix (e.g. `ip netns exec NAME`, [`netns::Net::exec`]).
    pub fn start_in(prefix: &[String], bin: &str, args: &[&str], ready: &str, log: &Path) -> Daemon {
        let exe = profile_dir().join(bin);
        let mut cmd = match prefix.split_first() {
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(&exe);
                c
            }
            None => Command::new(&exe),
        };
        let mut child = cmd
            .args(args)
            .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()))
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {bin}: {e}"));
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = mpsc::channel();
        let log_path = log.to_path_buf();
        let wanted = ready.to_string();
        std::thread::spawn(move || {
            use std::io::Write;
            let mut out = std::fs::File::create(&log_path).unwrap();
            let mut sent = false;
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = writeln!(out, "{line}");
                if !sent && line.contains(&wanted) {
                    if let Some(a) = line.split("addr=").nth(1).and_then(|s| s.split_whitespace().next()) {
                        let _ = tx.send(a.to_string());
                        sent = true;
                    }
                }
            }
        });
        let addr = rx.recv_timeout(Duration::from_secs(60)).unwrap_or_else(|_| {
            let _ = child.kill();
            panic!("{bin} did not announce '{ready}'; log:\n{}", std::fs::read_to_string(log).unwrap_or_default())
        });
        Daemon { child, addr, log: log.to_path_buf() }
    }

    /// `kill -9`.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM and wait for the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let _ = Command::new("kill").arg("-TERM").arg(self.child.id().to_string()).status();
        self.child.wait().unwrap()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A local cluster: the management service and engines.
#[derive(Debug)]
pub struct LocalCluster {
    /// Working directory (removed on drop).
    pub dir: PathBuf,
    /// The management service.
    pub mgmt: Daemon,
    /// Engines by rank (`None` once killed).
    pub engines: Vec<Option<Daemon>>,
    targets: u16,
    capacity: String,
    engine_extra: String,
    hb_timeout: String,
    mgmt_args: Vec<String>,
    /// With [`LocalCluster::start_ha`]: the second management service (a follower at start).
    pub mgmt2: Option<Daemon>,
    /// With [`LocalCluster::start_ha`]: the etcd cluster holding the state.
    pub etcd: Option<etcd::EtcdCluster>,
    /// With [`LocalCluster::start_netns`]: the bridge and namespaces; engine `rank` runs in
    /// namespace `rank`.
    pub net: Option<netns::Net>,
}

/// A new, empty working directory for cluster `name` of this test process (the daemons are
/// built first).
fn fresh_dir(name: &str) -> PathBuf {
    build_binaries();
    let dir = std::env::temp_dir().join(format!("tessera-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Starts the management service of a cluster in `dir` (its database `mgmt.redb` there).
fn start_mgmt(dir: &Path, listen: &str, hb_timeout: &str, extra: &[String]) -> Daemon {
    let db = dir.join("mgmt.redb");
    let mut args =
        vec!["--listen", listen, "--db", db.to_str().unwrap(), "--heartbeat-timeout", hb_timeout, "--heartbeat-interval", "200ms"];
    args.extend(extra.iter().map(String::as_str));
    Daemon::start("tessera-mgmt", &args, "listening", &dir.join("mgmt.log"))
}

impl LocalCluster {
    /// Starts the management service (heartbeat timeout `hb_timeout`, e.g. `"1500ms"`) and
    /// `engines` engines with `targets` targets of `capacity` each, and waits until all are
    /// registered and up.
    pub fn start(name: &str, engines: u32, targets: u16, capacity: &str, hb_timeout: &str) -> LocalCluster {
        Self::start_with(name, engines, targets, capacity, hb_timeout, "")
    }

    /// Like [`LocalCluster::start`], with `engine_extra` (TOML, e.g. a `[tuning]` section)
    /// appended to every engine's configuration.
    pub fn start_with(name: &str, engines: u32, targets: u16, capacity: &str, hb_timeout: &str, engine_extra: &str) -> LocalCluster {
        Self::start_full(name, engines, targets, capacity, hb_timeout, engine_extra, &[])
    }

    /// Like [`LocalCluster::start_with`], with `mgmt_extra` arguments for the management service.
    pub fn start_full(
        name: &str,
        engines: u32,
        targets: u16,
        capacity: &str,
        hb_timeout: &str,
        engine_extra: &str,
        mgmt_extra: &[&str],
    ) -> LocalCluster {
        let dir = fresh_dir(name);
        let mgmt_args: Vec<String> = mgmt_extra.iter().map(|a| (*a).to_string()).collect();
        let mgmt = start_mgmt(&dir, "127.0.0.1:0", hb_timeout, &mgmt_args);
        let mut c = LocalCluster::around(dir, mgmt, mgmt_args, targets, capacity, hb_timeout);
        c.engine_extra = engine_extra.to_string();
        c.with_engines(engines)
    }

    /// The cluster of service `mgmt` in `dir`, before any engine.
    fn around(dir: PathBuf, mgmt: Daemon, mgmt_args: Vec<String>, targets: u16, capacity: &str, hb_timeout: &str) -> LocalCluster {
        LocalCluster {
            dir,
            mgmt,
            engines: Vec::new(),
            targets,
            capacity: capacity.to_string(),
            engine_extra: String::new(),
            hb_timeout: hb_timeout.to_string(),
            mgmt_args,
            mgmt2: None,
            etcd: None,
            net: None,
        }
    }

    /// Starts `engines` engines and waits until all are registered and up.
    fn with_engines(mut self, engines: u32) -> LocalCluster {
        for rank in 0..engines {
            let d = self.start_engine(rank);
            self.engines.push(Some(d));
        }
        self.wait_engines_up(engines as usize, Duration::from_secs(30));
        self
    }

    /// `kill -9` of the management service, then a start on its database and address (the
    /// engines' heartbeats find it again).
    pub fn restart_mgmt(&mut self) {
        self.mgmt.kill();
        let addr = self.mgmt.addr.clone();
        // The old log is kept beside the new one.
        let _ = std::fs::rename(self.dir.join("mgmt.log"), self.dir.join(format!("mgmt-{}.log", self.mgmt.child.id())));
        self.mgmt = start_mgmt(&self.dir, &addr, &self.hb_timeout, &self.mgmt_args);
        assert_eq!(self.mgmt.addr, addr, "the restarted service listens elsewhere");
    }

    /// High availability: a 3-member etcd cluster holding the state, two management services
    /// sharing it (the first elected leader before the second starts), and `engines` engines
    /// given both services' addresses.
    pub fn start_ha(name: &str, engines: u32, targets: u16, capacity: &str, hb_timeout: &str) -> LocalCluster {
        let dir = fresh_dir(name);
        let etcd = etcd::EtcdCluster::start(&dir, 3);
        let mgmt_args = vec!["--store".to_string(), format!("etcd:{}", etcd.endpoints())];
        let mgmt = start_mgmt(&dir, "127.0.0.1:0", hb_timeout, &mgmt_args);
        wait_log(&mgmt.log, "became the leader", Duration::from_secs(30));
        let second = dir.join("mgmt-2");
        std::fs::create_dir_all(&second).unwrap();
        let mgmt2 = start_mgmt(&second, "127.0.0.1:0", hb_timeout, &mgmt_args);
        let mut c = LocalCluster::around(dir, mgmt, mgmt_args, targets, capacity, hb_timeout);
        c.mgmt2 = Some(mgmt2);
        c.etcd = Some(etcd);
        c.with_engines(engines)
    }

    /// Several machines on one: a bridge and a network namespace per engine (engine `rank` in
    /// namespace `rank`, listening on its own address); the management service listens on the
    /// bridge's address. Further namespaces (targets, hosts) can be added to `net`.
    pub fn start_netns(name: &str, engines: u32, targets: u16, capacity: &str, hb_timeout: &str) -> LocalCluster {
        let dir = fresh_dir(name);
        let mut net = netns::Net::new();
        for _ in 0..engines {
            net.add();
        }
        let mgmt = start_mgmt(&dir, &format!("{}:0", net.gateway()), hb_timeout, &[]);
        let mut c = LocalCluster::around(dir, mgmt, Vec::new(), targets, capacity, hb_timeout);
        c.net = Some(net);
        c.with_engines(engines)
    }

    /// The management services' addresses, comma-separated (what engines, targets and clients
    /// are given).
    pub fn mgmt_addrs(&self) -> String {
        std::iter::once(&self.mgmt).chain(self.mgmt2.as_ref()).map(|d| d.addr.clone()).collect::<Vec<_>>().join(",")
    }

    /// The management client (of every service).
    pub fn client(&self) -> MgmtClient {
        MgmtClient::new(&self.mgmt_addrs())
    }

    /// Starts (or restarts) engine `rank` on its data directory.
    pub fn start_engine(&self, rank: u32) -> Daemon {
        let edir = self.dir.join(format!("engine-{rank}"));
        std::fs::create_dir_all(&edir).unwrap();
        let cfg = edir.join("engine.toml");
        std::fs::write(
            &cfg,
            format!(
                "rank = {rank}\nlisten = \"{}:0\"\ndata_dir = \"{}\"\ntargets = {}\ntarget_capacity = \"{}\"\n\n[mgmt]\naddress = \"{}\"\n{}",
                self.net.as_ref().map_or("127.0.0.1".to_string(), |n| n.spaces[rank as usize].ip.clone()),
                edir.join("data").display(),
                self.targets,
                self.capacity,
                self.mgmt_addrs(),
                self.engine_extra
            ),
        )
        .unwrap();
        let prefix = self.net.as_ref().map(|n| n.exec(rank as usize)).unwrap_or_default();
        Daemon::start_in(
            &prefix,
            "tessera-engine",
            &["--config", cfg.to_str().unwrap()],
            "engine listening",
            &edir.join(format!("engine-{rank}.log")),
        )
    }

    /// Data directory of engine `rank`'s target `t`.
    pub fn target_dir(&self, rank: u32, t: u16) -> PathBuf {
        self.dir.join(format!("engine-{rank}")).join("data").join(format!("target-{t}"))
    }

    /// `kill -9` engine `rank`.
    pub fn kill_engine(&mut self, rank: u32) {
        if let Some(mut d) = self.engines[rank as usize].take() {
            d.kill();
        }
    }

    /// Waits until `n` engines are registered and up.
    pub fn wait_engines_up(&self, n: usize, timeout: Duration) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let mgmt = self.client();
        wait_for(&format!("{n} engines up"), timeout, || {
            let up = rt.block_on(mgmt.system()).map(|s| s.engines.iter().filter(|e| e.state == EngineState::Up).count()).unwrap_or(0);
            if up >= n {
                Ok(())
            } else {
                Err(format!("{up} up"))
            }
        })
    }

    /// Waits until the service reports engine `rank` down.
    pub fn wait_engine_down(&self, rank: u32, timeout: Duration) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let mgmt = self.client();
        wait_for(&format!("engine {rank} marked down"), timeout, || {
            let down = rt
                .block_on(mgmt.system())
                .map(|s| s.engines.iter().any(|e| e.rank == rank && e.state == EngineState::Down))
                .unwrap_or(false);
            if down {
                Ok(())
            } else {
                Err("still up".into())
            }
        })
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        for e in self.engines.iter_mut().flatten() {
            e.kill();
        }
        self.mgmt.kill();
        if let Some(m) = self.mgmt2.as_mut() {
            m.kill();
        }
        self.etcd = None;
        self.net = None;
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}
