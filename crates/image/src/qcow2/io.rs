//! The qcow2 data path: reads, writes with copy-on-write, zero writes, discards,
//! compressed writes and block status.

use std::sync::{Arc, MutexGuard};

use crate::driver::{BlockIo, BlockStatus, FormatDriver};
use crate::{Error, Result};

use super::compress;
use super::l2::{
    classify, compressed_entry, sub_state, ClusterType, SubState, BITMAP_ALL_ALLOC,
    BITMAP_ALL_ZEROES, OFFSET_MASK, OFLAG_COMPRESSED, OFLAG_COPIED, OFLAG_ZERO,
};
use super::meta::{Meta, PendingFree};
use super::Qcow2;

/// What a zeroing request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ZeroMode {
    /// Make the range read as zeroes; `unmap` allows deallocation.
    Zero {
        /// The caller allows deallocating.
        unmap: bool,
    },
    /// A guest discard: QEMU's choice of what reads back afterwards.
    Discard,
    /// Deallocate completely (entries become unallocated), for `make_empty`.
    FullDiscard,
}

/// A zero buffer for explicit zero writes.
const ZERO_CHUNK: usize = 1 << 20;
/// Most clusters mapped under one lock acquisition, or written with one I/O.
const MAX_BATCH: u64 = 256;

fn mergeable(a: SubState, b: SubState, dist: u64) -> bool {
    match (a, b) {
        (SubState::Data(h1), SubState::Data(h2)) => h2 == h1 + dist,
        (SubState::Zero(_), SubState::Zero(_)) => true,
        (SubState::Backing, SubState::Backing) => true,
        (SubState::Compressed { .. }, SubState::Compressed { .. }) => true,
        _ => false,
    }
}

impl Qcow2 {
    fn sub(&self, entry: u64, bitmap: u64, sc: u32) -> Result<SubState> {
        let g = &self.geo;
        sub_state(entry, bitmap, sc, g.sc_bits, g.cluster_bits, g.ext)
    }

    /// Reads bytes `[in_off, in_off + out.len())` of guest cluster `gc` as described
    /// by its L2 entry, without the metadata lock.
    fn read_from_entry(
        &self,
        entry: u64,
        bitmap: u64,
        gc: u64,
        in_off: u64,
        out: &mut [u8],
    ) -> Result<()> {
        let g = self.geo;
        let sc_size = 1u64 << g.sc_bits;
        let end = in_off + out.len() as u64;
        let mut o = in_off;
        while o < end {
            let sc = (o >> g.sc_bits) as u32;
            let state = self.sub(entry, bitmap, sc)?;
            let mut run_end = (((sc + 1) as u64) << g.sc_bits).min(end);
            let mut next = sc + 1;
            while run_end < end {
                let s2 = self.sub(entry, bitmap, next)?;
                if !mergeable(state, s2, (next - sc) as u64 * sc_size) {
                    break;
                }
                next += 1;
                run_end = ((next as u64) << g.sc_bits).min(end);
            }
            let chunk = &mut out[(o - in_off) as usize..(run_end - in_off) as usize];
            match state {
                SubState::Data(h) => {
                    let host = h + (o - ((sc as u64) << g.sc_bits));
                    self.st.read_at(chunk, host)?;
                }
                SubState::Zero(_) => chunk.fill(0),
                SubState::Backing => self.read_backing(chunk, (gc << g.cluster_bits) + o)?,
                SubState::Compressed { offset, len } => {
                    let data = self.decompressed(offset, len)?;
                    chunk.copy_from_slice(&data[o as usize..run_end as usize]);
                }
            }
            o = run_end;
        }
        Ok(())
    }

    /// Reads from the backing file; beyond its end (or without one) reads zeroes.
    pub(super) fn read_backing(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        match &self.backing {
            Some(b) => {
                let bsize = b.size();
                if offset >= bsize {
                    buf.fill(0);
                } else {
                    let n = ((bsize - offset) as usize).min(buf.len());
                    b.read(&mut buf[..n], offset)?;
                    buf[n..].fill(0);
                }
                Ok(())
            }
            None => {
                buf.fill(0);
                Ok(())
            }
        }
    }

