//! The request engine of one frontend connection: pops chains from the vrings, runs
//! several requests of a queue at once, completes them on the used ring, and holds
//! requests that the error policy stopped until the export is resumed.
//!
//! A queue's vring thread parses every available chain. A lone request with nothing
//! else in flight runs on the vring thread itself (queue depth 1 costs no thread
//! hand-off); otherwise the requests go to a pool of worker threads, so that several
//! run at once while the vring thread keeps taking new chains.
//! Whoever finishes a request puts it on the used ring and signals the frontend.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use strata_virtio_blk::{BlockBackend, Completion, Outcome, Request, VirtioBlk};
use vhost_user_backend::{VringRwLock, VringT};
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};

pub(crate) type Mem = GuestMemoryAtomic<GuestMemoryMmap>;
type Vring = VringRwLock<Mem>;

/// Worker threads per connection, besides the vring threads. Requests beyond this
/// wait in the job queue (their chains are already off the available ring).
pub const POOL_THREADS: usize = 8;

/// How long a queue thread looks for the next request after running one alone.
const POLL_WINDOW: Duration = Duration::from_micros(50);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

struct Job {
    req: Request,
    vring: Vring,
    queue: usize,
}

#[derive(Default)]
struct Jobs {
    queue: VecDeque<Job>,
    /// Jobs taken by a worker and not finished yet.
    running: usize,
    /// Jobs queued or running, per virtqueue.
    per_queue: Vec<usize>,
    closing: bool,
}

#[derive(Default)]
struct Stop {
    stopped: bool,
    /// Requests the error policy stopped, with their queue index, in stop order.
    pending: Vec<(usize, Request)>,
}

/// Shared by the vring threads, the worker pool and the export's control side.
pub(crate) struct Engine<B: BlockBackend> {
    pub(crate) dev: Arc<VirtioBlk<B>>,
    mem: RwLock<Option<Mem>>,
    /// The vring of each queue, known once the queue has been kicked.
    vrings: Mutex<Vec<Option<Vring>>>,
    stop: Mutex<Stop>,
    jobs: Mutex<Jobs>,
    work: Condvar,
    idle: Condvar,
}

