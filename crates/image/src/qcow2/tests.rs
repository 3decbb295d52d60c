//! Unit tests of the qcow2 driver over in-memory storage: random operations checked
//! against a flat model, and the consistency check after each sequence.

use std::sync::Arc;

use rand::{Rng, SeedableRng};

use crate::driver::{FormatDriver, NewSnapshot, RepairMode};
use crate::iobuf::{IoBuf, IoBufMut};
use crate::storage::{MemStorage, Storage};
use crate::{create_on, open_on, CreateOptions, Format};

/// A buffer over a test's slice, used from one thread.
fn mbuf(s: &mut [u8]) -> IoBufMut<'_> {
    // SAFETY: each test uses its buffers from a single thread.
    unsafe { IoBufMut::from_slice(s) }
}

fn new_image(size: u64, opts: &CreateOptions) -> (Arc<MemStorage>, Arc<dyn FormatDriver>) {
    let mem = Arc::new(MemStorage::new(Vec::new(), 1 << 30));
    let o = CreateOptions {
        size: Some(size),
        ..opts.clone()
    };
    create_on(mem.clone(), Format::Qcow2, &o).unwrap();
    let img = open_on(mem.clone(), Format::Qcow2, false, None).unwrap();
    (mem, img)
}

fn run_model(seed: u64, opts: CreateOptions) {
    let size = 4 << 20;
    let (mem, img) = new_image(size, &opts);
    let mut model = vec![0u8; size as usize];
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let cs = opts.cluster_size.unwrap_or(65536);
    for step in 0..300 {
        let len = if rng.gen_bool(0.5) {
            rng.gen_range(1..3 * cs)
        } else {
            rng.gen_range(1..4096)
        };
        let off = rng.gen_range(0..size - len);
        match rng.gen_range(0..10) {
            0..=5 => {
                if std::env::var("QTRACE").is_ok() {
                    eprintln!("write {off} {len}");
                }
                let byte = (step % 250 + 1) as u8;
                let buf = vec![byte; len as usize];
                if rng.gen_bool(0.5) {
                    // The vectored path, with the data split in up to three pieces.
                    let cut1 = rng.gen_range(0..=buf.len());
                    let cut2 = rng.gen_range(cut1..=buf.len());
                    let parts = [&buf[..cut1], &buf[cut1..cut2], &buf[cut2..]];
                    let bufs: Vec<IoBuf<'_>> = parts.iter().map(|p| IoBuf::from_slice(p)).collect();
                    img.write_vectored(&bufs, off).unwrap();
                } else {
                    img.write(&buf, off).unwrap();
                }
                model[off as usize..(off + len) as usize].fill(byte);
            }
            6 | 7 => {
                if std::env::var("QTRACE").is_ok() {
                    eprintln!("zero {off} {len}");
                }
                let unmap = rng.gen_bool(0.5);
                img.write_zeroes(off, len, unmap).unwrap();
                model[off as usize..(off + len) as usize].fill(0);
            }
            8 => {
                if std::env::var("QTRACE").is_ok() {
                    eprintln!("discard {off} {len}");
                }
                // Discards only affect whole clusters; without a backing file they read zero.
                let a = off.div_ceil(cs) * cs;
                let b = (off + len) / cs * cs;
                img.discard(off, len).unwrap();
                if a < b {
                    model[a as usize..b as usize].fill(0);
                }
            }
            _ => img.flush().unwrap(),
        }
        {
            // A vectored read of a random range, split in two pieces.
            let len = rng.gen_range(1..3 * cs) as usize;
            let off = rng.gen_range(0..size - len as u64) as usize;
            let cut = rng.gen_range(0..=len);
            let (mut a, mut b) = (vec![0xeeu8; cut], vec![0xeeu8; len - cut]);
            img.read_vectored(&[mbuf(&mut a), mbuf(&mut b)], off as u64)
                .unwrap();
            a.extend_from_slice(&b);
            assert!(
                a == model[off..off + len],
                "seed {seed} step {step}: vectored read at {off}+{len} differs"
            );
        }
        if step % 50 == 0 || std::env::var("QTRACE").is_ok() {
            let mut got = vec![0u8; size as usize];
            img.read(&mut got, 0).unwrap();
            let first = got.iter().zip(&model).position(|(a, b)| a != b);
            assert!(
                first.is_none(),
                "seed {seed} step {step}: contents differ at {first:?}"
            );
        }
    }
    img.flush().unwrap();
    let report = img.check(None).unwrap();
    assert_eq!(report.corruptions, 0, "{:?}", report.messages);
    assert_eq!(report.leaks, 0, "{:?}", report.messages);
    drop(img);
    let img = open_on(mem, Format::Qcow2, true, None).unwrap();
    let mut got = vec![0u8; size as usize];
    img.read(&mut got, 0).unwrap();
    assert!(got == model, "seed {seed}: contents differ after reopen");
}

