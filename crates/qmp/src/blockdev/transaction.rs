//! `transaction`: bitmap, backup and internal snapshot actions applied atomically. Every action is
//! prepared in order; on the first failure the prepared ones are undone and that
//! error is returned; backup jobs start only when all actions succeeded. With
//! `completion-mode: grouped` (backups only) a failing job cancels the others.

use std::sync::Arc;

use serde_json::{json, Map, Value};
use strata_jobs::{Job, JobStatus};

use super::backup::{blockdev_backup_type, drive_backup_type};
use super::bitmaps::{self, Undo};
use super::{backup, snapshots, BlockState};
use crate::dispatch::{Command, Registry, RegistryError};
use crate::error::QmpError;
use crate::json::Json;
use crate::schema::{check_args, ObjectType, Type};

const BACKUP_ACTIONS: &[&str] = &["blockdev-backup", "drive-backup"];

fn action_type(kind: &str) -> Option<ObjectType> {
    Some(match kind {
        "abort" => ObjectType::new("Abort"),
        "block-dirty-bitmap-add" => bitmaps::add_type(),
        "block-dirty-bitmap-merge" => bitmaps::merge_type(),
        "block-dirty-bitmap-remove"
        | "block-dirty-bitmap-clear"
        | "block-dirty-bitmap-enable"
        | "block-dirty-bitmap-disable" => bitmaps::bitmap_type(),
        "blockdev-backup" => blockdev_backup_type(),
        "blockdev-snapshot-internal-sync" => snapshots::internal_type(),
        "drive-backup" => drive_backup_type(),
        _ => return None,
    })
}

const KINDS: &[&str] = &[
    "abort",
    "block-dirty-bitmap-add",
    "block-dirty-bitmap-remove",
    "block-dirty-bitmap-clear",
    "block-dirty-bitmap-enable",
    "block-dirty-bitmap-disable",
    "block-dirty-bitmap-merge",
    "blockdev-backup",
    "blockdev-snapshot-internal-sync",
    "drive-backup",
];

fn run(state: &Arc<BlockState>, args: &Map<String, Value>) -> Result<Value, QmpError> {
    let actions = args
        .get("actions")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let grouped = args
        .get("properties")
        .and_then(|p| p.get("completion-mode"))
        .and_then(Value::as_str)
        == Some("grouped");
    // Check every action's shape first, as the QAPI visitor does.
    let mut parsed = Vec::new();
    for (i, a) in actions.iter().enumerate() {
        let obj = a.as_object().ok_or_else(|| {
            QmpError::generic(format!(
                "Invalid parameter type for 'actions[{i}]', expected: object"
            ))
        })?;
        let kind = obj.get("type").and_then(Value::as_str).ok_or_else(|| {
            QmpError::generic(format!("Parameter 'actions[{i}].type' is missing"))
        })?;
        let ty = action_type(kind).ok_or_else(|| {
            QmpError::generic(format!(
                "Parameter 'actions[{i}].type' does not accept value '{kind}'"
            ))
        })?;
        let data = match obj.get("data") {
            Some(Value::Object(d)) => d.clone(),
            Some(_) => {
                return Err(QmpError::generic(format!(
                    "Invalid parameter type for 'actions[{i}].data', expected: object"
                )))
            }
            None => {
                return Err(QmpError::generic(format!(
                    "Parameter 'actions[{i}].data' is missing"
                )))
            }
        };
        for k in obj.keys() {
            if k != "type" && k != "data" {
                return Err(QmpError::generic(format!(
                    "Parameter 'actions[{i}].{k}' is unexpected"
                )));
            }
        }
        check_args(&ty, &Json::from_serde(&Value::Object(data.clone())))
            .map_err(QmpError::generic)?;
        if grouped && !BACKUP_ACTIONS.contains(&kind) {
            return Err(QmpError::generic(format!(
                "Action '{kind}' does not support transaction property completion-mode = grouped"
            )));
        }
        parsed.push((kind.to_string(), data));
    }
    let mut undos: Vec<Undo> = Vec::new();
    let mut jobs: Vec<Arc<Job>> = Vec::new();
    for (kind, data) in &parsed {
        let r: Result<(), QmpError> = match kind.as_str() {
            "abort" => Err(QmpError::generic("Transaction aborted using Abort action")),
            "blockdev-backup" | "drive-backup" => {
                backup::prepare(state, kind == "drive-backup", data).map(|(job, undo)| {
                    jobs.push(job);
                    undos.push(undo);
                })
            }
            "blockdev-snapshot-internal-sync" => {
                snapshots::prepare(state, data).map(|u| undos.push(u))
            }
            bitmap => bitmaps::act(
                state,
                bitmap.trim_start_matches("block-dirty-bitmap-"),
                data,
            )
            .map(|u| undos.push(u)),
        };
        if let Err(e) = r {
            for u in undos.into_iter().rev() {
                u();
            }
            return Err(e);
        }
    }
    backup::start(state, &jobs)?;
    if grouped && jobs.len() > 1 {
        watch_group(jobs);
    }
    Ok(json!({}))
}

/// Grouped completion: the first job that fails cancels the others.
fn watch_group(jobs: Vec<Arc<Job>>) {
    std::thread::spawn(move || loop {
        let failed = jobs.iter().any(|j| j.error().is_some());
        if failed {
            for j in &jobs {
                if j.error().is_none() {
                    let _ = j.cancel();
                }
            }
            return;
        }
        if jobs
            .iter()
            .all(|j| matches!(j.status(), JobStatus::Concluded | JobStatus::Null))
        {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    });
}

pub(super) fn register(reg: &mut Registry, state: &Arc<BlockState>) -> Result<(), RegistryError> {
    let s = state.clone();
    let props = ObjectType::new("TransactionProperties").optional(
        "completion-mode",
        Type::enumeration("ActionCompletionMode", &["individual", "grouped"]),
    );
    let action = ObjectType::new("TransactionAction")
        .member("type", Type::enumeration("TransactionActionKind", KINDS))
        .optional("data", Type::Any);
    reg.register(
        Command::new("transaction", move |args, _| run(&s, args)).args(
            ObjectType::new("q_obj_transaction-arg")
                .member("actions", Type::array(action.into_type()))
                .optional("properties", props.into_type()),
        ),
    )?;
    Ok(())
}
