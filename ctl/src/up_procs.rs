//! The children of `tessera up` and the signals it handles: spawning a daemon with its output
//! appended to its log, noticing when one exits (and how), stopping them in order, and saying
//! what a child that failed logged last.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};

use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio::sync::mpsc;

use super::{SIGNAL_DEBOUNCE, TAIL_LINES};

/// One child process.
#[derive(Debug)]
pub(super) struct Proc {
    pub(super) name: String,
    pub(super) pid: u32,
    pub(super) log: PathBuf,
    /// Log file length before this run's header: where this run's output starts.
    pub(super) log_start: u64,
    pub(super) status: Option<ExitStatus>,
}

/// The children and their exits.
#[derive(Debug)]
pub(super) struct Procs {
    pub(super) list: Vec<Proc>,
    pub(super) logs: PathBuf,
    pub(super) tx: mpsc::UnboundedSender<(usize, ExitStatus)>,
    pub(super) rx: mpsc::UnboundedReceiver<(usize, ExitStatus)>,
}

pub(super) fn status_text(s: ExitStatus) -> String {
    match (s.code(), s.signal()) {
        (Some(c), _) => format!("exit status {c}"),
        (None, Some(sig)) => format!("killed by signal {sig}{}", signal_name(sig)),
        _ => s.to_string(),
    }
}

pub(super) fn signal_name(sig: i32) -> &'static str {
    match sig {
        2 => " (SIGINT)",
        6 => " (SIGABRT)",
        9 => " (SIGKILL)",
        11 => " (SIGSEGV)",
        15 => " (SIGTERM)",
        _ => "",
    }
}

impl Procs {
    pub(super) fn new(logs: PathBuf) -> Procs {
        let (tx, rx) = mpsc::unbounded_channel();
        Procs { list: Vec::new(), logs, tx, rx }
    }

    /// Starts `exe args` with stdout and stderr appended to `logs/<name>.log`, in its own
    /// process group. Returns its index.
    pub(super) fn spawn(&mut self, name: &str, exe: &Path, args: &[String]) -> Result<usize, String> {
        let log = self.logs.join(format!("{name}.log"));
        let mut file =
            OpenOptions::new().create(true).append(true).open(&log).map_err(|e| format!("cannot open {}: {e}", log.display()))?;
        let log_start = file.metadata().map(|m| m.len()).unwrap_or(0);
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        let _ = writeln!(file, "==== tessera up (Unix time {now}): {} {}", exe.display(), args.join(" "));
        let err = file.try_clone().map_err(|e| format!("cannot open {}: {e}", log.display()))?;
        let mut child = tokio::process::Command::new(exe)
            .args(args)
            .stdin(Stdio::null())
            .stdout(file)
            .stderr(err)
            .env("NO_COLOR", "1")
            .process_group(0)
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", exe.display()))?;
        let pid = child.id().unwrap_or(0);
        let idx = self.list.len();
        self.list.push(Proc { name: name.to_string(), pid, log, log_start, status: None });
        let tx = self.tx.clone();
        tokio::spawn(async move {
            // A wait that fails cannot be retried; call it a kill so nobody waits forever.
            let status = child.wait().await.unwrap_or_else(|_| ExitStatus::from_raw(9));
            let _ = tx.send((idx, status));
        });
        Ok(idx)
    }

    pub(super) fn record(&mut self, idx: usize, status: ExitStatus) -> Option<&Proc> {
        let p = self.list.get_mut(idx)?;
        p.status = Some(status);
        Some(p)
    }

    /// During start-up: an error (with the child's last log lines) if any child has exited.
    pub(super) fn check_startup(&mut self) -> Result<(), String> {
        while let Ok((idx, status)) = self.rx.try_recv() {
            if let Some(p) = self.record(idx, status) {
                return Err(failure(p, &format!("{} exited during start-up ({})", p.name, status_text(status))));
            }
        }
        Ok(())
    }

    pub(super) fn running(&self, idx: usize) -> bool {
        self.list.get(idx).is_some_and(|p| p.status.is_none())
    }

    pub(super) fn any_running(&self) -> bool {
        self.list.iter().any(|p| p.status.is_none())
    }

    pub(super) fn kill(&self, idx: usize, sig: rustix::process::Signal) {
        if let Some(p) = self.list.get(idx).filter(|p| p.status.is_none()) {
            if let Some(pid) = i32::try_from(p.pid).ok().and_then(rustix::process::Pid::from_raw) {
                let _ = rustix::process::kill_process(pid, sig);
            }
        }
    }

