//! Asynchronous events: `{"event": ..., "data": ..., "timestamp": ...}`
//! delivered to every monitor that has left capabilities negotiation.

use std::sync::{Arc, Mutex, Weak};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::json::Json;
use crate::output::to_wire;
use crate::server::Outbox;

/// Broadcasts events to the connected, negotiated monitors. Cheap to clone.
#[derive(Clone, Default)]
pub struct EventSender {
    subscribers: Arc<Mutex<Vec<Weak<Outbox>>>>,
}

impl std::fmt::Debug for EventSender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventSender").finish_non_exhaustive()
    }
}

/// Builds an event message with the current time (-1/-1 if the clock is
/// before the epoch, as in QEMU).
pub fn event_message(name: &str, data: Option<&serde_json::Value>) -> Json {
    let (secs, usecs) = match SystemTime::now().duration_since(UNIX_EPOCH) {
        Ok(d) => (d.as_secs() as i64, d.subsec_micros() as i64),
        Err(_) => (-1, -1),
    };
    event_message_at(name, data, secs, usecs)
}

fn event_message_at(name: &str, data: Option<&serde_json::Value>, secs: i64, usecs: i64) -> Json {
    let mut m = vec![("event".to_string(), Json::Str(name.to_string()))];
    if let Some(d) = data {
        m.push(("data".to_string(), Json::from_serde(d)));
    }
    m.push((
        "timestamp".to_string(),
        Json::Object(vec![
            ("seconds".to_string(), Json::Int(secs)),
            ("microseconds".to_string(), Json::Int(usecs)),
        ]),
    ));
    Json::Object(m)
}

impl EventSender {
    /// A sender with no subscribers.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sends event `name` with optional `data` (a JSON object in QEMU's
    /// events) to every negotiated monitor. Each message is queued whole, so
    /// it never lands inside another message.
    pub fn emit(&self, name: &str, data: Option<serde_json::Value>) {
        let bytes = to_wire(&event_message(name, data.as_ref()));
        let mut subs = match self.subscribers.lock() {
            Ok(s) => s,
            Err(p) => p.into_inner(),
        };
        subs.retain(|w| match w.upgrade() {
            Some(out) => {
                if out.negotiated() {
                    out.send(bytes.clone());
                }
                !out.is_closed()
            }
            None => false,
        });
        tracing::debug!(event = name, "QMP event");
    }

    pub(crate) fn subscribe(&self, out: &Arc<Outbox>) {
        let mut subs = match self.subscribers.lock() {
            Ok(s) => s,
            Err(p) => p.into_inner(),
        };
        subs.push(Arc::downgrade(out));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::output::to_json_string;

    #[test]
    fn event_layout_matches_qemu() {
        // as qemu-storage-daemon 10.0.2 prints JOB_STATUS_CHANGE
        let data = serde_json::json!({"id": "j", "status": "created"});
        assert_eq!(
            to_json_string(&event_message_at(
                "JOB_STATUS_CHANGE",
                Some(&data),
                1795753035,
                789263
            )),
            r#"{"timestamp": {"seconds": 1795753035, "microseconds": 789263}, "event": "JOB_STATUS_CHANGE", "data": {"status": "created", "id": "j"}}"#
        );
        assert_eq!(
            to_json_string(&event_message_at("STOP", None, 1, 2)),
            r#"{"timestamp": {"seconds": 1, "microseconds": 2}, "event": "STOP"}"#
        );
    }
}
