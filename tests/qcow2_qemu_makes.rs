//! QEMU makes, Strata reads.
//!
//! Each test builds an image with `qemu-img create` / `qemu-io` / `qemu-img convert` /
//! `qemu-img snapshot`, then reads the whole virtual disk through `strata_image::open_image`
//! (read-only) and compares it byte for byte with `qemu-img convert -O raw`. On the way it
//! also checks unaligned random reads, that `block_status` is consistent with the data,
//! and that opening read-only left the file untouched.

use std::path::{Path, PathBuf};

use rand::{Rng, SeedableRng};
use strata_image::{open_image, FormatDriver, OpenOptions};
use strata_tests::{
    assert_same_disk, pattern, qemu, read_all, require_qemu, s, seed, tempdir, KIB, MIB,
};

/// Reads `path` through Strata and compares it with what QEMU reads.
fn verify(name: &str, path: &Path) {
    let want = qemu::to_raw(path);
    let before = std::fs::read(path).unwrap();
    let drv = open_image(
        path,
        &OpenOptions {
            read_only: true,
            ..Default::default()
        },
    )
    .unwrap_or_else(|e| panic!("{name}: open_image({}) failed: {e}", path.display()));
    assert_eq!(
        drv.size(),
        want.len() as u64,
        "{name}: virtual size differs from qemu-img's"
    );
    let got = read_all(drv.as_ref()).unwrap_or_else(|e| panic!("{name}: read failed: {e}"));
    assert_same_disk(name, &got, &want);

    // Unaligned reads of random lengths at random places.
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed(name));
    for _ in 0..200 {
        let len = rng.gen_range(1..=(256 * KIB as usize).min(want.len()));
        let off = rng.gen_range(0..=(want.len() - len));
        let mut buf = vec![0u8; len];
        drv.read(&mut buf, off as u64)
            .unwrap_or_else(|e| panic!("{name}: read({off}, {len}) failed: {e}"));
        assert_same_disk(
            &format!("{name}: read({off}, {len})"),
            &buf,
            &want[off..off + len],
        );
    }

    check_block_status(name, drv.as_ref(), &want);
    compare_with_qemu_map(name, drv.as_ref(), path);
    drv.close()
        .unwrap_or_else(|e| panic!("{name}: close failed: {e}"));
    drop(drv);
    let after = std::fs::read(path).unwrap();
    assert!(
        before == after,
        "{name}: a read-only open changed the image file"
    );
}

/// Walks `block_status` over the whole top layer: extents must tile the disk, and
/// what they claim about zeroes must be true of the data.
fn check_block_status(name: &str, drv: &dyn FormatDriver, want: &[u8]) {
    let size = drv.size();
    let has_backing = drv.backing().is_some();
    let mut off = 0u64;
    while off < size {
        let st = drv
            .block_status(off, size - off)
            .unwrap_or_else(|e| panic!("{name}: block_status({off}) failed: {e}"));
        assert!(
            st.len > 0 && st.len <= size - off,
            "{name}: block_status({off}) returned length {}",
            st.len
        );
        let range = &want[off as usize..(off + st.len) as usize];
        let reads_zero = st.zero || (!st.allocated && !has_backing);
        if reads_zero {
            assert!(
                range.iter().all(|&b| b == 0),
                "{name}: block_status says {off}+{} reads as zero ({st:?}) but QEMU reads data there",
                st.len
            );
        }
        off += st.len;
    }
}

