//! Fuzz target `qmp_json`: see `strata_fuzz_harness::qmp_json` for what it feeds and checks.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| strata_fuzz_harness::qmp_json(data));
