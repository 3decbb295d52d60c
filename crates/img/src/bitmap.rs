//! `strata-img bitmap`: adds, removes, clears, enables, disables and merges the
//! persistent dirty bitmaps of an image, as `qemu-img bitmap` does. The operations
//! run in the order they are given, through the block graph's bitmap commands (the
//! same code as QMP's `block-dirty-bitmap-*`); the bitmaps are stored when the image
//! is closed.

use serde_json::{json, Value};
use strata_block::{BitmapRef, BlockGraph, BlockdevOptions};
use strata_image::{CacheMode, FileStorage};

use crate::error::{CliError, CliResult};
use crate::util::cvtnum;

/// Options of `bitmap`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Add the bitmap (persistent, enabled).
    #[arg(long)]
    add: bool,
    /// Remove the bitmap.
    #[arg(long)]
    remove: bool,
    /// Clear the bitmap.
    #[arg(long)]
    clear: bool,
    /// Enable the bitmap.
    #[arg(long)]
    enable: bool,
    /// Disable the bitmap.
    #[arg(long)]
    disable: bool,
    /// Merge bitmap SOURCE (of the image, or of the `-b` file) into the bitmap.
    #[arg(long, value_name = "SOURCE")]
    merge: Vec<String>,
    /// Granularity of a bitmap `--add` creates.
    #[arg(short = 'g', long = "granularity")]
    granularity: Option<String>,
    /// The file holding the `--merge` source bitmap.
    #[arg(short = 'b', long = "source-file")]
    source_file: Option<String>,
    /// Format of the `-b` file.
    #[arg(short = 'F', long = "source-format")]
    source_format: Option<String>,
    /// Image format (probed when absent).
    #[arg(short = 'f', long = "format")]
    format: Option<String>,
    /// The image file and the bitmap name.
    positional: Vec<String>,
}

/// One operation, in command-line order.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Op {
    Add,
    Remove,
    Clear,
    Enable,
    Disable,
    Merge(String),
}

impl Op {
    fn name(&self) -> &'static str {
        match self {
            Op::Add => "add",
            Op::Remove => "remove",
            Op::Clear => "clear",
            Op::Enable => "enable",
            Op::Disable => "disable",
            Op::Merge(_) => "merge",
        }
    }
}

/// The operations in the order they appear in `argv` (clap keeps each kind apart).
fn ops_in_order(argv: &[String]) -> Vec<Op> {
    let mut ops = Vec::new();
    let mut it = argv.iter().skip_while(|a| *a != "bitmap").skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--add" => ops.push(Op::Add),
            "--remove" => ops.push(Op::Remove),
            "--clear" => ops.push(Op::Clear),
            "--enable" => ops.push(Op::Enable),
            "--disable" => ops.push(Op::Disable),
            "--merge" => ops.extend(it.next().map(|s| Op::Merge(s.clone()))),
            // A value that follows its option is skipped with it.
            "-g" | "--granularity" | "-b" | "--source-file" | "-F" | "--source-format" | "-f"
            | "--format" => {
                it.next();
            }
            other => {
                if let Some(src) = other.strip_prefix("--merge=") {
                    ops.push(Op::Merge(src.to_string()));
                }
            }
        }
    }
    ops
}

/// Runs `bitmap`.
pub fn run(args: Args) -> CliResult<i32> {
    let argv: Vec<String> = std::env::args().collect();
    run_ops(args, &ops_in_order(&argv))
}

fn run_ops(args: Args, ops: &[Op]) -> CliResult<i32> {
    // qemu-img's checks, in its order.
    let granularity = args
        .granularity
        .as_deref()
        .map(|g| cvtnum("granularity", g, i64::MAX as u64))
        .transpose()?;
    if ops.is_empty() {
        return Err(CliError::msg(
            "Need at least one of --add, --remove, --clear, --enable, --disable, or --merge",
        ));
    }
    if granularity.is_some() && !ops.contains(&Op::Add) {
        return Err(CliError::msg("granularity only supported with --add"));
    }
    if args.source_format.is_some() && args.source_file.is_none() {
        return Err(CliError::msg("-F only supported with -b"));
    }
    if args.source_file.is_some() && !ops.iter().any(|o| matches!(o, Op::Merge(_))) {
        return Err(CliError::msg(
            "Merge bitmap source file only supported with --merge",
        ));
    }
    let [filename, bitmap] = args.positional.as_slice() else {
        return Err(CliError::msg("Expecting filename and bitmap name"));
    };
    let graph = BlockGraph::new();
    let node = add_node(&graph, filename, args.format.as_deref(), false)?;
    let src_node = match &args.source_file {
        Some(f) => add_node(&graph, f, args.source_format.as_deref(), true)?,
        None => node.clone(),
    };
    let mut result = Ok(0);
    for op in ops {
        let r = match op {
            Op::Add => graph.bitmap_add(&node, bitmap, granularity, true, false),
            Op::Remove => graph.bitmap_remove(&node, bitmap),
            Op::Clear => graph.bitmap_clear(&node, bitmap),
            Op::Enable => graph.bitmap_set_enabled(&node, bitmap, true),
            Op::Disable => graph.bitmap_set_enabled(&node, bitmap, false),
            Op::Merge(src) => graph.bitmap_merge(
                &node,
                bitmap,
                &[BitmapRef {
                    node: src_node.clone(),
                    name: src.clone(),
                }],
            ),
        };
        if let Err(e) = r {
            result = Err(CliError::msg(format!(
                "Operation {} on bitmap {bitmap} failed: {}",
                op.name(),
                e.desc
            )));
            break;
        }
    }
    // Closing stores the persistent bitmaps (also after a failed operation, as
    // qemu-img keeps the ones before it).
    let errors = graph.close_all();
    if let (Ok(_), Some(e)) = (&result, errors.first()) {
        return Err(CliError::msg(e.desc.clone()));
    }
    result
}

/// Opens `path` (format probed when not given) as a node with a generated name, as
/// qemu-img does; returns the name.
fn add_node(
    graph: &BlockGraph,
    path: &str,
    format: Option<&str>,
    read_only: bool,
) -> CliResult<String> {
    let format = match format {
        Some(f) => f.to_string(),
        None => {
            let st = FileStorage::open(std::path::Path::new(path), true, CacheMode::Writeback)
                .map_err(|e| {
                    CliError::msg(format!(
                        "Could not open '{path}': {}",
                        crate::error::clean_message(&e.to_string())
                    ))
                })?;
            strata_image::probe_format(&st)
                .map_err(|e| CliError::msg(format!("Could not open '{path}': {e}")))?
                .name()
                .to_string()
        }
    };
    let v: Value = json!({
        "driver": format,
        "read-only": read_only,
        "file": {"driver": "file", "filename": path, "read-only": read_only},
    });
    let opts = BlockdevOptions::from_json(&v)
        .map_err(|e| CliError::msg(format!("Could not open '{path}': {}", e.desc)))?;
    let node = graph
        .open_implicit(&opts)
        .map_err(|e| CliError::msg(format!("Could not open '{path}': {}", e.desc)))?;
    Ok(node.name().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argv(s: &str) -> Vec<String> {
        s.split_whitespace().map(str::to_string).collect()
    }

    #[test]
    fn operations_keep_their_command_line_order() {
        let ops = ops_in_order(&argv(
            "strata-img bitmap --disable -g 64k --merge a -b f.qcow2 --add --merge=b x.qcow2 bm",
        ));
        assert_eq!(
            ops,
            vec![
                Op::Disable,
                Op::Merge("a".into()),
                Op::Add,
                Op::Merge("b".into())
            ]
        );
    }
}
