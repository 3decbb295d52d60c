//! Unit tests on virtio-queue's mock split queue, including hostile chains.

use std::sync::{Arc, Mutex};

use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::backend::{BackendError, BlockBackend};
use crate::config::{features, BlkConfig, DeviceOptions, CONFIG_SIZE};
use crate::device::{ErrorAction, ErrorEvent, ErrorSink, IoStatus, Outcome, VirtioBlk};
use crate::status;

const NEXT: u16 = 1;
const WRITE: u16 = 2;
const INDIRECT: u16 = 4;
const DISK: u64 = 1 << 20;
const MEM: usize = 16 << 20;

/// Failure injection for the in-memory disk.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Fail {
    None,
    Io,
    NoSpace,
}

struct MemDisk {
    data: Mutex<Vec<u8>>,
    ro: bool,
    fail: Mutex<Fail>,
    ops: Mutex<Vec<String>>,
}

impl MemDisk {
    fn new(ro: bool) -> Arc<Self> {
        let data = (0..DISK).map(|i| (i % 251) as u8).collect();
        Arc::new(MemDisk {
            data: Mutex::new(data),
            ro,
            fail: Mutex::new(Fail::None),
            ops: Mutex::new(Vec::new()),
        })
    }
    fn check(&self) -> Result<(), BackendError> {
        match *self.fail.lock().unwrap() {
            Fail::None => Ok(()),
            Fail::Io => Err(BackendError::io("Input/output error")),
            Fail::NoSpace => Err(BackendError {
                message: "No space left on device".into(),
                no_space: true,
            }),
        }
    }
}

impl BlockBackend for MemDisk {
    fn size(&self) -> u64 {
        DISK
    }
    fn read_only(&self) -> bool {
        self.ro
    }
    fn read(&self, buf: &mut [u8], offset: u64) -> Result<(), BackendError> {
        self.check()?;
        let o = offset as usize;
        buf.copy_from_slice(&self.data.lock().unwrap()[o..o + buf.len()]);
        Ok(())
    }
    fn write(&self, buf: &[u8], offset: u64) -> Result<(), BackendError> {
        self.check()?;
        let o = offset as usize;
        self.data.lock().unwrap()[o..o + buf.len()].copy_from_slice(buf);
        Ok(())
    }
    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> Result<(), BackendError> {
        self.check()?;
        self.ops
            .lock()
            .unwrap()
            .push(format!("wz {offset} {len} {unmap}"));
        let o = offset as usize;
        self.data.lock().unwrap()[o..o + len as usize].fill(0);
        Ok(())
    }
    fn discard(&self, offset: u64, len: u64) -> Result<(), BackendError> {
        self.check()?;
        self.ops
            .lock()
            .unwrap()
            .push(format!("discard {offset} {len}"));
        Ok(())
    }
    fn flush(&self) -> Result<(), BackendError> {
        self.check()?;
        self.ops.lock().unwrap().push("flush".into());
        Ok(())
    }
}

fn mem() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM), (GuestAddress(0x3000_0000), 1 << 20)])
        .unwrap()
}

fn dev(disk: &Arc<MemDisk>) -> VirtioBlk<Arc<MemDisk>> {
    let opts = DeviceOptions {
        serial: "strata-serial".into(),
        queue_size: 16,
        max_dwz_segments: 2,
        ..DeviceOptions::default()
    };
    VirtioBlk::new(disk.clone(), opts).unwrap()
}

fn d(addr: u64, len: u32, flags: u16) -> RawDescriptor {
    RawDescriptor::from(SplitDescriptor::new(addr, len, flags, 0))
}

fn dn(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
    RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next))
}

const HDR: u64 = 0x10_0000;
const DATA: u64 = 0x20_0000;
const STATUS: u64 = 0x30_0000;

fn header(m: &GuestMemoryMmap, ty: u32, sector: u64) {
    m.write_obj(ty, GuestAddress(HDR)).unwrap();
    m.write_obj(0u32, GuestAddress(HDR + 4)).unwrap();
    m.write_obj(sector, GuestAddress(HDR + 8)).unwrap();
    m.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
}

