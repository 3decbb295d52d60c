//! Refcount blocks: reading and writing entries of any width from 1 to 64 bits.

/// Reads refcount entry `i` of a block with `1 << order`-bit entries.
pub fn get(block: &[u8], i: usize, order: u32) -> u64 {
    let bits = 1usize << order;
    if bits < 8 {
        let bit = i * bits;
        let byte = block[bit / 8];
        (byte as u64 >> (bit % 8)) & ((1u64 << bits) - 1)
    } else {
        let n = bits / 8;
        let start = i * n;
        block[start..start + n]
            .iter()
            .fold(0u64, |acc, &b| (acc << 8) | b as u64)
    }
}

/// Writes refcount entry `i`; `value` must fit in the entry width.
pub fn set(block: &mut [u8], i: usize, order: u32, value: u64) {
    let bits = 1usize << order;
    if bits < 8 {
        let bit = i * bits;
        let mask = ((1u8 << bits) - 1) << (bit % 8);
        let b = &mut block[bit / 8];
        *b = (*b & !mask) | (((value as u8) << (bit % 8)) & mask);
    } else {
        let n = bits / 8;
        let start = i * n;
        let bytes = value.to_be_bytes();
        block[start..start + n].copy_from_slice(&bytes[8 - n..]);
    }
}

/// The largest refcount an entry of `1 << order` bits can hold.
pub fn max_value(order: u32) -> u64 {
    if order >= 6 {
        u64::MAX
    } else {
        (1u64 << (1u32 << order)) - 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_every_width() {
        for order in 0..=6 {
            let mut block = vec![0u8; 512];
            let entries = (512 * 8) >> order;
            for i in 0..entries {
                set(&mut block, i, order, (i as u64 * 7919) & max_value(order));
            }
            for i in 0..entries {
                assert_eq!(get(&block, i, order), (i as u64 * 7919) & max_value(order));
            }
        }
    }

    #[test]
    fn sub_byte_entries_are_lsb_first() {
        let mut block = vec![0u8; 1];
        set(&mut block, 1, 0, 1);
        assert_eq!(block[0], 0b10);
        let mut block = vec![0u8; 1];
        set(&mut block, 1, 2, 0xa);
        assert_eq!(block[0], 0xa0);
    }
}
