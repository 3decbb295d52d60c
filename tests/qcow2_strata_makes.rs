//! Strata makes, QEMU reads.
//!
//! For each `create` option, a qcow2 made by `strata_image::create_image` gets a
//! seeded-random sequence of writes, write-zeroes (with and without unmap), discards and
//! flushes at random offsets and lengths (aligned and not), mirrored into an in-memory
//! [`Model`]. After each sequence the image is closed, `qemu-img check` must report no
//! errors and no leaks, and `qemu-img compare` against the model's raw image must say
//! identical; the image is read back through the library too, and a second sequence runs
//! on the reopened image.
//!
//! Discard is advisory at the edges: a partially covered cluster may keep its data. So a
//! discard is checked like this: every fully covered cluster must read as QEMU's discard
//! result (zeroes; the backing file's data on compat=0.10 with a backing file), every
//! other byte of the range must read as either its old value or that result, and the
//! model takes what the library then reads.

use std::path::Path;
use std::sync::Arc;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use strata_image::{
    create_image, open_image, CreateOptions, Format, FormatDriver, OpenOptions, Preallocation,
};
use strata_tests::{
    assert_same_disk, pattern, qemu, read_all, require_qemu, s, seed, tempdir, Model, KIB, MIB,
};

/// What the image under test sits on.
#[derive(Clone, Copy, PartialEq)]
enum Backing {
    None,
    /// A raw backing file of the same size.
    Raw,
    /// A qcow2 backing file (made by qemu-img) of the same size.
    Qcow2,
    /// A qcow2 backing file half the size of the overlay.
    ShortQcow2,
}

/// One configuration of the randomised test.
struct Config {
    name: &'static str,
    opts: CreateOptions,
    size: u64,
    backing: Backing,
    /// Write this many clusters with `write_compressed` before the random sequence.
    compressed: usize,
    /// Tiny metadata caches, to force evictions.
    small_cache: bool,
    /// Operations in the first sequence (the second gets half as many).
    ops: usize,
    /// The image format (raw runs the same sequences as a control).
    format: Format,
}

fn config(name: &'static str, opts: CreateOptions) -> Config {
    Config {
        name,
        opts,
        size: 16 * MIB,
        backing: Backing::None,
        compressed: 0,
        small_cache: false,
        ops: 500,
        format: Format::Qcow2,
    }
}

fn cluster_of(opts: &CreateOptions) -> u64 {
    opts.cluster_size.unwrap_or(64 * KIB)
}

fn is_v2(opts: &CreateOptions) -> bool {
    matches!(opts.compat.as_deref(), Some("0.10") | Some("v2"))
}

/// Applies random operations to the driver and the model together.
struct Runner<'a> {
    name: &'a str,
    drv: Arc<dyn FormatDriver>,
    model: Model,
    /// What a fully discarded cluster reads as, per byte (zeroes, or the backing data).
    discarded: Vec<u8>,
    cs: u64,
    /// Fully covered clusters must read as the discard result (qcow2); raw may keep data.
    strict_discard: bool,
    rng: StdRng,
    log: Vec<String>,
}