/// Compares the top layer's `block_status` with `qemu-img map --output=json`: which
/// ranges this layer allocates, and whether they are zero, data, compressed, and where
/// their data lives in the file.
fn compare_with_qemu_map(name: &str, drv: &dyn FormatDriver, path: &Path) {
    let out = qemu::img(&["map", "--output=json", s(path)]).ok();
    let map: serde_json::Value = serde_json::from_str(&out.stdout).expect("qemu-img map JSON");
    for e in map.as_array().expect("map is an array") {
        let start = e["start"].as_u64().unwrap();
        let length = e["length"].as_u64().unwrap();
        let top = e["depth"].as_u64() == Some(0) && e["present"].as_bool() == Some(true);
        let zero = e["zero"].as_bool().unwrap();
        let data = e["data"].as_bool().unwrap();
        let compressed = e["compressed"].as_bool().unwrap_or(false);
        let offset = e["offset"].as_u64();
        let mut pos = start;
        while pos < start + length {
            let st = drv
                .block_status(pos, start + length - pos)
                .unwrap_or_else(|e| panic!("{name}: block_status({pos}) failed: {e}"));
            let what = format!(
                "{name}: block_status({pos}) = {st:?}, but qemu-img map says {e} for this range"
            );
            assert!(st.len > 0, "{what}");
            assert_eq!(st.allocated, top, "{what} (allocated in this layer)");
            if top {
                // QEMU's map also calls an allocated data cluster zero when the host
                // file has a hole there (it asks the file layer too); the format
                // driver alone need not, so "data and zero" accepts either answer.
                if !(data && zero) {
                    assert_eq!(st.zero, zero, "{what} (zero)");
                }
                assert_eq!(st.data, data, "{what} (data)");
                assert_eq!(st.compressed, compressed, "{what} (compressed)");
                if data && !compressed {
                    let want = offset.map(|o| o + (pos - start));
                    assert_eq!(st.offset, want, "{what} (host offset)");
                }
            }
            pos += st.len.min(start + length - pos);
        }
    }
}

/// Creates a qcow2 with `opts` and runs the qemu-io `cmds` on it.
fn make(dir: &Path, file: &str, opts: &str, size: u64, cmds: &[String]) -> PathBuf {
    let path = dir.join(file);
    qemu::create(&path, "qcow2", opts, &size.to_string());
    if !cmds.is_empty() {
        let cmds: Vec<&str> = cmds.iter().map(String::as_str).collect();
        qemu::io("qcow2", &path, &cmds);
    }
    path
}

/// A mix of writes that exercises aligned, unaligned, cluster-crossing and end-of-disk
/// requests, zero writes (with and without unmap) and discards.
fn script(cs: u64, size: u64) -> Vec<String> {
    vec![
        format!("write -P 0x11 0 {cs}"),
        format!("write -P 0x22 {} 3001", cs * 3 + 1000),
        format!("write -P 0x33 {} {}", cs * 5 - 512, cs + 1024),
        format!("write -P 0x44 {} 70000", size / 2 + 17),
        format!("write -P 0x55 {} 4096", size - 4096),
        format!("write -z {} {cs}", cs * 5),
        format!("write -z -u {} {}", size / 2, cs * 2),
        format!("discard {} {cs}", cs * 3),
        format!("write -P 0x66 {} 512", cs * 3 + 512),
        format!("write -P 0x77 {} {}", cs * 9, cs * 3),
        format!("discard {} {}", cs * 9 + cs / 2, cs * 2),
        format!("write -z {} 1000", cs * 11 + 100),
    ]
}

fn plain(name: &str, opts: &str, cs: u64, size: u64) {
    require_qemu!();
    let dir = tempdir();
    let p = make(dir.path(), "img.qcow2", opts, size, &script(cs, size));
    verify(name, &p);
}

#[test]
fn v3_cluster_512() {
    plain("v3_cluster_512", "cluster_size=512", 512, 8 * MIB);
}

#[test]
fn v3_cluster_4k() {
    plain("v3_cluster_4k", "cluster_size=4096", 4096, 16 * MIB);
}

#[test]
fn v3_cluster_64k() {
    plain("v3_cluster_64k", "cluster_size=65536", 65536, 32 * MIB);
}

#[test]
fn v3_cluster_2m() {
    plain("v3_cluster_2m", "cluster_size=2M", 2 * MIB, 64 * MIB);
}

#[test]
fn v2_cluster_512() {
    plain(
        "v2_cluster_512",
        "compat=0.10,cluster_size=512",
        512,
        8 * MIB,
    );
}

#[test]
fn v2_cluster_64k() {
    plain("v2_cluster_64k", "compat=0.10", 65536, 32 * MIB);
}

#[test]
fn v2_cluster_2m() {
    plain(
        "v2_cluster_2m",
        "compat=0.10,cluster_size=2M",
        2 * MIB,
        64 * MIB,
    );
}

#[test]
fn refcount_bits_1() {
    plain(
        "refcount_bits_1",
        "refcount_bits=1,cluster_size=4096",
        4096,
        16 * MIB,
    );
}

#[test]
fn refcount_bits_16() {
    plain(
        "refcount_bits_16",
        "refcount_bits=16,cluster_size=4096",
        4096,
        16 * MIB,
    );
}

#[test]
fn refcount_bits_64() {
    plain(
        "refcount_bits_64",
        "refcount_bits=64,cluster_size=4096",
        4096,
        16 * MIB,
    );
}

