//! The block-layer QMP commands shared by `strata-storage-daemon` and the VMM:
//! node management, dirty bitmaps, block jobs, backup and `transaction`. Each
//! submodule registers its commands with QEMU 10's argument schemas; handlers call
//! into `strata-block` and `strata-jobs` and map their errors to QMP classes.

mod backup;
mod bitmaps;
pub mod exports;
mod jobs;
mod nodes;
mod transaction;

use std::sync::{Arc, OnceLock};

use serde_json::Value;
use strata_block::{BlockError, BlockGraph, ErrorClass as BlockClass};
use strata_jobs::{EventSink, JobManager};

use crate::dispatch::{Registry, RegistryError};
use crate::error::{ErrorClass, QmpError};
use crate::events::EventSender;

/// The block layer a monitor controls.
pub struct BlockState {
    /// The node graph.
    pub graph: Arc<BlockGraph>,
    /// The block jobs.
    pub jobs: Arc<JobManager>,
    events: Arc<LateEvents>,
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
        })
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
    transaction::register(reg, state)?;
    Ok(())
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
