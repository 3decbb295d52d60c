//! Buffers for vectored I/O that may live outside memory Rust owns, such as guest RAM
//! shared with a VMM process: reads land in them and writes are taken from them
//! without an intermediate copy.
//!
//! Such memory may change under us at any time (the guest owns it), so it is never
//! turned into a Rust slice: data moves with system calls (`preadv`/`pwritev`) or
//! raw-pointer copies. A buffer made from a Rust slice borrows it for `'a`.

use std::marker::PhantomData;

/// Memory that a read fills (the destination of `read_vectored`).
#[derive(Debug, Clone, Copy)]
pub struct IoBufMut<'a> {
    ptr: *mut u8,
    len: usize,
    _borrow: PhantomData<&'a mut [u8]>,
}

/// Memory that a write takes its data from (the source of `write_vectored`).
#[derive(Debug, Clone, Copy)]
pub struct IoBuf<'a> {
    ptr: *const u8,
    len: usize,
    _borrow: PhantomData<&'a [u8]>,
}

// SAFETY: the buffers are plain address ranges; whoever creates one from a raw pointer
// promises the memory stays valid for 'a whatever thread uses it, and every access
// goes through system calls or raw-pointer copies that tolerate concurrent changes.
unsafe impl Send for IoBufMut<'_> {}
// SAFETY: as above.
unsafe impl Sync for IoBufMut<'_> {}
// SAFETY: as above.
unsafe impl Send for IoBuf<'_> {}
// SAFETY: as above.
unsafe impl Sync for IoBuf<'_> {}

impl<'a> IoBufMut<'a> {
    /// A buffer over a Rust slice.
    ///
    /// # Safety
    /// The buffer is `Copy` and `Sync`, as buffers over guest memory must be, so it
    /// does not stop two copies from writing the slice at once: the caller must not
    /// write through copies of it (or of its `sub` buffers) from two threads
    /// concurrently.
    pub unsafe fn from_slice(s: &'a mut [u8]) -> Self {
        IoBufMut {
            ptr: s.as_mut_ptr(),
            len: s.len(),
            _borrow: PhantomData,
        }
    }

    /// A buffer over `len` bytes at `ptr`.
    ///
    /// # Safety
    /// The range must be mapped, writable and stay so for `'a`, and nothing may rely
    /// on its contents being stable (it is written without synchronisation).
    pub unsafe fn from_raw_parts(ptr: *mut u8, len: usize) -> Self {
        IoBufMut {
            ptr,
            len,
            _borrow: PhantomData,
        }
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the buffer is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The start address (for system calls).
    pub fn as_mut_ptr(&self) -> *mut u8 {
        self.ptr
    }

    /// The `len` bytes starting `start` bytes in (clamped to the buffer).
    pub fn sub(&self, start: usize, len: usize) -> IoBufMut<'a> {
        let start = start.min(self.len);
        IoBufMut {
            // SAFETY: start <= len keeps the pointer within (or one past) the buffer.
            ptr: unsafe { self.ptr.add(start) },
            len: len.min(self.len - start),
            _borrow: PhantomData,
        }
    }

    /// Copies `src` into the buffer at `at` (as much as fits).
    pub fn copy_from(&self, at: usize, src: &[u8]) {
        let d = self.sub(at, src.len());
        // SAFETY: `d` lies within this buffer (valid for writes by construction) and
        // cannot overlap `src`, a Rust slice the caller holds.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), d.ptr, d.len) };
    }

    /// Sets every byte to `byte`.
    pub fn fill(&self, byte: u8) {
        // SAFETY: the whole buffer is valid for writes by construction.
        unsafe { std::ptr::write_bytes(self.ptr, byte, self.len) };
    }
}

impl<'a> IoBuf<'a> {
    /// A buffer over a Rust slice.
    pub fn from_slice(s: &'a [u8]) -> Self {
        IoBuf {
            ptr: s.as_ptr(),
            len: s.len(),
            _borrow: PhantomData,
        }
    }

    /// A buffer over `len` bytes at `ptr`.
    ///
    /// # Safety
    /// The range must be mapped, readable and stay so for `'a`.
    pub unsafe fn from_raw_parts(ptr: *const u8, len: usize) -> Self {
        IoBuf {
            ptr,
            len,
            _borrow: PhantomData,
        }
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the buffer is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The start address (for system calls).
    pub fn as_ptr(&self) -> *const u8 {
        self.ptr
    }

    /// The `len` bytes starting `start` bytes in (clamped to the buffer).
    pub fn sub(&self, start: usize, len: usize) -> IoBuf<'a> {
        let start = start.min(self.len);
        IoBuf {
            // SAFETY: start <= len keeps the pointer within (or one past) the buffer.
            ptr: unsafe { self.ptr.add(start) },
            len: len.min(self.len - start),
            _borrow: PhantomData,
        }
    }

    /// Copies the buffer from `at` into `dst` (as much as there is).
    pub fn copy_to(&self, at: usize, dst: &mut [u8]) {
        let s = self.sub(at, dst.len());
        // SAFETY: `s` lies within this buffer (valid for reads by construction) and
        // cannot overlap `dst`, a Rust slice the caller holds exclusively.
        unsafe { std::ptr::copy_nonoverlapping(s.ptr, dst.as_mut_ptr(), s.len) };
    }
}

