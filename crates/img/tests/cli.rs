//! End-to-end tests of the `strata-img` binary: each runs the real executable on
//! images in a temporary directory and checks its output and exit code. They need
//! no QEMU; comparisons against qemu-img live in the workspace's `tests/`.

use std::path::Path;
use std::process::{Command, Output};

fn run(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_strata-img"))
        .current_dir(dir)
        .args(args)
        .output()
        .expect("run strata-img")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn write_at(path: &Path, offset: u64, data: &[u8]) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(data, offset).unwrap();
}

#[test]
fn create_info_raw() {
    let d = tempfile::tempdir().unwrap();
    let o = run(d.path(), &["create", "-f", "raw", "a.raw", "10M"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stdout(&o), "Formatting 'a.raw', fmt=raw size=10485760\n");
    let o = run(d.path(), &["info", "-f", "raw", "a.raw"]);
    assert!(o.status.success());
    let out = stdout(&o);
    assert!(
        out.starts_with("image: a.raw\nfile format: raw\nvirtual size: 10 MiB (10485760 bytes)\n")
    );
    let o = run(d.path(), &["info", "--output=json", "-f", "raw", "a.raw"]);
    let out = stdout(&o);
    assert!(out.contains("\"virtual-size\": 10485760,"), "{out}");
    assert!(out.contains("\"format\": \"raw\","), "{out}");
}

#[test]
fn map_merges_extents() {
    let d = tempfile::tempdir().unwrap();
    assert!(run(d.path(), &["create", "-f", "raw", "a.raw", "1M"])
        .status
        .success());
    write_at(&d.path().join("a.raw"), 512 << 10, &[7u8; 8192]);
    let o = run(d.path(), &["map", "--output=json", "-f", "raw", "a.raw"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(out.starts_with("[{ \"start\": 0, \"length\": 4096, \"depth\": 0, \"present\": true, \"zero\": false, \"data\": true"), "{out}");
    assert!(out.contains("{ \"start\": 524288, \"length\": 8192, \"depth\": 0, \"present\": true, \"zero\": false, \"data\": true, \"compressed\": false, \"offset\": 524288}"), "{out}");
    assert!(out.ends_with("}]\n"), "{out}");
}

#[test]
fn convert_and_compare() {
    let d = tempfile::tempdir().unwrap();
    assert!(run(d.path(), &["create", "-f", "raw", "a.raw", "4M"])
        .status
        .success());
    write_at(&d.path().join("a.raw"), 1 << 20, &[9u8; 70000]);
    let o = run(
        d.path(),
        &["convert", "-f", "raw", "-O", "raw", "a.raw", "b.raw"],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let o = run(
        d.path(),
        &["compare", "-f", "raw", "-F", "raw", "a.raw", "b.raw"],
    );
    assert_eq!(o.status.code(), Some(0));
    assert_eq!(stdout(&o), "Images are identical.\n");
    write_at(&d.path().join("b.raw"), (1 << 20) + 100, &[1u8]);
    let o = run(
        d.path(),
        &["compare", "-f", "raw", "-F", "raw", "a.raw", "b.raw"],
    );
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(stdout(&o), "Content mismatch at offset 1048676!\n");
    let o = run(d.path(), &["compare", "a.raw", "missing.raw"]);
    assert_eq!(o.status.code(), Some(2));
}

#[test]
fn qcow2_round_trip() {
    let d = tempfile::tempdir().unwrap();
    let o = run(d.path(), &["create", "-f", "qcow2", "a.qcow2", "64M"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        stdout(&o),
        "Formatting 'a.qcow2', fmt=qcow2 cluster_size=65536 extended_l2=off compression_type=zlib size=67108864 lazy_refcounts=off refcount_bits=16\n"
    );
    assert!(run(d.path(), &["create", "-f", "raw", "src.raw", "8M"])
        .status
        .success());
    write_at(&d.path().join("src.raw"), 3 << 20, &[5u8; 200_000]);
    for extra in [&[][..], &["-c"][..]] {
        let mut args = vec!["convert", "-f", "raw", "-O", "qcow2"];
        args.extend_from_slice(extra);
        args.extend_from_slice(&["src.raw", "c.qcow2"]);
        let o = run(d.path(), &args);
        assert!(o.status.success(), "{}", stderr(&o));
        let o = run(
            d.path(),
            &["compare", "-f", "raw", "-F", "qcow2", "src.raw", "c.qcow2"],
        );
        assert_eq!(stdout(&o), "Images are identical.\n", "{}", stderr(&o));
        let o = run(d.path(), &["check", "c.qcow2"]);
        assert_eq!(o.status.code(), Some(0), "{}", stdout(&o));
        assert!(stdout(&o).starts_with("No errors were found on the image.\n"));
    }
}

#[test]
fn errors_are_one_line() {
    let d = tempfile::tempdir().unwrap();
    for args in [
        &["info", "nonexistent.img"][..],
        &["info", "-z", "x"][..],
        &["create", "-f", "qcow2", "-o", "foo=bar", "x.qcow2", "1M"][..],
        &["create", "-f", "raw", "x.raw", "1x"][..],
        &["check", "-r", "some", "x"][..],
        &["frobnicate"][..],
        &["bench", "-c", "x", "y"][..],
    ] {
        let o = run(d.path(), args);
        assert!(!o.status.success(), "{args:?}");
        let err = stderr(&o);
        assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
        assert!(err.starts_with("strata-img"), "{args:?}: {err}");
    }
    let o = run(d.path(), &["create", "-f", "raw", "r.raw", "1M"]);
    assert!(o.status.success());
    let o = run(d.path(), &["check", "-f", "raw", "r.raw"]);
    assert_eq!(o.status.code(), Some(63));
    assert_eq!(
        stderr(&o),
        "strata-img: This image format does not support checks\n"
    );
}

#[test]
fn resize_needs_shrink_flag() {
    let d = tempfile::tempdir().unwrap();
    assert!(run(d.path(), &["create", "-f", "raw", "r.raw", "2M"])
        .status
        .success());
    let o = run(d.path(), &["resize", "-f", "raw", "r.raw", "+1M"]);
    assert_eq!(stdout(&o), "Image resized.\n");
    assert_eq!(
        std::fs::metadata(d.path().join("r.raw")).unwrap().len(),
        3 << 20
    );
    let o = run(d.path(), &["resize", "-f", "raw", "r.raw", "1M"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).starts_with("strata-img: Use the --shrink option"));
    let o = run(
        d.path(),
        &["resize", "-f", "raw", "--shrink", "r.raw", "-1M"],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        std::fs::metadata(d.path().join("r.raw")).unwrap().len(),
        2 << 20
    );
}

#[test]
fn bench_prints_qemu_lines() {
    let d = tempfile::tempdir().unwrap();
    assert!(run(d.path(), &["create", "-f", "raw", "r.raw", "1M"])
        .status
        .success());
    let o = run(
        d.path(),
        &[
            "bench",
            "-f",
            "raw",
            "-w",
            "-c",
            "100",
            "-d",
            "4",
            "--flush-interval=10",
            "r.raw",
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        lines[0],
        "Sending 100 write requests, 4096 bytes each, 4 in parallel (starting at offset 0, step size 4096)"
    );
    assert_eq!(lines[1], "Sending flush every 10 requests");
    assert!(lines[2].starts_with("Run completed in "));
}