    fn decompressed(&self, offset: u64, len: u64) -> Result<Arc<Vec<u8>>> {
        let gen = {
            let z = self.zcache.lock().unwrap_or_else(|e| e.into_inner());
            if let Some((o, d)) = z.1.as_ref() {
                if *o == offset {
                    return Ok(d.clone());
                }
            }
            z.0
        };
        let cs = self.geo.cs;
        let len = len.min(2 * cs + 512);
        let mut input = vec![0u8; len as usize];
        self.st.read_at(&mut input, offset)?;
        let mut out = vec![0u8; cs as usize];
        compress::decompress(self.geo.compression_type, &input, &mut out).map_err(|e| {
            Error::corrupt(format!(
                "Compressed cluster at host offset {offset:#x}: {e}"
            ))
        })?;
        let out = Arc::new(out);
        let mut z = self.zcache.lock().unwrap_or_else(|e| e.into_inner());
        // Only cache if no compressed write happened meanwhile (it may reuse `offset`).
        if z.0 == gen {
            z.1 = Some((offset, out.clone()));
        }
        Ok(out)
    }

    /// Forgets the cached decompressed cluster (its host space may be reused).
    fn invalidate_zcache(&self) {
        let mut z = self.zcache.lock().unwrap_or_else(|e| e.into_inner());
        z.0 += 1;
        z.1 = None;
    }

