//! The guest's physical address map, port I/O assignments and interrupt lines.
//!
//! Boot code, the ACPI tables and the device manager all read these constants, so the
//! tables the guest sees always describe the devices the VMM really emulates.

/// End of the low conventional memory (the EBDA starts here).
pub const LOW_RAM_END: u64 = 0x9_fc00;
/// Start of the BIOS area that holds the ACPI tables (Linux scans 0xE0000..0x100000
/// for the RSDP signature when no address is passed to it).
pub const ACPI_START: u64 = 0x000e_0000;
/// End (exclusive) of the ACPI table area.
pub const ACPI_END: u64 = 0x0010_0000;
/// Where high memory, and the kernel, start.
pub const HIMEM_START: u64 = 0x0010_0000;

/// Start of the 32-bit MMIO hole below 4 GiB; RAM beyond this address is placed above
/// 4 GiB.
pub const MMIO_GAP_START: u64 = 0xc000_0000;
/// End (exclusive) of the 32-bit MMIO hole.
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;

/// Base of the first virtio-mmio device window; device `i` sits at
/// `VIRTIO_MMIO_BASE + i * VIRTIO_MMIO_SIZE`.
pub const VIRTIO_MMIO_BASE: u64 = 0xd000_0000;
/// Size of one virtio-mmio device window.
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
/// The most virtio-mmio devices the VMM places (GSIs 5..=23 minus COM1's).
pub const VIRTIO_MMIO_MAX: usize = 16;
/// GSI of virtio-mmio device `i` is `VIRTIO_MMIO_GSI_BASE + i` (edge triggered,
/// active high, delivered through the I/O APIC by an irqfd).
pub const VIRTIO_MMIO_GSI_BASE: u32 = 5;

/// The ACPI Generic Event Device's register window (MMIO, right after the last
/// virtio-mmio window). It holds one register, at offset
/// [`GED_EVT_SEL_OFFSET`]: the 32-bit event selector, as in QEMU's GED. A 4-byte read
/// returns the pending event bits ([`GED_PWR_DOWN_EVT`]: the power button was
/// pressed) and clears them; writes and other accesses are ignored (reads as zero).
/// The DSDT's GED reads it in `_EVT` through an `OperationRegion` (SystemMemory).
pub const GED_MMIO_ADDR: u64 = VIRTIO_MMIO_BASE + VIRTIO_MMIO_MAX as u64 * VIRTIO_MMIO_SIZE;
/// Size of the GED's window (one page; only the first 4 bytes are a register).
pub const GED_MMIO_SIZE: u64 = 0x1000;
/// Offset of the event selector register in the GED window.
pub const GED_EVT_SEL_OFFSET: u64 = 0;
/// Length of the event selector register.
pub const GED_EVT_SEL_LEN: u64 = 4;
/// Event selector bit: a power-down request (`system_powerdown`); `_EVT` notifies the
/// power button device (`PNP0C0C`) with 0x80.
pub const GED_PWR_DOWN_EVT: u32 = 0x2;
/// GSI of the GED's interrupt (edge triggered, active high, raised through an irqfd
/// whenever an event bit is set): the last I/O APIC pin, after the virtio-mmio GSIs.
pub const GED_GSI: u32 = 23;

/// Physical address of the I/O APIC.
pub const IOAPIC_ADDR: u64 = 0xfec0_0000;
/// Physical address of the local APICs.
pub const LAPIC_ADDR: u64 = 0xfee0_0000;
/// Number of I/O APIC input pins (KVM's in-kernel I/O APIC).
pub const IOAPIC_PINS: u32 = 24;

/// COM1 (8250 UART) base port.
pub const COM1_PORT: u16 = 0x3f8;
/// COM1 interrupt line.
pub const COM1_GSI: u32 = 4;

/// ACPI hardware-reduced sleep control register (FADT `SLEEP_CONTROL_REG`, 8-bit port).
/// Writing `SLP_EN | (5 << 2)` (0x34: sleep type 5 from the DSDT's `_S5`) powers off.
pub const ACPI_SLEEP_CONTROL_PORT: u16 = 0x600;
/// ACPI hardware-reduced sleep status register (FADT `SLEEP_STATUS_REG`, 8-bit port).
pub const ACPI_SLEEP_STATUS_PORT: u16 = 0x601;
/// ACPI reset register (FADT `RESET_REG`, 8-bit port); writing [`ACPI_RESET_VALUE`] resets.
pub const ACPI_RESET_PORT: u16 = 0x602;
/// Value the FADT tells the guest to write to [`ACPI_RESET_PORT`].
pub const ACPI_RESET_VALUE: u8 = 0x01;
/// Sleep type of `_S5` (soft off) in the DSDT.
pub const ACPI_S5_SLEEP_TYPE: u8 = 5;
/// `SLP_EN` bit of the sleep control register.
pub const ACPI_SLP_EN: u8 = 1 << 5;

/// Address of virtio-mmio device `index`'s register window.
pub const fn virtio_mmio_addr(index: usize) -> u64 {
    VIRTIO_MMIO_BASE + index as u64 * VIRTIO_MMIO_SIZE
}

/// GSI of virtio-mmio device `index`.
pub const fn virtio_mmio_gsi(index: usize) -> u32 {
    VIRTIO_MMIO_GSI_BASE + index as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_fit_in_the_hole_and_the_ioapic() {
        let last = VIRTIO_MMIO_MAX - 1;
        assert!(virtio_mmio_addr(last) + VIRTIO_MMIO_SIZE <= IOAPIC_ADDR);
        assert!(virtio_mmio_addr(0) >= MMIO_GAP_START);
        assert!(virtio_mmio_gsi(last) < IOAPIC_PINS);
        const { assert!(COM1_GSI < VIRTIO_MMIO_GSI_BASE) };
    }

    #[test]
    fn the_ged_has_its_own_window_and_gsi() {
        let last = VIRTIO_MMIO_MAX - 1;
        assert!(GED_MMIO_ADDR >= virtio_mmio_addr(last) + VIRTIO_MMIO_SIZE);
        const { assert!(GED_MMIO_ADDR + GED_MMIO_SIZE <= IOAPIC_ADDR) };
        const { assert!(GED_EVT_SEL_OFFSET + GED_EVT_SEL_LEN <= GED_MMIO_SIZE) };
        assert!(GED_GSI > virtio_mmio_gsi(last) && GED_GSI < IOAPIC_PINS);
        assert_ne!(GED_GSI, COM1_GSI);
    }
}
