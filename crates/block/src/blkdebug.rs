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
    rules: Mutex<Vec<(InjectError, bool)>>,
}

impl BlkDebug {
    /// A blkdebug layer over `child` with `rules`.
    pub fn new(child: Arc<BlockNode>, rules: Vec<InjectError>) -> Self {
        BlkDebug {
            child,
            rules: Mutex::new(rules.into_iter().map(|r| (r, true)).collect()),
        }
    }

    fn check(&self, t: IoType, offset: u64, len: u64) -> Result<()> {
        let mut rules = self.rules.lock().unwrap_or_else(|e| e.into_inner());
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
        self.child.io().storage()
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