/// Runs one chain built by the mock (NEXT flags filled in) and returns (status, used len).
fn run(dev: &VirtioBlk<Arc<MemDisk>>, m: &GuestMemoryMmap, descs: &[RawDescriptor]) -> (u8, u32) {
    let q = MockSplitQueue::new(m, 16);
    let chain = q.build_desc_chain(descs).unwrap();
    match dev.process_chain(chain, 16) {
        Outcome::Done(c) => (m.read_obj::<u8>(GuestAddress(STATUS)).unwrap(), c.len),
        Outcome::Stopped(_) => panic!("unexpected stop"),
    }
}

#[test]
fn write_then_read_roundtrip() {
    let m = mem();
    let disk = MemDisk::new(false);
    let dev = dev(&disk);
    header(&m, 1, 8);
    let pattern: Vec<u8> = (0..1024u32).map(|i| (i * 7) as u8).collect();
    m.write_slice(&pattern[..512], GuestAddress(DATA)).unwrap();
    m.write_slice(&pattern[512..], GuestAddress(DATA + 0x1000))
        .unwrap();
    let (st, len) = run(
        &dev,
        &m,
        &[
            d(HDR, 16, 0),
            d(DATA, 512, 0),
            d(DATA + 0x1000, 512, 0),
            d(STATUS, 1, WRITE),
        ],
    );
    assert_eq!((st, len), (status::OK, 1));
    assert_eq!(&disk.data.lock().unwrap()[4096..5120], &pattern[..]);

    header(&m, 0, 8);
    m.write_slice(&[0u8; 1024], GuestAddress(DATA)).unwrap();
    let (st, len) = run(
        &dev,
        &m,
        &[d(HDR, 16, 0), d(DATA, 1024, WRITE), d(STATUS, 1, WRITE)],
    );
    assert_eq!((st, len), (status::OK, 1025));
    let mut back = vec![0u8; 1024];
    m.read_slice(&mut back, GuestAddress(DATA)).unwrap();
    assert_eq!(back, pattern);
}

#[test]
fn header_split_and_status_sharing_data_descriptor() {
    let m = mem();
    let disk = MemDisk::new(false);
    let dev = dev(&disk);
    header(&m, 0, 1);
    // Header in two pieces, data and status in one writable descriptor.
    m.write_obj(0xffu8, GuestAddress(DATA + 512)).unwrap();
    let q = MockSplitQueue::new(&m, 16);
    let chain = q
        .build_desc_chain(&[d(HDR, 5, 0), d(HDR + 5, 11, 0), d(DATA, 513, WRITE)])
        .unwrap();
    let Outcome::Done(c) = dev.process_chain(chain, 16) else {
        panic!()
    };
    assert_eq!(c.len, 513);
    assert_eq!(m.read_obj::<u8>(GuestAddress(DATA + 512)).unwrap(), 0);
    let mut back = vec![0u8; 512];
    m.read_slice(&mut back, GuestAddress(DATA)).unwrap();
    assert_eq!(&back[..], &disk.data.lock().unwrap()[512..1024]);
}

#[test]
fn out_of_range_and_misaligned() {
    let m = mem();
    let disk = MemDisk::new(false);
    let dev = dev(&disk);
    let descs = [d(HDR, 16, 0), d(DATA, 512, WRITE), d(STATUS, 1, WRITE)];
    header(&m, 0, DISK / 512);
    assert_eq!(run(&dev, &m, &descs), (status::IOERR, 1));
    header(&m, 0, DISK / 512 - 1);
    assert_eq!(run(&dev, &m, &descs), (status::OK, 513));
    header(&m, 0, u64::MAX);
    assert_eq!(run(&dev, &m, &descs), (status::IOERR, 1));
    header(&m, 1, u64::MAX / 512);
    assert_eq!(
        run(
            &dev,
            &m,
            &[d(HDR, 16, 0), d(DATA, 512, 0), d(STATUS, 1, WRITE)]
        ),
        (status::IOERR, 1)
    );
    header(&m, 0, 0);
    assert_eq!(
        run(
            &dev,
            &m,
            &[d(HDR, 16, 0), d(DATA, 100, WRITE), d(STATUS, 1, WRITE)]
        ),
        (status::IOERR, 1)
    );
}

#[test]
fn logical_block_size_alignment() {
    let m = mem();
    let disk = MemDisk::new(false);
    let opts = DeviceOptions {
        logical_block_size: 4096,
        ..DeviceOptions::default()
    };
    let dev = VirtioBlk::new(disk.clone(), opts).unwrap();
    let descs = [d(HDR, 16, 0), d(DATA, 4096, WRITE), d(STATUS, 1, WRITE)];
    header(&m, 0, 1);
    assert_eq!(run(&dev, &m, &descs), (status::IOERR, 1));
    header(&m, 0, 8);
    assert_eq!(run(&dev, &m, &descs), (status::OK, 4097));
    assert_eq!(dev.config().blk_size, 4096);
}

