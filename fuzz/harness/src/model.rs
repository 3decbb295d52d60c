//! `qcow2_model` and `raw_model`: operation sequences checked against a model.
//!
//! The input is decoded with the `arbitrary` crate into an image configuration and a
//! list of operations. The image is created on in-memory storage; the model is a plain
//! byte vector holding what the guest must read. Semantics the model encodes:
//!
//! - writes, zero writes and compressed writes always change the data;
//! - a qcow2 discard only affects whole clusters (the last, partial cluster of the disk
//!   counts as whole when the discard runs to the end); a discarded cluster reads as
//!   zeroes on compat=1.1, and on compat=0.10 reads through to the backing file (zeroes
//!   without one);
//! - raw over memory storage reads zeroes after a discard, and a raw disk's size is its
//!   storage's length rounded up to whole 512-byte sectors;
//! - growing a disk makes the new area read as zeroes, even over a backing file that is
//!   long enough to provide data there (as QEMU does);
//! - shrinking may be refused while data is allocated past the new end.
//!
//! - internal snapshots (qcow2) keep the contents and size of the moment they were
//!   taken; applying one makes them the disk's again; a create or apply refused for
//!   lack of refcount headroom (narrow refcounts) changes nothing.
//!
//! Every read, the final full read, and every block-status answer are compared with
//! the model; after every snapshot operation and after a final flush, `check` must
//! report no corruption and no leak; at the end every snapshot is applied and read.

use std::sync::Arc;

use arbitrary::{Arbitrary, Unstructured};
use strata_image::{
    create_on, open_on, CreateOptions, Format, FormatDriver, MemStorage, NewSnapshot,
    Preallocation, Storage,
};

use crate::pattern;
use crate::trace;
use crate::STORAGE_LIMIT;

/// Largest virtual disk the model targets create, in 512-byte sectors (1 MiB): 16
/// clusters of 64 KiB, or 32 L2 tables' worth of 512-byte clusters.
const MAX_SECTORS: u64 = 2048;
/// Most operations run per input.
const MAX_OPS: usize = 64;

/// Cluster sizes the qcow2 model exercises.
#[derive(Debug, Clone, Copy, Arbitrary)]
enum ClusterSize {
    C512,
    C4k,
    C64k,
}

impl ClusterSize {
    fn bytes(self) -> u64 {
        match self {
            ClusterSize::C512 => 512,
            ClusterSize::C4k => 4096,
            ClusterSize::C64k => 65536,
        }
    }
}

/// How the qcow2 image under test is created.
#[derive(Debug, Arbitrary)]
struct Qcow2Config {
    cluster: ClusterSize,
    extended_l2: bool,
    compat_v2: bool,
    refcount_order: u8,
    lazy_refcounts: bool,
    zstd: bool,
    backing: bool,
    backing_seed: u8,
    sectors: u16,
}

/// Where a request lands. The low bits of `off` choose the alignment, so that the
/// fuzzer reaches cluster-aligned and end-of-disk requests often.
#[derive(Debug, Clone, Copy, Arbitrary)]
struct Range {
    off: u32,
    len: u32,
}

/// One operation on the disk.
#[derive(Debug, Arbitrary)]
enum Op {
    Read(Range),
    Write(Range, u8),
    WriteZeroes(Range, bool),
    Discard(Range),
    WriteCompressed {
        cluster: u16,
        seed: u8,
        compressible: bool,
    },
    BlockStatus(Range),
    Flush,
    Resize(u16),
    Reopen,
    /// Internal snapshots (qcow2; raw skips them).
    SnapshotCreate,
    SnapshotApply(u8),
    SnapshotDelete(u8),
}

impl Range {
    /// Resolves to an in-range `(offset, length)` for a disk of `size` bytes.
    fn resolve(self, size: u64, cluster: u64) -> (u64, u64) {
        let unit = match self.off & 3 {
            0 => 1,
            1 => 512,
            _ => cluster,
        };
        let slots = size / unit + 1;
        let off = (u64::from(self.off >> 2) % slots * unit).min(size);
        let room = size - off;
        let mut len = u64::from(self.len) % (3 * cluster + 1025);
        if unit > 1 {
            len = len / unit * unit;
        }
        if self.off & 3 == 3 {
            // Run to the end of the disk.
            len = room;
        }
        (off, len.min(room).min(1 << 20))
    }
}

