//! `tessera up --netns`: several machines on one. Every engine and every NVMe/TCP target runs in
//! a network namespace of its own, joined to the others by a bridge in this namespace, which
//! keeps the management service and the host (`nvme connect`). Each has its own interface
//! (`eth0`) and address, so processes really talk over separate links, and one can be cut off
//! with `ip link set <its veth> down` (or slowed with `tc netem` on it) and healed again.
//!
//! Addresses in the /24 `--netns-subnet` (default 10.88.0): the bridge `.1` (the management
//! service listens there), engine `r` `.(10 + r)`, target `i` `.(100 + i)`. Names carry a short
//! hash of the data directory, so two `tessera up`s on two directories do not collide; whatever
//! a previous run left is removed first, and everything is removed at the stop.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;

/// Most engines and targets a namespaced system has (addresses .10–.99 and .100–.254).
pub const MAX_ENGINES: u32 = 90;

/// One namespace: a process's network.
#[derive(Debug, Clone)]
pub struct Space {
    /// Namespace name.
    pub name: String,
    /// The veth end on the bridge (in this namespace): down = partitioned.
    pub link: String,
    /// Its address.
    pub ip: Ipv4Addr,
}

/// The bridge and the namespaces.
#[derive(Debug)]
pub struct Net {
    pub bridge: String,
    pub gateway: Ipv4Addr,
    pub engines: Vec<Space>,
    pub targets: Vec<Space>,
}

fn run_ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip").args(args).output().map_err(|e| format!("--netns needs iproute2 (`ip`): {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        let err = String::from_utf8_lossy(&out.stderr).trim().to_string();
        let hint = if err.contains("Operation not permitted") { " (--netns needs root)" } else { "" };
        Err(format!("ip {}: {err}{hint}", args.join(" ")))
    }
}

/// A short tag of the data directory for names (interface names hold 15 bytes).
fn tag(dir: &Path) -> String {
    let h = dir.to_string_lossy().bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3));
    format!("{:04x}", h & 0xFFFF)
}

/// Parses `A.B.C` into the subnet's three octets.
pub fn parse_subnet(s: &str) -> Result<[u8; 3], String> {
    let parts: Vec<u8> =
        s.split('.').map(|p| p.parse::<u8>()).collect::<Result<_, _>>().map_err(|_| format!("--netns-subnet {s:?} is not A.B.C"))?;
    match parts[..] {
        [a, b, c] => Ok([a, b, c]),
        _ => Err(format!("--netns-subnet {s:?} is not A.B.C (the first three octets of a /24)")),
    }
}

impl Net {
    /// The layout for `engines` engines and `targets` targets of the system in `dir`.
    pub fn plan(dir: &Path, subnet: [u8; 3], engines: u32, targets: usize) -> Result<Net, String> {
        if engines > MAX_ENGINES || targets > 100 {
            return Err(format!("--netns takes at most {MAX_ENGINES} engines and 100 targets"));
        }
        let t = tag(dir);
        let ip = |last: u32| Ipv4Addr::new(subnet[0], subnet[1], subnet[2], last as u8);
        let space =
            |kind: char, i: u32, last: u32| Space { name: format!("ts-{t}-{kind}{i}"), link: format!("tsv-{t}-{kind}{i}"), ip: ip(last) };
        Ok(Net {
            bridge: format!("tsbr-{t}"),
            gateway: ip(1),
            engines: (0..engines).map(|r| space('e', r, 10 + r)).collect(),
            targets: (0..targets as u32).map(|i| space('t', i, 100 + i)).collect(),
        })
    }

    /// Removes what a previous run left, then makes the bridge and every namespace.
    pub fn create(&self) -> Result<(), String> {
        self.remove();
        // A fixed address: a bridge otherwise takes the lowest of its ports', which changes as
        // ports come and go, and every namespace's ARP entry for the gateway goes stale.
        let mac = format!("02:54:53:00:{:02x}:{:02x}", self.gateway.octets()[1], self.gateway.octets()[2]);
        run_ip(&["link", "add", &self.bridge, "address", &mac, "type", "bridge"])?;
        run_ip(&["addr", "add", &format!("{}/24", self.gateway), "dev", &self.bridge])?;
        run_ip(&["link", "set", &self.bridge, "up"])?;
        for s in self.engines.iter().chain(&self.targets) {
            let peer = s.link.replacen("tsv-", "tsp-", 1);
            run_ip(&["netns", "add", &s.name])?;
            run_ip(&["link", "add", &s.link, "type", "veth", "peer", "name", &peer])?;
            run_ip(&["link", "set", &peer, "netns", &s.name])?;
            run_ip(&["-n", &s.name, "link", "set", &peer, "name", "eth0"])?;
            run_ip(&["-n", &s.name, "addr", "add", &format!("{}/24", s.ip), "dev", "eth0"])?;
            run_ip(&["-n", &s.name, "link", "set", "eth0", "up"])?;
            run_ip(&["-n", &s.name, "link", "set", "lo", "up"])?;
            run_ip(&["link", "set", &s.link, "master", &self.bridge])?;
            run_ip(&["link", "set", &s.link, "up"])?;
        }
        Ok(())
    }

    /// Removes the namespaces and the bridge (quietly: what does not exist is fine).
    pub fn remove(&self) {
        for s in self.engines.iter().chain(&self.targets) {
            let _ = Command::new("ip").args(["link", "del", &s.link]).output();
            let _ = Command::new("ip").args(["netns", "del", &s.name]).output();
        }
        let _ = Command::new("ip").args(["link", "del", &self.bridge]).output();
    }

    /// `exe args` run in namespace `s`: the program and arguments to spawn.
    pub fn wrap(s: &Space, exe: &Path, args: &[String]) -> (PathBuf, Vec<String>) {
        let mut all = vec!["netns".to_string(), "exec".to_string(), s.name.clone(), exe.display().to_string()];
        all.extend(args.iter().cloned());
        (PathBuf::from("ip"), all)
    }

    /// `addr`'s port at `ip`.
    pub fn at(ip: Ipv4Addr, port: u16) -> SocketAddr {
        SocketAddr::new(ip.into(), port)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_layout_names_fit_and_addresses_follow_the_subnet() {
        let n = Net::plan(Path::new("/srv/tessera-data"), parse_subnet("10.88.0").unwrap(), 64, 2).unwrap();
        assert_eq!(n.gateway, Ipv4Addr::new(10, 88, 0, 1));
        assert_eq!(n.engines[63].ip, Ipv4Addr::new(10, 88, 0, 73));
        assert_eq!(n.targets[1].ip, Ipv4Addr::new(10, 88, 0, 101));
        for s in n.engines.iter().chain(&n.targets) {
            assert!(s.link.len() <= 15 && s.link.replacen("tsv-", "tsp-", 1).len() <= 15 && n.bridge.len() <= 15, "{s:?}");
        }
        assert_ne!(tag(Path::new("/a")), tag(Path::new("/b")));
        assert!(parse_subnet("10.88").is_err() && parse_subnet("10.88.0.1").is_err() && parse_subnet("10.300.0").is_err());
        assert!(Net::plan(Path::new("/d"), [10, 88, 0], 91, 1).is_err());
    }
}
