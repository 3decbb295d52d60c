//! qcow2 metadata state and the operations on it: L1/L2 lookup through a bounded
//! cache, refcounts, cluster allocation (growing the refcount structures as needed),
//! deferred frees and the ordered metadata flush.
//!
//! Everything here runs with the image's metadata lock held; data I/O never does.
//!
//! Crash-safety ordering, as QEMU does it: dirty refcount blocks are written and
//! flushed before dirty L2 tables; L2 tables before an L1 that points at them; and a
//! cluster's refcount is only dropped after the L2 entry that referenced it is on disk.

use std::cell::OnceCell;
use std::collections::HashSet;

use crate::storage::Storage;
use crate::{Error, Result};

use super::cache::TableCache;
use super::header::{Header, OFF_INCOMPAT, OFF_L1, OFF_REFTABLE};
use super::l2::{L2Table, L1E_RESERVED, OFFSET_MASK, OFLAG_COPIED};
use super::refcount;
use super::snapshot::Snapshot;

/// Fixed facts about an open image's layout.
#[derive(Debug, Clone, Copy)]
pub struct Geometry {
    /// log2 cluster size.
    pub cluster_bits: u32,
    /// Cluster size in bytes.
    pub cs: u64,
    /// Extended L2 entries.
    pub ext: bool,
    /// log2 subcluster size.
    pub sc_bits: u32,
    /// Entries per L2 table.
    pub l2_entries: u64,
    /// log2 of entries per L2 table.
    pub l2_bits: u32,
    /// log2 refcount width.
    pub refcount_order: u32,
    /// Refcount entries per refcount block.
    pub rb_entries: u64,
    /// 0 zlib, 1 zstd.
    pub compression_type: u8,
    /// 2 or 3.
    pub version: u32,
}

impl Geometry {
    /// Derives the geometry from a validated header.
    pub fn from_header(h: &Header) -> Self {
        let ext = h.extended_l2();
        let cb = h.cluster_bits;
        let l2_bits = cb - 3 - u32::from(ext);
        Geometry {
            cluster_bits: cb,
            cs: 1 << cb,
            ext,
            sc_bits: if ext { cb - 5 } else { cb },
            l2_entries: 1 << l2_bits,
            l2_bits,
            refcount_order: h.refcount_order,
            rb_entries: (1u64 << (cb + 3)) >> h.refcount_order,
            compression_type: h.compression_type,
            version: h.version,
        }
    }

    /// Bytes of guest data one L2 table maps.
    pub fn l2_span(&self) -> u64 {
        self.cs << self.l2_bits
    }

    /// L1 entries needed for a virtual size.
    pub fn l1_entries_for(&self, size: u64) -> u64 {
        size.div_ceil(self.l2_span())
    }
}

/// A free queued until the metadata that referenced it is on disk.
#[derive(Debug, Clone, Copy)]
pub struct PendingFree {
    /// Host byte offset.
    pub offset: u64,
    /// Length in bytes.
    pub len: u64,
    /// Pass the freed space down to the file as a discard.
    pub discard: bool,
}

