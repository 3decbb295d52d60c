//! Runs the main job (`tests/demo/live_backup.py`) on a small disk: a live backup over
//! QMP of a disk being written, verified byte for byte with QEMU's tools.

use std::process::Command;

#[test]
fn live_backup_demo_on_a_small_disk() {
    if let Err(why) = strata_tests::qemu::available() {
        eprintln!("SKIP: {why}");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("demo/live_backup.py");
    let out = Command::new("python3")
        .arg(script)
        .arg(strata_tests::strata_img_bin())
        .arg(strata_tests::strata_storage_daemon_bin())
        .arg(dir.path())
        .args(["--size", "32"])
        .output()
        .expect("python3 runs");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("OK: live point-in-time backup verified"),
        "demo failed:\n{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
