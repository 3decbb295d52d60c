//! Linux reaches strata-vm: the Debian cloud kernel boots under `strata-vm` (KVM) and
//! its console shows that it got what the VMM gave it: its version, the command line,
//! the e820 map (compared with `strata_vm::memory::memory_map`), the ACPI tables at the
//! addresses and lengths `strata_vm::acpi::build_tables` lays out, and the interrupt
//! controllers and CPUs of the MADT.
//!
//! On a host whose KVM is `kvm_pvm` (kernel mode emulated one instruction at a time)
//! Linux gets this far and then stops on an instruction the emulator does not handle;
//! the checks only need the early boot. On a host with hardware KVM the guest goes on to
//! userspace, where `/init` reports its virtio-mmio disk and powers off; the test then
//! checks that too.
//!
//! * PVH (the ELF vmlinux): ~20 s on the CI host, runs in CI.
//! * bzImage (x86 boot protocol): 80-150 s in the decompressor on the CI host, so it is ignored by
//!   default: `cargo test --release -p strata-tests --test vmm_linux -- --ignored`.
//!
//! Each test prints a SKIP reason and returns when `/dev/kvm` or the guest packages are
//! missing.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use strata_tests::linux_guest::{guest, line_with, run_vm};
use strata_tests::{kvm, qemu, require_qemu, s, skip_unless, strata_vm_bin, tempdir};
use strata_vm::acpi::{build_tables, AcpiConfig, MmioDevice};
use strata_vm::layout;
use strata_vm::memory::{self, e820};

/// Guest RAM.
const MEMORY: u64 = 256 << 20;
/// vCPUs.
const CPUS: u8 = 2;

/// One e820 line as Linux prints it: `BIOS-e820: [mem 0xSTART-0xEND] TYPE`.
fn parse_e820(line: &str) -> Option<(u64, u64, String)> {
    let rest = line.split("BIOS-e820: [mem 0x").nth(1)?;
    let (start, rest) = rest.split_once("-0x")?;
    let (end, kind) = rest.split_once("] ")?;
    Some((
        u64::from_str_radix(start, 16).ok()?,
        u64::from_str_radix(end, 16).ok()? + 1,
        kind.trim().to_string(),
    ))
}

