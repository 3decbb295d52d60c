//! The export in-process on an in-memory disk, driven through a real vring by the
//! `vub_load --probe` example: requests run concurrently on the worker pool, and the
//! `werror=stop` policy holds a failed write until `Export::resume` retries it.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;
use strata_vhost_user_blk::{Export, ExportConfig};
use strata_virtio_blk::{BackendError, BlockBackend, ErrorAction, ErrorEvent, ErrorSink, IoStatus};

/// A 16 MiB disk in memory whose next `fail_writes` writes fail. Each write takes
/// 5 ms, and the most writes ever in progress at once is kept.
struct MemDisk {
    data: Mutex<Vec<u8>>,
    fail_writes: AtomicU32,
    writing: AtomicU32,
    most_writing: AtomicU32,
}

impl MemDisk {
    fn new() -> Arc<MemDisk> {
        Arc::new(MemDisk {
            data: Mutex::new(vec![0; 16 << 20]),
            fail_writes: AtomicU32::new(0),
            writing: AtomicU32::new(0),
            most_writing: AtomicU32::new(0),
        })
    }
}

impl BlockBackend for MemDisk {
    fn size(&self) -> u64 {
        16 << 20
    }
    fn read_only(&self) -> bool {
        false
    }
    fn read(&self, buf: &mut [u8], offset: u64) -> Result<(), BackendError> {
        let d = self.data.lock().unwrap();
        buf.copy_from_slice(&d[offset as usize..offset as usize + buf.len()]);
        Ok(())
    }
    fn write(&self, buf: &[u8], offset: u64) -> Result<(), BackendError> {
        let fail = self
            .fail_writes
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if fail {
            return Err(BackendError::io("Input/output error"));
        }
        let now = self.writing.fetch_add(1, Ordering::SeqCst) + 1;
        self.most_writing.fetch_max(now, Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(5));
        self.writing.fetch_sub(1, Ordering::SeqCst);
        let mut d = self.data.lock().unwrap();
        d[offset as usize..offset as usize + buf.len()].copy_from_slice(buf);
        Ok(())
    }
    fn write_zeroes(&self, offset: u64, len: u64, _unmap: bool) -> Result<(), BackendError> {
        let mut d = self.data.lock().unwrap();
        d[offset as usize..(offset + len) as usize].fill(0);
        Ok(())
    }
    fn discard(&self, offset: u64, len: u64) -> Result<(), BackendError> {
        self.write_zeroes(offset, len, false)
    }
    fn flush(&self) -> Result<(), BackendError> {
        Ok(())
    }
}

#[derive(Default)]
struct Events(Mutex<Vec<ErrorEvent>>);

impl ErrorSink for Events {
    fn io_error(&self, e: ErrorEvent) {
        self.0.lock().unwrap().push(e);
    }
}

/// The `vub_load` example next to this test (cargo test builds examples), or built.
fn vub_load() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().and_then(Path::parent).unwrap();
    let bin = dir.join("examples/vub_load");
    if !bin.is_file() {
        let mut c = Command::new(env!("CARGO"));
        c.args([
            "build",
            "--quiet",
            "-p",
            "strata-vhost-user-blk",
            "--example",
            "vub_load",
        ]);
        if dir.file_name().is_some_and(|n| n == "release") {
            c.arg("--release");
        }
        if let Some(target) = dir.parent() {
            c.env("CARGO_TARGET_DIR", target);
        }
        assert!(c.status().unwrap().success(), "cannot build vub_load");
    }
    bin
}

fn export(dir: &Path, disk: Arc<MemDisk>, werror: ErrorAction, sink: Arc<Events>) -> Export {
    let cfg = ExportConfig {
        id: "e0".into(),
        path: dir.join("vub.sock"),
        writable: true,
        num_queues: 1,
        logical_block_size: 512,
        serial: "s".into(),
        writethrough: false,
        werror,
        rerror: ErrorAction::Report,
    };
    Export::start(cfg, disk, Some(sink)).unwrap()
}

struct Probe {
    child: Child,
    input: ChildStdin,
    output: BufReader<ChildStdout>,
}

