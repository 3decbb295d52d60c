//! Bad input: a corpus of broken images, generated here from valid `qemu-img` images by
//! precise corruption.
//!
//! Each image is opened (read-only, then read-write) by the `open-probe` child
//! (tests/bin/open_probe.rs) under an address-space limit, so a panic, an abort or an
//! allocation sized from a hostile header fails the test instead of killing it. Each
//! case must end in a clear error (one line, saying something) from `open_image` or from
//! reading the disk, never a panic; and the image's bytes (and its backing files') must be
//! unchanged afterwards. For the sanity of the corpus itself, `qemu-img convert` must
//! also refuse each case (or, where noted, agree on what may be read).

use std::path::{Path, PathBuf};
use std::process::Command;

use strata_tests::qcow2::{self, field, get_u64, put_u32, put_u64, Header};
use strata_tests::{fnv64, qemu, require_qemu, s, tempdir, MIB};

/// Address-space limit for the probe, in KiB: generous for a 4 MiB image, far below
/// what an allocation sized from an absurd header field would take.
const PROBE_MEMORY_KIB: u64 = 2 * 1024 * 1024;

/// What the library must do with a broken image.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Expect {
    /// Refuse it, read-only and read-write: an error from open or from reading.
    Refuse,
    /// Refuse read-write; read-only, reads that succeed must return the original disk.
    RefuseWrite,
}

/// The result line of one probe run.
#[derive(Debug)]
struct Probe {
    line: String,
}

impl Probe {
    fn ok(&self) -> bool {
        self.line.starts_with("OK ")
    }

    /// The error message, if the probe reports one.
    fn error(&self) -> Option<&str> {
        let rest = self
            .line
            .strip_prefix("OPEN-ERR ")
            .or_else(|| self.line.strip_prefix("CLOSE-ERR "))
            .or_else(|| {
                self.line
                    .strip_prefix("READ-ERR ")
                    .and_then(|r| r.split_once(' ').map(|(_, m)| m))
            })?;
        Some(rest)
    }
}

fn probe(path: &Path, mode: &str) -> Probe {
    let bin = env!("CARGO_BIN_EXE_open-probe");
    let out = Command::new("sh")
        .args([
            "-c",
            &format!("ulimit -v {PROBE_MEMORY_KIB}; exec timeout 120 \"$0\" \"$@\""),
            bin,
            s(path),
            mode,
        ])
        .output()
        .expect("run open-probe");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    if !out.status.success() || stdout.lines().count() != 1 {
        panic!(
            "open-probe {} {mode} did not finish cleanly ({}): a panic, abort, \
             timeout or allocation failure in the library\nstdout:\n{stdout}\nstderr:\n{stderr}",
            path.display(),
            out.status
        );
    }
    Probe {
        line: stdout.trim_end().to_string(),
    }
}

/// The valid image the corpus starts from, and what its disk holds.
struct Base {
    dir: tempfile::TempDir,
    bytes: Vec<u8>,
    disk_hash: String,
}

/// A 4 MiB, 64 KiB-cluster image with data in its first 2 MiB, made by qemu-img.
fn base(opts: &str, compressed: bool) -> Base {
    let dir = tempdir();
    let p = dir.path().join("base.qcow2");
    if compressed {
        let raw = dir.path().join("src.raw");
        let mut data = vec![0u8; 4 * MIB as usize];
        for (i, b) in data.iter_mut().enumerate().take(2 * MIB as usize) {
            *b = (i / 1000 % 26) as u8 + b'a';
        }
        std::fs::write(&raw, &data).unwrap();
        qemu::img(&[
            "convert",
            "-c",
            "-f",
            "raw",
            "-O",
            "qcow2",
            "-o",
            opts,
            s(&raw),
            s(&p),
        ])
        .ok();
    } else {
        qemu::create(&p, "qcow2", opts, "4M");
        qemu::io(
            "qcow2",
            &p,
            &[
                "write -P 0x5c 0 1M",
                "write -P 0x5d 1M 1M",
                "write -z 1536k 64k",
            ],
        );
    }
    let disk = qemu::to_raw(&p);
    let bytes = std::fs::read(&p).unwrap();
    Base {
        dir,
        bytes,
        disk_hash: format!("{:016x}", fnv64(&disk[..disk.len().min(64 * MIB as usize)])),
    }
}

