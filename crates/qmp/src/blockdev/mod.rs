//! The block-layer QMP commands shared by `strata-storage-daemon` and the VMM:
//! node management, dirty bitmaps, block jobs, backup and `transaction`. Each
//! submodule registers its commands with QEMU 10's argument schemas; handlers call
//! into `strata-block` and `strata-jobs` and map their errors to QMP classes.
//! Guest devices with an error policy (exports created with `werror`/`rerror`) are
//! listed by `query-block` and resumed by `cont`.

mod backup;
mod bitmaps;
pub mod exports;
mod jobs;
mod nodes;
mod snapshots;
mod transaction;

use std::sync::{Arc, Mutex, OnceLock};

use serde_json::{json, Value};
use strata_block::{BlockError, BlockGraph, ErrorClass as BlockClass};
use strata_jobs::{EventSink, JobManager};

use crate::dispatch::{Command, Registry, RegistryError};
use crate::error::{ErrorClass, QmpError};
use crate::events::EventSender;
use crate::schema::{ObjectType, Type};

/// A guest-facing device on a node whose error policy can stop it (QEMU's device
/// with `werror`/`rerror`): `query-block` shows its io-status, `cont` resumes it.
pub trait GuestDevice: Send + Sync {
    /// The device id (`qdev` in `query-block`, `qom-path` in `BLOCK_IO_ERROR`).
    fn id(&self) -> String;
    /// The node the device uses.
    fn node_name(&self) -> String;
    /// `ok`, `failed` or `nospace`.
    fn io_status(&self) -> &'static str;
    /// Clears the io-status and retries the requests held by a stop.
    fn resume(&self);
}

/// The block layer a monitor controls.
pub struct BlockState {
    /// The node graph.
    pub graph: Arc<BlockGraph>,
    /// The block jobs.
    pub jobs: Arc<JobManager>,
    events: Arc<LateEvents>,
    devices: Mutex<Vec<Arc<dyn GuestDevice>>>,
}

/// Events emitted before the server exists are dropped; afterwards they go to
/// every monitor.
#[derive(Default)]
pub struct LateEvents(OnceLock<EventSender>);

impl EventSink for LateEvents {
    fn emit(&self, name: &str, data: Value) {
        if let Some(s) = self.0.get() {
            s.emit(name, Some(data));
        }
    }
}

impl BlockState {
    /// An empty block layer.
    pub fn new() -> Arc<Self> {
        let events = Arc::new(LateEvents::default());
        Arc::new(BlockState {
            graph: Arc::new(BlockGraph::new()),
            jobs: Arc::new(JobManager::new(events.clone())),
            events,
            devices: Mutex::new(Vec::new()),
        })
    }

    /// Where events go (dropped until a server is attached).
    pub fn event_sink(&self) -> Arc<dyn EventSink> {
        self.events.clone()
    }

    fn device_list(&self) -> std::sync::MutexGuard<'_, Vec<Arc<dyn GuestDevice>>> {
        self.devices.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Lists a device in `query-block` (newest first) and lets `cont` resume it.
    pub fn add_device(&self, d: Arc<dyn GuestDevice>) {
        self.device_list().insert(0, d);
    }

    /// Forgets the device `id`.
    pub fn remove_device(&self, id: &str) {
        self.device_list().retain(|d| d.id() != id);
    }

    /// The registered devices, newest first.
    pub fn devices(&self) -> Vec<Arc<dyn GuestDevice>> {
        self.device_list().clone()
    }

    /// Connects job events to the server's broadcaster (once).
    pub fn attach_events(&self, sender: EventSender) {
        let _ = self.events.0.set(sender);
    }

    /// Clean shutdown: cancel jobs, then flush and close every node (persistent
    /// bitmaps are stored). Returns the errors met on the way.
    pub fn shutdown(&self) -> Vec<String> {
        self.jobs.cancel_all();
        self.graph.close_all().into_iter().map(|e| e.desc).collect()
    }
}

/// Registers every block-layer command and event.
pub fn register(reg: &mut Registry, state: &Arc<BlockState>) -> Result<(), RegistryError> {
    nodes::register(reg, state)?;
    bitmaps::register(reg, state)?;
    jobs::register(reg, state)?;
    backup::register(reg, state)?;
    snapshots::register(reg, state)?;
    transaction::register(reg, state)?;
    reg.register_event(
        "BLOCK_IO_ERROR",
        ObjectType::new("q_obj_BLOCK_IO_ERROR-arg")
            .member("qom-path", Type::Str)
            .member("device", Type::Str)
            .optional("node-name", Type::Str)
            .member(
                "operation",
                Type::enumeration("IoOperationType", &["read", "write"]),
            )
            .member(
                "action",
                Type::enumeration("BlockErrorAction", &["ignore", "report", "stop"]),
            )
            .optional("nospace", Type::Bool)
            .member("reason", Type::Str),
    )?;
    Ok(())
}

/// `cont` for a process without a VM run state (the storage daemon): resumes every
/// device the error policy stopped. A VMM registers its own `cont`, which resumes the
/// guest and its devices together.
pub fn register_device_cont(
    reg: &mut Registry,
    state: &Arc<BlockState>,
) -> Result<(), RegistryError> {
    let s = state.clone();
    reg.register(Command::new("cont", move |_, _| {
        for d in s.devices() {
            d.resume();
        }
        Ok(json!({}))
    }))?;
    Ok(())
}

/// QEMU's `BlockdevOnError` values.
const ON_ERROR: &[&str] = &["report", "ignore", "enospc", "stop", "auto"];

/// The `BlockdevOnError` enumeration of the schema (jobs' `on-source-error` /
/// `on-target-error`, the exports' `werror` / `rerror`).
fn on_error_type() -> Type {
    Type::enumeration("BlockdevOnError", ON_ERROR)
}

fn qmp_err(e: BlockError) -> QmpError {
    let class = match e.class {
        BlockClass::GenericError => ErrorClass::GenericError,
        BlockClass::DeviceNotFound => ErrorClass::DeviceNotFound,
        BlockClass::DeviceNotActive => ErrorClass::DeviceNotActive,
    };
    QmpError::new(class, e.desc)
}

fn str_arg<'a>(args: &'a serde_json::Map<String, Value>, name: &str) -> &'a str {
    args.get(name).and_then(Value::as_str).unwrap_or("")
}

fn opt_str<'a>(args: &'a serde_json::Map<String, Value>, name: &str) -> Option<&'a str> {
    args.get(name).and_then(Value::as_str)
}

fn opt_bool(args: &serde_json::Map<String, Value>, name: &str) -> Option<bool> {
    args.get(name).and_then(Value::as_bool)
}
