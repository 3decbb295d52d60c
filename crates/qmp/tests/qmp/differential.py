#!/usr/bin/env python3
"""Differential QMP test: the same raw byte-level session against
qemu-storage-daemon and the Strata test server; the transcripts must match
after normalising the version package string and the command list.

usage: differential.py STRATA_TEST_SERVER [QSD_BINARY]
"""
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time

SESSION = [
    b'{"execute":"query-version"}\n',
    b'{"execute":"nope","id":"neg"}\n',
    b'{"execute":"qmp_capabilities","arguments":{"foo":1}}\n',
    b'{"execute":"qmp_capabilities","arguments":{"enable":["bogus"]}}\n',
    b'{"exec-oob":"qmp_capabilities"}\n',
    b'{"execute":"qmp_capabilities","id":[1,{"a":"\\u00e9"}]}\n',
    b'{"execute":"qmp_capabilities","id":4}\n',
    b'{"execute":"query-version","id":1}\n',
    b'{"execute":"query-version","arguments":{"x":1},"id":2}\n',
    b'{"execute":"query-commands","id":3}\n',
    b'{"execute":"nope","id":1}\n',
    b'[1]\n', b'"str"\n', b'1\n', b'null\n',
    b'{"foo":1}\n', b'{}\n', b'{"id":1}\n',
    b'{"execute":"query-version","x":1}\n',
    b'{"execute":1}\n',
    b'{"execute":"query-version","arguments":[]}\n',
    b'{"exec-oob":"query-version","id":5}\n',
    b'{"execute":"nope" "id":1}\n',
    b'{"execute":}\n',
    b'}\n',
    b'\x01',
    b'{"execute":"nope","id":"\xff"}\n',
    b'{"execute":"nope","id":"\xc3\xa9\xed\xa0\x80"}\n',
    b"{'execute':'nope','id':'sq\\'x\"'}\n",
    b'{"execute":"nope","id":1,"id":2}\n',
    b'{"execute":"query-version","id":1}{"execute":"nope"}\n',
    b'{"execute":"nope","id":1} garbage {"execute":"nope","id":2}\n',
    b'{"execute":"nope","id":"a/b\\\\\\"\\u0001\\u007f\\ud83d\\ude00\\t<>&"}\n',
    b'{"execute":"nope","id":[0.1, 1.0, -0, -0.0, 1e20, 18446744073709551615, 18446744073709551616, 1e5, 3.14159, 1e-400]}\n',
    b'{"execute":"nope","id":"\\u12"}\n',
    b'{"execute":"nope","id":"\\x"}\n',
    b'{"execute":"nope","id":"\\ud800\\u0041"}\n',
    b'{"execute":"nope","id":"\\u0000\xc0\x80"}\n',
    b'{"execute":"nope","id":"a\tb"}\n',
    b'{"execute":"nope","id":01}\n',
    b'{"execute":"nope","id":-}\n',
    b'{"execute":"nope","id":[1,]}\n',
    b'{"execute":"nope","id":[1 2]}\n',
    b'{"execute":"nope","id":{"a" 1}}\n',
    b'{"execute":"nope","id":{1:1}}\n',
    b'{"execute":"nope","id":TRUE}\n',
    b'[[[]]]]\n',
    b'{"execute":"nope","id":{"b":1,"a":2,"execute":3,"id":4,"return":5,"error":6,"zz":{}}}\n',
    b'[' * 1100 + b']' * 75 + b'\n',
    b'\n{"execute":"query-version","id":"after-deep"}\n',
    b'{"execute":"block-dirty-bitmap-add","arguments":{"node":"x"},"id":6}\n',
    b'{"execute":"block-dirty-bitmap-add","arguments":{"node":1,"name":"b"},"id":7}\n',
    b'{"execute":"block-dirty-bitmap-add","arguments":{"node":"x","name":"b","granularity":"s"},"id":8}\n',
    b'{"execute":"block-dirty-bitmap-add","arguments":{"node":"x","name":"b","persistent":1},"id":9}\n',
    b'{"execute":"block-dirty-bitmap-add","arguments":{"node":"x","name":"b","granularity":-1},"id":10}\n',
    b'{"execute":"block-dirty-bitmap-add","arguments":{"node":"x","name":"b","granularity":4294967296},"id":11}\n',
    b'{"execute":"block-dirty-bitmap-add","arguments":{"node":"x","name":"b","granularity":1.5},"id":12}\n',
    b'{"execute":"block-dirty-bitmap-add","arguments":{"node":null,"name":"b"},"id":13}\n',
    b'{"execute":"block-dirty-bitmap-add","arguments":{"node":"x","name":"b","zzz":1},"id":14}\n',
    b'{"execute":"block-dirty-bitmap-merge","arguments":{"node":"x","target":"b","bitmaps":[1]},"id":15}\n',
    b'{"execute":"block-dirty-bitmap-merge","arguments":{"node":"x","target":"b","bitmaps":{}},"id":16}\n',
    b'{"execute":"block-dirty-bitmap-merge","arguments":{"node":"x","target":"b","bitmaps":[{"node":"a"}]},"id":17}\n',
    b'{"execute":"block-dirty-bitmap-merge","arguments":{"node":"x","target":"b","bitmaps":[{"node":"a","name":1}]},"id":18}\n',
    b'{"execute":"query-named-block-nodes","arguments":{"flat":"yes"},"id":19}\n',
    b'{"execute":"block_resize","arguments":{"node-name":"x"},"id":20}\n',
    b'{"execute":"block_resize","arguments":{"node-name":"x","size":"1"},"id":21}\n',
]
# a second monitor session with out-of-band execution enabled
SESSION_OOB = [
    b'{"execute":"qmp_capabilities","arguments":{"enable":["oob"]}}\n',
    b'{"exec-oob":"query-version","id":1}\n',
    b'{"execute":"query-version","exec-oob":"query-version","id":2}\n',
    b'{"exec-oob":1,"id":3}\n',
    b'{"exec-oob":"nope","id":4}\n',
    b'{"execute":"query-version","id":5}\n',
    b'{"exec-oob":"query-version","arguments":{"x":1}}\n',
]
SENTINEL = b'{"execute":"query-version","id":"sentinel"}\n'
# no newline: QEMU reads input byte by byte and would leave it unread at exit,
# which resets the connection before the response can be read
QUIT = b'{"execute":"quit","id":"bye"}'


