//! Persistent dirty bitmaps in qcow2's bitmaps extension: reading the bitmap
//! directory and tables, loading bitmap data, storing bitmaps back (freeing the old
//! structures only after the header no longer points at them), and the `in_use` flag
//! that marks a bitmap inconsistent while the image is being modified.
//!
//! Bitmap data is a bit per `granularity` bytes of the virtual disk, least
//! significant bit first; a table entry of 0 stands for a cluster of zero bits.

use crate::driver::{BitmapInfo, BlockIo, PersistentBitmaps, StoredBitmap};
use crate::storage::Storage;
use crate::{Error, Result};

use super::header::AUTOCLEAR_BITMAPS;
use super::l2::OFFSET_MASK;
use super::meta::{Meta, PendingFree};
use super::Qcow2;

/// Directory flag: the bitmap may be inconsistent (its image was not closed cleanly).
pub const FLAG_IN_USE: u32 = 1 << 0;
/// Directory flag: the bitmap is enabled (records writes).
pub const FLAG_AUTO: u32 = 1 << 1;
/// Directory flag: unknown extra data may be kept.
pub const FLAG_EXTRA_DATA_COMPATIBLE: u32 = 1 << 2;
/// Most bitmaps an image may hold.
const MAX_BITMAPS: u32 = 65535;
/// Largest bitmap directory accepted.
const MAX_DIRECTORY: u64 = 64 << 20;
/// Largest bitmap data accepted, in bytes.
const MAX_BITMAP_BYTES: u64 = 512 << 20;
/// Longest bitmap name.
pub const MAX_NAME: usize = 1023;

/// One parsed bitmap directory entry.
#[derive(Debug, Clone)]
struct DirEntry {
    table_offset: u64,
    table_size: u32,
    flags: u32,
    kind: u8,
    granularity_bits: u8,
    name: String,
    extra: Vec<u8>,
    /// Offset of this entry inside the directory.
    pos: usize,
}

fn be32(b: &[u8], o: usize) -> u32 {
    u32::from_be_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}
fn be64(b: &[u8], o: usize) -> u64 {
    let mut a = [0; 8];
    a.copy_from_slice(&b[o..o + 8]);
    u64::from_be_bytes(a)
}

/// Bits a bitmap of `granularity` has over a disk of `size` bytes.
pub fn bit_count(size: u64, granularity: u64) -> u64 {
    size.div_ceil(granularity)
}

impl Qcow2 {
    /// The extension fields: (count, directory size, directory offset), if valid.
    fn bitmap_ext(m: &Meta) -> Option<(u32, u64, u64)> {
        if m.header.autoclear_features & AUTOCLEAR_BITMAPS == 0 {
            return None;
        }
        let ext = m.header.bitmaps_ext.as_ref()?;
        if ext.len() < 24 {
            return None;
        }
        Some((be32(ext, 0), be64(ext, 8), be64(ext, 16)))
    }

    fn read_directory(&self, m: &Meta, st: &dyn Storage) -> Result<(Vec<DirEntry>, Vec<u8>)> {
        let Some((nb, size, off)) = Self::bitmap_ext(m) else {
            return Ok((Vec::new(), Vec::new()));
        };
        let cs = self.geo.cs;
        if nb > MAX_BITMAPS || size > MAX_DIRECTORY || off % cs != 0 {
            return Err(Error::corrupt(
                "Invalid bitmap directory in the bitmaps extension",
            ));
        }
        if off
            .checked_add(size)
            .is_none_or(|e| e > st.size().unwrap_or(0))
        {
            return Err(Error::corrupt(
                "Bitmap directory lies beyond the end of the image",
            ));
        }
        let mut dir = vec![0u8; size as usize];
        st.read_at(&mut dir, off)?;
        let mut out = Vec::new();
        let mut p = 0usize;
        for _ in 0..nb {
            if p + 24 > dir.len() {
                return Err(Error::corrupt("Bitmap directory is truncated"));
            }
            let name_size = u16::from_be_bytes([dir[p + 18], dir[p + 19]]) as usize;
            let extra_size = be32(&dir, p + 20) as usize;
            let len = 24 + extra_size + name_size;
            if name_size == 0 || name_size > MAX_NAME || p + len > dir.len() {
                return Err(Error::corrupt("Bitmap directory entry is invalid"));
            }
            let extra = dir[p + 24..p + 24 + extra_size].to_vec();
            let name = String::from_utf8_lossy(&dir[p + 24 + extra_size..p + len]).into_owned();
            out.push(DirEntry {
                table_offset: be64(&dir, p),
                table_size: be32(&dir, p + 8),
                flags: be32(&dir, p + 12),
                kind: dir[p + 16],
                granularity_bits: dir[p + 17],
                name,
                extra,
                pos: p,
            });
            p += len.div_ceil(8) * 8;
        }
        Ok((out, dir))
    }

