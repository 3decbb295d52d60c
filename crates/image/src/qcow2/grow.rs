//! Growing the image file ahead of cluster allocation.
//!
//! With `cache=none` every allocating write that ends past the end of the file is an
//! extending direct write, which the host file system serializes (and completes
//! synchronously) under the inode lock: 32 writers then run one at a time. Reserving
//! space past the last allocated cluster with `fallocate` in large steps turns those
//! writes into writes inside the file, which run in parallel. The reserved tail is
//! never referenced (its refcounts are zero, so `check` sees neither leaks nor
//! errors) and a clean close trims it off again.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use crate::storage::Storage;

/// Smallest step the file grows by.
const MIN_STEP: u64 = 32 << 20;
/// Clusters per step for large cluster sizes.
const STEP_CLUSTERS: u64 = 64;

/// The reserved end of the file and whether reserving is worth (and able) doing.
pub(super) struct GrowAhead {
    /// (file length before the first reservation, end of the space reserved so
    /// far); `None` while nothing is reserved.
    reserved: Mutex<Option<(u64, u64)>>,
    /// Off for buffered files (extending writes are cheap there) and after the file
    /// system refused a reservation.
    enabled: AtomicBool,
}

impl GrowAhead {
    /// Reserves ahead only for storage that does direct I/O.
    pub(super) fn new(st: &dyn Storage, read_only: bool) -> Self {
        GrowAhead {
            reserved: Mutex::new(None),
            enabled: AtomicBool::new(!read_only && st.alignment() > 1),
        }
    }

    /// Makes sure the file extends past `frontier` (the end of the allocated
    /// clusters), reserving a whole step at once. Failure only disables the
    /// optimisation: the write that follows extends the file itself.
    pub(super) fn ensure(&self, st: &dyn Storage, frontier: u64, cluster_size: u64) {
        if !self.enabled.load(Ordering::Relaxed) {
            return;
        }
        let mut reserved = self.reserved.lock().unwrap_or_else(|e| e.into_inner());
        if reserved.is_some_and(|(_, end)| frontier <= end) {
            return;
        }
        let Ok(file_end) = st.size() else { return };
        let step = MIN_STEP.max(STEP_CLUSTERS * cluster_size);
        let target = frontier.div_ceil(step) * step + step;
        let original = reserved.map_or(file_end, |(orig, _)| orig);
        if file_end >= target {
            *reserved = Some((original, file_end));
            return;
        }
        match st.preallocate(file_end, target - file_end) {
            Ok(()) => *reserved = Some((original, target)),
            Err(e) => {
                tracing::debug!("not reserving file space ahead of allocation: {e}");
                self.enabled.store(false, Ordering::Relaxed);
            }
        }
    }

    /// Trims the reserved tail past `used_end` (the end of the allocated clusters),
    /// never below the file's length before anything was reserved. Call with no
    /// write in flight.
    pub(super) fn trim(&self, st: &dyn Storage, used_end: u64) -> crate::Result<()> {
        let mut reserved = self.reserved.lock().unwrap_or_else(|e| e.into_inner());
        let Some((original, _)) = *reserved else {
            return Ok(());
        };
        let keep = used_end.max(original);
        if st.size()? > keep {
            st.set_size(keep)?;
        }
        *reserved = None;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::sync::Arc;

    use crate::driver::FormatDriver;
    use crate::storage::CacheMode;
    use crate::{create_image, open_image, BackingChoice, CreateOptions, Format, OpenOptions};

    fn open(path: &Path, cache: CacheMode) -> crate::Result<Arc<dyn FormatDriver>> {
        open_image(
            path,
            &OpenOptions {
                format: Some(Format::Qcow2),
                read_only: false,
                cache,
                backing: BackingChoice::FromImage,
                l2_cache_size: None,
                refcount_cache_size: None,
            },
        )
    }

    #[test]
    fn direct_io_reserves_ahead_and_close_trims() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.qcow2");
        let opts = CreateOptions {
            size: Some(256 << 20),
            ..Default::default()
        };
        create_image(&path, Format::Qcow2, &opts).unwrap();
        let created = std::fs::metadata(&path).unwrap().len();
        let img = match open(&path, CacheMode::None) {
            Ok(img) => img,
            Err(e) => {
                eprintln!("skipping: this file system refuses O_DIRECT ({e})");
                return;
            }
        };
        // Whole-cluster and partial-cluster allocating writes from several threads.
        std::thread::scope(|s| {
            for t in 0..4u64 {
                let img = img.clone();
                s.spawn(move || {
                    let buf = crate::storage::AlignedBuf::new(65536, 4096);
                    let mut buf = buf;
                    buf.fill(t as u8 + 1);
                    for k in 0..16u64 {
                        let off = (t * 16 + k) * (1 << 20);
                        img.write(&buf, off).unwrap();
                        img.write(&buf[..4096], off + 131072).unwrap();
                    }
                });
            }
        });
        let reserved = std::fs::metadata(&path).unwrap().len();
        let report = img.check(None).unwrap();
        assert_eq!((report.corruptions, report.leaks), (0, 0));
        assert!(
            reserved >= report.image_end_offset + (16 << 20),
            "file {reserved} should reach well past the last cluster {}",
            report.image_end_offset
        );
        img.close().unwrap();
        drop(img);
        let closed = std::fs::metadata(&path).unwrap().len();
        assert!(
            closed < reserved && closed > created,
            "{created} < {closed} < {reserved}"
        );

        let img = open(&path, CacheMode::Writeback).unwrap();
        let report = img.check(None).unwrap();
        assert_eq!((report.corruptions, report.leaks), (0, 0));
        assert_eq!(report.image_end_offset, closed);
        let mut buf = vec![0u8; 65536];
        for t in 0..4u64 {
            for k in 0..16u64 {
                let off = (t * 16 + k) * (1 << 20);
                img.read(&mut buf, off).unwrap();
                assert!(buf.iter().all(|&b| b == t as u8 + 1), "cluster at {off}");
                img.read(&mut buf[..8192], off + 131072 - 4096).unwrap();
                assert!(buf[..4096].iter().all(|&b| b == 0));
                assert!(buf[4096..8192].iter().all(|&b| b == t as u8 + 1));
            }
        }
    }

    #[test]
    fn buffered_files_are_not_reserved() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("b.qcow2");
        let opts = CreateOptions {
            size: Some(64 << 20),
            ..Default::default()
        };
        create_image(&path, Format::Qcow2, &opts).unwrap();
        let img = open(&path, CacheMode::Writeback).unwrap();
        img.write(&[7u8; 65536], 0).unwrap();
        let report = img.check(None).unwrap();
        assert_eq!(
            std::fs::metadata(&path).unwrap().len(),
            report.image_end_offset
        );
    }
}
