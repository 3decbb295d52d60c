//! `strata-img bitmap` against `qemu-img bitmap`: the same sequence of commands on two
//! copies of the same images must print the same messages (after the program name and
//! the generated `#blockNNN` node names), exit with the same codes, and leave the same
//! bitmaps (names, granularities, flags; and the same dirty bits, read back through
//! the block layer whose bitmap loading the QMP differential tests check).

use std::path::Path;

use strata_tests::{qemu, require_qemu, s, strata_img_bin, tempdir};

/// The images every run starts from: a v3 qcow2 with data, a v2 qcow2, a raw file.
fn images(dir: &Path) {
    qemu::create(&dir.join("a.qcow2"), "qcow2", "", "64M");
    qemu::io("qcow2", &dir.join("a.qcow2"), &["write 0 1M"]);
    qemu::create(&dir.join("v2.qcow2"), "qcow2", "compat=0.10", "64M");
    qemu::create(&dir.join("r.raw"), "raw", "", "1M");
}

/// What a command printed, with the program name and generated node names replaced.
fn normalised(out: &qemu::Out, program: &str) -> String {
    let text = format!("{}{}", out.stdout, out.stderr).replace(&format!("{program}: "), "");
    let mut norm = String::new();
    let mut rest = text.as_str();
    while let Some(i) = rest.find("#block") {
        norm.push_str(&rest[..i]);
        norm.push_str("#blockN");
        rest = rest[i + 6..].trim_start_matches(|c: char| c.is_ascii_digit());
    }
    norm.push_str(rest);
    format!("{norm}exit {}", out.code)
}

/// The bitmaps `qemu-img info` lists for `image`.
fn bitmaps(image: &Path) -> serde_json::Value {
    let out = qemu::img(&["info", "--output=json", "-U", s(image)]).ok();
    let v: serde_json::Value = serde_json::from_str(&out.stdout).expect("info JSON");
    v["format-specific"]["data"]["bitmaps"].clone()
}

/// Runs every command line on fresh images with qemu-img and with strata-img.
fn compare(cases: &[&str], check_bits: &[&str]) {
    let mut results = Vec::new();
    for program in ["qemu-img", "strata-img"] {
        let dir = tempdir();
        images(dir.path());
        let bin = if program == "qemu-img" {
            "qemu-img".to_string()
        } else {
            s(&strata_img_bin()).to_string()
        };
        let mut log = Vec::new();
        for case in cases {
            let mut args = vec!["bitmap"];
            args.extend(case.split_whitespace());
            let out = std::process::Command::new(&bin)
                .args(&args)
                .current_dir(dir.path())
                .output()
                .expect("run the tool");
            let out = qemu::Out {
                cmdline: format!("{program} bitmap {case}"),
                code: out.status.code().unwrap_or(-1),
                stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
                stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            };
            log.push(format!("{case}: {}", normalised(&out, program)));
        }
        let a = dir.path().join("a.qcow2");
        let check = qemu::check(&a);
        assert_eq!(
            check.code, 0,
            "{program}: qemu-img check:\n{}",
            check.stdout
        );
        let bits = dirty_bits(&a, check_bits);
        results.push((log, bitmaps(&a), bits));
    }
    let (q, st) = (&results[0], &results[1]);
    for (i, (a, b)) in q.0.iter().zip(&st.0).enumerate() {
        assert_eq!(a, b, "command {i} differs (qemu-img first)");
    }
    assert_eq!(q.1, st.1, "the stored bitmaps differ (qemu-img first)");
    assert_eq!(q.2, st.2, "the dirty bits differ (qemu-img first)");
}

/// The SHA-256 of each named bitmap's bits, loaded through the block layer.
fn dirty_bits(image: &Path, names: &[&str]) -> Vec<String> {
    let g = strata_block::BlockGraph::new();
    let o = strata_block::BlockdevOptions::from_json(&serde_json::json!({
        "driver": "qcow2", "node-name": "n", "read-only": true,
        "file": {"driver": "file", "filename": s(image), "read-only": true},
    }))
    .expect("options");
    g.blockdev_add(&o).expect("open");
    let out = names
        .iter()
        .map(|b| match g.bitmap_sha256("n", b) {
            Ok(v) => v["sha256"].as_str().unwrap_or("").to_string(),
            Err(e) => e.desc,
        })
        .collect();
    let _ = g.close_all();
    out
}

#[test]
fn bitmap_commands_match_qemu_img() {
    require_qemu!();
    compare(
        &[
            "--add a.qcow2 b1",
            "--add a.qcow2 b1",
            "--add -g 131072 --disable a.qcow2 b2",
            "--remove a.qcow2 nope",
            "--clear a.qcow2 b1",
            "--enable a.qcow2 b2",
            "--merge b1 a.qcow2 b2",
            "--merge nope a.qcow2 b2",
            "-g 65536 --clear a.qcow2 b1",
            "a.qcow2 b1",
            "--add a.qcow2",
            "--add -F qcow2 a.qcow2 x",
            "--add -b a.qcow2 a.qcow2 x",
            "--add v2.qcow2 x",
            "-f raw --add r.raw x",
            "--add -g 3 a.qcow2 x",
            "--add -g abc a.qcow2 x",
            "--add --remove a.qcow2 y",
            "--add nope.qcow2 x",
            "--merge b2 -b v2.qcow2 -F raw a.qcow2 x",
            "--merge b2 -b r.raw -F raw a.qcow2 b2",
            "--remove a.qcow2 b1",
        ],
        &["b2"],
    );
}

/// Dirty bits written by QEMU, then merged, cleared and copied by each tool.
#[test]
fn merged_dirty_bits_match_qemu_img() {
    require_qemu!();
    // qemu-io marks the enabled bitmap `w` dirty and stores it on close.
    let prepare = |dir: &Path| {
        let a = dir.join("a.qcow2");
        let out = qemu::img(&["bitmap", "--add", "-g", "65536", s(&a), "w"]);
        assert_eq!(out.code, 0, "{}", out.stderr);
        qemu::io(
            "qcow2",
            &a,
            &["write 0 64k", "write 5M 192k", "write 30M 1k"],
        );
    };
    let mut results = Vec::new();
    for tool in ["qemu-img".to_string(), s(&strata_img_bin()).to_string()] {
        let dir = tempdir();
        images(dir.path());
        prepare(dir.path());
        let a = dir.path().join("a.qcow2");
        let other = dir.path().join("o.qcow2");
        std::fs::copy(&a, &other).expect("copy");
        for args in [
            vec![
                "--add",
                "-g",
                "131072",
                "--disable",
                "--merge",
                "w",
                s(&a),
                "m",
            ],
            vec![
                "--add",
                "--merge",
                "w",
                "-b",
                s(&other),
                "-F",
                "qcow2",
                s(&a),
                "x",
            ],
            vec!["--clear", s(&a), "w"],
        ] {
            let mut all = vec!["bitmap"];
            all.extend(args.iter().copied());
            let out = qemu::run(&tool, &all);
            assert_eq!(out.code, 0, "`{}`: {}", out.cmdline, out.stderr);
        }
        results.push((bitmaps(&a), dirty_bits(&a, &["m", "x", "w"])));
    }
    assert_eq!(results[0], results[1], "qemu-img first, then strata-img");
    // `x` (granularity 64 KiB, like the cleared `w`) holds QEMU's bits; otherwise
    // the comparison above proves nothing.
    let bits = &results[0].1;
    assert!(bits.iter().all(|h| h.len() == 64), "{bits:?}");
    assert_ne!(bits[1], bits[2], "the bitmap merged from -b is empty");
}
