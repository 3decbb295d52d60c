//! The `strata-vm` command line, in QEMU's spelling where QEMU has one:
//! `--kernel`, `--initrd`, `--append`, `-m/--memory`, `--smp`,
//! `--drive file=...,format=...,if=virtio|none,id=...,readonly=on|off,cache=...`,
//! `--blockdev` (as `strata-storage-daemon` parses it), `--device virtio-blk-device,
//! drive=NODE,...`, `--qmp unix:PATH,server=on,wait=off`, `--serial stdio|file:PATH|none`,
//! `--no-reboot`, `-S`.

use std::path::PathBuf;

use clap::Parser;
use serde_json::{json, Map, Value};
use strata_block::options::{keyval_to_json, parse_size};
use strata_qmp::ListenAddr;
use strata_virtio_blk::ErrorAction;

/// Command-line arguments.
#[derive(Debug, Parser)]
#[command(
    name = "strata-vm",
    version,
    about = "strata-vm: a small KVM VMM whose disks are Strata block-graph nodes"
)]
pub struct Args {
    /// The kernel: an ELF vmlinux (PVH entry note) or a bzImage.
    #[arg(long = "kernel", value_name = "PATH")]
    pub kernel: PathBuf,
    /// An initial ramdisk.
    #[arg(long = "initrd", value_name = "PATH")]
    pub initrd: Option<PathBuf>,
    /// The kernel command line.
    #[arg(long = "append", value_name = "CMDLINE", default_value = "")]
    pub append: String,
    /// RAM size: `SIZE[K|M|G|T]` (MiB without suffix) or `size=SIZE`.
    #[arg(
        short = 'm',
        long = "memory",
        value_name = "SIZE",
        default_value = "256M"
    )]
    pub memory: String,
    /// Number of vCPUs: `N` or `cpus=N`.
    #[arg(long = "smp", value_name = "N", default_value = "1")]
    pub smp: String,
    /// A disk: `file=PATH[,format=raw|qcow2][,if=virtio|none][,id=ID][,readonly=on|off]
    /// [,cache=writeback|none|writethrough|directsync|unsafe][,discard=ignore|unmap]
    /// [,werror=..][,rerror=..][,serial=S]`.
    #[arg(long = "drive", value_name = "OPTIONS")]
    pub drive: Vec<String>,
    /// A block node: `driver=...,node-name=...,...` or a JSON object.
    #[arg(long = "blockdev", value_name = "OPTIONS")]
    pub blockdev: Vec<String>,
    /// A disk device on a node: `virtio-blk-device,drive=NODE[,id=ID][,num-queues=N]
    /// [,queue-size=N][,serial=S][,write-cache=on|off][,werror=..][,rerror=..]`.
    #[arg(long = "device", value_name = "OPTIONS")]
    pub device: Vec<String>,
    /// The QMP monitor: `unix:PATH,server=on,wait=off` or `tcp:HOST:PORT,server=on,wait=off`.
    #[arg(long = "qmp", value_name = "ADDRESS")]
    pub qmp: Option<String>,
    /// The serial console: `stdio`, `file:PATH` or `none`.
    #[arg(long = "serial", value_name = "BACKEND", default_value = "stdio")]
    pub serial: String,
    /// Exit when the guest resets instead of rebooting it.
    #[arg(long = "no-reboot")]
    pub no_reboot: bool,
    /// Do not start the vCPUs: the VM waits in the `paused` state for QMP `cont`
    /// (QEMU's `-S`), so a monitor can connect before the guest runs.
    #[arg(short = 'S')]
    pub start_paused: bool,
}

/// Where the console goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SerialBackend {
    /// The VMM's stdout (and stdin for input).
    Stdio,
    /// A file (created or truncated).
    File(PathBuf),
    /// Nowhere.
    None,
}

/// A disk device to create on a node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceSpec {
    /// Device id.
    pub id: String,
    /// Node name.
    pub node: String,
    /// Read-only device (also forced by a read-only node).
    pub read_only: bool,
    /// Request queues.
    pub num_queues: u16,
    /// Queue size.
    pub queue_size: u16,
    /// Serial.
    pub serial: String,
    /// Start in writethrough mode.
    pub writethrough: bool,
    /// Write error policy.
    pub werror: ErrorAction,
    /// Read error policy.
    pub rerror: ErrorAction,
}