    /// SIGTERMs the running children among `idxs` and waits up to `grace` for them; whatever is
    /// left then gets SIGKILL, and so it does at once on another SIGINT/SIGTERM to `tessera up`
    /// more than [`SIGNAL_DEBOUNCE`] after `since` (wrappers such as `timeout` deliver one
    /// signal twice). Returns false if something had to be killed.
    pub(super) async fn stop(&mut self, idxs: &[usize], grace: Duration, signals: &mut Signals, since: Instant) -> bool {
        let idxs: Vec<usize> = idxs.iter().copied().filter(|&i| self.running(i)).collect();
        if idxs.is_empty() {
            return true;
        }
        for &i in &idxs {
            self.kill(i, rustix::process::Signal::TERM);
        }
        let deadline = tokio::time::Instant::now() + grace;
        let mut clean = true;
        let mut killed = false;
        while idxs.iter().any(|&i| self.running(i)) {
            tokio::select! {
                exit = self.rx.recv() => {
                    let Some((idx, status)) = exit else { break };
                    if let Some(p) = self.record(idx, status) {
                        // etcd ends a graceful stop by re-raising the SIGTERM it got.
                        if status.success() || std::os::unix::process::ExitStatusExt::signal(&status) == Some(15) {
                            eprintln!("tessera up: stopped {}", p.name);
                        } else {
                            eprintln!("tessera up: {} ended: {} (log: {})", p.name, status_text(status), p.log.display());
                        }
                    }
                }
                _ = tokio::time::sleep_until(deadline), if !killed => {
                    let names: Vec<&str> = idxs.iter().filter(|&&i| self.running(i)).filter_map(|&i| self.list.get(i)).map(|p| p.name.as_str()).collect();
                    eprintln!("tessera up: {} still running after {:?}: killing", names.join(", "), grace);
                    for &i in &idxs {
                        self.kill(i, rustix::process::Signal::KILL);
                    }
                    clean = false;
                    killed = true;
                }
                sig = signals.recv(), if !killed => {
                    if since.elapsed() < SIGNAL_DEBOUNCE {
                        continue;
                    }
                    eprintln!("tessera up: {sig} again: killing what is left");
                    for &i in &idxs {
                        self.kill(i, rustix::process::Signal::KILL);
                    }
                    clean = false;
                    killed = true;
                }
            }
        }
        clean
    }
}

/// `message` followed by the last lines `p` logged in this run.
pub(super) fn failure(p: &Proc, message: &str) -> String {
    let mut text = String::new();
    if let Ok(mut f) = File::open(&p.log) {
        let _ = f.seek(SeekFrom::Start(p.log_start));
        let _ = f.read_to_string(&mut text);
    }
    let lines: Vec<&str> = text.lines().filter(|l| !l.starts_with("==== tessera up")).collect();
    let tail = lines.get(lines.len().saturating_sub(TAIL_LINES)..).unwrap_or_default();
    if tail.is_empty() {
        eprintln!("tessera up: {} logged nothing ({})", p.name, p.log.display());
    } else {
        eprintln!("tessera up: last lines of {}:", p.log.display());
        for l in tail {
            eprintln!("  | {l}");
        }
    }
    format!("{message} (log: {})", p.log.display())
}

/// SIGINT, SIGTERM and SIGHUP (a closed terminal would otherwise end `tessera up` and leave
/// its daemons running).
#[derive(Debug)]
pub(super) struct Signals {
    pub(super) int: Signal,
    pub(super) term: Signal,
    pub(super) hup: Signal,
}

impl Signals {
    pub(super) fn new() -> Result<Signals, String> {
        let err = |e: std::io::Error| format!("cannot handle signals: {e}");
        Ok(Signals {
            int: signal(SignalKind::interrupt()).map_err(err)?,
            term: signal(SignalKind::terminate()).map_err(err)?,
            hup: signal(SignalKind::hangup()).map_err(err)?,
        })
    }

    pub(super) async fn recv(&mut self) -> &'static str {
        tokio::select! {
            _ = self.int.recv() => "SIGINT",
            _ = self.term.recv() => "SIGTERM",
            _ = self.hup.recv() => "SIGHUP",
        }
    }
}

/// A start-up step that timed out: the message, after the log tails of the children concerned.
pub(super) fn startup_timeout(procs: &Procs, idxs: &[usize], message: &str) -> String {
    let mut out = message.to_string();
    for p in idxs.iter().filter_map(|&i| procs.list.get(i)) {
        out = failure(p, &out);
    }
    out
}
