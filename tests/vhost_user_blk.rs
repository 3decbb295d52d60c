//! A real Linux guest on a Strata disk: QEMU (TCG) boots the test guest from
//! `tests/guest/build.sh` with `vhost-user-blk-pci` connected to
//! `strata-storage-daemon`'s vhost-user-blk export over a qcow2 image.
//!
//! The guest's `/init` runs the steps named on its kernel command line and prints
//! `STRATA:` lines on the serial console; the host checks those and, after the
//! daemon's clean shutdown, the image itself with `qemu-img`.
//!
//! Needs `qemu-system-x86_64` 10.x and the guest packages; each test prints a SKIP
//! reason and returns when they are missing.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use strata_tests::qmp::Qmp;
use strata_tests::{
    cargo_artifact, qemu, require_qemu, s, skip_unless, stamps, tempdir, Artifact, MIB,
};

#[path = "vhost_user_blk/errors.rs"]
mod errors;

/// Kernel and initramfs of the test guest, or why they are unavailable.
fn guest() -> Result<(PathBuf, PathBuf), String> {
    qemu::system_emulator()?;
    let g = strata_tests::linux_guest::guest()?;
    Ok((g.bzimage, g.initrd))
}

macro_rules! require_guest {
    () => {
        require_qemu!();
        let (kernel, initrd) = skip_unless!(guest());
        let _ = (&kernel, &initrd);
    };
}

/// The daemon binary (built on first use; `STRATA_STORAGE_DAEMON` overrides the path).
fn daemon_bin() -> PathBuf {
    cargo_artifact(
        "strata-storage-daemon",
        Artifact::Bin("strata-storage-daemon"),
        "STRATA_STORAGE_DAEMON",
    )
}

/// The vhost-user frontend example (`vub_load`), built on first use like the daemon.
fn load_bin() -> PathBuf {
    cargo_artifact(
        "strata-vhost-user-blk",
        Artifact::Example("vub_load"),
        "STRATA_VUB_LOAD",
    )
}

/// One running `strata-storage-daemon` with a format node `disk` (qcow2 unless
/// started with [`Daemon::start_format`]) exported as `exp0`.
struct Daemon {
    child: Child,
    sock: PathBuf,
    qmp: PathBuf,
}

impl Daemon {
    fn start(dir: &Path, image: &Path, export_opts: &str) -> Daemon {
        Daemon::start_format(dir, image, "qcow2", export_opts)
    }

    fn start_format(dir: &Path, image: &Path, format: &str, export_opts: &str) -> Daemon {
        Daemon::start_nodes(
            dir,
            &[
                format!(
                    "driver=file,filename={},node-name=file0,discard=unmap",
                    s(image)
                ),
                format!("driver={format},file=file0,node-name=disk,discard=unmap"),
            ],
            export_opts,
        )
    }

