//! The common pieces of the ACPI tables: checksums, the system description table header,
//! the RSDP and the root tables (XSDT, RSDT), and the generic address structure.
//!
//! Layouts follow the ACPI 6.x specification, chapter 5.2.

/// OEM id written in every table header and the RSDP.
pub const OEM_ID: &[u8; 6] = b"STRATA";
/// OEM table id written in every table header.
pub const OEM_TABLE_ID: &[u8; 8] = b"STRATAVM";
/// OEM revision written in every table header.
pub const OEM_REVISION: u32 = 1;
/// Creator id ("ASL compiler vendor") written in every table header.
pub const CREATOR_ID: &[u8; 4] = b"STRA";
/// Creator revision written in every table header.
pub const CREATOR_REVISION: u32 = 1;

/// Length of the system description table header.
pub const HEADER_LEN: usize = 36;
/// Length of the ACPI 2.0+ RSDP.
pub const RSDP_LEN: usize = 36;
/// Offset of the checksum byte in a table header.
const CHECKSUM_OFFSET: usize = 9;

/// The byte that makes `bytes` (with that byte at 0) sum to zero modulo 256.
pub fn checksum(bytes: &[u8]) -> u8 {
    let sum = bytes.iter().fold(0u8, |acc, &b| acc.wrapping_add(b));
    0u8.wrapping_sub(sum)
}

/// Builds a table: the 36-byte header (signature, length, revision, checksum, OEM ids,
/// creator) followed by `body`, with the checksum set.
pub fn sdt(signature: &[u8; 4], revision: u8, body: &[u8]) -> Vec<u8> {
    let len = HEADER_LEN + body.len();
    let mut t = Vec::with_capacity(len);
    t.extend_from_slice(signature);
    t.extend_from_slice(&(len as u32).to_le_bytes());
    t.push(revision);
    t.push(0); // checksum, set below
    t.extend_from_slice(OEM_ID);
    t.extend_from_slice(OEM_TABLE_ID);
    t.extend_from_slice(&OEM_REVISION.to_le_bytes());
    t.extend_from_slice(CREATOR_ID);
    t.extend_from_slice(&CREATOR_REVISION.to_le_bytes());
    t.extend_from_slice(body);
    t[CHECKSUM_OFFSET] = checksum(&t);
    t
}

/// The revision 2 Root System Description Pointer: `rsdt` (32-bit, may be 0) and `xsdt`.
pub fn rsdp(rsdt: u32, xsdt: u64) -> Vec<u8> {
    let mut r = Vec::with_capacity(RSDP_LEN);
    r.extend_from_slice(b"RSD PTR ");
    r.push(0); // checksum of the first 20 bytes
    r.extend_from_slice(OEM_ID);
    r.push(2); // revision: ACPI 2.0+ layout
    r.extend_from_slice(&rsdt.to_le_bytes());
    r.extend_from_slice(&(RSDP_LEN as u32).to_le_bytes());
    r.extend_from_slice(&xsdt.to_le_bytes());
    r.push(0); // extended checksum of all 36 bytes
    r.extend_from_slice(&[0; 3]);
    r[8] = checksum(&r[..20]);
    r[32] = checksum(&r);
    r
}

/// The Extended System Description Table: 64-bit pointers to the other tables.
pub fn xsdt(entries: &[u64]) -> Vec<u8> {
    let body: Vec<u8> = entries.iter().flat_map(|e| e.to_le_bytes()).collect();
    sdt(b"XSDT", 1, &body)
}

/// The Root System Description Table: 32-bit pointers to the other tables.
pub fn rsdt(entries: &[u32]) -> Vec<u8> {
    let body: Vec<u8> = entries.iter().flat_map(|e| e.to_le_bytes()).collect();
    sdt(b"RSDT", 1, &body)
}

/// Address space id of a [`Gas`] in system I/O (port) space.
pub const GAS_SYSTEM_IO: u8 = 1;
/// Access size of a [`Gas`]: byte access.
pub const GAS_ACCESS_BYTE: u8 = 1;

