//! `qmp_commands`: structure-aware QMP sessions over a scratch block graph (see
//! [`crate::qmp_scratch`]).
//!
//! The input is decoded with the `arbitrary` crate into up to [`MAX_COMMANDS`]
//! commands chosen from the registered names: `blockdev-add` with option trees of every
//! driver (nested children, blkdebug error rules), `blockdev-del`, the
//! `block-dirty-bitmap-*` commands and the bitmap hash, `transaction` with arbitrary
//! action lists and completion modes, `drive-backup` / `blockdev-backup` with every
//! argument (to scratch targets), the `block-job-*` and `job-*` verbs, exports, the
//! queries, `block_resize`, guest I/O through `human-monitor-command qemu-io`, short
//! pauses that let jobs run, and any registered command with an arbitrary argument
//! object. Each argument is usually drawn from values that mean something here (the
//! scratch node names, valid enums, sizes) and sometimes an arbitrary JSON value, so
//! that valid and invalid requests mix.
//!
//! Invariants, after every command: the reply is well-formed with `return` or
//! `error {class, desc}` and echoes the request's `id`; no handler panicked;
//! `query-named-block-nodes` succeeds through the monitor; the job list answers
//! its queries. At the end every job is cancelled and the graph closes
//! with nothing left.

use std::time::Duration;

use arbitrary::{Result, Unstructured};
use serde_json::{json, Map, Value};
use strata_qmp::json::Json;

use crate::qmp_scratch::{check_lines, check_response, is_event, Scratch, DISK};

/// Most commands run per input.
pub const MAX_COMMANDS: usize = 24;
/// Deepest nesting of generated option trees and arbitrary values.
const MAX_DEPTH: u32 = 3;

const NODES: &[&str] = &[
    "null0",
    "disk0",
    "tgt0",
    "tgt1",
    "n1",
    "n2",
    "bd",
    "cbw",
    "disk0-file",
    "",
];
const FILES: &[&str] = &[
    "disk.qcow2",
    "tgt.raw",
    "tgt.qcow2",
    "ex.qcow2",
    "ex.raw",
    "new1.qcow2",
    "new2.raw",
    "missing",
];
const BITMAPS: &[&str] = &["b0", "b1", "bm", ""];
const JOBS: &[&str] = &["j0", "j1", "null0", "disk0", ""];
const DRIVERS: &[&str] = &["blkdebug", "file", "null-co", "qcow2", "raw"];
const SYNCS: &[&str] = &["top", "full", "none", "incremental", "bitmap"];
const BITMAP_MODES: &[&str] = &["on-success", "never", "always"];
const ON_ERROR: &[&str] = &["report", "ignore", "enospc", "stop", "auto"];
const EVENTS: &[&str] = &[
    "read_aio",
    "write_aio",
    "flush_to_disk",
    "pwritev",
    "preadv",
    "l2_update",
    "refblock_alloc",
];
const QUERIES: &[&str] = &[
    "query-block-jobs",
    "query-jobs",
    "query-named-block-nodes",
    "query-block",
    "query-block-exports",
    "query-version",
    "query-commands",
];
const JOB_VERBS: &[&str] = &[
    "job-cancel",
    "job-pause",
    "job-resume",
    "job-complete",
    "job-dismiss",
    "job-finalize",
];
const BLOCK_JOB_VERBS: &[&str] = &[
    "block-job-cancel",
    "block-job-pause",
    "block-job-resume",
    "block-job-complete",
    "block-job-dismiss",
    "block-job-finalize",
    "block-job-set-speed",
];
const KEYS: &[&str] = &[
    "driver",
    "node-name",
    "file",
    "filename",
    "backing",
    "image",
    "size",
    "read-only",
    "inject-error",
    "device",
    "target",
    "sync",
    "bitmap",
    "name",
    "node",
    "id",
    "speed",
    "type",
    "data",
    "actions",
];

fn pick<'a>(u: &mut Unstructured, from: &[&'a str]) -> Result<&'a str> {
    Ok(from[u.choose_index(from.len())?])
}

