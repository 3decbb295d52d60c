//! Fuzz target `qcow2_header`: see `strata_fuzz_harness::qcow2_header` for what it feeds and checks.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| strata_fuzz_harness::qcow2_header(data));
