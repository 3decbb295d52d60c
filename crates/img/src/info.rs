//! `strata-img info`: what qemu-img info prints about an image (and, with
//! `--backing-chain`, about every image below it), in human or JSON form.

use std::path::Path;
use std::sync::Arc;

use strata_image::{
    resolve_backing_path, BackingChoice, FormatDriver, FormatSpecific, SnapshotInfo,
};

use crate::error::{CliError, CliResult};
use crate::image::{open, OpenArgs};
use crate::json::{to_qemu_pretty, Json, ObjBuilder};
use crate::util::size_to_str;
use crate::OutputFormat;

/// Options of `info`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Image format (probed when absent).
    #[arg(short = 'f')]
    format: Option<String>,
    /// Output format: human or json.
    #[arg(long = "output", default_value = "human")]
    output: String,
    /// Show every image of the backing chain.
    #[arg(long = "backing-chain")]
    backing_chain: bool,
    /// Open the image even if another process uses it (accepted for compatibility).
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// The image file.
    filename: String,
}

/// What `info` reports for one image of the chain.
#[derive(Debug, Clone)]
pub struct NodeInfo {
    /// Name as the user (or the parent's backing name) spells it.
    pub filename: String,
    /// Format name.
    pub format: String,
    /// Virtual size.
    pub virtual_size: u64,
    /// Bytes used on the host.
    pub actual_size: Option<u64>,
    /// Cluster size.
    pub cluster_size: Option<u64>,
    /// Dirty flag.
    pub dirty_flag: bool,
    /// Backing file name as stored.
    pub backing_filename: Option<String>,
    /// Backing file name resolved against the image's directory.
    pub full_backing_filename: Option<String>,
    /// Backing format as stored.
    pub backing_format: Option<String>,
    /// Internal snapshots.
    pub snapshots: Vec<SnapshotInfo>,
    /// Format-specific facts.
    pub specific: Option<FormatSpecific>,
    /// File length of the protocol node.
    pub file_length: u64,
}

/// Collects `info` for one layer, named `filename`.
pub fn node_info(img: &Arc<dyn FormatDriver>, filename: &str) -> CliResult<NodeInfo> {
    let info = img.info()?;
    let storage = img.storage();
    let full = info.backing_filename.as_ref().map(|b| {
        resolve_backing_path(Path::new(filename), b)
            .display()
            .to_string()
    });
    // QEMU measures files in 512-byte sectors, rounding up.
    let round = |v: u64| v.div_ceil(512) * 512;
    let virtual_size = if info.format == "raw" {
        round(info.virtual_size)
    } else {
        info.virtual_size
    };
    Ok(NodeInfo {
        filename: filename.to_string(),
        format: info.format.clone(),
        virtual_size,
        actual_size: storage.allocated_size().ok(),
        cluster_size: info.cluster_size,
        dirty_flag: info.dirty_flag.unwrap_or(false),
        backing_filename: info.backing_filename.clone(),
        full_backing_filename: full.or(info.full_backing_filename.clone()),
        backing_format: info.backing_format.clone(),
        snapshots: img.snapshots().unwrap_or_default(),
        specific: info.format_specific.clone(),
        file_length: round(storage.size().unwrap_or(0)),
    })
}

fn snapshot_json(s: &SnapshotInfo) -> Json {
    ObjBuilder::new()
        .field("id", s.id.as_str())
        .field("name", s.name.as_str())
        .field("vm-state-size", s.vm_state_size)
        .field("date-sec", u64::from(s.date_sec))
        .field("date-nsec", u64::from(s.date_nsec))
        .field("vm-clock-sec", s.vm_clock_nsec / 1_000_000_000)
        .field("vm-clock-nsec", s.vm_clock_nsec % 1_000_000_000)
        .opt("icount", (s.icount != -1).then_some(s.icount))
        .build()
}

