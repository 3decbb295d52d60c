//! Creating qcow2 images, preallocation, and resizing.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use crate::driver::{BlockIo, Preallocation};
use crate::storage::Storage;
use crate::{CreateOptions, Error, Result};

use super::header::{
    Header, COMPAT_LAZY_REFCOUNTS, INCOMPAT_COMPRESSION, INCOMPAT_EXTL2, OFF_SIZE,
};
use super::l2::{classify, ClusterType, BITMAP_ALL_ALLOC, OFLAG_COPIED};
use super::refcount;
use super::{Qcow2, Qcow2OpenOptions};

/// Validated creation parameters.
struct Params {
    version: u32,
    cluster_bits: u32,
    refcount_order: u32,
    lazy: bool,
    ext: bool,
    compression: u8,
}

fn params(opts: &CreateOptions) -> Result<Params> {
    let version = match opts.compat.as_deref() {
        None | Some("1.1") | Some("v3") => 3,
        Some("0.10") | Some("v2") => 2,
        Some(other) => {
            return Err(Error::invalid(format!(
                "Parameter 'compat' does not accept value '{other}'"
            )))
        }
    };
    let cs = opts.cluster_size.unwrap_or(65536);
    if !cs.is_power_of_two() || !(512..=(2 << 20)).contains(&cs) {
        return Err(Error::invalid(
            "Cluster size must be a power of two between 512 and 2048k",
        ));
    }
    let cluster_bits = cs.trailing_zeros();
    let rb = opts.refcount_bits.unwrap_or(16);
    if !rb.is_power_of_two() || rb > 64 {
        return Err(Error::invalid(
            "Refcount width must be a power of two and may not exceed 64 bits",
        ));
    }
    if version < 3 && rb != 16 {
        return Err(Error::invalid(
            "Different refcount widths than 16 bits require compatibility level 1.1 or above (use compat=1.1 or greater)",
        ));
    }
    if version < 3 && opts.lazy_refcounts {
        return Err(Error::invalid(
            "Lazy refcounts only supported with compatibility level 1.1 and above (use compat=1.1 or greater)",
        ));
    }
    if opts.extended_l2 {
        if version < 3 {
            return Err(Error::invalid(
                "Extended L2 entries are only supported with compatibility level 1.1 and above (use compat=1.1 or greater)",
            ));
        }
        if cs < 16384 {
            return Err(Error::invalid(
                "Extended L2 entries are only supported with cluster sizes of at least 16384 bytes",
            ));
        }
    }
    let compression = match opts.compression_type.as_deref() {
        None | Some("zlib") => 0,
        Some("zstd") => {
            if version < 3 {
                return Err(Error::invalid(
                    "Non-zlib compression type is only supported with compatibility level 1.1 and above (use compat=1.1 or greater)",
                ));
            }
            1
        }
        Some(other) => {
            return Err(Error::invalid(format!(
                "Parameter 'compression_type' does not accept value '{other}'"
            )))
        }
    };
    if let Some(b) = &opts.backing_file {
        if b.len() > super::header::MAX_BACKING_NAME as usize {
            return Err(Error::invalid("Backing file name too long"));
        }
        if opts.preallocation != Preallocation::Off && !opts.extended_l2 {
            return Err(Error::invalid(
                "Backing file and preallocation can only be used at the same time if extended_l2 is on",
            ));
        }
    }
    Ok(Params {
        version,
        cluster_bits,
        refcount_order: rb.trailing_zeros(),
        lazy: opts.lazy_refcounts,
        ext: opts.extended_l2,
        compression,
    })
}

/// Writes a new qcow2 image of `size` bytes onto `st`: header in cluster 0, the
/// refcount table in cluster 1, its first block in cluster 2, then the L1 table
/// (QEMU's layout), then any preallocated metadata and data.
pub fn create(storage: Arc<dyn Storage>, size: u64, opts: &CreateOptions) -> Result<()> {
    let st = storage.as_ref();
    let p = params(opts)?;
    let cs = 1u64 << p.cluster_bits;
    let mut incompat = 0;
    if p.ext {
        incompat |= INCOMPAT_EXTL2;
    }
    if p.compression != 0 {
        incompat |= INCOMPAT_COMPRESSION;
    }
    let mut h = Header {
        version: p.version,
        backing_file_offset: 0,
        backing_file_size: 0,
        cluster_bits: p.cluster_bits,
        size: 0,
        crypt_method: 0,
        l1_size: 0,
        l1_table_offset: 0,
        refcount_table_offset: cs,
        refcount_table_clusters: 1,
        nb_snapshots: 0,
        snapshots_offset: 0,
        incompatible_features: incompat,
        compatible_features: if p.lazy { COMPAT_LAZY_REFCOUNTS } else { 0 },
        autoclear_features: 0,
        refcount_order: p.refcount_order,
        header_length: 0,
        compression_type: p.compression,
        backing_file: opts.backing_file.clone(),
        backing_file_raw: None,
        backing_format: opts.backing_file.as_ref().and(opts.backing_fmt.clone()),
        data_file: None,
        feature_names: Vec::new(),
        bitmaps_ext: None,
        unknown_extensions: Vec::new(),
    };
    let hbytes = h.serialize()?;
    st.set_size(0)?;
    let mut c0 = vec![0u8; cs as usize];
    c0[..hbytes.len()].copy_from_slice(&hbytes);
    st.write_at(&c0, 0)?;
    let mut table = vec![0u8; cs as usize];
    table[..8].copy_from_slice(&(2 * cs).to_be_bytes());
    st.write_at(&table, cs)?;
    let mut block = vec![0u8; cs as usize];
    for i in 0..3 {
        refcount::set(&mut block, i, p.refcount_order, 1);
    }
    st.write_at(&block, 2 * cs)?;
    st.flush()?;

    let q = Qcow2::open(storage.clone(), Qcow2OpenOptions::default(), None, false)?;
    q.resize_impl(size, opts.preallocation)?;
    q.flush()?;
    Ok(())
}

