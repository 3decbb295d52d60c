//! The `file` protocol: a host file accessed with positional I/O.
//!
//! Cache modes follow QEMU: `writeback` (page cache, flush = `fdatasync`), `none`
//! (`O_DIRECT`, flush = `fdatasync`), `unsafe` (page cache, flush does nothing).
//! Under `O_DIRECT`, unaligned requests go through an aligned bounce buffer.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use super::{AlignedBuf, Storage};
use crate::iobuf::{self, IoBuf, IoBufMut};
use crate::{Error, Result};

/// Most buffers one `preadv`/`pwritev` takes (Linux's `IOV_MAX`).
const IOV_MAX: usize = 1024;

/// `iovec`s for the bytes of `bufs` from `skip` on (at most [`IOV_MAX`] of them).
fn iovecs(bufs: &[(*mut u8, usize)], mut skip: usize) -> Vec<libc::iovec> {
    let mut v = Vec::with_capacity(bufs.len().min(IOV_MAX));
    for &(ptr, len) in bufs {
        if v.len() == IOV_MAX {
            break;
        }
        if skip >= len {
            skip -= len;
            continue;
        }
        v.push(libc::iovec {
            // SAFETY: skip < len keeps the pointer inside the buffer.
            iov_base: unsafe { ptr.add(skip) }.cast(),
            iov_len: len - skip,
        });
        skip = 0;
    }
    v
}

/// How a file node uses the host page cache (QEMU's `cache=` modes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CacheMode {
    /// Page cache on, flushes reach the disk.
    #[default]
    Writeback,
    /// `O_DIRECT`: bypass the page cache, flushes reach the disk.
    None,
    /// Page cache on, flushes are ignored.
    Unsafe,
    /// Page cache on, every write followed by a flush (QEMU's `writethrough`).
    Writethrough,
    /// `O_DIRECT` and no flushes (QEMU's `directsync` without the sync: `cache.direct=on,no-flush=on`).
    DirectNoFlush,
}

impl CacheMode {
    /// Parses QEMU's cache mode names (`-t` / `-T` of qemu-img).
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "writeback" => Ok(CacheMode::Writeback),
            "none" | "off" => Ok(CacheMode::None),
            "unsafe" => Ok(CacheMode::Unsafe),
            "writethrough" | "directsync" => Ok(if s == "directsync" {
                CacheMode::None
            } else {
                CacheMode::Writethrough
            }),
            _ => Err(Error::invalid(format!("Invalid cache option: {s}"))),
        }
    }

    /// Whether this mode opens the file with `O_DIRECT`.
    pub fn direct(self) -> bool {
        matches!(self, CacheMode::None | CacheMode::DirectNoFlush)
    }

    /// Whether flushes are skipped.
    pub fn no_flush(self) -> bool {
        matches!(self, CacheMode::Unsafe | CacheMode::DirectNoFlush)
    }
}

/// A host file used as a storage node.
pub struct FileStorage {
    file: File,
    path: PathBuf,
    cache: CacheMode,
    align: usize,
    read_only: bool,
    /// Serialises read-modify-write cycles of unaligned `O_DIRECT` writes.
    rmw: Mutex<()>,
    /// The file length, kept up to date by this node's own writes and resizes
    /// (the file is not shared with other writers), so requests need no `fstat`.
    len: AtomicU64,
}

fn errno_err(context: &str) -> Error {
    Error::io(context, io::Error::last_os_error())
}

impl FileStorage {
    /// Opens an existing file.
    pub fn open(path: &Path, read_only: bool, cache: CacheMode) -> Result<Self> {
        let mut oo = OpenOptions::new();
        oo.read(true).write(!read_only);
        if cache.direct() {
            oo.custom_flags(libc::O_DIRECT);
        }
        let file = oo
            .open(path)
            .map_err(|e| Error::io(format!("Could not open '{}'", path.display()), e))?;
        Self::from_file(file, path, read_only, cache)
    }

    /// Creates (or truncates) a file and opens it read-write.
    pub fn create(path: &Path, cache: CacheMode) -> Result<Self> {
        let mut oo = OpenOptions::new();
        oo.read(true).write(true).create(true).truncate(true);
        let file = oo
            .open(path)
            .map_err(|e| Error::io(format!("Could not create '{}'", path.display()), e))?;
        drop(file);
        Self::open(path, false, cache)
    }

