//! Fuzz target `qmp_commands`: see `strata_fuzz_harness::qmp_commands` for what it feeds and checks.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| strata_fuzz_harness::qmp_commands(data));