/// Runs one case: `files` are (path, bytes) to write, the first being the image to open.
fn case(
    name: &str,
    expect: Expect,
    files: &[(PathBuf, Vec<u8>)],
    disk_hash: &str,
    must_say: &[&str],
    sanity: bool,
) {
    for (p, b) in files {
        std::fs::write(p, b).unwrap();
    }
    let image = &files[0].0;
    // The corpus entry must be broken for QEMU too: `qemu-img convert` or `check`
    // fails on it (QEMU reads some broken images leniently, read-only). For
    // RefuseWrite, QEMU must still read it. Loops are skipped: qemu-img recurses on
    // them until it runs out of memory.
    if sanity {
        let scratch = image.with_extension("qemu-out.raw");
        let convert = qemu::run(
            "timeout",
            &[
                "60",
                "qemu-img",
                "convert",
                "-O",
                "raw",
                s(image),
                s(&scratch),
            ],
        );
        let _ = std::fs::remove_file(&scratch);
        match expect {
            Expect::Refuse => {
                let check = qemu::run("timeout", &["60", "qemu-img", "check", s(image)]);
                assert!(
                    convert.code != 0 || check.code != 0,
                    "{name}: qemu-img converts and checks this image without complaint, \
                     so the corpus entry is not broken:\n{}",
                    check.stdout
                );
            }
            Expect::RefuseWrite => assert_eq!(
                convert.code, 0,
                "{name}: qemu-img should still read this image: {}",
                convert.stderr
            ),
        }
    }
    for (p, b) in files {
        // qemu-img must not have changed it either; restore to be sure.
        std::fs::write(p, b).unwrap();
    }

    let ro = probe(image, "ro");
    let rw = probe(image, "rw");
    println!("{name}: ro -> {}", ro.line);
    println!("{name}: rw -> {}", rw.line);
    let judge = |mode: &str, p: &Probe, must_refuse: bool| {
        if p.ok() {
            if must_refuse {
                panic!(
                    "{name}: opening {mode} succeeded and the disk read without error ({}); \
                     the image must be refused",
                    p.line
                );
            }
            let hash = p.line.split(' ').nth(1).unwrap();
            assert_eq!(
                hash, disk_hash,
                "{name}: opened {mode} and read data that differs from the original disk"
            );
            return;
        }
        let msg = p
            .error()
            .unwrap_or_else(|| panic!("{name}: odd probe output {:?}", p.line));
        assert!(
            msg.trim().len() >= 8,
            "{name}: {mode} error message is not clear: {msg:?}"
        );
        for word in must_say {
            assert!(
                msg.to_lowercase().contains(&word.to_lowercase()),
                "{name}: {mode} error {msg:?} should mention {word:?}"
            );
        }
    };
    judge("read-only", &ro, expect == Expect::Refuse);
    judge("read-write", &rw, true);
    for (p, b) in files {
        let after = std::fs::read(p).unwrap();
        assert!(
            &after == b,
            "{name}: {} was modified by a failed open (was {} bytes, now {})",
            p.display(),
            b.len(),
            after.len()
        );
    }
}

/// A corruption of the base image's header or tables.
fn patched(name: &str, expect: Expect, must_say: &[&str], f: impl FnOnce(&mut Vec<u8>)) {
    require_qemu!();
    let b = base("", false);
    let mut bytes = b.bytes.clone();
    f(&mut bytes);
    let img = b.dir.path().join(format!("{name}.qcow2"));
    case(name, expect, &[(img, bytes)], &b.disk_hash, must_say, true);
}

