//! Block exports: `block-export-add`, `block-export-del`, `query-block-exports` and
//! the `BLOCK_EXPORT_DELETED` event, with QEMU 10's schema and messages.
//!
//! The export types themselves live outside this crate: the program registers an
//! [`ExportDriver`] (the storage daemon's starts vhost-user-blk exports). The same
//! [`ExportOptions`] parser serves QMP and the `--export` command-line option.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use serde_json::{json, Map, Value};
use strata_block::BlockNode;
use strata_jobs::EventSink;

use super::{on_error_type, str_arg, BlockState, GuestDevice, ON_ERROR};
use crate::dispatch::{Command, Registry, RegistryError};
use crate::error::QmpError;
use crate::events::EventSender;
use crate::schema::{ObjectType, Type};

/// QEMU's `BlockExportType` values.
pub const EXPORT_TYPES: &[&str] = &["nbd", "vhost-user-blk", "fuse", "vduse-blk"];

/// Parsed `BlockExportOptions` (the members Strata acts on).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportOptions {
    /// `type`.
    pub ty: String,
    /// `id`.
    pub id: String,
    /// `node-name`.
    pub node_name: String,
    /// `writable` (default off).
    pub writable: bool,
    /// `writethrough` (default off).
    pub writethrough: bool,
    /// `addr.path` for a unix socket address.
    pub unix_path: Option<PathBuf>,
    /// `addr.type`.
    pub addr_type: Option<String>,
    /// `logical-block-size` (default 512).
    pub logical_block_size: u64,
    /// `num-queues` (default 1).
    pub num_queues: u64,
    /// `werror` (a Strata extension for vhost-user-blk, with QEMU's device option
    /// name and values; `None` when not given).
    pub werror: Option<String>,
    /// `rerror` (likewise).
    pub rerror: Option<String>,
}

fn keyval_bool(v: &Value, key: &str) -> Result<Option<bool>, QmpError> {
    match v {
        Value::Bool(b) => Ok(Some(*b)),
        Value::String(s) => match s.as_str() {
            "on" | "yes" | "true" | "y" => Ok(Some(true)),
            "off" | "no" | "false" | "n" => Ok(Some(false)),
            _ => Err(QmpError::generic(format!(
                "Parameter '{key}' expects 'on' or 'off'"
            ))),
        },
        _ => Err(QmpError::generic(format!(
            "Invalid parameter type for '{key}', expected: boolean"
        ))),
    }
}

fn keyval_uint(v: &Value, key: &str, what: &str) -> Result<u64, QmpError> {
    let parsed = match v {
        Value::Number(n) => n.as_u64(),
        Value::String(s) => parse_size(s),
        _ => None,
    };
    parsed.ok_or_else(|| QmpError::generic(format!("Parameter '{key}' expects {what}")))
}

/// Parses a number with an optional k/M/G/T suffix (keyval `size` syntax).
fn parse_size(s: &str) -> Option<u64> {
    let (num, mult) = match s.chars().last()? {
        'k' | 'K' => (&s[..s.len() - 1], 1u64 << 10),
        'M' => (&s[..s.len() - 1], 1 << 20),
        'G' => (&s[..s.len() - 1], 1 << 30),
        'T' => (&s[..s.len() - 1], 1 << 40),
        'b' | 'B' => (&s[..s.len() - 1], 1),
        _ => (s, 1),
    };
    num.parse::<u64>().ok()?.checked_mul(mult)
}

