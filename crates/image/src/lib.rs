//! `strata-image`: Strata's image layer.
//!
//! It owns the `file` protocol ([`storage`]), the format drivers ([`raw`], [`qcow2`]) behind
//! the small traits in [`driver`], and the one entry point later crates use to open or
//! create an image: [`open_image`] / [`create_image`] (or [`open_on`] / [`create_on`] over
//! any [`Storage`], e.g. memory for tests and fuzzing).

pub mod driver;
mod error;
pub mod iobuf;
pub mod qcow2;
pub mod raw;
pub mod storage;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use driver::{
    BitmapInfo, BlockIo, BlockStatus, CheckReport, FormatDriver, FormatSpecific, ImageInfo,
    InternalSnapshots, NewSnapshot, PersistentBitmaps, Preallocation, Qcow2Specific, RepairMode,
    SnapshotInfo, StoredBitmap,
};
pub use error::{Error, Result};
pub use iobuf::{IoBuf, IoBufMut};
pub use storage::{CacheMode, FileStorage, MemStorage, Storage};

/// Splits QEMU's option syntax at commas, where `,,` stands for a literal comma
/// (`a=1,b=x,,y` gives `["a=1", "b=x,y"]`). Used by `-o`, `--blockdev` and friends.
pub fn split_options(s: &str) -> Vec<String> {
    let mut parts = Vec::new();
    let mut cur = String::new();
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == ',' {
            if chars.peek() == Some(&',') {
                chars.next();
                cur.push(',');
            } else {
                parts.push(std::mem::take(&mut cur));
            }
        } else {
            cur.push(c);
        }
    }
    parts.push(cur);
    parts
}

/// The deepest backing chain Strata opens; deeper chains are refused with an error.
pub const MAX_BACKING_DEPTH: usize = 256;

/// An image format Strata can open or create.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Raw: the image is the disk.
    Raw,
    /// QEMU's qcow2.
    Qcow2,
}

impl Format {
    /// Parses a format name as qemu-img spells it.
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "raw" => Ok(Format::Raw),
            "qcow2" => Ok(Format::Qcow2),
            _ => Err(Error::unsupported(format!("Unknown driver '{name}'"))),
        }
    }

    /// The format's name.
    pub fn name(self) -> &'static str {
        match self {
            Format::Raw => "raw",
            Format::Qcow2 => "qcow2",
        }
    }
}

/// Which backing file an image opens with.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum BackingChoice {
    /// The backing file named in the image header.
    #[default]
    FromImage,
    /// No backing file: unallocated areas read as zeroes.
    None,
    /// An explicit backing file and optional format, overriding the header.
    File {
        /// Path of the backing image.
        path: PathBuf,
        /// Its format (probed when absent).
        format: Option<Format>,
    },
}

/// How to open an image.
#[derive(Debug, Clone, Default)]
pub struct OpenOptions {
    /// The format; probed from the first bytes when `None`.
    pub format: Option<Format>,
    /// Open read-only.
    pub read_only: bool,
    /// Cache mode of the image file (backing files use the same mode).
    pub cache: CacheMode,
    /// Which backing file to use.
    pub backing: BackingChoice,
    /// Bytes of L2 tables to cache (qcow2 `l2-cache-size`); default 32 MiB.
    pub l2_cache_size: Option<u64>,
    /// Bytes of refcount blocks to cache (qcow2 `refcount-cache-size`); default 4 MiB.
    pub refcount_cache_size: Option<u64>,
}

