//! Block nodes: one layer of the graph (a protocol, a format, or a filter) with its
//! children, its dirty bitmaps and its in-flight requests. Every request entering
//! the graph through a node is tracked, and every write, zero write and discard that
//! reaches it is recorded in the node's recording bitmaps.

use std::sync::{Arc, RwLock};

use serde_json::{json, Value};
use strata_image::iobuf::{self, IoBuf, IoBufMut};
use strata_image::{FormatDriver, FormatSpecific, ImageInfo, SnapshotInfo, StoredBitmap};

use crate::bitmap::DirtyBitmap;
use crate::error::{BlockError, BlockResult};
use crate::options::{DetectZeroes, DiscardMode};
use crate::tracker::RequestTracker;

/// Settings a node was opened with that affect its I/O.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct NodeSettings {
    /// Opened read-only.
    pub read_only: bool,
    /// `cache.direct`.
    pub cache_direct: bool,
    /// `cache.no-flush`.
    pub cache_no_flush: bool,
    /// `discard`.
    pub discard: DiscardMode,
    /// `detect-zeroes`.
    pub detect_zeroes: DetectZeroes,
}

/// Runs before a write, zero write or discard reaches a node's driver: the
/// copy-before-write hook of a running backup is one.
pub trait BeforeWrite: Send + Sync {
    /// Called with the range about to change. An error fails the write.
    fn before_write(&self, offset: u64, len: u64) -> BlockResult<()>;
}

/// A node of the block graph.
pub struct BlockNode {
    name: String,
    implicit: bool,
    driver: String,
    io: Arc<dyn FormatDriver>,
    file: Option<Arc<BlockNode>>,
    backing: Option<Arc<BlockNode>>,
    filename: String,
    settings: NodeSettings,
    bitmaps: RwLock<Vec<Arc<DirtyBitmap>>>,
    tracker: RequestTracker,
    hooks: RwLock<Vec<Arc<dyn BeforeWrite>>>,
    blocker: std::sync::Mutex<Option<String>>,
    /// Names of the bitmaps loaded from the image, in its directory order.
    loaded_bitmaps: std::sync::Mutex<Vec<String>>,
}

impl std::fmt::Debug for BlockNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlockNode")
            .field("name", &self.name)
            .field("driver", &self.driver)
            .finish()
    }
}

