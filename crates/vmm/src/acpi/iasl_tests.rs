//! Validation of the tables by ACPICA's own tools (Debian package `acpica-tools`): `iasl -d`
//! must decode every table without complaint and show what the VMM describes, the
//! disassembly must compile back to the same bytes, and `acpiexec` (ACPICA's interpreter,
//! the one Linux runs) must load the DSDT and evaluate its objects.
//!
//! The tools are looked up on `PATH`; without them the tests print why and pass, except
//! under CI (`CI` set), which installs the package and must run them.

use super::{build_tables, tests::devices, AcpiConfig, Table};
use crate::layout;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The configuration the tools see: 3 vCPUs and every virtio-mmio slot filled (so GSIs
/// above 15 and multi-byte package lengths are covered).
fn config() -> AcpiConfig {
    AcpiConfig {
        num_cpus: 3,
        virtio_mmio: devices(layout::VIRTIO_MMIO_MAX),
        ged: Some(super::GedDevice {
            addr: layout::GED_MMIO_ADDR,
            gsi: layout::GED_GSI,
        }),
    }
}

/// Finds `tool` on `PATH`, or says why the test is skipped (`None`).
fn find_tool(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    if let Some(p) = std::env::split_paths(&path)
        .map(|d| d.join(tool))
        .find(|p| p.is_file())
    {
        return Some(p);
    }
    if std::env::var_os("CI").is_some() {
        panic!("{tool} not found: CI must install the Debian package acpica-tools");
    }
    eprintln!("SKIP: {tool} not found (install the Debian package acpica-tools)");
    None
}

/// Runs `tool args` in `dir`; returns (success, stdout + stderr).
fn run(tool: &Path, dir: &Path, args: &[&str]) -> (bool, String) {
    let out = Command::new(tool)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", tool.display()));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// Writes every table but the RSDP (which `iasl` cannot read from a file) as
/// `SIG.dat` into `dir`.
fn dump(dir: &Path, tables: &[Table]) -> Vec<String> {
    let mut names = Vec::new();
    for t in tables.iter().filter(|t| &t.signature != b"RSDP") {
        let sig = String::from_utf8(t.signature.to_vec()).unwrap();
        std::fs::write(dir.join(format!("{sig}.dat")), &t.bytes).unwrap();
        names.push(sig);
    }
    names
}

/// The disassembly with every run of blanks collapsed to one space.
fn read_dsl(path: &Path) -> String {
    read_lines(&std::fs::read_to_string(path).unwrap())
}

/// In a data table disassembly, the value of `field` in the first lines after the line
/// containing `header`.
fn field_after<'a>(dsl: &'a str, header: &str, field: &str) -> &'a str {
    let mut lines = dsl.lines().skip_while(|l| !l.contains(header));
    assert!(lines.next().is_some(), "no {header:?} in\n{dsl}");
    let needle = format!(" {field} : ");
    lines
        .take(8)
        .find_map(|l| l.split_once(&needle).map(|(_, v)| v))
        .unwrap_or_else(|| panic!("no {field:?} after {header:?} in\n{dsl}"))
}

fn assert_clean(what: &str, ok: bool, out: &str) {
    assert!(ok, "{what} failed:\n{out}");
    for bad in ["Error", "Warning", "Invalid", "incorrect", "AE_"] {
        assert!(!out.contains(bad), "{what} printed {bad:?}:\n{out}");
    }
}