def wait_for(path, proc):
    for _ in range(200):
        if os.path.exists(path):
            return
        if proc.poll() is not None:
            raise SystemExit(f"server exited early: {proc.args}")
        time.sleep(0.025)
    raise SystemExit(f"no socket from {proc.args}")


def transcript(path, session, quit):
    s = socket.socket(socket.AF_UNIX)
    s.connect(path)
    s.settimeout(30)
    f = s.makefile("rb")
    out = [f.readline()]
    if not quit:
        # out-of-band replies may overtake in-band ones by design (in QEMU
        # too), so this session goes one request and one reply at a time
        for line in session:
            s.sendall(line)
            out.append(f.readline())
        s.close()
        return out
    s.sendall(b"".join(session) + SENTINEL)
    while True:
        line = f.readline()
        out.append(line)
        if not line or b'"sentinel"' in line:
            break
    s.sendall(QUIT)
    try:
        out += f.readlines()
    except ConnectionResetError:
        out.append(b"<connection reset>")
    s.close()
    return out


def schema(path):
    """query-qmp-schema as {name: entry}."""
    s = socket.socket(socket.AF_UNIX)
    s.connect(path)
    s.settimeout(30)
    f = s.makefile("rb")
    f.readline()
    s.sendall(b'{"execute":"qmp_capabilities"}\n')
    f.readline()
    s.sendall(b'{"execute":"query-qmp-schema"}\n')
    entries = json.loads(f.readline())["return"]
    s.close()
    return {e["name"]: e for e in entries}


