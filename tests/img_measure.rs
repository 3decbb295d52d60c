//! `strata-img measure` against `qemu-img measure`: the same command lines (target
//! formats and options, `--size`, source images with data, zeroes, holes, a backing
//! chain and persistent bitmaps, and every usage error) print the same thing and
//! exit with the same code.

use strata_tests::{qemu, require_qemu, s, strata_img_bin, tempdir};

#[test]
fn measure_matches_qemu_img() {
    require_qemu!();
    let dir = tempdir();
    let d = dir.path();
    let p = |n: &str| d.join(n);
    qemu::create(&p("a.qcow2"), "qcow2", "", "100M");
    qemu::io(
        "qcow2",
        &p("a.qcow2"),
        &[
            "write 0 1M",
            "write 50M 64k",
            "write -z 60M 1M",
            "write 70M 1k",
        ],
    );
    let out = qemu::img(&["bitmap", "--add", "-g", "131072", s(&p("a.qcow2")), "b1"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    qemu::create(&p("r.raw"), "raw", "", "10M");
    qemu::io("raw", &p("r.raw"), &["write 0 1M", "write 5M 4k"]);
    qemu::create(&p("base.qcow2"), "qcow2", "", "100M");
    qemu::io("qcow2", &p("base.qcow2"), &["write 10M 3M"]);
    qemu::create(
        &p("top.qcow2"),
        "qcow2",
        &format!("backing_file={},backing_fmt=qcow2", s(&p("base.qcow2"))),
        "100M",
    );
    qemu::io("qcow2", &p("top.qcow2"), &["write 0 1M", "write -z 10M 1M"]);
    qemu::create(&p("v2.qcow2"), "qcow2", "compat=0.10", "10M");
    qemu::io("qcow2", &p("v2.qcow2"), &["write 0 100k"]);
    let cases = [
        "-O qcow2 a.qcow2",
        "--output=json -O qcow2 a.qcow2",
        "-O raw a.qcow2",
        "a.qcow2",
        "-O qcow2 -o cluster_size=4k,refcount_bits=64 a.qcow2",
        "-O qcow2 -o cluster_size=512 a.qcow2",
        "-O qcow2 -o cluster_size=2M a.qcow2",
        "-O qcow2 -o extended_l2=on a.qcow2",
        "-O qcow2 -o preallocation=full a.qcow2",
        "-O qcow2 -o preallocation=metadata a.qcow2",
        "-O qcow2 -o compat=0.10 a.qcow2",
        "-O qcow2 r.raw",
        "-O qcow2 -f raw r.raw",
        "-O raw r.raw",
        "-O qcow2 top.qcow2",
        "--output=json -O qcow2 -o cluster_size=4k top.qcow2",
        "-O qcow2 v2.qcow2",
        "-O qcow2 --size 1G",
        "-O qcow2 --size 0",
        "-O qcow2 -o compat=0.10 --size 10G",
        "-O qcow2 -o backing_file=x --size 1M",
        "-O raw --size 1000",
        "--output=json -O raw --size 1M",
        "-O qcow2",
        "-O qcow2 --size 1G a.qcow2",
        "-O foo a.qcow2",
        "-O qcow2 nope.qcow2",
        "-O qcow2 --size -5",
        "-O qcow2 --size abc",
        "-O qcow2 -o cluster_size=3 --size 1M",
        "-O qcow2 -o foo=bar --size 1M",
    ];
    let strata = strata_img_bin();
    for case in cases {
        let mut args = vec!["measure"];
        args.extend(case.split_whitespace());
        let run = |program: &str, name: &str| {
            let out = std::process::Command::new(program)
                .args(&args)
                .current_dir(d)
                .output()
                .expect("run the tool");
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )
            .replace(&format!("{name}: "), "");
            (text, out.status.code())
        };
        let q = run("qemu-img", "qemu-img");
        let st = run(s(&strata), "strata-img");
        assert_eq!(
            st, q,
            "measure {case}: strata-img (left) and qemu-img differ"
        );
    }
}
