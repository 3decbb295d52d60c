//! Job lifecycle tests: the event sequences QEMU produces for success, manual
//! finalize and dismiss, cancel, failure, pause/resume, and verb refusals.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;

use crate::job::*;

#[derive(Default)]
struct Recorder(Mutex<Vec<(String, Value)>>);

impl EventSink for Recorder {
    fn emit(&self, name: &str, data: Value) {
        self.0.lock().unwrap().push((name.to_string(), data));
    }
}

impl Recorder {
    fn names(&self) -> Vec<String> {
        self.0
            .lock()
            .unwrap()
            .iter()
            .map(|(n, d)| match n.as_str() {
                "JOB_STATUS_CHANGE" => d["status"].as_str().unwrap().to_string(),
                other => other.to_string(),
            })
            .collect()
    }
}

struct Steps {
    steps: u32,
    fail: bool,
    done: AtomicU32,
}

impl JobDriver for Steps {
    fn job_type(&self) -> &'static str {
        "backup"
    }
    fn run(&self, ctx: &JobContext) -> Result<(), String> {
        ctx.set_total(self.steps as u64 * 10);
        for _ in 0..self.steps {
            if !ctx.sleep(Duration::from_millis(5)) {
                return Ok(());
            }
            ctx.add_done(10);
            self.done.fetch_add(1, Ordering::SeqCst);
        }
        if self.fail {
            Err("Input/output error".into())
        } else {
            Ok(())
        }
    }
}

fn setup(steps: u32, fail: bool, opts: JobOptions) -> (Arc<Recorder>, JobManager, Arc<Job>) {
    let rec = Arc::new(Recorder::default());
    let m = JobManager::new(rec.clone());
    let j = m
        .create(
            "j0",
            Arc::new(Steps {
                steps,
                fail,
                done: AtomicU32::new(0),
            }),
            opts,
        )
        .unwrap();
    (rec, m, j)
}

#[test]
fn success_with_drained_start() {
    let (rec, m, j) = setup(3, false, JobOptions::default());
    m.start(&j, true).unwrap();
    std::thread::sleep(Duration::from_millis(30));
    j.end_drain();
    j.wait_concluded();
    std::thread::sleep(Duration::from_millis(10));
    assert_eq!(
        rec.names(),
        [
            "created",
            "running",
            "paused",
            "running",
            "waiting",
            "pending",
            "BLOCK_JOB_COMPLETED",
            "concluded",
            "null"
        ]
    );
    let ev = rec.0.lock().unwrap();
    let done = ev.iter().find(|(n, _)| n == "BLOCK_JOB_COMPLETED").unwrap();
    assert_eq!(done.1["len"], 30);
    assert_eq!(done.1["offset"], 30);
    assert!(m.find("j0").is_none());
}

#[test]
fn manual_finalize_and_dismiss() {
    let (rec, m, j) = setup(
        2,
        false,
        JobOptions {
            auto_finalize: false,
            auto_dismiss: false,
            speed: 0,
        },
    );
    m.start(&j, false).unwrap();
    while j.status() != JobStatus::Pending {
        std::thread::sleep(Duration::from_millis(2));
    }
    assert_eq!(
        j.dismiss().unwrap_err().0,
        "Job 'j0' in state 'pending' cannot accept command verb 'dismiss'"
    );
    j.finalize().unwrap();
    assert_eq!(j.status(), JobStatus::Concluded);
    assert_eq!(m.query_jobs()[0]["status"], "concluded");
    j.dismiss().unwrap();
    assert_eq!(
        rec.names(),
        [
            "created",
            "running",
            "waiting",
            "pending",
            "BLOCK_JOB_PENDING",
            "BLOCK_JOB_COMPLETED",
            "concluded",
            "null"
        ]
    );
    assert!(m.jobs().is_empty());
}

#[test]
fn cancel_and_failure() {
    let (rec, m, j) = setup(1000, false, JobOptions::default());
    m.start(&j, false).unwrap();
    std::thread::sleep(Duration::from_millis(20));
    j.cancel().unwrap();
    j.wait_concluded();
    std::thread::sleep(Duration::from_millis(10));
    assert_eq!(
        rec.names(),
        [
            "created",
            "running",
            "aborting",
            "BLOCK_JOB_CANCELLED",
            "concluded",
            "null"
        ]
    );

    let (rec, m, j) = setup(1, true, JobOptions::default());
    m.start(&j, false).unwrap();
    j.wait_concluded();
    std::thread::sleep(Duration::from_millis(10));
    assert_eq!(
        rec.names(),
        [
            "created",
            "running",
            "aborting",
            "BLOCK_JOB_COMPLETED",
            "concluded",
            "null"
        ]
    );
    let ev = rec.0.lock().unwrap();
    assert_eq!(ev[3].1["error"], "Input/output error");
}

#[test]
fn pause_resume_and_verbs() {
    let (rec, m, j) = setup(1000, false, JobOptions::default());
    m.start(&j, false).unwrap();
    std::thread::sleep(Duration::from_millis(10));
    j.pause().unwrap();
    assert_eq!(j.pause().unwrap_err().0, "Job is already paused");
    while j.status() != JobStatus::Paused {
        std::thread::sleep(Duration::from_millis(2));
    }
    let info = m.query_block_jobs();
    assert_eq!(info[0]["paused"], true);
    assert_eq!(info[0]["status"], "paused");
    let off = info[0]["offset"].clone();
    std::thread::sleep(Duration::from_millis(30));
    assert_eq!(m.query_block_jobs()[0]["offset"], off);
    assert_eq!(
        j.finalize().unwrap_err().0,
        "Job 'j0' in state 'paused' cannot accept command verb 'finalize'"
    );
    j.resume().unwrap();
    assert_eq!(
        j.resume().unwrap_err().0,
        "Can't resume a job that was not paused"
    );
    j.set_speed(1 << 20).unwrap();
    assert_eq!(m.query_block_jobs()[0]["speed"], 1 << 20);
    j.cancel().unwrap();
    j.wait_concluded();
    let names = rec.names();
    assert!(names.starts_with(&[
        "created".into(),
        "running".into(),
        "paused".into(),
        "running".into()
    ]));
}

#[test]
fn id_rules() {
    let m = JobManager::new(Arc::new(NoEvents));
    let d = || {
        Arc::new(Steps {
            steps: 1,
            fail: false,
            done: AtomicU32::new(0),
        })
    };
    assert_eq!(
        m.create("", d(), JobOptions::default()).err().unwrap().0,
        "Invalid job ID ''"
    );
    m.create("a", d(), JobOptions::default()).unwrap();
    assert_eq!(
        m.create("a", d(), JobOptions::default()).err().unwrap().0,
        "Job ID 'a' already in use"
    );
}