#[test]
fn iasl_decodes_every_table() {
    let Some(iasl) = find_tool("iasl") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let cfg = config();
    let tables = build_tables(&cfg).unwrap();
    for sig in dump(dir.path(), &tables) {
        let (ok, out) = run(&iasl, dir.path(), &["-d", &format!("{sig}.dat")]);
        assert_clean(&format!("iasl -d {sig}.dat"), ok, &out);
        assert!(dir.path().join(format!("{sig}.dsl")).is_file(), "{out}");
    }
    let addr_of = |sig: &[u8; 4]| tables.iter().find(|t| &t.signature == sig).unwrap().addr.0;

    let xsdt = read_dsl(&dir.path().join("XSDT.dsl"));
    assert!(xsdt.contains(&format!("ACPI Table Address 0 : {:016X}", addr_of(b"FACP"))));
    assert!(xsdt.contains(&format!("ACPI Table Address 1 : {:016X}", addr_of(b"APIC"))));
    let rsdt = read_dsl(&dir.path().join("RSDT.dsl"));
    assert!(rsdt.contains(&format!("ACPI Table Address 0 : {:08X}", addr_of(b"FACP"))));

    let fadt = read_dsl(&dir.path().join("FACP.dsl"));
    for line in [
        "Revision : 06",
        "Hardware Reduced (V5) : 1",
        "Reset Register Supported (V2) : 1",
        "Value to cause reset : 01",
        "FADT Minor Revision : 03",
        "PM Profile : 04 [Enterprise Server]",
        "Hypervisor ID : 4D56415441525453", // "STRATAVM" as a little-endian u64
    ] {
        assert!(fadt.contains(line), "FADT lacks {line:?}:\n{fadt}");
    }
    assert!(fadt.contains(&format!("DSDT Address : {:016X}", addr_of(b"DSDT"))));
    for (reg, port) in [
        ("Reset Register :", layout::ACPI_RESET_PORT),
        ("Sleep Control Register :", layout::ACPI_SLEEP_CONTROL_PORT),
        ("Sleep Status Register :", layout::ACPI_SLEEP_STATUS_PORT),
    ] {
        assert_eq!(field_after(&fadt, reg, "Space ID"), "01 [SystemIO]");
        assert_eq!(field_after(&fadt, reg, "Bit Width"), "08");
        assert_eq!(field_after(&fadt, reg, "Address"), format!("{:016X}", port));
    }

    let madt = read_dsl(&dir.path().join("APIC.dsl"));
    assert!(madt.contains(&format!("Local Apic Address : {:08X}", layout::LAPIC_ADDR)));
    assert_eq!(
        madt.matches("Subtable Type : 00 [Processor Local APIC]")
            .count(),
        usize::from(cfg.num_cpus)
    );
    for cpu in 0..cfg.num_cpus {
        assert!(madt.contains(&format!("Local Apic ID : {cpu:02X}")));
    }
    assert_eq!(
        madt.matches("Processor Enabled : 1").count(),
        usize::from(cfg.num_cpus)
    );
    assert_eq!(field_after(&madt, "[I/O APIC]", "Address"), "FEC00000");
    assert_eq!(field_after(&madt, "[I/O APIC]", "Interrupt"), "00000000");
    assert_eq!(
        field_after(&madt, "[Interrupt Source Override]", "Source"),
        "00"
    );
    assert_eq!(
        field_after(&madt, "[Interrupt Source Override]", "Interrupt"),
        "00000002"
    );
    assert_eq!(
        field_after(&madt, "[Local APIC NMI]", "Interrupt Input LINT"),
        "01"
    );

    let dsdt = read_dsl(&dir.path().join("DSDT.dsl"));
    assert_eq!(
        dsdt.matches("Name (_HID, \"LNRO0005\")").count(),
        cfg.virtio_mmio.len()
    );
    for (i, d) in cfg.virtio_mmio.iter().enumerate() {
        let device = format!("Device (V{i:03X})");
        let start = dsdt.find(&device).unwrap_or_else(|| panic!("no {device}"));
        let body = &dsdt[start..];
        let body = &body[..body[1..].find("Device (").map_or(body.len(), |e| e + 1)];
        assert!(body.contains("LNRO0005"), "{body}");
        assert!(
            body.contains(&format!(
                "Memory32Fixed (ReadWrite,\n0x{:08X}, // Address Base\n0x{:08X}, // Address Length",
                d.addr, d.size
            )),
            "{body}"
        );
        assert!(
            body.contains(&format!(
                "Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive, ,, )\n{{\n0x{:08X},\n}}",
                d.gsi
            )),
            "{body}"
        );
    }
    assert!(dsdt.contains("Device (COM1)"));
    assert!(dsdt.contains("Name (_HID, EisaId (\"PNP0501\")"));
    assert!(dsdt.contains("IO (Decode16,\n0x03F8, // Range Minimum\n0x03F8, // Range Maximum"));
    assert!(dsdt.contains("0x08, // Length"));
    assert!(dsdt.contains("IRQNoFlags ()\n{4}"));
    // The power button and the Generic Event Device whose _EVT notifies it.
    assert!(dsdt.contains("Device (PWRB)"), "{dsdt}");
    assert!(dsdt.contains("Name (_HID, EisaId (\"PNP0C0C\")"), "{dsdt}");
    assert!(dsdt.contains("Device (GED)"), "{dsdt}");
    assert!(
        dsdt.contains("Name (_HID, \"ACPI0013\" /* Generic Event Device */)"),
        "{dsdt}"
    );
    assert!(
        dsdt.contains(&format!(
            "OperationRegion (EREG, SystemMemory, 0x{:08X}, 0x04)",
            layout::GED_MMIO_ADDR
        )),
        "{dsdt}"
    );
    assert!(
        dsdt.contains("Field (EREG, DWordAcc, NoLock, WriteAsZeros)\n{\nESEL, 32\n}"),
        "{dsdt}"
    );
    assert!(dsdt.contains("Method (_EVT, 1, Serialized)"), "{dsdt}");
    assert!(dsdt.contains("Notify (PWRB, 0x80)"), "{dsdt}");
    assert_eq!(
        dsdt.matches("Name (_HID, \"ACPI0007\"").count(),
        usize::from(cfg.num_cpus)
    );
    assert!(
        dsdt.contains("Name (\\_S5, Package (0x04) // _S5_: S5 System State\n{\n0x05,\n0x05,\nZero,\nZero\n})"),
        "{dsdt}"
    );
}

