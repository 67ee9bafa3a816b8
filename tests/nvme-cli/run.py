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

    def __init__(self, name, kernel, initrd, append, logfile, netdev_extra="", mem=1024, vhost_blk=None):
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
        if vhost_blk:
            # vhost-user-blk: the guest's memory is shared with the backend (memfd), 2 queues
            cmd += ["-object", f"memory-backend-memfd,id=mem0,size={mem}M,share=on", "-numa", "node,memdev=mem0",
                    "-chardev", f"socket,id=vblk0,path={vhost_blk},reconnect=1",
                    "-device", "vhost-user-blk-pci,chardev=vblk0,num-queues=2"]
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


# ----------------------------------------------------------------- cluster --
EC_NQN = "nqn.2026-11.io.tessera:ec-vol0"
EC_CLASS = "EC_2P1"
EC_SIZE_MIB = 256
EC_ENGINES = 3
EC_TARGETS = 2
EC_KILL_RANK = 1
# the heal boot: a second cluster of HEAL_ENGINES engines (same class, size and targets per
# engine), two of them killed one after the other, then restarted in reverse order
HEAL_NQN = "nqn.2026-11.io.tessera:heal-vol0"
HEAL_ENGINES = 4
HEAL_KILL_RANKS = (1, 3)  # killed in this order, restarted (reintegrated) in the reverse order
EC_PORT_RANGE = (21000, 31000)  # below Linux's ephemeral range (32768..)


