//! `strata-img rebase`: changes an image's backing file. In safe mode (the default)
//! every range the image does not allocate itself and whose contents differ between
//! the old and the new backing is first copied into the image, so the guest-visible
//! contents do not change; `-u` only rewrites the header.

use std::path::Path;
use std::sync::Arc;

use strata_image::{resolve_backing_path, BackingChoice, FormatDriver};

use crate::error::{CliError, CliResult};
use crate::image::{open, parse_cache, OpenArgs};
use crate::util::Progress;

/// Options of `rebase`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Image format (probed when absent).
    #[arg(short = 'f')]
    format: Option<String>,
    /// New backing file ("" removes the backing file).
    #[arg(short = 'b')]
    backing: Option<String>,
    /// New backing file format.
    #[arg(short = 'F')]
    backing_fmt: Option<String>,
    /// Unsafe: only change the header.
    #[arg(short = 'u')]
    unsafe_mode: bool,
    /// Show progress.
    #[arg(short = 'p')]
    progress: bool,
    /// Image cache mode.
    #[arg(short = 't')]
    cache: Option<String>,
    /// Backing files' cache mode.
    #[arg(short = 'T')]
    src_cache: Option<String>,
    /// Compress clusters copied into the image.
    #[arg(short = 'c')]
    compress: bool,
    /// Quiet.
    #[arg(short = 'q')]
    quiet: bool,
    /// Accepted for compatibility.
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// The image file.
    filename: String,
}

const IO_BUF_SIZE: u64 = 2 << 20;

fn read_or_zero(b: Option<&Arc<dyn FormatDriver>>, buf: &mut [u8], offset: u64) -> CliResult<()> {
    buf.fill(0);
    if let Some(b) = b {
        let size = b.size();
        if offset < size {
            let n = ((size - offset) as usize).min(buf.len());
            b.read(&mut buf[..n], offset).map_err(|e| {
                CliError::msg(format!("error while reading from old backing file: {e}"))
            })?;
        }
    }
    Ok(())
}

/// Runs `rebase`.
pub fn run(args: Args) -> CliResult<i32> {
    let _ = (args.force_share, args.quiet, args.compress);
    let new_name = args
        .backing
        .clone()
        .ok_or_else(|| CliError::msg("Must specify backing file (-b) or use unsafe mode (-u)"))?;
    if !new_name.is_empty() && args.backing_fmt.is_none() {
        return Err(CliError::msg(format!(
            "Could not change the backing file to '{new_name}': backing format must be specified"
        )));
    }
    let cache = parse_cache(args.cache.as_deref(), Default::default())?;
    let bcache = parse_cache(args.src_cache.as_deref(), Default::default())?;
    let img = open(
        &args.filename,
        &OpenArgs {
            format: args.format.as_deref(),
            writable: true,
            cache,
            backing: if args.unsafe_mode {
                BackingChoice::None
            } else {
                BackingChoice::FromImage
            },
        },
    )?;
    let removing = new_name.is_empty();
    let new_path = resolve_backing_path(Path::new(&args.filename), &new_name);
    let mut new_fmt = args.backing_fmt.clone();
    let new_backing = if removing || (args.unsafe_mode && new_fmt.is_some()) {
        None
    } else {
        let opened = strata_image::open_image(
            &new_path,
            &strata_image::OpenOptions {
                format: new_fmt
                    .as_deref()
                    .map(strata_image::Format::parse)
                    .transpose()?,
                read_only: true,
                cache: bcache,
                ..Default::default()
            },
        );
        match opened {
            Ok(b) => {
                if new_fmt.is_none() {
                    new_fmt = Some(b.format_name().to_string());
                }
                Some(b)
            }
            Err(e) if !args.unsafe_mode => {
                return Err(CliError::msg(format!(
                    "Could not open new backing file '{new_name}': {e}"
                )))
            }
            Err(_) => None,
        }
    };

    if !args.unsafe_mode {
        let old = img.backing();
        let size = img.size();
        let mut progress = Progress::new(args.progress);
        let mut buf_old = vec![0u8; IO_BUF_SIZE as usize];
        let mut buf_new = vec![0u8; IO_BUF_SIZE as usize];
        let granule = img.cluster_size().unwrap_or(512).max(512);
        let mut offset = 0u64;
        while offset < size {
            let st = img.block_status(offset, (size - offset).min(IO_BUF_SIZE))?;
            let n = st.len.min(size - offset);
            if !st.allocated && !st.zero && !st.data {
                let c = n as usize;
                read_or_zero(old.as_ref(), &mut buf_old[..c], offset)?;
                read_or_zero(new_backing.as_ref(), &mut buf_new[..c], offset)?;
                // Copy every granule (cluster) that differs, whole.
                let mut pos = 0usize;
                while pos < c {
                    let at = offset + pos as u64;
                    let gend = (((at / granule) + 1) * granule - offset) as usize;
                    let end = gend.min(c);
                    if buf_old[pos..end] != buf_new[pos..end] {
                        img.write(&buf_old[pos..end], at).map_err(|e| {
                            CliError::msg(format!("Error while writing image: {e}"))
                        })?;
                    }
                    pos = end;
                }
            }
            offset += n;
            progress.update(offset, size);
        }
        progress.finish();
    }
    let (name, fmt) = if removing {
        (None, None)
    } else {
        (Some(new_name.as_str()), new_fmt.as_deref())
    };
    img.set_backing_file(name, fmt).map_err(|e| {
        CliError::msg(format!(
            "Could not change the backing file to '{new_name}': {e}"
        ))
    })?;
    img.close()?;
    Ok(0)
}
