"""Shared machinery for the differential QMP tests: start a daemon (QEMU's or
Strata's) on a unix socket in a private directory, talk QMP to it line by line,
record every command with its normalised answer and every event, and compare
two such transcripts.

Every child process is started in its own process group and killed when the
scenario ends, whatever happens.
"""
import atexit
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

QSD = os.environ.get("QEMU_STORAGE_DAEMON", "qemu-storage-daemon")
QSYS = os.environ.get("QEMU_SYSTEM", "qemu-system-x86_64")
STRATA = os.environ.get("STRATA_STORAGE_DAEMON", "strata-storage-daemon")

_children = []


def kill_all():
    """Kills every daemon still running (called on exit and after each scenario)."""
    while _children:
        p = _children.pop()
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except OSError:
                pass
            p.wait()


atexit.register(kill_all)


def _on_term(signum, frame):
    kill_all()
    sys.exit(128 + signum)


signal.signal(signal.SIGTERM, _on_term)


def have(kind):
    """Whether the program for a daemon kind is installed."""
    prog = {"qsd": QSD, "qsys": QSYS, "strata": STRATA}[kind]
    return shutil.which(prog) is not None or os.path.exists(prog)


class QmpError(Exception):
    pass


class Daemon:
    """One daemon process with one QMP monitor on a unix socket.

    kind: "qsd" (qemu-storage-daemon), "qsys" (qemu-system -M none, which can
    run human-monitor-command) or "strata".
    """

    def __init__(self, kind, workdir, blockdevs=(), extra=()):
        self.kind = kind
        self.dir = workdir
        self.sock_path = os.path.join(workdir, "qmp.sock")
        self.events = []
        self.cursor = 0
        self.log = []
        if kind == "qsys":
            argv = [QSYS, "-M", "none", "-nodefaults", "-display", "none",
                    "-qmp", f"unix:{self.sock_path},server=on,wait=off"]
            for b in blockdevs:
                argv += ["-blockdev", b]
        else:
            argv = [QSD if kind == "qsd" else STRATA,
                    "--chardev", f"socket,id=m0,path={self.sock_path},server=on,wait=off",
                    "--monitor", "chardev=m0"]
            for b in blockdevs:
                argv += ["--blockdev", b]
        argv += list(extra)
        if os.path.exists(self.sock_path):  # left by an earlier daemon
            os.unlink(self.sock_path)
        self.stderr_path = os.path.join(workdir, f"{kind}.stderr")
        self.proc = subprocess.Popen(argv, cwd=workdir, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL,
                                     stderr=open(self.stderr_path, "wb"),
                                     start_new_session=True)
        _children.append(self.proc)
        for _ in range(400):
            if os.path.exists(self.sock_path):
                break
            if self.proc.poll() is not None:
                raise QmpError(f"{kind} exited early: {self.stderr()}")
            time.sleep(0.01)
        for _ in range(400):
            self.sock = socket.socket(socket.AF_UNIX)
            try:
                self.sock.connect(self.sock_path)
                break
            except (ConnectionRefusedError, FileNotFoundError):
                self.sock.close()
                time.sleep(0.01)
        self.sock.settimeout(30)
        self.buf = b""
        greeting = self._line()
        if not greeting:
            raise QmpError(f"{kind}: no greeting: {self.stderr()}")
        self._id = 0
        self.cmd("qmp_capabilities", record=False)

    def stderr(self):
        try:
            with open(self.stderr_path, "rb") as f:
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    def _line(self):
        """One line from the monitor ("" at EOF); socket.timeout keeps what was read."""
        while b"\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                line, self.buf = self.buf, b""
                return line
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return line + b"\n"

    def _read(self):
        line = self._line()
        if not line:
            raise QmpError(f"{self.kind}: connection closed; stderr: {self.stderr()}")
        return json.loads(line)

    def cmd(self, _name, record=True, **args):
        """Runs a command; returns {"return": ...} or {"error": ...}."""
        name = _name
        self._id += 1
        msg = {"execute": name, "id": self._id}
        args = {k.replace("_", "-"): v for k, v in args.items()}
        if args:
            msg["arguments"] = args
        self.sock.sendall(json.dumps(msg).encode() + b"\n")
        while True:
            r = self._read()
            if "event" in r:
                self.events.append(r)
                continue
            if r.get("id") != self._id:
                continue
            r.pop("id")
            if record:
                self.log.append((name, args, r))
            return r

    def raw(self, name, args):
        """Runs a command with arguments given verbatim (keys not rewritten)."""
        self._id += 1
        msg = {"execute": name, "id": self._id, "arguments": args}
        self.sock.sendall(json.dumps(msg).encode() + b"\n")
        while True:
            r = self._read()
            if "event" in r:
                self.events.append(r)
                continue
            if r.get("id") == self._id:
                r.pop("id")
                self.log.append((name, args, r))
                return r

    def ok(self, _name, **args):
        name = _name
        r = self.cmd(name, **args)
        if "error" in r:
            raise QmpError(f"{self.kind}: {name} {args}: {r['error']}")
        return r["return"]

    def note(self, label, value):
        """Records a value computed by the scenario (compared like an answer)."""
        self.log.append((label, {}, value))

    def wait_event(self, name, timeout=30, **match):
        """Waits until an event NAME whose data contains MATCH has arrived."""
        deadline = time.time() + timeout
        while True:
            # only events after the one the previous wait matched count
            for i in range(self.cursor, len(self.events)):
                e = self.events[i]
                if e["event"] == name and all(e.get("data", {}).get(k) == v
                                              for k, v in match.items()):
                    self.cursor = i + 1
                    return e
            left = deadline - time.time()
            if left <= 0:
                raise QmpError(f"{self.kind}: timeout waiting for {name} {match}; "
                               f"got {[e['event'] for e in self.events]}")
            self.sock.settimeout(left)
            try:
                r = self._read()
            except socket.timeout:
                continue
            finally:
                self.sock.settimeout(30)
            if "event" in r:
                self.events.append(r)

    def started(self, job):
        """Waits until JOB runs after the paused/running blip of its start (QEMU
        emits that blip asynchronously; a verb sent before it lands in between)."""
        for st in ("created", "running", "paused", "running"):
            self.wait_event("JOB_STATUS_CHANGE", id=job, status=st)

    def drain_events(self, quiet=0.2):
        """Collects events until none arrives for QUIET seconds."""
        self.sock.settimeout(quiet)
        try:
            while True:
                r = self._read()
                if "event" in r:
                    self.events.append(r)
        except (socket.timeout, TimeoutError):
            pass
        finally:
            self.sock.settimeout(30)

    def hmp(self, node, cmd):
        """Runs qemu-io on NODE through human-monitor-command."""
        return self.ok("human-monitor-command",
                       command_line=f'qemu-io {node} "{cmd}"')

    def quit(self):
        try:
            self.cmd("quit", record=False)
        except (QmpError, OSError):
            pass
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def kill(self, sig=signal.SIGKILL):
        os.killpg(self.proc.pid, sig)
        self.proc.wait()


