//! The bare-metal test guest of `tests/vmm_guest/` (nasm, PVH ELF): building it, reading
//! its serial report, and the disk contents each of its workloads leaves behind.
//!
//! The guest and its protocol are described in `tests/vmm_guest/README.md`; the
//! functions here are the host side of that description, shared by every test that boots
//! the guest (under QEMU or under `strata-vm`).

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// Sector size of the guest's requests.
pub const SECTOR: u64 = 512;
/// The guest's block unit (4 KiB).
pub const BLOCK: u64 = 4096;
/// Prefix of every line the guest prints.
pub const PREFIX: &str = "STRATA-GUEST: ";

/// Assembles the guest with `tests/vmm_guest/build.sh` into `target/<profile>/vmm-guest/`
/// (cached by the hash of its sources; built once per test binary) and returns the
/// ELF's path. `Err` says why it cannot be built here (nasm is missing); a failing
/// build panics.
pub fn build() -> Result<PathBuf, String> {
    static GUEST: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    GUEST
        .get_or_init(|| {
            let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("vmm_guest/build.sh");
            let out_dir = crate::profile_dir().join("vmm-guest");
            let out = crate::run_build_script(&script, &[&out_dir])?;
            let path = PathBuf::from(out.trim());
            assert!(
                path.is_file(),
                "{} printed {}, not a file",
                script.display(),
                path.display()
            );
            Ok(path)
        })
        .clone()
}

/// The guest's report: the text after [`PREFIX`] of every line that has it.
pub fn report(serial: &str) -> Vec<String> {
    serial
        .lines()
        .filter_map(|l| l.trim_end_matches('\r').find(PREFIX).map(|i| &l[i..]))
        .map(|l| l[PREFIX.len()..].trim_end().to_string())
        .collect()
}

/// The first report line that starts with `start`, if any.
pub fn line<'a>(report: &'a [String], start: &str) -> Option<&'a str> {
    report
        .iter()
        .find(|l| l.starts_with(start))
        .map(String::as_str)
}

/// The value of `key=value` in a report line (values end at a space).
pub fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split(' ')
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
}

/// Asserts that the report ends in `PASS` and has no `FAIL` line; the message shows the
/// whole serial output.
pub fn assert_pass(serial: &str) {
    let r = report(serial);
    let fails: Vec<&String> = r.iter().filter(|l| l.starts_with("FAIL")).collect();
    assert!(
        fails.is_empty() && r.iter().any(|l| l == "PASS"),
        "the guest did not pass: {fails:?}\nserial output:\n{serial}"
    );
}

/// The 32-byte line `"%08d %08d <tag>\n"` of the guest's patterns (`tag` is 13 bytes).
pub fn pattern_line(a: u64, b: u64, tag: &str) -> Vec<u8> {
    assert_eq!(tag.len(), 13, "tags are 13 bytes");
    let l = format!("{:08} {:08} {tag}\n", a % 100_000_000, b % 100_000_000);
    l.into_bytes()
}

/// `len` bytes of repeated [`pattern_line`]s.
pub fn pattern_fill(a: u64, b: u64, tag: &str, len: usize) -> Vec<u8> {
    pattern_line(a, b, tag).repeat(len / 32)
}

/// The 4 KiB block `k` as `test=basic` writes it in generation `generation`.
pub fn basic_block(k: u64, generation: u64) -> Vec<u8> {
    pattern_fill(k, generation, "strata-basics", BLOCK as usize)
}

/// The 4 KiB block stamp `n` leaves in block `block` (`test=stamp`).
pub fn stamp_block(n: u64, block: u64) -> Vec<u8> {
    pattern_fill(n, block, "strata-stamps", BLOCK as usize)
}

/// The block stamp `n` goes to, with `blocks` blocks in rotation.
pub fn stamp_target(n: u64, blocks: u64) -> u64 {
    ((n - 1) * 37) % blocks
}

/// What `test=basic` leaves in one place of the disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expect {
    /// Exactly these bytes.
    Bytes(Vec<u8>),
    /// Zeros.
    Zero,
    /// Either zeros or these bytes (a discarded block: the device may keep the data).
    ZeroOr(Vec<u8>),
}

/// The places `test=basic` writes on a disk of `capacity` sectors (initially zero), as
/// (byte offset, expectation) pairs; everything else must stay untouched.
/// `discard` / `write_zeroes`: whether the report shows those steps ran (they are
/// skipped when the device does not offer the feature).
pub fn basic_writes(capacity: u64, discard: bool, write_zeroes: bool) -> Vec<(u64, Expect)> {
    let nblocks = capacity / 8;
    let mut v = Vec::new();
    for k in [0, 1, 2, 8, 9, 10, 11, nblocks / 2] {
        v.push((k * BLOCK, Expect::Bytes(basic_block(k, 1))));
    }
    let last = capacity - 1;
    v.push((
        last * SECTOR,
        Expect::Bytes(pattern_fill(last, 1, "strata-basics", SECTOR as usize)),
    ));
    if write_zeroes {
        for k in 32..48 {
            let e = if (36..40).contains(&k) {
                Expect::Bytes(basic_block(k, 3))
            } else {
                Expect::Zero
            };
            v.push((k * BLOCK, e));
        }
    }
    if discard {
        for k in 64..80 {
            v.push((k * BLOCK, Expect::ZeroOr(basic_block(k, 2))));
        }
    }
    v
}

