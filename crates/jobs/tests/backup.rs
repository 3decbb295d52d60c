//! Backup tests over real qcow2 files: a backup taken while a writer keeps
//! overwriting the source equals the source at the instant the job started.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};
use strata_block::{BlockGraph, BlockNode, BlockdevOptions};
use strata_image::{create_image, CreateOptions, Format};
use strata_jobs::backup::{create_backup, BackupParams, BitmapMode, OnCbwError, Perf, SyncMode};
use strata_jobs::{EventSink, JobManager, JobOptions, JobStatus, OnError};

const SIZE: u64 = 16 << 20;
const BLOCK: u64 = 4096;

#[derive(Default)]
struct Events(Mutex<Vec<(String, Value)>>);
impl EventSink for Events {
    fn emit(&self, name: &str, data: Value) {
        self.0.lock().unwrap().push((name.into(), data));
    }
}

fn image(dir: &std::path::Path, name: &str) -> String {
    let p = dir.join(name);
    create_image(
        &p,
        Format::Qcow2,
        &CreateOptions {
            size: Some(SIZE),
            ..Default::default()
        },
    )
    .unwrap();
    p.display().to_string()
}

fn node(g: &BlockGraph, name: &str, file: &str) -> Arc<BlockNode> {
    let o = BlockdevOptions::from_json(
        &json!({"driver": "qcow2", "node-name": name, "file": {"driver": "file", "filename": file}}),
    )
    .unwrap();
    g.blockdev_add(&o).unwrap()
}

/// A 4 KiB block stamped with its offset and a generation number.
fn stamp(off: u64, gen: u64) -> Vec<u8> {
    let mut b = vec![0u8; BLOCK as usize];
    for (i, chunk) in b.chunks_mut(16).enumerate() {
        chunk[..8].copy_from_slice(&off.to_le_bytes());
        chunk[8..].copy_from_slice(&(gen ^ i as u64).to_le_bytes());
    }
    b
}

fn params(
    source: Arc<BlockNode>,
    target: Arc<BlockNode>,
    sync: SyncMode,
    speed: u64,
) -> BackupParams {
    BackupParams {
        job_id: "job0".into(),
        source,
        target,
        target_owned: false,
        sync,
        bitmap: None,
        bitmap_mode_without_bitmap: false,
        compress: false,
        on_source_error: OnError::Report,
        on_target_error: OnError::Report,
        filter_node_name: None,
        discard_source: false,
        perf: Perf::default(),
        on_cbw_error: OnCbwError::BreakGuestWrite,
        cbw_timeout: 0,
        job: JobOptions {
            speed,
            ..Default::default()
        },
    }
}

fn read_all(n: &BlockNode) -> Vec<u8> {
    let mut v = vec![0u8; n.size() as usize];
    n.read(&mut v, 0).unwrap();
    v
}

#[test]
fn point_in_time_under_concurrent_writes() {
    let dir = tempfile::tempdir().unwrap();
    let g = Arc::new(BlockGraph::new());
    let src = node(&g, "src", &image(dir.path(), "src.qcow2"));
    let tgt = node(&g, "tgt", &image(dir.path(), "tgt.qcow2"));
    // Generation 0 everywhere except a hole in the middle (must stay sparse/zero).
    for off in (0..SIZE).step_by(BLOCK as usize) {
        if !(4 << 20..5 << 20).contains(&off) {
            src.write(&stamp(off, 0), off).unwrap();
        }
    }
    let before = read_all(&src);
    let events = Arc::new(Events::default());
    let jobs = JobManager::new(events.clone());
    // 8 MiB/s: the background copy takes about two seconds while the writer runs.
    let job = create_backup(
        &g,
        &jobs,
        params(src.clone(), tgt.clone(), SyncMode::Full, 8 << 20),
    )
    .unwrap();
    jobs.start(&job, true).unwrap();
    job.end_drain();
    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (0..3u64)
        .map(|t| {
            let src = src.clone();
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut gen = 1 + t * 1_000_000;
                let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ t;
                while !stop.load(Ordering::Relaxed) {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let off = (x % (SIZE / BLOCK)) * BLOCK;
                    src.write(&stamp(off, gen), off).unwrap();
                    gen += 1;
                    std::thread::sleep(Duration::from_micros(200));
                }
            })
        })
        .collect();
    let t0 = std::time::Instant::now();
    job.wait_concluded();
    let took = t0.elapsed();
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.join().unwrap();
    }
    assert!(job.error().is_none(), "{:?}", job.error());
    let got = read_all(&tgt);
    let first_diff = got.iter().zip(&before).position(|(a, b)| a != b);
    assert!(
        first_diff.is_none(),
        "target differs from the start state at {first_diff:?}"
    );
    assert!(
        read_all(&src) != before,
        "the writers did change the source"
    );
    let _ = took;
    // The hole was written as zeroes, not data: the target stays sparse there.
    let st = tgt.io().block_status(4 << 20, 1 << 20).unwrap();
    assert!(st.zero || !st.allocated, "{st:?}");
    let names: Vec<String> = events
        .0
        .lock()
        .unwrap()
        .iter()
        .map(|e| e.0.clone())
        .collect();
    assert!(names.contains(&"BLOCK_JOB_COMPLETED".to_string()));
    assert!(
        g.node("tgt").is_some() && g.nodes().len() == 4,
        "filter node removed"
    );
    assert!(g.close_all().is_empty());
}

