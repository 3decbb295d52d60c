//! The ACPI tables the guest firmware would provide: RSDP, XSDT, RSDT, FADT, MADT, DSDT.
//!
//! [`setup_tables`] builds them for an [`AcpiConfig`] and writes them into guest memory in
//! `[layout::ACPI_START, layout::ACPI_END)`, RSDP first at [`layout::ACPI_START`] (where
//! a guest that is not told the RSDP address finds it by scanning). The platform is
//! hardware-reduced ACPI (no SCI, no PM1/GPE blocks): the FADT points at the sleep
//! control/status and reset ports of [`crate::layout`], the MADT describes one local APIC
//! per vCPU and the I/O APIC, and the DSDT describes COM1 and each virtio-mmio device
//! (`LNRO0005`, as Linux's virtio_mmio driver matches it) with its window and GSI.
//!
//! * [`tables`]: header, checksums, RSDP and the root tables.
//! * [`fadt`], [`madt`], [`dsdt`]: the three description tables.
//! * [`aml`]: the small AML encoder the DSDT is written with.

pub mod aml;
pub mod dsdt;
pub mod fadt;
pub mod madt;
pub mod tables;

#[cfg(test)]
mod iasl_tests;

use crate::layout;
use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryError};

/// The most vCPUs the tables describe: APIC ids are 8 bits and 0xff is the broadcast id.
pub const MAX_CPUS: u8 = 254;

/// What the tables describe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcpiConfig {
    /// Number of vCPUs (APIC ids 0..num_cpus).
    pub num_cpus: u8,
    /// The virtio-mmio devices, in order (`_UID` = index).
    pub virtio_mmio: Vec<MmioDevice>,
    /// The Generic Event Device and the power button it notifies, if the machine has
    /// them.
    pub ged: Option<GedDevice>,
}

/// The ACPI Generic Event Device (`ACPI0013`): its 32-bit event selector register
/// (read by `_EVT`, cleared by the read; bit [`layout::GED_PWR_DOWN_EVT`] = power button)
/// and its interrupt line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GedDevice {
    /// Guest physical address of the event selector register (below 4 GiB).
    pub addr: u64,
    /// GSI of its interrupt: edge triggered, active high.
    pub gsi: u32,
}

/// One virtio-mmio device window and its interrupt line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MmioDevice {
    /// Guest physical address of the register window (below 4 GiB).
    pub addr: u64,
    /// Size of the window in bytes.
    pub size: u64,
    /// GSI (I/O APIC pin) of the device: edge triggered, active high.
    pub gsi: u32,
}

/// Why the tables could not be built or written.
#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    /// `num_cpus` is 0 or above [`MAX_CPUS`].
    #[error("ACPI: {0} vCPUs cannot be described (1..={MAX_CPUS})")]
    BadCpuCount(u8),
    /// More virtio-mmio devices than the layout has room for.
    #[error("ACPI: {0} virtio-mmio devices, at most {max} fit", max = layout::VIRTIO_MMIO_MAX)]
    TooManyDevices(usize),
    /// A device window is empty or does not lie below 4 GiB.
    #[error(
        "ACPI: virtio-mmio device {index} window {addr:#x}+{size:#x} is empty or not below 4 GiB"
    )]
    BadWindow {
        /// Index of the device.
        index: usize,
        /// Its address.
        addr: u64,
        /// Its size.
        size: u64,
    },
    /// Two device windows overlap.
    #[error("ACPI: virtio-mmio devices {0} and {1} overlap")]
    Overlap(usize, usize),
    /// The GED's register is not below 4 GiB or its GSI is outside the I/O APIC or used
    /// by another device.
    #[error("ACPI: the Generic Event Device at {addr:#x} cannot use GSI {gsi}")]
    BadGed {
        /// Its register address.
        addr: u64,
        /// Its GSI.
        gsi: u32,
    },
    /// A device GSI is outside the I/O APIC or already used (timer, COM1, another device).
    #[error("ACPI: virtio-mmio device {index} cannot use GSI {gsi}")]
    BadGsi {
        /// Index of the device.
        index: usize,
        /// The GSI asked for.
        gsi: u32,
    },
    /// The tables do not fit in the ACPI area.
    #[error("ACPI: tables need {0} bytes, more than the ACPI area holds")]
    TooLarge(usize),
    /// Writing guest memory failed (the ACPI area is not backed by guest RAM).
    #[error("ACPI: cannot write the tables to guest memory: {0}")]
    GuestMemory(#[from] GuestMemoryError),
}

