//! Cross-process tests: the Python scripts in `tests/qmp/` drive the
//! `qmp-test-server` example with the real `qemu.qmp` client and compare it
//! with `qemu-storage-daemon`. They need `python3` with `qemu.qmp`
//! (`pip install qemu.qmp`) and `qemu-storage-daemon`; a missing peer fails
//! the test with a message saying what to install.

use std::path::PathBuf;
use std::process::Command;

fn test_server() -> PathBuf {
    // target/<profile>/deps/<this test> -> target/<profile>/examples/
    let exe = std::env::current_exe().expect("current test binary path");
    let dir = exe
        .parent()
        .and_then(|d| d.parent())
        .expect("target profile directory");
    let server = dir.join("examples").join("qmp-test-server");
    assert!(
        server.exists(),
        "{} not built; run the tests with `cargo test -p strata-qmp` (which builds examples)",
        server.display()
    );
    server
}

fn script(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/qmp")
        .join(name)
}

fn require_qemu_qmp() {
    let ok = Command::new("python3")
        .args(["-c", "import qemu.qmp"])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(
        ok,
        "python3 cannot import qemu.qmp: install it with `pip install qemu.qmp`"
    );
}

fn run(script_name: &str, extra: &[&str]) {
    let out = Command::new("python3")
        .arg(script(script_name))
        .arg(test_server())
        .args(extra)
        .output()
        .expect("run python3");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "{script_name} failed:\n{stdout}\n{stderr}"
    );
    println!("{stdout}");
}

#[test]
fn qemu_qmp_client_conformance() {
    require_qemu_qmp();
    run("conformance.py", &[]);
}

#[test]
fn differential_against_qemu_storage_daemon() {
    let qsd = std::env::var("QEMU_STORAGE_DAEMON").unwrap_or_else(|_| "qemu-storage-daemon".into());
    let found = Command::new(&qsd)
        .arg("--version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    assert!(found, "{qsd} not found: install qemu-storage-daemon 10.x (Debian package qemu-utils) or set QEMU_STORAGE_DAEMON");
    run("differential.py", &[&qsd]);
}