/// The expected guest view of the disk.
struct Model {
    data: Vec<u8>,
    backing: Vec<u8>,
}

impl Model {
    fn size(&self) -> u64 {
        self.data.len() as u64
    }

    /// What an unallocated byte at `pos` reads as.
    fn below(&self, pos: u64) -> u8 {
        self.backing.get(pos as usize).copied().unwrap_or(0)
    }

    fn compare(&self, got: &[u8], off: u64, what: &str) {
        let want = &self.data[off as usize..off as usize + got.len()];
        if got != want {
            let i = got.iter().zip(want).position(|(a, b)| a != b).unwrap_or(0);
            panic!(
                "{what}: {} bytes at {off} differ from the model; first at {} (got {:#04x}, want {:#04x})",
                got.len(),
                off + i as u64,
                got[i],
                want[i]
            );
        }
    }
}

fn read_checked(img: &dyn FormatDriver, model: &Model, off: u64, len: u64, what: &str) {
    let mut buf = vec![0u8; len as usize];
    img.read(&mut buf, off)
        .unwrap_or_else(|e| panic!("{what}: read of {len} bytes at {off} failed: {e}"));
    model.compare(&buf, off, what);
}

/// The bytes of a compressed write of guest cluster `idx`.
fn compressed_data(
    cluster: u64,
    size: u64,
    idx: u16,
    seed: u8,
    compressible: bool,
) -> (u64, Vec<u8>) {
    let clusters = size.div_ceil(cluster).max(1);
    let off = (u64::from(idx) % clusters) * cluster;
    let len = cluster.min(size.saturating_sub(off));
    let mut buf = vec![0u8; len as usize];
    if compressible {
        pattern::fill_compressible(&mut buf, seed, off);
    } else {
        pattern::fill(&mut buf, seed, off);
    }
    (off, buf)
}

/// Checks a block-status answer for `[off, off + len)` against the model.
fn check_status(img: &dyn FormatDriver, model: &Model, off: u64, len: u64, has_backing: bool) {
    if len == 0 {
        assert!(
            img.block_status(off, 0).is_err(),
            "block status of nothing succeeded"
        );
        return;
    }
    let st = img
        .block_status(off, len)
        .unwrap_or_else(|e| panic!("block status of {len} bytes at {off} failed: {e}"));
    assert!(
        st.len > 0 && st.len <= len,
        "block status of {len} bytes at {off} reported {} bytes",
        st.len
    );
    let range = off as usize..(off + st.len) as usize;
    let want = &model.data[range.clone()];
    if st.zero {
        assert!(
            want.iter().all(|&b| b == 0),
            "block status says {} bytes at {off} read as zero, the model disagrees ({st:?})",
            st.len
        );
    }
    if !st.allocated {
        let below: Vec<u8> = range.clone().map(|p| model.below(p as u64)).collect();
        let below = if has_backing {
            below
        } else {
            vec![0; want.len()]
        };
        assert!(
            want == below.as_slice(),
            "block status says {} bytes at {off} come from below, the model disagrees ({st:?})",
            st.len
        );
    }
    if let (true, false, false, Some(host)) = (st.data, st.zero, st.compressed, st.offset) {
        if img.format_name() == "qcow2" {
            let mut raw = vec![0u8; st.len as usize];
            img.storage()
                .read_at(&mut raw, host)
                .expect("in-memory reads cannot fail");
            assert!(
                raw == want,
                "block status maps {} bytes at {off} to host offset {host}, which holds other data",
                st.len
            );
        }
    }
}

/// Which bytes of `[off, off + len)` a qcow2 discard affects: whole clusters only, the
/// last partial cluster of the disk counting as whole when the request runs to the end.
fn discarded(off: u64, len: u64, size: u64, cluster: u64) -> (u64, u64) {
    let end = off + len;
    let start = off.div_ceil(cluster) * cluster;
    let stop = if end == size {
        size
    } else {
        end / cluster * cluster
    };
    (start, stop.max(start))
}