    /// A daemon with the `--blockdev` options `nodes`, the last of which must be the
    /// node `disk` that is exported as `exp0` with `export_opts`.
    fn start_nodes(dir: &Path, nodes: &[String], export_opts: &str) -> Daemon {
        let sock = dir.join("vub.sock");
        let qmp = dir.join("qmp.sock");
        let mut cmd = Command::new(daemon_bin());
        for n in nodes {
            cmd.arg("--blockdev").arg(n);
        }
        let child = cmd
            .arg("--export")
            .arg(format!(
                "type=vhost-user-blk,id=exp0,node-name=disk,addr.type=unix,addr.path={}{export_opts}",
                s(&sock)
            ))
            .arg("--chardev")
            .arg(format!("socket,id=m0,path={},server=on,wait=off", s(&qmp)))
            .args(["--monitor", "chardev=m0"])
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start strata-storage-daemon");
        let t = Instant::now();
        while !(sock.exists() && qmp.exists()) {
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "daemon did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Daemon { child, sock, qmp }
    }

    /// SIGTERM and wait: the clean shutdown flushes the image.
    fn stop(mut self) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc_kill(self.child.id() as i32, 15) };
        let t = Instant::now();
        loop {
            if let Some(st) = self.child.try_wait().expect("wait") {
                assert!(st.success(), "daemon exited with {st}");
                return;
            }
            assert!(t.elapsed() < Duration::from_secs(30), "daemon did not exit");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Runs one QMP command on a fresh connection; returns the response line.
    fn qmp(&self, cmd: &str) -> String {
        let mut s = UnixStream::connect(&self.qmp).expect("qmp connect");
        let mut r = BufReader::new(s.try_clone().expect("clone"));
        let mut line = String::new();
        r.read_line(&mut line).expect("greeting");
        s.write_all(b"{\"execute\":\"qmp_capabilities\"}\n")
            .expect("write");
        line.clear();
        r.read_line(&mut line).expect("caps");
        s.write_all(cmd.as_bytes()).expect("write");
        s.write_all(b"\n").expect("write");
        loop {
            line.clear();
            r.read_line(&mut line).expect("response");
            if !line.contains("\"event\"") {
                return line;
            }
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

extern "C" {
    #[link_name = "kill"]
    fn libc_kill(pid: i32, sig: i32) -> i32;
}

/// A QEMU guest on the export.
struct Guest {
    child: Child,
}

impl Guest {
    fn start(sock: &Path, queues: u32, run: &str) -> Guest {
        let (kernel, initrd) = guest().expect("guest checked by require_guest");
        let child = Command::new("qemu-system-x86_64")
            .args(["-accel", "tcg", "-M", "pc,memory-backend=mem", "-m", "256"])
            .args(["-smp", &queues.to_string()])
            .args(["-object", "memory-backend-memfd,id=mem,size=256M,share=on"])
            .args(["-nographic", "-no-reboot", "-net", "none", "-nodefaults"])
            .args(["-serial", "stdio"])
            .arg("-kernel")
            .arg(&kernel)
            .arg("-initrd")
            .arg(&initrd)
            .arg("-append")
            .arg(format!(
                "console=ttyS0 panic=-1 quiet strata.run={run} strata.seed=7"
            ))
            .arg("-chardev")
            .arg(format!("socket,path={},id=c0", s(sock)))
            .arg("-device")
            .arg(format!("vhost-user-blk-pci,chardev=c0,num-queues={queues}"))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start qemu-system-x86_64");
        Guest { child }
    }

    /// Reads the console until the guest powers off; returns its `STRATA:` lines.
    fn wait(mut self) -> Vec<String> {
        let out = self.child.stdout.take().expect("stdout");
        let pid = self.child.id();
        let watchdog = std::thread::spawn(move || {
            let t = Instant::now();
            while t.elapsed() < Duration::from_secs(300) {
                std::thread::sleep(Duration::from_millis(200));
                if !Path::new(&format!("/proc/{pid}")).exists() {
                    return;
                }
            }
            // SAFETY: kill(2) on the guest's pid after the timeout.
            unsafe { libc_kill(pid as i32, 9) };
        });
        let lines = read_strata_lines(out, |_| false);
        let st = self.child.wait().expect("wait qemu");
        let _ = watchdog.join();
        let mut err = String::new();
        if let Some(mut e) = self.child.stderr.take() {
            let _ = e.read_to_string(&mut err);
        }
        assert!(
            lines.iter().any(|l| l == "done"),
            "guest did not finish (qemu {st}); console: {lines:?}; stderr: {err}"
        );
        lines
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Collects the text after "STRATA: " of each console line, until `stop` says so or EOF.
fn read_strata_lines(out: impl Read, mut stop: impl FnMut(&str) -> bool) -> Vec<String> {
    let mut lines = Vec::new();
    for line in BufReader::new(out).split(b'\n') {
        let Ok(line) = line else { break };
        let text = String::from_utf8_lossy(&line);
        if let Some(i) = text.find("STRATA: ") {
            let l = text[i + 8..].trim_end().to_string();
            let end = stop(&l);
            lines.push(l);
            if end {
                break;
            }
        }
    }
    lines
}

/// The guest's pattern for `len` MiB at `off` MiB (see tests/guest/init.sh).
fn guest_pattern(off_mib: u64, len_mib: u64, seed: u32) -> Vec<u8> {
    let mut v = Vec::with_capacity((len_mib * MIB) as usize);
    for k in off_mib * 256..(off_mib + len_mib) * 256 {
        let line = format!("{k:08} {seed:08} strata-virtio\n");
        assert_eq!(line.len(), 32);
        for _ in 0..128 {
            v.extend_from_slice(line.as_bytes());
        }
    }
    v
}

fn qcow2(dir: &Path, size: &str) -> PathBuf {
    let p = dir.join("disk.qcow2");
    qemu::create(&p, "qcow2", "", size);
    p
}

fn expect(lines: &[String], want: &str) {
    assert!(
        lines.iter().any(|l| l == want),
        "guest did not report {want:?}: {lines:?}"
    );
}

/// Writes `data` at `off` into a raw model disk of `size` bytes.
fn model(dir: &Path, size: u64, parts: &[(u64, Vec<u8>)]) -> PathBuf {
    let mut disk = vec![0u8; size as usize];
    for (off, data) in parts {
        disk[*off as usize..*off as usize + data.len()].copy_from_slice(data);
    }
    let p = dir.join("model.raw");
    std::fs::write(&p, &disk).expect("write model");
    p
}

fn assert_clean(image: &Path) {
    let out = qemu::check(image);
    assert_eq!(
        out.code, 0,
        "{}:\n{}{}",
        out.cmdline, out.stdout, out.stderr
    );
}

#[test]
fn guest_writes_pattern_and_reads_it_back() {
    require_guest!();
    let dir = tempdir();
    let image = qcow2(dir.path(), "64M");
    let d = Daemon::start(dir.path(), &image, ",writable=on");
    // Guest writes go through the block graph: a dirty bitmap records them.
    let r = d.qmp(
        "{\"execute\":\"block-dirty-bitmap-add\",\"arguments\":{\"node\":\"disk\",\"name\":\"b0\"}}",
    );
    assert!(r.contains("\"return\""), "{r}");
    let lines = Guest::start(&d.sock, 1, "info,write:1:4,verify:1:4").wait();
    expect(
        &lines,
        "info size=67108864 ro=0 queues=1 lbs=512 discard=16777216 wz=16777216",
    );
    expect(&lines, "write ok");
    expect(&lines, "verify ok");
    let nodes: serde_json::Value = serde_json::from_str(
        &d.qmp("{\"execute\":\"query-named-block-nodes\",\"arguments\":{\"flat\":true}}"),
    )
    .expect("json");
    let disk = nodes["return"]
        .as_array()
        .and_then(|a| a.iter().find(|n| n["node-name"] == "disk"))
        .expect("node disk");
    assert_eq!(
        disk["dirty-bitmaps"][0]["count"],
        4 * MIB,
        "dirty bitmap after the guest wrote 4 MiB: {disk}"
    );
    d.stop();
    assert_clean(&image);
    let m = model(dir.path(), 64 * MIB, &[(MIB, guest_pattern(1, 4, 7))]);
    qemu::compare_with_raw(&image, "qcow2", &m);
}

#[test]
fn two_queues_and_4k_blocks() {
    require_guest!();
    let dir = tempdir();
    let image = qcow2(dir.path(), "64M");
    let d = Daemon::start(
        dir.path(),
        &image,
        ",writable=on,num-queues=2,logical-block-size=4096",
    );
    let lines = Guest::start(&d.sock, 2, "info,write:0:8,verify:0:8").wait();
    expect(
        &lines,
        "info size=67108864 ro=0 queues=2 lbs=4096 discard=16777216 wz=16777216",
    );
    expect(&lines, "write ok");
    expect(&lines, "verify ok");
    d.stop();
    assert_clean(&image);
    let m = model(dir.path(), 64 * MIB, &[(0, guest_pattern(0, 8, 7))]);
    qemu::compare_with_raw(&image, "qcow2", &m);
}

#[test]
fn read_only_export_refuses_writes() {
    require_guest!();
    let dir = tempdir();
    let image = qcow2(dir.path(), "16M");
    qemu::io("qcow2", &image, &["write -P 0x5a 0 2M"]);
    let d = Daemon::start(dir.path(), &image, ",writable=off");
    let lines = Guest::start(&d.sock, 1, "info,write:0:1,read:0:2").wait();
    expect(
        &lines,
        "info size=16777216 ro=1 queues=1 lbs=512 discard=0 wz=0",
    );
    assert!(
        lines.iter().any(|l| l.starts_with("write failed")),
        "guest write to a read-only export succeeded: {lines:?}"
    );
    // sha256 of 2 MiB of 0x5a.
    let want = sha256_hex(&vec![0x5au8; (2 * MIB) as usize]);
    expect(&lines, &format!("read sha256={want}"));
    d.stop();
    let m = model(dir.path(), 16 * MIB, &[(0, vec![0x5a; (2 * MIB) as usize])]);
    qemu::compare_with_raw(&image, "qcow2", &m);
}

#[test]
fn discard_and_write_zeroes_leave_the_image_sparse() {
    require_guest!();
    let dir = tempdir();
    let image = qcow2(dir.path(), "64M");
    let d = Daemon::start(dir.path(), &image, ",writable=on");
    let lines = Guest::start(&d.sock, 1, "write:0:4,discard:0:1,zero:1:1,flush").wait();
    expect(&lines, "write ok");
    expect(&lines, "discard ok");
    expect(&lines, "zero ok");
    d.stop();
    assert_clean(&image);
    let m = model(dir.path(), 64 * MIB, &[(2 * MIB, guest_pattern(2, 2, 7))]);
    qemu::compare_with_raw(&image, "qcow2", &m);
    // The first 2 MiB hold no data clusters any more.
    let map = qemu::img(&["map", "--output=json", "-f", "qcow2", s(&image)]).ok();
    let v: serde_json::Value = serde_json::from_str(&map.stdout).expect("map json");
    for e in v.as_array().expect("array") {
        let start = e["start"].as_u64().unwrap_or(0);
        if start < 2 * MIB {
            assert_eq!(e["data"], false, "allocated data below 2 MiB: {e}");
        }
    }
}

#[test]
fn frontend_killed_mid_write_then_a_new_one_connects() {
    require_guest!();
    let dir = tempdir();
    let image = qcow2(dir.path(), "64M");
    let d = Daemon::start(dir.path(), &image, ",writable=on");
    // First guest: killed with SIGKILL while it writes 32 MiB.
    let mut g = Guest::start(&d.sock, 1, "write:0:32,write:0:32");
    let out = g.child.stdout.take().expect("stdout");
    let seen = read_strata_lines(out, |l| l == "boot");
    assert!(seen.iter().any(|l| l == "boot"), "guest did not boot");
    std::thread::sleep(Duration::from_millis(1500));
    g.child.kill().expect("SIGKILL qemu");
    let _ = g.child.wait();
    drop(g);
    // The daemon is still there and serves a new frontend.
    assert!(d
        .qmp("{\"execute\":\"query-block-exports\"}")
        .contains("exp0"));
    let lines = Guest::start(&d.sock, 1, "write:40:4,verify:40:4").wait();
    expect(&lines, "verify ok");
    d.stop();
    assert_clean(&image);
}

#[test]
fn qmp_exports_on_a_running_daemon() {
    require_qemu!();
    let dir = tempdir();
    let image = qcow2(dir.path(), "16M");
    let d = Daemon::start(dir.path(), &image, "");
    let q = d.qmp("{\"execute\":\"query-block-exports\"}");
    assert!(q.contains("\"id\": \"exp0\""), "{q}");
    let sock2 = dir.path().join("two.sock");
    let add = format!(
        "{{\"execute\":\"block-export-add\",\"arguments\":{{\"type\":\"vhost-user-blk\",\
         \"id\":\"exp1\",\"node-name\":\"disk\",\"addr\":{{\"type\":\"unix\",\"path\":\"{}\"}}}}}}",
        s(&sock2)
    );
    assert!(d.qmp(&add).contains("\"return\": {}"));
    assert!(sock2.exists());
    let dup = d.qmp(&add);
    assert!(
        dup.contains("Block export id 'exp1' is already in use"),
        "{dup}"
    );
    let del = d.qmp("{\"execute\":\"block-export-del\",\"arguments\":{\"id\":\"exp1\"}}");
    assert!(del.contains("\"return\": {}"), "{del}");
    assert!(!sock2.exists());
    let del = d.qmp("{\"execute\":\"block-export-del\",\"arguments\":{\"id\":\"exp1\"}}");
    assert!(del.contains("Export 'exp1' is not found"), "{del}");
    d.stop();
}

fn sha256_hex(data: &[u8]) -> String {
    let mut c = Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("sha256sum");
    c.stdin
        .take()
        .expect("stdin")
        .write_all(data)
        .expect("write");
    let out = c.wait_with_output().expect("sha256sum");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or("")
        .to_string()
}

/// 4 KiB blocks the stamp workload scatters over (64 MiB).
const STAMP_BLOCKS: u64 = 16384;

#[test]
fn live_backup_of_a_running_guest_is_point_in_time_raw() {
    live_backup("raw");
}

#[test]
fn live_backup_of_a_running_guest_is_point_in_time_qcow2() {
    live_backup("qcow2");
}

/// `drive-backup` of the running guest's disk (`format`: raw or qcow2) while it stamps:
/// the backup must be one moment of the stamp sequence, at or after the backup's
/// start. With a raw disk the negative control copies the live file behind the
/// daemon's back while the guest keeps stamping (1 MiB pieces in a scattered order with
/// a pause after each, as a naive copy tool would) and must find a block older than
/// the moment of the newest stamp in the copy. (A copy of a live qcow2 file proves
/// less: it mostly misses the L2 tables the daemon has not written back yet.)
fn live_backup(format: &str) {
    require_guest!();
    let dir = tempdir();
    let image = dir.path().join(format!("disk.{format}"));
    qemu::create(&image, format, "", "64M");
    let backup = dir.path().join("backup.qcow2");
    let d = Daemon::start_format(dir.path(), &image, format, ",writable=on");
    let mut g = Guest::start(&d.sock, 1, &format!("stamp:100000000:{STAMP_BLOCKS}"));
    // The console reports every 25th stamp once it is on the disk: a lower bound
    // for the stamps any copy taken afterwards must contain.
    let out = g.child.stdout.take().expect("stdout");
    let acked = Arc::new(AtomicU64::new(0));
    let booted = Arc::new(AtomicBool::new(false));
    let (a2, b2) = (acked.clone(), booted.clone());
    let reader = std::thread::spawn(move || {
        read_strata_lines(out, |l| {
            if l == "boot" {
                b2.store(true, Ordering::SeqCst);
            }
            if let Some(n) = l.strip_prefix("stamped ").and_then(|n| n.parse().ok()) {
                a2.fetch_max(n, Ordering::SeqCst);
            }
            false
        })
    });
    // Let the guest write a few hundred stamps (about 130 per second under TCG).
    let t = Instant::now();
    while acked.load(Ordering::SeqCst) < 200 {
        assert!(
            t.elapsed() < Duration::from_secs(120),
            "guest is not stamping"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(booted.load(Ordering::SeqCst));
    let mut q = Qmp::connect(&d.qmp);
    let before_backup = acked.load(Ordering::SeqCst);
    let r = q.cmd(serde_json::json!({"execute": "drive-backup", "arguments": {
        "job-id": "bk", "device": "disk", "target": s(&backup), "format": "qcow2",
        "sync": "full", "speed": 4194304}}));
    let started = Instant::now();
    assert!(r.get("return").is_some(), "drive-backup: {r}");
    let stale = if format == "raw" {
        stamps::stale_live_copies(&image, STAMP_BLOCKS, 5, Duration::from_millis(8), || {
            acked.load(Ordering::SeqCst)
        })
    } else {
        0
    };
    let ev = q.wait_event("BLOCK_JOB_COMPLETED");
    assert!(ev["data"].get("error").is_none(), "backup failed: {ev}");
    let after_backup = acked.load(Ordering::SeqCst);
    println!(
        "backup took {:?}; stamps on disk: {before_backup} at its start, {after_backup} at its end",
        started.elapsed()
    );
    g.child.kill().expect("SIGKILL guest");
    let _ = g.child.wait();
    let _ = reader.join();
    drop(g);
    drop(q);
    d.stop();
    assert_clean(&backup);
    let data = qemu::to_raw(&backup);
    let h =
        stamps::assert_backup_point_in_time(&data, STAMP_BLOCKS, before_backup, after_backup, 25);
    println!("backup holds the disk as of stamp {h}");
    if format == "raw" {
        assert!(
            stale > 0,
            "negative control: no copy of the live disk mixed moments"
        );
    } else {
        assert_clean(&image);
    }
}

#[test]
fn hostile_frontend_chains_are_answered_and_the_export_keeps_serving() {
    require_qemu!();
    let dir = tempdir();
    let image = qcow2(dir.path(), "16M");
    let d = Daemon::start(dir.path(), &image, ",writable=on");
    // Malformed chains through the real vring: IOERR/UNSUPP or dropped, never stuck.
    let out = Command::new(load_bin())
        .arg("--socket")
        .arg(&d.sock)
        .arg("--hostile")
        .output()
        .expect("run vub_load");
    assert!(
        out.status.success(),
        "hostile frontend: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // A new frontend then gets full service.
    let out = Command::new(load_bin())
        .arg("--socket")
        .arg(&d.sock)
        .args(["--rw", "randwrite", "--qd", "16", "--seconds", "0.5"])
        .output()
        .expect("run vub_load");
    assert!(
        out.status.success(),
        "load after the hostile frontend: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    d.stop();
    assert_clean(&image);
}