#[test]
fn random_ops_default() {
    run_model(1, CreateOptions::default());
}

#[test]
fn random_ops_small_clusters_v2() {
    run_model(
        2,
        CreateOptions {
            cluster_size: Some(512),
            compat: Some("0.10".into()),
            ..Default::default()
        },
    );
}

#[test]
fn random_ops_extended_l2() {
    run_model(
        3,
        CreateOptions {
            cluster_size: Some(32768),
            extended_l2: true,
            ..Default::default()
        },
    );
}

#[test]
fn random_ops_refcount_widths() {
    for (i, bits) in [1u32, 2, 8, 64].into_iter().enumerate() {
        run_model(
            10 + i as u64,
            CreateOptions {
                cluster_size: Some(4096),
                refcount_bits: Some(bits),
                ..Default::default()
            },
        );
    }
}

#[test]
fn compressed_round_trip() {
    for ct in ["zlib", "zstd"] {
        let (_mem, img) = new_image(
            1 << 20,
            &CreateOptions {
                compression_type: Some(ct.into()),
                ..Default::default()
            },
        );
        let data: Vec<u8> = (0..65536u32).map(|i| (i / 100) as u8).collect();
        img.write_compressed(&data, 65536).unwrap();
        img.write_compressed(&data, 3 * 65536).unwrap();
        let mut got = vec![0u8; 65536];
        img.read(&mut got, 65536).unwrap();
        assert_eq!(got, data);
        let mut v = vec![0u8; 65536];
        img.read_vectored(&[mbuf(&mut v)], 65536).unwrap();
        assert_eq!(v, data);
        assert!(img.block_status(65536, 65536).unwrap().compressed);
        // Overwrite part of a compressed cluster: copy-on-write decompresses it.
        img.write(&[7u8; 100], 3 * 65536 + 10).unwrap();
        img.read(&mut got, 3 * 65536).unwrap();
        assert_eq!(&got[10..110], &[7u8; 100][..]);
        assert_eq!(&got[110..], &data[110..]);
        img.flush().unwrap();
        let r = img.check(None).unwrap();
        assert_eq!((r.corruptions, r.leaks), (0, 0), "{:?}", r.messages);
    }
}

#[test]
fn backing_reads_and_cow() {
    let base_mem = Arc::new(MemStorage::new(vec![0x5a; 1 << 20], 1 << 20));
    let base = open_on(base_mem, Format::Raw, true, None).unwrap();
    let mem = Arc::new(MemStorage::new(Vec::new(), 1 << 30));
    create_on(
        mem.clone(),
        Format::Qcow2,
        &CreateOptions {
            size: Some(1 << 20),
            backing_file: Some("base.raw".into()),
            backing_fmt: Some("raw".into()),
            ..Default::default()
        },
    )
    .unwrap();
    let img = open_on(mem, Format::Qcow2, false, Some(base)).unwrap();
    img.write(&[1u8; 10], 65536 + 5).unwrap();
    let mut got = vec![0u8; 65536];
    img.read(&mut got, 65536).unwrap();
    assert_eq!(&got[..5], &[0x5a; 5]);
    assert_eq!(&got[5..15], &[1; 10]);
    assert_eq!(&got[15..], &vec![0x5a; 65536 - 15][..]);
    // A discard makes the cluster read as zeroes (v3), not as the backing file.
    img.discard(0, 65536).unwrap();
    img.read(&mut got, 0).unwrap();
    assert!(got.iter().all(|&b| b == 0));
    assert!(!img.block_status(2 * 65536, 65536).unwrap().allocated);
    // Vectored: a write into a backing cluster copies the rest of it, a read spans
    // that cluster and an unallocated one.
    img.write_vectored(&[IoBuf::from_slice(&[2u8; 7])], 3 * 65536 + 100)
        .unwrap();
    let mut v = vec![0u8; 2 * 65536];
    img.read_vectored(&[mbuf(&mut v)], 3 * 65536).unwrap();
    assert_eq!(&v[..100], &[0x5a; 100]);
    assert_eq!(&v[100..107], &[2; 7]);
    assert!(v[107..].iter().all(|&b| b == 0x5a));
}