def port_free(port, host="127.0.0.1"):
    """True if nothing listens on (or holds) host:port: a plain bind succeeds."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.bind((host, port))
        return True
    except OSError:
        return False
    finally:
        s.close()


def free_port_block(n, lo, hi, rng):
    """The first port of n consecutive free ports, from a random start in [lo, hi)."""
    for _ in range(200):
        base = rng.randrange(lo, hi - n)
        if all(port_free(base + i) for i in range(n)):
            return base
    raise TargetError(f"no {n} consecutive free ports found in {lo}..{hi}")


class TesseraCluster(TargetLog):
    """A whole Tessera system on 127.0.0.1 started by `tessera up`: tessera-mgmt, `engines`
    tessera-engine processes (EC_TARGETS targets each) and tessera-nvmf in managed mode,
    serving one EC_2P1 volume as `nqn`.  Ports are free ones found at start (a block of
    engines + 2 consecutive ports: mgmt, the engines, the NVMe/TCP listener).  `name` names
    its directory (WORK/<name>-cluster), its log (<name>-cluster.log) and the copy of the
    daemons' logs (<name>-cluster/)."""

    kind = "tessera up"

    def __init__(self, tessera_bin, workdir, logdir, port_base=None, name="ec", engines=EC_ENGINES, nqn=EC_NQN,
                 vhost=False, paths=0):
        self.bin = Path(tessera_bin)
        # with vhost: tessera up also serves the volume over vhost-user-blk on this socket, and
        # the guest gets it as /dev/vda
        self.vhost_sock = Path(workdir) / f"{name}-vhost.sock" if vhost else None
        self.name = name
        self.engines = engines
        # further paths: tessera up --path starts one more tessera-nvmf per path (nvmf-2, ...),
        # serving the same subsystem (ANA multipath); their ports follow the first target's
        self.paths = paths
        self.nqn = nqn
        self.dir = Path(workdir) / f"{name}-cluster"
        self.logdir = Path(logdir)
        self.logpath = self.logdir / f"{name}-cluster.log"  # tessera up's own output + harness notes
        self.port_base = port_base
        self.proc = None
        self.lines = []  # tessera up's stdout/stderr lines
        self.pids = {}  # daemon name -> pid, from tessera up's summary
        self.killed = {}  # daemon name -> (pid, time, note)
        self.volume = None
        self.down_msg = None  # what wait_engine_down saw
        self.rebuilt_msg = None  # what wait_engine_rebuilt saw
        self.down_after = {}  # rank -> seconds from SIGKILL until the service showed it down
        self.rebuilt = {}  # rank -> (seconds from SIGKILL, message) when its shards were seen rebuilt
        self.argv = {}  # daemon name -> its command line (read from /proc when it was killed)
        self.restarted = {}  # engine name -> (Popen, time) of the harness's restart of a killed engine
        self.registered_after = {}  # rank -> seconds from the restart until the service showed it up
        self.reintegrated = {}  # rank -> (seconds from the restart, message) when its targets were UPIN
        self.restart_status = {}  # engine name -> exit status of the restarted engine at the end
        self.exit_status = None
        self.logf = None
        self._cond = threading.Condition()

    # ports: mgmt = base, engine r = base + 1 + r, NVMe/TCP = base + 1 + engines, further
    # paths after it
    @property
    def mgmt_addr(self):
        return f"127.0.0.1:{self.base}"

    @property
    def port(self):
        return self.base + 1 + self.engines

    def path_port(self, i):
        """Port of path i (0: the first target, nvmf; i: nvmf-<i + 1>)."""
        return self.port + i

    @staticmethod
    def nvmf_name(i):
        return "nvmf" if i == 0 else f"nvmf-{i + 1}"

    def note(self, msg):
        line = f"## harness {time.strftime('%H:%M:%S')}: {msg}"
        with self._cond:
            if self.logf and not self.logf.closed:
                self.logf.write(line + "\n")
                self.logf.flush()

    def annotate(self, msg):
        self.note(msg)
        try:  # also in the target's log, between its own lines (tessera up opened it O_APPEND)
            with open(self.dir / "logs" / "nvmf.log", "a") as f:
                f.write(f"## harness {time.strftime('%H:%M:%S')}: {msg}\n")
        except OSError:
            pass

    def _read(self, stream):
        for raw in stream:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            with self._cond:
                self.lines.append(line)
                if self.logf and not self.logf.closed:
                    self.logf.write(f"[{time.strftime('%H:%M:%S')}] {line}\n")
                    self.logf.flush()
                self._cond.notify_all()
        with self._cond:
            self.lines.append(None)
            self._cond.notify_all()

    def _wait_line(self, pred, timeout):
        """Waits until a line of tessera up's output satisfies pred (returns it) or the output
        ends / timeout passes (returns None)."""
        deadline = time.time() + timeout
        seen = 0
        with self._cond:
            while True:
                for line in self.lines[seen:]:
                    if line is None:
                        return None
                    if pred(line):
                        return line
                seen = len(self.lines)
                left = deadline - time.time()
                if left <= 0:
                    return None
                self._cond.wait(left)

    def tessera(self, *args, timeout=30):
        """Runs `tessera --mgmt ADDR ARGS --json`; returns the parsed JSON."""
        import json
        p = subprocess.run([str(self.bin), "--mgmt", self.mgmt_addr, *args, "--json"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=timeout)
        if p.returncode != 0:
            raise TargetError(f"tessera {' '.join(args)}: exit {p.returncode}: {p.stderr.strip()}")
        return json.loads(p.stdout)

    def start(self):
        import random
        rng = random.Random()
        self.logf = open(self.logpath, "a")
        for attempt in range(5):
            self.base = self.port_base if self.port_base else free_port_block(self.engines + 2 + self.paths, *EC_PORT_RANGE, rng)
            if self._start_once(attempt):
                return
            if self.port_base:
                break
        raise TargetError(f"tessera up did not start; last lines:\n{self.log_tail()}")

    def _start_once(self, attempt):
        self.exit_status = None
        shutil.rmtree(self.dir, ignore_errors=True)
        self.dir.mkdir(parents=True)
        cmd = [str(self.bin), "up", "--dir", str(self.dir),
               "--engines", str(self.engines), "--targets", str(EC_TARGETS), "--target-capacity", "512M",
               "--listen", f"127.0.0.1:{self.port}", "--mgmt-listen", self.mgmt_addr,
               "--engine-base-port", str(self.base + 1),
               "--class", EC_CLASS, "--volume-size", f"{EC_SIZE_MIB}M", "--nqn", self.nqn, "--timeout", "60"]
        if self.vhost_sock:
            cmd += ["--vhost-blk", str(self.vhost_sock)]
        for i in range(1, self.paths + 1):
            cmd += ["--path", f"127.0.0.1:{self.path_port(i)}"]
        self.note(f"attempt {attempt + 1}: {' '.join(cmd)}")
        env = dict(os.environ)
        env.setdefault("RUST_LOG", "info")
        env.setdefault("RUST_BACKTRACE", "1")
        env.setdefault("NO_COLOR", "1")
        with self._cond:
            self.lines = []
        self.pids = {}
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, env=env, start_new_session=True)
        threading.Thread(target=self._read, args=(self.proc.stdout,), daemon=True).start()
        ready = self._wait_line(lambda l: l.startswith("Ctrl-C stops everything"), 240)
        if ready is None:
            if self.proc.poll() is None:
                self.stop_up(grace=15)
            self.exit_status = self.proc.wait()
            text = "\n".join(l for l in self.lines if l)
            if "in use" in text or "Address already" in text:
                self.note("a port was taken meanwhile; trying other ports")
                return False
            raise TargetError(f"tessera up did not come up (exit {self.exit_status}):\n{self.log_tail()}")
        for line in self.lines:
            m = re.match(r"\s+(mgmt|engine-\d+|nvmf(?:-\d+)?)\s+pid (\d+)\s", line or "")
            if m:
                self.pids[m.group(1)] = int(m.group(2))
        want = {"mgmt"} | {f"engine-{r}" for r in range(self.engines)} | {self.nvmf_name(i) for i in range(self.paths + 1)}
        if set(self.pids) != want:
            raise TargetError(f"tessera up's summary names {sorted(self.pids)}, expected {sorted(want)}")
        exports = [e for e in self.tessera("export", "list")["exports"] if e["nqn"] == self.nqn]
        if len(exports) != 1:
            raise TargetError(f"the service lists {len(exports)} exports of {self.nqn}")
        self.volume = exports[0]["volume"]
        self.note(f"up: pids {self.pids}; volume {self.volume}")
        return True

    def check_up(self):
        """None if the cluster looks as asked for, else what is wrong."""
        sysq = self.tessera("system", "query")
        up = [e["rank"] for e in sysq["engines"] if e["state"] == "up"]
        v = self.volume
        if sorted(up) != list(range(self.engines)):
            return f"engines up: {up}, expected 0..{self.engines - 1}"
        if v["class"] != EC_CLASS or v["size"] != EC_SIZE_MIB << 20:
            return f"exported volume is {v['class']} of {v['size']} bytes, expected {EC_CLASS} of {EC_SIZE_MIB} MiB"
        pool = self.tessera("pool", "query", v["pool"])
        states = [t["state"] for t in pool["map"]["targets"]]
        if len(states) != self.engines * EC_TARGETS or any(s not in ("UP", "UPIN") for s in states):
            return f"pool targets: {states}"
        return None

    def info(self):
        v = self.volume
        return (f"{self.engines} engines x {EC_TARGETS} targets, {v['class']} volume of {v['size'] >> 20} MiB "
                f"({v['block_size']} B blocks) as {self.nqn} on port {self.port}, mgmt on {self.base}")

    def proc_alive(self, pid):
        """The process exists and is not a zombie."""
        try:
            with open(f"/proc/{pid}/stat") as f:
                return f.read().rsplit(")", 1)[1].split()[0] != "Z"
        except (OSError, IndexError):
            return False

    def dead_daemons(self):
        """Daemons that should be running and are not: tessera up's children except the ones
        the harness killed, and the engines the harness restarted."""
        dead = []
        for name, pid in self.pids.items():
            if name in self.restarted:
                if self.restarted[name][0].poll() is not None:
                    dead.append(f"{name} (restarted)")
            elif name not in self.killed and not self.proc_alive(pid):
                dead.append(name)
        return dead

    def alive(self):
        if self.proc is None or self.proc.poll() is not None:
            return False
        return not self.dead_daemons()

    def status(self):
        if self.proc is None:
            return "not started"
        if self.proc.poll() is not None:
            return f"tessera up exited with status {self.proc.returncode}"
        dead = self.dead_daemons()
        return f"{', '.join(dead)} not running" if dead else "running"

    def kill_engine(self, rank, during=""):
        """SIGKILLs engine `rank` and waits until tessera up reports it killed by signal 9."""
        name = f"engine-{rank}"
        pid = self.pids.get(name)
        if pid is None or name in self.killed:
            raise TargetError(f"no running {name}")
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            raise TargetError(f"{name} (pid {pid}) is not running")
        if "tessera-engine" not in cmdline or f"engine-{rank}" not in cmdline:
            raise TargetError(f"pid {pid} is not {name}: {cmdline}")
        with open(f"/proc/{pid}/cmdline", "rb") as f:  # for a restart: the same command line
            self.argv[name] = [a.decode() for a in f.read().split(b"\0") if a]
        os.kill(pid, signal.SIGKILL)
        t = time.time()
        msg = f"SIGKILL {name} (pid {pid}) {during}".strip()
        self.annotate(msg)
        log(f"  {msg}")
        self.killed[name] = (pid, t, during)
        threading.Thread(target=self._time_down, args=(rank, t), daemon=True).start()
        line = self._wait_line(lambda l: f"{name} (pid {pid}) exited: killed by signal 9" in l, 10)
        if line is None:
            raise TargetError(f"sent SIGKILL to {name} (pid {pid}) but tessera up did not report it killed")
        return f"{name} pid {pid} SIGKILLed; {line.strip()}"

    def _time_down(self, rank, t_kill):
        """Measures how long after the kill the service shows engine `rank` down."""
        while time.time() - t_kill < 120 and self.proc and self.proc.poll() is None:
            try:
                sysq = self.tessera("system", "query", timeout=5)
                if any(e["rank"] == rank and e["state"] == "down" for e in sysq["engines"]):
                    self.down_after[rank] = time.time() - t_kill
                    self.note(f"engine {rank} marked down {self.down_after[rank]:.1f}s after its SIGKILL")
                    return
            except (TargetError, subprocess.SubprocessError, ValueError, KeyError):
                pass
            time.sleep(0.2)

    def wait_engine_down(self, rank, limit):
        t0 = time.time()
        while True:
            sysq = self.tessera("system", "query")
            st = [e["state"] for e in sysq["engines"] if e["rank"] == rank]
            if st == ["down"]:
                pool = self.tessera("pool", "query", self.volume["pool"])
                tgt = [t["state"] for t in pool["map"]["targets"] if t["rank"] == rank]
                waited = time.time() - t0
                msg = (f"the service shows engine {rank} down (heartbeat timeout {sysq['heartbeat_timeout_ms']} ms)"
                       f"{f' after waiting {waited:.1f}s' if waited >= 0.5 else ''}, its targets {tgt}")
                self.note(msg)
                self.down_msg = self.down_msg or msg
                return msg
            if time.time() - t0 > limit:
                raise TargetError(f"engine {rank} is {st} after {limit:.0f}s, not down")
            time.sleep(0.5)

    def restart_engine(self, rank, limit):
        """Starts killed engine `rank` again as tessera up started it (the same command line:
        tessera-engine --config DIR/engine-RANK/engine.toml, which tessera up wrote; its output
        appended to DIR/logs/engine-RANK.log) and waits until the service shows it up again.
        tessera up cannot restart a child; the harness stops this one itself at the end."""
        name = f"engine-{rank}"
        if name not in self.killed or name not in self.argv:
            raise TargetError(f"{name} was not killed by the harness")
        if name in self.restarted:
            raise TargetError(f"{name} was already restarted (pid {self.restarted[name][0].pid})")
        old = self.killed[name][0]
        if self.proc_alive(old):
            raise TargetError(f"{name} (pid {old}) is still running")
        argv = self.argv[name]
        proc, t = self._run_again(name, argv)
        msg = f"restarted {name} (pid {proc.pid}): {' '.join(argv)}"
        self.annotate(msg)
        log(f"  {msg}")
        while True:
            if proc.poll() is not None:
                raise TargetError(f"restarted {name} exited with status {proc.returncode} "
                                  f"(log {self.dir / 'logs' / (name + '.log')})")
            sysq = self.tessera("system", "query")
            st = [e["state"] for e in sysq["engines"] if e["rank"] == rank]
            if st == ["up"]:
                self.registered_after[rank] = time.time() - t
                msg = f"{name} restarted (pid {proc.pid}) and registered: the service shows it up " \
                      f"{self.registered_after[rank]:.1f}s after the start"
                self.note(msg)
                return msg
            if time.time() - t > limit:
                raise TargetError(f"restarted {name} (pid {proc.pid}) is {st} in the service after {limit:.0f}s, not up")
            time.sleep(0.2)

    def _run_again(self, name, argv):
        """Runs a killed daemon's command line again, its output appended to its log (after a
        marker line); records and returns (process, start time)."""
        env = dict(os.environ)
        env.setdefault("RUST_LOG", "info")
        env.setdefault("RUST_BACKTRACE", "1")
        env["NO_COLOR"] = "1"
        with open(self.dir / "logs" / f"{name}.log", "a") as logf:
            logf.write(f"==== harness restart (Unix time {int(time.time())}): {' '.join(argv)}\n")
            logf.flush()
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                                    env=env, start_new_session=True)
        t = time.time()
        self.restarted[name] = (proc, t)
        return proc, t

    def set_optimized(self, port):
        """Makes the path on 127.0.0.1:`port` the subsystem's optimized one, as an operator does."""
        xs = self.tessera("export", "set-optimized", "--nqn", self.nqn, "--listen", f"127.0.0.1:{port}")
        msg = f"the optimized path of {self.nqn} is 127.0.0.1:{port} ({len(xs)} namespace(s))"
        self.annotate(msg)
        return msg

    def kill_nvmf(self, name):
        """SIGKILLs target `name` (nvmf, nvmf-2, ...) and waits until tessera up reports it."""
        pid = self.pids.get(name)
        if pid is None or name in self.killed or not name.startswith("nvmf"):
            raise TargetError(f"no running {name}")
        with open(f"/proc/{pid}/cmdline", "rb") as f:  # for a restart: the same command line
            self.argv[name] = [a.decode() for a in f.read().split(b"\0") if a]
        if not self.argv[name] or "tessera-nvmf" not in self.argv[name][0]:
            raise TargetError(f"pid {pid} is not tessera-nvmf: {self.argv[name]}")
        os.kill(pid, signal.SIGKILL)
        self.killed[name] = (pid, time.time(), "SIGKILL at the guest's request")
        self.annotate(f"SIGKILL {name} (pid {pid})")
        line = self._wait_line(lambda l: f"{name} (pid {pid}) exited: killed by signal 9" in l, 10)
        if line is None:
            raise TargetError(f"sent SIGKILL to {name} (pid {pid}) but tessera up did not report it killed")
        return f"{name} pid {pid} SIGKILLed; {line.strip()}"

    def start_nvmf(self, name, limit):
        """Starts target `name`, which the harness killed, again with its command line, and waits
        until it accepts connections."""
        if name not in self.killed or name not in self.argv or name in self.restarted:
            raise TargetError(f"{name} was not killed by the harness (or was already restarted)")
        argv = self.argv[name]
        listen = argv[argv.index("--listen") + 1]
        port = int(listen.rsplit(":", 1)[1])
        proc, t = self._run_again(name, argv)
        while not port_open(port):
            if proc.poll() is not None:
                raise TargetError(f"restarted {name} exited with status {proc.returncode}")
            if time.time() - t > limit:
                raise TargetError(f"restarted {name} does not listen on {listen} after {limit:.0f}s")
            time.sleep(0.1)
        msg = f"{name} started again (pid {proc.pid}), listening on {listen} after {time.time() - t:.1f}s"
        self.annotate(msg)
        return msg

    def restart_nvmf(self, limit):
        """SIGKILLs tessera-nvmf and starts it again with the same command line (its output
        appended to DIR/logs/nvmf.log), waiting until it serves its vhost-user-blk socket again.
        A guest's vhost-user-blk disk reconnects by itself (QEMU reconnect=1)."""
        name = "nvmf"
        pid = self.pids.get(name)
        if pid is None or name in self.killed:
            raise TargetError("no running tessera-nvmf to restart")
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = [a.decode() for a in f.read().split(b"\0") if a]
        if not argv or "tessera-nvmf" not in argv[0]:
            raise TargetError(f"pid {pid} is not tessera-nvmf: {argv}")
        logpath = self.dir / "logs" / "nvmf.log"
        os.kill(pid, signal.SIGKILL)
        self.killed[name] = (pid, time.time(), "SIGKILL for a restart")
        t0 = time.time()
        while self.proc_alive(pid):
            if time.time() - t0 > 10:
                raise TargetError(f"tessera-nvmf (pid {pid}) survived SIGKILL")
            time.sleep(0.1)
        env = dict(os.environ)
        env.setdefault("RUST_LOG", "info")
        env["NO_COLOR"] = "1"
        with open(logpath, "a") as logf:
            marker = f"==== harness restart (Unix time {int(time.time())}): {' '.join(argv)}"
            logf.write(marker + "\n")
            logf.flush()
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                                    env=env, start_new_session=True)
        t = time.time()
        self.restarted[name] = (proc, t)
        self.annotate(f"restarted tessera-nvmf (pid {pid} killed, now pid {proc.pid})")
        while True:
            if proc.poll() is not None:
                raise TargetError(f"restarted tessera-nvmf exited with status {proc.returncode} (log {logpath})")
            text = logpath.read_text(errors="replace").split(marker, 1)[-1]
            if "vhost-user-blk listening" in text:
                msg = f"tessera-nvmf killed (pid {pid}) and restarted (pid {proc.pid}); its vhost-user-blk socket listens again after {time.time() - t:.1f}s"
                self.note(msg)
                return msg
            if time.time() - t > limit:
                raise TargetError(f"restarted tessera-nvmf does not listen on its vhost-user-blk socket after {limit:.0f}s")
            time.sleep(0.2)

    def nvmf_idle_cpu(self, secs, max_ms):
        """CPU time tessera-nvmf (the restarted one if the harness restarted it) uses over `secs`
        seconds while the guest does no I/O: its vhost-user-blk workers sleep until kicked."""
        pid = self.restarted["nvmf"][0].pid if "nvmf" in self.restarted else self.pids.get("nvmf")
        if pid is None or not self.proc_alive(pid):
            raise TargetError("tessera-nvmf is not running")

        def cpu_ms():
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) * 1000 // os.sysconf("SC_CLK_TCK")

        c0, t0 = cpu_ms(), time.time()
        time.sleep(secs)
        used, took = cpu_ms() - c0, time.time() - t0
        msg = f"tessera-nvmf (pid {pid}) used {used} ms of CPU in {took:.1f}s with the guest idle"
        self.note(msg)
        if used > max_ms:
            raise TargetError(msg + f": more than {max_ms} ms (busy polling?)")
        return msg

    def targets_of(self, pool, rank):
        return [t["state"] for t in pool["map"]["targets"] if t["rank"] == rank]

    def wait_engine_reintegrated(self, rank, limit):
        """Waits until restarted engine `rank` is reintegrated: every target of it UPIN (the
        service commits UP -> UPIN when the survivors have copied back what changed while it
        was away) and no rebuild running."""
        name = f"engine-{rank}"
        if name not in self.restarted:
            raise TargetError(f"{name} was not restarted")
        t_start = self.restarted[name][1]
        t0 = time.time()
        seen = []  # the states the engine's targets went through
        while True:
            pool = self.tessera("pool", "query", self.volume["pool"])
            tgt = self.targets_of(pool, rank)
            rb = pool.get("rebuild", {})
            if not seen or seen[-1] != tgt:
                seen.append(tgt)
            if tgt and all(s == "UPIN" for s in tgt) and rb.get("state") == "idle":
                after = time.time() - t_start
                others = {r: self.targets_of(pool, r) for r in range(self.engines) if r != rank}
                msg = (f"engine {rank} reintegrated {after:.1f}s after its restart (its targets went "
                       f"{' -> '.join('/'.join(s) for s in seen)}; rebuild idle, {rb.get('completed')} rebuild(s) "
                       f"completed, pool map version {pool['map']['version']}, other engines' targets {others}, "
                       f"fault-domain redundancy reduced: {pool.get('fault_domains_reduced')})")
                self.reintegrated[rank] = (after, msg)
                self.note(msg)
                return msg
            if time.time() - t0 > limit:
                raise TargetError(f"engine {rank} not reintegrated {limit:.0f}s after its restart: its targets {tgt} "
                                  f"(went {' -> '.join('/'.join(s) for s in seen)}), rebuild {rb.get('state')} "
                                  f"(map version {rb.get('map_version')}, {rb.get('engines_done')}/"
                                  f"{rb.get('engines_total')} engines done, dkeys {rb.get('dkeys_done')}/"
                                  f"{rb.get('dkeys_total')}, last error: {rb.get('last_error')})")
            time.sleep(0.5)

    def snapshot_export(self, name, nqn):
        """Takes snapshot `name` of the exported volume (`tessera snapshot create`, which returns
        once it is final) and exports it read-only as namespace 1 of `nqn` on the same listener."""
        v = self.volume
        t0 = time.time()
        s = self.tessera("snapshot", "create", f"{v['pool']}/{v['name']}", name, timeout=60)
        took = time.time() - t0
        if not s.get("stable"):
            raise TargetError(f"snapshot {name} is not final: {s}")
        x = self.tessera("export", "add", "--nqn", nqn, "--volume", f"{v['name']}@{name}", "--pool", v["pool"],
                         "--listen", f"127.0.0.1:{self.port}")
        if (x.get("snapshot") or {}).get("name") != name:
            raise TargetError(f"the export of {name} names no snapshot: {x}")
        msg = f"snapshot {name} at epoch {s['epoch']} (final after {took:.1f}s) exported read-only as {nqn}"
        self.annotate(msg)
        return msg

    def clone_export(self, snapshot, name, nqn):
        """Clones snapshot `snapshot` of the exported volume as volume `name` and exports the
        clone as namespace 1 of `nqn` on the same listener."""
        v = self.volume
        c = self.tessera("volume", "clone", f"{v['pool']}/{v['name']}@{snapshot}", name)
        if (c.get("parent") or {}).get("snapshot", {}).get("name") != snapshot:
            raise TargetError(f"the clone names no parent snapshot {snapshot}: {c}")
        self.tessera("export", "add", "--nqn", nqn, "--volume", name, "--pool", v["pool"], "--listen", f"127.0.0.1:{self.port}")
        msg = f"volume {name} cloned from {v['name']}@{snapshot} and exported as {nqn}"
        self.annotate(msg)
        return msg

    def rollback(self, snapshot):
        """Rolls the exported volume back to `snapshot` the way an operator does without
        --force: its exports are removed (the NVMe namespace, and the vhost-user-blk disk: its
        socket goes and the guest's disk waits for QEMU to reconnect), the volume rolled back,
        the exports added again."""
        v = self.volume
        listed = self.tessera("export", "list")
        xs = [x for x in listed["exports"] if x["nqn"] == self.nqn and "snapshot" not in x]
        if len(xs) != 1:
            raise TargetError(f"{len(xs)} exports of {self.nqn}")
        x = xs[0]
        vx = [y for y in listed.get("vhost", []) if y["volume"]["uuid"] == v["uuid"] and "snapshot" not in y]
        self.tessera("export", "remove", "--nqn", self.nqn, "--nsid", str(x["nsid"]))
        for y in vx:
            self.tessera("export", "remove", "--vhost-blk", y["socket"])
        t0 = time.time()
        r = self.tessera("volume", "rollback", f"{v['pool']}/{v['name']}@{snapshot}", timeout=60)
        took = time.time() - t0
        self.tessera("export", "add", "--nqn", self.nqn, "--nsid", str(x["nsid"]), "--volume", v["name"], "--pool", v["pool"],
                     "--listen", x["listen"])
        for y in vx:
            self.tessera("export", "add", "--vhost-blk", y["socket"], "--volume", v["name"], "--pool", v["pool"],
                         "--queues", str(y["queues"]), "--target", y["target"])
        disks = "".join(f" (and as the vhost-user-blk disk on {y['socket']})" for y in vx)
        msg = f"volume {v['name']} rolled back to {snapshot} at epoch {r['rollbacks'][-1]['at']} in {took:.1f}s and exported again{disks}"
        self.annotate(msg)
        return msg

    def wait_pool_healthy(self, limit):
        """Waits until every engine is up, every pool target UPIN, no rebuild running and the
        groups on distinct engines again (fault-domain redundancy not reduced)."""
        t0 = time.time()
        while True:
            pool = self.tessera("pool", "query", self.volume["pool"])
            sysq = self.tessera("system", "query")
            states = [t["state"] for t in pool["map"]["targets"]]
            up = sorted(e["rank"] for e in sysq["engines"] if e["state"] == "up")
            rb = pool.get("rebuild", {})
            if (up == list(range(self.engines)) and len(states) == self.engines * EC_TARGETS
                    and all(s == "UPIN" for s in states) and rb.get("state") == "idle"
                    and pool.get("fault_domains_reduced") is False):
                msg = (f"all {self.engines} engines up, all {len(states)} pool targets UPIN, rebuild idle "
                       f"({rb.get('completed')} rebuild(s) completed), pool map version {pool['map']['version']}, "
                       f"fault-domain redundancy no longer reduced")
                self.note(msg)
                return msg
            if time.time() - t0 > limit:
                raise TargetError(f"pool not healthy after {limit:.0f}s: engines up {up}, targets {states}, "
                                  f"rebuild {rb.get('state')} (last error: {rb.get('last_error')}), "
                                  f"fault-domain redundancy reduced: {pool.get('fault_domains_reduced')}")
            time.sleep(0.5)

    def wait_engine_rebuilt(self, rank, limit):
        """Waits until the surviving engines have rebuilt engine `rank`'s shards: its targets
        DOWNOUT (the service commits that when every survivor reported its rebuild pass done)
        and no rebuild running."""
        t0 = time.time()
        while True:
            pool = self.tessera("pool", "query", self.volume["pool"])
            tgt = [t["state"] for t in pool["map"]["targets"] if t["rank"] == rank]
            rb = pool.get("rebuild", {})
            if tgt and all(s == "DOWNOUT" for s in tgt) and rb.get("state") == "idle":
                waited = time.time() - t0
                msg = (f"engine {rank}'s shards rebuilt on the survivors' targets (its targets {tgt}, "
                       f"{rb.get('completed')} rebuild(s) completed, pool map version {pool['map']['version']}, "
                       f"fault-domain redundancy reduced: {pool.get('fault_domains_reduced')})"
                       f"{f' after waiting {waited:.1f}s' if waited >= 0.5 else ''}")
                self.note(msg)
                self.rebuilt_msg = self.rebuilt_msg or msg
                kill = self.killed.get(f"engine-{rank}")
                if kill and rank not in self.rebuilt:
                    self.rebuilt[rank] = (time.time() - kill[1], msg)
                return msg
            if time.time() - t0 > limit:
                raise TargetError(f"engine {rank}'s shards not rebuilt after {limit:.0f}s: its targets {tgt}, "
                                  f"rebuild {rb.get('state')} (last error: {rb.get('last_error')})")
            time.sleep(0.5)

    def problems(self):
        """Panics in the daemons' logs (the copies in the log dir once stopped)."""
        bad = []
        logs = self.dir / "logs" if (self.dir / "logs").is_dir() else self.logdir / f"{self.name}-cluster"
        for f in sorted(logs.glob("*.log")):
            try:
                text = f.read_text(errors="replace")
            except OSError:
                continue
            bad += [f"{f.name}: {l}" for l in text.splitlines() if "panicked at" in l]
        return bad

    def stop_up(self, grace=60):
        """SIGTERM to tessera up (it stops its daemons in order); returns its exit status."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                self.note(f"tessera up still running {grace}s after SIGTERM: killing it and its daemons")
                self.proc.kill()
                self.proc.wait()
        # the engines the harness restarted (tessera up does not know them): SIGTERM after
        # tessera up has stopped the target and the service, as it stops its own engines
        self.stop_restarted()
        # whatever it left behind (it was SIGKILLed, or it failed): its daemons by pid
        for name, pid in self.pids.items():
            if name in self.restarted:
                continue
            if self.proc_alive(pid):
                self.note(f"{name} (pid {pid}) still running after tessera up ended: SIGKILL")
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        return self.proc.returncode

    def stop_restarted(self, grace=60):
        for name, (proc, _t) in self.restarted.items():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for name, (proc, _t) in self.restarted.items():
            try:
                proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                self.note(f"restarted {name} (pid {proc.pid}) still running {grace}s after SIGTERM: SIGKILL")
                proc.kill()
                proc.wait()
            if name not in self.restart_status:
                self.restart_status[name] = proc.returncode
                self.note(f"restarted {name} (pid {proc.pid}) stopped: exit status {proc.returncode}")

    def stop(self):
        if self.proc is not None and self.exit_status is None:
            self.exit_status = self.stop_up()
            self._wait_line(lambda l: False, 2)  # let the reader drain the last lines
            self.note(f"tessera up exited with status {self.exit_status}")
        logs = self.dir / "logs"
        if logs.is_dir():
            dest = self.logdir / f"{self.name}-cluster"
            dest.mkdir(exist_ok=True)
            for f in logs.glob("*.log"):
                shutil.copy(f, dest / f.name)
        if self.logf:
            self.logf.close()
            self.logf = None
        shutil.rmtree(self.dir, ignore_errors=True)
        return self.exit_status


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


def boot_initrd(base_initrd, path, env_text, script, extra=()):
    """Writes the initramfs of one boot to `path`: the base image, then a cpio with the test
    environment, guest-lib.sh, the script as /test.sh, the fio job files and `extra` entries."""
    with open(path, "wb") as f:
        with open(base_initrd, "rb") as b:
            shutil.copyfileobj(b, f)
        f.write(newc_archive([
            ("etc/test-env.sh", env_text.encode(), 0o100644),
            ("guest-lib.sh", (HERE / "guest-lib.sh").read_bytes(), 0o100644),
            ("test.sh", script, 0o100755),
        ] + list(extra) + fio_job_files()))
    return path


def fio_job_files():
    """The repository's fio job files as cpio entries under /fio-jobs (the directory first)."""
    jobs = sorted((REPO / "fio-jobs").glob("*.fio"))
    return [("fio-jobs", b"", 0o040755)] + [(f"fio-jobs/{j.name}", j.read_bytes(), 0o100644) for j in jobs]


