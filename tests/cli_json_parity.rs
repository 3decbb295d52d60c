//! `strata-img` against `qemu-img`: `info`, `map` and `check` with `--output=json`, on
//! the same images, must print the same keys and values and exit with the same code.
//!
//! Legitimate differences are listed in [`EXCEPTIONS`]; everything else must match
//! exactly. The `strata-img` binary is looked for next to this test's build directory
//! (see [`strata_img_bin`]); when it is missing the tests fail and say how to build it.

use std::path::Path;

use serde_json::Value;
use strata_tests::qcow2::{get_u64, put_u16_at, Header};
use strata_tests::{qemu, require_qemu, s, strata_img_bin, tempdir};

/// Keys whose values may differ between the tools, with the reason. They must still be
/// present on both sides with the same JSON type.
const EXCEPTIONS: &[(&str, &str)] = &[(
    "actual-size",
    "host bytes allocated to the file, measured by each tool at its own moment; file \
     systems may settle delayed allocation in between",
)];

/// Runs `qemu-img` and `strata-img` with the same arguments and compares their JSON.
fn parity(what: &str, args: &[&str]) {
    let bin = strata_img_bin();
    let q = qemu::img(args);
    let st = qemu::run(s(&bin), args);
    assert_eq!(
        st.code, q.code,
        "{what}: `{}` exited {} but qemu-img exited {}\nstrata-img stderr: {}\nqemu-img stderr: {}",
        st.cmdline, st.code, q.code, st.stderr, q.stderr
    );
    let qj: Value = serde_json::from_str(&q.stdout)
        .unwrap_or_else(|e| panic!("{what}: qemu-img printed no JSON ({e}):\n{}", q.stdout));
    let sj: Value = serde_json::from_str(&st.stdout).unwrap_or_else(|e| {
        panic!(
            "{what}: `{}` printed no valid JSON ({e}):\n{}\nstderr: {}",
            st.cmdline, st.stdout, st.stderr
        )
    });
    let mut diffs = Vec::new();
    diff("", &sj, &qj, &mut diffs);
    if !diffs.is_empty() {
        panic!(
            "{what}: `{}` differs from qemu-img:\n  {}\nqemu-img printed:\n{}\nstrata-img printed:\n{}",
            st.cmdline,
            diffs.join("\n  "),
            q.stdout,
            st.stdout
        );
    }
}

/// Collects the differences between `got` (Strata) and `want` (QEMU).
fn diff(path: &str, got: &Value, want: &Value, out: &mut Vec<String>) {
    match (got, want) {
        (Value::Object(g), Value::Object(w)) => {
            for (k, wv) in w {
                let p = format!("{path}/{k}");
                match g.get(k) {
                    None => out.push(format!("{p}: missing (qemu-img: {wv})")),
                    Some(gv) if EXCEPTIONS.iter().any(|(e, _)| e == k) => {
                        if std::mem::discriminant(gv) != std::mem::discriminant(wv) {
                            out.push(format!("{p}: {gv} has another type than qemu-img's {wv}"));
                        }
                    }
                    Some(gv) => diff(&p, gv, wv, out),
                }
            }
            for (k, gv) in g {
                if !w.contains_key(k) {
                    out.push(format!("{path}/{k}: extra key (strata-img: {gv})"));
                }
            }
        }
        (Value::Array(g), Value::Array(w)) => {
            if g.len() != w.len() {
                out.push(format!(
                    "{path}: {} elements, qemu-img has {}",
                    g.len(),
                    w.len()
                ));
            }
            for (i, (gv, wv)) in g.iter().zip(w).enumerate() {
                diff(&format!("{path}[{i}]"), gv, wv, out);
                if out.len() > 40 {
                    return;
                }
            }
        }
        _ => {
            if got != want {
                out.push(format!("{path}: {got} (qemu-img: {want})"));
            }
        }
    }
}

