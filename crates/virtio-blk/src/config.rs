//! Feature bits and the configuration space of a virtio-blk device
//! (virtio 1.2, section 5.2.4 "Device configuration layout").

use crate::SECTOR_SHIFT;

/// Feature bit numbers (virtio 1.2, sections 5.2.3 and 6).
pub mod features {
    /// Maximum size of any single segment is in `size_max`.
    pub const SIZE_MAX: u32 = 1;
    /// Maximum number of segments in a request is in `seg_max`.
    pub const SEG_MAX: u32 = 2;
    /// Disk-style geometry is in `geometry`.
    pub const GEOMETRY: u32 = 4;
    /// The device is read-only.
    pub const RO: u32 = 5;
    /// The block size of the disk is in `blk_size`.
    pub const BLK_SIZE: u32 = 6;
    /// Cache flush command support.
    pub const FLUSH: u32 = 9;
    /// The device exports information on optimal I/O alignment.
    pub const TOPOLOGY: u32 = 10;
    /// The device can toggle its cache between writeback and writethrough modes.
    pub const CONFIG_WCE: u32 = 11;
    /// The device supports more than one virtqueue.
    pub const MQ: u32 = 12;
    /// The device can support discard commands.
    pub const DISCARD: u32 = 13;
    /// The device can support write zeroes commands.
    pub const WRITE_ZEROES: u32 = 14;
    /// Indirect descriptor tables.
    pub const RING_INDIRECT_DESC: u32 = 28;
    /// `used_event` / `avail_event` notification suppression.
    pub const RING_EVENT_IDX: u32 = 29;
    /// Compliance with virtio 1.0 and later.
    pub const VERSION_1: u32 = 32;
}

/// Largest logical block size (QEMU accepts up to 2 MiB).
pub const MAX_LOGICAL_BLOCK_SIZE: u32 = 2 << 20;

/// How a device is set up (the export's or VMM's options).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceOptions {
    /// Serial returned by `GET_ID` (at most 20 bytes are used).
    pub serial: String,
    /// Logical block size in bytes: a power of two, 512..=2 MiB (QEMU's range).
    pub logical_block_size: u32,
    /// Number of request queues (at least 1).
    pub num_queues: u16,
    /// Queue size the transport offers; the chain length limit and `seg_max` follow it.
    pub queue_size: u16,
    /// Refuse writes and offer `VIRTIO_BLK_F_RO`.
    pub read_only: bool,
    /// Offer `VIRTIO_BLK_F_DISCARD`.
    pub discard: bool,
    /// Offer `VIRTIO_BLK_F_WRITE_ZEROES`.
    pub write_zeroes: bool,
    /// Largest discard in sectors.
    pub max_discard_sectors: u32,
    /// Largest write-zeroes in sectors.
    pub max_write_zeroes_sectors: u32,
    /// Segments allowed in one discard / write-zeroes request.
    pub max_dwz_segments: u32,
}

impl Default for DeviceOptions {
    fn default() -> Self {
        DeviceOptions {
            serial: String::new(),
            logical_block_size: 512,
            num_queues: 1,
            queue_size: 128,
            read_only: false,
            discard: true,
            write_zeroes: true,
            max_discard_sectors: 32768,
            max_write_zeroes_sectors: 32768,
            max_dwz_segments: 1,
        }
    }
}

impl DeviceOptions {
    /// Checks the options; returns a message naming the bad one.
    pub fn validate(&self) -> Result<(), String> {
        let bs = self.logical_block_size;
        if !(512..=MAX_LOGICAL_BLOCK_SIZE).contains(&bs) || !bs.is_power_of_two() {
            return Err(format!(
                "parameter logical-block-size must be a power of 2 between 512 and {MAX_LOGICAL_BLOCK_SIZE}"
            ));
        }
        if self.num_queues == 0 {
            return Err("num-queues must be greater than 0".into());
        }
        if self.queue_size < 2 || !self.queue_size.is_power_of_two() {
            return Err(format!(
                "queue size must be a power of two of at least 2, not {}",
                self.queue_size
            ));
        }
        if self.max_dwz_segments == 0 {
            return Err("at least one discard segment is required".into());
        }
        Ok(())
    }

    /// The features the device offers.
    pub fn features(&self) -> u64 {
        use features::*;
        let mut f = [
            VERSION_1,
            SIZE_MAX,
            SEG_MAX,
            BLK_SIZE,
            FLUSH,
            CONFIG_WCE,
            TOPOLOGY,
            MQ,
            RING_EVENT_IDX,
            RING_INDIRECT_DESC,
        ]
        .iter()
        .fold(0u64, |acc, b| acc | (1u64 << b));
        if self.read_only {
            f |= 1 << RO;
        }
        if self.discard && !self.read_only {
            f |= 1 << DISCARD;
        }
        if self.write_zeroes && !self.read_only {
            f |= 1 << WRITE_ZEROES;
        }
        f
    }
}