#[test]
fn refcount_bits_64_cluster_512() {
    plain(
        "refcount_bits_64_cluster_512",
        "refcount_bits=64,cluster_size=512",
        512,
        8 * MIB,
    );
}

#[test]
fn lazy_refcounts_clean() {
    plain("lazy_refcounts_clean", "lazy_refcounts=on", 65536, 32 * MIB);
}

/// A lazy-refcounts image left dirty by a process that died without closing it
/// (`qemu-io`'s `abort`): refcounts on disk are stale, the dirty bit is set.
#[test]
fn lazy_refcounts_dirty() {
    require_qemu!();
    let dir = tempdir();
    let size = 16 * MIB;
    let p = make(
        dir.path(),
        "img.qcow2",
        "lazy_refcounts=on",
        size,
        &script(65536, size),
    );
    let out = qemu::run(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "write -P 0x99 1M 200k",
            "-c",
            "write -P 0x98 5M 64k",
            "-c",
            "abort",
            s(&p),
        ],
    );
    assert_ne!(out.code, 0, "qemu-io abort should not exit cleanly");
    let info = qemu::img(&["info", "--output=json", s(&p)]).ok();
    assert!(
        info.stdout.contains("\"dirty-flag\": true"),
        "the image should be dirty:\n{}",
        info.stdout
    );
    verify("lazy_refcounts_dirty", &p);
}

/// Writes a raw file whose clusters are a mix of zeroes, incompressible data and
/// highly compressible data, so `convert -c` stores some clusters compressed, some not.
fn mixed_raw(path: &Path, cs: u64, size: u64) {
    let mut data = vec![0u8; size as usize];
    for (i, chunk) in data.chunks_mut(cs as usize).enumerate() {
        let off = i as u64 * cs;
        match i % 5 {
            0 | 3 => {
                let p = pattern(7, off, chunk.len());
                for (k, b) in chunk.iter_mut().enumerate() {
                    // Low entropy but not constant: compresses well.
                    *b = (p[k] & 0x03) + b'a' + (k / 512 % 7) as u8;
                }
            }
            1 => chunk.copy_from_slice(&pattern(9, off, chunk.len())),
            2 => {}
            _ => {
                let p = pattern(11, off, chunk.len());
                let half = chunk.len() / 2;
                chunk[..half].copy_from_slice(&p[..half]);
            }
        }
    }
    std::fs::write(path, data).unwrap();
}

fn compressed(name: &str, opts: &str, cs: u64, size: u64) {
    require_qemu!();
    let dir = tempdir();
    let src = dir.path().join("src.raw");
    mixed_raw(&src, cs, size);
    let dst = dir.path().join("c.qcow2");
    qemu::img(&[
        "convert",
        "-c",
        "-f",
        "raw",
        "-O",
        "qcow2",
        "-o",
        opts,
        s(&src),
        s(&dst),
    ])
    .ok();
    let map = qemu::img(&["map", "--output=json", s(&dst)]).ok();
    let check = qemu::img(&["check", "--output=json", s(&dst)]).ok();
    assert!(
        check.stdout.contains("\"compressed-clusters\": ") && !map.stdout.is_empty(),
        "{name}: unexpected check output {}",
        check.stdout
    );
    verify(name, &dst);
    // Partial overwrites of compressed clusters (copy-on-write from compressed data),
    // zeroes and discards over them.
    qemu::io(
        "qcow2",
        &dst,
        &[
            &format!("write -P 0x41 {} 1000", 100),
            &format!("write -P 0x42 {} {}", cs * 3 + 700, cs),
            &format!("write -z {} {}", cs * 5, cs),
            &format!("discard {} {}", cs * 8, cs),
        ],
    );
    verify(&format!("{name} after overwrites"), &dst);
}

#[test]
fn compressed_zlib() {
    compressed("compressed_zlib", "compression_type=zlib", 65536, 8 * MIB);
}

#[test]
fn compressed_zstd() {
    compressed("compressed_zstd", "compression_type=zstd", 65536, 8 * MIB);
}

#[test]
fn compressed_zstd_cluster_4k() {
    compressed(
        "compressed_zstd_cluster_4k",
        "compression_type=zstd,cluster_size=4096",
        4096,
        4 * MIB,
    );
}

#[test]
fn compressed_zlib_cluster_512() {
    compressed(
        "compressed_zlib_cluster_512",
        "cluster_size=512",
        512,
        2 * MIB,
    );
}

