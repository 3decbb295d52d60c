#!/usr/bin/env python3
"""Differential test of the block-graph and dirty-bitmap QMP commands: each
scenario runs against qemu-storage-daemon (or qemu-system -M none when guest
writes are needed) and strata-storage-daemon; answers, error classes and texts
must match after normalisation.

usage: blockdev.py [SCENARIO...]    (environment: STRATA_STORAGE_DAEMON, ...)
"""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import have, run_pair, qemu_img, QmpError  # noqa: E402

MIB = 1 << 20


def img(w, name, fmt="qcow2", size="64M", *opts):
    rc, out = qemu_img("create", "-q", "-f", fmt, *opts, os.path.join(w, name), size)
    if rc != 0:
        raise QmpError(f"qemu-img create: {out}")
    return os.path.join(w, name)


def node_view(n):
    """The members of a BlockDeviceInfo the test compares."""
    image = n.get("image", {})
    return {
        "keys": sorted(n.keys()),
        "image-keys": sorted(image.keys()),
        "node-name": n.get("node-name"),
        "drv": n.get("drv"),
        "ro": n.get("ro"),
        "file": n.get("file"),
        "backing_file_depth": n.get("backing_file_depth"),
        "backing_file": n.get("backing_file"),
        "encrypted": n.get("encrypted"),
        "detect_zeroes": n.get("detect_zeroes"),
        "cache": n.get("cache"),
        "write_threshold": n.get("write_threshold"),
        "virtual-size": image.get("virtual-size"),
        "format": image.get("format"),
        "format-specific": image.get("format-specific"),
        "cluster-size": image.get("cluster-size"),
        "backing-image": node_view_image(image.get("backing-image")),
        "dirty-bitmaps": n.get("dirty-bitmaps"),
    }


def node_view_image(i):
    if i is None:
        return None
    return {"keys": sorted(i.keys()), "virtual-size": i.get("virtual-size"),
            "format": i.get("format"), "filename": i.get("filename"),
            "backing-image": node_view_image(i.get("backing-image"))}


def query_nodes(d, flat=None, file_sizes=True):
    """Records query-named-block-nodes; FILE_SIZES=False leaves out the size of
    protocol nodes (a resized qcow2 file's length depends on where the L1 table
    went, which is the implementation's choice)."""
    args = {} if flat is None else {"flat": flat}
    r = d.cmd("query-named-block-nodes", record=False, **args)
    if "error" in r:
        d.note("query-named-block-nodes", r)
        return
    nodes = [node_view(n) for n in r["return"]]
    if not file_sizes:
        for n in nodes:
            if n["drv"] == "file":
                n["virtual-size"] = "<file length>"
    nodes = sorted(nodes, key=lambda n: json.dumps(n, sort_keys=True))
    d.note(f"query-named-block-nodes flat={flat}", nodes)


# ------------------------------------------------------------------ scenarios

