//! The qcow2 header and its extensions: parsing with every field validated, and
//! serialisation of the first cluster the way QEMU lays it out.

use crate::{Error, Result};

/// The qcow2 magic, "QFI\xfb".
pub const MAGIC: u32 = 0x5146_49fb;

/// Incompatible feature bit: the image was not closed cleanly (refcounts may be wrong).
pub const INCOMPAT_DIRTY: u64 = 1 << 0;
/// Incompatible feature bit: the image is corrupt.
pub const INCOMPAT_CORRUPT: u64 = 1 << 1;
/// Incompatible feature bit: guest data lives in an external data file.
pub const INCOMPAT_DATA_FILE: u64 = 1 << 2;
/// Incompatible feature bit: the compression type field is valid.
pub const INCOMPAT_COMPRESSION: u64 = 1 << 3;
/// Incompatible feature bit: extended L2 entries (subclusters).
pub const INCOMPAT_EXTL2: u64 = 1 << 4;
/// Incompatible bits this driver understands.
pub const INCOMPAT_KNOWN: u64 =
    INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE | INCOMPAT_COMPRESSION | INCOMPAT_EXTL2;
/// Compatible feature bit: lazy refcounts.
pub const COMPAT_LAZY_REFCOUNTS: u64 = 1 << 0;
/// Autoclear bit: the bitmaps extension is consistent.
pub const AUTOCLEAR_BITMAPS: u64 = 1 << 0;
/// Autoclear bit: the external data file is raw.
pub const AUTOCLEAR_DATA_FILE_RAW: u64 = 1 << 1;

/// Header extension: backing file format name.
pub const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
/// Header extension: feature name table.
pub const EXT_FEATURE_TABLE: u32 = 0x6803_f857;
/// Header extension: persistent dirty bitmaps.
pub const EXT_BITMAPS: u32 = 0x2385_2875;
/// Header extension: full disk encryption header pointer.
pub const EXT_CRYPTO: u32 = 0x0537_be77;
/// Header extension: external data file name.
pub const EXT_DATA_FILE: u32 = 0x4441_5441;

/// Largest L1 table QEMU accepts, in bytes.
pub const MAX_L1_BYTES: u64 = 32 << 20;
/// Largest refcount table QEMU accepts, in bytes.
pub const MAX_REFTABLE_BYTES: u64 = 8 << 20;
/// Longest backing file name QEMU accepts.
pub const MAX_BACKING_NAME: u32 = 1023;
/// Largest number of internal snapshots QEMU accepts.
pub const MAX_SNAPSHOTS: u32 = 65536;

/// The names QEMU writes into the feature name table, in its order.
pub const FEATURE_NAMES: &[(u8, u8, &str)] = &[
    (0, 0, "dirty bit"),
    (0, 1, "corrupt bit"),
    (0, 2, "external data file"),
    (0, 3, "compression type"),
    (0, 4, "extended L2 entries"),
    (1, 0, "lazy refcounts"),
    (2, 0, "bitmaps"),
    (2, 1, "raw external data"),
];

/// One header extension kept as raw bytes (extensions this driver does not interpret).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawExtension {
    /// Extension type.
    pub kind: u32,
    /// Extension payload (unpadded).
    pub data: Vec<u8>,
}