/// One built table and where it goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Table {
    /// Its signature (`RSD PTR ` is shortened to `RSDP`).
    pub signature: [u8; 4],
    /// Guest physical address.
    pub addr: GuestAddress,
    /// Its bytes, checksums set.
    pub bytes: Vec<u8>,
}

/// Alignment of every table in the ACPI area.
const TABLE_ALIGN: u64 = 16;

fn align_up(v: u64) -> u64 {
    v.div_ceil(TABLE_ALIGN) * TABLE_ALIGN
}

/// Checks `cfg` against the layout; the tables are only built for a valid config.
fn validate(cfg: &AcpiConfig) -> Result<(), AcpiError> {
    if cfg.num_cpus == 0 || cfg.num_cpus > MAX_CPUS {
        return Err(AcpiError::BadCpuCount(cfg.num_cpus));
    }
    if cfg.virtio_mmio.len() > layout::VIRTIO_MMIO_MAX {
        return Err(AcpiError::TooManyDevices(cfg.virtio_mmio.len()));
    }
    for (index, d) in cfg.virtio_mmio.iter().enumerate() {
        let end = d.addr.checked_add(d.size);
        if d.size == 0 || end.is_none_or(|e| e > 1 << 32) {
            return Err(AcpiError::BadWindow {
                index,
                addr: d.addr,
                size: d.size,
            });
        }
        let reserved = [0, madt::PIT_GSI, layout::COM1_GSI];
        if d.gsi >= layout::IOAPIC_PINS || reserved.contains(&d.gsi) {
            return Err(AcpiError::BadGsi { index, gsi: d.gsi });
        }
        for (other, o) in cfg.virtio_mmio[..index].iter().enumerate() {
            if o.gsi == d.gsi {
                return Err(AcpiError::BadGsi { index, gsi: d.gsi });
            }
            if d.addr < o.addr + o.size && o.addr < d.addr + d.size {
                return Err(AcpiError::Overlap(other, index));
            }
        }
    }
    if let Some(g) = cfg.ged {
        let reserved = [0, madt::PIT_GSI, layout::COM1_GSI];
        let bad = g.gsi >= layout::IOAPIC_PINS
            || reserved.contains(&g.gsi)
            || cfg.virtio_mmio.iter().any(|d| d.gsi == g.gsi)
            || g.addr
                .checked_add(layout::GED_EVT_SEL_LEN)
                .is_none_or(|e| e > 1 << 32);
        if bad {
            return Err(AcpiError::BadGed {
                addr: g.addr,
                gsi: g.gsi,
            });
        }
    }
    Ok(())
}

