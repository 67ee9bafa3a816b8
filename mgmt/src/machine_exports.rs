//! Exports: a volume or a snapshot of it served as a namespace of an NVMe subsystem (by the
//! `tessera-nvmf` listening on the export's address), or as a vhost-user-blk disk on a UNIX
//! socket (by the `tessera-nvmf` the export names). A volume, or one of its snapshots, is served
//! at most once of each kind; while anything of it is served it cannot be deleted or shrunk, and
//! a rollback must be forced. Part of [`super`]'s pure state machine.

use tessera_mgmt_api::{CreateVhostExport, VhostExportInfo, MAX_PATHS, VHOST_QUEUES_DEFAULT, VHOST_QUEUES_MAX, VHOST_SOCKET_MAX};

use super::*;
use crate::state::VhostExportRec;

fn export_info(state: &State, x: &ExportRec) -> Result<ExportInfo, CmdError> {
    Ok(ExportInfo {
        nqn: x.nqn.clone(),
        nsid: x.nsid,
        hosts: x.hosts.clone(),
        listen: x.listen.clone(),
        paths: x.paths.clone(),
        optimized: x.optimized.clone(),
        volume: volume(state, &x.pool, &x.volume)?,
        snapshot: match &x.snapshot {
            Some(name) => Some(snapshot_info(get_snapshot(get_volume(state, &x.pool, &x.volume)?, name)?, 0)),
            None => None,
        },
        reservation: x.reservation.clone(),
    })
}

/// Every export, by (nqn, nsid).
pub fn exports(state: &State) -> Vec<ExportInfo> {
    state.exports.values().filter_map(|x| export_info(state, x).ok()).collect()
}

pub(super) fn create_export(s: &mut State, req: &CreateExport) -> Result<Outcome, CmdError> {
    check_nqn("subsystem NQN", &req.nqn)?;
    if req.nqn == DISCOVERY_NQN {
        return invalid("the discovery subsystem cannot export namespaces");
    }
    let mut hosts = BTreeSet::new();
    for h in &req.hosts {
        check_nqn("host NQN", h)?;
        if !hosts.insert(h.as_str()) {
            return invalid(format!("host NQN {h} is listed twice"));
        }
    }
    if let Some(l) = &req.listen {
        parse_addr("listen address", l)?;
    }
    if req.paths.len() >= MAX_PATHS {
        return invalid(format!("{} paths: a subsystem is served on at most {MAX_PATHS}", req.paths.len() + 1));
    }
    let mut seen = BTreeSet::new();
    seen.insert(parse_addr("listen address", req.listen.as_deref().unwrap_or(DEFAULT_LISTEN))?);
    for p in &req.paths {
        if !seen.insert(parse_addr("path", p)?) {
            return invalid(format!("path {p} is listed twice"));
        }
    }
    if let Some(nsid) = req.nsid {
        if nsid == 0 || nsid == u32::MAX {
            return invalid(format!("namespace id {nsid} is not valid (1 to {})", u32::MAX - 1));
        }
    }
    let v = get_volume(s, &req.pool, &req.volume)?;
    if v.flattening && req.snapshot.is_none() {
        return conflict(format!("volume {}/{} is being flattened: export it once the flatten is done", req.pool, req.volume));
    }
    match &req.snapshot {
        Some(snap) => {
            get_snapshot(v, snap)?;
            if let Some(x) = s.snapshot_export(&req.pool, &req.volume, snap) {
                return conflict(format!(
                    "snapshot {}/{}@{snap} is already exported as namespace {} of {}",
                    req.pool, req.volume, x.nsid, x.nqn
                ));
            }
        }
        None => {
            if let Some(x) = s.export_of(&req.pool, &req.volume) {
                return conflict(format!("volume {}/{} is already exported as namespace {} of {}", req.pool, req.volume, x.nsid, x.nqn));
            }
        }
    }
    // Hosts and the listen address belong to the subsystem: a further namespace inherits them
    // when it leaves them out and must agree when it names them.
    let siblings: BTreeMap<u32, &ExportRec> = s.exports.values().filter(|x| x.nqn == req.nqn).map(|x| (x.nsid, x)).collect();
    let (mut hosts, mut listen) = (req.hosts.clone(), req.listen.clone().unwrap_or_else(|| DEFAULT_LISTEN.to_string()));
    let mut paths = req.paths.clone();
    let optimized = siblings.values().next().and_then(|first| first.optimized.clone());
    if let Some(first) = siblings.values().next() {
        if req.hosts.is_empty() {
            hosts = first.hosts.clone();
        } else if req.hosts.iter().collect::<BTreeSet<_>>() != first.hosts.iter().collect::<BTreeSet<_>>() {
            return conflict(format!("subsystem {} allows hosts {:?}: a namespace of it cannot name other hosts", req.nqn, first.hosts));
        }
        match &req.listen {
            None => listen = first.listen.clone(),
            Some(l) if parse_addr("listen address", l)? != parse_addr("listen address", &first.listen)? => {
                return conflict(format!("subsystem {} listens on {}, not {l}", req.nqn, first.listen));
            }
            Some(_) => {}
        }
        if req.listen.is_none() && req.paths.is_empty() {
            paths = first.paths.clone();
        } else if req.paths != first.paths {
            return conflict(format!(
                "subsystem {} is served on paths {:?} besides {}: a namespace of it cannot name others",
                req.nqn, first.paths, first.listen
            ));
        }
    }
    let nsid = match req.nsid {
        Some(n) if siblings.contains_key(&n) => return conflict(format!("namespace {n} of {} is already exported", req.nqn)),
        Some(n) => n,
        None => (1..u32::MAX).find(|n| !siblings.contains_key(n)).ok_or_else(|| CmdError::Conflict("no free namespace id".into()))?,
    };
    let rec = ExportRec {
        nqn: req.nqn.clone(),
        nsid,
        hosts,
        listen,
        paths,
        optimized,
        pool: req.pool.clone(),
        volume: req.volume.clone(),
        snapshot: req.snapshot.clone(),
        reservation: Reservation::default(),
    };
    let info = export_info(s, &rec)?;
    s.exports.insert((rec.nqn.clone(), nsid), rec);
    Ok(Outcome::Export(info))
}

