//! Copy-before-write: the hook a backup installs on its source node, so that the old
//! contents of every cluster reach the target before a guest write changes them, and
//! the visible filter node (`copy-before-write`) that QEMU shows above the source.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use strata_block::{BeforeWrite, BlockError, BlockNode, BlockResult};
use strata_image::{BlockIo, BlockStatus, FormatDriver, ImageInfo, Preallocation, Storage};

use super::copy::BlockCopy;

/// What a failed copy-before-write does (`on-cbw-error`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnCbwError {
    /// The guest write fails; the backup stays valid.
    #[default]
    BreakGuestWrite,
    /// The guest write goes through; the backup becomes invalid and fails.
    BreakSnapshot,
}

impl OnCbwError {
    /// Parses QEMU's names.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "break-guest-write" => Some(OnCbwError::BreakGuestWrite),
            "break-snapshot" => Some(OnCbwError::BreakSnapshot),
            _ => None,
        }
    }
}

/// The hook on the source node.
pub struct CbwHook {
    bcs: Arc<BlockCopy>,
    on_error: OnCbwError,
    timeout: Option<Duration>,
    broken: Mutex<Option<String>>,
}

impl CbwHook {
    /// A hook copying through `bcs`.
    pub fn new(bcs: Arc<BlockCopy>, on_error: OnCbwError, timeout: Option<Duration>) -> Arc<Self> {
        Arc::new(CbwHook {
            bcs,
            on_error,
            timeout,
            broken: Mutex::new(None),
        })
    }

    /// Why the snapshot broke (with `break-snapshot`), if it did.
    pub fn broken(&self) -> Option<String> {
        self.broken
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

impl BeforeWrite for CbwHook {
    fn before_write(&self, offset: u64, len: u64) -> BlockResult<()> {
        if self.broken().is_some() {
            return Ok(());
        }
        let deadline = self.timeout.map(|t| Instant::now() + t);
        match self.bcs.copy_before_write(offset, len, deadline) {
            Ok(()) => Ok(()),
            Err(e) => match self.on_error {
                OnCbwError::BreakGuestWrite => Err(BlockError::generic(e.msg)),
                OnCbwError::BreakSnapshot => {
                    tracing::warn!(
                        "copy-before-write failed, the backup is now invalid: {}",
                        e.msg
                    );
                    *self.broken.lock().unwrap_or_else(|e| e.into_inner()) = Some(e.msg);
                    Ok(())
                }
            },
        }
    }
}

fn to_image_err(e: BlockError) -> strata_image::Error {
    strata_image::Error::InvalidArgument(e.desc)
}

/// The filter node's driver: reads pass to the source's driver; writes go through the
/// source node (and so through the hook and its bitmaps).
pub struct CbwFilter {
    source: Arc<BlockNode>,
}

impl CbwFilter {
    /// A filter above `source`.
    pub fn new(source: Arc<BlockNode>) -> Self {
        CbwFilter { source }
    }
}

impl BlockIo for CbwFilter {
    fn size(&self) -> u64 {
        self.source.size()
    }
    fn read(&self, buf: &mut [u8], offset: u64) -> strata_image::Result<()> {
        self.source.read(buf, offset).map_err(to_image_err)
    }
    fn write(&self, buf: &[u8], offset: u64) -> strata_image::Result<()> {
        self.source.write(buf, offset).map_err(to_image_err)
    }
    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> strata_image::Result<()> {
        self.source
            .write_zeroes(offset, len, may_unmap)
            .map_err(to_image_err)
    }
    fn discard(&self, offset: u64, len: u64) -> strata_image::Result<()> {
        self.source.discard(offset, len).map_err(to_image_err)
    }
    fn flush(&self) -> strata_image::Result<()> {
        self.source.flush().map_err(to_image_err)
    }
}

impl FormatDriver for CbwFilter {
    fn format_name(&self) -> &'static str {
        "copy-before-write"
    }
    fn block_status(&self, offset: u64, len: u64) -> strata_image::Result<BlockStatus> {
        self.source.io().block_status(offset, len)
    }
    fn storage(&self) -> Arc<dyn Storage> {
        self.source.io().storage()
    }
    fn info(&self) -> strata_image::Result<ImageInfo> {
        let mut i = self.source.io().info()?;
        i.format = "copy-before-write".into();
        i.format_specific = None;
        i.cluster_size = None;
        i.backing_filename = None;
        i.backing_format = None;
        i.dirty_flag = None;
        Ok(i)
    }
    fn read_only(&self) -> bool {
        self.source.read_only()
    }
    fn resize(&self, _new_size: u64, _prealloc: Preallocation) -> strata_image::Result<()> {
        Err(strata_image::Error::unsupported(
            "Cannot resize a node with a running backup",
        ))
    }
    fn close(&self) -> strata_image::Result<()> {
        Ok(())
    }
}
