//! A virtio-blk disk on a Strata block node: the device, its virtio-mmio window, the
//! irqfd for its GSI and one ioeventfd per queue on `QueueNotify`, and the event-loop
//! handler that processes a queue when its ioeventfd fires.

use std::sync::{Arc, Mutex};

use event_manager::{EventOps, Events, MutEventSubscriber};
use kvm_ioctls::{IoEventAddress, VmFd};
use strata_block::BlockNode;
use strata_virtio_blk::{DeviceOptions, ErrorAction, ErrorEvent, ErrorSink, VirtioBlk};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::virtio_mmio::{reg, MmioTransport};
use crate::layout::{virtio_mmio_addr, virtio_mmio_gsi};
use crate::memory::GuestMemory;
use crate::vm::EventSlot;

/// Sends a disk's failed requests to the monitors as `BLOCK_IO_ERROR`.
struct IoErrorEvents {
    device: String,
    node: String,
    events: EventSlot,
}

impl ErrorSink for IoErrorEvents {
    fn io_error(&self, e: ErrorEvent) {
        if let Some(sender) = self.events.get() {
            sender.emit(
                "BLOCK_IO_ERROR",
                Some(serde_json::json!({
                    "qom-path": format!("/machine/peripheral/{}/virtio-backend", self.device),
                    "device": self.device,
                    "node-name": self.node,
                    "operation": e.operation,
                    "action": e.action,
                    "nospace": e.nospace,
                    "reason": e.reason,
                })),
            );
        }
    }
}

/// The transport type of every disk.
pub type BlkTransport = MmioTransport<Arc<BlockNode>>;

/// How one disk is set up.
#[derive(Debug, Clone)]
pub struct DiskConfig {
    /// The device id (`--drive id=` or `--device ...,id=`).
    pub id: String,
    /// The node the guest's requests go to.
    pub node: Arc<BlockNode>,
    /// Refuse guest writes.
    pub read_only: bool,
    /// Number of request queues.
    pub num_queues: u16,
    /// Size of each queue.
    pub queue_size: u16,
    /// `GET_ID` serial.
    pub serial: String,
    /// Start with the write cache off (a flush after every write).
    pub writethrough: bool,
    /// Error policy for writes.
    pub werror: ErrorAction,
    /// Error policy for reads.
    pub rerror: ErrorAction,
}

/// A disk attached to the VM.
pub struct Disk {
    /// Its configuration.
    pub config: DiskConfig,
    /// The register window (shared with the vCPUs through the bus).
    pub transport: Arc<Mutex<BlkTransport>>,
    /// Guest physical address of the window.
    pub addr: u64,
    /// Its interrupt line.
    pub gsi: u32,
    queue_fds: Vec<EventFd>,
}

impl std::fmt::Debug for Disk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Disk")
            .field("id", &self.config.id)
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

/// Errors creating a disk.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    /// Invalid device options.
    #[error("disk '{0}': {1}")]
    Options(String, String),
    /// An eventfd or KVM registration failed.
    #[error("disk '{0}': {1}")]
    Setup(String, String),
}

impl Disk {
    /// Creates disk number `index`, wires its interrupt and notifications into `vm`
    /// and its I/O errors to the monitors behind `events`.
    pub fn new(
        vm: &VmFd,
        mem: Arc<GuestMemory>,
        index: usize,
        config: DiskConfig,
        events: EventSlot,
    ) -> Result<Disk, DiskError> {
        let id = config.id.clone();
        let setup = |e: &dyn std::fmt::Display| DiskError::Setup(id.clone(), e.to_string());
        if config.read_only && !config.node.read_only() {
            tracing::debug!(disk = %id, "read-only device on a writable node");
        }
        let opts = DeviceOptions {
            serial: config.serial.clone(),
            num_queues: config.num_queues,
            queue_size: config.queue_size,
            read_only: config.read_only,
            ..DeviceOptions::default()
        };
        let dev = VirtioBlk::new(config.node.clone(), opts)
            .map_err(|e| DiskError::Options(id.clone(), e))?
            .with_writethrough(config.writethrough)
            .with_error_policy(config.werror, config.rerror)
            .with_error_sink(Arc::new(IoErrorEvents {
                device: id.clone(),
                node: config.node.name().to_string(),
                events,
            }));
        let addr = virtio_mmio_addr(index);
        let gsi = virtio_mmio_gsi(index);
        let irq = EventFd::new(EFD_NONBLOCK).map_err(|e| setup(&e))?;
        vm.register_irqfd(&irq, gsi).map_err(|e| setup(&e))?;
        let mut transport =
            MmioTransport::new(Arc::new(dev), mem, Arc::new(irq)).map_err(|e| setup(&e))?;
        let mut queue_fds = Vec::new();
        let mut notifiers = Vec::new();
        for q in 0..u32::from(config.num_queues) {
            let fd = EventFd::new(EFD_NONBLOCK).map_err(|e| setup(&e))?;
            vm.register_ioevent(&fd, &IoEventAddress::Mmio(addr + reg::QUEUE_NOTIFY), q)
                .map_err(|e| setup(&e))?;
            notifiers.push(fd.try_clone().map_err(|e| setup(&e))?);
            queue_fds.push(fd);
        }
        transport.set_notifiers(notifiers);
        Ok(Disk {
            config,
            transport: Arc::new(Mutex::new(transport)),
            addr,
            gsi,
            queue_fds,
        })
    }

    /// The event-loop handler for this disk's queues.
    pub fn queue_handler(&self) -> Result<QueueHandler, std::io::Error> {
        Ok(QueueHandler {
            transport: self.transport.clone(),
            fds: self
                .queue_fds
                .iter()
                .map(EventFd::try_clone)
                .collect::<Result<_, _>>()?,
        })
    }
}

/// Processes a disk's queues when their ioeventfds fire.
pub struct QueueHandler {
    transport: Arc<Mutex<BlkTransport>>,
    fds: Vec<EventFd>,
}

impl MutEventSubscriber for QueueHandler {
    fn init(&mut self, ops: &mut EventOps) {
        for (q, fd) in self.fds.iter().enumerate() {
            if let Err(e) = ops.add(Events::with_data(fd, q as u32, EventSet::IN)) {
                tracing::error!(queue = q, error = ?e, "cannot watch a queue notifier");
            }
        }
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        let q = events.data() as usize;
        if let Some(fd) = self.fds.get(q) {
            // Nonblocking: several notifications collapse into one pass.
            let _ = fd.read();
            self.transport
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .process_queue(q);
        }
    }
}
