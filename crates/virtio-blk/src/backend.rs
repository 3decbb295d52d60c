//! The storage a virtio-blk device executes requests on.
//!
//! The trait is deliberately small (byte offsets, owned buffers) so that tests can
//! use an in-memory disk and the daemon can plug in a [`strata_block::BlockNode`].
//! Every guest write goes through [`BlockBackend::write`], [`BlockBackend::write_zeroes`]
//! or [`BlockBackend::discard`], so for a `BlockNode` dirty bitmaps and a running
//! backup's copy-before-write hook see it.

use strata_block::{iobuf, BlockNode, IoBuf, IoBufMut};

/// A failed backend operation.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct BackendError {
    /// What went wrong, in the backend's words.
    pub message: String,
    /// Whether the failure was "no space left on device" (`werror=enospc` stops only then).
    pub no_space: bool,
}

impl BackendError {
    /// An I/O error that is not about free space.
    pub fn io(message: impl Into<String>) -> Self {
        BackendError {
            message: message.into(),
            no_space: false,
        }
    }
}

/// The block storage behind a virtio-blk device. Offsets and lengths are in bytes and
/// have already been checked against [`BlockBackend::size`] by the device.
pub trait BlockBackend: Send + Sync {
    /// Current size in bytes.
    fn size(&self) -> u64;
    /// Whether the backend refuses writes.
    fn read_only(&self) -> bool;
    /// Reads `buf.len()` bytes at `offset`.
    fn read(&self, buf: &mut [u8], offset: u64) -> Result<(), BackendError>;
    /// Writes `buf` at `offset`.
    fn write(&self, buf: &[u8], offset: u64) -> Result<(), BackendError>;
    /// Reads into `bufs` (guest memory) one after the other from `offset`. The
    /// default goes through an intermediate buffer of at most 1 MiB at a time.
    fn read_vectored(&self, bufs: &[IoBufMut<'_>], offset: u64) -> Result<(), BackendError> {
        iobuf::bounce_read(bufs, |c, pos| self.read(c, offset + pos))
    }
    /// Writes `bufs` (guest memory) one after the other at `offset`. The default
    /// goes through an intermediate buffer of at most 1 MiB at a time.
    fn write_vectored(&self, bufs: &[IoBuf<'_>], offset: u64) -> Result<(), BackendError> {
        iobuf::bounce_write(bufs, |c, pos| self.write(c, offset + pos))
    }
    /// Zeroes `len` bytes at `offset`, deallocating if `unmap` and the backend allows.
    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> Result<(), BackendError>;
    /// Discards `len` bytes at `offset` (contents afterwards are unspecified).
    fn discard(&self, offset: u64, len: u64) -> Result<(), BackendError>;
    /// Makes completed writes durable.
    fn flush(&self) -> Result<(), BackendError>;
}

fn from_block(e: strata_block::BlockError) -> BackendError {
    // Linux's ENOSPC (the crate does not depend on libc for one constant).
    const ENOSPC: i32 = 28;
    // QEMU's BLOCK_IO_ERROR `reason` is the C library's text for the errno; errors
    // without one keep the block layer's description.
    let no_space = e.errno == Some(ENOSPC) || e.desc.contains("No space left on device");
    tracing::debug!(error = %e.desc, "block backend error");
    BackendError {
        message: match e.errno {
            Some(n) => strata_block::strerror(n),
            None => e.desc,
        },
        no_space,
    }
}

impl BlockBackend for BlockNode {
    fn size(&self) -> u64 {
        BlockNode::size(self)
    }
    fn read_only(&self) -> bool {
        BlockNode::read_only(self)
    }
    fn read(&self, buf: &mut [u8], offset: u64) -> Result<(), BackendError> {
        BlockNode::read(self, buf, offset).map_err(from_block)
    }
    fn write(&self, buf: &[u8], offset: u64) -> Result<(), BackendError> {
        BlockNode::write(self, buf, offset).map_err(from_block)
    }
    fn read_vectored(&self, bufs: &[IoBufMut<'_>], offset: u64) -> Result<(), BackendError> {
        BlockNode::read_vectored(self, bufs, offset).map_err(from_block)
    }
    fn write_vectored(&self, bufs: &[IoBuf<'_>], offset: u64) -> Result<(), BackendError> {
        BlockNode::write_vectored(self, bufs, offset).map_err(from_block)
    }
    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> Result<(), BackendError> {
        BlockNode::write_zeroes(self, offset, len, unmap).map_err(from_block)
    }
    fn discard(&self, offset: u64, len: u64) -> Result<(), BackendError> {
        BlockNode::discard(self, offset, len).map_err(from_block)
    }
    fn flush(&self) -> Result<(), BackendError> {
        BlockNode::flush(self).map_err(from_block)
    }
}

impl<T: BlockBackend + ?Sized> BlockBackend for std::sync::Arc<T> {
    fn size(&self) -> u64 {
        (**self).size()
    }
    fn read_only(&self) -> bool {
        (**self).read_only()
    }
    fn read(&self, buf: &mut [u8], offset: u64) -> Result<(), BackendError> {
        (**self).read(buf, offset)
    }
    fn write(&self, buf: &[u8], offset: u64) -> Result<(), BackendError> {
        (**self).write(buf, offset)
    }
    fn read_vectored(&self, bufs: &[IoBufMut<'_>], offset: u64) -> Result<(), BackendError> {
        (**self).read_vectored(bufs, offset)
    }
    fn write_vectored(&self, bufs: &[IoBuf<'_>], offset: u64) -> Result<(), BackendError> {
        (**self).write_vectored(bufs, offset)
    }
    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> Result<(), BackendError> {
        (**self).write_zeroes(offset, len, unmap)
    }
    fn discard(&self, offset: u64, len: u64) -> Result<(), BackendError> {
        (**self).discard(offset, len)
    }
    fn flush(&self) -> Result<(), BackendError> {
        (**self).flush()
    }
}
