//! The backup job (`drive-backup` / `blockdev-backup`): validation with QEMU's
//! messages, the copy-before-write hook and filter node, the background copy with
//! parallel workers, rate limiting, zero detection and error policies, and the
//! bitmap synchronisation of incremental backups.

mod cbw;
mod copy;

use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use strata_block::{BeforeWrite, BlockGraph, BlockNode, DirtyBitmap, NodeSettings};

pub use cbw::{CbwFilter, CbwHook, OnCbwError};
pub use copy::{BlockCopy, CopyError};

use crate::job::{ErrorAction, Job, JobContext, JobDriver, JobManager, JobOptions, OnError};

/// Default job cluster size.
pub const DEFAULT_CLUSTER: u64 = 64 << 10;
/// Default copy chunk for read/write copies.
pub const MAX_BUFFER: u64 = 1 << 20;
/// Threads actually copying at once (tasks in flight are bounded by `max-workers`).
const MAX_THREADS: u64 = 8;

/// `MirrorSyncMode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncMode {
    /// The whole disk.
    Full,
    /// What the top layer allocates.
    Top,
    /// Only what the guest overwrites (fleecing); runs until cancelled.
    None,
    /// The clusters of a bitmap, synchronised on success.
    Incremental,
    /// The clusters of a bitmap.
    Bitmap,
}

impl SyncMode {
    /// Parses QEMU's names.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "full" => SyncMode::Full,
            "top" => SyncMode::Top,
            "none" => SyncMode::None,
            "incremental" => SyncMode::Incremental,
            "bitmap" => SyncMode::Bitmap,
            _ => return None,
        })
    }

    /// QEMU's name.
    pub fn name(self) -> &'static str {
        match self {
            SyncMode::Full => "full",
            SyncMode::Top => "top",
            SyncMode::None => "none",
            SyncMode::Incremental => "incremental",
            SyncMode::Bitmap => "bitmap",
        }
    }
}

/// `BitmapSyncMode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BitmapMode {
    /// Synchronise the bitmap only when the job succeeds.
    OnSuccess,
    /// Never touch the bitmap's contents.
    Never,
    /// Synchronise even on failure (uncopied bits stay).
    Always,
}

impl BitmapMode {
    /// Parses QEMU's names.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "on-success" => BitmapMode::OnSuccess,
            "never" => BitmapMode::Never,
            "always" => BitmapMode::Always,
            _ => return None,
        })
    }

    /// QEMU's name.
    pub fn name(self) -> &'static str {
        match self {
            BitmapMode::OnSuccess => "on-success",
            BitmapMode::Never => "never",
            BitmapMode::Always => "always",
        }
    }
}

/// `BackupPerf` (`x-perf`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Perf {
    /// Copy tasks in flight at once (default 64).
    pub max_workers: i64,
    /// Largest copy task in bytes (0 = no limit).
    pub max_chunk: i64,
    /// Smallest job cluster size (0 = none).
    pub min_cluster_size: u64,
}

impl Default for Perf {
    fn default() -> Self {
        Perf {
            max_workers: 64,
            max_chunk: 0,
            min_cluster_size: 0,
        }
    }
}

/// Everything a backup job needs, resolved by the QMP layer.
pub struct BackupParams {
    /// Job id.
    pub job_id: String,
    /// The node to copy.
    pub source: Arc<BlockNode>,
    /// The node to copy to.
    pub target: Arc<BlockNode>,
    /// The job created the target (drive-backup): close it at the end.
    pub target_owned: bool,
    /// Sync mode.
    pub sync: SyncMode,
    /// The user bitmap and its mode.
    pub bitmap: Option<(Arc<DirtyBitmap>, Option<BitmapMode>)>,
    /// A bitmap mode given without a bitmap (an error, reported in QEMU's words).
    pub bitmap_mode_without_bitmap: bool,
    /// Compressed writes to the target.
    pub compress: bool,
    /// Policy for source read errors.
    pub on_source_error: OnError,
    /// Policy for target write errors.
    pub on_target_error: OnError,
    /// Name of the filter node (auto-generated when absent).
    pub filter_node_name: Option<String>,
    /// Discard source clusters once copied.
    pub discard_source: bool,
    /// Performance knobs.
    pub perf: Perf,
    /// Copy-before-write failure policy.
    pub on_cbw_error: OnCbwError,
    /// Copy-before-write timeout in seconds (0 = none).
    pub cbw_timeout: u32,
    /// Job options.
    pub job: JobOptions,
}

