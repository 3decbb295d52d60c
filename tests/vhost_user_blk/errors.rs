//! The export's `werror`/`rerror` policy seen from QMP and from the frontend: errors
//! injected with `blkdebug` under the exported node, requests sent one at a time by
//! `vub_load --probe` through a real vring, and `BLOCK_IO_ERROR`, `query-block`'s
//! io-status and `cont` checked on the daemon's monitor.

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use strata_tests::{qemu, require_qemu, s, tempdir};

use super::{load_bin, Daemon, Qmp};

/// `strata-storage-daemon` serving a raw image through a blkdebug node with `rules`,
/// exported as `exp0` with `policy` (e.g. `,werror=stop`).
fn err_daemon(dir: &Path, rules: Value, policy: &str) -> Daemon {
    let image = dir.join("disk.raw");
    qemu::create(&image, "raw", "", "16M");
    let dbg = json!({"driver": "blkdebug", "node-name": "dbg", "image": "file0",
                     "inject-error": rules});
    Daemon::start_nodes(
        dir,
        &[
            format!("driver=file,filename={},node-name=file0", s(&image)),
            dbg.to_string(),
            "driver=raw,file=dbg,node-name=disk".to_string(),
        ],
        &format!(",writable=on{policy}"),
    )
}

/// `vub_load --probe`: one request at a time, answers read back as JSON.
struct Probe {
    child: Child,
    input: ChildStdin,
    output: BufReader<ChildStdout>,
}

impl Probe {
    fn start(sock: &Path) -> Probe {
        Probe::start_qd(sock, 4)
    }

