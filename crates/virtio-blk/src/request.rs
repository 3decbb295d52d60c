//! Descriptor chain to typed virtio-blk request (virtio 1.2, section 5.2.6).
//!
//! A request is a device-readable header (`type: le32, reserved: le32, sector: le64`),
//! device-readable data (OUT, DISCARD, WRITE_ZEROES), device-writable data (IN,
//! GET_ID) and a final device-writable status byte. The device makes no assumption
//! about how these are split into descriptors: the header and data may share or span
//! descriptors, and the status byte is the last writable byte.
//!
//! Parsing checks everything the guest controls: the chain terminates within the
//! queue size (no loops, no index outside the table), readable descriptors precede
//! writable ones, every buffer lies in guest memory with the right access, the header
//! is complete. When the status byte itself cannot be located the chain is dropped
//! (returned with length 0); otherwise the status is IOERR.

use std::ops::Deref;

use virtio_queue::DescriptorChain;
use vm_memory::{Bytes, GuestAddress, GuestMemory, Permissions};

/// Size of the request header.
pub const HEADER_SIZE: u64 = 16;

/// Request types (virtio 1.2, 5.2.6).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestType {
    /// `VIRTIO_BLK_T_IN`: read.
    In,
    /// `VIRTIO_BLK_T_OUT`: write.
    Out,
    /// `VIRTIO_BLK_T_FLUSH`.
    Flush,
    /// `VIRTIO_BLK_T_GET_ID`: the serial.
    GetId,
    /// `VIRTIO_BLK_T_DISCARD`.
    Discard,
    /// `VIRTIO_BLK_T_WRITE_ZEROES`.
    WriteZeroes,
    /// Any other type (answered with UNSUPP).
    Unsupported(u32),
}

impl From<u32> for RequestType {
    fn from(v: u32) -> Self {
        match v {
            0 => RequestType::In,
            1 => RequestType::Out,
            4 => RequestType::Flush,
            8 => RequestType::GetId,
            11 => RequestType::Discard,
            13 => RequestType::WriteZeroes,
            other => RequestType::Unsupported(other),
        }
    }
}

impl RequestType {
    /// Whether the data travels from the device to the driver.
    pub fn device_writes_data(self) -> bool {
        matches!(self, RequestType::In | RequestType::GetId)
    }
}

/// A piece of guest memory, already checked to lie in guest memory with the access
/// the request needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// Guest physical address.
    pub addr: GuestAddress,
    /// Length in bytes.
    pub len: u32,
}

/// A parsed request. It owns no reference to guest memory, so a transport may keep
/// it (for example while the device is stopped by `werror=stop`) and execute it later.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// Head descriptor index, to be returned on the used ring.
    pub head: u16,
    /// The request type.
    pub ty: RequestType,
    /// The `sector` field of the header.
    pub sector: u64,
    /// Data buffers: readable ones for OUT/DISCARD/WRITE_ZEROES, writable ones for
    /// IN/GET_ID (the status byte excluded).
    pub data: Vec<Segment>,
    /// Sum of the data segment lengths.
    pub data_len: u64,
    /// Address of the status byte.
    pub status: GuestAddress,
}

/// Why a chain could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// The chain does not end within the queue (a loop, a `next` outside the table,
    /// an unreadable descriptor table, or more descriptors than the queue size).
    #[error("descriptor chain is malformed or longer than the queue")]
    BrokenChain,
    /// The last descriptor is not writable, is empty, or lies outside guest memory.
    #[error("descriptor chain has no usable status byte")]
    NoStatus,
    /// A readable descriptor follows a writable one.
    #[error("readable descriptor after a writable one")]
    BadOrder {
        /// Where the status byte is.
        status: GuestAddress,
    },
    /// A buffer lies (partly) outside guest memory.
    #[error("descriptor buffer outside guest memory")]
    BadBuffer {
        /// Where the status byte is.
        status: GuestAddress,
    },
    /// Fewer than 16 readable bytes for the header.
    #[error("request header is too short")]
    ShortHeader {
        /// Where the status byte is.
        status: GuestAddress,
    },
}