def s_blockdev_add_del(start, w):
    img(w, "a.qcow2")
    img(w, "base.qcow2")
    img(w, "base0.qcow2")
    img(w, "top.qcow2", "qcow2", "64M", "-F", "qcow2", "-b", "base.qcow2")
    img(w, "top0.qcow2", "qcow2", "64M", "-F", "qcow2", "-b", "base0.qcow2")
    d = start()
    a = os.path.join(w, "a.qcow2")
    # inline child
    d.cmd("blockdev-add", driver="qcow2", node_name="n1",
          file={"driver": "file", "filename": a})
    # duplicate node name
    d.cmd("blockdev-add", driver="qcow2", node_name="n1",
          file={"driver": "file", "filename": a})
    d.cmd("blockdev-add", driver="file", node_name="n1", filename=a)
    # reference child
    d.cmd("blockdev-add", driver="file", node_name="f2",
          filename=os.path.join(w, "base.qcow2"))
    d.cmd("blockdev-add", driver="qcow2", node_name="base", file="f2")
    d.cmd("blockdev-add", driver="qcow2", node_name="x", file="nonexistent")
    # backing: null, reference, implicit
    top = os.path.join(w, "top.qcow2")
    d.cmd("blockdev-add", driver="qcow2", node_name="t-null", backing=None,
          file={"driver": "file", "filename": top}, read_only=True)
    d.cmd("blockdev-add", driver="qcow2", node_name="t-ref", backing="base",
          file={"driver": "file", "filename": top}, read_only=True)
    # (a separate chain: QEMU's image locking refuses a second opening of base.qcow2)
    d.cmd("blockdev-add", driver="qcow2", node_name="t-impl",
          file={"driver": "file", "filename": os.path.join(w, "top0.qcow2")}, read_only=True)
    query_nodes(d)
    query_nodes(d, True)
    query_nodes(d, False)
    # errors
    d.cmd("blockdev-add", driver="nope", node_name="e1")
    d.cmd("blockdev-add", node_name="e1")
    d.cmd("blockdev-add", driver="file", node_name="e1")
    d.cmd("blockdev-add", driver="file", node_name="e1", filename=a, bogus=1)
    d.cmd("blockdev-add", driver="file", node_name="e1", filename=7)
    d.cmd("blockdev-add", driver="file", node_name="e1", filename=a, read_only="yes")
    d.cmd("blockdev-add", driver="qcow2", node_name="e1", file={"driver": "file"})
    d.cmd("blockdev-add", driver="qcow2", node_name="e1",
          file={"driver": "file", "filename": a, "zz": 1})
    d.cmd("blockdev-add", driver="file", node_name="e1",
          filename=os.path.join(w, "missing.img"))
    d.cmd("blockdev-add", driver="file", node_name="e 1", filename=a)
    d.cmd("blockdev-add", driver="file", node_name="#x", filename=a)
    d.cmd("blockdev-add", driver="raw", node_name="e1", file="f2", discard="bogus")
    raw = img(w, "plain.raw", "raw", "1M")
    d.cmd("blockdev-add", driver="qcow2", node_name="e2",
          file={"driver": "file", "filename": raw})
    d.cmd("blockdev-add", driver="qcow2", node_name="e3", backing="nope", read_only=True,
          file={"driver": "file", "filename": top})
    d.cmd("blockdev-add", driver="file", node_name="e4", filename=raw,
          detect_zeroes="unmap")
    d.cmd("blockdev-add", driver="file", node_name="e5", filename=raw,
          detect_zeroes="unmap", discard="unmap")
    d.cmd("blockdev-add", driver="file", node_name="n" * 32, filename=raw)
    d.cmd("blockdev-add", driver="file", node_name="n" * 31, filename=raw)
    d.cmd("blockdev-add", driver="raw", node_name="e6", file="e5", read_only=True,
          cache={"direct": False, "no-flush": True})
    d.cmd("blockdev-add", driver="null-co", node_name="e7", size=1 << 20)
    # (a writable node over a read-only file node is refused by Strata, accepted by
    # QEMU until something writes: documented, not compared)
    query_nodes(d, True)
    # del
    d.cmd("blockdev-del", node_name="nope")
    d.cmd("blockdev-del", node_name="f2")
    d.cmd("blockdev-del", node_name="t-ref")
    d.cmd("blockdev-del", node_name="base")
    d.cmd("blockdev-del", node_name="f2")
    d.cmd("blockdev-del", node_name="t-impl")
    d.cmd("blockdev-del")
    d.cmd("blockdev-del", node_name=3)
    query_nodes(d, True)


def s_query_block_resize(start, w):
    a = img(w, "a.qcow2", "qcow2", "16M")
    r = img(w, "r.raw", "raw", "1M")
    img(w, "v2.qcow2", "qcow2", "4M", "-o", "compat=0.10,cluster_size=4096")
    d = start([f"driver=qcow2,node-name=q,file.driver=file,file.filename={a}",
               f"driver=raw,node-name=r,file.driver=file,file.filename={r}",
               f"driver=qcow2,node-name=v2,read-only=on,file.driver=file,"
               f"file.filename={os.path.join(w, 'v2.qcow2')}"])
    query_nodes(d)
    d.cmd("query-block")
    d.cmd("block_resize", node_name="q", size=32 * MIB)
    d.cmd("block_resize", node_name="q", size=8 * MIB)
    d.cmd("block_resize", node_name="r", size=2 * MIB + 512)
    d.cmd("block_resize", node_name="r", size=-1)
    d.cmd("block_resize", node_name="nope", size=MIB)
    d.cmd("block_resize", size=MIB)
    d.cmd("block_resize", device="q", size=MIB)
    d.cmd("block_resize", node_name="v2", size=8 * MIB)
    d.cmd("block_resize", node_name="q", size=33 * MIB + 1)
    query_nodes(d, file_sizes=False)