/// The mutable metadata of an open qcow2 image.
pub struct Meta {
    /// Layout facts.
    pub geo: Geometry,
    /// The header as last written.
    pub header: Header,
    /// The active L1 table.
    pub l1: Vec<u64>,
    /// The in-memory L1 differs from disk.
    pub l1_dirty: bool,
    /// Cached L2 tables by host offset.
    pub l2_cache: TableCache<L2Table>,
    /// The refcount table.
    pub rc_table: Vec<u64>,
    /// Cached refcount blocks by host offset.
    pub rc_cache: TableCache<Vec<u8>>,
    /// Where the next cluster search starts.
    pub free_hint: u64,
    /// One past the highest cluster ever allocated or present in the file.
    pub end_cluster: u64,
    /// Frees waiting for the next metadata flush.
    pub pending_frees: Vec<PendingFree>,
    /// Next free byte for compressed data (0 = start a new cluster).
    pub free_byte_offset: u64,
    /// Internal snapshots.
    pub snapshots: Vec<Snapshot>,
    /// Guest clusters with an allocating request in flight.
    pub inflight: HashSet<u64>,
    /// The image was found corrupt while open; writes are refused.
    pub corrupt: bool,
    /// Sorted host offsets of the active L2 tables and the refcount blocks, for
    /// [`Meta::check_data_overlap`]; built on first use, dropped by
    /// [`Meta::tables_changed`] whenever `l1` or `rc_table` changes.
    table_index: OnceCell<Vec<(u64, &'static str)>>,
}

fn be64s(b: &[u8]) -> Vec<u64> {
    b.chunks_exact(8)
        .map(|c| u64::from_be_bytes(c.try_into().unwrap_or([0; 8])))
        .collect()
}

fn to_be(words: &[u64]) -> Vec<u8> {
    let mut out = Vec::with_capacity(words.len() * 8);
    for w in words {
        out.extend_from_slice(&w.to_be_bytes());
    }
    out
}

impl Meta {
    /// Loads L1 and refcount table for a parsed header.
    pub fn load(
        st: &dyn Storage,
        header: Header,
        l2_cache_bytes: u64,
        rc_cache_bytes: u64,
    ) -> Result<Meta> {
        let geo = Geometry::from_header(&header);
        let mut l1b = vec![0u8; header.l1_size as usize * 8];
        st.read_at(&mut l1b, header.l1_table_offset)?;
        let l1 = be64s(&l1b);
        let mut rtb = vec![0u8; (header.refcount_table_clusters as u64 * geo.cs) as usize];
        st.read_at(&mut rtb, header.refcount_table_offset)?;
        let rc_table = be64s(&rtb);
        let table_bytes = geo.cs * if geo.ext { 2 } else { 1 };
        let end_cluster = st.size()?.div_ceil(geo.cs);
        Ok(Meta {
            geo,
            header,
            l1,
            l1_dirty: false,
            l2_cache: TableCache::new((l2_cache_bytes / table_bytes.min(geo.cs)) as usize),
            rc_table,
            rc_cache: TableCache::new((rc_cache_bytes / geo.cs) as usize),
            free_hint: 1,
            end_cluster,
            pending_frees: Vec::new(),
            free_byte_offset: 0,
            snapshots: Vec::new(),
            inflight: HashSet::new(),
            table_index: OnceCell::new(),
            corrupt: false,
        })
    }

    /// Fails if a host range overlaps the header, the active L1 table or the
    /// refcount table: a corrupt L2 entry must never let guest data overwrite them.
    pub fn check_overlap(&self, offset: u64, len: u64, what: &str) -> Result<()> {
        let h = &self.header;
        let ranges = [
            (0u64, self.geo.cs, "qcow2_header"),
            (h.l1_table_offset, h.l1_size as u64 * 8, "active L1 table"),
            (
                h.refcount_table_offset,
                h.refcount_table_clusters as u64 * self.geo.cs,
                "refcount table",
            ),
        ];
        for (start, rlen, name) in ranges {
            if rlen > 0 && offset < start + rlen && start < offset + len {
                return Err(Error::corrupt(format!(
                    "Preventing invalid write on metadata (overlaps with {name}) while writing {what}"
                )));
            }
        }
        Ok(())
    }

    /// [`Meta::check_overlap`] for guest data, which must not land on an L2 table or a
    /// refcount block either (a corrupt refcount can hand out their clusters).
    /// A binary search in the table index: this runs on every in-place write.
    pub fn check_data_overlap(&self, offset: u64, len: u64) -> Result<()> {
        self.check_overlap(offset, len, "guest data")?;
        let cs = self.geo.cs;
        let index = self.table_index.get_or_init(|| self.build_table_index());
        debug_assert!(
            *index == self.build_table_index(),
            "the table index missed a change of l1 or rc_table"
        );
        // The first table that ends after `offset`; it overlaps if it starts before
        // the write ends.
        let from = offset.saturating_sub(cs - 1);
        let i = index.partition_point(|&(start, _)| start < from);
        if let Some(&(start, name)) = index.get(i) {
            if start < offset.saturating_add(len) {
                return Err(Error::corrupt(format!(
                    "Preventing invalid write on metadata (overlaps with {name}) while writing guest data"
                )));
            }
        }
        Ok(())
    }

