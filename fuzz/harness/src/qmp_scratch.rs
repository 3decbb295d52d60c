//! The scratch monitor the QMP targets drive: the storage daemon's block-layer
//! registry over a fresh block graph, served by an in-process [`Session`], confined to
//! a per-run directory, plus the checks every reply and the graph must pass.
//!
//! The graph starts with `null0` (null-co, 1 MiB, reads zeroes), `disk0` (a 1 MiB
//! qcow2 image with data in its first clusters), `tgt0` (raw, 1 MiB) and `tgt1` (qcow2,
//! 1 MiB) as backup targets; the directory also holds `ex.qcow2` and `ex.raw`, not
//! opened, for `drive-backup` with `mode: existing`.
//!
//! The sandbox (a request hook) keeps runs inside the directory and short:
//! - every `filename` member anywhere in the arguments, and the `target` of
//!   `drive-backup` (also inside `transaction`), must be a plain file name; it is
//!   rewritten to a path inside the run's directory (names with `/`, `.` or `..` are
//!   refused, as is blkdebug's `config` file);
//! - null-co nodes get a 1 MiB size unless they name one, and at most 16 MiB;
//!   latencies at most 1 ms; `block_resize` at most 16 MiB;
//! - `human-monitor-command` runs only `qemu-io` lines (which touch nodes only).
//!
//! Everything else reaches the real command handlers unchanged.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use serde_json::Value;
use strata_block::{BlockNode, BlockdevOptions};
use strata_image::{create_image, CreateOptions, Format};
use strata_jobs::Job;
use strata_qmp::blockdev::exports::{
    self as qmp_exports, ExportDriver, ExportOptions, ExportState, RunningExport,
};
use strata_qmp::blockdev::{self, BlockState};
use strata_qmp::json::{parse, Json};
use strata_qmp::{EventSink, QmpError, Registry, Session};

/// Size of the scratch images.
pub(crate) const DISK: u64 = 1 << 20;
/// Largest null-co node or resize the sandbox lets through.
const MAX_SIZE: u64 = 16 << 20;
/// Longest null-co latency the sandbox lets through, in nanoseconds.
const MAX_LATENCY_NS: u64 = 1_000_000;

/// An export that serves nothing: `block-export-add` / `-del` / `query-block-exports`
/// run their real bookkeeping without opening sockets.
struct InertExports;

struct Inert;

impl RunningExport for Inert {
    fn in_use(&self) -> bool {
        false
    }
    fn stop(&mut self) {}
}

impl ExportDriver for InertExports {
    fn start(
        &self,
        _opts: &ExportOptions,
        _node: Arc<BlockNode>,
        _events: Arc<dyn EventSink>,
    ) -> Result<Box<dyn RunningExport>, String> {
        Ok(Box::new(Inert))
    }
}

/// A per-run directory, removed when dropped.
pub(crate) struct RunDir(PathBuf);

