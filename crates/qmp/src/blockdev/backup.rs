//! `drive-backup` and `blockdev-backup`: argument resolution (nodes, bitmap,
//! target image creation for drive-backup) into a backup job. Both commands run as
//! one-action transactions: the job is created, then started inside a drained
//! section, as QEMU does.

use std::path::Path;
use std::sync::Arc;

use serde_json::{json, Map, Value};
use strata_block::options::{BackingRef, ChildRef, DetectZeroes, DiscardMode, DriverOptions};
use strata_block::{BlockNode, BlockdevOptions};
use strata_image::{create_image, CreateOptions, Format};
use strata_jobs::backup::{create_backup, BackupParams, BitmapMode, OnCbwError, Perf, SyncMode};
use strata_jobs::{Job, JobOptions, OnError};

use super::bitmaps::Undo;
use super::{on_error_type, opt_bool, opt_str, qmp_err, str_arg, BlockState};
use crate::dispatch::{Command, Registry, RegistryError};
use crate::error::QmpError;
use crate::schema::{ObjectType, Type};

fn common(name: &str) -> ObjectType {
    let perf = ObjectType::new("BackupPerf")
        .optional("use-copy-range", Type::Bool)
        .optional("max-workers", Type::Int)
        .optional("max-chunk", Type::Int)
        .optional("min-cluster-size", Type::Size);
    ObjectType::new(name)
        .optional("job-id", Type::Str)
        .member("device", Type::Str)
        .member(
            "sync",
            Type::enumeration(
                "MirrorSyncMode",
                &["top", "full", "none", "incremental", "bitmap"],
            ),
        )
        .optional("speed", Type::Int)
        .optional("bitmap", Type::Str)
        .optional(
            "bitmap-mode",
            Type::enumeration("BitmapSyncMode", &["on-success", "never", "always"]),
        )
        .optional("compress", Type::Bool)
        .optional("on-source-error", on_error_type())
        .optional("on-target-error", on_error_type())
        .optional("auto-finalize", Type::Bool)
        .optional("auto-dismiss", Type::Bool)
        .optional("filter-node-name", Type::Str)
        .optional("discard-source", Type::Bool)
        .optional("x-perf", perf.into_type())
        .optional(
            "on-cbw-error",
            Type::enumeration("OnCbwError", &["break-guest-write", "break-snapshot"]),
        )
        .optional("x-cbw-timeout", Type::Uint32)
}

/// The argument type of `drive-backup`.
pub(super) fn drive_backup_type() -> ObjectType {
    common("DriveBackup")
        .member("target", Type::Str)
        .optional("format", Type::Str)
        .optional(
            "mode",
            Type::enumeration("NewImageMode", &["existing", "absolute-paths"]),
        )
}

/// The argument type of `blockdev-backup`.
pub(super) fn blockdev_backup_type() -> ObjectType {
    common("BlockdevBackup").member("target", Type::Str)
}

fn node(state: &BlockState, name: &str) -> Result<Arc<BlockNode>, QmpError> {
    state.graph.node(name).ok_or_else(|| {
        QmpError::generic(format!(
            "Cannot find device='{name}' nor node-name='{name}'"
        ))
    })
}

/// The C library's wording of an I/O error ("No such file or directory"), as
/// QEMU prints it after the file name.
fn os_text(e: &strata_image::Error) -> String {
    match e {
        strata_image::Error::Io { source, .. } => {
            let s = source.to_string();
            match s.find(" (os error") {
                Some(i) => s[..i].to_string(),
                None => s,
            }
        }
        other => other.to_string(),
    }
}

fn on_error(args: &Map<String, Value>, key: &str) -> OnError {
    opt_str(args, key)
        .and_then(OnError::parse)
        .unwrap_or_default()
}