    fn load_one(&self, st: &dyn Storage, e: &DirEntry) -> Result<StoredBitmap> {
        let cs = self.geo.cs;
        if e.kind != 1 {
            return Err(Error::unsupported(format!(
                "Bitmap '{}' has an unsupported type {}",
                e.name, e.kind
            )));
        }
        if e.flags & !(FLAG_IN_USE | FLAG_AUTO | FLAG_EXTRA_DATA_COMPATIBLE) != 0 {
            return Err(Error::corrupt(format!(
                "Bitmap '{}' has reserved flags set",
                e.name
            )));
        }
        if !e.extra.is_empty() && e.flags & FLAG_EXTRA_DATA_COMPATIBLE == 0 {
            return Err(Error::unsupported(format!(
                "Bitmap '{}' has incompatible extra data",
                e.name
            )));
        }
        if !(9..=31).contains(&e.granularity_bits) {
            return Err(Error::corrupt(format!(
                "Bitmap '{}' has an invalid granularity",
                e.name
            )));
        }
        let granularity = 1u64 << e.granularity_bits;
        let nbits = bit_count(self.size(), granularity);
        let nbytes = nbits.div_ceil(8);
        if nbytes > MAX_BITMAP_BYTES {
            return Err(Error::unsupported(format!(
                "Bitmap '{}' is too large",
                e.name
            )));
        }
        let want_table = nbytes.div_ceil(cs);
        if e.table_size as u64 != want_table || e.table_offset % cs != 0 {
            return Err(Error::corrupt(format!(
                "Bitmap '{}' has an invalid bitmap table",
                e.name
            )));
        }
        let file_size = st.size()?;
        let tbytes = e.table_size as u64 * 8;
        if e.table_offset + tbytes > file_size {
            return Err(Error::corrupt(format!(
                "Bitmap table of '{}' lies beyond the end of the image",
                e.name
            )));
        }
        let mut table = vec![0u8; tbytes as usize];
        st.read_at(&mut table, e.table_offset)?;
        let mut bits = vec![0u8; nbytes as usize];
        for (k, chunk) in bits.chunks_mut(cs as usize).enumerate() {
            let entry = be64(&table, k * 8);
            let off = entry & OFFSET_MASK;
            if off == 0 {
                if entry & 1 != 0 {
                    chunk.fill(0xff);
                }
                continue;
            }
            if off % cs != 0 || off >= file_size {
                return Err(Error::corrupt(format!(
                    "Bitmap '{}' references data outside the image",
                    e.name
                )));
            }
            st.read_at(chunk, off)?;
        }
        // Bits past the end of the disk are not part of the bitmap.
        if nbits % 8 != 0 {
            if let Some(last) = bits.last_mut() {
                *last &= (1u8 << (nbits % 8)) - 1;
            }
        }
        Ok(StoredBitmap {
            name: e.name.clone(),
            granularity,
            in_use: e.flags & FLAG_IN_USE != 0,
            enabled: e.flags & FLAG_AUTO != 0,
            bits,
        })
    }

    /// Queues frees of every cluster the current bitmap structures use.
    fn free_bitmap_structures(&self, m: &mut Meta, st: &dyn Storage) -> Result<()> {
        let Some((_, size, off)) = Self::bitmap_ext(m) else {
            return Ok(());
        };
        let (entries, _) = self.read_directory(m, st)?;
        let cs = self.geo.cs;
        for e in entries {
            let mut table = vec![0u8; e.table_size as usize * 8];
            st.read_at(&mut table, e.table_offset)?;
            for k in 0..e.table_size as usize {
                let d = be64(&table, k * 8) & OFFSET_MASK;
                if d != 0 {
                    m.pending_frees.push(PendingFree {
                        offset: d,
                        len: cs,
                        discard: true,
                    });
                }
            }
            if e.table_size > 0 {
                m.pending_frees.push(PendingFree {
                    offset: e.table_offset,
                    len: table.len() as u64,
                    discard: false,
                });
            }
        }
        if size > 0 {
            m.pending_frees.push(PendingFree {
                offset: off,
                len: size,
                discard: false,
            });
        }
        Ok(())
    }

