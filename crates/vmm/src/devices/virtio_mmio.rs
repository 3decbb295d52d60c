//! The virtio-mmio transport (virtio 1.2 section 4.2, version 2 "modern" register
//! layout) with a `strata-virtio-blk` device behind it.
//!
//! The guest controls every value written here, so each access is checked: register
//! offsets and sizes, the selected queue, queue sizes, ring alignment and ring
//! addresses (against guest memory), and the device status state machine (features
//! only between DRIVER and FEATURES_OK, queues only between FEATURES_OK and
//! DRIVER_OK, no bit cleared except by a reset). A refused access is counted, logged
//! at debug level and otherwise ignored (reads return zero). A ring the device cannot
//! use any more sets DEVICE_NEEDS_RESET and raises a configuration interrupt.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use strata_virtio_blk::{BlockBackend, PendingRequest, VirtioBlk};
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemoryBackend};
use vmm_sys_util::eventfd::EventFd;

use crate::memory::GuestMemory;

pub mod limit;
use limit::{Admit, WarnLimit};

/// Register offsets of the version 2 layout.
pub mod reg {
    /// "virt" in little endian.
    pub const MAGIC_VALUE: u64 = 0x000;
    /// Transport version (2).
    pub const VERSION: u64 = 0x004;
    /// Virtio device type.
    pub const DEVICE_ID: u64 = 0x008;
    /// Vendor id.
    pub const VENDOR_ID: u64 = 0x00c;
    /// 32 bits of the device features selected by `DEVICE_FEATURES_SEL`.
    pub const DEVICE_FEATURES: u64 = 0x010;
    /// Selects the device feature word.
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    /// 32 bits of the driver features selected by `DRIVER_FEATURES_SEL`.
    pub const DRIVER_FEATURES: u64 = 0x020;
    /// Selects the driver feature word.
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    /// Selects the queue the queue registers refer to.
    pub const QUEUE_SEL: u64 = 0x030;
    /// Largest size of the selected queue.
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    /// Size of the selected queue.
    pub const QUEUE_NUM: u64 = 0x038;
    /// Whether the selected queue is ready.
    pub const QUEUE_READY: u64 = 0x044;
    /// Queue notification (value: queue index).
    pub const QUEUE_NOTIFY: u64 = 0x050;
    /// Pending interrupt causes.
    pub const INTERRUPT_STATUS: u64 = 0x060;
    /// Acknowledges interrupt causes.
    pub const INTERRUPT_ACK: u64 = 0x064;
    /// Device status.
    pub const STATUS: u64 = 0x070;
    /// Descriptor table address, low 32 bits.
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    /// Descriptor table address, high 32 bits.
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    /// Available ring address, low 32 bits.
    pub const QUEUE_DRIVER_LOW: u64 = 0x090;
    /// Available ring address, high 32 bits.
    pub const QUEUE_DRIVER_HIGH: u64 = 0x094;
    /// Used ring address, low 32 bits.
    pub const QUEUE_DEVICE_LOW: u64 = 0x0a0;
    /// Used ring address, high 32 bits.
    pub const QUEUE_DEVICE_HIGH: u64 = 0x0a4;
    /// Shared memory region selector.
    pub const SHM_SEL: u64 = 0x0ac;
    /// Shared memory region length, low 32 bits.
    pub const SHM_LEN_LOW: u64 = 0x0b0;
    /// Shared memory region length, high 32 bits.
    pub const SHM_LEN_HIGH: u64 = 0x0b4;
    /// Shared memory region base, low 32 bits.
    pub const SHM_BASE_LOW: u64 = 0x0b8;
    /// Shared memory region base, high 32 bits.
    pub const SHM_BASE_HIGH: u64 = 0x0bc;
    /// Configuration atomicity value.
    pub const CONFIG_GENERATION: u64 = 0x0fc;
    /// Start of the device configuration space.
    pub const CONFIG: u64 = 0x100;
}

/// Device status bits.
pub mod status {
    /// The guest noticed the device.
    pub const ACKNOWLEDGE: u32 = 1;
    /// The guest has a driver for it.
    pub const DRIVER: u32 = 2;
    /// The driver is ready.
    pub const DRIVER_OK: u32 = 4;
    /// Feature negotiation is complete.
    pub const FEATURES_OK: u32 = 8;
    /// The device hit an error it cannot recover from without a reset.
    pub const DEVICE_NEEDS_RESET: u32 = 0x40;
    /// The driver gave up.
    pub const FAILED: u32 = 0x80;
}

