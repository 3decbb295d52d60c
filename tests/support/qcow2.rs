//! Just enough of the qcow2 on-disk layout (QEMU's `docs/interop/qcow2.txt`) to read a
//! header and patch fields, so that tests can build precisely corrupted images from valid
//! ones. This is deliberately independent of Strata's own driver.

/// Byte offsets of the header fields (all big-endian).
pub mod field {
    /// `magic` (u32).
    pub const MAGIC: usize = 0;
    /// `version` (u32).
    pub const VERSION: usize = 4;
    /// `backing_file_offset` (u64).
    pub const BACKING_FILE_OFFSET: usize = 8;
    /// `backing_file_size` (u32).
    pub const BACKING_FILE_SIZE: usize = 16;
    /// `cluster_bits` (u32).
    pub const CLUSTER_BITS: usize = 20;
    /// `size` (u64).
    pub const SIZE: usize = 24;
    /// `crypt_method` (u32).
    pub const CRYPT_METHOD: usize = 32;
    /// `l1_size` (u32).
    pub const L1_SIZE: usize = 36;
    /// `l1_table_offset` (u64).
    pub const L1_TABLE_OFFSET: usize = 40;
    /// `refcount_table_offset` (u64).
    pub const REFCOUNT_TABLE_OFFSET: usize = 48;
    /// `refcount_table_clusters` (u32).
    pub const REFCOUNT_TABLE_CLUSTERS: usize = 56;
    /// `nb_snapshots` (u32).
    pub const NB_SNAPSHOTS: usize = 60;
    /// `snapshots_offset` (u64).
    pub const SNAPSHOTS_OFFSET: usize = 64;
    /// `incompatible_features` (u64, version 3).
    pub const INCOMPATIBLE_FEATURES: usize = 72;
    /// `compatible_features` (u64, version 3).
    pub const COMPATIBLE_FEATURES: usize = 80;
    /// `autoclear_features` (u64, version 3).
    pub const AUTOCLEAR_FEATURES: usize = 88;
    /// `refcount_order` (u32, version 3).
    pub const REFCOUNT_ORDER: usize = 96;
    /// `header_length` (u32, version 3).
    pub const HEADER_LENGTH: usize = 100;
}

/// Header extension type: feature name table.
pub const EXT_FEATURE_NAMES: u32 = 0x6803_f857;

/// L2 entry flag: the cluster is compressed.
pub const L2_COMPRESSED: u64 = 1 << 62;
/// L1/L2 entry flag: refcount is exactly one (COPIED).
pub const OFLAG_COPIED: u64 = 1 << 63;

/// Reads a big-endian u32 at `off`.
pub fn get_u32(b: &[u8], off: usize) -> u32 {
    u32::from_be_bytes(b[off..off + 4].try_into().unwrap())
}

/// Reads a big-endian u64 at `off`.
pub fn get_u64(b: &[u8], off: usize) -> u64 {
    u64::from_be_bytes(b[off..off + 8].try_into().unwrap())
}

/// Writes a big-endian u32 at `off`.
pub fn put_u32(b: &mut [u8], off: usize, v: u32) {
    b[off..off + 4].copy_from_slice(&v.to_be_bytes());
}

/// Writes a big-endian u64 at `off`.
pub fn put_u64(b: &mut [u8], off: usize, v: u64) {
    b[off..off + 8].copy_from_slice(&v.to_be_bytes());
}

/// The header fields the tests need.
#[derive(Debug, Clone, Copy)]
pub struct Header {
    /// 2 or 3.
    pub version: u32,
    /// log2 of the cluster size.
    pub cluster_bits: u32,
    /// Virtual size in bytes.
    pub size: u64,
    /// L1 entries.
    pub l1_size: u32,
    /// Host offset of the L1 table.
    pub l1_table_offset: u64,
    /// Host offset of the refcount table.
    pub refcount_table_offset: u64,
    /// Clusters in the refcount table.
    pub refcount_table_clusters: u32,
    /// log2 of the refcount width (4 on version 2).
    pub refcount_order: u32,
    /// Header length (72 on version 2).
    pub header_length: u32,
}