    fn build_table_index(&self) -> Vec<(u64, &'static str)> {
        let mut index: Vec<(u64, &'static str)> = self
            .l1
            .iter()
            .map(|e| (e & crate::qcow2::l2::OFFSET_MASK, "active L2 table"))
            .chain(self.rc_table.iter().map(|&o| (o, "refcount block")))
            .filter(|&(start, _)| start != 0)
            .collect();
        index.sort_unstable();
        index
    }

    /// Must follow every change of `l1` or `rc_table` that [`Meta::table_moved`] does
    /// not describe: drops the table index that [`Meta::check_data_overlap`] searches.
    pub fn tables_changed(&mut self) {
        self.table_index.take();
    }

    /// Must follow a change of one `l1` or `rc_table` entry: the table `name` ("active
    /// L2 table" or "refcount block") moved from host offset `old` to `new` (0: none).
    /// Updates the index in place rather than rebuilding it on the next write.
    pub fn table_moved(&mut self, old: u64, new: u64, name: &'static str) {
        let Some(index) = self.table_index.get_mut() else {
            return;
        };
        if old != 0 {
            if let Ok(i) = index.binary_search(&(old, name)) {
                index.remove(i);
            }
        }
        if new != 0 {
            let i = index.partition_point(|e| *e < (new, name));
            index.insert(i, (new, name));
        }
    }

    /// Fails for a host offset past everything in the image file (and past every
    /// cluster this process allocated): a corrupt entry must not make a write grow
    /// the file to an arbitrary size.
    pub fn check_in_image(&self, offset: u64, what: &str) -> Result<()> {
        if offset >= self.end_cluster.saturating_mul(self.geo.cs) {
            return Err(Error::corrupt(format!(
                "{what} offset {offset:#x} lies beyond the end of the image"
            )));
        }
        Ok(())
    }

    // ---------------------------------------------------------------- L2 tables

    pub(super) fn validate_l2_offset(&self, l1e: u64) -> Result<u64> {
        if l1e & L1E_RESERVED != 0 {
            return Err(Error::corrupt(format!(
                "L1 entry {l1e:#x} has reserved bits set"
            )));
        }
        let off = l1e & OFFSET_MASK;
        if off % self.geo.cs != 0 {
            return Err(Error::corrupt(format!(
                "L2 table offset {off:#x} unaligned"
            )));
        }
        self.check_in_image(off, "L2 table")?;
        Ok(off)
    }

    /// The host offset of the L2 table for L1 index `i` (0 = none).
    pub fn l2_offset(&self, i: usize) -> Result<u64> {
        match self.l1.get(i) {
            Some(&e) => self.validate_l2_offset(e),
            None => Ok(0),
        }
    }

    fn make_room_l2(&mut self, st: &dyn Storage) -> Result<()> {
        while self.l2_cache.is_full() {
            let Some((key, dirty)) = self.l2_cache.victim() else {
                break;
            };
            if dirty {
                // Refcounts first, then the L2 table that depends on them.
                self.flush_rc(st)?;
                st.flush()?;
                self.write_l2(st, key)?;
            }
            self.l2_cache.remove(key);
        }
        Ok(())
    }

    fn write_l2(&mut self, st: &dyn Storage, key: u64) -> Result<()> {
        if let Some(t) = self.l2_cache.peek(key) {
            let bytes = t.to_bytes();
            self.check_overlap(key, bytes.len() as u64, "L2 table")?;
            st.write_at(&bytes, key)?;
            self.l2_cache.mark_clean(key);
        }
        Ok(())
    }

    /// Makes sure the L2 table at `off` is cached.
    pub fn load_l2(&mut self, st: &dyn Storage, off: u64) -> Result<()> {
        if self.l2_cache.contains(off) {
            return Ok(());
        }
        self.make_room_l2(st)?;
        let bytes_len = (self.geo.l2_entries * if self.geo.ext { 16 } else { 8 }) as usize;
        let mut b = vec![0u8; bytes_len];
        st.read_at(&mut b, off)?;
        self.l2_cache
            .insert(off, L2Table::from_bytes(&b, self.geo.ext), false);
        Ok(())
    }

    /// Entry and bitmap for guest cluster `gc` (zeros when its L2 table is absent).
    pub fn l2_entry(&mut self, st: &dyn Storage, gc: u64) -> Result<(u64, u64)> {
        let l1i = (gc >> self.geo.l2_bits) as usize;
        let off = self.l2_offset(l1i)?;
        if off == 0 {
            return Ok((0, 0));
        }
        self.load_l2(st, off)?;
        let idx = (gc & (self.geo.l2_entries - 1)) as usize;
        let (entry, bitmap) = self.l2_cache.get(off).map(|t| t.get(idx)).unwrap_or((0, 0));
        if entry & super::l2::OFLAG_COMPRESSED == 0 {
            let host = entry & OFFSET_MASK;
            if host % self.geo.cs != 0 {
                return Err(Error::corrupt(format!(
                    "Cluster allocation offset {host:#x} unaligned (L2 offset: {off:#x}, L2 index: {idx:#x})"
                )));
            }
        }
        Ok((entry, bitmap))
    }

    /// Sets the entry of guest cluster `gc`, whose L2 table must be writable
    /// (obtained through [`Meta::l2_for_write`]).
    pub fn set_l2_entry(&mut self, l2_off: u64, gc: u64, entry: u64, bitmap: u64) {
        let idx = (gc & (self.geo.l2_entries - 1)) as usize;
        if let Some(t) = self.l2_cache.get_mut(l2_off) {
            t.set(idx, entry, bitmap);
        }
    }

    /// Returns a writable (refcount 1) L2 table for guest cluster `gc`, allocating a
    /// new table or copying a shared one as needed. The table is cached on return.
    pub fn l2_for_write(&mut self, st: &dyn Storage, gc: u64) -> Result<u64> {
        let l1i = (gc >> self.geo.l2_bits) as usize;
        if l1i >= self.l1.len() {
            return Err(Error::invalid("write beyond the end of the L1 table"));
        }
        let e = self.l1[l1i];
        let old = self.validate_l2_offset(e)?;
        if old != 0 && e & OFLAG_COPIED != 0 {
            self.load_l2(st, old)?;
            return Ok(old);
        }
        let table = if old == 0 {
            L2Table::new(self.geo.l2_entries as usize, self.geo.ext)
        } else {
            self.load_l2(st, old)?;
            self.l2_cache
                .peek(old)
                .cloned()
                .ok_or_else(|| Error::corrupt("L2 table vanished from the cache"))?
        };
        let table_bytes = self.geo.l2_entries * if self.geo.ext { 16 } else { 8 };
        let new = self.alloc_clusters(st, table_bytes.div_ceil(self.geo.cs))?;
        self.make_room_l2(st)?;
        self.l2_cache.insert(new, table, true);
        self.l1[l1i] = new | OFLAG_COPIED;
        self.table_moved(old, new, "active L2 table");
        self.l1_dirty = true;
        if old != 0 {
            self.pending_frees.push(PendingFree {
                offset: old,
                len: self.geo.cs,
                discard: false,
            });
        }
        Ok(new)
    }

    // ---------------------------------------------------------------- refcounts

    fn load_rb(&mut self, st: &dyn Storage, off: u64) -> Result<()> {
        if self.rc_cache.contains(off) {
            return Ok(());
        }
        while self.rc_cache.is_full() {
            let Some((key, dirty)) = self.rc_cache.victim() else {
                break;
            };
            if dirty {
                self.write_rb(st, key)?;
            }
            self.rc_cache.remove(key);
        }
        let mut b = vec![0u8; self.geo.cs as usize];
        st.read_at(&mut b, off)?;
        self.rc_cache.insert(off, b, false);
        Ok(())
    }

    fn write_rb(&mut self, st: &dyn Storage, key: u64) -> Result<()> {
        if let Some(b) = self.rc_cache.peek(key) {
            let b = b.clone();
            st.write_at(&b, key)?;
            self.rc_cache.mark_clean(key);
        }
        Ok(())
    }

    fn rb_offset(&self, rbi: u64) -> Result<u64> {
        let Some(&e) = self.rc_table.get(rbi as usize) else {
            return Ok(0);
        };
        let off = e & OFFSET_MASK;
        if e & 0x1ff != 0 || off % self.geo.cs != 0 {
            return Err(Error::corrupt(format!(
                "Refblock offset {e:#x} unaligned (reftable index: {rbi:#x})"
            )));
        }
        Ok(off)
    }

    /// The refcount of host cluster `idx`.
    pub fn refcount(&mut self, st: &dyn Storage, idx: u64) -> Result<u64> {
        let rbi = idx / self.geo.rb_entries;
        let off = self.rb_offset(rbi)?;
        if off == 0 {
            return Ok(0);
        }
        self.load_rb(st, off)?;
        let i = (idx % self.geo.rb_entries) as usize;
        Ok(self
            .rc_cache
            .get(off)
            .map(|b| refcount::get(b, i, self.geo.refcount_order))
            .unwrap_or(0))
    }

    /// Adds `delta` to the refcount of host cluster `idx`, creating refcount blocks
    /// and growing the refcount table when needed.
    pub fn update_refcount(&mut self, st: &dyn Storage, idx: u64, delta: i64) -> Result<()> {
        let rbi = idx / self.geo.rb_entries;
        let off = if delta < 0 {
            // Lowering a refcount never creates refcount structures: a missing block
            // means the refcount is already zero.
            match self.rb_offset(rbi)? {
                0 => {
                    return Err(Error::corrupt(format!(
                        "Refcount underflow for cluster {idx}"
                    )))
                }
                off => off,
            }
        } else {
            self.ensure_rb(st, rbi)?
        };
        self.load_rb(st, off)?;
        let i = (idx % self.geo.rb_entries) as usize;
        let order = self.geo.refcount_order;
        let cur = self
            .rc_cache
            .peek(off)
            .map(|b| refcount::get(b, i, order))
            .unwrap_or(0);
        let new = if delta >= 0 {
            cur.checked_add(delta as u64)
                .filter(|&v| v <= refcount::max_value(order))
                .ok_or_else(|| Error::invalid(format!("Refcount overflow for cluster {idx}")))?
        } else {
            cur.checked_sub(delta.unsigned_abs())
                .ok_or_else(|| Error::corrupt(format!("Refcount underflow for cluster {idx}")))?
        };
        if let Some(b) = self.rc_cache.get_mut(off) {
            refcount::set(b, i, order, new);
        }
        if new == 0 && idx < self.free_hint {
            self.free_hint = idx.max(1);
        }
        Ok(())
    }

    /// Sets the refcount of host cluster `idx` to an absolute value.
    pub fn set_refcount(&mut self, st: &dyn Storage, idx: u64, value: u64) -> Result<()> {
        let cur = self.refcount(st, idx)?;
        self.update_refcount(st, idx, value as i64 - cur as i64)
    }

    /// Returns the refcount block for block index `rbi`, creating it (and growing the
    /// refcount table) if it does not exist. A new block describes itself: it is put
    /// in the first cluster of the range it covers.
    fn ensure_rb(&mut self, st: &dyn Storage, rbi: u64) -> Result<u64> {
        if rbi as usize >= self.rc_table.len() {
            self.grow_reftable(st, rbi)?;
        }
        let off = self.rb_offset(rbi)?;
        if off != 0 {
            return Ok(off);
        }
        if rbi == 0 {
            return Err(Error::corrupt("Refcount block 0 is missing"));
        }
        let first = rbi * self.geo.rb_entries;
        let new_off = first * self.geo.cs;
        let mut block = vec![0u8; self.geo.cs as usize];
        refcount::set(&mut block, 0, self.geo.refcount_order, 1);
        st.write_at(&block, new_off)?;
        st.flush()?;
        let old = std::mem::replace(&mut self.rc_table[rbi as usize], new_off);
        self.table_moved(old, new_off, "refcount block");
        st.write_at(
            &new_off.to_be_bytes(),
            self.header.refcount_table_offset + rbi * 8,
        )?;
        self.end_cluster = self.end_cluster.max(first + 1);
        self.load_rb(st, new_off)?;
        Ok(new_off)
    }

    /// Grows the refcount table so that index `min_rbi` exists. The new table and the
    /// refcount blocks describing it go after everything else in the file.
    fn grow_reftable(&mut self, st: &dyn Storage, min_rbi: u64) -> Result<()> {
        let cs = self.geo.cs;
        if (min_rbi + 1).saturating_mul(8) > super::header::MAX_REFTABLE_BYTES {
            return Err(Error::NoSpace("Refcount table would grow too large".into()));
        }
        let e = self.geo.rb_entries;
        let start = self.end_cluster.max(1);
        let mut entries = (min_rbi + 1).max(self.rc_table.len() as u64 * 2).max(1);
        let (table_clusters, new_blocks) = loop {
            let tc = (entries * 8).div_ceil(cs);
            let mut k = 0u64;
            let blocks = loop {
                let end = start + tc + k;
                let blocks: Vec<u64> = (start / e..=(end - 1) / e)
                    .filter(|&b| self.rc_table.get(b as usize).copied().unwrap_or(0) == 0)
                    .collect();
                if blocks.len() as u64 == k {
                    break blocks;
                }
                k = blocks.len() as u64;
            };
            let max_b = blocks.iter().copied().max().unwrap_or(0);
            if max_b < entries {
                break (tc, blocks);
            }
            entries = max_b + 1;
        };
        if table_clusters * cs > super::header::MAX_REFTABLE_BYTES {
            return Err(Error::NoSpace("Refcount table would grow too large".into()));
        }
        let area_end = start + table_clusters + new_blocks.len() as u64;
        // Refcount blocks that do not exist yet, with the area's refcounts inside.
        let mut table = self.rc_table.clone();
        table.resize((table_clusters * cs / 8) as usize, 0);
        for (j, &b) in new_blocks.iter().enumerate() {
            let boff = (start + table_clusters + j as u64) * cs;
            let mut block = vec![0u8; cs as usize];
            for c in (b * e).max(start)..((b + 1) * e).min(area_end) {
                refcount::set(&mut block, (c - b * e) as usize, self.geo.refcount_order, 1);
            }
            st.write_at(&block, boff)?;
            table[b as usize] = boff;
        }
        // Area clusters covered by blocks that already exist.
        for c in start..area_end {
            let b = c / e;
            if !new_blocks.contains(&b) {
                let off = self.rb_offset(b)?;
                self.load_rb(st, off)?;
                if let Some(block) = self.rc_cache.get_mut(off) {
                    refcount::set(block, (c % e) as usize, self.geo.refcount_order, 1);
                }
                self.write_rb(st, off)?;
            }
        }
        st.write_at(&to_be(&table), start * cs)?;
        st.flush()?;
        let old_off = self.header.refcount_table_offset;
        let old_clusters = self.header.refcount_table_clusters as u64;
        let mut hb = Vec::with_capacity(12);
        hb.extend_from_slice(&(start * cs).to_be_bytes());
        hb.extend_from_slice(&(table_clusters as u32).to_be_bytes());
        st.write_at(&hb, OFF_REFTABLE)?;
        st.flush()?;
        self.header.refcount_table_offset = start * cs;
        self.header.refcount_table_clusters = table_clusters as u32;
        self.rc_table = table;
        self.tables_changed();
        self.end_cluster = area_end;
        for c in 0..old_clusters {
            self.update_refcount(st, old_off / cs + c, -1)?;
        }
        Ok(())
    }

    // ---------------------------------------------------------------- allocation

    /// Allocates `n` contiguous free clusters and returns the host offset of the first.
    pub fn alloc_clusters(&mut self, st: &dyn Storage, n: u64) -> Result<u64> {
        if n >= self.geo.rb_entries / 2 {
            // New refcount blocks describe themselves from the first cluster of their
            // range, which would split any run this long: take space at the end.
            return self.alloc_at_end(st, n);
        }
        let mut idx = self.free_hint.max(1);
        'search: loop {
            // Make sure every refcount block of the candidate run exists, then check it.
            let e = self.geo.rb_entries;
            for b in idx / e..=(idx + n - 1) / e {
                self.ensure_rb(st, b)?;
            }
            let run = idx..idx + n;
            for c in run {
                if self.refcount(st, c)? != 0 {
                    idx = c + 1;
                    continue 'search;
                }
            }
            break;
        }
        for c in idx..idx + n {
            self.update_refcount(st, c, 1)?;
        }
        if n == 1 || self.free_hint == idx {
            self.free_hint = idx + n;
        }
        self.end_cluster = self.end_cluster.max(idx + n);
        Ok(idx * self.geo.cs)
    }

