//! Network namespaces for tests of several machines on one: a bridge in the test's own
//! namespace (its address is the "gateway" the management service listens on) and one
//! namespace per process, each joined to the bridge by a veth pair with its own address, so
//! that processes talk over separate interfaces and one can be partitioned
//! ([`Net::cut`]: its link to the bridge goes down) and healed. Everything is named after the
//! test process (no clash between tests running at once) and removed on drop. Needs root and
//! `ip` (iproute2).

use std::process::Command;

/// Runs `ip` with `args`; panics with its output when it fails.
fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().unwrap_or_else(|e| panic!("cannot run ip: {e}"));
    assert!(out.status.success(), "ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
}

/// One namespace on the bridge.
#[derive(Debug)]
pub struct Space {
    /// Namespace name.
    pub name: String,
    /// Its address on the bridge.
    pub ip: String,
    /// The veth end on the bridge side (in the test's namespace).
    host_end: String,
}

/// A bridge and the namespaces joined to it.
#[derive(Debug)]
pub struct Net {
    tag: String,
    bridge: String,
    prefix: String,
    /// The namespaces, in the order added.
    pub spaces: Vec<Space>,
}

impl Net {
    /// A bridge `10.X.Y.1/24` (X, Y from the process id).
    pub fn new() -> Net {
        let pid = std::process::id();
        let tag = format!("{}", pid % 100_000);
        let prefix = format!("10.{}.{}", 200 + (pid / 250) % 50, pid % 250);
        let bridge = format!("tsb{tag}");
        let _ = Command::new("ip").args(["link", "del", &bridge]).output();
        // A fixed address: a bridge otherwise takes the lowest of its ports', which changes as
        // namespaces are added, and every neighbour's ARP entry for the gateway goes stale.
        let mac = format!("02:54:53:{:02x}:{:02x}:01", (pid >> 8) & 0xFF, pid & 0xFF);
        ip(&["link", "add", &bridge, "address", &mac, "type", "bridge"]);
        ip(&["addr", "add", &format!("{prefix}.1/24"), "dev", &bridge]);
        ip(&["link", "set", &bridge, "up"]);
        Net { tag, bridge, prefix, spaces: Vec::new() }
    }

    /// The bridge's address (the test's own namespace).
    pub fn gateway(&self) -> String {
        format!("{}.1", self.prefix)
    }

    /// A new namespace on the bridge; its index.
    pub fn add(&mut self) -> usize {
        let i = self.spaces.len();
        let name = format!("tsn{}-{i}", self.tag);
        let (host_end, inner) = (format!("tsh{}-{i}", self.tag), format!("tsi{}-{i}", self.tag));
        let addr = format!("{}.{}", self.prefix, i + 2);
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        ip(&["netns", "add", &name]);
        ip(&["link", "add", &host_end, "type", "veth", "peer", "name", &inner]);
        ip(&["link", "set", &inner, "netns", &name]);
        ip(&["link", "set", &host_end, "master", &self.bridge]);
        ip(&["link", "set", &host_end, "up"]);
        ip(&["netns", "exec", &name, "ip", "addr", "add", &format!("{addr}/24"), "dev", &inner]);
        ip(&["netns", "exec", &name, "ip", "link", "set", &inner, "up"]);
        ip(&["netns", "exec", &name, "ip", "link", "set", "lo", "up"]);
        self.spaces.push(Space { name, ip: addr, host_end });
        i
    }

    /// The command prefix that runs a program in namespace `i`.
    pub fn exec(&self, i: usize) -> Vec<String> {
        vec!["ip".into(), "netns".into(), "exec".into(), self.spaces[i].name.clone()]
    }

    /// Partitions namespace `i`: its link to the bridge goes down.
    pub fn cut(&self, i: usize) {
        ip(&["link", "set", &self.spaces[i].host_end, "down"]);
    }

    /// Heals the partition of namespace `i`.
    pub fn heal(&self, i: usize) {
        ip(&["link", "set", &self.spaces[i].host_end, "up"]);
    }
}

impl Default for Net {
    fn default() -> Self {
        Net::new()
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for s in &self.spaces {
            let _ = Command::new("ip").args(["link", "del", &s.host_end]).output();
            let _ = Command::new("ip").args(["netns", "del", &s.name]).output();
        }
        let _ = Command::new("ip").args(["link", "del", &self.bridge]).output();
    }
}
