//! `strata-vm`: boots a guest under KVM with Strata block nodes as its disks and a
//! QMP monitor that has the VM commands next to the storage daemon's block, bitmap,
//! job and backup commands.
//!
//! Start-up: logging, arguments, block nodes (`--blockdev`, `--drive`), disk devices,
//! the VM (memory, devices, ACPI tables, kernel), the monitor, then the vCPUs and
//! the event loop. Guest power-off or reset (with `--no-reboot`), `quit`, SIGTERM or
//! SIGINT end it cleanly: vCPUs stopped, `SHUTDOWN` sent, jobs cancelled, nodes
//! flushed and closed.

use std::process::ExitCode;

use clap::Parser;
use signal_hook::consts::{SIGINT, SIGTERM};
use strata_block::BlockdevOptions;
use strata_qmp::blockdev::{self, BlockState};
use strata_qmp::{QmpServer, Registry};
use strata_vm::boot::BootSpec;
use strata_vm::cli::{self, Args, DeviceSpec, SerialBackend};
use strata_vm::devices::block::DiskConfig;
use strata_vm::vm::{ShutdownCause, Vm, VmConfig};

fn fail(msg: impl std::fmt::Display) -> ExitCode {
    eprintln!("strata-vm: {msg}");
    ExitCode::FAILURE
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("STRATA_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

fn add_blockdev(state: &BlockState, b: &str) -> Result<(), String> {
    let parsed = if b.trim_start().starts_with('{') {
        strata_qmp::json::parse(b.as_bytes())
            .and_then(|v| BlockdevOptions::from_json(&v.to_serde()).map_err(|e| e.desc))
    } else {
        BlockdevOptions::from_keyval(b).map_err(|e| e.desc)
    };
    parsed
        .and_then(|o| state.graph.blockdev_add(&o).map(|_| ()).map_err(|e| e.desc))
        .map_err(|e| format!("--blockdev {b}: {e}"))
}

/// Opens the nodes and collects the devices of the command line.
fn block_setup(args: &Args, state: &BlockState) -> Result<Vec<DiskConfig>, String> {
    for b in &args.blockdev {
        add_blockdev(state, b)?;
    }
    let mut devices: Vec<DeviceSpec> = Vec::new();
    for (i, d) in args.drive.iter().enumerate() {
        let spec = cli::parse_drive(d, i).map_err(|e| format!("--drive {d}: {e}"))?;
        let o = BlockdevOptions::from_json(&spec.node)
            .map_err(|e| format!("--drive {d}: {}", e.desc))?;
        state
            .graph
            .blockdev_add(&o)
            .map_err(|e| format!("--drive {d}: {}", e.desc))?;
        devices.extend(spec.device);
    }
    for (i, d) in args.device.iter().enumerate() {
        devices.push(cli::parse_device(d, i).map_err(|e| format!("--device {d}: {e}"))?);
    }
    let mut disks = Vec::new();
    for d in devices {
        if disks.iter().any(|x: &DiskConfig| x.id == d.id) {
            return Err(format!("Duplicate device ID '{}'", d.id));
        }
        let node = state
            .graph
            .node(&d.node)
            .ok_or_else(|| format!("Drive '{}' not found", d.node))?;
        disks.push(DiskConfig {
            id: d.id,
            // The device turns read-only by itself on a read-only node.
            read_only: d.read_only,
            node,
            num_queues: d.num_queues,
            queue_size: d.queue_size,
            serial: d.serial,
            writethrough: d.writethrough,
            werror: d.werror,
            rerror: d.rerror,
        });
    }
    Ok(disks)
}

fn serial_output(b: &SerialBackend) -> Result<strata_vm::devices::serial::Output, String> {
    Ok(match b {
        SerialBackend::Stdio => Box::new(std::io::stdout()),
        SerialBackend::None => Box::new(std::io::sink()),
        SerialBackend::File(p) => Box::new(
            std::fs::File::create(p)
                .map_err(|e| format!("--serial: cannot create {}: {e}", p.display()))?,
        ),
    })
}

fn main() -> ExitCode {
    init_logging();
    let args = Args::parse();
    let memory = match cli::parse_memory(&args.memory) {
        Ok(m) => m,
        Err(e) => return fail(e),
    };
    let vcpus = match cli::parse_smp(&args.smp) {
        Ok(n) => n,
        Err(e) => return fail(e),
    };
    let serial = match cli::parse_serial(&args.serial) {
        Ok(s) => s,
        Err(e) => return fail(e),
    };
    let qmp_addr = match args.qmp.as_deref().map(cli::parse_qmp).transpose() {
        Ok(a) => a,
        Err(e) => return fail(e),
    };
    let state = BlockState::new();
    let disks = match block_setup(&args, &state) {
        Ok(d) => d,
        Err(e) => {
            state.shutdown();
            return fail(e);
        }
    };
    let serial_out = match serial_output(&serial) {
        Ok(o) => o,
        Err(e) => return fail(e),
    };
    let cfg = VmConfig {
        memory,
        vcpus,
        boot: BootSpec {
            kernel: args.kernel.clone(),
            initrd: args.initrd.clone(),
            cmdline: args.append.clone(),
        },
        disks,
        serial_out,
        serial_stdin: serial == SerialBackend::Stdio,
        no_reboot: args.no_reboot,
        start_paused: args.start_paused,
    };
    let mut vm = match Vm::create(cfg) {
        Ok(vm) => vm,
        Err(e) => {
            state.shutdown();
            return fail(e);
        }
    };
    let core = vm.core().clone();
    let server = match qmp_addr {
        Some(addr) => {
            let mut reg = Registry::default();
            if let Err(e) = blockdev::register(&mut reg, &state)
                .and_then(|_| strata_vm::qmp::register(&mut reg, &core))
            {
                return fail(format!("command registry: {e}"));
            }
            strata_vm::qmp::register_disks(&state, &core);
            let server = QmpServer::new(reg);
            state.attach_events(server.events());
            core.attach_events(server.events());
            let ctl = core.control().clone();
            server.on_quit(move || ctl.request_shutdown(ShutdownCause::HostQmpQuit));
            if let Err(e) = server.listen(&addr) {
                state.shutdown();
                return fail(format!("--qmp: {e}"));
            }
            Some(server)
        }
        None => None,
    };
    let ctl = core.control().clone();
    match signal_hook::iterator::Signals::new([SIGTERM, SIGINT]) {
        Ok(mut signals) => {
            std::thread::spawn(move || {
                if signals.forever().next().is_some() {
                    ctl.request_shutdown(ShutdownCause::HostSignal);
                }
            });
        }
        Err(e) => return fail(format!("signal setup: {e}")),
    }
    if let Err(e) = vm.start() {
        return fail(e);
    }
    let (cause, mut errors) = match vm.run() {
        Ok(c) => (c, Vec::new()),
        Err(e) => (ShutdownCause::InternalError(e.to_string()), Vec::new()),
    };
    errors.extend(vm.shutdown(&cause));
    errors.extend(state.shutdown());
    if let Some(s) = server {
        s.shutdown();
    }
    drop(vm);
    for e in &errors {
        eprintln!("strata-vm: {e}");
    }
    if let ShutdownCause::InternalError(msg) = &cause {
        return fail(msg);
    }
    if errors.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