impl ParseError {
    /// Where to write IOERR, if the status byte was located.
    pub fn status(&self) -> Option<GuestAddress> {
        match self {
            ParseError::BrokenChain | ParseError::NoStatus => None,
            ParseError::BadOrder { status }
            | ParseError::BadBuffer { status }
            | ParseError::ShortHeader { status } => Some(*status),
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Desc {
    addr: GuestAddress,
    len: u32,
    write: bool,
}

/// Takes `skip` bytes off the front and `trim` bytes off the back of a run of
/// descriptors and returns the rest as segments.
fn slice_area(area: &[Desc], mut skip: u64, trim: u64) -> (Vec<Segment>, u64) {
    let total: u64 = area.iter().map(|d| u64::from(d.len)).sum();
    let mut remaining = total.saturating_sub(skip).saturating_sub(trim);
    let out_len = remaining;
    let mut segs = Vec::new();
    for d in area {
        if remaining == 0 {
            break;
        }
        let len = u64::from(d.len);
        if skip >= len {
            skip -= len;
            continue;
        }
        let start = skip;
        skip = 0;
        let take = (len - start).min(remaining);
        remaining -= take;
        if take > 0 {
            segs.push(Segment {
                // Cannot wrap: the whole descriptor was checked to lie in guest memory.
                addr: GuestAddress(d.addr.0.wrapping_add(start)),
                // `take <= d.len`, which is a u32.
                len: take as u32,
            });
        }
    }
    (segs, out_len)
}

/// Copies up to `buf.len()` bytes from the start of `segs` out of guest memory.
fn gather<M: GuestMemory + ?Sized>(mem: &M, segs: &[Segment], buf: &mut [u8]) -> bool {
    let mut done = 0usize;
    for s in segs {
        if done == buf.len() {
            break;
        }
        let n = (s.len as usize).min(buf.len() - done);
        if mem.read_slice(&mut buf[done..done + n], s.addr).is_err() {
            return false;
        }
        done += n;
    }
    done == buf.len()
}

impl Request {
    /// Parses a descriptor chain. `max_descs` is the queue size: a chain (including
    /// an indirect table's entries) may not have more descriptors than that.
    pub fn parse<M>(chain: DescriptorChain<M>, max_descs: u16) -> Result<Request, ParseError>
    where
        M: Deref,
        M::Target: GuestMemory,
    {
        let mut chain = chain;
        let head = chain.head_index();
        let mut descs: Vec<Desc> = Vec::new();
        let mut last_has_next = false;
        for d in &mut chain {
            if descs.len() >= usize::from(max_descs.max(1)) {
                return Err(ParseError::BrokenChain);
            }
            last_has_next = d.has_next();
            descs.push(Desc {
                addr: d.addr(),
                len: d.len(),
                write: d.is_write_only(),
            });
        }
        // The chain iterator stops silently on a loop (its hop budget runs out), on a
        // `next` outside the table and on an unreadable descriptor: in each case the
        // last descriptor it produced still says NEXT.
        if descs.is_empty() || last_has_next {
            return Err(ParseError::BrokenChain);
        }
        let mem = chain.memory();
        let last = descs[descs.len() - 1];
        if !last.write || last.len == 0 {
            return Err(ParseError::NoStatus);
        }
        let status = last
            .addr
            .0
            .checked_add(u64::from(last.len) - 1)
            .map(GuestAddress)
            .ok_or(ParseError::NoStatus)?;
        if !mem.check_range(status, 1, Permissions::Write) {
            return Err(ParseError::NoStatus);
        }
        let n_read = descs.iter().take_while(|d| !d.write).count();
        if descs[n_read..].iter().any(|d| !d.write) {
            return Err(ParseError::BadOrder { status });
        }
        for d in &descs {
            let perm = if d.write {
                Permissions::Write
            } else {
                Permissions::Read
            };
            if d.len > 0 && !mem.check_range(d.addr, d.len as usize, perm) {
                return Err(ParseError::BadBuffer { status });
            }
        }
        let (readable, writable) = descs.split_at(n_read);
        let (hdr_segs, hdr_len) = slice_area(readable, 0, 0);
        if hdr_len < HEADER_SIZE {
            return Err(ParseError::ShortHeader { status });
        }
        let mut hdr = [0u8; HEADER_SIZE as usize];
        if !gather(mem, &hdr_segs, &mut hdr) {
            return Err(ParseError::BadBuffer { status });
        }
        let ty = RequestType::from(u32::from_le_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]));
        let mut sector_bytes = [0u8; 8];
        sector_bytes.copy_from_slice(&hdr[8..16]);
        let sector = u64::from_le_bytes(sector_bytes);
        let (data, data_len) = if ty.device_writes_data() {
            slice_area(writable, 0, 1)
        } else {
            slice_area(readable, HEADER_SIZE, 0)
        };
        Ok(Request {
            head,
            ty,
            sector,
            data,
            data_len,
            status,
        })
    }
}

/// Reads `buf.len()` bytes of request data starting `offset` bytes into `segs`.
pub(crate) fn read_data<M: GuestMemory + ?Sized>(
    mem: &M,
    segs: &[Segment],
    offset: u64,
    buf: &mut [u8],
) -> bool {
    copy_data(segs, offset, buf.len(), |range, addr| {
        mem.read_slice(&mut buf[range], addr).is_ok()
    })
}

/// Writes `buf` into the request data starting `offset` bytes into `segs`.
pub(crate) fn write_data<M: GuestMemory + ?Sized>(
    mem: &M,
    segs: &[Segment],
    offset: u64,
    buf: &[u8],
) -> bool {
    copy_data(segs, offset, buf.len(), |range, addr| {
        mem.write_slice(&buf[range], addr).is_ok()
    })
}

fn copy_data(
    segs: &[Segment],
    mut offset: u64,
    len: usize,
    mut f: impl FnMut(std::ops::Range<usize>, GuestAddress) -> bool,
) -> bool {
    let mut done = 0usize;
    for s in segs {
        if done == len {
            break;
        }
        let slen = u64::from(s.len);
        if offset >= slen {
            offset -= slen;
            continue;
        }
        let avail = (slen - offset) as usize;
        let n = avail.min(len - done);
        let addr = GuestAddress(s.addr.0.wrapping_add(offset));
        offset = 0;
        if !f(done..done + n, addr) {
            return false;
        }
        done += n;
    }
    done == len
}
