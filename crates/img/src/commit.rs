//! `strata-img commit`: writes what an image allocates (and, with `-b`, what every
//! image between it and the chosen base allocates) into the base, then empties the
//! image unless `-d` is given (or `-b`, which implies it).

use std::path::Path;
use std::sync::Arc;

use strata_image::{resolve_backing_path, BackingChoice, FormatDriver};

use crate::error::{CliError, CliResult};
use crate::image::{chain_status, layers, open, parse_cache, OpenArgs};
use crate::util::Progress;

/// Options of `commit`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Image format (probed when absent).
    #[arg(short = 'f')]
    format: Option<String>,
    /// Cache mode.
    #[arg(short = 't')]
    cache: Option<String>,
    /// The base image to commit into (implies -d).
    #[arg(short = 'b')]
    base: Option<String>,
    /// Do not empty the image after committing.
    #[arg(short = 'd')]
    drop: bool,
    /// Show progress.
    #[arg(short = 'p')]
    progress: bool,
    /// Rate limit (accepted, not enforced).
    #[arg(short = 'r')]
    rate: Option<String>,
    /// Quiet.
    #[arg(short = 'q')]
    quiet: bool,
    /// The image file.
    filename: String,
}

const IO_BUF_SIZE: u64 = 2 << 20;

/// Runs `commit`.
pub fn run(args: Args) -> CliResult<i32> {
    let _ = &args.rate;
    let cache = parse_cache(args.cache.as_deref(), CacheMode::Writeback)?;
    let top = open(
        &args.filename,
        &OpenArgs {
            format: args.format.as_deref(),
            writable: true,
            cache,
            backing: BackingChoice::FromImage,
        },
    )?;
    let chain = layers(&top);
    if chain.len() < 2 {
        return Err(CliError::msg("Image does not have a backing file"));
    }
    // Names of the chain's files, resolved the way QEMU resolves backing names.
    let mut names: Vec<(String, Option<String>)> = vec![(args.filename.clone(), None)];
    for i in 1..chain.len() {
        let info = chain[i - 1].info()?;
        let b = info
            .backing_filename
            .ok_or_else(|| CliError::msg("Image does not have a backing file"))?;
        let resolved = resolve_backing_path(Path::new(&names[i - 1].0), &b)
            .display()
            .to_string();
        names.push((resolved, info.backing_format));
    }
    let base_idx = match &args.base {
        None => 1,
        Some(b) => {
            // As QEMU: the name as stored in the image that refers to it, or the same
            // file once the name is resolved relative to that image's directory.
            let mut found = None;
            for i in 1..names.len() {
                let stored = chain[i - 1]
                    .info()
                    .ok()
                    .and_then(|inf| inf.backing_filename);
                let want =
                    std::fs::canonicalize(resolve_backing_path(Path::new(&names[i - 1].0), b)).ok();
                if stored.as_deref() == Some(b.as_str())
                    || (want.is_some() && std::fs::canonicalize(&names[i].0).ok() == want)
                {
                    found = Some(i);
                    break;
                }
            }
            found.ok_or_else(|| {
                CliError::msg(format!(
                    "Did not find '{b}' in the backing chain of '{}'",
                    args.filename
                ))
            })?
        }
    };
    let drop_top = args.drop || args.base.is_some();
    // Open the base read-write on its own (the chain holds it read-only).
    let (base_name, base_fmt) = &names[base_idx];
    let base: Arc<dyn FormatDriver> = open(
        base_name,
        &OpenArgs {
            format: base_fmt.as_deref().or(Some(chain[base_idx].format_name())),
            writable: true,
            cache,
            backing: BackingChoice::FromImage,
        },
    )?;
    let size = top.size();
    if base.size() < size {
        base.resize(size, Default::default())?;
    }
    let mut progress = Progress::new(args.progress && !args.quiet);
    let mut buf = vec![0u8; IO_BUF_SIZE as usize];
    let mut offset = 0u64;
    while offset < size {
        let st = chain_status(&chain, base_idx, offset, (size - offset).min(IO_BUF_SIZE))?;
        let n = st.len.min(size - offset);
        if st.present && st.depth < base_idx {
            if st.zero {
                base.write_zeroes(offset, n, false)?;
            } else {
                let c = n as usize;
                top.read(&mut buf[..c], offset)?;
                base.write(&buf[..c], offset)?;
            }
        }
        offset += n;
        progress.update(offset, size);
    }
    base.close()?;
    if !drop_top {
        top.make_empty()?;
    }
    top.close()?;
    progress.finish();
    if !args.quiet {
        println!("Image committed.");
    }
    Ok(0)
}

use strata_image::CacheMode;
