//! Storage nodes: the protocol layer that format drivers sit on.
//!
//! A [`Storage`] is a flat, byte-addressed, resizable container — a host file
//! ([`FileStorage`]) or a buffer in memory ([`MemStorage`], for tests and fuzzing).
//! Format drivers do all their I/O through this trait with positional reads and
//! writes, so they never hold a lock across a data transfer.

mod aligned;
mod file;
mod mem;

pub use aligned::AlignedBuf;
pub use file::{CacheMode, FileStorage};
pub use mem::MemStorage;

use crate::iobuf::{self, IoBuf, IoBufMut};
use crate::Result;

/// A byte-addressed storage node (QEMU's "protocol" layer).
pub trait Storage: Send + Sync {
    /// Reads `buf.len()` bytes at `offset`. Bytes past the end of the storage read as zero.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()>;
    /// Writes `buf` at `offset`, growing the storage if the write ends past its end.
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()>;
    /// Reads into `bufs` one after the other, starting at `offset`, as
    /// [`Storage::read_at`] does. The default goes through an intermediate buffer (1 MiB at a time).
    fn read_vectored_at(&self, bufs: &[IoBufMut<'_>], offset: u64) -> Result<()> {
        iobuf::bounce_read(bufs, |c, pos| self.read_at(c, offset + pos))
    }
    /// Writes `bufs` one after the other, starting at `offset`, as
    /// [`Storage::write_at`] does. The default goes through an intermediate buffer (1 MiB at a time).
    fn write_vectored_at(&self, bufs: &[IoBuf<'_>], offset: u64) -> Result<()> {
        iobuf::bounce_write(bufs, |c, pos| self.write_at(c, offset + pos))
    }
    /// Makes every completed write durable (a no-op in `cache=unsafe`).
    fn flush(&self) -> Result<()>;
    /// The current length in bytes.
    fn size(&self) -> Result<u64>;
    /// Grows or shrinks the storage to exactly `size` bytes.
    fn set_size(&self, size: u64) -> Result<()>;
    /// Deallocates a range if the storage can; the range then reads as zero.
    /// Storage that cannot punch holes writes zeroes instead.
    fn discard(&self, offset: u64, len: u64) -> Result<()>;
    /// Makes a range read as zero; with `unmap` the storage may deallocate it.
    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> Result<()>;
    /// Reserves space for a range without changing its contents (`fallocate`).
    fn preallocate(&self, offset: u64, len: u64) -> Result<()>;
    /// Whether `offset` starts data or a hole, and how far that extent runs (at most `len`).
    /// Storage that cannot tell reports data.
    fn extent_at(&self, offset: u64, len: u64) -> Result<(bool, u64)> {
        let _ = offset;
        Ok((true, len))
    }
    /// Bytes of host storage in use (`actual-size` in `qemu-img info`).
    fn allocated_size(&self) -> Result<u64>;
    /// The alignment that requests must respect for the storage's fast path (512 or
    /// more under `O_DIRECT`, 1 otherwise). Unaligned requests still work.
    fn alignment(&self) -> usize {
        1
    }
    /// A human-readable name, e.g. the file name.
    fn name(&self) -> String;
    /// Whether the node rejects writes.
    fn read_only(&self) -> bool;
}
