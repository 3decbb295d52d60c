//! The traits a format driver implements, and the plain data it reports.
//!
//! [`BlockIo`] is the data path every node offers (read, write, zeroes, discard, flush);
//! [`FormatDriver`] adds what a format knows about its image: block status per layer,
//! the backing chain, `info`, `check`, snapshots and resizing.

use std::sync::Arc;

use serde::Serialize;

use crate::iobuf::{self, IoBuf, IoBufMut};
use crate::storage::Storage;
use crate::{Error, Result};

/// The data path of a block node. Offsets and lengths are in bytes and need no alignment.
pub trait BlockIo: Send + Sync {
    /// The virtual size in bytes.
    fn size(&self) -> u64;
    /// Reads `buf.len()` bytes at `offset`; the range must lie within the virtual size.
    fn read(&self, buf: &mut [u8], offset: u64) -> Result<()>;
    /// Writes `buf` at `offset`; the range must lie within the virtual size.
    fn write(&self, buf: &[u8], offset: u64) -> Result<()>;
    /// Reads into `bufs` one after the other from `offset` (memory that may be
    /// shared, e.g. guest RAM). The default goes through an intermediate buffer (1 MiB at a time);
    /// drivers whose data sits in place in a file override it to read directly.
    fn read_vectored(&self, bufs: &[IoBufMut<'_>], offset: u64) -> Result<()> {
        iobuf::bounce_read(bufs, |c, pos| self.read(c, offset + pos))
    }
    /// Writes `bufs` one after the other at `offset`. The default goes through an
    /// intermediate buffer (1 MiB at a time).
    fn write_vectored(&self, bufs: &[IoBuf<'_>], offset: u64) -> Result<()> {
        iobuf::bounce_write(bufs, |c, pos| self.write(c, offset + pos))
    }
    /// Makes a range read as zeroes. With `may_unmap` the driver may deallocate it.
    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> Result<()>;
    /// Tells the driver a range is no longer needed. What it then reads back is
    /// format-specific (qcow2: zeroes, or the backing file's data on compat=0.10).
    fn discard(&self, offset: u64, len: u64) -> Result<()>;
    /// Makes every completed write durable, metadata included.
    fn flush(&self) -> Result<()>;
}

/// The allocation state of a range in one layer of a backing chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct BlockStatus {
    /// Length of the extent with this state, starting at the queried offset (> 0).
    pub len: u64,
    /// This layer decides the contents (data or a zero flag); otherwise they come
    /// from the backing file (or read as zero without one).
    pub allocated: bool,
    /// The range reads as zeroes.
    pub zero: bool,
    /// The range is backed by data in the host file.
    pub data: bool,
    /// The range is stored compressed.
    pub compressed: bool,
    /// The host offset of the data, when it is stored uncompressed at a known place.
    pub offset: Option<u64>,
}

/// Preallocation modes for create and resize (`-o preallocation=`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Preallocation {
    /// Allocate nothing in advance.
    #[default]
    Off,
    /// Allocate metadata only (qcow2).
    Metadata,
    /// Metadata plus `fallocate` for data.
    Falloc,
    /// Metadata plus zeroes written for data.
    Full,
}

impl Preallocation {
    /// Parses QEMU's names.
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "off" => Ok(Preallocation::Off),
            "metadata" => Ok(Preallocation::Metadata),
            "falloc" => Ok(Preallocation::Falloc),
            "full" => Ok(Preallocation::Full),
            _ => Err(Error::invalid(format!(
                "Parameter 'preallocation' does not accept value '{s}'"
            ))),
        }
    }

    /// QEMU's name.
    pub fn name(self) -> &'static str {
        match self {
            Preallocation::Off => "off",
            Preallocation::Metadata => "metadata",
            Preallocation::Falloc => "falloc",
            Preallocation::Full => "full",
        }
    }
}

/// qcow2-specific facts for `info` (`format-specific` in qemu-img's JSON).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Qcow2Specific {
    /// "0.10" or "1.1".
    pub compat: String,
    /// "zlib" or "zstd" (reported for compat=1.1 only).
    pub compression_type: String,
    /// Lazy refcounts enabled (compat=1.1 only).
    pub lazy_refcounts: bool,
    /// Refcount width in bits.
    pub refcount_bits: u32,
    /// The corrupt bit is set.
    pub corrupt: bool,
    /// Extended L2 entries (subclusters).
    pub extended_l2: bool,
    /// External data file name, if any.
    pub data_file: Option<String>,
    /// The data file is raw (`data-file-raw`).
    pub data_file_raw: Option<bool>,
    /// Persistent dirty bitmaps (absent when the image has none).
    pub bitmaps: Option<Vec<BitmapInfo>>,
}

