#!/usr/bin/env python3
"""Tessera nvme-cli harness: real Linux initiator (QEMU/TCG guest) vs. the target.

Boots a Debian kernel in QEMU with the in-kernel nvme-tcp driver, nvme-cli and
fio, and drives the Tessera NVMe/TCP target running on the host
(127.0.0.1:PORT, seen by the guest as 10.0.2.2:PORT through QEMU user
networking).  Guest scripts (guest/*.sh) report results on the serial console
with marker lines; this driver evaluates them as named cases.

Python 3 standard library only.  See README.md in this directory.
"""

import argparse
import datetime
import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent

NQN_A = "nqn.2026-11.io.tessera:test"
NQN_B = "nqn.2026-11.io.tessera:restricted"
SERIAL_A = "TSRTEST0001"
MODEL_A = "Tessera test"
SERIAL_B = "TSRTEST0002"
MODEL_B = "Tessera restricted"
SIZE_A_MIB = 256
SIZE_B_MIB = 64
NS2_MIB = 32
NS2_GROW_MIB = 48
ALLOWED_HOSTID = "11111111-2222-3333-4444-555555555555"
ALLOWED_HOSTNQN = "nqn.2014-08.org.nvmexpress:uuid:" + ALLOWED_HOSTID
GUEST_HOST_ADDR = "10.0.2.2"  # the host's 127.0.0.1 as seen from a QEMU user-net guest

MARKER_RE = re.compile(r"@@(BEGIN|CASE|REQUEST|MARK|INIT|TEST-EXIT)\b\s*(.*)$")
CASE_RE = re.compile(r"^(\S+)\s+(PASS|FAIL)\b\s*(.*)$")
RUN_CASE_RE = re.compile(r"^\s*run_case\s+(\S+)", re.M)
PANIC_RE = re.compile(r"Kernel panic|BUG: |Oops|general protection fault|hung_task|blocked for more than")


VERBOSE = False


