//! The Differentiated System Description Table (DSDT): the devices a guest cannot probe.
//!
//! In ASL terms it holds:
//!
//! ```text
//! Scope (\_SB) {
//!     Device (C000) { Name (_HID, "ACPI0007") Name (_UID, 0) }      // one per vCPU
//!     Device (COM1) {
//!         Name (_HID, EisaId ("PNP0501")) Name (_UID, 1)
//!         Name (_CRS, ResourceTemplate () { IO (Decode16, 0x3F8, 0x3F8, 0, 8) IRQNoFlags () {4} })
//!     }
//!     Device (V000) {                                                 // one per virtio-mmio device
//!         Name (_HID, "LNRO0005") Name (_UID, 0)
//!         Name (_CRS, ResourceTemplate () {
//!             Memory32Fixed (ReadWrite, base, size)
//!             Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive) { gsi }
//!         })
//!     }
//!     Device (PWRB) { Name (_HID, EisaId ("PNP0C0C")) Name (_UID, 0) }  // with a GED
//!     Device (GED_) {
//!         Name (_HID, "ACPI0013") Name (_UID, 0)
//!         Name (_CRS, ResourceTemplate () {
//!             Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive) { gsi }
//!         })
//!         OperationRegion (EREG, SystemMemory, addr, 4)
//!         Field (EREG, DWordAcc, NoLock, WriteAsZeros) { ESEL, 32 }
//!         Method (_EVT, 1, Serialized) {
//!             Local0 = ESEL                     // reading clears the events
//!             If ((Local0 & 2) == 2) { Notify (PWRB, 0x80) }
//!         }
//!     }
//! }
//! Name (\_S5, Package () { 5, 5, 0, 0 })
//! ```

use super::aml;
use super::tables::sdt;
use super::{AcpiConfig, GedDevice, MmioDevice};
use crate::layout;

/// DSDT revision: 2 means AML integers are 64 bits wide.
pub const DSDT_REVISION: u8 = 2;

/// The `Device (Cnnn)` of vCPU `cpu` (ACPI processor device, `_UID` = MADT processor UID).
fn cpu_device(cpu: u8) -> Vec<u8> {
    let mut body = aml::name("_HID", &aml::string("ACPI0007"));
    body.extend(aml::name("_UID", &aml::integer(u64::from(cpu))));
    aml::device(&format!("C{cpu:03X}"), &body)
}

/// The `Device (COM1)` of the 8250 UART at [`layout::COM1_PORT`].
fn com1_device() -> Vec<u8> {
    let mut body = aml::name("_HID", &aml::eisa_id("PNP0501"));
    body.extend(aml::name("_UID", &aml::integer(1)));
    let irq = u8::try_from(layout::COM1_GSI).expect("COM1 is on an ISA IRQ");
    body.extend(aml::name(
        "_CRS",
        &aml::resource_template(&[
            aml::io_port(layout::COM1_PORT, layout::COM1_PORT, 0, 8),
            aml::irq_no_flags(irq),
        ]),
    ));
    aml::device("COM1", &body)
}

/// The `Device (Vnnn)` of virtio-mmio device `index` (the ACPI id Linux's virtio_mmio
/// driver matches is `LNRO0005`). `dev` has been validated: its window is 32-bit.
fn virtio_mmio_device(index: usize, dev: &MmioDevice) -> Vec<u8> {
    let mut body = aml::name("_HID", &aml::string("LNRO0005"));
    body.extend(aml::name("_UID", &aml::integer(index as u64)));
    body.extend(aml::name(
        "_CRS",
        &aml::resource_template(&[
            aml::memory32_fixed(true, dev.addr as u32, dev.size as u32),
            aml::extended_interrupt(aml::Trigger::Edge, aml::Polarity::High, false, dev.gsi),
        ]),
    ));
    aml::device(&format!("V{index:03X}"), &body)
}

/// `Device (PWRB)`: the ACPI power button (`PNP0C0C`), notified by the GED.
fn power_button() -> Vec<u8> {
    let mut body = aml::name("_HID", &aml::eisa_id("PNP0C0C"));
    body.extend(aml::name("_UID", &aml::integer(0)));
    aml::device("PWRB", &body)
}

/// `Device (GED_)`: the Generic Event Device (`ACPI0013`). On its interrupt the OS runs
/// `_EVT`, which reads the event selector (clearing it) and sends the power button a
/// 0x80 notification (pressed) when [`layout::GED_PWR_DOWN_EVT`] is set.
fn ged_device(g: &GedDevice) -> Vec<u8> {
    let mut body = aml::name("_HID", &aml::string("ACPI0013"));
    body.extend(aml::name("_UID", &aml::integer(0)));
    body.extend(aml::name(
        "_CRS",
        &aml::resource_template(&[aml::extended_interrupt(
            aml::Trigger::Edge,
            aml::Polarity::High,
            false,
            g.gsi,
        )]),
    ));
    body.extend(aml::system_memory_region(
        "EREG",
        g.addr,
        layout::GED_EVT_SEL_LEN,
    ));
    body.extend(aml::dword_field(
        "EREG",
        &[("ESEL", layout::GED_EVT_SEL_LEN as u32 * 8)],
    ));
    let bit = aml::integer(u64::from(layout::GED_PWR_DOWN_EVT));
    let mut evt = aml::store(&aml::name_string("ESEL"), &aml::local0());
    evt.extend(aml::if_then(
        &aml::lequal(&aml::and(&aml::local0(), &bit), &bit),
        &aml::notify("PWRB", 0x80),
    ));
    body.extend(aml::method("_EVT", 1, true, &evt));
    aml::device("GED_", &body)
}