impl BackupParams {
    /// A backup of `source` to an existing `target` with QEMU's defaults for every
    /// optional member (no bitmap, errors reported, no speed limit, auto-finalize and
    /// auto-dismiss); set fields to change them.
    pub fn new(
        job_id: impl Into<String>,
        source: Arc<BlockNode>,
        target: Arc<BlockNode>,
        sync: SyncMode,
    ) -> Self {
        BackupParams {
            job_id: job_id.into(),
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
            job: JobOptions::default(),
        }
    }
}

/// Checks a backup request with QEMU's messages (`do_backup_common` and
/// `backup_job_create`); returns the job cluster size.
pub fn validate(p: &BackupParams) -> Result<u64, String> {
    let sync = p.sync;
    match (&p.bitmap, sync) {
        (None, SyncMode::Bitmap | SyncMode::Incremental) => {
            return Err(format!(
                "must provide a valid bitmap name for '{}' sync mode",
                sync.name()
            ))
        }
        (Some((_, None)), _) if sync != SyncMode::Incremental => {
            return Err("Bitmap sync mode must be given when providing a bitmap".into())
        }
        (Some((_, Some(m))), SyncMode::Incremental) if *m != BitmapMode::OnSuccess => {
            return Err(format!(
                "Bitmap sync mode must be '{}' when using sync mode '{}'",
                BitmapMode::OnSuccess.name(),
                sync.name()
            ))
        }
        (Some(_), SyncMode::None) => {
            return Err("sync mode 'none' does not produce meaningful bitmap outputs".into())
        }
        (Some((_, Some(BitmapMode::Never))), s) if s != SyncMode::Bitmap => {
            return Err(format!(
                "Bitmap sync mode '{}' has no meaningful effect when combined with sync mode '{}'",
                BitmapMode::Never.name(),
                s.name()
            ))
        }
        _ => {}
    }
    if p.bitmap_mode_without_bitmap {
        return Err("Cannot specify bitmap sync mode without a bitmap".into());
    }
    if let Some((b, _)) = &p.bitmap {
        let name = b.name().unwrap_or_default();
        if b.busy() {
            return Err(format!(
                "Bitmap '{name}' is currently in use by another operation and cannot be used"
            ));
        }
        if b.inconsistent() {
            return Err(format!(
                "Bitmap '{name}' is inconsistent and cannot be used"
            ));
        }
    }
    if Arc::ptr_eq(&p.source, &p.target) {
        return Err("Source and target cannot be the same".into());
    }
    if p.target.read_only() {
        return Err(format!("Block node '{}' is read-only", p.target.name()));
    }
    if p.source.size() != p.target.size() {
        return Err("Source and target image have different sizes".into());
    }
    if p.compress && p.target.io().format_name() != "qcow2" {
        // QEMU names the target's device (BlockBackend); a node has none, so
        // the name is empty.
        return Err("Compression is not supported for this drive ".into());
    }
    if let Some(reason) = p.target.blocker() {
        return Err(format!("Node '{}' is busy: {reason}", p.target.name()));
    }
    if p.perf.max_workers < 1 || p.perf.max_workers > i32::MAX as i64 {
        return Err("max-workers must be between 1 and 2147483647".into());
    }
    if p.perf.max_chunk < 0 {
        return Err("max-chunk must be zero (which means no limit) or positive".into());
    }
    let mcs = p.perf.min_cluster_size;
    if mcs != 0 && !mcs.is_power_of_two() {
        return Err(
            "Could not create node: Cannot create block-copy-state: min-cluster-size needs to be a power of 2"
                .into(),
        );
    }
    let cluster = DEFAULT_CLUSTER
        .max(p.target.io().cluster_size().unwrap_or(0))
        .max(mcs);
    if p.source.size().div_ceil(cluster) > 1 << 33 {
        return Err(
            "The source is too large for the backup cluster size (use min-cluster-size)".into(),
        );
    }
    if p.perf.max_chunk != 0 && (p.perf.max_chunk as u64) < cluster {
        return Err(format!(
            "Required max-chunk ({}) is less than backup cluster size ({cluster})",
            p.perf.max_chunk
        ));
    }
    Ok(cluster)
}