def s_bitmaps(start, w):
    a = img(w, "a.qcow2", "qcow2", "64M")
    v2 = img(w, "v2.qcow2", "qcow2", "64M", "-o", "compat=0.10")
    raw = img(w, "r.raw", "raw", "8M")
    d = start([f"driver=qcow2,node-name=q,file.driver=file,file.filename={a}",
               f"driver=qcow2,node-name=v2,file.driver=file,file.filename={v2}",
               f"driver=raw,node-name=ro,read-only=on,file.driver=file,file.filename={raw}",
               f"driver=raw,node-name=r,file.driver=file,file.filename={raw},"
               "file.locking=off"])
    add = lambda **k: d.cmd("block-dirty-bitmap-add", **k)  # noqa: E731
    add(node="q", name="b0")
    add(node="q", name="b0")
    add(node="q", name="b1", granularity=512)
    add(node="q", name="b2", granularity=1 << 31)
    add(node="q", name="bad", granularity=256)
    add(node="q", name="bad", granularity=1 << 32)
    add(node="q", name="bad", granularity=65537)
    add(node="q", name="bad", granularity=0)
    add(node="q", name="p", persistent=True)
    add(node="q", name="pd", persistent=True, disabled=True, granularity=131072)
    add(node="q", name="")
    add(node="q", name="x" * 1024)
    add(node="q", name="x" * 1023, persistent=True)
    add(node="v2", name="p", persistent=True)
    add(node="v2", name="np")
    add(node="ro", name="b")
    add(node="ro", name="b", persistent=True)
    add(node="r", name="p", persistent=True)
    add(node="nope", name="b")
    add(node="q", name="d", disabled=True)
    query_nodes(d)
    d.cmd("query-block")
    bm = lambda c, **k: d.cmd(f"block-dirty-bitmap-{c}", **k)  # noqa: E731
    bm("disable", node="q", name="b0")
    bm("disable", node="q", name="b0")
    bm("enable", node="q", name="b0")
    bm("enable", node="q", name="nope")
    bm("enable", node="nope", name="b0")
    bm("clear", node="q", name="b0")
    bm("clear", node="q", name="nope")
    bm("merge", node="q", target="b0", bitmaps=["b1", "d"])
    bm("merge", node="q", target="b0", bitmaps=["nope"])
    bm("merge", node="q", target="nope", bitmaps=["b1"])
    bm("merge", node="q", target="b0", bitmaps=[{"node": "q", "name": "b1"}])
    bm("merge", node="q", target="b0", bitmaps=[{"node": "nope", "name": "b1"}])
    bm("merge", node="q", target="b0", bitmaps=[{"node": "q", "name": "nope"}])
    bm("merge", node="q", target="b0", bitmaps=[{"node": "v2", "name": "np"}])
    # (an empty list crashes qemu-storage-daemon 10.0.2, so it is not compared)
    d.cmd("x-debug-block-dirty-bitmap-sha256", node="q", name="b0")
    d.cmd("x-debug-block-dirty-bitmap-sha256", node="q", name="nope")
    bm("remove", node="q", name="b1")
    bm("remove", node="q", name="b1")
    bm("remove", node="q", name="p")
    bm("remove", node="nope", name="p")
    query_nodes(d, True)


