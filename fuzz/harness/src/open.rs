//! `qcow2_open`: arbitrary bytes as a qcow2 image file.
//!
//! The whole input is the image. Its last [`SCRIPT_BYTES`] bytes double as a script of
//! operations (reads, writes, zero writes, discards, compressed writes, flushes, resizes,
//! block status), so mutating the tail of a seed image changes what is done to it.
//!
//! Invariants:
//! - no panic, no allocation beyond the fuzzer's limits, no storage growth past
//!   [`STORAGE_LIMIT`](crate::STORAGE_LIMIT) (the in-memory storage refuses it);
//! - opened read-only, the image refuses every write and its bytes stay unchanged;
//! - when `check -r all` reports that nothing is left to repair, a second `check`
//!   agrees.

use std::sync::{Arc, OnceLock};

use strata_image::{
    open_on, Format, FormatDriver, MemStorage, NewSnapshot, Preallocation, RepairMode, Storage,
};

use crate::pattern;
use crate::STORAGE_LIMIT;

/// How many bytes from the end of the input form the operation script.
pub const SCRIPT_BYTES: usize = 96;
/// Longest single request the script issues.
const MAX_REQUEST: u64 = 256 << 10;
/// Largest size a resize asks for.
const MAX_RESIZE: u64 = 1 << 30;
/// Most growth a resize preallocates.
const MAX_PREALLOC: u64 = 4 << 20;
/// Size of the raw backing node offered to images that name a backing file.
const BACKING_SIZE: usize = 64 << 10;

/// Reads little fields from the script; past its end everything reads as zero.
struct Script<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl Script<'_> {
    fn u8(&mut self) -> u8 {
        let b = self.bytes.get(self.pos).copied().unwrap_or(0);
        self.pos += 1;
        b
    }

    fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.u8(), self.u8()])
    }

    fn u32(&mut self) -> u32 {
        u32::from_le_bytes([self.u8(), self.u8(), self.u8(), self.u8()])
    }

    fn done(&self) -> bool {
        self.pos >= self.bytes.len()
    }
}

/// An offset and length for a request: mostly inside the disk, sometimes not.
fn request(s: &mut Script<'_>, size: u64, cluster: u64) -> (u64, u64) {
    let mode = s.u8();
    let raw_off = u64::from(s.u32());
    let raw_len = u64::from(s.u16()) * (1 + u64::from(mode >> 6));
    let mut off = match mode & 3 {
        0 => raw_off,
        1 => raw_off * 512,
        _ => raw_off * cluster,
    };
    let mut len = raw_len % (MAX_REQUEST + 1);
    if mode & 0x20 == 0 {
        // Keep most requests in range so that they reach the driver's guts.
        off %= size.saturating_add(1);
        len = len.min(size - off);
    }
    if mode & 3 == 3 {
        len = len / cluster * cluster;
    }
    (off, len)
}

fn backing_node() -> Arc<dyn FormatDriver> {
    static DATA: OnceLock<Vec<u8>> = OnceLock::new();
    let data = DATA.get_or_init(|| {
        let mut data = vec![0u8; BACKING_SIZE];
        pattern::fill(&mut data, 0xb7, 0);
        data
    });
    let st: Arc<dyn Storage> = Arc::new(MemStorage::new(data.clone(), BACKING_SIZE as u64));
    open_on(st, Format::Raw, true, None).expect("opening a raw in-memory node cannot fail")
}

