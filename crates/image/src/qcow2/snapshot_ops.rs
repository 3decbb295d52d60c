//! Creating, applying and deleting internal snapshots (`qemu-img snapshot -c/-a/-d`).
//!
//! A snapshot is a copy of the active L1 table plus one more reference to every L2
//! table and data cluster it reaches; shared clusters lose their COPIED flag, so the
//! next guest write to one copies it. The steps:
//!
//! - create: clear the COPIED flags of the active tree (on disk), take the
//!   references, write the L1 copy, then publish the new snapshot table with one
//!   header write;
//! - apply: take references to the snapshot's tree (and clear the COPIED flags it
//!   now shares), write a copy of its L1 table and switch the header to it (one
//!   write), then drop the old tree's references and set the COPIED flags of the new
//!   active tree;
//! - delete: publish the table without the entry first, then drop the snapshot's
//!   references and free its L1 table.
//!
//! Refcounts always reach the disk before the L2 tables and the L1 table that
//! depend on them. So a crash at any moment leaves at worst references counted too
//! high (leaks) and COPIED flags that are clear although the refcount is one, which
//! `qemu-img check` reports as errors but which are harmless (the next write copies
//! the cluster once; `check -r all` sets them). Never on disk: a cluster referenced
//! more often than its refcount says, a COPIED flag on a cluster whose refcount is
//! above one, or a half-switched L1 table. (QEMU's own order can leave the second
//! of these after a crash.) `tests/qcow2_snapshots.rs` kills `strata-img snapshot`
//! at random moments and checks exactly this.
//!
//! The operations need a quiescent image: no guest I/O may run at the same time
//! (qemu-img and strata-img hold the image alone).

use std::collections::HashMap;
use std::sync::atomic::Ordering;

use crate::driver::{InternalSnapshots, NewSnapshot, SnapshotInfo};
use crate::storage::Storage;
use crate::{Error, Result};

use super::header::{MAX_SNAPSHOTS, OFF_SIZE};
use super::l2::{classify, ClusterType, OFLAG_COPIED};
use super::meta::{Meta, PendingFree};
use super::refcount;
use super::snapshot::{self, Snapshot, MAX_TABLE_BYTES};
use super::Qcow2;

/// Byte offset of `nb_snapshots` (4 bytes), followed by `snapshots_offset` (8 bytes).
const OFF_SNAPSHOTS: u64 = 60;

fn be_words(b: &[u8]) -> Vec<u64> {
    b.chunks_exact(8)
        .map(|c| u64::from_be_bytes(c.try_into().unwrap_or([0; 8])))
        .collect()
}

fn to_be(words: &[u64]) -> Vec<u8> {
    words.iter().flat_map(|w| w.to_be_bytes()).collect()
}

/// The host clusters a compressed cluster's data touches, as `check` counts them.
fn compressed_clusters(offset: u64, len: u64, file_size: u64, cs: u64) -> std::ops::Range<u64> {
    let start = offset & !511;
    let end = (offset + len).min(file_size);
    if end <= start {
        return 0..0;
    }
    start / cs..(end - 1) / cs + 1
}

/// What [`Meta::update_tree`] does with COPIED flags.
#[derive(Clone, Copy)]
enum Flags {
    /// Set exactly where the refcount is one.
    FromRefcounts,
    /// Clear them all (before references are added, so that no flag on disk ever
    /// claims a cluster is unshared once its refcount has risen).
    Clear,
}

impl Meta {
    /// Fails for an L1 table that names an invalid L2 table offset or the same L2
    /// table twice (a damaged image): checked before anything changes, and it bounds
    /// a tree walk by the size of the file.
    fn check_tree(&self, l1: &[u64]) -> Result<()> {
        let mut seen = std::collections::HashSet::new();
        for &e in l1 {
            let off = self.validate_l2_offset(e)?;
            if off != 0 && !seen.insert(off) {
                return Err(Error::corrupt(format!(
                    "L2 table {off:#x} is used twice by one L1 table"
                )));
            }
        }
        Ok(())
    }

