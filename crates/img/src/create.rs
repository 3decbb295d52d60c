//! `strata-img create`: makes a new raw or qcow2 image from qemu-img's `-o` options,
//! printing the same "Formatting ..." line qemu-img prints.

use std::path::Path;

use strata_image::{
    open_image, resolve_backing_path, CreateOptions, Format, OpenOptions, Preallocation,
};

use crate::error::{CliError, CliResult};
use crate::util::{cvtnum, join_opts, parse_bool, parse_size, wants_help, OptPair, MAX_SIZE};

/// Options of `create`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Image format (default raw).
    #[arg(short = 'f')]
    format: Option<String>,
    /// Format options, `key=value,...` (`-o help` lists them).
    #[arg(short = 'o')]
    options: Vec<String>,
    /// Backing file.
    #[arg(short = 'b')]
    backing: Option<String>,
    /// Backing file format.
    #[arg(short = 'F')]
    backing_fmt: Option<String>,
    /// Do not open the backing file.
    #[arg(short = 'u')]
    unsafe_backing: bool,
    /// Quiet.
    #[arg(short = 'q')]
    quiet: bool,
    /// Image file to create.
    filename: Option<String>,
    /// Virtual size (suffixes k, M, G, T, P, E).
    #[arg(allow_hyphen_values = true)]
    size: Option<String>,
}

/// The options `create -o help` lists, per format: (name, type, description).
pub fn option_help(format: Format) -> Vec<(&'static str, &'static str, &'static str)> {
    match format {
        Format::Raw => vec![("size", "size", "Virtual disk size")],
        Format::Qcow2 => vec![
            ("backing_file", "str", "File name of a base image"),
            ("backing_fmt", "str", "Image format of the base image"),
            ("cluster_size", "size", "qcow2 cluster size"),
            (
                "compat",
                "str",
                "Compatibility level (v2 [0.10] or v3 [1.1])",
            ),
            (
                "compression_type",
                "str",
                "Compression method used for image cluster compression",
            ),
            ("extended_l2", "bool (on/off)", "Extended L2 tables"),
            (
                "lazy_refcounts",
                "bool (on/off)",
                "Postpone refcount updates",
            ),
            (
                "preallocation",
                "str",
                "Preallocation mode (allowed values: off, metadata, falloc, full)",
            ),
            (
                "refcount_bits",
                "num",
                "Width of a reference count entry in bits",
            ),
            ("size", "size", "Virtual disk size"),
        ],
    }
}

/// Prints the `-o help` text for a format.
pub fn print_option_help(format: Format) {
    println!("Supported {} options:", format.name());
    for (name, ty, desc) in option_help(format) {
        println!("  {:<22} - {}", format!("{name}=<{ty}>"), desc);
    }
    println!("\nThe protocol level may support further options.\nSpecify the target filename to include those options.");
}

/// Create options as parsed from `-o`, keeping the strings qemu-img echoes back.
#[derive(Debug, Default, Clone)]
pub struct ParsedOpts {
    /// The library's options.
    pub create: CreateOptions,
    /// compat as given.
    pub compat: Option<String>,
    /// preallocation as given.
    pub prealloc: Option<String>,
    /// Explicit cluster size.
    pub cluster_size: Option<u64>,
    /// Explicit refcount bits.
    pub refcount_bits: Option<u32>,
    /// lazy_refcounts as given.
    pub lazy: Option<bool>,
    /// extended_l2 as given.
    pub extended_l2: Option<bool>,
}

