//! The export types `strata-storage-daemon` can start: vhost-user-blk.

use std::sync::Arc;

use strata_block::BlockNode;
use strata_qmp::blockdev::exports::{ExportDriver, ExportOptions, RunningExport};
use strata_vhost_user_blk::{Export, ExportConfig};
use strata_virtio_blk::config::MAX_LOGICAL_BLOCK_SIZE;

/// Starts vhost-user-blk exports.
pub struct DaemonExports;

struct Running(Export);

impl RunningExport for Running {
    fn in_use(&self) -> bool {
        // QEMU deletes a vhost-user-blk export in safe mode even with a frontend
        // connected (the frontend is disconnected); so does Strata.
        false
    }
    fn stop(&mut self) {
        self.0.stop();
    }
}

impl ExportDriver for DaemonExports {
    fn start(
        &self,
        o: &ExportOptions,
        node: Arc<BlockNode>,
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
        };
        Export::start(cfg, node)
            .map(|e| Box::new(Running(e)) as Box<dyn RunningExport>)
            .map_err(|e| e.to_string())
    }
}
