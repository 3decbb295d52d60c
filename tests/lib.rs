//! Shared helpers for Strata's integration tests.
//!
//! The tests in this crate cross Strata's crates and check them against real peers,
//! mostly `qemu-img` and `qemu-io`. This module holds what they share:
//!
//! - [`qemu`]: finding and running the QEMU tools, with a printed skip when they are
//!   missing (never a silent pass),
//! - [`qmp`]: a small QMP client; [`stamps`]: the point-in-time checker of the guests'
//!   stamp workloads,
//! - [`pattern`]: position-dependent data, so misplaced bytes are caught,
//! - [`Model`]: an in-memory disk that random operation sequences are mirrored into,
//! - [`qcow2`]: a tiny header reader/patcher used to build corrupted images,
//! - [`vmm_guest`]: the bare-metal test guest (build, serial report, expected disk),
//! - [`linux_guest`]: the Debian guest (build, ACPI overrides in its initramfs, a VM
//!   run with a deadline),
//! - [`kvm`], the binaries of the workspace, and [`skip_unless!`] for a test that needs
//!   a missing capability,
//! - byte comparison that reports the first differing offset, seeds that can be replayed,
//!   and whole-disk reads through the library.

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use strata_image::FormatDriver;

#[path = "support/linux_guest.rs"]
pub mod linux_guest;
#[path = "support/qcow2.rs"]
pub mod qcow2;
#[path = "support/qemu.rs"]
pub mod qemu;
#[path = "support/qmp.rs"]
pub mod qmp;
#[path = "support/stamps.rs"]
pub mod stamps;
#[path = "support/vmm_guest.rs"]
pub mod vmm_guest;

/// One mebibyte.
pub const MIB: u64 = 1 << 20;
/// One kibibyte.
pub const KIB: u64 = 1 << 10;

/// A fresh temporary directory, removed when dropped.
pub fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("strata-test-")
        .tempdir()
        .expect("cannot create a temporary directory")
}

/// The seed for a randomised test: `STRATA_TEST_SEED` when set, otherwise taken from the
/// clock. It is printed so that a failing run can be replayed.
pub fn seed(test: &str) -> u64 {
    let seed = match std::env::var("STRATA_TEST_SEED") {
        Ok(s) => s
            .parse()
            .unwrap_or_else(|_| panic!("STRATA_TEST_SEED={s} is not a u64")),
        Err(_) => {
            let t = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .expect("clock before 1970");
            splitmix64(t.as_nanos() as u64 ^ fnv64(test.as_bytes()))
        }
    };
    println!("{test}: seed {seed} (replay with STRATA_TEST_SEED={seed})");
    seed
}

