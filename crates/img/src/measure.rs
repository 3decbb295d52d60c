//! `strata-img measure`: how large a new image would be, as `qemu-img measure`
//! computes it: for a target format and options, the file size needed for the data
//! of a source image (or an empty image of `--size`), the size when fully allocated,
//! and for qcow2 v3 targets the space the source's persistent bitmaps would take.

use strata_image::{BackingChoice, FormatDriver, FormatSpecific};

use crate::create::{parse_create_opts, validate};
use crate::error::{CliError, CliResult};
use crate::image::{chain_status, layers, open, OpenArgs};
use crate::json::{to_qemu_pretty, ObjBuilder};
use crate::util::{cvtnum, join_opts};
use strata_image::{Format, Preallocation};

/// Options of `measure`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Output format: human or json.
    #[arg(long = "output", default_value = "human")]
    output: String,
    /// Target format (default raw).
    #[arg(short = 'O')]
    out_format: Option<String>,
    /// Target creation options.
    #[arg(short = 'o')]
    options: Vec<String>,
    /// Measure an empty image of this size instead of a source image.
    #[arg(long = "size", allow_hyphen_values = true)]
    size: Option<String>,
    /// Source image format (probed when absent).
    #[arg(short = 'f')]
    format: Option<String>,
    /// Accepted for compatibility.
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// The source image.
    filename: Option<String>,
}

/// qemu-img's answer.
struct Measure {
    required: u64,
    fully_allocated: u64,
    bitmaps: Option<u64>,
}

/// Runs `measure`.
pub fn run(args: Args) -> CliResult<i32> {
    let _ = args.force_share;
    let size = args
        .size
        .as_deref()
        .map(|s| cvtnum("image size", s, i64::MAX as u64))
        .transpose()?;
    match (&args.filename, size) {
        (None, None) => {
            return Err(CliError::msg(
                "Either --size N or one filename must be specified.",
            ))
        }
        (Some(_), Some(_)) => {
            return Err(CliError::msg(
                "--size N cannot be used together with a filename.",
            ))
        }
        _ => {}
    }
    let fmt_name = args.out_format.as_deref().unwrap_or("raw");
    let format = Format::parse(fmt_name)
        .map_err(|_| CliError::msg(format!("Unknown file format '{fmt_name}'")))?;
    let pairs = join_opts(&args.options);
    let opts = parse_create_opts(format, &pairs).map_err(|e| {
        CliError::msg(format!(
            "{e}\nstrata-img: Invalid options for file format '{fmt_name}'"
        ))
    })?;
    validate(format, &opts)?;
    let source = match &args.filename {
        Some(f) => Some(open(
            f,
            &OpenArgs {
                format: args.format.as_deref(),
                backing: BackingChoice::FromImage,
                ..Default::default()
            },
        )?),
        None => None,
    };
    let m = match format {
        Format::Raw => {
            let required = match &source {
                Some(s) => s.size(),
                None => size.unwrap_or(0).div_ceil(512) * 512,
            };
            Measure {
                required,
                fully_allocated: required,
                bitmaps: None,
            }
        }
        Format::Qcow2 => {
            let cs = opts.cluster_size.unwrap_or(65536);
            let refcount_order = opts.refcount_bits.unwrap_or(16).trailing_zeros();
            let v3 = opts.create.compat.as_deref() != Some("0.10");
            let (virtual_size, data) = match &source {
                Some(s) => (s.size().div_ceil(cs) * cs, allocated_data(s, cs)?),
                None => (size.unwrap_or(0).div_ceil(cs) * cs, 0),
            };
            let fully = prealloc_size(virtual_size, cs, refcount_order, opts.create.extended_l2);
            let data = match opts.create.preallocation {
                Preallocation::Full | Preallocation::Falloc => virtual_size,
                _ => data,
            };
            let bitmaps = match &source {
                Some(s) if v3 && supports_bitmaps(s) => Some(bitmaps_size(s, cs)?),
                _ => None,
            };
            Measure {
                required: fully - virtual_size + data,
                fully_allocated: fully,
                bitmaps,
            }
        }
    };
    if args.output == "json" {
        let v = ObjBuilder::new()
            .field("required", m.required)
            .field("fully-allocated", m.fully_allocated)
            .opt("bitmaps", m.bitmaps)
            .build();
        println!("{}", to_qemu_pretty(&v));
    } else {
        println!("required size: {}", m.required);
        println!("fully allocated size: {}", m.fully_allocated);
        if let Some(b) = m.bitmaps {
            println!("bitmaps size: {b}");
        }
    }
    Ok(0)
}

