#!/usr/bin/env python3
"""Differential test of block jobs and backup: drive-backup / blockdev-backup
sessions run against QEMU (qemu-storage-daemon, or qemu-system -M none where
guest writes are injected with human-monitor-command qemu-io) and
strata-storage-daemon; answers, error texts and event sequences must match
after normalising progress numbers where they legitimately differ. The
point-in-time scenarios also check the backup content with qemu-img compare
against a copy of the source taken before the job started.

usage: backup.py [SCENARIO...]
"""
import os
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import have, run_pair, qemu_img, QmpError  # noqa: E402

MIB = 1 << 20
# progress numbers that depend on timing
PROGRESS = ("offset", "current-progress", "total-progress", "len", "busy")


def img(w, name, fmt="qcow2", size="64M", *opts):
    rc, out = qemu_img("create", "-q", "-f", fmt, *opts, os.path.join(w, name), size)
    if rc != 0:
        raise QmpError(f"qemu-img create: {out}")
    return os.path.join(w, name)


def node(name, path, fmt="qcow2"):
    return f"driver={fmt},node-name={name},file.driver=file,file.filename={path}"


def wait_gone(d, job):
    d.wait_event("JOB_STATUS_CHANGE", id=job, status="null")


def jobs(d, label):
    """Records query-block-jobs and query-jobs without timing-dependent numbers."""
    for c in ("query-block-jobs", "query-jobs"):
        r = d.cmd(c, record=False)
        for j in r.get("return", []):
            for k in PROGRESS:
                if k in j:
                    j[k] = "<n>"
        d.note(f"{label}: {c}", r)


def compare(d, a, b, label):
    """Records whether qemu-img compare finds A and B identical."""
    rc, out = qemu_img("compare", "-q", a, b)
    d.note(f"compare {label}", rc)
    if os.environ.get("VERBOSE"):
        print(f"  {d.kind}: compare {label}: {rc}")


# ------------------------------------------------------------------ scenarios

def s_full_auto(start, w):
    a = img(w, "a.qcow2")
    t = img(w, "t.qcow2")
    d = start([node("src", a), node("tgt", t)])
    d.ok("blockdev-backup", device="src", target="tgt", sync="full", job_id="j1")
    wait_gone(d, "j1")
    jobs(d, "after")


def s_manual_finalize_dismiss(start, w):
    a = img(w, "a.qcow2")
    t = img(w, "t.qcow2")
    d = start([node("src", a), node("tgt", t)])
    d.cmd("blockdev-backup", device="src", target="tgt", sync="full", job_id="j1",
          auto_finalize=False, auto_dismiss=False)
    d.wait_event("BLOCK_JOB_PENDING", id="j1")
    jobs(d, "pending")
    for verb in ("job-dismiss", "job-complete", "job-pause", "job-resume"):
        d.cmd(verb, id="j1")
    d.cmd("block-job-complete", device="j1")
    d.cmd("block-job-dismiss", id="j1")
    d.cmd("block-job-set-speed", device="j1", speed=1)
    d.cmd("job-finalize", id="j1")
    d.wait_event("JOB_STATUS_CHANGE", id="j1", status="concluded")
    jobs(d, "concluded")
    d.cmd("job-finalize", id="j1")
    d.cmd("block-job-cancel", device="j1")
    d.cmd("job-dismiss", id="j1")
    d.cmd("job-dismiss", id="j1")
    d.cmd("block-job-dismiss", id="j1")
    # the block-job-* spelling of the same flow
    d.cmd("blockdev-backup", device="src", target="tgt", sync="full", job_id="j2",
          auto_finalize=False, auto_dismiss=False)
    d.wait_event("BLOCK_JOB_PENDING", id="j2")
    d.cmd("block-job-finalize", id="j2")
    d.wait_event("JOB_STATUS_CHANGE", id="j2", status="concluded")
    d.cmd("block-job-dismiss", id="j2")
    jobs(d, "end")


