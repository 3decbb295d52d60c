//! The internal snapshot table: parsing (for listing, checking, and so that clusters
//! shared with a snapshot are recognised: their refcount is above one and writes copy
//! them) and encoding new entries. Creating, applying and deleting snapshots is in
//! `snapshot_ops`.

use crate::driver::SnapshotInfo;
use crate::storage::Storage;
use crate::{Error, Result};

use super::header::{Header, MAX_L1_BYTES};

/// Largest snapshot table QEMU accepts.
pub const MAX_TABLE_BYTES: u64 = 64 << 20;
/// Longest id and name QEMU keeps (its fixed-size strings hold one byte fewer than
/// 128 and 256).
pub const MAX_ID_BYTES: usize = 127;
/// Longest snapshot name, in bytes.
pub const MAX_NAME_BYTES: usize = 255;
/// The extra data QEMU writes in every entry: `vm_state_size_large`, `disk_size`,
/// `icount`.
const EXTRA_BYTES: u32 = 24;
/// Largest per-snapshot extra data QEMU accepts.
const MAX_EXTRA: u32 = 1024;

/// One internal snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// Offset of the snapshot's L1 table.
    pub l1_table_offset: u64,
    /// Entries in the snapshot's L1 table.
    pub l1_size: u32,
    /// Unique id string.
    pub id: String,
    /// Name.
    pub name: String,
    /// Creation time, seconds.
    pub date_sec: u32,
    /// Creation time, nanoseconds.
    pub date_nsec: u32,
    /// Guest clock, nanoseconds.
    pub vm_clock_nsec: u64,
    /// VM state size in bytes.
    pub vm_state_size: u64,
    /// Virtual disk size when the snapshot was taken.
    pub disk_size: u64,
    /// Instruction count, -1 when absent.
    pub icount: i64,
}

impl Snapshot {
    /// What `snapshot -l` and `info` report about it.
    pub fn info(&self) -> SnapshotInfo {
        SnapshotInfo {
            id: self.id.clone(),
            name: self.name.clone(),
            vm_state_size: self.vm_state_size,
            date_sec: self.date_sec,
            date_nsec: self.date_nsec,
            vm_clock_nsec: self.vm_clock_nsec,
            icount: self.icount,
            disk_size: self.disk_size,
        }
    }
}

fn be16(b: &[u8], o: usize) -> u16 {
    u16::from_be_bytes([b[o], b[o + 1]])
}
fn be32(b: &[u8], o: usize) -> u32 {
    u32::from_be_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}
fn be64(b: &[u8], o: usize) -> u64 {
    let mut a = [0; 8];
    a.copy_from_slice(&b[o..o + 8]);
    u64::from_be_bytes(a)
}

/// Reads the snapshot table. Returns the snapshots and the table's length in bytes.
pub fn read_table(storage: &dyn Storage, h: &Header) -> Result<(Vec<Snapshot>, u64)> {
    let (snaps, _, len) = read_table_raw(storage, h)?;
    Ok((snaps, len))
}