/// The `format-specific` data fields of a qcow2 image, in QAPI order.
pub fn specific_fields(spec: &FormatSpecific) -> (&'static str, Json) {
    match spec {
        FormatSpecific::Qcow2(q) => {
            let v3 = q.compat != "0.10";
            let mut b = ObjBuilder::new().field("compat", q.compat.as_str());
            if let Some(df) = &q.data_file {
                b = b.field("data-file", df.as_str());
            }
            if let Some(raw) = q.data_file_raw {
                b = b.field("data-file-raw", raw);
            }
            if v3 {
                b = b
                    .field("extended-l2", q.extended_l2)
                    .field("lazy-refcounts", q.lazy_refcounts)
                    .field("corrupt", q.corrupt);
            }
            b = b.field("refcount-bits", q.refcount_bits);
            if let Some(bitmaps) = q.bitmaps.as_ref().filter(|v| !v.is_empty()) {
                let list = bitmaps
                    .iter()
                    .map(|bm| {
                        ObjBuilder::new()
                            .field("name", bm.name.as_str())
                            .field("granularity", bm.granularity)
                            .field(
                                "flags",
                                Json::List(
                                    bm.flags.iter().map(|f| Json::from(f.as_str())).collect(),
                                ),
                            )
                            .build()
                    })
                    .collect();
                b = b.field("bitmaps", Json::List(list));
            }
            b = b.field("compression-type", q.compression_type.as_str());
            ("qcow2", b.build())
        }
    }
}

fn file_child_json(n: &NodeInfo) -> Json {
    let file = ObjBuilder::new()
        .field("children", Json::List(vec![]))
        .field("filename", n.filename.as_str())
        .field("format", "file")
        .field("dirty-flag", false)
        .opt("actual-size", n.actual_size)
        .field("virtual-size", n.file_length)
        .field(
            "format-specific",
            ObjBuilder::new()
                .field("type", "file")
                .field("data", ObjBuilder::new().build())
                .build(),
        )
        .build();
    ObjBuilder::new()
        .field("name", "file")
        .field("info", file)
        .build()
}

/// The JSON object qemu-img prints for one image (a `BlockGraphInfo`).
pub fn node_json(n: &NodeInfo) -> Json {
    let mut b = ObjBuilder::new()
        .field("filename", n.filename.as_str())
        .field("format", n.format.as_str())
        .field("dirty-flag", n.dirty_flag)
        .opt("actual-size", n.actual_size)
        .field("virtual-size", n.virtual_size)
        .opt("cluster-size", n.cluster_size)
        .opt("backing-filename", n.backing_filename.as_deref())
        .opt("full-backing-filename", n.full_backing_filename.as_deref())
        .opt("backing-filename-format", n.backing_format.as_deref());
    if !n.snapshots.is_empty() {
        b = b.field(
            "snapshots",
            Json::List(n.snapshots.iter().map(snapshot_json).collect()),
        );
    }
    if let Some(spec) = &n.specific {
        let (ty, data) = specific_fields(spec);
        b = b.field(
            "format-specific",
            ObjBuilder::new()
                .field("type", ty)
                .field("data", data)
                .build(),
        );
    }
    b.field("children", Json::List(vec![file_child_json(n)]))
        .build()
}

/// The snapshot table header and rows as qemu-img prints them.
pub fn snapshot_header() -> String {
    format!(
        "{:<7} {:<16} {:>8} {:>19} {:>15} {:>10}",
        "ID", "TAG", "VM_SIZE", "DATE", "VM_CLOCK", "ICOUNT"
    )
}

/// One row of the snapshot table.
pub fn snapshot_row(s: &SnapshotInfo) -> String {
    let date = format_local_time(i64::from(s.date_sec));
    let secs = s.vm_clock_nsec / 1_000_000_000;
    let clock = format!(
        "{:04}:{:02}:{:02}.{:03}",
        secs / 3600,
        (secs / 60) % 60,
        secs % 60,
        (s.vm_clock_nsec / 1_000_000) % 1000
    );
    let icount = if s.icount == -1 {
        String::new()
    } else {
        s.icount.to_string()
    };
    format!(
        "{:<7} {:<16} {:>8} {:>19} {:>15} {:>10}",
        s.id,
        s.name,
        size_to_str(s.vm_state_size),
        date,
        clock,
        icount
    )
}

fn format_local_time(secs: i64) -> String {
    let t = secs as libc::time_t;
    // SAFETY: `tm` is a plain C struct that localtime_r fills in; both pointers are valid.
    let tm = unsafe {
        let mut tm: libc::tm = std::mem::zeroed();
        if libc::localtime_r(&t, &mut tm).is_null() {
            return String::from("1970-01-01 00:00:00");
        }
        tm
    };
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02}",
        tm.tm_year + 1900,
        tm.tm_mon + 1,
        tm.tm_mday,
        tm.tm_hour,
        tm.tm_min,
        tm.tm_sec
    )
}

