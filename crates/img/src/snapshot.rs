//! `strata-img snapshot`: lists internal snapshots (`-l`). Creating, applying and
//! deleting snapshots are refused with a clear error.

use strata_image::BackingChoice;

use crate::error::{CliError, CliResult};
use crate::image::{open, OpenArgs};
use crate::info::{snapshot_header, snapshot_row};

/// Options of `snapshot`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Image format (probed when absent).
    #[arg(short = 'f')]
    format: Option<String>,
    /// List snapshots.
    #[arg(short = 'l')]
    list: bool,
    /// Create a snapshot (not supported).
    #[arg(short = 'c')]
    create: Option<String>,
    /// Apply a snapshot (not supported).
    #[arg(short = 'a')]
    apply: Option<String>,
    /// Delete a snapshot (not supported).
    #[arg(short = 'd')]
    delete: Option<String>,
    /// Quiet.
    #[arg(short = 'q')]
    quiet: bool,
    /// Accepted for compatibility.
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// The image file.
    filename: String,
}

/// Runs `snapshot`.
pub fn run(args: Args) -> CliResult<i32> {
    let _ = (args.force_share, args.quiet);
    if args.create.is_some() || args.apply.is_some() || args.delete.is_some() {
        return Err(CliError::msg(
            "Creating, applying and deleting snapshots is not supported by strata-img yet",
        ));
    }
    // Listing is also what qemu-img does when no action is given.
    let _ = args.list;
    let img = open(
        &args.filename,
        &OpenArgs {
            format: args.format.as_deref(),
            backing: BackingChoice::None,
            ..Default::default()
        },
    )?;
    let snaps = img.snapshots()?;
    if snaps.is_empty() {
        return Ok(0);
    }
    println!("Snapshot list:");
    println!("{}", snapshot_header());
    for s in &snaps {
        println!("{}", snapshot_row(s));
    }
    Ok(0)
}
