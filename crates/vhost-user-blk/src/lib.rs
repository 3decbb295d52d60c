//! strata-vhost-user-blk: a block node served to a vhost-user frontend (QEMU,
//! cloud-hypervisor, crosvm) as a virtio-blk device, on `vhost-user-backend`.
//!
//! An [`Export`] binds its unix socket when it is created and serves one frontend
//! at a time from a thread of its own; when a frontend goes away (cleanly or killed in
//! the middle of a request) the in-flight requests finish, the node is flushed, and
//! the export waits for the next frontend. Each virtqueue has its own thread, and a
//! small worker pool runs several requests of a queue at once (see `engine`).
//! Requests are parsed and executed by `strata-virtio-blk` on the node, so guest
//! writes pass through the block graph (bitmaps, copy-before-write).
//!
//! The `werror`/`rerror` policy may stop the device: the failed requests are held
//! and the queues are no longer served until [`Export::resume`] (QMP `cont`).

mod backend;
mod engine;

use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use strata_virtio_blk::{BlockBackend, DeviceOptions, ErrorAction, ErrorSink, IoStatus, VirtioBlk};
use vhost::vhost_user::Listener;
use vhost_user_backend::{ShutdownHandle, VhostUserDaemon};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

pub use backend::BlkBackend;

/// Largest virtqueue a frontend may configure.
pub const MAX_QUEUE_SIZE: u16 = 1024;

/// Most queues an export offers (one worker thread each).
pub const MAX_QUEUES: u16 = 64;

/// Errors creating an export.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// Invalid export options.
    #[error("{0}")]
    Options(String),
    /// The socket could not be bound.
    #[error("Failed to bind socket to {path}: {}", os_message(source))]
    Bind {
        /// The socket path.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The serving thread could not start.
    #[error("cannot start the export thread: {0}")]
    Thread(#[from] std::io::Error),
}

/// Export settings (the `vhost-user-blk` branch of QEMU's `BlockExportOptions`).
#[derive(Debug, Clone)]
pub struct ExportConfig {
    /// Export id.
    pub id: String,
    /// Unix socket path the export listens on.
    pub path: PathBuf,
    /// Whether the guest may write.
    pub writable: bool,
    /// Number of request queues.
    pub num_queues: u16,
    /// Logical block size.
    pub logical_block_size: u32,
    /// Serial for `GET_ID`.
    pub serial: String,
    /// Start with the write cache in writethrough mode (a flush after every write).
    pub writethrough: bool,
    /// What a failed guest write does (QEMU's `werror`).
    pub werror: ErrorAction,
    /// What a failed guest read does (QEMU's `rerror`).
    pub rerror: ErrorAction,
}

/// An OS error's text without Rust's " (os error N)" suffix, as QEMU prints it.
fn os_message(e: &std::io::Error) -> String {
    let s = e.to_string();
    match s.find(" (os error ") {
        Some(i) => s[..i].to_string(),
        None => s,
    }
}

/// What the control side needs of the current connection, whatever the backend type.
trait Connection: Send {
    fn resume(&self) -> usize;
    fn stopped(&self) -> bool;
}

impl<B: BlockBackend + 'static> Connection for BlkBackend<B> {
    fn resume(&self) -> usize {
        BlkBackend::resume(self)
    }
    fn stopped(&self) -> bool {
        BlkBackend::stopped(self)
    }
}

#[derive(Default)]
struct Control {
    stop: bool,
    active: Option<ShutdownHandle>,
    conn: Option<Box<dyn Connection>>,
}

