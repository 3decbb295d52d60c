//! Executing parsed requests on a [`BlockBackend`], with QEMU's `werror`/`rerror`
//! error policy and io-status.

use std::ops::Deref;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;

use virtio_queue::{DescriptorChain, QueueT};
use vm_memory::{Bytes, GuestMemory};

use crate::backend::{BackendError, BlockBackend};
use crate::config::{features, BlkConfig, DeviceOptions, WRITEBACK_OFFSET};
use crate::request::{read_data, write_data, ParseError, Request, RequestType};
use crate::{direct, status, SECTOR_SHIFT};

/// Largest bounce buffer used for one backend call (requests are split into pieces
/// of at most this size, so a guest cannot make the device allocate more).
pub const MAX_CHUNK: usize = 1 << 20;

thread_local! {
    /// Each worker thread's bounce buffer, reused between requests (allocating and
    /// faulting in a fresh megabyte per request costs more than the copy).
    static BOUNCE: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Runs `f` on a bounce buffer of `n <= MAX_CHUNK` bytes.
fn with_bounce<R>(n: usize, f: impl FnOnce(&mut [u8]) -> R) -> R {
    BOUNCE.with(|b| match b.try_borrow_mut() {
        Ok(mut v) => {
            if v.len() < n {
                v.resize(n, 0);
            }
            f(&mut v[..n])
        }
        // Re-entered (not expected): fall back to a fresh buffer.
        Err(_) => f(&mut vec![0u8; n]),
    })
}

/// Bytes of the GET_ID answer.
pub const ID_BYTES: usize = 20;

/// What to do when the backend fails a guest request (QEMU's `BlockdevOnError`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ErrorAction {
    /// Report the error to the guest (IOERR).
    #[default]
    Report,
    /// Pretend the request succeeded.
    Ignore,
    /// Stop the device; the request is retried on resume.
    Stop,
    /// Stop on "no space left", report anything else.
    Enospc,
}

impl ErrorAction {
    /// Parses QEMU's spelling (`report`, `ignore`, `stop`, `enospc`).
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "report" => ErrorAction::Report,
            "ignore" => ErrorAction::Ignore,
            "stop" => ErrorAction::Stop,
            "enospc" => ErrorAction::Enospc,
            _ => return None,
        })
    }
}

/// QEMU's `BlockDeviceIoStatus`: set when an error stopped the device, cleared on resume.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoStatus {
    /// No error.
    Ok,
    /// An I/O error stopped the device.
    Failed,
    /// Lack of space stopped the device.
    Nospace,
}

impl IoStatus {
    /// The QMP spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            IoStatus::Ok => "ok",
            IoStatus::Failed => "failed",
            IoStatus::Nospace => "nospace",
        }
    }
}

/// One failed guest request, as QEMU's `BLOCK_IO_ERROR` event describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorEvent {
    /// `"read"` or `"write"`.
    pub operation: &'static str,
    /// `"report"`, `"ignore"` or `"stop"`.
    pub action: &'static str,
    /// Whether the cause was lack of space.
    pub nospace: bool,
    /// The backend's message.
    pub reason: String,
}

/// Receives error events (the transport forwards them to QMP as `BLOCK_IO_ERROR`).
pub trait ErrorSink: Send + Sync {
    /// Called once per failed request.
    fn io_error(&self, event: ErrorEvent);
}

/// A finished request: the head to return and the number of bytes written to the
/// chain (0 when the chain was dropped).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Completion {
    /// Head descriptor index.
    pub head: u16,
    /// Used length.
    pub len: u32,
}

/// A request held back because the error policy stopped the device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingRequest {
    /// The request to run again.
    pub request: Request,
}

/// The result of one chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Put this on the used ring.
    Done(Completion),
    /// The device stopped; keep the request and call [`VirtioBlk::retry`] on resume.
    Stopped(PendingRequest),
}

/// The result of one pass over a queue.
#[derive(Debug, Default)]
pub struct QueueRun {
    /// Chains completed.
    pub completed: usize,
    /// Whether the driver must be notified.
    pub notify: bool,
    /// A request the error policy stopped on (processing stopped there).
    pub stopped: Option<PendingRequest>,
    /// Chains whose head index is outside the descriptor table: they cannot be
    /// returned, so they were skipped (the rest of the ring was served). Reported here
    /// rather than logged, so the transport can rate-limit what a guest triggers.
    pub bad_heads: usize,
    /// The available ring claims more entries than the queue holds (an available index
    /// too far ahead): nothing more was taken from it. Only a reset recovers.
    pub ring_invalid: bool,
}