impl Qcow2 {
    pub(super) fn resize_impl(&self, new_size: u64, prealloc: Preallocation) -> Result<()> {
        let g = self.geo;
        let old = self.size();
        let st = self.storage_ref();
        if new_size < old {
            if prealloc != Preallocation::Off {
                return Err(Error::invalid(
                    "Preallocation can't be used for shrinking an image",
                ));
            }
            if self.any_allocated_from(new_size.div_ceil(g.cs))? {
                return Err(Error::invalid(
                    "Cannot shrink the image: data is allocated beyond the new end (discard it first)",
                ));
            }
            let mut m = self.lock();
            m.flush(st)?;
            st.write_at(&new_size.to_be_bytes(), OFF_SIZE)?;
            st.flush()?;
            m.header.size = new_size;
            self.size.store(new_size, Ordering::Release);
            return Ok(());
        }
        if new_size == old {
            return Ok(());
        }
        {
            let mut m = self.lock();
            let need = g.l1_entries_for(new_size);
            m.grow_l1(st, need)?;
            m.flush(st)?;
            st.write_at(&new_size.to_be_bytes(), OFF_SIZE)?;
            st.flush()?;
            m.header.size = new_size;
        }
        self.size.store(new_size, Ordering::Release);
        // The new area must read as zeroes: the tail of the old last cluster may hold
        // data, and a longer backing file would show through unallocated clusters.
        let backing_end = self.backing_node().map(|b| b.size()).unwrap_or(0);
        let tail_end = old.div_ceil(g.cs) * g.cs;
        let zero_end = tail_end.max(backing_end).min(new_size);
        if zero_end > old {
            let s = self.status_impl(old, tail_end.max(old + 1).min(new_size) - old)?;
            if (s.allocated && !s.zero) || backing_end > old {
                self.zero_impl(
                    old,
                    zero_end - old,
                    super::io::ZeroMode::Zero { unmap: false },
                )?;
            }
        }
        if prealloc != Preallocation::Off {
            self.preallocate(old, new_size, prealloc)?;
        }
        Ok(())
    }

    /// Allocates clusters (and L2 tables) for `[start, end)` of the guest disk, with
    /// data space reserved (`falloc`) or written (`full`) as requested.
    fn preallocate(&self, start: u64, end: u64, mode: Preallocation) -> Result<()> {
        let g = self.geo;
        let st = self.storage_ref();
        let first = start / g.cs;
        let last = end.div_ceil(g.cs);
        let mut gc = first;
        let mut host_ranges: Vec<(u64, u64)> = Vec::new();
        while gc < last {
            let mut m = self.lock();
            // One L2 table's worth at a time, data clusters allocated contiguously.
            let table_end = ((gc >> g.l2_bits) + 1) << g.l2_bits;
            let n = table_end.min(last) - gc;
            let l2_off = m.l2_for_write(st, gc)?;
            let mut todo = Vec::new();
            for c in gc..gc + n {
                let (e, _) = m.l2_entry(st, c)?;
                if matches!(
                    classify(e, g.cluster_bits, g.ext),
                    ClusterType::Unallocated | ClusterType::ZeroPlain
                ) {
                    todo.push(c);
                }
            }
            if !todo.is_empty() {
                let base = m.alloc_clusters(st, todo.len() as u64)?;
                let l2_off = if m.l2_cache.contains(l2_off) {
                    l2_off
                } else {
                    m.l2_for_write(st, gc)?
                };
                for (i, &c) in todo.iter().enumerate() {
                    let host = base + i as u64 * g.cs;
                    let bitmap = if g.ext { BITMAP_ALL_ALLOC } else { 0 };
                    m.set_l2_entry(l2_off, c, host | OFLAG_COPIED, bitmap);
                }
                host_ranges.push((base, todo.len() as u64 * g.cs));
            }
            gc += n;
        }
        self.lock().flush(st)?;
        let file_end = host_ranges
            .iter()
            .map(|(o, l)| o + l)
            .max()
            .unwrap_or(0)
            .max(st.size()?);
        for (off, len) in host_ranges {
            match mode {
                Preallocation::Falloc => st.preallocate(off, len)?,
                Preallocation::Full => st.write_zeroes(off, len, false)?,
                _ => {}
            }
        }
        if st.size()? < file_end {
            st.set_size(file_end)?;
        }
        st.flush()
    }
}
