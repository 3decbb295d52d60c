//! Guest RAM: the regions around the 32-bit MMIO hole, their mapping into KVM, and the
//! e820 map that describes them to the guest.

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use vm_memory::{Address, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::layout::{ACPI_END, ACPI_START, HIMEM_START, LOW_RAM_END, MMIO_GAP_END, MMIO_GAP_START};

/// The guest's RAM.
pub type GuestMemory = vm_memory::GuestMemoryMmap<()>;

/// Smallest RAM size accepted (the boot structures, ACPI tables and a kernel need it).
pub const MIN_MEMORY: u64 = 8 << 20;
/// Largest RAM size accepted (bounded so a typo cannot ask for an absurd mapping).
pub const MAX_MEMORY: u64 = 1 << 40;

/// Errors creating or mapping guest memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// The size is out of range or not page aligned.
    #[error("memory size {0} is invalid: it must be a multiple of 4 KiB between 8 MiB and 1 TiB")]
    BadSize(u64),
    /// The host could not provide the memory.
    #[error("cannot allocate guest memory: {0}")]
    Alloc(String),
    /// KVM refused a memory slot.
    #[error("cannot register guest memory with KVM: {0}")]
    Kvm(kvm_ioctls::Error),
}

/// The (start, length) pairs of RAM for a guest of `size` bytes: below the MMIO hole,
/// and the rest above 4 GiB.
pub fn ram_ranges(size: u64) -> Result<Vec<(GuestAddress, usize)>, MemoryError> {
    if !(MIN_MEMORY..=MAX_MEMORY).contains(&size) || size % 4096 != 0 {
        return Err(MemoryError::BadSize(size));
    }
    let low = size.min(MMIO_GAP_START);
    let mut v = vec![(GuestAddress(0), low as usize)];
    if size > low {
        v.push((GuestAddress(MMIO_GAP_END), (size - low) as usize));
    }
    Ok(v)
}

/// Allocates the guest RAM for `size` bytes.
pub fn create(size: u64) -> Result<GuestMemory, MemoryError> {
    GuestMemory::from_ranges(&ram_ranges(size)?).map_err(|e| MemoryError::Alloc(e.to_string()))
}

/// Registers every region of `mem` as a KVM memory slot.
pub fn register(vm: &VmFd, mem: &GuestMemory) -> Result<(), MemoryError> {
    for (slot, region) in mem.iter().enumerate() {
        let host = mem
            .get_host_address(region.start_addr())
            .map_err(|e| MemoryError::Alloc(e.to_string()))?;
        let r = kvm_userspace_memory_region {
            slot: slot as u32,
            flags: 0,
            guest_phys_addr: region.start_addr().raw_value(),
            memory_size: region.len(),
            userspace_addr: host as u64,
        };
        // SAFETY: the host range belongs to `mem`'s mmap, which outlives the VM (the
        // VM object owns both and drops the VM file descriptor first), and slots do
        // not overlap because the regions do not.
        unsafe { vm.set_user_memory_region(r) }.map_err(MemoryError::Kvm)?;
    }
    Ok(())
}

/// e820 entry types.
pub mod e820 {
    /// Usable RAM.
    pub const RAM: u32 = 1;
    /// Reserved.
    pub const RESERVED: u32 = 2;
}

/// One entry of the memory map given to the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MapEntry {
    /// Start address.
    pub addr: u64,
    /// Length in bytes.
    pub size: u64,
    /// An [`e820`] type.
    pub kind: u32,
}

/// The memory map for `mem`: low RAM up to the EBDA, the reserved BIOS/ACPI area, and
/// RAM from 1 MiB up to the hole and above 4 GiB.
pub fn memory_map<M: GuestMemoryBackend>(mem: &M) -> Vec<MapEntry> {
    let mut v = vec![
        MapEntry {
            addr: 0,
            size: LOW_RAM_END,
            kind: e820::RAM,
        },
        MapEntry {
            addr: ACPI_START,
            size: ACPI_END - ACPI_START,
            kind: e820::RESERVED,
        },
    ];
    for region in mem.iter() {
        let start = region.start_addr().raw_value().max(HIMEM_START);
        let end = region.start_addr().raw_value() + region.len();
        if end > start {
            v.push(MapEntry {
                addr: start,
                size: end - start,
                kind: e820::RAM,
            });
        }
    }
    v
}

/// Highest guest address (exclusive) of RAM below the MMIO hole.
pub fn low_ram_end<M: GuestMemoryBackend>(mem: &M) -> u64 {
    mem.iter()
        .map(|r| r.start_addr().raw_value() + r.len())
        .filter(|&e| e <= MMIO_GAP_START)
        .max()
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_split_around_the_hole() {
        assert_eq!(
            ram_ranges(256 << 20).unwrap(),
            vec![(GuestAddress(0), 256 << 20)]
        );
        let r = ram_ranges(4 << 30).unwrap();
        assert_eq!(r[0], (GuestAddress(0), MMIO_GAP_START as usize));
        assert_eq!(
            r[1],
            (
                GuestAddress(MMIO_GAP_END),
                ((4u64 << 30) - MMIO_GAP_START) as usize
            )
        );
        assert!(ram_ranges(1 << 20).is_err());
        assert!(ram_ranges((64 << 20) + 1).is_err());
        assert!(ram_ranges(u64::MAX).is_err());
    }

    #[test]
    fn map_has_low_ram_reserved_bios_and_high_ram() {
        let mem = create(64 << 20).unwrap();
        let m = memory_map(&mem);
        assert_eq!(m[0].size, LOW_RAM_END);
        assert_eq!(m[1].kind, e820::RESERVED);
        assert_eq!(m[2].addr, HIMEM_START);
        assert_eq!(m[2].addr + m[2].size, 64 << 20);
        assert_eq!(low_ram_end(&mem), 64 << 20);
    }
}