    /// Allocates `n` clusters after everything else in the file, with the refcount
    /// blocks that describe them placed right after the run.
    fn alloc_at_end(&mut self, st: &dyn Storage, n: u64) -> Result<u64> {
        let cs = self.geo.cs;
        let e = self.geo.rb_entries;
        loop {
            let start = self.end_cluster.max(1);
            let mut k = 0u64;
            let needed = loop {
                let end = start + n + k;
                let needed: Vec<u64> = (start / e..=(end - 1) / e)
                    .filter(|&b| self.rc_table.get(b as usize).copied().unwrap_or(0) == 0)
                    .collect();
                if needed.len() as u64 == k {
                    break needed;
                }
                k = needed.len() as u64;
            };
            if let Some(&max_b) = needed.iter().max() {
                if max_b as usize >= self.rc_table.len() {
                    self.grow_reftable(st, max_b)?;
                    continue;
                }
            }
            let end = start + n + k;
            for (j, &b) in needed.iter().enumerate() {
                let boff = (start + n + j as u64) * cs;
                let mut block = vec![0u8; cs as usize];
                for c in (b * e).max(start)..((b + 1) * e).min(end) {
                    refcount::set(&mut block, (c - b * e) as usize, self.geo.refcount_order, 1);
                }
                st.write_at(&block, boff)?;
            }
            if !needed.is_empty() {
                st.flush()?;
                for (j, &b) in needed.iter().enumerate() {
                    let boff = (start + n + j as u64) * cs;
                    let old = std::mem::replace(&mut self.rc_table[b as usize], boff);
                    self.table_moved(old, boff, "refcount block");
                    st.write_at(
                        &boff.to_be_bytes(),
                        self.header.refcount_table_offset + b * 8,
                    )?;
                }
            }
            self.end_cluster = end;
            for c in start..end {
                if !needed.contains(&(c / e)) {
                    self.update_refcount(st, c, 1)?;
                }
            }
            return Ok(start * cs);
        }
    }

