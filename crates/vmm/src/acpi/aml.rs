//! A small encoder for the ACPI Machine Language (AML) terms the DSDT needs.
//!
//! Only what the VMM's DSDT uses is here: scopes, devices, named objects, integers,
//! strings, EISA ids, packages, and buffers holding resource templates (I/O ports, IRQs,
//! fixed 32-bit memory ranges, extended interrupts); for the Generic Event Device an
//! operation region with a field, a method, `If`, `And`, `LEqual`, `Store`, `Local0`
//! and `Notify`. Encodings follow the AML grammar and
//! the resource data types of the ACPI 6.x specification (chapters 19 and 6.4).
//!
//! Every function returns the encoded bytes; callers concatenate them. Names are fixed by
//! the VMM (never taken from the guest or the user), so an invalid name is a programming
//! error and panics.

/// `ZeroOp`.
const ZERO_OP: u8 = 0x00;
/// `OneOp`.
const ONE_OP: u8 = 0x01;
/// `NameOp`.
const NAME_OP: u8 = 0x08;
/// `BytePrefix`.
const BYTE_PREFIX: u8 = 0x0a;
/// `WordPrefix`.
const WORD_PREFIX: u8 = 0x0b;
/// `DWordPrefix`.
const DWORD_PREFIX: u8 = 0x0c;
/// `StringPrefix`.
const STRING_PREFIX: u8 = 0x0d;
/// `QWordPrefix`.
const QWORD_PREFIX: u8 = 0x0e;
/// `ScopeOp`.
const SCOPE_OP: u8 = 0x10;
/// `BufferOp`.
const BUFFER_OP: u8 = 0x11;
/// `PackageOp`.
const PACKAGE_OP: u8 = 0x12;
/// `ExtOpPrefix`, followed by [`DEVICE_OP`] for `DeviceOp`.
const EXT_OP_PREFIX: u8 = 0x5b;
/// Second byte of `DeviceOp`.
const DEVICE_OP: u8 = 0x82;
/// `RootChar` (`\`).
const ROOT_CHAR: u8 = b'\\';
/// `DualNamePrefix`.
const DUAL_NAME_PREFIX: u8 = 0x2e;
/// `MultiNamePrefix`.
const MULTI_NAME_PREFIX: u8 = 0x2f;

/// `MethodOp`.
const METHOD_OP: u8 = 0x14;
/// `Local0Op`.
const LOCAL0_OP: u8 = 0x60;
/// `StoreOp`.
const STORE_OP: u8 = 0x70;
/// `AndOp`.
const AND_OP: u8 = 0x7b;
/// `NotifyOp`.
const NOTIFY_OP: u8 = 0x86;
/// `LEqualOp`.
const LEQUAL_OP: u8 = 0x93;
/// `IfOp`.
const IF_OP: u8 = 0xa0;
/// Second byte of `OpRegionOp` (after [`EXT_OP_PREFIX`]).
const OP_REGION_OP: u8 = 0x80;
/// Second byte of `FieldOp` (after [`EXT_OP_PREFIX`]).
const FIELD_OP: u8 = 0x81;

/// Encodes a `PkgLength` for `content_len` bytes that follow it. The encoded length counts
/// the `PkgLength` bytes themselves. Panics above the AML limit of 2^28 bytes (the DSDT
/// is a few KiB).
pub fn pkg_length(content_len: usize) -> Vec<u8> {
    if content_len + 1 < 0x40 {
        return vec![(content_len + 1) as u8];
    }
    for extra in 1..=3usize {
        let total = content_len + 1 + extra;
        if total < 1 << (4 + 8 * extra) {
            let mut out = vec![((extra as u8) << 6) | (total & 0x0f) as u8];
            for i in 0..extra {
                out.push((total >> (4 + 8 * i)) as u8);
            }
            return out;
        }
    }
    panic!("AML package of {content_len} bytes is too long");
}

