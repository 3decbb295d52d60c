//! Data transfers straight between the backend and guest memory: the request's
//! segments (already checked to lie in guest memory) become host buffers for the
//! backend's vectored read/write, so nothing is copied through the device. When a
//! segment is not backed by host mappings (e.g. an IOMMU translation fails), the
//! caller falls back to its bounce-buffer path.

use strata_block::{IoBuf, IoBufMut};
use vm_memory::bitmap::Bitmap;
use vm_memory::{GuestMemory, Permissions, VolatileSlice};

use crate::backend::{BackendError, BlockBackend};
use crate::request::Segment;

/// The host slices covering `segs` with `access`, or `None` if some part is not
/// plain host memory.
fn slices<'m, M: GuestMemory + ?Sized>(
    mem: &'m M,
    segs: &[Segment],
    access: Permissions,
) -> Option<Vec<VolatileSlice<'m, vm_memory::bitmap::BS<'m, M::Bitmap>>>> {
    let mut out = Vec::with_capacity(segs.len());
    for s in segs {
        if s.len == 0 {
            continue;
        }
        let it = mem.get_slices(s.addr, s.len as usize, access).ok()?;
        let mut got = 0usize;
        for vs in it {
            let vs = vs.ok()?;
            got += vs.len();
            out.push(vs);
        }
        if got != s.len as usize {
            return None;
        }
    }
    Some(out)
}

/// Reads `[offset, offset + len(segs))` of the backend into the guest buffers.
/// `None`: the buffers cannot be used directly (nothing was read).
pub(crate) fn read<B: BlockBackend + ?Sized, M: GuestMemory + ?Sized>(
    backend: &B,
    mem: &M,
    segs: &[Segment],
    offset: u64,
) -> Option<Result<(), BackendError>> {
    let slices = slices(mem, segs, Permissions::Write)?;
    let guards: Vec<_> = slices.iter().map(|v| v.ptr_guard_mut()).collect();
    let bufs: Vec<IoBufMut<'_>> = guards
        .iter()
        // SAFETY: each guard maps a writable slice of guest memory that stays mapped
        // while `mem` is borrowed (all of this call); the buffers do not outlive it.
        // The guest may change the memory concurrently, which IoBufMut allows.
        .map(|g| unsafe { IoBufMut::from_raw_parts(g.as_ptr(), g.len()) })
        .collect();
    let r = backend.read_vectored(&bufs, offset);
    // Raw-pointer writes bypass dirty tracking: record them.
    for v in &slices {
        v.bitmap().mark_dirty(0, v.len());
    }
    Some(r)
}

/// Writes the guest buffers to the backend at `offset`. `None`: the buffers cannot
/// be used directly (nothing was written).
pub(crate) fn write<B: BlockBackend + ?Sized, M: GuestMemory + ?Sized>(
    backend: &B,
    mem: &M,
    segs: &[Segment],
    offset: u64,
) -> Option<Result<(), BackendError>> {
    let slices = slices(mem, segs, Permissions::Read)?;
    let guards: Vec<_> = slices.iter().map(|v| v.ptr_guard()).collect();
    let bufs: Vec<IoBuf<'_>> = guards
        .iter()
        // SAFETY: each guard maps a readable slice of guest memory that stays mapped
        // while `mem` is borrowed (all of this call); the buffers do not outlive it.
        .map(|g| unsafe { IoBuf::from_raw_parts(g.as_ptr(), g.len()) })
        .collect();
    Some(backend.write_vectored(&bufs, offset))
}