/// Errors of a queue pass (queue memory itself unreadable: the ring is broken).
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    /// virtio-queue refused an operation on the rings.
    #[error("virtqueue error: {0}")]
    Queue(#[from] virtio_queue::Error),
}

enum Failure {
    /// Status to report without involving the error policy.
    Status(u8),
    /// The backend failed; the policy decides.
    Backend { read: bool, err: BackendError },
}

/// A virtio-blk device on a backend.
pub struct VirtioBlk<B: BlockBackend> {
    backend: B,
    opts: DeviceOptions,
    acked: AtomicU64,
    writeback: AtomicBool,
    default_writeback: bool,
    werror: ErrorAction,
    rerror: ErrorAction,
    iostatus: AtomicU8,
    sink: Option<Arc<dyn ErrorSink>>,
}

impl<B: BlockBackend> std::fmt::Debug for VirtioBlk<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VirtioBlk")
            .field("opts", &self.opts)
            .field("werror", &self.werror)
            .field("rerror", &self.rerror)
            .finish_non_exhaustive()
    }
}

impl<B: BlockBackend> VirtioBlk<B> {
    /// A device on `backend`. Fails if the options are invalid.
    pub fn new(backend: B, mut opts: DeviceOptions) -> Result<Self, String> {
        opts.validate()?;
        if backend.read_only() {
            opts.read_only = true;
        }
        Ok(VirtioBlk {
            backend,
            opts,
            acked: AtomicU64::new(0),
            writeback: AtomicBool::new(true),
            default_writeback: true,
            werror: ErrorAction::Report,
            rerror: ErrorAction::Report,
            iostatus: AtomicU8::new(0),
            sink: None,
        })
    }

    /// Sets the error policy for writes (`werror`) and reads (`rerror`).
    pub fn with_error_policy(mut self, werror: ErrorAction, rerror: ErrorAction) -> Self {
        self.werror = werror;
        self.rerror = rerror;
        self
    }

    /// Starts (and resets) in writethrough mode: every write is followed by a flush
    /// until the driver enables writeback through the configuration space.
    pub fn with_writethrough(mut self, writethrough: bool) -> Self {
        self.default_writeback = !writethrough;
        self.writeback = AtomicBool::new(!writethrough);
        self
    }

    /// Sends error events to `sink`.
    pub fn with_error_sink(mut self, sink: Arc<dyn ErrorSink>) -> Self {
        self.sink = Some(sink);
        self
    }

    /// The backend.
    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// The options (with `read_only` forced on for a read-only backend).
    pub fn options(&self) -> &DeviceOptions {
        &self.opts
    }

    /// Offered features.
    pub fn features(&self) -> u64 {
        self.opts.features()
    }

    /// Records the features the driver accepted (only offered bits are kept).
    pub fn ack_features(&self, f: u64) {
        self.acked.store(f & self.features(), Ordering::Relaxed);
    }

    /// Accepted features.
    pub fn acked_features(&self) -> u64 {
        self.acked.load(Ordering::Relaxed)
    }

    /// The current configuration space.
    pub fn config(&self) -> BlkConfig {
        BlkConfig::new(
            self.backend.size(),
            &self.opts,
            self.writeback.load(Ordering::Relaxed),
        )
    }

    /// A driver write to the configuration space: only `writeback` is writable, and
    /// only with `VIRTIO_BLK_F_CONFIG_WCE`. Anything else is ignored.
    pub fn write_config(&self, offset: u64, data: &[u8]) {
        let wb = WRITEBACK_OFFSET as u64;
        if offset <= wb && offset.saturating_add(data.len() as u64) > wb {
            let v = data[(wb - offset) as usize];
            self.writeback.store(v != 0, Ordering::Relaxed);
        }
    }

    /// Whether the cache is in writeback mode (in writethrough mode every write is
    /// followed by a flush).
    pub fn writeback(&self) -> bool {
        self.writeback.load(Ordering::Relaxed)
    }

