//! Dirty bitmap commands: `block-dirty-bitmap-add` / `-remove` / `-clear` /
//! `-enable` / `-disable` / `-merge` and `x-debug-block-dirty-bitmap-sha256`. Each
//! action returns an undo closure so that `transaction` can roll it back.

use std::sync::Arc;

use serde_json::{json, Map, Value};
use strata_block::BitmapRef;

use super::{opt_bool, qmp_err, str_arg, BlockState};
use crate::dispatch::{Command, Registry, RegistryError};
use crate::error::QmpError;
use crate::schema::{ObjectType, Type};

/// Undoes an action of a transaction that did not commit.
pub(super) type Undo = Box<dyn FnOnce() + Send>;

/// The bitmap actions (command names without the `block-dirty-bitmap-` prefix).
pub(super) const ACTIONS: &[&str] = &["add", "remove", "clear", "enable", "disable", "merge"];

pub(super) fn add_type() -> ObjectType {
    ObjectType::new("BlockDirtyBitmapAdd")
        .member("node", Type::Str)
        .member("name", Type::Str)
        .optional("granularity", Type::Uint32)
        .optional("persistent", Type::Bool)
        .optional("disabled", Type::Bool)
}

pub(super) fn bitmap_type() -> ObjectType {
    ObjectType::new("BlockDirtyBitmap")
        .member("node", Type::Str)
        .member("name", Type::Str)
}

pub(super) fn merge_type() -> ObjectType {
    let or_str = Type::alternate(
        "BlockDirtyBitmapOrStr",
        vec![Type::Str, bitmap_type().into_type()],
    );
    ObjectType::new("BlockDirtyBitmapMerge")
        .member("node", Type::Str)
        .member("target", Type::Str)
        .member("bitmaps", Type::array(or_str))
}

/// Runs one bitmap action; returns how to undo it.
pub(super) fn act(
    state: &BlockState,
    action: &str,
    args: &Map<String, Value>,
) -> Result<Undo, QmpError> {
    let g = state.graph.clone();
    let node = str_arg(args, "node").to_string();
    match action {
        "add" => {
            let name = str_arg(args, "name").to_string();
            let gran = args.get("granularity").and_then(Value::as_u64);
            g.bitmap_add(
                &node,
                &name,
                gran,
                opt_bool(args, "persistent").unwrap_or(false),
                opt_bool(args, "disabled").unwrap_or(false),
            )
            .map_err(qmp_err)?;
            Ok(Box::new(move || {
                let _ = g.bitmap_remove(&node, &name);
            }))
        }
        "remove" => {
            let name = str_arg(args, "name").to_string();
            let n = g.find_node(&node).map_err(qmp_err)?;
            let b = n.bitmap(&name);
            g.bitmap_remove(&node, &name).map_err(qmp_err)?;
            Ok(Box::new(move || {
                if let Some(b) = b {
                    n.add_bitmap(b);
                }
            }))
        }
        "clear" | "merge" => {
            let name = if action == "clear" {
                str_arg(args, "name")
            } else {
                str_arg(args, "target")
            }
            .to_string();
            let n = g.find_node(&node).map_err(qmp_err)?;
            let old = n.bitmap(&name).map(|b| (b.clone(), b.to_bytes()));
            if action == "clear" {
                g.bitmap_clear(&node, &name).map_err(qmp_err)?;
            } else {
                let sources: Vec<BitmapRef> = args
                    .get("bitmaps")
                    .and_then(Value::as_array)
                    .map(|a| {
                        a.iter()
                            .map(|v| match v {
                                Value::String(s) => BitmapRef {
                                    node: node.clone(),
                                    name: s.clone(),
                                },
                                o => BitmapRef {
                                    node: o["node"].as_str().unwrap_or("").to_string(),
                                    name: o["name"].as_str().unwrap_or("").to_string(),
                                },
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                g.bitmap_merge(&node, &name, &sources).map_err(qmp_err)?;
            }
            Ok(Box::new(move || {
                if let Some((b, bytes)) = old {
                    b.load_bytes(&bytes);
                }
            }))
        }
        "enable" | "disable" => {
            let name = str_arg(args, "name").to_string();
            let on = action == "enable";
            let n = g.find_node(&node).map_err(qmp_err)?;
            let was = n.bitmap(&name).map(|b| b.enabled());
            g.bitmap_set_enabled(&node, &name, on).map_err(qmp_err)?;
            Ok(Box::new(move || {
                if let (Some(b), Some(was)) = (n.bitmap(&name), was) {
                    b.set_enabled(was);
                }
            }))
        }
        other => Err(QmpError::generic(format!(
            "Unknown bitmap action '{other}'"
        ))),
    }
}

pub(super) fn register(reg: &mut Registry, state: &Arc<BlockState>) -> Result<(), RegistryError> {
    for action in ACTIONS {
        let s = state.clone();
        let ty = match *action {
            "add" => add_type(),
            "merge" => merge_type(),
            _ => bitmap_type(),
        };
        reg.register(
            Command::new(format!("block-dirty-bitmap-{action}"), move |args, _| {
                act(&s, action, args).map(|_| json!({}))
            })
            .args(ty),
        )?;
    }
    let s = state.clone();
    reg.register(
        Command::new("x-debug-block-dirty-bitmap-sha256", move |args, _| {
            s.graph
                .bitmap_sha256(str_arg(args, "node"), str_arg(args, "name"))
                .map_err(qmp_err)
        })
        .args(bitmap_type())
        .feature("unstable")
        .returns(Type::Any),
    )?;
    Ok(())
}
