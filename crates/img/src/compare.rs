//! `strata-img compare`: compares the guest-visible contents of two images, with
//! qemu-img's messages and exit codes (0 identical, 1 different, 2 open error,
//! 3 block-status error, 4 read error).

use std::sync::Arc;

use strata_image::FormatDriver;

use crate::error::{CliError, CliResult};
use crate::image::{chain_status, first_nonzero, layers, open, parse_cache, OpenArgs};
use crate::util::Progress;

/// Options of `compare`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Format of the first image.
    #[arg(short = 'f')]
    format1: Option<String>,
    /// Format of the second image.
    #[arg(short = 'F')]
    format2: Option<String>,
    /// Strict mode: size and allocation must match too.
    #[arg(short = 's')]
    strict: bool,
    /// Show progress.
    #[arg(short = 'p')]
    progress: bool,
    /// Quiet.
    #[arg(short = 'q')]
    quiet: bool,
    /// Cache mode.
    #[arg(short = 'T')]
    cache: Option<String>,
    /// Accepted for compatibility.
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// First image.
    filename1: String,
    /// Second image.
    filename2: String,
}

const IO_BUF_SIZE: u64 = 2 << 20;

struct Side {
    img: Arc<dyn FormatDriver>,
    chain: Vec<Arc<dyn FormatDriver>>,
    name: String,
}

impl Side {
    fn status(&self, offset: u64, len: u64) -> CliResult<(u64, bool, bool, u8)> {
        let st = chain_status(&self.chain, self.chain.len(), offset, len).map_err(|e| {
            CliError::code(
                format!("Sector allocation test failed for {}: {}", self.name, e),
                3,
            )
        })?;
        // The flags qemu-img's strict mode compares.
        let flags = u8::from(st.present)
            | u8::from(st.zero) << 1
            | u8::from(st.data) << 2
            | u8::from(st.compressed) << 3
            | u8::from(st.offset.is_some()) << 4;
        Ok((st.len, st.present, st.zero, flags))
    }

    fn read(&self, buf: &mut [u8], offset: u64) -> CliResult<()> {
        self.img.read(buf, offset).map_err(|e| {
            CliError::code(
                format!("Error while reading offset {offset} of {}: {e}", self.name),
                4,
            )
        })
    }
}

/// Runs `compare`.
pub fn run(args: Args) -> CliResult<i32> {
    let _ = args.force_share;
    let cache = parse_cache(args.cache.as_deref(), Default::default())
        .map_err(|e| CliError::code(e.to_string(), 2))?;
    let open_side = |name: &str, fmt: Option<&str>| -> CliResult<Side> {
        let img = open(
            name,
            &OpenArgs {
                format: fmt,
                cache,
                ..Default::default()
            },
        )
        .map_err(|e| CliError::code(e.to_string(), 2))?;
        Ok(Side {
            chain: layers(&img),
            img,
            name: name.to_string(),
        })
    };
    let a = open_side(&args.filename1, args.format1.as_deref())?;
    let b = open_side(
        &args.filename2,
        args.format2.as_deref().or(args.format1.as_deref()),
    )?;
    let quiet = args.quiet;
    let say = |m: &str| {
        if !quiet {
            println!("{m}");
        }
    };
    let (size1, size2) = (a.img.size(), b.img.size());
    let total = size1.min(size2);
    if args.strict && size1 != size2 {
        say("Strict mode: Image size mismatch!");
        return Ok(1);
    }
    let mut progress = Progress::new(args.progress);
    let mut buf1 = vec![0u8; IO_BUF_SIZE as usize];
    let mut buf2 = vec![0u8; IO_BUF_SIZE as usize];
    let mut offset = 0u64;
    while offset < total {
        let (n1, alloc1, zero1, flags1) = a.status(offset, size1 - offset)?;
        let (n2, alloc2, zero2, flags2) = b.status(offset, size2 - offset)?;
        let mut chunk = n1.min(n2).min(total - offset);
        if args.strict && flags1 != flags2 {
            say(&format!(
                "Strict mode: Offset {offset} block status mismatch!"
            ));
            return Ok(1);
        }
        if zero1 && zero2 {
            // Both read as zeroes.
        } else if alloc1 == alloc2 && !(zero1 || zero2) && alloc1 {
            chunk = chunk.min(IO_BUF_SIZE);
            let c = chunk as usize;
            a.read(&mut buf1[..c], offset)?;
            b.read(&mut buf2[..c], offset)?;
            if let Some(i) = buf1[..c].iter().zip(&buf2[..c]).position(|(x, y)| x != y) {
                say(&format!(
                    "Content mismatch at offset {}!",
                    offset + i as u64
                ));
                return Ok(1);
            }
        } else if alloc1 == alloc2 && !alloc1 && !zero1 && !zero2 {
            // Neither allocated: both read through to nothing.
        } else {
            chunk = chunk.min(IO_BUF_SIZE);
            let c = chunk as usize;
            // Whichever side is not known to be zero must read as zeroes.
            a.read(&mut buf1[..c], offset)?;
            b.read(&mut buf2[..c], offset)?;
            if let Some(i) = buf1[..c].iter().zip(&buf2[..c]).position(|(x, y)| x != y) {
                say(&format!(
                    "Content mismatch at offset {}!",
                    offset + i as u64
                ));
                return Ok(1);
            }
        }
        offset += chunk;
        progress.update(offset, total);
    }
    if size1 != size2 {
        say("Warning: Image size mismatch!");
        let over = if size1 > size2 { &a } else { &b };
        let over_size = size1.max(size2);
        let mut offset = total;
        while offset < over_size {
            let (n, alloc, zero, _) = over.status(offset, over_size - offset)?;
            let mut chunk = n;
            if alloc && !zero {
                chunk = chunk.min(IO_BUF_SIZE);
                let c = chunk as usize;
                over.read(&mut buf1[..c], offset)?;
                if let Some(i) = first_nonzero(&buf1[..c]) {
                    say(&format!(
                        "Content mismatch at offset {}!",
                        offset + i as u64
                    ));
                    return Ok(1);
                }
            }
            offset += chunk;
        }
    }
    progress.finish();
    say("Images are identical.");
    Ok(0)
}