impl BlockNode {
    /// Builds a node around an opened driver.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        name: String,
        implicit: bool,
        driver: &str,
        io: Arc<dyn FormatDriver>,
        file: Option<Arc<BlockNode>>,
        backing: Option<Arc<BlockNode>>,
        filename: String,
        settings: NodeSettings,
    ) -> Arc<Self> {
        Arc::new(BlockNode {
            name,
            implicit,
            driver: driver.to_string(),
            io,
            file,
            backing,
            filename,
            settings,
            bitmaps: RwLock::new(Vec::new()),
            tracker: RequestTracker::default(),
            hooks: RwLock::new(Vec::new()),
            blocker: std::sync::Mutex::new(None),
            loaded_bitmaps: std::sync::Mutex::new(Vec::new()),
        })
    }

    /// The node's options as the JSON text QEMU puts in `json:` pseudo-filenames
    /// (`driver` and `filename` or `file`; `backing` only where it was overridden,
    /// which the node's own `json:` filename already says).
    pub fn json_options(&self) -> String {
        if let Some(j) = self.filename.strip_prefix("json:") {
            return j.to_string();
        }
        let q = |s: &str| serde_json::to_string(s).unwrap_or_default();
        match (&self.file, self.driver.as_str()) {
            (_, "file") => format!(
                "{{\"driver\": \"file\", \"filename\": {}}}",
                q(&self.filename)
            ),
            (Some(f), d) => format!("{{\"driver\": {}, \"file\": {}}}", q(d), f.json_options()),
            (None, d) => format!("{{\"driver\": {}}}", q(d)),
        }
    }

    /// Why operations on this node are blocked (QEMU's op blocker reason, e.g.
    /// "block device is in use by block job: backup"), if they are.
    pub fn blocker(&self) -> Option<String> {
        self.blocker
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Sets or clears the op blocker reason.
    pub fn set_blocker(&self, reason: Option<String>) {
        *self.blocker.lock().unwrap_or_else(|e| e.into_inner()) = reason;
    }

    /// The node name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether the name was generated for an implicitly created node.
    pub fn implicit(&self) -> bool {
        self.implicit
    }

    /// The driver name (`file`, `raw`, `qcow2`, `null-co`, ...).
    pub fn driver(&self) -> &str {
        &self.driver
    }

    /// The driver doing the I/O.
    pub fn io(&self) -> &Arc<dyn FormatDriver> {
        &self.io
    }

    /// The protocol child, for format nodes.
    pub fn file_child(&self) -> Option<&Arc<BlockNode>> {
        self.file.as_ref()
    }

    /// The backing child.
    pub fn backing_child(&self) -> Option<&Arc<BlockNode>> {
        self.backing.as_ref()
    }

    /// Settings the node was opened with.
    pub fn settings(&self) -> NodeSettings {
        self.settings
    }

    /// Whether the node refuses writes.
    pub fn read_only(&self) -> bool {
        self.settings.read_only
    }

    /// The file name shown in queries.
    pub fn filename(&self) -> &str {
        &self.filename
    }

    /// The request tracker.
    pub fn tracker(&self) -> &RequestTracker {
        &self.tracker
    }

    /// Virtual size in bytes.
    pub fn size(&self) -> u64 {
        self.io.size()
    }

    fn check_range(&self, offset: u64, len: u64) -> BlockResult<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size() => Ok(()),
            _ => Err(BlockError::generic(format!(
                "Request out of range: offset {offset}, length {len} (size {})",
                self.size()
            ))),
        }
    }

    fn check_write(&self, offset: u64, len: u64) -> BlockResult<()> {
        if self.read_only() {
            return Err(BlockError::generic(format!(
                "Node '{}' is read only",
                self.name
            )));
        }
        self.check_range(offset, len)
    }

    /// Installs a before-write hook. The node is drained first, so that every write
    /// that completes after this returns has passed through the hook.
    pub fn add_hook(&self, hook: Arc<dyn BeforeWrite>) {
        let _d = self.tracker.drain();
        self.hooks
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .push(hook);
    }

    /// Removes a before-write hook (after draining the node).
    pub fn remove_hook(&self, hook: &Arc<dyn BeforeWrite>) {
        let _d = self.tracker.drain();
        self.hooks
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|h| !Arc::ptr_eq(h, hook));
    }

    fn run_hooks(&self, offset: u64, len: u64) -> BlockResult<()> {
        let hooks = self.hooks.read().unwrap_or_else(|e| e.into_inner()).clone();
        for h in hooks {
            h.before_write(offset, len)?;
        }
        Ok(())
    }

    /// Reads through the node.
    pub fn read(&self, buf: &mut [u8], offset: u64) -> BlockResult<()> {
        self.check_range(offset, buf.len() as u64)?;
        let _t = self.tracker.begin(offset, buf.len() as u64, false);
        Ok(self.io.read(buf, offset)?)
    }

    /// Writes through the node (detect-zeroes applies), recording it in bitmaps.
    pub fn write(&self, buf: &[u8], offset: u64) -> BlockResult<()> {
        self.check_write(offset, buf.len() as u64)?;
        let _t = self.tracker.begin(offset, buf.len() as u64, true);
        self.run_hooks(offset, buf.len() as u64)?;
        let dz = self.settings.detect_zeroes;
        if dz != DetectZeroes::Off && buf.iter().all(|&b| b == 0) {
            let unmap = dz == DetectZeroes::Unmap && self.settings.discard == DiscardMode::Unmap;
            self.io.write_zeroes(offset, buf.len() as u64, unmap)?;
        } else {
            self.io.write(buf, offset)?;
        }
        self.mark_dirty(offset, buf.len() as u64);
        Ok(())
    }

    /// Reads through the node into `bufs` (memory that may be shared, e.g. guest
    /// RAM), without an intermediate copy where the driver allows.
    pub fn read_vectored(&self, bufs: &[IoBufMut<'_>], offset: u64) -> BlockResult<()> {
        let len = iobuf::total_len_mut(bufs) as u64;
        self.check_range(offset, len)?;
        let _t = self.tracker.begin(offset, len, false);
        Ok(self.io.read_vectored(bufs, offset)?)
    }

    /// Writes `bufs` through the node, as [`BlockNode::write`] does (hooks,
    /// detect-zeroes, bitmaps). With detect-zeroes on, the data is copied first (1 MiB
    /// at a time) so that the zero test and the write see the same bytes.
    pub fn write_vectored(&self, bufs: &[IoBuf<'_>], offset: u64) -> BlockResult<()> {
        let len = iobuf::total_len(bufs) as u64;
        self.check_write(offset, len)?;
        let _t = self.tracker.begin(offset, len, true);
        self.run_hooks(offset, len)?;
        let dz = self.settings.detect_zeroes;
        if dz != DetectZeroes::Off {
            // Zero detection per piece of at most 1 MiB (the copy stays bounded).
            let unmap = dz == DetectZeroes::Unmap && self.settings.discard == DiscardMode::Unmap;
            iobuf::bounce_write(bufs, |c, pos| {
                if c.iter().all(|&b| b == 0) {
                    self.io.write_zeroes(offset + pos, c.len() as u64, unmap)
                } else {
                    self.io.write(c, offset + pos)
                }
            })?;
        } else {
            self.io.write_vectored(bufs, offset)?;
        }
        self.mark_dirty(offset, len);
        Ok(())
    }

    /// Zero write; unmapping only happens with `discard=unmap`.
    pub fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> BlockResult<()> {
        self.check_write(offset, len)?;
        let _t = self.tracker.begin(offset, len, true);
        self.run_hooks(offset, len)?;
        let unmap = may_unmap && self.settings.discard == DiscardMode::Unmap;
        self.io.write_zeroes(offset, len, unmap)?;
        self.mark_dirty(offset, len);
        Ok(())
    }

    /// Discard; dropped with `discard=ignore`.
    pub fn discard(&self, offset: u64, len: u64) -> BlockResult<()> {
        self.check_write(offset, len)?;
        if self.settings.discard == DiscardMode::Ignore {
            return Ok(());
        }
        let _t = self.tracker.begin(offset, len, true);
        self.run_hooks(offset, len)?;
        self.io.discard(offset, len)?;
        self.mark_dirty(offset, len);
        Ok(())
    }

    /// Flush (a no-op with `cache.no-flush`).
    pub fn flush(&self) -> BlockResult<()> {
        if self.settings.cache_no_flush || self.read_only() {
            return Ok(());
        }
        Ok(self.io.flush()?)
    }

    /// Changes the virtual size (QMP `block_resize`); bitmaps follow.
    pub fn resize(&self, size: u64) -> BlockResult<()> {
        if !self
            .hooks
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .is_empty()
        {
            return Err(BlockError::generic(format!(
                "Node '{}' is busy: block device is in use by block job: backup",
                self.name
            )));
        }
        if self.read_only() {
            return Err(BlockError::generic(format!(
                "Node '{}' is read only",
                self.name
            )));
        }
        let _d = self.tracker.drain();
        self.io.resize(size, strata_image::Preallocation::Off)?;
        for b in self.bitmaps().iter() {
            b.resize(size);
        }
        Ok(())
    }

    /// Records a modification in every recording bitmap.
    pub fn mark_dirty(&self, offset: u64, len: u64) {
        for b in self
            .bitmaps
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            b.mark(offset, len);
        }
    }

    /// The node's bitmaps, newest first (QEMU's order).
    pub fn bitmaps(&self) -> Vec<Arc<DirtyBitmap>> {
        self.bitmaps
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The named bitmap.
    pub fn bitmap(&self, name: &str) -> Option<Arc<DirtyBitmap>> {
        self.bitmaps()
            .into_iter()
            .find(|b| b.name().as_deref() == Some(name))
    }

    /// Adds a bitmap (newest first).
    pub fn add_bitmap(&self, b: Arc<DirtyBitmap>) {
        self.bitmaps
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(0, b);
    }

    /// Removes a bitmap object.
    pub fn remove_bitmap(&self, b: &Arc<DirtyBitmap>) {
        self.bitmaps
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|x| !Arc::ptr_eq(x, b));
    }

    /// The default granularity of new bitmaps: the cluster size (at least 4 KiB)
    /// for formats that have one, else 64 KiB.
    pub fn default_bitmap_granularity(&self) -> u64 {
        match self.io.cluster_size() {
            Some(cs) => cs.max(4096),
            None => 65536,
        }
    }

    /// Loads the image's persistent bitmaps; on a writable node they are marked in
    /// use in the image until [`BlockNode::store_bitmaps`] runs at close.
    pub fn load_persistent_bitmaps(&self) -> BlockResult<()> {
        let Some(pb) = self.io.persistent_bitmaps() else {
            return Ok(());
        };
        pb.track_externally();
        let size = self.size();
        let stored = pb.load_bitmaps()?;
        *self
            .loaded_bitmaps
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = stored.iter().map(|b| b.name.clone()).collect();
        for sb in stored {
            let b = DirtyBitmap::new(Some(sb.name.clone()), sb.granularity, size)?;
            b.load_bytes(&sb.bits);
            b.set_enabled(sb.enabled && !sb.in_use);
            b.set_persistent(true);
            b.set_inconsistent(sb.in_use);
            self.add_bitmap(b);
        }
        if !self.read_only() {
            pb.mark_bitmaps_in_use()?;
        }
        Ok(())
    }

    /// Whether the node's format can store persistent bitmaps.
    pub fn supports_persistent_bitmaps(&self) -> bool {
        self.io.persistent_bitmaps().is_some()
    }

    /// Stores persistent bitmaps back into the image (clean close).
    pub fn store_bitmaps(&self) -> BlockResult<()> {
        if self.read_only() {
            return Ok(());
        }
        let Some(pb) = self.io.persistent_bitmaps() else {
            return Ok(());
        };
        let mut list: Vec<StoredBitmap> = self
            .bitmaps()
            .iter()
            .filter(|b| b.persistent())
            .filter_map(|b| {
                Some(StoredBitmap {
                    name: b.name()?,
                    granularity: b.granularity(),
                    in_use: b.inconsistent(),
                    enabled: b.enabled() || b.frozen(),
                    bits: b.to_bytes(),
                })
            })
            .collect();
        // QEMU's directory order: bitmaps that came from the image keep their
        // places, new ones follow in the node's order (newest first).
        let loaded = self
            .loaded_bitmaps
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let pos = |b: &StoredBitmap| loaded.iter().position(|n| *n == b.name);
        let (mut old, new): (Vec<_>, Vec<_>) = list.drain(..).partition(|b| pos(b).is_some());
        old.sort_by_key(|b| pos(b));
        old.extend(new);
        let list = old;
        pb.store_bitmaps(&list)?;
        Ok(())
    }

    /// Flushes and stores bitmaps: what a clean close does.
    pub fn close(&self) -> BlockResult<()> {
        let _d = self.tracker.drain();
        if !self.read_only() {
            self.store_bitmaps()?;
            self.io.close()?;
        }
        Ok(())
    }

    /// Depth of the backing chain below this node.
    pub fn backing_depth(&self) -> u64 {
        let mut d = 0;
        let mut cur = self.io.backing();
        while let Some(b) = cur {
            d += 1;
            cur = b.backing();
        }
        d
    }

    /// `ImageInfo` of this node as QEMU prints it (with the backing chain when `deep`).
    pub fn image_info(&self, deep: bool) -> Value {
        let info = self.io.info().ok();
        let actual = self.io.storage().allocated_size().ok();
        let mut v = image_info_json(
            info.as_ref(),
            &self.driver,
            &self.filename,
            self.size(),
            actual,
            deep.then(|| self.io.backing()).flatten(),
        );
        add_snapshots(&mut v, self.io.as_ref());
        v
    }

    /// `BlockDeviceInfo` as QEMU 10 prints it in `query-named-block-nodes`.
    pub fn device_info(&self, flat: bool) -> Value {
        let mut v = json!({
            "file": self.filename,
            "node-name": self.name,
            "ro": self.read_only(),
            "drv": self.driver,
        });
        // QEMU reports the backing node's filename here (not the header's string),
        // and counts the chain only when not asked for flat output.
        if let Some(b) = self.io.backing() {
            v["backing_file"] = json!(b.storage().name());
        }
        v["backing_file_depth"] = json!(if flat { 0 } else { self.backing_depth() });
        v["encrypted"] = json!(false);
        v["detect_zeroes"] = json!(self.settings.detect_zeroes.name());
        for k in ["bps", "bps_rd", "bps_wr", "iops", "iops_rd", "iops_wr"] {
            v[k] = json!(0);
        }
        v["image"] = self.image_info(!flat);
        v["cache"] = json!({
            "writeback": true,
            "direct": self.settings.cache_direct,
            "no-flush": self.settings.cache_no_flush,
        });
        v["write_threshold"] = json!(0);
        let bitmaps = self.bitmaps();
        if !bitmaps.is_empty() {
            v["dirty-bitmaps"] = Value::Array(
                // Anonymous bitmaps (a frozen bitmap's successor) are listed
                // without a name, as in QEMU.
                bitmaps.iter().map(|b| b.info()).collect(),
            );
        }
        v["active"] = json!(true);
        v
    }
}