impl Runner<'_> {
    fn ctx(&self) -> String {
        let from = self.log.len().saturating_sub(12);
        format!(
            "{}: after {} ops; the last ones:\n  {}",
            self.name,
            self.log.len(),
            self.log[from..].join("\n  ")
        )
    }

    /// A random (offset, len) inside the disk: cluster-aligned, sector-aligned or not
    /// aligned at all.
    fn range(&mut self) -> (u64, u64) {
        let size = self.drv.size();
        let cs = self.cs;
        let (mut off, mut len) = match self.rng.gen_range(0..4) {
            0 => {
                let clusters = size / cs;
                let n = self.rng.gen_range(1..=3u64.min(clusters));
                (self.rng.gen_range(0..=clusters - n) * cs, n * cs)
            }
            1 => {
                let sectors = size / 512;
                let max = (2 * cs / 512).clamp(1, 512);
                let n = self.rng.gen_range(1..=max);
                (self.rng.gen_range(0..sectors - n) * 512, n * 512)
            }
            2 => {
                // Small and unaligned, often inside one cluster.
                let len = self.rng.gen_range(1..=4096u64);
                (self.rng.gen_range(0..size - len), len)
            }
            _ => {
                let len = self.rng.gen_range(1..=(3 * cs).min(512 * KIB));
                (self.rng.gen_range(0..size - len), len)
            }
        };
        if self.rng.gen_bool(0.05) {
            // Touch the very end of the disk.
            len = len.min(size);
            off = size - len;
        }
        (off, len)
    }

    /// Reads `[off, off+len)` plus a cluster on each side and compares with the model.
    fn verify_around(&mut self, off: u64, len: u64) {
        let size = self.drv.size();
        let start = off.saturating_sub(self.cs);
        let end = (off + len + self.cs).min(size);
        let mut buf = vec![0u8; (end - start) as usize];
        if let Err(e) = self.drv.read(&mut buf, start) {
            panic!("read({start}, {}) failed: {e}\n{}", end - start, self.ctx());
        }
        let want = self.model.range(start, end - start).to_vec();
        if buf != want {
            let ctx = self.ctx();
            assert_same_disk(&format!("read-back of {start}..{end}\n{ctx}"), &buf, &want);
        }
    }

    fn step(&mut self, i: usize, tag: u64) {
        let kind = self.rng.gen_range(0..100);
        let (off, len) = self.range();
        match kind {
            0..=49 => {
                let data = pattern(tag ^ i as u64, off, len as usize);
                self.log.push(format!("write({off}, {len})"));
                if let Err(e) = self.drv.write(&data, off) {
                    panic!("write failed: {e}\n{}", self.ctx());
                }
                self.model.write(off, &data);
            }
            50..=64 => {
                let unmap = self.rng.gen_bool(0.5);
                self.log
                    .push(format!("write_zeroes({off}, {len}, may_unmap={unmap})"));
                if let Err(e) = self.drv.write_zeroes(off, len, unmap) {
                    panic!("write_zeroes failed: {e}\n{}", self.ctx());
                }
                self.model.zero(off, len);
            }
            65..=79 => {
                self.log.push(format!("discard({off}, {len})"));
                let old = self.model.range(off, len).to_vec();
                if let Err(e) = self.drv.discard(off, len) {
                    panic!("discard failed: {e}\n{}", self.ctx());
                }
                let mut got = vec![0u8; len as usize];
                if let Err(e) = self.drv.read(&mut got, off) {
                    panic!("read after discard failed: {e}\n{}", self.ctx());
                }
                let first_full = off.div_ceil(self.cs) * self.cs;
                let end_full = (off + len) / self.cs * self.cs;
                for (k, &g) in got.iter().enumerate() {
                    let p = off + k as u64;
                    let disc = self.discarded[p as usize];
                    let full = self.strict_discard && p >= first_full && p < end_full;
                    let ok = if full {
                        g == disc
                    } else {
                        g == disc || g == old[k]
                    };
                    if !ok {
                        panic!(
                            "after discard, byte {p} reads {g:#04x}; expected {} \
                             (old {:#04x}, discarded {disc:#04x})\n{}",
                            if full {
                                "the discard result (a fully covered cluster)"
                            } else {
                                "its old value or the discard result"
                            },
                            old[k],
                            self.ctx()
                        );
                    }
                }
                self.model.write(off, &got);
            }
            80..=89 => {
                self.log.push("flush".into());
                if let Err(e) = self.drv.flush() {
                    panic!("flush failed: {e}\n{}", self.ctx());
                }
            }
            _ => {
                self.log.push(format!("read({off}, {len})"));
            }
        }
        self.verify_around(off, len);
    }
}

