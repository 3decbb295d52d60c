//! The qcow2 format driver, compatible with QEMU 10 (`docs/interop/qcow2.txt`).
//!
//! Layout of this module: [`header`] parses and writes the first cluster; [`l2`] holds
//! the entry layouts; [`refcount`] the refcount entry widths; `meta` the metadata state
//! (caches, allocation, ordered flush); `io` the data path; `create` image creation,
//! preallocation and resize; `check` consistency checking and repair; [`snapshot`] the
//! internal snapshot table and `snapshot_ops` creating, applying and deleting
//! snapshots; [`compress`] zlib/zstd clusters.
//!
//! Concurrency: one mutex guards the metadata; data is read and written with
//! positional I/O after the lock is dropped. Allocating writes to the same guest
//! cluster are serialised by an in-flight set so that copy-on-write stays correct.

pub mod bitmaps;
mod cache;
mod check;
pub mod compress;
mod create;
mod grow;
pub mod header;
mod io;
pub mod l2;
mod meta;
pub mod refcount;
pub mod snapshot;
mod snapshot_ops;
mod vectored;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use crate::driver::{
    BlockIo, BlockStatus, CheckReport, FormatDriver, FormatSpecific, ImageInfo, InternalSnapshots,
    PersistentBitmaps, Preallocation, Qcow2Specific, RepairMode, SnapshotInfo,
};
use crate::iobuf::{IoBuf, IoBufMut};
use crate::storage::Storage;
use crate::{Error, Result};

pub use create::create;
pub use header::MAGIC;
use header::{Header, INCOMPAT_CORRUPT, INCOMPAT_DIRTY};
use meta::{Geometry, Meta};
use snapshot::Snapshot;

/// Options for opening a qcow2 image.
#[derive(Debug, Clone, Default)]
pub struct Qcow2OpenOptions {
    /// Open read-only.
    pub read_only: bool,
    /// L2 cache size in bytes.
    pub l2_cache_size: Option<u64>,
    /// Refcount block cache size in bytes.
    pub refcount_cache_size: Option<u64>,
    /// Where the image lives, for resolving relative backing names.
    pub image_path: Option<PathBuf>,
}

/// Opens backing files by (name, format) as stored in the header.
pub type BackingOpener<'a> = &'a mut dyn FnMut(&str, Option<&str>) -> Result<Arc<dyn FormatDriver>>;

/// Default L2 cache: 32 MiB, as QEMU's default maximum on Linux.
const DEFAULT_L2_CACHE: u64 = 32 << 20;
/// Default refcount block cache: 4 MiB.
const DEFAULT_RC_CACHE: u64 = 4 << 20;

/// A decompressed cluster: (host offset of its compressed data, contents).
type Decompressed = (u64, Arc<Vec<u8>>);

/// A qcow2 image.
pub struct Qcow2 {
    st: Arc<dyn Storage>,
    backing: Option<Arc<dyn FormatDriver>>,
    read_only: bool,
    geo: Geometry,
    size: AtomicU64,
    meta: Mutex<Meta>,
    cv: Condvar,
    /// The last decompressed cluster, with a generation bumped by compressed writes.
    zcache: Mutex<(u64, Option<Decompressed>)>,
    /// Stored bitmaps are already marked in use (or there are none to mark).
    bitmaps_marked: AtomicBool,
    /// Persistent bitmaps this driver keeps up to date itself (when no block layer
    /// took them over): loaded at the first write, stored back at close.
    bm_track: Mutex<Option<Vec<crate::driver::StoredBitmap>>>,
    /// `bm_track` holds bitmaps (fast check on the write path).
    bm_tracking: AtomicBool,
    /// A block layer tracks the persistent bitmaps; this driver only marks them.
    bm_external: AtomicBool,
    /// File space reserved ahead of cluster allocation (direct I/O only).
    grow: grow::GrowAhead,
}

/// Opens a qcow2 image over `storage`; `backing` opens its backing file by the name
/// and format stored in the header (or unconditionally with `force_backing`).
pub fn open(
    storage: Arc<dyn Storage>,
    opts: Qcow2OpenOptions,
    backing: Option<BackingOpener<'_>>,
    force_backing: bool,
) -> Result<Arc<dyn FormatDriver>> {
    Ok(Arc::new(Qcow2::open(
        storage,
        opts,
        backing,
        force_backing,
    )?))
}

