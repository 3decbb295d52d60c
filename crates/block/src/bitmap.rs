//! Dirty bitmaps: a bit per `granularity` bytes of a node's virtual disk, set by every
//! write, zero write and discard that reaches the node while the bitmap records.
//!
//! Semantics follow QEMU's block layer: `count` is in bytes (set bits times the
//! granularity), a bitmap can be disabled, made busy by an operation, and frozen with
//! a *successor* that records new writes while a job uses the parent; the job then
//! either abdicates (the successor replaces the parent) or reclaims (the successor is
//! merged back into the parent).

use std::sync::{Arc, Mutex, MutexGuard};

use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::error::{BlockError, BlockResult};

/// Smallest granularity QEMU accepts.
pub const MIN_GRANULARITY: u64 = 512;
/// Largest granularity QEMU accepts (2 GiB).
pub const MAX_GRANULARITY: u64 = 1 << 31;

/// The most bits a bitmap may have (1 GiB of memory).
const MAX_BITS: u64 = 1 << 33;

/// Checks a bitmap granularity with QEMU's message.
pub fn check_granularity(g: u64) -> BlockResult<()> {
    if !g.is_power_of_two() || g < MIN_GRANULARITY {
        return Err(BlockError::generic(
            "Granularity must be power of 2 and at least 512",
        ));
    }
    if g > MAX_GRANULARITY {
        return Err(BlockError::generic(
            "Granularity must be power of 2 and at most 2147483648",
        ));
    }
    Ok(())
}

#[derive(Debug)]
struct State {
    name: Option<String>,
    granularity: u64,
    disk_size: u64,
    words: Vec<u64>,
    set_bits: u64,
    enabled: bool,
    persistent: bool,
    inconsistent: bool,
    busy: bool,
    successor: Option<Arc<DirtyBitmap>>,
}

impl State {
    fn nbits(&self) -> u64 {
        self.disk_size.div_ceil(self.granularity)
    }

    fn bit(&self, i: u64) -> bool {
        self.words[(i / 64) as usize] >> (i % 64) & 1 != 0
    }

    /// Sets (`value`) or clears bits `[first, last]`.
    fn fill(&mut self, first: u64, last: u64, value: bool) {
        let mut i = first;
        while i <= last {
            let w = (i / 64) as usize;
            let lo = i % 64;
            let hi = if last / 64 == i / 64 { last % 64 } else { 63 };
            let mask = if hi - lo == 63 {
                u64::MAX
            } else {
                ((1u64 << (hi - lo + 1)) - 1) << lo
            };
            let before = (self.words[w] & mask).count_ones() as u64;
            if value {
                self.words[w] |= mask;
                self.set_bits += (hi - lo + 1) - before;
            } else {
                self.words[w] &= !mask;
                self.set_bits -= before;
            }
            i = (i / 64 + 1) * 64;
        }
    }

    fn bit_range(&self, offset: u64, len: u64) -> Option<(u64, u64)> {
        if len == 0 || offset >= self.disk_size {
            return None;
        }
        let end = (offset + len).min(self.disk_size);
        Some((offset / self.granularity, (end - 1) / self.granularity))
    }
}

/// One dirty bitmap.
#[derive(Debug)]
pub struct DirtyBitmap {
    state: Mutex<State>,
}

