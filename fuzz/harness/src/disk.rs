//! An in-memory disk for the virtio targets whose backend checks every range the
//! device sends it: a request outside the capacity is a bug in the device's
//! validation, so it panics (the fuzzer's crash), and a read-only disk panics on any
//! change.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use strata_virtio_blk::{BackendError, BlockBackend};

/// A disk of `size` bytes in memory.
pub(crate) struct MemDisk {
    data: Mutex<Vec<u8>>,
    read_only: bool,
    changes: AtomicU64,
}

impl MemDisk {
    /// A zeroed disk; with `read_only` any change panics.
    pub(crate) fn new(size: usize, read_only: bool) -> Self {
        MemDisk {
            data: Mutex::new(vec![0; size]),
            read_only,
            changes: AtomicU64::new(0),
        }
    }

    /// How many writes, write-zeroes and discards reached the disk so far.
    pub(crate) fn changes(&self) -> u64 {
        self.changes.load(Ordering::Relaxed)
    }

    fn range(&self, offset: u64, len: u64) -> std::ops::Range<usize> {
        let size = self.size();
        let end = offset
            .checked_add(len)
            .expect("device sent an overflowing range");
        assert!(end <= size, "device went past the capacity: {offset}+{len}");
        offset as usize..end as usize
    }

    fn change(&self, offset: u64, len: u64, f: impl FnOnce(&mut [u8])) {
        assert!(!self.read_only, "device changed a read-only disk");
        self.changes.fetch_add(1, Ordering::Relaxed);
        let r = self.range(offset, len);
        f(&mut self.data.lock().unwrap_or_else(|e| e.into_inner())[r]);
    }
}

impl BlockBackend for MemDisk {
    fn size(&self) -> u64 {
        self.data.lock().unwrap_or_else(|e| e.into_inner()).len() as u64
    }
    fn read_only(&self) -> bool {
        self.read_only
    }
    fn read(&self, buf: &mut [u8], offset: u64) -> Result<(), BackendError> {
        let r = self.range(offset, buf.len() as u64);
        buf.copy_from_slice(&self.data.lock().unwrap_or_else(|e| e.into_inner())[r]);
        Ok(())
    }
    fn write(&self, buf: &[u8], offset: u64) -> Result<(), BackendError> {
        self.change(offset, buf.len() as u64, |d| d.copy_from_slice(buf));
        Ok(())
    }
    fn write_zeroes(&self, offset: u64, len: u64, _unmap: bool) -> Result<(), BackendError> {
        self.change(offset, len, |d| d.fill(0));
        Ok(())
    }
    fn discard(&self, offset: u64, len: u64) -> Result<(), BackendError> {
        assert!(!self.read_only, "device discarded on a read-only disk");
        self.changes.fetch_add(1, Ordering::Relaxed);
        self.range(offset, len);
        Ok(())
    }
    fn flush(&self) -> Result<(), BackendError> {
        Ok(())
    }
}
