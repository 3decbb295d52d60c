//! The bare-metal test guest (`tests/vmm_guest/`) under QEMU's microvm machine (TCG),
//! with a modern (version 2) virtio-mmio virtio-blk device: the guest's regression test,
//! independent of `strata-vm`. Each test boots one workload, checks the serial report and
//! then the disk contents with QEMU's own tools.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use strata_tests::vmm_guest::{self as guest, Expect};
use strata_tests::{qemu, require_qemu, s, skip_unless, tempdir};

/// Disk size of the tests (sectors of 512 bytes).
const DISK_SECTORS: u64 = 64 << 11;

/// Returns from the test, printing why, when QEMU's system emulator or nasm is missing;
/// otherwise the built guest.
macro_rules! require_guest {
    () => {{
        require_qemu!();
        skip_unless!(qemu::system_emulator().and_then(|_| guest::build()))
    }};
}

/// What a guest run printed and how QEMU ended.
struct Run {
    serial: String,
    exited: bool,
    code: Option<i32>,
}

/// Boots `elf` under `qemu-system-x86_64 -M microvm` with the command line `append` and
/// one virtio-blk-device on `drive` (the `-drive` options after `if=none,id=d0,`). QEMU
/// is killed after `timeout`.
fn boot(elf: &Path, append: &str, drive: &str, legacy: bool, timeout: Duration) -> Run {
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args([
        "-M",
        "microvm,acpi=on,pit=off,pic=off,rtc=off",
        "-accel",
        "tcg",
        "-m",
        "64",
        "-nodefaults",
        "-no-reboot",
        "-display",
        "none",
        "-serial",
        "stdio",
        "-kernel",
        s(elf),
        "-append",
        append,
        "-drive",
        &format!("if=none,id=d0,{drive}"),
        "-device",
        "virtio-blk-device,drive=d0,serial=strata-guest-d0",
    ]);
    if !legacy {
        cmd.args(["-global", "virtio-mmio.force-legacy=false"]);
    }
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("cannot start qemu-system-x86_64");
    let mut stdout = child.stdout.take().expect("stdout");
    let reader = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = stdout.read_to_end(&mut s);
        s
    });
    let start = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().expect("wait for qemu") {
            break Some(st);
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let serial = String::from_utf8_lossy(&reader.join().expect("reader")).into_owned();
    let mut stderr = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut stderr);
    }
    println!(
        "guest `{append}` ({:.2} s):\n{serial}{stderr}",
        start.elapsed().as_secs_f64()
    );
    Run {
        serial,
        exited: status.is_some(),
        code: status.and_then(|s| s.code()),
    }
}

fn new_disk(dir: &Path, name: &str) -> PathBuf {
    let p = dir.join(name);
    qemu::create(&p, "qcow2", "", &format!("{}", DISK_SECTORS * 512));
    p
}

fn assert_powered_off(run: &Run) {
    assert!(
        run.exited && run.code == Some(0),
        "QEMU did not power off cleanly (exited={}, code={:?}): the guest's power-off \
         through the FADT sleep register failed\n{}",
        run.exited,
        run.code,
        run.serial
    );
}

fn assert_clean_image(path: &Path) {
    let out = qemu::check(path);
    assert_eq!(out.code, 0, "qemu-img check: {}{}", out.stdout, out.stderr);
}

#[test]
fn basic_workload_writes_what_it_reports() {
    let elf = require_guest!();
    let dir = tempdir();
    let disk = new_disk(dir.path(), "basic.qcow2");
    let run = boot(
        &elf,
        "test=basic",
        &format!("file={},format=qcow2,discard=unmap", s(&disk)),
        false,
        Duration::from_secs(60),
    );
    guest::assert_pass(&run.serial);
    assert_powered_off(&run);
    let r = guest::report(&run.serial);
    // How the guest found the device: ACPI from start_info, one LNRO0005 window.
    let acpi = guest::line(&r, "acpi rsdp=").expect("acpi line");
    assert!(acpi.contains("(start_info)"), "{acpi}");
    let info = guest::line(&r, "info ").expect("info line");
    assert_eq!(guest::field(info, "capacity"), Some("131072"), "{info}");
    assert_eq!(guest::field(info, "ro"), Some("0"), "{info}");
    assert_eq!(guest::field(info, "flush"), Some("1"), "{info}");
    for step in [
        "ok write",
        "ok read",
        "ok flush",
        "ok discard zeroed=",
        "ok write-zeroes",
        "ok write-zeroes-unmap flag=1",
        "ok past-end",
        "ok get-id id='strata-guest-d0'",
        "ok final-flush",
    ] {
        assert!(
            guest::line(&r, step).is_some(),
            "missing `{step}`:\n{}",
            run.serial
        );
    }
    let discard = guest::line(&r, "ok discard zeroed=").unwrap();
    let zeroed: usize = guest::field(discard, "zeroed").unwrap().parse().unwrap();

    assert_clean_image(&disk);
    let raw = qemu::to_raw(&disk);
    let writes = guest::basic_writes(DISK_SECTORS, true, true);
    let got_zeroed = guest::check_disk(&raw, &writes).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        got_zeroed, zeroed,
        "the guest saw {zeroed} discarded blocks as zeros, the image has {got_zeroed}"
    );
    // QEMU with discard=unmap on a 64 KiB-cluster qcow2 drops the whole aligned cluster.
    assert_eq!(zeroed, 16, "{discard}");
}

