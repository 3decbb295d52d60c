//! Opening images the way qemu-img does (format names, cache modes, its error wording)
//! and walking a backing chain for block status, as `map`, `compare`, `convert`,
//! `rebase` and `commit` need it.

use std::path::Path;
use std::sync::Arc;

use strata_image::{
    create_image, open_image, BackingChoice, CacheMode, CreateOptions, Format, FormatDriver,
    OpenOptions,
};

use crate::error::{CliError, CliResult};

/// Parses a `-t`/`-T` cache mode with qemu-img's wording.
pub fn parse_cache(name: Option<&str>, default: CacheMode) -> CliResult<CacheMode> {
    match name {
        None => Ok(default),
        Some(n) => {
            CacheMode::parse(n).map_err(|_| CliError::msg(format!("Invalid cache option: {n}")))
        }
    }
}

/// How to open one image from the command line.
#[derive(Debug, Clone, Default)]
pub struct OpenArgs<'a> {
    /// The `-f` format name, probed when absent.
    pub format: Option<&'a str>,
    /// Open read-write.
    pub writable: bool,
    /// Cache mode.
    pub cache: CacheMode,
    /// Which backing file to use.
    pub backing: BackingChoice,
}

/// Opens `path`, reporting failures as `Could not open '<path>': <reason>`.
pub fn open(path: &str, args: &OpenArgs<'_>) -> CliResult<Arc<dyn FormatDriver>> {
    let format = match args.format {
        None => None,
        Some(n) => match Format::parse(n) {
            Ok(f) => Some(f),
            Err(_) => {
                return Err(CliError::msg(format!(
                    "Could not open '{path}': Unknown driver '{n}'"
                )))
            }
        },
    };
    let opts = OpenOptions {
        format,
        read_only: !args.writable,
        cache: args.cache,
        backing: args.backing.clone(),
        ..Default::default()
    };
    let img = open_image(Path::new(path), &opts)
        .map_err(|e| CliError::msg(format!("Could not open '{path}': {e}")))?;
    if let (Some(want), true) = (
        format,
        img.format_name() != format.map(|f| f.name()).unwrap_or(""),
    ) {
        return Err(CliError::msg(format!(
            "Could not open '{path}': Image is not in {} format",
            want.name()
        )));
    }
    if args.writable && args.format.is_none() && img.format_name() == "raw" {
        eprintln!(
            "WARNING: Image format was not specified for '{path}' and probing guessed raw.\n         Automatically detecting the format is dangerous for raw images, write operations on block 0 will be restricted.\n         Specify the 'raw' format explicitly to remove the restrictions."
        );
    }
    Ok(img)
}

/// The layers of a backing chain, top first.
pub fn layers(top: &Arc<dyn FormatDriver>) -> Vec<Arc<dyn FormatDriver>> {
    let mut out = vec![top.clone()];
    while let Some(b) = out.last().and_then(|l| l.backing()) {
        out.push(b);
    }
    out
}

/// The block status of a range looked up through a backing chain, as qemu-img's
/// `map` computes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainStatus {
    /// Length of the extent.
    pub len: u64,
    /// Index of the layer that decides the contents (or the bottom layer).
    pub depth: usize,
    /// Some layer (at `depth`) allocates the range.
    pub present: bool,
    /// Reads as zeroes.
    pub zero: bool,
    /// Backed by data.
    pub data: bool,
    /// Stored compressed.
    pub compressed: bool,
    /// Host offset of the data in the file of layer `depth`.
    pub offset: Option<u64>,
}

