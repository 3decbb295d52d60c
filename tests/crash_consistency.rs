//! Crash consistency: `kill -9` at random moments.
//!
//! The `crash-writer` child (tests/bin/crash_writer.rs) writes recognisable records and
//! flushes, logging each request before issuing it and each completed flush after it
//! (fsync'd). The parent SIGKILLs it after a random delay, then:
//!
//! - `qemu-img check` must find no corruption: exit 0, or 3 (leaks only). A dirty
//!   lazy-refcounts image is checked on a copy with `-r all`, as QEMU repairs it on open,
//!   and must come out clean.
//! - Every 512-byte sector must hold what some request put there: the last request
//!   covering it that was durable (flushed) when the child died, or a later one. Every
//!   sector is checked through the library (read-only open) after every kill, and
//!   through `qemu-img convert -O raw` every few kills.
//!
//! The next child reopens the same image (recovering whatever state the kill left) and
//! carries on with fresh sequence numbers, so kills also land during open and recovery.
//! `STRATA_CRASH_ITERATIONS` sets the kill points per configuration (default 100).

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use strata_image::{create_image, open_image, CreateOptions, Format, OpenOptions};
use strata_tests::{
    crash_record, qcow2, qemu, read_all, require_qemu, s, seed, tempdir, MIB, RECORD, RECORD_MAGIC,
};

/// What the log says happened, per sector.
struct History {
    /// For each sector, the requests that covered it: (seq, is write-zeroes), in order.
    sectors: Vec<Vec<(u64, bool)>>,
    /// Durable requests: for each child run, from its first sequence number up to the
    /// last request before its last completed flush. (A request logged by a run that
    /// was killed before flushing may never have been issued at all, so a later run's
    /// flush says nothing about it.)
    durable: Vec<(u64, u64)>,
    /// The next sequence number to hand out.
    next_seq: u64,
    /// How far the log has been parsed.
    log_pos: usize,
    /// Requests seen in total.
    requests: u64,
}

impl History {
    fn new(size: u64) -> Self {
        History {
            sectors: vec![Vec::new(); (size / RECORD) as usize],
            durable: Vec::new(),
            next_seq: 1,
            log_pos: 0,
            requests: 0,
        }
    }

    /// Parses new complete lines of the log; a torn last line (the child died while
    /// appending it, before issuing its request) is cut off the file.
    fn read_log(&mut self, log: &Path, run_first_seq: u64) {
        let Ok(bytes) = std::fs::read(log) else {
            return;
        };
        let complete = bytes.iter().rposition(|&b| b == b'\n').map_or(0, |p| p + 1);
        if complete < bytes.len() {
            let f = std::fs::OpenOptions::new().write(true).open(log).unwrap();
            f.set_len(complete as u64).unwrap();
        }
        let text = std::str::from_utf8(&bytes[self.log_pos..complete]).expect("log is text");
        for line in text.lines() {
            let f: Vec<&str> = line.split(' ').collect();
            let num = |i: usize| -> u64 {
                f.get(i)
                    .and_then(|v| v.parse().ok())
                    .unwrap_or_else(|| panic!("bad log line {line:?}"))
            };
            match f[0] {
                "W" | "Z" => {
                    let (seq, off, len) = (num(1), num(2), num(3));
                    for sec in off / RECORD..(off + len) / RECORD {
                        self.sectors[sec as usize].push((seq, f[0] == "Z"));
                    }
                    self.next_seq = self.next_seq.max(seq + 1);
                    self.requests += 1;
                }
                "F" => {
                    let upto = num(1);
                    match self.durable.last_mut() {
                        Some((lo, hi)) if *lo == run_first_seq => *hi = (*hi).max(upto),
                        _ => self.durable.push((run_first_seq, upto)),
                    }
                }
                _ => panic!("bad log line {line:?}"),
            }
        }
        self.log_pos = complete;
    }

    /// The requests whose data a sector may hold: the last durable one (or the initial
    /// zeroes) and everything after it. Returns (may be zero, acceptable data seqs).
    fn acceptable(&self, sector: usize) -> (bool, Vec<u64>) {
        let ops = &self.sectors[sector];
        let d = ops.iter().rposition(|&(seq, _)| self.is_durable(seq));
        let from = d.unwrap_or(0);
        let mut zero = d.is_none();
        let mut data = Vec::new();
        for &(seq, is_zero) in &ops[from..] {
            if is_zero {
                zero = true;
            } else {
                data.push(seq);
            }
        }
        (zero, data)
    }

