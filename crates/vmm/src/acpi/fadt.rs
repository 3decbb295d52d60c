//! The Fixed ACPI Description Table (FADT, signature `FACP`), revision 6.
//!
//! The platform is "hardware-reduced" ACPI: no PM1/GPE register blocks, no SCI, no FACS.
//! Power-off goes through the sleep control register, reset through the reset register,
//! both 8-bit I/O ports from [`crate::layout`].

use super::tables::{sdt, Gas};
use crate::layout;

/// Total length of a revision 6 FADT (ACPI 6.0 and later).
pub const FADT_LEN: usize = 276;
/// FADT major revision (header revision).
pub const FADT_REVISION: u8 = 6;
/// FADT minor revision (ACPI 6.3).
pub const FADT_MINOR_REVISION: u8 = 3;

/// Preferred PM profile: 4 = "Enterprise Server" (the VM is a server class machine).
pub const PM_PROFILE_ENTERPRISE_SERVER: u8 = 4;

/// `IAPC_BOOT_ARCH`: VGA is not present.
pub const BOOT_ARCH_VGA_NOT_PRESENT: u16 = 1 << 2;
/// `IAPC_BOOT_ARCH`: MSI must not be enabled (there is no PCI bus).
pub const BOOT_ARCH_MSI_NOT_SUPPORTED: u16 = 1 << 3;
/// `IAPC_BOOT_ARCH`: no CMOS RTC at the legacy ports.
pub const BOOT_ARCH_CMOS_RTC_NOT_PRESENT: u16 = 1 << 5;

/// FADT flag: the power button is a control method device, or there is none.
pub const FLAG_PWR_BUTTON: u32 = 1 << 4;
/// FADT flag: the sleep button is a control method device, or there is none.
pub const FLAG_SLP_BUTTON: u32 = 1 << 5;
/// FADT flag: `RESET_REG` is supported.
pub const FLAG_RESET_REG_SUP: u32 = 1 << 10;
/// FADT flag: hardware-reduced ACPI.
pub const FLAG_HW_REDUCED_ACPI: u32 = 1 << 20;

/// The hypervisor vendor identity (all 8 bytes significant).
pub const HYPERVISOR_VENDOR_ID: &[u8; 8] = b"STRATAVM";

/// Field offsets inside the FADT (from the start of the table).
pub mod offset {
    /// `DSDT` (32-bit address).
    pub const DSDT: usize = 40;
    /// `Preferred_PM_Profile`.
    pub const PM_PROFILE: usize = 45;
    /// `IAPC_BOOT_ARCH`.
    pub const IAPC_BOOT_ARCH: usize = 109;
    /// `Flags`.
    pub const FLAGS: usize = 112;
    /// `RESET_REG`.
    pub const RESET_REG: usize = 116;
    /// `RESET_VALUE`.
    pub const RESET_VALUE: usize = 128;
    /// `FADT Minor Version`.
    pub const MINOR_VERSION: usize = 131;
    /// `X_DSDT` (64-bit address).
    pub const X_DSDT: usize = 140;
    /// `SLEEP_CONTROL_REG`.
    pub const SLEEP_CONTROL_REG: usize = 244;
    /// `SLEEP_STATUS_REG`.
    pub const SLEEP_STATUS_REG: usize = 256;
    /// `Hypervisor Vendor Identity`.
    pub const HYPERVISOR_VENDOR_ID: usize = 268;
}