/// Makes the backing file (if any) and returns the model's starting contents.
fn make_backing(cfg: &Config, dir: &Path, opts: &mut CreateOptions) -> Vec<u8> {
    let size = cfg.size;
    let bsize = if cfg.backing == Backing::ShortQcow2 {
        size / 2 + 4096
    } else {
        size
    };
    // Backing data: patterned stretches with holes between them.
    let mut data = vec![0u8; bsize as usize];
    for (i, chunk) in data.chunks_mut(192 * KIB as usize).enumerate() {
        if i % 3 != 2 {
            let off = i as u64 * 192 * KIB;
            chunk.copy_from_slice(&pattern(0xba5e, off, chunk.len()));
        }
    }
    let raw = dir.join("base.raw");
    std::fs::write(&raw, &data).unwrap();
    match cfg.backing {
        Backing::None => unreachable!(),
        Backing::Raw => {
            opts.backing_file = Some("base.raw".into());
            opts.backing_fmt = Some("raw".into());
        }
        Backing::Qcow2 | Backing::ShortQcow2 => {
            let q = dir.join("base.qcow2");
            qemu::img(&[
                "convert",
                "-f",
                "raw",
                "-O",
                "qcow2",
                "-o",
                "cluster_size=4096",
                s(&raw),
                s(&q),
            ])
            .ok();
            opts.backing_file = Some("base.qcow2".into());
            opts.backing_fmt = Some("qcow2".into());
        }
    }
    data.resize(size as usize, 0);
    data
}

fn open_rw(path: &Path, small_cache: bool) -> Arc<dyn FormatDriver> {
    let mut o = OpenOptions::default();
    if small_cache {
        o.l2_cache_size = Some(8 * KIB);
        o.refcount_cache_size = Some(8 * KIB);
    }
    open_image(path, &o).unwrap_or_else(|e| panic!("open_image({}) failed: {e}", path.display()))
}

/// Closes the image, then lets QEMU judge it against the model.
fn judge(name: &str, drv: Arc<dyn FormatDriver>, path: &Path, model: &Model, dir: &Path) {
    let format = drv.format_name();
    if let Err(e) = drv.close() {
        panic!("{name}: close failed: {e}");
    }
    drop(drv);
    let check = if format == "qcow2" {
        qemu::check(path)
    } else {
        qemu::img(&["info", "-f", format, s(path)])
    };
    if check.code != 0 {
        panic!(
            "{name}: `{}` exited {} (0 = clean, 2 = corruption, 3 = leaks):\n{}{}",
            check.cmdline, check.code, check.stdout, check.stderr
        );
    }
    let raw = dir.join("model.raw");
    model.save_raw(&raw);
    qemu::compare_with_raw(path, format, &raw);
    let ro = open_image(
        path,
        &OpenOptions {
            read_only: true,
            ..Default::default()
        },
    )
    .unwrap_or_else(|e| panic!("{name}: read-only reopen failed: {e}"));
    let got = read_all(ro.as_ref()).unwrap_or_else(|e| panic!("{name}: read failed: {e}"));
    assert_same_disk(&format!("{name}: library read-back"), &got, &model.data);
}

fn run(mut cfg: Config) {
    require_qemu!();
    let dir = tempdir();
    let path = dir.path().join("img.qcow2");
    let seed = seed(cfg.name);
    let mut opts = cfg.opts.clone();
    opts.size = Some(cfg.size);
    let start = if cfg.backing == Backing::None {
        vec![0u8; cfg.size as usize]
    } else {
        make_backing(&cfg, dir.path(), &mut opts)
    };
    cfg.opts = opts;
    create_image(&path, cfg.format, &cfg.opts)
        .unwrap_or_else(|e| panic!("{}: create_image failed: {e}", cfg.name));
    if cfg.format == Format::Qcow2 {
        // A fresh image must already be clean.
        let check = qemu::check(&path);
        assert_eq!(
            check.code, 0,
            "{}: qemu-img check of the fresh image:\n{}{}",
            cfg.name, check.stdout, check.stderr
        );
    }
    let cs = cluster_of(&cfg.opts);
    let discarded = if is_v2(&cfg.opts) && cfg.backing != Backing::None {
        start.clone()
    } else {
        vec![0u8; cfg.size as usize]
    };
    let mut r = Runner {
        name: cfg.name,
        drv: open_rw(&path, cfg.small_cache),
        model: Model::from_bytes(start),
        discarded,
        cs,
        strict_discard: cfg.format == Format::Qcow2,
        rng: StdRng::seed_from_u64(seed),
        log: Vec::new(),
    };
    for c in 0..cfg.compressed {
        let off = c as u64 * 2 * cs;
        let mut data = pattern(seed ^ 0xc0, off, cs as usize);
        if c % 2 == 0 {
            // Compressible: few distinct byte values.
            data.iter_mut().for_each(|b| *b &= 0x3);
        }
        r.log.push(format!("write_compressed({off}, {cs})"));
        if let Err(e) = r.drv.write_compressed(&data, off) {
            panic!("write_compressed failed: {e}\n{}", r.ctx());
        }
        r.model.write(off, &data);
        r.verify_around(off, cs);
    }
    for i in 0..cfg.ops {
        r.step(i, seed);
    }
    let drv = r.drv.clone();
    judge(cfg.name, drv, &path, &r.model, dir.path());

    // Second round on the reopened image.
    r.drv = open_rw(&path, cfg.small_cache);
    r.log.push("-- reopened --".into());
    for i in 0..cfg.ops / 2 {
        r.step(cfg.ops + i, seed.rotate_left(17));
    }
    let drv = r.drv.clone();
    judge(
        &format!("{} (second round)", cfg.name),
        drv,
        &path,
        &r.model,
        dir.path(),
    );
}

