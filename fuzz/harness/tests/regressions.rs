//! Replays every stored fuzzer finding under plain `cargo test`, without libFuzzer.
//!
//! Each file in `fuzz/regressions/<target>/` is an input that once broke an invariant of
//! `<target>`; it is fed to the same harness function the fuzz target calls. A directory
//! named after no known target fails the test, so that a typo cannot hide inputs.
//!
//! Unbounded allocation is one of the bugs the fuzzer finds (libFuzzer's
//! `-malloc_limit_mb`); here a capped global allocator plays that role: a single request
//! above [`MAX_ALLOC`] fails, which aborts the test binary with Rust's "memory allocation
//! of N bytes failed" right after the name of the input being replayed.

use std::alloc::{GlobalAlloc, Layout, System};
use std::fs;
use std::io::Write;
use std::panic;
use std::path::{Path, PathBuf};

use strata_fuzz_harness::TARGETS;

/// The largest single allocation a harness may make (the fuzzer's limit is 1 GiB of
/// total usage; nothing legitimate comes near this in one piece).
const MAX_ALLOC: usize = 512 << 20;

/// The system allocator, refusing single requests above [`MAX_ALLOC`].
struct Capped;

// SAFETY: every call is forwarded unchanged to `System`, except oversized requests,
// which return null as the `GlobalAlloc` contract allows for failure.
unsafe impl GlobalAlloc for Capped {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if layout.size() > MAX_ALLOC {
            return std::ptr::null_mut();
        }
        // SAFETY: the caller upholds `alloc`'s contract, which `System` shares.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if layout.size() > MAX_ALLOC {
            return std::ptr::null_mut();
        }
        // SAFETY: as for `alloc`.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from this allocator, that is from `System`, with `layout`.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if new_size > MAX_ALLOC {
            return std::ptr::null_mut();
        }
        // SAFETY: `ptr` came from `System` with `layout`; the caller upholds the rest.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOC: Capped = Capped;

fn regressions_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("regressions")
}

#[test]
fn replay_regressions() {
    let dir = regressions_dir();
    let Ok(entries) = fs::read_dir(&dir) else {
        return;
    };
    let mut failures = Vec::new();
    let mut replayed = 0;
    let mut subdirs: Vec<_> = entries.flatten().map(|e| e.path()).collect();
    subdirs.sort();
    for sub in subdirs.iter().filter(|p| p.is_dir()) {
        let name = sub.file_name().unwrap_or_default().to_string_lossy();
        let Some((_, run)) = TARGETS.iter().find(|(t, _)| *t == name) else {
            panic!("{} is named after no fuzz target", sub.display());
        };
        let mut files: Vec<_> = fs::read_dir(sub)
            .expect("a regression directory is readable")
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.is_file())
            .collect();
        files.sort();
        for file in files {
            let data = fs::read(&file).expect("a regression input is readable");
            // Straight to stderr, past the test harness's capture: if the input aborts
            // the process (see `Capped`), this line names it.
            let _ = writeln!(std::io::stderr(), "replaying {}", file.display());
            replayed += 1;
            if let Err(e) = panic::catch_unwind(|| run(&data)) {
                let msg = e
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                let line = format!(
                    "{name}/{}: {msg}",
                    file.file_name().unwrap_or_default().to_string_lossy()
                );
                let _ = writeln!(std::io::stderr(), "FAILED {line}");
                failures.push(line);
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {replayed} regression inputs fail:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
