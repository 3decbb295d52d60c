//! strata-vm under KVM with the bare-metal test guest of `tests/vmm_guest` (assembled
//! with nasm by its `build.sh`): the guest finds its virtio-mmio disk through the ACPI
//! tables, runs the workload named on its command line and reports on COM1 with
//! `STRATA-GUEST:` lines. The host checks those lines, the QMP events, and afterwards
//! the qcow2 image with `qemu-img` / `qemu-io`.
//!
//! Each test prints a SKIP reason and returns when `/dev/kvm`, nasm or the QEMU tools
//! are missing.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use strata_tests::qmp::Qmp;
use strata_tests::vmm_guest as vg;
use strata_tests::{kvm, qemu, require_qemu, s, skip_unless, stamps, strata_vm_bin, tempdir};

macro_rules! require_vm {
    () => {
        require_qemu!();
        skip_unless!(kvm().and_then(|_| vg::build()));
    };
}

/// A running strata-vm with the test guest; console lines are collected as they
/// arrive.
struct Vm {
    child: Child,
    qmp: PathBuf,
    lines: Arc<Mutex<Vec<String>>>,
    /// strata-vm's own log lines (stderr), echoed to the test's stderr as they come.
    log: Arc<Mutex<Vec<String>>>,
    reader: Option<std::thread::JoinHandle<()>>,
    log_reader: Option<std::thread::JoinHandle<()>>,
}

impl Vm {
    /// Starts the guest with `test` and the disk options `disk` (`--drive ...`, or
    /// `--blockdev ... --device ...`).
    fn start(dir: &Path, test: &str, disk: &[String]) -> Vm {
        Vm::start_smp(dir, test, disk, 1)
    }

    /// [`Vm::start`] with `smp` vCPUs (the guest runs on the first; the others wait
    /// for a startup IPI that never comes, which pausing and resetting must handle).
    fn start_smp(dir: &Path, test: &str, disk: &[String], smp: u8) -> Vm {
        Vm::start_with(dir, test, disk, smp, &[])
    }

