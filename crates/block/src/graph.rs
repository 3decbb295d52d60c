//! The block graph: every named node, `blockdev-add` / `blockdev-del`, the dirty
//! bitmap operations of QMP, `block_resize`, and the node queries. Method names follow
//! the QMP commands they implement; errors carry QEMU's texts.

use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

use serde_json::{json, Value};
use strata_image::qcow2::{self, Qcow2OpenOptions};
use strata_image::{resolve_backing_path, CacheMode, FileStorage, Format, Storage};

use crate::bitmap::{check_granularity, DirtyBitmap};
use crate::error::{BlockError, BlockResult};
use crate::node::{BlockNode, NodeSettings};
use crate::null::NullDisk;
use crate::options::{
    BackingRef, BlockdevOptions, ChildRef, DetectZeroes, DiscardMode, DriverOptions,
};

/// A bitmap named by node and name (a `block-dirty-bitmap-merge` source).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BitmapRef {
    /// Node name (the target's node when given as a plain name).
    pub node: String,
    /// Bitmap name.
    pub name: String,
}

#[derive(Default)]
struct State {
    nodes: Vec<Arc<BlockNode>>,
    next_auto: u64,
}

/// The graph of block nodes of one process.
#[derive(Default)]
pub struct BlockGraph {
    state: Mutex<State>,
}

/// The longest node name QEMU accepts (its buffer holds 32 bytes with the NUL);
/// longer well-formed names get "Node name too long" after the duplicate check.
pub const MAX_NODE_NAME: usize = 31;

/// Checks a node name with QEMU's rules: a letter first, then letters, digits,
/// '-', '.' and '_' (the length is checked separately).
pub fn valid_node_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
}

fn cache_mode(direct: bool, no_flush: bool) -> CacheMode {
    match (direct, no_flush) {
        (false, false) => CacheMode::Writeback,
        (true, false) => CacheMode::None,
        (false, true) => CacheMode::Unsafe,
        (true, true) => CacheMode::DirectNoFlush,
    }
}

impl BlockGraph {
    /// An empty graph.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The node with this name.
    pub fn node(&self, name: &str) -> Option<Arc<BlockNode>> {
        self.lock().nodes.iter().find(|n| n.name() == name).cloned()
    }

    /// All nodes, in creation order.
    pub fn nodes(&self) -> Vec<Arc<BlockNode>> {
        self.lock().nodes.clone()
    }

    /// Looks a node up for a command, with QEMU's "Cannot find device=... nor
    /// node-name=..." error.
    pub fn lookup(&self, device: Option<&str>, node: &str) -> BlockResult<Arc<BlockNode>> {
        self.node(node).ok_or_else(|| {
            BlockError::generic(format!(
                "Cannot find device='{}' nor node-name='{node}'",
                device.unwrap_or("")
            ))
        })
    }

    /// Finds a node by node-name for the bitmap commands, with their error text
    /// ("Node 'x' not found").
    pub fn find_node(&self, node: &str) -> BlockResult<Arc<BlockNode>> {
        self.node(node)
            .ok_or_else(|| BlockError::generic(format!("Node '{node}' not found")))
    }

    fn auto_name(&self) -> String {
        let mut s = self.lock();
        s.next_auto += 1;
        format!("#block{:03}", s.next_auto)
    }

    /// `blockdev-add`: opens a node (and inline children) from options.
    pub fn blockdev_add(&self, opts: &BlockdevOptions) -> BlockResult<Arc<BlockNode>> {
        let name = opts.node_name.as_deref().ok_or_else(|| {
            BlockError::generic("'node-name' must be specified for the root node")
        })?;
        let _ = name;
        let before = self.nodes();
        let r = self.open_node(opts, false);
        if r.is_err() {
            // Inline children opened before the failure go away with it, as in QEMU.
            let added: Vec<_> = self
                .nodes()
                .into_iter()
                .filter(|n| !before.iter().any(|b| Arc::ptr_eq(b, n)))
                .collect();
            for n in added.iter().rev() {
                let _ = n.close();
                self.lock().nodes.retain(|x| !Arc::ptr_eq(x, n));
            }
        }
        r
    }