impl<B: BlockBackend + 'static> Engine<B> {
    pub(crate) fn new(dev: Arc<VirtioBlk<B>>) -> Arc<Self> {
        let n = usize::from(dev.options().num_queues);
        Arc::new(Engine {
            dev,
            mem: RwLock::new(None),
            vrings: Mutex::new(vec![None; n]),
            stop: Mutex::new(Stop::default()),
            jobs: Mutex::new(Jobs {
                per_queue: vec![0; n],
                ..Jobs::default()
            }),
            work: Condvar::new(),
            idle: Condvar::new(),
        })
    }

    /// Starts the worker pool; the threads end when [`Engine::close`] is called.
    pub(crate) fn start_pool(self: &Arc<Self>, name: &str) -> std::io::Result<Vec<JoinHandle<()>>> {
        let mut threads = Vec::with_capacity(POOL_THREADS);
        for i in 0..POOL_THREADS {
            let e = self.clone();
            let t = std::thread::Builder::new()
                .name(format!("{name}-w{i}"))
                .spawn(move || e.worker());
            match t {
                Ok(t) => threads.push(t),
                Err(err) => {
                    self.close();
                    for t in threads {
                        let _ = t.join();
                    }
                    return Err(err);
                }
            }
        }
        Ok(threads)
    }

    pub(crate) fn set_memory(&self, mem: Mem) {
        *self.mem.write().unwrap_or_else(|e| e.into_inner()) = Some(mem);
    }

    fn memory(&self) -> Option<Mem> {
        self.mem.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Whether the error policy stopped the device and it was not resumed yet.
    pub(crate) fn stopped(&self) -> bool {
        lock(&self.stop).stopped
    }

    /// Number of requests held by a stop.
    pub(crate) fn pending(&self) -> usize {
        lock(&self.stop).pending.len()
    }

    /// A pool thread. A worker that takes a job while others are queued defers the
    /// frontend notification for the one it just finished until it has finished the
    /// next (or found nothing left), so a burst of completions costs one interrupt
    /// per worker rather than one per request.
    fn worker(self: Arc<Self>) {
        let mut owed: Option<(usize, Vring)> = None;
        loop {
            let next = {
                let mut j = lock(&self.jobs);
                loop {
                    if let Some(job) = j.queue.pop_front() {
                        j.running += 1;
                        let more = !j.queue.is_empty();
                        break Some((job, more));
                    }
                    if owed.is_some() {
                        break None;
                    }
                    if j.closing {
                        return;
                    }
                    j = self.work.wait(j).unwrap_or_else(|e| e.into_inner());
                }
            };
            let Some((job, more)) = next else {
                if let Some((_, v)) = owed.take() {
                    notify(&v);
                }
                continue;
            };
            // A notification owed to this job's queue is carried by this job's
            // completion; to another queue it is paid now.
            let carried = match owed.take() {
                Some((q, v)) if q == job.queue => Some(v),
                Some((_, v)) => {
                    notify(&v);
                    None
                }
                None => None,
            };
            let put = self.run(job.queue, &job.vring, &job.req, !more);
            if put && more {
                owed = Some((job.queue, job.vring));
            } else if let (false, Some(v)) = (put, carried) {
                // Nothing went on the ring (a policy stop): pay the debt now.
                notify(&v);
            }
            let mut j = lock(&self.jobs);
            let mut queue_idle = false;
            if let Some(n) = j.per_queue.get_mut(job.queue) {
                *n = n.saturating_sub(1);
                queue_idle = *n == 0;
            }
            j.running -= 1;
            if queue_idle || (j.running == 0 && j.queue.is_empty()) {
                self.idle.notify_all();
            }
        }
    }

    fn submit(&self, queue: usize, vring: &Vring, reqs: impl IntoIterator<Item = Request>) {
        let mut j = lock(&self.jobs);
        let mut n = 0;
        for req in reqs {
            if let Some(c) = j.per_queue.get_mut(queue) {
                *c += 1;
            }
            j.queue.push_back(Job {
                req,
                vring: vring.clone(),
                queue,
            });
            n += 1;
        }
        drop(j);
        for _ in 0..n.min(POOL_THREADS) {
            self.work.notify_one();
        }
    }

    /// Executes one request and puts it on the used ring (notifying the frontend if
    /// `notify`; otherwise the caller owes a [`notify`]), or keeps it if the policy
    /// stopped it. Returns whether it was put on the used ring.
    fn run(&self, queue: usize, vring: &Vring, req: &Request, notify: bool) -> bool {
        let Some(mem) = self.memory() else {
            return false;
        };
        let guard = mem.memory();
        match self.dev.execute(req, &*guard) {
            Outcome::Done(c) => complete(vring, c, notify),
            Outcome::Stopped(p) => {
                let mut s = lock(&self.stop);
                s.stopped = true;
                s.pending.push((queue, p.request));
                tracing::warn!(queue, "request stopped by the error policy");
                false
            }
        }
    }

    /// Takes every available chain of `queue` and runs it (see the module comment).
    /// With EVENT_IDX, notifications are re-enabled and the ring checked again before
    /// returning. Does nothing while the device is stopped.
    pub(crate) fn pump(&self, queue: usize, vring: &Vring) {
        {
            let mut v = lock(&self.vrings);
            if let Some(slot) = v.get_mut(queue) {
                if slot.is_none() {
                    *slot = Some(vring.clone());
                }
            }
        }
        let Some(mem) = self.memory() else {
            return;
        };
        let guard = mem.memory();
        let mem = &*guard;
        loop {
            if self.stopped() {
                return;
            }
            let mut reqs = Vec::new();
            let more = {
                let mut st = vring.get_mut();
                let q = st.get_queue_mut();
                // Chains may be as long as the queue, or as long as `seg_max` allows
                // (through indirect tables) when the queue is smaller than that.
                let size = q.size().max(self.dev.options().queue_size);
                let mut notify = false;
                // A driver cannot have more requests in flight than the queue has
                // entries (each holds a head until it is used); one that keeps the
                // available index moving regardless is not let grow the job queue
                // without bound. Twice the size leaves room for completions whose
                // count has not dropped yet.
                let limit = 2 * usize::from(q.size());
                let busy = self.queued(queue);
                let table = q.size();
                let r = (|| -> Result<bool, virtio_queue::Error> {
                    q.disable_notification(mem)?;
                    // Checked here, as `VirtioBlk::process_queue` does, so that
                    // virtio-queue's iterator (which logs at error level on every
                    // kick) never sees an index the driver pushed too far ahead.
                    let avail = q.avail_idx(mem, Ordering::Acquire)?.0;
                    if avail.wrapping_sub(q.next_avail()) > table {
                        q.enable_notification(mem)?;
                        tracing::warn!(
                            queue,
                            "virtqueue available index is too far ahead; not processing it"
                        );
                        return Ok(false);
                    }
                    let mut popped = 0usize;
                    let mut answered = 0usize;
                    let mut bad_heads = 0usize;
                    while let Some(chain) = q.pop_descriptor_chain(mem) {
                        if busy + reqs.len() >= limit {
                            // Put it back; the ring waits for the next kick.
                            q.set_next_avail(q.next_avail().wrapping_sub(1));
                            q.enable_notification(mem)?;
                            tracing::warn!(
                                queue,
                                "more requests in flight than the virtqueue holds; not taking more"
                            );
                            return Ok(false);
                        }
                        popped += 1;
                        match self.dev.parse_chain(chain, size) {
                            Ok(req) => reqs.push(req),
                            // A head outside the descriptor table cannot be returned.
                            Err(c) => {
                                if c.head < table && q.add_used(mem, c.head, c.len).is_ok() {
                                    answered += 1;
                                } else {
                                    bad_heads += 1;
                                }
                            }
                        }
                    }
                    if bad_heads > 0 {
                        tracing::warn!(
                            queue,
                            bad_heads,
                            "chains with a head outside the descriptor table skipped"
                        );
                    }
                    let more = q.enable_notification(mem)?;
                    notify = answered > 0 && q.needs_notification(mem)?;
                    // The ring claims more available entries than the queue would hand
                    // out (an available index too far ahead, a head outside the table):
                    // without progress, stop rather than spin; the next kick retries.
                    if more && popped == 0 {
                        tracing::warn!(
                            queue,
                            "virtqueue available ring is invalid; not processing it"
                        );
                        return Ok(false);
                    }
                    Ok(more)
                })();
                if notify {
                    signal(&st);
                }
                match r {
                    Ok(more) => more,
                    Err(e) => {
                        // Queue memory itself unusable: report, keep the worker.
                        tracing::warn!(queue, error = %e, "virtqueue unusable");
                        false
                    }
                }
            };
            // A lone request with nothing else running is run right here (no
            // hand-off latency at queue depth 1); otherwise everything goes to the
            // pool and this thread stays free to take the next chains.
            let mut inline = false;
            if reqs.len() == 1 && self.pool_idle() {
                if let Some(req) = reqs.pop() {
                    self.run(queue, vring, &req, true);
                    inline = true;
                }
            } else if !reqs.is_empty() {
                self.submit(queue, vring, reqs);
            }
            // After a lone request, a driver that waits for each answer usually
            // submits the next one within microseconds: look for it briefly instead
            // of sleeping until the kick (QEMU's event loop polls likewise).
            let again = more || (inline && self.poll_avail(vring, mem));
            if !again {
                return;
            }
        }
    }

    /// Spins up to [`POLL_WINDOW`] for the available index to move past what was
    /// taken. The kick that comes with it is consumed later and finds nothing.
    fn poll_avail(&self, vring: &Vring, mem: &GuestMemoryMmap) -> bool {
        let (addr, next) = {
            let st = vring.get_ref();
            let q = st.get_queue();
            (GuestAddress(q.avail_ring().wrapping_add(2)), q.next_avail())
        };
        let start = Instant::now();
        loop {
            match mem.load::<u16>(addr, Ordering::Acquire) {
                Ok(idx) if idx != next => return true,
                Ok(_) => {}
                Err(_) => return false,
            }
            if start.elapsed() >= POLL_WINDOW || self.stopped() {
                return false;
            }
            std::hint::spin_loop();
        }
    }

    /// Resumes after a stop (QMP `cont`): clears the io-status, runs the held
    /// requests again, then serves what the frontend queued meanwhile. Returns the
    /// number of requests retried.
    pub(crate) fn resume(&self) -> usize {
        self.dev.reset_io_status();
        let pending = {
            let mut s = lock(&self.stop);
            s.stopped = false;
            std::mem::take(&mut s.pending)
        };
        let n = pending.len();
        let vrings: Vec<Option<Vring>> = lock(&self.vrings).clone();
        for (queue, req) in pending {
            if let Some(Some(v)) = vrings.get(queue) {
                self.submit(queue, v, [req]);
            }
        }
        for (queue, v) in vrings.iter().enumerate() {
            if let Some(v) = v {
                self.pump(queue, v);
            }
        }
        n
    }

    /// Requests of `queue` queued or running in the pool.
    fn queued(&self, queue: usize) -> usize {
        lock(&self.jobs).per_queue.get(queue).copied().unwrap_or(0)
    }

    fn pool_idle(&self) -> bool {
        let j = lock(&self.jobs);
        j.running == 0 && j.queue.is_empty()
    }

    /// Waits until no request is queued or running in the pool.
    pub(crate) fn drain(&self) {
        let mut j = lock(&self.jobs);
        while j.running > 0 || !j.queue.is_empty() {
            j = self.idle.wait(j).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Stops serving `queue` (vhost-user `GET_VRING_BASE`): waits until every request
    /// taken from it has been answered, so that the ring base the frontend gets back
    /// has nothing in flight behind it, and forgets the vring until the next kick.
    pub(crate) fn stop_queue(&self, queue: usize) {
        let mut j = lock(&self.jobs);
        while j.per_queue.get(queue).is_some_and(|&n| n > 0) {
            j = self.idle.wait(j).unwrap_or_else(|e| e.into_inner());
        }
        drop(j);
        if let Some(slot) = lock(&self.vrings).get_mut(queue) {
            *slot = None;
        }
    }

    /// Lets the pool threads finish the queued jobs and exit.
    pub(crate) fn close(&self) {
        lock(&self.jobs).closing = true;
        self.work.notify_all();
    }
}

fn signal(st: &vhost_user_backend::VringState<Mem>) {
    if let Err(e) = st.signal_used_queue() {
        tracing::warn!(error = %e, "cannot signal the frontend");
    }
}

/// Notifies the frontend of what was put on the used ring, if it wants to know.
fn notify(vring: &Vring) {
    let mut st = vring.get_mut();
    // Without a readable ring (EVENT_IDX state unknown), notify: a spurious
    // interrupt is harmless, a missing one hangs the driver.
    if st.needs_notification().unwrap_or(true) {
        signal(&st);
    }
}

/// Puts a finished request on the used ring and, if `notify`, notifies the frontend
/// if needed. Returns whether the request went on the ring.
fn complete(vring: &Vring, c: Completion, notify: bool) -> bool {
    let mut st = vring.get_mut();
    if let Err(e) = st.add_used(c.head, c.len) {
        tracing::warn!(head = c.head, error = %e, "cannot return a chain");
        return false;
    }
    if notify && st.needs_notification().unwrap_or(true) {
        signal(&st);
    }
    true
}
