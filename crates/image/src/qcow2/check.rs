//! Consistency check and repair: recomputes every cluster's refcount from the
//! metadata (header, L1/L2 tables of the active state and of each snapshot, the
//! snapshot table, refcount structures, persistent bitmaps) and compares it with the
//! stored refcounts, and checks the COPIED flags of the active tables.
//!
//! Repair follows QEMU: `leaks` drops refcounts that are too high; `all` also fixes
//! entries that point outside the image, rebuilds the refcount structure when a
//! refcount is too low, and fixes COPIED flags.

use crate::driver::{BlockIo, CheckReport, RepairMode};
use crate::storage::Storage;
use crate::{Error, Result};

use super::l2::{classify, ClusterType, L1E_RESERVED, OFFSET_MASK, OFLAG_COPIED, OFLAG_ZERO};
use super::meta::Meta;
use super::refcount;
use super::Qcow2;

/// The largest image file `check` handles, in clusters (bounds its memory).
const MAX_CHECK_CLUSTERS: u64 = 1 << 28;

/// Computed reference counts plus what the walk found.
struct Walk {
    refs: Vec<u32>,
    report: CheckReport,
    /// L1 indices whose entry must be cleared (repair).
    bad_l1: Vec<usize>,
    /// (L2 table offset, entry index, guest cluster) whose entry must be zeroed.
    bad_l2: Vec<(u64, usize, u64)>,
    /// Active L1 entries: (index, L2 offset).
    active_l2: Vec<(usize, u64)>,
    /// Active data entries: (L2 offset, index, guest cluster, entry, bitmap).
    active_data: Vec<(u64, usize, u64, u64, u64)>,
    highest: u64,
}

impl Walk {
    fn inc(&mut self, cs: u64, offset: u64, len: u64, what: &str) {
        if len == 0 {
            return;
        }
        let first = offset / cs;
        let last = (offset + len - 1) / cs;
        for c in first..=last {
            match self.refs.get_mut(c as usize) {
                Some(r) => {
                    *r = r.saturating_add(1);
                    self.highest = self.highest.max(c + 1);
                }
                None => {
                    self.report.corruptions += 1;
                    self.report.messages.push(format!(
                        "ERROR: {what} at offset {:#x} exceeds the end of the image file",
                        c * cs
                    ));
                    return;
                }
            }
        }
    }
}

fn be64(b: &[u8], o: usize) -> u64 {
    let mut a = [0; 8];
    a.copy_from_slice(&b[o..o + 8]);
    u64::from_be_bytes(a)
}

impl Qcow2 {
    pub(super) fn check_impl(&self, repair: Option<RepairMode>) -> Result<CheckReport> {
        let st = self.storage_ref();
        let mut m = self.lock();
        if !self.read_only {
            m.flush(st)?;
        }
        let first = self.check_pass(&mut m, st)?;
        let Some(mode) = repair else {
            return Ok(first.report);
        };
        let mut fixed_corruptions = 0u64;
        let mut fixed_leaks = 0u64;
        // Entries pointing outside the image.
        if mode == RepairMode::All && (first.bad_l1 > 0 || first.bad_l2 > 0) {
            let walk = self.walk(&mut m, st)?;
            for &i in &walk.bad_l1 {
                m.l1[i] = 0;
                m.tables_changed();
                m.l1_dirty = true;
                fixed_corruptions += 1;
            }
            for &(l2_off, _idx, gc) in &walk.bad_l2 {
                m.load_l2(st, l2_off)?;
                let e = if self.geo.version >= 3 && !self.geo.ext {
                    OFLAG_ZERO
                } else {
                    0
                };
                m.set_l2_entry(l2_off, gc, e, 0);
                fixed_corruptions += 1;
            }
            m.flush(st)?;
        }
        // Refcounts.
        let walk = self.walk(&mut m, st)?;
        let c = self.compare(&mut m, st, &walk, false)?;
        if mode == RepairMode::All && (c.low > 0 || c.bad_blocks) {
            self.rebuild_refcounts(&mut m, st, walk.refs.clone())?;
            fixed_corruptions += c.low;
            fixed_leaks += c.high;
        } else if c.high > 0 {
            fixed_leaks += self.compare(&mut m, st, &walk, true)?.high;
        }
        m.flush(st)?;
        // COPIED flags.
        if mode == RepairMode::All {
            let walk = self.walk(&mut m, st)?;
            fixed_corruptions += self.fix_copied(&mut m, st, &walk)?;
            m.flush(st)?;
        }
        let mut after = self.check_pass(&mut m, st)?.report;
        after.corruptions_fixed = fixed_corruptions.min(first.corruptions);
        after.leaks_fixed = fixed_leaks.min(first.leaks);
        let mut messages = first.report.messages;
        messages.append(&mut after.messages);
        after.messages = messages;
        Ok(after)
    }

