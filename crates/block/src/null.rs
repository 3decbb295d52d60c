//! The `null-co` driver: a disk of a given size that reads zeroes and drops writes
//! (for tests and benchmarks, as in QEMU).

use std::sync::Arc;
use std::time::Duration;

use strata_image::{
    BlockIo, BlockStatus, FormatDriver, ImageInfo, MemStorage, Preallocation, Result, Storage,
};

/// A null disk.
pub struct NullDisk {
    size: std::sync::atomic::AtomicU64,
    storage: Arc<dyn Storage>,
    /// How long each read, write and flush takes (`latency-ns`).
    latency: Duration,
}

impl NullDisk {
    /// A null disk of `size` bytes.
    pub fn new(size: u64) -> Self {
        NullDisk::with_latency(size, Duration::ZERO)
    }

    /// A null disk of `size` bytes whose reads, writes and flushes each take
    /// `latency`, as QEMU's `latency-ns`.
    pub fn with_latency(size: u64, latency: Duration) -> Self {
        NullDisk {
            size: size.into(),
            storage: Arc::new(MemStorage::read_only(Vec::new())),
            latency,
        }
    }

    fn delay(&self) {
        if !self.latency.is_zero() {
            std::thread::sleep(self.latency);
        }
    }
}

impl BlockIo for NullDisk {
    fn size(&self) -> u64 {
        self.size.load(std::sync::atomic::Ordering::Acquire)
    }
    fn read(&self, buf: &mut [u8], _offset: u64) -> Result<()> {
        self.delay();
        buf.fill(0);
        Ok(())
    }
    fn write(&self, _buf: &[u8], _offset: u64) -> Result<()> {
        self.delay();
        Ok(())
    }
    fn write_zeroes(&self, _offset: u64, _len: u64, _may_unmap: bool) -> Result<()> {
        Ok(())
    }
    fn discard(&self, _offset: u64, _len: u64) -> Result<()> {
        Ok(())
    }
    fn flush(&self) -> Result<()> {
        self.delay();
        Ok(())
    }
}

impl FormatDriver for NullDisk {
    fn format_name(&self) -> &'static str {
        "null-co"
    }
    fn block_status(&self, _offset: u64, len: u64) -> Result<BlockStatus> {
        Ok(BlockStatus {
            len,
            allocated: true,
            zero: true,
            data: false,
            compressed: false,
            offset: None,
        })
    }
    fn storage(&self) -> Arc<dyn Storage> {
        self.storage.clone()
    }
    fn info(&self) -> Result<ImageInfo> {
        Ok(ImageInfo {
            format: "null-co".into(),
            virtual_size: self.size(),
            cluster_size: None,
            backing_filename: None,
            full_backing_filename: None,
            backing_format: None,
            dirty_flag: None,
            format_specific: None,
        })
    }
    fn read_only(&self) -> bool {
        false
    }
    fn resize(&self, new_size: u64, _prealloc: Preallocation) -> Result<()> {
        self.size
            .store(new_size, std::sync::atomic::Ordering::Release);
        Ok(())
    }
}