impl DirtyBitmap {
    /// A new, empty, enabled bitmap over a disk of `disk_size` bytes.
    pub fn new(name: Option<String>, granularity: u64, disk_size: u64) -> BlockResult<Arc<Self>> {
        check_granularity(granularity)?;
        let nbits = disk_size.div_ceil(granularity);
        // At most 1 GiB of bits: enough for 512 PiB at 64 KiB granularity.
        if nbits > MAX_BITS {
            return Err(BlockError::generic(format!(
                "Bitmap would need {} bytes of memory; use a larger granularity",
                nbits.div_ceil(8)
            )));
        }
        let words = vec![0u64; nbits.div_ceil(64) as usize];
        Ok(Arc::new(DirtyBitmap {
            state: Mutex::new(State {
                name,
                granularity,
                disk_size,
                words,
                set_bits: 0,
                enabled: true,
                persistent: false,
                inconsistent: false,
                busy: false,
                successor: None,
            }),
        }))
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The name (`None` for anonymous bitmaps such as successors).
    pub fn name(&self) -> Option<String> {
        self.lock().name.clone()
    }

    /// Renames the bitmap.
    pub fn set_name(&self, name: Option<String>) {
        self.lock().name = name;
    }

    /// Bytes per bit.
    pub fn granularity(&self) -> u64 {
        self.lock().granularity
    }

    /// The disk size the bitmap covers.
    pub fn disk_size(&self) -> u64 {
        self.lock().disk_size
    }

    /// Dirty bytes: set bits times the granularity (QEMU's `count`).
    pub fn count(&self) -> u64 {
        let s = self.lock();
        s.set_bits * s.granularity
    }

    /// Whether the bitmap records writes.
    pub fn enabled(&self) -> bool {
        self.lock().enabled
    }

    /// Enables or disables recording.
    pub fn set_enabled(&self, on: bool) {
        self.lock().enabled = on;
    }

    /// Whether the bitmap is stored in the image on close.
    pub fn persistent(&self) -> bool {
        self.lock().persistent
    }

    /// Sets the persistence flag.
    pub fn set_persistent(&self, on: bool) {
        self.lock().persistent = on;
    }

    /// Whether the bitmap was found in use at load (its contents cannot be trusted).
    pub fn inconsistent(&self) -> bool {
        self.lock().inconsistent
    }

    /// Marks the bitmap inconsistent.
    pub fn set_inconsistent(&self, on: bool) {
        self.lock().inconsistent = on;
    }

    /// Whether an operation (a job) holds the bitmap.
    pub fn busy(&self) -> bool {
        let s = self.lock();
        s.busy || s.successor.is_some()
    }

    /// Marks the bitmap busy (or not).
    pub fn set_busy(&self, on: bool) {
        self.lock().busy = on;
    }

    /// Whether the bitmap is frozen with a successor.
    pub fn frozen(&self) -> bool {
        self.lock().successor.is_some()
    }

    /// Records a write to `[offset, offset + len)` if the bitmap is enabled.
    pub fn mark(&self, offset: u64, len: u64) {
        let mut s = self.lock();
        if !s.enabled {
            return;
        }
        if let Some((a, b)) = s.bit_range(offset, len) {
            s.fill(a, b, true);
        }
    }

    /// Sets the bits of a range regardless of recording state.
    pub fn set_range(&self, offset: u64, len: u64) {
        let mut s = self.lock();
        if let Some((a, b)) = s.bit_range(offset, len) {
            s.fill(a, b, true);
        }
    }

    /// Clears the bits of a range.
    pub fn reset_range(&self, offset: u64, len: u64) {
        let mut s = self.lock();
        if let Some((a, b)) = s.bit_range(offset, len) {
            s.fill(a, b, false);
        }
    }

    /// Clears every bit.
    pub fn clear(&self) {
        let mut s = self.lock();
        s.words.iter_mut().for_each(|w| *w = 0);
        s.set_bits = 0;
    }

    /// Whether the byte at `offset` is in a dirty chunk.
    pub fn get(&self, offset: u64) -> bool {
        let s = self.lock();
        offset < s.disk_size && s.bit(offset / s.granularity)
    }

    /// The start of the first dirty chunk at or after `offset` and before `end`.
    pub fn next_dirty(&self, offset: u64, end: u64) -> Option<u64> {
        let s = self.lock();
        let end = end.min(s.disk_size);
        let mut i = offset / s.granularity;
        let last = end.div_ceil(s.granularity);
        while i < last {
            let w = s.words[(i / 64) as usize] >> (i % 64);
            if w == 0 {
                i = (i / 64 + 1) * 64;
                continue;
            }
            i += w.trailing_zeros() as u64;
            if i >= last {
                break;
            }
            return Some((i * s.granularity).max(offset));
        }
        None
    }

    /// The start of the first clean chunk at or after `offset` (at most `end`).
    pub fn next_clean(&self, offset: u64, end: u64) -> u64 {
        let s = self.lock();
        let end = end.min(s.disk_size);
        let mut i = offset / s.granularity;
        let last = end.div_ceil(s.granularity);
        while i < last {
            let w = !(s.words[(i / 64) as usize]) >> (i % 64);
            if w == 0 {
                i = (i / 64 + 1) * 64;
                continue;
            }
            i += w.trailing_zeros() as u64;
            if i >= last {
                break;
            }
            return (i * s.granularity).max(offset).min(end);
        }
        end
    }

    /// Adds every dirty chunk of `other` (any granularity, same disk size).
    pub fn merge_from(&self, other: &DirtyBitmap) -> BlockResult<()> {
        if std::ptr::eq(self, other) {
            return Ok(());
        }
        let ranges = other.dirty_ranges();
        let mut s = self.lock();
        for (off, len) in ranges {
            if let Some((a, b)) = s.bit_range(off, len) {
                s.fill(a, b, true);
            }
        }
        Ok(())
    }

    /// Every dirty extent as (offset, length) in bytes.
    pub fn dirty_ranges(&self) -> Vec<(u64, u64)> {
        let size = self.disk_size();
        let mut out = Vec::new();
        let mut pos = 0;
        while let Some(d) = self.next_dirty(pos, size) {
            let c = self.next_clean(d, size);
            out.push((d, c - d));
            pos = c;
            if c >= size {
                break;
            }
        }
        out
    }

    /// The bits as bytes, least significant bit first (`ceil(bits / 8)` bytes).
    pub fn to_bytes(&self) -> Vec<u8> {
        let s = self.lock();
        let n = s.nbits().div_ceil(8) as usize;
        let mut out = Vec::with_capacity(n + 8);
        for w in &s.words {
            out.extend_from_slice(&w.to_le_bytes());
        }
        out.truncate(n);
        out
    }

    /// Replaces the bits from bytes laid out as [`DirtyBitmap::to_bytes`] makes them.
    pub fn load_bytes(&self, bytes: &[u8]) {
        let mut s = self.lock();
        let nbits = s.nbits();
        for (i, w) in s.words.iter_mut().enumerate() {
            let mut b = [0u8; 8];
            for (k, x) in b.iter_mut().enumerate() {
                *x = bytes.get(i * 8 + k).copied().unwrap_or(0);
            }
            *w = u64::from_le_bytes(b);
        }
        if nbits % 64 != 0 {
            if let Some(last) = s.words.last_mut() {
                *last &= (1u64 << (nbits % 64)) - 1;
            }
        }
        s.set_bits = s.words.iter().map(|w| w.count_ones() as u64).sum();
    }

    /// QEMU's `x-debug-block-dirty-bitmap-sha256`: SHA-256 of the bits as 64-bit
    /// little-endian words.
    pub fn sha256(&self) -> String {
        let s = self.lock();
        let mut h = Sha256::new();
        for w in &s.words {
            h.update(w.to_le_bytes());
        }
        h.finalize().iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Follows a disk resize: bits past the new end are dropped, new bits are clean.
    pub fn resize(&self, new_size: u64) {
        let mut s = self.lock();
        let old_bits = s.nbits();
        s.disk_size = new_size;
        let nbits = s.nbits();
        s.words.resize(nbits.div_ceil(64) as usize, 0);
        if nbits < old_bits && nbits % 64 != 0 {
            if let Some(last) = s.words.last_mut() {
                *last &= (1u64 << (nbits % 64)) - 1;
            }
        }
        s.set_bits = s.words.iter().map(|w| w.count_ones() as u64).sum();
    }

    /// Freezes the bitmap: returns a new anonymous successor that takes over
    /// recording (enabled if the parent was), while the parent stops recording.
    pub fn create_successor(&self) -> BlockResult<Arc<DirtyBitmap>> {
        let mut s = self.lock();
        if s.successor.is_some() {
            return Err(BlockError::generic(
                "Cannot create a successor for a bitmap that already has one",
            ));
        }
        let succ = DirtyBitmap::new(None, s.granularity, s.disk_size)?;
        succ.set_enabled(s.enabled);
        s.enabled = false;
        s.successor = Some(succ.clone());
        Ok(succ)
    }

    /// Ends a freeze successfully: the successor's contents replace the parent's, the
    /// parent records again as the successor did. Returns the successor (now empty
    /// of meaning; the caller drops it from its node).
    pub fn abdicate(&self) -> BlockResult<Arc<DirtyBitmap>> {
        let succ = self
            .lock()
            .successor
            .take()
            .ok_or_else(|| BlockError::generic("Bitmap has no successor"))?;
        let bytes = succ.to_bytes();
        let enabled = succ.enabled();
        self.load_bytes(&bytes);
        self.set_enabled(enabled);
        Ok(succ)
    }

    /// Ends a freeze unsuccessfully: the successor is merged into the parent, which
    /// records again as the successor did. Returns the successor.
    pub fn reclaim(&self) -> BlockResult<Arc<DirtyBitmap>> {
        let succ = self
            .lock()
            .successor
            .take()
            .ok_or_else(|| BlockError::generic("Bitmap has no successor"))?;
        self.merge_from(&succ)?;
        let enabled = succ.enabled();
        self.set_enabled(enabled);
        Ok(succ)
    }

    /// `BlockDirtyInfo` as QEMU 10 prints it in `query-named-block-nodes`.
    pub fn info(&self) -> Value {
        let s = self.lock();
        let mut v = json!({});
        if let Some(n) = &s.name {
            v["name"] = json!(n);
        }
        // A frozen bitmap records through its successor (QEMU's
        // bdrv_dirty_bitmap_recording).
        let succ_recording = s.successor.as_ref().is_some_and(|b| b.enabled());
        v["recording"] = json!(s.enabled || succ_recording);
        v["persistent"] = json!(s.persistent);
        v["busy"] = json!(s.busy || s.successor.is_some());
        v["granularity"] = json!(s.granularity);
        v["count"] = json!(s.set_bits * s.granularity);
        if s.inconsistent {
            v["inconsistent"] = json!(true);
        }
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mark_count_and_ranges() {
        let b = DirtyBitmap::new(Some("b".into()), 65536, 64 << 20).unwrap();
        b.mark(65536 + 1, 10);
        b.mark(10 << 20, 65536 * 3);
        assert_eq!(b.count(), 4 * 65536);
        assert_eq!(
            b.dirty_ranges(),
            vec![(65536, 65536), (10 << 20, 3 * 65536)]
        );
        b.reset_range(10 << 20, 65536);
        assert_eq!(b.count(), 3 * 65536);
        assert_eq!(b.next_dirty(0, 64 << 20), Some(65536));
        assert_eq!(b.next_clean(65536, 64 << 20), 131072);
    }

    #[test]
    fn sha256_matches_qemu_layout() {
        // QEMU hashes the bits as 64-bit little-endian words: 1024 bits here.
        let b = DirtyBitmap::new(Some("b".into()), 65536, 64 << 20).unwrap();
        b.mark(0, 1);
        b.mark(2 * 65536, 1);
        b.mark(31 * 65536, 1);
        assert_eq!(
            b.sha256(),
            "c7912e67e1e1328edf545f489528ef64a791750290ff12e883ec6fc385b28226"
        );
    }

    #[test]
    fn successor_abdicate_and_reclaim() {
        let b = DirtyBitmap::new(Some("b".into()), 512, 1 << 20).unwrap();
        b.mark(0, 512);
        let s = b.create_successor().unwrap();
        assert!(b.busy() && !b.enabled() && s.enabled());
        s.mark(4096, 512);
        b.reclaim().unwrap();
        assert_eq!(b.count(), 1024);
        assert!(b.enabled() && !b.busy());
        let s = b.create_successor().unwrap();
        s.mark(8192, 512);
        b.abdicate().unwrap();
        assert_eq!(b.dirty_ranges(), vec![(8192, 512)]);
    }

    #[test]
    fn bad_granularity() {
        assert!(DirtyBitmap::new(None, 1000, 1 << 20).is_err());
        assert!(DirtyBitmap::new(None, 256, 1 << 20).is_err());
        assert!(DirtyBitmap::new(None, 1 << 32, 1 << 20).is_err());
    }

    #[test]
    fn bytes_round_trip_and_resize() {
        let b = DirtyBitmap::new(None, 512, 100_000).unwrap();
        b.mark(0, 100_000);
        let bytes = b.to_bytes();
        assert_eq!(bytes.len(), 100_000usize.div_ceil(512).div_ceil(8));
        let c = DirtyBitmap::new(None, 512, 100_000).unwrap();
        c.load_bytes(&bytes);
        assert_eq!(c.count(), b.count());
        c.resize(50_000);
        assert_eq!(c.count(), 50_000u64.div_ceil(512) * 512);
    }
}