fn opts() -> CreateOptions {
    CreateOptions::default()
}

/// The raw driver under the same sequences: a control for the harness itself.
#[test]
fn raw_control() {
    let mut c = config("raw_control", opts());
    c.format = Format::Raw;
    run(c);
}

#[test]
fn default_options() {
    run(config("default_options", opts()));
}

#[test]
fn compat_0_10() {
    run(config(
        "compat_0_10",
        CreateOptions {
            compat: Some("0.10".into()),
            ..opts()
        },
    ));
}

#[test]
fn cluster_512() {
    let mut c = config(
        "cluster_512",
        CreateOptions {
            cluster_size: Some(512),
            ..opts()
        },
    );
    c.size = 4 * MIB;
    run(c);
}

#[test]
fn cluster_4k() {
    run(config(
        "cluster_4k",
        CreateOptions {
            cluster_size: Some(4096),
            ..opts()
        },
    ));
}

#[test]
fn cluster_2m() {
    let mut c = config(
        "cluster_2m",
        CreateOptions {
            cluster_size: Some(2 * MIB),
            ..opts()
        },
    );
    c.size = 32 * MIB;
    c.ops = 150;
    run(c);
}

#[test]
fn compat_0_10_cluster_4k() {
    run(config(
        "compat_0_10_cluster_4k",
        CreateOptions {
            compat: Some("0.10".into()),
            cluster_size: Some(4096),
            ..opts()
        },
    ));
}

fn refcount_bits(name: &'static str, bits: u32, cluster: u64) {
    run(config(
        name,
        CreateOptions {
            refcount_bits: Some(bits),
            cluster_size: Some(cluster),
            ..opts()
        },
    ));
}

#[test]
fn refcount_bits_1() {
    refcount_bits("refcount_bits_1", 1, 4096);
}

#[test]
fn refcount_bits_2() {
    refcount_bits("refcount_bits_2", 2, 4096);
}

#[test]
fn refcount_bits_8() {
    refcount_bits("refcount_bits_8", 8, 65536);
}

/// With 512-byte clusters and 64-bit refcounts a refcount block covers only 64
/// clusters, so the refcount table itself has to grow.
#[test]
fn refcount_bits_64_cluster_512() {
    let mut c = config(
        "refcount_bits_64_cluster_512",
        CreateOptions {
            refcount_bits: Some(64),
            cluster_size: Some(512),
            ..opts()
        },
    );
    c.size = 8 * MIB;
    run(c);
}

#[test]
fn lazy_refcounts() {
    run(config(
        "lazy_refcounts",
        CreateOptions {
            lazy_refcounts: true,
            ..opts()
        },
    ));
}

#[test]
fn extended_l2() {
    run(config(
        "extended_l2",
        CreateOptions {
            extended_l2: true,
            ..opts()
        },
    ));
}