#[test]
fn speed_limits_background_copy_and_set_speed_wakes_it() {
    let dir = tempfile::tempdir().unwrap();
    let g = Arc::new(BlockGraph::new());
    let src = node(&g, "src", &image(dir.path(), "src.qcow2"));
    let tgt = node(&g, "tgt", &image(dir.path(), "tgt.qcow2"));
    src.write(&vec![1u8; SIZE as usize], 0).unwrap();
    let jobs = JobManager::new(Arc::new(Events::default()));
    // 16 MiB at 4 MiB/s would take about four seconds.
    let job = create_backup(
        &g,
        &jobs,
        params(src.clone(), tgt.clone(), SyncMode::Full, 4 << 20),
    )
    .unwrap();
    let t0 = std::time::Instant::now();
    jobs.start(&job, false).unwrap();
    std::thread::sleep(Duration::from_millis(600));
    let info = jobs.query_block_jobs();
    let offset = info[0]["offset"].as_u64().unwrap();
    assert!(
        offset > 0 && offset <= 5 << 20,
        "offset {offset} after 0.6 s at 4 MiB/s"
    );
    assert_eq!(info[0]["len"], SIZE);
    // Unlimited from now on: the sleeping job wakes at once and finishes quickly.
    job.set_speed(0).unwrap();
    job.wait_concluded();
    assert!(t0.elapsed() < Duration::from_secs(3), "{:?}", t0.elapsed());
    assert_eq!(read_all(&tgt), read_all(&src));
    assert!(g.close_all().is_empty());
}

#[test]
fn sync_none_fleecing_and_cancel() {
    let dir = tempfile::tempdir().unwrap();
    let g = Arc::new(BlockGraph::new());
    let src = node(&g, "src", &image(dir.path(), "src.qcow2"));
    let tgt = node(&g, "tgt", &image(dir.path(), "tgt.qcow2"));
    src.write(&stamp(0, 0), 0).unwrap();
    let jobs = JobManager::new(Arc::new(Events::default()));
    let job = create_backup(
        &g,
        &jobs,
        params(src.clone(), tgt.clone(), SyncMode::None, 0),
    )
    .unwrap();
    jobs.start(&job, false).unwrap();
    src.write(&stamp(0, 7), 0).unwrap();
    // The old block reached the target before the write; untouched areas were not copied.
    let mut b = vec![0u8; BLOCK as usize];
    tgt.read(&mut b, 0).unwrap();
    assert_eq!(b, stamp(0, 0));
    assert!(!tgt.io().block_status(1 << 20, 4096).unwrap().allocated);
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(job.status(), JobStatus::Running);
    job.cancel().unwrap();
    job.wait_concluded();
    assert!(g.close_all().is_empty());
}

#[test]
fn incremental_with_bitmap() {
    let dir = tempfile::tempdir().unwrap();
    let g = Arc::new(BlockGraph::new());
    let src = node(&g, "src", &image(dir.path(), "src.qcow2"));
    let tgt = node(&g, "tgt", &image(dir.path(), "tgt.qcow2"));
    g.bitmap_add("src", "b0", None, false, false).unwrap();
    src.write(&stamp(1 << 20, 1), 1 << 20).unwrap();
    src.write(&stamp(9 << 20, 1), 9 << 20).unwrap();
    let b = src.bitmap("b0").unwrap();
    assert_eq!(b.count(), 2 * 65536);
    let jobs = JobManager::new(Arc::new(Events::default()));
    let mut p = params(src.clone(), tgt.clone(), SyncMode::Incremental, 0);
    p.bitmap = Some((b.clone(), Some(BitmapMode::OnSuccess)));
    let job = create_backup(&g, &jobs, p).unwrap();
    assert!(b.busy());
    jobs.start(&job, false).unwrap();
    job.wait_concluded();
    assert!(job.error().is_none());
    // Only the two dirty clusters were copied; the bitmap was cleared on success.
    assert!(tgt.io().block_status(1 << 20, 4096).unwrap().allocated);
    assert!(!tgt.io().block_status(2 << 20, 4096).unwrap().allocated);
    assert_eq!(b.count(), 0);
    assert!(!b.busy());
    assert_eq!(src.bitmaps().len(), 1, "successor removed");
    assert!(g.close_all().is_empty());
}

#[test]
fn validation_messages() {
    let dir = tempfile::tempdir().unwrap();
    let g = Arc::new(BlockGraph::new());
    let src = node(&g, "src", &image(dir.path(), "src.qcow2"));
    let jobs = JobManager::new(Arc::new(Events::default()));
    let e = create_backup(
        &g,
        &jobs,
        params(src.clone(), src.clone(), SyncMode::Full, 0),
    )
    .err()
    .unwrap();
    assert_eq!(e, "Source and target cannot be the same");
    let tgt = node(&g, "tgt", &image(dir.path(), "tgt.qcow2"));
    let e = create_backup(
        &g,
        &jobs,
        params(src.clone(), tgt.clone(), SyncMode::Incremental, 0),
    )
    .err()
    .unwrap();
    assert_eq!(
        e,
        "must provide a valid bitmap name for 'incremental' sync mode"
    );
    g.block_resize(None, "tgt", (SIZE * 2) as i64).unwrap();
    let e = create_backup(&g, &jobs, params(src, tgt, SyncMode::Full, 0))
        .err()
        .unwrap();
    assert_eq!(e, "Source and target image have different sizes");
}
