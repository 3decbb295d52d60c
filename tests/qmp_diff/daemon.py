#!/usr/bin/env python3
"""Persistent-bitmap interop and daemon robustness, against QEMU:

- a persistent bitmap Strata records is what qemu-img info and
  qemu-storage-daemon see (count and sha256), and the other way round;
- a daemon killed with SIGKILL leaves the bitmap in use (inconsistent on the
  next open), as QEMU's does;
- SIGTERM and quit store bitmaps and remove the pidfile; --daemonize returns
  once the monitor is up; a bad --blockdev is a one-line error and exit 1.

usage: daemon.py [CHECK...]
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import Daemon, QSD, STRATA, have, kill_all, qemu_img  # noqa: E402

WRITES = ["write -P 0x11 0 4k", "write -P 0x22 1M 1M", "write -z 8M 64k",
          "write -P 0x33 63M 1M", "write 100k 1"]


def node(path):
    return f"driver=qcow2,node-name=q,file.driver=file,file.filename={path}"


def bitmap_state(d, name="p"):
    """(dirty-bitmaps entry, sha256) of bitmap NAME on node q."""
    r = d.ok("query-named-block-nodes", flat=True)
    info = [b for n in r if n["node-name"] == "q" for b in n.get("dirty-bitmaps", [])
            if b.get("name") == name]
    sha = d.cmd("x-debug-block-dirty-bitmap-sha256", record=False, node="q", name=name)
    return (info[0] if info else None), sha.get("return", sha.get("error"))


def img_bitmaps(path):
    rc, out = qemu_img("info", "-U", "--output=json", path)
    if rc != 0:
        return out
    data = json.loads(out).get("format-specific", {}).get("data", {})
    return data.get("bitmaps")


def check(cond, what, failures):
    print(("ok   " if cond else "FAIL ") + what)
    if not cond:
        failures.append(what)


def c_interop(w, failures):
    """Strata writes a persistent bitmap; QEMU reads it, and the other way round."""
    for writer, reader in (("strata", "qsd"), ("qsys", "strata")):
        sub = tempfile.mkdtemp(dir=w)
        img = os.path.join(sub, "a.qcow2")
        qemu_img("create", "-q", "-f", "qcow2", img, "64M")
        d = Daemon(writer, sub, [node(img)])
        d.ok("block-dirty-bitmap-add", node="q", name="p", persistent=True,
             granularity=65536)
        d.ok("block-dirty-bitmap-add", node="q", name="p2", persistent=True,
             granularity=4096, disabled=True)
        for c in WRITES:
            d.hmp("q", c)
        before = bitmap_state(d)
        before2 = bitmap_state(d, "p2")
        d.quit()
        check(d.proc.returncode == 0, f"{writer}: quit exits 0", failures)
        on_disk = img_bitmaps(img)
        # QEMU appends new bitmaps to the directory newest first
        check(on_disk == [{"flags": [], "name": "p2", "granularity": 4096},
                          {"flags": ["auto"], "name": "p", "granularity": 65536}],
              f"{writer}: qemu-img info lists the stored bitmaps: {on_disk}", failures)
        rc, out = qemu_img("check", img)
        check(rc == 0, f"{writer}: qemu-img check is clean after quit", failures)
        r = Daemon(reader, sub, [node(img)])
        after = bitmap_state(r)
        after2 = bitmap_state(r, "p2")
        r.quit()
        check(before == after and before2 == after2,
              f"{writer} -> {reader}: same count and sha256 "
              f"({before[0] and before[0]['count']}, {after[0] and after[0]['count']})",
              failures)
        check(before[0] is not None and before[0]["count"] > 0,
              f"{writer}: the bitmap recorded the writes", failures)
        kill_all()


def c_sigkill(w, failures):
    """SIGKILL leaves the bitmap in use; the next open reports it inconsistent."""
    results = {}
    for kind in ("qsys", "strata"):
        sub = tempfile.mkdtemp(dir=w)
        img = os.path.join(sub, "a.qcow2")
        qemu_img("create", "-q", "-f", "qcow2", img, "64M")
        # store the bitmap cleanly first, then reopen (which marks it in use),
        # write and die
        d = Daemon(kind, sub, [node(img)])
        d.ok("block-dirty-bitmap-add", node="q", name="p", persistent=True)
        d.quit()
        d = Daemon(kind, sub, [node(img)])
        d.hmp("q", "write 0 64k")
        d.hmp("q", "flush")
        d.kill(signal.SIGKILL)
        on_disk = img_bitmaps(img)
        r = Daemon("qsd", sub, [node(img)])
        info, sha = bitmap_state(r)
        r.cmd("block-dirty-bitmap-clear", record=False, node="q", name="p")
        r.quit()
        results[kind] = (on_disk, info, sha)
        kill_all()
    print(f"     qemu:   {results['qsys']}\n     strata: {results['strata']}")
    check(results["qsys"] == results["strata"],
          "after SIGKILL: same on-disk flags and the same inconsistent bitmap in QEMU",
          failures)
    check(results["strata"][1] is not None and results["strata"][1].get("inconsistent"),
          "after SIGKILL: the bitmap is inconsistent", failures)


def c_sigterm_pidfile(w, failures):
    for kind in ("qsd", "strata"):
        sub = tempfile.mkdtemp(dir=w)
        img = os.path.join(sub, "a.qcow2")
        pid = os.path.join(sub, "pid")
        qemu_img("create", "-q", "-f", "qcow2", img, "64M")
        d = Daemon(kind, sub, [node(img)], ["--pidfile", pid])
        d.ok("block-dirty-bitmap-add", node="q", name="p", persistent=True)
        check(os.path.exists(pid) and open(pid).read().strip() == str(d.proc.pid),
              f"{kind}: pidfile holds the pid", failures)
        d.proc.send_signal(signal.SIGTERM)
        rc = d.proc.wait(timeout=20)
        check(rc == 0, f"{kind}: SIGTERM exits 0 (got {rc})", failures)
        check(not os.path.exists(pid), f"{kind}: SIGTERM removes the pidfile", failures)
        bm = img_bitmaps(img)
        check(bm == [{"flags": ["auto"], "name": "p", "granularity": 65536}],
              f"{kind}: SIGTERM stores the bitmap, not in use: {bm}", failures)
        kill_all()


def alive(pid):
    """Whether PID runs (an exited daemon may stay a zombie until init reaps it)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def c_daemonize(w, failures):
    for prog, kind in ((QSD, "qsd"), (STRATA, "strata")):
        sub = tempfile.mkdtemp(dir=w)
        sock = os.path.join(sub, "qmp.sock")
        pid = os.path.join(sub, "pid")
        t0 = time.time()
        p = subprocess.run([prog, "--chardev", f"socket,id=m,path={sock},server=on,wait=off",
                            "--monitor", "chardev=m", "--pidfile", pid, "--daemonize"],
                           capture_output=True, timeout=30)
        check(p.returncode == 0, f"{kind}: --daemonize returns 0 ({p.stderr!r})", failures)
        check(os.path.exists(sock), f"{kind}: the monitor is up when --daemonize returns",
              failures)
        try:
            daemon_pid = int(open(pid).read())
        except (OSError, ValueError):
            check(False, f"{kind}: pidfile written", failures)
            continue
        check(alive(daemon_pid), f"{kind}: the daemon runs", failures)
        import socket
        s = socket.socket(socket.AF_UNIX)
        s.connect(sock)
        f = s.makefile("rb")
        greeting = json.loads(f.readline())
        s.sendall(b'{"execute":"qmp_capabilities"}\n{"execute":"quit"}\n')
        f.readline()
        f.readline()
        for _ in range(200):
            if not alive(daemon_pid):
                break
            time.sleep(0.05)
        else:
            os.kill(daemon_pid, signal.SIGKILL)
            check(False, f"{kind}: daemon exits after quit", failures)
        check("QMP" in greeting, f"{kind}: daemonized monitor greets", failures)
        check(not os.path.exists(pid), f"{kind}: pidfile removed after quit", failures)
        print(f"     {kind}: daemonized in {time.time() - t0:.2f}s")


