//! The Debian Linux guest (`tests/guest/build.sh`): building it, adding ACPI table
//! overrides to its initramfs, and running a VM with a deadline while keeping its
//! serial console output. QEMU runs it over the vhost-user-blk export; strata-vm boots
//! it directly.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// The guest's files.
#[derive(Debug, Clone)]
pub struct Guest {
    /// The Debian cloud kernel's bzImage.
    pub bzimage: PathBuf,
    /// The ELF vmlinux extracted from it (PVH entry note); `None` when `lz4` is not
    /// installed (the build script fails if it is and finds none).
    pub vmlinux: Option<PathBuf>,
    /// The gzip'd initramfs (busybox, virtio modules, tests/guest/init.sh).
    pub initrd: PathBuf,
}

/// Builds (or finds in its cache) the guest, or says why it is unavailable.
pub fn guest() -> Result<Guest, String> {
    static GUEST: OnceLock<Result<Guest, String>> = OnceLock::new();
    GUEST
        .get_or_init(|| {
            let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("guest/build.sh");
            let text = crate::run_build_script(&script, &[])?;
            let get = |k: &str| {
                text.lines()
                    .find_map(|l| l.strip_prefix(k))
                    .map(PathBuf::from)
            };
            let need = |k: &str| get(k).unwrap_or_else(|| panic!("guest build printed no {k}"));
            Ok(Guest {
                bzimage: need("KERNEL="),
                vmlinux: get("VMLINUX="),
                initrd: need("INITRD="),
            })
        })
        .clone()
}

/// An uncompressed newc cpio archive of `files` (path, contents) with the directories
/// they need, as the kernel's early initramfs reader expects it.
pub fn cpio_newc(files: &[(&str, &[u8])]) -> Vec<u8> {
    fn entry(out: &mut Vec<u8>, ino: u32, name: &str, mode: u32, data: &[u8]) {
        let fields = [
            ino,
            mode,
            0,
            0,
            1,
            0,
            data.len() as u32,
            0,
            0,
            0,
            0,
            name.len() as u32 + 1,
            0,
        ];
        out.extend_from_slice(b"070701");
        for f in fields {
            out.extend_from_slice(format!("{f:08x}").as_bytes());
        }
        out.extend_from_slice(name.as_bytes());
        out.push(0);
        while out.len() % 4 != 0 {
            out.push(0);
        }
        out.extend_from_slice(data);
        while out.len() % 4 != 0 {
            out.push(0);
        }
    }
    let mut out = Vec::new();
    let mut dirs: Vec<String> = Vec::new();
    let mut ino = 1;
    for (path, data) in files {
        let parts: Vec<&str> = path.split('/').collect();
        for i in 1..parts.len() {
            let dir = parts[..i].join("/");
            if !dirs.contains(&dir) {
                entry(&mut out, ino, &dir, 0o040755, &[]);
                ino += 1;
                dirs.push(dir);
            }
        }
        entry(&mut out, ino, path, 0o100644, data);
        ino += 1;
    }
    entry(&mut out, 0, "TRAILER!!!", 0, &[]);
    out
}

/// Writes `initrd` preceded by an uncompressed cpio holding `tables` as
/// `kernel/firmware/acpi/NAME` (Linux's ACPI table upgrade: a table there replaces the
/// firmware's table of the same signature, OEM id and OEM table id when its OEM
/// revision is higher).
pub fn initrd_with_acpi_tables(initrd: &Path, tables: &[(&str, Vec<u8>)], out: &Path) {
    let files: Vec<(String, &[u8])> = tables
        .iter()
        .map(|(n, t)| (format!("kernel/firmware/acpi/{n}"), &t[..]))
        .collect();
    let refs: Vec<(&str, &[u8])> = files.iter().map(|(n, t)| (n.as_str(), *t)).collect();
    let mut all = cpio_newc(&refs);
    all.extend(std::fs::read(initrd).expect("read the initramfs"));
    std::fs::write(out, all).expect("write the combined initramfs");
}

/// How a VM run ended.
#[derive(Debug)]
pub struct Run {
    /// Exit status, `None` when it was killed at the deadline.
    pub status: Option<std::process::ExitStatus>,
    /// Everything it wrote to stdout (the serial console) and stderr.
    pub output: String,
    /// How long it ran.
    pub elapsed: Duration,
}

/// Runs `cmd` with stdin closed until it exits or `deadline` passes (then it is killed),
/// collecting its stdout and stderr.
pub fn run_vm(mut cmd: Command, deadline: Duration) -> Run {
    let start = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
    let output = Arc::new(Mutex::new(Vec::<u8>::new()));
    let mut readers = Vec::new();
    for mut pipe in [
        Box::new(child.stdout.take().unwrap()) as Box<dyn Read + Send>,
        Box::new(child.stderr.take().unwrap()),
    ] {
        let output = output.clone();
        readers.push(std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = pipe.read(&mut buf) {
                if n == 0 {
                    break;
                }
                output.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        }));
    }
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for the VM") {
            break Some(status);
        }
        if start.elapsed() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    for r in readers {
        let _ = r.join();
    }
    let output = String::from_utf8_lossy(&output.lock().unwrap()).into_owned();
    Run {
        status,
        output,
        elapsed: start.elapsed(),
    }
}

/// The line of `log` that contains `needle`, or a panic that shows the whole log.
pub fn line_with<'a>(log: &'a str, needle: &str) -> &'a str {
    log.lines()
        .find(|l| l.contains(needle))
        .unwrap_or_else(|| panic!("no line with {needle:?} in the console output:\n{log}"))
}
