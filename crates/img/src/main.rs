//! `strata-img`: the qemu-img of Strata. Subcommands and options are spelled as in
//! qemu-img 10; each lives in its own module. Errors are printed as one line,
//! `strata-img: <message>`, and turned into qemu-img's exit codes.

mod bench;
mod bitmap;
mod check;
mod commit;
mod compare;
mod convert;
mod create;
mod error;
mod image;
mod info;
mod json;
mod map;
mod measure;
mod rebase;
mod resize;
mod snapshot;
mod util;

use clap::{Parser, Subcommand};

use error::{clean_message, CliError, CliResult};

/// `--output=human|json`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputFormat {
    /// Text for people.
    Human,
    /// JSON for scripts.
    Json,
}

impl OutputFormat {
    /// Parses the `--output` value with qemu-img's wording.
    pub fn parse(s: &str) -> CliResult<Self> {
        match s {
            "human" => Ok(OutputFormat::Human),
            "json" => Ok(OutputFormat::Json),
            _ => Err(CliError::msg(format!(
                "--output expects 'human' or 'json' not '{s}'"
            ))),
        }
    }
}

/// The command line.
#[derive(Debug, Parser)]
#[command(
    name = "strata-img",
    version,
    about = "strata-img: create, inspect and convert disk images (qemu-img compatible)"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Create a new image.
    Create(create::Args),
    /// Show information about an image.
    Info(info::Args),
    /// Check an image's metadata for consistency.
    Check(check::Args),
    /// Dump an image's allocation map.
    Map(map::Args),
    /// Compare the contents of two images.
    Compare(compare::Args),
    /// Convert an image to another format.
    Convert(convert::Args),
    /// Change an image's virtual size.
    Resize(resize::Args),
    /// Change an image's backing file.
    Rebase(rebase::Args),
    /// Write an image's changes into its backing file.
    Commit(commit::Args),
    /// List, create, apply or delete internal snapshots.
    Snapshot(snapshot::Args),
    /// Run a simple I/O benchmark.
    Bench(bench::Args),
    /// Add, remove, clear, enable, disable or merge persistent dirty bitmaps.
    Bitmap(bitmap::Args),
    /// Compute the size a new image would need.
    Measure(measure::Args),
}

fn run(cli: Cli) -> CliResult<i32> {
    match cli.cmd {
        Cmd::Create(a) => create::run(a),
        Cmd::Info(a) => info::run(a),
        Cmd::Check(a) => check::run(a),
        Cmd::Map(a) => map::run(a),
        Cmd::Compare(a) => compare::run(a),
        Cmd::Convert(a) => convert::run(a),
        Cmd::Resize(a) => resize::run(a),
        Cmd::Rebase(a) => rebase::run(a),
        Cmd::Commit(a) => commit::run(a),
        Cmd::Snapshot(a) => snapshot::run(a),
        Cmd::Bench(a) => bench::run(a),
        Cmd::Bitmap(a) => bitmap::run(a),
        Cmd::Measure(a) => measure::run(a),
    }
}

/// Turns a command-line parsing error into qemu-img's one-line wording, prefixed with
/// `strata-img: ` (or `strata-img <subcommand>: ` for option errors, as getopt does).
fn clap_error_line(e: &clap::Error) -> String {
    use clap::error::{ContextKind, ContextValue, ErrorKind};
    let sub = std::env::args().nth(1).unwrap_or_default();
    let arg = match e.get(ContextKind::InvalidArg) {
        Some(ContextValue::String(s)) => s.clone(),
        _ => String::new(),
    };
    let missing = || {
        match sub.as_str() {
            "compare" => "Expecting two image file names",
            "create" => "Expecting image file name",
            "convert" => "Must specify image file name",
            "resize" => "Expecting image file name and size",
            _ => "Expecting one image file name",
        }
        .to_string()
    };
    match e.kind() {
        ErrorKind::InvalidSubcommand => format!("strata-img: Command not found: {sub}"),
        ErrorKind::MissingSubcommand | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
            "strata-img: Not enough arguments".into()
        }
        ErrorKind::MissingRequiredArgument => format!("strata-img: {}", missing()),
        ErrorKind::UnknownArgument if arg.starts_with("--") => {
            let name = arg.split('=').next().unwrap_or(&arg);
            format!("strata-img {sub}: unrecognized option '{name}'")
        }
        ErrorKind::UnknownArgument if arg.starts_with('-') && arg.len() > 1 => {
            format!(
                "strata-img {sub}: invalid option -- '{}'",
                arg.chars().nth(1).unwrap_or('?')
            )
        }
        ErrorKind::UnknownArgument => format!("strata-img: {}", missing()),
        ErrorKind::InvalidValue | ErrorKind::NoEquals if arg.starts_with("--") => {
            let name = arg.split([' ', '=']).next().unwrap_or(&arg);
            format!("strata-img {sub}: option '{name}' requires an argument")
        }
        ErrorKind::InvalidValue if arg.starts_with('-') && arg.len() > 1 => {
            format!(
                "strata-img {sub}: option requires an argument -- '{}'",
                arg.chars().nth(1).unwrap_or('?')
            )
        }
        _ => {
            let rendered = e.render().to_string();
            let first = rendered.lines().next().unwrap_or("invalid arguments");
            format!(
                "strata-img: {}",
                first.strip_prefix("error: ").unwrap_or(first)
            )
        }
    }
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_env("STRATA_LOG"))
        .with_writer(std::io::stderr)
        .init();
    // Never let a panic print a backtrace: report it as one line.
    std::panic::set_hook(Box::new(|info| {
        let msg = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "internal error".into());
        eprintln!("strata-img: internal error: {msg}");
    }));
    if std::env::args().len() < 2 {
        eprintln!("strata-img: Not enough arguments");
        std::process::exit(1);
    }
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => match e.kind() {
            clap::error::ErrorKind::DisplayHelp
            | clap::error::ErrorKind::DisplayVersion
            | clap::error::ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
                let _ = e.print();
                std::process::exit(0);
            }
            _ => {
                eprintln!("{}", clap_error_line(&e));
                std::process::exit(1);
            }
        },
    };
    let code = match std::panic::catch_unwind(|| run(cli)) {
        Ok(Ok(code)) => code,
        Ok(Err(e)) => {
            eprintln!("strata-img: {}", clean_message(&e.to_string()));
            e.exit_code()
        }
        Err(_) => 1,
    };
    std::process::exit(code);
}