impl Qcow2 {
    /// Opens a qcow2 image over `storage`.
    pub fn open(
        st: Arc<dyn Storage>,
        opts: Qcow2OpenOptions,
        backing: Option<BackingOpener<'_>>,
        force_backing: bool,
    ) -> Result<Qcow2> {
        let read_only = opts.read_only || st.read_only();
        let file_size = st.size()?;
        let mut first = [0u8; 104];
        st.read_at(&mut first, 0)?;
        if file_size < 72 {
            return Err(Error::corrupt(
                "Image is not in qcow2 format (file too short)",
            ));
        }
        let cluster_bits = u32::from_be_bytes([first[20], first[21], first[22], first[23]]);
        let hlen = if (9..=21).contains(&cluster_bits) {
            (1u64 << cluster_bits).min(file_size)
        } else {
            104.min(file_size)
        };
        let mut hbuf = vec![0u8; hlen as usize];
        st.read_at(&mut hbuf, 0)?;
        let header = Header::parse(&hbuf, file_size)?;
        if header.incompatible_features & INCOMPAT_CORRUPT != 0 && !read_only {
            return Err(Error::corrupt(
                "qcow2: Image is corrupt; cannot be opened read/write",
            ));
        }
        let geo = Geometry::from_header(&header);
        let mut meta = Meta::load(
            st.as_ref(),
            header,
            opts.l2_cache_size.unwrap_or(DEFAULT_L2_CACHE),
            opts.refcount_cache_size.unwrap_or(DEFAULT_RC_CACHE),
        )?;
        if meta.header.nb_snapshots > 0 {
            meta.snapshots = snapshot::read_table(st.as_ref(), &meta.header)?.0;
        }
        let backing_name = meta.header.backing_file.clone();
        let backing_fmt = meta.header.backing_format.clone();
        let backing = match (backing, backing_name) {
            (Some(open), Some(name)) => Some(open(&name, backing_fmt.as_deref())?),
            (Some(open), None) if force_backing => Some(open("", None)?),
            _ => None,
        };
        let size = meta.header.size;
        let grow = grow::GrowAhead::new(st.as_ref(), read_only);
        let q = Qcow2 {
            st,
            backing,
            read_only,
            geo,
            size: AtomicU64::new(size),
            meta: Mutex::new(meta),
            cv: Condvar::new(),
            zcache: Mutex::new((0, None)),
            bitmaps_marked: AtomicBool::new(true),
            bm_track: Mutex::new(None),
            bm_tracking: AtomicBool::new(false),
            bm_external: AtomicBool::new(false),
            grow,
        };
        if !read_only {
            q.prepare_for_writing()?;
        }
        Ok(q)
    }

    /// Repairs an image left dirty, and clears autoclear bits this driver does not
    /// maintain (the bitmaps extension is not kept up to date here yet).
    fn prepare_for_writing(&self) -> Result<()> {
        let dirty = self.lock().header.incompatible_features & INCOMPAT_DIRTY != 0;
        if dirty {
            tracing::info!("repairing refcounts of an image that was not closed cleanly");
            self.check_impl(Some(RepairMode::All))?;
            let mut m = self.lock();
            let bits = m.header.incompatible_features & !INCOMPAT_DIRTY;
            m.write_incompat(self.st.as_ref(), bits)?;
        }
        let mut m = self.lock();
        // Autoclear bits of features this driver does not maintain are cleared; the
        // bitmaps bit stays (bitmaps are marked in use before the first write).
        let keep = if m.header.bitmaps_ext.is_some() {
            header::AUTOCLEAR_BITMAPS
        } else {
            0
        };
        let autoclear = m.header.autoclear_features & keep;
        if m.header.version >= 3 && m.header.autoclear_features != autoclear {
            m.header.autoclear_features = autoclear;
            self.st.write_at(&autoclear.to_be_bytes(), 88)?;
            self.st.flush()?;
        }
        if autoclear & header::AUTOCLEAR_BITMAPS != 0 {
            self.bitmaps_marked.store(false, Ordering::Release);
        }
        Ok(())
    }

    fn lock(&self) -> MutexGuard<'_, Meta> {
        self.meta.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Gives back file space reserved past the last allocated cluster.
    fn trim_reserved(&self) -> Result<()> {
        let used_end = self.lock().end_cluster * self.geo.cs;
        self.grow.trim(self.storage_ref(), used_end)
    }