impl RunDir {
    fn new() -> RunDir {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        // tmpfs when there is one: runs create and delete several files each.
        let base = if Path::new("/dev/shm").is_dir() {
            PathBuf::from("/dev/shm")
        } else {
            std::env::temp_dir()
        };
        let dir = base.join(format!(
            "strata-fuzz-qmp-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir(&dir).expect("cannot create the fuzz run directory");
        RunDir(dir)
    }

    pub(crate) fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for RunDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The monitor, its block layer and the run directory.
pub(crate) struct Scratch {
    pub(crate) session: Session,
    pub(crate) state: Arc<BlockState>,
    exports: Arc<ExportState>,
    /// Threads of the process before the scratch graph existed.
    threads_before: usize,
    // Last: the files go after the nodes that use them are closed.
    dir: RunDir,
}

fn image(dir: &Path, name: &str, fmt: Format) -> String {
    let p = dir.join(name);
    create_image(
        &p,
        fmt,
        &CreateOptions {
            size: Some(DISK),
            ..Default::default()
        },
    )
    .expect("cannot create a scratch image");
    p.display().to_string()
}

fn add(state: &BlockState, v: Value) {
    let o = BlockdevOptions::from_json(&v).expect("scratch node options");
    state.graph.blockdev_add(&o).expect("scratch node");
}

impl Scratch {
    /// A fresh monitor (greeting already taken) over a fresh scratch graph.
    pub(crate) fn new() -> Scratch {
        let threads_before = thread_count();
        let dir = RunDir::new();
        let state = BlockState::new();
        let disk = image(dir.path(), "disk.qcow2", Format::Qcow2);
        let tgt0 = image(dir.path(), "tgt.raw", Format::Raw);
        let tgt1 = image(dir.path(), "tgt.qcow2", Format::Qcow2);
        image(dir.path(), "ex.qcow2", Format::Qcow2);
        image(dir.path(), "ex.raw", Format::Raw);
        add(
            &state,
            serde_json::json!({"driver": "null-co", "node-name": "null0", "size": DISK, "read-zeroes": true}),
        );
        add(
            &state,
            serde_json::json!({"driver": "qcow2", "node-name": "disk0", "file": {"driver": "file", "filename": disk}}),
        );
        add(
            &state,
            serde_json::json!({"driver": "raw", "node-name": "tgt0", "file": {"driver": "file", "filename": tgt0}}),
        );
        add(
            &state,
            serde_json::json!({"driver": "qcow2", "node-name": "tgt1", "file": {"driver": "file", "filename": tgt1}}),
        );
        if let Some(n) = state.graph.node("disk0") {
            n.write(&[0x5a; 3 * 65536], 0).expect("scratch data");
            n.write(&[0xa5; 4096], 512 << 10).expect("scratch data");
        }
        let exports = ExportState::new(Arc::new(InertExports));
        let mut reg = Registry::default();
        blockdev::register(&mut reg, &state).expect("block commands register");
        blockdev::register_device_cont(&mut reg, &state).expect("cont registers");
        qmp_exports::register(&mut reg, &state, &exports).expect("export commands register");
        let mut session = Session::new(reg);
        state.attach_events(session.events());
        let root = dir.path().to_path_buf();
        session.set_request_hook(Box::new(move |req| sandbox(&root, req)));
        let greeting = session.take_output();
        let lines = check_lines(&greeting);
        assert!(
            lines.len() == 1 && lines[0].get("QMP").is_some(),
            "the first output is not the greeting: {}",
            String::from_utf8_lossy(&greeting)
        );
        Scratch {
            session,
            state,
            exports,
            threads_before,
            dir,
        }
    }

    /// The graph and the job list answer their queries (flat and not) after every
    /// command: without a panic or a deadlock, whatever state the commands and the
    /// running jobs left behind. (Their shapes are built by the code itself and
    /// compared with QEMU's in `tests/qmp_differential`.)
    pub(crate) fn check_graph(&self) {
        for flat in [false, true] {
            let _ = self.state.graph.query_named_block_nodes(flat);
        }
        self.check_jobs();
    }

    /// The job list answers its queries.
    pub(crate) fn check_jobs(&self) {
        let _ = self.state.jobs.query_block_jobs();
        let _ = self.state.jobs.query_jobs();
    }

    /// Cancels every job, stops the exports, closes the graph; nothing may remain.
    pub(crate) fn finish(self) {
        let Scratch {
            session,
            state,
            exports,
            threads_before,
            dir,
        } = self;
        exports.stop_all(&state);
        // Everything must be freed once the monitor and the block layer are dropped
        // (LeakSanitizer says so under libFuzzer; these say so under `cargo test`).
        let jobs: Vec<Weak<Job>> = state.jobs.jobs().iter().map(Arc::downgrade).collect();
        let nodes: Vec<(String, Weak<BlockNode>)> = state
            .graph
            .nodes()
            .iter()
            .map(|n| (n.name().to_string(), Arc::downgrade(n)))
            .collect();
        // Closing may fail for a legitimate reason (a target that a job left
        // half-written is still closable; an injected flush error is not a bug).
        let _errors = state.shutdown();
        drop(session);
        drop(state);
        // Job threads (and a grouped transaction's watcher) let go of their jobs
        // shortly after the jobs conclude.
        let deadline = Instant::now() + Duration::from_secs(2);
        while jobs.iter().any(|j| j.strong_count() > 0) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        for j in &jobs {
            if let Some(j) = j.upgrade() {
                panic!(
                    "job {} ({:?}) outlives the monitor and its job manager (a reference cycle)",
                    j.id(),
                    j.status()
                );
            }
        }
        for (name, n) in &nodes {
            assert!(
                n.strong_count() == 0,
                "node {name} outlives the closed graph (a reference cycle)"
            );
        }
        drop(dir);
        // A job thread that let go of its job may still be exiting (running its
        // thread-local destructors); LeakSanitizer, which checks right after the run,
        // would count what that thread still holds. Wait for the process to be back
        // to the threads it had before the run.
        let deadline = Instant::now() + Duration::from_secs(2);
        while thread_count() > threads_before && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        if crate::trace() {
            eprintln!("threads before {threads_before}, after {}", thread_count());
        }
    }
}

/// Threads of this process (0 where `/proc` cannot say).
fn thread_count() -> usize {
    std::fs::read_dir("/proc/self/task").map_or(0, Iterator::count)
}

/// Parses monitor output into messages, checking that each is one well-formed JSON
/// object on its own CRLF-terminated line.
pub(crate) fn check_lines(out: &[u8]) -> Vec<Json> {
    assert!(
        out.is_empty() || out.ends_with(b"\r\n"),
        "output does not end a message: {:?}",
        String::from_utf8_lossy(out)
    );
    let text = std::str::from_utf8(out).expect("monitor output is UTF-8");
    assert!(text.is_ascii(), "monitor output is not ASCII: {text:?}");
    text.split_terminator("\r\n")
        .map(|line| {
            assert!(!line.contains('\n'), "a bare LF inside a message: {line:?}");
            let (text, nonfinite) = mark_nonfinite(line);
            match parse(text.as_bytes()) {
                Ok(v @ Json::Object(_)) => {
                    if nonfinite {
                        assert_nonfinite_only_in_id(&v, line);
                    }
                    v
                }
                other => {
                    panic!("monitor wrote something that is not an object: {line:?} -> {other:?}")
                }
            }
        })
        .collect()
}

/// What [`mark_nonfinite`] puts where a non-finite number was: a JSON string made of
/// this prefix (a NUL first, which no text of the monitor's own starts with) and the
/// word.
const NONFINITE: &str = "\0nonfinite ";

/// Replaces every `inf`, `-inf`, `nan` and `-nan` outside strings with a marker
/// string, and says whether there was one.
///
/// The monitor prints floats as QEMU does (`%.17g`), so a request `id` that parsed
/// as an infinite number (`1e400`) is echoed as the bare word `inf`, which is not
/// JSON (QEMU does the same; docs/QMP.md says so). The checks accept that word in an
/// `id` and nowhere else.
pub(crate) fn mark_nonfinite(line: &str) -> (String, bool) {
    let b = line.as_bytes();
    let mut out = String::with_capacity(line.len());
    let mut found = false;
    let (mut i, mut in_str, mut escaped) = (0, false, false);
    while i < b.len() {
        let c = b[i];
        if in_str {
            if escaped {
                escaped = false;
            } else if c == b'\\' {
                escaped = true;
            } else if c == b'"' {
                in_str = false;
            }
        } else if c == b'"' {
            in_str = true;
        } else {
            let word = ["-inf", "-nan", "inf", "nan"]
                .into_iter()
                .find(|w| line[i..].starts_with(w));
            if let Some(w) = word {
                out.push('"');
                out.push_str("\\u0000nonfinite ");
                out.push_str(w);
                out.push('"');
                found = true;
                i += w.len();
                continue;
            }
        }
        out.push(c as char);
        i += 1;
    }
    (out, found)
}

/// Panics unless every marker [`mark_nonfinite`] left is inside the message's `id`.
fn assert_nonfinite_only_in_id(m: &Json, line: &str) {
    fn has_marker(v: &Json) -> bool {
        match v {
            Json::Str(s) => s.starts_with(NONFINITE),
            Json::Array(a) => a.iter().any(has_marker),
            Json::Object(o) => o.iter().any(|(_, v)| has_marker(v)),
            _ => false,
        }
    }
    let Json::Object(members) = m else { return };
    assert!(
        !members.iter().any(|(k, v)| k != "id" && has_marker(v)),
        "the monitor printed a non-finite number outside an id: {line:?}"
    );
}

/// Checks a message that is not an event: `return` xor `error {class, desc}`, and
/// `id` only when given. Returns its id.
pub(crate) fn check_response(m: &Json) -> Option<Json> {
    let Json::Object(members) = m else {
        unreachable!("check_lines returns objects")
    };
    let mut ret = false;
    let mut err = false;
    for (k, v) in members {
        match k.as_str() {
            "return" => ret = true,
            "id" => {}
            "error" => {
                err = true;
                let class = v.get("class");
                let desc = v.get("desc");
                assert!(
                    matches!(v, Json::Object(e) if e.len() == 2),
                    "error is not {{class, desc}}: {m}"
                );
                let Some(Json::Str(class)) = class else {
                    panic!("error without a class string: {m}")
                };
                assert!(
                    [
                        "GenericError",
                        "CommandNotFound",
                        "DeviceNotActive",
                        "DeviceNotFound",
                        "KVMMissingCap"
                    ]
                    .contains(&class.as_str()),
                    "unknown error class: {m}"
                );
                let Some(Json::Str(desc)) = desc else {
                    panic!("error without a desc string: {m}")
                };
                assert!(
                    !desc.starts_with("Internal error in command"),
                    "a command handler panicked: {m}"
                );
            }
            other => panic!("unexpected member {other:?} in a response: {m}"),
        }
    }
    assert!(ret != err, "a response needs return or error: {m}");
    m.get("id").cloned()
}

/// Whether a message is an event; checks its shape if so.
pub(crate) fn is_event(m: &Json) -> bool {
    if m.get("event").is_none() {
        return false;
    }
    assert!(
        matches!(m.get("event"), Some(Json::Str(_))),
        "event name is not a string: {m}"
    );
    let ts = m.get("timestamp");
    assert!(
        matches!(ts.and_then(|t| t.get("seconds")), Some(Json::Int(_)))
            && matches!(ts.and_then(|t| t.get("microseconds")), Some(Json::Int(_))),
        "event without a timestamp: {m}"
    );
    true
}

// ---------------------------------------------------------------------- the sandbox

fn refuse(why: &str) -> QmpError {
    QmpError::generic(format!("fuzz sandbox: {why}"))
}

/// The request hook: see the module documentation.
fn sandbox(root: &Path, req: Json) -> Result<Json, QmpError> {
    let mut v = req.to_serde();
    let name = v
        .get("execute")
        .or_else(|| v.get("exec-oob"))
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    if let Some(args) = v.get_mut("arguments") {
        confine(root, &name, args)?;
    }
    // Floats the serde round trip cannot hold (inf) and member order matter to the
    // dispatcher; only rewrite when something changed.
    let rewritten = Json::from_serde(&v);
    if rewritten.to_serde() == req.to_serde() {
        Ok(req)
    } else {
        Ok(reorder_like(&req, rewritten))
    }
}

/// `new`, with the members of objects present in `old` kept in `old`'s order (the
/// dispatcher checks members in QEMU's order of the input, which serde does not keep).
fn reorder_like(old: &Json, new: Json) -> Json {
    match (old, new) {
        (Json::Object(o), Json::Object(mut n)) => {
            let mut out = Vec::with_capacity(n.len());
            for (k, ov) in o {
                if let Some(i) = n.iter().position(|(nk, _)| nk == k) {
                    let (nk, nv) = n.remove(i);
                    out.push((nk, reorder_like(ov, nv)));
                }
            }
            out.extend(n);
            Json::Object(out)
        }
        (Json::Array(o), Json::Array(n)) => Json::Array(
            n.into_iter()
                .enumerate()
                .map(|(i, nv)| match o.get(i) {
                    Some(ov) => reorder_like(ov, nv),
                    None => nv,
                })
                .collect(),
        ),
        (_, n) => n,
    }
}

fn confine(root: &Path, command: &str, args: &mut Value) -> Result<(), QmpError> {
    match command {
        "drive-backup" => confine_target(root, args)?,
        "transaction" => {
            if let Some(actions) = args.get_mut("actions").and_then(Value::as_array_mut) {
                for a in actions {
                    if a.get("type").and_then(Value::as_str) == Some("drive-backup") {
                        if let Some(d) = a.get_mut("data") {
                            confine_target(root, d)?;
                        }
                    }
                }
            }
        }
        "block_resize" => {
            if let Some(s) = args.get("size").and_then(Value::as_u64) {
                if s > MAX_SIZE {
                    return Err(refuse("resize beyond 16 MiB"));
                }
            }
        }
        "human-monitor-command" => {
            let line = args
                .get("command-line")
                .and_then(Value::as_str)
                .unwrap_or("");
            if !line.trim_start().starts_with("qemu-io ") {
                return Err(refuse("only qemu-io"));
            }
        }
        _ => {}
    }
    confine_tree(root, args)
}

fn confine_target(root: &Path, args: &mut Value) -> Result<(), QmpError> {
    if let Some(t) = args.get_mut("target") {
        if let Some(s) = t.as_str() {
            *t = Value::String(inside(root, s)?);
        }
    }
    Ok(())
}

fn inside(root: &Path, name: &str) -> Result<String, QmpError> {
    if name.is_empty() || name.contains('/') || name == "." || name == ".." || name.contains('\0') {
        return Err(refuse("file names must be plain names"));
    }
    Ok(root.join(name).display().to_string())
}

fn confine_tree(root: &Path, v: &mut Value) -> Result<(), QmpError> {
    match v {
        Value::Object(m) => {
            if let Some(f) = m.get_mut("filename") {
                if let Some(s) = f.as_str() {
                    *f = Value::String(inside(root, s)?);
                }
            }
            if m.contains_key("config") {
                return Err(refuse("no blkdebug config files"));
            }
            if m.get("driver").and_then(Value::as_str) == Some("null-co") {
                match m.get("size") {
                    None => {
                        m.insert("size".into(), Value::from(DISK));
                    }
                    Some(s) if s.as_u64().is_some_and(|s| s > MAX_SIZE) => {
                        return Err(refuse("null-co beyond 16 MiB"));
                    }
                    Some(_) => {}
                }
                if m.get("latency-ns")
                    .and_then(Value::as_u64)
                    .is_some_and(|l| l > MAX_LATENCY_NS)
                {
                    return Err(refuse("null-co latency beyond 1 ms"));
                }
            }
            for x in m.values_mut() {
                confine_tree(root, x)?;
            }
        }
        Value::Array(a) => {
            for x in a {
                confine_tree(root, x)?;
            }
        }
        _ => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nonfinite_words_are_marked_outside_strings_only() {
        let (t, found) = mark_nonfinite(r#"{"return": {}, "id": [inf, -nan, "inf\"nan"]}"#);
        assert!(found);
        assert_eq!(
            t,
            r#"{"return": {}, "id": ["\u0000nonfinite inf", "\u0000nonfinite -nan", "inf\"nan"]}"#
        );
        assert_eq!(
            mark_nonfinite(r#"{"a": "inf"}"#),
            (r#"{"a": "inf"}"#.into(), false)
        );
        assert_eq!(check_lines(b"{\"return\": {}, \"id\": inf}\r\n").len(), 1);
    }

    #[test]
    #[should_panic(expected = "non-finite number outside an id")]
    fn nonfinite_outside_an_id_fails_the_check() {
        check_lines(b"{\"return\": {\"x\": inf}, \"id\": 1}\r\n");
    }
}