def s_bitmap_writes(start, w):
    a = img(w, "a.qcow2", "qcow2", "64M")
    d = start([f"driver=qcow2,node-name=q,file.driver=file,file.filename={a}"])
    d.ok("block-dirty-bitmap-add", node="q", name="b", granularity=65536)
    d.ok("block-dirty-bitmap-add", node="q", name="s", granularity=512)
    d.ok("block-dirty-bitmap-add", node="q", name="off", disabled=True)
    for c in ["write -P 0x11 0 4k", "write -P 0x22 1M 1M", "write -z 8M 64k",
              "discard 16M 128k", "write -P 0x33 63M 1M", "write 100k 1",
              "flush"]:
        d.hmp("q", c)
    d.cmd("x-debug-block-dirty-bitmap-sha256", node="q", name="b")
    d.cmd("x-debug-block-dirty-bitmap-sha256", node="q", name="s")
    d.cmd("x-debug-block-dirty-bitmap-sha256", node="q", name="off")
    d.ok("block-dirty-bitmap-add", node="q", name="m")
    d.cmd("block-dirty-bitmap-merge", node="q", target="m", bitmaps=["s", "b"])
    d.cmd("x-debug-block-dirty-bitmap-sha256", node="q", name="m")
    d.ok("block-dirty-bitmap-disable", node="q", name="b")
    d.hmp("q", "write 40M 64k")
    d.cmd("x-debug-block-dirty-bitmap-sha256", node="q", name="b")
    d.cmd("x-debug-block-dirty-bitmap-sha256", node="q", name="s")
    query_nodes(d)
    d.cmd("block-dirty-bitmap-clear", node="q", name="s")
    d.cmd("x-debug-block-dirty-bitmap-sha256", node="q", name="s")


def s_transaction(start, w):
    a = img(w, "a.qcow2", "qcow2", "64M")
    d = start([f"driver=qcow2,node-name=q,file.driver=file,file.filename={a}"])
    act = lambda t, **k: {"type": t, "data": {x.replace("_", "-"): v  # noqa: E731
                                              for x, v in k.items()}}
    d.cmd("transaction", actions=[act("block-dirty-bitmap-add", node="q", name="t1"),
                                  act("block-dirty-bitmap-add", node="q", name="t2",
                                      granularity=4096)])
    d.cmd("transaction", actions=[act("block-dirty-bitmap-add", node="q", name="t3"),
                                  act("abort")])
    d.cmd("transaction", actions=[act("block-dirty-bitmap-add", node="q", name="t3"),
                                  act("block-dirty-bitmap-add", node="q", name="t1")])
    d.cmd("transaction", actions=[act("block-dirty-bitmap-disable", node="q", name="t1"),
                                  act("block-dirty-bitmap-clear", node="q", name="t2"),
                                  act("block-dirty-bitmap-remove", node="q", name="t2"),
                                  act("abort")])
    d.cmd("transaction", actions=[act("block-dirty-bitmap-disable", node="q", name="t1"),
                                  act("block-dirty-bitmap-merge", node="q", target="t2",
                                      bitmaps=["t1"]),
                                  act("block-dirty-bitmap-remove", node="q", name="t2")])
    # (a failing enable/disable action crashes qemu-storage-daemon 10.0.2: not compared)
    d.cmd("transaction", actions=[act("block-dirty-bitmap-add", node="q", name="t9"),
                                  act("block-dirty-bitmap-clear", node="q", name="nope")])
    d.cmd("transaction", actions=[act("bogus")])
    d.cmd("transaction", actions=[])
    d.cmd("transaction", actions=[act("abort")],
          properties={"completion-mode": "grouped"})
    d.cmd("transaction", actions=[act("block-dirty-bitmap-add", node="q", name="g")],
          properties={"completion-mode": "grouped"})
    d.cmd("transaction", actions=[{"type": "abort"}])
    d.cmd("transaction", actions=[{"data": {}}])
    query_nodes(d)


