//! strata-virtio-blk: the virtio-blk device model of Strata, independent of the
//! transport that delivers its queues.
//!
//! A transport (the vhost-user-blk export, or the bundled VMM's virtio-pci/mmio
//! device) owns the virtqueues and guest memory; for every available descriptor chain
//! it calls [`VirtioBlk::process_chain`], which parses the request with every
//! guest-controlled value checked, executes it on a [`BlockBackend`] and writes the
//! status byte. The transport then puts the returned head and length on the used ring.
//!
//! * [`config`]: feature bits and the virtio 1.2 configuration space layout.
//! * [`request`]: descriptor chain to typed request, with the spec's error statuses.
//! * [`device`]: execution, the `werror`/`rerror` policy and the io-status.
//! * [`backend`]: the small backend trait and its implementation for
//!   `strata_block::BlockNode`.

pub mod backend;
pub mod config;
pub mod device;
mod direct;
pub mod request;

#[cfg(test)]
mod tests;

pub use backend::{BackendError, BlockBackend};
pub use config::{features, BlkConfig, DeviceOptions};
pub use device::{
    Completion, ErrorAction, ErrorEvent, ErrorSink, IoStatus, Outcome, PendingRequest, VirtioBlk,
};
pub use request::{ParseError, Request, RequestType, Segment};

/// Bytes in a virtio-blk sector (the unit of `sector` fields, whatever the block size).
pub const SECTOR_SIZE: u64 = 512;
/// log2 of [`SECTOR_SIZE`].
pub const SECTOR_SHIFT: u32 = 9;

/// Request status values written to the last byte of a chain.
pub mod status {
    /// Success.
    pub const OK: u8 = 0;
    /// Device or driver error.
    pub const IOERR: u8 = 1;
    /// Request unsupported by the device.
    pub const UNSUPP: u8 = 2;
}