def run_boot(boot, kernel, base_initrd, env_text, workdir, logdir, target, ctx, scale):
    """Boot a guest with boot.script; returns (dict case->Result, notes)."""
    script = boot.script.read_bytes()
    initrd = boot_initrd(base_initrd, Path(workdir) / f"initrd-{boot.name}", env_text, script)
    logfile = Path(logdir) / f"console-{boot.name}.log"
    log(f"boot {boot.name}: starting guest (console log {logfile})")
    guest = Qemu(boot.name, kernel, initrd, "", logfile, vhost_blk=getattr(target, "vhost_sock", None))
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


# Requests a guest makes of the tessera up cluster of its boot: name -> f(cluster, args, guest),
# returning the message the guest gets after "ok".
CLUSTER_REQUESTS = {
    "kill-engine": lambda c, a, g: c.kill_engine(int(a[0]), during=f"at the request of guest boot {g.name}"),
    "expect-engine-down": lambda c, a, g: c.wait_engine_down(int(a[0]), float(a[1])),
    "expect-engine-rebuilt": lambda c, a, g: c.wait_engine_rebuilt(int(a[0]), float(a[1])),
    "restart-engine": lambda c, a, g: c.restart_engine(int(a[0]), float(a[1]) if len(a) > 1 else 60),
    "expect-engine-reintegrated": lambda c, a, g: c.wait_engine_reintegrated(int(a[0]), float(a[1])),
    "nvmf-idle-cpu": lambda c, a, g: c.nvmf_idle_cpu(float(a[0]), int(a[1])),
    "restart-nvmf": lambda c, a, g: c.restart_nvmf(float(a[0]) if a else 60),
    "kill-nvmf": lambda c, a, g: c.kill_nvmf(a[0]),
    "start-nvmf": lambda c, a, g: c.start_nvmf(a[0], float(a[1]) if len(a) > 1 else 30),
    "set-optimized": lambda c, a, g: c.set_optimized(int(a[0])),
    "snapshot-export": lambda c, a, g: c.snapshot_export(a[0], a[1]),
    "clone-export": lambda c, a, g: c.clone_export(a[0], a[1], a[2]),
    "rollback": lambda c, a, g: c.rollback(a[0]),
    "expect-pool-healthy": lambda c, a, g: c.wait_pool_healthy(float(a[0])),
}


