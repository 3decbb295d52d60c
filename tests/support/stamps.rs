//! The point-in-time checker for the "stamp" workloads of the test guests
//! (`tests/guest/init.sh` under QEMU, `tests/vmm_guest` under strata-vm).
//!
//! Stamp `n` (1, 2, 3, ...) is written, one complete request after the other, to
//! 4 KiB block `((n - 1) * 37) % blocks` as 128 lines of 32 bytes
//! `"%08d %08d strata-stamps\n"` (n, block). Any moment of that sequence is fully
//! determined by the highest stamp written so far; [`check`] finds it and verifies
//! that every block holds what it held at that moment, so a copy of the disk that
//! mixes moments, misses acknowledged writes or holds torn blocks fails it.

/// Bytes in one stamped block.
pub const BLOCK: usize = 4096;

/// The block stamp `n` (1-based) goes to on a stamp area of `blocks` blocks.
pub fn block_of(n: u64, blocks: u64) -> u64 {
    ((n - 1) * 37) % blocks
}

/// Why a copy is not a state the stamp workload passed through.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Inconsistency {
    /// Block `block` holds stamp `holds`, older than the `want` it held once stamp `high`
    /// (the highest in the copy) was written: the copy mixes moments.
    Stale {
        /// The block.
        block: u64,
        /// The stamp it holds.
        holds: u64,
        /// The stamp it held at the moment of `high`.
        want: u64,
        /// The highest stamp in the copy.
        high: u64,
    },
    /// Anything else (torn block, foreign data, wrong size).
    Other(String),
}

impl std::fmt::Display for Inconsistency {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Inconsistency::Stale {
                block,
                holds,
                want,
                high,
            } => write!(
                f,
                "block {block} holds stamp {holds}, but the state at stamp {high} has {want}"
            ),
            Inconsistency::Other(s) => f.write_str(s),
        }
    }
}

/// Checks that `disk` is a state the stamp workload over `blocks` blocks passed
/// through: for the highest stamp H found, block b holds the last stamp n <= H with
/// `block_of(n) == b`, and everything else is zero. Returns H.
pub fn check(disk: &[u8], blocks: u64) -> Result<u64, String> {
    check_detailed(disk, blocks).map_err(|e| e.to_string())
}

/// Reads the file at `path` while something else writes it, the way a naive copy of a
/// live disk does: `chunk` bytes at a time with `pause` after each, in a scattered
/// order (chunk `i * 29 mod n` as the i-th read; 29 is odd, so with a power-of-two
/// number of chunks each is read once), as a copy tool with several workers would. A
/// writer that moves through the disk in one direction cannot keep up with such a
/// reader, so its writes land both in chunks already copied and in chunks still to come.
pub fn read_live(
    path: &std::path::Path,
    chunk: usize,
    pause: std::time::Duration,
) -> std::io::Result<Vec<u8>> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(path)?;
    let len = f.metadata()?.len() as usize;
    let n = len.div_ceil(chunk);
    let mut out = vec![0u8; len];
    let mut seen = vec![false; n];
    for i in 0..n {
        let mut c = (i * 29) % n;
        while seen[c] {
            c = (c + 1) % n;
        }
        seen[c] = true;
        let start = c * chunk;
        let end = (start + chunk).min(len);
        f.read_exact_at(&mut out[start..end], start as u64)?;
        std::thread::sleep(pause);
    }
    Ok(out)
}

/// [`check`] with the kind of inconsistency.
pub fn check_detailed(disk: &[u8], blocks: u64) -> Result<u64, Inconsistency> {
    use Inconsistency::Other;
    let area = blocks as usize * BLOCK;
    if disk.len() < area {
        return Err(Other(format!(
            "disk of {} bytes is smaller than the stamp area",
            disk.len()
        )));
    }
    if blocks % 37 == 0 {
        return Err(Other(
            "the stamp area must not be a multiple of 37 blocks".into(),
        ));
    }
    let mut found = Vec::with_capacity(blocks as usize);
    for b in 0..blocks as usize {
        let blk = &disk[b * BLOCK..(b + 1) * BLOCK];
        if blk.iter().all(|&x| x == 0) {
            found.push(0u64);
            continue;
        }
        let line = &blk[..32];
        if blk.chunks(32).any(|c| c != line) {
            return Err(Other(format!("block {b} is torn")));
        }
        let text = String::from_utf8_lossy(line);
        let mut it = text.split_whitespace();
        let mut field = || -> Result<u64, String> {
            it.next()
                .and_then(|x| x.parse().ok())
                .ok_or(format!("block {b}: not a stamp: {text:?}"))
        };
        let n = field().map_err(Other)?;
        let idx = field().map_err(Other)?;
        if idx != b as u64 || n == 0 || block_of(n, blocks) != b as u64 {
            return Err(Other(format!("block {b} holds stamp {n} of block {idx}")));
        }
        found.push(n);
    }
    let h = found.iter().copied().max().unwrap_or(0);
    let inv = (1..blocks).find(|&x| (37 * x) % blocks == 1).unwrap_or(1);
    for (b, &n) in found.iter().enumerate() {
        let b = b as u64;
        // The first stamp that lands on b, then every `blocks`-th after it.
        let first = (b * inv) % blocks + 1;
        let want = if h >= first {
            first + blocks * ((h - first) / blocks)
        } else {
            0
        };
        if n != want {
            return Err(Inconsistency::Stale {
                block: b,
                holds: n,
                want,
                high: h,
            });
        }
    }
    if let Some(i) = disk[area..].iter().position(|&x| x != 0) {
        return Err(Other(format!(
            "non-zero byte at {} past the stamp area",
            area + i
        )));
    }
    Ok(h)
}

