//! An in-process QMP monitor: bytes in, bytes out, no socket.
//!
//! A [`Session`] is one monitor connection of a [`QmpServer`](crate::QmpServer)
//! without the connection: it takes the bytes a client would send and returns the
//! bytes the monitor would write back (the greeting, responses, events), using the
//! server's own stream parser, dispatch, capabilities negotiation and output
//! formatting. Commands run on the caller's thread, one at a time in input order, as
//! the server's executor runs them; `exec-oob` commands (once `oob` is enabled) run
//! in the same order, since nothing is queued behind them. Events emitted from other
//! threads (block jobs) are queued and returned by the next [`Session::feed`] or
//! [`Session::take_output`].
//!
//! Embedders use it to drive a registry without sockets (fuzzing, tests, a monitor
//! multiplexed over another transport). An optional request hook sees every parsed
//! request before dispatch and may rewrite or refuse it (a sandbox policy, say).
//!
//! ```
//! use strata_qmp::{Registry, Session};
//! let mut s = Session::new(Registry::default());
//! let greeting = s.take_output();
//! assert!(greeting.starts_with(b"{\"QMP\": "));
//! let out = s.feed(b"{\"execute\": \"qmp_capabilities\", \"id\": 1}\n");
//! assert_eq!(out, b"{\"return\": {}, \"id\": 1}\r\n");
//! ```

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::Arc;

use crate::dispatch::{dispatch, error_response, Context, Registry};
use crate::error::QmpError;
use crate::events::EventSender;
use crate::json::{Json, JsonStreamer, Message};
use crate::output::to_wire;
use crate::server::{OutMsg, Outbox};

/// Inspects, rewrites or refuses a parsed request before it is dispatched. An error
/// is answered like a failed command (with the request's `id`); the command does not
/// run.
pub type RequestHook = Box<dyn FnMut(Json) -> Result<Json, QmpError> + Send>;

/// One in-process QMP monitor over a registry; see the module documentation.
pub struct Session {
    registry: Arc<Registry>,
    events: EventSender,
    out: Arc<Outbox>,
    rx: mpsc::Receiver<OutMsg>,
    streamer: JsonStreamer,
    quit: AtomicBool,
    quitting: bool,
    hook: Option<RequestHook>,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("quitting", &self.quitting)
            .finish_non_exhaustive()
    }
}

impl Session {
    /// A monitor for `registry`, in capabilities negotiation, with the greeting
    /// queued. Connect block-layer events with `state.attach_events(s.events())`.
    pub fn new(registry: Registry) -> Self {
        let (tx, rx) = mpsc::channel();
        let out = Arc::new(Outbox::new(0, tx));
        let events = EventSender::new();
        events.subscribe(&out);
        out.send(to_wire(&registry.greeting()));
        Session {
            registry: Arc::new(registry),
            events,
            out,
            rx,
            streamer: JsonStreamer::new(),
            quit: AtomicBool::new(false),
            quitting: false,
            hook: None,
        }
    }

    /// Installs a hook that sees every parsed request before dispatch.
    pub fn set_request_hook(&mut self, hook: RequestHook) {
        self.hook = Some(hook);
    }

    /// The event broadcaster of this monitor (events reach it once negotiated).
    pub fn events(&self) -> EventSender {
        self.events.clone()
    }

    /// The registry being served.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Whether a client ran `quit`: later input is ignored, as the server stops
    /// executing commands then.
    pub fn quit_requested(&self) -> bool {
        self.quitting
    }

    /// Whether the monitor closed its output (after `quit`, or because queued output
    /// passed the server's limit for a client that does not read).
    pub fn is_closed(&self) -> bool {
        self.quitting || self.out.is_closed()
    }

    /// Feeds bytes from the client, runs every complete request in order, and
    /// returns everything the monitor wrote since the last call.
    pub fn feed(&mut self, bytes: &[u8]) -> Vec<u8> {
        if self.is_closed() {
            // Like a closed socket: nothing more is read.
            return self.take_output();
        }
        let mut msgs = Vec::new();
        self.streamer.feed(bytes, &mut msgs);
        for msg in msgs {
            if self.is_closed() {
                break;
            }
            self.execute(msg);
        }
        self.take_output()
    }