class Context:
    def __init__(self, target, selected, port):
        self.port = port
        self.target = target
        self.cluster = None  # TesseraCluster while the ec boot runs
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
            elif parts[0] in CLUSTER_REQUESTS:
                if not self.cluster:
                    return "err no cluster is running"
                msg = CLUSTER_REQUESTS[parts[0]](self.cluster, parts[1:], guest)
                guest.note(msg)
                return "ok " + msg
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
        except (TargetError, IndexError, ValueError, KeyError, OSError, subprocess.SubprocessError) as e:
            return f"err {e}"
        return "ok"


# ------------------------------------------------------------------- main --
def run_cluster_boot(boot, cluster, host_cases, env_extra, judge, kernel, base_initrd, workdir, logdir, ctx, args,
                     selected):
    """Starts `cluster` (tessera up), runs `boot` against it, lets `judge(results, cluster)` decide
    the boot's own host-side cases, stops the cluster and decides <name>-cluster-up and
    <name>-cluster-clean.  host_cases: all of the boot's host-side cases."""
    results = {}
    names = boot.cases + host_cases
    up_case, clean_case = f"{cluster.name}-cluster-up", f"{cluster.name}-cluster-clean"

    def fail_rest(why):
        for c in names:
            results.setdefault(c, Result(c, False, why))
        return results

    if not cluster.bin.exists():
        return fail_rest(f"{cluster.bin} not found (cargo build --release -p tessera-ctl -p tessera-mgmt "
                         f"-p tessera-engine -p tessera-nvmf)")
    try:
        log(f"starting a {EC_CLASS} cluster of {cluster.engines} engines with tessera up (log {cluster.logpath})")
        t0 = time.time()
        try:
            cluster.start()
            bad = cluster.check_up()
        except (TargetError, subprocess.SubprocessError, OSError, ValueError, KeyError) as e:
            print(str(e))
            return fail_rest(f"tessera up cluster did not start: {str(e).splitlines()[0]}")
        if bad:
            return fail_rest(f"tessera up cluster is not as asked for: {bad}")
        results[up_case] = Result(up_case, True, info=f"{cluster.info()}; up in {time.time() - t0:.0f}s")
        log(f"cluster up: {cluster.info()}")
        v = cluster.volume
        env_text = guest_env(args.port, selected, {
            "EC_NQN": cluster.nqn, "EC_PORT": cluster.port, "EC_SIZE_MIB": v["size"] >> 20,
            "EC_PORT2": cluster.path_port(1) if cluster.paths else "",
            "EC_BLOCK_SIZE": v["block_size"], **env_extra,
        })
        ctx.cluster = cluster
        try:
            r, _notes = run_boot(boot, kernel, base_initrd, env_text, workdir, logdir, cluster, ctx, args.timeout_scale)
        finally:
            ctx.cluster = None
        results.update(r)
        judge(results, cluster)

        # <name>-cluster-clean: the survivors (and the engines restarted by the harness) kept
        # running, no panic anywhere, ordered stop
        alive, status = cluster.alive(), cluster.status()
        rc = cluster.stop()
        why = []
        if not alive:
            why.append(f"cluster not running at the end: {status}")
        bad = cluster.problems()
        if bad:
            why.append(f"{len(bad)} panic line(s), first: {bad[0].strip()}")
        if rc != 0:
            why.append(f"tessera up exited with status {rc} on SIGTERM")
        for name, st in sorted(cluster.restart_status.items()):
            if st != 0:
                why.append(f"restarted {name} exited with status {st} on SIGTERM")
        restarted = (f", the restarted {' and '.join(sorted(cluster.restart_status))} exit 0 on SIGTERM"
                     if cluster.restart_status else "")
        results[clean_case] = Result(clean_case, not why, "; ".join(why),
                                     f"survivors ran to the end, no panics, tessera up exit 0{restarted}")
        log(f"cluster stopped (tessera up exit {rc}); logs in {logdir / (cluster.name + '-cluster')}")
        return fail_rest("not reached")
    finally:
        ctx.cluster = None
        cluster.stop()


