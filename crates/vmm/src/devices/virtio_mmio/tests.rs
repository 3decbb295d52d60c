//! The register file against hostile and out-of-order guest accesses, and one request
//! end to end through a queue in guest memory.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use strata_virtio_blk::{BackendError, DeviceOptions};
use vm_memory::Bytes;

use super::*;
use crate::memory;

struct MemDisk(Mutex<Vec<u8>>);

impl BlockBackend for MemDisk {
    fn size(&self) -> u64 {
        self.0.lock().unwrap().len() as u64
    }
    fn read_only(&self) -> bool {
        false
    }
    fn read(&self, buf: &mut [u8], offset: u64) -> Result<(), BackendError> {
        let d = self.0.lock().unwrap();
        buf.copy_from_slice(&d[offset as usize..offset as usize + buf.len()]);
        Ok(())
    }
    fn write(&self, buf: &[u8], offset: u64) -> Result<(), BackendError> {
        let mut d = self.0.lock().unwrap();
        d[offset as usize..offset as usize + buf.len()].copy_from_slice(buf);
        Ok(())
    }
    fn write_zeroes(&self, offset: u64, len: u64, _unmap: bool) -> Result<(), BackendError> {
        let mut d = self.0.lock().unwrap();
        d[offset as usize..(offset + len) as usize].fill(0);
        Ok(())
    }
    fn discard(&self, offset: u64, len: u64) -> Result<(), BackendError> {
        self.write_zeroes(offset, len, true)
    }
    fn flush(&self) -> Result<(), BackendError> {
        Ok(())
    }
}

#[derive(Default)]
struct CountIrq(AtomicUsize);

