//! Differential QMP tests of the block layer: the Python scripts in `qmp_diff/` run
//! the same scripted sessions against QEMU (`qemu-storage-daemon`, or
//! `qemu-system-x86_64 -M none` where guest writes are injected with
//! `human-monitor-command qemu-io`) and `strata-storage-daemon`, and compare
//! answers, error classes and texts, and event sequences after normalising what
//! legitimately differs (timestamps, `#blockNNN` names, file names, timing-dependent
//! progress numbers).
//!
//! - `blockdev.py`: blockdev-add/del, query-named-block-nodes, block_resize, the
//!   dirty-bitmap commands, their sha256 after the same writes, transaction, internal
//!   snapshots.
//! - `backup.py`: drive-backup/blockdev-backup sync modes, job verbs and events,
//!   validation texts, point-in-time content checked with `qemu-img compare`.
//! - `bitmap_matrix.py`: iotest 257's matrix: every sync=bitmap bitmap-mode (and
//!   sync=incremental) × success / cancel / blkdebug-injected target failure, with
//!   writes before and during the job; the bitmap's count, members and sha256 after
//!   the job and after a later write must equal QEMU's (`qemu-system-x86_64 -M none`).
//! - `daemon.py`: persistent-bitmap interop both ways, SIGKILL, SIGTERM, pidfile,
//!   `--daemonize`, bad `--blockdev`.
//!
//! They need `python3`, `qemu-img` and `qemu-storage-daemon` 10.x (a missing one is
//! a printed SKIP); scenarios that need `qemu-system-x86_64` skip alone without it.
//! `strata-storage-daemon` must be built in the same profile
//! (`cargo build --release --workspace --bins`).

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Kills the script (SIGTERM first, so that it can kill its daemons) when dropped.
struct Script(Child);

impl Drop for Script {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = Command::new("kill")
                .args(["-TERM", &self.0.id().to_string()])
                .status();
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = self.0.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

fn strata_daemon() -> PathBuf {
    if let Ok(p) = std::env::var("STRATA_STORAGE_DAEMON") {
        return PathBuf::from(p);
    }
    // target/<profile>/deps/<this test> -> target/<profile>/strata-storage-daemon
    let exe = std::env::current_exe().expect("current test binary path");
    let dir = exe
        .parent()
        .and_then(|d| d.parent())
        .expect("target profile directory");
    dir.join("strata-storage-daemon")
}

fn found(prog: &str, arg: &str) -> bool {
    Command::new(prog)
        .arg(arg)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// Why the scripts cannot run here, if they cannot.
fn missing() -> Option<String> {
    if let Err(why) = strata_tests::qemu::available() {
        return Some(why);
    }
    let qsd = std::env::var("QEMU_STORAGE_DAEMON").unwrap_or_else(|_| "qemu-storage-daemon".into());
    if !found(&qsd, "--version") {
        return Some(format!("{qsd} is not installed"));
    }
    if !found("python3", "--version") {
        return Some("python3 is not installed".into());
    }
    None
}

fn run(script: &str, limit: Duration) {
    if let Some(why) = missing() {
        println!("SKIP: {why}");
        eprintln!("SKIP: {why}");
        return;
    }
    let daemon = strata_daemon();
    assert!(
        daemon.exists(),
        "{} is not built: run `cargo build --release --workspace --bins` first",
        daemon.display()
    );
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("qmp_diff")
        .join(script);
    let out_path = tempfile::NamedTempFile::new().expect("temp file");
    let child = Command::new("python3")
        .arg(&path)
        .env("STRATA_STORAGE_DAEMON", &daemon)
        .stdout(out_path.reopen().expect("reopen"))
        .stderr(Stdio::inherit())
        .spawn()
        .expect("run python3");
    let mut script_child = Script(child);
    let start = Instant::now();
    let status = loop {
        if let Some(s) = script_child.0.try_wait().expect("wait for the script") {
            break Some(s);
        }
        if start.elapsed() > limit {
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    drop(script_child);
    let output = std::fs::read_to_string(out_path.path()).unwrap_or_default();
    println!("{output}");
    match status {
        None => panic!("{script} did not finish within {limit:?}:\n{output}"),
        Some(s) => assert!(
            s.success(),
            "{script} found differences from QEMU:\n{output}"
        ),
    }
    println!("{script}: {:.1}s", start.elapsed().as_secs_f64());
}

#[test]
fn blockdev_and_bitmaps_match_qemu() {
    run("blockdev.py", Duration::from_secs(120));
}

#[test]
fn backup_jobs_match_qemu() {
    run("backup.py", Duration::from_secs(180));
}

#[test]
fn bitmap_modes_and_outcomes_match_qemu() {
    run("bitmap_matrix.py", Duration::from_secs(120));
}

#[test]
fn daemon_and_bitmap_interop_match_qemu() {
    run("daemon.py", Duration::from_secs(120));
}
