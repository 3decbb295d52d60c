//! Point in time for `sync=top` under concurrent writes.
//!
//! The source is a qcow2 `top` over a qcow2 `base`: the base is full of stamped data,
//! the top has every third 64 KiB cluster allocated with newer stamps. A rate-limited
//! `sync=top` backup runs into a target whose backing is the source's backing node (as
//! `drive-backup` sets it up) while writer threads keep stamping 4 KiB blocks of both
//! kinds: clusters allocated in the top and clusters that still read from the base.
//! The target, read through its backing, must equal the disk at the moment the job
//! started, byte for byte: checked through Strata's graph and, independently, with
//! `qemu-img compare` against a raw copy of that moment. Clusters that were neither
//! allocated in the top at the start nor written during the job must stay unallocated in
//! the target (only the top layer is copied).
//!
//! Negative control: a copy of the top layer taken the naive way during the same writes
//! (each cluster the top has allocated when the copy reaches it, into a target with the
//! same backing) must fail both checks.

use std::collections::HashSet;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::json;
use strata_block::{BlockGraph, BlockNode, BlockdevOptions};
use strata_image::{create_image, CreateOptions, Format};
use strata_jobs::backup::{create_backup, BackupParams, SyncMode};
use strata_jobs::{JobManager, NoEvents};
use strata_tests::{qemu, s};

const SIZE: u64 = 16 << 20;
const CLUSTER: u64 = 64 << 10;
const BLOCK: u64 = 4096;
/// The writers stamp clusters below this one.
const WRITTEN_CLUSTERS: u64 = SIZE / CLUSTER * 3 / 4;

/// A 4 KiB block stamped with its offset and a generation number.
fn stamp(off: u64, gen: u64) -> Vec<u8> {
    let mut b = vec![0u8; BLOCK as usize];
    for (i, chunk) in b.chunks_mut(16).enumerate() {
        chunk[..8].copy_from_slice(&off.to_le_bytes());
        chunk[8..].copy_from_slice(&(gen ^ i as u64).to_le_bytes());
    }
    b
}

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

/// Opens a qcow2 node; `backing`: a node name, JSON null for none, or absent.
fn open(
    g: &BlockGraph,
    name: &str,
    path: &Path,
    backing: Option<serde_json::Value>,
) -> Arc<BlockNode> {
    let mut o = json!({
        "driver": "qcow2", "node-name": name,
        "file": {"driver": "file", "filename": s(path)}
    });
    if let Some(b) = backing {
        o["backing"] = b;
    }
    g.blockdev_add(&BlockdevOptions::from_json(&o).unwrap())
        .unwrap()
}

fn read_all(n: &BlockNode) -> Vec<u8> {
    let mut v = vec![0u8; SIZE as usize];
    n.read(&mut v, 0).unwrap();
    v
}

/// Whether the top has cluster `c` allocated at the start.
fn allocated_at_start(c: u64) -> bool {
    c % 3 == 0
}

/// Where the first difference is, if any.
fn first_diff(a: &[u8], b: &[u8]) -> Option<usize> {
    a.iter().zip(b).position(|(x, y)| x != y)
}

