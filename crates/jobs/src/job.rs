//! QEMU's job model: statuses, the transition and verb tables, the job lifecycle with
//! its events, user and internal pauses, cancellation, speed, progress and error
//! actions. A job's work is a [`JobDriver`] run on its own thread; the driver calls
//! back into its [`JobContext`] at pause points.

use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::ratelimit::RateLimit;

/// A job status (`JobStatus` in QEMU's schema).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobStatus {
    /// Not yet set up.
    Undefined,
    /// Created, not started.
    Created,
    /// Working.
    Running,
    /// Paused by a user or internally.
    Paused,
    /// Ready to complete (mirror-like jobs).
    Ready,
    /// Paused while ready.
    Standby,
    /// Work done, waiting for the other jobs of its transaction.
    Waiting,
    /// Waiting to be finalized.
    Pending,
    /// Failing or being cancelled.
    Aborting,
    /// Finished, waiting to be dismissed.
    Concluded,
    /// Gone.
    Null,
}

impl JobStatus {
    /// The name on the wire.
    pub fn name(self) -> &'static str {
        match self {
            JobStatus::Undefined => "undefined",
            JobStatus::Created => "created",
            JobStatus::Running => "running",
            JobStatus::Paused => "paused",
            JobStatus::Ready => "ready",
            JobStatus::Standby => "standby",
            JobStatus::Waiting => "waiting",
            JobStatus::Pending => "pending",
            JobStatus::Aborting => "aborting",
            JobStatus::Concluded => "concluded",
            JobStatus::Null => "null",
        }
    }

    /// Whether QEMU's transition table allows going from `self` to `to`.
    pub fn can_transition(self, to: JobStatus) -> bool {
        use JobStatus::*;
        matches!(
            (self, to),
            (Undefined, Created)
                | (Created, Running | Aborting | Null)
                | (Running, Paused | Ready | Waiting | Aborting)
                | (Paused, Running)
                | (Ready, Standby | Waiting | Aborting)
                | (Standby, Ready)
                | (Waiting, Pending | Aborting)
                | (Pending, Aborting | Concluded)
                | (Aborting, Aborting | Concluded)
                | (Concluded, Null)
        )
    }
}

/// A user command on a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verb {
    /// cancel
    Cancel,
    /// pause
    Pause,
    /// resume
    Resume,
    /// set-speed
    SetSpeed,
    /// change
    Change,
    /// complete
    Complete,
    /// finalize
    Finalize,
    /// dismiss
    Dismiss,
}

impl Verb {
    /// The name in QEMU's messages.
    pub fn name(self) -> &'static str {
        match self {
            Verb::Cancel => "cancel",
            Verb::Pause => "pause",
            Verb::Resume => "resume",
            Verb::SetSpeed => "set-speed",
            Verb::Change => "change",
            Verb::Complete => "complete",
            Verb::Finalize => "finalize",
            Verb::Dismiss => "dismiss",
        }
    }

    /// Whether QEMU's verb table allows this verb in `s`.
    pub fn allowed_in(self, s: JobStatus) -> bool {
        use JobStatus::*;
        match self {
            Verb::Cancel => matches!(
                s,
                Created | Running | Paused | Ready | Standby | Waiting | Pending
            ),
            Verb::Pause | Verb::Resume | Verb::SetSpeed | Verb::Change => {
                matches!(s, Created | Running | Paused | Ready | Standby)
            }
            Verb::Complete => matches!(s, Ready | Standby),
            Verb::Finalize => s == Pending,
            Verb::Dismiss => s == Concluded,
        }
    }
}

/// What to do about an I/O error in a job (`BlockdevOnError`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnError {
    /// Fail the job.
    #[default]
    Report,
    /// Report the error event and retry.
    Ignore,
    /// Pause on ENOSPC, fail otherwise.
    Enospc,
    /// Pause the job.
    Stop,
    /// Like enospc for jobs.
    Auto,
}

