#!/usr/bin/env python3
"""Strata's main job: a live point-in-time backup of a disk that keeps being written.

1. strata-img creates a qcow2 disk; strata-storage-daemon serves it with a QMP monitor.
2. A workload writes 64 KiB blocks at pseudo-random places, each filled with a byte
   derived from its sequence number (through QMP's human-monitor-command "qemu-io",
   the way QEMU's own tests simulate guest writes); a log of the writes is the model.
3. In the middle of the workload, drive-backup starts (rate-limited so that the copy
   and the writes overlap), and the workload keeps writing until the job completes.
4. The daemon quits. qemu-img checks both images; the backup must equal, byte for
   byte, the disk as it was when the backup started (recomputed from the write log),
   and the disk must hold every write.

Only the Python standard library is used. Exit status 0 means every check passed.
Usage: live_backup.py STRATA_IMG STRATA_STORAGE_DAEMON WORKDIR [--size MiB]
The writes and the backup command share one QMP connection, so the order between
them is exact: the disk at backup start is the model after the writes before it.
"""
import argparse
import json
import os
import random
import socket
import subprocess
import sys
import time

STAMP = 64 * 1024
_t0 = [time.monotonic()]


def step(what):
    """Prints a step with the time the previous one took."""
    now = time.monotonic()
    print(f"   ({now - _t0[0]:.1f} s)")
    _t0[0] = now
    print(f"== {what}", flush=True)


class Qmp:
    """A minimal QMP client: one request at a time, events collected."""

    def __init__(self, path):
        self.sock = socket.socket(socket.AF_UNIX)
        for _ in range(200):
            try:
                self.sock.connect(path)
                break
            except OSError:
                time.sleep(0.05)
        else:
            raise RuntimeError("the daemon's QMP socket never appeared")
        # Reads through a file object, writes straight to the socket: writing through
        # a read-write text file would drop lines it has already read ahead.
        self.file = self.sock.makefile("r", encoding="ascii", newline="\r\n")
        self.events = []
        greeting = json.loads(self.file.readline())
        assert "QMP" in greeting, greeting
        self.cmd("qmp_capabilities")

    def cmd(self, name, **args):
        self.sock.sendall((json.dumps({"execute": name, "arguments": args}) + "\n").encode())
        while True:
            msg = json.loads(self.file.readline())
            if "event" in msg:
                self.events.append(msg)
                continue
            if "error" in msg:
                raise RuntimeError(f"{name}: {msg['error']['desc']}")
            return msg["return"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("strata_img")
    ap.add_argument("daemon")
    ap.add_argument("work")
    ap.add_argument("--size", type=int, default=128, help="disk size in MiB")
    a = ap.parse_args()
    size = a.size << 20
    os.makedirs(a.work, exist_ok=True)
    disk = os.path.join(a.work, "disk.qcow2")
    backup = os.path.join(a.work, "backup.qcow2")
    sock = os.path.join(a.work, "qmp.sock")
    for p in (disk, backup, sock):
        if os.path.exists(p):
            os.unlink(p)

    print(f"== strata-img create -f qcow2 {disk} {a.size}M")
    _t0[0] = time.monotonic()
    subprocess.run([a.strata_img, "create", "-q", "-f", "qcow2", disk, f"{a.size}M"], check=True)

    step("strata-storage-daemon with the disk as node 'disk0' and a QMP socket")
    daemon = subprocess.Popen([
        a.daemon,
        "--blockdev", f"driver=file,node-name=file0,filename={disk}",
        "--blockdev", "driver=qcow2,node-name=disk0,file=file0",
        "--chardev", f"socket,id=mon0,path={sock},server=on,wait=off",
        "--monitor", "chardev=mon0",
    ], stdout=subprocess.DEVNULL)  # qemu-io prints each write there, as in QEMU
    try:
        qmp = Qmp(sock)
        model = bytearray(size)
        rng = random.Random(2026)
        seq = 0

        def write_one():
            nonlocal seq
            seq += 1
            off = rng.randrange(size // STAMP) * STAMP
            # Each write fills 64 KiB with a byte derived from its sequence number, so
            # the model (and any mismatch) names the write a block came from.
            byte = (seq % 255) + 1
            model[off:off + STAMP] = bytes([byte]) * STAMP
            qmp.cmd("human-monitor-command",
                    **{"command-line": f'qemu-io disk0 "write -P {byte} {off} {STAMP}"'})

        step("workload: 300 stamped writes before the backup starts")
        for _ in range(300):
            write_one()
        at_start = bytes(model)
        first_after = seq + 1

        speed = 32 << 20
        step(f"drive-backup sync=full to {backup} at {speed >> 20} MiB/s, workload continues")
        qmp.cmd("drive-backup", **{"job-id": "backup0", "device": "disk0", "target": backup,
                                   "sync": "full", "format": "qcow2", "speed": speed})
        during = 0
        while qmp.cmd("query-block-jobs"):
            write_one()
            during += 1
        print(f"   {during} writes (stamps {first_after}..{seq}) landed while the backup ran")
        time.sleep(0.2)
        qmp.cmd("query-version")
        names = [e["event"] for e in qmp.events]
        done = [e for e in qmp.events if e["event"] == "BLOCK_JOB_COMPLETED"]
        assert done and "error" not in done[0]["data"], f"backup failed: {done}"
        statuses = [e["data"]["status"] for e in qmp.events if e["event"] == "JOB_STATUS_CHANGE"]
        print(f"   events: {', '.join(statuses)}; {names.count('BLOCK_JOB_COMPLETED')} BLOCK_JOB_COMPLETED")
        assert during > 0, "no write overlapped the backup; nothing was proven"
        step("quit")
        qmp.cmd("quit")
        daemon.wait(timeout=30)
    finally:
        if daemon.poll() is None:
            daemon.kill()

    def check(img):
        r = subprocess.run(["qemu-img", "check", img], capture_output=True, text=True)
        assert r.returncode == 0, f"qemu-img check {img}:\n{r.stdout}{r.stderr}"
        print(f"   qemu-img check {os.path.basename(img)}: no errors")

    def raw(img):
        out = img + ".raw"
        subprocess.run(["qemu-img", "convert", "-O", "raw", img, out], check=True)
        with open(out, "rb") as f:
            data = f.read()
        os.unlink(out)
        return data

    def first_diff(a, b):
        return next((i for i in range(0, len(a), 4096) if a[i:i + 4096] != b[i:i + 4096]), None)

    step("verify with QEMU's tools")
    check(disk)
    check(backup)
    got = raw(backup)
    d = first_diff(got, at_start)
    assert d is None, f"backup differs from the disk at backup start near offset {d}"
    print(f"   backup == disk at the instant the backup started ({size >> 20} MiB compared)")
    assert bytes(model) != at_start
    d = first_diff(raw(disk), bytes(model))
    assert d is None, f"disk lost a write near offset {d}"
    print(f"   disk == every one of the {seq} writes")
    step("done")
    print("\nOK: live point-in-time backup verified")


if __name__ == "__main__":
    try:
        main()
    except (AssertionError, RuntimeError, subprocess.CalledProcessError) as e:
        print(f"FAILED: {e}", file=sys.stderr)
        sys.exit(1)