/// A parsed qcow2 header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// 2 or 3.
    pub version: u32,
    /// Offset of the backing file name (0 = none).
    pub backing_file_offset: u64,
    /// Length of the backing file name.
    pub backing_file_size: u32,
    /// log2 of the cluster size (9..=21).
    pub cluster_bits: u32,
    /// Virtual disk size in bytes.
    pub size: u64,
    /// 0 = no encryption.
    pub crypt_method: u32,
    /// Entries in the active L1 table.
    pub l1_size: u32,
    /// Offset of the active L1 table.
    pub l1_table_offset: u64,
    /// Offset of the refcount table.
    pub refcount_table_offset: u64,
    /// Clusters occupied by the refcount table.
    pub refcount_table_clusters: u32,
    /// Number of internal snapshots.
    pub nb_snapshots: u32,
    /// Offset of the snapshot table.
    pub snapshots_offset: u64,
    /// Incompatible feature bits.
    pub incompatible_features: u64,
    /// Compatible feature bits.
    pub compatible_features: u64,
    /// Autoclear feature bits.
    pub autoclear_features: u64,
    /// log2 of the refcount width in bits (0..=6).
    pub refcount_order: u32,
    /// Length of the fixed header (72 for v2; 104 or more for v3).
    pub header_length: u32,
    /// 0 = zlib, 1 = zstd.
    pub compression_type: u8,
    /// The backing file name, if any.
    pub backing_file: Option<String>,
    /// The backing file name's bytes as stored (names need not be UTF-8); used when
    /// rewriting the header while `backing_file` still says the same.
    pub backing_file_raw: Option<Vec<u8>>,
    /// The backing format extension, if present.
    pub backing_format: Option<String>,
    /// The external data file name extension, if present.
    pub data_file: Option<String>,
    /// Feature name table entries: (type, bit, name).
    pub feature_names: Vec<(u8, u8, String)>,
    /// The bitmaps extension payload, if present (interpreted by the bitmap layer).
    pub bitmaps_ext: Option<Vec<u8>>,
    /// Extensions not interpreted here, preserved on rewrite.
    pub unknown_extensions: Vec<RawExtension>,
}

fn be32(b: &[u8], off: usize) -> u32 {
    u32::from_be_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
}

fn be64(b: &[u8], off: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[off..off + 8]);
    u64::from_be_bytes(a)
}

fn put32(b: &mut Vec<u8>, v: u32) {
    b.extend_from_slice(&v.to_be_bytes());
}

fn put64(b: &mut Vec<u8>, v: u64) {
    b.extend_from_slice(&v.to_be_bytes());
}

fn cstr(data: &[u8]) -> String {
    let end = data.iter().position(|&c| c == 0).unwrap_or(data.len());
    String::from_utf8_lossy(&data[..end]).into_owned()
}

impl Header {
    /// The cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// The refcount width in bits.
    pub fn refcount_bits(&self) -> u32 {
        1 << self.refcount_order
    }

    /// Whether L2 entries are 128 bits wide (subclusters).
    pub fn extended_l2(&self) -> bool {
        self.incompatible_features & INCOMPAT_EXTL2 != 0
    }

    /// The name of an incompatible feature bit, from the image's feature table if it has one.
    pub fn incompat_name(&self, bit: u8) -> String {
        self.feature_names
            .iter()
            .find(|(t, b, _)| *t == 0 && *b == bit)
            .map(|(_, _, n)| n.clone())
            .unwrap_or_else(|| format!("Unknown incompatible feature: {:x}", 1u64 << bit))
    }