    /// One full check without repair.
    fn check_pass(&self, m: &mut Meta, st: &dyn Storage) -> Result<PassReport> {
        let mut walk = self.walk(m, st)?;
        let c = self.compare(m, st, &walk, false)?;
        let mut r = std::mem::take(&mut walk.report);
        r.corruptions += c.low;
        r.leaks += c.high;
        r.messages.extend(c.messages);
        let (_, copied_errors) = self.copied_errors(m, st, &walk)?;
        r.corruptions += copied_errors.len() as u64;
        r.messages.extend(copied_errors);
        r.image_end_offset = c.highest * self.geo.cs;
        r.total_clusters = self.size().div_ceil(self.geo.cs);
        Ok(PassReport {
            report: r,
            bad_l1: walk.bad_l1.len(),
            bad_l2: walk.bad_l2.len(),
        })
    }

    /// Walks all metadata and computes the refcount every cluster should have.
    fn walk(&self, m: &mut Meta, st: &dyn Storage) -> Result<Walk> {
        let g = self.geo;
        let cs = g.cs;
        let file_size = st.size()?;
        let nb = file_size.div_ceil(cs);
        if nb > MAX_CHECK_CLUSTERS {
            return Err(Error::unsupported("Image file too large to check"));
        }
        let mut w = Walk {
            refs: vec![0; nb as usize],
            report: CheckReport::default(),
            bad_l1: Vec::new(),
            bad_l2: Vec::new(),
            active_l2: Vec::new(),
            active_data: Vec::new(),
            highest: 0,
        };
        w.inc(cs, 0, cs, "header");
        // Active L1.
        let l1 = m.l1.clone();
        w.inc(
            cs,
            m.header.l1_table_offset,
            l1.len() as u64 * 8,
            "L1 table",
        );
        self.walk_l1(m, st, &mut w, &l1, true, file_size)?;
        // Snapshots.
        if m.header.nb_snapshots > 0 {
            let (snaps, table_len) = super::snapshot::read_table(st, &m.header)?;
            w.inc(cs, m.header.snapshots_offset, table_len, "snapshot table");
            for s in snaps {
                let mut b = vec![0u8; s.l1_size as usize * 8];
                st.read_at(&mut b, s.l1_table_offset)?;
                let sl1: Vec<u64> = (0..s.l1_size as usize).map(|i| be64(&b, i * 8)).collect();
                w.inc(cs, s.l1_table_offset, b.len() as u64, "snapshot L1 table");
                self.walk_l1(m, st, &mut w, &sl1, false, file_size)?;
            }
        }
        // Persistent bitmaps.
        if let Some(ext) = m.header.bitmaps_ext.clone() {
            self.walk_bitmaps(st, &mut w, &ext, file_size)?;
        }
        Ok(w)
    }

