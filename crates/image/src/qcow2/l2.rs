//! L1 and L2 entries: their bit layouts, and what a (sub)cluster reads as.
//!
//! Standard L2 entries are 64 bits; with extended L2 each entry is followed by a
//! 64-bit subcluster bitmap (bits 0-31 "allocated", bits 32-63 "reads as zero").

use crate::{Error, Result};

/// L1/L2 entry flag: the cluster's refcount is exactly one (may be written in place).
pub const OFLAG_COPIED: u64 = 1 << 63;
/// L2 entry flag: the cluster is compressed.
pub const OFLAG_COMPRESSED: u64 = 1 << 62;
/// L2 entry flag (standard entries, v3): the cluster reads as zeroes.
pub const OFLAG_ZERO: u64 = 1;
/// Host offset bits of L1 entries and uncompressed L2 entries.
pub const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Bits of an L1 entry that must be zero.
pub const L1E_RESERVED: u64 = 0x7f00_0000_0000_01ff;
/// Bits of a standard uncompressed L2 entry that must be zero.
pub const L2E_RESERVED: u64 = 0x3f00_0000_0000_01fe;
/// Subcluster bitmap with every subcluster reading as zero.
pub const BITMAP_ALL_ZEROES: u64 = 0xffff_ffff_0000_0000;
/// Subcluster bitmap with every subcluster allocated.
pub const BITMAP_ALL_ALLOC: u64 = 0x0000_0000_ffff_ffff;

/// What one cluster's L2 entry says, before looking at subclusters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClusterType {
    /// No host cluster, no zero flag: reads come from the backing file.
    Unallocated,
    /// Zero flag, no host cluster.
    ZeroPlain,
    /// Zero flag with a preallocated host cluster.
    ZeroAlloc(u64),
    /// Data at a host cluster.
    Normal(u64),
    /// Compressed data: host byte offset and maximum compressed length.
    Compressed {
        /// Host byte offset of the compressed data.
        offset: u64,
        /// Upper bound of the compressed length (whole sectors).
        len: u64,
    },
}

/// Splits an L2 entry (standard part) into its cluster type.
pub fn classify(entry: u64, cluster_bits: u32, extended: bool) -> ClusterType {
    if entry & OFLAG_COMPRESSED != 0 {
        let x = 62 - (cluster_bits - 8);
        let offset = entry & ((1u64 << x) - 1);
        let sectors = (entry >> x) & ((1u64 << (cluster_bits - 8)) - 1);
        // The data starts inside the sector holding `offset` and spans `sectors`
        // further sectors.
        let len = (sectors + 1) * 512 - (offset & 511);
        return ClusterType::Compressed { offset, len };
    }
    let host = entry & OFFSET_MASK;
    let zero = !extended && entry & OFLAG_ZERO != 0;
    match (host, zero) {
        (0, false) => ClusterType::Unallocated,
        (0, true) => ClusterType::ZeroPlain,
        (h, true) => ClusterType::ZeroAlloc(h),
        (h, false) => ClusterType::Normal(h),
    }
}

/// Builds a compressed L2 entry.
pub fn compressed_entry(offset: u64, len: u64, cluster_bits: u32) -> u64 {
    let x = 62 - (cluster_bits - 8);
    let sectors = ((offset + len - 1) >> 9) - (offset >> 9);
    OFLAG_COMPRESSED | (sectors << x) | offset
}

/// What a subcluster reads as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubState {
    /// Comes from the backing file (zeroes without one).
    Backing,
    /// Reads as zeroes; `Some(host)` when a host cluster is still allocated.
    Zero(Option<u64>),
    /// Data at this host offset (of the subcluster's start).
    Data(u64),
    /// Part of a compressed cluster.
    Compressed {
        /// Host byte offset of the compressed data.
        offset: u64,
        /// Upper bound of the compressed length.
        len: u64,
    },
}

/// The state of subcluster `sc` of a cluster whose entry is `entry` (+ `bitmap`).
/// Without extended L2 there is one subcluster per cluster.
pub fn sub_state(
    entry: u64,
    bitmap: u64,
    sc: u32,
    sc_bits: u32,
    cluster_bits: u32,
    extended: bool,
) -> Result<SubState> {
    let ct = classify(entry, cluster_bits, extended);
    if !extended {
        return Ok(match ct {
            ClusterType::Unallocated => SubState::Backing,
            ClusterType::ZeroPlain => SubState::Zero(None),
            ClusterType::ZeroAlloc(h) => SubState::Zero(Some(h)),
            ClusterType::Normal(h) => SubState::Data(h),
            ClusterType::Compressed { offset, len } => SubState::Compressed { offset, len },
        });
    }
    let alloc = bitmap >> sc & 1 != 0;
    let zero = bitmap >> (32 + sc) & 1 != 0;
    match ct {
        ClusterType::Compressed { offset, len } => Ok(SubState::Compressed { offset, len }),
        ClusterType::Normal(h) => match (alloc, zero) {
            (true, false) => Ok(SubState::Data(h + ((sc as u64) << sc_bits))),
            (false, true) => Ok(SubState::Zero(Some(h))),
            (false, false) => Ok(SubState::Backing),
            (true, true) => Err(Error::corrupt(format!(
                "Invalid subcluster bitmap {bitmap:#x} (allocated and zero)"
            ))),
        },
        _ => match (alloc, zero) {
            (false, true) => Ok(SubState::Zero(None)),
            (false, false) => Ok(SubState::Backing),
            _ => Err(Error::corrupt(format!(
                "Invalid subcluster bitmap {bitmap:#x} for an unallocated cluster"
            ))),
        },
    }
}

/// An L2 table in memory: entries (and bitmaps, for extended L2) as host integers.
#[derive(Debug, Clone)]
pub struct L2Table {
    /// `n` entries, or `2n` words (entry, bitmap) with extended L2.
    words: Vec<u64>,
    extended: bool,
}

impl L2Table {
    /// An all-zero table with `entries` entries.
    pub fn new(entries: usize, extended: bool) -> Self {
        L2Table {
            words: vec![0; entries * if extended { 2 } else { 1 }],
            extended,
        }
    }

    /// Decodes a table from its on-disk bytes.
    pub fn from_bytes(b: &[u8], extended: bool) -> Self {
        let words = b
            .chunks_exact(8)
            .map(|c| u64::from_be_bytes(c.try_into().unwrap_or([0; 8])))
            .collect();
        L2Table { words, extended }
    }

    /// Encodes the table for disk.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.words.len() * 8);
        for w in &self.words {
            out.extend_from_slice(&w.to_be_bytes());
        }
        out
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        if self.extended {
            self.words.len() / 2
        } else {
            self.words.len()
        }
    }

    /// Whether the table has no entries.
    pub fn is_empty(&self) -> bool {
        self.words.is_empty()
    }

    /// Entry `i` and its subcluster bitmap (0 without extended L2).
    pub fn get(&self, i: usize) -> (u64, u64) {
        if self.extended {
            (self.words[2 * i], self.words[2 * i + 1])
        } else {
            (self.words[i], 0)
        }
    }

    /// Sets entry `i` and its bitmap (ignored without extended L2).
    pub fn set(&mut self, i: usize, entry: u64, bitmap: u64) {
        if self.extended {
            self.words[2 * i] = entry;
            self.words[2 * i + 1] = bitmap;
        } else {
            self.words[i] = entry;
        }
    }
}