impl ExportOptions {
    /// Parses `BlockExportOptions` from QMP arguments (already schema-checked) or
    /// from `--export` keyval (all values strings).
    pub fn from_json(v: &Map<String, Value>) -> Result<Self, QmpError> {
        let get_str = |k: &str| v.get(k).and_then(Value::as_str).map(str::to_string);
        let ty = get_str("type").ok_or_else(|| QmpError::generic("Parameter 'type' is missing"))?;
        if !EXPORT_TYPES.contains(&ty.as_str()) {
            return Err(QmpError::generic(format!(
                "Parameter 'type' does not accept value '{ty}'"
            )));
        }
        let id = get_str("id").ok_or_else(|| QmpError::generic("Parameter 'id' is missing"))?;
        let node_name = get_str("node-name")
            .ok_or_else(|| QmpError::generic("Parameter 'node-name' is missing"))?;
        let mut o = ExportOptions {
            ty,
            id,
            node_name,
            writable: false,
            writethrough: false,
            unix_path: None,
            addr_type: None,
            logical_block_size: 512,
            num_queues: 1,
            werror: None,
            rerror: None,
        };
        for (k, val) in v {
            match k.as_str() {
                "type" | "id" | "node-name" | "iothread" => {}
                "writable" => o.writable = keyval_bool(val, k)?.unwrap_or(false),
                "writethrough" => o.writethrough = keyval_bool(val, k)?.unwrap_or(false),
                "fixed-iothread" | "allow-inactive" => {
                    keyval_bool(val, k)?;
                }
                "logical-block-size" if o.ty == "vhost-user-blk" => {
                    o.logical_block_size = keyval_uint(val, k, "a size value")?;
                }
                "num-queues" if o.ty == "vhost-user-blk" => {
                    let n = keyval_uint(val, k, "uint16")?;
                    if n > u64::from(u16::MAX) {
                        return Err(QmpError::generic(format!("Parameter '{k}' expects uint16")));
                    }
                    o.num_queues = n;
                }
                "werror" | "rerror" if o.ty == "vhost-user-blk" => {
                    let v = val.as_str().unwrap_or("");
                    if !ON_ERROR.contains(&v) {
                        return Err(QmpError::generic(format!(
                            "Parameter '{k}' does not accept value '{v}'"
                        )));
                    }
                    if k == "werror" {
                        o.werror = Some(v.to_string());
                    } else {
                        o.rerror = Some(v.to_string());
                    }
                }
                "addr" if o.ty == "vhost-user-blk" => {
                    let a = val.as_object().ok_or_else(|| {
                        QmpError::generic("Invalid parameter type for 'addr', expected: object")
                    })?;
                    o.addr_type = a.get("type").and_then(Value::as_str).map(str::to_string);
                    o.unix_path = a.get("path").and_then(Value::as_str).map(PathBuf::from);
                    if o.addr_type.is_none() {
                        return Err(QmpError::generic("Parameter 'addr.type' is missing"));
                    }
                }
                other => {
                    return Err(QmpError::generic(format!("Invalid parameter '{other}'")));
                }
            }
        }
        if o.ty == "vhost-user-blk" && o.addr_type.is_none() {
            return Err(QmpError::generic("Parameter 'addr' is missing"));
        }
        Ok(o)
    }
}

/// A running export.
pub trait RunningExport: Send {
    /// Whether a client is connected (`block-export-del` in safe mode refuses then).
    fn in_use(&self) -> bool;
    /// Disconnects clients and stops serving; returns once nothing is in flight.
    fn stop(&mut self);
    /// The guest device to list in `query-block` and resume with `cont`, if the
    /// export has one worth listing (an error policy was asked for).
    fn device(&self) -> Option<Arc<dyn GuestDevice>> {
        None
    }
}

/// Starts exports of the types a program supports.
pub trait ExportDriver: Send + Sync {
    /// Starts the export `opts` of `node`, or explains (in QEMU's words) why not.
    /// Events the export raises (`BLOCK_IO_ERROR`) go to `events`.
    fn start(
        &self,
        opts: &ExportOptions,
        node: Arc<BlockNode>,
        events: Arc<dyn EventSink>,
    ) -> Result<Box<dyn RunningExport>, String>;
}

struct Entry {
    opts: ExportOptions,
    export: Box<dyn RunningExport>,
}

/// The exports of a monitor.
pub struct ExportState {
    driver: Arc<dyn ExportDriver>,
    list: Mutex<Vec<Entry>>,
}