    /// Fails unless every cluster reachable from `l1` (a tree [`Meta::check_tree`]
    /// accepted) can take one more reference.
    fn check_headroom(&mut self, st: &dyn Storage, l1: &[u64]) -> Result<()> {
        let g = self.geo;
        let max = refcount::max_value(g.refcount_order);
        let file_size = st.size()?;
        let too_many = |c: u64| {
            Error::invalid(format!(
                "Invalid argument (cluster {c} cannot take another reference with \
                 refcount_bits={})",
                1u32 << g.refcount_order
            ))
        };
        // Compressed clusters can share a host cluster: count their references.
        let mut compressed: HashMap<u64, u64> = HashMap::new();
        for &e in l1 {
            let off = self.validate_l2_offset(e)?;
            if off == 0 {
                continue;
            }
            if self.refcount(st, off / g.cs)? >= max {
                return Err(too_many(off / g.cs));
            }
            self.load_l2(st, off)?;
            let Some(table) = self.l2_cache.peek(off).cloned() else {
                return Err(Error::corrupt("L2 table vanished from the cache"));
            };
            for i in 0..table.len() {
                match classify(table.get(i).0, g.cluster_bits, g.ext) {
                    ClusterType::Normal(h) | ClusterType::ZeroAlloc(h) => {
                        if self.refcount(st, h / g.cs)? >= max {
                            return Err(too_many(h / g.cs));
                        }
                    }
                    ClusterType::Compressed { offset, len } => {
                        for c in compressed_clusters(offset, len, file_size, g.cs) {
                            *compressed.entry(c).or_insert(0) += 1;
                        }
                    }
                    ClusterType::Unallocated | ClusterType::ZeroPlain => {}
                }
            }
        }
        for (c, n) in compressed {
            if self.refcount(st, c)?.saturating_add(n) > max {
                return Err(too_many(c));
            }
        }
        Ok(())
    }

    /// Adds `addend` (-1, 0 or +1) to the refcount of every L2 table and data cluster
    /// reachable from `l1`, then sets the COPIED flag of each data entry (in the L2
    /// tables, through the cache) and of each entry of `l1` as `flags` says.
    /// Clusters whose refcount reaches zero are freed (and discarded); an L2 table
    /// that is freed leaves the cache unwritten.
    fn update_tree(
        &mut self,
        st: &dyn Storage,
        l1: &mut [u64],
        addend: i64,
        flags: Flags,
    ) -> Result<()> {
        let g = self.geo;
        let cs = g.cs;
        let file_size = st.size()?;
        for l1e in l1.iter_mut() {
            let off = self.validate_l2_offset(*l1e)?;
            if off == 0 {
                continue;
            }
            self.load_l2(st, off)?;
            let Some(mut table) = self.l2_cache.peek(off).cloned() else {
                return Err(Error::corrupt("L2 table vanished from the cache"));
            };
            let mut changed = false;
            for i in 0..table.len() {
                let (entry, bitmap) = table.get(i);
                let host = match classify(entry, g.cluster_bits, g.ext) {
                    ClusterType::Normal(h) | ClusterType::ZeroAlloc(h) => h,
                    ClusterType::Compressed { offset, len } => {
                        if addend != 0 {
                            for c in compressed_clusters(offset, len, file_size, cs) {
                                self.add_reference(st, c, addend)?;
                            }
                        }
                        continue;
                    }
                    ClusterType::Unallocated | ClusterType::ZeroPlain => continue,
                };
                if addend != 0 {
                    self.add_reference(st, host / cs, addend)?;
                }
                let copied = match flags {
                    Flags::FromRefcounts if self.refcount(st, host / cs)? == 1 => OFLAG_COPIED,
                    _ => 0,
                };
                let new = (entry & !OFLAG_COPIED) | copied;
                if new != entry {
                    table.set(i, new, bitmap);
                    changed = true;
                }
            }
            if addend != 0 {
                self.add_reference(st, off / cs, addend)?;
            }
            let rc = self.refcount(st, off / cs)?;
            if rc == 0 {
                // Freed: a dirty copy in the cache must never reach the disk.
                self.l2_cache.remove(off);
            } else if changed {
                if let Some(t) = self.l2_cache.get_mut(off) {
                    *t = table;
                }
            }
            let copied = match flags {
                Flags::FromRefcounts if rc == 1 => OFLAG_COPIED,
                _ => 0,
            };
            *l1e = (*l1e & !OFLAG_COPIED) | copied;
        }
        Ok(())
    }

    /// [`Meta::update_tree`] on the active tree; a changed L1 table is written at
    /// the next flush.
    fn update_active(&mut self, st: &dyn Storage, addend: i64, flags: Flags) -> Result<()> {
        let mut l1 = self.l1.clone();
        self.update_tree(st, &mut l1, addend, flags)?;
        if l1 != self.l1 {
            self.l1 = l1;
            self.l1_dirty = true;
        }
        Ok(())
    }

    /// Adds one reference to host cluster `c` (`addend` 1) or drops one (-1, freeing
    /// and discarding the cluster when none is left).
    fn add_reference(&mut self, st: &dyn Storage, c: u64, addend: i64) -> Result<()> {
        if addend < 0 {
            self.free_now(
                st,
                PendingFree {
                    offset: c * self.geo.cs,
                    len: self.geo.cs,
                    discard: true,
                },
            )
        } else {
            self.update_refcount(st, c, addend)
        }
    }