/// `\_S5`: the sleep type the guest writes to the sleep control register to power off.
fn s5() -> Vec<u8> {
    let typ = aml::integer(u64::from(layout::ACPI_S5_SLEEP_TYPE));
    aml::name(
        "\\_S5",
        &aml::package(&[typ.clone(), typ, aml::integer(0), aml::integer(0)]),
    )
}

/// Builds the DSDT for a validated `cfg`.
pub fn dsdt(cfg: &AcpiConfig) -> Vec<u8> {
    let mut sb = Vec::new();
    for cpu in 0..cfg.num_cpus {
        sb.extend(cpu_device(cpu));
    }
    sb.extend(com1_device());
    for (i, dev) in cfg.virtio_mmio.iter().enumerate() {
        sb.extend(virtio_mmio_device(i, dev));
    }
    if let Some(g) = &cfg.ged {
        sb.extend(power_button());
        sb.extend(ged_device(g));
    }
    let mut body = aml::scope("\\_SB_", &sb);
    body.extend(s5());
    sdt(b"DSDT", DSDT_REVISION, &body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn com1_bytes() {
        let d = com1_device();
        let expected: Vec<u8> = [
            &[0x5b, 0x82, 0x2b][..], // Device, PkgLength 43
            b"COM1",
            b"\x08_HID\x0c\x41\xd0\x05\x01", // Name (_HID, EisaId ("PNP0501"))
            b"\x08_UID\x01",                 // Name (_UID, One)
            b"\x08_CRS\x11\x10\x0a\x0d",     // Name (_CRS, Buffer (13) {
            &[0x47, 0x01, 0xf8, 0x03, 0xf8, 0x03, 0x00, 0x08], // IO 0x3f8 len 8
            &[0x22, 0x10, 0x00],             // IRQNoFlags {4}
            &[0x79, 0x00],                   // End tag
        ]
        .concat();
        assert_eq!(d, expected, "{d:02x?}");
        assert_eq!(d.len(), 2 + 0x2b);
    }

    #[test]
    fn virtio_mmio_bytes() {
        let d = virtio_mmio_device(
            1,
            &MmioDevice {
                addr: 0xd000_1000,
                size: 0x1000,
                gsi: 6,
            },
        );
        let expected: Vec<u8> = [
            &[0x5b, 0x82, 0x3a][..], // Device, PkgLength 58
            b"V001",
            b"\x08_HID\x0dLNRO0005\x00",
            b"\x08_UID\x01",
            b"\x08_CRS\x11\x1a\x0a\x17", // Buffer (23)
            &[
                0x86, 0x09, 0x00, 0x01, 0x00, 0x10, 0x00, 0xd0, 0x00, 0x10, 0x00, 0x00,
            ],
            &[0x89, 0x06, 0x00, 0x03, 0x01, 0x06, 0x00, 0x00, 0x00],
            &[0x79, 0x00],
        ]
        .concat();
        assert_eq!(d, expected, "{d:02x?}");
    }

    #[test]
    fn s5_bytes() {
        assert_eq!(
            s5(),
            b"\x08\\_S5_\x12\x08\x04\x0a\x05\x0a\x05\x00\x00".to_vec()
        );
    }

    #[test]
    fn dsdt_structure() {
        let cfg = AcpiConfig {
            num_cpus: 2,
            virtio_mmio: vec![MmioDevice {
                addr: 0xd000_0000,
                size: 0x1000,
                gsi: 5,
            }],
            ged: None,
        };
        let t = dsdt(&cfg);
        assert_eq!(&t[..4], b"DSDT");
        assert_eq!(t[8], 2);
        assert_eq!(
            u32::from_le_bytes(t[4..8].try_into().unwrap()) as usize,
            t.len()
        );
        assert_eq!(t.iter().fold(0u8, |a, &b| a.wrapping_add(b)), 0);
        let body = &t[36..];
        // Scope (\_SB_) with its PkgLength, then the devices in order, then \_S5.
        assert_eq!(body[0], 0x10);
        let sb: Vec<u8> = [
            cpu_device(0),
            cpu_device(1),
            com1_device(),
            virtio_mmio_device(0, &cfg.virtio_mmio[0]),
        ]
        .concat();
        let plen = aml::pkg_length(5 + sb.len());
        assert_eq!(&body[1..1 + plen.len()], &plen[..]);
        let rest = &body[1 + plen.len()..];
        assert_eq!(&rest[..5], b"\\_SB_");
        assert_eq!(&rest[5..5 + sb.len()], &sb[..]);
        assert_eq!(&rest[5 + sb.len()..], &s5()[..]);
    }
}
