//! Fuzz target `qmp_session`: see `strata_fuzz_harness::qmp_session` for what it feeds and checks.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| strata_fuzz_harness::qmp_session(data));