def s_pause_speed_cancel(start, w):
    a = img(w, "a.qcow2")
    t = img(w, "t.qcow2")
    rc, out = qemu_img("create", "-q", "-f", "qcow2", a, "64M")
    d = start([node("src", a), node("tgt", t)])
    # fill the source so that there is something to copy
    d.ok("blockdev-backup", device="src", target="tgt", sync="full", job_id="j",
         speed=64 * 1024)
    d.started("j")
    time.sleep(0.4)
    r = d.ok("query-block-jobs")
    d.note("offset limited by speed", [j["offset"] <= 4 * MIB for j in r])
    jobs(d, "running")
    d.cmd("block-job-set-speed", device="j", speed=-1)
    d.cmd("block-job-set-speed", device="nope", speed=1)
    d.cmd("block-job-pause", device="j")
    d.cmd("block-job-pause", device="j")
    d.cmd("job-pause", id="j")
    d.wait_event("JOB_STATUS_CHANGE", id="j", status="paused")
    jobs(d, "paused")
    d.cmd("block-job-cancel", device="j")
    d.cmd("job-complete", id="j")
    d.cmd("job-finalize", id="j")
    d.cmd("block-job-resume", device="j")
    d.cmd("block-job-resume", device="j")
    d.cmd("job-resume", id="j")
    d.cmd("block-job-set-speed", device="j", speed=0)
    d.wait_event("JOB_STATUS_CHANGE", id="j", status="concluded", timeout=60)
    wait_gone(d, "j")
    # cancel while running, and while paused with force
    d.ok("blockdev-backup", device="src", target="tgt", sync="full", job_id="c1", speed=1)
    d.started("c1")
    d.cmd("block-job-cancel", device="c1")
    wait_gone(d, "c1")
    d.ok("blockdev-backup", device="src", target="tgt", sync="full", job_id="c2", speed=1)
    d.started("c2")
    d.cmd("job-pause", id="c2")
    d.wait_event("JOB_STATUS_CHANGE", id="c2", status="paused")
    d.cmd("block-job-cancel", device="c2", force=True)
    wait_gone(d, "c2")
    d.ok("blockdev-backup", device="src", target="tgt", sync="none", job_id="c3")
    d.started("c3")
    jobs(d, "sync=none")
    d.cmd("job-cancel", id="c3")
    wait_gone(d, "c3")
    # unknown jobs
    for verb in ("block-job-pause", "block-job-resume", "block-job-cancel",
                 "block-job-complete"):
        d.cmd(verb, device="nope")
    for verb in ("block-job-finalize", "block-job-dismiss", "job-pause", "job-resume",
                 "job-cancel", "job-complete", "job-finalize", "job-dismiss"):
        d.cmd(verb, id="nope")


def s_validation(start, w):
    a = img(w, "a.qcow2")
    t = img(w, "t.qcow2")
    s = img(w, "small.qcow2", "qcow2", "32M")
    r = img(w, "r.raw", "raw", "64M")
    d = start([node("src", a), node("tgt", t), node("small", s), node("rtgt", r, "raw")])
    d.ok("block-dirty-bitmap-add", node="src", name="bm")
    bb = lambda **k: d.cmd("blockdev-backup", **k)  # noqa: E731
    db = lambda **k: d.cmd("drive-backup", **k)  # noqa: E731
    common = dict(device="src", target="tgt")
    bb(sync="bitmap", **common)
    bb(sync="incremental", **common)
    bb(sync="incremental", bitmap="bm", bitmap_mode="always", **common)
    bb(sync="incremental", bitmap="bm", bitmap_mode="never", **common)
    bb(sync="bitmap", bitmap="nope", bitmap_mode="always", **common)
    bb(sync="full", bitmap="bm", **common)
    bb(sync="none", bitmap="bm", bitmap_mode="always", **common)
    bb(sync="full", bitmap="bm", bitmap_mode="never", **common)
    bb(sync="top", bitmap="bm", bitmap_mode="never", **common)
    bb(sync="full", bitmap_mode="always", **common)
    bb(sync="full", device="src", target="src")
    bb(sync="full", device="src", target="small")
    bb(sync="full", device="nope", target="tgt")
    bb(sync="full", device="src", target="nope")
    bb(sync="full", job_id="1bad", **common)
    bb(sync="full", job_id="", **common)
    bb(sync="bogus", **common)
    bb(sync="full", speed=-1, **common)
    bb(sync="full", compress=True, **common)
    bb(sync="full", x_perf={"max-workers": 0}, **common)
    bb(sync="full", x_perf={"max-chunk": 4096}, **common)
    bb(sync="full", x_perf={"max-chunk": -1}, **common)
    bb(sync="full", on_source_error="bogus", **common)
    bb(sync="full", x_perf={"min-cluster-size": 3000}, **common)
    bb(sync="full", on_source_error="stop", **common)
    bb(sync="full", on_source_error="enospc", **common)
    bb(sync="full", on_target_error="stop", job_id="", **common)
    bb(sync="full", x_perf={"max-workers": 2147483648}, **common)
    bb(sync="full", device="src", target="rtgt", compress=True)
    bb(sync="full", filter_node_name="bad name", **common)
    bb(sync="bitmap", bitmap="bm", bitmap_mode="on-success", device="src", target="small")
    bb(sync="top", bitmap="bm", bitmap_mode="always", job_id="x y", **common)
    bb(sync="full", **common, zz=1)
    bb(device="src", target="tgt")
    bb(sync="full", filter_node_name="src", **common)
    d.cmd("blockdev-backup", sync="full", job_id="j", speed=1, **common)
    d.started("j")
    bb(sync="full", job_id="j", **common)
    bb(sync="full", device="src", target="small", job_id="k")
    d.cmd("job-cancel", id="j")
    wait_gone(d, "j")
    db(sync="full", device="src", target=os.path.join(w, "nodir", "x.qcow2"))
    db(sync="full", device="src", target=os.path.join(w, "x.qcow2"), format="bogus")
    db(sync="full", device="src", target=os.path.join(w, "missing.qcow2"), mode="existing")
    db(sync="full", device="nope", target=os.path.join(w, "x.qcow2"))
    db(sync="bitmap", device="src", target=os.path.join(w, "y.qcow2"))