def judge_ec(results, cluster):
    """ec-engine-killed: the harness killed the engine at the guest's request (which the guest
    makes only with fio's write phase under way and checks afterwards), tessera up saw it die of
    SIGKILL, and the management service marked it down."""
    name = f"engine-{EC_KILL_RANK}"
    kr = results.get("ec-kill-during-write")
    if name not in cluster.killed:
        results["ec-engine-killed"] = Result("ec-engine-killed", False,
                                             f"{name} was never killed (the guest did not request it)")
    elif not cluster.down_msg:
        results["ec-engine-killed"] = Result("ec-engine-killed", False,
                                             f"{name} was SIGKILLed but never seen down in the management service")
    elif not kr or not kr.ok:
        results["ec-engine-killed"] = Result("ec-engine-killed", False,
                                             f"{name} was SIGKILLed but the guest did not confirm it hit fio's "
                                             f"write phase: {kr.reason if kr else 'no result'}")
    elif cluster.proc_alive(cluster.killed[name][0]):
        results["ec-engine-killed"] = Result("ec-engine-killed", False, f"{name} is still running")
    else:
        pid, _t, _ = cluster.killed[name]
        d = cluster.down_after.get(EC_KILL_RANK)
        results["ec-engine-killed"] = Result("ec-engine-killed", True,
                                             info=f"{name} pid {pid} SIGKILLed during fio's write phase, "
                                                  f"marked down {f'{d:.1f}s' if d is not None else 'at some point'} later; "
                                                  f"{cluster.down_msg}"
                                                  f"{f'; {cluster.rebuilt_msg}' if cluster.rebuilt_msg else ''}")


