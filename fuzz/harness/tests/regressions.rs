//! Replays every stored fuzzer finding under plain `cargo test`, without libFuzzer.
//!
//! Each file in `fuzz/regressions/<target>/` is an input that once broke an invariant of
//! `<target>`; it is fed to the same harness function the fuzz target calls. A directory
//! named after no known target fails the test, so that a typo cannot hide inputs.

use std::fs;
use std::panic;
use std::path::{Path, PathBuf};

use strata_fuzz_harness::TARGETS;

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
            replayed += 1;
            if let Err(e) = panic::catch_unwind(|| run(&data)) {
                let msg = e
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                failures.push(format!(
                    "{name}/{}: {msg}",
                    file.file_name().unwrap_or_default().to_string_lossy()
                ));
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