def log(msg):
    print(f"[nvme-cli {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --------------------------------------------------------------------- cpio --
def newc_archive(files):
    """Build a cpio 'newc' archive. files: list of (path, bytes, mode)."""
    out = bytearray()

    def pad4(n):
        return (4 - n % 4) % 4

    def entry(ino, name, data, mode):
        nameb = name.encode() + b"\0"
        fields = [ino, mode, 0, 0, 1, int(time.time()), len(data), 0, 0, 0, 0, len(nameb), 0]
        hdr = b"070701" + b"".join(b"%08X" % f for f in fields)
        out.extend(hdr + nameb + b"\0" * pad4(len(hdr) + len(nameb)))
        out.extend(data + b"\0" * pad4(len(data)))

    for i, (name, data, mode) in enumerate(files, start=1):
        entry(i, name.lstrip("/"), data, mode)
    entry(0, "TRAILER!!!", b"", 0)
    out.extend(b"\0" * ((512 - len(out) % 512) % 512))
    return bytes(out)


# -------------------------------------------------------------------- QEMU --
class Qemu:
    """A QEMU guest whose serial console is read line by line on a thread."""

    def __init__(self, name, kernel, initrd, append, logfile, netdev_extra="", mem=1024):
        self.name = name
        self.logfile = open(logfile, "w", buffering=1, encoding="utf-8", errors="replace")
        self.lines = queue.Queue()
        cmd = [
            "qemu-system-x86_64", "-accel", "tcg,thread=multi", "-cpu", "max",
            "-m", str(mem), "-smp", "2", "-display", "none", "-monitor", "none",
            "-serial", "stdio", "-no-reboot", "-nodefaults",
            "-kernel", str(kernel), "-initrd", str(initrd),
            "-append", "console=ttyS0 panic=-1 loglevel=4 edd=off " + append,
            "-netdev", "user,id=n0" + netdev_extra,
            "-device", "virtio-net-pci,netdev=n0",
        ]
        self.logfile.write("## qemu: " + " ".join(cmd) + "\n")
        self.t0 = time.time()
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        self.killed = False

    def _read(self):
        buf = b""
        while True:
            chunk = self.proc.stdout.read1(4096) if hasattr(self.proc.stdout, "read1") else self.proc.stdout.read(1)
            if not chunk:
                break
            buf += chunk
            while b"\n" in buf:
                raw, buf = buf.split(b"\n", 1)
                self._emit(raw)
        if buf:
            self._emit(buf)
        self.lines.put(None)

    def _emit(self, raw):
        line = raw.decode("utf-8", "replace").replace("\r", "").replace("\x1b", "^[")
        self.logfile.write(f"[{time.time() - self.t0:7.2f}] {line}\n")
        if VERBOSE and self.name != "reftarget":
            print(f"  | {line}", flush=True)
        self.lines.put(line)

    def note(self, msg):
        self.logfile.write(f"## host: {msg}\n")

    def send(self, text):
        try:
            self.proc.stdin.write(text.encode() + b"\n")
            self.proc.stdin.flush()
            self.note(f"sent to console: {text}")
        except (BrokenPipeError, OSError) as e:
            self.note(f"send failed: {e}")

    def kill(self):
        if self.proc.poll() is None:
            self.killed = True
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait()

    def close(self):
        self.kill()
        self.reader.join(timeout=5)
        self.logfile.close()


# ----------------------------------------------------------------- targets --
def port_open(port, host="127.0.0.1"):
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


class TargetLog:
    """What both targets share: the last lines of their log file."""

    def log_tail(self, n=30):
        try:
            return "\n".join(self.logpath.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"


class TargetError(Exception):
    pass


class TesseraTarget(TargetLog):
    """The tessera-nvmf binary on the host, configured through a TOML file."""

    kind = "tessera"

    def __init__(self, binary, workdir, logdir, port):
        self.binary = Path(binary)
        self.config = Path(workdir) / "tessera.toml"
        self.logpath = Path(logdir) / "target.log"
        self.port = port
        self.proc = None
        self.logf = None
        self.fd_baseline = None
        self.extra_hosts_b = []  # host NQNs allowed into subsystem B at run time
        self.extra_ns = {}  # nsid -> MiB, added to subsystem A at run time

    def render_config(self):
        lines = [f'listen = ["127.0.0.1:{self.port}"]', ""]

        def subsystem(nqn, serial, model, any_host, hosts, namespaces):
            lines.extend([
                "[[subsystem]]", f'nqn = "{nqn}"', f'serial = "{serial}"', f'model = "{model}"',
                f"allow_any_host = {'true' if any_host else 'false'}",
                "allowed_hosts = [" + ", ".join(f'"{h}"' for h in hosts) + "]", "",
            ])
            for nsid, mib in namespaces:
                lines.extend([
                    "[[subsystem.namespace]]", f"nsid = {nsid}", 'bdev = "malloc"',
                    f"size_mib = {mib}", "block_size = 512", "",
                ])

        subsystem(NQN_A, SERIAL_A, MODEL_A, True, [],
                  [(1, SIZE_A_MIB)] + sorted(self.extra_ns.items()))
        subsystem(NQN_B, SERIAL_B, MODEL_B, False, [ALLOWED_HOSTNQN] + self.extra_hosts_b, [(1, SIZE_B_MIB)])
        return "\n".join(lines)

    def write_config(self):
        tmp = self.config.with_suffix(".tmp")
        tmp.write_text(self.render_config())
        os.replace(tmp, self.config)  # atomic: the target never sees a half file

    def start(self):
        if port_open(self.port):
            raise TargetError(f"something already listens on 127.0.0.1:{self.port} "
                              f"(another target still running?)")
        self.write_config()
        env = dict(os.environ)
        env.setdefault("RUST_LOG", "info")
        env.setdefault("RUST_BACKTRACE", "1")
        env.setdefault("NO_COLOR", "1")
        self.logpath.write_text("")
        self.logf = open(self.logpath, "a")  # O_APPEND: shared with the child, annotations land in order
        self.logf.write(f"## config {self.config}:\n{self.config.read_text()}\n## --- target stderr ---\n")
        self.logf.flush()
        self.proc = subprocess.Popen([str(self.binary), "--config", str(self.config)],
                                     stdin=subprocess.DEVNULL, stdout=self.logf,
                                     stderr=subprocess.STDOUT, env=env, start_new_session=True)
        deadline = time.time() + 30
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise TargetError(f"target exited with status {self.proc.returncode} during startup; "
                                  f"log tail:\n{self.log_tail()}")
            if port_open(self.port):
                time.sleep(0.5)
                self.fd_baseline = self.fd_count()
                return
            time.sleep(0.2)
        raise TargetError(f"target did not listen on 127.0.0.1:{self.port} within 30s; "
                          f"log tail:\n{self.log_tail()}")

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def fd_count(self):
        try:
            return len(os.listdir(f"/proc/{self.proc.pid}/fd"))
        except OSError:
            return None

    def fd_leak(self, wait=15):
        """None if the open fds return to the startup count, else a message."""
        if self.fd_baseline is None:
            return None
        deadline = time.time() + wait
        while True:
            n = self.fd_count()
            if n is None or n <= self.fd_baseline:
                return None
            if time.time() > deadline:
                return (f"target has {n} open fds after all hosts disconnected, "
                        f"{self.fd_baseline} at startup (sockets leaked?)")
            time.sleep(0.5)

    def status(self):
        if self.proc is None:
            return "not started"
        rc = self.proc.poll()
        if rc is None:
            return "running"
        if rc < 0:
            return f"killed by signal {-rc}"
        return f"exited with status {rc}"

    def reload(self, what):
        if not self.alive():
            raise TargetError("target is not running")
        self.write_config()
        self.annotate(f"{what}; sending SIGHUP")
        self.proc.send_signal(signal.SIGHUP)

    def annotate(self, msg):
        if self.logf and not self.logf.closed:
            self.logf.write(f"## harness {time.strftime('%H:%M:%S')}: {msg}\n")
            self.logf.flush()

    def problems(self):
        """Lines of the target log that show a bug even if every case passed."""
        try:
            text = self.logpath.read_text(errors="replace")
        except OSError:
            return []
        return [l for l in text.splitlines() if "panicked at" in l or "RUST_BACKTRACE" in l]

    def add_namespace(self, nsid, mib):
        self.extra_ns[nsid] = mib
        self.reload(f"added nsid {nsid} ({mib} MiB) to {NQN_A}")

    def grow_namespace(self, nsid, mib):
        if nsid not in self.extra_ns:
            raise TargetError(f"nsid {nsid} was never added")
        self.extra_ns[nsid] = mib
        self.reload(f"grew nsid {nsid} to {mib} MiB")

    def remove_namespace(self, nsid):
        if nsid not in self.extra_ns:
            raise TargetError(f"nsid {nsid} was never added")
        del self.extra_ns[nsid]
        self.reload(f"removed nsid {nsid} from {NQN_A}")

    def allow_host_b(self, hostnqn):
        self.extra_hosts_b.append(hostnqn)
        self.reload(f"allowed host {hostnqn} into {NQN_B}")

    def stop(self):
        if self.proc is None:
            return
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
            except ProcessLookupError:
                pass
        if self.logf:
            self.logf.close()


REF_TARGET_SCRIPT = r"""
# Linux nvmet reference target (harness self-test only).
C=/sys/kernel/config/nvmet
mkdir -p /srv && mount -t tmpfs -o size=700m tmpfs /srv
echo "nullb: $(ls /sys/kernel/config/nullb 2>&1)"
nullb() {  # name MiB
    d=/sys/kernel/config/nullb/$1; mkdir $d
    echo $2 > $d/size; echo 512 > $d/blocksize; echo 1 > $d/memory_backed
    echo 1 > $d/discard; echo 1 > $d/power
    i=0; while [ ! -b /dev/$1 ] && [ $i -lt 50 ]; do sleep 0.1; i=$((i+1)); done
}
subsys() {  # nqn serial model allow_any
    mkdir $C/subsystems/$1
    echo $2 > $C/subsystems/$1/attr_serial
    echo "$3" > $C/subsystems/$1/attr_model
    echo $4 > $C/subsystems/$1/attr_allow_any_host
}
ns() {  # nqn nsid path [buffered]
    d=$C/subsystems/$1/namespaces/$2; mkdir $d
    echo -n $3 > $d/device_path
    [ -n "$4" ] && echo 1 > $d/buffered_io
    echo 1 > $d/enable
}
add_ns() { truncate -s ${3}M /srv/ns-$2.img && ns $1 $2 /srv/ns-$2.img buffered; }
grow_ns() { truncate -s ${3}M /srv/ns-$2.img && echo 1 > $C/subsystems/$1/namespaces/$2/revalidate_size; }
rm_ns() { echo 0 > $C/subsystems/$1/namespaces/$2/enable && rmdir $C/subsystems/$1/namespaces/$2 && rm -f /srv/ns-$2.img; }
allow_host() { mkdir -p $C/hosts/$2 && ln -s $C/hosts/$2 $C/subsystems/$1/allowed_hosts/$2; }
set -x
nullb nullba __SIZE_A__; nullb nullbb __SIZE_B__
subsys __NQN_A__ __SERIAL_A__ "__MODEL_A__" 1
subsys __NQN_B__ __SERIAL_B__ "__MODEL_B__" 0
mkdir $C/hosts/__ALLOWED__
ln -s $C/hosts/__ALLOWED__ $C/subsystems/__NQN_B__/allowed_hosts/__ALLOWED__
ns __NQN_A__ 1 /dev/nullba
ns __NQN_B__ 1 /dev/nullbb
mkdir $C/ports/1
echo tcp > $C/ports/1/addr_trtype; echo ipv4 > $C/ports/1/addr_adrfam
echo 0.0.0.0 > $C/ports/1/addr_traddr; echo 4420 > $C/ports/1/addr_trsvcid
ln -s $C/subsystems/__NQN_A__ $C/ports/1/subsystems/__NQN_A__
ln -s $C/subsystems/__NQN_B__ $C/ports/1/subsystems/__NQN_B__
set +x
echo "@@TARGET ready"
stty -echo 2>/dev/null
while read -r cmd; do
    id="${cmd%% *}"; c="${cmd#* }"
    if eval "$c"; then echo "@@DONE $id ok"; else echo "@@DONE $id err"; fi
done
"""


class ReferenceTarget(TargetLog):
    """Linux's own nvmet-tcp in a second QEMU guest (port-forwarded to the
    host's 127.0.0.1:PORT).  Only for validating the harness itself."""

    kind = "reference"

    def __init__(self, kernel, base_initrd, workdir, logdir, port):
        self.kernel, self.base_initrd = kernel, base_initrd
        self.workdir, self.logpath, self.port = Path(workdir), Path(logdir) / "target.log", port
        self.vm = None
        self.events = queue.Queue()
        self.seq = 0

    def start(self):
        if port_open(self.port):
            raise TargetError(f"something already listens on 127.0.0.1:{self.port}")
        script = REF_TARGET_SCRIPT
        for k, v in {"__NQN_A__": NQN_A, "__NQN_B__": NQN_B, "__SERIAL_A__": SERIAL_A,
                     "__SERIAL_B__": SERIAL_B, "__MODEL_A__": MODEL_A, "__MODEL_B__": MODEL_B,
                     "__SIZE_A__": str(SIZE_A_MIB), "__SIZE_B__": str(SIZE_B_MIB),
                     "__ALLOWED__": ALLOWED_HOSTNQN}.items():
            script = script.replace(k, v)
        initrd = self.workdir / "initrd-reftarget"
        with open(initrd, "wb") as f:
            with open(self.base_initrd, "rb") as b:
                shutil.copyfileobj(b, f)
            f.write(newc_archive([("test.sh", script.encode(), 0o100755)]))
        self.vm = Qemu("reftarget", self.kernel, initrd, "tessera.nvmet", self.logpath,
                       netdev_extra=f",hostfwd=tcp:127.0.0.1:{self.port}-:4420", mem=1536)
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                line = self.vm.lines.get(timeout=1)
            except queue.Empty:
                continue
            if line is None:
                raise TargetError("reference target VM exited during startup")
            if "@@TARGET ready" in line:
                threading.Thread(target=self._pump, daemon=True).start()
                return
        raise TargetError("reference target VM not ready within 120s")

    def _pump(self):
        while True:
            line = self.vm.lines.get()
            if line is None:
                return
            m = re.search(r"@@DONE (\d+) (\w+)", line)
            if m:
                self.events.put((int(m.group(1)), m.group(2)))

    def _cmd(self, shell):
        self.seq += 1
        self.vm.send(f"{self.seq} {shell}")
        deadline = time.time() + 30
        while time.time() < deadline:
            try:
                seq, st = self.events.get(timeout=1)
            except queue.Empty:
                continue
            if seq == self.seq:
                if st != "ok":
                    raise TargetError(f"reference target command failed: {shell}")
                return
        raise TargetError(f"reference target did not answer: {shell}")

    def alive(self):
        return self.vm is not None and self.vm.proc.poll() is None

    def annotate(self, msg):
        if self.vm:
            self.vm.note(msg)

    def problems(self):
        try:
            text = self.logpath.read_text(errors="replace")
        except OSError:
            return []
        return [l for l in text.splitlines() if PANIC_RE.search(l)]

    def status(self):
        return "running" if self.alive() else "VM exited"

    def add_namespace(self, nsid, mib):
        self._cmd(f"add_ns {NQN_A} {nsid} {mib}")

    def grow_namespace(self, nsid, mib):
        self._cmd(f"grow_ns {NQN_A} {nsid} {mib}")

    def remove_namespace(self, nsid):
        self._cmd(f"rm_ns {NQN_A} {nsid}")

    def allow_host_b(self, hostnqn):
        self._cmd(f"allow_host {NQN_B} {hostnqn}")

    def stop(self):
        if self.vm:
            self.vm.close()


# ------------------------------------------------------------------- boots --
class Boot:
    """One guest boot running one guest script."""

    def __init__(self, name, script, timeout, on_mark=None):
        self.name = name
        self.script = HERE / "guest" / script
        self.timeout = timeout
        self.on_mark = on_mark or {}
        self.cases = RUN_CASE_RE.findall(self.script.read_text())


class HostVanishes:
    """Host-side part of the host-vanishes case."""

    def __init__(self):
        self.killed_at = None
        self.problems = []

    def kill_guest(self, guest, target, port):
        time.sleep(2)
        guest.note("SIGKILL QEMU while fio is running")
        target.annotate("host-vanishes: guest QEMU SIGKILLed mid-fio")
        log("host-vanishes: killing the guest (SIGKILL) in the middle of fio")
        guest.kill()
        self.killed_at = time.time()
        time.sleep(3)
        if not target.alive():
            self.problems.append(f"target {target.status()} after the host vanished")
        elif not port_open(port):
            self.problems.append(f"target no longer accepts TCP connections on port {port}")


class Result:
    def __init__(self, name, ok, reason="", info=""):
        self.name, self.ok, self.reason, self.info = name, ok, reason, info


def fio_job_files():
    """The repository's fio job files as cpio entries under /fio-jobs (the directory first)."""
    jobs = sorted((REPO / "fio-jobs").glob("*.fio"))
    return [("fio-jobs", b"", 0o040755)] + [(f"fio-jobs/{j.name}", j.read_bytes(), 0o100644) for j in jobs]


def run_boot(boot, kernel, base_initrd, env_text, workdir, logdir, target, ctx, scale):
    """Boot a guest with boot.script; returns (dict case->Result, notes)."""
    lib = (HERE / "guest-lib.sh").read_bytes()
    script = boot.script.read_bytes()
    initrd = Path(workdir) / f"initrd-{boot.name}"
    with open(initrd, "wb") as f:
        with open(base_initrd, "rb") as b:
            shutil.copyfileobj(b, f)
        f.write(newc_archive([
            ("etc/test-env.sh", env_text.encode(), 0o100644),
            ("guest-lib.sh", lib, 0o100644),
            ("test.sh", script, 0o100755),
        ] + fio_job_files()))
    logfile = Path(logdir) / f"console-{boot.name}.log"
    log(f"boot {boot.name}: starting guest (console log {logfile})")
    guest = Qemu(boot.name, kernel, initrd, "", logfile)
    results, notes = {}, []
    current, booted, test_exit = None, False, None
    deadline = time.time() + boot.timeout * scale
    timed_out = False
    try:
        while True:
            remaining = deadline - time.time()
            if remaining <= 0:
                timed_out = True
                guest.note(f"boot timeout ({boot.timeout * scale:.0f}s) - killing QEMU")
                notes.append(f"guest boot timed out after {boot.timeout * scale:.0f}s"
                             + (f" during case {current}" if current else ""))
                guest.kill()
                break
            try:
                line = guest.lines.get(timeout=min(remaining, 1.0))
            except queue.Empty:
                continue
            if line is None:
                break
            if PANIC_RE.search(line):
                notes.append(f"kernel: {line.strip()}")
            m = MARKER_RE.search(line)
            if not m:
                continue
            kind, rest = m.group(1), m.group(2).strip()
            if kind == "INIT":
                if rest.startswith("ready"):
                    booted = True
                    log(f"boot {boot.name}: guest up ({rest})")
                elif not rest.startswith("start"):
                    notes.append(f"init: {rest}")
            elif kind == "BEGIN":
                current = rest
                target.annotate(f"[{boot.name}] case {rest} begins")
                log(f"  {rest} ...")
            elif kind == "CASE":
                cm = CASE_RE.match(rest)
                if cm:
                    name, st, why = cm.groups()
                    ok = st == "PASS"
                    if not ok and not target.alive():
                        why += f" [target {target.status()}]"
                    target.annotate(f"[{boot.name}] case {name} {st}")
                    results[name] = Result(name, ok, "" if ok else why, why if ok else "")
                    log(f"  {name}: {st} {why}")
                    current = None
            elif kind == "REQUEST":
                reply = ctx.handle_request(rest, guest)
                guest.send(f"@@REPLY {reply}")
            elif kind == "MARK":
                fn = boot.on_mark.get(rest)
                if fn:
                    fn(guest)
                    if guest.killed:
                        break
            elif kind == "TEST-EXIT":
                test_exit = rest
        if not timed_out and guest.proc.poll() is None:
            try:
                guest.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
    finally:
        guest.close()
    if not booted:
        notes.append("guest never reached '@@INIT ready' (kernel/initramfs problem?)")
    if test_exit not in (None, "0"):
        notes.append(f"test script exit status {test_exit}")
    for name in boot.cases:
        if name in results or not ctx.selected(name):
            continue
        if name == current:
            why = "started but never finished"
        else:
            why = "not reached"
        if notes:
            why += " (" + "; ".join(notes[:3]) + ")"
        results[name] = Result(name, False, why)
    log(f"boot {boot.name}: done in {time.time() - guest.t0:.0f}s")
    return results, notes


def established_conns(port):
    """ESTABLISHED TCP sockets whose local port is PORT (the target's side)."""
    n = 0
    for path in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(path) as f:
                next(f)
                for line in f:
                    fields = line.split()
                    if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "01":
                        n += 1
        except OSError:
            pass
    return n


class Context:
    def __init__(self, target, selected, port):
        self.port = port
        self.target = target
        self._selected = selected

    def selected(self, name):
        return not self._selected or name in self._selected

    def handle_request(self, rest, guest):
        parts = rest.split()
        guest.note(f"request: {rest}")
        log(f"  host request: {rest}")
        try:
            if parts[0] == "add-ns":
                self.target.add_namespace(int(parts[1]), int(parts[2]))
            elif parts[0] == "grow-ns":
                self.target.grow_namespace(int(parts[1]), int(parts[2]))
            elif parts[0] == "remove-ns":
                self.target.remove_namespace(int(parts[1]))
            elif parts[0] == "allow-host-b":
                self.target.allow_host_b(parts[1])
            elif parts[0] == "expect-conns-min":
                n = established_conns(self.port)
                if n < int(parts[1]):
                    return f"err only {n} established TCP connections to port {self.port}, expected >= {parts[1]}"
                return f"ok {n} established connections"
            elif parts[0] == "wait-conns-closed":
                limit, t0 = float(parts[1]), time.time()
                n0 = established_conns(self.port)
                while True:
                    n = established_conns(self.port)
                    if n == 0:
                        msg = f"all {n0} connections closed by the target after {time.time() - t0:.1f}s"
                        guest.note(msg)
                        self.target.annotate(f"partition: {msg}")
                        return "ok " + msg
                    if time.time() - t0 > limit:
                        return (f"err target still has {n} of {n0} TCP connections established "
                                f"{limit:.0f}s after the host went silent (keep-alive timeout not enforced?)")
                    time.sleep(0.5)
            else:
                return f"err unknown request {parts[0]}"
        except (TargetError, IndexError, ValueError) as e:
            return f"err {e}"
        return "ok"


# ------------------------------------------------------------------- main --
def guest_env(port, cases):
    v = {
        "TADDR": GUEST_HOST_ADDR, "TPORT": port, "NQN_A": NQN_A, "NQN_B": NQN_B,
        "SERIAL_A": SERIAL_A, "MODEL_A": MODEL_A, "SIZE_A_MIB": SIZE_A_MIB,
        "SIZE_B_MIB": SIZE_B_MIB, "NS2_MIB": NS2_MIB, "NS2_GROW_MIB": NS2_GROW_MIB,
        "ALLOWED_HOSTNQN": ALLOWED_HOSTNQN, "ALLOWED_HOSTID": ALLOWED_HOSTID,
        "CASES": " ".join(cases),
    }
    return "".join(f"{k}='{val}'\n" for k, val in v.items())


DEPENDS = {"ns-grow": ["ns-add-aen"], "ns-remove-aen": ["ns-add-aen"]}
HOST_CASES = ["host-vanishes", "target-alive", "target-log-clean", "target-no-fd-leak"]


def main():
    # SIGTERM (e.g. from CI's timeout) unwinds like Ctrl-C, so the finally
    # blocks kill QEMU and the target instead of leaving them running.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", action="append", default=[], metavar="NAME",
                    help="run only this case (repeatable); see --list")
    ap.add_argument("--list", action="store_true", help="list the cases and exit")
    ap.add_argument("--keep", action="store_true", help="keep the work dir (config, initrds)")
    ap.add_argument("--no-build", action="store_true", help="do not run cargo build")
    ap.add_argument("--no-setup", action="store_true", help="do not run setup.sh (cache must exist)")
    ap.add_argument("--target-bin", help="target binary (default target/release/tessera-nvmf)")
    ap.add_argument("--port", type=int, default=4420)
    ap.add_argument("--log-dir", help="default target/nvme-cli-logs/<timestamp>")
    ap.add_argument("--timeout-scale", type=float, default=1.0, help="multiply guest boot timeouts")
    ap.add_argument("--reference", action="store_true",
                    help="self-test: run against Linux nvmet in a second VM instead of Tessera")
    ap.add_argument("--script", metavar="FILE",
                    help="debug: boot one guest running FILE (guest-lib.sh available) and echo its console")
    ap.add_argument("--verbose", "-v", action="store_true", help="echo guest consoles to stdout")
    ap.add_argument("--kernel-compare", action="store_true",
                    help="instead of the cases: same-guest fio comparison of nvmet-tcp (brd) and tessera-nvmf "
                         "(malloc), written to target/nvme-cli-logs/kernel-compare.md (see kernel_compare.py)")
    args = ap.parse_args()
    if args.kernel_compare:
        import kernel_compare
        return kernel_compare.main((["--no-build"] if args.no_build else []) + (["--no-setup"] if args.no_setup else []))
    global VERBOSE
    VERBOSE = args.verbose or bool(args.script)

    vanish = HostVanishes()
    boots = [
        Boot("main", "main.sh", timeout=1500),
        Boot("host-vanishes-1", "host-vanishes-1.sh", timeout=240,
             on_mark={"fio-running": lambda g: vanish.kill_guest(g, target, args.port)}),
        Boot("host-vanishes-2", "host-vanishes-2.sh", timeout=400),
    ]
    if args.script:
        boots = [Boot("script", Path(args.script).resolve(), timeout=1500)]
    all_cases = [c for b in boots for c in b.cases] + (["target-alive", "target-log-clean", "target-no-fd-leak"] if args.script else HOST_CASES)
    if args.list:
        for b in boots:
            for c in b.cases:
                print(f"{c:24s} (guest boot {b.name})")
        for c in HOST_CASES:
            print(f"{c:24s} (host side)")
        return 0
    selected = set()
    for c in args.case:
        if c not in all_cases:
            ap.error(f"unknown case {c!r}; known: {' '.join(all_cases)}")
        selected.add(c)
        selected.update(DEPENDS.get(c, []))
    if "host-vanishes" in selected:
        selected.update(["host-vanishes-start", "host-vanishes-next-host"])
    if selected & {"host-vanishes-start", "host-vanishes-next-host"}:
        selected.update(["host-vanishes", "host-vanishes-start", "host-vanishes-next-host"])
    if selected:
        selected.update(["target-alive", "target-log-clean", "target-no-fd-leak"])

    def want(name):
        return not selected or name in selected

    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    logdir = Path(args.log_dir) if args.log_dir else REPO / "target" / "nvme-cli-logs" / stamp
    logdir.mkdir(parents=True, exist_ok=True)
    latest = logdir.parent / "latest"
    try:
        if latest.is_symlink() or latest.exists():
            latest.unlink()
        latest.symlink_to(logdir.name)
    except OSError:
        pass
    workdir = Path(tempfile.mkdtemp(prefix="tessera-nvme-cli-"))
    t_start = time.time()
    results = {}
    target = None

    def finish(code):
        lines = []
        for c in all_cases:
            if not want(c):
                continue
            r = results.get(c) or Result(c, False, "not run")
            lines.append(f"PASS {c}" + (f" ({r.info})" if r.info else "") if r.ok else f"FAIL {c}: {r.reason}")
        npass = sum(1 for c in all_cases if want(c) and results.get(c) and results[c].ok)
        nfail = sum(1 for c in all_cases if want(c)) - npass
        summary = "\n".join(lines) + f"\n\nnvme-cli: {npass} passed, {nfail} failed\n"
        summary += f"(took {time.time() - t_start:.0f}s, target: {target.kind if target else '-'})\n"
        (logdir / "summary.txt").write_text(summary)
        print("\n===== summary =====")
        print(summary, end="")
        if nfail or code:
            print(f"FAILED - consoles and target log in: {logdir}")
        else:
            print(f"logs: {logdir}")
        if args.keep:
            print(f"work dir kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
        return 1 if (nfail or code) else 0

    def fail_all(reason):
        for c in all_cases:
            if want(c):
                results[c] = Result(c, False, reason)
        return finish(1)

    # 1. guest image
    if args.no_setup:
        cache = Path(os.environ.get("TESSERA_GUEST_CACHE", REPO / "target" / "nvme-cli-guest"))
        kernel, base_initrd = cache / "vmlinuz", cache / "base.cpio"
    else:
        log("setup.sh (packages, kernel, base initramfs)")
        p = subprocess.run(["bash", str(HERE / "setup.sh")], stdout=subprocess.PIPE, text=True)
        if p.returncode != 0:
            return fail_all(f"setup.sh failed with status {p.returncode}")
        kv = dict(l.split("=", 1) for l in p.stdout.splitlines() if "=" in l)
        kernel, base_initrd = Path(kv["KERNEL"]), Path(kv["INITRD"])
    if not kernel.exists() or not base_initrd.exists():
        return fail_all(f"guest image missing ({kernel}, {base_initrd}); run setup.sh")

    # 2. target
    try:
        if args.reference:
            log("starting the Linux nvmet reference target VM")
            target = ReferenceTarget(kernel, base_initrd, workdir, logdir, args.port)
        else:
            binary = Path(args.target_bin) if args.target_bin else REPO / "target" / "release" / "tessera-nvmf"
            if not args.no_build and not args.target_bin:
                log("cargo build --release -p tessera-nvmf")
                blog = logdir / "build.log"
                with open(blog, "w") as bf:
                    p = subprocess.run(["cargo", "build", "--release", "-p", "tessera-nvmf"],
                                       cwd=REPO, stdout=bf, stderr=subprocess.STDOUT)
                if p.returncode != 0:
                    tail = "\n".join(blog.read_text(errors="replace").splitlines()[-25:])
                    print(tail)
                    return fail_all(f"target did not build (cargo exit {p.returncode}, see {blog})")
            if not binary.exists():
                return fail_all(f"target binary {binary} not found")
            target = TesseraTarget(binary, workdir, logdir, args.port)
        target.start()
        log(f"target up ({target.kind}) on 127.0.0.1:{args.port}; log {target.logpath}")
    except TargetError as e:
        print(str(e))
        if target:
            target.stop()
        return fail_all(f"target did not start: {str(e).splitlines()[0]}")
    except BaseException:
        if target:
            target.stop()
        raise

    ctx = Context(target, selected, args.port)
    env_text = guest_env(args.port, sorted(selected))
    try:
        for boot in boots:
            if boot.cases and not any(want(c) for c in boot.cases):
                continue
            if not target.alive():
                for c in boot.cases:
                    if want(c):
                        results[c] = Result(c, False, f"target {target.status()} before boot {boot.name}")
                continue
            r, _notes = run_boot(boot, kernel, base_initrd, env_text, workdir, logdir,
                                 target, ctx, args.timeout_scale)
            results.update(r)
            if boot.name == "host-vanishes-1" and want("host-vanishes"):
                if vanish.killed_at is None:
                    results["host-vanishes"] = Result("host-vanishes", False,
                                                      "guest never reported fio running, so it was not killed")
        if want("host-vanishes") and "host-vanishes" not in results:
            nh = results.get("host-vanishes-next-host")
            if vanish.problems:
                results["host-vanishes"] = Result("host-vanishes", False, "; ".join(vanish.problems))
            elif not nh or not nh.ok:
                results["host-vanishes"] = Result("host-vanishes", False,
                                                  "the next host could not use the target after the first vanished")
            else:
                results["host-vanishes"] = Result("host-vanishes", True)
        if target.alive():
            results["target-alive"] = Result("target-alive", True)
        else:
            results["target-alive"] = Result("target-alive", False, f"target {target.status()}")
            print("target log tail:\n" + target.log_tail())
        leak = target.fd_leak() if target.alive() and hasattr(target, "fd_leak") else None
        if leak:
            results["target-no-fd-leak"] = Result("target-no-fd-leak", False, leak)
        elif not target.alive():
            results["target-no-fd-leak"] = Result("target-no-fd-leak", False, f"target {target.status()}")
        else:
            base = getattr(target, "fd_baseline", None)
            results["target-no-fd-leak"] = Result("target-no-fd-leak", True,
                                                  info=f"back to {base} open fds" if base else "not measured")
        bad = target.problems()
        if bad:
            results["target-log-clean"] = Result("target-log-clean", False,
                                                 f"{len(bad)} panic/bug line(s) in the target log, first: {bad[0].strip()}")
        else:
            results["target-log-clean"] = Result("target-log-clean", True)
    finally:
        target.stop()
    return finish(0)


if __name__ == "__main__":
    sys.exit(main())
