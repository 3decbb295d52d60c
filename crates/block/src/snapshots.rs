//! Internal snapshots through the block graph: QMP's
//! `blockdev-snapshot-internal-sync` and `blockdev-snapshot-delete-internal-sync`,
//! with QEMU's checks and messages. The node is drained while its image changes.

use std::sync::Arc;

use strata_image::{NewSnapshot, SnapshotInfo};

use crate::{BlockError, BlockGraph, BlockNode, BlockResult};

impl BlockGraph {
    /// QEMU's `qmp_get_root_bs`: the node named `name`, which no other node may use.
    pub fn root_node(&self, name: &str) -> BlockResult<Arc<BlockNode>> {
        let n = self.node(name).ok_or_else(|| {
            BlockError::generic(format!(
                "Cannot find device='{name}' nor node-name='{name}'"
            ))
        })?;
        // A block job's nodes are children of its filter node in QEMU; here the
        // job marks them with a blocker instead.
        if !self.parents_of(&n).is_empty() || n.blocker().is_some() {
            return Err(BlockError::generic("Need a root block node"));
        }
        Ok(n)
    }

    /// `blockdev-snapshot-internal-sync`: takes snapshot `name` of root node `device`
    /// and returns it.
    pub fn snapshot_internal(&self, device: &str, name: &str) -> BlockResult<SnapshotInfo> {
        let n = self.root_node(device)?;
        let _drained = n.tracker().drain();
        if n.read_only() {
            return Err(BlockError::generic(format!(
                "Device '{device}' is read only"
            )));
        }
        let Some(ops) = n.io().internal_snapshots() else {
            return Err(BlockError::generic(format!(
                "Block format '{}' used by device '{device}' does not support internal snapshots",
                n.driver()
            )));
        };
        if name.is_empty() {
            return Err(BlockError::generic("Name is empty"));
        }
        if n.io().snapshots()?.iter().any(|s| s.name == name) {
            return Err(BlockError::generic(format!(
                "Snapshot with name '{name}' already exists on device '{device}'"
            )));
        }
        // No VM clock here, and no instruction count: QMP records -1.
        let new = NewSnapshot {
            icount: -1,
            ..NewSnapshot::now(name)
        };
        ops.create_snapshot(&new).map_err(|e| {
            BlockError::generic(format!(
                "Failed to create snapshot '{name}' on device '{device}': {e}"
            ))
        })
    }

    /// `blockdev-snapshot-delete-internal-sync`: deletes the snapshot of root node
    /// `device` that matches `id` and `name` (each when given); returns what it was.
    pub fn snapshot_delete_internal(
        &self,
        device: &str,
        id: Option<&str>,
        name: Option<&str>,
    ) -> BlockResult<SnapshotInfo> {
        let n = self.root_node(device)?;
        if id.is_none() && name.is_none() {
            return Err(BlockError::generic("Name or id must be provided"));
        }
        let _drained = n.tracker().drain();
        let Some(ops) = n.io().internal_snapshots() else {
            return Err(BlockError::generic(
                "Failed to get a snapshot list: Operation not supported",
            ));
        };
        let found = n
            .io()
            .snapshots()?
            .into_iter()
            .find(|s| id.is_none_or(|id| s.id == id) && name.is_none_or(|name| s.name == name));
        let Some(sn) = found else {
            return Err(BlockError::generic(format!(
                "Snapshot with id '{}' and name '{}' does not exist on device '{device}'",
                id.unwrap_or("null"),
                name.unwrap_or("null")
            )));
        };
        ops.delete_snapshot(&sn.id)?;
        Ok(sn)
    }
}