/// A directory of images made by qemu-img, shared by the tests below.
struct Images {
    dir: tempfile::TempDir,
}

impl Images {
    fn path(&self, name: &str) -> String {
        s(&self.dir.path().join(name)).to_string()
    }
}

fn writes(path: &Path) {
    qemu::io(
        "qcow2",
        path,
        &[
            "write -P 0x11 0 100k",
            "write -P 0x22 1M 64k",
            "write -z 2M 128k",
            "write -P 0x33 3M 1000",
            "discard 1M 32k",
            "write -P 0x44 7M 1M",
        ],
    );
}

fn images() -> Images {
    let dir = tempdir();
    let p = |n: &str| dir.path().join(n);
    for (name, opts) in [
        ("v3.qcow2", ""),
        ("v2.qcow2", "compat=0.10"),
        ("lazy.qcow2", "lazy_refcounts=on"),
        ("ext.qcow2", "extended_l2=on"),
        ("c4k.qcow2", "cluster_size=4096,refcount_bits=64"),
        ("prealloc.qcow2", "preallocation=metadata"),
    ] {
        qemu::create(&p(name), "qcow2", opts, "8M");
        writes(&p(name));
    }
    qemu::create(&p("empty.qcow2"), "qcow2", "", "1G");
    qemu::create(&p("base.raw"), "raw", "", "8M");
    qemu::io("raw", &p("base.raw"), &["write -P 0x55 0 4M"]);
    qemu::create(
        &p("mid.qcow2"),
        "qcow2",
        "backing_file=base.raw,backing_fmt=raw",
        "8M",
    );
    qemu::io("qcow2", &p("mid.qcow2"), &["write -P 0x66 2M 1M"]);
    qemu::create(
        &p("top.qcow2"),
        "qcow2",
        "backing_file=mid.qcow2,backing_fmt=qcow2",
        "8M",
    );
    qemu::io("qcow2", &p("top.qcow2"), &["write -P 0x77 3M 64k"]);
    qemu::img(&[
        "convert",
        "-c",
        "-O",
        "qcow2",
        "-o",
        "compression_type=zstd",
        s(&p("v3.qcow2")),
        s(&p("zstd.qcow2")),
    ])
    .ok();
    qemu::img(&["snapshot", "-c", "snap1", s(&p("v3.qcow2"))]).ok();
    qemu::io("qcow2", &p("v3.qcow2"), &["write -P 0x88 0 64k"]);
    Images { dir }
}

const ALL: &[&str] = &[
    "v3.qcow2",
    "v2.qcow2",
    "lazy.qcow2",
    "ext.qcow2",
    "c4k.qcow2",
    "prealloc.qcow2",
    "empty.qcow2",
    "zstd.qcow2",
    "mid.qcow2",
    "top.qcow2",
];

#[test]
fn info_json() {
    require_qemu!();
    let imgs = images();
    for name in ALL.iter().chain(&["base.raw"]) {
        let p = imgs.path(name);
        parity(&format!("info {name}"), &["info", "--output=json", &p]);
    }
    let top = imgs.path("top.qcow2");
    parity(
        "info --backing-chain top.qcow2",
        &["info", "--output=json", "--backing-chain", &top],
    );
    parity(
        "info -f qcow2 top.qcow2",
        &["info", "-f", "qcow2", "--output=json", &top],
    );
}

#[test]
fn map_json() {
    require_qemu!();
    let imgs = images();
    for name in ALL.iter().chain(&["base.raw"]) {
        let p = imgs.path(name);
        parity(&format!("map {name}"), &["map", "--output=json", &p]);
    }
}