#[test]
fn truncated_header_40() {
    patched("truncated_header_40", Expect::Refuse, &[], |b| {
        b.truncate(40)
    });
}

#[test]
fn truncated_header_100() {
    patched("truncated_header_100", Expect::Refuse, &[], |b| {
        b.truncate(100)
    });
}

#[test]
fn l1_table_beyond_eof() {
    patched("l1_table_beyond_eof", Expect::Refuse, &[], |b| {
        put_u64(b, field::L1_TABLE_OFFSET, 1 << 40)
    });
}

#[test]
fn refcount_table_beyond_eof() {
    patched("refcount_table_beyond_eof", Expect::Refuse, &[], |b| {
        put_u64(b, field::REFCOUNT_TABLE_OFFSET, 1 << 40)
    });
}

#[test]
fn l1_size_absurd() {
    patched("l1_size_absurd", Expect::Refuse, &[], |b| {
        put_u32(b, field::L1_SIZE, 0x7fff_ffff)
    });
}

#[test]
fn l1_size_too_small_for_disk() {
    patched("l1_size_too_small_for_disk", Expect::Refuse, &[], |b| {
        put_u64(b, field::SIZE, 1 << 40)
    });
}

#[test]
fn refcount_table_clusters_absurd() {
    patched("refcount_table_clusters_absurd", Expect::Refuse, &[], |b| {
        put_u32(b, field::REFCOUNT_TABLE_CLUSTERS, 0x00ff_ffff)
    });
}

#[test]
fn cluster_bits_8() {
    patched("cluster_bits_8", Expect::Refuse, &[], |b| {
        put_u32(b, field::CLUSTER_BITS, 8)
    });
}

#[test]
fn cluster_bits_22() {
    patched("cluster_bits_22", Expect::Refuse, &[], |b| {
        put_u32(b, field::CLUSTER_BITS, 22)
    });
}

#[test]
fn cluster_bits_63() {
    patched("cluster_bits_63", Expect::Refuse, &[], |b| {
        put_u32(b, field::CLUSTER_BITS, 63)
    });
}

#[test]
fn l1_table_overlaps_header() {
    patched("l1_table_overlaps_header", Expect::Refuse, &[], |b| {
        put_u64(b, field::L1_TABLE_OFFSET, 0)
    });
}

#[test]
fn refcount_table_overlaps_header() {
    patched("refcount_table_overlaps_header", Expect::Refuse, &[], |b| {
        put_u64(b, field::REFCOUNT_TABLE_OFFSET, 0)
    });
}

#[test]
fn version_1() {
    patched("version_1", Expect::Refuse, &[], |b| {
        put_u32(b, field::VERSION, 1)
    });
}

#[test]
fn version_4() {
    patched("version_4", Expect::Refuse, &[], |b| {
        put_u32(b, field::VERSION, 4)
    });
}

#[test]
fn refcount_order_7() {
    patched("refcount_order_7", Expect::Refuse, &[], |b| {
        put_u32(b, field::REFCOUNT_ORDER, 7)
    });
}

#[test]
fn header_length_beyond_cluster() {
    patched("header_length_beyond_cluster", Expect::Refuse, &[], |b| {
        put_u32(b, field::HEADER_LENGTH, 0x0010_0000)
    });
}

#[test]
fn aes_encryption() {
    patched("aes_encryption", Expect::Refuse, &[], |b| {
        put_u32(b, field::CRYPT_METHOD, 1)
    });
}

#[test]
fn snapshot_count_absurd() {
    patched("snapshot_count_absurd", Expect::Refuse, &[], |b| {
        put_u32(b, field::NB_SNAPSHOTS, u32::MAX);
        put_u64(b, field::SNAPSHOTS_OFFSET, 1 << 40);
    });
}

#[test]
fn l2_entry_unaligned() {
    patched("l2_entry_unaligned", Expect::Refuse, &[], |b| {
        let h = Header::parse(b);
        let pos = h.l2_entry_pos(b, 0).expect("cluster 0 is mapped");
        let e = get_u64(b, pos);
        put_u64(b, pos, e + 512);
    });
}