impl Header {
    /// Parses the header at the start of `b`.
    pub fn parse(b: &[u8]) -> Header {
        let version = get_u32(b, field::VERSION);
        let v3 = version >= 3;
        Header {
            version,
            cluster_bits: get_u32(b, field::CLUSTER_BITS),
            size: get_u64(b, field::SIZE),
            l1_size: get_u32(b, field::L1_SIZE),
            l1_table_offset: get_u64(b, field::L1_TABLE_OFFSET),
            refcount_table_offset: get_u64(b, field::REFCOUNT_TABLE_OFFSET),
            refcount_table_clusters: get_u32(b, field::REFCOUNT_TABLE_CLUSTERS),
            refcount_order: if v3 {
                get_u32(b, field::REFCOUNT_ORDER)
            } else {
                4
            },
            header_length: if v3 {
                get_u32(b, field::HEADER_LENGTH)
            } else {
                72
            },
        }
    }

    /// The cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// The host offset of the L2 entry that maps `guest` (None when its L2 table is
    /// unallocated). Standard (not extended) L2 entries only.
    pub fn l2_entry_pos(&self, b: &[u8], guest: u64) -> Option<usize> {
        let cs = self.cluster_size();
        let l2_entries = cs / 8;
        let cluster = guest / cs;
        let l1_index = (cluster / l2_entries) as usize;
        let l1 = get_u64(b, self.l1_table_offset as usize + 8 * l1_index);
        let l2 = l1 & 0x00ff_ffff_ffff_fe00;
        if l2 == 0 {
            return None;
        }
        Some(l2 as usize + 8 * (cluster % l2_entries) as usize)
    }
}

/// The header extensions of a version-3 image, as (type, data) pairs, in order.
pub fn extensions(b: &[u8]) -> Vec<(u32, Vec<u8>)> {
    let h = Header::parse(b);
    let mut pos = h.header_length as usize;
    let mut out = Vec::new();
    while pos + 8 <= b.len() {
        let ty = get_u32(b, pos);
        let len = get_u32(b, pos + 4) as usize;
        if ty == 0 {
            break;
        }
        out.push((ty, b[pos + 8..pos + 8 + len].to_vec()));
        pos += 8 + len.div_ceil(8) * 8;
    }
    out
}

/// Rewrites the header extension area with `exts` (plus the end marker). The backing
/// file name, when there is one, is moved to just after the extensions and the header's
/// pointer to it updated.
pub fn set_extensions(b: &mut [u8], exts: &[(u32, Vec<u8>)]) {
    let h = Header::parse(b);
    let cs = h.cluster_size() as usize;
    let bf_off = get_u64(b, field::BACKING_FILE_OFFSET) as usize;
    let bf_len = get_u32(b, field::BACKING_FILE_SIZE) as usize;
    let backing = (bf_off != 0).then(|| b[bf_off..bf_off + bf_len].to_vec());
    let mut area = Vec::new();
    for (ty, data) in exts {
        area.extend_from_slice(&ty.to_be_bytes());
        area.extend_from_slice(&(data.len() as u32).to_be_bytes());
        area.extend_from_slice(data);
        area.resize(area.len().div_ceil(8) * 8, 0);
    }
    area.extend_from_slice(&[0u8; 8]);
    let start = h.header_length as usize;
    if let Some(name) = &backing {
        put_u64(b, field::BACKING_FILE_OFFSET, (start + area.len()) as u64);
        area.extend_from_slice(name);
    }
    assert!(start + area.len() <= cs, "header extensions do not fit");
    b[start..cs].fill(0);
    b[start..start + area.len()].copy_from_slice(&area);
}

/// One entry of the feature name table extension.
pub fn feature_name_entry(kind: u8, bit: u8, name: &str) -> Vec<u8> {
    let mut e = vec![kind, bit];
    let mut n = name.as_bytes().to_vec();
    n.resize(46, 0);
    e.extend_from_slice(&n);
    e
}

/// Writes a big-endian u16 at `off` (a 16-bit refcount entry).
pub fn put_u16_at(b: &mut [u8], off: usize, v: u16) {
    b[off..off + 2].copy_from_slice(&v.to_be_bytes());
}