/// Turns `-o` pairs into create options, validating them with qemu's wording.
pub fn parse_create_opts(format: Format, pairs: &[OptPair]) -> CliResult<ParsedOpts> {
    let mut p = ParsedOpts::default();
    let allowed: Vec<&str> = match format {
        Format::Raw => vec!["size", "preallocation"],
        Format::Qcow2 => option_help(Format::Qcow2).iter().map(|o| o.0).collect(),
    };
    for pair in pairs {
        let key = pair.key.as_str();
        if !allowed.contains(&key) {
            if ["data_file", "data_file_raw", "encryption", "encrypt.format"].contains(&key)
                || key.starts_with("encrypt.")
            {
                return Err(CliError::msg(format!(
                    "Option '{key}' is not supported by strata-img"
                )));
            }
            return Err(CliError::msg(format!("Invalid parameter '{key}'")));
        }
        let value = pair.value.clone().unwrap_or_default();
        match key {
            "size" => {
                if p.create.size.is_some() {
                    return Err(CliError::msg("The image size must be specified only once"));
                }
                p.create.size = Some(parse_size(&value).ok_or_else(|| {
                    CliError::msg("Parameter 'size' expects a non-negative number below 2^64")
                })?);
            }
            "cluster_size" => {
                let v = parse_size(&value).ok_or_else(|| {
                    CliError::msg(
                        "Parameter 'cluster_size' expects a non-negative number below 2^64",
                    )
                })?;
                p.cluster_size = Some(v);
            }
            "compat" => {
                let norm = match value.as_str() {
                    "0.10" | "v2" => "0.10",
                    "1.1" | "v3" => "1.1",
                    _ => {
                        return Err(CliError::msg(format!(
                            "Parameter 'version' does not accept value '{value}'"
                        )))
                    }
                };
                p.compat = Some(value.clone());
                p.create.compat = Some(norm.to_string());
            }
            "refcount_bits" => {
                let v: u64 = value.parse().map_err(|_| {
                    CliError::msg(
                        "Parameter 'refcount_bits' expects a non-negative number below 2^64",
                    )
                })?;
                if v == 0 || v > 64 || !v.is_power_of_two() {
                    return Err(CliError::msg(
                        "Refcount width must be a power of two and may not exceed 64 bits",
                    ));
                }
                p.refcount_bits = Some(v as u32);
            }
            "lazy_refcounts" => p.lazy = Some(parse_bool(key, &value)?),
            "extended_l2" => p.extended_l2 = Some(parse_bool(key, &value)?),
            "compression_type" => {
                if value != "zlib" && value != "zstd" {
                    return Err(CliError::msg(format!(
                        "Parameter 'compression-type' does not accept value '{value}'"
                    )));
                }
                p.create.compression_type = Some(value);
            }
            "backing_file" => p.create.backing_file = Some(value),
            "backing_fmt" => p.create.backing_fmt = Some(value),
            "preallocation" => {
                p.create.preallocation = Preallocation::parse(&value).map_err(|_| {
                    CliError::msg(format!(
                        "Parameter 'preallocation' does not accept value '{value}'"
                    ))
                })?;
                p.prealloc = Some(value);
            }
            _ => {}
        }
    }
    p.create.cluster_size = p.cluster_size;
    p.create.refcount_bits = p.refcount_bits;
    p.create.lazy_refcounts = p.lazy.unwrap_or(false);
    p.create.extended_l2 = p.extended_l2.unwrap_or(false);
    Ok(p)
}

/// Checks qcow2 option combinations the way QEMU does, with its messages.
pub fn validate(format: Format, p: &ParsedOpts) -> CliResult<()> {
    if format != Format::Qcow2 {
        return Ok(());
    }
    let v2 = p.create.compat.as_deref() == Some("0.10");
    if let Some(cs) = p.cluster_size {
        if !cs.is_power_of_two() || !(512..=2 << 20).contains(&cs) {
            return Err(CliError::msg(
                "Cluster size must be a power of two between 512 and 2048k",
            ));
        }
    }
    if v2 && p.create.lazy_refcounts {
        return Err(CliError::msg("Lazy refcounts only supported with compatibility level 1.1 and above (use version=v3 or greater)"));
    }
    if v2 && p.refcount_bits.is_some_and(|b| b != 16) {
        return Err(CliError::msg("Different refcount widths than 16 bits require compatibility level 1.1 or above (use version=v3 or greater)"));
    }
    if v2 && p.create.extended_l2 {
        return Err(CliError::msg("Extended L2 entries are only supported with compatibility level 1.1 and above (use version=v3 or greater)"));
    }
    if v2
        && p.create
            .compression_type
            .as_deref()
            .is_some_and(|c| c != "zlib")
    {
        return Err(CliError::msg("Non-zlib compression type is only supported with compatibility level 1.1 and above (use version=v3 or greater)"));
    }
    if p.create.extended_l2 && p.cluster_size.unwrap_or(65536) < 16384 {
        return Err(CliError::msg(
            "Extended L2 entries are only supported with cluster sizes of at least 16384 bytes",
        ));
    }
    if p.create.backing_file.is_some()
        && p.create.preallocation != Preallocation::Off
        && !p.create.extended_l2
    {
        return Err(CliError::msg(
            "Backing file and preallocation can only be used at the same time if extended_l2 is on",
        ));
    }
    Ok(())
}

