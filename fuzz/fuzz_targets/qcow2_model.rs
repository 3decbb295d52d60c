//! Fuzz target `qcow2_model`: see `strata_fuzz_harness::qcow2_model` for what it feeds and checks.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| strata_fuzz_harness::qcow2_model(data));
