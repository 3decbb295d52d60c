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

/// Checks that `disk` is a state the stamp workload over `blocks` blocks passed
/// through: for the highest stamp H found, block b holds the last stamp n <= H with
/// `block_of(n) == b`, and everything else is zero. Returns H.
pub fn check(disk: &[u8], blocks: u64) -> Result<u64, String> {
    let area = blocks as usize * BLOCK;
    if disk.len() < area {
        return Err(format!(
            "disk of {} bytes is smaller than the stamp area",
            disk.len()
        ));
    }
    if blocks % 37 == 0 {
        return Err("the stamp area must not be a multiple of 37 blocks".into());
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
            return Err(format!("block {b} is torn"));
        }
        let text = String::from_utf8_lossy(line);
        let mut it = text.split_whitespace();
        let mut field = || -> Result<u64, String> {
            it.next()
                .and_then(|x| x.parse().ok())
                .ok_or(format!("block {b}: not a stamp: {text:?}"))
        };
        let n = field()?;
        let idx = field()?;
        if idx != b as u64 || n == 0 || block_of(n, blocks) != b as u64 {
            return Err(format!("block {b} holds stamp {n} of block {idx}"));
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
            return Err(format!(
                "block {b} holds stamp {n}, but the state at stamp {h} has {want}"
            ));
        }
    }
    if let Some(i) = disk[area..].iter().position(|&x| x != 0) {
        return Err(format!("non-zero byte at {} past the stamp area", area + i));
    }
    Ok(h)
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
        assert!(check(&mixed, blocks).is_err());
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