/// A running backup.
pub struct BackupJob {
    params: BackupParams,
    graph: Arc<BlockGraph>,
    bcs: Arc<BlockCopy>,
    hook: Arc<CbwHook>,
    hook_dyn: Arc<dyn BeforeWrite>,
    filter: Arc<BlockNode>,
    successor: Mutex<Option<Arc<DirtyBitmap>>>,
    succeeded: Mutex<bool>,
    /// Whether `run` was entered (a transaction may abort the job before).
    started: std::sync::atomic::AtomicBool,
}

/// Validates, inserts the copy-before-write filter and creates the job (status
/// created). The caller starts it with [`JobManager::start`].
pub fn create_backup(
    graph: &Arc<BlockGraph>,
    jobs: &JobManager,
    params: BackupParams,
) -> Result<Arc<Job>, String> {
    let cluster = validate(&params)?;
    let compress = params.compress;
    let bcs = BlockCopy::new(
        params.source.clone(),
        params.target.clone(),
        cluster,
        compress,
        params.discard_source,
    );
    let timeout = (params.cbw_timeout > 0).then(|| Duration::from_secs(params.cbw_timeout as u64));
    let hook = CbwHook::new(bcs.clone(), params.on_cbw_error, timeout);
    let filter_name = match &params.filter_node_name {
        Some(n) => {
            if !strata_block::graph::valid_node_name(n) {
                return Err(format!("Could not create node: Invalid node-name: '{n}'"));
            }
            if graph.node(n).is_some() {
                return Err(format!(
                    "Could not create node: Duplicate nodes with node-name='{n}'"
                ));
            }
            if n.len() > strata_block::graph::MAX_NODE_NAME {
                return Err("Could not create node: Node name too long".into());
            }
            n.clone()
        }
        None => graph.new_auto_name(),
    };
    let filter = BlockNode::new(
        filter_name,
        params.filter_node_name.is_none(),
        "copy-before-write",
        Arc::new(CbwFilter::new(params.source.clone())),
        Some(params.source.clone()),
        None,
        params.source.filename().to_string(),
        NodeSettings {
            read_only: params.source.read_only(),
            ..Default::default()
        },
    );
    let job_opts = params.job;
    let job_id = params.job_id.clone();
    let driver = Arc::new(BackupJob {
        graph: graph.clone(),
        bcs: bcs.clone(),
        hook_dyn: hook.clone(),
        hook,
        filter: filter.clone(),
        successor: Mutex::new(None),
        succeeded: Mutex::new(false),
        started: std::sync::atomic::AtomicBool::new(false),
        params,
    });
    let job = jobs
        .create(&job_id, driver.clone(), job_opts)
        .map_err(|e| e.0)?;
    graph.insert_node(filter).map_err(|e| e.desc)?;
    driver
        .params
        .target
        .set_blocker(Some("block device is in use by block job: backup".into()));
    // From here on every write to the source passes the hook; the drain inside
    // add_hook makes the start a point in time.
    driver.params.source.add_hook(driver.hook_dyn.clone());
    if let Some((b, _)) = &driver.params.bitmap {
        match b.create_successor() {
            Ok(s) => {
                driver.params.source.add_bitmap(s.clone());
                *driver.successor.lock().unwrap_or_else(|e| e.into_inner()) = Some(s);
            }
            Err(e) => return Err(e.desc),
        }
        // The copy bitmap is the user bitmap as it was at the start.
        bcs.restrict_to(&b.dirty_ranges());
    }
    job.set_total(bcs.remaining_bytes());
    Ok(job)
}

impl BackupJob {
    fn policy(&self, is_read: bool) -> OnError {
        if is_read {
            self.params.on_source_error
        } else {
            self.params.on_target_error
        }
    }