/// A persistent dirty bitmap with its data, as a format stores it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredBitmap {
    /// Bitmap name (unique in the image).
    pub name: String,
    /// Bytes of disk per bit (a power of two, 512 B to 2 GiB).
    pub granularity: u64,
    /// The bitmap was marked in use: its contents cannot be trusted.
    pub in_use: bool,
    /// The bitmap is enabled (records writes).
    pub enabled: bool,
    /// The bits, least significant first: `ceil(ceil(size / granularity) / 8)` bytes.
    pub bits: Vec<u8>,
}

/// A stored bitmap as `info` lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BitmapInfo {
    /// Bitmap name.
    pub name: String,
    /// Bytes per bit.
    pub granularity: u64,
    /// QEMU's flag names: "in-use", "auto".
    pub flags: Vec<String>,
}

/// Access to the persistent dirty bitmaps of a format that stores them (qcow2).
pub trait PersistentBitmaps {
    /// Names, granularities and flags of the stored bitmaps.
    fn list_bitmaps(&self) -> Result<Vec<BitmapInfo>>;
    /// Every stored bitmap with its data.
    fn load_bitmaps(&self) -> Result<Vec<StoredBitmap>>;
    /// Replaces all stored bitmaps with `bitmaps` (an empty slice removes them all).
    fn store_bitmaps(&self, bitmaps: &[StoredBitmap]) -> Result<()>;
    /// Marks every stored bitmap in use, as is done before an image is modified.
    fn mark_bitmaps_in_use(&self) -> Result<()>;
    /// Declares that the caller (a block layer) loads, updates and stores the
    /// bitmaps; the format then stops keeping them up to date itself.
    fn track_externally(&self);
}

/// What a new internal snapshot records besides the disk state.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NewSnapshot {
    /// Its name (cut to 255 bytes).
    pub name: String,
    /// Creation time, seconds since the epoch.
    pub date_sec: u32,
    /// Creation time, nanoseconds part.
    pub date_nsec: u32,
    /// Guest clock, nanoseconds (0 without a VM).
    pub vm_clock_nsec: u64,
    /// Instruction count: -1 when not recorded (QMP), 0 as `qemu-img` writes it.
    pub icount: i64,
}

impl NewSnapshot {
    /// A snapshot named `name` taken now, as `qemu-img snapshot -c` records one
    /// (`icount` 0); QMP sets `icount` to -1.
    pub fn now(name: &str) -> NewSnapshot {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        NewSnapshot {
            name: name.to_string(),
            date_sec: u32::try_from(now.as_secs()).unwrap_or(u32::MAX),
            // Microseconds, as QEMU takes the time.
            date_nsec: now.subsec_micros() * 1000,
            vm_clock_nsec: 0,
            icount: 0,
        }
    }
}

/// Creating, applying and deleting the internal snapshots of a format that has them
/// (qcow2). The image must be idle: no other request may run during these calls.
pub trait InternalSnapshots {
    /// Takes a snapshot of the current state; it gets the next free numeric id.
    fn create_snapshot(&self, new: &NewSnapshot) -> Result<SnapshotInfo>;
    /// Reverts the current state (and the virtual size) to the snapshot with id `id`.
    fn apply_snapshot(&self, id: &str) -> Result<()>;
    /// Deletes the snapshot with id `id`, freeing what only it used.
    fn delete_snapshot(&self, id: &str) -> Result<()>;
}

/// Format-specific information.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum FormatSpecific {
    /// qcow2 facts.
    Qcow2(Qcow2Specific),
}

/// What `info` reports about one image (one layer).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ImageInfo {
    /// The format name ("raw", "qcow2").
    pub format: String,
    /// The virtual size in bytes.
    pub virtual_size: u64,
    /// The cluster size, for formats that have one.
    pub cluster_size: Option<u64>,
    /// The backing file name as stored in the image.
    pub backing_filename: Option<String>,
    /// The backing file name resolved against the image's location.
    pub full_backing_filename: Option<String>,
    /// The backing format as stored in the image.
    pub backing_format: Option<String>,
    /// The dirty flag (formats that have one).
    pub dirty_flag: Option<bool>,
    /// Format-specific details.
    pub format_specific: Option<FormatSpecific>,
}

