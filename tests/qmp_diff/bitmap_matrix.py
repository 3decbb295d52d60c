#!/usr/bin/env python3
"""Differential test of the sync=bitmap bitmap modes (QEMU iotest 257's matrix):
for each bitmap-mode (on-success, never, always, and sync=incremental, which is
bitmap + on-success) and each outcome (success, cancel, failure injected with
blkdebug on the target), the same scripted session runs against QEMU
(qemu-system-x86_64 -M none, guest writes with human-monitor-command qemu-io) and
strata-storage-daemon; the bitmap's dirty count, its other query-named-block-nodes
members and its x-debug-block-dirty-bitmap-sha256 must match, as must the way the
job ended. The expected bitmaps are whatever QEMU produces in the same run.

The session:
  write A (before the bitmap exists), add the bitmap, write B (five areas),
  start a backup at speed=1 with one worker: the rate limit lets the first area's
  chunk through and then holds the job, so where it stands is known;
  write C through the copy-before-write filter: into the copied area, into an
  uncopied B area (a copy-before-write copy of that cluster) and into a clean area;
  end the job: success (speed 0, run to completion), cancel (job-cancel while held),
  failure (speed 0; the target's blkdebug fails the write of the last B area, so
  everything before it is copied and the job fails with report).
Then the bitmap is checked, write D lands, and it is checked again.

usage: bitmap_matrix.py [MODE:OUTCOME...]
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import have, run_pair, qemu_img, QmpError  # noqa: E402

MIB = 1 << 20
GRAN = 64 * 1024
# the last B area: the target write the injected failure hits
FAIL_AT = 40 * MIB
MODES = ("on-success", "never", "always", "incremental")
OUTCOMES = ("success", "cancel", "failure")


def img(w, name, fmt="qcow2", size="64M"):
    path = os.path.join(w, name)
    rc, out = qemu_img("create", "-q", "-f", fmt, path, size)
    if rc != 0:
        raise QmpError(f"qemu-img create: {out}")
    return path


def bitmap(d, label):
    """Records the bitmap's query-named-block-nodes entry and its sha256."""
    r = d.ok("query-named-block-nodes", flat=True)
    d.log.pop()
    info = [b for n in r if n["node-name"] == "src" for b in n.get("dirty-bitmaps", [])
            if b.get("name") == "bm"]
    d.note(f"{label}: dirty-bitmaps entry", info)
    sha = d.cmd("x-debug-block-dirty-bitmap-sha256", record=False, node="src", name="bm")
    d.note(f"{label}: sha256", sha)
    if os.environ.get("VERBOSE"):
        print(f"  {d.kind} {label}: {info} {sha}")


def scenario(mode, outcome):
    def run(start, w):
        a = img(w, "a.qcow2")
        t = img(w, "t.raw", "raw")
        d = start([f"driver=qcow2,node-name=src,file.driver=file,file.filename={a}"])
        target_file = {"driver": "file", "filename": t}
        if outcome == "failure":
            target_file = {"driver": "blkdebug", "image": target_file,
                           "inject-error": [{"event": "write_aio", "errno": 5,
                                             "sector": FAIL_AT // 512, "once": True}]}
        d.ok("blockdev-add", driver="raw", node_name="tgt", file=target_file)
        # A: before the bitmap, never in it
        d.hmp("src", "write -P 0x11 0 4M")
        d.ok("block-dirty-bitmap-add", node="src", name="bm", granularity=GRAN)
        # B: the areas the backup copies
        d.hmp("src", "write -P 0x21 0 128k")
        d.hmp("src", "write -P 0x22 8M 192k")
        d.hmp("src", "write -P 0x23 16M 64k")
        d.hmp("src", "write -P 0x24 33M 32k")
        d.hmp("src", f"write -P 0x25 {FAIL_AT} 64k")
        bitmap(d, "before the job")
        args = {"device": "src", "target": "tgt", "job_id": "j", "speed": 1,
                "filter_node_name": "cbw", "x_perf": {"max-workers": 1}}
        if mode == "incremental":
            args.update(sync="incremental", bitmap="bm")
        else:
            args.update(sync="bitmap", bitmap="bm", bitmap_mode=mode)
        d.ok("blockdev-backup", **args)
        d.started("j")
        # C: copied area, uncopied B area (copy-before-write), clean area
        d.hmp("cbw", "write -P 0x31 64k 64k")
        d.hmp("cbw", "write -P 0x32 8M 4k")
        d.hmp("cbw", "write -P 0x33 24M 64k")
        bitmap(d, "during the job")
        if outcome == "cancel":
            d.ok("job-cancel", id="j")
            e = d.wait_event("BLOCK_JOB_CANCELLED", device="j")
            # speed=1 holds the job after its first chunk: a cancel that found it
            # finished would test nothing
            if not e["data"]["offset"] < e["data"]["len"]:
                raise QmpError(f"cancel scenario: the job had finished already: {e}")
            d.note("job ended", {"event": e["event"], "offset<len": True})
        else:
            d.ok("block-job-set-speed", device="j", speed=0)
            e = d.wait_event("BLOCK_JOB_COMPLETED", device="j")
            error = e["data"].get("error")
            # the injected target error must have ended the failure scenario, and
            # nothing may have ended the success scenario
            if (outcome == "failure") != (error is not None):
                raise QmpError(f"{outcome} scenario ended with error={error!r}")
            d.note("job ended", {"event": e["event"], "error": error})
        d.wait_event("JOB_STATUS_CHANGE", id="j", status="null")
        bitmap(d, "after the job")
        # D: the bitmap records again, as a plain bitmap
        d.hmp("src", "write -P 0x41 50M 64k")
        bitmap(d, "after write D")
    return run


def main(names):
    if not have("qsys"):
        print("SKIP bitmap matrix: qemu-system-x86_64 not installed")
        sys.exit(0)
    cases = [tuple(n.split(":")) for n in names] or [(m, o) for m in MODES for o in OUTCOMES]
    failed = 0
    for mode, outcome in cases:
        # events are not compared here (QEMU adds paused/running blips for drained
        # sections); the way the job ended is recorded by the scenario itself
        diffs = run_pair(scenario(mode, outcome), ("qsys", "strata"), events=False)
        name = f"{mode}:{outcome}"
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