impl DeviceSpec {
    fn new(id: String, node: String) -> Self {
        DeviceSpec {
            id,
            node,
            read_only: false,
            num_queues: 1,
            queue_size: 256,
            serial: String::new(),
            writethrough: false,
            werror: ErrorAction::Enospc,
            rerror: ErrorAction::Report,
        }
    }
}

fn kv(s: &str) -> Result<Map<String, Value>, String> {
    match keyval_to_json(s).map_err(|e| e.desc)? {
        Value::Object(m) => Ok(m),
        _ => Err("expected key=value options".into()),
    }
}

fn take_str(m: &mut Map<String, Value>, k: &str) -> Result<Option<String>, String> {
    match m.remove(k) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(format!("Parameter '{k}' expects a string")),
    }
}

fn on_off(k: &str, v: &str) -> Result<bool, String> {
    match v {
        "on" | "yes" | "true" => Ok(true),
        "off" | "no" | "false" => Ok(false),
        _ => Err(format!("Parameter '{k}' expects 'on' or 'off'")),
    }
}

fn take_bool(m: &mut Map<String, Value>, k: &str) -> Result<Option<bool>, String> {
    take_str(m, k)?.map(|v| on_off(k, &v)).transpose()
}

fn take_action(m: &mut Map<String, Value>, k: &str) -> Result<Option<ErrorAction>, String> {
    take_str(m, k)?
        .map(|v| {
            ErrorAction::parse(&v).ok_or_else(|| format!("'{v}' is not a valid value for {k}"))
        })
        .transpose()
}

fn finish(m: Map<String, Value>) -> Result<(), String> {
    match m.keys().next() {
        Some(k) => Err(format!("Invalid parameter '{k}'")),
        None => Ok(()),
    }
}

/// Parses `-m`: a size with QEMU's suffixes, MiB without one, or `size=SIZE`.
pub fn parse_memory(s: &str) -> Result<u64, String> {
    let v = s.strip_prefix("size=").unwrap_or(s);
    let bytes = if !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()) {
        v.parse::<u64>().ok().and_then(|m| m.checked_mul(1 << 20))
    } else {
        parse_size(v)
    };
    bytes.ok_or_else(|| format!("invalid memory size '{s}'"))
}

/// Parses `--smp`: `N` or `cpus=N`.
pub fn parse_smp(s: &str) -> Result<u8, String> {
    let v = s.strip_prefix("cpus=").unwrap_or(s);
    v.parse::<u8>()
        .ok()
        .filter(|&n| n > 0)
        .ok_or_else(|| format!("invalid number of CPUs '{s}'"))
}

/// Parses `--serial`.
pub fn parse_serial(s: &str) -> Result<SerialBackend, String> {
    match s {
        "stdio" => Ok(SerialBackend::Stdio),
        "none" | "null" => Ok(SerialBackend::None),
        _ => match s.strip_prefix("file:") {
            Some(p) if !p.is_empty() => Ok(SerialBackend::File(PathBuf::from(p))),
            _ => Err(format!(
                "serial backend '{s}' is not supported (use stdio, file:PATH or none)"
            )),
        },
    }
}

/// Parses `--qmp`.
pub fn parse_qmp(s: &str) -> Result<ListenAddr, String> {
    let (addr, rest) = s.split_once(',').unwrap_or((s, ""));
    for opt in rest.split(',').filter(|o| !o.is_empty()) {
        match opt {
            "server" | "server=on" | "wait=off" | "nowait" => {}
            "wait=on" | "wait" => return Err("--qmp: wait=on is not supported".into()),
            "server=off" => return Err("--qmp: only server sockets are supported".into()),
            _ => return Err(format!("--qmp: invalid option '{opt}'")),
        }
    }
    if let Some(p) = addr.strip_prefix("unix:") {
        if p.is_empty() {
            return Err("--qmp: the unix socket path is empty".into());
        }
        return Ok(ListenAddr::Unix(PathBuf::from(p)));
    }
    if let Some(t) = addr.strip_prefix("tcp:") {
        return Ok(ListenAddr::Tcp(t.to_string()));
    }
    Err(format!(
        "--qmp: '{addr}' is not supported (use unix:PATH or tcp:HOST:PORT)"
    ))
}

