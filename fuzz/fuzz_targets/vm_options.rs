//! Fuzz target `vm_options`: see `strata_fuzz_harness::vm_options` for what it feeds and checks.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| strata_fuzz_harness::vm_options(data));