    /// Parses and validates the header from the image's first bytes. `buf` holds at
    /// least the first cluster (or the whole file when that is shorter); `file_size` is
    /// the image file's length.
    pub fn parse(buf: &[u8], file_size: u64) -> Result<Header> {
        if buf.len() < 72 {
            return Err(Error::corrupt(
                "Image is not in qcow2 format (header truncated)",
            ));
        }
        if be32(buf, 0) != MAGIC {
            return Err(Error::corrupt("Image is not in qcow2 format"));
        }
        let version = be32(buf, 4);
        if version != 2 && version != 3 {
            return Err(Error::unsupported(format!(
                "Unsupported qcow2 version {version}"
            )));
        }
        let cluster_bits = be32(buf, 20);
        if !(9..=21).contains(&cluster_bits) {
            return Err(Error::corrupt(format!(
                "Unsupported cluster size: 2^{cluster_bits}"
            )));
        }
        let cs = 1u64 << cluster_bits;
        let mut h = Header {
            version,
            backing_file_offset: be64(buf, 8),
            backing_file_size: be32(buf, 16),
            cluster_bits,
            size: be64(buf, 24),
            crypt_method: be32(buf, 32),
            l1_size: be32(buf, 36),
            l1_table_offset: be64(buf, 40),
            refcount_table_offset: be64(buf, 48),
            refcount_table_clusters: be32(buf, 56),
            nb_snapshots: be32(buf, 60),
            snapshots_offset: be64(buf, 64),
            incompatible_features: 0,
            compatible_features: 0,
            autoclear_features: 0,
            refcount_order: 4,
            header_length: 72,
            compression_type: 0,
            backing_file: None,
            backing_file_raw: None,
            backing_format: None,
            data_file: None,
            feature_names: Vec::new(),
            bitmaps_ext: None,
            unknown_extensions: Vec::new(),
        };
        if version == 3 {
            if buf.len() < 104 {
                return Err(Error::corrupt("qcow2 header truncated"));
            }
            h.incompatible_features = be64(buf, 72);
            h.compatible_features = be64(buf, 80);
            h.autoclear_features = be64(buf, 88);
            h.refcount_order = be32(buf, 96);
            h.header_length = be32(buf, 100);
            if h.header_length < 104 {
                return Err(Error::corrupt("qcow2 header too short"));
            }
            if h.header_length as u64 > cs || h.header_length as usize > buf.len() {
                return Err(Error::corrupt("qcow2 header exceeds cluster size"));
            }
            if h.header_length > 104 {
                h.compression_type = buf[104];
            }
        }
        if h.refcount_order > 6 || (version == 2 && h.refcount_order != 4) {
            return Err(Error::corrupt(format!(
                "Unsupported refcount order {}",
                h.refcount_order
            )));
        }
        if h.crypt_method != 0 {
            return Err(Error::unsupported(
                "Encrypted qcow2 images are not supported",
            ));
        }
        // Header extensions (v2 images may carry them too).
        let ext_start = h.header_length as usize;
        let ext_end = if h.backing_file_offset != 0 && h.backing_file_offset <= cs {
            h.backing_file_offset as usize
        } else {
            cs as usize
        }
        .min(buf.len());
        h.parse_extensions(&buf[ext_start.min(ext_end)..ext_end])?;

        if h.compression_type > 1 {
            return Err(Error::unsupported(format!(
                "Unknown compression type {}",
                h.compression_type
            )));
        }
        if h.compression_type != 0 && h.incompatible_features & INCOMPAT_COMPRESSION == 0 {
            return Err(Error::corrupt(
                "Compression type is set but the compression type bit is not",
            ));
        }
        if h.incompatible_features & INCOMPAT_COMPRESSION != 0 && h.header_length <= 104 {
            return Err(Error::corrupt(
                "Compression type bit is set but the header has no compression type field",
            ));
        }
        let unknown = h.incompatible_features & !INCOMPAT_KNOWN;
        if unknown != 0 {
            let names: Vec<String> = (0..64u8)
                .filter(|b| unknown & (1u64 << b) != 0)
                .map(|b| h.incompat_name(b))
                .collect();
            return Err(Error::unsupported(format!(
                "Unsupported qcow2 feature(s): {}",
                names.join(", ")
            )));
        }
        if h.incompatible_features & INCOMPAT_DATA_FILE != 0 {
            return Err(Error::unsupported(
                "External data files are not supported (incompatible feature: external data file)",
            ));
        }
        if h.extended_l2() && cluster_bits < 14 {
            return Err(Error::corrupt(
                "Extended L2 entries are only supported with cluster sizes of at least 16384 bytes",
            ));
        }

        // Backing file name.
        if h.backing_file_offset != 0 {
            if h.backing_file_size > MAX_BACKING_NAME || h.backing_file_size == 0 {
                return Err(Error::corrupt("Backing file name too long"));
            }
            let start = h.backing_file_offset;
            let end = start
                .checked_add(h.backing_file_size as u64)
                .ok_or_else(|| {
                    Error::corrupt("Backing file name lies outside the first cluster")
                })?;
            if end > cs || end as usize > buf.len() {
                return Err(Error::corrupt(
                    "Backing file name lies outside the first cluster",
                ));
            }
            let raw = buf[start as usize..end as usize].to_vec();
            h.backing_file = Some(String::from_utf8_lossy(&raw).into_owned());
            h.backing_file_raw = Some(raw);
        }

        // Table placement.
        let check_table = |what: &str, off: u64, bytes: u64| -> Result<()> {
            if off % cs != 0 {
                return Err(Error::corrupt(format!("Invalid {what} offset")));
            }
            if bytes > 0 && off == 0 {
                return Err(Error::corrupt(format!("{what} overlaps the image header")));
            }
            if off.checked_add(bytes).is_none_or(|e| e > file_size) {
                return Err(Error::corrupt(format!(
                    "{what} lies beyond the end of the image file"
                )));
            }
            Ok(())
        };
        if h.refcount_table_clusters == 0 {
            return Err(Error::corrupt(
                "Image does not contain a reference count table",
            ));
        }
        let rt_bytes = h.refcount_table_clusters as u64 * cs;
        if rt_bytes > MAX_REFTABLE_BYTES {
            return Err(Error::corrupt("Reference count table too large"));
        }
        check_table("Reference count table", h.refcount_table_offset, rt_bytes)?;
        let l1_bytes = h.l1_size as u64 * 8;
        if l1_bytes > MAX_L1_BYTES {
            return Err(Error::corrupt("Active L1 table too large"));
        }
        check_table("Active L1 table", h.l1_table_offset, l1_bytes)?;
        let l2_bits = cluster_bits - 3 - u32::from(h.extended_l2());
        let per_l1 = 1u64 << (cluster_bits + l2_bits);
        let needed = h.size.div_ceil(per_l1);
        if needed > h.l1_size as u64 {
            return Err(Error::corrupt("L1 table is too small for the image size"));
        }
        if h.size > (1u64 << 62) {
            return Err(Error::corrupt("Image size too large"));
        }
        if h.nb_snapshots > MAX_SNAPSHOTS {
            return Err(Error::corrupt("Too many snapshots"));
        }
        if h.nb_snapshots > 0 {
            check_table("Snapshot table", h.snapshots_offset, 1)?;
        }
        Ok(h)
    }