def canon(sch, name, depth=0):
    """An entity with the opaque type numbers resolved into structure."""
    e = sch.get(name)
    if e is None or depth > 8:
        return name
    mt = e["meta-type"]
    if mt == "builtin":
        return name
    if mt == "array":
        return ["array", canon(sch, e["element-type"], depth + 1)]
    if mt == "enum":
        return ["enum", e["values"]]
    if mt == "alternate":
        return ["alternate", [canon(sch, m["type"], depth + 1) for m in e["members"]]]
    if mt == "object":
        return ["object",
                [(m["name"], "default" in m, canon(sch, m["type"], depth + 1), m.get("features"))
                 for m in e["members"]],
                e.get("tag"),
                [(v["case"], canon(sch, v["type"], depth + 1)) for v in e.get("variants", [])]]
    return [mt, canon(sch, e["arg-type"], depth + 1), canon(sch, e.get("ret-type", ""), depth + 1),
            e.get("allow-oob"), e.get("features")]


# commands whose whole introspection (arguments and return type) must match
SCHEMA_SAME = ["qmp_capabilities", "query-version", "query-commands", "query-qmp-schema", "quit"]
# test-server commands that copy QEMU's argument schema (their return types are stubs)
SCHEMA_SAME_ARGS = ["block-dirty-bitmap-add", "block-dirty-bitmap-merge", "block_resize",
                    "query-named-block-nodes"]


def compare_schemas(qpath, spath):
    a, b = schema(qpath), schema(spath)
    bad = 0
    for name in SCHEMA_SAME + SCHEMA_SAME_ARGS:
        x, y = canon(a, name), canon(b, name)
        if name in SCHEMA_SAME_ARGS:
            x, y = x[1], y[1]
        if x != y:
            bad += 1
            print(f"schema of {name}:\n  qsd:    {x}\n  strata: {y}")
    return len(SCHEMA_SAME) + len(SCHEMA_SAME_ARGS) - bad, bad


def normalise(lines):
    res = []
    for l in lines:
        l = re.sub(rb'"package": "[^"]*"', b'"package": "P"', l)
        if b'"id": 3' in l and b'"return": [' in l:
            names = re.findall(rb'\{"name": "([^"]+)"\}', l)
            for need in (b"qmp_capabilities", b"query-version", b"query-commands", b"query-qmp-schema", b"quit"):
                if need not in names:
                    res.append(b"MISSING COMMAND " + need)
            l = b'{"return": [COMMANDS], "id": 3}'
        res.append(l)
    return res


def main():
    strata = sys.argv[1]
    qsd = sys.argv[2] if len(sys.argv) > 2 else "qemu-storage-daemon"
    with tempfile.TemporaryDirectory() as d:
        qpath, spath = os.path.join(d, "qsd.sock"), os.path.join(d, "strata.sock")
        qp = subprocess.Popen([qsd, "--chardev", f"socket,path={qpath},server=on,wait=off,id=m",
                               "--monitor", "chardev=m"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        sp = subprocess.Popen([strata, "--unix", spath], stdout=subprocess.DEVNULL)
        try:
            wait_for(qpath, qp)
            wait_for(spath, sp)
            schema_ok, schema_bad = compare_schemas(qpath, spath)
            a = normalise(transcript(qpath, SESSION_OOB, False) + transcript(qpath, SESSION, True))
            b = normalise(transcript(spath, SESSION_OOB, False) + transcript(spath, SESSION, True))
        finally:
            for p in (qp, sp):
                try:
                    p.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
    bad = 0
    for i in range(max(len(a), len(b))):
        x = a[i] if i < len(a) else b"<none>"
        y = b[i] if i < len(b) else b"<none>"
        if x != y:
            bad += 1
            print(f"line {i}:\n  qsd:    {x[:300]!r}\n  strata: {y[:300]!r}")
    print(f"{len(a) - bad + schema_ok} passed, {bad + schema_bad} failed")
    bad += schema_bad
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
