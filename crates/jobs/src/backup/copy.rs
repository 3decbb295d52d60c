//! The block-copy engine shared by a backup job and its copy-before-write hook:
//! one "still to copy" bitmap at the job's cluster size, claimed cluster ranges in
//! flight, so that every cluster is copied exactly once by whichever side gets there
//! first, and a guest write waits for any copy of its clusters that is in flight.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Instant;

use strata_block::BlockNode;
use strata_image::FormatDriver;

/// A failed copy: which side failed and why.
#[derive(Debug, Clone)]
pub struct CopyError {
    /// The source read failed (else the target write).
    pub is_read: bool,
    /// The target ran out of space.
    pub enospc: bool,
    /// The message.
    pub msg: String,
}

#[derive(Debug)]
struct State {
    dirty: Vec<u64>,
    dirty_count: u64,
    inflight: Vec<(u64, u64)>,
    cursor: u64,
}

impl State {
    fn is_dirty(&self, c: u64) -> bool {
        self.dirty[(c / 64) as usize] >> (c % 64) & 1 != 0
    }
    fn set(&mut self, c: u64, v: bool) {
        let w = &mut self.dirty[(c / 64) as usize];
        let bit = 1u64 << (c % 64);
        if v && *w & bit == 0 {
            *w |= bit;
            self.dirty_count += 1;
        } else if !v && *w & bit != 0 {
            *w &= !bit;
            self.dirty_count -= 1;
        }
    }
    fn is_inflight(&self, c: u64) -> bool {
        self.inflight.iter().any(|&(a, n)| c >= a && c < a + n)
    }
}

/// Progress reporting for copied bytes.
pub type ProgressFn = Arc<dyn Fn(u64) + Send + Sync>;

/// The copy state of one backup.
pub struct BlockCopy {
    source: Arc<BlockNode>,
    target: Arc<BlockNode>,
    cluster: u64,
    size: u64,
    nclusters: u64,
    compress: bool,
    discard_source: bool,
    /// During the sync=top scan, unallocated clusters are skipped, not copied.
    pub skip_unallocated: AtomicBool,
    state: Mutex<State>,
    cv: Condvar,
    progress: Mutex<Option<ProgressFn>>,
}