/// A short arbitrary string, often one of `vocab`.
fn string(u: &mut Unstructured, vocab: &[&str]) -> Result<String> {
    if u.ratio(7, 8)? {
        Ok(pick(u, vocab)?.to_string())
    } else {
        let n = u.int_in_range(0..=12)?;
        let mut s = String::new();
        for _ in 0..n {
            s.push(char::from(u.int_in_range(0x20..=0x7e)?));
        }
        Ok(s)
    }
}

/// An arbitrary JSON value (any type), bounded in depth and width.
fn any(u: &mut Unstructured, depth: u32) -> Result<Value> {
    let k = if depth >= MAX_DEPTH {
        u.int_in_range(0..=4)?
    } else {
        u.int_in_range(0..=6)?
    };
    Ok(match k {
        0 => Value::Null,
        1 => Value::Bool(u.arbitrary()?),
        2 => int(u)?,
        3 => Value::String(string(u, KEYS)?),
        4 => Value::String(string(u, NODES)?),
        5 => {
            let n = u.int_in_range(0..=3)?;
            Value::Array((0..n).map(|_| any(u, depth + 1)).collect::<Result<_>>()?)
        }
        _ => {
            let n = u.int_in_range(0..=3)?;
            let mut m = Map::new();
            for _ in 0..n {
                m.insert(string(u, KEYS)?, any(u, depth + 1)?);
            }
            Value::Object(m)
        }
    })
}

/// An integer, often a boundary or a size that means something to the graph.
fn int(u: &mut Unstructured) -> Result<Value> {
    Ok(match u.int_in_range(0..=9)? {
        0 => json!(0),
        1 => json!(-1),
        2 => json!(512),
        3 => json!(65536),
        4 => json!(DISK),
        5 => json!(i64::MAX),
        6 => json!(u64::MAX),
        7 => json!(1.5),
        8 => json!(u.int_in_range(0..=4 * DISK)?),
        _ => json!(u.arbitrary::<i64>()?),
    })
}

/// Sets `key` in `m` most of the time: to `valid` usually, to an arbitrary value
/// sometimes.
fn field(
    u: &mut Unstructured,
    m: &mut Map<String, Value>,
    key: &str,
    valid: impl FnOnce(&mut Unstructured) -> Result<Value>,
) -> Result<()> {
    match u.int_in_range(0..=15)? {
        0..=4 => {}
        5..=14 => {
            let v = valid(u)?;
            m.insert(key.into(), v);
        }
        _ => {
            let v = any(u, 1)?;
            m.insert(key.into(), v);
        }
    }
    Ok(())
}

/// Like [`field`] but present unless the input says otherwise (required members).
fn required(
    u: &mut Unstructured,
    m: &mut Map<String, Value>,
    key: &str,
    valid: impl FnOnce(&mut Unstructured) -> Result<Value>,
) -> Result<()> {
    match u.int_in_range(0..=31)? {
        0 => {}
        1 => {
            let v = any(u, 1)?;
            m.insert(key.into(), v);
        }
        _ => {
            let v = valid(u)?;
            m.insert(key.into(), v);
        }
    }
    Ok(())
}

fn s(vocab: &'static [&'static str]) -> impl FnOnce(&mut Unstructured) -> Result<Value> {
    move |u| Ok(Value::String(string(u, vocab)?))
}

fn b(u: &mut Unstructured) -> Result<Value> {
    Ok(Value::Bool(u.arbitrary()?))
}

/// A child reference: a node name or an inline option tree.
fn child(u: &mut Unstructured, depth: u32) -> Result<Value> {
    if depth >= MAX_DEPTH || u.ratio(1, 2)? {
        Ok(Value::String(string(u, NODES)?))
    } else {
        blockdev_options(u, depth + 1)
    }
}

fn inject_rule(u: &mut Unstructured) -> Result<Value> {
    let mut r = Map::new();
    required(u, &mut r, "event", s(EVENTS))?;
    field(u, &mut r, "errno", |u| {
        Ok(json!(*u.choose(&[5i64, 28, 1, 0, -5])?))
    })?;
    field(u, &mut r, "once", b)?;
    field(u, &mut r, "immediately", b)?;
    field(u, &mut r, "sector", |u| {
        Ok(json!(u.int_in_range(0..=DISK / 256)?))
    })?;
    field(u, &mut r, "state", |u| Ok(json!(u.int_in_range(0..=3)?)))?;
    Ok(Value::Object(r))
}