    fn is_durable(&self, seq: u64) -> bool {
        self.durable
            .iter()
            .any(|&(lo, hi)| (lo..=hi).contains(&seq))
    }

    /// The last durable request, for messages.
    fn last_durable(&self) -> Option<u64> {
        self.durable.last().map(|&(_, hi)| hi)
    }

    /// Checks every sector of `disk` against the log.
    fn verify(&self, disk: &[u8], via: &str) -> Result<(), String> {
        for (i, sector) in disk.chunks(RECORD as usize).enumerate() {
            let off = i as u64 * RECORD;
            let (may_zero, seqs) = self.acceptable(i);
            if sector.iter().all(|&b| b == 0) {
                if may_zero {
                    continue;
                }
                return Err(format!(
                    "{via}: sector at {off} reads as zeroes, but request(s) {seqs:?} \
                     were written there and the last of them up to the durable point \
                     {:?} was flushed",
                    self.last_durable()
                ));
            }
            if &sector[..8] != RECORD_MAGIC {
                return Err(format!(
                    "{via}: sector at {off} holds bytes no request wrote (starts {:02x?})",
                    &sector[..16]
                ));
            }
            let seq = u64::from_le_bytes(sector[8..16].try_into().unwrap());
            let at = u64::from_le_bytes(sector[16..24].try_into().unwrap());
            if at != off {
                return Err(format!(
                    "{via}: sector at {off} holds request {seq}'s record for offset {at}"
                ));
            }
            if sector != crash_record(seq, off).as_slice() {
                return Err(format!(
                    "{via}: sector at {off} holds a torn record of request {seq}"
                ));
            }
            if !seqs.contains(&seq) {
                return Err(format!(
                    "{via}: sector at {off} holds request {seq}, but the acceptable \
                     contents are {} request(s) {seqs:?} (durable up to {:?}): a flushed \
                     write was lost",
                    if may_zero { "zeroes or" } else { "" },
                    self.last_durable()
                ));
            }
        }
        Ok(())
    }

    /// Forgets history that can no longer matter (before each sector's durable request).
    fn compact(&mut self) {
        let mut sectors = std::mem::take(&mut self.sectors);
        for ops in &mut sectors {
            if let Some(d) = ops.iter().rposition(|&(seq, _)| self.is_durable(seq)) {
                ops.drain(..d);
            }
        }
        self.sectors = sectors;
    }
}

fn is_dirty(path: &Path) -> bool {
    let mut h = vec![0u8; 80];
    use std::io::Read;
    File::open(path).unwrap().read_exact(&mut h).unwrap();
    qcow2::get_u32(&h, qcow2::field::VERSION) >= 3
        && qcow2::get_u64(&h, qcow2::field::INCOMPATIBLE_FEATURES) & 1 != 0
}

/// What `qemu-img check` found after a kill.
#[derive(Default)]
struct Found {
    clean: usize,
    leaks: usize,
    dirty: usize,
}

/// `qemu-img check` after a kill: no corruption allowed, leaks are.
fn check_after_kill(path: &Path, scratch: &Path, what: &str, found: &mut Found) {
    if is_dirty(path) {
        found.dirty += 1;
        // QEMU repairs a dirty lazy-refcounts image when it opens it read-write; a
        // plain check would report the stale refcounts QEMU is about to fix.
        std::fs::copy(path, scratch).unwrap();
        let out = qemu::img(&["check", "-r", "all", "-f", "qcow2", s(scratch)]);
        if out.code != 0 {
            panic!(
                "{what}: the dirty image does not repair cleanly: `{}` exited {}\n{}{}",
                out.cmdline, out.code, out.stdout, out.stderr
            );
        }
    } else {
        let out = qemu::check(path);
        match out.code {
            0 => found.clean += 1,
            3 => found.leaks += 1,
            _ => {}
        }
        if out.code != 0 && out.code != 3 {
            panic!(
                "{what}: `{}` exited {} (2 = corruption):\n{}{}",
                out.cmdline, out.code, out.stdout, out.stderr
            );
        }
    }
}