/// [`read_table`], with each entry's bytes as stored (padded to a multiple of 8),
/// so that a rewritten table keeps what this parser does not interpret.
pub fn read_table_raw(
    storage: &dyn Storage,
    h: &Header,
) -> Result<(Vec<Snapshot>, Vec<Vec<u8>>, u64)> {
    let mut out = Vec::new();
    let mut raw = Vec::new();
    let mut off = h.snapshots_offset;
    let file_size = storage.size()?;
    let cs = h.cluster_size();
    for _ in 0..h.nb_snapshots {
        if off - h.snapshots_offset + 40 > MAX_TABLE_BYTES || off + 40 > file_size {
            return Err(Error::corrupt(
                "Snapshot table lies beyond the end of the image",
            ));
        }
        let mut fixed = [0u8; 40];
        storage.read_at(&mut fixed, off)?;
        let l1_table_offset = be64(&fixed, 0);
        let l1_size = be32(&fixed, 8);
        let id_len = be16(&fixed, 12) as u64;
        let name_len = be16(&fixed, 14) as u64;
        let extra_len = be32(&fixed, 36);
        if extra_len > MAX_EXTRA {
            return Err(Error::corrupt(
                "Too much extra data in snapshot table entry",
            ));
        }
        let var_len = extra_len as u64 + id_len + name_len;
        let entry_len = (40 + var_len).div_ceil(8) * 8;
        // The last entry's padding need not exist: QEMU may end the file right after it.
        if off + 40 + var_len > file_size || off - h.snapshots_offset + entry_len > MAX_TABLE_BYTES
        {
            return Err(Error::corrupt(
                "Snapshot table lies beyond the end of the image",
            ));
        }
        let mut var = vec![0u8; var_len as usize];
        storage.read_at(&mut var, off + 40)?;
        let mut bytes = fixed.to_vec();
        bytes.extend_from_slice(&var);
        bytes.resize(entry_len as usize, 0);
        raw.push(bytes);
        let extra = &var[..extra_len as usize];
        let mut vm_state_size = be32(&fixed, 32) as u64;
        let mut disk_size = h.size;
        let mut icount = -1i64;
        if extra.len() >= 8 {
            vm_state_size = be64(extra, 0);
        }
        if extra.len() >= 16 {
            disk_size = be64(extra, 8);
        }
        if extra.len() >= 24 {
            icount = be64(extra, 16) as i64;
        }
        let id_start = extra_len as usize;
        let id = String::from_utf8_lossy(&var[id_start..id_start + id_len as usize]).into_owned();
        let name = String::from_utf8_lossy(&var[id_start + id_len as usize..]).into_owned();
        if l1_table_offset % cs != 0 {
            return Err(Error::corrupt(format!(
                "Snapshot L1 table offset invalid for snapshot '{name}'"
            )));
        }
        if l1_size as u64 * 8 > MAX_L1_BYTES {
            return Err(Error::corrupt(format!(
                "Snapshot L1 table too large for snapshot '{name}'"
            )));
        }
        out.push(Snapshot {
            l1_table_offset,
            l1_size,
            id,
            name,
            date_sec: be32(&fixed, 16),
            date_nsec: be32(&fixed, 20),
            vm_clock_nsec: be64(&fixed, 24),
            vm_state_size,
            disk_size,
            icount,
        });
        off += entry_len;
    }
    Ok((out, raw, off - h.snapshots_offset))
}

/// A new table entry as QEMU 10 writes one: the fixed part, 24 bytes of extra data
/// (VM state size, disk size, instruction count), the id and the name, padded to a
/// multiple of 8. Ids and names are cut to QEMU's lengths.
pub fn encode_entry(sn: &Snapshot) -> Vec<u8> {
    let id = truncate(&sn.id, MAX_ID_BYTES);
    let name = truncate(&sn.name, MAX_NAME_BYTES);
    let mut b = Vec::with_capacity(64 + id.len() + name.len());
    b.extend_from_slice(&sn.l1_table_offset.to_be_bytes());
    b.extend_from_slice(&sn.l1_size.to_be_bytes());
    b.extend_from_slice(&(id.len() as u16).to_be_bytes());
    b.extend_from_slice(&(name.len() as u16).to_be_bytes());
    b.extend_from_slice(&sn.date_sec.to_be_bytes());
    b.extend_from_slice(&sn.date_nsec.to_be_bytes());
    b.extend_from_slice(&sn.vm_clock_nsec.to_be_bytes());
    // The 32-bit field holds the size when it fits; the extra data always holds it.
    let small = u32::try_from(sn.vm_state_size).unwrap_or(0);
    b.extend_from_slice(&small.to_be_bytes());
    b.extend_from_slice(&EXTRA_BYTES.to_be_bytes());
    b.extend_from_slice(&sn.vm_state_size.to_be_bytes());
    b.extend_from_slice(&sn.disk_size.to_be_bytes());
    b.extend_from_slice(&sn.icount.to_be_bytes());
    b.extend_from_slice(id.as_bytes());
    b.extend_from_slice(name.as_bytes());
    b.resize(b.len().div_ceil(8) * 8, 0);
    b
}

/// `s` cut to at most `max` bytes, at a character boundary.
pub fn truncate(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}