    fn walk_l1(
        &self,
        m: &mut Meta,
        st: &dyn Storage,
        w: &mut Walk,
        l1: &[u64],
        active: bool,
        file_size: u64,
    ) -> Result<()> {
        let g = self.geo;
        let cs = g.cs;
        let mut last_host;
        for (i, &e) in l1.iter().enumerate() {
            let off = e & OFFSET_MASK;
            if off == 0 {
                continue;
            }
            if e & L1E_RESERVED != 0 || off % cs != 0 || off + cs > file_size {
                w.report.corruptions += 1;
                w.report.messages.push(format!(
                    "ERROR l2_offset={off:#x}: L2 table is not cluster aligned or outside the image; L1 entry corrupted"
                ));
                if active {
                    w.bad_l1.push(i);
                }
                continue;
            }
            w.inc(cs, off, cs, "L2 table");
            if active {
                w.active_l2.push((i, off));
            }
            // QEMU measures fragmentation within each L2 table.
            last_host = 0;
            m.load_l2(st, off)?;
            let table = m
                .l2_cache
                .peek(off)
                .cloned()
                .ok_or_else(|| Error::corrupt("L2 table vanished from the cache"))?;
            for idx in 0..table.len() {
                let (entry, bitmap) = table.get(idx);
                let gc = ((i as u64) << g.l2_bits) + idx as u64;
                if g.ext {
                    let ct = classify(entry, g.cluster_bits, true);
                    let alloc = bitmap & 0xffff_ffff;
                    let zero = bitmap >> 32;
                    let bad = match ct {
                        ClusterType::Compressed { .. } => bitmap != 0,
                        ClusterType::Normal(_) => alloc & zero != 0,
                        _ => alloc != 0,
                    };
                    if bad {
                        w.report.corruptions += 1;
                        w.report.messages.push(format!(
                            "ERROR invalid subcluster allocation bitmap {bitmap:#x} for cluster {gc}"
                        ));
                    }
                }
                match classify(entry, g.cluster_bits, g.ext) {
                    ClusterType::Compressed { offset, len } => {
                        if active {
                            // QEMU counts compressed clusters as fragmented by nature.
                            w.report.allocated_clusters += 1;
                            w.report.compressed_clusters += 1;
                            w.report.fragmented_clusters += 1;
                        }
                        let start = offset & !511;
                        if offset + len > file_size.div_ceil(512) * 512 + 512 {
                            w.report.corruptions += 1;
                            w.report.messages.push(format!(
                                "ERROR compressed cluster {gc} at {offset:#x} lies beyond the end of the image"
                            ));
                            if active {
                                w.bad_l2.push((off, idx, gc));
                            }
                            continue;
                        }
                        let end = (offset + len).min(file_size);
                        if end > start {
                            w.inc(cs, start, end - start, "compressed cluster");
                        }
                    }
                    ClusterType::Normal(h) | ClusterType::ZeroAlloc(h) => {
                        if h % cs != 0 || h >= file_size {
                            w.report.corruptions += 1;
                            w.report.messages.push(format!(
                                "ERROR offset={h:#x}: Cluster is not properly aligned or lies beyond the end of the image; L2 entry corrupted"
                            ));
                            if active {
                                w.bad_l2.push((off, idx, gc));
                            }
                            continue;
                        }
                        if active {
                            w.report.allocated_clusters += 1;
                            if last_host != 0 && h != last_host + cs {
                                w.report.fragmented_clusters += 1;
                            }
                            last_host = h;
                            w.active_data.push((off, idx, gc, entry, bitmap));
                        }
                        w.inc(cs, h, cs, "data cluster");
                    }
                    _ => {}
                }
            }
        }
        Ok(())
    }

    fn walk_bitmaps(
        &self,
        st: &dyn Storage,
        w: &mut Walk,
        ext: &[u8],
        file_size: u64,
    ) -> Result<()> {
        let cs = self.geo.cs;
        if ext.len() < 24 {
            return Ok(());
        }
        let nb = u32::from_be_bytes([ext[0], ext[1], ext[2], ext[3]]) as usize;
        let dir_size = be64(ext, 8);
        let dir_off = be64(ext, 16);
        if dir_size > (64 << 20) || dir_off + dir_size > file_size {
            w.report.corruptions += 1;
            w.report
                .messages
                .push("ERROR bitmap directory lies outside the image".into());
            return Ok(());
        }
        w.inc(cs, dir_off, dir_size, "bitmap directory");
        let mut dir = vec![0u8; dir_size as usize];
        st.read_at(&mut dir, dir_off)?;
        let mut p = 0usize;
        for _ in 0..nb {
            if p + 24 > dir.len() {
                break;
            }
            let table_off = be64(&dir, p);
            let table_size =
                u32::from_be_bytes([dir[p + 8], dir[p + 9], dir[p + 10], dir[p + 11]]) as u64;
            let name_size = u16::from_be_bytes([dir[p + 18], dir[p + 19]]) as usize;
            let extra =
                u32::from_be_bytes([dir[p + 20], dir[p + 21], dir[p + 22], dir[p + 23]]) as usize;
            p += (24 + extra + name_size).div_ceil(8) * 8;
            if table_off == 0 || table_off + table_size * 8 > file_size {
                continue;
            }
            w.inc(cs, table_off, table_size * 8, "bitmap table");
            let mut t = vec![0u8; (table_size * 8) as usize];
            st.read_at(&mut t, table_off)?;
            for k in 0..table_size as usize {
                let d = be64(&t, k * 8) & OFFSET_MASK;
                if d != 0 {
                    w.inc(cs, d, cs, "bitmap data");
                }
            }
        }
        Ok(())
    }

