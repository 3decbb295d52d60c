//! The CPU state a kernel is entered with: the GDT, identity page tables, segment and
//! control registers for the 32-bit PVH entry and the 64-bit Linux entry, the FPU and
//! the local APIC's LINT pins.

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_segment, kvm_sregs};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress, GuestMemory};

use super::BootError;

/// Where the GDT is written.
pub const GDT_ADDR: u64 = 0x500;
/// Where the (empty) IDT is written.
pub const IDT_ADDR: u64 = 0x520;
/// The 64-bit entry's PML4.
pub const PML4_ADDR: u64 = 0x9000;
/// The 64-bit entry's page-directory-pointer table.
pub const PDPTE_ADDR: u64 = 0xa000;
/// The 64-bit entry's page directory (512 x 2 MiB = the first GiB).
pub const PDE_ADDR: u64 = 0xb000;
/// How much of guest memory the boot page tables identity-map.
pub const IDENTITY_MAPPED: u64 = 1 << 30;
/// Initial stack pointer of the 64-bit entry.
pub const BOOT_STACK: u64 = 0x8ff0;

/// Code segment selector.
pub const CODE_SEL: u16 = 0x08;
/// Data segment selector.
pub const DATA_SEL: u16 = 0x10;
/// Task state segment selector.
pub const TSS_SEL: u16 = 0x18;

const CR0_PE: u64 = 1;
const CR0_ET: u64 = 1 << 4;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// The mode a kernel is entered in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryMode {
    /// PVH: 32-bit protected mode, paging off, `%ebx` = start_info.
    Pvh,
    /// Linux 64-bit boot protocol: long mode, identity paging, `%rsi` = boot_params.
    Long,
}

/// A GDT descriptor from its flags (access byte in bits 0-7, granularity/size nibble
/// in bits 12-15), base and limit.
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    let base = base as u64;
    let limit = limit as u64;
    ((base & 0xff00_0000) << 32)
        | ((base & 0x00ff_ffff) << 16)
        | (limit & 0xffff)
        | ((limit & 0xf_0000) << 32)
        | (((flags as u64) & 0xf0ff) << 40)
}

/// The KVM segment register a descriptor loads.
pub fn segment(entry: u64, selector: u16) -> kvm_segment {
    let base = ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000);
    let raw_limit = (entry & 0xffff) | ((entry >> 32) & 0xf_0000);
    let g = ((entry >> 55) & 1) as u8;
    let limit = if g == 1 {
        (raw_limit << 12) | 0xfff
    } else {
        raw_limit
    };
    let present = ((entry >> 47) & 1) as u8;
    kvm_segment {
        base,
        limit: limit as u32,
        selector,
        type_: ((entry >> 40) & 0xf) as u8,
        present,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g,
        avl: ((entry >> 52) & 1) as u8,
        unusable: u8::from(present == 0),
        padding: 0,
    }
}

/// The GDT for an entry mode: null, code, data, TSS.
pub fn gdt(mode: EntryMode) -> [u64; 4] {
    match mode {
        EntryMode::Pvh => [
            0,
            gdt_entry(0xc09b, 0, 0xfffff),
            gdt_entry(0xc093, 0, 0xfffff),
            gdt_entry(0x008b, 0, 0x67),
        ],
        EntryMode::Long => [
            0,
            gdt_entry(0xa09b, 0, 0xfffff),
            gdt_entry(0xc093, 0, 0xfffff),
            gdt_entry(0x808b, 0, 0xfffff),
        ],
    }
}

fn write<M: GuestMemory>(mem: &M, addr: u64, v: u64) -> Result<(), BootError> {
    mem.write_obj(v, GuestAddress(addr))
        .map_err(|_| BootError::NoRoom("boot page tables and GDT"))
}

/// Writes the GDT and IDT (and, for long mode, identity page tables for the first
/// GiB) into guest memory and returns the special registers for `mode`.
pub fn setup_sregs<M: GuestMemory>(
    mem: &M,
    mode: EntryMode,
    base: &kvm_sregs,
) -> Result<kvm_sregs, BootError> {
    let table = gdt(mode);
    for (i, e) in table.iter().enumerate() {
        write(mem, GDT_ADDR + 8 * i as u64, *e)?;
    }
    write(mem, IDT_ADDR, 0)?;
    let mut s = *base;
    s.gdt.base = GDT_ADDR;
    s.gdt.limit = (table.len() * 8 - 1) as u16;
    s.idt.base = IDT_ADDR;
    s.idt.limit = 7;
    let code = segment(table[1], CODE_SEL);
    let data = segment(table[2], DATA_SEL);
    s.cs = code;
    s.ds = data;
    s.es = data;
    s.fs = data;
    s.gs = data;
    s.ss = data;
    s.tr = segment(table[3], TSS_SEL);
    match mode {
        EntryMode::Pvh => {
            s.cr0 = CR0_PE | CR0_ET;
            s.cr4 = 0;
            s.efer = 0;
        }
        EntryMode::Long => {
            write(mem, PML4_ADDR, PDPTE_ADDR | 0x03)?;
            write(mem, PDPTE_ADDR, PDE_ADDR | 0x03)?;
            for i in 0..512u64 {
                // Present, writable, 2 MiB page.
                write(mem, PDE_ADDR + i * 8, (i << 21) | 0x83)?;
            }
            s.cr3 = PML4_ADDR;
            s.cr4 |= CR4_PAE;
            s.cr0 |= CR0_PE | CR0_PG | CR0_ET;
            s.efer |= EFER_LME | EFER_LMA;
        }
    }
    Ok(s)
}

