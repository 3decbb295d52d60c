//! The Multiple APIC Description Table (MADT, signature `APIC`).
//!
//! Describes the interrupt controllers KVM's in-kernel irqchip emulates: one local APIC
//! per vCPU (APIC id = vCPU index), the I/O APIC at [`layout::IOAPIC_ADDR`] serving GSIs
//! from 0, the ISA override of IRQ 0 (the PIT) to GSI 2, and LINT1 of every local APIC
//! as NMI.

use super::tables::sdt;
use crate::layout;

/// MADT revision (ACPI 6.3).
pub const MADT_REVISION: u8 = 5;
/// MADT flag: the platform also has dual 8259 PICs (KVM's irqchip emulates them).
pub const PCAT_COMPAT: u32 = 1;
/// Local APIC flag: the processor is enabled.
pub const LAPIC_ENABLED: u32 = 1;
/// I/O APIC id of the I/O APIC.
pub const IOAPIC_ID: u8 = 0;
/// The ISA IRQ the PIT uses, rerouted to [`PIT_GSI`].
pub const PIT_IRQ: u8 = 0;
/// The GSI the I/O APIC receives the PIT on.
pub const PIT_GSI: u32 = 2;

/// Entry type: processor local APIC.
const TYPE_LAPIC: u8 = 0;
/// Entry type: I/O APIC.
const TYPE_IOAPIC: u8 = 1;
/// Entry type: interrupt source override.
const TYPE_INT_SRC_OVERRIDE: u8 = 2;
/// Entry type: local APIC NMI.
const TYPE_LAPIC_NMI: u8 = 4;

/// Builds the MADT for `num_cpus` vCPUs (APIC ids and ACPI processor UIDs 0..num_cpus).
pub fn madt(num_cpus: u8) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&(layout::LAPIC_ADDR as u32).to_le_bytes());
    body.extend_from_slice(&PCAT_COMPAT.to_le_bytes());
    for cpu in 0..num_cpus {
        body.extend_from_slice(&[TYPE_LAPIC, 8, cpu, cpu]);
        body.extend_from_slice(&LAPIC_ENABLED.to_le_bytes());
    }
    body.extend_from_slice(&[TYPE_IOAPIC, 12, IOAPIC_ID, 0]);
    body.extend_from_slice(&(layout::IOAPIC_ADDR as u32).to_le_bytes());
    body.extend_from_slice(&0u32.to_le_bytes()); // GSI base
                                                 // Bus 0 (ISA), source IRQ 0 -> GSI 2, flags 0: polarity and trigger of the ISA bus.
    body.extend_from_slice(&[TYPE_INT_SRC_OVERRIDE, 10, 0, PIT_IRQ]);
    body.extend_from_slice(&PIT_GSI.to_le_bytes());
    body.extend_from_slice(&0u16.to_le_bytes());
    // All processors (UID 0xff): LINT1 is NMI, flags 0 (conforming).
    body.extend_from_slice(&[TYPE_LAPIC_NMI, 6, 0xff, 0, 0, 1]);
    sdt(b"APIC", MADT_REVISION, &body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn madt_bytes_for_two_cpus() {
        let t = madt(2);
        assert_eq!(t.len(), 36 + 8 + 2 * 8 + 12 + 10 + 6);
        assert_eq!(&t[..4], b"APIC");
        assert_eq!(
            u32::from_le_bytes(t[4..8].try_into().unwrap()) as usize,
            t.len()
        );
        assert_eq!(t[8], 5);
        assert_eq!(t.iter().fold(0u8, |a, &b| a.wrapping_add(b)), 0);
        let expected: Vec<u8> = [
            &[0x00, 0x00, 0xe0, 0xfe][..], // local APIC address 0xfee00000
            &[1, 0, 0, 0],                 // PCAT_COMPAT
            &[0, 8, 0, 0, 1, 0, 0, 0],     // CPU 0: UID 0, APIC id 0, enabled
            &[0, 8, 1, 1, 1, 0, 0, 0],     // CPU 1
            &[1, 12, 0, 0, 0x00, 0x00, 0xc0, 0xfe, 0, 0, 0, 0], // I/O APIC
            &[2, 10, 0, 0, 2, 0, 0, 0, 0, 0], // IRQ0 -> GSI2
            &[4, 6, 0xff, 0, 0, 1],        // NMI on LINT1
        ]
        .concat();
        assert_eq!(&t[36..], &expected[..]);
    }

    #[test]
    fn one_entry_per_cpu() {
        for n in [1u8, 4, 254] {
            let t = madt(n);
            let lapics = t[44..]
                .chunks(8)
                .take(n as usize)
                .filter(|e| e[0] == 0 && e[1] == 8)
                .count();
            assert_eq!(lapics, n as usize);
            assert_eq!(t.len(), 36 + 8 + n as usize * 8 + 28);
        }
    }
}
