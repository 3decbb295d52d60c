//! QMP monitors over unix and TCP sockets.
//!
//! Every accepted connection is a monitor with a reader thread (parsing,
//! out-of-band commands) and a writer thread (one queue, so messages never
//! interleave). In-band commands from all monitors run one at a time on a
//! single executor thread, as in QEMU's main loop. Without `oob` a monitor
//! has at most one command queued (QEMU suspends reading); with `oob` up to
//! eight, and `exec-oob` commands run at once on the reader thread.
//!
//! Difference from QEMU: a listening socket serves any number of clients at
//! once (a QEMU socket chardev serves one at a time).

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use crate::dispatch::{dispatch, is_oob, Context, Registry};
use crate::events::EventSender;
use crate::json::{JsonStreamer, Message};
use crate::output::to_wire;

/// Queue depth per monitor with `oob` enabled (QEMU's QMP_REQ_QUEUE_LEN_MAX).
const QUEUE_LEN_MAX: usize = 8;
/// Output a slow client may leave unread before it is disconnected.
const MAX_PENDING_OUTPUT: usize = 64 << 20;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// One item of a monitor's output queue.
pub(crate) enum OutMsg {
    /// A complete message.
    Data(Vec<u8>),
    /// End of output: close the connection.
    Close,
}

/// Per-monitor output queue and capability state.
pub struct Outbox {
    id: u64,
    tx: Mutex<Option<mpsc::Sender<OutMsg>>>,
    pending: AtomicUsize,
    negotiated: AtomicBool,
    oob: AtomicBool,
    closed: AtomicBool,
    reader_done: AtomicBool,
}

impl Outbox {
    pub(crate) fn new(id: u64, tx: mpsc::Sender<OutMsg>) -> Self {
        Outbox {
            id,
            tx: Mutex::new(Some(tx)),
            pending: AtomicUsize::new(0),
            negotiated: AtomicBool::new(false),
            oob: AtomicBool::new(false),
            closed: AtomicBool::new(false),
            reader_done: AtomicBool::new(false),
        }
    }

    /// An outbox connected to nothing (for tests of dispatch).
    #[cfg(test)]
    pub(crate) fn detached() -> Self {
        Outbox {
            id: 0,
            tx: Mutex::new(None),
            pending: AtomicUsize::new(0),
            negotiated: AtomicBool::new(false),
            oob: AtomicBool::new(false),
            closed: AtomicBool::new(false),
            reader_done: AtomicBool::new(false),
        }
    }

    pub(crate) fn id(&self) -> u64 {
        self.id
    }

    pub(crate) fn negotiated(&self) -> bool {
        self.negotiated.load(Ordering::SeqCst)
    }

    pub(crate) fn oob_enabled(&self) -> bool {
        self.oob.load(Ordering::SeqCst)
    }

    pub(crate) fn set_capabilities(&self, oob: bool) {
        self.oob.store(oob, Ordering::SeqCst);
        self.negotiated.store(true, Ordering::SeqCst);
    }

    /// Accounts for `len` bytes of queued output having been handed to the client.
    pub(crate) fn delivered(&self, len: usize) {
        self.pending.fetch_sub(len, Ordering::SeqCst);
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }

    /// Queues one complete message.
    pub(crate) fn send(&self, bytes: Vec<u8>) {
        if self.is_closed() {
            return;
        }
        let len = bytes.len();
        if self.pending.fetch_add(len, Ordering::SeqCst) + len > MAX_PENDING_OUTPUT {
            tracing::warn!(
                monitor = self.id,
                "QMP client does not read its output; closing"
            );
            self.close();
            return;
        }
        if let Some(tx) = lock(&self.tx).as_ref() {
            let _ = tx.send(OutMsg::Data(bytes));
        }
    }

    /// Closes the connection after the queued output is written.
    pub(crate) fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        if let Some(tx) = lock(&self.tx).take() {
            let _ = tx.send(OutMsg::Close);
        }
    }
}

enum Stream {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Stream {
    fn try_clone(&self) -> io::Result<Stream> {
        Ok(match self {
            Stream::Unix(s) => Stream::Unix(s.try_clone()?),
            Stream::Tcp(s) => Stream::Tcp(s.try_clone()?),
        })
    }