/// General registers for the entry: `entry` in `%rip`, `info` (start_info or
/// boot_params) in `%rbx` (PVH) or `%rsi` (64-bit Linux).
pub fn boot_regs(mode: EntryMode, entry: u64, info: u64) -> kvm_regs {
    let mut r = kvm_regs {
        rflags: 0x2,
        rip: entry,
        ..Default::default()
    };
    match mode {
        EntryMode::Pvh => r.rbx = info,
        EntryMode::Long => {
            r.rsi = info;
            r.rsp = BOOT_STACK;
            r.rbp = BOOT_STACK;
        }
    }
    r
}

/// The FPU state at reset (x87 control word and MXCSR defaults).
pub fn boot_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

/// Programs the local APIC's LINT0 as ExtINT and LINT1 as NMI (what firmware does and
/// Linux expects for virtual wire mode).
pub fn setup_lint(vcpu: &VcpuFd) -> Result<(), kvm_ioctls::Error> {
    const LVT0: usize = 0x350;
    const LVT1: usize = 0x360;
    const EXTINT: u32 = 0x7;
    const NMI: u32 = 0x4;
    let mut lapic = vcpu.get_lapic()?;
    for (off, mode) in [(LVT0, EXTINT), (LVT1, NMI)] {
        let bytes: [u8; 4] = std::array::from_fn(|i| lapic.regs[off + i] as u8);
        let v = u32::from_le_bytes(bytes);
        let v = (v & !0x700) | (mode << 8);
        for (i, b) in v.to_le_bytes().iter().enumerate() {
            lapic.regs[off + i] = *b as _;
        }
    }
    vcpu.set_lapic(&lapic)
}

/// Sets up `vcpu` as the boot processor entering the kernel at `entry`.
pub fn setup_boot_vcpu<M: GuestMemory>(
    vcpu: &VcpuFd,
    mem: &M,
    mode: EntryMode,
    entry: u64,
    info: u64,
) -> Result<(), BootError> {
    let sregs = vcpu.get_sregs().map_err(BootError::Kvm)?;
    let sregs = setup_sregs(mem, mode, &sregs)?;
    vcpu.set_sregs(&sregs).map_err(BootError::Kvm)?;
    vcpu.set_regs(&boot_regs(mode, entry, info))
        .map_err(BootError::Kvm)?;
    vcpu.set_fpu(&boot_fpu()).map_err(BootError::Kvm)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory;

    #[test]
    fn flat_segments_decode() {
        let c = segment(gdt_entry(0xc09b, 0, 0xfffff), CODE_SEL);
        assert_eq!(
            (c.base, c.limit, c.type_, c.present),
            (0, 0xffff_ffff, 0xb, 1)
        );
        assert_eq!((c.db, c.l, c.g, c.s), (1, 0, 1, 1));
        let l = segment(gdt_entry(0xa09b, 0, 0xfffff), CODE_SEL);
        assert_eq!((l.db, l.l), (0, 1));
        let t = segment(gdt_entry(0x008b, 0, 0x67), TSS_SEL);
        assert_eq!((t.limit, t.type_, t.s, t.g), (0x67, 0xb, 0, 0));
        let n = segment(0, 0);
        assert_eq!(n.unusable, 1);
    }

    #[test]
    fn long_mode_tables_identity_map_the_first_gib() {
        let mem = memory::create(16 << 20).unwrap();
        let s = setup_sregs(&mem, EntryMode::Long, &kvm_sregs::default()).unwrap();
        assert_eq!(s.cr3, PML4_ADDR);
        assert_ne!(s.cr0 & CR0_PG, 0);
        assert_ne!(s.efer & EFER_LMA, 0);
        let pml4: u64 = mem.read_obj(GuestAddress(PML4_ADDR)).unwrap();
        assert_eq!(pml4 & !0xfff, PDPTE_ADDR);
        let pde: u64 = mem.read_obj(GuestAddress(PDE_ADDR + 8 * 511)).unwrap();
        assert_eq!(pde, (511 << 21) | 0x83);
        let gdt1: u64 = mem.read_obj(GuestAddress(GDT_ADDR + 8)).unwrap();
        assert_eq!(gdt1, gdt(EntryMode::Long)[1]);
    }

    #[test]
    fn pvh_state_is_protected_mode_without_paging() {
        let mem = memory::create(16 << 20).unwrap();
        let s = setup_sregs(&mem, EntryMode::Pvh, &kvm_sregs::default()).unwrap();
        assert_eq!(s.cr0 & (CR0_PE | CR0_PG), CR0_PE);
        assert_eq!(s.efer, 0);
        assert_eq!(s.cs.selector, CODE_SEL);
        assert_eq!(s.cs.db, 1);
        let r = boot_regs(EntryMode::Pvh, 0x10_0000, 0x6000);
        assert_eq!((r.rip, r.rbx, r.rflags), (0x10_0000, 0x6000, 2));
    }
}
