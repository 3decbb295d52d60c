//! `strata-img snapshot`: lists (`-l`, also the default), creates (`-c`), applies
//! (`-a`) and deletes (`-d`) internal snapshots, finding them as qemu-img does: `-a`
//! by id and then by name, `-d` by name.

use strata_image::{BackingChoice, FormatDriver, InternalSnapshots, NewSnapshot, SnapshotInfo};

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
    /// Create a snapshot with this name.
    #[arg(short = 'c')]
    create: Option<String>,
    /// Revert the disk to this snapshot (id or name).
    #[arg(short = 'a')]
    apply: Option<String>,
    /// Delete the snapshot with this name.
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

/// What `snapshot` was asked to do.
enum Action<'a> {
    List,
    Create(&'a str),
    Apply(&'a str),
    Delete(&'a str),
}

/// Runs `snapshot`.
pub fn run(args: Args) -> CliResult<i32> {
    let _ = (args.force_share, args.quiet);
    let mut actions = Vec::new();
    if args.list {
        actions.push(Action::List);
    }
    if let Some(n) = &args.create {
        actions.push(Action::Create(n));
    }
    if let Some(n) = &args.apply {
        actions.push(Action::Apply(n));
    }
    if let Some(n) = &args.delete {
        actions.push(Action::Delete(n));
    }
    if actions.len() > 1 {
        return Err(CliError::msg(
            "Cannot mix '-l', '-a', '-c', '-d'\nTry 'strata-img --help' for more information",
        ));
    }
    // Listing is also what qemu-img does when no action is given.
    let action = actions.pop().unwrap_or(Action::List);
    let img = open(
        &args.filename,
        &OpenArgs {
            format: args.format.as_deref(),
            writable: !matches!(action, Action::List),
            backing: BackingChoice::None,
            ..Default::default()
        },
    )?;
    match action {
        Action::List => list(&img),
        Action::Create(name) => {
            snapshots(&img, "create", name)?
                .create_snapshot(&NewSnapshot::now(name))
                .map_err(|e| failed("create", name, e))?;
            finish(&img)
        }
        Action::Apply(name) => {
            let list = img.snapshots()?;
            let found = list
                .iter()
                .find(|s| s.id == name)
                .or_else(|| list.iter().find(|s| s.name == name));
            let Some(sn) = found else {
                return Err(CliError::msg(format!(
                    "Could not apply snapshot '{name}': Failed to load snapshot: No such file or directory"
                )));
            };
            let ops = snapshots(&img, "apply", name)?;
            ops.apply_snapshot(&sn.id)
                .map_err(|e| failed("apply", name, e))?;
            finish(&img)
        }
        Action::Delete(name) => {
            let list = img.snapshots()?;
            let Some(sn) = list.iter().find(|s| s.name == name) else {
                return Err(CliError::msg(format!(
                    "Could not delete snapshot '{name}': snapshot not found"
                )));
            };
            let ops = snapshots(&img, "delete", name)?;
            ops.delete_snapshot(&sn.id)
                .map_err(|e| failed("delete", name, e))?;
            finish(&img)
        }
    }
}

fn list(img: &std::sync::Arc<dyn FormatDriver>) -> CliResult<i32> {
    let snaps: Vec<SnapshotInfo> = img.snapshots()?;
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

/// The snapshot operations of `img`, or qemu-img's error for a format without them.
fn snapshots<'a>(
    img: &'a std::sync::Arc<dyn FormatDriver>,
    what: &str,
    name: &str,
) -> CliResult<&'a dyn InternalSnapshots> {
    img.internal_snapshots().ok_or_else(|| {
        CliError::msg(format!(
            "Could not {what} snapshot '{name}': Operation not supported"
        ))
    })
}

fn failed(what: &str, name: &str, e: strata_image::Error) -> CliError {
    CliError::msg(format!("Could not {what} snapshot '{name}': {e}"))
}

/// Closes the image (metadata flushed); a failure is the command's failure.
fn finish(img: &std::sync::Arc<dyn FormatDriver>) -> CliResult<i32> {
    img.close()?;
    Ok(0)
}