/// Bytes of the source that hold data (through its backing chain), each extent
/// rounded out to whole target clusters; zero extents count nothing.
fn allocated_data(src: &std::sync::Arc<dyn FormatDriver>, cs: u64) -> CliResult<u64> {
    let chain = layers(src);
    let size = src.size();
    let (mut offset, mut required) = (0u64, 0u64);
    while offset < size {
        let st = chain_status(&chain, chain.len(), offset, size - offset)?;
        let mut len = st.len.max(1);
        if !st.zero && st.data {
            // To the end of the cluster; the next extent starts there.
            len = (offset + len).div_ceil(cs) * cs - offset;
            required += offset % cs + len;
        }
        offset += len;
    }
    Ok(required)
}

/// Whether the source format keeps persistent bitmaps (qcow2 v3).
fn supports_bitmaps(src: &std::sync::Arc<dyn FormatDriver>) -> bool {
    matches!(
        src.info().map(|i| i.format_specific),
        Ok(Some(FormatSpecific::Qcow2(q))) if q.compat != "0.10"
    )
}

/// The space the source's persistent bitmaps take in a target with clusters of `cs`
/// bytes: each bitmap's data and table, fully allocated, and the bitmap directory.
fn bitmaps_size(src: &std::sync::Arc<dyn FormatDriver>, cs: u64) -> CliResult<u64> {
    let Some(store) = src.persistent_bitmaps() else {
        return Ok(0);
    };
    let list = store
        .list_bitmaps()
        .map_err(|e| CliError::msg(format!("Could not read bitmaps: {e}")))?;
    let size = src.size();
    let mut total = 0u64;
    let mut dir = 0u64;
    for b in &list {
        let bytes = size.div_ceil(b.granularity.max(1)).div_ceil(8);
        let clusters = bytes.div_ceil(cs);
        total += clusters * cs;
        total += (clusters * 8).div_ceil(cs) * cs;
        // A directory entry: 24 bytes and the name, padded to 8.
        dir += (24 + b.name.len() as u64).div_ceil(8) * 8;
    }
    Ok(total + dir.div_ceil(cs) * cs)
}

/// The file size of a fully preallocated qcow2 image of `size` bytes: header, L1 and
/// L2 tables for every cluster, the data, and the refcount structures covering all
/// of it (and themselves).
pub fn prealloc_size(size: u64, cs: u64, refcount_order: u32, extended_l2: bool) -> u64 {
    let aligned = size.div_ceil(cs) * cs;
    let l2e = if extended_l2 { 16 } else { 8 };
    let mut meta = cs;
    let nl2e = (aligned / cs).div_ceil(cs / l2e) * (cs / l2e);
    meta += nl2e * l2e;
    let nl1e = (nl2e * l2e / cs).div_ceil(cs / 8) * (cs / 8);
    meta += nl1e * 8;
    meta += refcount_metadata_size((meta + aligned) / cs, cs, refcount_order);
    meta + aligned
}

/// Bytes of refcount table and blocks needed to count `clusters` clusters plus the
/// refcount structures themselves.
fn refcount_metadata_size(clusters: u64, cs: u64, refcount_order: u32) -> u64 {
    let per_table_cluster = cs / 8;
    let per_block = (cs * 8) >> refcount_order;
    let (mut table, mut blocks, mut n) = (0u64, 0u64, 0u64);
    loop {
        let last = n;
        blocks = (clusters + table + blocks).div_ceil(per_block);
        table = blocks.div_ceil(per_table_cluster);
        n = clusters + blocks + table;
        if n == last {
            return (blocks + table) * cs;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prealloc_sizes_match_qemu_img_measure() {
        // `qemu-img measure -O qcow2 --size S` (fully allocated size) for these.
        assert_eq!(prealloc_size(0, 65536, 4, false), 196608);
        assert_eq!(prealloc_size(1 << 30, 65536, 4, false), 1074135040);
        assert_eq!(prealloc_size(100 << 20, 65536, 4, false), 105185280);
        assert_eq!(prealloc_size(100 << 20, 4096, 6, false), 105283584);
        assert_eq!(prealloc_size(10 << 30, 65536, 4, false), 10739318784);
    }
}