    /// Writes `entries` as the new snapshot table and points the header at it (one
    /// write of `nb_snapshots` and `snapshots_offset`), then frees the old table.
    fn publish_table(&mut self, st: &dyn Storage, entries: &[Vec<u8>]) -> Result<()> {
        let cs = self.geo.cs;
        let bytes: Vec<u8> = entries.concat();
        if bytes.len() as u64 > MAX_TABLE_BYTES {
            return Err(Error::invalid("Snapshot table too large"));
        }
        let new_off = if bytes.is_empty() {
            0
        } else {
            let off = self.alloc_clusters(st, (bytes.len() as u64).div_ceil(cs))?;
            self.check_overlap(off, bytes.len() as u64, "snapshot table")?;
            // The table's refcounts before the table, the table before the header.
            self.flush_rc(st)?;
            st.write_at(&bytes, off)?;
            st.flush()?;
            off
        };
        let old_off = self.header.snapshots_offset;
        let old_len = if self.header.nb_snapshots > 0 {
            snapshot::read_table(st, &self.header)?.1
        } else {
            0
        };
        let mut hb = Vec::with_capacity(12);
        hb.extend_from_slice(&(entries.len() as u32).to_be_bytes());
        hb.extend_from_slice(&new_off.to_be_bytes());
        st.write_at(&hb, OFF_SNAPSHOTS)?;
        st.flush()?;
        self.header.nb_snapshots = entries.len() as u32;
        self.header.snapshots_offset = new_off;
        if old_len > 0 {
            self.free_now(
                st,
                PendingFree {
                    offset: old_off,
                    len: old_len,
                    discard: true,
                },
            )?;
        }
        self.snapshots = if entries.is_empty() {
            Vec::new()
        } else {
            snapshot::read_table(st, &self.header)?.0
        };
        self.flush(st)
    }

    /// The L1 table of snapshot `sn`, read from the image.
    fn snapshot_l1(&self, st: &dyn Storage, sn: &Snapshot) -> Result<Vec<u64>> {
        let mut b = vec![0u8; sn.l1_size as usize * 8];
        if !b.is_empty() {
            st.read_at(&mut b, sn.l1_table_offset)?;
        }
        Ok(be_words(&b))
    }
}

impl Qcow2 {
    /// Whether the image may change now: writable, not corrupt, no request in
    /// flight, and an active tree that a walk can trust.
    fn quiescent(&self, m: &Meta) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        m.check_tree(&m.l1)?;
        if m.corrupt {
            return Err(Error::corrupt(
                "The image is corrupt; refusing to change it",
            ));
        }
        if !m.inflight.is_empty() {
            return Err(Error::invalid(
                "Snapshots need an idle image (requests are in flight)",
            ));
        }
        Ok(())
    }

    /// Forgets the last decompressed cluster: its host offset may now hold other data.
    fn forget_decompressed(&self) {
        let mut z = self.zcache.lock().unwrap_or_else(|e| e.into_inner());
        z.0 = z.0.wrapping_add(1);
        z.1 = None;
    }

    fn find_by_id(m: &Meta, id: &str) -> Result<usize> {
        m.snapshots
            .iter()
            .position(|s| s.id == id)
            .ok_or_else(|| Error::invalid(format!("Can't find the snapshot with id '{id}'")))
    }
}

