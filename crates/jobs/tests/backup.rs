//! Backup tests over real qcow2 files: a backup taken while a writer keeps
//! overwriting the source equals the source at the instant the job started.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};
use strata_block::{BlockGraph, BlockNode, BlockdevOptions};
use strata_image::{create_image, CreateOptions, Format};
use strata_jobs::backup::{create_backup, BackupParams, BitmapMode, OnCbwError, SyncMode};
use strata_jobs::{EventSink, JobManager, JobStatus, OnError};

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
    let mut p = BackupParams::new("job0", source, target, sync);
    p.job.speed = speed;
    p
}

fn read_all(n: &BlockNode) -> Vec<u8> {
    let mut v = vec![0u8; n.size() as usize];
    n.read(&mut v, 0).unwrap();
    v
}

fn raw_image(dir: &std::path::Path, name: &str) -> String {
    let p = dir.join(name);
    create_image(
        &p,
        Format::Raw,
        &CreateOptions {
            size: Some(SIZE),
            ..Default::default()
        },
    )
    .unwrap();
    p.display().to_string()
}

fn raw_node(g: &BlockGraph, name: &str, file: &str) -> Arc<BlockNode> {
    let o = BlockdevOptions::from_json(
        &json!({"driver": "raw", "node-name": name, "file": {"driver": "file", "filename": file}}),
    )
    .unwrap();
    g.blockdev_add(&o).unwrap()
}

#[test]
fn point_in_time_under_concurrent_writes() {
    point_in_time("qcow2", "qcow2");
}

#[test]
fn point_in_time_raw_source_and_target() {
    point_in_time("raw", "raw");
    point_in_time("raw", "qcow2");
}