/// The `qcow2_model` target: see the module documentation.
pub fn qcow2_model(data: &[u8]) {
    let mut u = Unstructured::new(data);
    let Ok(cfg) = Qcow2Config::arbitrary(&mut u) else {
        return;
    };
    if trace() {
        eprintln!("{cfg:?}");
    }
    let cs = cfg.cluster.bytes();
    let v2 = cfg.compat_v2;
    let size = (u64::from(cfg.sectors) % MAX_SECTORS + 1) * 512;
    let opts = CreateOptions {
        size: Some(size),
        cluster_size: Some(cs),
        compat: Some(if v2 { "0.10" } else { "1.1" }.into()),
        refcount_bits: Some(if v2 {
            16
        } else {
            1 << (cfg.refcount_order % 7)
        }),
        lazy_refcounts: cfg.lazy_refcounts && !v2,
        backing_file: cfg.backing.then(|| "backing.raw".to_string()),
        backing_fmt: cfg.backing.then(|| "raw".to_string()),
        compression_type: Some(if cfg.zstd && !v2 { "zstd" } else { "zlib" }.into()),
        extended_l2: cfg.extended_l2 && !v2 && cs >= 16384,
        preallocation: Preallocation::Off,
        unsafe_backing: true,
    };
    let st: Arc<dyn Storage> = Arc::new(MemStorage::new(Vec::new(), STORAGE_LIMIT));
    create_on(st.clone(), Format::Qcow2, &opts)
        .unwrap_or_else(|e| panic!("creating {opts:?} failed: {e}"));

    let mut backing_data = vec![0u8; if cfg.backing { size as usize } else { 0 }];
    pattern::fill(&mut backing_data, cfg.backing_seed, 0);
    let backing: Option<Arc<dyn FormatDriver>> = cfg.backing.then(|| {
        let bst: Arc<dyn Storage> = Arc::new(MemStorage::new(backing_data.clone(), size));
        open_on(bst, Format::Raw, true, None).expect("opening a raw in-memory node cannot fail")
    });
    let open = || {
        open_on(st.clone(), Format::Qcow2, false, backing.clone())
            .unwrap_or_else(|e| panic!("opening the image ({opts:?}) failed: {e}"))
    };
    let mut img = open();
    let mut model = Model {
        data: backing_data.clone(),
        backing: backing_data,
    };
    model.data.resize(size as usize, 0);

    // (id, contents) of the snapshots taken.
    let mut snaps: Vec<(String, Vec<u8>)> = Vec::new();
    let mut ops = 0;
    while ops < MAX_OPS && !u.is_empty() {
        let Ok(op) = Op::arbitrary(&mut u) else { break };
        ops += 1;
        let size = model.size();
        if trace() {
            eprintln!("{op:?} (size {size})");
        }
        match op {
            Op::Read(r) => {
                let (off, len) = r.resolve(size, cs);
                read_checked(img.as_ref(), &model, off, len, "read");
            }
            Op::Write(r, seed) => {
                let (off, len) = r.resolve(size, cs);
                let mut buf = vec![0u8; len as usize];
                pattern::fill(&mut buf, seed, off);
                img.write(&buf, off)
                    .unwrap_or_else(|e| panic!("write of {len} bytes at {off} failed: {e}"));
                model.data[off as usize..(off + len) as usize].copy_from_slice(&buf);
            }
            Op::WriteZeroes(r, unmap) => {
                let (off, len) = r.resolve(size, cs);
                img.write_zeroes(off, len, unmap).unwrap_or_else(|e| {
                    panic!("write_zeroes of {len} bytes at {off} (unmap {unmap}) failed: {e}")
                });
                model.data[off as usize..(off + len) as usize].fill(0);
            }
            Op::Discard(r) => {
                let (off, len) = r.resolve(size, cs);
                img.discard(off, len)
                    .unwrap_or_else(|e| panic!("discard of {len} bytes at {off} failed: {e}"));
                let (start, stop) = discarded(off, len, size, cs);
                for p in start..stop {
                    model.data[p as usize] = if v2 { model.below(p) } else { 0 };
                }
            }
            Op::WriteCompressed {
                cluster,
                seed,
                compressible,
            } => {
                let (off, buf) = compressed_data(cs, size, cluster, seed, compressible);
                img.write_compressed(&buf, off).unwrap_or_else(|e| {
                    panic!(
                        "compressed write of {} bytes at {off} failed: {e}",
                        buf.len()
                    )
                });
                model.data[off as usize..off as usize + buf.len()].copy_from_slice(&buf);
            }
            Op::BlockStatus(r) => {
                let (off, len) = r.resolve(size, cs);
                check_status(img.as_ref(), &model, off, len, cfg.backing);
            }
            Op::Flush => img.flush().expect("flush failed"),
            Op::Resize(sectors) => {
                let new_size = (u64::from(sectors) % MAX_SECTORS + 1) * 512;
                match img.resize(new_size, Preallocation::Off) {
                    Ok(()) => model.data.resize(new_size as usize, 0),
                    Err(e) => {
                        // Shrinking may be refused; growing may only be refused where
                        // a compat=0.10 image cannot hide its backing file's data.
                        let hides_backing = v2 && cfg.backing && size < model.backing.len() as u64;
                        assert!(
                            new_size < size || hides_backing,
                            "growing from {size} to {new_size} failed: {e}"
                        );
                    }
                }
            }
            Op::Reopen => {
                drop(img);
                img = open();
            }
            Op::SnapshotCreate => {
                let ops = img.internal_snapshots().expect("qcow2 has snapshots");
                match ops.create_snapshot(&NewSnapshot::default()) {
                    Ok(sn) => snaps.push((sn.id, model.data.clone())),
                    Err(e) => assert!(
                        e.to_string().contains("cannot take another reference"),
                        "snapshot create failed: {e}"
                    ),
                }
                check_clean(img.as_ref(), "snapshot create");
            }
            Op::SnapshotApply(i) if !snaps.is_empty() => {
                let (id, data) = &snaps[usize::from(i) % snaps.len()];
                let ops = img.internal_snapshots().expect("qcow2 has snapshots");
                match ops.apply_snapshot(id) {
                    Ok(()) => model.data = data.clone(),
                    Err(e) => assert!(
                        e.to_string().contains("cannot take another reference"),
                        "snapshot apply failed: {e}"
                    ),
                }
                check_clean(img.as_ref(), "snapshot apply");
            }
            Op::SnapshotDelete(i) if !snaps.is_empty() => {
                let (id, _) = snaps.remove(usize::from(i) % snaps.len());
                let ops = img.internal_snapshots().expect("qcow2 has snapshots");
                ops.delete_snapshot(&id)
                    .unwrap_or_else(|e| panic!("snapshot delete failed: {e}"));
                check_clean(img.as_ref(), "snapshot delete");
            }
            Op::SnapshotApply(_) | Op::SnapshotDelete(_) => {}
        }
        assert_eq!(
            img.size(),
            model.size(),
            "virtual size differs from the model"
        );
    }

    // Every snapshot still holds what the disk held when it was taken.
    for (id, data) in &snaps {
        let ops = img.internal_snapshots().expect("qcow2 has snapshots");
        if ops.apply_snapshot(id).is_ok() {
            model.data = data.clone();
            read_checked(img.as_ref(), &model, 0, model.size(), "read of a snapshot");
        }
    }
    read_checked(img.as_ref(), &model, 0, model.size(), "final read");
    img.flush().expect("final flush failed");
    let report = img.check(None).expect("final check failed");
    assert!(
        report.corruptions == 0 && report.leaks == 0 && report.check_errors == 0,
        "check after the sequence found problems: {report:?}"
    );
    drop(img);
    let img = open();
    read_checked(
        img.as_ref(),
        &model,
        0,
        model.size(),
        "read after reopening",
    );
}

