//! Fuzz target `virtio_blk`: see `strata_fuzz_harness::virtio_blk` for what it feeds and checks.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| strata_fuzz_harness::virtio_blk(data));