#[test]
fn basic_workload_disk_check_catches_a_stray_write() {
    // The checker itself: a disk with one extra byte or one wrong pattern byte fails.
    let mut disk = vec![0u8; (DISK_SECTORS * 512) as usize];
    let writes = guest::basic_writes(DISK_SECTORS, true, true);
    for (off, e) in &writes {
        if let Expect::Bytes(b) | Expect::ZeroOr(b) = e {
            disk[*off as usize..*off as usize + b.len()].copy_from_slice(b);
        }
    }
    assert_eq!(guest::check_disk(&disk, &writes), Ok(0));
    let mut stray = disk.clone();
    stray[5 * 4096 + 7] = 1;
    assert!(guest::check_disk(&stray, &writes).is_err());
    let mut wrong = disk.clone();
    wrong[8 * 4096 + 3] ^= 1;
    assert!(guest::check_disk(&wrong, &writes).is_err());
    let mut not_zeroed = disk;
    not_zeroed[33 * 4096] = b'x';
    assert!(guest::check_disk(&not_zeroed, &writes).is_err());
}

#[test]
fn read_only_disk_refuses_writes_and_stays_unchanged() {
    let elf = require_guest!();
    let dir = tempdir();
    let disk = new_disk(dir.path(), "ro.qcow2");
    qemu::io("qcow2", &disk, &["write -q -P 0x5a 0 1M"]);
    let before = qemu::to_raw(&disk);
    let run = boot(
        &elf,
        "test=ro",
        &format!("file={},format=qcow2,readonly=on", s(&disk)),
        false,
        Duration::from_secs(60),
    );
    guest::assert_pass(&run.serial);
    assert_powered_off(&run);
    let r = guest::report(&run.serial);
    let info = guest::line(&r, "info ").expect("info line");
    assert_eq!(guest::field(info, "ro"), Some("1"), "{info}");
    for step in [
        "ok ro-feature",
        "ok read first=0x5a5a5a5a",
        "ok write-refused",
        "ok unchanged",
    ] {
        assert!(
            guest::line(&r, step).is_some(),
            "missing `{step}`:\n{}",
            run.serial
        );
    }
    let after = qemu::to_raw(&disk);
    strata_tests::assert_same_disk("read-only disk after the guest", &after, &before);
}

#[test]
fn stamps_land_in_order_and_rsdp_scan_works() {
    let elf = require_guest!();
    let dir = tempdir();
    let disk = new_disk(dir.path(), "stamps.qcow2");
    let (count, blocks) = (300u64, 64u64);
    let run = boot(
        &elf,
        &format!("test=stamp:{count}:{blocks} rsdp=scan"),
        &format!("file={},format=qcow2", s(&disk)),
        false,
        Duration::from_secs(60),
    );
    guest::assert_pass(&run.serial);
    assert_powered_off(&run);
    let r = guest::report(&run.serial);
    assert!(
        guest::line(&r, "acpi rsdp=")
            .expect("acpi line")
            .contains("(scan)"),
        "rsdp=scan must make the guest find the RSDP by scanning"
    );
    let stamped: Vec<u64> = r
        .iter()
        .filter_map(|l| l.strip_prefix("stamped "))
        .map(|n| n.parse().expect("stamp number"))
        .collect();
    let want: Vec<u64> = (1..=count / 25).map(|i| i * 25).collect();
    assert_eq!(stamped, want);
    assert!(guest::line(&r, &format!("stamp done {count}")).is_some());
    let raw = qemu::to_raw(&disk);
    guest::check_disk(&raw, &guest::stamp_writes(count, blocks)).unwrap_or_else(|e| panic!("{e}"));
}