/// `MagicValue`.
pub const MAGIC: u32 = 0x7472_6976;
/// Virtio device type of a block device.
pub const DEVICE_TYPE_BLOCK: u32 = 2;
/// Vendor id reported ("STRA").
pub const VENDOR: u32 = 0x4152_5453;
/// `VIRTIO_F_VERSION_1`.
const F_VERSION_1: u64 = 1 << 32;
/// `VIRTIO_BLK_F_CONFIG_WCE`.
const F_CONFIG_WCE: u64 = 1 << 11;
/// `VIRTIO_RING_F_EVENT_IDX`.
const F_EVENT_IDX: u64 = 1 << 29;
/// Used-buffer interrupt cause.
pub const INT_USED_RING: u32 = 1;
/// Configuration-change interrupt cause.
pub const INT_CONFIG: u32 = 2;

/// Raises the device's interrupt line.
pub trait Interrupt: Send + Sync {
    /// Signals the guest.
    fn trigger(&self);
}

impl Interrupt for EventFd {
    fn trigger(&self) {
        if let Err(e) = self.write(1) {
            tracing::warn!(error = %e, "cannot signal an interrupt");
        }
    }
}

/// The `InterruptStatus` register, shared with the bus so that a guest's interrupt
/// handler reads and acknowledges it without waiting for the transport's lock, which
/// the event loop holds while it runs a queue's requests.
#[derive(Debug, Default)]
pub struct InterruptStatus(AtomicU32);

impl InterruptStatus {
    /// The pending causes.
    pub fn get(&self) -> u32 {
        self.0.load(Ordering::SeqCst)
    }

    /// Adds `cause` (before the interrupt is signalled, so the guest sees it).
    fn raise(&self, cause: u32) {
        self.0.fetch_or(cause, Ordering::SeqCst);
    }

    /// The driver's `InterruptACK`: clears the causes set in `v`.
    fn ack(&self, v: u32) {
        self.0.fetch_and(!v, Ordering::SeqCst);
    }

    fn clear(&self) {
        self.0.store(0, Ordering::SeqCst);
    }

    /// Serves an aligned 4-byte read of `InterruptStatus`; false for any other
    /// access, which goes to the transport.
    pub fn try_read(&self, offset: u64, data: &mut [u8]) -> bool {
        if offset != reg::INTERRUPT_STATUS || data.len() != 4 {
            return false;
        }
        data.copy_from_slice(&self.get().to_le_bytes());
        true
    }

    /// Serves an aligned 4-byte write of `InterruptACK`; false for any other access.
    pub fn try_write(&self, offset: u64, data: &[u8]) -> bool {
        match <[u8; 4]>::try_from(data) {
            Ok(b) if offset == reg::INTERRUPT_ACK => {
                self.ack(u32::from_le_bytes(b));
                true
            }
            _ => false,
        }
    }
}

/// What the driver has written for one queue (applied to the queue when it is made
/// ready, after checking).
#[derive(Debug, Clone, Copy, Default)]
struct QueueRegs {
    size: u16,
    desc: u64,
    driver: u64,
    device: u64,
}

fn set_low(v: &mut u64, low: u32) {
    *v = (*v & !0xffff_ffff) | u64::from(low);
}

fn set_high(v: &mut u64, high: u32) {
    *v = (*v & 0xffff_ffff) | (u64::from(high) << 32);
}

/// Callback used when the device's error policy wants the VM stopped.
pub type StopHook = Arc<dyn Fn() + Send + Sync>;

/// A virtio-mmio register window with a virtio-blk device.
pub struct MmioTransport<B: BlockBackend> {
    dev: Arc<VirtioBlk<B>>,
    mem: Arc<GuestMemory>,
    queues: Vec<Queue>,
    regs: Vec<QueueRegs>,
    queue_sel: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    status: u32,
    interrupt_status: Arc<InterruptStatus>,
    config_generation: u32,
    irq: Arc<dyn Interrupt>,
    notifiers: Vec<Option<EventFd>>,
    paused: bool,
    pending: Option<(usize, PendingRequest)>,
    stop_hook: Option<StopHook>,
    rejected: u64,
    warnings: WarnLimit,
}