/// Runs the script against `img`. In read-only mode every modifying call must fail.
fn run_script(img: &dyn FormatDriver, script: &[u8], read_only: bool) {
    let mut s = Script {
        bytes: script,
        pos: 0,
    };
    let cluster = img.cluster_size().unwrap_or(512).max(512);
    let mut steps = 0;
    while !s.done() && steps < 24 {
        steps += 1;
        let size = img.size();
        let op = s.u8();
        let modifying = match op % 11 {
            0 => {
                let (off, len) = request(&mut s, size, cluster);
                let mut buf = vec![0u8; len as usize];
                let _ = img.read(&mut buf, off);
                false
            }
            1 => {
                let seed = s.u8();
                let (off, len) = request(&mut s, size, cluster);
                let mut buf = vec![0u8; len as usize];
                pattern::fill(&mut buf, seed, off);
                img.write(&buf, off).is_ok()
            }
            2 | 3 => {
                let (off, len) = request(&mut s, size, cluster);
                img.write_zeroes(off, len, op % 11 == 3).is_ok()
            }
            4 => {
                let (off, len) = request(&mut s, size, cluster);
                img.discard(off, len).is_ok()
            }
            5 => {
                let _ = img.flush();
                false
            }
            6 => {
                // Up to 1 GiB: bigger sizes only make the L1 table (and each run)
                // bigger. Preallocation only for small growth, for the same reason.
                let shift = s.u8() % 32;
                let new_size = ((u64::from(s.u32()) << shift) & !511).min(MAX_RESIZE);
                let prealloc = match s.u8() % 8 {
                    0 if new_size < size + MAX_PREALLOC => Preallocation::Metadata,
                    1 if new_size < size + MAX_PREALLOC => Preallocation::Falloc,
                    _ => Preallocation::Off,
                };
                img.resize(new_size, prealloc).is_ok()
            }
            7 => {
                let seed = s.u8();
                let idx = u64::from(s.u16());
                let off = if size > 0 {
                    (idx * cluster) % size / cluster * cluster
                } else {
                    0
                };
                let len = cluster.min(size.saturating_sub(off)).min(MAX_REQUEST);
                let mut buf = vec![0u8; len as usize];
                pattern::fill_compressible(&mut buf, seed, off);
                img.write_compressed(&buf, off).is_ok()
            }
            8 => {
                let (off, len) = request(&mut s, size, cluster);
                if let Ok(st) = img.block_status(off, len) {
                    assert!(
                        st.len > 0 && st.len <= len,
                        "block status of {len} bytes at {off} reported an extent of {} bytes",
                        st.len
                    );
                }
                false
            }
            9 => {
                let _ = img.info();
                let snaps = img.snapshots().unwrap_or_default();
                let pick = |i: u8| snaps.get(usize::from(i) % snaps.len().max(1));
                match (s.u8() % 8, img.internal_snapshots()) {
                    (0, Some(ops)) => ops.create_snapshot(&NewSnapshot::default()).is_ok(),
                    (1, Some(ops)) => match pick(s.u8()) {
                        Some(sn) => ops.apply_snapshot(&sn.id).is_ok(),
                        None => false,
                    },
                    (2, Some(ops)) => match pick(s.u8()) {
                        Some(sn) => ops.delete_snapshot(&sn.id).is_ok(),
                        None => false,
                    },
                    _ => false,
                }
            }
            _ => {
                let (off, len) = request(&mut s, size, cluster);
                let mut buf = vec![0u8; len as usize];
                pattern::fill(&mut buf, 0x5a, off);
                // Write, then read back: a successful write must be visible.
                let ok = img.write(&buf, off).is_ok();
                if ok {
                    let mut back = vec![0u8; len as usize];
                    if img.read(&mut back, off).is_ok() {
                        assert!(back == buf, "data written at {off} did not read back");
                    }
                }
                ok
            }
        };
        if read_only {
            assert!(!modifying, "a read-only image accepted a modifying request");
        }
    }
}

/// The `qcow2_open` target: see the module documentation.
pub fn qcow2_open(data: &[u8]) {
    let script = &data[data.len().saturating_sub(SCRIPT_BYTES)..];

    // Read-write.
    let st = Arc::new(MemStorage::new(data.to_vec(), STORAGE_LIMIT));
    if let Ok(img) = open_on(st.clone(), Format::Qcow2, false, Some(backing_node())) {
        run_script(img.as_ref(), script, false);
        let _ = img.flush();
        let _ = img.check(None);
        if let Ok(report) = img.check(Some(RepairMode::All)) {
            if report.corruptions == 0 && report.check_errors == 0 {
                let again = img
                    .check(None)
                    .expect("check failed right after a successful repair");
                assert_eq!(
                    (again.corruptions, again.leaks),
                    (0, report.leaks),
                    "check after a successful repair disagrees with it: {:?} then {:?}",
                    report.messages,
                    again.messages
                );
            }
        }
        drop(img);
    }
    let size = st.size().expect("in-memory storage always knows its size");
    assert!(size <= STORAGE_LIMIT, "storage grew past its limit");

    // Read-only: nothing may change.
    let st = Arc::new(MemStorage::new(data.to_vec(), STORAGE_LIMIT));
    if let Ok(img) = open_on(st.clone(), Format::Qcow2, true, Some(backing_node())) {
        run_script(img.as_ref(), script, true);
        let _ = img.flush();
        let _ = img.check(None);
        assert!(
            img.check(Some(RepairMode::All)).is_err(),
            "a read-only image accepted a repair"
        );
        drop(img);
    }
    assert!(
        st.contents() == data,
        "opening and using an image read-only changed its bytes"
    );
}