#[test]
fn sync_top_backup_is_the_point_in_time_under_concurrent_writes() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    create(&d.join("base.qcow2"), None);
    create(&d.join("top.qcow2"), Some("base.qcow2"));
    create(&d.join("tgt.qcow2"), Some("base.qcow2"));
    create(&d.join("ctl.qcow2"), Some("base.qcow2"));

    let g = Arc::new(BlockGraph::new());
    let base = open(&g, "base", &d.join("base.qcow2"), Some(json!(null)));
    for off in (0..SIZE).step_by(BLOCK as usize) {
        base.write(&stamp(off, 0), off).unwrap();
    }
    let top = open(&g, "top", &d.join("top.qcow2"), Some(json!("base")));
    for c in (0..SIZE / CLUSTER).filter(|&c| allocated_at_start(c)) {
        for off in (c * CLUSTER..(c + 1) * CLUSTER).step_by(BLOCK as usize) {
            top.write(&stamp(off, 1), off).unwrap();
        }
    }
    // The target's backing is the source's backing node, as drive-backup sets it up.
    let tgt = open(&g, "tgt", &d.join("tgt.qcow2"), Some(json!("base")));
    let ctl = open(&g, "ctl", &d.join("ctl.qcow2"), Some(json!("base")));
    let before = read_all(&top);
    std::fs::write(d.join("before.raw"), &before).unwrap();

    let jobs = JobManager::new(Arc::new(NoEvents));
    let mut p = BackupParams::new("top", top.clone(), tgt.clone(), SyncMode::Top);
    // About 5.3 MiB to copy at 4 MiB/s: the writers run for over a second of it.
    p.job.speed = 4 << 20;
    let job = create_backup(&g, &jobs, p).unwrap();
    jobs.start(&job, true).unwrap();
    job.end_drain();

    let stop = Arc::new(AtomicBool::new(false));
    let written = Arc::new(Mutex::new(HashSet::new()));
    let writers: Vec<_> = (0..2u64)
        .map(|t| {
            let (top, stop, written) = (top.clone(), stop.clone(), written.clone());
            std::thread::spawn(move || {
                let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ (t + 1);
                let mut gen = 2 + t * 1_000_000;
                let (mut to_alloc, mut to_unalloc) = (0u64, 0u64);
                while !stop.load(Ordering::Relaxed) {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    // Alternate: a cluster allocated in the top, then one that is not,
                    // in the first three quarters of the disk (the rest stays untouched).
                    let mut c = (x >> 8) % WRITTEN_CLUSTERS;
                    let want_alloc = gen % 2 == 0;
                    while allocated_at_start(c) != want_alloc {
                        c = (c + 1) % WRITTEN_CLUSTERS;
                    }
                    let off = c * CLUSTER + (x % (CLUSTER / BLOCK)) * BLOCK;
                    top.write(&stamp(off, gen), off).unwrap();
                    written.lock().unwrap().insert(c);
                    if want_alloc {
                        to_alloc += 1;
                    } else {
                        to_unalloc += 1;
                    }
                    gen += 1;
                    std::thread::sleep(Duration::from_micros(300));
                }
                (to_alloc, to_unalloc)
            })
        })
        .collect();

    // Negative control, during the same writes: copy what the top has allocated when
    // the copy gets there, without copy-before-write.
    std::thread::sleep(Duration::from_millis(100));
    let mut buf = vec![0u8; CLUSTER as usize];
    for c in 0..SIZE / CLUSTER {
        let off = c * CLUSTER;
        if top.io().block_status(off, CLUSTER).unwrap().allocated {
            top.read(&mut buf, off).unwrap();
            ctl.write(&buf, off).unwrap();
        }
        std::thread::sleep(Duration::from_millis(2));
    }

    job.wait_concluded();
    stop.store(true, Ordering::Relaxed);
    let (mut to_alloc, mut to_unalloc) = (0, 0);
    for w in writers {
        let (a, u) = w.join().unwrap();
        to_alloc += a;
        to_unalloc += u;
    }
    assert!(job.error().is_none(), "{:?}", job.error());
    assert!(
        to_alloc > 20 && to_unalloc > 20,
        "the writers hit too few clusters during the job: {to_alloc} allocated, {to_unalloc} unallocated"
    );
    let written = written.lock().unwrap().clone();

    // The claim: the target (through its backing) is the disk at the job's start.
    let got = read_all(&tgt);
    assert!(
        first_diff(&got, &before).is_none(),
        "sync=top target differs from the disk at the job's start at byte {:?}",
        first_diff(&got, &before)
    );
    // Only the top layer was copied: clusters that read from the base at the start and
    // were not written during the job are still unallocated in the target.
    let mut untouched = 0;
    for c in (0..SIZE / CLUSTER).filter(|c| !allocated_at_start(*c) && !written.contains(c)) {
        let st = tgt.io().block_status(c * CLUSTER, CLUSTER).unwrap();
        assert!(!st.allocated, "cluster {c} copied from the base: {st:?}");
        untouched += 1;
    }
    assert!(untouched > 0, "every unallocated cluster was written");
    for c in (0..SIZE / CLUSTER).filter(|c| allocated_at_start(*c)) {
        let st = tgt.io().block_status(c * CLUSTER, CLUSTER).unwrap();
        assert!(st.allocated, "top cluster {c} is not in the target: {st:?}");
    }
    assert!(read_all(&top) != before, "the writers changed the source");
    let ctl_data = read_all(&ctl);
    assert!(
        first_diff(&ctl_data, &before).is_some(),
        "the negative control (a naive copy during the writes) must fail the same check"
    );
    assert!(g.close_all().is_empty());

    // The same checks by QEMU, reading each image through its backing file.
    if let Err(why) = qemu::available() {
        eprintln!("SKIP the qemu-img half: {why}");
        return;
    }
    qemu::check(&d.join("tgt.qcow2")).ok();
    qemu::compare_with_raw(&d.join("tgt.qcow2"), "qcow2", &d.join("before.raw"));
    let out = qemu::img(&[
        "compare",
        "-f",
        "qcow2",
        "-F",
        "raw",
        s(&d.join("ctl.qcow2")),
        s(&d.join("before.raw")),
    ]);
    assert_eq!(
        out.code, 1,
        "qemu-img compare must find the negative control different: {}{}",
        out.stdout, out.stderr
    );
}