#[test]
fn guest_reports_failures_it_cannot_work_around() {
    // Negative controls: the guest says FAIL (and still powers off) for an unknown
    // workload, and for a legacy (version 1) virtio-mmio device it does not drive.
    let elf = require_guest!();
    let dir = tempdir();
    let disk = new_disk(dir.path(), "neg.qcow2");
    let drive = format!("file={},format=qcow2", s(&disk));
    let run = boot(&elf, "test=bogus", &drive, false, Duration::from_secs(60));
    assert_powered_off(&run);
    let r = guest::report(&run.serial);
    assert!(
        guest::line(&r, "FAIL unknown test 'bogus'").is_some(),
        "{r:?}"
    );
    assert_eq!(r.last().map(String::as_str), Some("FAIL"));

    let run = boot(&elf, "test=basic", &drive, true, Duration::from_secs(60));
    assert_powered_off(&run);
    let r = guest::report(&run.serial);
    assert!(
        guest::line(&r, "skip virtio-blk at ").is_some_and(|l| l.contains("version 1")),
        "{r:?}"
    );
    assert_eq!(r.last().map(String::as_str), Some("FAIL"));
    // Nothing was written.
    let raw = qemu::to_raw(&disk);
    assert!(raw.iter().all(|&b| b == 0));
}

#[test]
fn hostile_driver_leaves_the_disk_alone() {
    let elf = require_guest!();
    let dir = tempdir();
    let disk = new_disk(dir.path(), "hostile.qcow2");
    let run = boot(
        &elf,
        "test=hostile",
        &format!("file={},format=qcow2", s(&disk)),
        false,
        Duration::from_secs(120),
    );
    // QEMU stayed up to the end: the guest finished every case, recovered the device
    // after each, and powered the machine off.
    guest::assert_pass(&run.serial);
    assert_powered_off(&run);
    let r = guest::report(&run.serial);
    assert!(guest::line(&r, "ok hostile-setup").is_some());
    assert!(guest::line(&r, "ok hostile-final").is_some());
    assert!(guest::line(&r, "hostile done").is_some());
    let outcomes = guest::hostile_outcomes(&r).unwrap_or_else(|e| panic!("{e}\n{}", run.serial));
    let outcome = |case: &str| {
        outcomes
            .iter()
            .find(|(c, _)| c == case)
            .map(|(_, o)| o.as_str())
            .unwrap()
    };
    // What the virtio spec requires of any device: an unknown request type is UNSUPP,
    // and a request past the end is an I/O error.
    assert_eq!(outcome("type-0x55"), "status=2");
    assert_eq!(outcome("sector-beyond-capacity-in"), "status=1");
    assert_eq!(outcome("sector-beyond-capacity-out"), "status=1");
    // QEMU treats a looping chain as a broken driver: the device needs a reset.
    assert_eq!(outcome("chain-loop"), "needs-reset");
    assert_eq!(outcome("chain-self-loop"), "needs-reset");

    assert_clean_image(&disk);
    let raw = qemu::to_raw(&disk);
    guest::check_disk(&raw, &guest::hostile_writes()).unwrap_or_else(|e| panic!("{e}"));
}

#[test]
fn hostile_guest_names_a_write_that_landed() {
    // Negative control for the guest's own disk check: QEMU reads a data buffer beyond
    // RAM as zeros and writes them, so on a disk whose block 16 is not zero the guest
    // must name that case (and fail the final check).
    let elf = require_guest!();
    let dir = tempdir();
    let disk = new_disk(dir.path(), "hostile-filled.qcow2");
    qemu::io("qcow2", &disk, &["write -q -P 0x61 64k 32k"]);
    let run = boot(
        &elf,
        "test=hostile",
        &format!("file={},format=qcow2", s(&disk)),
        false,
        Duration::from_secs(120),
    );
    assert_powered_off(&run);
    let r = guest::report(&run.serial);
    let fails: Vec<&String> = r.iter().filter(|l| l.starts_with("FAIL")).collect();
    assert_eq!(
        fails,
        [
            "FAIL hostile data-beyond-ram-out changed block 16",
            "FAIL hostile-final blocks 16..23 changed",
            "FAIL",
        ],
        "{}",
        run.serial
    );
}
