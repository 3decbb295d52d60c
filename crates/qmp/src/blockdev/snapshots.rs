//! Internal snapshot commands: `blockdev-snapshot-internal-sync` (also a
//! `transaction` action) and `blockdev-snapshot-delete-internal-sync` (the block
//! graph does the work).

use std::sync::Arc;

use serde_json::{json, Map, Value};

use super::bitmaps::Undo;
use super::{opt_str, qmp_err, str_arg, BlockState};
use crate::dispatch::{Command, Registry, RegistryError};
use crate::error::QmpError;
use crate::schema::{ObjectType, Type};

/// The arguments of `blockdev-snapshot-internal-sync` (and of the action).
pub(super) fn internal_type() -> ObjectType {
    ObjectType::new("BlockdevSnapshotInternal")
        .member("device", Type::Str)
        .member("name", Type::Str)
}

/// The `transaction` action: takes the snapshot; the undo deletes it again.
pub(super) fn prepare(
    state: &Arc<BlockState>,
    args: &Map<String, Value>,
) -> Result<Undo, QmpError> {
    let device = str_arg(args, "device").to_string();
    let sn = state
        .graph
        .snapshot_internal(&device, str_arg(args, "name"))
        .map_err(qmp_err)?;
    let s = state.clone();
    Ok(Box::new(move || {
        if let Err(e) = s
            .graph
            .snapshot_delete_internal(&device, Some(&sn.id), Some(&sn.name))
        {
            tracing::warn!(device, error = %e.desc, "undoing an internal snapshot failed");
        }
    }))
}

/// Registers the internal snapshot commands.
pub fn register(reg: &mut Registry, state: &Arc<BlockState>) -> Result<(), RegistryError> {
    let s = state.clone();
    reg.register(
        Command::new("blockdev-snapshot-internal-sync", move |args, _| {
            s.graph
                .snapshot_internal(str_arg(args, "device"), str_arg(args, "name"))
                .map_err(qmp_err)?;
            Ok(json!({}))
        })
        .args(internal_type()),
    )?;
    let s = state.clone();
    reg.register(
        Command::new("blockdev-snapshot-delete-internal-sync", move |args, _| {
            let sn = s
                .graph
                .snapshot_delete_internal(
                    str_arg(args, "device"),
                    opt_str(args, "id"),
                    opt_str(args, "name"),
                )
                .map_err(qmp_err)?;
            Ok(strata_block::node::snapshot_info_json(&sn))
        })
        .args(
            ObjectType::new("q_obj_blockdev-snapshot-delete-internal-sync-arg")
                .member("device", Type::Str)
                .optional("id", Type::Str)
                .optional("name", Type::Str),
        ),
    )?;
    Ok(())
}