/// A `blockdev-add` option tree.
fn blockdev_options(u: &mut Unstructured, depth: u32) -> Result<Value> {
    let mut m = Map::new();
    let driver = if u.ratio(15, 16)? {
        pick(u, DRIVERS)?.to_string()
    } else {
        string(u, KEYS)?
    };
    m.insert("driver".into(), Value::String(driver.clone()));
    if depth == 0 {
        required(u, &mut m, "node-name", s(NODES))?;
    } else {
        field(u, &mut m, "node-name", s(NODES))?;
    }
    if u.ratio(1, 4)? {
        field(u, &mut m, "read-only", b)?;
        field(u, &mut m, "auto-read-only", b)?;
        field(u, &mut m, "force-share", b)?;
        field(u, &mut m, "discard", s(&["ignore", "unmap", "off"]))?;
        field(u, &mut m, "detect-zeroes", s(&["off", "on", "unmap"]))?;
        field(u, &mut m, "cache", |u| {
            let mut c = Map::new();
            field(u, &mut c, "direct", b)?;
            field(u, &mut c, "no-flush", b)?;
            Ok(Value::Object(c))
        })?;
    }
    match driver.as_str() {
        "file" => {
            required(u, &mut m, "filename", s(FILES))?;
            field(u, &mut m, "locking", s(&["auto", "on", "off"]))?;
            field(u, &mut m, "aio", s(&["threads", "native", "io_uring"]))?;
        }
        "raw" => {
            required(u, &mut m, "file", |u| child(u, depth))?;
            field(u, &mut m, "offset", int)?;
            field(u, &mut m, "size", int)?;
        }
        "qcow2" => {
            required(u, &mut m, "file", |u| child(u, depth))?;
            field(u, &mut m, "backing", |u| {
                if u.ratio(1, 3)? {
                    Ok(Value::Null)
                } else {
                    child(u, depth)
                }
            })?;
            field(u, &mut m, "l2-cache-size", int)?;
            field(u, &mut m, "refcount-cache-size", int)?;
            field(u, &mut m, "lazy-refcounts", b)?;
        }
        "null-co" => {
            field(u, &mut m, "size", |u| {
                Ok(json!(*u.choose(&[
                    0u64,
                    512,
                    4096,
                    DISK,
                    3 * DISK + 512
                ])?))
            })?;
            field(u, &mut m, "read-zeroes", b)?;
            field(u, &mut m, "latency-ns", |u| {
                Ok(json!(u.int_in_range(0..=10_000)?))
            })?;
        }
        "blkdebug" => {
            required(u, &mut m, "image", |u| child(u, depth))?;
            field(u, &mut m, "align", |u| {
                Ok(json!(*u.choose(&[0i64, 512, 4096, 3])?))
            })?;
            field(u, &mut m, "inject-error", |u| {
                let n = u.int_in_range(0..=3)?;
                Ok(Value::Array(
                    (0..n).map(|_| inject_rule(u)).collect::<Result<_>>()?,
                ))
            })?;
        }
        _ => {}
    }
    if u.ratio(1, 16)? {
        m.insert(string(u, KEYS)?, any(u, depth + 1)?);
    }
    Ok(Value::Object(m))
}

fn bitmap_args(u: &mut Unstructured, action: &str) -> Result<Map<String, Value>> {
    let mut m = Map::new();
    required(u, &mut m, "node", s(NODES))?;
    if action == "merge" {
        required(u, &mut m, "target", s(BITMAPS))?;
        required(u, &mut m, "bitmaps", |u| {
            let n = u.int_in_range(0..=3)?;
            let mut a = Vec::new();
            for _ in 0..n {
                a.push(if u.ratio(1, 2)? {
                    Value::String(string(u, BITMAPS)?)
                } else {
                    json!({"node": string(u, NODES)?, "name": string(u, BITMAPS)?})
                });
            }
            Ok(Value::Array(a))
        })?;
    } else {
        required(u, &mut m, "name", s(BITMAPS))?;
    }
    if action == "add" {
        field(u, &mut m, "granularity", |u| {
            Ok(json!(*u.choose(&[
                512u64,
                4096,
                65536,
                1 << 20,
                1000,
                0,
                1 << 31
            ])?))
        })?;
        field(u, &mut m, "persistent", b)?;
        field(u, &mut m, "disabled", b)?;
    }
    Ok(m)
}