    fn parse_extensions(&mut self, mut ext: &[u8]) -> Result<()> {
        while ext.len() >= 8 {
            let kind = be32(ext, 0);
            let len = be32(ext, 4) as usize;
            if kind == 0 {
                break;
            }
            let padded = len.div_ceil(8) * 8;
            if 8 + len > ext.len() {
                return Err(Error::corrupt("Header extension too large"));
            }
            let data = &ext[8..8 + len];
            match kind {
                EXT_BACKING_FORMAT => self.backing_format = Some(cstr(data)),
                EXT_DATA_FILE => self.data_file = Some(cstr(data)),
                EXT_FEATURE_TABLE => {
                    for e in data.chunks_exact(48) {
                        self.feature_names.push((e[0], e[1], cstr(&e[2..])));
                    }
                }
                EXT_BITMAPS => self.bitmaps_ext = Some(data.to_vec()),
                EXT_CRYPTO => {
                    return Err(Error::unsupported(
                        "Encrypted qcow2 images are not supported",
                    ))
                }
                _ => self.unknown_extensions.push(RawExtension {
                    kind,
                    data: data.to_vec(),
                }),
            }
            ext = &ext[(8 + padded).min(ext.len())..];
        }
        Ok(())
    }

    /// Serialises the first cluster: fixed header, extensions, end marker and backing
    /// file name, as QEMU lays them out. Updates `backing_file_offset`/`_size` and
    /// `header_length`. Fails if it does not fit in one cluster.
    pub fn serialize(&mut self) -> Result<Vec<u8>> {
        let cs = self.cluster_size() as usize;
        if self.version == 3 {
            self.header_length = 112;
        } else {
            self.header_length = 72;
        }
        let mut ext = Vec::new();
        let push_ext = |ext: &mut Vec<u8>, kind: u32, data: &[u8]| {
            put32(ext, kind);
            put32(ext, data.len() as u32);
            ext.extend_from_slice(data);
            while ext.len() % 8 != 0 {
                ext.push(0);
            }
        };
        if let Some(f) = &self.backing_format {
            push_ext(&mut ext, EXT_BACKING_FORMAT, f.as_bytes());
        }
        if let Some(d) = &self.data_file {
            push_ext(&mut ext, EXT_DATA_FILE, d.as_bytes());
        }
        if self.version == 3 && cs > 4096 {
            let mut t = Vec::with_capacity(FEATURE_NAMES.len() * 48);
            for (kind, bit, name) in FEATURE_NAMES {
                let mut e = [0u8; 48];
                e[0] = *kind;
                e[1] = *bit;
                e[2..2 + name.len()].copy_from_slice(name.as_bytes());
                t.extend_from_slice(&e);
            }
            push_ext(&mut ext, EXT_FEATURE_TABLE, &t);
        }
        if let Some(b) = &self.bitmaps_ext {
            push_ext(&mut ext, EXT_BITMAPS, b);
        }
        for u in &self.unknown_extensions {
            push_ext(&mut ext, u.kind, &u.data);
        }
        put32(&mut ext, 0);
        put32(&mut ext, 0);

        let name: Vec<u8> = match (&self.backing_file, &self.backing_file_raw) {
            (Some(n), Some(raw)) if String::from_utf8_lossy(raw) == n.as_str() => raw.clone(),
            (Some(n), _) => n.as_bytes().to_vec(),
            (None, _) => Vec::new(),
        };
        let total = self.header_length as usize + ext.len() + name.len();
        if total > cs {
            return Err(Error::NoSpace(
                "Header, extensions and backing file name do not fit in the first cluster".into(),
            ));
        }
        if self.backing_file.is_some() {
            self.backing_file_offset = (self.header_length as usize + ext.len()) as u64;
            self.backing_file_size = name.len() as u32;
        } else {
            self.backing_file_offset = 0;
            self.backing_file_size = 0;
        }
        let mut b = Vec::with_capacity(total);
        put32(&mut b, MAGIC);
        put32(&mut b, self.version);
        put64(&mut b, self.backing_file_offset);
        put32(&mut b, self.backing_file_size);
        put32(&mut b, self.cluster_bits);
        put64(&mut b, self.size);
        put32(&mut b, self.crypt_method);
        put32(&mut b, self.l1_size);
        put64(&mut b, self.l1_table_offset);
        put64(&mut b, self.refcount_table_offset);
        put32(&mut b, self.refcount_table_clusters);
        put32(&mut b, self.nb_snapshots);
        put64(&mut b, self.snapshots_offset);
        if self.version == 3 {
            put64(&mut b, self.incompatible_features);
            put64(&mut b, self.compatible_features);
            put64(&mut b, self.autoclear_features);
            put32(&mut b, self.refcount_order);
            put32(&mut b, self.header_length);
            b.push(self.compression_type);
            b.extend_from_slice(&[0u8; 7]);
        }
        b.extend_from_slice(&ext);
        b.extend_from_slice(&name);
        Ok(b)
    }
}

/// Byte offset of the incompatible-features field (v3), for single-field updates.
pub const OFF_INCOMPAT: u64 = 72;
/// Byte offset of the virtual size field.
pub const OFF_SIZE: u64 = 24;
/// Byte offset of the L1 size and offset fields (4 + 8 bytes).
pub const OFF_L1: u64 = 36;
/// Byte offset of the refcount table offset and cluster count (8 + 4 bytes).
pub const OFF_REFTABLE: u64 = 48;