    /// Allocates `len` bytes (less than a cluster) for compressed data.
    pub fn alloc_bytes(&mut self, st: &dyn Storage, len: u64) -> Result<u64> {
        let cs = self.geo.cs;
        let fbo = self.free_byte_offset;
        if fbo != 0
            && fbo % cs != 0
            && fbo % cs + len <= cs
            && self.refcount(st, fbo / cs)? < refcount::max_value(self.geo.refcount_order)
        {
            self.update_refcount(st, fbo / cs, 1)?;
            self.free_byte_offset = if (fbo + len) % cs == 0 { 0 } else { fbo + len };
            return Ok(fbo);
        }
        let off = self.alloc_clusters(st, 1)?;
        self.free_byte_offset = if len == cs { 0 } else { off + len };
        Ok(off)
    }

    /// Drops one reference to every cluster touched by a host byte range, now.
    pub fn free_now(&mut self, st: &dyn Storage, f: PendingFree) -> Result<()> {
        let cs = self.geo.cs;
        let first = f.offset / cs;
        let last = (f.offset + f.len.max(1) - 1) / cs;
        for c in first..=last {
            self.update_refcount(st, c, -1)?;
            if f.discard && self.refcount(st, c)? == 0 {
                // Best effort: the space is free either way.
                let _ = st.discard(c * cs, cs);
            }
            if self.free_byte_offset != 0 && self.free_byte_offset / cs == c {
                self.free_byte_offset = 0;
            }
        }
        Ok(())
    }

