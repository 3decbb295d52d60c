//! Fuzz target `raw_model`: see `strata_fuzz_harness::raw_model` for what it feeds and checks.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| strata_fuzz_harness::raw_model(data));