def s_busy_bitmap(start, w):
    a = img(w, "a.qcow2", "qcow2", "64M")
    t = img(w, "t.qcow2", "qcow2", "64M")
    d = start([f"driver=qcow2,node-name=q,file.driver=file,file.filename={a}",
               f"driver=qcow2,node-name=t,file.driver=file,file.filename={t}"])
    d.ok("block-dirty-bitmap-add", node="q", name="b")
    d.hmp("q", "write 0 4M")
    d.ok("blockdev-backup", device="q", target="t", sync="bitmap", bitmap="b",
         bitmap_mode="on-success", speed=1, job_id="j", auto_finalize=False)
    d.started("j")
    for c in ["remove", "clear", "enable", "disable"]:
        d.cmd(f"block-dirty-bitmap-{c}", node="q", name="b")
    d.ok("block-dirty-bitmap-add", node="q", name="c")
    d.cmd("block-dirty-bitmap-merge", node="q", target="c", bitmaps=["b"])
    d.cmd("x-debug-block-dirty-bitmap-sha256", node="q", name="b")
    r = d.cmd("query-named-block-nodes", record=False, flat=True)
    d.note("bitmaps while busy", [n.get("dirty-bitmaps") for n in r["return"]
                                   if n["node-name"] == "q"])
    d.cmd("blockdev-del", node_name="t")
    d.ok("job-cancel", id="j")
    d.wait_event("JOB_STATUS_CHANGE", id="j", status="null")


def s_stored_bitmaps(start, w):
    """Bitmaps qemu-img stored, on a read-only and on a writable node."""
    a = img(w, "a.qcow2")
    for args in (["--add", "-g", "131072", "p"], ["--add", "--disable", "off"]):
        rc, out = qemu_img("bitmap", *args[:-1], a, args[-1])
        if rc != 0:
            raise QmpError(out)
    rc, out = qemu_img("bitmap", "--add", a, "x")
    d = start([f"driver=qcow2,node-name=ro,read-only=on,file.driver=file,file.filename={a}"])
    query_nodes(d)
    for c in ("clear", "enable", "disable", "remove"):
        d.cmd(f"block-dirty-bitmap-{c}", node="ro", name="p")
    d.cmd("block-dirty-bitmap-merge", node="ro", target="p", bitmaps=["off"])
    d.cmd("block-dirty-bitmap-add", node="ro", name="n")
    d.cmd("block-dirty-bitmap-merge", node="ro", target="n", bitmaps=["p", "off"])
    d.cmd("x-debug-block-dirty-bitmap-sha256", node="ro", name="p")
    d.cmd("block-dirty-bitmap-remove", node="ro", name="n")
    d.ok("blockdev-del", node_name="ro")
    d.cmd("blockdev-add", driver="qcow2", node_name="rw",
          file={"driver": "file", "filename": a})
    query_nodes(d)
    d.cmd("block-dirty-bitmap-remove", node="rw", name="x")
    d.cmd("block-dirty-bitmap-add", node="rw", name="p", persistent=True)
    d.cmd("block-dirty-bitmap-enable", node="rw", name="off")
    d.cmd("block-dirty-bitmap-disable", node="rw", name="p")
    d.ok("blockdev-del", node_name="rw")
    d.note("stored", qemu_img("info", "--output=json", a)[1].count('"name"'))


def snapshot_view(v):
    """A SnapshotInfo without its creation time and VM clock (qemu-system's clock
    runs; the storage daemons have none)."""
    times = ("date-sec", "date-nsec", "vm-clock-sec", "vm-clock-nsec")
    return {k: ("<time>" if k in times else x) for k, x in v.items()}


def snapshots_of(d, node):
    r = d.cmd("query-named-block-nodes", record=False, flat=True)
    for n in r["return"]:
        if n["node-name"] == node:
            return [snapshot_view(x) for x in n["image"].get("snapshots", [])]
    return None