#[test]
fn leak_repair() {
    let (mem, img) = new_image(1 << 20, &CreateOptions::default());
    img.write(&[1u8; 65536], 0).unwrap();
    img.flush().unwrap();
    drop(img);
    // Leak a cluster by raising the refcount of cluster 1 (the refcount table) to 2.
    let mut raw = mem.contents();
    raw[2 * 65536 + 2 + 1] = 2;
    let mem = Arc::new(MemStorage::new(raw, 1 << 30));
    let img = open_on(mem.clone() as Arc<dyn Storage>, Format::Qcow2, false, None).unwrap();
    let r = img.check(None).unwrap();
    assert_eq!((r.corruptions, r.leaks), (0, 1));
    let r = img.check(Some(RepairMode::Leaks)).unwrap();
    assert_eq!((r.corruptions, r.leaks, r.leaks_fixed), (0, 0, 1));
}

#[test]
fn refcount_corruption_rebuild() {
    let (mem, img) = new_image(1 << 20, &CreateOptions::default());
    img.write(&[1u8; 3 * 65536], 0).unwrap();
    img.flush().unwrap();
    drop(img);
    // Zero refcount block 0 except the header: everything else now looks free.
    let mut raw = mem.contents();
    raw[2 * 65536 + 2..3 * 65536].fill(0);
    let mem = Arc::new(MemStorage::new(raw, 1 << 30));
    let img = open_on(mem, Format::Qcow2, false, None).unwrap();
    let r = img.check(None).unwrap();
    assert!(r.corruptions > 0);
    let r = img.check(Some(RepairMode::All)).unwrap();
    assert_eq!((r.corruptions, r.leaks), (0, 0), "{:?}", r.messages);
    let mut got = vec![0u8; 3 * 65536];
    img.read(&mut got, 0).unwrap();
    assert!(got.iter().all(|&b| b == 1));
}

#[test]
fn grows_refcount_table() {
    // 512-byte clusters with 64-bit refcounts: a block covers 64 clusters and the
    // table's first cluster 64 blocks, so 2 MiB of data forces table growth.
    let (_mem, img) = new_image(
        4 << 20,
        &CreateOptions {
            cluster_size: Some(512),
            refcount_bits: Some(64),
            ..Default::default()
        },
    );
    let data: Vec<u8> = (0..(3u32 << 20)).map(|i| (i % 251) as u8).collect();
    img.write(&data, 4096).unwrap();
    img.flush().unwrap();
    let mut got = vec![0u8; data.len()];
    img.read(&mut got, 4096).unwrap();
    assert!(got == data);
    let r = img.check(None).unwrap();
    assert_eq!((r.corruptions, r.leaks), (0, 0), "{:?}", r.messages);
}

#[test]
fn concurrent_writers() {
    let (_mem, img) = new_image(8 << 20, &CreateOptions::default());
    std::thread::scope(|s| {
        for t in 0..4u8 {
            let img = img.clone();
            s.spawn(move || {
                for i in 0..64u64 {
                    let off = (i * 4 + t as u64) * 32768;
                    img.write(&vec![t + 1; 32768], off).unwrap();
                }
            });
        }
    });
    let mut got = vec![0u8; 32768];
    for i in 0..64u64 {
        for t in 0..4u8 {
            img.read(&mut got, (i * 4 + t as u64) * 32768).unwrap();
            assert!(got.iter().all(|&b| b == t + 1));
        }
    }
    img.flush().unwrap();
    let r = img.check(None).unwrap();
    assert_eq!((r.corruptions, r.leaks), (0, 0), "{:?}", r.messages);
}