/// How to create an image (`qemu-img create -o ...`).
#[derive(Debug, Clone, Default)]
pub struct CreateOptions {
    /// Virtual size; taken from the backing file when `None` and a backing file is given.
    pub size: Option<u64>,
    /// qcow2 cluster size (default 64 KiB).
    pub cluster_size: Option<u64>,
    /// qcow2 compat level: "0.10"/"v2" or "1.1"/"v3" (default 1.1).
    pub compat: Option<String>,
    /// qcow2 refcount width (default 16).
    pub refcount_bits: Option<u32>,
    /// qcow2 lazy refcounts (compat 1.1 only).
    pub lazy_refcounts: bool,
    /// Backing file name as it will be stored.
    pub backing_file: Option<String>,
    /// Backing file format as it will be stored.
    pub backing_fmt: Option<String>,
    /// "zlib" or "zstd".
    pub compression_type: Option<String>,
    /// Extended L2 entries (subclusters).
    pub extended_l2: bool,
    /// Preallocation mode.
    pub preallocation: Preallocation,
    /// Do not open the backing file (qemu-img create `-u`); `size` must then be given.
    pub unsafe_backing: bool,
}

/// Guesses an image's format from its first bytes, as QEMU's probing does.
pub fn probe_format(storage: &dyn Storage) -> Result<Format> {
    let mut magic = [0u8; 4];
    storage.read_at(&mut magic, 0)?;
    if magic == qcow2::MAGIC.to_be_bytes() {
        Ok(Format::Qcow2)
    } else {
        Ok(Format::Raw)
    }
}

/// Resolves a backing file name stored in an image at `image_path` the way QEMU does:
/// absolute names and protocol names stay as they are; relative names are relative to
/// the directory holding the image (not to the current directory).
pub fn resolve_backing_path(image_path: &Path, backing: &str) -> PathBuf {
    let b = Path::new(backing);
    if b.is_absolute() || is_protocol_name(backing) {
        return b.to_path_buf();
    }
    match image_path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.join(b),
        _ => b.to_path_buf(),
    }
}

fn is_protocol_name(name: &str) -> bool {
    match (name.find(':'), name.find('/')) {
        (Some(c), Some(s)) => c < s && c > 0,
        (Some(c), None) => c > 0,
        _ => false,
    }
}

/// Opens the image at `path` with its backing chain.
pub fn open_image(path: &Path, opts: &OpenOptions) -> Result<Arc<dyn FormatDriver>> {
    let mut seen = HashSet::new();
    open_chain(path, opts, opts.format, &mut seen, 0)
}