def s_internal_snapshots(start, w):
    a = img(w, "a.qcow2", "qcow2", "64M")
    t = img(w, "t.qcow2", "qcow2", "64M")
    r = img(w, "r.raw", "raw", "8M")
    ro = img(w, "ro.qcow2", "qcow2", "8M")
    f = img(w, "f.qcow2", "qcow2", "8M")
    d = start([f"driver=qcow2,node-name=q,file.driver=file,file.filename={a}",
               f"driver=qcow2,node-name=t,file.driver=file,file.filename={t}",
               f"driver=raw,node-name=r,file.driver=file,file.filename={r}",
               f"driver=qcow2,node-name=ro,read-only=on,file.driver=file,file.filename={ro}",
               f"driver=file,node-name=f,filename={f}",
               "driver=qcow2,node-name=fq,file=f"])
    snap = "blockdev-snapshot-internal-sync"
    delete = "blockdev-snapshot-delete-internal-sync"
    d.hmp("q", "write -P 1 0 1M")
    d.cmd(snap, device="q", name="s1")
    d.hmp("q", "write -P 2 512k 1M")
    d.cmd(snap, device="q", name="s2")
    d.hmp("q", "write -P 3 0 64k")
    for dev, name in (("q", "s1"), ("q", ""), ("nope", "x"), ("r", "x"), ("ro", "x"),
                      ("f", "x"), ("fq", "y")):
        d.cmd(snap, device=dev, name=name)
    d.note("snapshots", snapshots_of(d, "q"))
    for args in ({}, {"id": "9"}, {"name": "nope"}, {"id": "2", "name": "s1"}):
        d.cmd(delete, device="q", **args)
    d.cmd(delete, device="r", id="1")
    d.cmd(delete, device="fq", name="nope")
    for args in ({"name": "s1"}, {"id": "2", "name": "s2"}):
        res = d.cmd(delete, record=False, device="q", **args)
        d.note(f"delete {args}", snapshot_view(res.get("return", res)))
    d.note("snapshots after delete", snapshots_of(d, "q"))
    # As transaction actions: taken, undone by a later failing action, refused.
    act = lambda dev, name: {"type": snap, "data": {"device": dev, "name": name}}  # noqa: E731
    d.cmd("transaction", actions=[act("q", "t1")])
    d.cmd("transaction", actions=[act("q", "t2"), {"type": "abort", "data": {}}])
    d.cmd("transaction", actions=[act("q", "t3"), act("q", "t1")])
    d.cmd("transaction", actions=[act("r", "t4")])
    d.note("snapshots after transactions", snapshots_of(d, "q"))
    d.cmd(delete, record=False, device="q", name="t1")
    # A node a backup job holds.
    d.ok(snap, device="q", name="s3")
    d.ok("blockdev-backup", device="q", target="t", sync="full", speed=1, job_id="j",
         auto_finalize=False)
    d.started("j")
    # Paused: QEMU's drain of every node around these commands may or may not show
    # as a pause of a running job (it depends on when the job's coroutine runs).
    d.ok("job-pause", id="j")
    d.wait_event("JOB_STATUS_CHANGE", id="j", status="paused")
    d.cmd(snap, device="t", name="x")
    d.cmd(snap, device="q", name="x")
    d.cmd(delete, device="q", name="s3")
    d.ok("job-cancel", id="j")
    d.wait_event("JOB_STATUS_CHANGE", id="j", status="null")
    for n in ("q", "t", "fq", "f"):
        d.ok("blockdev-del", node_name=n)
    rc, out = qemu_img("check", a)
    d.note("qemu-img check", rc)
    rc, out = qemu_img("snapshot", "-l", a)
    d.note("qemu-img snapshot -l", [line.split()[:2] for line in out.splitlines()[2:]])


SCENARIOS = {
    "blockdev_add_del": (s_blockdev_add_del, ("qsd", "strata")),
    "query_block_resize": (s_query_block_resize, ("qsd", "strata")),
    "bitmaps": (s_bitmaps, ("qsd", "strata")),
    "bitmap_writes": (s_bitmap_writes, ("qsys", "strata")),
    "transaction": (s_transaction, ("qsd", "strata")),
    "busy_bitmap": (s_busy_bitmap, ("qsys", "strata")),
    "stored_bitmaps": (s_stored_bitmaps, ("qsd", "strata")),
    # How far the rate-limited backup got before the cancel is a matter of timing.
    "internal_snapshots": (s_internal_snapshots, ("qsys", "strata"), ("offset",)),
}


def main(names):
    failed = 0
    for name in names or SCENARIOS:
        fn, kinds, *drop = SCENARIOS[name]
        missing = [k for k in kinds if not have(k)]
        if missing:
            print(f"SKIP {name}: {', '.join(missing)} not installed")
            continue
        diffs = run_pair(fn, kinds, drop=drop[0] if drop else ())
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