impl OnError {
    /// Parses QEMU's names.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "report" => OnError::Report,
            "ignore" => OnError::Ignore,
            "enospc" => OnError::Enospc,
            "stop" => OnError::Stop,
            "auto" => OnError::Auto,
            _ => return None,
        })
    }
}

/// What an error policy decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorAction {
    /// Fail.
    Report,
    /// Retry now.
    Ignore,
    /// The job was paused; retry after it resumes.
    Stop,
}

/// Where job events go (the QMP monitors).
pub trait EventSink: Send + Sync {
    /// Emits an event with its data.
    fn emit(&self, name: &str, data: Value);
}

/// An event sink that drops everything.
pub struct NoEvents;

impl EventSink for NoEvents {
    fn emit(&self, _name: &str, _data: Value) {}
}

/// The work of a job.
pub trait JobDriver: Send + Sync {
    /// The job type on the wire ("backup", ...).
    fn job_type(&self) -> &'static str;
    /// Does the work; returns an error message on failure. Must call
    /// [`JobContext::pause_point`] regularly and stop when cancelled.
    fn run(&self, ctx: &JobContext) -> Result<(), String>;
    /// Last check before commit; an error turns the job into a failure.
    fn prepare(&self) -> Result<(), String> {
        Ok(())
    }
    /// Makes a successful job's result final.
    fn commit(&self) {}
    /// Undoes what a failed or cancelled job must not leave behind.
    fn abort(&self) {}
    /// Releases resources (always called once at the end).
    fn clean(&self) {}
    /// Called when the job is cancelled, to interrupt waits in the driver.
    fn cancel_requested(&self) {}
    /// Called when the speed changes.
    fn speed_changed(&self, _speed: u64) {}
}

/// What a job's driver calls go to once the real driver was released at null.
struct Finished(&'static str);

impl JobDriver for Finished {
    fn job_type(&self) -> &'static str {
        self.0
    }
    fn run(&self, _ctx: &JobContext) -> Result<(), String> {
        Ok(())
    }
}

/// `io-status` of a block job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoStatus {
    /// No error.
    Ok,
    /// Stopped on an error.
    Failed,
    /// Stopped on ENOSPC.
    Nospace,
}

#[derive(Debug)]
struct State {
    status: JobStatus,
    pause_count: u32,
    user_paused: bool,
    drained: bool,
    cancelled: bool,
    busy: bool,
    ratelimit: RateLimit,
    current: u64,
    total: u64,
    error: Option<String>,
    io_status: IoStatus,
    finalize_requested: bool,
    kick: u64,
    resumes: u64,
}

/// A job.
pub struct Job {
    id: String,
    job_type: &'static str,
    /// Dropped when the job reaches null, so that the nodes it used are free.
    driver_slot: Mutex<Option<Arc<dyn JobDriver>>>,
    auto_finalize: bool,
    auto_dismiss: bool,
    state: Mutex<State>,
    cv: Condvar,
    events: Arc<dyn EventSink>,
}

/// Creation options common to all jobs.
#[derive(Debug, Clone, Copy)]
pub struct JobOptions {
    /// Finalize without `job-finalize`.
    pub auto_finalize: bool,
    /// Dismiss without `job-dismiss`.
    pub auto_dismiss: bool,
    /// Initial speed in bytes/s.
    pub speed: u64,
}

impl Default for JobOptions {
    fn default() -> Self {
        JobOptions {
            auto_finalize: true,
            auto_dismiss: true,
            speed: 0,
        }
    }
}

/// An error from a job command: a GenericError text (the QMP layer picks the class).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct JobError(pub String);

/// Checks a job id with QEMU's rules (`id_wellformed`).
pub fn id_wellformed(id: &str) -> bool {
    let mut c = id.chars();
    matches!(c.next(), Some(x) if x.is_ascii_alphabetic())
        && c.all(|x| x.is_ascii_alphanumeric() || matches!(x, '-' | '.' | '_'))
}

