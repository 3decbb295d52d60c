//! Fuzz target `blockdev_options`: see `strata_fuzz_harness::blockdev_options` for what it feeds and checks.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| strata_fuzz_harness::blockdev_options(data));