fn backup_args(u: &mut Unstructured, drive: bool) -> Result<Map<String, Value>> {
    let mut m = Map::new();
    required(u, &mut m, "device", s(NODES))?;
    if drive {
        required(u, &mut m, "target", s(FILES))?;
        field(u, &mut m, "format", s(&["qcow2", "raw", "vmdk"]))?;
        field(u, &mut m, "mode", s(&["existing", "absolute-paths"]))?;
    } else {
        required(u, &mut m, "target", s(NODES))?;
    }
    required(u, &mut m, "sync", s(SYNCS))?;
    field(u, &mut m, "job-id", s(JOBS))?;
    // Mostly slow enough that verbs find the job running, never unbounded in time:
    // the images are 1 MiB and the run ends by cancelling.
    field(u, &mut m, "speed", |u| {
        Ok(json!(*u.choose(&[0i64, 1, 65536, 1 << 20, -1])?))
    })?;
    field(u, &mut m, "bitmap", s(BITMAPS))?;
    field(u, &mut m, "bitmap-mode", s(BITMAP_MODES))?;
    if u.ratio(1, 3)? {
        field(u, &mut m, "compress", b)?;
        field(u, &mut m, "on-source-error", s(ON_ERROR))?;
        field(u, &mut m, "on-target-error", s(ON_ERROR))?;
        field(u, &mut m, "auto-finalize", b)?;
        field(u, &mut m, "auto-dismiss", b)?;
        field(u, &mut m, "filter-node-name", s(NODES))?;
        field(u, &mut m, "discard-source", b)?;
        field(
            u,
            &mut m,
            "on-cbw-error",
            s(&["break-guest-write", "break-snapshot"]),
        )?;
        field(u, &mut m, "x-cbw-timeout", |u| {
            Ok(json!(u.int_in_range(0..=2u32)?))
        })?;
        field(u, &mut m, "x-perf", |u| {
            let mut p = Map::new();
            field(u, &mut p, "max-workers", |u| {
                Ok(json!(*u.choose(&[
                    1i64,
                    2,
                    64,
                    0,
                    -1,
                    i64::from(i32::MAX) + 1
                ])?))
            })?;
            field(u, &mut p, "max-chunk", |u| {
                Ok(json!(*u.choose(&[0i64, 65536, 1 << 20, 1000, -1])?))
            })?;
            field(u, &mut p, "min-cluster-size", |u| {
                Ok(json!(*u.choose(&[0u64, 65536, 1 << 20, 1000])?))
            })?;
            field(u, &mut p, "use-copy-range", b)?;
            Ok(Value::Object(p))
        })?;
    }
    Ok(m)
}

const TRANSACTION_KINDS: &[&str] = &[
    "abort",
    "block-dirty-bitmap-add",
    "block-dirty-bitmap-remove",
    "block-dirty-bitmap-clear",
    "block-dirty-bitmap-enable",
    "block-dirty-bitmap-disable",
    "block-dirty-bitmap-merge",
    "blockdev-backup",
    "drive-backup",
    "blockdev-snapshot-sync",
    "blockdev-snapshot-internal-sync",
];

fn transaction_args(u: &mut Unstructured) -> Result<Map<String, Value>> {
    let mut m = Map::new();
    let n = u.int_in_range(0..=4)?;
    let mut actions = Vec::new();
    for _ in 0..n {
        let kind = pick(u, TRANSACTION_KINDS)?;
        let data = match kind {
            "abort" => Map::new(),
            "blockdev-backup" => backup_args(u, false)?,
            "drive-backup" => backup_args(u, true)?,
            k => match k.strip_prefix("block-dirty-bitmap-") {
                Some(a) => bitmap_args(u, a)?,
                None => Map::new(),
            },
        };
        let mut a = Map::new();
        required(u, &mut a, "type", |_| Ok(json!(kind)))?;
        required(u, &mut a, "data", |_| Ok(Value::Object(data)))?;
        if u.ratio(1, 32)? {
            a.insert(string(u, KEYS)?, any(u, 2)?);
        }
        actions.push(Value::Object(a));
    }
    required(u, &mut m, "actions", |_| Ok(Value::Array(actions)))?;
    field(u, &mut m, "properties", |u| {
        let mut p = Map::new();
        field(u, &mut p, "completion-mode", s(&["individual", "grouped"]))?;
        Ok(Value::Object(p))
    })?;
    Ok(m)
}

