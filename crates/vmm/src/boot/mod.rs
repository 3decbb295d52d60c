//! Loading a kernel into guest memory and describing the machine to it.
//!
//! * an ELF `vmlinux` with a PVH note (Xen ELF note 18) is entered by PVH in 32-bit
//!   protected mode with an `hvm_start_info` ([`pvh`]);
//! * a bzImage, or an ELF without the note, is entered at its 64-bit entry point with
//!   a `boot_params` zero page ([`linux`]);
//! * [`regs`] builds the GDT, page tables and register state for either entry.
//!
//! Both paths place the command line, the initrd and the e820 map, and pass the ACPI
//! RSDP address (`start_info.rsdp_paddr` or `boot_params.acpi_rsdp_addr`).

pub mod linux;
pub mod pvh;
pub mod regs;

use std::fs::File;
use std::io::{Seek, SeekFrom};
use std::path::PathBuf;

use linux_loader::loader::{self, bzimage::BzImage, elf::Elf, KernelLoader};
use vm_memory::{Address, Bytes, GuestAddress};

use crate::layout::HIMEM_START;
use crate::memory::{self, GuestMemory};
pub use regs::EntryMode;

/// Where the command line is written.
pub const CMDLINE_ADDR: u64 = 0x2_0000;
/// Longest command line accepted (bytes, without the terminating NUL).
pub const CMDLINE_MAX: usize = 4095;

/// What to boot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootSpec {
    /// The kernel: ELF vmlinux (PVH or 64-bit entry) or bzImage.
    pub kernel: PathBuf,
    /// An initial ramdisk.
    pub initrd: Option<PathBuf>,
    /// The kernel command line.
    pub cmdline: String,
}

/// Where and how the boot vCPU enters the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BootEntry {
    /// The entry mode.
    pub mode: EntryMode,
    /// Entry address.
    pub entry: u64,
    /// Address of the start_info (PVH) or boot_params (64-bit).
    pub info: u64,
}

/// Errors loading a kernel.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// A file could not be opened or read.
    #[error("cannot read {what} {path}: {source}")]
    File {
        /// "kernel" or "initrd".
        what: &'static str,
        /// Its path.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The kernel is neither a loadable ELF nor a bzImage.
    #[error("{path} is not a kernel this VMM can boot (ELF: {elf}; bzImage: {bz})")]
    NotAKernel {
        /// Its path.
        path: String,
        /// Why the ELF loader refused it.
        elf: String,
        /// Why the bzImage loader refused it.
        bz: String,
    },
    /// The command line is too long or contains a NUL byte.
    #[error("invalid kernel command line: {0}")]
    Cmdline(String),
    /// Something does not fit in guest memory.
    #[error("not enough guest memory for the {0}")]
    NoRoom(&'static str),
    /// A KVM call failed while setting up the boot vCPU.
    #[error("KVM: {0}")]
    Kvm(kvm_ioctls::Error),
}

/// The loaded kernel before the boot structures are written.
struct Loaded {
    kind: Kind,
    kernel_end: u64,
}

enum Kind {
    Pvh(u64),
    Elf64(u64),
    BzImage(u64, linux_loader::loader::bootparam::setup_header),
}

fn load_image(mem: &GuestMemory, spec: &BootSpec) -> Result<Loaded, BootError> {
    let path = spec.kernel.display().to_string();
    let file_err = |source| BootError::File {
        what: "kernel",
        path: path.clone(),
        source,
    };
    let mut f = File::open(&spec.kernel).map_err(file_err)?;
    let elf_err = match Elf::load(mem, None, &mut f, Some(GuestAddress(HIMEM_START))) {
        Ok(r) => {
            let kind = match r.pvh_boot_cap {
                loader::elf::PvhBootCapability::PvhEntryPresent(a) => Kind::Pvh(a.raw_value()),
                _ => Kind::Elf64(r.kernel_load.raw_value()),
            };
            if let Kind::Elf64(entry) = kind {
                // Entered in long mode through the boot page tables, which map the
                // first GiB only: beyond, the first instruction would triple-fault,
                // reset, reload the same image and fault again.
                if entry >= regs::IDENTITY_MAPPED {
                    return Err(BootError::NotAKernel {
                        path,
                        elf: format!(
                            "its 64-bit entry {entry:#x} lies beyond the identity-mapped first GiB"
                        ),
                        bz: "not tried".into(),
                    });
                }
            }
            return Ok(Loaded {
                kind,
                kernel_end: r.kernel_end,
            });
        }
        Err(e) => e,
    };
    f.seek(SeekFrom::Start(0)).map_err(file_err)?;
    match BzImage::load(mem, None, &mut f, Some(GuestAddress(HIMEM_START))) {
        Ok(r) => {
            let hdr = r.setup_header.unwrap_or_default();
            // The 64-bit entry at +0x200 exists from boot protocol 2.12 on, when the
            // header's XLF_KERNEL_64 says so.
            let (version, xloadflags) = (hdr.version, hdr.xloadflags);
            if version < 0x20c || xloadflags & 1 == 0 {
                return Err(BootError::NotAKernel {
                    path,
                    elf: elf_err.to_string(),
                    bz: format!(
                        "no 64-bit entry (boot protocol {version:#x}, xloadflags {xloadflags:#x})"
                    ),
                });
            }
            Ok(Loaded {
                kind: Kind::BzImage(r.kernel_load.raw_value() + 0x200, hdr),
                kernel_end: r.kernel_end,
            })
        }
        Err(bz) => Err(BootError::NotAKernel {
            path,
            elf: elf_err.to_string(),
            bz: bz.to_string(),
        }),
    }
}

fn write_cmdline(mem: &GuestMemory, cmdline: &str, max: usize) -> Result<u32, BootError> {
    if cmdline.len() > max {
        return Err(BootError::Cmdline(format!(
            "{} bytes, at most {max} allowed",
            cmdline.len()
        )));
    }
    if cmdline.bytes().any(|b| b == 0) {
        return Err(BootError::Cmdline("contains a NUL byte".into()));
    }
    let mut bytes = cmdline.as_bytes().to_vec();
    bytes.push(0);
    mem.write_slice(&bytes, GuestAddress(CMDLINE_ADDR))
        .map_err(|_| BootError::NoRoom("command line"))?;
    Ok(cmdline.len() as u32)
}

/// An initrd placed in guest memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Initrd {
    /// Guest address.
    pub addr: u64,
    /// Size in bytes.
    pub size: u64,
}