#[test]
fn read_only_refuses_writes() {
    let m = mem();
    let disk = MemDisk::new(true);
    let dev = dev(&disk);
    assert!(dev.features() & (1 << features::RO) != 0);
    assert!(dev.features() & (1 << features::DISCARD) == 0);
    let before = disk.data.lock().unwrap().clone();
    header(&m, 1, 0);
    assert_eq!(
        run(
            &dev,
            &m,
            &[d(HDR, 16, 0), d(DATA, 512, 0), d(STATUS, 1, WRITE)]
        ),
        (status::IOERR, 1)
    );
    header(&m, 13, 0);
    m.write_obj([0u8; 16], GuestAddress(DATA)).unwrap();
    assert_eq!(
        run(
            &dev,
            &m,
            &[d(HDR, 16, 0), d(DATA, 16, 0), d(STATUS, 1, WRITE)]
        ),
        (status::UNSUPP, 1)
    );
    assert_eq!(*disk.data.lock().unwrap(), before);
    header(&m, 0, 0);
    assert_eq!(
        run(
            &dev,
            &m,
            &[d(HDR, 16, 0), d(DATA, 512, WRITE), d(STATUS, 1, WRITE)]
        ),
        (status::OK, 513)
    );
}

#[test]
fn unsupported_types() {
    let m = mem();
    let disk = MemDisk::new(false);
    let dev = dev(&disk);
    for ty in [2u32, 10, 14, 15, 0x8000_0000, u32::MAX] {
        header(&m, ty, 0);
        assert_eq!(
            run(&dev, &m, &[d(HDR, 16, 0), d(STATUS, 1, WRITE)]),
            (status::UNSUPP, 1),
            "type {ty}"
        );
    }
}

#[test]
fn flush_and_get_id() {
    let m = mem();
    let disk = MemDisk::new(false);
    let dev = dev(&disk);
    header(&m, 4, 0);
    assert_eq!(
        run(&dev, &m, &[d(HDR, 16, 0), d(STATUS, 1, WRITE)]),
        (status::OK, 1)
    );
    assert_eq!(disk.ops.lock().unwrap().as_slice(), ["flush"]);
    header(&m, 8, 0);
    assert_eq!(
        run(
            &dev,
            &m,
            &[d(HDR, 16, 0), d(DATA, 64, WRITE), d(STATUS, 1, WRITE)]
        ),
        (status::OK, 21)
    );
    let mut id = [0u8; 20];
    m.read_slice(&mut id, GuestAddress(DATA)).unwrap();
    assert_eq!(&id[..13], b"strata-serial");
    assert_eq!(&id[13..], &[0; 7]);
    // A short buffer gets a truncated id.
    header(&m, 8, 0);
    assert_eq!(
        run(
            &dev,
            &m,
            &[d(HDR, 16, 0), d(DATA, 4, WRITE), d(STATUS, 1, WRITE)]
        ),
        (status::OK, 5)
    );
}

fn dwz_seg(m: &GuestMemoryMmap, at: u64, sector: u64, num: u32, flags: u32) {
    m.write_obj(sector, GuestAddress(at)).unwrap();
    m.write_obj(num, GuestAddress(at + 8)).unwrap();
    m.write_obj(flags, GuestAddress(at + 12)).unwrap();
}

