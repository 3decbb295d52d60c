//! An incremental backup chain checked by QEMU: a full backup anchored with a dirty
//! bitmap, then three incremental backups with writes in between. Layering the backups
//! (each incremental's backing file is the previous one) reproduces the source at each
//! point, as `qemu-img compare` confirms; the bitmap ends up holding only the writes
//! since the last backup.

use std::path::Path;
use std::sync::Arc;

use serde_json::json;
use strata_block::{BlockGraph, BlockNode, BlockdevOptions};
use strata_image::{create_image, CreateOptions, Format};
use strata_jobs::backup::{create_backup, BackupParams, BitmapMode, SyncMode};
use strata_jobs::{JobManager, NoEvents};
use strata_tests::qemu;

const SIZE: u64 = 32 << 20;

fn create(path: &Path, backing: Option<&str>) {
    create_image(
        path,
        Format::Qcow2,
        &CreateOptions {
            size: Some(SIZE),
            backing_file: backing.map(str::to_string),
            backing_fmt: backing.map(|_| "qcow2".to_string()),
            ..Default::default()
        },
    )
    .unwrap();
}

fn open(g: &BlockGraph, name: &str, path: &Path) -> Arc<BlockNode> {
    let o = BlockdevOptions::from_json(&json!({
        "driver": "qcow2", "node-name": name,
        "file": {"driver": "file", "filename": path.display().to_string()}
    }))
    .unwrap();
    g.blockdev_add(&o).unwrap()
}

fn backup(
    g: &Arc<BlockGraph>,
    jobs: &JobManager,
    src: &Arc<BlockNode>,
    tgt: &Arc<BlockNode>,
    sync: SyncMode,
    bitmap: Option<&str>,
) {
    let mut p = BackupParams::new("j", src.clone(), tgt.clone(), sync);
    p.bitmap = bitmap.map(|b| (src.bitmap(b).unwrap(), Some(BitmapMode::OnSuccess)));
    let job = create_backup(g, jobs, p).unwrap();
    jobs.start(&job, false).unwrap();
    job.wait_concluded();
    assert!(job.error().is_none(), "{:?}", job.error());
}

fn snapshot(src: &BlockNode, path: &Path) {
    let mut v = vec![0u8; SIZE as usize];
    src.read(&mut v, 0).unwrap();
    std::fs::write(path, v).unwrap();
}

#[test]
fn full_plus_three_incrementals_layer_back_to_each_point() {
    if let Err(why) = qemu::available() {
        eprintln!("SKIP: {why}");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    create(&d.join("src.qcow2"), None);
    let g = Arc::new(BlockGraph::new());
    let jobs = JobManager::new(Arc::new(NoEvents));
    let src = open(&g, "src", &d.join("src.qcow2"));
    src.write(&vec![0x10u8; 8 << 20], 0).unwrap();

    // Anchor: the bitmap and the full backup start at the same point.
    g.bitmap_add("src", "inc", None, false, false).unwrap();
    create(&d.join("full.qcow2"), None);
    let full = open(&g, "full", &d.join("full.qcow2"));
    snapshot(&src, &d.join("point0.raw"));
    backup(&g, &jobs, &src, &full, SyncMode::Full, None);
    let mut prev = "full.qcow2".to_string();
    for k in 1..=3u8 {
        // Writes between backups, some overlapping earlier ones.
        for i in 0..20u64 {
            let off = ((i * 7 + k as u64 * 13) % 480) * 65536 + (k as u64) * 4096;
            src.write(&vec![0x20 + k; 10_000], off).unwrap();
        }
        let name = format!("inc{k}.qcow2");
        create(&d.join(&name), Some(&prev));
        let inc = open(&g, &format!("inc{k}"), &d.join(&name));
        snapshot(&src, &d.join(format!("point{k}.raw")));
        let dirty = src.bitmap("inc").unwrap().count();
        assert!(dirty > 0 && dirty < SIZE);
        backup(&g, &jobs, &src, &inc, SyncMode::Incremental, Some("inc"));
        assert_eq!(
            src.bitmap("inc").unwrap().count(),
            0,
            "bitmap synced on success"
        );
        prev = name;
    }
    assert!(g.close_all().is_empty());
    qemu::compare_with_raw(&d.join("full.qcow2"), "qcow2", &d.join("point0.raw"));
    for k in 1..=3 {
        let img = d.join(format!("inc{k}.qcow2"));
        qemu::check(&img).ok();
        qemu::compare_with_raw(&img, "qcow2", &d.join(format!("point{k}.raw")));
    }
}