    /// Back to the state after reset (initial cache mode, no features).
    pub fn reset(&self) {
        self.acked.store(0, Ordering::Relaxed);
        self.writeback
            .store(self.default_writeback, Ordering::Relaxed);
    }

    /// The io-status.
    pub fn io_status(&self) -> IoStatus {
        match self.iostatus.load(Ordering::Relaxed) {
            1 => IoStatus::Failed,
            2 => IoStatus::Nospace,
            _ => IoStatus::Ok,
        }
    }

    /// Clears the io-status (on resume, as QEMU's `cont` does).
    pub fn reset_io_status(&self) {
        self.iostatus.store(0, Ordering::Relaxed);
    }

    /// Parses and executes one chain.
    pub fn process_chain<M>(&self, chain: DescriptorChain<M>, queue_size: u16) -> Outcome
    where
        M: Deref + Clone,
        M::Target: GuestMemory,
    {
        let mem_owner = chain.clone();
        let mem = mem_owner.memory();
        match self.parse_chain(chain, queue_size) {
            Ok(req) => self.execute(&req, mem),
            Err(c) => Outcome::Done(c),
        }
    }

    /// Parses one chain without executing it. A malformed chain is answered here (its
    /// status set to IOERR when the status byte could be located) and the completion
    /// to put on the used ring is returned as the error.
    pub fn parse_chain<M>(
        &self,
        chain: DescriptorChain<M>,
        queue_size: u16,
    ) -> Result<Request, Completion>
    where
        M: Deref + Clone,
        M::Target: GuestMemory,
    {
        let head = chain.head_index();
        let mem_owner = chain.clone();
        let mem = mem_owner.memory();
        Request::parse(chain, queue_size).map_err(|e| {
            tracing::debug!(head, error = %e, "malformed virtio-blk request");
            self.fail_parse(head, &e, mem)
        })
    }

    fn fail_parse<M: GuestMemory + ?Sized>(
        &self,
        head: u16,
        e: &ParseError,
        mem: &M,
    ) -> Completion {
        match e.status() {
            Some(addr) if mem.write_obj(status::IOERR, addr).is_ok() => Completion { head, len: 1 },
            _ => Completion { head, len: 0 },
        }
    }

    /// Runs a request held back by a stop again (after resume).
    pub fn retry<M: GuestMemory + ?Sized>(&self, pending: &PendingRequest, mem: &M) -> Outcome {
        self.execute(&pending.request, mem)
    }

    /// Executes a parsed request and writes its status byte.
    pub fn execute<M: GuestMemory + ?Sized>(&self, req: &Request, mem: &M) -> Outcome {
        let (st, data_written) = match self.run(req, mem) {
            Ok(n) => (status::OK, n),
            Err(Failure::Status(s)) => (s, 0),
            Err(Failure::Backend { read, err }) => match self.policy(read, &err) {
                ErrorAction::Stop => {
                    return Outcome::Stopped(PendingRequest {
                        request: req.clone(),
                    })
                }
                ErrorAction::Ignore => (status::OK, 0),
                _ => (status::IOERR, 0),
            },
        };
        let len = if mem.write_obj(st, req.status).is_ok() {
            data_written.saturating_add(1)
        } else {
            0
        };
        Outcome::Done(Completion {
            head: req.head,
            len,
        })
    }

    /// Applies werror/rerror; returns the effective action (Enospc resolved).
    fn policy(&self, read: bool, err: &BackendError) -> ErrorAction {
        let configured = if read { self.rerror } else { self.werror };
        let action = match configured {
            ErrorAction::Enospc if err.no_space => ErrorAction::Stop,
            ErrorAction::Enospc => ErrorAction::Report,
            a => a,
        };
        if action == ErrorAction::Stop {
            let v = if err.no_space { 2 } else { 1 };
            // Only the first error is kept, as QEMU does.
            let _ = self
                .iostatus
                .compare_exchange(0, v, Ordering::Relaxed, Ordering::Relaxed);
        }
        tracing::warn!(read, ?action, error = %err.message, "virtio-blk backend error");
        if let Some(s) = &self.sink {
            s.io_error(ErrorEvent {
                operation: if read { "read" } else { "write" },
                action: match action {
                    ErrorAction::Ignore => "ignore",
                    ErrorAction::Stop => "stop",
                    _ => "report",
                },
                nospace: err.no_space,
                reason: err.message.clone(),
            });
        }
        action
    }