#[test]
fn l2_table_beyond_eof() {
    patched("l2_table_beyond_eof", Expect::Refuse, &[], |b| {
        let h = Header::parse(b);
        put_u64(
            b,
            h.l1_table_offset as usize,
            qcow2::OFLAG_COPIED | (1u64 << 40),
        );
    });
}

/// An incompatible feature bit Strata cannot know, named in the feature-name table:
/// the error must name it.
#[test]
fn unknown_incompatible_feature() {
    patched(
        "unknown_incompatible_feature",
        Expect::Refuse,
        &["strata-test-feature"],
        |b| {
            let mut exts = qcow2::extensions(b);
            let entry = qcow2::feature_name_entry(0, 10, "strata-test-feature");
            match exts
                .iter_mut()
                .find(|(t, _)| *t == qcow2::EXT_FEATURE_NAMES)
            {
                Some((_, table)) => table.extend_from_slice(&entry),
                None => exts.push((qcow2::EXT_FEATURE_NAMES, entry)),
            }
            qcow2::set_extensions(b, &exts);
            let f = get_u64(b, field::INCOMPATIBLE_FEATURES);
            put_u64(b, field::INCOMPATIBLE_FEATURES, f | 1 << 10);
        },
    );
}

/// The external data file bit without a data file name.
#[test]
fn external_data_file_without_name() {
    patched(
        "external_data_file_without_name",
        Expect::Refuse,
        &[],
        |b| {
            let f = get_u64(b, field::INCOMPATIBLE_FEATURES);
            put_u64(b, field::INCOMPATIBLE_FEATURES, f | 1 << 2);
        },
    );
}

/// The corrupt bit: QEMU refuses read-write and allows read-only; so must Strata.
#[test]
fn corrupt_bit() {
    patched("corrupt_bit", Expect::RefuseWrite, &["corrupt"], |b| {
        let f = get_u64(b, field::INCOMPATIBLE_FEATURES);
        put_u64(b, field::INCOMPATIBLE_FEATURES, f | 1 << 1);
    });
}

/// Compressed-cluster descriptors that lie.
fn bad_compressed(name: &str, f: impl Fn(u64, u64, u32) -> u64) {
    require_qemu!();
    let b = base("compression_type=zlib", true);
    let mut bytes = b.bytes.clone();
    let h = Header::parse(&bytes);
    let pos = h.l2_entry_pos(&bytes, 0).expect("cluster 0 is mapped");
    let e = get_u64(&bytes, pos);
    assert!(
        e & qcow2::L2_COMPRESSED != 0,
        "{name}: cluster 0 is not compressed"
    );
    // Compressed descriptor: host offset in the low (62 - (cluster_bits - 8)) bits,
    // then the number of additional 512-byte sectors.
    let x = 62 - (h.cluster_bits - 8);
    let offset = e & ((1u64 << x) - 1);
    let sectors = (e >> x) & ((1u64 << (h.cluster_bits - 8)) - 1);
    let new = f(offset, sectors, x);
    put_u64(&mut bytes, pos, qcow2::L2_COMPRESSED | new);
    let img = b.dir.path().join(format!("{name}.qcow2"));
    case(
        name,
        Expect::Refuse,
        &[(img, bytes)],
        &b.disk_hash,
        &[],
        true,
    );
}

#[test]
fn compressed_descriptor_beyond_eof() {
    bad_compressed("compressed_descriptor_beyond_eof", |_, sectors, x| {
        (1u64 << 40) | sectors << x
    });
}

#[test]
fn compressed_descriptor_garbage_stream() {
    // Inside the file, at the maximum length, over metadata that is not a
    // compressed stream.
    bad_compressed("compressed_descriptor_garbage_stream", |_, _, x| {
        0x30000 | (((1u64 << (62 - x)) - 1) << x)
    });
}

#[test]
fn compressed_descriptor_into_header() {
    bad_compressed("compressed_descriptor_into_header", |_, sectors, x| {
        sectors << x
    });
}