/// Builds all tables for `cfg`, laid out from [`layout::ACPI_START`]: RSDP, XSDT, RSDT,
/// FADT, MADT, DSDT, each 16-byte aligned. Nothing is written anywhere.
pub fn build_tables(cfg: &AcpiConfig) -> Result<Vec<Table>, AcpiError> {
    validate(cfg)?;
    let dsdt = dsdt::dsdt(cfg);
    let madt = madt::madt(cfg.num_cpus);
    // The root tables hold two entries (FADT, MADT); their sizes do not depend on where
    // the tables land.
    let rsdp_addr = layout::ACPI_START;
    let xsdt_addr = align_up(rsdp_addr + tables::RSDP_LEN as u64);
    let rsdt_addr = align_up(xsdt_addr + (tables::HEADER_LEN + 2 * 8) as u64);
    let fadt_addr = align_up(rsdt_addr + (tables::HEADER_LEN + 2 * 4) as u64);
    let madt_addr = align_up(fadt_addr + fadt::FADT_LEN as u64);
    let dsdt_addr = align_up(madt_addr + madt.len() as u64);
    let end = dsdt_addr + dsdt.len() as u64;
    if end > layout::ACPI_END {
        return Err(AcpiError::TooLarge((end - layout::ACPI_START) as usize));
    }
    let fadt = fadt::fadt(dsdt_addr);
    // The ACPI area is below 1 MiB, so every address fits the 32-bit RSDT.
    let xsdt = tables::xsdt(&[fadt_addr, madt_addr]);
    let rsdt = tables::rsdt(&[fadt_addr as u32, madt_addr as u32]);
    let rsdp = tables::rsdp(rsdt_addr as u32, xsdt_addr);
    let table = |signature: &[u8; 4], addr: u64, bytes: Vec<u8>| Table {
        signature: *signature,
        addr: GuestAddress(addr),
        bytes,
    };
    Ok(vec![
        table(b"RSDP", rsdp_addr, rsdp),
        table(b"XSDT", xsdt_addr, xsdt),
        table(b"RSDT", rsdt_addr, rsdt),
        table(b"FACP", fadt_addr, fadt),
        table(b"APIC", madt_addr, madt),
        table(b"DSDT", dsdt_addr, dsdt),
    ])
}