#[test]
fn discard_and_write_zeroes() {
    let m = mem();
    let disk = MemDisk::new(false);
    let dev = dev(&disk);
    let one = [d(HDR, 16, 0), d(DATA, 16, 0), d(STATUS, 1, WRITE)];
    header(&m, 11, 0);
    dwz_seg(&m, DATA, 8, 16, 0);
    assert_eq!(run(&dev, &m, &one), (status::OK, 1));
    header(&m, 13, 0);
    dwz_seg(&m, DATA, 16, 8, 1);
    assert_eq!(run(&dev, &m, &one), (status::OK, 1));
    assert!(disk.data.lock().unwrap()[8192..12288]
        .iter()
        .all(|&b| b == 0));
    // Two segments in one request.
    header(&m, 13, 0);
    dwz_seg(&m, DATA, 0, 1, 0);
    dwz_seg(&m, DATA + 16, 2, 1, 0);
    assert_eq!(
        run(
            &dev,
            &m,
            &[d(HDR, 16, 0), d(DATA, 32, 0), d(STATUS, 1, WRITE)]
        ),
        (status::OK, 1)
    );
    assert_eq!(
        disk.ops.lock().unwrap().as_slice(),
        [
            "discard 4096 8192",
            "wz 8192 4096 true",
            "wz 0 512 false",
            "wz 1024 512 false"
        ]
    );
    // Discard with UNMAP, reserved flags: UNSUPP.
    header(&m, 11, 0);
    dwz_seg(&m, DATA, 0, 1, 1);
    assert_eq!(run(&dev, &m, &one), (status::UNSUPP, 1));
    header(&m, 13, 0);
    dwz_seg(&m, DATA, 0, 1, 2);
    assert_eq!(run(&dev, &m, &one), (status::UNSUPP, 1));
    // More segments than max_discard_seg: UNSUPP; too many sectors, beyond capacity,
    // a partial segment: IOERR.
    header(&m, 11, 0);
    assert_eq!(
        run(
            &dev,
            &m,
            &[d(HDR, 16, 0), d(DATA, 48, 0), d(STATUS, 1, WRITE)]
        ),
        (status::UNSUPP, 1)
    );
    dwz_seg(&m, DATA, 0, 32769, 0);
    assert_eq!(run(&dev, &m, &one), (status::IOERR, 1));
    dwz_seg(&m, DATA, DISK / 512 - 1, 2, 0);
    assert_eq!(run(&dev, &m, &one), (status::IOERR, 1));
    dwz_seg(&m, DATA, u64::MAX, 2, 0);
    assert_eq!(run(&dev, &m, &one), (status::IOERR, 1));
    assert_eq!(
        run(
            &dev,
            &m,
            &[d(HDR, 16, 0), d(DATA, 15, 0), d(STATUS, 1, WRITE)]
        ),
        (status::IOERR, 1)
    );
    assert_eq!(disk.ops.lock().unwrap().len(), 4);
}

#[test]
fn missing_or_bad_status_drops_chain() {
    let m = mem();
    let disk = MemDisk::new(false);
    let dev = dev(&disk);
    header(&m, 0, 0);
    // Last descriptor readable: no status byte.
    assert_eq!(run(&dev, &m, &[d(HDR, 16, 0), d(DATA, 512, 0)]).1, 0);
    // Zero-length status descriptor.
    assert_eq!(run(&dev, &m, &[d(HDR, 16, 0), d(STATUS, 0, WRITE)]).1, 0);
    // Status outside guest memory, and at the very top of the address space.
    assert_eq!(
        run(&dev, &m, &[d(HDR, 16, 0), d(0x2000_0000, 1, WRITE)]).1,
        0
    );
    assert_eq!(run(&dev, &m, &[d(HDR, 16, 0), d(u64::MAX, 2, WRITE)]).1, 0);
    assert_eq!(m.read_obj::<u8>(GuestAddress(STATUS)).unwrap(), 0xff);
}

#[test]
fn bad_buffers_get_ioerr() {
    let m = mem();
    let disk = MemDisk::new(false);
    let dev = dev(&disk);
    header(&m, 0, 0);
    // Data outside memory, straddling the end of memory, huge length.
    for data in [
        d(0x2000_0000, 512, WRITE),
        d(MEM as u64 - 256, 512, WRITE),
        d(DATA, u32::MAX - 100, WRITE),
        d(u64::MAX - 10, 512, WRITE),
    ] {
        assert_eq!(
            run(&dev, &m, &[d(HDR, 16, 0), data, d(STATUS, 1, WRITE)]),
            (status::IOERR, 1)
        );
        header(&m, 0, 0);
    }
    // Header outside memory.
    assert_eq!(
        run(&dev, &m, &[d(0x2000_0000, 16, 0), d(STATUS, 1, WRITE)]),
        (status::IOERR, 1)
    );
    // Short header, no header at all.
    header(&m, 0, 0);
    assert_eq!(
        run(&dev, &m, &[d(HDR, 15, 0), d(STATUS, 1, WRITE)]),
        (status::IOERR, 1)
    );
    header(&m, 0, 0);
    assert_eq!(run(&dev, &m, &[d(STATUS, 1, WRITE)]), (status::IOERR, 1));
    // A readable descriptor after a writable one.
    header(&m, 1, 0);
    assert_eq!(
        run(
            &dev,
            &m,
            &[
                d(HDR, 16, 0),
                d(DATA, 512, WRITE),
                d(DATA, 512, 0),
                d(STATUS, 1, WRITE)
            ]
        ),
        (status::IOERR, 1)
    );
    // A chain of more than 4 GiB in total is illegal: dropped.
    header(&m, 0, 0);
    assert_eq!(
        run(
            &dev,
            &m,
            &[
                d(HDR, 16, 0),
                d(DATA, u32::MAX - 8, WRITE),
                d(STATUS, 1, WRITE)
            ]
        )
        .1,
        0
    );
}