/// A Generic Address Structure (12 bytes).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Gas {
    /// Address space id (0 memory, 1 system I/O, ...).
    pub space_id: u8,
    /// Register width in bits.
    pub bit_width: u8,
    /// Register offset in bits.
    pub bit_offset: u8,
    /// Access size (1 byte, 2 word, 3 dword, 4 qword).
    pub access_size: u8,
    /// Address in the space.
    pub address: u64,
}

impl Gas {
    /// An 8-bit register at I/O port `port`, accessed by bytes.
    pub fn io_port8(port: u16) -> Self {
        Gas {
            space_id: GAS_SYSTEM_IO,
            bit_width: 8,
            bit_offset: 0,
            access_size: GAS_ACCESS_BYTE,
            address: u64::from(port),
        }
    }

    /// The 12 encoded bytes.
    pub fn to_bytes(self) -> [u8; 12] {
        let mut b = [0u8; 12];
        b[0] = self.space_id;
        b[1] = self.bit_width;
        b[2] = self.bit_offset;
        b[3] = self.access_size;
        b[4..].copy_from_slice(&self.address.to_le_bytes());
        b
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |a, &b| a.wrapping_add(b))
    }

    #[test]
    fn checksum_zeroes_the_sum() {
        assert_eq!(checksum(&[]), 0);
        assert_eq!(checksum(&[1, 2, 3]), 250);
        let mut v = vec![0xffu8, 0x80, 0x7f, 0];
        v[3] = checksum(&v);
        assert_eq!(sum(&v), 0);
    }

    #[test]
    fn header_layout() {
        let t = sdt(b"TEST", 3, &[0xaa, 0xbb]);
        assert_eq!(t.len(), 38);
        assert_eq!(&t[0..4], b"TEST");
        assert_eq!(u32::from_le_bytes(t[4..8].try_into().unwrap()), 38);
        assert_eq!(t[8], 3);
        assert_eq!(&t[10..16], b"STRATA");
        assert_eq!(&t[16..24], b"STRATAVM");
        assert_eq!(u32::from_le_bytes(t[24..28].try_into().unwrap()), 1);
        assert_eq!(&t[28..32], b"STRA");
        assert_eq!(&t[36..], &[0xaa, 0xbb]);
        assert_eq!(sum(&t), 0);
    }

    #[test]
    fn rsdp_layout_and_both_checksums() {
        let r = rsdp(0x000e_0040, 0x000e_0080);
        assert_eq!(r.len(), 36);
        assert_eq!(&r[0..8], b"RSD PTR ");
        assert_eq!(&r[9..15], b"STRATA");
        assert_eq!(r[15], 2);
        assert_eq!(u32::from_le_bytes(r[16..20].try_into().unwrap()), 0xe0040);
        assert_eq!(u32::from_le_bytes(r[20..24].try_into().unwrap()), 36);
        assert_eq!(u64::from_le_bytes(r[24..32].try_into().unwrap()), 0xe0080);
        assert_eq!(sum(&r[..20]), 0, "ACPI 1.0 checksum");
        assert_eq!(sum(&r), 0, "extended checksum");
        assert_eq!(&r[33..], &[0, 0, 0]);
    }

    #[test]
    fn root_tables() {
        let x = xsdt(&[0x1122_3344_5566, 0xe0100]);
        assert_eq!(x.len(), 36 + 16);
        assert_eq!(&x[..4], b"XSDT");
        assert_eq!(
            u64::from_le_bytes(x[36..44].try_into().unwrap()),
            0x1122_3344_5566
        );
        assert_eq!(u64::from_le_bytes(x[44..52].try_into().unwrap()), 0xe0100);
        assert_eq!(sum(&x), 0);
        let r = rsdt(&[0xe0100, 0xe0200]);
        assert_eq!(r.len(), 36 + 8);
        assert_eq!(u32::from_le_bytes(r[40..44].try_into().unwrap()), 0xe0200);
        assert_eq!(sum(&r), 0);
    }

    #[test]
    fn gas_encoding() {
        assert_eq!(
            Gas::io_port8(0x600).to_bytes(),
            [1, 8, 0, 1, 0x00, 0x06, 0, 0, 0, 0, 0, 0]
        );
    }
}