/// A leaked cluster: a refcount of 1 for a cluster nothing uses (16-bit refcounts).
fn make_leak(path: &Path) {
    let mut b = std::fs::read(path).unwrap();
    let h = Header::parse(&b);
    let cs = h.cluster_size() as usize;
    let rb = get_u64(&b, h.refcount_table_offset as usize) as usize;
    let cluster = b.len().div_ceil(cs);
    b.resize((cluster + 1) * cs, 0);
    put_u16_at(&mut b, rb + 2 * cluster, 1);
    std::fs::write(path, b).unwrap();
}

/// A refcount of 0 for a cluster in use (16-bit refcounts): a corruption.
fn make_refcount_error(path: &Path) {
    let mut b = std::fs::read(path).unwrap();
    let h = Header::parse(&b);
    let cs = h.cluster_size();
    let rb = get_u64(&b, h.refcount_table_offset as usize) as usize;
    let pos = h.l2_entry_pos(&b, 0).expect("cluster 0 is mapped");
    let host = get_u64(&b, pos) & 0x00ff_ffff_ffff_fe00;
    put_u16_at(&mut b, rb + 2 * (host / cs) as usize, 0);
    std::fs::write(path, b).unwrap();
}

#[test]
fn check_json() {
    require_qemu!();
    let imgs = images();
    for name in ALL {
        let p = imgs.path(name);
        parity(&format!("check {name}"), &["check", "--output=json", &p]);
    }
    let leak = imgs.dir.path().join("leak.qcow2");
    std::fs::copy(imgs.path("v2.qcow2"), &leak).unwrap();
    make_leak(&leak);
    assert_eq!(qemu::check(&leak).code, 3, "the leak was not made");
    parity("check leak.qcow2", &["check", "--output=json", s(&leak)]);

    let bad = imgs.dir.path().join("bad.qcow2");
    std::fs::copy(imgs.path("lazy.qcow2"), &bad).unwrap();
    make_refcount_error(&bad);
    assert_eq!(qemu::check(&bad).code, 2, "the corruption was not made");
    parity("check bad.qcow2", &["check", "--output=json", s(&bad)]);
}

/// `check -r leaks` / `-r all` on two copies of a broken image: same report, same exit
/// code, and both repaired files then pass `qemu-img check`.
#[test]
fn check_repair_json() {
    require_qemu!();
    let imgs = images();
    let bin = strata_img_bin();
    for (mode, make) in [
        ("leaks", make_leak as fn(&Path)),
        ("all", make_refcount_error as fn(&Path)),
    ] {
        let q = imgs.dir.path().join(format!("q-{mode}.qcow2"));
        let st = imgs.dir.path().join(format!("s-{mode}.qcow2"));
        std::fs::copy(imgs.path("v3.qcow2"), &q).unwrap();
        make(&q);
        std::fs::copy(&q, &st).unwrap();
        let qo = qemu::img(&["check", "-r", mode, "--output=json", s(&q)]);
        let so = qemu::run(s(&bin), &["check", "-r", mode, "--output=json", s(&st)]);
        assert_eq!(
            so.code, qo.code,
            "check -r {mode}: strata-img exited {} but qemu-img {}\n{}{}",
            so.code, qo.code, so.stdout, so.stderr
        );
        let qj: Value = serde_json::from_str(&qo.stdout).expect("qemu-img JSON");
        let sj: Value = serde_json::from_str(&so.stdout).unwrap_or_else(|e| {
            panic!(
                "check -r {mode}: no JSON from strata-img ({e}): {}",
                so.stdout
            )
        });
        let mut diffs = Vec::new();
        // The file names differ by construction.
        let strip = |mut v: Value| {
            v.as_object_mut().map(|o| o.remove("filename"));
            v
        };
        diff("", &strip(sj), &strip(qj), &mut diffs);
        assert!(
            diffs.is_empty(),
            "check -r {mode}: differs from qemu-img:\n  {}",
            diffs.join("\n  ")
        );
        let after = qemu::check(&st);
        assert_eq!(
            after.code, 0,
            "after strata-img check -r {mode}, qemu-img check says:\n{}",
            after.stdout
        );
    }
}