    /// Adds the refcount table and blocks to `refs`; returns whether a block entry is bad.
    fn add_refcount_structs(&self, m: &Meta, w: &mut Walk, file_size: u64) -> bool {
        let cs = self.geo.cs;
        w.inc(
            cs,
            m.header.refcount_table_offset,
            m.header.refcount_table_clusters as u64 * cs,
            "refcount table",
        );
        let mut bad = false;
        for (i, &e) in m.rc_table.iter().enumerate() {
            let off = e & OFFSET_MASK;
            if e == 0 {
                continue;
            }
            if e & 0x1ff != 0 || off % cs != 0 || off >= file_size {
                w.report.messages.push(format!(
                    "ERROR refcount block {i} is not cluster aligned or outside the image; refcount table entry corrupted"
                ));
                bad = true;
                continue;
            }
            w.inc(cs, off, cs, "refcount block");
        }
        bad
    }

    /// Compares computed with stored refcounts. Returns (too low, too high, bad blocks);
    /// with `fix_leaks`, lowers refcounts that are too high and returns how many.
    fn compare(
        &self,
        m: &mut Meta,
        st: &dyn Storage,
        walk: &Walk,
        fix_leaks: bool,
    ) -> Result<Compared> {
        let file_size = st.size()?;
        let mut w = Walk {
            refs: walk.refs.clone(),
            report: CheckReport::default(),
            bad_l1: Vec::new(),
            bad_l2: Vec::new(),
            active_l2: Vec::new(),
            active_data: Vec::new(),
            highest: walk.highest,
        };
        let bad_blocks = self.add_refcount_structs(m, &mut w, file_size);
        let mut low = 0;
        let mut high = 0;
        let mut messages = std::mem::take(&mut w.report.messages);
        let mut highest = 0u64;
        for (c, &want) in w.refs.iter().enumerate() {
            let stored = match m.refcount(st, c as u64) {
                Ok(v) => v,
                Err(_) => {
                    low += u64::from(want > 0);
                    continue;
                }
            };
            let want = want as u64;
            if stored > 0 || want > 0 {
                highest = highest.max(c as u64 + 1);
            }
            if stored < want {
                low += 1;
                messages.push(format!(
                    "ERROR cluster {c} refcount={stored} reference={want}"
                ));
            } else if stored > want {
                high += 1;
                if fix_leaks {
                    messages.push(format!(
                        "Repairing cluster {c} refcount={stored} reference={want}"
                    ));
                    m.set_refcount(st, c as u64, want)?;
                } else {
                    messages.push(format!(
                        "Leaked cluster {c} refcount={stored} reference={want}"
                    ));
                }
            }
        }
        Ok(Compared {
            low,
            high,
            bad_blocks,
            highest,
            messages,
        })
    }

    /// Messages for COPIED flags that disagree with refcounts (active tables only).
    fn copied_errors(
        &self,
        m: &mut Meta,
        st: &dyn Storage,
        walk: &Walk,
    ) -> Result<(u64, Vec<String>)> {
        let cs = self.geo.cs;
        let mut msgs = Vec::new();
        for &(i, off) in &walk.active_l2 {
            let rc = m.refcount(st, off / cs).unwrap_or(0);
            let e = m.l1[i];
            if (rc == 1) != (e & OFLAG_COPIED != 0) {
                msgs.push(format!(
                    "ERROR OFLAG_COPIED L2 cluster: l1_index={i} l1_entry={e:x} refcount={rc}"
                ));
            }
        }
        for &(_, _, _, entry, _) in &walk.active_data {
            let h = entry & OFFSET_MASK;
            let rc = m.refcount(st, h / cs).unwrap_or(0);
            if (rc == 1) != (entry & OFLAG_COPIED != 0) {
                msgs.push(format!(
                    "ERROR OFLAG_COPIED data cluster: l2_entry={entry:x} refcount={rc}"
                ));
            }
        }
        Ok((msgs.len() as u64, msgs))
    }

