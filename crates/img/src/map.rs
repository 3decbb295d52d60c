//! `strata-img map`: the allocation map of an image through its backing chain,
//! merged into extents exactly as qemu-img map merges them.

use std::io::Write;

use crate::error::{CliError, CliResult};
use crate::image::{chain_status, layers, open, OpenArgs};
use crate::util::{cvtnum, MAX_SIZE};
use crate::OutputFormat;

/// Options of `map`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Image format (probed when absent).
    #[arg(short = 'f')]
    format: Option<String>,
    /// Output format: human or json.
    #[arg(long = "output", default_value = "human")]
    output: String,
    /// First byte to map.
    #[arg(short = 's', long = "start-offset")]
    start_offset: Option<String>,
    /// Bytes to map.
    #[arg(short = 'l', long = "max-length")]
    max_length: Option<String>,
    /// Accepted for compatibility.
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// The image file.
    filename: String,
}

/// One extent of the map.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MapEntry {
    /// First byte.
    pub start: u64,
    /// Length in bytes.
    pub length: u64,
    /// Chain depth of the layer that decides the contents.
    pub depth: usize,
    /// Allocated in some layer.
    pub present: bool,
    /// Reads as zeroes.
    pub zero: bool,
    /// Backed by data.
    pub data: bool,
    /// Compressed.
    pub compressed: bool,
    /// Host offset, when known.
    pub offset: Option<u64>,
    /// The file holding the data, when the offset is known.
    pub filename: Option<String>,
}

impl MapEntry {
    /// Whether `next` extends this entry (qemu-img's merge rule).
    pub fn mergeable(&self, next: &MapEntry) -> bool {
        if self.length == 0 {
            return false;
        }
        if self.zero != next.zero
            || self.data != next.data
            || self.compressed != next.compressed
            || self.depth != next.depth
            || self.present != next.present
            || self.filename != next.filename
            || self.offset.is_some() != next.offset.is_some()
        {
            return false;
        }
        match (self.offset, next.offset) {
            (Some(a), Some(b)) => a + self.length == b,
            _ => true,
        }
    }

    /// The JSON line for this entry (without separator).
    pub fn json(&self) -> String {
        let mut s = format!(
            "{{ \"start\": {}, \"length\": {}, \"depth\": {}, \"present\": {}, \"zero\": {}, \"data\": {}, \"compressed\": {}",
            self.start, self.length, self.depth, self.present, self.zero, self.data, self.compressed
        );
        if let Some(o) = self.offset {
            s.push_str(&format!(", \"offset\": {o}"));
        }
        s.push('}');
        s
    }
}

fn hex(v: u64) -> String {
    if v == 0 {
        "0".into()
    } else {
        format!("{v:#x}")
    }
}