impl ExportState {
    /// No exports yet; new ones are started by `driver`.
    pub fn new(driver: Arc<dyn ExportDriver>) -> Arc<Self> {
        Arc::new(ExportState {
            driver,
            list: Mutex::new(Vec::new()),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Entry>> {
        self.list.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `block-export-add`.
    pub fn add(&self, block: &BlockState, opts: ExportOptions) -> Result<(), QmpError> {
        if self.lock().iter().any(|e| e.opts.id == opts.id) {
            return Err(QmpError::generic(format!(
                "Block export id '{}' is already in use",
                opts.id
            )));
        }
        if opts.ty != "vhost-user-blk" {
            return Err(QmpError::generic(format!(
                "Export type '{}' is not supported",
                opts.ty
            )));
        }
        let node = block.graph.node(&opts.node_name).ok_or_else(|| {
            QmpError::generic(format!(
                "Cannot find device='' nor node-name='{}'",
                opts.node_name
            ))
        })?;
        if opts.writable && node.read_only() {
            return Err(QmpError::generic(
                "Cannot export read-only node as writable",
            ));
        }
        let export = self
            .driver
            .start(&opts, node, block.event_sink())
            .map_err(QmpError::generic)?;
        if let Some(d) = export.device() {
            block.add_device(d);
        }
        // QEMU lists the newest export first.
        self.lock().insert(0, Entry { opts, export });
        Ok(())
    }

    /// `block-export-del`; emits `BLOCK_EXPORT_DELETED` once the export is gone.
    pub fn del(
        &self,
        block: &BlockState,
        id: &str,
        hard: bool,
        events: Option<&EventSender>,
    ) -> Result<(), QmpError> {
        let mut entry = {
            let mut list = self.lock();
            let pos = list
                .iter()
                .position(|e| e.opts.id == id)
                .ok_or_else(|| QmpError::generic(format!("Export '{id}' is not found")))?;
            if !hard && list[pos].export.in_use() {
                return Err(QmpError::generic(format!("export '{id}' still in use")));
            }
            list.remove(pos)
        };
        block.remove_device(id);
        entry.export.stop();
        if let Some(ev) = events {
            ev.emit("BLOCK_EXPORT_DELETED", Some(json!({ "id": id })));
        }
        Ok(())
    }

    /// `query-block-exports`.
    pub fn query(&self) -> Value {
        Value::Array(
            self.lock()
                .iter()
                .map(|e| {
                    json!({
                        "type": e.opts.ty,
                        "id": e.opts.id,
                        "node-name": e.opts.node_name,
                        "shutting-down": false,
                    })
                })
                .collect(),
        )
    }

    /// Stops every export (daemon shutdown), newest first.
    pub fn stop_all(&self, block: &BlockState) {
        let entries: Vec<Entry> = std::mem::take(&mut *self.lock());
        for mut e in entries {
            block.remove_device(&e.opts.id);
            e.export.stop();
        }
    }
}

fn socket_address_type() -> Type {
    let unix = ObjectType::new("UnixSocketAddress")
        .member("path", Type::Str)
        .optional("abstract", Type::Bool)
        .optional("tight", Type::Bool);
    let inet = ObjectType::new("InetSocketAddress")
        .member("host", Type::Str)
        .member("port", Type::Str)
        .optional("numeric", Type::Bool)
        .optional("to", Type::Uint16)
        .optional("ipv4", Type::Bool)
        .optional("ipv6", Type::Bool)
        .optional("keep-alive", Type::Bool);
    let vsock = ObjectType::new("VsockSocketAddress")
        .member("cid", Type::Str)
        .member("port", Type::Str);
    let fd = ObjectType::new("String").member("str", Type::Str);
    ObjectType::new("SocketAddress")
        .member(
            "type",
            Type::enumeration("SocketAddressType", &["inet", "unix", "vsock", "fd"]),
        )
        .variants(
            "type",
            vec![
                ("inet".into(), inet),
                ("unix".into(), unix),
                ("vsock".into(), vsock),
                ("fd".into(), fd),
            ],
        )
        .into_type()
}

fn block_export_options_type() -> ObjectType {
    let vub = ObjectType::new("BlockExportOptionsVhostUserBlk")
        .member("addr", socket_address_type())
        .optional("logical-block-size", Type::Size)
        .optional("num-queues", Type::Uint16)
        .optional("werror", on_error_type())
        .optional("rerror", on_error_type());
    let nbd = ObjectType::new("BlockExportOptionsNbd")
        .optional("name", Type::Str)
        .optional("description", Type::Str)
        .optional("bitmaps", Type::array(Type::Any))
        .optional("allocation-depth", Type::Bool);
    ObjectType::new("BlockExportOptions")
        .member("type", Type::enumeration("BlockExportType", EXPORT_TYPES))
        .member("id", Type::Str)
        .optional("fixed-iothread", Type::Bool)
        .optional("iothread", Type::Str)
        .member("node-name", Type::Str)
        .optional("writable", Type::Bool)
        .optional("writethrough", Type::Bool)
        .optional("allow-inactive", Type::Bool)
        .variants(
            "type",
            vec![
                ("nbd".into(), nbd),
                ("vhost-user-blk".into(), vub),
                ("fuse".into(), ObjectType::new("BlockExportOptionsFuse")),
                (
                    "vduse-blk".into(),
                    ObjectType::new("BlockExportOptionsVduseBlk"),
                ),
            ],
        )
}

/// Registers the export commands and event.
pub fn register(
    reg: &mut Registry,
    block: &Arc<BlockState>,
    exports: &Arc<ExportState>,
) -> Result<(), RegistryError> {
    let (b, x) = (block.clone(), exports.clone());
    reg.register(
        Command::new("block-export-add", move |args, _| {
            x.add(&b, ExportOptions::from_json(args)?)?;
            Ok(json!({}))
        })
        .args(block_export_options_type()),
    )?;
    let (b, x) = (block.clone(), exports.clone());
    reg.register(
        Command::new("block-export-del", move |args, ctx| {
            let hard = args.get("mode").and_then(Value::as_str) == Some("hard");
            x.del(&b, str_arg(args, "id"), hard, Some(ctx.events()))?;
            Ok(json!({}))
        })
        .args(
            ObjectType::new("q_obj_block-export-del-arg")
                .member("id", Type::Str)
                .optional(
                    "mode",
                    Type::enumeration("BlockExportRemoveMode", &["safe", "hard"]),
                ),
        ),
    )?;
    let x = exports.clone();
    reg.register(
        Command::new("query-block-exports", move |_, _| Ok(x.query()))
            .returns(Type::array(Type::Any)),
    )?;
    reg.register_event(
        "BLOCK_EXPORT_DELETED",
        ObjectType::new("q_obj_BLOCK_EXPORT_DELETED-arg").member("id", Type::Str),
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keyval_and_json_options() {
        let kv = strata_block::options::keyval_to_json(
            "type=vhost-user-blk,id=e0,node-name=n,addr.type=unix,addr.path=/x.sock,writable=on,num-queues=2,logical-block-size=4k",
        )
        .unwrap();
        let o = ExportOptions::from_json(kv.as_object().unwrap()).unwrap();
        assert_eq!(o.id, "e0");
        assert!(o.writable);
        assert_eq!(o.num_queues, 2);
        assert_eq!(o.logical_block_size, 4096);
        assert_eq!(o.unix_path, Some(PathBuf::from("/x.sock")));
        let j = json!({"type": "vhost-user-blk", "id": "e1", "node-name": "n",
                        "addr": {"type": "unix", "path": "/y"}});
        let o = ExportOptions::from_json(j.as_object().unwrap()).unwrap();
        assert!(!o.writable);
        assert_eq!((o.num_queues, o.logical_block_size), (1, 512));
        let bad = json!({"type": "vhost-user-blk", "id": "e1", "node-name": "n"});
        assert!(ExportOptions::from_json(bad.as_object().unwrap()).is_err());
        let bad = json!({"type": "vhost-user-blk", "id": "e1", "node-name": "n",
                          "addr": {"type": "unix", "path": "/y"}, "bogus": 1});
        assert!(ExportOptions::from_json(bad.as_object().unwrap()).is_err());
    }
}