/// Builds the FADT pointing at the DSDT at guest physical address `dsdt`.
pub fn fadt(dsdt: u64) -> Vec<u8> {
    let mut t = vec![0u8; FADT_LEN];
    let mut put = |off: usize, bytes: &[u8]| t[off..off + bytes.len()].copy_from_slice(bytes);
    // FIRMWARE_CTRL / X_FIRMWARE_CTRL stay 0: no FACS on a hardware-reduced platform.
    // The 32-bit DSDT field holds the same address when it fits (ACPICA checks both agree).
    if let Ok(dsdt32) = u32::try_from(dsdt) {
        put(offset::DSDT, &dsdt32.to_le_bytes());
    }
    put(offset::PM_PROFILE, &[PM_PROFILE_ENTERPRISE_SERVER]);
    // SCI_INT, SMI_CMD, ACPI_ENABLE/DISABLE, the PM1/PM2/PM_TMR/GPE blocks: 0 (none).
    let boot_arch =
        BOOT_ARCH_VGA_NOT_PRESENT | BOOT_ARCH_MSI_NOT_SUPPORTED | BOOT_ARCH_CMOS_RTC_NOT_PRESENT;
    put(offset::IAPC_BOOT_ARCH, &boot_arch.to_le_bytes());
    let flags = FLAG_PWR_BUTTON | FLAG_SLP_BUTTON | FLAG_RESET_REG_SUP | FLAG_HW_REDUCED_ACPI;
    put(offset::FLAGS, &flags.to_le_bytes());
    put(
        offset::RESET_REG,
        &Gas::io_port8(layout::ACPI_RESET_PORT).to_bytes(),
    );
    put(offset::RESET_VALUE, &[layout::ACPI_RESET_VALUE]);
    put(offset::MINOR_VERSION, &[FADT_MINOR_REVISION]);
    put(offset::X_DSDT, &dsdt.to_le_bytes());
    put(
        offset::SLEEP_CONTROL_REG,
        &Gas::io_port8(layout::ACPI_SLEEP_CONTROL_PORT).to_bytes(),
    );
    put(
        offset::SLEEP_STATUS_REG,
        &Gas::io_port8(layout::ACPI_SLEEP_STATUS_PORT).to_bytes(),
    );
    put(offset::HYPERVISOR_VENDOR_ID, HYPERVISOR_VENDOR_ID);
    sdt(b"FACP", FADT_REVISION, &t[super::tables::HEADER_LEN..])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn u32_at(t: &[u8], off: usize) -> u32 {
        u32::from_le_bytes(t[off..off + 4].try_into().unwrap())
    }

    #[test]
    fn fadt_fields() {
        let t = fadt(0x000e_1234);
        assert_eq!(t.len(), FADT_LEN);
        assert_eq!(&t[..4], b"FACP");
        assert_eq!(u32_at(&t, 4), 276);
        assert_eq!(t[8], 6);
        assert_eq!(t.iter().fold(0u8, |a, &b| a.wrapping_add(b)), 0);
        assert_eq!(u32_at(&t, 36), 0, "no FACS");
        assert_eq!(u32_at(&t, offset::DSDT), 0xe1234);
        assert_eq!(
            u64::from_le_bytes(t[offset::X_DSDT..offset::X_DSDT + 8].try_into().unwrap()),
            0xe1234
        );
        assert_eq!(t[offset::PM_PROFILE], 4);
        let flags = u32_at(&t, offset::FLAGS);
        assert_ne!(flags & (1 << 20), 0, "HW_REDUCED_ACPI");
        assert_ne!(flags & (1 << 10), 0, "RESET_REG_SUP");
        assert_eq!(
            &t[offset::RESET_REG..offset::RESET_REG + 12],
            &[1, 8, 0, 1, 0x02, 0x06, 0, 0, 0, 0, 0, 0]
        );
        assert_eq!(t[offset::RESET_VALUE], 1);
        assert_eq!(t[offset::MINOR_VERSION], 3);
        assert_eq!(
            &t[offset::SLEEP_CONTROL_REG..offset::SLEEP_CONTROL_REG + 12],
            &[1, 8, 0, 1, 0x00, 0x06, 0, 0, 0, 0, 0, 0]
        );
        assert_eq!(
            &t[offset::SLEEP_STATUS_REG..offset::SLEEP_STATUS_REG + 12],
            &[1, 8, 0, 1, 0x01, 0x06, 0, 0, 0, 0, 0, 0]
        );
        assert_eq!(&t[268..276], b"STRATAVM");
        // No legacy register blocks: PM1a_EVT_BLK .. GPE1_BLK and their X_ forms are 0.
        assert!(t[56..88].iter().all(|&b| b == 0));
        assert!(t[148..244].iter().all(|&b| b == 0));
    }

    #[test]
    fn dsdt_above_4g_only_in_x_dsdt() {
        let t = fadt(0x1_0000_0000);
        assert_eq!(u32_at(&t, offset::DSDT), 0);
        assert_eq!(t[offset::X_DSDT + 4], 1);
    }
}