/// The negative control of a live backup: up to `copies` copies of the raw disk at
/// `path` read behind the writer's back (with [`read_live`]: 1 MiB pieces, `pause`
/// after each) while the guest stamps. Returns how many were rejected with a stale
/// block, printing every verdict. `floor` gives the stamps known to be on the disk
/// when a copy starts: a copy holding fewer is a failure of the harness, not a stale
/// copy. Stops early once a stale copy was seen after three copies.
pub fn stale_live_copies(
    path: &std::path::Path,
    blocks: u64,
    copies: usize,
    pause: std::time::Duration,
    floor: impl Fn() -> u64,
) -> usize {
    let mut stale = 0;
    for i in 0..copies {
        let floor = floor();
        let data = read_live(path, 1 << 20, pause).expect("read the live disk");
        let verdict = check_detailed(&data, blocks);
        println!("live copy {i} (at least {floor} stamps on disk): {verdict:?}");
        match verdict {
            Err(Inconsistency::Stale { high, .. }) => {
                assert!(high >= floor, "copy {i}: highest stamp {high} < {floor}");
                stale += 1;
            }
            Err(Inconsistency::Other(e)) => {
                // A torn block is also a real inconsistency, but not the one looked for.
                println!("live copy {i}: other inconsistency: {e}");
            }
            Ok(h) => assert!(h >= floor, "copy {i}: holds {h}, {floor} were on disk"),
        }
        if stale > 0 && i >= 2 {
            break;
        }
    }
    stale
}

/// The verdict on a live backup of a stamping guest: `data` (the backup, as raw) must
/// be one moment of the stamp sequence, at or after `before` (the stamps on disk when
/// the job started), and the guest must have written more than `min_during` stamps
/// past that moment by `after` (the stamps on disk at the end), so that the backup
/// really ran under writes. Returns the backup's stamp.
pub fn assert_backup_point_in_time(
    data: &[u8],
    blocks: u64,
    before: u64,
    after: u64,
    min_during: u64,
) -> u64 {
    let h = check(data, blocks).unwrap_or_else(|e| panic!("backup is not point-in-time: {e}"));
    assert!(
        h >= before,
        "backup holds stamps up to {h}, but {before} were on disk when it started"
    );
    assert!(
        after > h + min_during,
        "the guest did not keep writing during the backup ({h} in the backup, {after} at the end)"
    );
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stamp(disk: &mut [u8], n: u64, blocks: u64) {
        let b = block_of(n, blocks) as usize;
        let line = format!("{n:08} {b:08} strata-stamps\n");
        for c in disk[b * BLOCK..(b + 1) * BLOCK].chunks_mut(32) {
            c.copy_from_slice(line.as_bytes());
        }
    }

    #[test]
    fn moments_pass_and_mixtures_fail() {
        let blocks = 64;
        let mut disk = vec![0u8; (blocks as usize + 4) * BLOCK];
        assert_eq!(check(&disk, blocks), Ok(0));
        for n in 1..=150 {
            stamp(&mut disk, n, blocks);
        }
        assert_eq!(check(&disk, blocks), Ok(150));
        // A copy that missed stamp 120 (its block still holds 56) is no moment.
        let mut mixed = disk.clone();
        stamp(&mut mixed, 120 - blocks, blocks);
        assert_eq!(
            check_detailed(&mixed, blocks),
            Err(Inconsistency::Stale {
                block: block_of(120, blocks),
                holds: 120 - blocks,
                want: 120,
                high: 150
            })
        );
        // A torn block.
        let mut torn = disk.clone();
        torn[5 * BLOCK + 100] ^= 1;
        assert!(check(&torn, blocks).is_err());
        // Garbage past the area.
        let mut tail = disk.clone();
        tail[blocks as usize * BLOCK + 7] = 1;
        assert!(check(&tail, blocks).is_err());
    }
}
