#!/usr/bin/env python3
"""Backup performance, Strata next to QEMU in one run, as ratios.

Rows (each run with the same QMP commands on both):
  1. blockdev-backup sync=full of a fully written 1 GiB qcow2 to a new qcow2;
  2. the same for a 16 GiB qcow2 with 2% allocated;
  3. the rate limit: speed=50 MiB/s on the 1 GiB image (expect 20 s +- 10%);
  4. guest-write latency: 4 KiB writes to not-yet-copied clusters through
     human-monitor-command qemu-io, with a backup running (speed 64 MiB/s) vs idle.
QEMU runs as `qemu-system-x86_64 -M none` (it has human-monitor-command); Strata as
strata-storage-daemon. Prints a Markdown table.
Usage: backup.py STRATA_STORAGE_DAEMON WORKDIR [--quick]
"""
import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time


class Qmp:
    def __init__(self, path):
        self.sock = socket.socket(socket.AF_UNIX)
        for _ in range(400):
            try:
                self.sock.connect(path)
                break
            except OSError:
                time.sleep(0.05)
        else:
            raise RuntimeError("no QMP socket")
        # Reads through a file object, writes straight to the socket: writing through
        # a read-write text file would drop lines it has already read ahead.
        self.f = self.sock.makefile("r", encoding="ascii", newline="\r\n")
        self.events = []
        json.loads(self.f.readline())
        self.cmd("qmp_capabilities")

    def cmd(self, name, **args):
        self.sock.sendall((json.dumps({"execute": name, "arguments": args}) + "\n").encode())
        while True:
            m = json.loads(self.f.readline())
            if "event" in m:
                self.events.append(m)
                continue
            if "error" in m:
                raise RuntimeError(f"{name}: {m['error']['desc']}")
            return m["return"]

    def wait_event(self, name):
        while True:
            for i, e in enumerate(self.events):
                if e["event"] == name:
                    return self.events.pop(i)
            m = json.loads(self.f.readline())
            if "event" in m:
                self.events.append(m)


def start(kind, daemon, sock):
    if os.path.exists(sock):
        os.unlink(sock)
    chardev = f"socket,id=m0,path={sock},server=on,wait=off"
    if kind == "qemu":
        argv = ["qemu-system-x86_64", "-M", "none", "-nodefaults", "-display", "none",
                "-chardev", chardev, "-mon", "chardev=m0,mode=control"]
    else:
        argv = [daemon, "--chardev", chardev, "--monitor", "chardev=m0"]
    p = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return p, Qmp(sock)


def add(q, name, path):
    q.cmd("blockdev-add", driver="qcow2", **{"node-name": name},
          file={"driver": "file", "filename": path})