/// QEMU's `SnapshotInfo` JSON (`icount` only when recorded).
pub fn snapshot_info_json(s: &SnapshotInfo) -> Value {
    let mut v = json!({
        "id": s.id,
        "name": s.name,
        "vm-state-size": s.vm_state_size,
        "date-sec": s.date_sec,
        "date-nsec": s.date_nsec,
        "vm-clock-sec": s.vm_clock_nsec / 1_000_000_000,
        "vm-clock-nsec": s.vm_clock_nsec % 1_000_000_000,
    });
    if s.icount != -1 {
        v["icount"] = json!(s.icount);
    }
    v
}

/// Adds `snapshots` to an `ImageInfo` when the image has any, as QEMU does.
fn add_snapshots(v: &mut Value, io: &dyn FormatDriver) {
    if let Ok(snaps) = io.snapshots() {
        if !snaps.is_empty() {
            v["snapshots"] = Value::Array(snaps.iter().map(snapshot_info_json).collect());
        }
    }
}

/// QEMU's `ImageInfo` JSON for one layer (and its backing chain with `backing`).
pub fn image_info_json(
    info: Option<&ImageInfo>,
    driver: &str,
    filename: &str,
    virtual_size: u64,
    actual_size: Option<u64>,
    backing: Option<Arc<dyn FormatDriver>>,
) -> Value {
    let mut v = json!({
        "virtual-size": virtual_size,
        "filename": filename,
    });
    if let Some(cs) = info.and_then(|i| i.cluster_size) {
        v["cluster-size"] = json!(cs);
    }
    v["format"] = json!(driver);
    if let Some(a) = actual_size {
        v["actual-size"] = json!(a);
    }
    match info.and_then(|i| i.format_specific.as_ref()) {
        Some(FormatSpecific::Qcow2(q)) => {
            let mut d = json!({
                "compat": q.compat,
                "compression-type": q.compression_type,
            });
            if let Some(bm) = &q.bitmaps {
                d["bitmaps"] = json!(bm);
            }
            d["refcount-bits"] = json!(q.refcount_bits);
            // QEMU leaves the v3-only members out for compat=0.10 images.
            if q.compat != "0.10" {
                d["lazy-refcounts"] = json!(q.lazy_refcounts);
                d["corrupt"] = json!(q.corrupt);
                d["extended-l2"] = json!(q.extended_l2);
            }
            v["format-specific"] = json!({"type": "qcow2", "data": d});
        }
        None if driver == "file" => {
            v["format-specific"] = json!({"type": "file", "data": {}});
        }
        None => {}
    }
    if let Some(i) = info {
        if let Some(b) = &i.backing_filename {
            v["backing-filename"] = json!(b);
            v["full-backing-filename"] =
                json!(i.full_backing_filename.clone().unwrap_or(b.clone()));
            if let Some(f) = &i.backing_format {
                v["backing-filename-format"] = json!(f);
            }
        }
    }
    if let Some(b) = backing {
        if let Ok(bi) = b.info() {
            let fname = b.storage().name();
            let mut bv = image_info_json(
                Some(&bi),
                b.format_name(),
                &fname,
                b.size(),
                b.storage().allocated_size().ok(),
                b.backing(),
            );
            add_snapshots(&mut bv, b.as_ref());
            v["backing-image"] = bv;
        }
    }
    // null-co has no bdrv_get_info in QEMU, so no dirty-flag either.
    if driver != "null-co" {
        v["dirty-flag"] = json!(info.and_then(|i| i.dirty_flag).unwrap_or(false));
    }
    v
}