fn qemu_io(u: &mut Unstructured) -> Result<String> {
    let node = string(u, NODES)?;
    let off = u.int_in_range(0..=(DISK + 65536) / 512)? * 512;
    let len = u.int_in_range(0..=256u64)? * 512;
    let cmd = match u.int_in_range(0..=5)? {
        0 => format!("write -P 0x{:02x} {off} {len}", u.arbitrary::<u8>()?),
        1 => format!("write -z {off} {len}"),
        2 => format!("read {off} {len}"),
        3 => format!("discard {off} {len}"),
        4 => "flush".to_string(),
        _ => format!("aio_write -P 0x{:02x} {off} {len}", u.arbitrary::<u8>()?),
    };
    Ok(format!("qemu-io {node} \"{cmd}\""))
}

/// What one step of the session does.
enum Step {
    /// A command and its arguments (`None`: no `arguments` member).
    Command(String, Option<Value>),
    /// Let jobs run for a moment.
    Pause(Duration),
}

fn step(u: &mut Unstructured, names: &[String]) -> Result<Step> {
    let cmd = |n: &str, m: Map<String, Value>| Step::Command(n.to_string(), Some(Value::Object(m)));
    Ok(match u.int_in_range(0..=16)? {
        0 | 1 => Step::Command("blockdev-add".into(), Some(blockdev_options(u, 0)?)),
        2 => {
            let mut m = Map::new();
            required(u, &mut m, "node-name", s(NODES))?;
            cmd("blockdev-del", m)
        }
        3 => {
            let action = pick(u, &["add", "remove", "clear", "enable", "disable", "merge"])?;
            cmd(
                &format!("block-dirty-bitmap-{action}"),
                bitmap_args(u, action)?,
            )
        }
        4 => cmd(
            "x-debug-block-dirty-bitmap-sha256",
            bitmap_args(u, "remove")?,
        ),
        5 | 6 => cmd("transaction", transaction_args(u)?),
        7 => {
            let drive = u.arbitrary()?;
            let name = if drive {
                "drive-backup"
            } else {
                "blockdev-backup"
            };
            cmd(name, backup_args(u, drive)?)
        }
        8 => {
            let verb = pick(u, JOB_VERBS)?;
            let mut m = Map::new();
            required(u, &mut m, "id", s(JOBS))?;
            cmd(verb, m)
        }
        9 => {
            let verb = pick(u, BLOCK_JOB_VERBS)?;
            let mut m = Map::new();
            let key = if verb.ends_with("dismiss") || verb.ends_with("finalize") {
                "id"
            } else {
                "device"
            };
            required(u, &mut m, key, s(JOBS))?;
            if verb == "block-job-set-speed" {
                required(u, &mut m, "speed", |u| {
                    Ok(json!(*u.choose(&[0i64, 1, 65536, -1])?))
                })?;
            }
            if verb == "block-job-cancel" {
                field(u, &mut m, "force", b)?;
            }
            cmd(verb, m)
        }
        10 => {
            let q = pick(u, QUERIES)?;
            let mut m = Map::new();
            if q == "query-named-block-nodes" {
                field(u, &mut m, "flat", b)?;
            }
            cmd(q, m)
        }
        11 => {
            let mut m = Map::new();
            required(u, &mut m, "command-line", |u| {
                Ok(Value::String(qemu_io(u)?))
            })?;
            cmd("human-monitor-command", m)
        }
        12 => {
            let mut m = Map::new();
            field(u, &mut m, "device", s(NODES))?;
            field(u, &mut m, "node-name", s(NODES))?;
            required(u, &mut m, "size", |u| {
                Ok(json!(*u.choose(&[
                    0i64,
                    512,
                    DISK as i64,
                    2 * DISK as i64,
                    1000,
                    -512
                ])?))
            })?;
            cmd("block_resize", m)
        }
        13 => {
            let mut m = Map::new();
            if u.arbitrary()? {
                required(u, &mut m, "type", s(&["vhost-user-blk", "nbd", "fuse"]))?;
                required(u, &mut m, "id", s(&["e0", "e1", ""]))?;
                required(u, &mut m, "node-name", s(NODES))?;
                field(u, &mut m, "writable", b)?;
                field(u, &mut m, "addr", |u| {
                    Ok(json!({"type": string(u, &["unix", "inet"])?, "path": string(u, FILES)?}))
                })?;
                cmd("block-export-add", m)
            } else {
                required(u, &mut m, "id", s(&["e0", "e1", ""]))?;
                field(u, &mut m, "mode", s(&["safe", "hard"]))?;
                cmd("block-export-del", m)
            }
        }
        14 => Step::Pause(Duration::from_millis(u.int_in_range(0..=5)?)),
        15 => {
            let mut m = Map::new();
            required(u, &mut m, "device", s(NODES))?;
            if u.arbitrary()? {
                required(u, &mut m, "name", s(&["s0", "s1", ""]))?;
                cmd("blockdev-snapshot-internal-sync", m)
            } else {
                field(u, &mut m, "id", s(&["1", "2", "3"]))?;
                field(u, &mut m, "name", s(&["s0", "s1", ""]))?;
                cmd("blockdev-snapshot-delete-internal-sync", m)
            }
        }
        _ => {
            // Any registered command with an arbitrary argument object.
            let name = names[u.choose_index(names.len())?].clone();
            let args = if u.ratio(1, 4)? {
                None
            } else {
                Some(any(u, 0)?)
            };
            Step::Command(name, args)
        }
    })
}