/// A running vhost-user-blk export.
pub struct Export {
    id: String,
    path: PathBuf,
    control: Arc<Mutex<Control>>,
    status: Box<dyn Fn() -> IoStatus + Send + Sync>,
    reset_status: Box<dyn Fn() + Send + Sync>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Export {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Export")
            .field("id", &self.id)
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl Export {
    /// Validates `cfg`, binds the socket and starts serving `node`. Failed guest
    /// requests are reported to `sink` (QMP's `BLOCK_IO_ERROR`), if given.
    pub fn start<B>(
        cfg: ExportConfig,
        node: B,
        sink: Option<Arc<dyn ErrorSink>>,
    ) -> Result<Export, ExportError>
    where
        B: BlockBackend + 'static,
    {
        if cfg.num_queues == 0 || cfg.num_queues > MAX_QUEUES {
            return Err(ExportError::Options(format!(
                "num-queues must be between 1 and {MAX_QUEUES}"
            )));
        }
        if cfg.writable && node.read_only() {
            return Err(ExportError::Options(
                "Cannot export a read-only node as writable".into(),
            ));
        }
        let opts = DeviceOptions {
            serial: cfg.serial.clone(),
            logical_block_size: cfg.logical_block_size,
            num_queues: cfg.num_queues,
            read_only: !cfg.writable,
            ..DeviceOptions::default()
        };
        let mut dev = VirtioBlk::new(node, opts)
            .map_err(ExportError::Options)?
            .with_writethrough(cfg.writethrough)
            .with_error_policy(cfg.werror, cfg.rerror);
        if let Some(s) = sink {
            dev = dev.with_error_sink(s);
        }
        let dev = Arc::new(dev);
        // Like QEMU: a stale socket file is replaced.
        let _ = std::fs::remove_file(&cfg.path);
        let listener = UnixListener::bind(&cfg.path).map_err(|source| ExportError::Bind {
            path: cfg.path.display().to_string(),
            source,
        })?;
        let listener = Listener::from(listener);
        let control = Arc::new(Mutex::new(Control::default()));
        let ctl = control.clone();
        let id = cfg.id.clone();
        let (d1, d2, d3) = (dev.clone(), dev.clone(), dev);
        let thread = std::thread::Builder::new()
            .name(format!("vub-{}", cfg.id))
            .spawn(move || serve(id, d1, listener, ctl))?;
        Ok(Export {
            id: cfg.id,
            path: cfg.path,
            control,
            status: Box::new(move || d2.io_status()),
            reset_status: Box::new(move || d3.reset_io_status()),
            thread: Some(thread),
        })
    }

    /// The device's io-status (`failed` or `nospace` while the error policy holds
    /// it stopped).
    pub fn io_status(&self) -> IoStatus {
        (self.status)()
    }

    /// Whether the error policy stopped the device of the current connection.
    pub fn stopped(&self) -> bool {
        let c = self.control.lock().unwrap_or_else(|e| e.into_inner());
        c.conn.as_ref().is_some_and(|c| c.stopped())
    }

    /// Resumes after a stop, as QEMU's `cont`: clears the io-status, retries the
    /// held requests and serves the queues again. Returns the requests retried.
    pub fn resume(&self) -> usize {
        let c = self.control.lock().unwrap_or_else(|e| e.into_inner());
        match c.conn.as_ref() {
            Some(conn) => conn.resume(),
            None => {
                (self.reset_status)();
                0
            }
        }
    }

    /// The export id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether a frontend is connected.
    pub fn connected(&self) -> bool {
        self.control
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .active
            .is_some()
    }

    /// Disconnects the frontend (if any), stops listening, removes the socket and
    /// waits until in-flight requests have finished.
    pub fn stop(&mut self) {
        {
            let mut c = self.control.lock().unwrap_or_else(|e| e.into_inner());
            c.stop = true;
            if let Some(h) = c.active.take() {
                h.shutdown();
            }
        }
        // Wake a thread blocked in accept(); it sees `stop` and leaves.
        let _ = UnixStream::connect(&self.path);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

impl Drop for Export {
    fn drop(&mut self) {
        self.stop();
    }
}

type Mem = GuestMemoryAtomic<GuestMemoryMmap>;

fn serve<B: BlockBackend + 'static>(
    id: String,
    dev: Arc<VirtioBlk<B>>,
    mut listener: Listener,
    control: Arc<Mutex<Control>>,
) {
    loop {
        if control.lock().unwrap_or_else(|e| e.into_inner()).stop {
            break;
        }
        let backend = match BlkBackend::new(dev.clone(), &format!("vub-{id}")) {
            Ok(b) => b,
            Err(e) => {
                tracing::error!(export = %id, error = %e, "cannot create vhost-user backend");
                break;
            }
        };
        let mem: Mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        let conn = backend.clone();
        let mut daemon = match VhostUserDaemon::new(format!("vub-{id}-conn"), backend, mem) {
            Ok(d) => d,
            Err(e) => {
                tracing::error!(export = %id, error = %e, "cannot create vhost-user daemon");
                break;
            }
        };
        if let Err(e) = daemon.start(&mut listener) {
            tracing::error!(export = %id, error = %e, "vhost-user accept failed");
            break;
        }
        {
            let mut c = control.lock().unwrap_or_else(|e| e.into_inner());
            if c.stop {
                daemon.request_shutdown();
            } else {
                c.active = daemon.shutdown_handle();
                c.conn = Some(Box::new(conn.clone()));
                tracing::info!(export = %id, "vhost-user frontend connected");
            }
        }
        match daemon.wait() {
            Ok(()) => {}
            // The frontend went away (quit, crashed or was killed): normal life.
            Err(vhost_user_backend::Error::HandleRequest(
                vhost::vhost_user::Error::Disconnected
                | vhost::vhost_user::Error::PartialMessage
                | vhost::vhost_user::Error::SocketBroken(_),
            )) => {}
            Err(e) => {
                tracing::warn!(export = %id, error = %e, "vhost-user connection ended with an error");
            }
        }
        {
            let mut c = control.lock().unwrap_or_else(|e| e.into_inner());
            c.active = None;
            c.conn = None;
        }
        // Dropping the daemon stops the vring threads once their current request is
        // done; then the pool finishes what it was given. Requests held by a stop
        // belong to the frontend that left: they are dropped with the connection.
        drop(daemon);
        conn.drain();
        if conn.pending() > 0 {
            tracing::warn!(export = %id, held = conn.pending(), "frontend left while stopped; held requests dropped");
            dev.reset_io_status();
        }
        drop(conn);
        if let Err(e) = dev.backend().flush() {
            tracing::warn!(export = %id, error = %e, "flush after disconnect failed");
        }
        dev.reset();
        tracing::info!(export = %id, "vhost-user frontend disconnected");
    }
}