def judge_heal(results, cluster):
    """heal-engines-cycled: both engines were SIGKILLed at the guest's request (tessera up saw
    them die of signal 9), the service marked each down and its shards were rebuilt, the
    harness restarted each (most recent failure first) and the service reintegrated it; the
    info is the timeline."""
    case = "heal-engines-cycled"
    why, steps = [], []
    for rank in HEAL_KILL_RANKS:
        name = f"engine-{rank}"
        if name not in cluster.killed:
            why.append(f"{name} was never killed")
            continue
        pid = cluster.killed[name][0]
        if cluster.proc_alive(pid):
            why.append(f"{name} (pid {pid}) still running after its SIGKILL")
        d = cluster.down_after.get(rank)
        rb = cluster.rebuilt.get(rank)
        rs = cluster.restarted.get(name)
        ri = cluster.reintegrated.get(rank)
        if d is None:
            why.append(f"{name} never seen down in the management service")
        if rb is None:
            why.append(f"{name}'s shards never seen rebuilt")
        if rs is None:
            why.append(f"{name} never restarted")
        elif rank not in cluster.registered_after:
            why.append(f"restarted {name} never registered")
        if ri is None:
            why.append(f"{name} never seen reintegrated")
        steps.append(f"{name}: killed (pid {pid}), down {f'{d:.1f}s' if d is not None else '?'} later, "
                     f"rebuilt {f'{rb[0]:.1f}s' if rb else '?'} after the kill; restarted"
                     f"{f' (pid {rs[0].pid})' if rs else ' ?'}, registered "
                     f"{f'{cluster.registered_after[rank]:.1f}s' if rank in cluster.registered_after else '?'}, "
                     f"UPIN {f'{ri[0]:.1f}s' if ri else '?'} after the restart")
    order = [r for r, _ in sorted(((r, cluster.restarted[f"engine-{r}"][1]) for r in HEAL_KILL_RANKS
                                   if f"engine-{r}" in cluster.restarted), key=lambda x: x[1])]
    if not why and order != list(reversed(HEAL_KILL_RANKS)):
        why.append(f"engines restarted in the order {order}, expected {list(reversed(HEAL_KILL_RANKS))}")
    results[case] = Result(case, not why, "; ".join(why), "; ".join(steps))