    fn shutdown(&self, how: Shutdown) {
        let _ = match self {
            Stream::Unix(s) => s.shutdown(how),
            Stream::Tcp(s) => s.shutdown(how),
        };
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.read(buf),
            Stream::Tcp(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.write(buf),
            Stream::Tcp(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Unix(s) => s.flush(),
            Stream::Tcp(s) => s.flush(),
        }
    }
}

struct Job {
    monitor: Arc<Monitor>,
    msg: Message,
}

struct Monitor {
    out: Arc<Outbox>,
    inflight: Mutex<usize>,
    cv: Condvar,
}

impl Monitor {
    fn done(&self) {
        let mut n = lock(&self.inflight);
        *n = n.saturating_sub(1);
        self.cv.notify_all();
    }
}

type QuitHook = Box<dyn Fn() + Send + Sync>;

struct Inner {
    registry: Arc<Registry>,
    events: EventSender,
    exec_tx: Mutex<mpsc::Sender<Job>>,
    stop: Mutex<bool>,
    stop_cv: Condvar,
    stopping: AtomicBool,
    quit: AtomicBool,
    /// Set once `quit` ran: no further commands are executed.
    quitting: AtomicBool,
    quit_hook: Mutex<Option<QuitHook>>,
    monitors: Mutex<Vec<std::sync::Weak<Outbox>>>,
    active: AtomicUsize,
    listeners: Mutex<Vec<thread::JoinHandle<()>>>,
    next_id: AtomicU64,
}

impl Inner {
    fn request_stop(&self) {
        *lock(&self.stop) = true;
        self.stop_cv.notify_all();
    }

    fn context<'a>(&'a self, out: &'a Outbox) -> Context<'a> {
        Context {
            registry: &self.registry,
            events: &self.events,
            monitor: out,
            quit: &self.quit,
        }
    }

    fn after_command(&self) {
        if self.quit.swap(false, Ordering::SeqCst) {
            tracing::info!("QMP quit requested");
            self.quitting.store(true, Ordering::SeqCst);
            if let Some(hook) = lock(&self.quit_hook).as_ref() {
                hook();
            }
            self.request_stop();
        }
    }
}

/// A QMP server: a registry served on any number of listening sockets.
///
/// ```no_run
/// use strata_qmp::{QmpServer, Registry};
/// let server = QmpServer::new(Registry::default());
/// server.listen_unix("/tmp/qmp.sock").unwrap();
/// server.run_until_quit();
/// ```
#[derive(Clone)]
pub struct QmpServer {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for QmpServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QmpServer").finish_non_exhaustive()
    }
}

impl QmpServer {
    /// A server for `registry`; starts the command executor thread.
    pub fn new(registry: Registry) -> Self {
        let (tx, rx) = mpsc::channel::<Job>();
        let inner = Arc::new(Inner {
            registry: Arc::new(registry),
            events: EventSender::new(),
            exec_tx: Mutex::new(tx),
            stop: Mutex::new(false),
            stop_cv: Condvar::new(),
            stopping: AtomicBool::new(false),
            quit: AtomicBool::new(false),
            quitting: AtomicBool::new(false),
            quit_hook: Mutex::new(None),
            monitors: Mutex::new(Vec::new()),
            active: AtomicUsize::new(0),
            listeners: Mutex::new(Vec::new()),
            next_id: AtomicU64::new(1),
        });
        let weak = Arc::downgrade(&inner);
        let spawned = thread::Builder::new()
            .name("qmp-exec".into())
            .stack_size(8 << 20)
            .spawn(move || {
                while let Ok(job) = rx.recv() {
                    let Some(inner) = weak.upgrade() else { break };
                    let out = &job.monitor.out;
                    if !out.is_closed() && !inner.quitting.load(Ordering::SeqCst) {
                        let rsp = dispatch(&inner.context(out), job.msg);
                        out.send(to_wire(&rsp));
                        inner.after_command();
                    }
                    job.monitor.done();
                }
            });
        if let Err(e) = spawned {
            tracing::error!("cannot start the QMP executor: {e}");
        }
        QmpServer { inner }
    }

    /// The event broadcaster for this server's monitors.
    pub fn events(&self) -> EventSender {
        self.inner.events.clone()
    }

    /// The registry being served.
    pub fn registry(&self) -> &Registry {
        &self.inner.registry
    }

