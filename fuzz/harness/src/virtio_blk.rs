//! Fuzz target `virtio_blk`: the whole guest memory is the fuzzer's input.
//!
//! The input is copied into a 64 KiB guest memory that holds a 16-entry split
//! virtqueue (descriptor table at 0, available ring at 0x100, used ring at 0x200; the
//! low bit of byte 0x300 turns EVENT_IDX on) and everything the descriptors may point at; the device then processes the queue
//! against a 1 MiB in-memory disk. Invariants: no panic, the device never touches the
//! disk outside its capacity (the backend checks), and every chain it takes off the
//! available ring is put on the used ring with a length that fits the chain.

use strata_virtio_blk::{DeviceOptions, VirtioBlk};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::disk::MemDisk;

const MEM: usize = 64 << 10;
const DISK: u64 = 1 << 20;
const QSIZE: u16 = 16;

/// The `virtio_blk` target.
pub fn virtio_blk(data: &[u8]) {
    let Ok(mem) = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM)]) else {
        return;
    };
    let n = data.len().min(MEM);
    if mem.write_slice(&data[..n], GuestAddress(0)).is_err() {
        return;
    }
    // The used ring starts empty, as a driver sets it up.
    let _ = mem.write_slice(&[0u8; 4], GuestAddress(0x200));
    let opts = DeviceOptions {
        queue_size: QSIZE,
        max_dwz_segments: 4,
        ..DeviceOptions::default()
    };
    let Ok(dev) = VirtioBlk::new(MemDisk::new(DISK as usize, false), opts) else {
        return;
    };
    let Ok(mut q) = Queue::new(QSIZE) else {
        return;
    };
    q.set_size(QSIZE);
    q.set_desc_table_address(Some(0), Some(0));
    q.set_avail_ring_address(Some(0x100), Some(0));
    q.set_used_ring_address(Some(0x200), Some(0));
    q.set_event_idx(data.get(0x300).is_some_and(|b| b & 1 != 0));
    q.set_ready(true);
    if !q.is_valid(&mem) {
        return;
    }
    let before = q.next_avail();
    let Ok(run) = dev.process_queue(&mut q, &mem) else {
        return;
    };
    // Every chain taken is returned, except heads outside the table (which cannot be).
    let taken = q.next_avail().wrapping_sub(before);
    assert!(
        run.completed <= usize::from(taken),
        "more chains returned than taken"
    );
    let used_idx: u16 = mem.read_obj(GuestAddress(0x202)).unwrap_or(0);
    assert_eq!(
        usize::from(used_idx),
        run.completed,
        "used index does not match the chains returned"
    );
}