impl Probe {
    fn start(sock: &Path, qd: u16) -> Probe {
        let mut child = Command::new(vub_load())
            .arg("--socket")
            .arg(sock)
            .args(["--probe", "--bs", "4096", "--qd", &qd.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let input = child.stdin.take().unwrap();
        let output = BufReader::new(child.stdout.take().unwrap());
        Probe {
            child,
            input,
            output,
        }
    }

    fn send(&mut self, cmd: &str) -> Value {
        writeln!(self.input, "{cmd}").unwrap();
        let mut l = String::new();
        self.output.read_line(&mut l).unwrap();
        serde_json::from_str(&l).unwrap_or_else(|e| panic!("bad line {l:?}: {e}"))
    }

    fn wait_n(&mut self, n: usize) -> Vec<Value> {
        let mut got = Vec::new();
        let t = Instant::now();
        while got.len() < n && t.elapsed() < Duration::from_secs(10) {
            got.extend(self.send("wait 500")["done"].as_array().unwrap().clone());
        }
        assert_eq!(got.len(), n, "{got:?}");
        got
    }
}

impl Drop for Probe {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn burst_runs_on_the_pool_and_every_request_is_answered() {
    let dir = tempfile::tempdir().unwrap();
    let disk = MemDisk::new();
    let mut e = export(
        dir.path(),
        disk.clone(),
        ErrorAction::Report,
        Arc::default(),
    );
    let mut p = Probe::start(e.path(), 32);
    for i in 0..32u64 {
        p.send(&format!("W {} {}", i * 16, i + 1));
    }
    p.send("kick");
    let done = p.wait_n(32);
    assert!(done.iter().all(|v| v["status"] == 0), "{done:?}");
    let most = disk.most_writing.load(Ordering::SeqCst);
    assert!(
        most > 1,
        "32 writes of 5 ms each ran one at a time (at most {most} at once)"
    );
    {
        let d = disk.data.lock().unwrap();
        for i in 0..32usize {
            let at = i * 16 * 512;
            assert!(
                d[at..at + 4096].iter().all(|&b| b == i as u8 + 1),
                "block {i}"
            );
        }
    }
    for i in 0..32u64 {
        p.send(&format!("R {}", i * 16));
    }
    p.send("kick");
    for v in p.wait_n(32) {
        let sector = v["sector"].as_u64().unwrap();
        assert_eq!(
            (v["status"].as_u64(), v["byte"].as_u64()),
            (Some(0), Some(sector / 16 + 1))
        );
    }
    drop(p);
    e.stop();
}

#[test]
fn werror_stop_holds_the_write_until_resume() {
    let dir = tempfile::tempdir().unwrap();
    let disk = MemDisk::new();
    let events = Arc::new(Events::default());
    let mut e = export(dir.path(), disk.clone(), ErrorAction::Stop, events.clone());
    let mut p = Probe::start(e.path(), 4);
    disk.fail_writes.store(1, Ordering::SeqCst);
    p.send("w 8 171");
    let t = Instant::now();
    while !e.stopped() {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "the device did not stop"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(e.io_status(), IoStatus::Failed);
    assert!(p.send("wait 200")["done"].as_array().unwrap().is_empty());
    {
        let ev = events.0.lock().unwrap();
        assert_eq!(ev.len(), 1);
        assert_eq!((ev[0].operation, ev[0].action), ("write", "stop"));
    }
    // A request queued while stopped is not served either.
    p.send("w 16 172");
    assert!(p.send("wait 200")["done"].as_array().unwrap().is_empty());
    assert_eq!(e.resume(), 1);
    let done = p.wait_n(2);
    assert!(done.iter().all(|v| v["status"] == 0), "{done:?}");
    assert_eq!(e.io_status(), IoStatus::Ok);
    assert!(!e.stopped());
    let d = disk.data.lock().unwrap();
    assert!(d[8 * 512..8 * 512 + 4096].iter().all(|&b| b == 171));
    assert!(d[16 * 512..16 * 512 + 4096].iter().all(|&b| b == 172));
    drop(d);
    drop(p);
    e.stop();
}