# ---------------------------------------------------------------- normalising

BLOCK_NAME = re.compile(r"#block\d+")


def normalise(v, workdir, drop=()):
    """Replaces what legitimately differs between two runs: the work directory,
    auto-generated node names and the members listed in DROP."""
    if isinstance(v, dict):
        out = {}
        for k, x in v.items():
            if k in drop:
                out[k] = "<dropped>"
            else:
                out[k] = normalise(x, workdir, drop)
        return out
    if isinstance(v, list):
        return [normalise(x, workdir, drop) for x in v]
    if isinstance(v, str):
        v = v.replace(workdir, "$DIR")
        return BLOCK_NAME.sub("#blockN", v)
    return v


def event_list(d, drop=()):
    out = []
    for e in d.events:
        x = {"event": e["event"]}
        if "data" in e:
            x["data"] = normalise(e["data"], d.dir, drop)
        out.append(x)
    return out


def transcript(d, drop=()):
    return [(name, normalise(args, d.dir), normalise(r, d.dir, drop))
            for name, args, r in d.log]


def run_pair(scenario, kinds, drop=(), events=True, compare_events=None):
    """Runs SCENARIO(daemon_factory) for QEMU (kinds[0]) and Strata; returns a
    list of difference strings (empty when they match)."""
    results = []
    for kind in kinds:
        workdir = tempfile.mkdtemp(prefix=f"qd-{kind}-")
        try:
            made = []

            def factory(blockdevs=(), extra=(), k=kind, w=workdir):
                d = Daemon(k, w, blockdevs, extra)
                made.append(d)
                return d

            err = None
            try:
                scenario(factory, workdir)
            except (QmpError, OSError) as e:
                err = str(e).replace(workdir, "$DIR")
            for d in made:
                d.drain_events(0.05) if d.proc.poll() is None else None
            trans = [x for d in made for x in transcript(d, drop)]
            evs = [x for d in made for x in event_list(d, drop)]
            if compare_events is not None:
                evs = compare_events(evs)
            results.append((trans, evs if events else [], err))
        finally:
            kill_all()
            shutil.rmtree(workdir, ignore_errors=True)
    (qt, qe, qerr), (st, se, serr) = results
    diffs = []
    if qerr or serr:
        diffs.append(f"scenario failed: qemu={qerr!r} strata={serr!r}")
    for i in range(max(len(qt), len(st))):
        q = qt[i] if i < len(qt) else None
        s = st[i] if i < len(st) else None
        if q != s:
            head = (q or s)[0]
            detail = "\n".join(f"      {p}: qemu={json.dumps(a)} strata={json.dumps(b)}"
                               for p, a, b in value_diff(q, s))
            diffs.append(f"step {i} ({head} {json.dumps((q or s)[1])[:200]}):\n{detail}")
    if qe != se:
        i = next((i for i, (a, b) in enumerate(zip(qe, se)) if a != b), min(len(qe), len(se)))
        short = lambda evs: " ".join(  # noqa: E731
            e["data"].get("status", e["event"]) if e["event"] == "JOB_STATUS_CHANGE"
            else f'{e["event"]}{json.dumps(e.get("data", {}), sort_keys=True)}' for e in evs)
        diffs.append(f"events differ from #{i}:\n    qemu:   {short(qe[max(0, i - 3):i + 12])}"
                     f"\n    strata: {short(se[max(0, i - 3):i + 12])}")
    return diffs


def value_diff(a, b, path=""):
    """The paths where A and B differ, with both values (shortened)."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in list(a) + [k for k in b if k not in a]:
            out += value_diff(a.get(k, "<absent>"), b.get(k, "<absent>"), f"{path}.{k}")
        return out
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and len(a) == len(b):
        out = []
        for i, (x, y) in enumerate(zip(a, b)):
            out += value_diff(x, y, f"{path}[{i}]")
        return out
    if a != b:
        return [(path or "value", a, b)]
    return []


def qemu_img(*args, cwd=None):
    r = subprocess.run(["qemu-img", *args], cwd=cwd, capture_output=True, text=True, timeout=60)
    return r.returncode, r.stdout + r.stderr