    fn fix_copied(&self, m: &mut Meta, st: &dyn Storage, walk: &Walk) -> Result<u64> {
        let cs = self.geo.cs;
        let mut fixed = 0;
        for &(i, off) in &walk.active_l2 {
            let rc = m.refcount(st, off / cs)?;
            let e = m.l1[i];
            let want = if rc == 1 {
                e | OFLAG_COPIED
            } else {
                e & !OFLAG_COPIED
            };
            if want != e {
                m.l1[i] = want;
                m.tables_changed();
                m.l1_dirty = true;
                fixed += 1;
            }
        }
        for &(l2_off, _idx, gc, entry, bitmap) in &walk.active_data {
            let h = entry & OFFSET_MASK;
            let rc = m.refcount(st, h / cs)?;
            let want = if rc == 1 {
                entry | OFLAG_COPIED
            } else {
                entry & !OFLAG_COPIED
            };
            if want != entry {
                m.load_l2(st, l2_off)?;
                m.set_l2_entry(l2_off, gc, want, bitmap);
                fixed += 1;
            }
        }
        Ok(fixed)
    }

    /// Writes a new refcount table and blocks after the end of the image, holding the
    /// computed refcounts `refs` (which exclude the old refcount structures), and
    /// switches the header to them.
    fn rebuild_refcounts(&self, m: &mut Meta, st: &dyn Storage, mut refs: Vec<u32>) -> Result<()> {
        let g = self.geo;
        let cs = g.cs;
        let e = g.rb_entries;
        let start = (st.size()?.div_ceil(cs)).max(refs.len() as u64).max(1);
        let mut nb_blocks = 1u64;
        let mut tc = 1u64;
        loop {
            let total = start + tc + nb_blocks;
            let nb = total.div_ceil(e);
            let t = (nb * 8).div_ceil(cs);
            if nb == nb_blocks && t == tc {
                break;
            }
            nb_blocks = nb;
            tc = t;
        }
        if tc * cs > super::header::MAX_REFTABLE_BYTES {
            return Err(Error::NoSpace("Refcount table would grow too large".into()));
        }
        let total = start + tc + nb_blocks;
        refs.resize(total as usize, 0);
        for r in &mut refs[start as usize..] {
            *r = 1;
        }
        let max = refcount::max_value(g.refcount_order);
        if let Some(c) = refs.iter().position(|&r| r as u64 > max) {
            return Err(Error::corrupt(format!(
                "Cannot rebuild refcounts: cluster {c} needs refcount {} (width {} bits)",
                refs[c],
                1u32 << g.refcount_order
            )));
        }
        let mut table = vec![0u64; (tc * cs / 8) as usize];
        for b in 0..nb_blocks {
            let mut block = vec![0u8; cs as usize];
            for i in 0..e {
                let c = b * e + i;
                if c >= total {
                    break;
                }
                let v = refs[c as usize] as u64;
                if v != 0 {
                    refcount::set(&mut block, i as usize, g.refcount_order, v);
                }
            }
            let boff = (start + tc + b) * cs;
            st.write_at(&block, boff)?;
            table[b as usize] = boff;
        }
        let mut tb = Vec::with_capacity(table.len() * 8);
        for t in &table {
            tb.extend_from_slice(&t.to_be_bytes());
        }
        st.write_at(&tb, start * cs)?;
        st.flush()?;
        let mut hb = Vec::with_capacity(12);
        hb.extend_from_slice(&(start * cs).to_be_bytes());
        hb.extend_from_slice(&(tc as u32).to_be_bytes());
        st.write_at(&hb, super::header::OFF_REFTABLE)?;
        st.flush()?;
        m.header.refcount_table_offset = start * cs;
        m.header.refcount_table_clusters = tc as u32;
        m.rc_table = table;
        m.tables_changed();
        m.rc_cache.clear();
        m.free_hint = 1;
        m.end_cluster = m.end_cluster.max(total);
        m.pending_frees.clear();
        Ok(())
    }
}

/// What comparing computed with stored refcounts found.
struct Compared {
    /// Clusters whose refcount is too low (corruptions).
    low: u64,
    /// Clusters whose refcount is too high (leaks).
    high: u64,
    /// A refcount table entry is unusable.
    bad_blocks: bool,
    /// One past the highest referenced cluster, refcount structures included.
    highest: u64,
    /// qemu-img's lines for each mismatch.
    messages: Vec<String>,
}

/// A check result plus what repair needs to know about it.
struct PassReport {
    report: CheckReport,
    bad_l1: usize,
    bad_l2: usize,
}

impl std::ops::Deref for PassReport {
    type Target = CheckReport;
    fn deref(&self) -> &CheckReport {
        &self.report
    }
}