/// Total length of a buffer list.
pub fn total_len_mut(bufs: &[IoBufMut<'_>]) -> usize {
    bufs.iter().map(|b| b.len).fold(0, usize::saturating_add)
}

/// Total length of a buffer list.
pub fn total_len(bufs: &[IoBuf<'_>]) -> usize {
    bufs.iter().map(|b| b.len).fold(0, usize::saturating_add)
}

/// The buffers covering bytes `[start, start + len)` of the list `bufs`.
pub fn slice_mut<'a>(bufs: &[IoBufMut<'a>], mut start: usize, mut len: usize) -> Vec<IoBufMut<'a>> {
    let mut out = Vec::new();
    for b in bufs {
        if len == 0 {
            break;
        }
        if start >= b.len {
            start -= b.len;
            continue;
        }
        let piece = b.sub(start, len);
        start = 0;
        len -= piece.len;
        out.push(piece);
    }
    out
}

/// The buffers covering bytes `[start, start + len)` of the list `bufs`.
pub fn slice<'a>(bufs: &[IoBuf<'a>], mut start: usize, mut len: usize) -> Vec<IoBuf<'a>> {
    let mut out = Vec::new();
    for b in bufs {
        if len == 0 {
            break;
        }
        if start >= b.len {
            start -= b.len;
            continue;
        }
        let piece = b.sub(start, len);
        start = 0;
        len -= piece.len;
        out.push(piece);
    }
    out
}

/// Copies `src` into the list `bufs` starting `at` bytes in.
pub fn scatter(bufs: &[IoBufMut<'_>], at: usize, src: &[u8]) {
    let mut done = 0;
    for b in slice_mut(bufs, at, src.len()) {
        b.copy_from(0, &src[done..done + b.len]);
        done += b.len;
    }
}

/// Copies bytes of the list `bufs` starting `at` bytes in into `dst`.
pub fn gather(bufs: &[IoBuf<'_>], at: usize, dst: &mut [u8]) {
    let mut done = 0;
    for b in slice(bufs, at, dst.len()) {
        b.copy_to(0, &mut dst[done..done + b.len]);
        done += b.len;
    }
}

/// Largest intermediate buffer the bounce helpers allocate, whatever the request size.
pub const BOUNCE_CHUNK: usize = 1 << 20;

/// Fills `bufs` through an intermediate buffer of at most [`BOUNCE_CHUNK`] bytes:
/// `read(chunk, pos)` must fill `chunk` with the bytes at `pos` from the start.
pub fn bounce_read<E>(
    bufs: &[IoBufMut<'_>],
    mut read: impl FnMut(&mut [u8], u64) -> std::result::Result<(), E>,
) -> std::result::Result<(), E> {
    let total = total_len_mut(bufs);
    let mut tmp = vec![0u8; total.min(BOUNCE_CHUNK)];
    let mut done = 0usize;
    while done < total {
        let n = (total - done).min(BOUNCE_CHUNK);
        read(&mut tmp[..n], done as u64)?;
        scatter(bufs, done, &tmp[..n]);
        done += n;
    }
    Ok(())
}

/// Passes `bufs` through an intermediate buffer of at most [`BOUNCE_CHUNK`] bytes:
/// `write(chunk, pos)` gets the bytes at `pos` from the start.
pub fn bounce_write<E>(
    bufs: &[IoBuf<'_>],
    mut write: impl FnMut(&[u8], u64) -> std::result::Result<(), E>,
) -> std::result::Result<(), E> {
    let total = total_len(bufs);
    let mut tmp = vec![0u8; total.min(BOUNCE_CHUNK)];
    let mut done = 0usize;
    while done < total {
        let n = (total - done).min(BOUNCE_CHUNK);
        gather(bufs, done, &mut tmp[..n]);
        write(&tmp[..n], done as u64)?;
        done += n;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A buffer over a test's slice, used from one thread.
    fn mbuf(s: &mut [u8]) -> IoBufMut<'_> {
        // SAFETY: each test uses its buffers from a single thread.
        unsafe { IoBufMut::from_slice(s) }
    }

    #[test]
    fn slicing_scatter_and_gather() {
        let mut a = [0u8; 3];
        let mut b = [0u8; 5];
        let bufs = [mbuf(&mut a), mbuf(&mut b)];
        assert_eq!(total_len_mut(&bufs), 8);
        let s = slice_mut(&bufs, 2, 4);
        assert_eq!(s.iter().map(|b| b.len()).collect::<Vec<_>>(), vec![1, 3]);
        scatter(&bufs, 1, &[1, 2, 3, 4, 5, 6]);
        assert!(slice_mut(&bufs, 9, 4).is_empty());
        assert_eq!((a, b), ([0, 1, 2], [3, 4, 5, 6, 0]));
        let src = [IoBuf::from_slice(&a), IoBuf::from_slice(&b)];
        let mut out = [0u8; 5];
        gather(&src, 2, &mut out);
        assert_eq!(out, [2, 3, 4, 5, 6]);
        assert_eq!(total_len(&src), 8);
        let mut seen = Vec::new();
        bounce_write::<()>(&src, |c, pos| {
            seen.push((pos, c.to_vec()));
            Ok(())
        })
        .unwrap();
        assert_eq!(seen, vec![(0, vec![0, 1, 2, 3, 4, 5, 6, 0])]);
        let mut big = vec![0u8; BOUNCE_CHUNK + 10];
        let mut calls = Vec::new();
        bounce_read::<()>(&[mbuf(&mut big)], |c, pos| {
            c.fill(7);
            calls.push((pos, c.len()));
            Ok(())
        })
        .unwrap();
        assert_eq!(calls, vec![(0, BOUNCE_CHUNK), (BOUNCE_CHUNK as u64, 10)]);
        assert!(big.iter().all(|&b| b == 7));
    }
}