impl Interrupt for CountIrq {
    fn trigger(&self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

type T = MmioTransport<Arc<MemDisk>>;

const MEM: u64 = 16 << 20;

fn setup() -> (T, Arc<MemDisk>, Arc<CountIrq>, Arc<GuestMemory>) {
    let disk = Arc::new(MemDisk(Mutex::new(vec![0; 1 << 20])));
    let opts = DeviceOptions {
        queue_size: 16,
        ..DeviceOptions::default()
    };
    let dev = Arc::new(VirtioBlk::new(disk.clone(), opts).unwrap());
    let mem = Arc::new(memory::create(MEM).unwrap());
    let irq = Arc::new(CountIrq::default());
    let t = MmioTransport::new(dev, mem.clone(), irq.clone()).unwrap();
    (t, disk, irq, mem)
}

fn r32(t: &mut T, off: u64) -> u32 {
    let mut b = [0u8; 4];
    t.read(off, &mut b);
    u32::from_le_bytes(b)
}

fn w32(t: &mut T, off: u64, v: u32) {
    t.write(off, &v.to_le_bytes());
}

/// Negotiates VERSION_1 and brings the status to FEATURES_OK.
fn to_features_ok(t: &mut T) {
    w32(t, reg::STATUS, status::ACKNOWLEDGE);
    w32(t, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
    w32(t, reg::DRIVER_FEATURES_SEL, 1);
    w32(t, reg::DRIVER_FEATURES, 1);
    w32(t, reg::DRIVER_FEATURES_SEL, 0);
    w32(t, reg::DRIVER_FEATURES, 0);
    w32(
        t,
        reg::STATUS,
        status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
    );
    assert_ne!(t.status() & status::FEATURES_OK, 0);
}

const DESC: u64 = 0x10_0000;
const AVAIL: u64 = 0x10_1000;
const USED: u64 = 0x10_2000;

fn setup_queue(t: &mut T, desc: u64, avail: u64, used: u64, size: u32) {
    w32(t, reg::QUEUE_SEL, 0);
    w32(t, reg::QUEUE_NUM, size);
    w32(t, reg::QUEUE_DESC_LOW, desc as u32);
    w32(t, reg::QUEUE_DESC_HIGH, (desc >> 32) as u32);
    w32(t, reg::QUEUE_DRIVER_LOW, avail as u32);
    w32(t, reg::QUEUE_DRIVER_HIGH, (avail >> 32) as u32);
    w32(t, reg::QUEUE_DEVICE_LOW, used as u32);
    w32(t, reg::QUEUE_DEVICE_HIGH, (used >> 32) as u32);
    w32(t, reg::QUEUE_READY, 1);
}

#[test]
fn identification_registers_and_access_sizes() {
    let (mut t, ..) = setup();
    assert_eq!(r32(&mut t, reg::MAGIC_VALUE), MAGIC);
    assert_eq!(r32(&mut t, reg::VERSION), 2);
    assert_eq!(r32(&mut t, reg::DEVICE_ID), DEVICE_TYPE_BLOCK);
    assert_eq!(r32(&mut t, reg::QUEUE_NUM_MAX), 16);
    w32(&mut t, reg::DEVICE_FEATURES_SEL, 1);
    assert_eq!(
        r32(&mut t, reg::DEVICE_FEATURES) & 1,
        1,
        "VERSION_1 offered"
    );
    w32(&mut t, reg::DEVICE_FEATURES_SEL, 0xdead_beef);
    assert_eq!(r32(&mut t, reg::DEVICE_FEATURES), 0);
    let before = t.rejected();
    // Wrong sizes and offsets read as zero and are counted.
    let mut b2 = [0xaau8; 2];
    t.read(reg::MAGIC_VALUE, &mut b2);
    assert_eq!(b2, [0, 0]);
    let mut b4 = [0xaau8; 4];
    t.read(reg::MAGIC_VALUE + 1, &mut b4);
    assert_eq!(b4, [0; 4]);
    t.read(0x0f0, &mut b4);
    let mut b3 = [0u8; 3];
    t.read(reg::CONFIG, &mut b3);
    t.write(reg::STATUS, &[1]);
    t.write(reg::STATUS, &[1, 0, 0, 0, 0, 0, 0, 0]);
    w32(&mut t, 0x0f0, 1);
    w32(&mut t, reg::MAGIC_VALUE, 0);
    assert_eq!(t.rejected(), before + 8);
    assert_eq!(t.status(), 0);
    // Config space: any of 1, 2, 4, 8 bytes; capacity of a 1 MiB disk.
    let mut cap = [0u8; 8];
    t.read(reg::CONFIG, &mut cap);
    assert_eq!(u64::from_le_bytes(cap), 2048);
    // Far beyond the config structure reads as zero.
    t.read(0xff8, &mut cap);
    assert_eq!(cap, [0; 8]);
}

#[test]
fn status_machine_refuses_out_of_order_and_cleared_bits() {
    let (mut t, ..) = setup();
    w32(&mut t, reg::STATUS, status::DRIVER);
    assert_eq!(t.status(), 0, "DRIVER without ACKNOWLEDGE");
    w32(&mut t, reg::STATUS, status::ACKNOWLEDGE);
    // Features before DRIVER are refused.
    w32(&mut t, reg::DRIVER_FEATURES, 0xffff_ffff);
    w32(&mut t, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
    w32(
        &mut t,
        reg::STATUS,
        status::ACKNOWLEDGE | status::DRIVER | status::DRIVER_OK,
    );
    assert_eq!(
        t.status() & status::DRIVER_OK,
        0,
        "DRIVER_OK before FEATURES_OK"
    );
    // Without VERSION_1 FEATURES_OK does not stick.
    w32(
        &mut t,
        reg::STATUS,
        status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
    );
    assert_eq!(t.status() & status::FEATURES_OK, 0);
    // Features the device does not offer are refused as a whole.
    w32(&mut t, reg::DRIVER_FEATURES_SEL, 1);
    w32(&mut t, reg::DRIVER_FEATURES, 1 | (1 << 30));
    w32(
        &mut t,
        reg::STATUS,
        status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
    );
    assert_eq!(t.status() & status::FEATURES_OK, 0);
    // DRIVER_OK in the same write as refused features does not stick either.
    w32(
        &mut t,
        reg::STATUS,
        status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK,
    );
    assert_eq!(t.status() & (status::FEATURES_OK | status::DRIVER_OK), 0);
    // A feature word beyond the second is refused unless zero.
    w32(&mut t, reg::DRIVER_FEATURES_SEL, 7);
    let before = t.rejected();
    w32(&mut t, reg::DRIVER_FEATURES, 1);
    assert_eq!(t.rejected(), before + 1);
    to_features_ok(&mut t);
    // Clearing a bit without a reset is refused; the device keeps its state.
    w32(&mut t, reg::STATUS, status::ACKNOWLEDGE);
    assert_ne!(t.status() & status::FEATURES_OK, 0);
    // Features are frozen after FEATURES_OK.
    let before = t.rejected();
    w32(&mut t, reg::DRIVER_FEATURES, 0);
    assert_eq!(t.rejected(), before + 1);
    // The driver cannot set DEVICE_NEEDS_RESET.
    let s = t.status();
    w32(&mut t, reg::STATUS, s | status::DEVICE_NEEDS_RESET);
    assert_eq!(t.status() & status::DEVICE_NEEDS_RESET, 0);
    w32(&mut t, reg::STATUS, 0);
    assert_eq!(t.status(), 0);
}

#[test]
fn hostile_queue_configuration_is_refused() {
    let (mut t, ..) = setup();
    // Queue registers before FEATURES_OK.
    setup_queue(&mut t, DESC, AVAIL, USED, 16);
    assert_eq!(r32(&mut t, reg::QUEUE_READY), 0);
    to_features_ok(&mut t);
    // Sizes: zero, not a power of two, above the maximum, absurd.
    for bad in [0u32, 3, 32, 0x1_0000, u32::MAX] {
        let before = t.rejected();
        w32(&mut t, reg::QUEUE_NUM, bad);
        assert_eq!(t.rejected(), before + 1, "size {bad}");
    }
    // A queue that does not exist.
    w32(&mut t, reg::QUEUE_SEL, 1);
    assert_eq!(r32(&mut t, reg::QUEUE_NUM_MAX), 0);
    let before = t.rejected();
    w32(&mut t, reg::QUEUE_NUM, 8);
    w32(&mut t, reg::QUEUE_READY, 1);
    assert_eq!(t.rejected(), before + 2);
    // Rings outside guest memory, straddling its end, above 4 GiB, misaligned.
    for (d, a, u) in [
        (MEM, AVAIL, USED),
        (DESC, MEM - 8, USED),
        (DESC, AVAIL, MEM - 64),
        (DESC, AVAIL, 0xffff_ffff_ffff_f000),
        (DESC + 8, AVAIL, USED),
        (DESC, AVAIL + 1, USED),
        (DESC, AVAIL, USED + 2),
        (0xd000_0000, AVAIL, USED),
    ] {
        setup_queue(&mut t, d, a, u, 16);
        assert_eq!(r32(&mut t, reg::QUEUE_READY), 0, "{d:#x} {a:#x} {u:#x}");
    }
    setup_queue(&mut t, DESC, AVAIL, USED, 16);
    assert_eq!(r32(&mut t, reg::QUEUE_READY), 1);
    // A ready queue cannot be moved.
    let before = t.rejected();
    w32(&mut t, reg::QUEUE_DESC_LOW, 0);
    assert_eq!(t.rejected(), before + 1);
    w32(
        &mut t,
        reg::STATUS,
        status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK,
    );
    // After DRIVER_OK queue configuration is frozen; notifications of unknown
    // queues are refused.
    let before = t.rejected();
    w32(&mut t, reg::QUEUE_READY, 0);
    w32(&mut t, reg::QUEUE_NOTIFY, 1);
    w32(&mut t, reg::QUEUE_NOTIFY, u32::MAX);
    assert_eq!(t.rejected(), before + 3);
    assert_eq!(r32(&mut t, reg::QUEUE_READY), 1);
    // Writes to the config space without CONFIG_WCE are refused.
    let before = t.rejected();
    t.write(reg::CONFIG + 32, &[0]);
    assert_eq!(t.rejected(), before + 1);
    // Reset clears the queue.
    w32(&mut t, reg::STATUS, 0);
    w32(&mut t, reg::QUEUE_SEL, 0);
    assert_eq!(r32(&mut t, reg::QUEUE_READY), 0);
}

fn desc(mem: &GuestMemory, i: u64, addr: u64, len: u32, flags: u16, next: u16) {
    let base = GuestAddress(DESC + 16 * i);
    mem.write_obj(addr, base).unwrap();
    mem.write_obj(len, base.unchecked_add(8)).unwrap();
    mem.write_obj(flags, base.unchecked_add(12)).unwrap();
    mem.write_obj(next, base.unchecked_add(14)).unwrap();
}

use vm_memory::Address;

#[test]
fn a_write_request_reaches_the_disk_and_raises_the_interrupt() {
    let (mut t, disk, irq, mem) = setup();
    to_features_ok(&mut t);
    setup_queue(&mut t, DESC, AVAIL, USED, 16);
    w32(
        &mut t,
        reg::STATUS,
        status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK,
    );
    // Request header: OUT at sector 2; data 512 bytes; status byte.
    let hdr = 0x20_0000u64;
    mem.write_obj(1u32, GuestAddress(hdr)).unwrap();
    mem.write_obj(2u64, GuestAddress(hdr + 8)).unwrap();
    mem.write_slice(&[0x5a; 512], GuestAddress(0x20_1000))
        .unwrap();
    mem.write_obj(0xffu8, GuestAddress(0x20_2000)).unwrap();
    desc(&mem, 0, hdr, 16, 1, 1);
    desc(&mem, 1, 0x20_1000, 512, 1, 2);
    desc(&mem, 2, 0x20_2000, 1, 2, 0);
    // A second chain whose data lies outside guest memory: answered with IOERR.
    desc(&mem, 3, hdr, 16, 1, 4);
    desc(&mem, 4, MEM + 0x1000, 512, 1, 5);
    desc(&mem, 5, 0x20_3000, 1, 2, 0);
    mem.write_obj(0xffu8, GuestAddress(0x20_3000)).unwrap();
    mem.write_obj(0u16, GuestAddress(AVAIL + 4)).unwrap();
    mem.write_obj(3u16, GuestAddress(AVAIL + 6)).unwrap();
    mem.write_obj(2u16, GuestAddress(AVAIL + 2)).unwrap();
    w32(&mut t, reg::QUEUE_NOTIFY, 0);
    assert_eq!(&disk.0.lock().unwrap()[1024..1536], &[0x5a; 512][..]);
    let st: u8 = mem.read_obj(GuestAddress(0x20_2000)).unwrap();
    assert_eq!(st, 0);
    let st: u8 = mem.read_obj(GuestAddress(0x20_3000)).unwrap();
    assert_eq!(st, strata_virtio_blk::status::IOERR);
    let used_idx: u16 = mem.read_obj(GuestAddress(USED + 2)).unwrap();
    assert_eq!(used_idx, 2);
    assert!(irq.0.load(Ordering::SeqCst) >= 1);
    assert_eq!(
        r32(&mut t, reg::INTERRUPT_STATUS) & INT_USED_RING,
        INT_USED_RING
    );
    // The bus's lock-free path sees the same register, and only at its offsets
    // with 4-byte accesses.
    let isr = t.interrupt_status();
    let mut b = [0u8; 4];
    assert!(isr.try_read(reg::INTERRUPT_STATUS, &mut b));
    assert_eq!(u32::from_le_bytes(b) & INT_USED_RING, INT_USED_RING);
    assert!(!isr.try_read(reg::INTERRUPT_STATUS, &mut [0u8; 2]));
    assert!(!isr.try_read(reg::STATUS, &mut b));
    assert!(!isr.try_write(reg::INTERRUPT_ACK, &[1, 0]));
    assert!(!isr.try_write(reg::STATUS, &[0; 4]));
    assert!(isr.try_write(reg::INTERRUPT_ACK, &INT_USED_RING.to_le_bytes()));
    assert_eq!(r32(&mut t, reg::INTERRUPT_STATUS), 0);
    // While paused nothing is processed; resume processes what was kicked meanwhile.
    disk.0.lock().unwrap()[1024..1536].fill(0);
    mem.write_obj(0u16, GuestAddress(AVAIL + 8)).unwrap();
    mem.write_obj(3u16, GuestAddress(AVAIL + 2)).unwrap();
    t.pause();
    w32(&mut t, reg::QUEUE_NOTIFY, 0);
    let used_idx: u16 = mem.read_obj(GuestAddress(USED + 2)).unwrap();
    assert_eq!(used_idx, 2, "a request ran while paused");
    assert_eq!(&disk.0.lock().unwrap()[1024..1536], &[0u8; 512][..]);
    t.resume();
    let used_idx: u16 = mem.read_obj(GuestAddress(USED + 2)).unwrap();
    assert_eq!(
        used_idx, 3,
        "the request kicked while paused did not run on resume"
    );
    assert_eq!(&disk.0.lock().unwrap()[1024..1536], &[0x5a; 512][..]);
    // An available index far ahead of the ring: no hang, no panic.
    mem.write_obj(0x8000u16, GuestAddress(AVAIL + 2)).unwrap();
    w32(&mut t, reg::QUEUE_NOTIFY, 0);
}

#[test]
fn random_register_garbage_never_panics() {
    let (mut t, ..) = setup();
    let mut x: u64 = 0x1234_5678_9abc_def0;
    for _ in 0..200_000 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let mask = if x & 1 == 0 { !3 } else { !0 };
        let off = ((x >> 8) % 0x140) & mask;
        let len = [1usize, 2, 4, 8][(x >> 40) as usize % 4];
        let v = (x >> 20).to_le_bytes();
        if x & 2 == 0 {
            t.write(off, &v[..len]);
        } else {
            let mut b = [0u8; 8];
            t.read(off, &mut b[..len]);
        }
    }
}

/// Brings `t` to DRIVER_OK with queue 0 of 16 entries at DESC/AVAIL/USED.
fn running(t: &mut T) {
    to_features_ok(t);
    setup_queue(t, DESC, AVAIL, USED, 16);
    w32(
        t,
        reg::STATUS,
        status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK,
    );
}

/// Offers chain heads `heads` on the available ring (after `already` earlier ones) and
/// notifies.
fn offer(t: &mut T, mem: &GuestMemory, already: u16, heads: &[u16]) {
    for (i, h) in heads.iter().enumerate() {
        let slot = (already as u64 + i as u64) % 16;
        mem.write_obj(*h, GuestAddress(AVAIL + 4 + 2 * slot))
            .unwrap();
    }
    mem.write_obj(already + heads.len() as u16, GuestAddress(AVAIL + 2))
        .unwrap();
    w32(t, reg::QUEUE_NOTIFY, 0);
}

fn header(mem: &GuestMemory, at: u64, ty: u32, sector: u64) {
    mem.write_obj(ty, GuestAddress(at)).unwrap();
    mem.write_obj(0u32, GuestAddress(at + 4)).unwrap();
    mem.write_obj(sector, GuestAddress(at + 8)).unwrap();
}

#[test]
fn hostile_chains_get_errors_and_the_device_keeps_serving() {
    let (mut t, disk, _irq, mem) = setup();
    disk.0.lock().unwrap().fill(0x11);
    running(&mut t);
    let hdr = 0x20_0000u64;
    header(&mem, hdr, 1, 0); // OUT sector 0
    mem.write_slice(&[0xee; 4096], GuestAddress(0x20_1000))
        .unwrap();
    // 0: a chain looping on itself (0 -> 1 -> 0).
    desc(&mem, 0, hdr, 16, 1, 1);
    desc(&mem, 1, 0x20_1000, 512, 1, 0);
    // 2: an absurd data length (4 GiB - 1) in guest memory's range start.
    desc(&mem, 2, hdr, 16, 1, 3);
    desc(&mem, 3, 0x20_1000, u32::MAX, 1, 4);
    desc(&mem, 4, 0x20_3000, 1, 2, 0);
    // 5: a write past the end of the 1 MiB disk.
    header(&mem, 0x20_0100, 1, 2048);
    desc(&mem, 5, 0x20_0100, 16, 1, 6);
    desc(&mem, 6, 0x20_1000, 512, 1, 7);
    desc(&mem, 7, 0x20_3001, 1, 2, 0);
    // 8: a "next" index outside the table.
    desc(&mem, 8, hdr, 16, 1, 200);
    // 9: a status descriptor the device may not write (read-only flag).
    desc(&mem, 9, hdr, 16, 1, 10);
    desc(&mem, 10, 0x20_1000, 512, 1, 11);
    desc(&mem, 11, 0x20_3002, 1, 0, 0);
    // Heads outside the table, too.
    mem.write_slice(&[0xff; 3], GuestAddress(0x20_3000))
        .unwrap();
    offer(&mut t, &mem, 0, &[0, 2, 5, 8, 9, 15, 0xffff]);
    assert!(
        disk.0.lock().unwrap().iter().all(|&b| b == 0x11),
        "a malformed request reached the disk"
    );
    let st: [u8; 3] = mem.read_obj(GuestAddress(0x20_3000)).unwrap();
    assert_eq!(st[1], strata_virtio_blk::status::IOERR, "past the end");
    // The device still serves a good request afterwards.
    let used_before: u16 = mem.read_obj(GuestAddress(USED + 2)).unwrap();
    desc(&mem, 12, hdr, 16, 1, 13);
    desc(&mem, 13, 0x20_1000, 512, 1, 14);
    desc(&mem, 14, 0x20_3003, 1, 2, 0);
    let next: u16 = mem.read_obj(GuestAddress(AVAIL + 2)).unwrap();
    offer(&mut t, &mem, next, &[12]);
    let used_after: u16 = mem.read_obj(GuestAddress(USED + 2)).unwrap();
    assert_eq!(used_after, used_before.wrapping_add(1));
    let st: u8 = mem.read_obj(GuestAddress(0x20_3003)).unwrap();
    assert_eq!(st, 0);
    assert_eq!(&disk.0.lock().unwrap()[..512], &[0xee; 512][..]);
    assert_eq!(t.status() & status::DEVICE_NEEDS_RESET, 0);
}

#[test]
fn writes_to_a_read_only_disk_fail_and_change_nothing() {
    let disk = Arc::new(MemDisk(Mutex::new(vec![0x22; 1 << 20])));
    let opts = DeviceOptions {
        queue_size: 16,
        read_only: true,
        ..DeviceOptions::default()
    };
    let dev = Arc::new(VirtioBlk::new(disk.clone(), opts).unwrap());
    let mem = Arc::new(memory::create(MEM).unwrap());
    let mut t = MmioTransport::new(dev, mem.clone(), Arc::new(CountIrq::default())).unwrap();
    running(&mut t);
    let hdr = 0x20_0000u64;
    header(&mem, hdr, 1, 0); // OUT
    header(&mem, hdr + 16, 13, 0); // WRITE_ZEROES
    mem.write_slice(&[0u8; 16], GuestAddress(0x20_2000))
        .unwrap();
    mem.write_obj(8u32, GuestAddress(0x20_2008)).unwrap();
    desc(&mem, 0, hdr, 16, 1, 1);
    desc(&mem, 1, 0x20_1000, 512, 1, 2);
    desc(&mem, 2, 0x20_3000, 1, 2, 0);
    desc(&mem, 3, hdr + 16, 16, 1, 4);
    desc(&mem, 4, 0x20_2000, 16, 1, 5);
    desc(&mem, 5, 0x20_3001, 1, 2, 0);
    mem.write_slice(&[0xff; 2], GuestAddress(0x20_3000))
        .unwrap();
    offer(&mut t, &mem, 0, &[0, 3]);
    let st: [u8; 2] = mem.read_obj(GuestAddress(0x20_3000)).unwrap();
    assert_ne!(st[0], 0, "write to a read-only disk succeeded");
    assert_ne!(st[1], 0, "write-zeroes on a read-only disk succeeded");
    assert!(disk.0.lock().unwrap().iter().all(|&b| b == 0x22));
    // VIRTIO_BLK_F_RO is offered.
    w32(&mut t, reg::DEVICE_FEATURES_SEL, 0);
    assert_ne!(r32(&mut t, reg::DEVICE_FEATURES) & (1 << 5), 0);
}

#[test]
fn an_available_index_far_ahead_needs_a_reset_and_is_not_retried() {
    let (mut t, disk, irq, mem) = setup();
    running(&mut t);
    let hdr = 0x20_0000u64;
    header(&mem, hdr, 0, 0); // IN sector 0
    desc(&mem, 0, hdr, 16, 1, 1);
    desc(&mem, 1, 0x20_1000, 512, 3, 2);
    desc(&mem, 2, 0x20_3000, 1, 2, 0);
    // Every slot holds a valid head, but the index says 1000 entries are available.
    for slot in 0..16u64 {
        mem.write_obj(0u16, GuestAddress(AVAIL + 4 + 2 * slot))
            .unwrap();
    }
    mem.write_obj(1000u16, GuestAddress(AVAIL + 2)).unwrap();
    let irqs = irq.0.load(Ordering::SeqCst);
    w32(&mut t, reg::QUEUE_NOTIFY, 0);
    assert_ne!(t.status() & status::DEVICE_NEEDS_RESET, 0);
    assert_eq!(r32(&mut t, reg::INTERRUPT_STATUS) & INT_CONFIG, INT_CONFIG);
    assert_eq!(irq.0.load(Ordering::SeqCst), irqs + 1);
    let used: u16 = mem.read_obj(GuestAddress(USED + 2)).unwrap();
    assert_eq!(used, 0, "nothing is taken from a broken ring");
    // Kicking again and again: nothing is processed, nothing more is warned about.
    for _ in 0..1000 {
        w32(&mut t, reg::QUEUE_NOTIFY, 0);
    }
    assert_eq!(t.guest_warnings(), 1);
    assert_eq!(irq.0.load(Ordering::SeqCst), irqs + 1);
    // A reset brings it back.
    w32(&mut t, reg::STATUS, 0);
    assert_eq!(t.status(), 0);
    mem.write_obj(0u16, GuestAddress(AVAIL + 2)).unwrap();
    mem.write_obj(0xeeu8, GuestAddress(0x20_3000)).unwrap();
    running(&mut t);
    assert_eq!(t.status() & status::DEVICE_NEEDS_RESET, 0);
    disk.0.lock().unwrap()[..512].fill(0x77);
    offer(&mut t, &mem, 0, &[0]);
    let st: u8 = mem.read_obj(GuestAddress(0x20_3000)).unwrap();
    assert_eq!(st, 0);
    let mut data = [0u8; 512];
    mem.read_slice(&mut data, GuestAddress(0x20_1000)).unwrap();
    assert_eq!(data, [0x77; 512]);
}

#[test]
fn repeated_bad_heads_are_counted_and_the_device_keeps_serving() {
    let (mut t, _disk, _irq, mem) = setup();
    running(&mut t);
    let mut next = 0u16;
    for _ in 0..500 {
        offer(&mut t, &mem, next, &[200]);
        next = next.wrapping_add(1);
    }
    assert_eq!(t.guest_warnings(), 500);
    assert_eq!(t.status() & status::DEVICE_NEEDS_RESET, 0);
    let used: u16 = mem.read_obj(GuestAddress(USED + 2)).unwrap();
    assert_eq!(used, 0);
    let hdr = 0x20_0000u64;
    header(&mem, hdr, 0, 0);
    desc(&mem, 0, hdr, 16, 1, 1);
    desc(&mem, 1, 0x20_1000, 512, 3, 2);
    desc(&mem, 2, 0x20_3000, 1, 2, 0);
    mem.write_obj(0xeeu8, GuestAddress(0x20_3000)).unwrap();
    offer(&mut t, &mem, next, &[0]);
    let st: u8 = mem.read_obj(GuestAddress(0x20_3000)).unwrap();
    assert_eq!(st, 0);
    let used: u16 = mem.read_obj(GuestAddress(USED + 2)).unwrap();
    assert_eq!(used, 1);
}
