//! Node commands: `blockdev-add`, `blockdev-del`, `query-named-block-nodes`,
//! `query-block`, `block_resize`, and `human-monitor-command` with `qemu-io`.

use std::sync::Arc;

use serde_json::{json, Value};
use strata_block::qemu_io;
use strata_block::BlockdevOptions;

use super::{opt_bool, opt_str, qmp_err, str_arg, BlockState};
use crate::dispatch::{Command, Registry, RegistryError};
use crate::error::QmpError;
use crate::schema::{ObjectType, Type};

/// The drivers `blockdev-add` accepts.
pub const DRIVERS: &[&str] = &["blkdebug", "file", "null-co", "qcow2", "raw"];

fn blockdev_options_type() -> ObjectType {
    let cache = ObjectType::new("BlockdevCacheOptions")
        .optional("direct", Type::Bool)
        .optional("no-flush", Type::Bool);
    let on_off = |n: &str, v: &[&str]| Type::enumeration(n, v);
    let file = ObjectType::new("BlockdevOptionsFile")
        .member("filename", Type::Str)
        .optional("pr-manager", Type::Str)
        .optional("locking", on_off("OnOffAuto", &["auto", "on", "off"]))
        .optional(
            "aio",
            on_off("BlockdevAioOptions", &["threads", "native", "io_uring"]),
        )
        .optional("aio-max-batch", Type::Int)
        .optional("drop-cache", Type::Bool)
        .optional("x-check-cache-dropped", Type::Bool);
    let raw = ObjectType::new("BlockdevOptionsRaw")
        .member("file", Type::Any)
        .optional("offset", Type::Int)
        .optional("size", Type::Int);
    let qcow2 = ObjectType::new("BlockdevOptionsQcow2")
        .member("file", Type::Any)
        .optional("backing", Type::Any)
        .optional("lazy-refcounts", Type::Bool)
        .optional("pass-discard-request", Type::Bool)
        .optional("pass-discard-snapshot", Type::Bool)
        .optional("pass-discard-other", Type::Bool)
        .optional("discard-no-unref", Type::Bool)
        .optional("cache-size", Type::Int)
        .optional("l2-cache-size", Type::Int)
        .optional("l2-cache-entry-size", Type::Int)
        .optional("refcount-cache-size", Type::Int)
        .optional("cache-clean-interval", Type::Int);
    let null = ObjectType::new("BlockdevOptionsNull")
        .optional("size", Type::Int)
        .optional("latency-ns", Type::Uint64)
        .optional("read-zeroes", Type::Bool);
    let blkdebug = ObjectType::new("BlockdevOptionsBlkdebug")
        .member("image", Type::Any)
        .optional("config", Type::Str)
        .optional("align", Type::Int)
        .optional("inject-error", Type::array(Type::Any));
    ObjectType::new("BlockdevOptions")
        .member("driver", Type::enumeration("BlockdevDriver", DRIVERS))
        .optional("node-name", Type::Str)
        .optional(
            "discard",
            Type::enumeration("BlockdevDiscardOptions", &["ignore", "unmap"]),
        )
        .optional("cache", cache.into_type())
        .optional("read-only", Type::Bool)
        .optional("auto-read-only", Type::Bool)
        .optional("force-share", Type::Bool)
        .optional(
            "detect-zeroes",
            Type::enumeration("BlockdevDetectZeroesOptions", &["off", "on", "unmap"]),
        )
        .variants(
            "driver",
            vec![
                ("blkdebug".into(), blkdebug),
                ("file".into(), file),
                ("null-co".into(), null),
                ("qcow2".into(), qcow2),
                ("raw".into(), raw),
            ],
        )
}

/// Looks a node up by `device` or `node-name` with QEMU's message.
fn lookup(
    state: &BlockState,
    device: Option<&str>,
    node: Option<&str>,
) -> Result<Arc<strata_block::BlockNode>, QmpError> {
    // `device` names a device (BlockBackend); the daemon has no named devices, so,
    // as in qemu-storage-daemon, only `node-name` can match.
    state.graph.node(node.unwrap_or("")).ok_or_else(|| {
        QmpError::generic(format!(
            "Cannot find device='{}' nor node-name='{}'",
            device.unwrap_or(""),
            node.unwrap_or("")
        ))
    })
}

