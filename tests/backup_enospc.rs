//! A backup onto a filesystem that really fills up (a small tmpfs): with
//! `on-target-error=enospc` the job stops with io-status `nospace`; once the filesystem
//! grows, resuming completes a backup that QEMU finds identical to the source.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use strata_block::{BlockGraph, BlockNode, BlockdevOptions};
use strata_image::{create_image, CreateOptions, Format};
use strata_jobs::backup::{create_backup, BackupParams, SyncMode};
use strata_jobs::{JobManager, JobStatus, NoEvents, OnError};
use strata_tests::qemu;

const SIZE: u64 = 24 << 20;

/// A tmpfs mount that is unmounted on drop.
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Result<Self, String> {
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .output()
            .map_err(|e| format!("cannot run mount: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "mounting a tmpfs needs root: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(Tmpfs(dir.to_path_buf()))
    }

    fn grow(&self, size: &str) {
        let st = Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(&self.0)
            .status()
            .unwrap();
        assert!(st.success());
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

fn open(g: &BlockGraph, name: &str, path: &Path) -> Arc<BlockNode> {
    let o = BlockdevOptions::from_json(&json!({
        "driver": "qcow2", "node-name": name,
        "file": {"driver": "file", "filename": path.display().to_string()}
    }))
    .unwrap();
    g.blockdev_add(&o).unwrap()
}

#[test]
fn full_target_filesystem_stops_then_completes() {
    if let Err(why) = qemu::available() {
        eprintln!("SKIP: {why}");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mnt = dir.path().join("small");
    std::fs::create_dir(&mnt).unwrap();
    let fs = match Tmpfs::mount(&mnt, "8m") {
        Ok(fs) => fs,
        Err(why) => {
            eprintln!("SKIP: {why}");
            return;
        }
    };
    let src_path = dir.path().join("src.qcow2");
    let tgt_path = mnt.join("tgt.qcow2");
    for p in [&src_path, &tgt_path] {
        create_image(
            p,
            Format::Qcow2,
            &CreateOptions {
                size: Some(SIZE),
                ..Default::default()
            },
        )
        .unwrap();
    }
    let g = Arc::new(BlockGraph::new());
    let src = open(&g, "src", &src_path);
    let data: Vec<u8> = (0..SIZE).map(|i| (i % 253) as u8).collect();
    src.write(&data, 0).unwrap();
    let tgt = open(&g, "tgt", &tgt_path);
    let jobs = JobManager::new(Arc::new(NoEvents));
    let mut p = BackupParams::new("j", src.clone(), tgt.clone(), SyncMode::Full);
    p.on_target_error = OnError::Enospc;
    let job = create_backup(&g, &jobs, p).unwrap();
    jobs.start(&job, false).unwrap();
    let t0 = Instant::now();
    while job.status() != JobStatus::Paused {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "the job never stopped on the full filesystem: {:?}",
            job.status()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(jobs.query_block_jobs()[0]["io-status"], "nospace");
    fs.grow("64m");
    job.resume().unwrap();
    job.wait_concluded();
    assert!(job.error().is_none(), "{:?}", job.error());
    assert!(g.close_all().is_empty());
    qemu::check(&tgt_path).ok();
    let raw = dir.path().join("src.raw");
    std::fs::write(&raw, &data).unwrap();
    qemu::compare_with_raw(&tgt_path, "qcow2", &raw);
}