    /// [`Vm::start_smp`] with `extra` strata-vm arguments (e.g. `-S`).
    fn start_with(dir: &Path, test: &str, disk: &[String], smp: u8, extra: &[&str]) -> Vm {
        let qmp = dir.join("qmp.sock");
        let mut child = Command::new(strata_vm_bin())
            .args(extra)
            .args(["--smp", &smp.to_string()])
            .arg("--kernel")
            .arg(vg::build().expect("checked by require_vm"))
            .args(["--append", &format!("test={test}")])
            .args(["-m", "64", "--no-reboot", "--serial", "stdio"])
            .args(disk)
            .arg("--qmp")
            .arg(format!("unix:{},server=on,wait=off", s(&qmp)))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start strata-vm");
        let err = child.stderr.take().expect("stderr");
        let log = Arc::new(Mutex::new(Vec::new()));
        let log2 = log.clone();
        let log_reader = std::thread::spawn(move || {
            for line in BufReader::new(err).split(b'\n') {
                let Ok(line) = line else { break };
                let text = String::from_utf8_lossy(&line).into_owned();
                eprintln!("{text}");
                log2.lock().unwrap().push(text);
            }
        });
        let out = child.stdout.take().expect("stdout");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let l2 = lines.clone();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(out).split(b'\n') {
                let Ok(line) = line else { break };
                let text = String::from_utf8_lossy(&line);
                // The last report on the line: a reset can cut the guest off in the
                // middle of a line, and the next boot's report then follows on it.
                if let Some(i) = text.rfind("STRATA-GUEST: ") {
                    l2.lock()
                        .unwrap()
                        .push(text[i + 14..].trim_end().to_string());
                }
            }
        });
        let t = Instant::now();
        while !qmp.exists() {
            assert!(
                t.elapsed() < Duration::from_secs(20),
                "strata-vm did not start"
            );
            if let Some(st) = child.try_wait().expect("wait") {
                panic!("strata-vm exited at start with {st}");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Vm {
            child,
            qmp,
            lines,
            log,
            reader: Some(reader),
            log_reader: Some(log_reader),
        }
    }

    /// Waits (bounded) until the console has a line equal to `want`.
    fn wait_line(&self, want: &str, limit: Duration) {
        let t = Instant::now();
        while !self.lines().iter().any(|l| l == want) {
            assert!(
                t.elapsed() < limit,
                "no console line {want:?} after {limit:?}: {:?}",
                self.lines()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn lines(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }

    /// The highest `stamped N` the guest reported.
    fn stamped(&self) -> u64 {
        self.lines()
            .iter()
            .filter_map(|l| l.strip_prefix("stamped ")?.parse().ok())
            .max()
            .unwrap_or(0)
    }

    /// Waits (bounded) for the VMM to exit; returns its status and the console.
    fn wait(mut self, limit: Duration) -> (ExitStatus, Vec<String>) {
        let t = Instant::now();
        let st = loop {
            if let Some(st) = self.child.try_wait().expect("wait") {
                break st;
            }
            if t.elapsed() > limit {
                let _ = self.child.kill();
                panic!(
                    "strata-vm did not exit in {limit:?}; console: {:?}",
                    self.lines()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
        if let Some(r) = self.log_reader.take() {
            let _ = r.join();
        }
        (st, self.lines())
    }

    /// strata-vm's log lines so far.
    fn log(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn qcow2(dir: &Path, size: &str) -> PathBuf {
    let p = dir.join("disk.qcow2");
    qemu::create(&p, "qcow2", "", size);
    p
}

fn drive(image: &Path, extra: &str) -> Vec<String> {
    vec![
        "--drive".into(),
        format!("file={},format=qcow2,if=virtio,id=disk0{extra}", s(image)),
    ]
}

fn assert_clean(image: &Path) {
    let out = qemu::check(image);
    assert_eq!(
        out.code, 0,
        "{}:\n{}{}",
        out.cmdline, out.stdout, out.stderr
    );
}

fn assert_pass(lines: &[String]) {
    assert!(
        lines.iter().any(|l| l == "PASS"),
        "guest did not pass: {lines:?}"
    );
    assert!(
        !lines.iter().any(|l| l.starts_with("FAIL")),
        "guest reported a failure: {lines:?}"
    );
}

#[test]
fn basic_workload_powers_off_and_leaves_a_clean_image() {
    require_vm!();
    let dir = tempdir();
    let image = qcow2(dir.path(), "64M");
    let vm = Vm::start(dir.path(), "basic", &drive(&image, ""));
    let mut q = Qmp::connect(&vm.qmp);
    let ev = q.wait_event("SHUTDOWN");
    assert_eq!(ev["data"]["guest"], true, "{ev}");
    assert_eq!(ev["data"]["reason"], "guest-shutdown", "{ev}");
    drop(q);
    let (st, lines) = vm.wait(Duration::from_secs(60));
    assert!(
        st.success(),
        "strata-vm exited with {st}; console: {lines:?}"
    );
    assert_pass(&lines);
    assert!(
        lines.iter().any(|l| l == "ok discard zeroed=0 kept=16"),
        "discard=ignore (the --drive default) keeps the data: {lines:?}"
    );
    assert_clean(&image);
    let disk = qemu::to_raw(&image);
    let want = basic_model(disk.len());
    if let Some(i) = (0..disk.len()).find(|&i| disk[i] != want[i]) {
        panic!(
            "image differs from the basic workload's model at byte {i} (block {})",
            i / 4096
        );
    }
}

/// The disk after `test=basic` (tests/vmm_guest/work_basic.inc) on a zeroed disk of
/// `size` bytes whose discards are ignored: blocks 0-2, 8-11 and size/8192 hold
/// generation 1, 64-79 generation 2 (discarded, but kept), 36-39 generation 3 (32-35
/// and 40-47 were zero-written), the last sector the generation 1 line of its sector
/// number; 4 KiB blocks are filled with the 32-byte line "%08d %08d strata-basics\n" of
/// (block, generation).
fn basic_model(size: usize) -> Vec<u8> {
    let mut m = vec![0u8; size];
    let fill = |m: &mut [u8], off: usize, len: usize, n: usize, gen: u32| {
        let line = format!("{n:08} {gen:08} strata-basics\n");
        for c in m[off..off + len].chunks_mut(32) {
            c.copy_from_slice(line.as_bytes());
        }
    };
    let blocks = size / 4096;
    for (first, count, gen) in [
        (0, 3, 1),
        (8, 4, 1),
        (blocks / 2, 1, 1),
        (64, 16, 2),
        (36, 4, 3),
    ] {
        for b in first..first + count {
            fill(&mut m, b * 4096, 4096, b, gen);
        }
    }
    fill(&mut m, size - 512, 512, size / 512 - 1, 1);
    m
}

/// How strata-vm's device answers each case of `test=hostile` (the "strata-vm" column of
/// tests/vmm_guest/README.md). Where it differs from QEMU it fails the request with
/// IOERR (an address outside guest RAM), completes the chain without a status (a chain
/// it cannot parse: no writable status byte, a loop, an absurd length), skips a head
/// outside the table (`dropped`), refuses a queue size above the maximum (the queue never
/// becomes ready: `dropped`) or sets DEVICE_NEEDS_RESET (an available index further
/// ahead than the queue size).
const STRATA_HOSTILE: &[(&str, &str)] = &[
    ("data-beyond-ram-in", "status=1"),
    ("data-beyond-ram-out", "status=1"),
    ("data-at-4g-top-in", "status=1"),
    ("data-wraps-in", "status=1"),
    ("header-beyond-ram", "status=1"),
    ("status-beyond-ram", "status=none"),
    ("chain-loop", "status=none"),
    ("chain-self-loop", "status=none"),
    ("chain-longer-than-queue", "status=none"),
    ("next-out-of-range", "status=none"),
    ("head-out-of-range", "dropped"),
    ("avail-idx-far-ahead", "needs-reset"),
    ("len-absurd-in", "status=none"),
    ("len-absurd-out", "status=none"),
    ("len-not-sector-multiple-in", "status=1"),
    ("header-short-in", "status=1"),
    ("header-short-out", "status=1"),
    ("header-device-writable", "status=1"),
    ("status-missing-in", "status=none"),
    ("status-zero-length", "status=none"),
    ("no-writable-descriptor-out", "status=none"),
    ("indirect-not-negotiated", "status=0"),
    ("type-0x55", "status=2"),
    ("sector-beyond-capacity-in", "status=1"),
    ("sector-beyond-capacity-out", "status=1"),
    ("notify-bad-queue", "status=0"),
    ("garbage-registers", "status=0"),
    ("status-bits-cleared", "status=0"),
    ("queue-num-above-max", "dropped"),
    ("queue-moved-while-running", "status=0"),
    ("queue-ready-cleared-while-running", "status=0"),
];

#[test]
fn hostile_guest_gets_errors_and_the_disk_changes_only_where_it_may() {
    require_vm!();
    let dir = tempdir();
    let image = qcow2(dir.path(), "64M");
    // Block 16..19 (the invalid writes' targets) hold data, so a write of zeros or of
    // pattern data there would show; the rest of the disk is zero.
    qemu::io("qcow2", &image, &["write -P 0x6b 64k 16k"]);
    // end=halt: the guest halts instead of powering off, so the monitor can be asked
    // how the VM is after the hostile cases.
    let vm = Vm::start_with(
        dir.path(),
        "hostile end=halt",
        &drive(&image, ""),
        1,
        &["-S"],
    );
    let mut q = Qmp::connect(&vm.qmp);
    let r = q.cmd(serde_json::json!({"execute": "cont"}));
    assert!(r.get("return").is_some(), "{r}");
    vm.wait_line("halt", Duration::from_secs(120));
    let lines = vm.lines();
    assert!(
        lines.iter().any(|l| l == "hostile done"),
        "no `hostile done`: {lines:?}"
    );
    assert_pass(&lines);
    let outcomes = vg::hostile_outcomes(&lines).unwrap_or_else(|e| panic!("{e}: {lines:?}"));
    assert_eq!(outcomes.len(), STRATA_HOSTILE.len());
    for ((case, got), (want_case, want)) in outcomes.iter().zip(STRATA_HOSTILE) {
        assert_eq!(case, want_case);
        assert_eq!(
            got, want,
            "hostile case {case}: strata-vm answered `{got}`, documented `{want}`"
        );
    }
    // The VMM is still there and running; its log did not grow with the guest's attempts.
    let r = q.cmd(serde_json::json!({"execute": "query-status"}));
    assert_eq!(
        r["return"],
        serde_json::json!({"running": true, "status": "running"}),
        "{r}"
    );
    let log = vm.log();
    assert!(
        !log.iter().any(|l| l.contains("panicked")),
        "strata-vm panicked: {log:?}"
    );
    assert!(
        log.len() <= 12,
        "{} log lines for one hostile run: {log:?}",
        log.len()
    );
    let r = q.cmd(serde_json::json!({"execute": "quit"}));
    assert!(r.get("return").is_some(), "{r}");
    let (st, _) = vm.wait(Duration::from_secs(30));
    assert!(st.success(), "strata-vm exited with {st}");
    assert_clean(&image);
    let disk = qemu::to_raw(&image);
    let mut want = vg::hostile_writes();
    want.push((
        16 * vg::BLOCK,
        vg::Expect::Bytes(vec![0x6b; 4 * vg::BLOCK as usize]),
    ));
    vg::check_disk(&disk, &want).unwrap_or_else(|e| panic!("hostile run: {e}"));
}

#[test]
fn read_only_drive_refuses_writes_and_stays_unchanged() {
    require_vm!();
    let dir = tempdir();
    let image = qcow2(dir.path(), "64M");
    qemu::io(
        "qcow2",
        &image,
        &["write -P 0x5a 0 1M", "write -P 0xa5 32M 64k"],
    );
    let before = qemu::to_raw(&image);
    // The node and the device the daemon's way: --blockdev, then --device.
    let disk = vec![
        "--blockdev".into(),
        format!(
            "driver=file,filename={},node-name=f0,read-only=on",
            s(&image)
        ),
        "--blockdev".into(),
        "driver=qcow2,file=f0,node-name=q0,read-only=on".into(),
        "--device".into(),
        "virtio-blk-device,drive=q0,id=vd0".into(),
    ];
    let vm = Vm::start(dir.path(), "ro", &disk);
    let (st, lines) = vm.wait(Duration::from_secs(60));
    assert!(
        st.success(),
        "strata-vm exited with {st}; console: {lines:?}"
    );
    assert_pass(&lines);
    assert_clean(&image);
    assert!(
        before == qemu::to_raw(&image),
        "the read-only image changed"
    );
}

#[test]
fn werror_stop_pauses_the_vm_and_cont_retries_the_write() {
    require_vm!();
    let dir = tempdir();
    let image = qcow2(dir.path(), "64M");
    let node = serde_json::json!({
        "driver": "blkdebug", "node-name": "dbg",
        "inject-error": [{"event": "write_aio", "once": true}],
        "image": {"driver": "qcow2", "node-name": "q0",
                  "file": {"driver": "file", "filename": s(&image)}},
    });
    let disk = vec![
        "--blockdev".into(),
        node.to_string(),
        "--device".into(),
        "virtio-blk-device,drive=dbg,id=vd0,werror=stop,num-queues=2".into(),
    ];
    // -S: the monitor is connected before the guest runs, so no event is missed.
    let vm = Vm::start_with(dir.path(), "basic", &disk, 1, &["-S"]);
    let mut q = Qmp::connect(&vm.qmp);
    let r = q.cmd(serde_json::json!({"execute": "query-status"}));
    assert_eq!(
        r["return"],
        serde_json::json!({"running": false, "status": "prelaunch"})
    );
    assert!(vm.lines().is_empty(), "the guest ran before cont");
    let r = q.cmd(serde_json::json!({"execute": "cont"}));
    assert!(r.get("return").is_some(), "{r}");
    q.wait_event("RESUME");
    let ev = q.wait_event("BLOCK_IO_ERROR");
    assert_eq!(ev["data"]["operation"], "write", "{ev}");
    assert_eq!(ev["data"]["action"], "stop", "{ev}");
    assert_eq!(ev["data"]["node-name"], "dbg", "{ev}");
    q.wait_event("STOP");
    let r = q.cmd(serde_json::json!({"execute": "query-status"}));
    assert_eq!(
        r["return"],
        serde_json::json!({"running": false, "status": "io-error"})
    );
    assert!(!vm.lines().iter().any(|l| l == "PASS"));
    // query-block lists the disk as QEMU lists a guest device, with its io-status.
    let io_status = |q: &mut Qmp| {
        let r = q.cmd(serde_json::json!({"execute": "query-block"}));
        let list = r["return"].as_array().cloned().unwrap_or_default();
        assert_eq!(list.len(), 1, "query-block: {r}");
        assert_eq!(list[0]["qdev"], "vd0", "{r}");
        assert_eq!(list[0]["inserted"]["node-name"], "dbg", "{r}");
        list[0]["io-status"].as_str().unwrap_or("").to_string()
    };
    assert_eq!(io_status(&mut q), "failed");
    let r = q.cmd(serde_json::json!({"execute": "cont"}));
    assert!(r.get("return").is_some(), "{r}");
    q.wait_event("RESUME");
    assert_eq!(io_status(&mut q), "ok");
    let ev = q.wait_event("SHUTDOWN");
    assert_eq!(ev["data"]["reason"], "guest-shutdown", "{ev}");
    drop(q);
    let (st, lines) = vm.wait(Duration::from_secs(60));
    assert!(
        st.success(),
        "strata-vm exited with {st}; console: {lines:?}"
    );
    assert_pass(&lines);
    assert_clean(&image);
}

#[test]
fn bad_command_lines_fail_with_a_message() {
    require_qemu!();
    let dir = tempdir();
    let image = qcow2(dir.path(), "1M");
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec!["--drive".into(), "format=raw".into()],
            "Parameter 'file' is missing",
        ),
        (
            vec![
                "--drive".into(),
                format!("file={},format=qcow2,bogus=1", s(&image)),
            ],
            "Invalid parameter 'bogus'",
        ),
        (
            vec!["--device".into(), "virtio-blk-device,drive=nope".into()],
            "Drive 'nope' not found",
        ),
        (vec!["-m".into(), "1".into()], "memory size"),
        (vec!["--smp".into(), "0".into()], "invalid number of CPUs"),
        (vec!["--qmp".into(), "stdio".into()], "--qmp"),
        (vec!["--serial".into(), "pty".into()], "serial backend"),
    ];
    for (args, want) in cases {
        let out = Command::new(strata_vm_bin())
            .args(["--kernel", "/nonexistent/kernel"])
            .args(&args)
            .stdin(Stdio::null())
            .output()
            .expect("run strata-vm");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} succeeded");
        assert!(err.contains(want), "{args:?}: expected {want:?} in {err:?}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
    }
    if kvm().is_ok() {
        // A kernel that is not one: a clear error after KVM is set up.
        let junk = dir.path().join("junk");
        std::fs::write(&junk, vec![0x41; 4096]).expect("write");
        let out = Command::new(strata_vm_bin())
            .arg("--kernel")
            .arg(&junk)
            .stdin(Stdio::null())
            .output()
            .expect("run strata-vm");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success());
        assert!(err.contains("is not a kernel"), "{err}");
    } else if let Err(why) = kvm() {
        eprintln!("SKIP (the junk-kernel case, which needs KVM set up first): {why}");
    }
    assert_clean(&image);
}

#[test]
fn qmp_stop_cont_powerdown_reset_and_quit() {
    require_vm!();
    let dir = tempdir();
    let image = qcow2(dir.path(), "64M");
    let vm = Vm::start_smp(dir.path(), "stamp:100000000:1024", &drive(&image, ""), 2);
    let mut q = Qmp::connect(&vm.qmp);
    let t = Instant::now();
    while vm.stamped() < 100 {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "guest is not stamping"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let r = q.cmd(serde_json::json!({"execute": "query-status"}));
    assert_eq!(
        r["return"],
        serde_json::json!({"running": true, "status": "running"})
    );
    let r = q.cmd(serde_json::json!({"execute": "stop"}));
    assert!(r.get("return").is_some(), "{r}");
    q.wait_event("STOP");
    let r = q.cmd(serde_json::json!({"execute": "query-status"}));
    assert_eq!(
        r["return"],
        serde_json::json!({"running": false, "status": "paused"})
    );
    // Stopped: nothing moves, and the disk was flushed, so a copy is consistent.
    let paused_at = vm.stamped();
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(vm.stamped(), paused_at, "the guest ran while stopped");
    let copy = dir.path().join("paused.raw");
    qemu::img(&[
        "convert",
        "-U",
        "-f",
        "qcow2",
        "-O",
        "raw",
        s(&image),
        s(&copy),
    ])
    .ok();
    let h = stamps::check(&std::fs::read(&copy).expect("read copy"), 1024)
        .unwrap_or_else(|e| panic!("image of the stopped VM is not consistent: {e}"));
    assert!(
        h >= paused_at,
        "stopped image has stamp {h}, console said {paused_at}"
    );
    // stop again: no event, still paused.
    let r = q.cmd(serde_json::json!({"execute": "stop"}));
    assert!(r.get("return").is_some(), "{r}");
    let r = q.cmd(serde_json::json!({"execute": "cont"}));
    assert!(r.get("return").is_some(), "{r}");
    q.wait_event("RESUME");
    assert!(
        !q.events.iter().any(|e| e["event"] == "STOP"),
        "a second stop emitted STOP: {:?}",
        q.events
    );
    let t = Instant::now();
    while vm.stamped() < paused_at + 50 {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "guest did not resume"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let r = q.cmd(serde_json::json!({"execute": "system_powerdown"}));
    assert!(r.get("return").is_some(), "{r}");
    q.wait_event("POWERDOWN");
    let boots = vm.lines().iter().filter(|l| l.starts_with("boot")).count();
    let r = q.cmd(serde_json::json!({"execute": "system_reset"}));
    assert!(r.get("return").is_some(), "{r}");
    let ev = q.wait_event("RESET");
    assert_eq!(
        ev["data"],
        serde_json::json!({"guest": false, "reason": "host-qmp-system-reset"})
    );
    let t = Instant::now();
    while vm.lines().iter().filter(|l| l.starts_with("boot")).count() <= boots {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "guest did not boot again"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let r = q.cmd(serde_json::json!({"execute": "quit"}));
    assert!(r.get("return").is_some(), "{r}");
    let ev = q.wait_event("SHUTDOWN");
    assert_eq!(
        ev["data"],
        serde_json::json!({"guest": false, "reason": "host-qmp-quit"})
    );
    q.expect_eof(Duration::from_secs(10));
    let (st, _) = vm.wait(Duration::from_secs(30));
    assert!(st.success(), "strata-vm exited with {st}");
    assert_clean(&image);
}

/// 4 KiB blocks of the live-backup stamp area (all of the 64 MiB disk).
const STAMP_BLOCKS: u64 = 16384;

#[test]
fn live_backup_over_qmp_is_point_in_time_raw() {
    live_backup("raw");
}

#[test]
fn live_backup_over_qmp_is_point_in_time_qcow2() {
    live_backup("qcow2");
}

/// `drive-backup` of the running guest's disk (`format`: raw or qcow2) while it stamps:
/// the backup is one moment of the stamp sequence, at or after the backup's start.
/// With a raw disk, the negative control copies the live file directly and must see a
/// block older than the moment of the newest stamp it holds.
fn live_backup(format: &str) {
    require_vm!();
    let dir = tempdir();
    let image = dir.path().join(format!("disk.{format}"));
    qemu::create(&image, format, "", "64M");
    let backup = dir.path().join("backup.qcow2");
    let vm = Vm::start(
        dir.path(),
        &format!("stamp:100000000:{STAMP_BLOCKS}"),
        &[
            "--drive".into(),
            format!("file={},format={format},if=virtio,id=disk0", s(&image)),
        ],
    );
    let mut q = Qmp::connect(&vm.qmp);
    let t = Instant::now();
    while vm.stamped() < 500 {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "guest is not stamping"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let before_backup = vm.stamped();
    let r = q.cmd(serde_json::json!({"execute": "drive-backup", "arguments": {
        "job-id": "bk", "device": "disk0", "target": s(&backup), "format": "qcow2",
        "sync": "full", "speed": 8 << 20}}));
    assert!(r.get("return").is_some(), "drive-backup: {r}");
    let started = Instant::now();
    let stale = if format == "raw" {
        stamps::stale_live_copies(&image, STAMP_BLOCKS, 6, Duration::from_millis(4), || {
            vm.stamped()
        })
    } else {
        0
    };
    let ev = q.wait_event("BLOCK_JOB_COMPLETED");
    assert!(ev["data"].get("error").is_none(), "backup failed: {ev}");
    let took = started.elapsed();
    let after_backup = vm.stamped();
    println!(
        "{format}: backup took {took:?}; stamps on disk: {before_backup} at its start, {after_backup} at its end"
    );
    let r = q.cmd(serde_json::json!({"execute": "quit"}));
    assert!(r.get("return").is_some(), "{r}");
    let (st, _) = vm.wait(Duration::from_secs(30));
    assert!(st.success(), "strata-vm exited with {st}");
    assert_clean(&backup);
    let data = qemu::to_raw(&backup);
    let h =
        stamps::assert_backup_point_in_time(&data, STAMP_BLOCKS, before_backup, after_backup, 100);
    println!("{format}: backup holds the disk as of stamp {h}");
    if format == "raw" {
        assert!(
            stale > 0,
            "negative control: no live copy of the raw disk showed a stale block"
        );
    } else {
        assert_clean(&image);
    }
}

#[test]
fn system_powerdown_presses_the_acpi_power_button() {
    require_vm!();
    let dir = tempdir();
    let image = qcow2(dir.path(), "64M");
    let vm = Vm::start(dir.path(), "powerbutton", &drive(&image, ""));
    let mut q = Qmp::connect(&vm.qmp);
    let t = Instant::now();
    while !vm
        .lines()
        .iter()
        .any(|l| l.starts_with("powerbutton waiting"))
    {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "the guest did not find the GED: {:?}",
            vm.lines()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let waiting = vm.lines();
    let line = waiting
        .iter()
        .find(|l| l.starts_with("powerbutton waiting"))
        .unwrap();
    assert_eq!(
        vg::field(line, "ged"),
        Some(format!("0x{:08x}", strata_vm::layout::GED_MMIO_ADDR).as_str()),
        "{line}"
    );
    // Nothing is pending before the button is pressed.
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        !vm.lines()
            .iter()
            .any(|l| l.starts_with("powerbutton pressed")),
        "{:?}",
        vm.lines()
    );
    let r = q.cmd(serde_json::json!({"execute": "system_powerdown"}));
    assert!(r.get("return").is_some(), "{r}");
    q.wait_event("POWERDOWN");
    let ev = q.wait_event("SHUTDOWN");
    assert_eq!(
        ev["data"],
        serde_json::json!({"guest": true, "reason": "guest-shutdown"})
    );
    drop(q);
    let (st, lines) = vm.wait(Duration::from_secs(30));
    assert!(
        st.success(),
        "strata-vm exited with {st}; console: {lines:?}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l == "powerbutton pressed sel=0x00000002"),
        "{lines:?}"
    );
    assert_pass(&lines);
    assert_clean(&image);
}