/// Creates (drive-backup) or opens the target node.
fn drive_target(
    state: &BlockState,
    source: &Arc<BlockNode>,
    args: &Map<String, Value>,
    sync: &mut SyncMode,
) -> Result<Arc<BlockNode>, QmpError> {
    let target = str_arg(args, "target").to_string();
    let existing = opt_str(args, "mode") == Some("existing");
    let src_format = source.driver().to_string();
    let format = match opt_str(args, "format") {
        Some(f) => f.to_string(),
        None if existing => {
            let st = strata_image::FileStorage::open(Path::new(&target), true, Default::default())
                .map_err(|e| {
                    QmpError::generic(format!("Could not open '{target}': {}", os_text(&e)))
                })?;
            strata_image::probe_format(&st)
                .map_err(|e| QmpError::generic(e.to_string()))?
                .name()
                .to_string()
        }
        None => src_format.clone(),
    };
    let src_backing = source.backing_child().cloned();
    if *sync == SyncMode::Top && src_backing.is_none() && source.io().backing().is_none() {
        *sync = SyncMode::Full;
    }
    let mut backing = BackingRef::None;
    if !existing {
        let fmt = Format::parse(&format)
            .map_err(|_| QmpError::generic(format!("Unknown file format '{format}'")))?;
        let mut opts = CreateOptions {
            size: Some(source.size()),
            unsafe_backing: true,
            ..Default::default()
        };
        match *sync {
            SyncMode::None => {
                opts.backing_file = Some(source.filename().to_string());
                opts.backing_fmt = Some(src_format.clone());
            }
            SyncMode::Top => {
                if let Some(b) = &src_backing {
                    opts.backing_file = Some(b.filename().to_string());
                    opts.backing_fmt = Some(b.driver().to_string());
                }
            }
            _ => {}
        }
        if fmt == Format::Raw {
            opts.backing_file = None;
            opts.backing_fmt = None;
        }
        create_image(Path::new(&target), fmt, &opts).map_err(|e| {
            QmpError::generic(format!("Could not create '{target}': {}", os_text(&e)))
        })?;
    }
    if format == "qcow2" {
        backing = match *sync {
            // The live source is the target's backing: unwritten clusters read from it.
            SyncMode::None => BackingRef::Child(ChildRef::Reference(source.name().to_string())),
            SyncMode::Top => match &src_backing {
                Some(b) => BackingRef::Child(ChildRef::Reference(b.name().to_string())),
                None => BackingRef::Default,
            },
            _ => BackingRef::None,
        };
    }
    let file = BlockdevOptions {
        driver: "file".into(),
        node_name: None,
        read_only: false,
        auto_read_only: false,
        cache_direct: false,
        cache_no_flush: false,
        discard: DiscardMode::Unmap,
        detect_zeroes: DetectZeroes::Off,
        kind: DriverOptions::File { filename: target },
    };
    let kind = match format.as_str() {
        "raw" | "qcow2" => DriverOptions::Format {
            file: ChildRef::Inline(Box::new(file)),
            backing: if format == "qcow2" {
                backing
            } else {
                BackingRef::None
            },
            l2_cache_size: None,
            refcount_cache_size: None,
        },
        other => return Err(QmpError::generic(format!("Unknown file format '{other}'"))),
    };
    let opts = BlockdevOptions {
        driver: format,
        node_name: None,
        read_only: false,
        auto_read_only: false,
        cache_direct: false,
        cache_no_flush: false,
        discard: DiscardMode::Unmap,
        detect_zeroes: DetectZeroes::Unmap,
        kind,
    };
    state.graph.open_implicit(&opts).map_err(qmp_err)
}