fn used(q: &MockSplitQueue<'_, GuestMemoryMmap>, i: usize) -> (u32, u32) {
    let e = q.used().ring().ref_at(i).unwrap().load();
    (e.id(), e.len())
}

#[test]
fn looping_and_runaway_chains_are_dropped_and_queue_keeps_going() {
    let m = mem();
    let disk = MemDisk::new(false);
    let dev = dev(&disk);
    let q = MockSplitQueue::new(&m, 16);
    header(&m, 0, 0);
    // Chain 0: 0 -> 1 -> 0 loop. Chain 1 (head 2): next index outside the table.
    // Chain 2 (head 4): a good read.
    q.add_desc_chains(&[dn(HDR, 16, NEXT, 1), dn(DATA, 512, NEXT | WRITE, 0)], 0)
        .unwrap();
    q.add_desc_chains(&[dn(HDR, 16, NEXT, 200)], 2).unwrap();
    q.add_desc_chains(
        &[
            dn(HDR, 16, NEXT, 5),
            dn(DATA, 512, NEXT | WRITE, 6),
            dn(STATUS, 1, WRITE, 0),
        ],
        4,
    )
    .unwrap();
    let mut queue: Queue = q.create_queue().unwrap();
    let r = dev.process_queue(&mut queue, &m).unwrap();
    assert_eq!(r.completed, 3);
    assert_eq!(used(&q, 0), (0, 0));
    assert_eq!(used(&q, 1), (2, 0));
    assert_eq!(used(&q, 2), (4, 513));
    assert_eq!(m.read_obj::<u8>(GuestAddress(STATUS)).unwrap(), status::OK);
}

#[test]
fn chain_longer_than_queue_is_dropped() {
    let m = mem();
    let disk = MemDisk::new(false);
    let dev = dev(&disk);
    let q = MockSplitQueue::new(&m, 16);
    header(&m, 0, 0);
    // 16 descriptors is the most a queue of 16 allows: header, 14 data, status.
    let mut descs = vec![d(HDR, 16, 0)];
    descs.extend((0..14).map(|i| d(DATA + i * 512, 512, WRITE)));
    descs.push(d(STATUS, 1, WRITE));
    let chain = q.build_desc_chain(&descs).unwrap();
    assert!(matches!(dev.process_chain(chain, 16), Outcome::Done(c) if c.len == 14 * 512 + 1));
    // The device's own limit is the queue size it is told about.
    let chain = q.build_desc_chain(&descs).unwrap();
    assert!(matches!(dev.process_chain(chain, 8), Outcome::Done(c) if c.len == 0));
}

#[test]
fn indirect_tables() {
    let m = mem();
    let disk = MemDisk::new(false);
    let dev = dev(&disk);
    let q = MockSplitQueue::new(&m, 16);
    header(&m, 0, 2);
    let table = 0x40_0000u64;
    let entries = [
        dn(HDR, 16, NEXT, 1),
        dn(DATA, 512, NEXT | WRITE, 2),
        dn(STATUS, 1, WRITE, 0),
    ];
    for (i, e) in entries.iter().enumerate() {
        m.write_obj(*e, GuestAddress(table + 16 * i as u64))
            .unwrap();
    }
    let chain = q.build_desc_chain(&[d(table, 48, INDIRECT)]).unwrap();
    assert!(matches!(dev.process_chain(chain, 16), Outcome::Done(c) if c.len == 513));
    assert_eq!(m.read_obj::<u8>(GuestAddress(STATUS)).unwrap(), status::OK);
    // A nested indirect descriptor, a table of bad length, a table outside memory,
    // a loop inside the table: dropped.
    m.write_obj(dn(table, 48, INDIRECT, 0), GuestAddress(table + 48))
        .unwrap();
    for head in [
        d(table + 48, 16, INDIRECT),
        d(table, 47, INDIRECT),
        d(0x2000_0000, 48, INDIRECT),
        d(table, 0, INDIRECT),
    ] {
        let chain = q.build_desc_chain(&[head]).unwrap();
        assert!(matches!(dev.process_chain(chain, 16), Outcome::Done(c) if c.len == 0));
    }
    m.write_obj(dn(DATA, 512, NEXT | WRITE, 0), GuestAddress(table + 16))
        .unwrap();
    let chain = q.build_desc_chain(&[d(table, 48, INDIRECT)]).unwrap();
    assert!(matches!(dev.process_chain(chain, 16), Outcome::Done(c) if c.len == 0));
}