#[test]
fn compressed_zlib_cluster_2m() {
    compressed(
        "compressed_zlib_cluster_2m",
        "cluster_size=2M",
        2 * MIB,
        32 * MIB,
    );
}

#[test]
fn compressed_v2() {
    compressed("compressed_v2", "compat=0.10", 65536, 8 * MIB);
}

/// Subcluster-sized writes, zeroes and discards with extended L2 entries.
fn subcluster_script(cs: u64) -> Vec<String> {
    let sc = cs / 32;
    vec![
        format!("write -P 0x11 {sc} {sc}"),
        format!("write -P 0x12 {} {}", sc * 4 + 100, sc * 3),
        format!("write -P 0x13 {} {}", cs - sc, sc * 2),
        format!("write -P 0x14 {} {cs}", cs * 4),
        format!("write -z {} {}", cs * 4 + sc * 3, sc * 5),
        format!("discard {} {}", cs * 4 + sc * 10, sc * 2),
        format!("write -z -u {} {}", cs * 4 + sc * 20, sc),
        format!("write -P 0x15 {} 1", cs * 6 + 5 * sc + 7),
        format!("write -P 0x16 {} {}", cs * 7 + 31 * sc, sc),
    ]
}

#[test]
fn extended_l2_64k() {
    require_qemu!();
    let dir = tempdir();
    let p = make(
        dir.path(),
        "img.qcow2",
        "extended_l2=on",
        16 * MIB,
        &subcluster_script(65536),
    );
    verify("extended_l2_64k", &p);
}

#[test]
fn extended_l2_2m() {
    require_qemu!();
    let dir = tempdir();
    let p = make(
        dir.path(),
        "img.qcow2",
        "extended_l2=on,cluster_size=2M",
        32 * MIB,
        &subcluster_script(2 * MIB),
    );
    verify("extended_l2_2m", &p);
}

/// Extended L2 over a backing file: unallocated subclusters read through to it.
#[test]
fn extended_l2_with_backing() {
    require_qemu!();
    let dir = tempdir();
    let size = 8 * MIB;
    let base = make(
        dir.path(),
        "base.qcow2",
        "",
        size,
        &["write -P 0xb0 0 8M".to_string()],
    );
    let top = make(
        dir.path(),
        "top.qcow2",
        &format!(
            "extended_l2=on,cluster_size=32768,backing_file={},backing_fmt=qcow2",
            s(&base)
        ),
        size,
        &subcluster_script(32768),
    );
    verify("extended_l2_with_backing", &top);
}

#[test]
fn extended_l2_compressed() {
    compressed(
        "extended_l2_compressed",
        "extended_l2=on,compression_type=zstd",
        65536,
        8 * MIB,
    );
}

/// raw <- qcow2 <- qcow2, with writes at each level, relative backing names.
#[test]
fn backing_chain_three_deep() {
    require_qemu!();
    let dir = tempdir();
    let size = 16 * MIB;
    let base = dir.path().join("base.raw");
    qemu::create(&base, "raw", "", &size.to_string());
    qemu::io(
        "raw",
        &base,
        &[
            "write -P 0xa1 0 16M",
            "write -P 0xa2 3M 1M",
            "write -z 8M 64k",
        ],
    );
    let mid = make(
        dir.path(),
        "mid.qcow2",
        "backing_file=base.raw,backing_fmt=raw",
        size,
        &script(65536, size),
    );
    let top = make(
        dir.path(),
        "top.qcow2",
        "backing_file=mid.qcow2,backing_fmt=qcow2,cluster_size=4096",
        size,
        &[
            "write -P 0xc1 4k 8k".to_string(),
            "write -P 0xc2 200000 5000".to_string(),
            "write -z 3M 128k".to_string(),
            "discard 6M 1M".to_string(),
            "write -P 0xc3 15M 1M".to_string(),
        ],
    );
    verify("backing_chain middle", &mid);
    verify("backing_chain_three_deep", &top);
}

