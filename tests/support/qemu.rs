//! Running the QEMU tools (`qemu-img`, `qemu-io`) that the tests use as the reference.
//!
//! Every call records the full command line, so that an assertion failure says exactly
//! what to run by hand.

use std::path::Path;
use std::process::Command;
use std::sync::OnceLock;

/// The major version of `qemu-img` the suite is written against.
pub const QEMU_MAJOR: u32 = 10;

/// Whether `qemu-img` and `qemu-io` of the expected major version are installed;
/// `Err` says why not.
pub fn available() -> Result<(), String> {
    static AVAILABLE: OnceLock<Result<(), String>> = OnceLock::new();
    AVAILABLE
        .get_or_init(|| {
            let out = Command::new("qemu-img")
                .arg("--version")
                .output()
                .map_err(|e| format!("qemu-img is not installed ({e})"))?;
            let text = String::from_utf8_lossy(&out.stdout);
            let version = text
                .split_whitespace()
                .nth(2)
                .ok_or_else(|| format!("cannot parse `qemu-img --version`: {text}"))?;
            let major: u32 = version
                .split('.')
                .next()
                .and_then(|m| m.parse().ok())
                .ok_or_else(|| format!("cannot parse qemu-img version {version}"))?;
            if major != QEMU_MAJOR {
                return Err(format!(
                    "qemu-img {version} is installed; the suite needs {QEMU_MAJOR}.x"
                ));
            }
            Command::new("qemu-io")
                .arg("--version")
                .output()
                .map_err(|e| format!("qemu-io is not installed ({e})"))?;
            Ok(())
        })
        .clone()
}

/// Returns from the enclosing test, printing the reason, when the QEMU tools are missing.
#[macro_export]
macro_rules! require_qemu {
    () => {
        $crate::skip_unless!($crate::qemu::available())
    };
}

/// Whether `qemu-system-x86_64` 10.x is installed (the guest tests run under it);
/// `Err` says why not.
pub fn system_emulator() -> Result<(), String> {
    static SYSTEM: OnceLock<Result<(), String>> = OnceLock::new();
    SYSTEM
        .get_or_init(|| {
            let v = Command::new("qemu-system-x86_64")
                .arg("--version")
                .output()
                .map_err(|e| {
                    format!(
                        "qemu-system-x86_64 is not installed ({e}); install qemu-system-x86 \
                         from bookworm-backports"
                    )
                })?;
            let text = String::from_utf8_lossy(&v.stdout);
            if !text.contains("version 10.") {
                return Err(format!("qemu-system-x86_64 10.x needed, found: {text}"));
            }
            Ok(())
        })
        .clone()
}

/// What a finished command printed, and how it exited.
#[derive(Debug, Clone)]
pub struct Out {
    /// The command line, for messages.
    pub cmdline: String,
    /// The exit code (-1 when killed by a signal).
    pub code: i32,
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
}

impl Out {
    /// Panics, with everything the command printed, unless it exited with one of `codes`.
    pub fn expect_code(self, codes: &[i32]) -> Self {
        if !codes.contains(&self.code) {
            panic!(
                "`{}` exited with {} (expected {codes:?})\nstdout:\n{}\nstderr:\n{}",
                self.cmdline, self.code, self.stdout, self.stderr
            );
        }
        self
    }

    /// Panics unless the command exited with 0.
    pub fn ok(self) -> Self {
        self.expect_code(&[0])
    }
}

/// Runs `program` with `args` and collects its output.
pub fn run(program: &str, args: &[&str]) -> Out {
    let cmdline = std::iter::once(program)
        .chain(args.iter().copied())
        .map(|a| {
            if a.contains([' ', '\'', '"']) {
                format!("'{a}'")
            } else {
                a.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join(" ");
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run `{cmdline}`: {e}"));
    Out {
        cmdline,
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Runs `qemu-img` with `args`.
pub fn img(args: &[&str]) -> Out {
    run("qemu-img", args)
}

/// `qemu-img create -f <fmt> [-o <opts>] <path> <size>`, which must succeed.
pub fn create(path: &Path, fmt: &str, opts: &str, size: &str) {
    let p = super::s(path);
    let mut args = vec!["create", "-q", "-f", fmt];
    if !opts.is_empty() {
        args.extend(["-o", opts]);
    }
    args.extend([p, size]);
    img(&args).ok();
}

/// Runs `qemu-io -f <fmt>` with each of `cmds` as a `-c` command on `path`, and panics
/// if it fails or reports a failed request.
pub fn io(fmt: &str, path: &Path, cmds: &[&str]) {
    let mut args = vec!["-f", fmt];
    for c in cmds {
        args.extend(["-c", c]);
    }
    args.push(super::s(path));
    let out = run("qemu-io", &args).ok();
    let all = format!("{}{}", out.stdout, out.stderr);
    if all.contains("failed") || all.contains("rror") {
        panic!("`{}` reported a failure:\n{all}", out.cmdline);
    }
}

/// The disk contents of an image as QEMU reads them (`qemu-img convert -O raw`),
/// following its backing chain.
pub fn to_raw(path: &Path) -> Vec<u8> {
    let dir = super::tempdir();
    let raw = dir.path().join("disk.raw");
    img(&["convert", "-O", "raw", super::s(path), super::s(&raw)]).ok();
    std::fs::read(&raw).expect("read converted raw image")
}

/// `qemu-img check -f qcow2 <path>` (not yet judged; see [`Out::expect_code`]).
pub fn check(path: &Path) -> Out {
    img(&["check", "-f", "qcow2", super::s(path)])
}

/// `qemu-img compare -f <format> -F raw <image> <raw>`, which must say the disks are
/// identical.
pub fn compare_with_raw(image: &Path, format: &str, raw: &Path) {
    let out = img(&[
        "compare",
        "-f",
        format,
        "-F",
        "raw",
        super::s(image),
        super::s(raw),
    ]);
    if out.code != 0 {
        panic!(
            "`{}` says the image differs from the model (exit {}):\n{}{}",
            out.cmdline, out.code, out.stdout, out.stderr
        );
    }
}