    fn storage_ref(&self) -> &dyn Storage {
        self.st.as_ref()
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<()> {
        let size = self.size.load(Ordering::Acquire);
        match offset.checked_add(len) {
            Some(end) if end <= size => Ok(()),
            _ => Err(Error::invalid(format!(
                "Request out of range: offset {offset} length {len} (image size {size})"
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

impl BlockIo for Qcow2 {
    fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    fn read(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.check_range(offset, buf.len() as u64)?;
        self.read_impl(buf, offset)
    }

    fn write(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.check_write(offset, buf.len() as u64)?;
        self.bitmaps_before_write(offset, buf.len() as u64)?;
        self.write_impl(buf, offset)
    }

    fn read_vectored(&self, bufs: &[IoBufMut<'_>], offset: u64) -> Result<()> {
        self.check_range(offset, crate::iobuf::total_len_mut(bufs) as u64)?;
        self.read_vectored_impl(bufs, offset)
    }

    fn write_vectored(&self, bufs: &[IoBuf<'_>], offset: u64) -> Result<()> {
        let len = crate::iobuf::total_len(bufs) as u64;
        self.check_write(offset, len)?;
        self.bitmaps_before_write(offset, len)?;
        self.write_vectored_impl(bufs, offset)
    }

    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> Result<()> {
        self.check_write(offset, len)?;
        self.bitmaps_before_write(offset, len)?;
        self.zero_impl(offset, len, io::ZeroMode::Zero { unmap: may_unmap })
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.check_write(offset, len)?;
        self.bitmaps_before_write(offset, len)?;
        self.zero_impl(offset, len, io::ZeroMode::Discard)
    }

    fn flush(&self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        let mut m = self.lock();
        m.flush(self.storage_ref())
    }
}

impl FormatDriver for Qcow2 {
    fn format_name(&self) -> &'static str {
        "qcow2"
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<BlockStatus> {
        self.check_range(offset, len)?;
        if len == 0 {
            return Err(Error::invalid("block status of an empty range"));
        }
        self.status_impl(offset, len)
    }

    fn backing(&self) -> Option<Arc<dyn FormatDriver>> {
        self.backing.clone()
    }

    fn storage(&self) -> Arc<dyn Storage> {
        self.st.clone()
    }

    fn info(&self) -> Result<ImageInfo> {
        let m = self.lock();
        let h = &m.header;
        Ok(ImageInfo {
            format: "qcow2".into(),
            virtual_size: self.size(),
            cluster_size: Some(self.geo.cs),
            backing_filename: h.backing_file.clone(),
            full_backing_filename: None,
            backing_format: h.backing_format.clone(),
            dirty_flag: Some(h.incompatible_features & INCOMPAT_DIRTY != 0),
            format_specific: Some(FormatSpecific::Qcow2(Qcow2Specific {
                compat: if h.version >= 3 { "1.1" } else { "0.10" }.into(),
                compression_type: if h.compression_type == 1 {
                    "zstd"
                } else {
                    "zlib"
                }
                .into(),
                lazy_refcounts: h.compatible_features & header::COMPAT_LAZY_REFCOUNTS != 0,
                refcount_bits: h.refcount_bits(),
                corrupt: h.incompatible_features & INCOMPAT_CORRUPT != 0,
                extended_l2: h.extended_l2(),
                data_file: h.data_file.clone(),
                data_file_raw: None,
                bitmaps: None,
            })),
        })
        .and_then(|mut info| {
            drop(m);
            let list = self.list_bitmaps()?;
            if let Some(FormatSpecific::Qcow2(q)) = info.format_specific.as_mut() {
                q.bitmaps = (!list.is_empty()).then_some(list);
            }
            Ok(info)
        })
    }

    fn persistent_bitmaps(&self) -> Option<&dyn PersistentBitmaps> {
        Some(self)
    }

    fn cluster_size(&self) -> Option<u64> {
        Some(self.geo.cs)
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn resize(&self, new_size: u64, prealloc: Preallocation) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        self.resize_impl(new_size, prealloc)
    }

    fn check(&self, repair: Option<RepairMode>) -> Result<CheckReport> {
        if repair.is_some() && self.read_only {
            return Err(Error::ReadOnly);
        }
        self.check_impl(repair)
    }

    fn snapshots(&self) -> Result<Vec<SnapshotInfo>> {
        Ok(self.lock().snapshots.iter().map(Snapshot::info).collect())
    }

    fn internal_snapshots(&self) -> Option<&dyn InternalSnapshots> {
        Some(self)
    }

    fn write_compressed(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.check_write(offset, buf.len() as u64)?;
        self.bitmaps_before_write(offset, buf.len() as u64)?;
        self.write_compressed_impl(buf, offset)
    }

    fn set_backing_file(&self, name: Option<&str>, format: Option<&str>) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        let mut m = self.lock();
        m.flush(self.storage_ref())?;
        let mut h = m.header.clone();
        h.backing_file = name.map(str::to_string);
        h.backing_format = name.and(format.map(str::to_string));
        let bytes = h.serialize()?;
        self.st.write_at(&bytes, 0)?;
        self.st.flush()?;
        m.header = h;
        Ok(())
    }

    fn make_empty(&self) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        self.make_empty_impl()
    }

    fn close(&self) -> Result<()> {
        self.flush()?;
        self.store_tracked_bitmaps()?;
        self.trim_reserved()
    }
}

impl Drop for Qcow2 {
    fn drop(&mut self) {
        if !self.read_only {
            if let Err(e) = BlockIo::flush(self) {
                tracing::warn!("flushing qcow2 metadata on close failed: {e}");
            }
            if let Err(e) = self.store_tracked_bitmaps() {
                tracing::warn!("storing persistent bitmaps on close failed: {e}");
            }
            if let Err(e) = self.trim_reserved() {
                tracing::warn!("trimming space reserved past the image end failed: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests;
