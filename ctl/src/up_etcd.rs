//! `tessera up --etcd`: the management state in a local 3-member etcd cluster (Debian's
//! `etcd-server`) shared by two management services, as it would be on three machines: which
//! ports, which arguments, and waiting until a member serves clients.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Members of the local etcd cluster.
pub const MEMBERS: u16 = 3;
/// Where Debian's `etcd-server` puts the binary.
pub const ETCD_BIN: &str = "/usr/bin/etcd";

/// One member: its name and its client and peer addresses (127.0.0.1, `base + 2i` and
/// `base + 2i + 1`).
#[derive(Debug, Clone)]
pub struct Member {
    pub name: String,
    pub client: SocketAddr,
    pub peer: SocketAddr,
}

/// The members of a cluster whose first client port is `base`.
pub fn members(base: u16) -> Result<Vec<Member>, String> {
    (0..MEMBERS)
        .map(|i| {
            let port = |k: u16| {
                base.checked_add(2 * i + k)
                    .map(|p| SocketAddr::new(std::net::Ipv4Addr::LOCALHOST.into(), p))
                    .ok_or_else(|| format!("--etcd-base-port {base} leaves no port for etcd member {i}"))
            };
            Ok(Member { name: format!("etcd-{i}"), client: port(0)?, peer: port(1)? })
        })
        .collect()
}

/// `etcd:http://…,http://…` for `tessera-mgmt --store`.
pub fn store_spec(members: &[Member]) -> String {
    let urls: Vec<String> = members.iter().map(|m| format!("http://{}", m.client)).collect();
    format!("etcd:{}", urls.join(","))
}

/// The etcd binary: Debian's, else `etcd` on PATH.
pub fn locate() -> Result<PathBuf, String> {
    if Path::new(ETCD_BIN).is_file() {
        return Ok(PathBuf::from(ETCD_BIN));
    }
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|d| d.join("etcd"))
        .find(|p| p.is_file())
        .ok_or_else(|| "--etcd needs etcd: apt-get install etcd-server".to_string())
}

/// Arguments of member `m` of `all`, its data in `dir/<name>` (an existing data directory
/// rejoins the cluster it belongs to; etcd ignores the initial-cluster flags then).
pub fn args(m: &Member, all: &[Member], dir: &Path) -> Vec<String> {
    let initial: Vec<String> = all.iter().map(|x| format!("{}=http://{}", x.name, x.peer)).collect();
    let client = format!("http://{}", m.client);
    let peer = format!("http://{}", m.peer);
    [
        ("--name", m.name.clone()),
        ("--data-dir", dir.join(&m.name).display().to_string()),
        ("--listen-client-urls", client.clone()),
        ("--advertise-client-urls", client),
        ("--listen-peer-urls", peer.clone()),
        ("--initial-advertise-peer-urls", peer),
        ("--initial-cluster", initial.join(",")),
        ("--initial-cluster-state", "new".into()),
        ("--initial-cluster-token", "tessera-up".into()),
        // One transaction per service commit: allow the larger ones.
        ("--max-txn-ops", tessera_mgmt_api::ETCD_MAX_TXN_OPS.to_string()),
    ]
    .into_iter()
    .flat_map(|(k, v)| [k.to_string(), v])
    .collect()
}

/// Waits until `addr` accepts TCP connections, or `deadline`.
pub async fn wait_listening(addr: SocketAddr, deadline: Instant) -> bool {
    while Instant::now() < deadline {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn members_take_consecutive_ports_and_name_each_other() {
        let m = members(2379).unwrap();
        assert_eq!(m.iter().map(|m| (m.client.port(), m.peer.port())).collect::<Vec<_>>(), [(2379, 2380), (2381, 2382), (2383, 2384)]);
        assert_eq!(store_spec(&m), "etcd:http://127.0.0.1:2379,http://127.0.0.1:2381,http://127.0.0.1:2383");
        let a = args(&m[1], &m, Path::new("/d"));
        let at = |k: &str| a.iter().position(|x| x == k).map(|i| a[i + 1].clone()).unwrap();
        assert_eq!(at("--data-dir"), "/d/etcd-1");
        assert_eq!(at("--initial-cluster"), "etcd-0=http://127.0.0.1:2380,etcd-1=http://127.0.0.1:2382,etcd-2=http://127.0.0.1:2384");
        assert!(members(65534).is_err());
    }
}
