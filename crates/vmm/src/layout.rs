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
}
