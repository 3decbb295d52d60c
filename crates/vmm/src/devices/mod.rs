//! The emulated devices and the buses the vCPUs reach them through.
//!
//! * [`serial`]: COM1 (8250 UART from `vm-superio`);
//! * [`power`]: the ACPI sleep/reset registers;
//! * [`ged`]: the ACPI Generic Event Device (power button events);
//! * [`virtio_mmio`]: the virtio-mmio transport with a virtio-blk device;
//! * [`block`]: building a disk (device, irqfd, ioeventfds) on a block node and the
//!   event-loop handler that processes its queues.
//!
//! [`Bus`] dispatches port and MMIO exits by fixed address ranges from
//! [`crate::layout`]; accesses nobody decodes read as all ones and are dropped.

pub mod block;
pub mod ged;
pub mod power;
pub mod serial;
pub mod virtio_mmio;

use std::sync::{Arc, Mutex};

use crate::layout::{GED_MMIO_ADDR, GED_MMIO_SIZE, VIRTIO_MMIO_BASE, VIRTIO_MMIO_SIZE};
use block::BlkTransport;
use power::PowerEvent;
use serial::SerialDevice;
use virtio_mmio::InterruptStatus;

/// Every device a vCPU can reach.
pub struct Bus {
    /// COM1.
    pub serial: SerialDevice,
    /// virtio-mmio device `i` at `layout::virtio_mmio_addr(i)`.
    pub mmio: Vec<MmioSlot>,
    /// Guest memory (for vCPU resets).
    pub memory: Arc<crate::memory::GuestMemory>,
    /// The ACPI Generic Event Device at `layout::GED_MMIO_ADDR`.
    pub ged: Arc<ged::Ged>,
}

/// One virtio-mmio window on the bus.
#[derive(Clone)]
pub struct MmioSlot {
    /// The transport (every register but the two below).
    pub transport: Arc<Mutex<BlkTransport>>,
    /// `InterruptStatus` / `InterruptACK`, served without the transport's lock.
    pub isr: Arc<InterruptStatus>,
}

impl MmioSlot {
    /// The window of `transport`.
    pub fn new(transport: Arc<Mutex<BlkTransport>>) -> MmioSlot {
        let isr = lock(&transport).interrupt_status();
        MmioSlot { transport, isr }
    }
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bus")
            .field("mmio", &self.mmio.len())
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Bus {
    /// A guest `in`.
    pub fn pio_read(&self, port: u16, data: &mut [u8]) {
        if SerialDevice::decodes(port) {
            self.serial.read(port, data);
        } else if power::decodes(port) {
            power::read(port, data);
        } else {
            data.fill(0xff);
        }
    }

    /// A guest `out`; returns a power event if the guest asked for one.
    pub fn pio_write(&self, port: u16, data: &[u8]) -> Option<PowerEvent> {
        if SerialDevice::decodes(port) {
            self.serial.write(port, data);
        } else if power::decodes(port) {
            return power::write(port, data);
        }
        None
    }

    /// The device and offset an MMIO access falls on, if the whole access fits in
    /// one device window.
    fn mmio_target(&self, addr: u64, len: usize) -> Option<(&MmioSlot, u64)> {
        let rel = addr.checked_sub(VIRTIO_MMIO_BASE)?;
        let index = usize::try_from(rel / VIRTIO_MMIO_SIZE).ok()?;
        let off = rel % VIRTIO_MMIO_SIZE;
        if off + len as u64 > VIRTIO_MMIO_SIZE {
            return None;
        }
        self.mmio.get(index).map(|d| (d, off))
    }

    /// The offset into the GED's window of an access that fits in it.
    fn ged_offset(addr: u64, len: usize) -> Option<u64> {
        let off = addr.checked_sub(GED_MMIO_ADDR)?;
        (off.checked_add(len as u64)? <= GED_MMIO_SIZE).then_some(off)
    }

    /// A guest MMIO read.
    pub fn mmio_read(&self, addr: u64, data: &mut [u8]) {
        if let Some(off) = Self::ged_offset(addr, data.len()) {
            return self.ged.read(off, data);
        }
        match self.mmio_target(addr, data.len()) {
            Some((d, off)) => {
                if !d.isr.try_read(off, data) {
                    lock(&d.transport).read(off, data);
                }
            }
            None => data.fill(0xff),
        }
    }

    /// A guest MMIO write.
    pub fn mmio_write(&self, addr: u64, data: &[u8]) {
        if let Some(off) = Self::ged_offset(addr, data.len()) {
            return self.ged.write(off, data);
        }
        if let Some((d, off)) = self.mmio_target(addr, data.len()) {
            if !d.isr.try_write(off, data) {
                lock(&d.transport).write(off, data);
            }
        }
    }
}
