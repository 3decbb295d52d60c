//! Fuzz target `virtio_mmio`: see `strata_fuzz_harness::virtio_mmio` for what it feeds and checks.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| strata_fuzz_harness::virtio_mmio(data));