/// Checks a whole disk image (`disk`, raw bytes) against `writes` (from
/// [`basic_writes`] or similar): listed places hold what they should, and every other
/// byte is zero. Returns the number of `ZeroOr` places that read as zeros.
pub fn check_disk(disk: &[u8], writes: &[(u64, Expect)]) -> Result<usize, String> {
    let mut covered: Vec<(u64, u64)> = Vec::new();
    let mut zeroed = 0;
    for (off, e) in writes {
        let len = match e {
            Expect::Bytes(b) | Expect::ZeroOr(b) => b.len() as u64,
            Expect::Zero => BLOCK,
        };
        let got = disk
            .get(*off as usize..(*off + len) as usize)
            .ok_or_else(|| format!("offset {off} + {len} is past the disk's end"))?;
        let ok = match e {
            Expect::Bytes(b) => got == b.as_slice(),
            Expect::Zero => got.iter().all(|&x| x == 0),
            Expect::ZeroOr(b) => {
                if got.iter().all(|&x| x == 0) {
                    zeroed += 1;
                    true
                } else {
                    got == b.as_slice()
                }
            }
        };
        if !ok {
            return Err(format!(
                "disk bytes {off}..{} (block {}) are not as expected ({}): start {:?}",
                off + len,
                off / BLOCK,
                match e {
                    Expect::Bytes(_) => "the pattern",
                    Expect::Zero => "zeros",
                    Expect::ZeroOr(_) => "zeros or the pattern",
                },
                String::from_utf8_lossy(&got[..32.min(got.len())])
            ));
        }
        covered.push((*off, off + len));
    }
    covered.sort_unstable();
    let mut pos = 0u64;
    let check_zero = |from: u64, to: u64| -> Result<(), String> {
        match disk[from as usize..to as usize]
            .iter()
            .position(|&x| x != 0)
        {
            Some(i) => Err(format!(
                "byte {} (block {}) was written but no workload step writes there",
                from + i as u64,
                (from + i as u64) / BLOCK
            )),
            None => Ok(()),
        }
    };
    for (s, e) in covered {
        if s > pos {
            check_zero(pos, s)?;
        }
        pos = pos.max(e);
    }
    check_zero(pos, disk.len() as u64)?;
    Ok(zeroed)
}

/// The places `test=stamp:COUNT:BLOCKS` leaves: block b holds the last stamp n <= count
/// with [`stamp_target`]`(n) == b`; blocks no stamp reached are untouched (zero).
pub fn stamp_writes(count: u64, blocks: u64) -> Vec<(u64, Expect)> {
    let mut latest = vec![0u64; blocks as usize];
    for n in 1..=count {
        latest[stamp_target(n, blocks) as usize] = n;
    }
    latest
        .iter()
        .enumerate()
        .filter(|(_, &n)| n > 0)
        .map(|(b, &n)| (b as u64 * BLOCK, Expect::Bytes(stamp_block(n, b as u64))))
        .collect()
}

/// The cases `test=hostile` runs, in order. Each prints one line
/// `hostile <case> <outcome>`; see [`hostile_outcomes`].
pub const HOSTILE_CASES: &[&str] = &[
    "data-beyond-ram-in",
    "data-beyond-ram-out",
    "data-at-4g-top-in",
    "data-wraps-in",
    "header-beyond-ram",
    "status-beyond-ram",
    "chain-loop",
    "chain-self-loop",
    "chain-longer-than-queue",
    "next-out-of-range",
    "head-out-of-range",
    "avail-idx-far-ahead",
    "len-absurd-in",
    "len-absurd-out",
    "len-not-sector-multiple-in",
    "header-short-in",
    "header-short-out",
    "header-device-writable",
    "status-missing-in",
    "status-zero-length",
    "no-writable-descriptor-out",
    "indirect-not-negotiated",
    "type-0x55",
    "sector-beyond-capacity-in",
    "sector-beyond-capacity-out",
    "notify-bad-queue",
    "garbage-registers",
    "status-bits-cleared",
    "queue-num-above-max",
    "queue-moved-while-running",
    "queue-ready-cleared-while-running",
];

/// The outcome of each hostile case as reported (`status=<n>`, `status=none`,
/// `dropped`, `needs-reset`, `refused`, possibly followed by ` needs-reset`), in
/// [`HOSTILE_CASES`] order. `Err` names a case that has no line or an outcome that is not
/// one of those.
pub fn hostile_outcomes(report: &[String]) -> Result<Vec<(String, String)>, String> {
    let mut out = Vec::new();
    for case in HOSTILE_CASES {
        let prefix = format!("hostile {case} ");
        let l = report
            .iter()
            .find(|l| l.starts_with(&prefix))
            .ok_or_else(|| format!("no report line for hostile case {case}"))?;
        let outcome = l[prefix.len()..].to_string();
        let first = outcome.split(' ').next().unwrap_or("");
        let known = matches!(first, "dropped" | "needs-reset" | "refused" | "status=none")
            || first
                .strip_prefix("status=")
                .is_some_and(|n| n.parse::<u8>().is_ok());
        if !known {
            return Err(format!("hostile case {case}: unknown outcome `{outcome}`"));
        }
        out.push((case.to_string(), outcome));
    }
    Ok(out)
}

/// The places `test=hostile` writes validly: blocks 0..=4 hold generation-5
/// [`basic_block`]s. The invalid writes aim at blocks 16..=19 (and past the end of the
/// disk) and must leave them untouched, like the rest of the disk.
pub fn hostile_writes() -> Vec<(u64, Expect)> {
    (0..5)
        .map(|k| (k * BLOCK, Expect::Bytes(basic_block(k, 5))))
        .collect()
}