#[test]
fn extended_l2_with_backing() {
    let mut c = config(
        "extended_l2_with_backing",
        CreateOptions {
            extended_l2: true,
            cluster_size: Some(32 * KIB),
            ..opts()
        },
    );
    c.backing = Backing::Qcow2;
    run(c);
}

#[test]
fn backing_raw() {
    let mut c = config("backing_raw", opts());
    c.backing = Backing::Raw;
    run(c);
}

#[test]
fn backing_qcow2() {
    let mut c = config("backing_qcow2", opts());
    c.backing = Backing::Qcow2;
    run(c);
}

#[test]
fn backing_qcow2_compat_0_10() {
    let mut c = config(
        "backing_qcow2_compat_0_10",
        CreateOptions {
            compat: Some("0.10".into()),
            ..opts()
        },
    );
    c.backing = Backing::Qcow2;
    run(c);
}

#[test]
fn backing_shorter_than_image() {
    let mut c = config(
        "backing_shorter_than_image",
        CreateOptions {
            cluster_size: Some(4096),
            ..opts()
        },
    );
    c.backing = Backing::ShortQcow2;
    run(c);
}

fn prealloc(name: &'static str, p: Preallocation) {
    run(config(
        name,
        CreateOptions {
            preallocation: p,
            ..opts()
        },
    ));
}

#[test]
fn prealloc_metadata() {
    prealloc("prealloc_metadata", Preallocation::Metadata);
}

#[test]
fn prealloc_falloc() {
    prealloc("prealloc_falloc", Preallocation::Falloc);
}

#[test]
fn prealloc_full() {
    prealloc("prealloc_full", Preallocation::Full);
}

#[test]
fn compressed_zlib() {
    let mut c = config(
        "compressed_zlib",
        CreateOptions {
            compression_type: Some("zlib".into()),
            ..opts()
        },
    );
    c.compressed = 40;
    run(c);
}

#[test]
fn compressed_zstd() {
    let mut c = config(
        "compressed_zstd",
        CreateOptions {
            compression_type: Some("zstd".into()),
            cluster_size: Some(4096),
            ..opts()
        },
    );
    c.compressed = 200;
    run(c);
}

#[test]
fn small_metadata_caches() {
    let mut c = config(
        "small_metadata_caches",
        CreateOptions {
            cluster_size: Some(4096),
            ..opts()
        },
    );
    c.small_cache = true;
    run(c);
}