/// A parsed `--drive`: the node to open and, with `if=virtio`, the device on it.
#[derive(Debug, Clone, PartialEq)]
pub struct DriveSpec {
    /// `blockdev-add` options of the format node (named after the drive id).
    pub node: Value,
    /// The device, unless `if=none`.
    pub device: Option<DeviceSpec>,
}

fn probe_format(path: &str) -> String {
    use std::io::Read;
    let mut magic = [0u8; 4];
    let is_qcow2 = std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut magic))
        .is_ok()
        && magic == *b"QFI\xfb";
    if is_qcow2 {
        "qcow2".into()
    } else {
        eprintln!(
            "strata-vm: warning: image format was not specified for '{path}' and probing guessed raw; \
             specify 'format=raw' to remove this warning"
        );
        "raw".into()
    }
}

/// Parses one `--drive`; `index` names drives without an id. Without `format=` the
/// image file is probed.
pub fn parse_drive(s: &str, index: usize) -> Result<DriveSpec, String> {
    parse_drive_with(s, index, probe_format)
}

/// [`parse_drive`] with `probe` naming the format of a file given without `format=`.
pub fn parse_drive_with(
    s: &str,
    index: usize,
    probe: impl FnOnce(&str) -> String,
) -> Result<DriveSpec, String> {
    let mut m = kv(s)?;
    let file = take_str(&mut m, "file")?.ok_or("Parameter 'file' is missing")?;
    let format = match take_str(&mut m, "format")? {
        Some(f) => f,
        None => probe(&file),
    };
    let id = take_str(&mut m, "id")?.unwrap_or_else(|| format!("virtio{index}"));
    let iface = take_str(&mut m, "if")?.unwrap_or_else(|| "virtio".into());
    let read_only = take_bool(&mut m, "readonly")?.unwrap_or(false);
    let (direct, no_flush, writethrough) = match take_str(&mut m, "cache")?.as_deref() {
        None | Some("writeback") => (false, false, false),
        Some("none") => (true, false, false),
        Some("writethrough") => (false, false, true),
        Some("directsync") => (true, false, true),
        Some("unsafe") => (false, true, false),
        Some(o) => return Err(format!("invalid cache option '{o}'")),
    };
    let discard = take_str(&mut m, "discard")?.unwrap_or_else(|| "ignore".into());
    let werror = take_action(&mut m, "werror")?;
    let rerror = take_action(&mut m, "rerror")?;
    let serial = take_str(&mut m, "serial")?;
    finish(m)?;
    let cache = json!({"direct": direct, "no-flush": no_flush});
    let node = json!({
        "driver": format,
        "node-name": id,
        "read-only": read_only,
        "discard": discard,
        "cache": cache,
        "file": {"driver": "file", "filename": file, "read-only": read_only, "cache": cache},
    });
    let device = match iface.as_str() {
        "virtio" => {
            let mut d = DeviceSpec::new(id.clone(), id);
            d.read_only = read_only;
            d.writethrough = writethrough;
            d.werror = werror.unwrap_or(d.werror);
            d.rerror = rerror.unwrap_or(d.rerror);
            d.serial = serial.unwrap_or_default();
            Some(d)
        }
        "none" => None,
        o => {
            return Err(format!(
                "interface '{o}' is not supported (use if=virtio or if=none)"
            ))
        }
    };
    Ok(DriveSpec { node, device })
}