fn iterations() -> usize {
    std::env::var("STRATA_CRASH_ITERATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100)
}

fn crash_test(name: &str, opts: CreateOptions) {
    crash_test_format(name, Format::Qcow2, opts, iterations(), None);
}

/// Kills a writer of `format` `iters` times; `cache` is the writer's cache mode
/// (its default, writeback, when `None`).
fn crash_test_format(
    name: &str,
    format: Format,
    opts: CreateOptions,
    iters: usize,
    cache: Option<&str>,
) {
    require_qemu!();
    let seed = seed(name);
    let mut rng = StdRng::seed_from_u64(seed);
    let dir = tempdir();
    let image = dir.path().join(format!("img.{}", format.name()));
    let log = dir.path().join("writer.log");
    let stderr_path = dir.path().join("writer.stderr");
    let scratch = dir.path().join("scratch.qcow2");
    let size = 32 * MIB;
    create_image(
        &image,
        format,
        &CreateOptions {
            size: Some(size),
            ..opts
        },
    )
    .unwrap_or_else(|e| panic!("{name}: create_image failed: {e}"));
    let writer = PathBuf::from(env!("CARGO_BIN_EXE_crash-writer"));
    let mut hist = History::new(size);
    let mut found = Found::default();
    for it in 0..iters {
        let what = format!("{name}: kill {it} (seed {seed})");
        let first_seq = hist.next_seq;
        let mut child = Command::new(&writer)
            .args([
                s(&image),
                s(&log),
                &(seed ^ ((it as u64) << 20)).to_string(),
                &first_seq.to_string(),
            ])
            .args(cache)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&stderr_path).unwrap())
            .spawn()
            .expect("spawn crash-writer");
        let delay = if rng.gen_bool(0.1) {
            rng.gen_range(0..3000)
        } else {
            rng.gen_range(3000..60000)
        };
        std::thread::sleep(Duration::from_micros(delay));
        if let Some(status) = child.try_wait().unwrap() {
            panic!(
                "{what}: crash-writer stopped on its own ({status}):\n{}",
                std::fs::read_to_string(&stderr_path).unwrap_or_default()
            );
        }
        child.kill().unwrap();
        child.wait().unwrap();
        hist.read_log(&log, first_seq);

        if format == Format::Qcow2 {
            check_after_kill(&image, &scratch, &what, &mut found);
        }

        let drv = open_image(
            &image,
            &OpenOptions {
                read_only: true,
                ..Default::default()
            },
        )
        .unwrap_or_else(|e| panic!("{what}: read-only open failed: {e}"));
        let disk = read_all(drv.as_ref()).unwrap_or_else(|e| panic!("{what}: read failed: {e}"));
        drop(drv);
        if let Err(e) = hist.verify(&disk, "library") {
            panic!("{what}: {e}");
        }
        if it % 8 == 0 {
            let disk = qemu::to_raw(&image);
            if let Err(e) = hist.verify(&disk, "qemu-img convert") {
                panic!("{what}: {e}");
            }
        }
        hist.compact();
    }
    assert!(
        !hist.durable.is_empty(),
        "{name}: no flush completed in {iters} runs; the writer never got going"
    );
    println!(
        "{name}: {iters} kill points, {} requests, durable up to {:?}; after the kills \
         qemu-img check found {} clean, {} with leaks, {} dirty (repaired on a copy)",
        hist.requests,
        hist.last_durable(),
        found.clean,
        found.leaks,
        found.dirty
    );
}

/// The raw driver under the same kills: a control for the harness itself.
#[test]
fn crash_raw_control() {
    crash_test_format(
        "crash_raw_control",
        Format::Raw,
        CreateOptions::default(),
        iterations() / 3,
        None,
    );
}

/// `cache=none`: allocating writes go to file space reserved ahead with `fallocate`
/// (where the file system allows it); a kill leaves that tail behind, and the image
/// must still check without corruption (leaks are allowed, as after any crash) and
/// hold every flushed write.
#[test]
fn crash_cache_none() {
    crash_test_format(
        "crash_cache_none",
        Format::Qcow2,
        CreateOptions::default(),
        iterations() / 2,
        Some("none"),
    );
}

#[test]
fn crash_default() {
    crash_test("crash_default", CreateOptions::default());
}

#[test]
fn crash_lazy_refcounts() {
    crash_test(
        "crash_lazy_refcounts",
        CreateOptions {
            lazy_refcounts: true,
            ..Default::default()
        },
    );
}

#[test]
fn crash_compat_0_10_cluster_4k() {
    crash_test(
        "crash_compat_0_10_cluster_4k",
        CreateOptions {
            compat: Some("0.10".into()),
            cluster_size: Some(4096),
            ..Default::default()
        },
    );
}

#[test]
fn crash_refcount_bits_1_cluster_512() {
    crash_test(
        "crash_refcount_bits_1_cluster_512",
        CreateOptions {
            refcount_bits: Some(1),
            cluster_size: Some(512),
            ..Default::default()
        },
    );
}

#[test]
fn crash_extended_l2() {
    crash_test(
        "crash_extended_l2",
        CreateOptions {
            extended_l2: true,
            ..Default::default()
        },
    );
}