def backup_time(kind, daemon, work, src, size, speed=0):
    tgt = os.path.join(work, f"tgt-{kind}.qcow2")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", tgt, str(size)], check=True)
    p, q = start(kind, daemon, os.path.join(work, f"{kind}.sock"))
    try:
        add(q, "src", src)
        add(q, "tgt", tgt)
        t0 = time.monotonic()
        q.cmd("blockdev-backup", **{"job-id": "j", "device": "src", "target": "tgt",
                                    "sync": "full", "speed": speed})
        ev = q.wait_event("BLOCK_JOB_COMPLETED")
        took = time.monotonic() - t0
        assert "error" not in ev["data"], ev
        q.cmd("quit")
        p.wait(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
    r = subprocess.run(["qemu-img", "compare", src, tgt], capture_output=True, text=True)
    assert r.returncode == 0, f"{kind} backup differs: {r.stdout}"
    os.unlink(tgt)
    return took


def write_latencies(kind, daemon, work, src, size, during_backup, n=300):
    tgt = os.path.join(work, f"lat-{kind}.qcow2")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", tgt, str(size)], check=True)
    p, q = start(kind, daemon, os.path.join(work, f"{kind}-lat.sock"))
    lat = []
    try:
        add(q, "src", src)
        add(q, "tgt", tgt)
        if during_backup:
            q.cmd("blockdev-backup", **{"job-id": "j", "device": "src", "target": "tgt",
                                        "sync": "full", "speed": 64 << 20})
        # Writes walk the disk from its end, where the background copy has not been yet.
        for i in range(n):
            off = size - (i + 1) * (1 << 20)
            t0 = time.monotonic()
            q.cmd("human-monitor-command",
                  **{"command-line": f'qemu-io src "write -P 7 {off} 4k"'})
            lat.append((time.monotonic() - t0) * 1e6)
        if during_backup:
            q.cmd("block-job-cancel", device="j", force=True)
            q.wait_event("BLOCK_JOB_CANCELLED")
        q.cmd("quit")
        p.wait(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
    os.unlink(tgt)
    lat.sort()
    return statistics.median(lat), lat[int(len(lat) * 0.99) - 1]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("daemon")
    ap.add_argument("work")
    ap.add_argument("--quick", action="store_true", help="smaller images, no rate-limit row")
    a = ap.parse_args()
    os.makedirs(a.work, exist_ok=True)
    gib = 1 << 30
    size1 = gib // 4 if a.quick else gib
    full = os.path.join(a.work, "full.qcow2")
    sparse = os.path.join(a.work, "sparse.qcow2")
    if not os.path.exists(full):
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", full, str(size1)], check=True)
        subprocess.run(["qemu-io", "-c", f"write -P 0x5a 0 {size1}", full], check=True,
                       stdout=subprocess.DEVNULL)
    size2 = 16 * gib
    if not os.path.exists(sparse):
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", sparse, str(size2)], check=True)
        cmds = []
        for i in range(0, 16 * 50):  # 2%: 50 x 64 KiB... per 20 MiB stretch
            cmds += ["-c", f"write -P 0x11 {i * (20 << 20)} 400k"]
        subprocess.run(["qemu-io"] + cmds + [sparse], check=True, stdout=subprocess.DEVNULL)
    rows = []

    def row(name, q, s, unit="s", fmt="{:.2f}"):
        ratio = s / q if q else float("nan")
        rows.append(f"| {name} | {fmt.format(q)} {unit} | {fmt.format(s)} {unit} | {ratio:.2f} |")
        print(rows[-1], flush=True)

    print("| row | QEMU 10.0.2 | Strata | Strata / QEMU |")
    print("| --- | ---: | ---: | ---: |")
    tq = min(backup_time("qemu", a.daemon, a.work, full, size1) for _ in range(2))
    ts = min(backup_time("strata", a.daemon, a.work, full, size1) for _ in range(2))
    row(f"backup sync=full, {size1 >> 20} MiB fully written qcow2 -> new qcow2", tq, ts)
    tq = backup_time("qemu", a.daemon, a.work, sparse, size2)
    ts = backup_time("strata", a.daemon, a.work, sparse, size2)
    row("backup sync=full, 16 GiB qcow2 with 2% allocated", tq, ts)
    if not a.quick:
        tq = backup_time("qemu", a.daemon, a.work, full, size1, speed=50 << 20)
        ts = backup_time("strata", a.daemon, a.work, full, size1, speed=50 << 20)
        row("backup at speed=50 MiB/s, 1 GiB (expect 20 s +- 10%)", tq, ts)
    for during in (False, True):
        what = "during a backup" if during else "idle"
        q50, q99 = write_latencies("qemu", a.daemon, a.work, full, size1, during)
        s50, s99 = write_latencies("strata", a.daemon, a.work, full, size1, during)
        row(f"4 KiB write latency via qemu-io, {what}, p50", q50, s50, "us", "{:.0f}")
        row(f"4 KiB write latency via qemu-io, {what}, p99", q99, s99, "us", "{:.0f}")


if __name__ == "__main__":
    try:
        main()
    except (AssertionError, RuntimeError, subprocess.CalledProcessError) as e:
        print(f"FAILED: {e}", file=sys.stderr)
        sys.exit(1)