/// One step of the SplitMix64 generator: a cheap, well-mixed hash of a `u64`.
pub fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// FNV-1a over `data` (a fingerprint for "did these bytes change", not cryptographic).
pub fn fnv64(data: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in data {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// Bytes that depend on `tag` and on their absolute disk position, so that data written
/// to the wrong place, or stale data, never matches by accident.
pub fn pattern(tag: u64, offset: u64, len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len);
    let mut pos = offset;
    let end = offset + len as u64;
    while pos < end {
        let word = splitmix64(tag.wrapping_mul(0x1000_0000_01b3) ^ (pos / 8));
        let bytes = word.to_le_bytes();
        let start = (pos % 8) as usize;
        let take = (8 - start).min((end - pos) as usize);
        out.extend_from_slice(&bytes[start..start + take]);
        pos += take as u64;
    }
    out
}

/// The first offset at which `a` and `b` differ (a length difference counts).
pub fn first_diff(a: &[u8], b: &[u8]) -> Option<usize> {
    let n = a.len().min(b.len());
    // Compare in large chunks first; slices compare with memcmp.
    let mut i = 0;
    while i < n {
        let j = (i + 65536).min(n);
        if a[i..j] != b[i..j] {
            return (i..j).find(|&k| a[k] != b[k]);
        }
        i = j;
    }
    (a.len() != b.len()).then_some(n)
}

/// Asserts that two disks are byte-identical, naming the first difference.
pub fn assert_same_disk(what: &str, got: &[u8], want: &[u8]) {
    if let Some(at) = first_diff(got, want) {
        let show = |d: &[u8]| -> String {
            let s = at & !15;
            d.get(s..(s + 32).min(d.len()))
                .map(|w| w.iter().map(|b| format!("{b:02x}")).collect::<String>())
                .unwrap_or_else(|| "<past end>".into())
        };
        let run = (at..got.len().min(want.len()))
            .take_while(|&k| got[k] != want[k])
            .count();
        panic!(
            "{what}: disks differ at byte {at} (0x{at:x}); lengths got {} want {}; \
             {run} differing bytes from there\n  got : {}\n  want: {}",
            got.len(),
            want.len(),
            show(got),
            show(want)
        );
    }
}

/// Reads the whole virtual disk of `drv` through the library.
pub fn read_all(drv: &dyn FormatDriver) -> strata_image::Result<Vec<u8>> {
    let size = drv.size();
    let mut out = vec![0u8; size as usize];
    let chunk = 4 * MIB as usize;
    let mut off = 0usize;
    while off < out.len() {
        let end = (off + chunk).min(out.len());
        drv.read(&mut out[off..end], off as u64)?;
        off = end;
    }
    Ok(out)
}

/// An in-memory model of a disk: the expected contents after a sequence of operations.
#[derive(Debug, Clone)]
pub struct Model {
    /// The expected bytes of the whole virtual disk.
    pub data: Vec<u8>,
}

impl Model {
    /// A disk of `size` zero bytes.
    pub fn zeroed(size: u64) -> Self {
        Model {
            data: vec![0; size as usize],
        }
    }

    /// A disk starting with the given contents (e.g. a backing file's).
    pub fn from_bytes(data: Vec<u8>) -> Self {
        Model { data }
    }

    /// Applies a write.
    pub fn write(&mut self, offset: u64, buf: &[u8]) {
        let o = offset as usize;
        self.data[o..o + buf.len()].copy_from_slice(buf);
    }

    /// Applies a write-zeroes.
    pub fn zero(&mut self, offset: u64, len: u64) {
        let o = offset as usize;
        self.data[o..o + len as usize].fill(0);
    }

    /// The expected bytes of a range.
    pub fn range(&self, offset: u64, len: u64) -> &[u8] {
        &self.data[offset as usize..(offset + len) as usize]
    }

    /// Writes the model to a raw image file.
    pub fn save_raw(&self, path: &Path) {
        std::fs::write(path, &self.data)
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
    }
}

/// A binary or an example of a workspace package.
#[derive(Debug, Clone, Copy)]
pub enum Artifact<'a> {
    /// `--bin NAME`.
    Bin(&'a str),
    /// `--example NAME`.
    Example(&'a str),
}

/// The directory this test binary's profile builds into (`target/<profile>`).
pub fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    exe.parent()
        .and_then(|deps| deps.parent())
        .expect("test binary is not inside target/<profile>/deps")
        .to_path_buf()
}

/// `artifact` of workspace package `package`, built on first use into this test's
/// profile directory with the same profile (`cargo test` builds only this package's
/// targets; the build is a no-op when the artifact is fresh). Environment variable
/// `var` overrides the path.
pub fn cargo_artifact(package: &str, artifact: Artifact<'_>, var: &str) -> PathBuf {
    use std::collections::HashMap;
    use std::sync::{Mutex, OnceLock};
    if let Ok(p) = std::env::var(var) {
        return PathBuf::from(p);
    }
    static BUILT: OnceLock<Mutex<HashMap<String, PathBuf>>> = OnceLock::new();
    let mut built = BUILT
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    let key = format!("{package} {artifact:?}");
    if let Some(p) = built.get(&key) {
        return p.clone();
    }
    let dir = profile_dir();
    let mut c = std::process::Command::new(env!("CARGO"));
    c.args(["build", "--quiet", "-p", package]);
    let path = match artifact {
        Artifact::Bin(name) => {
            c.args(["--bin", name]);
            dir.join(name)
        }
        Artifact::Example(name) => {
            c.args(["--example", name]);
            dir.join("examples").join(name)
        }
    };
    if dir.file_name().is_some_and(|n| n == "release") {
        c.arg("--release");
    }
    if let Some(target) = dir.parent() {
        c.env("CARGO_TARGET_DIR", target);
    }
    assert!(
        c.status().expect("cargo build").success(),
        "cannot build {key}"
    );
    built.insert(key, path.clone());
    path
}

/// Where `strata-storage-daemon` is (see [`workspace_bin`]).
pub fn strata_storage_daemon_bin() -> PathBuf {
    workspace_bin("strata-storage-daemon", "STRATA_STORAGE_DAEMON")
}

/// A binary of the workspace next to the test binary (`target/<profile>/NAME`), or the
/// path in environment variable `var`. Panics with the build command when it is
/// missing, so that the tests that need it fail loudly instead of skipping.
pub fn workspace_bin(name: &str, var: &str) -> PathBuf {
    if let Ok(p) = std::env::var(var) {
        return PathBuf::from(p);
    }
    let bin = profile_dir().join(name);
    assert!(
        bin.is_file(),
        "{name} not found at {}: build it first with `cargo build --release --workspace --bins` \
         (or set {var})",
        bin.display()
    );
    bin
}

/// Where `strata-img` is (see [`workspace_bin`]; `STRATA_IMG` overrides).
pub fn strata_img_bin() -> PathBuf {
    workspace_bin("strata-img", "STRATA_IMG")
}

/// The strata-vm binary (built on first use; `STRATA_VM` overrides the path).
pub fn strata_vm_bin() -> PathBuf {
    cargo_artifact("strata-vm", Artifact::Bin("strata-vm"), "STRATA_VM")
}

/// Why KVM cannot be used here, if it cannot (`/dev/kvm` missing or not read-write).
pub fn kvm() -> Result<(), String> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .map(|_| ())
        .map_err(|e| format!("/dev/kvm is not usable ({e})"))
}

