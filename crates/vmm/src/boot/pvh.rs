//! The PVH boot structures: `hvm_start_info`, its module list (the initrd) and the
//! memory map.

use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use vm_memory::{Bytes, GuestAddress};

use super::{BootError, Initrd};
use crate::memory::{self, GuestMemory};

/// `hvm_start_info.magic`.
pub const START_INFO_MAGIC: u32 = 0x336e_c578;
/// Where the start_info is written.
pub const START_INFO_ADDR: u64 = 0x6000;
/// Where the module list is written (after the start_info).
pub const MODLIST_ADDR: u64 = 0x6040;
/// Where the memory map is written.
pub const MEMMAP_ADDR: u64 = 0x7000;

/// Writes the start_info, module list and memory map; returns the start_info address.
pub fn write_start_info(
    mem: &GuestMemory,
    cmdline: u64,
    rsdp: u64,
    initrd: Option<Initrd>,
) -> Result<u64, BootError> {
    let map = memory::memory_map(mem);
    for (i, e) in map.iter().enumerate() {
        let entry = hvm_memmap_table_entry {
            addr: e.addr,
            size: e.size,
            type_: e.kind,
            reserved: 0,
        };
        mem.write_obj(
            entry,
            GuestAddress(MEMMAP_ADDR + (i * std::mem::size_of::<hvm_memmap_table_entry>()) as u64),
        )
        .map_err(|_| BootError::NoRoom("PVH memory map"))?;
    }
    let mut info = hvm_start_info {
        magic: START_INFO_MAGIC,
        version: 1,
        cmdline_paddr: cmdline,
        rsdp_paddr: rsdp,
        memmap_paddr: MEMMAP_ADDR,
        memmap_entries: map.len() as u32,
        ..Default::default()
    };
    if let Some(i) = initrd {
        let m = hvm_modlist_entry {
            paddr: i.addr,
            size: i.size,
            ..Default::default()
        };
        mem.write_obj(m, GuestAddress(MODLIST_ADDR))
            .map_err(|_| BootError::NoRoom("PVH module list"))?;
        info.nr_modules = 1;
        info.modlist_paddr = MODLIST_ADDR;
    }
    mem.write_obj(info, GuestAddress(START_INFO_ADDR))
        .map_err(|_| BootError::NoRoom("PVH start_info"))?;
    Ok(START_INFO_ADDR)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_info_points_at_cmdline_rsdp_memmap_and_initrd() {
        let mem = memory::create(32 << 20).unwrap();
        let initrd = Initrd {
            addr: 0x100_0000,
            size: 1234,
        };
        let a = write_start_info(&mem, 0x2_0000, 0xe_0000, Some(initrd)).unwrap();
        let info: hvm_start_info = mem.read_obj(GuestAddress(a)).unwrap();
        assert_eq!(info.magic, START_INFO_MAGIC);
        assert_eq!(info.cmdline_paddr, 0x2_0000);
        assert_eq!(info.rsdp_paddr, 0xe_0000);
        assert_eq!(info.nr_modules, 1);
        let m: hvm_modlist_entry = mem.read_obj(GuestAddress(info.modlist_paddr)).unwrap();
        assert_eq!((m.paddr, m.size), (0x100_0000, 1234));
        assert_eq!(info.memmap_entries, 3);
        let last: hvm_memmap_table_entry =
            mem.read_obj(GuestAddress(MEMMAP_ADDR + 2 * 24)).unwrap();
        assert_eq!(last.addr + last.size, 32 << 20);
        assert_eq!(last.type_, memory::e820::RAM);
        // The module list does not overlap the start_info.
        assert!(MODLIST_ADDR >= START_INFO_ADDR + std::mem::size_of::<hvm_start_info>() as u64);
    }
}