/// Encodes one 4-character `NameSeg`; shorter names are padded with `_`.
fn name_seg(seg: &str) -> [u8; 4] {
    let bytes = seg.as_bytes();
    assert!(
        !bytes.is_empty() && bytes.len() <= 4,
        "bad AML name segment {seg:?}"
    );
    assert!(
        bytes[0].is_ascii_uppercase() || bytes[0] == b'_',
        "bad AML name segment {seg:?}"
    );
    let mut out = [b'_'; 4];
    for (i, &c) in bytes.iter().enumerate() {
        assert!(
            c.is_ascii_uppercase() || c.is_ascii_digit() || c == b'_',
            "bad AML name segment {seg:?}"
        );
        out[i] = c;
    }
    out
}

/// Encodes a `NameString`: an optional leading `\` (root) and `.`-separated segments,
/// e.g. `\_SB_.COM1`, `_HID`.
pub fn name_string(path: &str) -> Vec<u8> {
    let mut out = Vec::new();
    let rest = match path.strip_prefix('\\') {
        Some(rest) => {
            out.push(ROOT_CHAR);
            rest
        }
        None => path,
    };
    let segs: Vec<[u8; 4]> = if rest.is_empty() {
        Vec::new()
    } else {
        rest.split('.').map(name_seg).collect()
    };
    match segs.len() {
        0 => out.push(ZERO_OP), // NullName
        1 => {}
        2 => out.push(DUAL_NAME_PREFIX),
        n => {
            assert!(n <= 255, "AML name path too deep");
            out.push(MULTI_NAME_PREFIX);
            out.push(n as u8);
        }
    }
    for seg in segs {
        out.extend_from_slice(&seg);
    }
    out
}

/// Encodes an integer constant in the shortest form.
pub fn integer(value: u64) -> Vec<u8> {
    match value {
        0 => vec![ZERO_OP],
        1 => vec![ONE_OP],
        v if v <= 0xff => vec![BYTE_PREFIX, v as u8],
        v if v <= 0xffff => {
            let mut out = vec![WORD_PREFIX];
            out.extend_from_slice(&(v as u16).to_le_bytes());
            out
        }
        v if v <= 0xffff_ffff => {
            let mut out = vec![DWORD_PREFIX];
            out.extend_from_slice(&(v as u32).to_le_bytes());
            out
        }
        v => {
            let mut out = vec![QWORD_PREFIX];
            out.extend_from_slice(&v.to_le_bytes());
            out
        }
    }
}

/// Encodes an ASCII string constant (NUL terminated).
pub fn string(s: &str) -> Vec<u8> {
    assert!(
        s.bytes().all(|c| (0x01..=0x7f).contains(&c)),
        "AML strings are ASCII without NUL"
    );
    let mut out = vec![STRING_PREFIX];
    out.extend_from_slice(s.as_bytes());
    out.push(0);
    out
}

/// Compresses a 7-character EISA id such as `PNP0501` into its 32-bit form: three
/// letters of 5 bits each (`A` = 1) then four hex digits, most significant byte first in
/// memory.
pub fn eisa_id_value(id: &str) -> u32 {
    let b = id.as_bytes();
    assert!(
        b.len() == 7
            && b[..3].iter().all(|c| c.is_ascii_uppercase())
            && b[3..].iter().all(|c| c.is_ascii_hexdigit()),
        "bad EISA id {id:?}"
    );
    let letter = |c: u8| u32::from(c - b'@');
    let hex = |c: u8| (c as char).to_digit(16).unwrap_or(0);
    let byte0 = (letter(b[0]) << 2) | (letter(b[1]) >> 3);
    let byte1 = ((letter(b[1]) & 7) << 5) | letter(b[2]);
    let byte2 = (hex(b[3]) << 4) | hex(b[4]);
    let byte3 = (hex(b[5]) << 4) | hex(b[6]);
    u32::from_le_bytes([byte0 as u8, byte1 as u8, byte2 as u8, byte3 as u8])
}

/// Encodes an EISA id (as `EisaId ("PNP0501")` in ASL) as a DWord constant.
pub fn eisa_id(id: &str) -> Vec<u8> {
    let mut out = vec![DWORD_PREFIX];
    out.extend_from_slice(&eisa_id_value(id).to_le_bytes());
    out
}

/// `Name (path, value)`: `value` is an encoded data object.
pub fn name(path: &str, value: &[u8]) -> Vec<u8> {
    let mut out = vec![NAME_OP];
    out.extend(name_string(path));
    out.extend_from_slice(value);
    out
}

