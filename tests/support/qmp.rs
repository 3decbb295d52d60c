//! A small QMP client for tests: connects to a unix socket, negotiates capabilities,
//! runs commands and keeps the events it reads on the way for [`Qmp::wait_event`].

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

/// A QMP connection that keeps the events it reads.
pub struct Qmp {
    w: UnixStream,
    r: BufReader<UnixStream>,
    /// Events read but not yet waited for.
    pub events: Vec<serde_json::Value>,
}

impl Qmp {
    /// Connects to `path` and leaves capabilities negotiation mode. A server that
    /// has bound its socket but is not listening yet (the file exists, connecting is
    /// refused) is given up to 10 s.
    pub fn connect(path: &Path) -> Qmp {
        let start = std::time::Instant::now();
        let w = loop {
            match UnixStream::connect(path) {
                Ok(w) => break w,
                Err(e)
                    if e.kind() == std::io::ErrorKind::ConnectionRefused
                        && start.elapsed() < Duration::from_secs(10) =>
                {
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => panic!("qmp connect to {}: {e}", path.display()),
            }
        };
        w.set_read_timeout(Some(Duration::from_secs(120)))
            .expect("timeout");
        let r = BufReader::new(w.try_clone().expect("clone"));
        let mut q = Qmp {
            w,
            r,
            events: Vec::new(),
        };
        q.line();
        q.cmd(serde_json::json!({"execute": "qmp_capabilities"}));
        q
    }

    /// The next message, or `None` at end of stream. A read error, the read timeout
    /// included, panics: it is not an end of stream.
    pub fn try_line(&mut self) -> Option<serde_json::Value> {
        let mut l = String::new();
        match self.r.read_line(&mut l) {
            Ok(0) => None,
            Ok(_) => {
                Some(serde_json::from_str(&l).unwrap_or_else(|e| panic!("bad QMP line {l:?}: {e}")))
            }
            Err(e) => panic!("QMP read failed (no message and no end of stream): {e}"),
        }
    }

    /// Requires the monitor to close the connection within `timeout`; events that
    /// arrive before that are kept, anything else panics.
    pub fn expect_eof(&mut self, timeout: Duration) {
        self.w.set_read_timeout(Some(timeout)).expect("timeout");
        while let Some(v) = self.try_line() {
            assert!(
                v.get("event").is_some(),
                "monitor answered after the end: {v}"
            );
            self.events.push(v);
        }
    }

    /// The next message.
    pub fn line(&mut self) -> serde_json::Value {
        self.try_line().expect("QMP connection closed")
    }

    /// Runs a command and returns its response (`return` or `error`).
    pub fn cmd(&mut self, c: serde_json::Value) -> serde_json::Value {
        let mut s = c.to_string();
        s.push('\n');
        self.w.write_all(s.as_bytes()).expect("qmp write");
        loop {
            let v = self.line();
            if v.get("event").is_some() {
                self.events.push(v);
            } else {
                return v;
            }
        }
    }

    /// Waits for the event `name` (or takes it from those already read).
    pub fn wait_event(&mut self, name: &str) -> serde_json::Value {
        if let Some(i) = self.events.iter().position(|e| e["event"] == name) {
            return self.events.remove(i);
        }
        loop {
            let v = self.line();
            if v["event"] == name {
                return v;
            }
            self.events.push(v);
        }
    }
}