/// Runs `map`.
pub fn run(args: Args) -> CliResult<i32> {
    let _ = args.force_share;
    let output = OutputFormat::parse(&args.output)?;
    let start = match &args.start_offset {
        Some(s) => cvtnum("start offset", s, MAX_SIZE)?,
        None => 0,
    };
    let max_len = match &args.max_length {
        Some(s) => Some(cvtnum("length", s, MAX_SIZE)?),
        None => None,
    };
    let img = open(
        &args.filename,
        &OpenArgs {
            format: args.format.as_deref(),
            ..Default::default()
        },
    )?;
    let chain = layers(&img);
    let names: Vec<String> = {
        let mut v = vec![args.filename.clone()];
        for (i, l) in chain.iter().enumerate().skip(1) {
            let parent = &v[i - 1];
            let name = chain[i - 1]
                .info()
                .ok()
                .and_then(|inf| inf.backing_filename)
                .map(|b| {
                    strata_image::resolve_backing_path(std::path::Path::new(parent), &b)
                        .display()
                        .to_string()
                })
                .unwrap_or_else(|| l.storage().name());
            v.push(name);
        }
        v
    };
    let size = img.size();
    let end = match max_len {
        Some(l) => size.min(start.saturating_add(l)),
        None => size,
    };
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let w = |out: &mut std::io::BufWriter<std::io::StdoutLock<'_>>, s: &str| -> CliResult<()> {
        out.write_all(s.as_bytes())
            .map_err(|e| CliError::msg(format!("Failed to write output: {e}")))
    };
    match output {
        OutputFormat::Human => w(
            &mut out,
            &format!(
                "{:<16}{:<16}{:<16}{}\n",
                "Offset", "Length", "Mapped to", "File"
            ),
        )?,
        OutputFormat::Json => w(&mut out, "[")?,
    }
    let mut curr = MapEntry {
        start,
        length: 0,
        depth: 0,
        present: false,
        zero: false,
        data: false,
        compressed: false,
        offset: None,
        filename: None,
    };
    let mut first_json = true;
    let mut emit = |out: &mut std::io::BufWriter<std::io::StdoutLock<'_>>,
                    e: &MapEntry,
                    next: Option<&mut MapEntry>|
     -> CliResult<()> {
        match output {
            OutputFormat::Human => {
                if e.data && e.offset.is_none() {
                    return Err(CliError::msg(
                        "File contains external, encrypted or compressed clusters.",
                    ));
                }
                if e.data && !e.zero {
                    w(
                        out,
                        &format!(
                            "{:<16}{:<16}{:<16}{}\n",
                            hex(e.start),
                            hex(e.length),
                            hex(e.offset.unwrap_or(0)),
                            e.filename.as_deref().unwrap_or("")
                        ),
                    )?;
                }
                if let Some(n) = next {
                    if !n.data || n.zero {
                        n.data = false;
                        n.zero = true;
                    }
                }
            }
            OutputFormat::Json => {
                if !first_json {
                    w(out, ",\n")?;
                }
                first_json = false;
                w(out, &e.json())?;
            }
        }
        Ok(())
    };
    while curr.start + curr.length < end {
        let offset = curr.start + curr.length;
        let n = (end - offset).min(1 << 30);
        let st = chain_status(&chain, chain.len(), offset, n)?;
        let mut next = MapEntry {
            start: offset,
            length: st.len,
            depth: st.depth,
            present: st.present,
            zero: st.zero,
            data: st.data,
            compressed: st.compressed,
            offset: st.offset,
            filename: st.offset.map(|_| names[st.depth].clone()),
        };
        if curr.mergeable(&next) {
            curr.length += next.length;
            continue;
        }
        if curr.length > 0 {
            emit(&mut out, &curr, Some(&mut next))?;
        }
        curr = next;
    }
    emit(&mut out, &curr, None)?;
    if output == OutputFormat::Json {
        w(&mut out, "]\n")?;
    }
    out.flush()
        .map_err(|e| CliError::msg(format!("Failed to write output: {e}")))?;
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(start: u64, length: u64, offset: Option<u64>) -> MapEntry {
        MapEntry {
            start,
            length,
            depth: 0,
            present: true,
            zero: false,
            data: true,
            compressed: false,
            offset,
            filename: offset.map(|_| "a".into()),
        }
    }

    #[test]
    fn merges_only_contiguous_host_offsets() {
        assert!(e(0, 4096, Some(0)).mergeable(&e(4096, 4096, Some(4096))));
        assert!(!e(0, 4096, Some(0)).mergeable(&e(4096, 4096, Some(8192))));
        assert!(e(0, 4096, None).mergeable(&e(4096, 4096, None)));
        let mut z = e(4096, 4096, None);
        z.zero = true;
        assert!(!e(0, 4096, None).mergeable(&z));
    }

    #[test]
    fn json_line_shape() {
        assert_eq!(
            e(0, 131072, Some(327680)).json(),
            r#"{ "start": 0, "length": 131072, "depth": 0, "present": true, "zero": false, "data": true, "compressed": false, "offset": 327680}"#
        );
        let mut u = e(131072, 917504, None);
        u.depth = 1;
        u.present = false;
        u.zero = true;
        u.data = false;
        assert_eq!(
            u.json(),
            r#"{ "start": 131072, "length": 917504, "depth": 1, "present": false, "zero": true, "data": false, "compressed": false}"#
        );
    }

    #[test]
    fn hex_like_printf_alt_form() {
        assert_eq!(hex(0), "0");
        assert_eq!(hex(0x20000), "0x20000");
    }
}