/// Block status of `[offset, offset+len)` through `chain[..limit]` (top first): the first
/// layer that allocates the range decides it; an area no layer allocates reads as zero
/// when there is no further backing (or lies beyond the backing file's end).
/// `limit` lets callers stop above a base image (`rebase`, `commit`, `convert -B`).
pub fn chain_status(
    chain: &[Arc<dyn FormatDriver>],
    limit: usize,
    offset: u64,
    len: u64,
) -> CliResult<ChainStatus> {
    let mut len = len;
    let mut depth = 0;
    loop {
        let layer = &chain[depth];
        let size = layer.size();
        if offset >= size {
            // Past the end of a (shorter) backing file: reads as zero.
            return Ok(ChainStatus {
                len,
                depth,
                present: false,
                zero: true,
                data: false,
                compressed: false,
                offset: None,
            });
        }
        let st = layer
            .block_status(offset, len.min(size - offset))
            .map_err(|e| CliError::msg(format!("Could not read file metadata: {e}")))?;
        len = st.len.min(len);
        if st.allocated || st.zero || st.data {
            let mut status = ChainStatus {
                len,
                depth,
                present: st.allocated,
                zero: st.zero,
                data: st.data,
                compressed: st.compressed,
                offset: st.offset,
            };
            if layer.format_name() == "qcow2"
                && st.data
                && !st.zero
                && st.offset.is_some()
                && metadata_preallocated(layer.as_ref())
            {
                // Like QEMU, look through to the file for holes under preallocated clusters.
                let host = st.offset.unwrap_or(0);
                let storage = layer.storage();
                if let Ok(flen) = storage.size() {
                    if host >= flen {
                        status.zero = true;
                    } else if let Ok((data, n)) = storage.extent_at(host, len.min(flen - host)) {
                        if !data {
                            status.zero = true;
                        }
                        if n > 0 && host + n < flen {
                            status.len = status.len.min(n);
                        }
                    }
                }
            }
            return Ok(status);
        }
        let next = depth + 1;
        if next < chain.len() && offset >= chain[next].size() {
            // Beyond the end of the backing file: QEMU decides "zero" in this layer.
            return Ok(ChainStatus {
                len,
                depth,
                present: false,
                zero: true,
                data: false,
                compressed: false,
                offset: None,
            });
        }
        if next >= limit || next >= chain.len() {
            return Ok(ChainStatus {
                len,
                depth,
                present: false,
                zero: next >= chain.len(),
                data: false,
                compressed: false,
                // An unallocated subcluster of an allocated cluster still has a
                // host offset, which QEMU reports at the bottom of the chain.
                offset: if next >= chain.len() { st.offset } else { None },
            });
        }
        depth = next;
    }
}

/// QEMU's guess whether a qcow2 image was created with `preallocation=metadata`: far more
/// clusters in the file than the host actually stores. (QEMU counts clusters with a
/// non-zero refcount; the file length in clusters stands in for that here.)
fn metadata_preallocated(layer: &dyn FormatDriver) -> bool {
    let Some(cs) = layer.cluster_size() else {
        return false;
    };
    let storage = layer.storage();
    let (Ok(len), Ok(alloc)) = (storage.size(), storage.allocated_size()) else {
        return false;
    };
    let real = alloc / cs;
    let threshold = (real * 10 / 9).max(real + 2);
    len.div_ceil(cs) >= threshold
}

/// Creates an image file like qemu-img: through the library, then, for raw images,
/// with the first 4 KiB allocated (QEMU's file driver writes it so that alignment
/// probing works, and `map` then reports it as data).
pub fn create_file(path: &str, format: Format, opts: &CreateOptions) -> CliResult<()> {
    create_image(Path::new(path), format, opts)
        .map_err(|e| CliError::msg(e.to_string()).context(path))?;
    if format == Format::Raw {
        let size = opts.size.unwrap_or(0);
        if size > 0 {
            use std::os::unix::fs::FileExt;
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(path)
                .map_err(|e| CliError::msg(format!("{path}: {e}")))?;
            let n = size.min(FIRST_BLOCK) as usize;
            let mut head = vec![0u8; n];
            // Keep whatever is there (preallocation=full already wrote zeroes).
            let _ = std::os::unix::fs::FileExt::read_at(&f, &mut head, 0);
            f.write_all_at(&head, 0)
                .map_err(|e| CliError::msg(format!("{path}: {e}")))?;
        }
    }
    Ok(())
}

/// The block QEMU allocates at the start of a new raw file.
const FIRST_BLOCK: u64 = 4096;

/// Whether `buf` is all zero bytes.
pub fn is_zero(buf: &[u8]) -> bool {
    let chunks = buf.chunks_exact(16);
    let rem = chunks.remainder();
    chunks
        .map(|c| {
            let mut w = [0u8; 16];
            w.copy_from_slice(c);
            u128::from_ne_bytes(w)
        })
        .all(|w| w == 0)
        && rem.iter().all(|&b| b == 0)
}

/// The index of the first non-zero byte in `buf`.
pub fn first_nonzero(buf: &[u8]) -> Option<usize> {
    buf.iter().position(|&b| b != 0)
}