    fn from_file(file: File, path: &Path, read_only: bool, cache: CacheMode) -> Result<Self> {
        let mut s = FileStorage {
            file,
            path: path.to_path_buf(),
            cache,
            align: 1,
            read_only,
            rmw: Mutex::new(()),
            len: AtomicU64::new(0),
        };
        if cache.direct() {
            s.align = s.probe_alignment();
        }
        let len = s.query_size()?;
        s.len.store(len, Ordering::Release);
        Ok(s)
    }

    /// Asks the operating system for the file's length.
    fn query_size(&self) -> Result<u64> {
        let md = self
            .file
            .metadata()
            .map_err(|e| Error::io(format!("Could not stat '{}'", self.path.display()), e))?;
        if md.file_type().is_file() {
            return Ok(md.len());
        }
        // Block devices report their size through lseek.
        // SAFETY: lseek on an fd we own; no memory is passed.
        let end = unsafe { libc::lseek(self.file.as_raw_fd(), 0, libc::SEEK_END) };
        if end < 0 {
            return Err(errno_err("Could not get the device size"));
        }
        Ok(end as u64)
    }

    /// Records that the file now reaches at least `end` bytes.
    fn grew_to(&self, end: u64) {
        self.len.fetch_max(end, Ordering::AcqRel);
    }

    /// Finds the smallest request alignment that `O_DIRECT` accepts on this file.
    fn probe_alignment(&self) -> usize {
        for align in [512usize, 1024, 2048, 4096] {
            let mut buf = AlignedBuf::new(align, 4096);
            if self.file.read_at(&mut buf, 0).is_ok() {
                return align;
            }
        }
        4096
    }

    /// The path this node was opened with.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn check_writable(&self) -> Result<()> {
        if self.read_only {
            Err(Error::ReadOnly)
        } else {
            Ok(())
        }
    }

    fn aligned(&self, offset: u64, len: usize, ptr: *const u8) -> bool {
        let a = self.align;
        offset % a as u64 == 0 && len % a == 0 && (ptr as usize) % a == 0
    }

    fn pread_full(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let mut done = 0usize;
        while done < buf.len() {
            match self.file.read_at(&mut buf[done..], offset + done as u64) {
                Ok(0) => {
                    buf[done..].fill(0);
                    break;
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    return Err(Error::io(
                        format!("Could not read '{}' at {}", self.path.display(), offset),
                        e,
                    ))
                }
            }
        }
        Ok(())
    }

    fn pwrite_full(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.file.write_all_at(buf, offset).map_err(|e| {
            Error::io(
                format!("Could not write '{}' at {}", self.path.display(), offset),
                e,
            )
        })
    }

    /// Whether every buffer and the offset suit the file's alignment.
    fn aligned_vec(&self, offset: u64, bufs: &[(*mut u8, usize)]) -> bool {
        self.align == 1
            || bufs
                .iter()
                .all(|&(p, l)| self.aligned(offset, l, p.cast_const()))
    }

    /// `preadv`/`pwritev` until `total` bytes moved; a read that meets the end of the
    /// file zeroes the rest.
    fn vectored(&self, bufs: &[(*mut u8, usize)], offset: u64, write: bool) -> Result<()> {
        let total: usize = bufs.iter().map(|b| b.1).sum();
        let fd = self.file.as_raw_fd();
        let mut done = 0usize;
        while done < total {
            let iov = iovecs(bufs, done);
            let pos = (offset + done as u64) as libc::off_t;
            // SAFETY: every iovec describes memory the caller's IoBuf/IoBufMut vouch
            // for (valid for reads, resp. writes, for the duration of the call).
            let n = unsafe {
                if write {
                    libc::pwritev(fd, iov.as_ptr(), iov.len() as libc::c_int, pos)
                } else {
                    libc::preadv(fd, iov.as_ptr(), iov.len() as libc::c_int, pos)
                }
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                let what = if write { "write" } else { "read" };
                return Err(Error::io(
                    format!("Could not {what} '{}' at {}", self.path.display(), offset),
                    e,
                ));
            }
            if n == 0 {
                if write {
                    return Err(Error::io(
                        format!("Could not write '{}' at {}", self.path.display(), offset),
                        io::Error::from(io::ErrorKind::WriteZero),
                    ));
                }
                let mut skip = done;
                for &(p, l) in bufs {
                    if skip >= l {
                        skip -= l;
                        continue;
                    }
                    // SAFETY: as above; the rest of the buffers, past the end of file.
                    unsafe { std::ptr::write_bytes(p.add(skip), 0, l - skip) };
                    skip = 0;
                }
                break;
            }
            done += n as usize;
        }
        Ok(())
    }

    fn bounce_range(&self, offset: u64, len: usize) -> (u64, usize) {
        let a = self.align as u64;
        let start = offset / a * a;
        let end = (offset + len as u64).div_ceil(a) * a;
        (start, (end - start) as usize)
    }

    fn fallocate(&self, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        // SAFETY: fallocate takes a valid fd owned by self.file and plain integers.
        let r = unsafe {
            libc::fallocate(
                self.file.as_raw_fd(),
                mode,
                offset as libc::off_t,
                len as libc::off_t,
            )
        };
        if r == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    fn write_zero_bytes(&self, offset: u64, len: u64) -> Result<()> {
        const CHUNK: u64 = 1 << 20;
        let buf = AlignedBuf::new(CHUNK as usize, 4096);
        let mut done = 0;
        while done < len {
            let n = (len - done).min(CHUNK);
            self.write_at(&buf[..n as usize], offset + done)?;
            done += n;
        }
        Ok(())
    }
}