/// Snapshot table entry (`qemu-img snapshot -l`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SnapshotInfo {
    /// Snapshot id string.
    pub id: String,
    /// Snapshot name.
    pub name: String,
    /// Size of the saved VM state in bytes.
    pub vm_state_size: u64,
    /// Creation time, seconds since the epoch.
    pub date_sec: u32,
    /// Creation time, nanoseconds part.
    pub date_nsec: u32,
    /// Guest clock at creation, nanoseconds.
    pub vm_clock_nsec: u64,
    /// Instruction counter, if recorded (-1 otherwise).
    pub icount: i64,
    /// The virtual disk size at the time of the snapshot.
    pub disk_size: u64,
}

/// What `check -r` may repair.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RepairMode {
    /// Only leaked clusters.
    Leaks,
    /// Leaks and refcount/COPIED errors.
    All,
}

/// The result of a consistency check, as qemu-img prints it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct CheckReport {
    /// Corruptions found (after repair: remaining).
    pub corruptions: u64,
    /// Leaked clusters found (after repair: remaining).
    pub leaks: u64,
    /// Errors that stopped parts of the check.
    pub check_errors: u64,
    /// Corruptions repaired.
    pub corruptions_fixed: u64,
    /// Leaks repaired.
    pub leaks_fixed: u64,
    /// The offset just past the last used cluster.
    pub image_end_offset: u64,
    /// Total clusters of the virtual disk.
    pub total_clusters: u64,
    /// Clusters allocated in this layer.
    pub allocated_clusters: u64,
    /// Allocated clusters not contiguous with the previous one.
    pub fragmented_clusters: u64,
    /// Compressed clusters.
    pub compressed_clusters: u64,
    /// One line per problem, in qemu-img's wording.
    pub messages: Vec<String>,
}

/// A format driver: one image layer, possibly over a backing chain.
pub trait FormatDriver: BlockIo {
    /// The format name ("raw", "qcow2").
    fn format_name(&self) -> &'static str;
    /// The allocation state of the extent starting at `offset`, at most `len` long,
    /// in this layer only.
    fn block_status(&self, offset: u64, len: u64) -> Result<BlockStatus>;
    /// The backing node this layer reads through to, if any.
    fn backing(&self) -> Option<Arc<dyn FormatDriver>> {
        None
    }
    /// The storage node holding this image.
    fn storage(&self) -> Arc<dyn Storage>;
    /// `info` for this layer.
    fn info(&self) -> Result<ImageInfo>;
    /// The cluster size, for formats that have one.
    fn cluster_size(&self) -> Option<u64> {
        None
    }
    /// Whether the node was opened read-only.
    fn read_only(&self) -> bool;
    /// Changes the virtual size. Shrinking fails while data is allocated past the new end.
    fn resize(&self, new_size: u64, prealloc: Preallocation) -> Result<()>;
    /// Checks (and optionally repairs) the image's metadata.
    fn check(&self, repair: Option<RepairMode>) -> Result<CheckReport> {
        let _ = repair;
        Err(Error::unsupported(
            "This image format does not support checks",
        ))
    }
    /// Internal snapshots.
    fn snapshots(&self) -> Result<Vec<SnapshotInfo>> {
        Ok(Vec::new())
    }
    /// Writes whole clusters compressed. `offset` must be cluster-aligned and `buf`
    /// one cluster long (shorter only at the end of the image).
    fn write_compressed(&self, buf: &[u8], offset: u64) -> Result<()> {
        let _ = (buf, offset);
        Err(Error::unsupported(
            "Compression is not supported for this image format",
        ))
    }
    /// Rewrites the backing file name and format in the image header (rebase, commit).
    fn set_backing_file(&self, name: Option<&str>, format: Option<&str>) -> Result<()> {
        let _ = (name, format);
        Err(Error::unsupported(
            "This image format does not support backing files",
        ))
    }
    /// Deallocates everything in this layer (what `qemu-img commit` does to the top).
    fn make_empty(&self) -> Result<()> {
        Err(Error::unsupported("Image format does not support emptying"))
    }
    /// The format's internal snapshot operations, if it has them.
    fn internal_snapshots(&self) -> Option<&dyn InternalSnapshots> {
        None
    }
    /// The format's persistent bitmap store, if it has one.
    fn persistent_bitmaps(&self) -> Option<&dyn PersistentBitmaps> {
        None
    }
    /// Flushes and marks the image clean; the node must not be used afterwards.
    fn close(&self) -> Result<()> {
        self.flush()
    }
}