/// Sends one request with `id`; checks the reply; returns it.
fn request(s: &mut Scratch, name: &str, args: Option<Value>, id: i64) -> Json {
    let mut req = json!({"execute": name, "id": id});
    if let Some(a) = args {
        req["arguments"] = a;
    }
    let bytes = serde_json::to_vec(&req).expect("a request serialises");
    let t0 = std::time::Instant::now();
    let out = s.session.feed(&bytes);
    if crate::trace() {
        eprintln!(
            "{:?} {req}\n  -> {}",
            t0.elapsed(),
            String::from_utf8_lossy(&out).trim_end()
        );
    }
    let msgs = check_lines(&out);
    let responses: Vec<&Json> = msgs.iter().filter(|m| !is_event(m)).collect();
    assert_eq!(
        responses.len(),
        1,
        "{name}: expected one response, got {}",
        String::from_utf8_lossy(&out)
    );
    let got = check_response(responses[0]);
    assert_eq!(got, Some(Json::Int(id)), "{name}: id not echoed");
    responses[0].clone()
}

/// The `qmp_commands` target: see the module documentation.
pub fn qmp_commands(data: &[u8]) {
    let mut u = Unstructured::new(data);
    let mut s = Scratch::new();
    let names: Vec<String> = s
        .session
        .registry()
        .command_names()
        // `quit` would end the session early; it is covered by `qmp_session`.
        .filter(|n| *n != "quit")
        .map(str::to_string)
        .collect();
    let oob = u.arbitrary().unwrap_or(false);
    let caps = if oob {
        json!({"enable": ["oob"]})
    } else {
        json!({})
    };
    let r = request(&mut s, "qmp_capabilities", Some(caps), 0);
    assert!(r.get("return").is_some(), "negotiation failed: {r}");
    let mut id = 1;
    for _ in 0..MAX_COMMANDS {
        if u.is_empty() {
            break;
        }
        let Ok(st) = step(&mut u, &names) else { break };
        match st {
            Step::Pause(d) => std::thread::sleep(d),
            Step::Command(name, args) => {
                request(&mut s, &name, args, id);
                id += 1;
                // The graph stays consistent: the monitor lists it (flat and not, in
                // turn; each listing is costly enough to matter at fuzzing speed).
                let flat = json!({"flat": id % 2 == 0});
                let r = request(&mut s, "query-named-block-nodes", Some(flat), id);
                id += 1;
                assert!(
                    r.get("return").is_some(),
                    "query-named-block-nodes failed after {name}: {r}"
                );
                s.check_jobs();
            }
        }
    }
    let t0 = std::time::Instant::now();
    s.finish();
    if crate::trace() {
        eprintln!("finish: {:?}", t0.elapsed());
    }
}