impl Job {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The job id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The current status.
    pub fn status(&self) -> JobStatus {
        self.lock().status
    }

    /// The failure message, if the job failed.
    pub fn error(&self) -> Option<String> {
        self.lock().error.clone()
    }

    fn transition(&self, st: &mut State, to: JobStatus) {
        if !st.status.can_transition(to) {
            tracing::error!(
                "job {}: illegal transition {} -> {}",
                self.id,
                st.status.name(),
                to.name()
            );
        }
        st.status = to;
        if to == JobStatus::Null {
            // Release the driver (and the nodes it holds) before anyone hears
            // that the job is gone.
            let _ = self
                .driver_slot
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take();
        }
        self.events.emit(
            "JOB_STATUS_CHANGE",
            json!({"id": self.id, "status": to.name()}),
        );
        self.cv.notify_all();
    }

    /// The job's driver; a no-op stand-in once the job has reached null.
    fn driver(&self) -> Arc<dyn JobDriver> {
        self.driver_slot
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .unwrap_or_else(|| Arc::new(Finished(self.job_type)))
    }

    fn check_verb(&self, st: &State, verb: Verb) -> Result<(), JobError> {
        if verb.allowed_in(st.status) {
            Ok(())
        } else {
            Err(JobError(format!(
                "Job '{}' in state '{}' cannot accept command verb '{}'",
                self.id,
                st.status.name(),
                verb.name()
            )))
        }
    }

    fn block_event_data(&self, st: &State) -> Value {
        json!({
            "type": self.job_type,
            "device": self.id,
            "len": st.total,
            "offset": st.current,
            "speed": st.ratelimit.speed(),
        })
    }

    /// `BlockJobInfo` for `query-block-jobs`.
    pub fn block_job_info(&self) -> Value {
        let st = self.lock();
        let mut v = json!({
            "type": self.job_type,
            "device": self.id,
            "len": st.total,
            "offset": st.current,
            "busy": st.busy,
            "paused": st.pause_count > 0,
            "speed": st.ratelimit.speed(),
            "io-status": match st.io_status {
                IoStatus::Ok => "ok",
                IoStatus::Failed => "failed",
                IoStatus::Nospace => "nospace",
            },
            "ready": matches!(st.status, JobStatus::Ready | JobStatus::Standby),
            "status": st.status.name(),
            "auto-finalize": self.auto_finalize,
            "auto-dismiss": self.auto_dismiss,
        });
        if let Some(e) = &st.error {
            v["error"] = json!(e);
        }
        v
    }

    /// `JobInfo` for `query-jobs`.
    pub fn job_info(&self) -> Value {
        let st = self.lock();
        let mut v = json!({
            "id": self.id,
            "type": self.job_type,
            "status": st.status.name(),
            "current-progress": st.current,
            "total-progress": st.total,
        });
        if let Some(e) = &st.error {
            v["error"] = json!(e);
        }
        v
    }

    /// `pause`.
    pub fn pause(&self) -> Result<(), JobError> {
        let mut st = self.lock();
        self.check_verb(&st, Verb::Pause)?;
        if st.user_paused {
            return Err(JobError("Job is already paused".into()));
        }
        st.user_paused = true;
        st.pause_count += 1;
        st.kick += 1;
        self.cv.notify_all();
        Ok(())
    }

    /// `resume`.
    pub fn resume(&self) -> Result<(), JobError> {
        let mut st = self.lock();
        // QEMU checks this before the verb table.
        if !st.user_paused {
            return Err(JobError("Can't resume a job that was not paused".into()));
        }
        self.check_verb(&st, Verb::Resume)?;
        st.user_paused = false;
        st.pause_count -= 1;
        st.io_status = IoStatus::Ok;
        self.cv.notify_all();
        Ok(())
    }