    // ---------------------------------------------------------------- flushing

    /// Writes every dirty refcount block (no sync).
    pub fn flush_rc(&mut self, st: &dyn Storage) -> Result<()> {
        for key in self.rc_cache.dirty_keys() {
            self.write_rb(st, key)?;
        }
        Ok(())
    }

    /// Writes the whole active L1 table.
    pub fn write_l1(&mut self, st: &dyn Storage) -> Result<()> {
        st.write_at(&to_be(&self.l1), self.header.l1_table_offset)?;
        self.l1_dirty = false;
        Ok(())
    }

    /// Writes all dirty metadata in crash-safe order, then applies queued frees.
    /// With `sync` false (cache=unsafe), the ordering writes still happen but no
    /// flush is requested from the storage.
    pub fn flush(&mut self, st: &dyn Storage) -> Result<()> {
        self.flush_rc(st)?;
        let dirty_l2 = self.l2_cache.dirty_keys();
        if !dirty_l2.is_empty() || self.l1_dirty || !self.pending_frees.is_empty() {
            st.flush()?;
            for key in dirty_l2 {
                self.write_l2(st, key)?;
            }
            if self.l1_dirty {
                st.flush()?;
                self.write_l1(st)?;
            }
            st.flush()?;
            let frees = std::mem::take(&mut self.pending_frees);
            for f in frees {
                self.free_now(st, f)?;
            }
            self.flush_rc(st)?;
        }
        st.flush()
    }