#[derive(Default)]
struct Events(Mutex<Vec<ErrorEvent>>);
impl ErrorSink for Events {
    fn io_error(&self, e: ErrorEvent) {
        self.0.lock().unwrap().push(e);
    }
}

#[test]
fn error_policy_report_ignore_stop_enospc() {
    let m = mem();
    let disk = MemDisk::new(false);
    let events = Arc::new(Events::default());
    let mk = |w, r| {
        dev(&disk)
            .with_error_policy(w, r)
            .with_error_sink(events.clone())
    };
    let write = [d(HDR, 16, 0), d(DATA, 512, 0), d(STATUS, 1, WRITE)];
    let read = [d(HDR, 16, 0), d(DATA, 512, WRITE), d(STATUS, 1, WRITE)];
    *disk.fail.lock().unwrap() = Fail::Io;

    let dv = mk(ErrorAction::Report, ErrorAction::Ignore);
    header(&m, 1, 0);
    assert_eq!(run(&dv, &m, &write), (status::IOERR, 1));
    header(&m, 0, 0);
    assert_eq!(run(&dv, &m, &read), (status::OK, 1));
    assert_eq!(dv.io_status(), IoStatus::Ok);

    let dv = mk(ErrorAction::Enospc, ErrorAction::Report);
    header(&m, 1, 0);
    assert_eq!(run(&dv, &m, &write), (status::IOERR, 1));
    *disk.fail.lock().unwrap() = Fail::NoSpace;
    header(&m, 1, 0);
    let q = MockSplitQueue::new(&m, 16);
    let chain = q.build_desc_chain(&write).unwrap();
    let Outcome::Stopped(p) = dv.process_chain(chain, 16) else {
        panic!("enospc must stop on ENOSPC")
    };
    assert_eq!(dv.io_status(), IoStatus::Nospace);
    assert_eq!(m.read_obj::<u8>(GuestAddress(STATUS)).unwrap(), 0xff);
    // Resume after the condition is fixed: the held request completes.
    *disk.fail.lock().unwrap() = Fail::None;
    dv.reset_io_status();
    assert!(matches!(dv.retry(&p, &m), Outcome::Done(c) if c.len == 1));
    assert_eq!(m.read_obj::<u8>(GuestAddress(STATUS)).unwrap(), status::OK);
    assert_eq!(dv.io_status(), IoStatus::Ok);

    let dv = mk(ErrorAction::Stop, ErrorAction::Stop);
    *disk.fail.lock().unwrap() = Fail::Io;
    header(&m, 0, 0);
    let chain = q.build_desc_chain(&read).unwrap();
    assert!(matches!(dv.process_chain(chain, 16), Outcome::Stopped(_)));
    assert_eq!(dv.io_status(), IoStatus::Failed);

    let ev = events.0.lock().unwrap();
    let summary: Vec<_> = ev
        .iter()
        .map(|e| (e.operation, e.action, e.nospace))
        .collect();
    assert_eq!(
        summary,
        [
            ("write", "report", false),
            ("read", "ignore", false),
            ("write", "report", false),
            ("write", "stop", true),
            ("read", "stop", false),
        ]
    );
}