impl InternalSnapshots for Qcow2 {
    fn create_snapshot(&self, new: &NewSnapshot) -> Result<SnapshotInfo> {
        let st = self.storage_ref();
        let mut m = self.lock();
        self.quiescent(&m)?;
        if m.snapshots.len() as u64 >= u64::from(MAX_SNAPSHOTS) {
            return Err(Error::invalid("Too many snapshots"));
        }
        m.flush(st)?;
        let active = m.l1.clone();
        m.check_headroom(st, &active)?;
        // The snapshot's own table space is allocated before any reference is taken:
        // an allocation failure changes nothing but a leak.
        let (on_disk, mut entries, _) = if m.header.nb_snapshots > 0 {
            snapshot::read_table_raw(st, &m.header)?
        } else {
            (Vec::new(), Vec::new(), 0)
        };
        let cs = self.geo.cs;
        let l1_bytes = active.len() as u64 * 8;
        let l1_off = if l1_bytes == 0 {
            0
        } else {
            m.alloc_clusters(st, l1_bytes.div_ceil(cs))?
        };
        // First the COPIED flags go (L2 tables, then the L1 table, on disk), then
        // the references are added.
        m.update_active(st, 0, Flags::Clear)?;
        m.flush(st)?;
        m.update_active(st, 1, Flags::FromRefcounts)?;
        if l1_bytes > 0 {
            let copy: Vec<u64> = m.l1.iter().map(|e| e & !OFLAG_COPIED).collect();
            m.check_overlap(l1_off, l1_bytes, "snapshot L1 table")?;
            st.write_at(&to_be(&copy), l1_off)?;
        }
        m.flush(st)?;
        let next_id = on_disk
            .iter()
            .filter_map(|s| s.id.parse::<u64>().ok())
            .max()
            .unwrap_or(0)
            + 1;
        let sn = Snapshot {
            l1_table_offset: l1_off,
            l1_size: m.l1.len() as u32,
            id: next_id.to_string(),
            name: snapshot::truncate(&new.name, snapshot::MAX_NAME_BYTES).to_string(),
            date_sec: new.date_sec,
            date_nsec: new.date_nsec,
            vm_clock_nsec: new.vm_clock_nsec,
            vm_state_size: 0,
            disk_size: self.size.load(Ordering::Acquire),
            icount: new.icount,
        };
        entries.push(snapshot::encode_entry(&sn));
        m.publish_table(st, &entries)?;
        Ok(sn.info())
    }

    fn apply_snapshot(&self, id: &str) -> Result<()> {
        let st = self.storage_ref();
        let mut m = self.lock();
        self.quiescent(&m)?;
        let sn = m.snapshots[Self::find_by_id(&m, id)?].clone();
        let size = self.size.load(Ordering::Acquire);
        if sn.disk_size != size && m.header.bitmaps_ext.is_some() {
            return Err(Error::unsupported(
                "Cannot apply a snapshot of another disk size to an image with persistent bitmaps",
            ));
        }
        if self.geo.l1_entries_for(sn.disk_size) > u64::from(sn.l1_size) {
            return Err(Error::corrupt(format!(
                "Snapshot L1 table too small for the snapshot's disk size (snapshot '{}')",
                sn.name
            )));
        }
        m.flush(st)?;
        let mut new_l1 = m.snapshot_l1(st, &sn)?;
        m.check_tree(&new_l1)?;
        m.check_headroom(st, &new_l1)?;
        m.update_tree(st, &mut new_l1, 1, Flags::FromRefcounts)?;
        // The active tree's COPIED flags follow the new references too, so that no
        // cluster shared with the snapshot is marked writable in place on disk.
        m.update_active(st, 0, Flags::FromRefcounts)?;
        m.flush(st)?;
        // The switch: the snapshot's table becomes the active one in one header write.
        let old_l1 = m.l1.clone();
        new_l1.resize(old_l1.len().max(new_l1.len()), 0);
        m.replace_l1(st, new_l1)?;
        if sn.disk_size != size {
            st.write_at(&sn.disk_size.to_be_bytes(), OFF_SIZE)?;
            st.flush()?;
            m.header.size = sn.disk_size;
            self.size.store(sn.disk_size, Ordering::Release);
        }
        let mut old = old_l1;
        m.update_tree(st, &mut old, -1, Flags::FromRefcounts)?;
        m.flush(st)?;
        m.update_active(st, 0, Flags::FromRefcounts)?;
        m.flush(st)?;
        drop(m);
        self.forget_decompressed();
        Ok(())
    }

    fn delete_snapshot(&self, id: &str) -> Result<()> {
        let st = self.storage_ref();
        let mut m = self.lock();
        self.quiescent(&m)?;
        let sn = m.snapshots[Self::find_by_id(&m, id)?].clone();
        m.flush(st)?;
        let mut l1 = m.snapshot_l1(st, &sn)?;
        m.check_tree(&l1)?;
        // The table as it is on disk now (in a damaged image, writes may have
        // landed on it since it was read at open).
        let (on_disk, mut entries, _) = snapshot::read_table_raw(st, &m.header)?;
        let Some(i) = on_disk.iter().position(|s| *s == sn) else {
            return Err(Error::corrupt(
                "The snapshot table changed on disk since the image was opened",
            ));
        };
        entries.remove(i);
        m.publish_table(st, &entries)?;
        // From here on a failure only leaks clusters.
        m.update_tree(st, &mut l1, -1, Flags::FromRefcounts)?;
        if sn.l1_size > 0 {
            m.free_now(
                st,
                PendingFree {
                    offset: sn.l1_table_offset,
                    len: u64::from(sn.l1_size) * 8,
                    discard: true,
                },
            )?;
        }
        m.update_active(st, 0, Flags::FromRefcounts)?;
        m.flush(st)?;
        drop(m);
        self.forget_decompressed();
        Ok(())
    }
}