impl BlockCopy {
    /// A copy state with every cluster still to copy.
    pub fn new(
        source: Arc<BlockNode>,
        target: Arc<BlockNode>,
        cluster: u64,
        compress: bool,
        discard_source: bool,
    ) -> Arc<Self> {
        let size = source.size();
        let nclusters = size.div_ceil(cluster);
        let mut dirty = vec![u64::MAX; nclusters.div_ceil(64) as usize];
        if nclusters % 64 != 0 {
            if let Some(last) = dirty.last_mut() {
                *last = (1u64 << (nclusters % 64)) - 1;
            }
        }
        Arc::new(BlockCopy {
            source,
            target,
            cluster,
            size,
            nclusters,
            compress,
            discard_source,
            skip_unallocated: AtomicBool::new(false),
            state: Mutex::new(State {
                dirty,
                dirty_count: nclusters,
                inflight: Vec::new(),
                cursor: 0,
            }),
            cv: Condvar::new(),
            progress: Mutex::new(None),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The job cluster size.
    pub fn cluster(&self) -> u64 {
        self.cluster
    }

    /// The source node.
    pub fn source(&self) -> &Arc<BlockNode> {
        &self.source
    }

    /// The target node.
    pub fn target(&self) -> &Arc<BlockNode> {
        &self.target
    }

    /// Where copied bytes are reported.
    pub fn set_progress(&self, f: ProgressFn) {
        *self.progress.lock().unwrap_or_else(|e| e.into_inner()) = Some(f);
    }

    fn report(&self, n: u64) {
        if let Some(f) = self
            .progress
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
        {
            f(n);
        }
    }

    /// Bytes still to copy (clusters clipped at the disk end).
    pub fn remaining_bytes(&self) -> u64 {
        let st = self.lock();
        let mut n = st.dirty_count * self.cluster;
        if self.nclusters > 0 && st.is_dirty(self.nclusters - 1) {
            n -= self.nclusters * self.cluster - self.size;
        }
        n
    }

    /// Whether nothing is left to copy and nothing is in flight.
    pub fn finished(&self) -> bool {
        let st = self.lock();
        st.dirty_count == 0 && st.inflight.is_empty()
    }

    /// Keeps only the clusters dirty in `bitmap_ranges` (byte ranges) still to copy.
    pub fn restrict_to(&self, ranges: &[(u64, u64)]) {
        let mut st = self.lock();
        for w in st.dirty.iter_mut() {
            *w = 0;
        }
        st.dirty_count = 0;
        for &(off, len) in ranges {
            if len == 0 {
                continue;
            }
            let a = off / self.cluster;
            let b = ((off + len - 1) / self.cluster).min(self.nclusters.saturating_sub(1));
            for c in a..=b {
                st.set(c, true);
            }
        }
    }

    /// Clears clusters not allocated in the source's top layer (sync=top).
    /// Returns false if `keep_going` asked to stop.
    pub fn reset_unallocated(&self, mut keep_going: impl FnMut() -> bool) -> bool {
        let io = self.source.io().clone();
        let mut off = 0;
        while off < self.size {
            if !keep_going() {
                return false;
            }
            let len = (self.size - off).min(64 * self.cluster);
            let s = match io.block_status(off, len) {
                Ok(s) => s,
                Err(_) => {
                    off += len;
                    continue;
                }
            };
            let n = s.len.max(1);
            if !s.allocated {
                // Only whole clusters become clean.
                let a = off.div_ceil(self.cluster);
                let b = (off + n) / self.cluster;
                let end_is_disk_end = off + n >= self.size;
                let b = if end_is_disk_end { self.nclusters } else { b };
                let mut st = self.lock();
                for c in a..b {
                    if !st.is_inflight(c) {
                        st.set(c, false);
                    }
                }
            }
            off += n;
        }
        true
    }

    /// Claims the next run of dirty clusters (at most `max` clusters) for a
    /// background copy, scanning from a cursor. Returns (first cluster, count).
    pub fn claim_next(&self, max: u64) -> Option<(u64, u64)> {
        let mut st = self.lock();
        if st.dirty_count == 0 {
            return None;
        }
        let mut c = st.cursor;
        let mut scanned = 0;
        while scanned < self.nclusters {
            if c >= self.nclusters {
                c = 0;
            }
            if st.is_dirty(c) && !st.is_inflight(c) {
                let mut n = 1;
                while n < max
                    && c + n < self.nclusters
                    && st.is_dirty(c + n)
                    && !st.is_inflight(c + n)
                {
                    n += 1;
                }
                for k in c..c + n {
                    st.set(k, false);
                }
                st.inflight.push((c, n));
                st.cursor = c + n;
                return Some((c, n));
            }
            // Skip whole clean words quickly.
            if c % 64 == 0 && st.dirty[(c / 64) as usize] == 0 {
                c += 64;
                scanned += 64;
            } else {
                c += 1;
                scanned += 1;
            }
        }
        None
    }

    /// Ends a claim: on failure the clusters are to be copied again.
    pub fn release(&self, first: u64, n: u64, ok: bool) {
        let mut st = self.lock();
        st.inflight.retain(|&(a, k)| (a, k) != (first, n));
        if !ok {
            for c in first..first + n {
                st.set(c, true);
            }
        }
        drop(st);
        self.cv.notify_all();
    }

    /// Waits until no copy is in flight.
    pub fn wait_idle(&self) {
        let mut st = self.lock();
        while !st.inflight.is_empty() {
            st = self.cv.wait(st).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Copies clusters `[first, first + n)` from source to target: zero areas as
    /// zero writes, data read and written (compressed when asked).
    pub fn copy_clusters(&self, first: u64, n: u64) -> Result<(), CopyError> {
        self.copy_clusters_with(first, n, &mut Vec::new())
    }

    /// [`BlockCopy::copy_clusters`] with a caller's scratch buffer, reused across
    /// calls so that a worker does not allocate (and fault in) a buffer per task.
    pub fn copy_clusters_with(
        &self,
        first: u64,
        n: u64,
        scratch: &mut Vec<u8>,
    ) -> Result<(), CopyError> {
        let off = first * self.cluster;
        let end = ((first + n) * self.cluster).min(self.size);
        let src = self.source.io().clone();
        let skip_unalloc = self.skip_unallocated.load(Ordering::Acquire);
        let mut pos = off;
        while pos < end {
            let (kind, run) =
                chain_status(&src, pos, end - pos, skip_unalloc).map_err(|e| CopyError {
                    is_read: true,
                    enospc: false,
                    msg: e.to_string(),
                })?;
            let run = run.clamp(1, end - pos);
            match kind {
                Kind::Unallocated => {}
                Kind::Zero => {
                    self.target
                        .write_zeroes(pos, run, true)
                        .map_err(|e| write_err(e.errno, &e.desc))?;
                }
                Kind::Data => {
                    if scratch.len() < run as usize {
                        scratch.resize(run as usize, 0);
                    }
                    let buf = &mut scratch[..run as usize];
                    src.read(buf, pos).map_err(|e| read_err(&e))?;
                    if self.compress {
                        let tio = self.target.io().clone();
                        for (k, chunk) in buf.chunks(self.cluster as usize).enumerate() {
                            let o = pos + k as u64 * self.cluster;
                            tio.write_compressed(chunk, o)
                                .map_err(|e| write_err(e.os_errno(), &e.to_string()))?;
                            self.target.mark_dirty(o, chunk.len() as u64);
                        }
                    } else {
                        self.target
                            .write(buf, pos)
                            .map_err(|e| write_err(e.errno, &e.desc))?;
                    }
                }
            }
            pos += run;
        }
        if self.discard_source {
            let _ = src.discard(off, end - off);
        }
        Ok(())
    }

    /// The copy-before-write path: makes sure every cluster touched by
    /// `[offset, offset + len)` is on the target (copying what is still dirty,
    /// waiting for copies in flight) before the caller modifies the source.
    /// Gives up with an error when `deadline` passes.
    pub fn copy_before_write(
        self: &Arc<Self>,
        offset: u64,
        len: u64,
        deadline: Option<Instant>,
    ) -> Result<(), CopyError> {
        if len == 0 || offset >= self.size {
            return Ok(());
        }
        let a = offset / self.cluster;
        let b = ((offset + len - 1) / self.cluster).min(self.nclusters - 1);
        loop {
            let mut st = self.lock();
            let busy = (a..=b).any(|c| st.is_inflight(c));
            if busy {
                match deadline {
                    Some(d) => {
                        let now = Instant::now();
                        if now >= d {
                            return Err(timeout_err());
                        }
                        drop(self.cv.wait_timeout(st, d - now));
                    }
                    None => {
                        drop(self.cv.wait(st));
                    }
                }
                continue;
            }
            // Claim every dirty cluster of the range in runs.
            let mut runs = Vec::new();
            let mut c = a;
            while c <= b {
                if st.is_dirty(c) {
                    let s = c;
                    while c <= b && st.is_dirty(c) {
                        st.set(c, false);
                        c += 1;
                    }
                    st.inflight.push((s, c - s));
                    runs.push((s, c - s));
                } else {
                    c += 1;
                }
            }
            drop(st);
            if runs.is_empty() {
                return Ok(());
            }
            let mut result = Ok(());
            for &(s, n) in runs.iter() {
                if result.is_err() {
                    // An earlier run failed: give the rest back untouched.
                    self.release(s, n, false);
                    continue;
                }
                let r = match deadline {
                    None => self.copy_clusters(s, n),
                    Some(d) => self.copy_with_deadline(s, n, d),
                };
                match r {
                    Ok(()) => {
                        self.release(s, n, true);
                        let bytes = ((s + n) * self.cluster).min(self.size) - s * self.cluster;
                        self.report(bytes);
                    }
                    // A timed-out copy is released by its helper thread.
                    Err(e) if e.msg == TIMEOUT => result = Err(e),
                    Err(e) => {
                        self.release(s, n, false);
                        result = Err(e);
                    }
                }
            }
            result?;
        }
    }

    /// Runs one copy on a helper thread and waits for it until `deadline`. On
    /// timeout the copy keeps its clusters in flight until it really ends.
    fn copy_with_deadline(
        self: &Arc<Self>,
        s: u64,
        n: u64,
        deadline: Instant,
    ) -> Result<(), CopyError> {
        // (abandoned by the waiter, result) under one lock, so that exactly one side
        // releases the claim.
        let slot = Arc::new((Mutex::new((false, None)), Condvar::new()));
        let me = self.clone();
        let slot2 = slot.clone();
        std::thread::spawn(move || {
            let r = me.copy_clusters(s, n);
            let mut g = slot2.0.lock().unwrap_or_else(|e| e.into_inner());
            if g.0 {
                drop(g);
                me.release(s, n, r.is_ok());
            } else {
                g.1 = Some(r);
                slot2.1.notify_all();
            }
        });
        let mut g = slot.0.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(r) = g.1.take() {
                return r;
            }
            let now = Instant::now();
            if now >= deadline {
                g.0 = true;
                return Err(timeout_err());
            }
            g = slot
                .1
                .wait_timeout(g, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

const TIMEOUT: &str = "Connection timed out";

fn timeout_err() -> CopyError {
    CopyError {
        is_read: false,
        enospc: false,
        msg: TIMEOUT.into(),
    }
}

/// A failed target write; the message is the C library's text for the errno, as in
/// QEMU's job events.
fn write_err(errno: Option<i32>, msg: &str) -> CopyError {
    CopyError {
        is_read: false,
        enospc: errno == Some(libc::ENOSPC),
        msg: errno
            .map(strata_block::strerror)
            .unwrap_or_else(|| msg.to_string()),
    }
}

fn read_err(e: &strata_image::Error) -> CopyError {
    CopyError {
        is_read: true,
        enospc: false,
        msg: e
            .os_errno()
            .map(strata_block::strerror)
            .unwrap_or_else(|| e.to_string()),
    }
}

/// What a range of the source holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Not allocated in the top layer (sync=top scan still running): skip.
    Unallocated,
    /// Reads as zeroes through the whole chain.
    Zero,
    /// Has data somewhere in the chain.
    Data,
}

fn chain_status(
    top: &Arc<dyn FormatDriver>,
    offset: u64,
    len: u64,
    skip_unallocated: bool,
) -> strata_image::Result<(Kind, u64)> {
    let s = top.block_status(offset, len)?;
    if s.allocated {
        return Ok((if s.zero { Kind::Zero } else { Kind::Data }, s.len));
    }
    if skip_unallocated {
        return Ok((Kind::Unallocated, s.len));
    }
    let mut run = s.len;
    let mut layer = top.backing();
    while let Some(b) = layer {
        if offset >= b.size() {
            return Ok((Kind::Zero, run));
        }
        let bs = b.block_status(offset, run.min(b.size() - offset))?;
        run = bs.len;
        if bs.allocated {
            return Ok((if bs.zero { Kind::Zero } else { Kind::Data }, run));
        }
        layer = b.backing();
    }
    Ok((Kind::Zero, run))
}