/// qcow2 <- qcow2 (compat 0.10) <- qcow2, where zero writes and discards in the v2
/// layer cannot use the zero flag.
#[test]
fn backing_chain_v2_middle() {
    require_qemu!();
    let dir = tempdir();
    let size = 8 * MIB;
    let base = make(
        dir.path(),
        "base.qcow2",
        "cluster_size=4096",
        size,
        &["write -P 0xa1 0 8M".to_string()],
    );
    let mid = make(
        dir.path(),
        "mid.qcow2",
        &format!("compat=0.10,backing_file={},backing_fmt=qcow2", s(&base)),
        size,
        &script(65536, size),
    );
    let top = make(
        dir.path(),
        "top.qcow2",
        "backing_file=mid.qcow2,backing_fmt=qcow2,cluster_size=512",
        size,
        &[
            "write -P 0xc1 1000 100000".to_string(),
            "discard 1M 1M".to_string(),
        ],
    );
    verify("backing_chain_v2_middle middle", &mid);
    verify("backing_chain_v2_middle", &top);
}

/// A backing file shorter than its overlay: the tail reads as zeroes.
#[test]
fn backing_shorter_than_overlay() {
    require_qemu!();
    let dir = tempdir();
    let _base = make(
        dir.path(),
        "base.qcow2",
        "",
        3 * MIB + 512,
        &[
            "write -P 0x5a 0 3145728".to_string(),
            "write -P 0x5b 3145728 512".to_string(),
        ],
    );
    let top = make(
        dir.path(),
        "top.qcow2",
        "backing_file=base.qcow2,backing_fmt=qcow2",
        8 * MIB,
        &["write -P 0x11 3M 4k".to_string()],
    );
    verify("backing_shorter_than_overlay", &top);
}

/// Internal snapshots, with writes before and after, so clusters are shared with
/// snapshots and copied on write.
fn snapshots(name: &str, opts: &str) {
    require_qemu!();
    let dir = tempdir();
    let size = 16 * MIB;
    let p = make(dir.path(), "img.qcow2", opts, size, &script(65536, size));
    qemu::img(&["snapshot", "-c", "first", s(&p)]).ok();
    qemu::io(
        "qcow2",
        &p,
        &[
            "write -P 0xd1 0 100k",
            "write -z 196608 64k",
            "discard 8M 1M",
            "write -P 0xd2 12M 4k",
        ],
    );
    qemu::img(&["snapshot", "-c", "second", s(&p)]).ok();
    qemu::io(
        "qcow2",
        &p,
        &["write -P 0xd3 50000 300000", "discard 0 64k"],
    );
    let list = qemu::img(&["snapshot", "-l", s(&p)]).ok();
    assert!(list.stdout.contains("second"), "{}", list.stdout);
    verify(name, &p);
    let drv = open_image(
        &p,
        &OpenOptions {
            read_only: true,
            ..Default::default()
        },
    )
    .unwrap();
    let snaps = drv.snapshots().expect("snapshots()");
    let names: Vec<&str> = snaps.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["first", "second"], "{name}: snapshot table");
}

#[test]
fn snapshots_v3() {
    snapshots("snapshots_v3", "");
}

#[test]
fn snapshots_v2() {
    snapshots("snapshots_v2", "compat=0.10");
}

#[test]
fn refcount_bits_1_after_snapshot_attempt() {
    // refcount_bits=1 cannot count a cluster shared with a snapshot; qemu-img refuses
    // to create the snapshot. Nothing to read back then but the pre-snapshot state.
    require_qemu!();
    let dir = tempdir();
    let p = make(
        dir.path(),
        "img.qcow2",
        "refcount_bits=1",
        8 * MIB,
        &script(65536, 8 * MIB),
    );
    let _ = qemu::img(&["snapshot", "-c", "s", s(&p)]);
    verify("snapshots_refcount_bits_1", &p);
}

fn prealloc(mode: &str) {
    require_qemu!();
    let dir = tempdir();
    let size = 16 * MIB;
    let name = format!("prealloc_{mode}");
    let p = make(
        dir.path(),
        "img.qcow2",
        &format!("preallocation={mode}"),
        size,
        &script(65536, size),
    );
    verify(&name, &p);
}

#[test]
fn prealloc_metadata() {
    prealloc("metadata");
}

#[test]
fn prealloc_falloc() {
    prealloc("falloc");
}

#[test]
fn prealloc_full() {
    prealloc("full");
}