/// Several threads write interleaved 4 KiB slots of the same 64 KiB clusters at once
/// (allocating writes to one cluster race), each checking its own slots as it goes.
#[test]
fn concurrent_writers() {
    require_qemu!();
    const THREADS: u64 = 4;
    const SLOT: u64 = 4096;
    let seed = seed("concurrent_writers");
    let dir = tempdir();
    let path = dir.path().join("img.qcow2");
    let size = 8 * MIB;
    create_image(
        &path,
        Format::Qcow2,
        &CreateOptions {
            size: Some(size),
            ..opts()
        },
    )
    .unwrap_or_else(|e| panic!("create_image failed: {e}"));
    let drv = open_rw(&path, false);
    let slots = size / SLOT;
    let results: Vec<Vec<(u64, Vec<u8>)>> = std::thread::scope(|sc| {
        let handles: Vec<_> = (0..THREADS)
            .map(|t| {
                let drv = drv.clone();
                sc.spawn(move || {
                    let mut rng = StdRng::seed_from_u64(seed ^ t);
                    let mut last = std::collections::HashMap::new();
                    for i in 0..600u64 {
                        let slot = rng.gen_range(0..slots / THREADS) * THREADS + t;
                        let off = slot * SLOT;
                        let data = pattern(seed ^ (t << 32) ^ i, off, SLOT as usize);
                        drv.write(&data, off)
                            .unwrap_or_else(|e| panic!("thread {t}: write({off}) failed: {e}"));
                        last.insert(off, data);
                        if i % 7 == 0 {
                            drv.flush().unwrap();
                        }
                        let check = *last.keys().nth(i as usize % last.len()).unwrap();
                        let mut buf = vec![0u8; SLOT as usize];
                        drv.read(&mut buf, check).unwrap();
                        assert!(
                            buf == last[&check],
                            "thread {t}: slot at {check} lost its last write"
                        );
                    }
                    last.into_iter().collect()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut model = Model::zeroed(size);
    for (off, data) in results.into_iter().flatten() {
        model.write(off, &data);
    }
    judge("concurrent_writers", drv, &path, &model, dir.path());
}

/// Random operations over an image holding internal snapshots made by qemu-img:
/// clusters shared with a snapshot must be copied on write, so afterwards
/// `qemu-img check` is clean and every snapshot still reads as it was taken.
fn over_snapshots(name: &'static str, create_opts: &str) {
    require_qemu!();
    let seed = seed(name);
    let dir = tempdir();
    let path = dir.path().join("img.qcow2");
    let size = 8 * MIB;
    qemu::create(&path, "qcow2", create_opts, &size.to_string());
    qemu::io(
        "qcow2",
        &path,
        &[
            "write -P 0x31 0 3M",
            "write -P 0x32 5M 1M",
            "write -z 1M 64k",
        ],
    );
    qemu::img(&["snapshot", "-c", "first", s(&path)]).ok();
    let first = qemu::to_raw(&path);
    qemu::io(
        "qcow2",
        &path,
        &["write -P 0x33 512k 1M", "discard 2M 512k"],
    );
    qemu::img(&["snapshot", "-c", "second", s(&path)]).ok();
    let second = qemu::to_raw(&path);
    // One more write, so the snapshot table does not end the file (that case has its
    // own test in qcow2_qemu_makes).
    qemu::io("qcow2", &path, &["write -P 0x34 7M 64k"]);
    let current = qemu::to_raw(&path);

    let mut r = Runner {
        name,
        drv: open_rw(&path, false),
        model: Model::from_bytes(current),
        discarded: vec![0u8; size as usize],
        cs: 64 * KIB,
        strict_discard: true,
        rng: StdRng::seed_from_u64(seed),
        log: Vec::new(),
    };
    for i in 0..300 {
        r.step(i, seed);
    }
    let drv = r.drv.clone();
    judge(name, drv, &path, &r.model, dir.path());
    for (snap, want) in [("first", &first), ("second", &second)] {
        let out = dir.path().join(format!("{snap}.raw"));
        qemu::img(&[
            "convert",
            "-O",
            "raw",
            "-l",
            &format!("snapshot.name={snap}"),
            s(&path),
            s(&out),
        ])
        .ok();
        let got = std::fs::read(&out).unwrap();
        assert_same_disk(
            &format!("{name}: snapshot {snap} after Strata's writes"),
            &got,
            want,
        );
    }
}

#[test]
fn writes_over_snapshots() {
    over_snapshots("writes_over_snapshots", "");
}

#[test]
fn writes_over_snapshots_compat_0_10() {
    over_snapshots("writes_over_snapshots_compat_0_10", "compat=0.10");
}

/// A lazy-refcounts image left dirty by a killed qemu-io: Strata must repair the
/// refcounts when it opens it read-write (as QEMU does), keep the data, and close it
/// clean.
#[test]
fn dirty_lazy_image_from_qemu() {
    require_qemu!();
    let seed = seed("dirty_lazy_image_from_qemu");
    let dir = tempdir();
    let path = dir.path().join("img.qcow2");
    let size = 8 * MIB;
    qemu::create(&path, "qcow2", "lazy_refcounts=on", &size.to_string());
    qemu::io("qcow2", &path, &["write -P 0x41 0 1M"]);
    let out = qemu::run(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "write -P 0x42 2M 1M",
            "-c",
            "write -P 0x43 6M 100k",
            "-c",
            "abort",
            s(&path),
        ],
    );
    assert_ne!(out.code, 0, "qemu-io abort should not exit cleanly");
    assert_ne!(qemu::check(&path).code, 0, "the image should need repair");
    let start = qemu::to_raw(&path);
    let mut r = Runner {
        name: "dirty_lazy_image_from_qemu",
        drv: open_rw(&path, false),
        model: Model::from_bytes(start),
        discarded: vec![0u8; size as usize],
        cs: 64 * KIB,
        strict_discard: true,
        rng: StdRng::seed_from_u64(seed),
        log: Vec::new(),
    };
    for i in 0..200 {
        r.step(i, seed);
    }
    let drv = r.drv.clone();
    judge(
        "dirty_lazy_image_from_qemu",
        drv,
        &path,
        &r.model,
        dir.path(),
    );
}

/// Random operations on an image carrying persistent dirty bitmaps made by qemu-img:
/// after Strata closes it, `qemu-img check` (which validates bitmaps too) must be clean,
/// the bitmaps must still be listed and not left marked in use.
#[test]
fn writes_with_dirty_bitmaps() {
    require_qemu!();
    let name = "writes_with_dirty_bitmaps";
    let seed = seed(name);
    let dir = tempdir();
    let path = dir.path().join("img.qcow2");
    let size = 8 * MIB;
    qemu::create(&path, "qcow2", "", &size.to_string());
    qemu::img(&["bitmap", "--add", s(&path), "b0"]).ok();
    qemu::io("qcow2", &path, &["write -P 0x51 0 1M"]);
    let start = qemu::to_raw(&path);
    let mut r = Runner {
        name,
        drv: open_rw(&path, false),
        model: Model::from_bytes(start),
        discarded: vec![0u8; size as usize],
        cs: 64 * KIB,
        strict_discard: true,
        rng: StdRng::seed_from_u64(seed),
        log: Vec::new(),
    };
    for i in 0..200 {
        r.step(i, seed);
    }
    let drv = r.drv.clone();
    judge(name, drv, &path, &r.model, dir.path());
    let info = qemu::img(&["info", "--output=json", s(&path)]).ok();
    let v: serde_json::Value = serde_json::from_str(&info.stdout).unwrap();
    let bitmaps = &v["format-specific"]["data"]["bitmaps"];
    assert_eq!(
        bitmaps[0]["name"], "b0",
        "{name}: the bitmap is gone:\n{}",
        info.stdout
    );
    assert!(
        !bitmaps[0]["flags"].to_string().contains("in-use"),
        "{name}: the bitmap was left in use:\n{}",
        info.stdout
    );
}

/// Growing an image (then writing into the new space) and shrinking it where nothing is
/// allocated past the new end; shrinking over allocated data must fail and change
/// nothing.
#[test]
fn resize_grow_and_shrink() {
    require_qemu!();
    let name = "resize_grow_and_shrink";
    let seed = seed(name);
    let dir = tempdir();
    let path = dir.path().join("img.qcow2");
    let size = 8 * MIB;
    create_image(
        &path,
        Format::Qcow2,
        &CreateOptions {
            size: Some(size),
            ..opts()
        },
    )
    .unwrap_or_else(|e| panic!("{name}: create_image failed: {e}"));
    let drv = open_rw(&path, false);
    let head = pattern(seed, 0, 3 * MIB as usize);
    drv.write(&head, 0).unwrap();
    drv.resize(24 * MIB, Preallocation::Off)
        .unwrap_or_else(|e| panic!("{name}: grow failed: {e}"));
    assert_eq!(drv.size(), 24 * MIB, "{name}: size after growing");
    let tail = pattern(seed ^ 1, 20 * MIB + 1234, 100_000);
    drv.write(&tail, 20 * MIB + 1234).unwrap();
    let mut model = Model::zeroed(24 * MIB);
    model.write(0, &head);
    model.write(20 * MIB + 1234, &tail);
    judge(name, drv, &path, &model, dir.path());

    let drv = open_rw(&path, false);
    assert!(
        drv.resize(4 * MIB, Preallocation::Off).is_err(),
        "{name}: shrinking over allocated data must fail"
    );
    assert_eq!(
        drv.size(),
        24 * MIB,
        "{name}: a failed shrink changed the size"
    );
    drv.resize(22 * MIB, Preallocation::Off)
        .unwrap_or_else(|e| panic!("{name}: shrink past the data failed: {e}"));
    model.data.truncate(22 * MIB as usize);
    judge(&format!("{name} (shrunk)"), drv, &path, &model, dir.path());
}
