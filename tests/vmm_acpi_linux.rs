//! strata-vm's ACPI tables in front of a real Linux, without KVM: QEMU's `microvm`
//! machine (TCG) boots the Debian cloud kernel with the DSDT and MADT that
//! `strata_vm::acpi` builds in place of QEMU's own (Linux's ACPI table upgrade from the
//! initramfs), describing microvm's eight virtio-mmio windows and GSIs.
//!
//! Linux must take both tables, bring up the vCPUs and the I/O APIC the MADT lists,
//! find COM1 (PNP0501) and the virtio-blk disk (LNRO0005, Memory32Fixed + Interrupt) from
//! the DSDT only, do I/O on the disk through the interrupt the DSDT gives, and power off
//! through `_S5`. QEMU's FADT stays (it points at QEMU's DSDT address; the upgrade
//! replaces the table behind it); strata-vm's FADT is checked by the strata-vm boot
//! test and by `iasl`.
//!
//! Needs `qemu-system-x86_64` 10.x and the guest packages; prints SKIP and returns
//! when they are missing.

use std::process::Command;
use std::time::Duration;

use strata_tests::linux_guest::{guest, initrd_with_acpi_tables, line_with, run_vm};
use strata_tests::{qemu, require_qemu, skip_unless, tempdir};
use strata_vm::acpi::{build_tables, AcpiConfig, MmioDevice};

/// microvm's virtio-mmio transports with ACPI on and the second I/O APIC off (QEMU
/// 10's hw/i386/microvm.c): 8 windows of 512 bytes from 0xfeb00000 on GSIs 16..=23.
fn microvm_config(cpus: u8) -> AcpiConfig {
    AcpiConfig {
        num_cpus: cpus,
        virtio_mmio: (0..8u32)
            .map(|i| MmioDevice {
                addr: 0xfeb0_0000 + u64::from(i) * 512,
                size: 512,
                gsi: 16 + i,
            })
            .collect(),
        // microvm has its own GED, elsewhere and with other events; not described.
        ged: None,
    }
}

/// `table` with its OEM revision raised to 2 (Linux only upgrades to a newer table) and
/// its checksum fixed.
fn newer(mut table: Vec<u8>) -> Vec<u8> {
    table[24..28].copy_from_slice(&2u32.to_le_bytes());
    table[9] = 0;
    let sum = table.iter().fold(0u8, |a, &b| a.wrapping_add(b));
    table[9] = 0u8.wrapping_sub(sum);
    table
}

#[test]
fn linux_takes_its_devices_and_interrupt_controllers_from_strata_acpi_tables() {
    require_qemu!();
    let g = skip_unless!(qemu::system_emulator().and_then(|_| guest()));
    let dir = tempdir();
    let cfg = microvm_config(2);
    let tables = build_tables(&cfg).unwrap();
    let get = |sig: &[u8; 4]| {
        newer(
            tables
                .iter()
                .find(|t| &t.signature == sig)
                .unwrap()
                .bytes
                .clone(),
        )
    };
    let initrd = dir.path().join("initrd");
    initrd_with_acpi_tables(
        &g.initrd,
        &[("dsdt.aml", get(b"DSDT")), ("apic.aml", get(b"APIC"))],
        &initrd,
    );
    let disk = dir.path().join("disk.qcow2");
    qemu::img(&["create", "-q", "-f", "qcow2", disk.to_str().unwrap(), "64M"]).ok();

    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args([
        "-M",
        // QEMU's tables carry strata-vm's OEM ids, so ours replace them.
        "microvm,acpi=on,ioapic2=off,x-oem-id=STRATA,x-oem-table-id=STRATAVM",
        "-accel",
        "tcg",
        "-m",
        "256",
        "-smp",
        "2",
        "-nographic",
        "-nodefaults",
        "-no-reboot",
        "-serial",
        "stdio",
        "-kernel",
    ]);
    cmd.arg(&g.bzimage).arg("-initrd").arg(&initrd);
    // A hardware-reduced platform has no PIT clockevent in Linux, and under TCG the
    // kernel's fast TSC calibration against the PIT fails now and then (QEMU's own
    // microvm tables too), leaving no timer; a given TSC rate avoids that.
    cmd.args([
        "-append",
        "console=ttyS0 panic=-1 tsc_early_khz=1000000 strata.run=info,write:0:1,verify:0:1",
        "-drive",
    ]);
    cmd.arg(format!(
        "file={},format=qcow2,if=none,id=d0",
        disk.display()
    ));
    cmd.args(["-device", "virtio-blk-device,drive=d0"]);
    let run = run_vm(cmd, Duration::from_secs(120));
    let log = &run.output;
    println!("{log}");
    assert!(
        run.status.is_some_and(|s| s.success()),
        "QEMU did not power off cleanly within 120 s ({:?}):\n{log}",
        run.status
    );

    // Both tables were taken from the initramfs and are the ones in use.
    line_with(log, "Table Upgrade: override [DSDT-STRATA-STRATAVM]");
    line_with(log, "Table Upgrade: override [APIC-STRATA-STRATAVM]");
    let dsdt = line_with(log, "(v02 STRATA STRATAVM 00000002 STRA 00000001)");
    assert!(dsdt.contains("ACPI: DSDT 0x"), "{dsdt}");
    let madt = line_with(log, "(v05 STRATA STRATAVM 00000002 STRA 00000001)");
    assert!(madt.contains("ACPI: APIC 0x"), "{madt}");
    // The interrupt controllers of the MADT.
    line_with(
        log,
        "ACPI: Using ACPI (MADT) for SMP configuration information",
    );
    line_with(log, "IOAPIC[0]: apic_id 0, version");
    line_with(log, "address 0xfec00000, GSI 0-23");
    line_with(
        log,
        "ACPI: INT_SRC_OVR (bus 0 bus_irq 0 global_irq 2 dfl dfl)",
    );
    line_with(log, "ACPI: LAPIC_NMI (acpi_id[0xff] dfl dfl lint[0x1])");
    line_with(log, "smp: Brought up 1 node, 2 CPUs");
    // _S5 is there, and Linux powered off through it (QEMU exited by itself above).
    line_with(log, "ACPI: PM: (supports S0 S5)");
    // COM1 from the DSDT: the one PnP device, PNP0501 bound by 8250_pnp (IRQ numbers
    // are Linux's own on a hardware-reduced platform, so only the port is checked).
    line_with(log, "pnp: PnP ACPI: found 1 devices");
    line_with(log, "00:00: ttyS0 at I/O 0x3f8 (irq = ");
    for bad in [
        "ACPI Error",
        "ACPI BIOS Error",
        "ACPI Warning",
        "FW_BUG",
        "Firmware Bug",
    ] {
        assert!(!log.contains(bad), "Linux complained ({bad}):\n{log}");
    }
    // The disk: found only through the DSDT (the Debian kernel has no virtio_mmio
    // command-line devices), and its I/O completes through the Interrupt resource.
    line_with(log, "STRATA: info size=67108864 ro=0");
    line_with(log, "STRATA: write ok");
    line_with(log, "STRATA: verify ok");
    line_with(log, "STRATA: done");
    println!("booted, did I/O and powered off in {:?}", run.elapsed);
}