    /// Sets a hook run when a client executes `quit` (after the response is
    /// queued, before [`QmpServer::run_until_quit`] returns).
    pub fn on_quit(&self, hook: impl Fn() + Send + Sync + 'static) {
        *lock(&self.inner.quit_hook) = Some(Box::new(hook));
    }

    /// Listens on a unix socket (`server=on,wait=off`): a stale socket file
    /// is replaced, and the file is removed at shutdown.
    pub fn listen_unix(&self, path: impl AsRef<Path>) -> io::Result<()> {
        let path = path.as_ref().to_path_buf();
        let _ = std::fs::remove_file(&path);
        let l = UnixListener::bind(&path)?;
        l.set_nonblocking(true)?;
        let inner = self.inner.clone();
        self.spawn_listener(format!("qmp-unix {}", path.display()), move || {
            accept_loop(&inner, || l.accept().map(|(s, _)| Stream::Unix(s)));
            let _ = std::fs::remove_file(&path);
        })
    }

    /// Listens on a TCP address; returns the bound address (port 0 picks one).
    pub fn listen_tcp(&self, addr: impl ToSocketAddrs) -> io::Result<SocketAddr> {
        let l = TcpListener::bind(addr)?;
        let local = l.local_addr()?;
        l.set_nonblocking(true)?;
        let inner = self.inner.clone();
        self.spawn_listener(format!("qmp-tcp {local}"), move || {
            accept_loop(&inner, || {
                l.accept().map(|(s, _)| {
                    let _ = s.set_nodelay(true);
                    Stream::Tcp(s)
                })
            })
        })?;
        Ok(local)
    }

    fn spawn_listener(&self, name: String, f: impl FnOnce() + Send + 'static) -> io::Result<()> {
        let h = thread::Builder::new().name(name).spawn(f)?;
        lock(&self.inner.listeners).push(h);
        Ok(())
    }

    /// Blocks until a client runs `quit` or [`QmpServer::shutdown`] is
    /// called, then shuts the server down.
    pub fn run_until_quit(&self) {
        let mut stop = lock(&self.inner.stop);
        while !*stop {
            stop = self
                .inner
                .stop_cv
                .wait(stop)
                .unwrap_or_else(|p| p.into_inner());
        }
        drop(stop);
        self.close_all();
    }

    /// Stops listening and disconnects every client after its queued output
    /// is written. Waits (boundedly) for the connection threads to end.
    pub fn shutdown(&self) {
        self.inner.request_stop();
        self.close_all();
    }

    /// The number of connected monitors.
    pub fn active_monitors(&self) -> usize {
        self.inner.active.load(Ordering::SeqCst)
    }

    fn close_all(&self) {
        self.inner.stopping.store(true, Ordering::SeqCst);
        let handles: Vec<_> = lock(&self.inner.listeners).drain(..).collect();
        for h in handles {
            let _ = h.join();
        }
        for w in lock(&self.inner.monitors).drain(..) {
            if let Some(out) = w.upgrade() {
                out.close();
            }
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.inner.active.load(Ordering::SeqCst) > 0 && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(10));
        }
    }
}