/// How the raw image under test is created.
#[derive(Debug, Arbitrary)]
struct RawConfig {
    sectors: u16,
    unaligned_tail: u16,
}

/// The `raw_model` target: see the module documentation.
pub fn raw_model(data: &[u8]) {
    let mut u = Unstructured::new(data);
    let Ok(cfg) = RawConfig::arbitrary(&mut u) else {
        return;
    };
    if trace() {
        eprintln!("{cfg:?}");
    }
    // Raw images need not be sector-aligned.
    let size = (u64::from(cfg.sectors) % MAX_SECTORS) * 512 + u64::from(cfg.unaligned_tail % 512);
    let st: Arc<dyn Storage> = Arc::new(MemStorage::new(Vec::new(), STORAGE_LIMIT));
    create_on(
        st.clone(),
        Format::Raw,
        &CreateOptions {
            size: Some(size),
            ..Default::default()
        },
    )
    .unwrap_or_else(|e| panic!("creating a raw image of {size} bytes failed: {e}"));
    let open = || open_on(st.clone(), Format::Raw, false, None).expect("opening raw failed");
    let mut img = open();
    // A raw disk counts whole sectors: a partial last sector reads as zeroes.
    let mut model = Model {
        data: vec![0; size.div_ceil(512) as usize * 512],
        backing: Vec::new(),
    };
    let unit = 4096;

    let mut ops = 0;
    while ops < MAX_OPS && !u.is_empty() {
        let Ok(op) = Op::arbitrary(&mut u) else { break };
        ops += 1;
        let size = model.size();
        if trace() {
            eprintln!("{op:?} (size {size})");
        }
        match op {
            Op::Read(r) => {
                let (off, len) = r.resolve(size, unit);
                read_checked(img.as_ref(), &model, off, len, "read");
            }
            Op::Write(r, seed) => {
                let (off, len) = r.resolve(size, unit);
                let mut buf = vec![0u8; len as usize];
                pattern::fill(&mut buf, seed, off);
                img.write(&buf, off)
                    .unwrap_or_else(|e| panic!("write of {len} bytes at {off} failed: {e}"));
                model.data[off as usize..(off + len) as usize].copy_from_slice(&buf);
            }
            Op::WriteZeroes(r, unmap) => {
                let (off, len) = r.resolve(size, unit);
                img.write_zeroes(off, len, unmap)
                    .unwrap_or_else(|e| panic!("write_zeroes of {len} bytes at {off} failed: {e}"));
                model.data[off as usize..(off + len) as usize].fill(0);
            }
            Op::Discard(r) => {
                let (off, len) = r.resolve(size, unit);
                img.discard(off, len)
                    .unwrap_or_else(|e| panic!("discard of {len} bytes at {off} failed: {e}"));
                model.data[off as usize..(off + len) as usize].fill(0);
            }
            Op::WriteCompressed { .. } => {
                assert!(
                    img.write_compressed(&[0u8; 512], 0).is_err(),
                    "raw accepted a compressed write"
                );
            }
            Op::BlockStatus(r) => {
                let (off, len) = r.resolve(size, unit);
                check_status(img.as_ref(), &model, off, len, false);
            }
            Op::Flush => img.flush().expect("flush failed"),
            Op::Resize(sectors) => {
                let new_size = u64::from(sectors) % MAX_SECTORS * 512;
                img.resize(new_size, Preallocation::Off)
                    .unwrap_or_else(|e| panic!("resizing raw to {new_size} failed: {e}"));
                model.data.resize(new_size as usize, 0);
            }
            Op::Reopen => {
                drop(img);
                img = open();
            }
            Op::SnapshotCreate | Op::SnapshotApply(_) | Op::SnapshotDelete(_) => {
                assert!(img.internal_snapshots().is_none(), "raw has no snapshots");
            }
        }
        assert_eq!(
            img.size(),
            model.size(),
            "virtual size differs from the model"
        );
    }
    read_checked(img.as_ref(), &model, 0, model.size(), "final read");
}

/// The check finds no corruption and no leak (after a snapshot operation).
fn check_clean(img: &dyn FormatDriver, after: &str) {
    let report = img.check(None).expect("check failed");
    assert!(
        report.corruptions == 0 && report.leaks == 0 && report.check_errors == 0,
        "check after {after} found problems: {report:?}"
    );
}
