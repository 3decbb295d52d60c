//! The VM's QMP commands and events, registered on the same [`Registry`] as the
//! block-layer commands of `strata_qmp::blockdev` (nodes, bitmaps, jobs, backup):
//! `query-status`, `stop`, `cont`, `system_powerdown`, `system_reset`, and the
//! `STOP`, `RESUME`, `SHUTDOWN`, `POWERDOWN` and `RESET` events (QEMU 10's members;
//! `BLOCK_IO_ERROR` is declared with the block commands). Every disk is listed by
//! `query-block` through [`register_disks`].
//! `quit` is built into the registry; the binary turns it into a shutdown.

use std::sync::Arc;

use strata_qmp::blockdev::{BlockState, GuestDevice};

use serde_json::json;
use strata_qmp::{Command, ObjectType, QmpError, Registry, RegistryError, Type};

use crate::vm::{RunState, VmCore};

fn run_state_type() -> Type {
    Type::enumeration(
        "RunState",
        &[
            "debug",
            "inmigrate",
            "internal-error",
            "io-error",
            "paused",
            "postmigrate",
            "prelaunch",
            "finish-migrate",
            "restore-vm",
            "running",
            "save-vm",
            "shutdown",
            "suspended",
            "watchdog",
            "guest-panicked",
            "colo",
        ],
    )
}

fn shutdown_cause_type() -> Type {
    Type::enumeration(
        "ShutdownCause",
        &[
            "none",
            "host-error",
            "host-qmp-quit",
            "host-qmp-system-reset",
            "host-signal",
            "host-ui",
            "guest-shutdown",
            "guest-reset",
            "guest-panic",
            "subsystem-reset",
            "snapshot-load",
        ],
    )
}

/// Registers the VM commands and events for `core`.
pub fn register(reg: &mut Registry, core: &Arc<VmCore>) -> Result<(), RegistryError> {
    let c = core.clone();
    reg.register(
        Command::new("query-status", move |_, _| {
            let st = c.status();
            Ok(json!({"running": st == RunState::Running, "status": st.as_str()}))
        })
        .returns(
            ObjectType::new("StatusInfo")
                .member("running", Type::Bool)
                .member("status", run_state_type())
                .into_type(),
        ),
    )?;
    let c = core.clone();
    reg.register(Command::new("stop", move |_, _| {
        c.stop();
        Ok(json!({}))
    }))?;
    let c = core.clone();
    reg.register(Command::new("cont", move |_, _| {
        c.cont().map_err(QmpError::generic)?;
        Ok(json!({}))
    }))?;
    let c = core.clone();
    reg.register(Command::new("system_powerdown", move |_, _| {
        c.powerdown();
        Ok(json!({}))
    }))?;
    let c = core.clone();
    reg.register(Command::new("system_reset", move |_, _| {
        c.system_reset().map_err(QmpError::generic)?;
        Ok(json!({}))
    }))?;
    let empty = |n: &str| ObjectType::new(format!("q_empty_{n}"));
    reg.register_event("STOP", empty("STOP"))?;
    reg.register_event("RESUME", empty("RESUME"))?;
    reg.register_event("POWERDOWN", empty("POWERDOWN"))?;
    for name in ["SHUTDOWN", "RESET"] {
        reg.register_event(
            name,
            ObjectType::new(format!("q_obj_{name}-arg"))
                .member("guest", Type::Bool)
                .member("reason", shutdown_cause_type()),
        )?;
    }
    Ok(())
}

/// A VM disk as `query-block` sees it.
struct VmDisk {
    id: String,
    node: String,
    transport: Arc<std::sync::Mutex<crate::devices::block::BlkTransport>>,
}

impl GuestDevice for VmDisk {
    fn id(&self) -> String {
        self.id.clone()
    }
    fn node_name(&self) -> String {
        self.node.clone()
    }
    fn io_status(&self) -> &'static str {
        self.transport
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .device()
            .io_status()
            .as_str()
    }
    fn resume(&self) {
        self.transport
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .resume();
    }
}

/// Lists every disk of `core` in `state`, so that `query-block` shows it (with its
/// io-status) as QEMU shows a guest device.
pub fn register_disks(state: &BlockState, core: &VmCore) {
    for d in core.disks().iter().rev() {
        state.add_device(Arc::new(VmDisk {
            id: d.config.id.clone(),
            node: d.config.node.name().to_string(),
            transport: d.transport.clone(),
        }));
    }
}
