//! The Linux x86 boot protocol's zero page (`boot_params`) for the 64-bit entry:
//! setup header, command line, initrd, e820 map and the ACPI RSDP address.

use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use vm_memory::{Bytes, GuestAddress};

use super::{BootError, Initrd, CMDLINE_ADDR};
use crate::memory::{self, GuestMemory};

/// Where the zero page is written.
pub const ZERO_PAGE_ADDR: u64 = 0x7000;
const HDRS_MAGIC: u32 = 0x5372_6448;
const BOOT_FLAG: u16 = 0xaa55;
const LOADER_UNDEFINED: u8 = 0xff;
const KERNEL_ALIGNMENT: u32 = 0x0100_0000;

/// A setup header for a kernel that did not bring one (an ELF without PVH note).
pub fn default_header() -> setup_header {
    setup_header {
        header: HDRS_MAGIC,
        boot_flag: BOOT_FLAG,
        kernel_alignment: KERNEL_ALIGNMENT,
        ..Default::default()
    }
}

/// Builds the zero page from `hdr` and writes it; returns its address.
pub fn write_boot_params(
    mem: &GuestMemory,
    hdr: setup_header,
    cmdline_len: u32,
    rsdp: u64,
    initrd: Option<Initrd>,
) -> Result<u64, BootError> {
    let mut p = boot_params {
        hdr,
        ..Default::default()
    };
    p.hdr.type_of_loader = LOADER_UNDEFINED;
    p.hdr.boot_flag = BOOT_FLAG;
    p.hdr.header = HDRS_MAGIC;
    p.hdr.cmd_line_ptr = CMDLINE_ADDR as u32;
    p.hdr.cmdline_size = cmdline_len + 1;
    if p.hdr.kernel_alignment == 0 {
        p.hdr.kernel_alignment = KERNEL_ALIGNMENT;
    }
    if let Some(i) = initrd {
        p.hdr.ramdisk_image = i.addr as u32;
        p.hdr.ramdisk_size = i.size as u32;
    }
    p.acpi_rsdp_addr = rsdp;
    let map = memory::memory_map(mem);
    if map.len() > p.e820_table.len() {
        return Err(BootError::NoRoom("e820 map"));
    }
    for (slot, e) in p.e820_table.iter_mut().zip(&map) {
        *slot = boot_e820_entry {
            addr: e.addr,
            size: e.size,
            r#type: e.kind,
        };
    }
    p.e820_entries = map.len() as u8;
    mem.write_obj(p, GuestAddress(ZERO_PAGE_ADDR))
        .map_err(|_| BootError::NoRoom("zero page"))?;
    Ok(ZERO_PAGE_ADDR)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_page_carries_cmdline_initrd_rsdp_and_e820() {
        let mem = memory::create(64 << 20).unwrap();
        let i = Initrd {
            addr: 0x200_0000,
            size: 4096,
        };
        let a = write_boot_params(&mem, default_header(), 12, 0xe_0000, Some(i)).unwrap();
        let p: boot_params = mem.read_obj(GuestAddress(a)).unwrap();
        let hdr = p.hdr;
        assert_eq!({ hdr.header }, HDRS_MAGIC);
        assert_eq!({ hdr.cmd_line_ptr }, CMDLINE_ADDR as u32);
        assert_eq!({ hdr.cmdline_size }, 13);
        assert_eq!({ hdr.ramdisk_image }, 0x200_0000);
        assert_eq!({ hdr.type_of_loader }, LOADER_UNDEFINED);
        assert_eq!({ p.acpi_rsdp_addr }, 0xe_0000);
        assert_eq!(p.e820_entries, 3);
        let e = p.e820_table[2];
        assert_eq!({ e.addr } + { e.size }, 64 << 20);
    }
}