    /// Everything queued for the client (responses and events) since the last call.
    pub fn take_output(&mut self) -> Vec<u8> {
        let mut buf = Vec::new();
        while let Ok(m) = self.rx.try_recv() {
            if let OutMsg::Data(d) = m {
                self.out.delivered(d.len());
                buf.extend_from_slice(&d);
            }
        }
        buf
    }

    fn execute(&mut self, msg: Message) {
        let msg = match (msg, self.hook.as_mut()) {
            (Ok(req), Some(hook)) => {
                let id = req.get("id").cloned();
                match hook(req) {
                    Ok(req) => Ok(req),
                    Err(e) => {
                        self.out.send(to_wire(&error_response(&e, id)));
                        return;
                    }
                }
            }
            (msg, _) => msg,
        };
        let ctx = Context {
            registry: &self.registry,
            events: &self.events,
            monitor: &self.out,
            quit: &self.quit,
        };
        let rsp = dispatch(&ctx, msg);
        self.out.send(to_wire(&rsp));
        if self.quit.swap(false, Ordering::SeqCst) {
            self.quitting = true;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dispatch::Command;

    fn lines(b: &[u8]) -> Vec<String> {
        String::from_utf8(b.to_vec())
            .unwrap()
            .split_terminator("\r\n")
            .map(str::to_string)
            .collect()
    }

    #[test]
    fn negotiation_events_and_quit() {
        let mut reg = Registry::default();
        reg.register(Command::new("ping", |_, ctx| {
            ctx.events().emit("PONG", Some(serde_json::json!({"x": 1})));
            Ok(serde_json::Value::Null)
        }))
        .unwrap();
        let mut s = Session::new(reg);
        let g = lines(&s.take_output());
        assert_eq!(g.len(), 1);
        assert!(g[0].starts_with(r#"{"QMP": {"version": "#), "{g:?}");
        // Before negotiation: refused, and events are not delivered.
        let out = lines(&s.feed(br#"{"execute":"ping","id":1}"#));
        assert_eq!(
            out,
            [
                r#"{"id": 1, "error": {"class": "CommandNotFound", "desc": "Expecting capabilities negotiation with 'qmp_capabilities'"}}"#
            ]
        );
        // Split input: nothing until the value is complete.
        assert!(s.feed(br#"{"execute":"qmp_capa"#).is_empty());
        let out = lines(&s.feed(br#"bilities"} {"execute":"ping","id":"p"} ]"#));
        assert_eq!(out.len(), 4, "{out:?}");
        assert_eq!(out[0], r#"{"return": {}}"#);
        assert!(
            out[1].starts_with(r#"{"timestamp": "#) && out[1].contains(r#""event": "PONG""#),
            "{out:?}"
        );
        assert_eq!(out[2], r#"{"return": {}, "id": "p"}"#);
        assert!(
            out[3].starts_with(r#"{"error": {"class": "GenericError", "desc": "JSON parse error"#)
        );
        let out = lines(&s.feed(br#"{"execute":"quit"}{"execute":"ping"}"#));
        assert_eq!(out, [r#"{"return": {}}"#], "nothing runs after quit");
        assert!(s.quit_requested() && s.is_closed());
        assert!(s.feed(br#"{"execute":"ping"}"#).is_empty());
    }

    #[test]
    fn hook_refuses_with_the_request_id() {
        let mut s = Session::new(Registry::default());
        s.set_request_hook(Box::new(|req| {
            if req.get("execute") == Some(&Json::Str("quit".into())) {
                Err(QmpError::generic("not here"))
            } else {
                Ok(req)
            }
        }));
        s.take_output();
        s.feed(br#"{"execute":"qmp_capabilities"}"#);
        assert_eq!(
            lines(&s.feed(br#"{"execute":"quit","id":7}"#)),
            [r#"{"id": 7, "error": {"class": "GenericError", "desc": "not here"}}"#]
        );
        assert!(!s.quit_requested());
    }
}