/// a -> b -> a.
#[test]
fn backing_chain_loop() {
    require_qemu!();
    let dir = tempdir();
    let a = dir.path().join("a.qcow2");
    let b = dir.path().join("b.qcow2");
    qemu::img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-u",
        "-b",
        "b.qcow2",
        "-F",
        "qcow2",
        s(&a),
        "4M",
    ])
    .ok();
    qemu::img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-u",
        "-b",
        "a.qcow2",
        "-F",
        "qcow2",
        s(&b),
        "4M",
    ])
    .ok();
    let ab = std::fs::read(&a).unwrap();
    let bb = std::fs::read(&b).unwrap();
    case(
        "backing_chain_loop",
        Expect::Refuse,
        &[(a, ab), (b, bb)],
        "",
        &[],
        false,
    );
}

/// An image whose backing file is itself.
#[test]
fn backing_file_is_itself() {
    require_qemu!();
    let dir = tempdir();
    let a = dir.path().join("self.qcow2");
    qemu::img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-u",
        "-b",
        "self.qcow2",
        "-F",
        "qcow2",
        s(&a),
        "4M",
    ])
    .ok();
    let ab = std::fs::read(&a).unwrap();
    case(
        "backing_file_is_itself",
        Expect::Refuse,
        &[(a, ab)],
        "",
        &[],
        false,
    );
}

/// A backing file that does not exist.
#[test]
fn backing_file_missing() {
    require_qemu!();
    let dir = tempdir();
    let a = dir.path().join("top.qcow2");
    qemu::img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-u",
        "-b",
        "gone.qcow2",
        "-F",
        "qcow2",
        s(&a),
        "4M",
    ])
    .ok();
    let ab = std::fs::read(&a).unwrap();
    case(
        "backing_file_missing",
        Expect::Refuse,
        &[(a, ab)],
        "",
        &[],
        true,
    );
}

/// Random byte mutations of the header, L1, L2 and refcount structures: whatever the
/// library makes of them, it must not panic, abort, hang or allocate without bound, and a
/// read-only open must leave the file alone. (Read-write opens of mutants may
/// legitimately repair, so only their survival is checked.)
#[test]
fn random_metadata_mutations() {
    use rand::{Rng, SeedableRng};
    require_qemu!();
    let seed = strata_tests::seed("random_metadata_mutations");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let b = base("", false);
    let h = Header::parse(&b.bytes);
    let cs = h.cluster_size() as usize;
    let l2 = h.l2_entry_pos(&b.bytes, 0).expect("cluster 0 is mapped") / cs * cs;
    let rt = h.refcount_table_offset as usize;
    let rb = (get_u64(&b.bytes, rt) & !(cs as u64 - 1)) as usize;
    let regions = [
        (0, 112),
        (112, cs),
        (h.l1_table_offset as usize, h.l1_size as usize * 8),
        (l2, cs),
        (rt, 64),
        (rb, 256),
    ];
    let img = b.dir.path().join("mutant.qcow2");
    for m in 0..150 {
        let mut bytes = b.bytes.clone();
        let mut what = Vec::new();
        for _ in 0..rng.gen_range(1..=4) {
            let (start, len) = regions[rng.gen_range(0..regions.len())];
            let pos = start + rng.gen_range(0..len.max(1));
            if rng.gen_bool(0.5) {
                bytes[pos] ^= 1 << rng.gen_range(0..8);
            } else {
                bytes[pos] = rng.gen();
            }
            what.push(format!("{pos:#x}={:#04x}", bytes[pos]));
        }
        std::fs::write(&img, &bytes).unwrap();
        let ro = probe(&img, "ro");
        let after = std::fs::read(&img).unwrap();
        assert!(
            after == bytes,
            "mutant {m} (seed {seed}; {}) was modified by a read-only open ({})",
            what.join(" "),
            ro.line
        );
        let _rw = probe(&img, "rw");
    }
}
