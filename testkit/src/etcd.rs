//! A local etcd cluster of real `etcd` processes (Debian's `etcd-server`, installed by
//! `tests/nvme-cli/setup.sh`) on 127.0.0.1 with free ports, for tests of the management state in
//! etcd. Members are killed on drop; one can be killed and restarted.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::{free_port, wait_for, wait_log};

/// The etcd binary.
pub const ETCD: &str = "/usr/bin/etcd";

/// One member.
#[derive(Debug)]
pub struct EtcdMember {
    /// Its name (`m0`, `m1`, …).
    pub name: String,
    /// Client URL (`http://127.0.0.1:PORT`).
    pub client_url: String,
    peer_url: String,
    child: Option<Child>,
    /// Its log file.
    pub log: PathBuf,
}

/// An etcd cluster.
#[derive(Debug)]
pub struct EtcdCluster {
    dir: PathBuf,
    /// The members.
    pub members: Vec<EtcdMember>,
    initial: String,
}

impl EtcdCluster {
    /// Starts `n` members with data under `dir` and waits until every one serves clients.
    pub fn start(dir: &Path, n: usize) -> EtcdCluster {
        assert!(Path::new(ETCD).exists(), "{ETCD} is missing: install Debian's etcd-server (tests/nvme-cli/setup.sh does)");
        let members: Vec<EtcdMember> = (0..n)
            .map(|i| EtcdMember {
                name: format!("m{i}"),
                client_url: format!("http://127.0.0.1:{}", free_port()),
                peer_url: format!("http://127.0.0.1:{}", free_port()),
                child: None,
                log: dir.join(format!("etcd-m{i}.log")),
            })
            .collect();
        let initial = members.iter().map(|m| format!("{}={}", m.name, m.peer_url)).collect::<Vec<_>>().join(",");
        let mut c = EtcdCluster { dir: dir.to_path_buf(), members, initial };
        for i in 0..n {
            c.spawn(i, "new");
        }
        for i in 0..n {
            c.wait_ready(i);
        }
        c
    }

    fn spawn(&mut self, i: usize, state: &str) {
        let m = &self.members[i];
        let data = self.dir.join(format!("etcd-{}", m.name));
        let mut child = Command::new(ETCD)
            .args(["--name", &m.name, "--data-dir", data.to_str().unwrap()])
            .args(["--listen-client-urls", &m.client_url, "--advertise-client-urls", &m.client_url])
            .args(["--listen-peer-urls", &m.peer_url, "--initial-advertise-peer-urls", &m.peer_url])
            .args(["--initial-cluster", &self.initial, "--initial-cluster-state", state, "--initial-cluster-token", "tessera-test"])
            .args(["--heartbeat-interval", "100", "--election-timeout", "1000", "--max-txn-ops", "1024"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {ETCD}: {e}"));
        let stderr = child.stderr.take().unwrap();
        let log = m.log.clone();
        std::thread::spawn(move || {
            use std::io::Write;
            let mut out = std::fs::OpenOptions::new().create(true).append(true).open(&log).unwrap();
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = writeln!(out, "{line}");
            }
        });
        self.members[i].child = Some(child);
    }

    fn wait_ready(&self, i: usize) {
        wait_log(&self.members[i].log, "ready to serve client requests", Duration::from_secs(30));
    }

    /// The client URLs, comma-separated (for `--store etcd:…`).
    pub fn endpoints(&self) -> String {
        self.members.iter().map(|m| m.client_url.clone()).collect::<Vec<_>>().join(",")
    }

    /// `kill -9` member `i`.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.members[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts member `i` again on its data and waits until it serves clients.
    pub fn restart(&mut self, i: usize) {
        let before = std::fs::read_to_string(&self.members[i].log).unwrap_or_default().matches("ready to serve client requests").count();
        self.spawn(i, "existing");
        let m = &self.members[i];
        wait_for(&format!("etcd member {} serving again", m.name), Duration::from_secs(30), || {
            let n = std::fs::read_to_string(&m.log).unwrap_or_default().matches("ready to serve client requests").count();
            if n > before {
                Ok(())
            } else {
                Err(format!("{n} ready lines"))
            }
        });
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
        }
    }
}