/// Maximum bytes in one data segment advertised in `size_max`.
pub const SIZE_MAX_BYTES: u32 = 1 << 20;

/// The `struct virtio_blk_config` fields Strata fills in; [`BlkConfig::to_bytes`] lays
/// them out little-endian at the spec's offsets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BlkConfig {
    /// Capacity in 512-byte sectors.
    pub capacity: u64,
    /// Largest segment in bytes.
    pub size_max: u32,
    /// Most data segments in one request.
    pub seg_max: u32,
    /// Geometry: cylinders, heads, sectors (left zero: no geometry offered).
    pub geometry: (u16, u8, u8),
    /// Logical block size.
    pub blk_size: u32,
    /// log2(physical block size / logical block size).
    pub physical_block_exp: u8,
    /// Offset of the first aligned logical block.
    pub alignment_offset: u8,
    /// Suggested minimum I/O size in blocks.
    pub min_io_size: u16,
    /// Optimal I/O size in blocks.
    pub opt_io_size: u32,
    /// Writeback (1) or writethrough (0) cache.
    pub writeback: u8,
    /// Number of request queues.
    pub num_queues: u16,
    /// Largest discard in sectors.
    pub max_discard_sectors: u32,
    /// Most segments in a discard.
    pub max_discard_seg: u32,
    /// Discard alignment in sectors.
    pub discard_sector_alignment: u32,
    /// Largest write-zeroes in sectors.
    pub max_write_zeroes_sectors: u32,
    /// Most segments in a write-zeroes.
    pub max_write_zeroes_seg: u32,
    /// Whether write-zeroes with UNMAP may deallocate.
    pub write_zeroes_may_unmap: u8,
}

/// Size of the virtio 1.2 `virtio_blk_config` structure (including secure-erase and
/// zoned fields, which Strata leaves zero).
pub const CONFIG_SIZE: usize = 96;

/// Offset of the `writeback` byte, the only field a driver may write.
pub const WRITEBACK_OFFSET: usize = 32;

impl BlkConfig {
    /// The configuration for a disk of `size` bytes with `opts`.
    pub fn new(size: u64, opts: &DeviceOptions, writeback: bool) -> Self {
        let bs_sectors = opts.logical_block_size >> SECTOR_SHIFT;
        BlkConfig {
            capacity: size >> SECTOR_SHIFT,
            size_max: SIZE_MAX_BYTES,
            seg_max: u32::from(opts.queue_size).saturating_sub(2).max(1),
            geometry: (0, 0, 0),
            blk_size: opts.logical_block_size,
            physical_block_exp: 0,
            alignment_offset: 0,
            min_io_size: 1,
            opt_io_size: 1,
            writeback: u8::from(writeback),
            num_queues: opts.num_queues,
            max_discard_sectors: opts.max_discard_sectors,
            max_discard_seg: opts.max_dwz_segments,
            discard_sector_alignment: bs_sectors,
            max_write_zeroes_sectors: opts.max_write_zeroes_sectors,
            max_write_zeroes_seg: opts.max_dwz_segments,
            write_zeroes_may_unmap: 1,
        }
    }

    /// The configuration space bytes.
    pub fn to_bytes(&self) -> [u8; CONFIG_SIZE] {
        let mut b = [0u8; CONFIG_SIZE];
        let mut put = |off: usize, v: &[u8]| b[off..off + v.len()].copy_from_slice(v);
        put(0, &self.capacity.to_le_bytes());
        put(8, &self.size_max.to_le_bytes());
        put(12, &self.seg_max.to_le_bytes());
        put(16, &self.geometry.0.to_le_bytes());
        put(18, &[self.geometry.1, self.geometry.2]);
        put(20, &self.blk_size.to_le_bytes());
        put(24, &[self.physical_block_exp, self.alignment_offset]);
        put(26, &self.min_io_size.to_le_bytes());
        put(28, &self.opt_io_size.to_le_bytes());
        put(WRITEBACK_OFFSET, &[self.writeback]);
        put(34, &self.num_queues.to_le_bytes());
        put(36, &self.max_discard_sectors.to_le_bytes());
        put(40, &self.max_discard_seg.to_le_bytes());
        put(44, &self.discard_sector_alignment.to_le_bytes());
        put(48, &self.max_write_zeroes_sectors.to_le_bytes());
        put(52, &self.max_write_zeroes_seg.to_le_bytes());
        put(56, &[self.write_zeroes_may_unmap]);
        b
    }

    /// `len` bytes of the configuration space from `offset`; out-of-range bytes read
    /// as zero (the transport may ask for any window).
    pub fn read(&self, offset: u64, len: usize) -> Vec<u8> {
        let bytes = self.to_bytes();
        let len = len.min(4096);
        (0..len as u64)
            .map(|i| {
                offset
                    .checked_add(i)
                    .and_then(|o| usize::try_from(o).ok())
                    .and_then(|o| bytes.get(o).copied())
                    .unwrap_or(0)
            })
            .collect()
    }
}