#[test]
fn large_l1_with_tiny_refcount_blocks() {
    // 512-byte clusters with 64-bit refcounts: one refcount block covers 64 clusters,
    // while the L1 table of a 1 GiB disk needs 512 contiguous clusters.
    let (_mem, img) = new_image(
        1 << 30,
        &CreateOptions {
            cluster_size: Some(512),
            refcount_bits: Some(64),
            ..Default::default()
        },
    );
    img.write(&[9u8; 100_000], (1 << 30) - 100_000).unwrap();
    img.flush().unwrap();
    let r = img.check(None).unwrap();
    assert_eq!((r.corruptions, r.leaks), (0, 0), "{:?}", r.messages);
    let mut got = vec![0u8; 100_000];
    img.read(&mut got, (1 << 30) - 100_000).unwrap();
    assert!(got.iter().all(|&b| b == 9));
}

#[test]
fn persistent_bitmaps_round_trip() {
    use crate::driver::StoredBitmap;
    let (mem, img) = new_image(64 << 20, &CreateOptions::default());
    let pb = img.persistent_bitmaps().unwrap();
    assert!(pb.load_bitmaps().unwrap().is_empty());
    let mut bits = vec![0u8; 128];
    bits[0] = 0b101;
    bits[127] = 0x80;
    let b = StoredBitmap {
        name: "b0".into(),
        granularity: 65536,
        in_use: false,
        enabled: true,
        bits,
    };
    pb.store_bitmaps(std::slice::from_ref(&b)).unwrap();
    assert_eq!(pb.load_bitmaps().unwrap(), vec![b.clone()]);
    // Replacing the set frees the old structures: no leaks afterwards.
    let b2 = StoredBitmap {
        name: "b1".into(),
        granularity: 512,
        ..b.clone()
    };
    let mut big = b2.clone();
    big.bits = vec![0xff; (64 << 20) / 512 / 8];
    pb.store_bitmaps(&[b.clone(), big.clone()]).unwrap();
    let r = img.check(None).unwrap();
    assert_eq!((r.corruptions, r.leaks), (0, 0), "{:?}", r.messages);
    drop(img);
    // A reopened image writes: the bitmaps are marked in use before the first write.
    let img = open_on(mem, Format::Qcow2, false, None).unwrap();
    let pb = img.persistent_bitmaps().unwrap();
    assert_eq!(pb.load_bitmaps().unwrap(), vec![b.clone(), big]);
    img.write(&[1], 0).unwrap();
    assert!(pb
        .list_bitmaps()
        .unwrap()
        .iter()
        .all(|i| i.flags.contains(&"in-use".to_string())));
    pb.store_bitmaps(&[]).unwrap();
    assert!(pb.list_bitmaps().unwrap().is_empty());
    let r = img.check(None).unwrap();
    assert_eq!((r.corruptions, r.leaks), (0, 0), "{:?}", r.messages);
}

#[test]
fn v2_refuses_bitmaps() {
    use crate::driver::StoredBitmap;
    let (_mem, img) = new_image(
        1 << 20,
        &CreateOptions {
            compat: Some("0.10".into()),
            ..Default::default()
        },
    );
    let b = StoredBitmap {
        name: "b".into(),
        granularity: 65536,
        in_use: false,
        enabled: true,
        bits: vec![0; 2],
    };
    assert!(img
        .persistent_bitmaps()
        .unwrap()
        .store_bitmaps(&[b])
        .is_err());
}