#[test]
fn stop_halts_queue_processing() {
    let m = mem();
    let disk = MemDisk::new(false);
    let dv = dev(&disk).with_error_policy(ErrorAction::Stop, ErrorAction::Stop);
    *disk.fail.lock().unwrap() = Fail::Io;
    let q = MockSplitQueue::new(&m, 16);
    header(&m, 4, 0);
    q.add_desc_chains(&[dn(HDR, 16, NEXT, 1), dn(STATUS, 1, WRITE, 0)], 0)
        .unwrap();
    q.add_desc_chains(&[dn(HDR, 16, NEXT, 3), dn(STATUS, 1, WRITE, 0)], 2)
        .unwrap();
    let mut queue: Queue = q.create_queue().unwrap();
    let r = dv.process_queue(&mut queue, &m).unwrap();
    assert_eq!(r.completed, 0);
    let p = r.stopped.unwrap();
    assert_eq!(p.request.head, 0);
    *disk.fail.lock().unwrap() = Fail::None;
    let Outcome::Done(c) = dv.retry(&p, &m) else {
        panic!()
    };
    queue.add_used(&m, c.head, c.len).unwrap();
    let r = dv.process_queue(&mut queue, &m).unwrap();
    assert_eq!(r.completed, 1);
    assert_eq!(used(&q, 1), (2, 1));
}

#[test]
fn config_space_layout() {
    let opts = DeviceOptions {
        num_queues: 4,
        queue_size: 256,
        logical_block_size: 4096,
        ..DeviceOptions::default()
    };
    let c = BlkConfig::new(64 << 20, &opts, true);
    let b = c.to_bytes();
    assert_eq!(b.len(), CONFIG_SIZE);
    assert_eq!(u64::from_le_bytes(b[0..8].try_into().unwrap()), 131072);
    assert_eq!(u32::from_le_bytes(b[12..16].try_into().unwrap()), 254);
    assert_eq!(u32::from_le_bytes(b[20..24].try_into().unwrap()), 4096);
    assert_eq!(b[32], 1);
    assert_eq!(u16::from_le_bytes(b[34..36].try_into().unwrap()), 4);
    assert_eq!(u32::from_le_bytes(b[44..48].try_into().unwrap()), 8);
    assert_eq!(b[56], 1);
    assert_eq!(c.read(32, 4), vec![1, 0, 4, 0]);
    assert_eq!(c.read(94, 4), vec![0, 0, 0, 0]);
    assert_eq!(c.read(u64::MAX, 2), vec![0, 0]);
    // Writeback toggled through the config space.
    let disk = MemDisk::new(false);
    let dv = dev(&disk);
    dv.write_config(32, &[0]);
    assert!(!dv.writeback());
    dv.write_config(30, &[9, 9, 1]);
    assert!(dv.writeback());
    dv.write_config(u64::MAX, &[0, 0]);
    assert!(dv.writeback());
}

#[test]
fn writethrough_flushes_after_writes() {
    let m = mem();
    let disk = MemDisk::new(false);
    let dv = dev(&disk);
    dv.write_config(32, &[0]);
    header(&m, 1, 0);
    assert_eq!(
        run(
            &dv,
            &m,
            &[d(HDR, 16, 0), d(DATA, 512, 0), d(STATUS, 1, WRITE)]
        ),
        (status::OK, 1)
    );
    assert_eq!(disk.ops.lock().unwrap().as_slice(), ["flush"]);
}

#[test]
fn options_are_validated() {
    let disk = MemDisk::new(false);
    for bad in [
        DeviceOptions {
            logical_block_size: 1000,
            ..Default::default()
        },
        DeviceOptions {
            logical_block_size: 256,
            ..Default::default()
        },
        DeviceOptions {
            num_queues: 0,
            ..Default::default()
        },
        DeviceOptions {
            queue_size: 100,
            ..Default::default()
        },
    ] {
        assert!(VirtioBlk::new(disk.clone(), bad).is_err());
    }
}

#[test]
fn broken_available_ring_does_not_spin() {
    let m = mem();
    let disk = MemDisk::new(false);
    let dv = dev(&disk);
    let q = MockSplitQueue::new(&m, 16);
    let mut queue: Queue = q.create_queue().unwrap();
    // Available index far beyond what a 16-entry queue can hold.
    q.avail().idx().store(1000);
    let r = dv.process_queue(&mut queue, &m).unwrap();
    assert_eq!(r.completed, 0);
    // A head index outside the descriptor table.
    let q = MockSplitQueue::new(&m, 16);
    let mut queue: Queue = q.create_queue().unwrap();
    q.avail().ring().ref_at(0).unwrap().store(500);
    q.avail().idx().store(1);
    let r = dv.process_queue(&mut queue, &m).unwrap();
    assert_eq!(r.completed, 0);
}