fn open_chain(
    path: &Path,
    opts: &OpenOptions,
    format: Option<Format>,
    seen: &mut HashSet<PathBuf>,
    depth: usize,
) -> Result<Arc<dyn FormatDriver>> {
    if depth > MAX_BACKING_DEPTH {
        return Err(Error::invalid(format!(
            "Backing chain of '{}' is deeper than {MAX_BACKING_DEPTH} images",
            path.display()
        )));
    }
    let canonical = std::fs::canonicalize(path)
        .map_err(|e| Error::io(format!("Could not open '{}'", path.display()), e))?;
    if !seen.insert(canonical) {
        return Err(Error::invalid(format!(
            "Could not open backing file '{}': the backing chain loops back to it",
            path.display()
        )));
    }
    let storage: Arc<dyn Storage> = Arc::new(FileStorage::open(
        path,
        opts.read_only || depth > 0,
        opts.cache,
    )?);
    let format = match format {
        Some(f) => f,
        None => probe_format(storage.as_ref())?,
    };
    match format {
        Format::Raw => Ok(Arc::new(raw::Raw::open(
            storage,
            opts.read_only || depth > 0,
        )?)),
        Format::Qcow2 => {
            let mut backing_opener =
                |name: &str, fmt: Option<&str>| -> Result<Arc<dyn FormatDriver>> {
                    let (bpath, bfmt) = match (&opts.backing, depth) {
                        (BackingChoice::File { path, format }, 0) => (path.clone(), *format),
                        _ => {
                            let f = fmt.map(Format::parse).transpose()?;
                            (resolve_backing_path(path, name), f)
                        }
                    };
                    open_chain(&bpath, opts, bfmt, seen, depth + 1)
                        .map_err(|e| Error::invalid(format!("Could not open backing file: {e}")))
                };
            let want_backing = depth > 0 || opts.backing != BackingChoice::None;
            qcow2::open(
                storage,
                qcow2::Qcow2OpenOptions {
                    read_only: opts.read_only || depth > 0,
                    l2_cache_size: opts.l2_cache_size,
                    refcount_cache_size: opts.refcount_cache_size,
                    image_path: Some(path.to_path_buf()),
                },
                if want_backing {
                    Some(&mut backing_opener as qcow2::BackingOpener<'_>)
                } else {
                    None
                },
                matches!(opts.backing, BackingChoice::File { .. }) && depth == 0,
            )
        }
    }
}

/// Opens an image over an existing storage node, without a backing chain unless
/// `backing` is given (used for in-memory images in tests and fuzzing).
pub fn open_on(
    storage: Arc<dyn Storage>,
    format: Format,
    read_only: bool,
    backing: Option<Arc<dyn FormatDriver>>,
) -> Result<Arc<dyn FormatDriver>> {
    match format {
        Format::Raw => Ok(Arc::new(raw::Raw::open(storage, read_only)?)),
        Format::Qcow2 => {
            let mut b = backing;
            let mut opener = |_: &str, _: Option<&str>| -> Result<Arc<dyn FormatDriver>> {
                b.take()
                    .ok_or_else(|| Error::invalid("no backing node was supplied"))
            };
            qcow2::open(
                storage,
                qcow2::Qcow2OpenOptions {
                    read_only,
                    ..Default::default()
                },
                Some(&mut opener),
                false,
            )
        }
    }
}

/// Creates an image file at `path` (truncating any existing file).
pub fn create_image(path: &Path, format: Format, opts: &CreateOptions) -> Result<()> {
    let mut opts = opts.clone();
    if opts.size.is_none() {
        match &opts.backing_file {
            Some(b) if !opts.unsafe_backing => {
                let bpath = resolve_backing_path(path, b);
                let bfmt = opts.backing_fmt.as_deref().map(Format::parse).transpose()?;
                let backing = open_image(
                    &bpath,
                    &OpenOptions {
                        format: bfmt,
                        read_only: true,
                        ..Default::default()
                    },
                )
                .map_err(|e| Error::invalid(format!("Could not open backing image: {e}")))?;
                opts.size = Some(backing.size());
                if opts.backing_fmt.is_none() {
                    opts.backing_fmt = Some(backing.format_name().to_string());
                }
            }
            _ => return Err(Error::invalid("Image creation needs a size parameter")),
        }
    } else if let (Some(b), false, None) =
        (&opts.backing_file, opts.unsafe_backing, &opts.backing_fmt)
    {
        // QEMU 10 insists on knowing the backing format; probe it like qemu-img does.
        let bpath = resolve_backing_path(path, b);
        let backing = open_image(
            &bpath,
            &OpenOptions {
                read_only: true,
                ..Default::default()
            },
        )
        .map_err(|e| Error::invalid(format!("Could not open backing image: {e}")))?;
        opts.backing_fmt = Some(backing.format_name().to_string());
    }
    let storage: Arc<dyn Storage> = Arc::new(FileStorage::create(path, CacheMode::Writeback)?);
    create_on(storage.clone(), format, &opts)?;
    storage.flush()
}

/// Writes a new, empty image of `format` onto `storage`.
pub fn create_on(storage: Arc<dyn Storage>, format: Format, opts: &CreateOptions) -> Result<()> {
    let size = opts
        .size
        .ok_or_else(|| Error::invalid("Image creation needs a size parameter"))?;
    match format {
        Format::Raw => {
            if opts.backing_file.is_some() {
                return Err(Error::unsupported("'raw' does not support backing files"));
            }
            raw::Raw::create(storage.as_ref(), size, opts.preallocation)
        }
        Format::Qcow2 => qcow2::create(storage, size, opts),
    }
}