    fn write_header_cluster(&self, m: &mut Meta, st: &dyn Storage) -> Result<()> {
        let mut h = m.header.clone();
        let bytes = h.serialize()?;
        st.write_at(&bytes, 0)?;
        m.header = h;
        Ok(())
    }

    /// Before every modification: at the first one, stored bitmaps are loaded for
    /// tracking (unless a block layer tracks them) and marked in use; then the range
    /// is recorded in the tracked bitmaps that are enabled.
    pub(super) fn bitmaps_before_write(&self, offset: u64, len: u64) -> Result<()> {
        use std::sync::atomic::Ordering;
        if !self.bitmaps_marked.load(Ordering::Acquire) {
            if !self.bm_external.load(Ordering::Acquire) {
                let loaded = self.load_bitmaps()?;
                if !loaded.is_empty() {
                    *self.bm_track.lock().unwrap_or_else(|e| e.into_inner()) = Some(loaded);
                    self.bm_tracking.store(true, Ordering::Release);
                }
            }
            self.mark_bitmaps_in_use()?;
            self.bitmaps_marked.store(true, Ordering::Release);
        }
        if self.bm_tracking.load(Ordering::Acquire) && len > 0 {
            let size = self.size();
            let mut t = self.bm_track.lock().unwrap_or_else(|e| e.into_inner());
            for b in t.iter_mut().flatten() {
                if b.in_use || !b.enabled || offset >= size {
                    continue;
                }
                let nbits = bit_count(size, b.granularity);
                let first = offset / b.granularity;
                let last = ((offset + len - 1) / b.granularity).min(nbits.saturating_sub(1));
                for i in first..=last {
                    if let Some(byte) = b.bits.get_mut((i / 8) as usize) {
                        *byte |= 1 << (i % 8);
                    }
                }
            }
        }
        Ok(())
    }

    /// Stores the bitmaps this driver tracked (clean close).
    pub(super) fn store_tracked_bitmaps(&self) -> Result<()> {
        use std::sync::atomic::Ordering;
        if !self.bm_tracking.swap(false, Ordering::AcqRel) {
            return Ok(());
        }
        let tracked = self
            .bm_track
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        match tracked {
            Some(list) => self.store_bitmaps(&list),
            None => Ok(()),
        }
    }
}

impl PersistentBitmaps for Qcow2 {
    fn list_bitmaps(&self) -> Result<Vec<BitmapInfo>> {
        let m = self.lock();
        let (entries, _) = self.read_directory(&m, self.storage_ref())?;
        Ok(entries
            .into_iter()
            .map(|e| {
                let mut flags = Vec::new();
                if e.flags & FLAG_IN_USE != 0 {
                    flags.push("in-use".to_string());
                }
                if e.flags & FLAG_AUTO != 0 {
                    flags.push("auto".to_string());
                }
                BitmapInfo {
                    name: e.name,
                    granularity: 1u64 << e.granularity_bits.min(63),
                    flags,
                }
            })
            .collect())
    }

    fn load_bitmaps(&self) -> Result<Vec<StoredBitmap>> {
        let m = self.lock();
        let st = self.storage_ref();
        let (entries, _) = self.read_directory(&m, st)?;
        drop(m);
        entries.iter().map(|e| self.load_one(st, e)).collect()
    }