    pub(super) fn read_impl(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let g = self.geo;
        let cs = g.cs;
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let first_gc = pos >> g.cluster_bits;
            let last_gc = (offset + buf.len() as u64 - 1) >> g.cluster_bits;
            let nb = (last_gc - first_gc + 1).min(MAX_BATCH);
            // One lock acquisition maps a batch of clusters.
            let entries: Vec<(u64, u64)> = {
                let mut m = self.lock();
                (first_gc..first_gc + nb)
                    .map(|gc| m.l2_entry(self.storage_ref(), gc))
                    .collect::<Result<_>>()?
            };
            let mut i = 0usize;
            while i < entries.len() && done < buf.len() {
                let pos = offset + done as u64;
                let gc = first_gc + i as u64;
                let in_off = pos & (cs - 1);
                // Host-contiguous fully allocated clusters become one read.
                if let Some(h) = self.whole_data(entries[i]) {
                    let mut j = i + 1;
                    while j < entries.len()
                        && self.whole_data(entries[j]) == Some(h + (j - i) as u64 * cs)
                    {
                        j += 1;
                    }
                    let span = ((j - i) as u64 * cs - in_off) as usize;
                    let n = span.min(buf.len() - done);
                    self.st.read_at(&mut buf[done..done + n], h + in_off)?;
                    done += n;
                    i = j;
                    continue;
                }
                let n = ((cs - in_off) as usize).min(buf.len() - done);
                let (entry, bitmap) = entries[i];
                self.read_from_entry(entry, bitmap, gc, in_off, &mut buf[done..done + n])?;
                done += n;
                i += 1;
            }
        }
        Ok(())
    }

    /// The host offset of a cluster whose every byte is data in place.
    pub(super) fn whole_data(&self, (entry, bitmap): (u64, u64)) -> Option<u64> {
        match classify(entry, self.geo.cluster_bits, self.geo.ext) {
            ClusterType::Normal(h) if !self.geo.ext || bitmap == BITMAP_ALL_ALLOC => Some(h),
            _ => None,
        }
    }

    fn wait_inflight<'a>(&'a self, mut m: MutexGuard<'a, Meta>, gc: u64) -> MutexGuard<'a, Meta> {
        while m.inflight.contains(&gc) {
            m = self.cv.wait(m).unwrap_or_else(|e| e.into_inner());
        }
        m
    }

    fn end_inflight(&self, gc: u64) {
        let mut m = self.lock();
        m.inflight.remove(&gc);
        drop(m);
        self.cv.notify_all();
    }

    pub(super) fn write_impl(&self, buf: &[u8], offset: u64) -> Result<()> {
        let cs = self.geo.cs;
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let gc = pos >> self.geo.cluster_bits;
            let in_off = pos & (cs - 1);
            let whole = (buf.len() - done) as u64 / cs;
            if in_off == 0 && whole >= 2 {
                let max = whole.min(MAX_BATCH).min(self.geo.rb_entries / 4).max(1);
                let n = self.write_whole_clusters(gc, max, &buf[done..])?;
                if n > 0 {
                    done += n;
                    continue;
                }
            }
            let n = ((cs - in_off) as usize).min(buf.len() - done);
            self.write_cluster(gc, in_off, &buf[done..done + n])?;
            done += n;
        }
        Ok(())
    }

    /// Writes a run of whole clusters starting at guest cluster `gc` (at most `max`),
    /// with one I/O: either clusters already writable in place at contiguous host
    /// offsets, or clusters that all need new space (allocated contiguously; no
    /// copy-on-write is needed as every byte is overwritten). Returns the bytes
    /// written, 0 if the first cluster fits neither case.
    fn write_whole_clusters(&self, gc: u64, max: u64, data: &[u8]) -> Result<usize> {
        let g = self.geo;
        let cs = g.cs;
        let st = self.storage_ref();
        // Stay inside one L2 table so that one writable table covers the run.
        let table_end = ((gc >> g.l2_bits) + 1) << g.l2_bits;
        let max = max.min(table_end - gc);
        let mut m = self.lock();
        if m.corrupt {
            return Err(Error::corrupt("Image is corrupt; writes are refused"));
        }
        let mut olds = Vec::new();
        let mut in_place: Option<u64> = None;
        for k in 0..max {
            let c = gc + k;
            if m.inflight.contains(&c) {
                break;
            }
            let (entry, bitmap) = m.l2_entry(st, c)?;
            let writable = entry & OFLAG_COPIED != 0 && self.whole_data((entry, bitmap)).is_some();
            match (k, writable, in_place) {
                (0, true, _) => in_place = self.whole_data((entry, bitmap)),
                (_, true, Some(h)) if self.whole_data((entry, bitmap)) == Some(h + k * cs) => {}
                (_, false, None) => {}
                _ => break,
            }
            olds.push(entry);
        }
        let k = olds.len() as u64;
        if k == 0 {
            return Ok(0);
        }
        let len = (k * cs) as usize;
        if let Some(h) = in_place {
            m.check_in_image(h + (k - 1) * cs, "Data cluster")?;
            m.check_data_overlap(h, k * cs)?;
            drop(m);
            self.st.write_at(&data[..len], h)?;
            return Ok(len);
        }
        m.l2_for_write(st, gc)?;
        let host = m.alloc_clusters(st, k)?;
        if let Err(e) = m.check_data_overlap(host, k * cs) {
            m.corrupt = true;
            return Err(e);
        }
        for c in gc..gc + k {
            m.inflight.insert(c);
        }
        let frontier = m.end_cluster * cs;
        drop(m);
        self.grow.ensure(st, frontier, cs);
        let r = self.st.write_at(&data[..len], host);
        let mut m = self.lock();
        let res = (|| {
            r?;
            let l2_off = m.l2_for_write(st, gc)?;
            let bitmap = if g.ext { BITMAP_ALL_ALLOC } else { 0 };
            for (k, &old) in olds.iter().enumerate() {
                let c = gc + k as u64;
                m.set_l2_entry(l2_off, c, (host + k as u64 * cs) | OFLAG_COPIED, bitmap);
                if let Some(mut f) = self.host_of(old) {
                    f.discard = false;
                    m.pending_frees.push(f);
                }
            }
            Ok(())
        })();
        if res.is_err() {
            let _ = m.free_now(
                st,
                PendingFree {
                    offset: host,
                    len: k * cs,
                    discard: false,
                },
            );
        }
        for c in gc..gc + k {
            m.inflight.remove(&c);
        }
        drop(m);
        self.cv.notify_all();
        res.map(|()| len)
    }

    /// Bits of the subclusters touched by `[in_off, in_off + len)`.
    fn touched_mask(&self, in_off: u64, len: u64) -> u64 {
        if !self.geo.ext {
            return 1;
        }
        let first = in_off >> self.geo.sc_bits;
        let last = (in_off + len - 1) >> self.geo.sc_bits;
        let n = last - first + 1;
        let ones = if n >= 64 { u64::MAX } else { (1u64 << n) - 1 };
        (ones << first) & BITMAP_ALL_ALLOC
    }

    fn write_cluster(&self, gc: u64, in_off: u64, data: &[u8]) -> Result<()> {
        let m = self.lock();
        let mut m = self.wait_inflight(m, gc);
        if m.corrupt {
            return Err(Error::corrupt("Image is corrupt; writes are refused"));
        }
        let (entry, bitmap) = m.l2_entry(self.storage_ref(), gc)?;
        let touched = self.touched_mask(in_off, data.len() as u64);
        if entry & OFLAG_COPIED != 0 {
            if let ClusterType::Normal(h) = classify(entry, self.geo.cluster_bits, self.geo.ext) {
                if !self.geo.ext || bitmap & touched == touched {
                    m.check_in_image(h, "Data cluster")?;
                    m.check_data_overlap(h + in_off, data.len() as u64)?;
                    drop(m);
                    return self.st.write_at(data, h + in_off);
                }
            }
        }
        m.inflight.insert(gc);
        let r = self.allocating_write(m, gc, in_off, data, entry, bitmap, touched);
        self.end_inflight(gc);
        r
    }

    #[allow(clippy::too_many_arguments)]
    fn allocating_write(
        &self,
        mut m: MutexGuard<'_, Meta>,
        gc: u64,
        in_off: u64,
        data: &[u8],
        entry: u64,
        bitmap: u64,
        touched: u64,
    ) -> Result<()> {
        let g = self.geo;
        let cs = g.cs;
        let st = self.storage_ref();
        let ct = classify(entry, g.cluster_bits, g.ext);
        let copied = entry & OFLAG_COPIED != 0;
        m.l2_for_write(st, gc)?;
        let (host, reuse, old_free) = match ct {
            ClusterType::Normal(h) | ClusterType::ZeroAlloc(h) if copied => (h, true, None),
            ClusterType::Normal(h) | ClusterType::ZeroAlloc(h) => (
                0,
                false,
                Some(PendingFree {
                    offset: h,
                    len: cs,
                    discard: false,
                }),
            ),
            ClusterType::Compressed { offset, len } => (
                0,
                false,
                Some(PendingFree {
                    offset,
                    len,
                    discard: false,
                }),
            ),
            ClusterType::Unallocated | ClusterType::ZeroPlain => (0, false, None),
        };
        let fresh_from = m.end_cluster;
        let host = if reuse {
            m.check_in_image(host, "Data cluster")?;
            m.check_data_overlap(host, cs)?;
            host
        } else {
            let host = m.alloc_clusters(st, 1)?;
            if let Err(e) = m.check_data_overlap(host, cs) {
                m.corrupt = true;
                return Err(e);
            }
            host
        };
        let frontier = m.end_cluster * cs;
        drop(m);
        self.grow.ensure(st, frontier, cs);
        // A cluster past everything ever written reads as zeroes already: when the
        // old contents are zeroes too, only the new data needs writing.
        let old_reads_zero = match ct {
            ClusterType::ZeroPlain => true,
            ClusterType::Unallocated => self.backing.is_none(),
            _ => false,
        };
        let fresh = !reuse && host / cs >= fresh_from;

        // Which part of the cluster gets written, and the new subcluster bitmap.
        let old_has_data = matches!(ct, ClusterType::Normal(_) | ClusterType::Compressed { .. });
        let (w_start, w_end, new_bitmap) = if !g.ext {
            (0, cs, 0)
        } else if !reuse && old_has_data {
            let old = if matches!(ct, ClusterType::Compressed { .. }) {
                BITMAP_ALL_ALLOC
            } else {
                bitmap
            };
            (0, cs, (old | touched) & !(touched << 32))
        } else {
            let first = in_off >> g.sc_bits << g.sc_bits;
            let last = (in_off + data.len() as u64 - 1) >> g.sc_bits;
            let base = if reuse {
                bitmap
            } else {
                bitmap & !BITMAP_ALL_ALLOC
            };
            (
                first,
                (last + 1) << g.sc_bits,
                (base | touched) & !(touched << 32),
            )
        };
        let r = if w_start == in_off && w_end == in_off + data.len() as u64 {
            self.st.write_at(data, host + in_off)
        } else if fresh && old_reads_zero {
            // As QEMU does for copy-on-write from zeroes: make the written part of
            // the cluster read as zero cheaply, then write the data.
            self.st
                .write_zeroes(host + w_start, w_end - w_start, false)
                .and_then(|()| self.st.write_at(data, host + in_off))
        } else {
            let mut buf = vec![0u8; (w_end - w_start) as usize];
            let head = (in_off - w_start) as usize;
            let tail = head + data.len();
            let old_entry = if matches!(ct, ClusterType::ZeroAlloc(_)) && !g.ext {
                OFLAG_ZERO
            } else {
                entry
            };
            (|| {
                if head > 0 {
                    self.read_from_entry(old_entry, bitmap, gc, w_start, &mut buf[..head])?;
                }
                if tail < buf.len() {
                    self.read_from_entry(
                        old_entry,
                        bitmap,
                        gc,
                        w_start + tail as u64,
                        &mut buf[tail..],
                    )?;
                }
                buf[head..tail].copy_from_slice(data);
                self.st.write_at(&buf, host + w_start)
            })()
        };
        let mut m = self.lock();
        if let Err(e) = r {
            if !reuse {
                m.free_now(
                    st,
                    PendingFree {
                        offset: host,
                        len: cs,
                        discard: false,
                    },
                )?;
            }
            return Err(e);
        }
        let l2_off = m.l2_for_write(st, gc)?;
        m.set_l2_entry(l2_off, gc, host | OFLAG_COPIED, new_bitmap);
        if let Some(f) = old_free {
            m.pending_frees.push(f);
        }
        Ok(())
    }

    pub(super) fn write_compressed_impl(&self, buf: &[u8], offset: u64) -> Result<()> {
        let g = self.geo;
        let cs = g.cs;
        if offset % cs != 0 {
            return Err(Error::invalid("Compressed writes must be cluster aligned"));
        }
        if buf.len() as u64 != cs && offset + buf.len() as u64 != self.size() {
            return Err(Error::invalid(
                "Compressed writes must cover exactly one cluster",
            ));
        }
        let mut cluster = buf.to_vec();
        cluster.resize(cs as usize, 0);
        let Some(packed) = compress::compress(g.compression_type, &cluster, cs as usize - 1)?
        else {
            return self.write_impl(buf, offset);
        };
        let gc = offset >> g.cluster_bits;
        let st = self.storage_ref();
        let m = self.lock();
        let mut m = self.wait_inflight(m, gc);
        let (entry, _) = m.l2_entry(st, gc)?;
        m.l2_for_write(st, gc)?;
        let host = m.alloc_bytes(st, packed.len() as u64)?;
        m.inflight.insert(gc);
        drop(m);
        self.invalidate_zcache();
        let r = self.st.write_at(&packed, host);
        let mut m = self.lock();
        m.inflight.remove(&gc);
        self.cv.notify_all();
        if let Err(e) = r {
            m.free_now(
                st,
                PendingFree {
                    offset: host,
                    len: packed.len() as u64,
                    discard: false,
                },
            )?;
            return Err(e);
        }
        let l2_off = m.l2_for_write(st, gc)?;
        m.set_l2_entry(
            l2_off,
            gc,
            compressed_entry(host, packed.len() as u64, g.cluster_bits),
            0,
        );
        if let Some(f) = self.host_of(entry) {
            m.pending_frees.push(f);
        }
        Ok(())
    }

    /// The host space an entry references, as a free to queue when it is replaced.
    fn host_of(&self, entry: u64) -> Option<PendingFree> {
        match classify(entry, self.geo.cluster_bits, self.geo.ext) {
            ClusterType::Normal(h) | ClusterType::ZeroAlloc(h) => Some(PendingFree {
                offset: h,
                len: self.geo.cs,
                discard: true,
            }),
            ClusterType::Compressed { offset, len } => Some(PendingFree {
                offset,
                len,
                discard: true,
            }),
            _ => None,
        }
    }

    /// Zero writes and discards: whole clusters (or subclusters) through metadata,
    /// the rest as explicit zero writes (zero) or ignored (discard), as QEMU does.
    pub(super) fn zero_impl(&self, offset: u64, len: u64, mode: ZeroMode) -> Result<()> {
        let g = self.geo;
        // QEMU discards whole clusters only; zeroing works on subclusters.
        let unit = if matches!(mode, ZeroMode::Zero { .. }) {
            1u64 << g.sc_bits
        } else {
            g.cs
        };
        let end = offset + len;
        let size = self.size();
        let mut pos = offset;
        while pos < end {
            let gc = pos >> g.cluster_bits;
            let cstart = gc << g.cluster_bits;
            let cend = (cstart + g.cs).min(end);
            // A unit cut short by the image end counts as whole.
            let eff_end = if cend == size {
                cend.div_ceil(unit) * unit
            } else {
                cend
            };
            let a_start = pos.div_ceil(unit) * unit;
            let a_end = eff_end / unit * unit;
            if a_start < a_end {
                let mask = if g.ext {
                    self.touched_mask(a_start - cstart, a_end - a_start)
                } else {
                    1
                };
                let whole = a_start == cstart && a_end == cstart + g.cs;
                let handled = self.zero_units(gc, mask, whole, mode)?;
                if !handled {
                    if let ZeroMode::Zero { .. } = mode {
                        self.write_zero_bytes(a_start, a_end.min(cend) - a_start)?;
                    }
                }
                if matches!(mode, ZeroMode::Zero { .. }) {
                    if pos < a_start {
                        self.write_zero_bytes(pos, a_start.min(cend) - pos)?;
                    }
                    if a_end < cend {
                        self.write_zero_bytes(a_end, cend - a_end)?;
                    }
                }
            } else if matches!(mode, ZeroMode::Zero { .. }) {
                self.write_zero_bytes(pos, cend - pos)?;
            }
            pos = cend;
        }
        Ok(())
    }

    fn write_zero_bytes(&self, offset: u64, len: u64) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        // Ranges that already read as zeroes need no allocation (one cluster at most).
        if (offset & (self.geo.cs - 1)) + len <= self.geo.cs {
            let s = self.status_impl(offset, len)?;
            if s.len == len && (s.zero || (!s.allocated && self.backing.is_none())) {
                return Ok(());
            }
        }
        let zeros = vec![0u8; ZERO_CHUNK.min(len as usize)];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(zeros.len() as u64);
            self.write_impl(&zeros[..n as usize], offset + done)?;
            done += n;
        }
        Ok(())
    }

    /// Applies a zero/discard to the subclusters in `mask` of guest cluster `gc`
    /// (`whole`: the entire cluster) through metadata. Returns false when the request
    /// must fall back to explicit zero writes.
    fn zero_units(&self, gc: u64, mask: u64, whole: bool, mode: ZeroMode) -> Result<bool> {
        let g = self.geo;
        let st = self.storage_ref();
        let m = self.lock();
        let mut m = self.wait_inflight(m, gc);
        if m.corrupt {
            return Err(Error::corrupt("Image is corrupt; writes are refused"));
        }
        let (entry, bitmap) = m.l2_entry(st, gc)?;
        let ct = classify(entry, g.cluster_bits, g.ext);
        let copied = entry & OFLAG_COPIED != 0;
        let allocated = !matches!(ct, ClusterType::Unallocated | ClusterType::ZeroPlain);
        let has_backing = self.backing.is_some();
        let v3 = g.version >= 3;

        let (new_entry, new_bitmap, free) = if whole {
            match mode {
                ZeroMode::FullDiscard => (0, 0, self.host_of(entry)),
                ZeroMode::Discard => {
                    if has_backing || allocated {
                        if g.ext {
                            (0, BITMAP_ALL_ZEROES, self.host_of(entry))
                        } else if v3 {
                            (OFLAG_ZERO, 0, self.host_of(entry))
                        } else {
                            (0, 0, self.host_of(entry))
                        }
                    } else {
                        (0, 0, None)
                    }
                }
                ZeroMode::Zero { unmap } => {
                    if !v3 {
                        if has_backing {
                            return Ok(false);
                        }
                        (0, 0, self.host_of(entry))
                    } else if let (
                        ClusterType::Normal(h) | ClusterType::ZeroAlloc(h),
                        false,
                        true,
                    ) = (ct, unmap, copied)
                    {
                        if g.ext {
                            (h | OFLAG_COPIED, BITMAP_ALL_ZEROES, None)
                        } else {
                            (h | OFLAG_COPIED | OFLAG_ZERO, 0, None)
                        }
                    } else if g.ext {
                        (0, BITMAP_ALL_ZEROES, self.host_of(entry))
                    } else {
                        (OFLAG_ZERO, 0, self.host_of(entry))
                    }
                }
            }
        } else {
            // Part of a cluster: only extended L2 gets here with whole subclusters.
            if !g.ext || matches!(ct, ClusterType::Compressed { .. }) {
                return Ok(false);
            }
            if let ClusterType::Normal(_) = ct {
                if !copied {
                    // Shared with a snapshot: the bitmap cannot change in place. A
                    // discard is only a hint and is dropped; zeroes are written out.
                    return Ok(!matches!(mode, ZeroMode::Zero { .. }));
                }
            }
            let zero_bits = mask << 32;
            let nb = match mode {
                ZeroMode::Zero { .. } => (bitmap & !mask) | zero_bits,
                ZeroMode::Discard if has_backing => (bitmap & !mask) | zero_bits,
                ZeroMode::Discard | ZeroMode::FullDiscard => bitmap & !mask & !zero_bits,
            };
            (entry, nb, None)
        };
        if new_entry == entry && new_bitmap == bitmap {
            return Ok(true);
        }
        let l2_off = m.l2_for_write(st, gc)?;
        m.set_l2_entry(l2_off, gc, new_entry, new_bitmap);
        if let Some(f) = free {
            m.pending_frees.push(f);
        }
        Ok(true)
    }

    pub(super) fn make_empty_impl(&self) -> Result<()> {
        let g = self.geo;
        let size = self.size();
        let clusters = size.div_ceil(g.cs);
        let mut gc = 0;
        while gc < clusters {
            let l1i = (gc >> g.l2_bits) as usize;
            let has_table = self.lock().l2_offset(l1i)? != 0;
            if !has_table {
                gc = ((l1i as u64) + 1) << g.l2_bits;
                continue;
            }
            self.zero_units(gc, BITMAP_ALL_ALLOC, true, ZeroMode::FullDiscard)?;
            gc += 1;
        }
        let mut m = self.lock();
        m.flush(self.storage_ref())
    }

    pub(super) fn status_impl(&self, offset: u64, len: u64) -> Result<BlockStatus> {
        let g = self.geo;
        let sc_size = 1u64 << g.sc_bits;
        let end = offset + len;
        let mut m = self.lock();
        let st = self.storage_ref();
        // The L2 table the previous unit came from: later units of the same table are
        // read from the cache without another lookup.
        let mut loaded = 0u64;
        // (state, host offset of `pos` when the host cluster is known, end of the unit)
        let mut state_at = |m: &mut Meta, pos: u64| -> Result<(SubState, Option<u64>, u64)> {
            let gc = pos >> g.cluster_bits;
            let l1i = (gc >> g.l2_bits) as usize;
            let off = m.l2_offset(l1i)?;
            if off == 0 {
                // No L2 table: the whole table's span is unallocated.
                let span_end = ((l1i as u64) + 1) * g.l2_span();
                return Ok((SubState::Backing, None, span_end));
            }
            let cached = if off == loaded {
                let idx = (gc & (g.l2_entries - 1)) as usize;
                m.l2_cache.peek(off).map(|t| t.get(idx))
            } else {
                None
            };
            let (entry, bitmap) = match cached {
                Some(e) if (e.0 & OFLAG_COMPRESSED != 0) || (e.0 & OFFSET_MASK) % g.cs == 0 => e,
                _ => {
                    let e = m.l2_entry(st, gc)?;
                    loaded = off;
                    e
                }
            };
            let sc = ((pos & (g.cs - 1)) >> g.sc_bits) as u32;
            let s = sub_state(entry, bitmap, sc, g.sc_bits, g.cluster_bits, g.ext)?;
            let host = match (s, classify(entry, g.cluster_bits, g.ext)) {
                (SubState::Data(h), _) => Some(h + (pos & (sc_size - 1))),
                (SubState::Zero(Some(h)), _) => Some(h + (pos & (g.cs - 1))),
                // Unallocated subclusters of an allocated cluster still have a place.
                (SubState::Backing, ClusterType::Normal(h)) => Some(h + (pos & (g.cs - 1))),
                _ => None,
            };
            let unit_end = (pos | (sc_size - 1)) + 1;
            Ok((s, host, unit_end))
        };
        let (first, first_host, mut pos) = state_at(&mut m, offset)?;
        let same_kind = |a: SubState, b: SubState| match (a, b) {
            (SubState::Data(_), SubState::Data(_)) => true,
            (SubState::Zero(x), SubState::Zero(y)) => x.is_some() == y.is_some(),
            (SubState::Backing, SubState::Backing) => true,
            _ => false,
        };
        while pos < end && !matches!(first, SubState::Compressed { .. }) {
            let (s, host, next) = state_at(&mut m, pos)?;
            let contiguous = match (first_host, host) {
                (Some(h1), Some(h2)) => h1 + (pos - offset) == h2,
                (None, None) => true,
                _ => false,
            };
            if !same_kind(first, s) || !contiguous {
                break;
            }
            pos = next;
        }
        let run = pos.min(end) - offset;
        let (allocated, zero, data, compressed) = match first {
            SubState::Data(_) => (true, false, true, false),
            SubState::Zero(_) => (true, true, false, false),
            SubState::Backing => (false, false, false, false),
            SubState::Compressed { .. } => (true, false, true, true),
        };
        Ok(BlockStatus {
            len: run,
            allocated,
            zero,
            data,
            compressed,
            offset: if compressed { None } else { first_host },
        })
    }

    /// Whether any guest cluster at or after `from_cluster` is allocated or zero-flagged.
    pub(super) fn any_allocated_from(&self, from_cluster: u64) -> Result<bool> {
        let g = self.geo;
        let mut m = self.lock();
        let st = self.storage_ref();
        let total = m.l1.len() as u64 * g.l2_entries;
        let mut gc = from_cluster;
        while gc < total {
            let l1i = (gc >> g.l2_bits) as usize;
            if m.l2_offset(l1i)? == 0 {
                gc = ((l1i as u64) + 1) << g.l2_bits;
                continue;
            }
            let (e, b) = m.l2_entry(st, gc)?;
            if e != 0 || b != 0 {
                return Ok(true);
            }
            gc += 1;
        }
        Ok(false)
    }

    /// The backing node as a trait object (for callers inside the driver).
    pub(super) fn backing_node(&self) -> Option<&Arc<dyn FormatDriver>> {
        self.backing.as_ref()
    }
}
