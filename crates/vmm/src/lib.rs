//! strata-vm: Strata's bundled KVM VMM.
//!
//! A small virtual machine monitor in the style of the rust-vmm reference VMM: KVM through
//! `kvm-ioctls`, guest memory through `vm-memory`, an `event-manager` loop, an 8250
//! serial console and virtio-blk disks (from `strata-virtio-blk`) whose backends are
//! Strata block-graph nodes, so the QMP monitor's block, bitmap, job and backup commands
//! work on a running VM's disks.
//!
//! * [`layout`]: the guest physical memory map, I/O ports and interrupt lines every other
//!   module (boot, ACPI tables, devices) agrees on.
//! * [`acpi`]: the ACPI tables (RSDP, XSDT, FADT, MADT, DSDT) that describe the machine
//!   to the guest.

pub mod acpi;
pub mod layout;
