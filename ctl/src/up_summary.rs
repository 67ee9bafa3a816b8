//! What `tessera up` prints once the system is up: the processes, the network (with
//! `--netns`), the pool, volume and exports, the commands that connect a host or a VM, and how
//! to manage it.

use std::io::Write;
use std::net::SocketAddr;
use std::path::Path;

use tessera_mgmt_api::TargetStateName;

use super::procs::Procs;
use super::{etcd, netns, reach, second_mgmt, Ready, UpArgs};
use crate::mgmt::size_text;

pub(super) fn print_summary(a: &UpArgs, dir: &Path, procs: &Procs, r: &Ready, net: Option<&netns::Net>) {
    let mut out = format!("Tessera is up (data in {}):\n", dir.display());
    if let Some(n) = net {
        out.push_str(&format!("  network: bridge {} ({}/24); each engine and target in its own namespace:\n", n.bridge, n.gateway));
        for (what, s) in n
            .engines
            .iter()
            .enumerate()
            .map(|(r, s)| (format!("engine-{r}"), s))
            .chain(n.targets.iter().enumerate().map(|(i, s)| (if i == 0 { "nvmf".to_string() } else { format!("nvmf-{}", i + 1) }, s)))
        {
            out.push_str(&format!(
                "    {what:<10} {:<12} netns {:<14} link {} (partition: ip link set {} down)\n",
                s.ip.to_string(),
                s.name,
                s.link,
                s.link
            ));
        }
    }
    for p in &procs.list {
        out.push_str(&format!("  {:<10} pid {:<8} log {}\n", p.name, p.pid, p.log.display()));
    }
    let targets = &r.pool.map.targets;
    let down: Vec<String> = targets
        .iter()
        .filter(|t| !matches!(t.state, TargetStateName::Up | TargetStateName::UpIn))
        .map(|t| format!("{}:{}", t.rank, t.index))
        .collect();
    out.push_str(&format!(
        "  pool {}: {} engines, {} targets ({} up), {} (reserved on disk), class {}\n",
        r.pool.name,
        r.pool.map.engines.len(),
        targets.len(),
        targets.len() - down.len(),
        size_text(r.pool.capacity),
        r.pool.default_class
    ));
    out.push_str(&format!("  volume {}: {}, {}, uuid {}\n", r.volume.name, size_text(r.volume.size), r.volume.class, r.volume.uuid));
    out.push_str(&format!("  export: {} nsid {} on {} (any host)\n", r.export.nqn, r.export.nsid, r.export.listen));
    if !r.export.paths.is_empty() {
        out.push_str(&format!("  further paths: {} (ANA: {} is optimized)\n", r.export.paths.join(", "), r.export.listen));
    }
    if let Some(x) = &r.vhost {
        out.push_str(&format!("  vhost-user-blk disk: {} ({} queues)\n", x.socket, x.queues));
    }
    if !down.is_empty() {
        out.push_str(&format!(
            "  note: targets (rank:index) {} are not up in pool {}'s map: its volumes run degraded\n",
            down.join(" "),
            r.pool.name
        ));
    }
    for n in &r.notes {
        out.push_str(&format!("  note: {n}\n"));
    }
    let host = reach(a.listen);
    out.push_str(&format!(
        "\nConnect a Linux host (modprobe nvme-tcp first):\n  nvme discover -t tcp -a {ip} -s {port}\n  nvme connect -t tcp -a {ip} -s {port} -n {nqn}\n",
        ip = host.ip(),
        port = host.port(),
        nqn = r.export.nqn
    ));
    for p in r.export.paths.iter().filter_map(|p| p.parse::<SocketAddr>().ok()) {
        let p = reach(p);
        out.push_str(&format!(
            "  nvme connect -t tcp -a {} -s {} -n {}    # another path: one namespace, several paths\n",
            p.ip(),
            p.port(),
            r.export.nqn
        ));
    }
    if let Some(x) = &r.vhost {
        out.push_str(&format!(
            "Give a QEMU VM the volume as its disk (shared guest memory):\n  -object memory-backend-memfd,id=mem,size=RAM,share=on -numa node,memdev=mem \\\n  -chardev socket,id=vblk,path={},reconnect=1 -device vhost-user-blk-pci,chardev=vblk,num-queues={}\n",
            x.socket, x.queues
        ));
    }
    let mut services = vec![reach(a.mgmt_listen).to_string()];
    if let Ok(second) = second_mgmt(a.mgmt_listen).map(reach) {
        if a.etcd {
            services.push(second.to_string());
            out.push_str(&format!(
                "The management state is in etcd ({}); two services share it, {} leads, {} follows.\n",
                etcd::members(a.etcd_base_port).map(|m| etcd::store_spec(&m)).unwrap_or_default(),
                services[0],
                services[1]
            ));
        }
    }
    out.push_str(&format!(
        "Manage it: tessera --mgmt {m} system query | volume list | export list\nCtrl-C stops everything.\n",
        m = services.join(",")
    ));
    print!("{out}");
    let _ = std::io::stdout().flush();
}
