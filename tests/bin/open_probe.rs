//! `open-probe`: opens one image through the library and reports what happened, for the
//! bad-input test, which runs it in a child process under a memory limit so that a panic,
//! an abort or a runaway allocation cannot take the test itself down.
//!
//! Usage: `open-probe <image> <ro|rw>`
//!
//! Prints exactly one result line on stdout and exits 0:
//! - `OPEN-ERR <message>`: `open_image` refused the image,
//! - `READ-ERR <offset> <message>`: it opened, but reading the disk failed,
//! - `CLOSE-ERR <message>`: everything read, but closing failed,
//! - `OK <fnv64 of the disk> <virtual size>`: the whole disk (at most its first
//!   64 MiB) read without error.
//!
//! Any other exit (a panic is 101) is a failure of the library.

use std::path::PathBuf;

use strata_image::{open_image, OpenOptions};
use strata_tests::{fnv64, MIB};

/// How much of a disk the probe reads at most.
const READ_LIMIT: u64 = 64 * MIB;

fn one_line(msg: impl std::fmt::Display) -> String {
    msg.to_string().replace('\n', "\\n")
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 3 || !matches!(args[2].as_str(), "ro" | "rw") {
        eprintln!("usage: open-probe <image> <ro|rw>");
        std::process::exit(2);
    }
    let path = PathBuf::from(&args[1]);
    let opts = OpenOptions {
        read_only: args[2] == "ro",
        ..Default::default()
    };
    let drv = match open_image(&path, &opts) {
        Ok(d) => d,
        Err(e) => {
            println!("OPEN-ERR {}", one_line(e));
            return;
        }
    };
    let size = drv.size();
    let len = size.min(READ_LIMIT);
    let mut data = vec![0u8; len as usize];
    let mut off = 0u64;
    while off < len {
        let end = (off + MIB).min(len);
        if let Err(e) = drv.read(&mut data[off as usize..end as usize], off) {
            println!("READ-ERR {off} {}", one_line(e));
            return;
        }
        off = end;
    }
    if let Err(e) = drv.close() {
        println!("CLOSE-ERR {}", one_line(e));
        return;
    }
    println!("OK {:016x} {size}", fnv64(&data));
}