impl<B: BlockBackend> std::fmt::Debug for MmioTransport<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MmioTransport")
            .field("status", &self.status)
            .field("queues", &self.queues.len())
            .finish_non_exhaustive()
    }
}

impl<B: BlockBackend> MmioTransport<B> {
    /// A transport for `dev` with `num_queues` queues of at most `queue_size` entries,
    /// interrupting through `irq`.
    pub fn new(
        dev: Arc<VirtioBlk<B>>,
        mem: Arc<GuestMemory>,
        irq: Arc<dyn Interrupt>,
    ) -> Result<Self, String> {
        let n = usize::from(dev.options().num_queues);
        let max = dev.options().queue_size;
        let queues = (0..n)
            .map(|_| Queue::new(max).map_err(|e| format!("queue size {max}: {e}")))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(MmioTransport {
            dev,
            mem,
            queues,
            regs: vec![QueueRegs::default(); n],
            queue_sel: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            status: 0,
            interrupt_status: Arc::default(),
            config_generation: 0,
            irq,
            notifiers: (0..n).map(|_| None).collect(),
            paused: false,
            pending: None,
            stop_hook: None,
            rejected: 0,
            warnings: WarnLimit::default(),
        })
    }

    /// Queue notifications found on the slow path (a QueueNotify write KVM did not
    /// turn into an ioeventfd signal) are forwarded to these eventfds, one per queue.
    /// Without them the queue is processed inline.
    pub fn set_notifiers(&mut self, fds: Vec<EventFd>) {
        for (slot, fd) in self.notifiers.iter_mut().zip(fds) {
            *slot = Some(fd);
        }
    }

    /// Called when the device's error policy stops on a failed request.
    pub fn set_stop_hook(&mut self, hook: StopHook) {
        self.stop_hook = Some(hook);
    }

    /// The `InterruptStatus` register, for the bus's lock-free path.
    pub fn interrupt_status(&self) -> Arc<InterruptStatus> {
        self.interrupt_status.clone()
    }

    /// The device.
    pub fn device(&self) -> &Arc<VirtioBlk<B>> {
        &self.dev
    }

    /// The number of queues.
    pub fn num_queues(&self) -> usize {
        self.queues.len()
    }

    /// The device status register.
    pub fn status(&self) -> u32 {
        self.status
    }

    /// Guest accesses refused so far.
    pub fn rejected(&self) -> u64 {
        self.rejected
    }

    /// Guest-triggered warnings so far (logged or not).
    pub fn guest_warnings(&self) -> u64 {
        self.warnings.seen()
    }

    /// Logs a warning the guest caused, rate-limited per device.
    fn guest_warning(&mut self, what: &str, detail: &str) {
        match self.warnings.admit() {
            Admit::Log => tracing::warn!(detail, "virtio-blk: {what}"),
            Admit::Summary(n) => tracing::warn!(
                suppressed = n,
                latest = what,
                "virtio-blk: further guest-triggered warnings of this device are counted, not logged"
            ),
            Admit::Quiet => {}
        }
    }

    fn reject(&mut self, what: &str, offset: u64, len: usize) {
        self.rejected += 1;
        tracing::debug!(
            what,
            offset,
            len,
            status = self.status,
            "virtio-mmio access refused"
        );
    }

    fn offered(&self) -> u64 {
        self.dev.features() | F_VERSION_1
    }

    fn selected(&self) -> Option<usize> {
        let q = self.queue_sel as usize;
        (q < self.queues.len()).then_some(q)
    }

