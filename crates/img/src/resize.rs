//! `strata-img resize`: changes an image's virtual size (absolute, `+N` or `-N`),
//! refusing to shrink without `--shrink` as qemu-img does.

use strata_image::{BackingChoice, Preallocation};

use crate::error::{CliError, CliResult};
use crate::image::{open, OpenArgs};
use crate::util::{parse_size, MAX_SIZE};

/// Options of `resize`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Image format (probed when absent).
    #[arg(short = 'f')]
    format: Option<String>,
    /// Preallocation for the new area: off, metadata, falloc, full.
    #[arg(long = "preallocation")]
    preallocation: Option<String>,
    /// Allow shrinking.
    #[arg(long = "shrink")]
    shrink: bool,
    /// Quiet.
    #[arg(short = 'q')]
    quiet: bool,
    /// Accepted for compatibility.
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// The image file.
    filename: String,
    /// New size, or `+size` / `-size` relative to the current one.
    #[arg(allow_hyphen_values = true)]
    size: String,
}

/// A parsed size argument.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SizeArg {
    /// An absolute size.
    Absolute(u64),
    /// Grow by.
    Grow(u64),
    /// Shrink by.
    Shrink(u64),
}

/// Parses `N`, `+N` or `-N` with size suffixes.
pub fn parse_size_arg(s: &str) -> CliResult<SizeArg> {
    let bad = || CliError::msg("Parameter 'size' expects a non-negative number below 2^64");
    if let Some(rest) = s.strip_prefix('+') {
        parse_size(rest).map(SizeArg::Grow).ok_or_else(bad)
    } else if let Some(rest) = s.strip_prefix('-') {
        parse_size(rest).map(SizeArg::Shrink).ok_or_else(bad)
    } else {
        parse_size(s).map(SizeArg::Absolute).ok_or_else(bad)
    }
}

/// Runs `resize`.
pub fn run(args: Args) -> CliResult<i32> {
    let _ = args.force_share;
    let prealloc = match args.preallocation.as_deref() {
        None => Preallocation::Off,
        Some(p) => Preallocation::parse(p)
            .map_err(|_| CliError::msg(format!("Invalid preallocation mode '{p}'")))?,
    };
    let arg = parse_size_arg(&args.size)?;
    let img = open(
        &args.filename,
        &OpenArgs {
            format: args.format.as_deref(),
            writable: true,
            backing: BackingChoice::None,
            ..Default::default()
        },
    )?;
    let current = img.size();
    let new = match arg {
        SizeArg::Absolute(v) => Some(v),
        SizeArg::Grow(v) => current.checked_add(v),
        SizeArg::Shrink(v) => Some(
            current
                .checked_sub(v)
                .ok_or_else(|| CliError::msg("New image size must be positive"))?,
        ),
    };
    let new = match new {
        Some(v) if v <= MAX_SIZE => v,
        _ => return Err(CliError::msg("Image size must be less than 8 EiB!")),
    };
    if new < current && !args.shrink {
        eprintln!("strata-img: Use the --shrink option to perform a shrink operation.");
        return Err(CliError::msg("warning: Shrinking an image will delete all data beyond the shrunken image's end. Before performing such an operation, make sure there is no important data there."));
    }
    if new < current && prealloc != Preallocation::Off {
        return Err(CliError::msg(
            "Preallocation can only be used for growing images",
        ));
    }
    if new != current {
        img.resize(new, prealloc)?;
    }
    img.close()?;
    if !args.quiet {
        println!("Image resized.");
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_sizes() {
        assert_eq!(parse_size_arg("1M").unwrap(), SizeArg::Absolute(1 << 20));
        assert_eq!(parse_size_arg("+1G").unwrap(), SizeArg::Grow(1 << 30));
        assert_eq!(parse_size_arg("-512k").unwrap(), SizeArg::Shrink(512 << 10));
        assert!(parse_size_arg("+x").is_err());
    }
}