fn dump_value(out: &mut String, level: usize, v: &Json) {
    match v {
        Json::Obj(fields) => {
            out.push('\n');
            let keys: Vec<&str> = fields.iter().map(|(k, _)| k.as_str()).collect();
            for i in crate::json::qdict_order(&keys) {
                dump_entry(out, level, &fields[i].0, &fields[i].1);
            }
        }
        Json::List(items) => {
            out.push('\n');
            for (n, item) in items.iter().enumerate() {
                dump_entry(out, level, &format!("[{n}]"), item);
            }
        }
        Json::Bool(b) => out.push_str(&format!(" {b}\n")),
        Json::Int(i) => out.push_str(&format!(" {i}\n")),
        Json::Uint(u) => out.push_str(&format!(" {u}\n")),
        Json::Str(s) => out.push_str(&format!(" {s}\n")),
    }
}

fn dump_entry(out: &mut String, level: usize, key: &str, v: &Json) {
    out.push_str(&" ".repeat(level * 4));
    out.push_str(&key.replace('-', " "));
    out.push(':');
    dump_value(out, level + 1, v);
}

/// The human-readable `info` text for one image (without a trailing blank line).
pub fn node_human(n: &NodeInfo) -> String {
    let mut out = String::new();
    let disk = n
        .actual_size
        .map(size_to_str)
        .unwrap_or_else(|| "unavailable".into());
    out.push_str(&format!(
        "image: {}\nfile format: {}\nvirtual size: {} ({} bytes)\ndisk size: {}\n",
        n.filename,
        n.format,
        size_to_str(n.virtual_size),
        n.virtual_size,
        disk
    ));
    if let Some(cs) = n.cluster_size {
        out.push_str(&format!("cluster_size: {cs}\n"));
    }
    if n.dirty_flag {
        out.push_str("cleanly shut down: no\n");
    }
    if let Some(b) = &n.backing_filename {
        out.push_str(&format!("backing file: {b}"));
        match &n.full_backing_filename {
            None => out.push_str(" (cannot determine actual path)"),
            Some(f) if f != b => out.push_str(&format!(" (actual path: {f})")),
            _ => {}
        }
        out.push('\n');
        if let Some(f) = &n.backing_format {
            out.push_str(&format!("backing file format: {f}\n"));
        }
    }
    if !n.snapshots.is_empty() {
        out.push_str("Snapshot list:\n");
        out.push_str(&snapshot_header());
        out.push('\n');
        for s in &n.snapshots {
            out.push_str(&snapshot_row(s));
            out.push('\n');
        }
    }
    if let Some(spec) = &n.specific {
        let (_, data) = specific_fields(spec);
        out.push_str("Format specific information:");
        dump_value(&mut out, 1, &data);
    }
    out.push_str(&format!(
        "Child node '/file':\n    filename: {}\n    protocol type: file\n    file length: {} ({} bytes)\n    disk size: {}\n",
        n.filename,
        size_to_str(n.file_length),
        n.file_length,
        disk
    ));
    out
}