def c_bad_blockdev(w, failures):
    outs = {}
    for prog, kind in ((QSD, "qsd"), (STRATA, "strata")):
        results = []
        for bad in ("driver=nope,node-name=x", "driver=file,node-name=x",
                    f"driver=file,node-name=x,filename={w}/missing",
                    "driver=qcow2,node-name=x,file=nothere", "{bad json",
                    "driver=file,node-name=x,filename=/dev/null,bogus=1"):
            p = subprocess.run([prog, "--blockdev", bad], capture_output=True, timeout=30,
                               cwd=w)
            err = p.stderr.decode(errors="replace").replace(w, "$DIR")
            lines = err.strip().splitlines()
            check(p.returncode == 1 and len(lines) == 1,
                  f"{kind}: bad --blockdev {bad!r}: exit {p.returncode}, {lines}", failures)
            results.append(err.split(":", 1)[-1].strip())
        outs[kind] = results
    for q, s in zip(outs["qsd"], outs["strata"]):
        check(q == s, f"same error text: qemu={q!r} strata={s!r}", failures)


CHECKS = {
    "interop": c_interop,
    "sigkill": c_sigkill,
    "sigterm_pidfile": c_sigterm_pidfile,
    "daemonize": c_daemonize,
    "bad_blockdev": c_bad_blockdev,
}


def main(names):
    failures = []
    for name in names or CHECKS:
        if name in ("interop", "sigkill") and not have("qsys"):
            print(f"SKIP {name}: qemu-system-x86_64 not installed (needed for guest writes)")
            continue
        w = tempfile.mkdtemp(prefix=f"qd-{name}-")
        try:
            CHECKS[name](w, failures)
        except Exception as e:  # a crash in a check is a failure, not an abort
            check(False, f"{name}: {type(e).__name__}: {e}", failures)
        finally:
            kill_all()
            shutil.rmtree(w, ignore_errors=True)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main(sys.argv[1:])