/// Encodes `op` + `PkgLength` + `inner`.
fn with_pkg_length(op: &[u8], inner: &[u8]) -> Vec<u8> {
    let mut out = op.to_vec();
    out.extend(pkg_length(inner.len()));
    out.extend_from_slice(inner);
    out
}

/// `Scope (path) { body }`.
pub fn scope(path: &str, body: &[u8]) -> Vec<u8> {
    let mut inner = name_string(path);
    inner.extend_from_slice(body);
    with_pkg_length(&[SCOPE_OP], &inner)
}

/// `Device (path) { body }`.
pub fn device(path: &str, body: &[u8]) -> Vec<u8> {
    let mut inner = name_string(path);
    inner.extend_from_slice(body);
    with_pkg_length(&[EXT_OP_PREFIX, DEVICE_OP], &inner)
}

/// `Package () { elements }` with at most 255 elements.
pub fn package(elements: &[Vec<u8>]) -> Vec<u8> {
    assert!(elements.len() <= 255, "AML package has too many elements");
    let mut inner = vec![elements.len() as u8];
    for e in elements {
        inner.extend_from_slice(e);
    }
    with_pkg_length(&[PACKAGE_OP], &inner)
}

/// `Buffer () { data }`.
pub fn buffer(data: &[u8]) -> Vec<u8> {
    let mut inner = integer(data.len() as u64);
    inner.extend_from_slice(data);
    with_pkg_length(&[BUFFER_OP], &inner)
}

/// `ResourceTemplate () { descriptors }`: a buffer of resource descriptors closed by an
/// End Tag (checksum 0: "treated as correct").
pub fn resource_template(descriptors: &[Vec<u8>]) -> Vec<u8> {
    let mut data: Vec<u8> = descriptors.concat();
    data.extend_from_slice(&[0x79, 0x00]);
    buffer(&data)
}

/// `IO (Decode16, min, max, alignment, length)`: small I/O port descriptor.
pub fn io_port(min: u16, max: u16, alignment: u8, length: u8) -> Vec<u8> {
    let mut out = vec![0x47, 0x01];
    out.extend_from_slice(&min.to_le_bytes());
    out.extend_from_slice(&max.to_le_bytes());
    out.push(alignment);
    out.push(length);
    out
}

/// `IRQNoFlags () { irq }`: small IRQ descriptor (edge, active high, exclusive) for an
/// ISA interrupt 0..=15.
pub fn irq_no_flags(irq: u8) -> Vec<u8> {
    assert!(irq < 16, "ISA IRQ {irq} out of range");
    let mask = 1u16 << irq;
    let mut out = vec![0x22];
    out.extend_from_slice(&mask.to_le_bytes());
    out
}

/// `Memory32Fixed (ReadWrite|ReadOnly, base, length)`: large fixed-location 32-bit memory
/// range descriptor.
pub fn memory32_fixed(read_write: bool, base: u32, length: u32) -> Vec<u8> {
    let mut out = vec![0x86, 9, 0, u8::from(read_write)];
    out.extend_from_slice(&base.to_le_bytes());
    out.extend_from_slice(&length.to_le_bytes());
    out
}

/// `OperationRegion (name, SystemMemory, offset, length)`.
pub fn system_memory_region(name: &str, offset: u64, length: u64) -> Vec<u8> {
    let mut out = vec![EXT_OP_PREFIX, OP_REGION_OP];
    out.extend(name_string(name));
    out.push(0x00); // RegionSpace: SystemMemory
    out.extend(integer(offset));
    out.extend(integer(length));
    out
}

/// `Field (region, DWordAcc, NoLock, WriteAsZeros) { name, bits, ... }`.
pub fn dword_field(region: &str, fields: &[(&str, u32)]) -> Vec<u8> {
    let mut inner = name_string(region);
    inner.push(0x03 | (2 << 5)); // AccessType DWord, NoLock, WriteAsZeros
    for (name, bits) in fields {
        inner.extend_from_slice(&name_seg(name));
        // A NamedField's PkgLength is the bit count itself (it does not count its own
        // bytes); fields here are below 4096 bits.
        assert!(*bits < 4096, "AML field of {bits} bits");
        if *bits < 0x40 {
            inner.push(*bits as u8);
        } else {
            inner.extend_from_slice(&[0x40 | (*bits & 0xf) as u8, (*bits >> 4) as u8]);
        }
    }
    with_pkg_length(&[EXT_OP_PREFIX, FIELD_OP], &inner)
}