/// Resolves a backup action and creates its job (not started). Returns the job
/// and how to undo its creation.
pub(super) fn prepare(
    state: &Arc<BlockState>,
    drive: bool,
    args: &Map<String, Value>,
) -> Result<(Arc<Job>, Undo), QmpError> {
    let device = str_arg(args, "device");
    let source = node(state, device)?;
    let mut sync = SyncMode::parse(str_arg(args, "sync")).unwrap_or(SyncMode::Full);
    let bitmap_mode = opt_str(args, "bitmap-mode").and_then(BitmapMode::parse);
    let bitmap = match opt_str(args, "bitmap") {
        Some(name) => Some((
            source
                .bitmap(name)
                .ok_or_else(|| QmpError::generic(format!("Bitmap '{name}' could not be found")))?,
            bitmap_mode,
        )),
        None => None,
    };
    let job_id = match opt_str(args, "job-id") {
        Some(id) => id.to_string(),
        None => String::new(),
    };
    let (target, owned) = if drive {
        (drive_target(state, &source, args, &mut sync)?, true)
    } else {
        (node(state, str_arg(args, "target"))?, false)
    };
    let perf_obj = args.get("x-perf").and_then(Value::as_object);
    let perf = Perf {
        max_workers: perf_obj
            .and_then(|p| p.get("max-workers"))
            .and_then(Value::as_i64)
            .unwrap_or(64),
        max_chunk: perf_obj
            .and_then(|p| p.get("max-chunk"))
            .and_then(Value::as_i64)
            .unwrap_or(0),
        min_cluster_size: perf_obj
            .and_then(|p| p.get("min-cluster-size"))
            .and_then(Value::as_u64)
            .unwrap_or(0),
    };
    let speed = args.get("speed").and_then(Value::as_i64).unwrap_or(0);
    let drop_target = |state: &BlockState| {
        if owned {
            let _ = state.graph.remove_node(&target);
        }
    };
    let params = BackupParams {
        job_id,
        source,
        target: target.clone(),
        target_owned: owned,
        sync,
        bitmap_mode_without_bitmap: bitmap.is_none() && bitmap_mode.is_some(),
        bitmap,
        compress: opt_bool(args, "compress").unwrap_or(false),
        on_source_error: on_error(args, "on-source-error"),
        on_target_error: on_error(args, "on-target-error"),
        filter_node_name: opt_str(args, "filter-node-name").map(str::to_string),
        discard_source: opt_bool(args, "discard-source").unwrap_or(false),
        perf,
        on_cbw_error: opt_str(args, "on-cbw-error")
            .and_then(OnCbwError::parse)
            .unwrap_or_default(),
        cbw_timeout: args
            .get("x-cbw-timeout")
            .and_then(Value::as_u64)
            .unwrap_or(0) as u32,
        job: JobOptions {
            auto_finalize: opt_bool(args, "auto-finalize").unwrap_or(true),
            auto_dismiss: opt_bool(args, "auto-dismiss").unwrap_or(true),
            speed: speed.max(0) as u64,
        },
    };
    match create_backup(&state.graph, &state.jobs, params) {
        Ok(job) if speed < 0 => {
            // QEMU checks the speed once the job exists (after its id).
            job.discard();
            drop_target(state);
            Err(QmpError::generic("Invalid parameter 'speed'"))
        }
        Ok(job) => {
            let j = job.clone();
            Ok((job, Box::new(move || j.cancel_unstarted())))
        }
        Err(e) => {
            drop_target(state);
            Err(QmpError::generic(e))
        }
    }
}

/// Starts prepared jobs inside a drained section, then ends it.
pub(super) fn start(state: &BlockState, jobs: &[Arc<Job>]) -> Result<(), QmpError> {
    for j in jobs {
        state
            .jobs
            .start(j, true)
            .map_err(|e| QmpError::generic(e.0))?;
    }
    for j in jobs {
        j.end_drain();
    }
    Ok(())
}

pub(super) fn register(reg: &mut Registry, state: &Arc<BlockState>) -> Result<(), RegistryError> {
    for (name, drive) in [("drive-backup", true), ("blockdev-backup", false)] {
        let s = state.clone();
        let ty = if drive {
            drive_backup_type()
        } else {
            blockdev_backup_type()
        };
        let mut cmd = Command::new(name, move |args, _| {
            let (job, _undo) = prepare(&s, drive, args)?;
            start(&s, &[job])?;
            Ok(json!({}))
        })
        .args(ty);
        if drive {
            cmd = cmd.feature("deprecated");
        }
        reg.register(cmd)?;
    }
    Ok(())
}