    fn has(&self, bit: u32) -> bool {
        self.features() & (1u64 << bit) != 0
    }

    /// Checks a byte range against block size alignment and capacity.
    fn check_range(&self, sector: u64, len: u64) -> Result<u64, Failure> {
        let bs = u64::from(self.opts.logical_block_size);
        let offset = sector
            .checked_mul(1 << SECTOR_SHIFT)
            .ok_or(Failure::Status(status::IOERR))?;
        if offset % bs != 0 || len % bs != 0 {
            return Err(Failure::Status(status::IOERR));
        }
        match offset.checked_add(len) {
            Some(end) if end <= self.backend.size() => Ok(offset),
            _ => Err(Failure::Status(status::IOERR)),
        }
    }

    /// Returns the number of data bytes written into the chain.
    fn run<M: GuestMemory + ?Sized>(&self, req: &Request, mem: &M) -> Result<u32, Failure> {
        match req.ty {
            RequestType::In => {
                let offset = self.check_range(req.sector, req.data_len)?;
                if let Some(r) = direct::read(&self.backend, mem, &req.data, offset) {
                    r.map_err(|err| Failure::Backend { read: true, err })?;
                    // data_len is bounded by the chain's 4 GiB limit minus the status byte.
                    return Ok(u32::try_from(req.data_len).unwrap_or(u32::MAX - 1));
                }
                let mut done = 0u64;
                while done < req.data_len {
                    let n = (req.data_len - done).min(MAX_CHUNK as u64) as usize;
                    with_bounce(n, |buf| {
                        self.backend
                            .read(buf, offset + done)
                            .map_err(|err| Failure::Backend { read: true, err })?;
                        if !write_data(mem, &req.data, done, buf) {
                            return Err(Failure::Status(status::IOERR));
                        }
                        Ok(())
                    })?;
                    done += n as u64;
                }
                // data_len is bounded by the chain's 4 GiB limit minus the status byte.
                Ok(u32::try_from(req.data_len).unwrap_or(u32::MAX - 1))
            }
            RequestType::Out => {
                if self.opts.read_only {
                    return Err(Failure::Status(status::IOERR));
                }
                let offset = self.check_range(req.sector, req.data_len)?;
                let mut done = 0u64;
                if let Some(r) = direct::write(&self.backend, mem, &req.data, offset) {
                    r.map_err(|err| Failure::Backend { read: false, err })?;
                    done = req.data_len;
                }
                while done < req.data_len {
                    let n = (req.data_len - done).min(MAX_CHUNK as u64) as usize;
                    with_bounce(n, |buf| {
                        if !read_data(mem, &req.data, done, buf) {
                            return Err(Failure::Status(status::IOERR));
                        }
                        self.backend
                            .write(buf, offset + done)
                            .map_err(|err| Failure::Backend { read: false, err })
                    })?;
                    done += n as u64;
                }
                if !self.writeback() {
                    self.backend
                        .flush()
                        .map_err(|err| Failure::Backend { read: false, err })?;
                }
                Ok(0)
            }
            RequestType::Flush => {
                self.backend
                    .flush()
                    .map_err(|err| Failure::Backend { read: false, err })?;
                Ok(0)
            }
            RequestType::GetId => {
                let mut id = [0u8; ID_BYTES];
                let s = self.opts.serial.as_bytes();
                let n = s.len().min(ID_BYTES);
                id[..n].copy_from_slice(&s[..n]);
                let len = (req.data_len as usize).min(ID_BYTES);
                if !write_data(mem, &req.data, 0, &id[..len]) {
                    return Err(Failure::Status(status::IOERR));
                }
                Ok(len as u32)
            }
            RequestType::Discard | RequestType::WriteZeroes => {
                let wz = req.ty == RequestType::WriteZeroes;
                let bit = if wz {
                    features::WRITE_ZEROES
                } else {
                    features::DISCARD
                };
                if !self.has(bit) {
                    return Err(Failure::Status(status::UNSUPP));
                }
                if self.opts.read_only {
                    return Err(Failure::Status(status::IOERR));
                }
                self.discard_write_zeroes(req, mem, wz)?;
                Ok(0)
            }
            RequestType::Unsupported(_) => Err(Failure::Status(status::UNSUPP)),
        }
    }