/// Runs `info`.
pub fn run(args: Args) -> CliResult<i32> {
    let _ = args.force_share;
    let output = OutputFormat::parse(&args.output)?;
    let img = open(
        &args.filename,
        &OpenArgs {
            format: args.format.as_deref(),
            backing: BackingChoice::None,
            ..Default::default()
        },
    )?;
    let mut nodes = vec![node_info(&img, &args.filename)?];
    if args.backing_chain {
        // Like qemu-img, open each backing file on its own, by the name and format
        // its parent stores.
        let mut seen = std::collections::HashSet::new();
        if let Ok(c) = std::fs::canonicalize(&args.filename) {
            seen.insert(c);
        }
        while let Some(parent) = nodes.last() {
            let Some(name) = parent.full_backing_filename.clone() else {
                break;
            };
            if let Ok(c) = std::fs::canonicalize(&name) {
                if !seen.insert(c) {
                    return Err(CliError::msg(format!(
                        "Backing file '{name}' creates an infinite loop."
                    )));
                }
            }
            if nodes.len() > strata_image::MAX_BACKING_DEPTH {
                return Err(CliError::msg(format!(
                    "Backing file '{name}' creates an infinite loop."
                )));
            }
            let fmt = parent.backing_format.clone();
            let b = open(
                &name,
                &OpenArgs {
                    format: fmt.as_deref(),
                    backing: BackingChoice::None,
                    ..Default::default()
                },
            )?;
            nodes.push(node_info(&b, &name)?);
        }
    }
    match output {
        OutputFormat::Human => {
            let text: Vec<String> = nodes.iter().map(node_human).collect();
            print!("{}", text.join("\n"));
        }
        OutputFormat::Json => {
            let v = if args.backing_chain {
                Json::List(nodes.iter().map(node_json).collect())
            } else {
                node_json(&nodes[0])
            };
            println!("{}", to_qemu_pretty(&v));
        }
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> NodeInfo {
        NodeInfo {
            filename: "t.qcow2".into(),
            format: "qcow2".into(),
            virtual_size: 67108864,
            actual_size: Some(397312),
            cluster_size: Some(65536),
            dirty_flag: false,
            backing_filename: Some("b.qcow2".into()),
            full_backing_filename: Some("b.qcow2".into()),
            backing_format: Some("qcow2".into()),
            snapshots: vec![],
            specific: Some(FormatSpecific::Qcow2(strata_image::Qcow2Specific {
                compat: "1.1".into(),
                compression_type: "zlib".into(),
                lazy_refcounts: false,
                refcount_bits: 16,
                corrupt: false,
                extended_l2: false,
                data_file: None,
                data_file_raw: None,
                bitmaps: None,
            })),
            file_length: 458752,
        }
    }

    #[test]
    fn json_matches_qemu_img_info() {
        let expected = r#"{
    "children": [
        {
            "name": "file",
            "info": {
                "children": [
                ],
                "virtual-size": 458752,
                "filename": "t.qcow2",
                "format": "file",
                "actual-size": 397312,
                "format-specific": {
                    "type": "file",
                    "data": {
                    }
                },
                "dirty-flag": false
            }
        }
    ],
    "backing-filename-format": "qcow2",
    "virtual-size": 67108864,
    "filename": "t.qcow2",
    "cluster-size": 65536,
    "format": "qcow2",
    "actual-size": 397312,
    "format-specific": {
        "type": "qcow2",
        "data": {
            "compat": "1.1",
            "compression-type": "zlib",
            "lazy-refcounts": false,
            "refcount-bits": 16,
            "corrupt": false,
            "extended-l2": false
        }
    },
    "full-backing-filename": "b.qcow2",
    "backing-filename": "b.qcow2",
    "dirty-flag": false
}"#;
        assert_eq!(to_qemu_pretty(&node_json(&sample())), expected);
    }

    #[test]
    fn human_matches_qemu_img_info() {
        let expected = "image: t.qcow2
file format: qcow2
virtual size: 64 MiB (67108864 bytes)
disk size: 388 KiB
cluster_size: 65536
backing file: b.qcow2
backing file format: qcow2
Format specific information:
    compat: 1.1
    compression type: zlib
    lazy refcounts: false
    refcount bits: 16
    corrupt: false
    extended l2: false
Child node '/file':
    filename: t.qcow2
    protocol type: file
    file length: 448 KiB (458752 bytes)
    disk size: 388 KiB
";
        assert_eq!(node_human(&sample()), expected);
    }

    #[test]
    fn snapshot_table_widths() {
        assert_eq!(
            snapshot_header(),
            "ID      TAG               VM_SIZE                DATE        VM_CLOCK     ICOUNT"
        );
    }

    #[test]
    fn bitmaps_human_matches_qemu_img_info() {
        let mut n = sample();
        if let Some(FormatSpecific::Qcow2(q)) = n.specific.as_mut() {
            q.bitmaps = Some(vec![
                strata_image::BitmapInfo {
                    name: "bm0".into(),
                    granularity: 65536,
                    flags: vec!["auto".into()],
                },
                strata_image::BitmapInfo {
                    name: "other".into(),
                    granularity: 131072,
                    flags: vec![],
                },
            ]);
        }
        let expected = "Format specific information:
    compat: 1.1
    compression type: zlib
    lazy refcounts: false
    bitmaps:
        [0]:
            flags:
                [0]: auto
            name: bm0
            granularity: 65536
        [1]:
            flags:
            name: other
            granularity: 131072
    refcount bits: 16
    corrupt: false
    extended l2: false
Child node";
        let text = node_human(&n);
        let start = text.find("Format specific").unwrap();
        let end = text.find("Child node").unwrap() + "Child node".len();
        assert_eq!(&text[start..end], expected);
    }
}