    fn store_bitmaps(&self, bitmaps: &[StoredBitmap]) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        if self.geo.version < 3 && !bitmaps.is_empty() {
            return Err(Error::unsupported(
                "Cannot store dirty bitmaps in qcow2 v2 files",
            ));
        }
        if bitmaps.len() > MAX_BITMAPS as usize {
            return Err(Error::invalid("Too many bitmaps"));
        }
        let cs = self.geo.cs;
        let st = self.storage_ref();
        let mut m = self.lock();
        self.free_bitmap_structures(&mut m, st)?;
        let mut dir = Vec::new();
        for b in bitmaps {
            if !b.granularity.is_power_of_two() || !(512..=(1u64 << 31)).contains(&b.granularity) {
                return Err(Error::invalid(format!(
                    "Bitmap '{}': invalid granularity {}",
                    b.name, b.granularity
                )));
            }
            if b.name.is_empty() || b.name.len() > MAX_NAME {
                return Err(Error::invalid("Bitmap name must be 1 to 1023 bytes long"));
            }
            let nbytes = bit_count(self.size(), b.granularity).div_ceil(8) as usize;
            let table_size = (nbytes as u64).div_ceil(cs);
            let mut table = Vec::with_capacity(table_size as usize * 8);
            for k in 0..table_size as usize {
                let start = k * cs as usize;
                let end = (start + cs as usize).min(nbytes);
                let mut chunk = vec![0u8; cs as usize];
                let src_end = end.min(b.bits.len());
                if start < src_end {
                    chunk[..src_end - start].copy_from_slice(&b.bits[start..src_end]);
                }
                if chunk.iter().all(|&x| x == 0) {
                    table.extend_from_slice(&0u64.to_be_bytes());
                } else {
                    let off = m.alloc_clusters(st, 1)?;
                    st.write_at(&chunk, off)?;
                    table.extend_from_slice(&off.to_be_bytes());
                }
            }
            let table_off = m.alloc_clusters(st, (table.len() as u64).div_ceil(cs).max(1))?;
            st.write_at(&table, table_off)?;
            let start = dir.len();
            dir.extend_from_slice(&table_off.to_be_bytes());
            dir.extend_from_slice(&(table_size as u32).to_be_bytes());
            let mut flags = 0u32;
            if b.in_use {
                flags |= FLAG_IN_USE;
            }
            if b.enabled {
                flags |= FLAG_AUTO;
            }
            dir.extend_from_slice(&flags.to_be_bytes());
            dir.push(1);
            dir.push(b.granularity.trailing_zeros() as u8);
            dir.extend_from_slice(&(b.name.len() as u16).to_be_bytes());
            dir.extend_from_slice(&0u32.to_be_bytes());
            dir.extend_from_slice(b.name.as_bytes());
            while (dir.len() - start) % 8 != 0 {
                dir.push(0);
            }
        }
        if bitmaps.is_empty() {
            m.header.bitmaps_ext = None;
            m.header.autoclear_features &= !AUTOCLEAR_BITMAPS;
        } else {
            let dir_off = m.alloc_clusters(st, (dir.len() as u64).div_ceil(cs))?;
            st.write_at(&dir, dir_off)?;
            let mut ext = Vec::with_capacity(24);
            ext.extend_from_slice(&(bitmaps.len() as u32).to_be_bytes());
            ext.extend_from_slice(&0u32.to_be_bytes());
            ext.extend_from_slice(&(dir.len() as u64).to_be_bytes());
            ext.extend_from_slice(&dir_off.to_be_bytes());
            m.header.bitmaps_ext = Some(ext);
            m.header.autoclear_features |= AUTOCLEAR_BITMAPS;
        }
        // New structures and their refcounts reach the disk before the header points
        // at them; the old ones are freed by the flush after the header is written.
        m.flush_rc(st)?;
        st.flush()?;
        self.write_header_cluster(&mut m, st)?;
        st.flush()?;
        m.flush(st)?;
        use std::sync::atomic::Ordering;
        self.bitmaps_marked
            .store(bitmaps.iter().all(|b| b.in_use), Ordering::Release);
        Ok(())
    }

    fn track_externally(&self) {
        use std::sync::atomic::Ordering;
        self.bm_external.store(true, Ordering::Release);
        self.bm_tracking.store(false, Ordering::Release);
        *self.bm_track.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    fn mark_bitmaps_in_use(&self) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        let m = self.lock();
        let st = self.storage_ref();
        let Some((_, _, off)) = Self::bitmap_ext(&m) else {
            return Ok(());
        };
        let (entries, mut dir) = self.read_directory(&m, st)?;
        let mut changed = false;
        for e in &entries {
            if e.flags & FLAG_IN_USE == 0 {
                let f = e.flags | FLAG_IN_USE;
                dir[e.pos + 12..e.pos + 16].copy_from_slice(&f.to_be_bytes());
                changed = true;
            }
        }
        if changed {
            st.write_at(&dir, off)?;
            st.flush()?;
        }
        Ok(())
    }
}