/// The value of `$check` (a `Result<T, String>`); when it is `Err(why)`, prints
/// `SKIP: why` (to stdout and stderr) and returns from the enclosing test.
#[macro_export]
macro_rules! skip_unless {
    ($check:expr) => {
        match $check {
            Ok(v) => v,
            Err(why) => {
                println!("SKIP: {why}");
                eprintln!("SKIP: {why}");
                return;
            }
        }
    };
}

/// A path as a `&str` (test paths are always UTF-8).
pub fn s(path: &Path) -> &str {
    path.to_str().expect("non-UTF-8 temporary path")
}

/// Size of one crash-test record: the unit the crash writer writes and the checker reads.
pub const RECORD: u64 = 512;
/// Magic at the start of every crash-test record.
pub const RECORD_MAGIC: &[u8; 8] = b"STRATAcw";

/// The 512 bytes the crash writer puts at disk offset `offset` for its write number `seq`:
/// magic, sequence number, offset, then filler derived from both. A sector that holds
/// anything else was torn, misplaced or lost.
pub fn crash_record(seq: u64, offset: u64) -> Vec<u8> {
    let mut r = Vec::with_capacity(RECORD as usize);
    r.extend_from_slice(RECORD_MAGIC);
    r.extend_from_slice(&seq.to_le_bytes());
    r.extend_from_slice(&offset.to_le_bytes());
    r.extend_from_slice(&pattern(seq, offset + 24, RECORD as usize - 24));
    r
}

/// Runs a build script of the test suite (`sh SCRIPT ARGS...`) and returns its
/// standard output. The scripts exit 2, with the reason on standard error, when the
/// machine lacks something they need: that is `Err(reason)`, for the caller to print
/// as a skip. Any other failure is a broken build and panics, so that it fails the
/// test instead of skipping it.
pub fn run_build_script(script: &Path, args: &[&Path]) -> Result<String, String> {
    let out = std::process::Command::new("sh")
        .arg(script)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
    let stderr = String::from_utf8_lossy(&out.stderr);
    match out.status.code() {
        Some(0) => Ok(String::from_utf8_lossy(&out.stdout).into_owned()),
        Some(2) => Err(stderr.trim().to_string()),
        _ => panic!(
            "{} failed ({}): {}",
            script.display(),
            out.status,
            stderr.trim()
        ),
    }
}
