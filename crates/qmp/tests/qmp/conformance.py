#!/usr/bin/env python3
"""Protocol conformance with the real qemu.qmp client library against the
Strata QMP test server (unix and TCP monitors).

usage: conformance.py STRATA_TEST_SERVER
"""
import asyncio
import os
import subprocess
import sys
import tempfile
import time

from qemu.qmp import ExecuteError, QMPClient
from qemu.qmp.legacy import QEMUMonitorProtocol

RESULTS = {"passed": 0, "failed": 0}


def check(name, cond, detail=""):
    if cond:
        RESULTS["passed"] += 1
    else:
        RESULTS["failed"] += 1
        print(f"FAIL {name} {detail}")


async def expect_error(qmp, cmd, args, cls, desc):
    try:
        await qmp.execute(cmd, args)
    except ExecuteError as e:
        check(f"{cmd} error class", e.error_class == cls, e.error_class)
        check(f"{cmd} error desc", e.error.error.desc == desc, e.error.error.desc)
        return
    check(f"{cmd} should fail", False)


async def async_session(address):
    qmp = QMPClient("strata-test")
    await qmp.connect(address)
    check("greeting has oob", "oob" in qmp.greeting.QMP.capabilities)
    v = await qmp.execute("query-version")
    check("query-version", v["qemu"]["major"] == 10 and "package" in v, v)
    names = {c["name"] for c in await qmp.execute("query-commands")}
    for n in ("qmp_capabilities", "query-version", "query-commands", "query-qmp-schema", "quit"):
        check(f"query-commands has {n}", n in names)
    schema = await qmp.execute("query-qmp-schema")
    by_name = {e["name"]: e for e in schema}
    cmd = by_name.get("block-dirty-bitmap-add", {})
    check("schema command", cmd.get("meta-type") == "command")
    args = by_name.get(cmd.get("arg-type"), {})
    members = {m["name"]: m for m in args.get("members", [])}
    check("schema arg members", set(members) == {"node", "name", "granularity", "persistent", "disabled"}, members)
    check("schema optional has default", "default" in members.get("granularity", {}) and "default" not in members.get("node", {}))
    check("schema builtin int", by_name.get("int", {}).get("meta-type") == "builtin")
    check("schema oob flag", by_name.get("x-test-oob-ping", {}).get("allow-oob") is True)
    await expect_error(qmp, "nope", None, "CommandNotFound", "The command nope has not been found")
    await expect_error(qmp, "block-dirty-bitmap-add", {"node": "x"}, "GenericError", "Parameter 'name' is missing")
    await expect_error(qmp, "block-dirty-bitmap-add", {"node": "x", "name": "b", "foo": 1}, "GenericError",
                       "Parameter 'foo' is unexpected")
    await expect_error(qmp, "block-dirty-bitmap-add", {"node": 1, "name": "b"}, "GenericError",
                       "Invalid parameter type for 'node', expected: string")
    await expect_error(qmp, "qmp_capabilities", None, "CommandNotFound",
                       "Capabilities negotiation is already complete, command ignored")

    # events, with non-ASCII data
    with qmp.listener() as listener:
        await qmp.execute("x-test-emit", {"event": "TEST_EVENT", "data": {"s": "h\u00e9\U0001F600"}})
        ev = await asyncio.wait_for(listener.get(), 5)
    check("event name", ev["event"] == "TEST_EVENT", ev)
    check("event data", ev["data"] == {"s": "h\u00e9\U0001F600"}, ev)
    check("event timestamp", ev["timestamp"]["seconds"] > 0 and 0 <= ev["timestamp"]["microseconds"] < 1000000)

    # out-of-band: an exec-oob command overtakes a slow in-band one
    order = []

    async def slow():
        await qmp.execute("x-test-sleep", {"ms": 600})
        order.append("slow")

    async def fast():
        await asyncio.sleep(0.15)
        await qmp.execute("x-test-oob-ping", oob=True)
        order.append("oob")

    await asyncio.gather(slow(), fast())
    check("oob overtakes in-band", order == ["oob", "slow"], order)
    try:
        await qmp.execute("query-version", oob=True)
        check("oob refused for in-band command", False)
    except ExecuteError as e:
        check("oob refused text", e.error.error.desc == "The command query-version does not support OOB", e.error.error.desc)
    await qmp.disconnect()


def legacy_session(address):
    mon = QEMUMonitorProtocol(address)
    mon.connect(negotiate=True)
    r = mon.cmd_obj({"execute": "query-version", "id": "legacy"})
    check("legacy id echo", r.get("id") == "legacy", r)
    r = mon.cmd_obj({"execute": "nope"})
    check("legacy error", r["error"]["class"] == "CommandNotFound", r)
    mon.close()


async def many_clients(address, n=100):
    async def one(i):
        q = QMPClient(f"c{i}")
        await q.connect(address)
        r = await q.execute("query-version")
        await q.disconnect()
        return r["qemu"]["major"]

    t = time.time()
    res = await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(n))), 60)
    check(f"{n} concurrent clients", res == [10] * n, res)
    check(f"{n} clients in bounded time", time.time() - t < 30)


def qmp_shell_session(path):
    script = "query-version\nblock-dirty-bitmap-add node=x\nquery-named-block-nodes flat=true\n"
    r = subprocess.run([sys.executable, "-m", "qemu.qmp.qmp_shell", path], input=script,
                       capture_output=True, text=True, timeout=30)
    out = r.stdout
    check("qmp-shell connects", "Connected to QEMU 10.0.2" in out, out)
    check("qmp-shell runs a command", '"major": 10' in out, out)
    check("qmp-shell shows errors", "Parameter 'name' is missing" in out, out)
    check("qmp-shell passes typed arguments", '{"return": []}' in out, out)


async def quit_session(address):
    qmp = QMPClient("quitter")
    await qmp.connect(address)
    await qmp.execute("quit")
    await qmp.disconnect()


def main():
    server = sys.argv[1]
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "qmp.sock")
        p = subprocess.Popen([server, "--unix", path, "--tcp", "127.0.0.1:0"], stdout=subprocess.PIPE, text=True)
        try:
            tcp = None
            for line in p.stdout:
                if line.startswith("tcp "):
                    host, port = line.split()[1].rsplit(":", 1)
                    tcp = (host, int(port))
                if line.strip() == "ready":
                    break
            asyncio.run(async_session(path))
            asyncio.run(async_session(tcp))
            legacy_session(path)
            qmp_shell_session(path)
            asyncio.run(many_clients(path))
            asyncio.run(quit_session(path))
            p.wait(timeout=10)
            check("server exits after quit", p.returncode == 0, p.returncode)
            check("socket removed at exit", not os.path.exists(path))
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()
    print(f"{RESULTS['passed']} passed, {RESULTS['failed']} failed")
    return 1 if RESULTS["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
