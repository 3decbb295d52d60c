//! `strata-img check`: runs the format driver's consistency check (optionally with
//! repair) and prints the result as qemu-img does, with its exit codes:
//! 0 clean, 1 check errors, 2 corruptions, 3 leaks, 63 format cannot be checked.

use strata_image::{BackingChoice, CheckReport, RepairMode};

use crate::error::{CliError, CliResult};
use crate::image::{open, parse_cache, OpenArgs};
use crate::json::{to_qemu_pretty, Json, ObjBuilder};
use crate::OutputFormat;

/// Options of `check`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Image format (probed when absent).
    #[arg(short = 'f')]
    format: Option<String>,
    /// Output format: human or json.
    #[arg(long = "output", default_value = "human")]
    output: String,
    /// Repair: `leaks` or `all`.
    #[arg(short = 'r', long = "repair")]
    repair: Option<String>,
    /// Cache mode.
    #[arg(short = 'T', long = "cache")]
    cache: Option<String>,
    /// Quiet.
    #[arg(short = 'q')]
    quiet: bool,
    /// Accepted for compatibility.
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// The image file.
    filename: String,
}

/// The JSON object qemu-img prints for a check (`ImageCheck`).
pub fn report_json(r: &CheckReport, filename: &str, format: &str) -> Json {
    let nz = |v: u64| (v != 0).then_some(v);
    ObjBuilder::new()
        .field("filename", filename)
        .field("format", format)
        .field("check-errors", r.check_errors)
        .opt("image-end-offset", nz(r.image_end_offset))
        .opt("corruptions", nz(r.corruptions))
        .opt("leaks", nz(r.leaks))
        .opt("corruptions-fixed", nz(r.corruptions_fixed))
        .opt("leaks-fixed", nz(r.leaks_fixed))
        .opt("total-clusters", nz(r.total_clusters))
        .opt("allocated-clusters", nz(r.allocated_clusters))
        .opt("fragmented-clusters", nz(r.fragmented_clusters))
        .opt("compressed-clusters", nz(r.compressed_clusters))
        .build()
}

/// The human-readable summary qemu-img prints after a check.
pub fn report_human(r: &CheckReport) -> String {
    let mut out = String::new();
    if r.corruptions == 0 && r.leaks == 0 && r.check_errors == 0 {
        out.push_str("No errors were found on the image.\n");
    } else {
        if r.corruptions != 0 {
            out.push_str(&format!(
                "\n{} errors were found on the image.\nData may be corrupted, or further writes to the image may corrupt it.\n",
                r.corruptions
            ));
        }
        if r.leaks != 0 {
            out.push_str(&format!(
                "\n{} leaked clusters were found on the image.\nThis means waste of disk space, but no harm to data.\n",
                r.leaks
            ));
        }
        if r.check_errors != 0 {
            out.push_str(&format!(
                "\n{} internal errors have occurred during the check.\n",
                r.check_errors
            ));
        }
    }
    if r.total_clusters != 0 && r.allocated_clusters != 0 {
        let a = r.allocated_clusters as f64;
        out.push_str(&format!(
            "{}/{} = {:.2}% allocated, {:.2}% fragmented, {:.2}% compressed clusters\n",
            r.allocated_clusters,
            r.total_clusters,
            a * 100.0 / r.total_clusters as f64,
            r.fragmented_clusters as f64 * 100.0 / a,
            r.compressed_clusters as f64 * 100.0 / a
        ));
    }
    if r.image_end_offset != 0 {
        out.push_str(&format!("Image end offset: {}\n", r.image_end_offset));
    }
    out
}

/// Runs `check`.
pub fn run(args: Args) -> CliResult<i32> {
    let _ = args.force_share;
    let output = OutputFormat::parse(&args.output)?;
    let repair = match args.repair.as_deref() {
        None => None,
        Some("leaks") => Some(RepairMode::Leaks),
        Some("all") => Some(RepairMode::All),
        Some(o) => {
            return Err(CliError::msg(format!(
                "--repair (-r) expects 'leaks' or 'all' not '{o}'"
            )))
        }
    };
    let cache = parse_cache(args.cache.as_deref(), Default::default())?;
    let img = open(
        &args.filename,
        &OpenArgs {
            format: args.format.as_deref(),
            writable: repair.is_some(),
            cache,
            // qemu-img opens the backing chain too (and fails when it is missing).
            backing: BackingChoice::FromImage,
        },
    )?;
    let first = match img.check(repair) {
        Ok(r) => r,
        Err(e) if e.errno() == Some(libc::ENOTSUP) => {
            return Err(CliError::code(
                "This image format does not support checks",
                63,
            ))
        }
        Err(e) => return Err(CliError::msg(format!("Check failed: {e}"))),
    };
    for m in &first.messages {
        eprintln!("{m}");
    }
    let mut report = first.clone();
    if first.corruptions_fixed != 0 || first.leaks_fixed != 0 {
        if output == OutputFormat::Human && !args.quiet {
            print!(
                "The following inconsistencies were found and repaired:\n\n    {} leaked clusters\n    {} corruptions\n\nDouble checking the fixed image now...\n",
                first.leaks_fixed, first.corruptions_fixed
            );
        }
        let second = img
            .check(None)
            .map_err(|e| CliError::msg(format!("Check failed: {e}")))?;
        for m in &second.messages {
            eprintln!("{m}");
        }
        report = CheckReport {
            leaks_fixed: first.leaks_fixed,
            corruptions_fixed: first.corruptions_fixed,
            ..second
        };
    }
    if repair.is_some() {
        img.close()?;
    }
    if !args.quiet {
        match output {
            OutputFormat::Human => print!("{}", report_human(&report)),
            OutputFormat::Json => println!(
                "{}",
                to_qemu_pretty(&report_json(&report, &args.filename, img.format_name()))
            ),
        }
    }
    if report.check_errors != 0 {
        return Err(CliError::msg("Check failed"));
    }
    Ok(if report.corruptions != 0 {
        2
    } else if report.leaks != 0 {
        3
    } else {
        0
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clean_check_json_matches_qemu() {
        let r = CheckReport {
            image_end_offset: 458752,
            total_clusters: 1024,
            allocated_clusters: 2,
            ..Default::default()
        };
        let expected = r#"{
    "image-end-offset": 458752,
    "total-clusters": 1024,
    "check-errors": 0,
    "allocated-clusters": 2,
    "filename": "t.qcow2",
    "format": "qcow2"
}"#;
        assert_eq!(
            to_qemu_pretty(&report_json(&r, "t.qcow2", "qcow2")),
            expected
        );
    }

    #[test]
    fn clean_check_human_matches_qemu() {
        let r = CheckReport {
            image_end_offset: 458752,
            total_clusters: 1024,
            allocated_clusters: 2,
            ..Default::default()
        };
        assert_eq!(
            report_human(&r),
            "No errors were found on the image.\n2/1024 = 0.20% allocated, 0.00% fragmented, 0.00% compressed clusters\nImage end offset: 458752\n"
        );
    }
}
