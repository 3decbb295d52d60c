//! Compressed clusters: raw deflate with a 4 KiB window (QEMU's zlib setting) and zstd.

use std::io::Read;

use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};

use crate::{Error, Result};

/// Compression type 0 of the header.
pub const ZLIB: u8 = 0;
/// Compression type 1 of the header.
pub const ZSTD: u8 = 1;

/// Decompresses `input` (which may carry trailing padding) into exactly `out.len()` bytes.
pub fn decompress(kind: u8, input: &[u8], out: &mut [u8]) -> Result<()> {
    match kind {
        ZLIB => {
            let mut d = Decompress::new_with_window_bits(false, 15);
            let status = d
                .decompress(input, out, FlushDecompress::Finish)
                .map_err(|e| Error::corrupt(format!("Invalid compressed cluster: {e}")))?;
            let produced = d.total_out() as usize;
            if produced != out.len() && status != Status::StreamEnd {
                return Err(Error::corrupt("Compressed cluster is truncated"));
            }
            if produced != out.len() {
                return Err(Error::corrupt(
                    "Compressed cluster does not decompress to a whole cluster",
                ));
            }
            Ok(())
        }
        ZSTD => {
            let mut dec = zstd::stream::read::Decoder::with_buffer(input)
                .map_err(|e| Error::corrupt(format!("Invalid compressed cluster: {e}")))?
                .single_frame();
            let mut done = 0;
            while done < out.len() {
                match dec.read(&mut out[done..]) {
                    Ok(0) => {
                        return Err(Error::corrupt(
                            "Compressed cluster does not decompress to a whole cluster",
                        ))
                    }
                    Ok(n) => done += n,
                    Err(e) => {
                        return Err(Error::corrupt(format!("Invalid compressed cluster: {e}")))
                    }
                }
            }
            Ok(())
        }
        _ => Err(Error::unsupported(format!(
            "Unknown compression type {kind}"
        ))),
    }
}

/// Compresses one cluster; `None` when the result would not be smaller than `max_len`.
pub fn compress(kind: u8, input: &[u8], max_len: usize) -> Result<Option<Vec<u8>>> {
    match kind {
        ZLIB => {
            let mut c = Compress::new_with_window_bits(Compression::default(), false, 12);
            let mut out = Vec::with_capacity(max_len);
            match c.compress_vec(input, &mut out, FlushCompress::Finish) {
                Ok(Status::StreamEnd) if out.len() < max_len => Ok(Some(out)),
                Ok(_) => Ok(None),
                Err(e) => Err(Error::invalid(format!("Compression failed: {e}"))),
            }
        }
        ZSTD => {
            let out = zstd::bulk::compress(input, 0)
                .map_err(|e| Error::invalid(format!("Compression failed: {e}")))?;
            Ok((out.len() < max_len).then_some(out))
        }
        _ => Err(Error::unsupported(format!(
            "Unknown compression type {kind}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_with_trailing_padding() {
        let data: Vec<u8> = (0..65536u32).map(|i| (i / 300) as u8).collect();
        for kind in [ZLIB, ZSTD] {
            let mut c = compress(kind, &data, data.len() - 1).unwrap().unwrap();
            c.extend_from_slice(&[0xaa; 300]);
            let mut out = vec![0; data.len()];
            decompress(kind, &c, &mut out).unwrap();
            assert_eq!(out, data);
        }
    }

    #[test]
    fn garbage_is_an_error() {
        let mut out = vec![0; 4096];
        assert!(decompress(ZLIB, &[0xff; 64], &mut out).is_err());
        assert!(decompress(ZSTD, &[0xff; 64], &mut out).is_err());
    }

    #[test]
    fn incompressible_data_is_refused() {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let data: Vec<u8> = (0..4096)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        assert!(compress(ZLIB, &data, 4095).unwrap().is_none());
    }
}