/// Loads the initrd at the highest page-aligned address below `max_end` that stays
/// above `kernel_end`.
fn load_initrd(
    mem: &GuestMemory,
    spec: &BootSpec,
    kernel_end: u64,
    max_end: u64,
) -> Result<Option<Initrd>, BootError> {
    let Some(p) = &spec.initrd else {
        return Ok(None);
    };
    let file_err = |source| BootError::File {
        what: "initrd",
        path: p.display().to_string(),
        source,
    };
    let mut f = File::open(p).map_err(file_err)?;
    let size = f.metadata().map_err(file_err)?.len();
    let top = memory::low_ram_end(mem).min(max_end);
    let addr = top
        .checked_sub(size)
        .map(|a| a & !0xfff)
        .filter(|&a| a >= kernel_end && size > 0)
        .ok_or(BootError::NoRoom("initrd"))?;
    let len = usize::try_from(size).map_err(|_| BootError::NoRoom("initrd"))?;
    mem.read_exact_volatile_from(GuestAddress(addr), &mut f, len)
        .map_err(|e| BootError::File {
            what: "initrd",
            path: p.display().to_string(),
            source: std::io::Error::other(e.to_string()),
        })?;
    Ok(Some(Initrd { addr, size }))
}

/// Loads the kernel, command line and initrd of `spec` into `mem`, writes the boot
/// structures (with `rsdp` as the ACPI root pointer) and returns the entry.
pub fn load(
    mem: &GuestMemory,
    spec: &BootSpec,
    rsdp: Option<GuestAddress>,
) -> Result<BootEntry, BootError> {
    let loaded = load_image(mem, spec)?;
    let rsdp = rsdp.map(|a| a.raw_value()).unwrap_or(0);
    match loaded.kind {
        Kind::Pvh(entry) => {
            write_cmdline(mem, &spec.cmdline, CMDLINE_MAX)?;
            let initrd = load_initrd(mem, spec, loaded.kernel_end, u64::MAX)?;
            let info = pvh::write_start_info(mem, CMDLINE_ADDR, rsdp, initrd)?;
            Ok(BootEntry {
                mode: EntryMode::Pvh,
                entry,
                info,
            })
        }
        Kind::Elf64(entry) => {
            let len = write_cmdline(mem, &spec.cmdline, CMDLINE_MAX)?;
            let initrd = load_initrd(mem, spec, loaded.kernel_end, u64::MAX)?;
            let hdr = linux::default_header();
            let info = linux::write_boot_params(mem, hdr, len, rsdp, initrd)?;
            Ok(BootEntry {
                mode: EntryMode::Long,
                entry,
                info,
            })
        }
        Kind::BzImage(entry, hdr) => {
            let max = if hdr.cmdline_size > 0 {
                (hdr.cmdline_size as usize).min(CMDLINE_MAX)
            } else {
                255
            };
            let len = write_cmdline(mem, &spec.cmdline, max)?;
            let initrd_max = if hdr.version >= 0x203 && hdr.initrd_addr_max != 0 {
                u64::from(hdr.initrd_addr_max) + 1
            } else {
                0x3800_0000
            };
            let initrd = load_initrd(mem, spec, loaded.kernel_end, initrd_max)?;
            let info = linux::write_boot_params(mem, hdr, len, rsdp, initrd)?;
            Ok(BootEntry {
                mode: EntryMode::Long,
                entry,
                info,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(kernel: PathBuf) -> BootSpec {
        BootSpec {
            kernel,
            initrd: None,
            cmdline: "console=ttyS0".into(),
        }
    }

    #[test]
    fn garbage_and_missing_kernels_are_refused() {
        let mem = memory::create(16 << 20).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k");
        std::fs::write(&p, vec![0x5a; 8192]).unwrap();
        let e = load(&mem, &spec(p), None).unwrap_err();
        assert!(matches!(e, BootError::NotAKernel { .. }), "{e}");
        let e = load(&mem, &spec(dir.path().join("nope")), None).unwrap_err();
        assert!(matches!(e, BootError::File { .. }), "{e}");
    }

    /// A minimal ELF64 x86-64 executable: one loadable segment of `len` bytes at
    /// 1 MiB, entry point `entry`, no PVH note.
    fn elf64(entry: u64, len: u64) -> Vec<u8> {
        let mut e = vec![0u8; 64 + 56];
        e[..4].copy_from_slice(b"\x7fELF");
        e[4] = 2; // 64-bit
        e[5] = 1; // little endian
        e[6] = 1; // version
        e[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
        e[18..20].copy_from_slice(&62u16.to_le_bytes()); // EM_X86_64
        e[20..24].copy_from_slice(&1u32.to_le_bytes());
        e[24..32].copy_from_slice(&entry.to_le_bytes());
        e[32..40].copy_from_slice(&64u64.to_le_bytes()); // e_phoff
        e[52..54].copy_from_slice(&64u16.to_le_bytes()); // e_ehsize
        e[54..56].copy_from_slice(&56u16.to_le_bytes()); // e_phentsize
        e[56..58].copy_from_slice(&1u16.to_le_bytes()); // e_phnum
        let ph = &mut e[64..];
        ph[..4].copy_from_slice(&1u32.to_le_bytes()); // PT_LOAD
        ph[8..16].copy_from_slice(&120u64.to_le_bytes()); // p_offset
        ph[16..24].copy_from_slice(&HIMEM_START.to_le_bytes()); // p_vaddr
        ph[24..32].copy_from_slice(&HIMEM_START.to_le_bytes()); // p_paddr
        ph[32..40].copy_from_slice(&len.to_le_bytes()); // p_filesz
        ph[40..48].copy_from_slice(&len.to_le_bytes()); // p_memsz
        e.extend(std::iter::repeat_n(0x90u8, len as usize));
        e
    }

    #[test]
    fn an_elf_entry_beyond_the_mapped_first_gib_is_refused() {
        let mem = memory::create(16 << 20).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k");
        std::fs::write(&p, elf64(HIMEM_START, 4096)).unwrap();
        load(&mem, &spec(p.clone()), None).expect("an entry inside the first GiB boots");
        std::fs::write(&p, elf64(2 << 30, 4096)).unwrap();
        let e = load(&mem, &spec(p), None).unwrap_err();
        assert!(
            e.to_string()
                .contains("beyond the identity-mapped first GiB"),
            "{e}"
        );
    }

    #[test]
    fn command_line_limits() {
        let mem = memory::create(16 << 20).unwrap();
        assert!(write_cmdline(&mem, "a\0b", 100).is_err());
        assert!(write_cmdline(&mem, &"x".repeat(101), 100).is_err());
        assert_eq!(write_cmdline(&mem, "quiet", 100).unwrap(), 5);
        let mut b = [0u8; 6];
        mem.read_slice(&mut b, GuestAddress(CMDLINE_ADDR)).unwrap();
        assert_eq!(&b, b"quiet\0");
    }

    #[test]
    fn initrd_goes_to_the_top_of_low_memory() {
        let mem = memory::create(16 << 20).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("initrd");
        std::fs::write(&p, vec![7u8; 10000]).unwrap();
        let mut s = spec(dir.path().join("k"));
        s.initrd = Some(p);
        let i = load_initrd(&mem, &s, 2 << 20, u64::MAX).unwrap().unwrap();
        assert_eq!(i.size, 10000);
        assert_eq!(i.addr % 4096, 0);
        assert!(i.addr + i.size <= 16 << 20);
        let v: u8 = mem.read_obj(GuestAddress(i.addr + 9999)).unwrap();
        assert_eq!(v, 7);
        // Does not fit above the kernel.
        assert!(load_initrd(&mem, &s, (16 << 20) - 4096, u64::MAX).is_err());
    }
}
