//! Job commands: `query-block-jobs`, `query-jobs`, the `block-job-*` verbs
//! (DeviceNotActive when the job does not exist) and the `job-*` verbs
//! (GenericError "Job not found").

use std::sync::Arc;

use serde_json::{json, Map, Value};
use strata_jobs::Job;

use super::{opt_bool, str_arg, BlockState};
use crate::dispatch::{Command, Registry, RegistryError};
use crate::error::QmpError;
use crate::schema::{ObjectType, Type};

fn block_job(state: &BlockState, id: &str) -> Result<Arc<Job>, QmpError> {
    state
        .jobs
        .find(id)
        .ok_or_else(|| QmpError::device_not_active(format!("Block job '{id}' not found")))
}

fn job(state: &BlockState, id: &str) -> Result<Arc<Job>, QmpError> {
    state
        .jobs
        .find(id)
        .ok_or_else(|| QmpError::generic("Job not found"))
}

type Verb = fn(&Job, &Map<String, Value>) -> Result<(), QmpError>;

fn generic(e: strata_jobs::JobError) -> QmpError {
    QmpError::generic(e.0)
}

/// Declares the job events (QEMU 10's members) so that `query-qmp-schema` lists them.
fn register_events(reg: &mut Registry) -> Result<(), RegistryError> {
    let job_type = || {
        Type::enumeration(
            "JobType",
            &[
                "commit",
                "stream",
                "mirror",
                "backup",
                "create",
                "amend",
                "snapshot-load",
                "snapshot-save",
                "snapshot-delete",
            ],
        )
    };
    let status = Type::enumeration(
        "JobStatus",
        &[
            "undefined",
            "created",
            "running",
            "paused",
            "ready",
            "standby",
            "waiting",
            "pending",
            "aborting",
            "concluded",
            "null",
        ],
    );
    reg.register_event(
        "JOB_STATUS_CHANGE",
        ObjectType::new("q_obj_JOB_STATUS_CHANGE-arg")
            .member("id", Type::Str)
            .member("status", status),
    )?;
    for (name, with_error) in [
        ("BLOCK_JOB_COMPLETED", true),
        ("BLOCK_JOB_CANCELLED", false),
    ] {
        let mut o = ObjectType::new(format!("q_obj_{name}-arg"))
            .member("type", job_type())
            .member("device", Type::Str)
            .member("len", Type::Int)
            .member("offset", Type::Int)
            .member("speed", Type::Int);
        if with_error {
            o = o.optional("error", Type::Str);
        }
        reg.register_event(name, o)?;
    }
    reg.register_event(
        "BLOCK_JOB_ERROR",
        ObjectType::new("q_obj_BLOCK_JOB_ERROR-arg")
            .member("device", Type::Str)
            .member(
                "operation",
                Type::enumeration("IoOperationType", &["read", "write"]),
            )
            .member(
                "action",
                Type::enumeration("BlockErrorAction", &["ignore", "report", "stop"]),
            ),
    )?;
    reg.register_event(
        "BLOCK_JOB_PENDING",
        ObjectType::new("q_obj_BLOCK_JOB_PENDING-arg")
            .member("type", job_type())
            .member("id", Type::Str),
    )?;
    reg.register_event(
        "BLOCK_JOB_READY",
        ObjectType::new("q_obj_BLOCK_JOB_READY-arg")
            .member("type", job_type())
            .member("device", Type::Str)
            .member("len", Type::Int)
            .member("offset", Type::Int)
            .member("speed", Type::Int),
    )?;
    Ok(())
}

pub(super) fn register(reg: &mut Registry, state: &Arc<BlockState>) -> Result<(), RegistryError> {
    register_events(reg)?;
    let s = state.clone();
    reg.register(
        Command::new("query-block-jobs", move |_, _| {
            Ok(s.jobs.query_block_jobs())
        })
        .returns(Type::array(Type::Any)),
    )?;
    let s = state.clone();
    reg.register(
        Command::new("query-jobs", move |_, _| Ok(s.jobs.query_jobs()))
            .returns(Type::array(Type::Any)),
    )?;

    // block-job-* verbs: the job is named by `device` (or `id` for dismiss/finalize).
    let block_verbs: Vec<(&str, &str, ObjectType, Verb)> = vec![
        (
            "block-job-set-speed",
            "device",
            ObjectType::new("q_obj_block-job-set-speed-arg")
                .member("device", Type::Str)
                .member("speed", Type::Int),
            |j, a| {
                let speed = a.get("speed").and_then(Value::as_i64).unwrap_or(0);
                if speed < 0 {
                    return Err(QmpError::generic(
                        "Parameter 'speed' expects a non-negative value",
                    ));
                }
                j.set_speed(speed as u64).map_err(generic)
            },
        ),
        (
            "block-job-cancel",
            "device",
            ObjectType::new("q_obj_block-job-cancel-arg")
                .member("device", Type::Str)
                .optional("force", Type::Bool),
            |j, a| {
                if j.user_paused() && !opt_bool(a, "force").unwrap_or(false) {
                    return Err(QmpError::generic(format!(
                        "The block job for device '{}' is currently paused",
                        j.id()
                    )));
                }
                j.cancel().map_err(generic)
            },
        ),
        (
            "block-job-pause",
            "device",
            ObjectType::new("q_obj_block-job-pause-arg").member("device", Type::Str),
            |j, _| j.pause().map_err(generic),
        ),
        (
            "block-job-resume",
            "device",
            ObjectType::new("q_obj_block-job-resume-arg").member("device", Type::Str),
            |j, _| j.resume().map_err(generic),
        ),
        (
            "block-job-complete",
            "device",
            ObjectType::new("q_obj_block-job-complete-arg").member("device", Type::Str),
            |j, _| j.complete().map_err(generic),
        ),
        (
            "block-job-dismiss",
            "id",
            ObjectType::new("q_obj_block-job-dismiss-arg").member("id", Type::Str),
            |j, _| j.dismiss().map_err(generic),
        ),
        (
            "block-job-finalize",
            "id",
            ObjectType::new("q_obj_block-job-finalize-arg").member("id", Type::Str),
            |j, _| j.finalize().map_err(generic),
        ),
    ];
    for (name, key, ty, verb) in block_verbs {
        let s = state.clone();
        reg.register(
            Command::new(name, move |args, _| {
                let j = block_job(&s, str_arg(args, key))?;
                verb(&j, args).map(|()| json!({}))
            })
            .args(ty),
        )?;
    }

    // job-* verbs: always by `id`; job-cancel always forces.
    let job_verbs: Vec<(&str, Verb)> = vec![
        ("job-pause", |j, _| j.pause().map_err(generic)),
        ("job-resume", |j, _| j.resume().map_err(generic)),
        ("job-cancel", |j, _| j.cancel().map_err(generic)),
        ("job-complete", |j, _| j.complete().map_err(generic)),
        ("job-dismiss", |j, _| j.dismiss().map_err(generic)),
        ("job-finalize", |j, _| j.finalize().map_err(generic)),
    ];
    for (name, verb) in job_verbs {
        let s = state.clone();
        reg.register(
            Command::new(name, move |args, _| {
                let j = job(&s, str_arg(args, "id"))?;
                verb(&j, args).map(|()| json!({}))
            })
            .args(ObjectType::new(format!("q_obj_{name}-arg")).member("id", Type::Str)),
        )?;
    }
    Ok(())
}