/// Boots `kernel` and checks the console; `deadline` bounds the run.
fn boot_and_check(kernel: &Path, deadline: Duration) {
    let g = guest().expect("checked by the caller");
    let dir = tempdir();
    let disk = dir.path().join("disk.qcow2");
    qemu::img(&["create", "-q", "-f", "qcow2", s(&disk), "64M"]).ok();
    // A word the kernel cannot have made up, to find the command line as given.
    let cmdline = "console=ttyS0 earlyprintk=ttyS0 panic=-1 strata.run=info strata.seed=4242";
    let mut cmd = Command::new(strata_vm_bin());
    cmd.arg("--kernel")
        .arg(kernel)
        .arg("--initrd")
        .arg(&g.initrd)
        .args(["--append", cmdline])
        .args(["-m", &format!("{}M", MEMORY >> 20)])
        .args(["--smp", &CPUS.to_string()])
        .arg("--drive")
        .arg(format!("file={},format=qcow2,if=virtio,id=d0", s(&disk)))
        .args(["--serial", "stdio", "--no-reboot"]);
    let run = run_vm(cmd, deadline);
    let log = &run.output;
    println!("{log}");
    println!("strata-vm ran {:?}, exit {:?}", run.elapsed, run.status);
    assert!(
        run.status.is_some(),
        "strata-vm neither finished nor failed within {deadline:?}:\n{log}"
    );

    // The kernel and the command line it was given.
    line_with(log, "Linux version 6.");
    line_with(log, &format!("Command line: {cmdline}"));

    // The e820 map: Linux's usable ranges are exactly the VMM's RAM, and the VMM's
    // reserved BIOS/ACPI area lies in a range Linux keeps reserved (a PVH kernel adds
    // the ISA hole 0xa0000..0x100000 itself).
    let mem = memory::create(MEMORY).unwrap();
    let map = memory::memory_map(&mem);
    let printed: Vec<(u64, u64, String)> = log.lines().filter_map(parse_e820).collect();
    assert!(!printed.is_empty(), "no BIOS-e820 lines:\n{log}");
    let usable: Vec<(u64, u64)> = printed
        .iter()
        .filter(|e| e.2 == "usable")
        .map(|e| (e.0, e.1))
        .collect();
    let ram: Vec<(u64, u64)> = map
        .iter()
        .filter(|e| e.kind == e820::RAM)
        .map(|e| (e.addr, e.addr + e.size))
        .collect();
    assert_eq!(usable, ram, "usable e820 ranges:\n{log}");
    for r in map.iter().filter(|e| e.kind == e820::RESERVED) {
        assert!(
            printed
                .iter()
                .any(|e| e.2 == "reserved" && e.0 <= r.addr && r.addr + r.size <= e.1),
            "reserved {:#x}+{:#x} is not reserved for Linux:\n{log}",
            r.addr,
            r.size
        );
    }

    // The ACPI tables, where and as long as the VMM lays them out for 2 vCPUs and one
    // disk.
    let tables = build_tables(&AcpiConfig {
        num_cpus: CPUS,
        virtio_mmio: vec![MmioDevice {
            addr: layout::virtio_mmio_addr(0),
            size: layout::VIRTIO_MMIO_SIZE,
            gsi: layout::virtio_mmio_gsi(0),
        }],
        ged: Some(strata_vm::acpi::GedDevice {
            addr: layout::GED_MMIO_ADDR,
            gsi: layout::GED_GSI,
        }),
    })
    .unwrap();
    // (Linux reads the XSDT; the RSDT is only there for 32-bit-only readers.)
    for t in tables.iter().filter(|t| &t.signature != b"RSDT") {
        let (sig, rev) = match &t.signature {
            b"RSDP" => ("RSDP", 2),
            sig => (std::str::from_utf8(sig).unwrap(), t.bytes[8]),
        };
        let line = line_with(
            log,
            &format!(
                "ACPI: {sig} 0x{:016X} {:06X} (v{rev:02} STRATA",
                t.addr.0,
                t.bytes.len()
            ),
        );
        if sig != "RSDP" {
            assert!(
                line.contains("STRATA STRATAVM 00000001 STRA 00000001)"),
                "{line}"
            );
        }
    }
    assert_eq!(
        tables[0].addr.0,
        layout::ACPI_START,
        "the RSDP is where Linux was told"
    );

    // The interrupt controllers and CPUs of the MADT.
    line_with(log, "ACPI: LAPIC_NMI (acpi_id[0xff] dfl dfl lint[0x1])");
    let ioapic = line_with(log, "IOAPIC[0]: apic_id 0, version ");
    assert!(
        ioapic.ends_with(&format!(
            "address 0x{:x}, GSI 0-{}",
            layout::IOAPIC_ADDR,
            layout::IOAPIC_PINS - 1
        )),
        "{ioapic}"
    );
    line_with(
        log,
        "ACPI: INT_SRC_OVR (bus 0 bus_irq 0 global_irq 2 dfl dfl)",
    );
    line_with(
        log,
        "ACPI: Using ACPI (MADT) for SMP configuration information",
    );
    line_with(
        log,
        &format!("smpboot: Allowing {CPUS} CPUs, 0 hotplug CPUs"),
    );

    // Decided by whether the kernel handed over to userspace, not by the guest's own
    // success report: a guest that reaches /init must then also finish its work.
    if log.contains("Run /init as init process") || log.contains("STRATA:") {
        // Hardware KVM: the guest reached userspace; it must find its disk and power off.
        assert!(
            log.contains("STRATA: done"),
            "userspace did not finish: {log}"
        );
        line_with(log, "STRATA: info size=67108864 ro=0");
        assert!(run.status.is_some_and(|s| s.success()), "{log}");
    } else {
        let last_kernel_line = log.lines().rev().find(|l| l.starts_with('[')).unwrap_or("");
        println!(
            "NOTE: the guest stopped in early boot (expected where KVM is kvm_pvm) after \
             {last_kernel_line:?}"
        );
    }
}

macro_rules! require_linux_vm {
    () => {
        require_qemu!();
        skip_unless!(kvm().and_then(|_| guest()));
    };
}

#[test]
fn debian_vmlinux_boots_by_pvh_with_strata_acpi_tables() {
    require_linux_vm!();
    let g = guest().unwrap();
    let Some(vmlinux) = &g.vmlinux else {
        eprintln!("SKIP: lz4 is not installed, so the guest build extracted no vmlinux");
        return;
    };
    boot_and_check(vmlinux, Duration::from_secs(120));
}

#[test]
#[ignore = "slow: ~80-150 s in the bzImage decompressor under kvm_pvm; run with \
            cargo test --release -p strata-tests --test vmm_linux -- --ignored"]
fn debian_bzimage_boots_with_strata_acpi_tables() {
    require_linux_vm!();
    let g = guest().unwrap();
    boot_and_check(&g.bzimage, Duration::from_secs(420));
}