fn point_in_time(src_fmt: &str, tgt_fmt: &str) {
    let dir = tempfile::tempdir().unwrap();
    let g = Arc::new(BlockGraph::new());
    let open = |name: &str, fmt: &str| {
        if fmt == "raw" {
            raw_node(&g, name, &raw_image(dir.path(), &format!("{name}.raw")))
        } else {
            node(&g, name, &image(dir.path(), &format!("{name}.qcow2")))
        }
    };
    let src = open("src", src_fmt);
    let tgt = open("tgt", tgt_fmt);
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
    // Negative control: a plain copy read while the same writes go on.
    let plain = read_all(&src);
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
    assert!(
        plain != before,
        "the negative control (a plain copy during the writes) must fail the same check"
    );
    let _ = took;
    // The hole was written as zeroes, not data: the target stays sparse there.
    if tgt_fmt == "qcow2" {
        let st = tgt.io().block_status(4 << 20, 1 << 20).unwrap();
        assert!(st.zero || !st.allocated, "{st:?}");
    }
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

/// A guest write to a cluster the job has already copied must not wait for the job:
/// at speed=1 the first chunk is copied and the job then sleeps in the rate limiter
/// for ever; a write inside that chunk used to wait for the sleeping job to end the
/// chunk's claim (found by the `qmp_session` fuzz target).
#[test]
fn guest_write_does_not_wait_for_a_rate_limited_job() {
    let dir = tempfile::tempdir().unwrap();
    let g = Arc::new(BlockGraph::new());
    let src = node(&g, "src", &image(dir.path(), "src.qcow2"));
    let tgt = node(&g, "tgt", &image(dir.path(), "tgt.qcow2"));
    src.write(&vec![1u8; 4 << 20], 0).unwrap();
    let jobs = JobManager::new(Arc::new(Events::default()));
    let job = create_backup(
        &g,
        &jobs,
        params(src.clone(), tgt.clone(), SyncMode::Full, 1),
    )
    .unwrap();
    jobs.start(&job, false).unwrap();
    // The first chunk (1 MiB) is copied at once; the next one waits "for ever".
    std::thread::sleep(Duration::from_millis(300));
    let (tx, rx) = std::sync::mpsc::channel();
    let writer = {
        let src = src.clone();
        std::thread::spawn(move || {
            src.write(&[2u8; 4096], 64 << 10).unwrap();
            let _ = tx.send(());
        })
    };
    let done = rx.recv_timeout(Duration::from_secs(5));
    job.cancel().unwrap();
    job.wait_concluded();
    writer.join().unwrap();
    assert!(
        done.is_ok(),
        "a guest write to an already copied cluster waited for the rate-limited job"
    );
    // The target holds the old data there (copied before the write).
    let mut b = vec![0u8; 4096];
    tgt.read(&mut b, 64 << 10).unwrap();
    assert_eq!(b, vec![1u8; 4096]);
    assert!(g.close_all().is_empty());
}

#[test]
fn guest_write_does_not_wait_for_a_rate_limited_job_after_a_failed_copy() {
    let dir = tempfile::tempdir().unwrap();
    let g = Arc::new(BlockGraph::new());
    // The job's first copy fails; the guest write's own copy then succeeds.
    let (src, tgt) = source_and_failing_target(
        &g,
        dir.path(),
        1,
        4 << 20,
        json!({"event": "write_aio", "errno": 5, "once": true}),
    );
    let jobs = JobManager::new(Arc::new(Events::default()));
    let mut p = params(src.clone(), tgt.clone(), SyncMode::Full, 1);
    p.on_target_error = OnError::Ignore;
    let job = create_backup(&g, &jobs, p).unwrap();
    jobs.start(&job, false).unwrap();
    // The first chunk's copy fails at once; the job then sleeps "for ever".
    std::thread::sleep(Duration::from_millis(300));
    let (tx, rx) = std::sync::mpsc::channel();
    let writer = {
        let src = src.clone();
        std::thread::spawn(move || {
            let r = src.write(&[2u8; 4096], 64 << 10);
            let _ = tx.send(r.is_ok());
        })
    };
    let done = rx.recv_timeout(Duration::from_secs(5));
    job.cancel().unwrap();
    job.wait_concluded();
    writer.join().unwrap();
    assert_eq!(
        done,
        Ok(true),
        "a guest write to a cluster whose copy failed waited for the rate-limited job"
    );
    let mut b = vec![0u8; 4096];
    tgt.read(&mut b, 64 << 10).unwrap();
    assert_eq!(b, vec![1u8; 4096], "the old data reached the target first");
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

fn blkdebug(g: &BlockGraph, name: &str, child: &str, rule: Value) -> Arc<BlockNode> {
    let o = BlockdevOptions::from_json(
        &json!({"driver": "blkdebug", "node-name": name, "image": child, "inject-error": [rule]}),
    )
    .unwrap();
    g.blockdev_add(&o).unwrap()
}

/// A source node `src` holding `fill` bytes of `byte`, and a target `tgt`: blkdebug
/// injecting `rule` over a qcow2 node `tqcow`.
fn source_and_failing_target(
    g: &BlockGraph,
    dir: &std::path::Path,
    byte: u8,
    fill: usize,
    rule: Value,
) -> (Arc<BlockNode>, Arc<BlockNode>) {
    let src = node(g, "src", &image(dir, "src.qcow2"));
    src.write(&vec![byte; fill], 0).unwrap();
    node(g, "tqcow", &image(dir, "tgt.qcow2"));
    (src, blkdebug(g, "tgt", "tqcow", rule))
}

fn event_names(e: &Events) -> Vec<String> {
    e.0.lock()
        .unwrap()
        .iter()
        .map(|(n, d)| match n.as_str() {
            "JOB_STATUS_CHANGE" => d["status"].as_str().unwrap().to_string(),
            "BLOCK_JOB_ERROR" => format!(
                "ERROR:{}:{}",
                d["operation"].as_str().unwrap(),
                d["action"].as_str().unwrap()
            ),
            other => other.to_string(),
        })
        .collect()
}

#[test]
fn source_read_error_policies() {
    for (policy, expect_ok) in [("report", false), ("ignore", true), ("stop", true)] {
        let dir = tempfile::tempdir().unwrap();
        let g = Arc::new(BlockGraph::new());
        let raw = node(&g, "raw", &image(dir.path(), "src.qcow2"));
        raw.write(&vec![3u8; SIZE as usize], 0).unwrap();
        let src = blkdebug(
            &g,
            "src",
            "raw",
            json!({"event": "read_aio", "errno": 5, "once": true, "sector": 2048}),
        );
        let tgt = node(&g, "tgt", &image(dir.path(), "tgt.qcow2"));
        let events = Arc::new(Events::default());
        let jobs = JobManager::new(events.clone());
        let mut p = params(src.clone(), tgt.clone(), SyncMode::Full, 0);
        p.on_source_error = OnError::parse(policy).unwrap();
        let job = create_backup(&g, &jobs, p).unwrap();
        jobs.start(&job, false).unwrap();
        if policy == "stop" {
            while job.status() != JobStatus::Paused {
                std::thread::sleep(Duration::from_millis(5));
            }
            let info = jobs.query_block_jobs();
            assert_eq!(info[0]["io-status"], "failed");
            job.resume().unwrap();
        }
        job.wait_concluded();
        let names = event_names(&events);
        let action = if policy == "report" { "report" } else { policy };
        assert!(
            names.contains(&format!("ERROR:read:{action}")),
            "{policy}: {names:?}"
        );
        assert_eq!(
            job.error().is_none(),
            expect_ok,
            "{policy}: {:?}",
            job.error()
        );
        if expect_ok {
            assert_eq!(
                read_all(&tgt),
                read_all(&raw),
                "{policy}: retried copy is complete"
            );
        } else {
            assert_eq!(job.error().unwrap(), "Input/output error");
        }
        assert!(g.close_all().is_empty());
    }
}

#[test]
fn target_enospc_pauses_with_enospc_policy() {
    let dir = tempfile::tempdir().unwrap();
    let g = Arc::new(BlockGraph::new());
    let (src, tgt) = source_and_failing_target(
        &g,
        dir.path(),
        9,
        SIZE as usize,
        json!({"event": "write_aio", "errno": 28, "once": true}),
    );
    let events = Arc::new(Events::default());
    let jobs = JobManager::new(events.clone());
    let mut p = params(src.clone(), tgt.clone(), SyncMode::Full, 0);
    p.on_target_error = OnError::Enospc;
    let job = create_backup(&g, &jobs, p).unwrap();
    jobs.start(&job, false).unwrap();
    while job.status() != JobStatus::Paused {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(jobs.query_block_jobs()[0]["io-status"], "nospace");
    job.resume().unwrap();
    job.wait_concluded();
    assert!(job.error().is_none(), "{:?}", job.error());
    assert!(event_names(&events).contains(&"ERROR:write:stop".to_string()));
    assert_eq!(read_all(&tgt), read_all(&src));
    assert!(g.close_all().is_empty());
}

#[test]
fn guest_write_fails_or_breaks_snapshot_when_cbw_fails() {
    for mode in [OnCbwError::BreakGuestWrite, OnCbwError::BreakSnapshot] {
        let dir = tempfile::tempdir().unwrap();
        let g = Arc::new(BlockGraph::new());
        let (src, tgt) = source_and_failing_target(
            &g,
            dir.path(),
            1,
            SIZE as usize,
            json!({"event": "write_aio", "errno": 5}),
        );
        let jobs = JobManager::new(Arc::new(Events::default()));
        let mut p = params(src.clone(), tgt.clone(), SyncMode::None, 0);
        p.on_cbw_error = mode;
        let job = create_backup(&g, &jobs, p).unwrap();
        jobs.start(&job, false).unwrap();
        let r = src.write(&[2u8; 4096], 0);
        match mode {
            OnCbwError::BreakGuestWrite => {
                assert!(
                    r.is_err(),
                    "the guest write must fail while the old data cannot be saved"
                );
                let mut b = [0u8; 4096];
                src.read(&mut b, 0).unwrap();
                assert_eq!(b, [1u8; 4096], "the source is unchanged");
                job.cancel().unwrap();
            }
            OnCbwError::BreakSnapshot => {
                assert!(r.is_ok(), "the guest write goes through");
                job.cancel().unwrap();
            }
        }
        job.wait_concluded();
        assert!(g.close_all().is_empty());
    }
}

fn image_with_backing(dir: &std::path::Path, name: &str, backing: &str) -> String {
    let p = dir.join(name);
    create_image(
        &p,
        Format::Qcow2,
        &CreateOptions {
            size: Some(SIZE),
            backing_file: Some(backing.into()),
            backing_fmt: Some("qcow2".into()),
            ..Default::default()
        },
    )
    .unwrap();
    p.display().to_string()
}

#[test]
fn sync_top_copies_only_the_top_layer() {
    let dir = tempfile::tempdir().unwrap();
    let base_path = image(dir.path(), "base.qcow2");
    {
        let g = BlockGraph::new();
        let base = node(&g, "base", &base_path);
        base.write(&vec![5u8; SIZE as usize], 0).unwrap();
        assert!(g.close_all().is_empty());
    }
    let g = Arc::new(BlockGraph::new());
    let top = node(
        &g,
        "top",
        &image_with_backing(dir.path(), "top.qcow2", "base.qcow2"),
    );
    top.write(&[6u8; 65536], 3 << 20).unwrap();
    let tgt = node(
        &g,
        "tgt",
        &image_with_backing(dir.path(), "tgt.qcow2", "base.qcow2"),
    );
    let jobs = JobManager::new(Arc::new(Events::default()));
    let job = create_backup(
        &g,
        &jobs,
        params(top.clone(), tgt.clone(), SyncMode::Top, 0),
    )
    .unwrap();
    jobs.start(&job, false).unwrap();
    job.wait_concluded();
    assert!(job.error().is_none());
    assert!(tgt.io().block_status(3 << 20, 65536).unwrap().allocated);
    assert!(
        !tgt.io().block_status(0, 65536).unwrap().allocated,
        "base data not copied"
    );
    assert_eq!(read_all(&tgt), read_all(&top));
    assert!(g.close_all().is_empty());
}

#[test]
fn compressed_backup_and_discard_source() {
    let dir = tempfile::tempdir().unwrap();
    let g = Arc::new(BlockGraph::new());
    let src = node(&g, "src", &image(dir.path(), "src.qcow2"));
    let data: Vec<u8> = (0..SIZE).map(|i| (i / 1000) as u8).collect();
    src.write(&data, 0).unwrap();
    let tgt = node(&g, "tgt", &image(dir.path(), "tgt.qcow2"));
    let jobs = JobManager::new(Arc::new(Events::default()));
    let mut p = params(src.clone(), tgt.clone(), SyncMode::Full, 0);
    p.compress = true;
    p.discard_source = true;
    let job = create_backup(&g, &jobs, p).unwrap();
    jobs.start(&job, false).unwrap();
    job.wait_concluded();
    assert!(job.error().is_none(), "{:?}", job.error());
    assert!(tgt.io().block_status(0, 65536).unwrap().compressed);
    assert_eq!(read_all(&tgt), data);
    // The source's clusters were discarded once copied.
    assert!(read_all(&src).iter().all(|&b| b == 0));
    assert!(g.close_all().is_empty());
}

#[test]
fn cancel_at_every_stage_leaves_source_and_graph_clean() {
    for stage in ["created", "running", "paused", "pending"] {
        let dir = tempfile::tempdir().unwrap();
        let g = Arc::new(BlockGraph::new());
        let src = node(&g, "src", &image(dir.path(), "src.qcow2"));
        src.write(&vec![4u8; SIZE as usize], 0).unwrap();
        let before = read_all(&src);
        let tgt = node(&g, "tgt", &image(dir.path(), "tgt.qcow2"));
        let events = Arc::new(Events::default());
        let jobs = JobManager::new(events.clone());
        let mut p = params(src.clone(), tgt.clone(), SyncMode::Full, 1 << 20);
        p.job.auto_finalize = stage != "pending";
        if stage == "pending" {
            p.job.speed = 0;
        }
        let job = create_backup(&g, &jobs, p).unwrap();
        let filters = |g: &BlockGraph| {
            g.nodes()
                .iter()
                .filter(|n| n.driver() == "copy-before-write")
                .count()
        };
        assert_eq!(filters(&g), 1, "{stage}: filter node present");
        match stage {
            "created" => job.discard(),
            "running" => {
                jobs.start(&job, false).unwrap();
                std::thread::sleep(Duration::from_millis(50));
                job.cancel().unwrap();
            }
            "paused" => {
                jobs.start(&job, false).unwrap();
                job.pause().unwrap();
                while job.status() != JobStatus::Paused {
                    std::thread::sleep(Duration::from_millis(2));
                }
                job.cancel().unwrap();
            }
            _ => {
                jobs.start(&job, false).unwrap();
                while job.status() != JobStatus::Pending {
                    std::thread::sleep(Duration::from_millis(2));
                }
                job.cancel().unwrap();
            }
        }
        if stage != "created" {
            job.wait_concluded();
            assert!(
                event_names(&events).contains(&"BLOCK_JOB_CANCELLED".to_string()),
                "{stage}: {:?}",
                event_names(&events)
            );
        }
        assert_eq!(job.status(), JobStatus::Null, "{stage}");
        assert_eq!(filters(&g), 0, "{stage}: the filter is gone");
        // Writes no longer pass a hook, and the source is what it was.
        src.write(&[1u8; 512], 0).unwrap();
        src.write(&[4u8; 512], 0).unwrap();
        assert_eq!(read_all(&src), before, "{stage}");
        assert!(g.close_all().is_empty());
    }
}