    /// Opens a node that the graph names itself when `node_name` is absent (targets
    /// created by `drive-backup`, backing files opened from image headers).
    pub fn open_implicit(&self, opts: &BlockdevOptions) -> BlockResult<Arc<BlockNode>> {
        self.open_node(opts, true)
    }

    /// A fresh automatic node name (`#blockNNN`).
    pub fn new_auto_name(&self) -> String {
        self.auto_name()
    }

    /// Adds a node built elsewhere (a filter). Fails on a duplicate name.
    pub fn insert_node(&self, node: Arc<BlockNode>) -> BlockResult<()> {
        let mut s = self.lock();
        if s.nodes.iter().any(|n| n.name() == node.name()) {
            return Err(BlockError::generic(format!(
                "Duplicate nodes with node-name='{}'",
                node.name()
            )));
        }
        s.nodes.push(node);
        Ok(())
    }

    /// Removes a node (and closes implicit children nobody else uses) without
    /// the monitor-ownership checks of `blockdev-del`.
    pub fn remove_node(&self, node: &Arc<BlockNode>) -> BlockResult<()> {
        self.remove_tree(node)
    }

    fn open_node(&self, opts: &BlockdevOptions, implicit_ok: bool) -> BlockResult<Arc<BlockNode>> {
        let (name, implicit) = match &opts.node_name {
            Some(n) => {
                if !valid_node_name(n) {
                    return Err(BlockError::generic(format!("Invalid node-name: '{n}'")));
                }
                if self.node(n).is_some() {
                    return Err(BlockError::generic(format!(
                        "Duplicate nodes with node-name='{n}'"
                    )));
                }
                if n.len() > MAX_NODE_NAME {
                    return Err(BlockError::generic("Node name too long"));
                }
                (n.clone(), false)
            }
            None if implicit_ok => (self.auto_name(), true),
            None => {
                return Err(BlockError::generic(
                    "'node-name' must be specified for the root node",
                ))
            }
        };
        if opts.detect_zeroes == DetectZeroes::Unmap && opts.discard != DiscardMode::Unmap {
            return Err(BlockError::generic(
                "setting detect-zeroes to unmap is not allowed without setting discard operation to unmap",
            ));
        }
        let settings = NodeSettings {
            read_only: opts.read_only,
            cache_direct: opts.cache_direct,
            cache_no_flush: opts.cache_no_flush,
            discard: opts.discard,
            detect_zeroes: opts.detect_zeroes,
        };
        let cache = cache_mode(opts.cache_direct, opts.cache_no_flush);
        let node = match &opts.kind {
            DriverOptions::File { filename } => {
                let path = Path::new(filename);
                let storage = match FileStorage::open(path, opts.read_only, cache) {
                    Ok(s) => s,
                    Err(_) if opts.auto_read_only && !opts.read_only => {
                        FileStorage::open(path, true, cache).map_err(open_error(filename))?
                    }
                    Err(e) => return Err(open_error(filename)(e)),
                };
                let ro = storage.read_only();
                let storage: Arc<dyn Storage> = Arc::new(storage);
                let io = strata_image::open_on(storage, Format::Raw, ro, None)?;
                BlockNode::new(
                    name,
                    implicit,
                    "file",
                    io,
                    None,
                    None,
                    filename.clone(),
                    NodeSettings {
                        read_only: ro,
                        ..settings
                    },
                )
            }
            DriverOptions::BlkDebug { image, inject } => {
                let child = self.child(image, opts)?;
                let filename = child.filename().to_string();
                let ro = child.read_only() || opts.read_only;
                BlockNode::new(
                    name,
                    implicit,
                    "blkdebug",
                    Arc::new(crate::blkdebug::BlkDebug::new(
                        child.clone(),
                        inject.clone(),
                    )),
                    Some(child),
                    None,
                    filename,
                    NodeSettings {
                        read_only: ro,
                        ..settings
                    },
                )
            }
            DriverOptions::Null { size, latency_ns } => BlockNode::new(
                name,
                implicit,
                "null-co",
                Arc::new(NullDisk::with_latency(
                    *size,
                    std::time::Duration::from_nanos(*latency_ns),
                )),
                None,
                None,
                // QEMU names it by its options when they differ from the defaults.
                match (*size == 1 << 30, *latency_ns) {
                    (true, 0) => "null-co://".into(),
                    (_, 0) => format!("json:{{\"driver\": \"null-co\", \"size\": {size}}}"),
                    _ => format!(
                        "json:{{\"driver\": \"null-co\", \"size\": {size}, \"latency-ns\": {latency_ns}}}"
                    ),
                },
                settings,
            ),
            DriverOptions::Format {
                file,
                backing,
                l2_cache_size,
                refcount_cache_size,
            } => {
                let file_node = self.child(file, opts)?;
                if file_node.read_only() && !opts.read_only {
                    return Err(BlockError::generic("Block node is read-only"));
                }
                let storage = file_node.io().storage();
                let filename = file_node.filename().to_string();
                if opts.driver == "raw" {
                    let io = strata_image::open_on(storage, Format::Raw, opts.read_only, None)?;
                    BlockNode::new(
                        name,
                        implicit,
                        "raw",
                        io,
                        Some(file_node),
                        None,
                        filename,
                        settings,
                    )
                } else {
                    let mut backing_node: Option<Arc<BlockNode>> = None;
                    let mut open_err: Option<BlockError> = None;
                    let force = matches!(backing, BackingRef::Child(_));
                    let mut opener = |bname: &str, bfmt: Option<&str>| {
                        let r = match backing {
                            BackingRef::Child(c) => self.child(c, opts).map_err(|e| {
                                BlockError::generic(format!(
                                    "Could not open backing file: {}",
                                    e.desc
                                ))
                            }),
                            _ => self.open_implicit_backing(&filename, bname, bfmt, cache),
                        };
                        match r {
                            Ok(n) => {
                                let io = n.io().clone();
                                backing_node = Some(n);
                                Ok(io)
                            }
                            Err(e) => {
                                open_err = Some(e.clone());
                                Err(strata_image::Error::invalid(e.desc))
                            }
                        }
                    };
                    let want_backing = !matches!(backing, BackingRef::None);
                    let q = qcow2::open(
                        storage,
                        Qcow2OpenOptions {
                            read_only: opts.read_only,
                            l2_cache_size: *l2_cache_size,
                            refcount_cache_size: *refcount_cache_size,
                            image_path: Some(filename.clone().into()),
                        },
                        if want_backing {
                            Some(&mut opener as qcow2::BackingOpener<'_>)
                        } else {
                            None
                        },
                        force,
                    );
                    let q = match (q, open_err) {
                        (Ok(q), _) => q,
                        (Err(_), Some(e)) => return Err(e),
                        // The format driver's own message, as QEMU reports it
                        // ("Image is not in qcow2 format").
                        (Err(e), None) => return Err(BlockError::generic(e.to_string())),
                    };
                    let header_backing = q.info().ok().and_then(|i| i.backing_filename);
                    let overridden = match backing {
                        BackingRef::None => header_backing.is_some(),
                        BackingRef::Child(_) => {
                            backing_node.as_ref().map(|b| b.filename()) != header_backing.as_deref()
                        }
                        BackingRef::Default => false,
                    };
                    let filename = if overridden {
                        // QEMU names a node whose backing differs from the image's
                        // header by its options (bdrv_refresh_filename).
                        format!(
                            "json:{{\"backing\": {}, \"driver\": \"qcow2\", \"file\": {}}}",
                            backing_node
                                .as_ref()
                                .map_or("null".to_string(), |b| b.json_options()),
                            file_node.json_options()
                        )
                    } else {
                        filename
                    };
                    let node = BlockNode::new(
                        name,
                        implicit,
                        "qcow2",
                        q,
                        Some(file_node),
                        backing_node,
                        filename,
                        settings,
                    );
                    node.load_persistent_bitmaps()?;
                    node
                }
            }
        };
        self.lock().nodes.push(node.clone());
        Ok(node)
    }

    fn child(&self, c: &ChildRef, parent: &BlockdevOptions) -> BlockResult<Arc<BlockNode>> {
        match c {
            ChildRef::Reference(n) => self.node(n).ok_or_else(|| {
                BlockError::generic(format!("Cannot find device='{n}' nor node-name='{n}'"))
            }),
            ChildRef::Inline(o) => {
                let mut o = (**o).clone();
                // Children inherit read-only and cache settings unless they set them.
                o.read_only |= parent.read_only;
                self.open_node(&o, true)
            }
        }
    }

    fn open_implicit_backing(
        &self,
        image: &str,
        name: &str,
        fmt: Option<&str>,
        cache: CacheMode,
    ) -> BlockResult<Arc<BlockNode>> {
        let path = resolve_backing_path(Path::new(image), name);
        let filename = path.display().to_string();
        let format = match fmt {
            Some(f) => f.to_string(),
            None => {
                let st = FileStorage::open(&path, true, cache).map_err(open_error(&filename))?;
                strata_image::probe_format(&st)?.name().to_string()
            }
        };
        let opts = BlockdevOptions {
            driver: format,
            node_name: None,
            read_only: true,
            auto_read_only: false,
            cache_direct: cache.direct(),
            cache_no_flush: cache.no_flush(),
            discard: Default::default(),
            detect_zeroes: Default::default(),
            kind: DriverOptions::Format {
                file: ChildRef::Inline(Box::new(BlockdevOptions {
                    driver: "file".into(),
                    node_name: None,
                    read_only: true,
                    auto_read_only: false,
                    cache_direct: cache.direct(),
                    cache_no_flush: cache.no_flush(),
                    discard: Default::default(),
                    detect_zeroes: Default::default(),
                    kind: DriverOptions::File { filename },
                })),
                backing: BackingRef::Default,
                l2_cache_size: None,
                refcount_cache_size: None,
            },
        };
        self.open_node(&opts, true)
    }

    /// Nodes that use `node` as a child.
    pub(crate) fn parents_of(&self, node: &Arc<BlockNode>) -> Vec<Arc<BlockNode>> {
        self.nodes()
            .into_iter()
            .filter(|n| {
                n.file_child().is_some_and(|c| Arc::ptr_eq(c, node))
                    || n.backing_child().is_some_and(|c| Arc::ptr_eq(c, node))
            })
            .collect()
    }

    /// `blockdev-del`: closes a node nobody uses, with its implicit children.
    pub fn blockdev_del(&self, name: &str) -> BlockResult<()> {
        let node = self.node(name).ok_or_else(|| {
            BlockError::generic(format!("Failed to find node with node-name='{name}'"))
        })?;
        if let Some(reason) = node.blocker() {
            return Err(BlockError::generic(format!(
                "Node '{name}' is busy: {reason}"
            )));
        }
        if node.implicit() {
            return Err(BlockError::generic(format!(
                "Node {name} is not owned by the monitor"
            )));
        }
        if !self.parents_of(&node).is_empty() || Arc::strong_count(&node) > 2 {
            return Err(BlockError::generic(format!(
                "Block device {name} is in use"
            )));
        }
        self.remove_tree(&node)
    }

    fn remove_tree(&self, node: &Arc<BlockNode>) -> BlockResult<()> {
        node.close()?;
        self.lock().nodes.retain(|n| !Arc::ptr_eq(n, node));
        for child in [node.file_child(), node.backing_child()]
            .into_iter()
            .flatten()
        {
            if child.implicit() && self.parents_of(child).is_empty() {
                self.remove_tree(child)?;
            }
        }
        Ok(())
    }

    /// Closes every node (flush, store persistent bitmaps), parents first.
    pub fn close_all(&self) -> Vec<BlockError> {
        let mut errors = Vec::new();
        let mut nodes = self.nodes();
        nodes.reverse();
        for n in nodes {
            if let Err(e) = n.close() {
                errors.push(e);
            }
        }
        self.lock().nodes.clear();
        errors
    }

    /// `query-named-block-nodes`.
    pub fn query_named_block_nodes(&self, flat: bool) -> Value {
        let mut nodes = self.nodes();
        nodes.reverse();
        Value::Array(nodes.iter().map(|n| n.device_info(flat)).collect())
    }

    /// `block_resize`.
    pub fn block_resize(&self, device: Option<&str>, node: &str, size: i64) -> BlockResult<()> {
        if size < 0 {
            return Err(BlockError::generic("Parameter 'size' expects a >0 size"));
        }
        let n = self.lookup(device, node)?;
        if n.read_only() {
            return Err(BlockError::generic("Image is read-only"));
        }
        n.resize(size as u64)
    }

    fn find_bitmap(
        &self,
        node: &str,
        name: &str,
    ) -> BlockResult<(Arc<BlockNode>, Arc<DirtyBitmap>)> {
        let n = self.find_node(node)?;
        let b = n
            .bitmap(name)
            .ok_or_else(|| BlockError::generic(format!("Dirty bitmap '{name}' not found")))?;
        Ok((n, b))
    }

    fn check_modifiable(b: &DirtyBitmap, name: &str, allow_ro: bool, ro: bool) -> BlockResult<()> {
        if b.busy() {
            return Err(BlockError::generic(format!(
                "Bitmap '{name}' is currently in use by another operation and cannot be used"
            )));
        }
        if !allow_ro && ro && b.persistent() {
            return Err(BlockError::generic(format!(
                "Bitmap '{name}' is readonly and cannot be modified"
            )));
        }
        if b.inconsistent() {
            return Err(BlockError::generic(format!(
                "Bitmap '{name}' is inconsistent and cannot be used"
            )));
        }
        Ok(())
    }

    /// `block-dirty-bitmap-add`.
    pub fn bitmap_add(
        &self,
        node: &str,
        name: &str,
        granularity: Option<u64>,
        persistent: bool,
        disabled: bool,
    ) -> BlockResult<()> {
        // QEMU's order: empty name, node, granularity, what the image can store,
        // then the bitmap's own name checks.
        if name.is_empty() {
            return Err(BlockError::generic("Bitmap name cannot be empty"));
        }
        let n = self.lookup(Some(node), node)?;
        let g = granularity.unwrap_or_else(|| n.default_bitmap_granularity());
        check_granularity(g)?;
        if persistent {
            if !n.supports_persistent_bitmaps() {
                return Err(BlockError::generic(format!(
                    "Can't store persistent bitmaps to {node}: Operation not supported"
                )));
            }
            if let Ok(info) = n.io().info() {
                if let Some(strata_image::FormatSpecific::Qcow2(q)) = info.format_specific {
                    if q.compat == "0.10" {
                        return Err(BlockError::generic(format!(
                            "Can't make bitmap '{name}' persistent in '{node}': Cannot store dirty bitmaps in qcow2 v2 files"
                        )));
                    }
                }
            }
            if name.len() > qcow2::bitmaps::MAX_NAME {
                return Err(BlockError::generic(format!(
                    "Can't make bitmap '{name}' persistent in '{node}': Name is too long"
                )));
            }
        }
        if n.bitmap(name).is_some() {
            return Err(BlockError::generic(format!(
                "Bitmap already exists: {name}"
            )));
        }
        if name.len() > MAX_BITMAP_NAME {
            return Err(BlockError::generic(format!("Bitmap name too long: {name}")));
        }
        let b = DirtyBitmap::new(Some(name.to_string()), g, n.size())?;
        b.set_persistent(persistent);
        b.set_enabled(!disabled);
        n.add_bitmap(b);
        Ok(())
    }

    /// `block-dirty-bitmap-remove`.
    pub fn bitmap_remove(&self, node: &str, name: &str) -> BlockResult<()> {
        let (n, b) = self.find_bitmap(node, name)?;
        if b.busy() {
            return Err(BlockError::generic(format!(
                "Bitmap '{name}' is currently in use by another operation and cannot be used"
            )));
        }
        // QEMU checks busy and read-only here, not inconsistent: an inconsistent
        // bitmap can (only) be removed.
        if n.read_only() && b.persistent() {
            return Err(BlockError::generic(format!(
                "Bitmap '{name}' is readonly and cannot be modified"
            )));
        }
        n.remove_bitmap(&b);
        Ok(())
    }

    /// `block-dirty-bitmap-clear`.
    pub fn bitmap_clear(&self, node: &str, name: &str) -> BlockResult<()> {
        let (n, b) = self.find_bitmap(node, name)?;
        Self::check_modifiable(&b, name, false, n.read_only())?;
        b.clear();
        Ok(())
    }

    /// `block-dirty-bitmap-enable` / `-disable`.
    pub fn bitmap_set_enabled(&self, node: &str, name: &str, on: bool) -> BlockResult<()> {
        let (n, b) = self.find_bitmap(node, name)?;
        Self::check_modifiable(&b, name, true, n.read_only())?;
        b.set_enabled(on);
        Ok(())
    }

    /// `block-dirty-bitmap-merge`.
    pub fn bitmap_merge(&self, node: &str, target: &str, sources: &[BitmapRef]) -> BlockResult<()> {
        let (n, t) = self.find_bitmap(node, target)?;
        Self::check_modifiable(&t, target, false, n.read_only())?;
        let mut srcs = Vec::new();
        for s in sources {
            let (sn, b) = self.find_bitmap(&s.node, &s.name)?;
            Self::check_modifiable(&b, &s.name, true, sn.read_only())?;
            if b.disk_size() != t.disk_size() {
                return Err(BlockError::generic(format!(
                    "Bitmaps are of different sizes (destination size is {}, source size is {}) and can't be merged",
                    t.disk_size(),
                    b.disk_size()
                )));
            }
            srcs.push(b);
        }
        for b in srcs {
            t.merge_from(&b)?;
        }
        Ok(())
    }

    /// `x-debug-block-dirty-bitmap-sha256`.
    pub fn bitmap_sha256(&self, node: &str, name: &str) -> BlockResult<Value> {
        let (_, b) = self.find_bitmap(node, name)?;
        Ok(json!({ "sha256": b.sha256() }))
    }
}

/// The longest dirty bitmap name QEMU accepts (`BDRV_BITMAP_MAX_NAME_SIZE`).
const MAX_BITMAP_NAME: usize = 1023;

fn open_error(filename: &str) -> impl Fn(strata_image::Error) -> BlockError + '_ {
    move |e| match e {
        strata_image::Error::Io { source, .. } => {
            BlockError::generic(format!("Could not open '{filename}': {}", io_text(&source)))
        }
        other => BlockError::generic(other.to_string()),
    }
}

/// The C library's wording of an I/O error ("No such file or directory").
fn io_text(e: &std::io::Error) -> String {
    let s = e.to_string();
    match s.find(" (os error") {
        Some(i) => s[..i].to_string(),
        None => s,
    }
}
