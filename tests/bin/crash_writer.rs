//! `crash-writer`: the child process of the crash-consistency test.
//!
//! Usage: `crash-writer <image> <log> <seed> <first-seq> [cache-mode]`
//!
//! Opens `<image>` read-write through `strata_image::open_image` and, until it is killed,
//! issues batches of sector-aligned writes and write-zeroes followed by a flush. Every
//! request gets a sequence number; every 512-byte sector of a write holds
//! [`strata_tests::crash_record`]`(seq, offset)`, so the parent can tell exactly which
//! write a sector came from.
//!
//! The log is a text file, one line per event:
//! - `W <seq> <offset> <len>` / `Z <seq> <offset> <len>`: appended *before* the request is
//!   issued (a plain write; the page cache survives SIGKILL),
//! - `F <seq>`: appended after a flush that followed request `<seq>` returned, and
//!   fsync'd: every request up to `<seq>` is durable.

use std::fs::OpenOptions as FsOpenOptions;
use std::io::Write;
use std::path::PathBuf;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use strata_image::storage::CacheMode;
use strata_image::{open_image, OpenOptions};
use strata_tests::{crash_record, RECORD};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if !(5..=6).contains(&args.len()) {
        eprintln!("usage: crash-writer <image> <log> <seed> <first-seq> [cache-mode]");
        std::process::exit(2);
    }
    let image = PathBuf::from(&args[1]);
    let log_path = PathBuf::from(&args[2]);
    let seed: u64 = args[3].parse().expect("seed");
    let mut seq: u64 = args[4].parse().expect("first-seq");

    let mut log = FsOpenOptions::new()
        .append(true)
        .create(true)
        .open(&log_path)
        .unwrap_or_else(|e| fail(&format!("open log: {e}")));
    let cache = match args.get(5) {
        Some(c) => CacheMode::parse(c).unwrap_or_else(|e| fail(&format!("cache mode: {e}"))),
        None => OpenOptions::default().cache,
    };
    let drv = open_image(
        &image,
        &OpenOptions {
            cache,
            ..Default::default()
        },
    )
    .unwrap_or_else(|e| fail(&format!("open_image: {e}")));
    let sectors = drv.size() / RECORD;
    let cluster = drv.cluster_size().unwrap_or(65536);
    let mut rng = StdRng::seed_from_u64(seed);

    loop {
        let batch = rng.gen_range(1..=8);
        for _ in 0..batch {
            let n = if rng.gen_bool(0.3) {
                (cluster / RECORD).max(1)
            } else {
                rng.gen_range(1..=64u64)
            }
            .min(sectors);
            let start = rng.gen_range(0..=sectors - n);
            let (off, len) = (start * RECORD, n * RECORD);
            let zero = rng.gen_bool(0.12);
            let line = format!("{} {seq} {off} {len}\n", if zero { 'Z' } else { 'W' });
            log.write_all(line.as_bytes())
                .unwrap_or_else(|e| fail(&format!("log: {e}")));
            let res = if zero {
                drv.write_zeroes(off, len, rng.gen_bool(0.5))
            } else {
                let mut buf = Vec::with_capacity(len as usize);
                for k in 0..n {
                    buf.extend_from_slice(&crash_record(seq, off + k * RECORD));
                }
                drv.write(&buf, off)
            };
            if let Err(e) = res {
                fail(&format!("request {seq} ({off}, {len}): {e}"));
            }
            seq += 1;
        }
        if let Err(e) = drv.flush() {
            fail(&format!("flush after {}: {e}", seq - 1));
        }
        log.write_all(format!("F {}\n", seq - 1).as_bytes())
            .and_then(|_| log.sync_data())
            .unwrap_or_else(|e| fail(&format!("log: {e}")));
    }
}

fn fail(msg: &str) -> ! {
    eprintln!("crash-writer: {msg}");
    std::process::exit(1);
}
