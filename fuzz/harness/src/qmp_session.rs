//! `qmp_session`: arbitrary bytes into an in-process monitor over a scratch block
//! graph (see [`crate::qmp_scratch`]).
//!
//! The input is what a client writes to the monitor socket. It is fed to a
//! [`strata_qmp::Session`] in chunks whose sizes come from the input's first byte
//! (whole, or pieces of 1..=255 bytes), so that values split across reads are
//! reached too. Invariants:
//!
//! - no panic (a panicking command handler shows as "Internal error in command");
//! - the first output is the greeting; every line after it is one JSON object
//!   ending in CRLF: an event with a name and timestamp, or a response with exactly
//!   one of `return` and `error {class, desc}`;
//! - responses come one per input message, in order, each echoing its request's `id`
//!   (a message that does not parse has none), until a `quit`;
//! - the graph answers its queries after the session, and cancelling every job and
//!   closing the graph leaves nothing behind.

use strata_qmp::json::{parse, Json, JsonStreamer, Message};
use strata_qmp::output::to_json_string;

use crate::qmp_scratch::{check_lines, check_response, is_event, mark_nonfinite, Scratch};

/// The `qmp_session` target: see the module documentation.
pub fn qmp_session(data: &[u8]) {
    let (chunk, body) = match data.split_first() {
        Some((&c, rest)) => (c as usize, rest),
        None => (0, data),
    };
    // What the monitor will see, parsed independently, for the id check.
    let mut requests: Vec<Message> = Vec::new();
    JsonStreamer::new().feed(body, &mut requests);

    let mut s = Scratch::new();
    let mut out = Vec::new();
    if chunk == 0 {
        out.extend(s.session.feed(body));
    } else {
        for piece in body.chunks(chunk) {
            out.extend(s.session.feed(piece));
        }
    }
    s.check_graph();
    let quit = s.session.quit_requested();
    out.extend(s.session.take_output());
    let responses: Vec<Json> = check_lines(&out)
        .into_iter()
        .filter(|m| !is_event(m))
        .collect();
    assert!(
        responses.len() <= requests.len(),
        "{} responses to {} messages",
        responses.len(),
        requests.len()
    );
    if !quit {
        assert_eq!(responses.len(), requests.len(), "a message went unanswered");
    }
    for (i, (rsp, req)) in responses.iter().zip(&requests).enumerate() {
        let id = check_response(rsp);
        // As the monitor prints it: a float id with an integral value (2500.0)
        // prints as an integer, and an infinite one as `inf`, as in QEMU.
        let want = req
            .as_ref()
            .ok()
            .and_then(|r| r.get("id"))
            .and_then(|id| parse(mark_nonfinite(&to_json_string(id)).0.as_bytes()).ok());
        assert!(
            id == want,
            "response {i} has id {id:?}, its request {want:?}: {rsp}"
        );
    }
    s.finish();
}
