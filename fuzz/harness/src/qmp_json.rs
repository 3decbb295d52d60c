//! `qmp_json`: the QMP monitor's input stream parser.
//!
//! The input is the byte stream a client sends. It is fed to
//! `strata_qmp::json::JsonStreamer` three ways: all at once, in chunks of a few bytes,
//! and byte by byte. Invariants:
//!
//! - no panic, and memory bounded by the parser's own limits;
//! - the messages (values and error texts) do not depend on how the stream was split;
//! - every parsed value without floating-point numbers prints (as the monitor would
//!   answer with it) to text that parses back to the same value (up to the order of
//!   object members, which the printer chooses as QEMU's dictionaries do).

use strata_qmp::json::{self, Json, JsonStreamer, Message};

fn feed_in_chunks(data: &[u8], chunk: usize) -> Vec<Message> {
    let mut s = JsonStreamer::new();
    let mut out = Vec::new();
    for c in data.chunks(chunk) {
        s.feed(c, &mut out);
    }
    out
}

fn has_float(v: &Json) -> bool {
    match v {
        Json::Float(_) => true,
        Json::Array(a) => a.iter().any(has_float),
        Json::Object(o) => o.iter().any(|(_, v)| has_float(v)),
        _ => false,
    }
}

/// `v` with object members sorted by key, recursively.
fn sorted(v: &Json) -> Json {
    match v {
        Json::Array(a) => Json::Array(a.iter().map(sorted).collect()),
        Json::Object(o) => {
            let mut m: Vec<(String, Json)> =
                o.iter().map(|(k, v)| (k.clone(), sorted(v))).collect();
            m.sort_by(|a, b| a.0.cmp(&b.0));
            Json::Object(m)
        }
        other => other.clone(),
    }
}

/// The `qmp_json` target: see the module documentation.
pub fn qmp_json(data: &[u8]) {
    let whole = feed_in_chunks(data, data.len().max(1));
    let chunked = feed_in_chunks(data, 1 + data.len() % 7);
    assert_eq!(whole, chunked, "messages depend on how the stream is split");
    let bytewise = feed_in_chunks(data, 1);
    assert_eq!(
        whole, bytewise,
        "messages depend on how the stream is split"
    );
    for v in whole.iter().flatten() {
        if has_float(v) {
            continue;
        }
        let text = v.to_string();
        match json::parse(text.as_bytes()) {
            Ok(back) => assert_eq!(
                sorted(&back),
                sorted(v),
                "printed value {text} parses differently"
            ),
            Err(e) => panic!("printed value {text} does not parse: {e}"),
        }
    }
}
