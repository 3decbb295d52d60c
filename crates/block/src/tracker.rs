//! In-flight request tracking per node: requests register their byte range, callers
//! can wait for overlapping writes to finish, and a drain waits until a node is idle
//! while holding off new requests.

use std::sync::{Condvar, Mutex, MutexGuard};

#[derive(Debug, Default)]
struct State {
    next_id: u64,
    reqs: Vec<(u64, u64, u64, bool)>,
    quiesce: u32,
}

/// The set of requests in flight on one node.
#[derive(Debug, Default)]
pub struct RequestTracker {
    state: Mutex<State>,
    cv: Condvar,
}

/// A registered request; it leaves the tracker when dropped.
#[derive(Debug)]
pub struct Tracked<'a> {
    tracker: &'a RequestTracker,
    id: u64,
}

impl Drop for Tracked<'_> {
    fn drop(&mut self) {
        let mut s = self.tracker.lock();
        s.reqs.retain(|r| r.0 != self.id);
        drop(s);
        self.tracker.cv.notify_all();
    }
}

impl Tracked<'_> {
    /// This request's id.
    pub fn id(&self) -> u64 {
        self.id
    }
}

/// Holds a node quiescent (no new requests start) until dropped.
#[derive(Debug)]
pub struct Drained<'a> {
    tracker: &'a RequestTracker,
}

impl Drop for Drained<'_> {
    fn drop(&mut self) {
        let mut s = self.tracker.lock();
        s.quiesce -= 1;
        drop(s);
        self.tracker.cv.notify_all();
    }
}

fn overlaps(a: u64, alen: u64, b: u64, blen: u64) -> bool {
    a < b + blen && b < a + alen
}

impl RequestTracker {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers a request, waiting while the node is drained.
    pub fn begin(&self, offset: u64, len: u64, write: bool) -> Tracked<'_> {
        let mut s = self.lock();
        while s.quiesce > 0 {
            s = self.cv.wait(s).unwrap_or_else(|e| e.into_inner());
        }
        s.next_id += 1;
        let id = s.next_id;
        s.reqs.push((id, offset, len, write));
        Tracked { tracker: self, id }
    }

    /// Waits until no write other than `except` overlaps `[offset, offset + len)`.
    pub fn wait_overlapping_writes(&self, offset: u64, len: u64, except: Option<u64>) {
        let mut s = self.lock();
        while s
            .reqs
            .iter()
            .any(|r| r.3 && Some(r.0) != except && overlaps(r.1, r.2, offset, len))
        {
            s = self.cv.wait(s).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Stops new requests and waits for the ones in flight to finish.
    pub fn drain(&self) -> Drained<'_> {
        let mut s = self.lock();
        s.quiesce += 1;
        while !s.reqs.is_empty() {
            s = self.cv.wait(s).unwrap_or_else(|e| e.into_inner());
        }
        Drained { tracker: self }
    }

    /// Requests currently in flight.
    pub fn in_flight(&self) -> usize {
        self.lock().reqs.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    #[test]
    fn drain_waits_for_requests() {
        let t = Arc::new(RequestTracker::default());
        let t2 = t.clone();
        let h = std::thread::spawn(move || {
            let _r = t2.begin(0, 512, true);
            std::thread::sleep(Duration::from_millis(50));
        });
        std::thread::sleep(Duration::from_millis(10));
        let d = t.drain();
        assert_eq!(t.in_flight(), 0);
        drop(d);
        h.join().unwrap();
        let r = t.begin(0, 512, false);
        t.wait_overlapping_writes(0, 512, Some(r.id()));
    }
}
