//! The export types `strata-storage-daemon` can start: vhost-user-blk, with its
//! optional error policy reported over QMP.

use std::sync::{Arc, Mutex};

use serde_json::json;
use strata_block::BlockNode;
use strata_qmp::blockdev::exports::{ExportDriver, ExportOptions, RunningExport};
use strata_qmp::blockdev::GuestDevice;
use strata_qmp::EventSink;
use strata_vhost_user_blk::{Export, ExportConfig};
use strata_virtio_blk::config::MAX_LOGICAL_BLOCK_SIZE;
use strata_virtio_blk::{ErrorAction, ErrorEvent, ErrorSink};

/// Starts vhost-user-blk exports.
pub struct DaemonExports;

struct Running {
    export: Arc<Mutex<Export>>,
    device: Option<Arc<dyn GuestDevice>>,
}

impl RunningExport for Running {
    fn in_use(&self) -> bool {
        // QEMU deletes a vhost-user-blk export in safe mode even with a frontend
        // connected (the frontend is disconnected); so does Strata.
        false
    }
    fn stop(&mut self) {
        self.export.lock().unwrap_or_else(|e| e.into_inner()).stop();
    }
    fn device(&self) -> Option<Arc<dyn GuestDevice>> {
        self.device.clone()
    }
}

/// The export as `query-block` and `cont` see it.
struct ExportDevice {
    id: String,
    node: String,
    export: Arc<Mutex<Export>>,
}

impl GuestDevice for ExportDevice {
    fn id(&self) -> String {
        self.id.clone()
    }
    fn node_name(&self) -> String {
        self.node.clone()
    }
    fn io_status(&self) -> &'static str {
        self.export
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .io_status()
            .as_str()
    }
    fn resume(&self) {
        let n = self
            .export
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .resume();
        tracing::info!(export = %self.id, retried = n, "export resumed");
    }
}

/// Sends the device's failed requests to the monitors as `BLOCK_IO_ERROR`, shaped as
/// QEMU 10 sends it for a device on an anonymous block backend (`device` empty) with
/// the io-status enabled (`nospace` present); `qom-path` carries the export id.
struct QmpErrors {
    id: String,
    node: String,
    events: Arc<dyn EventSink>,
}

impl ErrorSink for QmpErrors {
    fn io_error(&self, e: ErrorEvent) {
        self.events.emit(
            "BLOCK_IO_ERROR",
            json!({
                "qom-path": self.id,
                "device": "",
                "node-name": self.node,
                "operation": e.operation,
                "action": e.action,
                "nospace": e.nospace,
                "reason": e.reason,
            }),
        );
    }
}

/// QEMU's `BlockdevOnError` to the device's action; `auto` is the export default
/// (`report`, what qemu-storage-daemon's exports do).
fn action(v: Option<&str>) -> ErrorAction {
    v.and_then(ErrorAction::parse)
        .unwrap_or(ErrorAction::Report)
}

impl ExportDriver for DaemonExports {
    fn start(
        &self,
        o: &ExportOptions,
        node: Arc<BlockNode>,
        events: Arc<dyn EventSink>,
    ) -> Result<Box<dyn RunningExport>, String> {
        let bs = o.logical_block_size;
        if !(512..=u64::from(MAX_LOGICAL_BLOCK_SIZE)).contains(&bs) || !bs.is_power_of_two() {
            return Err(format!(
                "parameter logical-block-size must be a power of 2 between 512 and {MAX_LOGICAL_BLOCK_SIZE}"
            ));
        }
        if o.num_queues == 0 {
            return Err("num-queues must be greater than 0".into());
        }
        if o.rerror.as_deref() == Some("enospc") {
            // QEMU refuses it for reads too (-drive rerror=enospc).
            return Err("'enospc' invalid read error action".into());
        }
        let path = match (o.addr_type.as_deref(), &o.unix_path) {
            (Some("unix"), Some(p)) => p.clone(),
            // qemu-storage-daemon's answer: it has no monitor to receive descriptors.
            (Some("fd"), _) => return Err("only QEMU supports file descriptor passing".into()),
            _ => return Err("Only socket address types 'unix' and 'fd' are supported".into()),
        };
        let cfg = ExportConfig {
            id: o.id.clone(),
            path,
            writable: o.writable,
            num_queues: u16::try_from(o.num_queues).map_err(|_| "num-queues is too large")?,
            logical_block_size: bs as u32,
            serial: "vhost_user_blk".into(),
            writethrough: o.writethrough,
            werror: action(o.werror.as_deref()),
            rerror: action(o.rerror.as_deref()),
        };
        // Without werror/rerror the export behaves as qemu-storage-daemon's: errors
        // are reported to the guest only, and nothing is listed or emitted.
        let policy = o.werror.is_some() || o.rerror.is_some();
        let sink = policy.then(|| {
            Arc::new(QmpErrors {
                id: o.id.clone(),
                node: o.node_name.clone(),
                events,
            }) as Arc<dyn ErrorSink>
        });
        let export = Export::start(cfg, node, sink).map_err(|e| e.to_string())?;
        let export = Arc::new(Mutex::new(export));
        let device = policy.then(|| {
            Arc::new(ExportDevice {
                id: o.id.clone(),
                node: o.node_name.clone(),
                export: export.clone(),
            }) as Arc<dyn GuestDevice>
        });
        Ok(Box::new(Running { export, device }))
    }
}