def run_ec_boot(boot, tessera_bin, kernel, base_initrd, workdir, logdir, ctx, args, selected):
    """The ec boot: 3 engines, one killed during fio's writes; the volume is also the guest's
    /dev/vda over vhost-user-blk."""
    cluster = TesseraCluster(tessera_bin, workdir, logdir, args.ec_port_base, vhost=True)
    return run_cluster_boot(boot, cluster, EC_HOST_CASES, {"EC_KILL_RANK": EC_KILL_RANK}, judge_ec,
                            kernel, base_initrd, workdir, logdir, ctx, args, selected)


def run_heal_boot(boot, tessera_bin, kernel, base_initrd, workdir, logdir, ctx, args, selected):
    """The heal boot: 4 engines, two killed one after the other, restarted in reverse order."""
    cluster = TesseraCluster(tessera_bin, workdir, logdir, args.ec_port_base, name="heal",
                             engines=HEAL_ENGINES, nqn=HEAL_NQN, paths=1)
    extra = {"HEAL_KILL_FIRST": HEAL_KILL_RANKS[0], "HEAL_KILL_SECOND": HEAL_KILL_RANKS[1]}
    return run_cluster_boot(boot, cluster, HEAL_HOST_CASES, extra, judge_heal,
                            kernel, base_initrd, workdir, logdir, ctx, args, selected)