    fn start_qd(sock: &Path, qd: u16) -> Probe {
        let mut child = Command::new(load_bin())
            .arg("--socket")
            .arg(sock)
            .args(["--probe", "--bs", "4096", "--qd"])
            .arg(qd.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start vub_load --probe");
        let input = child.stdin.take().expect("stdin");
        let output = BufReader::new(child.stdout.take().expect("stdout"));
        Probe {
            child,
            input,
            output,
        }
    }

    fn send(&mut self, cmd: &str) -> Value {
        writeln!(self.input, "{cmd}").expect("write to vub_load");
        let mut l = String::new();
        self.output.read_line(&mut l).expect("read vub_load");
        serde_json::from_str(&l).unwrap_or_else(|e| panic!("bad vub_load line {l:?}: {e}"))
    }

    /// Submits a 4 KiB write of `byte` at `sector`; returns the slot.
    fn write(&mut self, sector: u64, byte: u8) -> u64 {
        self.send(&format!("w {sector} {byte}"))["slot"]
            .as_u64()
            .expect("slot")
    }

    /// Submits a 4 KiB read at `sector`; returns the slot.
    fn read(&mut self, sector: u64) -> u64 {
        self.send(&format!("r {sector}"))["slot"]
            .as_u64()
            .expect("slot")
    }

    /// Answers that arrive within `ms` (waits for the first one at most that long).
    fn wait(&mut self, ms: u64) -> Vec<Value> {
        self.send(&format!("wait {ms}"))["done"]
            .as_array()
            .expect("done")
            .clone()
    }

    /// Waits until `n` answers have arrived (10 s at most).
    fn wait_n(&mut self, n: usize) -> Vec<Value> {
        let mut got = Vec::new();
        let t = Instant::now();
        while got.len() < n && t.elapsed() < Duration::from_secs(10) {
            got.extend(self.wait(500));
        }
        assert_eq!(got.len(), n, "answers: {got:?}");
        got
    }
}

impl Drop for Probe {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn io_status(q: &mut Qmp) -> Value {
    let r = q.cmd(json!({"execute": "query-block"}));
    let list = r["return"].as_array().expect("query-block list").clone();
    assert_eq!(list.len(), 1, "{r}");
    assert_eq!(list[0]["qdev"], "exp0", "{r}");
    assert_eq!(list[0]["inserted"]["node-name"], "disk", "{r}");
    list[0]["io-status"].clone()
}

fn rule(event: &str, errno: u32, sector: u64) -> Value {
    json!({"event": event, "errno": errno, "sector": sector, "once": true})
}

#[test]
fn werror_stop_holds_the_write_until_cont_then_completes_it() {
    require_qemu!();
    let dir = tempdir();
    let d = err_daemon(
        dir.path(),
        json!([rule("write_aio", 5, 64)]),
        ",werror=stop",
    );
    let mut q = Qmp::connect(&d.qmp);
    assert_eq!(io_status(&mut q), "ok");
    let mut p = Probe::start(&d.sock);
    // The injected error stops the device: no answer for the write.
    let slot = p.write(64, 0xab);
    let ev = q.wait_event("BLOCK_IO_ERROR");
    assert_eq!(
        ev["data"],
        json!({"qom-path": "exp0", "device": "", "node-name": "disk", "operation": "write",
               "action": "stop", "nospace": false, "reason": "Input/output error"}),
        "{ev}"
    );
    assert!(p.wait(300).is_empty(), "a stopped request was answered");
    assert_eq!(io_status(&mut q), "failed");
    // Requests queued while stopped wait as well.
    let slot2 = p.write(128, 0xcd);
    assert!(
        p.wait(300).is_empty(),
        "the device served a request while stopped"
    );
    // `cont` retries the held write (the rule fired once) and serves the queue.
    assert_eq!(q.cmd(json!({"execute": "cont"}))["return"], json!({}));
    let mut done = p.wait_n(2);
    done.sort_by_key(|v| v["slot"].as_u64());
    let mut want = [slot, slot2];
    want.sort();
    for (v, s) in done.iter().zip(want) {
        assert_eq!(v["slot"], s);
        assert_eq!(v["status"], 0, "{v}");
        assert_eq!(v["len"], 1, "{v}");
    }
    assert_eq!(io_status(&mut q), "ok");
    // The retried write reached the disk.
    p.read(64);
    let r = p.wait_n(1);
    assert_eq!(
        (r[0]["status"].as_u64(), r[0]["byte"].as_u64()),
        (Some(0), Some(0xab))
    );
    p.read(128);
    let r = p.wait_n(1);
    assert_eq!(
        (r[0]["status"].as_u64(), r[0]["byte"].as_u64()),
        (Some(0), Some(0xcd))
    );
    assert!(
        q.events.iter().all(|e| e["event"] != "BLOCK_IO_ERROR"),
        "one error, one event: {:?}",
        q.events
    );
}

#[test]
fn rerror_report_and_werror_ignore_answer_at_once_with_events() {
    require_qemu!();
    let dir = tempdir();
    let rules = json!([rule("read_aio", 5, 8), rule("write_aio", 5, 16)]);
    let d = err_daemon(dir.path(), rules, ",werror=ignore,rerror=report");
    let mut q = Qmp::connect(&d.qmp);
    let mut p = Probe::start(&d.sock);
    p.read(8);
    let r = p.wait_n(1);
    assert_eq!(r[0]["status"], 1, "the guest sees IOERR: {r:?}");
    let ev = q.wait_event("BLOCK_IO_ERROR");
    assert_eq!(
        (&ev["data"]["operation"], &ev["data"]["action"]),
        (&json!("read"), &json!("report")),
        "{ev}"
    );
    p.write(16, 7);
    let r = p.wait_n(1);
    assert_eq!(r[0]["status"], 0, "ignore answers OK: {r:?}");
    let ev = q.wait_event("BLOCK_IO_ERROR");
    assert_eq!(
        (&ev["data"]["operation"], &ev["data"]["action"]),
        (&json!("write"), &json!("ignore")),
        "{ev}"
    );
    assert_eq!(io_status(&mut q), "ok", "report and ignore do not stop");
}

#[test]
fn werror_enospc_stops_on_no_space_only() {
    require_qemu!();
    let dir = tempdir();
    let rules = json!([rule("write_aio", 5, 8), rule("write_aio", 28, 16)]);
    let d = err_daemon(dir.path(), rules, ",werror=enospc");
    let mut q = Qmp::connect(&d.qmp);
    let mut p = Probe::start(&d.sock);
    // EIO: reported.
    p.write(8, 1);
    assert_eq!(p.wait_n(1)[0]["status"], 1);
    let ev = q.wait_event("BLOCK_IO_ERROR");
    assert_eq!(ev["data"]["action"], "report", "{ev}");
    // ENOSPC: stopped, io-status nospace, resumed by cont.
    p.write(16, 2);
    let ev = q.wait_event("BLOCK_IO_ERROR");
    assert_eq!(
        (
            &ev["data"]["action"],
            &ev["data"]["nospace"],
            &ev["data"]["reason"]
        ),
        (
            &json!("stop"),
            &json!(true),
            &json!("No space left on device")
        ),
        "{ev}"
    );
    assert!(p.wait(300).is_empty());
    assert_eq!(io_status(&mut q), "nospace");
    q.cmd(json!({"execute": "cont"}));
    assert_eq!(p.wait_n(1)[0]["status"], 0);
    assert_eq!(io_status(&mut q), "ok");
}

#[test]
fn without_a_policy_the_export_behaves_as_qemu_storage_daemon() {
    require_qemu!();
    let dir = tempdir();
    let d = err_daemon(dir.path(), json!([rule("write_aio", 5, 8)]), "");
    let mut q = Qmp::connect(&d.qmp);
    assert_eq!(
        q.cmd(json!({"execute": "query-block"}))["return"],
        json!([])
    );
    let mut p = Probe::start(&d.sock);
    p.write(8, 1);
    assert_eq!(p.wait_n(1)[0]["status"], 1);
    // No event: a later command's answer arrives with nothing queued before it.
    q.cmd(json!({"execute": "query-block-exports"}));
    assert!(q.events.is_empty(), "{:?}", q.events);
    let bad = q.cmd(json!({"execute": "block-export-add", "arguments": {
        "type": "vhost-user-blk", "id": "e1", "node-name": "disk", "rerror": "enospc",
        "addr": {"type": "unix", "path": s(&dir.path().join("e1.sock"))}}}));
    assert_eq!(
        bad["error"]["desc"], "'enospc' invalid read error action",
        "{bad}"
    );
}

#[test]
fn a_burst_of_requests_is_answered_in_full() {
    require_qemu!();
    let dir = tempdir();
    // A read error in the middle of the burst: reported for that request only.
    let d = err_daemon(
        dir.path(),
        json!([rule("read_aio", 5, 8 * 9)]),
        ",rerror=report",
    );
    let mut p = Probe::start_qd(&d.sock, 16);
    // 16 writes made available together and kicked once: the queue thread hands
    // them to the worker pool.
    for i in 0..16u64 {
        p.send(&format!("W {} {}", i * 8, i + 1));
    }
    p.send("kick");
    let done = p.wait_n(16);
    assert!(
        done.iter().all(|v| v["status"] == 0 && v["len"] == 1),
        "{done:?}"
    );
    for i in 0..16u64 {
        p.send(&format!("R {}", i * 8));
    }
    p.send("kick");
    let done = p.wait_n(16);
    let mut failed = 0;
    for v in &done {
        let sector = v["sector"].as_u64().expect("sector");
        match v["status"].as_u64() {
            Some(0) => assert_eq!(v["byte"].as_u64(), Some(sector / 8 + 1), "{v}"),
            Some(1) => {
                assert_eq!(sector, 72, "{v}");
                failed += 1;
            }
            _ => panic!("unexpected answer {v}"),
        }
    }
    assert_eq!(failed, 1, "exactly the injected read fails: {done:?}");
}
