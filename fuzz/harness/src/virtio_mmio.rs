//! Fuzz target `virtio_mmio`: strata-vm's virtio-mmio register file driven by a
//! hostile guest.
//!
//! The input decodes (with `arbitrary`) into a script of guest actions: register reads
//! and writes of any size at any offset, a driver's whole set-up sequence for a queue
//! (so that the fuzzer reaches request processing quickly), stores into guest memory,
//! queue processing, device reset, pause and resume. The transport sits on a 64 KiB
//! in-memory disk (read-only when the first byte says so) and 1 MiB of guest memory.
//! Invariants: no panic; the identity registers never change; the device never sends
//! the disk a range outside its capacity and never changes a read-only disk (the
//! disk checks both); and the disk changes only on an action that may process
//! requests (a queue notify, processing, resume).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use arbitrary::{Arbitrary, Unstructured};
use strata_virtio_blk::{DeviceOptions, VirtioBlk};
use strata_vm::devices::virtio_mmio::{
    reg, status, Interrupt, MmioTransport, DEVICE_TYPE_BLOCK, MAGIC, VENDOR,
};
use strata_vm::memory::GuestMemory;
use vm_memory::{Bytes, GuestAddress};

use crate::disk::MemDisk;

const MEM: u64 = 1 << 20;
const DISK: usize = 64 << 10;

#[derive(Debug, Arbitrary)]
enum Action {
    Read { offset: u16, size: u8 },
    Write { offset: u16, size: u8, value: u64 },
    Setup(Setup),
    Store { addr: u32, bytes: Vec<u8> },
    Process { queue: u8 },
    Reset,
    Pause,
    Resume,
}

/// A driver's initialisation of one queue, with values the fuzzer picks.
#[derive(Debug, Arbitrary)]
struct Setup {
    queue: u8,
    size: u16,
    desc: u32,
    driver: u32,
    device: u32,
    features: u64,
}

#[derive(Default)]
struct Irq(AtomicU64);

impl Interrupt for Irq {
    fn trigger(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
}

type Transport = MmioTransport<Arc<MemDisk>>;

fn read32(t: &mut Transport, offset: u64) -> u32 {
    let mut b = [0u8; 4];
    t.read(offset, &mut b);
    u32::from_le_bytes(b)
}

fn write32(t: &mut Transport, offset: u64, v: u32) {
    t.write(offset, &v.to_le_bytes());
}

fn setup(t: &mut Transport, s: &Setup) {
    write32(t, reg::STATUS, 0);
    write32(t, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
    for sel in 0..2u32 {
        write32(t, reg::DRIVER_FEATURES_SEL, sel);
        write32(t, reg::DRIVER_FEATURES, (s.features >> (32 * sel)) as u32);
    }
    write32(
        t,
        reg::STATUS,
        status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
    );
    write32(t, reg::QUEUE_SEL, u32::from(s.queue % 4));
    write32(t, reg::QUEUE_NUM, u32::from(s.size));
    // Ring addresses inside guest memory most of the time, anywhere sometimes.
    let addr = |a: u32| {
        if a & 1 == 0 {
            u64::from(a) % MEM
        } else {
            u64::from(a)
        }
    };
    for (low, v) in [
        (reg::QUEUE_DESC_LOW, addr(s.desc)),
        (reg::QUEUE_DRIVER_LOW, addr(s.driver)),
        (reg::QUEUE_DEVICE_LOW, addr(s.device)),
    ] {
        write32(t, low, v as u32);
        write32(t, low + 4, (v >> 32) as u32);
    }
    write32(t, reg::QUEUE_READY, 1);
    write32(
        t,
        reg::STATUS,
        status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK,
    );
}

/// The `virtio_mmio` target.
pub fn virtio_mmio(data: &[u8]) {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let read_only = flags & 1 != 0;
    let disk = Arc::new(MemDisk::new(DISK, read_only));
    let opts = DeviceOptions {
        queue_size: 16,
        num_queues: 1 + u16::from(flags >> 1 & 1),
        read_only,
        max_dwz_segments: 4,
        ..DeviceOptions::default()
    };
    let Ok(dev) = VirtioBlk::new(disk.clone(), opts) else {
        return;
    };
    let Ok(mem) = GuestMemory::from_ranges(&[(GuestAddress(0), MEM as usize)]) else {
        return;
    };
    let mem = Arc::new(mem);
    let irq = Arc::new(Irq::default());
    let Ok(mut t) = MmioTransport::new(Arc::new(dev), mem.clone(), irq) else {
        return;
    };
    let mut u = Unstructured::new(rest);
    let mut steps = 0;
    while !u.is_empty() && steps < 256 {
        steps += 1;
        let Ok(action) = Action::arbitrary(&mut u) else {
            break;
        };
        let before = disk.changes();
        let may_process = match &action {
            Action::Read { offset, size } => {
                let mut buf = vec![0u8; usize::from(*size % 9)];
                t.read(u64::from(*offset), &mut buf);
                false
            }
            Action::Write {
                offset,
                size,
                value,
            } => {
                let n = usize::from(*size % 9);
                t.write(u64::from(*offset), &value.to_le_bytes()[..n]);
                u64::from(*offset) == reg::QUEUE_NOTIFY
            }
            Action::Setup(s) => {
                setup(&mut t, s);
                false
            }
            Action::Store { addr, bytes } => {
                let n = bytes.len().min(512);
                let _ = mem.write_slice(&bytes[..n], GuestAddress(u64::from(*addr) % MEM));
                false
            }
            Action::Process { queue } => {
                t.process_queue(usize::from(*queue % 4));
                true
            }
            Action::Reset => {
                t.reset();
                false
            }
            Action::Pause => {
                t.pause();
                false
            }
            Action::Resume => {
                t.resume();
                true
            }
        };
        if !may_process {
            assert!(
                disk.changes() == before,
                "the disk changed on {action:?}, which processes no request"
            );
        }
        assert_eq!(read32(&mut t, reg::MAGIC_VALUE), MAGIC);
        assert_eq!(read32(&mut t, reg::VERSION), 2);
        assert_eq!(read32(&mut t, reg::DEVICE_ID), DEVICE_TYPE_BLOCK);
        assert_eq!(read32(&mut t, reg::VENDOR_ID), VENDOR);
    }
}