/// `Method (name, args, Serialized|NotSerialized) { body }`.
pub fn method(name: &str, args: u8, serialized: bool, body: &[u8]) -> Vec<u8> {
    assert!(args <= 7, "AML methods take at most 7 arguments");
    let mut inner = name_string(name);
    inner.push(args | (u8::from(serialized) << 3));
    inner.extend_from_slice(body);
    with_pkg_length(&[METHOD_OP], &inner)
}

/// `If (predicate) { body }`.
pub fn if_then(predicate: &[u8], body: &[u8]) -> Vec<u8> {
    let mut inner = predicate.to_vec();
    inner.extend_from_slice(body);
    with_pkg_length(&[IF_OP], &inner)
}

/// `Local0`.
pub fn local0() -> Vec<u8> {
    vec![LOCAL0_OP]
}

/// `Store (source, target)`: `target` is a SuperName (a name or a local).
pub fn store(source: &[u8], target: &[u8]) -> Vec<u8> {
    [&[STORE_OP][..], source, target].concat()
}

/// `And (a, b)` without a target (the result is only used as an operand).
pub fn and(a: &[u8], b: &[u8]) -> Vec<u8> {
    [&[AND_OP][..], a, b, &[ZERO_OP]].concat()
}

/// `LEqual (a, b)`.
pub fn lequal(a: &[u8], b: &[u8]) -> Vec<u8> {
    [&[LEQUAL_OP][..], a, b].concat()
}

/// `Notify (object, value)`.
pub fn notify(object: &str, value: u64) -> Vec<u8> {
    let mut out = vec![NOTIFY_OP];
    out.extend(name_string(object));
    out.extend(integer(value));
    out
}

/// Trigger mode of an [`extended_interrupt`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// Edge triggered.
    Edge,
    /// Level triggered.
    Level,
}

/// Polarity of an [`extended_interrupt`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Polarity {
    /// Active high.
    High,
    /// Active low.
    Low,
}

