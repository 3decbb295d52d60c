//! The logic behind Strata's fuzz targets.
//!
//! Every target in `fuzz/fuzz_targets/` is a one-line call into this crate, so that the
//! same code runs under libFuzzer (`cargo +nightly fuzz run <target>`) and under stable
//! `cargo test`, which replays every input stored in `fuzz/regressions/<target>/`
//! (see `tests/regressions.rs`). Each entry point takes the raw fuzzer input and panics
//! when an invariant breaks; inputs that a driver rightly refuses are not failures.
//!
//! The targets:
//!
//! - [`qcow2_open`]: arbitrary bytes as a qcow2 image, opened read-write and read-only,
//!   driven by a short operation script taken from the input's tail, then checked and
//!   repaired.
//! - [`qcow2_model`]: structure-aware operation sequences on a freshly created qcow2 image,
//!   compared byte for byte with an in-memory model of the disk.
//! - [`raw_model`]: the same for the raw driver.
//! - [`qcow2_header`]: the qcow2 header parser alone, with a serialise/parse round trip.
//! - [`qmp_json`]: the QMP monitor's JSON stream parser, split three ways, with a
//!   print/parse round trip.
//! - [`qmp_session`]: arbitrary bytes into an in-process QMP monitor (the storage
//!   daemon's block commands) over a scratch block graph.
//! - [`qmp_commands`]: structure-aware QMP command sequences with arbitrary arguments
//!   into the same monitor.
//! - [`blockdev_options`]: `--blockdev` / `blockdev-add` options, key=value and JSON.
//! - [`virtio_blk`]: a virtio-blk queue in guest memory made of the input, processed
//!   by the device on an in-memory disk.
//! - [`virtio_mmio`]: strata-vm's virtio-mmio register file under a script of hostile
//!   guest register accesses, memory stores and queue processing.
//! - [`vm_options`]: strata-vm's `--drive`, `--device`, `-m`, `--smp`, `--serial` and
//!   `--qmp` parsers.

mod blockdev;
mod disk;
mod header;
mod model;
mod open;
mod pattern;
mod qmp_commands;
mod qmp_json;
mod qmp_scratch;
mod qmp_session;
mod virtio_blk;
mod virtio_mmio;
mod vm_options;

pub use blockdev::blockdev_options;
pub use header::qcow2_header;
pub use model::{qcow2_model, raw_model};
pub use open::qcow2_open;
pub use qmp_commands::qmp_commands;
pub use qmp_json::qmp_json;
pub use qmp_session::qmp_session;
pub use virtio_blk::virtio_blk;
pub use virtio_mmio::virtio_mmio;
pub use vm_options::vm_options;

/// Whether to print what a target decodes and does to stderr (`STRATA_FUZZ_TRACE=1`),
/// to read what a crashing or slow input does.
pub(crate) fn trace() -> bool {
    static TRACE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *TRACE.get_or_init(|| std::env::var_os("STRATA_FUZZ_TRACE").is_some())
}

/// The most an in-memory image under test may grow to. Drivers that try to write past it
/// get an error from the storage, never more memory.
pub const STORAGE_LIMIT: u64 = 64 << 20;

/// A target's entry point: takes the fuzzer input, panics when an invariant breaks.
pub type Target = fn(&[u8]);

/// Every fuzz target by name, with its entry point (what the regression replay iterates).
pub const TARGETS: &[(&str, Target)] = &[
    ("qcow2_open", qcow2_open),
    ("qcow2_model", qcow2_model),
    ("raw_model", raw_model),
    ("qcow2_header", qcow2_header),
    ("qmp_json", qmp_json),
    ("qmp_session", qmp_session),
    ("qmp_commands", qmp_commands),
    ("blockdev_options", blockdev_options),
    ("virtio_blk", virtio_blk),
    ("virtio_mmio", virtio_mmio),
    ("vm_options", vm_options),
];