/// Zero writes and discards over a backing file, on both compat levels.
fn zeroes_over_backing(name: &str, compat: &str) {
    require_qemu!();
    let dir = tempdir();
    let size = 8 * MIB;
    let _base = make(
        dir.path(),
        "base.qcow2",
        "",
        size,
        &["write -P 0xee 0 8M".to_string()],
    );
    let top = make(
        dir.path(),
        "top.qcow2",
        &format!("compat={compat},backing_file=base.qcow2,backing_fmt=qcow2"),
        size,
        &[
            "write -P 0x01 0 1M".to_string(),
            "write -z 64k 128k".to_string(),
            "write -z -u 512k 64k".to_string(),
            "discard 768k 128k".to_string(),
            "write -z 2M 64k".to_string(),
            "write -z -u 3M 64k".to_string(),
            "discard 4M 64k".to_string(),
            "discard 5M 1000".to_string(),
            "write -z 6M 1000".to_string(),
            "write -z -u 7M 100".to_string(),
        ],
    );
    verify(name, &top);
}

#[test]
fn zeroes_over_backing_v3() {
    zeroes_over_backing("zeroes_over_backing_v3", "1.1");
}

#[test]
fn zeroes_over_backing_v2() {
    zeroes_over_backing("zeroes_over_backing_v2", "0.10");
}

/// A large, sparse virtual disk: too big to convert whole, so windows around the
/// written extents are compared with the known writes, which `qemu-io read -P` confirms.
#[test]
fn big_sparse_disk() {
    require_qemu!();
    let dir = tempdir();
    let size: u64 = 100 << 30;
    let writes: [(u8, u64, u64); 4] = [
        (0x21, 0, 64 * KIB),
        (0x22, (4u64 << 30) + 12345, 100_000),
        (0x23, 50u64 << 30, MIB),
        (0x24, size - 64 * KIB, 64 * KIB),
    ];
    let cmds: Vec<String> = writes
        .iter()
        .map(|(p, o, l)| format!("write -P {p:#x} {o} {l}"))
        .collect();
    let p = make(dir.path(), "big.qcow2", "", size, &cmds);
    let checks: Vec<String> = writes
        .iter()
        .map(|(p, o, l)| format!("read -q -P {p:#x} {o} {l}"))
        .collect();
    let checks: Vec<&str> = checks.iter().map(String::as_str).collect();
    qemu::io("qcow2", &p, &checks);
    let drv = open_image(
        &p,
        &OpenOptions {
            read_only: true,
            ..Default::default()
        },
    )
    .unwrap_or_else(|e| panic!("open_image failed: {e}"));
    assert_eq!(drv.size(), size);
    for &(off, len) in &[
        (0u64, MIB),
        (4u64 << 30, MIB),
        (50u64 << 30, 2 * MIB),
        (size - 2 * MIB, 2 * MIB),
        (77u64 << 30, MIB),
    ] {
        let mut want = vec![0u8; len as usize];
        for &(pat, wo, wl) in &writes {
            let (s0, e0) = (wo.max(off), (wo + wl).min(off + len));
            if s0 < e0 {
                want[(s0 - off) as usize..(e0 - off) as usize].fill(pat);
            }
        }
        let mut got = vec![0u8; len as usize];
        drv.read(&mut got, off)
            .unwrap_or_else(|e| panic!("read({off}, {len}) failed: {e}"));
        assert_same_disk(&format!("big_sparse_disk window at {off}"), &got, &want);
    }
}

/// A snapshot taken last, so the snapshot table ends the file: QEMU does not write the
/// padding after the table's last entry, so the file ends before that padding.
#[test]
fn snapshot_table_ends_the_file() {
    require_qemu!();
    let dir = tempdir();
    let p = make(
        dir.path(),
        "img.qcow2",
        "",
        8 * MIB,
        &["write -P 0x31 0 3M".to_string()],
    );
    qemu::img(&["snapshot", "-c", "first", s(&p)]).ok();
    qemu::io("qcow2", &p, &["write -P 0x33 512k 1M"]);
    qemu::img(&["snapshot", "-c", "second", s(&p)]).ok();
    verify("snapshot_table_ends_the_file", &p);
}

/// Persistent dirty bitmaps (the bitmaps header extension) must not disturb reading.
#[test]
fn with_dirty_bitmaps() {
    require_qemu!();
    let dir = tempdir();
    let size = 16 * MIB;
    let p = make(dir.path(), "img.qcow2", "", size, &[]);
    qemu::img(&["bitmap", "--add", s(&p), "b0"]).ok();
    qemu::img(&["bitmap", "--add", "-g", "512k", s(&p), "b1"]).ok();
    qemu::io(
        "qcow2",
        &p,
        &script(65536, size)
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    );
    verify("with_dirty_bitmaps", &p);
}