def s_drive_backup(start, w):
    base = img(w, "base.qcow2")
    a = img(w, "a.qcow2", "qcow2", "64M", "-F", "qcow2", "-b", "base.qcow2")
    raw = img(w, "r.raw", "raw", "8M")
    d = start([node("src", a), node("r", raw, "raw")])
    _ = base
    for sync, name in (("full", "f.qcow2"), ("top", "top.qcow2"), ("none", "n.qcow2")):
        d.cmd("drive-backup", device="src", sync=sync, target=os.path.join(w, name),
              job_id=sync)
        if sync == "none":
            d.cmd("job-cancel", id=sync)
        wait_gone(d, sync)
        rc, out = qemu_img("info", "--output=json", os.path.join(w, name))
        import json
        info = json.loads(out) if rc == 0 else out
        d.note(f"target {name}", {k: info.get(k) for k in ("format", "virtual-size",
                                                          "backing-filename",
                                                          "full-backing-filename",
                                                          "backing-filename-format")}
               if isinstance(info, dict) else info)
    # raw source: the target defaults to raw; sync=top without backing becomes full
    d.cmd("drive-backup", device="r", sync="top", target=os.path.join(w, "rt.img"),
          job_id="rt")
    wait_gone(d, "rt")
    rc, out = qemu_img("info", "--output=json", os.path.join(w, "rt.img"))
    d.note("raw target format", '"format": "raw"' in out)
    img(w, "ex.qcow2", "qcow2", "8M")
    d.cmd("drive-backup", device="r", sync="full", target=os.path.join(w, "ex.qcow2"),
          mode="existing", format="qcow2", job_id="ex")
    wait_gone(d, "ex")
    d.ok("query-named-block-nodes", flat=True)
    d.log.pop()


def s_incremental(start, w):
    a = img(w, "a.qcow2")
    t0 = img(w, "t0.qcow2")
    d = start([node("src", a), node("t0", t0)])
    d.ok("block-dirty-bitmap-add", node="src", name="bm", granularity=65536)
    d.hmp("src", "write -P 0x11 0 1M")
    d.hmp("src", "write -P 0x22 10M 128k")
    d.cmd("x-debug-block-dirty-bitmap-sha256", node="src", name="bm")
    for i, mode in enumerate(("never", "always", "on-success")):
        tn = img(w, f"t{i + 1}.qcow2")
        d.ok("blockdev-add", driver="qcow2", node_name=f"t{i + 1}",
             file={"driver": "file", "filename": tn})
        d.cmd("blockdev-backup", device="src", target=f"t{i + 1}", sync="bitmap",
              bitmap="bm", bitmap_mode=mode, job_id=f"b{i}")
        wait_gone(d, f"b{i}")
        d.cmd("x-debug-block-dirty-bitmap-sha256", node="src", name="bm")
        r = d.ok("query-named-block-nodes", flat=True)
        d.log.pop()
        d.note(f"bitmap after {mode}", [n.get("dirty-bitmaps") for n in r
                                        if n["node-name"] == "src"])
        d.hmp("src", f"write -P 0x3{i} {20 + i}M 64k")
    # a cancelled incremental backup keeps every bit (what always-mode clears on
    # cancel depends on how far the copy got, so it is not compared)
    # (two areas more than a chunk apart: at speed=1 only the first can be copied
    # before the cancel, in both)
    d.hmp("src", "write -P 0x44 50M 64k")
    tn = img(w, "c.qcow2")
    d.ok("blockdev-add", driver="qcow2", node_name="c", file={"driver": "file", "filename": tn})
    d.cmd("blockdev-backup", device="src", target="c", sync="incremental", bitmap="bm",
          job_id="c", speed=1)
    d.started("c")
    d.cmd("job-cancel", id="c")
    wait_gone(d, "c")
    d.cmd("x-debug-block-dirty-bitmap-sha256", node="src", name="bm")
    # a backup whose transaction aborts never starts and leaves the bitmap alone
    d.cmd("transaction", actions=[
        {"type": "blockdev-backup", "data": {"device": "src", "target": "c", "sync": "bitmap",
                                             "bitmap": "bm", "bitmap-mode": "always",
                                             "job-id": "t"}},
        {"type": "abort", "data": {}}])
    d.cmd("x-debug-block-dirty-bitmap-sha256", node="src", name="bm")
    jobs(d, "after abort")


