//! `strata-block`: Strata's block graph.
//!
//! It owns the nodes a QMP client builds with `blockdev-add` ([`graph::BlockGraph`]),
//! their options ([`options`]), the per-node request tracking that copy-before-write
//! and drains rely on ([`tracker`]), dirty bitmaps with QEMU's semantics and their
//! persistence in qcow2 ([`bitmap`], [`node`]), internal snapshots of root nodes
//! (`snapshots`), and the `null-co` test driver.
//! Formats themselves live in `strata-image`.

pub mod bitmap;
pub mod blkdebug;
mod error;
pub mod graph;
pub mod node;
mod null;
pub mod options;
pub mod qemu_io;
mod snapshots;
pub mod tracker;

pub use bitmap::DirtyBitmap;
pub use error::{strerror, BlockError, BlockResult, ErrorClass};
pub use graph::{BitmapRef, BlockGraph};
pub use node::{BeforeWrite, BlockNode, NodeSettings};
pub use null::NullDisk;
pub use options::BlockdevOptions;
pub use strata_image::{iobuf, IoBuf, IoBufMut};