fn accept_loop(inner: &Arc<Inner>, mut accept: impl FnMut() -> io::Result<Stream>) {
    while !inner.stopping.load(Ordering::SeqCst) {
        match accept() {
            Ok(stream) => {
                if let Err(e) = start_monitor(inner, stream) {
                    tracing::warn!("cannot start a QMP monitor: {e}");
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                thread::sleep(Duration::from_millis(20))
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                tracing::warn!("QMP accept failed: {e}");
                thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

fn start_monitor(inner: &Arc<Inner>, stream: Stream) -> io::Result<()> {
    if let Stream::Unix(s) = &stream {
        s.set_nonblocking(false)?;
    }
    if let Stream::Tcp(s) = &stream {
        s.set_nonblocking(false)?;
    }
    let id = inner.next_id.fetch_add(1, Ordering::SeqCst);
    let (tx, rx) = mpsc::channel();
    let out = Arc::new(Outbox::new(id, tx));
    let mut writer = stream.try_clone()?;
    let wout = out.clone();
    inner.active.fetch_add(1, Ordering::SeqCst);
    let winner = inner.clone();
    let w = thread::Builder::new()
        .name(format!("qmp-out-{id}"))
        .spawn(move || {
            while let Ok(m) = rx.recv() {
                match m {
                    OutMsg::Data(d) => {
                        wout.delivered(d.len());
                        if writer.write_all(&d).is_err() {
                            wout.closed.store(true, Ordering::SeqCst);
                            break;
                        }
                    }
                    OutMsg::Close => break,
                }
            }
            let _ = writer.flush();
            // Half-close first and let the reader drain what the client
            // still sends: closing a socket with unread input resets the
            // connection, and the client can lose the last response (the
            // one to `quit`, say).
            writer.shutdown(Shutdown::Write);
            let deadline = Instant::now() + Duration::from_secs(1);
            while !wout.reader_done.load(Ordering::SeqCst) && Instant::now() < deadline {
                thread::sleep(Duration::from_millis(5));
            }
            writer.shutdown(Shutdown::Both);
            winner.active.fetch_sub(1, Ordering::SeqCst);
        });
    if let Err(e) = w {
        inner.active.fetch_sub(1, Ordering::SeqCst);
        return Err(e);
    }
    lock(&inner.monitors).retain(|w| w.strong_count() > 0);
    lock(&inner.monitors).push(Arc::downgrade(&out));
    inner.events.subscribe(&out);
    out.send(to_wire(&inner.registry.greeting()));
    tracing::debug!(monitor = id, "QMP monitor connected");
    let rinner = inner.clone();
    thread::Builder::new()
        .name(format!("qmp-in-{id}"))
        .stack_size(8 << 20)
        .spawn(move || {
            read_loop(&rinner, stream, out.clone());
            out.reader_done.store(true, Ordering::SeqCst);
            out.close();
            tracing::debug!(monitor = id, "QMP monitor disconnected");
        })?;
    Ok(())
}

fn read_loop(inner: &Arc<Inner>, mut stream: Stream, out: Arc<Outbox>) {
    let monitor = Arc::new(Monitor {
        out: out.clone(),
        inflight: Mutex::new(0),
        cv: Condvar::new(),
    });
    let mut streamer = JsonStreamer::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut msgs = Vec::new();
    loop {
        let n = match stream.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => return,
        };
        if out.is_closed() {
            // draining input until the client closes (see the writer)
            continue;
        }
        streamer.feed(&buf[..n], &mut msgs);
        for msg in msgs.drain(..) {
            if out.is_closed() || inner.quitting.load(Ordering::SeqCst) {
                break;
            }
            let oob = out.oob_enabled();
            if oob && matches!(&msg, Ok(r) if is_oob(r)) {
                let rsp = dispatch(&inner.context(&out), msg);
                out.send(to_wire(&rsp));
                inner.after_command();
                continue;
            }
            let limit = if oob { QUEUE_LEN_MAX } else { 1 };
            {
                let mut n = lock(&monitor.inflight);
                while *n >= limit {
                    if out.is_closed() {
                        break;
                    }
                    n = monitor
                        .cv
                        .wait_timeout(n, Duration::from_millis(200))
                        .map(|r| r.0)
                        .unwrap_or_else(|p| p.into_inner().0);
                }
                if out.is_closed() {
                    break;
                }
                *n += 1;
            }
            let job = Job {
                monitor: monitor.clone(),
                msg,
            };
            if lock(&inner.exec_tx).send(job).is_err() {
                return;
            }
            if !oob {
                // QEMU suspends the monitor until the command completes.
                let mut n = lock(&monitor.inflight);
                while *n > 0 && !out.is_closed() {
                    n = monitor
                        .cv
                        .wait_timeout(n, Duration::from_millis(200))
                        .map(|r| r.0)
                        .unwrap_or_else(|p| p.into_inner().0);
                }
            }
        }
    }
}

/// Where a monitor listens (for embedding programs that parse
/// `--chardev socket,...` options).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    /// A unix socket path.
    Unix(PathBuf),
    /// A TCP host:port.
    Tcp(String),
}

impl QmpServer {
    /// Listens on `addr` (unix or TCP).
    pub fn listen(&self, addr: &ListenAddr) -> io::Result<()> {
        match addr {
            ListenAddr::Unix(p) => self.listen_unix(p),
            ListenAddr::Tcp(a) => self.listen_tcp(a.as_str()).map(|_| ()),
        }
    }
}