    /// Whether a user paused the job.
    pub fn user_paused(&self) -> bool {
        self.lock().user_paused
    }

    /// `cancel` (always forced for backup).
    pub fn cancel(&self) -> Result<(), JobError> {
        let mut st = self.lock();
        self.check_verb(&st, Verb::Cancel)?;
        if st.cancelled {
            return Ok(());
        }
        st.cancelled = true;
        st.user_paused = false;
        st.pause_count = 0;
        st.kick += 1;
        drop(st);
        self.driver().cancel_requested();
        self.cv.notify_all();
        Ok(())
    }

    /// `set-speed`.
    pub fn set_speed(&self, speed: u64) -> Result<(), JobError> {
        let mut st = self.lock();
        self.check_verb(&st, Verb::SetSpeed)?;
        st.ratelimit.set_speed(speed);
        st.kick += 1;
        drop(st);
        self.driver().speed_changed(speed);
        self.cv.notify_all();
        Ok(())
    }

    /// `complete` (no job type here ever becomes ready, so this only checks the verb).
    pub fn complete(&self) -> Result<(), JobError> {
        let st = self.lock();
        self.check_verb(&st, Verb::Complete)?;
        Err(JobError(format!(
            "The active block job '{}' cannot be completed",
            self.id
        )))
    }

    /// `finalize`: runs the job's finalization and returns when it has concluded.
    pub fn finalize(&self) -> Result<(), JobError> {
        let mut st = self.lock();
        self.check_verb(&st, Verb::Finalize)?;
        st.finalize_requested = true;
        self.cv.notify_all();
        while !matches!(st.status, JobStatus::Concluded | JobStatus::Null) {
            st = self.cv.wait(st).unwrap_or_else(|e| e.into_inner());
        }
        Ok(())
    }

    /// `dismiss`: a concluded job goes to null.
    pub fn dismiss(&self) -> Result<(), JobError> {
        let mut st = self.lock();
        self.check_verb(&st, Verb::Dismiss)?;
        self.transition(&mut st, JobStatus::Null);
        Ok(())
    }

    /// Drops a job that was created but never started (a transaction that failed):
    /// its driver undoes its setup and the job goes from created to null.
    pub fn discard(&self) {
        let mut st = self.lock();
        if st.status != JobStatus::Created {
            return;
        }
        drop(st);
        self.driver().abort();
        self.driver().clean();
        st = self.lock();
        self.transition(&mut st, JobStatus::Null);
    }

    /// Cancels a job that was created but never started (a transaction that
    /// aborted): QEMU takes it through aborting and concluded to null, with no
    /// BLOCK_JOB_CANCELLED.
    pub fn cancel_unstarted(&self) {
        let mut st = self.lock();
        if st.status != JobStatus::Created {
            return;
        }
        st.cancelled = true;
        self.transition(&mut st, JobStatus::Aborting);
        drop(st);
        self.driver().abort();
        self.driver().clean();
        st = self.lock();
        self.transition(&mut st, JobStatus::Concluded);
        self.transition(&mut st, JobStatus::Null);
    }

