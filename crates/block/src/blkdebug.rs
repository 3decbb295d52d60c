//! The `blkdebug` driver: passes requests to its `image` child and fails those that
//! match an `inject-error` rule, for testing error policies (as QEMU's iotests do).
//! Rules match by request type (`event` `read_aio` / `write_aio` / `flush_to_disk`, or
//! `iotype`), optionally by a 512-byte `sector` inside the request; `once` rules fire
//! a single time.

use std::io;
use std::sync::{Arc, Mutex};

use strata_image::{
    BlockIo, BlockStatus, Error, FormatDriver, ImageInfo, Preallocation, Result, Storage,
};

use crate::node::BlockNode;

/// What kind of request a rule matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoType {
    /// Reads.
    Read,
    /// Writes (data).
    Write,
    /// Zero writes.
    WriteZeroes,
    /// Discards.
    Discard,
    /// Flushes.
    Flush,
}

/// One `inject-error` rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InjectError {
    /// Request type.
    pub iotype: IoType,
    /// errno to fail with (default EIO).
    pub errno: i32,
    /// Only requests covering this 512-byte sector (any when `None`).
    pub sector: Option<u64>,
    /// Fire once, then disarm.
    pub once: bool,
}

/// A node that injects errors into requests to its child.
pub struct BlkDebug {
    child: Arc<BlockNode>,
    rules: Arc<Rules>,
}

/// The armed rules, shared with the [`DebugStorage`] that format nodes above use.
struct Rules(Mutex<Vec<(InjectError, bool)>>);

impl BlkDebug {
    /// A blkdebug layer over `child` with `rules`.
    pub fn new(child: Arc<BlockNode>, rules: Vec<InjectError>) -> Self {
        BlkDebug {
            child,
            rules: Arc::new(Rules(Mutex::new(
                rules.into_iter().map(|r| (r, true)).collect(),
            ))),
        }
    }

    fn check(&self, t: IoType, offset: u64, len: u64) -> Result<()> {
        self.rules.check(t, offset, len)
    }
}

impl Rules {
    fn check(&self, t: IoType, offset: u64, len: u64) -> Result<()> {
        let mut rules = self.0.lock().unwrap_or_else(|e| e.into_inner());
        for (r, armed) in rules.iter_mut() {
            let kind_matches =
                r.iotype == t || (r.iotype == IoType::Write && matches!(t, IoType::WriteZeroes));
            if !*armed || !kind_matches {
                continue;
            }
            if let Some(s) = r.sector {
                let start = s * 512;
                if !(start < offset + len.max(1) && offset < start + 512) {
                    continue;
                }
            }
            if r.once {
                *armed = false;
            }
            return Err(Error::io(
                "blkdebug: injected error",
                io::Error::from_raw_os_error(r.errno),
            ));
        }
        Ok(())
    }
}

fn image_err(e: crate::BlockError) -> Error {
    Error::InvalidArgument(e.desc)
}

impl BlockIo for BlkDebug {
    fn size(&self) -> u64 {
        self.child.size()
    }
    fn read(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.check(IoType::Read, offset, buf.len() as u64)?;
        self.child.read(buf, offset).map_err(image_err)
    }
    fn write(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.check(IoType::Write, offset, buf.len() as u64)?;
        self.child.write(buf, offset).map_err(image_err)
    }
    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> Result<()> {
        self.check(IoType::WriteZeroes, offset, len)?;
        self.child
            .write_zeroes(offset, len, may_unmap)
            .map_err(image_err)
    }
    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.check(IoType::Discard, offset, len)?;
        self.child.discard(offset, len).map_err(image_err)
    }
    fn flush(&self) -> Result<()> {
        self.check(IoType::Flush, 0, 0)?;
        self.child.flush().map_err(image_err)
    }
}

impl FormatDriver for BlkDebug {
    fn format_name(&self) -> &'static str {
        "blkdebug"
    }
    fn block_status(&self, offset: u64, len: u64) -> Result<BlockStatus> {
        self.child.io().block_status(offset, len)
    }
    fn backing(&self) -> Option<Arc<dyn FormatDriver>> {
        self.child.io().backing()
    }
    fn storage(&self) -> Arc<dyn Storage> {
        // A format node opened over blkdebug (QEMU's usual layering, e.g.
        // raw { file: blkdebug { image: file } }) does its I/O through this, so the
        // rules apply to it too. Unlike QEMU, whose rules fire on the events the
        // format driver raises (write_aio for data only), they match every request
        // of the type, metadata included.
        Arc::new(DebugStorage {
            inner: self.child.io().storage(),
            rules: self.rules.clone(),
        })
    }
    fn info(&self) -> Result<ImageInfo> {
        let mut i = self.child.io().info()?;
        i.format = "blkdebug".into();
        Ok(i)
    }
    fn cluster_size(&self) -> Option<u64> {
        self.child.io().cluster_size()
    }
    fn read_only(&self) -> bool {
        self.child.read_only()
    }
    fn resize(&self, new_size: u64, prealloc: Preallocation) -> Result<()> {
        self.child.io().resize(new_size, prealloc)
    }
    fn write_compressed(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.check(IoType::Write, offset, buf.len() as u64)?;
        self.child.io().write_compressed(buf, offset)
    }
    fn close(&self) -> Result<()> {
        Ok(())
    }
}

/// The child's storage with the blkdebug rules applied.
struct DebugStorage {
    inner: Arc<dyn Storage>,
    rules: Arc<Rules>,
}

impl Storage for DebugStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.rules.check(IoType::Read, offset, buf.len() as u64)?;
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.rules.check(IoType::Write, offset, buf.len() as u64)?;
        self.inner.write_at(buf, offset)
    }
    fn flush(&self) -> Result<()> {
        self.rules.check(IoType::Flush, 0, 0)?;
        self.inner.flush()
    }
    fn size(&self) -> Result<u64> {
        self.inner.size()
    }
    fn set_size(&self, size: u64) -> Result<()> {
        self.inner.set_size(size)
    }
    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.rules.check(IoType::Discard, offset, len)?;
        self.inner.discard(offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> Result<()> {
        self.rules.check(IoType::WriteZeroes, offset, len)?;
        self.inner.write_zeroes(offset, len, unmap)
    }
    fn preallocate(&self, offset: u64, len: u64) -> Result<()> {
        self.inner.preallocate(offset, len)
    }
    fn extent_at(&self, offset: u64, len: u64) -> Result<(bool, u64)> {
        self.inner.extent_at(offset, len)
    }
    fn allocated_size(&self) -> Result<u64> {
        self.inner.allocated_size()
    }
    fn alignment(&self) -> usize {
        self.inner.alignment()
    }
    fn name(&self) -> String {
        self.inner.name()
    }
    fn read_only(&self) -> bool {
        self.inner.read_only()
    }
}
