//! Vectored reads and writes straight between the image file and buffers such as
//! guest RAM: runs of clusters whose data sits in place (allocated, uncompressed,
//! host-contiguous; for writes also not shared, i.e. COPIED) move with one
//! `preadv`/`pwritev`; everything else (zero, unallocated, compressed or backing
//! clusters, allocating writes, copy-on-write) goes through the slice-based path
//! with an intermediate buffer. The metadata lock is held only while mapping.

use crate::iobuf::{self, IoBuf, IoBufMut};
use crate::{Error, Result};

use super::l2::{classify, ClusterType, OFLAG_COPIED};
use super::Qcow2;

/// Most clusters mapped under one lock acquisition.
const MAX_BATCH: u64 = 256;

impl Qcow2 {
    /// Reads `[offset, offset + len(bufs))` into `bufs` (the range is checked).
    pub(super) fn read_vectored_impl(&self, bufs: &[IoBufMut<'_>], offset: u64) -> Result<()> {
        let g = self.geo;
        let cs = g.cs;
        let total = iobuf::total_len_mut(bufs);
        let mut done = 0usize;
        while done < total {
            let pos = offset + done as u64;
            let first_gc = pos >> g.cluster_bits;
            let last_gc = (offset + total as u64 - 1) >> g.cluster_bits;
            let nb = (last_gc - first_gc + 1).min(MAX_BATCH);
            let entries: Vec<(u64, u64)> = {
                let mut m = self.lock();
                (first_gc..first_gc + nb)
                    .map(|gc| m.l2_entry(self.storage_ref(), gc))
                    .collect::<Result<_>>()?
            };
            let mut i = 0usize;
            while i < entries.len() && done < total {
                let pos = offset + done as u64;
                let in_off = pos & (cs - 1);
                let Some(h) = self.whole_data(entries[i]) else {
                    // Not data in place: this cluster's part through a buffer.
                    let n = ((cs - in_off) as usize)
                        .min(total - done)
                        .min(iobuf::BOUNCE_CHUNK);
                    let mut tmp = vec![0u8; n];
                    self.read_impl(&mut tmp, pos)?;
                    iobuf::scatter(bufs, done, &tmp);
                    done += n;
                    // A cluster larger than the bounce chunk takes several rounds.
                    if in_off + n as u64 == cs {
                        i += 1;
                    }
                    continue;
                };
                let mut j = i + 1;
                while j < entries.len()
                    && self.whole_data(entries[j]) == Some(h + (j - i) as u64 * cs)
                {
                    j += 1;
                }
                let n = (((j - i) as u64 * cs - in_off) as usize).min(total - done);
                self.st
                    .read_vectored_at(&iobuf::slice_mut(bufs, done, n), h + in_off)?;
                done += n;
                i = j;
            }
        }
        Ok(())
    }

    /// Writes `bufs` at `offset` (range, read-only state and bitmaps already handled
    /// by the caller).
    pub(super) fn write_vectored_impl(&self, bufs: &[IoBuf<'_>], offset: u64) -> Result<()> {
        let g = self.geo;
        let cs = g.cs;
        let total = iobuf::total_len(bufs);
        let mut done = 0usize;
        while done < total {
            let pos = offset + done as u64;
            let gc = pos >> g.cluster_bits;
            let in_off = pos & (cs - 1);
            let last_gc = (offset + total as u64 - 1) >> g.cluster_bits;
            let max = (last_gc - gc + 1).min(MAX_BATCH);
            let (in_place, k) = self.in_place_run(gc, max)?;
            let n = ((k * cs - in_off) as usize).min(total - done);
            match in_place {
                Some(h) => {
                    // Written without the lock, as the slice path does for in-place
                    // clusters: COPIED data clusters are never moved while mapped.
                    self.st
                        .write_vectored_at(&iobuf::slice(bufs, done, n), h + in_off)?;
                }
                None => {
                    // Allocation or copy-on-write, through a bounded buffer of at
                    // least a cluster: a 2 MiB cluster written in two halves would
                    // copy-on-write the second half just to overwrite it.
                    let n = n.min(iobuf::BOUNCE_CHUNK.max(cs as usize));
                    let mut tmp = vec![0u8; n];
                    iobuf::gather(bufs, done, &mut tmp);
                    self.write_impl(&tmp, pos)?;
                    done += n;
                    continue;
                }
            }
            done += n;
        }
        Ok(())
    }

    /// Looks at up to `max` clusters from `gc`: returns the host offset of the
    /// first if a run of them is writable in place and host-contiguous, with the run
    /// length; otherwise `None` and the length of the run that is not (at least 1).
    fn in_place_run(&self, gc: u64, max: u64) -> Result<(Option<u64>, u64)> {
        let g = self.geo;
        let cs = g.cs;
        let st = self.storage_ref();
        let mut m = self.lock();
        if m.corrupt {
            return Err(Error::corrupt("Image is corrupt; writes are refused"));
        }
        let mut first: Option<u64> = None;
        let mut k = 0u64;
        while k < max {
            let c = gc + k;
            let (entry, bitmap) = m.l2_entry(st, c)?;
            let place = if m.inflight.contains(&c) || entry & OFLAG_COPIED == 0 {
                None
            } else {
                match classify(entry, g.cluster_bits, g.ext) {
                    ClusterType::Normal(_) => self.whole_data((entry, bitmap)),
                    _ => None,
                }
            };
            match (k, first, place) {
                (0, _, p) => first = p,
                (_, Some(h), Some(p)) if p == h + k * cs => {}
                (_, None, None) => {}
                _ => break,
            }
            k += 1;
        }
        if let Some(h) = first {
            m.check_in_image(h + (k - 1) * cs, "Data cluster")?;
            m.check_data_overlap(h, k * cs)?;
        }
        Ok((first, k.max(1)))
    }
}