    /// Ends the drained section a job was started in: waits until the job has
    /// paused at its first pause point, releases it, and waits until it runs again,
    /// so that the events come in QEMU's order before the starting command returns.
    pub fn end_drain(&self) {
        let mut st = self.lock();
        if !st.drained {
            return;
        }
        while st.status != JobStatus::Paused && !st.cancelled && st.status != JobStatus::Null {
            st = self.cv.wait(st).unwrap_or_else(|e| e.into_inner());
        }
        st.drained = false;
        st.pause_count -= 1;
        self.cv.notify_all();
        while st.status == JobStatus::Paused && st.pause_count == 0 && !st.cancelled {
            st = self.cv.wait(st).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Sets the progress total (known at creation for backups).
    pub fn set_total(&self, total: u64) {
        self.lock().total = total;
    }

    /// Waits until the job reaches `Concluded` or `Null`.
    pub fn wait_concluded(&self) {
        let mut st = self.lock();
        while !matches!(st.status, JobStatus::Concluded | JobStatus::Null) {
            st = self.cv.wait(st).unwrap_or_else(|e| e.into_inner());
        }
    }

    fn thread_main(self: &Arc<Self>) {
        let ctx = JobContext { job: self.clone() };
        {
            let mut st = self.lock();
            st.busy = true;
            self.transition(&mut st, JobStatus::Running);
        }
        ctx.pause_point();
        let result = if ctx.is_cancelled() {
            Ok(())
        } else {
            self.driver().run(&ctx)
        };
        let mut st = self.lock();
        st.busy = false;
        let outcome = if st.cancelled {
            Outcome::Cancelled
        } else {
            match result {
                Ok(()) => {
                    self.transition(&mut st, JobStatus::Waiting);
                    self.transition(&mut st, JobStatus::Pending);
                    if !self.auto_finalize {
                        self.events.emit(
                            "BLOCK_JOB_PENDING",
                            json!({"type": self.job_type, "id": self.id}),
                        );
                        while !st.finalize_requested && !st.cancelled {
                            st = self.cv.wait(st).unwrap_or_else(|e| e.into_inner());
                        }
                    }
                    if st.cancelled {
                        Outcome::Cancelled
                    } else {
                        drop(st);
                        let p = self.driver().prepare();
                        st = self.lock();
                        match p {
                            Ok(()) => Outcome::Success,
                            Err(e) => Outcome::Failed(e),
                        }
                    }
                }
                Err(e) => Outcome::Failed(e),
            }
        };
        match &outcome {
            Outcome::Success => {}
            Outcome::Cancelled => self.transition(&mut st, JobStatus::Aborting),
            Outcome::Failed(e) => {
                st.error = Some(e.clone());
                self.transition(&mut st, JobStatus::Aborting);
            }
        }
        drop(st);
        match &outcome {
            Outcome::Success => self.driver().commit(),
            _ => self.driver().abort(),
        }
        self.driver().clean();
        let mut st = self.lock();
        let mut data = self.block_event_data(&st);
        match &outcome {
            Outcome::Cancelled => self.events.emit("BLOCK_JOB_CANCELLED", data),
            Outcome::Success => self.events.emit("BLOCK_JOB_COMPLETED", data),
            Outcome::Failed(e) => {
                data["error"] = json!(e);
                self.events.emit("BLOCK_JOB_COMPLETED", data);
            }
        }
        self.transition(&mut st, JobStatus::Concluded);
        if self.auto_dismiss {
            self.transition(&mut st, JobStatus::Null);
        }
    }
}

enum Outcome {
    Success,
    Cancelled,
    Failed(String),
}

/// What a running driver uses to cooperate with its job.
pub struct JobContext {
    job: Arc<Job>,
}

impl JobContext {
    /// The job id.
    pub fn id(&self) -> &str {
        &self.job.id
    }

    /// Whether the job was cancelled.
    pub fn is_cancelled(&self) -> bool {
        self.job.lock().cancelled
    }

    /// Blocks while the job is paused (switching its status to paused and back);
    /// returns false when the job was cancelled.
    pub fn pause_point(&self) -> bool {
        let job = &self.job;
        let mut st = job.lock();
        if st.pause_count > 0 && !st.cancelled {
            let ready = st.status == JobStatus::Ready;
            st.busy = false;
            job.transition(
                &mut st,
                if ready {
                    JobStatus::Standby
                } else {
                    JobStatus::Paused
                },
            );
            while st.pause_count > 0 && !st.cancelled {
                st = job.cv.wait(st).unwrap_or_else(|e| e.into_inner());
            }
            st.resumes += 1;
            st.busy = true;
            job.transition(
                &mut st,
                if ready {
                    JobStatus::Ready
                } else {
                    JobStatus::Running
                },
            );
        }
        !st.cancelled
    }

    /// Sleeps up to `d`, waking early on cancel, pause, or a speed change; then
    /// honours a pause. Returns false when cancelled.
    pub fn sleep(&self, d: Duration) -> bool {
        let job = &self.job;
        let deadline = Instant::now() + d;
        let mut st = job.lock();
        let kick = st.kick;
        st.busy = false;
        while !st.cancelled && st.kick == kick && st.pause_count == 0 {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            st = job
                .cv
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        st.busy = true;
        drop(st);
        self.pause_point()
    }

    /// Waits until the job is cancelled, honouring pauses (sync=none backups).
    pub fn wait_cancelled(&self) {
        loop {
            if !self.pause_point() {
                return;
            }
            let job = &self.job;
            let mut st = job.lock();
            st.busy = false;
            while !st.cancelled && st.pause_count == 0 {
                st = job.cv.wait(st).unwrap_or_else(|e| e.into_inner());
            }
            st.busy = true;
            if st.cancelled {
                return;
            }
        }
    }

    /// Accounts `bytes` with the rate limiter; returns how long to wait first.
    pub fn rate_delay(&self, bytes: u64) -> Duration {
        self.job.lock().ratelimit.calculate_delay(bytes)
    }

    /// Sets the total amount of work.
    pub fn set_total(&self, total: u64) {
        self.job.lock().total = total;
    }

    /// Adds to the total amount of work.
    pub fn add_total(&self, n: u64) {
        self.job.lock().total += n;
    }

    /// How many times the job has come back from a pause. Work started before the
    /// latest resume may fail for reasons the user has since fixed.
    pub fn resumes(&self) -> u64 {
        self.job.lock().resumes
    }

    /// Progress done so far.
    pub fn done(&self) -> u64 {
        self.job.lock().current
    }

    /// A handle that records progress from other threads (copy-before-write).
    pub fn progress_handle(&self) -> ProgressHandle {
        ProgressHandle {
            job: Arc::downgrade(&self.job),
        }
    }

    /// Records progress.
    pub fn add_done(&self, n: u64) {
        let mut st = self.job.lock();
        st.current += n;
        if st.current > st.total {
            st.total = st.current;
        }
    }

    /// Applies an error policy to an I/O error: emits `BLOCK_JOB_ERROR` and, for
    /// `stop`, pauses the job with its io-status set.
    pub fn error_action(&self, policy: OnError, is_read: bool, enospc: bool) -> ErrorAction {
        let action = match policy {
            OnError::Report => ErrorAction::Report,
            OnError::Ignore => ErrorAction::Ignore,
            OnError::Stop => ErrorAction::Stop,
            OnError::Enospc | OnError::Auto => {
                if enospc {
                    ErrorAction::Stop
                } else {
                    ErrorAction::Report
                }
            }
        };
        let job = &self.job;
        job.events.emit(
            "BLOCK_JOB_ERROR",
            json!({
                "device": job.id,
                "operation": if is_read { "read" } else { "write" },
                "action": match action {
                    ErrorAction::Report => "report",
                    ErrorAction::Ignore => "ignore",
                    ErrorAction::Stop => "stop",
                },
            }),
        );
        if action == ErrorAction::Stop {
            let mut st = job.lock();
            st.io_status = if enospc {
                IoStatus::Nospace
            } else {
                IoStatus::Failed
            };
            if !st.user_paused {
                st.user_paused = true;
                st.pause_count += 1;
            }
        }
        action
    }
}

/// Records a job's progress from any thread.
///
/// It refers to the job weakly: the job's own driver keeps one (for copies made by
/// guest writes), and a strong reference would make a cycle that outlives the job
/// manager when a concluded job is never dismissed.
#[derive(Clone)]
pub struct ProgressHandle {
    job: Weak<Job>,
}

impl ProgressHandle {
    /// Records `n` more bytes done (nothing once the job is gone).
    pub fn add_done(&self, n: u64) {
        let Some(job) = self.job.upgrade() else {
            return;
        };
        let mut st = job.lock();
        st.current += n;
        if st.current > st.total {
            st.total = st.current;
        }
    }
}

/// All jobs of a process.
pub struct JobManager {
    jobs: Mutex<Vec<Arc<Job>>>,
    events: Arc<dyn EventSink>,
}

impl JobManager {
    /// A manager that emits events to `events`.
    pub fn new(events: Arc<dyn EventSink>) -> Self {
        JobManager {
            jobs: Mutex::new(Vec::new()),
            events,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Vec<Arc<Job>>> {
        self.jobs.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The job with this id (gone once it reaches null).
    pub fn find(&self, id: &str) -> Option<Arc<Job>> {
        self.lock()
            .iter()
            .find(|j| j.id == id && j.status() != JobStatus::Null)
            .cloned()
    }

    /// Every live job.
    pub fn jobs(&self) -> Vec<Arc<Job>> {
        let mut v = self.lock();
        v.retain(|j| j.status() != JobStatus::Null);
        v.clone()
    }

    /// Creates a job (status created) with QEMU's id checks; `start` runs it.
    pub fn create(
        &self,
        id: &str,
        driver: Arc<dyn JobDriver>,
        opts: JobOptions,
    ) -> Result<Arc<Job>, JobError> {
        if !id_wellformed(id) {
            return Err(JobError(format!("Invalid job ID '{id}'")));
        }
        if self.find(id).is_some() {
            return Err(JobError(format!("Job ID '{id}' already in use")));
        }
        let job = Arc::new(Job {
            id: id.to_string(),
            job_type: driver.job_type(),
            driver_slot: Mutex::new(Some(driver)),
            auto_finalize: opts.auto_finalize,
            auto_dismiss: opts.auto_dismiss,
            state: Mutex::new(State {
                status: JobStatus::Undefined,
                pause_count: 0,
                user_paused: false,
                drained: false,
                cancelled: false,
                busy: false,
                ratelimit: RateLimit::new(opts.speed),
                current: 0,
                total: 0,
                error: None,
                io_status: IoStatus::Ok,
                finalize_requested: false,
                kick: 0,
                resumes: 0,
            }),
            cv: Condvar::new(),
            events: self.events.clone(),
        });
        {
            let mut st = job.lock();
            job.transition(&mut st, JobStatus::Created);
        }
        self.lock().push(job.clone());
        Ok(job)
    }

    /// Starts a created job on its own thread. With `drained`, the job starts inside
    /// a drained section and pauses at its first pause point until
    /// [`Job::end_drain`].
    pub fn start(&self, job: &Arc<Job>, drained: bool) -> Result<(), JobError> {
        if drained {
            let mut st = job.lock();
            st.drained = true;
            st.pause_count += 1;
        }
        let j = job.clone();
        std::thread::Builder::new()
            .name(format!("job-{}", job.id))
            .spawn(move || j.thread_main())
            .map(|_| ())
            .map_err(|e| JobError(format!("Could not start job thread: {e}")))
    }

    /// Cancels every job and waits for them (process shutdown).
    pub fn cancel_all(&self) {
        let jobs = self.jobs();
        for j in &jobs {
            let _ = j.cancel();
            j.end_drain();
        }
        for j in &jobs {
            let st = j.status();
            if !matches!(st, JobStatus::Created | JobStatus::Undefined) {
                j.wait_concluded();
            }
        }
    }

    /// `query-block-jobs`.
    pub fn query_block_jobs(&self) -> Value {
        Value::Array(self.jobs().iter().map(|j| j.block_job_info()).collect())
    }

    /// `query-jobs`.
    pub fn query_jobs(&self) -> Value {
        Value::Array(self.jobs().iter().map(|j| j.job_info()).collect())
    }
}