#[test]
fn vectored_read_of_a_cluster_larger_than_the_bounce_chunk() {
    // 2 MiB clusters: cluster 0 unallocated (reads through a bounce buffer in 1 MiB
    // rounds), cluster 1 data in place. The second round of cluster 0 must not be
    // read through cluster 1's entry.
    let opts = CreateOptions {
        cluster_size: Some(2 << 20),
        ..CreateOptions::default()
    };
    let (_mem, img) = new_image(8 << 20, &opts);
    img.write(&vec![0xa5u8; 2 << 20], 2 << 20).unwrap();
    let mut out = vec![0x11u8; 4 << 20];
    let (a, b) = out.split_at_mut(3 << 19);
    img.read_vectored(&[mbuf(a), mbuf(b)], 0).unwrap();
    assert!(
        out[..2 << 20].iter().all(|&x| x == 0),
        "cluster 0 reads as zeroes"
    );
    assert!(
        out[2 << 20..].iter().all(|&x| x == 0xa5),
        "cluster 1 reads its data"
    );
}

#[test]
fn vectored_write_of_a_whole_two_mib_cluster() {
    let opts = CreateOptions {
        cluster_size: Some(2 << 20),
        ..CreateOptions::default()
    };
    let (_mem, img) = new_image(8 << 20, &opts);
    let data: Vec<u8> = (0..3 << 20).map(|i| (i % 251) as u8).collect();
    let (a, b) = data.split_at(1 << 19);
    img.write_vectored(&[IoBuf::from_slice(a), IoBuf::from_slice(b)], 2 << 20)
        .unwrap();
    let mut back = vec![0u8; 3 << 20];
    img.read(&mut back, 2 << 20).unwrap();
    assert!(back == data, "the data read back differs");
    assert_eq!(img.check(None).unwrap().corruptions, 0);
}

/// Random writes, zero writes, discards and compressed writes interleaved with
/// snapshot create / apply / delete, against one model per snapshot: after every
/// snapshot operation the check finds no corruption and no leak, and the active
/// state reads as its model; at the end every remaining snapshot is applied and
/// compared, and the image reopens with the same contents.
fn run_snapshot_model(seed: u64, opts: CreateOptions) {
    let size: u64 = 2 << 20;
    let (mem, img) = new_image(size, &opts);
    let cs = opts.cluster_size.unwrap_or(65536);
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut model = vec![0u8; size as usize];
    // (id, contents)
    let mut snaps: Vec<(String, Vec<u8>)> = Vec::new();
    let check = |img: &Arc<dyn FormatDriver>, what: &str| {
        let r = img.check(None).unwrap();
        assert_eq!(
            (r.corruptions, r.leaks),
            (0, 0),
            "seed {seed}: after {what}: {:?}",
            r.messages
        );
    };
    let read_all = |img: &Arc<dyn FormatDriver>| {
        let mut got = vec![0u8; size as usize];
        img.read(&mut got, 0).unwrap();
        got
    };
    for step in 0..120 {
        let len = rng.gen_range(1..2 * cs);
        let off = rng.gen_range(0..size - len);
        let ops = img.internal_snapshots().expect("qcow2 has snapshots");
        match rng.gen_range(0..12) {
            0..=4 => {
                let byte = (step % 250 + 1) as u8;
                img.write(&vec![byte; len as usize], off).unwrap();
                model[off as usize..(off + len) as usize].fill(byte);
            }
            5 => {
                img.write_zeroes(off, len, rng.gen_bool(0.5)).unwrap();
                model[off as usize..(off + len) as usize].fill(0);
            }
            6 => {
                let a = off.div_ceil(cs) * cs;
                let b = (off + len) / cs * cs;
                img.discard(off, len).unwrap();
                if a < b {
                    model[a as usize..b as usize].fill(0);
                }
            }
            7 => {
                let c = rng.gen_range(0..size / cs);
                let data: Vec<u8> = (0..cs).map(|i| (i / 64) as u8 ^ step as u8).collect();
                img.write_compressed(&data, c * cs).unwrap();
                model[(c * cs) as usize..((c + 1) * cs) as usize].copy_from_slice(&data);
            }
            8 | 9 => {
                match ops.create_snapshot(&NewSnapshot::now(&format!("s{step}"))) {
                    Ok(sn) => snaps.push((sn.id, model.clone())),
                    // Narrow refcounts run out of references: refused cleanly.
                    Err(e) => assert!(
                        e.to_string().contains("cannot take another reference"),
                        "seed {seed}: {e}"
                    ),
                }
                check(&img, "create");
            }
            10 if !snaps.is_empty() => {
                let (id, contents) = snaps[rng.gen_range(0..snaps.len())].clone();
                match ops.apply_snapshot(&id) {
                    Ok(()) => model = contents,
                    // The snapshot's tree needs one more reference for a moment.
                    Err(e) => assert!(
                        e.to_string().contains("cannot take another reference"),
                        "seed {seed}: {e}"
                    ),
                }
                check(&img, "apply");
            }
            11 if !snaps.is_empty() => {
                let (id, _) = snaps.remove(rng.gen_range(0..snaps.len()));
                ops.delete_snapshot(&id).unwrap();
                check(&img, "delete");
            }
            _ => img.flush().unwrap(),
        }
        assert!(
            read_all(&img) == model,
            "seed {seed} step {step}: active contents differ"
        );
    }
    let listed: Vec<String> = img.snapshots().unwrap().into_iter().map(|s| s.id).collect();
    let kept: Vec<String> = snaps.iter().map(|(id, _)| id.clone()).collect();
    assert_eq!(listed, kept, "seed {seed}: snapshot list");
    img.flush().unwrap();
    drop(img);
    let img = open_on(mem, Format::Qcow2, false, None).unwrap();
    assert!(read_all(&img) == model, "seed {seed}: differs after reopen");
    for (id, contents) in &snaps {
        if let Err(e) = img.internal_snapshots().unwrap().apply_snapshot(id) {
            assert!(
                e.to_string().contains("cannot take another reference"),
                "seed {seed}: {e}"
            );
            continue;
        }
        assert!(
            read_all(&img) == *contents,
            "seed {seed}: snapshot {id} differs"
        );
        check(&img, "final apply");
    }
}