pub(super) fn set_optimized(s: &mut State, nqn: &str, listen: &str) -> Result<Outcome, CmdError> {
    let want = parse_addr("listen address", listen)?;
    let keys: Vec<(String, u32)> = s.exports.keys().filter(|(n, _)| n == nqn).cloned().collect();
    let Some(first) = keys.first().and_then(|k| s.exports.get(k)) else {
        return Err(CmdError::NoExport { nqn: nqn.to_string(), nsid: 1 });
    };
    if first.paths.is_empty() {
        return conflict(format!("subsystem {nqn} has one path ({}): nothing to choose", first.listen));
    }
    let is = |a: &str| parse_addr("path", a).is_ok_and(|a| a == want);
    let optimized = if is(&first.listen) {
        None
    } else if let Some(p) = first.paths.iter().find(|p| is(p)) {
        Some(p.clone())
    } else {
        return invalid(format!("{listen} is not a path of subsystem {nqn} (its paths: {}, {})", first.listen, first.paths.join(", ")));
    };
    let mut out = Vec::new();
    for k in keys {
        if let Some(x) = s.exports.get_mut(&k) {
            x.optimized.clone_from(&optimized);
        }
        if let Some(x) = s.exports.get(&k) {
            out.push(export_info(s, x)?);
        }
    }
    Ok(Outcome::Exports(out))
}

/// Carries out a host's reservation command on namespace `nsid` of `nqn`. A command the rules
/// refuse is an outcome with its NVMe status (the host gets it), not an error, and changes
/// nothing.
pub(super) fn reservation(s: &mut State, nqn: &str, nsid: u32, cmd: &ReservationCommand) -> Result<Outcome, CmdError> {
    let x = s.exports.get_mut(&(nqn.to_string(), nsid)).ok_or_else(|| CmdError::NoExport { nqn: nqn.to_string(), nsid })?;
    let applied =
        tessera_nvme_resv::Command::parse(cmd.opcode, cmd.cdw10, &cmd.data).and_then(|c| x.reservation.state.apply(&cmd.host, &c));
    let status = match applied {
        Ok((next, notices)) => {
            x.reservation.state = next;
            x.reservation.record(&notices);
            0
        }
        Err(st) => st.to_field(),
    };
    Ok(Outcome::Reservation { status, reservation: x.reservation.clone() })
}