/// Parses one `--device`.
pub fn parse_device(s: &str, index: usize) -> Result<DeviceSpec, String> {
    let (driver, rest) = s.split_once(',').unwrap_or((s, ""));
    if !matches!(driver, "virtio-blk-device" | "virtio-blk") {
        return Err(format!(
            "device '{driver}' is not supported (use virtio-blk-device)"
        ));
    }
    let mut m = kv(rest)?;
    let node = take_str(&mut m, "drive")?.ok_or("Parameter 'drive' is missing")?;
    let id = take_str(&mut m, "id")?.unwrap_or_else(|| format!("virtio-disk{index}"));
    let mut d = DeviceSpec::new(id, node);
    let num = |k: &str, v: String| -> Result<u16, String> {
        v.parse::<u16>()
            .map_err(|_| format!("Parameter '{k}' expects a number"))
    };
    if let Some(v) = take_str(&mut m, "num-queues")? {
        d.num_queues = num("num-queues", v)?;
    }
    if let Some(v) = take_str(&mut m, "queue-size")? {
        d.queue_size = num("queue-size", v)?;
    }
    if let Some(v) = take_str(&mut m, "serial")? {
        d.serial = v;
    }
    if let Some(wc) = take_bool(&mut m, "write-cache")? {
        d.writethrough = !wc;
    }
    d.werror = take_action(&mut m, "werror")?.unwrap_or(d.werror);
    d.rerror = take_action(&mut m, "rerror")?.unwrap_or(d.rerror);
    finish(m)?;
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_counts_and_backends() {
        assert_eq!(parse_memory("256").unwrap(), 256 << 20);
        assert_eq!(parse_memory("1G").unwrap(), 1 << 30);
        assert_eq!(parse_memory("size=512M").unwrap(), 512 << 20);
        assert!(parse_memory("lots").is_err());
        assert_eq!(parse_smp("cpus=2").unwrap(), 2);
        assert!(parse_smp("0").is_err());
        assert_eq!(
            parse_serial("file:/x").unwrap(),
            SerialBackend::File("/x".into())
        );
        assert!(parse_serial("pty").is_err());
        assert_eq!(
            parse_qmp("unix:/tmp/q.sock,server=on,wait=off").unwrap(),
            ListenAddr::Unix("/tmp/q.sock".into())
        );
        assert!(parse_qmp("unix:/tmp/q.sock,server=on,wait=on").is_err());
        assert!(parse_qmp("stdio").is_err());
    }

    #[test]
    fn drive_becomes_a_node_and_a_device() {
        let d = parse_drive("file=a.qcow2,format=qcow2,id=d0,readonly=on,cache=none", 0).unwrap();
        assert_eq!(d.node["driver"], "qcow2");
        assert_eq!(d.node["node-name"], "d0");
        assert_eq!(d.node["read-only"], true);
        assert_eq!(d.node["file"]["filename"], "a.qcow2");
        assert_eq!(d.node["cache"]["direct"], true);
        let dev = d.device.unwrap();
        assert_eq!(
            (dev.id.as_str(), dev.node.as_str(), dev.read_only),
            ("d0", "d0", true)
        );
        let n = parse_drive("file=x,format=raw,if=none", 3).unwrap();
        assert!(n.device.is_none());
        assert_eq!(n.node["node-name"], "virtio3");
        assert!(parse_drive("format=raw", 0).is_err());
        assert!(parse_drive("file=x,format=raw,bogus=1", 0).is_err());
        assert!(parse_drive("file=x,format=raw,if=scsi", 0).is_err());
        assert!(parse_drive("file=x,format=raw,cache=fast", 0).is_err());
        let wt = parse_drive("file=x,format=raw,cache=writethrough", 0).unwrap();
        assert!(wt.device.unwrap().writethrough);
    }

    #[test]
    fn device_options() {
        let d = parse_device("virtio-blk-device,drive=n0,num-queues=2,id=disk", 0).unwrap();
        assert_eq!(
            (d.node.as_str(), d.num_queues, d.id.as_str()),
            ("n0", 2, "disk")
        );
        assert!(parse_device("virtio-blk-pci,drive=n0", 0).is_err());
        assert!(parse_device("virtio-blk-device", 0).is_err());
        assert!(parse_device("virtio-blk-device,drive=n,num-queues=x", 0).is_err());
    }
}