def guest_env(port, cases, extra=None):
    v = {
        "TADDR": GUEST_HOST_ADDR, "TPORT": port, "NQN_A": NQN_A, "NQN_B": NQN_B,
        "SERIAL_A": SERIAL_A, "MODEL_A": MODEL_A, "SIZE_A_MIB": SIZE_A_MIB,
        "SIZE_B_MIB": SIZE_B_MIB, "NS2_MIB": NS2_MIB, "NS2_GROW_MIB": NS2_GROW_MIB,
        "ALLOWED_HOSTNQN": ALLOWED_HOSTNQN, "ALLOWED_HOSTID": ALLOWED_HOSTID,
        "CASES": " ".join(cases),
        **(extra or {}),
    }
    return "".join(f"{k}='{val}'\n" for k, val in v.items())


DEPENDS = {"ns-grow": ["ns-add-aen"], "ns-remove-aen": ["ns-add-aen"]}
HOST_CASES = ["host-vanishes", "target-alive", "target-log-clean", "target-no-fd-leak"]
EC_HOST_CASES = ["ec-cluster-up", "ec-engine-killed", "ec-cluster-clean"]
HEAL_HOST_CASES = ["heal-cluster-up", "heal-engines-cycled", "heal-cluster-clean"]
DEFAULT_PORT = 4420


def pick_port(preferred, lo, hi):
    """preferred if nothing listens there, else the first free port in lo..hi."""
    for p in [preferred] + list(range(lo, hi)):
        if port_free(p) and not port_open(p):
            return p
    raise TargetError(f"no free port in {preferred}, {lo}..{hi}")


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
    ap.add_argument("--port", type=int, default=None,
                    help=f"port of the TOML/malloc target (default {DEFAULT_PORT}, or the first free one in "
                         f"{DEFAULT_PORT + 1}..{DEFAULT_PORT + 79} when something else listens there)")
    ap.add_argument("--ec-port-base", type=int, metavar="PORT",
                    help=f"first of the consecutive ports of the tessera up clusters (mgmt, engines, NVMe/TCP: "
                         f"{EC_ENGINES + 2} for the ec boot, {HEAL_ENGINES + 2} for the heal boot, which runs after "
                         f"it); default: a free block found in {EC_PORT_RANGE[0]}..{EC_PORT_RANGE[1]}")
    ap.add_argument("--no-ec", action="store_true",
                    help="skip the erasure-coded cluster (tessera up) boot and its cases")
    ap.add_argument("--no-heal", action="store_true",
                    help="skip the self-healing cluster (tessera up, 4 engines) boot and its cases")
    ap.add_argument("--tessera-bin", help="tessera CLI for tessera up (default target/release/tessera; "
                                          "it runs the daemons from its own directory)")
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
    with_ec = not (args.no_ec or args.reference)
    with_heal = not (args.no_heal or args.reference)
    if with_ec:
        # last: its own system (tessera up), started for this boot and stopped after it
        boots.append(Boot("ec", "ec.sh", timeout=900))
    if with_heal:
        # another system of its own (tessera up, 4 engines): two engines killed and restarted
        boots.append(Boot("heal", "heal.sh", timeout=600))
    if args.script:
        boots = [Boot("script", Path(args.script).resolve(), timeout=1500)]
        with_ec = with_heal = False
    host_cases = HOST_CASES + (EC_HOST_CASES if with_ec else []) + (HEAL_HOST_CASES if with_heal else [])
    all_cases = [c for b in boots for c in b.cases] + (["target-alive", "target-log-clean", "target-no-fd-leak"] if args.script else host_cases)
    ec_cases = [c for b in boots if b.name == "ec" for c in b.cases] + (EC_HOST_CASES if with_ec else [])
    heal_cases = [c for b in boots if b.name == "heal" for c in b.cases] + (HEAL_HOST_CASES if with_heal else [])
    if args.list:
        for b in boots:
            for c in b.cases:
                print(f"{c:28s} (guest boot {b.name})")
        for c in host_cases:
            print(f"{c:28s} (host side{', tessera up cluster' if c in ec_cases + heal_cases else ''})")
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
    if selected & set(ec_cases):
        selected.update(ec_cases)  # one sequence: connect, write, kill, re-read
    if selected & set(heal_cases):
        selected.update(heal_cases)  # one sequence: write, kill, rebuild, kill, restart, re-read
    if selected:
        selected.update(["target-alive", "target-log-clean", "target-no-fd-leak"])
    auto_port = args.port is None
    if auto_port:
        try:
            args.port = pick_port(DEFAULT_PORT, DEFAULT_PORT + 1, DEFAULT_PORT + 80)
        except TargetError as e:
            ap.error(str(e))
        if args.port != DEFAULT_PORT:
            log(f"port {DEFAULT_PORT} is in use: the target uses {args.port}")

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
                pkgs = ["tessera-nvmf"]
                if any(want(c) for c in ec_cases + heal_cases) and not args.tessera_bin:
                    pkgs += ["tessera-ctl", "tessera-mgmt", "tessera-engine"]
                cmd = ["cargo", "build", "--release"] + [a for p in pkgs for a in ("-p", p)]
                log(" ".join(cmd))
                blog = logdir / "build.log"
                with open(blog, "w") as bf:
                    p = subprocess.run(cmd, cwd=REPO, stdout=bf, stderr=subprocess.STDOUT)
                if p.returncode != 0:
                    tail = "\n".join(blog.read_text(errors="replace").splitlines()[-25:])
                    print(tail)
                    return fail_all(f"target did not build (cargo exit {p.returncode}, see {blog})")
            if not binary.exists():
                return fail_all(f"target binary {binary} not found")
            target = TesseraTarget(binary, workdir, logdir, args.port)
        for attempt in range(5):
            try:
                target.start()
                break
            except TargetError:
                # a parallel run took the port between pick_port and the bind: another one
                if not auto_port or attempt == 4 or not port_open(args.port) or args.reference:
                    raise
                target.stop()
                args.port = pick_port(args.port + 1, args.port + 2, DEFAULT_PORT + 80)
                log(f"port taken meanwhile: the target uses {args.port}")
                target = TesseraTarget(target.binary, workdir, logdir, args.port)
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
            if boot.name in ("ec", "heal"):
                tessera_bin = Path(args.tessera_bin) if args.tessera_bin else REPO / "target" / "release" / "tessera"
                run = run_ec_boot if boot.name == "ec" else run_heal_boot
                results.update(run(boot, tessera_bin, kernel, base_initrd, workdir, logdir, ctx,
                                   args, sorted(selected)))
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