    fn chunk_clusters(&self) -> u64 {
        let c = self.bcs.cluster();
        let mut chunk = if self.params.compress {
            c
        } else {
            c.max(MAX_BUFFER)
        };
        if self.params.perf.max_chunk > 0 {
            chunk = chunk.min(self.params.perf.max_chunk as u64);
        }
        (chunk / c).max(1)
    }

    /// Finishes one background task (started after `epoch` resumes); returns a fatal
    /// error message. Once the job has failed (`failed`), further errors of tasks
    /// still in flight are not reported again: QEMU emits one BLOCK_JOB_ERROR for
    /// the failure.
    fn finish_task(
        &self,
        ctx: &JobContext,
        (first, n, epoch): (u64, u64, u64),
        r: Result<(), CopyError>,
        failed: bool,
    ) -> Option<String> {
        // The worker has ended the task's claim already, copied or not.
        match r {
            Err(_) if failed => None,
            Ok(()) => {
                let c = self.bcs.cluster();
                let size = self.bcs.source().size();
                ctx.add_done(((first + n) * c).min(size) - first * c);
                None
            }
            // Started before the job was stopped and resumed: the clusters are dirty
            // again and will be retried.
            Err(_) if epoch < ctx.resumes() => None,
            Err(e) => match ctx.error_action(self.policy(e.is_read), e.is_read, e.enospc) {
                ErrorAction::Report => Some(e.msg),
                ErrorAction::Ignore | ErrorAction::Stop => None,
            },
        }
    }

    fn background(&self, ctx: &JobContext) -> Result<(), String> {
        let max_inflight = self.params.perf.max_workers.max(1) as usize;
        let threads = (max_inflight as u64).min(MAX_THREADS) as usize;
        let chunk = self.chunk_clusters();
        let (task_tx, task_rx) = mpsc::channel::<(u64, u64, u64)>();
        let task_rx = Mutex::new(task_rx);
        let (res_tx, res_rx) = mpsc::channel::<((u64, u64, u64), Result<(), CopyError>)>();
        std::thread::scope(|s| {
            let mut workers = Vec::with_capacity(threads);
            for _ in 0..threads {
                let res_tx = res_tx.clone();
                let task_rx = &task_rx;
                let bcs = &self.bcs;
                workers.push(s.spawn(move || {
                    let mut scratch = Vec::new();
                    loop {
                        let t = task_rx.lock().unwrap_or_else(|e| e.into_inner()).recv();
                        let Ok((f, n, epoch)) = t else { break };
                        let r = bcs.copy_clusters_with(f, n, &mut scratch);
                        // End the claim at once (a failed copy leaves the clusters
                        // dirty), not when the job loop next looks: it may be asleep
                        // in the rate limiter, and guest writes to these clusters
                        // wait for the claim to end.
                        bcs.release(f, n, r.is_ok());
                        if res_tx.send(((f, n, epoch), r)).is_err() {
                            break;
                        }
                    }
                }));
            }
            let mut inflight = 0usize;
            let mut fatal: Option<String> = None;
            let result = loop {
                while let Ok((range, r)) = res_rx.try_recv() {
                    inflight -= 1;
                    if let Some(e) = self.finish_task(ctx, range, r, fatal.is_some()) {
                        fatal.get_or_insert(e);
                    }
                }
                if let Some(e) = fatal.take() {
                    break Err(e);
                }
                if let Some(e) = self.hook.broken() {
                    break Err(e);
                }
                if !ctx.pause_point() {
                    break Ok(());
                }
                let delay = ctx.rate_delay(0);
                if !delay.is_zero() {
                    ctx.sleep(delay);
                    continue;
                }
                if inflight < max_inflight {
                    if let Some((f, n)) = self.bcs.claim_next(chunk) {
                        let c = self.bcs.cluster();
                        ctx.rate_delay(n * c);
                        if task_tx.send((f, n, ctx.resumes())).is_err() {
                            self.bcs.release(f, n, false);
                            break Err("backup worker threads stopped".into());
                        }
                        inflight += 1;
                        continue;
                    }
                }
                if inflight == 0 {
                    if self.bcs.finished() {
                        break Ok(());
                    }
                    // Only guest-triggered copies are in flight: wait for them.
                    self.bcs.wait_idle();
                    continue;
                }
                match res_rx.recv() {
                    Ok((range, r)) => {
                        inflight -= 1;
                        if let Some(e) = self.finish_task(ctx, range, r, fatal.is_some()) {
                            fatal.get_or_insert(e);
                        }
                    }
                    Err(_) => break Err("backup worker threads stopped".into()),
                }
            };
            drop(task_tx);
            while inflight > 0 {
                match res_rx.recv() {
                    Ok((range, r)) => {
                        inflight -= 1;
                        // Errors are not reported any more: the job is ending.
                        let _ = self.finish_task(ctx, range, r, true);
                    }
                    Err(_) => break,
                }
            }
            // Join the workers (the scope alone only waits for their closures) so
            // that no thread of this job outlives it.
            for w in workers {
                if let Err(p) = w.join() {
                    std::panic::resume_unwind(p);
                }
            }
            result
        })
    }