/// Builds the ACPI tables for `cfg` and writes them into `mem`; returns the address of
/// the RSDP (always [`layout::ACPI_START`]) for the PVH start info / boot params.
///
/// A bad `cfg` is rejected before anything is written.
pub fn setup_tables<M: GuestMemory>(mem: &M, cfg: &AcpiConfig) -> Result<GuestAddress, AcpiError> {
    let tables = build_tables(cfg)?;
    for t in &tables {
        mem.write_slice(&t.bytes, t.addr)?;
    }
    tracing::debug!(
        cpus = cfg.num_cpus,
        virtio_mmio = cfg.virtio_mmio.len(),
        "ACPI tables written at {:#x}",
        layout::ACPI_START
    );
    Ok(GuestAddress(layout::ACPI_START))
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    pub(super) fn devices(n: usize) -> Vec<MmioDevice> {
        (0..n)
            .map(|i| MmioDevice {
                addr: layout::virtio_mmio_addr(i),
                size: layout::VIRTIO_MMIO_SIZE,
                gsi: layout::virtio_mmio_gsi(i),
            })
            .collect()
    }

    fn cfg(cpus: u8, disks: usize) -> AcpiConfig {
        AcpiConfig {
            num_cpus: cpus,
            virtio_mmio: devices(disks),
            ged: Some(GedDevice {
                addr: layout::GED_MMIO_ADDR,
                gsi: layout::GED_GSI,
            }),
        }
    }

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, &x| a.wrapping_add(x))
    }

    fn u32_at(b: &[u8], off: usize) -> u32 {
        u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
    }

    fn u64_at(b: &[u8], off: usize) -> u64 {
        u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
    }

    #[test]
    fn written_tables_link_up_and_checksum() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 2 << 20)]).unwrap();
        let rsdp = setup_tables(&mem, &cfg(2, 3)).unwrap();
        assert_eq!(rsdp, GuestAddress(layout::ACPI_START));
        let read = |addr: u64, len: usize| {
            let mut v = vec![0u8; len];
            mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
            v
        };
        let table = |addr: u64| {
            let head = read(addr, 8);
            let t = read(addr, u32_at(&head, 4) as usize);
            assert_eq!(
                sum(&t),
                0,
                "checksum of {:?}",
                String::from_utf8_lossy(&t[..4])
            );
            t
        };
        let r = read(rsdp.0, 36);
        assert_eq!(&r[..8], b"RSD PTR ");
        assert_eq!(sum(&r[..20]), 0);
        assert_eq!(sum(&r), 0);
        let xsdt = table(u64_at(&r, 24));
        assert_eq!(&xsdt[..4], b"XSDT");
        let rsdt = table(u64::from(u32_at(&r, 16)));
        assert_eq!(&rsdt[..4], b"RSDT");
        let entries: Vec<u64> = (36..xsdt.len())
            .step_by(8)
            .map(|o| u64_at(&xsdt, o))
            .collect();
        let entries32: Vec<u64> = (36..rsdt.len())
            .step_by(4)
            .map(|o| u64::from(u32_at(&rsdt, o)))
            .collect();
        assert_eq!(entries, entries32);
        let sigs: Vec<Vec<u8>> = entries.iter().map(|&a| table(a)[..4].to_vec()).collect();
        assert_eq!(sigs, vec![b"FACP".to_vec(), b"APIC".to_vec()]);
        let fadt = table(entries[0]);
        let dsdt_addr = u64_at(&fadt, fadt::offset::X_DSDT);
        assert_eq!(u64::from(u32_at(&fadt, fadt::offset::DSDT)), dsdt_addr);
        let dsdt = table(dsdt_addr);
        assert_eq!(&dsdt[..4], b"DSDT");
        let count = dsdt.windows(9).filter(|w| w == b"LNRO0005\0").count();
        assert_eq!(count, 3);
        assert!(dsdt_addr + dsdt.len() as u64 <= layout::ACPI_END);
    }

    #[test]
    fn tables_are_in_the_area_and_do_not_overlap() {
        let t = build_tables(&cfg(MAX_CPUS, layout::VIRTIO_MMIO_MAX)).unwrap();
        assert_eq!(t[0].addr.0, layout::ACPI_START);
        assert_eq!(t[0].bytes.len(), 36);
        for pair in t.windows(2) {
            assert!(pair[0].addr.0 + pair[0].bytes.len() as u64 <= pair[1].addr.0);
        }
        let last = t.last().unwrap();
        assert!(last.addr.0 + last.bytes.len() as u64 <= layout::ACPI_END);
        for table in &t[1..] {
            assert_eq!(table.addr.0 % 16, 0);
            assert_eq!(&table.bytes[..4], &table.signature);
            assert_eq!(u32_at(&table.bytes, 4) as usize, table.bytes.len());
            assert_eq!(sum(&table.bytes), 0);
        }
    }

    #[test]
    fn bad_configs_are_rejected_and_nothing_is_written() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 2 << 20)]).unwrap();
        let mut bad = Vec::new();
        bad.push(cfg(0, 1));
        bad.push(cfg(255, 1));
        bad.push(cfg(1, layout::VIRTIO_MMIO_MAX + 1));
        let mut clash = cfg(1, 2);
        clash.ged = Some(GedDevice {
            addr: layout::GED_MMIO_ADDR,
            gsi: clash.virtio_mmio[1].gsi,
        });
        bad.push(clash);
        let mut high = cfg(1, 1);
        high.ged = Some(GedDevice {
            addr: 1 << 32,
            gsi: layout::GED_GSI,
        });
        bad.push(high);
        for (field, value) in [
            ("size", 0u64),
            ("addr", 0xffff_f800),
            ("addr", u64::MAX - 10),
            ("gsi", 2),
            ("gsi", 0),
            ("gsi", u64::from(layout::COM1_GSI)),
            ("gsi", u64::from(layout::IOAPIC_PINS)),
            ("gsi", u64::from(layout::virtio_mmio_gsi(0))),
            ("addr", layout::virtio_mmio_addr(0) + 0x800),
        ] {
            let mut c = cfg(1, 2);
            let d = &mut c.virtio_mmio[1];
            match field {
                "size" => d.size = value,
                "addr" => d.addr = value,
                _ => d.gsi = value as u32,
            }
            bad.push(c);
        }
        for c in bad {
            let err = setup_tables(&mem, &c).unwrap_err();
            assert!(!matches!(err, AcpiError::GuestMemory(_)), "{err}");
            let mut area = vec![0u8; (layout::ACPI_END - layout::ACPI_START) as usize];
            mem.read_slice(&mut area, GuestAddress(layout::ACPI_START))
                .unwrap();
            assert!(area.iter().all(|&b| b == 0), "{c:?} wrote memory");
        }
    }

    #[test]
    fn memory_without_the_acpi_area_is_an_error() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x9_f000)]).unwrap();
        let err = setup_tables(&mem, &cfg(1, 1)).unwrap_err();
        assert!(matches!(err, AcpiError::GuestMemory(_)), "{err}");
    }
}