    /// A guest read of `data.len()` bytes at `offset` into the window.
    pub fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if offset >= reg::CONFIG {
            if !matches!(data.len(), 1 | 2 | 4 | 8) {
                return self.reject("config read size", offset, data.len());
            }
            let bytes = self.dev.config().read(offset - reg::CONFIG, data.len());
            data.copy_from_slice(&bytes);
            return;
        }
        if data.len() != 4 || offset % 4 != 0 {
            return self.reject("register read size", offset, data.len());
        }
        let v: u32 = match offset {
            reg::MAGIC_VALUE => MAGIC,
            reg::VERSION => 2,
            reg::DEVICE_ID => DEVICE_TYPE_BLOCK,
            reg::VENDOR_ID => VENDOR,
            reg::DEVICE_FEATURES => match self.device_features_sel {
                0 => self.offered() as u32,
                1 => (self.offered() >> 32) as u32,
                _ => 0,
            },
            reg::QUEUE_NUM_MAX => self
                .selected()
                .map_or(0, |q| u32::from(self.queues[q].max_size())),
            reg::QUEUE_READY => self
                .selected()
                .map_or(0, |q| u32::from(self.queues[q].ready())),
            reg::INTERRUPT_STATUS => self.interrupt_status.get(),
            reg::STATUS => self.status,
            reg::CONFIG_GENERATION => self.config_generation,
            // No shared memory regions: a length of all ones says so.
            reg::SHM_LEN_LOW | reg::SHM_LEN_HIGH | reg::SHM_BASE_LOW | reg::SHM_BASE_HIGH => {
                u32::MAX
            }
            reg::DEVICE_FEATURES_SEL
            | reg::DRIVER_FEATURES
            | reg::DRIVER_FEATURES_SEL
            | reg::QUEUE_SEL
            | reg::QUEUE_NUM
            | reg::QUEUE_NOTIFY
            | reg::INTERRUPT_ACK
            | reg::QUEUE_DESC_LOW
            | reg::QUEUE_DESC_HIGH
            | reg::QUEUE_DRIVER_LOW
            | reg::QUEUE_DRIVER_HIGH
            | reg::QUEUE_DEVICE_LOW
            | reg::QUEUE_DEVICE_HIGH
            | reg::SHM_SEL => 0,
            _ => return self.reject("unknown register read", offset, 4),
        };
        data.copy_from_slice(&v.to_le_bytes());
    }

    /// A guest write of `data` at `offset` into the window.
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= reg::CONFIG {
            // Only the one-byte writeback field is writable, with CONFIG_WCE.
            if self.dev.acked_features() & F_CONFIG_WCE == 0
                || self.status & status::DRIVER == 0
                || data.len() != 1
            {
                return self.reject("config write", offset, data.len());
            }
            self.dev.write_config(offset - reg::CONFIG, data);
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            return self.reject("register write size", offset, data.len());
        };
        if offset % 4 != 0 {
            return self.reject("unaligned register write", offset, data.len());
        }
        let v = u32::from_le_bytes(bytes);
        match offset {
            reg::DEVICE_FEATURES_SEL => self.device_features_sel = v,
            reg::DRIVER_FEATURES_SEL => self.driver_features_sel = v,
            reg::DRIVER_FEATURES => {
                let s = self.status;
                if s & status::DRIVER == 0 || s & status::FEATURES_OK != 0 {
                    return self.reject("features written in the wrong state", offset, 4);
                }
                match self.driver_features_sel {
                    0 => set_low(&mut self.driver_features, v),
                    1 => set_high(&mut self.driver_features, v),
                    _ if v == 0 => {}
                    _ => self.reject("feature word out of range", offset, 4),
                }
            }
            reg::QUEUE_SEL => self.queue_sel = v,
            reg::QUEUE_NUM
            | reg::QUEUE_DESC_LOW
            | reg::QUEUE_DESC_HIGH
            | reg::QUEUE_DRIVER_LOW
            | reg::QUEUE_DRIVER_HIGH
            | reg::QUEUE_DEVICE_LOW
            | reg::QUEUE_DEVICE_HIGH => self.write_queue_reg(offset, v),
            reg::QUEUE_READY => self.write_queue_ready(v),
            reg::QUEUE_NOTIFY => self.notify(v),
            reg::INTERRUPT_ACK => self.interrupt_status.ack(v),
            reg::STATUS => self.write_status(v),
            reg::SHM_SEL => {}
            _ => self.reject("unknown or read-only register write", offset, 4),
        }
    }

    /// Whether queue registers may be written now.
    fn queue_config_allowed(&self) -> Option<usize> {
        let s = self.status;
        if s & status::FEATURES_OK == 0 || s & (status::DRIVER_OK | status::FAILED) != 0 {
            return None;
        }
        self.selected()
    }

    fn write_queue_reg(&mut self, offset: u64, v: u32) {
        let Some(q) = self.queue_config_allowed() else {
            return self.reject("queue register written in the wrong state", offset, 4);
        };
        if self.queues[q].ready() {
            return self.reject("queue register of a ready queue", offset, 4);
        }
        let max = self.queues[q].max_size();
        let r = &mut self.regs[q];
        match offset {
            reg::QUEUE_NUM => match u16::try_from(v) {
                Ok(n) if n != 0 && n <= max && n.is_power_of_two() => r.size = n,
                _ => self.reject("bad queue size", offset, 4),
            },
            reg::QUEUE_DESC_LOW => set_low(&mut r.desc, v),
            reg::QUEUE_DESC_HIGH => set_high(&mut r.desc, v),
            reg::QUEUE_DRIVER_LOW => set_low(&mut r.driver, v),
            reg::QUEUE_DRIVER_HIGH => set_high(&mut r.driver, v),
            reg::QUEUE_DEVICE_LOW => set_low(&mut r.device, v),
            _ => set_high(&mut r.device, v),
        }
    }

    /// Checks the queue's rings: size, alignment and that they lie in guest memory.
    fn rings_valid(&self, r: &QueueRegs) -> bool {
        let n = u64::from(r.size);
        if n == 0 {
            return false;
        }
        let ranges = [
            (r.desc, 16 * n, 16),
            (r.driver, 6 + 2 * n, 2),
            (r.device, 6 + 8 * n, 4),
        ];
        ranges.iter().all(|&(addr, len, align)| {
            addr % align == 0
                && GuestMemoryBackend::check_range(&*self.mem, GuestAddress(addr), len as usize)
        })
    }

    fn write_queue_ready(&mut self, v: u32) {
        let Some(q) = self.queue_config_allowed() else {
            return self.reject("QueueReady in the wrong state", reg::QUEUE_READY, 4);
        };
        match v {
            0 => self.queues[q].set_ready(false),
            1 => {
                let r = self.regs[q];
                if !self.rings_valid(&r) {
                    return self.reject("queue rings invalid", reg::QUEUE_READY, 4);
                }
                let queue = &mut self.queues[q];
                let ok = queue.try_set_size(r.size).is_ok()
                    && queue
                        .try_set_desc_table_address(GuestAddress(r.desc))
                        .is_ok()
                    && queue
                        .try_set_avail_ring_address(GuestAddress(r.driver))
                        .is_ok()
                    && queue
                        .try_set_used_ring_address(GuestAddress(r.device))
                        .is_ok();
                if !ok {
                    return self.reject("queue rings invalid", reg::QUEUE_READY, 4);
                }
                queue.set_event_idx(self.dev.acked_features() & F_EVENT_IDX != 0);
                queue.set_ready(true);
            }
            _ => self.reject("QueueReady value", reg::QUEUE_READY, 4),
        }
    }

    fn write_status(&mut self, v: u32) {
        if v == 0 {
            self.reset();
            return;
        }
        let old = self.status;
        // The device owns DEVICE_NEEDS_RESET; the driver cannot set or clear it.
        let new = (v & !status::DEVICE_NEEDS_RESET) | (old & status::DEVICE_NEEDS_RESET);
        if new & old != old {
            return self.reject("status bits cleared without a reset", reg::STATUS, 4);
        }
        let added = new & !old;
        let needs = |bit: u32, before: u32| added & bit == 0 || new & before != 0;
        if !needs(status::DRIVER, status::ACKNOWLEDGE)
            || !needs(status::FEATURES_OK, status::DRIVER)
            || !needs(status::DRIVER_OK, status::FEATURES_OK)
        {
            return self.reject("status bits out of order", reg::STATUS, 4);
        }
        let mut new = new;
        if added & status::FEATURES_OK != 0 {
            let f = self.driver_features;
            if f & !self.offered() != 0 || f & F_VERSION_1 == 0 {
                // Refused: the driver reads FEATURES_OK back as clear, and a
                // DRIVER_OK set in the same write cannot stand without it.
                tracing::debug!(features = f, "driver features refused");
                new &= !(status::FEATURES_OK | status::DRIVER_OK);
            } else {
                self.dev.ack_features(f);
            }
        }
        self.status = new;
        if new & added & status::DRIVER_OK != 0 {
            tracing::debug!(features = self.driver_features, "virtio-blk driver ready");
            for q in 0..self.queues.len() {
                self.kick(q);
            }
        }
    }

    fn notify(&mut self, v: u32) {
        let q = v as usize;
        if self.status & status::DRIVER_OK == 0 || q >= self.queues.len() {
            return self.reject("QueueNotify", reg::QUEUE_NOTIFY, 4);
        }
        self.kick(q);
    }

    /// Has queue `q` processed: through its notifier, or inline without one.
    fn kick(&mut self, q: usize) {
        match self.notifiers.get(q) {
            Some(Some(fd)) => {
                if let Err(e) = fd.write(1) {
                    tracing::warn!(error = %e, "cannot signal a queue");
                }
            }
            _ => self.process_queue(q),
        }
    }

    /// Back to the state after power-on (the driver wrote 0 to Status).
    pub fn reset(&mut self) {
        for q in &mut self.queues {
            q.reset();
        }
        self.regs.iter_mut().for_each(|r| *r = QueueRegs::default());
        self.queue_sel = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.driver_features = 0;
        self.status = 0;
        self.interrupt_status.clear();
        self.pending = None;
        self.dev.reset();
    }

    fn raise(&mut self, cause: u32) {
        self.interrupt_status.raise(cause);
        self.irq.trigger();
    }

    fn broken(&mut self, why: &str) {
        self.guest_warning("queue unusable; device needs reset", why);
        self.status |= status::DEVICE_NEEDS_RESET;
        self.config_generation = self.config_generation.wrapping_add(1);
        self.raise(INT_CONFIG);
    }

    /// Processes every available request of queue `q` (no-op when the device is
    /// paused, not running, or the queue is not ready).
    pub fn process_queue(&mut self, q: usize) {
        let s = self.status;
        if self.paused || s & status::DRIVER_OK == 0 || s & status::DEVICE_NEEDS_RESET != 0 {
            return;
        }
        if !self.queues.get(q).is_some_and(|x| x.ready()) {
            return;
        }
        if !self.retry_pending() {
            return;
        }
        let mem = self.mem.clone();
        let queue = &mut self.queues[q];
        match self.dev.process_queue(queue, &*mem) {
            Ok(run) => {
                if run.bad_heads > 0 {
                    let n = run.bad_heads.to_string();
                    self.guest_warning(
                        "chains with a head outside the descriptor table skipped",
                        &n,
                    );
                }
                if run.ring_invalid {
                    self.broken("the available index is further ahead than the queue size");
                }
                if let Some(p) = run.stopped {
                    self.pending = Some((q, p));
                    self.paused = true;
                    if let Some(h) = &self.stop_hook {
                        h();
                    }
                }
                if run.notify {
                    self.raise(INT_USED_RING);
                }
            }
            Err(e) => self.broken(&e.to_string()),
        }
    }

    /// Retries a request the error policy stopped on; false if it stopped again.
    fn retry_pending(&mut self) -> bool {
        let Some((q, p)) = self.pending.take() else {
            return true;
        };
        let mem = self.mem.clone();
        match self.dev.retry(&p, &*mem) {
            strata_virtio_blk::Outcome::Done(c) => {
                let queue = &mut self.queues[q];
                let notify = queue
                    .add_used(&*mem, c.head, c.len)
                    .and_then(|_| queue.needs_notification(&*mem));
                match notify {
                    Ok(true) => self.raise(INT_USED_RING),
                    Ok(false) => {}
                    Err(e) => self.broken(&e.to_string()),
                }
                true
            }
            strata_virtio_blk::Outcome::Stopped(p) => {
                self.pending = Some((q, p));
                self.paused = true;
                if let Some(h) = &self.stop_hook {
                    h();
                }
                false
            }
        }
    }

    /// Stops processing requests (the VM is paused). The caller holds the lock, so
    /// no request is in flight once this returns.
    pub fn pause(&mut self) {
        self.paused = true;
    }

    /// Resumes processing: the io-status is cleared, a stopped request is retried and
    /// every queue is looked at again.
    pub fn resume(&mut self) {
        self.paused = false;
        self.dev.reset_io_status();
        for q in 0..self.queues.len() {
            self.kick(q);
        }
    }
}

#[cfg(test)]
mod tests;