/// `query-block`: one `BlockInfo` per guest device. qemu-storage-daemon lists none
/// (its exports use anonymous block backends); an export created with
/// `werror`/`rerror` is listed like QEMU lists a device (`qdev` = export id) so
/// that its io-status can be read.
fn query_block(s: &BlockState) -> Value {
    Value::Array(
        s.devices()
            .iter()
            .map(|d| {
                let mut v = json!({
                    "device": "",
                    "qdev": d.id(),
                    "type": "unknown",
                    "removable": false,
                    "locked": false,
                    "io-status": d.io_status(),
                });
                if let Some(n) = s.graph.node(&d.node_name()) {
                    v["inserted"] = n.device_info(false);
                }
                v
            })
            .collect(),
    )
}

pub(super) fn register(reg: &mut Registry, state: &Arc<BlockState>) -> Result<(), RegistryError> {
    let s = state.clone();
    reg.register(
        Command::new("blockdev-add", move |args, _| {
            let opts = BlockdevOptions::from_json(&Value::Object(args.clone())).map_err(qmp_err)?;
            s.graph.blockdev_add(&opts).map_err(qmp_err)?;
            Ok(json!({}))
        })
        .args(blockdev_options_type()),
    )?;
    let s = state.clone();
    reg.register(
        Command::new("blockdev-del", move |args, _| {
            s.graph
                .blockdev_del(str_arg(args, "node-name"))
                .map_err(qmp_err)?;
            Ok(json!({}))
        })
        .args(ObjectType::new("q_obj_blockdev-del-arg").member("node-name", Type::Str)),
    )?;
    let s = state.clone();
    reg.register(
        Command::new("query-named-block-nodes", move |args, _| {
            Ok(s.graph
                .query_named_block_nodes(opt_bool(args, "flat").unwrap_or(false)))
        })
        .args(ObjectType::new("q_obj_query-named-block-nodes-arg").optional("flat", Type::Bool))
        .returns(Type::array(Type::Any)),
    )?;
    let s = state.clone();
    reg.register(
        Command::new("query-block", move |_, _| Ok(query_block(&s)))
            .returns(Type::array(Type::Any)),
    )?;
    let s = state.clone();
    reg.register(
        Command::new("block_resize", move |args, _| {
            let size = args.get("size").and_then(Value::as_i64).unwrap_or(-1);
            if size < 0 {
                return Err(QmpError::generic("Parameter 'size' expects a >0 size"));
            }
            let n = lookup(&s, opt_str(args, "device"), opt_str(args, "node-name"))?;
            if size % 512 != 0 {
                return Err(QmpError::generic("The new size must be a multiple of 512"));
            }
            s.graph
                .block_resize(None, n.name(), size)
                .map_err(qmp_err)?;
            Ok(json!({}))
        })
        .args(
            ObjectType::new("q_obj_block_resize-arg")
                .optional("device", Type::Str)
                .optional("node-name", Type::Str)
                .member("size", Type::Int),
        ),
    )?;
    let s = state.clone();
    reg.register(
        Command::new("human-monitor-command", move |args, _| {
            let line = str_arg(args, "command-line");
            let Some((node, cmd)) = qemu_io::parse_hmp(line) else {
                let word = line.split_whitespace().next().unwrap_or("");
                return Ok(json!(format!("unknown command: '{word}'\r\n")));
            };
            let Some(n) = s.graph.node(&node) else {
                return Err(QmpError::generic(format!("Device '{node}' not found")));
            };
            // QEMU's qemu-io prints to the process's stdout, not to the monitor, so
            // the command returns an empty string; do the same.
            let out = qemu_io::run(&n, &cmd);
            {
                use std::io::Write;
                let mut o = std::io::stdout().lock();
                let _ = o.write_all(out.as_bytes());
                let _ = o.flush();
            }
            Ok(json!(""))
        })
        .args(
            ObjectType::new("q_obj_human-monitor-command-arg")
                .member("command-line", Type::Str)
                .optional("cpu-index", Type::Int),
        )
        .returns(Type::Str),
    )?;
    Ok(())
}
