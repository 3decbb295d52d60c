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
//! * [`memory`]: guest RAM around the MMIO hole, its KVM slots and the e820 map.
//! * [`boot`]: kernel loading (PVH ELF, bzImage), boot structures, entry registers.
//! * [`devices`]: COM1, the ACPI power registers, virtio-mmio disks on block nodes.
//! * [`vcpu`]: vCPU creation and threads, exit dispatch.
//! * [`vm`]: the VM and its lifecycle (running, paused, shutdown).
//! * [`qmp`]: the VM commands and events of the QMP monitor.
//! * [`cli`]: the command line in QEMU's spelling.

pub mod acpi;
pub mod boot;
pub mod cli;
pub mod devices;
pub mod layout;
pub mod memory;
pub mod qmp;
pub mod vcpu;
pub mod vm;