/// Checks the backing options before anything is printed, as qemu-img does.
pub fn validate_backing(format: Format, p: &ParsedOpts) -> CliResult<()> {
    if p.create.backing_file.is_some() {
        if format != Format::Qcow2 {
            return Err(CliError::msg(format!(
                "Backing file not supported for file format '{}'",
                format.name()
            )));
        }
        if p.create.backing_fmt.is_none() {
            return Err(CliError::msg(
                "Backing file specified without backing format",
            ));
        }
    }
    Ok(())
}

/// The `Formatting '<file>', fmt=...` line qemu-img prints before creating.
pub fn formatting_line(filename: &str, format: Format, p: &ParsedOpts, size: u64) -> String {
    let mut parts: Vec<String> = Vec::new();
    let c = &p.create;
    match format {
        Format::Raw => {
            parts.push(format!("size={size}"));
            if let Some(pa) = &p.prealloc {
                parts.push(format!("preallocation={pa}"));
            }
        }
        Format::Qcow2 => {
            parts.push(format!("cluster_size={}", p.cluster_size.unwrap_or(65536)));
            parts.push(format!(
                "extended_l2={}",
                if c.extended_l2 { "on" } else { "off" }
            ));
            if let Some(pa) = &p.prealloc {
                parts.push(format!("preallocation={pa}"));
            }
            parts.push(format!(
                "compression_type={}",
                c.compression_type.as_deref().unwrap_or("zlib")
            ));
            parts.push(format!("size={size}"));
            if let Some(v) = &p.compat {
                parts.push(format!("compat={v}"));
            }
            if let Some(b) = &c.backing_file {
                parts.push(format!("backing_file={}", b.replace(',', ",,")));
            }
            if let Some(b) = &c.backing_fmt {
                parts.push(format!("backing_fmt={b}"));
            }
            parts.push(format!(
                "lazy_refcounts={}",
                if c.lazy_refcounts { "on" } else { "off" }
            ));
            parts.push(format!("refcount_bits={}", p.refcount_bits.unwrap_or(16)));
        }
    }
    format!(
        "Formatting '{}', fmt={} {}",
        filename,
        format.name(),
        parts.join(" ")
    )
}