pub(super) fn delete_export(s: &mut State, nqn: &str, nsid: u32) -> Result<Outcome, CmdError> {
    let key = (nqn.to_string(), nsid);
    let x = s.exports.get(&key).ok_or_else(|| CmdError::NoExport { nqn: nqn.to_string(), nsid })?;
    let info = export_info(s, x)?;
    s.exports.remove(&key);
    Ok(Outcome::Export(info))
}

fn vhost_export_info(state: &State, x: &VhostExportRec) -> Result<VhostExportInfo, CmdError> {
    Ok(VhostExportInfo {
        socket: x.socket.clone(),
        target: x.target.clone(),
        queues: x.queues,
        read_only: x.read_only,
        volume: volume(state, &x.pool, &x.volume)?,
        snapshot: match &x.snapshot {
            Some(name) => Some(snapshot_info(get_snapshot(get_volume(state, &x.pool, &x.volume)?, name)?, 0)),
            None => None,
        },
    })
}

/// Every vhost-user-blk export, by socket.
pub fn vhost_exports(state: &State) -> Vec<VhostExportInfo> {
    state.vhost_exports.values().filter_map(|x| vhost_export_info(state, x).ok()).collect()
}

/// A socket path a daemon can bind: absolute, at most [`VHOST_SOCKET_MAX`] bytes, no NUL, no
/// `.` or `..` component, not a directory.
fn check_socket(path: &str) -> Result<(), CmdError> {
    if !path.starts_with('/') || path.ends_with('/') {
        return invalid(format!("socket {path:?} is not an absolute path to a file"));
    }
    if path.len() > VHOST_SOCKET_MAX {
        return invalid(format!("socket path {path:?} is {} bytes long, more than a UNIX socket holds ({VHOST_SOCKET_MAX})", path.len()));
    }
    if path.contains('\0') || path.split('/').any(|c| c == "." || c == "..") {
        return invalid(format!("socket path {path:?} must not hold NUL, '.' or '..'"));
    }
    Ok(())
}

pub(super) fn create_vhost_export(s: &mut State, req: &CreateVhostExport) -> Result<Outcome, CmdError> {
    check_socket(&req.socket)?;
    let queues = req.queues.unwrap_or(VHOST_QUEUES_DEFAULT);
    if !(1..=VHOST_QUEUES_MAX).contains(&queues) {
        return invalid(format!("{queues} queues: a vhost-user-blk disk has 1 to {VHOST_QUEUES_MAX}"));
    }
    let target = req.target.clone().unwrap_or_else(|| DEFAULT_LISTEN.to_string());
    parse_addr("target address", &target)?;
    if let Some(x) = s.vhost_exports.get(&req.socket) {
        return conflict(format!("socket {} already serves {}/{}", req.socket, x.pool, x.volume));
    }
    let v = get_volume(s, &req.pool, &req.volume)?;
    if v.flattening && req.snapshot.is_none() {
        return conflict(format!("volume {}/{} is being flattened: export it once the flatten is done", req.pool, req.volume));
    }
    let what = match &req.snapshot {
        Some(snap) => {
            get_snapshot(v, snap)?;
            format!("snapshot {}/{}@{snap}", req.pool, req.volume)
        }
        None => format!("volume {}/{}", req.pool, req.volume),
    };
    if let Some(x) = s.vhost_export_of(&req.pool, &req.volume, req.snapshot.as_deref()) {
        return conflict(format!("{what} is already a vhost-user-blk disk on {}", x.socket));
    }
    let rec = VhostExportRec {
        socket: req.socket.clone(),
        target,
        queues,
        read_only: req.read_only || req.snapshot.is_some(),
        pool: req.pool.clone(),
        volume: req.volume.clone(),
        snapshot: req.snapshot.clone(),
    };
    let info = vhost_export_info(s, &rec)?;
    s.vhost_exports.insert(rec.socket.clone(), rec);
    Ok(Outcome::VhostExport(info))
}

pub(super) fn delete_vhost_export(s: &mut State, socket: &str) -> Result<Outcome, CmdError> {
    let x = s.vhost_exports.get(socket).ok_or_else(|| CmdError::NoVhostExport(socket.to_string()))?;
    let info = vhost_export_info(s, x)?;
    s.vhost_exports.remove(socket);
    Ok(Outcome::VhostExport(info))
}