    fn sync_bitmap(&self, success: bool) {
        let Some((b, mode)) = &self.params.bitmap else {
            return;
        };
        let mode = mode.unwrap_or(BitmapMode::OnSuccess);
        let succ = self
            .successor
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        let sync = (success || mode == BitmapMode::Always) && mode != BitmapMode::Never;
        let r = if sync { b.abdicate() } else { b.reclaim() };
        let started = self.started.load(std::sync::atomic::Ordering::SeqCst);
        if sync && !success && !started {
            // QEMU's copy bitmap starts all dirty and is narrowed to the sync
            // bitmap only when the job runs, so a job that never ran leaves the
            // whole disk dirty.
            b.set_range(0, self.bcs.source().size());
        } else if sync && !success {
            // Bits the job did not copy stay dirty.
            let c = self.bcs.cluster();
            let size = self.bcs.source().size();
            let mut cl = 0;
            while let Some((f, n)) = self.bcs.claim_next(u64::MAX) {
                b.set_range(f * c, ((f + n) * c).min(size) - f * c);
                self.bcs.release(f, n, true);
                cl += 1;
                if cl > size {
                    break;
                }
            }
        }
        if let Ok(s) = r {
            self.params.source.remove_bitmap(&s);
        } else if let Some(s) = succ {
            self.params.source.remove_bitmap(&s);
        }
    }
}

impl JobDriver for BackupJob {
    fn job_type(&self) -> &'static str {
        "backup"
    }

    fn run(&self, ctx: &JobContext) -> Result<(), String> {
        self.started
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let progress_job = ctx.progress_handle();
        self.bcs
            .set_progress(Arc::new(move |n| progress_job.add_done(n)));
        ctx.set_total(self.bcs.remaining_bytes());
        match self.params.sync {
            SyncMode::None => {
                ctx.wait_cancelled();
                return Ok(());
            }
            SyncMode::Top => {
                self.bcs
                    .skip_unallocated
                    .store(true, std::sync::atomic::Ordering::Release);
                let go_on = self.bcs.reset_unallocated(|| ctx.pause_point());
                self.bcs
                    .skip_unallocated
                    .store(false, std::sync::atomic::Ordering::Release);
                if !go_on {
                    return Ok(());
                }
                ctx.set_total(ctx.done() + self.bcs.remaining_bytes());
            }
            _ => {}
        }
        self.background(ctx)?;
        if ctx.is_cancelled() {
            return Ok(());
        }
        self.params.target.flush().map_err(|e| e.desc)?;
        *self.succeeded.lock().unwrap_or_else(|e| e.into_inner()) = true;
        Ok(())
    }

    fn commit(&self) {
        self.sync_bitmap(true);
    }

    fn abort(&self) {
        self.sync_bitmap(false);
    }

    fn clean(&self) {
        self.params.target.set_blocker(None);
        self.params.source.remove_hook(&self.hook_dyn);
        if let Err(e) = self.graph.remove_node(&self.filter) {
            tracing::warn!("removing the copy-before-write filter: {e}");
        }
        let _ = self.params.target.flush();
        if self.params.target_owned {
            if let Err(e) = self.graph.remove_node(&self.params.target) {
                tracing::warn!("closing the backup target: {e}");
            }
        }
    }
}