#[test]
fn snapshots_against_a_model() {
    run_snapshot_model(21, CreateOptions::default());
    run_snapshot_model(
        22,
        CreateOptions {
            cluster_size: Some(4096),
            compat: Some("0.10".into()),
            ..Default::default()
        },
    );
    run_snapshot_model(
        23,
        CreateOptions {
            cluster_size: Some(32768),
            extended_l2: true,
            refcount_bits: Some(2),
            ..Default::default()
        },
    );
}

#[test]
fn snapshot_refused_without_refcount_headroom_changes_nothing() {
    let (mem, img) = new_image(
        1 << 20,
        &CreateOptions {
            cluster_size: Some(4096),
            refcount_bits: Some(1),
            ..Default::default()
        },
    );
    img.write(&[1u8; 8192], 4096).unwrap();
    img.flush().unwrap();
    let before = mem.contents();
    let err = img
        .internal_snapshots()
        .unwrap()
        .create_snapshot(&NewSnapshot::now("x"))
        .unwrap_err();
    assert!(err.to_string().contains("refcount_bits=1"), "{err}");
    assert!(
        mem.contents() == before,
        "a refused snapshot changed the image"
    );
    assert!(img.snapshots().unwrap().is_empty());
}

#[test]
fn snapshot_operations_refuse_an_l1_table_naming_one_l2_table_twice() {
    // 512-byte clusters: one L2 table maps 32 KiB, so two writes need two tables.
    let (mem, img) = new_image(
        1 << 20,
        &CreateOptions {
            cluster_size: Some(512),
            ..Default::default()
        },
    );
    img.write(&[1u8; 512], 0).unwrap();
    img.write(&[2u8; 512], 64 << 10).unwrap();
    img.close().unwrap();
    drop(img);
    // Point L1 entry 2 at the L2 table of entry 0.
    let bytes = mem.contents();
    let l1 = u64::from_be_bytes(bytes[40..48].try_into().unwrap());
    let e0 = bytes[l1 as usize..l1 as usize + 8].to_vec();
    mem.write_at(&e0, l1 + 16).unwrap();
    let img = open_on(mem.clone(), Format::Qcow2, false, None).unwrap();
    let before = mem.contents();
    let ops = img.internal_snapshots().unwrap();
    let err = ops.create_snapshot(&NewSnapshot::now("x")).unwrap_err();
    assert!(err.to_string().contains("used twice"), "{err}");
    assert!(
        mem.contents() == before,
        "a refused snapshot changed the image"
    );
}