/// `Interrupt (ResourceConsumer, trigger, polarity, Exclusive|Shared) { gsi }`: the
/// large extended interrupt descriptor with one interrupt and no resource source.
pub fn extended_interrupt(trigger: Trigger, polarity: Polarity, shared: bool, gsi: u32) -> Vec<u8> {
    let mut flags = 0x01; // resource consumer
    if trigger == Trigger::Edge {
        flags |= 0x02;
    }
    if polarity == Polarity::Low {
        flags |= 0x04;
    }
    if shared {
        flags |= 0x08;
    }
    let mut out = vec![0x89, 6, 0, flags, 1];
    out.extend_from_slice(&gsi.to_le_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ged_terms() {
        assert_eq!(
            system_memory_region("EREG", 0xd001_0000, 4),
            b"\x5b\x80EREG\x00\x0c\x00\x00\x01\xd0\x0a\x04".to_vec()
        );
        // Field (EREG, DWordAcc, NoLock, WriteAsZeros) { ESEL, 32 }
        assert_eq!(
            dword_field("EREG", &[("ESEL", 32)]),
            b"\x5b\x81\x0bEREG\x43ESEL\x20".to_vec()
        );
        assert_eq!(method("_EVT", 1, true, &[]), b"\x14\x06_EVT\x09".to_vec());
        assert_eq!(
            if_then(
                &lequal(&and(&local0(), &integer(2)), &integer(2)),
                &notify("PWRB", 0x80)
            ),
            b"\xa0\x10\x93\x7b\x60\x0a\x02\x00\x0a\x02\x86PWRB\x0a\x80".to_vec()
        );
        assert_eq!(store(b"ESEL", &local0()), b"\x70ESEL\x60".to_vec());
    }

    #[test]
    fn pkg_length_forms() {
        assert_eq!(pkg_length(0), vec![1]);
        assert_eq!(pkg_length(62), vec![63]);
        // 63 content bytes + 2 length bytes = 65 = 0x41.
        assert_eq!(pkg_length(63), vec![0x41, 0x04]);
        // Largest two-byte form: total 0xfff.
        assert_eq!(pkg_length(0xffd), vec![0x4f, 0xff]);
        // Three-byte form: total 0x1002.
        assert_eq!(pkg_length(0xfff), vec![0x82, 0x00, 0x01]);
        assert_eq!(pkg_length(0x10_0000), vec![0xc4, 0x00, 0x00, 0x01]);
    }

    #[test]
    fn integers_use_the_shortest_form() {
        assert_eq!(integer(0), vec![0x00]);
        assert_eq!(integer(1), vec![0x01]);
        assert_eq!(integer(5), vec![0x0a, 5]);
        assert_eq!(integer(0x3f8), vec![0x0b, 0xf8, 0x03]);
        assert_eq!(integer(0xd000_0000), vec![0x0c, 0, 0, 0, 0xd0]);
        assert_eq!(integer(1 << 32), vec![0x0e, 0, 0, 0, 0, 1, 0, 0, 0]);
    }

    #[test]
    fn names_and_strings() {
        assert_eq!(name_string("_HID"), b"_HID".to_vec());
        assert_eq!(name_string("\\_SB_"), b"\\_SB_".to_vec());
        assert_eq!(name_string("\\_SB"), b"\\_SB_".to_vec());
        assert_eq!(name_string("\\_SB_.COM1"), b"\\\x2e_SB_COM1".to_vec());
        assert_eq!(name_string("A.B.C"), b"\x2f\x03A___B___C___".to_vec());
        assert_eq!(name_string("\\"), vec![b'\\', 0]);
        assert_eq!(string("LNRO0005"), b"\x0dLNRO0005\0".to_vec());
    }

    #[test]
    #[should_panic(expected = "bad AML name segment")]
    fn lowercase_names_are_rejected() {
        name_string("com1");
    }

    #[test]
    fn eisa_ids() {
        // Well-known values: PNP0A03 (PCI host bridge) = 0x030ad041, PNP0501 = 0x0105d041.
        assert_eq!(eisa_id_value("PNP0A03"), 0x030a_d041);
        assert_eq!(eisa_id_value("PNP0501"), 0x0105_d041);
        assert_eq!(eisa_id("PNP0501"), vec![0x0c, 0x41, 0xd0, 0x05, 0x01]);
    }

    #[test]
    fn device_with_name() {
        let dev = device("COM1", &name("_UID", &integer(0)));
        // DeviceOp, PkgLength(4 name + 6 Name(_UID, Zero) + 1), name, NameOp _UID ZeroOp.
        assert_eq!(dev, b"\x5b\x82\x0bCOM1\x08_UID\x00".to_vec(), "{dev:02x?}");
    }

    #[test]
    fn package_of_integers() {
        let p = package(&[integer(5), integer(5), integer(0), integer(0)]);
        assert_eq!(p, vec![0x12, 0x08, 0x04, 0x0a, 5, 0x0a, 5, 0x00, 0x00]);
    }

    #[test]
    fn resource_descriptors() {
        assert_eq!(
            io_port(0x3f8, 0x3f8, 0, 8),
            vec![0x47, 0x01, 0xf8, 0x03, 0xf8, 0x03, 0x00, 0x08]
        );
        assert_eq!(irq_no_flags(4), vec![0x22, 0x10, 0x00]);
        assert_eq!(
            memory32_fixed(true, 0xd000_0000, 0x1000),
            vec![0x86, 0x09, 0x00, 0x01, 0, 0, 0, 0xd0, 0x00, 0x10, 0, 0]
        );
        assert_eq!(
            extended_interrupt(Trigger::Edge, Polarity::High, false, 5),
            vec![0x89, 0x06, 0x00, 0x03, 0x01, 5, 0, 0, 0]
        );
        assert_eq!(
            extended_interrupt(Trigger::Level, Polarity::Low, true, 20)[3],
            0x0d
        );
        let rt = resource_template(&[irq_no_flags(4)]);
        assert_eq!(
            rt,
            vec![0x11, 0x08, 0x0a, 0x05, 0x22, 0x10, 0x00, 0x79, 0x00]
        );
    }
}