def s_point_in_time(start, w):
    """The target equals the source at job start while writes go on."""
    a = img(w, "a.qcow2")
    raw = img(w, "a.raw", "raw", "64M")
    t = img(w, "t.qcow2")
    tr = img(w, "t.raw", "raw", "64M")
    ref = os.path.join(w, "ref.qcow2")
    ref_raw = os.path.join(w, "ref.raw")
    # the disk at job start: written before the daemon opens it
    for path, fmt in ((a, "qcow2"), (raw, "raw")):
        import subprocess
        subprocess.run(["qemu-io", "-f", fmt, "-c", "write -P 0x5a 0 24M",
                        "-c", "write -P 0x6b 40M 8M", path], check=True,
                       capture_output=True, timeout=60)
    shutil.copy(a, ref)
    shutil.copy(raw, ref_raw)
    d = start([node("src", a), node("tgt", t), node("rsrc", raw, "raw"),
               node("rtgt", tr, "raw")])
    for src, tgt, job in (("src", "tgt", "q"), ("rsrc", "rtgt", "r")):
        d.ok("blockdev-backup", device=src, target=tgt, sync="full", job_id=job,
             speed=32 * MIB, filter_node_name=f"{job}-cbw")
        # stamps over copied and uncopied areas while the job runs; guest writes
        # go through the filter (QEMU refuses writes to the node below it)
        for i in range(12):
            d.hmp(f"{job}-cbw", f"write -P 0x{0x80 + i:02x} {(i * 5) % 64}M 256k")
        wait_gone(d, job)
        d.hmp(src, "flush")
    d.ok("blockdev-del", node_name="tgt")
    d.ok("blockdev-del", node_name="rtgt")
    d.ok("blockdev-del", node_name="src")
    d.ok("blockdev-del", node_name="rsrc")
    compare(d, ref, t, "qcow2 target vs source at start")
    compare(d, ref_raw, tr, "raw target vs source at start")
    # negative control: the source itself (a copy taken after the writes) differs
    compare(d, ref, a, "negative control (qcow2)")
    compare(d, ref_raw, raw, "negative control (raw)")


def s_incremental_chain(start, w):
    """Full backup plus incrementals while stamps are written during each job;
    each layer (backing = the previous one) equals the source at its job's start."""
    a = img(w, "a.qcow2")
    d = start([node("src", a)])
    d.ok("block-dirty-bitmap-add", node="src", name="bm")
    d.hmp("src", "write -P 0x01 0 2M")
    prev = None
    for i in range(4):
        tn = os.path.join(w, f"b{i}.qcow2")
        if prev is None:
            img(w, f"b{i}.qcow2")
        else:
            img(w, f"b{i}.qcow2", "qcow2", "64M", "-F", "qcow2", "-b", os.path.basename(prev))
        d.ok("blockdev-add", driver="qcow2", node_name=f"b{i}", backing=None,
             file={"driver": "file", "filename": tn})
        # the source at the job's start
        d.hmp("src", "flush")
        snap = os.path.join(w, f"snap{i}.qcow2")
        qemu_img("convert", "-U", "-O", "qcow2", a, snap)
        common = {"device": "src", "target": f"b{i}", "job-id": "j",
                  "speed": (8 if prev else 64) << 20, "filter-node-name": "cbw"}
        if prev is None:
            # clear the bitmap atomically with the full backup's start
            d.ok("transaction", actions=[
                {"type": "block-dirty-bitmap-clear", "data": {"node": "src", "name": "bm"}},
                {"type": "blockdev-backup", "data": dict(common, sync="full")}])
        else:
            d.ok("transaction", actions=[
                {"type": "blockdev-backup",
                 "data": dict(common, sync="incremental", bitmap="bm")}])
        # guest writes during the job: over the areas the bitmap names and new ones
        for k in range(6):
            d.hmp("cbw", f"write -P 0x{0x40 + 8 * i + k:02x} {(k * 7 + i) % 64}M 128k")
        wait_gone(d, "j")
        d.ok("blockdev-del", node_name=f"b{i}")
        compare(d, snap, tn, f"chain layer {i}")
        d.hmp("src", f"write -P 0x{0x10 + i:02x} {3 * i + 1}M 1M")
        prev = tn


