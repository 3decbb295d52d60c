//! `strata-storage-daemon`: the block graph, block jobs and (later) exports of
//! Strata, driven over QMP exactly like `qemu-storage-daemon`.
//!
//! Start-up order: logging, arguments, block nodes from `--blockdev`, the QMP
//! registry and monitors, pidfile, daemonize. `quit`, SIGTERM or SIGINT shut down
//! cleanly: jobs are cancelled, nodes flushed and persistent bitmaps stored.

mod args;
mod exports;

use std::collections::HashMap;
use std::io::Write;
use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use signal_hook::consts::{SIGINT, SIGTERM};
use strata_block::BlockdevOptions;
use strata_qmp::blockdev::exports::{self as qmp_exports, ExportOptions, ExportState};
use strata_qmp::blockdev::{self, BlockState};
use strata_qmp::{QmpServer, Registry};

use args::{parse_chardev, parse_monitor, Args};

fn fail(msg: impl std::fmt::Display) -> ExitCode {
    eprintln!("strata-storage-daemon: {msg}");
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

/// Forks; the parent waits until the child reports that it is ready, then exits.
/// Returns the write end of the readiness pipe in the child.
fn daemonize() -> Result<std::fs::File, String> {
    use std::os::fd::FromRawFd;
    let mut fds = [0i32; 2];
    // SAFETY: pipe writes two new descriptors into the array we pass.
    if unsafe { libc::pipe(fds.as_mut_ptr()) } != 0 {
        return Err("could not create a pipe".into());
    }
    // SAFETY: the process is single-threaded at this point (no monitors yet).
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err("fork failed".into());
    }
    if pid > 0 {
        // SAFETY: fds[0] is the pipe's read end, owned by the parent from now on.
        let mut r = unsafe { std::fs::File::from_raw_fd(fds[0]) };
        // SAFETY: closing the parent's copy of the write end.
        unsafe { libc::close(fds[1]) };
        let mut b = [0u8; 1];
        let ok = std::io::Read::read(&mut r, &mut b).unwrap_or(0) == 1 && b[0] == 0;
        std::process::exit(if ok { 0 } else { 1 });
    }
    // SAFETY: closing the child's copy of the read end; setsid detaches the session.
    unsafe {
        libc::close(fds[0]);
        libc::setsid();
    }
    // SAFETY: fds[1] is the pipe's write end, owned by the child from now on.
    Ok(unsafe { std::fs::File::from_raw_fd(fds[1]) })
}

fn main() -> ExitCode {
    init_logging();
    let args = Args::parse();
    if args.version {
        println!(
            "strata-storage-daemon version {} (QMP compatible with QEMU 10.0)",
            env!("CARGO_PKG_VERSION")
        );
        return ExitCode::SUCCESS;
    }
    let ready_pipe = if args.daemonize {
        match daemonize() {
            Ok(p) => Some(p),
            Err(e) => return fail(e),
        }
    } else {
        None
    };
    let state = BlockState::new();
    for b in &args.blockdev {
        let parsed = if b.trim_start().starts_with('{') {
            // QEMU's JSON dialect and error texts, as on the monitor.
            strata_qmp::json::parse(b.as_bytes())
                .and_then(|v| BlockdevOptions::from_json(&v.to_serde()).map_err(|e| e.desc))
        } else {
            BlockdevOptions::from_keyval(b).map_err(|e| e.desc)
        };
        let r = parsed.and_then(|o| state.graph.blockdev_add(&o).map_err(|e| e.desc));
        if let Err(e) = r {
            state.shutdown();
            return fail(format!("--blockdev {b}: {e}"));
        }
    }
    let export_state = ExportState::new(Arc::new(exports::DaemonExports));
    for x in &args.export {
        let parsed = if x.trim_start().starts_with('{') {
            serde_json::from_str::<serde_json::Value>(x)
                .map_err(|e| format!("JSON parse error: {e}"))
        } else {
            strata_block::options::keyval_to_json(x).map_err(|e| e.desc)
        };
        let r = parsed.and_then(|v| {
            let m = v.as_object().cloned().unwrap_or_default();
            let o = ExportOptions::from_json(&m).map_err(|e| e.desc)?;
            export_state.add(&state, o).map_err(|e| e.desc)
        });
        if let Err(e) = r {
            export_state.stop_all(&state);
            state.shutdown();
            return fail(format!("--export {x}: {e}"));
        }
    }
    let mut reg = Registry::default();
    if let Err(e) = blockdev::register(&mut reg, &state)
        .and_then(|_| blockdev::register_device_cont(&mut reg, &state))
        .and_then(|_| qmp_exports::register(&mut reg, &state, &export_state))
    {
        return fail(format!("command registry: {e}"));
    }
    let server = Arc::new(QmpServer::new(reg));
    state.attach_events(server.events());
    let mut chardevs = HashMap::new();
    for c in &args.chardev {
        match parse_chardev(c) {
            Ok(cd) => {
                chardevs.insert(cd.id.clone(), cd);
            }
            Err(e) => return fail(format!("--chardev {c}: {e}")),
        }
    }
    for m in &args.monitor {
        let id = match parse_monitor(m) {
            Ok(id) => id,
            Err(e) => return fail(format!("--monitor {m}: {e}")),
        };
        let Some(cd) = chardevs.get(&id) else {
            return fail(format!("--monitor {m}: chardev \"{id}\" not found"));
        };
        if let Err(e) = server.listen(&cd.addr) {
            return fail(format!("--chardev {}: {e}", cd.id));
        }
    }
    if let Some(p) = &args.pidfile {
        if let Err(e) = std::fs::write(p, format!("{}\n", std::process::id())) {
            return fail(format!("cannot create PID file: {e}"));
        }
    }
    let srv = server.clone();
    let mut signals = match signal_hook::iterator::Signals::new([SIGTERM, SIGINT]) {
        Ok(s) => s,
        Err(e) => return fail(format!("signal setup: {e}")),
    };
    std::thread::spawn(move || {
        if signals.forever().next().is_some() {
            tracing::info!("signal received, shutting down");
            srv.shutdown();
        }
    });
    if let Some(mut p) = ready_pipe {
        // Like QEMU once it is set up: the standard streams go to /dev/null so
        // that whoever started the daemon is not kept waiting on them.
        if let Ok(null) = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/null")
        {
            use std::os::fd::AsRawFd;
            for fd in 0..3 {
                // SAFETY: dup2 onto the standard descriptors; `null` stays open
                // until after the calls.
                unsafe { libc::dup2(null.as_raw_fd(), fd) };
            }
        }
        let _ = p.write_all(&[0]);
    }
    server.run_until_quit();
    export_state.stop_all(&state);
    let errors = state.shutdown();
    if let Some(p) = &args.pidfile {
        let _ = std::fs::remove_file(p);
    }
    for e in &errors {
        eprintln!("strata-storage-daemon: {e}");
    }
    if errors.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
