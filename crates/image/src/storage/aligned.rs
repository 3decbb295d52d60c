//! Buffers with a chosen alignment, for `O_DIRECT` I/O: small ones from the heap,
//! large ones ([`AlignedBuf::huge`]) mapped in 2 MiB units and backed by transparent
//! huge pages where the kernel allows.

use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;

/// The size and alignment of an x86-64 (and arm64 with 4 KiB pages) huge page.
const HUGE_PAGE: usize = 2 << 20;

/// Where a buffer's memory comes from, and so how it is released.
enum Backing {
    /// The global allocator, with this layout.
    Heap(Layout),
    /// An anonymous mapping of `map_len` bytes starting at `map_ptr`.
    Mapped {
        map_ptr: *mut libc::c_void,
        map_len: usize,
    },
}

/// A zero-initialised byte buffer whose start is aligned to a power of two.
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
    backing: Backing,
}

// SAFETY: AlignedBuf owns its allocation exclusively, like a Vec<u8>.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared access only hands out &[u8]; mutation needs &mut self.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// Allocates `len` zeroed bytes aligned to `align` (a power of two).
    ///
    /// # Panics
    /// Panics if `align` is not a power of two; callers pass constants or probed values.
    pub fn new(len: usize, align: usize) -> Self {
        let layout = Layout::from_size_align(len.max(1), align.max(1)).expect("valid layout");
        // SAFETY: the layout has a non-zero size.
        let raw = unsafe { alloc_zeroed(layout) };
        let ptr = NonNull::new(raw).unwrap_or_else(|| std::alloc::handle_alloc_error(layout));
        AlignedBuf {
            ptr,
            len,
            backing: Backing::Heap(layout),
        }
    }

    /// Allocates `len` zeroed bytes aligned to 2 MiB, in memory the kernel is
    /// asked to back with transparent huge pages (`MADV_HUGEPAGE`).
    ///
    /// For direct I/O this matters more than it seems: the kernel builds one segment
    /// per physically contiguous piece of a buffer, so a 64 KiB request from 4 KiB
    /// pages can reach the disk as 16 segments where a huge page gives one. Buffers
    /// for many requests in flight should come from one such allocation. When the
    /// mapping fails this falls back to [`AlignedBuf::new`] with 4 KiB alignment, and
    /// when the kernel has no huge page to give, the memory is ordinary pages: either
    /// way the buffer works, only the segment count differs.
    pub fn huge(len: usize) -> Self {
        let Some(map_len) = len.max(1).checked_add(2 * HUGE_PAGE - 1) else {
            return AlignedBuf::new(len, 4096);
        };
        let map_len = map_len & !(HUGE_PAGE - 1);
        // SAFETY: an anonymous private mapping at an address of the kernel's choosing
        // touches no existing memory.
        let map_ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if map_ptr == libc::MAP_FAILED {
            return AlignedBuf::new(len, 4096);
        }
        let start = (map_ptr as usize).next_multiple_of(HUGE_PAGE);
        let used = map_len - (start - map_ptr as usize);
        // SAFETY: [start, start + used) lies inside the mapping made above; the advice
        // only changes how its (untouched) pages will be backed. Failure is harmless.
        unsafe { libc::madvise(start as *mut libc::c_void, used, libc::MADV_HUGEPAGE) };
        AlignedBuf {
            // The mapping is non-null (MAP_FAILED was excluded) and start lies inside it.
            ptr: NonNull::new(start as *mut u8).expect("mapping is non-null"),
            len,
            backing: Backing::Mapped { map_ptr, map_len },
        }
    }
}

impl Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: ptr is valid for len initialised (zeroed) bytes for the buffer's lifetime.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in deref, and &mut self guarantees exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        match self.backing {
            // SAFETY: ptr was allocated with exactly this layout and is freed once.
            Backing::Heap(layout) => unsafe { dealloc(self.ptr.as_ptr(), layout) },
            // SAFETY: the whole mapping made in `huge` is unmapped once; no slice of
            // it outlives the buffer.
            Backing::Mapped { map_ptr, map_len } => unsafe {
                libc::munmap(map_ptr, map_len);
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_zeroed_aligned_and_writable() {
        for len in [0usize, 1, 4096, 65536 * 32, HUGE_PAGE + 7] {
            let mut b = AlignedBuf::huge(len);
            assert_eq!(b.len(), len);
            assert_eq!(b.as_ptr() as usize % HUGE_PAGE, 0);
            assert!(b.iter().all(|&x| x == 0));
            b.fill(0xa5);
            assert!(b.iter().all(|&x| x == 0xa5));
            let mut h = AlignedBuf::new(len, 512);
            assert_eq!(h.len(), len);
            assert_eq!(h.as_ptr() as usize % 512, 0);
            assert!(h.iter().all(|&x| x == 0));
            h.fill(1);
        }
    }
}
