//! The VM's QMP commands and events, registered on the same [`Registry`] as the
//! block-layer commands of `strata_qmp::blockdev` (nodes, bitmaps, jobs, backup):
//! `query-status`, `stop`, `cont`, `system_powerdown`, `system_reset`, and the
//! `STOP`, `RESUME`, `SHUTDOWN`, `POWERDOWN`, `RESET` and `BLOCK_IO_ERROR` events (QEMU 10's members).
//! `quit` is built into the registry; the binary turns it into a shutdown.

use std::sync::Arc;

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