    /// Sets or clears incompatible feature bits on disk.
    pub fn write_incompat(&mut self, st: &dyn Storage, bits: u64) -> Result<()> {
        if self.header.version < 3 {
            return Ok(());
        }
        self.header.incompatible_features = bits;
        st.write_at(&bits.to_be_bytes(), OFF_INCOMPAT)?;
        st.flush()
    }

    /// Replaces the active L1 table with a larger one (`new_size` entries).
    pub fn grow_l1(&mut self, st: &dyn Storage, new_size: u64) -> Result<()> {
        if new_size <= self.l1.len() as u64 {
            return Ok(());
        }
        let mut l1 = self.l1.clone();
        l1.resize(new_size as usize, 0);
        self.replace_l1(st, l1)
    }

    /// Makes `l1` the active L1 table: written to newly allocated clusters, then
    /// switched to with one header write (size and offset), then the old table freed.
    /// A crash leaves either the old table or the new one in use, never a mix.
    pub fn replace_l1(&mut self, st: &dyn Storage, l1: Vec<u64>) -> Result<()> {
        let new_size = l1.len() as u64;
        if new_size * 8 > super::header::MAX_L1_BYTES {
            return Err(Error::invalid(
                "Image size too large: L1 table would exceed 32 MiB",
            ));
        }
        self.flush(st)?;
        let cs = self.geo.cs;
        let new_off = if new_size == 0 {
            0
        } else {
            let clusters = (new_size * 8).div_ceil(cs);
            let off = self.alloc_clusters(st, clusters)?;
            self.flush_rc(st)?;
            st.write_at(&to_be(&l1), off)?;
            st.flush()?;
            off
        };
        let mut hb = Vec::with_capacity(12);
        hb.extend_from_slice(&(new_size as u32).to_be_bytes());
        hb.extend_from_slice(&new_off.to_be_bytes());
        st.write_at(&hb, OFF_L1)?;
        st.flush()?;
        let old_off = self.header.l1_table_offset;
        let old_len = self.l1.len() as u64 * 8;
        self.header.l1_size = new_size as u32;
        self.header.l1_table_offset = new_off;
        self.l1 = l1;
        self.l1_dirty = false;
        self.tables_changed();
        if old_len > 0 {
            self.free_now(
                st,
                PendingFree {
                    offset: old_off,
                    len: old_len,
                    discard: false,
                },
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::storage::MemStorage;
    use crate::{create_on, open_on, CreateOptions, Format};

    /// A 4 MiB qcow2 with one L2 table, loaded as metadata.
    fn meta_of_written_image() -> Meta {
        let mem = Arc::new(MemStorage::new(Vec::new(), 1 << 30));
        let opts = CreateOptions {
            size: Some(4 << 20),
            ..CreateOptions::default()
        };
        create_on(mem.clone(), Format::Qcow2, &opts).unwrap();
        let img = open_on(mem.clone(), Format::Qcow2, false, None).unwrap();
        img.write(&[7u8; 4096], 0).unwrap();
        img.close().unwrap();
        let size = mem.size().unwrap();
        let mut hbuf = vec![0u8; 65536];
        mem.read_at(&mut hbuf, 0).unwrap();
        let header = Header::parse(&hbuf, size).unwrap();
        Meta::load(mem.as_ref(), header, 1 << 20, 1 << 20).unwrap()
    }

    #[test]
    fn data_overlap_check_finds_tables_at_their_edges_only() {
        let mut m = meta_of_written_image();
        let cs = m.geo.cs;
        let l2 = m.l1[0] & OFFSET_MASK;
        let rb = m.rc_table[0];
        assert!(l2 != 0 && rb != 0);
        for (table, name) in [(l2, "active L2 table"), (rb, "refcount block")] {
            for (off, len) in [(table, 1), (table + cs - 1, 1), (table, cs)] {
                let err = m.check_data_overlap(off, len).unwrap_err().to_string();
                assert!(err.contains(name), "{err}");
            }
        }
        // Move the L2 table past everything else in the file: it is found at its new
        // place once the index is dropped, at both edges, and no longer at the old one.
        let moved = 40 * cs;
        m.check_data_overlap(moved, cs).unwrap();
        m.l1[0] = moved | OFLAG_COPIED;
        m.tables_changed();
        m.check_data_overlap(moved - cs, cs).unwrap();
        m.check_data_overlap(moved + cs, cs).unwrap();
        for (off, len) in [
            (moved - cs, cs + 1),
            (moved + cs - 1, 1),
            (moved - cs, 3 * cs),
        ] {
            let err = m.check_data_overlap(off, len).unwrap_err().to_string();
            assert!(err.contains("active L2 table"), "{err}");
        }
        m.check_data_overlap(l2, cs).unwrap();
    }
}