def s_blkdebug_errors(start, w):
    """Injected target write errors: report fails the job, stop pauses it with
    io-status failed until resumed, ignore goes on."""
    import subprocess
    a = img(w, "a.qcow2")
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 0 2M", a], check=True,
                   capture_output=True, timeout=60)
    d = start([node("src", a)])
    for i, (policy, once) in enumerate((("report", False), ("stop", True),
                                        ("ignore", True), ("enospc", False))):
        t = img(w, f"t{i}.raw", "raw", "64M")
        d.ok("blockdev-add", driver="raw", node_name=f"t{i}",
             file={"driver": "blkdebug",
                   "inject-error": [{"event": "write_aio", "errno": 5, "once": once}],
                   "image": {"driver": "file", "filename": t}})
        job = f"j{i}"
        d.cmd("blockdev-backup", device="src", target=f"t{i}", sync="full", job_id=job,
              on_target_error=policy, auto_dismiss=False)
        if policy == "stop":
            d.wait_event("BLOCK_JOB_ERROR", device=job)
            d.wait_event("JOB_STATUS_CHANGE", id=job, status="paused")
            jobs(d, "stopped on error")
            d.cmd("job-resume", id=job)
            d.cmd("block-job-resume", device=job)
        d.wait_event("JOB_STATUS_CHANGE", id=job, status="concluded")
        jobs(d, f"{policy}: concluded")
        d.cmd("job-dismiss", id=job)
        wait_gone(d, job)


def without_drain_blips(events):
    """Drops paused/running pairs: QEMU pauses running jobs for the drained
    section of every other backup command, Strata does not."""
    out = []
    for e in events:
        st = e.get("data", {}).get("status")
        if (st == "running" and out and out[-1]["event"] == "JOB_STATUS_CHANGE"
                and out[-1]["data"].get("status") == "paused"
                and out[-1]["data"]["id"] == e["data"]["id"]):
            out.pop()
            continue
        out.append(e)
    return out


SCENARIOS = {
    "full_auto": (s_full_auto, ("qsd", "strata")),
    "manual_finalize_dismiss": (s_manual_finalize_dismiss, ("qsd", "strata")),
    "pause_speed_cancel": (s_pause_speed_cancel, ("qsd", "strata")),
    "validation": (s_validation, ("qsd", "strata")),
    "drive_backup": (s_drive_backup, ("qsd", "strata")),
    "incremental": (s_incremental, ("qsys", "strata")),
    "point_in_time": (s_point_in_time, ("qsys", "strata")),
    "blkdebug_errors": (s_blkdebug_errors, ("qsd", "strata")),
    "incremental_chain": (s_incremental_chain, ("qsys", "strata")),
}

# events whose progress numbers depend on timing
TIMED = ("offset", "len")


def main(names):
    failed = 0
    for name in names or SCENARIOS:
        fn, kinds = SCENARIOS[name]
        missing = [k for k in kinds if not have(k)]
        if missing:
            print(f"SKIP {name}: {', '.join(missing)} not installed")
            continue
        timed = any(x in name for x in ("cancel", "incremental", "validation", "blkdebug"))
        blips = name in ("validation", "point_in_time", "incremental_chain")
        diffs = run_pair(fn, kinds, drop=TIMED if timed else (),
                         compare_events=without_drain_blips if blips else None)
        if diffs:
            failed += 1
            print(f"FAIL {name}")
            for x in diffs:
                print("  " + x)
        else:
            print(f"ok   {name}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main(sys.argv[1:])