impl Storage for FileStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        if self.align == 1 || self.aligned(offset, buf.len(), buf.as_ptr()) {
            return self.pread_full(buf, offset);
        }
        let (start, len) = self.bounce_range(offset, buf.len());
        let mut bounce = AlignedBuf::new(len, self.align.max(4096));
        self.pread_full(&mut bounce, start)?;
        let skip = (offset - start) as usize;
        buf.copy_from_slice(&bounce[skip..skip + buf.len()]);
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.check_writable()?;
        if buf.is_empty() {
            return Ok(());
        }
        if self.align == 1 || self.aligned(offset, buf.len(), buf.as_ptr()) {
            self.pwrite_full(buf, offset)?;
        } else {
            let (start, len) = self.bounce_range(offset, buf.len());
            let _guard = self.rmw.lock().unwrap_or_else(|e| e.into_inner());
            let mut bounce = AlignedBuf::new(len, self.align.max(4096));
            self.pread_full(&mut bounce, start)?;
            let skip = (offset - start) as usize;
            bounce[skip..skip + buf.len()].copy_from_slice(buf);
            // Never extend the file past the caller's end because of alignment padding.
            let old_size = self.size()?;
            self.pwrite_full(&bounce, start)?;
            let end = offset + buf.len() as u64;
            if start + len as u64 > old_size.max(end) {
                self.file
                    .set_len(old_size.max(end))
                    .map_err(|e| Error::io("Could not truncate after unaligned write", e))?;
            }
        }
        self.grew_to(offset + buf.len() as u64);
        if self.cache == CacheMode::Writethrough {
            self.flush()?;
        }
        Ok(())
    }

    fn read_vectored_at(&self, bufs: &[IoBufMut<'_>], offset: u64) -> Result<()> {
        let raw: Vec<(*mut u8, usize)> = bufs.iter().map(|b| (b.as_mut_ptr(), b.len())).collect();
        if !self.aligned_vec(offset, &raw) {
            return iobuf::bounce_read(bufs, |c, pos| self.read_at(c, offset + pos));
        }
        self.vectored(&raw, offset, false)
    }

    fn write_vectored_at(&self, bufs: &[IoBuf<'_>], offset: u64) -> Result<()> {
        self.check_writable()?;
        let raw: Vec<(*mut u8, usize)> = bufs
            .iter()
            .map(|b| (b.as_ptr().cast_mut(), b.len()))
            .collect();
        let total = iobuf::total_len(bufs);
        if !self.aligned_vec(offset, &raw) {
            return iobuf::bounce_write(bufs, |c, pos| self.write_at(c, offset + pos));
        }
        // pwritev only reads through these pointers.
        self.vectored(&raw, offset, true)?;
        self.grew_to(offset + total as u64);
        if self.cache == CacheMode::Writethrough {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&self) -> Result<()> {
        if self.cache.no_flush() || self.read_only {
            return Ok(());
        }
        self.file
            .sync_data()
            .map_err(|e| Error::io(format!("Could not flush '{}'", self.path.display()), e))
    }

    fn size(&self) -> Result<u64> {
        Ok(self.len.load(Ordering::Acquire))
    }

    fn set_size(&self, size: u64) -> Result<()> {
        self.check_writable()?;
        self.file
            .set_len(size)
            .map_err(|e| Error::io(format!("Could not resize '{}'", self.path.display()), e))?;
        self.len.store(size, Ordering::Release);
        Ok(())
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.check_writable()?;
        let size = self.size()?;
        if offset >= size {
            return Ok(());
        }
        let len = len.min(size - offset);
        match self.fallocate(
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset,
            len,
        ) {
            Ok(()) => Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
                self.write_zero_bytes(offset, len)
            }
            Err(e) => Err(Error::io("Could not discard", e)),
        }
    }

    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> Result<()> {
        self.check_writable()?;
        if len == 0 {
            return Ok(());
        }
        let size = self.size()?;
        let end = offset + len;
        if unmap && end <= size && self.discard(offset, len).is_ok() {
            return Ok(());
        }
        let mode = if end > size {
            libc::FALLOC_FL_ZERO_RANGE
        } else {
            libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE
        };
        match self.fallocate(mode, offset, len) {
            Ok(()) => {
                self.grew_to(end);
                Ok(())
            }
            Err(_) => self.write_zero_bytes(offset, len),
        }
    }

    fn preallocate(&self, offset: u64, len: u64) -> Result<()> {
        self.check_writable()?;
        self.fallocate(0, offset, len)
            .map_err(|e| Error::io("Could not preallocate", e))?;
        self.grew_to(offset + len);
        Ok(())
    }

    fn extent_at(&self, offset: u64, len: u64) -> Result<(bool, u64)> {
        let size = self.size()?;
        if offset >= size {
            return Ok((false, len));
        }
        let fd = self.file.as_raw_fd();
        // SAFETY: lseek on an fd we own; no memory is passed.
        let data = unsafe { libc::lseek(fd, offset as libc::off_t, libc::SEEK_DATA) };
        if data < 0 {
            let err = io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::ENXIO) {
                // No data from here to the end of the file.
                return Ok((false, len));
            }
            return Ok((true, len));
        }
        let data = data as u64;
        if data > offset {
            return Ok((false, (data - offset).min(len)));
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, offset as libc::off_t, libc::SEEK_HOLE) };
        if hole < 0 {
            return Ok((true, len));
        }
        let hole = hole as u64;
        Ok((true, hole.saturating_sub(offset).clamp(1, len)))
    }

    fn allocated_size(&self) -> Result<u64> {
        let md = self
            .file
            .metadata()
            .map_err(|e| Error::io(format!("Could not stat '{}'", self.path.display()), e))?;
        Ok(md.blocks() * 512)
    }

    fn alignment(&self) -> usize {
        self.align
    }

    fn name(&self) -> String {
        self.path.display().to_string()
    }

    fn read_only(&self) -> bool {
        self.read_only
    }
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
    fn vectored_io_round_trip_and_zeroes_past_the_end() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let st = FileStorage::create(&path, CacheMode::Writeback).unwrap();
        let (a, b) = ([1u8; 3000], [2u8; 5000]);
        st.write_vectored_at(&[IoBuf::from_slice(&a), IoBuf::from_slice(&b)], 100)
            .unwrap();
        assert_eq!(st.size().unwrap(), 8100);
        // A read crossing the end of the file: the part past it reads as zeroes.
        let (mut x, mut y) = (vec![9u8; 4000], vec![9u8; 6000]);
        st.read_vectored_at(&[mbuf(&mut x), mbuf(&mut y)], 0)
            .unwrap();
        let mut all = x;
        all.extend_from_slice(&y);
        assert!(all[..100].iter().all(|&v| v == 0));
        assert!(all[100..3100].iter().all(|&v| v == 1));
        assert!(all[3100..8100].iter().all(|&v| v == 2));
        assert!(all[8100..].iter().all(|&v| v == 0));
        let mut flat = vec![0u8; 8100];
        st.read_at(&mut flat, 0).unwrap();
        assert_eq!(&flat[..], &all[..8100]);
        // Many small buffers (more than one iovec batch).
        let bufs: Vec<[u8; 4]> = (0..2500u32).map(|i| i.to_le_bytes()).collect();
        let src: Vec<IoBuf<'_>> = bufs.iter().map(|b| IoBuf::from_slice(b)).collect();
        st.write_vectored_at(&src, 0).unwrap();
        let mut back = vec![0u8; 10000];
        st.read_at(&mut back, 0).unwrap();
        assert_eq!(back, bufs.concat());
    }
}