    fn discard_write_zeroes<M: GuestMemory + ?Sized>(
        &self,
        req: &Request,
        mem: &M,
        wz: bool,
    ) -> Result<(), Failure> {
        const SEG: u64 = 16;
        if req.data_len == 0 || req.data_len % SEG != 0 {
            return Err(Failure::Status(status::IOERR));
        }
        let count = req.data_len / SEG;
        if count > u64::from(self.opts.max_dwz_segments) {
            return Err(Failure::Status(status::UNSUPP));
        }
        let max_sectors = if wz {
            self.opts.max_write_zeroes_sectors
        } else {
            self.opts.max_discard_sectors
        };
        // Validate every segment before touching the disk.
        let mut ranges = Vec::with_capacity(count as usize);
        for i in 0..count {
            let mut seg = [0u8; SEG as usize];
            if !read_data(mem, &req.data, i * SEG, &mut seg) {
                return Err(Failure::Status(status::IOERR));
            }
            let sector = u64::from_le_bytes(seg[0..8].try_into().unwrap_or([0; 8]));
            let num = u32::from_le_bytes(seg[8..12].try_into().unwrap_or([0; 4]));
            let flags = u32::from_le_bytes(seg[12..16].try_into().unwrap_or([0; 4]));
            let unmap = flags & 1 != 0;
            if flags & !1 != 0 || (!wz && unmap) {
                return Err(Failure::Status(status::UNSUPP));
            }
            if num > max_sectors {
                return Err(Failure::Status(status::IOERR));
            }
            let len = u64::from(num) << SECTOR_SHIFT;
            let offset = self.check_range(sector, len)?;
            ranges.push((offset, len, unmap));
        }
        for (offset, len, unmap) in ranges {
            if len == 0 {
                continue;
            }
            let r = if wz {
                self.backend.write_zeroes(offset, len, unmap)
            } else {
                self.backend.discard(offset, len)
            };
            r.map_err(|err| Failure::Backend { read: false, err })?;
        }
        Ok(())
    }

    /// Processes every available chain of `queue` until it is empty (or the error
    /// policy stops the device), handling notification suppression: with EVENT_IDX
    /// notifications are re-enabled and the ring checked again before returning.
    pub fn process_queue<Q, M>(&self, queue: &mut Q, mem: &M) -> Result<QueueRun, QueueError>
    where
        Q: QueueT,
        M: GuestMemory,
    {
        let mut run = QueueRun::default();
        // Chains may be as long as the queue, or as long as `seg_max` allows (through
        // indirect tables) when the transport's queue is smaller than the options say.
        let size = queue.size().max(self.opts.queue_size);
        let table = queue.size();
        loop {
            queue.disable_notification(mem)?;
            // Checked here so virtio-queue's own iterator (which logs at error level)
            // never sees an index the guest pushed too far ahead.
            let avail = queue.avail_idx(mem, Ordering::Acquire)?.0;
            if avail.wrapping_sub(queue.next_avail()) > table {
                run.ring_invalid = true;
                queue.enable_notification(mem)?;
                break;
            }
            let mut popped = 0usize;
            while let Some(chain) = queue.pop_descriptor_chain(mem) {
                popped += 1;
                match self.process_chain(chain, size) {
                    Outcome::Done(c) => {
                        // A head outside the descriptor table cannot be returned;
                        // skip it and keep serving the rest of the ring.
                        if c.head >= table || queue.add_used(mem, c.head, c.len).is_err() {
                            run.bad_heads += 1;
                            continue;
                        }
                        run.completed += 1;
                    }
                    Outcome::Stopped(p) => {
                        run.stopped = Some(p);
                        if run.completed > 0 {
                            run.notify |= queue.needs_notification(mem)?;
                        }
                        return Ok(run);
                    }
                }
            }
            if !queue.enable_notification(mem)? {
                break;
            }
            // The ring claims more available entries than the queue would hand out:
            // without progress, stop rather than spin.
            if popped == 0 {
                run.ring_invalid = true;
                queue.enable_notification(mem)?;
                break;
            }
        }
        if run.completed > 0 {
            run.notify = queue.needs_notification(mem)?;
        }
        Ok(run)
    }
}
