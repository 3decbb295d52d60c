//! Deterministic data for writes: every byte depends on a seed and its guest offset, so
//! that data landing in the wrong place (or a stale cluster read back) shows up in a
//! comparison.

/// The byte a write with `seed` puts at guest offset `pos`.
pub fn byte(seed: u8, pos: u64) -> u8 {
    let x = pos.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ u64::from(seed).wrapping_mul(0x0101);
    (x >> 56) as u8 ^ seed
}

/// Fills `buf` with the pattern of `seed` for guest bytes starting at `pos`.
pub fn fill(buf: &mut [u8], seed: u8, pos: u64) {
    for (i, b) in buf.iter_mut().enumerate() {
        *b = byte(seed, pos + i as u64);
    }
}

/// Fills `buf` with highly compressible data: runs of 64 equal bytes.
pub fn fill_compressible(buf: &mut [u8], seed: u8, pos: u64) {
    for (i, b) in buf.iter_mut().enumerate() {
        *b = byte(seed, (pos + i as u64) / 64);
    }
}