/// Runs `create`.
pub fn run(args: Args) -> CliResult<i32> {
    let fmt_name = args.format.as_deref().unwrap_or("raw");
    let pairs = join_opts(&args.options);
    let format = match Format::parse(fmt_name) {
        Ok(f) => f,
        Err(_) => {
            let ctx = args.filename.clone().unwrap_or_default();
            return Err(CliError::msg(format!("Unknown file format '{fmt_name}'")).context(&ctx));
        }
    };
    if wants_help(&pairs) {
        print_option_help(format);
        return Ok(0);
    }
    let filename = args
        .filename
        .clone()
        .ok_or_else(|| CliError::msg("Expecting image file name"))?;
    let mut p = parse_create_opts(format, &pairs).map_err(|e| e.context(&filename))?;
    if let Some(s) = &args.size {
        let v = cvtnum("image size", s, MAX_SIZE)?;
        if p.create.size.is_some() {
            return Err(
                CliError::msg("The image size must be specified only once").context(&filename)
            );
        }
        p.create.size = Some(v);
    }
    if let Some(b) = &args.backing {
        p.create.backing_file = Some(b.clone());
    }
    if let Some(f) = &args.backing_fmt {
        p.create.backing_fmt = Some(f.clone());
    }
    p.create.unsafe_backing = args.unsafe_backing;
    validate_backing(format, &p).map_err(|e| e.context(&filename))?;

    // Size from the backing file when none was given (and the backing may be opened).
    if p.create.size.is_none() {
        match (&p.create.backing_file, args.unsafe_backing) {
            (Some(b), false) => {
                let bpath = resolve_backing_path(Path::new(&filename), b);
                let bfmt = match p.create.backing_fmt.as_deref() {
                    Some(f) => Some(Format::parse(f).map_err(|_| {
                        CliError::msg(format!("Unknown driver '{f}'")).context(&filename)
                    })?),
                    None => None,
                };
                let backing = open_image(
                    &bpath,
                    &OpenOptions {
                        format: bfmt,
                        read_only: true,
                        ..Default::default()
                    },
                )
                .map_err(|e| CliError::msg(format!("{e}")).context(&filename))?;
                p.create.size = Some(backing.size());
            }
            _ => {
                return Err(
                    CliError::msg("Image creation needs a size parameter").context(&filename)
                )
            }
        }
    } else if let (Some(b), false) = (&p.create.backing_file, args.unsafe_backing) {
        // The backing file must exist and open.
        let bpath = resolve_backing_path(Path::new(&filename), b);
        let bfmt = p
            .create
            .backing_fmt
            .as_deref()
            .and_then(|f| Format::parse(f).ok());
        open_image(
            &bpath,
            &OpenOptions {
                format: bfmt,
                read_only: true,
                ..Default::default()
            },
        )
        .map_err(|e| CliError::msg(format!("{e}")).context(&filename))?;
    }
    let size = p.create.size.unwrap_or(0);
    if !args.quiet {
        println!("{}", formatting_line(&filename, format, &p, size));
    }
    validate(format, &p).map_err(|e| e.context(&filename))?;
    crate::image::create_file(&filename, format, &p.create)?;
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::util::parse_opts;

    #[test]
    fn formatting_line_matches_qemu_defaults() {
        let p = parse_create_opts(Format::Qcow2, &[]).unwrap();
        assert_eq!(
            formatting_line("b.qcow2", Format::Qcow2, &p, 67108864),
            "Formatting 'b.qcow2', fmt=qcow2 cluster_size=65536 extended_l2=off compression_type=zlib size=67108864 lazy_refcounts=off refcount_bits=16"
        );
    }

    #[test]
    fn formatting_line_with_all_options() {
        let pairs = parse_opts("compat=0.10,cluster_size=4k,refcount_bits=8,preallocation=metadata,backing_file=b.qcow2,backing_fmt=qcow2");
        let p = parse_create_opts(Format::Qcow2, &pairs).unwrap();
        assert_eq!(
            formatting_line("x.qcow2", Format::Qcow2, &p, 1 << 30),
            "Formatting 'x.qcow2', fmt=qcow2 cluster_size=4096 extended_l2=off preallocation=metadata compression_type=zlib size=1073741824 compat=0.10 backing_file=b.qcow2 backing_fmt=qcow2 lazy_refcounts=off refcount_bits=8"
        );
        assert!(validate(Format::Qcow2, &p).is_err());
    }

    #[test]
    fn raw_line() {
        let p = parse_create_opts(Format::Raw, &parse_opts("preallocation=full")).unwrap();
        assert_eq!(
            formatting_line("x.raw", Format::Raw, &p, 1048576),
            "Formatting 'x.raw', fmt=raw size=1048576 preallocation=full"
        );
    }

    #[test]
    fn rejects_bad_options() {
        let e = parse_create_opts(Format::Qcow2, &parse_opts("foo=bar")).unwrap_err();
        assert_eq!(e.to_string(), "Invalid parameter 'foo'");
        let e = parse_create_opts(Format::Qcow2, &parse_opts("refcount_bits=3")).unwrap_err();
        assert!(e.to_string().starts_with("Refcount width"));
        let p = parse_create_opts(Format::Qcow2, &parse_opts("cluster_size=3k")).unwrap();
        assert!(validate(Format::Qcow2, &p).is_err());
        let p =
            parse_create_opts(Format::Qcow2, &parse_opts("compat=0.10,lazy_refcounts=on")).unwrap();
        assert!(validate(Format::Qcow2, &p).is_err());
    }
}
