//! The raw format: the virtual disk is the storage node, byte for byte.
//! Block status comes from the storage's holes (`SEEK_DATA` / `SEEK_HOLE`).

use std::sync::Arc;

use crate::driver::{BlockIo, BlockStatus, FormatDriver, ImageInfo, Preallocation};
use crate::iobuf::{self, IoBuf, IoBufMut};
use crate::storage::Storage;
use crate::{Error, Result};

/// A raw image over a storage node.
pub struct Raw {
    storage: Arc<dyn Storage>,
    read_only: bool,
}

impl Raw {
    /// Opens a raw image over `storage`.
    pub fn open(storage: Arc<dyn Storage>, read_only: bool) -> Result<Self> {
        Ok(Raw {
            read_only: read_only || storage.read_only(),
            storage,
        })
    }

    /// Makes `storage` a raw image of `size` bytes with the given preallocation.
    pub fn create(storage: &dyn Storage, size: u64, prealloc: Preallocation) -> Result<()> {
        storage.set_size(0)?;
        match prealloc {
            Preallocation::Off | Preallocation::Metadata => storage.set_size(size),
            Preallocation::Falloc => {
                storage.set_size(size)?;
                storage.preallocate(0, size)
            }
            Preallocation::Full => storage.write_zeroes(0, size, false),
        }
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size() => Ok(()),
            _ => Err(Error::invalid(format!(
                "Request out of range: offset {offset} length {len} (image size {})",
                self.size()
            ))),
        }
    }

    fn check_write(&self, offset: u64, len: u64) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        self.check_range(offset, len)
    }
}

impl BlockIo for Raw {
    fn size(&self) -> u64 {
        // QEMU counts whole 512-byte sectors: a partial last sector reads as zeroes.
        self.storage.size().unwrap_or(0).div_ceil(512) * 512
    }

    fn read(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.check_range(offset, buf.len() as u64)?;
        self.storage.read_at(buf, offset)
    }

    fn write(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.check_write(offset, buf.len() as u64)?;
        self.storage.write_at(buf, offset)
    }

    fn read_vectored(&self, bufs: &[IoBufMut<'_>], offset: u64) -> Result<()> {
        self.check_range(offset, iobuf::total_len_mut(bufs) as u64)?;
        self.storage.read_vectored_at(bufs, offset)
    }

    fn write_vectored(&self, bufs: &[IoBuf<'_>], offset: u64) -> Result<()> {
        self.check_write(offset, iobuf::total_len(bufs) as u64)?;
        self.storage.write_vectored_at(bufs, offset)
    }

    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> Result<()> {
        self.check_write(offset, len)?;
        self.storage.write_zeroes(offset, len, may_unmap)
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.check_write(offset, len)?;
        self.storage.discard(offset, len)
    }

    fn flush(&self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        self.storage.flush()
    }
}

impl FormatDriver for Raw {
    fn format_name(&self) -> &'static str {
        "raw"
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<BlockStatus> {
        self.check_range(offset, len)?;
        if len == 0 {
            return Err(Error::invalid("block status of an empty range"));
        }
        let (data, n) = self.storage.extent_at(offset, len)?;
        Ok(BlockStatus {
            len: n.max(1),
            allocated: true,
            zero: !data,
            data,
            compressed: false,
            offset: Some(offset),
        })
    }

    fn storage(&self) -> Arc<dyn Storage> {
        self.storage.clone()
    }

    fn info(&self) -> Result<ImageInfo> {
        Ok(ImageInfo {
            format: "raw".into(),
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
        self.read_only
    }

    fn resize(&self, new_size: u64, prealloc: Preallocation) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        let old = self.size();
        self.storage.set_size(new_size)?;
        if new_size > old {
            match prealloc {
                Preallocation::Off | Preallocation::Metadata => {}
                Preallocation::Falloc => self.storage.preallocate(old, new_size - old)?,
                Preallocation::Full => self.storage.write_zeroes(old, new_size - old, false)?,
            }
        }
        Ok(())
    }
}