#[test]
fn iasl_recompiles_the_disassembly_to_the_same_bytes() {
    let Some(iasl) = find_tool("iasl") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let tables = build_tables(&config()).unwrap();
    for sig in dump(dir.path(), &tables) {
        let (ok, out) = run(&iasl, dir.path(), &["-d", &format!("{sig}.dat")]);
        assert_clean(&format!("iasl -d {sig}.dat"), ok, &out);
        // -oa: no AML optimizations, so the compiler emits what the source says.
        let (ok, out) = run(
            &iasl,
            dir.path(),
            &["-oa", "-p", &format!("re_{sig}"), &format!("{sig}.dsl")],
        );
        assert!(ok, "iasl {sig}.dsl failed:\n{out}");
        assert!(
            out.contains("Compilation successful. 0 Errors, 0 Warnings, 0 Remarks"),
            "{out}"
        );
        let ours = std::fs::read(dir.path().join(format!("{sig}.dat"))).unwrap();
        let theirs = std::fs::read(dir.path().join(format!("re_{sig}.aml"))).unwrap();
        // The compiler writes its own creator id and revision (and so checksum); the
        // signature, length, revision, OEM ids and the whole body must be ours.
        assert_eq!(ours.len(), theirs.len(), "{sig} length");
        assert_eq!(&ours[..9], &theirs[..9], "{sig} header");
        assert_eq!(&ours[10..28], &theirs[10..28], "{sig} OEM ids");
        assert_eq!(&ours[36..], &theirs[36..], "{sig} body");
    }
}

#[test]
fn acpica_interpreter_loads_and_evaluates_the_dsdt() {
    let Some(acpiexec) = find_tool("acpiexec") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let cfg = config();
    dump(dir.path(), &build_tables(&cfg).unwrap());
    let last = cfg.virtio_mmio.len() - 1;
    let commands = format!(
        "evaluate \\_S5; evaluate \\_SB.COM1._CRS; evaluate \\_SB.V000._CRS; \
         evaluate \\_SB.V{last:03X}._CRS; evaluate \\_SB.V{last:03X}._UID; \
         evaluate \\_SB.GED_._CRS; evaluate \\_SB.GED_._EVT 0x17; evaluate \\_SB.PWRB._HID"
    );
    let (ok, out) = run(
        &acpiexec,
        dir.path(),
        &["-b", &commands, "FACP.dat", "APIC.dat", "DSDT.dat"],
    );
    assert_clean("acpiexec", ok, &out);
    // vCPUs, COM1, the virtio-mmio devices, the power button and the GED.
    let devices = usize::from(cfg.num_cpus) + 1 + cfg.virtio_mmio.len() + 2;
    assert!(
        out.contains(&format!("{devices} Devices")),
        "namespace devices:\n{out}"
    );
    assert!(out.contains("1 ACPI AML tables successfully acquired and loaded"));
    let compact = read_lines(&out);
    assert!(compact.contains(
        "[Package] Contains 4 Elements:\n[Integer] = 0000000000000005\n[Integer] = 0000000000000005"
    ));
    // The last device's window and GSI as the interpreter returns them.
    let d = cfg.virtio_mmio[last];
    let mem = [
        &[0x86u8, 0x09, 0x00, 0x01][..],
        &(d.addr as u32).to_le_bytes(),
        &(d.size as u32).to_le_bytes(),
    ]
    .concat();
    let hex: Vec<String> = mem.iter().map(|b| format!("{b:02X}")).collect();
    assert!(compact.contains(&hex.join(" ")), "{out}");
    assert!(
        compact.contains(&format!("[Integer] = {last:016X}")),
        "{out}"
    );
    // The GED's interrupt, and _EVT runs: it reads the event register (acpiexec
    // simulates the memory: zero, no event) and returns without an error.
    let ged = cfg.ged.unwrap();
    let irq = [
        &[0x89u8, 0x06, 0x00, 0x03, 0x01][..],
        &ged.gsi.to_le_bytes(),
    ]
    .concat();
    let hex: Vec<String> = irq.iter().map(|b| format!("{b:02X}")).collect();
    assert!(compact.contains(&hex.join(" ")), "{out}");
    assert!(
        compact.contains("No object was returned from evaluation of \\_SB.GED_._EVT"),
        "{out}"
    );
    assert!(
        compact.contains("[Integer] = 000000000C0CD041"),
        "PNP0C0C: {out}"
    );
}

/// `text` with each line's blanks collapsed.
fn read_lines(text: &str) -> String {
    text.lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect::<Vec<_>>()
        .join("\n")
}
